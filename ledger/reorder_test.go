package ledger

import (
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	abci "github.com/cometbft/cometbft/abci/types"

	"github.com/neuro-p2p/neuro/neuropb"
)

// A sender's transactions that reach a validator out of order over the
// topic all enter the mempool; one with a nonce that never comes is held
// only for a while, and the buffer is bounded.
func TestRelayReorders(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 8))
	actors := newActors(t, 2, rng)
	app, err := NewApp("", genesisFor(actors))
	if err != nil {
		t.Fatal(err)
	}
	var accepted []uint64
	submit := func(raw []byte) error {
		r, _ := app.CheckTx(context.Background(), &abci.CheckTxRequest{Tx: raw})
		if r.Code != 0 {
			return &TxError{Code: r.Code, Msg: r.Log}
		}
		tx, _ := DecodeTx(raw)
		accepted = append(accepted, tx.GetNonce())
		return nil
	}
	var txs []*neuropb.LedgerTx
	for range 20 {
		raw := actors[0].tx(t, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: 1}}
		})
		tx, _ := DecodeTx(raw)
		txs = append(txs, tx)
	}
	rng.Shuffle(len(txs), func(i, j int) { txs[i], txs[j] = txs[j], txs[i] })
	held := newReorder(time.Minute, 64)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tx := range txs {
		relay(held, submit, tx, quiet)
	}
	if len(accepted) != 20 || held.n != 0 {
		t.Fatalf("accepted nonces %v, %d still held", accepted, held.n)
	}
	for i, n := range accepted {
		if n != uint64(i+1) {
			t.Fatalf("mempool order %v", accepted)
		}
	}
	// A gap that never fills: held until it expires, never more than the bound.
	now := time.Now()
	small := newReorder(time.Second, 3)
	for i := range 5 {
		tx := &neuropb.LedgerTx{Sender: []byte(actors[0].id), Nonce: uint64(100 + i)}
		if got, want := small.hold(tx, now), i < 3; got != want {
			t.Fatalf("hold %d: %v", i, got)
		}
	}
	if got := small.next([]byte(actors[0].id), now.Add(2*time.Second)); len(got) != 0 || small.n != 0 {
		t.Fatalf("expired transactions came back: %v (%d held)", got, small.n)
	}
}
