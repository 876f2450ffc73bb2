package simnet_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/x/rate"

	"github.com/neuro-p2p/neuro/testnet/simnet"
)

func newHost(t *testing.T, n *simnet.Network, opts ...libp2p.Option) host.Host {
	t.Helper()
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(rcmgr.DefaultLimits.AutoScale()), rcmgr.WithConnRateLimiters(&rate.Limiter{}))
	if err != nil {
		t.Fatal(err)
	}
	// A dial may take as long as the test allows: on a loaded machine
	// (the race detector, other tests) thirty handshakes at once take
	// seconds, and what is tested is that they all succeed, not how fast.
	opts = append(opts, libp2p.ListenAddrs(n.Addr()), libp2p.Transport(n.Transport()), libp2p.ResourceManager(rm),
		libp2p.WithDialTimeout(time.Minute))
	h, err := libp2p.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func TestManyHostsConnectAtOnce(t *testing.T) {
	n := simnet.New(nil)
	a := newHost(t, n)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	errs := make(chan error, 30)
	for range 30 {
		b := newHost(t, n)
		go func() { errs <- b.Connect(ctx, peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}) }()
	}
	for range 30 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// Two hosts connect, and the connection's dialing side has the dialer's
// listen address, so that what peers observe of it can be dialed.
func TestHostsConnect(t *testing.T) {
	n := simnet.New(nil)
	a, b := newHost(t, n), newHost(t, n)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
		t.Fatal(err)
	}
	conns := b.Network().ConnsToPeer(a.ID())
	if len(conns) != 1 || !conns[0].RemoteMultiaddr().Equal(a.Addrs()[0]) {
		t.Fatalf("b sees a at %v, a listens on %v", conns, a.Addrs())
	}
}

// DialCallers counts a dial under the function that asked for it, the
// first outside go-libp2p, and not a connect that found a connection.
func TestDialCallers(t *testing.T) {
	n := simnet.New(nil)
	d := simnet.NewDialCallers()
	a, b, c := newHost(t, n, libp2p.ConnectionGater(d)), newHost(t, n), newHost(t, n)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, to := range []host.Host{b, b, c} {
		if err := a.Connect(ctx, peer.AddrInfo{ID: to.ID(), Addrs: to.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	if err := connectFrom(ctx, a, b); err != nil { // connected: no dial
		t.Fatal(err)
	}
	want := []simnet.Caller{{Caller: "testnet/simnet_test.TestDialCallers", Dials: 2}}
	if got := d.Counts(); !slices.Equal(got, want) {
		t.Fatalf("Counts = %v, want %v", got, want)
	}
	a.Network().ClosePeer(b.ID())
	done := make(chan error, 1)
	go func() { done <- connectFrom(ctx, a, b) }() // a goroutine's dial
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want = append(want, simnet.Caller{Caller: "testnet/simnet_test.connectFrom", Dials: 1})
	if got := d.Counts(); !slices.Equal(got, want) {
		t.Fatalf("Counts = %v, want %v", got, want)
	}
}

func connectFrom(ctx context.Context, a, b host.Host) error {
	return a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()})
}
