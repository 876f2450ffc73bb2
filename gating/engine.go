package gating

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/metrics"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/span"
)

// EngineConfig tunes a gating node.
type EngineConfig struct {
	// Threads for the gating compute (0: every core).
	Threads int
	// NoSpans keeps every forward pass here, its experts called layer by
	// layer, even where span nodes that heartbeats announce cover every
	// layer (by default a generation then runs through the chain of
	// fewest spans: one round trip per span per forward pass).
	NoSpans bool
	// LoadLayers loads a served model's layers (its gating shard) at
	// start. Without it, a model split with layer shards loads its head
	// shard alone, and its layers when a generation first computes them
	// here (Layered): never, while spans cover the model. With NoSpans,
	// or a model without layer shards, the layers load at start.
	LoadLayers bool
	// ProvenFirst ranks the providers that have answered before those
	// that have not, calls and groups alike (with a Book, whose
	// validator proves new providers by its probes; see ProvenFirst).
	ProvenFirst bool
	// MaxQueue bounds the requests that wait for a session while all are
	// busy (one more is answered busy, so that its client tries another
	// gating node), and QueueTimeout a request's wait.
	MaxQueue     int
	QueueTimeout time.Duration
	// MaxSessions bounds the generations that run at once; one more
	// waits in the queue. 0 sizes them from memory: as many sessions as
	// the KV caches of the served model (Context tokens each) fit in half
	// the memory free where they live (moe.SessionSizer), from 1 to
	// MaxAutoSessions (4 where the gating compute cannot tell).
	MaxSessions int
	// Context is the KV cache of a session in tokens (0: the model's
	// context, at most 4096).
	Context int
	// DefaultMaxTokens is the limit of a request that sets none.
	DefaultMaxTokens int
	// DType of hidden states on the wire: F32 keeps the results identical
	// to llama.cpp's; F16 halves the bytes.
	DType neuropb.WireDType
	// CallTimeout bounds one expert call.
	CallTimeout time.Duration
	// Metrics, if set, records each expert call.
	Metrics *metrics.Metrics
	// OnReceipts, if set, is given the experts' signed usage receipts of a
	// generation paid from an escrow, to settle on the ledger, when the
	// generation ends (also when it fails). It must not block: it hands
	// them to a service of its own (ledger.Settler).
	OnReceipts func(escrow uint64, receipts []*neuropb.UsageReceipt)
	// Payments, if set, decides how each request over the infer protocol
	// is paid (without it, a request's escrow is used as it comes).
	Payments Payments
	// OnWrong, if set, is told of each expert result the validator found
	// wrong (with a Book only). It must not block.
	OnWrong func(Verdict)
	// Book, if set, is the node's reputation record: it ranks providers,
	// keeps excluded ones out, and a sample of every peer's results is
	// re-executed elsewhere to keep it honest (without it, all peers are
	// trusted alike and nothing is checked).
	Book *reputation.Book
	// Compute loads the gating compute, the tokenizer and, with a Book,
	// the experts the node re-executes to judge results (the ggml backend
	// in neurod). Required.
	Compute Compute
	// Speculate drafts tokens that one forward pass verifies, so that a
	// MoE layer costs one round trip for several tokens: SpeculateOff
	// (the default), SpeculateNgram (prompt lookup: what followed the
	// last few tokens where they appeared before, in the prompt or the
	// text so far) or SpeculateDraft (the greedy continuation of the
	// draft model Draft, a GGUF file of the served model's vocabulary or
	// the CID of a model on the network, whose shards are fetched and
	// joined into one file in the store once; computed whole on this
	// node; Compute must be a moe.DraftLoader).
	// SpeculateMax bounds a draft (default 8); its length adapts to how
	// much of the drafts the model keeps.
	Speculate    string
	Draft        string
	SpeculateMax int
	// BatchWait is how long a generation's MoE call waits for those of
	// the other generations computing toward the same layer, to go out
	// with them as one round of expert calls (continuous batching; see
	// Batcher). 0: the default (10 ms); negative: every generation's calls
	// go alone.
	BatchWait time.Duration
	// Lockstep has the gating compute the generations' decode steps
	// together, within BatchWait, while the compute is busy at least
	// LockstepBusy of the time (0: always; moe.Lockstepper).
	Lockstep     bool
	LockstepBusy float64
	// WaitPoll is how long at most the node keeps a core awake while a
	// round of expert calls is out (Compute's moe.WaitPoller, if it is
	// one): the answer then wakes a thread on a running core. 0: the
	// default (DefaultWaitPoll); negative: never. Unless PollNearby, not
	// while an expert node this node calls is on this machine: the poll
	// would take a core its compute needs.
	WaitPoll   time.Duration
	PollNearby bool
	// KeepHeap leaves the heap that loading the gating shard freed to the
	// runtime (expert.ServiceConfig.KeepHeap): other nodes run in this
	// process.
	KeepHeap bool
}

// DefaultWaitPoll is EngineConfig.WaitPoll's default: a layer's experts
// usually answer within it; a longer wait sleeps as before.
const DefaultWaitPoll = 5 * time.Millisecond

// Speculative decoding's drafters.
const (
	SpeculateOff   = "off"
	SpeculateNgram = "ngram"
	SpeculateDraft = "draft"
)

// Payments is a gating node's payment policy for the infer protocol.
type Payments interface {
	// Bill is how the request of peer from is paid: a Bill (nil: it runs
	// unpaid), or an error that refuses it (an *Error, else answered as
	// CODE_PAYMENT_REQUIRED).
	Bill(ctx context.Context, from peer.ID, req *neuropb.InferRequest) (Bill, error)
	// Quote is what c would cost peer from.
	Quote(ctx context.Context, from peer.ID, c Charge) (*neuropb.InferQuote, error)
}

// Compute is what a gating node computes with.
type Compute interface {
	moe.GatingLoader
	moe.ExpertLoader
}

// DefaultEngineConfig returns the defaults.
func DefaultEngineConfig() EngineConfig {
	return EngineConfig{MaxQueue: 64, QueueTimeout: 2 * time.Minute, DefaultMaxTokens: 256, DType: neuropb.WireDType_WIRE_DTYPE_F32,
		CallTimeout: 30 * time.Second, BatchWait: 10 * time.Millisecond}
}

// Network is what a gating node uses of the p2p stack (*p2p.Host).
type Network interface {
	LibP2P() host.Host
	ID() peer.ID
	// Peers is the table of peers heard on the routing topic.
	Peers() *p2p.PeerTable
	Provide(ctx context.Context, c cid.Cid) error
	FindProviders(ctx context.Context, c cid.Cid, n int, timeout time.Duration) ([]peer.AddrInfo, error)
	// NetworkSize is how many nodes the network has (p2p.Provision).
	NetworkSize() int
}

var _ Network = (*p2p.Host)(nil)

// Fetcher gets a blob (manifest or shard) into the store the engine reads.
type Fetcher interface {
	Fetch(ctx context.Context, c cid.Cid) error
	Store() *expert.Store
}

