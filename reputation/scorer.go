package reputation

import "github.com/libp2p/go-libp2p/core/peer"

// Scorer gives a peer's reputation in [0, 1]: 1 is fully trusted, 0 never
// chosen while another provider exists. Gating nodes divide a provider's
// measured cost by it when they pick experts.
type Scorer interface {
	Score(p peer.ID) float64
}

// Neutral scores every peer 1: the scorer of a node that has no record
// yet.
type Neutral struct{}

// Score implements Scorer.
func (Neutral) Score(peer.ID) float64 { return 1 }
