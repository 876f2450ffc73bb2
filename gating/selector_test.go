package gating

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
)

type fixedScores map[peer.ID]float64

func (f fixedScores) Score(p peer.ID) float64 { return f[p] }

func TestSelectorRank(t *testing.T) {
	k := expert.Key{Layer: 1, Expert: 2}
	ms := time.Millisecond
	tests := []struct {
		name      string
		observe   func(s *Selector)
		scores    Scorer
		preferred map[peer.ID]bool
		want      peer.ID
	}{
		{"fastest wins", func(s *Selector) {
			s.Observe("a", 10*ms, nil)
			s.Observe("b", 2*ms, nil)
		}, nil, nil, "b"},
		{"reputation divides cost", func(s *Selector) {
			s.Observe("a", 10*ms, nil)
			s.Observe("b", 2*ms, nil)
		}, fixedScores{"a": 1, "b": 0.1}, nil, "a"},
		{"failures penalise", func(s *Selector) {
			s.Observe("a", 10*ms, nil)
			s.Observe("b", 2*ms, nil)
			s.Observe("b", 0, errors.New("reset"))
			s.Observe("b", 0, errors.New("reset"))
		}, nil, nil, "a"},
		{"queue counts", func(s *Selector) {
			s.Observe("a", 4*ms, nil)
			s.Observe("b", 2*ms, nil)
			s.SetQueue("b", 20)
		}, nil, nil, "a"},
		{"a peer hosting the whole layer is preferred", func(s *Selector) {
			s.Observe("a", 3*ms, nil)
			s.Observe("b", 2*ms, nil)
		}, nil, map[peer.ID]bool{"a": true}, "a"},
		{"unmeasured peers get tried", func(s *Selector) {
			s.Observe("a", 30*ms, nil)
		}, nil, nil, "b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSelector(tc.scores)
			tc.observe(s)
			if got := s.Rank(k, []peer.ID{"a", "b"}, tc.preferred); got[0] != tc.want {
				t.Fatalf("Rank = %v, want %s first", got, tc.want)
			}
		})
	}
}

func TestSelectorSticksUnlessClearlyBetter(t *testing.T) {
	k := expert.Key{}
	s := NewSelector(nil)
	s.Observe("a", 10*time.Millisecond, nil)
	s.Observe("b", 12*time.Millisecond, nil)
	if got := s.Rank(k, []peer.ID{"a", "b"}, nil); got[0] != "a" {
		t.Fatalf("first choice %v", got)
	}
	for range 20 { // b becomes a little faster than a: not enough to switch
		s.Observe("b", 9*time.Millisecond, nil)
	}
	if got := s.Rank(k, []peer.ID{"a", "b"}, nil); got[0] != "a" {
		t.Fatalf("switched for a small gain: %v", got)
	}
	for range 30 { // now clearly better
		s.Observe("b", 3*time.Millisecond, nil)
	}
	if got := s.Rank(k, []peer.ID{"a", "b"}, nil); got[0] != "b" {
		t.Fatalf("did not switch to a clearly better peer: %v", got)
	}
}

func TestHedgeAfterIsP95(t *testing.T) {
	s := NewSelector(nil)
	if got := s.HedgeAfter("x"); got != defaultHedge {
		t.Fatalf("unmeasured: %v", got)
	}
	for i := 1; i <= 20; i++ {
		s.Observe("x", time.Duration(i)*time.Millisecond, nil)
	}
	if got := s.HedgeAfter("x"); got != 20*time.Millisecond {
		t.Fatalf("p95 of 1..20 ms = %v, want 20ms", got)
	}
}

// A call's deadline follows the peer's latency, within the call timeout.
func TestSelectorDeadline(t *testing.T) {
	s := NewSelector(nil)
	p := peer.ID("a")
	if d := s.Deadline(p, 30*time.Second); d != 30*time.Second {
		t.Fatalf("unmeasured peer: deadline %v, want the call timeout", d)
	}
	for range 20 {
		s.Observe(p, 10*time.Millisecond, nil)
	}
	if d := s.Deadline(p, 30*time.Second); d != deadlineFactor*10*time.Millisecond+minDeadline {
		t.Fatalf("deadline %v", d)
	}
	if d := s.Deadline(p, time.Second); d != time.Second {
		t.Fatalf("deadline %v above the call timeout", d)
	}
}

// Peers that announce an expert but have never answered a call (new
// peers, or Sybils that announce everything and serve nothing) are tried
// one at a time: however many there are, a proven provider is second.
// A call one lost to a faster provider is not an answer.
func TestSelectorTriesOneUnprovenPeerAtATime(t *testing.T) {
	k := expert.Key{Layer: 1}
	s := NewSelector(nil)
	s.Observe("honest", 30*time.Millisecond, nil)
	s.ObserveLoss("liar-0", 50*time.Millisecond) // cancelled: never answered
	crowd := []peer.ID{"liar-0", "liar-1", "liar-2", "liar-3", "liar-4", "honest"}
	got := s.Rank(k, crowd, nil)
	if len(got) != len(crowd) || got[1] != "honest" || got[0] == "honest" {
		t.Fatalf("Rank = %v, want one unproven peer, then the honest one", got)
	}
	if got[0] == "liar-0" {
		t.Fatalf("Rank = %v: a peer measured at 50 ms (lost a race) goes before the unmeasured ones", got)
	}
}

