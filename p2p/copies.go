package p2p

import (
	"encoding/binary"
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

// copyHold bounds how long copyFilter holds a message as being validated
// when GossipSub never says how its validation ended (a topic this node
// has left, say): copies are dropped that long at most.
const copyHold = 10 * time.Second

// copyWindow is how long after the first copy the later ones are dropped
// when the first was delivered: GossipSub would drop them as seen, after
// the work of taking them in (120 nodes: about 33 copies a second per
// node, 3% of the CPU). Shorter than the gossip that recovers a message
// (IHAVE at the next GossipSub heartbeat, then IWANT and its answer).
const copyWindow = time.Second

// copyFilter drops, before GossipSub validates them, the copies of a
// message that arrive while an identical first copy is still being
// validated.
//
// GossipSub marks a message seen once its signature is verified, so each
// copy that arrives while the first waits in the validation queue has its
// signature verified too: a message reaches a node along its D mesh links
// at about the same time, and on a loaded machine the queue takes longer
// than that (measured: 13 signature checks a second per node for about 5
// heartbeats a second, 2.6 for each, in a simulated network of 300 nodes;
// signature checks were 11% of its CPU). A copy is held from the moment
// the first passes the filter until GossipSub has delivered a message
// with the same key (the filter is also its tracer) and copyWindow has
// passed: a first copy that is rejected (a full validation queue, a bad
// signature) frees the next one at once.
//
// A copy is identical when its author, sequence number, topic, data and
// signature are: a forged copy (same author and number, other data or
// signature) is not taken for the genuine one, so a peer cannot suppress
// a message by sending a broken copy of it first. Copies of an invalid
// message sent by several peers at once cost nothing to validate and
// count against the peer whose copy came first only (GossipSub's P4);
// the others' later copies, sent after the rejection, count as before.
type copyFilter struct {
	noopTracer
	seed maphash.Seed
	// now is time.Now but in tests.
	now     func() time.Time
	mu      sync.Mutex
	pending map[uint64]held
	swept   time.Time
	dropped atomic.Uint64
	// counted, if not nil, gets the copies dropped from an RPC and the
	// bytes they took in it (the traffic counts them as received).
	counted func(msgs []*pb.Message, bytes int)
}

// held is a message whose copies are dropped: since when, and whether its
// validation has ended.
type held struct {
	at        time.Time
	validated bool
}

// holds reports whether copies of h are dropped at now.
func (h held) holds(now time.Time) bool {
	d := now.Sub(h.at)
	return d < copyWindow || !h.validated && d < copyHold
}

func newCopyFilter(counted func([]*pb.Message, int)) *copyFilter {
	return &copyFilter{seed: maphash.MakeSeed(), now: time.Now, pending: map[uint64]held{}, counted: counted}
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
		for k, h := range f.pending {
			if !h.holds(now) {
				delete(f.pending, k)
			}
		}
		f.swept = now
	}
	var drop []*pb.Message
	for _, m := range rpc.Publish {
		k := f.key(m)
		if h, ok := f.pending[k]; ok && h.holds(now) {
			drop = append(drop, m)
			continue
		}
		f.pending[k] = held{at: now}
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

// validated ends the validation of msg: delivered (or seen before), its
// copies are held until copyWindow has passed; rejected, not at all.
func (f *copyFilter) validated(msg *pubsub.Message, delivered bool) {
	k := f.key(msg.Message)
	f.mu.Lock()
	defer f.mu.Unlock()
	h, ok := f.pending[k]
	switch {
	case !ok:
	case delivered:
		h.validated = true
		f.pending[k] = h
	default:
		delete(f.pending, k)
	}
}

// The ends of a message's validation (pubsub.RawTracer).
func (f *copyFilter) DeliverMessage(msg *pubsub.Message)          { f.validated(msg, true) }
func (f *copyFilter) DuplicateMessage(msg *pubsub.Message)        { f.validated(msg, true) }
func (f *copyFilter) RejectMessage(msg *pubsub.Message, _ string) { f.validated(msg, false) }

// key hashes a message's fields, each with its length.
func (f *copyFilter) key(m *pb.Message) uint64 {
	var h maphash.Hash
	h.SetSeed(f.seed)
	var n [8]byte
	for _, b := range [][]byte{m.GetFrom(), m.GetSeqno(), []byte(m.GetTopic()), m.GetData(), m.GetSignature()} {
		binary.LittleEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	return h.Sum64()
}
