package p2p

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	coreconnmgr "github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/autorelay"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	circuitproto "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/proto"
	relayv2 "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-libp2p/x/rate"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/neuro-p2p/neuro/neuropb"
)

// RelayMode says when a node serves circuit relay v2 for others.
type RelayMode int

const (
	// RelayAuto serves only while AutoNAT finds the node publicly
	// reachable, with libp2p's default limits on a relayed connection
	// (2 minutes, 128 KiB each way): enough to hole-punch through.
	RelayAuto RelayMode = iota
	// RelayOn always serves, without limits on a relayed connection's
	// duration or data: a relay run to carry the traffic of homes whose
	// NATs cannot be punched through (symmetric on both sides).
	RelayOn
	// RelayOff never serves.
	RelayOff
)

// Reach is what a node knows of its own reachability.
type Reach int

const (
	// ReachAuto leaves it to AutoNAT, whose first probe waits 15 s:
	// until then a node behind NAT neither reserves relay slots nor
	// settles its DHT mode.
	ReachAuto Reach = iota
	// ReachPrivate: behind a NAT without port forwarding (a home box).
	// The node reserves relay slots and stays a DHT client at once.
	ReachPrivate
	// ReachPublic: reachable at its addresses (a server with a public
	// IP).
	ReachPublic
)

// Limits bounds what the node accepts from the network.
type Limits struct {
	ConnsLow, ConnsHigh int
	ConnsGrace          time.Duration
	MaxConns            int
	MaxStreams          int
	MaxMemory           int64
}

// resourceLimits builds the resource manager's limits: libp2p's defaults
// scaled to the machine, with the node-wide (system) limits set explicitly
// from config. Inbound connections may use at most half the connection
// budget, so a flood of dialers cannot take every slot from our own dials.
func (l Limits) resourceLimits() rcmgr.ConcreteLimitConfig {
	sys := rcmgr.ResourceLimits{
		Conns:          rcmgr.LimitVal(l.MaxConns),
		ConnsInbound:   rcmgr.LimitVal(max(1, l.MaxConns/2)),
		ConnsOutbound:  rcmgr.LimitVal(l.MaxConns),
		Streams:        rcmgr.LimitVal(l.MaxStreams),
		StreamsInbound: rcmgr.LimitVal(max(1, l.MaxStreams/2)),
		Memory:         rcmgr.LimitVal64(l.MaxMemory),
		FD:             rcmgr.LimitVal(l.MaxConns),
	}
	partial := rcmgr.PartialLimitConfig{
		System: sys,
		// Expert compute holds hidden states of up to MaxExpertMessageSize
		// in and out per request: a stream may carry a few at once, and
		// the service as a whole half of the node's memory.
		Stream: rcmgr.ResourceLimits{Memory: rcmgr.LimitVal64(4 * neuropb.MaxExpertMessageSize)},
		Service: map[string]rcmgr.ResourceLimits{
			neuropb.ExpertService: {
				Memory:         rcmgr.LimitVal64(max(l.MaxMemory/2, 4*neuropb.MaxExpertMessageSize)),
				StreamsInbound: rcmgr.LimitVal(max(1, l.MaxStreams/4)),
			},
		},
	}
	return partial.Build(rcmgr.DefaultLimits.AutoScale())
}

// hostOptions is what newHost needs from Config.
type hostOptions struct {
	key          crypto.PrivKey
	listen       []ma.Multiaddr
	limits       Limits
	portMap      bool
	autoNAT      bool
	holePunching bool
	relayClient  bool
	relayService RelayMode
	staticRelays []peer.AddrInfo
	reach        Reach
	metrics      prometheus.Registerer // nil: Prometheus' default registry
	transports   []any                 // more libp2p transports
	gater        coreconnmgr.ConnectionGater
	noMetrics    bool // without go-libp2p's metrics
}

