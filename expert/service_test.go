package expert

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// Import a tiny model on one node; three other nodes with automatic
// hosting fetch, verify and host all experts between them, each expert on
// at least two nodes, with shards byte-identical to the split output.
func TestAutoHostingCoversEveryExpertTwice(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nodes, extras := p2ptest.ClusterWithExtras(t, ctx, 4, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	origin, err := NewService(nodes[0], ServiceConfig{StoreDir: t.TempDir(), Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	if _, err := origin.Store().ImportSplit(dir); err != nil {
		t.Fatal(err)
	}
	if err := origin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	shardSize := int64(m.GetExperts()[0].GetShard().GetSize())
	var svcs []*Service
	for i, n := range nodes[1:] {
		s, err := NewService(n, ServiceConfig{StoreDir: t.TempDir(), Model: mc, Spec: Spec{Auto: true}, Compute: moetest.Backend{},
			MemoryBudget: 6 * shardSize, Threads: 1, Server: DefaultConfig(), Step: 300 * time.Millisecond},
			slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", n.ID().String()[46:]))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		extras[i+1].Set(s.HeartbeatExtra)
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
		svcs = append(svcs, s)
	}
	experts := len(m.GetExperts())
	covered := func() (int, map[Key]int) {
		count := map[Key]int{}
		for _, s := range svcs {
			for _, k := range s.Loaded() {
				count[k]++
			}
		}
		ok := 0
		for _, n := range count {
			if n >= 2 {
				ok++
			}
		}
		return ok, count
	}
	for {
		ok, count := covered()
		if ok == experts {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("after 120 s only %d of %d experts are on two nodes: %v", ok, experts, count)
		case <-time.After(200 * time.Millisecond):
		}
	}
	for _, s := range svcs {
		for _, k := range s.Loaded() {
			ref := m.GetExperts()[k.Layer*int(m.GetParams().GetExperts())+k.Expert].GetShard()
			bc, _ := cid.Cast(ref.GetCid())
			want, _ := os.ReadFile(model.ShardPath(dir, bc))
			have, err := os.ReadFile(filepath.Join(s.Store().Dir(), bc.String()+blobExt))
			if err != nil || !bytes.Equal(want, have) {
				t.Fatalf("expert %s: stored shard differs from the split output: %v", k, err)
			}
		}
	}
}

// noLookups is a node's network whose DHT finds no provider.
type noLookups struct {
	Network
	lookups int
}

func (n *noLookups) FindProviders(context.Context, cid.Cid, int, time.Duration) ([]peer.AddrInfo, error) {
	n.lookups++
	return nil, errors.New("no DHT in this test")
}

// startOrigin starts an expert service on net that stores the whole model
// split into dir and serves expert k, its heartbeats through extra.
func startOrigin(t *testing.T, ctx context.Context, net Network, extra *p2ptest.Extra, mc cid.Cid, dir string, k Key) *Service {
	t.Helper()
	origin, err := NewService(net, ServiceConfig{StoreDir: t.TempDir(), Model: mc, Spec: Spec{Experts: []Key{k}},
		Compute: moetest.Backend{}, Threads: 1, Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	if _, err := origin.Store().ImportSplit(dir); err != nil {
		t.Fatal(err)
	}
	extra.Set(origin.HeartbeatExtra)
	if err := origin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return origin
}

// A node taking an expert fetches its shard from a peer whose heartbeats
// say it serves the expert, without asking the DHT.
func TestFetchExpertFromThePeerTable(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nodes, extras := p2ptest.ClusterWithExtras(t, ctx, 2, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	k := Key{Layer: int(m.GetExperts()[0].GetLayer()), Expert: int(m.GetExperts()[0].GetExpert())}
	startOrigin(t, ctx, nodes[0], extras[0], mc, dir, k)
	net := &noLookups{Network: nodes[1]}
	for len(nodes[1].Peers().Hosting(mc.Bytes(), uint32(k.Layer)<<16|uint32(k.Expert), time.Now())) == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("the origin's heartbeat never announced the expert")
		case <-time.After(50 * time.Millisecond):
		}
	}
	s, err := NewService(net, ServiceConfig{StoreDir: t.TempDir(), Model: mc, Compute: moetest.Backend{}, Threads: 1, Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	ref := m.ExpertRef(k.Layer, k.Expert).GetShard()
	c, _ := cid.Cast(ref.GetCid())
	if err := s.fetchExpert(ctx, c, k); err != nil {
		t.Fatal(err)
	}
	if !s.Store().Has(c) || net.lookups != 0 {
		t.Fatalf("stored %v after %d DHT lookups, want the shard and none", s.Store().Has(c), net.lookups)
	}
}

// provides records the keys a node's network provided.
type provides struct {
	Network
	mu   sync.Mutex
	keys map[cid.Cid]bool
}

func (n *provides) Provide(ctx context.Context, c cid.Cid) error {
	n.mu.Lock()
	n.keys[c] = true
	n.mu.Unlock()
	return n.Network.Provide(ctx, c)
}

func (n *provides) provided(c cid.Cid) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.keys[c]
}

// freshTable is a node's network whose peer table has heard no one: a
// node that has just joined.
type freshTable struct {
	Network
	table *p2p.PeerTable
}

func (n freshTable) Peers() *p2p.PeerTable { return n.table }

// A node serving an expert provides its key and not its shard's CID (the
// other shards it stores, which it serves to no one as experts, it
// provides by CID); a node taking the expert without a peer table finds
// the shard through the expert's key.
func TestServedShardIsFoundUnderTheExpertKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	nodes, extras := p2ptest.ClusterWithExtras(t, ctx, 2, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	k := Key{Layer: int(m.GetExperts()[0].GetLayer()), Expert: int(m.GetExperts()[0].GetExpert())}
	other := Key{Layer: int(m.GetExperts()[1].GetLayer()), Expert: int(m.GetExperts()[1].GetExpert())}
	shard := func(k Key) cid.Cid {
		c, err := cid.Cast(m.ExpertRef(k.Layer, k.Expert).GetShard().GetCid())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	rec := &provides{Network: nodes[0], keys: map[cid.Cid]bool{}}
	origin := startOrigin(t, ctx, rec, extras[0], mc, dir, k)
	// Settled once it has provided both (its joining done).
	for !origin.Settled() {
		select {
		case <-ctx.Done():
			t.Fatal("the origin never settled")
		case <-time.After(50 * time.Millisecond):
		}
	}
	if !rec.provided(neuropb.ExpertKey(mc, k.Layer, k.Expert)) || !rec.provided(shard(other)) {
		t.Fatalf("settled without providing the expert's key (%v) and the other shards (%v)",
			rec.provided(neuropb.ExpertKey(mc, k.Layer, k.Expert)), rec.provided(shard(other)))
	}
	if rec.provided(shard(k)) {
		t.Fatal("the origin provided the shard of the expert it serves under the shard's CID")
	}
	s, err := NewService(freshTable{Network: nodes[1], table: p2p.NewPeerTable(10, time.Minute)},
		ServiceConfig{StoreDir: t.TempDir(), Model: mc, Compute: moetest.Backend{}, Threads: 1, Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.fetchExpert(ctx, shard(k), k); err != nil {
		t.Fatal(err)
	}
	if !s.Store().Has(shard(k)) {
		t.Fatal("the shard is not in the store")
	}
}

// busyDevices is a backend whose device list, after the first, waits
// until busy is closed (a computation holding the backend's lock).
type busyDevices struct {
	moetest.Backend
	calls atomic.Int32
	busy  chan struct{}
}

func (b *busyDevices) Devices() []moe.DeviceInfo {
	if b.calls.Add(1) > 1 {
		<-b.busy
	}
	return []moe.DeviceInfo{{Backend: "CPU", Name: "CPU", Type: "cpu", MemoryFree: 1 << 30, MemoryTotal: 2 << 30, Selected: true}}
}

// A heartbeat carries the devices as last read and never waits for the
// backend, even when a new read is due and the backend is busy.
func TestHeartbeatDoesNotWaitForTheDevices(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	nodes, _ := p2ptest.ClusterWithExtras(t, ctx, 1, p2ptest.Config(time.Second))
	b := &busyDevices{busy: make(chan struct{})}
	defer close(b.busy)
	s, err := NewService(nodes[0], ServiceConfig{StoreDir: t.TempDir(), Compute: b, Threads: 1, Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	s.devs.mu.Lock()
	s.devs.at = time.Time{} // a new read is due
	s.devs.mu.Unlock()
	done := make(chan *neuropb.Heartbeat)
	go func() {
		for range 3 {
			hb := &neuropb.Heartbeat{}
			s.HeartbeatExtra(hb)
			done <- hb
		}
	}()
	for range 3 {
		select {
		case hb := <-done:
			if ds := hb.GetCapacity().GetHardware().GetDevices(); len(ds) != 1 || ds[0].GetMemoryFreeBytes() != 1<<30 {
				t.Fatalf("devices %v, want the CPU as first read", ds)
			}
		case <-ctx.Done():
			t.Fatal("the heartbeat waited for the busy backend")
		}
	}
	for b.calls.Load() < 2 && ctx.Err() == nil {
		time.Sleep(time.Millisecond)
	}
	if n := b.calls.Load(); n != 2 {
		t.Fatalf("%d device reads, want 2 (the first, and one in the background)", n)
	}
}

// blockedProvides is a network whose provides wait until release is
// closed, counting the provides under way.
type blockedProvides struct {
	Network
	release        chan struct{}
	calls, running atomic.Int32
	most           atomic.Int32
}

func (n *blockedProvides) Provide(ctx context.Context, c cid.Cid) error {
	n.calls.Add(1)
	r := n.running.Add(1)
	defer n.running.Add(-1)
	for m := n.most.Load(); r > m && !n.most.CompareAndSwap(m, r); m = n.most.Load() {
	}
	select {
	case <-n.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Two provides of one key at once (add and announce's round, for an
// expert just hosted) make one provide in the DHT; both return its
// result.
func TestProvidesOfOneKeyAtOnceAreOne(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nodes, _ := p2ptest.ClusterWithExtras(t, ctx, 1, p2ptest.Config(time.Second))
	net := &blockedProvides{Network: nodes[0], release: make(chan struct{})}
	s, err := NewService(net, ServiceConfig{StoreDir: t.TempDir(), Compute: moetest.Backend{}, Threads: 1, Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	key, _ := cid.Parse("bafkreie6rbzb5krt2xil65gefch6ioyecixkzh7fp5ugsra62uz4l6t3ye")
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- s.provide(ctx, key) }()
	}
	// Let both reach the network, or wait a while: without the join the
	// second provide starts while the first waits.
	for deadline := time.Now().Add(300 * time.Millisecond); net.calls.Load() < 2 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	close(net.release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if m := net.most.Load(); m != 1 {
		t.Fatalf("%d provides of one key under way at once, want 1", m)
	}
	if p := s.provided.Get(key); p.At.IsZero() {
		t.Fatal("the provide is not recorded")
	}
}

// recordingBackend's experts record the batch sizes they compute; its one
// device is a GPU or the CPU.
type recordingBackend struct {
	moetest.Backend
	gpu bool
	mu  sync.Mutex
	ns  []int
}

func (b *recordingBackend) Devices() []moe.DeviceInfo {
	if b.gpu {
		return []moe.DeviceInfo{{Backend: "Vulkan", Name: "Vulkan0", Type: "gpu", Selected: true},
			{Backend: "CPU", Name: "CPU", Type: "cpu"}}
	}
	return []moe.DeviceInfo{{Backend: "CPU", Name: "CPU", Type: "cpu", Selected: true}}
}

func (b *recordingBackend) NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (moe.Expert, error) {
	e, err := b.Backend.NewExpert(w, o)
	if err != nil {
		return nil, err
	}
	return &recordingExpert{Expert: e, b: b}, nil
}

type recordingExpert struct {
	moe.Expert
	b *recordingBackend
}

func (e *recordingExpert) Compute(x []float32, n int, out []float32) error {
	e.b.mu.Lock()
	e.b.ns = append(e.b.ns, n)
	e.b.mu.Unlock()
	return e.Expert.Compute(x, n, out)
}

// On a GPU the first expert loaded is computed once at each batch class
// (warmBatches) before the node measures its speed, so that the device
// compiles its pipelines then; the experts after it, and any on the CPU,
// are only measured (the first) or not computed at all.
func TestFirstExpertOnAGPUIsWarmedBeforeItIsMeasured(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	nodes, _ := p2ptest.ClusterWithExtras(t, ctx, 1, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	measured := []int{1, 1, 1}
	for _, gpu := range []bool{false, true} {
		b := &recordingBackend{gpu: gpu}
		s, err := NewService(nodes[0], ServiceConfig{StoreDir: t.TempDir(), Model: mc, Compute: b, Threads: 1, Server: DefaultConfig()}, quiet())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Store().ImportSplit(dir); err != nil {
			t.Fatal(err)
		}
		for _, er := range m.GetExperts()[:2] {
			shard, err := s.Store().OpenShard(er.GetShard())
			if err != nil {
				t.Fatal(err)
			}
			if err := s.load(shard, Key{Layer: int(er.GetLayer()), Expert: int(er.GetExpert())}); err != nil {
				t.Fatal(err)
			}
		}
		s.Close()
		want := measured
		if gpu {
			want = append(slices.Clone(warmBatches), measured...)
		}
		if !slices.Equal(b.ns, want) {
			t.Fatalf("gpu %v: the loads computed batches %v, want %v", gpu, b.ns, want)
		}
	}
}
