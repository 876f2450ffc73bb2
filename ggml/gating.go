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

	"github.com/neuro-p2p/neuro/internal/meminfo"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Gating is the gating part of a model in ggml memory: embeddings,
// attention, norms, router and output head. Its compute reproduces
// llama.cpp's (flash attention off, F16 KV cache). Sessions share it; one
// graph runs at a time.
type Gating struct {
	mu   sync.Mutex
	c    *C.neuro_gating
	hp   moe.Hparams
	part moe.Part
	dev  Device
	// threads: each graph's (a lockstep's graph of several sessions takes
	// every thread of the process's pool)
	threads int
	// ls computes the sessions' one-row passes together (SetLockstep;
	// nil: each alone)
	ls *lockstep
}

// NewGating copies the gating shard's tensors into ggml memory, checking
// each against the shape the hyper-parameters imply.
func NewGating(hp moe.Hparams, shard *model.Shard, threads int) (*Gating, error) {
	return NewGatingOn(Device{}, hp, shard, threads)
}

// NewGatingOn is NewGating on device dev (the zero Device: the CPU): the
// weights and every session's KV cache live there and each layer's graph
// runs there, with the CPU only for ops the device lacks.
func NewGatingOn(dev Device, hp moe.Hparams, shard *model.Shard, threads int) (*Gating, error) {
	return NewGatingPart(dev, hp, shard, moe.WholePart(hp), threads)
}

