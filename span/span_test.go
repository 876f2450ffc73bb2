package span

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// fakeGating computes a toy model whose every output depends on the
// tokens before it through a per-layer cache, so that a span that lost
// or skipped part of a session gives other numbers.
type fakeGating struct {
	hp   moe.Hparams
	part moe.Part
	// stallAfter, if positive, makes every Layers call after that many
	// block until its context ends (a node that stalls).
	stallAfter int
	// slow, if set, is how long call number c (from 1) waits before it
	// computes (a slow node), unless its context ends first.
	slow func(c int64) time.Duration
	// lieFrom, if positive, adds 0.5 to the span's output rows at
	// positions from lieFrom on (a node that lies).
	lieFrom int
	calls   atomic.Int64
}

func newFake(part moe.Part) *fakeGating {
	return &fakeGating{hp: moe.Hparams{Layers: 6, Embd: 4, Experts: 2, ExpertsUsed: 1, Vocab: 4, CtxLen: 64}, part: part}
}

func (g *fakeGating) Hparams() moe.Hparams { return g.hp }
func (g *fakeGating) Close() error         { return nil }
func (g *fakeGating) NewSession(nCtx int) (moe.Session, error) {
	if nCtx <= 0 {
		nCtx = g.hp.CtxLen
	}
	return &fakeSession{g: g, nCtx: nCtx, cache: make([][]float32, g.hp.Layers)}, nil
}

type fakeSession struct {
	g     *fakeGating
	nCtx  int
	pos   int
	cache [][]float32 // per layer, one value per position
}

func (s *fakeSession) Len() int     { return s.pos }
func (s *fakeSession) Close() error { return nil }
func (s *fakeSession) Rewind(pos int) error {
	if pos > s.pos {
		return fmt.Errorf("rewind to %d of %d", pos, s.pos)
	}
	s.pos = pos
	for l := range s.cache {
		if len(s.cache[l]) > pos {
			s.cache[l] = s.cache[l][:pos]
		}
	}
	return nil
}

func (s *fakeSession) Embed(tokens []int32) ([]float32, error) {
	if !s.g.part.Head {
		return nil, errors.New("no head")
	}
	x := make([]float32, 0, len(tokens)*s.g.hp.Embd)
	for _, t := range tokens {
		for i := range s.g.hp.Embd {
			x = append(x, float32(t)+float32(i)/8)
		}
	}
	return x, nil
}

