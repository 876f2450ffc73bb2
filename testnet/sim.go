package testnet

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/routing"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/testnet/simnet"
)

// Sim runs a network of many real nodes inside this process, so that what
// is measured is the network (the DHT, GossipSub and its heartbeats,
// automatic hosting, gating nodes finding providers) at a size no machine
// could run as processes. Every node is a real node.Node with its own home
// and store, on a libp2p host of an in-process network (testnet/simnet:
// real Noise and yamux over in-memory pipes, each link delayed by
// Latency); the experts are a small real model (real compute, a fraction
// of a millisecond a call), shared through the network as in any testnet.
//
// The first Bootstrap nodes are bootstrap nodes and hold the model; the
// next Gating are gating nodes (holding it too), each asked prompts by a
// user of its own through the client library; the rest join JoinRate a
// second and host experts ("auto", with a memory budget sized so that each
// expert would have about four providers), fetched from the others. With Churn, expert
// nodes are killed (closed without warning the others: nothing in the
// protocol says goodbye) and new ones join at that rate.
type Sim struct {
	// Nodes is every node of the network (at least Bootstrap + Gating + 2).
	Nodes int
	// Gating nodes (default 1 per 100 nodes, at least 1), and bootstrap
	// nodes (1 per 100 nodes, at least 2: one alone serves every newcomer
	// and falls behind): every other node knows the bootstrap nodes'
	// addresses, as a real network's nodes know a few.
	Gating    int
	Bootstrap int
	// JoinRate is how many nodes join a second while the network starts
	// (default 4): a network grows, it does not start all at once.
	JoinRate float64
	// JoinLatency holds each joining node back (by up to three join
	// intervals) while this process's scheduler latency, p90 over the
	// last second, is above it (default 50ms; negative: never): the
	// machine, not the network, is then what a node joining would meet.
	JoinLatency time.Duration
	// Churn is how many expert nodes are replaced a minute. A node
	// killed stops without a word to its peers (a crash), unless
	// ChurnLeaves: then it tells them it leaves, as a node stopped by its
	// owner does (p2p.Host.Leave).
	Churn       float64
	ChurnLeaves bool
	// Duration is how long the network runs once healthy (default 1m).
	Duration time.Duration
	// Sample is the interval of the samples over time (default 5s).
	Sample time.Duration
	// AskEvery is how often each gating node's user asks a prompt
	// (default 3s), of MaxTokens tokens (default 8).
	AskEvery  time.Duration
	MaxTokens int
	// PromptTimeout is how long a user waits for a whole answer before it
	// counts the prompt unanswered (default 1m). The nodes of a simulation
	// share one machine: one busy with other work answers slowly, not
	// wrongly, and a test of what is answered waits longer.
	PromptTimeout time.Duration
	// MinAsks, if set, keeps the users asking past Duration until each
	// has asked this many prompts (at most MinAsksWait more; churn stops
	// at Duration): on a machine slow enough that prompts take longer than
	// AskEvery, a run still sees the prompts it was meant to see, however
	// long they take, rather than fewer of them.
	MinAsks int
	// Latency delays every link one way (half a round trip); Jitter
	// spreads each link's delay uniformly by up to ± this.
	Latency, Jitter time.Duration
	// Sybils join once the honest network is healthy, JoinRate a second
	// (SybilKinds says what each does); the measured run starts once they
	// have joined and provided their lies in the DHT. None by default.
	Sybils int
	// Seed makes the model and the choices of the simulation (whom to
	// kill, which lookup to make) reproducible.
	Seed uint64
	// Timeout bounds the time to healthy (default 2m + 1.5s a node: on a
	// 2-core machine, 300 nodes joining 4 a second were healthy after
	// 5m51s, and a run given 2m plus the joining time, 3m15s, failed with
	// one expert still on a single node; healthy now also waits for the
	// last nodes to take their experts, each after hearing most of the
	// network, about one heartbeat interval: 5m39s at 300 nodes).
	Timeout time.Duration
	// Warmup is how long the healthy network runs on its own (no users,
	// no churn, no Sybils) before the measured run: the joining leaves
	// work behind (provides, fetches, routing-table refreshes) that a
	// saturated machine takes minutes to clear. 0: none.
	Warmup time.Duration
	// OnHealthy, if set, is called once the honest network is healthy,
	// before Sybils join and the measured run starts (neurod starts its
	// CPU profile there with --profile-healthy).
	OnHealthy func()
	// HeapProfile, if set, is a file the process's heap profile is written
	// to once the run ends, before the nodes stop (go tool pprof).
	HeapProfile string
	// Compute is the backend every node computes on (neurod: ggml).
	Compute moe.Backend
	// Dir holds the homes. Log tells the simulation's progress; NodeLog
	// receives the nodes' own logs (both default: discarded).
	Dir     string
	Log     *slog.Logger
	NodeLog *slog.Logger
}

// SimSample is the network at one moment.
type SimSample struct {
	AtS  float64 `json:"at_s"`
	Live int     `json:"live"`
	// CoverageMin is the fewest live nodes serving any expert; Uncovered
	// counts experts with fewer than two.
	CoverageMin int `json:"coverage_min"`
	Uncovered   int `json:"uncovered"`
	// Gossip per live node and second over the last interval (both ways).
	GossipBytesPerS float64 `json:"gossip_bytes_per_s"`
	GossipMsgsPerS  float64 `json:"gossip_msgs_per_s"`
	// GossipControlPerS is the part of the bytes that is GossipSub's
	// control messages (IHAVE, IWANT, GRAFT, PRUNE).
	GossipControlPerS float64 `json:"gossip_control_bytes_per_s"`
	// HeartbeatsPerS is the heartbeats the whole network published a
	// second over the interval; OutOfTurnPerS the part published at
	// once because a node changed what it hosts.
	HeartbeatsPerS float64 `json:"heartbeats_per_s"`
	OutOfTurnPerS  float64 `json:"heartbeats_out_of_turn_per_s"`
	// SwapsPerS is the experts the network's automatic hosting dropped a
	// second for a worse-provided one: 0 once hosting has converged.
	SwapsPerS float64 `json:"swaps_per_s"`
	// DialsPerS is the connections the whole network dialled a second
	// (each a Noise handshake and an identify on both hosts).
	DialsPerS float64 `json:"dials_per_s"`
	// ProvidesPerS is the provider records the network put in the DHT a
	// second, ProviderLookupsPerS the provider lookups it made (each a
	// DHT lookup; most of the dials are theirs).
	ProvidesPerS        float64 `json:"provides_per_s"`
	ProviderLookupsPerS float64 `json:"provider_lookups_per_s"`
	// TopicDiscoveriesPerS is how often the network's GossipSub routers
	// asked for more peers of a topic whose mesh was short.
	TopicDiscoveriesPerS float64 `json:"topic_discoveries_per_s"`
	// CopiesDroppedPerS is the copies of gossip messages a node dropped
	// a second before validating them (an identical copy was being
	// validated or had just been delivered: p2p's copy filter).
	CopiesDroppedPerS float64 `json:"copies_dropped_per_s"`
	Asked             int     `json:"asked"`
	Answered          int     `json:"answered"`
	// The process: resident memory, cores used over the interval,
	// goroutines.
	RSSBytes   uint64  `json:"rss_bytes"`
	CPUCores   float64 `json:"cpu_cores"`
	Goroutines int     `json:"goroutines"`
	// SchedP90Ms is how long the process's runnable goroutines waited
	// for a core, p90 over the last second: above a few milliseconds the
	// machine, not the simulated network, sets the pace.
	SchedP90Ms float64 `json:"sched_p90_ms"`
}

