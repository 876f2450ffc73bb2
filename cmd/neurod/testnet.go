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
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/testnet"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// testnetFlags are the flags of `neurod testnet` as typed; scenario turns
// them into a testnet.Scenario.
type testnetFlags struct {
	nodes, maxTokens, validators, requests, homes, publics int
	concurrency                                            int
	dir, model, prompt, dashboard                          string
	kill, slow, faulty, device, shared, speculate, draft   string
	spans, spanExperts                                     string
	nat, rtt, jitter, loss, bandwidth                      string
	json, check, netns, spread, requireEscrow, pin         bool
	timeout, batchWait                                     time.Duration
}

func newTestnetCmd(g *globalFlags) *cobra.Command {
	var f testnetFlags
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
  neurod testnet --nodes 2 --model m.gguf --prompt "repeat: a b c a b" --speculate ngram --check --json
  neurod testnet --nodes 2 --model m.gguf --draft m-q4_0.gguf --check --json
  sudo neurod testnet --netns --homes 3 --nat cone,symmetric,cone --rtt 50ms --check --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := f.scenario(cmd.Flags())
			if err != nil {
				return err
			}
			if s.Log, err = testnetLogger(cmd.ErrOrStderr(), g); err != nil {
				return err
			}
			return runScenario(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), s, f.json)
		},
	}
	f.register(cmd.Flags())
	cmd.AddCommand(newSimCmd(g))
	return cmd
}

func (f *testnetFlags) register(fs *pflag.FlagSet) {
	fs.IntVar(&f.nodes, "nodes", 4, "number of expert nodes (plus the gating node, node 0)")
	fs.StringVar(&f.dir, "dir", "", "directory for the node homes and logs (kept afterwards; default: a temporary one, removed)")
	fs.BoolVar(&f.json, "json", false, "print a machine-readable report on stdout")
	fs.BoolVar(&f.check, "check", false, "exit after answering the prompt: 0 when all went well, 1 otherwise")
	fs.DurationVar(&f.timeout, "timeout", 120*time.Second, "how long to wait for the network to be up, healthy and serving the model")
	fs.StringVar(&f.model, "model", "", "GGUF MoE model to serve (default: the generated tiny model)")
	fs.StringVar(&f.shared, "shared-experts", "gating", "where a model's shared experts (GLM, DeepSeek) run: gating (in the gating node's compute) or remote (hosted and called like routed experts)")
	fs.StringVar(&f.prompt, "prompt", "Once upon a time", "the prompt to answer")
	fs.IntVar(&f.maxTokens, "max-tokens", 32, "most tokens to generate")
	fs.StringVar(&f.speculate, "speculate", "off", "the gating node's speculative decoding: off, ngram (prompt lookup: drafts checked several tokens per forward pass, one expert round trip per MoE layer for all) or draft (--draft's); the tokens stay the same")
	fs.StringVar(&f.draft, "draft", "", "speculative decoding with this draft model (a GGUF file of the model's vocabulary, e.g. a smaller quantization of it), run whole on the gating node; implies --speculate draft")
	fs.StringVar(&f.kill, "kill", "", "K@T: SIGKILL the K busiest expert nodes after token T")
	fs.BoolVar(&f.requireEscrow, "require-escrow", false, "expert nodes refuse calls not paid from an escrow (expert.require_escrow): the prompt's own, or one a span node was delegated")
	fs.StringVar(&f.spanExperts, "span-experts", "host", `with --spans: "host" (each span hosts every expert of its layers) or "call" (each node hosts the experts it would anyway, and its span calls the others on the other nodes)`)
	fs.StringVar(&f.spans, "spans", "", `every expert node serves a span of layers ("auto", or e.g. "0-11"; or one per expert node, each hosting its span only: "0-11,12-23"), and the gating node sends each forward pass through the chain of fewest spans`)
	fs.StringVar(&f.slow, "test-slow-node", "", "test only: NODE:DURATION delays every expert compute of that node")
	fs.StringVar(&f.faulty, "faulty", "", "make expert nodes misbehave: K:MODE,... with MODE wrong, lowprec, slow, drop or flaky (the last nodes)")
	fs.BoolVar(&f.netns, "netns", false, "run each node in its own network namespace on an emulated internet: public nodes, and homes behind NAT routers (needs root, iproute2, iptables)")
	fs.IntVar(&f.homes, "homes", 2, "with --netns: homes, each behind its own NAT; the first runs the gating node, the others expert nodes")
	fs.IntVar(&f.publics, "publics", 4, "with --netns: public nodes (node 0 is the bootstrap node and relay; libp2p trusts an address that four peers observed)")
	fs.StringVar(&f.nat, "nat", "cone", "with --netns: NAT kind of the homes, cone or symmetric: one for all, or one per home (cone,symmetric,...)")
	fs.StringVar(&f.rtt, "rtt", "", "with --netns: round-trip time between two homes, e.g. 50ms, or one per home (20ms,20ms,100ms: two homes are the mean of theirs apart); each home's outgoing packets wait half of its value on its line")
	fs.StringVar(&f.jitter, "jitter", "", "with --rtt: spread each packet's wait by up to ± this (e.g. 2ms)")
	fs.StringVar(&f.loss, "loss", "", "with --netns: drop this share of each home's outgoing packets (e.g. 1% or 0.01)")
	fs.BoolVar(&f.spread, "spread", false, "with --netns: each expert on one expert home only (round robin), so a token's experts in a layer are often on different nodes")
	fs.StringVar(&f.bandwidth, "bandwidth", "", "with --netns: cap each home's line, each way (e.g. 20mbit)")
	fs.StringVar(&f.dashboard, "dashboard", "127.0.0.1:0", "host:port of node 0's dashboard, /metrics and OpenAI-compatible API")
	fs.IntVar(&f.validators, "validators", 1, "how many nodes validate the ledger's chain (node 0 and the first expert nodes); more than one runs CometBFT consensus among them")
	fs.IntVar(&f.requests, "requests", 1, "answer the prompt this many times (a workload for the checks)")
	fs.IntVar(&f.concurrency, "concurrency", 1, "then ask the prompt this many times at once (loopback: each through a client of its own, paid by a wallet of its own; netns: unpaid, through one client in the gating node's home): results[] and aggregate_tokens_per_s")
	fs.StringVar(&f.device, "device", "cpu", deviceUsage+" (every node; loopback testnet only)")
	fs.DurationVar(&f.batchWait, "batch-wait", 10*time.Millisecond, "the gating node's continuous batching: how long a generation's MoE call waits for the other generations' to go out as one round of expert calls, and its decode step for theirs to compute each gating layer in one graph (gating.batch_wait); 0 sends and computes each alone")
	fs.BoolVar(&f.pin, "pin", false, "loopback: run node i on core i (modulo the cores, with taskset) with one compute thread each, as neurod bench's pinned testnet row does")
	_ = fs.MarkHidden("test-slow-node")
}

