package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet"
)

// The Vulkan tests run the binary on the device NEURO_TEST_DEVICES names
// (vulkan:0; `make test-vulkan` sets it, with Mesa's lavapipe made visible
// by GGML_VK_VISIBLE_DEVICES=0 and the backend found through
// NEURO_BACKENDS). Without it they skip, unless NEURO_REQUIRE_VULKAN says
// they must run.
func vulkanEnv(t *testing.T) []string {
	t.Helper()
	if os.Getenv("NEURO_TEST_DEVICES") != "vulkan:0" || os.Getenv("NEURO_BACKENDS") == "" {
		if os.Getenv("NEURO_REQUIRE_VULKAN") != "" {
			t.Fatal("NEURO_REQUIRE_VULKAN is set but NEURO_TEST_DEVICES=vulkan:0 and NEURO_BACKENDS are not (make test-vulkan sets them)")
		}
		t.Skip("no Vulkan device to test on (make test-vulkan)")
	}
	env := []string{"NEURO_BACKENDS=" + os.Getenv("NEURO_BACKENDS")}
	if v, ok := os.LookupEnv("GGML_VK_VISIBLE_DEVICES"); ok {
		env = append(env, "GGML_VK_VISIBLE_DEVICES="+v)
	}
	return env
}

// generate --local and --split on vulkan:0: 16 tokens each, the same ones
// (llama.cpp's graph and neuro's split one, on the same device); a device
// index that is not there names the ones that are; version lists the
// backend and the device.
func TestVulkanGenerate(t *testing.T) {
	env := vulkanEnv(t)
	path := vulkanModel(t)
	var tokens [][]int32
	for _, mode := range []string{"--local", "--split"} {
		r := neurodWithin(t, 5*time.Minute, env, "generate", mode, path, "--device", "vulkan:0", "--prompt", "the quick brown fox",
			"--max-tokens", "16", "--json")
		if r.code != 0 {
			t.Fatalf("generate %s --device vulkan:0: %+v", mode, r)
		}
		var out testnet.Generation
		if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
			t.Fatalf("output %q: %v", r.stdout, err)
		}
		t.Logf("%s on %s: %v (%.1f tokens/s)", mode, out.Device, out.Tokens, out.TokensPerSecond)
		if len(out.Tokens) != 16 || out.Device != "vulkan:0" {
			t.Fatalf("%s: %d tokens on %q, want 16 on vulkan:0", mode, len(out.Tokens), out.Device)
		}
		tokens = append(tokens, out.Tokens)
	}
	if !slices.Equal(tokens[0], tokens[1]) {
		t.Fatalf("--local and --split on vulkan:0 differ: %v vs %v", tokens[0], tokens[1])
	}
	if r := neurod(t, env, "generate", "--split", path, "--device", "vulkan:7", "--prompt", "x"); r.code == 0 ||
		!strings.Contains(r.stderr, "device vulkan:7: the Vulkan backend sees 1 device(s): vulkan:0 ") {
		t.Fatalf("vulkan:7: %+v", r)
	}
	r := neurod(t, env, "version")
	if r.code != 0 || !regexpMatch(`(?m)^backends: CPU \(built in\), .*libggml-vulkan\.so$`, r.stdout) ||
		!regexpMatch(`(?m)^  vulkan:0 +Vulkan .*(llvmpipe|lavapipe)`, r.stdout) {
		t.Fatalf("version does not list the Vulkan backend and its device:\n%s", r.stdout)
	}
	// Without GGML_VK_VISIBLE_DEVICES ggml hides lavapipe (a CPU-type
	// device); where it is the only Vulkan device, as here, neurod shows it.
	cmd := exec.CommandContext(t.Context(), neurodBin, "version")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GGML_VK_VISIBLE_DEVICES=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.Output()
	if err != nil || !regexpMatch(`(?m)^  vulkan:0 +Vulkan .*llvmpipe.*lavapipe`, string(out)) {
		t.Fatalf("version without GGML_VK_VISIBLE_DEVICES: %v\n%s", err, out)
	}
}

// A two-node testnet on vulkan:0: healthy, the prompt answered, every node
// computing on the Vulkan device and saying so in the report.
func TestVulkanTestnet(t *testing.T) {
	env := vulkanEnv(t)
	path := vulkanModel(t)
	r := neurodWithin(t, 8*time.Minute, append(env, testEnv...), "testnet", "--nodes", "2", "--device", "vulkan:0", "--model", path,
		"--prompt", "the quick brown fox", "--max-tokens", "16", "--check", "--json", "--dir", t.TempDir())
	if r.code != 0 {
		t.Fatalf("testnet on vulkan:0: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	var rep testnet.Report
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if !rep.Healthy || len(rep.Tokens) != 16 || len(rep.Nodes) != 3 {
		t.Fatalf("report: healthy %v, %d tokens, %d nodes", rep.Healthy, len(rep.Tokens), len(rep.Nodes))
	}
	for _, n := range rep.Nodes {
		var on []string
		for _, d := range n.Devices {
			if d.Selected {
				on = append(on, d.Backend+" "+d.Description)
			}
		}
		t.Logf("node %d computes on %v", n.Index, on)
		if len(on) != 1 || !strings.HasPrefix(on[0], "Vulkan ") {
			t.Fatalf("node %d: selected devices %v, want the Vulkan one (%+v)", n.Index, on, n.Devices)
		}
	}
}

// vulkanModel is a small model whose greedy continuation of the tests'
// prompt runs 16 tokens without an end-of-generation token.
func vulkanModel(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "m.gguf")
	if r := neurod(t, nil, "model", "make", "--preset", "tiny", "--type", "q8_0", "--seed", "777", "--layers", "3", "--experts", "6",
		"--experts-used", "2", "--embd", "128", "--ff", "96", "--out", path); r.code != 0 {
		t.Fatal(r.stderr)
	}
	return path
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }
