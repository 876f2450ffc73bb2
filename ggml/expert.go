package ggml

/*
#include <stdlib.h>
#include "neuro.h"
*/
import "C"

import (
	"cmp"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// ExpertDTypes are the weight types Expert computes with: every type neuro
// reads but Q8_K (an activation type), i-quants, ternary and MXFP4
// included.
var ExpertDTypes = slices.DeleteFunc(model.DTypes(), func(t model.DType) bool { return t == model.Q8_K })

// Expert computes one MoE expert's feed-forward block,
// down(silu(gate·x) ⊙ (up·x)) (or gpt-oss's swiglu_oai with biases: see
// moe.ExpertWeights), with ggml on the weights' own dtype. It is
// safe for concurrent use; calls run one at a time.
type Expert struct {
	mu       sync.Mutex
	c        *C.neuro_expert
	embd, ff int
	maxBatch int
	threads  int // its compute threads (ExpertOptions.Threads)
	lanes    int // ExpertOptions.Lanes, at least 1
	pollUS   int // ExpertOptions.LanePoll in microseconds
	dtype    model.DType
	vary     bool
}

// NewExpert copies the weights into ggml memory. Each tensor may have its
// own dtype of ExpertDTypes, as quantized files mix them (Q4_K_M keeps
// gate and up in Q4_K and down in Q6_K in about half the layers).
func NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (*Expert, error) {
	return NewExpertOn(Device{}, w, o)
}

// NewExpertOn is NewExpert on device dev (the zero Device: the CPU): the
// weights are uploaded once and every batch runs there.
func NewExpertOn(dev Device, w moe.ExpertWeights, o moe.ExpertOptions) (*Expert, error) {
	if err := w.Check(); err != nil {
		return nil, err
	}
	for _, t := range []struct {
		name string
		t    model.DType
	}{{"gate", w.Gate.Type}, {"up", w.Up.Type}, {"down", w.Down.Type}} {
		if !slices.Contains(ExpertDTypes, t.t) {
			return nil, fmt.Errorf("expert: %s: %w %s", t.name, model.ErrUnsupportedDType, t.t)
		}
	}
	embd, ff := w.Embd, w.FF
	if o.Threads <= 0 || o.Threads > poolThreads {
		o.Threads = poolThreads
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 512
	}
	// More lanes than the cores the process may run on would take turns.
	o.Lanes = min(max(o.Lanes, 1), poolThreads, maxLanes)
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	act := C.int(C.NEURO_ACT_SWIGLU)
	if w.Activation() == model.ActSwiGLUOAI {
		act = C.NEURO_ACT_SWIGLU_OAI
	}
	flags := C.int(0)
	if w.Dense {
		flags |= C.NEURO_EXPERT_DENSE
	}
	if w.DownPrecF32 {
		flags |= C.NEURO_EXPERT_DOWN_PREC_F32
	}
	bias := func(b []float32) *C.float {
		if b == nil {
			return nil
		}
		return (*C.float)(&b[0])
	}
	var errbuf [256]C.char
	c := C.neuro_expert_new(C.int(embd), C.int(ff), C.int(w.Gate.Type), C.int(w.Up.Type), C.int(w.Down.Type),
		unsafe.Pointer(&w.Gate.Data[0]), unsafe.Pointer(&w.Up.Data[0]), unsafe.Pointer(&w.Down.Data[0]),
		bias(w.GateBias), bias(w.UpBias), bias(w.DownBias), act, flags,
		dev.index(), C.int(o.Threads), C.int(o.MaxBatch), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("expert on %s: %s", dev.Spec(), C.GoString(&errbuf[0]))
	}
	// ggml's expert-indexed product computes each row alike on the CPU;
	// its plain product (a dense expert) takes tinyBLAS for two rows or
	// more, and a GPU's kernels differ by batch size.
	vary := w.Dense || dev.Backend != "" && dev.Backend != "CPU"
	if dev.Backend != "" && dev.Backend != "CPU" {
		o.Lanes = 1 // a device's experts are not grouped (vary)
	}
	return &Expert{c: c, embd: embd, ff: ff, maxBatch: o.MaxBatch, threads: o.Threads, lanes: o.Lanes, pollUS: pollUS(o.LanePoll),
		dtype: w.Gate.Type, vary: vary}, nil
}

// RowsVary reports whether a row's result depends on the batch it is
// computed in (moe.RowVariant).
func (e *Expert) RowsVary() bool { return e.vary }

// Embd is the hidden size.
func (e *Expert) Embd() int { return e.embd }

// FF is the feed-forward size.
func (e *Expert) FF() int { return e.ff }

// DType is the gate's type (up and down may have others).
func (e *Expert) DType() model.DType { return e.dtype }

// MaxBatch is the largest batch Compute accepts.
func (e *Expert) MaxBatch() int { return e.maxBatch }

// Compute runs n token vectors (x holds n rows of Embd floats) through the
// expert and writes n rows of Embd floats to out.
func (e *Expert) Compute(x []float32, n int, out []float32) error {
	if err := moe.CheckBatch(x, n, out, e.embd, e.maxBatch); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.c == nil {
		return moe.ErrClosed
	}
	computeMu.Lock()
	defer computeMu.Unlock()
	if rc := C.neuro_expert_compute(e.c, (*C.float)(&x[0]), C.int(n), (*C.float)(&out[0])); rc != 0 {
		return fmt.Errorf("expert: ggml compute failed (code %d)", int(rc))
	}
	return nil
}

// group is the process's neuro_group (ComputeGroup), made on first use
// under computeMu.
var group *C.neuro_group

// maxLanes bounds ExpertOptions.Lanes.
const maxLanes = 64

// pollUS is a lane poll in whole microseconds, within [0,
// moe.MaxLanePoll].
func pollUS(d time.Duration) int {
	return int(min(max(d, 0), moe.MaxLanePoll) / time.Microsecond)
}

// laneKey names a set of lanes: how many, the threads of each, and how
// long a finished lane polls (microseconds).
type laneKey struct{ lanes, threads, pollUS int }

// laneSets are the process's lanes (neuro_lanes), made on first use under
// computeMu and kept: a set's lanes other than the first are threads that
// wait for their next share.
var laneSets = map[laneKey]*C.neuro_lanes{}

// lanesOf returns the set of lanes lanes of threads threads that poll
// pollUS microseconds, made on first use; computeMu held.
func lanesOf(lanes, threads, pollUS int) (*C.neuro_lanes, error) {
	k := laneKey{lanes, threads, pollUS}
	if l := laneSets[k]; l != nil {
		return l, nil
	}
	var errbuf [256]C.char
	l := C.neuro_lanes_new(C.int(lanes), C.int(threads), C.int(pollUS), &errbuf[0], C.size_t(len(errbuf)))
	if l == nil {
		return nil, fmt.Errorf("expert group: %d lanes: %s", lanes, C.GoString(&errbuf[0]))
	}
	laneSets[k] = l
	return l, nil
}

// groupLanes is the lanes of the last group's compute (1: one graph on
// the shared pool), under computeMu.
var groupLanes int

// lastLanes is the lanes of the last group's compute.
func lastLanes() int {
	computeMu.Lock()
	defer computeMu.Unlock()
	return groupLanes
}

// lastGroupThreads is the threads of the last group's compute, and of the
// threadpool it computed on.
func lastGroupThreads() (threads, pool int) {
	computeMu.Lock()
	defer computeMu.Unlock()
	return int(C.neuro_group_last_threads(group)), int(C.neuro_group_pool_threads(group))
}

// ComputeGroup implements moe.Grouper: es[i] on ns[i] rows of xs[i] into
// outs[i], in one ggml graph, each expert's rows as Compute gives them (the
// same ops on the same data) with one threadpool dispatch for them all. It
// takes distinct Experts on the CPU whose rows do not depend on their batch
// (RowsVary false); others are moe.ErrNotGroupable. It computes with the
// most threads any of them was given (ExpertOptions.Threads).
func (e *Expert) ComputeGroup(ms []moe.Computer, xs [][]float32, ns []int, outs [][]float32) error {
	n := len(ms)
	if n == 0 || len(xs) != n || len(ns) != n || len(outs) != n {
		return fmt.Errorf("expert group: %d experts, %d inputs, %d sizes, %d outputs", n, len(xs), len(ns), len(outs))
	}
	es := make([]*Expert, n)
	threads, lanes, poll := 1, 1, 0 // the most any member was given
	for i, m := range ms {
		x, ok := m.(*Expert)
		if !ok || x == nil || x.vary || slices.Contains(es[:i], x) {
			return fmt.Errorf("expert group: expert %d: %w", i, moe.ErrNotGroupable)
		}
		if err := moe.CheckBatch(xs[i], ns[i], outs[i], x.embd, x.maxBatch); err != nil {
			return fmt.Errorf("expert group: expert %d: %w", i, err)
		}
		es[i], threads, lanes, poll = x, max(threads, x.threads), max(lanes, x.lanes), max(poll, x.pollUS)
	}
	// Each expert's lock in one order (their addresses), then computeMu.
	order := slices.Clone(es)
	slices.SortFunc(order, func(a, b *Expert) int {
		return cmp.Compare(uintptr(unsafe.Pointer(a)), uintptr(unsafe.Pointer(b)))
	})
	for _, e := range order {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.c == nil {
			return moe.ErrClosed
		}
	}
	computeMu.Lock()
	defer computeMu.Unlock()
	var pinner runtime.Pinner
	defer pinner.Unpin()
	for i := range es {
		pinner.Pin(&xs[i][0])
		pinner.Pin(&outs[i][0])
	}
	groupLanes = min(lanes, n)
	if groupLanes > 1 {
		return computeLanes(es, xs, ns, outs, groupLanes, threads, poll)
	}
	if group == nil {
		var errbuf [256]C.char
		if group = C.neuro_group_new(C.int(poolThreads), &errbuf[0], C.size_t(len(errbuf))); group == nil {
			return fmt.Errorf("expert group: %s", C.GoString(&errbuf[0]))
		}
	}
	return groupOn(group, es, xs, ns, outs, threads)
}

// computeLanes computes es's members in lanes lanes at the same time, each
// lane on threads threads of its own; computeMu held, the rows pinned.
// The members are dealt to the lanes by rows, the most first, each to the
// lane with the fewest so far.
func computeLanes(es []*Expert, xs [][]float32, ns []int, outs [][]float32, lanes, threads, pollUS int) error {
	l, err := lanesOf(lanes, threads, pollUS)
	if err != nil {
		return err
	}
	order := make([]int, len(es))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(ns[b], ns[a]) })
	members, rows := make([][]int, lanes), make([]int, lanes)
	for _, i := range order {
		to := slices.Index(rows, slices.Min(rows))
		members[to] = append(members[to], i)
		rows[to] += ns[i]
	}
	// C arrays of the members, lane by lane, and where each lane starts.
	n := len(es)
	cs, cx, cout, cn, start := cArray[*C.neuro_expert](n), cArray[*C.float](n), cArray[*C.float](n), cArray[C.int](n), cArray[C.int](lanes+1)
	defer C.free(unsafe.Pointer(&cs[0]))
	defer C.free(unsafe.Pointer(&cx[0]))
	defer C.free(unsafe.Pointer(&cout[0]))
	defer C.free(unsafe.Pointer(&cn[0]))
	defer C.free(unsafe.Pointer(&start[0]))
	at := 0
	for k, m := range members {
		start[k] = C.int(at)
		for _, i := range m {
			cs[at], cx[at], cout[at], cn[at] = es[i].c, (*C.float)(&xs[i][0]), (*C.float)(&outs[i][0]), C.int(ns[i])
			at++
		}
	}
	start[lanes] = C.int(at)
	if rc := C.neuro_lanes_compute(l, &cs[0], &cx[0], &cn[0], &cout[0], &start[0]); rc != 0 {
		return fmt.Errorf("expert group: ggml compute on %d lanes failed (code %d)", lanes, int(rc))
	}
	return nil
}

