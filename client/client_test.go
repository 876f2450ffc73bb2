package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fakeGating is a libp2p host on loopback that answers the infer protocol
// with a scripted stream of events, and records the request it read.
func fakeGating(t *testing.T, events ...*neuropb.InferResponse) (host.Host, chan *neuropb.InferRequest) {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	got := make(chan *neuropb.InferRequest, 4)
	h.SetStreamHandler(neuropb.InferProtocol, gatingHandler(got, events...))
	return h, got
}

// gatingHandler reads a request into got and answers events.
func gatingHandler(got chan *neuropb.InferRequest, events ...*neuropb.InferResponse) network.StreamHandler {
	return func(st network.Stream) {
		req := &neuropb.InferRequest{}
		if err := wire.NewReader(st, neuropb.MaxInferRequestSize).Read(req); err != nil {
			st.Reset()
			return
		}
		got <- req
		w := wire.NewWriter(st, neuropb.MaxInferResponseSize)
		for _, ev := range events {
			if err := w.Write(ev); err != nil {
				st.Reset()
				return
			}
		}
		st.Close()
	}
}

func addr(h host.Host) string { return fmt.Sprintf("%s/p2p/%s", h.Addrs()[0], h.ID()) }

func testModel() cid.Cid {
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	return cid.NewCidV1(cid.Raw, mh)
}

