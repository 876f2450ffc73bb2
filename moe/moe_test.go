package moe

import (
	"bytes"
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/neuro-p2p/neuro/model"
)

// scaleExpert multiplies its input by k: an expert whose output is known.
type scaleExpert struct {
	k        float32
	embd, mb int
	calls    []int // batch sizes
	closed   bool
}

func (s *scaleExpert) Compute(x []float32, n int, out []float32) error {
	if n > s.mb {
		return errors.New("batch too big")
	}
	s.calls = append(s.calls, n)
	for i, v := range x {
		out[i] = s.k * v
	}
	return nil
}
func (s *scaleExpert) Embd() int     { return s.embd }
func (s *scaleExpert) FF() int       { return 1 }
func (s *scaleExpert) MaxBatch() int { return s.mb }
func (s *scaleExpert) Close() error  { s.closed = true; return nil }

// Three tokens, two experts each: LocalExperts routes each token to its
// experts in one batch per expert, in order of first use, and combines
// w0*f0(x) + w1*f1(x) per token, rounding each step to float32.
func TestLocalExpertsRoutesAndCombines(t *testing.T) {
	const embd, used, n = 4, 2, 3
	x := []float32{1, 2, 3, 4, -1, -2, -3, -4, 0.5, 0.25, 0.125, 1}
	selected := []int32{2, 0, 0, 1, 2, 1}
	weights := []float32{0.7, 0.3, 0.6, 0.4, 0.5, 0.5}
	ex := map[[2]int]Expert{}
	scales := map[int32]*scaleExpert{}
	for e, k := range []float32{10, 100, 1000} {
		s := &scaleExpert{k: k, embd: embd, mb: 1}
		scales[int32(e)] = s
		ex[[2]int{5, e}] = s
	}
	le := &LocalExperts{Embd: embd, Used: used, Experts: ex}
	got, err := le.MoE(context.Background(), 5, x, n, selected, weights)
	if err != nil {
		t.Fatal(err)
	}
	for tok := range n {
		for i := range embd {
			v := x[tok*embd+i]
			var want float32
			for j := range used {
				p := float32(scales[selected[tok*used+j]].k * v * weights[tok*used+j])
				if j == 0 {
					want = p
				} else {
					want = float32(want + p)
				}
			}
			if got[tok*embd+i] != want {
				t.Fatalf("token %d value %d: %v, want %v", tok, i, got[tok*embd+i], want)
			}
		}
	}
	// Expert 0 serves tokens 0 and 1 and expert 2 tokens 0 and 2: two rows
	// each, in batches of MaxBatch (1).
	if c := scales[0].calls; len(c) != 2 || c[0] != 1 {
		t.Errorf("expert 0 computed batches %v, want [1 1]", c)
	}
	r := Route(selected)
	if len(r.Experts) != 3 || r.Experts[0] != 2 || r.Experts[1] != 0 || r.Experts[2] != 1 {
		t.Errorf("experts in order of first use: %v", r.Experts)
	}
	if _, err := le.MoE(context.Background(), 6, x, n, selected, weights); err == nil || !strings.Contains(err.Error(), "no expert 6:2") {
		t.Errorf("missing expert: %v", err)
	}
	// A hosted shared expert rides as a third slot of weight 1: the result
	// is the routed sum plus its output, added last.
	sel3 := []int32{2, 0, 1, 0, 1, 1, 2, 1, 1}
	w3 := []float32{0.7, 0.3, 1, 0.6, 0.4, 1, 0.5, 0.5, 1}
	got3, err := le.MoE(context.Background(), 5, x, n, sel3, w3)
	if err != nil {
		t.Fatal(err)
	}
	for tok := range n {
		v := x[tok*embd]
		routed := float32(float32(scales[sel3[tok*3]].k*v*w3[tok*3]) + float32(scales[sel3[tok*3+1]].k*v*w3[tok*3+1]))
		if want := float32(routed + 100*v); got3[tok*embd] != want {
			t.Fatalf("token %d with the shared slot: %v, want %v", tok, got3[tok*embd], want)
		}
	}
	for _, bad := range [][2]int{{5, 5}, {6, 3}, {0, 0}} { // a partial token; weights that disagree; nothing
		if _, err := le.MoE(context.Background(), 5, x, n, make([]int32, bad[0]), make([]float32, bad[1])); err == nil {
			t.Errorf("%d experts and %d weights for %d tokens accepted", bad[0], bad[1], n)
		}
	}
	if err := le.Close(); err != nil || !scales[1].closed {
		t.Errorf("close: %v, closed %v", err, scales[1].closed)
	}
}

