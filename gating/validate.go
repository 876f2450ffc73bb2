package gating

import (
	"context"
	crand "crypto/rand"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/reputation"
)

// Tolerance is the relative L2 distance under which two results of the
// same expert task agree. Honest differences measured on this project's
// machines (TestToleranceSeparatesHonestFromCheap): 0 between thread
// counts and between nodes (ggml computes each output row on one thread),
// 2.1e-4 to 2.3e-4 from F16 on the wire; a node that computes in Q4_0
// instead of the shard's Q8_0 or F16 is 0.15 off. 1e-2 sits 40x above
// the first and 15x below the second.
const Tolerance = 1e-2

// RelL2 is ||a - b|| / ||b||: how far a is from the reference b. Lengths
// that differ, or a NaN or Inf anywhere, are infinitely far.
func RelL2(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var num, den float64
	for i := range a {
		d := float64(a[i]) - float64(b[i])
		num += d * d
		den += float64(b[i]) * float64(b[i])
	}
	if math.IsNaN(num) || math.IsInf(num, 0) || math.IsNaN(den) || math.IsInf(den, 0) {
		return math.Inf(1)
	}
	if den == 0 {
		if num == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return math.Sqrt(num / den)
}

// Validator re-executes a sample of expert calls on other providers after
// their answers have been used (BOINC's quorum, adapted to low latency):
// each answer from peer p is checked with probability book.CheckRate(p),
// drawn from a generator the peers cannot predict. When the second
// provider disagrees a third decides, and the odd one out is recorded as
// wrong. Excluded peers are probed now and then with answers that are not
// used, and re-admitted after a run of valid ones.
type Validator struct {
	Book *reputation.Book
	Log  *slog.Logger
	// ProbeRate is the chance that a call also probes one excluded
	// provider of its expert.
	ProbeRate float64
	// OnWrong, if set, is told of each result found wrong, with the task
	// and the results that outvoted it (a verdict).
	OnWrong func(Verdict)

	mu  sync.Mutex
	rng *rand.Rand

	calls, checks, wrong atomic.Int64
	wg                   sync.WaitGroup
}

// Verdict is a decided disagreement: Accused's output for the task was
// outvoted by two others that agreed.
type Verdict struct {
	Key      expert.Key
	Input    []float32
	N        int
	Accused  peer.ID
	Wrong    []float32
	Agreeing [2]peer.ID
	Right    []float32
}

// NewValidator makes a validator over book.
func NewValidator(book *reputation.Book, log *slog.Logger) *Validator {
	if log == nil {
		log = slog.Default()
	}
	var seed [32]byte
	_, _ = crand.Read(seed[:])
	return &Validator{Book: book, Log: log, ProbeRate: 0.02, rng: rand.New(rand.NewChaCha8(seed))}
}

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

// Wait waits for the checks in flight.
func (v *Validator) Wait() { v.wg.Wait() }

// trusted keeps the providers that are not excluded.
func (v *Validator) trusted(ps []peer.ID) (ok, excluded []peer.ID) {
	for _, p := range ps {
		if v.Book.Excluded(p) {
			excluded = append(excluded, p)
		} else {
			ok = append(ok, p)
		}
	}
	return ok, excluded
}

// checker is how the validator calls a provider.
type checker func(ctx context.Context, p peer.ID) ([]float32, error)

// after is called with every answer used: out, computed by used for task
// k. others are the other trusted providers, best first; excluded the
// excluded ones. It starts the check in the background; a result found
// wrong is reported to the generation through ctx's Checks.
func (v *Validator) after(ctx context.Context, k expert.Key, in []float32, n int, used peer.ID, out []float32,
	others, excluded []peer.ID, call checker) {
	v.calls.Add(1)
	checks := checksFrom(ctx)
	epoch, step := stepFrom(ctx)
	if len(excluded) > 0 && v.draw() < v.ProbeRate {
		x := excluded[int(v.draw()*float64(len(excluded)))%len(excluded)]
		v.spawn(checks, func(bg context.Context) {
			got, err := call(bg, x)
			v.checks.Add(1)
			if err != nil {
				return
			}
			v.Book.Validated(x, RelL2(got, out) <= Tolerance)
		})
	}
	if len(others) == 0 || v.draw() >= v.Book.CheckRate(used) {
		return
	}
	// The checker is drawn at random among the other providers, so that
	// no peer can tell which of its answers will be compared with whose,
	// and standby providers get checked too.
	// Providers never checked go first: each new peer is vetted by its
	// first checks, whether or not it is selected.
	order := slices.Clone(others)
	v.mu.Lock()
	v.rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	v.mu.Unlock()
	slices.SortStableFunc(order, func(a, b peer.ID) int {
		va, vb := v.Book.Vetted(a), v.Book.Vetted(b)
		switch {
		case !va && vb:
			return -1
		case va && !vb:
			return 1
		}
		return 0
	})
	second := order[0]
	// The decider is the most proven peer: new peers, which might collude
	// with a new checker, decide only when no proven one is left.
	third := slices.Clone(order[1:])
	slices.SortStableFunc(third, func(a, b peer.ID) int { return v.Book.Streak(b) - v.Book.Streak(a) })
	v.spawn(checks, func(bg context.Context) {
		got, err := call(bg, second)
		v.checks.Add(1)
		if err != nil {
			return // a failed check decides nothing; the call path scores failures
		}
		if RelL2(got, out) <= Tolerance {
			v.Book.Validated(used, true)
			v.Book.Validated(second, true)
			return
		}
		for _, r := range third {
			dec, err := call(bg, r)
			v.checks.Add(1)
			if err != nil {
				continue
			}
			agreeUsed, agreeSecond := RelL2(dec, out) <= Tolerance, RelL2(dec, got) <= Tolerance
			switch {
			case agreeSecond && !agreeUsed:
				v.wrong.Add(1)
				v.Book.Validated(used, false)
				v.Book.Validated(second, true)
				v.Book.Validated(r, true)
				v.Log.Warn("expert result found wrong", "peer", used, "expert", k.String(), "off", RelL2(out, dec))
				if checks != nil {
					checks.bad(epoch, step)
				}
				if v.OnWrong != nil {
					v.OnWrong(Verdict{Key: k, Input: in, N: n, Accused: used, Wrong: out, Agreeing: [2]peer.ID{second, r}, Right: dec})
				}
			case agreeUsed && !agreeSecond:
				v.wrong.Add(1)
				v.Book.Validated(second, false)
				v.Book.Validated(used, true)
				v.Book.Validated(r, true)
				v.Log.Warn("expert result found wrong", "peer", second, "expert", k.String(), "off", RelL2(got, dec))
				if v.OnWrong != nil {
					v.OnWrong(Verdict{Key: k, Input: in, N: n, Accused: second, Wrong: got, Agreeing: [2]peer.ID{used, r}, Right: dec})
				}
			default:
				v.Log.Info("expert check undecided", "expert", k.String(), "peers", []peer.ID{used, second, r})
			}
			return
		}
	})
}

// spawn runs a check in the background, counted by the validator and by
// the generation it belongs to.
func (v *Validator) spawn(checks *Checks, f func(context.Context)) {
	v.wg.Add(1)
	if checks != nil {
		checks.wg.Add(1)
	}
	go func() {
		defer v.wg.Done()
		if checks != nil {
			defer checks.wg.Done()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		f(ctx)
	}()
}

// Checks follows the checks of one generation: which forward pass used a
// result later found wrong, so that the generation rewinds to it.
type Checks struct {
	wg    sync.WaitGroup
	mu    sync.Mutex
	epoch int
	first int // earliest bad step of the current epoch, -1 if none
}

// NewChecks makes an empty tracker.
func NewChecks() *Checks { return &Checks{first: -1} }

func (c *Checks) bad(epoch, step int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if epoch == c.epoch && (c.first < 0 || step < c.first) {
		c.first = step
	}
}

// Bad is the earliest forward pass of the current epoch that used a wrong
// result, or -1.
func (c *Checks) Bad() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

// Rewound starts a new epoch: the checks of passes from before the rewind
// no longer count.
func (c *Checks) Rewound() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.epoch++
	c.first = -1
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

type checksKey struct{}
type stepKey struct{}

type stepVal struct{ epoch, step int }

// WithChecks returns a context whose expert calls report to c.
func WithChecks(ctx context.Context, c *Checks) context.Context {
	return context.WithValue(ctx, checksKey{}, c)
}

// WithStep marks the forward pass that ctx's calls belong to.
func WithStep(ctx context.Context, epoch, step int) context.Context {
	return context.WithValue(ctx, stepKey{}, stepVal{epoch, step})
}

func checksFrom(ctx context.Context) *Checks {
	c, _ := ctx.Value(checksKey{}).(*Checks)
	return c
}

func stepFrom(ctx context.Context) (int, int) {
	s, _ := ctx.Value(stepKey{}).(stepVal)
	return s.epoch, s.step
}
