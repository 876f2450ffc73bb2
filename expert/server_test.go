package expert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// hostPair returns two connected libp2p hosts on loopback.
func hostPair(t testing.TB) (server, client host.Host) {
	t.Helper()
	mk := func() host.Host {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		return h
	}
	server, client = mk(), mk()
	if err := client.Connect(t.Context(), peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return server, client
}

// tinyShards splits a tiny model and returns its CID, manifest and dir.
func tinyShards(t *testing.T, dt model.DType) (cid.Cid, *neuropb.Manifest, string) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "m.gguf")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Generate(f, model.Presets["tiny"], dt, 77); err != nil {
		t.Fatal(err)
	}
	f.Close()
	res, err := model.Split(src, filepath.Join(dir, "shards"))
	if err != nil {
		t.Fatal(err)
	}
	return res.ModelCID, res.Manifest, filepath.Join(dir, "shards")
}

// loadExpert loads an expert with the pure-Go backend (these tests are of
// the protocol; ggml's compute is tested in package ggml).
func loadExpert(t *testing.T, dir string, ref *neuropb.ExpertShardRef) moe.Expert {
	t.Helper()
	s, err := model.OpenShard(dir, ref.GetShard())
	if err != nil {
		t.Fatal(err)
	}
	e, err := moe.NewExpertFromShard(moetest.Backend{}, s, int(ref.GetLayer()), moe.ExpertOptions{Threads: 2, MaxBatch: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func startServer(t *testing.T, h host.Host, cfg Config) *Server {
	t.Helper()
	s, err := NewServer(h, cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func randomHidden(rng *rand.Rand, n, embd int) []float32 {
	x := make([]float32, n*embd)
	for i := range x {
		x[i] = 2*rng.Float32() - 1
	}
	return x
}

// Expert calls over the network return exactly what the local engine
// computes: bit-identical in F32; in F16, identical to local compute on the
// F16-rounded input, rounded to F16.
func TestRemoteEqualsLocal(t *testing.T) {
	mc, m, dir := tinyShards(t, model.Q8_0)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	for _, ref := range m.GetExperts() {
		if err := srv.Add(mc, int(ref.GetLayer()), int(ref.GetExpert()), loadExpert(t, dir, ref)); err != nil {
			t.Fatal(err)
		}
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	embd := int(m.GetParams().GetEmbd())
	rng := rand.New(rand.NewPCG(5, 6))
	round := func(x []float32) []float32 {
		out := make([]float32, len(x))
		for i, v := range x {
			out[i] = model.Float16ToFloat32(model.Float32ToFloat16(v))
		}
		return out
	}
	for _, ref := range m.GetExperts() {
		local := loadExpert(t, dir, ref) // a separate instance from the same shard
		for _, dt := range []neuropb.WireDType{neuropb.WireDType_WIRE_DTYPE_F32, neuropb.WireDType_WIRE_DTYPE_F16} {
			const n = 3
			x := randomHidden(rng, n, embd)
			resp, err := cl.Call(t.Context(), sh.ID(), Request{Model: mc, Layer: int(ref.GetLayer()), Expert: int(ref.GetExpert()),
				Hidden: x, N: n, DType: dt})
			if err != nil {
				t.Fatal(err)
			}
			in := x
			if dt == neuropb.WireDType_WIRE_DTYPE_F16 {
				in = round(x)
			}
			want := make([]float32, len(x))
			if err := local.Compute(in, n, want); err != nil {
				t.Fatal(err)
			}
			if dt == neuropb.WireDType_WIRE_DTYPE_F16 {
				want = round(want)
			}
			for i := range want {
				if resp.Output[i] != want[i] {
					t.Fatalf("expert %d:%d %s: value %d: remote %v, local %v", ref.GetLayer(), ref.GetExpert(), dt, i, resp.Output[i], want[i])
				}
			}
		}
	}
}

// Every bad request gets its typed error, and the stream goes on working.
func TestBadRequestsKeepStreamUsable(t *testing.T) {
	mc, m, dir := tinyShards(t, model.F32)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	ref := m.GetExperts()[0]
	if err := srv.Add(mc, 0, 0, loadExpert(t, dir, ref)); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	st, err := ch.NewStream(t.Context(), sh.ID(), neuropb.ExpertProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r := wire.NewReader(st, neuropb.MaxExpertMessageSize)
	// The test writes with a larger limit, to send an oversized message.
	w := wire.NewWriter(st, 4*neuropb.MaxExpertMessageSize)
	embd := int(m.GetParams().GetEmbd())
	good := func(id uint64) *neuropb.ExpertRequest {
		return &neuropb.ExpertRequest{RequestId: id, Model: mc.Bytes(), Layer: 0, Expert: 0,
			Hidden: EncodeFloats(make([]float32, 2*embd), 2, embd, neuropb.WireDType_WIRE_DTYPE_F32)}
	}
	other, _ := cid.Decode("bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee")
	tests := []struct {
		name   string
		mutate func(*neuropb.ExpertRequest)
		code   neuropb.ExpertError_Code
	}{
		{"unknown model", func(q *neuropb.ExpertRequest) { q.Model = other.Bytes() }, neuropb.ExpertError_CODE_UNKNOWN_MODEL},
		{"unknown expert", func(q *neuropb.ExpertRequest) { q.Expert = 3 }, neuropb.ExpertError_CODE_UNKNOWN_EXPERT},
		{"wrong hidden size", func(q *neuropb.ExpertRequest) {
			q.Hidden = EncodeFloats(make([]float32, 2*(embd+32)), 2, embd+32, neuropb.WireDType_WIRE_DTYPE_F32)
		}, neuropb.ExpertError_CODE_WRONG_SHAPE},
		{"wrong dtype", func(q *neuropb.ExpertRequest) { q.Hidden.Dtype = neuropb.WireDType_WIRE_DTYPE_UNSPECIFIED }, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"data does not match shape", func(q *neuropb.ExpertRequest) { q.Hidden.Data = q.Hidden.Data[:7] }, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"bad model cid", func(q *neuropb.ExpertRequest) { q.Model = []byte{1, 2, 3} }, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"expired deadline", func(q *neuropb.ExpertRequest) { q.DeadlineUnixMs = time.Now().Add(-time.Second).UnixMilli() }, neuropb.ExpertError_CODE_DEADLINE_EXCEEDED},
		{"segments that do not add up", func(q *neuropb.ExpertRequest) { q.Segments = []*neuropb.Segment{{Rows: 1}, {Rows: 2}} }, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"a segment without rows", func(q *neuropb.ExpertRequest) { q.Segments = []*neuropb.Segment{{Rows: 2}, {Rows: 0}} }, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"segments beside a request escrow", func(q *neuropb.ExpertRequest) {
			q.Segments, q.Escrow = []*neuropb.Segment{{Rows: 2, Escrow: 5}}, 5
		}, neuropb.ExpertError_CODE_BAD_REQUEST},
		{"oversized", func(q *neuropb.ExpertRequest) {
			q.Hidden.Data = make([]byte, neuropb.MaxExpertMessageSize+1)
		}, neuropb.ExpertError_CODE_TOO_LARGE},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := uint64(100 + i)
			q := good(id)
			tc.mutate(q)
			if err := w.Write(q); err != nil {
				t.Fatal(err)
			}
			var resp neuropb.ExpertResponse
			_ = st.SetReadDeadline(time.Now().Add(10 * time.Second))
			if err := r.Read(&resp); err != nil {
				t.Fatal(err)
			}
			if resp.GetError().GetCode() != tc.code {
				t.Fatalf("response %v, want %s", &resp, tc.code)
			}
			wantID := id
			if tc.code == neuropb.ExpertError_CODE_TOO_LARGE {
				wantID = 0 // the message was skipped unread
			}
			if resp.GetRequestId() != wantID {
				t.Fatalf("request id %d, want %d", resp.GetRequestId(), wantID)
			}
			// The same stream still serves a good request.
			if err := w.Write(good(id + 1000)); err != nil {
				t.Fatal(err)
			}
			resp.Reset()
			if err := r.Read(&resp); err != nil || resp.GetError() != nil || resp.GetRequestId() != id+1000 {
				t.Fatalf("good request after %s: %v %v", tc.name, &resp, err)
			}
		})
	}
}

// gated blocks every compute until released, to hold the queue still.
type gated struct {
	moe.Expert
	entered chan struct{}
	release chan struct{}
}

func (g *gated) Compute(x []float32, n int, out []float32) error {
	g.entered <- struct{}{}
	<-g.release
	return g.Expert.Compute(x, n, out)
}

// A full queue answers busy at once; requests that waited while the
// expert computed are served together in one batch.
func TestBusyAndBatching(t *testing.T) {
	mc, m, dir := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	cfg := DefaultConfig()
	cfg.MaxQueue = 4
	srv := startServer(t, sh, cfg)
	g := &gated{Expert: loadExpert(t, dir, m.GetExperts()[1]), entered: make(chan struct{}, 16), release: make(chan struct{})}
	if err := srv.Add(mc, 0, 1, g); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	embd := int(m.GetParams().GetEmbd())
	call := func() (*Response, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		return cl.Call(ctx, sh.ID(), Request{Model: mc, Layer: 0, Expert: 1, Hidden: make([]float32, embd), N: 1})
	}
	type out struct {
		r   *Response
		err error
	}
	results := make(chan out, 16)
	go func() { r, err := call(); results <- out{r, err} }()
	select { // the first request is computing; the queue is empty
	case <-g.entered:
	case o := <-results:
		t.Fatalf("first call returned before computing: %v", o.err)
	case <-time.After(20 * time.Second):
		t.Fatal("first call never reached the expert")
	}
	var wg sync.WaitGroup
	for range 4 { // fill the queue
		wg.Add(1)
		go func() { defer wg.Done(); r, err := call(); results <- out{r, err} }()
	}
	// Wait (bounded) until the four are queued, then overflow.
	b := srv.batchers[expertKey{string(mc.Bytes()), 0, 1}]
	for i := 0; len(b.queue) < 4; i++ {
		if i > 1000 {
			t.Fatal("requests never queued")
		}
		time.Sleep(5 * time.Millisecond)
	}
	_, err := call()
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != neuropb.ExpertError_CODE_BUSY {
		t.Fatalf("overflow: %v, want busy", err)
	}
	close(g.release) // let everything through
	wg.Wait()
	batched := 0
	for range 5 {
		o := <-results
		if o.err != nil {
			t.Fatal(o.err)
		}
		if o.r.BatchTokens == 4 {
			batched++
		}
	}
	if batched != 4 {
		t.Fatalf("%d requests were served in the batch of 4, want 4", batched)
	}
}

// A node that dies mid-request leaves the caller an error at once, not a
// hang.
func TestServerDiesMidCall(t *testing.T) {
	mc, m, dir := tinyShards(t, model.F32)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	g := &gated{Expert: loadExpert(t, dir, m.GetExperts()[0]), entered: make(chan struct{}, 1), release: make(chan struct{})}
	if err := srv.Add(mc, 0, 0, g); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := cl.Call(t.Context(), sh.ID(), Request{Model: mc, Hidden: make([]float32, m.GetParams().GetEmbd()), N: 1})
		errc <- err
	}()
	select {
	case <-g.entered:
	case err := <-errc:
		t.Fatalf("call returned before computing: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("call never reached the expert")
	}
	sh.Close() // the node goes away mid-request
	select {
	case err := <-errc:
		if !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("error %v, want ErrStreamClosed", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("call still hanging 15 s after the node died")
	}
	close(g.release)
}

// With a payment check (expert.require_escrow), a call is computed only
// when the check accepts it; it is told the calling peer, the escrow and
// the call's work, and a refusal is CODE_PAYMENT_REQUIRED on a stream that
// stays usable.
func TestPaymentRequired(t *testing.T) {
	mc, m, dir := tinyShards(t, model.F32)
	sh, ch := hostPair(t)
	type call struct {
		from          string
		escrow, flops uint64
	}
	var mu sync.Mutex
	var calls []call
	cfg := DefaultConfig()
	cfg.Payment = func(_ context.Context, from peer.ID, escrow, flops uint64) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, call{from.String(), escrow, flops})
		if escrow != 7 {
			return errors.New("no escrow that pays")
		}
		return nil
	}
	srv := startServer(t, sh, cfg)
	ref := m.GetExperts()[0]
	e := loadExpert(t, dir, ref)
	if err := srv.Add(mc, 0, 0, e); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	st, err := ch.NewStream(t.Context(), sh.ID(), neuropb.ExpertProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r, w := wire.NewReader(st, neuropb.MaxExpertMessageSize), wire.NewWriter(st, neuropb.MaxExpertMessageSize)
	embd := int(m.GetParams().GetEmbd())
	for i, escrow := range []uint64{0, 7} {
		q := &neuropb.ExpertRequest{RequestId: uint64(i + 1), Model: mc.Bytes(), Escrow: escrow,
			Hidden: EncodeFloats(make([]float32, 3*embd), 3, embd, neuropb.WireDType_WIRE_DTYPE_F32)}
		if err := w.Write(q); err != nil {
			t.Fatal(err)
		}
		var resp neuropb.ExpertResponse
		_ = st.SetReadDeadline(time.Now().Add(10 * time.Second))
		if err := r.Read(&resp); err != nil {
			t.Fatal(err)
		}
		paid := escrow == 7
		if got := resp.GetError().GetCode(); (paid && resp.GetError() != nil) || (!paid && got != neuropb.ExpertError_CODE_PAYMENT_REQUIRED) {
			t.Fatalf("escrow %d: %v", escrow, &resp)
		}
	}
	ff := uint64(m.GetParams().GetFf())
	want := []call{{ch.ID().String(), 0, 6 * uint64(embd) * ff * 3}, {ch.ID().String(), 7, 6 * uint64(embd) * ff * 3}}
	if fmt.Sprint(calls) != fmt.Sprint(want) || ff == 0 {
		t.Fatalf("payment checks %v, want %v", calls, want)
	}
}

// rowRecorder doubles its input and records each compute's batch size; its
// rows vary with their batch (moe.RowVariant), as a dense expert's do.
type rowRecorder struct {
	embd  int
	mu    sync.Mutex
	sizes []int
}

func (r *rowRecorder) Compute(x []float32, n int, out []float32) error {
	r.mu.Lock()
	r.sizes = append(r.sizes, n)
	r.mu.Unlock()
	for i, v := range x[:n*r.embd] {
		out[i] = 2 * v
	}
	return nil
}
func (r *rowRecorder) Embd() int      { return r.embd }
func (r *rowRecorder) MaxBatch() int  { return 64 }
func (r *rowRecorder) RowsVary() bool { return true }

// An expert whose rows vary with their batch computes each request alone
// (its rows are its sender's batch, as in llama.cpp's own pass), and a
// request with rows_apart row by row (a one-token decode step each).
func TestRowVariantExpertsComputeRequestsApart(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	const embd = 8
	rec := &rowRecorder{embd: embd}
	if err := srv.Add(mc, 0, 0, rec); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	call := func(n int, apart bool) error {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		x := make([]float32, n*embd)
		for i := range x {
			x[i] = float32(i)
		}
		r, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Layer: 0, Expert: 0, Hidden: x, N: n, DType: neuropb.WireDType_WIRE_DTYPE_F32, RowsApart: apart})
		if err != nil {
			return err
		}
		for i, v := range r.Output {
			if v != 2*x[i] {
				return fmt.Errorf("output %d: %v, want %v", i, v, 2*x[i])
			}
		}
		return nil
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- call(2, false) }()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := call(3, true); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if want := []int{2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1}; !slices.Equal(rec.sizes, want) {
		t.Fatalf("batch sizes %v, want %v (8 requests of 2 rows alone, then 3 rows apart)", rec.sizes, want)
	}
}

// countRecorder is rowRecorder whose rows do not vary with their batch.
type countRecorder struct{ rowRecorder }

func (r *countRecorder) RowsVary() bool { return false }

// A batched request's segments (the rows of several generations) are each
// paid from their own escrow, computed as their own requests would be —
// alone for an expert whose rows vary with the batch, in one batch
// otherwise — and each gets a receipt of its own for its rows; segments
// that do not add up are refused.
func TestSegmentsArePaidAndComputedAsTheirOwnRequests(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	const embd = 8
	var mu sync.Mutex
	var paid []string
	srv := startServer(t, sh, paidConfig(func(escrow, flops uint64) {
		mu.Lock()
		defer mu.Unlock()
		paid = append(paid, fmt.Sprintf("%d:%d", escrow, flops))
	}))
	vary := &rowRecorder{embd: embd}
	same := &countRecorder{rowRecorder{embd: embd}}
	if err := srv.Add(mc, 0, 0, vary); err != nil {
		t.Fatal(err)
	}
	if err := srv.Add(mc, 0, 1, same); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	segs := []Segment{{Rows: 2, Escrow: 5}, {Rows: 1, Escrow: 0}, {Rows: 3, Escrow: 6}}
	x := make([]float32, 6*embd)
	for i := range x {
		x[i] = float32(i)
	}
	for e, rec := range []*rowRecorder{vary, &same.rowRecorder} {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		r, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Layer: 0, Expert: e, Hidden: x, N: 6, DType: neuropb.WireDType_WIRE_DTYPE_F32, Segments: segs})
		cancel()
		if err != nil {
			t.Fatalf("expert %d: %v", e, err)
		}
		for i, v := range r.Output {
			if v != 2*x[i] {
				t.Fatalf("expert %d: output %d: %v, want %v", e, i, v, 2*x[i])
			}
		}
		if len(r.Receipts) != len(segs) || r.Receipt != nil {
			t.Fatalf("expert %d: %d receipts (and %v) for %d segments", e, len(r.Receipts), r.Receipt, len(segs))
		}
		off := 0
		for i, sg := range segs {
			rc := r.Receipts[i]
			rows := x[off*embd : (off+sg.Rows)*embd]
			out := EncodeFloats(r.Output[off*embd:(off+sg.Rows)*embd], sg.Rows, embd, neuropb.WireDType_WIRE_DTYPE_F32)
			if rc.GetEscrow() != sg.Escrow || rc.GetTokens() != uint64(sg.Rows) || rc.GetExpertIndex() != uint32(e) ||
				!slices.Equal(rc.GetInputDigest(), neuropb.FloatsDigest(rows)) || !slices.Equal(rc.GetOutputDigest(), TensorDigest(out)) {
				t.Fatalf("expert %d: segment %d's receipt %v", e, i, rc)
			}
			off += sg.Rows
		}
		rec.mu.Lock()
		sizes := slices.Clone(rec.sizes)
		rec.mu.Unlock()
		want := []int{2, 1, 3} // each segment alone
		if rec == &same.rowRecorder {
			want = []int{6} // one batch
		}
		if !slices.Equal(sizes, want) {
			t.Fatalf("expert %d: batch sizes %v, want %v", e, sizes, want)
		}
	}
	mu.Lock()
	if want := "[5:0 0:0 6:0 5:0 0:0 6:0]"; fmt.Sprint(paid) != want {
		t.Fatalf("payments %v, want %v (each segment, per expert)", paid, want)
	}
	mu.Unlock()

	// A spent escrow in one segment refuses the request; the client
	// refuses segments that do not add up itself (the node's refusals are
	// in TestBadRequestsKeepStreamUsable).
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	_, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Hidden: x, N: 6, DType: neuropb.WireDType_WIRE_DTYPE_F32,
		Segments: []Segment{{Rows: 3, Escrow: 5}, {Rows: 3, Escrow: 99}}})
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != neuropb.ExpertError_CODE_PAYMENT_REQUIRED {
		t.Fatalf("a spent segment escrow: %v", err)
	}
	if _, err := cl.Call(ctx, sh.ID(), Request{Model: mc, Hidden: x, N: 6, Segments: []Segment{{Rows: 2}, {Rows: 3}}}); err == nil {
		t.Fatal("segments of 5 rows for 6 accepted by the client")
	}
}

