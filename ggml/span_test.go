package ggml

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
)

// A forward pass through a head and two spans loaded from format 2's head
// and layer shards — the spans without the head or the gating shard, their
// hyper-parameters read from a layer shard — gives the whole gating's
// logits to the bit, for a prompt, decode steps and a verification of
// several tokens computed apart, in every architecture (a sliding window,
// dense leading layers, latent attention, shared experts).
func TestSpansMatchTheWholeGating(t *testing.T) {
	ctx := t.Context()
	for _, arch := range []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"} {
		t.Run(arch, func(t *testing.T) {
			p := archShape(arch)
			p.Layers = max(p.Layers, 3)
			path := archModel(t, t.TempDir(), arch, p, "f16", 11)
			dir := filepath.Join(t.TempDir(), "shards")
			res, err := model.SplitWith(path, dir, model.SplitOptions{})
			if err != nil {
				t.Fatal(err)
			}
			m := res.Manifest
			if m.GetFormat() != 2 || len(m.GetLayers()) != p.Layers || m.GetHead() == nil {
				t.Fatalf("manifest format %d with %d layer shards (head %v), want 2 with %d", m.GetFormat(), len(m.GetLayers()), m.GetHead() != nil, p.Layers)
			}
			whole, err := LoadSplit(dir, res.ModelCID, testThreads)
			if err != nil {
				t.Fatal(err)
			}
			defer whole.Close()
			hp := whole.Gating.Hparams()

			open := func(first, end int, head bool) model.Shards {
				ss, err := model.PartShards(m, first, end, head, func(ref *neuropb.ShardRef) (*model.Shard, error) { return model.OpenShard(dir, ref) })
				if err != nil {
					t.Fatal(err)
				}
				return ss
			}
			cut := p.Layers / 2
			first, second := open(0, cut, false), open(cut, p.Layers, false)
			if got, err := moe.HparamsOf(m, second[0]); err != nil || got != hp {
				t.Fatalf("hyper-parameters from layer %d's shard: %+v, %v\nwant %+v", cut, got, err, hp)
			}
			load := func(ts moe.Tensors, part moe.Part) *Session {
				g, err := NewGatingPart(Device{}, hp, ts, part, testThreads)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { g.Close() })
				s, err := g.NewSession(0)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				return s
			}
			head := load(open(0, 0, true), moe.Part{Head: true})
			a := load(first, moe.Part{First: 0, End: cut})
			b := load(second, moe.Part{First: cut, End: p.Layers})
			if _, err := NewGatingPart(Device{}, hp, first, moe.Part{First: 0, End: cut + 1}, testThreads); err == nil {
				t.Fatal("a part whose layer's shard is missing loaded")
			}
			if _, err := a.Embed([]int32{1}); err == nil {
				t.Fatal("a span without the head embedded tokens")
			}
			// The whole gating's session of the head alone (what a head
			// whose layers all run on spans uses): no KV cache, no layers,
			// the same embeddings and logits as the head's own part.
			wholeHead, err := whole.Gating.NewHeadSession(0)
			if err != nil {
				t.Fatal(err)
			}
			defer wholeHead.Close()
			if n := wholeHead.KVBytes(); n != 0 {
				t.Fatalf("a session of the head alone holds a KV cache of %d bytes", n)
			}
			if _, _, err := wholeHead.Layers(ctx, make([]float32, hp.Embd), 1, moe.WantLast, whole.Experts); err == nil {
				t.Fatal("a session of the head alone computed layers")
			}
			chain := func(tokens []int32, want moe.Want) [][]float32 {
				t.Helper()
				x, err := head.Embed(tokens)
				if err != nil {
					t.Fatal(err)
				}
				if x2, err := wholeHead.Embed(tokens); err != nil || !slices.Equal(x2, x) {
					t.Fatalf("the whole gating's head session embeds otherwise (%v)", err)
				}
				rows := len(tokens)
				for _, s := range []*Session{a, b} {
					if x, rows, err = s.Layers(ctx, x, rows, want, whole.Experts); err != nil {
						t.Fatal(err)
					}
				}
				logits, err := head.Output(x, rows)
				if err != nil {
					t.Fatal(err)
				}
				l2, err := wholeHead.Output(x, rows)
				if err != nil || len(l2) != len(logits) {
					t.Fatalf("the whole gating's head session: %d rows of logits, want %d (%v)", len(l2), len(logits), err)
				}
				for i := range l2 {
					if !slices.Equal(l2[i], logits[i]) {
						t.Fatalf("the whole gating's head session's logits differ from the head part's (row %d)", i)
					}
				}
				return logits
			}
			ref, err := whole.Gating.NewSession(0)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			if n := ref.KVBytes(); n <= 0 {
				t.Fatalf("the whole gating's session holds a KV cache of %d bytes", n)
			}
			prompt := make([]int32, 40)
			for i := range prompt {
				prompt[i] = int32(3 + i*11%300)
			}
			same := func(what string, got, want []float32) {
				t.Helper()
				if !slices.Equal(got, want) {
					t.Fatalf("%s: the spans' logits differ from the whole gating's", what)
				}
			}
			want, err := ref.Forward(ctx, prompt, whole.Experts)
			if err != nil {
				t.Fatal(err)
			}
			same("prompt", chain(prompt, moe.WantLast)[0], want)
			for i, tok := range []int32{7, 8, 9} {
				want, err := ref.Forward(ctx, []int32{tok}, whole.Experts)
				if err != nil {
					t.Fatal(err)
				}
				same("decode step "+string(rune('0'+i)), chain([]int32{tok}, moe.WantLast)[0], want)
			}
			draft := []int32{50, 51, 52}
			wantEach, err := ref.ForwardEach(ctx, draft, whole.Experts)
			if err != nil {
				t.Fatal(err)
			}
			for i, l := range chain(draft, moe.WantEach) {
				same("verified token "+string(rune('0'+i)), l, wantEach[i])
			}
			if a.Len() != ref.Len() || b.Len() != ref.Len() {
				t.Fatalf("spans at %d and %d tokens, the whole at %d", a.Len(), b.Len(), ref.Len())
			}
		})
	}
}
