package gating

import (
	"context"
	crand "crypto/rand"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
)

// Tolerance is the relative L2 distance under which two results of the
// same expert task agree when its weight types are unknown (see
// reputation.Tolerance; the validator uses reputation.ToleranceFor).
const Tolerance = reputation.Tolerance

// RelL2 is reputation.RelL2.
func RelL2(a, b []float32) float64 { return reputation.RelL2(a, b) }

// Validator re-executes a sample of expert calls on other providers after
// their answers have been used (BOINC's quorum, adapted to low latency):
// each answer from peer p is checked with probability book.CheckRate(p),
// drawn from a generator the peers cannot predict. When the second
// provider disagrees a third decides, and the odd one out is recorded as
// wrong. Excluded peers are probed now and then with answers that are not
// used, and re-admitted after a run of valid ones.
type Validator struct {
	book *reputation.Book
	log  *slog.Logger
	cfg  ValidatorConfig

	self peer.ID
	mu   sync.Mutex
	rng  *rand.Rand

	calls, checks, wrong atomic.Int64
	inFlight             atomic.Int64
	wg                   sync.WaitGroup
	// life ends the checks in flight when the validator closes.
	life context.Context
	stop context.CancelFunc
}

// Verdict is a decided disagreement: Accused's output for the task was
// outvoted by two others that agreed.
type Verdict struct {
	Model    cid.Cid
	Key      expert.Key
	Input    []float32
	N        int
	Accused  peer.ID
	Wrong    []float32
	Agreeing [2]peer.ID
	Right    []float32
	// Receipt is the accused's signed receipt for the call, when it sent
	// one: the evidence that it gave Wrong for Input.
	Receipt *neuropb.UsageReceipt
	// DTypes are the expert's tensor types, which set the tolerance.
	DTypes []model.DType
	// Span, if set, makes the verdict a span request's: Key.Layer is the
	// span's first layer, and Input the request's rows after the
	// session's earlier ones (Span.History).
	Span *reputation.SpanTask
}

// ValidatorConfig tunes a Validator and gives it its callbacks.
type ValidatorConfig struct {
	// ProbeRate is the chance that a call also probes one provider of its
	// expert never checked yet; a tenth of it, one excluded provider
	// (default 0.1).
	ProbeRate float64
	// OnWrong, if set, is told of each result found wrong, with the task
	// and the results that outvoted it (a verdict). It must not block.
	OnWrong func(Verdict)
	// Local, if set, computes a task on this node: the judge of new peers
	// and of disagreements.
	Local LocalFunc
}

// NewValidator makes a validator over book for the gating node self.
func NewValidator(self peer.ID, book *reputation.Book, cfg ValidatorConfig, log *slog.Logger) *Validator {
	if log == nil {
		log = slog.Default()
	}
	if cfg.ProbeRate <= 0 {
		cfg.ProbeRate = 0.1
	}
	var seed [32]byte
	_, _ = crand.Read(seed[:])
	life, stop := context.WithCancel(context.Background())
	return &Validator{book: book, log: log, cfg: cfg, self: self, rng: rand.New(rand.NewChaCha8(seed)), life: life, stop: stop}
}

// Book is the reputation book the validator records to.
func (v *Validator) Book() *reputation.Book { return v.book }

func (v *Validator) draw() float64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.rng.Float64()
}

// Stats are the validator's counts: calls whose answers were used, extra
// calls made to check them, and results found wrong.
func (v *Validator) Stats() (calls, checks, wrong int64) {
	return v.calls.Load(), v.checks.Load(), v.wrong.Load()
}

// InFlight counts the checks and probes running now.
func (v *Validator) InFlight() int64 { return v.inFlight.Load() }

// Wait waits for the checks in flight.
func (v *Validator) Wait() { v.wg.Wait() }

// Close ends the checks in flight (a call to a peer that died would
// otherwise hold them to their timeout) and waits for them. It is safe to
// call more than once.
func (v *Validator) Close() error {
	v.stop()
	v.wg.Wait()
	return nil
}

// trusted keeps the providers that are not excluded.
func (v *Validator) trusted(ps []peer.ID) (ok, excluded []peer.ID) {
	for _, p := range ps {
		if v.book.Excluded(p) {
			excluded = append(excluded, p)
		} else {
			ok = append(ok, p)
		}
	}
	return ok, excluded
}

