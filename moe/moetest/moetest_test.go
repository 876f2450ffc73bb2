package moetest

import (
	"math"
	"testing"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

func f32(t *testing.T, x ...float32) moe.Tensor {
	t.Helper()
	b, err := model.Encode(model.F32, x)
	if err != nil {
		t.Fatal(err)
	}
	return moe.Tensor{Type: model.F32, Data: b}
}

// An expert of embd 2 and ff 1 whose output is known in closed form:
// gate picks x0, up picks x1, down scales by 2 and 3.
func TestExpertComputesSwiGLU(t *testing.T) {
	e, err := Backend{}.NewExpert(moe.ExpertWeights{Embd: 2, FF: 1, Gate: f32(t, 1, 0), Up: f32(t, 0, 1), Down: f32(t, 2, 3)},
		moe.ExpertOptions{MaxBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	x := []float32{1.5, -2, 0, 4}
	out := make([]float32, 4)
	if err := e.Compute(x, 2, out); err != nil {
		t.Fatal(err)
	}
	for tok := range 2 {
		a, b := float64(x[2*tok]), float64(x[2*tok+1])
		h := a / (1 + math.Exp(-a)) * b
		if out[2*tok] != float32(2*h) || out[2*tok+1] != float32(3*h) {
			t.Fatalf("token %d: %v, want [%v %v]", tok, out[2*tok:2*tok+2], 2*h, 3*h)
		}
	}
	if err := e.Compute(make([]float32, 6), 3, make([]float32, 6)); err == nil {
		t.Fatal("a batch over MaxBatch was accepted")
	}
	e.Close()
	if err := e.Compute(x[:2], 1, out[:2]); err != moe.ErrClosed {
		t.Fatalf("closed expert: %v", err)
	}
}
