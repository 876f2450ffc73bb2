package ledger

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
)

// A span node's wrong answer is slashed as an expert's is: the verdict on
// its span request carries its span receipt, which signs the request's
// rows after the digest chain of the session's earlier rows. The same
// verdict slashes once; a receipt of the rows in another session (another
// chain) does not bind the accused, and the chain refuses it.
func TestSlashOnASpanVerdict(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	actors := newActors(t, 3, rng)
	judge, accused, reporter := actors[0], actors[1], actors[2]
	app, err := NewApp("", genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	const embd = 2
	history := []float32{1, 2, 3, 4, 5, 6}
	in := []float32{0.5, 1.5}
	wrong, right := []float32{9, 9}, []float32{1, 2}
	verdict := func(prior neuropb.SpanChain) *neuropb.Verdict {
		rc := &neuropb.UsageReceipt{Layer: 0, SpanEnd: 4, Tokens: 1, Escrow: 1,
			InputDigest: neuropb.SpanRequestDigest(prior, neuropb.SpanWant_SPAN_WANT_ALL, prior.Next(in, embd)), OutputDigest: neuropb.FloatsDigest(wrong)}
		if err := SignReceipt(accused.key, rc); err != nil {
			t.Fatal(err)
		}
		real := neuropb.SpanChainStart().Next(history, embd)
		v, err := reputation.NewVerdict(judge.key, reputation.Task{Model: testModel(), Layer: 0, Input: in, N: 1,
			Span: &reputation.SpanTask{End: 4, Prior: real, History: history}}, accused.id, wrong, [2]peer.ID{judge.id, reporter.id}, right, rc, time.Unix(0, 0))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	bound := verdict(neuropb.SpanChainStart().Next(history, embd))
	otherSession := verdict(neuropb.SpanChainStart())
	slash := func(v *neuropb.Verdict) []byte {
		return reporter.tx(t, func(tx *neuropb.LedgerTx) { tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: v}} })
	}
	stake := func() uint64 { return app.State().Accounts[accused.id.String()].Staked }
	before := stake()
	res := block(t, []*App{app}, 1, [][]byte{slash(otherSession)})
	if res[0].Code != CodeBadEvidence || stake() != before {
		t.Fatalf("a receipt of another session's request: code %d (%s), stake %d -> %d", res[0].Code, res[0].Log, before, stake())
	}
	reporter.nonce = app.State().Accounts[reporter.id.String()].Nonce
	res = block(t, []*App{app}, 2, [][]byte{slash(bound), slash(bound)})
	if res[0].Code != 0 || stake() >= before {
		t.Fatalf("the span verdict: code %d (%s), stake %d -> %d", res[0].Code, res[0].Log, before, stake())
	}
	if res[1].Code != CodeBadEvidence {
		t.Fatalf("the same verdict again: code %d (%s)", res[1].Code, res[1].Log)
	}
}

// A settlement pays the receipts of experts that hold the minimum stake
// and passes over those of one that does not (a liar slashed during the
// generation whose answers it signed): the others are paid all the same,
// and its share stays in the escrow. A settlement of such receipts alone
// is refused, unless it closes the escrow.
func TestSettlementPassesOverTheUnstaked(t *testing.T) {
	actors := newActors(t, 5, rand.New(rand.NewPCG(8, 8)))
	g := genesisFor(actors)
	g.Accounts[4].Stake = 0 // the liar, slashed below the minimum
	app, err := NewApp("", g)
	if err != nil {
		t.Fatal(err)
	}
	payer, gating, honest, liar := actors[0], actors[1], actors[2], actors[4]
	open := payer.tx(t, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: testModel().Bytes(), Gating: []byte(gating.id), Amount: 50 * BaseUnits}}
	})
	eid := EscrowID(payer.id, payer.nonce)
	receipt := func(who *actor) *neuropb.UsageReceipt {
		r := &neuropb.UsageReceipt{Escrow: eid, Layer: 1, Tokens: 4, Flops: 3_000_000_000}
		if err := SignReceipt(who.key, r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	settle := func(close bool, rs ...*neuropb.UsageReceipt) []byte {
		return gating.tx(t, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: eid, Receipts: rs, Close: close}}
		})
	}
	if res := block(t, []*App{app}, 1, [][]byte{open}); res[0].Code != 0 {
		t.Fatal(res[0].Log)
	}
	balance := func(a *actor) uint64 { return app.State().Accounts[a.id.String()].Balance }
	honestBefore, liarBefore := balance(honest), balance(liar)
	if res := block(t, []*App{app}, 2, [][]byte{settle(false, receipt(honest), receipt(liar))}); res[0].Code != 0 {
		t.Fatalf("settlement with one unstaked expert: %s", res[0].Log)
	}
	s := app.State()
	// The fee of the honest receipt alone: 3,000 base units.
	if balance(honest) <= honestBefore || balance(liar) != liarBefore || s.Escrows[eid].Remaining != 50*BaseUnits-3000 {
		t.Fatalf("honest %d -> %d, liar %d -> %d, escrow left %d", honestBefore, balance(honest), liarBefore, balance(liar), s.Escrows[eid].Remaining)
	}
	gating.nonce = s.Accounts[gating.id.String()].Nonce
	if res := block(t, []*App{app}, 3, [][]byte{settle(false, receipt(liar))}); res[0].Code != CodeNotAllowed {
		t.Fatalf("the liar's receipts alone: code %d %s", res[0].Code, res[0].Log)
	}
	gating.nonce = app.State().Accounts[gating.id.String()].Nonce
	payerBefore := balance(payer)
	if res := block(t, []*App{app}, 4, [][]byte{settle(true, receipt(liar))}); res[0].Code != 0 {
		t.Fatalf("closing with the liar's receipts alone: %s", res[0].Log)
	}
	if s := app.State(); s.Escrows[eid] != nil || balance(payer) != payerBefore+50*BaseUnits-3000 || balance(liar) != liarBefore {
		t.Fatalf("after closing: escrow %+v, payer %d -> %d", s.Escrows[eid], payerBefore, balance(payer))
	}
	if err := app.State().CheckInvariant(); err != nil {
		t.Fatal(err)
	}
}