// scenario checks the flags and builds the scenario they ask for.
func (f *testnetFlags) scenario(fs *pflag.FlagSet) (*testnet.Scenario, error) {
	if f.nodes < 1 {
		return nil, fmt.Errorf("flag --nodes %d: need at least 1 expert node", f.nodes)
	}
	if f.timeout <= 0 {
		return nil, fmt.Errorf("flag --timeout %v: must be positive", f.timeout)
	}
	if f.prompt == "" {
		return nil, errors.New("flag --prompt: must not be empty")
	}
	if f.maxTokens < 1 {
		return nil, fmt.Errorf("flag --max-tokens %d: must be at least 1", f.maxTokens)
	}
	if f.model != "" {
		if _, err := os.Stat(f.model); err != nil {
			return nil, fmt.Errorf("flag --model: %w", err)
		}
	}
	bin, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("testnet: find neurod binary: %w", err)
	}
	remote, err := sharedRemote(f.shared)
	if err != nil {
		return nil, err
	}
	if f.draft != "" {
		if fs.Changed("speculate") && f.speculate != "draft" {
			return nil, fmt.Errorf("flag --draft: speculative decoding with a draft model, but --speculate %s", f.speculate)
		}
		abs, err := filepath.Abs(f.draft)
		if err != nil {
			return nil, fmt.Errorf("flag --draft: %w", err)
		}
		if _, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("flag --draft: %w", err)
		}
		f.speculate, f.draft = "draft", abs
	}
	switch f.speculate {
	case "off", "ngram":
	case "draft":
		if f.draft == "" {
			return nil, errors.New("flag --speculate draft: needs --draft FILE.gguf")
		}
	default:
		return nil, fmt.Errorf("flag --speculate %q: want off, ngram or draft", f.speculate)
	}
	s := &testnet.Scenario{Dir: f.dir, Binary: bin, Model: f.model, SharedRemote: remote, Speculate: f.speculate, Draft: f.draft, Prompt: f.prompt, MaxTokens: f.maxTokens,
		Requests: f.requests, Concurrency: f.concurrency, Timeout: f.timeout, Check: f.check}
	if s.BatchWait, err = batchWaitFlag(fs, f.batchWait); err != nil {
		return nil, err
	}
	if f.netns {
		s.Topology, err = f.netnsTopology(fs)
	} else {
		s.Topology, err = f.loopback(fs)
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}