// NewGatingPart is NewGatingOn for part of the model: the layers and head
// it names, read from t (a gating shard, or format 2's layer and head
// shards as model.Shards).
func NewGatingPart(dev Device, hp moe.Hparams, t moe.Tensors, part moe.Part, threads int) (*Gating, error) {
	if err := part.Check(hp); err != nil {
		return nil, err
	}
	if threads <= 0 || threads > poolThreads {
		threads = poolThreads
	}
	kv, q := hp.HeadDim*hp.KVHeads, hp.HeadDim*hp.Heads
	want := map[string][]uint64{}
	// A model whose output head is tied to the embeddings has no
	// output.weight: the gating compute uses token_embd for both.
	tied := !t.Has("output.weight")
	if part.Head {
		want["token_embd.weight"] = []uint64{uint64(hp.Embd), uint64(hp.Vocab)}
		want["output_norm.weight"] = []uint64{uint64(hp.Embd)}
		if !tied {
			want["output.weight"] = []uint64{uint64(hp.Embd), uint64(hp.Vocab)}
		}
	}
	for l := part.First; l < part.End; l++ {
		b := fmt.Sprintf("blk.%d.", l)
		e := uint64(hp.Embd)
		want[b+"attn_norm.weight"] = []uint64{e}
		if hp.MLA {
			mlaWeights(want, b, hp)
		} else {
			want[b+"attn_q.weight"] = []uint64{e, uint64(q)}
			want[b+"attn_k.weight"] = []uint64{e, uint64(kv)}
			want[b+"attn_v.weight"] = []uint64{e, uint64(kv)}
			want[b+"attn_output.weight"] = []uint64{uint64(q), e}
		}
		if hp.PostNorm {
			want[b+"post_attention_norm.weight"] = []uint64{e}
		} else {
			want[b+"ffn_norm.weight"] = []uint64{e}
		}
		if hp.QKVBias {
			want[b+"attn_q.bias"] = []uint64{uint64(q)}
			want[b+"attn_k.bias"] = []uint64{uint64(kv)}
			want[b+"attn_v.bias"] = []uint64{uint64(kv)}
		}
		if hp.AttnOutBias {
			want[b+"attn_output.bias"] = []uint64{e}
		}
		if hp.Sinks {
			want[b+"attn_sinks.weight"] = []uint64{uint64(hp.Heads)}
		}
		if hp.QKNorm {
			want[b+"attn_q_norm.weight"] = []uint64{uint64(hp.HeadDim)}
			want[b+"attn_k_norm.weight"] = []uint64{uint64(hp.HeadDim)}
		}
		if l < hp.DenseLead {
			d := uint64(hp.DenseFF)
			want[b+"ffn_gate.weight"] = []uint64{e, d}
			want[b+"ffn_up.weight"] = []uint64{e, d}
			want[b+"ffn_down.weight"] = []uint64{d, e}
			continue
		}
		want[b+"ffn_gate_inp.weight"] = []uint64{e, uint64(hp.Experts)}
		if hp.RouterBias {
			want[b+"ffn_gate_inp.bias"] = []uint64{uint64(hp.Experts)}
		}
		if hp.ProbsBias {
			want[b+"exp_probs_b.bias"] = []uint64{uint64(hp.Experts)}
		}
		if hp.SharedFF > 0 && !hp.SharedRemote {
			sf := uint64(hp.SharedFF)
			want[b+"ffn_gate_shexp.weight"] = []uint64{e, sf}
			want[b+"ffn_up_shexp.weight"] = []uint64{e, sf}
			want[b+"ffn_down_shexp.weight"] = []uint64{sf, e}
		}
	}
	// Zeroed: storing Go pointers into it goes through the write barrier,
	// which reads the old values.
	ws := (*[1 << 20]C.neuro_weight)(C.calloc(C.size_t(len(want)), C.size_t(unsafe.Sizeof(C.neuro_weight{}))))[:len(want):len(want)]
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
		b, ti, err := t.TensorBytes(name)
		if err != nil {
			return nil, fmt.Errorf("gating compute: %w", err)
		}
		// GGUF writers drop trailing dimensions of 1 ([256 1] is [256]).
		for len(shape) > 1 && shape[len(shape)-1] == 1 && len(ti.Shape) < len(shape) {
			shape = shape[:len(shape)-1]
		}
		if len(ti.Shape) != len(shape) {
			return nil, fmt.Errorf("gating compute: tensor %s has shape %v, want %v", name, ti.Shape, shape)
		}
		for d := range shape {
			if ti.Shape[d] != shape[d] {
				return nil, fmt.Errorf("gating compute: tensor %s has shape %v, want %v", name, ti.Shape, shape)
			}
		}
		if len(shape) == 1 && ti.Type != model.F32 {
			return nil, fmt.Errorf("gating compute: norm or bias %s is %s, want f32", name, ti.Type)
		}
		pinner.Pin(&b[0])
		cname := C.CString(name)
		defer C.free(unsafe.Pointer(cname))
		w := &ws[i]
		w.name, w._type, w.n_dims = cname, C.int(ti.Type), C.int(len(shape))
		for d := range 4 {
			w.ne[d] = 1
			if d < len(shape) {
				w.ne[d] = C.int64_t(shape[d])
			}
		}
		w.data, w.size = unsafe.Pointer(&b[0]), C.size_t(len(b))
	}
	sharedFF := hp.SharedFF
	if hp.SharedRemote {
		sharedFF = 0 // hosted: the gating compute has none
	}
	attnFactor, origCtx, headV := hp.RopeAttnFactor, hp.RopeOrigCtx, hp.HeadDimV
	if headV == 0 {
		headV = hp.HeadDim
	}
	if attnFactor == 0 {
		attnFactor = 1 // Hparams made by hand: llama.cpp's default
	}
	if origCtx == 0 {
		origCtx = hp.CtxLen
	}
	chp := C.neuro_hparams{
		n_layer: C.int(hp.Layers), n_embd: C.int(hp.Embd), n_head: C.int(hp.Heads), n_head_kv: C.int(hp.KVHeads),
		n_rot: C.int(hp.Rot), n_embd_head: C.int(hp.HeadDim), qk_norm: cbool(hp.QKNorm), rope_neox: cbool(hp.RopeNeox),
		tied_output: cbool(tied), n_expert: C.int(hp.Experts), n_expert_used: C.int(hp.ExpertsUsed),
		qkv_bias: cbool(hp.QKVBias), post_norm: cbool(hp.PostNorm), n_dense_lead: C.int(hp.DenseLead), n_ff_dense: C.int(hp.DenseFF),
		n_ff_shared: C.int(sharedFF), sigmoid: cbool(hp.Sigmoid), probs_bias: cbool(hp.ProbsBias), norm_w: cbool(hp.NormW),
		scale_w:       C.float(hp.ScaleW),
		attn_out_bias: cbool(hp.AttnOutBias), sinks: cbool(hp.Sinks), n_swa: C.int(hp.SlidingWindow), swa_pattern: C.int(hp.SWAPattern),
		router_bias: cbool(hp.RouterBias), softmax_weight: cbool(hp.SoftmaxWeight),
		rope_scaling: C.int(ropeScalingType[hp.RopeScaling]), rope_scale: C.float(hp.RopeScale), n_ctx_orig: C.int(origCtx),
		rope_attn_factor: C.float(attnFactor),
		mla:              cbool(hp.MLA), n_lora_q: C.int(hp.QLoraRank), n_lora_kv: C.int(hp.KVLoraRank), n_embd_head_v: C.int(headV),
		n_embd_head_k_mla: C.int(hp.KeyMLA), n_embd_head_v_mla: C.int(hp.ValueMLA), yarn_log_mul: C.float(hp.YarnLogMul),
		n_expert_groups: C.int(hp.ExpertGroups), n_group_used: C.int(hp.GroupsUsed), ffn_prec_f32: cbool(hp.FFNPrecF32),
		n_vocab: C.int(hp.Vocab), n_ctx_train: C.int(hp.CtxLen),
		rope_freq_base: C.float(hp.RopeFreqBase), rms_eps: C.float(hp.RMSEps),
	}
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	var errbuf [256]C.char
	c := C.neuro_gating_new(&chp, &ws[0], C.int(len(ws)), C.int(part.First), C.int(part.End), cbool(part.Head), dev.index(), C.int(threads),
		&errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("gating compute (%s) on %s: %s", part, dev.Spec(), C.GoString(&errbuf[0]))
	}
	return &Gating{c: c, hp: hp, part: part, dev: dev, threads: threads}, nil
}

