package p2p

import (
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

// PeerInfo is what a node last heard from a peer on the routing topic.
type PeerInfo struct {
	ID        peer.ID
	Roles     []neuropb.Role
	Seq       uint64
	UptimeS   uint64
	Load      *neuropb.Load
	Version   string
	Addrs     []ma.Multiaddr
	FirstSeen time.Time
	LastSeen  time.Time
	// SentUnixMs is the sender's clock when it sent the last heartbeat.
	SentUnixMs int64
	// Heard counts the heartbeats received from this peer.
	Heard uint64
	// Delay is how long the last heartbeat took from the sender's clock to
	// ours (meaningful only where clocks agree, e.g. on one machine).
	Delay time.Duration
	// Hosted and Capacity are the expert node's announcements, if any.
	Hosted   []*neuropb.HostedModel
	Capacity *neuropb.Capacity
	// Reachability is what the peer's AutoNAT found; Paused says it takes
	// no expert work now.
	Reachability neuropb.Reachability
	Paused       bool
	// Interval is the peer's heartbeat interval (its heartbeat's
	// interval_ms; 0 when it did not say), and Expiry how long after
	// LastSeen the table forgets it.
	Interval time.Duration
	Expiry   time.Duration
	// PeersHeard is how many peers the peer hears (its heartbeat's
	// peers_heard).
	PeersHeard int
}

// Overdue says whether the peer has missed a heartbeat at now: none for
// twice its interval (a node waits between half and one and a half of it,
// so a live one is late by that much only when its heartbeats are lost),
// or for a third of its expiry when it did not say its interval. The table
// keeps a peer MissedHeartbeats intervals: under churn the oldest entries
// of a large network's table are often the dead, minutes after they died.
func (i PeerInfo) Overdue(now time.Time) bool {
	d := 2 * i.Interval
	if d <= 0 {
		d = i.Expiry / MissedHeartbeats
	}
	return d > 0 && now.Sub(i.LastSeen) > d
}

// MissedHeartbeats is how many of a peer's own heartbeat intervals pass
// without a heartbeat before a table forgets the peer (never sooner than
// the table's ttl).
const MissedHeartbeats = 3

// PeerTable remembers the latest heartbeat of each peer: at most max
// peers, each forgotten ttl after its last heartbeat, or MissedHeartbeats
// of its own intervals when that is longer (a peer of a large network
// beats slowly). When full, the peer
// heard from longest ago makes room. Safe for concurrent use.
type PeerTable struct {
	mu      sync.Mutex
	max     int
	ttl     time.Duration
	entries map[peer.ID]*PeerInfo
	// hosting indexes the entries' Hosted lists: model (its CID's bytes)
	// → expert (layer<<16 | expert) → the peers whose entry lists it,
	// expired or not. Who hosts what is asked every second by every
	// expert node and for every expert call by gating nodes; the index
	// answers in time of the answer, not of the network's size.
	hosting map[string]map[uint32]map[peer.ID]struct{}
	// loading indexes the experts entries are still loading
	// (HostedModel.loading): counted, never called.
	loading map[string]map[uint32]map[peer.ID]struct{}
	// hostingVer changes whenever what the entries host may have: an
	// entry added or removed, or its Hosted lists changed
	// (HostingVersion).
	hostingVer uint64
	// left holds the peers that said they leave: their leaving
	// heartbeat's send time and seq (to tell older heartbeats that gossip
	// delivers late from a restart's newer ones), kept a ttl after it came.
	left map[peer.ID]leftPeer
}

type leftPeer struct {
	sent PeerInfo // SentUnixMs and Seq, for newer
	at   time.Time
}

// NewPeerTable returns an empty table.
func NewPeerTable(max int, ttl time.Duration) *PeerTable {
	return &PeerTable{max: max, ttl: ttl, entries: make(map[peer.ID]*PeerInfo), left: make(map[peer.ID]leftPeer),
		hosting: make(map[string]map[uint32]map[peer.ID]struct{}), loading: make(map[string]map[uint32]map[peer.ID]struct{})}
}

// index adds (add) or removes e's Hosted lists to or from t.hosting (the
// experts it serves) and t.loading (those it is loading).
func (t *PeerTable) index(e *PeerInfo, add bool) {
	for _, hm := range e.Hosted {
		indexExperts(t.hosting, string(hm.GetModel()), hm.GetExperts(), e.ID, add)
		indexExperts(t.loading, string(hm.GetModel()), hm.GetLoading(), e.ID, add)
	}
}

// indexExperts adds (add) or removes p as a holder of list's experts of
// model in idx.
func indexExperts(idx map[string]map[uint32]map[peer.ID]struct{}, model string, list []uint32, p peer.ID, add bool) {
	experts := idx[model]
	if experts == nil {
		if !add || len(list) == 0 {
			return
		}
		experts = make(map[uint32]map[peer.ID]struct{})
		idx[model] = experts
	}
	for _, x := range list {
		peers := experts[x]
		switch {
		case add && peers == nil:
			experts[x] = map[peer.ID]struct{}{p: {}}
		case add:
			peers[p] = struct{}{}
		case peers != nil:
			delete(peers, p)
			if len(peers) == 0 {
				delete(experts, x)
			}
		}
	}
	if len(experts) == 0 {
		delete(idx, model)
	}
}

// deleteLocked forgets e.
func (t *PeerTable) deleteLocked(e *PeerInfo) {
	t.hostingVer++
	t.index(e, false)
	delete(t.entries, e.ID)
}

// Observe records a validated heartbeat from author, received at now. A
// heartbeat that is not newer than the one held (by the sender's send time,
// then seq) is ignored, so gossip that arrives out of order never rolls an
// entry back; a restarted peer's heartbeats are newer by send time although
// its seq starts again. A heartbeat saying the peer is leaving removes its
// entry. It reports whether the table changed.
func (t *PeerTable) Observe(author peer.ID, hb *neuropb.Heartbeat, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[author]
	if ok && !e.expired(now) && !newer(hb, e) {
		return false
	}
	if l, gone := t.left[author]; gone {
		if !newer(hb, &l.sent) {
			return false // sent before it left
		}
		delete(t.left, author) // back, restarted
	}
	if hb.GetLeaving() {
		if ok {
			t.deleteLocked(e)
		}
		if len(t.left) < t.max {
			t.left[author] = leftPeer{sent: PeerInfo{SentUnixMs: hb.GetSentUnixMs(), Seq: hb.GetSeq()}, at: now}
		}
		return ok
	}
	if !ok {
		if len(t.entries) >= t.max {
			t.evictLocked(now)
		}
		e = &PeerInfo{ID: author, FirstSeen: now}
		t.entries[author] = e
		t.hostingVer++
	}
	addrs := make([]ma.Multiaddr, 0, len(hb.GetAddrs()))
	for _, b := range hb.GetAddrs() {
		if a, err := ma.NewMultiaddrBytes(b); err == nil {
			addrs = append(addrs, a)
		}
	}
	e.Roles = slices.Clone(hb.GetRoles())
	e.Seq = hb.GetSeq()
	e.UptimeS = hb.GetUptimeS()
	e.Load = hb.GetLoad()
	e.Version = hb.GetVersion()
	e.Addrs = addrs
	e.LastSeen = now
	e.Heard++
	e.SentUnixMs = hb.GetSentUnixMs()
	if !hostedEqual(e.Hosted, hb.GetHosted()) {
		t.hostingVer++
		t.index(e, false)
		e.Hosted = hb.GetHosted()
		t.index(e, true)
	}
	e.Capacity = hb.GetCapacity()
	e.Reachability, e.Paused = hb.GetReachability(), hb.GetPaused()
	e.Delay = now.Sub(time.UnixMilli(hb.GetSentUnixMs()))
	e.Interval = time.Duration(hb.GetIntervalMs()) * time.Millisecond
	e.PeersHeard = int(hb.GetPeersHeard())
	e.Expiry = max(t.ttl, MissedHeartbeats*e.Interval)
	return true
}

// expired reports whether e is to be forgotten at now.
func (e *PeerInfo) expired(now time.Time) bool { return now.Sub(e.LastSeen) > e.Expiry }

func newer(hb *neuropb.Heartbeat, e *PeerInfo) bool {
	if hb.GetSentUnixMs() != e.SentUnixMs {
		return hb.GetSentUnixMs() > e.SentUnixMs
	}
	return hb.GetSeq() > e.Seq
}

// evictLocked drops expired entries, and if none expired, the one heard
// from longest ago.
func (t *PeerTable) evictLocked(now time.Time) {
	var oldest *PeerInfo
	for _, e := range t.entries {
		if e.expired(now) {
			t.deleteLocked(e)
			continue
		}
		if oldest == nil || e.LastSeen.Before(oldest.LastSeen) {
			oldest = e
		}
	}
	if len(t.entries) >= t.max && oldest != nil {
		t.deleteLocked(oldest)
	}
}

// Prune forgets the peers not heard from within the ttl.
func (t *PeerTable) Prune(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.entries {
		if e.expired(now) {
			t.deleteLocked(e)
		}
	}
	for p, l := range t.left {
		if now.Sub(l.at) > t.ttl {
			delete(t.left, p)
		}
	}
}

// Hosting returns copies of the live entries whose last heartbeat lists
// expert (layer<<16 | expert) of model (its CID's bytes), sorted by peer
// ID.
func (t *PeerTable) Hosting(model []byte, expert uint32, now time.Time) []PeerInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []PeerInfo
	for p := range t.hosting[string(model)][expert] {
		if e := t.entries[p]; e != nil && !e.expired(now) {
			out = append(out, *e)
		}
	}
	slices.SortFunc(out, func(a, b PeerInfo) int { return compareIDs(a.ID, b.ID) })
	return out
}

