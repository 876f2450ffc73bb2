package gating

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
)

// Receipts are checked off the caller's path and Take waits for the
// checks: it returns exactly the valid receipts of the escrow's experts,
// and drops what comes after it.
func TestReceiptsAreCheckedBeforeTake(t *testing.T) {
	key, _, _ := crypto.GenerateEd25519Key(nil)
	other, _, _ := crypto.GenerateEd25519Key(nil)
	p, _ := peer.IDFromPrivateKey(key)
	q, _ := peer.IDFromPrivateKey(other)
	signed := func(k crypto.PrivKey, escrow uint64, flops uint64) *neuropb.UsageReceipt {
		r := &neuropb.UsageReceipt{Escrow: escrow, Layer: 1, Tokens: 1, Flops: flops}
		if err := reputation.SignReceipt(k, r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	rs := &Receipts{Escrow: 7}
	good := signed(key, 7, 1)
	tampered := signed(key, 7, 2)
	tampered.Flops = 3
	rs.add(good, p)
	rs.add(signed(key, 8, 4), p)   // another escrow
	rs.add(signed(other, 7, 5), p) // signed by someone else than the answering peer
	rs.add(tampered, p)
	rs.add(nil, p)
	for range 50 {
		rs.add(signed(other, 7, 10), q)
	}
	got := rs.Take()
	var flops uint64
	for _, r := range got {
		flops += r.GetFlops()
	}
	if len(got) != 51 || flops != 501 {
		t.Fatalf("took %d receipts of %d FLOPs, want 51 of 501", len(got), flops)
	}
	rs.add(signed(key, 7, 1), p)
	if late := rs.Take(); len(late) != 0 {
		t.Fatalf("a receipt added after Take was kept: %v", late)
	}
}

// A generation's expert calls return without waiting for the expert
// node's signature (the receipts come after the answers), and Take still
// gets every answer's receipt, signed, once they come; receipts that never
// come leave Take after lateReceiptWait, without them.
func TestLateReceiptsAreWaitedForAtTheEnd(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	rng := rand.New(rand.NewPCG(3, 4))
	for _, signs := range []bool{true, false} {
		hold := make(chan struct{})
		bn := newBatchNetSigning(t, ctx, hold)
		t.Cleanup(func() {
			if !signs {
				close(hold) // before the node closes
			}
		})
		gen := NewGeneration(42)
		lt := bn.task(rng, 3)
		if _, err := bn.remote.moe(ctx, gen, false, 0, lt.x, lt.n, lt.selected, lt.weights); err != nil {
			t.Fatalf("a layer whose answers' receipts are not yet signed: %v", err)
		}
		bn.remote.InlineReceipts = true // a span node's
		if bn.remote.lateReceipts() {
			t.Fatal("receipts late for a span node")
		}
		bn.remote.InlineReceipts = false
		want := 0
		if signs {
			close(hold) // the node signs now
			want = len(moe.Route(lt.selected).Experts)
		}
		rs := gen.Receipts.Take()
		if len(rs) != want {
			t.Fatalf("signed %v: %d receipts, want %d", signs, len(rs), want)
		}
		for _, r := range rs {
			if r.GetEscrow() != 42 || len(r.GetSignature()) == 0 {
				t.Fatalf("receipt %v", r)
			}
		}
	}
}