// SessionBytes is the memory of the KV cache of a session of nCtx tokens
// (0: the default) that computes DefaultUBatch tokens at a time.
func (g *Gating) SessionBytes(nCtx int) int64 {
	if nCtx <= 0 {
		nCtx = min(g.hp.CtxLen, 4096)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		return 0
	}
	return int64(C.neuro_session_bytes(g.c, C.int(nCtx), C.int(min(DefaultUBatch, nCtx))))
}

// SessionMemory is the memory the sessions' KV caches may take: half of
// what is free where they live (the CPU's available memory, or the
// device's free memory when it was selected).
func (g *Gating) SessionMemory() int64 {
	if !g.onCPU() {
		return int64(g.dev.MemoryFree / 2)
	}
	// Linux's estimate of the memory available for new work (0 where it
	// cannot be read)
	avail, _ := meminfo.Bytes("MemAvailable")
	return int64(avail / 2)
}

// Hparams returns the model's hyper-parameters.
func (g *Gating) Hparams() moe.Hparams { return g.hp }

// onCPU says whether the gating computes on the CPU, whose products take
// one row's kernel for each row kept in a dimension of its own (a GPU's
// kernels differ by shape).
func (g *Gating) onCPU() bool { return g.dev.Backend == "" || g.dev.Backend == "CPU" }

// Part is the part of the model loaded.
func (g *Gating) Part() moe.Part { return g.part }

// Close frees the ggml memory. Close the sessions first.
//
// Every allocation and free of device memory happens under computeMu, like
// every compute: a GPU backend's device-wide state (Vulkan's queues and
// memory lists) is not safe against a free during another object's compute
// (a gating node on lavapipe aborted with "double free or corruption" when
// a session's KV cache was made while its validator computed an expert).
func (g *Gating) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	computeMu.Lock()
	defer computeMu.Unlock()
	C.neuro_gating_free(g.c)
	g.c = nil
	return nil
}

// Session is one sequence: its KV cache and position. Not safe for
// concurrent use.
type Session struct {
	g      *Gating
	c      *C.neuro_session
	nCtx   int
	ubatch int
	pos    int
	// headOnly: a session of the head alone (NewHeadSession), without a
	// KV cache, whatever layers its gating holds.
	headOnly bool
}

// DefaultUBatch is llama.cpp's default n_ubatch: a forward pass computes
// at most this many tokens at a time.
const DefaultUBatch = 512

// NewSession makes a session with a KV cache of nCtx tokens (default: the
// model's context, at most 4096) that computes DefaultUBatch tokens at a
// time.
func (g *Gating) NewSession(nCtx int) (*Session, error) {
	return g.NewSessionUBatch(nCtx, 0)
}