// Engine is a gating node: it loads the gating part of the models it
// serves, runs generations for clients (the infer protocol, the HTTP API)
// and sends each MoE layer to the experts on other nodes.
type Engine struct {
	cfg     EngineConfig
	log     *slog.Logger
	h       Network
	fetcher Fetcher
	client  *expert.Client
	sel     *Selector
	// spanSel orders each span's providers by the time their span
	// requests took and their reputation (apart from sel: a span request
	// is not an expert call).
	spanSel *Selector
	val     *Validator
	local   *localJudge
	queue   *sessionQueue

	mu           sync.Mutex
	models       map[cid.Cid]*served
	autoSessions int // the sessions sized from memory (0: not yet)

	active, generated atomic.Int64

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	once     sync.Once
	closeErr error
}

// served is one model a gating node serves.
type served struct {
	cid      cid.Cid
	loaded   chan struct{} // closed when sm is set or err is
	sm       *Model
	err      error
	remote   *RemoteExperts
	batch    *Batcher
	dht      *dhtProviders
	hp       moe.Hparams
	manifest *neuropb.Manifest
}

// NewEngine builds a gating node on h, fetching blobs with f. It starts
// nothing.
func NewEngine(h Network, f Fetcher, cfg EngineConfig, log *slog.Logger) (*Engine, error) {
	if log == nil {
		log = slog.Default()
	}
	d := DefaultEngineConfig()
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = d.MaxQueue
	}
	if cfg.QueueTimeout <= 0 {
		cfg.QueueTimeout = d.QueueTimeout
	}
	if cfg.MaxSessions < 0 {
		return nil, fmt.Errorf("gating: %d sessions", cfg.MaxSessions)
	}
	if cfg.DefaultMaxTokens <= 0 {
		cfg.DefaultMaxTokens = d.DefaultMaxTokens
	}
	switch cfg.Speculate {
	case "":
		cfg.Speculate = SpeculateOff
	case SpeculateOff, SpeculateNgram:
	case SpeculateDraft:
		if cfg.Draft == "" {
			return nil, errors.New("speculative decoding with a draft model: no draft model given")
		}
		if _, ok := cfg.Compute.(moe.DraftLoader); !ok {
			return nil, errors.New("speculative decoding with a draft model: the compute backend runs no draft model")
		}
	default:
		return nil, fmt.Errorf("speculative decoding %q: want %s, %s or %s", cfg.Speculate, SpeculateOff, SpeculateNgram, SpeculateDraft)
	}
	if cfg.SpeculateMax < 0 {
		return nil, fmt.Errorf("speculative decoding: a draft of at most %d tokens", cfg.SpeculateMax)
	}
	if cfg.DType == neuropb.WireDType_WIRE_DTYPE_UNSPECIFIED {
		cfg.DType = d.DType
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = d.CallTimeout
	}
	if cfg.BatchWait == 0 {
		cfg.BatchWait = d.BatchWait
	}
	if cfg.WaitPoll == 0 {
		cfg.WaitPoll = DefaultWaitPoll
	}
	if cfg.Context < 0 {
		return nil, fmt.Errorf("gating: context %d tokens", cfg.Context)
	}
	if cfg.Compute == nil {
		return nil, fmt.Errorf("gating: %w", moe.ErrNoBackend)
	}
	e := &Engine{cfg: cfg, log: log.With("component", "gating"), h: h, fetcher: f,
		client: expert.NewClient(h.LibP2P(), log), sel: NewSelector(nil), spanSel: NewSelector(nil),
		queue: newSessionQueue(max(cfg.MaxSessions, autoSessionsUnknown), cfg.MaxQueue), models: map[cid.Cid]*served{}}
	if cfg.Book != nil {
		// The validator probes new providers in the background, and the
		// selector observes those answers: with ProvenFirst, calls go to
		// proven providers.
		opts := []SelectorOption{WithSeniority(func(p peer.ID) (time.Time, bool) {
			now := time.Now()
			info, ok := h.Peers().Get(p, now)
			return info.FirstSeen, ok && !info.Overdue(now)
		})}
		if cfg.ProvenFirst {
			opts = append(opts, ProvenFirst())
		}
		e.sel, e.spanSel = NewSelector(cfg.Book, opts...), NewSelector(cfg.Book)
		e.local = newLocalJudge(f, cfg.Compute, cfg.Threads)
		e.val = NewValidator(h.ID(), cfg.Book, ValidatorConfig{OnWrong: cfg.OnWrong, Local: e.local.compute}, e.log)
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	return e, nil
}

// Validator is the engine's result checker (nil without a Book).
func (e *Engine) Validator() *Validator { return e.val }

// Start serves the infer protocol. The engine's goroutines run until
// Close; ctx is not kept.
func (e *Engine) Start(context.Context) error {
	e.h.LibP2P().SetStreamHandler(neuropb.InferProtocol, e.handleStream)
	return nil
}

// Close stops serving, waits for the running generations and the checks
// of their results to end, and frees the models. It is safe to call more
// than once.
func (e *Engine) Close() error {
	e.once.Do(func() {
		e.h.LibP2P().RemoveStreamHandler(neuropb.InferProtocol)
		e.cancel()
		e.wg.Wait()
		var errs []error
		if e.val != nil {
			errs = append(errs, e.val.Close(), e.local.Close())
		}
		errs = append(errs, e.client.Close())
		e.mu.Lock()
		defer e.mu.Unlock()
		for c, m := range e.models {
			if m.sm != nil {
				if err := m.sm.Close(); err != nil {
					errs = append(errs, fmt.Errorf("model %s: %w", c, err))
				}
			}
		}
		e.closeErr = errors.Join(errs...)
	})
	return e.closeErr
}

// Serve starts serving model c in the background: it fetches the manifest
// and the gating shard from the network (or finds them in the store),
// loads them, and provides the model's gating key in the DHT so that
// clients find this node. Ready reports when it is done.
func (e *Engine) Serve(c cid.Cid) {
	e.mu.Lock()
	if _, ok := e.models[c]; ok {
		e.mu.Unlock()
		return
	}
	m := &served{cid: c, loaded: make(chan struct{})}
	e.models[c] = m
	e.mu.Unlock()
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		err := e.load(e.ctx, m)
		e.mu.Lock()
		m.err = err
		e.mu.Unlock()
		close(m.loaded)
		if err != nil {
			if e.ctx.Err() == nil {
				e.log.Error("cannot serve model", "model", c, "err", err)
			}
			return
		}
		e.log.Info("serving model", "model", c, "layers", m.hp.Layers, "experts", m.hp.Experts)
		e.announce(e.ctx, m)
	}()
}

// loadLayers fetches a served model's gating shard and loads it whole (a
// Layered model's layers, the first time a generation computes them
// here), and sizes the sessions from it.
func (e *Engine) loadLayers(mc, gc cid.Cid) (moe.Gating, error) {
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Minute)
	defer cancel()
	start := time.Now()
	if err := e.fetcher.Fetch(ctx, gc); err != nil {
		return nil, fmt.Errorf("gating shard: %w", err)
	}
	g, err := LoadGating(e.cfg.Compute, e.fetcher.Store(), mc, e.cfg.Threads)
	if err != nil {
		return nil, err
	}
	e.lockstep(g)
	if e.cfg.MaxSessions == 0 {
		e.sizeSessions(g, g.Hparams())
	}
	// The gating shard was read whole into the heap and copied into the
	// backend: that memory goes back to the system now rather than a few
	// pages at a time during the generations (expert.Service.releaseHeap).
	if !e.cfg.KeepHeap {
		debug.FreeOSMemory()
	}
	e.log.Info("loaded the model's layers", "model", mc, "took", time.Since(start))
	return g, nil
}

