package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
	"github.com/neuro-p2p/neuro/sign"
)

// Quote is what a request would cost on one gating node. Amounts are in
// base units (1 NEURO = 10^6).
type Quote struct {
	Gating peer.ID
	// PricePerMFLOP is the ledger's price of one MFLOP of expert work;
	// FLOPsPerToken the model's expert work per token.
	PricePerMFLOP, FLOPsPerToken uint64
	// CostPer1kTokens is what 1,000 tokens (prompt or generated) cost;
	// MaxCost the most this request can cost (its prompt and max tokens,
	// with re-executions for validation), which its escrow must hold.
	CostPer1kTokens, MaxCost uint64
	PromptTokens, MaxTokens  int
	// Balance and NextNonce are the requesting account's.
	Balance, NextNonce uint64
	// PaymentRequired: the gating node refuses requests that do not pay.
	PaymentRequired bool
}

// Quote asks the model's gating nodes, in turn, what req would cost,
// and returns the first answer.
func (c *Client) Quote(ctx context.Context, req Request) (*Quote, error) {
	pr := req.Proto()
	if err := pr.Validate(); err != nil {
		return nil, fmt.Errorf("quote: %w", err)
	}
	nodes, err := c.GatingNodes(ctx, req.Model)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, ai := range nodes {
		cctx, cancel := context.WithTimeout(ctx, c.timeout)
		if len(ai.Addrs) > 0 || c.h.Network().Connectedness(ai.ID) != network.Connected {
			if err := c.h.Connect(cctx, ai); err != nil {
				cancel()
				errs = append(errs, fmt.Errorf("connect %s: %w", ai.ID, err))
				continue
			}
		}
		q, err := c.quote(cctx, ai.ID, pr)
		cancel()
		if err == nil {
			return q, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("quote: %w: no gating node of model %s found", ErrNoGatingNode, req.Model)
	}
	return nil, fmt.Errorf("quote: %w", errors.Join(errs...))
}

// quote asks gating node p for a quote of req.
func (c *Client) quote(ctx context.Context, p peer.ID, req *neuropb.InferRequest) (*Quote, error) {
	st, err := p2p.NewStream(ctx, c.h, p, neuropb.InferProtocol)
	if err != nil {
		return nil, fmt.Errorf("open stream to %s: %w", p, err)
	}
	defer st.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = st.SetDeadline(dl)
	} else {
		_ = st.SetDeadline(time.Now().Add(c.timeout))
	}
	q := proto.Clone(req).(*neuropb.InferRequest)
	q.QuoteOnly, q.Escrow, q.EscrowTx = true, 0, nil
	if err := wire.NewWriter(st, neuropb.MaxInferRequestSize).Write(q); err != nil {
		st.Reset()
		return nil, fmt.Errorf("send quote request to %s: %w", p, err)
	}
	_ = st.CloseWrite()
	resp := &neuropb.InferResponse{}
	if err := wire.NewReader(st, neuropb.MaxInferResponseSize).Read(resp); err != nil {
		return nil, fmt.Errorf("gating node %s: quote: %w", p, err)
	}
	if e := resp.GetError(); e != nil {
		return nil, &Error{Code: e.GetCode(), Message: e.GetMessage(), Peer: p}
	}
	a := resp.GetQuote()
	if a == nil {
		return nil, fmt.Errorf("gating node %s: protocol error: %T is no quote", p, resp.GetEvent())
	}
	if peer.ID(a.GetGating()) != p {
		return nil, fmt.Errorf("gating node %s: quote names another gating node", p)
	}
	return &Quote{Gating: p, PricePerMFLOP: a.GetPricePerMflop(), FLOPsPerToken: a.GetFlopsPerToken(),
		CostPer1kTokens: a.GetCostPer_1KTokens(), MaxCost: a.GetMaxCost(), PromptTokens: int(a.GetPromptTokens()),
		MaxTokens: int(a.GetMaxTokens()), Balance: a.GetBalance(), NextNonce: a.GetNextNonce(),
		PaymentRequired: a.GetPaymentRequired()}, nil
}

// paidRequest is req paid from the wallet through gating node p: an
// escrow transaction for the quote's most, signed with the wallet's key.
func (c *Client) paidRequest(ctx context.Context, p peer.ID, req *neuropb.InferRequest) (*neuropb.InferRequest, error) {
	qctx, cancel := context.WithTimeout(ctx, c.timeout)
	q, err := c.quote(qctx, p, req)
	cancel()
	if err != nil {
		return nil, err
	}
	if q.MaxCost == 0 {
		return nil, &Error{Code: neuropb.InferError_CODE_PAYMENT_REQUIRED, Peer: p,
			Message: "the gating node takes no part in a ledger: it cannot be paid"}
	}
	if q.Balance < q.MaxCost {
		return nil, &Error{Code: neuropb.InferError_CODE_PAYMENT_REQUIRED, Peer: p,
			Message: fmt.Sprintf("wallet %s holds %s NEURO, the request may cost up to %s", c.h.ID(), billing.Format(q.Balance), billing.Format(q.MaxCost))}
	}
	tx := &neuropb.LedgerTx{Sender: []byte(c.h.ID()), Nonce: q.NextNonce, Body: &neuropb.LedgerTx_OpenEscrow{
		OpenEscrow: &neuropb.OpenEscrow{Model: req.GetModel(), Gating: []byte(p), Amount: q.MaxCost}}}
	if tx.Signature, err = sign.Sign(c.wallet, sign.LedgerTx, tx); err != nil {
		return nil, fmt.Errorf("sign the escrow: %w", err)
	}
	raw, err := proto.Marshal(tx)
	if err != nil {
		return nil, fmt.Errorf("encode the escrow: %w", err)
	}
	out := proto.Clone(req).(*neuropb.InferRequest)
	out.Escrow, out.EscrowTx = neuropb.EscrowID([]byte(c.h.ID()), q.NextNonce), raw
	return out, nil
}
