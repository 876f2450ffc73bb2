package gating

import (
	"slices"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// A head finds more providers of a span it has heard of in the DHT, under
// the span's key (neuropb.SpanKey), where span nodes provide themselves.
func TestSpanProvidersFromTheDHT(t *testing.T) {
	ctx := t.Context()
	hs := p2ptest.Cluster(t, ctx, 4, p2ptest.Config(300*time.Millisecond))
	mh, _ := multihash.Sum([]byte("a model"), multihash.SHA2_256, -1)
	m := cid.NewCidV1(cid.Raw, mh)
	for _, h := range hs[1:3] {
		if err := h.Provide(ctx, neuropb.SpanKey(m, 0, 4)); err != nil {
			t.Fatal(err)
		}
	}
	if err := hs[3].Provide(ctx, neuropb.SpanKey(m, 4, 8)); err != nil {
		t.Fatal(err)
	}
	d := &dhtProviders{h: hs[0], model: m, found: map[expert.Key][]peer.ID{}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		d.refreshSpans(ctx, [][2]int{{0, 4}})
		got := d.spanProviders()
		ps := got[[2]int{0, 4}]
		if len(ps) == 2 && slices.Contains(ps, hs[1].ID()) && slices.Contains(ps, hs[2].ID()) {
			if _, other := got[[2]int{4, 8}]; other {
				t.Fatalf("providers of a span not asked for: %v", got)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("span providers %v, want %s and %s", got, hs[1].ID(), hs[2].ID())
		}
		time.Sleep(200 * time.Millisecond)
	}
}