// lockstep has g compute its sessions' decode steps together where it
// can (moe.Lockstepper), waiting as the MoE calls' batching does.
func (e *Engine) lockstep(g moe.Gating) {
	if !e.cfg.Lockstep {
		return
	}
	if ls, ok := g.(moe.Lockstepper); ok && ls.SetLockstep(e.cfg.BatchWait, e.cfg.LockstepBusy) {
		e.log.Debug("gating compute in lockstep", "wait", e.cfg.BatchWait, "busy", e.cfg.LockstepBusy)
	}
}

func (e *Engine) load(ctx context.Context, m *served) error {
	if err := e.fetcher.Fetch(ctx, m.cid); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	man, err := e.fetcher.Store().Manifest(m.cid)
	if err != nil {
		return err
	}
	gc, err := cid.Cast(man.GetGating().GetCid())
	if err != nil {
		return fmt.Errorf("manifest: gating cid: %w", err)
	}
	_, parts := e.cfg.Compute.(moe.PartLoader)
	var sm *Model
	if hc, herr := cid.Cast(man.GetHead().GetCid()); !e.cfg.LoadLayers && !e.cfg.NoSpans && parts && herr == nil {
		// The head now; the layers when a generation first computes them
		// here.
		if err := e.fetcher.Fetch(ctx, hc); err != nil {
			return fmt.Errorf("head shard: %w", err)
		}
		sm, err = LoadHead(e.cfg.Compute, e.fetcher.Store(), m.cid, e.cfg.Threads, func() (moe.Gating, error) {
			return e.loadLayers(m.cid, gc)
		})
	} else {
		if err := e.fetcher.Fetch(ctx, gc); err != nil {
			return fmt.Errorf("gating shard: %w", err)
		}
		sm, err = Load(e.cfg.Compute, e.fetcher.Store(), m.cid, e.cfg.Threads)
	}
	if err != nil {
		return err
	}
	e.lockstep(sm.Gating)
	hp := sm.Gating.Hparams()
	if e.cfg.MaxSessions == 0 {
		// A Layered gating sizes them from head sessions (no KV cache)
		// until a generation loads its layers (loadLayers sizes them again).
		e.sizeSessions(sm.Gating, hp)
	}
	if e.cfg.Speculate == SpeculateDraft {
		path, err := e.draftFile(ctx)
		if err != nil {
			return errors.Join(err, sm.Close())
		}
		if sm.Draft, err = e.cfg.Compute.(moe.DraftLoader).LoadDraft(path, e.cfg.Threads); err != nil {
			return errors.Join(err, sm.Close())
		}
		if v := sm.Draft.Vocab(); v != hp.Vocab {
			return errors.Join(fmt.Errorf("draft model %s: a vocabulary of %d tokens, the model's has %d", e.cfg.Draft, v, hp.Vocab), sm.Close())
		}
	}
	dp := &dhtProviders{h: e.h, model: m.cid, found: map[expert.Key][]peer.ID{}}
	hb := HeartbeatProviders(e.h, m.cid)
	e.mu.Lock()
	defer e.mu.Unlock()
	m.sm, m.hp, m.manifest, m.dht = sm, hp, man, dp
	m.remote = &RemoteExperts{Client: e.client, Model: m.cid, Embd: hp.Embd, Used: hp.ExpertsUsed,
		DType: e.cfg.DType, CallTimeout: e.cfg.CallTimeout, Selector: e.sel, Validator: e.val, Metrics: e.cfg.Metrics,
		WeightTypes: ExpertWeightTypes(man), PollNearby: e.cfg.PollNearby,
		Advertised: func(p peer.ID) time.Duration {
			info, ok := e.h.Peers().Get(p, time.Now())
			if tps := info.Capacity.GetTokensPerSecond(); ok && tps > 0 {
				return time.Duration(float64(time.Second) / float64(tps))
			}
			return 0
		},
		Providers: func(k expert.Key) []peer.ID {
			ps := hb(k)
			now := time.Now()
			for _, p := range dp.get(k) {
				// A DHT provider whose heartbeat says it paused is left out too.
				if info, ok := e.h.Peers().Get(p, now); !slices.Contains(ps, p) && (!ok || !info.Paused) {
					ps = append(ps, p)
				}
			}
			return ps
		}}
	if wp, ok := e.cfg.Compute.(moe.WaitPoller); ok && e.cfg.WaitPoll > 0 {
		m.remote.WaitPoll, m.remote.WaitPollFor = wp, e.cfg.WaitPoll
	}
	m.batch = NewBatcher(m.remote, e.cfg.BatchWait)
	return nil
}

// announce provides the model's gating key now, twice a day and, after
// its growth delay, whenever the network has grown four times since
// (p2p.Provisions), and keeps the DHT's
// providers fresh (of every expert every dhtFullRefresh, in between of
// those fewer than two heartbeats announce), until ctx ends.
func (e *Engine) announce(ctx context.Context, m *served) {
	key := neuropb.GatingKey(m.cid)
	provided := p2p.NewProvisions(e.h.ID())
	hb := HeartbeatProviders(e.h, m.cid)
	var full time.Time
	for {
		if size := e.h.NetworkSize(); provided.Due(key, time.Now(), size, 12*time.Hour) {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			if err := e.h.Provide(pctx, key); err == nil {
				provided.Set(key, p2p.Provision{At: time.Now(), Network: size})
			} else if ctx.Err() == nil {
				e.log.Debug("provide gating key", "model", m.cid, "err", err)
			}
			cancel()
		}
		// Every expert now and then; in between only those that fewer
		// than two heartbeats announce (a model of thousands of experts
		// would otherwise cost thousands of lookups every round).
		all := time.Since(full) > dhtFullRefresh
		m.dht.refresh(ctx, m.hp, func(k expert.Key) bool { return all || len(hb(k)) < 2 })
		// The spans heard of: more providers of each (those fewer than
		// two heartbeats announce, and now and then every one).
		if !e.cfg.NoSpans {
			var ranges [][2]int
			for r, ps := range e.h.Peers().Spans(m.cid.Bytes(), time.Now()) {
				if all || len(ps) < 2 {
					ranges = append(ranges, r)
				}
			}
			m.dht.refreshSpans(ctx, ranges)
		}
		if all {
			full = time.Now()
		}
		e.warm(ctx, m)
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}

// maxWarm bounds the expert peers warm opens sessions to per round.
const maxWarm = 64

// warm opens a session to the expert peers of a loaded model ahead of the
// first prompt: a home behind NAT is then reached directly by the time a
// user asks, since hole punching (and its retries) has had its time.
func (e *Engine) warm(ctx context.Context, m *served) {
	e.mu.Lock()
	remote, hp := m.remote, m.hp
	e.mu.Unlock()
	if remote == nil {
		return
	}
	seen := map[peer.ID]bool{}
	for l := hp.DenseLead; l < hp.Layers; l++ {
		for x := range hp.Experts {
			for _, p := range remote.Providers(expert.Key{Layer: l, Expert: x}) {
				if len(seen) < maxWarm {
					seen[p] = true
				}
			}
		}
	}
	var wg sync.WaitGroup
	for p := range seen {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			defer cancel()
			if err := e.client.Warm(wctx, p); err != nil && ctx.Err() == nil {
				e.log.Debug("warm expert session", "peer", p, "err", err)
			}
		}()
	}
	wg.Wait()
}