// groupOn computes es[i] on ns[i] rows of xs[i] into outs[i] in one
// graph of g with threads threads; the rows pinned.
func groupOn(g *C.neuro_group, es []*Expert, xs [][]float32, ns []int, outs [][]float32, threads int) error {
	n := len(es)
	// C arrays of the experts and of pointers to the pinned Go rows.
	cs, cx, cout, cn := cArray[*C.neuro_expert](n), cArray[*C.float](n), cArray[*C.float](n), cArray[C.int](n)
	defer C.free(unsafe.Pointer(&cs[0]))
	defer C.free(unsafe.Pointer(&cx[0]))
	defer C.free(unsafe.Pointer(&cout[0]))
	defer C.free(unsafe.Pointer(&cn[0]))
	for i, e := range es {
		cs[i], cx[i], cout[i], cn[i] = e.c, (*C.float)(&xs[i][0]), (*C.float)(&outs[i][0]), C.int(ns[i])
	}
	if rc := C.neuro_group_compute(g, &cs[0], C.int(n), &cx[0], &cn[0], &cout[0], C.int(threads)); rc != 0 {
		return fmt.Errorf("expert group: ggml compute failed (code %d)", int(rc))
	}
	return nil
}

// cArray allocates n zeroed Ts in C memory (the caller frees &a[0]).
func cArray[T any](n int) []T {
	var zero T
	return unsafe.Slice((*T)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof(zero)))), n)
}

