package ledger

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

const ledgerPkg = "github.com/neuro-p2p/neuro/ledger"

// A validator's ledger service runs the chain from Start (not New), takes
// a transaction to a block, and leaves no goroutine of the package behind
// once closed; a second Close is harmless.
func TestServiceCloseLeavesNoGoroutine(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	actors := newActors(t, 2, rand.New(rand.NewPCG(8, 8)))
	h, err := p2p.New(actors[0].key, p2ptest.Config(time.Second), p2p.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	snap := leaktest.Take(ledgerPkg)
	g := ChainGenesis{ChainID: "neuro-life", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(actors),
		Validators: []Validator{{Peer: actors[0].id, Power: 10}}}
	s, err := NewService(h, actors[0].key, ServiceConfig{Dir: filepath.Join(t.TempDir(), "chain"), Genesis: g,
		Listen: "tcp://127.0.0.1:0", BlockInterval: 50 * time.Millisecond}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if s.Height() != 0 || !s.Validator() {
		t.Fatalf("before Start: height %d, validator %v", s.Height(), s.Validator())
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Send(ctx, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: 1}}
	}); err != nil {
		t.Fatal(err)
	}
	for s.Height() < 2 {
		select {
		case <-ctx.Done():
			t.Fatalf("height %d", s.Height())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	snap.Check(t)
}

// fakeSender records settle transactions; it blocks while hold is set.
type fakeSender struct {
	mu   sync.Mutex
	hold chan struct{}
	got  []*neuropb.Settle
}

func (f *fakeSender) Send(ctx context.Context, body func(*neuropb.LedgerTx)) (*neuropb.LedgerTx, error) {
	if f.hold != nil {
		select {
		case <-f.hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	tx := &neuropb.LedgerTx{}
	body(tx)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, tx.GetSettle())
	return tx, nil
}

func receipts(n int) []*neuropb.UsageReceipt {
	out := make([]*neuropb.UsageReceipt, n)
	for i := range out {
		out[i] = &neuropb.UsageReceipt{Tokens: uint64(i + 1)}
	}
	return out
}

// The settler sends each generation's receipts in order, one transaction
// per MaxReceipts; Close settles what is queued, and gives up on a sender
// that never answers after its drain time, leaving no goroutine behind.
func TestSettler(t *testing.T) {
	snap := leaktest.Take(ledgerPkg)
	f := &fakeSender{}
	var mu sync.Mutex
	settled := 0
	s, err := NewSettler(f, SettlerConfig{OnSettled: func(_ uint64, rs []*neuropb.UsageReceipt) {
		mu.Lock()
		settled += len(rs)
		mu.Unlock()
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewSettler(nil, SettlerConfig{}, nil); err == nil {
		t.Fatal("a settler without a sender")
	}
	s.Submit(1, receipts(neuropb.MaxReceipts+3))
	s.Submit(2, receipts(2))
	s.Submit(3, nil) // nothing to settle
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if len(f.got) != 3 || f.got[0].GetEscrow() != 1 || len(f.got[0].GetReceipts()) != neuropb.MaxReceipts ||
		len(f.got[1].GetReceipts()) != 3 || f.got[2].GetEscrow() != 2 || settled != neuropb.MaxReceipts+5 {
		t.Fatalf("settled %d receipts in %d transactions", settled, len(f.got))
	}
	snap.Check(t)

	stuck := &fakeSender{hold: make(chan struct{})}
	s, err = NewSettler(stuck, SettlerConfig{Drain: 50 * time.Millisecond}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.Submit(4, receipts(1))
	s.Submit(5, receipts(1))
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal(errors.New("Close waited on a sender that never answers"))
	}
	if len(stuck.got) != 0 {
		t.Fatalf("a stuck sender settled %d", len(stuck.got))
	}
	snap.Check(t)
}
