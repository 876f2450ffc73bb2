package node

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/neuropb"
)

// A gating node that validates its own one-node chain, an account that
// allows it 50 NEURO, and an expert's key with the minimum stake.
func paymentNode(t *testing.T) (n *Node, account, ex crypto.PrivKey, model cid.Cid) {
	t.Helper()
	home := t.TempDir()
	if _, err := Init(home, false); err != nil {
		t.Fatal(err)
	}
	key, err := LoadIdentity(home)
	if err != nil {
		t.Fatal(err)
	}
	self, _ := peer.IDFromPrivateKey(key)
	account, _, _ = crypto.GenerateEd25519Key(nil)
	ex, _, _ = crypto.GenerateEd25519Key(nil)
	aid, _ := peer.IDFromPrivateKey(account)
	eid, _ := peer.IDFromPrivateKey(ex)
	mh, _ := multihash.Sum([]byte("a paid model"), multihash.SHA2_256, -1)
	model = cid.NewCidV1(cid.Raw, mh)
	genesis := filepath.Join(t.TempDir(), "genesis.json")
	params := ledger.DefaultParams()
	if err := ledger.WriteGenesis(genesis, ledger.ChainGenesis{ChainID: "neuro-pay", Time: time.Unix(1_700_000_000, 0).UTC(),
		Ledger: &neuropb.LedgerGenesis{Params: params, Models: [][]byte{model.Bytes()}, Accounts: []*neuropb.LedgerGenesis_Account{
			{Peer: []byte(self), Balance: 1000 * ledger.BaseUnits, Stake: 100 * ledger.BaseUnits},
			{Peer: []byte(aid), Balance: 100 * ledger.BaseUnits, Allowances: []*neuropb.Allow{{Spender: []byte(self), Amount: 50 * ledger.BaseUnits}}},
			{Peer: []byte(eid), Stake: params.GetMinStake()}}},
		Validators: []ledger.Validator{{Peer: self, Power: 10}}}); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.P2P.NAT.PortMap, cfg.P2P.NAT.AutoNAT, cfg.P2P.NAT.RelayService = false, false, "off"
	cfg.API.Listen = "127.0.0.1:0"
	cfg.Expert.Model = model.String()
	cfg.Gating.Enabled = true
	cfg.Ledger.Genesis = genesis
	cfg.Ledger.Listen = "tcp://127.0.0.1:0"
	cfg.Ledger.BlockInterval = Duration(100 * time.Millisecond)
	n, err = New(cfg, WithHome(home), WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))), WithCompute(moetest.Backend{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	for n.Ledger().Height() < 2 { // a signed header proves the state
		select {
		case <-t.Context().Done():
			t.Fatal("no block")
		case <-time.After(20 * time.Millisecond):
		}
	}
	return n, account, ex, model
}

func balance(t *testing.T, n *Node, p peer.ID) uint64 {
	t.Helper()
	st, err := n.ledger.Status(t.Context(), p)
	if err != nil {
		t.Fatal(err)
	}
	return st.GetBalance()
}

// An API key's requests: the gating node opens a tab (an escrow for
// several requests' most) from the key's account on its allowance, the
// expert's call is accepted against it (and refused without it, or for
// another gating node, or for more than it holds), the receipts are
// settled from it, the key's next request uses the same tab, and once the
// tab is idle it is closed: the account pays exactly the reported costs,
// its allowance gets back what the tab did not use, and the key's
// spending records it.
func TestKeyBillPaysThroughAnEscrow(t *testing.T) {
	n, account, ex, model := paymentNode(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	aid, _ := peer.IDFromPrivateKey(account)
	self := n.p2p.ID()
	secret, k, err := n.pay.keys.Create(aid, 10*ledger.BaseUnits, 0)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, "http://x/v1/completions", nil)
	if _, refused := n.pay.Authorize(req); refused == nil || refused.Status != 401 {
		t.Fatalf("no key: %+v", refused)
	}
	req.Header.Set("Authorization", "Bearer "+secret)
	bill, refused := n.pay.Authorize(req)
	if refused != nil {
		t.Fatalf("authorize: %+v", refused)
	}
	before := balance(t, n, aid)
	const flopsPerToken = 50_000_000 // 50 base units a token at the default price
	escrow, err := bill.Open(ctx, gating.Charge{Model: model, PromptTokens: 10, MaxTokens: 90, FLOPsPerToken: flopsPerToken})
	if err != nil {
		t.Fatal(err)
	}
	e, _, err := n.ledger.Escrow(ctx, escrow)
	most := billing.MaxCost(10, 90, flopsPerToken, 1)
	if err != nil || e == nil || e.Payer != aid.String() || e.Gating != self.String() || e.Remaining != tabRequests*most || !e.Drawn {
		t.Fatalf("escrow %d: %+v %v (want %d from %s)", escrow, e, err, tabRequests*most, aid)
	}
	// The expert side: unpaid, someone else's, too big; then paid.
	other, _ := peer.Decode("12D3KooWKT1H7JGZua5ziofxNSDHw65BxX9JPum3vnsTGmnmGFQj")
	for _, tc := range []struct {
		from          peer.ID
		escrow, flops uint64
		want          string
	}{
		{self, 0, 1, "names no escrow"},
		{other, escrow, 1, "not the caller"},
		{self, escrow, tabRequests*most*1_000_000 + 1_000_000, "the call costs"},
		{self, 12345, 1, "no escrow 12345"},
	} {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		err := n.pay.expertPayment(cctx, tc.from, tc.escrow, tc.flops)
		ccancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("expert payment %+v: %v, want %q", tc, err, tc.want)
		}
	}
	const work = 30 * flopsPerToken // 30 tokens' work
	if err := n.pay.expertPayment(ctx, self, escrow, work); err != nil {
		t.Fatalf("a paid call: %v", err)
	}
	r := &neuropb.UsageReceipt{Escrow: escrow, Layer: 0, ExpertIndex: 1, Tokens: 30, Flops: work}
	if err := ledger.SignReceipt(ex, r); err != nil {
		t.Fatal(err)
	}
	n.settler.Submit(escrow, []*neuropb.UsageReceipt{r})
	cost := bill.Close(work)
	if cost != billing.Cost(work, 1) || cost == 0 {
		t.Fatalf("cost %d, want %d", cost, billing.Cost(work, 1))
	}
	// The key's next request pays from the same tab: no new escrow.
	again, refused := n.pay.Authorize(req)
	if refused != nil {
		t.Fatal(refused)
	}
	if id, err := again.Open(ctx, gating.Charge{Model: model, PromptTokens: 10, MaxTokens: 90, FLOPsPerToken: flopsPerToken}); err != nil || id != escrow {
		t.Fatalf("the second request: escrow %d %v, the tab is %d", id, err, escrow)
	}
	if again.Close(0) != 0 {
		t.Fatal("no work cost something")
	}
	held := func() (uint64, uint64) {
		st, err := n.ledger.Status(ctx, aid)
		if err != nil {
			t.Fatal(err)
		}
		return st.GetBalance(), st.GetEscrowed()
	}
	for b, e := held(); b+e != before-cost; b, e = held() {
		select {
		case <-ctx.Done():
			t.Fatalf("account balance %d + escrowed %d, want %d (before %d, cost %d)", b, e, before-cost, before, cost)
		case <-time.After(50 * time.Millisecond):
		}
	}
	// Idle, the tab closes: what it did not pay returns.
	n.pay.sweepTabs(time.Now().Add(tabIdle))
	for balance(t, n, aid) != before-cost {
		select {
		case <-ctx.Done():
			t.Fatalf("account balance %d, want %d (before %d, cost %d)", balance(t, n, aid), before-cost, before, cost)
		case <-time.After(50 * time.Millisecond):
		}
	}
	st, err := n.ledger.Status(ctx, aid)
	if err != nil || len(st.GetAllowances()) != 1 || st.GetAllowances()[0].GetAmount() != 50*ledger.BaseUnits-cost || st.GetEscrowed() != 0 {
		t.Fatalf("after the tab closed: %v %v", st, err)
	}
	for { // the proven state is a block behind the balance
		e, _, err := n.ledger.Escrow(ctx, escrow)
		if err == nil && e == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("escrow still open after its request: %+v", e)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if ks := n.pay.keys.List(); ks[0].ID != k.ID || ks[0].Spent != cost || ks[0].Reserved != 0 || ks[0].Requests != 2 {
		t.Fatalf("key after its request: %+v", ks[0])
	}
	// More than the allowance left (within the key's budget and the
	// account's balance) is refused before any transaction.
	rich, _, err := n.pay.keys.Create(aid, 1000*ledger.BaseUnits, 0)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+rich)
	big, refused := n.pay.Authorize(req)
	if refused != nil {
		t.Fatal(refused)
	}
	if _, err := big.Open(ctx, gating.Charge{Model: model, PromptTokens: 1, MaxTokens: 1, FLOPsPerToken: 15 * ledger.BaseUnits * 1_000_000}); err == nil ||
		!strings.Contains(err.Error(), "allows this gating node") {
		t.Fatalf("a request past the allowance: %v", err)
	}
}

