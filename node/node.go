// Package node is the composition root of neurod: it turns a Config into a
// running node (identity and home directory, the p2p stack, the local
// control API) and shuts it down in order. It is the only package that
// wires the others together. It is pure Go: the compute backend (ggml in
// neurod) is given to New with WithCompute.
package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/metrics"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/verdict"
)

// Option sets a dependency of Node.
type Option func(*options) error

type options struct {
	log      *slog.Logger
	home     string
	key      crypto.PrivKey
	progress expert.Progress
	slowDown time.Duration
	fault    expert.Fault
	load     LoadSignal
	compute  moe.Backend
	budget   string
	p2p      []p2p.Option
	// silent: Close does not tell the peers (WithoutLeaving).
	silent bool
	// shared: other nodes run in this process (WithSharedProcess).
	shared bool
}

// WithoutLeaving makes Close stop the node without telling its peers that
// it leaves, as a crash or a pulled cable would: they forget it after a
// few of its heartbeat intervals instead (a simulation's churn).
func WithoutLeaving() Option {
	return func(o *options) error {
		o.silent = true
		return nil
	}
}

// WithSharedProcess says that other nodes run in this process (a
// simulation's): the node leaves the heap that loading shards freed to the
// runtime instead of returning it to the system at once, which takes a
// collection of the whole process's heap each time one of them loads.
func WithSharedProcess() Option {
	return func(o *options) error {
		o.shared = true
		return nil
	}
}

// WithP2POptions passes options to the node's p2p host (a simulation's
// in-process transport: p2p.WithTransport).
func WithP2POptions(opts ...p2p.Option) Option {
	return func(o *options) error {
		o.p2p = append(o.p2p, opts...)
		return nil
	}
}

// WithBudgetSource says where expert.memory_mb came from when the node did
// not get it from its config (neurod: a GPU's free memory), for the error
// when an expert list does not fit.
func WithBudgetSource(s string) Option {
	return func(o *options) error {
		o.budget = s
		return nil
	}
}

// WithCompute sets the compute backend the node's experts and gating
// compute run on (neurod passes ggml's). A node that hosts experts or
// serves as a gating node needs one.
func WithCompute(b moe.Backend) Option {
	return func(o *options) error {
		if b == nil {
			return errors.New("nil compute backend")
		}
		o.compute = b
		return nil
	}
}

// WithLoadSignal replaces the machine load readings that home.idle_only
// and home.max_load act on (tests inject busy and idle spells).
func WithLoadSignal(f LoadSignal) Option {
	return func(o *options) error {
		o.load = f
		return nil
	}
}

// WithFault makes the node's experts misbehave on purpose: adversarial
// testnets only (neurod run --testnet --faulty MODE).
func WithFault(f expert.Fault) Option {
	return func(o *options) error {
		o.fault = f
		return nil
	}
}

// WithExpertSlowDown delays every expert compute by d: a test-only knob
// that makes the node a straggler.
func WithExpertSlowDown(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return fmt.Errorf("slow-down %v is negative", d)
		}
		o.slowDown = d
		return nil
	}
}

// WithProgress shows shard fetches (progress.Reporter.Fetches on a
// terminal).
func WithProgress(p expert.Progress) Option {
	return func(o *options) error {
		o.progress = p
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) error {
		if l == nil {
			return errors.New("nil logger")
		}
		o.log = l
		return nil
	}
}

// WithHome runs the node from a home directory made by Init: the identity
// comes from it, the home is locked against a second process, and the
// control API's address is written to it while the node runs.
func WithHome(dir string) Option {
	return func(o *options) error {
		if dir == "" {
			return errors.New("empty home directory")
		}
		o.home = dir
		return nil
	}
}

// WithIdentity sets the private key directly (in-process test networks).
func WithIdentity(key crypto.PrivKey) Option {
	return func(o *options) error {
		if key == nil {
			return errors.New("nil identity key")
		}
		o.key = key
		return nil
	}
}

// Node is a running neurod.
type Node struct {
	cfg      Config
	log      *slog.Logger
	home     string
	silent   bool // WithoutLeaving
	p2p      *p2p.Host
	expert   *expert.Service
	spans    *spanHost
	gating   *gating.Engine
	book     *reputation.Book
	verdicts *verdict.Service
	ledger   *ledger.Service
	settler  *ledger.Settler
	pay      *payments
	tabs     *tabService
	metrics  *metrics.Metrics
	idle     *idleGuard
	compute  moe.Backend
	web      webState
	unlock   func() error

	apiLn   net.Listener
	apiSrv  *http.Server
	httpLn  net.Listener
	httpSrv *http.Server

	bgCtx     context.Context
	bgCancel  context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
	started   time.Time
}

