package ledger

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	abci "github.com/cometbft/cometbft/abci/types"
	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
)

type actor struct {
	key   crypto.PrivKey
	id    peer.ID
	nonce uint64
}

func newActors(t testing.TB, n int, rng *rand.Rand) []*actor {
	out := make([]*actor, n)
	for i := range out {
		seed := make([]byte, 32)
		for j := range seed {
			seed[j] = byte(rng.Uint32())
		}
		k, _, err := crypto.GenerateEd25519Key(bytes.NewReader(seed))
		if err != nil {
			t.Fatal(err)
		}
		id, _ := peer.IDFromPrivateKey(k)
		out[i] = &actor{key: k, id: id}
	}
	return out
}

func (a *actor) tx(t testing.TB, body func(*neuropb.LedgerTx)) []byte {
	t.Helper()
	a.nonce++
	tx := &neuropb.LedgerTx{Nonce: a.nonce}
	body(tx)
	if err := SignTx(a.key, tx); err != nil {
		t.Fatal(err)
	}
	b, err := EncodeTx(tx)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testModel() cid.Cid {
	mh, _ := multihash.Sum([]byte("model"), multihash.SHA2_256, -1)
	return cid.NewCidV1(cid.Raw, mh)
}

func genesisFor(actors []*actor) *neuropb.LedgerGenesis {
	g := &neuropb.LedgerGenesis{Params: DefaultParams(), Models: [][]byte{testModel().Bytes()}}
	g.Params.EpochBlocks, g.Params.UnbondingBlocks, g.Params.VotingBlocks, g.Params.EscrowBlocks = 10, 5, 5, 30
	for _, a := range actors {
		g.Accounts = append(g.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(a.id), Balance: 10_000 * BaseUnits, Stake: 200 * BaseUnits})
	}
	return g
}

// testVerdict is judge's verdict that accused's output for input was
// wrong, with accused's signed receipt for it when bound.
func testVerdict(t testing.TB, judge, accused *actor, input []float32, agreeing [2]peer.ID, bound bool) (*neuropb.Verdict, error) {
	t.Helper()
	wrong, right := make([]float32, len(input)), make([]float32, len(input))
	for i, x := range input {
		wrong[i], right[i] = x+1, 2*x+3
	}
	var receipt *neuropb.UsageReceipt
	if bound {
		receipt = &neuropb.UsageReceipt{Layer: 1, ExpertIndex: 1, Tokens: 1, InputDigest: neuropb.FloatsDigest(input),
			OutputDigest: neuropb.FloatsDigest(wrong)}
		if err := SignReceipt(accused.key, receipt); err != nil {
			t.Fatal(err)
		}
	}
	return reputation.NewVerdict(judge.key, reputation.Task{Model: testModel(), Layer: 1, Expert: 1, Input: input, N: 1},
		accused.id, wrong, agreeing, right, receipt, time.Unix(0, 0))
}

// block runs one block through every app and checks they agree.
func block(t testing.TB, apps []*App, h int64, txs [][]byte) []*abci.ExecTxResult {
	t.Helper()
	var hash []byte
	var results []*abci.ExecTxResult
	for i, a := range apps {
		resp, err := a.FinalizeBlock(context.Background(), &abci.FinalizeBlockRequest{Height: h, Txs: txs})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Commit(context.Background(), &abci.CommitRequest{}); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			hash, results = resp.AppHash, resp.TxResults
		} else if !bytes.Equal(hash, resp.AppHash) {
			t.Fatalf("height %d: app %d hash %x, app 0 %x", h, i, resp.AppHash, hash)
		}
	}
	return results
}

