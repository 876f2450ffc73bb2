// Package gating is the gating node: it runs embeddings, attention and the
// router itself (a moe.Gating from the compute backend it is given) and
// sends each MoE layer's hidden states to the experts on other nodes
// (RemoteExperts), choosing providers by latency and reputation (Selector),
// hedging stragglers, re-dispatching failures and re-executing a sample of
// the answers (Validator). Engine serves generations over the infer
// protocol and the OpenAI-compatible HTTP API (OpenAI).
//
// The package is pure Go: the compute arrives through the moe interfaces
// (EngineConfig.Compute), so it builds with CGO_ENABLED=0 and its tests run
// under the race detector; the tests that compare with llama.cpp carry the
// build tag ggml.
package gating

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/metrics"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
)

// ErrNoProvider means no live node hosts an expert a token needs.
var ErrNoProvider = errors.New("no live provider")

// FindProviders lists the peers that host an expert, best first.
type FindProviders func(k expert.Key) []peer.ID

// HeartbeatProviders finds providers in the routing topic's heartbeats:
// the peers whose last heartbeat lists the expert and does not say that
// they have paused expert work.
func HeartbeatProviders(h interface{ Peers() *p2p.PeerTable }, model cid.Cid) FindProviders {
	want := model.Bytes()
	return func(k expert.Key) []peer.ID {
		var out []peer.ID
		for _, e := range h.Peers().Hosting(want, uint32(k.Layer)<<16|uint32(k.Expert), time.Now()) {
			if !e.Paused {
				out = append(out, e.ID)
			}
		}
		return out
	}
}

// RemoteExperts answers the gating compute's MoE calls with experts on
// other nodes. For each expert a layer needs it sends the batch of tokens
// routed to it in one request, all experts in parallel; a failed call goes
// at once to the next provider. The outputs are combined exactly as
// llama.cpp combines them (moe.Combine).
type RemoteExperts struct {
	Client    *expert.Client
	Model     cid.Cid
	Embd      int
	Used      int
	Providers FindProviders
	// DType on the wire: F32 keeps the arithmetic identical to llama.cpp;
	// F16 halves the bytes.
	DType neuropb.WireDType
	// CallTimeout bounds one expert call (default 30 s).
	CallTimeout time.Duration
	// Selector ranks providers and times hedges; nil tries them in the
	// order Providers gives, without hedging.
	Selector *Selector
	// Validator, if set, keeps excluded peers out and re-executes a sample
	// of the answers on other providers.
	Validator *Validator
	// Advertised, if set, gives the compute time per token a peer's
	// heartbeat advertises (0: unknown), to score its speed against.
	Advertised func(peer.ID) time.Duration
	// Metrics, if set, records each call's outcome and latency.
	Metrics *metrics.Metrics
	// WeightTypes, if set, gives an expert's tensor types (the manifest's),
	// which set the validator's tolerance.
	WeightTypes func(expert.Key) []model.DType
	// Local, if set, gives the experts this node computes itself (a span
	// node's own): their calls never leave the process, and nil for the
	// others, which are called on other nodes.
	Local func(expert.Key) moe.Expert
	// WaitPoll, if set, keeps a core awake while a round's calls are out,
	// at most WaitPollFor a round (EngineConfig.WaitPoll), unless an
	// expert node the client has a session with is on this machine and
	// not PollNearby (the expert nodes on this machine have cores of their
	// own: a pinned testnet).
	WaitPoll    moe.WaitPoller
	WaitPollFor time.Duration
	PollNearby  bool
	// InlineReceipts takes the receipts with the answers always: a span
	// node hands its experts' receipts to the head with each answer
	// (Receipts.Drain), which late receipts would hold back.
	InlineReceipts bool

	hedges, redispatches, lastResorts, coverageWaits atomic.Int64

	pollMu     sync.Mutex
	pollRounds int // rounds out that poll
}

// startPoll keeps a core awake for a round that went out, if the node
// polls: not when the node the round's group went to (to, if any)
// usually answers later than the poll would last (an expert node across
// the internet), where the core would sleep before the answer anyway.
// stopPoll, called as the round ends when startPoll returned true, stops
// once no other round polls.
func (r *RemoteExperts) startPoll(to peer.ID) bool {
	if r.WaitPoll == nil || r.WaitPollFor <= 0 || !r.PollNearby && r.Client.Nearby() {
		return false
	}
	if to != "" && r.Selector != nil && r.Selector.Typical(to) > r.WaitPollFor {
		return false
	}
	if to != "" {
		// The round's group message goes out first: the stream's
		// connection writes it from a goroutine of its own (yamux's send
		// loop), which the write readied but which would wait for this
		// one to block, after the poll's start and the calls' goroutines
		// (pinned testnet: 120 µs at the median from the write to the
		// expert node's read, 95-105 with this).
		runtime.Gosched()
	}
	r.pollMu.Lock()
	defer r.pollMu.Unlock()
	r.pollRounds++
	r.WaitPoll.PollFor(r.WaitPollFor)
	return true
}

func (r *RemoteExperts) stopPoll() {
	r.pollMu.Lock()
	defer r.pollMu.Unlock()
	if r.pollRounds--; r.pollRounds == 0 {
		r.WaitPoll.StopPolling()
	}
}

func (r *RemoteExperts) weightTypes(k expert.Key) []model.DType {
	if r.WeightTypes == nil {
		return nil
	}
	return r.WeightTypes(k)
}