// Gather then Scatter puts every slot's row back where Combine reads it.
func TestGatherScatterRoundTrip(t *testing.T) {
	const embd, used = 3, 2
	x := []float32{1, 2, 3, 4, 5, 6}
	slots := []int{1, 2} // token 0's second expert, token 1's first
	in := Gather(x, slots, used, embd)
	if want := []float32{1, 2, 3, 4, 5, 6}; !equal(in, want) {
		t.Fatalf("gather %v, want %v", in, want)
	}
	outs := make([]float32, 2*used*embd)
	Scatter(outs, in, slots, embd)
	if want := []float32{0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0}; !equal(outs, want) {
		t.Fatalf("scatter %v, want %v", outs, want)
	}
}

func equal(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestArgmaxTakesFirstMaximum(t *testing.T) {
	if got := Argmax([]float32{1, 3, float32(math.Inf(-1)), 3, 2}); got != 1 {
		t.Fatalf("argmax %d, want 1", got)
	}
}

func TestExpertWeightsCheck(t *testing.T) {
	f32 := func(n int) Tensor { return Tensor{Type: model.F32, Data: make([]byte, 4*n)} }
	good := ExpertWeights{Embd: 64, FF: 32, Gate: f32(64 * 32), Up: f32(64 * 32), Down: f32(64 * 32)}
	if err := good.Check(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		edit func(*ExpertWeights)
		want string
	}{
		{"short down", func(w *ExpertWeights) { w.Down = f32(10) }, "down weights are 40 bytes"},
		{"no shape", func(w *ExpertWeights) { w.FF = 0 }, "bad shape"},
		{"unknown type", func(w *ExpertWeights) { w.Up.Type = model.DType(99) }, "up"},
		{"q8_0 rows of 48", func(w *ExpertWeights) {
			w.Embd = 48
			w.Gate = Tensor{Type: model.Q8_0, Data: make([]byte, 2*34*32)}
		}, "not a multiple of q8_0's block"},
		{"unknown activation", func(w *ExpertWeights) { w.Act = "gelu" }, `activation "gelu"`},
		{"short up bias", func(w *ExpertWeights) { w.UpBias = make([]float32, 31) }, "up bias of 31 floats, want 32"},
		{"down bias of ff", func(w *ExpertWeights) { w.DownBias = make([]float32, 32) }, "down bias of 32 floats, want 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := good
			tc.edit(&w)
			if err := w.Check(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want an error with %q", err, tc.want)
			}
		})
	}
}

