package gating

import (
	"math/rand/v2"
	"testing"
)

// Each format's answers split into reasoning and content as the model
// families write them, and the split is the same however the streamed
// text is cut (every cut of every answer, and random cuts into pieces).
func TestReasoningSplit(t *testing.T) {
	for _, tc := range []struct {
		name, format string
		open         bool
		text         string
		reasoning    string
		content      string
	}{
		{"qwen3", ReasoningThink, false, "<think>\nThe user greets me.\n</think>\n\nHello!", "\nThe user greets me.\n", "Hello!"},
		{"qwen3 no thinking", ReasoningThink, false, "<think>\n\n</think>\n\nHi there", "\n\n", "Hi there"},
		{"whitespace first", ReasoningThink, false, "\n <think>why</think>so", "why", "so"},
		{"deepseek-r1 opened by the prompt", ReasoningThink, true, "Let me see.</think>\n\nFour.", "Let me see.", "Four."},
		{"no tag", ReasoningThink, false, "Plain answer with </think> inside", "", "Plain answer with </think> inside"},
		{"a tag later is content", ReasoningThink, false, "Say <think> to me", "", "Say <think> to me"},
		{"unclosed", ReasoningThink, false, "<think>still thinking when the tokens ran out", "still thinking when the tokens ran out", ""},
		{"almost a tag", ReasoningThink, false, "<thin", "", "<thin"},
		{"harmony", ReasoningHarmony, false,
			"<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello <|there|>!",
			"User says hi.", "Hello <|there|>!"},
		{"harmony tool call", ReasoningHarmony, false,
			"<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get <|constrain|>json<|message|>{\"city\":\"Oslo\"}",
			"Need the weather.", "{\"city\":\"Oslo\"}"},
		{"harmony skipped", ReasoningHarmony, false, "Just text <|", "", "Just text <|"},
		{"none", ReasoningNone, false, "<think>x</think>y", "", "<think>x</think>y"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, c := splitReasoning(tc.format, tc.open, tc.text)
			if r != tc.reasoning || c != tc.content {
				t.Fatalf("reasoning %q content %q, want %q %q", r, c, tc.reasoning, tc.content)
			}
			for cut := 0; cut <= len(tc.text); cut++ {
				if r, c := pieces(tc.format, tc.open, tc.text[:cut], tc.text[cut:]); r != tc.reasoning || c != tc.content {
					t.Fatalf("cut at %d: reasoning %q content %q", cut, r, c)
				}
			}
			rng := rand.New(rand.NewPCG(1, uint64(len(tc.text))))
			for range 200 {
				var ps []string
				for rest := tc.text; rest != ""; {
					n := min(len(rest), 1+rng.IntN(6))
					ps, rest = append(ps, rest[:n]), rest[n:]
				}
				if r, c := pieces(tc.format, tc.open, ps...); r != tc.reasoning || c != tc.content {
					t.Fatalf("pieces %q: reasoning %q content %q", ps, r, c)
				}
			}
		})
	}
	if ReasoningFormat("gpt-oss") != ReasoningHarmony || ReasoningFormat("qwen3moe") != ReasoningThink || ReasoningFormat("llama") != ReasoningNone {
		t.Fatal("ReasoningFormat")
	}
}

func pieces(format string, open bool, ps ...string) (string, string) {
	s := newReasoningSplitter(format, open)
	var r, c string
	for _, p := range ps {
		dr, dc := s.Push(p)
		r, c = r+dr, c+dc
	}
	dr, dc := s.Flush()
	return r + dr, c + dc
}
