package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet"
)

// testnetReport is the JSON of `neurod testnet --json`. Later issues add
// fields; none is ever renamed or removed.
type testnetReport struct {
	Healthy bool          `json:"healthy"`
	Error   string        `json:"error,omitempty"`
	TookMs  int64         `json:"took_ms"`
	Dir     string        `json:"dir"`
	Nodes   []testnetNode `json:"nodes"`
	// Stopped is filled in once the nodes have been stopped (--check).
	Stopped []testnetExit `json:"stopped,omitempty"`

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
	PerTokenMs      []float64 `json:"per_token_ms"`
	PromptTokens    int       `json:"prompt_tokens"`
	TokensPerSecond float64   `json:"tokens_per_second"`
	FinishReason    string    `json:"finish_reason,omitempty"`
	// Killed lists the nodes SIGKILLed by --kill, and after which token.
	Killed      []int `json:"killed,omitempty"`
	KilledAfter int   `json:"killed_after,omitempty"`
	// Rewinds counts the times the gating node withdrew tokens computed
	// from an expert result that a later check found wrong.
	Rewinds int           `json:"rewinds"`
	Stats   *testnetStats `json:"stats,omitempty"`
	// HTTP is node 0's HTTP listener: the dashboard, /metrics and the
	// gating node's OpenAI-compatible API.
	HTTP string `json:"http,omitempty"`
	// Topology and Connections (--netns): where each node runs, and how the
	// pairs of nodes that exchanged expert traffic talked.
	Topology    *testnetTopology `json:"topology,omitempty"`
	Connections []testnetConn    `json:"connections,omitempty"`
	// Link (--netns with --rtt, --loss, ...): the homes' lines, asked and measured.
	Link *testnetLink `json:"link,omitempty"`
	// Requests is how many times the prompt was answered (--requests);
	// every answer had the same tokens.
	Requests int `json:"requests"`
	// Validation counts the answers the gating node used, the extra calls
	// it made to check them, and the results found wrong.
	Validation *node.ValidationStatus `json:"validation,omitempty"`
	// Ledger is the testnet's chain (node 0 validates) before and after
	// the generation.
	Ledger *testnetLedger `json:"ledger,omitempty"`
}

// testnetLedger is the chain's state around the generation. Balances are
// in base units, by peer ID.
type testnetLedger struct {
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
}

// testnetStats are the gating node's measurements of the generation.
type testnetStats struct {
	PrefillMs     float64 `json:"prefill_ms"`
	PerTokenP50Ms float64 `json:"per_token_p50_ms"`
	PerTokenP99Ms float64 `json:"per_token_p99_ms"`
	ExpertCalls   uint64  `json:"expert_calls"`
	ExpertBytes   uint64  `json:"expert_bytes"`
	BytesPerToken float64 `json:"bytes_per_token"`
	MoELayers     uint64  `json:"moe_layers"`
	// OneNodeLayers: MoE layers whose expert calls one node answered.
	OneNodeLayers  uint64  `json:"one_node_layers"`
	MoEWallMs      float64 `json:"moe_wall_ms"`
	MoEComputeMs   float64 `json:"moe_compute_ms"`
	DispatchPerLay float64 `json:"dispatch_overhead_per_layer_us"`
	Hedges         uint64  `json:"hedges"`
	Redispatches   uint64  `json:"redispatches"`
}