// NewSessionUBatch makes a session that computes at most ubatch tokens at
// a time (llama.cpp's n_ubatch; 0: DefaultUBatch). A longer Forward runs in
// pieces of ubatch tokens, as llama_decode splits a batch. Sliding-window
// layers keep llama.cpp's smaller cache of about window + ubatch cells.
func (g *Gating) NewSessionUBatch(nCtx, ubatch int) (*Session, error) {
	return g.newSession(nCtx, ubatch, true)
}

// NewHeadSession makes a session of the head alone (moe.HeadSessioner):
// embeddings and the output head, without a KV cache, for a head whose
// layers all run on span nodes. Its Layers refuses to compute.
func (g *Gating) NewHeadSession(nCtx int) (*Session, error) {
	if !g.part.Head {
		return nil, fmt.Errorf("gating session: the gating part is %s, without the head", g.part)
	}
	return g.newSession(nCtx, 0, false)
}

func (g *Gating) newSession(nCtx, ubatch int, layers bool) (*Session, error) {
	if nCtx <= 0 {
		nCtx = min(g.hp.CtxLen, 4096)
	}
	if ubatch <= 0 {
		ubatch = DefaultUBatch
	}
	ubatch = min(ubatch, nCtx)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		return nil, moe.ErrClosed
	}
	computeMu.Lock()
	defer computeMu.Unlock()
	var errbuf [256]C.char
	c := C.neuro_session_new(g.c, C.int(nCtx), C.int(ubatch), cbool(layers), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("gating session: %s", C.GoString(&errbuf[0]))
	}
	return &Session{g: g, c: c, nCtx: nCtx, ubatch: ubatch, headOnly: !layers}, nil
}

// Close frees the KV cache. It is safe to call more than once.
func (s *Session) Close() error {
	if ls := s.g.lockstepper(); ls != nil {
		ls.end(s)
	}
	if s.c != nil {
		computeMu.Lock()
		C.neuro_session_free(s.c)
		computeMu.Unlock()
		s.c = nil
	}
	return nil
}

// KVBytes is the memory of the session's KV cache tensors.
func (s *Session) KVBytes() int64 {
	if s.c == nil {
		return 0
	}
	return int64(C.neuro_session_kv_bytes(s.c))
}

// SWACells is the number of cells in the sliding-window layers' cache
// (0: the model has none).
func (s *Session) SWACells() int {
	if s.c == nil || s.g.hp.SlidingWindow == 0 {
		return 0
	}
	return int(C.neuro_session_swa_cells(s.c))
}

// Len is the number of tokens in the KV cache.
func (s *Session) Len() int { return s.pos }

// Forward runs tokens through the model after those already in the
// session, asking experts for each MoE layer's expert outputs, and returns
// the last token's logits.
func (s *Session) Forward(ctx context.Context, tokens []int32, experts moe.Experts) ([]float32, error) {
	if err := s.check(tokens); err != nil {
		return nil, err
	}
	start := s.pos
	logits, err := moe.InPieces(tokens, s.ubatch, func(piece []int32, want moe.Want) ([][]float32, error) {
		return s.forward(ctx, piece, experts, want)
	})
	if err != nil {
		return nil, s.undo(start, err)
	}
	return logits, nil
}

// ForwardEach runs tokens through the model after those already in the
// session as that many decode steps would — each token's logits are those
// a Forward of it alone, after the ones before it, returns, to the bit —
// but asks the experts once per layer for all of them: speculative
// decoding verifies a draft of several tokens in one round trip per
// layer. It takes at most the session's ubatch tokens.
func (s *Session) ForwardEach(ctx context.Context, tokens []int32, experts moe.Experts) ([][]float32, error) {
	if len(tokens) > s.ubatch {
		return nil, fmt.Errorf("forward each: %d tokens, at most %d", len(tokens), s.ubatch)
	}
	if err := s.check(tokens); err != nil {
		return nil, err
	}
	return s.forward(ctx, tokens, experts, moe.WantEach)
}

