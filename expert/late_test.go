package expert

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// heldSigner signs receipts "signed" once let through: each call of
// sign waits for a value on let, and counts the receipts it signed.
type heldSigner struct {
	let    chan struct{}
	mu     sync.Mutex
	counts []int // receipts per signature
}

func (h *heldSigner) sign(rs []*neuropb.UsageReceipt) error {
	<-h.let
	h.mu.Lock()
	defer h.mu.Unlock()
	h.counts = append(h.counts, len(rs))
	for _, r := range rs {
		r.Signature = []byte("signed")
	}
	return nil
}

func (h *heldSigner) signatures() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.counts)
}

// A caller that takes its receipts late (Request.LateReceipts) gets the
// answer without waiting for the node's signature, and the signed
// receipts after it, the same as it would have got with the answer: for
// a call, a batched call's segments and a group's members (whose receipts
// are still signed at once). Without the flag the answer waits for them,
// as before.
func TestLateReceiptsComeAfterTheAnswer(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	const embd = 8
	signer := &heldSigner{let: make(chan struct{})}
	cfg := DefaultConfig()
	cfg.SignReceipts = signer.sign
	srv := startServer(t, sh, cfg)
	log := &groupLog{}
	for e, f := range []float32{2, 3, 4} {
		if err := srv.Add(mc, 0, e, &groupExpert{embd: embd, f: f, log: log}); err != nil {
			t.Fatal(err)
		}
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	x := make([]float32, 3*embd)
	for i := range x {
		x[i] = float32(i) / 7
	}
	f32 := neuropb.WireDType_WIRE_DTYPE_F32
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	// One call: the answer comes while the signature is held.
	r, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Expert: 0, Hidden: x, N: 3, DType: f32, Escrow: 5, LateReceipts: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Late() == nil || r.Receipt != nil {
		t.Fatalf("late %v, receipt %v with the answer", r.Late() != nil, r.Receipt)
	}
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	if _, _, err := r.TakeReceipts(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("receipts before they were signed: %v", err)
	}
	cancelShort()
	signer.let <- struct{}{}
	rc, rcs, err := r.TakeReceipts(ctx)
	if err != nil || len(rcs) != 0 {
		t.Fatalf("receipts: %v, %d segments'", err, len(rcs))
	}
	out := EncodeFloats(r.Output, 3, embd, f32)
	if string(rc.GetSignature()) != "signed" || rc.GetEscrow() != 5 || rc.GetTokens() != 3 ||
		!slices.Equal(rc.GetInputDigest(), neuropb.FloatsDigest(x)) || !slices.Equal(rc.GetOutputDigest(), TensorDigest(out)) {
		t.Fatalf("late receipt %v", rc)
	}

	// A group with a batched member: every member's receipts, one
	// signature for them all.
	close(signer.let) // signatures no longer held
	reqs := []Request{
		{Model: mc, Expert: 0, Hidden: x, N: 3, DType: f32, Escrow: 6, LateReceipts: true},
		{Model: mc, Expert: 1, Hidden: x, N: 3, DType: f32, Segments: []Segment{{Rows: 1, Escrow: 7}, {Rows: 2, Escrow: 8}}},
		{Model: mc, Expert: 2, Hidden: x[:embd], N: 1, DType: f32, Escrow: 9},
	}
	res := cl.CallGroup(ctx, sh.ID(), reqs)
	var escrows []uint64
	for i, g := range res {
		if g.Err != nil {
			t.Fatalf("member %d: %v", i, g.Err)
		}
		if g.Resp.Late() == nil || g.Resp.Receipt != nil || g.Resp.Receipts != nil {
			t.Fatalf("member %d: receipts with the answer", i)
		}
		rc, rcs, err := g.Resp.TakeReceipts(ctx)
		if err != nil {
			t.Fatalf("member %d: %v", i, err)
		}
		if rc != nil {
			rcs = append(rcs, rc)
		}
		off := 0
		for _, rc := range rcs {
			// the digests of the receipt's own rows, in and out
			n := int(rc.GetTokens())
			in := reqs[i].Hidden[off*embd : (off+n)*embd]
			out := EncodeFloats(g.Resp.Output[off*embd:(off+n)*embd], n, embd, f32)
			if string(rc.GetSignature()) != "signed" || rc.GetExpertIndex() != uint32(i) ||
				!slices.Equal(rc.GetInputDigest(), neuropb.FloatsDigest(in)) || !slices.Equal(rc.GetOutputDigest(), TensorDigest(out)) {
				t.Fatalf("member %d: receipt %v", i, rc)
			}
			escrows = append(escrows, rc.GetEscrow())
			off += n
		}
	}
	if !slices.Equal(escrows, []uint64{6, 7, 8, 9}) {
		t.Fatalf("receipts for escrows %v, want 6 7 8 9", escrows)
	}
	if got := signer.signatures(); !slices.Equal(got, []int{1, 4}) {
		t.Fatalf("signatures of %v receipts, want one of 1 and one of the group's 4", got)
	}

	// Without the flag, the receipt comes with the answer.
	r, err = cl.Call(ctx, sh.ID(), Request{Model: mc, Expert: 0, Hidden: x, N: 3, DType: f32, Escrow: 5})
	if err != nil {
		t.Fatal(err)
	}
	if r.Late() != nil || string(r.Receipt.GetSignature()) != "signed" {
		t.Fatalf("late %v, receipt %v", r.Late() != nil, r.Receipt)
	}
}

// Late receipts ride on the stream's next answer, or go in a message of
// their own once the flush interval passes or the caller closes its side;
// a stream that breaks fails the receipts still awaited.
func TestLateReceiptsRideOnTheNextAnswer(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	const embd = 8
	f32 := neuropb.WireDType_WIRE_DTYPE_F32
	x := make([]float32, 2*embd)
	ask := func(id uint64) *neuropb.ExpertRequest {
		return &neuropb.ExpertRequest{RequestId: id, Model: mc.Bytes(), Escrow: id, LateReceipts: true,
			Hidden: EncodeFloats(x, 2, embd, f32)}
	}
	serve := func(t *testing.T, flush time.Duration, signer func([]*neuropb.UsageReceipt) error) (*wire.Reader, *wire.Writer, func() error, func(*neuropb.ExpertResponse)) {
		sh, ch := hostPair(t)
		cfg := DefaultConfig()
		cfg.SignReceipts = signer
		cfg.LateReceiptsFlush = flush
		srv := startServer(t, sh, cfg)
		if err := srv.Add(mc, 0, 0, &groupExpert{embd: embd, f: 2, log: &groupLog{}}); err != nil {
			t.Fatal(err)
		}
		srv.Start()
		st, err := ch.NewStream(t.Context(), sh.ID(), neuropb.ExpertProtocol)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Reset() })
		_ = st.SetDeadline(time.Now().Add(20 * time.Second))
		r := wire.NewReader(st, neuropb.MaxExpertMessageSize)
		read := func(resp *neuropb.ExpertResponse) {
			t.Helper()
			if err := r.Read(resp); err != nil {
				t.Fatal(err)
			}
		}
		return r, wire.NewWriter(st, neuropb.MaxExpertMessageSize), st.CloseWrite, read
	}
	sign := func(rs []*neuropb.UsageReceipt) error {
		for _, r := range rs {
			r.Signature = []byte("signed")
		}
		return nil
	}
	receiptOf := func(t *testing.T, e *neuropb.ExpertResponse, id uint64) {
		t.Helper()
		if e.GetRequestId() != id || e.GetReceipt().GetEscrow() != id || string(e.GetReceipt().GetSignature()) != "signed" || e.GetOutput() != nil {
			t.Fatalf("receipts for %d: %v", id, e)
		}
	}

	t.Run("next answer", func(t *testing.T) {
		// A flush that never comes first: each answer carries the
		// receipts signed since the last one, and nothing else is sent.
		_, w, _, read := serve(t, time.Hour, sign)
		var came []uint64
		for id := uint64(1); id <= 20 && len(came) < 3; id++ {
			if err := w.Write(ask(id)); err != nil {
				t.Fatal(err)
			}
			var resp neuropb.ExpertResponse
			read(&resp) // the answer asked for, never a message of receipts alone
			if resp.GetRequestId() != id || !resp.GetReceiptsFollow() || resp.GetReceipt() != nil {
				t.Fatalf("answer %d: %v", id, &resp)
			}
			for _, e := range resp.GetReceiptsFor() {
				receiptOf(t, e, e.GetRequestId())
				came = append(came, e.GetRequestId())
			}
			time.Sleep(10 * time.Millisecond) // the node signs meanwhile
		}
		if !slices.Equal(came[:min(3, len(came))], []uint64{1, 2, 3}) {
			t.Fatalf("the answers carried the receipts of %v, want 1 2 3 first", came)
		}
	})
	t.Run("flush", func(t *testing.T) {
		_, w, _, read := serve(t, 5*time.Millisecond, sign)
		if err := w.Write(ask(1)); err != nil {
			t.Fatal(err)
		}
		var answer, alone neuropb.ExpertResponse
		read(&answer)
		read(&alone)
		if alone.GetRequestId() != 0 || len(alone.GetReceiptsFor()) != 1 {
			t.Fatalf("after the flush: %v", &alone)
		}
		receiptOf(t, alone.GetReceiptsFor()[0], 1)
	})
	t.Run("caller closes", func(t *testing.T) {
		r, w, closeWrite, read := serve(t, time.Hour, sign)
		if err := w.Write(ask(1)); err != nil {
			t.Fatal(err)
		}
		var answer, alone neuropb.ExpertResponse
		read(&answer)
		if err := closeWrite(); err != nil {
			t.Fatal(err)
		}
		read(&alone)
		receiptOf(t, alone.GetReceiptsFor()[0], 1)
		if err := r.Read(&neuropb.ExpertResponse{}); err == nil {
			t.Fatal("a message after the last receipts")
		}
	})
	t.Run("one signature for a batch", func(t *testing.T) {
		// MaxReceiptBatch answers' receipts share a signature, made once
		// the stream holds that many; the rest are signed as the caller
		// closes its side. Every receipt comes, once.
		signer := &heldSigner{let: make(chan struct{})}
		close(signer.let)
		r, w, closeWrite, _ := serve(t, time.Hour, signer.sign)
		const calls = neuropb.MaxReceiptBatch + 3
		for id := uint64(1); id <= calls; id++ {
			if err := w.Write(ask(id)); err != nil {
				t.Fatal(err)
			}
		}
		if err := closeWrite(); err != nil {
			t.Fatal(err)
		}
		answers, got := 0, map[uint64]int{}
		for {
			var resp neuropb.ExpertResponse
			if err := r.Read(&resp); err != nil {
				break
			}
			if resp.GetRequestId() != 0 {
				answers++
			}
			for _, e := range resp.GetReceiptsFor() {
				receiptOf(t, e, e.GetRequestId())
				got[e.GetRequestId()]++
			}
		}
		if answers != calls || len(got) != calls {
			t.Fatalf("%d answers, receipts of %d calls, want %d of each", answers, len(got), calls)
		}
		for id, n := range got {
			if n != 1 {
				t.Fatalf("call %d's receipt came %d times", id, n)
			}
		}
		if s := signer.signatures(); !slices.Equal(s, []int{neuropb.MaxReceiptBatch, 3}) {
			t.Fatalf("signatures of %v receipts, want %d then 3", s, neuropb.MaxReceiptBatch)
		}
	})
	t.Run("broken stream", func(t *testing.T) {
		sh, ch := hostPair(t)
		cfg := DefaultConfig()
		never := make(chan struct{})
		cfg.SignReceipts = func([]*neuropb.UsageReceipt) error { <-never; return errors.New("never signed") }
		srv := startServer(t, sh, cfg)
		t.Cleanup(func() { close(never) }) // before the server closes
		cl, ctx := serveGroupExperts(t, srv, mc, ch, &groupLog{}, 2)
		resp, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Hidden: x, N: 2, DType: f32, Escrow: 3, LateReceipts: true})
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			time.Sleep(50 * time.Millisecond)
			sh.Close() // the node goes
		}()
		if _, _, err := resp.TakeReceipts(ctx); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("receipts of a broken stream: %v", err)
		}
	})
}
