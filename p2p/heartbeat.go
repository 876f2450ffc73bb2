package p2p

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/neuro-p2p/neuro/neuropb"
)

// validateHeartbeat is the routing topic's validator: the fields must be in
// bounds and the heartbeat must speak for its signer, so that no peer can
// announce roles or addresses for another.
func validateHeartbeat(_ context.Context, author peer.ID, hb *neuropb.Heartbeat) error {
	if err := hb.Validate(); err != nil {
		return err
	}
	if id, _ := peer.IDFromBytes(hb.GetPeerId()); id != author {
		return fmt.Errorf("%w: heartbeat for %s signed by %s", neuropb.ErrInvalid, id, author)
	}
	return nil
}

// heartbeat builds this node's next heartbeat.
func (h *Host) heartbeat(now time.Time) *neuropb.Heartbeat {
	h.hbSeq++
	// Loopback addresses mean nothing to other machines (unless the node
	// has no other: a testnet on 127.0.0.1); public and relayed ones
	// first, so that a cap keeps what others can dial.
	var addrs, loop []ma.Multiaddr
	for _, a := range h.host.Addrs() {
		if manet.IsIPLoopback(a) {
			loop = append(loop, a)
		} else {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		addrs = loop
	}
	slices.SortStableFunc(addrs, func(a, b ma.Multiaddr) int { return addrRank(a) - addrRank(b) })
	if len(addrs) > neuropb.MaxHeartbeatAddrs {
		addrs = addrs[:neuropb.MaxHeartbeatAddrs]
	}
	raw := make([][]byte, 0, len(addrs))
	for _, a := range addrs {
		if b := a.Bytes(); len(b) <= neuropb.MaxAddrLen {
			raw = append(raw, b)
		}
	}
	streams := 0
	for _, c := range h.host.Network().Conns() {
		streams += len(c.GetStreams())
	}
	hb := &neuropb.Heartbeat{
		PeerId:     []byte(h.host.ID()),
		Seq:        h.hbSeq,
		SentUnixMs: now.UnixMilli(),
		Roles:      h.cfg.Roles,
		UptimeS:    uint64(now.Sub(h.started).Seconds()),
		Load: &neuropb.Load{
			Peers:         uint32(len(h.host.Network().Peers())),
			Streams:       uint32(streams),
			CpuLoad1Centi: readLoad1Centi(),
			RssBytes:      ProcessRSS(),
		},
		Version:      Version,
		Addrs:        raw,
		Reachability: h.Reachability(),
	}
	heard, median := h.peers.Stats(now)
	hb.IntervalMs, hb.PeersHeard = uint32(h.intervalFor(heard, median).Milliseconds()), uint32(heard)
	if h.hbExtra != nil {
		h.hbExtra(hb)
	}
	return hb
}

// addrRank orders a heartbeat's addresses: public, relayed, the rest.
func addrRank(a ma.Multiaddr) int {
	switch {
	case manet.IsPublicAddr(a) && !isCircuit(a):
		return 0
	case isCircuit(a):
		return 1
	}
	return 2
}

func isCircuit(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_CIRCUIT)
	return err == nil
}

// interval is this node's heartbeat interval at now: the configured one,
// stretched to peers heard / HeartbeatRate when that is longer, so that a
// network's heartbeats add up to about HeartbeatRate a second whatever
// its size (each node's gossip load then stops growing with the network).
// The interval goes out in the heartbeat, and receivers forget a peer
// after MissedHeartbeats of its intervals.
//
// A node that has just joined hears the others only as they beat, one
// interval for all of them: until then it counts the network by the median
// of the counts its peers announce (peers_heard), so that it does not beat
// at a small network's interval for a minute (measured: in a simulated
// network of 200 nodes joining 4 a second, gossip per node was 3x what the
// rate allows). The median, so that a few peers cannot slow everyone's
// heartbeats; counts, not intervals, so that a shrinking network's
// intervals shrink with it.
func (h *Host) interval(now time.Time) time.Duration { return h.intervalFor(h.peers.Stats(now)) }

