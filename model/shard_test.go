package model

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

func writeTiny(t *testing.T, dt DType, seed uint64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "model.gguf")
	if err := os.WriteFile(path, genTiny(t, dt, seed), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestSplitJoinIsByteIdentical(t *testing.T) {
	for _, dt := range []DType{F32, Q8_0, Q4_0} {
		t.Run(dt.String(), func(t *testing.T) {
			src := writeTiny(t, dt, 11)
			dir := t.TempDir()
			res, err := Split(src, dir)
			if err != nil {
				t.Fatal(err)
			}
			p := Presets["tiny"]
			if len(res.Manifest.GetExperts()) != p.Layers*p.Experts {
				t.Fatalf("%d expert shards", len(res.Manifest.GetExperts()))
			}
			// Each expert shard holds exactly that expert's three tensors.
			s, err := OpenShard(dir, res.Manifest.GetExperts()[p.Experts+1].GetShard())
			if err != nil {
				t.Fatal(err)
			}
			if len(s.File.Tensors) != 3 || s.File.Tensors[0].Name != "blk.1.ffn_gate.weight" ||
				s.File.Tensors[2].Shape[0] != uint64(p.FF) || s.File.Tensors[2].Shape[1] != uint64(p.Embd) {
				t.Fatalf("expert shard tensors: %+v", s.File.Tensors)
			}
			out := filepath.Join(t.TempDir(), "joined.gguf")
			if err := Join(dir, res.ModelCID, out); err != nil {
				t.Fatal(err)
			}
			a, _ := os.ReadFile(src)
			b, _ := os.ReadFile(out)
			if !bytes.Equal(a, b) {
				t.Fatal("joined file differs from the original")
			}
			// The same model splits to the same CID.
			res2, err := Split(src, t.TempDir())
			if err != nil || !res2.ModelCID.Equals(res.ModelCID) {
				t.Fatalf("second split: %v %v", res2.ModelCID, err)
			}
		})
	}
}

func TestSplitRefuses(t *testing.T) {
	dense := filepath.Join(t.TempDir(), "dense.gguf")
	var buf bytes.Buffer
	if err := Write(&buf, []KV{{"general.architecture", "llama"}, {"llama.block_count", uint32(1)},
		{"llama.expert_count", uint32(0)}}, nil); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(dense, buf.Bytes(), 0o644)
	if _, err := Split(dense, t.TempDir()); !errors.Is(err, ErrNotMoE) {
		t.Errorf("dense model: %v", err)
	}
	buf.Reset()
	Write(&buf, []KV{{"general.architecture", "mamba"}}, nil)
	os.WriteFile(dense, buf.Bytes(), 0o644)
	if _, err := Split(dense, t.TempDir()); err == nil || !strings.Contains(err.Error(), `architecture "mamba" is not supported`) {
		t.Errorf("unsupported architecture: %v", err)
	}
	os.WriteFile(dense, []byte("hello"), 0o644)
	if _, err := Split(dense, t.TempDir()); !errors.Is(err, ErrFormat) {
		t.Errorf("not a gguf: %v", err)
	}
}

func TestCorruptShardsAndManifestsAreRefused(t *testing.T) {
	src := writeTiny(t, Q8_0, 5)
	dir := t.TempDir()
	res, err := Split(src, dir)
	if err != nil {
		t.Fatal(err)
	}
	ref := res.Manifest.GetExperts()[2].GetShard()
	c, _ := cid.Cast(ref.GetCid())
	path := ShardPath(dir, c)
	orig, _ := os.ReadFile(path)

	flipped := bytes.Clone(orig)
	flipped[len(flipped)/2] ^= 0x01
	os.WriteFile(path, flipped, 0o644)
	if _, err := OpenShard(dir, ref); !errors.Is(err, ErrCIDMismatch) {
		t.Errorf("flipped byte: %v", err)
	}
	if err := Join(dir, res.ModelCID, filepath.Join(t.TempDir(), "x.gguf")); !errors.Is(err, ErrCIDMismatch) ||
		!strings.Contains(err.Error(), "expert 0:2") {
		t.Errorf("join with a corrupt shard: %v", err)
	}
	os.WriteFile(path, orig[:len(orig)-7], 0o644)
	if _, err := OpenShard(dir, ref); !errors.Is(err, ErrCIDMismatch) {
		t.Errorf("truncated shard: %v", err)
	}
	os.WriteFile(path, orig, 0o644)
	if _, err := OpenShard(dir, ref); err != nil {
		t.Fatalf("restored shard: %v", err)
	}

	mpath := filepath.Join(dir, ManifestFile)
	mraw, _ := os.ReadFile(mpath)
	if _, _, err := LoadManifest(dir, CIDOf([]byte("another model"))); !errors.Is(err, ErrCIDMismatch) {
		t.Errorf("manifest under the wrong CID: %v", err)
	}
	os.WriteFile(mpath, mraw[:len(mraw)/2], 0o644)
	if _, _, err := LoadManifest(dir, cid.Undef); !errors.Is(err, neuropb.ErrInvalid) {
		t.Errorf("truncated manifest: %v", err)
	}
	os.WriteFile(mpath, []byte("garbage that is not protobuf \xff\xff"), 0o644)
	if _, _, err := LoadManifest(dir, cid.Undef); !errors.Is(err, neuropb.ErrInvalid) {
		t.Errorf("garbage manifest: %v", err)
	}
}

// The Qwen3-MoE layout splits and joins like Mixtral's.
func TestSplitQwen3MoE(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "q.gguf")
	var buf bytes.Buffer
	p := Presets["tiny"]
	p.Experts, p.ExpertsUsed = 8, 2
	if err := GenerateArch(&buf, "qwen3moe", p, Q8_0, 3); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(src, buf.Bytes(), 0o644)
	res, err := Split(src, filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Manifest.GetArchitecture() != "qwen3moe" || res.Manifest.GetParams().GetExperts() != 8 ||
		res.Manifest.GetParams().GetFf() != uint32(p.FF) || len(res.Manifest.GetExperts()) != 8*p.Layers {
		t.Fatalf("manifest: %v", res.Manifest.GetParams())
	}
	out := filepath.Join(dir, "j.gguf")
	if err := Join(filepath.Join(dir, "s"), res.ModelCID, out); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, buf.Bytes()) {
		t.Fatal("joined qwen3moe model differs")
	}
}