func (s *fakeSession) Layers(ctx context.Context, x []float32, n int, want moe.Want, experts moe.Experts) ([]float32, int, error) {
	c := s.g.calls.Add(1)
	if s.g.stallAfter > 0 && c > int64(s.g.stallAfter) {
		<-ctx.Done()
		return nil, 0, ctx.Err()
	}
	if s.g.slow != nil {
		select {
		case <-time.After(s.g.slow(c)):
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
	e := s.g.hp.Embd
	if len(x) != n*e {
		return nil, 0, fmt.Errorf("%d floats for %d rows", len(x), n)
	}
	if s.pos+n > s.nCtx {
		return nil, 0, moe.ErrContextFull
	}
	rows := n
	for l := s.g.part.First; l < s.g.part.End; l++ {
		y := make([]float32, rows*e)
		for r := range rows {
			s.cache[l] = append(s.cache[l][:s.pos+r], x[r*e])
			var hist float32
			for _, v := range s.cache[l] {
				hist += v
			}
			for i := range e {
				y[r*e+i] = x[r*e+i]*0.5 + hist/float32(len(s.cache[l])) + float32(l)
				if s.g.lieFrom > 0 && s.pos+r >= s.g.lieFrom && l == s.g.part.End-1 {
					y[r*e+i] += 0.5
				}
			}
		}
		if _, err := experts.MoE(ctx, l, y, rows, make([]int32, rows), make([]float32, rows)); err != nil {
			return nil, 0, err
		}
		if want == moe.WantLast && l == s.g.hp.Layers-1 {
			y, rows = y[(rows-1)*e:], 1
		}
		x = y
	}
	s.pos += n
	return x, rows, nil
}

func (s *fakeSession) Output(x []float32, rows int) ([][]float32, error) {
	out := make([][]float32, rows)
	for r := range rows {
		out[r] = slices.Clone(x[r*s.g.hp.Embd : (r+1)*s.g.hp.Embd])
	}
	return out, nil
}

func (s *fakeSession) Forward(ctx context.Context, tokens []int32, experts moe.Experts) ([]float32, error) {
	x, _ := s.Embed(tokens)
	x, rows, err := s.Layers(ctx, x, len(tokens), moe.WantLast, experts)
	if err != nil {
		return nil, err
	}
	l, _ := s.Output(x, rows)
	return l[0], nil
}

func (s *fakeSession) ForwardEach(ctx context.Context, tokens []int32, experts moe.Experts) ([][]float32, error) {
	x, _ := s.Embed(tokens)
	x, rows, err := s.Layers(ctx, x, len(tokens), moe.WantEach, experts)
	if err != nil {
		return nil, err
	}
	return s.Output(x, rows)
}

// noExperts answers every MoE call with zeros.
type noExperts struct{}

func (noExperts) MoE(_ context.Context, _ int, _ []float32, n int, _ []int32, _ []float32) ([]float32, error) {
	return make([]float32, n*4), nil
}

func newHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

var testModel = func() cid.Cid {
	mh, _ := multihash.Sum([]byte("span test model"), multihash.SHA2_256, -1)
	return cid.NewCidV1(cid.Raw, mh)
}()

// serve starts a span server of layers [first, end) on a new host that
// head is connected to.
func serve(t *testing.T, head host.Host, first, end int, mod func(*ServerConfig)) (*Server, host.Host) {
	t.Helper()
	h := newHost(t)
	part := moe.Part{First: first, End: end}
	cfg := ServerConfig{Model: testModel, Gating: newFake(part), Part: part, Experts: func(peer.ID) moe.Experts { return noExperts{} }}
	if mod != nil {
		mod(&cfg)
	}
	s, err := NewServer(h, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := head.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return s, h
}

// generate runs a prompt, decode steps, a verification of three tokens,
// a rewind and two more steps on s, and returns every logit row.
func generate(t *testing.T, s moe.Session, between func(step int)) [][]float32 {
	t.Helper()
	ctx := t.Context()
	var out [][]float32
	l, err := s.Forward(ctx, []int32{1, 2, 3, 1, 2}, noExperts{})
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, l)
	for step, tok := range []int32{3, 0, 2, 1} {
		if between != nil {
			between(step)
		}
		if l, err = s.Forward(ctx, []int32{tok}, noExperts{}); err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	each, err := s.ForwardEach(ctx, []int32{2, 2, 3}, noExperts{})
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, each...)
	if err := s.Rewind(s.Len() - 2); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []int32{1, 0} {
		if l, err = s.Forward(ctx, []int32{tok}, noExperts{}); err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

func chainOf(t *testing.T, head host.Host, part moe.Part, hops ...Hop) *Chain {
	t.Helper()
	c, err := NewChain(ChainConfig{Model: testModel, Head: newFake(part), Part: part, Hops: hops, Dialer: head, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A head and two span nodes compute what one whole session computes —
// with a rewind and a verification of several tokens — and a head that
// keeps the first layers itself too; closing the session drops it on the
// span nodes; the servers leave no goroutine behind.
func TestChainComputesTheWholeModel(t *testing.T) {
	snap := leaktest.Take("github.com/neuro-p2p/neuro/span")
	whole, _ := newFake(moe.Part{First: 0, End: 6, Head: true}).NewSession(0)
	want := generate(t, whole, nil)

	head := newHost(t)
	a, ah := serve(t, head, 0, 2, nil)
	b, bh := serve(t, head, 2, 6, nil)
	c := chainOf(t, head, moe.Part{Head: true}, Hop{0, 2, []peer.ID{ah.ID()}}, Hop{2, 6, []peer.ID{bh.ID()}})
	s, _ := c.NewSession(0)
	got := generate(t, s, nil)
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("chain %v\nwhole %v", got, want)
	}
	st := s.(*Session).Stats()
	if st.Requests != 2*st.Passes || st.Replays != 0 || st.Failovers != 0 {
		t.Fatalf("stats %+v: want two requests a pass, no replay", st)
	}
	if a.Sessions() != 1 || b.Sessions() != 1 {
		t.Fatalf("%d and %d sessions on the span nodes", a.Sessions(), b.Sessions())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if a.Sessions() != 0 || b.Sessions() != 0 {
		t.Fatalf("%d and %d sessions after the head closed its own", a.Sessions(), b.Sessions())
	}

	// The head computing layers 0-1 itself.
	c = chainOf(t, head, moe.Part{First: 0, End: 2, Head: true}, Hop{2, 6, []peer.ID{bh.ID()}})
	s, _ = c.NewSession(0)
	if got := generate(t, s, nil); !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("head with layers: %v\nwhole %v", got, want)
	}
	s.Close()
	a.Close()
	b.Close()
	if err := b.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	snap.Check(t)
}

// A span node that dies mid-generation is replaced by the hop's next
// provider, which is sent the session's earlier inputs and carries on
// with the same numbers; one that forgot an idle session is sent them
// again too.
func TestSpanFailoverAndReplay(t *testing.T) {
	whole, _ := newFake(moe.Part{First: 0, End: 6, Head: true}).NewSession(0)
	want := generate(t, whole, nil)

	head := newHost(t)
	_, ah := serve(t, head, 0, 3, nil)
	dying, dh := serve(t, head, 3, 6, nil)
	_, bh := serve(t, head, 3, 6, nil)
	c := chainOf(t, head, moe.Part{Head: true}, Hop{0, 3, []peer.ID{ah.ID()}}, Hop{3, 6, []peer.ID{dh.ID(), bh.ID()}})
	s, _ := c.NewSession(0)
	got := generate(t, s, func(step int) {
		if step == 2 {
			dying.Close()
		}
	})
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("after a failover %v\nwhole %v", got, want)
	}
	if st := s.(*Session).Stats(); st.Failovers != 1 || st.Replays != 3 {
		t.Fatalf("stats %+v: want 1 failover and 3 replayed requests (the prompt, two steps)", st)
	}
	// 7 rows of 4 floats replayed; the recovery holds the replay.
	if st := s.(*Session).Stats(); st.ReplayBytes != 7*4*4 || st.ReplayTime <= 0 || st.Recovery < st.ReplayTime {
		t.Fatalf("stats %+v: want 112 bytes replayed, within the recovery", st)
	}
	s.Close()

	// A server that drops idle sessions quickly: the session is replayed
	// whenever it comes back.
	_, fh := serve(t, head, 3, 6, func(c *ServerConfig) { c.IdleTimeout = 100 * time.Millisecond })
	c = chainOf(t, head, moe.Part{Head: true}, Hop{0, 3, []peer.ID{ah.ID()}}, Hop{3, 6, []peer.ID{fh.ID()}})
	s, _ = c.NewSession(0)
	got = generate(t, s, func(int) { time.Sleep(300 * time.Millisecond) })
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("with idle sessions dropped %v\nwhole %v", got, want)
	}
	if st := s.(*Session).Stats(); st.Replays == 0 || st.Failovers != 0 {
		t.Fatalf("stats %+v: want replays and no failover", st)
	}
	s.Close()
}

// A span node refuses requests for layers it does not serve, malformed
// ones, and a session it does not hold past position 0; a chain refuses
// hops that do not cover the layers in order.
func TestSpanRefusals(t *testing.T) {
	head := newHost(t)
	_, h := serve(t, head, 0, 3, nil)
	st, err := head.NewStream(t.Context(), h.ID(), neuropb.SpanProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r, w := wire.NewReader(st, neuropb.MaxSpanMessageSize), wire.NewWriter(st, neuropb.MaxSpanMessageSize)
	session := make([]byte, neuropb.SessionIDLen)
	rows := &neuropb.Tensor{Dtype: neuropb.WireDType_WIRE_DTYPE_F32, Shape: []uint32{1, 4}, Data: make([]byte, 16)}
	for _, c := range []struct {
		req  *neuropb.SpanRequest
		code neuropb.SpanError_Code
	}{
		{&neuropb.SpanRequest{Model: testModel.Bytes(), First: 0, End: 4, Session: session, Hidden: rows}, neuropb.SpanError_CODE_UNKNOWN_SPAN},
		{&neuropb.SpanRequest{Model: testModel.Bytes(), First: 0, End: 3, Session: session[:3], Hidden: rows}, neuropb.SpanError_CODE_BAD_REQUEST},
		{&neuropb.SpanRequest{Model: testModel.Bytes(), First: 0, End: 3, Session: session,
			Hidden: &neuropb.Tensor{Dtype: neuropb.WireDType_WIRE_DTYPE_F16, Shape: []uint32{1, 4}, Data: make([]byte, 8)}}, neuropb.SpanError_CODE_BAD_REQUEST},
		{&neuropb.SpanRequest{Model: testModel.Bytes(), First: 0, End: 3, Session: session, Pos: 5, Hidden: rows}, neuropb.SpanError_CODE_SESSION_BEHIND},
		{&neuropb.SpanRequest{Model: testModel.Bytes(), First: 0, End: 3, Session: session, Pos: 0,
			Hidden: &neuropb.Tensor{Dtype: neuropb.WireDType_WIRE_DTYPE_F32, Shape: []uint32{1, 8}, Data: make([]byte, 32)}}, neuropb.SpanError_CODE_BAD_REQUEST},
	} {
		if err := w.Write(c.req); err != nil {
			t.Fatal(err)
		}
		resp := &neuropb.SpanResponse{}
		if err := r.Read(resp); err != nil {
			t.Fatal(err)
		}
		if resp.GetError().GetCode() != c.code {
			t.Errorf("%v: answered %v, want %v", c.req, resp.GetError(), c.code)
		}
	}
	for _, hops := range [][]Hop{
		{{0, 3, []peer.ID{h.ID()}}},                            // layers 3-5 missing
		{{0, 3, []peer.ID{h.ID()}}, {4, 6, []peer.ID{h.ID()}}}, // a gap
		{{0, 3, []peer.ID{h.ID()}}, {3, 6, nil}},               // no provider
		{{1, 3, []peer.ID{h.ID()}}, {3, 6, []peer.ID{h.ID()}}}, // not from layer 0
		{{0, 3, []peer.ID{h.ID()}}, {3, 7, []peer.ID{h.ID()}}}, // past the last layer
	} {
		if _, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true}, Hops: hops, Dialer: head}); err == nil {
			t.Errorf("hops %v accepted", hops)
		}
	}
}

// Plan finds the chain of fewest hops over the announced spans, longer
// spans and more providers first, or says the layers are not covered.
func TestPlan(t *testing.T) {
	a, b, c := peer.ID("a"), peer.ID("b"), peer.ID("c")
	spans := map[[2]int][]peer.ID{
		{0, 2}: {a}, {2, 4}: {a, b}, {4, 8}: {b}, {0, 4}: {c}, {4, 6}: {a, b, c}, {6, 8}: {c},
		{1, 8}: {a}, // never usable from layer 0
	}
	hops, ok := Plan(spans, 0, 8)
	if !ok || fmt.Sprint(hops) != fmt.Sprint([]Hop{{0, 4, []peer.ID{c}}, {4, 8, []peer.ID{b}}}) {
		t.Fatalf("plan %v %v: want [0,4) by c then [4,8) by b", hops, ok)
	}
	if hops, ok := Plan(spans, 2, 8); !ok || len(hops) != 2 || hops[0].First != 2 || hops[1].First != 4 || hops[1].End != 8 {
		t.Fatalf("plan from layer 2: %v %v", hops, ok)
	}
	if hops, ok := Plan(spans, 8, 8); !ok || len(hops) != 0 {
		t.Fatalf("nothing to plan: %v %v", hops, ok)
	}
	delete(spans, [2]int{4, 8})
	delete(spans, [2]int{6, 8})
	if hops, ok := Plan(spans, 0, 8); ok {
		t.Fatalf("layers 6-7 uncovered, planned %v", hops)
	}
	if _, ok := Plan(nil, 0, 8); ok {
		t.Fatal("no spans, planned")
	}
}

// A span node that stalls (answers nothing, as a SIGKILLed peer on QUIC)
// is taken for dead once a request takes ten times its recent worst, not
// after the chain's whole timeout (here longer than the test may run):
// the next provider is replayed and the numbers stay the whole model's.
func TestStalledSpanIsReplacedWithinItsDeadline(t *testing.T) {
	whole, _ := newFake(moe.Part{First: 0, End: 6, Head: true}).NewSession(0)
	want := generate(t, whole, nil)
	head := newHost(t)
	_, ah := serve(t, head, 0, 6, func(c *ServerConfig) {
		g := newFake(moe.Part{First: 0, End: 6})
		g.stallAfter = 3
		c.Gating = g
	})
	_, bh := serve(t, head, 0, 6, nil)
	c, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true},
		Hops: []Hop{{0, 6, []peer.ID{ah.ID(), bh.ID()}}}, Dialer: head, Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := c.NewSession(0)
	defer s.Close()
	done := make(chan [][]float32, 1)
	go func() { done <- generate(t, s, nil) }()
	select {
	case got := <-done:
		if !slices.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("after a stalled provider %v\nwhole %v", got, want)
		}
	case <-time.After(time.Minute):
		t.Fatal("the chain waited on the stalled provider for a minute")
	}
	if st := s.(*Session).Stats(); st.Failovers != 1 || st.Replays != 3 {
		t.Fatalf("stats %+v: want 1 failover and 3 replayed requests", st)
	}
}

