package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/neuropb"
)

// APIKeysFile holds a gating node's API keys (hashed) in its home.
const APIKeysFile = "apikeys.json"

// escrowWait bounds waiting for an escrow to apply before a request runs.
const escrowWait = 30 * time.Second

// priceTTL is how long the ledger's price is reused.
const priceTTL = 10 * time.Second

// payments is a gating node's payment policy: who pays for each request,
// over the HTTP API (API keys, whose accounts pay through escrows the
// node opens on their allowance) and over the infer protocol (escrows the
// client opened, or whose opening transaction it sends along). It also
// checks, for the node's expert server, that each call names an escrow
// that can pay (expert.require_escrow).
type payments struct {
	self    peer.ID
	ledger  *ledger.Service // nil: the node takes no part in a ledger
	settler *ledger.Settler // nil unless a gating node with a ledger
	keys    *billing.Store  // nil unless a gating node with a home
	require bool            // gating.require_payment, on a node with a ledger
	log     *slog.Logger

	mu      sync.Mutex
	price   uint64
	priceAt time.Time
	// escrows are escrows that paid expert calls lately, by ID.
	escrows map[uint64]seenEscrow
	// tabs are the API keys' open escrows, by key ID and model.
	tabs map[string]*tab
}

type seenEscrow struct {
	e  ledger.Escrow
	at time.Time
}

var (
	_ gating.HTTPAuth = (*payments)(nil)
	_ gating.Payments = (*payments)(nil)
)

