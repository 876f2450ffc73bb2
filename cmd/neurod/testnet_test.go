package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// testnetJSON is the part of the testnet report the tests read.
type testnetJSON struct {
	Healthy bool   `json:"healthy"`
	Error   string `json:"error"`
	Model   string `json:"model"`
	HTTP    string `json:"http"`
	Nodes   []struct {
		PeerID  string   `json:"peer_id"`
		Addrs   []string `json:"addrs"`
		Roles   []string `json:"roles"`
		PID     int      `json:"pid"`
		Experts []string `json:"experts"`
		// LayersLoaded: whether the gating node loaded the layers.
		LayersLoaded *bool `json:"layers_loaded"`
	} `json:"nodes"`
	Stopped []struct {
		Clean   bool `json:"clean"`
		Crashed bool `json:"crashed"`
	} `json:"stopped"`
	Tokens            []int32   `json:"tokens"`
	Text              *string   `json:"text"`
	PerTokenMs        []float64 `json:"per_token_ms"`
	PerTokenComputeMs []float64 `json:"per_token_compute_ms"`
	Killed            []int     `json:"killed"`
	KilledAfter       int       `json:"killed_after"`
	Stats             struct {
		ExpertCalls  int `json:"expert_calls"`
		Hedges       int `json:"hedges"`
		Redispatches int `json:"redispatches"`
		// The dispatch overhead's mean a layer, and the decode layers'
		// mean, median and 90th percentile.
		DispatchMean   float64 `json:"dispatch_overhead_per_layer_us"`
		DispatchDecode float64 `json:"dispatch_overhead_decode_us"`
		DispatchP50    uint64  `json:"dispatch_overhead_p50_us"`
		DispatchP90    uint64  `json:"dispatch_overhead_p90_us"`
	} `json:"stats"`
	Connections []struct {
		A         string    `json:"a"`
		B         string    `json:"b"`
		Direct    bool      `json:"direct"`
		ViaRelay  bool      `json:"via_relay"`
		Transport string    `json:"transport"`
		Calls     int64     `json:"calls"`
		NATs      [2]string `json:"nats"`
		RTTMs     float64   `json:"rtt_ms"`
	} `json:"connections"`
	Topology *struct {
		Publics []struct {
			Namespace string `json:"namespace"`
		} `json:"publics"`
		Homes []struct {
			Namespace string `json:"namespace"`
		} `json:"homes"`
	} `json:"topology"`
	Link *struct {
		RTTMs     float64   `json:"rtt_ms"`
		HomeRTTMs []float64 `json:"home_rtt_ms"`
		Lines     []struct {
			Out int64 `json:"out"`
			In  int64 `json:"in"`
		} `json:"lines"`
	} `json:"link"`
	Ledger *struct {
		Height         int64             `json:"height"`
		BalancesBefore map[string]uint64 `json:"balances_before"`
		BalancesAfter  map[string]uint64 `json:"balances_after"`
		Treasury       uint64            `json:"treasury"`
		Burned         uint64            `json:"burned"`
		SupplyOK       bool              `json:"supply_ok"`
		Validators     []string          `json:"validators"`
		User           string            `json:"user"`
	} `json:"ledger"`
	CostBaseUnits uint64 `json:"cost_base_units"`
	Results       []struct {
		Tokens       []int32   `json:"tokens"`
		PerTokenMs   []float64 `json:"per_token_ms"`
		MoELayers    uint64    `json:"moe_layers"`
		SharedLayers uint64    `json:"shared_layers"`
		Escrow       uint64    `json:"escrow"`
		FLOPs        uint64    `json:"flops"`
		Cost         uint64    `json:"cost_base_units"`
	} `json:"results"`
	AggregateTokensPerS float64 `json:"aggregate_tokens_per_s"`
	SharedLayerShare    float64 `json:"shared_layer_share"`
}

// runningTestnet starts `neurod testnet ARGS --json`, which stays up after
// its prompt, and returns it (killed when the test ends), its stderr and
// its report.
func runningTestnet(t *testing.T, ctx context.Context, args ...string) (*exec.Cmd, *strings.Builder, testnetJSON) {
	t.Helper()
	cmd := exec.CommandContext(ctx, neurodBin, append(append([]string{"testnet"}, args...), "--json")...)
	cmd.Env = cleanEnv()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	var rep testnetJSON
	if err := json.NewDecoder(bufio.NewReader(stdout)).Decode(&rep); err != nil {
		t.Fatalf("report: %v\n%s", err, stderr.String())
	}
	return cmd, stderr, rep
}

