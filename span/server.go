package span

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// Host is what a Server uses of a libp2p host.
type Host interface {
	SetStreamHandler(protocol.ID, network.StreamHandler)
	RemoveStreamHandler(protocol.ID)
}

// ServerConfig is what a Server serves and how.
type ServerConfig struct {
	// Model is the model's CID; Gating its part (layers [First, End), no
	// head needed), whose sessions implement moe.Steps.
	Model  cid.Cid
	Gating moe.Gating
	Part   moe.Part
	// Experts gives the experts a new session of peer's calls: the span
	// node's own, or remote ones (as a gating node calls them).
	Experts func(p peer.ID) moe.Experts
	// MaxSessions bounds the KV caches kept at once (default 16). A new
	// session past it takes the place of the one idle longest, if that
	// one has been idle for a minute or more; else it is refused busy.
	MaxSessions int
	// NCtx is each session's context (0: the model's, at most 4096).
	NCtx int
	// IdleTimeout drops a session not used for that long (default 10
	// minutes); its head replays it if it comes back.
	IdleTimeout time.Duration
	// StreamIdle closes a stream without requests for that long (default
	// IdleTimeout).
	StreamIdle time.Duration
	// Self and SignReceipt sign a usage receipt for each request that
	// names an escrow, worth FLOPsPerToken per row (the span's layers'
	// and experts' FLOPs; with SessionExperts, the layers' only, and the
	// experts' computed here added); without SignReceipt no receipt is
	// signed.
	Self          peer.ID
	SignReceipt   func(*neuropb.UsageReceipt) error
	FLOPsPerToken uint64
	// Payment, if set, must accept each request (its head, escrow and
	// FLOPs) before it is computed; a refusal is answered
	// CODE_PAYMENT_REQUIRED.
	Payment func(ctx context.Context, from peer.ID, escrow, flops uint64) error
	Log     *slog.Logger
}

// SessionExperts are the experts of one session of a span node that calls
// experts on other nodes (ServerConfig.Experts may return them): their
// results are checked as a gating node checks its own (a sample
// re-executed elsewhere), and their receipts go to the head.
type SessionExperts interface {
	moe.Experts
	// Step marks the session's position whose rows the next calls
	// compute; rewound says the session went back there (its checks of
	// later positions no longer count); escrow is the request's, which
	// pays the experts called, and delegation the head's leave to pay
	// them from it (nil: none).
	Step(pos int, rewound bool, escrow uint64, delegation *neuropb.EscrowDelegation)
	// WrongFrom is the first position whose row used an expert result
	// found wrong (-1: none); it is then forgotten.
	WrongFrom() int
	// Wait waits for the checks in flight (or ctx).
	Wait(ctx context.Context)
	// Receipts takes the receipts the experts signed for escrow since the
	// last call.
	Receipts(escrow uint64) []*neuropb.UsageReceipt
	// Work takes the FLOPs of the experts computed on this node since the
	// last call: what the span's own receipt is worth.
	Work() uint64
}

// Server serves one span of one model on SpanProtocol (see the package
// doc for its lifecycle).
type Server struct {
	h   Host
	cfg ServerConfig
	log *slog.Logger

	mu       sync.Mutex
	sessions map[sessionKey]*session
	closed   bool
	streams  map[network.Stream]struct{}

	wg     sync.WaitGroup
	stop   chan struct{}
	closeO sync.Once
}

type sessionKey struct {
	owner peer.ID
	id    string
}

// session is one head's KV cache. mu serialises its requests (one stream
// per session, but a head may open another after a fault).
type session struct {
	mu  sync.Mutex
	s   moe.Session
	st  moe.Steps
	exp moe.Experts
	// chain[i] is the digest chain of the session's first i rows
	// (neuropb.SpanChain): one more entry than the cache holds tokens.
	chain []neuropb.SpanChain
	// rewound: the cache went back since the last request computed.
	rewound bool
	// last is when the session was last used (Unix nanoseconds): read
	// without mu, so that the janitor and eviction never wait on a
	// session's compute.
	last atomic.Int64
	dead bool
}

