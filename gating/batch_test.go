package gating

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/reputation"
)

// callsOf gives each part its run of an expert's slots and keeps a
// batched call within maxCallRows; one part's rows stay in one call.
func TestCallsOfSplitsSlotsByGeneration(t *testing.T) {
	parts := []part{{n: 2}, {n: 1}, {n: 3}} // used = 2: slots 0-3, 4-5, 6-11
	calls := callsOf([]int{1, 2, 7, 10, 11}, parts, 2)
	if len(calls) != 1 || !slices.Equal(calls[0].slots, []int{1, 2, 7, 10, 11}) ||
		fmt.Sprint(rowsOf(calls[0].segs)) != "[0:2 2:3]" {
		t.Fatalf("calls %+v", calls)
	}
	// Two parts of 300 tokens each send one slot per token to the expert:
	// 600 rows do not fit one call; each part's go whole in one.
	big := []part{{n: 300}, {n: 300}}
	var slots []int
	for t := range 600 {
		slots = append(slots, 2*t)
	}
	calls = callsOf(slots, big, 2)
	if len(calls) != 2 || len(calls[0].slots) != 300 || len(calls[1].slots) != 300 || calls[1].slots[0] != 600 ||
		fmt.Sprint(rowsOf(calls[0].segs), rowsOf(calls[1].segs)) != "[0:300] [1:300]" {
		t.Fatalf("%d calls: %v / %v", len(calls), rowsOf(calls[0].segs), rowsOf(calls[len(calls)-1].segs))
	}
}

func rowsOf(segs []segment) []string {
	var out []string
	for _, s := range segs {
		out = append(out, fmt.Sprintf("%d:%d", s.part, s.rows))
	}
	return out
}

// batchNet is a model's experts served by one expert node (the pure-Go
// backend) and a gating node's RemoteExperts that calls them.
type batchNet struct {
	remote *RemoteExperts
	p      model.Params
}

func newBatchNet(t *testing.T, ctx context.Context) *batchNet {
	t.Helper()
	return newBatchNetSigning(t, ctx, nil)
}

