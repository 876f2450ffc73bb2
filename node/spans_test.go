package node

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// A span node provides the span it serves in the DHT under its span key,
// with the blobs its expert service provides (spanHost.keys through
// expert.ServiceConfig.Announce), so that heads find it beyond the
// heartbeats they hear; a span not served yet is not provided.
func TestSpanHostProvidesItsSpan(t *testing.T) {
	ctx := t.Context()
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(300*time.Millisecond))
	mh, _ := multihash.Sum([]byte("a model"), multihash.SHA2_256, -1)
	m := cid.NewCidV1(cid.Raw, mh)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := &spanHost{model: m, part: moe.Part{First: 2, End: 5}, log: log}
	if k := s.keys(); len(k) != 0 {
		t.Fatalf("keys of a span not served yet: %v", k)
	}
	s.serving = true
	svc, err := expert.NewService(hs[1], expert.ServiceConfig{StoreDir: t.TempDir(), Server: expert.DefaultConfig(), Announce: s.keys}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	if err := svc.Start(ctx); err != nil {
		t.Fatal(err)
	}
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
