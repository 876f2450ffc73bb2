// Package expert is the expert node: it serves MoE expert compute to gating
// nodes over the /neuro/expert/1.2.0 stream protocol (and 1.1.0, the same
// without a group's shared rows, and 1.0.0, without request groups, which
// older nodes speak), batching requests for
// the same (layer, expert) into one compute call, and computing a
// request's group (several experts of one layer, asked in one message)
// together and answering it in one message. Client is the calling side
// that gating nodes use. Service keeps the node's content-addressed store,
// exchanges shards with peers and chooses which experts to host; it loads
// them through the moe.ExpertLoader it is given (ggml's in neurod, a
// pure-Go one in tests), so the package is pure Go.
package expert

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
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/metrics"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// ServiceName is the resource-manager service of expert streams.
const ServiceName = neuropb.ExpertService

// Computer computes one expert's feed-forward block (a moe.Expert).
type Computer interface {
	Compute(x []float32, n int, out []float32) error
	Embd() int
	MaxBatch() int
}

// Config tunes a Server.
type Config struct {
	// BatchWindow is how long a batch waits for more requests after the
	// first, when nothing else is queued. Requests that arrive while the
	// expert computes join the next batch without waiting.
	BatchWindow time.Duration
	// MaxQueue bounds the requests waiting per expert; beyond it a
	// request is answered busy at once.
	MaxQueue int
	// IdleTimeout closes a stream that sends nothing for this long.
	IdleTimeout time.Duration
	// WriteTimeout bounds writing one response.
	WriteTimeout time.Duration
	// SlowDown delays every compute by this much: a test-only knob that
	// makes a node a straggler (neurod run --test-slow-compute).
	SlowDown time.Duration
	// drop resets every stream that sends a request (FaultDrop).
	drop bool
	// SignReceipts, if set, signs the usage receipts of each answer
	// (with the node's key; reputation.SignReceipts): a receipt pays when
	// the request names an escrow, and it binds the node to its output. A
	// response's receipts, a layer's group of experts' or a batched call's
	// segments', are signed at once.
	SignReceipts func([]*neuropb.UsageReceipt) error
	// LateReceiptsFlush is how long at most the signed receipts of an
	// answer whose caller takes them late (ExpertRequest.late_receipts)
	// wait for the stream's next answer to carry them before they go in a
	// message of their own (0: DefaultLateReceiptsFlush).
	LateReceiptsFlush time.Duration
	// Metrics, if set, records each batch: tokens, compute time, outcome.
	Metrics *metrics.Metrics
	// Payment, if set, must accept each request before it is computed
	// (expert.require_escrow): from is the calling gating node, escrow
	// what the request names, flops the work it asks for. A refusal is
	// answered CODE_PAYMENT_REQUIRED.
	Payment func(ctx context.Context, from peer.ID, escrow, flops uint64) error
	// WaitPoll, if set, keeps a core awake for WaitPollFor after each
	// answer, until the next request comes (moe.WaitPoller): for a node
	// whose one lane would otherwise sleep between a gating node's layers.
	// Unless WaitPollNearby, not after answering a caller on this machine
	// (it needs the cores).
	WaitPoll       moe.WaitPoller
	WaitPollFor    time.Duration
	WaitPollNearby bool
}

// paymentTimeout bounds checking a request's payment.
const paymentTimeout = 5 * time.Second

// DefaultConfig returns the defaults. The batch window is 0: requests
// that arrive while an expert computes form its next batch anyway, and on
// two cores a 200 µs window cost a lone caller 1.4 ms a call (measured with
// BenchmarkExpertThroughput).
func DefaultConfig() Config {
	return Config{BatchWindow: 0, MaxQueue: 64, IdleTimeout: 5 * time.Minute, WriteTimeout: 10 * time.Second}
}

// Served counts the expert calls answered with an output.
func (s *Server) Served() int64 { return s.served.Load() }

