package reputation

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/sign"
)

// Tolerance is the relative L2 distance under which two results of the
// same expert task agree when the expert's weight types are not known (a
// verdict without them). Honest differences measured on one device
// (gating's TestToleranceSeparatesHonestFromCheap): 0 between thread counts
// and between nodes (ggml computes each output row on one thread), 2.1e-4
// to 2.3e-4 from F16 on the wire; a node that computes in Q4_0 instead of
// the shard's Q8_0 or F16 is 0.15 off. 1e-2 sits 40x above the first and
// 15x below the second. Across devices honest results differ more (see
// ToleranceFor), so the validator uses ToleranceFor.
const Tolerance = 1e-2

// tolerances are ToleranceFor's table. Each is the geometric mean of the
// largest honest difference measured between devices for that type and the
// smallest difference a cheaper type substituted for it makes, on experts
// of 256x512 weights uniform in ±0.1 and activations in ±1, at batch 1 and
// 32 (ggml's TestDeviceExpertMatchesCPU; docs/gpu.md has every figure).
// Devices: the CPU (any thread count), Vulkan on Mesa's lavapipe and on an
// NVIDIA H200, CUDA on the H200. The honest spread comes from where each
// kernel rounds the activations (the CPU quantizes them to Q8_0 or Q8_K
// for quantized weights; CUDA's vector kernels to Q8_1; Vulkan without
// integer dot products keeps them in float), not from the weights.
var tolerances = map[model.DType]float64{
	// honest ≤ 2.2e-3 (CUDA on the H200, batch 32: cuBLAS's F32 matrix
	// product rounds through tensor cores) and 4.9e-4 (lavapipe); as
	// Q8_0 instead: ≥ 7.6e-3 (lavapipe), 1.2e-2 (CUDA). It was 2e-3, from
	// lavapipe alone, which an honest CUDA node exceeded.
	model.F32: 4e-3,
	// honest ≤ 4.9e-3 (lavapipe, batch 32) and 3.3e-3 (BF16 on CUDA,
	// batch 1); as Q4_0 instead: ≥ 0.11
	model.F16:  2e-2,
	model.BF16: 2e-2,
	// honest ≤ 1.1e-2 (Vulkan: float activations against the CPU's Q8_0);
	// as Q4_0 instead: ≥ 0.11
	model.Q8_0: 3.5e-2,
	// honest ≤ 3.0e-2 (Q4_1 on CUDA, batch 1); as Q2_K instead: ≥ 0.40
	model.Q4_0: 0.1, model.Q4_1: 0.1, model.Q5_0: 0.1, model.Q5_1: 0.1,
	// honest ≤ 2.3e-2 (Q5_K on CUDA, batch 32); as Q2_K instead ≥ 0.40, Q6_K
	// as Q3_K 0.21
	model.Q2_K: 7e-2, model.Q3_K: 7e-2, model.Q4_K: 7e-2, model.Q5_K: 7e-2, model.Q6_K: 7e-2,
	// honest ≤ 1.8e-2 (IQ4_XS on CUDA, batch 32), 1.1e-2 for MXFP4
	// (Vulkan on the H200); as Q2_K instead ≥ 0.39: the K-quants' value.
	model.IQ4_NL: 7e-2, model.IQ4_XS: 7e-2, model.IQ3_S: 7e-2, model.IQ3_XXS: 7e-2, model.MXFP4: 7e-2,
	// IQ2_*, IQ1_* (which need an importance matrix to make) and the
	// ternary TQ1_0/TQ2_0 (ggml-vulkan has no ternary kernels: the
	// scheduler ran them on the CPU, 0 apart) are not measured across
	// devices yet: Tolerance.
}

// ToleranceFor is the relative L2 distance under which two results of an
// expert whose tensors have these ggml types agree, whatever devices
// computed them: the largest of the types' (an expert mixes them: Q4_K_M
// keeps down in Q6_K). Types not measured yet, and none at all, get
// Tolerance.
func ToleranceFor(dtypes ...model.DType) float64 {
	tol := 0.0
	for _, t := range dtypes {
		v, ok := tolerances[t]
		if !ok {
			v = Tolerance
		}
		tol = max(tol, v)
	}
	if tol == 0 {
		return Tolerance
	}
	return tol
}

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

