package p2p

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

func testConfig() Config {
	return Config{
		Listen:            []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/0"), ma.StringCast("/ip4/127.0.0.1/udp/0/quic-v1")},
		BootstrapTimeout:  10 * time.Second,
		DHTMode:           DHTServer,
		RelayService:      RelayOff,
		RelayClient:       true,
		HolePunching:      true,
		Limits:            Limits{ConnsLow: 16, ConnsHigh: 64, ConnsGrace: time.Minute, MaxConns: 128, MaxStreams: 1024, MaxMemory: 256 << 20},
		HeartbeatInterval: 200 * time.Millisecond,
		PeerTableSize:     64,
		PeerExpiry:        5 * time.Second,
	}
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newTestHost(t *testing.T, cfg Config) *Host { return newTestHostOpts(t, cfg) }

func newTestHostOpts(t *testing.T, cfg Config, opts ...Option) *Host {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(key, cfg, append([]Option{WithLogger(quietLogger())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	if err := h.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	return h
}

// rogue is a bare libp2p host with a GossipSub router that runs none of
// neuro's validators, to send what an honest node never would.
type rogue struct {
	h     host.Host
	topic *pubsub.Topic
}

func newRogue(t *testing.T, target *Host, sign bool) *rogue {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	policy := pubsub.StrictSign
	if !sign {
		policy = pubsub.StrictNoSign
	}
	ps, err := pubsub.NewGossipSub(t.Context(), h, pubsub.WithMessageSignaturePolicy(policy))
	if err != nil {
		t.Fatal(err)
	}
	topic, err := ps.Join(neuropb.TopicRouting)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Connect(t.Context(), peer.AddrInfo{ID: target.ID(), Addrs: target.Addrs()}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool { return len(topic.ListPeers()) > 0 }, "rogue to see the target on the topic")
	return &rogue{h: h, topic: topic}
}

// waitUntil polls cond every 20 ms, for at most 10 s.
func waitUntil(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestGossipRejections(t *testing.T) {
	target := newTestHost(t, testConfig())
	signed := newRogue(t, target, true)
	unsigned := newRogue(t, target, false)

	_, otherPub, _ := crypto.GenerateEd25519Key(nil)
	other, _ := peer.IDFromPublicKey(otherPub)
	forged, _ := proto.Marshal(&neuropb.Heartbeat{PeerId: []byte(other), Seq: 1})
	honest, _ := proto.Marshal(&neuropb.Heartbeat{PeerId: []byte(signed.h.ID()), Seq: 1})

	tests := []struct {
		name   string
		from   *rogue
		data   []byte
		reason string
	}{
		{"unsigned", unsigned, honest, "pubsub:" + pubsub.RejectMissingSignature},
		{"oversize", signed, make([]byte, neuropb.MaxHeartbeatSize+1), RejectOversize},
		{"malformed", signed, []byte{0x0a, 0xff, 0xff}, RejectMalformed},
		{"forged peer id", signed, forged, RejectInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := target.Rejections().Count(neuropb.TopicRouting, tc.reason)
			if err := tc.from.topic.Publish(t.Context(), tc.data); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, func() bool {
				return target.Rejections().Count(neuropb.TopicRouting, tc.reason) > before
			}, "the rejection to be counted as "+tc.reason)
		})
	}
	// None of it reached the peer table.
	if _, ok := target.Peers().Get(other, time.Now()); ok {
		t.Error("forged heartbeat entered the peer table")
	}
	if _, ok := target.Peers().Get(unsigned.h.ID(), time.Now()); ok {
		t.Error("unsigned heartbeat entered the peer table")
	}
	// A valid, signed heartbeat from the same rogue is accepted.
	if err := signed.topic.Publish(t.Context(), honest); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool { _, ok := target.Peers().Get(signed.h.ID(), time.Now()); return ok },
		"a valid heartbeat to be accepted")
}

func TestHeartbeatsReachPeers(t *testing.T) {
	a := newTestHost(t, testConfig())
	cfg := testConfig()
	cfg.Roles = []neuropb.Role{neuropb.Role_ROLE_EXPERT}
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.Addrs()}}
	hosted := &neuropb.HostedModel{Model: []byte{1, 0x55, 0x12, 0x20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
		17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32}, Experts: []uint32{1<<16 | 3, 2}}
	b := newTestHostOpts(t, cfg, WithHeartbeatExtra(func(hb *neuropb.Heartbeat) {
		hb.Hosted = []*neuropb.HostedModel{hosted}
		hb.Capacity = &neuropb.Capacity{QueueDepth: 4, TokensPerSecond: 120}
	}))
	waitUntil(t, func() bool { _, ok := a.Peers().Get(b.ID(), time.Now()); return ok }, "a to hear b")
	e, _ := a.Peers().Get(b.ID(), time.Now())
	if len(e.Roles) != 1 || e.Roles[0] != neuropb.Role_ROLE_EXPERT || e.Version != Version || len(e.Addrs) == 0 {
		t.Fatalf("heard %+v", e)
	}
	if e.Load == nil || e.Load.GetPeers() == 0 {
		t.Fatalf("load = %v", e.Load)
	}
	if len(e.Hosted) != 1 || len(e.Hosted[0].GetExperts()) != 2 || e.Capacity.GetQueueDepth() != 4 {
		t.Fatalf("hosted %v, capacity %v", e.Hosted, e.Capacity)
	}
	waitUntil(t, func() bool { return len(a.RoutingTable()) == 1 && len(b.RoutingTable()) == 1 }, "routing tables")
}

func TestListenPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	cfg := testConfig()
	// QUIC binds fine, so libp2p alone would start on it and say nothing.
	cfg.Listen = []ma.Multiaddr{ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)), ma.StringCast("/ip4/127.0.0.1/udp/0/quic-v1")}
	key, _, _ := crypto.GenerateEd25519Key(nil)
	h, err := New(key, cfg, WithLogger(quietLogger()))
	if err == nil {
		h.Close()
		t.Fatal("started on a port in use")
	}
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), fmt.Sprintf("/tcp/%d", port)) {
		t.Fatalf("error = %v, want EADDRINUSE naming the address", err)
	}
}

func TestBootstrapUnreachable(t *testing.T) {
	// A port that refuses connections: bind, note the port, close.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	_, pub, _ := crypto.GenerateEd25519Key(nil)
	id, _ := peer.IDFromPublicKey(pub)
	cfg := testConfig()
	cfg.BootstrapTimeout = 500 * time.Millisecond
	cfg.Bootstrap = []peer.AddrInfo{{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port))}}}
	key, _, _ := crypto.GenerateEd25519Key(nil)
	h, err := New(key, cfg, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	err = h.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "bootstrap: none of 1 peers reachable") || !strings.Contains(err.Error(), id.String()) {
		t.Fatalf("error = %v", err)
	}
}

