package testnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"os"
	"path/filepath"
	"time"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/node"
)

// Scenario is one run of a testnet, in explicit stages (the data model of
// CometBFT's e2e runner, with the topology as its infra provider):
//
//	prepare the model → set up the topology → launch the nodes →
//	wait healthy → wait serving → open an escrow → ask → settle → report
//
// and, with Check, stop. The loopback testnet (Loopback) and the emulated
// internet of network namespaces (Netns) are the two topologies; `neurod
// testnet` and `neurod bench` drive the same scenario.
type Scenario struct {
	// Topology is where the nodes run.
	Topology Topology
	// Dir holds the model, the homes and their logs; "" makes a temporary
	// one that goes when the network stops.
	Dir string
	// Binary is the neurod executable the nodes run.
	Binary string
	// Model is the GGUF file served; "" generates the tiny model.
	Model string
	// SharedRemote splits the model with its shared experts hosted like
	// routed ones (model.SplitOptions).
	SharedRemote bool
	// Speculate is the gating node's speculative decoding (gating.speculate:
	// "" or "off", "ngram", "draft"), Draft its draft model (a GGUF file).
	Speculate, Draft string
	// BatchWait is the gating node's gating.batch_wait (continuous
	// batching): 0 leaves its default, negative turns batching off.
	BatchWait time.Duration
	// LayerByLayer turns the gating node's spans off (gating.spans): it
	// calls the experts layer by layer even where span nodes cover the
	// model, as a node without spans does.
	LayerByLayer bool
	Prompt       string
	MaxTokens    int
	// Requests is how many times the prompt is answered (at least 1);
	// every answer must have the same tokens.
	Requests int
	// BeforeRequest, if set, runs before each of the loopback testnet's
	// requests (req counts from 0), the network up; an error ends the
	// scenario. AfterRequest gets each request's report: its tokens and
	// per-token latencies (the report's stats are the last request's).
	BeforeRequest func(ctx context.Context, req int, nw *Network) error
	AfterRequest  func(req int, rep *Report)
	// Concurrency, above 1, then asks the prompt that many times at once
	// (the loopback testnet's each through a client of its own, paid by a
	// wallet of its own; the netns testnet's unpaid, through one client in
	// the gating node's home); every answer must have the same tokens.
	Concurrency int
	// Timeout bounds coming up, being healthy, serving the model and
	// answering.
	Timeout time.Duration
	// Check stops the network once the prompt is answered; without it Run
	// leaves the network up (Running).
	Check bool
	Log   *slog.Logger
	// Progress shows the nodes coming up and the experts being hosted.
	Progress *progress.Reporter
	// LogTails, if set, gets the last lines of every node's log when the
	// network fails.
	LogTails io.Writer
	// Events follow the run (each may be nil).
	Events Events
}

// Events are told how a scenario advances, for a terminal to show it.
type Events struct {
	// Serving: every node is up and the model is served; the report lists
	// the nodes.
	Serving func(rep *Report)
	// Prompt, Token and Answered follow the generation of the last
	// request: the prompt, what each token adds to the text (or a line
	// that withdraws it), and the summary.
	Prompt   func(prompt string)
	Token    func(text string)
	Answered func(rep *Report, d *client.Done, took time.Duration)
}

// Topology is where a scenario's nodes run and how it reaches them: the
// infra provider of a scenario. Its methods are the stages that differ.
type Topology interface {
	// Setup makes what the nodes run on and notes it in the report;
	// what it makes is removed when the run closes (Run.onClose).
	Setup(ctx context.Context, r *Run) error
	// Launch fills in the nodes: how many, and each one's config, flags
	// and wrapping command.
	Launch(r *Run, o *LaunchOptions) error
	// Gating is the gating node; the nodes after it are expert nodes.
	Gating() int
	// WaitHealthy waits until the network is up and sets the report's
	// TookMs.
	WaitHealthy(ctx context.Context, r *Run) error
	// Serving is how many honest providers each expert needs before the
	// prompt is asked, and which nodes are faulty.
	Serving() (providers int, faults map[int]expert.Fault)
	// SpansWanted says which expert nodes serve layer spans (j counts
	// the expert nodes from 0; nil: none): the model is served once the
	// gating node has heard them.
	SpansWanted() func(j int) bool
	// Ask answers the prompt and fills in the report's generation.
	Ask(ctx context.Context, r *Run) error
	// Settle waits, once the model is served, for what the topology needs
	// before the prompt (the netns testnet: hole-punched links).
	Settle(ctx context.Context, r *Run) error
	// Describe adds what the topology saw of the generation.
	Describe(ctx context.Context, r *Run) error
	// Hint says how to use the network that Run left up.
	Hint(r *Run) []string
	// paid says whether the scenario opens an escrow and settles it.
	paid() bool
}

