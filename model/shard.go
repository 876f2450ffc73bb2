package model

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
	"github.com/neuro-p2p/neuro/neuropb"
)

// Files of a split model directory.
const (
	ManifestFile = "manifest.pb"
	shardExt     = ".gguf"
)

// Errors of shard handling. Compare with errors.Is.
var (
	// ErrCIDMismatch means a shard or manifest's bytes do not hash to the
	// CID they were asked for under: corrupt, truncated or substituted.
	ErrCIDMismatch = errors.New("content does not match its CID")
	// ErrNotMoE means the model has no expert tensors to split out.
	ErrNotMoE = errors.New("not a mixture-of-experts model")
)

// SupportedArchitectures are the MoE layouts Split understands: Mixtral's
// (llama with experts) and Qwen3-MoE's. Both name their expert tensors
// blk.N.ffn_{gate,up,down}_exps.weight.
var SupportedArchitectures = []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"}

// CIDOf returns the CIDv1 (raw codec, sha2-256) of data.
func CIDOf(data []byte) cid.Cid {
	sum := sha256.Sum256(data)
	return cidFromSHA256(sum[:])
}

func cidFromSHA256(sum []byte) cid.Cid {
	h, err := mh.Encode(sum, mh.SHA2_256)
	if err != nil {
		panic(err) // unreachable: a 32-byte digest always encodes
	}
	return cid.NewCidV1(cid.Raw, h)
}

// expertTensor matches the expert tensors of a MoE layer: the weights and,
// where the model has them (gpt-oss), the per-expert biases.
var expertTensor = regexp.MustCompile(`^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|bias)$`)

// expertParts are the three tensors of an expert, in shard order.
var expertParts = []string{"gate", "up", "down"}

// ExpertTensorName is the name of an expert's tensor inside its shard: the
// dense-FFN name of its layer ("blk.3.ffn_up.weight").
func ExpertTensorName(layer int, part string) string {
	return fmt.Sprintf("blk.%d.ffn_%s.weight", layer, part)
}

// ExpertBiasName is the name of an expert's bias inside its shard
// ("blk.3.ffn_up.bias"), for models whose experts have biases (gpt-oss).
func ExpertBiasName(layer int, part string) string {
	return fmt.Sprintf("blk.%d.ffn_%s.bias", layer, part)
}

// Expert activations: what an expert shard's KeyActivation says its
// expert computes between its up and down projections. Every expert shard
// carries it, so that an expert node computes what the model's own graph
// does without knowing the architecture.
const (
	// KeyActivation is the expert shard's metadata key.
	KeyActivation = "neuro.activation"
	// ActSwiGLU is silu(gate) * up (llama.cpp's LLM_FFN_SILU).
	ActSwiGLU = "swiglu"
	// ActSwiGLUOAI is gpt-oss's swiglu_oai: g = min(gate, 7),
	// g * sigmoid(1.702 g) * (clamp(up, -7, 7) + 1).
	ActSwiGLUOAI = "swiglu_oai"
)

// KeyExpertKind marks an expert shard that holds a layer's shared experts
// (ExpertKindShared): llama.cpp computes them as a dense feed-forward
// block (build_ffn: plain matrix products), not through the expert
// stack (mul_mat_id). KeyDownPrecF32 (a bool) asks for the down
// projection at F32 precision, as llama.cpp's GLM-4 graph sets it.
const (
	KeyExpertKind    = "neuro.expert_kind"
	ExpertKindShared = "shared"
	KeyDownPrecF32   = "neuro.down_prec_f32"
)

// KeyLayer is the layer an expert or layer shard belongs to.
const KeyLayer = "neuro.layer"

// sharedExpertTensor matches a layer's shared-expert tensors.
var sharedExpertTensor = regexp.MustCompile(`^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$`)

// SplitOptions tune Split.
type SplitOptions struct {
	// SharedRemote puts each MoE layer's shared experts (GLM, DeepSeek)
	// in a shard of their own that expert nodes host and gating nodes
	// call like a routed expert (the manifest's shared list), instead of
	// in the gating shard.
	SharedRemote bool
	// Progress, if set, is told each shard written: done of total.
	Progress func(done, total int)
}

// expertActivations are the architectures whose experts do not compute
// ActSwiGLU.
var expertActivations = map[string]string{"gpt-oss": ActSwiGLUOAI}

