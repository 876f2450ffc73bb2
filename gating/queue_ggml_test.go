//go:build ggml

package gating

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/model"
)

// With the default four sessions, 16 OpenAI-API streams and 6 clients of
// the infer protocol at once all finish with llama.cpp's tokens: those
// that find every session busy wait their turn (the clients are told
// their place) instead of being refused.
func TestConcurrentRequestsWaitTheirTurn(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 180*time.Second)
	defer cancel()
	net := newGatingNetWith(t, ctx, model.Presets["tiny"], model.F32, 23, []string{"0:*,1:*"},
		func(*expertNet) EngineConfig { return EngineConfig{MaxSessions: 4} })
	srv := httptest.NewServer(HTTPHandler(net.engine, HTTPOptions{Log: quiet()}))
	defer srv.Close()
	const prompt, maxTokens = "many at once", 6
	want := net.reference(t, prompt, maxTokens)
	c, err := client.New(ctx, client.WithGatingNodes(net.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	queued := make(chan int, 8)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0,"stream":true}`, net.model, prompt, maxTokens)
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				errs <- err
				return
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.HasSuffix(string(raw), "data: [DONE]\n\n") {
				errs <- fmt.Errorf("stream %d: %d %s", i, resp.StatusCode, raw)
			}
		}()
	}
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: maxTokens})
			if err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
				return
			}
			toks, _, err := s.Collect()
			if err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
				return
			}
			if fmt.Sprint(tokenIDs(toks)) != fmt.Sprint(want.Tokens) {
				errs <- fmt.Errorf("client %d: tokens %v, llama.cpp %v", i, tokenIDs(toks), want.Tokens)
			}
			queued <- s.Queued()
		}()
	}
	wg.Wait()
	close(errs)
	close(queued)
	for err := range errs {
		t.Error(err)
	}
	waited := 0
	for q := range queued {
		if q > 0 {
			waited++
		}
	}
	if waited == 0 {
		t.Error("22 requests on 4 sessions, and no client was told it waited in line")
	}
	if n := net.engine.Queued(); n != 0 {
		t.Errorf("%d requests still queued", n)
	}
}

// With max_sessions 0 the sessions are sized from memory: the tiny model's
// KV caches are a few hundred KiB, so the most (MaxAutoSessions); first
// from the head's sessions (no cache), then from the layers' once loaded.
func TestSessionsSizedFromMemory(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	net := newGatingNet(t, ctx, model.Presets["tiny"], model.F32, 29, []string{"0:*,1:*"})
	if n := net.engine.queue.Sessions(); n != MaxAutoSessions {
		t.Fatalf("%d sessions, want %d", n, MaxAutoSessions)
	}
	// The head alone is loaded (gating.layers auto): sized from head
	// sessions. Loading the layers sizes them again from their KV caches.
	net.engine.mu.Lock()
	l, lazy := net.engine.models[net.model].sm.Gating.(*Layered)
	net.engine.mu.Unlock()
	if !lazy || l.LayersLoaded() {
		t.Fatalf("the model's gating: %T, layers loaded %v; want the head alone", l, lazy && l.LayersLoaded())
	}
	net.engine.mu.Lock()
	net.engine.autoSessions = 0 // forget the head's sizing
	net.engine.mu.Unlock()
	if _, err := l.Layers(); err != nil {
		t.Fatal(err)
	}
	net.engine.mu.Lock()
	sized := net.engine.autoSessions
	net.engine.mu.Unlock()
	if n := net.engine.queue.Sessions(); n != MaxAutoSessions || sized != MaxAutoSessions || l.SessionBytes(0) <= 1 {
		t.Fatalf("%d sessions (sized %d) from the layers' %d bytes a session, want %d", n, sized, l.SessionBytes(0), MaxAutoSessions)
	}
}

// Generations of different prompts and lengths at once advance together
// (continuous batching: their MoE layers share rounds of expert calls),
// and each gets llama.cpp's tokens for its own prompt.
func TestBatchedGenerationsKeepTheirTokens(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 180*time.Second)
	defer cancel()
	net := newGatingNetWith(t, ctx, model.Presets["tiny"], model.F32, 31, []string{"0:*,1:*"},
		func(*expertNet) EngineConfig { return EngineConfig{MaxSessions: 4} })
	prompts := []string{"one", "two words", "a prompt of several more words than the others", "four: the last one"}
	maxTokens := []int{40, 33, 48, 36} // long enough to overlap
	c, err := client.New(ctx, client.WithGatingNodes(net.addr(0)), client.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, len(prompts))
	shared := make(chan uint64, len(prompts))
	wants := make([][]int32, len(prompts))
	for i, prompt := range prompts {
		wants[i] = net.reference(t, prompt, maxTokens[i]).Tokens
	}
	for i, prompt := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := c.Generate(ctx, client.Request{Model: net.model, Prompt: prompt, MaxTokens: maxTokens[i]})
			if err != nil {
				errs <- fmt.Errorf("prompt %d: %w", i, err)
				return
			}
			toks, done, err := s.Collect()
			if err != nil {
				errs <- fmt.Errorf("prompt %d: %w", i, err)
				return
			}
			if fmt.Sprint(tokenIDs(toks)) != fmt.Sprint(wants[i]) {
				errs <- fmt.Errorf("prompt %d: tokens %v, llama.cpp %v", i, tokenIDs(toks), wants[i])
			}
			shared <- done.Stats.GetSharedLayers()
		}()
	}
	wg.Wait()
	close(errs)
	close(shared)
	for err := range errs {
		t.Error(err)
	}
	total := uint64(0)
	for n := range shared {
		total += n
	}
	if total == 0 {
		t.Error("four generations at once, and no MoE layer shared a round of expert calls")
	}
	t.Logf("%d MoE layer evaluations shared a round", total)
}
