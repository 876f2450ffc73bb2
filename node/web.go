package node

import (
	"cmp"
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
)

// StatePath is the dashboard's data: the network as this node sees it.
const StatePath = "/api/v1/state"

//go:embed dashboard.html
var dashboardHTML []byte

// State is what the dashboard shows, served as JSON at StatePath.
type State struct {
	PeerID  string  `json:"peer_id"`
	Version string  `json:"version"`
	UptimeS float64 `json:"uptime_s"`
	// Reachability is this node's own, as AutoNAT found it.
	Reachability string `json:"reachability"`
	// Paused and PauseReason: this node's expert work is paused
	// (home.idle_only, home.max_load).
	Paused      bool   `json:"paused"`
	PauseReason string `json:"pause_reason,omitempty"`
	// Nodes are this node and the peers whose heartbeats it hears.
	Nodes []StateNode `json:"nodes"`
	// Models are the models the node knows of, and Coverage each expert's
	// live providers (an expert with fewer than two is at risk).
	Models   []StateModel    `json:"models"`
	Coverage []StateCoverage `json:"coverage"`
	// Spans are the layer spans served (by this node and the peers it
	// hears), each with its providers.
	Spans      []StateSpan     `json:"spans"`
	Throughput StateThroughput `json:"throughput"`
	Ledger     *StateLedger    `json:"ledger,omitempty"`
}

// StateNode is one node of the network.
type StateNode struct {
	PeerID string   `json:"peer_id"`
	Self   bool     `json:"self"`
	Roles  []string `json:"roles"`
	// Reachability: "public" (AutoNAT found it reachable), "direct" (a
	// direct connection to this node, e.g. after hole punching),
	// "relayed" (only through a relay), "private" or "unknown".
	Reachability string `json:"reachability"`
	// RTTMs is libp2p's measured round trip to the peer (0: not measured).
	RTTMs float64 `json:"rtt_ms"`
	// Experts are the experts it hosts ("layer:expert", all models), and
	// Spans the runs of layers it serves ("A-B", inclusive).
	Experts []string `json:"experts"`
	Spans   []string `json:"spans"`
	// Score is its reputation in this node's book (0 to 1; the prior for
	// peers never checked).
	Score float64 `json:"score"`
	// Load: the machine's 1-minute load average, queued expert requests, advertised
	// tokens per second, and whether it has paused expert work.
	CPULoad         float64 `json:"cpu_load"`
	QueueDepth      uint32  `json:"queue_depth"`
	TokensPerSecond float32 `json:"tokens_per_second"`
	Paused          bool    `json:"paused"`
	Version         string  `json:"version"`
	LastSeenMsAgo   int64   `json:"last_seen_ms_ago"`
	// Devices are the compute devices the node sees, from its heartbeat.
	Devices []DeviceStatus `json:"devices"`
}

// DeviceStatus is one compute device of a node.
type DeviceStatus struct {
	Backend     string `json:"backend"`
	Name        string `json:"name"`
	Description string `json:"description"`
	Type        string `json:"type"`
	MemoryTotal uint64 `json:"memory_total"`
	MemoryFree  uint64 `json:"memory_free"`
	// Selected: the node computes on it; ExpertTokensPerSecond is the
	// expert throughput it measured there (0: not measured).
	Selected              bool    `json:"selected"`
	ExpertTokensPerSecond float32 `json:"expert_tokens_per_second"`
}

func deviceStatuses(ds []*neuropb.Device) []DeviceStatus {
	out := []DeviceStatus{}
	for _, d := range ds {
		out = append(out, DeviceStatus{Backend: d.GetBackend(), Name: d.GetName(), Description: d.GetDescription(), Type: d.GetType(),
			MemoryTotal: d.GetMemoryTotalBytes(), MemoryFree: d.GetMemoryFreeBytes(), Selected: d.GetSelected(),
			ExpertTokensPerSecond: d.GetExpertTokensPerSecond()})
	}
	return out
}

// StateModel is a model and its shape.
type StateModel struct {
	Model   string `json:"model"`
	Layers  int    `json:"layers"`
	Experts int    `json:"experts"`
	// Known says the shape comes from the manifest; otherwise it is the
	// largest expert index heard.
	Known bool `json:"known"`
	// DenseLead leading layers have no experts.
	DenseLead int `json:"dense_lead"`
}

// StateSpan is one span of layers [First, Last] of a model and the
// nodes that serve it (not paused).
type StateSpan struct {
	Model     string   `json:"model"`
	First     int      `json:"first"`
	Last      int      `json:"last"`
	Providers []string `json:"providers"`
}