func TestCloseTwice(t *testing.T) {
	key, _, _ := crypto.GenerateEd25519Key(nil)
	h, err := New(key, testConfig(), WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestListenMatches(t *testing.T) {
	bound := []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/4321"), ma.StringCast("/ip4/127.0.0.1/udp/999/quic-v1")}
	tests := []struct {
		want string
		ok   bool
	}{
		{"/ip4/127.0.0.1/tcp/0", true},
		{"/ip4/127.0.0.1/tcp/4321", true},
		{"/ip4/127.0.0.1/tcp/4322", false},
		{"/ip4/127.0.0.1/udp/0/quic-v1", true},
		{"/ip4/127.0.0.2/tcp/0", false},
		{"/ip4/127.0.0.1/udp/0/webrtc-direct", false},
	}
	for _, tc := range tests {
		if got := listenMatches(ma.StringCast(tc.want), bound); got != tc.ok {
			t.Errorf("listenMatches(%s) = %v, want %v", tc.want, got, tc.ok)
		}
	}
}

// With a heartbeat rate, a node's interval stretches with the peers it
// hears (and says so in its heartbeats); without, it stays put. GossipSub
// traffic is counted both ways.
func TestHeartbeatIntervalStretchesWithThePeersHeard(t *testing.T) {
	cfg := testConfig()
	cfg.HeartbeatRate = 2 // two heartbeats a second, network-wide
	a := newTestHost(t, cfg)
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.Addrs()}}
	b := newTestHost(t, cfg)
	c := newTestHost(t, cfg)
	for _, h := range []*Host{a, b, c} {
		waitUntil(t, func() bool { n, _ := h.Peers().Stats(time.Now()); return n == 2 }, "every host to hear the two others")
	}
	// Three nodes at two a second: 1.5 s each, above the 200 ms set.
	if d := a.interval(time.Now()); d != 1500*time.Millisecond {
		t.Fatalf("interval %v, want 1.5s", d)
	}
	waitUntil(t, func() bool {
		e, ok := b.Peers().Get(a.ID(), time.Now())
		// Kept for the longer of the ttl (5 s) and three of a's intervals.
		return ok && e.Interval == 1500*time.Millisecond && e.Expiry == max(cfg.PeerExpiry, 4500*time.Millisecond)
	}, "b to hear a's stretched interval")
	// A newcomer counts the network by what its peers hear, until it
	// hears as many itself: five peers that hear 59 others each make 60
	// nodes, 30 s at two a second.
	hb := &neuropb.Heartbeat{PeerId: []byte("x"), SentUnixMs: time.Now().UnixMilli(), PeersHeard: 59}
	for i := range 3 {
		a.peers.Observe(peer.ID(fmt.Sprint("big", i)), hb, time.Now())
	}
	if d := a.interval(time.Now()); d != 30*time.Second {
		t.Fatalf("with peers hearing 59: interval %v, want 30s", d)
	}
	fixed := testConfig()
	if d := (&Host{cfg: fixed, peers: a.peers}).interval(time.Now()); d != fixed.HeartbeatInterval {
		t.Fatalf("no rate: interval %v, want %v", d, fixed.HeartbeatInterval)
	}
	tr := a.Traffic()
	if tr.RPCsIn == 0 || tr.RPCsOut == 0 || tr.MsgsIn == 0 || tr.MsgsOut == 0 || tr.BytesIn <= tr.ControlIn || tr.BytesOut <= tr.ControlOut {
		t.Fatalf("traffic %+v", tr)
	}
}

// A bootstrap peer too busy to answer the DHT's liveness check (here: it
// never answers a DHT request) is still in a new node's routing table as
// soon as Start returns: without it the node knows no DHT peer and finds
// nothing until the DHT's own retry, minutes later.
func TestBusyBootstrapPeerSeedsTheRoutingTable(t *testing.T) {
	a := newTestHost(t, testConfig())
	a.host.SetStreamHandler(dhtProtocol, func(s network.Stream) {
		<-t.Context().Done()
		s.Reset()
	})
	cfg := testConfig()
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.Addrs()}}
	b := newTestHost(t, cfg)
	if rt := b.RoutingTable(); len(rt) != 1 || rt[0] != a.ID() {
		t.Fatalf("routing table %v after Start, want the bootstrap peer %s", rt, a.ID())
	}
}

// The same on the bootstrap node's side: a node that dials it but is too
// busy to answer the DHT's check (here: it never answers) is left out of
// the bootstrap node's routing table, which then holds no DHT peer at all,
// until maintain's next round takes the connected DHT servers.
func TestBusyPeerOfABootstrapNodeSeedsItsRoutingTable(t *testing.T) {
	a := newTestHost(t, testConfig())
	b := newTestHost(t, testConfig())
	b.host.SetStreamHandler(dhtProtocol, func(s network.Stream) {
		<-t.Context().Done()
		s.Reset()
	})
	if err := b.host.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool {
		ok, _ := a.host.Peerstore().SupportsProtocols(b.ID(), dhtProtocol)
		return len(ok) > 0
	}, "the bootstrap node to learn that the peer serves the DHT")
	if rt := a.RoutingTable(); len(rt) != 0 {
		t.Fatalf("routing table %v before the peer answered the DHT's check", rt)
	}
	a.reseed(t.Context())
	if rt := a.RoutingTable(); len(rt) != 1 || rt[0] != b.ID() {
		t.Fatalf("routing table %v after reseed, want the connected peer %s", rt, b.ID())
	}
}

