package p2p

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	neuropb "github.com/neuro-p2p/neuro/proto"
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
	addrs := h.host.Addrs()
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
		}
		if rcv.At.Sub(lastPrune) > h.cfg.PeerExpiry {
			h.peers.Prune(rcv.At)
			lastPrune = rcv.At
		}
	}
}
