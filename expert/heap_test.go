package expert

import (
	"context"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// forcedGCs is the process's count of forced collections (what
// debug.FreeOSMemory runs).
func forcedGCs() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// TestLoadingReleasesTheHeap: once a service has loaded the experts it
// was told to host, the heap that reading their shards freed goes back to
// the system at once (a forced collection); with KeepHeap (other nodes in
// the process) it is left to the runtime.
func TestLoadingReleasesTheHeap(t *testing.T) {
	mc, m, dir := tinyShards(t, model.Q8_0)
	var keys []Key
	for _, e := range m.GetExperts() {
		keys = append(keys, Key{Layer: int(e.GetLayer()), Expert: int(e.GetExpert())})
	}
	for _, keep := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		nodes := p2ptest.Cluster(t, ctx, 1, p2ptest.Config(time.Second))
		s, err := NewService(nodes[0], ServiceConfig{StoreDir: t.TempDir(), Model: mc, Spec: Spec{Experts: keys},
			Compute: moetest.Backend{}, Threads: 1, Server: DefaultConfig(), KeepHeap: keep}, quiet())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Store().ImportSplit(dir); err != nil {
			t.Fatal(err)
		}
		before := forcedGCs()
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.chose: // host returned: every expert loaded
		case <-ctx.Done():
			t.Fatal("the experts were not loaded")
		}
		if got := len(s.Loaded()); got != len(keys) {
			t.Fatalf("keep %v: %d experts loaded, want %d", keep, got, len(keys))
		}
		forced := forcedGCs() - before
		if keep && forced != 0 {
			t.Errorf("KeepHeap: %d forced collections after loading, want none", forced)
		}
		if !keep && forced == 0 {
			t.Error("no forced collection after loading: the heap was not returned")
		}
		s.Close()
		cancel()
	}
}