// StateCoverage is one expert's live providers.
type StateCoverage struct {
	Model     string `json:"model"`
	Layer     int    `json:"layer"`
	Expert    int    `json:"expert"`
	Providers int    `json:"providers"`
}

// StateThroughput is this node's live work.
type StateThroughput struct {
	// TokensPerS is generated tokens per second over the last 10 s
	// (gating nodes), ExpertCallsPerS answered expert calls per second.
	TokensPerS      float64 `json:"tokens_per_s"`
	Generated       int64   `json:"generated"`
	ExpertCallsPerS float64 `json:"expert_calls_per_s"`
	ExpertCalls     int64   `json:"expert_calls"`
}

// StateLedger is the ledger as this node sees it.
type StateLedger struct {
	Height   int64  `json:"height"`
	Supply   uint64 `json:"supply"`
	Treasury uint64 `json:"treasury"`
	Burned   uint64 `json:"burned"`
	Emitted  uint64 `json:"emitted"`
	Balance  uint64 `json:"balance"`
	Staked   uint64 `json:"staked"`
	SupplyOK bool   `json:"supply_ok"`
	Source   string `json:"source"`
	// Settlements are the latest this (gating) node submitted.
	Settlements []StateSettlement `json:"settlements"`
	Error       string            `json:"error,omitempty"`
}

// StateSettlement is one settlement this node submitted.
type StateSettlement struct {
	Escrow   uint64 `json:"escrow"`
	Receipts int    `json:"receipts"`
	FLOPs    uint64 `json:"flops"`
	UnixMs   int64  `json:"unix_ms"`
}

// webState is what the dashboard needs that the node keeps over time.
type webState struct {
	mu          sync.Mutex
	samples     []rateSample // the last 10 s, oldest first
	settlements []StateSettlement
	ledger      *StateLedger // cached for ledgerCache
	ledgerAt    time.Time
}

type rateSample struct {
	at            time.Time
	tokens, calls int64
}

// ledgerCache is how long a ledger reading is reused: a non-validator's
// costs a proven query to a validator.
const ledgerCache = 2 * time.Second

func (w *webState) settled(escrow uint64, rs []*neuropb.UsageReceipt) {
	s := StateSettlement{Escrow: escrow, Receipts: len(rs), UnixMs: time.Now().UnixMilli()}
	for _, r := range rs {
		s.FLOPs += r.GetFlops()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.settlements = append(w.settlements, s)
	if len(w.settlements) > 10 {
		w.settlements = w.settlements[len(w.settlements)-10:]
	}
}

// record keeps a sample (sampleRates takes one a second), dropping those
// older than 10 s.
func (w *webState) record(now time.Time, tokens, calls int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.samples = append(w.samples, rateSample{now, tokens, calls})
	for len(w.samples) > 1 && now.Sub(w.samples[0].at) > 10*time.Second {
		w.samples = w.samples[1:]
	}
}

// rates are the tokens and calls per second from the oldest sample kept
// to the counts now.
func (w *webState) rates(now time.Time, tokens, calls int64) (tps, cps float64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.samples) == 0 {
		return 0, 0
	}
	first := w.samples[0]
	if dt := now.Sub(first.at).Seconds(); dt > 0 {
		return float64(tokens-first.tokens) / dt, float64(calls-first.calls) / dt
	}
	return 0, 0
}

// sampleRates keeps the throughput samples fresh without a dashboard open.
func (n *Node) sampleRates(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			n.web.record(now, n.generated(), n.served())
		}
	}
}

func (n *Node) generated() int64 {
	if n.gating == nil {
		return 0
	}
	return n.gating.Generated()
}

func (n *Node) served() int64 {
	if n.expert == nil {
		return 0
	}
	return n.expert.Served()
}

// webHandler serves the public HTTP listener: the dashboard, its data,
// Prometheus metrics and, on a gating node, the OpenAI-compatible API.
// Nothing on it changes the node.
func (n *Node) webHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		_, _ = w.Write(dashboardHTML)
	})
	mux.HandleFunc("GET "+StatePath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		if err := json.NewEncoder(w).Encode(n.State(r.Context())); err != nil {
			n.log.Debug("write state", "err", err)
		}
	})
	mux.Handle("GET /metrics", n.metrics.Handler())
	if n.gating != nil {
		mux.Handle("/v1/", gating.HTTPHandler(n.gating, gating.HTTPOptions{Log: n.log, Auth: n.pay, Price: n.pay.cachedPrice}))
	}
	return mux
}

