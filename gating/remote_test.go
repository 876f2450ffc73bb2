//go:build ggml

package gating

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/p2p/wire"
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
	// A span node's way: layer 1's experts computed here (RemoteExperts.
	// Local), the others called; the tokens are the same.
	man, _, err := model.LoadManifest(xn.dir, mc)
	if err != nil {
		t.Fatal(err)
	}
	layer1 := map[int]moe.Expert{}
	for _, ref := range man.GetExperts() {
		if ref.GetLayer() != 1 {
			continue
		}
		sh, err := model.OpenShard(xn.dir, ref.GetShard())
		if err != nil {
			t.Fatal(err)
		}
		e, err := moe.NewExpertFromShard(ggml.Backend{}, sh, 1, moe.ExpertOptions{Threads: 1, MaxBatch: 64})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		layer1[int(ref.GetExpert())] = e
	}
	gen := NewGeneration(0)
	remote.Local = func(k expert.Key) moe.Expert {
		if k.Layer == 1 {
			return layer1[k.Expert]
		}
		return nil
	}
	got, err := sm.GenerateGreedy(ctx, prompt, maxTokens, 0, NewBatcher(remote, 0).Join(gen), false)
	if err != nil || fmt.Sprint(got.Tokens) != fmt.Sprint(want.Tokens) {
		t.Fatalf("layer 1 here: tokens %v (%v), llama.cpp %v", got.Tokens, err, want.Tokens)
	}
	if gen.Stats.LocalFLOPs.Load() == 0 || gen.Stats.Calls.Load() == 0 {
		t.Fatalf("layer 1 here: %d local FLOPs, %d calls: want both", gen.Stats.LocalFLOPs.Load(), gen.Stats.Calls.Load())
	}
	remote.Local = nil
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
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(500*time.Millisecond)) // 0: gating, 1: slow, 2: fast
	startExperts(t, hs[1], dir, res, func(e moe.Expert) expert.Computer { return slow{e, 300 * time.Millisecond} })
	startExperts(t, hs[2], dir, res, nil)
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	slowPeer, fastPeer := hs[1].ID(), hs[2].ID()
	sel := NewSelector(nil)
	remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
		Providers: func(expert.Key) []peer.ID { return []peer.ID{slowPeer, fastPeer} }, // the slow one listed first
		DType:     neuropb.WireDType_WIRE_DTYPE_F32, Selector: sel}
	generateLikeLlama(t, ctx, dir, res, remote)
	if remote.Hedges() == 0 {
		t.Fatal("no call was hedged")
	}
	if first := sel.Rank(expert.Key{}, []peer.ID{slowPeer, fastPeer}, nil)[0]; first != fastPeer {
		t.Fatalf("selector still prefers the slow node")
	}
	t.Logf("%d hedges, %d re-dispatches", remote.Hedges(), remote.Redispatches())
}

// stallOnce stalls one compute of a node (the first that starts after
// after calls have started) for what delay says then, as a GPU node does
// on the first batch of a new size while it compiles that size's kernels.
type stallOnce struct {
	moe.Expert
	calls *atomic.Int64
	after int64
	delay func() time.Duration
}

func (s stallOnce) Compute(x []float32, n int, out []float32) error {
	if s.calls.Add(1) == s.after {
		time.Sleep(s.delay())
	}
	return s.Expert.Compute(x, n, out)
}

// A call whose every provider outruns the deadline the selector sets from
// its recent pace (20 × its p95 + 2 s) is asked again with the whole call
// timeout: before, the generation failed with "no live provider" (seen in
// the Vulkan testnet: an expert node compiling a new batch size's kernels
// on lavapipe). The tokens stay llama.cpp's.
func TestStallPastThePaceDeadlineIsWaitedOut(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	dir, res := splitModel(t, p, model.F32, 78)
	hs := p2ptest.Cluster(t, ctx, 2, p2ptest.Config(500*time.Millisecond)) // 0: gating, 1: the only expert node
	var calls atomic.Int64
	node := hs[1].ID()
	sel := NewSelector(nil)
	// The stall outruns the deadline the node's pace sets when it starts
	// (2 s and more: a fixed 3 s stall did not, once, under CI's load,
	// when 20 × p95 had reached 1.13 s) by 2 s.
	var stalledFor, paceDeadline atomic.Int64
	startExperts(t, hs[1], dir, res, func(e moe.Expert) expert.Computer {
		return stallOnce{Expert: e, calls: &calls, after: 40, delay: func() time.Duration {
			d := sel.Deadline(node, time.Minute)
			paceDeadline.Store(int64(d))
			stalledFor.Store(int64(d + 2*time.Second))
			return d + 2*time.Second
		}}
	})
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
		Providers: func(expert.Key) []peer.ID { return []peer.ID{node} },
		DType:     neuropb.WireDType_WIRE_DTYPE_F32, Selector: sel}
	generateLikeLlama(t, ctx, dir, res, remote)
	if calls.Load() < 40 {
		t.Fatalf("%d computes: the stall never came", calls.Load())
	}
	if d := time.Duration(paceDeadline.Load()); d >= time.Minute {
		t.Fatalf("the node's pace deadline was %v when the stall came: no pace was known", d)
	}
	if remote.LastResorts() == 0 {
		t.Fatal("no call was asked again with the whole call timeout")
	}
	t.Logf("%d computes, %d last resorts, pace deadline %v, stalled %v", calls.Load(), remote.LastResorts(),
		time.Duration(paceDeadline.Load()), time.Duration(stalledFor.Load()))
}

