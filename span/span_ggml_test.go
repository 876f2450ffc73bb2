//go:build ggml

package span

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
)

// With llama.cpp's compute: a head loaded from the head shard and span
// nodes loaded from layer shards alone give the whole split model's
// greedy tokens and logits to the bit, also when the span node of the
// last layers dies mid-generation and another provider rebuilds its KV
// cache from the replayed inputs.
func TestChainMatchesTheWholeModelInGgml(t *testing.T) {
	ctx := t.Context()
	p, _ := model.Preset("qwen3moe", "tiny")
	p.Layers = 4
	path := filepath.Join(t.TempDir(), "m.gguf")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.GenerateArch(f, "qwen3moe", p, model.Q8_0, 21); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dir := filepath.Join(t.TempDir(), "shards")
	res, err := model.SplitWith(path, dir, model.SplitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := res.Manifest
	whole, err := ggml.LoadSplit(dir, res.ModelCID, 1)
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
	part := func(ts model.Shards, pt moe.Part) moe.Gating {
		g, err := ggml.Backend{}.NewGatingPart(hp, ts, pt, 1)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Close() })
		return g
	}
	head := newHost(t)
	serveGgml := func(first, end int) (*Server, peer.ID) {
		pt := moe.Part{First: first, End: end}
		srv, h := serve(t, head, first, end, func(c *ServerConfig) {
			c.Model, c.Gating, c.Part = res.ModelCID, part(open(first, end, false), pt), pt
			c.Experts = func(peer.ID) moe.Experts { return whole.Experts }
		})
		return srv, h.ID()
	}
	_, a := serveGgml(0, 2)
	dying, d := serveGgml(2, 4)
	_, b := serveGgml(2, 4)

	steps := func(s moe.Session, kill bool) ([]int32, [][]float32) {
		t.Helper()
		prompt := []int32{5, 17, 33, 2, 9, 41, 7}
		l, err := s.Forward(ctx, prompt, whole.Experts)
		if err != nil {
			t.Fatal(err)
		}
		var toks []int32
		var logits [][]float32
		for i := range 10 {
			logits = append(logits, l)
			tok := int32(slices.Index(l, slices.Max(l)))
			toks = append(toks, tok)
			if kill && i == 5 {
				dying.Close()
			}
			if l, err = s.Forward(ctx, []int32{tok}, whole.Experts); err != nil {
				t.Fatal(err)
			}
		}
		return toks, logits
	}
	ref, _ := whole.Gating.NewSession(0)
	defer ref.Close()
	wantToks, wantLogits := steps(ref, false)

	c, err := NewChain(ChainConfig{Model: res.ModelCID, Head: part(open(0, 0, true), moe.Part{Head: true}), Part: moe.Part{Head: true},
		Hops: []Hop{{0, 2, []peer.ID{a}}, {2, 4, []peer.ID{d, b}}}, Dialer: head, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.NewSession(0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	toks, logits := steps(s, true)
	if !slices.Equal(toks, wantToks) {
		t.Fatalf("chain's tokens %v, the whole model's %v", toks, wantToks)
	}
	if !slices.EqualFunc(logits, wantLogits, slices.Equal) {
		t.Fatal("the chain's logits differ from the whole model's")
	}
	if st := s.(*Session).Stats(); st.Failovers != 1 || st.Replays == 0 {
		t.Fatalf("stats %+v: want a failover and replays", st)
	}
}
