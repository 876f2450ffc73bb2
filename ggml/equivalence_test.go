package ggml

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// The split forward pass (gating compute + in-process experts, loaded from
// CID-verified shards) against llama.cpp's own forward pass on the same
// GGUF: greedy tokens identical for 64 tokens, last-token logits within
// 1e-3 (the bound, for F32; the other dtypes are held to it too).
func TestSplitMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 64
	prompt := "once upon a time the expert network"
	for _, dt := range []model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0} {
		t.Run(dt.String(), func(t *testing.T) {
			_, _, n, worstAny, worst := splitMatchesLlamaCpp(t, tinyModel(t, dt, 1234), prompt, maxTokens)
			t.Logf("%s: %d tokens identical; last-token logits max |Δ| = %.3g (any step: %.3g)", dt, n, worst, worstAny)
			if worst > 1e-3 {
				t.Fatalf("last-token logits differ by %.3g, above 1e-3", worst)
			}
		})
	}
}

// splitGating splits the model at path and opens its gating shard, with
// the hyper-parameters read from it.
func splitGating(t testing.TB, path string) (*model.SplitResult, *model.Shard, moe.Hparams) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "shards")
	res, err := model.Split(path, dir)
	if err != nil {
		t.Fatal(err)
	}
	gs, err := model.OpenShard(dir, res.Manifest.GetGating())
	if err != nil {
		t.Fatal(err)
	}
	hp, err := moe.HparamsOf(res.Manifest, gs)
	if err != nil {
		t.Fatal(err)
	}
	return res, gs, hp
}

