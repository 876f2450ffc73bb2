package testnet

import (
	"context"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
)

// Loopback is the testnet of real processes on 127.0.0.1: node 0 is the
// bootstrap, relay and gating node, nodes 1 to ExpertNodes are expert
// nodes. The first Validators nodes validate the ledger's chain; node 1
// pays for the prompt from an escrow that the gating node settles.
type Loopback struct {
	ExpertNodes int
	// Validators is how many nodes (0 to Validators-1) validate the
	// chain (default 1).
	Validators int
	// Faults[i] makes expert node i misbehave.
	Faults map[int]expert.Fault
	// SlowNode, if not 0, delays every expert compute of that node by
	// SlowBy.
	SlowNode int
	SlowBy   time.Duration
	// KillNodes expert nodes are SIGKILLed after token KillAfter.
	KillNodes, KillAfter int
	// Dashboard is node 0's HTTP listener (host:port).
	Dashboard string
	// Device is where every node computes (home.device: cpu, vulkan:N,
	// cuda:N); "" is the CPU.
	Device string
	// Pin runs node i on core i (modulo the cores, taskset) with one
	// compute thread, so that the processes do not compete for cores; the
	// nodes poll while they wait as on machines of their own
	// (gating.poll_nearby, expert.poll_nearby).
	Pin bool
	// Spans is every expert node's expert.spans ("auto" or "A-B"; ""
	// none), or one per expert node, comma-separated (spanOf): the gating
	// node then sends each forward pass through the chain of fewest spans.
	Spans string
	// SpanExperts is every span node's expert.span_experts ("" or "host":
	// a span hosts every expert of its layers; "call": those it hosts
	// anyway, the others called on other expert nodes).
	SpanExperts string
	// RequireEscrow makes the expert nodes refuse calls that do not pay
	// from an escrow of their caller's, or one delegated to it
	// (expert.require_escrow; off in a testnet, which also serves unpaid
	// requests).
	RequireEscrow bool

	cometPorts []int
	cometPeers []string
	userIDs    []peer.ID
}

var _ Topology = (*Loopback)(nil)

func (l *Loopback) paid() bool { return true }

// Gating implements Topology: node 0.
func (l *Loopback) Gating() int { return 0 }

// Setup implements Topology: the validators' homes and CometBFT ports.
func (l *Loopback) Setup(_ context.Context, r *Run) error {
	if l.Validators < 1 {
		l.Validators = 1
	}
	var err error
	// The user's wallet, and one for each concurrent request.
	wallets := 1
	if r.S.Concurrency > 1 {
		wallets += r.S.Concurrency
	}
	for i := range wallets {
		k, id, err := userWallet(r.Dir, i)
		if err != nil {
			return err
		}
		r.users, l.userIDs = append(r.users, k), append(l.userIDs, id)
	}
	r.user = r.users[0]
	l.cometPorts, l.cometPeers, err = validatorPorts(r.Dir, l.Validators)
	return err
}

