package p2p

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// Loopback and private-network addresses are dialled TCP first, QUIC
// later; public ones in libp2p's order (QUIC first); relays last.
func TestRankDials(t *testing.T) {
	m := func(s string) ma.Multiaddr { return ma.StringCast(s) }
	delays := func(addrs ...string) map[string]time.Duration {
		var as []ma.Multiaddr
		for _, a := range addrs {
			as = append(as, m(a))
		}
		got := map[string]time.Duration{}
		prev := time.Duration(-1)
		for _, d := range rankDials(as) {
			got[d.Addr.String()] = d.Delay
			if d.Delay < prev {
				t.Errorf("%v: not in order of delay", addrs)
			}
			prev = d.Delay
		}
		if len(got) != len(addrs) {
			t.Errorf("%v ranked as %v: an address lost", addrs, got)
		}
		return got
	}
	for _, pair := range [][2]string{
		{"/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"},
		{"/ip4/192.168.1.7/tcp/4001", "/ip4/192.168.1.7/udp/4001/quic-v1"},
		{"/ip6/::1/tcp/4001", "/ip6/::1/udp/4001/quic-v1"},
	} {
		d := delays(pair[0], pair[1])
		if d[pair[0]] != 0 || d[pair[1]] != localQUICDelay {
			t.Errorf("local: %v, want TCP at once and QUIC after %v", d, localQUICDelay)
		}
	}
	pub := delays("/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/udp/4001/quic-v1")
	if pub["/ip4/1.2.3.4/udp/4001/quic-v1"] != 0 || pub["/ip4/1.2.3.4/tcp/4001"] <= 0 {
		t.Errorf("public: %v, want QUIC first (libp2p's order)", pub)
	}
	// A home: public QUIC first as libp2p has it, its LAN address TCP first;
	// the relay address after both.
	home := delays("/ip4/1.2.3.4/udp/4001/quic-v1", "/ip4/1.2.3.4/tcp/4001", "/ip4/10.0.0.2/tcp/4001", "/ip4/10.0.0.2/udp/4001/quic-v1",
		"/ip4/5.6.7.8/tcp/4001/p2p/12D3KooWSeFd1ztpG1apzhKsjQVyCs97TXgDugQvMuDmpKgALfPp/p2p-circuit")
	if home["/ip4/10.0.0.2/tcp/4001"] != 0 || home["/ip4/10.0.0.2/udp/4001/quic-v1"] != localQUICDelay ||
		home["/ip4/1.2.3.4/udp/4001/quic-v1"] != 0 || home["/ip4/1.2.3.4/tcp/4001"] <= 0 {
		t.Errorf("home: %v", home)
	}
	for a, d := range home {
		if isCircuit(m(a)) && d <= localQUICDelay {
			t.Errorf("relay %s dialled after %v, before the direct addresses had their turn", a, d)
		}
	}
	// Only QUIC, only TCP: unchanged.
	if d := delays("/ip4/127.0.0.1/udp/4001/quic-v1"); d["/ip4/127.0.0.1/udp/4001/quic-v1"] != 0 {
		t.Errorf("QUIC alone: %v", d)
	}
	if d := delays("/ip4/127.0.0.1/tcp/4001"); d["/ip4/127.0.0.1/tcp/4001"] != 0 {
		t.Errorf("TCP alone: %v", d)
	}
}

// Two nodes on one machine, each listening on TCP and QUIC, connect over
// TCP.
func TestLoopbackPeersConnectOverTCP(t *testing.T) {
	a, b := newTestHost(t, testConfig()), newTestHost(t, testConfig())
	if err := b.LibP2P().Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}); err != nil {
		t.Fatal(err)
	}
	conns := b.LibP2P().Network().ConnsToPeer(a.ID())
	if len(conns) == 0 {
		t.Fatal("no connection")
	}
	for _, c := range conns {
		if !isTCP(c.RemoteMultiaddr()) {
			t.Errorf("connected over %s, want TCP", c.RemoteMultiaddr())
		}
	}
}

// A bootstrap node listed once per address (as a config lists it) is
// dialled once with all of them: one connection, over TCP.
func TestBootstrapAddressesDialledTogether(t *testing.T) {
	a := newTestHost(t, testConfig())
	cfg := testConfig()
	for _, ad := range a.Addrs() {
		cfg.Bootstrap = append(cfg.Bootstrap, peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{ad}})
	}
	if len(cfg.Bootstrap) < 2 {
		t.Fatalf("a listens on %v, want TCP and QUIC", a.Addrs())
	}
	b := newTestHost(t, cfg)
	conns := b.LibP2P().Network().ConnsToPeer(a.ID())
	if len(conns) != 1 || !isTCP(conns[0].RemoteMultiaddr()) {
		var got []string
		for _, c := range conns {
			got = append(got, c.RemoteMultiaddr().String())
		}
		t.Errorf("connections to the bootstrap node: %v, want one over TCP", got)
	}
}
