package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/node"
)

// neurodBin is the binary under test, built once by TestMain.
var neurodBin string

// buildTags are the tags this test binary was built with, which TestMain
// builds neurod with too (tags_*_test.go add them), so that it reuses
// what the test binary compiled.
var buildTags []string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "neurod-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	neurodBin = filepath.Join(dir, "neurod")
	build := exec.Command("go", "build", "-tags", strings.Join(buildTags, ","), "-o", neurodBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build neurod:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testEnv keeps nodes on loopback and off the machine's real network: no
// UPnP/NAT-PMP port mapping, no listening on every interface.
var testEnv = []string{
	"NEURO_P2P_LISTEN=/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1",
	"NEURO_P2P_NAT_PORT_MAP=false",
	"NEURO_P2P_NAT_AUTONAT=false",
	"NEURO_P2P_DHT_MODE=server",
}

type result struct {
	stdout, stderr string
	code           int
}

// neurod runs the binary with args and extra environment, bounded to 90 s.
func neurod(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return neurodWithin(t, 90*time.Second, env, args...)
}

// neurodWithin is neurod bounded to limit, for commands that run several
// testnets one after another.
func neurodWithin(t *testing.T, limit time.Duration, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, neurodBin, args...)
	cmd.Env = append(cleanEnv(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run neurod %v: %v", args, err)
	}
	return result{out.String(), errb.String(), code}
}

func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NEURO_") {
			out = append(out, kv)
		}
	}
	return out
}

func initHome(t *testing.T) string {
	t.Helper()
	home := filepath.Join(t.TempDir(), "home")
	if r := neurod(t, nil, "init", "--home", home); r.code != 0 {
		t.Fatalf("init: %d %s", r.code, r.stderr)
	}
	return home
}

