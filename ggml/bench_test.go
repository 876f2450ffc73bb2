package ggml

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Mixtral 8x7B's expert shape.
const mixtralEmbd, mixtralFF = 4096, 14336

// BenchmarkExpertFFN measures one expert's feed-forward block at Mixtral
// size, as an expert node computes it: ms per call and effective GFLOP/s
// (2 x 3 x embd x ff x batch).
func BenchmarkExpertFFN(b *testing.B) {
	for _, dt := range []model.DType{model.Q4_0, model.Q8_0} {
		rng := rand.New(rand.NewPCG(1, 2))
		gate, _ := randWeights(b, rng, dt, mixtralEmbd*mixtralFF, 0.02)
		up, _ := randWeights(b, rng, dt, mixtralEmbd*mixtralFF, 0.02)
		down, _ := randWeights(b, rng, dt, mixtralEmbd*mixtralFF, 0.02)
		e, err := newExpert(dt, mixtralEmbd, mixtralFF, gate, up, down, moe.ExpertOptions{MaxBatch: 32})
		if err != nil {
			b.Fatal(err)
		}
		for _, batch := range []int{1, 32} {
			b.Run(fmt.Sprintf("%s/batch=%d", dt, batch), func(b *testing.B) {
				x := make([]float32, batch*mixtralEmbd)
				for i := range x {
					x[i] = 2*rng.Float32() - 1
				}
				out := make([]float32, len(x))
				b.ResetTimer()
				for range b.N {
					if err := e.Compute(x, batch, out); err != nil {
						b.Fatal(err)
					}
				}
				per := b.Elapsed().Seconds() / float64(b.N)
				b.ReportMetric(per*1e3, "ms/call")
				b.ReportMetric(2*3*mixtralEmbd*mixtralFF*float64(batch)/per/1e9, "GFLOP/s")
			})
		}
		e.Close()
	}
}

