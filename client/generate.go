package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// Message is one turn of a chat.
type Message struct {
	// Role is system, user or assistant.
	Role    string
	Content string
}

// Request asks for a completion of Prompt, or of a chat (Messages,
// formatted with the model's chat template). Zero values mean: greedy
// decoding, no top-k or top-p cut, a random seed, the gating node's
// default length, no stop strings.
type Request struct {
	Model    cid.Cid
	Prompt   string
	Messages []Message

	Temperature float32
	TopK        int
	TopP        float32
	// Seed makes sampling reproducible; nil picks one at random.
	Seed      *uint64
	MaxTokens int
	// Stop ends the generation before the first of these strings.
	Stop []string
	// Escrow is the ledger escrow that pays the experts (0: none), opened
	// by the client naming the gating node.
	Escrow uint64
}

// Proto is the request as sent on the wire.
func (r Request) Proto() *neuropb.InferRequest {
	msgs := make([]*neuropb.ChatMessage, len(r.Messages))
	for i, m := range r.Messages {
		msgs[i] = &neuropb.ChatMessage{Role: m.Role, Content: m.Content}
	}
	var model []byte
	if r.Model.Defined() {
		model = r.Model.Bytes()
	}
	return &neuropb.InferRequest{Model: model, Prompt: r.Prompt, Messages: msgs, Escrow: r.Escrow, Sampling: &neuropb.Sampling{
		Temperature: r.Temperature, TopK: uint32(max(0, r.TopK)), TopP: r.TopP, Seed: r.Seed,
		MaxTokens: uint32(max(0, r.MaxTokens)), Stop: r.Stop}}
}

// Token is one generated token.
type Token struct {
	ID int32
	// Text is what the token adds to the text (possibly nothing yet; see
	// neuropb.InferToken).
	Text string
	// Compute is the time the gating node spent on the token; Latency the
	// time since the previous token (or since the request, for the first)
	// as the client saw it.
	Compute, Latency time.Duration
	// Rewind, when set, makes this no token but a correction: drop every
	// token after the first Rewind.Keep and the text after its first
	// Rewind.KeepText bytes (an expert result they came from was found
	// wrong); the tokens that follow replace them. Collect applies it.
	Rewind *Rewind
}

// Rewind withdraws the end of a generation; see Token.Rewind.
type Rewind struct{ Keep, KeepText int }

// Done is the end of a successful generation.
type Done struct {
	Reason           neuropb.FinishReason
	PromptTokens     int
	CompletionTokens int
	Text             string
	// Rest is the end of Text that no token carried.
	Rest    string
	Prefill time.Duration
	Stats   *neuropb.InferStats
	// Gating is the node that generated.
	Gating peer.ID
	// Escrow paid for the generation (0: none), FLOPs is the expert work
	// settled from it and Cost what that work cost, in base units
	// (1 NEURO = 10^6).
	Escrow uint64
	FLOPs  uint64
	Cost   uint64
}

// Error is a request a gating node refused or failed.
type Error struct {
	Code    neuropb.InferError_Code
	Message string
	Peer    peer.ID
}

func (e *Error) Error() string {
	return fmt.Sprintf("gating node %s: %s: %s", shortID(e.Peer), codeName(e.Code), e.Message)
}

func codeName(c neuropb.InferError_Code) string {
	switch c {
	case neuropb.InferError_CODE_BAD_REQUEST:
		return "bad request"
	case neuropb.InferError_CODE_UNKNOWN_MODEL:
		return "unknown model"
	case neuropb.InferError_CODE_BUSY:
		return "busy"
	case neuropb.InferError_CODE_NO_PROVIDER:
		return "no provider"
	case neuropb.InferError_CODE_PAYMENT_REQUIRED:
		return "payment required"
	}
	return "error"
}

func shortID(p peer.ID) string {
	s := p.String()
	if len(s) > 12 {
		return s[len(s)-8:]
	}
	return s
}

// retryable reports whether another gating node may succeed where one
// failed with err.
func retryable(err error) bool {
	var e *Error
	if errors.As(err, &e) {
		return e.Code != neuropb.InferError_CODE_BAD_REQUEST && e.Code != neuropb.InferError_CODE_PAYMENT_REQUIRED
	}
	return true
}

// ErrNoGatingNode means no gating node of the model could be found or
// reached.
var ErrNoGatingNode = errors.New("no gating node answered")