// CallStats add up what a generation's expert calls cost.
type CallStats struct {
	// MoEWall is the time spent in MoE (all layers, all passes);
	// MoECompute the compute time the slowest call of each layer reported
	// (with its wait for the node's other computes).
	MoEWall, MoECompute atomic.Int64 // nanoseconds
	MoELayers           atomic.Int64
	// OneNodeLayers counts the MoE layers whose calls one node answered;
	// SharedLayers those whose round carried other generations' tokens too
	// (continuous batching).
	OneNodeLayers, SharedLayers atomic.Int64
	Calls, Bytes                atomic.Int64
	Hedges, Redispatch          atomic.Int64
	// Speculative decoding: the passes that verified a draft, the tokens
	// drafted and those the model kept.
	SpecPasses, Drafted, Accepted atomic.Int64
	// LocalFLOPs is the work of the experts computed on this node
	// (RemoteExperts.Local), as an expert's receipt would count it.
	LocalFLOPs atomic.Int64
	// Overhead counts the one-token MoE layers (decode steps; not a
	// prompt's or a draft's many tokens) by their wall time beyond the
	// slowest call's compute, to give its median and tail; DecodeOverhead
	// and DecodeLayers add up their overhead (nanoseconds) and count them,
	// for its mean, beside the mean of all layers MoEWall and MoECompute
	// give.
	Overhead                     OverheadHistogram
	DecodeOverhead, DecodeLayers atomic.Int64
}

// OverheadHistogram counts durations in buckets of OverheadBucket, the
// last bucket holding everything longer. Safe for concurrent use.
type OverheadHistogram struct {
	buckets [overheadBuckets]atomic.Int64
}

// OverheadBucket is the width of an OverheadHistogram's buckets.
const OverheadBucket = 10 * time.Microsecond

// overheadBuckets covers 0 to 5 ms; longer layers share the last bucket.
const overheadBuckets = 500

// Add counts d.
func (h *OverheadHistogram) Add(d time.Duration) {
	i := min(max(int(d/OverheadBucket), 0), overheadBuckets-1)
	h.buckets[i].Add(1)
}

// Quantile returns the duration below which a share q (0 to 1) of the
// counted durations lie, to OverheadBucket (the middle of its bucket;
// the last bucket's lower edge when it lies beyond), and 0 when nothing
// was counted.
func (h *OverheadHistogram) Quantile(q float64) time.Duration {
	var counts [overheadBuckets]int64
	var total int64
	for i := range counts {
		counts[i] = h.buckets[i].Load()
		total += counts[i]
	}
	if total == 0 {
		return 0
	}
	rank := int64(math.Ceil(min(max(q, 0), 1) * float64(total)))
	rank = max(rank, 1)
	var seen int64
	for i, c := range counts {
		seen += c
		if seen >= rank {
			if i == overheadBuckets-1 {
				return time.Duration(i) * OverheadBucket
			}
			return time.Duration(i)*OverheadBucket + OverheadBucket/2
		}
	}
	return time.Duration(overheadBuckets-1) * OverheadBucket
}

// Receipts collects the signed usage receipts of the expert answers a
// generation used, when it is paid from an escrow. They are verified when
// the generation ends (Take), on every core at once: an Ed25519
// verification costs about as much as the network on loopback, and
// verifying each as it arrived took the cores from the next layer's
// compute on a two-core machine (a layer's answers arrive together).
type Receipts struct {
	Escrow uint64
	mu     sync.Mutex
	list   []heldReceipt
	taken  bool
}

// lateReceipts says whether to take the experts' receipts after their
// answers, so that a node's digests and signature are not on the
// generation's path: always but for a span node's calls
// (InlineReceipts). The expert node signs a stream's late receipts a
// batch at a time (expert.DefaultLateReceiptsFlush), so that a node
// sharing this machine's cores signs once for many answers (measured on
// the two-core loopback testnet: the dispatch overhead a layer 20-47 µs
// lower at the median, a generation's tokens 1.3% faster at the median of
// 57 interleaved pairs, within the noise; an eighth of the signatures).
func (r *RemoteExperts) lateReceipts() bool {
	return !r.InlineReceipts
}

// heldReceipt is a receipt not yet verified and the node that sent it:
// rc, or seg's of an answer's receipts that come after it (seg -1: its one
// receipt).
type heldReceipt struct {
	rc   *neuropb.UsageReceipt
	p    peer.ID
	late *expert.LateReceipts
	seg  int
}

// receipt is h's receipt, waiting for it within ctx when it comes late.
func (h heldReceipt) receipt(ctx context.Context) *neuropb.UsageReceipt {
	if h.late == nil {
		return h.rc
	}
	rc, rcs, err := h.late.Take(ctx)
	return pick(rc, rcs, err, h.seg)
}

// lateReceiptWait bounds how long a generation's settlement (Receipts'
// Take and Drain) and a verdict wait for receipts that come after their
// answers (expert.Request.LateReceipts): an expert node sends them within
// a few milliseconds (expert.DefaultLateReceiptsFlush) of the answer.
const lateReceiptWait = 2 * time.Second

// answerReceipt is p's receipt of an answer, resp's (seg -1) or its
// segment seg's: the receipt itself, or the answer's receipts still to
// come (the handle, not the answer, which a settlement would keep).
func answerReceipt(resp *expert.Response, seg int, p peer.ID) heldReceipt {
	if l := resp.Late(); l != nil {
		return heldReceipt{p: p, late: l, seg: seg}
	}
	rc, rcs, err := resp.TakeReceipts(context.Background())
	return heldReceipt{rc: pick(rc, rcs, err, seg), p: p}
}

// pick is seg's receipt (seg -1: rc) of an answer's, nil after err.
func pick(rc *neuropb.UsageReceipt, rcs []*neuropb.UsageReceipt, err error, seg int) *neuropb.UsageReceipt {
	switch {
	case err != nil:
		return nil
	case seg < 0:
		return rc
	case seg < len(rcs):
		return rcs[seg]
	}
	return nil
}

// lateReceipt is seg's receipt of resp as a function a verdict calls when
// it needs the receipt, waiting at most lateReceiptWait.
func lateReceipt(resp *expert.Response, seg int) func() *neuropb.UsageReceipt {
	h := answerReceipt(resp, seg, "")
	return func() *neuropb.UsageReceipt {
		ctx, cancel := context.WithTimeout(context.Background(), lateReceiptWait)
		defer cancel()
		return h.receipt(ctx)
	}
}