// newHost builds the libp2p host: TCP and QUIC; Noise and TLS; yamux; the
// resource and connection managers; AutoNAT v2, relay client, hole punching
// and port mapping as configured. It checks that every listen address was
// bound: libp2p itself only fails when none was.
func newHost(o hostOptions, log *slog.Logger) (host.Host, func() error, error) {
	reg := o.metrics
	if reg == nil {
		reg = prometheus.DefaultRegisterer
	}
	var rmOpts []rcmgr.Option
	if !o.noMetrics {
		str, err := rcmgr.NewStatsTraceReporter()
		if err != nil {
			return nil, nil, fmt.Errorf("resource manager metrics: %w", err)
		}
		rcmgr.MustRegisterWith(reg)
		rmOpts = append(rmOpts, rcmgr.WithTraceReporter(str))
	}
	if len(o.transports) > 0 {
		// An added transport's connections (a simulation's in-memory
		// pipes) carry no IP address, and libp2p's limiter of new
		// connections puts every one of those in one bucket (16 at
		// once, then one per 5 s, dials included): hundreds of hosts in
		// one process would be refused. They share one machine anyway.
		rmOpts = append(rmOpts, rcmgr.WithConnRateLimiters(&rate.Limiter{}))
	}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(o.limits.resourceLimits()), rmOpts...)
	if err != nil {
		return nil, nil, fmt.Errorf("resource manager: %w", err)
	}
	cm, err := connmgr.NewConnManager(o.limits.ConnsLow, o.limits.ConnsHigh, connmgr.WithGracePeriod(o.limits.ConnsGrace))
	if err != nil {
		return nil, nil, fmt.Errorf("connection manager: %w", err)
	}
	opts := []libp2p.Option{
		libp2p.Identity(o.key),
		libp2p.ListenAddrs(o.listen...),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(libp2ptls.ID, libp2ptls.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.SwarmOpts(swarm.WithDialRanker(rankDials)),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		libp2p.UserAgent("neurod/" + Version),
	}
	if o.noMetrics {
		opts = append(opts, libp2p.DisableMetrics())
	} else {
		opts = append(opts, libp2p.PrometheusRegisterer(reg))
	}
	for _, t := range o.transports {
		opts = append(opts, libp2p.Transport(t))
	}
	if o.gater != nil {
		opts = append(opts, libp2p.ConnectionGater(o.gater))
	}
	if o.portMap {
		opts = append(opts, libp2p.NATPortMap())
	}
	if o.autoNAT {
		opts = append(opts, libp2p.EnableNATService(), libp2p.EnableAutoNATv2())
	}
	switch o.reach {
	case ReachPrivate:
		opts = append(opts, libp2p.ForceReachabilityPrivate())
	case ReachPublic:
		opts = append(opts, libp2p.ForceReachabilityPublic())
	}
	if o.holePunching {
		// The direct dial DCUtR tries before punching gives up after 2 s
		// (libp2p: 5 s): a QUIC dial to a home's private address gets no
		// answer, and the punch itself should not wait on it.
		opts = append(opts, libp2p.EnableHolePunching(holepunch.DirectDialTimeout(2*time.Second)))
	}
	if o.relayService == RelayAuto {
		opts = append(opts, libp2p.EnableRelayService())
	}
	// A neuro network has a few relays, not the thousands of the IPFS
	// network: reserve a slot as soon as one relay is found, instead of
	// libp2p's default of waiting for four candidates or three minutes.
	// Until one is found, look among the connected peers every 2 s (the
	// default, 30 s, made a node that knows it is private from the start
	// ask once before it had connected to anyone, then wait 30 s).
	autorelayOpts := []autorelay.Option{autorelay.WithMinCandidates(1), autorelay.WithBootDelay(10 * time.Second),
		autorelay.WithMinInterval(2 * time.Second)}
	// The peer source for AutoRelay needs the host, which does not exist
	// yet: it finds it here once New has returned. AutoRelay may ask
	// before (a node that knows it is private starts it inside New).
	var built atomic.Pointer[host.Host]
	if o.relayClient {
		opts = append(opts, libp2p.EnableRelay())
		if len(o.staticRelays) > 0 {
			opts = append(opts, libp2p.EnableAutoRelayWithStaticRelays(o.staticRelays, autorelayOpts...))
		} else {
			opts = append(opts, libp2p.EnableAutoRelayWithPeerSource(func(_ context.Context, n int) <-chan peer.AddrInfo {
				if p := built.Load(); p != nil {
					return connectedPeers(*p, n)
				}
				return connectedPeers(nil, n)
			}, autorelayOpts...))
		}
	} else {
		opts = append(opts, libp2p.DisableRelay())
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		rm.Close()
		cm.Close()
		return nil, nil, fmt.Errorf("libp2p host: %w", err)
	}
	built.Store(&h)
	closers := []func() error{h.Close}
	closeAll := func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		return errors.Join(errs...)
	}
	if err := checkListening(h, o.listen); err != nil {
		return nil, nil, errors.Join(err, closeAll())
	}
	if o.relayService == RelayOn {
		r, err := relayv2.New(h, relayv2.WithLimit(nil))
		if err != nil {
			return nil, nil, errors.Join(fmt.Errorf("relay service: %w", err), closeAll())
		}
		closers = append(closers, r.Close)
	}
	log.Debug("host started", "addrs", h.Addrs())
	return h, closeAll, nil
}

