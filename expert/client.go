package expert

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// RemoteError is an error the expert node answered with.
type RemoteError struct {
	Code    neuropb.ExpertError_Code
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("expert node: %s: %s", e.Code, e.Message)
}

// ErrStreamClosed is returned to calls pending on a stream that broke.
var ErrStreamClosed = errors.New("expert stream closed")

// Request is one expert call.
type Request struct {
	Model         cid.Cid
	Layer, Expert int
	// Hidden holds N rows of the model's hidden size.
	Hidden []float32
	N      int
	// DType on the wire (default F16).
	DType neuropb.WireDType
	// Escrow, if not 0, is the ledger escrow that pays: the answer carries
	// the node's signed receipt.
	Escrow uint64
	// Deadline, if set, is sent to the node, which drops the request once
	// it passes.
	Deadline time.Time
	// RowsApart asks for each row computed as a batch of one.
	RowsApart bool
	// Segments, if given, split the rows among generations batched in one
	// call: consecutive runs of rows, each paid from its own escrow (Escrow
	// must then be 0) and computed as a call of its own would be; the
	// answer carries a receipt per segment.
	Segments []Segment
	// Delegations let the caller spend from escrows other nodes opened
	// (SignDelegation): a span node's calls for a head.
	Delegations []*neuropb.EscrowDelegation
	// LateReceipts takes the answer's receipts after it
	// (ExpertRequest.late_receipts): the answer comes without waiting for
	// the node's signature, and Response.TakeReceipts waits for them. A
	// group follows its first request's.
	LateReceipts bool
}

// Segment is one generation's run of rows in a batched call.
type Segment struct {
	Rows   int
	Escrow uint64
}

// Response is an expert's answer.
type Response struct {
	Output      []float32
	Compute     time.Duration
	Queue       time.Duration
	BatchTokens int
	// WireBytes counts request and response bytes on the stream.
	WireBytes int
	// Receipt is the node's signed receipt, when the request named an
	// escrow (the caller checks the signature before it relies on it).
	Receipt *neuropb.UsageReceipt
	// Receipts are a batched call's, one per segment (nil when the node
	// signs none).
	Receipts []*neuropb.UsageReceipt
	// Peer is the node that answered.
	Peer peer.ID

	// late, if set, brings Receipt and Receipts after the answer
	// (Request.LateReceipts).
	late *LateReceipts
}

// Late is the answer's receipts still to come (Request.LateReceipts), or
// nil when they came with it.
func (r *Response) Late() *LateReceipts { return r.late }

// TakeReceipts returns the answer's receipt, or a batched call's
// receipts (one per segment), as Receipt and Receipts hold them; when
// they come after the answer (Request.LateReceipts), it waits for them
// until ctx ends (LateReceipts.Take). No receipts and no error: the node
// signs none.
func (r *Response) TakeReceipts(ctx context.Context) (*neuropb.UsageReceipt, []*neuropb.UsageReceipt, error) {
	if r.late == nil {
		return r.Receipt, r.Receipts, nil
	}
	return r.late.Take(ctx)
}

// LateReceipts are an answer's receipts that come after it: small, so
// that a caller keeps them to the settlement without keeping the answer.
type LateReceipts struct {
	peer     peer.ID
	segments int           // the request's
	done     chan struct{} // closed once they came, or err says why they will not
	receipt  *neuropb.UsageReceipt
	receipts []*neuropb.UsageReceipt
	err      error
}

// Take waits until the receipts come or ctx ends, and returns them as
// Response.Receipt and Receipts would hold them. An error says they will
// not come (the stream broke, ctx ended, the node sent a wrong count).
func (l *LateReceipts) Take(ctx context.Context) (*neuropb.UsageReceipt, []*neuropb.UsageReceipt, error) {
	select {
	case <-l.done:
	case <-ctx.Done():
		return nil, nil, fmt.Errorf("receipts from %s: %w", l.peer, ctx.Err())
	}
	if l.err != nil {
		return nil, nil, fmt.Errorf("receipts from %s: %w", l.peer, l.err)
	}
	if len(l.receipts) != 0 && len(l.receipts) != l.segments {
		return nil, nil, fmt.Errorf("receipts from %s: %d receipts for %d segments", l.peer, len(l.receipts), l.segments)
	}
	return l.receipt, l.receipts, nil
}