// checker is how the validator calls a provider.
type checker func(ctx context.Context, p peer.ID) ([]float32, *neuropb.UsageReceipt, error)

// LocalFunc computes an expert task on the gating node itself, from the
// expert's shard (verified by CID): the judge that colluding peers cannot
// outvote.
//
// While it fetches or loads another expert's shard it answers ErrJudgeBusy
// at once when wait is nil; otherwise it waits its turn (until ctx ends),
// then gets the shard if wait still says so (ErrJudgeBusy if not).
type LocalFunc func(ctx context.Context, model cid.Cid, k expert.Key, in []float32, n int, wait func() bool) ([]float32, error)

// after is called with every answer used: out, computed by used for task
// k. others are the other trusted providers; excluded the excluded ones.
// It starts the checks in the background; a result found wrong is
// reported to the generation's checks (nil: to no generation) as step of
// epoch. receipt gives used's receipt of out (which may come after the
// answer): it is asked for only when a verdict needs it; nil: none.
//
// A peer whose results were never checked (a new one) is checked against
// the gating node's own computation when it has one (v.cfg.Local): two new
// peers that lie alike cannot vouch for each other. A proven peer is
// checked by another provider drawn at random, proven ones first; when
// the two disagree, the local computation decides, or else the most
// proven third provider. Providers that are new and unused, or excluded,
// are probed now and then so that they can earn (back) their place.
//
// weights are the expert's tensor types (the manifest's): they set the
// tolerance (reputation.ToleranceFor), since honest devices differ by type.
func (v *Validator) after(checks *Checks, epoch, step int, model cid.Cid, k expert.Key, weights []model.DType, in []float32, n int,
	used peer.ID, out []float32, receipt func() *neuropb.UsageReceipt, others, excluded []peer.ID, call checker) {
	v.calls.Add(1)
	if receipt == nil {
		receipt = func() *neuropb.UsageReceipt { return nil }
	}
	tol := reputation.ToleranceFor(weights...)
	// local asks the gating node's own judge; wait (LocalFunc's): while it
	// gets another expert's shard, wait for it rather than be told it is
	// busy.
	local := func(bg context.Context, wait func() bool) ([]float32, bool) {
		if v.cfg.Local == nil {
			return nil, false
		}
		ref, err := v.cfg.Local(bg, model, k, in, n, wait)
		if err != nil {
			v.log.Debug("local check", "expert", k.String(), "err", err)
			return nil, false
		}
		return ref, true
	}
	always := func() bool { return true }
	// convict reports a result found wrong: as a verdict, and to the
	// generation when it had used the result.
	convict := func(accused peer.ID, wrong []float32, rc *neuropb.UsageReceipt, judges [2]peer.ID, right []float32, probe bool) {
		v.wrong.Add(1)
		v.log.Warn("expert result found wrong", "peer", accused, "expert", k.String(), "off", RelL2(wrong, right), "probe", probe,
			"pass", step, "epoch", epoch)
		if accused == used && checks != nil {
			checks.bad(epoch, step)
		}
		if v.cfg.OnWrong != nil {
			v.cfg.OnWrong(Verdict{Model: model, Key: k, Input: in, N: n, Accused: accused, Wrong: wrong, Agreeing: judges, Right: right, Receipt: rc, DTypes: weights})
		}
	}

	// Probes of unproven providers, whose answers are not used: new ones
	// often, so that they are vetted soon, excluded ones rarely.
	var unproven []peer.ID
	for _, p := range others {
		if !v.book.Vetted(p) {
			unproven = append(unproven, p)
		}
	}
	rate := v.cfg.ProbeRate
	if len(unproven) == 0 {
		unproven, rate = excluded, v.cfg.ProbeRate/10
	}
	if len(unproven) > 0 && v.draw() < rate {
		x := unproven[int(v.draw()*float64(len(unproven)))%len(unproven)]
		usedProven := v.book.Vetted(used) && !v.book.Excluded(used)
		// A probe cannot change the generation's answer, so the generation
		// does not wait for it: a peer that takes a probe and never answers
		// (a Sybil announcing every expert) held every generation it was
		// probed from to checkWait. A probe answered after its generation
		// was settled goes unpaid, as a late check does.
		v.spawn(nil, func(bg context.Context) {
			ref, judged := local(bg, nil)
			if !judged {
				if !usedProven {
					return // nothing trustworthy to compare with
				}
				ref = out
			}
			got, rc, err := call(bg, x)
			v.checks.Add(1)
			if err != nil {
				return
			}
			if !judged && RelL2(got, ref) > tol {
				// The probe disagrees with a proven peer's answer: the
				// judge decides, once its turn comes, so that a wrong probe
				// is convicted with evidence (a verdict the ledger can
				// slash by) rather than only marked down.
				// Only a node without a judge (a span node's validator)
				// goes by the proven answer alone.
				if v.cfg.Local != nil {
					dec, ok := local(bg, always)
					if !ok {
						// The judge could not decide (its context ended,
						// the shard would not load): no evidence, so no
						// mark against the probed peer either; a later
						// probe decides.
						return
					}
					ref, judged = dec, true
					if RelL2(out, ref) > tol { // the used answer was the wrong one
						v.book.Validated(used, false)
						convict(used, out, receipt(), [2]peer.ID{v.self, v.self}, ref, false)
					}
				}
			}
			ok := RelL2(got, ref) <= tol
			// A verdict on a peer already excluded adds no news.
			was := v.book.Excluded(x)
			v.book.Validated(x, ok)
			if !ok && judged && !was {
				convict(x, got, rc, [2]peer.ID{v.self, v.self}, ref, true)
			}
		})
	}

	if v.draw() >= v.book.CheckRate(used) {
		return
	}
	// byPeers has second compute the task again; when the two disagree,
	// the local judge decides, or else the first of third that answers.
	// It says whether the check was decided.
	byPeers := func(bg context.Context, second peer.ID, third []peer.ID) bool {
		got, rc, err := call(bg, second)
		v.checks.Add(1)
		if err != nil {
			return false // a failed check decides nothing; the call path scores failures
		}
		if RelL2(got, out) <= tol {
			v.book.Validated(used, true)
			v.book.Validated(second, true)
			return true
		}
		dec, decider, ok := []float32(nil), v.self, false
		if dec, ok = local(bg, nil); !ok {
			for _, r := range third {
				if d, _, err := call(bg, r); err == nil {
					v.checks.Add(1)
					dec, decider, ok = d, r, true
					break
				}
			}
		}
		if !ok {
			return false
		}
		agreeUsed, agreeSecond := RelL2(dec, out) <= tol, RelL2(dec, got) <= tol
		switch {
		case agreeSecond && !agreeUsed:
			v.book.Validated(used, false)
			v.book.Validated(second, true)
			if decider != v.self {
				v.book.Validated(decider, true)
			}
			convict(used, out, receipt(), [2]peer.ID{second, decider}, dec, false)
		case agreeUsed && !agreeSecond:
			v.book.Validated(second, false)
			v.book.Validated(used, true)
			if decider != v.self {
				v.book.Validated(decider, true)
			}
			convict(second, got, rc, [2]peer.ID{used, decider}, dec, false)
		default:
			v.log.Info("expert check undecided", "expert", k.String(), "peers", []peer.ID{used, second, decider})
			return false
		}
		return true
	}
	// The checker is drawn at random among the other providers, proven
	// ones first, so that no peer can tell whose answer its own will be
	// compared with (in the check's goroutine, off the generation's path).
	checkers := func() []peer.ID {
		order := slices.Clone(others)
		v.mu.Lock()
		v.rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		v.mu.Unlock()
		slices.SortStableFunc(order, func(a, b peer.ID) int { return v.book.Streak(b) - v.book.Streak(a) })
		return order
	}

	if !v.book.Vetted(used) && v.cfg.Local != nil {
		// A new peer's answer is checked by the local judge. While the
		// judge gets another expert's shard, a proven peer checks it
		// instead (two new peers that lie alike must not vouch for each
		// other); with none, or none that decided, the judge does once it
		// is free. An answer the generation used is never left unchecked
		// because the judge was busy.
		v.spawn(checks, func(bg context.Context) {
			ref, ok := local(bg, nil)
			if !ok {
				proven := slices.DeleteFunc(checkers(), func(p peer.ID) bool { return !v.book.Vetted(p) || v.book.Excluded(p) })
				if len(proven) > 0 && byPeers(bg, proven[0], proven[1:]) {
					return
				}
				// A check that waited for the judge's turn while the peer's
				// first check vetted it is sampled at its rate by then, as
				// answers after it are: an honest new peer's first pass (a
				// prompt's every expert) costs the judge a few shard loads,
				// not one each.
				sampledOut := false
				stillNew := func() bool {
					if v.book.Vetted(used) && !v.book.Excluded(used) && v.draw() >= v.book.CheckRate(used) {
						sampledOut = true
					}
					return !sampledOut
				}
				if ref, ok = local(bg, stillNew); !ok {
					if bg.Err() == nil && !sampledOut {
						v.log.Warn("an answer of a new peer went unchecked: the local judge failed", "peer", used, "expert", k.String())
					}
					return
				}
			}
			v.checks.Add(1)
			if RelL2(out, ref) <= tol {
				v.book.Validated(used, true)
				return
			}
			v.book.Validated(used, false)
			convict(used, out, receipt(), [2]peer.ID{v.self, v.self}, ref, false)
		})
		return
	}
	if len(others) == 0 {
		return
	}
	v.spawn(checks, func(bg context.Context) {
		order := checkers()
		byPeers(bg, order[0], order[1:])
	})
}

