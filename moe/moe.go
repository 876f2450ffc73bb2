// Package moe is the pure-Go half of neuro's Mixture-of-Experts compute:
// the hyper-parameters a gating node needs, how one MoE layer's tokens are
// routed to experts and their outputs combined (exactly as llama.cpp's
// build_moe_ffn does), and the interfaces behind which a compute backend
// (ggml through cgo, in package ggml) loads experts, the gating part and
// the tokenizer.
//
// The packages that move hidden states around (expert, gating, node,
// testnet) depend on this package only, so they build with CGO_ENABLED=0
// and race-test without compiling llama.cpp; the binary wires the ggml
// backend in at its composition root (cmd/neurod), as ollama's ml/backend
// interfaces do.
package moe

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// Errors a backend returns.
var (
	// ErrContextFull means a prompt and the tokens to generate do not fit
	// the context.
	ErrContextFull = errors.New("context is full")
	// ErrClosed is returned by an expert, gating part or session that was
	// closed.
	ErrClosed = errors.New("closed")
	// ErrWindowLost means a session cannot rewind that far: a
	// sliding-window layer's cache (a ring) no longer holds the window
	// before the position; the tokens must be computed again from the
	// start.
	ErrWindowLost = errors.New("the sliding window's cache no longer holds the positions before it")
	// ErrNoBackend means a node was asked to compute without a compute
	// backend.
	ErrNoBackend = errors.New("no compute backend")
)

// Experts computes the MoE block of one layer for a batch of tokens. x
// holds n rows of Embd floats (the layer's normalised hidden states);
// selected and weights hold n rows of ExpertsUsed entries: the experts
// llama.cpp's router chose for each token, best first, and their
// normalised weights. It returns n rows of Embd floats: for each token the
// weighted sum of its experts' outputs (see Combine for the exact order of
// operations that reproduces llama.cpp).
type Experts interface {
	MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error)
}

// Hparams are what the gating compute needs to know of a model.
type Hparams struct {
	Layers, Embd, Heads, KVHeads, Rot   int
	Experts, ExpertsUsed, Vocab, CtxLen int
	RopeFreqBase, RMSEps                float32
	// Arch is the GGUF architecture; HeadDim one attention head's size
	// (Embd/Heads unless attention.key_length says otherwise); QKNorm: an
	// RMS norm on each head of Q and K before RoPE (Qwen3); RopeNeox:
	// NEOX-style rotation (rotating halves, not pairs).
	Arch     string
	HeadDim  int
	QKNorm   bool
	RopeNeox bool
	// DenseLead leading layers have no experts but a dense feed-forward
	// block of DenseFF (GLM, DeepSeek).
	DenseLead, DenseFF int
	// SharedFF is the shared experts' feed-forward size (0: none); every
	// token goes through them, beside the routed experts. SharedRemote:
	// they are hosted like routed experts (the manifest's shared list)
	// and called as expert number Experts of their layer, with weight 1;
	// else they run in the gating compute.
	SharedFF     int
	SharedRemote bool
	// QKVBias: Q, K and V have biases (GLM). PostNorm: the feed-forward
	// norm is named post_attention_norm (GLM), not ffn_norm.
	QKVBias, PostNorm bool
	// The router: Sigmoid probabilities instead of softmax, ProbsBias (a
	// selection bias, exp_probs_b, added for choosing only), NormW (weights
	// divided by their sum) and ScaleW (then multiplied; 0: not).
	Sigmoid, ProbsBias, NormW bool
	ScaleW                    float32
	// gpt-oss: an output projection bias (AttnOutBias), attention sinks
	// (one logit per head that takes part in the softmax), sliding-window
	// attention over the last SlidingWindow positions in the layers where
	// il % SWAPattern < SWAPattern-1, and a router with a bias
	// (RouterBias) that picks the top-k logits and then softmaxes their
	// weights (SoftmaxWeight: llama.cpp's SOFTMAX_WEIGHT).
	AttnOutBias, Sinks        bool
	SlidingWindow, SWAPattern int
	RouterBias, SoftmaxWeight bool
	// RoPE scaling: RopeScaling is "" (none), "linear" or "yarn";
	// RopeScale the factor (rope.scaling.factor), RopeOrigCtx the
	// original context YaRN extends (rope.scaling.original_context_length),
	// RopeAttnFactor rope.scaling.attn_factor (default 1).
	RopeScaling    string
	RopeScale      float32
	RopeOrigCtx    int
	RopeAttnFactor float32
	// deepseek2's multi-head latent attention (MLA): Q through a
	// QLoraRank bottleneck (0: one projection, DeepSeek's "lite"
	// models), K and V compressed to KVLoraRank plus Rot rotated
	// dimensions — all the KV cache holds: HeadDim is KVLoraRank + Rot and
	// HeadDimV KVLoraRank, in one KV head —, each head's key of KeyMLA
	// (nope + rope) and value of ValueMLA; YarnLogMul is
	// rope.scaling.yarn_log_multiplier. ExpertGroups > 1: the router
	// first keeps the GroupsUsed groups with the best two scores.
	MLA                   bool
	QLoraRank, KVLoraRank int
	HeadDimV              int
	KeyMLA, ValueMLA      int
	YarnLogMul            float32
	ExpertGroups          int
	GroupsUsed            int
	// FFNPrecF32: the dense and shared FFNs' down projection at F32
	// precision (llama.cpp sets it for GLM-4; the CPU computes in F32
	// anyway).
	FFNPrecF32 bool
}