// Task is an expert computation: what a verdict is about.
type Task struct {
	Model         cid.Cid
	Layer, Expert int
	// Input holds N rows of hidden states.
	Input []float32
	N     int
	// DTypes are the expert's gate, up and down types (the manifest's),
	// which set the tolerance; empty: Tolerance.
	DTypes []model.DType
	// Span, if set, makes the task a span request: layers [Layer,
	// Span.End) on Input after the session's earlier rows (Expert is 0).
	Span *SpanTask
}

// SpanTask is what a span request adds to a task: the rows the session
// sent the span before it, and what it kept.
type SpanTask struct {
	End int
	// Prior is the digest chain of the earlier rows; History those rows
	// (row-major), when known: a verdict carries them if they fit
	// (MaxVerdictFloats), and only a verdict that carries them can be
	// re-run.
	Prior   neuropb.SpanChain
	History []float32
	Want    neuropb.SpanWant
}

// InputDigest is the digest a task's input is known by: the SHA-256 of
// an expert task's input, SpanRequestDigest of a span request's.
func (t Task) InputDigest() []byte {
	if t.Span != nil {
		return neuropb.SpanRequestDigest(t.Span.Prior, t.Span.Want, t.Span.Prior.Next(t.Input, len(t.Input)/max(t.N, 1)))
	}
	return neuropb.FloatsDigest(t.Input)
}

func f32Tensor(x []float32, rows int) *neuropb.Tensor {
	b := make([]byte, 4*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return &neuropb.Tensor{Data: b, Dtype: neuropb.WireDType_WIRE_DTYPE_F32, Shape: []uint32{uint32(rows), uint32(len(x) / max(rows, 1))}}
}

// floats decodes an F32 tensor of a verdict, checking its shape.
func floats(t *neuropb.Tensor, what string) ([]float32, int, error) {
	rows, cols, err := t.Rows()
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, err)
	}
	if t.GetDtype() != neuropb.WireDType_WIRE_DTYPE_F32 || len(t.GetData()) != 4*rows*cols {
		return nil, 0, fmt.Errorf("%s: want F32 data of %dx%d", what, rows, cols)
	}
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.GetData()[4*i:]))
	}
	return x, rows, nil
}

// floatsLike decodes an F32 tensor that must have rows rows and n floats.
func floatsLike(t *neuropb.Tensor, what string, rows, n int) ([]float32, error) {
	x, r, err := floats(t, what)
	if err != nil || r != rows || len(x) != n {
		return nil, fmt.Errorf("%s: %v (want the accused output's shape)", what, err)
	}
	return x, nil
}

// spanTask checks a verdict's span fields (all absent on an expert's
// verdict) and returns its span task, nil for an expert's; embd is the
// input's row width.
func spanTask(v *neuropb.Verdict, embd int) (*SpanTask, error) {
	if v.GetSpanEnd() == 0 {
		if len(v.GetSpanPrior()) != 0 || v.GetSpanHistory() != nil || v.GetSpanWant() != 0 {
			return nil, errors.New("span fields on an expert's verdict")
		}
		return nil, nil
	}
	sp := &SpanTask{End: int(v.GetSpanEnd()), Want: v.GetSpanWant()}
	switch {
	case sp.End <= int(v.GetLayer()):
		return nil, fmt.Errorf("span [%d, %d) is empty", v.GetLayer(), sp.End)
	case v.GetExpert() != 0:
		return nil, fmt.Errorf("a span verdict names expert %d", v.GetExpert())
	case len(v.GetSpanPrior()) != len(sp.Prior):
		return nil, fmt.Errorf("span prior of %d bytes, want %d", len(v.GetSpanPrior()), len(sp.Prior))
	case neuropb.SpanWant_name[int32(sp.Want)] == "":
		return nil, fmt.Errorf("span want %d", sp.Want)
	case len(v.GetWeightDtypes()) != 0:
		return nil, errors.New("weight types on a span verdict")
	}
	copy(sp.Prior[:], v.GetSpanPrior())
	if h := v.GetSpanHistory(); h != nil {
		x, _, err := floats(h, "span history")
		if err != nil {
			return nil, err
		}
		if _, cols, _ := h.Rows(); cols != embd {
			return nil, fmt.Errorf("span history rows of %d floats, the input's are %d", cols, embd)
		}
		if neuropb.SpanChainStart().Next(x, embd) != sp.Prior {
			return nil, errors.New("span history does not chain to span prior")
		}
		sp.History = x
	}
	return sp, nil
}

func digest(t *neuropb.Tensor) []byte {
	d := sha256.Sum256(t.GetData())
	return d[:]
}

// ErrVerdictTooLarge means a task is too big to carry in a verdict.
var ErrVerdictTooLarge = errors.New("task too large for a verdict")

// NewVerdict builds a verdict on task and signs it with the judge's key.
// receipt, if not nil, is the accused's signed receipt for the call
// (Verdict.accused_receipt).
func NewVerdict(key crypto.PrivKey, t Task, accused peer.ID, wrong []float32, agreeing [2]peer.ID, right []float32,
	receipt *neuropb.UsageReceipt, now time.Time) (*neuropb.Verdict, error) {
	if len(t.Input) > neuropb.MaxVerdictFloats || len(wrong) > neuropb.MaxVerdictFloats || len(right) > neuropb.MaxVerdictFloats {
		return nil, ErrVerdictTooLarge
	}
	judge, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("verdict: %w", err)
	}
	outRows := t.N
	if t.Span != nil && len(wrong) < len(t.Input) {
		outRows = 1 // SPAN_WANT_LAST
	}
	v := &neuropb.Verdict{
		Model: t.Model.Bytes(), Layer: uint32(t.Layer), Expert: uint32(t.Expert),
		Input:   f32Tensor(t.Input, t.N),
		Accused: []byte(accused), AccusedOutput: f32Tensor(wrong, outRows),
		Agreeing:        [][]byte{[]byte(agreeing[0]), []byte(agreeing[1])},
		ReferenceOutput: f32Tensor(right, outRows),
		Judge:           []byte(judge), UnixMs: now.UnixMilli(),
		AccusedReceipt: receipt,
	}
	for _, d := range t.DTypes {
		v.WeightDtypes = append(v.WeightDtypes, uint32(d))
	}
	v.InputDigest, v.AccusedDigest, v.ReferenceDigest = digest(v.Input), digest(v.AccusedOutput), digest(v.ReferenceOutput)
	if sp := t.Span; sp != nil {
		v.SpanEnd, v.SpanPrior, v.SpanWant = uint32(sp.End), append([]byte(nil), sp.Prior[:]...), sp.Want
		v.InputDigest = t.InputDigest()
		// The history when it fits: without it the digests still bind
		// the accused's answer, but nobody can re-run the request.
		if embd := len(t.Input) / max(t.N, 1); len(sp.History) > 0 && len(sp.History) <= neuropb.MaxVerdictFloats &&
			len(sp.History)%embd == 0 && len(sp.History)/embd <= neuropb.MaxExpertTokens {
			v.SpanHistory = f32Tensor(sp.History, len(sp.History)/embd)
		}
	}
	if v.Signature, err = sign.Sign(key, sign.Verdict, v); err != nil {
		return nil, fmt.Errorf("verdict: %w", err)
	}
	return v, nil
}