// Server serves the experts added to it.
type Server struct {
	h   host.Host
	cfg Config
	log *slog.Logger

	mu       sync.RWMutex
	batchers map[expertKey]*batcher
	embd     map[string]int // model CID bytes -> hidden size
	served   atomic.Int64
	paused   atomic.Bool
	closed   bool           // under mu: no more groups start
	groups   sync.WaitGroup // group workers (serveGroup, groupWorker)
	// groupSlots bounds the groups computing or waiting to (MaxQueue, as a
	// batcher's queue bounds its requests); beyond, a group is busy.
	groupSlots chan struct{}
	// groupWork hands a group to an idle group worker (groupWorker);
	// workers counts those started.
	groupWork chan []*job
	workers   atomic.Int64

	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

type expertKey struct {
	model         string
	layer, expert uint32
}

// SetPaused stops (true) or resumes taking requests: while paused every
// request is answered busy, and the gating node sends it elsewhere.
func (s *Server) SetPaused(p bool) { s.paused.Store(p) }

// NewServer makes a server on h. Add experts, then Start.
func NewServer(h host.Host, cfg Config, log *slog.Logger) (*Server, error) {
	if cfg.MaxQueue < 1 || cfg.BatchWindow < 0 || cfg.IdleTimeout <= 0 || cfg.WriteTimeout <= 0 {
		return nil, fmt.Errorf("expert server: bad config %+v", cfg)
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Server{h: h, cfg: cfg, log: log.With("component", "expert-server"),
		batchers: map[expertKey]*batcher{}, embd: map[string]int{}, groupSlots: make(chan struct{}, cfg.MaxQueue),
		groupWork: make(chan []*job)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Add hosts expert (layer, expert) of model, computed by c.
func (s *Server) Add(model cid.Cid, layer, expert int, c Computer) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := expertKey{string(model.Bytes()), uint32(layer), uint32(expert)}
	if _, ok := s.batchers[k]; ok {
		return fmt.Errorf("expert %d:%d of %s is already hosted", layer, expert, model)
	}
	if e, ok := s.embd[k.model]; ok && e != c.Embd() {
		return fmt.Errorf("expert %d:%d of %s: hidden size %d, the model's other experts have %d", layer, expert, model, c.Embd(), e)
	}
	s.embd[k.model] = c.Embd()
	ctx, cancel := context.WithCancel(s.ctx)
	b := &batcher{c: c, vary: moe.RowsVary(c), queue: make(chan *job, s.cfg.MaxQueue), window: s.cfg.BatchWindow, slow: s.cfg.SlowDown, served: &s.served, receipts: s.cfg.SignReceipts != nil, metrics: s.cfg.Metrics, cancel: cancel, done: make(chan struct{})}
	s.batchers[k] = b
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(b.done)
		b.run(ctx)
		b.drain()
	}()
	return nil
}

// Remove stops serving an expert. Requests still queued for it are
// answered unknown-expert. It returns the expert's Computer, no longer in
// use, for the caller to free.
func (s *Server) Remove(model cid.Cid, layer, expert int) (Computer, error) {
	k := expertKey{string(model.Bytes()), uint32(layer), uint32(expert)}
	s.mu.Lock()
	b := s.batchers[k]
	delete(s.batchers, k)
	s.mu.Unlock()
	if b == nil {
		return nil, fmt.Errorf("expert %d:%d of %s is not hosted", layer, expert, model)
	}
	b.cancel()
	<-b.done
	return b.c, nil
}

// Start serves the protocol.
func (s *Server) Start() {
	s.h.SetStreamHandler(neuropb.ExpertProtocol, s.handle)
	s.h.SetStreamHandler(neuropb.ExpertProtocol11, s.handle)
	s.h.SetStreamHandler(neuropb.ExpertProtocol10, s.handle)
}

// Close stops serving and waits for the batchers. It is safe to call more
// than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.h.RemoveStreamHandler(neuropb.ExpertProtocol)
		s.h.RemoveStreamHandler(neuropb.ExpertProtocol11)
		s.h.RemoveStreamHandler(neuropb.ExpertProtocol10)
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.wg.Wait()
		s.groups.Wait()
	})
	return nil
}

func errorResponse(id uint64, code neuropb.ExpertError_Code, format string, args ...any) *neuropb.ExpertResponse {
	return &neuropb.ExpertResponse{RequestId: id, Error: &neuropb.ExpertError{Code: code, Message: fmt.Sprintf(format, args...)}}
}