// Hedging: a provider that turns slow (its requests take 10 s; its
// deadline is longer than its hedge delay) is overtaken by the hop's next
// provider, sent the
// request after the session's inputs replayed, and the session moves to
// it; a provider slow once, whose hedge is slower still (its replay takes
// seconds), keeps the session. Either way the numbers are the whole
// model's.
func TestSpanHedging(t *testing.T) {
	whole, _ := newFake(moe.Part{First: 0, End: 6, Head: true}).NewSession(0)
	want := generate(t, whole, nil)
	head := newHost(t)
	slowFake := func(slow func(int64) time.Duration) func(*ServerConfig) {
		return func(c *ServerConfig) {
			g := newFake(moe.Part{First: 0, End: 6})
			g.slow = slow
			c.Gating = g
		}
	}
	chain := func(a, b peer.ID) *Chain {
		c, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true},
			Hops: []Hop{{0, 6, []peer.ID{a, b}}}, Dialer: head, Timeout: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	_, turnsSlow := serve(t, head, 0, 6, slowFake(func(c int64) time.Duration {
		if c > 3 {
			return 10 * time.Second
		}
		return 0
	}))
	_, fast := serve(t, head, 0, 6, nil)
	s, _ := chain(turnsSlow.ID(), fast.ID()).NewSession(0)
	got := generate(t, s, nil)
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("after a hedge %v\nwhole %v", got, want)
	}
	if st := s.(*Session).Stats(); st.Hedges != 1 || st.Failovers != 1 || st.Replays != 3 || st.Recovery <= 0 {
		t.Fatalf("stats %+v: want one hedge that took over, replaying 3 requests", st)
	}
	s.Close()

	_, slowOnce := serve(t, head, 0, 6, slowFake(func(c int64) time.Duration {
		if c == 4 {
			return 1500 * time.Millisecond // past its hedge delay, within its deadline (at least 2 s)
		}
		return 0
	}))
	_, slower := serve(t, head, 0, 6, slowFake(func(int64) time.Duration { return 5 * time.Second }))
	s, _ = chain(slowOnce.ID(), slower.ID()).NewSession(0)
	got = generate(t, s, nil)
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("after a hedge that lost %v\nwhole %v", got, want)
	}
	if st := s.(*Session).Stats(); st.Hedges != 1 || st.Failovers != 0 || st.Requests != st.Passes {
		t.Fatalf("stats %+v: want one hedge, lost, and the session kept on its provider", st)
	}
	s.Close()
}

