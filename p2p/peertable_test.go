package p2p

import (
	"fmt"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/neuropb"
)

// hb is a heartbeat sent at Unix second sent.
func hb(seq uint64, sent int64) *neuropb.Heartbeat {
	return &neuropb.Heartbeat{Seq: seq, SentUnixMs: sent * 1000, Roles: []neuropb.Role{neuropb.Role_ROLE_EXPERT}}
}

func TestPeerTableObserve(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := peer.ID("a")
	tests := []struct {
		name    string
		prev    *neuropb.Heartbeat
		next    *neuropb.Heartbeat
		after   time.Duration
		changed bool
	}{
		{"newer", hb(1, 10), hb(2, 15), time.Second, true},
		{"duplicate", hb(2, 10), hb(2, 10), time.Second, false},
		{"out of order", hb(5, 20), hb(4, 18), time.Second, false},
		{"same send time, higher seq", hb(5, 20), hb(6, 20), time.Second, true},
		{"restart resets seq", hb(50, 200), hb(1, 210), time.Second, true},
		{"stale entry expired", hb(5, 20), hb(4, 18), time.Minute, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pt := NewPeerTable(10, 30*time.Second)
			pt.Observe(a, tc.prev, t0)
			if got := pt.Observe(a, tc.next, t0.Add(tc.after)); got != tc.changed {
				t.Fatalf("Observe = %v, want %v", got, tc.changed)
			}
			e, _ := pt.Get(a, t0.Add(tc.after))
			want := tc.prev.Seq
			if tc.changed {
				want = tc.next.Seq
			}
			if e.Seq != want {
				t.Fatalf("seq = %d, want %d", e.Seq, want)
			}
		})
	}
}

func TestPeerTableBoundedAndExpiring(t *testing.T) {
	t0 := time.Unix(1000, 0)
	pt := NewPeerTable(3, 10*time.Second)
	for i := range 5 {
		pt.Observe(peer.ID(fmt.Sprint(i)), hb(1, 1000), t0.Add(time.Duration(i)*time.Second))
	}
	if pt.Len() != 3 {
		t.Fatalf("len = %d, want the bound 3", pt.Len())
	}
	now := t0.Add(5 * time.Second)
	if _, ok := pt.Get("0", now); ok {
		t.Error("oldest peer was not evicted")
	}
	if _, ok := pt.Get("4", now); !ok {
		t.Error("newest peer missing")
	}
	snap := pt.Snapshot(now)
	if len(snap) != 3 || snap[0].ID != "2" || snap[2].ID != "4" {
		t.Fatalf("snapshot = %v", snap)
	}
	// Peers 2 and 3 were last heard at t0+2s and t0+3s: both gone at
	// t0+13.5s; 4 (t0+4s) is still there.
	later := t0.Add(13500 * time.Millisecond)
	if _, ok := pt.Get("2", later); ok {
		t.Error("expired peer still returned")
	}
	pt.Prune(later)
	if pt.Len() != 1 {
		t.Fatalf("after prune len = %d, want 1", pt.Len())
	}
	if e, ok := pt.Get("4", later); !ok || e.Heard != 1 {
		t.Fatalf("live peer: %+v %v", e, ok)
	}
}

// A peer that beats slowly (a large network) is kept for MissedHeartbeats
// of its own intervals; one that beats fast, or does not say, for the
// table's ttl.
func TestPeerTableExpiryFollowsThePeersInterval(t *testing.T) {
	t0 := time.Unix(1000, 0)
	pt := NewPeerTable(10, 30*time.Second)
	slow, fast, silent := hb(1, 1000), hb(1, 1000), hb(1, 1000)
	slow.IntervalMs, fast.IntervalMs = 60_000, 1_000
	pt.Observe("slow", slow, t0)
	pt.Observe("fast", fast, t0)
	pt.Observe("silent", silent, t0)
	at := func(d time.Duration) []string {
		var ids []string
		for _, e := range pt.Snapshot(t0.Add(d)) {
			ids = append(ids, string(e.ID))
		}
		return ids
	}
	if got := fmt.Sprint(at(29 * time.Second)); got != "[fast silent slow]" {
		t.Fatalf("at 29 s: %s", got)
	}
	if got := fmt.Sprint(at(31 * time.Second)); got != "[slow]" {
		t.Fatalf("at 31 s: %s (the ttl is the least)", got)
	}
	if got := fmt.Sprint(at(179 * time.Second)); got != "[slow]" {
		t.Fatalf("at 179 s: %s", got)
	}
	live, _ := pt.Stats(t0.Add(181 * time.Second))
	if got := at(181 * time.Second); len(got) != 0 || live != 0 {
		t.Fatalf("at 181 s: %v, %d live (3 missed minutes)", got, live)
	}
	if e, ok := pt.Get("slow", t0.Add(100*time.Second)); !ok || e.Interval != time.Minute || e.Expiry != 3*time.Minute {
		t.Fatalf("slow peer: %+v", e)
	}
}