// dhtProviders keeps, per expert, the peers that provide its expert key in
// the DHT: the providers a gating node knows of besides the heartbeats it
// has heard (a peer it has no gossip mesh path to yet, a heartbeat lost).
type dhtProviders struct {
	h     Network
	model cid.Cid
	mu    sync.Mutex
	found map[expert.Key][]peer.ID
	// spans are the providers of the spans heard of, found under their
	// span keys.
	spans map[[2]int][]peer.ID
}

// spanProviders returns the spans' providers found in the DHT.
func (d *dhtProviders) spanProviders() map[[2]int][]peer.ID {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[[2]int][]peer.ID, len(d.spans))
	for r, ps := range d.spans {
		out[r] = slices.Clone(ps)
	}
	return out
}

// refreshSpans looks up the providers of the spans ranges lists (those
// heartbeats tell of).
func (d *dhtProviders) refreshSpans(ctx context.Context, ranges [][2]int) {
	keys := make([]cid.Cid, len(ranges))
	for i, r := range ranges {
		keys[i] = neuropb.SpanKey(d.model, r[0], r[1])
	}
	d.lookup(ctx, keys, func(i int, ps []peer.ID) {
		if d.spans == nil {
			d.spans = map[[2]int][]peer.ID{}
		}
		d.spans[ranges[i]] = ps
	})
}

// lookup finds the providers of keys in the DHT, four at a time, and
// hands each key's (this node left out; their addresses kept) to found,
// under d.mu. A lookup that fails changes nothing.
func (d *dhtProviders) lookup(ctx context.Context, keys []cid.Cid, found func(i int, ps []peer.ID)) {
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	defer wg.Wait()
	for i, key := range keys {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			infos, err := d.h.FindProviders(ctx, key, 20, 10*time.Second)
			if err != nil {
				return
			}
			var ps []peer.ID
			for _, ai := range infos {
				if ai.ID == d.h.ID() {
					continue
				}
				d.h.LibP2P().Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.AddressTTL)
				ps = append(ps, ai.ID)
			}
			d.mu.Lock()
			found(i, ps)
			d.mu.Unlock()
		}()
	}
}

func (d *dhtProviders) get(k expert.Key) []peer.ID {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.found[k]
}

// dhtFullRefresh is how often a gating node looks up every expert's
// providers in the DHT.
const dhtFullRefresh = 10 * time.Minute

// refresh looks up the experts need asks for, four at a time.
func (d *dhtProviders) refresh(ctx context.Context, hp moe.Hparams, need func(expert.Key) bool) {
	var ks []expert.Key
	var keys []cid.Cid
	for l := hp.DenseLead; l < hp.Layers; l++ {
		for x := range hp.Experts {
			if k := (expert.Key{Layer: l, Expert: x}); need(k) {
				ks, keys = append(ks, k), append(keys, neuropb.ExpertKey(d.model, l, x))
			}
		}
	}
	d.lookup(ctx, keys, func(i int, ps []peer.ID) { d.found[ks[i]] = ps })
}

// ModelInfo describes a served model.
type ModelInfo struct {
	CID     cid.Cid
	Ready   bool
	Err     error
	Context int
	// LayersLoaded says whether the layers' weights (the gating shard)
	// are loaded: a head whose generations all went through spans holds
	// the head shard's alone (EngineConfig.LoadLayers).
	LayersLoaded bool
	// MinProviders is the fewest live providers any expert has.
	MinProviders int
	// Missing lists experts without a live provider.
	Missing []expert.Key
}

// Models lists the models this node serves, with whether each is loaded
// and how well its experts are covered.
func (e *Engine) Models() []ModelInfo {
	e.mu.Lock()
	ms := make([]*served, 0, len(e.models))
	for _, m := range e.models {
		ms = append(ms, m)
	}
	e.mu.Unlock()
	slices.SortFunc(ms, func(a, b *served) int { return strings.Compare(a.cid.String(), b.cid.String()) })
	var out []ModelInfo
	for _, m := range ms {
		e.mu.Lock()
		info := ModelInfo{CID: m.cid, Ready: m.sm != nil, Err: m.err}
		sm, remote, hp := m.sm, m.remote, m.hp
		e.mu.Unlock()
		if sm != nil {
			l, lazy := sm.Gating.(*Layered)
			info.LayersLoaded = !lazy || l.LayersLoaded()
		}
		if info.Ready {
			info.Context = e.nCtx(hp)
			info.MinProviders = -1
			for l := hp.DenseLead; l < hp.Layers; l++ {
				for x := range hp.Experts {
					k := expert.Key{Layer: l, Expert: x}
					n := len(remote.Providers(k))
					if n == 0 {
						info.Missing = append(info.Missing, k)
					}
					if info.MinProviders < 0 || n < info.MinProviders {
						info.MinProviders = n
					}
				}
			}
		}
		out = append(out, info)
	}
	return out
}

// Links says how this gating node reaches each expert peer it called.
func (e *Engine) Links() []expert.Link { return e.client.Links() }

// Active is the number of generations running; Generated the tokens
// generated since the start.
func (e *Engine) Active() int64 { return e.active.Load() }

// Queued is how many requests wait for a session.
func (e *Engine) Queued() int      { return e.queue.Len() }
func (e *Engine) Generated() int64 { return e.generated.Load() }

// Hedges and Redispatches count expert calls sent to a second provider:
// because the first was slow, or because it failed.
func (e *Engine) Hedges() (n int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range e.models {
		if m.remote != nil {
			n += m.remote.Hedges()
		}
	}
	return n
}

// Lockstep counts the graphs the models' gating computed for the
// generations' decode steps in lockstep and the generations' rows they
// held: rows ÷ graphs is the generations a graph served on average.
func (e *Engine) Lockstep() (graphs, rows int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range e.models {
		select {
		case <-m.loaded:
		default:
			continue
		}
		if c, ok := gatingOf(m.sm).(lockstepCounter); ok {
			g, r := c.Lockstep()
			graphs, rows = graphs+g, rows+r
		}
	}
	return graphs, rows
}

// lockstepCounter is a gating that counts its lockstep's graphs and rows.
type lockstepCounter interface{ Lockstep() (graphs, rows int64) }

// gatingOf is sm's gating (nil: none).
func gatingOf(sm *Model) moe.Gating {
	if sm == nil {
		return nil
	}
	return sm.Gating
}

