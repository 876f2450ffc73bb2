package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/span"
)

// A neurod process with expert.spans serves every layer of a model —
// their attention from the layer shards it imported, their experts its
// own — announces the span in its status, and a head that sends each
// forward pass through it in one request gets the whole split model's
// greedy tokens and logits to the bit.
func TestNodeServesASpan(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	path := makeModel(t, "--arch", "qwen3moe", "--layers", "3", "--experts", "6", "--experts-used", "2", "--embd", "64", "--ff", "96",
		"--heads", "4", "--kv-heads", "2", "--head-size", "16", "--vocab", "512", "--type", "q8_0", "--seed", "17")
	home := initHome(t)
	r := neurod(t, nil, "model", "import", path, "--home", home)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 {
		t.Fatalf("import: %+v", r)
	}
	mc := lines[len(lines)-1]
	cfgPath := filepath.Join(home, node.ConfigFile)
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	conf := strings.Replace(string(raw), "[expert]\n", "[expert]\nmodel = \""+mc+"\"\nexperts = \"none\"\nspans = \"0-2\"\n", 1)
	for _, key := range []string{"model", "experts", "spans"} {
		// the defaults after the section header would override ours
		conf = strings.Replace(conf, "\n"+key+" = \"auto\"\n", "\n", 1)
		conf = strings.Replace(conf, "\n"+key+" = \"\"\n", "\n", 1)
	}
	if err := os.WriteFile(cfgPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	n := runUntilUp(t, home)
	var st node.Status
	api, err := node.ReadAPIAddr(home)
	if err != nil {
		t.Fatal(err)
	}
	for range 300 {
		if st, err = node.FetchStatus(ctx, api); err == nil && len(st.Spans) > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !slices.Equal(st.Spans, []string{"0-2"}) || len(st.Experts) != 3*6 {
		t.Fatalf("the node serves spans %v and experts %v, want 0-2 and all 18:\n%s", st.Spans, st.Experts, n.logs)
	}

	dir := filepath.Join(t.TempDir(), "shards")
	res, err := model.SplitWith(path, dir, model.SplitOptions{})
	if err != nil || res.ModelCID.String() != mc {
		t.Fatalf("split: %v %v, imported as %s", res.ModelCID, err, mc)
	}
	whole, err := ggml.LoadSplit(dir, res.ModelCID, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer whole.Close()
	headShard, err := model.OpenShard(dir, res.Manifest.GetHead())
	if err != nil {
		t.Fatal(err)
	}
	headPart, err := ggml.Backend{}.NewGatingPart(whole.Gating.Hparams(), model.Shards{headShard}, moe.Part{Head: true}, 2)
	if err != nil {
		t.Fatal(err)
	}
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	id, err := peer.Decode(st.PeerID)
	if err != nil {
		t.Fatal(err)
	}
	info := peer.AddrInfo{ID: id}
	for _, a := range st.Addrs {
		info.Addrs = append(info.Addrs, ma.StringCast(a))
	}
	if err := h.Connect(ctx, info); err != nil {
		t.Fatal(err)
	}
	chain, err := span.NewChain(span.ChainConfig{Model: cid.MustParse(mc), Head: headPart, Part: moe.Part{Head: true},
		Hops: []span.Hop{{First: 0, End: 3, Providers: []peer.ID{id}}}, Dialer: h})
	if err != nil {
		t.Fatal(err)
	}
	defer chain.Close()
	greedy := func(s moe.Session) ([]int32, [][]float32) {
		t.Helper()
		l, err := s.Forward(ctx, []int32{1, 20, 30, 40}, whole.Experts)
		if err != nil {
			t.Fatal(err)
		}
		var toks []int32
		var logits [][]float32
		for range 8 {
			logits = append(logits, l)
			tok := int32(slices.Index(l, slices.Max(l)))
			toks = append(toks, tok)
			if l, err = s.Forward(ctx, []int32{tok}, whole.Experts); err != nil {
				t.Fatal(err)
			}
		}
		return toks, logits
	}
	ref, _ := whole.Gating.NewSession(0)
	defer ref.Close()
	wantToks, wantLogits := greedy(ref)
	s, err := chain.NewSession(0)
	if err != nil {
		t.Fatal(err)
	}
	toks, logits := greedy(s)
	if !slices.Equal(toks, wantToks) || !slices.EqualFunc(logits, wantLogits, slices.Equal) {
		t.Fatalf("through the span node %v, the whole model %v (logits equal: %v)", toks, wantToks, slices.EqualFunc(logits, wantLogits, slices.Equal))
	}
	if st := s.(*span.Session).Stats(); st.Requests != st.Passes {
		t.Fatalf("stats %+v: want one request a pass", st)
	}
	s.Close()
	n.stop(t)
}

// testnet --spans auto: every expert node serves a span of all layers,
// the gating node sends each forward pass through one span node (one
// round trip a token), the span node in use is SIGKILLed mid-generation
// and the next provider, replayed, carries on: the tokens are llama.cpp's,
// and the span nodes' receipts pay for the work.
func TestTestnetSpans(t *testing.T) {
	t.Parallel()
	rep := spanTestnet(t, 23, "spans of layers", 24, "--nodes", "3", "--kill", "1@8")
	st := rep.Stats
	// At least the failover from the killed node: a SIGKILLed peer on
	// QUIC is found dead only when the request's deadline passes
	// (gating.call_timeout), and under a loaded machine a live provider
	// can miss it too and be replaced, with the same tokens.
	if st.SpansPerToken != 1 || st.RoundTripsPerToken != 1 || st.MoELayers != 0 || st.SpanFailovers < 1 || st.SpanReplays == 0 {
		t.Fatalf("stats %+v: want one span a pass, one round trip a token, no layer-by-layer calls, a failover with replays", st)
	}
	for i, n := range rep.Nodes[1:] {
		if !slices.Equal(n.Spans, []string{"0-3"}) {
			t.Errorf("expert node %d serves spans %v, want 0-3", i+1, n.Spans)
		}
	}
	if rep.Ledger.Treasury == 0 {
		t.Error("the span work was not settled: the treasury is empty")
	}
	// Every generation went through spans: the head never loaded the
	// layers' weights (gating.layers "auto").
	if l := rep.Nodes[0].LayersLoaded; l == nil || *l {
		t.Errorf("the gating node's layers loaded: %v, want false", l)
	}
}

// spanReport is what the span testnet tests read of a testnet's JSON.
type spanReport struct {
	Tokens      []int32   `json:"tokens"`
	PerTokenMs  []float64 `json:"per_token_ms"`
	Killed      []int     `json:"killed"`
	KilledAfter int       `json:"killed_after"`
	Nodes       []struct {
		Index        int      `json:"index"`
		PeerID       string   `json:"peer_id"`
		Faulty       string   `json:"faulty"`
		Checked      int      `json:"checked"`
		Failed       int      `json:"failed"`
		Excluded     bool     `json:"excluded"`
		Spans        []string `json:"spans"`
		Experts      int      `json:"-"`
		ExpertList   []string `json:"experts"`
		ExpertCalls  int      `json:"expert_calls"`
		LayersLoaded *bool    `json:"layers_loaded"`
		Verdicts     struct {
			Published int `json:"published"`
			Confirmed int `json:"confirmed"`
			Refuted   int `json:"refuted"`
			Slashes   int `json:"slashes"`
		} `json:"verdicts"`
	} `json:"nodes"`
	Stats struct {
		SpansPerToken      float64 `json:"spans_per_token"`
		RoundTripsPerToken float64 `json:"round_trips_per_token"`
		SpanFailovers      int     `json:"span_failovers"`
		SpanReplays        int     `json:"span_replays"`
		MoELayers          int     `json:"moe_layers"`
	} `json:"stats"`
	Ledger struct {
		Treasury    uint64            `json:"treasury"`
		StakesAfter map[string]uint64 `json:"stakes_after"`
	} `json:"ledger"`
	Validation struct {
		Wrong int `json:"wrong"`
	} `json:"validation"`
}

// spanTestnet runs `neurod testnet --spans auto --check --json` with args
// on a 4-layer llama model of seed, asking prompt for tokens tokens; it
// checks that the testnet exits 0 with llama.cpp's tokens and returns its
// report.
func spanTestnet(t *testing.T, seed int, prompt string, tokens int, args ...string) spanReport {
	t.Helper()
	path := makeModel(t, "--arch", "llama", "--layers", "4", "--experts", "6", "--experts-used", "2", "--embd", "96", "--ff", "64",
		"--type", "q8_0", "--seed", strconv.Itoa(seed))
	want := generateLocal(t, path, prompt, tokens)
	r := neurod(t, nil, append([]string{"testnet", "--spans", "auto", "--model", path, "--prompt", prompt, "--max-tokens", strconv.Itoa(tokens),
		"--check", "--json"}, args...)...)
	if r.code != 0 {
		t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	var rep spanReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	for i := range rep.Nodes {
		rep.Nodes[i].Experts = len(rep.Nodes[i].ExpertList)
	}
	if !slices.Equal(rep.Tokens, want) {
		t.Fatalf("testnet tokens %v\nllama.cpp      %v", rep.Tokens, want)
	}
	return rep
}

// Span answers are checked: among three span nodes of the whole model, one
// computes its experts wrong (--faulty 1:wrong). Its answers, re-executed
// by another provider, disagree, a third decides, and it is found wrong
// and excluded; the honest ones never are. Whether or not the chain used
// it first (then the generation rewinds and goes on through another), the
// tokens are llama.cpp's. The gating node publishes a verdict on the span
// request with the liar's span receipt and the session's earlier rows: the
// honest span nodes re-run it and confirm it, and the chain slashes the
// liar's stake (and no one else's).
func TestTestnetSpansCatchALiar(t *testing.T) {
	t.Parallel()
	rep := spanTestnet(t, 37, "trust but verify", 16, "--nodes", "3", "--faulty", "1:wrong")
	if rep.Stats.SpansPerToken != 1 || rep.Validation.Wrong == 0 {
		t.Fatalf("stats %+v, validation %+v: want the generation through one span, and results found wrong", rep.Stats, rep.Validation)
	}
	for _, n := range rep.Nodes[1:] {
		switch {
		case !slices.Equal(n.Spans, []string{"0-3"}):
			t.Errorf("node %d serves spans %v, want 0-3", n.Index, n.Spans)
		case n.Faulty == "wrong" && (!n.Excluded || n.Failed == 0):
			t.Errorf("the liar, node %d, was not found out: %+v", n.Index, n)
		case n.Faulty == "wrong" && rep.Ledger.StakesAfter[n.PeerID] >= 200_000_000:
			t.Errorf("the liar, node %d, was not slashed: stake %d", n.Index, rep.Ledger.StakesAfter[n.PeerID])
		case n.Faulty == "" && (n.Excluded || n.Failed != 0 || n.Checked == 0):
			t.Errorf("honest node %d: %+v", n.Index, n)
		case n.Faulty == "" && (rep.Ledger.StakesAfter[n.PeerID] != 200_000_000 || n.Verdicts.Refuted != 0 || n.Verdicts.Confirmed == 0):
			t.Errorf("honest node %d: stake %d, verdicts %+v (want every verdict confirmed)", n.Index, rep.Ledger.StakesAfter[n.PeerID], n.Verdicts)
		}
	}
	if v := rep.Nodes[0].Verdicts; v.Published == 0 || v.Slashes == 0 {
		t.Errorf("the gating node's verdicts: %+v, want published and reported for slashing", v)
	}
}

// Span nodes that call experts on other nodes (--span-experts call): two
// span nodes host the attention and routers of every layer and no expert,
// three expert nodes host the experts, the last of them computing wrong.
// The span nodes call the experts as a gating node does — the liar's
// answers among them — and check a sample elsewhere: they find the liar
// out, tell the head the position its answers made wrong (the generation
// rewinds and the tokens are llama.cpp's), publish verdicts with its
// receipts, and the chain slashes it. The expert nodes require payment
// (--require-escrow): they take the span nodes' calls on the head's
// delegation of the prompt's escrow, and their receipts, forwarded by the
// span nodes, are settled by the head. No honest node is slashed.
func TestTestnetSpansCallExperts(t *testing.T) {
	t.Parallel()
	rep := spanTestnet(t, 41, "spans that call experts", 16, "--nodes", "5", "--spans", "0-3,0-3,,,", "--span-experts", "call", "--faulty", "1:wrong",
		"--require-escrow")
	if rep.Stats.SpansPerToken != 1 || rep.Stats.MoELayers != 0 {
		t.Fatalf("stats %+v: want every pass through one span, no layer-by-layer calls from the head", rep.Stats)
	}
	published := 0
	for _, n := range rep.Nodes[1:] {
		stake := rep.Ledger.StakesAfter[n.PeerID]
		switch {
		case len(n.Spans) > 0:
			if n.Experts != 0 {
				t.Errorf("span node %d hosts %d experts, want none", n.Index, n.Experts)
			}
			published += n.Verdicts.Published
			if stake != 200_000_000 {
				t.Errorf("span node %d slashed: stake %d", n.Index, stake)
			}
		case n.Faulty == "wrong":
			if stake >= 200_000_000 {
				t.Errorf("the liar, node %d, was not slashed: stake %d", n.Index, stake)
			}
		default:
			if n.ExpertCalls == 0 || stake != 200_000_000 || n.Verdicts.Refuted != 0 {
				t.Errorf("expert node %d: %d calls, stake %d, verdicts %+v", n.Index, n.ExpertCalls, stake, n.Verdicts)
			}
		}
	}
	if published == 0 {
		t.Error("no span node published a verdict on the liar")
	}
	if rep.Ledger.Treasury == 0 {
		t.Error("the experts' work was not settled: the treasury is empty")
	}
}