// add keeps rc, p's receipt, to be verified by Take; after Take it is
// dropped (a late check's receipt misses the settlement).
func (r *Receipts) add(rc *neuropb.UsageReceipt, p peer.ID) {
	if rc == nil {
		return
	}
	r.hold(heldReceipt{rc: rc, p: p})
}

// addAnswer keeps p's receipt of an answer, resp's (seg -1) or its
// segment seg's, which may come after it: Take and Drain wait for it.
func (r *Receipts) addAnswer(resp *expert.Response, seg int, p peer.ID) {
	if h := answerReceipt(resp, seg, p); h.late != nil || h.rc != nil {
		r.hold(h)
	}
}

func (r *Receipts) hold(h heldReceipt) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.taken {
		r.list = append(r.list, h)
	}
}

// Drain returns the receipts collected since the last Drain, unverified,
// and goes on collecting: a span node hands its experts' receipts to the
// head with each answer, and the head verifies them when it settles.
// Receipts still to come are waited for, at most lateReceiptWait (a span
// node takes its receipts inline: RemoteExperts.InlineReceipts).
func (r *Receipts) Drain() []*neuropb.UsageReceipt {
	r.mu.Lock()
	held := r.list
	r.list = nil
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), lateReceiptWait)
	defer cancel()
	out := make([]*neuropb.UsageReceipt, 0, len(held))
	for _, h := range held {
		if rc := h.receipt(ctx); rc != nil {
			out = append(out, rc)
		}
	}
	return out
}

// Take returns the receipts collected that are their senders' signed
// receipts for the escrow, in order; later ones are dropped.
func (r *Receipts) Take() []*neuropb.UsageReceipt {
	r.mu.Lock()
	r.taken = true
	held := r.list
	r.list = nil
	r.mu.Unlock()
	// Receipts still to come are waited for, at most lateReceiptWait in
	// all.
	ctx, cancel := context.WithTimeout(context.Background(), lateReceiptWait)
	defer cancel()
	rcs := make([]*neuropb.UsageReceipt, len(held))
	valid := make([]bool, len(held))
	for i, h := range held {
		rcs[i] = h.receipt(ctx)
	}
	// The receipts of one answer share a signature: each signature's
	// receipts go to one worker, which verifies it once (sign.Verify
	// remembers it) instead of two workers each verifying it at once.
	var shared [][]int
	at := map[string]int{}
	for i, rc := range rcs {
		if rc == nil {
			continue // none came: not valid
		}
		j, ok := at[string(rc.GetSignature())]
		if !ok {
			j = len(shared)
			at[string(rc.GetSignature())] = j
			shared = append(shared, nil)
		}
		shared[j] = append(shared[j], i)
	}
	var (
		next atomic.Int64
		wg   sync.WaitGroup
	)
	for range min(runtime.GOMAXPROCS(0), len(shared)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := int(next.Add(1)) - 1; j < len(shared); j = int(next.Add(1)) - 1 {
				for _, i := range shared[j] {
					valid[i] = validReceipt(rcs[i], held[i].p, r.Escrow)
				}
			}
		}()
	}
	wg.Wait()
	var out []*neuropb.UsageReceipt
	for i := range held {
		if valid[i] {
			out = append(out, rcs[i])
		}
	}
	return out
}

// validReceipt checks that r is p's signed receipt for escrow.
func validReceipt(r *neuropb.UsageReceipt, p peer.ID, escrow uint64) bool {
	if r == nil || r.GetEscrow() != escrow || peer.ID(r.GetExpert()) != p {
		return false
	}
	signer, err := reputation.VerifyReceipt(r)
	return err == nil && signer == p
}

// Generation is the state of one generation that its expert calls
// report to, handed to them explicitly (Batcher.Join), never in a
// context value: what the calls cost, the receipts of a paid generation,
// the checks of its results, and the forward pass the calls belong to.
type Generation struct {
	Stats CallStats
	// Receipts collects the experts' signed receipts when the generation
	// is paid from an escrow (nil otherwise).
	Receipts *Receipts
	// Checks follows the re-executions of the results the generation used.
	Checks *Checks
	// Delegation, if set, lets this node pay the calls from an escrow
	// another node opened (a span node's session for a head).
	Delegation *neuropb.EscrowDelegation

	epoch, step atomic.Int64
}

// NewGeneration makes the state of a generation, paid from escrow when
// escrow is not 0.
func NewGeneration(escrow uint64) *Generation {
	g := &Generation{Checks: NewChecks()}
	if escrow != 0 {
		g.Receipts = &Receipts{Escrow: escrow}
	}
	return g
}

// Step marks the forward pass that the next expert calls belong to: step
// of epoch (the count of rewinds so far).
func (g *Generation) Step(epoch, step int) {
	g.epoch.Store(int64(epoch))
	g.step.Store(int64(step))
}

// Hedges counts calls sent to a second provider because the first was slow.
func (r *RemoteExperts) Hedges() int64 { return r.hedges.Load() }

// Redispatches counts calls sent again because a provider failed.
func (r *RemoteExperts) Redispatches() int64 { return r.redispatches.Load() }

// LastResorts counts the calls whose every provider outran the deadline
// its recent pace set and that were then asked again, each given the
// whole call timeout.
func (r *RemoteExperts) LastResorts() int64 { return r.lastResorts.Load() }

var _ moe.Experts = (*RemoteExperts)(nil)

// MoE implements moe.Experts for calls that belong to no generation (no
// stats, receipts or checks reach a caller): For binds them to one.
func (r *RemoteExperts) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	return r.moe(ctx, nil, false, layer, x, n, selected, weights)
}