// check refuses no tokens, tokens past the context and tokens outside the
// vocabulary.
func (s *Session) check(tokens []int32) error {
	n := len(tokens)
	if n == 0 {
		return errors.New("forward: no tokens")
	}
	if s.pos+n > s.nCtx {
		return fmt.Errorf("forward %d tokens after %d: %w (%d tokens)", n, s.pos, moe.ErrContextFull, s.nCtx)
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= s.g.hp.Vocab {
			return fmt.Errorf("forward: token %d outside the vocabulary of %d", t, s.g.hp.Vocab)
		}
	}
	return nil
}

// undo puts the session back at position start after a Forward from
// there failed with err. Should the window before start be gone too (a
// failed pass of many pieces), it empties the session.
func (s *Session) undo(start int, err error) error {
	if s.pos == start {
		return err
	}
	if rerr := s.Rewind(start); rerr != nil {
		s.Rewind(0)
		return errors.Join(err, rerr)
	}
	return err
}

// forward runs one piece of at most ubatch tokens and returns the logits
// wanted: embeddings, the layers, the output head.
func (s *Session) forward(ctx context.Context, tokens []int32, experts moe.Experts, want moe.Want) ([][]float32, error) {
	x, err := s.Embed(tokens)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	x, rows, err := s.Layers(ctx, x, len(tokens), want, experts)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	if want == moe.WantAll {
		return nil, nil
	}
	logits, err := s.Output(x, rows)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	return logits, nil
}

// Embed returns the tokens' embeddings (moe.Steps; a part with the head).
func (s *Session) Embed(tokens []int32) ([]float32, error) {
	if !s.g.part.Head {
		return nil, fmt.Errorf("embed: the gating part is %s, without the head", s.g.part)
	}
	if len(tokens) == 0 {
		return nil, errors.New("embed: no tokens")
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= s.g.hp.Vocab {
			return nil, fmt.Errorf("embed: token %d outside the vocabulary of %d", t, s.g.hp.Vocab)
		}
	}
	x := make([]float32, len(tokens)*s.g.hp.Embd)
	if err := s.call(func() C.int {
		return C.neuro_embed(s.c, (*C.int32_t)(unsafe.Pointer(&tokens[0])), C.int(len(tokens)), (*C.float)(&x[0]))
	}); err != nil {
		return nil, fmt.Errorf("embed: %w", err)
	}
	return x, nil
}