func (e *Engine) Redispatches() (n int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range e.models {
		if m.remote != nil {
			n += m.remote.Redispatches()
		}
	}
	return n
}

func (e *Engine) nCtx(hp moe.Hparams) int {
	if e.cfg.Context > 0 {
		return min(e.cfg.Context, hp.CtxLen)
	}
	return min(hp.CtxLen, 4096)
}

// draftFile is the draft model's GGUF file: EngineConfig.Draft when it is
// a file; for a model CID, its shards fetched and joined into one file in
// the store (kept for the next start).
func (e *Engine) draftFile(ctx context.Context) (string, error) {
	if _, err := os.Stat(e.cfg.Draft); err == nil {
		return e.cfg.Draft, nil
	}
	c, err := cid.Decode(e.cfg.Draft)
	if err != nil {
		return "", fmt.Errorf("draft model %q: neither a file nor a model CID", e.cfg.Draft)
	}
	st := e.fetcher.Store()
	out := filepath.Join(st.Dir(), "draft-"+c.String()+".gguf")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := e.fetcher.Fetch(ctx, c); err != nil {
		return "", fmt.Errorf("draft model %s: manifest: %w", c, err)
	}
	man, err := st.Manifest(c)
	if err != nil {
		return "", fmt.Errorf("draft model %s: %w", c, err)
	}
	refs := []*neuropb.ShardRef{man.GetGating()}
	for _, ex := range man.AllExperts() {
		refs = append(refs, ex.GetShard())
	}
	for _, ref := range refs {
		sc, err := cid.Cast(ref.GetCid())
		if err != nil {
			return "", fmt.Errorf("draft model %s: %w", c, err)
		}
		if err := e.fetcher.Fetch(ctx, sc); err != nil {
			return "", fmt.Errorf("draft model %s: shard %s: %w", c, sc, err)
		}
	}
	if err := model.JoinShards(man, st.OpenShard, out); err != nil {
		return "", fmt.Errorf("draft model %s: %w", c, err)
	}
	e.log.Info("draft model joined from its shards", "model", c, "file", out)
	return out, nil
}

// MaxAutoSessions bounds the sessions sized from memory; autoSessionsUnknown
// is the count where the gating compute cannot tell its sessions' memory.
const (
	MaxAutoSessions     = 64
	autoSessionsUnknown = 4
)

// sizeSessions sets the sessions from the memory a served model's KV
// caches take (EngineConfig.MaxSessions 0); with several models, the most
// demanding decides.
func (e *Engine) sizeSessions(g moe.Gating, hp moe.Hparams) {
	sz, ok := g.(moe.SessionSizer)
	if !ok {
		return
	}
	per, budget := sz.SessionBytes(e.nCtx(hp)), sz.SessionMemory()
	if per <= 0 || budget <= 0 {
		return
	}
	n := int(min(max(budget/per, 1), MaxAutoSessions))
	e.mu.Lock()
	if e.autoSessions > 0 {
		n = min(n, e.autoSessions)
	}
	e.autoSessions = n
	e.mu.Unlock()
	e.queue.resize(n)
	e.log.Info("sessions sized from memory", "sessions", n, "kv_cache_bytes_each", per, "memory_for_sessions", budget)
}

// checkWait bounds how long a finished generation waits for its checks.
const checkWait = 5 * time.Second

// Error is a failed request, with the protocol's code.
type Error struct {
	Code neuropb.InferError_Code
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

func errorf(code neuropb.InferError_Code, format string, args ...any) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// Token is one generated token.
type Token struct {
	ID int32
	// Text is what the token adds to the text; see neuropb.InferToken.
	Text    string
	Elapsed time.Duration
}

// Result is a finished generation.
type Result struct {
	Reason       neuropb.FinishReason
	PromptTokens int
	Tokens       []int32
	Text         string
	// Rest is the end of Text that no token's delta carried.
	Rest    string
	Prefill time.Duration
	// Rewinds counts the times the generation went back past a result
	// found wrong.
	Rewinds int
	Stats   *neuropb.InferStats
	// Escrow paid for the generation (0: none); FLOPs is the expert work
	// its receipts carry and Cost what the bill charged for it (base
	// units; 0 without a Bill). Both are final once Generate returns.
	Escrow uint64
	FLOPs  uint64
	Cost   uint64
}

// Callbacks receive a generation as it goes. Either may be nil; an error
// from one stops the generation.
type Callbacks struct {
	Start func(promptTokens int, prefill time.Duration) error
	Token func(Token) error
	// Rewind says that the tokens after the first keep, and the text
	// after its first textBytes bytes, are withdrawn: a result they were
	// computed from was found wrong. Generation goes on from there.
	Rewind func(keep, textBytes int) error
	// Bill, if set, pays for the generation (it replaces the request's
	// escrow).
	Bill Bill
	// Queued, if set, is told the request's place in the queue for a
	// session (1: next) when it has to wait, and whenever it changes.
	Queued func(position int) error
}

// A Bill pays for one generation: the node's payment policy makes one for
// each request it lets run (an API key's account, an escrow the client
// opened, ...).
type Bill interface {
	// Open is called once the prompt is tokenized, before any expert
	// works: it returns the escrow that pays for the charge (0: none), or
	// an error that refuses the request (an *Error, or any error, which is
	// answered as CODE_PAYMENT_REQUIRED).
	Open(ctx context.Context, c Charge) (escrow uint64, err error)
	// Close is called once when a generation Open let run has ended (also
	// after a failure), after its receipts went to EngineConfig.OnReceipts,
	// with the expert work those receipts carry; it returns what the
	// generation cost in base units.
	Close(flops uint64) (cost uint64)
}

// Charge is what a request may cost, before it runs.
type Charge struct {
	Model        cid.Cid
	PromptTokens int
	MaxTokens    int
	// FLOPsPerToken is the expert work of one token (prompt or generated)
	// of the model, as the experts' receipts count it.
	FLOPsPerToken uint64
}

// Estimate tokenizes req and says what it may cost, without running it.
func (e *Engine) Estimate(req *neuropb.InferRequest) (Charge, error) {
	m, err := e.servedModel(req)
	if err != nil {
		return Charge{}, err
	}
	prompt, maxTokens, err := e.prepare(m, req)
	if err != nil {
		return Charge{}, err
	}
	return Charge{Model: m.cid, PromptTokens: len(prompt), MaxTokens: maxTokens, FLOPsPerToken: e.workPerToken(m)}, nil
}

// workPerToken is the paid work of one token of m at most: its experts',
// and with spans (which are paid for their layers too) its layers'.
func (e *Engine) workPerToken(m *served) uint64 {
	w := m.manifest.ExpertFLOPsPerToken()
	if !e.cfg.NoSpans {
		w += m.manifest.LayerFLOPsPerToken(0, int(m.manifest.GetParams().GetLayers()))
	}
	return w
}

// FLOPsPerToken is the paid work of one token of model mc at most (false
// when it is not served or not loaded): workPerToken.
func (e *Engine) FLOPsPerToken(mc cid.Cid) (uint64, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.models[mc]
	if m == nil || m.manifest == nil {
		return 0, false
	}
	return e.workPerToken(m), true
}

// ReasoningFormat is how model mc's answers mark their reasoning
// (ReasoningThink, ReasoningHarmony; ReasoningNone when it is not served).
func (e *Engine) ReasoningFormat(mc cid.Cid) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.models[mc]
	if m == nil || m.manifest == nil {
		return ReasoningNone
	}
	return ReasoningFormat(m.manifest.GetArchitecture())
}