// Run is a scenario under way: what its stages share.
type Run struct {
	S      *Scenario
	Dir    string
	Model  *Model
	Net    *Network
	Report *Report

	log *slog.Logger
	// user is the wallet that pays for a paid scenario's prompts; users
	// are it and then one for each concurrent request.
	user    crypto.PrivKey
	users   []crypto.PrivKey
	stopped bool
	cleanup []func() error
}

// Running is a network a scenario left up (without Check).
type Running struct{ r *Run }

// Hint says how to use it.
func (rn *Running) Hint() []string { return rn.r.S.Topology.Hint(rn.r) }

// Stop stops its nodes and removes what the scenario made.
func (rn *Running) Stop() []Exit { return rn.r.close() }

// Run runs the stages. It returns the report (with Error set when a stage
// failed) and, when the scenario does not Check, the network left
// running, which the caller stops.
func (s *Scenario) Run(ctx context.Context) (rep *Report, _ *Running, err error) {
	if s.Requests < 1 {
		s.Requests = 1
	}
	if s.Log == nil {
		s.Log = slog.Default()
	}
	if s.Progress == nil {
		s.Progress = progress.New(io.Discard)
	}
	r := &Run{S: s, log: s.Log, Report: &Report{Nodes: []NodeReport{}, Tokens: []int32{}, PerTokenMs: []float64{}}}
	defer func() {
		if err != nil {
			r.Report.Error = err.Error()
			r.close()
		}
	}()
	if err := r.stages(ctx); err != nil {
		return r.Report, nil, err
	}
	if !s.Check {
		return r.Report, &Running{r: r}, nil
	}
	r.stop()
	if r.S.Topology.paid() { // the loopback testnet's nodes must all stop cleanly
		for _, e := range r.Report.Stopped {
			if !e.Clean && !e.Crashed {
				return r.Report, nil, fmt.Errorf("node %d did not stop cleanly: %s", e.Index, e.Error)
			}
		}
	}
	r.close()
	return r.Report, nil, nil
}

// stages runs the scenario up to its report.
func (r *Run) stages(ctx context.Context) error {
	if err := r.makeDir(); err != nil {
		return err
	}
	if err := r.S.Topology.Setup(ctx, r); err != nil {
		return err
	}
	m, err := PrepareModel(r.Dir, r.S.Model, r.log, model.SplitOptions{SharedRemote: r.S.SharedRemote})
	if err != nil {
		return err
	}
	r.Model, r.Report.Model, r.Report.ModelFile = m, m.CID.String(), m.Path
	if err := r.launch(ctx); err != nil {
		return err
	}
	if err := r.S.Topology.WaitHealthy(ctx, r); err != nil {
		if ctx.Err() != nil {
			return r.failNet(fmt.Errorf("testnet: interrupted while the network came up: %w", ctx.Err()))
		}
		return r.failNet(fmt.Errorf("testnet unhealthy: %w", err))
	}
	r.Report.Healthy = true
	readyStart := time.Now()
	want, faults := r.S.Topology.Serving()
	gating := r.S.Topology.Gating()
	if err := waitServing(ctx, r.Net, r.S.Timeout, m.FirstMoELayer(), m.Layers(), m.Experts(), want, faults, r.S.Progress, gating,
		r.S.Topology.SpansWanted()); err != nil {
		return r.failNet(err)
	}
	if err := r.S.Topology.Settle(ctx, r); err != nil {
		return r.failNet(err)
	}
	r.Report.ReadyMs = time.Since(readyStart).Milliseconds()
	r.fillNodes()
	if g := r.Net.Processes()[gating].Status.Gating; g != nil && g.HTTP != "" {
		r.Report.HTTP = g.HTTP
	}
	r.log.Info("model served", "took", time.Since(readyStart).Round(time.Millisecond))
	if f := r.S.Events.Serving; f != nil {
		f(r.Report)
	}
	if r.S.Topology.paid() {
		err = r.paidAsk(ctx)
	} else if err = r.S.Topology.Ask(ctx, r); err != nil {
		err = r.failNet(err)
	} else {
		err = r.report(ctx, nil)
	}
	if err != nil {
		return err
	}
	if err := r.S.Topology.Describe(ctx, r); err != nil {
		return r.failNet(err)
	}
	return nil
}

