package span

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// Dialer is what a Chain uses of a libp2p host.
type Dialer interface {
	NewStream(ctx context.Context, p peer.ID, pids ...protocol.ID) (network.Stream, error)
}

// Hop is one span of a chain: layers [First, End) and the peers that
// serve them, the preferred first. A session moves to the next provider
// when one fails, replaying what it sent the one before.
type Hop struct {
	First, End int
	Providers  []peer.ID
}

// ChainConfig is a chain: a head and the spans that run the layers it
// does not.
type ChainConfig struct {
	Model cid.Cid
	// Head is the head's gating part: the head, and optionally the
	// model's first layers (computed locally, with the experts given to
	// Forward); its sessions implement moe.Steps.
	Head moe.Gating
	Part moe.Part
	// Hops cover the layers from Part.End to the model's last, in order.
	Hops   []Hop
	Dialer Dialer
	// Timeout bounds each span request (default 2 minutes): a provider
	// that takes longer is taken for dead and the next one replays the
	// session.
	Timeout time.Duration
	Log     *slog.Logger
	// OnRequest, if set, is given each span request a session made that
	// was answered (not the replays), with its time and what re-executing
	// it on another provider needs (ReExecute): a validator samples them,
	// a selector learns the providers' pace. It runs on the session's
	// goroutine and must not block.
	OnRequest func(CheckTask)
	// Delegate, if set, lets a span provider pay the experts it calls for
	// a paid session from the session's escrow: it signs the head's
	// delegation of escrow to p (expert.SignDelegation), sent with each
	// paid request.
	Delegate func(escrow uint64, p peer.ID) (*neuropb.EscrowDelegation, error)
	// Avoid, if set, says a provider is not to be used (a validator found
	// its results wrong): a session moves off it at its next request, to
	// the hop's next provider (replaying), unless it is the last.
	Avoid func(peer.ID) bool
}

// Chain is a moe.Gating whose sessions run the head locally and every
// other layer on span nodes: one round trip per span per forward pass
// instead of one per MoE layer.
type Chain struct {
	cfg ChainConfig
	hp  moe.Hparams
}

var _ moe.Gating = (*Chain)(nil)

