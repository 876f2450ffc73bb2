package ggml

/*
#include <stdlib.h>
#include "neuro.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
	neuropb "github.com/neuro-p2p/neuro/proto"
)

// Experts computes the MoE block of one layer for a batch of tokens. x
// holds n rows of Embd floats (the layer's normalised hidden states);
// selected and weights hold n rows of ExpertsUsed entries: the experts
// llama.cpp's router chose for each token, best first, and their
// normalised weights. It returns n rows of Embd floats: for each token the
// weighted sum of its experts' outputs (see Combine for the exact order of
// operations that reproduces llama.cpp).
type Experts interface {
	MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error)
}

// Combine returns, for each of n tokens, Σ_j outs[t][j] * weights[t][j]
// with the slots added in order, rounding each product and each sum to
// float32 exactly as llama.cpp's build_moe_ffn does (ggml_mul, then
// ggml_add of the slots in order). outs holds n x used rows of embd floats
// (token-major).
func Combine(outs []float32, weights []float32, n, used, embd int) []float32 {
	res := make([]float32, n*embd)
	for t := range n {
		dst := res[t*embd : (t+1)*embd]
		for j := range used {
			w := weights[t*used+j]
			src := outs[(t*used+j)*embd : (t*used+j+1)*embd]
			if j == 0 {
				for i, v := range src {
					dst[i] = float32(v * w)
				}
				continue
			}
			for i, v := range src {
				// The conversions round each step and forbid a fused
				// multiply-add, which would round once.
				p := float32(v * w)
				dst[i] = float32(dst[i] + p)
			}
		}
	}
	return res
}

// Hparams are what the gating compute needs to know of a model.
type Hparams struct {
	Layers, Embd, Heads, KVHeads, Rot   int
	Experts, ExpertsUsed, Vocab, CtxLen int
	RopeFreqBase, RMSEps                float32
}

// HparamsOf reads the hyper-parameters from a manifest and its gating
// shard.
func HparamsOf(m *neuropb.Manifest, gating *model.Shard) (Hparams, error) {
	if m.GetArchitecture() != "llama" {
		return Hparams{}, fmt.Errorf("gating compute: architecture %q is not supported yet (llama only)", m.GetArchitecture())
	}
	p := m.GetParams()
	h := Hparams{
		Layers: int(p.GetLayers()), Embd: int(p.GetEmbd()), Heads: int(p.GetHeads()), KVHeads: int(p.GetKvHeads()),
		Experts: int(p.GetExperts()), ExpertsUsed: int(p.GetExpertsUsed()), Vocab: int(p.GetVocab()),
		CtxLen: int(p.GetContext()), RopeFreqBase: p.GetRopeFreqBase(), RMSEps: p.GetRmsEps(),
	}
	if h.Heads == 0 || h.Embd%h.Heads != 0 || h.KVHeads == 0 || h.Heads%h.KVHeads != 0 {
		return Hparams{}, fmt.Errorf("gating compute: %d heads, %d kv heads for embd %d", h.Heads, h.KVHeads, h.Embd)
	}
	h.Rot = h.Embd / h.Heads
	if v, ok := gating.File.Get("llama.rope.dimension_count").(uint32); ok {
		h.Rot = int(v)
	}
	if h.Rot != h.Embd/h.Heads {
		return Hparams{}, fmt.Errorf("gating compute: rope dimension %d differs from the head size %d (not supported)", h.Rot, h.Embd/h.Heads)
	}
	if h.RopeFreqBase == 0 {
		h.RopeFreqBase = 10000 // llama.cpp's default when the key is absent
	}
	if h.RMSEps == 0 {
		return Hparams{}, errors.New("gating compute: llama.attention.layer_norm_rms_epsilon is missing")
	}
	if h.ExpertsUsed < 1 || h.ExpertsUsed > h.Experts || h.Vocab < 1 || h.CtxLen < 1 {
		return Hparams{}, fmt.Errorf("gating compute: bad params %+v", h)
	}
	return h, nil
}

// Gating is the gating part of a model in ggml memory: embeddings,
// attention, norms, router and output head. Its compute reproduces
// llama.cpp's (flash attention off, F16 KV cache). Sessions share it; one
// graph runs at a time.
type Gating struct {
	mu sync.Mutex
	c  *C.neuro_gating
	hp Hparams
}

// NewGating copies the gating shard's tensors into ggml memory, checking
// each against the shape the hyper-parameters imply.
func NewGating(hp Hparams, shard *model.Shard, threads int) (*Gating, error) {
	if threads <= 0 || threads > poolThreads {
		threads = poolThreads
	}
	kv := hp.Embd / hp.Heads * hp.KVHeads
	want := map[string][]uint64{
		"token_embd.weight":  {uint64(hp.Embd), uint64(hp.Vocab)},
		"output_norm.weight": {uint64(hp.Embd)},
		"output.weight":      {uint64(hp.Embd), uint64(hp.Vocab)},
	}
	for l := range hp.Layers {
		b := fmt.Sprintf("blk.%d.", l)
		e := uint64(hp.Embd)
		want[b+"attn_norm.weight"] = []uint64{e}
		want[b+"attn_q.weight"] = []uint64{e, e}
		want[b+"attn_k.weight"] = []uint64{e, uint64(kv)}
		want[b+"attn_v.weight"] = []uint64{e, uint64(kv)}
		want[b+"attn_output.weight"] = []uint64{e, e}
		want[b+"ffn_norm.weight"] = []uint64{e}
		want[b+"ffn_gate_inp.weight"] = []uint64{e, uint64(hp.Experts)}
	}
	ws := (*[1 << 20]C.neuro_weight)(C.malloc(C.size_t(len(want)) * C.size_t(unsafe.Sizeof(C.neuro_weight{}))))[:len(want):len(want)]
	defer C.free(unsafe.Pointer(&ws[0]))
	var pinner runtime.Pinner
	defer pinner.Unpin()
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	sort.Strings(names) // a stable order, so that errors are the same on every run
	for i, name := range names {
		shape := want[name]
		b, t, err := shard.TensorBytes(name)
		if err != nil {
			return nil, fmt.Errorf("gating compute: %w", err)
		}
		if len(t.Shape) != len(shape) {
			return nil, fmt.Errorf("gating compute: tensor %s has shape %v, want %v", name, t.Shape, shape)
		}
		for d := range shape {
			if t.Shape[d] != shape[d] {
				return nil, fmt.Errorf("gating compute: tensor %s has shape %v, want %v", name, t.Shape, shape)
			}
		}
		if len(shape) == 1 && t.Type != model.F32 {
			return nil, fmt.Errorf("gating compute: norm %s is %s, want f32", name, t.Type)
		}
		pinner.Pin(&b[0])
		cname := C.CString(name)
		defer C.free(unsafe.Pointer(cname))
		w := &ws[i]
		w.name, w._type, w.n_dims = cname, C.int(t.Type), C.int(len(shape))
		for d := range 4 {
			w.ne[d] = 1
			if d < len(shape) {
				w.ne[d] = C.int64_t(shape[d])
			}
		}
		w.data, w.size = unsafe.Pointer(&b[0]), C.size_t(len(b))
	}
	chp := C.neuro_hparams{
		n_layer: C.int(hp.Layers), n_embd: C.int(hp.Embd), n_head: C.int(hp.Heads), n_head_kv: C.int(hp.KVHeads),
		n_rot: C.int(hp.Rot), n_expert: C.int(hp.Experts), n_expert_used: C.int(hp.ExpertsUsed),
		n_vocab: C.int(hp.Vocab), n_ctx_train: C.int(hp.CtxLen),
		rope_freq_base: C.float(hp.RopeFreqBase), rms_eps: C.float(hp.RMSEps),
	}
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	C.neuro_pool(C.int(poolThreads))
	var errbuf [256]C.char
	c := C.neuro_gating_new(&chp, &ws[0], C.int(len(ws)), C.int(threads), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("gating compute: %s", C.GoString(&errbuf[0]))
	}
	return &Gating{c: c, hp: hp}, nil
}

// Hparams returns the model's hyper-parameters.
func (g *Gating) Hparams() Hparams { return g.hp }

// Close frees the ggml memory. Close the sessions first.
func (g *Gating) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	C.neuro_gating_free(g.c)
	g.c = nil
	return nil
}

// Session is one sequence: its KV cache and position. Not safe for
// concurrent use.
type Session struct {
	g    *Gating
	c    *C.neuro_session
	nCtx int
	pos  int
}

// NewSession makes a session with a KV cache of nCtx tokens (default: the
// model's context, at most 4096).
func (g *Gating) NewSession(nCtx int) (*Session, error) {
	if nCtx <= 0 {
		nCtx = min(g.hp.CtxLen, 4096)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		return nil, ErrClosed
	}
	var errbuf [256]C.char
	c := C.neuro_session_new(g.c, C.int(nCtx), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("gating session: %s", C.GoString(&errbuf[0]))
	}
	return &Session{g: g, c: c, nCtx: nCtx}, nil
}

// Close frees the KV cache. It is safe to call more than once.
func (s *Session) Close() error {
	if s.c != nil {
		C.neuro_session_free(s.c)
		s.c = nil
	}
	return nil
}

// Len is the number of tokens in the KV cache.
func (s *Session) Len() int { return s.pos }

// Forward runs tokens through the model after those already in the
// session, asking experts for each MoE layer's expert outputs, and returns
// the last token's logits.
func (s *Session) Forward(ctx context.Context, tokens []int32, experts Experts) ([]float32, error) {
	hp := s.g.hp
	n := len(tokens)
	if n == 0 {
		return nil, errors.New("forward: no tokens")
	}
	if s.pos+n > s.nCtx {
		return nil, fmt.Errorf("forward %d tokens after %d: %w (%d tokens)", n, s.pos, ErrContextFull, s.nCtx)
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= hp.Vocab {
			return nil, fmt.Errorf("forward: token %d outside the vocabulary of %d", t, hp.Vocab)
		}
	}
	x := make([]float32, n*hp.Embd)
	if err := s.call(func() C.int {
		return C.neuro_embed(s.c, (*C.int32_t)(unsafe.Pointer(&tokens[0])), C.int(n), (*C.float)(&x[0]))
	}); err != nil {
		return nil, fmt.Errorf("forward: embed: %w", err)
	}
	rows := n
	for l := range hp.Layers {
		last := l == hp.Layers-1
		out := rows
		if last {
			out = 1
		}
		ffnInp := make([]float32, out*hp.Embd)
		moeIn := make([]float32, out*hp.Embd)
		selected := make([]int32, out*hp.ExpertsUsed)
		weights := make([]float32, out*hp.ExpertsUsed)
		lastOnly := C.int(0)
		if last {
			lastOnly = 1
		}
		if err := s.call(func() C.int {
			return C.neuro_layer(s.c, C.int(l), (*C.float)(&x[0]), C.int(rows), C.int(s.pos), lastOnly,
				(*C.float)(&ffnInp[0]), (*C.float)(&moeIn[0]), (*C.int32_t)(unsafe.Pointer(&selected[0])), (*C.float)(&weights[0]))
		}); err != nil {
			return nil, fmt.Errorf("forward: layer %d: %w", l, err)
		}
		for _, e := range selected {
			if e < 0 || int(e) >= hp.Experts {
				return nil, fmt.Errorf("forward: layer %d: router chose expert %d of %d", l, e, hp.Experts)
			}
		}
		moe, err := experts.MoE(ctx, l, moeIn, out, selected, weights)
		if err != nil {
			return nil, fmt.Errorf("forward: layer %d experts: %w", l, err)
		}
		if len(moe) != out*hp.Embd {
			return nil, fmt.Errorf("forward: layer %d experts returned %d floats, want %d", l, len(moe), out*hp.Embd)
		}
		// The residual add (llama.cpp: ggml_add(moe_out, ffn_inp)).
		for i := range moe {
			moe[i] = float32(moe[i] + ffnInp[i])
		}
		x, rows = moe, out
	}
	logits := make([]float32, hp.Vocab)
	if err := s.call(func() C.int {
		return C.neuro_output(s.c, (*C.float)(&x[0]), 1, (*C.float)(&logits[0]))
	}); err != nil {
		return nil, fmt.Errorf("forward: output: %w", err)
	}
	s.pos += n
	return logits, nil
}

// call runs one graph under the gating lock.
func (s *Session) call(f func() C.int) error {
	s.g.mu.Lock()
	defer s.g.mu.Unlock()
	computeMu.Lock()
	defer computeMu.Unlock()
	if s.g.c == nil || s.c == nil {
		return ErrClosed
	}
	if rc := f(); rc != 0 {
		return fmt.Errorf("ggml compute failed (code %d)", int(rc))
	}
	return nil
}

// LocalExperts computes experts in this process (the single-machine split
// path, and the oracle for networked experts).
type LocalExperts struct {
	Embd, Used int
	// Experts maps (layer, expert) to its compute.
	Experts map[[2]int]*Expert
}

// Routing is one layer's tokens grouped by the expert they go to.
type Routing struct {
	// Experts in order of first use.
	Experts []int32
	// Slots of each expert: indexes t*used+j of selected.
	Slots map[int32][]int
}

// Route groups the slots of selected (n tokens x used experts) by expert.
func Route(selected []int32) Routing {
	r := Routing{Slots: map[int32][]int{}}
	for slot, e := range selected {
		if _, ok := r.Slots[e]; !ok {
			r.Experts = append(r.Experts, e)
		}
		r.Slots[e] = append(r.Slots[e], slot)
	}
	return r
}

// Gather returns the hidden states (rows of embd floats of x) of the
// tokens in slots, one row per slot, for a request to one expert.
func Gather(x []float32, slots []int, used, embd int) []float32 {
	in := make([]float32, len(slots)*embd)
	for i, slot := range slots {
		t := slot / used
		copy(in[i*embd:], x[t*embd:(t+1)*embd])
	}
	return in
}

// Scatter puts one expert's outputs (a row per slot) into outs, the
// token-major n x used x embd array Combine reads.
func Scatter(outs, out []float32, slots []int, embd int) {
	for i, slot := range slots {
		copy(outs[slot*embd:(slot+1)*embd], out[i*embd:(i+1)*embd])
	}
}

// MoE implements Experts: each expert gets the batch of tokens routed to
// it in one call, and Combine weighs and sums the results.
func (le *LocalExperts) MoE(_ context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	outs := make([]float32, n*le.Used*le.Embd)
	r := Route(selected)
	for _, e := range r.Experts {
		ex := le.Experts[[2]int{layer, int(e)}]
		if ex == nil {
			return nil, fmt.Errorf("no expert %d:%d", layer, e)
		}
		slots := r.Slots[e]
		in := Gather(x, slots, le.Used, le.Embd)
		out := make([]float32, len(in))
		for start := 0; start < len(slots); start += ex.MaxBatch() {
			end := min(start+ex.MaxBatch(), len(slots))
			if err := ex.Compute(in[start*le.Embd:end*le.Embd], end-start, out[start*le.Embd:end*le.Embd]); err != nil {
				return nil, fmt.Errorf("expert %d:%d: %w", layer, e, err)
			}
		}
		Scatter(outs, out, slots, le.Embd)
	}
	return Combine(outs, weights, n, le.Used, le.Embd), nil
}

// Close closes every expert.
func (le *LocalExperts) Close() error {
	for _, e := range le.Experts {
		e.Close()
	}
	return nil
}

// Rewind drops the tokens after the first pos from the session: the next
// Forward continues at position pos (the KV cache entries past it are
// overwritten).
func (s *Session) Rewind(pos int) error {
	if pos < 0 || pos > s.pos {
		return fmt.Errorf("rewind to %d: the session holds %d tokens", pos, s.pos)
	}
	s.pos = pos
	return nil
}
