package verdict

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/reputation"
)

func newPeer(t *testing.T) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(k)
	return k, id
}

// A verdict reported on one node is signed, published and judged by the
// other, which re-runs the task, confirms it and excludes the accused.
// Both services leave no goroutine behind once closed.
func TestPublishJudgeAndClose(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	hs := p2ptest.Cluster(t, ctx, 2, p2ptest.Config(300*time.Millisecond))
	snap := leaktest.Take("github.com/neuro-p2p/neuro/verdict")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	_, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	task := reputation.Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1}
	right := []float32{0.5, 0.25, -1, 2}
	wrong := []float32{0.75, 0.375, -1.5, 3}

	var svcs []*Service
	var books []*reputation.Book
	for i, h := range hs {
		book, err := reputation.Open(reputation.Config{})
		if err != nil {
			t.Fatal(err)
		}
		key := h.LibP2P().Peerstore().PrivKey(h.ID())
		cfg := Config{Key: key, Book: book}
		if i == 1 {
			cfg.Rerun = func(reputation.Task) ([]float32, error) { return right, nil }
		}
		s, err := New(h, cfg, quiet)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
		svcs, books = append(svcs, s), append(books, book)
	}
	if _, err := New(hs[0], Config{}, quiet); err == nil {
		t.Fatal("a service without key and book")
	}
	// GossipSub needs the two to see each other on the topic first.
	for i := 0; svcs[1].Status().Confirmed == 0; i++ {
		if i%20 == 0 {
			svcs[0].Report(Wrong{Task: task, Accused: accused, Output: wrong, Agreeing: [2]peer.ID{a1, a2}, Right: right})
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no verdict confirmed: %+v / %+v", svcs[0].Status(), svcs[1].Status())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if !books[1].Excluded(accused) || svcs[0].Status().Published == 0 {
		t.Fatalf("accused excluded %v, published %d", books[1].Excluded(accused), svcs[0].Status().Published)
	}
	// Every verdict reported has been published (Pending counts those
	// queued or being published, which a testnet waits for).
	for svcs[0].Status().Pending != 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("verdicts still pending: %+v", svcs[0].Status())
		case <-time.After(20 * time.Millisecond):
		}
	}
	for _, s := range append(svcs, svcs...) {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	svcs[0].Report(Wrong{Task: task, Accused: accused, Output: wrong, Agreeing: [2]peer.ID{a1, a2}, Right: right})
	if p := svcs[0].Status().Pending; p != 1 {
		t.Fatalf("%d pending after a report to a closed service, want 1 (queued, never published)", p)
	}
	snap.Check(t)
}