func reachString(r neuropb.Reachability) string {
	switch r {
	case neuropb.Reachability_REACHABILITY_PUBLIC:
		return "public"
	case neuropb.Reachability_REACHABILITY_PRIVATE:
		return "private"
	}
	return "unknown"
}

// peerReach is how this node reaches p: public (its AutoNAT says so),
// direct, relayed, or what its heartbeat says.
func (n *Node) peerReach(p peer.ID, announced neuropb.Reachability) string {
	if announced == neuropb.Reachability_REACHABILITY_PUBLIC {
		return "public"
	}
	direct, relayed := false, false
	for _, c := range n.p2p.LibP2P().Network().ConnsToPeer(p) {
		if c.Stat().Limited || isRelayed(c) {
			relayed = true
		} else {
			direct = true
		}
	}
	switch {
	case direct:
		return "direct"
	case relayed:
		return "relayed"
	}
	return reachString(announced)
}

func isRelayed(c network.Conn) bool {
	for _, p := range c.RemoteMultiaddr().Protocols() {
		if p.Name == "p2p-circuit" {
			return true
		}
	}
	return false
}

// spanNames names the spans a node's heartbeat announces ("A-B").
func spanNames(hosted []*neuropb.HostedModel) []string {
	out := []string{}
	for _, hm := range hosted {
		for _, sp := range hm.GetSpans() {
			out = append(out, fmt.Sprintf("%d-%d", sp.GetFirst(), sp.GetEnd()-1))
		}
	}
	return out
}

func expertNames(hosted []*neuropb.HostedModel) []string {
	out := []string{}
	for _, hm := range hosted {
		for _, x := range hm.GetExperts() {
			out = append(out, expert.Key{Layer: int(x >> 16), Expert: int(x & 0xffff)}.String())
		}
	}
	return out
}