// Launch implements Topology.
func (l *Loopback) Launch(r *Run, o *LaunchOptions) error {
	m := r.Model
	gatingThreads, threads, lanes := shareCores(runtime.NumCPU(), l.ExpertNodes)
	genesis := r.genesisPath()
	r.log.Info("starting testnet", "expert_nodes", l.ExpertNodes, "model", m.CID, "layers", m.Layers(), "experts", m.Experts(), "dir", r.Dir)
	o.Nodes = l.ExpertNodes + 1
	if l.Pin {
		threads, lanes = 1, 1
		o.Wrap = func(i int) []string { return []string{"taskset", "-c", strconv.Itoa(i % runtime.NumCPU())} }
	}
	o.Config = func(i int, c *node.Config) {
		c.Expert.Threads, c.Expert.Lanes = threads, lanes
		if !l.Pin && i != l.Gating() {
			// The expert nodes' lanes take the cores the gating node
			// shares (pinned nodes have one core, so one thread already).
			c.Expert.GoProcs = 1
		}
		c.Expert.RequireEscrow = l.RequireEscrow
		c.Gating.Threads = gatingThreads
		if l.Pin {
			// Each node has a core of its own, as on machines of their
			// own: they poll while they wait as such nodes do.
			c.Gating.Threads = 1
			c.Gating.PollNearby, c.Expert.PollNearby = true, true
		}
		c.Ledger.Genesis = genesis
		if i < l.Validators {
			c.Ledger.Listen = fmt.Sprintf("tcp://127.0.0.1:%d", l.cometPorts[i])
			c.Ledger.Peers = slices.Concat(l.cometPeers[:i], l.cometPeers[i+1:])
		}
		c.Ledger.BlockInterval = node.Duration(200 * time.Millisecond)
		c.Home.Device = l.Device
	}
	o.Args = func(i int) []string {
		if i == 0 {
			return []string{"--gating", "--model", m.CID.String(), "--experts", "none", "--http", l.Dashboard}
		}
		args := []string{"--model", m.CID.String()}
		if l.Spans != "" {
			args = append(args, spanArgs(l.Spans, i-1, l.SpanExperts)...)
		}
		if f := l.Faults[i]; f != expert.FaultNone {
			args = append(args, "--faulty", string(f))
		}
		if i == l.SlowNode {
			args = append(args, "--test-slow-compute", l.SlowBy.String())
		}
		return args
	}
	o.BeforeStart = seedTestnet(genesis, m, l.Validators, l.Gating(), l.userIDs...)
	return nil
}

// spanOf is expert node j's span of a testnet's spans: the one span all
// serve ("auto", "A-B"), or the j-th of a comma-separated list.
func spanOf(spans string, j int) string {
	if !strings.Contains(spans, ",") {
		return spans
	}
	return strings.Split(spans, ",")[j]
}

// spanArgs are expert node j's flags for a testnet's spans: one span for
// all leaves the node to host more experts as it would anyway; with one
// span each, a node hosts its span only (--experts none), as a network
// laid out span by span would. With spanExperts "call" the spans host
// no expert of their own: each node hosts the experts it would anyway
// and its span calls the others on the other nodes.
//
// An empty entry of the list is a node without a span (it hosts experts
// as any expert node does): with "call", span nodes of a list host no
// expert and call those nodes.
func spanArgs(spans string, j int, spanExperts string) []string {
	sp := spanOf(spans, j)
	if sp == "" {
		return nil
	}
	if spanExperts == "call" {
		if strings.Contains(spans, ",") {
			return []string{"--spans", sp, "--span-experts", "call", "--experts", "none"}
		}
		return []string{"--spans", sp, "--span-experts", "call"}
	}
	if strings.Contains(spans, ",") {
		return []string{"--spans", spanOf(spans, j), "--experts", "none"}
	}
	return []string{"--spans", spans}
}

// spanProviders is how many nodes serve the least served layer when each
// expert node hosts its own span only (a comma-separated list); without
// such a list, no limit.
func spanProviders(spans string) int {
	if !strings.Contains(spans, ",") {
		return math.MaxInt
	}
	cover := map[int]int{}
	last := 0
	for _, sp := range strings.Split(spans, ",") {
		part, _, err := node.ParseSpans(sp)
		if err != nil {
			return math.MaxInt // CheckSpans refuses it
		}
		for l := part.First; l < part.End; l++ {
			cover[l]++
		}
		last = max(last, part.End)
	}
	least := math.MaxInt
	for l := range last {
		least = min(least, cover[l])
	}
	return max(least, 1)
}

// CheckSpans checks a testnet's spans for this many expert nodes: one
// span for all, or one for each.
func CheckSpans(spans string, experts int) error {
	if spans == "" {
		return nil
	}
	list := strings.Split(spans, ",")
	if len(list) > 1 && len(list) != experts {
		return fmt.Errorf("%q: %d spans for %d expert nodes (give one for all, or one each)", spans, len(list), experts)
	}
	for _, sp := range list {
		if _, _, err := node.ParseSpans(sp); err != nil {
			return err
		}
	}
	return nil
}

// SpansWanted says whether the expert nodes serve spans, so that the
// model is served once the gating node has heard them.
func (l *Loopback) SpansWanted() func(j int) bool {
	if l.Spans == "" {
		return nil
	}
	return func(j int) bool { return spanOf(l.Spans, j) != "" }
}