// gpt-oss's experts have biases: each expert shard carries its slice of
// the three stacked biases and names the activation its expert computes;
// Join stacks the biases back, byte for byte.
func TestSplitGptOssCarriesBiasesAndActivation(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "g.gguf")
	var buf bytes.Buffer
	p, _ := Preset("gpt-oss", "tiny")
	if err := GenerateArch(&buf, "gpt-oss", p, Q8_0, 5); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(src, buf.Bytes(), 0o644)
	res, err := Split(src, filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Manifest.GetExperts()) != p.Layers*p.Experts {
		t.Fatalf("%d expert shards", len(res.Manifest.GetExperts()))
	}
	ref := res.Manifest.GetExperts()[p.Experts+2] // layer 1, expert 2
	s, err := OpenShard(filepath.Join(dir, "s"), ref.GetShard())
	if err != nil {
		t.Fatal(err)
	}
	if act, _ := s.File.Get(KeyActivation).(string); act != ActSwiGLUOAI {
		t.Fatalf("activation %q, want %s", act, ActSwiGLUOAI)
	}
	want := []struct {
		name  string
		shape uint64
	}{{"blk.1.ffn_gate.weight", uint64(p.Embd)}, {"blk.1.ffn_up.weight", uint64(p.Embd)}, {"blk.1.ffn_down.weight", uint64(p.FF)},
		{"blk.1.ffn_gate.bias", uint64(p.FF)}, {"blk.1.ffn_up.bias", uint64(p.FF)}, {"blk.1.ffn_down.bias", uint64(p.Embd)}}
	if len(s.File.Tensors) != len(want) {
		t.Fatalf("expert shard tensors: %+v", s.File.Tensors)
	}
	for i, w := range want {
		if got := s.File.Tensors[i]; got.Name != w.name || got.Shape[0] != w.shape {
			t.Fatalf("tensor %d: %s %v, want %s [%d …]", i, got.Name, got.Shape, w.name, w.shape)
		}
	}
	// The bias slice is expert 2's column of the model's stacked bias.
	f, err := ReadFile(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	stacked, _ := f.Tensor("blk.1.ffn_down_exps.bias")
	row := stacked.Size() / uint64(p.Experts)
	start := uint64(f.DataOffset) + stacked.Offset + 2*row
	got, _, _ := s.TensorBytes("blk.1.ffn_down.bias")
	if !bytes.Equal(got, buf.Bytes()[start:start+row]) {
		t.Fatal("expert 2's down bias is not its slice of the stacked bias")
	}
	// A llama expert shard names no activation (swiglu is the default).
	if ExpertActivation("llama") != ActSwiGLU || ExpertActivation("gpt-oss") != ActSwiGLUOAI {
		t.Fatal("ExpertActivation")
	}
	out := filepath.Join(dir, "j.gguf")
	if err := Join(filepath.Join(dir, "s"), res.ModelCID, out); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, buf.Bytes()) {
		t.Fatal("joined gpt-oss model differs")
	}
}