// SimNode is one node of the simulation.
type SimNode struct {
	Index  int    `json:"index"`
	PeerID string `json:"peer_id"`
	Role   string `json:"role"` // bootstrap, gating or expert
	Alive  bool   `json:"alive"`
	// Experts it served at the end (or when it was killed).
	Experts int     `json:"experts"`
	UptimeS float64 `json:"uptime_s"`
	// Gossip sent and received over its life, per second.
	GossipBytesPerS float64 `json:"gossip_bytes_per_s"`
	GossipMsgsPerS  float64 `json:"gossip_msgs_per_s"`
	// RSSBytes is the node's share of the process's resident memory (the
	// nodes share one process, whose memory cannot be told apart).
	RSSBytes uint64 `json:"rss_bytes"`
	// RoutingTable is the size of its DHT routing table at the end, and
	// Conns the peers it had a connection to (-1: not read in time).
	RoutingTable int `json:"routing_table"`
	Conns        int `json:"conns"`
}

// Dist summarises a sample of values.
type Dist struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func distOf(v []float64) Dist {
	if len(v) == 0 {
		return Dist{}
	}
	s := slices.Sorted(slices.Values(v))
	return Dist{N: len(s), P50: Percentile(s, 0.5), P99: Percentile(s, 0.99), Max: s[len(s)-1]}
}

// DHTLookups are the simulation's provider lookups: from a random live
// node, the providers of a random expert (its DHT key), timed to the first
// provider found. Hops is how far the lookup went: a peer the node knew is
// one hop, a peer learnt from a peer of hop h is h+1.
type DHTLookups struct {
	Lookups int  `json:"lookups"`
	Found   int  `json:"found"`
	Ms      Dist `json:"ms"`
	Hops    Dist `json:"hops"`
	Queried Dist `json:"peers_queried"`
}

// SimReport is the outcome of a simulation.
type SimReport struct {
	NodeCount      int     `json:"node_count"`
	BootstrapNodes int     `json:"bootstrap_nodes"`
	GatingNodes    int     `json:"gating_nodes"`
	ChurnPerMin    float64 `json:"churn_per_min"`
	LatencyMs      float64 `json:"latency_ms"` // one way
	DurationS      float64 `json:"duration_s"`
	// HealthyS is the time from the first node's start until every node
	// was up, every gating node had loaded the model and every expert had
	// at least two live providers.
	HealthyS float64 `json:"healthy_s"`
	// WarmupS is how long the healthy network then ran before the
	// measured run (Sim.Warmup).
	WarmupS float64 `json:"warmup_s"`
	// JoinWaitedS is how long the starting nodes were held back, in all,
	// for the scheduler's latency (Sim.JoinLatency).
	JoinWaitedS float64 `json:"join_waited_s"`
	Killed      int     `json:"killed"`
	Joined      int     `json:"joined"`
	// JoinFailed counts the nodes that could not join while the network
	// started (their bootstrap peers did not answer within
	// p2p.bootstrap_timeout): they are left out.
	JoinFailed int `json:"join_failed"`
	// Prompts asked and fully answered, the first errors, and the
	// latency of every token after each answer's first.
	Asked    int      `json:"asked"`
	Answered int      `json:"answered"`
	Errors   []string `json:"errors,omitempty"`
	TokenMs  Dist     `json:"token_ms"`
	// CoverageMin at the end, once churn has stopped and the network has
	// settled (SettleS: how long that took, at most 90 s), and the lowest
	// seen while it ran.
	CoverageMin     int        `json:"coverage_min"`
	SettleS         float64    `json:"settle_s"`
	CoverageLowest  int        `json:"coverage_lowest"`
	DHT             DHTLookups `json:"dht"`
	GossipBytesPerS float64    `json:"gossip_bytes_per_s"` // mean per live node, once healthy
	// GossipBytesPerSP50 is the median of the samples' (the mean carries
	// the burst of the first seconds, when the last nodes to join choose
	// experts and beat at a small network's pace).
	GossipBytesPerSP50 float64 `json:"gossip_bytes_per_s_p50"`
	GossipMsgsPerS     float64 `json:"gossip_msgs_per_s"`
	// TopicMsgsInPerS is the messages a node received a second, per topic
	// (duplicates included; the mean over every node's life).
	TopicMsgsInPerS map[string]float64 `json:"topic_msgs_in_per_s"`
	// DeliveredPerS is the distinct messages a node received a second.
	DeliveredPerS float64 `json:"delivered_per_s"`
	// The process: peak resident memory and its share per node, and the
	// cores one node used (process CPU ÷ live nodes) once healthy.
	RSSBytes        uint64      `json:"rss_bytes"`
	RSSBytesPerNode uint64      `json:"rss_bytes_per_node"`
	CPUPerNode      float64     `json:"cpu_per_node"`
	Samples         []SimSample `json:"samples"`
	Nodes           []SimNode   `json:"nodes"`
	// DialCallers is what the honest nodes dialled for during the
	// measured run (after Warmup): the code that asked (simnet.DialCallers) and its dials
	// a second, most first (the first 16). Dials to a node that is gone
	// count too (refused at once, they cost no handshake).
	DialCallers []DialCaller `json:"dial_callers"`
	// Sybils is what the Sybils did and what the honest nodes made of
	// them (with Sim.Sybils).
	Sybils *SybilReport `json:"sybils,omitempty"`
}