// NewChain checks that the hops cover the model's layers after the
// head's, in order.
func NewChain(cfg ChainConfig) (*Chain, error) {
	if cfg.Head == nil || cfg.Dialer == nil || !cfg.Model.Defined() {
		return nil, errors.New("span chain: a model, its head and a dialer are needed")
	}
	hp := cfg.Head.Hparams()
	if err := cfg.Part.Check(hp); err != nil || !cfg.Part.Head || cfg.Part.First != 0 {
		return nil, fmt.Errorf("span chain: head part %s: want the head and the first layers, if any (%v)", cfg.Part, err)
	}
	at := cfg.Part.End
	for i, h := range cfg.Hops {
		if h.First != at || h.End <= h.First || h.End > hp.Layers {
			return nil, fmt.Errorf("span chain: hop %d is layers [%d, %d), want a span from layer %d", i, h.First, h.End, at)
		}
		if len(h.Providers) == 0 {
			return nil, fmt.Errorf("span chain: no provider for layers [%d, %d)", h.First, h.End)
		}
		at = h.End
	}
	if at != hp.Layers {
		return nil, fmt.Errorf("span chain: the hops end at layer %d of %d", at, hp.Layers)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Chain{cfg: cfg, hp: hp}, nil
}

// Hparams is the model's.
func (c *Chain) Hparams() moe.Hparams { return c.hp }

// Close frees the head.
func (c *Chain) Close() error { return c.cfg.Head.Close() }

// NewSession makes a session: a head session, and a name for the spans'
// sessions, each made on its span node by the first request.
func (c *Chain) NewSession(nCtx int) (moe.Session, error) {
	s, err := c.NewPaidSession(nCtx, 0, nil)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// NewPaidSession is NewSession for a generation paid from escrow: every
// span request names it, and receipt is given each span node's signed
// receipt with the provider that answered.
func (c *Chain) NewPaidSession(nCtx int, escrow uint64, receipt func(*neuropb.UsageReceipt, peer.ID)) (*Session, error) {
	if nCtx <= 0 {
		nCtx = min(c.hp.CtxLen, 4096)
	}
	// A head that runs no layer itself keeps no KV cache where it can.
	var hs moe.Session
	var err error
	if h, ok := c.cfg.Head.(moe.HeadSessioner); ok && c.cfg.Part.Layers() == 0 {
		hs, err = h.NewHeadSession(nCtx)
	} else {
		hs, err = c.cfg.Head.NewSession(nCtx)
	}
	if err != nil {
		return nil, err
	}
	st, ok := hs.(moe.Steps)
	if !ok {
		hs.Close()
		return nil, errors.New("span chain: the backend's sessions do not run in steps")
	}
	id := make([]byte, neuropb.SessionIDLen)
	rand.Read(id)
	s := &Session{c: c, head: hs, steps: st, id: id, nCtx: nCtx, ubatch: min(512, nCtx), escrow: escrow, receipt: receipt, wrongFrom: -1}
	for _, h := range c.cfg.Hops {
		s.links = append(s.links, &link{s: s, hop: h})
	}
	return s, nil
}

// Session is a sequence computed by a chain. Not safe for concurrent use.
type Session struct {
	c      *Chain
	head   moe.Session
	steps  moe.Steps
	id     []byte
	nCtx   int
	ubatch int
	pos    int
	links  []*link
	stats  Stats
	// escrow pays the span requests; receipt takes their receipts (and
	// the receipts of the experts the span nodes called, forwarded).
	escrow  uint64
	receipt func(*neuropb.UsageReceipt, peer.ID)
	// wrongFrom is the first position a span node found wrong since the
	// last WrongFrom (-1: none).
	wrongFrom int
}

// Stats count a session's span traffic.
type Stats struct {
	// Passes is forward passes; Requests span requests that computed
	// (one per span per pass), Replays the requests sent again to a
	// provider that lacked a session's earlier tokens, Failovers the
	// times a span moved to another provider.
	Passes, Requests, Replays, Failovers int
	// ReplayBytes are the hidden states the replays sent again, and
	// ReplayTime their round trips. Recovery is the time from the start
	// of a request whose provider failed (or was overtaken by a hedge)
	// until the next provider answered it (the deadline or the hedge
	// delay, the new stream, the replay: what a failover cost).
	ReplayBytes int64
	ReplayTime  time.Duration
	Recovery    time.Duration
	// Hedges counts requests also sent to a hop's next provider because
	// the one in use was slow to answer.
	Hedges int
}

// Stats returns the session's counts so far.
func (s *Session) Stats() Stats { return s.stats }

// WrongFrom returns the first position from which a span node said its
// answers were wrong since the last call (-1: none): a span node that
// calls experts on other nodes checks their results after it has used
// them, as a gating node does, and says so in its next answer. The
// generation rewinds there (the spans recompute those rows).
func (s *Session) WrongFrom() int {
	w := s.wrongFrom
	s.wrongFrom = -1
	return w
}

// Sync waits until each span node in use has its checks of the session's
// expert results back (at most its syncWait, or ctx), and returns
// WrongFrom: what a generation does before it calls itself done. A span
// node that does not answer decides nothing.
func (s *Session) Sync(ctx context.Context) int {
	for _, l := range s.links {
		c := l.c
		if c == nil || c.st == nil || !l.checking {
			continue
		}
		// Bounded by ctx alone (the generation's wait for its checks), not
		// by the provider's pace, and not counted in it: the span node
		// answers once its own checks are back.
		resp, err := l.roundTrip(ctx, c, &neuropb.SpanRequest{Model: s.c.cfg.Model.Bytes(), First: uint32(l.hop.First), End: uint32(l.hop.End),
			Session: s.id, Sync: true, Escrow: s.escrow})
		if err != nil {
			s.c.cfg.Log.Debug("span sync", "layers", fmt.Sprintf("%d-%d", l.hop.First, l.hop.End-1), "peer", c.p, "err", err)
			continue
		}
		var out outcome
		out.add(resp)
		l.apply(c.p, out)
	}
	return s.WrongFrom()
}

// Len is the number of tokens in the session.
func (s *Session) Len() int { return s.pos }

// Forward runs tokens through the chain and returns the last one's
// logits, in pieces of at most 512 tokens as a local session does.
func (s *Session) Forward(ctx context.Context, tokens []int32, experts moe.Experts) ([]float32, error) {
	if err := s.check(tokens); err != nil {
		return nil, err
	}
	start := s.pos
	logits, err := moe.InPieces(tokens, s.ubatch, func(piece []int32, want moe.Want) ([][]float32, error) {
		return s.forward(ctx, piece, experts, want)
	})
	if err != nil {
		return nil, s.undo(start, err)
	}
	return logits, nil
}

// ForwardEach runs tokens as that many decode steps would, in one
// request per span.
func (s *Session) ForwardEach(ctx context.Context, tokens []int32, experts moe.Experts) ([][]float32, error) {
	if len(tokens) > s.ubatch {
		return nil, fmt.Errorf("forward each: %d tokens, at most %d", len(tokens), s.ubatch)
	}
	if err := s.check(tokens); err != nil {
		return nil, err
	}
	start := s.pos
	logits, err := s.forward(ctx, tokens, experts, moe.WantEach)
	if err != nil {
		return nil, s.undo(start, err)
	}
	return logits, nil
}

func (s *Session) check(tokens []int32) error {
	if len(tokens) == 0 {
		return errors.New("forward: no tokens")
	}
	if s.pos+len(tokens) > s.nCtx {
		return fmt.Errorf("forward %d tokens after %d: %w (%d tokens)", len(tokens), s.pos, moe.ErrContextFull, s.nCtx)
	}
	return nil
}

func (s *Session) undo(start int, err error) error {
	return errors.Join(err, s.Rewind(start))
}

// forward runs one piece: the head's embeddings and layers, each span,
// the head's output.
func (s *Session) forward(ctx context.Context, tokens []int32, experts moe.Experts, want moe.Want) ([][]float32, error) {
	x, err := s.steps.Embed(tokens)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	rows := len(tokens)
	if s.c.cfg.Part.Layers() > 0 {
		if s.head.Len() != s.pos {
			if err := s.head.Rewind(s.pos); err != nil {
				return nil, fmt.Errorf("forward: %w", err)
			}
		}
		if x, rows, err = s.steps.Layers(ctx, x, rows, want, experts); err != nil {
			return nil, fmt.Errorf("forward: %w", err)
		}
	}
	for _, l := range s.links {
		if x, rows, err = l.run(ctx, s.pos, want, x, rows); err != nil {
			return nil, fmt.Errorf("forward: %w", err)
		}
	}
	s.pos += len(tokens)
	s.stats.Passes++
	if want == moe.WantAll {
		return nil, nil
	}
	logits, err := s.steps.Output(x, rows)
	if err != nil {
		return nil, fmt.Errorf("forward: %w", err)
	}
	return logits, nil
}

// Rewind drops the tokens after the first pos; each span drops them when
// it next hears from the session.
func (s *Session) Rewind(pos int) error {
	if pos < 0 || pos > s.pos {
		return fmt.Errorf("rewind to %d: the session holds %d tokens", pos, s.pos)
	}
	s.pos = pos
	for _, l := range s.links {
		l.truncate(pos)
	}
	if s.c.cfg.Part.Layers() > 0 && s.head.Len() > pos {
		return s.head.Rewind(pos)
	}
	return nil
}

// Close drops the session on every span node that holds it and frees the
// head's.
func (s *Session) Close() error {
	var wg sync.WaitGroup
	for _, l := range s.links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.close()
		}()
	}
	wg.Wait()
	return s.head.Close()
}