// callState is where one expert call reports: its generation's stats,
// receipts and checks, and the forward pass it belongs to.
type callState struct {
	stats       *CallStats
	receipts    *Receipts
	checks      *Checks
	epoch, step int
	// apart: each row computed as a batch of one (MoEApart)
	apart bool
	// delegation of the escrow, if another node opened it
	delegation *neuropb.EscrowDelegation
}

func (g *Generation) callState(apart bool) callState {
	if g == nil {
		return callState{apart: apart}
	}
	return callState{stats: &g.Stats, receipts: g.Receipts, checks: g.Checks, epoch: int(g.epoch.Load()), step: int(g.step.Load()), apart: apart,
		delegation: g.Delegation}
}

func (cs callState) escrow() uint64 {
	if cs.receipts == nil {
		return 0
	}
	return cs.receipts.Escrow
}

// part is one generation's share of a layer's expert round: its tokens'
// hidden states and routing.
type part struct {
	cs       callState
	x        []float32
	n        int
	selected []int32
	weights  []float32
}

func (r *RemoteExperts) moe(ctx context.Context, g *Generation, apart bool, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	start := time.Now()
	outs, err := r.round(ctx, layer, []part{{cs: g.callState(apart), x: x, n: n, selected: selected, weights: weights}})
	if err != nil {
		return nil, err
	}
	outs[0].account(time.Since(start))
	return outs[0].out, nil
}

// partResult is what a round gave one part: its combined output, and
// what its stats record.
type partResult struct {
	out        []float32
	n          int // the part's tokens
	stats      *CallStats
	maxCompute time.Duration
	oneNode    bool
}

// account records a part's layer in its generation's stats, wall being
// the time the generation waited for it.
func (pr partResult) account(wall time.Duration) {
	if pr.stats == nil {
		return
	}
	pr.stats.MoEWall.Add(int64(wall))
	pr.stats.MoECompute.Add(int64(pr.maxCompute))
	if pr.n == 1 {
		over := wall - min(wall, pr.maxCompute)
		pr.stats.Overhead.Add(over)
		pr.stats.DecodeOverhead.Add(int64(over))
		pr.stats.DecodeLayers.Add(1)
	}
	pr.stats.MoELayers.Add(1)
	if pr.oneNode {
		pr.stats.OneNodeLayers.Add(1)
	}
}

// round computes one layer's experts for the tokens of one or more
// generations (parts, all with the same apart): the tokens routed to an
// expert go in one request to it, each generation's rows a segment paid
// from its own escrow, all experts in parallel.
func (r *RemoteExperts) round(ctx context.Context, layer int, parts []part) ([]partResult, error) {
	used := 0
	rows := 0
	for i, pt := range parts {
		u, err := moe.SlotsPerToken(pt.x, pt.n, pt.selected, pt.weights, r.Embd)
		if err != nil {
			return nil, err
		}
		if i > 0 && u != used {
			return nil, fmt.Errorf("moe layer %d: %d experts per token beside %d", layer, u, used)
		}
		used = u
		rows += pt.n
	}
	x, selected := parts[0].x, parts[0].selected
	if len(parts) > 1 {
		x = make([]float32, 0, rows*r.Embd)
		selected = make([]int32, 0, rows*used)
		for _, pt := range parts {
			x = append(x, pt.x...)
			selected = append(selected, pt.selected...)
		}
	}
	outs := make([]float32, rows*used*r.Embd)
	routing := moe.Route(selected)
	// The experts this node computes itself, and the others'.
	local := map[int32]moe.Expert{}
	var remote []int32
	for _, e := range routing.Experts {
		if r.Local != nil {
			if le := r.Local(expert.Key{Layer: layer, Expert: int(e)}); le != nil {
				local[e] = le
				continue
			}
		}
		remote = append(remote, e)
	}
	// Peers that host every expert this layer needs serve them all in one
	// round trip each: prefer them.
	providers := make(map[int32][]peer.ID, len(remote))
	preferred := map[peer.ID]bool{}
	for i, e := range remote {
		providers[e] = r.Providers(expert.Key{Layer: layer, Expert: int(e)})
		if i == 0 {
			for _, p := range providers[e] {
				preferred[p] = true
			}
			continue
		}
		for p := range preferred {
			if !slices.Contains(providers[e], p) {
				delete(preferred, p)
			}
		}
	}
	var (
		wg         sync.WaitGroup
		mu         sync.Mutex
		errs       []error
		maxCompute = make([]time.Duration, len(parts))
		answered   = make([]peer.ID, len(parts)) // the first node that answered each part, and
		several    = make([]bool, len(parts))    // whether another did too
	)
	var calls []layerCall
	for _, e := range remote {
		for _, c := range callsOf(routing.Slots[e], parts, used) {
			calls = append(calls, layerCall{e, c})
		}
	}
	ins := make([][]float32, len(calls))
	for i, lc := range calls {
		ins[i] = moe.Gather(x, lc.c.slots, used, r.Embd)
	}
	for e, le := range local {
		for _, c := range callsOf(routing.Slots[e], parts, used) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				out, err := computeLocal(le, moe.Gather(x, c.slots, used, r.Embd), len(c.slots), r.Embd, c.segs[0].cs.apart)
				took := time.Since(start)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, fmt.Errorf("expert %d:%d here: %w", layer, e, err))
					return
				}
				for _, sg := range c.segs {
					maxCompute[sg.part] = max(maxCompute[sg.part], took)
					if sg.cs.stats != nil {
						sg.cs.stats.LocalFLOPs.Add(int64(expert.FLOPs(le, sg.rows)))
					}
				}
				moe.Scatter(outs, out, c.slots, r.Embd)
			}()
		}
	}
	members := make([]*groupMember, len(calls))
	if len(calls) > 1 {
		r.sendGroup(ctx, layer, calls, providers, preferred, ins, members)
	}
	sent := time.Now()
	// The round's remote calls are out: while nothing computes here, a
	// core is kept awake for their answers.
	polling := len(calls) > 0 && len(local) == 0 && r.startPoll(groupPeer(members))
	// finish takes call i's answer (or error) into the round.
	finish := func(i int, resp *expert.Response, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			errs = append(errs, err)
			return
		}
		for _, sg := range calls[i].c.segs {
			maxCompute[sg.part] = max(maxCompute[sg.part], resp.Compute)
			if answered[sg.part] == "" {
				answered[sg.part] = resp.Peer
			}
			several[sg.part] = several[sg.part] || resp.Peer != answered[sg.part]
		}
		moe.Scatter(outs, resp.Output, calls[i].c.slots, r.Embd)
	}
	// alone makes call i a call of its own (its group's try, if any, as
	// far as pre saw it).
	alone := func(i int, pre *groupTry) {
		e, c := calls[i].e, calls[i].c
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := r.call(ctx, c.segs, expert.Key{Layer: layer, Expert: int(e)}, ins[i], len(c.slots),
				providers[e], preferred, members[i], pre)
			finish(i, resp, err)
		}()
	}
	for i := range calls {
		if members[i] == nil {
			alone(i, nil)
		}
	}
	r.awaitGroup(ctx, layer, calls, providers, preferred, ins, members, sent, finish, alone)
	wg.Wait()
	if polling {
		r.stopPoll()
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	res := make([]partResult, len(parts))
	off := 0
	for i, pt := range parts {
		n := pt.n * used * r.Embd
		res[i] = partResult{out: moe.Combine(outs[off:off+n], pt.weights, pt.n, used, r.Embd), n: pt.n, stats: pt.cs.stats,
			maxCompute: maxCompute[i], oneNode: answered[i] != "" && !several[i]}
		off += n
	}
	return res, nil
}