// A randomized workload of every transaction type, valid and not, across
// four replicas of the application: every block gives the same app hash
// everywhere, and the supply invariant holds after every block.
func TestRandomWorkloadKeepsSupplyAndAgreement(t *testing.T) {
	t.Parallel() // beside the chains' tests, which mostly wait for blocks
	rng := rand.New(rand.NewPCG(7, 11))
	actors := newActors(t, 8, rng)
	g := genesisFor(actors)
	var apps []*App
	for range 4 {
		a, err := NewApp("", g)
		if err != nil {
			t.Fatal(err)
		}
		a.AfterBlock = func(s *State) {
			if err := s.CheckInvariant(); err != nil {
				t.Fatal(err)
			}
		}
		apps = append(apps, a)
	}
	judge := actors[0]
	counts := map[uint32]int{}
	applied := 0
	const blocks, perBlock = 120, 25
	for h := int64(1); h <= blocks; h++ {
		var txs [][]byte
		for range perBlock {
			a := actors[rng.IntN(len(actors))]
			other := actors[rng.IntN(len(actors))]
			amt := uint64(rng.IntN(500)+1) * BaseUnits / 10
			switch k := rng.IntN(12); k {
			case 0, 1:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(other.id), Amount: amt}}
				}))
			case 2:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) { tx.Body = &neuropb.LedgerTx_Stake{Stake: &neuropb.Stake{Amount: amt}} }))
			case 3:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Unstake{Unstake: &neuropb.Unstake{Amount: amt / 4}}
				}))
			case 4:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: testModel().Bytes(), Gating: []byte(other.id), Amount: amt}}
				}))
			case 5, 6:
				// Settle an escrow opened earlier, by its gating node, with
				// receipts from random experts.
				s := apps[0].State()
				if len(s.Escrows) == 0 {
					continue
				}
				ids := sortedKeys(s.Escrows)
				eid := ids[rng.IntN(len(ids))]
				var gating *actor
				for _, x := range actors {
					if x.id.String() == s.Escrows[eid].Gating {
						gating = x
					}
				}
				var receipts []*neuropb.UsageReceipt
				for range rng.IntN(4) + 1 {
					ex := actors[rng.IntN(len(actors))]
					r := &neuropb.UsageReceipt{Escrow: eid, Layer: 1, ExpertIndex: 2, Tokens: 16, Flops: uint64(rng.IntN(1e9) + 1)}
					if err := SignReceipt(ex.key, r); err != nil {
						t.Fatal(err)
					}
					receipts = append(receipts, r)
				}
				closing := rng.IntN(3) == 0 // the gating node ends it, and the rest returns
				txs = append(txs, gating.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: eid, Receipts: receipts, Close: closing}}
				}))
			case 7:
				// A slash on a verdict the staked judge signed.
				v, err := testVerdict(t, judge, other, []float32{float32(h), float32(rng.IntN(1000))}, [2]peer.ID{judge.id, a.id}, true)
				if err != nil || other == judge || other == a {
					continue
				}
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) { tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: v}} }))
			case 8:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Propose{Propose: &neuropb.Propose{Change: &neuropb.Propose_AddModel{AddModel: testModel().Bytes()}}}
				}))
			case 9:
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Vote{Vote: &neuropb.Vote{Proposal: uint64(rng.IntN(5) + 1), Yes: rng.IntN(2) == 0}}
				}))
			case 10:
				// a lets other (a gating node) draw on it.
				txs = append(txs, a.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_Allow{Allow: &neuropb.Allow{Spender: []byte(other.id), Amount: amt * 2}}
				}))
			case 11:
				// other opens an escrow from a's account on a's allowance
				// (refused when there is none, or too little).
				txs = append(txs, other.tx(t, func(tx *neuropb.LedgerTx) {
					tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: testModel().Bytes(), Gating: []byte(other.id),
						Amount: amt, Payer: []byte(a.id)}}
				}))
			}
		}
		for _, r := range block(t, apps, h, txs) {
			counts[r.Code]++
			if r.Code == 0 {
				applied++
			}
		}
		// A refused transaction does not use its nonce, so a sender's later
		// ones in the block fail too: resync every actor with the chain.
		s := apps[0].State()
		for _, a := range actors {
			if acc := s.Accounts[a.id.String()]; acc != nil {
				a.nonce = acc.Nonce
			}
		}
	}
	s := apps[0].State()
	t.Logf("%d blocks, %d transactions applied; result codes %v; treasury %d, burned %d, emitted %d",
		blocks, applied, counts, s.Treasury, s.Burned, s.Emitted)
	if applied < blocks*perBlock/3 || s.Burned == 0 || s.Emitted == 0 || s.Treasury == 0 {
		t.Fatalf("the workload exercised too little: %d applied, %+v", applied, counts)
	}
}

// The same account sends two conflicting transfers with the same nonce:
// exactly one is applied, whichever comes first.
func TestDoubleSpend(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	actors := newActors(t, 3, rng)
	app, err := NewApp("", genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	a := actors[0]
	all := uint64(10_000 * BaseUnits)
	t1 := a.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: all}}
	})
	a.nonce--
	t2 := a.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[2].id), Amount: all}}
	})
	// Both pass CheckTx on two different validators' mempools...
	other, _ := NewApp("", genesisFor(actors))
	for i, pair := range []struct {
		app *App
		tx  []byte
	}{{app, t1}, {other, t2}} {
		r, _ := pair.app.CheckTx(context.Background(), &abci.CheckTxRequest{Tx: pair.tx})
		if r.Code != 0 {
			t.Fatalf("tx %d refused by its validator's mempool: %s", i, r.Log)
		}
	}
	// ...and the block that orders them applies the first only.
	res := block(t, []*App{app, other}, 1, [][]byte{t2, t1})
	if res[0].Code != 0 || res[1].Code != CodeBadNonce {
		t.Fatalf("results %v", res)
	}
	s := app.State()
	if s.Accounts[actors[2].id.String()].Balance != 2*all || s.Accounts[actors[1].id.String()].Balance != all {
		t.Fatalf("balances after the double spend: %+v", s.Accounts)
	}
}

