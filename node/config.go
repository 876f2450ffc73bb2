package node

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/pelletier/go-toml/v2"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
)

// Config is everything a user can set about a node. It is read from
// config.toml in the node's home, then overridden by NEURO_* environment
// variables (see ApplyEnv), then by command-line flags.
//
// The toml tags are the file's keys; the same names, upper-cased and joined
// with '_', are the environment variables (p2p.dht.mode -> NEURO_P2P_DHT_MODE).
type Config struct {
	P2P    P2PConfig    `toml:"p2p"`
	Gossip GossipConfig `toml:"gossip"`
	Expert ExpertConfig `toml:"expert"`
	Gating GatingConfig `toml:"gating"`
	Ledger LedgerConfig `toml:"ledger"`
	HTTP   HTTPConfig   `toml:"http"`
	Home   HomeConfig   `toml:"home"`
	API    APIConfig    `toml:"api"`
	Log    LogConfig    `toml:"log"`
}

// ExpertConfig says which experts the node hosts. Every node with a home
// keeps a store of shards (<home>/store) and serves it to peers.
type ExpertConfig struct {
	// Model is the CID of the model to host experts of; empty hosts none.
	Model string `toml:"model"`
	// Experts is "auto" or a list such as "0:3,0:5,1:*".
	Experts string `toml:"experts"`
	// MemoryMB bounds the expert weights the node loads.
	MemoryMB int `toml:"memory_mb"`
	// Threads for expert compute; 0 uses every core.
	Threads int `toml:"threads"`
	// Lanes is how many experts of one call group are computed at the same
	// time, each on threads of its own (Threads each); 0 or 1: a group's
	// experts in one graph on Threads threads.
	Lanes int `toml:"lanes"`
	// LanePollUS is how long, in microseconds, a lane that finished its
	// share polls for the next group before it sleeps (0: at once).
	LanePollUS int `toml:"lane_poll_us"`
	// PollNearby: with fewer than two lanes, poll after answering callers
	// on this machine too (by default only callers of other machines: one
	// on this machine needs the cores).
	PollNearby bool `toml:"poll_nearby"`
	// GoProcs, if positive, is how many threads run the Go side of a node
	// that is not a gating node at once (GOMAXPROCS; 0: Go's default,
	// every core). An expert node whose lanes take every core it has, on
	// cores its gating node shares (the loopback testnet's), answers
	// faster with 1: its network's goroutine hand-offs stay on one thread
	// instead of waking others onto the cores the lanes compute on.
	GoProcs int `toml:"go_procs"`
	// RequireEscrow refuses expert calls that name no escrow with enough
	// left for their gating node (on a node with a ledger).
	RequireEscrow bool `toml:"require_escrow"`
	// Spans is a run of layers "A-B" (inclusive) the node serves on the
	// span protocol, attention and every expert of those layers, or
	// "auto" (expert.ChooseSpan); empty: none.
	Spans string `toml:"spans"`
	// SpanExperts is where a span's experts are computed: "host", every
	// expert of the span's layers hosted here; "call", only those the
	// experts setting hosts, the others called on other nodes as a gating
	// node calls them (a span of attention and routers alone, for a node
	// with little memory near the expert nodes).
	SpanExperts string `toml:"span_experts"`
}

// GatingConfig makes the node a gating node of a model.
type GatingConfig struct {
	Enabled bool `toml:"enabled"`
	// Model is the CID of the model to serve; empty uses expert.model.
	Model       string `toml:"model"`
	MaxSessions int    `toml:"max_sessions"`
	// MaxQueue requests wait, each at most QueueTimeout, while every
	// session is busy.
	MaxQueue     int      `toml:"max_queue"`
	QueueTimeout Duration `toml:"queue_timeout"`
	Context      int      `toml:"context"`
	MaxTokens    int      `toml:"max_tokens"`
	WireDType    string   `toml:"wire_dtype"`
	CallTimeout  Duration `toml:"call_timeout"`
	Threads      int      `toml:"threads"`
	Validate     bool     `toml:"validate"`
	// Spans sends forward passes through span nodes where the spans
	// announced cover every layer.
	Spans bool `toml:"spans"`
	// Layers is when the served model's layers (the gating shard's
	// attention and routers) are loaded: "auto", when a generation first
	// computes them here (never while spans cover the model); "load", at
	// start.
	Layers string `toml:"layers"`
	// ProvenFirst sends calls and a layer's group to providers that have
	// answered before any that has not (new ones are proven by the
	// validator's probes, off the generation's path): with many Sybils
	// announcing every expert, tokens came 20x faster. Off by default
	// until its effect on a network with a slow node under load is
	// measured (the lavapipe crash it once exposed was stale Vulkan
	// descriptors, fixed in the backend's build).
	ProvenFirst bool `toml:"proven_first"`
	// RequirePayment refuses requests that do not pay: over the infer
	// protocol, one that names no escrow; on the HTTP API, one without an
	// API key (on a node with a ledger).
	RequirePayment bool `toml:"require_payment"`
	// Speculate is speculative decoding's drafter: "off", "ngram" (prompt
	// lookup) or "draft" (the draft model at Draft); SpeculateMax bounds
	// a draft.
	Speculate    string `toml:"speculate"`
	Draft        string `toml:"draft"`
	SpeculateMax int    `toml:"speculate_max"`
	// BatchWait is how long a generation's MoE call waits for the other
	// generations' to go out with them as one round of expert calls
	// (continuous batching), and, with Lockstep, a generation's decode
	// step for the others' to compute each gating layer and the head with
	// them in one graph (moe.Lockstepper); 0 turns both off.
	BatchWait Duration `toml:"batch_wait"`
	// Lockstep computes the generations' decode steps together while the
	// gating compute is busy at least LockstepBusy of the time (0:
	// always): it gains where the compute is the bottleneck (nodes on one
	// machine or a LAN, or many users); where the expert calls take a
	// round trip longer than the compute (a WAN), a shared step only puts
	// every user's compute on each one's way.
	Lockstep     bool    `toml:"lockstep"`
	LockstepBusy float64 `toml:"lockstep_busy"`
	// WaitPollUS is how long at most, in microseconds, a core is kept
	// awake while a layer's expert calls are out (0: never); PollNearby
	// polls while an expert node this node calls is on this machine too:
	// the nodes have cores of their own (a pinned testnet).
	WaitPollUS int  `toml:"wait_poll_us"`
	PollNearby bool `toml:"poll_nearby"`
}