// groupExpert multiplies its rows by f; it computes with the other
// groupExperts of a group in one call (moe.Grouper), which log records.
type groupExpert struct {
	embd int
	f    float32
	log  *groupLog
}

type groupLog struct {
	mu     sync.Mutex
	groups [][]float32   // the factors of each group's members
	hold   chan struct{} // if set, a group computes once it is closed
}

// serveGroupExperts adds to srv a groupExpert of factor fs[e] (hidden
// size 8) as expert e of mc's layer 0, starts it, and returns a client of
// ch and a context of 20 s, both ending with the test.
func serveGroupExperts(t *testing.T, srv *Server, mc cid.Cid, ch host.Host, log *groupLog, fs ...float32) (*Client, context.Context) {
	t.Helper()
	for e, f := range fs {
		if err := srv.Add(mc, 0, e, &groupExpert{embd: 8, f: f, log: log}); err != nil {
			t.Fatal(err)
		}
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	t.Cleanup(func() { cl.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return cl, ctx
}

func (e *groupExpert) Compute(x []float32, n int, out []float32) error {
	for i, v := range x[:n*e.embd] {
		out[i] = e.f * v
	}
	return nil
}

func (e *groupExpert) ComputeGroup(es []moe.Computer, xs [][]float32, ns []int, outs [][]float32) error {
	var fs []float32
	for _, m := range es {
		g, ok := m.(*groupExpert)
		if !ok {
			return moe.ErrNotGroupable
		}
		fs = append(fs, g.f)
	}
	e.log.mu.Lock()
	e.log.groups = append(e.log.groups, fs)
	hold := e.log.hold
	e.log.mu.Unlock()
	if hold != nil {
		<-hold
	}
	for i, m := range es {
		if err := m.Compute(xs[i], ns[i], outs[i]); err != nil {
			return err
		}
	}
	return nil
}

func (e *groupExpert) Embd() int     { return e.embd }
func (e *groupExpert) FF() int       { return 16 }
func (e *groupExpert) MaxBatch() int { return 64 }
func (e *groupExpert) Close() error  { return nil }

// A request with a group is answered in one message: each member as a
// request of its own (its payment, receipts, errors), the batch-invariant
// ones computed together in one call, a row-variant one by its own
// batcher; bad groups are refused member by member, and a paused node
// answers every member busy. Client.CallGroup gives each member what a
// Call of it gives.
func TestGroupIsAnsweredInOneMessage(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	const embd = 8
	srv := startServer(t, sh, paidConfig(nil))
	log := &groupLog{}
	for e, f := range []float32{2, 3, 4} {
		if err := srv.Add(mc, 0, e, &groupExpert{embd: embd, f: f, log: log}); err != nil {
			t.Fatal(err)
		}
	}
	vary := &rowRecorder{embd: embd}
	if err := srv.Add(mc, 0, 3, vary); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	rows := func(n int) []float32 {
		x := make([]float32, n*embd)
		for i := range x {
			x[i] = float32(i + 1)
		}
		return x
	}
	req := func(id uint64, e, n int, escrow uint64) *neuropb.ExpertRequest {
		return &neuropb.ExpertRequest{RequestId: id, Model: mc.Bytes(), Expert: uint32(e), Escrow: escrow,
			Hidden: EncodeFloats(rows(n), n, embd, neuropb.WireDType_WIRE_DTYPE_F32)}
	}
	st, err := ch.NewStream(t.Context(), sh.ID(), neuropb.ExpertProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r := wire.NewReader(st, neuropb.MaxExpertMessageSize)
	w := wire.NewWriter(st, neuropb.MaxExpertMessageSize)
	ask := func(q *neuropb.ExpertRequest) map[uint64]*neuropb.ExpertResponse {
		t.Helper()
		if err := w.Write(q); err != nil {
			t.Fatal(err)
		}
		var resp neuropb.ExpertResponse
		_ = st.SetReadDeadline(time.Now().Add(10 * time.Second))
		if err := r.Read(&resp); err != nil {
			t.Fatal(err)
		}
		byID := map[uint64]*neuropb.ExpertResponse{}
		for _, m := range append([]*neuropb.ExpertResponse{&resp}, resp.GetGroup()...) {
			byID[m.GetRequestId()] = m
		}
		return byID
	}

	seg := req(2, 1, 3, 0)
	seg.Segments = []*neuropb.Segment{{Rows: 1, Escrow: 6}, {Rows: 2, Escrow: 7}}
	q := req(1, 0, 2, 5)
	q.Group = []*neuropb.ExpertRequest{seg, req(3, 2, 1, 99), req(4, 3, 2, 0), req(5, 7, 1, 0)}
	got := ask(q)
	if len(got) != 5 {
		t.Fatalf("%d answers in the message, want 5: %v", len(got), got)
	}
	for id, want := range map[uint64]struct {
		f        float32
		n        int
		receipts int
		code     neuropb.ExpertError_Code
	}{
		1: {2, 2, 1, 0}, 2: {3, 3, 2, 0}, 4: {2, 2, 1, 0},
		3: {code: neuropb.ExpertError_CODE_PAYMENT_REQUIRED}, 5: {code: neuropb.ExpertError_CODE_UNKNOWN_EXPERT},
	} {
		a := got[id]
		if a.GetError().GetCode() != want.code {
			t.Fatalf("request %d: %v, want code %s", id, a, want.code)
		}
		if want.code != 0 {
			continue
		}
		out := DecodeFloats(a.GetOutput())
		for i, v := range rows(want.n) {
			if out[i] != want.f*v {
				t.Fatalf("request %d: output %d: %v, want %v", id, i, out[i], want.f*v)
			}
		}
		receipts := len(a.GetReceipts())
		if a.GetReceipt() != nil {
			receipts++
		}
		if receipts != want.receipts {
			t.Fatalf("request %d: %d receipts, want %d", id, receipts, want.receipts)
		}
	}
	if rc := got[2].GetReceipts(); rc[0].GetEscrow() != 6 || rc[1].GetEscrow() != 7 || rc[1].GetTokens() != 2 || rc[0].GetExpertIndex() != 1 {
		t.Fatalf("the segmented member's receipts: %v", rc)
	}
	log.mu.Lock()
	groups := fmt.Sprint(log.groups)
	log.mu.Unlock()
	if groups != "[[2 3]]" {
		t.Fatalf("groups computed: %s, want one of experts 0 and 1 ([[2 3]])", groups)
	}
	vary.mu.Lock()
	sizes := fmt.Sprint(vary.sizes)
	vary.mu.Unlock()
	if sizes != "[2]" {
		t.Fatalf("the row-variant member's batches: %s, want [2]", sizes)
	}

	// Bad groups: every member is refused.
	for name, mutate := range map[string]func(q *neuropb.ExpertRequest){
		"an expert twice":       func(q *neuropb.ExpertRequest) { q.Group[0].Expert = 0 },
		"another layer":         func(q *neuropb.ExpertRequest) { q.Group[0].Layer = 1 },
		"an id twice":           func(q *neuropb.ExpertRequest) { q.Group[0].RequestId = q.RequestId },
		"a member with a group": func(q *neuropb.ExpertRequest) { q.Group[0].Group = []*neuropb.ExpertRequest{req(30, 2, 1, 0)} },
		"a bad member":          func(q *neuropb.ExpertRequest) { q.Group[0].Hidden.Data = q.Group[0].Hidden.Data[:5] },
		"a row beyond the shared rows": func(q *neuropb.ExpertRequest) {
			q.GroupRows, q.Hidden, q.RowIndex = q.Hidden, nil, []uint32{0}
			for _, m := range q.Group {
				m.Hidden, m.RowIndex = nil, []uint32{1}
			}
		},
	} {
		q := req(10, 0, 1, 0)
		q.Group = []*neuropb.ExpertRequest{req(11, 1, 1, 0), req(12, 2, 1, 0)}
		mutate(q)
		ids := map[uint64]bool{}
		for _, m := range append([]*neuropb.ExpertRequest{q}, q.Group...) {
			ids[m.GetRequestId()] = true
		}
		for id, a := range ask(q) {
			if !ids[id] || a.GetError().GetCode() != neuropb.ExpertError_CODE_BAD_REQUEST {
				t.Fatalf("%s: answer %d %v, want every member refused as a bad request", name, id, a)
			}
		}
	}
	tooMany := req(100, 0, 1, 0)
	for i := range neuropb.MaxGroup {
		tooMany.Group = append(tooMany.Group, req(uint64(101+i), 10+i, 1, 0))
	}
	if got := ask(tooMany); len(got) != neuropb.MaxGroup+1 || got[100].GetError().GetCode() != neuropb.ExpertError_CODE_BAD_REQUEST {
		t.Fatalf("a group of %d: %d answers, the opener's %v", neuropb.MaxGroup+1, len(got), got[100])
	}

	// Through the client: each member gets what a call of it alone gets.
	cl := NewClient(ch, quiet())
	defer cl.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	reqs := []Request{
		{Model: mc, Expert: 2, Hidden: rows(3), N: 3, DType: neuropb.WireDType_WIRE_DTYPE_F32, Escrow: 8},
		{Model: mc, Expert: 0, Hidden: rows(1), N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32},
		{Model: mc, Expert: 9, Hidden: rows(1), N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32},
	}
	res := cl.CallGroup(ctx, sh.ID(), reqs)
	for i, rq := range reqs {
		alone, err := cl.Call(ctx, sh.ID(), rq)
		if (err == nil) != (res[i].Err == nil) {
			t.Fatalf("member %d: %v in the group, %v alone", i, res[i].Err, err)
		}
		if err != nil {
			continue
		}
		if !slices.Equal(res[i].Resp.Output, alone.Output) || (res[i].Resp.Receipt == nil) != (alone.Receipt == nil) {
			t.Fatalf("member %d: %v in the group, %v alone", i, res[i].Resp, alone)
		}
	}
	var re *RemoteError
	if !errors.As(res[2].Err, &re) || re.Code != neuropb.ExpertError_CODE_UNKNOWN_EXPERT {
		t.Fatalf("the unknown expert's member: %v", res[2].Err)
	}

	srv.SetPaused(true)
	for id, a := range ask(q) {
		if a.GetError().GetCode() != neuropb.ExpertError_CODE_BUSY {
			t.Fatalf("paused: answer %d %v, want busy", id, a)
		}
	}
}

// A node that speaks only the expert protocol's 1.0.0 (a version before
// request groups) is never sent a group: SendGroup refuses with
// ErrNoGroups, and calls alone still work.
func TestNoGroupsForANodeWithoutThem(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	const embd = 8
	for e := range 2 {
		if err := srv.Add(mc, 0, e, &groupExpert{embd: embd, f: 2, log: &groupLog{}}); err != nil {
			t.Fatal(err)
		}
	}
	srv.Start()
	sh.RemoveStreamHandler(neuropb.ExpertProtocol) // an older node
	sh.RemoveStreamHandler(neuropb.ExpertProtocol11)
	// Once the client has heard so (identify's push): before, it takes the
	// node for a new one and writes the group on a stream whose
	// negotiation fails only when read (failed once in a loaded CI run).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		old, _ := ch.Peerstore().SupportsProtocols(sh.ID(), neuropb.ExpertProtocol10)
		cur, _ := ch.Peerstore().SupportsProtocols(sh.ID(), neuropb.ExpertProtocol, neuropb.ExpertProtocol11)
		if len(old) == 1 && len(cur) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client's peerstore after 10 s: %v and %v", old, cur)
		}
	}
	cl := NewClient(ch, quiet())
	defer cl.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	reqs := []Request{{Model: mc, Expert: 0, Hidden: make([]float32, embd), N: 1}, {Model: mc, Expert: 1, Hidden: make([]float32, embd), N: 1}}
	if _, err := cl.SendGroup(ctx, sh.ID(), reqs); !errors.Is(err, ErrNoGroups) {
		t.Fatalf("a group to a 1.0.0 node: %v", err)
	}
	for _, r := range reqs {
		if _, err := cl.Call(ctx, sh.ID(), r); err != nil {
			t.Fatalf("a call alone to a 1.0.0 node: %v", err)
		}
	}
}

// A group whose members share rows (a decode step's token, sent to each
// of its experts) sends each row once to a node of 1.2.0, and every
// member gets what a call of it alone gets: the same output, and a
// receipt of the same input digest. A node of 1.1.0 gets the group with
// each member's own rows, answered the same.
func TestSharedRowsAnswerAsTheirOwn(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	const embd = 8
	for _, older := range []bool{false, true} {
		t.Run(fmt.Sprintf("older=%v", older), func(t *testing.T) {
			sh, ch := hostPair(t)
			srv := startServer(t, sh, paidConfig(nil))
			log := &groupLog{}
			cl, ctx := serveGroupExperts(t, srv, mc, ch, log, 2, 3, 4, 5)
			if older {
				sh.RemoveStreamHandler(neuropb.ExpertProtocol)
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
					cur, _ := ch.Peerstore().SupportsProtocols(sh.ID(), neuropb.ExpertProtocol)
					if len(cur) == 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("the client still takes the node for a 1.2.0 one after 10 s")
					}
				}
			}
			token := make([]float32, embd)
			for i := range token {
				token[i] = float32(i) - 2.5
			}
			two := append(slices.Clone(token), 7, 7, 7, 7, 7, 7, 7, 7)
			reqs := []Request{
				{Model: mc, Expert: 0, Hidden: token, N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32, Escrow: 8},
				{Model: mc, Expert: 1, Hidden: token, N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32, Escrow: 8},
				{Model: mc, Expert: 2, Hidden: two, N: 2, DType: neuropb.WireDType_WIRE_DTYPE_F32, Escrow: 8},
				{Model: mc, Expert: 3, Hidden: token, N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32, Escrow: 8},
			}
			res := cl.CallGroup(ctx, sh.ID(), reqs)
			sent := 0
			for i, rq := range reqs {
				if res[i].Err != nil {
					t.Fatalf("member %d: %v", i, res[i].Err)
				}
				alone, err := cl.Call(ctx, sh.ID(), rq)
				if err != nil {
					t.Fatal(err)
				}
				g := res[i].Resp
				if !slices.Equal(g.Output, alone.Output) {
					t.Fatalf("member %d: output %v in the group, %v alone", i, g.Output, alone.Output)
				}
				if g.Receipt == nil || !bytes.Equal(g.Receipt.GetInputDigest(), alone.Receipt.GetInputDigest()) {
					t.Fatalf("member %d: receipt %v in the group, %v alone", i, g.Receipt, alone.Receipt)
				}
				sent += g.WireBytes - len(g.Output)*4
			}
			// 5 rows asked, 2 distinct: the token and the second row.
			want := 5 * embd * 4
			if !older {
				want = 2 * embd * 4
			}
			if sent != want {
				t.Fatalf("%d bytes of rows sent, want %d", sent, want)
			}
		})
	}
}