// A node that says what it knows of its reachability has it at once: a
// home behind NAT need not wait for AutoNAT's first probe (15 s) to
// reserve relay slots.
func TestKnownReachability(t *testing.T) {
	for _, c := range []struct {
		reach Reach
		want  neuropb.Reachability
	}{{ReachPrivate, neuropb.Reachability_REACHABILITY_PRIVATE}, {ReachPublic, neuropb.Reachability_REACHABILITY_PUBLIC}} {
		cfg := testConfig()
		cfg.AutoNAT = true
		cfg.Reachability = c.reach
		h := newTestHost(t, cfg)
		waitUntil(t, func() bool { return h.Reachability() == c.want }, fmt.Sprintf("reachability %v", c.want))
	}
}

// A node chooses what to host once it has heard most of the network: a
// newcomer told by its peers that they hear 59 others waits for 90% of
// them, or one and a half of the network's intervals; one that has heard
// no one waits one configured interval, as it may be alone.
func TestPeersHeard(t *testing.T) {
	for _, c := range []struct {
		heard, median int
		ran, current  time.Duration
		want          bool
	}{
		{0, 0, 0, time.Second, false},
		{0, 0, 5 * time.Second, time.Second, true},
		{1, 0, 0, time.Second, true},
		{3, 59, 2 * time.Second, 30 * time.Second, false},
		{52, 59, 20 * time.Second, 30 * time.Second, false},
		{54, 59, 20 * time.Second, 30 * time.Second, true},
		{3, 59, 45 * time.Second, 30 * time.Second, true},
		{3, 59, 44 * time.Second, 30 * time.Second, false},
	} {
		if got := peersHeard(c.heard, c.median, 0.9, c.ran, 5*time.Second, c.current); got != c.want {
			t.Errorf("heard %d of %d after %v (interval %v): %v, want %v", c.heard, c.median, c.ran, c.current, got, c.want)
		}
	}
	// A node that hears its only peer stops waiting then, long before its
	// own (here 10 s) interval.
	cfg := testConfig()
	a := newTestHost(t, cfg)
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.Addrs()}}
	cfg.HeartbeatInterval = 10 * time.Second
	b := newTestHost(t, cfg)
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Second)
	defer cancel()
	b.AwaitPeers(ctx, 0.9)
	if ctx.Err() != nil {
		t.Fatal("AwaitPeers did not return with the only peer heard")
	}
	if n, _ := b.Peers().Stats(time.Now()); n != 1 {
		t.Fatalf("AwaitPeers returned with %d peers heard, want 1", n)
	}
}

// A node that leaves is forgotten by its peers at once, not after a few
// of its heartbeat intervals.
func TestLeaveRemovesTheNodeFromItsPeersTables(t *testing.T) {
	cfg := testConfig()
	cfg.PeerExpiry = time.Hour
	a := newTestHost(t, cfg)
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.Addrs()}}
	b := newTestHost(t, cfg)
	waitUntil(t, func() bool { _, ok := a.Peers().Get(b.ID(), time.Now()); return ok }, "a to hear b")
	waitUntil(t, func() bool { return len(a.ps.ListPeers(neuropb.TopicRouting)) == 1 }, "a and b to share the routing topic")
	if err := b.Leave(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, func() bool { _, ok := a.Peers().Get(b.ID(), time.Now()); return !ok }, "a to forget b")
}
