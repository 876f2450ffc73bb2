package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// runBench runs neurod for a benchmark (no time limit of its own but the
// benchmark's) and decodes its JSON output into v.
func runBench(b *testing.B, v any, args ...string) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, neurodBin, args...)
	cmd.Env = cleanEnv()
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("neurod %v: %v\n%s", args, err, out)
	}
	if err := json.Unmarshal(out, v); err != nil {
		b.Fatalf("neurod %v: %v\n%s", args, err, out)
	}
}

func pct(ms []float64, q float64) float64 {
	if len(ms) == 0 {
		return 0
	}
	s := slices.Clone(ms)
	slices.Sort(s)
	return testnet.Percentile(s, q)
}

// BenchmarkTestnet answers one prompt on the bench model (about 1 B
// parameters, q8_0; NEURO_BENCH_MODEL names another GGUF) with
// `neurod generate --local` and through a testnet of a gating node and 4
// expert processes on this machine, and reports tokens per second,
// per-token latency p50/p99 (decode steps: the first token, which carries
// the prompt, is left out), bytes sent per token and the dispatch overhead
// per MoE layer (the layer's wall time minus its slowest expert compute).
// The tokens must be equal. Run it once: go test ./cmd/neurod -run '^$'
// -bench Testnet -benchtime 1x -timeout 60m.
func BenchmarkTestnet(b *testing.B) {
	path := os.Getenv("NEURO_BENCH_MODEL")
	if path == "" {
		path = filepath.Join(b.TempDir(), "bench.gguf")
		o, err := exec.Command(neurodBin, "model", "make", "--preset", "bench", "--type", "q8_0", "--seed", "3", "--out", path).CombinedOutput()
		if err != nil {
			b.Fatalf("model make: %v\n%s", err, o)
		}
		b.Log(string(o))
	}
	const prompt, tokens = "The history of distributed computing", 64
	for range b.N {
		var local struct {
			Tokens          []int32   `json:"tokens"`
			TokensPerSecond float64   `json:"tokens_per_second"`
			PerTokenMs      []float64 `json:"per_token_ms"`
		}
		runBench(b, &local, "generate", "--local", path, "--prompt", prompt, "--max-tokens", fmt.Sprint(tokens), "--json")
		var net struct {
			testnetJSON
			TokensPerSecond float64 `json:"tokens_per_second"`
			ReadyMs         int64   `json:"ready_ms"`
			Stats           struct {
				BytesPerToken float64 `json:"bytes_per_token"`
				Dispatch      float64 `json:"dispatch_overhead_per_layer_us"`
				Hedges        int     `json:"hedges"`
				MoELayers     int     `json:"moe_layers"`
				MoEWallMs     float64 `json:"moe_wall_ms"`
				MoEComputeMs  float64 `json:"moe_compute_ms"`
			} `json:"stats"`
		}
		runBench(b, &net, "testnet", "--nodes", "4", "--model", path, "--prompt", prompt, "--max-tokens", fmt.Sprint(tokens),
			"--check", "--json", "--timeout", "20m")
		if fmt.Sprint(net.Tokens) != fmt.Sprint(local.Tokens) {
			b.Fatalf("testnet tokens %v differ from llama.cpp's %v", net.Tokens, local.Tokens)
		}
		b.ReportMetric(local.TokensPerSecond, "local-tok/s")
		b.ReportMetric(pct(local.PerTokenMs[1:], 0.5), "local-p50-ms")
		b.ReportMetric(pct(local.PerTokenMs[1:], 0.99), "local-p99-ms")
		b.ReportMetric(net.TokensPerSecond, "net-tok/s")
		b.ReportMetric(pct(net.PerTokenMs[1:], 0.5), "net-p50-ms")
		b.ReportMetric(pct(net.PerTokenMs[1:], 0.99), "net-p99-ms")
		b.ReportMetric(net.Stats.BytesPerToken, "bytes/token")
		b.ReportMetric(net.Stats.Dispatch, "dispatch-us/layer")
		b.ReportMetric(float64(net.Stats.Hedges), "hedges")
		b.ReportMetric(float64(net.ReadyMs), "ready-ms")
	}
}

