package ggml

import (
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
)

// randWeights returns n values uniform in ±scale, encoded as dt, and their
// decoded values.
func randWeights(t testing.TB, rng *rand.Rand, dt model.DType, n int, scale float32) ([]byte, []float32) {
	t.Helper()
	x := make([]float32, n)
	for i := range x {
		x[i] = scale * (2*rng.Float32() - 1)
	}
	b, err := model.Encode(dt, x)
	if err != nil {
		t.Fatal(err)
	}
	y, err := model.Decode(dt, b)
	if err != nil {
		t.Fatal(err)
	}
	return b, y
}

// activationType is the type ggml converts a matmul's activations to for
// weights of type dt (ggml's vec_dot_type): F16 for F16 weights, Q8_0 for
// Q8_0 and Q4_0, none for F32.
func activationType(dt model.DType) (model.DType, bool) {
	switch dt {
	case model.F16:
		return model.F16, true
	case model.Q8_0, model.Q4_0:
		return model.Q8_0, true
	}
	return 0, false
}

// roundTrip passes x through dt's encoding, as ggml does to activations.
func roundTrip(t testing.TB, dt model.DType, x []float32) []float32 {
	b, err := model.Encode(dt, x)
	if err != nil {
		t.Fatal(err)
	}
	y, err := model.Decode(dt, b)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

// referenceFFN computes down(silu(gate x) * (up x)) in float64 on the
// decoded weights (row-major [rows][cols] with cols contiguous). act, if
// non-nil, rounds each matmul's activations as ggml does.
func referenceFFN(gate, up, down []float32, embd, ff int, x []float32, act func([]float32) []float32) []float64 {
	if act != nil {
		x = act(x)
	}
	h := make([]float64, ff)
	for r := range ff {
		var g, u float64
		for c := range embd {
			g += float64(gate[r*embd+c]) * float64(x[c])
			u += float64(up[r*embd+c]) * float64(x[c])
		}
		h[r] = g / (1 + math.Exp(-g)) * u
	}
	if act != nil {
		h32 := make([]float32, ff)
		for i, v := range h {
			h32[i] = float32(v)
		}
		for i, v := range act(h32) {
			h[i] = float64(v)
		}
	}
	out := make([]float64, embd)
	for r := range embd {
		for c := range ff {
			out[r] += float64(down[r*ff+c]) * h[c]
		}
	}
	return out
}

// maxRelErr is max |got-want| over max |want|.
func maxRelErr(got []float32, want []float64) float64 {
	var d, m float64
	for i := range want {
		d = max(d, math.Abs(float64(got[i])-want[i]))
		m = max(m, math.Abs(want[i]))
	}
	return d / m
}

func TestExpertMatchesReference(t *testing.T) {
	const embd, ff, batch = 128, 256, 5
	// The reference rounds activations as ggml does (F16 for F16 weights,
	// Q8_0 for quantized ones), so what is left is float summation order
	// and the odd activation that rounds to the neighbouring step.
	const tol = 1e-4
	for _, dt := range []model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0} {
		t.Run(dt.String(), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(dt)))
			gb, g := randWeights(t, rng, dt, embd*ff, 0.1)
			ub, u := randWeights(t, rng, dt, embd*ff, 0.1)
			db, d := randWeights(t, rng, dt, embd*ff, 0.1)
			e, err := newExpert(dt, embd, ff, gb, ub, db, moe.ExpertOptions{Threads: 2, MaxBatch: 8})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			x := make([]float32, batch*embd)
			for i := range x {
				x[i] = 2*rng.Float32() - 1
			}
			out := make([]float32, batch*embd)
			if err := e.Compute(x, batch, out); err != nil {
				t.Fatal(err)
			}
			var worst float64
			for tok := range batch {
				var act func([]float32) []float32
				if at, ok := activationType(dt); ok {
					act = func(v []float32) []float32 { return roundTrip(t, at, v) }
				}
				want := referenceFFN(g, u, d, embd, ff, x[tok*embd:(tok+1)*embd], act)
				worst = max(worst, maxRelErr(out[tok*embd:(tok+1)*embd], want))
			}
			t.Logf("%s: max relative error vs float64 reference %.2e", dt, worst)
			if worst > tol {
				t.Fatalf("max relative error %.2e above %.0e", worst, tol)
			}
			// One token alone gives what it gave inside the batch, up to
			// the kernels' batch-dependent summation order.
			one := make([]float32, embd)
			if err := e.Compute(x[2*embd:3*embd], 1, one); err != nil {
				t.Fatal(err)
			}
			want := make([]float64, embd)
			for i := range want {
				want[i] = float64(out[2*embd+i])
			}
			if r := maxRelErr(one, want); r > 1e-5 {
				t.Fatalf("batch of 1 vs batch of %d: relative difference %.2e", batch, r)
			}
		})
	}
}