// Layers runs n rows of x through the part's layers at positions Len()
// on (moe.Steps). A part without layers (a head alone) hands x back.
func (s *Session) Layers(ctx context.Context, x []float32, n int, want moe.Want, experts moe.Experts) ([]float32, int, error) {
	hp, part := s.g.hp, s.g.part
	if n < 1 || len(x) != n*hp.Embd {
		return nil, 0, fmt.Errorf("layers: %d floats for %d rows of %d", len(x), n, hp.Embd)
	}
	if s.headOnly && part.Layers() > 0 {
		return nil, 0, errors.New("layers: a session of the head alone computes no layers (it has no KV cache)")
	}
	if want == moe.WantEach && n > s.ubatch {
		return nil, 0, fmt.Errorf("layers: %d rows computed apart, at most %d", n, s.ubatch)
	}
	if s.pos+n > s.nCtx {
		return nil, 0, fmt.Errorf("layers: %d rows after %d: %w (%d tokens)", n, s.pos, moe.ErrContextFull, s.nCtx)
	}
	// A one-row pass computes each layer with the other sessions that
	// get there (lockstep); it stays in the lockstep for the head when
	// its logits follow.
	ls, done := s.g.lockstepper(), false
	if n != 1 {
		ls = nil
	}
	if ls != nil {
		ls.begin(s, part.First)
		defer func() {
			if !done || !part.Head || part.End != hp.Layers || want == moe.WantAll {
				ls.end(s)
			}
		}()
	}
	rows := n
	for l := part.First; l < part.End; l++ {
		last := want == moe.WantLast && l == hp.Layers-1
		out := rows
		if last {
			out = 1
		}
		ffnInp := make([]float32, out*hp.Embd)
		moeIn := make([]float32, out*hp.Embd)
		selected := make([]int32, out*hp.ExpertsUsed)
		weights := make([]float32, out*hp.ExpertsUsed)
		extra := make([]float32, out*hp.Embd) // a dense layer's FFN, or the shared experts' output
		lastOnly := C.int(0)
		if last {
			lastOnly = 1
		}
		// one graph for all rows, or one per token from token t on
		layer := func(t, n int) error {
			e, u := t*hp.Embd, t*hp.ExpertsUsed
			return s.call(func() C.int {
				return C.neuro_layer(s.c, C.int(l), (*C.float)(&x[e]), C.int(n), C.int(s.pos+t), lastOnly,
					(*C.float)(&ffnInp[e]), (*C.float)(&moeIn[e]), (*C.int32_t)(unsafe.Pointer(&selected[u])), (*C.float)(&weights[u]),
					(*C.float)(&extra[e]))
			})
		}
		if ls != nil {
			out := layerOut{ffnInp: ffnInp, moeIn: moeIn, extra: extra, selected: selected, weights: weights}
			if err := ls.layer(ctx, s, l, last, x, out); err != nil {
				return nil, 0, fmt.Errorf("layer %d: %w", l, err)
			}
		} else if want == moe.WantEach {
			for t := range rows {
				if err := layer(t, 1); err != nil {
					return nil, 0, fmt.Errorf("layer %d, token %d: %w", l, t, err)
				}
			}
		} else if err := layer(0, rows); err != nil {
			return nil, 0, fmt.Errorf("layer %d: %w", l, err)
		}
		if l < hp.DenseLead {
			// A dense leading layer (llama.cpp: ggml_add(ffn_out, ffn_inp)).
			for i := range extra {
				extra[i] = float32(extra[i] + ffnInp[i])
			}
			x, rows = extra, out
			continue
		}
		for _, e := range selected {
			if e < 0 || int(e) >= hp.Experts {
				return nil, 0, fmt.Errorf("layer %d: router chose expert %d of %d", l, e, hp.Experts)
			}
		}
		if hp.SharedFF > 0 && hp.SharedRemote {
			// The hosted shared expert rides as one more expert of each
			// token, weight 1: Combine then adds it after the routed sum,
			// as llama.cpp's ggml_add(moe_out, ffn_shexp) does.
			selected, weights = withShared(selected, weights, out, hp.ExpertsUsed, int32(hp.Experts))
		}
		call := experts.MoE
		if ae, ok := experts.(moe.ApartExperts); ok && want == moe.WantEach {
			call = ae.MoEApart // each row as a decode step computes it
		}
		moe, err := call(ctx, l, moeIn, out, selected, weights)
		if err != nil {
			return nil, 0, fmt.Errorf("layer %d experts: %w", l, err)
		}
		if len(moe) != out*hp.Embd {
			return nil, 0, fmt.Errorf("layer %d experts returned %d floats, want %d", l, len(moe), out*hp.Embd)
		}
		if hp.SharedFF > 0 && !hp.SharedRemote {
			// Shared experts (llama.cpp glm4moe: ggml_add(routed, shared)).
			for i := range moe {
				moe[i] = float32(moe[i] + extra[i])
			}
		}
		// The residual add (llama.cpp: ggml_add(moe_out, ffn_inp)).
		for i := range moe {
			moe[i] = float32(moe[i] + ffnInp[i])
		}
		x, rows = moe, out
	}
	s.pos += n
	done = true
	return x, rows, nil
}

// Output applies the final norm and the output head to rows rows of x
// (moe.Steps; a part with the head).
func (s *Session) Output(x []float32, rows int) ([][]float32, error) {
	hp := s.g.hp
	if !s.g.part.Head {
		return nil, fmt.Errorf("output: the gating part is %s, without the head", s.g.part)
	}
	if rows < 1 || len(x) != rows*hp.Embd {
		return nil, fmt.Errorf("output: %d floats for %d rows of %d", len(x), rows, hp.Embd)
	}
	logits := make([][]float32, rows)
	if ls := s.g.lockstepper(); ls != nil {
		if rows == 1 {
			logits[0] = make([]float32, hp.Vocab)
			if err := ls.head(context.Background(), s, x, logits[0]); err != nil {
				return nil, fmt.Errorf("output: %w", err)
			}
			return logits, nil
		}
		ls.end(s)
	}
	if rows > 1 && s.g.onCPU() {
		// Each row as it would be alone, in one graph: the head read once.
		all := make([]float32, rows*hp.Vocab)
		if err := s.call(func() C.int {
			return C.neuro_output(s.c, (*C.float)(&x[0]), C.int(rows), 1, (*C.float)(&all[0]))
		}); err != nil {
			return nil, fmt.Errorf("output: %w", err)
		}
		for t := range rows {
			logits[t] = all[t*hp.Vocab : (t+1)*hp.Vocab : (t+1)*hp.Vocab]
		}
		return logits, nil
	}
	for t := range rows {
		logits[t] = make([]float32, hp.Vocab)
		if err := s.call(func() C.int {
			return C.neuro_output(s.c, (*C.float)(&x[t*hp.Embd]), 1, 0, (*C.float)(&logits[t][0]))
		}); err != nil {
			return nil, fmt.Errorf("output: %w", err)
		}
	}
	return logits, nil
}