// ExpertActivation is the activation an architecture's experts compute.
func ExpertActivation(arch string) string {
	if a, ok := expertActivations[arch]; ok {
		return a
	}
	return ActSwiGLU
}

// SplitResult is what Split wrote.
type SplitResult struct {
	ModelCID cid.Cid
	Manifest *neuropb.Manifest
}

// Split reads the GGUF model at path and writes to dir one shard per
// (layer, expert) holding exactly that expert's gate, up and down tensors,
// one gating shard with everything else (and all metadata), and the
// manifest. Shard files are named by their CID. The model CID is the CID of
// the manifest.
func Split(path, dir string) (*SplitResult, error) { return SplitProgress(path, dir, nil) }

// ReadParams reads the shape of the MoE model in the GGUF file at path.
func ReadParams(path string) (*neuropb.ModelParams, error) {
	src, _, params, err := openMoE(path)
	if err != nil {
		return nil, err
	}
	src.Close()
	return params, nil
}

// openMoE opens the GGUF file at path and reads its header and MoE shape.
func openMoE(path string) (*os.File, *File, *neuropb.ModelParams, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, nil, nil, err
	}
	fail := func(err error) (*os.File, *File, *neuropb.ModelParams, error) {
		src.Close()
		return nil, nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	st, err := src.Stat()
	if err != nil {
		return fail(err)
	}
	f, err := ReadFile(src, st.Size())
	if err != nil {
		return fail(err)
	}
	arch, _ := f.Get("general.architecture").(string)
	if !slices.Contains(SupportedArchitectures, arch) {
		return fail(fmt.Errorf("architecture %q is not supported (want one of %v)", arch, SupportedArchitectures))
	}
	params, err := readParams(f, arch)
	if err != nil {
		return fail(err)
	}
	return src, f, params, nil
}

// SplitProgress is Split that reports each shard written: done of total
// (the gating shard and every expert's).
func SplitProgress(path, dir string, progress func(done, total int)) (*SplitResult, error) {
	return SplitWith(path, dir, SplitOptions{Progress: progress})
}

