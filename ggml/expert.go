package ggml

/*
#include <stdlib.h>
#include "neuro.h"
*/
import "C"

import (
	"fmt"
	"slices"
	"sync"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// ExpertDTypes are the weight types Expert computes with.
var ExpertDTypes = []model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0, model.Q4_1, model.Q5_0,
	model.Q5_1, model.Q2_K, model.Q3_K, model.Q4_K, model.Q5_K, model.Q6_K, model.BF16}

// Expert computes one MoE expert's feed-forward block,
// down(silu(gate·x) ⊙ (up·x)), with ggml on the weights' own dtype. It is
// safe for concurrent use; calls run one at a time.
type Expert struct {
	mu       sync.Mutex
	c        *C.neuro_expert
	embd, ff int
	maxBatch int
	dtype    model.DType
}

// NewExpert copies the weights into ggml memory. The three tensors must
// share one dtype of ExpertDTypes.
func NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (*Expert, error) {
	if err := w.Check(); err != nil {
		return nil, err
	}
	dtype := w.Gate.Type
	if w.Up.Type != dtype || w.Down.Type != dtype {
		return nil, fmt.Errorf("expert: mixed dtypes %s/%s/%s", w.Gate.Type, w.Up.Type, w.Down.Type)
	}
	if !slices.Contains(ExpertDTypes, dtype) {
		return nil, fmt.Errorf("expert: %w %s", model.ErrUnsupportedDType, dtype)
	}
	embd, ff := w.Embd, w.FF
	if uint64(embd)%dtype.BlockSize() != 0 || uint64(ff)%dtype.BlockSize() != 0 {
		return nil, fmt.Errorf("expert: embd %d and ff %d must be multiples of %s's block of %d", embd, ff, dtype, dtype.BlockSize())
	}
	if o.Threads <= 0 || o.Threads > poolThreads {
		o.Threads = poolThreads
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 512
	}
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	C.neuro_pool(C.int(poolThreads))
	var errbuf [256]C.char
	c := C.neuro_expert_new(C.int(embd), C.int(ff), C.int(dtype),
		unsafe.Pointer(&w.Gate.Data[0]), unsafe.Pointer(&w.Up.Data[0]), unsafe.Pointer(&w.Down.Data[0]),
		C.int(o.Threads), C.int(o.MaxBatch), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("expert: %s", C.GoString(&errbuf[0]))
	}
	return &Expert{c: c, embd: embd, ff: ff, maxBatch: o.MaxBatch, dtype: dtype}, nil
}

// Embd is the hidden size.
func (e *Expert) Embd() int { return e.embd }

// FF is the feed-forward size.
func (e *Expert) FF() int { return e.ff }

// DType is the weights' type.
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

// Close frees the ggml memory. It is safe to call more than once.
func (e *Expert) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	C.neuro_expert_free(e.c)
	e.c = nil
	return nil
}