// WaitHealthy implements Topology: every node has every other in its
// routing table and has heard each one's heartbeat.
func (l *Loopback) WaitHealthy(ctx context.Context, r *Run) error {
	if err := r.Net.WaitHealthy(ctx); err != nil {
		return err
	}
	r.Report.TookMs = r.Net.Took.Milliseconds()
	r.log.Info("network healthy", "took", r.Net.Took.Round(time.Millisecond))
	return nil
}

// Serving implements Topology: two honest providers per expert (fewer
// when there are fewer honest nodes).
func (l *Loopback) Serving() (int, map[int]expert.Fault) {
	return min(2, l.ExpertNodes-len(l.Faults), spanProviders(l.Spans)), l.Faults
}

// Settle implements Topology: nothing to wait for.
func (l *Loopback) Settle(context.Context, *Run) error { return nil }

// Describe implements Topology: the chain's validators.
func (l *Loopback) Describe(_ context.Context, r *Run) error {
	if r.Report.Ledger != nil {
		for _, p := range r.Net.Processes()[:l.Validators] {
			r.Report.Ledger.Validators = append(r.Report.Ledger.Validators, p.Status.PeerID)
		}
	}
	return nil
}

// Ask implements Topology: the prompt through the client library, as a
// user's program would ask it, paid from the user's wallet; with KillNodes
// it SIGKILLs the busiest expert nodes after token KillAfter.
func (l *Loopback) Ask(ctx context.Context, r *Run) error {
	c, err := r.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	var doomed []*Process
	if l.KillNodes > 0 {
		doomed = victims(r.Net.Processes()[1:], l.KillNodes, r.log)
	}
	rep := r.Report
	var first []int32
	var took time.Duration
	var d *client.Done
	for req := range r.S.Requests {
		last := req == r.S.Requests-1
		rep.Tokens, rep.PerTokenMs, rep.PerTokenComputeMs, rep.Text = rep.Tokens[:0], rep.PerTokenMs[:0], rep.PerTokenComputeMs[:0], ""
		if f := r.S.BeforeRequest; f != nil {
			if err := f(ctx, req, r.Net); err != nil {
				return fmt.Errorf("before request %d: %w", req+1, err)
			}
		}
		start := time.Now()
		if d, err = l.generate(ctx, r, c, req, last, doomed); err != nil {
			return err
		}
		took = time.Since(start)
		if f := r.S.AfterRequest; f != nil {
			f(req, rep)
		}
		if req == 0 {
			first = slices.Clone(rep.Tokens)
		} else if fmt.Sprint(first) != fmt.Sprint(rep.Tokens) {
			return fmt.Errorf("request %d answered %v, request 1 %v: the same greedy prompt must give the same tokens", req+1, rep.Tokens, first)
		}
		rep.Requests++
	}
	rep.Text, rep.PromptTokens = d.Text, d.PromptTokens
	rep.TokensPerSecond = float64(len(rep.Tokens)) / took.Seconds()
	rep.FinishReason = "stop"
	if d.Reason == neuropb.FinishReason_FINISH_REASON_LENGTH {
		rep.FinishReason = "length"
	}
	rep.Stats = GenerationStats(d, rep.PerTokenMs)
	if r.S.Concurrency > 1 {
		if err := l.concurrent(ctx, r, first); err != nil {
			return err
		}
	}
	if d.Escrow != 0 {
		price := TestnetPrice(r.Model.Manifest.ExpertFLOPsPerToken())
		rep.CostBaseUnits, rep.PricePerMFLOP = d.Cost, price
		tokens := d.PromptTokens + d.CompletionTokens
		rep.CostPer1kTokens = float64(d.Cost) * 1000 / float64(max(tokens, 1)) * float64(ledger.DefaultParams().GetPricePerMflop()) / float64(price) / 1e6
	}
	if f := r.S.Events.Answered; f != nil {
		f(rep, d, took)
	}
	return nil
}