// K-quants go through ggml's own quantizer; the reference dequantizes with
// ggml and rounds activations through Q8_K, ggml's vec_dot_type for them.
func TestExpertQ4K(t *testing.T) {
	const embd, ff, batch = 256, 512, 3
	rng := rand.New(rand.NewPCG(9, 9))
	enc := func() ([]byte, []float32) {
		x := make([]float32, embd*ff)
		for i := range x {
			x[i] = 0.1 * (2*rng.Float32() - 1)
		}
		b, err := Quantize(model.Q4_K, x, embd)
		if err != nil {
			t.Fatal(err)
		}
		y, err := Dequantize(model.Q4_K, b)
		if err != nil {
			t.Fatal(err)
		}
		return b, y
	}
	gb, g := enc()
	ub, u := enc()
	// down is [ff, embd]: rows of ff values.
	dx := make([]float32, embd*ff)
	for i := range dx {
		dx[i] = 0.1 * (2*rng.Float32() - 1)
	}
	db, err := Quantize(model.Q4_K, dx, ff)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := Dequantize(model.Q4_K, db)
	e, err := newExpert(model.Q4_K, embd, ff, gb, ub, db, moe.ExpertOptions{MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	x := make([]float32, batch*embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	out := make([]float32, len(x))
	if err := e.Compute(x, batch, out); err != nil {
		t.Fatal(err)
	}
	act := func(v []float32) []float32 {
		b, err := Quantize(model.Q8_K, v, len(v))
		if err != nil {
			t.Fatal(err)
		}
		y, err := model.Decode(model.Q8_K, b)
		if err != nil {
			t.Fatal(err)
		}
		return y
	}
	var worst float64
	for tok := range batch {
		want := referenceFFN(g, u, d, embd, ff, x[tok*embd:(tok+1)*embd], act)
		worst = max(worst, maxRelErr(out[tok*embd:(tok+1)*embd], want))
	}
	t.Logf("q4_k: max relative error vs float64 reference %.2e", worst)
	if worst > 1e-4 {
		t.Fatalf("q4_k: relative error %.2e above 1e-4", worst)
	}
}

// A token's result does not depend on the batch it shares: every output
// element is one dot product over a whole row (mul_mat_id). So batching
// requests on an expert node never changes an answer.
func TestExpertBatchIndependent(t *testing.T) {
	const embd, ff, batch = 64, 128, 512
	rng := rand.New(rand.NewPCG(3, 4))
	gb, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
	ub, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
	db, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
	e, err := newExpert(model.Q8_0, embd, ff, gb, ub, db, moe.ExpertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	x := make([]float32, batch*embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	all := make([]float32, len(x))
	if err := e.Compute(x, batch, all); err != nil {
		t.Fatal(err)
	}
	one := make([]float32, embd)
	for _, tok := range []int{0, 1, 31, 32, 255, 511} {
		if err := e.Compute(x[tok*embd:(tok+1)*embd], 1, one); err != nil {
			t.Fatal(err)
		}
		for i := range one {
			if one[i] != all[tok*embd+i] {
				t.Fatalf("token %d: alone %v, in a batch of %d %v", tok, one[i], batch, all[tok*embd+i])
			}
		}
	}
	// Steady state allocates nothing on the Go side.
	if a := testing.AllocsPerRun(20, func() { _ = e.Compute(x[:embd], 1, one) }); a != 0 {
		t.Fatalf("%v allocations per call", a)
	}
}

func TestExpertFromShard(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "m.gguf")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Generate(f, model.Presets["tiny"], model.Q8_0, 4); err != nil {
		t.Fatal(err)
	}
	f.Close()
	res, err := model.Split(src, filepath.Join(dir, "shards"))
	if err != nil {
		t.Fatal(err)
	}
	ref := res.Manifest.GetExperts()[5]
	s, err := model.OpenShard(filepath.Join(dir, "shards"), ref.GetShard())
	if err != nil {
		t.Fatal(err)
	}
	w, err := moe.ExpertWeightsOf(s, int(ref.GetLayer()))
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewExpert(w, moe.ExpertOptions{Threads: 1, MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	p := model.Presets["tiny"]
	if e.Embd() != p.Embd || e.FF() != p.FF || e.DType() != model.Q8_0 {
		t.Fatalf("expert %d x %d %s", e.Embd(), e.FF(), e.DType())
	}
	x := make([]float32, 2*p.Embd)
	x[3], x[p.Embd+7] = 1, -1
	out := make([]float32, 2*p.Embd)
	if err := e.Compute(x, 2, out); err != nil {
		t.Fatal(err)
	}
	nonzero := 0
	for _, v := range out {
		if v != 0 {
			nonzero++
		}
	}
	if nonzero < p.Embd {
		t.Fatalf("only %d non-zero outputs", nonzero)
	}
}

func TestExpertBadInput(t *testing.T) {
	const embd, ff = 64, 64
	w := make([]byte, model.Q8_0.RowSize(embd)*ff)
	if _, err := newExpert(model.Q8_0, embd, ff, w, w, w[:10], moe.ExpertOptions{}); err == nil {
		t.Error("accepted short down weights")
	}
	if _, err := newExpert(model.Q8_0, 48, ff, w, w, w, moe.ExpertOptions{}); err == nil {
		t.Error("accepted embd that is not a multiple of the block")
	}
	if _, err := newExpert(model.DType(99), embd, ff, w, w, w, moe.ExpertOptions{}); err == nil {
		t.Error("accepted an unknown dtype")
	}
	e, err := newExpert(model.Q8_0, embd, ff, w, w, w, moe.ExpertOptions{Threads: 1, MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float32, 5*embd)
	if err := e.Compute(make([]float32, 5*embd), 5, out); err == nil {
		t.Error("accepted a batch over MaxBatch")
	}
	if err := e.Compute(make([]float32, embd-1), 1, out[:embd]); err == nil {
		t.Error("accepted a short input")
	}
	if err := e.Compute(make([]float32, embd), 0, out[:0]); err == nil {
		t.Error("accepted an empty batch")
	}
	e.Close()
	if err := e.Compute(make([]float32, embd), 1, out[:embd]); err != moe.ErrClosed {
		t.Errorf("compute after close: %v", err)
	}
	e.Close()
}

// newExpert builds an expert whose three tensors share dtype.
func newExpert(dtype model.DType, embd, ff int, gate, up, down []byte, o moe.ExpertOptions) (*Expert, error) {
	return NewExpert(moe.ExpertWeights{Embd: embd, FF: ff,
		Gate: moe.Tensor{Type: dtype, Data: gate}, Up: moe.Tensor{Type: dtype, Data: up}, Down: moe.Tensor{Type: dtype, Data: down}}, o)
}

// The pure-Go test backend (moetest), which the race-detector tests of the
// packages above compute with, agrees with ggml on F32 weights up to float
// summation order.
func TestMoetestAgreesWithGGML(t *testing.T) {
	const embd, ff, batch = 128, 256, 3
	rng := rand.New(rand.NewPCG(9, 9))
	gb, _ := randWeights(t, rng, model.F32, embd*ff, 0.1)
	ub, _ := randWeights(t, rng, model.F32, embd*ff, 0.1)
	db, _ := randWeights(t, rng, model.F32, embd*ff, 0.1)
	bias := func(n int) []float32 {
		b := make([]float32, n)
		for i := range b {
			b[i] = 2*rng.Float32() - 1
		}
		return b
	}
	plain := moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.F32, Data: gb},
		Up: moe.Tensor{Type: model.F32, Data: ub}, Down: moe.Tensor{Type: model.F32, Data: db}}
	oai := plain // gpt-oss's: swiglu_oai and biases
	oai.Act, oai.GateBias, oai.UpBias, oai.DownBias = model.ActSwiGLUOAI, bias(ff), bias(ff), bias(embd)
	for _, tc := range []struct {
		name  string
		w     moe.ExpertWeights
		scale float32 // of the input: gpt-oss's large enough to reach the clamps at ±7
	}{{"swiglu", plain, 1}, {"swiglu_oai", oai, 30}} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := Backend{}.NewExpert(tc.w, moe.ExpertOptions{Threads: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			m, err := moetest.Backend{}.NewExpert(tc.w, moe.ExpertOptions{})
			if err != nil {
				t.Fatal(err)
			}
			x := make([]float32, batch*embd)
			for i := range x {
				x[i] = tc.scale * (2*rng.Float32() - 1)
			}
			got, want := make([]float32, len(x)), make([]float32, len(x))
			if err := g.Compute(x, batch, got); err != nil {
				t.Fatal(err)
			}
			if err := m.Compute(x, batch, want); err != nil {
				t.Fatal(err)
			}
			w64 := make([]float64, len(want))
			for i, v := range want {
				w64[i] = float64(v)
			}
			if e := maxRelErr(got, w64); e > 1e-5 {
				t.Fatalf("ggml and moetest differ by %.2e (relative)", e)
			}
		})
	}
	// The same weights without the biases and activation differ: both
	// backends compute what ExpertWeights names.
	a, b := make([]float32, embd), make([]float32, embd)
	x := make([]float32, embd)
	for i := range x {
		x[i] = 30 * (2*rng.Float32() - 1)
	}
	ge, _ := Backend{}.NewExpert(plain, moe.ExpertOptions{Threads: 1})
	defer ge.Close()
	go2, _ := Backend{}.NewExpert(oai, moe.ExpertOptions{Threads: 1})
	defer go2.Close()
	ge.Compute(x, 1, a)
	go2.Compute(x, 1, b)
	if slices.Equal(a, b) {
		t.Fatal("swiglu_oai with biases computed what swiglu does")
	}
}

// An expert whose tensors each have their own type, as a Q4_K_M file has
// them (gate and up Q4_K, down Q6_K; both K-quants take Q8_K activations),
// computes what the float64 reference does on the dequantized weights.
func TestExpertMixedTypes(t *testing.T) {
	const embd, ff, batch = 256, 512, 3
	rng := rand.New(rand.NewPCG(11, 12))
	enc := func(dt model.DType, rowLen int) ([]byte, []float32) {
		x := make([]float32, embd*ff)
		for i := range x {
			x[i] = 0.1 * (2*rng.Float32() - 1)
		}
		b, err := Quantize(dt, x, rowLen)
		if err != nil {
			t.Fatal(err)
		}
		y, err := Dequantize(dt, b)
		if err != nil {
			t.Fatal(err)
		}
		return b, y
	}
	gb, g := enc(model.Q4_K, embd)
	ub, u := enc(model.Q4_K, embd)
	db, d := enc(model.Q6_K, ff)
	w := moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q4_K, Data: gb},
		Up: moe.Tensor{Type: model.Q4_K, Data: ub}, Down: moe.Tensor{Type: model.Q6_K, Data: db}}
	e, err := NewExpert(w, moe.ExpertOptions{MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	x := make([]float32, batch*embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	out := make([]float32, len(x))
	if err := e.Compute(x, batch, out); err != nil {
		t.Fatal(err)
	}
	act := func(v []float32) []float32 { return roundTripQ8K(t, v) }
	var worst float64
	for tok := range batch {
		want := referenceFFN(g, u, d, embd, ff, x[tok*embd:(tok+1)*embd], act)
		worst = max(worst, maxRelErr(out[tok*embd:(tok+1)*embd], want))
	}
	t.Logf("q4_k/q4_k/q6_k: max relative error vs float64 reference %.2e", worst)
	if worst > 1e-4 {
		t.Fatalf("relative error %.2e above 1e-4", worst)
	}
	// A type ggml cannot compute is refused, naming the tensor.
	w.Down.Type = model.Q8_K
	if _, err := NewExpert(w, moe.ExpertOptions{}); err == nil || !strings.Contains(err.Error(), "down") {
		t.Fatalf("an expert with a Q8_K down tensor: %v", err)
	}
}

// roundTripQ8K passes x through Q8_K, the activation type of K-quants.
func roundTripQ8K(t *testing.T, v []float32) []float32 {
	t.Helper()
	b, err := Quantize(model.Q8_K, v, len(v))
	if err != nil {
		t.Fatal(err)
	}
	y, err := model.Decode(model.Q8_K, b)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

// A layer's stack gives each slot exactly what its expert's own Compute
// gives (the same ops, one expert-indexed product per projection), for
// plain experts and gpt-oss's kind, with batches over MaxBatch; a stack
// refuses a shared (dense) expert and experts unlike each other.
func TestStackIsEachExpertsCompute(t *testing.T) {
	const embd, ff, n, k = 64, 128, 5, 2
	rng := rand.New(rand.NewPCG(3, 4))
	weights := func() moe.ExpertWeights {
		g, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
		u, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
		d, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
		return moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q8_0, Data: g},
			Up: moe.Tensor{Type: model.Q8_0, Data: u}, Down: moe.Tensor{Type: model.Q8_0, Data: d}}
	}
	oai := func() moe.ExpertWeights {
		w := weights()
		w.Act, w.GateBias, w.UpBias, w.DownBias = model.ActSwiGLUOAI, make([]float32, ff), make([]float32, ff), make([]float32, embd)
		for i := range w.DownBias {
			w.DownBias[i] = float32(i) / 100
		}
		return w
	}
	x := make([]float32, n*embd)
	for j := range x {
		x[j] = 2*rng.Float32() - 1
	}
	selected := []int32{2, 0, 1, 2, 0, 1, 3, 0, 2, 3}
	for name, mk := range map[string]func() moe.ExpertWeights{"swiglu": weights, "swiglu_oai": oai} {
		t.Run(name, func(t *testing.T) {
			ws := []moe.ExpertWeights{mk(), mk(), mk(), mk()}
			st, err := NewStack(Device{}, ws, k, moe.ExpertOptions{Threads: 2, MaxBatch: 2}) // 5 tokens: batches of 2, 2, 1
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			got := make([]float32, n*k*embd)
			if err := st.ComputeLayer(x, n, selected, got); err != nil {
				t.Fatal(err)
			}
			for slot, e := range selected {
				ex, err := Backend{}.NewExpert(ws[e], moe.ExpertOptions{Threads: 2})
				if err != nil {
					t.Fatal(err)
				}
				tok := slot / k
				want := make([]float32, embd)
				if err := ex.Compute(x[tok*embd:(tok+1)*embd], 1, want); err != nil {
					t.Fatal(err)
				}
				ex.Close()
				if !slices.Equal(got[slot*embd:(slot+1)*embd], want) {
					t.Fatalf("slot %d (expert %d): the stack's output differs from the expert's own compute", slot, e)
				}
			}
			if err := st.ComputeLayer(x, n, []int32{0, 4, 1, 1, 2, 2, 3, 3, 0, 0}, got); err == nil {
				t.Fatal("expert 4 of a stack of 4 accepted")
			}
		})
	}
	shared := weights()
	shared.Dense = true
	if _, err := NewStack(Device{}, []moe.ExpertWeights{weights(), shared}, 1, moe.ExpertOptions{}); err == nil {
		t.Fatal("a stack took a shared expert")
	}
	if _, err := NewStack(Device{}, []moe.ExpertWeights{weights(), oai()}, 1, moe.ExpertOptions{}); err == nil {
		t.Fatal("a stack took experts of two kinds")
	}
}

// A group of experts computed in one graph gives each expert's rows
// exactly as its own Compute does (gpt-oss's kind and mixed batch sizes
// too), one expert or a dozen; a shared (dense) expert, an expert twice
// or another backend's expert is not groupable, and moe.ComputeGroup then
// computes them one by one, with the same results.
func TestGroupIsEachExpertsCompute(t *testing.T) {
	const embd, ff = 64, 128
	rng := rand.New(rand.NewPCG(5, 6))
	weights := func(oai bool) moe.ExpertWeights {
		g, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
		u, _ := randWeights(t, rng, model.Q4_0, embd*ff, 0.1)
		d, _ := randWeights(t, rng, model.Q8_0, embd*ff, 0.1)
		w := moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q8_0, Data: g},
			Up: moe.Tensor{Type: model.Q4_0, Data: u}, Down: moe.Tensor{Type: model.Q8_0, Data: d}}
		if oai {
			w.Act, w.GateBias, w.UpBias, w.DownBias = model.ActSwiGLUOAI, make([]float32, ff), make([]float32, ff), make([]float32, embd)
			for i := range w.UpBias {
				w.UpBias[i] = float32(i%7) / 50
			}
		}
		return w
	}
	var es, laned, polled []moe.Computer
	for i := range 12 {
		w := weights(i%3 == 2)
		e, err := Backend{}.NewExpert(w, moe.ExpertOptions{MaxBatch: 8})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		es = append(es, e)
		// the same expert on lanes of one thread (at most the cores)
		l, err := Backend{}.NewExpert(w, moe.ExpertOptions{MaxBatch: 8, Threads: 1, Lanes: 3})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		laned = append(laned, l)
		// and on lanes that poll for the next group
		p, err := Backend{}.NewExpert(w, moe.ExpertOptions{MaxBatch: 8, Threads: 1, Lanes: 3, LanePoll: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		polled = append(polled, p)
	}
	input := func(n int) []float32 {
		x := make([]float32, n*embd)
		for j := range x {
			x[j] = 2*rng.Float32() - 1
		}
		return x
	}
	check := func(t *testing.T, group []moe.Computer, wantGroupable bool) {
		t.Helper()
		xs, ns, outs := make([][]float32, len(group)), make([]int, len(group)), make([][]float32, len(group))
		for i := range group {
			ns[i] = 1 + (i*5)%8
			xs[i], outs[i] = input(ns[i]), make([]float32, ns[i]*embd)
		}
		err := group[0].(moe.Grouper).ComputeGroup(group, xs, ns, outs)
		if groupable := !errors.Is(err, moe.ErrNotGroupable); groupable != wantGroupable || (groupable && err != nil) {
			t.Fatalf("ComputeGroup: %v (groupable: want %v)", err, wantGroupable)
		}
		if err := moe.ComputeGroup(group, xs, ns, outs); err != nil {
			t.Fatal(err)
		}
		for i, e := range group {
			want := make([]float32, len(outs[i]))
			if err := e.Compute(xs[i], ns[i], want); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(outs[i], want) {
				t.Fatalf("member %d of %d: the group's output differs from the expert's own compute", i, len(group))
			}
		}
	}
	t.Run("one", func(t *testing.T) { check(t, es[:1], true) })
	t.Run("two", func(t *testing.T) { check(t, es[3:5], true) })
	t.Run("twelve", func(t *testing.T) { check(t, es, true) })
	// On lanes, each lane's members in a graph of their own at the same
	// time as the others'.
	for _, c := range []struct {
		name  string
		group []moe.Computer
	}{{"one on lanes", laned[:1]}, {"two on lanes", laned[3:5]}, {"twelve on lanes", laned}} {
		t.Run(c.name, func(t *testing.T) {
			check(t, c.group, true)
			if want := min(3, len(c.group), poolThreads); lastLanes() != want {
				t.Fatalf("computed on %d lanes, want %d", lastLanes(), want)
			}
		})
	}
	// Lanes that poll take the next groups while they poll, and after it
	// ended, from their sleep.
	t.Run("on polling lanes", func(t *testing.T) {
		for i := range 4 {
			if i == 3 {
				time.Sleep(50 * time.Millisecond)
			}
			check(t, polled[i:i+2+i%2], true)
			if want := min(3, 2+i%2, poolThreads); lastLanes() != want {
				t.Fatalf("computed on %d lanes, want %d", lastLanes(), want)
			}
		}
	})
	shared := weights(false)
	shared.Dense = true
	d, err := Backend{}.NewExpert(shared, moe.ExpertOptions{MaxBatch: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	t.Run("dense", func(t *testing.T) { check(t, []moe.Computer{es[0], d}, false) })
	t.Run("dense with lanes", func(t *testing.T) { check(t, []moe.Computer{laned[0], d}, false) })
	t.Run("twice", func(t *testing.T) {
		err := es[0].(moe.Grouper).ComputeGroup([]moe.Computer{es[0], es[0]}, [][]float32{input(1), input(1)}, []int{1, 1},
			[][]float32{make([]float32, embd), make([]float32, embd)})
		if !errors.Is(err, moe.ErrNotGroupable) {
			t.Fatalf("an expert twice in a group: %v", err)
		}
	})
	t.Run("too many rows", func(t *testing.T) {
		err := es[0].(moe.Grouper).ComputeGroup(es[:2], [][]float32{input(1), input(9)}, []int{1, 9},
			[][]float32{make([]float32, embd), make([]float32, 9*embd)})
		if err == nil || errors.Is(err, moe.ErrNotGroupable) {
			t.Fatalf("9 rows for a batch of 8: %v", err)
		}
	})
}

// Dequantize reads F32 data as it is (ggml has no routine for it: the
// lowprec fault requantizes an F32 model's experts through it), and
// agrees with the project's own decoder for F16 and Q8_0.
func TestDequantizeFloatTypes(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	x := make([]float32, 4*64)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	for _, dt := range []model.DType{model.F32, model.F16, model.Q8_0} {
		b, err := Quantize(dt, x, 64)
		if err != nil {
			t.Fatalf("%s: %v", dt, err)
		}
		got, err := Dequantize(dt, b)
		if err != nil {
			t.Fatalf("%s: %v", dt, err)
		}
		want, err := model.Decode(dt, b)
		if err != nil {
			t.Fatalf("%s: %v", dt, err)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: ggml's dequantization differs from model.Decode", dt)
		}
		if dt == model.F32 && !slices.Equal(got, x) {
			t.Fatal("F32 did not read back as written")
		}
	}
}

// A group computes with its experts' threads (ExpertOptions.Threads; the
// most any member was given), as each expert's own compute does: a node
// configured for one expert thread (expert.threads) computed its groups
// with every core. And on a threadpool of that many threads: one of every
// core woke its idle worker at each one-thread graph, for nothing.
func TestGroupComputesWithItsExpertsThreads(t *testing.T) {
	if poolThreads < 2 {
		t.Skip("one core")
	}
	const embd, ff = 64, 128
	rng := rand.New(rand.NewPCG(7, 8))
	expert := func(threads int) moe.Computer {
		w := randExpert(t, rng, embd, ff, model.Q8_0, model.Q8_0, model.Q8_0)
		e, err := Backend{}.NewExpert(w, moe.ExpertOptions{Threads: threads})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		return e
	}
	one, one2, all := expert(1), expert(1), expert(0)
	x := make([]float32, embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	for _, c := range []struct {
		name  string
		group []moe.Computer
		want  int
	}{
		{"one thread each", []moe.Computer{one, one2}, 1},
		{"one with every core", []moe.Computer{one, all}, poolThreads},
	} {
		outs := [][]float32{make([]float32, embd), make([]float32, embd)}
		if err := c.group[0].(moe.Grouper).ComputeGroup(c.group, [][]float32{x, x}, []int{1, 1}, outs); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		// on a pool of as many: ggml wakes each worker of the pool for
		// every graph, and those beyond the graph's threads would only go
		// back to sleep
		if got, pool := lastGroupThreads(); got != c.want || pool != c.want {
			t.Errorf("%s: computed with %d threads of a pool of %d, want %d of %d", c.name, got, pool, c.want, c.want)
		}
	}
}
