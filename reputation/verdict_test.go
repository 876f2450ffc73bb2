package reputation

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/ipfs/go-cid"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/sign"
)

func newPeer(t testing.TB) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(k)
	return k, id
}

// resign signs v again as its judge, after a change.
func resign(t *testing.T, key crypto.PrivKey, v *neuropb.Verdict) {
	t.Helper()
	v.Signature = nil
	var err error
	if v.Signature, err = sign.Sign(key, sign.Verdict, v); err != nil {
		t.Fatal(err)
	}
}

func TestVerdicts(t *testing.T) {
	judgeKey, judge := newPeer(t)
	accusedKey, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1}
	right := []float32{0.5, 0.25, -1, 2}
	wrong := []float32{0.75, 0.375, -1.5, 3}
	receipt := &neuropb.UsageReceipt{Layer: 1, ExpertIndex: 2, Tokens: 1, InputDigest: neuropb.FloatsDigest(task.Input),
		OutputDigest: neuropb.FloatsDigest(wrong)}
	if err := SignReceipt(accusedKey, receipt); err != nil {
		t.Fatal(err)
	}
	v, err := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, receipt, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	gotTask, gotAccused, gotWrong, gotRight, err := VerifyVerdict(v)
	if err != nil || gotAccused != accused || gotTask.Layer != 1 || gotTask.N != 1 || gotWrong[3] != 3 || gotRight[2] != -1 {
		t.Fatalf("verify: %v %+v", err, gotTask)
	}

	// Tampering with any field breaks the signature or a digest.
	for name, tamper := range map[string]func(*neuropb.Verdict){
		"accused":   func(v *neuropb.Verdict) { v.Accused = []byte(a1) },
		"layer":     func(v *neuropb.Verdict) { v.Layer = 7 },
		"input":     func(v *neuropb.Verdict) { v.Input.Data[0] ^= 1 },
		"signature": func(v *neuropb.Verdict) { v.Signature[3] ^= 1 },
		"digest":    func(v *neuropb.Verdict) { v.ReferenceDigest[0] ^= 1 },
		"judge": func(v *neuropb.Verdict) {
			_, other := newPeer(t)
			v.Judge = []byte(other)
		},
		// Re-signed by the judge, but the accused's receipt does not bind it.
		"receipt for another output": func(v *neuropb.Verdict) {
			v.AccusedReceipt.OutputDigest = neuropb.FloatsDigest(right)
			_ = SignReceipt(accusedKey, v.AccusedReceipt)
			resign(t, judgeKey, v)
		},
		"receipt signed by another": func(v *neuropb.Verdict) {
			k, _ := newPeer(t)
			_ = SignReceipt(k, v.AccusedReceipt)
			resign(t, judgeKey, v)
		},
		"receipt signature": func(v *neuropb.Verdict) {
			v.AccusedReceipt.Signature[0] ^= 1
			resign(t, judgeKey, v)
		},
	} {
		c := cloneVerdict(v)
		tamper(c)
		if _, _, _, _, err := VerifyVerdict(c); !errors.Is(err, neuropb.ErrInvalid) {
			t.Errorf("tampered %s: error %v", name, err)
		}
	}
	// Outputs that agree convict no one; without the accused's receipt a
	// verdict is still well-formed (the ledger, not gossip, demands it).
	same, _ := NewVerdict(judgeKey, task, accused, right, [2]peer.ID{a1, a2}, right, nil, time.Now())
	if _, _, _, _, err := VerifyVerdict(same); !errors.Is(err, neuropb.ErrInvalid) {
		t.Errorf("a verdict whose outputs agree: %v", err)
	}
	bare, _ := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Now())
	if _, _, _, _, err := VerifyVerdict(bare); err != nil {
		t.Errorf("a verdict without a receipt: %v", err)
	}

	// A node that re-runs the task and gets the reference confirms the
	// verdict; one that gets the accused's output refutes it and marks
	// the judge down.
	book, _ := Open(Config{})
	rerunRight := func(Task) ([]float32, error) { return right, nil }
	if o := book.Judge(v, gotTask, gotAccused, gotWrong, gotRight, rerunRight); o != Confirmed || !book.Excluded(accused) {
		t.Fatalf("confirmed verdict: %v, accused excluded %v", o, book.Excluded(accused))
	}
	book2, _ := Open(Config{})
	before := book2.Score(judge)
	rerunWrong := func(Task) ([]float32, error) { return wrong, nil }
	if o := book2.Judge(v, gotTask, gotAccused, gotWrong, gotRight, rerunWrong); o != Refuted || book2.Score(judge) >= before || book2.Excluded(accused) {
		t.Fatalf("refuted verdict: %v, judge score %v -> %v", o, before, book2.Score(judge))
	}
	if o := book2.Judge(v, gotTask, gotAccused, gotWrong, gotRight, nil); o != Unchecked {
		t.Fatalf("no re-run: %v", o)
	}
}

