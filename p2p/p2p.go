// Package p2p is neuro's presence on the network: the libp2p host (TCP and
// QUIC, Noise and TLS, yamux, resource and connection managers, NAT
// traversal), the Kademlia DHT under the /neuro prefix, GossipSub with peer
// scoring and typed, validated topics, and the heartbeat that every node
// publishes on the routing topic.
package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	drouting "github.com/libp2p/go-libp2p/p2p/discovery/routing"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/neuro-p2p/neuro/neuropb"
)

// DHTMode selects the Kademlia DHT mode.
type DHTMode int

const (
	// DHTAuto is a server while AutoNAT finds the node publicly reachable,
	// a client otherwise.
	DHTAuto DHTMode = iota
	// DHTServer always answers queries (set it on local testnets: on
	// loopback AutoNAT never finds a node public).
	DHTServer
	// DHTClient never answers queries.
	DHTClient
)

// Config is the typed p2p configuration; node.Config parses into it.
type Config struct {
	Listen           []ma.Multiaddr
	Bootstrap        []peer.AddrInfo
	BootstrapTimeout time.Duration
	Roles            []neuropb.Role
	DHTMode          DHTMode

	PortMap      bool
	AutoNAT      bool
	HolePunching bool
	RelayClient  bool
	RelayService RelayMode
	StaticRelays []peer.AddrInfo
	// Reachability, unless ReachAuto, is what the node knows of itself
	// instead of what AutoNAT finds.
	Reachability Reach

	Limits Limits

	HeartbeatInterval time.Duration
	// HeartbeatRate, if positive, stretches the heartbeat interval as the
	// network grows: each node beats every max(HeartbeatInterval, peers
	// heard / HeartbeatRate), so that the routing topic carries about
	// HeartbeatRate heartbeats a second however many nodes there are.
	HeartbeatRate float64
	PeerTableSize int
	PeerExpiry    time.Duration
}

// Option sets a dependency of Host.
type Option func(*options) error

type options struct {
	log        *slog.Logger
	appScore   func(peer.ID) float64
	hbExtra    func(*neuropb.Heartbeat)
	metrics    prometheus.Registerer
	transports []any
	inspect    time.Duration
	gater      connmgr.ConnectionGater
	noMetrics  bool
}

// WithoutLibp2pMetrics leaves out go-libp2p's Prometheus metrics (swarm,
// identify, resource manager, ...): a simulation of hundreds of nodes in
// one process, where no one reads them, spent 3-4% of its CPU on them.
func WithoutLibp2pMetrics() Option {
	return func(o *options) error {
		o.noMetrics = true
		return nil
	}
}

// WithConnectionGater has g approve every dial and accepted connection
// (libp2p's connection gating): a simulation counts who dials.
func WithConnectionGater(g connmgr.ConnectionGater) Option {
	return func(o *options) error {
		if g == nil {
			return errors.New("nil connection gater")
		}
		o.gater = g
		return nil
	}
}

// WithScoreInspection has GossipSub report its scores of the peers every
// period; Scores returns the latest. Computing them costs a score per
// connected peer each period, so only hosts that are watched (a
// simulation's) ask for it.
func WithScoreInspection(period time.Duration) Option {
	return func(o *options) error {
		if period <= 0 {
			return fmt.Errorf("score inspection period %v: must be positive", period)
		}
		o.inspect = period
		return nil
	}
}

// WithTransport adds a libp2p transport (a constructor for
// libp2p.Transport) to TCP and QUIC: the in-process network of a
// simulation (package testnet/simnet), whose /memory addresses the
// config's listen addresses then name.
func WithTransport(constructor any) Option {
	return func(o *options) error {
		if constructor == nil {
			return errors.New("nil transport")
		}
		o.transports = append(o.transports, constructor)
		return nil
	}
}

// WithMetrics registers go-libp2p's metrics (swarm, identify, hole
// punching, AutoNAT, relay, resource manager) on reg instead of
// Prometheus' default registry.
func WithMetrics(reg prometheus.Registerer) Option {
	return func(o *options) error {
		o.metrics = reg
		return nil
	}
}

