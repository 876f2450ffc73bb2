package p2p

import (
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pb "github.com/libp2p/go-libp2p-pubsub/pb"
)

// The copies of a message that arrive within copyWindow of the first are
// dropped before validation; a forged copy (same author and sequence
// number, other data or signature) is not taken for it; after the window
// a copy goes through (GossipSub's seen cache decides); control messages
// and other messages of an RPC stay.
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
	now = now.Add(copyWindow)
	check("after the window", kept(msg(1, "a", "s1")), "\x01:a:s1")
	if len(f.first) > 1 {
		t.Fatalf("%d entries kept past the window", len(f.first))
	}
}