// SplitWith is Split with options.
func SplitWith(path, dir string, o SplitOptions) (*SplitResult, error) {
	progress := o.Progress
	if progress == nil {
		progress = func(int, int) {}
	}
	src, f, params, err := openMoE(path)
	if err != nil {
		return nil, fmt.Errorf("split: %w", err)
	}
	defer src.Close()
	arch, _ := f.Get("general.architecture").(string)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("split: %w", err)
	}
	m := &neuropb.Manifest{Format: 2, Architecture: arch, Params: params}

	// Sort the tensors: expert tensors by layer, the rest to the gating shard.
	experts := map[int]map[string]TensorInfo{} // layer -> part -> tensor
	biases := map[int]map[string]TensorInfo{}  // layer -> part -> bias, where the experts have them
	shared := map[int]map[string]TensorInfo{}  // layer -> part -> tensor, with o.SharedRemote
	var gating []TensorData
	for _, t := range f.Tensors {
		m.TensorOrder = append(m.TensorOrder, t.Name)
		if g := sharedExpertTensor.FindStringSubmatch(t.Name); g != nil && o.SharedRemote {
			layer, _ := strconv.Atoi(g[1])
			if len(t.Shape) != 2 || layer < int(params.DenseLead) || layer >= int(params.Layers) {
				return nil, fmt.Errorf("split %s: shared expert tensor %s: shape %v in layer %d", path, t.Name, t.Shape, layer)
			}
			if shared[layer] == nil {
				shared[layer] = map[string]TensorInfo{}
			}
			shared[layer][g[2]] = t
			continue
		}
		if g := expertTensor.FindStringSubmatch(t.Name); g != nil {
			layer, _ := strconv.Atoi(g[1])
			dims, into := 3, experts
			if g[3] == "bias" {
				dims, into = 2, biases
			}
			if len(t.Shape) == dims-1 && params.Experts == 1 {
				// GGUF writers drop a trailing dimension of 1.
				t.Shape = append(slices.Clone(t.Shape), 1)
			}
			if len(t.Shape) != dims || t.Shape[dims-1] != uint64(params.Experts) {
				return nil, fmt.Errorf("split %s: tensor %s: shape %v, want %d dimensions with %d experts", path, t.Name, t.Shape, dims, params.Experts)
			}
			if layer >= int(params.Layers) {
				return nil, fmt.Errorf("split %s: tensor %s: layer %d beyond block_count %d", path, t.Name, layer, params.Layers)
			}
			if into[layer] == nil {
				into[layer] = map[string]TensorInfo{}
			}
			into[layer][g[2]] = t
			continue
		}
		gating = append(gating, TensorData{Info: t, Data: f.TensorReader(src, t)})
	}
	if len(experts) == 0 {
		return nil, fmt.Errorf("split %s: %w (no blk.N.ffn_*_exps tensors)", path, ErrNotMoE)
	}
	for layer := range biases {
		if layer < int(params.DenseLead) {
			return nil, fmt.Errorf("split %s: expert biases in dense leading layer %d", path, layer)
		}
	}
	for layer := range int(params.Layers) {
		for _, part := range expertParts {
			_, ok := experts[layer][part]
			if dense := layer < int(params.DenseLead); ok == dense {
				if dense {
					return nil, fmt.Errorf("split %s: tensor blk.%d.ffn_%s_exps.weight in a dense leading layer (%d of them)", path, layer, part, params.DenseLead)
				}
				return nil, fmt.Errorf("split %s: missing tensor blk.%d.ffn_%s_exps.weight", path, layer, part)
			}
		}
	}

	if o.SharedRemote {
		if len(shared) == 0 {
			return nil, fmt.Errorf("split %s: --shared-experts remote: the model has no shared experts (blk.N.ffn_*_shexp)", path)
		}
		for layer := int(params.DenseLead); layer < int(params.Layers); layer++ {
			if len(shared[layer]) != len(expertParts) {
				return nil, fmt.Errorf("split %s: MoE layer %d has %d of the three shared expert tensors", path, layer, len(shared[layer]))
			}
		}
	}
	total, done := 2+int(params.Layers)+int(params.Layers-params.DenseLead)*(int(params.Experts)+min(1, len(shared))), 0
	progress(0, total)
	if m.Gating, err = writeShard(dir, f.KVs, gating); err != nil {
		return nil, fmt.Errorf("split %s: gating shard: %w", path, err)
	}
	done++
	progress(done, total)
	if m.Head, m.Layers, err = writeLayerShards(dir, f, src, gating, int(params.Layers), func() { done++; progress(done, total) }); err != nil {
		return nil, fmt.Errorf("split %s: %w", path, err)
	}
	for layer := int(params.DenseLead); layer < int(params.Layers); layer++ {
		for e := range int(params.Experts) {
			kvs := []KV{
				{"general.architecture", arch},
				{arch + ".block_count", uint32(layer + 1)},
				{KeyLayer, uint32(layer)},
				{"neuro.expert", uint32(e)},
			}
			if act := ExpertActivation(arch); act != ActSwiGLU {
				kvs = append(kvs, KV{KeyActivation, act})
			}
			// expert e's slice of a stacked tensor: its last dimension
			// counts the experts.
			slice := func(t TensorInfo, name string) TensorData {
				n := t.Size() / t.Shape[len(t.Shape)-1]
				return TensorData{
					Info: TensorInfo{Name: name, Type: t.Type, Shape: t.Shape[:len(t.Shape)-1]},
					Data: io.NewSectionReader(src, f.DataOffset+int64(t.Offset)+int64(n)*int64(e), int64(n)),
				}
			}
			var tds []TensorData
			for _, part := range expertParts {
				tds = append(tds, slice(experts[layer][part], ExpertTensorName(layer, part)))
			}
			for _, part := range expertParts {
				if t, ok := biases[layer][part]; ok {
					tds = append(tds, slice(t, ExpertBiasName(layer, part)))
				}
			}
			ref, err := writeShard(dir, kvs, tds)
			if err != nil {
				return nil, fmt.Errorf("split %s: expert %d:%d: %w", path, layer, e, err)
			}
			m.Experts = append(m.Experts, &neuropb.ExpertShardRef{Layer: uint32(layer), Expert: uint32(e), Shard: ref})
			done++
			progress(done, total)
		}
	}
	for layer := int(params.DenseLead); layer < int(params.Layers) && len(shared) > 0; layer++ {
		// The layer's shared experts, as one expert numbered after the
		// routed ones.
		kvs := []KV{
			{"general.architecture", arch},
			{arch + ".block_count", uint32(layer + 1)},
			{KeyLayer, uint32(layer)},
			{"neuro.expert", params.Experts},
			{KeyExpertKind, ExpertKindShared},
		}
		if arch == "glm4moe" {
			kvs = append(kvs, KV{KeyDownPrecF32, true})
		}
		var tds []TensorData
		for _, part := range expertParts {
			t := shared[layer][part]
			tds = append(tds, TensorData{Info: TensorInfo{Name: ExpertTensorName(layer, part), Type: t.Type, Shape: t.Shape},
				Data: f.TensorReader(src, t)})
		}
		ref, err := writeShard(dir, kvs, tds)
		if err != nil {
			return nil, fmt.Errorf("split %s: shared expert of layer %d: %w", path, layer, err)
		}
		m.Shared = append(m.Shared, &neuropb.ExpertShardRef{Layer: uint32(layer), Expert: params.Experts, Shard: ref})
		done++
		progress(done, total)
	}
	raw, err := MarshalManifest(m)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, ManifestFile), raw, 0o644); err != nil {
		return nil, fmt.Errorf("split: %w", err)
	}
	return &SplitResult{ModelCID: CIDOf(raw), Manifest: m}, nil
}