// IsSWA reports whether layer il attends through a sliding window.
func (h Hparams) IsSWA(il int) bool {
	return h.SlidingWindow > 0 && h.SWAPattern > 0 && il%h.SWAPattern < h.SWAPattern-1
}

// GatingArchitectures are the architectures the gating compute runs.
var GatingArchitectures = []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"}

// HparamsOf reads the hyper-parameters from a manifest and a shard with
// the model's metadata: the gating shard, or format 2's head or any of
// its layer shards (the tensors it looks at are read from the manifest's
// list of the gating shard's, so that every one of them gives the same).
func HparamsOf(m *neuropb.Manifest, meta *model.Shard) (Hparams, error) {
	src := newMeta(m, meta)
	arch := m.GetArchitecture()
	if !slices.Contains(GatingArchitectures, arch) {
		return Hparams{}, fmt.Errorf("gating compute: architecture %q is not supported yet (supported: %s)", arch,
			strings.Join(GatingArchitectures, ", "))
	}
	p := m.GetParams()
	h := Hparams{
		Layers: int(p.GetLayers()), Embd: int(p.GetEmbd()), Heads: int(p.GetHeads()), KVHeads: int(p.GetKvHeads()),
		Experts: int(p.GetExperts()), ExpertsUsed: int(p.GetExpertsUsed()), Vocab: int(p.GetVocab()),
		CtxLen: int(p.GetContext()), RopeFreqBase: p.GetRopeFreqBase(), RMSEps: p.GetRmsEps(),
		Arch: arch, QKNorm: arch == "qwen3moe", RopeNeox: arch != "llama" && arch != "deepseek2", DenseLead: int(p.GetDenseLead()), NormW: true,
	}
	switch {
	case arch == "glm4moe":
		if err := glmHparams(&h, src); err != nil {
			return Hparams{}, err
		}
	case arch == "deepseek2":
		if err := deepseekHparams(&h, src); err != nil {
			return Hparams{}, err
		}
	case h.DenseLead != 0:
		return Hparams{}, fmt.Errorf("gating compute: %s with %d dense leading layers (not supported)", arch, h.DenseLead)
	}
	if h.Heads == 0 || h.KVHeads == 0 || h.Heads%h.KVHeads != 0 {
		return Hparams{}, fmt.Errorf("gating compute: %d heads, %d kv heads", h.Heads, h.KVHeads)
	}
	u32 := func(key string) (int, bool) {
		v, ok := src.Get(arch + "." + key).(uint32)
		return int(v), ok
	}
	h.HeadDim = 0
	if h.Embd%h.Heads == 0 {
		h.HeadDim = h.Embd / h.Heads
	}
	if k, ok := u32("attention.key_length"); ok {
		if v, ok := u32("attention.value_length"); ok && v != k && !h.MLA {
			return Hparams{}, fmt.Errorf("gating compute: key length %d differs from value length %d (not supported)", k, v)
		}
		h.HeadDim = k
	}
	h.HeadDimV = h.HeadDim
	if v, ok := u32("attention.value_length"); ok && h.MLA {
		h.HeadDimV = v
	}
	if h.HeadDim < 2 || h.HeadDim%2 != 0 {
		return Hparams{}, fmt.Errorf("gating compute: head size %d for embd %d in %d heads", h.HeadDim, h.Embd, h.Heads)
	}
	if arch == "llama" && h.HeadDim*h.Heads != h.Embd {
		return Hparams{}, fmt.Errorf("gating compute: llama with a head size %d other than embd/heads (not supported)", h.HeadDim)
	}
	h.Rot = h.HeadDim
	if v, ok := u32("rope.dimension_count"); ok {
		h.Rot = v
	}
	if h.MLA {
		if err := mlaShape(&h); err != nil {
			return Hparams{}, err
		}
	} else if h.Rot != h.HeadDim && !(h.RopeNeox && h.Rot > 0 && h.Rot < h.HeadDim && h.Rot%2 == 0) {
		return Hparams{}, fmt.Errorf("gating compute: rope dimension %d for a head of %d (partial rotary: NEOX only)", h.Rot, h.HeadDim)
	}
	if h.RopeFreqBase == 0 {
		h.RopeFreqBase = 10000 // llama.cpp's default when the key is absent
	}
	if v, ok := u32("expert_group_count"); ok && v > 1 {
		h.ExpertGroups = v
		h.GroupsUsed, _ = u32("expert_group_used_count")
		if h.Experts%h.ExpertGroups != 0 || h.GroupsUsed < 1 || h.GroupsUsed > h.ExpertGroups || h.Experts/h.ExpertGroups < 2 {
			return Hparams{}, fmt.Errorf("gating compute: %d experts in %d groups, %d used", h.Experts, h.ExpertGroups, h.GroupsUsed)
		}
	}
	if arch == "gpt-oss" {
		h.QKVBias, h.AttnOutBias, h.Sinks, h.PostNorm, h.RouterBias, h.SoftmaxWeight, h.NormW = true, true, true, true, true, true, false
		h.SWAPattern = 2 // llama.cpp: set_swa_pattern(2), the even layers
		if h.SlidingWindow, _ = u32("attention.sliding_window"); h.SlidingWindow < 1 {
			return Hparams{}, fmt.Errorf("gating compute: gpt-oss without %s.attention.sliding_window", arch)
		}
	}
	if err := ropeScaling(&h, src); err != nil {
		return Hparams{}, err
	}
	if err := sharedRemote(&h, m); err != nil {
		return Hparams{}, err
	}
	if h.RMSEps == 0 {
		return Hparams{}, fmt.Errorf("gating compute: %s.attention.layer_norm_rms_epsilon is missing", arch)
	}
	if h.ExpertsUsed < 1 || h.ExpertsUsed > h.Experts || h.Vocab < 1 || h.CtxLen < 1 {
		return Hparams{}, fmt.Errorf("gating compute: bad params %+v", h)
	}
	return h, nil
}