// ExpertWeightsOf reads gpt-oss's expert shards whole: the three weights,
// the three biases and the activation the shard names; a shard whose bias
// is not a row of f32 or whose activation is unknown is refused.
func TestExpertWeightsOfReadsBiasesAndActivation(t *testing.T) {
	p, _ := model.Preset("gpt-oss", "tiny")
	var buf bytes.Buffer
	if err := model.GenerateArch(&buf, "gpt-oss", p, model.F16, 3); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "g.gguf")
	os.WriteFile(src, buf.Bytes(), 0o644)
	dir := t.TempDir()
	res, err := model.Split(src, dir)
	if err != nil {
		t.Fatal(err)
	}
	s, err := model.OpenShard(dir, res.Manifest.GetExperts()[1].GetShard())
	if err != nil {
		t.Fatal(err)
	}
	w, err := ExpertWeightsOf(s, 0)
	if err != nil {
		t.Fatal(err)
	}
	if w.Activation() != model.ActSwiGLUOAI || len(w.GateBias) != p.FF || len(w.UpBias) != p.FF || len(w.DownBias) != p.Embd || w.DownBias[0] == 0 {
		t.Fatalf("weights: act %q, biases %d/%d/%d", w.Act, len(w.GateBias), len(w.UpBias), len(w.DownBias))
	}
	// Rewrite the shard with an edit and read it again.
	rewrite := func(edit func(kvs []model.KV, tds []model.TensorData) ([]model.KV, []model.TensorData)) error {
		var tds []model.TensorData
		for _, ti := range s.File.Tensors {
			b, _, _ := s.TensorBytes(ti.Name)
			tds = append(tds, model.TensorData{Info: ti, Data: bytes.NewReader(b)})
		}
		kvs, tds := edit(append([]model.KV(nil), s.File.KVs...), tds)
		var out bytes.Buffer
		if err := model.Write(&out, kvs, tds); err != nil {
			return err
		}
		f, err := model.ReadFile(bytes.NewReader(out.Bytes()), int64(out.Len()))
		if err != nil {
			return err
		}
		_, err = ExpertWeightsOf(&model.Shard{File: f, Data: out.Bytes()}, 0)
		return err
	}
	if err := rewrite(func(kvs []model.KV, tds []model.TensorData) ([]model.KV, []model.TensorData) {
		for i := range kvs {
			if kvs[i].Key == model.KeyActivation {
				kvs[i].Value = "gelu"
			}
		}
		return kvs, tds
	}); err == nil || !strings.Contains(err.Error(), `activation "gelu"`) {
		t.Errorf("unknown activation: %v", err)
	}
	if err := rewrite(func(kvs []model.KV, tds []model.TensorData) ([]model.KV, []model.TensorData) {
		last := &tds[len(tds)-1] // the down bias, as f16
		last.Info.Type, last.Data = model.F16, bytes.NewReader(make([]byte, 2*p.Embd))
		return kvs, tds
	}); err == nil || !strings.Contains(err.Error(), "want a row of f32") {
		t.Errorf("an f16 bias: %v", err)
	}
}

// scaleStack is a layer of scale experts computed at once.
type scaleStack struct {
	ks     []float32
	embd   int
	calls  int
	closed bool
}

func (s *scaleStack) Experts() int { return len(s.ks) }
func (s *scaleStack) Close() error { s.closed = true; return nil }
func (s *scaleStack) ComputeLayer(x []float32, n int, selected []int32, out []float32) error {
	s.calls++
	k := len(selected) / n
	for t := range n {
		for j := range k {
			for i := range s.embd {
				out[(t*k+j)*s.embd+i] = s.ks[selected[t*k+j]] * x[t*s.embd+i]
			}
		}
	}
	return nil
}

// A layer with a stack computes in one call what the experts one by one
// give, also with a hosted shared expert (numbered after the stack's) in
// each token's last slot; Close closes the stacks.
func TestLocalExpertsLayerStack(t *testing.T) {
	const embd, n = 4, 3
	x := []float32{1, 2, 3, 4, -1, -2, -3, -4, 0.5, 0.25, 0.125, 1}
	ks := []float32{10, 100, 1000}
	one := map[[2]int]Expert{}
	for e, k := range append(ks, 7) { // expert 3 is the shared one
		one[[2]int{5, e}] = &scaleExpert{k: k, embd: embd, mb: 8}
	}
	alone := &LocalExperts{Embd: embd, Used: 2, Experts: one}
	st := &scaleStack{ks: ks, embd: embd}
	stacked := &LocalExperts{Embd: embd, Used: 2, Experts: map[[2]int]Expert{{5, 3}: one[[2]int{5, 3}]}, Layers: map[int]LayerComputer{5: st}}
	for _, c := range []struct {
		sel []int32
		w   []float32
	}{
		{[]int32{2, 0, 0, 1, 2, 1}, []float32{0.7, 0.3, 0.6, 0.4, 0.5, 0.5}},
		{[]int32{2, 0, 3, 0, 1, 3, 2, 1, 3}, []float32{0.7, 0.3, 1, 0.6, 0.4, 1, 0.5, 0.5, 1}},
	} {
		want, err := alone.MoE(context.Background(), 5, x, n, c.sel, c.w)
		if err != nil {
			t.Fatal(err)
		}
		got, err := stacked.MoE(context.Background(), 5, x, n, c.sel, c.w)
		if err != nil {
			t.Fatal(err)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("%v: value %d: %v, want %v", c.sel, i, got[i], want[i])
			}
		}
	}
	if st.calls != 2 {
		t.Errorf("the stack computed %d times, want once a layer", st.calls)
	}
	if err := stacked.Close(); err != nil || !st.closed {
		t.Errorf("close: %v, stack closed %v", err, st.closed)
	}
}
