package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// checkPaidRequests checks, on a running loopback testnet, every way a
// request is paid: a wallet's escrow through `generate --network
// --wallet`, and API keys on the HTTP API (401 without a key or with a
// revoked one, 402 past the budget, 429 past the rate), with the ledger
// debiting the payer exactly what the answers said they cost.
func checkPaidRequests(t *testing.T, ctx context.Context, dir string, rep testnetJSON, want []int32, prompt string) {
	t.Helper()
	boot := rep.Nodes[0].Addrs[0] + "/p2p/" + rep.Nodes[0].PeerID
	wallet := filepath.Join(dir, "user-wallet.key")
	node0, node1 := filepath.Join(dir, "node-0"), filepath.Join(dir, "node-1")
	var w struct {
		Account string  `json:"account"`
		Balance *uint64 `json:"balance"`
	}
	if r := neurod(t, nil, "wallet", "show", "--wallet", wallet, "--home", node1, "--json"); r.code != 0 || json.Unmarshal([]byte(r.stdout), &w) != nil || w.Balance == nil {
		t.Fatalf("wallet show: %+v", r)
	}
	// What an account holds: its balance and what it has in open escrows
	// (an API key's tab holds several requests' most until it closes).
	balanceOf := func(p string) uint64 {
		t.Helper()
		r := neurod(t, nil, "ledger", "balance", p, "--json", "--home", node0)
		var b struct {
			Balance  uint64 `json:"balance"`
			Escrowed uint64 `json:"escrowed"`
		}
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &b) != nil {
			t.Fatalf("ledger balance: %+v", r)
		}
		return b.Balance + b.Escrowed
	}
	// The balance settles once the gating node's settlement and close are
	// applied: wait for it to reach the expected value.
	waitBalance := func(p string, want uint64, what string) {
		t.Helper()
		for i := 0; ; i++ {
			got := balanceOf(p)
			if got == want {
				return
			}
			if i == 50 {
				t.Fatalf("%s: balance %d, want %d", what, got, want)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	// A quote, then the same request paid from the wallet.
	r := neurod(t, nil, "generate", "--network", "--bootstrap", boot, "--model", rep.Model, "--prompt", prompt, "--max-tokens", "20",
		"--wallet", wallet, "--dry-run", "--json")
	var q struct {
		CostPer1k float64 `json:"cost_per_1k_tokens"`
		MaxCost   uint64  `json:"max_cost_base_units"`
		Prompt    int     `json:"prompt_tokens"`
		Account   string  `json:"account"`
		Balance   float64 `json:"balance"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &q) != nil || q.CostPer1k <= 0 || q.MaxCost == 0 || q.Prompt == 0 ||
		q.Account != w.Account || q.Balance != float64(*w.Balance)/1e6 {
		t.Fatalf("dry run: %+v %+v", r, q)
	}
	before := balanceOf(w.Account)
	r = neurod(t, nil, "generate", "--network", "--bootstrap", boot, "--model", rep.Model, "--prompt", prompt, "--max-tokens", "20",
		"--wallet", wallet, "--json")
	var paid struct {
		Tokens        []int32 `json:"tokens"`
		Escrow        uint64  `json:"escrow"`
		CostBaseUnits uint64  `json:"cost_base_units"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &paid) != nil {
		t.Fatalf("generate --wallet: %+v", r)
	}
	if fmt.Sprint(paid.Tokens) != fmt.Sprint(want) || paid.Escrow == 0 || paid.CostBaseUnits == 0 || paid.CostBaseUnits > q.MaxCost {
		t.Fatalf("generate --wallet: %+v (quote %+v), llama.cpp %v", paid, q, want)
	}
	waitBalance(w.Account, before-paid.CostBaseUnits, "the wallet after its paid request")

	// API keys. Until the node issues one, /v1/ takes requests without.
	api := "http://" + rep.HTTP
	post := func(key, body string) (int, http.Header, map[string]any) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, api+"/v1/completions", strings.NewReader(body))
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]any
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("answer %d is not JSON: %s", resp.StatusCode, raw)
		}
		return resp.StatusCode, resp.Header, out
	}
	body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":8,"temperature":0}`, rep.Model, prompt)
	if code, _, out := post("", body); code != 200 {
		t.Fatalf("a request without a key before any key exists: %d %v", code, out)
	}
	for _, tc := range []struct{ body, param string }{
		{fmt.Sprintf(`{"model":%q,"prompt":"x","temperature":99}`, rep.Model), "temperature"},
		{fmt.Sprintf(`{"model":%q,"prompt":"x","logprobs":true}`, rep.Model), "logprobs"},
		{fmt.Sprintf(`{"model":%q,"prompt":"x","frobnicate":1}`, rep.Model), "frobnicate"},
		{fmt.Sprintf(`{"model":%q,"prompt":"x","top_p":1.5}`, rep.Model), "top_p"},
	} {
		code, _, out := post("", tc.body)
		e, _ := out["error"].(map[string]any)
		if code != 400 || e == nil || e["param"] != tc.param {
			t.Errorf("%s: %d %v, want 400 naming %s", tc.body, code, out, tc.param)
		}
	}
	// The wallet's holder lets the gating node draw on it, and the
	// operator issues a key for that account.
	if r := neurod(t, nil, "wallet", "allow", rep.Nodes[0].PeerID, "50", "--wallet", wallet, "--home", node1); r.code != 0 {
		t.Fatalf("wallet allow: %+v", r)
	}
	for i := 0; ; i++ {
		r := neurod(t, nil, "wallet", "show", "--wallet", wallet, "--home", node0, "--json")
		var a struct {
			Allowances map[string]uint64 `json:"allowances"`
		}
		if r.code == 0 && json.Unmarshal([]byte(r.stdout), &a) == nil && a.Allowances[rep.Nodes[0].PeerID] == 50_000_000 {
			break
		}
		if i == 50 {
			t.Fatalf("allowance not applied: %+v", r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	create := func(args ...string) (key, id string) {
		t.Helper()
		r := neurod(t, nil, append([]string{"apikey", "create", "--home", node0, "--account", w.Account, "--json"}, args...)...)
		var k struct {
			Key string `json:"key"`
			ID  string `json:"id"`
		}
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &k) != nil || !strings.HasPrefix(k.Key, "neuro-") || k.ID == "" {
			t.Fatalf("apikey create: %+v", r)
		}
		return k.Key, k.ID
	}
	key, id := create("--budget", "5")
	if code, h, out := post("", body); code != 401 || h.Get("WWW-Authenticate") == "" {
		t.Fatalf("no key once keys exist: %d %v", code, out)
	}
	if code, _, out := post("neuro-not-a-key", body); code != 401 {
		t.Fatalf("a wrong key: %d %v", code, out)
	}
	before = balanceOf(w.Account)
	code, _, out := post(key, body)
	usage, _ := out["usage"].(map[string]any)
	if code != 200 || usage == nil || usage["cost"] == nil {
		t.Fatalf("a request with the key: %d %v", code, out)
	}
	cost := uint64(usage["cost_base_units"].(float64))
	if cost == 0 || usage["cost"].(float64) != float64(cost)/1e6 {
		t.Fatalf("usage %v", usage)
	}
	waitBalance(w.Account, before-cost, "the key's account after its request")
	r = neurod(t, nil, "apikey", "list", "--home", node0, "--json")
	var keys []struct {
		ID    string `json:"id"`
		Spent uint64 `json:"spent"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &keys) != nil || len(keys) != 1 || keys[0].Spent != cost {
		t.Fatalf("apikey list after one request of %d: %+v", cost, r)
	}
	if r := neurod(t, nil, "apikey", "revoke", id, "--home", node0); r.code != 0 {
		t.Fatalf("apikey revoke: %+v", r)
	}
	if code, _, out := post(key, body); code != 401 || !strings.Contains(fmt.Sprint(out), "revoked") {
		t.Fatalf("a revoked key: %d %v", code, out)
	}
	// A budget too small for one request: 402 in OpenAI's shape.
	poor, _ := create("--budget", "0.000001")
	if code, _, out := post(poor, body); code != 402 || out["error"].(map[string]any)["type"] != "insufficient_quota" {
		t.Fatalf("a spent budget: %d %v", code, out)
	}
	// Two requests a minute: the third is refused with Retry-After.
	slow, _ := create("--budget", "5", "--rate", "2/min")
	for i := range 3 {
		code, h, out := post(slow, body)
		switch {
		case i < 2 && code != 200:
			t.Fatalf("request %d within the rate: %d %v", i+1, code, out)
		case i == 2 && (code != 429 || h.Get("Retry-After") == ""):
			t.Fatalf("request over the rate: %d %v", code, out)
		}
	}
}