// An escrow settles until it expires; then what is left returns to its
// payer and a late settlement is refused.
func TestEscrowExpires(t *testing.T) {
	actors := newActors(t, 3, rand.New(rand.NewPCG(4, 4)))
	app, err := NewApp("", genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	payer, gating, ex := actors[0], actors[1], actors[2]
	open := payer.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: testModel().Bytes(), Gating: []byte(gating.id), Amount: 50 * BaseUnits}}
	})
	eid := EscrowID(payer.id, payer.nonce)
	settle := func() []byte {
		r := &neuropb.UsageReceipt{Escrow: eid, Layer: 1, Tokens: 4, Flops: 3_000_000_000}
		if err := SignReceipt(ex.key, r); err != nil {
			t.Fatal(err)
		}
		return gating.tx(t, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: eid, Receipts: []*neuropb.UsageReceipt{r}}}
		})
	}
	if res := block(t, []*App{app}, 1, [][]byte{open}); res[0].Code != 0 {
		t.Fatal(res[0].Log)
	}
	if res := block(t, []*App{app}, 2, [][]byte{settle()}); res[0].Code != 0 {
		t.Fatal(res[0].Log)
	}
	s := app.State()
	left, before := s.Escrows[eid].Remaining, s.Accounts[payer.id.String()].Balance
	if left != 50*BaseUnits-3000 || s.Escrows[eid].Expires != 31 {
		t.Fatalf("escrow %+v", s.Escrows[eid])
	}
	for h := int64(3); h <= 31; h++ {
		block(t, []*App{app}, h, nil)
	}
	s = app.State()
	if s.Escrows[eid] != nil || s.Accounts[payer.id.String()].Balance != before+left {
		t.Fatalf("after expiry: escrow %+v, payer balance %d (want %d)", s.Escrows[eid], s.Accounts[payer.id.String()].Balance, before+left)
	}
	if err := s.CheckInvariant(); err != nil {
		t.Fatal(err)
	}
	if res := block(t, []*App{app}, 32, [][]byte{settle()}); res[0].Code != CodeUnknown {
		t.Fatalf("settlement after expiry: code %d %s", res[0].Code, res[0].Log)
	}
}

