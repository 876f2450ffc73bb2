package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/span"
)

// ParseSpans parses expert.spans: "" (none), "auto" (the node chooses
// when it has the manifest: expert.ChooseSpan) or "A-B", layers A to B
// inclusive.
func ParseSpans(s string) (part moe.Part, auto bool, err error) {
	s = strings.TrimSpace(s)
	switch s {
	case "":
		return moe.Part{}, false, nil
	case "auto":
		return moe.Part{}, true, nil
	}
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.Atoi(strings.TrimSpace(a))
	last, err2 := strconv.Atoi(strings.TrimSpace(b))
	if !ok || err1 != nil || err2 != nil || first < 0 || last < first || last >= 1<<16 {
		return moe.Part{}, false, fmt.Errorf("%q: want auto or a run of layers such as 12-23 (first-last, inclusive)", s)
	}
	return moe.Part{First: first, End: last + 1}, false, nil
}

// spanHost serves a span of layers: their gating part loaded from the
// model's layer shards, their experts the expert service's. It waits for
// the expert service to host every expert of the span before it serves.
type spanHost struct {
	svc     *expert.Service
	h       span.Host
	compute moe.Backend
	model   cid.Cid
	threads int
	self    peer.ID
	sign    func(*neuropb.UsageReceipt) error
	// payment checks a request's escrow (expert.require_escrow), if set.
	payment func(context.Context, peer.ID, uint64, uint64) error
	// caller, if set, calls the span's experts this node does not host
	// on other nodes (expert.span_experts "call").
	caller *spanCaller
	log    *slog.Logger

	mu        sync.Mutex
	part      moe.Part // once the expert service has chosen it
	server    *span.Server
	gating    moe.Gating
	validator *gating.Validator // with caller: checks the experts called
	serving   bool

	cancel context.CancelFunc
	done   chan struct{}
	closeO sync.Once
	err    error
}

func newSpanHost(svc *expert.Service, h span.Host, compute moe.Backend, model cid.Cid, threads int, self peer.ID,
	sign func(*neuropb.UsageReceipt) error, payment func(context.Context, peer.ID, uint64, uint64) error, log *slog.Logger) (*spanHost, error) {
	if _, ok := compute.(moe.PartLoader); !ok {
		return nil, errors.New("expert.spans: the compute backend cannot load part of a model")
	}
	return &spanHost{svc: svc, h: h, compute: compute, model: model, threads: threads, self: self, sign: sign, payment: payment,
		log: log.With("component", "span")}, nil
}

// Start loads and serves the span in the background.
func (s *spanHost) Start(context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.run(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("cannot serve the span", "err", err)
		}
	}()
	return nil
}

// keys are the DHT keys of the span served, if any (neuropb.SpanKey),
// which the expert service provides with its blobs
// (expert.ServiceConfig.Announce).
func (s *spanHost) keys() []cid.Cid {
	part, ok := s.Serving()
	if !ok {
		return nil
	}
	return []cid.Cid{neuropb.SpanKey(s.model, part.First, part.End)}
}

