package expert

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
	neuropb "github.com/neuro-p2p/neuro/proto"
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
}

// Client calls experts on other nodes, keeping one stream per peer open
// for many calls. Safe for concurrent use.
type Client struct {
	h   host.Host
	log *slog.Logger

	mu       sync.Mutex
	sessions map[peer.ID]*session
	nextID   atomic.Uint64
	closed   bool
}

// NewClient makes a client on h.
func NewClient(h host.Host, log *slog.Logger) *Client {
	if log == nil {
		log = slog.Default()
	}
	return &Client{h: h, log: log.With("component", "expert-client"), sessions: map[peer.ID]*session{}}
}

// session is one open stream to one peer.
type session struct {
	st  network.Stream
	wmu sync.Mutex
	w   *wire.Writer

	mu      sync.Mutex
	pending map[uint64]chan result
	err     error // set once the stream broke
}

type result struct {
	resp *neuropb.ExpertResponse
	err  error
}

// Call sends req to p and waits for the answer or ctx.
func (c *Client) Call(ctx context.Context, p peer.ID, req Request) (*Response, error) {
	if req.N < 1 || len(req.Hidden)%req.N != 0 {
		return nil, fmt.Errorf("expert call: %d floats for %d tokens", len(req.Hidden), req.N)
	}
	if req.DType == neuropb.WireDType_WIRE_DTYPE_UNSPECIFIED {
		req.DType = neuropb.WireDType_WIRE_DTYPE_F16
	}
	s, err := c.session(ctx, p)
	if err != nil {
		return nil, err
	}
	id := c.nextID.Add(1)
	msg := &neuropb.ExpertRequest{
		RequestId: id, Model: req.Model.Bytes(), Layer: uint32(req.Layer), Expert: uint32(req.Expert),
		Hidden: EncodeFloats(req.Hidden, req.N, len(req.Hidden)/req.N, req.DType),
		Escrow: req.Escrow,
	}
	if !req.Deadline.IsZero() {
		msg.DeadlineUnixMs = req.Deadline.UnixMilli()
	}
	ch := make(chan result, 1)
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return nil, s.err
	}
	s.pending[id] = ch
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.pending, id)
		s.mu.Unlock()
	}()
	s.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.st.SetWriteDeadline(dl)
	} else {
		_ = s.st.SetWriteDeadline(time.Now().Add(30 * time.Second))
	}
	err = s.w.Write(msg)
	s.wmu.Unlock()
	if err != nil {
		s.fail(fmt.Errorf("%w: write: %v", ErrStreamClosed, err))
		c.drop(p, s)
		return nil, fmt.Errorf("expert call to %s: %w", p, err)
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case r := <-ch:
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
		return &Response{
			Output:      DecodeFloats(r.resp.GetOutput()),
			Compute:     time.Duration(r.resp.GetComputeUs()) * time.Microsecond,
			Queue:       time.Duration(r.resp.GetQueueUs()) * time.Microsecond,
			BatchTokens: int(r.resp.GetBatchTokens()),
			WireBytes:   len(msg.GetHidden().GetData()) + len(r.resp.GetOutput().GetData()),
			Receipt:     r.resp.GetReceipt(),
		}, nil
	}
}

// session returns the open stream to p, opening one if needed.
func (c *Client) session(ctx context.Context, p peer.ID) (*session, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errors.New("expert client closed")
	}
	if s := c.sessions[p]; s != nil {
		c.mu.Unlock()
		return s, nil
	}
	c.mu.Unlock()
	st, err := p2p.NewStream(ctx, c.h, p, neuropb.ExpertProtocol)
	if err != nil {
		return nil, fmt.Errorf("expert stream to %s: %w", p, err)
	}
	s := &session{st: st, w: wire.NewWriter(st, neuropb.MaxExpertMessageSize), pending: map[uint64]chan result{}}
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
	c.mu.Unlock()
	go c.read(p, s)
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
			return
		}
		s.mu.Lock()
		ch := s.pending[resp.GetRequestId()]
		s.mu.Unlock()
		if ch == nil {
			if e := resp.GetError(); e != nil && resp.GetRequestId() == 0 {
				c.log.Warn("expert node refused a message", "peer", p, "code", e.GetCode(), "msg", e.GetMessage())
			}
			continue
		}
		deliver(ch, result{resp: resp})
	}
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
}

func (c *Client) drop(p peer.ID, s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sessions[p] == s {
		delete(c.sessions, p)
	}
}

// Close resets every stream. Pending calls fail.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	sessions := c.sessions
	c.sessions = map[peer.ID]*session{}
	c.mu.Unlock()
	for _, s := range sessions {
		s.fail(ErrStreamClosed)
		s.st.Reset()
	}
	return nil
}
