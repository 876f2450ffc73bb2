package ggml

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
