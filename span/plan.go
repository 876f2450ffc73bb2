package span

import (
	"cmp"
	"slices"

	"github.com/libp2p/go-libp2p/core/peer"
)

// Plan picks the chain of announced spans (layers [first, end) → the
// peers serving them, as p2p.PeerTable.Spans gives them) that runs layers
// [from, layers) in the fewest hops: the fewest round trips per forward
// pass. Among chains of as many hops it prefers longer spans first, then
// spans with more providers (more to fail over to). It returns false when
// the spans do not cover the layers.
func Plan(spans map[[2]int][]peer.ID, from, layers int) ([]Hop, bool) {
	if from == layers {
		return nil, true
	}
	ranges := make([][2]int, 0, len(spans))
	for r, ps := range spans {
		if r[0] >= from && r[1] <= layers && r[0] < r[1] && len(ps) > 0 {
			ranges = append(ranges, r)
		}
	}
	// Longer spans first, then more providers, then by first layer, so
	// that the search below is deterministic and finds the preferred
	// chain first.
	slices.SortFunc(ranges, func(a, b [2]int) int {
		return cmp.Or(cmp.Compare(b[1]-b[0], a[1]-a[0]), cmp.Compare(len(spans[b]), len(spans[a])), cmp.Compare(a[0], b[0]))
	})
	// Breadth-first over the layer where the next span starts: the first
	// time a layer is reached is by the fewest hops.
	prev := map[int][2]int{}
	frontier := []int{from}
	seen := map[int]bool{from: true}
	for len(frontier) > 0 && !seen[layers] {
		var next []int
		for _, at := range frontier {
			for _, r := range ranges {
				if r[0] != at || seen[r[1]] {
					continue
				}
				seen[r[1]], prev[r[1]] = true, r
				next = append(next, r[1])
			}
		}
		frontier = next
	}
	if !seen[layers] {
		return nil, false
	}
	var hops []Hop
	for at := layers; at != from; {
		r := prev[at]
		hops = append(hops, Hop{First: r[0], End: r[1], Providers: slices.Clone(spans[r])})
		at = r[0]
	}
	slices.Reverse(hops)
	return hops, true
}