// ropeScaling reads the RoPE scaling keys as llama.cpp's load_hparams
// does for every architecture.
func ropeScaling(h *Hparams, src meta) error {
	a := h.Arch + ".rope.scaling."
	h.RopeAttnFactor = 1
	h.RopeOrigCtx = h.CtxLen
	if v, ok := src.Get(a + "original_context_length").(uint32); ok && v > 0 {
		h.RopeOrigCtx = int(v)
	}
	if v, ok := src.Get(a + "attn_factor").(float32); ok {
		h.RopeAttnFactor = v
	}
	typ, _ := src.Get(a + "type").(string)
	switch typ {
	case "", "none", "linear", "yarn":
	default:
		return fmt.Errorf("gating compute: rope scaling %q (supported: none, linear, yarn)", typ)
	}
	if typ == "none" {
		h.RopeScaling = typ
		return nil
	}
	f, _ := src.Get(a + "factor").(float32)
	if f == 0 {
		f, _ = src.Get(h.Arch + ".rope.scale_linear").(float32)
	}
	if f < 0 || f != f {
		return fmt.Errorf("gating compute: rope scaling factor %g", f)
	}
	h.RopeScaling, h.RopeScale = typ, f
	return nil
}

// deepseekHparams reads what deepseek2 adds: latent attention (MLA, as
// current GGUFs have it: attn_k_b and attn_v_b), dense leading layers,
// shared experts, and its router (softmax unless expert_gating_func says
// sigmoid, the selection bias when exp_probs_b is there, normalised
// weights if expert_weights_norm, always scaled).
func deepseekHparams(h *Hparams, src meta) error {
	a := h.Arch + "."
	u32 := func(key string) int {
		v, _ := src.Get(a + key).(uint32)
		return int(v)
	}
	if !src.Has("blk.0.attn_k_b.weight") {
		return errors.New("gating compute: deepseek2 without multi-head latent attention (a legacy attn_kv_b file) is not supported; convert it again with a current llama.cpp")
	}
	h.MLA = true
	h.KVLoraRank, h.KeyMLA, h.ValueMLA = u32("attention.kv_lora_rank"), u32("attention.key_length_mla"), u32("attention.value_length_mla")
	if h.Layers != 26 && h.Layers != 27 { // llama.cpp's "lite" models have no Q bottleneck
		h.QLoraRank = u32("attention.q_lora_rank")
	}
	h.YarnLogMul, _ = src.Get(a + "rope.scaling.yarn_log_multiplier").(float32)
	h.Sigmoid = u32("expert_gating_func") == 2
	h.ProbsBias = src.Has(fmt.Sprintf("blk.%d.exp_probs_b.bias", h.DenseLead))
	h.NormW, _ = src.Get(a + "expert_weights_norm").(bool)
	h.ScaleW, _ = src.Get(a + "expert_weights_scale").(float32)
	return ffnShapes(h, src)
}

