package testnet

import (
	"math"
	"runtime/metrics"
	"testing"
)

// The quantile is read from the events between two reads of the
// cumulative histogram, not from all since the start.
func TestQuantileSince(t *testing.T) {
	b := []float64{0, 0.001, 0.01, 0.1, math.Inf(1)}
	prev := &metrics.Float64Histogram{Buckets: b, Counts: []uint64{100, 0, 0, 0}}
	cur := &metrics.Float64Histogram{Buckets: b, Counts: []uint64{105, 4, 1, 0}}
	for _, c := range []struct{ q, want float64 }{{0.5, 0.001}, {0.9, 0.01}, {0.95, 0.1}, {0.1, 0.001}} {
		if got := quantileSince(prev, cur, c.q); got != c.want {
			t.Errorf("q %v: %v, want %v", c.q, got, c.want)
		}
	}
	if got := quantileSince(cur, cur, 0.9); got != 0 {
		t.Errorf("no events: %v, want 0", got)
	}
	last := &metrics.Float64Histogram{Buckets: b, Counts: []uint64{100, 0, 0, 10}}
	if got := quantileSince(prev, last, 0.9); got != 0.1 {
		t.Errorf("the unbounded bucket: %v, want its lower bound 0.1", got)
	}
}
