package reputation

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
)

// Weights combine a peer's four scores into one. They sum to 1.
type Weights struct {
	Correctness, Timeliness, Speed, Availability float64
}

// DefaultWeights put correctness first: a wrong answer costs a user more
// than a slow one, and a slow one more than a peer that comes and goes
// (hedging and re-dispatch absorb those).
var DefaultWeights = Weights{Correctness: 0.55, Timeliness: 0.2, Speed: 0.1, Availability: 0.15}

// Config tunes a Book.
type Config struct {
	// Path is the file the book is kept in across restarts ("" keeps it in
	// memory only).
	Path    string
	Weights Weights
	// Alpha is the weight of a new observation in each EWMA.
	Alpha float64
	// Prior is the correctness of a peer never checked: between the
	// exclusion threshold and 1, so that one failed check does not exclude
	// a peer but two in a row do.
	Prior float64
	// ExcludeBelow is the correctness under which a peer is not selected.
	ExcludeBelow float64
	// Readmit is the run of validated results (from probes whose answers
	// are not used) that re-admits an excluded peer.
	Readmit int
	// CheckFloor is the smallest share of a trusted peer's results that is
	// re-executed elsewhere.
	CheckFloor float64
}

// DefaultConfig returns the defaults. With Alpha 0.3 and Prior 0.7, a new
// peer's first failed check leaves it at 0.49 and excluded; an honest peer
// would need a false accusation, which the tolerance makes vanishingly
// rare.
func DefaultConfig() Config {
	return Config{Weights: DefaultWeights, Alpha: 0.3, Prior: 0.7, ExcludeBelow: 0.5, Readmit: 5, CheckFloor: 0.05}
}

// Record is what the book knows of one peer.
type Record struct {
	// EWMAs in [0, 1].
	Correctness  float64 `json:"correctness"`
	Timeliness   float64 `json:"timeliness"`
	Speed        float64 `json:"speed"`
	Availability float64 `json:"availability"`
	// Checked counts this peer's results that were re-executed elsewhere
	// and decided; Failed those found wrong.
	Checked uint64 `json:"checked"`
	Failed  uint64 `json:"failed"`
	// Streak is the run of validated results since the last failure.
	Streak int `json:"streak"`
	// Excluded peers are not selected until re-validated. ExcludedAt is
	// Checked when the peer was last excluded: how many of its results it
	// took to catch it.
	Excluded   bool   `json:"excluded"`
	ExcludedAt uint64 `json:"excluded_at,omitempty"`
	// Verdicts counts the verdicts this peer published that were refuted.
	Refuted uint64    `json:"refuted"`
	Updated time.Time `json:"updated"`
}

// Book keeps every peer's record. It is safe for concurrent use.
type Book struct {
	cfg   Config
	mu    sync.Mutex
	recs  map[peer.ID]*Record
	dirty bool
}

// Open loads the book at cfg.Path (a missing file is an empty book).
func Open(cfg Config) (*Book, error) {
	d := DefaultConfig()
	if cfg.Weights == (Weights{}) {
		cfg.Weights = d.Weights
	}
	if cfg.Alpha <= 0 || cfg.Alpha > 1 {
		cfg.Alpha = d.Alpha
	}
	if cfg.Prior <= 0 || cfg.Prior > 1 {
		cfg.Prior = d.Prior
	}
	if cfg.ExcludeBelow <= 0 {
		cfg.ExcludeBelow = d.ExcludeBelow
	}
	if cfg.Readmit <= 0 {
		cfg.Readmit = d.Readmit
	}
	if cfg.CheckFloor <= 0 || cfg.CheckFloor > 1 {
		cfg.CheckFloor = d.CheckFloor
	}
	if s := cfg.Weights.Correctness + cfg.Weights.Timeliness + cfg.Weights.Speed + cfg.Weights.Availability; math.Abs(s-1) > 1e-9 {
		return nil, fmt.Errorf("reputation: weights sum to %v, want 1", s)
	}
	b := &Book{cfg: cfg, recs: map[peer.ID]*Record{}}
	if cfg.Path == "" {
		return b, nil
	}
	data, err := os.ReadFile(cfg.Path)
	if errors.Is(err, os.ErrNotExist) {
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reputation: %w", err)
	}
	var stored map[string]*Record
	if err := json.Unmarshal(data, &stored); err != nil {
		return nil, fmt.Errorf("reputation: %s: %w", cfg.Path, err)
	}
	for s, r := range stored {
		p, err := peer.Decode(s)
		if err != nil || r == nil {
			return nil, fmt.Errorf("reputation: %s: bad entry %q", cfg.Path, s)
		}
		r.Correctness, r.Timeliness = clamp(r.Correctness), clamp(r.Timeliness)
		r.Speed, r.Availability = clamp(r.Speed), clamp(r.Availability)
		b.recs[p] = r
	}
	return b, nil
}

func clamp(x float64) float64 {
	if x != x { // NaN
		return 0
	}
	return min(1, max(0, x))
}

// Save writes the book to its file if it changed (crash-safe).
func (b *Book) Save() error {
	if b.cfg.Path == "" {
		return nil
	}
	b.mu.Lock()
	if !b.dirty {
		b.mu.Unlock()
		return nil
	}
	out := make(map[string]*Record, len(b.recs))
	for p, r := range b.recs {
		c := *r
		out[p.String()] = &c
	}
	b.dirty = false
	b.mu.Unlock()
	data, err := json.MarshalIndent(out, "", " ")
	if err != nil {
		return fmt.Errorf("reputation: %w", err)
	}
	if err := atomicfile.Write(b.cfg.Path, data, 0o600); err != nil {
		return fmt.Errorf("reputation: %w", err)
	}
	return nil
}