// pricePerMFLOP is the ledger's price of one MFLOP, cached for priceTTL.
func (p *payments) pricePerMFLOP(ctx context.Context) (uint64, error) {
	if p.ledger == nil {
		return 0, errors.New("this node takes no part in a ledger")
	}
	p.mu.Lock()
	if time.Since(p.priceAt) < priceTTL {
		defer p.mu.Unlock()
		return p.price, nil
	}
	p.mu.Unlock()
	c, err := p.ledger.ChainState(ctx)
	if err != nil {
		return 0, fmt.Errorf("ledger price: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.price, p.priceAt = c.Params.GetPricePerMflop(), time.Now()
	return p.price, nil
}

// most is the ledger's price and the most a request of charge c can cost
// (billing.MaxCost).
func (p *payments) most(ctx context.Context, c gating.Charge) (price, most uint64, err error) {
	if price, err = p.pricePerMFLOP(ctx); err != nil {
		return 0, 0, err
	}
	return price, billing.MaxCost(c.PromptTokens, c.MaxTokens, c.FLOPsPerToken, price), nil
}

// cachedPrice is the price for /v1/models, without asking the ledger
// (false: not known yet).
func (p *payments) cachedPrice() (uint64, bool) {
	if p.ledger == nil {
		return 0, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := p.pricePerMFLOP(ctx)
	return v, err == nil
}

func httpErr(status int, typ, code, format string, args ...any) *billing.Refusal {
	return &billing.Refusal{Status: status, Type: typ, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Authorize checks an HTTP API request's key: once the node has issued
// keys, every request needs one that is live and within its rate; its
// account pays. A node that never issued keys takes requests without one
// (unpaid, unless gating.require_payment).
func (p *payments) Authorize(r *http.Request) (gating.Bill, *billing.Refusal) {
	if p.keys == nil || !p.keys.Configured() {
		if p.require && r.Method == http.MethodPost {
			return nil, httpErr(http.StatusPaymentRequired, "insufficient_quota", "payment_required",
				"this gating node requires payment and has issued no API keys: its operator creates them with 'neurod apikey create'")
		}
		return nil, nil
	}
	k, refused := p.keys.Check(r, time.Now())
	if refused != nil {
		return nil, refused
	}
	if r.Method != http.MethodPost {
		return nil, nil // listing models costs nothing
	}
	if p.ledger == nil || p.settler == nil {
		return nil, httpErr(http.StatusServiceUnavailable, "server_error", "", "this gating node takes no part in a ledger: its keys cannot be charged")
	}
	account, err := peer.Decode(k.Account)
	if err != nil {
		return nil, httpErr(http.StatusInternalServerError, "server_error", "", "key account: %v", err)
	}
	return &keyBill{p: p, key: k.ID, account: account}, nil
}

func payErr(format string, args ...any) *gating.Error {
	return &gating.Error{Code: neuropb.InferError_CODE_PAYMENT_REQUIRED, Msg: fmt.Sprintf(format, args...)}
}

// keyBill charges an API key's account through the key's tab: an escrow
// the gating node opened from the account's allowance for several
// requests' most, which the key's requests share one after another (only
// the first waits for an escrow to apply), each settling its receipts from
// it; the tab is closed, and what is left returns to the account and its
// allowance, once it is idle, old, too small, or the node stops.
type keyBill struct {
	p       *payments
	key     string
	account peer.ID

	price, reserved uint64
	t               *tab
}

// tab is an API key's open escrow for one model.
type tab struct {
	escrow   uint64
	amount   uint64 // deposited
	held     uint64 // the most of the requests in flight, and what the finished ones cost
	inflight int
	opened   time.Time
	last     time.Time
	closing  bool
}

// Tabs: how many requests' most one holds, how long one is used and kept
// idle, and how many blocks its escrow must have left to be shared (else
// it pays for one request and is closed).
const (
	tabRequests  = 16
	tabLife      = 5 * time.Minute
	tabIdle      = time.Minute
	tabMinBlocks = 600
)

func (b *keyBill) Open(ctx context.Context, c gating.Charge) (uint64, error) {
	p := b.p
	price, most, err := p.most(ctx, c)
	if err != nil {
		return 0, err
	}
	if err := p.keys.Reserve(b.key, most); err != nil {
		return 0, payErr("%v (prompt of %d tokens + max_tokens %d at %s NEURO per 1,000 tokens, x%d for validation)", err,
			c.PromptTokens, c.MaxTokens, billing.Format(billing.PerThousand(c.FLOPsPerToken, price)), billing.CheckMargin)
	}
	b.price, b.reserved = price, most
	name := b.key + "/" + c.Model.String()
	now := time.Now()
	p.mu.Lock()
	if t := p.tabs[name]; t != nil && !t.closing && now.Sub(t.opened) < tabLife && t.amount-t.held >= most {
		t.held += most
		t.inflight++
		t.last = now
		b.t = t
		p.mu.Unlock()
		return t.escrow, nil
	}
	p.mu.Unlock()
	t, err := b.openTab(ctx, c.Model, most)
	if err != nil {
		if cerr := p.keys.Charge(b.key, most, 0); cerr != nil {
			p.log.Warn("api key: release a reservation", "key", b.key, "err", cerr)
		}
		return 0, err
	}
	p.mu.Lock()
	if old := p.tabs[name]; old != nil {
		old.closing = true
		if old.inflight == 0 {
			p.settler.CloseEscrow(old.escrow)
		}
	}
	if !t.closing {
		p.tabs[name] = t
	}
	p.mu.Unlock()
	b.t = t
	return t.escrow, nil
}

// openTab opens a tab for the key's account: for tabRequests times the
// request's most, as far as the key's budget, the account's allowance to
// this node and its balance go (at least the request's most).
func (b *keyBill) openTab(ctx context.Context, model cid.Cid, most uint64) (*tab, error) {
	p := b.p
	st, err := p.ledger.Status(ctx, b.account)
	if err != nil {
		return nil, fmt.Errorf("ledger: %w", err)
	}
	var allowed uint64
	for _, a := range st.GetAllowances() {
		if peer.ID(a.GetSpender()) == p.self {
			allowed = a.GetAmount()
		}
	}
	switch {
	case allowed < most:
		return nil, payErr("account %s allows this gating node %s NEURO, the request may cost %s: the account's holder raises it with 'neurod wallet allow %s AMOUNT'",
			b.account, billing.Format(allowed), billing.Format(most), p.self)
	case st.GetBalance() < most:
		return nil, payErr("account %s holds %s NEURO, the request may cost %s", b.account, billing.Format(st.GetBalance()), billing.Format(most))
	}
	size := min(tabRequests*most, allowed, st.GetBalance())
	if k, ok := p.keys.Get(b.key); ok {
		size = min(size, k.Left()+most) // Left no longer counts this request's reservation
	}
	size = max(size, most)
	tx, err := p.ledger.Send(ctx, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: model.Bytes(), Gating: []byte(p.self),
			Amount: size, Payer: []byte(b.account)}}
	})
	if err != nil {
		return nil, fmt.Errorf("open an escrow: %w", err)
	}
	id := ledger.EscrowID(p.self, tx.GetNonce())
	wctx, cancel := context.WithTimeout(ctx, escrowWait)
	defer cancel()
	e, view, err := p.ledger.WaitEscrow(wctx, id)
	if err != nil {
		return nil, fmt.Errorf("escrow %d for account %s: %w", id, b.account, err)
	}
	now := time.Now()
	return &tab{escrow: id, amount: size, held: most, inflight: 1, opened: now, last: now,
		closing: e.Expires-view.Height < tabMinBlocks}, nil
}

func (b *keyBill) Close(flops uint64) uint64 {
	p := b.p
	cost := min(billing.Cost(flops, b.price), b.reserved)
	if err := p.keys.Charge(b.key, b.reserved, cost); err != nil {
		p.log.Error("api key: store what a request spent", "key", b.key, "cost", cost, "err", err)
	}
	p.mu.Lock()
	t := b.t
	t.held = t.held - b.reserved + cost
	t.inflight--
	if t.closing && t.inflight == 0 {
		p.settler.CloseEscrow(t.escrow)
	}
	p.mu.Unlock()
	return cost
}

// sweepTabs closes the tabs no request uses that are idle or old.
func (p *payments) sweepTabs(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, t := range p.tabs {
		if t.inflight == 0 && (now.Sub(t.last) >= tabIdle || now.Sub(t.opened) >= tabLife) {
			delete(p.tabs, name)
			p.settler.CloseEscrow(t.escrow)
		}
	}
}

// closeTabs closes every tab: the idle ones now, the others when their
// last request ends.
func (p *payments) closeTabs() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, t := range p.tabs {
		delete(p.tabs, name)
		t.closing = true
		if t.inflight == 0 {
			p.settler.CloseEscrow(t.escrow)
		}
	}
}

// tabService sweeps the API keys' tabs while the node runs and closes them
// when it stops (before the settler, which sends the closes).
type tabService struct {
	p      *payments
	cancel context.CancelFunc
	done   chan struct{}
}

func (s *tabService) Start(context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		tick := time.NewTicker(tabIdle / 4)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				s.p.sweepTabs(now)
			}
		}
	}()
	return nil
}