// Close frees the ggml memory. It is safe to call more than once.
func (e *Expert) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	computeMu.Lock() // as every allocation and free of device memory (see Gating.Close)
	defer computeMu.Unlock()
	C.neuro_expert_free(e.c)
	e.c = nil
	return nil
}

// Stack holds all the experts of one MoE layer in stacked tensors and
// computes them as llama.cpp's build_moe_ffn does: one mul_mat_id per
// projection for every token's chosen experts (moe.LayerComputer). It is
// safe for concurrent use; calls run one at a time.
type Stack struct {
	mu            sync.Mutex
	c             *C.neuro_expert
	embd, n, kMax int
	maxBatch      int
}

// NewStack copies the experts' weights (the same shape, types, biases and
// activation, as one layer's stacked tensors have them; ws[i] is expert i)
// into one stack on device dev, with compute memory for batches of
// o.MaxBatch tokens routed to up to kMax experts each.
func NewStack(dev Device, ws []moe.ExpertWeights, kMax int, o moe.ExpertOptions) (*Stack, error) {
	if len(ws) == 0 || kMax < 1 || kMax > len(ws) {
		return nil, fmt.Errorf("expert stack: %d experts, %d per token", len(ws), kMax)
	}
	w0 := ws[0]
	for i, w := range ws {
		if err := w.Check(); err != nil {
			return nil, fmt.Errorf("expert stack: expert %d: %w", i, err)
		}
		if w.Embd != w0.Embd || w.FF != w0.FF || w.Gate.Type != w0.Gate.Type || w.Up.Type != w0.Up.Type || w.Down.Type != w0.Down.Type ||
			w.Activation() != w0.Activation() || (w.GateBias == nil) != (w0.GateBias == nil) || (w.UpBias == nil) != (w0.UpBias == nil) ||
			(w.DownBias == nil) != (w0.DownBias == nil) || w.Dense || w.DownPrecF32 {
			return nil, fmt.Errorf("expert stack: expert %d is not like expert 0 (shape, types, biases, activation), or is a shared one", i)
		}
		for _, t := range []model.DType{w.Gate.Type, w.Up.Type, w.Down.Type} {
			if !slices.Contains(ExpertDTypes, t) {
				return nil, fmt.Errorf("expert stack: %w %s", model.ErrUnsupportedDType, t)
			}
		}
	}
	if o.Threads <= 0 || o.Threads > poolThreads {
		o.Threads = poolThreads
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 512
	}
	n := len(ws)
	// C arrays of pointers to the Go weights, pinned for the copy.
	ptrs := func() []unsafe.Pointer { return cArray[unsafe.Pointer](n) }
	gate, up, down := ptrs(), ptrs(), ptrs()
	defer C.free(unsafe.Pointer(&gate[0]))
	defer C.free(unsafe.Pointer(&up[0]))
	defer C.free(unsafe.Pointer(&down[0]))
	var biases [3][]unsafe.Pointer
	var pinner runtime.Pinner
	defer pinner.Unpin()
	for i, w := range ws {
		for _, b := range [][]byte{w.Gate.Data, w.Up.Data, w.Down.Data} {
			pinner.Pin(&b[0])
		}
		gate[i], up[i], down[i] = unsafe.Pointer(&w.Gate.Data[0]), unsafe.Pointer(&w.Up.Data[0]), unsafe.Pointer(&w.Down.Data[0])
		for j, b := range [][]float32{w.GateBias, w.UpBias, w.DownBias} {
			if b == nil {
				continue
			}
			if biases[j] == nil {
				biases[j] = ptrs()
				defer C.free(unsafe.Pointer(&biases[j][0]))
			}
			pinner.Pin(&b[0])
			biases[j][i] = unsafe.Pointer(&b[0])
		}
	}
	cb := func(j int) **C.float {
		if biases[j] == nil {
			return nil
		}
		return (**C.float)(unsafe.Pointer(&biases[j][0]))
	}
	act := C.int(C.NEURO_ACT_SWIGLU)
	if w0.Activation() == model.ActSwiGLUOAI {
		act = C.NEURO_ACT_SWIGLU_OAI
	}
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	var errbuf [256]C.char
	c := C.neuro_stack_new(C.int(w0.Embd), C.int(w0.FF), C.int(n), C.int(kMax), C.int(w0.Gate.Type), C.int(w0.Up.Type), C.int(w0.Down.Type),
		&gate[0], &up[0], &down[0], cb(0), cb(1), cb(2), act, 0,
		dev.index(), C.int(o.Threads), C.int(o.MaxBatch), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("expert stack on %s: %s", dev.Spec(), C.GoString(&errbuf[0]))
	}
	return &Stack{c: c, embd: w0.Embd, n: n, kMax: kMax, maxBatch: o.MaxBatch}, nil
}