// spawn runs a check in the background, counted by the validator and by
// the generation it belongs to.
func (v *Validator) spawn(checks *Checks, f func(context.Context)) {
	v.wg.Add(1)
	v.inFlight.Add(1)
	if checks != nil {
		checks.wg.Add(1)
	}
	go func() {
		defer v.wg.Done()
		if checks != nil {
			defer checks.wg.Done()
		}
		defer v.inFlight.Add(-1) // before the waits above end
		ctx, cancel := context.WithTimeout(v.life, 30*time.Second)
		defer cancel()
		f(ctx)
	}()
}

// Checks follows the checks of one generation: which forward pass used a
// result later found wrong, so that the generation rewinds to it.
//
// A pass is named by its step (the index of the first token it chose) and
// its epoch (the count of rewinds before it). A rewind to step s keeps the
// passes before s: a check of one of those that comes back wrong after the
// rewind still counts (its token is still in the answer), while a check of
// a pass at s or later, which the rewind discarded, no longer does.
type Checks struct {
	wg    sync.WaitGroup
	mu    sync.Mutex
	epoch int
	cuts  []int // cuts[e]: the step that epoch e was rewound to
	first int   // earliest bad step still in the answer, -1 if none
}

// NewChecks makes an empty tracker.
func NewChecks() *Checks { return &Checks{first: -1} }

