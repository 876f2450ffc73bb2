package expert

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/internal/meminfo"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
)

// ServiceConfig configures an expert node.
type ServiceConfig struct {
	// StoreDir holds the node's shards and manifests.
	StoreDir string
	// Model is the model to host experts of (cid.Undef: none; the node
	// still stores and serves blobs).
	Model cid.Cid
	// Spec says which experts to host.
	Spec Spec
	// MemoryBudget bounds the expert weights the node loads, in bytes
	// (0: no bound); BudgetSource says where it came from, for errors.
	MemoryBudget int64
	BudgetSource string
	// Threads for ggml (0: every core).
	Threads int
	// Lanes, LanePoll: moe.ExpertOptions's. With fewer than two lanes the
	// node's one compute thread is Go's: the backend's wait poller (a
	// moe.WaitPoller) polls for LanePoll after each answer instead, only
	// after answering callers of other machines unless PollNearby.
	Lanes      int
	LanePoll   time.Duration
	PollNearby bool
	Server     Config
	// Step is the pause between two automatic hosting steps (jittered),
	// long enough for a heartbeat to announce the last choice.
	Step time.Duration
	// Progress, if set, is told how fetches advance.
	Progress Progress
	// Reprovide is how often every stored blob is announced again in the
	// DHT, well within the life of a provider record (default 12 h).
	Reprovide time.Duration
	// Announce, if set, gives more keys to provide as the blobs are (the
	// span a node serves: neuropb.SpanKey).
	Announce func() []cid.Cid
	// Fault makes the node misbehave on purpose (adversarial testnets
	// only).
	Fault Fault
	// Compute loads the experts (the ggml backend in neurod). It is
	// required when Model is set.
	Compute Compute
	// KeepHeap leaves the heap that loading shards freed to the runtime's
	// scavenger, for a process that runs other nodes too (a simulation's:
	// returning it at once collects the whole process's heap each time).
	// Otherwise it goes back to the system once the experts are loaded.
	KeepHeap bool
}

// Compute is what an expert node computes with: it loads experts, and
// requantizes weights for the lowprec fault.
type Compute interface {
	moe.ExpertLoader
	moe.Quantizer
}

// Service is an expert node: it keeps a store of shards, serves them to
// peers, announces them in the DHT, and hosts experts of a model.
type Service struct {
	cfg     ServiceConfig
	p2p     Network
	log     *slog.Logger
	store   *Store
	shards  *ShardServer
	server  *Server
	fetcher *Fetcher

	mu sync.Mutex
	// loading is held while a shard is loaded into the backend: fetches
	// and announcements run several at once, loads one at a time.
	loading  sync.Mutex
	manifest *neuropb.Manifest
	hosted   map[Key]bool // chosen (fetching or serving)
	loaded   map[Key]moe.Expert
	// served are the loaded experts as the server computes them (in a
	// faulty mode, --faulty, wrong), which a span's layers use too.
	served map[Key]Computer
	used   int64
	swaps  atomic.Int64
	// provided is when each key was last provided (announce and add).
	provided *p2p.Provisions
	// providing joins the provides of one key under way at once.
	providing singleflight.Group
	// span is the layers [first, end) whose experts this node hosts for a
	// span, once chosen (end 0: none).
	span  [2]int
	speed float32
	// devs is the device list as last read (cachedDevices).
	devs deviceCache
	// chose is closed once host has taken its first experts (or given
	// up): announce waits for it, so as not to provide by CID the shards
	// of experts about to be served (servedShards).
	chose     chan struct{}
	choseOnce sync.Once
	// announced is closed when announce has been through what the node
	// stores once, after the first choice (Settled).
	announced     chan struct{}
	announcedOnce sync.Once

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	once     sync.Once
	closeErr error
}

// Network is what an expert node uses of the p2p stack (*p2p.Host).
type Network interface {
	LibP2P() host.Host
	ID() peer.ID
	// Peers is the table of peers heard on the routing topic.
	Peers() *p2p.PeerTable
	Provide(ctx context.Context, c cid.Cid) error
	FindProviders(ctx context.Context, c cid.Cid, n int, timeout time.Duration) ([]peer.AddrInfo, error)
	// NetworkSize is how many nodes the network has: a node provides
	// again as it grows (p2p.Provision).
	NetworkSize() int
	// PublishHeartbeat tells the others at once what the node hosts.
	PublishHeartbeat(ctx context.Context) error
	// AwaitPeers waits until the peer table holds share of the network
	// (bounded by the heartbeats' intervals).
	AwaitPeers(ctx context.Context, share float64)
}

var _ Network = (*p2p.Host)(nil)