// layerTensor matches a layer's tensors.
var layerTensor = regexp.MustCompile(`^blk\.(\d+)\.`)

// writeLayerShards writes the gating shard's tensors again as format 2's
// head shard (the tensors of no layer, and all metadata) and one shard
// per layer (its tensors, and the metadata but the tokenizer), calling
// wrote after each.
func writeLayerShards(dir string, f *File, src io.ReaderAt, gating []TensorData, layers int, wrote func()) (*neuropb.ShardRef, []*neuropb.LayerShardRef, error) {
	var head []TensorData
	per := make([][]TensorData, layers)
	for _, t := range gating {
		td := TensorData{Info: t.Info, Data: f.TensorReader(src, t.Info)}
		g := layerTensor.FindStringSubmatch(t.Info.Name)
		if g == nil {
			head = append(head, td)
			continue
		}
		l, err := strconv.Atoi(g[1])
		if err != nil || l >= layers {
			return nil, nil, fmt.Errorf("tensor %s: layer beyond block_count %d", t.Info.Name, layers)
		}
		per[l] = append(per[l], td)
	}
	headRef, err := writeShard(dir, f.KVs, head)
	if err != nil {
		return nil, nil, fmt.Errorf("head shard: %w", err)
	}
	wrote()
	var meta []KV
	for _, kv := range f.KVs {
		if !strings.HasPrefix(kv.Key, "tokenizer.") {
			meta = append(meta, kv)
		}
	}
	refs := make([]*neuropb.LayerShardRef, layers)
	for l, tds := range per {
		if len(tds) == 0 {
			return nil, nil, fmt.Errorf("layer %d has no attention tensors", l)
		}
		ref, err := writeShard(dir, append(slices.Clone(meta), KV{KeyLayer, uint32(l)}), tds)
		if err != nil {
			return nil, nil, fmt.Errorf("layer %d shard: %w", l, err)
		}
		refs[l] = &neuropb.LayerShardRef{Layer: uint32(l), Shard: ref}
		wrote()
	}
	return headRef, refs, nil
}