// makeDir makes the scenario's directory, or a temporary one.
func (r *Run) makeDir() error {
	r.Dir = r.S.Dir
	if r.Dir == "" {
		dir, err := os.MkdirTemp("", "neuro-testnet-")
		if err != nil {
			return fmt.Errorf("testnet: %w", err)
		}
		r.Dir = dir
		r.onClose(func() error {
			if err := os.RemoveAll(dir); err != nil {
				return fmt.Errorf("testnet: remove %s: %w", dir, err)
			}
			return nil
		})
	} else if err := os.MkdirAll(r.Dir, 0o755); err != nil {
		return fmt.Errorf("flag --dir %s: %w", r.Dir, err)
	}
	r.Report.Dir = r.Dir
	return nil
}

// launch starts the nodes the topology describes.
func (r *Run) launch(ctx context.Context) error {
	o := LaunchOptions{Dir: r.Dir, Binary: r.S.Binary, Timeout: r.S.Timeout, Log: r.log}
	if err := r.S.Topology.Launch(r, &o); err != nil {
		return err
	}
	if r.S.Speculate != "" || r.S.BatchWait != 0 || r.S.LayerByLayer {
		topo := o.Config
		o.Config = func(i int, c *node.Config) {
			if topo != nil {
				topo(i, c)
			}
			if r.S.Speculate != "" {
				c.Gating.Speculate, c.Gating.Draft = r.S.Speculate, r.S.Draft
			}
			if r.S.BatchWait != 0 {
				c.Gating.BatchWait = node.Duration(max(r.S.BatchWait, 0))
			}
			if r.S.LayerByLayer {
				c.Gating.Spans = false
			}
		}
	}
	up := r.S.Progress.Bar(int64(o.Nodes), "nodes up", false)
	o.Up = func(n int) { _ = up.Set(n) }
	nw, err := Launch(ctx, o)
	_ = up.Finish()
	if err != nil {
		return err
	}
	r.Net = nw
	return nil
}

// paidAsk is the loopback scenario's middle: balances, the prompt paid
// from the user's wallet (each request's escrow, which the gating node
// settles and closes), its settlement and the ledger after.
func (r *Run) paidAsk(ctx context.Context) error {
	stakes := map[string]uint64{}
	before, _, err := r.balances(ctx, stakes)
	if err != nil {
		return r.failNet(fmt.Errorf("ledger: %w", err))
	}
	if err := r.S.Topology.Ask(ctx, r); err != nil {
		return r.failNet(err)
	}
	if err := waitSettled(ctx, r.Net); err != nil {
		return r.failNet(err)
	}
	_, faults := r.S.Topology.Serving()
	// The gating node reports the verdicts its checks reach to the ledger
	// for slashing: wait for its checks and verdicts in flight, then give
	// the transactions a few blocks.
	if len(faults) > 0 {
		if err := waitVerdicts(ctx, r.Net); err != nil {
			r.log.Warn("the gating node's checks and verdicts", "err", err)
		}
		if err := waitBlocks(ctx, r.Net, 10); err != nil {
			return r.failNet(err)
		}
	}
	after, info, err := r.balances(ctx, stakes)
	if err != nil {
		return r.failNet(fmt.Errorf("ledger: %w", err))
	}
	r.Report.Ledger = &LedgerReport{Height: info.Height, AppHash: info.AppHash, BalancesBefore: before, BalancesAfter: after,
		Treasury: info.Treasury, Burned: info.Burned, SupplyOK: info.SupplyOK, StakesAfter: stakes}
	if r.user != nil {
		id, _ := peer.IDFromPrivateKey(r.user)
		r.Report.Ledger.User = id.String()
	}
	return r.report(ctx, faults)
}