// NewService builds an expert node on h. It starts nothing: Start does.
func NewService(h Network, cfg ServiceConfig, log *slog.Logger) (*Service, error) {
	if log == nil {
		log = slog.Default()
	}
	if cfg.Step <= 0 {
		cfg.Step = time.Second
	}
	if cfg.Reprovide <= 0 {
		cfg.Reprovide = 12 * time.Hour
	}
	if cfg.Model.Defined() && cfg.Compute == nil {
		return nil, fmt.Errorf("expert node: hosting experts of %s: %w", cfg.Model, moe.ErrNoBackend)
	}
	store, err := OpenStore(cfg.StoreDir)
	if err != nil {
		return nil, err
	}
	switch cfg.Fault {
	case FaultSlow:
		cfg.Server.SlowDown = max(cfg.Server.SlowDown, SlowFaultDelay)
	case FaultDrop:
		cfg.Server.drop = true
	}
	if wp, ok := cfg.Compute.(moe.WaitPoller); ok && cfg.Lanes < 2 && cfg.LanePoll > 0 && cfg.Server.WaitPoll == nil {
		cfg.Server.WaitPoll, cfg.Server.WaitPollFor, cfg.Server.WaitPollNearby = wp, cfg.LanePoll, cfg.PollNearby
	}
	srv, err := NewServer(h.LibP2P(), cfg.Server, log)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, p2p: h, log: log.With("component", "expert-node"), store: store, server: srv,
		shards: NewShardServer(h.LibP2P(), store, log), hosted: map[Key]bool{}, loaded: map[Key]moe.Expert{}, served: map[Key]Computer{}, provided: p2p.NewProvisions(h.ID())}
	s.chose = make(chan struct{})
	s.announced = make(chan struct{})
	s.fetcher = NewFetcher(h.LibP2P(), store, cfg.Progress, log)
	s.devs.list, s.devs.at = s.devices(), time.Now()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Store is the node's blob store.
func (s *Service) Store() *Store { return s.store }

// Start serves shards and experts, announces the stored blobs and, if a
// model is set, starts hosting its experts in the background. Its
// goroutines run until Close; ctx is not kept.
func (s *Service) Start(context.Context) error {
	s.shards.Start()
	s.server.Start()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.announce(s.ctx)
	}()
	if s.cfg.Model.Defined() {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.host(s.ctx); err != nil && s.ctx.Err() == nil {
				s.log.Error("hosting stopped", "err", err)
			}
		}()
	}
	return nil
}

