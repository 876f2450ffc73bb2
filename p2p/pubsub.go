package p2p

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/discovery"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
)

// GossipSub peer scoring.
//
// Scores decide which peers stay in our topic meshes, whom we gossip to and
// whose RPCs we ignore. The parameters follow the GossipSub v1.1 spec's
// guidance and the deployments that tuned it (Filecoin, Eth2), adapted to
// neuro's traffic: low-rate topics (a heartbeat every few seconds per node,
// occasional verdicts and ledger transactions) where every message is
// validated and an invalid one is proof of a broken or hostile peer.
//
//   - P4, invalid messages, carries the weight: -100 per topic weight, squared
//     counter, decaying over an hour. Two invalid heartbeats take a peer to
//     -400 x topic weight, past the gossip threshold; a handful reach the
//     graylist and every RPC from the peer is ignored.
//   - P1 (time in mesh) and P2 (first deliveries) give honest peers a small
//     positive score so that they win ties for mesh slots; both are capped so
//     that a long-lived peer cannot bank credit to spend on misbehaviour.
//   - P3 (mesh delivery deficit) is off: with sparse, bursty traffic its
//     penalty hits honest peers (the spec warns of this for low-rate topics).
//   - P5, the application score, is where reputation reaches GossipSub: a
//     peer the reputation system distrusts (weight 10 on a score in about
//     [-10, 1]) falls below the gossip and publish thresholds.
//   - P6 (IP colocation) penalises more than 10 peers on one IP, a cheap
//     Sybil pattern, except on loopback where local testnets live.
//   - P7 (behaviour) punishes GRAFT floods and broken promises.
//
// Thresholds: no gossip below -500, no flood publishing below -1000, every
// RPC ignored below -2500; peer exchange is accepted only from peers with a
// positive record (score >= 5), and opportunistic grafting kicks in when the
// mesh median falls below 3.
const (
	// gossipPeers (D_lazy, 6 by default) is how many non-mesh peers a
	// node sends IHAVE gossip to each GossipSub heartbeat, and
	// gossipHistory (3) how many heartbeats of message IDs it offers. The
	// routing topic carries about five heartbeats a second, each already
	// sent along six mesh links: on a saturated machine, IHAVE for a
	// message still waiting for validation drew an IWANT and one more copy
	// to validate (testnet sim, 300 nodes: 68 KB/s of gossip per node, 22
	// of it control, in a run that answered every prompt; 80 to 128, up to
	// 40 of it control, in runs that did not).
	gossipPeers   = 3
	gossipHistory = 2
	// gossipFactor is the share of a topic's non-mesh peers a node sends
	// IHAVE gossip to each GossipSub heartbeat (at least D_lazy, 6). At
	// the default 0.25 a node's gossip grew with its connections, hence
	// with the network: in a simulated network of 100 nodes, each
	// connected to almost all others, control messages were over half of
	// all gossip bytes.
	gossipFactor = 0

	gossipThreshold = -500
	// GraylistThreshold: every RPC from a peer scored at or below it is
	// ignored.
	publishThreshold    = -1000
	GraylistThreshold   = -2500
	acceptPXThreshold   = 5
	opportunisticGraft  = 3
	appSpecificWeight   = 10
	invalidMessageScore = -100
)

// scoreDecayInterval is how often GossipSub decays its score counters,
// every connected peer's at once (GossipSub's default: every second; the
// Ethereum beacon chain's: every 12 s slot). At every second it was 3% of
// a simulated 200-node network's CPU.
const scoreDecayInterval = 5 * time.Second

// scoreDecay is the factor that takes a counter to 1% of its value
// (decayToZero) in d, applied every scoreDecayInterval.
func scoreDecay(d time.Duration) float64 {
	return pubsub.ScoreParameterDecayWithBase(d, scoreDecayInterval, decayToZero)
}

const decayToZero = 0.01

// topicScore is the scoring of one topic; weight scales its share of the
// total score.
func topicScore(weight float64) *pubsub.TopicScoreParams {
	return &pubsub.TopicScoreParams{
		TopicWeight:                    weight,
		TimeInMeshWeight:               0.01,
		TimeInMeshQuantum:              time.Second,
		TimeInMeshCap:                  300, // at most +3 after 5 minutes in the mesh
		FirstMessageDeliveriesWeight:   0.5,
		FirstMessageDeliveriesDecay:    scoreDecay(10 * time.Minute),
		FirstMessageDeliveriesCap:      20,
		InvalidMessageDeliveriesWeight: invalidMessageScore,
		InvalidMessageDeliveriesDecay:  scoreDecay(time.Hour),
	}
}