// loopback checks the loopback testnet's flags.
func (f *testnetFlags) loopback(fs *pflag.FlagSet) (*testnet.Loopback, error) {
	for _, name := range []string{"homes", "publics", "nat", "rtt", "jitter", "loss", "bandwidth", "spread"} {
		if fs.Changed(name) {
			return nil, fmt.Errorf("flag --%s: only with --netns (the loopback testnet has no homes, NAT or lines)", name)
		}
	}
	// The device is resolved here, so that a missing one is one error
	// before any node starts (and auto means one device for all).
	dev, err := ggml.SelectDevice(f.device)
	if err != nil {
		return nil, fmt.Errorf("flag --device: %w", err)
	}
	l := &testnet.Loopback{ExpertNodes: f.nodes, Validators: f.validators, Dashboard: f.dashboard, Device: dev.Spec(), Spans: f.spans, SpanExperts: f.spanExperts, RequireEscrow: f.requireEscrow, Pin: f.pin}
	if err := testnet.CheckSpans(f.spans, f.nodes); err != nil {
		return nil, fmt.Errorf("flag --spans: %w", err)
	}
	if err := f.checkSpanExperts(); err != nil {
		return nil, err
	}
	if l.KillNodes, l.KillAfter, err = f.parseKill(f.nodes); err != nil {
		return nil, err
	}
	if f.slow != "" {
		n, d, ok := strings.Cut(f.slow, ":")
		var err1, err2 error
		l.SlowNode, err1 = strconv.Atoi(n)
		l.SlowBy, err2 = time.ParseDuration(d)
		if !ok || err1 != nil || err2 != nil || l.SlowNode < 1 || l.SlowNode > f.nodes || l.SlowBy <= 0 {
			return nil, fmt.Errorf("flag --test-slow-node %q: want NODE:DURATION, NODE an expert node (1 to %d)", f.slow, f.nodes)
		}
	}
	if _, _, err := net.SplitHostPort(f.dashboard); err != nil {
		return nil, fmt.Errorf("flag --dashboard %q: want host:port: %w", f.dashboard, err)
	}
	if f.requests < 1 {
		return nil, fmt.Errorf("flag --requests %d: must be at least 1", f.requests)
	}
	if f.concurrency < 1 || f.concurrency > 256 {
		return nil, fmt.Errorf("flag --concurrency %d: want 1 to 256", f.concurrency)
	}
	if f.validators < 1 || f.validators > f.nodes+1 {
		return nil, fmt.Errorf("flag --validators %d: want 1 to %d (node 0 and the expert nodes)", f.validators, f.nodes+1)
	}
	if left := f.validators - min(l.KillNodes, f.validators-1); f.validators > 1 && 3*left <= 2*f.validators {
		return nil, fmt.Errorf("flag --kill %q: killing %d of %d validators would leave no 2/3 majority: the chain would halt", f.kill, l.KillNodes, f.validators)
	}
	if f.faulty != "" {
		var err error
		if l.Faults, err = parseFaulty(f.faulty, f.nodes); err != nil {
			return nil, fmt.Errorf("flag --faulty %q: %w", f.faulty, err)
		}
	}
	return l, nil
}

// parseKill reads --kill K@T, for a testnet of this many expert nodes.
func (f *testnetFlags) parseKill(experts int) (nodes, after int, err error) {
	if f.kill == "" {
		return 0, 0, nil
	}
	k, t, ok := strings.Cut(f.kill, "@")
	var err1, err2 error
	nodes, err1 = strconv.Atoi(k)
	after, err2 = strconv.Atoi(t)
	if !ok || err1 != nil || err2 != nil || nodes < 1 || after < 1 {
		return 0, 0, fmt.Errorf("flag --kill %q: want K@T, e.g. 1@8: kill K expert nodes after token T", f.kill)
	}
	if nodes >= experts {
		return 0, 0, fmt.Errorf("flag --kill %q: %d of %d expert nodes would leave none", f.kill, nodes, experts)
	}
	if after >= f.maxTokens {
		return 0, 0, fmt.Errorf("flag --kill %q: token %d is not before the last (--max-tokens %d)", f.kill, after, f.maxTokens)
	}
	return nodes, after, nil
}