// maxLate bounds the answers whose receipts a session waits for; an
// answer beyond it goes without its receipts (a node that never sends
// them cannot grow the map).
const maxLate = 4096

// errNoLateRoom: the session already waits for maxLate answers' receipts.
var errNoLateRoom = errors.New("too many answers' receipts outstanding")

// Client calls experts on other nodes, keeping one stream per peer open
// for many calls. Safe for concurrent use.
type Client struct {
	h   host.Host
	log *slog.Logger

	mu       sync.Mutex
	sessions map[peer.ID]*session // the session new calls to a peer take
	live     map[*session]bool    // every session whose stream is open, retired ones too
	links    map[peer.ID]*Link
	nextID   atomic.Uint64
	closed   bool
	nearby   atomic.Bool // Nearby

	done chan struct{} // closed by Close
	wg   sync.WaitGroup
}

// Link is how this client reaches an expert peer: over which connection
// its session stream runs, and how many calls it answered.
type Link struct {
	Peer  peer.ID
	Calls int64
	// Direct: the stream runs on a direct connection (for a home behind
	// NAT, one that hole punching opened); ViaRelay: through a relay.
	Direct, ViaRelay bool
	// Transport is the connection's: "tcp", "quic-v1", ….
	Transport string
	// ThisMachine: the peer is on this machine (a loopback address, or
	// one of its own; p2p.OnThisMachine).
	ThisMachine bool
}