// DialCaller is one caller of dials and its dials a second.
type DialCaller struct {
	Caller string  `json:"caller"`
	PerS   float64 `json:"per_s"`
}

// simNode is one node the simulation started.
type simNode struct {
	SimNode
	n *node.Node
	// swaps is its expert service's Swaps when it was retired.
	swaps int64
	// up: the node has started (joined); churn kills only such nodes, so
	// that a node is counted once, as joined or as failed to join.
	up      atomic.Bool
	started time.Time
	ended   time.Time
	traffic p2p.Traffic // at the end
}

// simulation is one run of a Sim.
type simulation struct {
	s     *Sim
	log   *slog.Logger
	rng   *rand.Rand
	model *Model
	net   *simnet.Network
	keys  []cid.Cid // every expert's DHT key
	// keyExperts are the experts of keys, as layer<<16 | expert.
	keyExperts []uint32
	boot       []string
	mem        int // expert.memory_mb of an expert node

	mu    sync.Mutex
	nodes []*simNode
	rep   SimReport
	tok   []float64
	dht   []dhtLookup

	sched   schedLatency
	closing sync.WaitGroup // nodes being killed
	joining sync.WaitGroup // nodes joining under churn
	settled bool           // settle has set the final coverage

	sybils   []*sybil
	sybilRep SybilReport

	// dials counts what the honest hosts dialled for; runDials is its
	// count when the measured run started, at runAt (after any warmup).
	dials    *simnet.DialCallers
	runAt    time.Time
	runDials []simnet.Caller
}

type dhtLookup struct {
	found         bool
	ms            float64
	hops, queried int
}

// simParams is the simulation's model: 4 MoE layers of 16 experts, each
// expert about 0.4 MB at q8_0 (a memory budget in whole MB then holds a
// few), top-2 routing.
var simParams = model.Params{Layers: 4, Experts: 16, ExpertsUsed: 2, Embd: 128, FF: 1024, Heads: 4, KVHeads: 2,
	Vocab: 512, Context: 256, RopeFreqBase: 10000, RMSEps: 1e-5}

// simPrompt is what every user asks.
const simPrompt = "many small machines run one large model together"

// Run runs the simulation: it starts the nodes, waits until the network
// is healthy, runs it for Duration with churn, users and lookups, stops
// every node and reports.
func (s *Sim) Run(ctx context.Context) (*SimReport, error) {
	if err := s.defaults(); err != nil {
		return nil, err
	}
	sm := &simulation{s: s, log: s.Log, rng: rand.New(rand.NewPCG(s.Seed, 0x5eed)), net: simnet.New(s.latency()),
		dials: simnet.NewDialCallers()}
	sm.rep = SimReport{NodeCount: s.Nodes, BootstrapNodes: s.Bootstrap, GatingNodes: s.Gating, ChurnPerMin: s.Churn, LatencyMs: ms(s.Latency), CoverageLowest: math.MaxInt}
	defer sm.stopAll()
	if err := sm.prepare(); err != nil {
		return nil, err
	}
	sctx, stopSched := context.WithCancel(ctx)
	defer stopSched()
	go sm.sched.run(sctx, time.Second)
	t0 := time.Now()
	hctx, cancel := context.WithTimeout(ctx, s.Timeout)
	err := sm.launch(hctx)
	if err == nil {
		err = sm.waitHealthy(hctx)
	}
	cancel()
	if err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	sm.rep.HealthyS = time.Since(t0).Seconds()
	sm.log.Info("sim: healthy", "nodes", s.Nodes, "took", time.Since(t0).Round(time.Millisecond))
	if s.Warmup > 0 {
		sm.log.Info("sim: warming up", "for", s.Warmup)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("sim: %w", ctx.Err())
		case <-time.After(s.Warmup):
		}
		sm.rep.WarmupS = s.Warmup.Seconds()
	}
	sm.runAt, sm.runDials = time.Now(), sm.dials.Counts()
	if s.OnHealthy != nil {
		s.OnHealthy()
	}
	if err := sm.launchSybils(ctx); err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	if err := sm.run(ctx); err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	sm.sybilScores()
	sm.report()
	if s.HeapProfile != "" {
		if err := writeHeapProfile(s.HeapProfile); err != nil {
			return nil, fmt.Errorf("sim: %w", err)
		}
	}
	return &sm.rep, nil
}

// latency is each link's one-way delay: Latency ± Jitter, fixed per
// pair of hosts (a hash of the two), the same both ways.
func (s *Sim) latency() func(a, b uint64) time.Duration {
	if s.Latency <= 0 && s.Jitter <= 0 {
		return nil
	}
	return func(a, b uint64) time.Duration {
		if a > b {
			a, b = b, a
		}
		r := rand.New(rand.NewPCG(a, b^s.Seed))
		return max(0, s.Latency+time.Duration((2*r.Float64()-1)*float64(s.Jitter)))
	}
}

