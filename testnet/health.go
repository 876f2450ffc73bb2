package testnet

import (
	"fmt"
	"slices"
	"strings"

	"github.com/neuro-p2p/neuro/node"
)

// Health checks the testnet's bar for "up": every node has every other node
// in its DHT routing table, and has heard a GossipSub heartbeat from every
// other node. It returns nil when healthy, else an error naming the first
// gap found.
func Health(sts []node.Status) error {
	for _, st := range sts {
		heard := make([]string, 0, len(st.Heard))
		for _, h := range st.Heard {
			heard = append(heard, h.PeerID)
		}
		for _, other := range sts {
			if other.PeerID == st.PeerID {
				continue
			}
			if !slices.Contains(st.RoutingTable, other.PeerID) {
				return fmt.Errorf("node %s: %s not in its routing table (%d of %d peers)",
					short(st.PeerID), short(other.PeerID), len(st.RoutingTable), len(sts)-1)
			}
			if !slices.Contains(heard, other.PeerID) {
				return fmt.Errorf("node %s: no heartbeat from %s yet (%d of %d peers)",
					short(st.PeerID), short(other.PeerID), len(heard), len(sts)-1)
			}
		}
	}
	return nil
}

func short(id string) string {
	if len(id) > 12 {
		return "…" + id[len(id)-8:]
	}
	return id
}

// Coverage counts, for each expert "layer:expert" of a model's MoE layers
// [first, layers) of experts each, the nodes whose status lists it as
// served.
func Coverage(sts []node.Status, first, layers, experts int) map[string]int {
	out := make(map[string]int, (layers-first)*experts)
	for l := first; l < layers; l++ {
		for e := range experts {
			out[fmt.Sprintf("%d:%d", l, e)] = 0
		}
	}
	for _, st := range sts {
		for _, k := range st.Experts {
			if _, ok := out[k]; ok {
				out[k]++
			}
		}
	}
	return out
}

// Covered checks that every expert has at least want providers.
func Covered(cov map[string]int, want int) error {
	var short []string
	for k, n := range cov {
		if n < want {
			short = append(short, fmt.Sprintf("%s (%d)", k, n))
		}
	}
	if len(short) > 0 {
		slices.Sort(short)
		return fmt.Errorf("%d experts have fewer than %d providers: %s", len(short), want, strings.Join(short, ", "))
	}
	return nil
}
