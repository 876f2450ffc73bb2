package testnet_test

import (
	"context"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/testnet"
)

// A verdict with a forged signature is rejected by the nodes that receive
// it, and its publisher loses their trust.
func TestForgedVerdictIsRejected(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	c, err := testnet.NewCluster(ctx, 2, testnet.ClusterOptions{Log: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a := c.Nodes()[0]
	cfg := p2ptest.Config(time.Second)
	cfg.Bootstrap = []peer.AddrInfo{{ID: a.ID(), Addrs: a.P2P().Addrs()}}
	key, _, _ := crypto.GenerateEd25519Key(nil)
	forger, err := p2p.New(key, cfg, p2p.WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { forger.Close() })
	if err := forger.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The forger's own topic lets anything through.
	topic, err := p2p.JoinTopic(forger.PubSub(), neuropb.TopicValidation, neuropb.MaxVerdictSize,
		func() *neuropb.Verdict { return new(neuropb.Verdict) },
		func(context.Context, peer.ID, *neuropb.Verdict) error { return nil }, forger.Rejections())
	if err != nil {
		t.Fatal(err)
	}
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	v, err := reputation.NewVerdict(key, reputation.Task{Model: cid.NewCidV1(cid.Raw, mh), Input: []float32{1, 2}, N: 1},
		c.Nodes()[1].ID(), []float32{3, 4}, [2]peer.ID{a.ID(), forger.ID()}, []float32{5, 6}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	v.Signature[0] ^= 1
	for i := 0; ; i++ {
		if st := a.Status(); st.Verdicts != nil && st.Verdicts.Rejected > 0 {
			break
		}
		if i == 100 {
			t.Fatal("the forged verdict never reached node 0")
		}
		_ = topic.Publish(ctx, v)
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	if !a.Book().Excluded(forger.ID()) || a.Book().Score(forger.ID()) != 0 {
		t.Fatalf("the forger is still trusted: %+v", a.Book().Snapshot())
	}
}
