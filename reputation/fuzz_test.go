package reputation

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

// FuzzVerifyVerdict reads any bytes as a verdict from the validation
// topic. Properties: a refused verdict is refused as invalid (never
// another kind of error), and an accepted one, encoded again, is accepted
// again with the same task, accused and outputs.
func FuzzVerifyVerdict(f *testing.F) {
	judgeKey, _ := newPeer(f)
	accusedKey, accused := newPeer(f)
	_, a1 := newPeer(f)
	_, a2 := newPeer(f)
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	task := Task{Model: cid.NewCidV1(cid.Raw, mh), Layer: 1, Expert: 2, Input: []float32{1, 2, 3, 4}, N: 1}
	right := []float32{0.5, 0.25, -1, 2}
	wrong := []float32{0.75, 0.375, -1.5, 3}
	receipt := &neuropb.UsageReceipt{Layer: 1, ExpertIndex: 2, Tokens: 1, InputDigest: neuropb.FloatsDigest(task.Input),
		OutputDigest: neuropb.FloatsDigest(wrong)}
	if err := SignReceipt(accusedKey, receipt); err != nil {
		f.Fatal(err)
	}
	for _, rc := range []*neuropb.UsageReceipt{receipt, nil} {
		v, err := NewVerdict(judgeKey, task, accused, wrong, [2]peer.ID{a1, a2}, right, rc, time.Unix(1_700_000_000, 0))
		if err != nil {
			f.Fatal(err)
		}
		b, err := proto.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	// A span verdict, with the session's earlier rows.
	history := []float32{1, 2, 3, 4, 5, 6, 7, 8}
	spanTask := Task{Model: task.Model, Layer: 1, Input: task.Input, N: 1,
		Span: &SpanTask{End: 3, Prior: neuropb.SpanChainStart().Next(history, 4), History: history, Want: neuropb.SpanWant_SPAN_WANT_LAST}}
	sv, err := NewVerdict(judgeKey, spanTask, accused, wrong, [2]peer.ID{a1, a2}, right, nil, time.Unix(1_700_000_000, 0))
	if err != nil {
		f.Fatal(err)
	}
	if b, err := proto.Marshal(sv); err == nil {
		f.Add(b)
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		v := &neuropb.Verdict{}
		if proto.Unmarshal(raw, v) != nil {
			return
		}
		gotTask, gotAccused, gotWrong, gotRight, err := VerifyVerdict(v)
		if err != nil {
			if !errors.Is(err, neuropb.ErrInvalid) {
				t.Fatalf("refused with an error that is not ErrInvalid: %v", err)
			}
			return
		}
		again, err := proto.MarshalOptions{Deterministic: true}.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		v2 := &neuropb.Verdict{}
		if err := proto.Unmarshal(again, v2); err != nil {
			t.Fatal(err)
		}
		t2, a2, w2, r2, err := VerifyVerdict(v2)
		if err != nil {
			t.Fatalf("an accepted verdict, encoded again, is refused: %v", err)
		}
		if !t2.Model.Equals(gotTask.Model) || t2.Layer != gotTask.Layer || t2.Expert != gotTask.Expert || t2.N != gotTask.N ||
			!slices.Equal(t2.Input, gotTask.Input) || a2 != gotAccused || !slices.Equal(w2, gotWrong) || !slices.Equal(r2, gotRight) ||
			(t2.Span == nil) != (gotTask.Span == nil) || !slices.Equal(t2.InputDigest(), gotTask.InputDigest()) {
			t.Fatal("an accepted verdict reads differently once encoded again")
		}
	})
}