// Links lists the peers this client has called, by peer ID.
func (c *Client) Links() []Link {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Link, 0, len(c.links))
	for _, l := range c.links {
		out = append(out, *l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}

// linkOf describes the connection a stream runs on.
func linkOf(p peer.ID, st network.Stream) Link {
	l := Link{Peer: p, ViaRelay: st.Conn().Stat().Limited}
	for _, pr := range st.Conn().RemoteMultiaddr().Protocols() {
		switch pr.Name {
		case "p2p-circuit":
			l.ViaRelay = true
		case "tcp", "quic-v1", "quic", "webtransport", "webrtc-direct", "ws", "wss":
			if l.Transport == "" || pr.Name != "tcp" {
				l.Transport = pr.Name
			}
		}
	}
	l.Direct = !l.ViaRelay
	l.ThisMachine = l.Direct && p2p.OnThisMachine(st.Conn().RemoteMultiaddr())
	return l
}

// Nearby reports whether an expert node this client has a session with
// is on this machine: its compute needs the cores this node's would-be
// pollers take. It is read for every round of calls, and kept as the
// sessions change (sessionsChangedLocked).
func (c *Client) Nearby() bool { return c.nearby.Load() }

// sessionsChangedLocked sets Nearby after c.sessions changed (under c.mu).
func (c *Client) sessionsChangedLocked() {
	nearby := false
	for p := range c.sessions {
		if l := c.links[p]; l != nil && l.ThisMachine {
			nearby = true
			break
		}
	}
	c.nearby.Store(nearby)
}

// NewClient makes a client on h.
func NewClient(h host.Host, log *slog.Logger) *Client {
	if log == nil {
		log = slog.Default()
	}
	return &Client{h: h, log: log.With("component", "expert-client"), sessions: map[peer.ID]*session{},
		live: map[*session]bool{}, done: make(chan struct{})}
}

// session is one open stream to one peer.
type session struct {
	st  network.Stream
	wmu sync.Mutex
	w   *wire.Writer

	mu      sync.Mutex
	pending map[uint64]chan result
	// late holds the answers whose receipts come after them, by request id
	late map[uint64]*LateReceipts
	err  error // set once the stream broke
	// relayed: the stream runs through a relay; retired: a direct
	// connection appeared and a new session took its place, so the stream
	// closes once its last call is answered.
	relayed bool
	retired bool
	// groups: the node speaks request groups (1.1.0 or later, not 1.0.0);
	// sharedRows: a group's rows sent once (ExpertProtocol, 1.2.0).
	groups, sharedRows bool
}

// retireIfIdle closes a retired session's stream once no call waits on
// it. A call that took the session before it retired and writes after it
// closed finds errRetired (the idle check and a call's registration are
// under one lock), and is sent on the peer's new session.
func (s *session) retireIfIdle() {
	s.mu.Lock()
	idle := s.retired && len(s.pending) == 0 && len(s.late) == 0 && s.err == nil
	if idle {
		s.err = errRetired
	}
	s.mu.Unlock()
	if idle {
		_ = s.st.Close()
	}
}

// errRetired: a session closed, idle, after another took its place.
var errRetired = fmt.Errorf("%w: replaced by a newer one", ErrStreamClosed)

type result struct {
	resp *neuropb.ExpertResponse
	late *LateReceipts // the answer's receipts, when they come after it
	err  error
}

// Warm opens the session to p now, so that the first call finds it (and,
// for a peer behind NAT, hole punching under way or done).
func (c *Client) Warm(ctx context.Context, p peer.ID) error {
	_, err := c.session(ctx, p)
	return err
}

// Call sends req to p and waits for the answer or ctx. A call whose
// relayed stream breaks (the relay connection goes once hole punching has
// opened a direct one) is sent again, once, on a new stream: expert
// compute has no side effects.
func (c *Client) Call(ctx context.Context, p peer.ID, req Request) (*Response, error) {
	resp, again, err := c.call(ctx, p, req)
	if err != nil && again && errors.Is(err, ErrStreamClosed) && ctx.Err() == nil {
		resp, _, err = c.call(ctx, p, req)
	}
	return resp, err
}

// call makes one call; again says that a broken stream is worth one more
// try: a relayed one (hole punching replaces it), or one retired before
// the call was written on it.
func (c *Client) call(ctx context.Context, p peer.ID, req Request) (_ *Response, again bool, err error) {
	msg, err := message(&req)
	if err != nil {
		return nil, false, err
	}
	s, err := c.session(ctx, p)
	if err != nil {
		return nil, false, err
	}
	msg.RequestId = c.nextID.Add(1)
	chs, err := c.send(ctx, p, s, msg)
	if err != nil {
		return nil, s.relayed || errors.Is(err, errRetired), err
	}
	resp, err := c.wait(ctx, p, s, msg, req, len(msg.GetHidden().GetData()), chs[0])
	return resp, s.relayed, err
}

// GroupResult is one member's outcome of CallGroup.
type GroupResult struct {
	Resp *Response
	Err  error
}

// CallGroup asks p for several experts of one model and layer in one
// message: the node computes them together and answers them in one
// message. Each member succeeds or fails on its own, as a Call of it
// would (a call whose relayed stream breaks is not sent again: the caller
// has other providers).
func (c *Client) CallGroup(ctx context.Context, p peer.ID, reqs []Request) []GroupResult {
	res := make([]GroupResult, len(reqs))
	g, err := c.SendGroup(ctx, p, reqs)
	for i := range res {
		if err != nil {
			res[i].Err = err
			continue
		}
		res[i].Resp, res[i].Err = g.Wait(ctx, i)
	}
	return res
}

// ErrNoGroups: the node speaks the expert protocol without request groups
// (an older version); ask it call by call.
var ErrNoGroups = errors.New("the node does not take request groups")

// SentGroup is a group of calls written to a node (SendGroup) whose
// answers are still to come: each member waits for its own.
type SentGroup struct {
	c    *Client
	p    peer.ID
	s    *session
	msgs []*neuropb.ExpertRequest
	reqs []Request
	chs  []chan result
	// wireIn: the bytes of hidden rows each member took on the wire.
	wireIn []int
}

// SendGroup writes reqs to p in one message, as CallGroup does, and
// returns without waiting: Wait takes each member's answer, Forget drops
// a member that will not wait.
func (c *Client) SendGroup(ctx context.Context, p peer.ID, reqs []Request) (*SentGroup, error) {
	if len(reqs) == 0 || len(reqs) > neuropb.MaxGroup {
		return nil, fmt.Errorf("expert call: a group of %d requests (1 to %d)", len(reqs), neuropb.MaxGroup)
	}
	reqs = slices.Clone(reqs)
	msgs := make([]*neuropb.ExpertRequest, len(reqs))
	for i := range reqs {
		m, err := message(&reqs[i])
		if err != nil {
			return nil, err
		}
		msgs[i] = m
	}
	// A session retired between taking it and writing is taken again:
	// nothing was sent on it.
	for try := 0; ; try++ {
		s, err := c.session(ctx, p)
		if err != nil {
			return nil, err
		}
		if !s.groups {
			return nil, fmt.Errorf("expert call to %s: %w", p, ErrNoGroups)
		}
		for _, m := range msgs {
			m.RequestId = c.nextID.Add(1)
		}
		// The bytes of hidden rows each member took on the wire: with
		// shared rows, the group's distinct rows on the top request's.
		wireIn := make([]int, len(msgs))
		var saved []*neuropb.Tensor
		if s.sharedRows {
			saved = neuropb.ShareRows(msgs)
		}
		for i, m := range msgs {
			wireIn[i] = len(m.GetHidden().GetData()) + len(m.GetGroupRows().GetData())
		}
		top := msgs[0]
		top.Group = msgs[1:]
		chs, err := c.send(ctx, p, s, msgs...)
		top.Group = nil
		neuropb.RestoreRows(msgs, saved)
		if errors.Is(err, errRetired) && try == 0 {
			continue
		}
		if err != nil {
			return nil, err
		}
		return &SentGroup{c: c, p: p, s: s, msgs: msgs, reqs: reqs, chs: chs, wireIn: wireIn}, nil
	}
}

// Wait takes member i's answer (once), or gives up when ctx ends.
func (g *SentGroup) Wait(ctx context.Context, i int) (*Response, error) {
	return g.c.wait(ctx, g.p, g.s, g.msgs[i], g.reqs[i], g.wireIn[i], g.chs[i])
}

// WaitOr takes member i's answer as Wait does (answered true), unless
// expire fires or ctx ends first: then the member is not forgotten, and
// its answer can still be waited for (Wait, WaitOr) or dropped (Forget).
// One goroutine can so wait for a whole group's answers, which come in one
// message, without a goroutine or a context for each.
func (g *SentGroup) WaitOr(ctx context.Context, i int, expire <-chan time.Time) (_ *Response, _ error, answered bool) {
	var r result
	select {
	case r = <-g.chs[i]: // an answer already in wins over an expiry
	default:
		select {
		case r = <-g.chs[i]:
		case <-expire:
			return nil, nil, false
		case <-ctx.Done():
			return nil, nil, false
		}
	}
	g.c.forget(g.s, g.msgs[i])
	resp, err := g.c.answer(g.p, g.reqs[i], g.wireIn[i], r)
	return resp, err, true
}

// Peer is the node the group went to.
func (g *SentGroup) Peer() peer.ID { return g.p }

// Forget drops member i, which will not Wait: its answer is discarded.
func (g *SentGroup) Forget(i int) { g.c.forget(g.s, g.msgs[i]) }

// message checks req and makes its wire message (without its id).
func message(req *Request) (*neuropb.ExpertRequest, error) {
	if req.N < 1 || len(req.Hidden)%req.N != 0 {
		return nil, fmt.Errorf("expert call: %d floats for %d tokens", len(req.Hidden), req.N)
	}
	if req.DType == neuropb.WireDType_WIRE_DTYPE_UNSPECIFIED {
		req.DType = neuropb.WireDType_WIRE_DTYPE_F16
	}
	msg := &neuropb.ExpertRequest{
		Model: req.Model.Bytes(), Layer: uint32(req.Layer), Expert: uint32(req.Expert),
		Hidden: EncodeFloats(req.Hidden, req.N, len(req.Hidden)/req.N, req.DType),
		Escrow: req.Escrow, RowsApart: req.RowsApart, Delegations: req.Delegations,
		LateReceipts: req.LateReceipts,
	}
	if len(req.Segments) > 0 {
		sum := 0
		for _, sg := range req.Segments {
			if sg.Rows < 1 {
				return nil, fmt.Errorf("expert call: a segment of %d rows", sg.Rows)
			}
			sum += sg.Rows
			msg.Segments = append(msg.Segments, &neuropb.Segment{Rows: uint32(sg.Rows), Escrow: sg.Escrow})
		}
		if sum != req.N || req.Escrow != 0 {
			return nil, fmt.Errorf("expert call: segments of %d rows for %d tokens (escrow %d)", sum, req.N, req.Escrow)
		}
	}
	if !req.Deadline.IsZero() {
		msg.DeadlineUnixMs = req.Deadline.UnixMilli()
	}
	return msg, nil
}

// send registers a waiting call for each of ids (the message's and its
// group's) and writes msg, the first of them, to s.
func (c *Client) send(ctx context.Context, p peer.ID, s *session, ids ...*neuropb.ExpertRequest) ([]chan result, error) {
	chs := make([]chan result, len(ids))
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("expert call to %s: %w", p, s.err)
	}
	for i, m := range ids {
		chs[i] = make(chan result, 1)
		s.pending[m.GetRequestId()] = chs[i]
	}
	s.mu.Unlock()
	s.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.st.SetWriteDeadline(dl)
	} else {
		_ = s.st.SetWriteDeadline(time.Now().Add(30 * time.Second))
	}
	err := s.w.Write(ids[0])
	s.wmu.Unlock()
	if err != nil {
		c.forget(s, ids...)
		err = fmt.Errorf("%w: write: %v", ErrStreamClosed, err)
		s.fail(err)
		c.drop(p, s)
		return nil, fmt.Errorf("expert call to %s: %w", p, err)
	}
	return chs, nil
}