func parseTestnet(t *testing.T, stdout string) testnetJSON {
	t.Helper()
	var rep testnetJSON
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("stdout is not the JSON report: %v\n%s", err, stdout)
	}
	return rep
}

// checkCoverage checks that every expert of a layers x experts model is
// served by want expert nodes.
func checkCoverage(t *testing.T, rep testnetJSON, layers, experts, want int) {
	t.Helper()
	n := map[string]int{}
	for _, nd := range rep.Nodes[1:] {
		for _, e := range nd.Experts {
			n[e]++
		}
	}
	for l := range layers {
		for e := range experts {
			if k := fmt.Sprintf("%d:%d", l, e); n[k] < want {
				t.Errorf("expert %s has %d providers, want %d", k, n[k], want)
			}
		}
	}
}

func generateLocal(t *testing.T, path, prompt string, maxTokens int) []int32 {
	t.Helper()
	r := neurod(t, nil, "generate", "--local", path, "--prompt", prompt, "--max-tokens", fmt.Sprint(maxTokens), "--json")
	if r.code != 0 {
		t.Fatalf("generate --local: %+v", r)
	}
	var out struct {
		Tokens []int32 `json:"tokens"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatal(err)
	}
	return out.Tokens
}

func makeModel(t *testing.T, args ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "m.gguf")
	if r := neurod(t, nil, append([]string{"model", "make", "--out", path}, args...)...); r.code != 0 {
		t.Fatal(r.stderr)
	}
	return path
}

// Through a 5-process testnet, greedy generation equals llama.cpp's, for
// F32 and Q8_0 models of shapes the defaults do not use; with the busiest
// expert node SIGKILLed mid-generation it still does, and when every node
// validates the chain, the four left still settle the generation's escrow.
func TestTestnetEqualsLocal(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	for _, tc := range []struct {
		name string
		make []string
		kill string
	}{
		{"f32", []string{"--preset", "tiny", "--type", "f32", "--seed", "31", "--layers", "3", "--experts", "6"}, ""},
		{"q8_0-kill", []string{"--preset", "tiny", "--type", "q8_0", "--seed", "8", "--embd", "128", "--ff", "96", "--experts", "8", "--experts-used", "2"}, "1@8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := makeModel(t, tc.make...)
			const prompt = "a network of experts"
			want := generateLocal(t, path, prompt, 32)
			args := []string{"testnet", "--nodes", "4", "--model", path, "--prompt", prompt, "--max-tokens", "32", "--check", "--json"}
			if tc.kill != "" {
				args = append(args, "--kill", tc.kill, "--validators", "5")
			}
			r := neurod(t, nil, args...)
			if r.code != 0 {
				t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
			}
			rep := parseTestnet(t, r.stdout)
			if fmt.Sprint(rep.Tokens) != fmt.Sprint(want) {
				t.Fatalf("testnet tokens %v\nllama.cpp      %v", rep.Tokens, want)
			}
			if rep.Text == nil || rep.Stats.ExpertCalls == 0 || len(rep.PerTokenMs) != len(want) {
				t.Fatalf("report: %+v", rep)
			}
			if st := rep.Stats; st.DispatchMean <= 0 || st.DispatchDecode <= 0 || st.DispatchP50 == 0 || st.DispatchP90 < st.DispatchP50 {
				t.Fatalf("dispatch overhead: mean %.0f us, decode %.0f, p50 %d, p90 %d", st.DispatchMean, st.DispatchDecode, st.DispatchP50, st.DispatchP90)
			}
			// No spans: the gating node loaded the layers for its first
			// generation (gating.layers "auto").
			if l := rep.Nodes[0].LayersLoaded; l == nil || !*l {
				t.Fatalf("the gating node's layers loaded: %v, want true", l)
			}
			if tc.kill != "" {
				if len(rep.Killed) != 1 || rep.KilledAfter != 8 {
					t.Fatalf("killed %v after %d", rep.Killed, rep.KilledAfter)
				}
				if st := rep.Stopped[rep.Killed[0]]; !st.Crashed {
					t.Fatalf("killed node's exit: %+v", st)
				}
				// The killed node was a validator: the others committed the settlement.
				if l := rep.Ledger; l == nil || len(l.Validators) != 5 || !l.SupplyOK || l.Treasury == 0 || l.Burned == 0 {
					t.Fatalf("ledger after killing a validator: %+v", l)
				}
			}
			for _, n := range rep.Nodes {
				if err := syscall.Kill(n.PID, 0); err != syscall.ESRCH {
					t.Errorf("pid %d still exists: %v", n.PID, err)
				}
			}
		})
	}
}

// With one of two expert nodes slowed by 50 ms a compute, the tokens are
// still llama.cpp's (hedging sends the slow calls to the fast node; the
// figures are in BenchmarkTestnet's notes, not asserted here).
func TestTestnetSlowNode(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	path := makeModel(t, "--preset", "tiny", "--type", "q8_0", "--seed", "13")
	want := generateLocal(t, path, "slow and steady", 16)
	r := neurod(t, nil, "testnet", "--nodes", "2", "--model", path, "--prompt", "slow and steady", "--max-tokens", "16",
		"--test-slow-node", "1:50ms", "--check", "--json")
	if r.code != 0 {
		t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if rep := parseTestnet(t, r.stdout); fmt.Sprint(rep.Tokens) != fmt.Sprint(want) {
		t.Fatalf("testnet tokens %v, llama.cpp %v", rep.Tokens, want)
	}
}

// A testnet left running answers `neurod generate --network` and the
// OpenAI-compatible API, and stops cleanly on SIGINT.
func TestTestnetServesClients(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	dir := t.TempDir()
	cmd, stderr, rep := runningTestnet(t, ctx, "--nodes", "2", "--dir", dir, "--max-tokens", "4")
	if rep.HTTP == "" || len(rep.Nodes) != 3 {
		t.Fatalf("report: %+v", rep)
	}
	gguf := filepath.Join(dir, "model.gguf")
	const prompt = "ask the running network"
	want := generateLocal(t, gguf, prompt, 20)

	boot := rep.Nodes[0].Addrs[0] + "/p2p/" + rep.Nodes[0].PeerID
	r := neurod(t, nil, "generate", "--network", "--bootstrap", boot, "--model", rep.Model, "--prompt", prompt, "--max-tokens", "20", "--json")
	if r.code != 0 {
		t.Fatalf("generate --network: %+v", r)
	}
	var out struct {
		Tokens     []int32   `json:"tokens"`
		PerTokenMs []float64 `json:"per_token_ms"`
		Gating     string    `json:"gating"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(out.Tokens) != fmt.Sprint(want) || len(out.PerTokenMs) != len(want) || out.Gating != rep.Nodes[0].PeerID {
		t.Fatalf("generate --network %+v, llama.cpp %v", out, want)
	}
	// Sampling with a seed is reproducible across processes.
	sample := func() string {
		r := neurod(t, nil, "generate", "--network", "--gating", boot, "--model", rep.Model, "--prompt", prompt,
			"--max-tokens", "12", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--json")
		if r.code != 0 {
			t.Fatalf("sample: %+v", r)
		}
		return r.stdout[:strings.Index(r.stdout, `"text"`)]
	}
	if a, b := sample(), sample(); a != b {
		t.Fatalf("seeded samples differ:\n%s\n%s", a, b)
	}
	// Errors of the network mode.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--model", rep.Model, "--prompt", "x"}, "give at least one peer"},
		{[]string{"--bootstrap", boot, "--prompt", "x"}, "flag --model"},
		{[]string{"--bootstrap", boot, "--model", "nonsense", "--prompt", "x"}, "not a CID"},
		{[]string{"--gating", boot, "--model", "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy", "--prompt", "x"}, "unknown model"},
		{[]string{"--gating", boot, "--model", rep.Model, "--prompt", "x", "--max-tokens", "500"}, "exceeds the context"},
		{[]string{"--bootstrap", boot, "--model", rep.Model, "--prompt", "x", "--temperature", "-1"}, "temperature"},
	} {
		r := neurod(t, nil, append([]string{"generate", "--network"}, tc.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}

	// The HTTP API of the gating node, with a real HTTP client.
	body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":20,"temperature":0,"stream":true}`, rep.Model, prompt)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+rep.HTTP+"/v1/completions", strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasSuffix(string(raw), "data: [DONE]\n\n") {
		t.Fatalf("streamed completion: %d %s", resp.StatusCode, raw)
	}
	resp, err = http.Post("http://"+rep.HTTP+"/v1/chat/completions", "application/json", strings.NewReader(`{"messages": [`))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(raw), `"error"`) {
		t.Fatalf("malformed JSON: %d %s", resp.StatusCode, raw)
	}

	// The ledger through a running node: node 1 (not a validator) sends
	// a new account some NEURO over the ledger topic; node 0's chain applies it.
	r = neurod(t, nil, "ledger", "status", "--json", "--home", filepath.Join(dir, "node-1"))
	var st struct {
		Height   int64  `json:"height"`
		Balance  uint64 `json:"balance"`
		Staked   uint64 `json:"staked"`
		SupplyOK bool   `json:"supply_ok"`
		Source   string `json:"source"`
	}
	// Node 1 started with 10,000 NEURO and 200 staked, paid nothing (the
	// user's wallet paid for the testnet's prompt) and earned as an expert.
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil || st.Height < 1 || st.Balance <= 10_000_000_000 ||
		st.Staked != 200_000_000 || !st.SupplyOK ||
		st.Source != "proven by validator "+rep.Nodes[0].PeerID {
		t.Fatalf("ledger status: %+v %+v", r, st)
	}
	balanceOf := func(p string) uint64 {
		t.Helper()
		r := neurod(t, nil, "ledger", "balance", p, "--json", "--home", filepath.Join(dir, "node-0"))
		var b struct {
			Balance uint64 `json:"balance"`
		}
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &b) != nil {
			t.Fatalf("ledger balance: %+v", r)
		}
		return b.Balance
	}
	// The recipient is a new account: a node's own balance also moves as
	// the settlements of the prompts above pay it for expert work (node
	// 2 was seen 879 NEURO richer rather than 12.5).
	_, pub, _ := crypto.GenerateEd25519Key(nil)
	payee, _ := peer.IDFromPublicKey(pub)
	if b := balanceOf(payee.String()); b != 0 {
		t.Fatalf("a new account holds %d", b)
	}
	if r := neurod(t, nil, "ledger", "send", payee.String(), "12.5", "--home", filepath.Join(dir, "node-1")); r.code != 0 {
		t.Fatalf("ledger send: %+v", r)
	}
	for i := 0; balanceOf(payee.String()) != 12_500_000; i++ {
		if i == 50 {
			t.Fatalf("transfer not applied: balance %d, want 12.5 NEURO", balanceOf(payee.String()))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Governance: node 1 proposes a model, nodes 0 and 2 vote for it, and
	// it passes when the vote closes (10 blocks on the testnet).
	newModel := "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
	if r := neurod(t, nil, "ledger", "propose", "add-model", newModel, "--home", filepath.Join(dir, "node-1")); r.code != 0 {
		t.Fatalf("ledger propose: %+v", r)
	}
	var gov struct {
		Proposals []struct {
			ID       uint64 `json:"id"`
			AddModel string `json:"add_model"`
			Done     bool   `json:"done"`
			Passed   bool   `json:"passed"`
		} `json:"proposals"`
	}
	proposals := func() {
		t.Helper()
		r := neurod(t, nil, "ledger", "status", "--json", "--home", filepath.Join(dir, "node-0"))
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &gov) != nil {
			t.Fatalf("ledger status: %+v", r)
		}
	}
	for i := 0; ; i++ {
		proposals()
		if len(gov.Proposals) == 1 {
			break
		}
		if i == 50 {
			t.Fatalf("proposal not on the chain: %+v", gov)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, h := range []string{"node-0", "node-2"} {
		if r := neurod(t, nil, "ledger", "vote", fmt.Sprint(gov.Proposals[0].ID), "yes", "--home", filepath.Join(dir, h)); r.code != 0 {
			t.Fatalf("ledger vote: %+v", r)
		}
	}
	for i := 0; ; i++ {
		proposals()
		if gov.Proposals[0].Done {
			break
		}
		if i == 100 {
			t.Fatalf("vote never closed: %+v", gov)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if p := gov.Proposals[0]; !p.Passed || p.AddModel != newModel {
		t.Fatalf("proposal: %+v", p)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ledger", "vote", "99", "yes", "--home", filepath.Join(dir, "node-0")}, "no open proposal 99"},
		{[]string{"ledger", "vote", "1", "maybe", "--home", filepath.Join(dir, "node-0")}, "want yes or no"},
		{[]string{"ledger", "propose", "add-model", "nonsense", "--home", filepath.Join(dir, "node-0")}, "model"},
		{[]string{"ledger", "send", rep.Nodes[2].PeerID, "999999", "--home", filepath.Join(dir, "node-1")}, "with a balance of"},
		{[]string{"ledger", "stake", "0.0000001", "--home", filepath.Join(dir, "node-1")}, "at most 6 decimals"},
		{[]string{"ledger", "unstake", "5000", "--home", filepath.Join(dir, "node-0")}, "with a stake of"},
		{[]string{"ledger", "status", "--home", t.TempDir()}, "no node is running"},
	} {
		if r := neurod(t, nil, tc.args...); r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}

	checkPaidRequests(t, ctx, dir, rep, want, prompt)

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("testnet after SIGINT: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "clean=3") {
		t.Fatalf("not every node stopped cleanly:\n%s", stderr.String())
	}
}

// An adversarial testnet: with two wrong and one low-precision expert node
// of seven, the answers are still llama.cpp's, every faulty node ends
// excluded by the gating node, and no honest one does.
func TestTestnetFaulty(t *testing.T) {
	t.Parallel()
	path := makeModel(t, "--preset", "tiny", "--type", "q8_0", "--seed", "64", "--layers", "3")
	const prompt = "liars in the network"
	want := generateLocal(t, path, prompt, 24)
	r := neurod(t, nil, "testnet", "--nodes", "7", "--faulty", "2:wrong,1:lowprec", "--model", path, "--prompt", prompt,
		"--max-tokens", "24", "--requests", "3", "--check", "--json")
	if r.code != 0 {
		t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	var rep struct {
		Tokens   []int32 `json:"tokens"`
		Requests int     `json:"requests"`
		Nodes    []struct {
			Index    int     `json:"index"`
			Faulty   *string `json:"faulty"`
			Score    float64 `json:"score"`
			Checked  int     `json:"checked"`
			Failed   int     `json:"failed"`
			Excluded bool    `json:"excluded"`
			Verdicts struct {
				Published int `json:"published"`
				Confirmed int `json:"confirmed"`
				Refuted   int `json:"refuted"`
			} `json:"verdicts"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	var led struct {
		Ledger struct {
			StakesAfter map[string]uint64 `json:"stakes_after"`
			SupplyOK    bool              `json:"supply_ok"`
		} `json:"ledger"`
		Nodes []struct {
			PeerID string `json:"peer_id"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &led); err != nil || !led.Ledger.SupplyOK {
		t.Fatalf("ledger: %v %+v", err, led.Ledger)
	}
	// The gating node published its verdicts; honest expert nodes re-ran
	// them and confirmed them, never refuted one.
	if rep.Nodes[0].Verdicts.Published == 0 {
		t.Errorf("no verdict published: %+v", rep.Nodes[0])
	}
	if fmt.Sprint(rep.Tokens) != fmt.Sprint(want) || rep.Requests != 3 {
		t.Fatalf("tokens %v after %d requests, llama.cpp %v", rep.Tokens, rep.Requests, want)
	}
	faulty := 0
	for _, n := range rep.Nodes[1:] {
		if n.Faulty == nil {
			t.Fatalf("node %d: no faulty field", n.Index)
		}
		switch *n.Faulty {
		case "wrong", "lowprec":
			faulty++
			if !n.Excluded || n.Failed == 0 || n.Score != 0 {
				t.Errorf("faulty node %d (%s) not excluded: %+v", n.Index, *n.Faulty, n)
			}
			// Honest nodes re-ran its verdicts and reported them: the chain
			// slashed its 200 NEURO stake.
			if st := led.Ledger.StakesAfter[led.Nodes[n.Index].PeerID]; st >= 200_000_000 {
				t.Errorf("faulty node %d (%s) not slashed: stake %d", n.Index, *n.Faulty, st)
			}
		case "":
			if n.Excluded || n.Failed != 0 {
				t.Errorf("honest node %d accused: %+v", n.Index, n)
			}
			if n.Verdicts.Refuted != 0 || n.Verdicts.Confirmed == 0 {
				t.Errorf("honest node %d: verdicts %+v", n.Index, n.Verdicts)
			}
			if st := led.Ledger.StakesAfter[led.Nodes[n.Index].PeerID]; st != 200_000_000 {
				t.Errorf("honest node %d slashed: stake %d", n.Index, st)
			}
		}
	}
	if faulty != 3 {
		t.Fatalf("%d faulty nodes in the report, want 3", faulty)
	}
}
