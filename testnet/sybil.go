package testnet

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/p2p"
)

// What a Sybil does. Every Sybil is a cheap peer: a bare libp2p host with
// the DHT (a client: it stores nothing) and GossipSub on the routing
// topic, no model, no compute. Sybil i does SybilKinds[i%4].
const (
	// sybilLiar announces, in heartbeats that are valid and signed, that
	// it hosts every expert of the model at a million tokens a second,
	// provides every expert's key in the DHT, and never answers an
	// expert call (it reads the request and stalls).
	sybilLiar = iota
	// sybilJunk publishes heartbeats honest nodes must reject (each
	// claims another peer's ID), as often as a liar publishes its own.
	sybilJunk
	// sybilDropper lies as a liar does and forwards nothing: its GossipSub
	// ignores every message it receives, so a mesh that holds it loses
	// what passes through it.
	sybilDropper
	// sybilEclipse lies as a liar does and connects straight to a victim
	// (the first gating node), to fill its connections and mesh slots.
	sybilEclipse
)

// SybilKinds names what Sybil i does: SybilKinds[i%len(SybilKinds)].
var SybilKinds = []string{"liar", "junk", "dropper", "eclipse"}

// sybilProvides is how many experts' keys each lying Sybil provides.
const sybilProvides = 2

// SybilReport is what the Sybils did and what the honest nodes made of
// them.
type SybilReport struct {
	Count int `json:"count"`
	// Kinds counts the Sybils of each kind.
	Kinds map[string]int `json:"kinds"`
	// JoinS is how long the Sybils took to join, JoinRate a second, and
	// make their provides, before the measured run started.
	JoinS float64 `json:"join_s"`
	// Published is how many heartbeats (lying or junk) they published.
	Published int `json:"published"`
	// ExpertCalls counts the expert calls that reached a Sybil (each
	// stalled).
	ExpertCalls int `json:"expert_calls"`
	// Scores are the GossipSub scores the live honest nodes give their
	// connected peers at the end, honest and Sybil (of each kind); a
	// Sybil below the graylist threshold is ignored by that node.
	HonestScores Dist            `json:"honest_scores"`
	SybilScores  Dist            `json:"sybil_scores"`
	KindScores   map[string]Dist `json:"kind_scores"`
	// Graylisted is the share of the honest nodes' scores of Sybils that
	// are at or below GossipSub's graylist threshold.
	Graylisted float64 `json:"graylisted"`
	// Connections from honest nodes to Sybils, and to honest peers, at
	// the end (per honest node, median), and the victim's.
	HonestConnsToSybils float64 `json:"honest_conns_to_sybils"`
	HonestConnsToHonest float64 `json:"honest_conns_to_honest"`
	VictimConnsToSybils int     `json:"victim_conns_to_sybils"`
	VictimConnsToHonest int     `json:"victim_conns_to_honest"`
	// ClaimedProvidersSeen is, over the gating nodes, how many peers
	// their heartbeat tables show hosting the model's first expert,
	// honest and lying.
	ClaimedProvidersSeen Dist `json:"claimed_providers_seen"`
}