// withShared appends expert shared with weight 1 to each of n tokens'
// used experts.
func withShared(selected []int32, weights []float32, n, used int, shared int32) ([]int32, []float32) {
	sel := make([]int32, 0, n*(used+1))
	w := make([]float32, 0, n*(used+1))
	for t := range n {
		sel = append(append(sel, selected[t*used:(t+1)*used]...), shared)
		w = append(append(w, weights[t*used:(t+1)*used]...), 1)
	}
	return sel, w
}

// call runs one graph under the gating lock.
func (s *Session) call(f func() C.int) error {
	s.g.mu.Lock()
	defer s.g.mu.Unlock()
	computeMu.Lock()
	defer computeMu.Unlock()
	if s.g.c == nil || s.c == nil {
		return moe.ErrClosed
	}
	if rc := f(); rc != 0 {
		return fmt.Errorf("ggml compute failed (code %d)", int(rc))
	}
	return nil
}

// Rewind drops the tokens after the first pos from the session: the next
// Forward continues at position pos (the KV cache entries past it are
// overwritten). In a model with sliding-window layers it fails with
// moe.ErrWindowLost, changing nothing, when their ring of cells no longer
// holds the window before pos: a rewind of up to the ring's size less the
// window (ubatch tokens or more) always succeeds.
func (s *Session) Rewind(pos int) error {
	if pos < 0 || pos > s.pos {
		return fmt.Errorf("rewind to %d: the session holds %d tokens", pos, s.pos)
	}
	s.g.mu.Lock()
	defer s.g.mu.Unlock()
	if s.c == nil {
		return moe.ErrClosed
	}
	if C.neuro_rewind(s.c, C.int(pos)) != 0 {
		return fmt.Errorf("rewind from %d to %d tokens: %w", s.pos, pos, moe.ErrWindowLost)
	}
	s.pos = pos
	return nil
}

// mlaWeights adds the shapes of a latent-attention layer's weights
// (deepseek2, llama.cpp's create_tensor calls).
func mlaWeights(want map[string][]uint64, b string, hp moe.Hparams) {
	e, h := uint64(hp.Embd), uint64(hp.Heads)
	kl, r, k, v := uint64(hp.KVLoraRank), uint64(hp.Rot), uint64(hp.KeyMLA), uint64(hp.ValueMLA)
	if hp.QLoraRank > 0 {
		ql := uint64(hp.QLoraRank)
		want[b+"attn_q_a.weight"] = []uint64{e, ql}
		want[b+"attn_q_a_norm.weight"] = []uint64{ql}
		want[b+"attn_q_b.weight"] = []uint64{ql, h * k}
	} else {
		want[b+"attn_q.weight"] = []uint64{e, h * k}
	}
	want[b+"attn_kv_a_mqa.weight"] = []uint64{e, kl + r}
	want[b+"attn_kv_a_norm.weight"] = []uint64{kl}
	want[b+"attn_k_b.weight"] = []uint64{k - r, kl, h}
	want[b+"attn_v_b.weight"] = []uint64{kl, v, h}
	want[b+"attn_output.weight"] = []uint64{h * v, e}
}

// ropeScalingType is llama_rope_scaling_type by name: llama.cpp reads an
// absent rope.scaling.type as linear (with a factor of 1 unless given).
var ropeScalingType = map[string]int{"none": 0, "": 1, "linear": 1, "yarn": 2}

func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}
