package expert

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/neuro-p2p/neuro/p2p"
)

// p2pCluster starts n p2p hosts on loopback (DHT servers, fast heartbeat)
// that know only the first one, and waits (bounded) until each has every
// other in its routing table. (testnet's cluster builds whole nodes, which
// import this package.)
func p2pCluster(t *testing.T, ctx context.Context, n int) []*p2p.Host {
	t.Helper()
	cfg := p2p.Config{
		Listen:            []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/0")},
		BootstrapTimeout:  10 * time.Second,
		DHTMode:           p2p.DHTServer,
		RelayService:      p2p.RelayOff,
		Limits:            p2p.Limits{ConnsLow: 16, ConnsHigh: 64, ConnsGrace: time.Minute, MaxConns: 128, MaxStreams: 1024, MaxMemory: 1 << 30},
		HeartbeatInterval: time.Second,
		PeerTableSize:     64,
		PeerExpiry:        10 * time.Second,
	}
	var hs []*p2p.Host
	for i := range n {
		key, _, _ := crypto.GenerateEd25519Key(nil)
		h, err := p2p.New(key, cfg, p2p.WithLogger(quiet()))
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
			t.Fatal("cluster did not converge")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