// Stream is a generation in progress. Read it with Next until io.EOF,
// then Done has the summary. Close it to stop early.
type Stream struct {
	c     *Client
	ctx   context.Context
	req   *neuropb.InferRequest
	model cid.Cid
	nodes []peer.AddrInfo
	next  int
	errs  []error

	st      network.Stream
	stop    func() bool
	r       *wire.Reader
	peer    peer.ID
	last    time.Time
	tokens  int
	prefill time.Duration
	prompt  int
	queued  int // the last place in the gating node's queue (0: never queued)
	done    *Done
	err     error
}

// Generate sends req to a gating node of its model and returns when the
// node has evaluated the prompt. If a gating node is unreachable, busy,
// or fails before its first token, the next one is tried; a bad request
// is not retried.
func (c *Client) Generate(ctx context.Context, req Request) (*Stream, error) {
	pr := req.Proto()
	if err := pr.Validate(); err != nil {
		return nil, fmt.Errorf("generate: %w", err)
	}
	nodes, err := c.GatingNodes(ctx, req.Model)
	if err != nil {
		return nil, err
	}
	if len(nodes) == 0 {
		return nil, fmt.Errorf("generate: %w: no gating node of model %s found", ErrNoGatingNode, req.Model)
	}
	s := &Stream{c: c, ctx: ctx, req: pr, model: req.Model, nodes: nodes}
	if err := s.open(); err != nil {
		return nil, err
	}
	return s, nil
}

// openRounds is how many times open goes through the gating nodes when
// none of them could be reached (the connection or the stream's
// negotiation failed, so no request was sent), waiting a second, then
// two, between rounds, within the caller's context: a gating node too
// busy to negotiate a stream within the client's timeout (seen in a
// simulated network of 500 hosts on two cores) is asked again rather
// than the generation failing.
const openRounds = 3

// unreachedError is a gating node that could not be reached: no request
// went out.
type unreachedError struct{ error }

func (e unreachedError) Unwrap() error { return e.error }

// open tries the gating nodes from s.next until one accepts the request
// and sends its start.
func (s *Stream) open() error {
	for round := 0; ; round++ {
		unreached := true
		for s.next < len(s.nodes) {
			ai := s.nodes[s.next]
			s.next++
			err := s.try(ai)
			if err == nil {
				return nil
			}
			s.errs = append(s.errs, err)
			s.c.log.Debug("gating node failed", "peer", ai.ID, "err", err)
			if !retryable(err) {
				return err
			}
			unreached = unreached && errors.As(err, new(unreachedError))
			if s.ctx.Err() != nil {
				break
			}
		}
		if !unreached || round+1 >= openRounds || s.ctx.Err() != nil {
			break
		}
		select {
		case <-s.ctx.Done():
		case <-time.After(time.Second << round):
		}
		if s.ctx.Err() != nil {
			break
		}
		s.next = 0
	}
	s.c.forget(s.model)
	if len(s.errs) == 1 {
		return s.errs[0]
	}
	return fmt.Errorf("generate: %w: tried %d: %w", ErrNoGatingNode, len(s.errs), errors.Join(s.errs...))
}

func (s *Stream) try(ai peer.AddrInfo) error {
	cctx, cancel := context.WithTimeout(s.ctx, s.c.timeout)
	defer cancel()
	if len(ai.Addrs) > 0 || s.c.h.Network().Connectedness(ai.ID) != network.Connected {
		if err := s.c.h.Connect(cctx, ai); err != nil {
			return unreachedError{fmt.Errorf("connect %s: %w", ai.ID, err)}
		}
	}
	st, err := p2p.NewStream(cctx, s.c.h, ai.ID, neuropb.InferProtocol)
	if err != nil {
		return unreachedError{fmt.Errorf("open stream to %s: %w", ai.ID, err)}
	}
	req := s.req
	if s.c.wallet != nil && req.GetEscrow() == 0 {
		// An escrow for this gating node: sized from its quote.
		if req, err = s.c.paidRequest(s.ctx, ai.ID, s.req); err != nil {
			st.Reset()
			return err
		}
	}
	w := wire.NewWriter(st, neuropb.MaxInferRequestSize)
	_ = st.SetWriteDeadline(time.Now().Add(s.c.timeout))
	if err := w.Write(req); err != nil {
		st.Reset()
		return fmt.Errorf("send request to %s: %w", ai.ID, err)
	}
	_ = st.CloseWrite()
	s.st, s.r, s.peer, s.last = st, wire.NewReader(st, neuropb.MaxInferResponseSize), ai.ID, time.Now()
	// Stop reading when the caller's context ends.
	stop := context.AfterFunc(s.ctx, func() { st.Reset() })
	s.stop = stop
	resp, err := s.read()
	// A busy gating node may queue the request first: wait our turn.
	for err == nil && resp.GetQueued() != nil {
		s.queued = int(resp.GetQueued().GetPosition())
		s.c.log.Debug("queued by the gating node", "peer", ai.ID, "position", s.queued)
		resp, err = s.read()
	}
	if err != nil {
		stop()
		st.Reset()
		return err
	}
	start := resp.GetStart()
	if start == nil {
		stop()
		st.Reset()
		return fmt.Errorf("gating node %s: protocol error: first message is not a start", ai.ID)
	}
	s.prompt, s.prefill = int(start.GetPromptTokens()), time.Duration(start.GetPrefillUs())*time.Microsecond
	return nil
}