func cloneVerdict(v *neuropb.Verdict) *neuropb.Verdict { return proto.Clone(v).(*neuropb.Verdict) }

// The tolerance follows the expert's weight types: an output 5% off the
// reference convicts an F16 expert's node but not a Q4_K one's, whose
// honest results differ by up to 2.3% between devices; a verdict names the
// types, and a forged list is refused.
func TestVerdictToleranceByType(t *testing.T) {
	if got := ToleranceFor(); got != Tolerance {
		t.Fatalf("no types: %g, want Tolerance", got)
	}
	if ToleranceFor(model.Q4_K, model.Q4_K, model.Q6_K) != tolerances[model.Q6_K] || ToleranceFor(model.F16, model.Q8_0) != tolerances[model.Q8_0] {
		t.Fatal("an expert's tolerance is not the largest of its types'")
	}
	for dt, tol := range tolerances {
		if tol < Tolerance/10 || tol > 0.2 {
			t.Errorf("%s: tolerance %g out of the measured range", dt, tol)
		}
	}
	judgeKey, _ := newPeer(t)
	_, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	right := []float32{1, 1, 1, 1}
	wrong := []float32{1.1, 1, 1, 1} // 5% off
	for _, c := range []struct {
		types   []model.DType
		convict bool
	}{{nil, true}, {[]model.DType{model.F16, model.F16, model.F16}, true}, {[]model.DType{model.Q4_K, model.Q4_K, model.Q6_K}, false}} {
		task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1, DTypes: c.types}
		v, err := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		got, _, _, _, err := VerifyVerdict(v)
		if (err == nil) != c.convict {
			t.Errorf("types %v: verify %v, want a conviction %v", c.types, err, c.convict)
		}
		if err == nil && len(got.DTypes) != len(c.types) {
			t.Errorf("types %v: the verdict gave back %v", c.types, got.DTypes)
		}
	}
	task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1}
	for name, types := range map[string][]uint32{"four types": {1, 1, 1, 1}, "unknown type": {1, 9999, 1}} {
		v, _ := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Now())
		v.WeightDtypes = types
		resign(t, judgeKey, v)
		if _, _, _, _, err := VerifyVerdict(v); !errors.Is(err, neuropb.ErrInvalid) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A node whose manifest lists other weight types than the verdict names
// refutes it: the judge signed a false tolerance.
func TestJudgeRefutesFalseWeightTypes(t *testing.T) {
	judgeKey, judge := newPeer(t)
	_, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1,
		DTypes: []model.DType{model.F16, model.F16, model.F16}}
	v, err := NewVerdict(judgeKey, task, accused, []float32{1.1, 1, 1, 1}, [2]peer.ID{a1, a2}, []float32{1, 1, 1, 1}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	gotTask, gotAccused, wrong, right, err := VerifyVerdict(v)
	if err != nil {
		t.Fatal(err)
	}
	book, _ := Open(Config{})
	before := book.Score(judge)
	lie := func(Task) ([]float32, error) { return nil, fmt.Errorf("types differ: %w", ErrWrongWeightTypes) }
	if o := book.Judge(v, gotTask, gotAccused, wrong, right, lie); o != Refuted || book.Score(judge) >= before || book.Excluded(accused) {
		t.Fatalf("a verdict with false types: %v, judge %v -> %v", o, before, book.Score(judge))
	}
}

