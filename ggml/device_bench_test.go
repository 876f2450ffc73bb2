package ggml

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// benchDevices are the devices of NEURO_BENCH_DEVICES (default: the CPU
// and NEURO_TEST_DEVICES), so that one run prints them side by side.
func benchDevices(b *testing.B) []Device {
	b.Helper()
	specs := os.Getenv("NEURO_BENCH_DEVICES")
	if specs == "" {
		specs = strings.Trim("cpu,"+os.Getenv("NEURO_TEST_DEVICES"), ",")
	}
	var out []Device
	for _, s := range strings.Split(specs, ",") {
		d, err := SelectDevice(s)
		if err != nil {
			b.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

// BenchmarkDeviceExpertFFN: one expert's feed-forward block on each device
// at Mixtral's size (4096x14336) and Qwen3-30B-A3B's (2048x768), in Q8_0
// and in Q4_K_M's mix (gate and up Q4_K, down Q6_K), at batch 1 and 32.
func BenchmarkDeviceExpertFFN(b *testing.B) {
	sizes := []struct {
		name     string
		embd, ff int
	}{{"mixtral", mixtralEmbd, mixtralFF}, {"qwen3-30b-a3b", 2048, 768}}
	types := []expertCase{expertCases[3], expertCases[len(expertCases)-1]}
	for _, sz := range sizes {
		for _, c := range types {
			rng := rand.New(rand.NewPCG(5, 6))
			w := randExpert(b, rng, sz.embd, sz.ff, c.gate, c.up, c.down)
			for _, dev := range benchDevices(b) {
				e, err := NewExpertOn(dev, w, moe.ExpertOptions{MaxBatch: 32})
				if err != nil {
					b.Fatal(err)
				}
				for _, batch := range []int{1, 32} {
					b.Run(fmt.Sprintf("%s/%s/%s/batch=%d", sz.name, c.name, dev.Spec(), batch), func(b *testing.B) {
						x := make([]float32, batch*sz.embd)
						for i := range x {
							x[i] = 2*rng.Float32() - 1
						}
						out := make([]float32, len(x))
						if err := e.Compute(x, batch, out); err != nil { // the first call compiles kernels
							b.Fatal(err)
						}
						b.ResetTimer()
						for range b.N {
							if err := e.Compute(x, batch, out); err != nil {
								b.Fatal(err)
							}
						}
						per := b.Elapsed().Seconds() / float64(b.N)
						b.ReportMetric(per*1e3, "ms/call")
						b.ReportMetric(2*3*float64(sz.embd*sz.ff*batch)/per/1e9, "GFLOP/s")
					})
				}
				e.Close()
			}
		}
	}
}

// BenchmarkDeviceGenerate: greedy tokens/s of the bench model
// (NEURO_BENCH_MODEL, else the bench preset generated in Q8_0) on each
// device, llama.cpp's own forward pass ("llama.cpp") beside neuro's split
// one (the gating compute and every expert on that device, in one process).
func BenchmarkDeviceGenerate(b *testing.B) {
	path := os.Getenv("NEURO_BENCH_MODEL")
	if path == "" {
		path = filepath.Join(b.TempDir(), "bench.gguf")
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := model.Generate(f, model.Presets["bench"], model.Q8_0, 5); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
	dir := filepath.Join(b.TempDir(), "shards")
	if _, err := model.Split(path, dir); err != nil {
		b.Fatal(err)
	}
	const tokens = 64
	for _, dev := range benchDevices(b) {
		b.Run("llama.cpp/"+dev.Spec(), func(b *testing.B) {
			l, err := LoadLlamaOn(dev, path)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			if _, err := l.GenerateGreedy("hello world", 4, ContextOptions{Context: 512}, false); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			n := 0
			for range b.N {
				g, err := l.GenerateGreedy("hello world", tokens, ContextOptions{Context: 512}, false)
				if err != nil {
					b.Fatal(err)
				}
				n += len(g.Tokens)
			}
			b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "tokens/s")
		})
		b.Run("split/"+dev.Spec(), func(b *testing.B) {
			sm, err := LoadSplitOn(dev, dir, cid.Undef, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sm.Close()
			if _, err := sm.GenerateGreedy(context.Background(), "hello world", 4, 512, nil, false); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			n := 0
			for range b.N {
				g, err := sm.GenerateGreedy(context.Background(), "hello world", tokens, 512, nil, false)
				if err != nil {
					b.Fatal(err)
				}
				n += len(g.Tokens)
			}
			b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}

// BenchmarkDeviceLlamaCppExpert: llama.cpp's own time for one Mixtral-size
// expert (4096x14336, Q8_0) on each device, beside neuro's: a one-layer
// model with two experts, one used per token, decoded token by token by
// llama.cpp; the same layer's gating compute alone (no experts) on the
// same device; the difference is the expert inside llama.cpp's decode.
// BenchmarkDeviceExpertFFN's mixtral/q8_0/batch=1 is neuro's figure.
func BenchmarkDeviceLlamaCppExpert(b *testing.B) {
	dir := b.TempDir()
	path := filepath.Join(dir, "m.gguf")
	p := model.Params{Layers: 1, Experts: 2, ExpertsUsed: 1, Embd: mixtralEmbd, FF: mixtralFF, Heads: 32, KVHeads: 8,
		Vocab: 512, Context: 512, RopeFreqBase: 1e6, RMSEps: 1e-5}
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if err := model.Generate(f, p, model.Q8_0, 3); err != nil {
		b.Fatal(err)
	}
	f.Close()
	res, err := model.Split(path, filepath.Join(dir, "shards"))
	if err != nil {
		b.Fatal(err)
	}
	const tokens = 64
	tok := func(i int) []int32 { return []int32{int32(3 + i%400)} }
	for _, dev := range benchDevices(b) {
		b.Run(dev.Spec(), func(b *testing.B) {
			l, err := LoadLlamaOn(dev, path)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			sm, err := LoadSplitOn(dev, filepath.Join(dir, "shards"), res.ModelCID, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer sm.Close()
			// pass decodes tokens in a fresh llama.cpp context, then forwards
			// them through the gating compute alone, and times both.
			pass := func() (local, gating time.Duration) {
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
				t0 := time.Now()
				for i := range tokens {
					if err := lc.Decode(tok(i)); err != nil {
						b.Fatal(err)
					}
				}
				local = time.Since(t0)
				t1 := time.Now()
				for i := range tokens {
					if _, err := s.Forward(context.Background(), tok(i), noExperts{embd: p.Embd}); err != nil {
						b.Fatal(err)
					}
				}
				return local, time.Since(t1)
			}
			pass() // warm up: kernels, buffers
			b.ResetTimer()
			var local, gating time.Duration
			for range b.N {
				dl, dg := pass()
				local, gating = local+dl, gating+dg
			}
			n := float64(b.N * tokens)
			b.ReportMetric(local.Seconds()*1e3/n, "llama_ms/token")
			b.ReportMetric(gating.Seconds()*1e3/n, "gating_ms/token")
			b.ReportMetric((local-gating).Seconds()*1e3/n, "llama_expert_ms")
		})
	}
}