// VerifyVerdict checks a verdict's fields, its digests and the judge's
// signature, and returns its task and outputs.
func VerifyVerdict(v *neuropb.Verdict) (t Task, accused peer.ID, wrong, right []float32, err error) {
	fail := func(format string, args ...any) (Task, peer.ID, []float32, []float32, error) {
		return Task{}, "", nil, nil, fmt.Errorf("%w: verdict: %s", neuropb.ErrInvalid, fmt.Sprintf(format, args...))
	}
	if t.Model, err = cid.Cast(v.GetModel()); err != nil {
		return fail("model: %v", err)
	}
	t.Layer, t.Expert = int(v.GetLayer()), int(v.GetExpert())
	if accused, err = peer.IDFromBytes(v.GetAccused()); err != nil {
		return fail("accused: %v", err)
	}
	judge, err := peer.IDFromBytes(v.GetJudge())
	if err != nil {
		return fail("judge: %v", err)
	}
	if len(v.GetAgreeing()) != 2 {
		return fail("%d agreeing peers, want 2", len(v.GetAgreeing()))
	}
	for _, a := range v.GetAgreeing() {
		p, err := peer.IDFromBytes(a)
		if err != nil {
			return fail("agreeing: %v", err)
		}
		if p == accused {
			return fail("the accused is among the agreeing peers")
		}
	}
	if t.Input, t.N, err = floats(v.GetInput(), "input"); err != nil {
		return fail("%v", err)
	}
	if t.Span, err = spanTask(v, len(t.Input)/t.N); err != nil {
		return fail("%v", err)
	}
	// The outputs have the input's shape (a span request that kept the
	// last row only: one row of it).
	outRows := []int{t.N}
	if t.Span != nil && t.Span.Want == neuropb.SpanWant_SPAN_WANT_LAST {
		outRows = append(outRows, 1)
	}
	var n int
	if wrong, n, err = floats(v.GetAccusedOutput(), "accused output"); err != nil || !slices.Contains(outRows, n) || len(wrong) != n*len(t.Input)/t.N {
		return fail("accused output: %v (want the input's shape)", err)
	}
	if right, err = floatsLike(v.GetReferenceOutput(), "reference output", n, len(wrong)); err != nil {
		return fail("%v", err)
	}
	inputDigest := digest(v.GetInput())
	if t.Span != nil {
		inputDigest = t.InputDigest()
	}
	for _, d := range []struct {
		got  []byte
		want []byte
		what string
	}{{inputDigest, v.GetInputDigest(), "input"}, {digest(v.GetAccusedOutput()), v.GetAccusedDigest(), "accused output"},
		{digest(v.GetReferenceOutput()), v.GetReferenceDigest(), "reference output"}} {
		if !bytes.Equal(d.got, d.want) {
			return fail("%s digest does not match", d.what)
		}
	}
	if len(v.GetWeightDtypes()) > 3 {
		return fail("%d weight types, want at most 3", len(v.GetWeightDtypes()))
	}
	for _, d := range v.GetWeightDtypes() {
		if !model.DType(d).Known() {
			return fail("weight type %d is not a ggml type neuro reads", d)
		}
		t.DTypes = append(t.DTypes, model.DType(d))
	}
	if off, tol := RelL2(wrong, right), ToleranceFor(t.DTypes...); !(off > tol) {
		return fail("the accused output is within tolerance (%.3g) of the reference (%.3g)", tol, off)
	}
	if r := v.GetAccusedReceipt(); r != nil {
		switch signer, err := VerifyReceipt(r); {
		case err != nil:
			return fail("accused receipt: %v", err)
		case signer != accused:
			return fail("accused receipt signed by %s, not the accused", signer)
		case r.GetLayer() != v.GetLayer() || r.GetExpertIndex() != v.GetExpert() || r.GetSpanEnd() != v.GetSpanEnd():
			return fail("accused receipt for expert %d:%d (span end %d)", r.GetLayer(), r.GetExpertIndex(), r.GetSpanEnd())
		case !bytes.Equal(r.GetInputDigest(), v.GetInputDigest()) || !bytes.Equal(r.GetOutputDigest(), v.GetAccusedDigest()):
			return fail("accused receipt is for another input or output")
		}
	}
	unsigned := proto.Clone(v).(*neuropb.Verdict)
	unsigned.Signature = nil
	if err := sign.Verify(judge, sign.Verdict, unsigned, v.GetSignature()); err != nil {
		return fail("judge: %v", err)
	}
	return t, accused, wrong, right, nil
}

// SignReceipt signs a usage receipt with the expert's key (setting its
// expert field).
func SignReceipt(key crypto.PrivKey, r *neuropb.UsageReceipt) error {
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return err
	}
	r.Expert, r.Signature, r.Batch = []byte(id), nil, nil
	r.Signature, err = sign.Sign(key, sign.UsageReceipt, r)
	return err
}

// SignReceipts signs the receipts of one answer with the expert's key
// (setting their expert fields): one alone as SignReceipt does, more in
// batches of at most neuropb.MaxReceiptBatch with one signature each, over
// the batch's ReceiptDigests (UsageReceipt.batch). An expert node signs a
// layer's group of experts once instead of once an expert (a signature
// took about 20 us on the critical path).
func SignReceipts(key crypto.PrivKey, rs []*neuropb.UsageReceipt) error {
	if len(rs) == 1 {
		return SignReceipt(key, rs[0])
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return err
	}
	for len(rs) > 0 {
		batch := rs[:min(len(rs), neuropb.MaxReceiptBatch)]
		rs = rs[len(batch):]
		digests := make([][]byte, len(batch))
		for i, r := range batch {
			r.Expert, r.Signature, r.Batch = []byte(id), nil, nil
			if digests[i], err = ReceiptDigest(r); err != nil {
				return err
			}
		}
		sig, err := sign.Sign(key, sign.UsageReceiptBatch, &neuropb.ReceiptBatch{Digests: digests})
		if err != nil {
			return err
		}
		for _, r := range batch {
			r.Signature, r.Batch = sig, digests
		}
	}
	return nil
}

