package ggml

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/reputation"
)

// The device tests run on the devices NEURO_TEST_DEVICES names
// (comma-separated --device values: vulkan:0, cuda:0). `make test` sets it
// to vulkan:0 on Mesa's lavapipe; scripts/gpu-check.sh to cuda:0 and
// vulkan:0 on an NVIDIA machine. A named device that is missing fails the
// test: it never falls back to the CPU.
func testDevices(t *testing.T) []Device {
	t.Helper()
	v := os.Getenv("NEURO_TEST_DEVICES")
	if v == "" {
		t.Skip("NEURO_TEST_DEVICES is not set")
	}
	var out []Device
	for _, spec := range strings.Split(v, ",") {
		d, err := SelectDevice(spec)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

// expertCase is one expert's type mix.
type expertCase struct {
	name           string
	gate, up, down model.DType
	cheaper        model.DType // a cheaper type a dishonest node might compute with instead
	family         bool        // one per type family: the default set (lavapipe's first use of a shader compiles for a minute)
}

var expertCases = []expertCase{
	{name: "f32", gate: model.F32, up: model.F32, down: model.F32, cheaper: model.Q8_0},
	{name: "f16", gate: model.F16, up: model.F16, down: model.F16, cheaper: model.Q4_0, family: true},
	{name: "bf16", gate: model.BF16, up: model.BF16, down: model.BF16, cheaper: model.Q4_0},
	{name: "q8_0", gate: model.Q8_0, up: model.Q8_0, down: model.Q8_0, cheaper: model.Q4_0, family: true},
	{name: "q4_0", gate: model.Q4_0, up: model.Q4_0, down: model.Q4_0, cheaper: model.Q2_K},
	{name: "q4_1", gate: model.Q4_1, up: model.Q4_1, down: model.Q4_1, cheaper: model.Q2_K},
	{name: "q5_0", gate: model.Q5_0, up: model.Q5_0, down: model.Q5_0, cheaper: model.Q2_K},
	{name: "q5_1", gate: model.Q5_1, up: model.Q5_1, down: model.Q5_1, cheaper: model.Q2_K},
	{name: "q2_k", gate: model.Q2_K, up: model.Q2_K, down: model.Q2_K},
	{name: "q3_k", gate: model.Q3_K, up: model.Q3_K, down: model.Q3_K, cheaper: model.Q2_K},
	{name: "q4_k", gate: model.Q4_K, up: model.Q4_K, down: model.Q4_K, cheaper: model.Q2_K},
	{name: "q5_k", gate: model.Q5_K, up: model.Q5_K, down: model.Q5_K, cheaper: model.Q2_K},
	{name: "q6_k", gate: model.Q6_K, up: model.Q6_K, down: model.Q6_K, cheaper: model.Q3_K},
	{name: "q4_k_m", gate: model.Q4_K, up: model.Q4_K, down: model.Q6_K, cheaper: model.Q2_K, family: true},
	{name: "iq4_nl", gate: model.IQ4_NL, up: model.IQ4_NL, down: model.IQ4_NL, cheaper: model.Q2_K},
	{name: "iq4_xs", gate: model.IQ4_XS, up: model.IQ4_XS, down: model.IQ4_XS, cheaper: model.Q2_K},
	{name: "iq3_s", gate: model.IQ3_S, up: model.IQ3_S, down: model.IQ3_S, cheaper: model.Q2_K},
	{name: "iq3_xxs", gate: model.IQ3_XXS, up: model.IQ3_XXS, down: model.IQ3_XXS, cheaper: model.Q2_K},
	// TQ1_0 and TQ2_0 hold the same ternary values, packed differently.
	{name: "tq2_0", gate: model.TQ2_0, up: model.TQ2_0, down: model.TQ2_0},
	{name: "tq1_0", gate: model.TQ1_0, up: model.TQ1_0, down: model.TQ1_0},
	{name: "mxfp4", gate: model.MXFP4, up: model.MXFP4, down: model.MXFP4, cheaper: model.Q2_K},
}

// deviceCases are the cases of NEURO_TEST_TYPES: "all", or by default one
// per type family.
func deviceCases() []expertCase {
	all := os.Getenv("NEURO_TEST_TYPES") == "all"
	var out []expertCase
	for _, c := range expertCases {
		if all || c.family {
			out = append(out, c)
		}
	}
	return out
}

// randExpert is an expert of the given types with weights uniform in ±0.1.
func randExpert(t testing.TB, rng *rand.Rand, embd, ff int, gate, up, down model.DType) moe.ExpertWeights {
	t.Helper()
	enc := func(dt model.DType, rows, rowLen int) moe.Tensor {
		x := make([]float32, rows*rowLen)
		for i := range x {
			x[i] = 0.1 * (2*rng.Float32() - 1)
		}
		return moe.Tensor{Type: dt, Data: encode(t, dt, x, rowLen)}
	}
	return moe.ExpertWeights{Embd: embd, FF: ff, Gate: enc(gate, ff, embd), Up: enc(up, ff, embd), Down: enc(down, embd, ff)}
}

// requantize is w with every tensor re-encoded as dt: what a node that
// computes with a cheaper type than the shard's would use.
func requantize(t testing.TB, w moe.ExpertWeights, dt model.DType) moe.ExpertWeights {
	t.Helper()
	re := func(x moe.Tensor, rowLen int) moe.Tensor {
		dec := Dequantize
		if x.Type == model.F32 {
			dec = model.Decode
		}
		f, err := dec(x.Type, x.Data)
		if err != nil {
			t.Fatal(err)
		}
		return moe.Tensor{Type: dt, Data: encode(t, dt, f, rowLen)}
	}
	return moe.ExpertWeights{Embd: w.Embd, FF: w.FF, Gate: re(w.Gate, w.Embd), Up: re(w.Up, w.Embd), Down: re(w.Down, w.FF)}
}

// encode is x in type dt: F32 as it is, the rest through ggml's quantizers.
func encode(t testing.TB, dt model.DType, x []float32, rowLen int) []byte {
	t.Helper()
	var b []byte
	var err error
	if dt == model.F32 {
		b, err = model.Encode(dt, x)
	} else {
		b, err = Quantize(dt, x, rowLen)
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func computeOn(t testing.TB, dev Device, w moe.ExpertWeights, x []float32, batch int) []float32 {
	t.Helper()
	e, err := NewExpertOn(dev, w, moe.ExpertOptions{MaxBatch: batch})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	out := make([]float32, len(x))
	if err := e.Compute(x, batch, out); err != nil {
		t.Fatalf("%s: %v", dev.Spec(), err)
	}
	return out
}

// An expert FFN on each device against the same expert on the CPU, per type
// and at batch 1 and 32 (a device's vector and matrix kernels): the honest
// cross-device difference must sit within the validator's tolerance for the
// type, and a cheaper type substituted for the real one must sit above it,
// so that the check tells them apart across devices
// (reputation.ToleranceFor, whose table comes from these figures).
func TestDeviceExpertMatchesCPU(t *testing.T) {
	const embd, ff = 256, 512
	for _, dev := range testDevices(t) {
		batches := []int{1, 32}
		for _, c := range deviceCases() {
			t.Run(dev.Spec()+"/"+c.name, func(t *testing.T) {
				rng := rand.New(rand.NewPCG(21, uint64(len(c.name))))
				w := randExpert(t, rng, embd, ff, c.gate, c.up, c.down)
				tol := reputation.ToleranceFor(c.gate, c.up, c.down)
				for _, batch := range batches {
					x := make([]float32, batch*embd)
					for i := range x {
						x[i] = 2*rng.Float32() - 1
					}
					ref := computeOn(t, Device{}, w, x, batch)
					start := time.Now()
					got := computeOn(t, dev, w, x, batch)
					honest := reputation.RelL2(got, ref)
					line := fmt.Sprintf("%s %-7s batch %2d: rel L2 vs CPU %.2e", dev.Spec(), c.name, batch, honest)
					if c.cheaper != 0 {
						cheap := reputation.RelL2(computeOn(t, dev, requantize(t, w, c.cheaper), x, batch), ref)
						line += fmt.Sprintf("; computed as %s instead: %.2e (%.1fx the tolerance)", c.cheaper, cheap, cheap/tol)
						if !(cheap > tol) {
							t.Errorf("%s computed as %s is within the tolerance %.1e of the honest CPU result (%.2e)", c.name, c.cheaper, tol, cheap)
						}
					}
					t.Logf("%s; tolerance %.1e, %.1fx the honest difference (%.0f ms)", line, tol, tol/honest, time.Since(start).Seconds()*1e3)
					if !(honest <= tol) {
						t.Errorf("%s batch %d on %s is %.2e from the CPU, above the tolerance %.1e", c.name, batch, dev.Spec(), honest, tol)
					}
				}
			})
		}
	}
}

// The tiny model split on each device against llama.cpp's own forward pass
// with every layer on that device: the same greedy tokens. (On the CPU the
// two agree bit for bit: TestSplitMatchesLlamaCpp.)
func TestDeviceSplitMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 16
	prompt := "once upon a time the expert network"
	for _, dev := range testDevices(t) {
		t.Run(dev.Spec(), func(t *testing.T) {
			path := tinyModel(t, model.Q8_0, 4321)
			ref, err := LoadLlamaOn(dev, path)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			want, err := ref.GenerateGreedy(prompt, maxTokens, ContextOptions{Threads: testThreads}, true)
			if err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(t.TempDir(), "shards")
			res, err := model.Split(path, dir)
			if err != nil {
				t.Fatal(err)
			}
			sm, err := LoadSplitOn(dev, dir, res.ModelCID, testThreads)
			if err != nil {
				t.Fatal(err)
			}
			defer sm.Close()
			got, err := sm.GenerateGreedy(t.Context(), prompt, maxTokens, 0, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: split %v\n llama.cpp %v", dev.Spec(), got.Tokens, want.Tokens)
			if !slices.Equal(got.Tokens, want.Tokens) {
				t.Fatalf("split on %s generated %v, llama.cpp on it %v", dev.Spec(), got.Tokens, want.Tokens)
			}
			last := len(want.Logits) - 1
			if last >= 0 && len(got.Logits) == len(want.Logits) {
				t.Logf("last-token logits: rel L2 %.2e", reputation.RelL2(got.Logits[last], want.Logits[last]))
			}
		})
	}
}

// TestDeviceList logs the devices ggml sees with the backends found
// (scripts/gpu-check.sh prints it). It fails only if a backend library
// that is present does not load.
func TestDeviceList(t *testing.T) {
	paths, err := LoadBackends()
	t.Logf("backends loaded: %v", paths)
	for _, d := range Devices() {
		t.Logf("%-10s %-8s %-6s %-40s %6.1f GiB free of %6.1f GiB", d.Spec(), d.Backend, d.Type, d.Description,
			float64(d.MemoryFree)/(1<<30), float64(d.MemoryTotal)/(1<<30))
	}
	if err != nil {
		t.Error(err)
	}
}

// auto's measurement: each device times the same expert and the quickest
// of those measured wins; a software device alone is never chosen.
func TestAutoMeasuresTheDevices(t *testing.T) {
	for _, dev := range testDevices(t) {
		if !Software(dev) {
			continue
		}
		// auto measures each device with a real expert and takes the
		// quickest of what it measured. Which one is quicker is the
		// machine's (on an idle 2-core machine the CPU beats lavapipe, but
		// not always beside other work), so the test checks the choice
		// against the measurements, not a wall-clock relation.
		cpu, _ := SelectDevice("cpu")
		devs := []Device{dev, cpu}
		got, times := fastestOf(devs)
		if len(times) != len(devs) {
			t.Fatalf("fastestOf measured %d devices of %d", len(times), len(devs))
		}
		for i, d := range devs {
			if times[i] <= 0 {
				t.Fatalf("%s (%s) was not measured", d.Spec(), d.Description)
			}
		}
		want := devs[0]
		if times[1] < times[0] {
			want = devs[1]
		}
		if got.Spec() != want.Spec() {
			t.Fatalf("auto between %s (%v) and the CPU (%v) chose %s", dev.Spec(), times[0], times[1], got.Spec())
		}
		t.Logf("an expert of 2048x768 q8_0: %s %v, the CPU %v", dev.Description, times[0], times[1])
		if got, err := SelectDevice("auto"); err != nil || !got.CPU() {
			t.Fatalf("auto with only a software GPU: %v %v, want the CPU", got.Spec(), err)
		}
	}
}
