package ggml

/*
#include <stdlib.h>
#include "neuro.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
)

// ExpertDTypes are the weight types Expert computes with.
var ExpertDTypes = []model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0, model.Q4_1, model.Q5_0,
	model.Q5_1, model.Q2_K, model.Q3_K, model.Q4_K, model.Q5_K, model.Q6_K, model.BF16}

// ErrClosed is returned by a closed Expert.
var ErrClosed = errors.New("expert closed")

// ExpertOptions tunes an Expert.
type ExpertOptions struct {
	// Threads is the number of compute threads (default: GOMAXPROCS).
	Threads int
	// MaxBatch is the largest batch Compute accepts (default 512); compute
	// memory for it is reserved up front.
	MaxBatch int
}

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

// NewExpert copies the weights into ggml memory. gate and up are
// [embd, ff] and down is [ff, embd] (ggml order, ne0 first), all of dtype.
func NewExpert(dtype model.DType, embd, ff int, gate, up, down []byte, o ExpertOptions) (*Expert, error) {
	if embd <= 0 || ff <= 0 {
		return nil, fmt.Errorf("expert: bad shape embd=%d ff=%d", embd, ff)
	}
	known := false
	for _, t := range ExpertDTypes {
		known = known || t == dtype
	}
	if !known {
		return nil, fmt.Errorf("expert: %w %s", model.ErrUnsupportedDType, dtype)
	}
	if uint64(embd)%dtype.BlockSize() != 0 || uint64(ff)%dtype.BlockSize() != 0 {
		return nil, fmt.Errorf("expert: embd %d and ff %d must be multiples of %s's block of %d", embd, ff, dtype, dtype.BlockSize())
	}
	want := dtype.RowSize(uint64(embd)) * uint64(ff)
	for _, w := range []struct {
		name string
		b    []byte
	}{{"gate", gate}, {"up", up}, {"down", down}} {
		if uint64(len(w.b)) != want {
			return nil, fmt.Errorf("expert: %s weights are %d bytes, want %d for %s [%d x %d]", w.name, len(w.b), want, dtype, embd, ff)
		}
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
		unsafe.Pointer(&gate[0]), unsafe.Pointer(&up[0]), unsafe.Pointer(&down[0]),
		C.int(o.Threads), C.int(o.MaxBatch), &errbuf[0], C.size_t(len(errbuf)))
	if c == nil {
		return nil, fmt.Errorf("expert: %s", C.GoString(&errbuf[0]))
	}
	return &Expert{c: c, embd: embd, ff: ff, maxBatch: o.MaxBatch, dtype: dtype}, nil
}

// NewExpertFromShard builds an Expert from a verified expert shard.
func NewExpertFromShard(s *model.Shard, layer int, o ExpertOptions) (*Expert, error) {
	var parts [3][]byte
	var infos [3]model.TensorInfo
	for i, name := range []string{"gate", "up", "down"} {
		b, t, err := s.TensorBytes(model.ExpertTensorName(layer, name))
		if err != nil {
			return nil, err
		}
		if len(t.Shape) != 2 {
			return nil, fmt.Errorf("shard %s: tensor %s has shape %v, want 2 dimensions", s.CID, t.Name, t.Shape)
		}
		parts[i], infos[i] = b, t
	}
	g, u, d := infos[0], infos[1], infos[2]
	if g.Type != u.Type || g.Type != d.Type {
		return nil, fmt.Errorf("shard %s: mixed dtypes %s/%s/%s", s.CID, g.Type, u.Type, d.Type)
	}
	if g.Shape[0] != u.Shape[0] || g.Shape[1] != u.Shape[1] || d.Shape[0] != g.Shape[1] || d.Shape[1] != g.Shape[0] {
		return nil, fmt.Errorf("shard %s: shapes gate %v up %v down %v do not form an expert", s.CID, g.Shape, u.Shape, d.Shape)
	}
	return NewExpert(g.Type, int(g.Shape[0]), int(g.Shape[1]), parts[0], parts[1], parts[2], o)
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
	if n < 1 || n > e.maxBatch {
		return fmt.Errorf("expert: batch of %d, want 1 to %d", n, e.maxBatch)
	}
	if len(x) != n*e.embd || len(out) != n*e.embd {
		return fmt.Errorf("expert: input %d and output %d floats, want %d (%d x %d)", len(x), len(out), n*e.embd, n, e.embd)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.c == nil {
		return ErrClosed
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
