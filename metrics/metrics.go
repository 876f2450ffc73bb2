// Package metrics holds a node's Prometheus registry: neuro's own
// collectors (expert calls, latencies, batches, validation, shard fetches,
// the ledger) and go-libp2p's, which the host registers on the same
// registry. Each node has its own registry, so that several nodes in one
// process (tests) do not share figures of their own.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes neuro's metric names.
const Namespace = "neuro"

// Metrics are a node's collectors. The methods are safe on a nil
// *Metrics (they do nothing), so that code paths without metrics need no
// checks.
type Metrics struct {
	Registry *prometheus.Registry

	expertCalls  *prometheus.CounterVec
	callLatency  prometheus.Histogram
	computeTime  prometheus.Histogram
	batchTokens  prometheus.Histogram
	served       *prometheus.CounterVec
	shardBytes   prometheus.Counter
	idlePaused   prometheus.Gauge
	idlePauseCnt prometheus.Counter
}

// New makes a registry with Go's and the process's collectors and neuro's.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{Registry: reg}
	f := prometheus.WrapRegistererWithPrefix(Namespace+"_", reg)
	m.expertCalls = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "expert_calls_total",
		Help: "Expert calls this gating node made, by outcome: ok, error, or cancelled (lost to a hedge)."}, []string{"outcome"})
	m.callLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "expert_call_seconds",
		Help:    "Round trip of the expert calls that answered, as the gating node saw it.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)})
	m.computeTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "expert_compute_seconds",
		Help:    "Compute time of each batch this expert node ran.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	m.batchTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "expert_batch_tokens",
		Help:    "Tokens in each batch this expert node ran (requests that arrived together share one).",
		Buckets: prometheus.ExponentialBuckets(1, 2, 10)})
	m.served = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "expert_served_total",
		Help: "Expert requests this node answered, by outcome: ok, or the error code."}, []string{"outcome"})
	m.shardBytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "shard_fetched_bytes_total",
		Help: "Shard bytes fetched from peers."})
	m.idlePaused = prometheus.NewGauge(prometheus.GaugeOpts{Name: "idle_paused",
		Help: "1 while --idle-only has paused expert work because the machine is busy."})
	m.idlePauseCnt = prometheus.NewCounter(prometheus.CounterOpts{Name: "idle_pauses_total",
		Help: "Times --idle-only paused expert work."})
	f.MustRegister(m.expertCalls, m.callLatency, m.computeTime, m.batchTokens, m.served, m.shardBytes,
		m.idlePaused, m.idlePauseCnt)
	return m
}

// Handler serves the registry in Prometheus' text exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// Counter adds a counter read from f when scraped (a count kept elsewhere).
func (m *Metrics) Counter(name, help string, f func() float64) {
	if m != nil {
		m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help}, f))
	}
}

// Gauge adds a gauge read from f when scraped.
func (m *Metrics) Gauge(name, help string, f func() float64) {
	if m != nil {
		m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help}, f))
	}
}

// ExpertCall records one expert call of a gating node.
func (m *Metrics) ExpertCall(outcome string, latency time.Duration) {
	if m == nil {
		return
	}
	m.expertCalls.WithLabelValues(outcome).Inc()
	if outcome == "ok" {
		m.callLatency.Observe(latency.Seconds())
	}
}

// Batch records one batch an expert node computed, and its outcome for
// each of the requests in it.
func (m *Metrics) Batch(tokens, requests int, compute time.Duration, outcome string) {
	if m == nil {
		return
	}
	m.batchTokens.Observe(float64(tokens))
	m.computeTime.Observe(compute.Seconds())
	m.served.WithLabelValues(outcome).Add(float64(requests))
}

// ShardBytes records bytes of shards fetched.
func (m *Metrics) ShardBytes(n int64) {
	if m != nil && n > 0 {
		m.shardBytes.Add(float64(n))
	}
}

// IdlePaused records --idle-only pausing (true) or resuming expert work.
func (m *Metrics) IdlePaused(paused bool) {
	if m == nil {
		return
	}
	if paused {
		m.idlePaused.Set(1)
		m.idlePauseCnt.Inc()
	} else {
		m.idlePaused.Set(0)
	}
}