// mlaShape checks latent attention's sizes against each other.
func mlaShape(h *Hparams) error {
	if h.KVHeads != 1 || h.KVLoraRank < 1 || h.Rot < 2 || h.Rot%2 != 0 || h.HeadDim != h.KVLoraRank+h.Rot || h.HeadDimV != h.KVLoraRank ||
		h.KeyMLA <= h.Rot || h.ValueMLA < 1 || h.QLoraRank < 0 {
		return fmt.Errorf("gating compute: latent attention with kv rank %d, rope %d, cache heads of %d/%d in %d kv heads, heads of %d/%d",
			h.KVLoraRank, h.Rot, h.HeadDim, h.HeadDimV, h.KVHeads, h.KeyMLA, h.ValueMLA)
	}
	return nil
}

// ffnShapes reads the dense leading layers' and the shared experts' sizes
// from their tensors.
func ffnShapes(h *Hparams, src meta) error {
	if h.DenseLead > 0 {
		t, ok := src.Tensor("blk.0.ffn_gate.weight")
		if !ok || len(t.Shape) != 2 {
			return fmt.Errorf("gating compute: %s dense layer 0 has no ffn_gate.weight", h.Arch)
		}
		h.DenseFF = int(t.Shape[1])
	}
	if t, ok := src.Tensor(fmt.Sprintf("blk.%d.ffn_gate_shexp.weight", h.DenseLead)); ok && len(t.Shape) == 2 {
		h.SharedFF = int(t.Shape[1])
	}
	return nil
}

// sharedRemote reads the hosted shared experts' size from the manifest.
func sharedRemote(h *Hparams, m *neuropb.Manifest) error {
	if len(m.GetShared()) == 0 {
		return nil
	}
	if h.SharedFF != 0 {
		return errors.New("gating compute: the shared experts are both in the gating shard and hosted")
	}
	ts := m.GetShared()[0].GetShard().GetTensors()
	if len(ts) == 0 || len(ts[0].GetShape()) != 2 || ts[0].GetShape()[0] != uint64(h.Embd) {
		return fmt.Errorf("gating compute: the shared expert shard of layer %d is not an expert of embd %d", m.GetShared()[0].GetLayer(), h.Embd)
	}
	h.SharedFF, h.SharedRemote = int(ts[0].GetShape()[1]), true
	return nil
}

// glmHparams reads what glm4moe adds: dense leading layers, shared experts,
// Q/K/V biases, the post-attention norm, and its router (sigmoid by
// default, a selection bias, optional weight normalisation, a scale).
func glmHparams(h *Hparams, src meta) error {
	a := h.Arch + "."
	h.QKVBias, h.PostNorm, h.ProbsBias, h.Sigmoid = true, true, true, true
	if v, ok := src.Get(a + "expert_gating_func").(uint32); ok && v == 1 {
		h.Sigmoid = false // softmax
	}
	h.NormW = false
	if v, ok := src.Get(a + "expert_weights_norm").(bool); ok {
		h.NormW = v
	}
	if v, ok := src.Get(a + "expert_weights_scale").(float32); ok {
		h.ScaleW = v
	}
	if _, ok := src.Tensor("blk.0.attn_q_norm.weight"); ok {
		h.QKNorm = true
	}
	h.FFNPrecF32 = true
	return ffnShapes(h, src)
}