// Groups waiting to compute are bounded as a batcher's queue is
// (MaxQueue): past it a group's members are answered busy at once, and
// once the node has room it computes groups again.
func TestGroupsAreBounded(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	cfg := DefaultConfig()
	cfg.MaxQueue = 1
	srv := startServer(t, sh, cfg)
	const embd = 8
	log := &groupLog{hold: make(chan struct{})}
	cl, ctx := serveGroupExperts(t, srv, mc, ch, log, 2, 2)
	reqs := []Request{{Model: mc, Expert: 0, Hidden: make([]float32, embd), N: 1}, {Model: mc, Expert: 1, Hidden: make([]float32, embd), N: 1}}
	first, err := cl.SendGroup(ctx, sh.ID(), reqs)
	if err != nil {
		t.Fatal(err)
	}
	// The first holds the one slot (it computes once hold closes).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		log.mu.Lock()
		n := len(log.groups)
		log.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first group never started computing")
		}
	}
	for i, r := range cl.CallGroup(ctx, sh.ID(), reqs) {
		var re *RemoteError
		if !errors.As(r.Err, &re) || re.Code != neuropb.ExpertError_CODE_BUSY {
			t.Fatalf("member %d of a group past the bound: %v, want busy", i, r.Err)
		}
	}
	close(log.hold)
	for i := range reqs {
		if _, err := first.Wait(ctx, i); err != nil {
			t.Fatalf("member %d of the first group: %v", i, err)
		}
	}
	// The first group's slot frees once its goroutine ends, just after
	// its answers went out.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		res := cl.CallGroup(ctx, sh.ID(), reqs)
		var re *RemoteError
		if errors.As(res[0].Err, &re) && re.Code == neuropb.ExpertError_CODE_BUSY && time.Now().Before(deadline) {
			continue
		}
		for i, r := range res {
			if r.Err != nil {
				t.Fatalf("member %d of a group once there is room: %v", i, r.Err)
			}
		}
		break
	}
}