// ModelCID is the model the gating node serves.
func (g GatingConfig) ModelCID(c Config) string {
	if g.Model != "" {
		return g.Model
	}
	return c.Expert.Model
}

// LedgerConfig puts the node on a NEURO chain.
type LedgerConfig struct {
	// Genesis is the chain's genesis file; empty: no ledger.
	Genesis string `toml:"genesis"`
	// Listen is CometBFT's p2p address, and Peers the other validators
	// ("nodeid@host:port"): used when the genesis names this node a
	// validator.
	Listen        string   `toml:"listen"`
	Peers         []string `toml:"peers"`
	BlockInterval Duration `toml:"block_interval"`
}

// P2PConfig configures the libp2p host and the DHT.
type P2PConfig struct {
	Listen           []string     `toml:"listen"`
	Bootstrap        []string     `toml:"bootstrap"`
	BootstrapTimeout Duration     `toml:"bootstrap_timeout"`
	Roles            []string     `toml:"roles"`
	DHT              DHTConfig    `toml:"dht"`
	NAT              NATConfig    `toml:"nat"`
	Limits           LimitsConfig `toml:"limits"`
}

// DHTConfig configures the Kademlia DHT.
type DHTConfig struct {
	// Mode is auto, server or client.
	Mode string `toml:"mode"`
}

// NATConfig configures NAT traversal.
type NATConfig struct {
	PortMap      bool     `toml:"port_map"`
	AutoNAT      bool     `toml:"autonat"`
	HolePunching bool     `toml:"hole_punching"`
	RelayClient  bool     `toml:"relay_client"`
	RelayService string   `toml:"relay_service"`
	StaticRelays []string `toml:"static_relays"`
	Reachability string   `toml:"reachability"`
}

// LimitsConfig bounds what the node accepts from the network.
type LimitsConfig struct {
	ConnsLow    int      `toml:"conns_low"`
	ConnsHigh   int      `toml:"conns_high"`
	ConnsGrace  Duration `toml:"conns_grace"`
	MaxConns    int      `toml:"max_conns"`
	MaxStreams  int      `toml:"max_streams"`
	MaxMemoryMB int      `toml:"max_memory_mb"`
}

// GossipConfig configures the heartbeat on the routing topic.
type GossipConfig struct {
	HeartbeatInterval Duration `toml:"heartbeat_interval"`
	// HeartbeatRate stretches the interval as the network grows: a node
	// beats every max(HeartbeatInterval, peers heard / HeartbeatRate), so
	// that the whole network carries about HeartbeatRate heartbeats a
	// second; 0 keeps the interval fixed.
	HeartbeatRate float64  `toml:"heartbeat_rate"`
	PeerTableSize int      `toml:"peer_table_size"`
	PeerExpiry    Duration `toml:"peer_expiry"`
}

// HTTPConfig is the node's public, read-only HTTP listener.
type HTTPConfig struct {
	// Listen is a host:port serving the dashboard (/), its data
	// (/api/v1/state), Prometheus metrics (/metrics) and, on a gating
	// node, the OpenAI-compatible API (/v1/...); empty disables it.
	Listen string `toml:"listen"`
	// TLSCert and TLSKey, both set, serve HTTPS with this certificate
	// and key (PEM files).
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// AllowUnauthenticated lets a gating node without API keys listen on
	// an address that is not loopback (its API then answers anyone).
	AllowUnauthenticated bool `toml:"allow_unauthenticated"`
}

// HomeConfig caps what the node takes of a machine its owner also uses.
type HomeConfig struct {
	// Threads caps the compute threads (expert and gating); 0: every core.
	Threads int `toml:"threads"`
	// MemoryMB caps the expert weights (expert.memory_mb) and sets
	// GOMEMLIMIT for Go's heap; 0: no cap.
	MemoryMB int `toml:"memory_mb"`
	// MaxLoad pauses expert work while the machine's 1-minute load per
	// core is above it; 0: never.
	MaxLoad float64 `toml:"max_load"`
	// IdleOnly pauses expert work while other processes keep the CPU
	// busier than IdleThreshold (a fraction of all cores) or use a GPU.
	IdleOnly      bool    `toml:"idle_only"`
	IdleThreshold float64 `toml:"idle_threshold"`
	// IdleCheck is how often the load is sampled.
	IdleCheck Duration `toml:"idle_check"`
	// ComputePoll is how long the compute threadpools' idle threads spin
	// for the next graph before they sleep, in ggml's polling levels
	// (0-100; 1 is about 4 ms on a 2020s x86 core, ggml's own default is
	// 50): a node computes a layer, waits on the network, computes the
	// next, and a thread that slept wakes on a core that went idle (on a
	// virtual machine long enough to undo what the extra threads gain).
	// 0 where several nodes share the machine's cores (the testnets): a
	// spinning thread takes a core from the node it waits for. Spinning
	// threads count in the load average (MaxLoad) as computing ones do.
	ComputePoll int `toml:"compute_poll"`
	// Device is where experts and the gating compute run: "cpu" (the
	// default), "auto", "vulkan:N" or "cuda:N" (neurod resolves it; a
	// device that is missing is an error, never a fall back).
	Device string `toml:"device"`
}

