package p2p

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Provide announces in the DHT that this node serves c. The DHT
// re-announces provider records on its own schedule while the node runs.
func (h *Host) Provide(ctx context.Context, c cid.Cid) error {
	h.provides.Add(1)
	if err := h.dht.Provide(ctx, c, true); err != nil {
		return fmt.Errorf("provide %s: %w", c, err)
	}
	return nil
}

// RoutingTableSize is how many peers the DHT routing table holds.
func (h *Host) RoutingTableSize() int { return h.dht.RoutingTable().Size() }

// NetworkSize is how many nodes this one counts in the network, itself
// included: the peers it hears on the routing topic, or the median of the
// counts they announce when that is more (a node that has just joined
// hears few of them yet).
func (h *Host) NetworkSize() int {
	heard, median := h.peers.Stats(time.Now())
	return max(heard, median) + 1
}

// Provision is when a key was last provided, and how large the network
// was then (Host.NetworkSize).
type Provision struct {
	At      time.Time
	Network int
}

// Due reports whether a key provided as p is to be provided again at now,
// in a network of size nodes: every interval, and as soon as the network
// has grown reprovideGrowth times since. A record goes to the peers
// closest to the key in the network of the day; provided while the
// network was small (the first node of a network provides to nobody, or
// to the few peers there are), it sits on peers that a lookup in today's
// larger network does not reach, and would stay there until the next
// interval (measured: in a simulated network of 300 nodes, shards
// provided by the first node could not be found by the others). The
// network's size, not the routing table's: a node that joins a large
// network fills its table from two peers to sixty in its first seconds,
// and provided everything again at each doubling (testnet sim, 200 nodes
// under churn: twenty provides a second, each a lookup and twenty dials,
// most of the network's handshakes).
func (p Provision) Due(now time.Time, size int, interval time.Duration) bool {
	return p.At.IsZero() || now.Sub(p.At) >= interval || size >= reprovideGrowth*max(1, p.Network)
}

// reprovideGrowth is how many times the network grows before a key is
// provided again. Of the K (20) peers closest to a key in a network grown
// g times, about K/g are among the K that held its record before (the
// closest of a larger set include the closest of a subset in proportion):
// 5 at 4 times, enough for a lookup, which asks all K. At 2 (until
// 2026-12-02), a network starting from nothing provided every key again
// at each doubling, eight times on the way to 300 nodes: in a simulated
// network of 200, 15 to 54 provides a second for the first minute after
// it was healthy, two cores busy.
const reprovideGrowth = 4

// providerCacheTTL is how long FindProviders reuses a lookup's answer.
const providerCacheTTL = time.Minute

type providerEntry struct {
	peers []peer.AddrInfo
	at    time.Time
}

// providerCache remembers recent provider lookups.
type providerCache struct {
	mu sync.Mutex
	m  map[cid.Cid]providerEntry
}

// FindProviders returns up to n peers that provide c, from a lookup
// bounded by timeout, or from a lookup of the last minute that found any.
func (h *Host) FindProviders(ctx context.Context, c cid.Cid, n int, timeout time.Duration) ([]peer.AddrInfo, error) {
	h.provCache.mu.Lock()
	if e, ok := h.provCache.m[c]; ok && time.Since(e.at) < providerCacheTTL && len(e.peers) >= n {
		h.provCache.mu.Unlock()
		return e.peers[:n], nil
	}
	h.provCache.mu.Unlock()
	h.providerLookups.Add(1)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var out []peer.AddrInfo
	for ai := range h.dht.FindProvidersAsync(ctx, c, n) {
		out = append(out, ai)
	}
	if len(out) == 0 {
		if err := ctx.Err(); err != nil && ctx.Err() != context.DeadlineExceeded {
			return nil, fmt.Errorf("find providers of %s: %w", c, err)
		}
		return nil, nil
	}
	h.provCache.mu.Lock()
	if h.provCache.m == nil {
		h.provCache.m = map[cid.Cid]providerEntry{}
	}
	h.provCache.m[c] = providerEntry{peers: out, at: time.Now()}
	h.provCache.mu.Unlock()
	return out, nil
}