// CheckTask is one span request a session made and the answer it used,
// with the inputs the span was sent before it (in their batches), so that
// another provider can rebuild the span's KV cache and compute the same
// request again (ReExecute).
type CheckTask struct {
	Model    cid.Cid
	Hop      Hop
	Provider peer.ID
	// Pos is the request's position in the session and Rows its rows;
	// Input the hidden states it sent (Rows × embd) and Output those the
	// provider answered.
	Pos, Rows     int
	Input, Output []float32
	// Receipt is the provider's signed receipt for the request (its input
	// and output digests), when it sent one.
	Receipt *neuropb.UsageReceipt
	// Took is how long the request took, from its first send to the
	// answer used (a hedge's or a failover's included).
	Took time.Duration

	earlier []sent
	in      sent
	escrow  uint64
}

// History returns the rows the session sent the span before the request
// (Pos of them, row-major) and their digest chain (neuropb.SpanChain), on
// which the provider's receipt for the request is signed.
func (t CheckTask) History() ([]float32, neuropb.SpanChain) {
	var x []float32
	for _, h := range t.earlier {
		x = append(x, h.x...)
	}
	embd := 0
	if t.Rows > 0 {
		embd = len(t.Input) / t.Rows
	}
	return x, neuropb.SpanChainStart().Next(x, embd)
}