// handle serves one stream: many requests, responses in completion order.
func (s *Server) handle(st network.Stream) {
	if err := st.Scope().SetService(ServiceName); err != nil {
		s.log.Debug("expert stream refused by the resource manager", "peer", st.Conn().RemotePeer(), "err", err)
		st.Reset()
		return
	}
	r := wire.NewReader(st, neuropb.MaxExpertMessageSize)
	a := &answerer{s: s, st: st, w: wire.NewWriter(st, neuropb.MaxExpertMessageSize),
		poll: s.cfg.WaitPoll != nil && s.cfg.WaitPollFor > 0 && (s.cfg.WaitPollNearby || !p2p.OnThisMachine(st.Conn().RemoteMultiaddr()))}
	defer a.stop()
	var inflight sync.WaitGroup
	for {
		_ = st.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		req := &neuropb.ExpertRequest{}
		err := r.Read(req)
		if a.poll {
			s.cfg.WaitPoll.StopPolling()
		}
		var tl *wire.TooLargeError
		switch {
		case err == nil:
		case errors.As(err, &tl) && tl.Skipped:
			a.write(errorResponse(0, neuropb.ExpertError_CODE_TOO_LARGE, "%v", tl))
			continue
		case errors.Is(err, io.EOF):
			inflight.Wait()
			a.flush()
			st.Close()
			return
		default:
			s.log.Debug("expert stream: read", "peer", st.Conn().RemotePeer(), "err", err)
			st.Reset()
			return
		}
		if s.cfg.drop {
			st.Reset()
			return
		}
		if s.paused.Load() {
			busy := errorResponse(req.GetRequestId(), neuropb.ExpertError_CODE_BUSY, "paused: the machine is busy with its owner's work")
			for _, m := range req.GetGroup() {
				busy.Group = append(busy.Group, errorResponse(m.GetRequestId(), busy.Error.Code, "%s", busy.Error.Message))
			}
			a.write(busy)
			continue
		}
		reply := a.replier(req.GetLateReceipts())
		// hold keeps an admitted job's memory, within the stream's, peer's
		// and service's limits (else answers it busy), until it is answered.
		hold := func(j *job, req *neuropb.ExpertRequest) bool {
			// its decoded input, the output and the encoded response
			mem := len(j.x)*4*2 + len(req.GetHidden().GetData())
			if err := st.Scope().ReserveMemory(mem, network.ReservationPriorityMedium); err != nil {
				j.reply(errorResponse(req.GetRequestId(), neuropb.ExpertError_CODE_BUSY, "memory limit: %v", err))
				return false
			}
			inflight.Add(1)
			a.track(j)
			done := j.reply
			j.reply = func(resp *neuropb.ExpertResponse) {
				done(resp)
				st.Scope().ReleaseMemory(mem)
				inflight.Done()
			}
			return true
		}
		if len(req.GetGroup()) > 0 {
			s.serveGroup(st.Conn().RemotePeer(), req, reply, hold)
			continue
		}
		if j := s.admit(st.Conn().RemotePeer(), req, reply); j != nil && hold(j, req) {
			j.b.enqueueOrBusy(j, s.cfg.MaxQueue)
		}
	}
}

// enqueueOrBusy queues j, or answers it busy when the queue is full.
func (b *batcher) enqueueOrBusy(j *job, maxQueue int) {
	if !b.enqueue(j) {
		j.reply(errorResponse(j.id, neuropb.ExpertError_CODE_BUSY, "expert %d:%d has %d requests queued", j.layer, j.expert, maxQueue))
	}
}

