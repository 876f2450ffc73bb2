package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"

	"github.com/neuro-p2p/neuro/ledger"
)

// artifactsDir is where tests leave what a person may want to look at
// (the dashboard's screenshot): <repository>/artifacts.
func artifactsDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", "artifacts"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// chromium runs Debian's Chromium headless on url with the given action
// flags (--dump-dom, --screenshot=FILE) and returns its stdout.
func chromium(t *testing.T, ctx context.Context, bin, url string, action ...string) string {
	t.Helper()
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(), "--window-size=1400,1000",
		// Let the page's script fetch the state and render before the action.
		"--virtual-time-budget=5000"}, action...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium %v: %v\n%s", action, err, stderr.String())
	}
	return string(out)
}

// The dashboard of `neurod testnet --nodes 4 --spans 0-0 --dashboard
// ADDR`, loaded in a real browser (headless Chromium): the page renders
// the network's node count, full coverage and the span of the first layer
// with its four providers (a span that covers part of the model only: the
// gating node still calls the experts layer by layer), and a screenshot
// is saved in artifacts/. Its JSON and /metrics are checked as the
// contract reads them.
func TestDashboardInBrowser(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	browser, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("NEURO_REQUIRE_BROWSER") != "" {
			t.Fatal("chromium is not installed (apt-get install chromium; .ci/run does)")
		}
		t.Skip("chromium is not installed: apt-get install chromium to run the browser test")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	port, err := ledger.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	_, _, rep := runningTestnet(t, ctx, "--nodes", "4", "--spans", "0-0", "--dashboard", addr, "--dir", t.TempDir(), "--max-tokens", "8")
	if rep.HTTP != addr {
		t.Fatalf("the report's http %q, want the dashboard's %s", rep.HTTP, addr)
	}

	// The contract's fields.
	var st struct {
		Nodes []struct {
			PeerID       string   `json:"peer_id"`
			Roles        []string `json:"roles"`
			Reachability string   `json:"reachability"`
			RTTMs        *float64 `json:"rtt_ms"`
			Experts      []string `json:"experts"`
			Spans        []string `json:"spans"`
			Score        *float64 `json:"score"`
		} `json:"nodes"`
		Spans []struct {
			First     int      `json:"first"`
			Last      int      `json:"last"`
			Providers []string `json:"providers"`
		} `json:"spans"`
		Coverage []struct {
			Layer     *int `json:"layer"`
			Expert    *int `json:"expert"`
			Providers int  `json:"providers"`
		} `json:"coverage"`
	}
	resp, err := http.Get("http://" + addr + "/api/v1/state")
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil || len(st.Nodes) != 5 || len(st.Coverage) != 8 {
		t.Fatalf("state: %v %+v", err, st)
	}
	spanNodes := 0
	for _, n := range st.Nodes {
		if n.PeerID == "" || len(n.Roles) == 0 || n.Reachability == "" || n.RTTMs == nil || n.Experts == nil || n.Score == nil || n.Spans == nil {
			t.Fatalf("node in the state: %+v", n)
		}
		if strings.Join(n.Spans, ",") == "0-0" {
			spanNodes++
		}
	}
	if len(st.Spans) != 1 || st.Spans[0].First != 0 || st.Spans[0].Last != 0 || len(st.Spans[0].Providers) != 4 || spanNodes != 4 {
		t.Fatalf("spans %+v, %d nodes serving 0-0: want the span of layer 0 from the 4 expert nodes", st.Spans, spanNodes)
	}
	for _, c := range st.Coverage {
		if c.Layer == nil || c.Expert == nil || c.Providers < 2 {
			t.Fatalf("coverage: %+v", c)
		}
	}
	resp, err = http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(prommodel.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	libp2p := 0
	for name := range families {
		if strings.HasPrefix(name, "libp2p_") {
			libp2p++
		}
	}
	if libp2p == 0 || families["neuro_expert_calls_total"] == nil || families["neuro_generated_tokens_total"] == nil ||
		families["neuro_lockstep_graphs_total"] == nil || families["neuro_lockstep_rows_total"] == nil {
		t.Fatalf("/metrics: %d libp2p families, %d in all", libp2p, len(families))
	}

	// The page, rendered by the browser from the same JSON.
	dom := chromium(t, ctx, browser, "http://"+addr+"/", "--dump-dom")
	text := func(id string) string {
		m := regexp.MustCompile(`id="` + id + `"[^>]*>([^<]*)<`).FindStringSubmatch(dom)
		if m == nil {
			t.Fatalf("no #%s in the page:\n%s", id, dom)
		}
		return m[1]
	}
	if !strings.Contains(dom, `data-loaded="true"`) {
		t.Fatalf("the page never loaded its data:\n%s", dom)
	}
	if got := text("node-count"); got != "5" {
		t.Fatalf("the page shows %s nodes, want 5", got)
	}
	if covered, risk := text("covered"), text("at-risk"); covered != "8" || risk != "0" {
		t.Fatalf("the page shows %s experts covered and %s at risk, want 8 and 0", covered, risk)
	}
	if n := strings.Count(dom, `class="cell ok"`); n != 8 {
		t.Fatalf("%d green coverage cells, want 8", n)
	}
	if !regexp.MustCompile(`(?s)data-span="0-0">.*?\(4\)</td>`).MatchString(dom) {
		t.Fatalf("the page shows no span 0-0 with 4 providers:\n%s", dom)
	}
	// Every node says what it computes on (the CPU here), from heartbeats.
	if n := len(regexp.MustCompile(`class="device"[^>]*>CPU `).FindAllString(dom, -1)); n != 5 {
		t.Fatalf("%d nodes show their device (CPU), want 5:\n%s", n, dom)
	}
	shot := filepath.Join(artifactsDir(t), "dashboard.png")
	chromium(t, ctx, browser, "http://"+addr+"/", "--screenshot="+shot)
	if fi, err := os.Stat(shot); err != nil || fi.Size() < 10_000 {
		t.Fatalf("screenshot %s: %v", shot, err)
	}
	t.Logf("screenshot in %s", shot)
}
