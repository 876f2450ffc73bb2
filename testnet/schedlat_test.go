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

// The loopback testnet's nodes never have more compute threads than the
// machine has cores (ggml's spinning barriers), and each has one.
func TestShareCores(t *testing.T) {
	for _, c := range []struct{ cores, n, gating, expert, lanes int }{
		{1, 1, 1, 1, 1}, {2, 1, 1, 1, 2}, {2, 4, 1, 1, 1}, {4, 1, 2, 2, 2}, {16, 1, 8, 8, 2}, {16, 4, 8, 2, 2},
		{16, 3, 8, 2, 2}, {3, 1, 1, 2, 1}, {2, 2, 1, 1, 1}, {4, 2, 2, 1, 2},
	} {
		g, e, l := shareCores(c.cores, c.n)
		if g != c.gating || e != c.expert || l != c.lanes {
			t.Errorf("shareCores(%d cores, %d expert nodes) = %d, %d, %d; want %d, %d, %d", c.cores, c.n, g, e, l, c.gating, c.expert, c.lanes)
		}
		if c.cores >= 1+c.n && g+c.n*e > c.cores {
			t.Errorf("shareCores(%d, %d): %d threads on %d cores", c.cores, c.n, g+c.n*e, c.cores)
		}
		// While the gating node waits, the expert nodes' lanes take the
		// cores, and no more.
		if c.cores >= c.n && c.n*e*l > c.cores {
			t.Errorf("shareCores(%d, %d): %d lanes of %d threads on each of %d nodes, on %d cores", c.cores, c.n, l, e, c.n, c.cores)
		}
	}
}