// serveGroup serves a request with a group: each member is admitted as a
// request of its own, those whose rows do not depend on their batch are
// computed together in one call (moe.ComputeGroup), the others by their
// experts' batchers, and every answer goes back in one response.
func (s *Server) serveGroup(from peer.ID, req *neuropb.ExpertRequest, reply func(*neuropb.ExpertResponse), hold func(*job, *neuropb.ExpertRequest) bool) {
	// A group's shared rows become each request's own hidden before
	// anything reads them (admission, memory, receipts' digests).
	err := req.UnshareRows()
	if err == nil {
		err = req.Validate()
	}
	members := append([]*neuropb.ExpertRequest{req}, req.GetGroup()...)
	req.Group = nil
	col := &collector{left: len(members), reply: reply}
	if err != nil {
		for _, m := range members {
			col.add(errorResponse(m.GetRequestId(), neuropb.ExpertError_CODE_BAD_REQUEST, "%v", err))
		}
		return
	}
	var together []*job
	for _, m := range members {
		j := s.admit(from, m, col.add)
		if j == nil || !hold(j, m) {
			continue
		}
		if j.b.vary {
			j.b.enqueueOrBusy(j, s.cfg.MaxQueue)
			continue
		}
		together = append(together, j)
	}
	switch len(together) {
	case 0:
	case 1:
		together[0].b.enqueueOrBusy(together[0], s.cfg.MaxQueue)
	default:
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			for _, j := range together {
				j.reply(errorResponse(j.id, neuropb.ExpertError_CODE_BUSY, "the node is shutting down"))
			}
			return
		}
		select {
		case s.groupSlots <- struct{}{}:
		default:
			s.mu.Unlock()
			for _, j := range together {
				j.reply(errorResponse(j.id, neuropb.ExpertError_CODE_BUSY, "%d groups are waiting to compute", s.cfg.MaxQueue))
			}
			return
		}
		handed := false
		select {
		case s.groupWork <- together: // a worker was idle
			handed = true
		default:
			s.groups.Add(1)
		}
		s.mu.Unlock()
		if !handed {
			go s.groupWorker(together)
		}
	}
}

// groupWorkerIdle is how long a group worker waits for the next group
// before it ends.
const groupWorkerIdle = 10 * time.Second

// groupWorker computes jobs, then each group handed to it (groupWork)
// while one comes within groupWorkerIdle: a goroutine started for each
// group grew its stack to the answer's depth (the encoding, the
// signature, the stream's write) every time, copying it (morestack: 1.2%
// of a core on each side of a loopback testnet's decode, both processes
// together about 40 µs a layer).
func (s *Server) groupWorker(jobs []*job) {
	defer s.groups.Done()
	s.workers.Add(1)
	idle := time.NewTimer(groupWorkerIdle)
	defer idle.Stop()
	for {
		s.computeGroup(jobs)
		<-s.groupSlots
		idle.Reset(groupWorkerIdle)
		select {
		case jobs = <-s.groupWork:
		case <-idle.C:
			return
		case <-s.ctx.Done():
			return
		}
	}
}

// collector gathers the answers of a group's members and sends them as
// one response once the last is in.
type collector struct {
	mu    sync.Mutex
	left  int
	resps []*neuropb.ExpertResponse
	reply func(*neuropb.ExpertResponse)
}

func (c *collector) add(r *neuropb.ExpertResponse) {
	c.mu.Lock()
	c.resps = append(c.resps, r)
	c.left--
	done := c.left == 0
	c.mu.Unlock()
	if done {
		top := c.resps[0]
		top.Group = c.resps[1:]
		c.reply(top)
	}
}

// computeGroup computes jobs of different experts in one call, where the
// experts' backend can (moe.Grouper), and answers each as its batcher
// would.
func (s *Server) computeGroup(jobs []*job) {
	live, tokens := unexpired(jobs)
	if len(live) == 0 {
		return
	}
	es, xs, ns, outs := make([]moe.Computer, len(live)), make([][]float32, len(live)), make([]int, len(live)), make([][]float32, len(live))
	for i, j := range live {
		es[i], xs[i], ns[i], outs[i] = j.b.c, j.x, j.n, make([]float32, len(j.x))
	}
	start := time.Now()
	if s.cfg.SlowDown > 0 {
		time.Sleep(s.cfg.SlowDown)
	}
	err := moe.ComputeGroup(es, xs, ns, outs)
	took := time.Since(start)
	s.cfg.Metrics.Batch(tokens, len(live), took, outcome(err))
	// The members' answers go back in one response (their collector's),
	// whose receipts the stream's answerer signs at once: one signature
	// for the group's answer.
	for i, j := range live {
		j.reply(j.b.response(j, outs[i], err, start, took, tokens))
	}
}