// forget drops the waiting calls of ids.
func (c *Client) forget(s *session, ids ...*neuropb.ExpertRequest) {
	s.mu.Lock()
	for _, m := range ids {
		delete(s.pending, m.GetRequestId())
	}
	s.mu.Unlock()
	s.retireIfIdle()
}

// wait takes msg's answer from ch (req is what the caller asked, wireIn
// the bytes of hidden rows it took on the wire).
func (c *Client) wait(ctx context.Context, p peer.ID, s *session, msg *neuropb.ExpertRequest, req Request, wireIn int, ch chan result) (*Response, error) {
	defer c.forget(s, msg)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case r := <-ch:
		return c.answer(p, req, wireIn, r)
	}
}

// answer checks r, p's answer to req (what the caller asked; its hidden
// rows took wireIn bytes on the wire), and makes it the caller's Response.
func (c *Client) answer(p peer.ID, req Request, wireIn int, r result) (*Response, error) {
	if r.err != nil {
		return nil, fmt.Errorf("expert call to %s: %w", p, r.err)
	}
	if e := r.resp.GetError(); e != nil {
		return nil, &RemoteError{Code: e.GetCode(), Message: e.GetMessage()}
	}
	rows, cols, err := r.resp.GetOutput().Rows()
	if err != nil || rows != req.N || cols*req.N != len(req.Hidden) {
		return nil, fmt.Errorf("expert call to %s: bad output shape %v: %v", p, r.resp.GetOutput().GetShape(), err)
	}
	receipts := r.resp.GetReceipts()
	if r.late != nil {
		r.late.segments = len(req.Segments) // read once done closes, after this
	}
	if len(receipts) != 0 && len(receipts) != len(req.Segments) {
		return nil, fmt.Errorf("expert call to %s: %d receipts for %d segments", p, len(receipts), len(req.Segments))
	}
	c.mu.Lock()
	if l := c.links[p]; l != nil {
		l.Calls++
	}
	c.mu.Unlock()
	return &Response{
		Output:      DecodeFloats(r.resp.GetOutput()),
		Compute:     time.Duration(r.resp.GetComputeUs()) * time.Microsecond,
		Queue:       time.Duration(r.resp.GetQueueUs()) * time.Microsecond,
		BatchTokens: int(r.resp.GetBatchTokens()),
		WireBytes:   wireIn + len(r.resp.GetOutput().GetData()),
		Receipt:     r.resp.GetReceipt(),
		Receipts:    receipts,
		Peer:        p,
		late:        r.late,
	}, nil
}

