//go:build ggml

package gating

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/model"
)

// testBill records what the engine tells a Bill.
type testBill struct {
	mu     sync.Mutex
	refuse error
	opened []Charge
	closed int
	flops  uint64
}

func (b *testBill) Open(_ context.Context, c Charge) (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.refuse != nil {
		return 0, b.refuse
	}
	b.opened = append(b.opened, c)
	return 0, nil
}

func (b *testBill) Close(flops uint64) uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed++
	b.flops = flops
	return 4242
}

// testAuth refuses by the request's "X-Refuse" header and bills the rest.
type testAuth struct{ bill *testBill }

func (a testAuth) Authorize(r *http.Request) (Bill, *billing.Refusal) {
	switch r.Header.Get("X-Refuse") {
	case "401":
		return nil, &billing.Refusal{Status: 401, Type: "invalid_request_error", Code: "invalid_api_key", Message: "no", Authenticate: true}
	case "429":
		return nil, &billing.Refusal{Status: 429, Type: "requests", Code: "rate_limit_exceeded", Message: "slow", RetryAfter: 1500 * time.Millisecond}
	}
	return a.bill, nil
}

// The HTTP API asks its Auth before anything else, answers its refusals
// in OpenAI's shape (with WWW-Authenticate and Retry-After), opens the
// bill with the request's real charge once the prompt is tokenized,
// closes it once, and reports what it cost in usage; a bill that refuses
// is a 402. Parameters outside OpenAI's ranges, and ones the server does
// not implement, are refused naming them.
func TestOpenAIAPIBillsAndRefuses(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	net := newGatingNet(t, ctx, model.Presets["tiny"], model.F32, 13, []string{"0:*,1:*"})
	bill := &testBill{}
	srv := httptest.NewServer(HTTPHandler(net.engine, HTTPOptions{Log: quiet(), Auth: testAuth{bill},
		Price: func() (uint64, bool) { return 100_000, true }}))
	defer srv.Close()
	m := net.model.String()
	const prompt = "who pays"
	want := net.reference(t, prompt, 6)
	post := func(refuse, body string) (*http.Response, map[string]any) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(body))
		if refuse != "" {
			req.Header.Set("X-Refuse", refuse)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var out map[string]any
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		return resp, out
	}
	body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":6,"temperature":0}`, m, prompt)
	resp, out := post("401", body)
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" || out["error"].(map[string]any)["code"] != "invalid_api_key" {
		t.Fatalf("401: %d %v", resp.StatusCode, out)
	}
	resp, out = post("429", body)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "2" {
		t.Fatalf("429: %d %v %v", resp.StatusCode, resp.Header, out)
	}
	if len(bill.opened) != 0 {
		t.Fatal("a refused request opened a bill")
	}
	resp, out = post("", body)
	usage, _ := out["usage"].(map[string]any)
	if resp.StatusCode != 200 || usage["cost_base_units"] != float64(4242) || usage["cost"] != 0.004242 {
		t.Fatalf("billed request: %d %v", resp.StatusCode, out)
	}
	fpt, _ := net.engine.FLOPsPerToken(net.model)
	if len(bill.opened) != 1 || bill.closed != 1 || bill.opened[0].PromptTokens != len(want.Prompt) || bill.opened[0].MaxTokens != 6 ||
		bill.opened[0].FLOPsPerToken != fpt || fpt == 0 || bill.opened[0].Model != net.model {
		t.Fatalf("bill opened %+v, closed %d times; prompt %d tokens, %d FLOPs a token", bill.opened, bill.closed, len(want.Prompt), fpt)
	}
	bill.refuse = errors.New("the account is empty")
	resp, out = post("", body)
	if e := out["error"].(map[string]any); resp.StatusCode != 402 || e["type"] != "insufficient_quota" || !strings.Contains(e["message"].(string), "empty") {
		t.Fatalf("a bill that refuses: %d %v", resp.StatusCode, out)
	}
	if bill.closed != 1 {
		t.Fatal("a bill that refused was closed")
	}
	bill.refuse = nil
	for _, tc := range []struct{ extra, param string }{
		{`"temperature":99`, "temperature"}, {`"temperature":-0.5`, "temperature"}, {`"top_p":1.01`, "top_p"},
		{`"logprobs":true`, "logprobs"}, {`"logprobs":3`, "logprobs"}, {`"logit_bias":{"5":10}`, "logit_bias"},
		{`"presence_penalty":0.5`, "presence_penalty"}, {`"frequency_penalty":-1`, "frequency_penalty"},
		{`"tools":[{"type":"function"}]`, "tools"}, {`"response_format":{"type":"json_object"}`, "response_format"},
		{`"best_of":3`, "best_of"}, {`"echo":true`, "echo"}, {`"suffix":"end"`, "suffix"}, {`"frobnicate":1`, "frobnicate"},
	} {
		resp, out := post("", fmt.Sprintf(`{"model":%q,"prompt":"x",%s}`, m, tc.extra))
		e, _ := out["error"].(map[string]any)
		if resp.StatusCode != 400 || e == nil || e["param"] != tc.param {
			t.Errorf("%s: %d %v, want 400 naming %q", tc.extra, resp.StatusCode, out, tc.param)
		}
	}
	// Neutral values of what is not implemented ask for nothing.
	resp, out = post("", fmt.Sprintf(`{"model":%q,"prompt":"x","max_tokens":2,"logprobs":false,"presence_penalty":0,"frequency_penalty":0,`+
		`"logit_bias":{},"user":"u-1","response_format":{"type":"text"},"best_of":1,"echo":false,"stream_options":null,"n":1}`, m))
	if resp.StatusCode != 200 {
		t.Fatalf("neutral parameters: %d %v", resp.StatusCode, out)
	}
	gresp, err := http.Get(srv.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(gresp.Body)
	gresp.Body.Close()
	perK := float64(billing.PerThousand(fpt, 100_000)) / 1e6
	if !strings.Contains(string(raw), fmt.Sprintf(`"price_per_1k_tokens":%v`, perK)) || perK == 0 {
		t.Fatalf("models without the price %v: %s", perK, raw)
	}
}