// A key is provided again every interval, and as soon as the network has
// grown four times since it was (its records sit on the closest peers of a
// smaller network).
func TestProvisionDue(t *testing.T) {
	t0 := time.Unix(1000, 0)
	p := Provision{At: t0, Network: 10}
	for _, tc := range []struct {
		after time.Duration
		rt    int
		due   bool
	}{
		{time.Minute, 10, false},
		{time.Minute, 20, false},
		{time.Minute, 39, false},
		{time.Minute, 40, true},
		{12 * time.Hour, 10, true},
	} {
		if got := p.Due(t0.Add(tc.after), tc.rt, 12*time.Hour); got != tc.due {
			t.Errorf("after %v with %d peers: due %v, want %v", tc.after, tc.rt, got, tc.due)
		}
	}
	if !(Provision{}).Due(t0, 0, time.Hour) {
		t.Error("never provided: not due")
	}
	if first := (Provision{At: t0}); !first.Due(t0.Add(time.Second), 4, time.Hour) || first.Due(t0.Add(time.Second), 3, time.Hour) {
		t.Error("provided by a lone node: due once there are four nodes")
	}
}

// Once the network has grown four times, a key is provided again after
// its growth delay, counted from when the growth was first seen (and
// forgotten if the network shrinks back); the delays of a node's keys
// spread evenly within their bound: a share of the network's size, of
// the record's age and of maxGrowthSpread.
func TestProvisionsSpreadGrowthProvides(t *testing.T) {
	t0 := time.Unix(1000, 0)
	self := peer.ID("node-a")
	key := func(i int) cid.Cid { return cid.NewCidV1(cid.Raw, mustHash(t, fmt.Appendf(nil, "key %d", i))) }
	ps := NewProvisions(self)
	c := key(0)
	if !ps.Due(c, t0, 100, time.Hour) {
		t.Fatal("never provided: not due")
	}
	ps.Set(c, Provision{At: t0, Network: 100})
	grown := t0.Add(5 * time.Minute)
	d := GrowthDelay(self, c, 100, 5*time.Minute)
	if d <= 0 || d >= 5*time.Minute {
		t.Fatalf("delay %v: not within (0, 5m)", d)
	}
	if ps.Due(c, grown, 399, time.Hour) {
		t.Fatal("due before the network grew four times")
	}
	if ps.Due(c, grown, 400, time.Hour) || ps.Due(c, grown.Add(d-time.Millisecond), 400, time.Hour) {
		t.Fatal("due before its growth delay")
	}
	if !ps.Due(c, grown.Add(d), 450, time.Hour) {
		t.Fatal("not due after its growth delay")
	}
	// Shrunk back: the growth is forgotten, and counted again from when
	// it is seen next.
	if ps.Due(c, grown.Add(d), 300, time.Hour) || ps.Due(c, grown.Add(2*d), 400, time.Hour) || !ps.Due(c, grown.Add(3*d), 400, time.Hour) {
		t.Fatal("a growth seen again is not counted from then")
	}
	if !ps.Due(c, t0.Add(time.Hour), 100, time.Hour) {
		t.Fatal("not due after its interval")
	}
	ps.Set(c, Provision{At: grown, Network: 400})
	if ps.Due(c, grown.Add(time.Minute), 400, time.Hour) || ps.Get(c).Network != 400 {
		t.Fatal("provided again: still due")
	}

	// The bound: the record's age, 3 s a node, 10 min at most.
	for _, tc := range []struct {
		network int
		age     time.Duration
		bound   time.Duration
	}{
		{100, time.Hour, 5 * time.Minute},
		{10, time.Hour, 30 * time.Second},
		{1000, time.Hour, 10 * time.Minute},
		{100, 20 * time.Second, 20 * time.Second},
		{0, time.Hour, 3 * time.Second},
		{100, -time.Second, 0},
	} {
		var lo, hi time.Duration = tc.bound, 0
		for i := range 400 {
			d := GrowthDelay(self, key(i), tc.network, tc.age)
			if d < 0 || d > tc.bound || (tc.bound > 0 && d == tc.bound) {
				t.Fatalf("network %d, age %v: delay %v outside [0, %v)", tc.network, tc.age, d, tc.bound)
			}
			if d != GrowthDelay(self, key(i), tc.network, tc.age) {
				t.Fatal("a key's delay changes from call to call")
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		if tc.bound > 0 && (lo > tc.bound/20 || hi < tc.bound*19/20) {
			t.Errorf("network %d, age %v: 400 keys' delays within [%v, %v] of [0, %v)", tc.network, tc.age, lo, hi, tc.bound)
		}
	}
	if GrowthDelay(self, c, 100, time.Hour) == GrowthDelay("node-b", c, 100, time.Hour) {
		t.Error("two nodes wait as long for one key")
	}
}

func mustHash(t *testing.T, b []byte) multihash.Multihash {
	t.Helper()
	h, err := multihash.Sum(b, multihash.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestPeerTableStats(t *testing.T) {
	t0 := time.Unix(1000, 0)
	pt := NewPeerTable(10, 30*time.Second)
	if n, m := pt.Stats(t0); n != 0 || m != 0 {
		t.Fatalf("empty: %d, %d", n, m)
	}
	for i, heard := range []uint32{0, 40, 300, 300, 100000} {
		b := hb(1, 1000)
		b.PeersHeard = heard
		pt.Observe(peer.ID(fmt.Sprint(i)), b, t0)
	}
	// Four announced a count: 40, 300, 300 and 100,000.
	if n, m := pt.Stats(t0.Add(time.Second)); n != 5 || m != 300 {
		t.Fatalf("stats %d, %d; want 5 peers, median 300", n, m)
	}
}

// Hosting and HostingCounts follow each peer's latest heartbeat: an
// expert a peer stops listing, a peer that expires and a peer evicted to
// make room are no longer counted; another model's experts never are.
func TestPeerTableHosting(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m, other := []byte("model"), []byte("other")
	hosting := func(seq uint64, sent int64, experts ...uint32) *neuropb.Heartbeat {
		h := hb(seq, sent)
		h.Hosted = []*neuropb.HostedModel{{Model: m, Experts: experts}, {Model: other, Experts: []uint32{7}}}
		return h
	}
	pt := NewPeerTable(3, 10*time.Second)
	pt.Observe("a", hosting(1, 1000, 1<<16|2, 3), t0)
	pt.Observe("b", hosting(1, 1000, 1<<16|2), t0.Add(time.Second))
	ids := func(es []PeerInfo) (out []peer.ID) {
		for _, e := range es {
			out = append(out, e.ID)
		}
		return out
	}
	check := func(now time.Time, want map[uint32]int, providers []peer.ID) {
		t.Helper()
		if got := pt.HostingCounts(m, now); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("counts %v, want %v", got, want)
		}
		if got := ids(pt.Hosting(m, 1<<16|2, now)); fmt.Sprint(got) != fmt.Sprint(providers) {
			t.Fatalf("providers of 1/2: %v, want %v", got, providers)
		}
	}
	check(t0.Add(time.Second), map[uint32]int{1<<16 | 2: 2, 3: 1}, []peer.ID{"a", "b"})
	pt.Observe("a", hosting(2, 1002, 3), t0.Add(2*time.Second)) // a drops 1/2
	check(t0.Add(2*time.Second), map[uint32]int{1<<16 | 2: 1, 3: 1}, []peer.ID{"b"})
	check(t0.Add(11500*time.Millisecond), map[uint32]int{3: 1}, nil)   // b expired
	pt.Observe("b", hosting(2, 1012, 1<<16|2), t0.Add(12*time.Second)) // and is back
	check(t0.Add(12*time.Second), map[uint32]int{1<<16 | 2: 1, 3: 1}, []peer.ID{"b"})
	pt.Observe("c", hosting(1, 1013), t0.Add(13*time.Second))
	pt.Observe("d", hosting(1, 1013), t0.Add(13*time.Second)) // a, heard longest ago, makes room
	check(t0.Add(13*time.Second), map[uint32]int{1<<16 | 2: 1}, []peer.ID{"b"})
	// An expert a peer is still loading is counted (a node choosing what
	// to host sees it taken) but the peer is not its provider yet; once
	// loaded, it is.
	loading := hosting(2, 1014)
	loading.Hosted[0].Loading = []uint32{1<<16 | 2}
	pt.Observe("c", loading, t0.Add(14*time.Second))
	check(t0.Add(14*time.Second), map[uint32]int{1<<16 | 2: 2}, []peer.ID{"b"})
	pt.Observe("c", hosting(3, 1015, 1<<16|2), t0.Add(15*time.Second))
	check(t0.Add(15*time.Second), map[uint32]int{1<<16 | 2: 2}, []peer.ID{"b", "c"})
	pt.Prune(t0.Add(time.Hour))
	if len(pt.hosting) != 0 || len(pt.loading) != 0 {
		t.Fatalf("index after everyone expired: %v, loading %v", pt.hosting, pt.loading)
	}
	if got := pt.HostingCounts(other, t0); len(got) != 0 {
		t.Fatalf("other model: %v", got)
	}
}

// Spans lists the live, unpaused peers announcing each span of a model.
func TestPeerTableSpans(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m := []byte("model")
	spans := func(seq uint64, sent int64, paused bool, rs ...[2]uint32) *neuropb.Heartbeat {
		h := hb(seq, sent)
		hm := &neuropb.HostedModel{Model: m}
		for _, r := range rs {
			hm.Spans = append(hm.Spans, &neuropb.LayerRange{First: r[0], End: r[1]})
		}
		h.Hosted, h.Paused = []*neuropb.HostedModel{hm, {Model: []byte("other"), Spans: []*neuropb.LayerRange{{First: 0, End: 9}}}}, paused
		return h
	}
	pt := NewPeerTable(8, 10*time.Second)
	pt.Observe("b", spans(1, 1000, false, [2]uint32{0, 2}, [2]uint32{2, 4}), t0)
	pt.Observe("a", spans(1, 1000, false, [2]uint32{0, 2}), t0)
	pt.Observe("c", spans(1, 1000, true, [2]uint32{2, 4}), t0)
	want := map[[2]int][]peer.ID{{0, 2}: {"a", "b"}, {2, 4}: {"b"}}
	if got := pt.Spans(m, t0.Add(time.Second)); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("spans %v, want %v", got, want)
	}
	if got := pt.Spans(m, t0.Add(time.Minute)); len(got) != 0 {
		t.Fatalf("spans after everyone expired: %v", got)
	}
}

// A peer is overdue once it has been silent for twice its interval, or a
// third of its expiry when it did not say its interval.
func TestPeerInfoOverdue(t *testing.T) {
	t0 := time.Unix(1000, 0)
	for _, c := range []struct {
		info   PeerInfo
		silent time.Duration
		want   bool
	}{
		{PeerInfo{Interval: time.Minute}, 90 * time.Second, false}, // within a wait's spread
		{PeerInfo{Interval: time.Minute}, 121 * time.Second, true},
		{PeerInfo{Expiry: 30 * time.Second}, 9 * time.Second, false},
		{PeerInfo{Expiry: 30 * time.Second}, 11 * time.Second, true},
		{PeerInfo{}, time.Hour, false}, // nothing to go by
	} {
		c.info.LastSeen = t0
		if got := c.info.Overdue(t0.Add(c.silent)); got != c.want {
			t.Errorf("%+v silent %v: Overdue = %v, want %v", c.info, c.silent, got, c.want)
		}
	}
}

// A leaving heartbeat removes the peer; a heartbeat it sent before, which
// gossip delivers late, does not bring it back; a restart's newer one
// does.
func TestPeerTableLeaving(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := peer.ID("a")
	pt := NewPeerTable(10, 30*time.Second)
	pt.Observe(a, hb(1, 10), t0)
	leaving := hb(3, 30)
	leaving.Leaving = true
	if !pt.Observe(a, leaving, t0.Add(time.Second)) {
		t.Fatal("the leaving heartbeat changed nothing")
	}
	if _, ok := pt.Get(a, t0.Add(time.Second)); ok {
		t.Fatal("the peer is still in the table after leaving")
	}
	if pt.Observe(a, hb(2, 20), t0.Add(2*time.Second)) {
		t.Fatal("a heartbeat sent before the leaving one brought the peer back")
	}
	if _, ok := pt.Get(a, t0.Add(2*time.Second)); ok {
		t.Fatal("the peer is back after a late heartbeat")
	}
	if !pt.Observe(a, hb(1, 50), t0.Add(3*time.Second)) {
		t.Fatal("the restarted peer's heartbeat was ignored")
	}
	if _, ok := pt.Get(a, t0.Add(3*time.Second)); !ok {
		t.Fatal("the restarted peer is not in the table")
	}
}

// The hosting version changes when what the peers host may have, not with
// every heartbeat.
func TestPeerTableHostingVersion(t *testing.T) {
	t0 := time.Unix(1000, 0)
	pt := NewPeerTable(10, 30*time.Second)
	hosting := func(seq uint64, sent int64, experts ...uint32) *neuropb.Heartbeat {
		h := hb(seq, sent)
		h.Hosted = []*neuropb.HostedModel{{Model: []byte("m"), Experts: experts}}
		return h
	}
	v0 := pt.HostingVersion()
	pt.Observe("a", hosting(1, 10, 1, 2), t0)
	v1 := pt.HostingVersion()
	if v1 == v0 {
		t.Fatal("a new peer did not change the version")
	}
	pt.Observe("a", hosting(2, 11, 1, 2), t0.Add(time.Second))
	if pt.HostingVersion() != v1 {
		t.Fatal("a heartbeat hosting the same changed the version")
	}
	pt.Observe("a", hosting(3, 12, 1, 3), t0.Add(2*time.Second))
	v2 := pt.HostingVersion()
	if v2 == v1 {
		t.Fatal("a heartbeat hosting other experts did not change the version")
	}
	pt.Prune(t0.Add(time.Hour))
	if pt.HostingVersion() == v2 {
		t.Fatal("pruning the peer did not change the version")
	}
}