// Re-execution: each request a session made through one provider (as
// OnRequest gives them), computed again on another provider in a session
// of its own (the earlier inputs replayed in their batches), gives the
// same numbers to the bit; on a provider that lies about positions from 6
// on, exactly the requests holding such a position differ; a provider
// that requires payment refuses the check of an unpaid session.
func TestSpanReExecution(t *testing.T) {
	head := newHost(t)
	_, a := serve(t, head, 0, 6, nil)
	bSrv, b := serve(t, head, 0, 6, nil)
	_, liar := serve(t, head, 0, 6, func(c *ServerConfig) {
		g := newFake(moe.Part{First: 0, End: 6})
		g.lieFrom = 6
		c.Gating = g
	})
	_, paid := serve(t, head, 0, 6, func(c *ServerConfig) {
		c.FLOPsPerToken = 100
		c.SignReceipt = func(r *neuropb.UsageReceipt) error { r.Signature = []byte("signed"); return nil }
		c.Payment = func(_ context.Context, _ peer.ID, escrow, _ uint64) error {
			if escrow != 7 {
				return errors.New("no escrow")
			}
			return nil
		}
	})
	var tasks []CheckTask
	c, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true},
		Hops: []Hop{{0, 6, []peer.ID{a.ID()}}}, Dialer: head, OnRequest: func(t CheckTask) { tasks = append(tasks, t) }})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := c.NewSession(0)
	generate(t, s, nil)
	s.Close()
	if len(tasks) != s.(*Session).Stats().Requests || len(tasks) != 8 {
		t.Fatalf("%d tasks for %+v", len(tasks), s.(*Session).Stats())
	}
	for i, task := range tasks {
		if task.Provider != a.ID() || task.Hop.First != 0 || task.Hop.End != 6 || len(task.Input) != task.Rows*4 || len(task.Output) == 0 {
			t.Fatalf("task %d: %+v", i, task)
		}
		got, _, err := c.ReExecute(t.Context(), task, b.ID())
		if err != nil || !slices.Equal(got, task.Output) {
			t.Fatalf("task %d (pos %d) on another honest provider: %v, %v; want %v", i, task.Pos, got, err, task.Output)
		}
		// A node serving the span re-runs a verdict's request from the
		// earlier rows the task gives (as one batch: the same here).
		history, prior := task.History()
		if len(history) != task.Pos*4 || prior != neuropb.SpanChainStart().Next(history, 4) {
			t.Fatalf("task %d: %d earlier floats for position %d", i, len(history), task.Pos)
		}
		if got, err := bSrv.Rerun(t.Context(), head.ID(), history, task.Input, task.Want()); err != nil || !slices.Equal(got, task.Output) {
			t.Fatalf("task %d: rerun %v, %v; want %v", i, got, err, task.Output)
		}
		lie, _, err := c.ReExecute(t.Context(), task, liar.ID())
		if err != nil {
			t.Fatal(err)
		}
		if lies := task.Pos+task.Rows > 6; slices.Equal(lie, task.Output) == lies {
			t.Fatalf("task %d (positions %d-%d): the liar's %v against %v", i, task.Pos, task.Pos+task.Rows-1, lie, task.Output)
		}
	}
	if _, _, err := c.ReExecute(t.Context(), tasks[0], paid.ID()); err == nil || !strings.Contains(err.Error(), "PAYMENT_REQUIRED") {
		t.Fatalf("an unpaid check on a node that requires payment: %v", err)
	}
	// A paid session's requests are checked from its escrow.
	var paidTasks []CheckTask
	pc, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true},
		Hops: []Hop{{0, 6, []peer.ID{paid.ID()}}}, Dialer: head, OnRequest: func(t CheckTask) { paidTasks = append(paidTasks, t) }})
	if err != nil {
		t.Fatal(err)
	}
	ps, err := pc.NewPaidSession(0, 7, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	for _, toks := range [][]int32{{1, 2, 3}, {2}} {
		if _, err := ps.Forward(t.Context(), toks, noExperts{}); err != nil {
			t.Fatal(err)
		}
	}
	got, rcs, err := pc.ReExecute(t.Context(), paidTasks[1], paid.ID())
	if err != nil || !slices.Equal(got, paidTasks[1].Output) {
		t.Fatalf("a paid session's check: %v, %v; want %v", got, err, paidTasks[1].Output)
	}
	// Each receipt signs its request's rows after the digest chain of the
	// session's earlier ones: the check's last receipt, in a session of its
	// own, signs what the task's did.
	for i, task := range paidTasks {
		_, prior := task.History()
		if rc := task.Receipt; rc == nil || !bytes.Equal(rc.GetInputDigest(), neuropb.SpanRequestDigest(prior, task.Want(), prior.Next(task.Input, 4))) || rc.GetSpanEnd() != 6 {
			t.Fatalf("task %d's receipt %v does not bind the session's rows", i, rc)
		}
	}
	if len(rcs) == 0 || !bytes.Equal(rcs[len(rcs)-1].GetInputDigest(), paidTasks[1].Receipt.GetInputDigest()) {
		t.Fatalf("the check's receipts %v: the last is not for the task's request", rcs)
	}
}