// BenchmarkSlowNode answers the same prompt through a gating node and two
// expert nodes (each hosting every expert), first with both fast, then
// with node 1 slowed by 100 ms a compute, and reports per-token p50/p99
// and the hedges: how far hedging keeps the slow node out of the latency.
// Without hedging, every call that went to the slow node would cost at
// least 100 ms.
func BenchmarkSlowNode(b *testing.B) {
	dir := b.TempDir()
	path := filepath.Join(dir, "m.gguf")
	if o, err := exec.Command(neurodBin, "model", "make", "--preset", "tiny", "--type", "q8_0", "--seed", "23",
		"--layers", "4", "--out", path).CombinedOutput(); err != nil {
		b.Fatalf("model make: %v\n%s", err, o)
	}
	for range b.N {
		for _, slow := range []string{"", "1:100ms"} {
			var rep struct {
				testnetJSON
				Stats struct {
					Hedges int `json:"hedges"`
				} `json:"stats"`
			}
			args := []string{"testnet", "--nodes", "2", "--model", path, "--prompt", "slow and steady", "--max-tokens", "64", "--check", "--json"}
			name := "fast"
			if slow != "" {
				args = append(args, "--test-slow-node", slow)
				name = "slow"
			}
			runBench(b, &rep, args...)
			b.ReportMetric(pct(rep.PerTokenMs[1:], 0.5), name+"-p50-ms")
			b.ReportMetric(pct(rep.PerTokenMs[1:], 0.99), name+"-p99-ms")
			b.ReportMetric(slices.Max(rep.PerTokenMs[1:]), name+"-max-ms")
			b.ReportMetric(float64(rep.Stats.Hedges), name+"-hedges")
		}
	}
}

// BenchmarkHolePunchMatrix counts how often hole punching opens a direct
// connection between two homes, for each pair of NAT kinds, over
// NEURO_PUNCH_RUNS netns testnets a side (default 7): in one, the gating
// node is behind a cone NAT and six expert homes behind three cone and
// three symmetric NATs; in the other, the gating node is behind a
// symmetric NAT. The experts are spread over the expert homes (--spread),
// so the gating node opens a session to each. Every home is a fresh process with fresh NAT mappings, so
// each gating-to-expert pair is one attempt (DCUtR's own retries and the
// expert client's three punch retries included). It reports the success
// rate per pair of kinds, to set beside libp2p's published 70% ± 7% for
// the internet at large. Needs root: go test ./cmd/neurod -run '^$'
// -bench HolePunchMatrix -benchtime 1x -timeout 60m.
func BenchmarkHolePunchMatrix(b *testing.B) {
	if err := netns.Available(); err != nil {
		b.Skipf("network namespaces: %v", err)
	}
	runs := 7
	if s := os.Getenv("NEURO_PUNCH_RUNS"); s != "" {
		if _, err := fmt.Sscan(s, &runs); err != nil || runs < 1 || runs > 100 {
			b.Fatalf("NEURO_PUNCH_RUNS %q: want 1 to 100", s)
		}
	}
	path := filepath.Join(b.TempDir(), "m.gguf")
	if o, err := exec.Command(neurodBin, "model", "make", "--preset", "tiny", "--type", "q8_0", "--seed", "61", "--experts", "12", "--out", path).CombinedOutput(); err != nil {
		b.Fatalf("model make: %v\n%s", err, o)
	}
	type tally struct{ direct, relayed, total int }
	for range b.N {
		pairs := map[string]*tally{}
		for run := range runs {
			for _, nats := range []string{"cone,cone,cone,cone,symmetric,symmetric,symmetric", "symmetric,symmetric,symmetric,symmetric,cone,cone,cone"} {
				var rep testnetJSON
				runBench(b, &rep, "testnet", "--netns", "--homes", "7", "--spread", "--nat", nats, "--model", path, "--prompt", "punch through",
					"--max-tokens", "4", "--check", "--json", "--timeout", "5m")
				for _, c := range rep.Connections {
					key := c.NATs[0] + "-" + c.NATs[1]
					t := pairs[key]
					if t == nil {
						t = &tally{}
						pairs[key] = t
					}
					t.total++
					if c.Direct {
						t.direct++
					} else if c.ViaRelay {
						t.relayed++
					}
				}
				b.Logf("run %d (%s): %d connections", run+1, nats, len(rep.Connections))
			}
		}
		for key, t := range pairs {
			b.ReportMetric(100*float64(t.direct)/float64(t.total), key+"-direct-%")
			b.ReportMetric(float64(t.total), key+"-attempts")
			b.Logf("%s: %d of %d direct, %d relayed", key, t.direct, t.total, t.relayed)
		}
	}
}