// Want is what the request kept of its rows.
func (t CheckTask) Want() neuropb.SpanWant { return wireWant(t.in.want) }

// ReExecute computes task again on provider p, in a session of its own:
// the inputs the task's session sent the span before it, in the same
// batches, then the task's request, so that an honest p answers what an
// honest provider answered, to the tolerance of their devices (to the bit
// on the same kind). It returns p's answer and every receipt p signed for
// the check (the replayed requests' and the request's, the last), and
// drops the session on p. A check is paid from the escrow of the session
// it checks, as the work it checks.
func (c *Chain) ReExecute(ctx context.Context, task CheckTask, p peer.ID) ([]float32, []*neuropb.UsageReceipt, error) {
	id := make([]byte, neuropb.SessionIDLen)
	rand.Read(id)
	s := &Session{c: c, id: id, escrow: task.escrow, wrongFrom: -1}
	l := &link{s: s, hop: Hop{First: task.Hop.First, End: task.Hop.End, Providers: []peer.ID{p}}, history: task.earlier}
	cn := &conn{p: p}
	l.c = cn
	defer l.close()
	y, _, out, err := l.send(ctx, cn, task.in, true)
	if err != nil {
		return nil, out.receipts, fmt.Errorf("re-execute layers %d-%d on %s: %w", task.Hop.First, task.Hop.End-1, p, err)
	}
	return y, out.receipts, nil
}

// sent is one request's input, kept so that another provider can rebuild
// the span's KV cache.
type sent struct {
	pos, rows int
	want      moe.Want
	x         []float32
}

// link is a session's connection to one span: the provider in use, a
// standby (a provider a hedge brought up to date, kept for the next
// hedge), and what the session sent the span.
type link struct {
	s       *Session
	hop     Hop
	cur     int   // index of the provider in use
	c       *conn // to Providers[cur]; nil until the first request
	standby *conn // to Providers[cur+1], if a hedge made one
	history []sent
	errs    []error
	// checking: a provider said it checks the experts it calls for the
	// session (Sync asks it).
	checking bool
}

// conn is a link's stream to one provider, and that provider's recent
// request times.
type conn struct {
	p      peer.ID
	st     network.Stream
	r      *wire.Reader
	w      *wire.Writer
	nextID uint64
	// slowest and slowestRow are the provider's slowest recent request
	// and time per row (each decays by a tenth a request), which set
	// the next request's deadline and hedge; answered counts its answers.
	slowest, slowestRow time.Duration
	answered            int
	// delegation is the session's escrow delegated to p (paid sessions
	// with ChainConfig.Delegate).
	delegation *neuropb.EscrowDelegation
}

// deadlineFactor times a provider's recent worst is how long a request
// may take before the provider is taken for dead; minDeadline is the
// least. A SIGKILLed peer on QUIC sends nothing: without this the chain
// waited out the whole Timeout (30 s for a gating node) to fail over.
//
// hedgeFactor times the recent worst (at least minHedge), once a provider
// has answered hedgeAfterAnswers requests, is how long a request waits
// before the hop's next provider is sent it too (after the session's
// earlier inputs, replayed): the first answer wins. A dead provider then
// costs a hedge delay and a replay instead of a deadline, and a slow one
// is overtaken.
const (
	deadlineFactor    = 10
	minDeadline       = 2 * time.Second
	hedgeFactor       = 3
	minHedge          = 50 * time.Millisecond
	hedgeAfterAnswers = 3
)

// recentWorst is what a request of rows rows may be expected to take at
// worst: the provider's slowest recent request, or its slowest recent
// time per row times rows, whichever is longer (0 before any answer).
func (c *conn) recentWorst(rows int) time.Duration {
	return max(c.slowest, c.slowestRow*time.Duration(rows))
}