// --shared-experts remote: each MoE layer's shared experts get a shard of
// their own (expert number params.experts, marked to compute as a dense
// FFN), the gating shard holds none of them, ExpertRef finds them, the
// join rebuilds the file byte for byte, and a manifest with the wrong
// number of them is refused. A model without shared experts is refused.
func TestSplitSharedExpertsRemote(t *testing.T) {
	for _, arch := range []string{"glm4moe", "deepseek2"} {
		t.Run(arch, func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "m.gguf")
			var buf bytes.Buffer
			p, _ := Preset(arch, "tiny")
			if err := GenerateArch(&buf, arch, p, Q8_0, 7); err != nil {
				t.Fatal(err)
			}
			os.WriteFile(src, buf.Bytes(), 0o644)
			res, err := SplitWith(src, filepath.Join(dir, "s"), SplitOptions{SharedRemote: true})
			if err != nil {
				t.Fatal(err)
			}
			m := res.Manifest
			moe := p.Layers - p.DenseLead
			if len(m.GetShared()) != moe || len(m.GetExperts()) != moe*p.Experts || m.ExpertsPerLayer() != p.Experts+1 || m.SharedExpert() != p.Experts {
				t.Fatalf("%d shared, %d experts, %d per layer", len(m.GetShared()), len(m.GetExperts()), m.ExpertsPerLayer())
			}
			for _, tr := range m.GetGating().GetTensors() {
				if strings.Contains(tr.GetName(), "_shexp") {
					t.Fatalf("the gating shard holds %s", tr.GetName())
				}
			}
			ref := m.ExpertRef(p.DenseLead, p.Experts)
			if ref == nil || ref != m.GetShared()[0] || m.ExpertRef(p.DenseLead, p.Experts+1) != nil {
				t.Fatal("ExpertRef of the shared expert")
			}
			s, err := OpenShard(filepath.Join(dir, "s"), ref.GetShard())
			if err != nil {
				t.Fatal(err)
			}
			if k, _ := s.File.Get(KeyExpertKind).(string); k != ExpertKindShared || !s.Has(ExpertTensorName(p.DenseLead, "down")) {
				t.Fatalf("shared shard: kind %q, tensors %+v", k, s.File.Tensors)
			}
			if prec, _ := s.File.Get(KeyDownPrecF32).(bool); prec != (arch == "glm4moe") {
				t.Fatalf("down precision f32 %v for %s", prec, arch)
			}
			routed := uint64(6 * p.Embd * p.FF * p.ExpertsUsed * moe)
			if got := m.ExpertFLOPsPerToken(); got != routed+uint64(6*p.Embd*p.FF*p.SharedExperts*moe) {
				t.Fatalf("FLOPs per token %d, routed alone %d", got, routed)
			}
			if in := InfoOfManifest(m); in.SharedExperts != 1 || !in.SharedRemote || in.Shards != 1+len(m.GetExperts())+moe ||
				in.ExpertFLOPsPerToken != m.ExpertFLOPsPerToken() || in.MoELayers != moe {
				t.Fatalf("info: %+v", in)
			}
			out := filepath.Join(dir, "j.gguf")
			if err := Join(filepath.Join(dir, "s"), res.ModelCID, out); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(out); !bytes.Equal(b, buf.Bytes()) {
				t.Fatal("joined model differs")
			}
			bad := proto.Clone(m).(*neuropb.Manifest)
			bad.Shared = bad.Shared[:1]
			if _, err := MarshalManifest(bad); err == nil || !strings.Contains(err.Error(), "shared expert shards") {
				t.Fatalf("a manifest missing shared shards: %v", err)
			}
			bad = proto.Clone(m).(*neuropb.Manifest)
			bad.Shared[0].Expert = 3
			if _, err := MarshalManifest(bad); err == nil || !strings.Contains(err.Error(), "shared[0]") {
				t.Fatalf("a shared shard with a routed expert's number: %v", err)
			}
		})
	}
	src := writeTiny(t, Q8_0, 3)
	if _, err := SplitWith(src, t.TempDir(), SplitOptions{SharedRemote: true}); err == nil || !strings.Contains(err.Error(), "no shared experts") {
		t.Fatalf("a model without shared experts: %v", err)
	}
}