// HostingCounts returns, for each expert (layer<<16 | expert) of model
// (its CID's bytes) that a live entry serves or is loading, how many do:
// what a node choosing experts to host counts.
func (t *PeerTable) HostingCounts(model []byte, now time.Time) map[uint32]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[uint32]int)
	for _, idx := range []map[string]map[uint32]map[peer.ID]struct{}{t.hosting, t.loading} {
		for x, peers := range idx[string(model)] {
			for p := range peers {
				if e := t.entries[p]; e != nil && !e.expired(now) {
					out[x]++
				}
			}
		}
	}
	return out
}

// HostingVersion changes whenever what the entries host may have changed
// (an entry added, removed or announcing other experts); entries expiring
// change it only once pruned. Counts read at one version can be reused
// while it stays.
func (t *PeerTable) HostingVersion() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.hostingVer
}

func hostedEqual(a, b []*neuropb.HostedModel) bool {
	return slices.EqualFunc(a, b, func(x, y *neuropb.HostedModel) bool { return proto.Equal(x, y) })
}

// FullHosts counts the live entries that claim (host or load) at least
// experts experts of model (its CID's bytes): with experts the model's
// count, the peers that claim all of it. Every provider count
// includes them, Sybils that claim everything among them.
func (t *PeerTable) FullHosts(model []byte, experts int, now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, e := range t.entries {
		if e.expired(now) {
			continue
		}
		claimed := 0
		for _, hm := range e.Hosted {
			if string(hm.GetModel()) == string(model) {
				claimed += len(hm.GetExperts()) + len(hm.GetLoading())
			}
		}
		if claimed >= experts {
			n++
		}
	}
	return n
}