// WithHeartbeatExtra lets the node add to each heartbeat before it is
// published: the hosted experts and capacity of an expert node. f runs on
// the heartbeat loop; it must be quick and safe for concurrent use with
// the node's other work.
func WithHeartbeatExtra(f func(*neuropb.Heartbeat)) Option {
	return func(o *options) error {
		o.hbExtra = f
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

// WithAppScore feeds an application score (reputation) into GossipSub peer
// scoring; see peerScoreParams for its weight.
func WithAppScore(f func(peer.ID) float64) Option {
	return func(o *options) error {
		o.appScore = f
		return nil
	}
}

// Host is a running neuro p2p stack. Create it with New, then Start; Close
// stops everything.
type Host struct {
	cfg  Config
	log  *slog.Logger
	host host.Host
	dht  *dht.IpfsDHT
	ps   *pubsub.PubSub

	hbExtra func(*neuropb.Heartbeat)
	routing *Topic[*neuropb.Heartbeat]
	// hbSent counts heartbeats published, hbOutOfTurn those published by
	// PublishHeartbeat.
	hbSent, hbOutOfTurn atomic.Uint64
	// provides and providerLookups count Traffic's Provides and
	// ProviderLookups.
	provides, providerLookups atomic.Uint64
	// topicDiscoveries counts Traffic's TopicDiscoveries.
	topicDiscoveries atomic.Uint64
	// copies drops copies of gossip being validated.
	copies *copyFilter
	// left is set by Leave: no heartbeat after the one saying so.
	left atomic.Bool

	peers     *PeerTable
	rej       *Rejections
	traffic   trafficTracer
	scoresMu  sync.Mutex
	scores    map[peer.ID]float64 // GossipSub's, with WithScoreInspection
	provCache providerCache

	started time.Time
	reach   atomic.Int32 // neuropb.Reachability
	hbMu    sync.Mutex   // guards hbSeq
	hbSeq   uint64

	ctx       context.Context // bounds the loops; cancelled first by Close
	cancel    context.CancelFunc
	psCancel  context.CancelFunc // ends GossipSub, after the topics are closed
	wg        sync.WaitGroup
	closeHost func() error
	closeOnce sync.Once
	closeErr  error
}

// New builds the host, the DHT and GossipSub and joins the routing topic. It
// dials no one; Start does. If New fails, nothing it started is left
// running.
func New(key crypto.PrivKey, cfg Config, opts ...Option) (_ *Host, err error) {
	o := options{log: slog.Default()}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("p2p option: %w", err)
		}
	}
	if cfg.HeartbeatInterval <= 0 || cfg.PeerTableSize <= 0 || cfg.PeerExpiry <= 0 || cfg.BootstrapTimeout <= 0 {
		return nil, errors.New("p2p config: heartbeat interval, peer table size, peer expiry and bootstrap timeout must be positive")
	}
	if cfg.HeartbeatRate < 0 {
		return nil, fmt.Errorf("p2p config: heartbeat rate %v is negative", cfg.HeartbeatRate)
	}
	cfg.Bootstrap = mergeAddrInfos(cfg.Bootstrap)
	h := &Host{
		cfg:     cfg,
		log:     o.log,
		hbExtra: o.hbExtra,
		peers:   NewPeerTable(cfg.PeerTableSize, cfg.PeerExpiry),
		rej:     &Rejections{},
	}
	h.copies = newCopyFilter(h.traffic.dropped)
	h.ctx, h.cancel = context.WithCancel(context.Background())
	psCtx, psCancel := context.WithCancel(context.Background())
	h.psCancel = psCancel
	defer func() {
		if err != nil {
			err = errors.Join(err, h.Close())
		}
	}()

	h.host, h.closeHost, err = newHost(hostOptions{
		key:          key,
		listen:       cfg.Listen,
		limits:       cfg.Limits,
		portMap:      cfg.PortMap,
		autoNAT:      cfg.AutoNAT,
		holePunching: cfg.HolePunching,
		relayClient:  cfg.RelayClient,
		relayService: cfg.RelayService,
		staticRelays: cfg.StaticRelays,
		reach:        cfg.Reachability,
		metrics:      o.metrics,
		transports:   o.transports,
		gater:        o.gater,
		noMetrics:    o.noMetrics,
	}, h.log)
	if err != nil {
		return nil, err
	}
	h.log = h.log.With("peer", h.host.ID())

	mode := map[DHTMode]dht.ModeOpt{DHTAuto: dht.ModeAuto, DHTServer: dht.ModeServer, DHTClient: dht.ModeClient}[cfg.DHTMode]
	h.dht, err = dht.New(h.host,
		dht.ProtocolPrefix(neuropb.DHTPrefix),
		dht.Mode(mode),
		dht.BootstrapPeers(cfg.Bootstrap...),
	)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	h.ps, err = newPubSub(psCtx, h.host, pubsubOptions{
		appScore:     o.appScore,
		inspect:      o.inspect,
		scores:       h.setScores,
		peerExchange: slices.Contains(cfg.Roles, neuropb.Role_ROLE_BOOTSTRAP),
		routing: topicDiscovery{dht: drouting.NewRoutingDiscovery(h.dht), candidates: h.topicCandidates,
			topicPeers: h.topicPeers, count: &h.topicDiscoveries},
		tracers: []pubsub.RawTracer{rejectTracer{r: h.rej}, &h.traffic},
		copies:  h.copies,
	}, h.log)
	if err != nil {
		return nil, err
	}
	h.routing, err = JoinTopic(h.ps, neuropb.TopicRouting, neuropb.MaxHeartbeatSize,
		func() *neuropb.Heartbeat { return new(neuropb.Heartbeat) }, validateHeartbeat, h.rej)
	if err != nil {
		return nil, err
	}
	return h, nil
}

