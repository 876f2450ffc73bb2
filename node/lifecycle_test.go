package node

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/neuropb"
)

// A node with every service (expert hosting, gating, verdicts, a ledger it
// validates and the settler) starts them in order and, once closed, leaves
// no goroutine of any neuro package behind. A gating node without a
// compute backend is refused at New.
func TestNodeCloseLeavesNoGoroutine(t *testing.T) {
	home := t.TempDir()
	if _, err := Init(home, false); err != nil {
		t.Fatal(err)
	}
	key, err := LoadIdentity(home)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(key)
	genesis := filepath.Join(t.TempDir(), "genesis.json")
	if err := ledger.WriteGenesis(genesis, ledger.ChainGenesis{ChainID: "neuro-node-life", Time: time.Unix(1_700_000_000, 0).UTC(),
		Ledger: &neuropb.LedgerGenesis{Params: ledger.DefaultParams(), Accounts: []*neuropb.LedgerGenesis_Account{
			{Peer: []byte(id), Balance: 1000, Stake: 100}}},
		Validators: []ledger.Validator{{Peer: id, Power: 10}}}); err != nil {
		t.Fatal(err)
	}
	mh, _ := multihash.Sum([]byte("a model no peer has"), multihash.SHA2_256, -1)
	cfg := DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.P2P.NAT.PortMap, cfg.P2P.NAT.AutoNAT, cfg.P2P.NAT.RelayService = false, false, "off"
	cfg.API.Listen = "127.0.0.1:0"
	cfg.HTTP.Listen = "127.0.0.1:0"
	cfg.Expert.Model = cid.NewCidV1(cid.Raw, mh).String()
	cfg.Gating.Enabled = true
	cfg.Ledger.Genesis = genesis
	cfg.Ledger.Listen = "tcp://127.0.0.1:0"
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := New(cfg, WithHome(home), WithLogger(log)); err == nil {
		t.Fatal("a gating node without a compute backend was built")
	}

	snap := leaktest.Take(leakPkgs...)
	n, err := New(cfg, WithHome(home), WithLogger(log), WithCompute(moetest.Backend{}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for n.Ledger().Height() < 1 {
		select {
		case <-ctx.Done():
			t.Fatal("no block")
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	snap.Check(t)
}

var leakPkgs = []string{
	"github.com/neuro-p2p/neuro/node", "github.com/neuro-p2p/neuro/p2p", "github.com/neuro-p2p/neuro/expert",
	"github.com/neuro-p2p/neuro/gating", "github.com/neuro-p2p/neuro/ledger", "github.com/neuro-p2p/neuro/verdict",
	"github.com/neuro-p2p/neuro/reputation", "github.com/neuro-p2p/neuro/metrics",
}