// writeShard writes a GGUF shard to dir under a temporary name, then
// renames it to its CID.
func writeShard(dir string, kvs []KV, tds []TensorData) (*neuropb.ShardRef, error) {
	tmp, err := os.CreateTemp(dir, ".shard-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	h := sha256.New()
	cw := &countWriter{w: io.MultiWriter(tmp, h)}
	if err := Write(cw, kvs, tds); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	c := cidFromSHA256(h.Sum(nil))
	if err := os.Rename(tmp.Name(), filepath.Join(dir, c.String()+shardExt)); err != nil {
		return nil, err
	}
	ref := &neuropb.ShardRef{Cid: c.Bytes(), Size: uint64(cw.n)}
	for _, td := range tds {
		ref.Tensors = append(ref.Tensors, &neuropb.TensorRef{Name: td.Info.Name, Dtype: uint32(td.Info.Type), Shape: td.Info.Shape})
	}
	return ref, nil
}

// readParams reads the hyper-parameters of arch from f.
func readParams(f *File, arch string) (*neuropb.ModelParams, error) {
	u := func(key string) (uint32, error) {
		switch v := f.Get(arch + "." + key).(type) {
		case uint32:
			return v, nil
		case int32:
			if v >= 0 {
				return uint32(v), nil
			}
		case uint64:
			if v <= 1<<31 {
				return uint32(v), nil
			}
		}
		return 0, fmt.Errorf("metadata %s.%s: missing or not a count", arch, key)
	}
	p := &neuropb.ModelParams{}
	var err error
	if n, err := u("expert_count"); err != nil || n == 0 {
		return nil, fmt.Errorf("%w: %s.expert_count is missing or 0", ErrNotMoE, arch)
	}
	for _, fld := range []struct {
		key string
		dst *uint32
	}{
		{"block_count", &p.Layers}, {"expert_count", &p.Experts}, {"expert_used_count", &p.ExpertsUsed},
		{"embedding_length", &p.Embd}, {"attention.head_count", &p.Heads}, {"context_length", &p.Context},
	} {
		if *fld.dst, err = u(fld.key); err != nil {
			return nil, err
		}
	}
	if p.KvHeads, err = u("attention.head_count_kv"); err != nil {
		p.KvHeads = p.Heads
	}
	// The first MoE layer's expert size (leading layers may be dense).
	for _, t := range f.Tensors {
		if g := expertTensor.FindStringSubmatch(t.Name); g != nil && g[2] == "gate" && g[3] == "weight" && len(t.Shape) >= 2 {
			p.Ff = uint32(t.Shape[1])
			break
		}
	}
	if toks, ok := f.Get("tokenizer.ggml.tokens").([]string); ok {
		p.Vocab = uint32(len(toks))
	}
	p.RopeFreqBase, _ = f.Get(arch + ".rope.freq_base").(float32)
	p.RmsEps, _ = f.Get(arch + ".attention.layer_norm_rms_epsilon").(float32)
	p.FileType, _ = f.Get("general.file_type").(uint32)
	if n, err := u("leading_dense_block_count"); err == nil {
		p.DenseLead = n
	}
	if p.Experts == 0 || p.ExpertsUsed == 0 || p.ExpertsUsed > p.Experts || p.Layers == 0 || p.DenseLead >= p.Layers {
		return nil, fmt.Errorf("%w: expert_count %d, expert_used_count %d, block_count %d", ErrNotMoE, p.Experts, p.ExpertsUsed, p.Layers)
	}
	return p, nil
}

// MarshalManifest encodes m deterministically (its CID depends on it).
func MarshalManifest(m *neuropb.Manifest) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return raw, nil
}

// LoadManifest reads dir's manifest and checks it. If want is defined, the
// manifest must hash to it.
func LoadManifest(dir string, want cid.Cid) (*neuropb.Manifest, cid.Cid, error) {
	path := filepath.Join(dir, ManifestFile)
	fh, err := os.Open(path)
	if err != nil {
		return nil, cid.Undef, fmt.Errorf("manifest %s: %w", path, err)
	}
	defer fh.Close()
	raw, err := io.ReadAll(io.LimitReader(fh, neuropb.MaxManifestSize+1))
	if err != nil {
		return nil, cid.Undef, fmt.Errorf("manifest %s: %w", path, err)
	}
	if len(raw) > neuropb.MaxManifestSize {
		return nil, cid.Undef, fmt.Errorf("manifest %s: larger than %d bytes", path, neuropb.MaxManifestSize)
	}
	m, got, err := ParseManifest(raw, want)
	if err != nil {
		return nil, cid.Undef, fmt.Errorf("manifest %s: %w", path, err)
	}
	return m, got, nil
}

// ParseManifest decodes and checks an encoded manifest. If want is
// defined, the bytes must hash to it.
func ParseManifest(raw []byte, want cid.Cid) (*neuropb.Manifest, cid.Cid, error) {
	if len(raw) > neuropb.MaxManifestSize {
		return nil, cid.Undef, fmt.Errorf("larger than %d bytes", neuropb.MaxManifestSize)
	}
	got := CIDOf(raw)
	if want.Defined() && !got.Equals(want) {
		return nil, cid.Undef, fmt.Errorf("%w: got %s, want %s", ErrCIDMismatch, got, want)
	}
	m := &neuropb.Manifest{}
	if err := proto.Unmarshal(raw, m); err != nil {
		return nil, cid.Undef, fmt.Errorf("%w: %v", neuropb.ErrInvalid, err)
	}
	if err := m.Validate(); err != nil {
		return nil, cid.Undef, err
	}
	return m, got, nil
}

