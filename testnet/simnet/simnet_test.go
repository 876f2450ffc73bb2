package simnet_test

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/x/rate"

	"github.com/neuro-p2p/neuro/testnet/simnet"
)

func newHost(t *testing.T, n *simnet.Network) host.Host {
	t.Helper()
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(rcmgr.DefaultLimits.AutoScale()), rcmgr.WithConnRateLimiters(&rate.Limiter{}))
	if err != nil {
		t.Fatal(err)
	}
	// A dial may take as long as the test allows: on a loaded machine
	// (the race detector, other tests) thirty handshakes at once take
	// seconds, and what is tested is that they all succeed, not how fast.
	h, err := libp2p.New(libp2p.ListenAddrs(n.Addr()), libp2p.Transport(n.Transport()), libp2p.ResourceManager(rm),
		libp2p.WithDialTimeout(time.Minute))
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
