package testnet

import (
	"context"
	"math"
	"runtime/metrics"
	"sync/atomic"
	"time"
)

// schedLatency follows how long this process's runnable goroutines wait
// for a core (the Go scheduler's latency, runtime/metrics
// /sched/latencies:seconds): its 90th percentile over each interval. When
// the simulation asks more of the machine than its cores give, this is
// what grows first — every node's timers, handshakes and replies wait in
// one run queue — while the CPU use only reads "all cores".
type schedLatency struct {
	p90 atomic.Int64 // nanoseconds, over the last interval
}

const schedLatencyMetric = "/sched/latencies:seconds"

// run samples the histogram every interval until ctx ends.
func (l *schedLatency) run(ctx context.Context, interval time.Duration) {
	sample := []metrics.Sample{{Name: schedLatencyMetric}}
	metrics.Read(sample)
	if sample[0].Value.Kind() != metrics.KindFloat64Histogram {
		return
	}
	prev := cloneHistogram(sample[0].Value.Float64Histogram())
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		metrics.Read(sample)
		cur := cloneHistogram(sample[0].Value.Float64Histogram())
		l.p90.Store(int64(quantileSince(prev, cur, 0.9) * float64(time.Second)))
		prev = cur
	}
}

// P90 is the latency's 90th percentile over the last interval (0 before
// the first interval, or when no goroutine was scheduled in it).
func (l *schedLatency) P90() time.Duration { return time.Duration(l.p90.Load()) }

func cloneHistogram(h *metrics.Float64Histogram) *metrics.Float64Histogram {
	return &metrics.Float64Histogram{Counts: append([]uint64(nil), h.Counts...), Buckets: h.Buckets}
}

// quantileSince is the q quantile, in seconds, of the events counted in
// cur and not in prev (two reads of one cumulative histogram): the upper
// bound of the bucket holding it (its lower bound for the last, unbounded
// bucket); 0 when there were none.
func quantileSince(prev, cur *metrics.Float64Histogram, q float64) float64 {
	if len(prev.Counts) != len(cur.Counts) {
		return 0
	}
	var total uint64
	for i := range cur.Counts {
		total += cur.Counts[i] - prev.Counts[i]
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i := range cur.Counts {
		seen += cur.Counts[i] - prev.Counts[i]
		if seen >= rank {
			if hi := cur.Buckets[i+1]; !math.IsInf(hi, 1) {
				return hi
			}
			return cur.Buckets[i]
		}
	}
	return 0
}