// deadline is how long a request of rows rows may take: deadlineFactor
// times its recent worst, at least minDeadline, at most timeout, which
// also holds until the provider has answered once.
func (c *conn) deadline(rows int, timeout time.Duration) time.Duration {
	if c.slowest == 0 {
		return timeout
	}
	return min(timeout, max(minDeadline, deadlineFactor*c.recentWorst(rows)))
}

// hedgeAfter is how long a request of rows rows waits before it is
// hedged; 0: not yet (too few answers to know the provider's pace).
func (c *conn) hedgeAfter(rows int) time.Duration {
	if c.answered < hedgeAfterAnswers {
		return 0
	}
	return max(minHedge, hedgeFactor*c.recentWorst(rows))
}

// observe records a request's time.
func (c *conn) observe(took time.Duration, rows int) {
	c.slowest = max(took, c.slowest*9/10)
	c.slowestRow = max(took/time.Duration(max(rows, 1)), c.slowestRow*9/10)
	c.answered++
}

// reset drops the stream.
func (c *conn) reset() {
	if c != nil && c.st != nil {
		c.st.Reset()
		c.st = nil
	}
}

// truncate forgets the inputs past pos (a rewind): whole requests, and the
// rows past pos of the one that holds it. It cuts a copy, never the array
// the history had: check tasks taken before hold views of it (a rewind is
// rare; a request is not, and takes its view without copying).
func (l *link) truncate(pos int) {
	for i, h := range l.history {
		if h.pos >= pos {
			l.history = slices.Clone(l.history[:i])
			return
		}
		if h.pos+h.rows > pos {
			h.rows = pos - h.pos
			h.x = h.x[:h.rows*l.s.c.hp.Embd]
			l.history = append(slices.Clone(l.history[:i]), h)
			return
		}
	}
}

// outcome is what an attempt did besides its answer: the receipts it was
// given and the replays it sent. The session applies it (attempts run
// concurrently when hedged).
type outcome struct {
	receipts    []*neuropb.UsageReceipt
	replays     int
	replayBytes int64
	replayTime  time.Duration
	// expertReceipts are the receipts of the experts the span node
	// called, forwarded; wrong1 is one more than the first position it
	// found wrong (0: none).
	expertReceipts []*neuropb.UsageReceipt
	wrong1         int
	checking       bool
}

// add takes what a response says besides its rows: its receipt, the
// experts' receipts and a wrong position.
func (o *outcome) add(resp *neuropb.SpanResponse) {
	if rc := resp.GetReceipt(); rc != nil {
		o.receipts = append(o.receipts, rc)
	}
	o.expertReceipts = append(o.expertReceipts, resp.GetExpertReceipts()...)
	o.checking = o.checking || resp.GetChecking()
	if resp.WrongFrom != nil {
		o.wrong(int(resp.GetWrongFrom()))
	}
}

// wrong records position w as found wrong.
func (o *outcome) wrong(w int) {
	if o.wrong1 == 0 || w+1 < o.wrong1 {
		o.wrong1 = w + 1
	}
}

// reports adds what o2 (a replay's, or the request's after a replay)
// reported: receipts and a wrong position.
func (o *outcome) reports(o2 outcome) {
	o.receipts = append(o.receipts, o2.receipts...)
	o.expertReceipts = append(o.expertReceipts, o2.expertReceipts...)
	if o2.wrong1 > 0 {
		o.wrong(o2.wrong1 - 1)
	}
	o.checking = o.checking || o2.checking
}

// attempt is one provider's answer to a request.
type attempt struct {
	c     *conn
	y     []float32
	n     int
	out   outcome
	err   error
	hedge bool
}