// One goroutine computes a caller's groups, one after the other: the
// group worker takes the next instead of a goroutine started for each
// (whose stack grew to the answer's depth every time), and ends when the
// server closes.
func TestGroupWorkerTakesTheNextGroup(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	srv, err := NewServer(sh, DefaultConfig(), quiet())
	if err != nil {
		t.Fatal(err)
	}
	log := &groupLog{}
	cl, ctx := serveGroupExperts(t, srv, mc, ch, log, 2, 3)
	const groups = 20
	for g := range groups {
		x := []float32{float32(g), 1, 2, 3, 4, 5, 6, 7}
		reqs := []Request{{Model: mc, Expert: 0, Hidden: x, N: 1}, {Model: mc, Expert: 1, Hidden: x, N: 1}}
		for i, r := range cl.CallGroup(ctx, sh.ID(), reqs) {
			if r.Err != nil {
				t.Fatalf("group %d, member %d: %v", g, i, r.Err)
			}
			if want := float32(i+2) * x[0]; r.Resp.Output[0] != want {
				t.Fatalf("group %d, member %d: %v, want %v first", g, i, r.Resp.Output[:2], want)
			}
		}
	}
	log.mu.Lock()
	computed := len(log.groups)
	log.mu.Unlock()
	// An answer goes out before its worker waits for the next group: a
	// group that comes in between starts another worker, rarely.
	if n := srv.workers.Load(); computed != groups || n < 1 || n > groups/4 {
		t.Fatalf("%d groups computed by %d workers: want %d by a few", computed, n, groups)
	}
	closed := make(chan struct{})
	go func() {
		srv.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for an idle group worker")
	}
}