func (s *Sim) defaults() error {
	if s.Gating <= 0 {
		s.Gating = max(1, s.Nodes/100)
	}
	if s.Bootstrap <= 0 {
		s.Bootstrap = max(2, s.Nodes/100)
	}
	if s.Nodes < s.Bootstrap+s.Gating+2 {
		return fmt.Errorf("sim: --nodes %d: need at least %d (%d bootstrap, %d gating, 2 expert nodes)", s.Nodes, s.Bootstrap+s.Gating+2, s.Bootstrap, s.Gating)
	}
	if s.JoinRate <= 0 {
		s.JoinRate = 4
	}
	if s.JoinLatency == 0 {
		s.JoinLatency = 50 * time.Millisecond
	}
	if s.Churn < 0 {
		return fmt.Errorf("sim: churn %v a minute is negative", s.Churn)
	}
	if s.Compute == nil {
		return errors.New("sim: no compute backend")
	}
	if s.Dir == "" {
		return errors.New("sim: no directory")
	}
	if s.Duration <= 0 {
		s.Duration = time.Minute
	}
	if s.Sample <= 0 {
		s.Sample = 5 * time.Second
	}
	if s.AskEvery <= 0 {
		s.AskEvery = 3 * time.Second
	}
	if s.MaxTokens <= 0 {
		s.MaxTokens = 8
	}
	if s.PromptTimeout < 0 {
		return fmt.Errorf("sim: a prompt timeout of %v is negative", s.PromptTimeout)
	}
	if s.PromptTimeout == 0 {
		s.PromptTimeout = time.Minute
	}
	if s.MinAsks < 0 {
		return fmt.Errorf("sim: %d prompts a user is negative", s.MinAsks)
	}
	if s.Timeout <= 0 {
		s.Timeout = 2*time.Minute + time.Duration(s.Nodes)*1500*time.Millisecond
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.NodeLog == nil {
		s.NodeLog = slog.New(slog.DiscardHandler)
	}
	return nil
}

// prepare generates and splits the model, and sizes the expert nodes'
// memory so that each expert would have about four providers.
func (sm *simulation) prepare() error {
	if err := os.MkdirAll(sm.s.Dir, 0o755); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	path := filepath.Join(sm.s.Dir, "model.gguf")
	var buf bytes.Buffer
	if err := model.Generate(&buf, simParams, model.Q8_0, sm.s.Seed); err != nil {
		return fmt.Errorf("sim: generate model: %w", err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	m, err := PrepareModel(sm.s.Dir, path, sm.log, model.SplitOptions{})
	if err != nil {
		return err
	}
	sm.model = m
	first := m.FirstMoELayer()
	var size int64
	for l := first; l < m.Layers(); l++ {
		for e := range m.Experts() {
			sm.keys = append(sm.keys, neuropb.ExpertKey(m.CID, l, e))
			sm.keyExperts = append(sm.keyExperts, uint32(l)<<16|uint32(e))
			size = max(size, int64(m.Manifest.ExpertRef(l, e).GetShard().GetSize()))
		}
	}
	experts := sm.s.Nodes - sm.s.Bootstrap - sm.s.Gating
	per := (4*len(sm.keys) + experts - 1) / experts
	sm.mem = max(1, int((int64(per)*size+(1<<20)-1)>>20))
	return nil
}

// config is node i's config.
func (sm *simulation) config(i int) node.Config {
	cfg := LoopbackConfig()
	cfg.P2P.Listen = []string{sm.net.Addr().String()}
	d := node.DefaultConfig()
	cfg.Gossip = d.Gossip // the heartbeat a deployed node has
	cfg.API.Listen = ""
	cfg.HTTP.Listen = ""
	cfg.Expert.Threads = 1
	cfg.Gating.Threads = 1
	cfg.Gating.ProvenFirst = true // CPU only: the Vulkan case that keeps it off does not arise
	cfg.Expert.Model = sm.model.CID.String()
	switch sm.role(i) {
	case "bootstrap":
		cfg.P2P.Roles = []string{"bootstrap"}
		cfg.Expert.Experts = "none"
	case "gating":
		cfg.Expert.Experts = "none"
		cfg.Gating.Enabled = true
		cfg.Gating.Model = sm.model.CID.String()
		cfg.Gating.MaxSessions = 4
	default:
		cfg.Expert.Experts = "auto"
		cfg.Expert.MemoryMB = sm.mem
	}
	cfg.P2P.Bootstrap = slices.Clone(sm.boot)
	return cfg
}

// writeHeapProfile writes the process's heap profile to path.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	runtime.GC() // the profile's figures are of the last collection
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("heap profile: %w", err)
	}
	return f.Close()
}

// p2pOptions are the options of every honest node's host: the simulated
// network's transport, the count of what it dials for, no go-libp2p
// metrics (the node's own stay), and with Sybils, GossipSub's scores every 5 s.
func (sm *simulation) p2pOptions() []p2p.Option {
	opts := []p2p.Option{p2p.WithTransport(sm.net.Transport()), p2p.WithConnectionGater(sm.dials), p2p.WithoutLibp2pMetrics()}
	if sm.s.Sybils > 0 {
		opts = append(opts, p2p.WithScoreInspection(5*time.Second))
	}
	return opts
}

func (sm *simulation) role(i int) string {
	switch {
	case i < sm.s.Bootstrap:
		return "bootstrap"
	case i < sm.s.Bootstrap+sm.s.Gating:
		return "gating"
	}
	return "expert"
}

// start makes node i's home and starts it.
func (sm *simulation) start(ctx context.Context, i int) (*simNode, error) {
	home := filepath.Join(sm.s.Dir, fmt.Sprintf("node-%d", i))
	if err := os.RemoveAll(home); err != nil {
		return nil, err
	}
	if _, err := node.Init(home, false); err != nil {
		return nil, fmt.Errorf("node %d: %w", i, err)
	}
	if sm.role(i) != "expert" { // the bootstrap and gating nodes hold the model
		store, err := expert.OpenStore(filepath.Join(home, node.StoreDir))
		if err != nil {
			return nil, err
		}
		if _, err := store.ImportSplit(sm.model.Shards); err != nil {
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
	}
	opts := []node.Option{node.WithHome(home), node.WithLogger(sm.s.NodeLog.With("node", i)), node.WithCompute(sm.s.Compute),
		node.WithP2POptions(sm.p2pOptions()...), node.WithSharedProcess()}
	if !sm.s.ChurnLeaves {
		opts = append(opts, node.WithoutLeaving())
	}
	n, err := node.New(sm.config(i), opts...)
	if err != nil {
		return nil, fmt.Errorf("node %d: %w", i, err)
	}
	sn := &simNode{SimNode: SimNode{Index: i, PeerID: n.ID().String(), Role: sm.role(i), Alive: true}, n: n, started: time.Now()}
	sm.mu.Lock()
	sm.nodes = append(sm.nodes, sn)
	sm.mu.Unlock()
	if err := n.Start(ctx); err != nil {
		return sn, fmt.Errorf("node %d: %w", i, err)
	}
	sn.up.Store(true)
	return sn, nil
}

// launch starts the bootstrap nodes (each knowing the ones before it),
// then the others, JoinRate a second, each knowing every bootstrap node.
func (sm *simulation) launch(ctx context.Context) error {
	for i := range sm.s.Bootstrap {
		n, err := sm.start(ctx, i)
		if err != nil {
			return err
		}
		sm.boot = append(sm.boot, dialAddrs(n.n)...)
	}
	every := time.Duration(float64(time.Second) / sm.s.JoinRate)
	tick := time.NewTicker(every)
	defer tick.Stop()
	errs := make(chan error, sm.s.Nodes)
	var started atomic.Int32
	started.Store(int32(sm.s.Bootstrap))
	var wg sync.WaitGroup
	for i := sm.s.Bootstrap; i < sm.s.Nodes; i++ {
		select {
		case <-tick.C:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		sm.awaitScheduler(ctx, 3*every)
		wg.Go(func() {
			if n, err := sm.start(ctx, i); err != nil {
				if ctx.Err() != nil || n == nil {
					errs <- err
					return
				}
				sm.joinFailed(n, err)
				return
			}
			if up := started.Add(1); up%50 == 0 || int(up) == sm.s.Nodes {
				sm.log.Info("sim: nodes started", "up", up, "of", sm.s.Nodes)
			}
		})
	}
	wg.Wait()
	close(errs)
	var all []error
	for e := range errs {
		all = append(all, e)
	}
	return errors.Join(all...)
}

// awaitScheduler waits, up to most, while the scheduler latency is above
// Sim.JoinLatency, and counts the wait in the report's join_waited_s.
func (sm *simulation) awaitScheduler(ctx context.Context, most time.Duration) {
	if sm.s.JoinLatency < 0 {
		return
	}
	t0 := time.Now()
	for sm.sched.P90() > sm.s.JoinLatency && time.Since(t0) < most && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	sm.mu.Lock()
	sm.rep.JoinWaitedS += time.Since(t0).Seconds()
	sm.mu.Unlock()
}

// live returns the nodes alive now.
func (sm *simulation) live() []*simNode {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	return slices.DeleteFunc(slices.Clone(sm.nodes), func(n *simNode) bool { return !n.Alive })
}

// coverage is the fewest live nodes serving any expert, and how many
// experts have fewer than two.
func (sm *simulation) coverage(live []*simNode) (least, uncovered int) {
	count := make(map[expert.Key]int)
	for _, n := range live {
		if n.Role != "expert" {
			continue
		}
		for _, k := range n.n.Expert().Loaded() {
			count[k]++
		}
	}
	least = math.MaxInt
	first := sm.model.FirstMoELayer()
	for l := first; l < sm.model.Layers(); l++ {
		for e := range sm.model.Experts() {
			c := count[expert.Key{Layer: l, Expert: e}]
			least = min(least, c)
			if c < 2 {
				uncovered++
			}
		}
	}
	return least, uncovered
}

// waitHealthy waits until every gating node has the model loaded and
// sees every expert served twice, every expert has two live providers,
// every node's routing table holds at least min(live-1, 10) peers, and
// every expert node has settled (expert.Service.Settled: taken its first
// experts — chosen, fetched, loaded and provided them — and provided the
// rest of what it stores once): two providers of each expert come long
// before the last nodes to join have taken theirs, and prompts asked
// while a hundred nodes still fetched and provided met a saturated
// machine (300 nodes: 4 to 17 provides a second in the minute after the
// network was called healthy, three prompts timed out there; then, with
// the experts taken, 9 to 18 a second of every node's manifest).
func (sm *simulation) waitHealthy(ctx context.Context) error {
	told := time.Now()
	return waitFor(ctx, 500*time.Millisecond, func() (err error) {
		defer func() {
			if err != nil && time.Since(told) > 10*time.Second {
				sm.log.Info("sim: not healthy yet", "why", err)
				told = time.Now()
			}
		}()
		live := sm.live()
		if least, _ := sm.coverage(live); least < 2 {
			return fmt.Errorf("an expert has %d live providers", least)
		}
		taking := 0
		for _, n := range live {
			if x := n.n.Expert(); n.Role == "expert" && x != nil && !x.Settled() {
				taking++
			}
		}
		if taking > 0 {
			return fmt.Errorf("%d expert nodes still taking and providing their first experts", taking)
		}
		want := min(len(live)-1, 10)
		for _, n := range live {
			if rt := len(n.n.P2P().RoutingTable()); rt < want {
				return fmt.Errorf("node %d: %d peers in its routing table", n.Index, rt)
			}
			if n.Role != "gating" {
				continue
			}
			st := n.n.Status()
			if st.Gating == nil || len(st.Gating.Models) == 0 || !st.Gating.Models[0].Ready {
				return fmt.Errorf("gating node %d: model not loaded", n.Index)
			}
			if m := st.Gating.Models[0]; m.MinProviders < 2 {
				return fmt.Errorf("gating node %d: sees %d providers of an expert", n.Index, m.MinProviders)
			}
		}
		return nil
	})
}

// run runs the network for Duration (and on until every user has asked
// MinAsks prompts): users ask, nodes churn, lookups are made and samples
// taken.
func (sm *simulation) run(ctx context.Context) error {
	ctx, stop := context.WithTimeout(ctx, sm.s.Duration+MinAsksWait)
	defer stop()
	start := time.Now()
	var wg sync.WaitGroup
	var users []*atomic.Int64
	for _, g := range sm.live() {
		if g.Role == "gating" {
			asked := new(atomic.Int64)
			users = append(users, asked)
			wg.Go(func() { sm.user(ctx, g, asked) })
		}
	}
	// The run ends after Duration once every user has asked MinAsks.
	enough := func() bool {
		if time.Since(start) < sm.s.Duration {
			return false
		}
		for _, a := range users {
			if a.Load() < int64(sm.s.MinAsks) {
				return false
			}
		}
		return true
	}
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for !enough() {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		if time.Since(start) > sm.s.Duration+time.Second {
			sm.log.Info("sim: ran past the duration until every user had asked its prompts", "prompts", sm.s.MinAsks, "ran", time.Since(start).Round(time.Second))
		}
		stop()
	})
	wg.Go(func() { sm.lookups(ctx) })
	if sm.s.Churn > 0 {
		// Churn stops at Duration: the users who ask on past it (MinAsks)
		// ask a network that churned as long as asked for.
		cctx, cancel := context.WithTimeout(ctx, sm.s.Duration)
		defer cancel()
		wg.Go(func() { sm.churn(cctx) })
	}
	t := time.NewTicker(sm.s.Sample)
	defer t.Stop()
	prev := sm.snapshot(start)
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-t.C:
			cur := sm.snapshot(start)
			sm.sample(prev, cur)
			prev = cur
		}
	}
	wg.Wait()
	sm.joining.Wait() // each join is bounded by its own minute
	sm.rep.DurationS = time.Since(start).Seconds()
	sm.settle(ctx)
	return nil
}