// State is the network as this node sees it now.
func (n *Node) State(ctx context.Context) State {
	now := time.Now()
	h := n.p2p
	st := State{PeerID: h.ID().String(), Version: p2p.Version, UptimeS: now.Sub(n.started).Seconds(),
		Reachability: reachString(h.Reachability()), Paused: n.idle.Paused(), PauseReason: n.idle.Reason(),
		Nodes: []StateNode{}, Models: []StateModel{}, Coverage: []StateCoverage{}, Spans: []StateSpan{}}
	generated, served := n.generated(), n.served()
	tps, cps := n.web.rates(now, generated, served)
	st.Throughput = StateThroughput{TokensPerS: tps, Generated: generated, ExpertCallsPerS: cps, ExpertCalls: served}

	// This node, then its peers by ID.
	self := StateNode{PeerID: st.PeerID, Self: true, Roles: RoleNames(h.Roles()), Reachability: st.Reachability,
		Experts: []string{}, Spans: []string{}, Score: 1, Paused: st.Paused, Version: p2p.Version, CPULoad: p2p.Load1(), Devices: n.devices()}
	hb := &neuropb.Heartbeat{}
	if n.expert != nil {
		n.expert.HeartbeatExtra(hb)
		self.Experts, self.Spans = expertNames(hb.GetHosted()), spanNames(hb.GetHosted())
		self.QueueDepth, self.TokensPerSecond = hb.GetCapacity().GetQueueDepth(), hb.GetCapacity().GetTokensPerSecond()
		self.Devices = deviceStatuses(hb.GetCapacity().GetHardware().GetDevices())
	}
	st.Nodes = append(st.Nodes, self)
	peers := h.Peers().Snapshot(now)
	ps := h.LibP2P().Peerstore()
	// Providers of each expert, by model: the peers that are not paused.
	prov := map[string]map[uint32]int{}
	type spanKey struct {
		model       string
		first, last int
	}
	spans := map[spanKey][]string{}
	count := func(p string, hosted []*neuropb.HostedModel) {
		for _, hm := range hosted {
			m := cid.Undef
			if c, err := cid.Cast(hm.GetModel()); err == nil {
				m = c
			}
			if !m.Defined() {
				continue
			}
			if prov[m.String()] == nil {
				prov[m.String()] = map[uint32]int{}
			}
			for _, x := range hm.GetExperts() {
				prov[m.String()][x]++
			}
			for _, sp := range hm.GetSpans() {
				k := spanKey{m.String(), int(sp.GetFirst()), int(sp.GetEnd()) - 1}
				spans[k] = append(spans[k], p)
			}
		}
	}
	if !st.Paused {
		count(st.PeerID, hb.GetHosted())
	}
	for _, e := range peers {
		if e.ID == h.ID() {
			continue
		}
		sn := StateNode{PeerID: e.ID.String(), Roles: RoleNames(e.Roles), Reachability: n.peerReach(e.ID, e.Reachability),
			RTTMs: float64(ps.LatencyEWMA(e.ID).Microseconds()) / 1000, Experts: expertNames(e.Hosted), Spans: spanNames(e.Hosted),
			Score: n.book.Score(e.ID), CPULoad: float64(e.Load.GetCpuLoad1Centi()) / 100,
			QueueDepth: e.Capacity.GetQueueDepth(), TokensPerSecond: e.Capacity.GetTokensPerSecond(),
			Paused: e.Paused, Version: e.Version, LastSeenMsAgo: now.Sub(e.LastSeen).Milliseconds(),
			Devices: deviceStatuses(e.Capacity.GetHardware().GetDevices())}
		st.Nodes = append(st.Nodes, sn)
		if !e.Paused {
			count(e.ID.String(), e.Hosted)
		}
	}
	sort.Slice(st.Nodes[1:], func(i, j int) bool { return st.Nodes[1+i].PeerID < st.Nodes[1+j].PeerID })
	for k, ps := range spans {
		slices.Sort(ps)
		st.Spans = append(st.Spans, StateSpan{Model: k.model, First: k.first, Last: k.last, Providers: ps})
	}
	slices.SortFunc(st.Spans, func(a, b StateSpan) int {
		return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.First, b.First), cmp.Compare(a.Last, b.Last))
	})

	// Models: those this node serves or hosts, and those heard of.
	models := map[string]bool{}
	for _, c := range []string{n.cfg.Gating.ModelCID(n.cfg), n.cfg.Expert.Model} {
		if c != "" {
			models[c] = true
		}
	}
	for m := range prov {
		models[m] = true
	}
	names := make([]string, 0, len(models))
	for m := range models {
		names = append(names, m)
	}
	slices.Sort(names)
	for _, m := range names {
		sm := StateModel{Model: m}
		if c, err := cid.Decode(m); err == nil && n.expert != nil {
			if man, err := n.expert.Store().Manifest(c); err == nil {
				sm.Layers, sm.Experts, sm.Known = int(man.GetParams().GetLayers()), man.ExpertsPerLayer(), true
				sm.DenseLead = int(man.GetParams().GetDenseLead())
			}
		}
		if !sm.Known {
			for x := range prov[m] {
				sm.Layers, sm.Experts = max(sm.Layers, int(x>>16)+1), max(sm.Experts, int(x&0xffff)+1)
			}
		}
		st.Models = append(st.Models, sm)
		for l := sm.DenseLead; l < sm.Layers; l++ {
			for x := range sm.Experts {
				st.Coverage = append(st.Coverage, StateCoverage{Model: m, Layer: l, Expert: x, Providers: prov[m][uint32(l)<<16|uint32(x)]})
			}
		}
	}
	if n.ledger != nil {
		st.Ledger = n.ledgerState(ctx, now)
	}
	return st
}

// ledgerState reads the ledger for the dashboard, at most every
// ledgerCache.
func (n *Node) ledgerState(ctx context.Context, now time.Time) *StateLedger {
	n.web.mu.Lock()
	if c := n.web.ledger; c != nil && now.Sub(n.web.ledgerAt) < ledgerCache {
		out := *c
		out.Settlements = slices.Clone(n.web.settlements)
		n.web.mu.Unlock()
		return &out
	}
	n.web.mu.Unlock()
	out := &StateLedger{}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if info, err := n.ledgerInfo(ctx, n.p2p.ID()); err != nil {
		out.Error = err.Error()
	} else {
		out.Height, out.Supply, out.Treasury, out.Burned, out.Emitted = info.Height, info.Supply, info.Treasury, info.Burned, info.Emitted
		out.Balance, out.Staked, out.SupplyOK, out.Source = info.Balance, info.Staked, info.SupplyOK, info.Source
	}
	n.web.mu.Lock()
	defer n.web.mu.Unlock()
	n.web.ledger, n.web.ledgerAt = out, now
	cp := *out
	cp.Settlements = slices.Clone(n.web.settlements)
	if cp.Settlements == nil {
		cp.Settlements = []StateSettlement{}
	}
	return &cp
}