// Close stops everything and frees the experts; it returns once every
// goroutine of the service has ended. Safe to call twice.
func (s *Service) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.wg.Wait()
		errs := []error{s.shards.Close(), s.server.Close()}
		s.mu.Lock()
		for k, e := range s.loaded {
			if err := e.Close(); err != nil {
				errs = append(errs, fmt.Errorf("expert %s: %w", k, err))
			}
		}
		s.mu.Unlock()
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// announce provides every stored blob, rescans for new ones (an import
// while the node runs) and provides each again every Reprovide, or sooner
// when the network has grown since (p2p.Provision). It stops with the
// node. The shard of an expert it serves is provided under the expert's
// key alone (servedShards).
func (s *Service) announce(ctx context.Context) {
	// A provide that failed (every lookup timed out on a loaded network) is
	// tried again after a wait that doubles, not on the next round: the
	// round is 5 s, and retrying every key every round added the lookups
	// that kept the network loaded.
	type retry struct {
		at   time.Time
		wait time.Duration
	}
	failed := map[cid.Cid]retry{}
	if s.cfg.Model.Defined() {
		// Until the first choice, or chooseWait: a model whose manifest
		// no one provides keeps the node from choosing, not from
		// announcing what it stores.
		select {
		case <-ctx.Done():
			return
		case <-s.chose:
		case <-time.After(chooseWait):
		}
	}
	for {
		stored, err := s.store.List()
		if err != nil {
			s.log.Warn("list store", "err", err)
		}
		served := s.servedShards()
		blobs := make([]cid.Cid, 0, len(stored)+len(served))
		for _, c := range stored {
			if _, ok := served[c]; !ok {
				blobs = append(blobs, c)
			}
		}
		// The experts served, under their expert keys, so that gating
		// nodes find them in the DHT as well as in heartbeats, and nodes
		// taking one find its shard.
		for _, k := range served {
			blobs = append(blobs, neuropb.ExpertKey(s.cfg.Model, k.Layer, k.Expert))
		}
		if s.cfg.Announce != nil {
			blobs = append(blobs, s.cfg.Announce()...)
		}
		size := s.p2p.NetworkSize()
		for _, c := range blobs {
			due := s.provided.Due(c, time.Now(), size, s.cfg.Reprovide)
			if !due || time.Now().Before(failed[c].at) {
				continue
			}

			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := s.provide(pctx, c)
			cancel()
			if err == nil {
				delete(failed, c)
			} else if ctx.Err() == nil {
				wait := min(max(2*failed[c].wait, provideRetry), maxProvideRetry)
				failed[c] = retry{at: time.Now().Add(wait), wait: wait}
				s.log.Debug("provide", "cid", c, "err", err, "again_in", wait)
			}
		}
		s.announcedOnce.Do(func() { close(s.announced) })
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
}

// chooseWait bounds announce's wait for the first choice.
const chooseWait = 2 * time.Minute

// countsMaxAge bounds how long host reuses the provider counts it read.
const countsMaxAge = 10 * time.Second

// awaitShare is the share of the network a node's peer table holds before
// its first automatic choice (p2p.Host.AwaitPeers).
const awaitShare = 0.9

// markChosen closes chose once.
func (s *Service) markChosen() { s.choseOnce.Do(func() { close(s.chose) }) }

// Settled reports whether the node has taken its first experts (chosen
// them, fetched their shards, loaded them and provided their keys, or
// given up trying) and then provided what else it stores once (the
// manifest): the work of joining is done.
func (s *Service) Settled() bool {
	select {
	case <-s.announced:
		return true
	default:
		return false
	}
}

// servedShards maps the shard of each expert the node serves (or has
// chosen and is loading) to the expert. Such a shard is not provided
// under its own CID: the expert's key finds the same nodes (fetchExpert
// looks both up), and two records per expert made two lookups and forty
// puts each time a node took one — in a simulated network under churn,
// most of the dials.
func (s *Service) servedShards() map[cid.Cid]Key {
	out := map[cid.Cid]Key{}
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.manifest
	if m == nil || !s.cfg.Model.Defined() {
		return out
	}
	for k := range s.hosted {
		if c, err := cid.Cast(m.ExpertRef(k.Layer, k.Expert).GetShard().GetCid()); err == nil {
			out[c] = k
		}
	}
	return out
}

// provideRetry is the first wait before a failed provide is tried again,
// doubling up to maxProvideRetry.
const (
	provideRetry    = 30 * time.Second
	maxProvideRetry = 10 * time.Minute
)

// provide provides c in the DHT and records it, so that announce does not
// provide it again before it is due (an expert just hosted was provided
// twice: by add, then by announce's next round). A provide of c already
// under way is waited for, not repeated: add and announce's round both
// provided an expert just hosted at once (measured: a third of a
// simulated network's provides while it started).
func (s *Service) provide(ctx context.Context, c cid.Cid) error {
	_, err, _ := s.providing.Do(c.KeyString(), func() (any, error) { return nil, s.provideOnce(ctx, c) })
	return err
}

// provideOnce is provide's work.
func (s *Service) provideOnce(ctx context.Context, c cid.Cid) error {
	size := s.p2p.NetworkSize()
	prev := s.provided.Get(c)
	start := time.Now()
	err := s.p2p.Provide(ctx, c)
	var ago time.Duration // 0: never provided before
	if !prev.At.IsZero() {
		ago = time.Since(prev.At).Round(time.Second)
	}
	s.log.Debug("provide", "cid", c, "network", size, "before", prev.Network, "ago", ago,
		"took", time.Since(start).Round(time.Millisecond), "err", err)
	if err != nil {
		return err
	}
	s.provided.Set(c, p2p.Provision{At: time.Now(), Network: size})
	return nil
}

// Fetch gets blob c (a manifest or a shard) into the store from its
// providers, retrying until ctx ends. It returns at once if the store has
// it.
func (s *Service) Fetch(ctx context.Context, c cid.Cid) error { return s.fetch(ctx, c) }

// fetchExpert gets expert k's shard c: first from up to tableFetchPeers
// peers whose heartbeats say they serve k (a node serves an expert from
// its shard), then from the providers the DHT knows of the expert's key
// (the nodes serving it provide that key, not the shard's CID:
// servedShards) or of the shard (a node storing the whole model).
// Every node that took an expert looked its shard up in the DHT, a lookup
// of some twenty-five queries, most of them dials, for what its peer table
// already told it: under churn these lookups were a third of a simulated
// network's DHT traffic.
func (s *Service) fetchExpert(ctx context.Context, c cid.Cid, k Key) error {
	if s.store.Has(c) || !s.cfg.Model.Defined() {
		return s.fetch(ctx, c)
	}
	now := time.Now()
	hosts := s.p2p.Peers().Hosting(s.cfg.Model.Bytes(), uint32(k.Layer)<<16|uint32(k.Expert), now)
	rand.Shuffle(len(hosts), func(i, j int) { hosts[i], hosts[j] = hosts[j], hosts[i] })
	var provs []peer.AddrInfo
	for _, h := range hosts {
		if h.ID != s.p2p.ID() && len(h.Addrs) > 0 && !h.Overdue(now) && len(provs) < tableFetchPeers {
			provs = append(provs, peer.AddrInfo{ID: h.ID, Addrs: h.Addrs})
		}
	}
	if len(provs) > 0 {
		fctx, cancel := context.WithTimeout(ctx, tableFetchWait)
		err := s.fetcher.Fetch(fctx, c, provs)
		cancel()
		if err == nil {
			return nil
		}
		s.log.Debug("fetch from the peers serving the expert", "expert", k.String(), "err", err)
	}
	return s.fetchVia(ctx, c, neuropb.ExpertKey(s.cfg.Model, k.Layer, k.Expert), c)
}

// tableFetchPeers is how many of the peers announcing an expert fetchExpert
// tries, within tableFetchWait, before it asks the DHT.
const (
	tableFetchPeers = 3
	tableFetchWait  = 30 * time.Second
)

// fetch gets blob c from its providers, retrying until ctx ends.
func (s *Service) fetch(ctx context.Context, c cid.Cid) error { return s.fetchVia(ctx, c, c) }

// fetchVia gets blob c from the providers of keys, each looked up in
// turn, retrying until ctx ends.
func (s *Service) fetchVia(ctx context.Context, c cid.Cid, keys ...cid.Cid) error {
	for attempt := 0; ; attempt++ {
		if s.store.Has(c) {
			return nil
		}
		var err error
		for _, key := range keys {
			var provs []peer.AddrInfo
			provs, err = s.p2p.FindProviders(ctx, key, 5, 10*time.Second)
			if err == nil && len(provs) > 0 {
				if err = s.fetcher.Fetch(ctx, c, provs); err == nil {
					return nil
				}
			}
		}
		if attempt%10 == 9 {
			s.log.Warn("still fetching", "cid", c, "attempts", attempt+1, "err", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("fetch %s: %w", c, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

func (s *Service) host(ctx context.Context) error {
	defer s.markChosen()
	if err := s.fetch(ctx, s.cfg.Model); err != nil {
		return err
	}
	m, err := s.store.Manifest(s.cfg.Model)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.manifest = m
	s.mu.Unlock()
	spec := s.cfg.Spec
	if spec.spanAuto {
		if m.GetFormat() < 2 {
			return fmt.Errorf("a span: model %s was split without layer shards (manifest format %d): split it again", s.cfg.Model, m.GetFormat())
		}
		spans := map[[2]int]int{}
		for r, ps := range s.p2p.Peers().Spans(s.cfg.Model.Bytes(), time.Now()) {
			spans[r] = len(ps)
		}
		first, end, ok := ChooseSpan(m, s.cfg.MemoryBudget, spans, !spec.spanElsewhere)
		if !ok {
			return fmt.Errorf("a span: not one layer of %s fits the %.1f MiB for weights (%s)", s.cfg.Model,
				float64(s.cfg.MemoryBudget)/(1<<20), s.cfg.BudgetSource)
		}
		spec.spanFirst, spec.spanEnd, spec.spanAuto = first, end, false
		s.log.Info("chose a span", "layers", fmt.Sprintf("%d-%d", first, end-1))
	}
	if spec.spanEnd > spec.spanFirst {
		s.mu.Lock()
		s.span = [2]int{spec.spanFirst, spec.spanEnd}
		s.mu.Unlock()
	}
	if spec.Auto && spec.spanEnd > spec.spanFirst && !spec.spanElsewhere {
		// The span's experts first, then the automatic choice with
		// what is left.
		keys, err := Spec{}.WithSpan(spec.spanFirst, spec.spanEnd).Resolve(m)
		if err != nil {
			return err
		}
		if err := s.addAll(ctx, m, keys); err != nil {
			return err
		}
	}
	if !spec.Auto {
		keys, err := spec.Resolve(m)
		if err != nil {
			return err
		}
		if err := s.fits(m, keys); err != nil {
			return err
		}
		return s.addAll(ctx, m, keys)
	}
	// Choose from what the network hosts, not from the few peers heard
	// in the first seconds.
	s.p2p.AwaitPeers(ctx, awaitShare)
	// Nodes that start together would choose together: spread the first
	// choices out.
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	first := time.Duration(rand.Float64() * float64(3*s.cfg.Step))
	select {
	case <-ctx.Done():
		return nil
	case <-time.After(first):
	}
	// The counts are read again only when what the peers host may have
	// changed (p2p.PeerTable.HostingVersion), or countsMaxAge has passed
	// (entries expire without changing it): every node reading a large
	// network's table every second cost 6% of a simulated network of
	// 300's CPU.
	var providers map[Key]int
	var full int
	var ver uint64
	var counted time.Time
	for {
		if v := s.p2p.Peers().HostingVersion(); providers == nil || v != ver || time.Since(counted) > countsMaxAge {
			providers = s.providerCounts(m) // the peer table's lock, not ours
			first, end := m.MoELayers()
			full = s.p2p.Peers().FullHosts(s.cfg.Model.Bytes(), m.ExpertsPerLayer()*(end-first), time.Now())
			ver, counted = v, time.Now()
		}
		s.mu.Lock()
		choice := Choice{Manifest: m, Providers: providers, FullHosts: full, Hosted: cloneSet(s.hosted),
			Budget: s.cfg.MemoryBudget - s.used, Self: s.p2p.ID()}
		s.mu.Unlock()
		keys := Choose(choice)
		if len(keys) == 0 {
			s.rebalance(ctx, m, choice, rng)
		}
		// A step's experts load hostParallel at a time, as an explicit
		// list's do: one after the other, a step of the bench model's
		// eight (12 MiB each) took 1.2 s, as each one's fetch and reading
		// waited for the previous one's load.
		if len(keys) > 0 {
			if err := s.addAll(ctx, m, keys); err != nil {
				return err
			}
		}
		s.markChosen()
		jitter := time.Duration(float64(s.cfg.Step) * (0.5 + rand.Float64()))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(jitter):
		}
	}
}

// rebalance runs when nothing more fits: it takes the expert this node
// lacks that has the fewest providers in place of one of its own with
// more other providers than that one has (so that the two end at least as
// well provided as the missing one was plus one: the spread of provider
// counts shrinks, and a swap is never undone by the same rule). Choices
// made at the same moment by several nodes are undone this way. (It used
// to leave the room to the next step's Choose, which prefers to complete
// a layer: it took the dropped expert back, and three nodes dropped and
// took back experts for good while one stayed on a single node.) The
// rule compares counts instead of asking for two providers: Sybils that
// claim every expert in their heartbeats add the same to every count, and
// with the threshold no node took an expert that churn had left on one
// live node (TestSimUnderChurn: coverage 1 for the whole 90 s settle).
//
// Every node sees the same counts and steps every second, so each swaps
// only with the odds rebalancePick gives (about as many nodes as the
// missing expert lacks providers, network-wide); when every node swapped,
// a hundred nodes took the same expert at once, dropped the same
// well-provided ones, and swapped back and forth for good (testnet sim,
// 100 nodes: 4 to 16 swaps a second, two thirds of the routing topic's
// heartbeats out of turn, two cores busy).
func (s *Service) rebalance(ctx context.Context, m *neuropb.Manifest, c Choice, rng *rand.Rand) {
	first, end, _ := s.SpanLayers() // a span's experts stay
	missing, drop, odds := rebalancePick(m, c, first, end, rng)
	if missing == nil || drop == nil || rng.Float64() >= odds {
		return
	}
	size := func(k Key) int64 { return int64(m.ExpertRef(k.Layer, k.Expert).GetShard().GetSize()) }
	if c.Budget+size(*drop) < size(*missing) {
		return
	}
	s.mu.Lock()
	dropped, ok := s.loaded[*drop]
	if !ok { // still fetching: leave it
		s.mu.Unlock()
		return
	}
	delete(s.loaded, *drop)
	delete(s.served, *drop)
	delete(s.hosted, *drop)
	s.used -= size(*drop)
	s.mu.Unlock()
	if _, err := s.server.Remove(s.cfg.Model, drop.Layer, drop.Expert); err == nil {
		if err := dropped.Close(); err != nil {
			s.log.Warn("free a dropped expert", "expert", drop.String(), "err", err)
		}
	}
	s.swaps.Add(1)
	heard, _ := s.p2p.Peers().Stats(time.Now())
	s.log.Info("dropped a well-provided expert to make room", "expert", drop.String(), "providers", c.Providers[*drop]+1,
		"for", missing.String(), "its_providers", c.Providers[*missing], "odds", odds, "peers_heard", heard)
	if err := s.add(ctx, m, *missing); err != nil {
		s.log.Warn("host the missing expert", "expert", missing.String(), "err", err)
	}
}

// rebalancePick is rebalance's choice: the expert the node lacks with the
// fewest providers (ties drawn with rng, so that nodes spread over them),
// and the one of its own outside the span [spanFirst, spanEnd) with the
// most other providers, one more than the missing one has when that has
// fewer than two, two more when it has at most half the mean (no swap
// otherwise; counts without the peers claiming every expert); either is nil when
// there is none. odds is the chance this node should make the swap now:
// every node lacking the expert sees the same counts, and about as many
// of them should act as the expert lacks providers to reach the mean
// (need, at least one), spread over the experts tied for fewest. The
// nodes that could act are estimated from the counts: all providers
// added up over the experts this node hosts each (Sybils that claim
// every expert inflate it, which only slows the swaps).
func rebalancePick(m *neuropb.Manifest, c Choice, spanFirst, spanEnd int, rng *rand.Rand) (missing, drop *Key, odds float64) {
	experts := m.ExpertsPerLayer()
	first, end := m.MoELayers()
	var sum, n, ties int
	for l := first; l < end; l++ {
		for e := range experts {
			k := Key{l, e}
			sum += c.Providers[k]
			n++
			if c.Hosted[k] {
				sum++
				continue
			}
			switch {
			case missing == nil || c.Providers[k] < c.Providers[*missing]:
				missing, ties = &k, 1
			case c.Providers[k] == c.Providers[*missing]:
				// Reservoir sampling: each of the tied experts is kept with
				// the same chance.
				if ties++; rng.IntN(ties) == 0 {
					missing = &k
				}
			}
		}
	}
	if missing == nil {
		return nil, nil, 0
	}
	// Whether the missing expert is short enough to be worth a swap, and
	// the gap in providers the swap needs between the one dropped (its
	// other providers) and the missing one: one (totals 9 against 7,
	// evened to 8 and 8) where the missing expert has fewer than two
	// providers, two where it has at most half the mean; none otherwise.
	// Both counted without the peers that claim every expert (Sybils
	// claiming everything would hide a shortage). Evening out counts of
	// 8 and 10 buys no coverage, and a node that has not yet heard of
	// another's swap sees such gaps where there are none (the dropped
	// expert one provider too many, the taken one one too few): a
	// network of 300 under churn, swapping across every gap of two,
	// swapped one to three experts a second, a fetch and a provide
	// each, and each kill's shortfall drew swaps that the node joining
	// in its place then made needless.
	mean := float64(sum) / float64(max(1, n))
	short := float64(c.Providers[*missing] - c.FullHosts)
	var gap int
	switch {
	case short < 2:
		gap = 1
	case short <= (mean-float64(c.FullHosts))/2:
		gap = 2
	default:
		return missing, nil, 0
	}
	for k := range c.Hosted {
		if k.Layer >= spanFirst && k.Layer < spanEnd {
			continue
		}
		// k's providers: c.Providers[k] others and this node; after the
		// swap, c.Providers[k] for k and c.Providers[missing]+1 for the
		// missing one.
		if c.Providers[k] >= c.Providers[*missing]+gap && (drop == nil || c.Providers[k] > c.Providers[*drop] ||
			(c.Providers[k] == c.Providers[*drop] && compareKeys(k, *drop) < 0)) {
			kk := k
			drop = &kk
		}
	}
	if drop == nil {
		return missing, nil, 0
	}
	need := max(1, mean-float64(c.Providers[*missing]))
	nodes := float64(sum) / float64(max(1, len(c.Hosted)))
	could := max(1, nodes-float64(c.Providers[*missing]))
	return missing, drop, min(1, need*float64(ties)/could)
}

// providerCounts counts, per expert, the other nodes whose heartbeats say
// they host it.
func (s *Service) providerCounts(m *neuropb.Manifest) map[Key]int {
	out := map[Key]int{}
	for packed, n := range s.p2p.Peers().HostingCounts(s.cfg.Model.Bytes(), time.Now()) {
		out[Key{int(packed >> 16), int(packed & 0xffff)}] = n
	}
	return out
}

// fits checks that the experts of an explicit list fit the memory budget,
// before any is fetched.
func (s *Service) fits(m *neuropb.Manifest, keys []Key) error {
	if s.cfg.MemoryBudget <= 0 {
		return nil
	}
	var need int64
	for _, k := range keys {
		need += int64(m.ExpertRef(k.Layer, k.Expert).GetShard().GetSize())
	}
	if need > s.cfg.MemoryBudget {
		return fmt.Errorf("expert list: %d experts need %.1f MiB, more than the %.1f MiB for expert weights (%s)",
			len(keys), float64(need)/(1<<20), float64(s.cfg.MemoryBudget)/(1<<20), s.cfg.BudgetSource)
	}
	return nil
}

// hostParallel is how many experts addAll fetches and announces at once:
// each costs round trips (the fetch, two DHT provider records), so that a
// span node of hundreds of experts 50 ms from its peers would take
// minutes one by one.
const hostParallel = 8

// addAll hosts keys, hostParallel at a time; the first error stops it.
func (s *Service) addAll(ctx context.Context, m *neuropb.Manifest, keys []Key) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(hostParallel)
	for _, k := range keys {
		g.Go(func() error { return s.add(gctx, m, k) })
	}
	err := g.Wait()
	s.releaseHeap()
	return err
}

// releaseHeap returns the heap that loading shards freed to the system,
// unless KeepHeap: each shard was read whole into the heap, verified and
// copied into the backend, and the runtime's background scavenger would
// return that memory a few pages at a time while the node serves (each
// madvise flushes the TLB: 2% of a core, in spikes, through a loopback
// testnet's decode).
func (s *Service) releaseHeap() {
	if !s.cfg.KeepHeap {
		debug.FreeOSMemory()
	}
}

// add hosts expert k: announces the choice, fetches and verifies the
// shard, loads it into ggml, serves it and provides it. Several may run at
// once; the loads take turns.
func (s *Service) add(ctx context.Context, m *neuropb.Manifest, k Key) error {
	er := m.ExpertRef(k.Layer, k.Expert)
	if er == nil {
		return fmt.Errorf("expert %s: not in the manifest", k)
	}
	ref := er.GetShard()
	s.mu.Lock()
	if s.hosted[k] {
		s.mu.Unlock()
		return nil
	}
	s.hosted[k] = true
	s.used += int64(ref.GetSize())
	s.mu.Unlock()
	if err := s.p2p.PublishHeartbeat(ctx); err != nil {
		s.log.Debug("announce choice", "err", err)
	}
	c, err := cid.Cast(ref.GetCid())
	if err != nil {
		return err
	}
	if err := s.fetchExpert(ctx, c, k); err != nil {
		return err
	}
	shard, err := s.store.OpenShard(ref)
	if err != nil {
		return fmt.Errorf("expert %s: %w", k, err)
	}
	if err := s.load(shard, k); err != nil {
		return err
	}
	if err := s.provide(ctx, neuropb.ExpertKey(s.cfg.Model, k.Layer, k.Expert)); err != nil && ctx.Err() == nil {
		s.log.Debug("provide expert", "expert", k.String(), "err", err)
	}
	s.log.Info("hosting expert", "expert", k.String(), "cid", c)
	return nil
}

// load loads expert k from its shard into the backend and serves it, one
// load at a time; the first measures the node's speed.
// expertOptions are the options of the experts the service loads.
func (s *Service) expertOptions() moe.ExpertOptions {
	return moe.ExpertOptions{Threads: s.cfg.Threads, Lanes: s.cfg.Lanes, LanePoll: s.cfg.LanePoll}
}

func (s *Service) load(shard *model.Shard, k Key) error {
	s.loading.Lock()
	defer s.loading.Unlock()
	var e moe.Expert
	var err error
	if s.cfg.Fault == FaultLowPrec {
		e, err = lowPrecExpert(s.cfg.Compute, shard, k.Layer, s.expertOptions())
	} else {
		e, err = moe.NewExpertFromShard(s.cfg.Compute, shard, k.Layer, s.expertOptions())
	}
	if err != nil {
		return fmt.Errorf("expert %s: %w", k, err)
	}
	c := withFault(e, s.cfg.Fault)
	if err := s.server.Add(s.cfg.Model, k.Layer, k.Expert, c); err != nil {
		e.Close()
		return err
	}
	s.mu.Lock()
	s.loaded[k], s.served[k] = e, c
	measured := s.speed != 0
	s.mu.Unlock()
	if !measured { // computing, outside the lock every heartbeat and lookup takes
		if s.onGPU() {
			warm(e)
		}
		speed := measure(e)
		s.mu.Lock()
		if s.speed == 0 {
			s.speed = speed
		}
		s.mu.Unlock()
	}
	return nil
}

// Compute runs expert (layer, expert) of model on n rows of hidden states
// with this node's own copy, outside the server and honestly whatever its
// faulty mode (to re-run a task a verdict is about). It fails unless the
// node serves that expert.
func (s *Service) Compute(model cid.Cid, layer, expert int, x []float32, n int) ([]float32, error) {
	out := make([]float32, len(x))
	if err := s.compute(model, Key{layer, expert}, x, n, out, false); err != nil {
		return nil, err
	}
	return out, nil
}

// ComputeInto runs the expert as the server does (a node in a faulty mode
// wrong, as its expert calls are), writing the n rows to out: a span's
// layers compute their experts this way, with no copy.
func (s *Service) ComputeInto(model cid.Cid, layer, expert int, x []float32, n int, out []float32) error {
	return s.compute(model, Key{layer, expert}, x, n, out, true)
}

// compute runs expert k on n rows into out: the loaded copy, or (served)
// the server's.
func (s *Service) compute(model cid.Cid, k Key, x []float32, n int, out []float32, served bool) error {
	s.mu.Lock()
	e := s.loaded[k]
	var c moe.Batcher = e
	if served {
		c = s.served[k]
	}
	s.mu.Unlock()
	if e == nil || c == nil || !s.cfg.Model.Equals(model) {
		return fmt.Errorf("expert %s of %s is not served here", k, model)
	}
	if n < 1 || len(x) != n*e.Embd() || len(out) != len(x) {
		return fmt.Errorf("expert %s: %d floats in and %d out for %d tokens of %d", k, len(x), len(out), n, e.Embd())
	}
	if err := moe.ComputeBatched(c, x, n, out); err != nil {
		return fmt.Errorf("expert %s: %w", k, err)
	}
	return nil
}

// WeightTypes are the tensor types of expert (layer, expert) of model c as
// its manifest lists them; false when this node has not the manifest.
func (s *Service) WeightTypes(c cid.Cid, layer, expert int) ([]model.DType, bool) {
	s.mu.Lock()
	m := s.manifest
	s.mu.Unlock()
	if m == nil || !s.cfg.Model.Equals(c) {
		return nil, false
	}
	er := m.ExpertRef(layer, expert)
	if er == nil {
		return nil, false
	}
	var out []model.DType
	for _, t := range er.GetShard().GetTensors() {
		if strings.HasSuffix(t.GetName(), ".weight") { // not gpt-oss's f32 biases
			out = append(out, model.DType(t.GetDtype()))
		}
	}
	return out, true
}

// Swaps counts the experts automatic hosting dropped for a worse-provided
// one (rebalance).
func (s *Service) Swaps() int64 { return s.swaps.Load() }

// Served counts the expert calls this node has answered.
func (s *Service) Served() int64 { return s.server.Served() }

// SpanLayers is the span whose experts this node hosts, once chosen (a
// fixed span at once; an automatic one when the manifest is in).
func (s *Service) SpanLayers() (first, end int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.span[0], s.span[1], s.span[1] > s.span[0]
}

// SetPaused stops or resumes taking expert requests (Server.SetPaused).
func (s *Service) SetPaused(p bool) { s.server.SetPaused(p) }

// Loaded returns the experts that are served.
// Has says whether the node has expert k loaded.
func (s *Service) Has(k Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loaded[k] != nil
}

// Loaded lists the experts the node has loaded.
func (s *Service) Loaded() []Key {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Key
	for k := range s.loaded {
		out = append(out, k)
	}
	return out
}

// warmBatches are the batch sizes a node on a GPU computes its first
// expert at before it measures its speed: ggml's Vulkan backend has a
// matrix-vector pipeline for each column count up to 8, and matrix-matrix
// ones past it.
var warmBatches = []int{1, 2, 3, 4, 5, 6, 7, 8, 16}

// warm computes e once at each of warmBatches (within its largest batch),
// so that the device compiles its pipelines for them while the node loads,
// not within its first calls' timeouts nor in its measured speed: ggml's
// Vulkan backend compiles each pipeline on first use, and Mesa's software
// device (lavapipe) with a cold shader cache took over 30 s for those of a
// first prompt's rows, past the gating node's call timeout. The compiled
// pipelines serve every expert of the same types on the device.
func warm(e moe.Expert) {
	for _, n := range warmBatches {
		if n > e.MaxBatch() {
			break
		}
		x := make([]float32, n*e.Embd())
		if err := e.Compute(x, n, make([]float32, len(x))); err != nil {
			return
		}
	}
}

// onGPU says whether the backend computes on a device other than the CPU
// (the devices as last read).
func (s *Service) onGPU() bool {
	return slices.ContainsFunc(s.cachedDevices(), func(d *neuropb.Device) bool {
		return d.GetSelected() && d.GetType() != "cpu"
	})
}

// measure times one token through e: the node's speed, for heartbeats.
func measure(e moe.Expert) float32 {
	x := make([]float32, e.Embd())
	out := make([]float32, e.Embd())
	start := time.Now()
	const runs = 3
	for range runs {
		if err := e.Compute(x, 1, out); err != nil {
			return 0
		}
	}
	return float32(runs / time.Since(start).Seconds())
}

// HeartbeatExtra adds the hosted experts and capacity to a heartbeat.
func (s *Service) HeartbeatExtra(hb *neuropb.Heartbeat) {
	devices := s.cachedDevices()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.Model.Defined() && len(s.hosted) > 0 {
		// Served experts, and those chosen but still being fetched or
		// loaded: other nodes count both when they choose, gating nodes
		// call only the first.
		hm := &neuropb.HostedModel{Model: s.cfg.Model.Bytes()}
		for k := range s.hosted {
			if s.loaded[k] != nil {
				hm.Experts = append(hm.Experts, uint32(k.Layer)<<16|uint32(k.Expert))
			} else {
				hm.Loading = append(hm.Loading, uint32(k.Layer)<<16|uint32(k.Expert))
			}
		}
		hb.Hosted = []*neuropb.HostedModel{hm}
	}
	queue := 0
	s.server.mu.RLock()
	for _, b := range s.server.batchers {
		queue += len(b.queue)
	}
	s.server.mu.RUnlock()
	hw := proto.Clone(hardware()).(*neuropb.Hardware)
	for _, d := range devices {
		if d.GetSelected() {
			d.ExpertTokensPerSecond = s.speed
		}
	}
	hw.Devices = devices
	hb.Capacity = &neuropb.Capacity{
		FreeMemoryBytes: uint64(max(0, s.cfg.MemoryBudget-s.used)),
		QueueDepth:      uint32(queue),
		TokensPerSecond: s.speed,
		Hardware:        hw,
	}
}

// deviceRefresh is how old the device list a heartbeat carries may grow
// before a new one is read.
const deviceRefresh = 10 * time.Second

// deviceCache is a device list and when it was read.
type deviceCache struct {
	mu      sync.Mutex
	list    []*neuropb.Device
	at      time.Time
	reading bool
}

// cachedDevices returns copies of the devices as last read, and starts a
// new read in the background when that was deviceRefresh ago. It never
// waits: reading the devices' free memory takes the compute backend's
// lock (ggml: one for the process), which a computation holds for as long
// as it runs, and the heartbeat waited behind it — in a simulated network
// of 300 nodes in one process, 170 heartbeats waited minutes behind the
// experts' computations and the routing topic fell silent.
func (s *Service) cachedDevices() []*neuropb.Device {
	s.devs.mu.Lock()
	defer s.devs.mu.Unlock()
	if !s.devs.reading && time.Since(s.devs.at) >= deviceRefresh {
		s.devs.reading = true
		go func() {
			list := s.devices()
			s.devs.mu.Lock()
			s.devs.list, s.devs.at, s.devs.reading = list, time.Now(), false
			s.devs.mu.Unlock()
		}()
	}
	out := make([]*neuropb.Device, len(s.devs.list))
	for i, d := range s.devs.list {
		out[i] = proto.Clone(d).(*neuropb.Device)
	}
	return out
}

// devices lists the compute backend's devices (when it can say).
func (s *Service) devices() []*neuropb.Device {
	dl, ok := s.cfg.Compute.(moe.DeviceLister)
	if !ok {
		return nil
	}
	var out []*neuropb.Device
	for _, d := range dl.Devices() {
		if len(out) == neuropb.MaxDevices {
			break
		}
		free := min(d.MemoryFree, d.MemoryTotal)
		out = append(out, &neuropb.Device{Backend: d.Backend, Name: d.Name, Description: d.Description, Type: d.Type,
			MemoryTotalBytes: d.MemoryTotal, MemoryFreeBytes: free, Selected: d.Selected})
	}
	return out
}

func cloneSet(m map[Key]bool) map[Key]bool {
	out := make(map[Key]bool, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

var (
	hwOnce sync.Once
	hw     *neuropb.Hardware
)

// hardware describes this machine (Linux /proc; fields stay empty
// elsewhere).
func hardware() *neuropb.Hardware {
	hwOnce.Do(func() {
		hw = &neuropb.Hardware{Cores: uint32(runtime.NumCPU())}
		if f, err := os.Open("/proc/cpuinfo"); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
					hw.Cpu = strings.TrimSpace(v)
					if len(hw.Cpu) > 100 {
						hw.Cpu = hw.Cpu[:100]
					}
					break
				}
			}
			f.Close()
		}
		hw.MemoryBytes, _ = meminfo.Bytes("MemTotal")
	})
	return hw
}