// generate answers request req once, streaming the last one to the
// events.
func (l *Loopback) generate(ctx context.Context, r *Run, c *client.Client, req int, last bool, doomed []*Process) (*client.Done, error) {
	rep, ev := r.Report, r.S.Events
	cctx, cancel := context.WithTimeout(ctx, r.S.Timeout)
	defer cancel()
	s, err := c.Generate(cctx, client.Request{Model: r.Model.CID, Prompt: r.S.Prompt, MaxTokens: r.S.MaxTokens})
	if err != nil {
		return nil, fmt.Errorf("request %d: %w", req+1, err)
	}
	defer s.Close()
	if last && ev.Prompt != nil {
		ev.Prompt(r.S.Prompt)
	}
	for {
		t, err := s.Next()
		if err == io.EOF {
			return s.Done(), nil
		}
		if err != nil {
			return nil, fmt.Errorf("request %d: generation failed after %d tokens: %w", req+1, len(rep.Tokens), err)
		}
		if t.Rewind != nil {
			rep.Rewinds++
		}
		shown := ApplyToken(&rep.Tokens, &rep.PerTokenMs, &rep.PerTokenComputeMs, t)
		if last && ev.Token != nil {
			ev.Token(shown)
		}
		if t.Rewind == nil && l.KillNodes > 0 && req == 0 && len(rep.Tokens) == l.KillAfter {
			if err := kill(doomed, rep, r.log); err != nil {
				return nil, err
			}
			rep.KilledAfter = l.KillAfter
		}
	}
}

// concurrent asks the prompt Concurrency times at once, each through a
// client of its own paid by a wallet of its own, and checks every answer
// has want's tokens.
func (l *Loopback) concurrent(ctx context.Context, r *Run, want []int32) error {
	n := r.S.Concurrency
	clients := make([]*client.Client, n)
	for i := range n {
		c, err := r.connectAs(ctx, r.users[i+1])
		if err != nil {
			return fmt.Errorf("concurrent client %d: %w", i+1, err)
		}
		defer c.Close()
		clients[i] = c
	}
	cctx, cancel := context.WithTimeout(ctx, r.S.Timeout)
	defer cancel()
	results := make([]Result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := c.Generate(cctx, client.Request{Model: r.Model.CID, Prompt: r.S.Prompt, MaxTokens: r.S.MaxTokens})
			if err != nil {
				errs[i] = err
				return
			}
			defer s.Close()
			res := Result{Tokens: []int32{}, PerTokenMs: []float64{}}
			for {
				t, err := s.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					errs[i] = err
					return
				}
				ApplyToken(&res.Tokens, &res.PerTokenMs, nil, t)
			}
			res.Queued = s.Queued()
			if d := s.Done(); d != nil {
				res.MoELayers, res.SharedLayers = d.Stats.GetMoeLayers(), d.Stats.GetSharedLayers()
				res.Escrow, res.FLOPs, res.Cost = d.Escrow, d.FLOPs, d.Cost
			}
			results[i] = res
		}()
	}
	wg.Wait()
	return r.concurrentAnswers(results, errs, want, time.Since(start).Seconds())
}

// concurrentAnswers checks that every one of the concurrent requests was
// answered with want's tokens and reports them, with their tokens over
// seconds.
func (r *Run) concurrentAnswers(results []Result, errs []error, want []int32, seconds float64) error {
	n, total := len(results), 0
	var layers, shared uint64
	for i, res := range results {
		layers += res.MoELayers
		shared += res.SharedLayers
		if errs[i] != nil {
			return fmt.Errorf("concurrent request %d of %d: %w", i+1, n, errs[i])
		}
		if fmt.Sprint(res.Tokens) != fmt.Sprint(want) {
			return fmt.Errorf("concurrent request %d answered %v, the first request %v: the same greedy prompt must give the same tokens", i+1, res.Tokens, want)
		}
		total += len(res.Tokens)
	}
	r.Report.Results = results
	if layers > 0 {
		r.Report.SharedLayerShare = float64(shared) / float64(layers)
	}
	if seconds > 0 {
		r.Report.AggregateTokensPerS = float64(total) / seconds
	}
	r.log.Info("concurrent requests answered", "requests", n, "aggregate_tokens_per_s", r.Report.AggregateTokensPerS,
		"shared_layer_share", r.Report.SharedLayerShare)
	return nil
}

// connect starts a client that knows only node 0, paid by the user
// wallet, and waits until it finds the gating node in the DHT.
func (r *Run) connect(ctx context.Context) (*client.Client, error) {
	return r.connectAs(ctx, r.user)
}