// session returns the open stream to p, opening one if needed.
func (c *Client) session(ctx context.Context, p peer.ID) (*session, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errors.New("expert client closed")
	}
	if s := c.sessions[p]; s != nil {
		if !s.relayed || !c.direct(p) {
			c.mu.Unlock()
			return s, nil
		}
		// Hole punching opened a direct connection after this session
		// went through the relay: new calls take the direct one.
		delete(c.sessions, p)
		c.sessionsChangedLocked()
		s.mu.Lock()
		s.retired = true
		s.mu.Unlock()
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			s.retireIfIdle()
		}()
	}
	c.mu.Unlock()
	st, err := p2p.NewStream(ctx, c.h, p, neuropb.ExpertProtocol, neuropb.ExpertProtocol11, neuropb.ExpertProtocol10)
	if err != nil {
		return nil, fmt.Errorf("expert stream to %s: %w", p, err)
	}
	l := linkOf(p, st)
	s := &session{st: st, w: wire.NewWriter(st, neuropb.MaxExpertMessageSize), pending: map[uint64]chan result{}, late: map[uint64]*LateReceipts{},
		relayed: l.ViaRelay, groups: st.Protocol() != neuropb.ExpertProtocol10, sharedRows: st.Protocol() == neuropb.ExpertProtocol}
	c.mu.Lock()
	if old := c.sessions[p]; old != nil || c.closed { // another call won the race
		c.mu.Unlock()
		st.Reset()
		if old == nil {
			return nil, errors.New("expert client closed")
		}
		return old, nil
	}
	c.sessions[p] = s
	// The connection carries calls: the connection manager trims it
	// after the peers that carry none.
	c.h.ConnManager().TagPeer(p, sessionTag, sessionTagWeight)
	if c.links == nil {
		c.links = map[peer.ID]*Link{}
	}
	if old := c.links[p]; old != nil {
		l.Calls = old.Calls
	}
	c.links[p] = &l
	c.sessionsChangedLocked()
	c.live[s] = true
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.read(p, s)
	}()
	if s.relayed {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.repunch(p, s)
		}()
	}
	c.mu.Unlock()
	return s, nil
}

