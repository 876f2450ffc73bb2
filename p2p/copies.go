package p2p

import (
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"
)

// copyWindow is how long copyFilter drops the copies of a message after
// the first.
//
// GossipSub marks a message seen once its signature is verified, so each
// copy that arrives while the first waits in the validation queue has its
// signature verified too: a message reaches a node along its D mesh links
// at about the same time, and on a loaded machine the queue takes longer
// than that (measured: 13 signature checks a second per node for about 5
// heartbeats a second, 2.6 for each, in a simulated network of 300 nodes;
// signature checks were 11% of its CPU). A second is shorter than the
// gossip that recovers a message whose first copy was dropped (IHAVE at
// the next GossipSub heartbeat, then IWANT and its answer).
const copyWindow = time.Second

// copyFilter drops, before GossipSub validates them, the copies of a
// message that arrive within copyWindow of an identical first copy. A copy
// is identical when its author, sequence number, topic, data and
// signature are: a forged copy (same author and number, other data or
// signature) is not taken for the genuine one, so a peer cannot suppress
// a message by sending a broken copy of it first.
type copyFilter struct {
	seed maphash.Seed
	// now is time.Now but in tests.
	now     func() time.Time
	mu      sync.Mutex
	first   map[uint64]time.Time
	swept   time.Time
	dropped atomic.Uint64
	// counted, if not nil, gets the copies dropped from an RPC and the
	// bytes they took in it (the traffic counts them as received).
	counted func(msgs []*pb.Message, bytes int)
}

func newCopyFilter(counted func([]*pb.Message, int)) *copyFilter {
	return &copyFilter{seed: maphash.MakeSeed(), now: time.Now, first: map[uint64]time.Time{}, counted: counted}
}

// inspect is GossipSub's RPC inspector: it removes the copies from rpc's
// published messages and never rejects the RPC (its control messages and
// other messages stay).
func (f *copyFilter) inspect(_ peer.ID, rpc *pubsub.RPC) error {
	if len(rpc.Publish) == 0 {
		return nil
	}
	now := f.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if now.Sub(f.swept) >= copyWindow {
		for k, t := range f.first {
			if now.Sub(t) >= copyWindow {
				delete(f.first, k)
			}
		}
		f.swept = now
	}
	var drop []*pb.Message
	for _, m := range rpc.Publish {
		k := f.key(m.GetFrom(), m.GetSeqno(), m.GetTopic(), m.GetData(), m.GetSignature())
		if t, ok := f.first[k]; ok && now.Sub(t) < copyWindow {
			drop = append(drop, m)
			continue
		}
		f.first[k] = now
	}
	if len(drop) == 0 {
		return nil
	}
	f.dropped.Add(uint64(len(drop)))
	size := proto.Size(&rpc.RPC)
	rpc.Publish = slices.DeleteFunc(rpc.Publish, func(m *pb.Message) bool { return slices.Contains(drop, m) })
	if f.counted != nil {
		f.counted(drop, size-proto.Size(&rpc.RPC))
	}
	return nil
}

// key hashes a message's fields, each with its length.
func (f *copyFilter) key(from, seqno []byte, topic string, data, sig []byte) uint64 {
	var h maphash.Hash
	h.SetSeed(f.seed)
	for _, b := range [][]byte{from, seqno, []byte(topic), data, sig} {
		var n [8]byte
		for i := range n {
			n[i] = byte(len(b) >> (8 * i))
		}
		h.Write(n[:])
		h.Write(b)
	}
	return h.Sum64()
}
