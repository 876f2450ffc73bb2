package p2p

import (
	"context"
	"fmt"
	"hash/fnv"
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
	return p.expired(now, interval) || p.outgrown(size)
}

// expired reports whether the key was never provided, or interval ago.
func (p Provision) expired(now time.Time, interval time.Duration) bool {
	return p.At.IsZero() || now.Sub(p.At) >= interval
}

// outgrown reports whether the network has grown reprovideGrowth times
// since the key was provided.
func (p Provision) outgrown(size int) bool { return size >= reprovideGrowth*max(1, p.Network) }

// Provisions remember when each key a node provides was last provided,
// and when the network was first seen grown reprovideGrowth times since:
// Due spreads the provides that growth calls for over time. Safe for
// concurrent use.
type Provisions struct {
	self peer.ID
	mu   sync.Mutex
	m    map[cid.Cid]provision
}

type provision struct {
	Provision
	// grew is when the network was first seen grown enough since At
	// (zero: not grown).
	grew time.Time
}

// NewProvisions returns the provisions of node self (self seeds the
// spread of its growth provides).
func NewProvisions(self peer.ID) *Provisions {
	return &Provisions{self: self, m: map[cid.Cid]provision{}}
}

// Get returns c's last provision (zero if never provided).
func (ps *Provisions) Get(c cid.Cid) Provision {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.m[c].Provision
}

// Set records that c was provided as p.
func (ps *Provisions) Set(c cid.Cid, p Provision) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.m[c] = provision{Provision: p}
}

// Due reports whether c is to be provided again at now, in a network of
// size nodes: if never provided, every interval, and once the network has
// grown reprovideGrowth times since, after GrowthDelay from the moment
// Due first saw it so grown. Without that delay every node of a network
// provided every key at the same moment whenever the network grew at a
// stroke (hundreds of Sybils joining, each announcing itself: in a
// simulated network of 100 nodes that 400 Sybils joined, 10 to 23
// provides a second for 40 s, some 250 dials a second, two cores busy and
// a user's prompt waiting 38 s).
func (ps *Provisions) Due(c cid.Cid, now time.Time, size int, interval time.Duration) bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p := ps.m[c]
	if p.expired(now, interval) {
		return true
	}
	if !p.outgrown(size) {
		if !p.grew.IsZero() {
			p.grew = time.Time{}
			ps.m[c] = p
		}
		return false
	}
	if p.grew.IsZero() {
		p.grew = now
		ps.m[c] = p
	}
	return !now.Before(p.grew.Add(GrowthDelay(ps.self, c, p.Network, p.grew.Sub(p.At))))
}

// GrowthDelay is how long node self waits, once the network has grown
// reprovideGrowth times since it provided c in a network of network
// nodes age ago, before it provides c again: a share of the bound,
// fixed by self and c, so that a network's nodes and keys spread their
// provides evenly. The bound is growthSpreadPerNode for each node the
// network had (a network-wide rate of provides that does not grow with
// the network), at most maxGrowthSpread, and at most age: a young network
// that grows four times within seconds moves its records as soon (its
// lookups would miss them while it grew further), one that has been as
// large for minutes has minutes to move them in.
func GrowthDelay(self peer.ID, c cid.Cid, network int, age time.Duration) time.Duration {
	bound := min(maxGrowthSpread, time.Duration(max(1, network))*growthSpreadPerNode, max(0, age))
	h := fnv.New64a()
	_, _ = h.Write([]byte(self))
	_, _ = h.Write(c.Bytes())
	return time.Duration(float64(bound) * float64(h.Sum64()>>11) / (1 << 53))
}

// growthSpreadPerNode and maxGrowthSpread bound GrowthDelay.
const (
	growthSpreadPerNode = 3 * time.Second
	maxGrowthSpread     = 10 * time.Minute
)

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