// computeLocal runs n rows of x through an expert of this node's, at most
// its largest batch at once, or each row alone (apart).
func computeLocal(le moe.Expert, x []float32, n, embd int, apart bool) ([]float32, error) {
	out := make([]float32, n*embd)
	if !apart {
		if err := moe.ComputeBatched(le, x, n, out); err != nil {
			return nil, err
		}
		return out, nil
	}
	for i := range n {
		if err := le.Compute(x[i*embd:(i+1)*embd], 1, out[i*embd:(i+1)*embd]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// maxGroupBytes bounds the hidden rows (as float32) of one group of expert
// calls: well inside an expert message's size limit.
const maxGroupBytes = neuropb.MaxExpertMessageSize / 4

// sendGroup sends the first try of a round's calls to one node in one
// message (expert.Client.SendGroup): the node the selector ranks first
// among those that host every expert of the round (preferred), if any,
// each expert once (a second call of one expert goes alone), within
// maxGroupBytes. members[i] is then call i's place in the group; each
// call waits for its answer there (and hedges or re-dispatches on its own
// as a call alone does).
func (r *RemoteExperts) sendGroup(ctx context.Context, layer int, calls []layerCall, providers map[int32][]peer.ID, preferred map[peer.ID]bool,
	ins [][]float32, members []*groupMember) {
	var hosts []peer.ID
	for _, p := range providers[calls[0].e] {
		if preferred[p] {
			hosts = append(hosts, p)
		}
	}
	if r.Validator != nil {
		hosts, _ = r.Validator.trusted(hosts)
	}
	if r.Selector != nil && r.Selector.provenFirst {
		// A group goes to a node that has answered calls: every member of
		// a group sent to a node that never answers waits a hedge delay,
		// and peers that announce every expert (Sybils) are the first to
		// host all of a round's (seen: 90 hedges in 100 calls, 44 ms a
		// layer). The calls go alone instead, to proven providers; only
		// while no provider of the round has answered yet does the group
		// go to the best-ranked host, as it always did.
		proven := slices.DeleteFunc(slices.Clone(hosts), func(p peer.ID) bool { return !r.Selector.Proven(p) })
		if len(proven) == 0 && r.anyProven(calls, providers) {
			return
		}
		if len(proven) > 0 {
			hosts = proven
		}
	}
	if len(hosts) == 0 {
		return
	}
	if r.Selector != nil {
		hosts = r.Selector.rankOnly(hosts, preferred)
	}
	var (
		reqs   []expert.Request
		idx    []int
		last   int32 = -1
		budget       = maxGroupBytes
	)
	for i, lc := range calls {
		e, c := lc.e, lc.c
		size := len(ins[i]) * 4
		if e == last || len(reqs) == neuropb.MaxGroup || size > budget {
			continue
		}
		last, budget = e, budget-size
		reqs = append(reqs, r.request(c.segs, expert.Key{Layer: layer, Expert: int(e)}, ins[i], len(c.slots)))
		idx = append(idx, i)
	}
	if len(reqs) < 2 {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, r.deadline(hosts[0], r.callTimeout()))
	defer cancel()
	sent, err := r.Client.SendGroup(sctx, hosts[0], reqs)
	if err != nil {
		return // each call goes alone
	}
	for k, i := range idx {
		members[i] = &groupMember{sent: sent, i: k}
	}
}

// groupTry is what a round saw of a call's try in its group before the
// call went on alone: when the group was sent, and the try's error if it
// failed (done; it was recorded: tried).
type groupTry struct {
	start time.Time
	err   error
	done  bool
}

// closedTimer is a timer's channel that has fired.
var closedTimer = func() <-chan time.Time {
	c := make(chan time.Time)
	close(c)
	return c
}()

// awaitGroup waits, in the round's goroutine, for the answers of the
// calls sent in a group (members; sent when the group was written), which
// come in one message, and takes each as callOnce would (tried, accepted)
// into the round (finish): no goroutine, context or timer for each call. A
// call whose try failed, or that has not answered by the time callOnce
// would hedge it or give up on its node, goes on alone (callOnce, from
// where this left it).
func (r *RemoteExperts) awaitGroup(ctx context.Context, layer int, calls []layerCall, providers map[int32][]peer.ID,
	preferred map[peer.ID]bool, ins [][]float32, members []*groupMember, sent time.Time,
	finish func(int, *expert.Response, error), alone func(int, *groupTry)) {
	type waiting struct {
		i                int
		k                expert.Key
		ranked, excluded []peer.ID
	}
	var (
		ws      []waiting
		timeout = r.callTimeout()
		limit   = timeout
	)
	for i, gm := range members {
		if gm == nil {
			continue
		}
		k := expert.Key{Layer: layer, Expert: int(calls[i].e)}
		ranked, excluded := r.ranked(k, providers[calls[i].e], preferred)
		p := gm.sent.Peer()
		if !slices.Contains(ranked, p) {
			alone(i, nil) // which forgets its place in the group
			continue
		}
		limit = min(limit, r.deadline(p, timeout))
		if r.Selector != nil && len(ranked) > 1 {
			limit = min(limit, r.Selector.HedgeAfter(p))
		}
		ws = append(ws, waiting{i: i, k: k, ranked: ranked, excluded: excluded})
	}
	if len(ws) == 0 {
		return
	}
	expire := time.NewTimer(limit - time.Since(sent))
	defer expire.Stop()
	expired := expire.C
	for _, w := range ws {
		gm, c := members[w.i], calls[w.i].c
		resp, err, ok := gm.sent.WaitOr(ctx, gm.i, expired)
		if !ok {
			// The rest have until now too.
			expired = closedTimer
			alone(w.i, &groupTry{start: sent})
			continue
		}
		p := gm.sent.Peer()
		r.tried(ctx, p, sent, resp, err, c.segs, len(c.slots))
		if err != nil {
			alone(w.i, &groupTry{start: sent, err: err, done: true})
			continue
		}
		r.accepted(c.segs, w.k, ins[w.i], resp, p, w.ranked, w.excluded, timeout)
		finish(w.i, resp, nil)
	}
}

// groupPeer is the node a round's group went to ("": none went).
func groupPeer(members []*groupMember) peer.ID {
	for _, m := range members {
		if m != nil {
			return m.sent.Peer()
		}
	}
	return ""
}

// anyProven reports whether a provider of any of calls' experts has
// answered a call.
func (r *RemoteExperts) anyProven(calls []layerCall, providers map[int32][]peer.ID) bool {
	for _, lc := range calls {
		if slices.ContainsFunc(providers[lc.e], r.Selector.Proven) {
			return true
		}
	}
	return false
}

// layerCall is one expert call of a round.
type layerCall struct {
	e int32
	c expertCall
}

// groupMember is one call's place in a group sent to one node.
type groupMember struct {
	sent *expert.SentGroup
	i    int
}

// callTimeout bounds an expert call.
func (r *RemoteExperts) callTimeout() time.Duration {
	if r.CallTimeout <= 0 {
		return 30 * time.Second
	}
	return r.CallTimeout
}

// request is the call of segs' rows in to expert k.
func (r *RemoteExperts) request(segs []segment, k expert.Key, in []float32, n int) expert.Request {
	req := expert.Request{Model: r.Model, Layer: k.Layer, Expert: k.Expert, Hidden: in, N: n, DType: r.DType, RowsApart: segs[0].cs.apart,
		LateReceipts: r.lateReceipts()}
	for _, sg := range segs {
		if d := sg.cs.delegation; d != nil && sg.cs.escrow() == d.GetEscrow() && !slices.Contains(req.Delegations, d) {
			req.Delegations = append(req.Delegations, d)
		}
	}
	if len(segs) == 1 {
		req.Escrow = segs[0].cs.escrow()
	} else {
		for _, sg := range segs {
			req.Segments = append(req.Segments, expert.Segment{Rows: sg.rows, Escrow: sg.cs.escrow()})
		}
	}
	return req
}

// segment is one generation's run of the rows of an expert call.
type segment struct {
	part int
	cs   callState
	rows int
}

// maxCallRows bounds the rows of a call that batches generations: an
// expert node's default largest batch (moe.ExpertOptions.MaxBatch). One
// generation's rows go in one call, as they always have.
const maxCallRows = 512

// expertCall is one call to an expert: the slots it serves and the
// generations they belong to.
type expertCall struct {
	slots []int
	segs  []segment
}

// callsOf splits an expert's slots (in order) among the parts (each
// part's a run of them) and into calls of at most maxCallRows rows.
func callsOf(slots []int, parts []part, used int) []expertCall {
	var out []expertCall
	var cur expertCall
	base, i := 0, 0
	for pi, pt := range parts {
		end := base + pt.n*used
		j := i
		for j < len(slots) && slots[j] < end {
			j++
		}
		if n := j - i; n > 0 {
			if len(cur.slots) > 0 && len(cur.slots)+n > maxCallRows {
				out = append(out, cur)
				cur = expertCall{}
			}
			cur.slots = slots[i-len(cur.slots) : j]
			cur.segs = append(cur.segs, segment{part: pi, cs: pt.cs, rows: n})
		}
		i, base = j, end
	}
	if len(cur.slots) > 0 {
		out = append(out, cur)
	}
	return out
}

// deadline bounds a call to p: its latency deadline, at most timeout.
func (r *RemoteExperts) deadline(p peer.ID, timeout time.Duration) time.Duration {
	if r.Selector != nil {
		return r.Selector.Deadline(p, timeout)
	}
	return timeout
}

// coverageRecheck is how often a call whose every provider failed looks
// for a new one.
const coverageRecheck = 250 * time.Millisecond

// call asks the providers of k (callOnce). When every one failed, or none
// announces k, it waits up to the call timeout for a provider it has not
// asked yet to appear — under churn a node takes over an expert whose
// providers all died within seconds (the expert service's rebalance) —
// and asks it, instead of failing the generation.
func (r *RemoteExperts) call(ctx context.Context, segs []segment, k expert.Key, in []float32, n int, providers []peer.ID, preferred map[peer.ID]bool,
	gm *groupMember, pre *groupTry) (*expert.Response, error) {
	resp, err := r.callOnce(ctx, segs, k, in, n, providers, preferred, gm, pre)
	if err == nil || !errors.Is(err, ErrNoProvider) || r.Providers == nil {
		return resp, err
	}
	asked := map[peer.ID]bool{}
	for _, p := range providers {
		asked[p] = true
	}
	t := time.NewTicker(coverageRecheck)
	defer t.Stop()
	deadline := time.Now().Add(r.callTimeout())
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return nil, errors.Join(err, ctx.Err())
		case <-t.C:
		}
		var fresh []peer.ID
		for _, p := range r.Providers(k) {
			if !asked[p] {
				fresh = append(fresh, p)
				asked[p] = true
			}
		}
		if len(fresh) == 0 {
			continue
		}
		r.coverageWaits.Add(1)
		resp, err2 := r.callOnce(ctx, segs, k, in, n, fresh, preferred, nil, nil)
		if err2 == nil || !errors.Is(err2, ErrNoProvider) {
			return resp, err2
		}
		err = errors.Join(err, err2)
	}
	return nil, err
}

// CoverageWaits counts the calls that, every provider of their expert
// having failed, waited for a new one and asked it.
func (r *RemoteExperts) CoverageWaits() int64 { return r.coverageWaits.Load() }

// callOnce asks the best provider of k for the rows of segs (one
// generation's each); if it has not answered by its p95 latency it asks
// the next one too (a hedge), and a failed call goes to the next at once.
// The first answer wins; the others are cancelled. With gm, the first try
// is the call's place in a group sent to that provider; pre says what the
// round already saw of it (awaitGroup): when it began, and its error.
func (r *RemoteExperts) callOnce(ctx context.Context, segs []segment, k expert.Key, in []float32, n int, providers []peer.ID, preferred map[peer.ID]bool,
	gm *groupMember, pre *groupTry) (*expert.Response, error) {
	req := r.request(segs, k, in, n)
	// each adds to the stats of every generation in the call
	each := func(f func(*CallStats)) {
		for _, sg := range segs {
			if sg.cs.stats != nil {
				f(sg.cs.stats)
			}
		}
	}
	timeout := r.callTimeout()
	providers, excluded := r.ranked(k, providers, preferred)
	if gm != nil {
		// The group's node first: it answers this call with the layer's
		// others.
		if p := gm.sent.Peer(); slices.Contains(providers, p) {
			providers = append([]peer.ID{p}, slices.DeleteFunc(slices.Clone(providers), func(q peer.ID) bool { return q == p })...)
		} else {
			gm.sent.Forget(gm.i)
			gm = nil
		}
	}
	if gm == nil {
		pre = nil
	}
	if len(providers) == 0 {
		if len(excluded) > 0 {
			return nil, fmt.Errorf("expert %s: %w (its %d providers are excluded for wrong results)", k, ErrNoProvider, len(excluded))
		}
		return nil, fmt.Errorf("expert %s: %w (no node announces it)", k, ErrNoProvider)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()      // stops the losers
	ranked := providers // checks draw from every provider, whichever pass answered
	results := make(chan tryResult, 2*len(providers))
	next, inflight := 0, 0
	// patient: the last resort's calls wait the whole call timeout.
	patient := false
	// newest: when the newest try began (a hedge comes its provider's
	// hedge delay after it).
	var newest time.Time
	launch := func() bool {
		if next >= len(providers) {
			return false
		}
		p := providers[next]
		grouped := gm != nil && next == 0
		next++
		inflight++
		deadline := timeout
		if !patient {
			deadline = r.deadline(p, timeout)
		}
		start := time.Now()
		if grouped && pre != nil {
			start = pre.start
		}
		newest = start
		if grouped && pre != nil && pre.done {
			// The round took this try's answer, an error (recorded).
			results <- tryResult{err: pre.err, p: p}
			return true
		}
		go func() {
			cctx, ccancel := context.WithDeadline(ctx, start.Add(deadline))
			defer ccancel()
			var resp *expert.Response
			var err error
			if grouped {
				resp, err = gm.sent.Wait(cctx, gm.i)
			} else {
				resp, err = r.Client.Call(cctx, p, req)
			}
			r.tried(ctx, p, start, resp, err, segs, n)
			cut := err != nil && ctx.Err() == nil && deadline < timeout && errors.Is(cctx.Err(), context.DeadlineExceeded)
			results <- tryResult{resp: resp, err: err, p: p, cut: cut}
		}()
		return true
	}
	launch()
	var errs []error
	var cut []peer.ID
	for inflight > 0 || (!patient && len(cut) > 0) {
		if inflight == 0 {
			// Every provider failed, and some only because they outran
			// the deadline their recent pace set (a node compiling a new
			// shape's kernels on its first call of that size takes
			// seconds where it took milliseconds). With no one left to
			// ask, they are asked again, each given the whole call
			// timeout (hedged as before).
			patient, providers, next, gm = true, cut, 0, nil
			r.lastResorts.Add(1)
			each(func(s *CallStats) { s.Redispatch.Add(1) })
			launch()
			continue
		}
		var hedge <-chan time.Time
		if r.Selector != nil && next < len(providers) {
			hedge = time.After(r.Selector.HedgeAfter(providers[next-1]) - time.Since(newest))
		}
		select {
		case res := <-results:
			inflight--
			if res.err == nil {
				r.accepted(segs, k, in, res.resp, res.p, ranked, excluded, timeout)
				return res.resp, nil
			}
			errs = append(errs, fmt.Errorf("%s: %w", res.p, res.err))
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if res.cut && !patient {
				cut = append(cut, res.p)
			}
			if launch() {
				r.redispatches.Add(1)
				each(func(s *CallStats) { s.Redispatch.Add(1) })
			}
		case <-hedge:
			if launch() {
				r.hedges.Add(1)
				each(func(s *CallStats) { s.Hedges.Add(1) })
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("expert %s: %w: every provider failed: %w", k, ErrNoProvider, errors.Join(errs...))
}

// tryResult is how one try of a call ended.
type tryResult struct {
	resp *expert.Response
	err  error
	p    peer.ID
	// cut: the try outran the deadline the selector set from the peer's
	// recent pace, shorter than the call timeout.
	cut bool
}

// ranked is k's providers in the order a call asks them: those the
// validator trusts (excluded: the others), best first.
func (r *RemoteExperts) ranked(k expert.Key, providers []peer.ID, preferred map[peer.ID]bool) (ranked, excluded []peer.ID) {
	if r.Validator != nil {
		providers, excluded = r.Validator.trusted(providers)
	}
	if r.Selector != nil {
		providers = r.Selector.Rank(k, providers, preferred)
	}
	return providers, excluded
}

// tried records a try of a call of segs' n rows to p, begun at start,
// that ended with resp or err (ctx is the call's: ended when another try
// won): the metrics, p's pace and book, and the generations' stats.
func (r *RemoteExperts) tried(ctx context.Context, p peer.ID, start time.Time, resp *expert.Response, err error, segs []segment, n int) {
	switch {
	case err == nil:
		r.Metrics.ExpertCall("ok", time.Since(start))
	case ctx.Err() != nil:
		r.Metrics.ExpertCall("cancelled", 0)
	default:
		r.Metrics.ExpertCall("error", 0)
	}
	if r.Selector != nil {
		switch {
		case err == nil:
			r.Selector.Observe(p, time.Since(start), nil)
		case ctx.Err() != nil:
			// Lost to a faster provider: it took at least this long.
			r.Selector.ObserveLoss(p, time.Since(start))
		default:
			r.Selector.Observe(p, 0, err)
		}
	}
	if r.Validator != nil && ctx.Err() == nil {
		var perToken, advertised time.Duration
		if resp != nil {
			perToken = resp.Compute / time.Duration(max(n, 1))
		}
		if r.Advertised != nil {
			advertised = r.Advertised(p)
		}
		r.Validator.Book().Call(p, err == nil, perToken, advertised)
	}
	// A batched call's bytes are shared out by rows.
	for _, sg := range segs {
		if sg.cs.stats != nil {
			sg.cs.stats.Calls.Add(1)
			if resp != nil {
				sg.cs.stats.Bytes.Add(int64(resp.WireBytes * sg.rows / n))
			}
		}
	}
}

// accepted takes p's answer resp to a call of k on segs' rows in (one
// generation's each), whose providers were ranked (excluded: those the
// validator keeps out): each generation's receipt, which may come after
// the answer (Request.LateReceipts) — the settlement and a verdict wait
// for it, the generation does not — and the validator's checks.
func (r *RemoteExperts) accepted(segs []segment, k expert.Key, in []float32, resp *expert.Response, p peer.ID, ranked, excluded []peer.ID,
	timeout time.Duration) {
	off := 0
	for i, sg := range segs {
		seg := -1
		if len(segs) > 1 {
			seg = i
		}
		if sg.cs.receipts != nil {
			sg.cs.receipts.addAnswer(resp, seg, p)
		}
		if r.Validator != nil {
			rows := in[off*r.Embd : (off+sg.rows)*r.Embd]
			r.check(sg.cs, k, rows, sg.rows, p, resp.Output[off*r.Embd:(off+sg.rows)*r.Embd], lateReceipt(resp, seg), ranked, excluded, timeout)
		}
		off += sg.rows
	}
}

// check hands the validator one generation's rows of an answer p gave
// (its receipt rc): a sample is re-executed on other providers, each
// check a call of those rows alone, paid from the generation's escrow.
func (r *RemoteExperts) check(cs callState, k expert.Key, in []float32, n int, p peer.ID, out []float32, rc func() *neuropb.UsageReceipt,
	providers, excluded []peer.ID, timeout time.Duration) {
	others := make([]peer.ID, 0, len(providers))
	for _, q := range providers {
		if q != p {
			others = append(others, q)
		}
	}
	// What the experts computed on: the input after the wire's rounding.
	sent := in
	if r.DType == neuropb.WireDType_WIRE_DTYPE_F16 {
		sent = expert.DecodeFloats(expert.EncodeFloats(in, n, len(in)/max(n, 1), r.DType))
	}
	r.Validator.after(cs.checks, cs.epoch, cs.step, r.Model, k, r.weightTypes(k), sent, n, p, out, rc, others, excluded,
		func(bg context.Context, q peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
			cctx, cancel := context.WithTimeout(bg, r.deadline(q, timeout))
			defer cancel()
			// A re-execution is paid from the generation's escrow like the
			// work it checks (a check back after the generation was settled
			// goes unpaid).
			start := time.Now()
			creq := expert.Request{Model: r.Model, Layer: k.Layer, Expert: k.Expert,
				Hidden: in, N: n, DType: r.DType, Escrow: cs.escrow(), RowsApart: cs.apart}
			if d := cs.delegation; d != nil && d.GetEscrow() == creq.Escrow {
				creq.Delegations = []*neuropb.EscrowDelegation{d}
			}
			resp, err := r.Client.Call(cctx, q, creq)
			// A check is a call like any other: its answer proves the peer
			// to the selector (new providers are proven this way, off the
			// generation's path), its failure counts against it (a check
			// cut short by the validator's end does not).
			if r.Selector != nil && bg.Err() == nil {
				r.Selector.Observe(q, time.Since(start), err)
			}
			if err != nil {
				return nil, nil, err
			}
			// A check runs in the background: it waits for late receipts.
			rctx, rcancel := context.WithTimeout(bg, lateReceiptWait)
			defer rcancel()
			rc := answerReceipt(resp, -1, q).receipt(rctx)
			if cs.receipts != nil {
				cs.receipts.add(rc, q)
			}
			return resp.Output, rc, nil
		})
}
