package main

import (
	"encoding/json"
	"github.com/neuro-p2p/neuro/testnet"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet/netns"
)

// `neurod bench` on a small model: every run gives llama.cpp's tokens (it
// fails otherwise), and the report directory holds the table, a PNG plot
// and the JSON. Over 20 ms of emulated RTT no token beats the layers'
// round trips (a lower bound: a busy machine only adds time). With each
// expert on one of two homes, some layers need both. Speculative decoding
// on a model of the same shape that repeats a list keeps drafted tokens
// and needs fewer round trips per token, with prompt lookup and with a
// draft model.
func TestBenchReport(t *testing.T) {
	t.Parallel() // mostly waiting
	path := makeModel(t, "--preset", "tiny", "--type", "q8_0", "--seed", "41", "--layers", "3", "--experts", "6", "--embd", "96")
	out := filepath.Join(t.TempDir(), "report")
	args := []string{"bench", "--model", path, "--out", out, "--max-tokens", "8", "--rtt", "20ms", "--json", "--concurrency", "3",
		"--placement-rtt", "20ms", "--placement-far", "40ms", "--placement-jitter", "2ms", "--speculate-rtt", "20ms", "--concurrency-rtt", "20ms"}
	withNetns := netns.Available() == nil
	if !withNetns {
		if os.Getenv("NEURO_REQUIRE_NETNS") != "" {
			t.Fatalf("network namespaces: %v", netns.Available())
		}
		args = append(args, "--no-netns")
	}
	r := neurodWithin(t, 12*time.Minute, nil, args...) // twelve testnets, eight of them netns
	if r.code != 0 {
		t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	var rep testnet.BenchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	names := []string{}
	for _, row := range rep.Rows {
		names = append(names, row.Name)
	}
	where := "netns 20 ms"
	if !withNetns {
		where = "testnet"
	}
	spec := ""
	for _, kind := range []string{"off", "ngram", "draft"} {
		spec += ",speculation " + kind + ", " + where + ", repeating a list"
	}
	if strings.Join(names, ",") != "llama.cpp,split,testnet,testnet, pinned (a core and a thread each),"+
		"testnet (1 expert node), 3 users at once,testnet (1 expert node), 3 users at once, batching off,netns 20 ms,"+
		"placement: expert nodes 20 ms and 40 ms away ±2 ms, experts together,"+
		"placement: expert nodes 20 ms and 40 ms away ±2 ms, experts spread,netns 20 ms, 3 users at once,netns 20 ms, 3 users at once, batching off"+spec || rep.Layers != 3 {
		t.Fatalf("rows %v, layers %d", names, rep.Layers)
	}
	for i, c := range rep.Rows[9:11] {
		batch := []string{"on", "off"}[i]
		if c.Kind != "concurrent" || c.Users != 3 || c.Batch != batch || withNetns && (c.TokensPerSecond <= 0 || c.AloneTokensPerSecond <= 0 || c.RTTMs != 20) ||
			!withNetns && c.Skipped == "" {
			t.Fatalf("netns concurrent row %+v", c)
		}
		// Without batching no layer goes out in a shared round.
		if batch == "off" && c.SharedLayerShare != 0 {
			t.Fatalf("batching off, and %.0f%% of layers shared a round: %+v", 100*c.SharedLayerShare, c)
		}
	}
	off := rep.Rows[11]
	if off.Kind != "speculate" || off.RoundTripsPerToken != 3 || off.MsPerToken <= 0 || off.AcceptedPerPass != 0 {
		t.Fatalf("speculation off: %+v", off)
	}
	for _, row := range rep.Rows[12:] {
		if row.Kind != "speculate" || row.AcceptedPerPass <= 0 || row.Acceptance <= 0 || row.RoundTripsPerToken >= off.RoundTripsPerToken {
			t.Fatalf("%s: %+v (without: %.2f round trips per token)", row.Name, row, off.RoundTripsPerToken)
		}
	}
	for _, row := range rep.Rows[:4] {
		if row.TokensPerSecond <= 0 || row.PerTokenP50Ms <= 0 {
			t.Fatalf("row %+v", row)
		}
	}
	for _, row := range rep.Rows[2:4] { // the loopback testnets, default and pinned
		if row.Kind != "testnet" || row.DispatchUsPerLayer <= 0 || row.LocalRatio <= 0 {
			t.Fatalf("testnet row %+v", row)
		}
	}
	for i, c := range rep.Rows[4:6] {
		if c.Kind != "concurrent" || c.Users != 3 || c.Batch != []string{"on", "off"}[i] || c.TokensPerSecond <= 0 || c.PerTokenP50Ms <= 0 {
			t.Fatalf("concurrent row %+v", c)
		}
	}
	if rep.Rows[5].SharedLayerShare != 0 {
		t.Fatalf("batching off, and %.0f%% of layers shared a round", 100*rep.Rows[5].SharedLayerShare)
	}
	if n := rep.Rows[6]; withNetns {
		if n.Skipped != "" || n.MeasuredRTTMs <= 0 || n.FloorMs <= 3*20 || n.RoundTripsPerToken != 3 || n.Direct == nil || !*n.Direct {
			t.Fatalf("netns row %+v", n)
		}
		if n.PerTokenP50Ms < 3*(20-1) {
			t.Fatalf("netns 20 ms: p50 %.1f ms per token, below 3 layers' round trips", n.PerTokenP50Ms)
		}
		// Spread, each expert on one of two homes: the prompt's pass needs
		// both in every layer, so not every layer is one node's.
		together, spread := rep.Rows[7], rep.Rows[8]
		if together.Skipped != "" || spread.Skipped != "" || together.OneNodeShare == 0 || spread.OneNodeShare >= 1 {
			t.Fatalf("placement rows %+v\n%+v", together, spread)
		}
	} else if n.Skipped == "" || rep.Rows[8].Skipped == "" {
		t.Fatalf("netns rows without namespaces: %+v", rep.Rows[6:9])
	}
	md, err := os.ReadFile(filepath.Join(out, "report.md"))
	if err != nil || !strings.Contains(string(md), "| netns 20 ms |") || !strings.Contains(string(md), "floor") {
		t.Fatalf("report.md: %v\n%s", err, md)
	}
	f, err := os.Open(filepath.Join(out, "report.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil || img.Bounds().Dx() < 400 {
		t.Fatalf("report.png: %v", err)
	}
	if _, err := os.Stat(filepath.Join(out, "report.json")); err != nil {
		t.Fatal(err)
	}
}
