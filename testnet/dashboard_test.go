package testnet_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe/moetest"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet"
)

// waitUntil polls check every 100 ms until it returns nil, for at most
// limit (a bound on the loop, not a timing assertion).
func waitUntil(t *testing.T, limit time.Duration, what string, check func() error) {
	t.Helper()
	var err error
	for end := time.Now().Add(limit); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if err = check(); err == nil {
			return
		}
	}
	t.Fatalf("%s: not within %v: %v", what, limit, err)
}

func getJSON(t *testing.T, url string, v any) error {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// A live in-process network of three nodes with homes: node 0 holds the
// model's shards and serves the dashboard; nodes 1 and 2 host every
// expert. /api/v1/state shows the three nodes and every expert with two
// providers; /metrics is Prometheus text with neuro's and libp2p's
// metrics. Node 2 runs --idle-only on an injected load signal: a busy
// spell pauses it (its heartbeat says so, its experts answer busy, the
// dashboard shows the experts at risk) and an idle spell resumes it.
func TestDashboardStateMetricsAndIdleOnly(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes that fetch and load experts")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	params := model.Presets["tiny"]
	params.Layers, params.Experts = 3, 5
	var buf bytes.Buffer
	if err := model.Generate(&buf, params, model.Q8_0, 4242); err != nil {
		t.Fatal(err)
	}
	gguf := filepath.Join(dir, "m.gguf")
	if err := os.WriteFile(gguf, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	split, err := model.Split(gguf, filepath.Join(dir, "shards"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var busy atomic.Bool
	load := func() (node.LoadSample, error) {
		if busy.Load() {
			return node.LoadSample{Others: 0.9}, nil
		}
		return node.LoadSample{Others: 0.05}, nil
	}
	var nodes []*node.Node
	t.Cleanup(func() {
		for i := len(nodes) - 1; i >= 0; i-- {
			nodes[i].Close()
		}
	})
	var boot []string
	for i := range 3 {
		home := filepath.Join(dir, fmt.Sprintf("node-%d", i))
		if _, err := node.Init(home, false); err != nil {
			t.Fatal(err)
		}
		cfg := testnet.LoopbackConfig()
		cfg.API.Listen = ""
		cfg.Expert.Model = split.ModelCID.String()
		cfg.Expert.Experts = "0:*,1:*,2:*"
		cfg.P2P.Bootstrap = boot
		// The pure-Go backend: the experts compute for real without
		// llama.cpp, so that this test runs with the race detector.
		opts := []node.Option{node.WithHome(home), node.WithLogger(log.With("node", i)), node.WithCompute(moetest.Backend{})}
		switch i {
		case 0:
			store, err := expert.OpenStore(filepath.Join(home, node.StoreDir))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := store.ImportSplit(filepath.Join(dir, "shards")); err != nil {
				t.Fatal(err)
			}
			cfg.Expert.Experts = "none"
			cfg.P2P.Roles = []string{"bootstrap"}
			cfg.HTTP.Listen = "127.0.0.1:0"
		case 2:
			cfg.Home.IdleOnly = true
			cfg.Home.IdleCheck = node.Duration(100 * time.Millisecond)
			opts = append(opts, node.WithLoadSignal(load))
		}
		n, err := node.New(cfg, opts...)
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			for _, a := range n.P2P().Addrs() {
				boot = append(boot, a.String()+"/p2p/"+n.ID().String())
			}
		}
	}
	base := "http://" + nodes[0].HTTPAddr()
	var st node.State
	coverage := func(want int) func() error {
		return func() error {
			st = node.State{}
			if err := getJSON(t, base+node.StatePath, &st); err != nil {
				return err
			}
			if len(st.Nodes) != 3 {
				return fmt.Errorf("%d nodes", len(st.Nodes))
			}
			if len(st.Coverage) != params.Layers*params.Experts {
				return fmt.Errorf("%d coverage entries", len(st.Coverage))
			}
			for _, c := range st.Coverage {
				if c.Providers != want {
					return fmt.Errorf("expert %d:%d has %d providers, want %d", c.Layer, c.Expert, c.Providers, want)
				}
			}
			return nil
		}
	}
	waitUntil(t, time.Minute, "every expert on both expert nodes", coverage(2))
	if !st.Nodes[0].Self || st.Nodes[0].PeerID != nodes[0].ID().String() || len(st.Models) != 1 || !st.Models[0].Known ||
		st.Models[0].Layers != params.Layers || st.Models[0].Experts != params.Experts {
		t.Fatalf("state: %+v", st)
	}
	for _, n := range st.Nodes[1:] {
		if len(n.Experts) != params.Layers*params.Experts || n.Reachability != "direct" || n.Score <= 0 || n.Paused {
			t.Fatalf("expert node in the state: %+v", n)
		}
	}

	// /metrics: valid text exposition, with neuro's and libp2p's metrics.
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(prommodel.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	var libp2p int
	for name := range families {
		if strings.HasPrefix(name, "libp2p_") {
			libp2p++
		}
	}
	if libp2p == 0 || families["neuro_peers_heard"] == nil || families["neuro_shard_fetched_bytes_total"] == nil ||
		families["libp2p_rcmgr_connections"] == nil {
		names := make([]string, 0, len(families))
		for n := range families {
			names = append(names, n)
		}
		t.Fatalf("metrics: %d libp2p families; have %v", libp2p, names)
	}
	if v := families["neuro_peers_heard"].GetMetric()[0].GetGauge().GetValue(); v != 2 {
		t.Fatalf("neuro_peers_heard %v", v)
	}

	// Busy: node 2 pauses, says so, and its experts answer busy.
	busy.Store(true)
	waitUntil(t, 30*time.Second, "node 2 paused on the dashboard", func() error {
		if err := coverage(1)(); err != nil {
			return err
		}
		for _, n := range st.Nodes {
			if n.PeerID == nodes[2].ID().String() && !n.Paused {
				return fmt.Errorf("node 2 not shown paused")
			}
		}
		return nil
	})
	c := expert.NewClient(nodes[0].P2P().LibP2P(), log)
	x := make([]float32, params.Embd)
	_, err = c.Call(ctx, nodes[2].ID(), expert.Request{Model: split.ModelCID, Layer: 0, Expert: 0, Hidden: x, N: 1})
	if err == nil || !strings.Contains(err.Error(), "paused") {
		t.Fatalf("call to a paused node: %v", err)
	}
	if _, err := c.Call(ctx, nodes[1].ID(), expert.Request{Model: split.ModelCID, Layer: 0, Expert: 0, Hidden: x, N: 1}); err != nil {
		t.Fatalf("call to the node that is not paused: %v", err)
	}
	// Idle again: it resumes and the experts have two providers again.
	busy.Store(false)
	waitUntil(t, 30*time.Second, "node 2 resumed", coverage(2))
	if _, err := c.Call(ctx, nodes[2].ID(), expert.Request{Model: split.ModelCID, Layer: 0, Expert: 0, Hidden: x, N: 1}); err != nil {
		t.Fatalf("call after resuming: %v", err)
	}
}
