package node

import (
	"runtime"
	"sync"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
)

// capThreads applies home.threads (0: no cap) to a component's threads
// (0: every core).
func capThreads(threads, limit int) int {
	switch {
	case limit <= 0:
		return threads
	case threads <= 0:
		return min(limit, runtime.NumCPU())
	}
	return min(threads, limit)
}

// capLanes applies home.threads (0: no cap) to the expert lanes of threads
// threads each (capThreads's): lanes × threads stay within it.
func capLanes(lanes, threads, limit int) int {
	if limit <= 0 || lanes <= 1 {
		return lanes
	}
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	return max(1, min(lanes, limit/threads))
}

// countFetched wraps a shard-fetch progress callback to count the bytes
// fetched in the node's metrics.
func (n *Node) countFetched(next expert.Progress) expert.Progress {
	var mu sync.Mutex
	last := map[cid.Cid]int64{}
	return func(c cid.Cid, done, total int64) {
		mu.Lock()
		d := done - last[c]
		if done >= total {
			delete(last, c)
		} else {
			last[c] = done
		}
		mu.Unlock()
		n.metrics.ShardBytes(d)
		if next != nil {
			next(c, done, total)
		}
	}
}

// registerMetrics adds the counts the node's parts keep to its metrics,
// read when Prometheus scrapes.
func (n *Node) registerMetrics() {
	m := n.metrics
	if n.gating != nil {
		g := n.gating
		m.Counter("hedges_total", "Expert calls hedged to a second provider because the first was slow.", func() float64 { return float64(g.Hedges()) })
		m.Counter("redispatches_total", "Expert calls sent again because a provider failed.", func() float64 { return float64(g.Redispatches()) })
		m.Counter("generated_tokens_total", "Tokens this gating node generated.", func() float64 { return float64(g.Generated()) })
		m.Gauge("active_generations", "Generations running now.", func() float64 { return float64(g.Active()) })
		m.Gauge("queued_requests", "Requests waiting for a session.", func() float64 { return float64(g.Queued()) })
		m.Counter("lockstep_graphs_total", "Gating graphs computed for the generations' decode steps in lockstep.", func() float64 { n, _ := g.Lockstep(); return float64(n) })
		m.Counter("lockstep_rows_total", "Generations' rows those graphs held (rows / graphs: the generations a graph served).", func() float64 { _, r := g.Lockstep(); return float64(r) })
		if v := g.Validator(); v != nil {
			m.Counter("validation_checks_total", "Extra expert calls made to check answers.", func() float64 { _, c, _ := v.Stats(); return float64(c) })
			m.Counter("validation_failures_total", "Expert answers found wrong.", func() float64 { _, _, w := v.Stats(); return float64(w) })
		}
	}
	if n.expert != nil {
		e := n.expert
		m.Counter("expert_answers_total", "Expert requests this node answered.", func() float64 { return float64(e.Served()) })
		m.Gauge("experts_served", "Experts this node serves.", func() float64 { return float64(len(e.Loaded())) })
	}
	if n.ledger != nil {
		l := n.ledger
		m.Gauge("ledger_height", "The ledger's last committed height this node knows (validators).", func() float64 { return float64(l.Height()) })
		m.Gauge("ledger_mempool_txs", "Transactions waiting in this validator's mempool.", func() float64 { return float64(l.MempoolSize()) })
	}
	m.Gauge("peers_heard", "Peers whose heartbeats arrived within the expiry.", func() float64 { return float64(n.p2p.Peers().Len()) })
}
