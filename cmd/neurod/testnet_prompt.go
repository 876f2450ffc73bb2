package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/internal/atomicfile"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet"
)

// testnetModel is the model a testnet serves, split for node 0's store.
type testnetModel struct {
	path     string
	cid      cid.Cid
	manifest *neuropb.Manifest
	shards   string
}

// prepareModel splits the GGUF at path into dir/shards; with no path it
// first generates the tiny model at dir/model.gguf (kept across runs of
// the same --dir).
func prepareModel(dir, path string, log *slog.Logger) (*testnetModel, error) {
	if path == "" {
		path = filepath.Join(dir, "model.gguf")
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			log.Info("generating the tiny test model", "preset", testnetPreset, "seed", testnetSeed, "file", path)
			var buf bytes.Buffer
			if err := model.Generate(&buf, model.Presets[testnetPreset], model.Q8_0, testnetSeed); err != nil {
				return nil, fmt.Errorf("testnet: generate model: %w", err)
			}
			if err := atomicfile.Write(path, buf.Bytes(), 0o644); err != nil {
				return nil, fmt.Errorf("testnet: generate model: %w", err)
			}
		}
	}
	shards := filepath.Join(dir, "shards")
	if err := os.RemoveAll(shards); err != nil {
		return nil, fmt.Errorf("testnet: %w", err)
	}
	res, err := model.Split(path, shards)
	if err != nil {
		return nil, fmt.Errorf("testnet: model %s: %w", path, err)
	}
	return &testnetModel{path: path, cid: res.ModelCID, manifest: res.Manifest, shards: shards}, nil
}

// settle is how long the expert nodes' choices must stay the same before
// the testnet asks its prompt: automatic hosting goes on loading experts
// after every expert has its two providers, and a prompt answered while
// nodes fetch and load would measure that, not the network.
const settle = 3 * time.Second