type testnetNode struct {
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
	// Experts lists the experts the node serves ("layer:expert").
	Experts     []string `json:"experts"`
	ExpertCalls int64    `json:"expert_calls"`
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

type testnetExit struct {
	Index  int  `json:"index"`
	PID    int  `json:"pid"`
	Clean  bool `json:"clean"`
	Killed bool `json:"killed"`
	// Crashed is true for the nodes --kill SIGKILLed.
	Crashed bool   `json:"crashed,omitempty"`
	Error   string `json:"error,omitempty"`
}

func newTestnetCmd(g *globalFlags) *cobra.Command {
	var a testnetArgs
	var kill, slow, faulty, nat, rtt, jitter, loss, bandwidth string
	var na netnsArgs
	cmd := &cobra.Command{
		Use:   "testnet",
		Short: "Start a local network of real neurod processes that answers a prompt",
		Long: `testnet starts a local network of real neurod processes on 127.0.0.1 and
answers a prompt through it.

It generates the tiny test model (or takes --model FILE.gguf), splits it
into content-addressed shards and imports them into node 0. Node 0 is the
bootstrap, relay and gating node; nodes 1 to --nodes are expert nodes,
which know only node 0's address, fetch the experts they choose by CID and
serve them. Once every node has every other in its DHT routing table and
has heard a GossipSub heartbeat from each, and every expert is served by
two nodes, testnet asks the network for --prompt through the client
library (a light DHT client, as any user's program would be) and prints
the text with each token's latency. Then it keeps the network up until
Ctrl-C, with the gating node's OpenAI-compatible API on loopback, and
stops every node.

With --check it exits after answering: status 0 when all went well, 1 when
not. --json prints a machine-readable report on stdout. --kill K@T SIGKILLs
the K busiest expert nodes after token T: the generation goes on through
the others. Decoding is greedy, so the tokens equal
'neurod generate --local FILE.gguf' on the same prompt. Node homes and
logs are in --dir (default: a temporary directory, removed afterwards).`,
		Example: `  neurod testnet
  neurod testnet --nodes 4 --prompt "Once upon a time" --max-tokens 32 --check --json
  neurod testnet --model mixtral.gguf --kill 1@8 --check
  sudo neurod testnet --netns --homes 3 --nat cone,symmetric,cone --rtt 50ms --check --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if a.nodes < 1 {
				return fmt.Errorf("flag --nodes %d: need at least 1 expert node", a.nodes)
			}
			if a.timeout <= 0 {
				return fmt.Errorf("flag --timeout %v: must be positive", a.timeout)
			}
			if a.prompt == "" {
				return errors.New("flag --prompt: must not be empty")
			}
			if a.maxTokens < 1 {
				return fmt.Errorf("flag --max-tokens %d: must be at least 1", a.maxTokens)
			}
			if a.model != "" {
				if _, err := os.Stat(a.model); err != nil {
					return fmt.Errorf("flag --model: %w", err)
				}
			}
			if kill != "" {
				k, t, ok := strings.Cut(kill, "@")
				var err1, err2 error
				a.killNodes, err1 = strconv.Atoi(k)
				a.killAfter, err2 = strconv.Atoi(t)
				if !ok || err1 != nil || err2 != nil || a.killNodes < 1 || a.killAfter < 1 {
					return fmt.Errorf("flag --kill %q: want K@T, e.g. 1@8: kill K expert nodes after token T", kill)
				}
				if a.killNodes >= a.nodes {
					return fmt.Errorf("flag --kill %q: %d of %d expert nodes would leave none", kill, a.killNodes, a.nodes)
				}
				if a.killAfter >= a.maxTokens {
					return fmt.Errorf("flag --kill %q: token %d is not before the last (--max-tokens %d)", kill, a.killAfter, a.maxTokens)
				}
			}
			if slow != "" {
				n, d, ok := strings.Cut(slow, ":")
				var err1, err2 error
				a.slowNode, err1 = strconv.Atoi(n)
				a.slowBy, err2 = time.ParseDuration(d)
				if !ok || err1 != nil || err2 != nil || a.slowNode < 1 || a.slowNode > a.nodes || a.slowBy <= 0 {
					return fmt.Errorf("flag --test-slow-node %q: want NODE:DURATION, NODE an expert node (1 to %d)", slow, a.nodes)
				}
			}
			if a.netns {
				if cmd.Flags().Changed("nodes") || kill != "" || faulty != "" || slow != "" || a.validators != 1 || a.requests != 1 || cmd.Flags().Changed("dashboard") {
					return errors.New("flag --netns: the netns testnet has --homes, --publics and --nat instead of --nodes, and does not yet take --kill, --faulty, --validators, --requests or --dashboard")
				}
				var err error
				if na.links, err = parseLinks(rtt, jitter, loss, bandwidth, na.homes); err != nil {
					return err
				}
				if na.homes < 2 {
					return fmt.Errorf("flag --homes %d: need at least 2 (a gating node and an expert node, each behind its NAT)", na.homes)
				}
				if na.publics < 1 {
					return fmt.Errorf("flag --publics %d: need at least 1", na.publics)
				}
				if na.nats, err = parseNATs(nat, na.homes); err != nil {
					return fmt.Errorf("flag --nat %q: %w", nat, err)
				}
				log, err := testnetLogger(cmd.ErrOrStderr(), g)
				if err != nil {
					return err
				}
				return runNetnsTestnet(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), a, na, log)
			}
			for _, name := range []string{"homes", "publics", "nat", "rtt", "jitter", "loss", "bandwidth", "spread"} {
				if cmd.Flags().Changed(name) {
					return fmt.Errorf("flag --%s: only with --netns (the loopback testnet has no homes, NAT or lines)", name)
				}
			}
			if _, _, err := net.SplitHostPort(a.dashboard); err != nil {
				return fmt.Errorf("flag --dashboard %q: want host:port: %w", a.dashboard, err)
			}
			if a.requests < 1 {
				return fmt.Errorf("flag --requests %d: must be at least 1", a.requests)
			}
			if a.validators < 1 || a.validators > a.nodes+1 {
				return fmt.Errorf("flag --validators %d: want 1 to %d (node 0 and the expert nodes)", a.validators, a.nodes+1)
			}
			if left := a.validators - min(a.killNodes, a.validators-1); a.validators > 1 && 3*left <= 2*a.validators {
				return fmt.Errorf("flag --kill %q: killing %d of %d validators would leave no 2/3 majority: the chain would halt", kill, a.killNodes, a.validators)
			}
			if faulty != "" {
				var err error
				if a.faults, err = parseFaulty(faulty, a.nodes); err != nil {
					return fmt.Errorf("flag --faulty %q: %w", faulty, err)
				}
			}
			return runTestnet(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, a)
		},
	}
	f := cmd.Flags()
	f.IntVar(&a.nodes, "nodes", 4, "number of expert nodes (plus the gating node, node 0)")
	f.StringVar(&a.dir, "dir", "", "directory for the node homes and logs (kept afterwards; default: a temporary one, removed)")
	f.BoolVar(&a.json, "json", false, "print a machine-readable report on stdout")
	f.BoolVar(&a.check, "check", false, "exit after answering the prompt: 0 when all went well, 1 otherwise")
	f.DurationVar(&a.timeout, "timeout", 120*time.Second, "how long to wait for the network to be up, healthy and serving the model")
	f.StringVar(&a.model, "model", "", "GGUF MoE model to serve (default: the generated tiny model)")
	f.StringVar(&a.prompt, "prompt", "Once upon a time", "the prompt to answer")
	f.IntVar(&a.maxTokens, "max-tokens", 32, "most tokens to generate")
	f.StringVar(&kill, "kill", "", "K@T: SIGKILL the K busiest expert nodes after token T")
	f.StringVar(&slow, "test-slow-node", "", "test only: NODE:DURATION delays every expert compute of that node")
	f.StringVar(&faulty, "faulty", "", "make expert nodes misbehave: K:MODE,... with MODE wrong, lowprec, slow, drop or flaky (the last nodes)")
	f.BoolVar(&a.netns, "netns", false, "run each node in its own network namespace on an emulated internet: public nodes, and homes behind NAT routers (needs root, iproute2, iptables)")
	f.IntVar(&na.homes, "homes", 2, "with --netns: homes, each behind its own NAT; the first runs the gating node, the others expert nodes")
	f.IntVar(&na.publics, "publics", 4, "with --netns: public nodes (node 0 is the bootstrap node and relay; libp2p trusts an address that four peers observed)")
	f.StringVar(&nat, "nat", "cone", "with --netns: NAT kind of the homes, cone or symmetric: one for all, or one per home (cone,symmetric,...)")
	f.StringVar(&rtt, "rtt", "", "with --netns: round-trip time between two homes, e.g. 50ms, or one per home (20ms,20ms,100ms: two homes are the mean of theirs apart); each home's outgoing packets wait half of its value on its line")
	f.StringVar(&jitter, "jitter", "", "with --rtt: spread each packet's wait by up to ± this (e.g. 2ms)")
	f.StringVar(&loss, "loss", "", "with --netns: drop this share of each home's outgoing packets (e.g. 1% or 0.01)")
	f.BoolVar(&na.spread, "spread", false, "with --netns: each expert on one expert home only (round robin), so a token's experts in a layer are often on different nodes")
	f.StringVar(&bandwidth, "bandwidth", "", "with --netns: cap each home's line, each way (e.g. 20mbit)")
	f.StringVar(&a.dashboard, "dashboard", "127.0.0.1:0", "host:port of node 0's dashboard, /metrics and OpenAI-compatible API")
	f.IntVar(&a.validators, "validators", 1, "how many nodes validate the ledger's chain (node 0 and the first expert nodes); more than one runs CometBFT consensus among them")
	f.IntVar(&a.requests, "requests", 1, "answer the prompt this many times (a workload for the checks)")
	_ = f.MarkHidden("test-slow-node")
	return cmd
}

type testnetArgs struct {
	nodes     int
	dir       string
	json      bool
	check     bool
	timeout   time.Duration
	model     string
	prompt    string
	maxTokens int
	killNodes int
	killAfter int
	slowNode  int
	slowBy    time.Duration
	requests  int
	escrow    uint64
	// dashboard is node 0's HTTP listener (--dashboard).
	dashboard string
	// netns runs the nodes in network namespaces (--netns).
	netns bool
	// validators is how many nodes (0 to validators-1) validate the chain.
	validators int
	// faults[i] is the mode of node i (1 to nodes).
	faults map[int]expert.Fault
}

// parseFaulty parses --faulty: K:MODE items, given to the last expert
// nodes (node N down). At least two expert nodes stay honest, so that a
// wrong result can be outvoted.
func parseFaulty(s string, nodes int) (map[int]expert.Fault, error) {
	out := map[int]expert.Fault{}
	next := nodes
	for _, item := range strings.Split(s, ",") {
		ks, ms, ok := strings.Cut(strings.TrimSpace(item), ":")
		k, err := strconv.Atoi(ks)
		if !ok || err != nil || k < 1 {
			return nil, fmt.Errorf("%q: want K:MODE, e.g. 2:wrong", item)
		}
		f, err := expert.ParseFault(ms)
		if err != nil {
			return nil, err
		}
		if f == expert.FaultNone {
			return nil, fmt.Errorf("%q: no mode", item)
		}
		for range k {
			out[next] = f
			next--
		}
	}
	if honest := nodes - len(out); honest < 2 {
		return nil, fmt.Errorf("%d faulty of %d expert nodes: at least 2 must stay honest", len(out), nodes)
	}
	return out, nil
}

// Seed and preset of the model testnet generates when given none.
const (
	testnetSeed   = 1
	testnetPreset = "tiny"
)

// testnetLogger is the testnet's own logger, on stderr at --log-level.
func testnetLogger(stderr io.Writer, g *globalFlags) (*slog.Logger, error) {
	level := slog.LevelInfo
	if g.logLevel != "" {
		if err := level.UnmarshalText([]byte(g.logLevel)); err != nil {
			return nil, fmt.Errorf("flag --log-level %q: want debug, info, warn or error", g.logLevel)
		}
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})), nil
}

func runTestnet(ctx context.Context, stdout, stderr io.Writer, g *globalFlags, a testnetArgs) (err error) {
	log, err := testnetLogger(stderr, g)
	if err != nil {
		return err
	}
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("testnet: find neurod binary: %w", err)
	}
	dir := a.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "neuro-testnet-"); err != nil {
			return fmt.Errorf("testnet: %w", err)
		}
		defer func() {
			if rerr := os.RemoveAll(dir); rerr != nil && err == nil {
				err = fmt.Errorf("testnet: remove %s: %w", dir, rerr)
			}
		}()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("flag --dir %s: %w", dir, err)
	}
	rep := testnetReport{Dir: dir, Nodes: []testnetNode{}, Tokens: []int32{}, PerTokenMs: []float64{}}
	fail := func(err error) error {
		rep.Error = err.Error()
		if a.json {
			writeJSON(stdout, rep)
		}
		return &exitError{code: 1, err: err}
	}

	mf, err := prepareModel(dir, a.model, log)
	if err != nil {
		return fail(err)
	}
	rep.Model, rep.ModelFile = mf.cid.String(), mf.path
	layers, experts := int(mf.manifest.GetParams().GetLayers()), int(mf.manifest.GetParams().GetExperts())

	threads := max(1, runtime.NumCPU()/(a.nodes+1))
	genesisPath := filepath.Join(dir, "genesis.json")
	cometPorts, cometPeers, err := testnetValidators(dir, a.validators)
	if err != nil {
		return fail(err)
	}
	log.Info("starting testnet", "expert_nodes", a.nodes, "model", mf.cid, "layers", layers, "experts", experts, "dir", dir)
	show := progress.New(stderr)
	up := show.Bar(int64(a.nodes+1), "nodes up", false)
	nw, err := testnet.Launch(ctx, testnet.LaunchOptions{Nodes: a.nodes + 1, Dir: dir, Binary: bin, Timeout: a.timeout, Log: log,
		Up: func(n int) { _ = up.Set(n) },
		Config: func(i int, c *node.Config) {
			c.Expert.Threads = threads
			c.Gating.Threads = max(1, runtime.NumCPU()/2)
			c.Ledger.Genesis = genesisPath
			if i < a.validators {
				c.Ledger.Listen = fmt.Sprintf("tcp://127.0.0.1:%d", cometPorts[i])
				c.Ledger.Peers = slices.Concat(cometPeers[:i], cometPeers[i+1:])
			}
			c.Ledger.BlockInterval = node.Duration(200 * time.Millisecond)
		},
		Args: func(i int) []string {
			if i == 0 {
				return []string{"--gating", "--model", mf.cid.String(), "--experts", "none", "--http", a.dashboard}
			}
			args := []string{"--model", mf.cid.String()}
			if f := a.faults[i]; f != expert.FaultNone {
				args = append(args, "--faulty", string(f))
			}
			if i == a.slowNode {
				args = append(args, "--test-slow-compute", a.slowBy.String())
			}
			return args
		},
		BeforeStart: seedTestnet(genesisPath, mf, a.validators),
	})
	_ = up.Finish()
	if err != nil {
		return fail(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			rep.Stopped = stopNetwork(nw, log)
		}
	}
	defer stop()
	fillNodes := func() { rep.Nodes = reportNodes(nw) }
	failNet := func(err error) error {
		fillNodes()
		for _, p := range nw.Processes() {
			fmt.Fprint(stderr, p.LogTail(10))
		}
		stop()
		return fail(err)
	}

	if err := nw.WaitHealthy(ctx); err != nil {
		if ctx.Err() != nil {
			return failNet(fmt.Errorf("testnet: interrupted while the network came up: %w", ctx.Err()))
		}
		return failNet(fmt.Errorf("testnet unhealthy: %w", err))
	}
	rep.Healthy = true
	rep.TookMs = nw.Took.Milliseconds()
	log.Info("network healthy", "took", nw.Took.Round(time.Millisecond))
	readyStart := time.Now()
	if err := waitServing(ctx, nw, a.timeout, layers, experts, min(2, a.nodes-len(a.faults)), a.faults, show, 0); err != nil {
		return failNet(err)
	}
	rep.ReadyMs = time.Since(readyStart).Milliseconds()
	fillNodes()
	gst := nw.Processes()[0].Status
	if gst.Gating != nil {
		rep.HTTP = gst.Gating.HTTP // the node's HTTP listener
	}
	log.Info("model served", "took", time.Since(readyStart).Round(time.Millisecond))
	if !a.json {
		printNodes(stdout, rep)
	}

	stakes := map[string]uint64{}
	balances := func() (map[string]uint64, *node.LedgerInfo, error) {
		out := map[string]uint64{}
		var last *node.LedgerInfo
		for _, p := range nw.Processes() {
			info, err := node.FetchLedger(ctx, nw.Processes()[0].APIAddr, p.Status.PeerID)
			if err != nil {
				return nil, nil, err
			}
			out[p.Status.PeerID], last = info.Balance, info
			stakes[p.Status.PeerID] = info.Staked
		}
		return out, last, nil
	}
	before, _, err := balances()
	if err != nil {
		return failNet(fmt.Errorf("ledger: %w", err))
	}
	// Node 1 plays the user's wallet: it opens an escrow for the model with
	// the gating node, which settles the experts' receipts against it.
	if a.escrow, err = openEscrow(ctx, nw, mf.cid, log); err != nil {
		return failNet(err)
	}
	if err := askNetwork(ctx, stdout, nw, mf.cid, a, &rep, log); err != nil {
		return failNet(err)
	}
	if err := waitSettled(ctx, nw); err != nil {
		return failNet(err)
	}
	// Verdicts of the run are re-checked by the expert nodes, which report
	// the confirmed ones for slashing: give those a few blocks.
	if len(a.faults) > 0 {
		if err := waitBlocks(ctx, nw, 10); err != nil {
			return failNet(err)
		}
	}
	after, info, err := balances()
	if err != nil {
		return failNet(fmt.Errorf("ledger: %w", err))
	}
	rep.Ledger = &testnetLedger{Height: info.Height, AppHash: info.AppHash, BalancesBefore: before, BalancesAfter: after,
		Treasury: info.Treasury, Burned: info.Burned, SupplyOK: info.SupplyOK, StakesAfter: stakes}
	for _, p := range nw.Processes()[:a.validators] {
		rep.Ledger.Validators = append(rep.Ledger.Validators, p.Status.PeerID)
	}
	if err := nw.Refresh(ctx); err != nil {
		log.Warn("status after the workload", "err", err)
	}
	fillNodes()
	fillTrust(&rep, nw, a.faults)
	if !a.json && (len(a.faults) > 0 || a.requests > 1) {
		printTrust(stdout, rep)
	}
	if !a.json && rep.Ledger != nil {
		printLedger(stdout, rep)
	}
	if a.check {
		stop()
		for _, e := range rep.Stopped {
			if !e.Clean && !e.Crashed {
				err := fmt.Errorf("node %d did not stop cleanly: %s", e.Index, e.Error)
				return fail(err)
			}
		}
		if a.json {
			writeJSON(stdout, rep)
		}
		return nil
	}
	if a.json {
		writeJSON(stdout, rep)
	}
	boot := nw.Processes()[0].Status
	fmt.Fprintf(stderr, "\ntestnet is up; press Ctrl-C to stop it. Ask it yourself:\n")
	if len(boot.Addrs) > 0 {
		fmt.Fprintf(stderr, "  %s generate --network --bootstrap %s/p2p/%s --model %s --prompt 'Hello'\n", bin, boot.Addrs[0], boot.PeerID, mf.cid)
	}
	if rep.HTTP != "" {
		fmt.Fprintf(stderr, "  open http://%s/ (the dashboard; metrics on /metrics)\n", rep.HTTP)
		fmt.Fprintf(stderr, "  curl -s http://%s/v1/completions -d '{\"model\": \"%s\", \"prompt\": \"Hello\", \"max_tokens\": 16}'\n", rep.HTTP, mf.cid)
	}
	<-ctx.Done()
	return nil
}

// reportNodes is the report's view of each node, from its last status.
func reportNodes(nw *testnet.Network) []testnetNode {
	out := []testnetNode{}
	for _, p := range nw.Processes() {
		st := p.Status
		out = append(out, testnetNode{
			Index: p.Index, PeerID: st.PeerID, Addrs: st.Addrs, Roles: st.Roles, PID: p.PID(),
			Home: p.Home, API: p.APIAddr, RSSBytes: st.RSSBytes,
			RoutingTableSize: len(st.RoutingTable), HeardPeers: len(st.Heard),
			Experts: append([]string{}, st.Experts...), ExpertCalls: st.ExpertCalls, Verdicts: st.Verdicts,
		})
	}
	return out
}

// stopNetwork stops every node and logs how each ended.
func stopNetwork(nw *testnet.Network, log *slog.Logger) []testnetExit {
	var out []testnetExit
	clean := 0
	for _, r := range nw.Stop() {
		e := testnetExit{Index: r.Index, PID: r.PID, Clean: r.Clean, Killed: r.Killed, Crashed: r.Crashed}
		if r.Err != nil {
			e.Error = r.Err.Error()
		}
		if r.Clean {
			clean++
		} else if !r.Crashed {
			log.Warn("node did not stop cleanly", "node", r.Index, "pid", r.PID, "killed", r.Killed, "err", r.Err)
		}
		out = append(out, e)
	}
	log.Info("testnet stopped", "nodes", len(out), "clean", clean)
	return out
}

func printNodes(w io.Writer, rep testnetReport) {
	state := "healthy"
	if !rep.Healthy {
		state = "NOT healthy: " + rep.Error
	}
	fmt.Fprintf(w, "neuro testnet: %d nodes, %s (%.1fs), serving model %s (%.1fs more), homes in %s\n\n", len(rep.Nodes), state,
		float64(rep.TookMs)/1000, rep.Model, float64(rep.ReadyMs)/1000, rep.Dir)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tPEER ID\tROLES\tPID\tEXPERTS\tADDRESSES")
	for _, n := range rep.Nodes {
		roles := strings.Join(n.Roles, ",")
		if roles == "" {
			roles = "peer"
		}
		first := ""
		if len(n.Addrs) > 0 {
			first = n.Addrs[0]
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%s\n", n.Index, n.PeerID, roles, n.PID, len(n.Experts), first)
		for _, a := range n.Addrs[min(1, len(n.Addrs)):] {
			fmt.Fprintf(tw, "\t\t\t\t\t%s\n", a)
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
}

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil && !errors.Is(err, os.ErrClosed) {
		fmt.Fprintln(os.Stderr, "neurod: write json:", err)
	}
}

// printLedger prints who paid and who earned NEURO for the run.
func printLedger(w io.Writer, rep testnetReport) {
	l := rep.Ledger
	fmt.Fprintf(w, "\nledger at height %d (%s): treasury %s NEURO, burned %s\n", l.Height,
		map[bool]string{true: "supply invariant holds", false: "SUPPLY INVARIANT BROKEN"}[l.SupplyOK], neuro(l.Treasury), neuro(l.Burned))
	for _, n := range rep.Nodes {
		before, after := l.BalancesBefore[n.PeerID], l.BalancesAfter[n.PeerID]
		change := "+" + neuro(after-min(after, before))
		if after < before {
			change = "-" + neuro(before-after)
		}
		if after == before {
			change = "0"
		}
		fmt.Fprintf(w, "  node %d %s: %s NEURO (%s), stake %s\n", n.Index, strings.Join(n.Roles, ","), neuro(after), change, neuro(l.StakesAfter[n.PeerID]))
	}
}