// read delivers responses until the stream breaks, then fails the calls
// still pending.
func (c *Client) read(p peer.ID, s *session) {
	r := wire.NewReader(s.st, neuropb.MaxExpertMessageSize)
	for {
		resp := &neuropb.ExpertResponse{}
		if err := r.Read(resp); err != nil {
			s.fail(fmt.Errorf("%w: %v", ErrStreamClosed, err))
			c.drop(p, s)
			s.st.Reset()
			c.mu.Lock()
			delete(c.live, s)
			c.mu.Unlock()
			return
		}
		if len(resp.GetReceiptsFor()) > 0 {
			s.receiptsCame(resp.GetReceiptsFor())
			resp.ReceiptsFor = nil
		}
		group := resp.GetGroup()
		resp.Group = nil
		for _, r := range append([]*neuropb.ExpertResponse{resp}, group...) {
			s.mu.Lock()
			ch := s.pending[r.GetRequestId()]
			var late *LateReceipts
			if ch != nil && r.GetReceiptsFollow() && r.GetError() == nil {
				// registered before the answer is handed over, and before
				// this reader reads the message that brings them
				late = &LateReceipts{peer: p, done: make(chan struct{})}
				if _, dup := s.late[r.GetRequestId()]; dup || len(s.late) >= maxLate {
					late.err = errNoLateRoom
					close(late.done)
				} else {
					s.late[r.GetRequestId()] = late
				}
			}
			s.mu.Unlock()
			if ch == nil {
				if e := r.GetError(); e != nil && r.GetRequestId() == 0 {
					c.log.Warn("expert node refused a message", "peer", p, "code", e.GetCode(), "msg", e.GetMessage())
				}
				continue
			}
			deliver(ch, result{resp: r, late: late})
		}
	}
}

