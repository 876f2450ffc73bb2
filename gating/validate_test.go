//go:build ggml

package gating

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/reputation"
)

// The tolerance sits well above every honest difference (thread counts,
// F16 on the wire) and well below a node that computes in Q4_0 instead of
// the shard's dtype. The numbers are logged; they are in Tolerance's doc.
func TestToleranceSeparatesHonestFromCheap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, sh := range [][2]int{{64, 128}, {1024, 3584}} {
		embd, ff := sh[0], sh[1]
		w := func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.NormFloat64() * 0.05)
			}
			return x
		}
		g, u, d := w(embd*ff), w(embd*ff), w(embd*ff)
		build := func(dt model.DType, threads int) *ggml.Expert {
			t.Helper()
			gq, err1 := ggml.Quantize(dt, g, embd)
			uq, err2 := ggml.Quantize(dt, u, embd)
			dq, err3 := ggml.Quantize(dt, d, ff)
			if err1 != nil || err2 != nil || err3 != nil {
				t.Fatal(err1, err2, err3)
			}
			e, err := ggml.NewExpert(moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: dt, Data: gq},
				Up: moe.Tensor{Type: dt, Data: uq}, Down: moe.Tensor{Type: dt, Data: dq}}, moe.ExpertOptions{Threads: threads})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.Close() })
			return e
		}
		x := make([]float32, 4*embd)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		out := func(e *ggml.Expert) []float32 {
			o := make([]float32, len(x))
			if err := e.Compute(x, 4, o); err != nil {
				t.Fatal(err)
			}
			return o
		}
		for _, dt := range []model.DType{model.Q8_0, model.F16} {
			ref := out(build(dt, 1))
			threads := RelL2(out(build(dt, 2)), ref)
			f16 := make([]float32, len(ref))
			for i, v := range ref {
				f16[i] = model.Float16ToFloat32(model.Float32ToFloat16(v))
			}
			wire := RelL2(f16, ref)
			cheap := RelL2(out(build(model.Q4_0, 1)), ref)
			t.Logf("%dx%d %s: threads 1 vs 2 %.3g, F16 on the wire %.3g, Q4_0 %.3g (tolerance %g)", embd, ff, dt, threads, wire, cheap, Tolerance)
			if threads > Tolerance/100 || wire > Tolerance/10 || cheap < 5*Tolerance {
				t.Fatalf("%s: honest %.3g/%.3g or cheap %.3g too close to the tolerance %g", dt, threads, wire, cheap, Tolerance)
			}
		}
	}
}

// With one expert node of five wrong (20%) or computing in Q4_0, every
// generation still equals llama.cpp's: the gating node checks new peers'
// results, rewinds past a wrong one, and excludes the liar within a few
// of its results, while no honest node is ever excluded.
func TestLiarsAreCaughtAndAnswersStayRight(t *testing.T) {
	for _, fault := range []expert.Fault{expert.FaultWrong, expert.FaultLowPrec} {
		t.Run(string(fault), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
			defer cancel()
			p := model.Presets["tiny"]
			specs := []string{"0:*,1:*", "0:*,1:*", "0:*,1:*", "0:*,1:*", "0:*,1:*"}
			xn := newFaultyNet(t, ctx, p, model.Q8_0, 91, specs, map[int]expert.Fault{2: fault})
			liar := xn.hosts[3].ID()
			book, err := reputation.Open(reputation.Config{})
			if err != nil {
				t.Fatal(err)
			}
			eng, err := NewEngine(xn.hosts[0], xn.origin, EngineConfig{Threads: 1, Book: book, Compute: ggml.Backend{}}, quiet())
			if err != nil {
				t.Fatal(err)
			}
			defer eng.Close()
			if err := eng.Start(ctx); err != nil {
				t.Fatal(err)
			}
			eng.Serve(xn.model)
			for {
				ms := eng.Models()
				if len(ms) == 1 && ms[0].Ready && ms[0].MinProviders >= len(specs) {
					break
				}
				select {
				case <-ctx.Done():
					t.Fatalf("not ready: %+v", ms)
				case <-time.After(100 * time.Millisecond):
				}
			}
			c, err := client.New(ctx, client.WithGatingNodes(xn.addr(0)), client.WithLogger(quiet()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rewinds := 0
			for i := range 6 {
				prompt := fmt.Sprintf("request %d asks the experts", i)
				want := xn.reference(t, prompt, 16)
				s, err := c.Generate(ctx, client.Request{Model: xn.model, Prompt: prompt, MaxTokens: 16})
				if err != nil {
					t.Fatal(err)
				}
				toks, done, err := s.Collect()
				if err != nil {
					t.Fatal(err)
				}
				rewinds += int(done.Stats.GetRewinds())
				if got := tokenIDs(toks); fmt.Sprint(got) != fmt.Sprint(want.Tokens) || done.Text != want.Text {
					t.Fatalf("request %d: tokens %v, llama.cpp %v", i, got, want.Tokens)
				}
			}
			eng.Validator().Wait()
			var liarRec *reputation.Entry
			for _, e := range book.Snapshot() {
				if e.Peer == liar {
					liarRec = &e
					continue
				}
				if e.Excluded || e.Failed > 0 {
					t.Errorf("honest peer %s: excluded %v, %d of %d checks failed", e.Peer, e.Excluded, e.Failed, e.Checked)
				}
			}
			if liarRec == nil || !liarRec.Excluded || liarRec.ExcludedAt == 0 || liarRec.ExcludedAt > 2 {
				t.Fatalf("liar: %+v", liarRec)
			}
			calls, checks, wrong := eng.Validator().Stats()
			t.Logf("%s: liar excluded at its checked result %d (%d of %d checks failed in all); %d rewinds; %d calls, %d checks, %d wrong",
				fault, liarRec.ExcludedAt, liarRec.Failed, liarRec.Checked, rewinds, calls, checks, wrong)
		})
	}
}
