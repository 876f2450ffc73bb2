package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
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
	t.Parallel() // mostly waiting on its testnets
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

// A Qwen3-style model that reasons in <think> tags (user-defined tokens of
// its vocabulary, as in Qwen3's), planted to answer any chat with
// "<think>Greet them first!</think>Hello there, friend.": the OpenAI chat
// API of a testnet returns the reasoning as reasoning_content and the rest
// as content, streamed or not, and the raw text with reasoning_format
// "none"; a completion keeps the raw text.
func TestChatReasoningThroughTheNetwork(t *testing.T) {
	t.Parallel()
	const answer = "<think>Greet them first!</think>Hello there, friend."
	path := makeModel(t, "--arch", "qwen3moe", "--planted", "assistant\n"+answer, "--embd", "128", "--ff", "128", "--type", "q8_0", "--seed", "5")
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	_, _, rep := runningTestnet(t, ctx, "--nodes", "2", "--model", path, "--prompt", "assistant", "--max-tokens", "4")
	post := func(path, body string) string {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+rep.HTTP+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", path, resp.StatusCode, raw)
		}
		return string(raw)
	}
	chat := func(extra string) map[string]string {
		var out struct {
			Choices []struct {
				Message map[string]string `json:"message"`
			} `json:"choices"`
		}
		raw := post("/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":32,"temperature":0`+extra+`}`)
		if err := json.Unmarshal([]byte(raw), &out); err != nil || len(out.Choices) != 1 {
			t.Fatalf("chat: %v %s", err, raw)
		}
		return out.Choices[0].Message
	}
	if m := chat(""); m["reasoning_content"] != "Greet them first!" || m["content"] != "Hello there, friend." {
		t.Fatalf("chat: %q", m)
	}
	if m := chat(`,"reasoning_format":"none"`); m["content"] != answer || m["reasoning_content"] != "" {
		t.Fatalf("reasoning_format none: %q", m)
	}
	raw := post("/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":32,"temperature":0,"stream":true}`)
	var reasoning, content string
	for _, line := range strings.Split(raw, "\n") {
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var ev struct {
			Choices []struct {
				Delta map[string]string `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil || len(ev.Choices) != 1 {
			t.Fatalf("event %q: %v", data, err)
		}
		reasoning += ev.Choices[0].Delta["reasoning_content"]
		content += ev.Choices[0].Delta["content"]
	}
	if reasoning != "Greet them first!" || content != "Hello there, friend." {
		t.Fatalf("streamed: reasoning %q content %q\n%s", reasoning, content, raw)
	}
	var compl struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
	}
	raw = post("/v1/completions", `{"prompt":"assistant","max_tokens":32,"temperature":0}`)
	if err := json.Unmarshal([]byte(raw), &compl); err != nil || len(compl.Choices) != 1 || compl.Choices[0].Text != "\n"+answer {
		t.Fatalf("completion: %s", raw)
	}
}
