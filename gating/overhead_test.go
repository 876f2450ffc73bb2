package gating

import (
	"testing"
	"time"
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
