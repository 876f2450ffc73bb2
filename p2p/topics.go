package p2p

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"
)

// Reasons a gossip message is rejected, as counted by Rejections. Those of
// the form "pubsub:..." come from GossipSub itself (a missing or bad
// signature, a blacklisted peer...); the rest from neuro's topic validators.
const (
	RejectOversize  = "oversize"
	RejectMalformed = "malformed"
	RejectInvalid   = "invalid"
)

// Rejections counts rejected gossip messages by topic and reason. It is
// safe for concurrent use.
type Rejections struct {
	mu sync.Mutex
	m  map[string]map[string]uint64
}

func (r *Rejections) add(topic, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = make(map[string]map[string]uint64)
	}
	if r.m[topic] == nil {
		r.m[topic] = make(map[string]uint64)
	}
	r.m[topic][reason]++
}

// Snapshot returns the counts as topic -> reason -> count.
func (r *Rejections) Snapshot() map[string]map[string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]map[string]uint64, len(r.m))
	for t, m := range r.m {
		out[t] = maps.Clone(m)
	}
	return out
}

// Count returns the count for one topic and reason.
func (r *Rejections) Count(topic, reason string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[topic][reason]
}

// rejectTracer feeds GossipSub's own rejections (signature checks run before
// our validators) into Rejections. Rejections by our validators are counted
// where they happen, so the tracer skips "validation failed".
type rejectTracer struct {
	noopTracer
	r *Rejections
}

func (t rejectTracer) RejectMessage(msg *pubsub.Message, reason string) {
	switch reason {
	case pubsub.RejectValidationFailed, pubsub.RejectValidationIgnored:
		return
	}
	t.r.add(msg.GetTopic(), "pubsub:"+reason)
}

// Validator checks a decoded message from its signed author. A non-nil
// error rejects the message, which counts against the peer that sent it.
type Validator[M proto.Message] func(ctx context.Context, author peer.ID, msg M) error

// Received is a message that passed validation.
type Received[M proto.Message] struct {
	// Author signed the message; ReceivedFrom forwarded it to us.
	Author, ReceivedFrom peer.ID
	Msg                  M
	At                   time.Time
	// Local is true for our own messages.
	Local bool
}

// Topic is a GossipSub topic that carries one protobuf message type, with a
// size limit and a validator run before anything is delivered or forwarded.
type Topic[M proto.Message] struct {
	name    string
	ps      *pubsub.PubSub
	t       *pubsub.Topic
	maxSize int
	rej     *Rejections
}

// JoinTopic joins topic on ps and registers its validator. newMsg returns an
// empty message to decode into; maxSize bounds the encoded message.
func JoinTopic[M proto.Message](ps *pubsub.PubSub, topic string, maxSize int, newMsg func() M, validate Validator[M], rej *Rejections) (*Topic[M], error) {
	val := func(ctx context.Context, _ peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
		if len(msg.Data) > maxSize {
			rej.add(topic, RejectOversize)
			return pubsub.ValidationReject
		}
		m := newMsg()
		if err := proto.Unmarshal(msg.Data, m); err != nil {
			rej.add(topic, RejectMalformed)
			return pubsub.ValidationReject
		}
		if err := validate(ctx, msg.GetFrom(), m); err != nil {
			rej.add(topic, RejectInvalid)
			return pubsub.ValidationReject
		}
		msg.ValidatorData = m
		return pubsub.ValidationAccept
	}
	// Inline: every validator is quick and never blocks (decoding and
	// checks, signatures at most), so it runs on GossipSub's validation
	// workers, whose queue is bounded and drops what it cannot take
	// (neither penalised nor forwarded). Run asynchronously, each message
	// got a goroutine of its own, up to 8,192 at once: a simulated network
	// of 300 nodes on two cores that fell behind held 3,400 of them,
	// runnable, and never caught up.
	if err := ps.RegisterTopicValidator(topic, val, pubsub.WithValidatorInline(true)); err != nil {
		return nil, fmt.Errorf("topic %s: validator: %w", topic, err)
	}
	t, err := ps.Join(topic)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("topic %s: join: %w", topic, err), ps.UnregisterTopicValidator(topic))
	}
	return &Topic[M]{name: topic, ps: ps, t: t, maxSize: maxSize, rej: rej}, nil
}

// Name is the topic's name.
func (t *Topic[M]) Name() string { return t.name }

// Publish signs and publishes msg.
func (t *Topic[M]) Publish(ctx context.Context, msg M) error {
	data, err := proto.Marshal(msg)
	if err != nil {
		return fmt.Errorf("topic %s: encode: %w", t.name, err)
	}
	if len(data) > t.maxSize {
		return fmt.Errorf("topic %s: message is %d bytes, at most %d", t.name, len(data), t.maxSize)
	}
	if err := t.t.Publish(ctx, data); err != nil {
		return fmt.Errorf("topic %s: publish: %w", t.name, err)
	}
	return nil
}

// Subscription delivers a topic's validated messages.
type Subscription[M proto.Message] struct {
	sub *pubsub.Subscription
}

// Subscribe starts receiving the topic's messages. Cancel the subscription
// when done.
func (t *Topic[M]) Subscribe() (*Subscription[M], error) {
	sub, err := t.t.Subscribe(pubsub.WithBufferSize(256))
	if err != nil {
		return nil, fmt.Errorf("topic %s: subscribe: %w", t.name, err)
	}
	return &Subscription[M]{sub: sub}, nil
}

// Next blocks until the next message or until ctx ends or the subscription
// is cancelled.
func (s *Subscription[M]) Next(ctx context.Context) (Received[M], error) {
	msg, err := s.sub.Next(ctx)
	if err != nil {
		return Received[M]{}, err
	}
	m, ok := msg.ValidatorData.(M)
	if !ok {
		// Our own messages skip validation when published locally? They
		// do not in GossipSub (local messages are validated too), so this
		// is a programming error; refuse it rather than crash.
		return Received[M]{}, fmt.Errorf("topic %s: message without decoded payload", s.sub.Topic())
	}
	return Received[M]{
		Author:       msg.GetFrom(),
		ReceivedFrom: msg.ReceivedFrom,
		Msg:          m,
		At:           time.Now(),
		Local:        msg.Local,
	}, nil
}

// Cancel stops the subscription.
func (s *Subscription[M]) Cancel() { s.sub.Cancel() }

// Close leaves the topic. Cancel subscriptions first.
func (t *Topic[M]) Close() error {
	return errors.Join(t.ps.UnregisterTopicValidator(t.name), t.t.Close())
}