// run sends rows of x at pos to the span and returns what leaves it. A
// request that takes longer than its provider's hedge delay goes to the
// hop's next provider too (after a replay of the session's earlier
// inputs); the first answer wins, and a hedge that wins takes the
// provider's place. A provider that fails is replaced by the next, which
// is sent the session's earlier inputs first.
func (l *link) run(ctx context.Context, pos int, want moe.Want, x []float32, rows int) ([]float32, int, error) {
	l.truncate(pos)
	in := sent{pos: pos, rows: rows, want: want, x: x}
	start, failed := time.Now(), false
	for l.cur < len(l.hop.Providers) {
		if l.avoid(l.hop.Providers[l.cur]) && l.cur+1 < len(l.hop.Providers) {
			l.s.c.cfg.Log.Info("moving a span off a provider found wrong", "layers", fmt.Sprintf("%d-%d", l.hop.First, l.hop.End-1),
				"peer", l.hop.Providers[l.cur])
			l.next()
			continue
		}
		if l.c == nil {
			l.c = &conn{p: l.hop.Providers[l.cur]}
		}
		a, errs := l.try(ctx, in)
		if a != nil {
			if f := l.s.c.cfg.OnRequest; f != nil {
				var rc *neuropb.UsageReceipt
				if n := len(a.out.receipts); n > 0 {
					rc = a.out.receipts[n-1] // the request's own, after any replay's
				}
				f(CheckTask{Model: l.s.c.cfg.Model, Hop: l.hop, Provider: a.c.p, Pos: pos, Rows: rows, Input: x, Output: a.y, Receipt: rc, Took: time.Since(start),
					earlier: l.history[:len(l.history):len(l.history)], in: in, escrow: l.s.escrow})
			}
			l.history = append(l.history, in)
			l.s.stats.Requests++
			if failed || a.hedge {
				l.s.stats.Recovery += time.Since(start)
			}
			return a.y, a.n, nil
		}
		for _, e := range errs {
			var fatal fatalError
			if errors.As(e.err, &fatal) || ctx.Err() != nil {
				return nil, 0, e.err
			}
		}
		for _, e := range errs {
			l.errs = append(l.errs, fmt.Errorf("%s: %w", e.c.p, e.err))
			l.s.c.cfg.Log.Warn("span provider failed; trying the next", "layers", fmt.Sprintf("%d-%d", l.hop.First, l.hop.End-1),
				"peer", e.c.p, "err", e.err)
		}
		// Every provider tried has failed: the next untried one takes
		// over (a standby that failed is among them).
		if len(errs) > 1 || l.standby != nil && slices.ContainsFunc(errs, func(a attempt) bool { return a.c == l.standby }) {
			l.standby.reset()
			l.standby = nil
			l.cur++
		}
		l.next()
		failed = true
	}
	return nil, 0, fmt.Errorf("span layers %d-%d: every provider failed: %w", l.hop.First, l.hop.End-1, errors.Join(l.errs...))
}

// avoid says whether the chain is not to use p.
func (l *link) avoid(p peer.ID) bool { return l.s.c.cfg.Avoid != nil && l.s.c.cfg.Avoid(p) }

// next moves the link to the hop's next provider: the standby, when it is
// that one.
func (l *link) next() {
	l.c.reset()
	l.c = nil
	l.cur++
	if l.standby != nil && l.cur < len(l.hop.Providers) && l.standby.p == l.hop.Providers[l.cur] {
		l.c, l.standby = l.standby, nil
	}
	l.s.stats.Failovers++
}

// try sends in to the provider in use and, if it has not answered within
// its hedge delay, to the hop's next provider too. It returns the first
// answer (the other attempt cancelled), or every attempt's error. The
// attempts' receipts and replays are applied to the session here, once
// both have returned.
func (l *link) try(ctx context.Context, in sent) (*attempt, []attempt) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan attempt, 2)
	launch := func(c *conn, hedge bool) {
		go func() {
			a := attempt{c: c, hedge: hedge}
			a.y, a.n, a.out, a.err = l.send(ctx, c, in, true)
			results <- a
		}()
	}
	d := l.c.hedgeAfter(in.rows) // before the attempt updates the conn
	launch(l.c, false)
	inflight := 1
	var hedge <-chan time.Time
	if d > 0 && l.cur+1 < len(l.hop.Providers) && !l.avoid(l.hop.Providers[l.cur+1]) {
		t := time.NewTimer(d)
		defer t.Stop()
		hedge = t.C
	}
	var won *attempt
	var errs []attempt
	for inflight > 0 {
		select {
		case <-hedge:
			hedge = nil
			if l.standby == nil {
				l.standby = &conn{p: l.hop.Providers[l.cur+1]}
			}
			l.s.stats.Hedges++
			launch(l.standby, true)
			inflight++
		case a := <-results:
			inflight--
			l.apply(a.c.p, a.out)
			if errors.As(a.err, new(fatalError)) {
				cancel() // a refusal the other provider would give too
			}
			switch {
			case a.err == nil && won == nil:
				won = &a
				cancel() // the other attempt, if any, stops at once
				hedge = nil
			case a.err != nil && (won == nil || !errors.Is(a.err, context.Canceled) && ctx.Err() == nil):
				errs = append(errs, a)
			}
		}
	}
	if won == nil {
		return nil, errs
	}
	if won.hedge {
		// The hedge overtook the provider in use: it takes its place.
		l.s.c.cfg.Log.Info("span hedge answered first; moving to it", "layers", fmt.Sprintf("%d-%d", l.hop.First, l.hop.End-1),
			"from", l.c.p, "to", won.c.p)
		l.c.reset()
		l.c, l.standby = won.c, nil
		l.cur++
		l.s.stats.Failovers++
	}
	return won, nil
}

