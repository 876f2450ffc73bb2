package gating

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/reputation"
)

// A gating engine that was asked to serve a model it cannot load and one
// that no peer has (its fetch retries until the engine closes) leaves no
// goroutine of gating or expert behind once closed; a second Close is
// harmless. NewEngine refuses to build without a compute backend.
func TestEngineCloseLeavesNoGoroutine(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	hs := p2ptest.Cluster(t, ctx, 1, p2ptest.Config(300*time.Millisecond))
	dir, split := splitModel(t, model.Presets["tiny"], model.F32, 3)
	snap := leaktest.Take("github.com/neuro-p2p/neuro/gating", "github.com/neuro-p2p/neuro/expert")

	store, err := expert.NewService(hs[0], expert.ServiceConfig{StoreDir: filepath.Join(dir, "store"), Server: expert.DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Store().ImportSplit(filepath.Join(dir, "shards")); err != nil {
		t.Fatal(err)
	}
	if _, err := NewEngine(hs[0], store, EngineConfig{}, quiet()); !errors.Is(err, moe.ErrNoBackend) {
		t.Fatalf("an engine without a backend: %v", err)
	}
	book, err := reputation.Open(reputation.Config{})
	if err != nil {
		t.Fatal(err)
	}
	eng, err := NewEngine(hs[0], store, EngineConfig{Compute: moetest.Backend{}, Book: book}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := eng.Start(ctx); err != nil {
		t.Fatal(err)
	}
	mh, _ := multihash.Sum([]byte("no such model"), multihash.SHA2_256, -1)
	missing := cid.NewCidV1(cid.Raw, mh)
	eng.Serve(split.ModelCID)
	eng.Serve(missing)
	for {
		ms := eng.Models()
		loaded := 0
		for _, m := range ms {
			if m.CID.Equals(split.ModelCID) && m.Err != nil {
				loaded++
			}
		}
		if loaded == 1 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the model's load did not fail: %+v", ms)
		case <-time.After(20 * time.Millisecond):
		}
	}
	for _, c := range []interface{ Close() error }{eng, store, eng} {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	snap.Check(t)
}