// A span node that requires payment refuses a request whose escrow its
// check does not accept, and the chain gives up at once (every provider
// would refuse it); one it accepts is computed, with the escrow and the
// FLOPs of its rows.
func TestSpanPaymentRequired(t *testing.T) {
	head := newHost(t)
	var asked atomic.Int64
	_, h := serve(t, head, 0, 6, func(c *ServerConfig) {
		c.FLOPsPerToken = 100
		c.Payment = func(_ context.Context, from peer.ID, escrow, flops uint64) error {
			if from != head.ID() || flops%100 != 0 || flops == 0 {
				return fmt.Errorf("payment asked for %s, %d FLOPs", from, flops)
			}
			asked.Add(1)
			if escrow != 7 {
				return errors.New("no escrow")
			}
			return nil
		}
	})
	c := chainOf(t, head, moe.Part{Head: true}, Hop{0, 6, []peer.ID{h.ID(), h.ID()}})
	s, err := c.NewPaidSession(0, 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Forward(t.Context(), []int32{1, 2}, noExperts{}); err == nil || !strings.Contains(err.Error(), "PAYMENT_REQUIRED") {
		t.Fatalf("unpaid: %v", err)
	}
	if st := s.Stats(); st.Failovers != 0 || asked.Load() != 1 {
		t.Fatalf("stats %+v, %d payment checks: want no failover, one check", st, asked.Load())
	}
	s.Close()
	paid, _ := c.NewPaidSession(0, 7, nil)
	defer paid.Close()
	if _, err := paid.Forward(t.Context(), []int32{1, 2}, noExperts{}); err != nil {
		t.Fatalf("paid: %v", err)
	}
}

// checkedFake is SessionExperts for a span node that calls experts
// elsewhere: it records the steps and delegations it is given, and
// reports what the test sets (a wrong position, receipts, work).
type checkedFake struct {
	noExperts
	mu          sync.Mutex
	steps       []int
	rewinds     int
	delegations []*neuropb.EscrowDelegation
	wrong       int
	waited      int
	receipts    []*neuropb.UsageReceipt
}

func (f *checkedFake) Step(pos int, rewound bool, _ uint64, d *neuropb.EscrowDelegation) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.steps = append(f.steps, pos)
	if rewound {
		f.rewinds++
	}
	f.delegations = append(f.delegations, d)
}