// servedModel is the loaded model a valid request asks for.
func (e *Engine) servedModel(req *neuropb.InferRequest) (*served, error) {
	if err := req.Validate(); err != nil {
		return nil, errorf(neuropb.InferError_CODE_BAD_REQUEST, "%v", err)
	}
	mc, _ := cid.Cast(req.GetModel())
	e.mu.Lock()
	m := e.models[mc]
	e.mu.Unlock()
	if m == nil {
		return nil, errorf(neuropb.InferError_CODE_UNKNOWN_MODEL, "model %s is not served by this gating node", mc)
	}
	select {
	case <-m.loaded:
	default:
		return nil, errorf(neuropb.InferError_CODE_BUSY, "model %s is still loading on this gating node", mc)
	}
	if m.err != nil {
		return nil, errorf(neuropb.InferError_CODE_UNKNOWN_MODEL, "model %s failed to load on this gating node: %v", mc, m.err)
	}
	return m, nil
}

// prepare tokenizes a request's prompt (or chat) and settles how many
// tokens it may generate.
func (e *Engine) prepare(m *served, req *neuropb.InferRequest) ([]int32, int, error) {
	vocab := m.sm.Vocab
	text := req.GetPrompt()
	if msgs := req.GetMessages(); len(msgs) > 0 {
		cm := make([]moe.ChatMessage, len(msgs))
		for i, x := range msgs {
			cm[i] = moe.ChatMessage{Role: x.GetRole(), Content: x.GetContent()}
		}
		var err error
		if text, err = vocab.ApplyChatTemplate(cm); err != nil {
			return nil, 0, errorf(neuropb.InferError_CODE_BAD_REQUEST, "%v", err)
		}
	}
	prompt, err := vocab.Tokenize(text, true)
	if err != nil {
		return nil, 0, errorf(neuropb.InferError_CODE_BAD_REQUEST, "%v", err)
	}
	nCtx := e.nCtx(m.hp)
	maxTokens := int(req.GetSampling().GetMaxTokens())
	if maxTokens == 0 {
		maxTokens = min(e.cfg.DefaultMaxTokens, nCtx-len(prompt))
		if maxTokens < 1 {
			return nil, 0, errorf(neuropb.InferError_CODE_BAD_REQUEST,
				"prompt of %d tokens exceeds the context of %d tokens", len(prompt), nCtx)
		}
	}
	if len(prompt)+maxTokens > nCtx {
		return nil, 0, errorf(neuropb.InferError_CODE_BAD_REQUEST,
			"prompt of %d tokens + %d new tokens exceeds the context of %d tokens", len(prompt), maxTokens, nCtx)
	}
	return prompt, maxTokens, nil
}