// APIConfig configures the local control API (status for `neurod status`
// and the testnet launcher).
type APIConfig struct {
	// Listen is a host:port; empty disables the API.
	Listen string `toml:"listen"`
}

// LogConfig configures logging.
type LogConfig struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
}

// DefaultHeartbeatRate is gossip.heartbeat_rate's default: heartbeats a
// second on the routing topic, network-wide. Up to 25 nodes beat every 5 s;
// 300 every minute, 1,000 every 200 s (neurod testnet sim measures it).
const DefaultHeartbeatRate = 5.0

// DefaultConfig returns the settings a fresh `neurod init` writes.
func DefaultConfig() Config {
	return Config{
		P2P: P2PConfig{
			Listen:           []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"},
			Bootstrap:        []string{},
			BootstrapTimeout: Duration(30 * time.Second),
			Roles:            []string{},
			DHT:              DHTConfig{Mode: "auto"},
			NAT: NATConfig{
				PortMap:      true,
				AutoNAT:      true,
				HolePunching: true,
				RelayClient:  true,
				RelayService: "auto",
				StaticRelays: []string{},
				Reachability: "auto",
			},
			Limits: LimitsConfig{
				ConnsLow:    32, // Kubo's: a node needs its mesh, routing
				ConnsHigh:   96, // table and sessions, not the whole network
				ConnsGrace:  Duration(30 * time.Second),
				MaxConns:    512,
				MaxStreams:  4096,
				MaxMemoryMB: 1024,
			},
		},
		Gossip: GossipConfig{
			HeartbeatInterval: Duration(5 * time.Second),
			HeartbeatRate:     DefaultHeartbeatRate,
			PeerTableSize:     4096,
			PeerExpiry:        Duration(30 * time.Second),
		},
		Expert: ExpertConfig{Experts: "auto", MemoryMB: 4096, LanePollUS: DefaultLanePollUS, RequireEscrow: true, SpanExperts: "host"},
		Ledger: LedgerConfig{Listen: "tcp://0.0.0.0:26656", Peers: []string{}, BlockInterval: Duration(time.Second)},
		Gating: GatingConfig{MaxQueue: 64, QueueTimeout: Duration(2 * time.Minute), MaxTokens: 256, WireDType: "f32", Speculate: "off", SpeculateMax: 8, BatchWait: Duration(10 * time.Millisecond), Lockstep: true, LockstepBusy: DefaultLockstepBusy, CallTimeout: Duration(30 * time.Second), Validate: true, Spans: true, Layers: "auto",
			RequirePayment: true, WaitPollUS: DefaultWaitPollUS},
		Home: HomeConfig{IdleThreshold: 0.5, IdleCheck: Duration(5 * time.Second), ComputePoll: DefaultComputePoll, Device: "cpu"},
		API:  APIConfig{Listen: "127.0.0.1:0"},
		Log:  LogConfig{Level: "info", Format: "text"},
	}
}

// DefaultLockstepBusy is gating.lockstep_busy's default: the sessions
// compute in lockstep while the gating compute took at least half of the
// last quarter second.
const DefaultLockstepBusy = 0.5

// DefaultComputePoll is home.compute_poll's default: the compute threads
// of a node with the machine to itself spin about 4 ms for the next layer
// (BenchmarkGatingAfterWait).
const DefaultComputePoll = 1

// maxGoProcs bounds expert.go_procs.
const maxGoProcs = 4096

// DefaultLanePollUS is expert.lane_poll_us's default: a decode step's
// layers on the bench model come about 1.5 ms apart on loopback.
const DefaultLanePollUS = 2000

// MaxLanePollUS bounds expert.lane_poll_us and gating.wait_poll_us
// (moe.MaxLanePoll).
const MaxLanePollUS = int(moe.MaxLanePoll / time.Microsecond)

// DefaultWaitPollUS is gating.wait_poll_us's default (gating.DefaultWaitPoll).
const DefaultWaitPollUS = 5000

