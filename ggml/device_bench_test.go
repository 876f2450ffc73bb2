package ggml

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
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
// and in Q4_K_M's mix (gate and up Q4_K, down Q6_K), and at gpt-oss-120b's
// (2880x2880) in MXFP4, at batch 1 and 32.
func BenchmarkDeviceExpertFFN(b *testing.B) {
	sizes := []struct {
		name     string
		embd, ff int
		types    []string
	}{{"mixtral", mixtralEmbd, mixtralFF, []string{"q8_0", "q4_k_m"}}, {"qwen3-30b-a3b", 2048, 768, []string{"q8_0", "q4_k_m"}},
		{"gpt-oss-120b", 2880, 2880, []string{"mxfp4"}}}
	for _, sz := range sizes {
		for _, c := range expertCases {
			if !slices.Contains(sz.types, c.name) {
				continue
			}
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

// BenchmarkDeviceLlamaCppExpert: llama.cpp's own time for one expert, on
// each device, beside neuro's (BenchmarkDeviceExpertFFN). Two one-expert
// models that differ only in the expert's size (the real one, and 32 wide)
// are decoded by llama.cpp in batches of 1 and of 32 tokens; the difference
// per batch is the expert inside llama.cpp's decode, every fixed cost of a
// decode cancelling out. Both layers compute the expert at the batch's size
// but the last, which keeps only the last token's row (llama.cpp's output
// rows), so a batch of 1 holds two experts at batch 1 and a batch of 32 one
// at 32 and one at 1. Sizes: Mixtral (4096x14336, Q8_0), Qwen3-30B-A3B
// (2048x768, Q8_0), gpt-oss-120b (2880x2880, MXFP4 through llama.cpp's
// quantizer).
func BenchmarkDeviceLlamaCppExpert(b *testing.B) {
	for _, sz := range []struct {
		name            string
		embd, ff, heads int
		typ             string
	}{{"mixtral", mixtralEmbd, mixtralFF, 32, "q8_0"}, {"qwen3-30b-a3b", 2048, 768, 16, "q8_0"}, {"gpt-oss-120b", 2880, 2880, 24, "mxfp4"}} {
		dir := b.TempDir()
		var paths [2]string
		for i, ff := range []int{sz.ff, 32} {
			p := model.Params{Layers: 2, Experts: 1, ExpertsUsed: 1, Embd: sz.embd, FF: ff, Heads: sz.heads, KVHeads: 8,
				Vocab: 512, Context: 512, RopeFreqBase: 1e6, RMSEps: 1e-5}
			paths[i] = filepath.Join(dir, fmt.Sprintf("m%d.gguf", i))
			f, err := os.Create(paths[i])
			if err != nil {
				b.Fatal(err)
			}
			gen := model.Q8_0
			if sz.typ != "q8_0" {
				gen = model.F16
			}
			if err := model.Generate(f, p, gen, 3); err != nil {
				b.Fatal(err)
			}
			f.Close()
			if sz.typ != "q8_0" {
				q := filepath.Join(dir, fmt.Sprintf("q%d.gguf", i))
				if err := QuantizeModel(paths[i], q, sz.typ, 0); err != nil {
					b.Fatal(err)
				}
				paths[i] = q
			}
		}
		for _, dev := range benchDevices(b) {
			b.Run(fmt.Sprintf("%s/%s/%s", sz.name, sz.typ, dev.Spec()), func(b *testing.B) {
				benchLlamaCppExpert(b, dev, paths)
			})
		}
	}
}

// benchLlamaCppExpert decodes batches of 1 and of 32 tokens with the model
// of the real expert (paths[0]) and of the narrow one (paths[1]), and
// reports the expert's time inside llama.cpp at batch 1 and at batch 32.
func benchLlamaCppExpert(b *testing.B, dev Device, paths [2]string) {
	var ls [2]*Llama
	for i, p := range paths {
		l, err := LoadLlamaOn(dev, p)
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		ls[i] = l
	}
	const batches = 8
	// decode times 8 batches of batch tokens in a fresh context of l, after
	// one untimed token (a context's first decode allocates).
	decode := func(l *Llama, batch int) time.Duration {
		lc, err := l.NewContext(ContextOptions{Context: 512})
		if err != nil {
			b.Fatal(err)
		}
		defer lc.Close()
		if err := lc.Decode([]int32{3}); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		for i := range batches {
			toks := make([]int32, batch)
			for j := range toks {
				toks[j] = int32(3 + (i*batch+j)%400)
			}
			if err := lc.Decode(toks); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(t0) / batches
	}
	pass := func(batch int) time.Duration { return decode(ls[0], batch) - decode(ls[1], batch) }
	pass(1) // warm up
	pass(32)
	b.ResetTimer()
	var one, many time.Duration
	for range b.N {
		one += pass(1)
		many += pass(32)
	}
	e1 := one.Seconds() * 1e3 / float64(b.N) / 2 // two experts at batch 1
	e32 := many.Seconds()*1e3/float64(b.N) - e1  // one at 32, one at 1
	b.ReportMetric(e1, "llama_expert_ms_b1")
	b.ReportMetric(e32, "llama_expert_ms_b32")
}
