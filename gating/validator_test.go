package gating

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/span"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// A check waiting on a peer that will never answer (one SIGKILLed
// mid-generation) ends when the validator closes, cancelled, rather than
// holding the node's shutdown to the check's timeout.
func TestValidatorCloseEndsChecksInFlight(t *testing.T) {
	v := NewValidator("self", nil, ValidatorConfig{}, nil)
	started := make(chan struct{})
	ended := make(chan error, 1)
	v.spawn(nil, func(ctx context.Context) {
		close(started)
		<-ctx.Done()
		ended <- ctx.Err()
	})
	<-started
	v.Close()
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Fatalf("check ended with %v, want it cancelled by Close", err)
	}
}

// Span answers are checked as experts' are: a new provider's answer is
// always re-executed on another provider of the span; when that one
// disagrees, a third decides, and the odd one out is booked as wrong (its
// answer excluded from later plans once its score falls); a check that
// agrees validates both.
func TestValidatorChecksSpans(t *testing.T) {
	book, err := reputation.Open(reputation.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	verdicts := make(chan Verdict, 4)
	v := NewValidator("self", book, ValidatorConfig{OnWrong: func(w Verdict) { verdicts <- w }}, quiet())
	defer v.Close()
	right := []float32{1, 2, 3, 4}
	answers := map[peer.ID][]float32{"honest-1": right, "honest-2": right, "liar": {1, 2, 3, 40}}
	reexec := func(_ context.Context, _ span.CheckTask, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
		if a, ok := answers[p]; ok {
			return a, nil, nil
		}
		return nil, nil, errors.New("no such provider")
	}
	hop := span.Hop{First: 0, End: 4, Providers: []peer.ID{"liar", "honest-1", "honest-2"}}

	// The liar's answer, used: honest-1 or honest-2 disagrees, the other decides.
	checks := NewChecks()
	v.afterSpan(checks, 0, 3, span.CheckTask{Hop: hop, Provider: "liar", Output: answers["liar"]}, []peer.ID{"honest-1", "honest-2"}, reexec)
	v.Wait()
	if bad := checks.Bad(); bad != 3 {
		t.Fatalf("the generation's checks say step %d was wrong, want 3 (the liar's answer was used)", bad)
	}
	// It is reported as a verdict on the span request, for the ledger.
	select {
	case w := <-verdicts:
		if w.Accused != "liar" || w.Span == nil || w.Span.End != 4 || w.Key.Layer != 0 || w.Right[3] != 4 || w.Wrong[3] != 40 || w.Span.Prior != neuropb.SpanChainStart() {
			t.Fatalf("verdict %+v (span %+v)", w, w.Span)
		}
	default:
		t.Fatal("no verdict reported")
	}
	if calls, checks, wrong := v.Stats(); calls != 1 || checks != 2 || wrong != 1 {
		t.Fatalf("stats: %d calls, %d checks, %d wrong", calls, checks, wrong)
	}
	for p, want := range map[peer.ID][2]uint64{"liar": {1, 1}, "honest-1": {1, 0}, "honest-2": {1, 0}} {
		r := book.Snapshot()
		var got [2]uint64
		for _, e := range r {
			if e.Peer == p {
				got = [2]uint64{e.Checked, e.Failed}
			}
		}
		if got != want {
			t.Errorf("%s: checked %d, failed %d; want %v", p, got[0], got[1], want)
		}
	}

	// An honest answer checked by the liar alone (if drawn: a peer once
	// validated is checked half the time): no third provider decides, and
	// nothing is booked as wrong.
	v.afterSpan(nil, 0, 0, span.CheckTask{Hop: hop, Provider: "honest-1", Output: right}, []peer.ID{"liar"}, reexec)
	v.Wait()
	if _, _, wrong := v.Stats(); wrong != 1 {
		t.Fatalf("%d found wrong: with no third provider to decide, the check is undecided", wrong)
	}
}

// A generation waits for the checks of the answers it used, not for the
// probes of providers it did not use: those cannot change its answer, and
// a peer that takes a probe and never answers (a Sybil announcing every
// expert) held every generation it was probed from to checkWait.
func TestProbesDoNotHoldTheGeneration(t *testing.T) {
	book, err := reputation.Open(reputation.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	right := []float32{1, 2, 3, 4}
	v := NewValidator("self", book, ValidatorConfig{ProbeRate: 1, Local: func(context.Context, cid.Cid, expert.Key, []float32, int, func() bool) ([]float32, error) {
		return right, nil
	}}, quiet())
	defer v.Close()
	release := make(chan struct{})
	probed, probeEnded := make(chan struct{}), make(chan struct{})
	call := func(ctx context.Context, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
		if p != "stall" {
			return nil, nil, errors.New("no such provider")
		}
		close(probed)
		defer close(probeEnded)
		select { // takes the probe, never answers until released
		case <-release:
		case <-ctx.Done():
		}
		return nil, nil, errors.New("stalled")
	}
	checks := NewChecks()
	// "used" is new: the local judge checks its answer, and the probe goes
	// to "stall", never checked yet (ProbeRate 1).
	v.after(checks, 0, 0, cid.Cid{}, expert.Key{Layer: 1, Expert: 2}, nil, right, 1, "used", right, nil, []peer.ID{"stall"}, nil, call)
	<-probed
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	checks.Wait(ctx)
	select {
	case <-probeEnded:
		t.Fatal("the generation waited for a probe of a provider it did not use")
	default:
	}
	if !book.Vetted("used") || checks.Bad() != -1 {
		t.Fatalf("the used answer's own check: vetted %v, bad step %d", book.Vetted("used"), checks.Bad())
	}
	if n := v.InFlight(); n != 1 {
		t.Fatalf("%d checks in flight while the probe stalls, want 1", n)
	}
	close(release)
	v.Wait()
	if n := v.InFlight(); n != 0 {
		t.Fatalf("%d checks in flight after all ended", n)
	}
	if _, n, _ := v.Stats(); n != 2 {
		t.Fatalf("%d checks, want the local check and the probe", n)
	}
}

// A rewind discards the passes from its step on, not the ones before it:
// a check of an earlier pass that comes back wrong after the rewind still
// rewinds the generation to that pass (a slow local check of the prompt's
// pass, beaten by a quick one of the next pass, once left a wrong first
// token in the answer), while a check of a discarded pass no longer counts.
func TestChecksKeepTheirPassAcrossARewind(t *testing.T) {
	c := NewChecks()
	c.bad(0, 3) // the check of pass 3 comes back first
	if bad := c.Bad(); bad != 3 {
		t.Fatalf("bad %d, want 3", bad)
	}
	e := c.Rewound(3)
	if e != 1 || c.Bad() != -1 {
		t.Fatalf("after the rewind: epoch %d, bad %d", e, c.Bad())
	}
	c.bad(0, 5) // pass 5 of epoch 0 was discarded by the rewind to 3
	if bad := c.Bad(); bad != -1 {
		t.Fatalf("a discarded pass's check counted: bad %d", bad)
	}
	c.bad(0, 0) // the prompt's pass, kept by the rewind to 3
	if bad := c.Bad(); bad != 0 {
		t.Fatalf("a kept pass's check was dropped: bad %d, want 0", bad)
	}
	e = c.Rewound(0)
	c.bad(1, 2) // epoch 1's pass 2, discarded by the rewind to 0
	c.bad(0, 1) // epoch 0's pass 1, discarded by it too
	if bad := c.Bad(); e != 2 || bad != -1 {
		t.Fatalf("epoch %d, bad %d after checks of discarded passes", e, bad)
	}
	c.bad(2, 4)
	c.bad(2, 1)
	if bad := c.Bad(); bad != 1 {
		t.Fatalf("bad %d, want the earliest of the current epoch's, 1", bad)
	}
}

// A used answer of a new peer is checked even while the local judge is
// busy getting another expert's shard: a proven peer checks it, or else
// the judge once its turn comes. (A check that the busy judge answered
// decided nothing, and a wrong answer of a new peer in a generation's
// first pass stayed in the answer.) Two new peers that agree do not vouch
// for each other.
func TestBusyJudgeLeavesNoAnswerUnchecked(t *testing.T) {
	right, wrong := []float32{1, 2, 3, 4}, []float32{1, 2, 3, 40}
	for _, tc := range []struct {
		name   string
		out    []float32
		others []peer.ID
		// what the check must find, and whether the judge was waited for
		bad    int
		waited bool
	}{
		{"liar, a proven peer checks", wrong, []peer.ID{"proven"}, 3, true}, // the proven peer disagrees; the judge decides
		{"honest, a proven peer checks", right, []peer.ID{"proven"}, -1, false},
		{"liar, no other provider", wrong, nil, 3, true},
		{"liar, a new peer that lies alike", wrong, []peer.ID{"alike"}, 3, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			book, err := reputation.Open(reputation.DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			book.Validated("proven", true)
			var waits int
			v := NewValidator("self", book, ValidatorConfig{ProbeRate: 1e-9,
				Local: func(_ context.Context, _ cid.Cid, _ expert.Key, _ []float32, _ int, wait func() bool) ([]float32, error) {
					if wait == nil || !wait() {
						return nil, ErrJudgeBusy
					}
					waits++
					return right, nil
				}}, quiet())
			defer v.Close()
			call := func(_ context.Context, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
				switch p {
				case "proven":
					return right, nil, nil
				case "alike":
					return wrong, nil, nil
				}
				return nil, nil, errors.New("no such provider")
			}
			checks := NewChecks()
			v.after(checks, 0, 3, cid.Cid{}, expert.Key{Layer: 1, Expert: 2}, nil, right, 1, "new", tc.out, nil, tc.others, nil, call)
			v.Wait()
			if bad := checks.Bad(); bad != tc.bad {
				t.Errorf("bad pass %d, want %d", bad, tc.bad)
			}
			if (waits > 0) != tc.waited {
				t.Errorf("the judge was waited for %d times, want %v", waits, tc.waited)
			}
			if !book.Vetted("new") {
				t.Error("the new peer's answer was not decided")
			}
		})
	}
}

// A probe that disagrees with a proven peer's answer while the judge is
// busy is decided by the judge once its turn comes, and a wrong one is
// convicted with a verdict: marked down on the proven answer alone, a
// faulty node was excluded without the evidence the ledger slashes by.
func TestBusyJudgeDecidesADisagreeingProbe(t *testing.T) {
	right, wrong := []float32{1, 2, 3, 4}, []float32{1, 2, 3, 40}
	book, err := reputation.Open(reputation.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	for range 20 { // checked rarely: this test is about the probe
		book.Validated("used", true)
	}
	verdicts := make(chan Verdict, 4)
	v := NewValidator("self", book, ValidatorConfig{ProbeRate: 1, OnWrong: func(w Verdict) { verdicts <- w },
		Local: func(_ context.Context, _ cid.Cid, _ expert.Key, _ []float32, _ int, wait func() bool) ([]float32, error) {
			if wait == nil || !wait() {
				return nil, ErrJudgeBusy
			}
			return right, nil
		}}, quiet())
	defer v.Close()
	call := func(_ context.Context, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
		if p == "liar" {
			return wrong, &neuropb.UsageReceipt{Escrow: 7}, nil
		}
		return nil, nil, errors.New("no such provider")
	}
	v.after(nil, 0, 0, cid.Cid{}, expert.Key{Layer: 1, Expert: 2}, nil, right, 1, "used", right, nil, []peer.ID{"liar"}, nil, call)
	v.Wait()
	select {
	case w := <-verdicts:
		if w.Accused != "liar" || w.Receipt.GetEscrow() != 7 || w.Right[3] != 4 {
			t.Fatalf("verdict %+v", w)
		}
	default:
		t.Fatal("the wrong probe was not convicted")
	}
	if len(verdicts) != 0 {
		t.Fatalf("%d more verdicts: the used answer was right", len(verdicts))
	}
}

// A probe that disagrees with a proven answer while the judge cannot
// decide (it fails even when waited for) leaves the probed peer as it
// was: no verdict and no mark against it without evidence. A validator
// without a judge (a span node's) goes by the proven answer alone.
func TestUndecidedProbeMarksNothing(t *testing.T) {
	right, wrong := []float32{1, 2, 3, 4}, []float32{1, 2, 3, 40}
	for _, c := range []struct {
		name      string
		judge     bool
		wantMarks bool
	}{{"judge fails", true, false}, {"no judge", false, true}} {
		t.Run(c.name, func(t *testing.T) {
			book, err := reputation.Open(reputation.DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			for range 20 {
				book.Validated("used", true)
			}
			verdicts := make(chan Verdict, 4)
			cfg := ValidatorConfig{ProbeRate: 1, OnWrong: func(w Verdict) { verdicts <- w }}
			judged := 0
			if c.judge {
				cfg.Local = func(ctx context.Context, _ cid.Cid, _ expert.Key, _ []float32, _ int, wait func() bool) ([]float32, error) {
					if wait != nil {
						judged++
					}
					return nil, errors.New("shard would not load")
				}
			}
			v := NewValidator("self", book, cfg, quiet())
			defer v.Close()
			call := func(_ context.Context, p peer.ID) ([]float32, *neuropb.UsageReceipt, error) {
				if p == "new" {
					return wrong, &neuropb.UsageReceipt{Escrow: 7}, nil
				}
				return nil, nil, errors.New("no such provider")
			}
			v.after(nil, 0, 0, cid.Cid{}, expert.Key{Layer: 1, Expert: 2}, nil, right, 1, "used", right, nil, []peer.ID{"new"}, nil, call)
			v.Wait()
			if len(verdicts) != 0 {
				t.Fatalf("%d verdicts without a judge's decision", len(verdicts))
			}
			if c.judge && judged != 1 {
				t.Fatalf("the judge was asked to decide %d times, want 1", judged)
			}
			if marked := book.Vetted("new"); marked != c.wantMarks {
				t.Fatalf("probed peer marked: %v, want %v", marked, c.wantMarks)
			}
			if !book.Vetted("used") || book.Excluded("used") {
				t.Fatal("the proven peer lost its standing")
			}
		})
	}
}

// A check that waited for the judge's turn while its peer's first check
// vetted it is sampled at the peer's rate by then: it gets no shard when
// the draw says so, and it is not reported as unchecked.
func TestWaitingCheckIsSampledOnceThePeerIsVetted(t *testing.T) {
	cfg := reputation.DefaultConfig()
	cfg.CheckFloor = 1e-9
	book, err := reputation.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	right := []float32{1, 2, 3, 4}
	var waited, loads int
	v := NewValidator("self", book, ValidatorConfig{ProbeRate: 1e-9,
		Local: func(_ context.Context, _ cid.Cid, _ expert.Key, _ []float32, _ int, wait func() bool) ([]float32, error) {
			if wait == nil {
				return nil, ErrJudgeBusy
			}
			waited++
			for range 1000 { // the peer's first check, decided meanwhile
				book.Validated("new", true)
			}
			if !wait() {
				return nil, ErrJudgeBusy
			}
			loads++
			return right, nil
		}}, quiet())
	defer v.Close()
	v.rng = rand.New(rand.NewChaCha8([32]byte{1})) // draws known: none under 1/1001
	checks := NewChecks()
	v.after(checks, 0, 0, cid.Cid{}, expert.Key{Layer: 1, Expert: 2}, nil, right, 1, "new", right, nil, nil, nil, nil)
	v.Wait()
	if waited != 1 || loads != 0 || checks.Bad() != -1 {
		t.Fatalf("waited %d, loaded %d, bad %d; want 1, 0, -1", waited, loads, checks.Bad())
	}
}