// delegation is the head's delegation of the session's escrow to c's
// provider (made once per provider), or nil.
func (l *link) delegation(c *conn) *neuropb.EscrowDelegation {
	if l.s.escrow == 0 || l.s.c.cfg.Delegate == nil {
		return nil
	}
	if c.delegation == nil {
		d, err := l.s.c.cfg.Delegate(l.s.escrow, c.p)
		if err != nil {
			l.s.c.cfg.Log.Warn("delegate the escrow to a span node", "peer", c.p, "err", err)
			return nil
		}
		c.delegation = d
	}
	return c.delegation
}

// apply adds an attempt's receipts, replays and wrong position to the
// session.
func (l *link) apply(p peer.ID, o outcome) {
	if l.s.receipt != nil {
		for _, rc := range o.receipts {
			l.s.receipt(rc, p)
		}
		// The experts' receipts are their own signers' (checked when the
		// generation settles).
		for _, rc := range o.expertReceipts {
			l.s.receipt(rc, peer.ID(rc.GetExpert()))
		}
	}
	l.checking = l.checking || o.checking
	if o.wrong1 > 0 && (l.s.wrongFrom < 0 || o.wrong1-1 < l.s.wrongFrom) {
		l.s.wrongFrom = o.wrong1 - 1
	}
	l.s.stats.Replays += o.replays
	l.s.stats.ReplayBytes += o.replayBytes
	l.s.stats.ReplayTime += o.replayTime
}

// fatalError is a refusal no other provider would answer otherwise.
type fatalError struct{ error }

// send sends one input to c's provider; behind, it is sent the session's
// earlier inputs first (replay), once.
func (l *link) send(ctx context.Context, c *conn, in sent, replay bool) ([]float32, int, outcome, error) {
	var out outcome
	resp, err := l.call(ctx, c, &neuropb.SpanRequest{Model: l.s.c.cfg.Model.Bytes(), First: uint32(l.hop.First), End: uint32(l.hop.End),
		Session: l.s.id, Pos: uint32(in.pos), Want: wireWant(in.want), Escrow: l.s.escrow, Delegation: l.delegation(c),
		Hidden: expert.EncodeFloats(in.x, in.rows, l.s.c.hp.Embd, neuropb.WireDType_WIRE_DTYPE_F32)})
	if err != nil {
		return nil, 0, out, err
	}
	out.add(resp)
	if e := resp.GetError(); e != nil {
		switch e.GetCode() {
		case neuropb.SpanError_CODE_SESSION_BEHIND:
			if !replay {
				return nil, 0, out, fmt.Errorf("behind again after a replay: %s", e.GetMessage())
			}
			if err := l.replay(ctx, c, int(resp.GetLen()), &out); err != nil {
				return nil, 0, out, err
			}
			y, n, more, err := l.send(ctx, c, in, false)
			out.reports(more)
			return y, n, out, err
		case neuropb.SpanError_CODE_BAD_REQUEST, neuropb.SpanError_CODE_CONTEXT_FULL, neuropb.SpanError_CODE_PAYMENT_REQUIRED:
			return nil, 0, out, fatalError{fmt.Errorf("span layers %d-%d: %s: %s", l.hop.First, l.hop.End-1, e.GetCode(), e.GetMessage())}
		}
		return nil, 0, out, fmt.Errorf("%s: %s", e.GetCode(), e.GetMessage())
	}
	n, cols, err := resp.GetHidden().Rows()
	if err != nil || cols != l.s.c.hp.Embd || resp.GetHidden().GetDtype() != neuropb.WireDType_WIRE_DTYPE_F32 {
		return nil, 0, out, fmt.Errorf("a response of %v rows (%v)", resp.GetHidden().GetShape(), err)
	}
	last := in.want == moe.WantLast && l.hop.End == l.s.c.hp.Layers
	if last && n != 1 || !last && n != in.rows {
		return nil, 0, out, fmt.Errorf("a response of %d rows for %d", n, in.rows)
	}
	return expert.DecodeFloats(resp.GetHidden()), n, out, nil
}