func TestGatingBadInput(t *testing.T) {
	res, gs, hp := splitGating(t, tinyModel(t, model.F32, 8))
	// A shard that lacks a tensor, or whose tensor has another shape.
	bad := hp
	bad.Layers++
	if _, err := NewGating(bad, gs, 1); err == nil || !strings.Contains(err.Error(), "no tensor blk.2.") {
		t.Errorf("missing tensor: %v", err)
	}
	bad = hp
	bad.Experts = 5
	if _, err := NewGating(bad, gs, 1); err == nil || !strings.Contains(err.Error(), "ffn_gate_inp") {
		t.Errorf("shape mismatch: %v", err)
	}
	other := proto.Clone(res.Manifest).(*neuropb.Manifest)
	other.Architecture = "olmoe"
	if _, err := moe.HparamsOf(other, gs); err == nil || !strings.Contains(err.Error(), `architecture "olmoe" is not supported yet (supported: llama, qwen3moe, gpt-oss, glm4moe, deepseek2)`) {
		t.Errorf("unsupported architecture: %v", err)
	}
	g, err := NewGating(hp, gs, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	s, err := g.NewSession(16)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	z := &zeroExperts{embd: hp.Embd}
	if _, err := s.Forward(t.Context(), make([]int32, 17), z); !errors.Is(err, moe.ErrContextFull) {
		t.Errorf("over the context: %v", err)
	}
	if _, err := s.Forward(t.Context(), []int32{int32(hp.Vocab)}, z); err == nil {
		t.Error("accepted a token outside the vocabulary")
	}
	if _, err := s.Forward(t.Context(), nil, z); err == nil {
		t.Error("accepted no tokens")
	}
	if _, err := s.Forward(t.Context(), []int32{1, 5}, shortExperts{}); err == nil || !strings.Contains(err.Error(), "returned") {
		t.Errorf("experts returning the wrong size: %v", err)
	}
}

type shortExperts struct{}

func (shortExperts) MoE(context.Context, int, []float32, int, []int32, []float32) ([]float32, error) {
	return make([]float32, 3), nil
}

// Qwen3-MoE's gating compute (per-head Q/K RMS norms, NEOX RoPE, a head
// size other than embd/heads as Qwen3-30B-A3B has) against llama.cpp's
// llm_build_qwen3moe: the same greedy tokens, logits identical, in f32, f16,
// q8_0 and llama.cpp's q4_k_m mix.
func TestQwen3MoeMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 32
	prompt := "once upon a time the expert network"
	p := model.Presets["tiny"]
	p.Embd, p.FF, p.Heads, p.KVHeads, p.HeadSize, p.Layers = 256, 512, 4, 2, 128, 3 // q is 512 wide, embd 256
	for _, typ := range []string{"f32", "f16", "q8_0", "q4_k_m", "q8_0-tied"} {
		t.Run(typ, func(t *testing.T) {
			p := p
			typ, p.TiedOutput = strings.CutSuffix(typ, "-tied") // output head = token_embd
			sm, _, n, worst, _ := splitMatchesLlamaCpp(t, archModel(t, t.TempDir(), "qwen3moe", p, typ, 77), prompt, maxTokens)
			if hp := sm.Gating.Hparams(); !hp.QKNorm || !hp.RopeNeox || hp.HeadDim != 128 {
				t.Fatalf("hparams %+v", hp)
			}
			t.Logf("qwen3moe %s (tied output %v): %d tokens identical, logits max |Δ| %.3g", typ, p.TiedOutput, n, worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
}

// GLM-4.5's gating compute (glm4moe: a dense leading layer, a shared
// expert computed beside the routed ones, a sigmoid router with the
// selection bias exp_probs_b, normalised and scaled weights, Q/K/V biases,
// the post-attention norm, half of each head rotated, NEOX) against
// llama.cpp's llm_build_glm4_moe: the same greedy tokens, logits identical,
// in f32, f16, q8_0 and llama.cpp's q4_k_m mix.
func TestGLM4MoeMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 32
	prompt := "once upon a time the expert network"
	p, _ := model.Preset("glm4moe", "tiny")
	p.Embd, p.FF, p.DenseFF, p.HeadSize, p.RopeDim = 256, 256, 512, 64, 32 // K-quant rows of 256; heads of 64, half rotated
	for _, typ := range []string{"f32", "f16", "q8_0", "q4_k_m", "f16-remote", "q4_k_m-remote"} {
		t.Run(typ, func(t *testing.T) {
			typ, remote := strings.CutSuffix(typ, "-remote") // the shared expert hosted like a routed one
			sm, res, n, worst, _ := splitMatchesLlamaCppWith(t, archModel(t, t.TempDir(), "glm4moe", p, typ, 31), prompt, maxTokens,
				model.SplitOptions{SharedRemote: remote})
			if hp := sm.Gating.Hparams(); hp.SharedRemote != remote || len(res.Manifest.GetShared()) != map[bool]int{true: p.Layers - p.DenseLead}[remote] {
				t.Fatalf("shared experts remote %v: hparams %v, %d shared shards", remote, hp.SharedRemote, len(res.Manifest.GetShared()))
			}
			if n := len(res.Manifest.GetExperts()); n != (p.Layers-p.DenseLead)*p.Experts {
				t.Fatalf("%d expert shards, want %d (no experts in the dense layer)", n, (p.Layers-p.DenseLead)*p.Experts)
			}
			if hp := sm.Gating.Hparams(); hp.DenseLead != 1 || hp.SharedFF != p.FF || !hp.Sigmoid || !hp.ProbsBias || hp.ScaleW != 2.5 || hp.Rot != 32 {
				t.Fatalf("hparams %+v", hp)
			}
			t.Logf("glm4moe %s (shared expert hosted: %v): %d tokens identical, logits max |Δ| %.3g", typ, remote, n, worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
}

// gpt-oss's gating compute (Q/K/V/output biases, attention sinks, a
// sliding window of 16 on the even layers — the prompt and 32 tokens
// reach past it —, YaRN, heads wider than embd/heads, the post-attention
// norm, a router with a bias that softmaxes the top-k logits) and its
// experts (swiglu_oai with per-expert biases, computed on the expert side
// from what the shard carries) against llama.cpp's
// llm_build_openai_moe_iswa: the same greedy tokens, logits identical, in
// f32, f16, q8_0, llama.cpp's q4_k_m mix and MXFP4 experts.
func TestGptOssMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 32
	prompt := "once upon a time the expert network"
	p, _ := model.Preset("gpt-oss", "tiny")
	p.Embd, p.FF, p.HeadSize, p.Layers = 256, 256, 64, 3 // K-quant rows of 256; q is 256 wide in 4 heads of 64
	for _, typ := range []string{"f32", "f16", "q8_0", "q4_k_m", "mxfp4"} {
		t.Run(typ, func(t *testing.T) {
			sm, res, n, worst, _ := splitMatchesLlamaCpp(t, archModel(t, t.TempDir(), "gpt-oss", p, typ, 53), prompt, maxTokens)
			hp := sm.Gating.Hparams()
			if !hp.Sinks || !hp.AttnOutBias || !hp.SoftmaxWeight || !hp.RouterBias || hp.SlidingWindow != 16 || !hp.IsSWA(0) || hp.IsSWA(1) ||
				hp.RopeScaling != "yarn" || hp.RopeScale != 4 || hp.RopeOrigCtx != 64 || hp.HeadDim != 64 {
				t.Fatalf("hparams %+v", hp)
			}
			if n := len(res.Manifest.GetExperts()[0].GetShard().GetTensors()); n != 6 {
				t.Fatalf("an expert shard holds %d tensors, want 3 weights and 3 biases", n)
			}
			t.Logf("gpt-oss %s: %d tokens identical, logits max |Δ| %.3g", typ, n, worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
}

// gpt-oss's sliding-window layers keep llama.cpp's smaller SWA cache
// (llama_kv_cache_iswa): window + n_ubatch cells padded to 256, used as a
// ring once the sequence outgrows it. With ubatches of 16 and a window of
// 100 the ring has 256 cells; a prompt of over 512 tokens wraps it twice,
// and the generated tokens' windows straddle its end. Tokens and logits
// are llama.cpp's to the bit all the way (the cells' order decides the
// order of attention's sums).
func TestGptOssSlidingWindowRingMatchesLlamaCpp(t *testing.T) {
	const maxTokens, ubatch = 24, 16
	prompt := strings.Repeat("once upon a time the expert network carried every word ", 14)
	p, _ := model.Preset("gpt-oss", "tiny")
	// A window wider than ggml's SIMD step (32 floats): each sum over the
	// window then depends on the order of its cells, and the ring's
	// order differs from the full-size layout's where the window wraps.
	p.Context, p.SlidingWindow = 1024, 100
	// f16's logits show the cells' order (llama.cpp's full-size layout
	// differs from the ring by up to 7e-4 here); q8_0's and q4_k_m's, whose
	// activations are rounded to 8 bits before each product, did not.
	for _, typ := range []string{"f16", "q8_0", "q4_k_m"} {
		t.Run(typ, func(t *testing.T) {
			path := archModel(t, t.TempDir(), "gpt-oss", p, typ, 62)
			ref, err := LoadLlama(path)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			want, err := ref.GenerateGreedy(prompt, maxTokens, ContextOptions{Threads: testThreads, UBatch: ubatch}, true)
			if err != nil {
				t.Fatal(err)
			}
			// the generated tokens' windows wrap around the ring's end:
			// their cells are not in the order of their positions
			if n := len(want.Prompt); n < 512 || n%256 >= p.SlidingWindow/2 {
				t.Fatalf("a prompt of %d tokens: the generated tokens' windows do not straddle the ring's end", n)
			}
			sm := splitOf(t, path, model.SplitOptions{}, testThreads)
			s, err := sm.Gating.NewSessionUBatch(0, ubatch)
			if err != nil {
				t.Fatal(err)
			}
			if got := s.SWACells(); got != 256 {
				t.Fatalf("the sliding-window cache has %d cells, want llama.cpp's 256", got)
			}
			s.Close()
			sm.UBatch = ubatch
			got, err := sm.GenerateGreedy(t.Context(), prompt, maxTokens, 0, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Tokens, want.Tokens) {
				t.Fatalf("split %v\nllama.cpp %v", got.Tokens, want.Tokens)
			}
			worst := 0.0
			for step := range want.Logits {
				for i := range want.Logits[step] {
					worst = max(worst, math.Abs(float64(got.Logits[step][i]-want.Logits[step][i])))
				}
			}
			t.Logf("%s: prompt of %d tokens, %d generated, through a ring of 256 cells: logits max |Δ| %.3g", typ, len(want.Prompt), len(want.Tokens), worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
}

// DeepSeek-V3's gating compute (deepseek2: multi-head latent attention
// with the absorption optimisation — Q through its low-rank bottleneck,
// the compressed KV cache of kv rank + rope per token, per-head K and V
// decompression —, NORM RoPE with YaRN and its log multiplier folded into
// the attention scale, a dense leading layer, a shared expert, a sigmoid
// router with the selection bias and group-limited top-k, normalised and
// scaled weights) against llama.cpp's llm_build_deepseek2: the same greedy
// tokens, logits identical, in f32, f16, q8_0 and llama.cpp's q4_k_m mix.
func TestDeepSeek2MatchesLlamaCpp(t *testing.T) {
	const maxTokens = 32
	prompt := "once upon a time the expert network"
	p, _ := model.Preset("deepseek2", "tiny")
	p.Embd, p.FF, p.DenseFF = 256, 256, 512 // K-quant rows of 256
	for _, typ := range []string{"f32", "f16", "q8_0", "q4_k_m", "q8_0-remote"} {
		t.Run(typ, func(t *testing.T) {
			typ, remote := strings.CutSuffix(typ, "-remote") // the shared expert hosted like a routed one
			sm, res, n, worst, _ := splitMatchesLlamaCppWith(t, archModel(t, t.TempDir(), "deepseek2", p, typ, 97), prompt, maxTokens,
				model.SplitOptions{SharedRemote: remote})
			if n := len(res.Manifest.GetExperts()); n != (p.Layers-p.DenseLead)*p.Experts {
				t.Fatalf("%d expert shards, want %d (no experts in the dense layer)", n, (p.Layers-p.DenseLead)*p.Experts)
			}
			hp := sm.Gating.Hparams()
			if !hp.MLA || hp.RopeNeox || hp.HeadDim != 48 || hp.HeadDimV != 32 || hp.KeyMLA != 48 || hp.ValueMLA != 32 || hp.QLoraRank != 32 ||
				hp.ExpertGroups != 4 || hp.GroupsUsed != 2 || !hp.Sigmoid || !hp.ProbsBias || hp.SharedFF != p.FF || hp.YarnLogMul == 0 {
				t.Fatalf("hparams %+v", hp)
			}
			t.Logf("deepseek2 %s (shared expert hosted: %v): %d tokens identical, logits max |Δ| %.3g", typ, remote, n, worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
}

// archModel writes a generated model of arch and shape p in typ (f32, f16,
// q8_0 generated directly; any other type generated in F16 and put through
// llama.cpp's quantizer) and returns its path.
func archModel(t *testing.T, dir, arch string, p model.Params, typ string, seed uint64) string {
	t.Helper()
	path := filepath.Join(dir, arch+".gguf")
	gen := model.F16
	if typ == "f32" || typ == "q8_0" {
		gen, _ = model.ParseDType(typ)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.GenerateArch(f, arch, p, gen, seed); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if gen.String() == typ {
		return path
	}
	q := filepath.Join(dir, "q-"+typ+".gguf")
	if err := QuantizeModel(path, q, typ, 2); err != nil {
		t.Fatal(err)
	}
	return q
}

// archShape is arch's tiny preset at embd 256 (gpt-oss: heads of 64 and
// 3 layers, so that its sliding window and full attention both show).
func archShape(arch string) model.Params {
	p, _ := model.Preset(arch, "tiny")
	p.Embd, p.FF = 256, 256
	switch arch {
	case "glm4moe", "deepseek2":
		p.DenseFF = 512
	case "gpt-oss":
		p.HeadSize, p.Layers = 64, 3
	}
	return p
}

// archSplit generates a model of arch's archShape in typ (with the suffix
// -remote: its shared experts hosted as routed ones are) and loads its
// split; it returns the model's shape too.
func archSplit(t *testing.T, arch, typ string, seed uint64) (*SplitModel, model.Params) {
	t.Helper()
	typ, remote := strings.CutSuffix(typ, "-remote")
	p := archShape(arch)
	return splitOf(t, archModel(t, t.TempDir(), arch, p, typ, seed), model.SplitOptions{SharedRemote: remote}, testThreads), p
}

// splitOf splits the GGUF at path with o and loads its shards (threads
// compute threads); the model is closed with the test.
func splitOf(t *testing.T, path string, o model.SplitOptions, threads int) *SplitModel {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "shards")
	res, err := model.SplitWith(path, dir, o)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := LoadSplit(dir, res.ModelCID, threads)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sm.Close() })
	return sm
}

// splitMatchesLlamaCpp generates maxTokens greedy tokens of the GGUF at
// path through llama.cpp and through the split forward pass of its shards,
// fails unless the tokens are the same, and returns the split model (closed
// with the test), how many tokens, and the largest logit difference at any
// step and at the last one.
func splitMatchesLlamaCpp(t *testing.T, path, prompt string, maxTokens int) (*SplitModel, *model.SplitResult, int, float64, float64) {
	t.Helper()
	return splitMatchesLlamaCppWith(t, path, prompt, maxTokens, model.SplitOptions{})
}

// splitMatchesLlamaCppWith is splitMatchesLlamaCpp for a model split with
// options o.
func splitMatchesLlamaCppWith(t *testing.T, path, prompt string, maxTokens int, o model.SplitOptions) (*SplitModel, *model.SplitResult, int, float64, float64) {
	t.Helper()
	ref, err := LoadLlama(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	want, err := ref.GenerateGreedy(prompt, maxTokens, ContextOptions{Threads: testThreads}, true)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "shards")
	res, err := model.SplitWith(path, dir, o)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := LoadSplit(dir, res.ModelCID, testThreads)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sm.Close() })
	got, err := sm.GenerateGreedy(t.Context(), prompt, maxTokens, 0, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Tokens, want.Tokens) {
		t.Fatalf("split %v\nllama.cpp %v", got.Tokens, want.Tokens)
	}
	var worst, last float64
	for step := range want.Logits {
		for i := range want.Logits[step] {
			d := math.Abs(float64(got.Logits[step][i] - want.Logits[step][i]))
			worst = max(worst, d)
			if step == len(want.Logits)-1 {
				last = max(last, d)
			}
		}
	}
	return sm, res, len(want.Tokens), worst, last
}

// ForwardEach, speculative decoding's verification, gives each token the
// logits a one-token decode step gives it, to the bit, in every
// architecture and type (ggml's matrix products sum in another order for
// two rows or more: a plain Forward of the same tokens differs in F16 by
// up to 1e-3), past a context long enough for attention's sums to show it;
// also with the shared experts hosted like routed ones (a dense product,
// computed a row at a time: moe.ApartExperts).
func TestForwardEachIsDecodeSteps(t *testing.T) {
	ctx := t.Context()
	for _, arch := range []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"} {
		types := []string{"f16", "q8_0", "q4_k_m"}
		if arch == "glm4moe" || arch == "deepseek2" {
			types = append(types, "f16-remote", "q8_0-remote")
		}
		for _, typ := range types {
			t.Run(arch+"/"+typ, func(t *testing.T) {
				sm, p := archSplit(t, arch, typ, 7)
				prompt := make([]int32, 70)
				for i := range prompt {
					prompt[i] = int32(3 + i*11%300)
				}
				draft := []int32{50, 51, 52, 53, 54, 55}
				steps, _ := sm.Gating.NewSession(0)
				defer steps.Close()
				if _, err := steps.Forward(ctx, prompt, sm.Experts); err != nil {
					t.Fatal(err)
				}
				var want [][]float32
				for _, tok := range draft {
					l, err := steps.Forward(ctx, []int32{tok}, sm.Experts)
					if err != nil {
						t.Fatal(err)
					}
					want = append(want, l)
				}
				each, _ := sm.Gating.NewSession(0)
				defer each.Close()
				each.Forward(ctx, prompt, sm.Experts)
				counting := &countingExperts{LocalExperts: sm.Experts}
				got, err := each.ForwardEach(ctx, draft, counting)
				if err != nil {
					t.Fatal(err)
				}
				if moeLayers := p.Layers - p.DenseLead; counting.calls != moeLayers {
					t.Fatalf("%d expert calls for %d tokens, want one per MoE layer (%d)", counting.calls, len(draft), moeLayers)
				}
				if each.Len() != steps.Len() {
					t.Fatalf("session at %d, want %d", each.Len(), steps.Len())
				}
				for i := range want {
					for j := range want[i] {
						if got[i][j] != want[i][j] {
							t.Fatalf("token %d logit %d: %v, a decode step's %v", i, j, got[i][j], want[i][j])
						}
					}
				}
			})
		}
	}
}

// countingExperts counts MoE calls.
type countingExperts struct {
	*moe.LocalExperts
	calls int
}

func (c *countingExperts) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	c.calls++
	return c.LocalExperts.MoE(ctx, layer, x, n, selected, weights)
}

func (c *countingExperts) MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	c.calls++
	return c.LocalExperts.MoEApart(ctx, layer, x, n, selected, weights)
}