// Over the infer protocol a request pays from the requester's own escrow
// only: naming someone else's is refused, and so is carrying an escrow
// transaction someone else signed or one for another gating node; the
// requester's own transaction is submitted, waited for and, once the
// request ends, closed.
func TestInferEscrowsAreTheRequesters(t *testing.T) {
	n, account, _, model := paymentNode(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	aid, _ := peer.IDFromPrivateKey(account)
	stranger, _ := peer.Decode("12D3KooWKT1H7JGZua5ziofxNSDHw65BxX9JPum3vnsTGmnmGFQj")
	self := n.p2p.ID()
	charge := gating.Charge{Model: model, PromptTokens: 4, MaxTokens: 4, FLOPsPerToken: 1_000_000}
	escrowTx := func(nonce uint64, gatingNode peer.ID, amount uint64) []byte {
		tx := &neuropb.LedgerTx{Nonce: nonce, Body: &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{
			Model: model.Bytes(), Gating: []byte(gatingNode), Amount: amount}}}
		if err := ledger.SignTx(account, tx); err != nil {
			t.Fatal(err)
		}
		raw, _ := ledger.EncodeTx(tx)
		return raw
	}
	req := func(escrow uint64, tx []byte) *neuropb.InferRequest {
		return &neuropb.InferRequest{Model: model.Bytes(), Prompt: "x", Escrow: escrow, EscrowTx: tx}
	}
	// Refused before anything is submitted.
	for _, tc := range []struct {
		from peer.ID
		r    *neuropb.InferRequest
		want string
	}{
		{stranger, req(0, escrowTx(1, self, 1000)), "not by the requesting peer"},
		{aid, req(0, escrowTx(1, stranger, 1000)), "not this one"},
		{aid, req(99, escrowTx(1, self, 1000)), "is not the one the transaction opens"},
		{aid, req(0, []byte("junk")), "escrow transaction"},
	} {
		if _, err := n.pay.Bill(ctx, tc.from, tc.r); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.want, err, tc.want)
		}
	}
	// Too small for the request's most: refused at Open.
	b, err := n.pay.Bill(ctx, aid, req(0, escrowTx(1, self, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Open(ctx, charge); err == nil || !strings.Contains(err.Error(), "cannot cover") {
		t.Fatalf("a small escrow: %v", err)
	}
	// The requester's own: submitted, applied, usable by it alone.
	most := billing.MaxCost(4, 4, 1_000_000, 1)
	b, err = n.pay.Bill(ctx, aid, req(0, escrowTx(1, self, most)))
	if err != nil {
		t.Fatal(err)
	}
	id, err := b.Open(ctx, charge)
	if err != nil || id != ledger.EscrowID(aid, 1) {
		t.Fatalf("open: %d %v", id, err)
	}
	named, err := n.pay.Bill(ctx, stranger, req(id, nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := named.Open(ctx, charge); err == nil || !strings.Contains(err.Error(), "not the requesting peer's") {
		t.Fatalf("someone else's escrow: %v", err)
	}
	mine, _ := n.pay.Bill(ctx, aid, req(id, nil))
	if got, err := mine.Open(ctx, charge); err != nil || got != id {
		t.Fatalf("the requester's own escrow by name: %d %v", got, err)
	}
	if b.Close(0) != 0 {
		t.Fatal("no work cost something")
	}
	for {
		e, _, err := n.ledger.Escrow(ctx, id)
		if err == nil && e == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the request's escrow was not closed")
		case <-time.After(50 * time.Millisecond):
		}
	}
	// Without payment, a node that requires it refuses.
	n.pay.require = true
	if _, err := n.pay.Bill(ctx, aid, req(0, nil)); err == nil || !strings.Contains(err.Error(), "requires payment") {
		t.Fatalf("an unpaid request: %v", err)
	}
}