// Close stops serving and frees the span's memory; it is idempotent.
func (s *spanHost) Close() error {
	s.closeO.Do(func() {
		if s.cancel != nil {
			s.cancel()
			<-s.done
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		var errs []error
		if s.server != nil {
			errs = append(errs, s.server.Close())
		}
		if s.gating != nil {
			errs = append(errs, s.gating.Close())
		}
		if s.validator != nil {
			errs = append(errs, s.validator.Close())
		}
		if s.caller != nil {
			errs = append(errs, s.caller.client.Close())
		}
		s.serving = false
		s.err = errors.Join(errs...)
	})
	return s.err
}

// Serving returns the span served (and so announced), if any.
func (s *spanHost) Serving() (moe.Part, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.part, s.serving
}

// run waits for the span's experts, fetches the layer shards and serves.
func (s *spanHost) run(ctx context.Context) error {
	m, part, err := s.waitExperts(ctx)
	if err != nil {
		return err
	}
	if m.GetFormat() < 2 {
		return fmt.Errorf("model %s was split without layer shards (manifest format %d): split it again", s.model, m.GetFormat())
	}
	if part.End > int(m.GetParams().GetLayers()) {
		return fmt.Errorf("%s: the model has %d layers", part, m.GetParams().GetLayers())
	}
	shards, err := model.PartShards(m, part.First, part.End, false, func(ref *neuropb.ShardRef) (*model.Shard, error) {
		c, err := cid.Cast(ref.GetCid())
		if err != nil {
			return nil, err
		}
		if err := s.svc.Fetch(ctx, c); err != nil {
			return nil, err
		}
		return s.svc.Store().OpenShard(ref)
	})
	if err != nil {
		return err
	}
	hp, err := moe.HparamsOf(m, shards[0])
	if err != nil {
		return err
	}
	g, err := s.compute.(moe.PartLoader).NewGatingPart(hp, shards, part, s.threads)
	if err != nil {
		return err
	}
	own := map[expert.Key]moe.Expert{}
	for _, ref := range m.AllExperts() {
		if l := int(ref.GetLayer()); part.Has(l) {
			ff := ref.GetShard().GetTensors()[0].GetShape()
			own[expert.Key{Layer: l, Expert: int(ref.GetExpert())}] = &serviceExpert{svc: s.svc, model: s.model, layer: l, expert: int(ref.GetExpert()),
				embd: hp.Embd, ff: int(ff[len(ff)-1])}
		}
	}
	sessionExperts, val := s.experts(m, hp, own)
	// The span's work per token: its layers' (attention, norms, routers)
	// and its share of the model's expert work, as its experts' receipts
	// would count it.
	layers := m.LayerFLOPsPerToken(part.First, part.End)
	flops := layers
	if first, end := m.MoELayers(); end > first {
		in := max(0, min(end, part.End)-max(first, part.First))
		flops += m.ExpertFLOPsPerToken() * uint64(in) / uint64(end-first)
	}
	if s.caller != nil {
		// The layers, and the experts computed here only: the others
		// sign receipts of their own, which the head settles.
		flops = layers
	}
	closeAll := func(err error) error {
		if val != nil {
			err = errors.Join(err, val.Close())
		}
		return errors.Join(err, g.Close())
	}
	srv, err := span.NewServer(s.h, span.ServerConfig{Model: s.model, Gating: g, Part: part, Log: s.log,
		Self: s.self, SignReceipt: s.sign, FLOPsPerToken: flops, Payment: s.payment, Experts: sessionExperts})
	if err != nil {
		return closeAll(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ctx.Err() != nil {
		return closeAll(ctx.Err())
	}
	if err := srv.Start(ctx); err != nil {
		return closeAll(err)
	}
	s.server, s.gating, s.validator, s.part, s.serving = srv, g, val, part, true
	s.log.Info("serving span", "model", s.model, "layers", part.String())
	return nil
}

// experts gives each session of the span its experts: the node's own
// (own), or with a caller, those it hosts computed here and the others
// called on other nodes as a gating node calls them — selection by
// latency and reputation, hedging, re-dispatch, and a sample of the
// results re-executed elsewhere (the returned validator's checks), each
// session's checks reported to its head (span.SessionExperts).
func (s *spanHost) experts(m *neuropb.Manifest, hp moe.Hparams, own map[expert.Key]moe.Expert) (func(peer.ID) moe.Experts, *gating.Validator) {
	if s.caller == nil {
		local := &moe.LocalExperts{Embd: hp.Embd, Used: hp.ExpertsUsed, Experts: map[[2]int]moe.Expert{}}
		for k, e := range own {
			local.Experts[[2]int{k.Layer, k.Expert}] = e
		}
		return func(peer.ID) moe.Experts { return local }, nil
	}
	c := s.caller
	val := gating.NewValidator(s.self, c.book, gating.ValidatorConfig{OnWrong: c.onWrong}, s.log)
	hb := gating.HeartbeatProviders(c.peers, s.model)
	remote := &gating.RemoteExperts{Client: c.client, Model: s.model, Embd: hp.Embd, Used: hp.ExpertsUsed,
		DType: neuropb.WireDType_WIRE_DTYPE_F32, CallTimeout: c.timeout, Selector: gating.NewSelector(c.book), Validator: val,
		WeightTypes: gating.ExpertWeightTypes(m),
		// each span answer hands its experts' receipts to the head: late
		// ones would hold it until they came
		InlineReceipts: true,
		Providers: func(k expert.Key) []peer.ID {
			return slices.DeleteFunc(hb(k), func(p peer.ID) bool { return p == s.self })
		},
		Local: func(k expert.Key) moe.Expert {
			if e := own[k]; e != nil && s.svc.Has(k) {
				return e
			}
			return nil
		}}
	batch := gating.NewBatcher(remote, 0)
	return func(peer.ID) moe.Experts { return newCheckedExperts(batch) }, val
}

// spanCaller is what a span node that calls experts on other nodes uses
// of the node: its expert client, the heartbeats that say who hosts
// what, its reputation book, and where its verdicts go.
type spanCaller struct {
	client  *expert.Client
	peers   interface{ Peers() *p2p.PeerTable }
	book    *reputation.Book
	onWrong func(gating.Verdict)
	timeout time.Duration
}

// checkedExperts are one span session's experts when the span node calls
// experts on other nodes: the calls belong to a generation of the
// session's own, whose checks mark the positions they computed
// (span.SessionExperts).
type checkedExperts struct {
	*gating.Member
	gen *gating.Generation
	// epoch counts the session's rewinds; reported is the wrong position
	// last reported in this epoch (-1: none).
	epoch, reported int
}

var _ span.SessionExperts = (*checkedExperts)(nil)

func newCheckedExperts(b *gating.Batcher) *checkedExperts {
	gen := gating.NewGeneration(0)
	return &checkedExperts{Member: b.Join(gen), gen: gen, reported: -1}
}

func (c *checkedExperts) Step(pos int, rewound bool, escrow uint64, delegation *neuropb.EscrowDelegation) {
	if escrow != 0 && c.gen.Receipts == nil {
		c.gen.Receipts = &gating.Receipts{Escrow: escrow}
	}
	if delegation != nil && delegation.GetEscrow() == escrow {
		c.gen.Delegation = delegation
	}
	if rewound {
		c.epoch, c.reported = c.gen.Checks.Rewound(pos), -1
	}
	c.gen.Step(c.epoch, pos)
}

func (c *checkedExperts) WrongFrom() int {
	b := c.gen.Checks.Bad()
	if b < 0 || b == c.reported {
		return -1
	}
	c.reported = b
	return b
}

func (c *checkedExperts) Wait(ctx context.Context) { c.gen.Checks.Wait(ctx) }

func (c *checkedExperts) Work() uint64 { return uint64(c.gen.Stats.LocalFLOPs.Swap(0)) }

func (c *checkedExperts) Receipts(escrow uint64) []*neuropb.UsageReceipt {
	if c.gen.Receipts == nil || c.gen.Receipts.Escrow != escrow {
		return nil
	}
	return c.gen.Receipts.Drain()
}

// waitExperts waits until the expert service has chosen the span and
// hosts every expert of its layers (with a caller, until it has chosen
// the span), and returns the manifest and the span.
func (s *spanHost) waitExperts(ctx context.Context) (*neuropb.Manifest, moe.Part, error) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		first, end, chosen := s.svc.SpanLayers()
		part := moe.Part{First: first, End: end}
		if m, err := s.svc.Store().Manifest(s.model); err == nil && chosen && s.caller != nil {
			return m, part, nil
		} else if err == nil && chosen {
			loaded := map[expert.Key]bool{}
			for _, k := range s.svc.Loaded() {
				loaded[k] = true
			}
			all := true
			for _, ref := range m.AllExperts() {
				if l := int(ref.GetLayer()); part.Has(l) && !loaded[expert.Key{Layer: l, Expert: int(ref.GetExpert())}] {
					all = false
				}
			}
			if all {
				return m, part, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, moe.Part{}, ctx.Err()
		case <-t.C:
		}
	}
}

// rerun computes a span verdict's request again (span.Server.Rerun), if
// this node serves that span of that model and the verdict carries the
// session's earlier rows.
func (s *spanHost) rerun(t reputation.Task) ([]float32, error) {
	s.mu.Lock()
	srv, part, serving := s.server, s.part, s.serving
	s.mu.Unlock()
	sp := t.Span
	switch {
	case !serving || !t.Model.Equals(s.model) || part.First != t.Layer || part.End != sp.End:
		return nil, fmt.Errorf("this node does not serve layers [%d, %d) of %s", t.Layer, sp.End, t.Model)
	case sp.History == nil && sp.Prior != neuropb.SpanChainStart():
		return nil, errors.New("the verdict does not carry the session's earlier rows")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return srv.Rerun(ctx, s.self, sp.History, t.Input, sp.Want)
}

// heartbeatExtra announces the span once it is served.
func (s *spanHost) heartbeatExtra(hb *neuropb.Heartbeat) {
	part, ok := s.Serving()
	if !ok {
		return
	}
	r := &neuropb.LayerRange{First: uint32(part.First), End: uint32(part.End)}
	for _, hm := range hb.GetHosted() {
		if string(hm.GetModel()) == string(s.model.Bytes()) {
			hm.Spans = append(hm.Spans, r)
			return
		}
	}
	hb.Hosted = append(hb.Hosted, &neuropb.HostedModel{Model: s.model.Bytes(), Spans: []*neuropb.LayerRange{r}})
}

// serviceExpert is one of the expert service's experts as a moe.Expert:
// a span computes its layers' experts as an expert node computes them for
// a gating node.
type serviceExpert struct {
	svc           *expert.Service
	model         cid.Cid
	layer, expert int
	embd, ff      int
}

func (e *serviceExpert) Compute(x []float32, n int, out []float32) error {
	return e.svc.ComputeInto(e.model, e.layer, e.expert, x, n, out)
}

func (e *serviceExpert) Embd() int     { return e.embd }
func (e *serviceExpert) FF() int       { return e.ff }
func (e *serviceExpert) MaxBatch() int { return neuropb.MaxExpertTokens }
func (e *serviceExpert) Close() error  { return nil }