// configTemplate is the commented config.toml that `neurod init` writes. A
// test checks that it decodes to exactly DefaultConfig().
const configTemplate = `# neurod configuration.
#
# Precedence: command-line flags > NEURO_* environment variables > this file.
# Every key has an environment variable: upper-case its path and join with
# '_' (p2p.dht.mode -> NEURO_P2P_DHT_MODE). Lists in the environment are
# comma-separated. Unknown keys are an error.

[p2p]
# Multiaddrs to listen on (TCP and QUIC by default, on every interface).
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
# Peers to dial at start: multiaddrs ending in /p2p/<peer ID>. Empty for the
# first node of a network.
bootstrap = []
# How long to keep retrying the bootstrap peers at start. If none answers in
# that time, 'neurod run' fails.
bootstrap_timeout = "30s"
# Roles this node announces in its heartbeats: bootstrap, relay, gating, expert.
roles = []

[p2p.dht]
# auto: DHT server when AutoNAT finds the node publicly reachable, client
# otherwise. server or client force the mode.
mode = "auto"

[p2p.nat]
# Ask the home router for a port mapping (UPnP / NAT-PMP).
port_map = true
# Learn our reachability from peers (AutoNAT v2) and answer their probes.
autonat = true
# Upgrade relayed connections to direct ones (DCUtR).
hole_punching = true
# Reserve slots on relays when we are not publicly reachable.
relay_client = true
# Serve circuit relay v2 for others: auto (only while publicly reachable,
# with libp2p's limits on a relayed connection, enough to hole-punch), on
# (always, without limits: carries the traffic of homes that cannot punch
# through) or off.
relay_service = "auto"
# Relays to use instead of discovering them from connected peers.
static_relays = []
# auto: AutoNAT finds out (its first probe waits 15 s; until then a home
# behind NAT holds no relay reservation). private: this node knows it is
# behind a NAT without port forwarding: DHT client and relay reservations
# at once. public: it knows it is reachable at its addresses.
reachability = "auto"

[p2p.limits]
# Connection manager: trim to conns_low when above conns_high; new
# connections are safe from trimming for conns_grace. Peers in a GossipSub
# mesh, with an expert session or a generation in progress go last.
conns_low = 32
conns_high = 96
conns_grace = "30s"
# Resource manager hard limits for the whole node.
max_conns = 512
max_streams = 4096
max_memory_mb = 1024

[gossip]
# How often this node publishes its heartbeat on the routing topic...
heartbeat_interval = "5s"
# ...stretched in a large network to (peers heard / heartbeat_rate), so that
# the whole network carries about this many heartbeats a second (0: never
# stretched). A peer is forgotten 3 of its intervals after its last heartbeat.
heartbeat_rate = 5.0
# How many peers' heartbeats to remember, and for how long (at least) after the last one.
peer_table_size = 4096
peer_expiry = "30s"

[expert]
# CID of the model whose experts this node hosts (printed by
# 'neurod model import'). Empty: host none, only keep and serve shards.
model = ""
# Which experts: "auto" (those with the fewest providers, within the memory
# budget, whole layers when they fit), "none", or a list such as
# "0:3,0:5,1:*".
experts = "auto"
# Memory for expert weights, in MiB.
memory_mb = 4096
# Threads for expert compute; 0 uses every core.
threads = 0
# How many experts of one call group (a gating node's experts of a layer on
# this node) compute at the same time, each on threads of its own (threads
# each); 0 or 1: together in one graph. With threads = 1 and lanes = the
# cores, a layer's experts each take a core and no thread waits for
# another (ggml's threads spin at every op while they wait).
lanes = 0
# With lanes: how long (microseconds) a lane that finished its share keeps
# polling for the next layer's experts, yielding its core to anything that
# wants it, before it sleeps; 0: it sleeps at once. A decode step's next
# layer usually comes within a millisecond or two, and a sleeping thread
# takes far longer to wake on a virtual machine's idle core (200 us at the
# mean) than a polling one takes to start (at most 1000000).
lane_poll_us = 2000
# With lanes below 2 the node's compute thread is Go's: a thread of its own
# polls lane_poll_us after each answer instead, after answering callers of
# other machines only unless poll_nearby (a caller on this machine needs
# the cores; for nodes on cores of their own, as 'neurod testnet --pin'
# runs them).
poll_nearby = false
# On a node that is not a gating node: how many threads run its Go side
# (the network, the answers) at once (GOMAXPROCS); 0: every core. 1 suits
# an expert node whose lanes take every core on cores a gating node shares
# ('neurod testnet' sets it so): the network's hand-offs between
# goroutines then stay on one thread instead of waking others.
go_procs = 0
# With a ledger: refuse to compute for a call that names no escrow with
# enough left for the gating node that calls (no one computes for free).
require_escrow = true
# Serve a span of layers "A-B" (inclusive, e.g. "12-23"): their attention,
# norms and routers (the model's layer shards) and every expert of them
# (besides the experts above), so that a head sends a forward pass through
# them in one round trip instead of one per layer. "auto": the longest run
# of layers that fits memory_mb, among those the fewest announced spans
# cover. Empty: none. Needs a model split in format 2.
spans = ""
# Where the span's experts are computed: "host" hosts every expert of its
# layers here; "call" hosts only those the experts setting lists and calls
# the others on the nodes that host them, as a gating node does (choosing,
# hedging and checking them): a span of attention and routers alone, for a
# node with little memory near the expert nodes ("auto" spans then count
# the layer shards alone against memory_mb).
span_experts = "host"

[gating]
# Serve a model as a gating node: run its embeddings, attention and router
# here, send each layer's hidden states to the expert nodes, and answer
# clients (the /neuro/infer/1.0.0 protocol, and the OpenAI-compatible API
# on http.listen).
enabled = false
# CID of the model to serve; empty: expert.model.
model = ""
# Generations that run at once; 0 sizes them from memory: as many as the
# served model's KV caches (context tokens each) fit in half the memory free
# where they live, at most 64.
max_sessions = 0
# While every session is busy, up to max_queue requests wait for one, in
# order, each for at most queue_timeout; one more is answered busy (its
# client tries another gating node).
max_queue = 64
queue_timeout = "2m"
# KV cache of a session in tokens; 0: the model's context, at most 4096.
context = 0
# Tokens generated when a request sets no limit.
max_tokens = 256
# Hidden states on the wire: "f32" (results identical to llama.cpp) or
# "f16" (half the bytes).
wire_dtype = "f32"
# Longest wait for one expert call before it is sent elsewhere.
call_timeout = "30s"
# Threads for the gating compute; 0 uses every core.
threads = 0
# Speculative decoding: "ngram" drafts the tokens that followed the last few
# where they appeared before (in the prompt or the text so far) and checks
# up to speculate_max of them in one forward pass, one round trip per MoE
# layer for all; greedy output is unchanged, sampled output keeps the
# model's distribution. "draft" drafts with the greedy continuation of the
# small model at draft (a GGUF file of the served model's vocabulary, for
# example a smaller quantization of it, or the CID of such a model imported
# into the network: its shards are fetched and joined into one file in the
# store), computed whole on this node. "off"
# makes one pass per token.
speculate = "off"
draft = ""
speculate_max = 8
# Continuous batching: the generations that reach the same MoE layer send
# its tokens together, one request per expert holding every generation's
# rows (each paid from its own escrow, computed as it would be alone). A
# call waits for the generations computing toward the same layer at most
# batch_wait, so that one long prompt does not hold the others up. "0s"
# sends every generation's calls alone.
batch_wait = "10ms"
# Compute the generations' decode steps together, within batch_wait: each
# layer's attention and the output head one graph for them all, the
# weights read once (each generation's logits exactly what it gets alone)
# — while the gating compute is busy at least lockstep_busy of the time
# (0: always). It gains where the compute is the bottleneck (expert calls
# quick beside it: nodes on one machine or a LAN, or many users); where
# the compute has time to spare, a shared step only puts every user's
# compute on each one's path (16 users at 50 ms RTT, always: 15 against
# 20 tokens/s).
lockstep = true
lockstep_busy = 0.5
# While a layer's expert calls are out, keep a core awake for their answers
# at most this long (microseconds; 0: never): a thread polls, yielding the
# core to anything that wants it, so the answer wakes a thread on a running
# core (waking a core the hypervisor halted took 0.1-0.2 ms on a virtual
# machine). Not while an expert node this node calls is on this machine
# (it needs the cores), unless poll_nearby (for nodes on cores of their
# own, as 'neurod testnet --pin' runs them), nor for a node that usually
# answers later than the poll lasts. The experts' receipts come after
# their answers (off the answer's way), signed 16 at a time.
wait_poll_us = 5000
poll_nearby = false
# Re-execute a sample of the experts' results on other providers and keep
# peers whose results are found wrong out (reputation in
# <home>/reputation.json). Off trusts every expert node.
validate = true
# Where span nodes (expert.spans on other nodes) cover every layer, send
# each forward pass through the chain of fewest spans: one round trip per
# span instead of one per MoE layer. Off: always call experts layer by
# layer from here.
spans = true
# When the model's layers (attention and routers: the gating shard) are
# loaded: "auto" when a generation first computes them here, so that a head
# whose generations all go through spans holds its embeddings and output
# head only; "load" at start.
layers = "auto"
# Send expert calls (and a layer's calls grouped for one node) to providers
# that have answered before any that has not; new providers are proven by
# the validator's probes meanwhile (with validate). Many Sybils announcing
# every expert then cost nothing per call. Off for now: see the README.
proven_first = false
# With a ledger: refuse requests that do not pay. Over the infer protocol a
# request must name an escrow (or carry the transaction that opens one); on
# the HTTP API it must carry an API key ('neurod apikey create'), whose
# account pays. Off runs unpaid requests for nothing.
require_payment = true

[ledger]
# The NEURO chain's genesis file; empty: this node takes no part in the
# ledger. A node the genesis names a validator runs the chain (CometBFT,
# in process); the others submit transactions over the ledger topic and
# ask validators for balances.
genesis = ""
# Validators only: CometBFT's own p2p address, the other validators as
# "nodeid@host:port", and the pause between blocks.
listen = "tcp://0.0.0.0:26656"
peers = []
block_interval = "1s"

[http]
# Public HTTP listener, as host:port: the dashboard (/), its data
# (/api/v1/state), Prometheus metrics (/metrics) and, on a gating node, the
# OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions).
# Everything but /v1/ is read-only. Once the node has issued API keys
# ('neurod apikey create'), every /v1/ request needs one
# (Authorization: Bearer KEY); without keys a gating node listens on
# loopback only, unless allow_unauthenticated is set. Empty disables it.
listen = ""
# Serve HTTPS: a PEM certificate (chain) and its key; both or neither.
tls_cert = ""
tls_key = ""
allow_unauthenticated = false

[home]
# Caps for a machine its owner also uses. Threads for all compute (caps
# expert.threads and gating.threads); 0: every core.
threads = 0
# Memory for the node in MiB: caps expert.memory_mb (the weights) and sets
# GOMEMLIMIT (Go's heap, a soft limit). 0: no cap.
memory_mb = 0
# Pause expert work while the machine's 1-minute load average per core is
# above this; 0: never.
max_load = 0.0
# Take expert work only while the machine is otherwise idle: pause while
# other processes use more than idle_threshold of the CPU (0-1, of all
# cores) or any GPU, and resume once it has been idle for three checks.
# Paused nodes say so in their heartbeats and gating nodes route around them.
idle_only = false
idle_threshold = 0.5
idle_check = "5s"
# How long idle compute threads spin for the next layer before they sleep,
# in ggml's polling levels (0-100; 1 is about 4 ms, ggml's own default 50):
# a node computes a layer, then waits on the network, and a thread that
# slept wakes slowly on an idle core. 0 where several nodes share this
# machine's cores (the testnets set it so): a spinning thread takes a core
# from the node it waits for. Spinning threads count in the load average
# (max_load) as computing ones do.
compute_poll = 1
# Where experts and the gating compute run: "cpu", "auto" (the fastest
# device there is), "vulkan:N" or "cuda:N" (a GPU backend that 'make vulkan'
# or 'make cuda' put beside neurod; 'neurod version' lists the devices). A
# device that is missing is an error, never a fall back to the CPU. On a GPU
# with expert.memory_mb = 0, the experts get the device's free memory, less
# room for the gating compute on a gating node.
device = "cpu"

[api]
# Local control API (neurod status, the testnet launcher), as a loopback
# host:port or a Unix socket "unix:/path/api.sock" (mode 0600). Empty
# disables it.
listen = "127.0.0.1:0"

[log]
# debug, info, warn or error.
level = "info"
# text or json.
format = "text"
`