func TestInitAndID(t *testing.T) {
	home := filepath.Join(t.TempDir(), "home")
	r := neurod(t, nil, "init", "--home", home)
	if r.code != 0 || !strings.Contains(r.stdout, "peer ID: 12D3KooW") {
		t.Fatalf("init: %+v", r)
	}
	r = neurod(t, nil, "id", "--home", home, "--json")
	var id struct {
		PeerID string   `json:"peer_id"`
		Addrs  []string `json:"addrs"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &id); err != nil || r.code != 0 {
		t.Fatalf("id --json: %v %+v", err, r)
	}
	if !strings.Contains(r.stdout, id.PeerID) || len(id.Addrs) != 2 || id.Addrs[0] != "/ip4/0.0.0.0/tcp/4001" {
		t.Fatalf("id = %+v", id)
	}
	// NEURO_HOME is the default home.
	r = neurod(t, []string{"NEURO_HOME=" + home}, "id", "--json")
	if r.code != 0 || !strings.Contains(r.stdout, id.PeerID) {
		t.Fatalf("id with NEURO_HOME: %+v", r)
	}
}

func TestRunRestartKeepsIdentityAndShutsDownCleanly(t *testing.T) {
	home := initHome(t)
	first := runUntilUp(t, home)
	// A second process on the same home is refused.
	r := neurod(t, testEnv, "run", "--home", home)
	if r.code == 0 || !strings.Contains(r.stderr, "in use by another neurod process") {
		t.Fatalf("second run on a busy home: %+v", r)
	}
	// id reports the running node's real addresses.
	r = neurod(t, nil, "id", "--home", home, "--json")
	if !strings.Contains(r.stdout, `"running": true`) || !strings.Contains(r.stdout, "/ip4/127.0.0.1/tcp/") {
		t.Fatalf("id while running: %s", r.stdout)
	}
	first.stop(t)
	second := runUntilUp(t, home)
	defer second.stop(t)
	if first.status.PeerID != second.status.PeerID {
		t.Fatalf("peer ID changed across restart: %s -> %s", first.status.PeerID, second.status.PeerID)
	}
}

type runningNode struct {
	cmd    *exec.Cmd
	home   string
	logs   *bytes.Buffer
	status node.Status
	done   chan error
}

// runUntilUp starts `neurod run` on home and waits (bounded) for its API.
func runUntilUp(t *testing.T, home string) *runningNode {
	t.Helper()
	cmd := exec.Command(neurodBin, "run", "--home", home)
	cmd.Env = append(cleanEnv(), testEnv...)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n := &runningNode{cmd: cmd, home: home, logs: logs, done: make(chan error, 1)}
	go func() { n.done <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	for range 200 {
		if addr, err := node.ReadAPIAddr(home); err == nil {
			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			st, err := node.FetchStatus(ctx, addr)
			cancel()
			if err == nil {
				n.status = st
				return n
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("node did not come up:\n%s", logs)
	return nil
}

// stop sends SIGTERM and expects a clean exit within 20 s.
func (n *runningNode) stop(t *testing.T) {
	t.Helper()
	if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-n.done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, n.logs)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no exit 20 s after SIGTERM:\n%s", n.logs)
	}
	if !strings.Contains(n.logs.String(), "shut down cleanly") {
		t.Fatalf("no clean shutdown in the log:\n%s", n.logs)
	}
	if _, err := os.Stat(filepath.Join(n.home, node.APIFile)); !os.IsNotExist(err) {
		t.Fatalf("api file left behind: %v", err)
	}
}

// Each bad input gives a one-line error naming the culprit, a non-zero
// exit, and leaves the user's files as they were.
func TestBadInputs(t *testing.T) {
	closedPort := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	_, pub, _ := crypto.GenerateEd25519Key(nil)
	stranger, _ := peer.IDFromPublicKey(pub)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	tests := []struct {
		name   string
		setup  func(home string) // after init
		noInit bool
		env    []string
		args   []string
		want   string
	}{
		{name: "missing config", noInit: true, args: []string{"run"}, want: "not initialized (run 'neurod init' first)"},
		{name: "faulty without testnet", args: []string{"run", "--faulty", "wrong"}, want: "only with --testnet"},
		{name: "unknown faulty mode", args: []string{"run", "--testnet", "--faulty", "evil"}, want: `faulty mode "evil": want one of wrong, lowprec, slow, drop, flaky`},
		{name: "too many faulty", noInit: true, args: []string{"testnet", "--nodes", "3", "--faulty", "2:wrong"}, want: "at least 2 must stay honest"},
		{name: "bad kill", noInit: true, args: []string{"testnet", "--kill", "x"}, want: "want K@T"},
		{name: "gating without model", args: []string{"run", "--gating"}, want: "gating.model: a gating node needs a model"},
		{name: "malformed config", setup: writeConfig("[p2p\nlisten = [\n"), args: []string{"run"}, want: "config.toml: line 1"},
		{name: "unknown key", setup: writeConfig("[p2p]\nlisen = []\n"), args: []string{"run"}, want: `unknown key "p2p.lisen"`},
		{name: "invalid value in file", setup: writeConfig("[p2p.dht]\nmode = \"both\"\n"), args: []string{"run"}, want: "config.toml: p2p.dht.mode"},
		{name: "invalid multiaddr flag", args: []string{"run", "--listen", "/ip4/999.1.1.1/tcp/1"}, want: "flag --listen: \"/ip4/999.1.1.1/tcp/1\": invalid multiaddr"},
		{name: "invalid multiaddr env", env: []string{"NEURO_P2P_BOOTSTRAP=/ip4/1.2.3.4/tcp/1"}, args: []string{"run"}, want: "NEURO_P2P_BOOTSTRAP: \"/ip4/1.2.3.4/tcp/1\": want a multiaddr ending in /p2p/"},
		{name: "invalid env value", env: []string{"NEURO_P2P_NAT_PORT_MAP=sometimes"}, args: []string{"run"}, want: "NEURO_P2P_NAT_PORT_MAP: \"sometimes\": want true or false"},
		{name: "unreachable bootstrap peer", env: []string{"NEURO_P2P_BOOTSTRAP_TIMEOUT=1s"},
			args: []string{"run", "--bootstrap", fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", closedPort(), stranger)},
			want: "bootstrap: none of 1 peers reachable"},
		{name: "corrupt key", setup: func(home string) {
			os.WriteFile(filepath.Join(home, node.IdentityFile), []byte("not a key"), 0o600)
		}, args: []string{"run"}, want: "corrupt identity key"},
		{name: "port in use", args: []string{"run", "--listen", "/ip4/" + strings.ReplaceAll(busy.Addr().String(), ":", "/tcp/")},
			want: "address already in use"},
		{name: "init twice", args: []string{"init"}, want: "already exists (use --force"},
		{name: "bad model cid", args: []string{"run", "--model", "notacid"}, want: "flag --model: \"notacid\": not a CID"},
		{name: "bad expert list", args: []string{"run", "--model", "bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee", "--experts", "0-1"}, want: "flag --experts"},
		{name: "bad memory", args: []string{"run", "--memory", "lots"}, want: "flag --memory: \"lots\": want a size"},
		{name: "import a missing file", args: []string{"model", "import", "/nonexistent.gguf"}, want: "no such file"},
		{name: "bad testnet size", args: []string{"testnet", "--nodes", "0"}, want: "flag --nodes 0"},
		{name: "unknown command", args: []string{"fly"}, want: `unknown command "fly"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			home := filepath.Join(t.TempDir(), "home")
			if !tc.noInit {
				if r := neurod(t, nil, "init", "--home", home); r.code != 0 {
					t.Fatal(r.stderr)
				}
			}
			if tc.setup != nil {
				tc.setup(home)
			}
			before := snapshot(t, home)
			args := append(tc.args, "--home", home)
			r := neurod(t, append(append([]string{}, testEnv...), tc.env...), args...)
			if r.code == 0 {
				t.Fatalf("exit 0, want failure; stderr:\n%s", r.stderr)
			}
			lines := strings.Split(strings.TrimRight(r.stderr, "\n"), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "neurod: ") || !strings.Contains(last, tc.want) {
				t.Fatalf("last stderr line %q, want a one-line error containing %q", last, tc.want)
			}
			if after := snapshot(t, home); !equalFiles(before, after) {
				t.Fatalf("files changed:\nbefore %v\nafter  %v", keys(before), keys(after))
			}
		})
	}
}