// newBatchNetSigning is newBatchNet whose expert node signs each answer's
// receipts once hold gives it a turn (nil: at once).
func newBatchNetSigning(t *testing.T, ctx context.Context, hold <-chan struct{}) *batchNet {
	t.Helper()
	p := model.Presets["tiny"]
	dir, split := splitModel(t, p, model.F32, 4242)
	hs := p2ptest.Cluster(t, ctx, 2, p2ptest.Config(300*time.Millisecond))
	key := hs[1].LibP2P().Peerstore().PrivKey(hs[1].ID())
	cfg := expert.DefaultConfig()
	cfg.SignReceipts = func(rs []*neuropb.UsageReceipt) error {
		if hold != nil {
			<-hold
		}
		return reputation.SignReceipts(key, rs)
	}
	srv, err := expert.NewServer(hs[1].LibP2P(), cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	serveExperts(t, srv, dir, split, moetest.Backend{}, nil)
	srv.Start()
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	t.Cleanup(func() { client.Close() })
	expertNode := hs[1].ID()
	return &batchNet{p: p, remote: &RemoteExperts{Client: client, Model: split.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, CallTimeout: 10 * time.Second,
		Providers: func(expert.Key) []peer.ID { return []peer.ID{expertNode} }}}
}

// layerTask is one generation's MoE call at one layer.
type layerTask struct {
	x        []float32
	n        int
	selected []int32
	weights  []float32
}

func (bn *batchNet) task(rng *rand.Rand, n int) layerTask {
	p := bn.p
	lt := layerTask{x: make([]float32, n*p.Embd), n: n}
	for i := range lt.x {
		lt.x[i] = 2*rng.Float32() - 1
	}
	for range n {
		perm := rng.Perm(p.Experts)[:p.ExpertsUsed]
		for _, e := range perm {
			lt.selected = append(lt.selected, int32(e))
			lt.weights = append(lt.weights, rng.Float32())
		}
	}
	return lt
}

// Generations inside forward passes at once send each layer's tokens in
// one round (one request per expert with every generation's rows), and
// each gets exactly what it gets alone, receipts for its own escrow only
// (one per expert its rows went to), and its layers counted as shared.
func TestBatcherSendsOneRoundPerLayerForAllGenerations(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	bn := newBatchNet(t, ctx)
	const gens = 4
	layers := bn.p.Layers
	rng := rand.New(rand.NewPCG(1, 2))
	tasks := make([][]layerTask, gens)
	want := make([][][]float32, gens)
	for g := range gens {
		for l := range layers {
			lt := bn.task(rng, 1+g) // generations of 1 to 4 tokens
			tasks[g] = append(tasks[g], lt)
			out, err := bn.remote.moe(ctx, nil, false, l, lt.x, lt.n, lt.selected, lt.weights)
			if err != nil {
				t.Fatal(err)
			}
			want[g] = append(want[g], out)
		}
	}
	b := NewBatcher(bn.remote, 5*time.Second) // only a generation that never calls would be waited for so long
	members := make([]*Member, gens)
	generations := make([]*Generation, gens)
	for g := range gens {
		generations[g] = NewGeneration(uint64(100 + g))
		members[g] = b.Join(generations[g])
		members[g].Enter()
	}
	var wg sync.WaitGroup
	errs := make([]error, gens)
	for g := range gens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer members[g].Leave()
			for l, lt := range tasks[g] {
				out, err := members[g].MoE(ctx, l, lt.x, lt.n, lt.selected, lt.weights)
				if err != nil {
					errs[g] = err
					return
				}
				if !slices.Equal(out, want[g][l]) {
					errs[g] = fmt.Errorf("generation %d, layer %d: the batched output differs from the one alone", g, l)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if rounds, calls := b.Rounds(); rounds != int64(layers) || calls != int64(gens*layers) {
		t.Fatalf("%d rounds carrying %d calls, want %d carrying %d", rounds, calls, layers, gens*layers)
	}
	for g, gen := range generations {
		if got := gen.Stats.SharedLayers.Load(); got != int64(layers) {
			t.Fatalf("generation %d: %d shared layers, want %d", g, got, layers)
		}
		wantReceipts := 0
		for _, lt := range tasks[g] {
			wantReceipts += len(moe.Route(lt.selected).Experts)
		}
		rs := gen.Receipts.Take()
		if len(rs) != wantReceipts {
			t.Fatalf("generation %d: %d receipts, want %d", g, len(rs), wantReceipts)
		}
		tokens, batched := uint64(0), 0
		for _, r := range rs {
			if r.GetEscrow() != uint64(100+g) {
				t.Fatalf("generation %d: a receipt for escrow %d", g, r.GetEscrow())
			}
			tokens += r.GetTokens()
			if len(r.GetBatch()) > 1 {
				batched++ // signed at once with others of its answer
			}
		}
		if batched == 0 {
			t.Fatalf("generation %d: no receipt signed in a batch of its answer's", g)
		}
		if want := uint64(layers * (1 + g) * bn.p.ExpertsUsed); tokens != want {
			t.Fatalf("generation %d: receipts for %d rows, want %d", g, tokens, want)
		}
	}
}

// A generation inside a forward pass that does not call (a long prompt's
// attention) holds the others' round only until the batcher's wait; a
// waiting call whose context ends returns at once; a batcher without a
// wait sends every call alone.
func TestBatcherWaitsBoundedAndCancels(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	bn := newBatchNet(t, ctx)
	rng := rand.New(rand.NewPCG(3, 4))
	lt := bn.task(rng, 2)
	want, err := bn.remote.moe(ctx, nil, false, 0, lt.x, lt.n, lt.selected, lt.weights)
	if err != nil {
		t.Fatal(err)
	}
	b := NewBatcher(bn.remote, 50*time.Millisecond)
	slowMember, m := b.Join(NewGeneration(0)), b.Join(NewGeneration(0))
	slowMember.Enter()
	m.Enter()
	out, err := m.MoE(ctx, 0, lt.x, lt.n, lt.selected, lt.weights)
	if err != nil || !slices.Equal(out, want) {
		t.Fatalf("a call beside a generation that does not call: %v", err)
	}
	if rounds, calls := b.Rounds(); rounds != 1 || calls != 1 {
		t.Fatalf("%d rounds of %d calls", rounds, calls)
	}
	// Cancelled while it waits for the silent one (the batcher's wait is
	// long now).
	b2 := NewBatcher(bn.remote, time.Minute)
	silent, m2 := b2.Join(NewGeneration(0)), b2.Join(NewGeneration(0))
	silent.Enter()
	m2.Enter()
	cctx, ccancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = m2.MoE(cctx, 0, lt.x, lt.n, lt.selected, lt.weights)
	ccancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a cancelled waiting call: %v", err)
	}
	if rounds, _ := b2.Rounds(); rounds != 0 {
		t.Fatalf("a cancelled call was sent (%d rounds)", rounds)
	}
	// Once the silent one leaves, a new call goes at once.
	silent.Leave()
	if out, err := m2.MoE(ctx, 0, lt.x, lt.n, lt.selected, lt.weights); err != nil || !slices.Equal(out, want) {
		t.Fatalf("after the silent generation left: %v", err)
	}
	m2.Leave()
	// No batching: each call alone, no round counted.
	b3 := NewBatcher(bn.remote, -1)
	m3 := b3.Join(NewGeneration(0))
	m3.Enter()
	if out, err := m3.MoE(ctx, 0, lt.x, lt.n, lt.selected, lt.weights); err != nil || !slices.Equal(out, want) {
		t.Fatalf("without batching: %v", err)
	}
	m3.Leave()
	if rounds, _ := b3.Rounds(); rounds != 0 {
		t.Fatalf("without batching, %d rounds", rounds)
	}
}

// groupRecorder wraps an expert: it computes with the others of a group in
// one call (moe.Grouper), and records the sizes of the groups and of the
// calls alone it computed.
type groupRecorder struct {
	moe.Expert
	log *groupSizes
}

type groupSizes struct {
	mu            sync.Mutex
	groups, alone []int
	fail          bool // groups fail, having computed nothing
}

func (g *groupRecorder) Compute(x []float32, n int, out []float32) error {
	g.log.mu.Lock()
	g.log.alone = append(g.log.alone, n)
	g.log.mu.Unlock()
	return g.Expert.Compute(x, n, out)
}

func (g *groupRecorder) ComputeGroup(es []moe.Computer, xs [][]float32, ns []int, outs [][]float32) error {
	g.log.mu.Lock()
	g.log.groups = append(g.log.groups, len(es))
	fail := g.log.fail
	g.log.mu.Unlock()
	if fail {
		return errors.New("the group's compute broke")
	}
	for i, e := range es {
		r, ok := e.(*groupRecorder)
		if !ok {
			return moe.ErrNotGroupable
		}
		if err := r.Expert.Compute(xs[i], ns[i], outs[i]); err != nil {
			return err
		}
	}
	return nil
}

// A node that hosts every expert a layer's tokens go to gets the layer's
// calls in one message (one group, computed together), and the layer's
// output is what the experts give computed one by one. When the group
// fails, each call goes on alone to the next provider.
func TestRoundAsksANodeOnceALayer(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	dir, split := splitModel(t, p, model.F32, 4343)
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(300*time.Millisecond))
	srv, err := expert.NewServer(hs[1].LibP2P(), expert.DefaultConfig(), quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	spare, err := expert.NewServer(hs[2].LibP2P(), expert.DefaultConfig(), quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { spare.Close() })
	serveExperts(t, spare, dir, split, moetest.Backend{}, nil)
	spare.Start()
	log := &groupSizes{}
	local := moe.LocalExperts{Embd: p.Embd, Used: p.ExpertsUsed, Experts: map[[2]int]moe.Expert{}}
	serveExperts(t, srv, dir, split, moetest.Backend{}, func(e moe.Expert) expert.Computer {
		return &groupRecorder{Expert: e, log: log}
	})
	for _, ref := range split.Manifest.GetExperts() {
		s, err := model.OpenShard(filepath.Join(dir, "shards"), ref.GetShard())
		if err != nil {
			t.Fatal(err)
		}
		e, err := moe.NewExpertFromShard(moetest.Backend{}, s, int(ref.GetLayer()), moe.ExpertOptions{})
		if err != nil {
			t.Fatal(err)
		}
		local.Experts[[2]int{int(ref.GetLayer()), int(ref.GetExpert())}] = e
	}
	srv.Start()
	client := expert.NewClient(hs[0].LibP2P(), quiet())
	t.Cleanup(func() { client.Close() })
	providers := []peer.ID{hs[1].ID()}
	remote := &RemoteExperts{Client: client, Model: split.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, CallTimeout: 10 * time.Second,
		Providers: func(expert.Key) []peer.ID { return providers }}
	bn := &batchNet{p: p, remote: remote}
	rng := rand.New(rand.NewPCG(7, 8))
	layers := func() {
		t.Helper()
		for l := range p.Layers {
			lt := bn.task(rng, 1)
			got, err := remote.moe(ctx, nil, false, l, lt.x, lt.n, lt.selected, lt.weights)
			if err != nil {
				t.Fatal(err)
			}
			want, err := local.MoE(ctx, l, lt.x, lt.n, lt.selected, lt.weights)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("layer %d: the grouped calls' output differs from the experts' one by one", l)
			}
		}
	}
	layers()
	log.mu.Lock()
	if want := slices.Repeat([]int{p.ExpertsUsed}, p.Layers); !slices.Equal(log.groups, want) || len(log.alone) != 0 {
		t.Fatalf("groups of %v and %d calls alone, want groups of %v (one a layer) and none alone", log.groups, len(log.alone), want)
	}
	log.fail = true
	log.mu.Unlock()
	providers = append(providers, hs[2].ID())
	layers()
	if got, want := spare.Served(), int64(p.Layers*p.ExpertsUsed); got != want || remote.redispatches.Load() != want {
		t.Fatalf("after failed groups the spare node answered %d calls (%d re-dispatched), want %d", got, remote.redispatches.Load(), want)
	}
}