// netnsTopology checks the netns testnet's flags.
func (f *testnetFlags) netnsTopology(fs *pflag.FlagSet) (*testnet.Netns, error) {
	if fs.Changed("device") {
		return nil, errors.New("flag --device: only with the loopback testnet (the netns testnet's nodes compute on the CPU)")
	}
	if f.pin {
		return nil, errors.New("flag --pin: only with the loopback testnet")
	}
	if err := testnet.CheckSpans(f.spans, f.homes-1); err != nil {
		return nil, fmt.Errorf("flag --spans: %w", err)
	}
	if err := f.checkSpanExperts(); err != nil {
		return nil, err
	}
	if f.spans != "" && f.spread {
		return nil, errors.New("flag --spans: not with --spread (a span hosts every expert of its layers)")
	}
	if fs.Changed("nodes") || f.faulty != "" || f.slow != "" || f.validators != 1 || f.requests != 1 || fs.Changed("dashboard") {
		return nil, errors.New("flag --netns: the netns testnet has --homes, --publics and --nat instead of --nodes, and does not yet take --faulty, --validators, --requests or --dashboard")
	}
	if f.kill != "" && f.concurrency > 1 {
		return nil, errors.New("flag --kill: not with --concurrency in the netns testnet (it follows one generation)")
	}
	if f.requireEscrow {
		return nil, errors.New("flag --require-escrow: the loopback testnet's only, for now")
	}
	t := &testnet.Netns{Publics: f.publics, Spread: f.spread, Spans: f.spans, SpanExperts: f.spanExperts}
	var err error
	if t.KillNodes, t.KillAfter, err = f.parseKill(f.homes - 1); err != nil {
		return nil, err
	}
	if t.Links, err = parseLinks(f.rtt, f.jitter, f.loss, f.bandwidth, f.homes); err != nil {
		return nil, err
	}
	if f.homes < 2 {
		return nil, fmt.Errorf("flag --homes %d: need at least 2 (a gating node and an expert node, each behind its NAT)", f.homes)
	}
	if f.publics < 1 {
		return nil, fmt.Errorf("flag --publics %d: need at least 1", f.publics)
	}
	if t.NATs, err = parseNATs(f.nat, f.homes); err != nil {
		return nil, fmt.Errorf("flag --nat %q: %w", f.nat, err)
	}
	return t, nil
}

// runScenario runs a testnet scenario, printing it as it goes (or its
// JSON report at the end), and keeps the network up until ctx ends unless
// the scenario checks.
func runScenario(ctx context.Context, stdout, stderr io.Writer, s *testnet.Scenario, asJSON bool) error {
	_, isNetns := s.Topology.(*testnet.Netns)
	s.Progress, s.LogTails = progress.New(stderr), stderr
	if !asJSON && !isNetns {
		s.Events = printEvents(stdout)
	}
	rep, running, err := s.Run(ctx)
	if err != nil {
		if asJSON {
			writeJSON(stdout, rep)
		}
		return &exitError{code: 1, err: err}
	}
	printResult(stdout, rep, s, isNetns, asJSON)
	if running == nil {
		if isNetns && len(rep.Tokens) == 0 {
			return &exitError{code: 1, err: errors.New("no tokens")}
		}
		return nil
	}
	defer running.Stop()
	how := ""
	if isNetns {
		how = " (the namespaces go with it)"
	}
	fmt.Fprintf(stderr, "\ntestnet is up; press Ctrl-C to stop it%s. Ask it yourself:\n", how)
	for _, h := range running.Hint() {
		fmt.Fprintf(stderr, "  %s\n", h)
	}
	<-ctx.Done()
	return nil
}

