// Package p2ptest starts p2p hosts on loopback for the tests of packages
// below node (testnet's cluster builds whole nodes, which import them).
// ClusterWithExtras gives each host a heartbeat contribution (Extra) that a
// test sets once it has built the service that makes it.
package p2ptest

import (
	"context"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
)

// Config is a loopback host config: TCP on 127.0.0.1, DHT server, no NAT
// services, a heartbeat every interval.
func Config(interval time.Duration) p2p.Config {
	return p2p.Config{
		Listen:            []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/0")},
		BootstrapTimeout:  10 * time.Second,
		DHTMode:           p2p.DHTServer,
		RelayService:      p2p.RelayOff,
		Limits:            p2p.Limits{ConnsLow: 16, ConnsHigh: 64, ConnsGrace: time.Minute, MaxConns: 128, MaxStreams: 1024, MaxMemory: 1 << 30},
		HeartbeatInterval: interval,
		PeerTableSize:     64,
		PeerExpiry:        10 * interval,
	}
}

// Cluster starts n hosts with cfg that know only the first one, closes
// them at the end of the test, and waits (bounded by ctx) until each has
// every other in its DHT routing table.
func Cluster(t testing.TB, ctx context.Context, n int, cfg p2p.Config) []*p2p.Host {
	t.Helper()
	hs, _ := ClusterWithExtras(t, ctx, n, cfg)
	return hs
}

// Extra is a host's heartbeat contribution that a test sets once the
// service that makes it is built on the started host (a node passes its
// own to p2p.WithHeartbeatExtra when it builds the host).
type Extra struct {
	f atomic.Pointer[func(*neuropb.Heartbeat)]
}

// Set makes f the contribution.
func (e *Extra) Set(f func(*neuropb.Heartbeat)) { e.f.Store(&f) }

func (e *Extra) fill(hb *neuropb.Heartbeat) {
	if f := e.f.Load(); f != nil {
		(*f)(hb)
	}
}

// ClusterWithExtras is Cluster whose host i adds extras[i] to its
// heartbeats.
func ClusterWithExtras(t testing.TB, ctx context.Context, n int, cfg p2p.Config) ([]*p2p.Host, []*Extra) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var hs []*p2p.Host
	var extras []*Extra
	for i := range n {
		key, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		x := &Extra{}
		extras = append(extras, x)
		h, err := p2p.New(key, cfg, p2p.WithLogger(log), p2p.WithHeartbeatExtra(x.fill))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
		if i == 0 {
			cfg.Bootstrap = []peer.AddrInfo{{ID: h.ID(), Addrs: h.Addrs()}}
		}
	}
	for {
		ok := true
		for _, h := range hs {
			ok = ok && len(h.RoutingTable()) == n-1
		}
		if ok {
			return hs, extras
		}
		select {
		case <-ctx.Done():
			t.Fatal("p2p cluster did not converge")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
