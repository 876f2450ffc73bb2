package expert

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// Import a tiny model on one node; three other nodes with automatic
// hosting fetch, verify and host all experts between them, each expert on
// at least two nodes, with shards byte-identical to the split output.
func TestAutoHostingCoversEveryExpertTwice(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nodes, extras := p2ptest.ClusterWithExtras(t, ctx, 4, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	origin, err := NewService(nodes[0], ServiceConfig{StoreDir: t.TempDir(), Server: DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	if _, err := origin.Store().ImportSplit(dir); err != nil {
		t.Fatal(err)
	}
	if err := origin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	shardSize := int64(m.GetExperts()[0].GetShard().GetSize())
	var svcs []*Service
	for i, n := range nodes[1:] {
		s, err := NewService(n, ServiceConfig{StoreDir: t.TempDir(), Model: mc, Spec: Spec{Auto: true}, Compute: moetest.Backend{},
			MemoryBudget: 6 * shardSize, Threads: 1, Server: DefaultConfig(), Step: 300 * time.Millisecond},
			slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", n.ID().String()[46:]))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		extras[i+1].Set(s.HeartbeatExtra)
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
		svcs = append(svcs, s)
	}
	experts := len(m.GetExperts())
	covered := func() (int, map[Key]int) {
		count := map[Key]int{}
		for _, s := range svcs {
			for _, k := range s.Loaded() {
				count[k]++
			}
		}
		ok := 0
		for _, n := range count {
			if n >= 2 {
				ok++
			}
		}
		return ok, count
	}
	for {
		ok, count := covered()
		if ok == experts {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("after 120 s only %d of %d experts are on two nodes: %v", ok, experts, count)
		case <-time.After(200 * time.Millisecond):
		}
	}
	for _, s := range svcs {
		for _, k := range s.Loaded() {
			ref := m.GetExperts()[k.Layer*int(m.GetParams().GetExperts())+k.Expert].GetShard()
			bc, _ := cid.Cast(ref.GetCid())
			want, _ := os.ReadFile(model.ShardPath(dir, bc))
			have, err := os.ReadFile(filepath.Join(s.Store().Dir(), bc.String()+blobExt))
			if err != nil || !bytes.Equal(want, have) {
				t.Fatalf("expert %s: stored shard differs from the split output: %v", k, err)
			}
		}
	}
}
