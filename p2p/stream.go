package p2p

import (
	"context"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// DirectWait is how long NewStream waits for a direct connection to a
// peer it reaches only through a relay before it uses the relayed one:
// hole punching takes a round trip or two after DCUtR's first direct dial
// (up to 2 s), and fails sooner where it cannot work.
const DirectWait = 10 * time.Second

// NewStream opens a stream to p, preferring a direct connection: when the
// only connection is relayed (a home behind NAT), it waits up to
// DirectWait for hole punching to open a direct one, and only then sends
// the stream through the relay. Every neuro protocol opens its streams
// here, so that two homes talk directly where their NATs allow and still
// talk where they do not.
func NewStream(ctx context.Context, h host.Host, p peer.ID, pids ...protocol.ID) (network.Stream, error) {
	dctx := network.WithDialPeerTimeout(ctx, DirectWait)
	st, err := h.NewStream(dctx, p, pids...)
	if err == nil || ctx.Err() != nil || !limitedOnly(h, p) {
		return st, err
	}
	st, lerr := h.NewStream(network.WithAllowLimitedConn(ctx, "neuro: no direct connection"), p, pids...)
	if lerr != nil {
		return nil, fmt.Errorf("%w (directly: %w)", lerr, err)
	}
	return st, nil
}

// limitedOnly says whether every open connection to p is limited
// (relayed).
func limitedOnly(h host.Host, p peer.ID) bool {
	conns := h.Network().ConnsToPeer(p)
	for _, c := range conns {
		if !c.Stat().Limited {
			return false
		}
	}
	return len(conns) > 0
}
