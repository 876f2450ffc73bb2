//go:build ggml

package gating

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// expertNet is a host that holds every shard (host 0) and expert nodes,
// one per spec, in one process on loopback.
type expertNet struct {
	src    string // the GGUF file
	dir    string // its shards
	model  cid.Cid
	hosts  []*p2p.Host
	origin *expert.Service
	svcs   []*expert.Service
}

func newExpertNet(t testing.TB, ctx context.Context, p model.Params, dt model.DType, seed uint64, specs []string) *expertNet {
	t.Helper()
	return newFaultyNet(t, ctx, p, dt, seed, specs, nil)
}

// newFaultyNet is newExpertNet with faulty expert nodes: faults[i] is the
// mode of expert node i (host i+1).
func newFaultyNet(t testing.TB, ctx context.Context, p model.Params, dt model.DType, seed uint64, specs []string, faults map[int]expert.Fault) *expertNet {
	t.Helper()
	dir, res := splitModel(t, p, dt, seed)
	hs, extras := p2ptest.ClusterWithExtras(t, ctx, 1+len(specs), p2ptest.Config(300*time.Millisecond))
	origin, err := expert.NewService(hs[0], expert.ServiceConfig{StoreDir: filepath.Join(dir, "s0"), Server: expert.DefaultConfig()}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	if _, err := origin.Store().ImportSplit(filepath.Join(dir, "shards")); err != nil {
		t.Fatal(err)
	}
	if err := origin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	n := &expertNet{src: filepath.Join(dir, "m.gguf"), dir: filepath.Join(dir, "shards"), model: res.ModelCID, hosts: hs, origin: origin}
	for i, s := range specs {
		spec, err := expert.ParseSpec(s)
		if err != nil {
			t.Fatal(err)
		}
		svc, err := expert.NewService(hs[i+1], expert.ServiceConfig{StoreDir: filepath.Join(dir, fmt.Sprint("s", i+1)),
			Model: res.ModelCID, Spec: spec, MemoryBudget: 1 << 30, Threads: 1, Server: expert.DefaultConfig(), Fault: faults[i], Compute: ggml.Backend{}}, quiet())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { svc.Close() })
		extras[i+1].Set(svc.HeartbeatExtra)
		if err := svc.Start(ctx); err != nil {
			t.Fatal(err)
		}
		n.svcs = append(n.svcs, svc)
	}
	return n
}

// gatingNet is an expertNet whose host 0 is also a gating node.
type gatingNet struct {
	*expertNet
	engine *Engine
}

// newGatingNet starts a gating node and one expert node per spec, and
// waits until the gating node knows a provider of every expert and has
// loaded the model.
func newGatingNet(t testing.TB, ctx context.Context, p model.Params, dt model.DType, seed uint64, specs []string) *gatingNet {
	t.Helper()
	return newGatingNetWith(t, ctx, p, dt, seed, specs, func(*expertNet) EngineConfig { return EngineConfig{} })
}