// With ProvenFirst (a gating node whose validator vets new peers in the
// background), a node that announces every expert and never answers (a
// Sybil) is asked only while no provider has answered yet. Before, it was
// the only node hosting all of a round's experts (honest nodes host some
// each), so every round's group went to it, and each call in the group
// waited a hedge delay on it.
func TestProvenProvidersFirst(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	dir, res := splitModel(t, p, model.F32, 78)
	hs := p2ptest.Cluster(t, ctx, 4, p2ptest.Config(500*time.Millisecond)) // 0: gating, 1: staller, 2 and 3: honest
	var stalled, groups atomic.Int64                                       // calls alone and groups the staller was sent
	hs[1].LibP2P().SetStreamHandler(neuropb.ExpertProtocol, func(s network.Stream) {
		defer s.Reset()
		r := wire.NewReader(s, neuropb.MaxExpertMessageSize)
		for { // reads the requests, answers none
			req := &neuropb.ExpertRequest{}
			if r.Read(req) != nil {
				return
			}
			if len(req.GetGroup()) > 0 {
				groups.Add(1)
			} else {
				stalled.Add(1)
			}
		}
	})
	for _, h := range hs[2:] {
		startExperts(t, h, dir, res, nil)
	}
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	staller := hs[1].ID()
	// The staller announces every expert, each honest node half of them.
	providers := func(k expert.Key) []peer.ID { return []peer.ID{staller, hs[2+k.Expert%2].ID()} }
	remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed, Providers: providers,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, Selector: NewSelector(nil, ProvenFirst())}
	generateLikeLlama(t, ctx, dir, res, remote)
	// No group goes to a node that has never answered, once any provider
	// of the round has (the first round's may). Calls alone go to it first
	// only before any provider of their expert has answered (at most a
	// round's worth for each honest node), and as a hedge when an honest
	// answer is late.
	if g := groups.Load(); g > 1 {
		t.Fatalf("the staller was sent %d groups (%d calls alone, %d hedges)", g, stalled.Load(), remote.Hedges())
	}
	if n := stalled.Load() + groups.Load(); n > int64(2*p.ExpertsUsed)+remote.Hedges() {
		t.Fatalf("the staller was asked %d calls in a generation of %d tokens, %d hedges", n, remoteTestTokens, remote.Hedges())
	}
	t.Logf("staller asked %d calls alone, %d hedges", stalled.Load(), remote.Hedges())
}

// remoteTestPrompt is what generateLikeLlama asks, for remoteTestTokens
// tokens.
const remoteTestPrompt, remoteTestTokens = "hello world the expert", 12

// startExperts serves every expert of the split model at dir from h, each
// wrapped by wrap (nil: as loaded), until the test ends.
func startExperts(t *testing.T, h *p2p.Host, dir string, res *model.SplitResult, wrap func(moe.Expert) expert.Computer) {
	t.Helper()
	srv, err := expert.NewServer(h.LibP2P(), expert.DefaultConfig(), quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	serveExperts(t, srv, dir, res, ggml.Backend{}, wrap)
	srv.Start()
}

// generateLikeLlama generates remoteTestTokens greedy tokens through the
// split model at dir with remote's experts, and fails t unless they are
// llama.cpp's from the whole model (dir/m.gguf).
func generateLikeLlama(t *testing.T, ctx context.Context, dir string, res *model.SplitResult, remote *RemoteExperts) {
	t.Helper()
	want := llamaReference(t, filepath.Join(dir, "m.gguf"), remoteTestPrompt, remoteTestTokens)
	sm, err := ggml.LoadSplit(filepath.Join(dir, "shards"), res.ModelCID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	got, err := sm.GenerateGreedy(ctx, remoteTestPrompt, remoteTestTokens, 0, remote, false)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got.Tokens) != fmt.Sprint(want.Tokens) {
		t.Fatalf("tokens %v, llama.cpp %v", got.Tokens, want.Tokens)
	}
}

// failAfter computes until its node has served after calls, then fails
// every call (a node gone), and tells when it began to.
type failAfter struct {
	moe.Expert
	calls  *atomic.Int64
	after  int64
	failed func()
}

func (f failAfter) Compute(x []float32, n int, out []float32) error {
	if f.calls.Add(1) > f.after {
		f.failed()
		return errors.New("gone")
	}
	return f.Expert.Compute(x, n, out)
}

// When every provider of an expert fails (churn took them), the call waits
// for a new provider to appear — a node that takes the expert over — and
// asks it, instead of failing the generation: here the only node fails
// after 40 computes and a second one is announced a second later; the
// tokens are llama.cpp's.
func TestCallWaitsForANewProvider(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	dir, res := splitModel(t, p, model.F32, 79)
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(500*time.Millisecond)) // 0: gating, 1: fails, 2: announced later
	var calls atomic.Int64
	var failedAt atomic.Int64
	startExperts(t, hs[1], dir, res, func(e moe.Expert) expert.Computer {
		return failAfter{Expert: e, calls: &calls, after: 40, failed: func() { failedAt.CompareAndSwap(0, time.Now().UnixNano()) }}
	})
	startExperts(t, hs[2], dir, res, nil)
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	defer client.Close()
	remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed, CallTimeout: 10 * time.Second,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, Selector: NewSelector(nil),
		Providers: func(expert.Key) []peer.ID {
			// The failed node stays announced (its heartbeats have not
			// expired); the new one is heard of a second after it failed.
			if at := failedAt.Load(); at != 0 && time.Since(time.Unix(0, at)) > time.Second {
				return []peer.ID{hs[1].ID(), hs[2].ID()}
			}
			return []peer.ID{hs[1].ID()}
		}}
	generateLikeLlama(t, ctx, dir, res, remote)
	if failedAt.Load() == 0 || remote.CoverageWaits() == 0 {
		t.Fatalf("failed %v, %d coverage waits: want the node to fail and a call to wait for the new one", failedAt.Load() != 0, remote.CoverageWaits())
	}
}
