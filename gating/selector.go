package gating

import (
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/reputation"
)

// Scorer gives a peer's reputation in [0, 1] (package reputation).
type Scorer = reputation.Scorer

// NeutralScorer scores every peer 1.
type NeutralScorer = reputation.Neutral

// Selector ranks an expert's providers by what calls to them have cost:
// round-trip time (an EWMA), the compute time they report and their
// queue, divided by their reputation. It sticks to the peer it used last
// for an expert unless another is clearly better, and gives the p95 of a
// peer's recent latencies as the time to hedge a call to it. Safe for
// concurrent use.
type Selector struct {
	scorer Scorer
	// provenFirst: no peer that has never answered goes before one that
	// has (ProvenFirst).
	provenFirst bool
	// seniority, if set, says when this node first heard of a peer
	// (WithSeniority).
	seniority func(peer.ID) (time.Time, bool)

	mu     sync.Mutex
	stats  map[peer.ID]*peerStats
	sticky map[expert.Key]peer.ID
}

// Tunables of the selector.
const (
	ewmaAlpha = 0.2
	// window holds each peer's last latencies, for the p95.
	window = 64
	// switchRatio: another peer must cost less than this fraction of the
	// sticky one to take its place.
	switchRatio = 0.7
	// unknownCost is what an unmeasured peer is assumed to cost, low
	// enough that new peers get tried.
	unknownCost = 2 * time.Millisecond
	// failurePenalty multiplies a peer's cost per recent failure.
	failurePenalty = 4.0
	// minHedge and defaultHedge bound the hedge delay.
	minHedge     = time.Millisecond
	defaultHedge = 50 * time.Millisecond
	// A call's deadline is deadlineFactor times the peer's p95, at least
	// minDeadline (and at most the gating node's call timeout): a peer
	// that died without a reset (a QUIC peer gone silent) fails its calls
	// in seconds, not at the call timeout.
	deadlineFactor = 20
	minDeadline    = 2 * time.Second
)

type peerStats struct {
	// rtt is the EWMA of a call's whole time as the gating node sees it
	// (network, queueing and the node's compute: what a call costs), in
	// seconds.
	rtt      float64
	recent   []time.Duration
	failures float64 // decays on success
	queue    int
	answers  int // calls it answered (a loser cancelled is none)
}

// SelectorOption configures a Selector.
type SelectorOption func(*Selector)

// ProvenFirst ranks every peer that has answered a call before every peer
// that has not, for a gating node that proves new peers off the critical
// path (the validator's probes, whose answers the selector observes):
// a call then waits on an unproven peer only when no proven one is left.
// Without it one unproven peer goes before the first proven one, so that
// new peers get tried at all; with many Sybils announcing every expert
// that cost a hedge on nearly every call (with the groups that went to
// them: 134 ms a token at 30 nodes and 120 Sybils, against 8.3 ms with
// ProvenFirst and 4.7 ms without Sybils).
func ProvenFirst() SelectorOption { return func(s *Selector) { s.provenFirst = true } }

// WithSeniority orders the peers that have never answered a call by how
// long this node has known them (first heard, a local observation no peer
// can claim), longest first, those it has not heard of last. Sybils
// announcing every expert all arrive at once and later than the network
// they attack: in a simulated network of 100 nodes with 400 Sybils, one
// expert had 229 announced providers of which 4 were honest, and a first
// call waited through Sybil after Sybil.
func WithSeniority(firstHeard func(peer.ID) (time.Time, bool)) SelectorOption {
	return func(s *Selector) { s.seniority = firstHeard }
}

// NewSelector makes a selector; scorer nil means NeutralScorer.
func NewSelector(scorer Scorer, opts ...SelectorOption) *Selector {
	if scorer == nil {
		scorer = NeutralScorer{}
	}
	s := &Selector{scorer: scorer, stats: map[peer.ID]*peerStats{}, sticky: map[expert.Key]peer.ID{}}
	for _, o := range opts {
		o(s)
	}
	return s
}

func (s *Selector) stat(p peer.ID) *peerStats {
	st := s.stats[p]
	if st == nil {
		st = &peerStats{}
		s.stats[p] = st
	}
	return st
}

// Observe records a call's outcome: its whole time (the node's compute
// included), or its failure.
func (s *Selector) Observe(p peer.ID, rtt time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stat(p)
	if err != nil {
		st.failures++
		return
	}
	st.failures *= 0.5
	st.answers++
	s.observe(st, rtt)
}

// ObserveLoss records a call p had not answered when a faster provider
// did: it took at least rtt, on the same scale as the winner's time (a
// loser started first, so its bound exceeds the winner's time by the
// hedge delay, and it costs more). It is not an answer: a peer that never
// answers (a liar announcing experts it does not serve) stays unproven.
func (s *Selector) ObserveLoss(p peer.ID, rtt time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stat(p)
	st.failures *= 0.5 // it did not fail: it was slower
	s.observe(st, rtt)
}

func (s *Selector) observe(st *peerStats, rtt time.Duration) {
	if st.rtt == 0 {
		st.rtt = rtt.Seconds()
	} else {
		st.rtt += ewmaAlpha * (rtt.Seconds() - st.rtt)
	}
	st.recent = append(st.recent, rtt)
	if len(st.recent) > window {
		st.recent = st.recent[1:]
	}
}

