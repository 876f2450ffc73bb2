package gating

import (
	"context"
	"fmt"
	"slices"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/span"
)

// spanReExecutor computes a span request again on another provider (as
// span.Chain.ReExecute does), and returns its answer with its receipt for
// the request, if it signed one.
type spanReExecutor func(ctx context.Context, task span.CheckTask, p peer.ID) ([]float32, *neuropb.UsageReceipt, error)

// afterSpan is called with every span answer a generation used: it is
// checked as an expert's answer is (BOINC's adaptive replication), with
// probability the book's check rate for its provider, by another provider
// of the span drawn at random (those never checked first, so that a new
// provider is vetted soon; then the most proven) that recomputes it in a
// session of its own (the span's earlier inputs replayed); when the two
// disagree beyond the tolerance, a third provider decides, and the odd one
// out is recorded as wrong in the book (and so excluded from spans and
// experts alike once its score falls), and reported as a verdict
// (ValidatorConfig.OnWrong) whose task is the span request: its rows, the
// session's earlier rows and their digest chain, on which the accused's
// span receipt is signed (neuropb.SpanRequestDigest), so that the ledger
// can slash on it as on an expert's.
//
// When the answer the generation used is found wrong, the generation's
// checks (nil: none) learn that its step of epoch was wrong, and it
// rewinds there; the chain, told to avoid the provider, recomputes the
// tokens through another.
func (v *Validator) afterSpan(checks *Checks, epoch, step int, task span.CheckTask, others []peer.ID, reexec spanReExecutor) {
	v.calls.Add(1)
	used := task.Provider
	if len(others) == 0 || v.draw() >= v.book.CheckRate(used) {
		return
	}
	order := slices.Clone(others)
	v.mu.Lock()
	v.rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	v.mu.Unlock()
	// Providers never checked first (a check vets them: a liar among them
	// is found out by the third), then the most proven.
	slices.SortStableFunc(order, func(a, b peer.ID) int {
		if va, vb := v.book.Vetted(a), v.book.Vetted(b); va != vb {
			if vb {
				return -1
			}
			return 1
		}
		return v.book.Streak(b) - v.book.Streak(a)
	})
	tol := reputation.Tolerance
	layers := fmt.Sprintf("%d-%d", task.Hop.First, task.Hop.End-1)
	convict := func(accused peer.ID, wrong []float32, rc *neuropb.UsageReceipt, judges [2]peer.ID, right []float32) {
		v.wrong.Add(1)
		v.log.Warn("span result found wrong", "peer", accused, "layers", layers, "pos", task.Pos, "off", RelL2(wrong, right))
		if accused == used && checks != nil {
			checks.bad(epoch, step)
		}
		if v.cfg.OnWrong == nil {
			return
		}
		history, prior := task.History()
		v.cfg.OnWrong(Verdict{Model: task.Model, Key: expert.Key{Layer: task.Hop.First}, Input: task.Input, N: task.Rows,
			Accused: accused, Wrong: wrong, Agreeing: judges, Right: right, Receipt: rc,
			Span: &reputation.SpanTask{End: task.Hop.End, Prior: prior, History: history, Want: task.Want()}})
	}
	v.spawn(checks, func(bg context.Context) {
		second := order[0]
		got, secondRc, err := reexec(bg, task, second)
		v.checks.Add(1)
		if err != nil {
			v.log.Debug("span check failed", "layers", layers, "peer", second, "err", err)
			return // a failed check decides nothing
		}
		if RelL2(got, task.Output) <= tol {
			v.book.Validated(used, true)
			v.book.Validated(second, true)
			return
		}
		for _, third := range order[1:] {
			dec, _, err := reexec(bg, task, third)
			if err != nil {
				continue
			}
			v.checks.Add(1)
			agreeUsed, agreeSecond := RelL2(dec, task.Output) <= tol, RelL2(dec, got) <= tol
			switch {
			case agreeSecond && !agreeUsed:
				v.book.Validated(used, false)
				v.book.Validated(second, true)
				v.book.Validated(third, true)
				convict(used, task.Output, task.Receipt, [2]peer.ID{second, third}, dec)
			case agreeUsed && !agreeSecond:
				v.book.Validated(second, false)
				v.book.Validated(used, true)
				v.book.Validated(third, true)
				convict(second, got, secondRc, [2]peer.ID{used, third}, dec)
			default:
				v.log.Info("span check undecided", "layers", layers, "peers", []peer.ID{used, second, third})
			}
			return
		}
		v.log.Info("span check undecided: no third provider answered", "layers", layers, "peers", []peer.ID{used, second})
	})
}
