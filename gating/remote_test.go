//go:build ggml

package gating

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// A prompt answered by experts on three other nodes gives llama.cpp's
// tokens; with the node that hosts every expert gone, the same prompt gives
// the same tokens through the others.
func TestGenerateThroughNetworkEqualsLlamaCpp(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	p.Layers = 3
	// Node 1 hosts layers 0 and 1, node 2 layers 1 and 2, node 3 all.
	xn := newExpertNet(t, ctx, p, model.Q8_0, 2025, []string{"0:*,1:*", "1:*,2:*", "0:*,1:*,2:*"})
	hs, svcs, mc := xn.hosts, xn.svcs, xn.model
	providers := HeartbeatProviders(hs[0], mc)
	for {
		ready := true
		for l := range p.Layers {
			for e := range p.Experts {
				ready = ready && len(providers(expert.Key{Layer: l, Expert: e})) >= 2
			}
		}
		for _, s := range svcs {
			ready = ready && len(s.Loaded()) > 0
		}
		if ready {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("experts not hosted in time")
		case <-time.After(100 * time.Millisecond):
		}
	}

	const prompt, maxTokens = "the expert network once upon a time", 32
	want := xn.reference(t, prompt, maxTokens)
	sm, err := ggml.LoadSplit(xn.dir, mc, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	remote := &RemoteExperts{Client: client, Model: mc, Embd: p.Embd, Used: p.ExpertsUsed, Providers: providers,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, CallTimeout: 10 * time.Second}
	check := func(what string) {
		got, err := sm.GenerateGreedy(ctx, prompt, maxTokens, 0, remote, false)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if fmt.Sprint(got.Tokens) != fmt.Sprint(want.Tokens) {
			t.Fatalf("%s: tokens %v, llama.cpp %v", what, got.Tokens, want.Tokens)
		}
	}
	check("all nodes up")
	// The node hosting every expert dies; heartbeats still list it for a
	// while, so calls to it fail and go to the next provider.
	svcs[2].Close()
	hs[3].Close()
	check("node 3 dead")
}

// slow delays every compute, to play a straggler.
type slow struct {
	moe.Expert
	delay time.Duration
}

func (s slow) Compute(x []float32, n int, out []float32) error {
	time.Sleep(s.delay)
	return s.Expert.Compute(x, n, out)
}

// With every expert on a fast node and a slow one, the slow node's calls
// are hedged to the fast one, the tokens stay llama.cpp's, and the
// selector learns to go to the fast node first.
func TestHedgingAroundASlowNode(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	dir, res := splitModel(t, p, model.F32, 77)
	src := filepath.Join(dir, "m.gguf")
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(500*time.Millisecond)) // 0: gating, 1: slow, 2: fast
	for i, delay := range []time.Duration{300 * time.Millisecond, 0} {
		srv, err := expert.NewServer(hs[i+1].LibP2P(), expert.DefaultConfig(), quiet())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
		var wrap func(moe.Expert) expert.Computer
		if delay > 0 {
			wrap = func(e moe.Expert) expert.Computer { return slow{e, delay} }
		}
		serveExperts(t, srv, dir, res, ggml.Backend{}, wrap)
		srv.Start()
	}
	ref, err := ggml.LoadLlama(src)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	const prompt, maxTokens = "hello world the expert", 12
	want, err := ref.GenerateGreedy(prompt, maxTokens, ggml.ContextOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := ggml.LoadSplit(filepath.Join(dir, "shards"), res.ModelCID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	slowPeer, fastPeer := hs[1].ID(), hs[2].ID()
	sel := NewSelector(nil)
	remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
		Providers: func(expert.Key) []peer.ID { return []peer.ID{slowPeer, fastPeer} }, // the slow one listed first
		DType:     neuropb.WireDType_WIRE_DTYPE_F32, Selector: sel}
	got, err := sm.GenerateGreedy(ctx, prompt, maxTokens, 0, remote, false)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got.Tokens) != fmt.Sprint(want.Tokens) {
		t.Fatalf("tokens %v, llama.cpp %v", got.Tokens, want.Tokens)
	}
	if remote.Hedges() == 0 {
		t.Fatal("no call was hedged")
	}
	if first := sel.Rank(expert.Key{}, []peer.ID{slowPeer, fastPeer}, nil)[0]; first != fastPeer {
		t.Fatalf("selector still prefers the slow node")
	}
	t.Logf("%d hedges, %d re-dispatches", remote.Hedges(), remote.Redispatches())
}
