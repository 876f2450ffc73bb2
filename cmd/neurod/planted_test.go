package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// A planted model speaks: llama.cpp, the split model and a testnet (with
// an expert node SIGKILLed after its third token) all continue the text
// from its first words, with the spaces between words, and stop at its
// end; the text comes through the experts. A text that would need one
// word to have two successors is refused, saying which.
func TestPlantedModelSpeaks(t *testing.T) {
	t.Parallel()
	const text = "Once upon a time, experts on many machines spoke through one network."
	const prompt = "Once upon a time,"
	rest := strings.TrimPrefix(text, prompt)
	path := makeModel(t, "--planted", text, "--embd", "128", "--ff", "128", "--type", "q8_0", "--seed", "71")
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
	r := neurod(t, nil, "testnet", "--nodes", "3", "--model", path, "--prompt", prompt, "--max-tokens", "32", "--kill", "1@3", "--check", "--json")
	var rep struct {
		Tokens       []int32 `json:"tokens"`
		Text         string  `json:"text"`
		FinishReason string  `json:"finish_reason"`
		Killed       []int   `json:"killed"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil {
		t.Fatalf("testnet: %+v", r)
	}
	if rep.Text != rest || rep.FinishReason != "stop" || fmt.Sprint(rep.Tokens) != fmt.Sprint(local.Tokens) || len(rep.Killed) != 1 {
		t.Fatalf("testnet: %q (%s) %v, killed %v; want %q", rep.Text, rep.FinishReason, rep.Tokens, rep.Killed, rest)
	}
	if r := neurod(t, nil, "model", "make", "--out", t.TempDir()+"/x.gguf", "--planted", "the cat saw the dog"); r.code == 0 ||
		!strings.Contains(r.stderr, "followed once by") {
		t.Fatalf("a word with two successors: %+v", r)
	}
}
