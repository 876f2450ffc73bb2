package gating

import "strings"

// Reasoning formats: how a chat model's answer marks its reasoning apart
// from what it says, so that the OpenAI API can return the two as
// reasoning_content and content (as llama.cpp's server and DeepSeek's API
// do).
const (
	// ReasoningNone: the whole answer is content.
	ReasoningNone = ""
	// ReasoningThink: reasoning between <think> and </think> (Qwen3,
	// DeepSeek-R1, GLM-4.5), at the start of the answer; a prompt that
	// already opened the tag (DeepSeek-R1's template) starts inside it.
	ReasoningThink = "think"
	// ReasoningHarmony: gpt-oss's harmony messages,
	// <|channel|>NAME<|message|>TEXT<|end|> after <|start|>assistant: the
	// analysis channel is reasoning, the others (final, commentary) are
	// content; llama.cpp renders the markers into the text (it makes
	// them user-defined tokens).
	ReasoningHarmony = "harmony"
)

// ReasoningFormat is the reasoning format of a model's architecture.
func ReasoningFormat(arch string) string {
	switch arch {
	case "qwen3moe", "deepseek2", "glm4moe":
		return ReasoningThink
	case "gpt-oss":
		return ReasoningHarmony
	}
	return ReasoningNone
}

// reasoningSplitter splits a streamed answer into reasoning and content.
// Text arrives in pieces cut anywhere (a marker may straddle two); Push
// holds back what may be the start of a marker until the next piece
// settles it, and Flush gives what is left. The same text gives the same
// split however it is cut.
type reasoningSplitter struct {
	format string
	// think: inside the reasoning, whether the start (where an opening
	// tag may come) is behind us, and whether the newlines after the
	// closing tag are still to drop.
	thinking, begun, trimNL bool
	// harmony: the message part being read — the header (channel name)
	// or the body — and the current channel.
	inHeader bool
	channel  string
	header   strings.Builder
	pending  string // text not yet settled
}

// newReasoningSplitter splits answers of format; openThink: the prompt
// ended inside a <think> (the answer starts in the reasoning).
func newReasoningSplitter(format string, openThink bool) *reasoningSplitter {
	return &reasoningSplitter{format: format, thinking: format == ReasoningThink && openThink, begun: openThink}
}

// Harmony's markers.
const (
	hStart   = "<|start|>"
	hChannel = "<|channel|>"
	hMessage = "<|message|>"
	hEnd     = "<|end|>"
	hCons    = "<|constrain|>"
)

var harmonyMarkers = []string{hStart, hChannel, hMessage, hEnd, hCons, "<|return|>", "<|call|>"}

// Push takes the next piece of the answer and returns the reasoning and
// content it settles.
func (s *reasoningSplitter) Push(text string) (reasoning, content string) {
	if s.format == ReasoningNone {
		return "", text
	}
	s.pending += text
	var r, c strings.Builder
	for s.pending != "" {
		n := s.step(&r, &c, false)
		if n == 0 {
			break // a marker may be starting: wait for more
		}
		s.pending = s.pending[n:]
	}
	return r.String(), c.String()
}

// Flush returns what Push held back: the answer has ended.
func (s *reasoningSplitter) Flush() (reasoning, content string) {
	var r, c strings.Builder
	for s.pending != "" {
		n := s.step(&r, &c, true)
		s.pending = s.pending[n:]
	}
	return r.String(), c.String()
}

// step consumes the start of s.pending (returning how many bytes), writing
// what it settles; 0 means it cannot tell yet (never at the end).
func (s *reasoningSplitter) step(r, c *strings.Builder, end bool) int {
	if s.format == ReasoningHarmony {
		return s.harmonyStep(r, c, end)
	}
	p := s.pending
	if !s.begun {
		// Only at the start may <think> open the reasoning (whitespace
		// before it is dropped).
		t := strings.TrimLeft(p, " \t\r\n")
		switch {
		case strings.HasPrefix(t, "<think>"):
			s.begun, s.thinking = true, true
			return len(p) - len(t) + len("<think>")
		case t == "" && !end, strings.HasPrefix("<think>", t) && !end:
			return 0
		}
		s.begun = true
	}
	if !s.thinking {
		if s.trimNL {
			// The blank line after the closing tag belongs to neither.
			t := strings.TrimLeft(p, "\r\n")
			s.trimNL = t == ""
			if t == "" || len(t) < len(p) {
				return len(p) - len(t)
			}
		}
		c.WriteString(p)
		return len(p)
	}
	if i := strings.Index(p, "</think>"); i >= 0 {
		r.WriteString(p[:i])
		s.thinking, s.trimNL = false, true
		return i + len("</think>")
	}
	keep := partialSuffix(p, []string{"</think>"})
	if end {
		keep = 0
	}
	r.WriteString(p[:len(p)-keep])
	return len(p) - keep
}

// harmonyStep reads gpt-oss's messages. Text before any marker is content
// (a model that skipped the format).
func (s *reasoningSplitter) harmonyStep(r, c *strings.Builder, end bool) int {
	p := s.pending
	i := strings.Index(p, "<|")
	if i < 0 {
		keep := 0
		if !end {
			keep = partialSuffix(p, harmonyMarkers) // a "<" that may start one
		}
		s.text(r, c, p[:len(p)-keep])
		return len(p) - keep
	}
	if i > 0 {
		s.text(r, c, p[:i])
		return i
	}
	for _, m := range harmonyMarkers {
		if strings.HasPrefix(p, m) {
			switch m {
			case hChannel:
				s.inHeader = true
				s.header.Reset()
			case hMessage:
				if f := strings.Fields(s.header.String()); s.inHeader && len(f) > 0 {
					s.channel = f[0] // "commentary to=functions.get": the channel is the first word
				}
				s.inHeader = false
			case hStart, hEnd, "<|return|>", "<|call|>":
				s.inHeader, s.channel = m == hStart, ""
				s.header.Reset()
			case hCons:
				s.inHeader = true
			}
			return len(m)
		}
		if strings.HasPrefix(m, p) && !end {
			return 0 // a marker may be starting
		}
	}
	s.text(r, c, "<|")
	return 2
}

// text routes harmony text by where it stands: a header (a role or a
// channel name) is dropped, analysis is reasoning, the rest content.
func (s *reasoningSplitter) text(r, c *strings.Builder, t string) {
	switch {
	case s.inHeader:
		s.header.WriteString(t)
	case s.channel == "analysis":
		r.WriteString(t)
	default:
		c.WriteString(t)
	}
}

// partialSuffix is the length of the longest end of p that begins one of
// markers (and is not all of it).
func partialSuffix(p string, markers []string) int {
	best := 0
	for _, m := range markers {
		for n := min(len(m)-1, len(p)); n > best; n-- {
			if strings.HasSuffix(p, m[:n]) {
				best = n
				break
			}
		}
	}
	return best
}

// splitReasoning splits a whole answer.
func splitReasoning(format string, openThink bool, text string) (reasoning, content string) {
	s := newReasoningSplitter(format, openThink)
	r1, c1 := s.Push(text)
	r2, c2 := s.Flush()
	return r1 + r2, c1 + c2
}