// Spans returns the layer spans of model (its CID's bytes) that live
// entries announce — [first, end) → the peers serving it, sorted by peer
// ID — leaving out paused peers. It reads every entry: a head asks once
// per generation, not per token.
func (t *PeerTable) Spans(model []byte, now time.Time) map[[2]int][]peer.ID {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := map[[2]int][]peer.ID{}
	for _, e := range t.entries {
		if e.expired(now) || e.Paused {
			continue
		}
		for _, hm := range e.Hosted {
			if string(hm.GetModel()) != string(model) {
				continue
			}
			for _, sp := range hm.GetSpans() {
				k := [2]int{int(sp.GetFirst()), int(sp.GetEnd())}
				out[k] = append(out[k], e.ID)
			}
		}
	}
	for _, ps := range out {
		slices.SortFunc(ps, compareIDs)
	}
	return out
}

// Get returns a copy of the live entry for p.
func (t *PeerTable) Get(p peer.ID, now time.Time) (PeerInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[p]
	if !ok || e.expired(now) {
		return PeerInfo{}, false
	}
	return *e, true
}

// Snapshot returns copies of the live entries, sorted by peer ID.
func (t *PeerTable) Snapshot(now time.Time) []PeerInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]PeerInfo, 0, len(t.entries))
	for _, e := range t.entries {
		if !e.expired(now) {
			out = append(out, *e)
		}
	}
	slices.SortFunc(out, func(a, b PeerInfo) int { return compareIDs(a.ID, b.ID) })
	return out
}

// Stats counts the entries not expired at now, and returns the median of
// the peer counts they announced (0 when none did).
func (t *PeerTable) Stats(now time.Time) (live, medianHeard int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var counts []int
	for _, e := range t.entries {
		if e.expired(now) {
			continue
		}
		live++
		if e.PeersHeard > 0 {
			counts = append(counts, e.PeersHeard)
		}
	}
	if len(counts) == 0 {
		return live, 0
	}
	slices.Sort(counts)
	return live, counts[len(counts)/2]
}

// Len is the number of entries, live or not yet pruned.
func (t *PeerTable) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}

func compareIDs(a, b peer.ID) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
