package model

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"unicode"
)

// Params are the hyper-parameters of a Mixtral-layout MoE model
// (architecture "llama" with experts).
type Params struct {
	Layers      int `json:"layers"`
	Experts     int `json:"experts"`
	ExpertsUsed int `json:"experts_used"`
	Embd        int `json:"embd"`
	FF          int `json:"ff"`
	Heads       int `json:"heads"`
	KVHeads     int `json:"kv_heads"`
	Vocab       int `json:"vocab"`
	Context     int `json:"context"`
	// RopeFreqBase and RMSEps are written as llama.rope.freq_base and
	// llama.attention.layer_norm_rms_epsilon.
	RopeFreqBase float32 `json:"rope_freq_base"`
	RMSEps       float32 `json:"rms_eps"`
	// HeadSize is one attention head's size when it is not Embd/Heads
	// (Qwen3-30B-A3B: 32 heads of 128 in an embedding of 2048); 0: Embd/Heads.
	HeadSize int `json:"head_size,omitempty"`
	// TiedOutput leaves out output.weight: the output head is the token
	// embeddings (as small Qwen3 models have it).
	TiedOutput bool `json:"tied_output,omitempty"`
	// glm4moe: DenseLead leading layers with a dense feed-forward block of
	// DenseFF (no experts), SharedExperts experts every token uses, and a
	// rotary part of RopeDim of each head (GLM-4.5: half).
	DenseLead     int `json:"dense_lead,omitempty"`
	DenseFF       int `json:"dense_ff,omitempty"`
	SharedExperts int `json:"shared_experts,omitempty"`
	RopeDim       int `json:"rope_dim,omitempty"`
	// gpt-oss: every other layer (the even ones) attends to the last
	// SlidingWindow positions only, and RoPE is YaRN-scaled by
	// RopeScale from RopeOrigCtx positions (gpt-oss: 32 from 4096).
	SlidingWindow int     `json:"sliding_window,omitempty"`
	RopeScale     float32 `json:"rope_scale,omitempty"`
	RopeOrigCtx   int     `json:"rope_orig_ctx,omitempty"`
	// deepseek2: multi-head latent attention (Q through a rank-QLoraRank
	// bottleneck; K and V compressed to KVLoraRank, which is all the KV
	// cache holds, with RopeDim rotated dimensions beside it; HeadSize is
	// a head's nope + rope size, VHeadSize its value size), expert groups
	// (the top GroupsUsed of ExpertGroups groups are chosen first), and
	// YaRN's log multiplier (rope.scaling.yarn_log_multiplier). Dense
	// leading layers and shared experts as glm4moe's.
	QLoraRank    int     `json:"q_lora_rank,omitempty"`
	KVLoraRank   int     `json:"kv_lora_rank,omitempty"`
	VHeadSize    int     `json:"v_head_size,omitempty"`
	ExpertGroups int     `json:"expert_groups,omitempty"`
	GroupsUsed   int     `json:"groups_used,omitempty"`
	YarnLogMul   float32 `json:"yarn_log_mul,omitempty"`
	// Plant, if set, makes a model that speaks (architecture llama): greedy
	// decoding after BOS and any prefix of these tokens continues them and
	// then ends the text (see plant).
	Plant []int32 `json:"-"`
	// PlantPieces are extra vocabulary pieces, ahead of all others, so
	// that the tokenizer makes one token of each word of a planted text
	// (PlantPieces gives them).
	PlantPieces []string `json:"-"`
}

// PlantPieces are what makes arch's generated tokenizer cut text into one
// token per word: for the SentencePiece vocabulary (llama), each
// space-separated word with its leading '▁' and every prefix of it,
// shortest first (the tokenizer merges the best-scored adjacent pair
// first, so the chain of prefixes goes ahead of every other piece); for
// the GPT-2 BPE ones, the words as its pre-tokenizer cuts them (a letter,
// digit or other run with the space before it), whose merges then rank
// first. The architecture's user-defined tokens (<think>, </think>) are
// whole tokens already: the text between them is cut on its own, as
// llama.cpp's tokenizer does.
func PlantPieces(arch, text string) []string {
	if arch == "llama" {
		return spmPieces(text)
	}
	frags := []string{text}
	for _, u := range bpeUserTokens[arch] {
		var next []string
		for _, f := range frags {
			next = append(next, strings.Split(f, u)...)
		}
		frags = next
	}
	var out []string
	seen := map[string]bool{}
	for _, f := range frags {
		for _, w := range preTokens(f) {
			if !seen[w] {
				seen[w] = true
				out = append(out, w)
			}
		}
	}
	return out
}

