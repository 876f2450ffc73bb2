package p2p

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/discovery"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
)

// rendezvous records what GossipSub asked of the DHT.
type rendezvous struct {
	advertised, found []string
	limits            []int
}

func (r *rendezvous) Advertise(_ context.Context, ns string, _ ...discovery.Option) (time.Duration, error) {
	r.advertised = append(r.advertised, ns)
	return time.Minute, nil
}

func (r *rendezvous) FindPeers(_ context.Context, ns string, opts ...discovery.Option) (<-chan peer.AddrInfo, error) {
	var o discovery.Options
	if err := o.Apply(opts...); err != nil {
		return nil, err
	}
	r.found, r.limits = append(r.found, ns), append(r.limits, o.Limit)
	ch := make(chan peer.AddrInfo)
	close(ch)
	return ch, nil
}

// The topics every node joins are neither advertised nor looked up in the
// DHT: their peers are drawn from the candidates, a mesh's worth at a
// time and not always the same ones. Other topics keep the DHT's
// rendezvous, with bounded answers.
func TestTopicDiscovery(t *testing.T) {
	var cands []peer.AddrInfo
	for i := range 100 {
		cands = append(cands, peer.AddrInfo{ID: peer.ID(fmt.Sprintf("peer-%d", i))})
	}
	dht := &rendezvous{}
	d := topicDiscovery{dht: dht, candidates: func() []peer.AddrInfo { return append([]peer.AddrInfo(nil), cands...) }}
	ctx := context.Background()
	drawn := map[peer.ID]bool{}
	for _, topic := range []string{neuropb.TopicRouting, neuropb.TopicValidation} {
		ns := "floodsub:" + topic
		if ttl, err := d.Advertise(ctx, ns); err != nil || ttl <= 0 {
			t.Fatalf("advertise %s: %v, %v", ns, ttl, err)
		}
		for range 5 {
			ch, err := d.FindPeers(ctx, ns)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for ai := range ch {
				n++
				drawn[ai.ID] = true
			}
			if n != topicPeersWanted {
				t.Fatalf("%s: %d peers, want %d", ns, n, topicPeersWanted)
			}
		}
		ch, _ := d.FindPeers(ctx, ns, discovery.Limit(3))
		if n := len(ch); n != 3 {
			t.Fatalf("%s with a limit of 3: %d peers", ns, n)
		}
	}
	if len(drawn) <= topicPeersWanted {
		t.Errorf("ten draws returned the same %d peers", len(drawn))
	}
	if len(dht.advertised)+len(dht.found) != 0 {
		t.Fatalf("the DHT was asked: advertised %v, looked up %v", dht.advertised, dht.found)
	}
	ledger := "floodsub:" + neuropb.TopicLedger
	if _, err := d.Advertise(ctx, ledger); err != nil {
		t.Fatal(err)
	}
	if _, err := d.FindPeers(ctx, ledger); err != nil {
		t.Fatal(err)
	}
	if len(dht.advertised) != 1 || len(dht.found) != 1 || dht.limits[0] != topicPeersWanted {
		t.Fatalf("ledger topic: advertised %v, looked up %v with limits %v; want the DHT, at most %d peers",
			dht.advertised, dht.found, dht.limits, topicPeersWanted)
	}
	// Connected to some of the topic's peers: candidates make up the rest
	// to topicPeersWanted, none of them already connected; connected to
	// that many, topicPeersNew (some connected peers may be ones the mesh
	// will not take).
	var asked []string
	connected := cands[:topicPeersWanted-5]
	d.topicPeers = func(topic string) []peer.ID {
		asked = append(asked, topic)
		var ids []peer.ID
		for _, ai := range connected {
			ids = append(ids, ai.ID)
		}
		return ids
	}
	ch, _ := d.FindPeers(ctx, "floodsub:"+neuropb.TopicValidation)
	if len(ch) != 5 || len(asked) != 1 || asked[0] != neuropb.TopicValidation {
		t.Fatalf("connected to %d of the topic: %d candidates, topics asked %v; want 5 and %s",
			len(connected), len(ch), asked, neuropb.TopicValidation)
	}
	for ai := range ch {
		if slices.ContainsFunc(connected, func(c peer.AddrInfo) bool { return c.ID == ai.ID }) {
			t.Fatalf("candidate %s is connected already", ai.ID)
		}
	}
	connected = cands[:topicPeersWanted+5]
	if ch, _ := d.FindPeers(ctx, "floodsub:"+neuropb.TopicRouting); len(ch) != topicPeersNew {
		t.Fatalf("connected to %d of the topic: %d candidates, want %d", len(connected), len(ch), topicPeersNew)
	}
	if ch, _ := d.FindPeers(ctx, "floodsub:"+neuropb.TopicRouting, discovery.Limit(1)); len(ch) != 1 {
		t.Fatalf("connected to %d of the topic, a limit of 1: %d candidates", len(connected), len(ch))
	}
	d.topicPeers = nil

	// Few candidates: all of them.
	cands = cands[:2]
	ch, _ = d.FindPeers(ctx, "floodsub:"+neuropb.TopicRouting)
	if len(ch) != 2 {
		t.Fatalf("two candidates: %d peers", len(ch))
	}
}