// printEvents shows the loopback testnet as it runs: the nodes, then the
// generation token by token and its summary.
func printEvents(w io.Writer) testnet.Events {
	return testnet.Events{
		Serving: func(rep *testnet.Report) { printNodes(w, *rep) },
		Prompt:  func(p string) { fmt.Fprintf(w, "prompt: %s\n\n%s", p, p) },
		Token:   func(text string) { fmt.Fprint(w, text) },
		Answered: func(rep *testnet.Report, d *client.Done, took time.Duration) {
			ts := rep.Stats
			fmt.Fprintf(w, "%s\n\n%d tokens in %.2fs (%.1f tokens/s) from gating node %s; prompt %d tokens in %.1f ms\n",
				d.Rest, len(rep.Tokens), took.Seconds(), rep.TokensPerSecond, d.Gating, d.PromptTokens, ts.PrefillMs)
			fmt.Fprintf(w, "per-token latency: p50 %.2f ms, p99 %.2f ms; %d expert calls, %.0f bytes/token, dispatch overhead %.0f µs/layer (decode: %.0f, p50 %d, p90 %d), %d hedged, %d re-sent\n",
				ts.PerTokenP50Ms, ts.PerTokenP99Ms, ts.ExpertCalls, ts.BytesPerToken, ts.DispatchPerLay, ts.DispatchDecodeUs, ts.DispatchP50Us, ts.DispatchP90Us, ts.Hedges, ts.Redispatches)
			fmt.Fprintf(w, "latency of each token (ms): %v\n", rep.PerTokenMs)
			if len(rep.Killed) > 0 {
				fmt.Fprintf(w, "expert nodes %v were SIGKILLed after token %d\n", rep.Killed, rep.KilledAfter)
			}
		},
	}
}

// printResult prints what the run found once it is done.
func printResult(w io.Writer, rep *testnet.Report, s *testnet.Scenario, isNetns, asJSON bool) {
	switch {
	case asJSON:
		writeJSON(w, rep)
	case isNetns:
		printNodes(w, *rep)
		fmt.Fprintf(w, "\n%s\n", rep.Text)
		for _, c := range rep.Connections {
			how := "direct (hole punched)"
			if c.ViaRelay {
				how = "through the relay"
			}
			fmt.Fprintf(w, "gating (%s NAT) -> %s (%s NAT): %s over %s, %d calls\n", c.NATs[0], c.B, c.NATs[1], how, c.Transport, c.Calls)
		}
	default:
		if l, ok := s.Topology.(*testnet.Loopback); ok && (len(l.Faults) > 0 || s.Requests > 1) {
			printTrust(w, *rep)
		}
		if len(rep.Results) > 0 {
			printConcurrent(w, *rep)
		}
		if rep.Ledger != nil {
			printLedger(w, *rep)
		}
	}
}

