package ledger

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/neuro-p2p/neuro/neuropb"
)

// apply decodes and applies one of a's transactions to st, returning the
// chain's error code (0: applied).
func applyTx(t *testing.T, st *State, a *actor, body func(*neuropb.LedgerTx)) uint32 {
	t.Helper()
	tx, err := DecodeTx(a.tx(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Apply(tx); err != nil {
		a.nonce-- // refused: the nonce is free again
		var te *TxError
		if !errors.As(err, &te) {
			t.Fatalf("apply: %v is no TxError", err)
		}
		return te.Code
	}
	if st.Supply() != st.Held() {
		t.Fatalf("supply %d, held %d", st.Supply(), st.Held())
	}
	return 0
}

// An account allows a gating node to draw on it; only that gating node,
// only up to the allowance, opens escrows from it; closing an escrow
// returns its rest to the payer at once.
func TestAllowanceOpensEscrowsForTheGatingNodeOnly(t *testing.T) {
	actors := newActors(t, 4, rand.New(rand.NewPCG(7, 11)))
	user, gating, ex, stranger := actors[0], actors[1], actors[2], actors[3]
	g := genesisFor([]*actor{gating, ex, stranger})
	g.Accounts = append(g.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(user.id), Balance: 100 * BaseUnits})
	st, err := NewState(g)
	if err != nil {
		t.Fatal(err)
	}
	m := testModel().Bytes()
	open := func(by *actor, amount uint64) (uint32, uint64) {
		code := applyTx(t, st, by, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: m, Gating: []byte(gating.id), Amount: amount, Payer: []byte(user.id)}}
		})
		return code, EscrowID(by.id, by.nonce)
	}
	allow := func(amount uint64) uint32 {
		return applyTx(t, st, user, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Allow{Allow: &neuropb.Allow{Spender: []byte(gating.id), Amount: amount}}
		})
	}
	if code, _ := open(gating, BaseUnits); code != CodeNotAllowed {
		t.Fatalf("escrow without an allowance: code %d, want %d", code, CodeNotAllowed)
	}
	if code := allow(50 * BaseUnits); code != 0 {
		t.Fatalf("allow: code %d", code)
	}
	if got := statusOf(st, st.Held(), "c", user.id).GetAllowances(); len(got) != 1 || got[0].GetAmount() != 50*BaseUnits {
		t.Fatalf("status allowances %v", got)
	}
	if code, _ := open(stranger, BaseUnits); code != CodeNotAllowed {
		t.Fatalf("escrow from another account by a node that is not its gating node: code %d", code)
	}
	if code, _ := open(gating, 60*BaseUnits); code != CodeNotAllowed {
		t.Fatalf("escrow over the allowance: code %d", code)
	}
	code, id := open(gating, 30*BaseUnits)
	if code != 0 {
		t.Fatalf("escrow within the allowance: code %d", code)
	}
	if e := st.Escrows[id]; e == nil || e.Payer != user.id.String() || e.Remaining != 30*BaseUnits {
		t.Fatalf("escrow %+v", st.Escrows[id])
	}
	u := st.Accounts[user.id.String()]
	if u.Balance != 70*BaseUnits || u.Allowances[gating.id.String()] != 20*BaseUnits || !st.Escrows[id].Drawn {
		t.Fatalf("user after the escrow: balance %d, allowance %d", u.Balance, u.Allowances[gating.id.String()])
	}
	// Settle one receipt and close: the expert is paid, the rest returns.
	r := &neuropb.UsageReceipt{Escrow: id, Layer: 1, ExpertIndex: 2, Tokens: 10, Flops: 5_000_000_000}
	if err := SignReceipt(ex.key, r); err != nil {
		t.Fatal(err)
	}
	before := st.Accounts[ex.id.String()].Balance
	if code := applyTx(t, st, gating, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: id, Receipts: []*neuropb.UsageReceipt{r}, Close: true}}
	}); code != 0 {
		t.Fatalf("settle and close: code %d", code)
	}
	fee := uint64(5000) // 5,000 MFLOP at 1 base unit each
	if st.Escrows[id] != nil {
		t.Fatal("a closed escrow is still open")
	}
	if got := st.Accounts[user.id.String()].Balance; got != 100*BaseUnits-fee {
		t.Fatalf("user balance after close %d, want %d", got, 100*BaseUnits-fee)
	}
	if st.Accounts[ex.id.String()].Balance <= before {
		t.Fatal("the expert was not paid")
	}
	// Closing with no receipts refunds everything; a closed escrow is gone.
	_, id2 := open(gating, 10*BaseUnits)
	if code := applyTx(t, st, stranger, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: id2, Close: true}}
	}); code != CodeNotAllowed {
		t.Fatalf("close by another node: code %d", code)
	}
	if code := applyTx(t, st, gating, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: id2, Close: true}}
	}); code != 0 || st.Escrows[id2] != nil {
		t.Fatalf("close without receipts: code %d", code)
	}
	if code := applyTx(t, st, gating, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: id2}}
	}); code == 0 {
		t.Fatal("settling nothing without closing was applied")
	}
	// What a closed escrow returns goes back to the allowance too: 50
	// allowed, 5,000 base units kept by the first escrow's settlement.
	if got := st.Accounts[user.id.String()].Allowances[gating.id.String()]; got != 50*BaseUnits-fee {
		t.Fatalf("allowance left %d, want %d (what was drawn and not kept returns)", got, 50*BaseUnits-fee)
	}
	// An escrow that expires returns to the balance and the allowance.
	allowed := st.Accounts[user.id.String()].Allowances[gating.id.String()]
	balance := st.Accounts[user.id.String()].Balance
	_, id3 := open(gating, 3*BaseUnits)
	if st.Accounts[user.id.String()].Allowances[gating.id.String()] != allowed-3*BaseUnits {
		t.Fatal("an escrow did not draw on the allowance")
	}
	st.EndBlock(st.Escrows[id3].Expires)
	if u := st.Accounts[user.id.String()]; st.Escrows[id3] != nil || u.Balance != balance || u.Allowances[gating.id.String()] != allowed {
		t.Fatalf("after expiry: escrow %v, balance %d (want %d), allowance %d (want %d)", st.Escrows[id3], u.Balance, balance,
			u.Allowances[gating.id.String()], allowed)
	}
	// Revoking ends it.
	if code := allow(0); code != 0 || st.Accounts[user.id.String()].Allowances != nil {
		t.Fatalf("revoke: code %d, allowances %v", code, st.Accounts[user.id.String()].Allowances)
	}
	if code, _ := open(gating, 1); code != CodeNotAllowed {
		t.Fatalf("escrow after the revocation: code %d", code)
	}
	if code := applyTx(t, st, user, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Allow{Allow: &neuropb.Allow{Spender: []byte(user.id), Amount: 1}}
	}); code != CodeMalformed {
		t.Fatalf("allowing oneself: code %d", code)
	}
}

// Genesis may hold allowances (the testnet's accounts allow its gating
// node), and the state round-trips them.
func TestGenesisAllowances(t *testing.T) {
	actors := newActors(t, 2, rand.New(rand.NewPCG(3, 5)))
	g := genesisFor(actors)
	g.Accounts[0].Allowances = []*neuropb.Allow{{Spender: []byte(actors[1].id), Amount: 7}}
	st, err := NewState(g)
	if err != nil {
		t.Fatal(err)
	}
	c := st.Clone()
	if got := c.Accounts[actors[0].id.String()].Allowances[actors[1].id.String()]; got != 7 {
		t.Fatalf("allowance after a round trip %d", got)
	}
	g.Accounts[0].Allowances[0].Spender = []byte("junk")
	if _, err := NewState(g); err == nil {
		t.Fatal("a genesis allowance to a malformed peer was accepted")
	}
}