// DecodeConfig parses a config.toml. Unknown keys are an error; keys that
// are absent keep their default.
func DecodeConfig(data []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, describeTOMLError(err)
	}
	return cfg, nil
}

// LoadConfig reads and validates the config file at path.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Config{}, fmt.Errorf("config %s: %w (run 'neurod init' first)", path, ErrNotInitialized)
	}
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg, err := DecodeConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func describeTOMLError(err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		e := strict.Errors[0]
		row, col := e.Position()
		return fmt.Errorf("line %d column %d: unknown key %q", row, col, strings.Join(e.Key(), "."))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("line %d column %d: %s", row, col, strings.TrimPrefix(de.Error(), "toml: "))
	}
	return err
}

// FieldError is a bad value of one config key.
type FieldError struct {
	// Key is the dotted toml path, e.g. "p2p.listen".
	Key string
	Err error
}

func (e *FieldError) Error() string { return e.Key + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

func fieldErr(key string, format string, args ...any) error {
	return &FieldError{Key: key, Err: fmt.Errorf(format, args...)}
}

// Validate checks every value and returns the first bad one as a
// *FieldError.
func (c *Config) Validate() error {
	if len(c.P2P.Listen) == 0 {
		return fieldErr("p2p.listen", "at least one listen address is needed")
	}
	if _, err := parseMultiaddrs("p2p.listen", c.P2P.Listen); err != nil {
		return err
	}
	if _, err := parseAddrInfos("p2p.bootstrap", c.P2P.Bootstrap); err != nil {
		return err
	}
	if c.P2P.BootstrapTimeout <= 0 {
		return fieldErr("p2p.bootstrap_timeout", "must be positive, got %v", c.P2P.BootstrapTimeout)
	}
	if _, err := parseRoles(c.P2P.Roles); err != nil {
		return err
	}
	if !oneOf(c.P2P.DHT.Mode, "auto", "server", "client") {
		return fieldErr("p2p.dht.mode", "%q: want auto, server or client", c.P2P.DHT.Mode)
	}
	if !oneOf(c.P2P.NAT.RelayService, "auto", "on", "off") {
		return fieldErr("p2p.nat.relay_service", "%q: want auto, on or off", c.P2P.NAT.RelayService)
	}
	if !oneOf(c.P2P.NAT.Reachability, "auto", "private", "public") {
		return fieldErr("p2p.nat.reachability", "%q: want auto, private or public", c.P2P.NAT.Reachability)
	}
	if _, err := parseAddrInfos("p2p.nat.static_relays", c.P2P.NAT.StaticRelays); err != nil {
		return err
	}
	l := c.P2P.Limits
	for _, f := range []struct {
		key string
		v   int
	}{
		{"p2p.limits.conns_low", l.ConnsLow},
		{"p2p.limits.conns_high", l.ConnsHigh},
		{"p2p.limits.max_conns", l.MaxConns},
		{"p2p.limits.max_streams", l.MaxStreams},
		{"p2p.limits.max_memory_mb", l.MaxMemoryMB},
		{"gossip.peer_table_size", c.Gossip.PeerTableSize},
	} {
		if f.v <= 0 {
			return fieldErr(f.key, "must be positive, got %d", f.v)
		}
	}
	if l.ConnsLow > l.ConnsHigh {
		return fieldErr("p2p.limits.conns_low", "%d is above conns_high %d", l.ConnsLow, l.ConnsHigh)
	}
	if l.ConnsHigh > l.MaxConns {
		return fieldErr("p2p.limits.conns_high", "%d is above max_conns %d", l.ConnsHigh, l.MaxConns)
	}
	if l.ConnsGrace < 0 {
		return fieldErr("p2p.limits.conns_grace", "must not be negative, got %v", l.ConnsGrace)
	}
	if c.Gossip.HeartbeatInterval < Duration(100*time.Millisecond) {
		return fieldErr("gossip.heartbeat_interval", "%v: at least 100ms", c.Gossip.HeartbeatInterval)
	}
	if c.Gossip.HeartbeatRate < 0 || math.IsNaN(c.Gossip.HeartbeatRate) || math.IsInf(c.Gossip.HeartbeatRate, 0) {
		return fieldErr("gossip.heartbeat_rate", "must be a non-negative number, got %v", c.Gossip.HeartbeatRate)
	}
	if c.Gossip.PeerExpiry <= c.Gossip.HeartbeatInterval {
		return fieldErr("gossip.peer_expiry", "%v must be longer than gossip.heartbeat_interval %v",
			c.Gossip.PeerExpiry, c.Gossip.HeartbeatInterval)
	}
	if (c.HTTP.TLSCert == "") != (c.HTTP.TLSKey == "") {
		return fieldErr("http.tls_cert", "set both http.tls_cert and http.tls_key, or neither")
	}
	if c.HTTP.Listen != "" {
		if _, _, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
			return fieldErr("http.listen", "%q: want host:port: %v", c.HTTP.Listen, err)
		}
	}
	if err := c.Home.validate(); err != nil {
		return err
	}
	if c.Expert.Model != "" {
		if _, err := cid.Decode(c.Expert.Model); err != nil {
			return fieldErr("expert.model", "%q: not a CID: %v", c.Expert.Model, err)
		}
	}
	if _, err := expert.ParseSpec(c.Expert.Experts); err != nil {
		return fieldErr("expert.experts", "%v", err)
	}
	if sp, auto, err := ParseSpans(c.Expert.Spans); err != nil {
		return fieldErr("expert.spans", "%v", err)
	} else if (sp.Layers() > 0 || auto) && c.Expert.Model == "" {
		return fieldErr("expert.spans", "a span needs expert.model")
	}
	if !oneOf(c.Expert.SpanExperts, "host", "call") {
		return fieldErr("expert.span_experts", "%q: want host or call", c.Expert.SpanExperts)
	}
	if c.Expert.MemoryMB <= 0 {
		return fieldErr("expert.memory_mb", "must be positive, got %d", c.Expert.MemoryMB)
	}
	if c.Expert.Threads < 0 {
		return fieldErr("expert.threads", "must not be negative, got %d", c.Expert.Threads)
	}
	if c.Expert.Lanes < 0 {
		return fieldErr("expert.lanes", "must not be negative, got %d", c.Expert.Lanes)
	}
	if c.Expert.GoProcs < 0 || c.Expert.GoProcs > maxGoProcs {
		return fieldErr("expert.go_procs", "must be 0 to %d, got %d", maxGoProcs, c.Expert.GoProcs)
	}
	if c.Expert.LanePollUS < 0 || c.Expert.LanePollUS > MaxLanePollUS {
		return fieldErr("expert.lane_poll_us", "must be 0 to %d, got %d", MaxLanePollUS, c.Expert.LanePollUS)
	}
	if err := c.validateGating(); err != nil {
		return err
	}
	if c.Ledger.Genesis != "" && c.Ledger.BlockInterval <= 0 {
		return fieldErr("ledger.block_interval", "must be positive, got %v", c.Ledger.BlockInterval)
	}
	if path, ok := strings.CutPrefix(c.API.Listen, unixPrefix); ok {
		if !filepath.IsAbs(path) {
			return fieldErr("api.listen", "%q: want unix:/absolute/path", c.API.Listen)
		}
	} else if c.API.Listen != "" {
		host, _, err := net.SplitHostPort(c.API.Listen)
		if err != nil {
			return fieldErr("api.listen", "%q: want host:port: %v", c.API.Listen, err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return fieldErr("api.listen", "%q: the control API has no authentication; use a loopback address", c.API.Listen)
		}
	}
	if _, err := ParseLogLevel(c.Log.Level); err != nil {
		return &FieldError{Key: "log.level", Err: err}
	}
	if !oneOf(c.Log.Format, "text", "json") {
		return fieldErr("log.format", "%q: want text or json", c.Log.Format)
	}
	return nil
}

// deviceSpec is a home.device value ("" is the CPU).
var deviceSpec = regexp.MustCompile(`^(|cpu|auto|(vulkan|cuda):[0-9]{1,3})$`)

func (h HomeConfig) validate() error {
	switch {
	case h.Threads < 0:
		return fieldErr("home.threads", "must not be negative, got %d", h.Threads)
	case h.MemoryMB < 0:
		return fieldErr("home.memory_mb", "must not be negative, got %d", h.MemoryMB)
	case h.MemoryMB > 0 && h.MemoryMB < 256:
		return fieldErr("home.memory_mb", "%d MiB is too little to run a node (at least 256)", h.MemoryMB)
	case h.MaxLoad < 0:
		return fieldErr("home.max_load", "must not be negative, got %g", h.MaxLoad)
	case h.ComputePoll < 0 || h.ComputePoll > 100:
		return fieldErr("home.compute_poll", "must be 0 to 100 (ggml's polling levels), got %d", h.ComputePoll)
	case h.IdleThreshold <= 0 || h.IdleThreshold > 1:
		return fieldErr("home.idle_threshold", "%g: want a fraction of the CPU above 0, at most 1", h.IdleThreshold)
	case (h.IdleOnly || h.MaxLoad > 0) && h.IdleCheck < Duration(100*time.Millisecond):
		return fieldErr("home.idle_check", "%v: at least 100ms", h.IdleCheck)
	case !deviceSpec.MatchString(h.Device):
		return fieldErr("home.device", "%q: want cpu, auto, vulkan:N or cuda:N", h.Device)
	}
	return nil
}

func (c *Config) validateGating() error {
	g := c.Gating
	if g.Model != "" {
		if _, err := cid.Decode(g.Model); err != nil {
			return fieldErr("gating.model", "%q: not a CID: %v", g.Model, err)
		}
	}
	if g.Enabled && g.ModelCID(*c) == "" {
		return fieldErr("gating.model", "a gating node needs a model (set gating.model or expert.model, or use --model)")
	}
	for _, f := range []struct {
		key string
		v   int
	}{{"gating.max_tokens", g.MaxTokens}, {"gating.max_queue", g.MaxQueue}} {
		if f.v <= 0 {
			return fieldErr(f.key, "must be positive, got %d", f.v)
		}
	}
	if g.QueueTimeout <= 0 {
		return fieldErr("gating.queue_timeout", "must be positive, got %v", g.QueueTimeout)
	}
	if g.MaxSessions < 0 {
		return fieldErr("gating.max_sessions", "must not be negative (0: sized from memory), got %d", g.MaxSessions)
	}
	if g.Context < 0 {
		return fieldErr("gating.context", "must not be negative, got %d", g.Context)
	}
	if g.Threads < 0 {
		return fieldErr("gating.threads", "must not be negative, got %d", g.Threads)
	}
	if !oneOf(g.WireDType, "f32", "f16") {
		return fieldErr("gating.wire_dtype", "%q: want f32 or f16", g.WireDType)
	}
	if !oneOf(g.Layers, "auto", "load") {
		return fieldErr("gating.layers", "%q: want auto or load", g.Layers)
	}
	if !oneOf(g.Speculate, "off", "ngram", "draft") {
		return fieldErr("gating.speculate", "%q: want off, ngram or draft", g.Speculate)
	}
	if g.Speculate == "draft" {
		if g.Draft == "" {
			return fieldErr("gating.draft", "speculate = \"draft\" needs a draft model (a GGUF file of the model's vocabulary, or a model's CID)")
		}
		if _, err := os.Stat(g.Draft); err != nil {
			if _, cerr := cid.Decode(g.Draft); cerr != nil {
				return fieldErr("gating.draft", "%q: neither a file (%v) nor a model CID", g.Draft, err)
			}
		}
	}
	if g.SpeculateMax < 1 || g.SpeculateMax > 64 {
		return fieldErr("gating.speculate_max", "%d: want 1 to 64", g.SpeculateMax)
	}
	if g.CallTimeout <= 0 {
		return fieldErr("gating.call_timeout", "must be positive, got %v", g.CallTimeout)
	}
	if g.BatchWait < 0 || time.Duration(g.BatchWait) > time.Second {
		return fieldErr("gating.batch_wait", "%v: want 0 (off) to 1s", time.Duration(g.BatchWait))
	}
	if g.WaitPollUS < 0 || g.WaitPollUS > MaxLanePollUS {
		return fieldErr("gating.wait_poll_us", "must be 0 to %d, got %d", MaxLanePollUS, g.WaitPollUS)
	}
	if g.LockstepBusy < 0 || g.LockstepBusy > 1 {
		return fieldErr("gating.lockstep_busy", "%v: want 0 (always) to 1", g.LockstepBusy)
	}
	return nil
}

// ParseLogLevel parses debug, info, warn or error.
func ParseLogLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%q: want debug, info, warn or error", s)
	}
	return l, nil
}

