package node

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// A span node provides the span it serves in the DHT under its span key,
// so that heads find it beyond the heartbeats they hear; it stops with
// its context.
func TestSpanHostProvidesItsSpan(t *testing.T) {
	ctx := t.Context()
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(300*time.Millisecond))
	mh, _ := multihash.Sum([]byte("a model"), multihash.SHA2_256, -1)
	m := cid.NewCidV1(cid.Raw, mh)
	s := &spanHost{model: m, dht: hs[1], part: moe.Part{First: 2, End: 5}, serving: true, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	pctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.provide(pctx)
	}()
	defer func() {
		cancel()
		<-done
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		infos, err := hs[2].FindProviders(ctx, neuropb.SpanKey(m, 2, 5), 5, 5*time.Second)
		if err == nil && len(infos) == 1 && infos[0].ID == hs[1].ID() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("providers of the span: %v, %v; want %s", infos, err, hs[1].ID())
		}
		time.Sleep(200 * time.Millisecond)
	}
}
