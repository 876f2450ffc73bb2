package gating

import (
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

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