// Generate runs one request on this node, paid as cb.Bill says (without
// one, from the escrow the request names, if any). Its errors are *Error.
func (e *Engine) Generate(ctx context.Context, req *neuropb.InferRequest, cb Callbacks) (_ *Result, err error) {
	m, err := e.servedModel(req)
	if err != nil {
		return nil, err
	}
	if err := e.queue.acquire(ctx, e.cfg.QueueTimeout, cb.Queued); err != nil {
		var qr *queueRefusal
		switch {
		case errors.As(err, &qr) && qr.full:
			return nil, errorf(neuropb.InferError_CODE_BUSY, "all %d sessions of this gating node are busy and %d requests wait for one (gating.max_queue)",
				e.queue.Sessions(), qr.waiting)
		case errors.As(err, &qr):
			return nil, errorf(neuropb.InferError_CODE_BUSY, "waited %s in this gating node's queue for a session (gating.queue_timeout)",
				qr.waited.Round(time.Millisecond))
		}
		return nil, err
	}
	defer e.queue.release()
	e.active.Add(1)
	defer e.active.Add(-1)

	vocab := m.sm.Vocab
	prompt, maxTokens, err := e.prepare(m, req)
	if err != nil {
		return nil, err
	}
	nCtx := e.nCtx(m.hp)
	s := req.GetSampling()
	escrow := req.GetEscrow()
	if cb.Bill != nil {
		if escrow, err = cb.Bill.Open(ctx, Charge{Model: m.cid, PromptTokens: len(prompt), MaxTokens: maxTokens,
			FLOPsPerToken: e.workPerToken(m)}); err != nil {
			var ge *Error
			if errors.As(err, &ge) {
				return nil, err
			}
			return nil, errorf(neuropb.InferError_CODE_PAYMENT_REQUIRED, "%v", err)
		}
	}
	seed := rand.Uint64()
	if s != nil && s.Seed != nil {
		seed = s.GetSeed()
	}
	sampler := NewSampler(s.GetTemperature(), int(s.GetTopK()), s.GetTopP(), seed)
	res := &Result{PromptTokens: len(prompt), Reason: neuropb.FinishReason_FINISH_REASON_LENGTH, Escrow: escrow}
	gen := NewGeneration(escrow)
	// Settle whatever was computed, even for a generation that fails,
	// then close the bill.
	defer func() {
		var rs []*neuropb.UsageReceipt
		if gen.Receipts != nil {
			rs = gen.Receipts.Take()
		}
		for _, r := range rs {
			res.FLOPs += r.GetFlops()
		}
		if len(rs) > 0 && e.cfg.OnReceipts != nil {
			e.cfg.OnReceipts(escrow, rs)
		}
		if cb.Bill != nil {
			res.Cost = cb.Bill.Close(res.FLOPs)
		}
	}()
	sess, err := e.newSession(m, nCtx, gen)
	if err != nil {
		return nil, errorf(neuropb.InferError_CODE_INTERNAL, "%v", err)
	}
	defer sess.Close()

	stats, checks := &gen.Stats, gen.Checks
	experts := m.batch.Join(gen)
	epoch := 0
	out := newTextStream(s.GetStop())
	next := prompt
	started := false
	// rewind goes back to before forward pass step, whose expert results
	// were found wrong: the tokens from step on are generated again.
	rewind := func(step int) error {
		var err error
		if next, err = moe.RewindTo(sess, prompt, res.Tokens, step); err != nil {
			return errorf(neuropb.InferError_CODE_INTERNAL, "%v", err)
		}
		res.Tokens = res.Tokens[:step]
		res.Rewinds++
		epoch = checks.Rewound(step)
		textBytes := out.rewind(vocab.Continue(res.Tokens))
		// forward_tokens: 1, or the whole sequence where a sliding
		// window's cache no longer reached back that far
		e.log.Info("rewound a generation past a wrong expert result", "to_token", step, "forward_tokens", len(next))
		if cb.Rewind != nil {
			return cb.Rewind(step, textBytes)
		}
		return nil
	}
	var drafter moe.Drafter
	if m.sm.Draft != nil {
		if drafter, err = m.sm.Draft.NewDrafter(nCtx); err != nil {
			return nil, errorf(neuropb.InferError_CODE_INTERNAL, "%v", err)
		}
		defer drafter.Close()
	}
	spec := newSpeculation(e.cfg.Speculate, e.cfg.SpeculateMax, drafter)
	defer func() {
		if spec.err != nil {
			e.log.Warn("the draft model failed: this generation went on without drafts", "err", spec.err)
		}
	}()
	// emit takes the token a forward pass chose; it says whether the
	// generation goes on.
	emit := func(tok int32, took time.Duration) (bool, error) {
		if vocab.IsEOG(tok) {
			res.Reason = neuropb.FinishReason_FINISH_REASON_EOS
			return false, nil
		}
		res.Tokens = append(res.Tokens, tok)
		e.generated.Add(1)
		delta, stopped := out.add(vocab.Continue(res.Tokens))
		if cb.Token != nil {
			if err := cb.Token(Token{ID: tok, Text: delta, Elapsed: took}); err != nil {
				return false, err
			}
		}
		if stopped {
			res.Reason = neuropb.FinishReason_FINISH_REASON_STOP
			return false, nil
		}
		return true, nil
	}
	// i counts the tokens chosen (the end-of-generation one too): a
	// forward pass is checked as the step of the first token it chooses.
	// A span node that calls experts on other nodes checks their results
	// too, and says which position they made wrong (a span.Session):
	// the forward pass that computed it rewinds as for a check of ours.
	spanWrong := func(w int) {
		if w >= 0 {
			checks.bad(epoch, max(0, w-len(prompt)+1))
		}
	}
	spanSess, _ := sess.(*span.Session)
	for i := 0; ; {
		if spanSess != nil {
			spanWrong(spanSess.WrongFrom())
		}
		if bad := checks.Bad(); bad >= 0 && bad <= i {
			if err := rewind(bad); err != nil {
				return nil, err
			}
			i = bad
		}
		done := i >= maxTokens || res.Reason != neuropb.FinishReason_FINISH_REASON_LENGTH
		if done {
			// The answer is final once every check of it has come back, or
			// checkWait has passed (a late check still scores the peers, but
			// can no longer correct this answer).
			wctx, wcancel := context.WithTimeout(ctx, checkWait)
			if spanSess != nil {
				spanWrong(spanSess.Sync(wctx))
			}
			checks.Wait(wctx)
			wcancel()
			if bad := checks.Bad(); bad >= 0 {
				res.Reason = neuropb.FinishReason_FINISH_REASON_LENGTH
				continue
			}
			break
		}
		start := time.Now()
		gen.Step(epoch, i)
		var draft []int32
		if started && len(next) == 1 {
			// at most the tokens left after this pass's own, and the room
			// left in the context
			room := min(maxTokens-i-1, nCtx-sess.Len()-1)
			draft = spec.draft(prompt, res.Tokens, room)
		}
		if len(draft) == 0 {
			experts.Enter()
			logits, err := sess.Forward(ctx, next, experts)
			experts.Leave()
			if err != nil {
				return nil, forwardError(ctx, err)
			}
			tok := sampler.Sample(logits)
			took := time.Since(start)
			if !started {
				started = true
				res.Prefill = took
				if cb.Start != nil {
					if err := cb.Start(len(prompt), took); err != nil {
						return nil, err
					}
				}
			}
			i++
			more, err := emit(tok, took)
			if err != nil {
				return nil, err
			}
			if more {
				next = []int32{tok}
			}
			continue
		}
		// Verify the draft: one pass over the last token and the draft,
		// each position's logits a decode step's; keep the draft up to
		// the first token the model would not have chosen, and the
		// model's own token there (or after the whole draft).
		pos := sess.Len()
		experts.Enter()
		all, err := sess.ForwardEach(ctx, append(slices.Clone(next), draft...), experts)
		experts.Leave()
		if err != nil {
			return nil, forwardError(ctx, err)
		}
		took := time.Since(start)
		kept := 0
		var chosen []int32
		for j, logits := range all {
			if j < len(draft) {
				tok, ok := sampler.SampleDraft(logits, draft[j])
				chosen = append(chosen, tok)
				if ok {
					kept++
					continue
				}
				break
			}
			chosen = append(chosen, sampler.Sample(logits))
		}
		spec.passed(len(draft), kept)
		stats.SpecPasses.Add(1)
		stats.Drafted.Add(int64(len(draft)))
		stats.Accepted.Add(int64(kept))
		// The cache holds the draft's rejected tokens past the kept ones.
		if err := sess.Rewind(pos + 1 + kept); err != nil {
			return nil, errorf(neuropb.InferError_CODE_INTERNAL, "%v", err)
		}
		each := took / time.Duration(len(chosen))
		for _, tok := range chosen {
			i++
			more, err := emit(tok, each)
			if err != nil {
				return nil, err
			}
			if !more || i >= maxTokens {
				break
			}
			next = []int32{tok}
		}
	}
	res.Text = out.text()
	res.Rest = res.Text[min(out.sent, len(res.Text)):]
	res.Stats = &neuropb.InferStats{
		MoeWallUs:        uint64(stats.MoEWall.Load() / 1e3),
		MoeComputeUs:     uint64(stats.MoECompute.Load() / 1e3),
		MoeLayers:        uint64(stats.MoELayers.Load()),
		OneNodeLayers:    uint64(stats.OneNodeLayers.Load()),
		SharedLayers:     uint64(stats.SharedLayers.Load()),
		ExpertCalls:      uint64(stats.Calls.Load()),
		ExpertBytes:      uint64(stats.Bytes.Load()),
		Hedges:           uint64(stats.Hedges.Load()),
		Redispatches:     uint64(stats.Redispatch.Load()),
		Rewinds:          uint32(res.Rewinds),
		SpecPasses:       uint64(stats.SpecPasses.Load()),
		DraftTokens:      uint64(stats.Drafted.Load()),
		AcceptedTokens:   uint64(stats.Accepted.Load()),
		MoeOverheadP50Us: uint64(stats.Overhead.Quantile(0.5).Microseconds()),
		MoeOverheadP90Us: uint64(stats.Overhead.Quantile(0.9).Microseconds()),
		DecodeLayers:     uint64(stats.DecodeLayers.Load()),
		DecodeOverheadUs: uint64(stats.DecodeOverhead.Load() / 1e3),
	}
	if ss, ok := sess.(*span.Session); ok {
		st := ss.Stats()
		res.Stats.ForwardPasses, res.Stats.SpanRequests = uint64(st.Passes), uint64(st.Requests)
		res.Stats.SpanReplays, res.Stats.SpanFailovers = uint64(st.Replays), uint64(st.Failovers)
		res.Stats.SpanReplayBytes, res.Stats.SpanReplayUs = uint64(st.ReplayBytes), uint64(st.ReplayTime.Microseconds())
		res.Stats.SpanRecoveryUs, res.Stats.SpanHedges = uint64(st.Recovery.Microseconds()), uint64(st.Hedges)
	}
	return res, nil
}

