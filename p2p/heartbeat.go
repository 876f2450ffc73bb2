package p2p

import (
	"context"
	"errors"
	"fmt"
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

// publishHeartbeats publishes a heartbeat at once and then every interval
// until ctx ends.
func (h *Host) publishHeartbeats(ctx context.Context) {
	t := time.NewTicker(h.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		h.hbMu.Lock()
		hb := h.heartbeat(time.Now())
		h.hbMu.Unlock()
		if err := h.routing.Publish(ctx, hb); err != nil && ctx.Err() == nil {
			h.log.Warn("publish heartbeat", "err", err)
		}
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