// sybil is one Sybil peer.
type sybil struct {
	kind   int
	h      host.Host
	dht    *dht.IpfsDHT
	ps     *pubsub.PubSub
	topic  *pubsub.Topic
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startSybil starts Sybil i: it joins through the bootstrap nodes (and an
// eclipse Sybil through the victim too), poisons the DHT and begins to
// lie in heartbeats.
func (sm *simulation) startSybil(ctx context.Context, i int) (*sybil, error) {
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return nil, err
	}
	cm, err := connmgr.NewConnManager(16, 64)
	if err != nil {
		return nil, err
	}
	h, err := libp2p.New(libp2p.Identity(key), libp2p.NoTransports, libp2p.Transport(sm.net.Transport()),
		libp2p.ListenAddrs(sm.net.Addr()), libp2p.Security(noise.ID, noise.New), libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.ConnectionManager(cm), libp2p.ResourceManager(&network.NullResourceManager{}), libp2p.DisableRelay())
	if err != nil {
		return nil, fmt.Errorf("sybil %d: %w", i, err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	y := &sybil{kind: i % len(SybilKinds), h: h, cancel: cancel}
	fail := func(err error) (*sybil, error) {
		y.close()
		return nil, fmt.Errorf("sybil %d: %w", i, err)
	}
	boot, err := peer.AddrInfosFromP2pAddrs(sm.bootAddrs()...)
	if err != nil {
		return fail(err)
	}
	if y.dht, err = dht.New(h, dht.ProtocolPrefix(neuropb.DHTPrefix), dht.Mode(dht.ModeClient), dht.BootstrapPeers(boot...)); err != nil {
		return fail(err)
	}
	if y.ps, err = pubsub.NewGossipSub(sctx, h, pubsub.WithMessageSignaturePolicy(pubsub.StrictSign)); err != nil {
		return fail(err)
	}
	if y.kind == sybilDropper {
		self := h.ID()
		drop := func(_ context.Context, from peer.ID, _ *pubsub.Message) pubsub.ValidationResult {
			if from == self {
				return pubsub.ValidationAccept
			}
			return pubsub.ValidationIgnore
		}
		if err := y.ps.RegisterTopicValidator(neuropb.TopicRouting, drop); err != nil {
			return fail(err)
		}
	}
	if y.topic, err = y.ps.Join(neuropb.TopicRouting); err != nil {
		return fail(err)
	}
	sub, err := y.topic.Subscribe() // a subscriber is in the topic's mesh
	if err != nil {
		return fail(err)
	}
	y.wg.Go(func() {
		for {
			if _, err := sub.Next(sctx); err != nil {
				return
			}
		}
	})
	h.SetStreamHandler(neuropb.ExpertProtocol, func(s network.Stream) { sm.stall(sctx, s) })
	connected := 0
	for _, ai := range boot {
		if h.Connect(ctx, ai) == nil {
			connected++
		}
	}
	if connected == 0 {
		return fail(fmt.Errorf("no bootstrap node answered"))
	}
	if y.kind == sybilEclipse {
		if v := sm.victim(); v != nil {
			_ = h.Connect(ctx, peer.AddrInfo{ID: v.n.ID(), Addrs: v.n.P2P().Addrs()})
		}
	}
	if err := y.dht.Bootstrap(sctx); err != nil {
		return fail(err)
	}
	rng := rand.New(rand.NewPCG(rand.Uint64(), 0))
	sm.poison(ctx, y, rng)
	y.wg.Go(func() { sm.lie(sctx, y, rng) })
	return y, nil
}

// poison provides, for every kind of Sybil but junk, a few experts' keys
// in the DHT, before the Sybil counts as started: the measured run starts
// with the DHT's records poisoned, not while hundreds of Sybils, all in
// this process, still make their provides (each a lookup and twenty
// dials: 100 to 290 dials a second for the first 20 s of a run with 400
// Sybils, two cores busy with the attackers' own work).
func (sm *simulation) poison(ctx context.Context, y *sybil, rng *rand.Rand) {
	switch y.kind {
	case sybilLiar, sybilDropper, sybilEclipse:
		// A few keys each: hundreds of Sybils then poison every key's
		// records (more Sybil records than honest ones), at a cost of DHT
		// lookups this machine can pay.
		for _, j := range rng.Perm(len(sm.keys))[:min(sybilProvides, len(sm.keys))] {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_ = y.dht.Provide(pctx, sm.keys[j], true)
			cancel()
			if ctx.Err() != nil {
				return
			}
		}
	}
}

// bootAddrs are the bootstrap nodes' /p2p addresses.
func (sm *simulation) bootAddrs() []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, len(sm.boot))
	for _, s := range sm.boot {
		if a, err := ma.NewMultiaddr(s); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// victim is the node eclipse Sybils surround: the first gating node.
func (sm *simulation) victim() *simNode {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	for _, n := range sm.nodes {
		if n.Role == "gating" {
			return n
		}
	}
	return nil
}

// stall is a Sybil's expert handler: it takes the request and never
// answers, until the caller gives up.
func (sm *simulation) stall(ctx context.Context, s network.Stream) {
	sm.mu.Lock()
	sm.sybilRep.ExpertCalls++
	sm.mu.Unlock()
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, s)
		close(done)
	}()
	select {
	case <-ctx.Done():
	case <-time.After(time.Minute):
	case <-done:
		// The caller closed its side: wait for it to give up.
		select {
		case <-ctx.Done():
		case <-time.After(time.Minute):
		}
	}
	_ = s.Reset()
}

// lie publishes y's heartbeats at an honest node's pace (one per
// max(5 s, nodes ÷ 5 a second)).
func (sm *simulation) lie(ctx context.Context, y *sybil, rng *rand.Rand) {
	all := slices.Clone(sm.keyExperts)
	interval := max(5*time.Second, time.Duration(float64(sm.s.Nodes+sm.s.Sybils)/float64(node.DefaultHeartbeatRate)*float64(time.Second)))
	var seq uint64
	start := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(float64(interval) * (0.5 + rng.Float64()))):
		}
		seq++
		id := []byte(y.h.ID())
		if y.kind == sybilJunk {
			other, _, _ := crypto.GenerateEd25519Key(nil)
			forged, _ := peer.IDFromPrivateKey(other)
			id = []byte(forged)
		}
		var addrs [][]byte
		for _, a := range y.h.Addrs() {
			addrs = append(addrs, a.Bytes())
		}
		hb := &neuropb.Heartbeat{PeerId: id, Seq: seq, SentUnixMs: time.Now().UnixMilli(), Roles: []neuropb.Role{neuropb.Role_ROLE_EXPERT},
			UptimeS: uint64(time.Since(start).Seconds()), Version: p2p.Version, Addrs: addrs,
			Hosted:     []*neuropb.HostedModel{{Model: sm.model.CID.Bytes(), Experts: all}},
			Capacity:   &neuropb.Capacity{FreeMemoryBytes: 1 << 40, TokensPerSecond: 1e6},
			IntervalMs: uint32(interval.Milliseconds()), PeersHeard: uint32(sm.s.Nodes + sm.s.Sybils)}
		data, err := proto.Marshal(hb)
		if err != nil {
			continue
		}
		if y.topic.Publish(ctx, data) == nil {
			sm.mu.Lock()
			sm.sybilRep.Published++
			sm.mu.Unlock()
		}
	}
}