// ReceiptDigest is a receipt's digest in a batch: SHA-256 of its
// deterministic encoding with signature and batch empty, in the
// receipt-digest domain (sign.Bytes).
func ReceiptDigest(r *neuropb.UsageReceipt) ([]byte, error) {
	if len(r.GetSignature()) > 0 || len(r.GetBatch()) > 0 {
		r = proto.Clone(r).(*neuropb.UsageReceipt)
		r.Signature, r.Batch = nil, nil
	}
	b, err := sign.Bytes(sign.ReceiptDigest, r)
	if err != nil {
		return nil, err
	}
	d := sha256.Sum256(b)
	return d[:], nil
}

// VerifyReceipt checks a usage receipt's signature, its own or its
// batch's, and returns its signer.
func VerifyReceipt(r *neuropb.UsageReceipt) (peer.ID, error) {
	id, err := peer.IDFromBytes(r.GetExpert())
	if err != nil {
		return "", fmt.Errorf("receipt signer: %w", err)
	}
	if batch := r.GetBatch(); len(batch) > 0 {
		if len(batch) > neuropb.MaxReceiptBatch {
			return "", fmt.Errorf("receipt: a batch of %d, at most %d", len(batch), neuropb.MaxReceiptBatch)
		}
		d, err := ReceiptDigest(r)
		if err != nil {
			return "", fmt.Errorf("receipt: %w", err)
		}
		if !slices.ContainsFunc(batch, func(b []byte) bool { return bytes.Equal(b, d) }) {
			return "", errors.New("receipt: not in its batch")
		}
		if err := sign.Verify(id, sign.UsageReceiptBatch, &neuropb.ReceiptBatch{Digests: batch}, r.GetSignature()); err != nil {
			return "", fmt.Errorf("receipt batch: %w", err)
		}
		return id, nil
	}
	unsigned := proto.Clone(r).(*neuropb.UsageReceipt)
	unsigned.Signature = nil
	if err := sign.Verify(id, sign.UsageReceipt, unsigned, r.GetSignature()); err != nil {
		return "", fmt.Errorf("receipt: %w", err)
	}
	return id, nil
}

// Outcome is what a node made of a verdict.
type Outcome int

// The outcomes of Judge.
const (
	// Unchecked: the node cannot re-run the task (it does not host the
	// expert); it keeps the verdict as evidence but changes no score.
	Unchecked Outcome = iota
	// Confirmed: re-running gave the reference output; the accused loses
	// correctness in this node's book.
	Confirmed
	// Refuted: re-running gave the accused's output; the judge loses
	// correctness for a false accusation.
	Refuted
	// Undecided: re-running matched neither.
	Undecided
)

func (o Outcome) String() string {
	return [...]string{"unchecked", "confirmed", "refuted", "undecided"}[o]
}

// ErrWrongWeightTypes is what a re-run returns when the verdict names
// other weight types than the model's manifest lists for the expert: the
// judge signed a false tolerance, and Judge refutes the verdict.
var ErrWrongWeightTypes = errors.New("the verdict's weight types are not the model's")

// Judge re-runs a verified verdict's task with rerun (nil, or an error,
// when this node cannot) and records the outcome in the book: against the
// accused when confirmed, against the judge when refuted.
func (b *Book) Judge(v *neuropb.Verdict, t Task, accused peer.ID, wrong, right []float32, rerun func(Task) ([]float32, error)) Outcome {
	if rerun == nil {
		return Unchecked
	}
	got, err := rerun(t)
	judge, _ := peer.IDFromBytes(v.GetJudge())
	if errors.Is(err, ErrWrongWeightTypes) {
		b.Refuted(judge)
		return Refuted
	}
	if err != nil {
		return Unchecked
	}
	tol := ToleranceFor(t.DTypes...)
	matchRight, matchWrong := RelL2(got, right) <= tol, RelL2(got, wrong) <= tol
	switch {
	case matchRight && !matchWrong:
		b.Validated(accused, false)
		return Confirmed
	case matchWrong && !matchRight:
		b.Refuted(judge)
		return Refuted
	}
	return Undecided
}
