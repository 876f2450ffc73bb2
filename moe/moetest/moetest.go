// Package moetest has a pure-Go compute backend for tests: experts in
// float32 arithmetic on weights decoded by model.Decode (F32, F16, Q8_0,
// Q4_0), so that the packages that move hidden states around can be tested
// with the race detector and without llama.cpp. It has no gating compute:
// tests of a whole forward pass use package ggml.
//
// Its results are real (down(silu(gate·x) ⊙ (up·x)), or gpt-oss's
// swiglu_oai with biases, computed in float64
// and rounded), but not bit-identical to ggml's, which quantizes the
// activations; compare with ggml only through the tolerance a validator
// uses.
package moetest

import (
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Backend is the pure-Go backend. Its zero value is ready to use.
type Backend struct{}

var _ moe.Backend = Backend{}

// ErrNoGating is returned by NewGating and LoadVocab.
var ErrNoGating = errors.New("moetest: no gating compute (use package ggml)")

// NewExpert implements moe.ExpertLoader.
func (Backend) NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (moe.Expert, error) {
	if err := w.Check(); err != nil {
		return nil, err
	}
	e := &Expert{embd: w.Embd, ff: w.FF, maxBatch: o.MaxBatch, oai: w.Activation() == model.ActSwiGLUOAI,
		gateB: w.GateBias, upB: w.UpBias, downB: w.DownBias}
	if e.maxBatch <= 0 {
		e.maxBatch = 512
	}
	var err error
	for _, p := range []struct {
		dst *[]float32
		t   moe.Tensor
	}{{&e.gate, w.Gate}, {&e.up, w.Up}, {&e.down, w.Down}} {
		if *p.dst, err = model.Decode(p.t.Type, p.t.Data); err != nil {
			return nil, fmt.Errorf("moetest expert: %w", err)
		}
	}
	return e, nil
}

// NewGating implements moe.GatingLoader: it always fails.
func (Backend) NewGating(moe.Hparams, *model.Shard, int) (moe.Gating, error) { return nil, ErrNoGating }

// LoadVocab implements moe.GatingLoader: it always fails.
func (Backend) LoadVocab(string) (moe.Vocab, error) { return nil, ErrNoGating }

// Quantize implements moe.Quantizer with model.Encode.
func (Backend) Quantize(t model.DType, x []float32, rowLen int) ([]byte, error) {
	if rowLen <= 0 || len(x)%rowLen != 0 {
		return nil, fmt.Errorf("quantize %s: %d values in rows of %d", t, len(x), rowLen)
	}
	return model.Encode(t, x)
}

// Dequantize implements moe.Quantizer with model.Decode.
func (Backend) Dequantize(t model.DType, b []byte) ([]float32, error) { return model.Decode(t, b) }

// Expert is a pure-Go expert.
type Expert struct {
	mu             sync.Mutex
	closed         bool
	embd, ff       int
	maxBatch       int
	gate, up, down []float32
	// gpt-oss's experts: swiglu_oai and biases (nil: none).
	oai               bool
	gateB, upB, downB []float32
}

// Embd implements moe.Expert.
func (e *Expert) Embd() int { return e.embd }

// FF implements moe.Expert.
func (e *Expert) FF() int { return e.ff }

// MaxBatch implements moe.Expert.
func (e *Expert) MaxBatch() int { return e.maxBatch }

// Compute implements moe.Expert.
func (e *Expert) Compute(x []float32, n int, out []float32) error {
	if err := moe.CheckBatch(x, n, out, e.embd, e.maxBatch); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return moe.ErrClosed
	}
	act := make([]float64, e.ff)
	for t := range n {
		xt := x[t*e.embd : (t+1)*e.embd]
		for j := range e.ff {
			g := dot(e.gate[j*e.embd:(j+1)*e.embd], xt) + bias(e.gateB, j)
			u := dot(e.up[j*e.embd:(j+1)*e.embd], xt) + bias(e.upB, j)
			if e.oai {
				// swiglu_oai (ggml's alpha 1.702, limit 7)
				g = min(g, 7)
				act[j] = g / (1 + math.Exp(-1.702*g)) * (max(min(u, 7), -7) + 1)
			} else {
				act[j] = g / (1 + math.Exp(-g)) * u
			}
		}
		for i := range e.embd {
			row := e.down[i*e.ff : (i+1)*e.ff]
			s := bias(e.downB, i)
			for j, a := range act {
				s += float64(row[j]) * a
			}
			out[t*e.embd+i] = float32(s)
		}
	}
	return nil
}

func bias(b []float32, i int) float64 {
	if b == nil {
		return 0
	}
	return float64(b[i])
}

func dot(w, x []float32) float64 {
	var s float64
	for i, v := range w {
		s += float64(v) * float64(x[i])
	}
	return s
}

// Close implements moe.Expert.
func (e *Expert) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closed = true
	e.gate, e.up, e.down = nil, nil, nil
	return nil
}
