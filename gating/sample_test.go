package gating

import (
	"math"
	"testing"
)

func TestSamplerGreedyTakesFirstMaximum(t *testing.T) {
	s := NewSampler(0, 0, 0, 1)
	if got := s.Sample([]float32{1, 5, 3, 5}); got != 1 {
		t.Fatalf("greedy picked %d, want 1", got)
	}
	if got := NewSampler(0.8, 1, 0, 1).Sample([]float32{1, 5, 9, 5}); got != 2 {
		t.Fatalf("top-k 1 picked %d, want 2", got)
	}
}

func TestSamplerSeedReproduces(t *testing.T) {
	logits := []float32{1, 2, 3, 2.5, 0.5, 2.9}
	draw := func(seed uint64) []int32 {
		s := NewSampler(1, 0, 0, seed)
		var out []int32
		for range 50 {
			out = append(out, s.Sample(logits))
		}
		return out
	}
	a, b, c := draw(7), draw(7), draw(8)
	if string(int32s(a)) != string(int32s(b)) {
		t.Fatal("the same seed gave different draws")
	}
	if string(int32s(a)) == string(int32s(c)) {
		t.Fatal("different seeds gave the same 50 draws")
	}
}

func int32s(x []int32) []byte {
	b := make([]byte, len(x))
	for i, v := range x {
		b[i] = byte(v)
	}
	return b
}

// The draws follow the softmax, restricted by top-k and top-p.
func TestSamplerDistribution(t *testing.T) {
	logits := []float32{0, float32(math.Log(2)), float32(math.Log(3)), float32(math.Log(4))} // p = 1,2,3,4 /10
	count := func(s *Sampler) []float64 {
		n := make([]float64, len(logits))
		const draws = 20000
		for range draws {
			n[s.Sample(logits)]++
		}
		for i := range n {
			n[i] /= draws
		}
		return n
	}
	near := func(name string, got, want []float64) {
		t.Helper()
		for i := range want {
			if math.Abs(got[i]-want[i]) > 0.02 {
				t.Fatalf("%s: frequencies %.3f, want %.3f", name, got, want)
			}
		}
	}
	near("full", count(NewSampler(1, 0, 0, 1)), []float64{0.1, 0.2, 0.3, 0.4})
	near("top-k 2", count(NewSampler(1, 2, 0, 2)), []float64{0, 0, 3.0 / 7, 4.0 / 7})
	// The nucleus reaching 0.65 is {4, 3}: 0.4 + 0.3 = 0.7.
	near("top-p 0.65", count(NewSampler(1, 0, 0.65, 3)), []float64{0, 0, 3.0 / 7, 4.0 / 7})
	// A low temperature sharpens towards the maximum.
	if f := count(NewSampler(0.1, 0, 0, 4)); f[3] < 0.9 {
		t.Fatalf("temperature 0.1: top token frequency %.3f, want > 0.9", f[3])
	}
}