func (f *checkedFake) WrongFrom() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := f.wrong
	f.wrong = -1
	return w
}

func (f *checkedFake) Wait(context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.waited++
}

func (f *checkedFake) Receipts(uint64) []*neuropb.UsageReceipt {
	f.mu.Lock()
	defer f.mu.Unlock()
	rcs := f.receipts
	f.receipts = nil
	return rcs
}

func (f *checkedFake) Work() uint64 { return 11 }

func (f *checkedFake) set(wrong int, rcs ...*neuropb.UsageReceipt) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.wrong, f.receipts = wrong, rcs
}

// A span node that calls experts elsewhere (its session's experts are
// span.SessionExperts) is told each request's position and the head's
// delegation of the escrow; its answers carry the work of the experts it
// computed itself, the other experts' receipts (which the head collects
// as their signers') and a wrong position its checks found (the head's
// session gives it once); the cache from that position is dropped, so the
// head's next request there is computed again; a sync waits for its
// checks. A span node whose experts are all its own is not synced.
func TestSpanNodeChecksTheExpertsItCalls(t *testing.T) {
	head := newHost(t)
	f := &checkedFake{wrong: -1}
	var own *neuropb.UsageReceipt
	_, h := serve(t, head, 0, 6, func(c *ServerConfig) {
		c.Experts = func(peer.ID) moe.Experts { return f }
		c.FLOPsPerToken = 1000 // the layers' work a row; the experts say what they computed here
		c.SignReceipt = func(r *neuropb.UsageReceipt) error { own = r; r.Signature = []byte("signed"); return nil }
	})
	delegation := &neuropb.EscrowDelegation{Escrow: 7, Delegate: []byte(h.ID())}
	c, err := NewChain(ChainConfig{Model: testModel, Head: newFake(moe.Part{Head: true}), Part: moe.Part{Head: true},
		Hops: []Hop{{0, 6, []peer.ID{h.ID()}}}, Dialer: head, Timeout: 5 * time.Second,
		Delegate: func(escrow uint64, p peer.ID) (*neuropb.EscrowDelegation, error) {
			if escrow != 7 || p != h.ID() {
				return nil, errors.New("not this one")
			}
			return delegation, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		rc *neuropb.UsageReceipt
		p  peer.ID
	}
	var receipts []got
	s, err := c.NewPaidSession(0, 7, func(rc *neuropb.UsageReceipt, p peer.ID) { receipts = append(receipts, got{rc, p}) })
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ss := s
	ctx := t.Context()
	if _, err := s.Forward(ctx, []int32{1, 2, 3}, noExperts{}); err != nil {
		t.Fatal(err)
	}
	if own == nil || own.GetFlops() != 3*1000+11 || ss.WrongFrom() != -1 {
		t.Fatalf("the span's receipt %v: want its layers' 3 x 1000 FLOPs and the 11 its experts computed here", own)
	}
	// Position 1 found wrong, with another expert's receipt.
	expertRc := &neuropb.UsageReceipt{Expert: []byte(h.ID()), Escrow: 7, Layer: 2, ExpertIndex: 3}
	f.set(1, expertRc)
	if _, err := s.Forward(ctx, []int32{1}, noExperts{}); err != nil {
		t.Fatal(err)
	}
	if w := ss.WrongFrom(); w != 1 || ss.WrongFrom() != -1 {
		t.Fatalf("wrong from %d, want 1, once", w)
	}
	forwarded := 0
	for _, r := range receipts {
		if r.rc.GetExpertIndex() == 3 && r.p == peer.ID(r.rc.GetExpert()) {
			forwarded++
		}
	}
	if len(receipts) != 3 || forwarded != 1 {
		t.Fatalf("receipts %v: want the span's own two and the expert's, as its signer's", receipts)
	}
	// The head rewinds to 1: the span node dropped the rows from there,
	// and computes them again.
	if err := s.Rewind(1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Forward(ctx, []int32{2, 3, 1}, noExperts{}); err != nil {
		t.Fatal(err)
	}
	f.set(2)
	if w := ss.Sync(ctx); w != 2 {
		t.Fatalf("sync: wrong from %d, want 2", w)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.waited != 1 || !slices.Equal(f.steps, []int{0, 3, 1}) || f.rewinds != 1 {
		t.Fatalf("the span node's experts: waited %d, steps %v, rewinds %d", f.waited, f.steps, f.rewinds)
	}
	for _, d := range f.delegations {
		if d.GetEscrow() != 7 || !bytes.Equal(d.GetDelegate(), []byte(h.ID())) {
			t.Fatalf("delegation %v", d)
		}
	}
}