// Format 2: the gating shard's tensors again as a head shard (no layer's
// tensors, all metadata) and one shard per layer (that layer's tensors
// only, the metadata but the tokenizer); a manifest whose layer shards are
// missing, out of order or in format 1 is refused; and a format 1
// manifest (a model split before layer shards) still loads.
func TestSplitWritesLayerAndHeadShards(t *testing.T) {
	src := writeTiny(t, Q8_0, 13)
	dir := t.TempDir()
	res, err := Split(src, dir)
	if err != nil {
		t.Fatal(err)
	}
	m := res.Manifest
	p := Presets["tiny"]
	if m.GetFormat() != 2 || len(m.GetLayers()) != p.Layers {
		t.Fatalf("format %d with %d layer shards, want 2 with %d", m.GetFormat(), len(m.GetLayers()), p.Layers)
	}
	gating, err := OpenShard(dir, m.GetGating())
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	head, err := OpenShard(dir, m.GetHead())
	if err != nil {
		t.Fatal(err)
	}
	for _, ti := range head.File.Tensors {
		if strings.HasPrefix(ti.Name, "blk.") {
			t.Errorf("head shard holds layer tensor %s", ti.Name)
		}
		seen[ti.Name] = true
	}
	if head.File.Get("tokenizer.ggml.tokens") == nil {
		t.Error("head shard without the tokenizer")
	}
	for l := range p.Layers {
		s, err := OpenShard(dir, m.LayerRef(l))
		if err != nil {
			t.Fatal(err)
		}
		if s.File.Get("tokenizer.ggml.tokens") != nil || s.File.Get("general.architecture") == nil || s.File.Get(KeyLayer) != uint32(l) {
			t.Errorf("layer %d shard's metadata: tokenizer %v, architecture %v, layer %v", l,
				s.File.Get("tokenizer.ggml.tokens") != nil, s.File.Get("general.architecture"), s.File.Get(KeyLayer))
		}
		for _, ti := range s.File.Tensors {
			if !strings.HasPrefix(ti.Name, fmt.Sprintf("blk.%d.", l)) {
				t.Errorf("layer %d shard holds %s", l, ti.Name)
			}
			seen[ti.Name] = true
		}
	}
	// Together they are the gating shard, byte for byte.
	all, err := PartShards(m, 0, p.Layers, true, func(ref *neuropb.ShardRef) (*Shard, error) { return OpenShard(dir, ref) })
	if err != nil {
		t.Fatal(err)
	}
	for _, ti := range gating.File.Tensors {
		want, _, _ := gating.TensorBytes(ti.Name)
		got, _, err := all.TensorBytes(ti.Name)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("tensor %s: %v", ti.Name, err)
		}
		delete(seen, ti.Name)
	}
	if len(seen) != 0 {
		t.Errorf("tensors in the layer and head shards that the gating shard lacks: %v", seen)
	}
	if refs := ShardRefs(m); len(refs) != 2+p.Layers+len(m.GetExperts()) {
		t.Errorf("%d shard refs", len(refs))
	}

	bad := func(what string, edit func(*neuropb.Manifest)) {
		t.Helper()
		c := proto.Clone(m).(*neuropb.Manifest)
		edit(c)
		if err := c.Validate(); !errors.Is(err, neuropb.ErrInvalid) {
			t.Errorf("%s: %v", what, err)
		}
	}
	bad("a layer shard missing", func(c *neuropb.Manifest) { c.Layers = c.Layers[1:] })
	bad("layers out of order", func(c *neuropb.Manifest) { c.Layers[0], c.Layers[1] = c.Layers[1], c.Layers[0] })
	bad("no head", func(c *neuropb.Manifest) { c.Head = nil })
	bad("format 1 with layer shards", func(c *neuropb.Manifest) { c.Format = 1 })
	bad("format 3", func(c *neuropb.Manifest) { c.Format = 3 })
	old := proto.Clone(m).(*neuropb.Manifest)
	old.Format, old.Head, old.Layers = 1, nil, nil
	if err := old.Validate(); err != nil {
		t.Errorf("format 1: %v", err)
	}
}