func writeConfig(s string) func(string) {
	return func(home string) {
		os.WriteFile(filepath.Join(home, node.ConfigFile), []byte(s), 0o644)
	}
}

// snapshot maps each config and key file in home to its content.
func snapshot(t *testing.T, home string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, f := range []string{node.ConfigFile, node.IdentityFile} {
		if b, err := os.ReadFile(filepath.Join(home, f)); err == nil {
			out[f] = string(b)
		}
	}
	return out
}

func equalFiles(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// `neurod testnet --nodes 5 --check --json` brings up five real processes,
// reports them healthy, and leaves no process behind.
// The README's main command: a gating node and 4 expert nodes as real
// processes answer a prompt with the generated tiny model, exactly as
// llama.cpp does, and every process is gone afterwards.
func TestTestnetCheck(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	dir := t.TempDir()
	r := neurod(t, nil, "testnet", "--nodes", "4", "--check", "--json", "--dir", dir, "--max-tokens", "24", "--concurrency", "3")
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	rep := parseTestnet(t, r.stdout)
	if !rep.Healthy || len(rep.Nodes) != 5 || len(rep.Stopped) != 5 {
		t.Fatalf("report: %+v", rep)
	}
	ids := map[string]bool{}
	for i, n := range rep.Nodes {
		if _, err := peer.Decode(n.PeerID); err != nil || len(n.Addrs) == 0 || n.Roles == nil || n.Experts == nil {
			t.Errorf("node %d: %+v", i, n)
		}
		ids[n.PeerID] = true
		if err := syscall.Kill(n.PID, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("node %d (pid %d) still exists after the testnet: %v", i, n.PID, err)
		}
	}
	if len(ids) != 5 || strings.Join(rep.Nodes[0].Roles, ",") != "bootstrap,relay,gating" || len(rep.Nodes[0].Experts) != 0 {
		t.Fatalf("nodes: %+v", rep.Nodes)
	}
	checkCoverage(t, rep, 2, 4, 2)
	for i, s := range rep.Stopped {
		if !s.Clean {
			t.Errorf("node %d did not shut down cleanly", i)
		}
	}
	// The generated model stays in --dir: the tokens are llama.cpp's on it.
	want := generateLocal(t, filepath.Join(dir, "model.gguf"), "Once upon a time", 24)
	if fmt.Sprint(rep.Tokens) != fmt.Sprint(want) || len(rep.PerTokenMs) != len(rep.Tokens) {
		t.Fatalf("testnet tokens %v (%d latencies), generate --local %v", rep.Tokens, len(rep.PerTokenMs), want)
	}
	// Three more at once, each paid by a wallet of its own.
	if len(rep.Results) != 3 || rep.AggregateTokensPerS <= 0 {
		t.Fatalf("concurrent results: %+v, aggregate %v", rep.Results, rep.AggregateTokensPerS)
	}
	escrows := map[uint64]bool{}
	for i, res := range rep.Results {
		if fmt.Sprint(res.Tokens) != fmt.Sprint(want) || len(res.PerTokenMs) != len(want) {
			t.Errorf("concurrent request %d: tokens %v (%d latencies), generate --local %v", i, res.Tokens, len(res.PerTokenMs), want)
		}
		// Each paid from its own escrow for its own rows, also when its
		// layers went out in rounds with the others' (continuous batching).
		if res.Escrow == 0 || escrows[res.Escrow] || res.FLOPs == 0 || res.Cost == 0 || res.MoELayers == 0 {
			t.Errorf("concurrent request %d: escrow %d (seen: %v), %d FLOPs, cost %d, %d MoE layers", i, res.Escrow, escrows, res.FLOPs, res.Cost, res.MoELayers)
		}
		escrows[res.Escrow] = true
	}
	// The generation was paid from the user's wallet: it paid exactly what
	// the answer said it cost; the gating node earned its share, the
	// expert nodes their part, the treasury its cut, and part of that cut
	// was burned.
	l := rep.Ledger
	if l == nil || !l.SupplyOK || l.Height < 1 || l.Treasury == 0 || l.Burned == 0 || l.User == "" {
		t.Fatalf("ledger: %+v", l)
	}
	gating := rep.Nodes[0].PeerID
	if l.BalancesAfter[gating] <= l.BalancesBefore[gating] {
		t.Errorf("the gating node earned nothing: %d -> %d", l.BalancesBefore[gating], l.BalancesAfter[gating])
	}
	if paid := int64(l.BalancesBefore[l.User]) - int64(l.BalancesAfter[l.User]); paid <= 0 || uint64(paid) != rep.CostBaseUnits {
		t.Errorf("the user paid %d, the answer cost %d", paid, rep.CostBaseUnits)
	}
	var earned int64
	for _, n := range rep.Nodes[1:] {
		earned += int64(l.BalancesAfter[n.PeerID]) - int64(l.BalancesBefore[n.PeerID])
	}
	if earned <= 0 {
		t.Errorf("the expert nodes earned nothing: %+v", l)
	}
	// The homes and logs stay in --dir, and a second run reuses them.
	r2 := neurod(t, nil, "testnet", "--nodes", "4", "--check", "--json", "--dir", dir, "--max-tokens", "4")
	if r2.code != 0 || !strings.Contains(r2.stdout, rep.Nodes[3].PeerID) {
		t.Fatalf("second run on the same --dir: exit %d\n%s\n%s", r2.code, r2.stdout, r2.stderr)
	}
}

func TestTestnetCheckFails(t *testing.T) {
	r := neurod(t, nil, "testnet", "--nodes", "3", "--check", "--json", "--timeout", "50ms")
	if r.code != 1 || !strings.Contains(r.stdout, `"healthy": false`) {
		t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
}

// The model contract: make is deterministic, split prints the model CID
// last, join rebuilds the file.
func TestModelMakeSplitJoin(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.gguf"), filepath.Join(dir, "b.gguf")
	for _, out := range []string{a, b} {
		r := neurod(t, nil, "model", "make", "--preset", "tiny", "--type", "q4_0", "--seed", "9", "--layers", "3", "--out", out)
		if r.code != 0 {
			t.Fatalf("make: %+v", r)
		}
	}
	ab, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if !bytes.Equal(ab, bb) {
		t.Fatal("same seed, different files")
	}
	r := neurod(t, nil, "model", "split", a, "--out", filepath.Join(dir, "shards"))
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	modelCID := lines[len(lines)-1]
	if r.code != 0 || !strings.HasPrefix(modelCID, "bafkrei") {
		t.Fatalf("split: %+v", r)
	}
	joined := filepath.Join(dir, "joined.gguf")
	if r := neurod(t, nil, "model", "join", filepath.Join(dir, "shards"), "--model", modelCID, "--out", joined); r.code != 0 {
		t.Fatalf("join: %+v", r)
	}
	jb, _ := os.ReadFile(joined)
	if !bytes.Equal(ab, jb) {
		t.Fatal("joined model differs")
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"model", "make", "--out", a}, "already exists"},
		{[]string{"model", "make", "--out", filepath.Join(dir, "c.gguf"), "--preset", "huge"}, "flag --preset"},
		{[]string{"model", "make", "--out", filepath.Join(dir, "c.gguf"), "--embd", "33"}, "embd 33"},
		{[]string{"model", "split", filepath.Join(dir, "missing.gguf"), "--out", dir}, "no such file"},
		{[]string{"model", "join", filepath.Join(dir, "shards"), "--out", filepath.Join(dir, "x.gguf"), "--model", "bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee"}, "does not match its CID"},
	} {
		r := neurod(t, nil, tc.args...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// The reference path's contract: generate --local --json prints the
// generated tokens and text, the same on every run.
func TestGenerateLocal(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.gguf")
	if r := neurod(t, nil, "model", "make", "--preset", "tiny", "--type", "q8_0", "--seed", "5", "--out", path); r.code != 0 {
		t.Fatal(r.stderr)
	}
	var first []int32
	for _, mode := range []string{"--local", "--split", "--local"} {
		r := neurod(t, nil, "generate", mode, path, "--prompt", "the model", "--max-tokens", "12", "--json")
		if r.code != 0 {
			t.Fatalf("generate: %+v", r)
		}
		var out struct {
			Tokens []int32 `json:"tokens"`
			Text   *string `json:"text"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.Text == nil || len(out.Tokens) == 0 {
			t.Fatalf("output %q: %v", r.stdout, err)
		}
		if first != nil && fmt.Sprint(first) != fmt.Sprint(out.Tokens) {
			t.Fatalf("%s: tokens differ: %v vs %v", mode, first, out.Tokens)
		}
		first = out.Tokens
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"generate", "--local", path, "--prompt", ""}, "flag --prompt"},
		{[]string{"generate", "--local", path, "--split", path, "--prompt", "x"}, "give exactly one"},
		{[]string{"generate", "--split", path, "--prompt", "x", "--max-tokens", "300"}, "context is full"},
		{[]string{"generate", "--local", path, "--prompt", "x", "--max-tokens", "0"}, "flag --max-tokens"},
		{[]string{"generate", "--local", path, "--prompt", "x", "--max-tokens", "300"}, "context is full"},
		{[]string{"generate", "--local", filepath.Join(t.TempDir(), "none.gguf"), "--prompt", "x"}, "no such file"},
		// A device that is not there is an error naming it and what is
		// missing, never a fall back to the CPU.
		{[]string{"generate", "--split", path, "--prompt", "x", "--device", "cuda:0"}, "device cuda:0: no CUDA backend: libggml-cuda.so is not in"},
		{[]string{"generate", "--local", path, "--prompt", "x", "--device", "gpu"}, "want auto, cpu, vulkan:N or cuda:N"},
		{[]string{"testnet", "--nodes", "1", "--device", "vulkan:0"}, "device vulkan:0: no Vulkan backend"},
		{[]string{"generate", "--local", path, "--prompt", "x", "--progress"}, "flag --progress: only with --network"},
		{[]string{"testnet", "--netns", "--homes", "2", "--kill", "1@4"}, "flag --kill \"1@4\": 1 of 1 expert nodes would leave none"},
		{[]string{"testnet", "--netns", "--homes", "3", "--kill", "1@4", "--concurrency", "2"}, "flag --kill: not with --concurrency"},
		{[]string{"testnet", "--netns", "--pin"}, "flag --pin: only with the loopback testnet"},
	} {
		r := neurod(t, nil, tc.args...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// model import puts the manifest and every shard in the node's store.
func TestModelImport(t *testing.T) {
	home := initHome(t)
	path := filepath.Join(t.TempDir(), "m.gguf")
	if r := neurod(t, nil, "model", "make", "--preset", "tiny", "--seed", "3", "--out", path); r.code != 0 {
		t.Fatal(r.stderr)
	}
	// What a killed import left two hours ago goes; a running import's
	// (changed a minute ago) stays.
	stale, running := filepath.Join(home, ".import-stale"), filepath.Join(home, ".import-running")
	for _, d := range []string{stale, running} {
		if err := os.MkdirAll(filepath.Join(d, "x"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chtimes(stale, time.Now().Add(-2*time.Hour), time.Now().Add(-2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(running, time.Now().Add(-time.Minute), time.Now().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	r := neurod(t, nil, "model", "import", path, "--home", home)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || !strings.HasPrefix(lines[len(lines)-1], "bafkrei") {
		t.Fatalf("import: %+v", r)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) || !strings.Contains(r.stderr, "removed "+stale) {
		t.Fatalf("a killed import's split: %v; stderr %q", err, r.stderr)
	}
	if _, err := os.Stat(running); err != nil {
		t.Fatalf("a running import's split: %v", err)
	}
	os.RemoveAll(running)
	entries, _ := os.ReadDir(filepath.Join(home, node.StoreDir))
	if len(entries) != 1+1+1+2+8 { // manifest, gating shard, head shard, 2 layer shards, 2 layers x 4 experts
		t.Fatalf("%d blobs in the store", len(entries))
	}
	// The split it linked into the store is gone.
	if left, _ := filepath.Glob(filepath.Join(home, ".import-*")); len(left) != 0 {
		t.Fatalf("import left %v", left)
	}
	// model info by CID reads the manifest in the store; by file, the GGUF.
	modelCID := lines[len(lines)-1]
	var byCID, byFile model.Info
	r = neurod(t, nil, "model", "info", modelCID, "--home", home, "--json")
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &byCID) != nil {
		t.Fatalf("info by CID: %+v", r)
	}
	r = neurod(t, nil, "model", "info", path, "--json")
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &byFile) != nil {
		t.Fatalf("info by file: %+v", r)
	}
	for _, in := range []model.Info{byCID, byFile} {
		if in.Architecture != "llama" || in.Layers != 2 || in.MoELayers != 2 || in.Experts != 4 || in.ExpertsUsed != 2 ||
			in.SharedExperts != 0 || in.Types["f32"] == 0 || in.ExpertTypes["f32/f32/f32"] != 8 || in.LayerExpertBytes < 4*in.ExpertBytesMin {
			t.Fatalf("info: %+v", in)
		}
	}
	if byCID.Shards != 9 {
		t.Fatalf("info by CID: %d shards, want 9", byCID.Shards)
	}
	if r := neurod(t, nil, "model", "info", "nothing-here", "--home", home); r.code == 0 || !strings.Contains(r.stderr, "neither a file nor a model CID") {
		t.Fatalf("info of nothing: %+v", r)
	}
}

// model quantize makes the type mixes people download with llama.cpp's
// quantizer; a Q4_K_M file (experts with Q6_K down tensors beside Q4_K
// gate and up) gives the same tokens through llama.cpp, the split forward
// pass and a testnet whose expert nodes serve those mixed experts.
func TestModelQuantize(t *testing.T) {
	t.Parallel() // mostly waiting on its testnet
	dir := t.TempDir()
	src, q := filepath.Join(dir, "f16.gguf"), filepath.Join(dir, "q4km.gguf")
	if r := neurod(t, nil, "model", "make", "--preset", "tiny", "--type", "f16", "--seed", "12", "--layers", "3", "--embd", "256",
		"--ff", "512", "--out", src); r.code != 0 {
		t.Fatal(r.stderr)
	}
	if r := neurod(t, nil, "model", "quantize", src, "--type", "q4_k_m", "--out", q); r.code != 0 || !strings.Contains(r.stdout, "q4_k_m") {
		t.Fatalf("quantize: %+v", r)
	}
	sameTokensEverywhere(t, q)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"model", "quantize", src, "--out", filepath.Join(dir, "a.gguf")}, "flag --type: required"},
		{[]string{"model", "quantize", src, "--type", "q9_k", "--out", filepath.Join(dir, "a.gguf")}, "want one of"},
		{[]string{"model", "quantize", src, "--type", "iq2_xxs", "--out", filepath.Join(dir, "a.gguf")}, "importance matrix"},
		{[]string{"model", "quantize", src, "--type", "q8_0", "--out", q}, "the file exists"},
		{[]string{"model", "quantize", filepath.Join(dir, "none.gguf"), "--type", "q8_0", "--out", filepath.Join(dir, "b.gguf")}, "no such file"},
		{[]string{"model", "make", "--type", "q4_k", "--out", filepath.Join(dir, "c.gguf")}, "neurod model quantize"},
		{[]string{"model", "split", src, "--out", filepath.Join(dir, "s1"), "--shared-experts", "elsewhere"}, `flag --shared-experts "elsewhere": want gating or remote`},
		{[]string{"model", "split", src, "--out", filepath.Join(dir, "s2"), "--shared-experts", "remote"}, "the model has no shared experts"},
		{[]string{"testnet", "--model", src, "--shared-experts", "elsewhere"}, "want gating or remote"},
	} {
		r := neurod(t, nil, tc.args...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// A Qwen3-MoE model (head size other than embd/heads, per-head Q/K norms,
// NEOX RoPE), a GLM-4.5-style one (a dense leading layer, a shared
// expert, a sigmoid router with a selection bias), a DeepSeek-V3-style one
// (latent attention, expert groups) and a gpt-oss one (sliding windows,
// sinks, experts with biases) give the same tokens
// through llama.cpp, the split forward pass and a testnet; model info
// describes them; an architecture the generator lacks is named.
func TestQwen3MoeModel(t *testing.T) {
	t.Parallel() // mostly waiting on its testnets
	for _, tc := range []struct {
		arch  string
		extra []string
		want  func(model.Info) bool
	}{
		{"qwen3moe", []string{"--heads", "4", "--head-size", "64"}, func(in model.Info) bool { return in.DenseLayers == 0 && in.SharedExperts == 0 }},
		{"glm4moe", nil, func(in model.Info) bool { return in.DenseLayers == 1 && in.MoELayers == 2 && in.SharedExperts == 1 }},
		{"deepseek2", nil, func(in model.Info) bool { return in.DenseLayers == 1 && in.MoELayers == 2 && in.SharedExperts == 1 }},
		{"gpt-oss", []string{"--sliding-window", "8"}, func(in model.Info) bool {
			return in.DenseLayers == 0 && in.MoELayers == 3 && in.ExpertTypes["q8_0/q8_0/q8_0"] == 3*in.Experts
		}},
	} {
		t.Run(tc.arch, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), tc.arch+".gguf")
			args := append([]string{"model", "make", "--arch", tc.arch, "--preset", "tiny", "--type", "q8_0", "--seed", "61", "--embd", "128",
				"--layers", "3", "--out", path}, tc.extra...)
			if r := neurod(t, nil, args...); r.code != 0 || !strings.Contains(r.stdout, tc.arch) {
				t.Fatalf("make: %+v", r)
			}
			var info model.Info
			if r := neurod(t, nil, "model", "info", path, "--json"); r.code != 0 || json.Unmarshal([]byte(r.stdout), &info) != nil ||
				info.Architecture != tc.arch || !tc.want(info) {
				t.Fatalf("info: %+v", info)
			}
			sameTokensEverywhere(t, path)
			if tc.arch == "deepseek2" || tc.arch == "glm4moe" {
				// The shared experts hosted and called like routed ones.
				sameTokensEverywhere(t, path, "--shared-experts", "remote")
			}
		})
	}
	if r := neurod(t, nil, "model", "make", "--arch", "olmoe", "--out", filepath.Join(t.TempDir(), "x.gguf")); r.code == 0 ||
		!strings.Contains(r.stderr, `architecture "olmoe": want one of llama, qwen3moe, gpt-oss, glm4moe, deepseek2`) {
		t.Fatalf("an unknown layout: %+v", r)
	}
}

// sameTokensEverywhere fails unless generate --local, generate --split and
// a two-expert-node testnet give the model at path the same greedy tokens.
func sameTokensEverywhere(t *testing.T, path string, testnetArgs ...string) {
	t.Helper()
	var first string
	for _, mode := range []string{"--local", "--split"} {
		r := neurod(t, nil, "generate", mode, path, "--prompt", "the model", "--max-tokens", "16", "--json")
		var out struct {
			Tokens []int32 `json:"tokens"`
		}
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &out) != nil || len(out.Tokens) == 0 {
			t.Fatalf("generate %s: %+v", mode, r)
		}
		if first != "" && fmt.Sprint(out.Tokens) != first {
			t.Fatalf("%s: %v, --local %s", mode, out.Tokens, first)
		}
		first = fmt.Sprint(out.Tokens)
	}
	args := append([]string{"testnet", "--nodes", "2", "--model", path, "--prompt", "the model", "--max-tokens", "16",
		"--check", "--json", "--dir", t.TempDir()}, testnetArgs...)
	r := neurodWithin(t, 3*time.Minute, testEnv, args...)
	var rep struct {
		Tokens []int32 `json:"tokens"`
		Nodes  []struct {
			Experts []string `json:"experts"`
		} `json:"nodes"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil || fmt.Sprint(rep.Tokens) != first {
		t.Fatalf("testnet %v on %s: exit %d, tokens %v, want %s\n%s", testnetArgs, filepath.Base(path), r.code, rep.Tokens, first, r.stderr)
	}
	if slices.Contains(testnetArgs, "remote") {
		// The shared expert (expert 8 of the tiny presets' 8) is hosted.
		hosted := false
		for _, n := range rep.Nodes {
			hosted = hosted || slices.Contains(n.Experts, "1:8")
		}
		if !hosted {
			t.Fatalf("no node hosts the shared expert 1:8: %+v", rep.Nodes)
		}
	}
}
