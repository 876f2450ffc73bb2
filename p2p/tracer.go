package p2p

import (
	"sync"
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/proto"
)

// noopTracer implements pubsub.RawTracer with no-ops; tracers embed it and
// override what they need.
type noopTracer struct{}

var _ pubsub.RawTracer = noopTracer{}

func (noopTracer) AddPeer(peer.ID, protocol.ID)                         {}
func (noopTracer) RemovePeer(peer.ID)                                   {}
func (noopTracer) OnNewOutboundStream(peer.ID, protocol.ID)             {}
func (noopTracer) OnClosedOutboundStream(peer.ID)                       {}
func (noopTracer) Join(string)                                          {}
func (noopTracer) Leave(string)                                         {}
func (noopTracer) Graft(peer.ID, string)                                {}
func (noopTracer) Prune(peer.ID, string)                                {}
func (noopTracer) ValidateMessage(*pubsub.Message)                      {}
func (noopTracer) DeliverMessage(*pubsub.Message)                       {}
func (noopTracer) RejectMessage(*pubsub.Message, string)                {}
func (noopTracer) DuplicateMessage(*pubsub.Message)                     {}
func (noopTracer) ThrottlePeer(peer.ID)                                 {}
func (noopTracer) RecvRPC(*pubsub.RPC)                                  {}
func (noopTracer) SendRPC(*pubsub.RPC, peer.ID)                         {}
func (noopTracer) SendRPCCompleted(*pubsub.RPC, peer.ID, time.Duration) {}
func (noopTracer) DropRPC(*pubsub.RPC, peer.ID)                         {}
func (noopTracer) UndeliverableMessage(*pubsub.Message)                 {}

// Traffic counts a host's GossipSub RPCs (each carries messages, control
// messages or both) and the messages and bytes in them, both ways, since
// the host started.
type Traffic struct {
	RPCsIn, RPCsOut   uint64
	MsgsIn, MsgsOut   uint64
	BytesIn, BytesOut uint64
	// ControlIn and ControlOut are the bytes of control messages (IHAVE,
	// IWANT, GRAFT, PRUNE, IDONTWANT), part of BytesIn and BytesOut.
	ControlIn, ControlOut uint64
	// TopicMsgsIn counts the messages received per topic (duplicates
	// included).
	TopicMsgsIn map[string]uint64
	// Delivered counts the distinct messages validated and delivered (a
	// message once, however many peers sent it).
	Delivered uint64
	// Heartbeats counts the heartbeats this node published; OutOfTurn the
	// part published at once (a change of what it hosts), not on its
	// interval.
	Heartbeats, HeartbeatsOutOfTurn uint64
	// Provides counts the provider records this node put in the DHT (each
	// a lookup and puts to the closest peers); ProviderLookups the
	// provider lookups FindProviders made (answers from its cache left
	// out).
	Provides, ProviderLookups uint64
	// TopicDiscoveries counts GossipSub's asks for more peers of a topic
	// whose mesh is short (each a set of candidates its connector dials).
	TopicDiscoveries uint64
	// CopiesDropped counts the copies of messages dropped before
	// validation because an identical copy was being validated or had
	// just been delivered (copyFilter).
	CopiesDropped uint64
}

// trafficTracer counts Traffic.
type trafficTracer struct {
	noopTracer
	rpcsIn, rpcsOut   atomic.Uint64
	msgsIn, msgsOut   atomic.Uint64
	bytesIn, bytesOut atomic.Uint64
	ctrlIn, ctrlOut   atomic.Uint64
	topics            sync.Map // topic → *atomic.Uint64 of messages in
	delivered         atomic.Uint64
}

func (t *trafficTracer) DeliverMessage(*pubsub.Message) { t.delivered.Add(1) }

func (t *trafficTracer) RecvRPC(rpc *pubsub.RPC) {
	t.rpcsIn.Add(1)
	t.bytesIn.Add(uint64(proto.Size(&rpc.RPC)))
	t.ctrlIn.Add(uint64(proto.Size(rpc.GetControl())))
	t.received(rpc.GetPublish())
}

// received counts messages received, per topic.
func (t *trafficTracer) received(msgs []*pb.Message) {
	t.msgsIn.Add(uint64(len(msgs)))
	for _, m := range msgs {
		c, ok := t.topics.Load(m.GetTopic())
		if !ok {
			c, _ = t.topics.LoadOrStore(m.GetTopic(), new(atomic.Uint64))
		}
		c.(*atomic.Uint64).Add(1)
	}
}

// dropped counts the copies copyFilter took out of a received RPC (bytes
// their share of its size): they came over the wire all the same.
func (t *trafficTracer) dropped(msgs []*pb.Message, bytes int) {
	t.bytesIn.Add(uint64(bytes))
	t.received(msgs)
}

func (t *trafficTracer) SendRPC(rpc *pubsub.RPC, _ peer.ID) {
	t.rpcsOut.Add(1)
	t.msgsOut.Add(uint64(len(rpc.GetPublish())))
	t.bytesOut.Add(uint64(proto.Size(&rpc.RPC)))
	t.ctrlOut.Add(uint64(proto.Size(rpc.GetControl())))
}

func (t *trafficTracer) snapshot() Traffic {
	return Traffic{
		RPCsIn: t.rpcsIn.Load(), RPCsOut: t.rpcsOut.Load(),
		MsgsIn: t.msgsIn.Load(), MsgsOut: t.msgsOut.Load(),
		BytesIn: t.bytesIn.Load(), BytesOut: t.bytesOut.Load(),
		ControlIn: t.ctrlIn.Load(), ControlOut: t.ctrlOut.Load(),
		TopicMsgsIn: t.topicCounts(), Delivered: t.delivered.Load(),
	}
}

func (t *trafficTracer) topicCounts() map[string]uint64 {
	out := map[string]uint64{}
	t.topics.Range(func(k, v any) bool {
		out[k.(string)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}