// close stops y.
func (y *sybil) close() {
	y.cancel()
	if y.dht != nil {
		_ = y.dht.Close()
	}
	_ = y.h.Close()
	y.wg.Wait()
}

// launchSybils starts the Sybils, JoinRate a second, once the honest
// network is healthy.
func (sm *simulation) launchSybils(ctx context.Context) error {
	if sm.s.Sybils == 0 {
		return nil
	}
	sm.sybilRep = SybilReport{Count: sm.s.Sybils, Kinds: map[string]int{}}
	every := time.Duration(float64(time.Second) / sm.s.JoinRate)
	tick := time.NewTicker(every)
	defer tick.Stop()
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range sm.s.Sybils {
		select {
		case <-tick.C:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		wg.Go(func() {
			y, err := sm.startSybil(ctx, i)
			if err != nil {
				sm.log.Warn("sim: sybil did not start", "err", err)
				return
			}
			sm.mu.Lock()
			sm.sybils = append(sm.sybils, y)
			sm.sybilRep.Kinds[SybilKinds[y.kind]]++
			sm.mu.Unlock()
		})
	}
	wg.Wait()
	sm.sybilRep.JoinS = time.Since(t0).Seconds()
	sm.log.Info("sim: sybils started", "sybils", len(sm.sybils), "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// sybilScores fills in what the live honest nodes made of the Sybils.
func (sm *simulation) sybilScores() {
	if sm.s.Sybils == 0 {
		return
	}
	sm.mu.Lock()
	kind := make(map[peer.ID]int, len(sm.sybils))
	for _, y := range sm.sybils {
		kind[y.h.ID()] = y.kind
	}
	sm.mu.Unlock()
	var honest, sybils []float64
	perKind := map[int][]float64{}
	var toSybils, toHonest, claimed []float64
	victim := sm.victim()
	graylisted := 0
	for _, n := range sm.live() {
		for p, sc := range n.n.P2P().Scores() {
			if k, ok := kind[p]; ok {
				sybils = append(sybils, sc)
				perKind[k] = append(perKind[k], sc)
				if sc <= p2p.GraylistThreshold {
					graylisted++
				}
			} else {
				honest = append(honest, sc)
			}
		}
		s, h := 0, 0
		for _, p := range n.n.P2P().LibP2P().Network().Peers() {
			if _, ok := kind[p]; ok {
				s++
			} else {
				h++
			}
		}
		toSybils, toHonest = append(toSybils, float64(s)), append(toHonest, float64(h))
		if n == victim {
			sm.sybilRep.VictimConnsToSybils, sm.sybilRep.VictimConnsToHonest = s, h
		}
		if n.Role == "gating" {
			claimed = append(claimed, float64(len(n.n.P2P().Peers().Hosting(sm.model.CID.Bytes(), sm.keyExperts[0], time.Now()))))
		}
	}
	r := &sm.sybilRep
	r.HonestScores, r.SybilScores = distOf(honest), distOf(sybils)
	r.KindScores = map[string]Dist{}
	for k, v := range perKind {
		r.KindScores[SybilKinds[k]] = distOf(v)
	}
	if len(sybils) > 0 {
		r.Graylisted = float64(graylisted) / float64(len(sybils))
	}
	r.HonestConnsToSybils, r.HonestConnsToHonest = distOf(toSybils).P50, distOf(toHonest).P50
	r.ClaimedProvidersSeen = distOf(claimed)
}

// stopSybils closes every Sybil.
func (sm *simulation) stopSybils() {
	sm.mu.Lock()
	ys := sm.sybils
	sm.sybils = nil
	sm.mu.Unlock()
	var wg sync.WaitGroup
	for _, y := range ys {
		wg.Go(y.close)
	}
	wg.Wait()
}