// rec returns p's record, making a new one at the priors. Hold mu.
func (b *Book) rec(p peer.ID) *Record {
	r := b.recs[p]
	if r == nil {
		r = &Record{Correctness: b.cfg.Prior, Timeliness: 1, Speed: 1, Availability: 1}
		b.recs[p] = r
	}
	return r
}

func (b *Book) ewma(old, x float64) float64 { return (1-b.cfg.Alpha)*old + b.cfg.Alpha*x }

// Score implements Scorer: the weighted scores, 0 while excluded.
func (b *Book) Score(p peer.ID) float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.recs[p]
	if r == nil {
		r = &Record{Correctness: b.cfg.Prior, Timeliness: 1, Speed: 1, Availability: 1}
	}
	if r.Excluded {
		return 0
	}
	w := b.cfg.Weights
	return w.Correctness*r.Correctness + w.Timeliness*r.Timeliness + w.Speed*r.Speed + w.Availability*r.Availability
}

// GossipScore is p's reputation as a GossipSub application score (the
// p2p package weighs it by 10): 0 for a peer the book has no record of,
// -60 for an excluded one (below the gossip threshold: its gossip is not
// relayed), and between -1 and 1 otherwise.
func (b *Book) GossipScore(p peer.ID) float64 {
	b.mu.Lock()
	_, known := b.recs[p]
	b.mu.Unlock()
	if !known {
		return 0
	}
	if b.Excluded(p) {
		return -60
	}
	return 2 * (b.Score(p) - 0.5)
}

// Excluded reports whether p is kept out of selection.
func (b *Book) Excluded(p peer.ID) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.recs[p]
	return r != nil && r.Excluded
}

// Streak is p's run of validated results since its last failure (0 for
// a peer never checked).
func (b *Book) Streak(p peer.ID) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.recs[p]; r != nil {
		return r.Streak
	}
	return 0
}

// Vetted reports whether any result of p has been checked.
func (b *Book) Vetted(p peer.ID) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.recs[p]
	return r != nil && r.Checked > 0
}

// CheckRate is the probability that one of p's results is re-executed
// elsewhere: 1 for a peer never validated, falling as 1/(n+1) with its
// run n of validated results (BOINC's adaptive replication), never below
// the floor.
func (b *Book) CheckRate(p peer.ID) float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.recs[p]
	if r == nil {
		return 1
	}
	return max(b.cfg.CheckFloor, 1/float64(r.Streak+1))
}

// Validated records a decided check of p's result: ok when it agreed with
// the majority. A failure can exclude the peer; an excluded peer is
// re-admitted after Readmit validated probes in a row.
func (b *Book) Validated(p peer.ID, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.rec(p)
	r.Checked++
	r.Updated = time.Now()
	b.dirty = true
	if !ok {
		r.Failed++
		r.Streak = 0
		r.Correctness = b.ewma(r.Correctness, 0)
		if r.Correctness < b.cfg.ExcludeBelow && !r.Excluded {
			r.Excluded = true
			r.ExcludedAt = r.Checked
		}
		return
	}
	r.Streak++
	r.Correctness = b.ewma(r.Correctness, 1)
	if r.Excluded && r.Streak >= b.cfg.Readmit {
		r.Excluded = false
		r.Correctness = max(r.Correctness, b.cfg.Prior)
	}
}

// Call records one answered or failed call to p: whether it met its
// deadline, and its compute time against the time its heartbeat
// advertises (0: unknown).
func (b *Book) Call(p peer.ID, onTime bool, compute, advertised time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.rec(p)
	r.Timeliness = b.ewma(r.Timeliness, map[bool]float64{true: 1, false: 0}[onTime])
	if compute > 0 && advertised > 0 {
		r.Speed = b.ewma(r.Speed, min(1, float64(advertised)/float64(compute)))
	}
	r.Updated = time.Now()
	b.dirty = true
}

// Seen records whether p was heard from (its heartbeat) in the last
// interval.
func (b *Book) Seen(p peer.ID, alive bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.rec(p)
	r.Availability = b.ewma(r.Availability, map[bool]float64{true: 1, false: 0}[alive])
	b.dirty = true
}

// Refuted records that p published a verdict that re-execution refuted:
// its correctness drops as for a wrong result.
func (b *Book) Refuted(p peer.ID) {
	b.mu.Lock()
	r := b.rec(p)
	r.Refuted++
	b.mu.Unlock()
	b.Validated(p, false)
}

// Entry is one peer's record in a snapshot.
type Entry struct {
	Peer  peer.ID
	Score float64
	Record
}

// Snapshot lists every record, by peer ID.
func (b *Book) Snapshot() []Entry {
	b.mu.Lock()
	ps := make([]peer.ID, 0, len(b.recs))
	for p := range b.recs {
		ps = append(ps, p)
	}
	b.mu.Unlock()
	sort.Slice(ps, func(i, j int) bool { return ps[i] < ps[j] })
	out := make([]Entry, 0, len(ps))
	for _, p := range ps {
		s := b.Score(p)
		b.mu.Lock()
		out = append(out, Entry{Peer: p, Score: s, Record: *b.recs[p]})
		b.mu.Unlock()
	}
	return out
}
