// Package p2ptest starts p2p hosts on loopback for the tests of packages
// below node (testnet's cluster builds whole nodes, which import them).
package p2ptest

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

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
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var hs []*p2p.Host
	for i := range n {
		key, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		h, err := p2p.New(key, cfg, p2p.WithLogger(log))
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
			return hs
		}
		select {
		case <-ctx.Done():
			t.Fatal("p2p cluster did not converge")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
