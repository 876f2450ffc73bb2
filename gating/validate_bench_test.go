//go:build ggml

package gating

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/reputation"
)

// validationRun answers requests prompts of 32 tokens through a gating node
// and experts expert nodes, of which the last liars are `wrong`, and
// returns the book, the validator's counts, the decode latencies and how
// many answers differed from llama.cpp's.
func validationRun(b *testing.B, experts, liars, requests int, validate bool) (book *reputation.Book, calls, checks int64, lat []float64, mismatches int, liarIDs map[string]bool, lateShare float64) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	specs := make([]string, experts)
	faults := map[int]expert.Fault{}
	for i := range specs {
		specs[i] = "0:*,1:*"
		if i >= experts-liars {
			faults[i] = expert.FaultWrong
		}
	}
	xn := newFaultyNet(b, ctx, model.Presets["tiny"], model.Q8_0, 5150, specs, faults)
	liarIDs = map[string]bool{}
	for i := range faults {
		liarIDs[xn.hosts[i+1].ID().String()] = true
	}
	book, _ = reputation.Open(reputation.Config{})
	cfg := EngineConfig{Threads: 1, Compute: ggml.Backend{}}
	if validate {
		cfg.Book = book
	}
	eng, err := NewEngine(xn.hosts[0], xn.origin, cfg, quiet())
	if err != nil {
		b.Fatal(err)
	}
	defer eng.Close()
	if err := eng.Start(ctx); err != nil {
		b.Fatal(err)
	}
	eng.Serve(xn.model)
	for {
		ms := eng.Models()
		if len(ms) == 1 && ms[0].Ready && ms[0].MinProviders >= experts {
			break
		}
		select {
		case <-ctx.Done():
			b.Fatal("not ready")
		case <-time.After(100 * time.Millisecond):
		}
	}
	c, err := client.New(ctx, client.WithGatingNodes(xn.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	prompts := 8
	want := map[int]string{}
	for i := range prompts {
		want[i] = fmt.Sprint(xn.reference(b, fmt.Sprintf("prompt number %d of the workload", i), 32).Tokens)
	}
	var midCalls, midChecks int64
	for r := range requests {
		if r == requests/2 && eng.Validator() != nil {
			eng.Validator().Wait()
			midCalls, midChecks, _ = eng.Validator().Stats()
		}
		s, err := c.Generate(ctx, client.Request{Model: xn.model, Prompt: fmt.Sprintf("prompt number %d of the workload", r%prompts), MaxTokens: 32})
		if err != nil {
			b.Fatal(err)
		}
		toks, _, err := s.Collect()
		if err != nil {
			b.Fatal(err)
		}
		if fmt.Sprint(tokenIDs(toks)) != want[r%prompts] {
			mismatches++
		}
		for _, tk := range toks[1:] {
			lat = append(lat, float64(tk.Latency.Microseconds())/1000)
		}
	}
	if v := eng.Validator(); v != nil {
		v.Wait()
		calls, checks, _ = v.Stats()
		lateShare = float64(checks-midChecks) / float64(max(calls-midCalls, 1))
	}
	return book, calls, checks, lat, mismatches, liarIDs, lateShare
}

// BenchmarkValidation measures the trust figures: for 5%, 10%, 20% and
// 40% wrong expert nodes of 20, the share of liars excluded, how many of
// a liar's results were checked until it was excluded, false accusations
// of honest peers, the share of extra calls spent on checks (overall and
// over the last half of the workload, once peers are trusted), and the
// per-token latency against the same workload without validation.
// go test ./gating -run '^$' -bench Validation -benchtime 1x -timeout 60m
func BenchmarkValidation(b *testing.B) {
	const experts, requests = 20, 60
	for _, liars := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("liars=%d%%", liars*100/experts), func(b *testing.B) {
			for range b.N {
				book, calls, checks, lat, mismatches, liarIDs, late := validationRun(b, experts, liars, requests, true)
				caught, worst, honestChecked, honestFailed := 0, uint64(0), uint64(0), uint64(0)
				var sum uint64
				for _, e := range book.Snapshot() {
					if liarIDs[e.Peer.String()] {
						if e.Excluded || e.ExcludedAt > 0 {
							caught++
							sum += e.ExcludedAt
							worst = max(worst, e.ExcludedAt)
						}
						continue
					}
					honestChecked += e.Checked
					honestFailed += e.Failed
				}
				slices.Sort(lat)
				b.ReportMetric(float64(caught)/float64(liars), "detected")
				b.ReportMetric(float64(sum)/float64(max(caught, 1)), "checks-to-exclusion")
				b.ReportMetric(float64(worst), "max-checks-to-exclusion")
				b.ReportMetric(float64(honestFailed), "honest-accused")
				b.ReportMetric(float64(honestChecked), "honest-checked")
				b.ReportMetric(float64(checks)/float64(max(calls, 1)), "check-share")
				b.ReportMetric(late, "late-check-share")
				b.ReportMetric(float64(mismatches), "wrong-answers")
				b.ReportMetric(lat[len(lat)/2], "p50-ms")
				b.ReportMetric(lat[len(lat)*99/100], "p99-ms")
			}
		})
	}
	b.Run("no-validation", func(b *testing.B) {
		for range b.N {
			_, _, _, lat, _, _, _ := validationRun(b, experts, 0, requests, false)
			slices.Sort(lat)
			b.ReportMetric(lat[len(lat)/2], "p50-ms")
			b.ReportMetric(lat[len(lat)*99/100], "p99-ms")
		}
	})
}

// BenchmarkFalseAccusations runs an honest network through a workload in
// which its peers' results are checked over 10,000 times and reports how many were found wrong
// (target: none), and the share of calls spent on checks once trusted.
func BenchmarkFalseAccusations(b *testing.B) {
	for range b.N {
		book, calls, checks, _, mismatches, _, late := validationRun(b, 6, 0, 800, true)
		var checked, failed uint64
		for _, e := range book.Snapshot() {
			checked += e.Checked
			failed += e.Failed
		}
		b.ReportMetric(float64(checked), "checked")
		b.ReportMetric(float64(failed), "accused")
		b.ReportMetric(float64(checks)/float64(max(calls, 1)), "check-share")
		b.ReportMetric(late, "late-check-share")
		b.ReportMetric(float64(mismatches), "wrong-answers")
	}
}