// admit checks a request and turns it into a job, or answers its error and
// returns nil.
func (s *Server) admit(from peer.ID, req *neuropb.ExpertRequest, reply func(*neuropb.ExpertResponse)) *job {
	id := req.GetRequestId()
	if err := req.Validate(); err != nil {
		reply(errorResponse(id, neuropb.ExpertError_CODE_BAD_REQUEST, "%v", err))
		return nil
	}
	s.mu.RLock()
	embd, hosted := s.embd[string(req.GetModel())]
	b := s.batchers[expertKey{string(req.GetModel()), req.GetLayer(), req.GetExpert()}]
	s.mu.RUnlock()
	if !hosted {
		c, _ := cid.Cast(req.GetModel())
		reply(errorResponse(id, neuropb.ExpertError_CODE_UNKNOWN_MODEL, "model %s is not hosted here", c))
		return nil
	}
	if b == nil {
		reply(errorResponse(id, neuropb.ExpertError_CODE_UNKNOWN_EXPERT, "expert %d:%d is not hosted here", req.GetLayer(), req.GetExpert()))
		return nil
	}
	rows, cols, _ := req.GetHidden().Rows()
	if cols != embd {
		reply(errorResponse(id, neuropb.ExpertError_CODE_WRONG_SHAPE, "hidden size %d, the model's is %d", cols, embd))
		return nil
	}
	if rows > b.c.MaxBatch() {
		reply(errorResponse(id, neuropb.ExpertError_CODE_BAD_REQUEST, "%d tokens, at most %d per request", rows, b.c.MaxBatch()))
		return nil
	}
	var deadline time.Time
	if ms := req.GetDeadlineUnixMs(); ms != 0 {
		deadline = time.UnixMilli(ms)
		if time.Now().After(deadline) {
			reply(errorResponse(id, neuropb.ExpertError_CODE_DEADLINE_EXCEEDED, "deadline passed on arrival"))
			return nil
		}
	}
	segs := req.GetSegments()
	if len(segs) == 0 {
		segs = []*neuropb.Segment{{Rows: uint32(rows), Escrow: req.GetEscrow()}}
	}
	if s.cfg.Payment != nil {
		for i, sg := range segs {
			// A delegated escrow is charged to the gating node that
			// opened it and signed the delegation.
			payer := from
			if d := delegationFor(req.GetDelegations(), sg.GetEscrow()); d != nil && sg.GetEscrow() != 0 {
				p, err := VerifyDelegation(d, from, sg.GetEscrow(), time.Now())
				if err != nil {
					reply(errorResponse(id, neuropb.ExpertError_CODE_PAYMENT_REQUIRED, "%v", err))
					return nil
				}
				payer = p
			}
			ctx, cancel := context.WithTimeout(context.Background(), paymentTimeout)
			err := s.cfg.Payment(ctx, payer, sg.GetEscrow(), FLOPs(b.c, int(sg.GetRows())))
			cancel()
			if err != nil {
				if len(segs) > 1 {
					err = fmt.Errorf("segment %d: %w", i, err)
				}
				reply(errorResponse(id, neuropb.ExpertError_CODE_PAYMENT_REQUIRED, "%v", err))
				return nil
			}
		}
	}
	j := &job{b: b, id: id, x: DecodeFloats(req.GetHidden()), n: rows, dtype: req.GetHidden().GetDtype(),
		deadline: deadline, queued: time.Now(), reply: reply, apart: req.GetRowsApart(),
		escrow: req.GetEscrow(), layer: req.GetLayer(), expert: req.GetExpert()}
	if len(req.GetSegments()) > 0 {
		j.segs = make([]jobSegment, len(segs))
		for i, sg := range segs {
			j.segs[i] = jobSegment{n: int(sg.GetRows()), escrow: sg.GetEscrow()}
		}
	}
	return j
}

// job is one request waiting for its expert.
type job struct {
	b        *batcher
	id       uint64
	x        []float32
	n        int
	dtype    neuropb.WireDType
	deadline time.Time
	queued   time.Time
	reply    func(*neuropb.ExpertResponse)
	// escrow, if not 0, pays for the work: the answer carries a receipt.
	escrow        uint64
	layer, expert uint32
	apart         bool // each row computed as a batch of one
	// segs are a batched request's generations (nil: one): each is
	// computed as a request of its own would be, and gets a receipt.
	segs []jobSegment
}

