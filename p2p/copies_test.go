package p2p

import (
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pb "github.com/libp2p/go-libp2p-pubsub/pb"
)

// The copies of a message that arrive while the first is being validated,
// or within copyWindow of a first that was delivered, are dropped before
// validation; a rejected first frees them at once, and none is held past
// copyHold; a forged copy (same author and sequence number, other data or
// signature) is not taken for the genuine one; control messages and other
// messages of an RPC stay.
func TestCopyFilter(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	var counted, countedBytes int
	f := newCopyFilter(func(msgs []*pb.Message, bytes int) { counted, countedBytes = counted+len(msgs), countedBytes+bytes })
	f.now = func() time.Time { return now }
	msg := func(seq byte, data, sig string) *pb.Message {
		topic := "/neuro/routing/1.0.0"
		return &pb.Message{From: []byte("author"), Seqno: []byte{seq}, Topic: &topic, Data: []byte(data), Signature: []byte(sig)}
	}
	kept := func(msgs ...*pb.Message) []string {
		rpc := &pubsub.RPC{RPC: pb.RPC{Publish: msgs, Control: &pb.ControlMessage{Ihave: []*pb.ControlIHave{{}}}}}
		if err := f.inspect("", rpc); err != nil {
			t.Fatal(err)
		}
		if rpc.Control == nil || len(rpc.Control.Ihave) != 1 {
			t.Fatalf("control messages touched: %v", rpc.Control)
		}
		var out []string
		for _, m := range rpc.Publish {
			out = append(out, string(m.Seqno)+":"+string(m.Data)+":"+string(m.Signature))
		}
		return out
	}
	check := func(what string, got []string, want ...string) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: kept %q, want %q", what, got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s: kept %q, want %q", what, got, want)
			}
		}
	}
	check("first copies", kept(msg(1, "a", "s1"), msg(2, "b", "s2")), "\x01:a:s1", "\x02:b:s2")
	now = now.Add(copyWindow / 2)
	check("copies", kept(msg(1, "a", "s1"), msg(2, "b", "s2"), msg(3, "c", "s3")), "\x03:c:s3")
	check("forged copies", kept(msg(1, "x", "s1"), msg(1, "a", "forged")), "\x01:x:s1", "\x01:a:forged")
	if got := f.dropped.Load(); got != 2 || counted != 2 || countedBytes < 2*len("author\x01a s1") {
		t.Fatalf("dropped %d, counted %d of %d bytes; want 2, their bytes", got, counted, countedBytes)
	}
	// The first copy of 1 delivered, that of 2 rejected (say, the
	// validation queue was full): 2's next copy goes through at once, 1's
	// once copyWindow has passed; 3 is held while it is being validated.
	f.DeliverMessage(&pubsub.Message{Message: msg(1, "a", "s1")})
	f.RejectMessage(&pubsub.Message{Message: msg(2, "b", "s2")}, pubsub.RejectValidationQueueFull)
	now = now.Add(copyWindow / 4)
	check("after validation", kept(msg(1, "a", "s1"), msg(2, "b", "s2"), msg(3, "c", "s3")), "\x02:b:s2")
	now = now.Add(copyWindow)
	check("after the window", kept(msg(1, "a", "s1"), msg(3, "c", "s3")), "\x01:a:s1")
	// Never told how 3's validation ended: held copyHold at most.
	now = now.Add(copyHold)
	check("after the hold", kept(msg(3, "c", "s3")), "\x03:c:s3")
	for _, m := range []*pb.Message{msg(1, "a", "s1"), msg(2, "b", "s2"), msg(3, "c", "s3"), msg(1, "x", "s1"), msg(1, "a", "forged")} {
		f.DuplicateMessage(&pubsub.Message{Message: m})
	}
	now = now.Add(copyWindow)
	kept(msg(9, "z", "s9"))
	if n := len(f.pending); n != 1 {
		t.Fatalf("%d messages held after their validation and window ended", n)
	}
}