// Bad transactions are refused by CheckTx with a clear code and log, and
// never change the state.
func TestBadTransactions(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	actors := newActors(t, 3, rng)
	g := genesisFor(actors)
	stranger := newActors(t, 1, rng)[0]
	app, err := NewApp("", g)
	if err != nil {
		t.Fatal(err)
	}
	a := actors[0]
	signed := func(who *actor, nonce uint64, body func(*neuropb.LedgerTx)) []byte {
		who.nonce = nonce - 1
		return who.tx(t, body)
	}
	transfer := func(amt uint64) func(*neuropb.LedgerTx) {
		return func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: amt}}
		}
	}
	badSig := signed(a, 1, transfer(1))
	badSig[len(badSig)-1] ^= 1
	forged, _ := testVerdict(t, stranger, actors[1], []float32{1, 2}, [2]peer.ID{a.id, actors[2].id}, true)
	unbound, _ := testVerdict(t, actors[2], actors[1], []float32{1, 2}, [2]peer.ID{a.id, actors[2].id}, false)
	cases := []struct {
		name string
		tx   []byte
		code uint32
		log  string
	}{
		{"bad signature", badSig, CodeBadSignature, "bad signature"},
		{"wrong nonce", signed(a, 5, transfer(1)), CodeBadNonce, "nonce 5, want 1"},
		{"overdraft", signed(a, 1, transfer(20_000*BaseUnits)), CodeInsufficient, "balance of"},
		{"unstake more than staked", signed(a, 1, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Unstake{Unstake: &neuropb.Unstake{Amount: 300 * BaseUnits}}
		}), CodeInsufficient, "with a stake of"},
		{"slash without valid evidence", signed(a, 1, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: &neuropb.Verdict{Model: []byte("x")}}}
		}), CodeBadEvidence, "evidence"},
		{"slash by an unstaked judge", signed(a, 1, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: forged}}
		}), CodeBadEvidence, "is not staked"},
		{"slash without the accused's receipt", signed(a, 1, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: unbound}}
		}), CodeBadEvidence, "no receipt of the accused"},
		{"vote from a non-staker", signed(stranger, 1, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Vote{Vote: &neuropb.Vote{Proposal: 1, Yes: true}}
		}), CodeUnknown, "no open proposal"},
		{"escrow for an unknown model", signed(a, 1, func(tx *neuropb.LedgerTx) {
			mh, _ := multihash.Sum([]byte("other"), multihash.SHA2_256, -1)
			tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: cid.NewCidV1(cid.Raw, mh).Bytes(), Gating: []byte(a.id), Amount: 1}}
		}), CodeNotAllowed, "not on the ledger"},
		{"malformed", []byte{0xff, 0xff, 0xff}, CodeMalformed, "malformed"},
		{"oversized", make([]byte, neuropb.MaxLedgerTxSize+1), CodeMalformed, "exceeds"},
	}
	before := app.State().Hash()
	for _, tc := range cases {
		r, err := app.CheckTx(context.Background(), &abci.CheckTxRequest{Tx: tc.tx})
		if err != nil || r.Code != tc.code || !strings.Contains(r.Log, tc.log) {
			t.Errorf("%s: code %d log %q, want %d with %q", tc.name, r.Code, r.Log, tc.code, tc.log)
		}
	}
	// Through a block as well: refused, state unchanged but for the height.
	var txs [][]byte
	for _, tc := range cases {
		txs = append(txs, tc.tx)
	}
	for i, r := range block(t, []*App{app}, 1, txs) {
		if r.Code == 0 {
			t.Errorf("%s applied in a block", cases[i].name)
		}
	}
	s := app.State()
	s.Height = 0
	if !bytes.Equal(s.Hash(), before) {
		t.Fatal("refused transactions changed the state")
	}
	// A vote by a non-staker on an open proposal is refused too.
	p := actors[1]
	p.nonce = 0
	block(t, []*App{app}, 2, [][]byte{p.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Propose{Propose: &neuropb.Propose{Change: &neuropb.Propose_AddModel{AddModel: testModel().Bytes()}}}
	})})
	stranger.nonce = 0
	r, _ := app.CheckTx(context.Background(), &abci.CheckTxRequest{Tx: stranger.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Vote{Vote: &neuropb.Vote{Proposal: 1, Yes: true}}
	})})
	if r.Code != CodeNotAllowed || !strings.Contains(r.Log, "only stakers vote") {
		t.Fatalf("non-staker vote: %d %s", r.Code, r.Log)
	}
}

// The committed state survives a restart: the app reopens at the same
// height and app hash, which CometBFT's handshake compares.
func TestStatePersists(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	actors := newActors(t, 2, rng)
	dir := t.TempDir()
	app, err := NewApp(dir, genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	for h := int64(1); h <= 3; h++ {
		block(t, []*App{app}, h, [][]byte{actors[0].tx(t, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: BaseUnits}}
		})})
	}
	info, _ := app.Info(context.Background(), &abci.InfoRequest{})
	again, err := NewApp(dir, genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	info2, _ := again.Info(context.Background(), &abci.InfoRequest{})
	if info2.LastBlockHeight != 3 || !bytes.Equal(info.LastBlockAppHash, info2.LastBlockAppHash) {
		t.Fatalf("reopened at %d %x, was %d %x", info2.LastBlockHeight, info2.LastBlockAppHash, info.LastBlockHeight, info.LastBlockAppHash)
	}
	if got := fmt.Sprint(again.State().Accounts[actors[1].id.String()].Balance); got != fmt.Sprint(10_003*BaseUnits) {
		t.Fatalf("balance after restart %s", got)
	}
}

// A genesis account whose balance plus stake overflows is refused (it
// used to wrap, and the supply with it).
func TestGenesisBalancePlusStakeOverflows(t *testing.T) {
	g := genesisFor(newActors(t, 1, rand.New(rand.NewPCG(1, 2))))
	g.Accounts[0].Balance, g.Accounts[0].Stake = math.MaxUint64-1, 5
	if _, err := NewState(g); err == nil || !strings.Contains(err.Error(), "overflows") {
		t.Fatalf("genesis of %d + %d: %v", g.Accounts[0].Balance, g.Accounts[0].Stake, err)
	}
}