// settle, once churn and users have stopped, gives the network up to
// settleTimeout to serve every expert on two live nodes again (a node
// killed in the last seconds is still counted by the others until its
// heartbeats expire), and takes the final sample.
func (sm *simulation) settle(ctx context.Context) {
	t0 := time.Now()
	err := waitFor(context.WithoutCancel(ctx), 500*time.Millisecond, func() error {
		if least, _ := sm.coverage(sm.live()); least < 2 {
			if time.Since(t0) > settleTimeout {
				return backoffStop{fmt.Errorf("an expert has %d live providers", least)}
			}
			return errors.New("not covered")
		}
		return nil
	})
	sm.rep.SettleS = time.Since(t0).Seconds()
	if err != nil {
		sm.log.Warn("sim: not covered again after churn", "waited", time.Since(t0).Round(time.Second), "err", err)
	}
	least, _ := sm.coverage(sm.live())
	sm.mu.Lock()
	sm.rep.CoverageMin, sm.settled = least, true
	sm.rep.CoverageLowest = min(sm.rep.CoverageLowest, least)
	sm.mu.Unlock()
}

// MinAsksWait bounds how long a run goes on past its Duration for
// MinAsks.
const MinAsksWait = 3 * time.Minute

// settleTimeout bounds settle: the default peer expiry (30 s) and a few
// hosting steps.
const settleTimeout = 90 * time.Second