// clientOf is a client that knows the gating nodes hs, closed with the
// test.
func clientOf(t *testing.T, ctx context.Context, hs ...host.Host) *Client {
	t.Helper()
	var addrs []string
	for _, h := range hs {
		addrs = append(addrs, addr(h))
	}
	c, err := New(ctx, WithGatingNodes(addrs...), WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// oneToken is a generation of one token, "x".
func oneToken() []*neuropb.InferResponse {
	return []*neuropb.InferResponse{{Event: &neuropb.InferResponse_Start{Start: &neuropb.InferStart{PromptTokens: 1}}},
		tokenEvent(1, "x"), {Event: &neuropb.InferResponse_Done{Done: &neuropb.InferDone{
			Reason: neuropb.FinishReason_FINISH_REASON_EOS, CompletionTokens: 1, Text: []byte("x")}}}}
}

func tokenEvent(id int32, text string) *neuropb.InferResponse {
	return &neuropb.InferResponse{Event: &neuropb.InferResponse_Token{Token: &neuropb.InferToken{Id: id, Text: []byte(text), ElapsedUs: 1500}}}
}

// A generation streams its tokens and summary; a rewind withdraws the
// tokens after it (Collect applies it), and the request arrives as sent.
func TestGenerateStreamsTokensAndRewinds(t *testing.T) {
	g, got := fakeGating(t,
		&neuropb.InferResponse{Event: &neuropb.InferResponse_Start{Start: &neuropb.InferStart{PromptTokens: 4, PrefillUs: 2000}}},
		tokenEvent(10, "a"), tokenEvent(11, " b"), tokenEvent(12, " c"),
		&neuropb.InferResponse{Event: &neuropb.InferResponse_Rewind{Rewind: &neuropb.InferRewind{KeepTokens: 1, KeepTextBytes: 1}}},
		tokenEvent(13, " d"),
		&neuropb.InferResponse{Event: &neuropb.InferResponse_Done{Done: &neuropb.InferDone{Reason: neuropb.FinishReason_FINISH_REASON_LENGTH,
			PromptTokens: 4, CompletionTokens: 2, Text: []byte("a d")}}},
	)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := New(ctx, WithGatingNodes(addr(g)), WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	seed := uint64(9)
	req := Request{Model: testModel(), Prompt: "hello", Temperature: 0.5, TopK: 3, Seed: &seed, MaxTokens: 4, Stop: []string{"\n"}}
	s, err := c.Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	toks, done, err := s.Collect()
	if err != nil {
		t.Fatal(err)
	}
	if len(toks) != 2 || toks[0].ID != 10 || toks[1].ID != 13 || toks[0].Compute != 1500*time.Microsecond {
		t.Fatalf("tokens %+v", toks)
	}
	if done.Text != "a d" || done.CompletionTokens != 2 || done.PromptTokens != 4 || done.Gating != g.ID() || s.PromptTokens() != 4 {
		t.Fatalf("done %+v, prompt tokens %d", done, s.PromptTokens())
	}
	if r := <-got; !proto.Equal(r, req.Proto()) {
		t.Fatalf("the gating node read\n%v\nwant\n%v", r, req.Proto())
	}
}

// A gating node that refuses with a code that is not worth a retry gives
// a typed Error; one that is busy is skipped for the next.
func TestGenerateErrors(t *testing.T) {
	bad, _ := fakeGating(t, &neuropb.InferResponse{Event: &neuropb.InferResponse_Error{Error: &neuropb.InferError{
		Code: neuropb.InferError_CODE_BAD_REQUEST, Message: "prompt too long"}}})
	busy, _ := fakeGating(t, &neuropb.InferResponse{Event: &neuropb.InferResponse_Error{Error: &neuropb.InferError{
		Code: neuropb.InferError_CODE_BUSY, Message: "all sessions busy"}}})
	ok, _ := fakeGating(t, oneToken()...)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	c, err := New(ctx, WithGatingNodes(addr(bad)), WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Generate(ctx, Request{Model: testModel(), Prompt: "x"})
	if err == nil {
		_, _, err = s.Collect()
	}
	var e *Error
	if !errors.As(err, &e) || e.Code != neuropb.InferError_CODE_BAD_REQUEST || e.Peer != bad.ID() || !strings.Contains(err.Error(), "prompt too long") {
		t.Fatalf("a refused request: %v", err)
	}

	c2, err := New(ctx, WithGatingNodes(addr(busy), addr(ok)), WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	s, err = c2.Generate(ctx, Request{Model: testModel(), Prompt: "x"})
	if err != nil {
		t.Fatal(err)
	}
	toks, done, err := s.Collect()
	if err != nil || len(toks) != 1 || done.Gating != ok.ID() {
		t.Fatalf("after a busy node: %v tokens, done %+v, %v", len(toks), done, err)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		opts []Option
		want string
	}{
		{"nothing to reach", nil, "no bootstrap peers"},
		{"not a multiaddr", []Option{WithBootstrap("not-an-address")}, "not-an-address"},
		{"no peer id", []Option{WithGatingNodes("/ip4/127.0.0.1/tcp/1")}, "/ip4/127.0.0.1/tcp/1"},
		{"nil logger", []Option{WithLogger(nil)}, "logger"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(ctx, tc.opts...); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want an error with %q", err, tc.want)
			}
		})
	}
	// A bootstrap peer that does not answer fails within the timeout.
	g, _ := fakeGating(t)
	id := g.ID()
	g.Close()
	_, err := New(ctx, WithBootstrap("/ip4/127.0.0.1/tcp/9/p2p/"+id.String()), WithConnectTimeout(time.Second), WithLogger(quiet()))
	if err == nil || !strings.Contains(err.Error(), "bootstrap peers reachable") {
		t.Fatalf("an unreachable bootstrap peer: %v", err)
	}
}

// A gating node that cannot be reached yet (here: it does not serve the
// protocol for its first half second) is asked again a second later
// rather than the generation failing; one that answers with an error is
// not asked again.
func TestGenerateRetriesAnUnreachedGatingNode(t *testing.T) {
	late, got := fakeGating(t, oneToken()...)
	late.RemoveStreamHandler(neuropb.InferProtocol)
	ready := time.AfterFunc(500*time.Millisecond, func() {
		late.SetStreamHandler(neuropb.InferProtocol, gatingHandler(got, oneToken()...))
	})
	defer ready.Stop()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c := clientOf(t, ctx, late)
	s, err := c.Generate(ctx, Request{Model: testModel(), Prompt: "x"})
	if err != nil {
		t.Fatalf("a gating node serving the protocol after 0.5 s: %v", err)
	}
	if toks, _, err := s.Collect(); err != nil || len(toks) != 1 {
		t.Fatalf("after the retry: %d tokens, %v", len(toks), err)
	}

	busy, asked := fakeGating(t, &neuropb.InferResponse{Event: &neuropb.InferResponse_Error{Error: &neuropb.InferError{
		Code: neuropb.InferError_CODE_BUSY, Message: "all sessions busy"}}})
	c2 := clientOf(t, ctx, busy)
	if _, err := c2.Generate(ctx, Request{Model: testModel(), Prompt: "x"}); err == nil || !strings.Contains(err.Error(), "all sessions busy") {
		t.Fatalf("a busy gating node: %v", err)
	}
	if n := len(asked); n != 1 {
		t.Fatalf("a gating node that answered busy was asked %d times", n)
	}
}