// newGatingNetWith is newGatingNet with the gating node configured by
// config (its threads and compute set here).
func newGatingNetWith(t testing.TB, ctx context.Context, p model.Params, dt model.DType, seed uint64, specs []string, config func(*expertNet) EngineConfig) *gatingNet {
	t.Helper()
	xn := newExpertNet(t, ctx, p, dt, seed, specs)
	cfg := config(xn)
	cfg.Threads, cfg.Compute = 1, ggml.Backend{}
	eng, err := NewEngine(xn.hosts[0], xn.origin, cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	if err := eng.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eng.Serve(xn.model)
	for {
		ms := eng.Models()
		if len(ms) == 1 && ms[0].Err != nil {
			t.Fatal(ms[0].Err)
		}
		if len(ms) == 1 && ms[0].Ready && ms[0].MinProviders >= 1 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("gating node not ready: %+v", ms)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return &gatingNet{expertNet: xn, engine: eng}
}

// tokenIDs are the IDs of streamed tokens.
func tokenIDs(toks []client.Token) []int32 {
	ids := []int32{}
	for _, tk := range toks {
		ids = append(ids, tk.ID)
	}
	return ids
}

func (n *expertNet) reference(t testing.TB, prompt string, maxTokens int) *ggml.Generation {
	t.Helper()
	return llamaReference(t, n.src, prompt, maxTokens)
}

// llamaReference is llama.cpp's greedy generation of the whole model at src.
func llamaReference(t testing.TB, src, prompt string, maxTokens int) *ggml.Generation {
	t.Helper()
	ref, err := ggml.LoadLlama(src)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	g, err := ref.GenerateGreedy(prompt, maxTokens, ggml.ContextOptions{Threads: 1}, false)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func (n *expertNet) addr(i int) string {
	return fmt.Sprintf("%s/p2p/%s", n.hosts[i].Addrs()[0], n.hosts[i].ID())
}

// A client that knows only the bootstrap finds the gating node in the DHT
// and streams llama.cpp's greedy tokens; the deltas add up to the text.
func TestClientGeneratesLlamaCppTokens(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	p := model.Presets["tiny"]
	net := newGatingNet(t, ctx, p, model.Q8_0, 4242, []string{"0:*", "1:*"})
	const prompt, maxTokens = "a client asks the network", 24
	want := net.reference(t, prompt, maxTokens)

	c, err := client.New(ctx, client.WithBootstrap(net.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var nodes int
	for nodes == 0 { // the gating key is provided once the model is loaded
		infos, err := c.GatingNodes(ctx, net.model)
		if err != nil {
			t.Fatal(err)
		}
		if nodes = len(infos); nodes == 0 {
			select {
			case <-ctx.Done():
				t.Fatal("no gating node found in the DHT")
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: maxTokens})
	if err != nil {
		t.Fatal(err)
	}
	// The gating node protects the user's connection from the connection
	// manager's trimming while the generation runs and answerGrace after
	// (the answer's end may still be unread), and only then.
	grace := answerGrace
	answerGrace = 3 * time.Second
	t.Cleanup(func() { answerGrace = grace })
	cm := net.engine.h.LibP2P().ConnManager()
	var protected atomic.Bool
	watching, stopWatching := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for watching.Err() == nil && !protected.Load() {
			protected.Store(cm.IsProtected(c.ID(), ""))
			time.Sleep(time.Millisecond)
		}
	}()
	toks, done, err := s.Collect()
	stopWatching()
	<-watched
	if err != nil {
		t.Fatal(err)
	}
	if !protected.Load() {
		t.Fatal("the user's connection was not protected during the generation")
	}
	if !cm.IsProtected(c.ID(), "") {
		t.Fatal("the user's connection was released as soon as the answer was written")
	}
	for cm.IsProtected(c.ID(), "") {
		select {
		case <-ctx.Done():
			t.Fatal("the user's connection is still protected after the generation")
		case <-time.After(10 * time.Millisecond):
		}
	}
	ids := tokenIDs(toks)
	var text strings.Builder
	for _, tk := range toks {
		text.WriteString(tk.Text)
	}
	text.WriteString(done.Rest)
	if fmt.Sprint(ids) != fmt.Sprint(want.Tokens) {
		t.Fatalf("tokens %v, llama.cpp %v", ids, want.Tokens)
	}
	if done.Text != want.Text || text.String() != want.Text {
		t.Fatalf("text %q, deltas %q, llama.cpp %q", done.Text, text.String(), want.Text)
	}
	if done.PromptTokens != len(want.Prompt) || done.CompletionTokens != len(ids) || s.PromptTokens() != len(want.Prompt) {
		t.Fatalf("done %+v, prompt %d", done, len(want.Prompt))
	}
	if done.Stats.GetExpertCalls() == 0 || done.Stats.GetExpertBytes() == 0 || done.Stats.GetMoeLayers() != uint64(p.Layers*(len(ids)+1)) &&
		done.Stats.GetMoeLayers() != uint64(p.Layers*len(ids)) {
		t.Fatalf("stats %v for %d tokens", done.Stats, len(ids))
	}

	// A stop string cuts the text before it; the same seed samples the
	// same tokens.
	if len(want.Text) > 8 {
		stop := want.Text[4:8]
		s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: maxTokens, Stop: []string{stop}})
		if err != nil {
			t.Fatal(err)
		}
		_, done, err := s.Collect()
		if err != nil {
			t.Fatal(err)
		}
		if wantText := want.Text[:strings.Index(want.Text, stop)]; done.Text != wantText || done.Reason != neuropb.FinishReason_FINISH_REASON_STOP {
			t.Fatalf("stop %q: text %q reason %v, want %q", stop, done.Text, done.Reason, wantText)
		}
	}
	seed := uint64(99)
	sample := func() string {
		s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: 16, Temperature: 0.9, TopK: 40, TopP: 0.95, Seed: &seed})
		if err != nil {
			t.Fatal(err)
		}
		toks, _, err := s.Collect()
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(tokenIDs(toks))
	}
	if a, b := sample(), sample(); a != b {
		t.Fatalf("seeded sampling differs: %s vs %s", a, b)
	}
}

// Bad requests get errors that say what is wrong, and are not retried.
func TestBadInferRequests(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	net := newGatingNet(t, ctx, model.Presets["tiny"], model.F32, 5, []string{"0:*,1:*"})
	c, err := client.New(ctx, client.WithGatingNodes(net.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	mh, _ := multihash.Sum([]byte("no such model"), multihash.SHA2_256, -1)
	unknown := cid.NewCidV1(cid.DagProtobuf, mh)
	cases := []struct {
		req  client.Request
		code neuropb.InferError_Code
		msg  string
	}{
		{client.Request{Model: unknown, Prompt: "hi"}, neuropb.InferError_CODE_UNKNOWN_MODEL, "not served"},
		{client.Request{Model: net.model, Prompt: "hi", MaxTokens: 10000}, neuropb.InferError_CODE_BAD_REQUEST, "exceeds the context of 256 tokens"},
		{client.Request{Model: net.model, Prompt: strings.Repeat("word ", 300)}, neuropb.InferError_CODE_BAD_REQUEST, "exceeds the context"},
	}
	for _, tc := range cases {
		_, err := c.Generate(ctx, tc.req)
		var e *client.Error
		if !errors.As(err, &e) || e.Code != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%+v: error %v, want code %v with %q", tc.req.MaxTokens, err, tc.code, tc.msg)
		}
	}
	// Checked before anything is sent.
	for _, req := range []client.Request{
		{Model: net.model},
		{Model: net.model, Prompt: "x", Temperature: -1},
		{Model: net.model, Prompt: "x", TopP: 2},
		{Model: net.model, Prompt: "x", Stop: []string{""}},
		{Model: net.model, Prompt: "x", Messages: []client.Message{{Role: "user", Content: "y"}}},
		{Model: net.model, Messages: []client.Message{{Role: "robot", Content: "y"}}},
	} {
		if _, err := c.Generate(ctx, req); !errors.Is(err, neuropb.ErrInvalid) {
			t.Errorf("%+v: error %v, want invalid", req, err)
		}
	}
	// A bootstrap-less client with no gating node cannot start.
	if _, err := client.New(ctx); err == nil {
		t.Error("client without peers: no error")
	}
	if _, err := client.New(ctx, client.WithBootstrap("/ip4/127.0.0.1/tcp/1")); err == nil || !strings.Contains(err.Error(), "/p2p/") {
		t.Errorf("bootstrap without peer ID: %v", err)
	}
}

// The OpenAI-compatible API answers completions and chats, streamed and
// not, with llama.cpp's tokens at temperature 0, and OpenAI's error shape.
func TestOpenAIAPI(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	net := newGatingNet(t, ctx, model.Presets["tiny"], model.F32, 11, []string{"0:*,1:*"})
	srv := httptest.NewServer(HTTPHandler(net.engine, HTTPOptions{Log: quiet()}))
	defer srv.Close()
	const prompt = "the open api"
	want := net.reference(t, prompt, 12)
	// JSON carries text as UTF-8: each invalid byte of a random model's
	// output becomes U+FFFD.
	jb, _ := json.Marshal(want.Text)
	_ = json.Unmarshal(jb, &want.Text)
	post := func(path, body string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, b
	}
	m := net.model.String()

	resp, body := post("/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":12,"temperature":0}`, m, prompt))
	var cr struct {
		Object  string
		Choices []struct {
			Text         string
			FinishReason string `json:"finish_reason"`
		}
		Usage struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
		}
	}
	if err := json.Unmarshal(body, &cr); err != nil || resp.StatusCode != 200 {
		t.Fatalf("completion: %d %s", resp.StatusCode, body)
	}
	if cr.Object != "text_completion" || len(cr.Choices) != 1 || cr.Choices[0].Text != want.Text ||
		cr.Usage.PromptTokens != len(want.Prompt) || cr.Usage.CompletionTokens != len(want.Tokens) {
		t.Fatalf("completion %s; want text %q", body, want.Text)
	}

	// Streaming: the deltas add up to the same text, then [DONE].
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/completions",
		strings.NewReader(fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":12,"temperature":0,"stream":true}`, m, prompt)))
	sresp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if ct := sresp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("stream content type %q", ct)
	}
	var text strings.Builder
	var sawDone bool
	events := 0
	sc := bufio.NewScanner(sresp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			sawDone = true
			break
		}
		var ch struct {
			Choices []struct{ Text string }
		}
		if err := json.Unmarshal([]byte(line), &ch); err != nil || len(ch.Choices) != 1 {
			t.Fatalf("event %q: %v", line, err)
		}
		text.WriteString(ch.Choices[0].Text)
		events++
	}
	sresp.Body.Close()
	if !sawDone || text.String() != want.Text || events < 2 {
		t.Fatalf("stream: %d events, done %v, text %q, want %q", events, sawDone, text.String(), want.Text)
	}

	// Chat, streamed: role first, then content.
	req, _ = http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions",
		strings.NewReader(fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hello"}],"max_tokens":8,"temperature":0,"stream":true}`, m)))
	sresp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(sresp.Body)
	sresp.Body.Close()
	if sresp.StatusCode != 200 || !strings.Contains(string(raw), `"object":"chat.completion.chunk"`) ||
		!strings.Contains(string(raw), `"role":"assistant"`) || !strings.HasSuffix(string(raw), "data: [DONE]\n\n") {
		t.Fatalf("chat stream: %d %s", sresp.StatusCode, raw)
	}
	resp, body = post("/v1/chat/completions", fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hello"}],"max_tokens":8,"temperature":0}`, m))
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"object":"chat.completion"`) || !strings.Contains(string(body), `"role":"assistant"`) {
		t.Fatalf("chat: %d %s", resp.StatusCode, body)
	}

	// Errors.
	for _, tc := range []struct {
		path, body string
		status     int
		contains   string
	}{
		{"/v1/completions", `{"model":`, 400, "malformed JSON"},
		{"/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":""}`, m), 400, "prompt is empty"},
		{"/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":"x","max_tokens":100000}`, m), 400, "max_tokens"},
		{"/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":"x","max_tokens":1000}`, m), 400, "exceeds the context"},
		{"/v1/completions", `{"model":"bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy","prompt":"x"}`, 404, "model_not_found"},
		{"/v1/completions", `{"model":"gpt-4","prompt":"x"}`, 400, "not a CID"},
		{"/v1/chat/completions", fmt.Sprintf(`{"model":%q,"messages":[]}`, m), 400, "messages is empty"},
		{"/v1/chat/completions", fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"x"}],"n":2}`, m), 400, "one choice"},
	} {
		resp, body := post(tc.path, tc.body)
		var e struct {
			Error struct {
				Message string
				Type    string
			}
		}
		if resp.StatusCode != tc.status || json.Unmarshal(body, &e) != nil || e.Error.Message == "" || !strings.Contains(string(body), tc.contains) {
			t.Errorf("%s %s: %d %s; want %d with %q", tc.path, tc.body, resp.StatusCode, body, tc.status, tc.contains)
		}
	}
	gresp, err := http.Get(srv.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(gresp.Body)
	gresp.Body.Close()
	if !strings.Contains(string(b), m) || !strings.Contains(string(b), `"object":"list"`) || !strings.Contains(string(b), `"min_providers":1`) {
		t.Fatalf("models: %s", b)
	}
	if resp, _ := http.Get(srv.URL + "/v1/completions"); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET completions: %d", resp.StatusCode)
	}
}

// A gating node that dies before its first token, one that does not speak
// the protocol and one that is busy are each skipped: the client moves to
// the next and gets llama.cpp's tokens.
func TestClientRetriesAnotherGatingNode(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
	defer cancel()
	net := newGatingNet(t, ctx, model.Presets["tiny"], model.Q8_0, 606, []string{"0:*,1:*"})
	extra := p2ptest.Cluster(t, ctx, 4, p2ptest.Config(time.Second))
	// extra[0] reads the request and resets the stream: a crash after the
	// request. extra[1] has no infer handler. extra[2] is always busy.
	// extra[3] evaluates the prompt, then dies before its first token.
	extra[0].LibP2P().SetStreamHandler(neuropb.InferProtocol, func(st network.Stream) {
		_, _ = io.ReadAll(io.LimitReader(st, 1<<20))
		st.Reset()
	})
	extra[2].LibP2P().SetStreamHandler(neuropb.InferProtocol, func(st network.Stream) {
		w := wire.NewWriter(st, neuropb.MaxInferResponseSize)
		_ = w.Write(&neuropb.InferResponse{Event: &neuropb.InferResponse_Error{Error: &neuropb.InferError{
			Code: neuropb.InferError_CODE_BUSY, Message: "all 1 sessions are busy"}}})
		st.Close()
	})
	extra[3].LibP2P().SetStreamHandler(neuropb.InferProtocol, func(st network.Stream) {
		w := wire.NewWriter(st, neuropb.MaxInferResponseSize)
		_ = w.Write(&neuropb.InferResponse{Event: &neuropb.InferResponse_Start{Start: &neuropb.InferStart{PromptTokens: 5}}})
		st.Reset()
	})
	addr := func(h *p2p.Host) string { return fmt.Sprintf("%s/p2p/%s", h.Addrs()[0], h.ID()) }
	c, err := client.New(ctx, client.WithGatingNodes(addr(extra[3]), addr(extra[0]), addr(extra[1]), addr(extra[2]), net.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const prompt = "try the next one"
	want := net.reference(t, prompt, 10)
	s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: 10})
	if err != nil {
		t.Fatal(err)
	}
	toks, done, err := s.Collect()
	if err != nil {
		t.Fatal(err)
	}
	ids := tokenIDs(toks)
	if fmt.Sprint(ids) != fmt.Sprint(want.Tokens) || done.Gating != net.hosts[0].ID() {
		t.Fatalf("tokens %v from %s, want %v from the gating node", ids, done.Gating, want.Tokens)
	}
	// With only failing nodes, the error lists each.
	c2, err := client.New(ctx, client.WithGatingNodes(addr(extra[0]), addr(extra[2])), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_, err = c2.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: 10})
	if !errors.Is(err, client.ErrNoGatingNode) || !strings.Contains(err.Error(), "busy") || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("error %v", err)
	}
}

// Speculative decoding through the network (prompt lookup drafts, or a
// draft model's — here the model itself, as a file or by its CID, whose
// drafts are all kept —, each
// checked in one forward pass whose expert calls cover the whole draft)
// gives llama.cpp's greedy tokens; its stats count the drafts, and the
// expert round trips are one per MoE layer per pass, fewer than tokens
// times layers. Sampling with it finishes with the tokens asked for.
func TestSpeculativeDecodingKeepsTheTokens(t *testing.T) {
	for _, kind := range []string{SpeculateNgram, SpeculateDraft, SpeculateDraft + "-cid"} {
		t.Run(kind, func(t *testing.T) {
			kind, byCID := strings.CutSuffix(kind, "-cid")
			ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
			defer cancel()
			p := model.Presets["tiny"]
			net := newGatingNetWith(t, ctx, p, model.Q8_0, 4343, []string{"0:*", "1:*"}, func(xn *expertNet) EngineConfig {
				cfg := EngineConfig{Speculate: kind, SpeculateMax: 6}
				if kind == SpeculateDraft {
					cfg.Draft = xn.src
				}
				if byCID { // the model's own shards, fetched and joined
					cfg.Draft = xn.model.String()
				}
				return cfg
			})
			c, err := client.New(ctx, client.WithGatingNodes(net.addr(0)), client.WithLogger(quiet()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var tokens, kept, passes uint64
			for _, prompt := range []string{"a client asks the network", "one two three one two three one two", "the the the the"} {
				const maxTokens = 40
				want := net.reference(t, prompt, maxTokens)
				s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: maxTokens})
				if err != nil {
					t.Fatal(err)
				}
				toks, done, err := s.Collect()
				if err != nil {
					t.Fatal(err)
				}
				if ids := tokenIDs(toks); fmt.Sprint(ids) != fmt.Sprint(want.Tokens) || done.Text != want.Text {
					t.Fatalf("%q: tokens %v, llama.cpp %v", prompt, ids, want.Tokens)
				}
				st := done.Stats
				t.Logf("%q: %d tokens, %d passes verified %d drafted tokens, kept %d; %d MoE round trips",
					prompt, len(toks), st.GetSpecPasses(), st.GetDraftTokens(), st.GetAcceptedTokens(), st.GetMoeLayers())
				// each pass chooses one token, and keeps its draft's accepted ones
				forward := uint64(len(toks)) - st.GetAcceptedTokens()
				if done.Reason == neuropb.FinishReason_FINISH_REASON_EOS {
					forward++ // the pass that chose the end
				}
				if st.GetAcceptedTokens() > st.GetDraftTokens() || st.GetMoeLayers() != uint64(p.Layers)*forward {
					t.Fatalf("stats %v for %d tokens (%v)", st, len(toks), done.Reason)
				}
				tokens, kept, passes = tokens+uint64(len(toks)), kept+st.GetAcceptedTokens(), passes+st.GetSpecPasses()
			}
			if passes == 0 || kept == 0 {
				t.Fatalf("%d passes verified drafts, %d drafted tokens kept: nothing was speculated", passes, kept)
			}
			// the model drafting for itself: every drafted token is kept, so
			// that most tokens cost no pass of their own
			if kind == SpeculateDraft && kept < tokens/2 {
				t.Fatalf("the model's own drafts: %d of %d tokens kept", kept, tokens)
			}
			temp := float32(0.9)
			seed := uint64(3)
			s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: "one two three one two three one two", MaxTokens: 30, Temperature: temp, Seed: &seed})
			if err != nil {
				t.Fatal(err)
			}
			toks, done, err := s.Collect()
			if err != nil {
				t.Fatal(err)
			}
			if done.Reason == neuropb.FinishReason_FINISH_REASON_LENGTH && len(toks) != 30 {
				t.Fatalf("sampled %d tokens of 30 (%v)", len(toks), done.Reason)
			}
		})
	}
}