// checkListening returns an error naming each configured address that got no
// listener, with the reason the bind failed (e.g. address already in use).
func checkListening(h host.Host, want []ma.Multiaddr) error {
	bound := h.Network().ListenAddresses()
	for _, w := range want {
		if listenMatches(w, bound) {
			continue
		}
		// Bind again to learn why the first bind failed: the swarm's
		// Listen formats its errors as text, AddListenAddr returns them.
		var err error
		if s, ok := h.Network().(*swarm.Swarm); ok {
			err = s.AddListenAddr(w)
		} else {
			err = h.Network().Listen(w)
		}
		if err == nil {
			continue
		}
		return fmt.Errorf("listen %s: %w", w, err)
	}
	return nil
}

// listenMatches says whether one of bound serves the configured address w.
// A configured port 0 matches any port of the same transport and IP.
func listenMatches(w ma.Multiaddr, bound []ma.Multiaddr) bool {
	wz := zeroPorts(w)
	for _, b := range bound {
		if b.Equal(w) || (wz.Equal(w) && zeroPorts(b).Equal(wz)) {
			return true
		}
	}
	return false
}

func zeroPorts(a ma.Multiaddr) ma.Multiaddr {
	var out ma.Multiaddr
	for _, c := range a {
		switch c.Protocol().Code {
		case ma.P_TCP, ma.P_UDP:
			z, err := ma.NewComponent(c.Protocol().Name, "0")
			if err != nil {
				return a
			}
			out = append(out, *z)
		default:
			out = append(out, c)
		}
	}
	return out
}

// connectedPeers feeds AutoRelay with relay candidates: the peers we are
// connected to that speak the circuit v2 hop protocol.
func connectedPeers(h host.Host, n int) <-chan peer.AddrInfo {
	out := make(chan peer.AddrInfo, n)
	defer close(out)
	if h == nil {
		return out
	}
	for _, p := range h.Network().Peers() {
		if len(out) == n {
			break
		}
		if ps, err := h.Peerstore().SupportsProtocols(p, circuitproto.ProtoIDv2Hop); err != nil || len(ps) == 0 {
			continue
		}
		out <- peer.AddrInfo{ID: p, Addrs: h.Peerstore().Addrs(p)}
	}
	return out
}

// TreatDocumentationRangesAsPublic makes this process take addresses in
// 198.51.100.0/24 and 203.0.113.0/24 (RFC 5737 documentation ranges) for
// public ones. The netns testnet's sealed "internet" uses them, and
// libp2p otherwise counts them unroutable: its AutoNAT, observed addresses
// and hole punching would never see a public address. For `neurod run
// --testnet` only; it changes go-multiaddr's process-wide tables.
func TreatDocumentationRangesAsPublic() {
	var keep []*net.IPNet
	for _, n := range manet.Unroutable4 {
		if s := n.String(); s != "198.51.100.0/24" && s != "203.0.113.0/24" {
			keep = append(keep, n)
		}
	}
	manet.Unroutable4 = keep
}