// ShardRefs lists a manifest's shards: the gating shard, then the experts
// in order (the hosted shared experts last), then format 2's head and
// layer shards.
func ShardRefs(m *neuropb.Manifest) []*neuropb.ShardRef {
	refs := []*neuropb.ShardRef{m.GetGating()}
	for _, e := range m.AllExperts() {
		refs = append(refs, e.GetShard())
	}
	if m.GetHead() != nil {
		refs = append(refs, m.GetHead())
	}
	for _, l := range m.GetLayers() {
		refs = append(refs, l.GetShard())
	}
	return refs
}

// PartShards opens, with open (a directory's OpenShard, or a node's store
// after a fetch), the shards of format 2 that a part of the gating compute
// reads: layer shards first to end-1, then the head shard with head.
func PartShards(m *neuropb.Manifest, first, end int, head bool, open func(*neuropb.ShardRef) (*Shard, error)) (Shards, error) {
	var ss Shards
	for l := first; l < end; l++ {
		ref := m.LayerRef(l)
		if ref == nil {
			return nil, fmt.Errorf("layer %d: the manifest (format %d) has no shard for it", l, m.GetFormat())
		}
		s, err := open(ref)
		if err != nil {
			return nil, fmt.Errorf("layer %d shard: %w", l, err)
		}
		ss = append(ss, s)
	}
	if head {
		if m.GetHead() == nil {
			return nil, fmt.Errorf("the manifest (format %d) has no head shard", m.GetFormat())
		}
		s, err := open(m.GetHead())
		if err != nil {
			return nil, fmt.Errorf("head shard: %w", err)
		}
		ss = append(ss, s)
	}
	return ss, nil
}

// Shards reads tensors from several shards, each tensor from the first
// shard that holds it: a span's layer shards and the head shard, read as
// one gating shard.
type Shards []*Shard

// Has reports whether a shard holds the named tensor.
func (ss Shards) Has(name string) bool {
	for _, s := range ss {
		if s.Has(name) {
			return true
		}
	}
	return false
}

// TensorBytes returns the named tensor's bytes from the first shard that
// holds it.
func (ss Shards) TensorBytes(name string) ([]byte, TensorInfo, error) {
	for _, s := range ss {
		if s.Has(name) {
			return s.TensorBytes(name)
		}
	}
	return nil, TensorInfo{}, fmt.Errorf("no shard holds tensor %s", name)
}

// Shard is a verified shard loaded into memory.
type Shard struct {
	CID  cid.Cid
	File *File
	Data []byte
}

// Has reports whether the shard holds the named tensor.
func (s *Shard) Has(name string) bool {
	_, ok := s.File.Tensor(name)
	return ok
}

// TensorBytes returns the bytes of the named tensor.
func (s *Shard) TensorBytes(name string) ([]byte, TensorInfo, error) {
	t, ok := s.File.Tensor(name)
	if !ok {
		return nil, TensorInfo{}, fmt.Errorf("shard %s: no tensor %s", s.CID, name)
	}
	start := s.File.DataOffset + int64(t.Offset)
	return s.Data[start : start+int64(t.Size())], t, nil
}

// ShardPath is where a shard with CID c lies in dir.
func ShardPath(dir string, c cid.Cid) string { return filepath.Join(dir, c.String()+shardExt) }

// OpenShard reads the shard ref describes from dir, checks its bytes
// against the CID and its tensors against the manifest, and returns it.
func OpenShard(dir string, ref *neuropb.ShardRef) (*Shard, error) {
	c, err := cid.Cast(ref.GetCid())
	if err != nil {
		return nil, fmt.Errorf("shard: bad cid: %w", err)
	}
	return OpenShardFile(ShardPath(dir, c), ref)
}