// read reads one response, turning an error event into *Error.
func (s *Stream) read() (*neuropb.InferResponse, error) {
	resp := &neuropb.InferResponse{}
	if err := s.r.Read(resp); err != nil {
		if s.ctx.Err() != nil {
			return nil, s.ctx.Err()
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("gating node %s: %w", s.peer, err)
	}
	if e := resp.GetError(); e != nil {
		return nil, &Error{Code: e.GetCode(), Message: e.GetMessage(), Peer: s.peer}
	}
	return resp, nil
}

// Next returns the next token, or io.EOF when the generation has ended
// (Done then holds its summary). If the gating node fails before the
// first token, the request moves to the next gating node.
func (s *Stream) Next() (Token, error) {
	if s.err != nil {
		return Token{}, s.err
	}
	for {
		resp, err := s.read()
		if err != nil {
			if s.tokens == 0 && retryable(err) && s.ctx.Err() == nil {
				s.st.Reset()
				s.errs = append(s.errs, err)
				if oerr := s.open(); oerr == nil {
					continue
				}
			}
			s.finish(err)
			return Token{}, err
		}
		switch ev := resp.GetEvent().(type) {
		case *neuropb.InferResponse_Token:
			now := time.Now()
			t := Token{ID: ev.Token.GetId(), Text: string(ev.Token.GetText()),
				Compute: time.Duration(ev.Token.GetElapsedUs()) * time.Microsecond, Latency: now.Sub(s.last)}
			s.last = now
			s.tokens++
			return t, nil
		case *neuropb.InferResponse_Rewind:
			return Token{ID: -1, Rewind: &Rewind{Keep: int(ev.Rewind.GetKeepTokens()), KeepText: int(ev.Rewind.GetKeepTextBytes())}}, nil
		case *neuropb.InferResponse_Done:
			d := ev.Done
			s.done = &Done{Reason: d.GetReason(), PromptTokens: int(d.GetPromptTokens()),
				CompletionTokens: int(d.GetCompletionTokens()), Text: string(d.GetText()), Rest: string(d.GetRest()),
				Prefill: s.prefill, Stats: d.GetStats(), Gating: s.peer, Escrow: d.GetEscrow(), FLOPs: d.GetFlops(), Cost: d.GetCost()}
			s.finish(io.EOF)
			return Token{}, io.EOF
		default:
			err := fmt.Errorf("gating node %s: protocol error: unexpected %T", s.peer, ev)
			s.finish(err)
			return Token{}, err
		}
	}
}

func (s *Stream) finish(err error) {
	s.err = err
	if s.stop != nil {
		s.stop()
	}
	if s.st != nil {
		if err == io.EOF {
			s.st.Close()
		} else {
			s.st.Reset()
		}
	}
}

// Done is the summary of a generation that has ended (nil before Next
// returned io.EOF).
func (s *Stream) Done() *Done { return s.done }

// Queued is the last place in line the gating node gave the request
// before it started (0: it started at once).
func (s *Stream) Queued() int { return s.queued }

// PromptTokens is the length of the evaluated prompt.
func (s *Stream) PromptTokens() int { return s.prompt }

// Gating is the node generating.
func (s *Stream) Gating() peer.ID { return s.peer }

// Close stops the generation if it is still running.
func (s *Stream) Close() error {
	if s.err == nil {
		s.finish(errors.New("stream closed"))
	}
	return nil
}

// Collect reads the whole stream: the final tokens (rewinds applied) and
// the summary.
func (s *Stream) Collect() ([]Token, *Done, error) {
	var toks []Token
	for {
		t, err := s.Next()
		if err == io.EOF {
			return toks, s.done, nil
		}
		if err != nil {
			return toks, nil, err
		}
		if t.Rewind != nil {
			toks = toks[:min(t.Rewind.Keep, len(toks))]
			continue
		}
		toks = append(toks, t)
	}
}
