package testnet

import (
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// Report is what a scenario found: the JSON of `neurod testnet --json`.
// Later issues add fields; none is ever renamed or removed.
type Report struct {
	Healthy bool         `json:"healthy"`
	Error   string       `json:"error,omitempty"`
	TookMs  int64        `json:"took_ms"`
	Dir     string       `json:"dir"`
	Nodes   []NodeReport `json:"nodes"`
	// Stopped is filled in once the nodes have been stopped (--check).
	Stopped []Exit `json:"stopped,omitempty"`

	// The prompt answered through the network.
	Model string `json:"model,omitempty"`
	// ModelFile is the GGUF the network serves.
	ModelFile string `json:"model_file,omitempty"`
	// ReadyMs is the time from healthy until the gating node had loaded the
	// model and every expert had its providers.
	ReadyMs int64   `json:"ready_ms"`
	Tokens  []int32 `json:"tokens"`
	Text    string  `json:"text"`
	// PerTokenMs is each token's latency as the client saw it (the first
	// includes the prompt).
	PerTokenMs []float64 `json:"per_token_ms"`
	// PerTokenComputeMs is each token's forward pass on the gating node
	// (a pass that kept drafted tokens shared evenly among them): a
	// token delivered late makes the next one's per_token_ms look short,
	// never its compute.
	PerTokenComputeMs []float64 `json:"per_token_compute_ms,omitempty"`
	PromptTokens      int       `json:"prompt_tokens"`
	TokensPerSecond   float64   `json:"tokens_per_second"`
	FinishReason      string    `json:"finish_reason,omitempty"`
	// Killed lists the nodes SIGKILLed by --kill, and after which token.
	Killed      []int `json:"killed,omitempty"`
	KilledAfter int   `json:"killed_after,omitempty"`
	// Rewinds counts the times the gating node withdrew tokens computed
	// from an expert result that a later check found wrong.
	Rewinds int    `json:"rewinds"`
	Stats   *Stats `json:"stats,omitempty"`
	// CostBaseUnits is what the last request cost its payer (the user
	// wallet, at the testnet's price), PricePerMFLOP that price, and
	// CostPer1kTokens the cost of 1,000 of its tokens (prompt and
	// generated) at the ledger's default price.
	CostBaseUnits   uint64  `json:"cost_base_units,omitempty"`
	PricePerMFLOP   uint64  `json:"price_per_mflop,omitempty"`
	CostPer1kTokens float64 `json:"cost_per_1k_tokens_default_price,omitempty"`
	// Results are the answers of the concurrent requests (Scenario.
	// Concurrency), and AggregateTokensPerS their generated tokens over
	// the wall time of the whole round.
	Results             []Result `json:"results,omitempty"`
	AggregateTokensPerS float64  `json:"aggregate_tokens_per_s,omitempty"`
	// SharedLayerShare is the share of the concurrent requests' MoE layer
	// evaluations that went out in a round with other requests' tokens.
	SharedLayerShare float64 `json:"shared_layer_share,omitempty"`
	// HTTP is node 0's HTTP listener: the dashboard, /metrics and the
	// gating node's OpenAI-compatible API.
	HTTP string `json:"http,omitempty"`
	// Topology and Connections (--netns): where each node runs, and how the
	// pairs of nodes that exchanged expert traffic talked.
	Topology    *TopologyReport `json:"topology,omitempty"`
	Connections []Conn          `json:"connections,omitempty"`
	// Link (--netns with --rtt, --loss, ...): the homes' lines, asked and measured.
	Link *LinkReport `json:"link,omitempty"`
	// Requests is how many times the prompt was answered (--requests);
	// every answer had the same tokens.
	Requests int `json:"requests"`
	// Validation counts the answers the gating node used, the extra calls
	// it made to check them, and the results found wrong.
	Validation *node.ValidationStatus `json:"validation,omitempty"`
	// Ledger is the testnet's chain (node 0 validates) before and after
	// the generation.
	Ledger *LedgerReport `json:"ledger,omitempty"`
}

// LedgerReport is the chain's state around the generation. Balances are
// in base units, by peer ID.
type LedgerReport struct {
	Height         int64             `json:"height"`
	AppHash        string            `json:"app_hash"`
	BalancesBefore map[string]uint64 `json:"balances_before"`
	BalancesAfter  map[string]uint64 `json:"balances_after"`
	Treasury       uint64            `json:"treasury"`
	Burned         uint64            `json:"burned"`
	SupplyOK       bool              `json:"supply_ok"`
	// StakesAfter is each node's stake after the run (slashing takes from
	// it).
	StakesAfter map[string]uint64 `json:"stakes_after"`
	// Validators are the peers that validate the chain (--validators).
	Validators []string `json:"validators"`
	// User is the wallet account that paid for the prompt (its balances
	// are among the others).
	User string `json:"user,omitempty"`
}

// Result is one of the concurrent requests' answers.
type Result struct {
	Tokens     []int32   `json:"tokens"`
	PerTokenMs []float64 `json:"per_token_ms"`
	// Queued is the last place in the gating node's queue the request was
	// given before it started (0: it started at once).
	Queued int `json:"queued"`
	// MoELayers are the request's MoE layer evaluations, SharedLayers
	// those whose round of expert calls carried other requests' tokens
	// too (the gating node's continuous batching).
	MoELayers    uint64 `json:"moe_layers"`
	SharedLayers uint64 `json:"shared_layers"`
	// Escrow paid for the request (loopback: each its own wallet's), the
	// expert work its receipts carried and what that cost (base units).
	Escrow uint64 `json:"escrow,omitempty"`
	FLOPs  uint64 `json:"flops,omitempty"`
	Cost   uint64 `json:"cost_base_units,omitempty"`
}

// Stats are the gating node's measurements of the generation.
type Stats struct {
	PrefillMs     float64 `json:"prefill_ms"`
	PerTokenP50Ms float64 `json:"per_token_p50_ms"`
	PerTokenP99Ms float64 `json:"per_token_p99_ms"`
	ExpertCalls   uint64  `json:"expert_calls"`
	ExpertBytes   uint64  `json:"expert_bytes"`
	BytesPerToken float64 `json:"bytes_per_token"`
	MoELayers     uint64  `json:"moe_layers"`
	// OneNodeLayers: MoE layers whose expert calls one node answered;
	// SharedLayers: those whose round carried other generations' tokens
	// too (continuous batching).
	OneNodeLayers  uint64  `json:"one_node_layers"`
	SharedLayers   uint64  `json:"shared_layers"`
	MoEWallMs      float64 `json:"moe_wall_ms"`
	MoEComputeMs   float64 `json:"moe_compute_ms"`
	DispatchPerLay float64 `json:"dispatch_overhead_per_layer_us"`
	// The dispatch overhead of the one-token (decode) layers: their mean,
	// median and 90th percentile (to 10 us), beside the mean of all
	// layers above (a prompt's layers carry its many tokens).
	DispatchDecodeUs float64 `json:"dispatch_overhead_decode_us"`
	DispatchP50Us    uint64  `json:"dispatch_overhead_p50_us"`
	DispatchP90Us    uint64  `json:"dispatch_overhead_p90_us"`
	Hedges           uint64  `json:"hedges"`
	Redispatches     uint64  `json:"redispatches"`
	// Speculative decoding: the passes that verified a draft, the tokens
	// drafted and kept, the kept tokens per such pass, and the expert
	// round trips (MoE layer evaluations) per generated token — the
	// number of MoE layers without speculation, fewer with it.
	SpecPasses         uint64  `json:"spec_passes"`
	DraftTokens        uint64  `json:"draft_tokens"`
	AcceptedTokens     uint64  `json:"accepted_tokens"`
	AcceptedPerPass    float64 `json:"accepted_per_pass"`
	RoundTripsPerToken float64 `json:"round_trips_per_token"`
	// Layer spans: forward passes, span requests (one per span per pass)
	// and spans per forward pass (hops), requests replayed to a new
	// provider and moves to another provider. A generation through spans
	// waits on one round trip per span per pass: round_trips_per_token
	// counts them beside the MoE layers' expert rounds.
	ForwardPasses uint64  `json:"forward_passes"`
	SpanRequests  uint64  `json:"span_requests"`
	SpansPerToken float64 `json:"spans_per_token"`
	SpanReplays   uint64  `json:"span_replays"`
	SpanFailovers uint64  `json:"span_failovers"`
	// What the failovers cost: the hidden states replayed (bytes), the
	// replays' round trips, and the time from the start of each request
	// whose provider failed until the next one answered it.
	SpanReplayBytes uint64  `json:"span_replay_bytes"`
	SpanReplayMs    float64 `json:"span_replay_ms"`
	SpanRecoveryMs  float64 `json:"span_recovery_ms"`
	// SpanHedges: span requests also sent to the span's next provider
	// because the one in use was slow.
	SpanHedges uint64 `json:"span_hedges"`
}

// NodeReport is one node as the report shows it.
type NodeReport struct {
	Index            int      `json:"index"`
	PeerID           string   `json:"peer_id"`
	Addrs            []string `json:"addrs"`
	Roles            []string `json:"roles"`
	PID              int      `json:"pid"`
	Home             string   `json:"home"`
	API              string   `json:"api"`
	RSSBytes         uint64   `json:"rss_bytes"`
	RoutingTableSize int      `json:"routing_table_size"`
	HeardPeers       int      `json:"heard_peers"`
	// Devices are the compute devices the node sees, the one it computes
	// on selected.
	Devices []node.DeviceStatus `json:"devices"`
	// Experts lists the experts the node serves ("layer:expert").
	Experts     []string `json:"experts"`
	ExpertCalls int64    `json:"expert_calls"`
	// Spans lists the layer spans the node serves ("first-last").
	Spans []string `json:"spans"`
	// LayersLoaded, on a gating node, says whether it loaded the model's
	// layers (false: every generation went through spans, and it holds
	// the head shard's weights alone).
	LayersLoaded *bool `json:"layers_loaded,omitempty"`
	// Faulty is the node's misbehaviour (--faulty), "" for an honest node.
	// Score, Checked, Failed and Excluded are the gating node's record of
	// it after the workload.
	Faulty   string  `json:"faulty"`
	Score    float64 `json:"score"`
	Checked  uint64  `json:"checked"`
	Failed   uint64  `json:"failed"`
	Excluded bool    `json:"excluded"`
	// ExcludedAt is how many of its results had been checked when it was
	// excluded (0: never excluded).
	ExcludedAt uint64 `json:"excluded_at"`
	// Verdicts counts the verdicts the node published (the gating node)
	// or received and re-checked (expert nodes).
	Verdicts *node.VerdictStatus `json:"verdicts,omitempty"`
}

// Exit is how a node ended when the testnet stopped.
type Exit struct {
	Index  int  `json:"index"`
	PID    int  `json:"pid"`
	Clean  bool `json:"clean"`
	Killed bool `json:"killed"`
	// Crashed is true for the nodes --kill SIGKILLed.
	Crashed bool   `json:"crashed,omitempty"`
	Error   string `json:"error,omitempty"`
	// LogTail: the last lines of the log of a node that did not stop
	// cleanly (not one --kill ended).
	LogTail string `json:"log_tail,omitempty"`
}

// LinkReport is the report's view of the homes' lines: what was asked,
// and what a ping measured before the nodes started.
type LinkReport struct {
	// RTTMs is the round trip asked between the first two homes; with one
	// --rtt per home, HomeRTTMs are those (two homes are the mean of
	// theirs apart).
	RTTMs        float64   `json:"rtt_ms"`
	HomeRTTMs    []float64 `json:"home_rtt_ms"`
	JitterMs     float64   `json:"jitter_ms"`
	Loss         float64   `json:"loss"`
	BandwidthBps int64     `json:"bandwidth_bps"`
	// ToPublicMs is each home's median ping to the bootstrap node: half
	// its RTT, since only a home's own line delays its packets.
	ToPublicMs []float64 `json:"to_public_ms"`
	// MeasuredRTTMs is the round trip between the first two homes, the
	// sum of their pings to the public segment, and RTTError how far it is
	// from what was asked (a share; within ±0.10 is the goal).
	MeasuredRTTMs float64 `json:"measured_rtt_ms"`
	RTTError      float64 `json:"rtt_error"`
	// Lines counts the packets each home's line carried and dropped.
	Lines []netns.LineStats `json:"lines,omitempty"`
}

// measureLink pings the bootstrap node from every home.

// Conn is how two nodes that exchanged expert traffic talk.
type Conn struct {
	A         string `json:"a"`
	B         string `json:"b"`
	Direct    bool   `json:"direct"`
	ViaRelay  bool   `json:"via_relay"`
	Transport string `json:"transport"`
	Calls     int64  `json:"calls"`
	// NATs are A's and B's NAT kinds ("" for a public node).
	NATs [2]string `json:"nats"`
	// RTTMs is the round trip the lines put between A and B (--rtt).
	RTTMs float64 `json:"rtt_ms,omitempty"`
}

// TopologyReport describes the emulated internet.
type TopologyReport struct {
	Publics []Place `json:"publics"`
	Homes   []Place `json:"homes"`
}

// Place is where a node runs on the emulated internet.
type Place struct {
	Node      int    `json:"node"`
	Namespace string `json:"namespace"`
	IP        string `json:"ip"`
	// PublicIP and NAT: a home's router's address and NAT kind.
	PublicIP string `json:"public_ip,omitempty"`
	NAT      string `json:"nat,omitempty"`
}

// parseNATs expands --nat: one kind for every home, or one per home.

// Generation is one generation as `neurod generate --json` prints it: the
// netns testnet reads it back from the generate it runs in the gating
// node's home, and Bench gets the on-machine runs in it.
type Generation struct {
	Tokens       []int32 `json:"tokens"`
	Text         string  `json:"text"`
	PromptTokens int     `json:"prompt_tokens"`
	// TokensPerSecond counts generated tokens over the generation's wall
	// time (prompt included).
	TokensPerSecond float64 `json:"tokens_per_second"`
	// PerTokenMs is each token's latency (the first includes the prompt);
	// with --network as the client saw it. Gating is the gating node that
	// answered (--network) and FinishReason why the generation ended.
	PerTokenMs []float64 `json:"per_token_ms"`
	// PerTokenComputeMs is each token's forward pass on the gating node
	// (--network), as in Report.
	PerTokenComputeMs []float64 `json:"per_token_compute_ms,omitempty"`
	Gating            string    `json:"gating,omitempty"`
	FinishReason      string    `json:"finish_reason,omitempty"`
	// Stats (--network) are the gating node's measurements of it.
	Stats *Stats `json:"stats,omitempty"`
	// Device is where --local or --split computed (cpu, vulkan:N, cuda:N).
	Device string `json:"device,omitempty"`
	// Escrow paid for a --network generation (0: unpaid), and what its
	// expert work cost in NEURO (CostBaseUnits in base units).
	Escrow        uint64  `json:"escrow,omitempty"`
	Cost          float64 `json:"cost"`
	CostBaseUnits uint64  `json:"cost_base_units"`
}

// GenerationStats is what the gating node measured of a generation, with
// the per-token latency the client saw (the first token, which carries the
// prompt, is left out of the percentiles).
func GenerationStats(d *client.Done, perTokenMs []float64) *Stats {
	st := d.Stats
	ts := &Stats{PrefillMs: float64(d.Prefill.Microseconds()) / 1000,
		ExpertCalls: st.GetExpertCalls(), ExpertBytes: st.GetExpertBytes(), MoELayers: st.GetMoeLayers(), OneNodeLayers: st.GetOneNodeLayers(), SharedLayers: st.GetSharedLayers(),
		MoEWallMs: float64(st.GetMoeWallUs()) / 1000, MoEComputeMs: float64(st.GetMoeComputeUs()) / 1000,
		Hedges: st.GetHedges(), Redispatches: st.GetRedispatches(),
		DispatchP50Us: st.GetMoeOverheadP50Us(), DispatchP90Us: st.GetMoeOverheadP90Us()}
	ts.SpecPasses, ts.DraftTokens, ts.AcceptedTokens = st.GetSpecPasses(), st.GetDraftTokens(), st.GetAcceptedTokens()
	if ts.SpecPasses > 0 {
		ts.AcceptedPerPass = float64(ts.AcceptedTokens) / float64(ts.SpecPasses)
	}
	ts.ForwardPasses, ts.SpanRequests, ts.SpanReplays, ts.SpanFailovers = st.GetForwardPasses(), st.GetSpanRequests(), st.GetSpanReplays(), st.GetSpanFailovers()
	ts.SpanReplayBytes, ts.SpanHedges = st.GetSpanReplayBytes(), st.GetSpanHedges()
	ts.SpanReplayMs, ts.SpanRecoveryMs = float64(st.GetSpanReplayUs())/1000, float64(st.GetSpanRecoveryUs())/1000
	if ts.ForwardPasses > 0 {
		ts.SpansPerToken = float64(ts.SpanRequests) / float64(ts.ForwardPasses)
	}
	if n := len(perTokenMs); n > 0 {
		ts.BytesPerToken = float64(st.GetExpertBytes()) / float64(n)
		ts.RoundTripsPerToken = float64(st.GetMoeLayers()+st.GetSpanRequests()) / float64(n)
	}
	if st.GetDecodeLayers() > 0 {
		ts.DispatchDecodeUs = float64(st.GetDecodeOverheadUs()) / float64(st.GetDecodeLayers())
	}
	if st.GetMoeLayers() > 0 {
		ts.DispatchPerLay = float64(st.GetMoeWallUs()-min(st.GetMoeWallUs(), st.GetMoeComputeUs())) / float64(st.GetMoeLayers())
	}
	if len(perTokenMs) > 1 {
		decode := slices.Clone(perTokenMs[1:])
		sort.Float64s(decode)
		ts.PerTokenP50Ms = Percentile(decode, 0.50)
		ts.PerTokenP99Ms = Percentile(decode, 0.99)
	}
	return ts
}

// Percentile of sorted values (nearest rank).
func Percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// ApplyToken applies a streamed token, or a rewind, to the tokens and
// latencies kept so far (computeMs, the gating node's time for each, may
// be nil) and returns what to print: the token's text, or a line saying
// the text shown after token Keep was withdrawn (a terminal cannot take
// it back).
func ApplyToken(tokens *[]int32, perTokenMs, computeMs *[]float64, t client.Token) string {
	if t.Rewind != nil {
		*tokens = (*tokens)[:min(t.Rewind.Keep, len(*tokens))]
		*perTokenMs = (*perTokenMs)[:min(t.Rewind.Keep, len(*perTokenMs))]
		if computeMs != nil {
			*computeMs = (*computeMs)[:min(t.Rewind.Keep, len(*computeMs))]
		}
		return fmt.Sprintf("\n[a wrong expert result was caught: generating again after token %d]\n", t.Rewind.Keep)
	}
	*tokens = append(*tokens, t.ID)
	*perTokenMs = append(*perTokenMs, ms(t.Latency))
	if computeMs != nil {
		*computeMs = append(*computeMs, ms(t.Compute))
	}
	return t.Text
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