// New validates cfg, takes the home's lock and builds the p2p stack and the
// control API listener. It starts no loops; Start does. If New fails,
// nothing it opened stays open.
func New(cfg Config, opts ...Option) (_ *Node, err error) {
	o := options{log: slog.Default()}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("node option: %w", err)
		}
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: o.log, home: o.home, silent: o.silent, metrics: metrics.New(), started: time.Now(), compute: o.compute}
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
		}
	}()
	key := o.key
	if n.home != "" {
		if n.unlock, err = lockHome(n.home); err != nil {
			return nil, err
		}
		if key == nil {
			if key, err = LoadIdentity(n.home); err != nil {
				return nil, err
			}
		}
	}
	if key == nil {
		return nil, errors.New("node: no identity (use WithHome or WithIdentity)")
	}
	if cfg.Gating.Enabled && !slices.Contains(cfg.P2P.Roles, "gating") {
		cfg.P2P.Roles = append(slices.Clone(cfg.P2P.Roles), "gating")
	}
	if cfg.Expert.Model != "" && cfg.Expert.Experts != "none" && !slices.Contains(cfg.P2P.Roles, "expert") {
		cfg.P2P.Roles = append(slices.Clone(cfg.P2P.Roles), "expert")
	}
	cfg.Expert.Threads, cfg.Gating.Threads = capThreads(cfg.Expert.Threads, cfg.Home.Threads), capThreads(cfg.Gating.Threads, cfg.Home.Threads)
	cfg.Expert.Lanes = capLanes(cfg.Expert.Lanes, cfg.Expert.Threads, cfg.Home.Threads)
	if m := cfg.Home.MemoryMB; m > 0 {
		cfg.Expert.MemoryMB = min(cfg.Expert.MemoryMB, m)
	}
	n.cfg = cfg
	pcfg, err := cfg.ToP2P()
	if err != nil {
		return nil, err
	}
	// The reputation book lives in the home; a node without one (in-process
	// test networks) keeps it in memory.
	bc := reputation.Config{}
	if n.home != "" {
		bc.Path = filepath.Join(n.home, ReputationFile)
	}
	if n.book, err = reputation.Open(bc); err != nil {
		return nil, err
	}
	popts := []p2p.Option{p2p.WithLogger(n.log), p2p.WithAppScore(n.book.GossipScore), p2p.WithMetrics(n.metrics.Registry),
		p2p.WithHeartbeatExtra(n.heartbeatExtra)}
	n.p2p, err = p2p.New(key, pcfg, append(popts, o.p2p...)...)
	if err != nil {
		return nil, err
	}
	n.log = n.log.With("peer", n.p2p.ID())
	// The payment policy: its ledger and settler are set below, before
	// anything calls it.
	n.pay = &payments{self: n.p2p.ID(), log: n.log.With("component", "payments"), tabs: map[string]*tab{}}
	if n.home != "" {
		var payment func(context.Context, peer.ID, uint64, uint64) error
		if cfg.Expert.RequireEscrow && cfg.Ledger.Genesis != "" {
			payment = n.pay.expertPayment
		}
		if n.expert, err = newExpertService(n.p2p, key, cfg.Expert, filepath.Join(n.home, StoreDir), n.countFetched(o.progress),
			o.slowDown, o.fault, o.compute, o.budget, payment, n.spanKeys, o.shared, n.metrics, n.log); err != nil {
			return nil, err
		}
		n.idle = newIdleGuard(cfg.Home, o.load, n.expert.SetPaused, n.metrics, n.log)
		if sp, auto, _ := ParseSpans(cfg.Expert.Spans); sp.Layers() > 0 || auto {
			mc, _ := cid.Decode(cfg.Expert.Model)
			sign := func(r *neuropb.UsageReceipt) error { return ledger.SignReceipt(key, r) }
			if n.spans, err = newSpanHost(n.expert, n.p2p.LibP2P(), o.compute, mc, cfg.Expert.Threads, n.p2p.ID(), sign, payment, n.log); err != nil {
				return nil, err
			}
			if cfg.Expert.SpanExperts == "call" {
				n.spans.caller = &spanCaller{client: expert.NewClient(n.p2p.LibP2P(), n.log), peers: n.p2p, book: n.book, onWrong: n.reportWrong,
					timeout: time.Duration(cfg.Gating.CallTimeout)}
			}
		}
	}
	if cfg.Ledger.Genesis != "" {
		g, err := ledger.ReadGenesis(cfg.Ledger.Genesis)
		if err != nil {
			return nil, &FieldError{Key: "ledger.genesis", Err: err}
		}
		dir := ""
		if n.home != "" {
			dir = filepath.Join(n.home, "ledger")
		}
		if g.IsValidator(n.p2p.ID()) && dir == "" {
			return nil, errors.New("ledger: a validator needs a home for the chain's data")
		}
		if n.ledger, err = ledger.NewService(n.p2p, key, ledger.ServiceConfig{Dir: dir, Genesis: g, Listen: cfg.Ledger.Listen,
			Peers: cfg.Ledger.Peers, BlockInterval: time.Duration(cfg.Ledger.BlockInterval)}, n.log); err != nil {
			return nil, err
		}
		n.pay.ledger = n.ledger
	}
	vc := verdict.Config{Key: key, Book: n.book}
	if svc := n.expert; svc != nil {
		vc.Rerun = func(t reputation.Task) ([]float32, error) {
			if t.Span != nil {
				if n.spans == nil {
					return nil, errors.New("this node serves no span")
				}
				return n.spans.rerun(t)
			}
			// The verdict's weight types set its tolerance; they must be
			// the manifest's.
			if types, ok := svc.WeightTypes(t.Model, t.Layer, t.Expert); ok && len(t.DTypes) > 0 && !slices.Equal(types, t.DTypes) {
				return nil, fmt.Errorf("verdict on %d:%d names types %v, the manifest %v: %w", t.Layer, t.Expert, t.DTypes, types, reputation.ErrWrongWeightTypes)
			}
			return svc.Compute(t.Model, t.Layer, t.Expert, t.Input, t.N)
		}
	}
	if n.ledger != nil {
		vc.Slasher = n.ledger
	}
	if n.verdicts, err = verdict.New(n.p2p, vc, n.log); err != nil {
		return nil, err
	}
	if cfg.Gating.Enabled {
		if n.expert == nil {
			return nil, errors.New("gating: a gating node needs a home (its store holds the model's gating shard)")
		}
		dt := neuropb.WireDType_WIRE_DTYPE_F32
		if cfg.Gating.WireDType == "f16" {
			dt = neuropb.WireDType_WIRE_DTYPE_F16
		}
		var book *reputation.Book
		if cfg.Gating.Validate {
			book = n.book
		}
		ec := gating.EngineConfig{Threads: cfg.Gating.Threads, NoSpans: !cfg.Gating.Spans, LoadLayers: cfg.Gating.Layers == "load", ProvenFirst: cfg.Gating.ProvenFirst,
			MaxSessions: cfg.Gating.MaxSessions, MaxQueue: cfg.Gating.MaxQueue, QueueTimeout: time.Duration(cfg.Gating.QueueTimeout),
			Context: cfg.Gating.Context, DefaultMaxTokens: cfg.Gating.MaxTokens,
			Speculate: cfg.Gating.Speculate, Draft: cfg.Gating.Draft, SpeculateMax: cfg.Gating.SpeculateMax, BatchWait: batchWait(cfg.Gating.BatchWait), Lockstep: cfg.Gating.Lockstep, LockstepBusy: cfg.Gating.LockstepBusy,
			WaitPoll: waitPoll(cfg.Gating.WaitPollUS), PollNearby: cfg.Gating.PollNearby,
			DType: dt, CallTimeout: time.Duration(cfg.Gating.CallTimeout), Book: book, Metrics: n.metrics, Compute: o.compute,
			OnWrong: n.reportWrong, KeepHeap: o.shared}
		if n.ledger != nil {
			if n.settler, err = ledger.NewSettler(n.ledger, ledger.SettlerConfig{OnSettled: n.web.settled}, n.log); err != nil {
				return nil, err
			}
			ec.OnReceipts = n.settler.Submit
			n.pay.settler = n.settler
			n.tabs = &tabService{p: n.pay}
			n.pay.require = cfg.Gating.RequirePayment
		}
		if n.pay.keys, err = billing.Open(filepath.Join(n.home, APIKeysFile), n.p2p.ID()); err != nil {
			return nil, err
		}
		ec.Payments = n.pay
		if n.gating, err = gating.NewEngine(n.p2p, n.expert, ec, n.log); err != nil {
			return nil, err
		}
	}
	n.registerMetrics()
	if cfg.HTTP.Listen != "" {
		if err := n.checkHTTPExposure(); err != nil {
			return nil, err
		}
		var tlsCfg *tls.Config
		if cfg.HTTP.TLSCert != "" {
			cert, err := tls.LoadX509KeyPair(cfg.HTTP.TLSCert, cfg.HTTP.TLSKey)
			if err != nil {
				return nil, &FieldError{Key: "http.tls_cert", Err: err}
			}
			tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		}
		if n.httpLn, err = net.Listen("tcp", cfg.HTTP.Listen); err != nil {
			return nil, fmt.Errorf("http.listen %s: %w", cfg.HTTP.Listen, err)
		}
		if tlsCfg != nil {
			n.httpLn = tls.NewListener(n.httpLn, tlsCfg)
		}
		// Headers within 10 s; the API bounds reading a body itself (at
		// most 1 MiB in 30 s), since http.Server's ReadTimeout would also
		// cancel a generation that outlives it. A stream's answer may take
		// as long as its tokens do, so writes have no deadline.
		n.httpSrv = &http.Server{
			Handler:           n.webHandler(),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          slog.NewLogLogger(n.log.Handler(), slog.LevelWarn),
		}
	}
	if cfg.API.Listen != "" {
		n.apiLn, err = listenAPI(cfg.API.Listen)
		if err != nil {
			return nil, fmt.Errorf("api.listen %s: %w", cfg.API.Listen, err)
		}
		n.apiSrv = &http.Server{
			Handler:           n.apiHandler(),
			ReadHeaderTimeout: 5 * time.Second,
			ErrorLog:          slog.NewLogLogger(n.log.Handler(), slog.LevelWarn),
		}
	}
	return n, nil
}