// Start connects to the bootstrap peers (failing if none answers within
// the bootstrap timeout), bootstraps the DHT and starts the heartbeat. ctx
// bounds only the bootstrap; the loops run until Close.
func (h *Host) Start(ctx context.Context) error {
	h.started = time.Now()
	sub, err := h.routing.Subscribe()
	if err != nil {
		return err
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		h.receiveHeartbeats(h.ctx, sub)
	}()
	if err := h.connectBootstrap(ctx); err != nil {
		return err
	}
	_, _ = h.seedRoutingTable()
	if err := h.dht.Bootstrap(h.ctx); err != nil {
		return fmt.Errorf("dht bootstrap: %w", err)
	}
	reach, err := h.host.EventBus().Subscribe(new(event.EvtLocalReachabilityChanged))
	if err != nil {
		return fmt.Errorf("reachability events: %w", err)
	}
	h.wg.Add(3)
	go func() {
		defer h.wg.Done()
		defer reach.Close()
		for {
			select {
			case <-h.ctx.Done():
				return
			case ev, ok := <-reach.Out():
				if !ok {
					return
				}
				r := ev.(event.EvtLocalReachabilityChanged).Reachability
				h.reach.Store(int32(reachabilityOf(r)))
				h.log.Info("reachability", "is", r.String())
			}
		}
	}()
	go func() {
		defer h.wg.Done()
		h.publishHeartbeats(h.ctx)
	}()
	go func() {
		defer h.wg.Done()
		h.maintain(h.ctx)
	}()
	h.log.Info("p2p started", "addrs", h.host.Addrs(), "bootstrap", len(h.cfg.Bootstrap))
	return nil
}

// connectBootstrap dials every bootstrap peer, retrying with backoff, until
// at least one is connected or the bootstrap timeout passes.
func (h *Host) connectBootstrap(ctx context.Context) error {
	if len(h.cfg.Bootstrap) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, h.cfg.BootstrapTimeout)
	defer cancel()
	backoff := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		n, errs := h.dialBootstrap(ctx)
		if n > 0 {
			for _, e := range errs {
				h.log.Warn("bootstrap peer unreachable", "err", e)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("bootstrap: none of %d peers reachable after %d attempts in %v: %w",
				len(h.cfg.Bootstrap), attempt, h.cfg.BootstrapTimeout, errors.Join(errs...))
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// mergeAddrInfos joins the entries of one peer (a config lists each
// address of a bootstrap node as an entry of its own), in the order each
// peer first appears: a peer is dialled once, with all its addresses, so
// that the dial ranker chooses among them (dialled one by one, a node's
// TCP and QUIC addresses raced, and either connection could carry its
// streams).
func mergeAddrInfos(ais []peer.AddrInfo) []peer.AddrInfo {
	var out []peer.AddrInfo
	at := map[peer.ID]int{}
	for _, ai := range ais {
		i, ok := at[ai.ID]
		if !ok {
			at[ai.ID] = len(out)
			out = append(out, peer.AddrInfo{ID: ai.ID})
			i = len(out) - 1
		}
		for _, a := range ai.Addrs {
			if !slices.ContainsFunc(out[i].Addrs, a.Equal) {
				out[i].Addrs = append(out[i].Addrs, a)
			}
		}
	}
	return out
}

// dialBootstrap dials the bootstrap peers in parallel and returns how many
// are connected and the errors of the others.
func (h *Host) dialBootstrap(ctx context.Context) (int, []error) {
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		ok   int
		errs []error
	)
	for _, ai := range h.cfg.Bootstrap {
		if ai.ID == h.host.ID() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			// Each retry dials for real: without this the swarm answers
			// from its dial backoff and hides why the peer is unreachable.
			if sw, ok := h.host.Network().(*swarm.Swarm); ok {
				sw.Backoff().Clear(ai.ID)
			}
			err := h.host.Connect(dctx, ai)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", ai, err))
				return
			}
			ok++
		}()
	}
	wg.Wait()
	return ok, errs
}

