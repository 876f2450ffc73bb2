package main

import (
	"encoding/json"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// `neurod bench` on a small model: every run gives llama.cpp's tokens (it
// fails otherwise), and the report directory holds the table, a PNG plot
// and the JSON. Over 20 ms of emulated RTT no token beats the layers'
// round trips (a lower bound: a busy machine only adds time). With each
// expert on one of two homes, some layers need both. Several users at
// once are served with continuous batching and without. Speculative
// decoding on a model of the same shape that repeats a list keeps drafted
// tokens and needs fewer round trips per token, with prompt lookup and
// with a draft model. The three parts run as three benches at once (each
// mostly waits on its emulated round trips).
func TestBenchReport(t *testing.T) {
	t.Parallel() // mostly waiting
	path := makeModel(t, "--preset", "tiny", "--type", "q8_0", "--seed", "41", "--layers", "3", "--experts", "6", "--embd", "96")
	withNetns := netns.Available() == nil
	if !withNetns && os.Getenv("NEURO_REQUIRE_NETNS") != "" {
		t.Fatalf("network namespaces: %v", netns.Available())
	}
	where := "netns 20 ms"
	if !withNetns {
		where = "testnet"
	}
	// The loopback testnet rows run in one part only: they are the same
	// in every part.
	base, loopback := "llama.cpp,split", ",testnet,"+testnet.PinnedLocalRow+","+testnet.PinnedTestnetRow
	parts := []struct {
		name     string
		args     []string
		loopback bool
		rows     string
		test     func(t *testing.T, rest []testnet.BenchRow, out string)
	}{
		{"netns and placement", []string{"--rtt", "20ms", "--concurrency", "0", "--placement-rtt", "20ms", "--placement-far", "40ms", "--placement-jitter", "2ms", "--speculate-rtt", "0", "--spans-rtt", "0"},
			false, ",netns 20 ms,placement: expert nodes 20 ms and 40 ms away ±2 ms, experts together,placement: expert nodes 20 ms and 40 ms away ±2 ms, experts spread",
			func(t *testing.T, rest []testnet.BenchRow, out string) { checkBenchNetns(t, rest, out, withNetns) }},
		{"users at once", []string{"--rtt", "none", "--concurrency", "3", "--concurrency-rtt", "20ms", "--placement-rtt", "0", "--placement-jitter", "0", "--speculate-rtt", "0", "--spans-rtt", "0"},
			false, ",llama.cpp, 3 users at once in one context,testnet (1 expert node), 3 users at once,testnet (1 expert node), 3 users at once, batching off,netns 20 ms, 3 users at once,netns 20 ms, 3 users at once, batching off",
			func(t *testing.T, rest []testnet.BenchRow, _ string) { checkBenchUsers(t, rest, withNetns) }},
		{"speculation", []string{"--rtt", "none", "--concurrency", "0", "--placement-rtt", "0", "--placement-jitter", "0", "--speculate-rtt", "20ms", "--spans-rtt", "0",
			"--rounds", "2"},
			true, ",speculation off, " + where + ", repeating a list,speculation ngram, " + where + ", repeating a list,speculation draft, " + where + ", repeating a list",
			func(t *testing.T, rest []testnet.BenchRow, _ string) { checkBenchSpeculation(t, rest) }},
		{"spans", []string{"--rtt", "none", "--concurrency", "0", "--placement-rtt", "0", "--placement-jitter", "0", "--speculate-rtt", "0",
			"--spans-rtt", "20ms", "--spans-layers", "8", "--spans-homes", "2"},
			false, ",spans: 8 layers, 2 expert homes, netns 20 ms, layer by layer,spans: 8 layers, 2 expert homes, netns 20 ms, through 2 spans of 4 layers," +
				"spans: 8 layers, 2 expert homes, netns 20 ms, through the spans, the first span's node in use killed mid-generation (a spare serves it too)," +
				"spans: 8 layers, 2 expert homes, netns 20 ms, through the spans, with speculative decoding (prompt lookup)",
			func(t *testing.T, rest []testnet.BenchRow, _ string) { checkBenchSpans(t, rest, withNetns) }},
	}
	for _, pt := range parts {
		t.Run(pt.name, func(t *testing.T) {
			t.Parallel()
			out := filepath.Join(t.TempDir(), "report")
			args := append([]string{"bench", "--model", path, "--out", out, "--max-tokens", "8", "--json"}, pt.args...)
			if !withNetns {
				args = append(args, "--no-netns")
			}
			rows, first := base+pt.rows, 2
			if pt.loopback {
				rows, first = base+loopback+pt.rows, 5
			} else {
				args = append(args, "--no-loopback")
			}
			r := neurodWithin(t, 12*time.Minute, nil, args...)
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
			if strings.Join(names, ",") != rows || rep.Layers != 3 {
				t.Fatalf("rows %v, layers %d", names, rep.Layers)
			}
			for _, row := range rep.Rows[:first] {
				if row.TokensPerSecond <= 0 || row.PerTokenP50Ms <= 0 {
					t.Fatalf("row %+v", row)
				}
			}
			for _, row := range rep.Rows[2:first] { // the loopback testnets, default and pinned, and the pinned llama.cpp
				if row.Name == testnet.PinnedLocalRow {
					if row.Kind != "local" {
						t.Fatalf("pinned llama.cpp row %+v", row)
					}
					continue
				}
				if row.Kind != "testnet" || row.DispatchUsPerLayer <= 0 || row.LocalRatio <= 0 ||
					(row.Name == testnet.PinnedTestnetRow) != (row.PinnedLocalRatio > 0) {
					t.Fatalf("testnet row %+v", row)
				}
			}
			if pt.loopback { // --rounds 2: each loopback testnet answers twice, each time beside llama.cpp
				checkBenchRounds(t, rep.Rows[:first], 2)
				if md, err := os.ReadFile(filepath.Join(out, "report.md")); err != nil || !strings.Contains(string(md), "median of 2 rounds") {
					t.Fatalf("report.md: %v\n%s", err, md)
				}
			}
			pt.test(t, rep.Rows[first:], out)
		})
	}
}

// checkBenchNetns checks the netns and placement rows, and the report's
// files.
func checkBenchNetns(t *testing.T, rest []testnet.BenchRow, out string, withNetns bool) {
	if n := rest[0]; withNetns {
		if n.Skipped != "" || n.MeasuredRTTMs <= 0 || n.FloorMs <= 3*20 || n.RoundTripsPerToken != 3 || n.Direct == nil || !*n.Direct {
			t.Fatalf("netns row %+v", n)
		}
		if n.PerTokenP50Ms < 3*(20-1) {
			t.Fatalf("netns 20 ms: p50 %.1f ms per token, below 3 layers' round trips", n.PerTokenP50Ms)
		}
		// Spread, each expert on one of two homes: the prompt's pass needs
		// both in every layer, so not every layer is one node's.
		together, spread := rest[1], rest[2]
		if together.Skipped != "" || spread.Skipped != "" || together.OneNodeShare == 0 || spread.OneNodeShare >= 1 {
			t.Fatalf("placement rows %+v\n%+v", together, spread)
		}
	} else if n.Skipped == "" || rest[2].Skipped == "" {
		t.Fatalf("netns rows without namespaces: %+v", rest[:3])
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

// checkBenchUsers checks the rows of several users at once: llama.cpp's
// in one context, then the testnets' with continuous batching and
// without: without it no layer shares a round.
func checkBenchUsers(t *testing.T, rest []testnet.BenchRow, withNetns bool) {
	if l := rest[0]; l.Kind != "concurrent" || l.Batch != "llama.cpp" || l.Users != 3 || l.TokensPerSecond <= 0 || l.AloneTokensPerSecond <= 0 ||
		l.PerTokenP50Ms <= 0 || l.EqualUsers == nil || *l.EqualUsers > 3 {
		t.Fatalf("llama.cpp users row %+v", l)
	}
	for i, c := range rest[1:5] {
		batch := []string{"on", "off"}[i%2]
		netnsRow := i >= 2
		if c.Kind != "concurrent" || c.Users != 3 || c.Batch != batch {
			t.Fatalf("concurrent row %+v", c)
		}
		if !netnsRow || withNetns {
			if c.Skipped != "" || c.TokensPerSecond <= 0 || c.AloneTokensPerSecond <= 0 || c.PerTokenP50Ms <= 0 || netnsRow && c.RTTMs != 20 {
				t.Fatalf("concurrent row %+v", c)
			}
		} else if c.Skipped == "" {
			t.Fatalf("netns concurrent row without namespaces %+v", c)
		}
		if batch == "off" && c.SharedLayerShare != 0 {
			t.Fatalf("batching off, and %.0f%% of layers shared a round: %+v", 100*c.SharedLayerShare, c)
		}
	}
}

// checkBenchSpeculation checks the speculation rows: prompt lookup and the
// draft model keep drafted tokens and need fewer round trips per token.
// checkBenchSpans checks the layer-span rows: 8 MoE layers on two homes
// of 4 layers each, 20 ms away. Layer by layer a token waits on 8 round
// trips, through the spans on 2 (lower bounds only: a busy machine adds
// time); the kill costs a failover, with the session's inputs replayed
// to the spare (whole rows of embd 256 floats).
func checkBenchSpans(t *testing.T, rest []testnet.BenchRow, withNetns bool) {
	if !withNetns {
		for _, row := range rest {
			if row.Skipped == "" {
				t.Fatalf("spans row without namespaces: %+v", row)
			}
		}
		return
	}
	lbl, spans, killed, spec := rest[0], rest[1], rest[2], rest[3]
	if spec.Speculate != "ngram" || spec.SpansPerToken != 2 || spec.RoundTripsPerToken <= 0 || spec.RoundTripsPerToken > 2 {
		t.Fatalf("spans with speculation: %+v", spec)
	}
	if lbl.RoundTripsPerToken != 8 || lbl.SpansPerToken != 0 || lbl.Layers != 8 || lbl.PerTokenP50Ms < 8*19 {
		t.Fatalf("layer by layer: %+v", lbl)
	}
	for _, row := range []testnet.BenchRow{spans, killed} {
		if row.RoundTripsPerToken != 2 || row.SpansPerToken != 2 || row.PerTokenP50Ms < 2*19 || row.LayerByLayerRatio <= 0 {
			t.Fatalf("%s: %+v", row.Name, row)
		}
	}
	const rowBytes = 256 * 4
	if spans.SpanFailovers != 0 || killed.SpanFailovers < 1 || killed.KilledAfter != 4 || killed.KillTokenMs <= 0 ||
		killed.SpanReplayBytes < 4*rowBytes || killed.SpanReplayBytes%rowBytes != 0 || killed.SpanReplayMs <= 0 || killed.SpanRecoveryMs < killed.SpanReplayMs {
		t.Fatalf("failover rows: %+v\n%+v", spans, killed)
	}
}

func checkBenchSpeculation(t *testing.T, rest []testnet.BenchRow) {
	off := rest[0]
	if off.Kind != "speculate" || off.RoundTripsPerToken != 3 || off.MsPerToken <= 0 || off.AcceptedPerPass != 0 {
		t.Fatalf("speculation off: %+v", off)
	}
	for _, row := range rest[1:] {
		if row.Kind != "speculate" || row.AcceptedPerPass <= 0 || row.Acceptance <= 0 || row.RoundTripsPerToken >= off.RoundTripsPerToken {
			t.Fatalf("%s: %+v (without: %.2f round trips per token)", row.Name, row, off.RoundTripsPerToken)
		}
	}
}

// checkBenchRounds checks the loopback rows after rounds rounds: each
// testnet row has each round's p50 (the last its own), llama.cpp's p50 in
// the same rounds (and the pinned llama.cpp's beside the pinned testnet)
// and their ratios, and the llama.cpp rows' rounds are those references.
func checkBenchRounds(t *testing.T, rows []testnet.BenchRow, rounds int) {
	t.Helper()
	byName := map[string]testnet.BenchRow{}
	for _, row := range rows {
		byName[row.Name] = row
	}
	positive := func(xs []float64) bool {
		return len(xs) == rounds && !slices.ContainsFunc(xs, func(x float64) bool { return x <= 0 })
	}
	ratios := func(refs, p50s, got []float64, last, median float64) bool {
		if len(got) != rounds || !positive(refs) || !positive(p50s) || math.Abs(last-got[rounds-1]) > 1e-9 || median <= 0 {
			return false
		}
		for i := range got {
			if math.Abs(got[i]-refs[i]/p50s[i]) > 1e-9 {
				return false
			}
		}
		return true
	}
	for _, name := range []string{"testnet", testnet.PinnedTestnetRow} {
		row, pinned := byName[name], name == testnet.PinnedTestnetRow
		if !positive(row.RoundsP50Ms) || row.RoundsP50Ms[rounds-1] != row.PerTokenP50Ms ||
			!ratios(row.LocalRoundsP50Ms, row.RoundsP50Ms, row.LocalRatioRounds, row.LocalRatio, row.LocalRatioMedian) ||
			pinned != ratios(row.PinnedLocalRoundsP50Ms, row.RoundsP50Ms, row.PinnedLocalRatioRounds, row.PinnedLocalRatio, row.PinnedLocalRatioMedian) {
			t.Fatalf("row %q after %d rounds: %+v", name, rounds, row)
		}
	}
	if local, tn := byName["llama.cpp"], byName["testnet"]; !slices.Equal(local.RoundsP50Ms, tn.LocalRoundsP50Ms) {
		t.Fatalf("llama.cpp's rounds %v, beside the testnet %v", local.RoundsP50Ms, tn.LocalRoundsP50Ms)
	}
	if local, tn := byName[testnet.PinnedLocalRow], byName[testnet.PinnedTestnetRow]; !slices.Equal(local.RoundsP50Ms, tn.PinnedLocalRoundsP50Ms) {
		t.Fatalf("pinned llama.cpp's rounds %v, beside the pinned testnet %v", local.RoundsP50Ms, tn.PinnedLocalRoundsP50Ms)
	}
}