// replay sends c's provider, which holds the session's first have tokens,
// the inputs from there on, as they were first sent (the same rows in
// each request, so that its KV cache holds what the first provider's
// held, to the bit).
func (l *link) replay(ctx context.Context, c *conn, have int, out *outcome) error {
	i := slices.IndexFunc(l.history, func(h sent) bool { return h.pos+h.rows > have })
	if i < 0 {
		return nil
	}
	for _, h := range l.history[i:] {
		start := time.Now()
		_, _, o, err := l.send(ctx, c, h, false)
		out.reports(o)
		if err != nil {
			return fmt.Errorf("replay of tokens %d-%d: %w", h.pos, h.pos+h.rows-1, err)
		}
		out.replays++
		out.replayBytes += int64(len(h.x)) * 4
		out.replayTime += time.Since(start)
	}
	return nil
}

// call sends one request on c's stream (opened on first use) and reads
// its answer, within the request's deadline. A stream kept from earlier
// requests that fails (the span node closes streams idle for a while) is
// replaced by a new one to the same provider, once.
func (l *link) call(ctx context.Context, c *conn, req *neuropb.SpanRequest) (*neuropb.SpanResponse, error) {
	rows, _, _ := req.GetHidden().Rows()
	ctx, cancel := context.WithTimeout(ctx, c.deadline(rows, l.s.c.cfg.Timeout))
	defer cancel()
	start := time.Now()
	reused := c.st != nil
	resp, err := l.roundTrip(ctx, c, req)
	if err != nil && reused && ctx.Err() == nil {
		resp, err = l.roundTrip(ctx, c, req)
	}
	if err == nil && !req.GetClose() {
		c.observe(time.Since(start), rows)
	}
	return resp, err
}

// roundTrip is one attempt of call.
func (l *link) roundTrip(ctx context.Context, c *conn, req *neuropb.SpanRequest) (*neuropb.SpanResponse, error) {
	if c.st == nil {
		st, err := l.s.c.cfg.Dialer.NewStream(ctx, c.p, neuropb.SpanProtocol)
		if err != nil {
			return nil, fmt.Errorf("open stream: %w", err)
		}
		c.st, c.r, c.w = st, wire.NewReader(st, neuropb.MaxSpanMessageSize), wire.NewWriter(st, neuropb.MaxSpanMessageSize)
	}
	c.nextID++
	req.RequestId = c.nextID
	st := c.st
	if d, ok := ctx.Deadline(); ok {
		req.DeadlineUnixMs = d.UnixMilli()
		_ = st.SetDeadline(d)
	}
	// A cancelled context ends a blocked read or write.
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	defer stop()
	if err := c.w.Write(req); err != nil {
		c.reset()
		return nil, fmt.Errorf("write: %w", errors.Join(err, ctx.Err()))
	}
	resp := &neuropb.SpanResponse{}
	if err := c.r.Read(resp); err != nil {
		c.reset()
		return nil, fmt.Errorf("read: %w", errors.Join(err, ctx.Err()))
	}
	if resp.GetRequestId() != req.GetRequestId() {
		c.reset()
		return nil, fmt.Errorf("response %d to request %d", resp.GetRequestId(), req.GetRequestId())
	}
	return resp, nil
}

// close tells the providers that hold the session (the one in use and a
// standby) to drop it, and closes their streams.
func (l *link) close() {
	for _, c := range []*conn{l.c, l.standby} {
		if c == nil || c.st == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := l.call(ctx, c, &neuropb.SpanRequest{Model: l.s.c.cfg.Model.Bytes(), First: uint32(l.hop.First), End: uint32(l.hop.End),
			Session: l.s.id, Close: true}); err == nil && c.st != nil {
			c.st.Close()
		}
		cancel()
		c.st = nil
	}
}
