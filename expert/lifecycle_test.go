package expert

import (
	"context"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/internal/leaktest"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// An expert node that fetched, loaded and served experts leaves no
// goroutine behind once closed (nor its expert client), and a second
// Close is harmless.
func TestServiceCloseLeavesNoGoroutine(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	hs, extras := p2ptest.ClusterWithExtras(t, ctx, 2, p2ptest.Config(300*time.Millisecond))
	mc, m, dir := tinyShards(t, model.Q8_0)
	snap := leaktest.Take("github.com/neuro-p2p/neuro/expert")

	origin, err := NewService(hs[0], ServiceConfig{StoreDir: t.TempDir(), Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := origin.Store().ImportSplit(dir); err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(hs[1], ServiceConfig{StoreDir: t.TempDir(), Model: mc, Spec: Spec{Auto: true}, Compute: moetest.Backend{},
		MemoryBudget: 1 << 30, Threads: 1, Server: DefaultConfig(), Step: 100 * time.Millisecond}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	extras[1].Set(svc.HeartbeatExtra)
	for _, s := range []*Service{origin, svc} {
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for len(svc.Loaded()) < len(m.GetExperts()) {
		select {
		case <-ctx.Done():
			t.Fatalf("%d of %d experts loaded", len(svc.Loaded()), len(m.GetExperts()))
		case <-time.After(50 * time.Millisecond):
		}
	}
	// A call through a client, so that its session's reader runs too.
	cl := NewClient(hs[0].LibP2P(), quiet())
	x := make([]float32, m.GetParams().GetEmbd())
	if _, err := cl.Call(ctx, hs[1].ID(), Request{Model: mc, Layer: 0, Expert: 0, Hidden: x, N: 1}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []interface{ Close() error }{cl, svc, origin, svc, cl} {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	snap.Check(t)
}