func oneOf(s string, choices ...string) bool {
	for _, c := range choices {
		if s == c {
			return true
		}
	}
	return false
}

func parseMultiaddrs(key string, ss []string) ([]ma.Multiaddr, error) {
	out := make([]ma.Multiaddr, 0, len(ss))
	for i, s := range ss {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fieldErr(fmt.Sprintf("%s[%d]", key, i), "%q: invalid multiaddr: %v", s, err)
		}
		out = append(out, a)
	}
	return out, nil
}

// parseAddrInfos parses multiaddrs that end in /p2p/<peer ID>.
func parseAddrInfos(key string, ss []string) ([]peer.AddrInfo, error) {
	addrs, err := parseMultiaddrs(key, ss)
	if err != nil {
		return nil, err
	}
	infos := make([]peer.AddrInfo, 0, len(addrs))
	for i, a := range addrs {
		ai, err := peer.AddrInfoFromP2pAddr(a)
		if err != nil {
			return nil, fieldErr(fmt.Sprintf("%s[%d]", key, i), "%q: want a multiaddr ending in /p2p/<peer ID>: %v", ss[i], err)
		}
		infos = append(infos, *ai)
	}
	return infos, nil
}

func parseRoles(ss []string) ([]neuropb.Role, error) {
	out := make([]neuropb.Role, 0, len(ss))
	for i, s := range ss {
		r, err := neuropb.ParseRole(s)
		if err != nil {
			return nil, &FieldError{Key: fmt.Sprintf("p2p.roles[%d]", i), Err: err}
		}
		out = append(out, r)
	}
	return out, nil
}