// jobSegment is one generation's run of a job's rows.
type jobSegment struct {
	n      int
	escrow uint64
}

// batcher runs one expert: it takes queued requests, as many as fit in one
// ggml call, and answers each.
type batcher struct {
	c Computer
	// vary: c's rows depend on their batch (moe.RowsVary), so requests
	// are computed each alone, as its sender's own batch.
	vary   bool
	queue  chan *job
	window time.Duration
	slow   time.Duration
	served *atomic.Int64 // the server's count of answered calls
	// receipts: the node signs usage receipts (Config.SignReceipts), so
	// answers carry them, unsigned until the stream's answerer signs them
	receipts bool
	metrics  *metrics.Metrics
	next     *job // a job that did not fit the last batch
	cancel   context.CancelFunc
	done     chan struct{} // closed when run has returned and drained
}

// receipt is the usage receipt, unsigned and without its digests (the
// stream's answerer adds them, job.digest), of n of a job's tokens paid
// from escrow (0: none): their tokens and FLOPs (three matrix products of
// embd x ff per token). nil when the node signs none.
func (b *batcher) receipt(j *job, escrow uint64, n int) *neuropb.UsageReceipt {
	if !b.receipts {
		return nil
	}
	return &neuropb.UsageReceipt{Escrow: escrow, Layer: j.layer, ExpertIndex: j.expert, Tokens: uint64(n), Flops: FLOPs(b.c, n)}
}

// digest sets the digests of j's receipts: rc (all its rows) or rcs (one
// per segment), given its encoded output out: of each one's rows of the
// input as the node decoded them, and of its rows of out as the caller
// decodes them.
func (j *job) digest(rc *neuropb.UsageReceipt, rcs []*neuropb.UsageReceipt, out *neuropb.Tensor) {
	if rc != nil {
		rc.InputDigest, rc.OutputDigest = neuropb.FloatsDigest(j.x), TensorDigest(out)
	}
	if len(rcs) == 0 || len(rcs) != len(j.segs) || j.n < 1 {
		return
	}
	embd := len(j.x) / j.n
	rowBytes := len(out.GetData()) / j.n
	off := 0
	for i, sg := range j.segs {
		if (off+sg.n)*embd > len(j.x) || (off+sg.n)*rowBytes > len(out.GetData()) {
			return
		}
		part := &neuropb.Tensor{Data: out.GetData()[off*rowBytes : (off+sg.n)*rowBytes], Dtype: out.GetDtype(), Shape: []uint32{uint32(sg.n), uint32(embd)}}
		rcs[i].InputDigest, rcs[i].OutputDigest = neuropb.FloatsDigest(j.x[off*embd:(off+sg.n)*embd]), TensorDigest(part)
		off += sg.n
	}
}

// FLOPs is the work of n tokens through expert c, as receipts count it
// (and a span node its own experts'): three matrix products
// of embd x ff per token.
func FLOPs(c Computer, n int) uint64 {
	ff := 0
	if f, ok := c.(interface{ FF() int }); ok {
		ff = f.FF()
	}
	return 6 * uint64(c.Embd()) * uint64(ff) * uint64(n)
}

// drain answers the jobs left when the batcher stops.
func (b *batcher) drain() {
	if b.next != nil {
		b.next.reply(errorResponse(b.next.id, neuropb.ExpertError_CODE_UNKNOWN_EXPERT, "expert no longer hosted"))
	}
	for {
		select {
		case j := <-b.queue:
			j.reply(errorResponse(j.id, neuropb.ExpertError_CODE_UNKNOWN_EXPERT, "expert no longer hosted"))
		default:
			return
		}
	}
}

func (b *batcher) enqueue(j *job) bool {
	select {
	case b.queue <- j:
		return true
	default:
		return false
	}
}

func (b *batcher) run(ctx context.Context) {
	for {
		first := b.next
		b.next = nil
		if first == nil {
			select {
			case <-ctx.Done():
				return
			case first = <-b.queue:
			}
		}
		jobs := b.collect(first)
		b.compute(jobs)
	}
}