// paidConfig is the default config of a node that requires payment, with
// escrow 99 spent (each payment asked is told to paid, if set first), and
// signs receipts "signed".
func paidConfig(paid func(escrow, flops uint64)) Config {
	cfg := DefaultConfig()
	cfg.Payment = func(_ context.Context, _ peer.ID, escrow, flops uint64) error {
		if paid != nil {
			paid(escrow, flops)
		}
		if escrow == 99 {
			return errors.New("escrow 99 is spent")
		}
		return nil
	}
	cfg.SignReceipts = func(rs []*neuropb.UsageReceipt) error {
		for _, r := range rs {
			r.Signature = []byte("signed")
		}
		return nil
	}
	return cfg
}

// A span node pays the experts it calls for a head from the head's
// escrow: the head signs it a delegation (SignDelegation), which the call
// carries, and the expert node charges the call to the head (its payment
// check sees the head as the payer). A call without one is charged to its
// caller; a delegation to another node, of another escrow, expired, or
// not signed by the node it names is refused.
func TestDelegatedEscrow(t *testing.T) {
	mc, m, dir := tinyShards(t, model.F32)
	sh, ch := hostPair(t)
	headKey, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	head, _ := peer.IDFromPrivateKey(headKey)
	otherKey, _, _ := crypto.GenerateEd25519Key(nil)
	var mu sync.Mutex
	var payers []peer.ID
	cfg := DefaultConfig()
	cfg.Payment = func(_ context.Context, from peer.ID, escrow, _ uint64) error {
		mu.Lock()
		defer mu.Unlock()
		payers = append(payers, from)
		if from != head || escrow != 7 {
			return errors.New("escrow 7 is the head's")
		}
		return nil
	}
	srv := startServer(t, sh, cfg)
	if err := srv.Add(mc, 0, 0, loadExpert(t, dir, m.GetExperts()[0])); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	c := NewClient(ch, quiet())
	defer c.Close()
	embd := int(m.GetParams().GetEmbd())
	hour := time.Now().Add(time.Hour)
	good, _ := SignDelegation(headKey, 7, ch.ID(), hour)
	forged, _ := SignDelegation(otherKey, 7, ch.ID(), hour)
	forged.Signer = []byte(head) // names the head, signed by another
	for _, tc := range []struct {
		name string
		d    func() *neuropb.EscrowDelegation
		ok   bool
	}{
		{"none", func() *neuropb.EscrowDelegation { return nil }, false},
		{"the head's", func() *neuropb.EscrowDelegation { return good }, true},
		{"to another node", func() *neuropb.EscrowDelegation { d, _ := SignDelegation(headKey, 7, sh.ID(), hour); return d }, false},
		{"of another escrow", func() *neuropb.EscrowDelegation { d, _ := SignDelegation(headKey, 8, ch.ID(), hour); return d }, false},
		{"expired", func() *neuropb.EscrowDelegation {
			d, _ := SignDelegation(headKey, 7, ch.ID(), time.Now().Add(-time.Second))
			return d
		}, false},
		{"forged", func() *neuropb.EscrowDelegation { return forged }, false},
	} {
		req := Request{Model: mc, Hidden: make([]float32, 2*embd), N: 2, Escrow: 7, DType: neuropb.WireDType_WIRE_DTYPE_F32}
		if d := tc.d(); d != nil {
			req.Delegations = []*neuropb.EscrowDelegation{d}
		}
		_, err := c.Call(t.Context(), sh.ID(), req)
		if (err == nil) != tc.ok || (!tc.ok && !strings.Contains(err.Error(), "PAYMENT_REQUIRED")) {
			t.Errorf("%s: %v, want paid %v", tc.name, err, tc.ok)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	// The head paid for the delegated call; the caller was asked for the
	// calls without a delegation of their escrow (none, another escrow's);
	// the bad delegations of it never reached the payment check.
	if fmt.Sprint(payers) != fmt.Sprint([]peer.ID{ch.ID(), head, ch.ID()}) {
		t.Fatalf("payers %v, want the caller, the head, the caller", payers)
	}
}

// A session retired (a direct connection replaced its relayed one) while
// a call that took it had yet to write: the call finds it retired rather
// than writing on a closed stream, and is sent on the new session; a
// stream that breaks under a write says ErrStreamClosed.
func TestRetiredSessionSendsOnTheNewOne(t *testing.T) {
	mc, m, dir := tinyShards(t, model.F32)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	if err := srv.Add(mc, 0, 0, loadExpert(t, dir, m.GetExperts()[0])); err != nil {
		t.Fatal(err)
	}
	if err := srv.Add(mc, 0, 1, loadExpert(t, dir, m.GetExperts()[1])); err != nil {
		t.Fatal(err)
	}
	srv.Start()
	cl := NewClient(ch, quiet())
	defer cl.Close()
	embd := int(m.GetParams().GetEmbd())
	req := Request{Model: mc, Hidden: make([]float32, embd), N: 1}
	if _, err := cl.Call(t.Context(), sh.ID(), req); err != nil {
		t.Fatal(err)
	}
	retire := func() *session {
		cl.mu.Lock()
		s := cl.sessions[sh.ID()]
		delete(cl.sessions, sh.ID())
		cl.mu.Unlock()
		s.mu.Lock()
		s.retired = true
		s.mu.Unlock()
		s.retireIfIdle()
		return s
	}
	s := retire()
	msg, err := message(&req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.send(t.Context(), sh.ID(), s, msg); !errors.Is(err, errRetired) {
		t.Fatalf("a write on a retired session: %v, want errRetired", err)
	}
	// Calls and groups then take a new session.
	if _, err := cl.Call(t.Context(), sh.ID(), req); err != nil {
		t.Fatal(err)
	}
	g, err := cl.SendGroup(t.Context(), sh.ID(), []Request{req, {Model: mc, Expert: 1, Hidden: make([]float32, embd), N: 1}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := g.Wait(t.Context(), i); err != nil {
			t.Fatalf("group member %d: %v", i, err)
		}
	}
	cl.mu.Lock()
	s = cl.sessions[sh.ID()]
	cl.mu.Unlock()
	s.st.Reset()
	if _, err := cl.send(t.Context(), sh.ID(), s, msg); !errors.Is(err, ErrStreamClosed) {
		t.Fatalf("a write on a broken stream: %v, want ErrStreamClosed", err)
	}
}

// WaitOr gives up on a member's answer when its expiry fires or its
// context ends, without forgetting the member: the answer that comes
// later is still the member's. An answer already in is taken even when
// the expiry has fired (a round that waited out one member's hedge delay
// still takes the others' answers, which came in the same message).
func TestWaitOrKeepsTheMemberWaiting(t *testing.T) {
	mc, _, _ := tinyShards(t, model.Q4_0)
	sh, ch := hostPair(t)
	srv := startServer(t, sh, DefaultConfig())
	log := &groupLog{hold: make(chan struct{})}
	cl, ctx := serveGroupExperts(t, srv, mc, ch, log, 2, 3)
	x := []float32{1, 2, 3, 4, 5, 6, 7, 8}
	reqs := []Request{
		{Model: mc, Expert: 0, Hidden: x, N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32},
		{Model: mc, Expert: 1, Hidden: x, N: 1, DType: neuropb.WireDType_WIRE_DTYPE_F32},
	}
	check := func(what string, resp *Response, err error, f float32) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for i, v := range resp.Output {
			if v != f*x[i] {
				t.Fatalf("%s: output %v, want %v × the input", what, resp.Output, f)
			}
		}
	}
	fired := make(chan time.Time)
	close(fired)
	g, err := cl.SendGroup(ctx, sh.ID(), reqs)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, ok := g.WaitOr(ctx, 0, fired); ok {
		t.Fatal("member 0 answered while its group was held")
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, ok := g.WaitOr(ended, 1, nil); ok {
		t.Fatal("member 1 answered while its group was held")
	}
	close(log.hold)
	resp, err := g.Wait(ctx, 0)
	check("member 0 after its expiry", resp, err, 2)
	resp, err, ok := g.WaitOr(ctx, 1, nil)
	if !ok {
		t.Fatal("member 1 gave up without an expiry")
	}
	check("member 1 after its context ended", resp, err, 3)
	// With both answers in, a fired expiry does not win (a random choice
	// between the two would, about every other time).
	for range 8 {
		g, err := cl.SendGroup(ctx, sh.ID(), reqs)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			for try := 0; len(g.chs[i]) == 0; try++ {
				if try == 2000 {
					t.Fatalf("member %d's answer did not come in 10 s", i)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		for i, f := range []float32{2, 3} {
			resp, err, ok := g.WaitOr(ctx, i, fired)
			if !ok {
				t.Fatalf("member %d: its answer was in, and the fired expiry won", i)
			}
			check(fmt.Sprintf("member %d", i), resp, err, f)
		}
	}
}