func (s *tabService) Close() error {
	if s.cancel != nil {
		s.cancel()
		<-s.done
		s.cancel = nil
	}
	s.p.closeTabs()
	return nil
}

// escrowBill pays from an escrow the client opened.
type escrowBill struct {
	p     *payments
	from  peer.ID
	model cid.Cid
	// tx opens the escrow for this request only (nil: it exists).
	tx     *neuropb.LedgerTx
	escrow uint64

	price, most uint64
}

// Bill decides how a request over the infer protocol is paid: from the
// escrow it names, which must be the requesting peer's, for this node and
// model, with enough left; or from the escrow whose opening transaction it
// carries. Without either it runs unpaid, unless payment is required.
func (p *payments) Bill(_ context.Context, from peer.ID, req *neuropb.InferRequest) (gating.Bill, error) {
	model, _ := cid.Cast(req.GetModel())
	if raw := req.GetEscrowTx(); len(raw) > 0 {
		if p.ledger == nil || p.settler == nil {
			return nil, payErr("this gating node takes no part in a ledger")
		}
		tx, err := ledger.DecodeTx(raw)
		if err != nil {
			return nil, payErr("escrow transaction: %v", err)
		}
		oe := tx.GetOpenEscrow()
		switch {
		case oe == nil:
			return nil, payErr("escrow transaction: not an escrow")
		case peer.ID(tx.GetSender()) != from:
			return nil, payErr("escrow transaction: signed by %s, not by the requesting peer %s", peer.ID(tx.GetSender()), from)
		case len(oe.GetPayer()) > 0 && peer.ID(oe.GetPayer()) != from:
			return nil, payErr("escrow transaction: draws on another account")
		case peer.ID(oe.GetGating()) != p.self:
			return nil, payErr("escrow transaction: names gating node %s, not this one (%s)", peer.ID(oe.GetGating()), p.self)
		case string(oe.GetModel()) != string(req.GetModel()):
			return nil, payErr("escrow transaction: for another model")
		}
		id := ledger.EscrowID(from, tx.GetNonce())
		if e := req.GetEscrow(); e != 0 && e != id {
			return nil, payErr("escrow %d is not the one the transaction opens (%d)", e, id)
		}
		return &escrowBill{p: p, from: from, model: model, tx: tx, escrow: id}, nil
	}
	if e := req.GetEscrow(); e != 0 {
		if p.ledger == nil || p.settler == nil {
			return nil, payErr("this gating node takes no part in a ledger")
		}
		return &escrowBill{p: p, from: from, model: model, escrow: e}, nil
	}
	if p.require {
		return nil, payErr("this gating node requires payment: name an escrow you opened for it (neurod generate --network --wallet FILE; client.WithWallet)")
	}
	return nil, nil
}