// intervalFor is interval with the peers heard and the median of their
// counts already read from the table.
func (h *Host) intervalFor(heard, median int) time.Duration {
	d := h.cfg.HeartbeatInterval
	if r := h.cfg.HeartbeatRate; r > 0 {
		d = max(d, time.Duration(float64(max(heard, median)+1)/r*float64(time.Second)))
	}
	return min(d, time.Duration(neuropb.MaxHeartbeatIntervalMs)*time.Millisecond)
}

// publishHeartbeats publishes a heartbeat at once and then every interval
// until ctx ends. Each wait is drawn from [interval/2, 3·interval/2]:
// nodes started together would otherwise beat together for ever, in
// bursts of the whole network's heartbeats (measured: 60 nodes beating
// within 6 s of each 12), where a spread keeps the rate even.
func (h *Host) publishHeartbeats(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	<-t.C
	for {
		now := time.Now()
		h.hbMu.Lock()
		if h.left.Load() { // Leave has said the last word
			h.hbMu.Unlock()
			return
		}
		hb := h.heartbeat(now)
		h.hbMu.Unlock()
		h.hbSent.Add(1)
		if err := h.routing.Publish(ctx, hb); err != nil && ctx.Err() == nil {
			h.log.Warn("publish heartbeat", "err", err)
		}
		d := time.Duration(hb.GetIntervalMs()) * time.Millisecond
		t.Reset(d/2 + rand.N(d))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// receiveHeartbeats feeds the peer table from the routing topic until ctx
// ends, and prunes it.
func (h *Host) receiveHeartbeats(ctx context.Context, sub *Subscription[*neuropb.Heartbeat]) {
	defer sub.Cancel()
	lastPrune := time.Now()
	for {
		rcv, err := sub.Next(ctx)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, context.Canceled) {
				h.log.Warn("routing subscription ended", "err", err)
			}
			return
		}
		if rcv.Author == h.host.ID() {
			continue
		}
		if h.peers.Observe(rcv.Author, rcv.Msg, rcv.At) {
			h.log.Debug("heartbeat", "peer", rcv.Author, "seq", rcv.Msg.GetSeq())
			// A heartbeat speaks for its signer: its addresses are the
			// freshest we have (a home's relay addresses appear in them once
			// it holds a reservation), for as long as the peer stays heard.
			if info, ok := h.peers.Get(rcv.Author, rcv.At); ok && len(info.Addrs) > 0 {
				h.host.Peerstore().AddAddrs(rcv.Author, info.Addrs, h.cfg.PeerExpiry)
			}
		}
		if rcv.At.Sub(lastPrune) > h.cfg.PeerExpiry {
			h.peers.Prune(rcv.At)
			lastPrune = rcv.At
		}
	}
}

// AwaitPeers waits until this node's peer table holds most of the network
// (share of the peers the others announce hearing), or until one and a
// half of the network's heartbeat intervals have passed since the host
// started (each peer has beaten by then), or ctx ends. A node that has
// heard no one waits one configured interval at most: it may be alone.
// It returns at once on a node that has run that long.
//
// A node that has just joined a large network hears the others only as
// they beat, one interval (40 s at 200 nodes) for all of them: what it
// chooses to host before then it chooses from a table of a few peers, at
// random in effect, and the network undid those choices with swaps
// (testnet sim, 200 nodes under 10%/min churn: 0.7 swaps a second, four
// per node joined, each a fetch and two provides).
func (h *Host) AwaitPeers(ctx context.Context, share float64) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		now := time.Now()
		heard, median := h.peers.Stats(now)
		if peersHeard(heard, median, share, now.Sub(h.started), h.cfg.HeartbeatInterval, h.intervalFor(heard, median)) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// peersHeard is AwaitPeers' test: after running for ran, a node that heard
// heard peers, whose peers announce hearing median, with its configured
// and its current heartbeat interval.
func peersHeard(heard, median int, share float64, ran, configured, current time.Duration) bool {
	if median == 0 {
		return heard > 0 || ran >= configured
	}
	return float64(heard) >= share*float64(median) || ran >= current*3/2
}