// maintain reconnects to the bootstrap peers when the node has lost every
// connection, and seeds the DHT routing table from them when it is empty
// (refreshing it then), every 15 s until ctx ends.
func (h *Host) maintain(ctx context.Context) {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.reseed(ctx)
	}
}

// reseed is maintain's work on each tick: a node that knows no DHT peer
// although it is connected to some seeds its routing table.
func (h *Host) reseed(ctx context.Context) {
	switch {
	case len(h.cfg.Bootstrap) == 0:
		// A node without bootstrap peers (a bootstrap node) admits the
		// peers that dial it only once they have answered the DHT's check;
		// one too busy to answer when it joined is left out until the
		// DHT's own retry, minutes later. With no DHT peer at all, take
		// the connected peers that serve the DHT.
		if h.dht.RoutingTable().Size() > 0 {
			return
		}
		added, why := h.seedRoutingTableFrom(h.host.Network().Peers())
		if added > 0 {
			h.log.Warn("DHT routing table empty; seeding it from the connected peers", "added", added, "err", errors.Join(why...))
			h.dht.RefreshRoutingTable()
		}
	case len(h.host.Network().Peers()) == 0:
		h.log.Warn("no peers left; dialling bootstrap peers again")
		if n, _ := h.dialBootstrap(ctx); n > 0 {
			_, _ = h.seedRoutingTable()
			h.dht.RefreshRoutingTable()
		}
	case h.dht.RoutingTable().Size() == 0:
		// Connected, yet no DHT peer: the DHT admits a peer only once it
		// has answered a FIND_NODE check, and a bootstrap peer too busy
		// to answer in time is left out until the DHT's own retry,
		// minutes later. Meanwhile the node can find neither providers
		// nor peers.
		n, errs := h.dialBootstrap(ctx)
		added, why := h.seedRoutingTable()
		h.log.Warn("DHT routing table empty; seeding it from the bootstrap peers", "connected", n, "added", added,
			"err", errors.Join(append(errs, why...)...))
		if added > 0 {
			h.dht.RefreshRoutingTable()
		}
	}
}

// setScores keeps GossipSub's latest scores (WithScoreInspection).
func (h *Host) setScores(m map[peer.ID]float64) {
	h.scoresMu.Lock()
	h.scores = m
	h.scoresMu.Unlock()
}

// Scores returns GossipSub's latest scores of the connected peers; nil
// unless the host was made WithScoreInspection.
func (h *Host) Scores() map[peer.ID]float64 {
	h.scoresMu.Lock()
	defer h.scoresMu.Unlock()
	return maps.Clone(h.scores)
}

// dhtProtocol is the protocol of neuro's DHT servers.
const dhtProtocol = neuropb.DHTPrefix + "/kad/1.0.0"

// seedRoutingTable puts the connected bootstrap peers that serve the DHT
// into its routing table, and returns how many it added and why the others
// were not. The operator named them, so they are taken without the
// liveness check the DHT makes of peers it meets (which a busy bootstrap
// peer can fail, leaving a new node with an empty table: about one node in
// a hundred in a simulated network of 150); they leave the table like any
// other peer when they stop answering.
func (h *Host) seedRoutingTable() (added int, why []error) {
	ids := make([]peer.ID, 0, len(h.cfg.Bootstrap))
	for _, ai := range h.cfg.Bootstrap {
		ids = append(ids, ai.ID)
	}
	return h.seedRoutingTableFrom(ids)
}

// seedRoutingTableFrom adds the peers of ids that are connected and serve
// the DHT to the routing table.
func (h *Host) seedRoutingTableFrom(ids []peer.ID) (added int, why []error) {
	for _, id := range ids {
		if id == h.host.ID() {
			continue
		}
		if h.host.Network().Connectedness(id) != network.Connected {
			why = append(why, fmt.Errorf("%s: not connected", id))
			continue
		}
		if ok, _ := h.host.Peerstore().SupportsProtocols(id, dhtProtocol); len(ok) == 0 {
			why = append(why, fmt.Errorf("%s: no DHT server", id))
			continue
		}
		ok, err := h.dht.RoutingTable().TryAddPeer(id, true, true)
		switch {
		case err != nil:
			why = append(why, fmt.Errorf("%s: %w", id, err))
		case ok:
			added++
		}
	}
	return added, why
}