func (b *escrowBill) Open(ctx context.Context, c gating.Charge) (uint64, error) {
	p := b.p
	price, most, err := p.most(ctx, c)
	if err != nil {
		return 0, err
	}
	if b.tx != nil {
		if amt := b.tx.GetOpenEscrow().GetAmount(); amt < most {
			return 0, payErr("escrow of %s NEURO cannot cover this request's most, %s (ask for a quote first)", billing.Format(amt), billing.Format(most))
		}
		if err := p.ledger.Submit(ctx, b.tx); err != nil {
			return 0, payErr("escrow transaction: %v", err)
		}
		wctx, cancel := context.WithTimeout(ctx, escrowWait)
		defer cancel()
		if _, _, err := p.ledger.WaitEscrow(wctx, b.escrow); err != nil {
			return 0, payErr("escrow %d: %v", b.escrow, err)
		}
		b.price, b.most = price, b.tx.GetOpenEscrow().GetAmount()
		return b.escrow, nil
	}
	e, _, err := p.ledger.Escrow(ctx, b.escrow)
	switch {
	case err != nil:
		return 0, fmt.Errorf("ledger: %w", err)
	case e == nil:
		return 0, payErr("no escrow %d on the ledger (expired, closed, or not applied yet)", b.escrow)
	case e.Payer != b.from.String():
		return 0, payErr("escrow %d is not the requesting peer's", b.escrow)
	case e.Gating != p.self.String():
		return 0, payErr("escrow %d names gating node %s, not this one", b.escrow, e.Gating)
	case e.Model != b.model.String():
		return 0, payErr("escrow %d is for model %s", b.escrow, e.Model)
	case e.Remaining < most:
		return 0, payErr("escrow %d holds %s NEURO, the request may cost %s", b.escrow, billing.Format(e.Remaining), billing.Format(most))
	}
	b.price, b.most = price, e.Remaining
	return b.escrow, nil
}

func (b *escrowBill) Close(flops uint64) uint64 {
	if b.tx != nil {
		b.p.settler.CloseEscrow(b.escrow)
	}
	return min(billing.Cost(flops, b.price), b.most)
}

// Quote says what c would cost peer from, with its account's balance and
// next nonce, so that it can sign the escrow that pays.
func (p *payments) Quote(ctx context.Context, from peer.ID, c gating.Charge) (*neuropb.InferQuote, error) {
	q := &neuropb.InferQuote{Gating: []byte(p.self), FlopsPerToken: c.FLOPsPerToken,
		PromptTokens: uint32(c.PromptTokens), MaxTokens: uint32(c.MaxTokens), PaymentRequired: p.require}
	if p.ledger == nil {
		return q, nil
	}
	price, most, err := p.most(ctx, c)
	if err != nil {
		return nil, &gating.Error{Code: neuropb.InferError_CODE_INTERNAL, Msg: err.Error()}
	}
	q.PricePerMflop, q.MaxCost = price, most
	q.CostPer_1KTokens = billing.PerThousand(c.FLOPsPerToken, price)
	st, err := p.ledger.Status(ctx, from)
	if err != nil {
		return nil, &gating.Error{Code: neuropb.InferError_CODE_INTERNAL, Msg: fmt.Sprintf("ledger: %v", err)}
	}
	q.Balance, q.NextNonce = st.GetBalance(), st.GetNonce()+1
	return q, nil
}

// seenTTL is how long an escrow that paid an expert call is trusted to
// pay the next ones without asking the ledger again.
const seenTTL = 5 * time.Second

// expertPayment accepts an expert call from gating node from that names
// escrow for flops of work: the escrow must exist, name from as its
// gating node and hold the work's fee. A new escrow may take a block to
// be proven everywhere: it is asked for again for a few seconds.
func (p *payments) expertPayment(ctx context.Context, from peer.ID, escrow, flops uint64) error {
	if escrow == 0 {
		return errors.New("this expert node requires payment: the call names no escrow")
	}
	check := func(e ledger.Escrow, price uint64) error {
		if e.Gating != from.String() {
			return fmt.Errorf("escrow %d names gating node %s, not the caller", escrow, e.Gating)
		}
		if fee := billing.Cost(flops, price); e.Remaining < fee {
			return fmt.Errorf("escrow %d holds %s NEURO, the call costs %s", escrow, billing.Format(e.Remaining), billing.Format(fee))
		}
		return nil
	}
	p.mu.Lock()
	seen, ok := p.escrows[escrow]
	price := p.price
	p.mu.Unlock()
	if ok && time.Since(seen.at) < seenTTL {
		return check(seen.e, price)
	}
	for {
		e, view, err := p.ledger.Escrow(ctx, escrow)
		if err == nil && e != nil {
			price := view.Params.GetPricePerMflop()
			p.mu.Lock()
			if p.escrows == nil || len(p.escrows) > 4096 {
				p.escrows = map[uint64]seenEscrow{}
			}
			p.escrows[escrow] = seenEscrow{e: *e, at: time.Now()}
			p.price, p.priceAt = price, time.Now()
			p.mu.Unlock()
			return check(*e, price)
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("ledger: %w", err)
			}
			return fmt.Errorf("no escrow %d on the ledger", escrow)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