// With ProvenFirst (a gating node whose validator proves new peers off the
// critical path) every proven provider goes before every unproven one,
// however cheap the unproven look; with none proven, they are tried in
// order of cost.
func TestSelectorProvenFirst(t *testing.T) {
	k := expert.Key{Layer: 1}
	s := NewSelector(nil, ProvenFirst())
	s.Observe("slow-honest", 80*time.Millisecond, nil)
	s.Observe("honest", 30*time.Millisecond, nil)
	s.ObserveLoss("liar-0", 50*time.Millisecond)
	crowd := []peer.ID{"liar-0", "liar-1", "slow-honest", "liar-2", "honest"}
	got := s.Rank(k, crowd, nil)
	if want := []peer.ID{"honest", "slow-honest", "liar-1", "liar-2", "liar-0"}; !slices.Equal(got, want) {
		t.Fatalf("Rank = %v, want %v", got, want)
	}
	if got := s.rankOnly([]peer.ID{"liar-1", "honest"}, map[peer.ID]bool{"liar-1": true}); got[0] != "honest" {
		t.Fatalf("rankOnly = %v: a preferred unproven peer went before a proven one", got)
	}
	if got := s.Rank(expert.Key{Layer: 2}, []peer.ID{"liar-0", "liar-2", "liar-1"}, nil); got[2] != "liar-0" {
		t.Fatalf("Rank = %v, want the peer that lost a race last", got)
	}
}

func TestSelectorProven(t *testing.T) {
	s := NewSelector(nil)
	s.ObserveLoss("liar", 50*time.Millisecond)
	s.Observe("failed", 0, errors.New("reset"))
	s.Observe("honest", 3*time.Millisecond, nil)
	for p, want := range map[peer.ID]bool{"liar": false, "failed": false, "honest": true, "unknown": false} {
		if got := s.Proven(p); got != want {
			t.Errorf("Proven(%s) = %v, want %v", p, got, want)
		}
	}
}

// A provider that loses every race (its calls cancelled once a hedge to
// another answered) never ranks above the one that won them, however much
// of the winner's time was its compute: both are measured on the same
// scale, the call's whole time, and the loser's bound is the winner's
// time plus the hedge delay.
func TestSelectorPrefersTheWinnerOverTheLoser(t *testing.T) {
	s := NewSelector(nil)
	k := expert.Key{Layer: 2}
	for i := range 30 {
		won := time.Duration(40+i%7*20) * time.Millisecond // a loaded machine: most of it compute
		s.Observe("fast", won, nil)
		s.ObserveLoss("slow", won+defaultHedge)
	}
	if got := s.Rank(k, []peer.ID{"slow", "fast"}, nil); got[0] != "fast" {
		t.Fatalf("Rank = %v, want the winner first", got)
	}
}

// WithSeniority: peers that have never answered go by how long the node
// has known them, whatever they claim (a Sybil's claim to host the whole
// layer counts for nothing until it has answered), those it has not heard
// of last; proven peers keep their order by cost.
func TestSelectorSeniority(t *testing.T) {
	t0 := time.Unix(1000, 0)
	heard := map[peer.ID]time.Time{"old": t0, "older": t0.Add(-time.Hour), "sybil-0": t0.Add(time.Minute), "sybil-1": t0.Add(2 * time.Minute)}
	s := NewSelector(nil, ProvenFirst(), WithSeniority(func(p peer.ID) (time.Time, bool) {
		at, ok := heard[p]
		return at, ok
	}))
	k := expert.Key{Layer: 1}
	crowd := []peer.ID{"sybil-1", "unheard", "sybil-0", "old", "older"}
	everything := map[peer.ID]bool{"sybil-0": true, "sybil-1": true}
	if got, want := s.Rank(k, crowd, everything), []peer.ID{"older", "old", "sybil-0", "sybil-1", "unheard"}; !slices.Equal(got, want) {
		t.Fatalf("Rank = %v, want %v", got, want)
	}
	s.Observe("sybil-1", 3*time.Millisecond, nil) // it answered: proven, and its claim counts
	s.Observe("old", 4*time.Millisecond, nil)
	if got, want := s.rankOnly(crowd, everything), []peer.ID{"sybil-1", "old", "older", "sybil-0", "unheard"}; !slices.Equal(got, want) {
		t.Fatalf("rankOnly = %v, want %v", got, want)
	}
}