// Duration is a time.Duration written as a string ("30s") in TOML.
type Duration time.Duration

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q (want e.g. \"30s\", \"2m\")", b)
	}
	*d = Duration(v)
	return nil
}

// String formats like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// ToP2P converts the validated config into the p2p package's typed form.
func (c *Config) ToP2P() (p2p.Config, error) {
	listen, err := parseMultiaddrs("p2p.listen", c.P2P.Listen)
	if err != nil {
		return p2p.Config{}, err
	}
	boot, err := parseAddrInfos("p2p.bootstrap", c.P2P.Bootstrap)
	if err != nil {
		return p2p.Config{}, err
	}
	relays, err := parseAddrInfos("p2p.nat.static_relays", c.P2P.NAT.StaticRelays)
	if err != nil {
		return p2p.Config{}, err
	}
	roles, err := parseRoles(c.P2P.Roles)
	if err != nil {
		return p2p.Config{}, err
	}
	l := c.P2P.Limits
	return p2p.Config{
		Listen:           listen,
		Bootstrap:        boot,
		BootstrapTimeout: time.Duration(c.P2P.BootstrapTimeout),
		Roles:            roles,
		DHTMode:          map[string]p2p.DHTMode{"auto": p2p.DHTAuto, "server": p2p.DHTServer, "client": p2p.DHTClient}[c.P2P.DHT.Mode],
		PortMap:          c.P2P.NAT.PortMap,
		AutoNAT:          c.P2P.NAT.AutoNAT,
		HolePunching:     c.P2P.NAT.HolePunching,
		RelayClient:      c.P2P.NAT.RelayClient,
		RelayService:     map[string]p2p.RelayMode{"auto": p2p.RelayAuto, "on": p2p.RelayOn, "off": p2p.RelayOff}[c.P2P.NAT.RelayService],
		StaticRelays:     relays,
		Reachability:     map[string]p2p.Reach{"auto": p2p.ReachAuto, "private": p2p.ReachPrivate, "public": p2p.ReachPublic}[c.P2P.NAT.Reachability],
		Limits: p2p.Limits{
			ConnsLow:   l.ConnsLow,
			ConnsHigh:  l.ConnsHigh,
			ConnsGrace: time.Duration(l.ConnsGrace),
			MaxConns:   l.MaxConns,
			MaxStreams: l.MaxStreams,
			MaxMemory:  int64(l.MaxMemoryMB) << 20,
		},
		HeartbeatInterval: time.Duration(c.Gossip.HeartbeatInterval),
		HeartbeatRate:     c.Gossip.HeartbeatRate,
		PeerTableSize:     c.Gossip.PeerTableSize,
		PeerExpiry:        time.Duration(c.Gossip.PeerExpiry),
	}, nil
}