// connectAs is connect with wallet as the client's (nil: unpaid).
func (r *Run) connectAs(ctx context.Context, wallet crypto.PrivKey) (*client.Client, error) {
	boot := r.Net.Processes()[0].Status
	var addrs []string
	for _, ad := range boot.Addrs {
		addrs = append(addrs, ad+"/p2p/"+boot.PeerID)
	}
	cctx, cancel := context.WithTimeout(ctx, r.S.Timeout)
	defer cancel()
	opts := []client.Option{client.WithBootstrap(addrs...), client.WithLogger(r.log)}
	if wallet != nil && r.S.Topology.paid() {
		opts = append(opts, client.WithWallet(wallet)) // the user pays for each request
	}
	c, err := client.New(cctx, opts...)
	if err != nil {
		return nil, err
	}
	// The gating node provides its key once the model is loaded; the
	// client may look before the record has spread.
	for {
		nodes, err := c.GatingNodes(cctx, r.Model.CID)
		if err != nil {
			c.Close()
			return nil, err
		}
		if len(nodes) > 0 {
			return c, nil
		}
		select {
		case <-cctx.Done():
			c.Close()
			return nil, fmt.Errorf("testnet: no gating node of %s found in the DHT: %w", r.Model.CID, cctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Hint implements Topology.
func (l *Loopback) Hint(r *Run) []string {
	boot := r.Net.Processes()[0].Status
	var out []string
	if len(boot.Addrs) > 0 {
		out = append(out, fmt.Sprintf("%s generate --network --bootstrap %s/p2p/%s --model %s --prompt 'Hello'", r.S.Binary, boot.Addrs[0], boot.PeerID, r.Model.CID),
			fmt.Sprintf("%s generate --network --bootstrap %s/p2p/%s --model %s --prompt 'Hello' --wallet %s (paid from the user wallet)",
				r.S.Binary, boot.Addrs[0], boot.PeerID, r.Model.CID, filepath.Join(r.Dir, UserWallet)))
	}
	if h := r.Report.HTTP; h != "" {
		out = append(out, fmt.Sprintf("open http://%s/ (the dashboard; metrics on /metrics)", h),
			fmt.Sprintf("curl -s http://%s/v1/completions -d '{\"model\": \"%s\", \"prompt\": \"Hello\", \"max_tokens\": 16}'", h, r.Model.CID))
		if len(r.Net.Processes()) > 1 {
			out = append(out, fmt.Sprintf("%s apikey create --home %s --account %s --budget 5 (then every /v1/ request needs 'Authorization: Bearer KEY', paid by that account)",
				r.S.Binary, r.Net.Processes()[0].Home, r.Net.Processes()[1].Status.PeerID))
		}
	}
	return out
}

// shareCores gives the gating node and each of n expert nodes on one
// machine of cores cores their compute threads: half the cores to the
// gating node, the rest shared by the expert nodes, each at least one.
// The gating node and its experts take turns (it waits while they
// compute), but their threads must not outnumber the cores even so:
// ggml's threads wait for each other at every op of a graph by spinning,
// and a thread that loses its core to another process's (the other
// node's network goroutines, a ledger block, the garbage collector)
// makes its partner spin until it is back. On two cores, an expert node
// of two threads beside a gating node of one took 0.9 ms for a layer's
// experts at the median but 3.4 ms at p90 and up to 40 ms (two spinning
// threads on one core, each op a time slice): 41-46 ms a token against
// 26-30 ms with one thread each (bench model, loopback).
//
// While the gating node waits, though, its cores idle: each expert node
// gets lanes (expert.lanes) for its share of all the cores, so that a
// layer's experts on it compute at the same time, each on a lane of its
// own threads with no barrier between the lanes (two experts on two
// lanes of one thread: 0.53-0.63 ms, against 1.06-1.33 ms on one thread
// and 0.70-0.81 ms on two threads in one graph; BenchmarkExpertGroup).
func shareCores(cores, n int) (gating, expert, lanes int) {
	gating = max(1, cores/2)
	expert = max(1, (cores-gating)/max(1, n))
	lanes = max(1, cores/max(1, n)/expert)
	return gating, expert, lanes
}
