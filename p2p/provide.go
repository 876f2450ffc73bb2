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
	if err := h.dht.Provide(ctx, c, true); err != nil {
		return fmt.Errorf("provide %s: %w", c, err)
	}
	return nil
}

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