// newSession makes a generation's session: through the chain of fewest
// spans where span nodes that heartbeats announce cover every layer (one
// round trip per span per forward pass; the spans compute the experts),
// else here, the experts called layer by layer.
func (e *Engine) newSession(m *served, nCtx int, gen *Generation) (moe.Session, error) {
	if !e.cfg.NoSpans {
		now := time.Now()
		spans := e.h.Peers().Spans(m.cid.Bytes(), now)
		// Providers of the same spans found in the DHT (a large network's
		// heartbeats tell of a few); one whose heartbeat says it paused is
		// left out.
		for r, ps := range m.dht.spanProviders() {
			if _, heard := spans[r]; !heard {
				continue
			}
			for _, p := range ps {
				if info, ok := e.h.Peers().Get(p, now); !slices.Contains(spans[r], p) && (!ok || !info.Paused) {
					spans[r] = append(spans[r], p)
				}
			}
		}
		if e.val != nil {
			// Providers found wrong (and excluded) serve no span.
			for r, ps := range spans {
				if spans[r], _ = e.val.trusted(ps); len(spans[r]) == 0 {
					delete(spans, r)
				}
			}
		}
		hops, ok := span.Plan(spans, 0, m.hp.Layers)
		if ok && len(hops) > 0 {
			// Each span's providers, the fastest and most trusted first
			// (the peer ID orders those not measured yet).
			for i := range hops {
				hops[i].Providers = e.spanSel.rankOnly(hops[i].Providers, nil)
			}
			var c *span.Chain
			var avoid func(peer.ID) bool
			check := func(t span.CheckTask) {
				e.spanSel.Observe(t.Provider, t.Took, nil)
				if e.val == nil {
					return
				}
				// A sample of the span answers is computed again on
				// another provider of the span; one found wrong rewinds
				// the generation to the step that used it, and the chain
				// moves off its provider.
				others, _ := e.val.trusted(slices.DeleteFunc(slices.Clone(t.Hop.Providers), func(p peer.ID) bool { return p == t.Provider }))
				e.val.afterSpan(gen.Checks, int(gen.epoch.Load()), int(gen.step.Load()), t, others,
					func(ctx context.Context, t span.CheckTask, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
						// Paid from the generation's escrow, as the work it
						// checks (a check back after the settlement goes
						// unpaid).
						y, rcs, err := c.ReExecute(ctx, t, p)
						if gen.Receipts != nil {
							for _, rc := range rcs {
								gen.Receipts.add(rc, p)
							}
						}
						var last *neuropb.UsageReceipt
						if err == nil && len(rcs) > 0 {
							last = rcs[len(rcs)-1]
						}
						return y, last, err
					})
			}
			if e.val != nil {
				avoid = e.val.book.Excluded
			}
			c, err := span.NewChain(span.ChainConfig{Model: m.cid, Head: keepOpen{m.sm.Gating}, Part: moe.Part{Head: true}, Hops: hops,
				Dialer: e.h.LibP2P(), Timeout: e.cfg.CallTimeout, Log: e.log, OnRequest: check, Avoid: avoid, Delegate: e.delegate})
			if err != nil {
				return nil, err
			}
			e.log.Debug("generation through spans", "model", m.cid, "spans", len(hops))
			if gen.Receipts != nil {
				return c.NewPaidSession(nCtx, gen.Receipts.Escrow, gen.Receipts.add)
			}
			return c.NewSession(nCtx)
		}
	}
	return m.sm.Gating.NewSession(nCtx)
}

// delegationTTL is how long a span node may pay its expert calls from a
// session's escrow: longer than any generation, shorter than an escrow's
// life.
const delegationTTL = time.Hour

// delegate lets span node p pay the experts it calls for a session from
// the session's escrow, which this node opened as gating node.
func (e *Engine) delegate(escrow uint64, p peer.ID) (*neuropb.EscrowDelegation, error) {
	key := e.h.LibP2P().Peerstore().PrivKey(e.h.ID())
	if key == nil {
		return nil, errors.New("no private key for this node")
	}
	return expert.SignDelegation(key, escrow, p, time.Now().Add(delegationTTL))
}

// keepOpen is the served model's gating as a chain's head: a chain made
// for one generation does not close it.
type keepOpen struct{ moe.Gating }

func (keepOpen) Close() error { return nil }

// NewHeadSession implements moe.HeadSessioner where the gating does: a
// chain's sessions then keep no KV cache on the head.
func (k keepOpen) NewHeadSession(nCtx int) (moe.Session, error) {
	if h, ok := k.Gating.(moe.HeadSessioner); ok {
		return h.NewHeadSession(nCtx)
	}
	return k.Gating.NewSession(nCtx)
}

// forwardError gives a failed forward pass its protocol code.
func forwardError(ctx context.Context, err error) error {
	switch {
	case errors.Is(err, ErrNoProvider):
		return errorf(neuropb.InferError_CODE_NO_PROVIDER, "%v", err)
	case ctx.Err() != nil:
		return fmt.Errorf("generation stopped: %w", context.Cause(ctx))
	}
	return errorf(neuropb.InferError_CODE_INTERNAL, "%v", err)
}

// textStream turns the detokenized text of a growing generation into the
// deltas sent with each token: it holds back an unfinished UTF-8
// character and any tail that might begin a stop string, and cuts the
// text before the first stop string.
type textStream struct {
	stop []string
	full string // the text so far, cut at a stop string once one is found
	sent int    // bytes of full already given out
}

func newTextStream(stop []string) *textStream { return &textStream{stop: stop} }

// add takes the whole text so far and returns what to send now, and
// whether a stop string ended the text.
func (t *textStream) add(full string) (string, bool) {
	t.full = full
	cut := -1
	for _, s := range t.stop {
		// Search from a little before the sent part: a stop string may
		// straddle it.
		from := max(0, t.sent-len(s)+1)
		if i := strings.Index(full[from:], s); i >= 0 && (cut < 0 || from+i < cut) {
			cut = from + i
		}
	}
	if cut >= 0 {
		t.full = full[:cut]
		delta := t.full[min(t.sent, len(t.full)):]
		t.sent = len(t.full)
		return delta, true
	}
	safe := len(full)
	for _, s := range t.stop {
		// The longest tail of full that begins s.
		for n := min(len(s)-1, len(full)); n > 0; n-- {
			if strings.HasPrefix(s, full[len(full)-n:]) {
				safe = min(safe, len(full)-n)
				break
			}
		}
	}
	// Do not split a UTF-8 character: end before an unfinished one.
	for start := safe - 1; start >= max(t.sent, safe-utf8.UTFMax); start-- {
		if utf8.RuneStart(full[start]) {
			if !utf8.FullRuneInString(full[start:safe]) {
				safe = start
			}
			break
		}
	}
	if safe <= t.sent {
		return "", false
	}
	delta := full[t.sent:safe]
	t.sent = safe
	return delta, false
}

// rewind restarts the stream at the text of the tokens kept, and returns
// how many bytes of what was given out stay valid.
func (t *textStream) rewind(full string) int {
	t.full = full
	t.sent = min(t.sent, len(full))
	return t.sent
}

// text is the final text: everything, the held-back tail included.
func (t *textStream) text() string { return t.full }
