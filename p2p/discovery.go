package p2p

import (
	"context"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/discovery"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
)

// topicPeersWanted is how many peers of a topic GossipSub's discovery
// makes up to for a topic short of peers: enough to fill a mesh (D_hi),
// not the whole network (its connector dials every one it gets).
const topicPeersWanted = 12

// topicPeersNew is how many candidates a topic short of mesh peers gets
// at least, however many of its peers are connected: some of those may
// be peers its mesh will not take (scored below zero, Sybils around a
// victim), and new ones keep it from being walled in by them.
const topicPeersNew = 3

// topicAdvertiseTTL is how long an advertisement of a topic every node
// joins is good for (it costs nothing; GossipSub asks again after it).
const topicAdvertiseTTL = time.Hour

// topicDiscovery is how GossipSub finds peers of a topic it is short of.
// The topics every node joins (routing, validation) need no rendezvous:
// every peer heard on the routing topic and every peer of the DHT's
// routing table (a neuro DHT server) is one, so they are drawn from those
// at random, without a lookup. The others (the ledger's, which only some
// nodes join) keep the rendezvous in the DHT, its answers bounded.
//
// GossipSub advertises each topic it joins in the DHT (a provide: a
// lookup and twenty records) and looks it up whenever a topic's mesh is
// short (every second until it is not): in a simulated network of 200
// nodes those were the busiest keys of the DHT, every lookup answered
// with hundreds of provider records, and each answer dialled in full.
type topicDiscovery struct {
	dht discovery.Discovery
	// candidates lists peers that join every topic, with addresses where
	// known.
	candidates func() []peer.AddrInfo
	// topicPeers, if not nil, lists the connected peers of a topic.
	// GossipSub asks for peers every second while a topic's mesh is
	// short of D_lo, also when it is connected to plenty of the topic's
	// peers and only waits to graft them (or they are in their prune
	// backoff): candidates make up the connected peers to
	// topicPeersWanted, and are topicPeersNew at least (measured: in a
	// simulated network of 300 nodes, 12 dials a second for each of a few
	// hundred asks a minute, the connections then trimmed again, a fifth
	// of all dials).
	topicPeers func(topic string) []peer.ID
	// count, if not nil, counts FindPeers.
	count *atomic.Uint64
}

// everyNodeTopic reports whether namespace ns (GossipSub's "floodsub:" +
// topic) is a topic every neuro node joins.
func everyNodeTopic(ns string) bool {
	return ns == "floodsub:"+neuropb.TopicRouting || ns == "floodsub:"+neuropb.TopicValidation
}

// Advertise implements discovery.Advertiser.
func (d topicDiscovery) Advertise(ctx context.Context, ns string, opts ...discovery.Option) (time.Duration, error) {
	if everyNodeTopic(ns) {
		return topicAdvertiseTTL, nil
	}
	return d.dht.Advertise(ctx, ns, opts...)
}

// FindPeers implements discovery.Discoverer.
func (d topicDiscovery) FindPeers(ctx context.Context, ns string, opts ...discovery.Option) (<-chan peer.AddrInfo, error) {
	if d.count != nil {
		d.count.Add(1)
	}
	var o discovery.Options
	if err := o.Apply(opts...); err != nil {
		return nil, err
	}
	limit := topicPeersWanted
	if o.Limit > 0 {
		limit = min(limit, o.Limit)
	}
	if !everyNodeTopic(ns) {
		return d.dht.FindPeers(ctx, ns, append(opts, discovery.Limit(limit))...)
	}
	var have map[peer.ID]bool
	if d.topicPeers != nil {
		have = map[peer.ID]bool{}
		for _, id := range d.topicPeers(strings.TrimPrefix(ns, "floodsub:")) {
			have[id] = true
		}
	}
	peers := slices.DeleteFunc(d.candidates(), func(ai peer.AddrInfo) bool { return have[ai.ID] })
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	peers = peers[:min(max(limit-len(have), min(limit, topicPeersNew)), len(peers))]
	ch := make(chan peer.AddrInfo, len(peers))
	for _, p := range peers {
		ch <- p
	}
	close(ch)
	return ch, nil
}

// topicCandidates lists the peers heard on the routing topic and those of
// the DHT's routing table (addresses from the peerstore), once each,
// without this host.
func (h *Host) topicCandidates() []peer.AddrInfo {
	seen := map[peer.ID]bool{h.host.ID(): true}
	var out []peer.AddrInfo
	for _, e := range h.peers.Snapshot(time.Now()) {
		if !seen[e.ID] {
			seen[e.ID] = true
			out = append(out, peer.AddrInfo{ID: e.ID, Addrs: e.Addrs})
		}
	}
	for _, id := range h.dht.RoutingTable().ListPeers() {
		if !seen[id] {
			seen[id] = true
			out = append(out, h.host.Peerstore().PeerInfo(id))
		}
	}
	return out
}

// topicPeers lists the connected peers of topic (none before GossipSub
// has started).
func (h *Host) topicPeers(topic string) []peer.ID {
	if h.ps == nil {
		return nil
	}
	return h.ps.ListPeers(topic)
}
