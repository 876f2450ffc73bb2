package ggml

/*
#include <stdlib.h>
#include "ggml-backend.h"
#include "llama.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Llama is a whole GGUF model loaded by llama.cpp: the reference path that
// every distributed computation is checked against.
type Llama struct {
	m      *C.struct_llama_model
	vocab  *C.struct_llama_vocab
	nVocab int
	path   string
	dev    Device
	// idle are closed contexts kept for reuse, by their options: they are
	// never freed (see LlamaContext.Close).
	poolMu sync.Mutex
	idle   map[ContextOptions][]*C.struct_llama_context
}

// LoadLlama loads the model at path on the CPU. The file is checked with
// neuro's own GGUF reader first, so that a bad file gets an error naming
// what is wrong rather than llama.cpp's log.
func LoadLlama(path string) (*Llama, error) { return loadLlama(Device{}, path, false) }

// LoadLlamaOn loads the model at path with every layer and the output head
// on device dev (the zero Device: the CPU, with no device offload at all).
func LoadLlamaOn(dev Device, path string) (*Llama, error) { return loadLlama(dev, path, false) }

// LoadVocab loads only the tokenizer of the GGUF at path (a gating shard
// carries the model's whole tokenizer).
func LoadVocab(path string) (*Llama, error) { return loadLlama(Device{}, path, true) }

func loadLlama(dev Device, path string, vocabOnly bool) (*Llama, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	st, err := f.Stat()
	if err == nil {
		_, err = model.ReadFile(f, st.Size())
	}
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	initBackend()
	params := C.llama_model_default_params()
	params.n_gpu_layers = 0
	params.vocab_only = C.bool(vocabOnly)
	// A NULL-terminated device list: empty for the CPU (no offload to a
	// GPU backend that happens to be loaded), else just dev.
	devs := (*[2]C.ggml_backend_dev_t)(C.calloc(2, C.size_t(unsafe.Sizeof(C.ggml_backend_dev_t(nil)))))
	defer C.free(unsafe.Pointer(devs))
	if !dev.CPU() {
		devs[0] = C.ggml_backend_dev_get(C.size_t(dev.Index))
		params.n_gpu_layers = 999
		params.split_mode = C.LLAMA_SPLIT_MODE_NONE
	}
	params.devices = &devs[0]
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var m *C.struct_llama_model
	if dev.CPU() {
		m = C.llama_model_load_from_file(cpath, params)
	} else { // device memory: see Gating.Close
		computeMu.Lock()
		m = C.llama_model_load_from_file(cpath, params)
		computeMu.Unlock()
	}
	if m == nil {
		return nil, fmt.Errorf("load %s on %s: llama.cpp could not load the model (see its log at debug level)", path, dev.Spec())
	}
	l := &Llama{m: m, vocab: C.llama_model_get_vocab(m), path: path, dev: dev}
	l.nVocab = int(C.llama_vocab_n_tokens(l.vocab))
	return l, nil
}

// Close frees the model. It is safe to call more than once.
func (l *Llama) Close() error {
	if l.m != nil {
		unlock := l.gpuLock()
		C.llama_model_free(l.m)
		unlock()
		l.m = nil
	}
	return nil
}

// gpuLock takes computeMu when l is on a GPU: llama.cpp's allocations,
// frees and computes there must not overlap neuro's on the same device
// (see Gating.Close). On the CPU it takes nothing: a decode must not hold
// up the node's expert compute.
func (l *Llama) gpuLock() (unlock func()) {
	if l.dev.CPU() {
		return func() {}
	}
	computeMu.Lock()
	return computeMu.Unlock
}

// NVocab is the vocabulary size.
func (l *Llama) NVocab() int { return l.nVocab }

// ContextLength is the context the model was trained with.
func (l *Llama) ContextLength() int { return int(C.llama_model_n_ctx_train(l.m)) }

// Tokenize turns text into token IDs, adding BOS where the model asks.
func (l *Llama) Tokenize(text string, addSpecial bool) ([]int32, error) {
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	n := len(text) + 8
	for range 2 {
		toks := make([]int32, n)
		got := C.llama_tokenize(l.vocab, ctext, C.int32_t(len(text)), (*C.llama_token)(unsafe.Pointer(&toks[0])),
			C.int32_t(n), C.bool(addSpecial), C.bool(false))
		if got >= 0 {
			return toks[:got], nil
		}
		n = int(-got)
	}
	return nil, fmt.Errorf("tokenize: llama.cpp needs %d tokens for %d bytes", n, len(text))
}

// Continue turns generated token IDs into the text they add after their
// prompt, dropping control tokens. Detokenize drops the leading space of
// a text's first word piece (SentencePiece's '▁'), as llama.cpp does for
// a whole text; a continuation keeps it (" upon", after "Once"): BOS is
// put in front, and dropped again, where the vocabulary adds one.
func (l *Llama) Continue(tokens []int32) string {
	if bos := C.llama_vocab_bos(l.vocab); len(tokens) > 0 && bool(C.llama_vocab_get_add_bos(l.vocab)) && bos >= 0 && tokens[0] != int32(bos) {
		tokens = append([]int32{int32(bos)}, tokens...)
	}
	return l.Detokenize(tokens)
}

// Detokenize turns token IDs into text, dropping control tokens.
func (l *Llama) Detokenize(tokens []int32) string {
	if len(tokens) == 0 {
		return ""
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= l.nVocab {
			return ""
		}
	}
	n := 16*len(tokens) + 16
	for range 2 {
		buf := make([]byte, n)
		got := C.llama_detokenize(l.vocab, (*C.llama_token)(unsafe.Pointer(&tokens[0])), C.int32_t(len(tokens)),
			(*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(n), C.bool(true), C.bool(false))
		if got >= 0 {
			return string(buf[:got])
		}
		n = int(-got)
	}
	return ""
}

// IsEOG reports whether tok ends a generation.
func (l *Llama) IsEOG(tok int32) bool { return bool(C.llama_vocab_is_eog(l.vocab, C.llama_token(tok))) }

// ContextOptions configures a LlamaContext.
type ContextOptions struct {
	// Context is the context size in tokens (default: the model's, at
	// most 4096).
	Context int
	// Threads is the number of compute threads (default GOMAXPROCS).
	Threads int
	// UBatch is llama.cpp's n_ubatch, the most tokens one graph computes
	// (default DefaultUBatch, at most Context); it also sizes the
	// sliding-window layers' cache.
	UBatch int
	// Seqs is the number of sequences the context decodes together
	// (llama.cpp's n_seq_max; default 1), each in its own Context/Seqs
	// cells of the KV cache.
	Seqs int
}

// LlamaContext is one generation's state: the KV cache and the logits of
// the last decode. Not safe for concurrent use.
type LlamaContext struct {
	l    *Llama
	c    *C.struct_llama_context
	o    ContextOptions
	nCtx int
	nPos int
}

// NewContext makes a context. Flash attention is off and the KV cache is
// F16 (llama.cpp's default type), so that the split path can reproduce the
// arithmetic exactly.
func (l *Llama) NewContext(o ContextOptions) (*LlamaContext, error) {
	if o.Context <= 0 {
		o.Context = min(l.ContextLength(), 4096)
	}
	if o.Threads <= 0 {
		o.Threads = runtime.GOMAXPROCS(0)
	}
	if o.UBatch <= 0 {
		o.UBatch = DefaultUBatch
	}
	o.UBatch = min(o.UBatch, o.Context)
	o.Seqs = max(o.Seqs, 1)
	l.poolMu.Lock()
	if cs := l.idle[o]; len(cs) > 0 {
		c := cs[len(cs)-1]
		l.idle[o] = cs[:len(cs)-1]
		l.poolMu.Unlock()
		unlock := l.gpuLock()
		C.llama_memory_clear(C.llama_get_memory(c), C.bool(true)) // a fresh sequence
		unlock()
		return &LlamaContext{l: l, c: c, nCtx: int(C.llama_n_ctx(c)) / o.Seqs, o: o}, nil
	}
	l.poolMu.Unlock()
	p := C.llama_context_default_params()
	p.n_ctx = C.uint32_t(o.Context * o.Seqs)
	p.n_batch = C.uint32_t(o.Context * o.Seqs)
	p.n_ubatch = C.uint32_t(o.UBatch)
	p.n_seq_max = C.uint32_t(o.Seqs)
	// each sequence its own stream of cells, as llama-server's slots
	// that share no prefix
	p.kv_unified = false
	p.n_threads = C.int32_t(o.Threads)
	p.n_threads_batch = C.int32_t(o.Threads)
	p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
	// the smaller sliding-window cache, as llama-server and llama-cli make
	// it (common_params::swa_full = false; the library's default is full)
	p.swa_full = false
	p.no_perf = true
	unlock := l.gpuLock()
	c := C.llama_init_from_model(l.m, p)
	unlock()
	if c == nil {
		return nil, fmt.Errorf("llama.cpp: could not make a context of %d tokens × %d sequences", o.Context, o.Seqs)
	}
	return &LlamaContext{l: l, c: c, nCtx: int(C.llama_n_ctx(c)) / o.Seqs, o: o}, nil
}

// Close gives the context back to its model for reuse; it is never freed.
// In the pinned module llama_free is a use-after-free on every device:
// ollama's patch to ggml_backend_sched_free reads each backend (for its
// reset) after llama_context has destroyed its backends, which it does
// before its scheduler. AddressSanitizer shows it (heap-use-after-free in
// ggml_backend_sched_free <- ~llama_context); on CUDA, whose backend has a
// reset, it crashed an H200 run, and on Vulkan it aborted make test with
// "double free or corruption" now and then. So a model keeps at most the
// contexts used at once, for the life of the process. Only the llama.cpp
// reference path (generate --local, tests and benchmarks) makes them; the
// node's own compute frees its scheduler first (exec_free). It is safe to
// call more than once.
func (c *LlamaContext) Close() error {
	if c.c != nil {
		c.l.poolMu.Lock()
		if c.l.idle == nil {
			c.l.idle = map[ContextOptions][]*C.struct_llama_context{}
		}
		c.l.idle[c.o] = append(c.l.idle[c.o], c.c)
		c.l.poolMu.Unlock()
		c.c = nil
	}
	return nil
}

// Len is the number of tokens decoded so far.
func (c *LlamaContext) Len() int { return c.nPos }

// Decode runs tokens through the model after those already decoded.
func (c *LlamaContext) Decode(tokens []int32) error {
	if len(tokens) == 0 {
		return errors.New("decode: no tokens")
	}
	if c.nPos+len(tokens) > c.nCtx {
		return fmt.Errorf("decode %d tokens after %d: %w (%d tokens)", len(tokens), c.nPos, moe.ErrContextFull, c.nCtx)
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= c.l.nVocab {
			return fmt.Errorf("decode: token %d outside the vocabulary of %d", t, c.l.nVocab)
		}
	}
	pinned := make([]C.llama_token, len(tokens))
	for i, t := range tokens {
		pinned[i] = C.llama_token(t)
	}
	batch := C.llama_batch_get_one(&pinned[0], C.int32_t(len(tokens)))
	unlock := c.l.gpuLock()
	rc := C.llama_decode(c.c, batch)
	unlock()
	if rc != 0 {
		return fmt.Errorf("decode: llama.cpp returned %d", int(rc))
	}
	c.nPos += len(tokens)
	return nil
}

// Logits returns a copy of the last decoded token's logits.
func (c *LlamaContext) Logits() []float32 {
	p := C.llama_get_logits_ith(c.c, -1)
	if p == nil {
		return nil
	}
	return append([]float32(nil), unsafe.Slice((*float32)(unsafe.Pointer(p)), c.l.nVocab)...)
}

// Generation is the result of a greedy generation.
type Generation struct {
	// Prompt is the tokenized prompt (with BOS).
	Prompt []int32
	// Tokens are the generated tokens (an end-of-generation token stops
	// the generation and is not included).
	Tokens []int32
	Text   string
	// Logits are the logits after each step: Logits[i] chose Tokens[i].
	Logits [][]float32
	// Steps are the times of the forward passes: Steps[i] chose Tokens[i]
	// (Steps[0] evaluated the prompt).
	Steps []time.Duration
}

// GenerateGreedy decodes the prompt and then up to maxTokens tokens, each
// the argmax of the logits, through llama.cpp. keepLogits keeps every
// step's logits.
func (l *Llama) GenerateGreedy(prompt string, maxTokens int, o ContextOptions, keepLogits bool) (*Generation, error) {
	return l.GenerateGreedyContext(context.Background(), prompt, maxTokens, o, keepLogits)
}

// GenerateGreedyContext is GenerateGreedy that stops between two decode
// steps once ctx is done, with ctx's error (`generate --local` on SIGTERM
// or Ctrl-C: it went on to its last token).
func (l *Llama) GenerateGreedyContext(cctx context.Context, prompt string, maxTokens int, o ContextOptions, keepLogits bool) (*Generation, error) {
	if maxTokens < 1 {
		return nil, fmt.Errorf("max tokens %d: must be at least 1", maxTokens)
	}
	toks, err := l.Tokenize(prompt, true)
	if err != nil {
		return nil, err
	}
	if o.Context <= 0 {
		o.Context = min(l.ContextLength(), 4096)
	}
	if len(toks)+maxTokens > o.Context {
		return nil, fmt.Errorf("prompt of %d tokens + %d new tokens: %w (%d tokens)", len(toks), maxTokens, moe.ErrContextFull, o.Context)
	}
	ctx, err := l.NewContext(o)
	if err != nil {
		return nil, err
	}
	defer ctx.Close()
	return l.greedy(toks, maxTokens, keepLogits, func(next []int32) ([]float32, error) {
		if err := cctx.Err(); err != nil {
			return nil, fmt.Errorf("generation stopped: %w", err)
		}
		if err := ctx.Decode(next); err != nil {
			return nil, err
		}
		return ctx.Logits(), nil
	})
}

// GenerateGreedySeqs answers prompt greedily seqs times at once, as
// llama-server answers as many users in its slots: one context of seqs
// sequences, their prompts decoded in one batch, then each step one batch
// of every unfinished sequence's last token. It returns each sequence's
// generation and the wall time of them all. o.Context is each sequence's
// context (default: the prompt and maxTokens). llama.cpp computes a batch
// of several rows with other kernels than one row (tinyBLAS), so a
// sequence's tokens may differ from GenerateGreedy's.
func (l *Llama) GenerateGreedySeqs(cctx context.Context, prompt string, maxTokens, seqs int, o ContextOptions) ([]*Generation, time.Duration, error) {
	if maxTokens < 1 || seqs < 1 {
		return nil, 0, fmt.Errorf("%d tokens in %d sequences: both must be at least 1", maxTokens, seqs)
	}
	toks, err := l.Tokenize(prompt, true)
	if err != nil {
		return nil, 0, err
	}
	if o.Context <= 0 {
		o.Context = len(toks) + maxTokens
	}
	if len(toks)+maxTokens > o.Context {
		return nil, 0, fmt.Errorf("prompt of %d tokens + %d new tokens: %w (%d tokens)", len(toks), maxTokens, moe.ErrContextFull, o.Context)
	}
	o.Seqs = seqs
	c, err := l.NewContext(o)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	batch := C.llama_batch_init(C.int32_t(seqs*len(toks)), 0, 1)
	defer C.llama_batch_free(batch)
	n := int(batch.n_tokens) // 0; the arrays hold seqs × prompt rows
	tok := unsafe.Slice(batch.token, seqs*len(toks))
	pos := unsafe.Slice(batch.pos, seqs*len(toks))
	nSeq := unsafe.Slice(batch.n_seq_id, seqs*len(toks))
	seqID := unsafe.Slice(batch.seq_id, seqs*len(toks))
	logits := unsafe.Slice(batch.logits, seqs*len(toks))
	add := func(t int32, p, s int, out bool) {
		tok[n], pos[n], nSeq[n] = C.llama_token(t), C.llama_pos(p), 1
		*seqID[n] = C.llama_seq_id(s)
		logits[n] = 0
		if out {
			logits[n] = 1
		}
		n++
	}
	gens := make([]*Generation, seqs)
	for s := range gens {
		gens[s] = &Generation{Prompt: toks}
		for i, t := range toks {
			add(t, i, s, i == len(toks)-1)
		}
	}
	start := time.Now()
	live := make([]int, seqs) // the sequences still generating, in batch order
	for s := range live {
		live[s] = s
	}
	for step := 0; step < maxTokens && len(live) > 0; step++ {
		if err := cctx.Err(); err != nil {
			return nil, 0, fmt.Errorf("generation stopped: %w", err)
		}
		t0 := time.Now()
		batch.n_tokens = C.int32_t(n)
		unlock := l.gpuLock()
		rc := C.llama_decode(c.c, batch)
		unlock()
		if rc != 0 {
			return nil, 0, fmt.Errorf("decode step %d of %d sequences: llama.cpp returned %d", step, len(live), int(rc))
		}
		took := time.Since(t0)
		// Each live sequence's row with logits is its last in the batch:
		// the i-th output row.
		next := live[:0:0]
		var nextTok []int32
		for i, s := range live {
			p := C.llama_get_logits_ith(c.c, C.int32_t(rowOf(step, i, len(toks))))
			if p == nil {
				return nil, 0, fmt.Errorf("decode step %d: no logits for sequence %d", step, s)
			}
			t := moe.Argmax(unsafe.Slice((*float32)(unsafe.Pointer(p)), l.nVocab))
			g := gens[s]
			g.Steps = append(g.Steps, took)
			if l.IsEOG(t) {
				continue
			}
			g.Tokens = append(g.Tokens, t)
			next, nextTok = append(next, s), append(nextTok, t)
		}
		live, n = next, 0
		for i, s := range live {
			add(nextTok[i], len(toks)+step, s, true)
		}
	}
	wall := time.Since(start)
	for _, g := range gens {
		g.Text = l.Continue(g.Tokens)
	}
	return gens, wall, nil
}

// rowOf is the batch row of the i-th live sequence's logits at step: in
// the prompts' batch each sequence's last prompt token, then its one row.
func rowOf(step, i, prompt int) int {
	if step == 0 {
		return i*prompt + prompt - 1
	}
	return i
}

// greedy decodes the prompt, then up to maxTokens argmax tokens, with
// step running one batch and returning the last token's logits.
func (l *Llama) greedy(toks []int32, maxTokens int, keepLogits bool, step func([]int32) ([]float32, error)) (*Generation, error) {
	g := &Generation{Prompt: toks}
	next := toks
	for range maxTokens {
		start := time.Now()
		logits, err := step(next)
		if err != nil {
			return nil, err
		}
		g.Steps = append(g.Steps, time.Since(start))
		tok := moe.Argmax(logits)
		if keepLogits {
			g.Logits = append(g.Logits, logits)
		}
		if l.IsEOG(tok) {
			break
		}
		g.Tokens = append(g.Tokens, tok)
		next = []int32{tok}
	}
	g.Text = l.Continue(g.Tokens)
	return g, nil
}

// ApplyChatTemplate formats a chat into a prompt with the model's chat
// template (tokenizer.chat_template), or ChatML where the model has none,
// ending with the start of the assistant's turn. Only the templates
// llama.cpp recognises are supported; another gives an error.
func (l *Llama) ApplyChatTemplate(msgs []moe.ChatMessage) (string, error) {
	if len(msgs) == 0 {
		return "", errors.New("chat template: no messages")
	}
	tmpl := C.llama_model_chat_template(l.m, nil)
	if tmpl == nil {
		tmpl = C.CString("chatml")
		defer C.free(unsafe.Pointer(tmpl))
	}
	cmsgs := (*[1 << 20]C.struct_llama_chat_message)(C.calloc(C.size_t(len(msgs)), C.size_t(unsafe.Sizeof(C.struct_llama_chat_message{}))))[:len(msgs):len(msgs)] // zeroed: see NewGatingOn
	defer C.free(unsafe.Pointer(&cmsgs[0]))
	total := 0
	for i, m := range msgs {
		cmsgs[i].role = C.CString(m.Role)
		cmsgs[i].content = C.CString(m.Content)
		defer C.free(unsafe.Pointer(cmsgs[i].role))
		defer C.free(unsafe.Pointer(cmsgs[i].content))
		total += len(m.Role) + len(m.Content)
	}
	n := 2*total + 256
	for range 2 {
		buf := make([]byte, n)
		got := C.llama_chat_apply_template(tmpl, &cmsgs[0], C.size_t(len(msgs)), true, (*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(n))
		if got < 0 {
			return "", fmt.Errorf("chat template %q is not supported by llama.cpp", C.GoString(tmpl))
		}
		if int(got) <= n {
			return string(buf[:got]), nil
		}
		n = int(got)
	}
	return "", errors.New("chat template: output keeps growing")
}
