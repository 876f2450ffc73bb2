package ggml

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

func tinyModel(t *testing.T, dt model.DType, seed uint64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := model.Generate(f, model.Presets["tiny"], dt, seed); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLlamaGenerateGreedy(t *testing.T) {
	path := tinyModel(t, model.Q8_0, 21)
	l, err := LoadLlama(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.NVocab() != model.Presets["tiny"].Vocab {
		t.Fatalf("vocab %d", l.NVocab())
	}
	toks, err := l.Tokenize("hello world", true)
	if err != nil || len(toks) < 2 || toks[0] != 1 {
		t.Fatalf("tokenize: %v %v", toks, err)
	}
	if got := l.Detokenize(toks[1:]); got != "hello world" {
		t.Fatalf("detokenize: %q", got)
	}
	opts := ContextOptions{Threads: testThreads}
	a, err := l.GenerateGreedy("once upon a time", 24, opts, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Tokens) == 0 || len(a.Logits) < len(a.Tokens) {
		t.Fatalf("generated %d tokens, %d logits", len(a.Tokens), len(a.Logits))
	}
	for i, tok := range a.Tokens {
		if moe.Argmax(a.Logits[i]) != tok {
			t.Fatalf("token %d is not the argmax of its logits", i)
		}
	}
	b, err := l.GenerateGreedy("once upon a time", 24, opts, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Tokens) != len(a.Tokens) || b.Text != a.Text {
		t.Fatalf("greedy generation is not repeatable: %v vs %v", a.Tokens, b.Tokens)
	}
	for i := range a.Tokens {
		if a.Tokens[i] != b.Tokens[i] {
			t.Fatalf("greedy generation is not repeatable at %d", i)
		}
	}
}

func TestLlamaBadInput(t *testing.T) {
	dir := t.TempDir()
	notGGUF := filepath.Join(dir, "x.gguf")
	os.WriteFile(notGGUF, []byte("definitely not a model"), 0o644)
	if _, err := LoadLlama(notGGUF); !errors.Is(err, model.ErrFormat) {
		t.Errorf("not a gguf: %v", err)
	}
	if _, err := LoadLlama(filepath.Join(dir, "missing.gguf")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	l, err := LoadLlama(tinyModel(t, model.F32, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	long := make([]byte, 0, 4000)
	for len(long) < 3000 {
		long = append(long, "hello world "...)
	}
	if _, err := l.GenerateGreedy(string(long), 4, ContextOptions{}, false); !errors.Is(err, moe.ErrContextFull) {
		t.Errorf("prompt over the context: %v", err)
	}
	if _, err := l.GenerateGreedy("hi", 0, ContextOptions{}, false); err == nil {
		t.Error("accepted max tokens 0")
	}
	stopped, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := l.GenerateGreedyContext(stopped, "hi", 4, ContextOptions{Threads: testThreads}, false); !errors.Is(err, context.Canceled) {
		t.Errorf("a generation on a cancelled context: %v, want context.Canceled", err)
	}
	c, err := l.NewContext(ContextOptions{Context: 16, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Decode([]int32{1, 99999}); err == nil {
		t.Error("decoded a token outside the vocabulary")
	}
	if err := c.Decode(nil); err == nil {
		t.Error("decoded an empty batch")
	}
}

// A model without a chat template gets ChatML.
func TestApplyChatTemplate(t *testing.T) {
	l, err := LoadVocab(tinyModel(t, model.F32, 3))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got, err := l.ApplyChatTemplate([]moe.ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Content: "hello"}})
	if err != nil {
		t.Fatal(err)
	}
	want := "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
	if got != want {
		t.Fatalf("chat prompt %q, want %q", got, want)
	}
	if _, err := l.ApplyChatTemplate(nil); err == nil {
		t.Fatal("no messages: no error")
	}
}

// A rewound session computes what a fresh one does: the KV cache entries
// past the rewind point are overwritten, never read.
func TestSessionRewind(t *testing.T) {
	sm := splitOf(t, tinyModel(t, model.Q8_0, 17), model.SplitOptions{}, 1)
	ctx := context.Background()
	prompt := []int32{1, 40, 41, 42}
	run := func(s *Session, toks ...int32) []float32 {
		t.Helper()
		l, err := s.Forward(ctx, toks, sm.Experts)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	fresh, _ := sm.Gating.NewSession(0)
	defer fresh.Close()
	run(fresh, prompt...)
	want := run(fresh, 7)
	s, _ := sm.Gating.NewSession(0)
	defer s.Close()
	run(s, prompt...)
	run(s, 9)
	run(s, 10)
	if err := s.Rewind(len(prompt)); err != nil {
		t.Fatal(err)
	}
	got := run(s, 7)
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("logit %d after a rewind: %v, fresh session %v", i, got[i], want[i])
		}
	}
	if err := s.Rewind(s.Len() + 1); err == nil {
		t.Fatal("rewind past the end: no error")
	}
}

// In a model with sliding-window layers, whose cache is a ring, a short
// rewind computes what a fresh session does; one past what the ring still
// holds fails with moe.ErrWindowLost and changes nothing; a rewind to the
// start always works.
func TestSessionRewindSlidingWindow(t *testing.T) {
	const ubatch = 16
	p, _ := model.Preset("gpt-oss", "tiny")
	p.Context = 1024
	sm := splitOf(t, archModel(t, t.TempDir(), "gpt-oss", p, "q8_0", 19), model.SplitOptions{}, 1)
	ctx := context.Background()
	prompt := make([]int32, 300) // wraps the ring of 256 cells
	for i := range prompt {
		prompt[i] = int32(3 + i*7%400)
	}
	run := func(s *Session, toks ...int32) []float32 {
		t.Helper()
		l, err := s.Forward(ctx, toks, sm.Experts)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	same := func(what string, got, want []float32) {
		t.Helper()
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("%s: logit %d is %v, a fresh session's %v", what, i, got[i], want[i])
			}
		}
	}
	fresh, err := sm.Gating.NewSessionUBatch(0, ubatch)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	run(fresh, prompt...)
	want := run(fresh, 7)
	s, _ := sm.Gating.NewSessionUBatch(0, ubatch)
	defer s.Close()
	run(s, prompt...)
	for i := range 20 {
		run(s, int32(50+i))
	}
	if err := s.Rewind(len(prompt)); err != nil {
		t.Fatalf("a rewind of 20 tokens: %v", err)
	}
	same("after a rewind of 20 tokens", run(s, 7), want)
	// 300 + 1 tokens are in; the window before position 40 was overwritten
	// by positions 296..
	if err := s.Rewind(40); !errors.Is(err, moe.ErrWindowLost) {
		t.Fatalf("a rewind past the ring: %v, want ErrWindowLost", err)
	}
	if s.Len() != len(prompt)+1 {
		t.Fatalf("a refused rewind moved the session to %d", s.Len())
	}
	if err := s.Rewind(0); err != nil {
		t.Fatal(err)
	}
	run(s, prompt...)
	same("after a rewind to the start", run(s, 7), want)

	// moe.RewindTo, as the gating node rewinds past a wrong expert result:
	// one token back where the ring still holds the window, the whole
	// sequence again where it does not.
	gen := []int32{7}    // in the session
	for i := range 250 { // past the ring: the window before the prompt's end is overwritten
		gen = append(gen, int32(60+i%300))
		run(s, gen[len(gen)-1])
	}
	for _, step := range []int{len(gen) - 3, 1} {
		next, err := moe.RewindTo(s, prompt, gen, step)
		if err != nil {
			t.Fatal(err)
		}
		replayed := len(next) == len(prompt)+step
		if want := step == 1; replayed != want || (!replayed && len(next) != 1) {
			t.Fatalf("rewind to step %d: %d tokens to forward", step, len(next))
		}
		got := run(s, next...)
		ref, _ := sm.Gating.NewSessionUBatch(0, ubatch)
		ref.Forward(ctx, append(slices.Clone(prompt), gen[:step-1]...), sm.Experts)
		same(fmt.Sprintf("rewound to step %d (replayed %v)", step, replayed), got, run(ref, gen[step-1]))
		ref.Close()
	}
}

// A generated Qwen3-MoE model carries a GPT-2 byte-level BPE tokenizer, as
// Qwen3 does: llama.cpp loads it, no BOS is added, text of any script
// round-trips byte for byte, and common words are single merged tokens.
func TestQwen3MoeBPETokenizer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qwen.gguf")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	p := model.Presets["tiny"]
	if err := model.GenerateArch(f, "qwen3moe", p, model.Q8_0, 5); err != nil {
		t.Fatal(err)
	}
	f.Close()
	l, err := LoadLlama(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.NVocab() != p.Vocab {
		t.Fatalf("vocab %d, want %d", l.NVocab(), p.Vocab)
	}
	for _, text := range []string{"naïve café 日本 🙂", "the expert network\nsaid: \"hello\"", "  two  spaces\ttab"} {
		toks, err := l.Tokenize(text, true)
		if err != nil {
			t.Fatal(err)
		}
		if back := l.Detokenize(toks); back != text {
			t.Errorf("%q → %v → %q", text, toks, back)
		}
	}
	toks, _ := l.Tokenize(" the", true)
	if len(toks) != 1 {
		t.Errorf("\" the\" is %v, want one merged token", toks)
	}
	if !l.IsEOG(int32(p.Vocab - 1)) {
		t.Errorf("<|im_end|> (%d) does not end a generation", p.Vocab-1)
	}
}

// Generated Qwen3-MoE, gpt-oss, DeepSeek-V3 and GLM-4.5-style models carry
// their family's chat template, which llama.cpp recognises: ChatML for
// Qwen, harmony for gpt-oss (<|return|> and <|call|> end a generation,
// <|end|> only a message), DeepSeek's <｜User｜>/<｜Assistant｜>, GLM-4's
// role tokens (control tokens of the vocabulary, the next <|user|> ending
// a turn).
func TestChatTemplatesPerArchitecture(t *testing.T) {
	msgs := []moe.ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Content: "hello"}}
	for arch, want := range map[string]string{
		"qwen3moe": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
		"glm4moe":  "[gMASK]<sop><|system|>\nbe brief<|user|>\nhello<|assistant|>\n",
		"gpt-oss":  "<|start|>system<|message|>be brief<|end|><|start|>user<|message|>hello<|end|><|start|>assistant",
		// DeepSeek-V3: BOS comes from the tokenizer (add_bos_token)
		"deepseek2": "be brief\n\n<｜User｜>hello<｜Assistant｜>",
	} {
		path := filepath.Join(t.TempDir(), arch+".gguf")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := model.Preset(arch, "tiny")
		if err := model.GenerateArch(f, arch, p, model.Q8_0, 2); err != nil {
			t.Fatal(err)
		}
		f.Close()
		l, err := LoadLlama(path)
		if err != nil {
			t.Fatal(err)
		}
		got, err := l.ApplyChatTemplate(msgs)
		if err != nil || got != want {
			t.Errorf("%s: chat prompt %q (%v), want %q", arch, got, err, want)
		}
		if arch == "glm4moe" {
			// the control tokens close the vocabulary: …, <|user|>, <|assistant|>, <|observation|>
			if user := int32(p.Vocab - 3); !l.IsEOG(user) || l.IsEOG(user+1) {
				t.Errorf("glm4moe: <|user|> (%d) ends a generation %v, <|assistant|> %v", user, l.IsEOG(user), l.IsEOG(user+1))
			}
		}
		if arch == "gpt-oss" {
			// harmony: …, <|return|> (vocab-7), …, <|end|> (vocab-3), <|message|>, <|call|> (vocab-1)
			ret, end, call := int32(p.Vocab-7), int32(p.Vocab-3), int32(p.Vocab-1)
			if !l.IsEOG(ret) || !l.IsEOG(call) || l.IsEOG(end) {
				t.Errorf("gpt-oss: <|return|> ends a generation %v, <|call|> %v, <|end|> %v (want true, true, false)", l.IsEOG(ret), l.IsEOG(call), l.IsEOG(end))
			}
			// llama.cpp makes the harmony markers user-defined tokens, so
			// they stay in the generated text, where the OpenAI API splits
			// the analysis channel off; other control tokens do not.
			channel, message, eot := int32(p.Vocab-5), int32(p.Vocab-2), int32(p.Vocab-8)
			words, _ := l.Tokenize("final", false)
			hi, _ := l.Tokenize("Hi", false)
			toks := append(append(append([]int32{channel}, words...), message), append(hi, eot)...)
			if got := l.Continue(toks); got != "<|channel|>final<|message|>Hi" {
				t.Errorf("gpt-oss: Continue %q", got)
			}
		}
		l.Close()
	}
}

// A draft model drafts its own greedy continuation: drafting with the
// model itself gives exactly its greedy tokens, in pieces (each draft
// decodes only what is new: the accepted tokens, or a sequence that went
// another way is rewound to what it shares).
func TestDrafterDraftsTheGreedyContinuation(t *testing.T) {
	path := tinyModel(t, model.Q8_0, 23)
	l, err := LoadLlama(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	want, err := l.GenerateGreedy("the draft model drafts", 12, ContextOptions{Threads: testThreads}, false)
	if err != nil {
		t.Fatal(err)
	}
	dm, err := LoadDraft(Device{}, path, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer dm.Close()
	if dm.Vocab() != l.NVocab() {
		t.Fatalf("vocab %d, want %d", dm.Vocab(), l.NVocab())
	}
	d, err := dm.NewDrafter(0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	seq := slices.Clone(want.Prompt)
	var got []int32
	for len(got) < len(want.Tokens) {
		draft, err := d.Draft(seq, 4)
		if err != nil {
			t.Fatal(err)
		}
		if len(draft) == 0 {
			break
		}
		// keep the first two, as a verification might
		keep := draft[:min(2, len(draft))]
		got = append(got, keep...)
		seq = append(seq, keep...)
	}
	n := min(len(got), len(want.Tokens))
	if n == 0 || !slices.Equal(got[:n], want.Tokens[:n]) {
		t.Fatalf("drafts %v, greedy %v", got, want.Tokens)
	}
	// a sequence that went another way: the drafter rewinds to what it
	// shares and drafts from there
	other := append(slices.Clone(want.Prompt), 77)
	a, err := d.Draft(other, 3)
	if err != nil {
		t.Fatal(err)
	}
	fresh, _ := dm.NewDrafter(0)
	defer fresh.Close()
	b, err := fresh.Draft(other, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a, b) {
		t.Fatalf("after another sequence: %v, a fresh drafter %v", a, b)
	}
}

// Gating.SessionBytes, which sizes a gating node's sessions, is what a
// session's KV cache takes: full caches, a sliding-window ring, a latent
// (MLA) cache.
func TestSessionBytes(t *testing.T) {
	for _, arch := range []string{"llama", "gpt-oss", "deepseek2"} {
		p, _ := model.Preset(arch, "tiny")
		p.Context = 2048
		sm := splitOf(t, archModel(t, t.TempDir(), arch, p, "f32", 3), model.SplitOptions{}, 1)
		for _, nCtx := range []int{0, 300, 2048} {
			s, err := sm.Gating.NewSession(nCtx)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := sm.Gating.SessionBytes(nCtx), s.KVBytes(); got != want || want == 0 {
				t.Errorf("%s, context %d: SessionBytes %d, the session's KV cache %d", arch, nCtx, got, want)
			}
			s.Close()
		}
		if sm.Gating.SessionMemory() <= 0 {
			t.Errorf("session memory %d", sm.Gating.SessionMemory())
		}
	}
}

// TestLlamaGenerateGreedySeqs answers a prompt in several sequences of one
// context at once: one sequence gives GenerateGreedy's tokens, and every
// sequence of several its own generation of the same length.
func TestLlamaGenerateGreedySeqs(t *testing.T) {
	l, err := LoadLlama(tinyModel(t, model.Q8_0, 23))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	opts := ContextOptions{Threads: testThreads}
	want, err := l.GenerateGreedy("several users ask at once", 20, opts, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, seqs := range []int{1, 4} {
		gens, wall, err := l.GenerateGreedySeqs(context.Background(), "several users ask at once", 20, seqs, opts)
		if err != nil {
			t.Fatal(err)
		}
		if len(gens) != seqs || wall <= 0 {
			t.Fatalf("%d sequences: %d generations in %v", seqs, len(gens), wall)
		}
		for s, g := range gens {
			t.Logf("%d sequences, #%d: %v", seqs, s, g.Tokens)
			if len(g.Tokens) != len(want.Tokens) || len(g.Steps) < len(g.Tokens) || !slices.Equal(g.Prompt, want.Prompt) {
				t.Fatalf("%d sequences, #%d: %d tokens, %d steps; alone %d", seqs, s, len(g.Tokens), len(g.Steps), len(want.Tokens))
			}
			if seqs == 1 && !slices.Equal(g.Tokens, want.Tokens) {
				t.Fatalf("one sequence: %v, GenerateGreedy %v", g.Tokens, want.Tokens)
			}
		}
	}
	if _, _, err := l.GenerateGreedySeqs(context.Background(), "hi", 4, 0, opts); err == nil {
		t.Fatal("no sequences: no error")
	}
	if _, _, err := l.GenerateGreedySeqs(context.Background(), "hi", 400, 2, ContextOptions{Context: 64}); !errors.Is(err, moe.ErrContextFull) {
		t.Fatalf("past the context: %v", err)
	}
}