// A span verdict convicts a span request: its rows after the session's
// earlier ones, whose digest chain the accused's span receipt signs. The
// earlier rows travel with it (so that a node serving the span can re-run
// it) and must chain to the digest; the receipt must be a span receipt of
// the same layers for the same session and request; an expert's receipt or
// verdict cannot stand in for it, nor the reverse.
func TestSpanVerdicts(t *testing.T) {
	judgeKey, _ := newPeer(t)
	accusedKey, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	const embd = 4
	history := []float32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12} // 3 earlier rows
	prior := neuropb.SpanChainStart().Next(history, embd)
	in := []float32{0.5, -0.5, 1, 2, 3, 1, 0, -1} // the request's 2 rows
	right := []float32{1, 1, 1, 1, 2, 2, 2, 2}
	wrong := []float32{1, 1, 1, 1, 2, 2, 2, 3}
	task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 2, Input: in, N: 2,
		Span: &SpanTask{End: 6, Prior: prior, History: history, Want: neuropb.SpanWant_SPAN_WANT_ALL}}
	// What a span node signs (span.Server): the chain before the request.
	receipt := &neuropb.UsageReceipt{Layer: 2, SpanEnd: 6, Tokens: 2,
		InputDigest: neuropb.SpanRequestDigest(prior, neuropb.SpanWant_SPAN_WANT_ALL, prior.Next(in, embd)), OutputDigest: neuropb.FloatsDigest(wrong)}
	if err := SignReceipt(accusedKey, receipt); err != nil {
		t.Fatal(err)
	}
	v, err := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, receipt, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	got, gotAccused, _, _, err := VerifyVerdict(v)
	if err != nil || gotAccused != accused || got.Span == nil || got.Span.End != 6 || got.Span.Prior != prior || len(got.Span.History) != len(history) {
		t.Fatalf("verify: %v %+v", err, got.Span)
	}
	// The chain is per row: the same rows sent in other batches chain
	// alike, so a replay or a rewind does not change the digests.
	if neuropb.SpanChainStart().Next(history[:4], embd).Next(history[4:], embd) != prior {
		t.Fatal("the chain depends on how the rows were batched")
	}

	for name, tamper := range map[string]func(*neuropb.Verdict){
		"history not chaining": func(v *neuropb.Verdict) { v.SpanHistory.Data[5] ^= 1; resign(t, judgeKey, v) },
		"another prior": func(v *neuropb.Verdict) {
			other := neuropb.SpanChainStart().Next(history[:8], embd)
			v.SpanPrior = other[:]
			v.SpanHistory = nil
			resign(t, judgeKey, v)
		},
		"another want":  func(v *neuropb.Verdict) { v.SpanWant = neuropb.SpanWant_SPAN_WANT_EACH; resign(t, judgeKey, v) },
		"another end":   func(v *neuropb.Verdict) { v.SpanEnd = 5; resign(t, judgeKey, v) },
		"empty span":    func(v *neuropb.Verdict) { v.SpanEnd = 2; resign(t, judgeKey, v) },
		"an expert":     func(v *neuropb.Verdict) { v.Expert = 1; resign(t, judgeKey, v) },
		"short prior":   func(v *neuropb.Verdict) { v.SpanPrior = v.SpanPrior[:31]; resign(t, judgeKey, v) },
		"unknown want":  func(v *neuropb.Verdict) { v.SpanWant = 9; resign(t, judgeKey, v) },
		"input":         func(v *neuropb.Verdict) { v.Input.Data[0] ^= 1; resign(t, judgeKey, v) },
		"weight types":  func(v *neuropb.Verdict) { v.WeightDtypes = []uint32{8}; resign(t, judgeKey, v) },
		"history shape": func(v *neuropb.Verdict) { v.SpanHistory.Shape = []uint32{6, 2}; resign(t, judgeKey, v) },
		"last row only": func(v *neuropb.Verdict) { v.AccusedOutput.Shape = []uint32{1, 8}; resign(t, judgeKey, v) },
		"the signature": func(v *neuropb.Verdict) { v.Signature[0] ^= 1 },
		"an expert's receipt": func(v *neuropb.Verdict) {
			v.AccusedReceipt.SpanEnd = 0
			_ = SignReceipt(accusedKey, v.AccusedReceipt)
			resign(t, judgeKey, v)
		},
		// The receipt of the same rows in a session that had sent other
		// rows before: another request.
		"receipt of another session": func(v *neuropb.Verdict) {
			v.AccusedReceipt.InputDigest = neuropb.SpanRequestDigest(neuropb.SpanChainStart(), neuropb.SpanWant_SPAN_WANT_ALL, neuropb.SpanChainStart().Next(in, embd))
			_ = SignReceipt(accusedKey, v.AccusedReceipt)
			resign(t, judgeKey, v)
		},
	} {
		c := cloneVerdict(v)
		tamper(c)
		if _, _, _, _, err := VerifyVerdict(c); !errors.Is(err, neuropb.ErrInvalid) {
			t.Errorf("tampered %s: error %v", name, err)
		}
	}
	// Span fields on an expert's verdict are refused.
	ev, _ := NewVerdict(judgeKey, Task{Model: task.Model, Layer: 2, Expert: 1, Input: in, N: 2}, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Now())
	ev.SpanPrior = v.SpanPrior
	resign(t, judgeKey, ev)
	if _, _, _, _, err := VerifyVerdict(ev); !errors.Is(err, neuropb.ErrInvalid) {
		t.Errorf("an expert's verdict with a span prior: %v", err)
	}

	// Without the history (too large to carry) the digests still bind
	// the accused; a node cannot re-run it then.
	bare := *task.Span
	bare.History = nil
	nv, err := NewVerdict(judgeKey, Task{Model: task.Model, Layer: 2, Input: in, N: 2, Span: &bare}, accused, wrong, [2]peer.ID{a1, a2}, right, receipt, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got, _, _, _, err := VerifyVerdict(nv); err != nil || got.Span.History != nil {
		t.Fatalf("a span verdict without its history: %v", err)
	}

	// A request that kept its last row only (the model's last layer):
	// outputs of one row.
	last := *task.Span
	last.Want = neuropb.SpanWant_SPAN_WANT_LAST
	lv, err := NewVerdict(judgeKey, Task{Model: task.Model, Layer: 2, Input: in, N: 2, Span: &last}, accused, wrong[4:], [2]peer.ID{a1, a2}, right[4:], nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, w, _, err := VerifyVerdict(lv); err != nil || len(w) != embd {
		t.Fatalf("a span verdict on the last row: %v (%d floats)", err, len(w))
	}

	// A node serving the span re-runs it from the history and confirms.
	book, _ := Open(Config{})
	rerun := func(t Task) ([]float32, error) {
		if t.Span == nil || len(t.Span.History) != len(history) {
			return nil, errors.New("not the span task")
		}
		return right, nil
	}
	gotTask, _, w, r, _ := VerifyVerdict(v)
	if o := book.Judge(v, gotTask, accused, w, r, rerun); o != Confirmed {
		t.Fatalf("judge: %v", o)
	}
}

// A span verdict carries the earlier rows only when a tensor of a verdict
// may hold them (MaxVerdictFloats floats, MaxExpertTokens rows): beyond,
// it goes without them and still verifies.
func TestSpanVerdictHistoryLimits(t *testing.T) {
	judgeKey, _ := newPeer(t)
	_, accused := newPeer(t)
	_, a1 := newPeer(t)
	_, a2 := newPeer(t)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	for _, c := range []struct {
		embd, rows int
		carried    bool
	}{{4, 8, true}, {4, neuropb.MaxExpertTokens, true}, {4, neuropb.MaxExpertTokens + 1, false}, {64, neuropb.MaxVerdictFloats/64 + 1, false}} {
		history := make([]float32, c.embd*c.rows)
		for i := range history {
			history[i] = float32(i % 7)
		}
		in, right, wrong := make([]float32, c.embd), make([]float32, c.embd), make([]float32, c.embd)
		for i := range right {
			right[i], wrong[i] = 1, -1
		}
		task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 0, Input: in, N: 1,
			Span: &SpanTask{End: 2, Prior: neuropb.SpanChainStart().Next(history, c.embd), History: history}}
		v, err := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		got, _, _, _, err := VerifyVerdict(v)
		if err != nil || (got.Span.History != nil) != c.carried || proto.Size(v) > neuropb.MaxVerdictSize {
			t.Errorf("%d rows of %d: %v, history carried %v (want %v), %d bytes", c.rows, c.embd, err, got.Span.History != nil, c.carried, proto.Size(v))
		}
	}
}