// collect adds to first every job already queued, then waits up to the
// window for more, as long as the tokens fit one call.
func (b *batcher) collect(first *job) []*job {
	jobs, tokens := []*job{first}, first.n
	if b.vary {
		return jobs
	}
	var timer <-chan time.Time
	for tokens < b.c.MaxBatch() {
		var j *job
		select {
		case j = <-b.queue:
		default:
			if b.window == 0 {
				return jobs
			}
			if timer == nil {
				timer = time.After(b.window)
			}
			select {
			case j = <-b.queue:
			case <-timer:
				return jobs
			}
		}
		if tokens+j.n > b.c.MaxBatch() {
			b.next = j
			return jobs
		}
		jobs, tokens = append(jobs, j), tokens+j.n
	}
	return jobs
}

// unexpired answers the jobs whose deadline passed in the queue and
// returns the others and their rows.
func unexpired(jobs []*job) (live []*job, tokens int) {
	now := time.Now()
	live = jobs[:0]
	for _, j := range jobs {
		if !j.deadline.IsZero() && now.After(j.deadline) {
			j.reply(errorResponse(j.id, neuropb.ExpertError_CODE_DEADLINE_EXCEEDED, "deadline passed in the queue"))
			continue
		}
		live, tokens = append(live, j), tokens+j.n
	}
	return live, tokens
}

// outcome is a compute's result for the metrics.
func outcome(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

func (b *batcher) compute(jobs []*job) {
	live, tokens := unexpired(jobs)
	if len(live) == 0 {
		return
	}
	embd := b.c.Embd()
	x := make([]float32, tokens*embd)
	off := 0
	for _, j := range live {
		copy(x[off:], j.x)
		off += len(j.x)
	}
	out := make([]float32, len(x))
	start := time.Now()
	if b.slow > 0 {
		time.Sleep(b.slow)
	}
	var err error
	switch {
	case b.vary && live[0].apart:
		for t := 0; t < tokens && err == nil; t++ {
			err = b.c.Compute(x[t*embd:(t+1)*embd], 1, out[t*embd:(t+1)*embd])
		}
	case b.vary && live[0].segs != nil:
		// each generation's rows as its own batch
		off := 0
		for _, sg := range live[0].segs {
			if err = b.c.Compute(x[off*embd:(off+sg.n)*embd], sg.n, out[off*embd:(off+sg.n)*embd]); err != nil {
				break
			}
			off += sg.n
		}
	default:
		err = b.c.Compute(x, tokens, out)
	}
	took := time.Since(start)
	b.metrics.Batch(tokens, len(live), took, outcome(err))
	off = 0
	for _, j := range live {
		n := j.n * embd
		b.answer(j, out[off:off+n], err, start, took, tokens)
		off += n
	}
}

// answer sends j its output out (its rows of a call of tokens rows that
// started at start and took took), or the call's error; the stream's
// answerer signs its receipts.
func (b *batcher) answer(j *job, out []float32, err error, start time.Time, took time.Duration, tokens int) {
	j.reply(b.response(j, out, err, start, took, tokens))
}

// response is j's answer (as answer's), its receipts unsigned.
func (b *batcher) response(j *job, out []float32, err error, start time.Time, took time.Duration, tokens int) *neuropb.ExpertResponse {
	if err != nil {
		return errorResponse(j.id, neuropb.ExpertError_CODE_INTERNAL, "compute: %v", err)
	}
	b.served.Add(1)
	enc := EncodeFloats(out, j.n, b.c.Embd(), j.dtype)
	resp := &neuropb.ExpertResponse{
		RequestId:   j.id,
		Output:      enc,
		ComputeUs:   uint32(took.Microseconds()),
		QueueUs:     uint32(start.Sub(j.queued).Microseconds()),
		BatchTokens: uint32(tokens),
	}
	if j.segs == nil {
		resp.Receipt = b.receipt(j, j.escrow, j.n)
	} else if b.receipts {
		resp.Receipts = make([]*neuropb.UsageReceipt, len(j.segs))
		for i, sg := range j.segs {
			resp.Receipts[i] = b.receipt(j, sg.escrow, sg.n)
		}
	}
	return resp
}