// receiptsCame hands the late receipts of earlier answers (a response's
// receipts_for) to their callers; an entry for no answer waiting is
// dropped.
func (s *session) receiptsCame(entries []*neuropb.ExpertResponse) {
	s.mu.Lock()
	for _, e := range entries {
		l := s.late[e.GetRequestId()]
		if l == nil {
			continue
		}
		delete(s.late, e.GetRequestId())
		l.receipt, l.receipts = e.GetReceipt(), e.GetReceipts()
		close(l.done)
	}
	s.mu.Unlock()
	s.retireIfIdle()
}

// deliver hands r to a call; a call takes one result, so a second (a
// response racing a broken stream) is dropped rather than blocking.
func deliver(ch chan result, r result) {
	select {
	case ch <- r:
	default:
	}
}

func (s *session) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return
	}
	s.err = err
	for id, ch := range s.pending {
		deliver(ch, result{err: err})
		delete(s.pending, id)
	}
	for id, l := range s.late {
		l.err = err
		close(l.done)
		delete(s.late, id)
	}
}

// Hole punching through two cone NATs can lose a race (DCUtR runs on one
// relayed connection, and the swarm may keep another); it is tried again
// on the next relayed connection. repunch gives a relayed session
// repunchTries more chances: when no direct connection came, it closes
// the idle relayed connection, so that the next call dials the relay again
// and the peer starts a new hole punch. Calls caught on the connection are
// sent again (Call).
const (
	repunchTries = 3
	repunchAfter = 3 * time.Second
)

func (c *Client) repunch(p peer.ID, s *session) {
	for range repunchTries {
		select {
		case <-c.done:
			return
		case <-time.After(repunchAfter):
		}
		c.mu.Lock()
		closed, current := c.closed, c.sessions[p] == s
		c.mu.Unlock()
		if closed || !current || c.direct(p) {
			return
		}
		s.mu.Lock()
		idle := len(s.pending) == 0 && s.err == nil
		if idle {
			s.retired = true
		}
		s.mu.Unlock()
		if !idle {
			continue
		}
		c.drop(p, s)
		for _, conn := range c.h.Network().ConnsToPeer(p) {
			if conn.Stat().Limited {
				_ = conn.Close()
			}
		}
		c.log.Debug("relayed session closed to punch a hole again", "peer", p)
		return
	}
}

// direct says whether a direct (not relayed) connection to p is open.
func (c *Client) direct(p peer.ID) bool {
	for _, conn := range c.h.Network().ConnsToPeer(p) {
		if !conn.Stat().Limited {
			return true
		}
	}
	return false
}

func (c *Client) drop(p peer.ID, s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sessions[p] == s {
		delete(c.sessions, p)
		c.sessionsChangedLocked()
		c.h.ConnManager().UntagPeer(p, sessionTag)
	}
}

// sessionTag marks, in the connection manager, the peers this client has
// a session with; sessionTagWeight is above what the DHT gives its
// routing table's peers, below a GossipSub mesh peer's.
const (
	sessionTag       = "neuro-expert-session"
	sessionTagWeight = 20
)

// Close resets every stream; pending calls fail. It returns once the
// client's goroutines have ended, and is safe to call more than once.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.wg.Wait()
		return nil
	}
	c.closed = true
	close(c.done)
	live := c.live
	c.sessions, c.live = map[peer.ID]*session{}, map[*session]bool{}
	c.sessionsChangedLocked()
	c.mu.Unlock()
	for s := range live {
		s.fail(ErrStreamClosed)
		s.st.Reset()
	}
	c.wg.Wait()
	return nil
}