// Experts is how many experts the stack holds.
func (s *Stack) Experts() int { return s.n }

// ComputeLayer implements moe.LayerComputer: n rows of x, row t routed to
// the k = len(selected)/n experts selected[t*k:(t+1)*k], each slot's output
// (before its weight) to out, n x k rows, in batches of MaxBatch tokens.
func (s *Stack) ComputeLayer(x []float32, n int, selected []int32, out []float32) error {
	if n < 1 || len(selected)%n != 0 || len(x) != n*s.embd {
		return fmt.Errorf("expert stack: %d tokens, %d floats, %d slots", n, len(x), len(selected))
	}
	k := len(selected) / n
	if k < 1 || k > s.kMax || len(out) != n*k*s.embd {
		return fmt.Errorf("expert stack: %d experts per token (at most %d), output of %d floats", k, s.kMax, len(out))
	}
	for _, e := range selected {
		if e < 0 || int(e) >= s.n {
			return fmt.Errorf("expert stack: expert %d of %d", e, s.n)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return moe.ErrClosed
	}
	computeMu.Lock()
	defer computeMu.Unlock()
	for start := 0; start < n; start += s.maxBatch {
		end := min(start+s.maxBatch, n)
		if rc := C.neuro_stack_compute(s.c, (*C.float)(&x[start*s.embd]), C.int(end-start), (*C.int32_t)(unsafe.Pointer(&selected[start*k])),
			C.int(k), (*C.float)(&out[start*k*s.embd])); rc != 0 {
			return fmt.Errorf("expert stack: ggml compute failed (code %d)", int(rc))
		}
	}
	return nil
}

// Close frees the ggml memory. It is safe to call more than once.
func (s *Stack) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	computeMu.Lock()
	defer computeMu.Unlock()
	C.neuro_expert_free(s.c)
	s.c = nil
	return nil
}