// peerScoreParams builds the scoring for neuro's topics. appScore may be nil.
func peerScoreParams(appScore func(peer.ID) float64) (*pubsub.PeerScoreParams, *pubsub.PeerScoreThresholds) {
	if appScore == nil {
		appScore = func(peer.ID) float64 { return 0 }
	}
	_, loopback, _ := net.ParseCIDR("127.0.0.0/8")
	_, loopback6, _ := net.ParseCIDR("::1/128")
	params := &pubsub.PeerScoreParams{
		Topics: map[string]*pubsub.TopicScoreParams{
			neuropb.TopicRouting:    topicScore(0.5),
			neuropb.TopicValidation: topicScore(1),
			neuropb.TopicLedger:     topicScore(1),
		},
		TopicScoreCap:               20,
		AppSpecificScore:            appScore,
		AppSpecificWeight:           appSpecificWeight,
		IPColocationFactorWeight:    -10,
		IPColocationFactorThreshold: 10,
		IPColocationFactorWhitelist: []*net.IPNet{loopback, loopback6},
		BehaviourPenaltyWeight:      -10,
		BehaviourPenaltyThreshold:   6,
		BehaviourPenaltyDecay:       scoreDecay(10 * time.Minute),
		DecayInterval:               scoreDecayInterval,
		DecayToZero:                 decayToZero,
		RetainScore:                 10 * time.Minute,
	}
	thresholds := &pubsub.PeerScoreThresholds{
		GossipThreshold:             gossipThreshold,
		PublishThreshold:            publishThreshold,
		GraylistThreshold:           GraylistThreshold,
		AcceptPXThreshold:           acceptPXThreshold,
		OpportunisticGraftThreshold: opportunisticGraft,
	}
	return params, thresholds
}

// pubsubOptions is what newPubSub needs.
type pubsubOptions struct {
	appScore func(peer.ID) float64
	// peerExchange turns on PX in PRUNE messages; bootstrap nodes use it to
	// hand newcomers other peers.
	peerExchange bool
	routing      discovery.Discovery
	tracers      []pubsub.RawTracer
	// inspect, if positive, has scores receive every peer's score that
	// often.
	inspect time.Duration
	scores  func(map[peer.ID]float64)
	// copies, if not nil, drops copies of a message still being
	// validated (its inspector and a tracer).
	copies *copyFilter
}

// newPubSub starts GossipSub with strict signing (every message carries its
// author and signature, and unsigned ones are rejected), peer scoring, a
// bound on RPC size, and topic discovery (topicDiscovery) so that nodes find
// topic peers beyond their direct connections. ctx bounds the router's life;
// the caller cancels it on Close.
func newPubSub(ctx context.Context, h host.Host, o pubsubOptions, log *slog.Logger) (*pubsub.PubSub, error) {
	params, thresholds := peerScoreParams(o.appScore)
	gs := pubsub.DefaultGossipSubParams()
	gs.GossipFactor = gossipFactor
	gs.Dlazy, gs.HistoryGossip = gossipPeers, gossipHistory
	opts := []pubsub.Option{
		pubsub.WithGossipSubParams(gs),
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithPeerScore(params, thresholds),
		pubsub.WithPeerExchange(o.peerExchange),
		pubsub.WithFloodPublish(true),
		pubsub.WithMaxMessageSize(neuropb.MaxGossipRPCSize),
		pubsub.WithLogger(pubsubLogger(log)),
	}
	if o.routing != nil {
		opts = append(opts, pubsub.WithDiscovery(o.routing))
	}
	if o.copies != nil {
		opts = append(opts, pubsub.WithAppSpecificRpcInspector(o.copies.inspect), pubsub.WithRawTracer(o.copies))
	}
	for _, t := range o.tracers {
		opts = append(opts, pubsub.WithRawTracer(t))
	}
	if o.inspect > 0 {
		opts = append(opts, pubsub.WithPeerScoreInspect(o.scores, o.inspect))
	}
	ps, err := pubsub.NewGossipSub(ctx, h, opts...)
	if err != nil {
		return nil, fmt.Errorf("gossipsub: %w", err)
	}
	return ps, nil
}