// Close stops the loops, leaves the topics and closes pubsub, the DHT and the
// host, in that order. It is safe to call more than once.
func (h *Host) Close() error {
	h.closeOnce.Do(func() {
		h.cancel()
		h.wg.Wait()
		var errs []error
		if h.routing != nil {
			errs = append(errs, h.routing.Close())
		}
		h.psCancel()
		if h.dht != nil {
			errs = append(errs, h.dht.Close())
		}
		if h.closeHost != nil {
			errs = append(errs, h.closeHost())
		}
		h.closeErr = errors.Join(errs...)
	})
	return h.closeErr
}

// ID is the node's peer ID.
func (h *Host) ID() peer.ID { return h.host.ID() }

// Addrs are the addresses the node announces.
func (h *Host) Addrs() []ma.Multiaddr { return h.host.Addrs() }

// Roles are the roles the node announces.
func (h *Host) Roles() []neuropb.Role { return slices.Clone(h.cfg.Roles) }

// Started is when Start was called.
func (h *Host) Started() time.Time { return h.started }

// LibP2P is the underlying libp2p host, for protocols built on top.
func (h *Host) LibP2P() host.Host { return h.host }

// DHT is the Kademlia DHT.
func (h *Host) DHT() *dht.IpfsDHT { return h.dht }

// PubSub is the GossipSub router, for joining further topics.
func (h *Host) PubSub() *pubsub.PubSub { return h.ps }

// Reachability is what AutoNAT found of this node.
func (h *Host) Reachability() neuropb.Reachability { return neuropb.Reachability(h.reach.Load()) }

func reachabilityOf(r network.Reachability) neuropb.Reachability {
	switch r {
	case network.ReachabilityPublic:
		return neuropb.Reachability_REACHABILITY_PUBLIC
	case network.ReachabilityPrivate:
		return neuropb.Reachability_REACHABILITY_PRIVATE
	}
	return neuropb.Reachability_REACHABILITY_UNKNOWN
}

// Peers is the table of peers heard on the routing topic.
func (h *Host) Peers() *PeerTable { return h.peers }

// Traffic is the host's GossipSub traffic since it started.
func (h *Host) Traffic() Traffic {
	t := h.traffic.snapshot()
	t.Heartbeats, t.HeartbeatsOutOfTurn = h.hbSent.Load(), h.hbOutOfTurn.Load()
	t.Provides, t.ProviderLookups = h.provides.Load(), h.providerLookups.Load()
	t.TopicDiscoveries = h.topicDiscoveries.Load()
	t.CopiesDropped = h.copies.dropped.Load()
	return t
}

// Leave tells the peers that this node is shutting down (a heartbeat
// saying so, which removes it from their tables; no other heartbeat
// follows it), and gives GossipSub leaveFlush to send it, or until ctx
// ends. Call it before Close; a node that is killed is forgotten after a
// few of its heartbeat intervals instead.
func (h *Host) Leave(ctx context.Context) error {
	if len(h.host.Network().Peers()) == 0 {
		return nil
	}
	h.hbMu.Lock()
	h.left.Store(true)
	hb := h.heartbeat(time.Now())
	h.hbMu.Unlock()
	hb.Leaving, hb.Hosted = true, nil
	if err := h.routing.Publish(ctx, hb); err != nil {
		return fmt.Errorf("leaving heartbeat: %w", err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(leaveFlush):
	}
	return nil
}

// leaveFlush is how long Leave waits for the leaving heartbeat to go out:
// GossipSub queues it to the mesh peers' writers, which Close would stop.
const leaveFlush = 100 * time.Millisecond

// Rejections counts rejected gossip messages.
func (h *Host) Rejections() *Rejections { return h.rej }

// PublishHeartbeat publishes a heartbeat now, out of turn: a node that has
// just chosen experts to host tells the others at once.
func (h *Host) PublishHeartbeat(ctx context.Context) error {
	h.hbMu.Lock()
	if h.left.Load() {
		h.hbMu.Unlock()
		return nil
	}
	hb := h.heartbeat(time.Now())
	h.hbMu.Unlock()
	h.hbSent.Add(1)
	h.hbOutOfTurn.Add(1)
	return h.routing.Publish(ctx, hb)
}

// RoutingTable lists the peers in the DHT routing table.
func (h *Host) RoutingTable() []peer.ID { return h.dht.RoutingTable().ListPeers() }
