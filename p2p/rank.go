package p2p

import (
	"cmp"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// rankDials is the host's dial ranker: libp2p's (swarm.DefaultDialRanker),
// except that among a peer's loopback and private-network addresses TCP
// is dialled first and QUIC localQUICDelay later, where libp2p does the
// reverse, so that two nodes on one machine or one LAN talk over TCP.
// There the network costs little and the stack's own work per message
// decides an expert call's time: quic-go's per-packet work in user space
// (a 4 KB hidden state is four packets, each encrypted and sent by a
// goroutine of the connection's, then acknowledged) made a loopback round
// trip of the bench model's expert calls about twice what TCP's took (a
// layer's write and read ~0.4 ms each way against ~0.2 ms; 33-40 ms a
// token against 26-30 ms, two cores). Public addresses keep libp2p's
// order (QUIC first: one round trip less to connect, and the UDP hole
// punching of homes).
func rankDials(addrs []ma.Multiaddr) []network.AddrDelay {
	ranked := swarm.DefaultDialRanker(addrs)
	// When libp2p dials the first local TCP address, and the first local
	// QUIC one (-1: none).
	tcp0, quic0 := time.Duration(-1), time.Duration(-1)
	for _, d := range ranked {
		switch {
		case !local(d.Addr):
		case isTCP(d.Addr) && (tcp0 < 0 || d.Delay < tcp0):
			tcp0 = d.Delay
		case isQUIC(d.Addr) && (quic0 < 0 || d.Delay < quic0):
			quic0 = d.Delay
		}
	}
	if tcp0 < 0 || quic0 < 0 {
		return ranked
	}
	for i, d := range ranked {
		switch {
		case !local(d.Addr):
		case isTCP(d.Addr):
			// TCP's dials keep their spacing, starting when QUIC's did.
			ranked[i].Delay = d.Delay - tcp0 + quic0
		case isQUIC(d.Addr):
			ranked[i].Delay = d.Delay + localQUICDelay
		}
	}
	slices.SortStableFunc(ranked, func(a, b network.AddrDelay) int { return cmp.Compare(a.Delay, b.Delay) })
	return ranked
}

// localQUICDelay is how long a local QUIC dial waits for the TCP dial
// before it: a refused TCP dial starts it at once (the swarm dials the
// next address when one fails), so the wait only counts where TCP is
// filtered. libp2p's 30 ms for local addresses was too short on a loaded
// machine: a TCP handshake (Noise, yamux) under the race detector with
// CI's other tests took longer, and the QUIC connection won.
const localQUICDelay = 250 * time.Millisecond

// local: a direct loopback or private-network (RFC 1918, ULA) address.
func local(a ma.Multiaddr) bool {
	return !isCircuit(a) && (manet.IsIPLoopback(a) || manet.IsPrivateAddr(a))
}

func isTCP(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_TCP)
	return err == nil && !isCircuit(a)
}

func isQUIC(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_QUIC_V1)
	return err == nil
}