// OpenShardFile is OpenShard for a shard at path.
func OpenShardFile(path string, ref *neuropb.ShardRef) (*Shard, error) {
	c, err := cid.Cast(ref.GetCid())
	if err != nil {
		return nil, fmt.Errorf("shard: bad cid: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("shard %s: %w", c, err)
	}
	if got := CIDOf(data); !got.Equals(c) {
		return nil, fmt.Errorf("shard %s (%s, %d bytes): %w: the bytes hash to %s", c, path, len(data), ErrCIDMismatch, got)
	}
	f, err := ReadFile(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, fmt.Errorf("shard %s: %w", c, err)
	}
	if len(f.Tensors) != len(ref.GetTensors()) {
		return nil, fmt.Errorf("shard %s: %d tensors, the manifest lists %d", c, len(f.Tensors), len(ref.GetTensors()))
	}
	for i, want := range ref.GetTensors() {
		got := f.Tensors[i]
		if got.Name != want.GetName() || uint32(got.Type) != want.GetDtype() || !slices.Equal(got.Shape, want.GetShape()) {
			return nil, fmt.Errorf("shard %s: tensor %d is %s %s %v, the manifest says %s %s %v", c, i,
				got.Name, got.Type, got.Shape, want.GetName(), DType(want.GetDtype()), want.GetShape())
		}
	}
	return &Shard{CID: c, File: f, Data: data}, nil
}

// Join rebuilds the model in dir (a Split output) into a GGUF file at out:
// the gating shard's metadata and tensors and the experts' tensors stacked
// back into blk.N.ffn_*_exps, in the original tensor order. Every shard is
// verified against its CID first.
func Join(dir string, want cid.Cid, out string) error {
	m, _, err := LoadManifest(dir, want)
	if err != nil {
		return err
	}
	return JoinShards(m, func(ref *neuropb.ShardRef) (*Shard, error) { return OpenShard(dir, ref) }, out)
}

// JoinShards is Join for a manifest whose shards open gives (each
// verified against its CID).
func JoinShards(m *neuropb.Manifest, open func(*neuropb.ShardRef) (*Shard, error), out string) error {
	gating, err := open(m.GetGating())
	if err != nil {
		return fmt.Errorf("join: gating %w", err)
	}
	shards := make(map[[2]uint32]*Shard, len(m.GetExperts()))
	for _, ex := range m.AllExperts() {
		s, err := open(ex.GetShard())
		if err != nil {
			return fmt.Errorf("join: expert %d:%d: %w", ex.GetLayer(), ex.GetExpert(), err)
		}
		shards[[2]uint32{ex.GetLayer(), ex.GetExpert()}] = s
	}
	var tds []TensorData
	for _, name := range m.GetTensorOrder() {
		if t, ok := gating.File.Tensor(name); ok {
			b, _, _ := gating.TensorBytes(name)
			tds = append(tds, TensorData{Info: t, Data: bytes.NewReader(b)})
			continue
		}
		if g := sharedExpertTensor.FindStringSubmatch(name); g != nil && m.SharedExpert() >= 0 {
			layer, _ := strconv.Atoi(g[1])
			s := shards[[2]uint32{uint32(layer), uint32(m.SharedExpert())}]
			if s == nil {
				return fmt.Errorf("join: no shard for the shared expert of layer %d", layer)
			}
			b, t, err := s.TensorBytes(ExpertTensorName(layer, g[2]))
			if err != nil {
				return fmt.Errorf("join: %w", err)
			}
			t.Name = name
			tds = append(tds, TensorData{Info: t, Data: bytes.NewReader(b)})
			continue
		}
		g := expertTensor.FindStringSubmatch(name)
		if g == nil {
			return fmt.Errorf("join: tensor %s is in no shard", name)
		}
		layer, _ := strconv.Atoi(g[1])
		inShard := ExpertTensorName(layer, g[2])
		if g[3] == "bias" {
			inShard = ExpertBiasName(layer, g[2])
		}
		var parts []io.Reader
		var info TensorInfo
		for e := range m.GetParams().GetExperts() {
			s := shards[[2]uint32{uint32(layer), e}]
			if s == nil {
				return fmt.Errorf("join: no shard for expert %d:%d", layer, e)
			}
			b, t, err := s.TensorBytes(inShard)
			if err != nil {
				return fmt.Errorf("join: %w", err)
			}
			info = TensorInfo{Name: name, Type: t.Type, Shape: append(slices.Clone(t.Shape), uint64(m.GetParams().GetExperts()))}
			parts = append(parts, bytes.NewReader(b))
		}
		tds = append(tds, TensorData{Info: info, Data: io.MultiReader(parts...)})
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return fmt.Errorf("join: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := Write(tmp, gating.File.KVs, tds); err != nil {
		tmp.Close()
		return fmt.Errorf("join: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("join: %w", err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("join: %w", err)
	}
	return nil
}