// Start connects to the network and starts serving the control API. ctx
// bounds the bootstrap only.
func (n *Node) Start(ctx context.Context) error {
	if err := n.p2p.Start(ctx); err != nil {
		return err
	}
	// Each service in the order it depends on the others: the ledger
	// before what sends to it, the experts before the gating node.
	for _, svc := range n.services() {
		if err := svc.Start(ctx); err != nil {
			return err
		}
	}
	n.bgCtx, n.bgCancel = context.WithCancel(context.Background())
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		n.sampleRates(n.bgCtx)
	}()
	if n.idle != nil && n.idle.enabled() {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.idle.run(n.bgCtx)
		}()
	}
	if n.book != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.keepBook(n.bgCtx)
		}()
	}
	if n.gating != nil {
		mc, err := cid.Decode(n.cfg.Gating.ModelCID(n.cfg))
		if err != nil {
			return fmt.Errorf("gating.model: %w", err)
		}
		n.gating.Serve(mc)
	}
	if n.httpLn != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			if err := n.httpSrv.Serve(n.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				n.log.Error("http api stopped", "err", err)
			}
		}()
		n.log.Info("dashboard and metrics listening", "url", "http://"+n.httpLn.Addr().String()+"/")
	}
	if n.apiLn != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			if err := n.apiSrv.Serve(n.apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				n.log.Error("control api stopped", "err", err)
			}
		}()
		if n.home != "" {
			if err := WriteFileAtomic(filepath.Join(n.home, APIFile), []byte(n.APIAddr()+"\n"), 0o600); err != nil {
				return err
			}
		}
	}
	n.log.Info("node running", "api", n.APIAddr())
	return nil
}