// printConcurrent prints the round of concurrent requests.
func printConcurrent(w io.Writer, rep testnet.Report) {
	queued := 0
	var firsts []float64
	for _, r := range rep.Results {
		if r.Queued > 0 {
			queued++
		}
		if len(r.PerTokenMs) > 0 {
			firsts = append(firsts, r.PerTokenMs[0])
		}
	}
	slices.Sort(firsts)
	fmt.Fprintf(w, "\n%d requests at once: %.1f tokens/s in all (one alone: %.1f); %d waited in the gating node's queue; first token after %.0f ms (median) to %.0f ms; %.0f%% of their MoE layers went out in a round with other requests' tokens\n",
		len(rep.Results), rep.AggregateTokensPerS, rep.TokensPerSecond, queued, firsts[len(firsts)/2], firsts[len(firsts)-1], 100*rep.SharedLayerShare)
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

// parseLinks reads --rtt (one for every home, or one per home), --jitter,
// --loss and --bandwidth into one link per home, or nil when none is set.
func parseLinks(rtt, jitter, loss, bandwidth string, homes int) ([]netns.Link, error) {
	if rtt == "" && jitter == "" && loss == "" && bandwidth == "" {
		return nil, nil
	}
	var l netns.Link
	var err error
	rtts := []time.Duration{0}
	if rtt != "" {
		parts := strings.Split(rtt, ",")
		if len(parts) != 1 && len(parts) != homes {
			return nil, fmt.Errorf("flag --rtt %q: %d values for %d homes: give one for all or one per home", rtt, len(parts), homes)
		}
		rtts = rtts[:0]
		for _, p := range parts {
			d, err := time.ParseDuration(strings.TrimSpace(p))
			if err != nil || d < 0 {
				return nil, fmt.Errorf("flag --rtt %q: want durations such as 50ms, or 20ms,50ms,... one per home", rtt)
			}
			rtts = append(rtts, d)
		}
	}
	if jitter != "" {
		if l.Jitter, err = time.ParseDuration(jitter); err != nil || l.Jitter < 0 {
			return nil, fmt.Errorf("flag --jitter %q: want a duration such as 2ms", jitter)
		}
	}
	if loss != "" {
		v, pct := strings.CutSuffix(strings.TrimSpace(loss), "%")
		if l.Loss, err = strconv.ParseFloat(v, 64); err != nil {
			return nil, fmt.Errorf("flag --loss %q: want a share such as 1%% or 0.01", loss)
		}
		if pct {
			l.Loss /= 100
		}
	}
	if bandwidth != "" {
		if l.Bandwidth, err = netns.ParseBandwidth(bandwidth); err != nil {
			return nil, fmt.Errorf("flag --bandwidth: %w", err)
		}
	}
	out := make([]netns.Link, homes)
	for i := range out {
		out[i] = l
		out[i].RTT = rtts[min(i, len(rtts)-1)]
		if err := out[i].Validate(); err != nil {
			return nil, fmt.Errorf("flags --rtt, --jitter, --loss, --bandwidth (home %d): %w", i, err)
		}
	}
	return out, nil
}

// parseNATs expands --nat: one kind for every home, or one per home.
func parseNATs(s string, homes int) ([]netns.NAT, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 1 && len(parts) != homes {
		return nil, fmt.Errorf("%d kinds for %d homes: give one kind for all or one per home", len(parts), homes)
	}
	out := make([]netns.NAT, homes)
	for i := range out {
		k, err := netns.ParseNAT(strings.TrimSpace(parts[min(i, len(parts)-1)]))
		if err != nil {
			return nil, err
		}
		out[i] = k
	}
	return out, nil
}

func printNodes(w io.Writer, rep testnet.Report) {
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
func printLedger(w io.Writer, rep testnet.Report) {
	l := rep.Ledger
	fmt.Fprintf(w, "\nledger at height %d (%s): treasury %s NEURO, burned %s\n", l.Height,
		map[bool]string{true: "supply invariant holds", false: "SUPPLY INVARIANT BROKEN"}[l.SupplyOK], neuro(l.Treasury), neuro(l.Burned))
	change := func(p string) string {
		before, after := l.BalancesBefore[p], l.BalancesAfter[p]
		switch {
		case after < before:
			return "-" + neuro(before-after)
		case after == before:
			return "0"
		}
		return "+" + neuro(after-before)
	}
	for _, n := range rep.Nodes {
		fmt.Fprintf(w, "  node %d %s: %s NEURO (%s), stake %s\n", n.Index, strings.Join(n.Roles, ","), neuro(l.BalancesAfter[n.PeerID]),
			change(n.PeerID), neuro(l.StakesAfter[n.PeerID]))
	}
	if l.User != "" {
		fmt.Fprintf(w, "  user wallet %s (paid for the prompt): %s NEURO (%s)\n", l.User, neuro(l.BalancesAfter[l.User]), change(l.User))
	}
}

// printTrust prints each expert node's record after the workload.
func printTrust(w io.Writer, rep testnet.Report) {
	fmt.Fprintf(w, "\nafter %d requests, the gating node's record of each expert node:\n", rep.Requests)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tPEER ID\tFAULTY\tSCORE\tCHECKED\tFAILED\tEXCLUDED")
	for _, n := range rep.Nodes[1:] {
		f := n.Faulty
		if f == "" {
			f = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%.2f\t%d\t%d\t%v\n", n.Index, n.PeerID, f, n.Score, n.Checked, n.Failed, n.Excluded)
	}
	tw.Flush()
	if v := rep.Validation; v != nil && v.Calls > 0 {
		fmt.Fprintf(w, "%d expert answers used, %d extra calls to check them (%.1f%%), %d results found wrong, %d rewinds\n",
			v.Calls, v.Checks, 100*float64(v.Checks)/float64(v.Calls), v.Wrong, rep.Rewinds)
	}
}

// batchWaitFlag is the scenario's BatchWait for --batch-wait: 0 (the
// node's default) unless the flag was given; given as 0, off.
func batchWaitFlag(fs *pflag.FlagSet, d time.Duration) (time.Duration, error) {
	switch {
	case !fs.Changed("batch-wait"):
		return 0, nil
	case d < 0 || d > time.Second:
		return 0, fmt.Errorf("flag --batch-wait %v: want 0 (off) to 1s", d)
	case d == 0:
		return -1, nil
	}
	return d, nil
}

// checkSpanExperts checks --span-experts.
func (f *testnetFlags) checkSpanExperts() error {
	switch {
	case f.spanExperts != "host" && f.spanExperts != "call":
		return fmt.Errorf("flag --span-experts: %q: want host or call", f.spanExperts)
	case f.spanExperts == "call" && f.spans == "":
		return errors.New("flag --span-experts: call needs --spans")
	}
	return nil
}