// snap is what a sample is computed from.
type snap struct {
	at      time.Time
	since   float64
	cpu     time.Duration
	traffic uint64
	msgs    uint64
	control uint64
	hbs     uint64
	hbNow   uint64
	swaps   int64
	dials   uint64
	// provides and lookups: Traffic's Provides and ProviderLookups.
	provides, lookups uint64
	discoveries       uint64
	copiesDropped     uint64
	live              []*simNode
}

func (sm *simulation) snapshot(start time.Time) snap {
	s := snap{at: time.Now(), since: time.Since(start).Seconds(), cpu: processCPU(), live: sm.live(), dials: sm.net.Dials()}
	sm.mu.Lock()
	nodes := slices.Clone(sm.nodes)
	sm.mu.Unlock()
	for _, n := range nodes {
		tr, swaps := n.traffic, n.swaps
		if n.Alive {
			tr = n.n.P2P().Traffic()
			if n.n.Expert() != nil {
				swaps = n.n.Expert().Swaps()
			}
		}
		s.swaps += swaps
		s.traffic += tr.BytesIn + tr.BytesOut
		s.msgs += tr.MsgsIn + tr.MsgsOut
		s.control += tr.ControlIn + tr.ControlOut
		s.hbs += tr.Heartbeats
		s.hbNow += tr.HeartbeatsOutOfTurn
		s.provides += tr.Provides
		s.lookups += tr.ProviderLookups
		s.discoveries += tr.TopicDiscoveries
		s.copiesDropped += tr.CopiesDropped
	}
	return s
}

func (sm *simulation) sample(prev, cur snap) {
	dt := cur.at.Sub(prev.at).Seconds()
	nodes := float64(max(1, len(cur.live)))
	least, uncovered := sm.coverage(cur.live)
	sm.mu.Lock()
	s := SimSample{
		AtS: cur.since, Live: len(cur.live), CoverageMin: least, Uncovered: uncovered,
		GossipBytesPerS:      float64(cur.traffic-prev.traffic) / dt / nodes,
		GossipMsgsPerS:       float64(cur.msgs-prev.msgs) / dt / nodes,
		GossipControlPerS:    float64(cur.control-prev.control) / dt / nodes,
		HeartbeatsPerS:       float64(cur.hbs-prev.hbs) / dt,
		OutOfTurnPerS:        float64(cur.hbNow-prev.hbNow) / dt,
		SwapsPerS:            float64(cur.swaps-prev.swaps) / dt,
		DialsPerS:            float64(cur.dials-prev.dials) / dt,
		ProvidesPerS:         float64(cur.provides-prev.provides) / dt,
		ProviderLookupsPerS:  float64(cur.lookups-prev.lookups) / dt,
		TopicDiscoveriesPerS: float64(cur.discoveries-prev.discoveries) / dt,
		CopiesDroppedPerS:    float64(cur.copiesDropped-prev.copiesDropped) / dt / nodes,
		Asked:                sm.rep.Asked, Answered: sm.rep.Answered,
		RSSBytes: p2p.ProcessRSS(), CPUCores: (cur.cpu - prev.cpu).Seconds() / dt, Goroutines: runtime.NumGoroutine(),
		SchedP90Ms: ms(sm.sched.P90()),
	}
	sm.rep.Samples = append(sm.rep.Samples, s)
	sm.rep.CoverageLowest = min(sm.rep.CoverageLowest, least)
	sm.mu.Unlock()
	sm.log.Info("sim: sample", "at", time.Duration(cur.since*float64(time.Second)).Round(time.Second), "live", s.Live,
		"coverage_min", least, "gossip_B/s/node", int(s.GossipBytesPerS), "control_B/s/node", int(s.GossipControlPerS), "msgs/s/node", int(s.GossipMsgsPerS),
		"heartbeats/s", fmt.Sprintf("%.1f", s.HeartbeatsPerS), "out_of_turn/s", fmt.Sprintf("%.1f", s.OutOfTurnPerS), "swaps/s", fmt.Sprintf("%.1f", s.SwapsPerS), "dials/s", int(s.DialsPerS),
		"provides/s", fmt.Sprintf("%.1f", s.ProvidesPerS), "lookups/s", fmt.Sprintf("%.1f", s.ProviderLookupsPerS),
		"discoveries/s", fmt.Sprintf("%.1f", s.TopicDiscoveriesPerS), "copies_dropped/s/node", fmt.Sprintf("%.1f", s.CopiesDroppedPerS), "asked", s.Asked, "answered", s.Answered,
		"cpu_cores", fmt.Sprintf("%.2f", s.CPUCores), "sched_p90", sm.sched.P90().Round(time.Microsecond))
}