// Close shuts the node down: the control API, then the p2p stack (pubsub,
// DHT, host), then releases the home. It is safe to call more than once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		var errs []error
		if n.apiSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			errs = append(errs, n.apiSrv.Shutdown(ctx))
			cancel()
		} else if n.apiLn != nil {
			errs = append(errs, n.apiLn.Close())
		}
		if n.httpSrv != nil {
			// Streams in progress end when the gating engine closes.
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			if err := n.httpSrv.Shutdown(ctx); err != nil {
				n.httpSrv.Close()
			}
			cancel()
		} else if n.httpLn != nil {
			errs = append(errs, n.httpLn.Close())
		}
		if n.bgCancel != nil {
			n.bgCancel()
		}
		n.wg.Wait()
		if n.home != "" && n.apiLn != nil {
			if err := os.Remove(filepath.Join(n.home, APIFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		// An expert node tells the others it is leaving, so that they stop
		// counting and calling it now rather than minutes later.
		if n.p2p != nil && n.expert != nil && !n.silent && len(n.expert.Loaded()) > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			if err := n.p2p.Leave(ctx); err != nil {
				n.log.Debug("leave", "err", err)
			}
			cancel()
		}
		// The services in the reverse order of Start: the gating node
		// stops before the settler and verdicts it reports to, and those
		// before the ledger they send to.
		svcs := n.services()
		for i := len(svcs) - 1; i >= 0; i-- {
			errs = append(errs, svcs[i].Close())
		}
		if n.book != nil {
			errs = append(errs, n.book.Save())
		}
		if n.p2p != nil {
			errs = append(errs, n.p2p.Close())
		}
		if n.unlock != nil {
			errs = append(errs, n.unlock())
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.p2p.ID() }

// Ledger is the node's part in the ledger (nil without ledger.genesis).
func (n *Node) Ledger() *ledger.Service { return n.ledger }

// Book is the node's reputation book.
func (n *Node) Book() *reputation.Book { return n.book }

// P2P is the node's p2p stack.
func (n *Node) P2P() *p2p.Host { return n.p2p }

// HTTPAddr is the public HTTP listener's host:port (dashboard, metrics,
// and on a gating node the OpenAI-compatible API), or "" when it is off.
func (n *Node) HTTPAddr() string {
	if n.httpLn == nil {
		return ""
	}
	return n.httpLn.Addr().String()
}

// Gating is the node's gating engine (nil unless gating.enabled).
func (n *Node) Gating() *gating.Engine { return n.gating }

// Expert is the node's expert service (nil without a home).
func (n *Node) Expert() *expert.Service { return n.expert }

// APIAddr is the control API's host:port, or "" when it is off.
func (n *Node) APIAddr() string {
	if n.apiLn == nil {
		return ""
	}
	return apiAddrOf(n.apiLn)
}

// StoreDir is the directory of a home that holds its shards;
// ReputationFile the file of its reputation book.
const (
	StoreDir       = "store"
	ReputationFile = "reputation.json"
)

// keepBook records which known peers are alive (their heartbeats) and
// saves the reputation book, every 10 s until ctx ends.
func (n *Node) keepBook(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
		heard := map[peer.ID]bool{}
		for _, e := range n.p2p.Peers().Snapshot(time.Now()) {
			heard[e.ID] = true
		}
		for _, e := range n.book.Snapshot() {
			n.book.Seen(e.Peer, heard[e.Peer])
		}
		if err := n.book.Save(); err != nil {
			n.log.Warn("save reputation", "err", err)
		}
	}
}

// service is the lifecycle every long-lived service of a node follows:
// New takes every dependency and starts nothing; Start starts its
// goroutines (ctx bounds the start only); Close ends them, returns only
// once they have, joins every error and is safe to call more than once.
type service interface {
	Start(ctx context.Context) error
	Close() error
}

// services lists the node's services in the order they start.
func (n *Node) services() []service {
	var out []service
	if n.ledger != nil {
		out = append(out, n.ledger)
	}
	if n.expert != nil {
		out = append(out, n.expert)
	}
	if n.spans != nil {
		out = append(out, n.spans)
	}
	if n.verdicts != nil {
		out = append(out, n.verdicts)
	}
	if n.settler != nil {
		out = append(out, n.settler)
		out = append(out, n.tabs)
	}
	if n.gating != nil {
		out = append(out, n.gating)
	}
	return out
}

// spanKeys are the DHT keys of the span this node serves, which its
// expert service provides with its blobs (the span host is made after the
// service, and serves only once started).
func (n *Node) spanKeys() []cid.Cid {
	if n.spans == nil {
		return nil
	}
	return n.spans.keys()
}

// reportWrong publishes a result this node's checks found wrong (a gating
// node's, or a span node's of the experts it calls) as a verdict.
func (n *Node) reportWrong(w gating.Verdict) {
	if n.verdicts == nil {
		return
	}
	n.verdicts.Report(verdict.Wrong{Task: reputation.Task{Model: w.Model, Layer: w.Key.Layer, Expert: w.Key.Expert,
		Input: w.Input, N: w.N, DTypes: w.DTypes, Span: w.Span}, Accused: w.Accused, Output: w.Wrong, Agreeing: w.Agreeing, Right: w.Right, Receipt: w.Receipt})
}

// heartbeatExtra adds the expert service's hosted experts and capacity and
// the idle guard's pause to a heartbeat (both are built before Start, and
// heartbeats begin at Start).
func (n *Node) heartbeatExtra(hb *neuropb.Heartbeat) {
	if n.expert != nil {
		n.expert.HeartbeatExtra(hb)
	}
	if n.spans != nil {
		n.spans.heartbeatExtra(hb)
	}
	if n.idle != nil {
		hb.Paused = n.idle.Paused()
	}
}

// newExpertService builds the node's expert service from its config.
func newExpertService(h *p2p.Host, key crypto.PrivKey, cfg ExpertConfig, store string, progress expert.Progress, slow time.Duration,
	fault expert.Fault, compute moe.Backend, budget string, payment func(context.Context, peer.ID, uint64, uint64) error,
	announce func() []cid.Cid, keepHeap bool, m *metrics.Metrics, log *slog.Logger) (*expert.Service, error) {
	if budget == "" {
		budget = "expert.memory_mb"
	}
	sc := expert.ServiceConfig{StoreDir: store, MemoryBudget: int64(cfg.MemoryMB) << 20, BudgetSource: budget, Threads: cfg.Threads, Lanes: cfg.Lanes,
		LanePoll: time.Duration(cfg.LanePollUS) * time.Microsecond, PollNearby: cfg.PollNearby,
		Server: expert.DefaultConfig(), Progress: progress, Fault: fault, Compute: compute, Announce: announce, KeepHeap: keepHeap}
	sc.Server.Metrics = m
	sc.Server.SignReceipts = func(rs []*neuropb.UsageReceipt) error { return reputation.SignReceipts(key, rs) }
	sc.Server.SlowDown = slow
	sc.Server.Payment = payment
	if cfg.Model != "" {
		c, err := cid.Decode(cfg.Model)
		if err != nil {
			return nil, fmt.Errorf("expert.model: %w", err)
		}
		if sc.Spec, err = expert.ParseSpec(cfg.Experts); err != nil {
			return nil, fmt.Errorf("expert.experts: %w", err)
		}
		if sp, auto, err := ParseSpans(cfg.Spans); err != nil {
			return nil, fmt.Errorf("expert.spans: %w", err)
		} else if auto {
			sc.Spec = sc.Spec.WithAutoSpan()
		} else if sp.Layers() > 0 {
			sc.Spec = sc.Spec.WithSpan(sp.First, sp.End)
		}
		if cfg.SpanExperts == "call" {
			sc.Spec = sc.Spec.WithSpanExpertsElsewhere()
		}
		sc.Model = c
	}
	return expert.NewService(h, sc, log)
}

// NewLogger builds the slog logger that cfg asks for, writing to w.
func NewLogger(w io.Writer, cfg LogConfig) (*slog.Logger, error) {
	level, err := ParseLogLevel(cfg.Level)
	if err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	hopts := &slog.HandlerOptions{Level: level}
	switch cfg.Format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, hopts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, hopts)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", cfg.Format)
}

// checkHTTPExposure refuses to put a gating node's API, unauthenticated,
// on an address that is not loopback: without API keys, anyone who
// reaches it would use the network's experts on this node's account.
func (n *Node) checkHTTPExposure() error {
	if n.gating == nil || n.cfg.HTTP.AllowUnauthenticated || (n.pay.keys != nil && n.pay.keys.Configured()) {
		return nil
	}
	host, _, _ := net.SplitHostPort(n.cfg.HTTP.Listen)
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return &FieldError{Key: "http.listen", Err: fmt.Errorf("%q is not a loopback address and this gating node has no API keys: "+
		"create one ('neurod apikey create'), listen on 127.0.0.1, or set http.allow_unauthenticated", n.cfg.HTTP.Listen)}
}

// waitPoll is the engine's setting for gating.wait_poll_us: 0 there
// turns polling off (the engine's 0 is its default).
func waitPoll(us int) time.Duration {
	if us == 0 {
		return -1
	}
	return time.Duration(us) * time.Microsecond
}

// batchWait is the engine's setting for gating.batch_wait: 0 there turns
// batching off (the engine's 0 is its default).
func batchWait(d Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return time.Duration(d)
}