// BenchmarkLlamaCppExpertMatmul puts the same expert matmul inside
// llama.cpp's own full-model evaluation: a one-layer model with
// Mixtral-size experts and top-1 routing, decoded one token at a time by
// llama_decode. Everything but the expert (embedding, attention, router,
// output head) is timed through the gating compute, which reproduces
// llama.cpp's arithmetic; the difference is llama.cpp's time for the
// expert: expert_ms.
func BenchmarkLlamaCppExpertMatmul(b *testing.B) {
	for _, dt := range []model.DType{model.Q4_0, model.Q8_0} {
		b.Run(dt.String(), func(b *testing.B) {
			dir := b.TempDir()
			path := filepath.Join(dir, "m.gguf")
			p := model.Params{Layers: 1, Experts: 2, ExpertsUsed: 1, Embd: mixtralEmbd, FF: mixtralFF, Heads: 32, KVHeads: 8,
				Vocab: 512, Context: 512, RopeFreqBase: 1e6, RMSEps: 1e-5}
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			if err := model.Generate(f, p, dt, 3); err != nil {
				b.Fatal(err)
			}
			f.Close()
			l, err := LoadLlama(path)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			res, err := model.Split(path, filepath.Join(dir, "shards"))
			if err != nil {
				b.Fatal(err)
			}
			os.Remove(path) // keep the disk use down; llama.cpp has it mapped
			sm, err := LoadSplit(filepath.Join(dir, "shards"), res.ModelCID, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sm.Close()
			lc, err := l.NewContext(ContextOptions{Context: 512})
			if err != nil {
				b.Fatal(err)
			}
			defer lc.Close()
			s, err := sm.Gating.NewSession(512)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			// Each engine runs alone: their threadpools would fight for the
			// cores if the two were interleaved.
			if b.N > 500 {
				b.Fatal("context full: use -benchtime 500x or less")
			}
			tok := func(i int) []int32 { return []int32{int32(3 + i%400)} }
			b.ResetTimer()
			t0 := time.Now()
			for i := range b.N {
				if err := lc.Decode(tok(i)); err != nil {
					b.Fatal(err)
				}
			}
			local := time.Since(t0)
			t1 := time.Now()
			for i := range b.N {
				if _, err := s.Forward(context.Background(), tok(i), &zeroExperts{embd: p.Embd}); err != nil {
					b.Fatal(err)
				}
			}
			gating := time.Since(t1)
			n := float64(b.N)
			b.ReportMetric(float64(local.Microseconds())/n/1e3, "llama_ms/token")
			b.ReportMetric(float64(gating.Microseconds())/n/1e3, "gating_ms/token")
			b.ReportMetric(float64((local-gating).Microseconds())/n/1e3, "expert_ms")
		})
	}
}

// BenchmarkGenerate compares tokens per second of llama.cpp's own forward
// pass with the split forward pass (gating compute + in-process experts)
// on a model of the bench preset's shape with fewer layers (NEURO_BENCH_MODEL
// names a GGUF to use instead, e.g. `neurod model make --preset bench`).
// The two run in turns, alternating which goes first, so that a machine
// whose speed drifts during the run slows both alike; it reports each
// one's median tokens/s and split ÷ local of the medians, and checks that
// both generated the same tokens.
func BenchmarkGenerate(b *testing.B) {
	path := benchModel(b)
	dir := filepath.Join(b.TempDir(), "shards")
	if _, err := model.Split(path, dir); err != nil {
		b.Fatal(err)
	}
	const tokens = 64
	l, err := LoadLlama(path)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	sm, err := LoadSplit(dir, cid.Undef, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer sm.Close()
	local := func() ([]int32, time.Duration) {
		t0 := time.Now()
		g, err := l.GenerateGreedy("hello world", tokens, ContextOptions{}, false)
		if err != nil {
			b.Fatal(err)
		}
		return g.Tokens, time.Since(t0)
	}
	split := func() ([]int32, time.Duration) {
		t0 := time.Now()
		g, err := sm.GenerateGreedy(context.Background(), "hello world", tokens, 0, nil, false)
		if err != nil {
			b.Fatal(err)
		}
		return g.Tokens, time.Since(t0)
	}
	var tl, ts []time.Duration
	b.ResetTimer()
	for i := range b.N {
		var lt, st []int32
		var ld, sd time.Duration
		if i%2 == 0 {
			lt, ld = local()
			st, sd = split()
		} else {
			st, sd = split()
			lt, ld = local()
		}
		if !slices.Equal(lt, st) {
			b.Fatalf("split generated %v, llama.cpp %v", st, lt)
		}
		tl, ts = append(tl, ld), append(ts, sd)
	}
	ml, ms := median(tl), median(ts)
	b.ReportMetric(tokens/ml.Seconds(), "local_tokens/s")
	b.ReportMetric(tokens/ms.Seconds(), "split_tokens/s")
	b.ReportMetric(ml.Seconds()/ms.Seconds(), "split/local")
}

// benchModel is NEURO_BENCH_MODEL, or a model of the bench preset's shape
// with 4 layers generated for b.
func benchModel(b *testing.B) string {
	if path := os.Getenv("NEURO_BENCH_MODEL"); path != "" {
		return path
	}
	path := filepath.Join(b.TempDir(), "m.gguf")
	p := model.Presets["bench"]
	p.Layers = 4
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := model.Generate(f, p, model.Q8_0, 5); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	return path
}

// median returns the middle of ds (the mean of the middle two for an even
// count).
func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// BenchmarkExpertGroup: one token through 2 of a layer's 8 experts at the
// bench model's shape (embd 1024, ff 3584, Q8_0), as an expert node
// computes a layer's calls: each expert in a graph of its own (separate),
// both in one graph (group: one request per node and layer), both in one
// graph on one thread (group-1thread), each on a lane of one thread of its
// own at the same time (lanes), and as llama.cpp does, one expert-indexed
// product over a stack of all 8 (stack); µs per layer. The -gap and -wait
// runs leave time between layers, as a decode step does.
func BenchmarkExpertGroup(b *testing.B) {
	const embd, ff, n = 1024, 3584, 8
	rng := rand.New(rand.NewPCG(1, 2))
	ws := make([]moe.ExpertWeights, n)
	es, one, laned, polled := make([]moe.Expert, n), make([]moe.Expert, n), make([]moe.Expert, n), make([]moe.Expert, n)
	for i := range ws {
		g, _ := randWeights(b, rng, model.Q8_0, embd*ff, 0.02)
		u, _ := randWeights(b, rng, model.Q8_0, embd*ff, 0.02)
		d, _ := randWeights(b, rng, model.Q8_0, embd*ff, 0.02)
		ws[i] = moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q8_0, Data: g},
			Up: moe.Tensor{Type: model.Q8_0, Data: u}, Down: moe.Tensor{Type: model.Q8_0, Data: d}}
		for _, c := range []struct {
			to []moe.Expert
			o  moe.ExpertOptions
		}{{es, moe.ExpertOptions{}}, {one, moe.ExpertOptions{Threads: 1}}, {laned, moe.ExpertOptions{Threads: 1, Lanes: 2}},
			{polled, moe.ExpertOptions{Threads: 1, Lanes: 2, LanePoll: 2 * time.Millisecond}}} {
			e, err := Backend{}.NewExpert(ws[i], c.o)
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			c.to[i] = e
		}
	}
	st, err := NewStack(Device{}, ws, 2, moe.ExpertOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	x := make([]float32, embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	o1, o2, o12 := make([]float32, embd), make([]float32, embd), make([]float32, 2*embd)
	// the experts of consecutive layers differ: cycle through the stack
	pair := func(i int) (int, int) { return i % (n / 2), n/2 + i%(n/2) }
	// group computes a layer's pair of experts, made with one of the
	// options above, as one group
	group := func(on []moe.Expert) func(i int) error {
		return func(i int) error {
			a, z := pair(i)
			return moe.ComputeGroup([]moe.Computer{on[a], on[z]}, [][]float32{x, x}, []int{1, 1}, [][]float32{o1, o2})
		}
	}
	for _, c := range []struct {
		name string
		run  func(i int) error
	}{
		{"separate", func(i int) error {
			a, z := pair(i)
			if err := es[a].Compute(x, 1, o1); err != nil {
				return err
			}
			return es[z].Compute(x, 1, o2)
		}},
		{"group", group(es)},
		{"group-1thread", group(one)},
		{"lanes", group(laned)},
		// lanes that poll 2 ms for the next group (expert.lane_poll_us's
		// default)
		{"lanes-poll", group(polled)},
		{"stack", func(i int) error {
			a, z := pair(i)
			return st.ComputeLayer(x, 1, []int32{int32(a), int32(z)}, o12)
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			for i := range b.N {
				if err := c.run(i); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "us/layer")
		})
	}
	// As in a decode step, the next layer's experts come a millisecond
	// after the last (the gating node's attention, here this thread's
	// spinning): idle lane threads have gone to sleep unless they poll.
	// us/layer counts the experts' compute only.
	for _, c := range []struct {
		name string
		run  func(i int) error
	}{{"lanes-gap", group(laned)}, {"lanes-poll-gap", group(polled)}} {
		b.Run(c.name, func(b *testing.B) {
			var took time.Duration
			for i := range b.N {
				for t := time.Now(); time.Since(t) < time.Millisecond; {
				}
				start := time.Now()
				if err := c.run(i); err != nil {
					b.Fatal(err)
				}
				took += time.Since(start)
			}
			b.ReportMetric(float64(took.Microseconds())/float64(b.N), "us/layer")
		})
	}
	// An expert node whose callers are on other machines: between a
	// layer's group and the next, its cores idle (here a sleep of 1 ms).
	// A group of every core's threads in one graph, its idle threads
	// sleeping at once (polling level 0) or spinning about 4 ms (1,
	// home.compute_poll's default).
	defer SetPolling(Polling())
	for _, poll := range []int{0, 1} {
		b.Run(fmt.Sprintf("group-wait-poll%d", poll), func(b *testing.B) {
			SetPolling(poll)
			on := make([]moe.Expert, n)
			for i := range on {
				e, err := Backend{}.NewExpert(ws[i], moe.ExpertOptions{})
				if err != nil {
					b.Fatal(err)
				}
				defer e.Close()
				on[i] = e
			}
			run := group(on)
			var took time.Duration
			b.ResetTimer()
			for i := range b.N {
				time.Sleep(time.Millisecond)
				start := time.Now()
				if err := run(i); err != nil {
					b.Fatal(err)
				}
				took += time.Since(start)
			}
			b.ReportMetric(float64(took.Microseconds())/float64(b.N), "us/layer")
		})
	}
}

// zeroExperts answers every MoE call with zeros, to time the gating
// compute alone; after wait, if set, as experts on another machine answer
// after the network and their compute (the gating node's cores idle
// meanwhile).
type zeroExperts struct {
	embd int
	wait time.Duration
	took time.Duration // in MoE calls, waits included
}

func (w *zeroExperts) MoE(_ context.Context, _ int, _ []float32, n int, _ []int32, _ []float32) ([]float32, error) {
	start := time.Now()
	if w.wait > 0 {
		time.Sleep(w.wait)
	}
	w.took += time.Since(start)
	return make([]float32, n*w.embd), nil
}

// BenchmarkGatingAfterWait times a gating node's own compute (attention,
// routers, head) per token when each MoE layer's experts answer after a
// wait (none, a LAN round trip with an expert's compute, a longer one), on
// one thread and on every core with the threadpool's idle workers sleeping
// at once (polling level 0) or spinning about 4 ms first (1; ggml's
// default is 50): gating_ms/token leaves the waits out. A worker that
// slept wakes on a core that went idle, and on a virtual machine that
// takes long enough to undo what a second thread gains (home.compute_poll).
// The model is the bench preset's shape with 4 layers (NEURO_BENCH_MODEL
// for another).
func BenchmarkGatingAfterWait(b *testing.B) {
	_, gs, hp := splitGating(b, benchModel(b))
	defer SetPolling(Polling())
	cores := runtime.NumCPU()
	for _, wait := range []time.Duration{0, 300 * time.Microsecond, 1500 * time.Microsecond} {
		for _, c := range []struct {
			threads, poll int
		}{{1, 0}, {cores, 0}, {cores, 1}} {
			b.Run(fmt.Sprintf("wait=%v/threads=%d/poll=%d", wait, c.threads, c.poll), func(b *testing.B) {
				// A pool keeps the level it was made with: the gating
				// loaded after SetPolling computes on a pool of this one.
				SetPolling(c.poll)
				g, err := NewGating(hp, gs, c.threads)
				if err != nil {
					b.Fatal(err)
				}
				defer g.Close()
				s, err := g.NewSession(512)
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				w := &zeroExperts{embd: hp.Embd, wait: wait}
				if _, err := s.Forward(context.Background(), []int32{1, 2, 3, 4}, w); err != nil {
					b.Fatal(err)
				}
				if b.N > 400 {
					b.Fatal("context full: use -benchtime 400x or less")
				}
				w.took = 0
				b.ResetTimer()
				for i := range b.N {
					if _, err := s.Forward(context.Background(), []int32{int32(5 + i)}, w); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64((b.Elapsed()-w.took).Microseconds())/float64(b.N)/1e3, "gating_ms/token")
			})
		}
	}
}
