package testnet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
)

// settle is how long the expert nodes' choices must stay the same before
// the testnet asks its prompt: automatic hosting goes on loading experts
// after every expert has its two providers, and a prompt answered while
// nodes fetch and load would measure that, not the network.
const settle = 3 * time.Second

// waitServing waits until the gating node (node gating; the nodes after
// it are the expert nodes) has loaded the model, every expert is served by
// want expert nodes, the gating node knows of want providers for each, and
// no expert node has changed what it serves for settle.
func waitServing(ctx context.Context, nw *Network, timeout time.Duration, first, layers, experts, want int, faults map[int]expert.Fault,
	show *progress.Reporter, gating int, spans func(j int) bool) error {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	bar := show.Bar(int64((layers-first)*experts), fmt.Sprintf("experts hosted by %d nodes", want), false)
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
			for _, n := range Coverage(nw.Statuses()[gating+1:], first, layers, experts) {
				if n >= want {
					covered++
				}
			}
			_ = bar.Set(covered)
			err = serving(nw, first, layers, experts, want, faults, gating, spans)
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
func serving(nw *Network, first, layers, experts, want int, faults map[int]expert.Fault, gating int, spans func(j int) bool) error {
	sts := nw.Statuses()
	var honest, spanning []node.Status
	for i, st := range sts[gating+1:] {
		if faults[gating+1+i] == expert.FaultNone {
			honest = append(honest, st)
			if spans != nil && spans(i) {
				spanning = append(spanning, st)
			}
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
	if err := Covered(Coverage(honest, first, layers, experts), want); err != nil {
		return err
	}
	if m.MinProviders < want {
		return fmt.Errorf("gating node knows %d providers of some expert (missing: %v), want %d", m.MinProviders, m.Missing, want)
	}
	if spans != nil {
		return spansHeard(sts[gating], spanning)
	}
	return nil
}

// spansHeard checks that every honest expert node meant to serve a span
// (spanning) serves it and that the gating node has heard it announced.
func spansHeard(g node.Status, honest []node.Status) error {
	heard := map[string][]string{}
	for _, h := range g.Heard {
		heard[h.PeerID] = h.Spans
	}
	for _, st := range honest {
		if len(st.Spans) == 0 {
			return fmt.Errorf("node %s: no span served yet", short(st.PeerID))
		}
		if len(heard[st.PeerID]) == 0 {
			return fmt.Errorf("gating node: no span heard from %s yet", short(st.PeerID))
		}
	}
	return nil
}

// victims picks the k of the expert nodes to kill: those that serve the most
// experts, which the gating node prefers (one peer for all of a layer's
// experts), so that the kill hits the nodes in use — among span nodes, the
// one a chain tries first (the lowest peer ID of a span's providers); but
// while it can, it spares a node whose death would leave an expert with no
// provider, so that the generation can go on.
func victims(experts []*Process, k int, log *slog.Logger) []*Process {
	procs := slices.Clone(experts)
	chainOrder := func(a, b *Process) int {
		if len(a.Status.Spans) == 0 || len(b.Status.Spans) == 0 {
			return 0
		}
		ia, _ := peer.Decode(a.Status.PeerID)
		ib, _ := peer.Decode(b.Status.PeerID)
		return cmp.Compare(ia, ib)
	}
	slices.SortStableFunc(procs, func(a, b *Process) int {
		return cmp.Or(cmp.Compare(len(b.Status.Spans), len(a.Status.Spans)), cmp.Compare(len(b.Status.Experts), len(a.Status.Experts)),
			chainOrder(a, b))
	})
	providers := map[string]int{}
	for _, p := range procs {
		for _, e := range p.Status.Experts {
			providers[e]++
		}
	}
	var out []*Process
	chosen := map[*Process]bool{}
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
func kill(procs []*Process, rep *Report, log *slog.Logger) error {
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
func fillTrust(rep *Report, nw *Network, faults map[int]expert.Fault) {
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

// seedTestnet is a testnet's BeforeStart: it writes the genesis (the first
// validators nodes validate) and imports the model's shards into node 0.
func seedTestnet(genesisPath string, mf *Model, validators, gating int, users ...peer.ID) func(homes []string) error {
	return func(homes []string) error {
		if err := writeGenesis(genesisPath, homes, mf, validators, gating, users...); err != nil {
			return err
		}
		store, err := expert.OpenStore(filepath.Join(homes[0], node.StoreDir))
		if err != nil {
			return err
		}
		_, err = store.ImportSplit(mf.Shards)
		return err
	}
}

// tokenPrice is what one token (prompt or generated) of any model costs on
// the testnet: 0.005 NEURO, so that a prompt costs a fraction of a NEURO,
// the treasury and burn show, and an API key with a budget of a few NEURO
// pays for a few dozen requests whatever the model's size.
const tokenPrice = 5000

// TestnetPrice is the testnet's price of one MFLOP in base units for a
// model whose token needs flopsPerToken of expert work: tokenPrice a
// token, at least one base unit an MFLOP.
func TestnetPrice(flopsPerToken uint64) uint64 {
	return max(1, uint64(math.Round(float64(tokenPrice)*1e6/float64(max(flopsPerToken, 1)))))
}

// testnetAllowance is what every testnet account allows the gating node
// to draw into escrows: an API key the gating node issues for any node's
// account is paid at once, without a transaction from the account first
// (on a real chain its holder sends one: 'neurod wallet allow').
const testnetAllowance = 1000 * ledger.BaseUnits

// writeGenesis writes the testnet chain's genesis: the first validators
// nodes validate; every node starts with 10,000 NEURO and 200 staked (above
// the minimum stake an expert needs to be paid) and allows node gating
// testnetAllowance; each user wallet starts with userFunds; and the model
// is on the ledger from the start.
func writeGenesis(path string, homes []string, mf *Model, validators, gating int, users ...peer.ID) error {
	params := ledger.DefaultParams()
	params.PricePerMflop = TestnetPrice(mf.Manifest.ExpertFLOPsPerToken())
	// Votes close after 10 s of 200 ms blocks, so that a user can try
	// governance on the testnet: time to vote from two nodes, even on a
	// loaded machine (2 s was missed by a test's two votes while CI's
	// other tests held the cores).
	params.VotingBlocks = 50
	g := ledger.ChainGenesis{ChainID: "neuro-testnet", Time: time.Now().UTC().Truncate(time.Second),
		Ledger: &neuropb.LedgerGenesis{Params: params, Models: [][]byte{mf.CID.Bytes()}}}
	ids := make([]peer.ID, len(homes))
	for i, home := range homes {
		key, err := node.LoadIdentity(home)
		if err != nil {
			return err
		}
		if ids[i], err = peer.IDFromPrivateKey(key); err != nil {
			return err
		}
	}
	for i, id := range ids {
		if i < validators {
			g.Validators = append(g.Validators, ledger.Validator{Peer: id, Power: 10})
		}
		acc := &neuropb.LedgerGenesis_Account{Peer: []byte(id), Balance: 10_000 * ledger.BaseUnits, Stake: 200 * ledger.BaseUnits}
		if i != gating && gating < len(ids) {
			acc.Allowances = []*neuropb.Allow{{Spender: []byte(ids[gating]), Amount: testnetAllowance}}
		}
		g.Ledger.Accounts = append(g.Ledger.Accounts, acc)
	}
	for _, u := range users {
		g.Ledger.Accounts = append(g.Ledger.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(u), Balance: userFunds})
	}
	return ledger.WriteGenesis(path, g)
}

// validatorPorts makes the homes of the first n nodes (their keys are
// their validator keys) and returns a free CometBFT port for each and
// each one's "nodeid@127.0.0.1:port", for the others' peer lists.
func validatorPorts(dir string, n int) (ports []int, peers []string, err error) {
	for i := range n {
		home := Home(dir, i)
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
		port, err := ledger.FreePort()
		if err != nil {
			return nil, nil, err
		}
		ports = append(ports, port)
		peers = append(peers, fmt.Sprintf("%s@127.0.0.1:%d", nid, port))
	}
	return ports, peers, nil
}

// userFunds is what the testnet's user wallet starts with: two million
// tokens at the testnet's price.
const userFunds = 10_000 * ledger.BaseUnits

// UserWallet is the testnet's user wallet in its directory: the account
// the loopback testnet's prompt is paid from ('neurod generate --network
// --wallet DIR/user-wallet.key' pays from it too).
const UserWallet = "user-wallet.key"

// userWallet loads the testnet's i-th user wallet in dir (0: UserWallet,
// then user-wallet-2.key, ...), making it the first time.
func userWallet(dir string, i int) (crypto.PrivKey, peer.ID, error) {
	path := filepath.Join(dir, UserWallet)
	if i > 0 {
		path = filepath.Join(dir, fmt.Sprintf("user-wallet-%d.key", i+1))
	}
	k, err := node.LoadKey(path)
	if errors.Is(err, fs.ErrNotExist) {
		if k, _, err = crypto.GenerateEd25519Key(nil); err != nil {
			return nil, "", err
		}
		if _, err = node.SaveKey(path, k, false); err != nil {
			return nil, "", err
		}
	}
	if err != nil {
		return nil, "", fmt.Errorf("user wallet: %w", err)
	}
	id, err := peer.IDFromPrivateKey(k)
	return k, id, err
}

// waitSettled waits until the gating node's settlements have been applied:
// its nonce on the chain stops short of nothing it sent.
func waitSettled(ctx context.Context, nw *Network) error {
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

// waitVerdicts waits until the gating node has no check in flight and no
// verdict queued or being reported (a check's calls end within its
// timeout, so within a minute).
func waitVerdicts(ctx context.Context, nw *Network) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	gating := nw.Processes()[0]
	for {
		st, err := node.FetchStatus(ctx, gating.APIAddr)
		checking := st.Gating != nil && st.Gating.Validation != nil && st.Gating.Validation.InFlight > 0
		if err == nil && !checking && (st.Verdicts == nil || st.Verdicts.Pending == 0) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("checks or verdicts still in flight: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitBlocks waits until the chain has committed n more blocks.
func waitBlocks(ctx context.Context, nw *Network, n int64) error {
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
