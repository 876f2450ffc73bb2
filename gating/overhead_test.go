package gating

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
)

func TestOverheadHistogramQuantiles(t *testing.T) {
	var h OverheadHistogram
	if q := h.Quantile(0.5); q != 0 {
		t.Fatalf("empty histogram: p50 %v, want 0", q)
	}
	// 90 layers of 0.2 ms and 10 of 3 ms: the mean (0.48 ms) hides a
	// median of 0.2 ms; the tail shows at the 90th percentile.
	for range 90 {
		h.Add(200 * time.Microsecond)
	}
	for range 10 {
		h.Add(3 * time.Millisecond)
	}
	h.Add(-time.Microsecond) // a clock step back counts as 0
	h.Add(time.Hour)         // beyond the last bucket: counted there
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{
		{0, 5 * time.Microsecond},
		{0.5, 205 * time.Microsecond},
		{0.85, 205 * time.Microsecond},
		{0.9, 3005 * time.Microsecond}, // 102 counted: the 92nd is 3 ms
		{1, 4990 * time.Microsecond},
	} {
		if got := h.Quantile(c.q); got != c.want {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
}

// recordPoll is a moe.WaitPoller that counts its polls.
type recordPoll struct{ polls, stops int }

func (p *recordPoll) PollFor(time.Duration) { p.polls++ }
func (p *recordPoll) StopPolling()          { p.stops++ }

// A round polls unless its group went to a node that usually answers
// later than the poll lasts; the last round out stops the poll.
func TestStartPollSkipsSlowNodes(t *testing.T) {
	sel := NewSelector(nil)
	near, far, unknown := peer.ID("near"), peer.ID("far"), peer.ID("unknown")
	for range 3 {
		sel.Observe(near, 2*time.Millisecond, nil)
		sel.Observe(far, 60*time.Millisecond, nil) // across the internet
	}
	wp := &recordPoll{}
	r := &RemoteExperts{Client: expert.NewClient(nil, nil), Selector: sel, WaitPoll: wp, WaitPollFor: 5 * time.Millisecond}
	for _, c := range []struct {
		to   peer.ID
		want bool
	}{{near, true}, {unknown, true}, {"", true}, {far, false}} {
		if got := r.startPoll(c.to); got != c.want {
			t.Errorf("startPoll(%q) = %v, want %v", c.to, got, c.want)
		}
	}
	if wp.polls != 3 || wp.stops != 0 {
		t.Fatalf("%d polls, %d stops, want 3 and 0", wp.polls, wp.stops)
	}
	for range 3 {
		r.stopPoll()
	}
	if wp.stops != 1 {
		t.Fatalf("%d stops after three rounds ended, want one (by the last)", wp.stops)
	}
	r.WaitPoll = nil
	if r.startPoll(near) {
		t.Fatal("polled without a poller")
	}
}