func (c *Checks) bad(epoch, step int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if epoch < 0 || epoch > c.epoch {
		return
	}
	for _, cut := range c.cuts[epoch:] {
		if step >= cut {
			return // discarded by a rewind since
		}
	}
	if c.first < 0 || step < c.first {
		c.first = step
	}
}

// Bad is the earliest forward pass still in the answer that used a wrong
// result, or -1.
func (c *Checks) Bad() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

// Rewound starts a new epoch after a rewind to step: the checks of the
// passes it discarded (step and later) no longer count, those of the
// passes before it still do. It returns the new epoch.
func (c *Checks) Rewound(step int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cuts = append(c.cuts, step)
	c.epoch++
	if c.first >= step {
		c.first = -1
	}
	return c.epoch
}

// Wait waits for the generation's checks in flight (or ctx).
func (c *Checks) Wait(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		c.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// ExpertWeightTypes returns, for a model's manifest, each expert's tensor
// types (gate, up and down, as its shard lists them), for the tolerance.
func ExpertWeightTypes(man *neuropb.Manifest) func(expert.Key) []model.DType {
	types := map[expert.Key][]model.DType{}
	for _, ref := range man.GetExperts() {
		var ts []model.DType
		for _, t := range ref.GetShard().GetTensors() {
			if strings.HasSuffix(t.GetName(), ".weight") { // not gpt-oss's f32 biases
				ts = append(ts, model.DType(t.GetDtype()))
			}
		}
		types[expert.Key{Layer: int(ref.GetLayer()), Expert: int(ref.GetExpert())}] = ts
	}
	return func(k expert.Key) []model.DType { return types[k] }
}