// balances reads every node's balance and stake from the gating node.
func (r *Run) balances(ctx context.Context, stakes map[string]uint64) (map[string]uint64, *node.LedgerInfo, error) {
	out := map[string]uint64{}
	var last *node.LedgerInfo
	accounts := []string{}
	for _, p := range r.Net.Processes() {
		accounts = append(accounts, p.Status.PeerID)
	}
	for _, u := range r.users {
		id, _ := peer.IDFromPrivateKey(u)
		accounts = append(accounts, id.String())
	}
	for _, a := range accounts {
		info, err := node.FetchLedger(ctx, r.Net.Processes()[0].APIAddr, a)
		if err != nil {
			return nil, nil, err
		}
		out[a], last = info.Balance, info
		stakes[a] = info.Staked
	}
	return out, last, nil
}

// report refreshes the nodes' statuses into the report after the
// generation.
func (r *Run) report(ctx context.Context, faults map[int]expert.Fault) error {
	if err := r.Net.Refresh(ctx); err != nil {
		if !r.S.Topology.paid() {
			return r.failNet(err)
		}
		r.log.Warn("status after the workload", "err", err)
	}
	r.fillNodes()
	if r.S.Topology.paid() {
		fillTrust(r.Report, r.Net, faults)
	}
	return nil
}

func (r *Run) fillNodes() { r.Report.Nodes = reportNodes(r.Net) }

// failNet fills in the nodes, shows their logs' tails and returns err.
func (r *Run) failNet(err error) error {
	r.fillNodes()
	if r.S.LogTails != nil {
		for _, p := range r.Net.Processes() {
			fmt.Fprint(r.S.LogTails, p.LogTail(10))
		}
	}
	return err
}

// onClose runs f when the run closes, after the nodes have stopped (last
// registered, first run).
func (r *Run) onClose(f func() error) { r.cleanup = append(r.cleanup, f) }

// stop stops the nodes, once.
func (r *Run) stop() {
	if r.stopped || r.Net == nil {
		return
	}
	r.stopped = true
	r.Report.Stopped = stopNetwork(r.Net, r.log)
}

// close stops the nodes and removes what the run made.
func (r *Run) close() []Exit {
	r.stop()
	var errs []error
	for i := len(r.cleanup) - 1; i >= 0; i-- {
		errs = append(errs, r.cleanup[i]())
	}
	r.cleanup = nil
	if err := errors.Join(errs...); err != nil {
		r.log.Warn("testnet cleanup", "err", err)
	}
	return r.Report.Stopped
}

// reportNodes is the report's view of each node, from its last status.
func reportNodes(nw *Network) []NodeReport {
	out := []NodeReport{}
	for _, p := range nw.Processes() {
		st := p.Status
		var layers *bool
		if st.Gating != nil && len(st.Gating.Models) > 0 {
			layers = &st.Gating.Models[0].LayersLoaded
		}
		out = append(out, NodeReport{
			LayersLoaded: layers,
			Index:        p.Index, PeerID: st.PeerID, Addrs: st.Addrs, Roles: st.Roles, PID: p.PID(),
			Home: p.Home, API: p.APIAddr, RSSBytes: st.RSSBytes,
			RoutingTableSize: len(st.RoutingTable), HeardPeers: len(st.Heard),
			Experts: append([]string{}, st.Experts...), Spans: append([]string{}, st.Spans...), ExpertCalls: st.ExpertCalls, Verdicts: st.Verdicts,
			Devices: append([]node.DeviceStatus{}, st.Devices...),
		})
	}
	return out
}

// stopNetwork stops every node and logs how each ended.
func stopNetwork(nw *Network, log *slog.Logger) []Exit {
	var out []Exit
	clean := 0
	for _, r := range nw.Stop() {
		e := Exit{Index: r.Index, PID: r.PID, Clean: r.Clean, Killed: r.Killed, Crashed: r.Crashed, LogTail: r.LogTail}
		if r.Err != nil {
			e.Error = r.Err.Error()
		}
		if r.Clean {
			clean++
		} else if !r.Crashed {
			log.Warn("node did not stop cleanly", "node", r.Index, "pid", r.PID, "killed", r.Killed, "err", r.Err, "log_tail", r.LogTail)
		}
		out = append(out, e)
	}
	log.Info("testnet stopped", "nodes", len(out), "clean", clean)
	return out
}

// genesisPath is where a run's chain genesis is written.
func (r *Run) genesisPath() string { return filepath.Join(r.Dir, "genesis.json") }