// SetQueue records a peer's announced queue depth.
func (s *Selector) SetQueue(p peer.ID, depth int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stat(p).queue = depth
}

// cost is the expected cost of a call to p, in seconds (lower is better).
func (s *Selector) cost(p peer.ID) float64 {
	st := s.stats[p]
	c := unknownCost.Seconds()
	if st != nil && st.rtt > 0 {
		c = st.rtt
	}
	if st != nil {
		c *= 1 + float64(st.queue)/4
		for range int(st.failures + 0.5) {
			c *= failurePenalty
		}
	}
	return c / max(s.scorer.Score(p), 0.05)
}

// Rank orders the providers of k, best first. preferred peers (those that
// host all of the token's experts in this layer) count at half their cost,
// since one round trip then serves them all. The peer used last for k
// stays first unless another costs less than switchRatio of it.
func (s *Selector) Rank(k expert.Key, providers []peer.ID, preferred map[peer.ID]bool) []peer.ID {
	s.mu.Lock()
	defer s.mu.Unlock()
	out, cost := s.order(providers, preferred)
	if last, ok := s.sticky[k]; ok && len(out) > 0 && out[0] != last {
		if i := slices.Index(out, last); i > 0 && cost[out[0]] >= switchRatio*cost[last] {
			out = append([]peer.ID{last}, slices.Delete(out, i, i+1)...)
		}
	}
	if len(out) > 0 {
		s.sticky[k] = out[0]
	}
	return out
}

// rankOnly orders providers by cost as Rank does, without an expert's
// stickiness (and without moving it).
func (s *Selector) rankOnly(providers []peer.ID, preferred map[peer.ID]bool) []peer.ID {
	s.mu.Lock()
	defer s.mu.Unlock()
	out, _ := s.order(providers, preferred)
	return out
}

// Proven reports whether p has answered a call.
func (s *Selector) Proven(p peer.ID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.provenLocked(p)
}

func (s *Selector) provenLocked(p peer.ID) bool {
	st := s.stats[p]
	return st != nil && st.answers > 0
}

// order sorts a copy of providers by cost, preferred ones at half theirs,
// and lets at most one peer that has never answered a call go before the
// first that has (none with provenFirst): a new peer gets tried, but a
// crowd of new peers (Sybils announcing every expert) cannot make a call
// wait through a hedge each before a proven provider is asked.
func (s *Selector) order(providers []peer.ID, preferred map[peer.ID]bool) ([]peer.ID, map[peer.ID]float64) {
	out := slices.Clone(providers)
	cost := make(map[peer.ID]float64, len(out))
	var heard map[peer.ID]time.Time
	for _, p := range out {
		c := s.cost(p)
		proven := s.provenLocked(p)
		// Hosting the whole layer is a claim until the peer has answered:
		// a Sybil announcing every expert would be preferred everywhere.
		if preferred[p] && (proven || s.seniority == nil) {
			c /= 2
		}
		cost[p] = c
		if s.seniority != nil && !proven {
			if heard == nil {
				heard = map[peer.ID]time.Time{}
			}
			if t, ok := s.seniority(p); ok {
				heard[p] = t
			}
		}
	}
	slices.SortStableFunc(out, func(a, b peer.ID) int {
		switch {
		case cost[a] < cost[b]:
			return -1
		case cost[a] > cost[b]:
			return 1
		}
		if heard == nil {
			return 0
		}
		ta, oka := heard[a]
		tb, okb := heard[b]
		switch {
		case oka && okb:
			return ta.Compare(tb)
		case oka:
			return -1
		case okb:
			return 1
		}
		return 0
	})
	switch first := slices.IndexFunc(out, s.provenLocked); {
	case first >= 0 && s.provenFirst:
		// Stable: the proven in their order, then the unproven in theirs
		// (also when the first is proven: an unproven peer cheaper than
		// the second proven one went second).
		proven := slices.DeleteFunc(slices.Clone(out), func(p peer.ID) bool { return !s.provenLocked(p) })
		out = append(proven, slices.DeleteFunc(out, s.provenLocked)...)
	case first > 1:
		p := out[first]
		out = slices.Insert(slices.Delete(out, first, first+1), 1, p)
	}
	return out, cost
}

// Typical is a call to p's usual whole time (the moving average of its
// answers'), 0 while p has answered none.
func (s *Selector) Typical(p peer.ID) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats[p]
	if st == nil || st.answers == 0 {
		return 0
	}
	return time.Duration(st.rtt * float64(time.Second))
}

// Deadline is how long a call to p may take before it counts as failed:
// deadlineFactor times its p95 latency, at least minDeadline, at most max.
func (s *Selector) Deadline(p peer.ID, max time.Duration) time.Duration {
	s.mu.Lock()
	st := s.stats[p]
	known := st != nil && len(st.recent) >= 5
	s.mu.Unlock()
	if !known {
		return max
	}
	return min(max, deadlineFactor*s.HedgeAfter(p)+minDeadline)
}

// HedgeAfter is how long to wait for p before asking the next provider
// too: the p95 of its recent latencies.
func (s *Selector) HedgeAfter(p peer.ID) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats[p]
	if st == nil || len(st.recent) < 5 {
		return defaultHedge
	}
	sorted := slices.Clone(st.recent)
	slices.Sort(sorted)
	return max(sorted[len(sorted)*95/100], minHedge)
}