// user asks gating node g the prompt every AskEvery, through a client of
// its own that knows only the bootstrap node and g.
func (sm *simulation) user(ctx context.Context, g *simNode, asked *atomic.Int64) {
	c, err := client.New(ctx, client.WithBootstrap(sm.boot...), client.WithGatingNodes(dialAddrs(g.n)...), client.WithLogger(sm.s.NodeLog),
		client.WithTransport(sm.net.Transport()))
	if err != nil {
		sm.fail(fmt.Errorf("user of gating node %d: %w", g.Index, err))
		return
	}
	defer c.Close()
	t := time.NewTicker(sm.s.AskEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sm.mu.Lock()
		sm.rep.Asked++
		sm.mu.Unlock()
		asked.Add(1)
		lat, err := sm.ask(ctx, c)
		if err != nil {
			sm.fail(fmt.Errorf("gating node %d: %w", g.Index, err))
			continue
		}
		sm.mu.Lock()
		sm.rep.Answered++
		sm.tok = append(sm.tok, lat...)
		sm.mu.Unlock()
	}
}

// ask asks one prompt. A prompt under way when the simulation ends is
// still answered (its own deadline is PromptTimeout).
func (sm *simulation) ask(ctx context.Context, c *client.Client) ([]float64, error) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sm.s.PromptTimeout)
	defer cancel()
	s, err := c.Generate(actx, client.Request{Model: sm.model.CID, Prompt: simPrompt, MaxTokens: sm.s.MaxTokens})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	var lat []float64
	for i := 0; ; i++ {
		t, err := s.Next()
		if err == io.EOF {
			return lat, nil
		}
		if err != nil {
			return nil, fmt.Errorf("after %d tokens: %w", i, err)
		}
		if i > 0 && t.Rewind == nil {
			lat = append(lat, ms(t.Latency))
		}
	}
}

func (sm *simulation) fail(err error) {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	if len(sm.rep.Errors) < 10 {
		sm.rep.Errors = append(sm.rep.Errors, err.Error())
	}
	sm.log.Warn("sim", "err", err)
}

// churn replaces an expert node every minute/Churn: a random one that has
// joined is killed and a new node joins.
func (sm *simulation) churn(ctx context.Context) {
	every := time.Duration(float64(time.Minute) / sm.s.Churn)
	t := time.NewTicker(every)
	defer t.Stop()
	next := sm.s.Nodes
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var experts []*simNode
		for _, n := range sm.live() {
			if n.Role == "expert" && n.up.Load() {
				experts = append(experts, n)
			}
		}
		if len(experts) > 2 {
			sm.kill(experts[sm.rng.IntN(len(experts))])
		}
		i := next
		next++
		sm.joining.Go(func() {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if n, err := sm.start(sctx, i); err != nil {
				if n != nil {
					sm.joinFailed(n, err)
				} else if ctx.Err() == nil {
					sm.log.Warn("sim: a node failed to join", "node", i, "err", err)
				}
				return
			}
			sm.mu.Lock()
			sm.rep.Joined++
			sm.mu.Unlock()
		})
	}
}

// kill takes n out of the network at once (churn) and closes it in the
// background.
func (sm *simulation) kill(n *simNode) { sm.retire(n, func(r *SimReport) { r.Killed++ }) }

// joinFailed gives up a node that could not join (its bootstrap peers did
// not answer in time), as its owner would restart it: the network goes on
// without it.
func (sm *simulation) joinFailed(n *simNode, err error) {
	sm.log.Warn("sim: a node failed to join", "node", n.Index, "err", err)
	sm.retire(n, func(r *SimReport) { r.JoinFailed++ })
}

// retire marks n dead, counts it with count and closes it in the
// background.
func (sm *simulation) retire(n *simNode, count func(*SimReport)) {
	sm.mu.Lock()
	n.Alive = false
	n.ended = time.Now()
	n.traffic = n.n.P2P().Traffic()
	if n.n.Expert() != nil {
		n.Experts = len(n.n.Expert().Loaded())
		n.swaps = n.n.Expert().Swaps()
	}
	count(&sm.rep)
	sm.mu.Unlock()
	sm.closing.Go(func() {
		if err := n.n.Close(); err != nil {
			sm.log.Debug("sim: closed node", "node", n.Index, "err", err)
		}
	})
}

// lookups makes a provider lookup every second from a random live node
// (every 250 ms until 2026-12-02: measurements the network itself does
// not make, some 4% of a 200-node network's lookup dials).
func (sm *simulation) lookups(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		live := sm.live()
		n := live[sm.rng.IntN(len(live))]
		key := sm.keys[sm.rng.IntN(len(sm.keys))]
		wg.Go(func() {
			l := lookup(ctx, n.n.P2P(), key)
			if ctx.Err() != nil {
				return
			}
			sm.mu.Lock()
			sm.dht = append(sm.dht, l)
			sm.mu.Unlock()
		})
	}
}

// lookup finds the first provider of key from h, with the query's hops.
func lookup(ctx context.Context, h *p2p.Host, key cid.Cid) dhtLookup {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	qctx, events := routing.RegisterForQueryEvents(ctx)
	depth := map[peer.ID]int{}
	var mu sync.Mutex
	maxDepth, queried := 0, 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range events {
			mu.Lock()
			switch ev.Type {
			case routing.SendingQuery:
				if _, ok := depth[ev.ID]; !ok {
					depth[ev.ID] = 1
				}
				queried++
			case routing.PeerResponse:
				d := depth[ev.ID]
				maxDepth = max(maxDepth, d)
				for _, r := range ev.Responses {
					if _, ok := depth[r.ID]; !ok {
						depth[r.ID] = d + 1
					}
				}
			}
			mu.Unlock()
		}
	}()
	t0 := time.Now()
	var l dhtLookup
	found := h.DHT().FindProvidersAsync(qctx, key, 1)
	select {
	case _, l.found = <-found:
		if l.found {
			l.ms = ms(time.Since(t0))
		}
	case <-qctx.Done():
	}
	mu.Lock()
	l.hops, l.queried = maxDepth, queried
	mu.Unlock()
	cancel()
	// The DHT closes both channels once its query has ended, which on a
	// saturated machine was seen to take minutes past the deadline (a
	// query waiting on the resource manager): the run does not wait for
	// it.
	go func() {
		for range found {
		}
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
	}
	return l
}