// waitServing waits until the gating node (node gating; the nodes after
// it are the expert nodes) has loaded the model, every expert is served by
// want expert nodes, the gating node knows of want providers for each, and
// no expert node has changed what it serves for settle.
func waitServing(ctx context.Context, nw *testnet.Network, timeout time.Duration, layers, experts, want int, faults map[int]expert.Fault,
	show *progress.Reporter, gating int) error {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	bar := show.Bar(int64(layers*experts), fmt.Sprintf("experts hosted by %d nodes", want), false)
	defer bar.Finish()
	var (
		last    error
		hosting string
		since   time.Time
	)
	for {
		err := nw.Refresh(ctx)
		if err == nil {
			covered := 0
			for _, n := range testnet.Coverage(nw.Statuses()[gating+1:], layers, experts) {
				if n >= want {
					covered++
				}
			}
			_ = bar.Set(covered)
			err = serving(nw, layers, experts, want, faults, gating)
			var fatal *fatalError
			if errors.As(err, &fatal) {
				return err
			}
		}
		if err == nil {
			h := ""
			for _, st := range nw.Statuses()[gating+1:] {
				h += fmt.Sprint(st.Experts)
			}
			if h != hosting {
				hosting, since = h, time.Now()
			}
			if time.Since(since) >= settle {
				return nil
			}
			err = errors.New("expert nodes still choosing experts")
		}
		last = err
		select {
		case <-ctx.Done():
			if parent.Err() != nil {
				return fmt.Errorf("testnet: interrupted while waiting for the model to be served: %w", parent.Err())
			}
			return fmt.Errorf("testnet: model not served after %v: %w", timeout, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

type fatalError struct{ error }

// serving checks that the model is served; want counts honest providers
// (a faulty node's results do not count towards an expert's cover).
func serving(nw *testnet.Network, layers, experts, want int, faults map[int]expert.Fault, gating int) error {
	sts := nw.Statuses()
	var honest []node.Status
	for i, st := range sts[gating+1:] {
		if faults[gating+1+i] == expert.FaultNone {
			honest = append(honest, st)
		}
	}
	g := sts[gating].Gating
	if g == nil || len(g.Models) != 1 {
		return errors.New("gating node: no model")
	}
	m := g.Models[0]
	if m.Error != "" {
		return &fatalError{fmt.Errorf("gating node cannot serve the model: %s", m.Error)}
	}
	if !m.Ready {
		return errors.New("gating node: model loading")
	}
	if err := testnet.Covered(testnet.Coverage(honest, layers, experts), want); err != nil {
		return err
	}
	if m.MinProviders < want {
		return fmt.Errorf("gating node knows %d providers of some expert (missing: %v), want %d", m.MinProviders, m.Missing, want)
	}
	return nil
}

// askNetwork answers the prompt through the client library, streaming the
// text to stdout (unless --json), and SIGKILLs expert nodes if --kill asks.
func askNetwork(ctx context.Context, stdout io.Writer, nw *testnet.Network, mc cid.Cid, a testnetArgs, rep *testnetReport, log *slog.Logger) error {
	boot := nw.Processes()[0].Status
	var addrs []string
	for _, ad := range boot.Addrs {
		addrs = append(addrs, ad+"/p2p/"+boot.PeerID)
	}
	cctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	c, err := client.New(cctx, client.WithBootstrap(addrs...), client.WithLogger(log))
	if err != nil {
		return err
	}
	defer c.Close()
	// The gating node provides its key once the model is loaded; the
	// client may look before the record has spread.
	for {
		nodes, err := c.GatingNodes(cctx, mc)
		if err != nil {
			return err
		}
		if len(nodes) > 0 {
			break
		}
		select {
		case <-cctx.Done():
			return fmt.Errorf("testnet: no gating node of %s found in the DHT: %w", mc, cctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	var doomed []*testnet.Process
	if a.killNodes > 0 {
		doomed = victims(nw, a.killNodes, log)
	}
	var (
		start time.Time
		s     *client.Stream
		first []int32
	)
	for req := range a.requests {
		last := req == a.requests-1
		rep.Tokens, rep.PerTokenMs, rep.Text = rep.Tokens[:0], rep.PerTokenMs[:0], ""
		start = time.Now()
		s, err = c.Generate(cctx, client.Request{Model: mc, Prompt: a.prompt, MaxTokens: a.maxTokens, Escrow: a.escrow})
		if err != nil {
			return fmt.Errorf("request %d: %w", req+1, err)
		}
		defer s.Close()
		if !a.json && last {
			fmt.Fprintf(stdout, "prompt: %s\n\n%s", a.prompt, a.prompt)
		}
		for {
			t, err := s.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("request %d: generation failed after %d tokens: %w", req+1, len(rep.Tokens), err)
			}
			if t.Rewind != nil {
				rep.Rewinds++
			}
			shown := streamToken(&rep.Tokens, &rep.PerTokenMs, t)
			if !a.json && last {
				fmt.Fprint(stdout, shown)
			}
			if t.Rewind != nil {
				continue
			}
			if a.killNodes > 0 && req == 0 && len(rep.Tokens) == a.killAfter {
				if err := kill(doomed, rep, log); err != nil {
					return err
				}
				rep.KilledAfter = a.killAfter
			}
		}
		if req == 0 {
			first = slices.Clone(rep.Tokens)
		} else if fmt.Sprint(first) != fmt.Sprint(rep.Tokens) {
			return fmt.Errorf("request %d answered %v, request 1 %v: the same greedy prompt must give the same tokens", req+1, rep.Tokens, first)
		}
		rep.Requests++
	}
	took := time.Since(start)
	d := s.Done()
	rep.Text = d.Text
	rep.PromptTokens = d.PromptTokens
	rep.TokensPerSecond = float64(len(rep.Tokens)) / took.Seconds()
	rep.FinishReason = "stop"
	if d.Reason == neuropb.FinishReason_FINISH_REASON_LENGTH {
		rep.FinishReason = "length"
	}
	ts := generationStats(d, rep.PerTokenMs)
	rep.Stats = ts
	if !a.json {
		fmt.Fprintf(stdout, "%s\n\n%d tokens in %.2fs (%.1f tokens/s) from gating node %s; prompt %d tokens in %.1f ms\n",
			d.Rest, len(rep.Tokens), took.Seconds(), rep.TokensPerSecond, d.Gating, d.PromptTokens, ts.PrefillMs)
		fmt.Fprintf(stdout, "per-token latency: p50 %.2f ms, p99 %.2f ms; %d expert calls, %.0f bytes/token, dispatch overhead %.0f µs/layer, %d hedged, %d re-sent\n",
			ts.PerTokenP50Ms, ts.PerTokenP99Ms, ts.ExpertCalls, ts.BytesPerToken, ts.DispatchPerLay, ts.Hedges, ts.Redispatches)
		fmt.Fprintf(stdout, "latency of each token (ms): %v\n", rep.PerTokenMs)
		if len(rep.Killed) > 0 {
			fmt.Fprintf(stdout, "expert nodes %v were SIGKILLed after token %d\n", rep.Killed, rep.KilledAfter)
		}
	}
	return nil
}

// percentile of sorted values (nearest rank).
func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// victims picks the k expert nodes to kill: those that serve the most
// experts, which the gating node prefers (one peer for all of a layer's
// experts), so that the kill hits the nodes in use; but while it can, it
// spares a node whose death would leave an expert with no provider, so
// that the generation can go on.
func victims(nw *testnet.Network, k int, log *slog.Logger) []*testnet.Process {
	procs := slices.Clone(nw.Processes()[1:])
	slices.SortStableFunc(procs, func(a, b *testnet.Process) int {
		return cmp.Compare(len(b.Status.Experts), len(a.Status.Experts))
	})
	providers := map[string]int{}
	for _, p := range procs {
		for _, e := range p.Status.Experts {
			providers[e]++
		}
	}
	var out []*testnet.Process
	chosen := map[*testnet.Process]bool{}
	for _, p := range procs {
		if len(out) == k {
			break
		}
		orphans := false
		for _, e := range p.Status.Experts {
			orphans = orphans || providers[e] == 1
		}
		if orphans {
			continue
		}
		for _, e := range p.Status.Experts {
			providers[e]--
		}
		out = append(out, p)
		chosen[p] = true
	}
	for _, p := range procs {
		if len(out) == k {
			break
		}
		if !chosen[p] {
			log.Warn("--kill: this node is the last provider of some expert; the generation will fail", "node", p.Index)
			out = append(out, p)
		}
	}
	return out
}

// kill SIGKILLs the victims all at once, then waits for them to die.
func kill(procs []*testnet.Process, rep *testnetReport, log *slog.Logger) error {
	for _, p := range procs {
		if err := p.Signal(syscall.SIGKILL); err != nil {
			return fmt.Errorf("testnet: --kill node %d: %w", p.Index, err)
		}
	}
	for _, p := range procs {
		if err := p.Kill(); err != nil {
			return fmt.Errorf("testnet: --kill node %d: %w", p.Index, err)
		}
		log.Info("SIGKILLed expert node", "node", p.Index, "pid", p.PID(), "experts", len(p.Status.Experts))
		rep.Killed = append(rep.Killed, p.Index)
	}
	return nil
}

// fillTrust adds each expert node's faulty mode and the gating node's
// record of it to the report.
func fillTrust(rep *testnetReport, nw *testnet.Network, faults map[int]expert.Fault) {
	g := nw.Processes()[0].Status.Gating
	recs := map[string]node.PeerReputation{}
	if g != nil {
		rep.Validation = g.Validation
		for _, r := range g.Reputation {
			recs[r.PeerID] = r
		}
	}
	for i := range rep.Nodes {
		n := &rep.Nodes[i]
		n.Faulty = string(faults[n.Index])
		if r, ok := recs[n.PeerID]; ok {
			n.Score, n.Checked, n.Failed, n.Excluded, n.ExcludedAt = r.Score, r.Checked, r.Failed, r.Excluded, r.ExcludedAt
		}
	}
}

// printTrust prints each expert node's record after the workload.
func printTrust(w io.Writer, rep testnetReport) {
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

// freeTCPPort finds a free loopback port (for the chain's CometBFT p2p).
func freeTCPPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("testnet: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// seedTestnet is a testnet's BeforeStart: it writes the genesis (the first
// validators nodes validate) and imports the model's shards into node 0.
func seedTestnet(genesisPath string, mf *testnetModel, validators int) func(homes []string) error {
	return func(homes []string) error {
		if err := writeTestnetGenesis(genesisPath, homes, mf.cid, validators); err != nil {
			return err
		}
		store, err := expert.OpenStore(filepath.Join(homes[0], node.StoreDir))
		if err != nil {
			return err
		}
		_, err = store.ImportSplit(mf.shards)
		return err
	}
}

// writeTestnetGenesis writes the testnet chain's genesis: node 0 is the
// validator; every node starts with 10,000 NEURO and 200 staked (above the
// minimum stake an expert needs to be paid), and the model is on the
// ledger from the start.
func writeTestnetGenesis(path string, homes []string, model cid.Cid, validators int) error {
	params := ledger.DefaultParams()
	// The tiny model does a few hundred kFLOPs a token: price it so that a
	// prompt costs about a NEURO, and the treasury and burn show.
	params.PricePerMflop = 100_000
	// Votes close after 2 s of 200 ms blocks, so that a user can try
	// governance on the testnet.
	params.VotingBlocks = 10
	g := ledger.ChainGenesis{ChainID: "neuro-testnet", Time: time.Now().UTC().Truncate(time.Second),
		Ledger: &neuropb.LedgerGenesis{Params: params, Models: [][]byte{model.Bytes()}}}
	for i, home := range homes {
		key, err := node.LoadIdentity(home)
		if err != nil {
			return err
		}
		id, err := peer.IDFromPrivateKey(key)
		if err != nil {
			return err
		}
		if i < validators {
			g.Validators = append(g.Validators, ledger.Validator{Peer: id, Power: 10})
		}
		g.Ledger.Accounts = append(g.Ledger.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(id),
			Balance: 10_000 * ledger.BaseUnits, Stake: 200 * ledger.BaseUnits})
	}
	return ledger.WriteGenesis(path, g)
}

// testnetValidators makes the homes of the first n nodes (their keys are
// their validator keys) and returns a free CometBFT port for each and
// each one's "nodeid@127.0.0.1:port", for the others' peer lists.
func testnetValidators(dir string, n int) (ports []int, peers []string, err error) {
	for i := range n {
		home := testnet.Home(dir, i)
		if _, err := os.Stat(filepath.Join(home, node.IdentityFile)); err != nil {
			if _, err := node.Init(home, false); err != nil {
				return nil, nil, fmt.Errorf("validator %d: %w", i, err)
			}
		}
		key, err := node.LoadIdentity(home)
		if err != nil {
			return nil, nil, fmt.Errorf("validator %d: %w", i, err)
		}
		id, err := peer.IDFromPrivateKey(key)
		if err != nil {
			return nil, nil, fmt.Errorf("validator %d: %w", i, err)
		}
		nid, err := ledger.NodeID(id)
		if err != nil {
			return nil, nil, fmt.Errorf("validator %d: %w", i, err)
		}
		port, err := freeTCPPort()
		if err != nil {
			return nil, nil, err
		}
		ports = append(ports, port)
		peers = append(peers, fmt.Sprintf("%s@127.0.0.1:%d", nid, port))
	}
	return ports, peers, nil
}

// escrowDeposit is what the testnet's user puts in escrow for its prompt.
const escrowDeposit = 100 * ledger.BaseUnits

// openEscrow has node 1 open an escrow for the model with node 0 (the
// gating node) and waits until the chain has applied it.
func openEscrow(ctx context.Context, nw *testnet.Network, model cid.Cid, log *slog.Logger) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	wallet, gating := nw.Processes()[1], nw.Processes()[0]
	res, err := node.SubmitLedgerTx(ctx, wallet.APIAddr, node.LedgerTxRequest{Type: "escrow", Model: model.String(),
		Gating: gating.Status.PeerID, Amount: escrowDeposit})
	if err != nil {
		return 0, fmt.Errorf("open escrow: %w", err)
	}
	for {
		info, err := node.FetchLedger(ctx, gating.APIAddr, wallet.Status.PeerID)
		if err == nil && info.Nonce >= res.Nonce {
			log.Info("escrow open", "escrow", res.Escrow, "payer", wallet.Status.PeerID, "amount", neuro(escrowDeposit))
			return res.Escrow, nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("open escrow: not applied: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitSettled waits until the gating node's settlements have been applied:
// its nonce on the chain stops short of nothing it sent.
func waitSettled(ctx context.Context, nw *testnet.Network) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	gating := nw.Processes()[0]
	for {
		info, err := node.FetchLedger(ctx, gating.APIAddr, "")
		if err == nil && info.Treasury > 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ledger: the generation was not settled: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitBlocks waits until the chain has committed n more blocks.
func waitBlocks(ctx context.Context, nw *testnet.Network, n int64) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := int64(-1)
	for {
		info, err := node.FetchLedger(ctx, nw.Processes()[0].APIAddr, "")
		if err == nil {
			if start < 0 {
				start = info.Height
			}
			if info.Height >= start+n {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ledger: %d blocks not committed: %w", n, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// generationStats is what the gating node measured of a generation, with
// the per-token latency the client saw (the first token, which carries the
// prompt, is left out of the percentiles).
func generationStats(d *client.Done, perTokenMs []float64) *testnetStats {
	st := d.Stats
	ts := &testnetStats{PrefillMs: float64(d.Prefill.Microseconds()) / 1000,
		ExpertCalls: st.GetExpertCalls(), ExpertBytes: st.GetExpertBytes(), MoELayers: st.GetMoeLayers(), OneNodeLayers: st.GetOneNodeLayers(),
		MoEWallMs: float64(st.GetMoeWallUs()) / 1000, MoEComputeMs: float64(st.GetMoeComputeUs()) / 1000,
		Hedges: st.GetHedges(), Redispatches: st.GetRedispatches()}
	if n := len(perTokenMs); n > 0 {
		ts.BytesPerToken = float64(st.GetExpertBytes()) / float64(n)
	}
	if st.GetMoeLayers() > 0 {
		ts.DispatchPerLay = float64(st.GetMoeWallUs()-min(st.GetMoeWallUs(), st.GetMoeComputeUs())) / float64(st.GetMoeLayers())
	}
	if len(perTokenMs) > 1 {
		decode := slices.Clone(perTokenMs[1:])
		sort.Float64s(decode)
		ts.PerTokenP50Ms = percentile(decode, 0.50)
		ts.PerTokenP99Ms = percentile(decode, 0.99)
	}
	return ts
}
