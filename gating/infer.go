package gating

import (
	"context"
	"errors"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// Timeouts of the infer protocol.
const (
	// inferReadTimeout bounds reading the request.
	inferReadTimeout = 30 * time.Second
	// inferWriteTimeout bounds writing one response: a client that stops
	// reading for this long loses its generation.
	inferWriteTimeout = 30 * time.Second
)

// answerGrace is how long the user's connection stays protected from the
// connection manager's trimming once its answer is written (a variable
// for tests).
var answerGrace = 10 * time.Second

// handleStream serves one /neuro/infer/1.0.0 stream: one request, then its
// answer. The generation stops when the client resets the stream or stops
// reading.
func (e *Engine) handleStream(st network.Stream) {
	log := e.log.With("client", st.Conn().RemotePeer())
	if err := st.Scope().SetService(neuropb.InferService); err != nil {
		log.Debug("infer stream refused by the resource manager", "err", err)
		st.Reset()
		return
	}
	e.wg.Add(1)
	defer e.wg.Done()
	// The user's connection stays while the generation runs, whatever the
	// connection manager trims (measured: in a simulated network of 200
	// nodes a gating node trimmed a user's connection after 8 tokens).
	// It stays protected for answerGrace after the answer: the last
	// messages may still be on their way or unread in the user's buffers,
	// and a connection closed by the trimming loses them (measured: in a
	// simulated network of 300 nodes a user lost the end of an answer of 8
	// tokens to "go away, code 4101", the trimming's).
	cm, user, tag := e.h.LibP2P().ConnManager(), st.Conn().RemotePeer(), "neuro-infer-"+st.ID()
	cm.Protect(user, tag)
	defer func() { time.AfterFunc(answerGrace, func() { cm.Unprotect(user, tag) }) }()
	r := wire.NewReader(st, neuropb.MaxInferRequestSize)
	w := wire.NewWriter(st, neuropb.MaxInferResponseSize)
	failed := false
	send := func(resp *neuropb.InferResponse) error {
		_ = st.SetWriteDeadline(time.Now().Add(inferWriteTimeout))
		err := w.Write(resp)
		if err != nil {
			failed = true
		}
		return err
	}
	sendError := func(code neuropb.InferError_Code, msg string) {
		_ = send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Error{Error: &neuropb.InferError{Code: code, Message: msg}}})
	}
	// refuse answers an error before or instead of a generation: an
	// *Error with its code, any other as a payment refusal.
	refuse := func(err error) {
		var ge *Error
		if !errors.As(err, &ge) {
			ge = errorf(neuropb.InferError_CODE_PAYMENT_REQUIRED, "%v", err)
		}
		log.Info("request refused", "code", ge.Code.String(), "err", ge.Msg)
		sendError(ge.Code, ge.Msg)
	}
	defer func() {
		if failed {
			st.Reset()
		} else {
			st.Close()
		}
	}()

	_ = st.SetReadDeadline(time.Now().Add(inferReadTimeout))
	req := &neuropb.InferRequest{}
	if err := r.Read(req); err != nil {
		var tl *wire.TooLargeError
		if errors.As(err, &tl) && tl.Skipped {
			sendError(neuropb.InferError_CODE_BAD_REQUEST, "request: "+tl.Error())
			return
		}
		log.Debug("infer stream: read", "err", err)
		failed = true
		return
	}
	_ = st.SetReadDeadline(time.Time{})

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	from := st.Conn().RemotePeer()
	if req.GetQuoteOnly() {
		q, err := e.quote(ctx, from, req)
		if err != nil {
			refuse(err)
			return
		}
		_ = send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Quote{Quote: q}})
		return
	}
	var bill Bill
	if e.cfg.Payments != nil {
		var err error
		if bill, err = e.cfg.Payments.Bill(ctx, from, req); err != nil {
			refuse(err)
			return
		}
	}
	start := time.Now()
	res, err := e.Generate(ctx, req, Callbacks{
		Bill: bill,
		Queued: func(position int) error {
			return send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Queued{Queued: &neuropb.InferQueued{Position: uint32(position)}}})
		},
		Start: func(n int, prefill time.Duration) error {
			return send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Start{Start: &neuropb.InferStart{
				PromptTokens: uint32(n), PrefillUs: uint64(prefill.Microseconds())}}})
		},
		Token: func(t Token) error {
			return send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Token{Token: &neuropb.InferToken{
				Id: t.ID, Text: []byte(t.Text), ElapsedUs: uint64(t.Elapsed.Microseconds())}}})
		},
		Rewind: func(keep, textBytes int) error {
			return send(&neuropb.InferResponse{Event: &neuropb.InferResponse_Rewind{Rewind: &neuropb.InferRewind{
				KeepTokens: uint32(keep), KeepTextBytes: uint32(textBytes)}}})
		},
	})
	if err != nil {
		if failed {
			log.Debug("infer stream: client gone", "err", err)
			return
		}
		var ge *Error
		if errors.As(err, &ge) {
			refuse(err)
			return
		}
		log.Warn("generation failed", "err", err)
		sendError(neuropb.InferError_CODE_INTERNAL, err.Error())
		return
	}
	done := &neuropb.InferDone{Reason: res.Reason, PromptTokens: uint32(res.PromptTokens),
		CompletionTokens: uint32(len(res.Tokens)), Text: []byte(res.Text), Rest: []byte(res.Rest), Stats: res.Stats,
		Escrow: res.Escrow, Flops: res.FLOPs, Cost: res.Cost}
	resp := &neuropb.InferResponse{Event: &neuropb.InferResponse_Done{Done: done}}
	if proto.Size(resp) > neuropb.MaxInferResponseSize {
		// The client has the text from the tokens' deltas.
		done.Text = nil
	}
	if err := send(resp); err != nil {
		log.Debug("infer stream: write done", "err", err)
		return
	}
	log.Info("generated", "prompt_tokens", res.PromptTokens, "tokens", len(res.Tokens),
		"reason", res.Reason.String(), "took", time.Since(start).Round(time.Millisecond))
}

// quote answers a quote_only request.
func (e *Engine) quote(ctx context.Context, from peer.ID, req *neuropb.InferRequest) (*neuropb.InferQuote, error) {
	c, err := e.Estimate(req)
	if err != nil {
		return nil, err
	}
	if e.cfg.Payments == nil {
		return &neuropb.InferQuote{Gating: []byte(e.h.ID()), FlopsPerToken: c.FLOPsPerToken,
			PromptTokens: uint32(c.PromptTokens), MaxTokens: uint32(c.MaxTokens)}, nil
	}
	return e.cfg.Payments.Quote(ctx, from, c)
}
