package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// A planted model speaks, in every architecture the gating compute runs:
// llama.cpp, the split model and a testnet (for llama with an expert node
// SIGKILLed after its third token) all continue the text from its first
// words, with the spaces between words, and stop at its end; the text
// comes through the experts. A text that would need one word to have two
// successors is refused, saying which.
func TestPlantedModelSpeaks(t *testing.T) {
	const text = "Once upon a time, experts on many machines spoke through one network."
	const prompt = "Once upon a time,"
	rest := strings.TrimPrefix(text, prompt)
	for _, arch := range []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"} {
		t.Run(arch, func(t *testing.T) {
			t.Parallel()
			path := makeModel(t, "--arch", arch, "--planted", text, "--embd", "128", "--ff", "128", "--type", "q8_0", "--seed", "71")
			var local, split struct {
				Tokens []int32 `json:"tokens"`
				Text   string  `json:"text"`
			}
			for _, run := range []struct {
				mode string
				out  any
			}{{"--local", &local}, {"--split", &split}} {
				r := neurod(t, nil, "generate", run.mode, path, "--prompt", prompt, "--max-tokens", "32", "--json")
				if r.code != 0 || json.Unmarshal([]byte(r.stdout), run.out) != nil {
					t.Fatalf("generate %s: %+v", run.mode, r)
				}
			}
			if local.Text != rest || split.Text != rest || fmt.Sprint(local.Tokens) != fmt.Sprint(split.Tokens) {
				t.Fatalf("llama.cpp %q %v, split %q %v; want %q", local.Text, local.Tokens, split.Text, split.Tokens, rest)
			}
			args := []string{"testnet", "--nodes", "2", "--model", path, "--prompt", prompt, "--max-tokens", "32", "--check", "--json"}
			if arch == "llama" {
				args = append(args[:2], append([]string{"3", "--kill", "1@3"}, args[3:]...)...)
			}
			r := neurod(t, nil, args...)
			var rep struct {
				Tokens       []int32 `json:"tokens"`
				Text         string  `json:"text"`
				FinishReason string  `json:"finish_reason"`
				Killed       []int   `json:"killed"`
			}
			if r.code != 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil {
				t.Fatalf("testnet: %+v", r)
			}
			if rep.Text != rest || rep.FinishReason != "stop" || fmt.Sprint(rep.Tokens) != fmt.Sprint(local.Tokens) ||
				(arch == "llama" && len(rep.Killed) != 1) {
				t.Fatalf("testnet: %q (%s) %v, killed %v; want %q", rep.Text, rep.FinishReason, rep.Tokens, rep.Killed, rest)
			}
		})
	}
	t.Run("refused", func(t *testing.T) {
		if r := neurod(t, nil, "model", "make", "--out", t.TempDir()+"/x.gguf", "--planted", "the cat saw the dog"); r.code == 0 ||
			!strings.Contains(r.stderr, "followed once by") {
			t.Fatalf("a word with two successors: %+v", r)
		}
	})
}