// NewServer checks cfg and makes a server; Start serves it.
func NewServer(h Host, cfg ServerConfig) (*Server, error) {
	if h == nil || cfg.Gating == nil || cfg.Experts == nil || !cfg.Model.Defined() {
		return nil, errors.New("span server: a host, a model, its gating part and experts are needed")
	}
	if err := cfg.Part.Check(cfg.Gating.Hparams()); err != nil || cfg.Part.Layers() == 0 {
		return nil, fmt.Errorf("span server: part %s: %v", cfg.Part, err)
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = 16
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 10 * time.Minute
	}
	if cfg.StreamIdle <= 0 {
		cfg.StreamIdle = cfg.IdleTimeout
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Server{h: h, cfg: cfg, log: cfg.Log.With("component", "span", "layers", cfg.Part.String()),
		sessions: map[sessionKey]*session{}, streams: map[network.Stream]struct{}{}, stop: make(chan struct{})}, nil
}

// Start registers the protocol handler and the janitor that drops idle
// sessions.
func (s *Server) Start(context.Context) error {
	s.h.SetStreamHandler(neuropb.SpanProtocol, s.handle)
	s.wg.Add(1)
	go s.janitor()
	return nil
}

// Close stops serving, resets open streams, frees every session's KV
// cache and returns once its goroutines have ended. It is idempotent.
func (s *Server) Close() error {
	var err error
	s.closeO.Do(func() {
		s.h.RemoveStreamHandler(neuropb.SpanProtocol)
		s.mu.Lock()
		s.closed = true
		for st := range s.streams {
			st.Reset()
		}
		s.mu.Unlock()
		close(s.stop)
		s.wg.Wait()
		s.mu.Lock()
		defer s.mu.Unlock()
		var errs []error
		for k, ss := range s.sessions {
			ss.mu.Lock()
			errs = append(errs, ss.s.Close())
			ss.dead = true
			ss.mu.Unlock()
			delete(s.sessions, k)
		}
		err = errors.Join(errs...)
	})
	return err
}

// Sessions is the number of sessions whose KV caches the server keeps.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *Server) janitor() {
	defer s.wg.Done()
	t := time.NewTicker(min(s.cfg.IdleTimeout/4, time.Minute))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			s.mu.Lock()
			var idle []*session
			for k, ss := range s.sessions {
				if now.Sub(ss.lastSeen()) > s.cfg.IdleTimeout {
					idle = append(idle, ss)
					delete(s.sessions, k)
				}
			}
			s.mu.Unlock()
			for _, ss := range idle {
				ss.drop()
			}
		}
	}
}

func (ss *session) lastSeen() time.Time { return time.Unix(0, ss.last.Load()) }

// drop frees the session's cache once its request in progress, if any,
// has ended.
func (ss *session) drop() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.dead {
		ss.dead = true
		ss.s.Close()
	}
}

func (s *Server) handle(st network.Stream) {
	if err := st.Scope().SetService(neuropb.SpanService); err != nil {
		st.Reset()
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		st.Reset()
		return
	}
	s.streams[st] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
		s.wg.Done()
	}()
	owner := st.Conn().RemotePeer()
	r := wire.NewReader(st, neuropb.MaxSpanMessageSize)
	w := wire.NewWriter(st, neuropb.MaxSpanMessageSize)
	for {
		_ = st.SetReadDeadline(time.Now().Add(s.cfg.StreamIdle))
		req := &neuropb.SpanRequest{}
		err := r.Read(req)
		var tl *wire.TooLargeError
		var resp *neuropb.SpanResponse
		switch {
		case err == nil:
			resp = s.serve(owner, req)
		case errors.As(err, &tl) && tl.Skipped:
			resp = spanError(0, neuropb.SpanError_CODE_TOO_LARGE, "%v", tl)
		case errors.Is(err, io.EOF):
			st.Close()
			return
		default:
			s.log.Debug("span stream: read", "peer", owner, "err", err)
			st.Reset()
			return
		}
		_ = st.SetWriteDeadline(time.Now().Add(time.Minute))
		if err := w.Write(resp); err != nil {
			s.log.Debug("span stream: write", "peer", owner, "err", err)
			st.Reset()
			return
		}
	}
}

func spanError(id uint64, code neuropb.SpanError_Code, format string, args ...any) *neuropb.SpanResponse {
	return &neuropb.SpanResponse{RequestId: id, Error: &neuropb.SpanError{Code: code, Message: fmt.Sprintf(format, args...)}}
}

// serve answers one request.
func (s *Server) serve(owner peer.ID, req *neuropb.SpanRequest) *neuropb.SpanResponse {
	id := req.GetRequestId()
	if err := req.Validate(); err != nil {
		return spanError(id, neuropb.SpanError_CODE_BAD_REQUEST, "%v", err)
	}
	if c, _ := cid.Cast(req.GetModel()); !c.Equals(s.cfg.Model) || int(req.GetFirst()) != s.cfg.Part.First || int(req.GetEnd()) != s.cfg.Part.End {
		return spanError(id, neuropb.SpanError_CODE_UNKNOWN_SPAN, "this node serves layers [%d, %d) of %s", s.cfg.Part.First, s.cfg.Part.End, s.cfg.Model)
	}
	key := sessionKey{owner, string(req.GetSession())}
	if req.GetClose() {
		s.mu.Lock()
		ss := s.sessions[key]
		delete(s.sessions, key)
		s.mu.Unlock()
		if ss != nil {
			ss.drop()
		}
		return &neuropb.SpanResponse{RequestId: id}
	}
	if req.GetSync() {
		return s.sync(key, req)
	}
	hp := s.cfg.Gating.Hparams()
	rows, cols, _ := req.GetHidden().Rows()
	if cols != hp.Embd {
		return spanError(id, neuropb.SpanError_CODE_BAD_REQUEST, "rows of %d floats, the model's are %d", cols, hp.Embd)
	}
	if s.cfg.Payment != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := s.cfg.Payment(ctx, owner, req.GetEscrow(), uint64(rows)*s.cfg.FLOPsPerToken)
		cancel()
		if err != nil {
			return spanError(id, neuropb.SpanError_CODE_PAYMENT_REQUIRED, "%v", err)
		}
	}
	pos := int(req.GetPos())
	ss, resp := s.session(key, owner, pos, id)
	if resp != nil {
		return resp
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.dead {
		return &neuropb.SpanResponse{RequestId: id, Error: &neuropb.SpanError{Code: neuropb.SpanError_CODE_SESSION_BEHIND, Message: "the session was dropped"}}
	}
	ss.last.Store(time.Now().UnixNano())
	if n := ss.s.Len(); pos > n {
		return &neuropb.SpanResponse{RequestId: id, Len: uint32(n), Error: &neuropb.SpanError{Code: neuropb.SpanError_CODE_SESSION_BEHIND,
			Message: fmt.Sprintf("the session holds %d tokens, the request starts at %d", n, pos)}}
	} else if pos < n {
		ss.rewound = true
		if err := ss.s.Rewind(pos); err != nil {
			// the window before pos is gone: start over
			ss.chain = ss.chain[:1]
			if err := ss.s.Rewind(0); err != nil {
				return spanError(id, neuropb.SpanError_CODE_INTERNAL, "rewind: %v", err)
			}
			return &neuropb.SpanResponse{RequestId: id, Error: &neuropb.SpanError{Code: neuropb.SpanError_CODE_SESSION_BEHIND,
				Message: fmt.Sprintf("rewind to %d: %v", pos, err)}}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if d := req.GetDeadlineUnixMs(); d > 0 {
		ctx, cancel = context.WithDeadline(ctx, time.UnixMilli(d))
		defer cancel()
	}
	if pos >= len(ss.chain) {
		// cannot happen (the chain follows the cache); start over rather
		// than sign a digest of rows this node did not see
		ss.chain = ss.chain[:1]
		if err := ss.s.Rewind(0); err != nil {
			return spanError(id, neuropb.SpanError_CODE_INTERNAL, "rewind: %v", err)
		}
		return &neuropb.SpanResponse{RequestId: id, Error: &neuropb.SpanError{Code: neuropb.SpanError_CODE_SESSION_BEHIND, Message: "the session's digests were lost"}}
	}
	ss.chain = ss.chain[:pos+1]
	se, checked := ss.exp.(SessionExperts)
	if checked {
		se.Step(pos, ss.rewound, req.GetEscrow(), req.GetDelegation())
		ss.rewound = false
	}
	counting := &countingExperts{Experts: ss.exp}
	x := expert.DecodeFloats(req.GetHidden())
	start := time.Now()
	y, out, err := ss.st.Layers(ctx, x, rows, wantOf(req.GetWant()), counting.with())
	took := time.Since(start)
	switch {
	case errors.Is(err, moe.ErrContextFull):
		return spanError(id, neuropb.SpanError_CODE_CONTEXT_FULL, "%v", err)
	case ctx.Err() != nil:
		ss.s.Rewind(pos)
		ss.rewound = true
		return spanError(id, neuropb.SpanError_CODE_DEADLINE_EXCEEDED, "%v", err)
	case err != nil:
		ss.s.Rewind(pos)
		ss.rewound = true
		return spanError(id, neuropb.SpanError_CODE_INTERNAL, "%v", err)
	}
	// The rows hashed as they came (F32: Validate checked it).
	data, rowBytes := req.GetHidden().GetData(), 4*hp.Embd
	for r := range rows {
		ss.chain = append(ss.chain, ss.chain[len(ss.chain)-1].NextRow(data[r*rowBytes:(r+1)*rowBytes], rowBytes))
	}
	prior, after := ss.chain[pos], ss.chain[pos+rows]
	answer := &neuropb.SpanResponse{RequestId: id, Hidden: expert.EncodeFloats(y, out, hp.Embd, neuropb.WireDType_WIRE_DTYPE_F32),
		ComputeUs: uint32(min(took.Microseconds(), 1<<32-1)), Len: uint32(ss.s.Len()), ExpertCalls: uint32(counting.n())}
	if checked {
		ss.report(answer, se, req.GetEscrow())
	}
	if esc := req.GetEscrow(); esc != 0 && s.cfg.SignReceipt != nil {
		flops := uint64(rows) * s.cfg.FLOPsPerToken
		if checked {
			// the layers' work, and the experts' computed here
			flops += se.Work()
		}
		rc := &neuropb.UsageReceipt{Expert: []byte(s.cfg.Self), Escrow: esc, Layer: uint32(s.cfg.Part.First), SpanEnd: uint32(s.cfg.Part.End),
			Tokens: uint64(rows), Flops: flops,
			InputDigest:  neuropb.SpanRequestDigest(prior, req.GetWant(), after),
			OutputDigest: expert.TensorDigest(answer.GetHidden())}
		if err := s.cfg.SignReceipt(rc); err != nil {
			s.log.Warn("sign a span receipt", "err", err)
		} else {
			answer.Receipt = rc
		}
	}
	return answer
}

// rerunPiece is how many earlier rows Rerun runs at once.
const rerunPiece = 64

// Rerun computes a span request again in a session of its own — the
// session's earlier rows (history), rerunPiece at a time, then the
// request's rows (x) kept as want says — and returns the request's
// answer: how a node that serves the span judges a span verdict
// (reputation.SpanTask). Its experts are those a session of self gets.
func (s *Server) Rerun(ctx context.Context, self peer.ID, history, x []float32, want neuropb.SpanWant) ([]float32, error) {
	embd := s.cfg.Gating.Hparams().Embd
	if len(x) == 0 || len(x)%embd != 0 || len(history)%embd != 0 {
		return nil, fmt.Errorf("span rerun: rows of %d floats wanted", embd)
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, errors.New("span rerun: the server is closed")
	}
	ms, err := s.cfg.Gating.NewSession(s.cfg.NCtx)
	if err != nil {
		return nil, fmt.Errorf("span rerun: %w", err)
	}
	defer ms.Close()
	st, ok := ms.(moe.Steps)
	if !ok {
		return nil, errors.New("span rerun: the backend's sessions do not run layers alone")
	}
	exp := s.cfg.Experts(self)
	for len(history) > 0 {
		n := min(len(history)/embd, rerunPiece)
		if _, _, err := st.Layers(ctx, history[:n*embd], n, moe.WantAll, exp); err != nil {
			return nil, fmt.Errorf("span rerun: the earlier rows: %w", err)
		}
		history = history[n*embd:]
	}
	y, _, err := st.Layers(ctx, x, len(x)/embd, wantOf(want), exp)
	if err != nil {
		return nil, fmt.Errorf("span rerun: %w", err)
	}
	return y, nil
}

// report adds to an answer what a session's checked experts have to say:
// a wrong result found since (the head rewinds there), and the other
// nodes' receipts for the head's escrow.
func (ss *session) report(answer *neuropb.SpanResponse, se SessionExperts, escrow uint64) {
	answer.Checking = true
	if w := se.WrongFrom(); w >= 0 {
		answer.WrongFrom = proto.Uint32(uint32(w))
		// The cache from there is wrong: the head sends those rows again.
		if w < ss.s.Len() {
			if err := ss.s.Rewind(w); err == nil {
				ss.chain = ss.chain[:w+1]
				ss.rewound = true
			}
		}
	}
	if escrow != 0 {
		answer.ExpertReceipts = se.Receipts(escrow)
	}
}

// syncWait bounds how long a sync request waits for a session's checks.
const syncWait = 10 * time.Second

// sync answers a sync request: once the session's checks are back (at
// most syncWait, or the request's deadline), whether one found a result
// its answers used wrong, and the experts' receipts.
func (s *Server) sync(key sessionKey, req *neuropb.SpanRequest) *neuropb.SpanResponse {
	id := req.GetRequestId()
	s.mu.Lock()
	ss := s.sessions[key]
	s.mu.Unlock()
	if ss == nil {
		return &neuropb.SpanResponse{RequestId: id}
	}
	se, checked := ss.exp.(SessionExperts)
	if !checked {
		ss.mu.Lock()
		defer ss.mu.Unlock()
		return &neuropb.SpanResponse{RequestId: id, Len: uint32(ss.s.Len())}
	}
	ctx, cancel := context.WithTimeout(context.Background(), syncWait)
	defer cancel()
	if d := req.GetDeadlineUnixMs(); d > 0 {
		ctx, cancel = context.WithDeadline(ctx, time.UnixMilli(d))
		defer cancel()
	}
	se.Wait(ctx)
	ss.mu.Lock()
	defer ss.mu.Unlock()
	answer := &neuropb.SpanResponse{RequestId: id}
	if !ss.dead {
		ss.report(answer, se, req.GetEscrow())
		answer.Len = uint32(ss.s.Len())
	}
	return answer
}

// session finds or makes key's session. A request for a session the
// server does not hold that does not start at 0 is answered behind.
func (s *Server) session(key sessionKey, owner peer.ID, pos int, id uint64) (*session, *neuropb.SpanResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, spanError(id, neuropb.SpanError_CODE_BUSY, "the node is shutting down")
	}
	if ss := s.sessions[key]; ss != nil {
		return ss, nil
	}
	if pos != 0 {
		return nil, &neuropb.SpanResponse{RequestId: id, Error: &neuropb.SpanError{Code: neuropb.SpanError_CODE_SESSION_BEHIND,
			Message: "no such session here"}}
	}
	if len(s.sessions) >= s.cfg.MaxSessions && !s.evictLocked() {
		return nil, spanError(id, neuropb.SpanError_CODE_BUSY, "all %d sessions are in use", s.cfg.MaxSessions)
	}
	ms, err := s.cfg.Gating.NewSession(s.cfg.NCtx)
	if err != nil {
		return nil, spanError(id, neuropb.SpanError_CODE_BUSY, "new session: %v", err)
	}
	st, ok := ms.(moe.Steps)
	if !ok {
		ms.Close()
		return nil, spanError(id, neuropb.SpanError_CODE_INTERNAL, "the backend's sessions do not run layers alone")
	}
	ss := &session{s: ms, st: st, exp: s.cfg.Experts(owner), chain: []neuropb.SpanChain{neuropb.SpanChainStart()}}
	ss.last.Store(time.Now().UnixNano())
	s.sessions[key] = ss
	return ss, nil
}

// evictLocked drops the session idle longest if it has been idle a
// minute or more.
func (s *Server) evictLocked() bool {
	var (
		oldest *session
		okey   sessionKey
		at     time.Time
	)
	for k, ss := range s.sessions {
		if l := ss.lastSeen(); oldest == nil || l.Before(at) {
			oldest, okey, at = ss, k, l
		}
	}
	if oldest == nil || time.Since(at) < time.Minute {
		return false
	}
	delete(s.sessions, okey)
	go oldest.drop()
	return true
}

func wantOf(w neuropb.SpanWant) moe.Want {
	switch w {
	case neuropb.SpanWant_SPAN_WANT_LAST:
		return moe.WantLast
	case neuropb.SpanWant_SPAN_WANT_EACH:
		return moe.WantEach
	}
	return moe.WantAll
}

func wireWant(w moe.Want) neuropb.SpanWant {
	switch w {
	case moe.WantLast:
		return neuropb.SpanWant_SPAN_WANT_LAST
	case moe.WantEach:
		return neuropb.SpanWant_SPAN_WANT_EACH
	}
	return neuropb.SpanWant_SPAN_WANT_ALL
}

// countingExperts counts a request's MoE calls.
type countingExperts struct {
	moe.Experts
	mu    sync.Mutex
	calls int
}

func (c *countingExperts) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	c.mu.Lock()
	c.calls++
	c.mu.Unlock()
	return c.Experts.MoE(ctx, layer, x, n, selected, weights)
}

func (c *countingExperts) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

// apartCounting is countingExperts for experts that compute rows apart.
type apartCounting struct{ *countingExperts }

func (a apartCounting) MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	a.mu.Lock()
	a.calls++
	a.mu.Unlock()
	return a.Experts.(moe.ApartExperts).MoEApart(ctx, layer, x, n, selected, weights)
}

// with is c as the experts of a layers call: with MoEApart where the
// wrapped experts have it.
func (c *countingExperts) with() moe.Experts {
	if _, ok := c.Experts.(moe.ApartExperts); ok {
		return apartCounting{c}
	}
	return c
}