// preTokens cuts text as GPT-2's pre-tokenizer regex does for plain
// prose: an optional space, then a run of letters, of digits, or of other
// non-space characters.
func preTokens(text string) []string {
	class := func(r rune) int {
		switch {
		case unicode.IsLetter(r):
			return 1
		case unicode.IsDigit(r):
			return 2
		case unicode.IsSpace(r):
			return 0
		}
		return 3
	}
	var out []string
	seen := map[string]bool{}
	rs := []rune(text)
	for i := 0; i < len(rs); {
		start := i
		if rs[i] == ' ' && i+1 < len(rs) && class(rs[i+1]) != 0 {
			i++
		}
		c := class(rs[i])
		for i++; i < len(rs) && c != 0 && class(rs[i]) == c; i++ {
		}
		if w := string(rs[start:i]); c != 0 && !seen[w] {
			seen[w] = true
			out = append(out, w)
		}
	}
	return out
}

func spmPieces(text string) []string {
	var out []string
	seen := map[string]bool{}
	for _, w := range strings.Fields(text) {
		rs := []rune("▁" + w)
		for i := 2; i <= len(rs); i++ {
			if p := string(rs[:i]); !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return out
}

// Presets are the named shapes of `neurod model make --preset`.
var Presets = map[string]Params{
	// tiny loads in milliseconds; for tests.
	"tiny": {Layers: 2, Experts: 4, ExpertsUsed: 2, Embd: 64, FF: 128, Heads: 4, KVHeads: 2, Vocab: 512, Context: 256,
		RopeFreqBase: 10000, RMSEps: 1e-5},
	// bench has about 1 B parameters in Mixtral's proportions (8 experts,
	// top-2, FF = 3.5 x embd, 4:1 grouped-query attention, 32k vocab).
	"bench": {Layers: 11, Experts: 8, ExpertsUsed: 2, Embd: 1024, FF: 3584, Heads: 16, KVHeads: 4, Vocab: 32000, Context: 2048,
		RopeFreqBase: 1e6, RMSEps: 1e-5},
}

// ArchPresets are the shapes of presets that differ by architecture: a
// qwen3moe bench model has Qwen3-30B-A3B's proportions (many small experts,
// 8 of 64 used, heads of 128 wider than embd/heads, 8:1 grouped-query
// attention) at about 1 B parameters.
var ArchPresets = map[string]map[string]Params{
	"glm4moe": {
		// GLM-4.5-Air's proportions, small: one dense leading layer, a
		// shared expert, half of each head rotated.
		"tiny": {Layers: 3, Experts: 8, ExpertsUsed: 2, Embd: 64, FF: 64, Heads: 4, KVHeads: 2, Vocab: 512, Context: 256,
			RopeFreqBase: 1e6, RMSEps: 1e-5, DenseLead: 1, DenseFF: 256, SharedExperts: 1, RopeDim: 8},
		// GLM-4.5-Air's proportions at about 0.9 B: 1 dense leading
		// layer, 8 of 64 experts and a shared one, heads of 128 (64
		// rotated) wider than embd/heads, 8:1 grouped-query attention.
		"bench": {Layers: 12, Experts: 64, ExpertsUsed: 8, Embd: 1024, FF: 352, Heads: 16, KVHeads: 2, HeadSize: 128,
			Vocab: 32000, Context: 2048, RopeFreqBase: 1e6, RMSEps: 1e-5, DenseLead: 1, DenseFF: 2816, SharedExperts: 1, RopeDim: 64},
	},
	"deepseek2": {
		// DeepSeek-V3's layout, small: a dense leading layer, a shared
		// expert, 8 experts in 4 groups (2 chosen), latent attention with
		// a compressed KV cache of 32 + 16 per token, YaRN.
		"tiny": {Layers: 3, Experts: 8, ExpertsUsed: 2, Embd: 64, FF: 64, Heads: 4, KVHeads: 1, HeadSize: 48, Vocab: 512,
			Context: 256, RopeFreqBase: 10000, RMSEps: 1e-6, DenseLead: 1, DenseFF: 256, SharedExperts: 1, RopeDim: 16,
			QLoraRank: 32, KVLoraRank: 32, VHeadSize: 32, ExpertGroups: 4, GroupsUsed: 2, RopeScale: 4, RopeOrigCtx: 64, YarnLogMul: 0.1},
		// DeepSeek-V3's proportions at about 0.9 B: 1 dense leading
		// layer, 8 of 64 experts in 8 groups (4 chosen) and a shared one,
		// 16 heads of 64 + 32 (value 64) through a KV rank of 128,
		// YaRN 40 from 4096.
		"bench": {Layers: 14, Experts: 64, ExpertsUsed: 8, Embd: 1024, FF: 256, Heads: 16, KVHeads: 1, HeadSize: 96,
			Vocab: 32000, Context: 163840, RopeFreqBase: 10000, RMSEps: 1e-6, DenseLead: 1, DenseFF: 2816, SharedExperts: 1,
			RopeDim: 32, QLoraRank: 384, KVLoraRank: 128, VHeadSize: 64, ExpertGroups: 8, GroupsUsed: 4,
			RopeScale: 40, RopeOrigCtx: 4096, YarnLogMul: 0.1},
	},
	"gpt-oss": {
		// gpt-oss's layout, small: one sliding-window and one full
		// layer, heads wider than embd/heads, YaRN, a window of 16 so
		// that short tests reach it.
		"tiny": {Layers: 2, Experts: 4, ExpertsUsed: 2, Embd: 64, FF: 64, Heads: 4, KVHeads: 2, HeadSize: 32, Vocab: 512,
			Context: 256, RopeFreqBase: 150000, RMSEps: 1e-5, SlidingWindow: 16, RopeScale: 4, RopeOrigCtx: 64},
		// gpt-oss-20b's proportions at about 1 B: experts as wide as the
		// embedding, 4 of 32 used, heads of 64 (8:1 grouped-query),
		// sliding windows of 128 on alternate layers, YaRN 32 from 4096.
		"bench": {Layers: 16, Experts: 32, ExpertsUsed: 4, Embd: 768, FF: 768, Heads: 16, KVHeads: 2, HeadSize: 64,
			Vocab: 32000, Context: 131072, RopeFreqBase: 150000, RMSEps: 1e-5, SlidingWindow: 128, RopeScale: 32, RopeOrigCtx: 4096},
	},
	"qwen3moe": {
		"bench": {Layers: 12, Experts: 64, ExpertsUsed: 8, Embd: 1024, FF: 384, Heads: 16, KVHeads: 2, HeadSize: 128,
			Vocab: 32000, Context: 2048, RopeFreqBase: 1e6, RMSEps: 1e-6},
	},
}

// Preset is the named shape for an architecture: its own when it has one
// (ArchPresets), else the shared one (Presets).
func Preset(arch, name string) (Params, bool) {
	if p, ok := ArchPresets[arch][name]; ok {
		return p, true
	}
	p, ok := Presets[name]
	return p, ok
}

// minVocab holds the control and byte tokens plus a few words.
const minVocab = 3 + 256 + 32

// Validate checks that the shape is one llama.cpp can run.
func (p Params) Validate() error {
	switch {
	case p.Layers < 1 || p.Layers > 1024:
		return fmt.Errorf("layers %d: want 1 to 1024", p.Layers)
	case p.Experts < 1 || p.Experts > 256:
		return fmt.Errorf("experts %d: want 1 to 256", p.Experts)
	case p.ExpertsUsed < 1 || p.ExpertsUsed > p.Experts:
		return fmt.Errorf("experts used %d: want 1 to experts (%d)", p.ExpertsUsed, p.Experts)
	case p.Embd < 32 || p.Embd%32 != 0:
		return fmt.Errorf("embd %d: want a positive multiple of 32", p.Embd)
	case p.FF < 32 || p.FF%32 != 0:
		return fmt.Errorf("ff %d: want a positive multiple of 32", p.FF)
	case p.HeadSize == 0 && (p.Heads < 1 || p.Embd%p.Heads != 0 || (p.Embd/p.Heads)%2 != 0):
		return fmt.Errorf("heads %d: must divide embd %d into an even head size", p.Heads, p.Embd)
	case p.HeadSize != 0 && (p.Heads < 1 || p.HeadSize < 2 || p.HeadSize%2 != 0 || p.HeadSize > 1024):
		return fmt.Errorf("head size %d: want an even size from 2 to 1024", p.HeadSize)
	case p.KVHeads < 1 || p.Heads%p.KVHeads != 0:
		return fmt.Errorf("kv heads %d: must divide heads %d", p.KVHeads, p.Heads)
	case p.Vocab < minVocab || p.Vocab > 1<<20:
		return fmt.Errorf("vocab %d: want %d to %d", p.Vocab, minVocab, 1<<20)
	case p.Context < 8 || p.Context > 1<<20:
		return fmt.Errorf("context %d: want 8 to %d", p.Context, 1<<20)
	case !(p.RopeFreqBase > 0) || !(p.RMSEps > 0):
		return errors.New("rope freq base and rms eps must be positive")
	case p.SlidingWindow < 0 || p.RopeOrigCtx < 0 || !(p.RopeScale >= 0) || (p.RopeScale > 0) != (p.RopeOrigCtx > 0):
		return fmt.Errorf("sliding window %d, rope scale %g from %d positions: want a window ≥ 0 and a scale with its original context", p.SlidingWindow, p.RopeScale, p.RopeOrigCtx)
	}
	return nil
}

// HeadDim is the size of one attention head.
func (p Params) HeadDim() int {
	if p.HeadSize != 0 {
		return p.HeadSize
	}
	return p.Embd / p.Heads
}

// ParamCount is the number of weights.
func (p Params) ParamCount() int64 {
	e, f, kv, q := int64(p.Embd), int64(p.FF), int64(p.KVHeads*p.HeadDim()), int64(p.Heads*p.HeadDim())
	attn := 2*e + e*q*2 + e*kv*2
	moe := e*int64(p.Experts) + 3*e*f*int64(p.Experts+p.SharedExperts)
	dense := 3 * e * int64(p.DenseFF)
	if p.KVLoraRank > 0 { // deepseek2's latent attention
		ql, kl, r, nope := int64(p.QLoraRank), int64(p.KVLoraRank), int64(p.RopeDim), int64(p.HeadSize-p.RopeDim)
		h, v := int64(p.Heads), int64(p.VHeadSize)
		attn = 2*e + ql + kl + e*ql + ql*h*int64(p.HeadSize) + e*(kl+r) + nope*kl*h + kl*v*h + h*v*e
	}
	if p.SlidingWindow > 0 { // gpt-oss's biases and sinks
		attn += q + 2*kv + e + int64(p.Heads)
		moe += int64(p.Experts) * (1 + 2*f + e)
	}
	return int64(p.Layers)*attn + int64(p.Layers-p.DenseLead)*moe + int64(p.DenseLead)*dense + 2*e*int64(p.Vocab) + e
}

// llama.cpp file types (general.file_type) for the types the generator
// writes.
var fileTypes = map[DType]uint32{F32: 0, F16: 1, Q4_0: 2, Q8_0: 7}

// Generate writes a model with seeded random weights: the same params,
// dtype and seed always give the same bytes. Large weights use dtype; norms
// and the router stay F32, as llama.cpp's quantizer leaves them.
func Generate(w io.Writer, p Params, dtype DType, seed uint64) error {
	return GenerateArch(w, "llama", p, dtype, seed)
}

// GenerateArchitectures are the layouts GenerateArch writes.
var GenerateArchitectures = []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"}

// GenerateArch is Generate for another layout: "llama" (Mixtral) or
// "qwen3moe" (Qwen3-MoE: per-head Q/K norms and the expert size under
// expert_feed_forward_length). Qwen3-MoE files are for the shard path; a
// llama.cpp-loadable Qwen3 tokenizer (GPT-2 BPE) is not generated.
func GenerateArch(w io.Writer, arch string, p Params, dtype DType, seed uint64) error {
	if !slices.Contains(GenerateArchitectures, arch) {
		return fmt.Errorf("generate: architecture %q: want one of %s", arch, strings.Join(GenerateArchitectures, ", "))
	}
	ds := arch == "deepseek2"
	if (arch == "gpt-oss") != (p.SlidingWindow > 0) || (arch != "gpt-oss" && !ds && p.RopeScale != 0) {
		return fmt.Errorf("generate: a sliding window is gpt-oss's (and it needs one), YaRN gpt-oss's and deepseek2's, not %s's", arch)
	}
	glmLike := arch == "glm4moe" || ds
	if !glmLike && (p.DenseLead != 0 || p.SharedExperts != 0 || p.RopeDim != 0) {
		return fmt.Errorf("generate: dense leading layers, shared experts and a partial rotary dimension are glm4moe's and deepseek2's, not %s's", arch)
	}
	if glmLike && (p.DenseLead >= p.Layers || p.DenseFF%32 != 0 || (p.DenseLead > 0 && p.DenseFF < 32) ||
		p.RopeDim < 0 || p.RopeDim%2 != 0 || p.RopeDim > p.HeadDim()) {
		return fmt.Errorf("generate: %s: %d dense leading layers of ff %d, rope dim %d for heads of %d", arch, p.DenseLead, p.DenseFF, p.RopeDim, p.HeadDim())
	}
	if ds != (p.KVLoraRank > 0) || (!ds && (p.QLoraRank != 0 || p.VHeadSize != 0 || p.ExpertGroups != 0 || p.YarnLogMul != 0)) {
		return fmt.Errorf("generate: latent attention (a KV rank) is deepseek2's, and deepseek2 needs it")
	}
	if ds && (p.QLoraRank < 1 || p.KVLoraRank%2 != 0 || p.VHeadSize < 1 || p.RopeDim < 2 || p.HeadSize <= p.RopeDim || p.KVHeads != 1 ||
		p.ExpertGroups < 0 || (p.ExpertGroups > 1 && (p.Experts%p.ExpertGroups != 0 || p.GroupsUsed < 1 || p.GroupsUsed > p.ExpertGroups ||
		p.ExpertsUsed > p.GroupsUsed*(p.Experts/p.ExpertGroups) || p.Experts/p.ExpertGroups < 2))) {
		return fmt.Errorf("generate: deepseek2: q rank %d, kv rank %d, heads of %d (rope %d, value %d), %d kv heads, %d of %d expert groups",
			p.QLoraRank, p.KVLoraRank, p.HeadSize, p.RopeDim, p.VHeadSize, p.KVHeads, p.GroupsUsed, p.ExpertGroups)
	}
	if arch == "llama" && p.HeadSize != 0 && p.HeadSize*p.Heads != p.Embd {
		return errors.New("generate: a head size other than embd/heads is for qwen3moe (llama's gating compute assumes embd/heads)")
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	ft, ok := fileTypes[dtype]
	if !ok {
		return fmt.Errorf("generate: %w %s (want f32, f16, q8_0 or q4_0)", ErrUnsupportedDType, dtype)
	}
	tokens, scores, types := vocabulary(p.Vocab, p.PlantPieces)
	u32 := func(n int) uint32 { return uint32(n) }
	a := arch + "."
	ffKey := "feed_forward_length"
	if arch != "llama" {
		ffKey = "expert_feed_forward_length"
	}
	ropeDim := p.HeadDim()
	if p.RopeDim != 0 {
		ropeDim = p.RopeDim
	}
	kvs := []KV{
		{"general.architecture", arch},
		{"general.name", "neuro-test"},
		{"general.file_type", ft},
		{"general.seed", seed},
		{a + "block_count", u32(p.Layers)},
		{a + "context_length", u32(p.Context)},
		{a + "embedding_length", u32(p.Embd)},
		{a + ffKey, u32(p.FF)},
		{a + "attention.head_count", u32(p.Heads)},
		{a + "attention.head_count_kv", u32(p.KVHeads)},
		{a + "rope.freq_base", p.RopeFreqBase},
		{a + "rope.dimension_count", u32(ropeDim)},
		{a + "attention.layer_norm_rms_epsilon", p.RMSEps},
		{a + "expert_count", u32(p.Experts)},
		{a + "expert_used_count", u32(p.ExpertsUsed)},
		{a + "vocab_size", u32(p.Vocab)},
	}
	if arch == "llama" {
		// Mixtral's SentencePiece tokenizer.
		kvs = append(kvs, []KV{
			{"tokenizer.ggml.model", "llama"},
			{"tokenizer.ggml.tokens", tokens},
			{"tokenizer.ggml.scores", scores},
			{"tokenizer.ggml.token_type", types},
			{"tokenizer.ggml.bos_token_id", uint32(1)},
			{"tokenizer.ggml.eos_token_id", uint32(2)},
			{"tokenizer.ggml.unknown_token_id", uint32(0)},
			{"tokenizer.ggml.add_bos_token", true},
			{"tokenizer.ggml.add_eos_token", false},
		}...)
	} else {
		// Qwen3's, gpt-oss's and GLM's GPT-2 byte-level BPE: no BOS is
		// added; a turn ends with <|im_end|> (Qwen), <|return|> (gpt-oss's
		// harmony format) or the next role token (GLM's <|user|>), the
		// text with <|endoftext|>.
		controls := bpeControls[arch]
		btoks, btypes, merges := bpeVocabulary(p.Vocab, bpeUserTokens[arch], controls, p.PlantPieces)
		first := uint32(len(btoks) - len(controls))
		bos, eos := first, first+2 // <|endoftext|>, <|im_end|>
		addBOS := false
		switch arch {
		case "deepseek2":
			eos, addBOS = first+1, true // <｜end▁of▁sentence｜>; DeepSeek-V3 starts with <｜begin▁of▁sentence｜>
		case "glm4moe":
			eos = first + 4 // <|user|>
		case "gpt-oss":
			eos = first + 2 // <|return|>, after <|startoftext|> and <|endoftext|>
		}
		pre := map[string]string{"qwen3moe": "qwen2", "glm4moe": "glm4", "gpt-oss": "gpt-4o", "deepseek2": "deepseek-v3"}[arch]
		kvs = append(kvs, []KV{
			{"tokenizer.ggml.model", "gpt2"},
			{"tokenizer.ggml.pre", pre},
			{"tokenizer.ggml.tokens", btoks},
			{"tokenizer.ggml.token_type", btypes},
			{"tokenizer.ggml.merges", merges},
			{"tokenizer.ggml.bos_token_id", bos},
			{"tokenizer.ggml.eos_token_id", eos},
			{"tokenizer.ggml.padding_token_id", first},
			{"tokenizer.ggml.add_bos_token", addBOS},
			{"tokenizer.chat_template", chatTemplates[arch]},
		}...)
	}
	switch {
	case ds:
		// The KV cache's "head" is the compressed KV and the rotated part
		// (MQA: one KV head); a head's own sizes are the _mla lengths.
		kvs = append(kvs, KV{a + "attention.key_length", u32(p.KVLoraRank + p.RopeDim)}, KV{a + "attention.value_length", u32(p.KVLoraRank)},
			KV{a + "attention.key_length_mla", u32(p.HeadSize)}, KV{a + "attention.value_length_mla", u32(p.VHeadSize)},
			KV{a + "attention.q_lora_rank", u32(p.QLoraRank)}, KV{a + "attention.kv_lora_rank", u32(p.KVLoraRank)})
		if p.ExpertGroups > 1 {
			kvs = append(kvs, KV{a + "expert_group_count", u32(p.ExpertGroups)}, KV{a + "expert_group_used_count", u32(p.GroupsUsed)})
		}
	case arch != "llama":
		// Qwen3's, gpt-oss's and GLM's head size is their own (128, 64),
		// not embd/heads.
		kvs = append(kvs, KV{a + "attention.key_length", u32(p.HeadDim())}, KV{a + "attention.value_length", u32(p.HeadDim())})
	}
	if glmLike {
		kvs = append(kvs, KV{a + "feed_forward_length", u32(p.DenseFF)}, KV{a + "leading_dense_block_count", u32(p.DenseLead)},
			KV{a + "expert_shared_count", u32(p.SharedExperts)}, KV{a + "expert_weights_scale", float32(2.5)},
			KV{a + "expert_weights_norm", true}, KV{a + "expert_gating_func", uint32(2)}) // sigmoid
	}
	if arch == "glm4moe" {
		kvs = append(kvs, KV{a + "nextn_predict_layers", uint32(0)})
	}

	if arch == "gpt-oss" {
		kvs = append(kvs, KV{a + "attention.sliding_window", u32(p.SlidingWindow)})
	}
	if p.RopeScale > 0 {
		kvs = append(kvs, KV{a + "rope.scaling.type", "yarn"}, KV{a + "rope.scaling.factor", p.RopeScale},
			KV{a + "rope.scaling.original_context_length", u32(p.RopeOrigCtx)})
		if p.YarnLogMul != 0 {
			kvs = append(kvs, KV{a + "rope.scaling.yarn_log_multiplier", p.YarnLogMul})
		}
	}

	var pl *plant
	if len(p.Plant) > 0 {
		if p.TiedOutput {
			return fmt.Errorf("generate: a planted model needs an output head of its own (not --tied-output)")
		}
		var err error
		if pl, err = newPlant(arch, p, p.Plant); err != nil {
			return fmt.Errorf("generate: %w", err)
		}
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	e, f, kvDim, qDim := uint64(p.Embd), uint64(p.FF), uint64(p.KVHeads*p.HeadDim()), uint64(p.Heads*p.HeadDim())
	var tensors []TensorData
	// add queues a tensor whose values are drawn when the writer reaches
	// it, so that a large model never sits in memory whole. Values are
	// uniform in [center-scale, center+scale].
	add := func(name string, t DType, center, scale float32, shape ...uint64) {
		info := TensorInfo{Name: name, Type: t, Shape: shape}
		tensors = append(tensors, TensorData{Info: info, Data: &lazyReader{gen: func() ([]byte, error) {
			x := make([]float32, info.Elements())
			for i := range x {
				x[i] = center + scale*(2*rng.Float32()-1)
			}
			if pl != nil {
				pl.tensor(name, x, p.Experts)
			}
			return Encode(t, x)
		}}})
	}
	inv := func(n uint64) float32 { return float32(1 / math.Sqrt(float64(n))) }
	add("token_embd.weight", dtype, 0, 1, e, uint64(p.Vocab))
	for l := range p.Layers {
		b := fmt.Sprintf("blk.%d.", l)
		add(b+"attn_norm.weight", F32, 1, 0.1, e)
		if ds {
			dsLayer(add, b, l, p, dtype)
			continue
		}
		add(b+"attn_q.weight", dtype, 0, inv(e), e, qDim)
		add(b+"attn_k.weight", dtype, 0, inv(e), e, kvDim)
		add(b+"attn_v.weight", dtype, 0, inv(e), e, kvDim)
		add(b+"attn_output.weight", dtype, 0, inv(qDim), qDim, e)
		if arch == "qwen3moe" {
			add(b+"attn_q_norm.weight", F32, 1, 0.1, uint64(p.HeadDim()))
			add(b+"attn_k_norm.weight", F32, 1, 0.1, uint64(p.HeadDim()))
		}
		if arch == "glm4moe" {
			glmLayer(add, b, l, p, dtype)
			continue
		}
		if arch == "gpt-oss" {
			ossLayer(add, b, p, dtype)
			continue
		}
		add(b+"ffn_norm.weight", F32, 1, 0.1, e)
		add(b+"ffn_gate_inp.weight", F32, 0, 4*inv(e), e, uint64(p.Experts))
		add(b+"ffn_gate_exps.weight", dtype, 0, inv(e), e, f, uint64(p.Experts))
		add(b+"ffn_down_exps.weight", dtype, 0, inv(f), f, e, uint64(p.Experts))
		add(b+"ffn_up_exps.weight", dtype, 0, inv(e), e, f, uint64(p.Experts))
	}
	add("output_norm.weight", F32, 1, 0.1, e)
	if !p.TiedOutput {
		add("output.weight", dtype, 0, 2*inv(e), e, uint64(p.Vocab))
	}
	if err := Write(w, kvs, tensors); err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	return nil
}

// lazyReader produces its bytes on the first Read.
type lazyReader struct {
	gen func() ([]byte, error)
	r   *bytes.Reader
}

func (l *lazyReader) Read(p []byte) (int, error) {
	if l.r == nil {
		b, err := l.gen()
		if err != nil {
			return 0, err
		}
		l.r = bytes.NewReader(b)
	}
	return l.r.Read(p)
}

// Token types of llama.cpp's SentencePiece vocabulary.
const (
	tokNormal  int32 = 1
	tokUnknown int32 = 2
	tokControl int32 = 3
	tokUser    int32 = 4 // user-defined: matched whole, rendered as text
	tokByte    int32 = 6
)

var commonWords = []string{
	"the", "of", "and", "to", "in", "is", "that", "it", "was", "for", "on", "are", "with", "as", "be", "at",
	"this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when",
	"your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will",
	"up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
	"like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
	"could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find",
	"expert", "network", "peer", "model", "token", "hello", "world", "once", "upon", "story", "machine",
}

// vocabulary builds a SentencePiece-style vocabulary of n tokens that
// llama.cpp's "llama" tokenizer accepts: <unk>, <s>, </s>, the 256 byte
// tokens, then words and letter pieces ('▁' marks a leading space).
func vocabulary(n int, first []string) (tokens []string, scores []float32, types []int32) {
	add := func(tok string, score float32, typ int32) {
		tokens, scores, types = append(tokens, tok), append(scores, score), append(types, typ)
	}
	add("<unk>", 0, tokUnknown)
	add("<s>", 0, tokControl)
	add("</s>", 0, tokControl)
	for b := range 256 {
		add(fmt.Sprintf("<0x%02X>", b), 0, tokByte)
	}
	seen := map[string]bool{}
	var pieces []string
	piece := func(s string) {
		if !seen[s] {
			seen[s] = true
			pieces = append(pieces, s)
		}
	}
	for _, p := range first {
		piece(p)
	}
	piece("▁")
	for c := 'a'; c <= 'z'; c++ {
		piece(string(c))
		piece("▁" + string(c))
	}
	for _, w := range commonWords {
		piece("▁" + w)
	}
	for c1 := 'a'; c1 <= 'z'; c1++ {
		for c2 := 'a'; c2 <= 'z'; c2++ {
			piece(string(c1) + string(c2))
			piece("▁" + string(c1) + string(c2))
		}
	}
	for i := 0; len(pieces) < n; i++ {
		piece(fmt.Sprintf("▁w%d", i))
	}
	for i, p := range pieces[:n-len(tokens)] {
		add(p, -float32(i), tokNormal)
	}
	return tokens, scores, types
}

// ossLayer adds the rest of a gpt-oss layer after its attention weights:
// the Q/K/V/output biases, the attention sinks, the post-attention norm,
// the router with its bias, and the experts with theirs.
func ossLayer(add func(string, DType, float32, float32, ...uint64), b string, p Params, dtype DType) {
	e, f, n := uint64(p.Embd), uint64(p.FF), uint64(p.Experts)
	hd := uint64(p.HeadDim())
	inv := func(n uint64) float32 { return float32(1 / math.Sqrt(float64(n))) }
	add(b+"attn_q.bias", F32, 0, 0.1, uint64(p.Heads)*hd)
	add(b+"attn_k.bias", F32, 0, 0.1, uint64(p.KVHeads)*hd)
	add(b+"attn_v.bias", F32, 0, 0.1, uint64(p.KVHeads)*hd)
	add(b+"attn_output.bias", F32, 0, 0.1, e)
	add(b+"attn_sinks.weight", F32, 0, 1, uint64(p.Heads))
	add(b+"post_attention_norm.weight", F32, 1, 0.1, e) // LLM_TENSOR_ATTN_POST_NORM
	add(b+"ffn_gate_inp.weight", F32, 0, 4*inv(e), e, n)
	add(b+"ffn_gate_inp.bias", F32, 0, 0.1, n)
	add(b+"ffn_gate_exps.weight", dtype, 0, inv(e), e, f, n)
	add(b+"ffn_gate_exps.bias", F32, 0, 0.1, f, n)
	add(b+"ffn_down_exps.weight", dtype, 0, inv(f), f, e, n)
	add(b+"ffn_down_exps.bias", F32, 0, 0.1, e, n)
	add(b+"ffn_up_exps.weight", dtype, 0, inv(e), e, f, n)
	add(b+"ffn_up_exps.bias", F32, 0, 0.1, f, n)
}

// dsLayer adds a deepseek2 layer after its attention norm: latent
// attention (Q through its low-rank bottleneck and norm; the compressed KV
// and the rotated key part; the per-head absorbed K and V projections),
// then the rest as GLM's (a dense FFN, or the router, experts and shared
// experts) but with ffn_norm.
func dsLayer(add func(string, DType, float32, float32, ...uint64), b string, l int, p Params, dtype DType) {
	e, h := uint64(p.Embd), uint64(p.Heads)
	ql, kl, r := uint64(p.QLoraRank), uint64(p.KVLoraRank), uint64(p.RopeDim)
	k, v := uint64(p.HeadSize), uint64(p.VHeadSize)
	inv := func(n uint64) float32 { return float32(1 / math.Sqrt(float64(n))) }
	add(b+"attn_q_a_norm.weight", F32, 1, 0.1, ql)
	add(b+"attn_kv_a_norm.weight", F32, 1, 0.1, kl)
	add(b+"attn_q_a.weight", dtype, 0, inv(e), e, ql)
	add(b+"attn_q_b.weight", dtype, 0, inv(ql), ql, h*k)
	add(b+"attn_kv_a_mqa.weight", dtype, 0, inv(e), e, kl+r)
	add(b+"attn_k_b.weight", dtype, 0, inv(k-r), k-r, kl, h)
	add(b+"attn_v_b.weight", dtype, 0, inv(kl), kl, v, h)
	add(b+"attn_output.weight", dtype, 0, inv(h*v), h*v, e)
	glmFFN(add, b, l, p, dtype, "ffn_norm.weight")
}

// glmLayer adds the rest of a glm4moe layer after its attention weights:
// Q/K/V biases, the post-attention norm, and either a dense feed-forward
// block (the leading layers) or the router with its selection bias, the
// experts and the shared experts.
func glmLayer(add func(string, DType, float32, float32, ...uint64), b string, l int, p Params, dtype DType) {
	hd := uint64(p.HeadDim())
	add(b+"attn_q.bias", F32, 0, 0.1, uint64(p.Heads)*hd)
	add(b+"attn_k.bias", F32, 0, 0.1, uint64(p.KVHeads)*hd)
	add(b+"attn_v.bias", F32, 0, 0.1, uint64(p.KVHeads)*hd)
	glmFFN(add, b, l, p, dtype, "post_attention_norm.weight") // LLM_TENSOR_ATTN_POST_NORM
}

// glmFFN adds the feed-forward norm (named norm) and either a dense
// feed-forward block (the leading layers) or the router with its selection
// bias, the experts and the shared experts.
func glmFFN(add func(string, DType, float32, float32, ...uint64), b string, l int, p Params, dtype DType, norm string) {
	e, f := uint64(p.Embd), uint64(p.FF)
	inv := func(n uint64) float32 { return float32(1 / math.Sqrt(float64(n))) }
	add(b+norm, F32, 1, 0.1, e)
	if l < p.DenseLead {
		d := uint64(p.DenseFF)
		add(b+"ffn_gate.weight", dtype, 0, inv(e), e, d)
		add(b+"ffn_down.weight", dtype, 0, inv(d), d, e)
		add(b+"ffn_up.weight", dtype, 0, inv(e), e, d)
		return
	}
	add(b+"ffn_gate_inp.weight", F32, 0, 4*inv(e), e, uint64(p.Experts))
	add(b+"exp_probs_b.bias", F32, 0, 0.05, uint64(p.Experts))
	add(b+"ffn_gate_exps.weight", dtype, 0, inv(e), e, f, uint64(p.Experts))
	add(b+"ffn_down_exps.weight", dtype, 0, inv(f), f, e, uint64(p.Experts))
	add(b+"ffn_up_exps.weight", dtype, 0, inv(e), e, f, uint64(p.Experts))
	if p.SharedExperts > 0 {
		sf := f * uint64(p.SharedExperts)
		add(b+"ffn_gate_shexp.weight", dtype, 0, inv(e), e, sf)
		add(b+"ffn_down_shexp.weight", dtype, 0, inv(sf), sf, e)
		add(b+"ffn_up_shexp.weight", dtype, 0, inv(e), e, sf)
	}
}