// report fills the report's totals from the samples and nodes.
func (sm *simulation) report() {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	r := &sm.rep
	if sm.s.Sybils > 0 {
		r.Sybils = &sm.sybilRep
	}
	r.TokenMs = distOf(sm.tok)
	var ms, hops, queried []float64
	for _, l := range sm.dht {
		r.DHT.Lookups++
		queried = append(queried, float64(l.queried))
		if l.found {
			r.DHT.Found++
			ms = append(ms, l.ms)
			hops = append(hops, float64(l.hops))
		}
	}
	r.DHT.Ms, r.DHT.Hops, r.DHT.Queried = distOf(ms), distOf(hops), distOf(queried)
	if len(r.Samples) > 0 {
		last := r.Samples[len(r.Samples)-1]
		if !sm.settled {
			r.CoverageMin = last.CoverageMin
		}
		var b, m, cpu float64
		var bs []float64
		for _, s := range r.Samples {
			b += s.GossipBytesPerS
			bs = append(bs, s.GossipBytesPerS)
			m += s.GossipMsgsPerS
			cpu += s.CPUCores / float64(max(1, s.Live))
			r.RSSBytes = max(r.RSSBytes, s.RSSBytes)
		}
		k := float64(len(r.Samples))
		r.GossipBytesPerS, r.GossipMsgsPerS, r.CPUPerNode = b/k, m/k, cpu/k
		r.GossipBytesPerSP50 = distOf(bs).P50
		r.RSSBytesPerNode = r.RSSBytes / uint64(max(1, last.Live))
	}
	if r.CoverageLowest == math.MaxInt {
		r.CoverageLowest = r.CoverageMin
	}
	live := 0
	for _, n := range sm.nodes {
		if n.Alive {
			live++
		}
	}
	rss := p2p.ProcessRSS()
	now := time.Now()
	sm.readTables()
	r.TopicMsgsInPerS = map[string]float64{}
	for _, n := range sm.nodes {
		if n.Alive {
			n.ended = now
			n.traffic = n.n.P2P().Traffic()
			if n.n.Expert() != nil {
				n.Experts = len(n.n.Expert().Loaded())
			}
			n.RSSBytes = rss / uint64(max(1, live))
		}
		up := n.ended.Sub(n.started).Seconds()
		n.UptimeS = up
		if up > 0 {
			n.GossipBytesPerS = float64(n.traffic.BytesIn+n.traffic.BytesOut) / up
			n.GossipMsgsPerS = float64(n.traffic.MsgsIn+n.traffic.MsgsOut) / up
			r.DeliveredPerS += float64(n.traffic.Delivered) / up / float64(len(sm.nodes))
			for topic, c := range n.traffic.TopicMsgsIn {
				r.TopicMsgsInPerS[topic] += float64(c) / up / float64(len(sm.nodes))
			}
		}
		r.Nodes = append(r.Nodes, n.SimNode)
	}
	slices.SortFunc(r.Nodes, func(a, b SimNode) int { return cmp.Compare(a.Index, b.Index) })
	r.DialCallers = dialRates(sm.runDials, sm.dials.Counts(), now.Sub(sm.runAt))
}

// reportWait bounds how long the report waits for the nodes' routing
// tables and connections.
const reportWait = 30 * time.Second

// readTables sets each live node's RoutingTable and Conns, or -1 where
// they could not be read within reportWait: they sit behind the DHT's and
// the swarm's locks, which a saturated machine was seen to hold for
// minutes (a 300-node run's report waited on one until it was killed).
func (sm *simulation) readTables() {
	type view struct {
		n         *simNode
		rt, conns int
	}
	views := make(chan view, len(sm.nodes))
	pending := 0
	for _, n := range sm.nodes {
		if !n.Alive {
			continue
		}
		n.RoutingTable, n.Conns = -1, -1
		pending++
		go func() {
			h := n.n.P2P()
			views <- view{n, len(h.RoutingTable()), len(h.LibP2P().Network().Peers())}
		}()
	}
	deadline := time.After(reportWait)
	for ; pending > 0; pending-- {
		select {
		case v := <-views:
			v.n.RoutingTable, v.n.Conns = v.rt, v.conns
		case <-deadline:
			sm.log.Warn("sim: left out of the report: routing tables and connections not read in time", "nodes", pending, "waited", reportWait)
			return
		}
	}
}

// dialRates is the dials a second of each caller between two counts d
// apart, most first, the first 16.
func dialRates(before, after []simnet.Caller, d time.Duration) []DialCaller {
	if d <= 0 {
		return nil
	}
	had := map[string]uint64{}
	for _, c := range before {
		had[c.Caller] = c.Dials
	}
	var out []DialCaller
	for _, c := range after {
		if n := c.Dials - had[c.Caller]; n > 0 {
			out = append(out, DialCaller{c.Caller, float64(n) / d.Seconds()})
		}
	}
	slices.SortStableFunc(out, func(a, b DialCaller) int { return cmp.Compare(b.PerS, a.PerS) })
	return out[:min(len(out), 16)]
}

// stopAll closes every node, all at once, and waits at most simStopTimeout
// for them (and for the nodes being killed) to be closed; it logs those
// that were not.
func (sm *simulation) stopAll() {
	sm.stopSybils()
	sm.mu.Lock()
	nodes := slices.Clone(sm.nodes)
	sm.mu.Unlock()
	var left atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for _, n := range nodes {
			if n.Alive {
				left.Add(1)
				wg.Go(func() {
					defer left.Add(-1)
					if err := n.n.Close(); err != nil {
						sm.log.Debug("sim: stop", "node", n.Index, "err", err)
					}
				})
			}
		}
		wg.Wait()
		sm.closing.Wait()
	}()
	select {
	case <-done:
	case <-time.After(simStopTimeout):
		sm.log.Warn("sim: nodes did not stop in time; leaving them to the process's exit", "nodes", left.Load(), "waited", simStopTimeout)
	}
}

// simStopTimeout bounds the wait for the nodes to close at the end.
const simStopTimeout = time.Minute

// processCPU is the CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
