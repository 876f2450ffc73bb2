package testnet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// BenchRow is one configuration's measurements in `neurod bench`.
type BenchRow struct {
	Name string `json:"name"`
	// Kind is local, split, testnet, concurrent (the loopback testnet with
	// several users at once), netns (the RTT sweep), placement, speculate
	// or spans.
	Kind string `json:"kind"`
	// RTTMs is the round trip between the gating node and its expert node
	// (0 for the runs on one machine without emulated latency).
	RTTMs float64 `json:"rtt_ms"`
	// MeasuredRTTMs: what a ping through the emulated lines measured.
	MeasuredRTTMs   float64 `json:"measured_rtt_ms,omitempty"`
	TokensPerSecond float64 `json:"tokens_per_second"`
	// PerTokenP50Ms and P90: decode steps, the first token (which carries
	// the prompt) left out.
	PerTokenP50Ms float64 `json:"per_token_p50_ms"`
	PerTokenP90Ms float64 `json:"per_token_p90_ms"`
	// FloorMs is layers × RTT + compute, the least a token can take when
	// each MoE layer waits for one round trip; Ratio is p50 / floor.
	FloorMs float64 `json:"floor_ms"`
	Ratio   float64 `json:"ratio"`
	// RoundTripsPerToken are the MoE layers a token waited on the network
	// for (each one round trip: a layer's experts are called at once), and
	// CallsPerToken the expert calls (messages) it cost.
	RoundTripsPerToken float64 `json:"round_trips_per_token,omitempty"`
	CallsPerToken      float64 `json:"calls_per_token,omitempty"`
	// OneNodeShare is the share of MoE layers whose expert calls one node
	// answered.
	OneNodeShare float64 `json:"one_node_share"`
	// DispatchUsPerLayer is what an MoE layer's expert calls took beyond
	// the experts' compute (network, encoding, queues, wake-ups), on
	// average, and LocalRatio llama.cpp's per-token p50 over the run's
	// (its decode tokens/s over llama.cpp's; testnet rows).
	DispatchUsPerLayer float64 `json:"dispatch_overhead_per_layer_us,omitempty"`
	// DispatchDecodeUs, DispatchP50Us and DispatchP90Us are the
	// overhead's mean, median and 90th percentile over the run's one-token
	// (decode) MoE layers (to 10 us).
	DispatchDecodeUs float64 `json:"dispatch_overhead_decode_us,omitempty"`
	DispatchP50Us    uint64  `json:"dispatch_overhead_p50_us,omitempty"`
	DispatchP90Us    uint64  `json:"dispatch_overhead_p90_us,omitempty"`
	LocalRatio       float64 `json:"local_ratio,omitempty"`
	// PinnedLocalRatio is, for the pinned testnet, the pinned llama.cpp's
	// per-token p50 (one process on one core with one thread) over the
	// row's: the same cores per process on both sides.
	PinnedLocalRatio float64 `json:"pinned_local_ratio,omitempty"`
	// Each loopback testnet (default and pinned) answers the prompt in
	// Bench.Rounds rounds, each round paired with llama.cpp's answers just
	// before it, the nodes paused (Bench.loopback). On a testnet row
	// RoundsP50Ms holds each round's per-token p50 (the row's own fields
	// are the last round's), LocalRoundsP50Ms and PinnedLocalRoundsP50Ms
	// llama.cpp's in the same rounds (every core; pinned as the pinned
	// testnet is), LocalRatioRounds and PinnedLocalRatioRounds each
	// round's ratios (llama.cpp's p50 over the row's) and the Median
	// fields their medians: on a noisy host one run's ratio says little.
	// On the llama.cpp rows RoundsP50Ms are their rounds' p50s beside the
	// testnet (llama.cpp's beside the default one, the pinned llama.cpp's
	// beside the pinned one).
	RoundsP50Ms            []float64 `json:"rounds_p50_ms,omitempty"`
	LocalRoundsP50Ms       []float64 `json:"local_rounds_p50_ms,omitempty"`
	PinnedLocalRoundsP50Ms []float64 `json:"pinned_local_rounds_p50_ms,omitempty"`
	LocalRatioRounds       []float64 `json:"local_ratio_rounds,omitempty"`
	LocalRatioMedian       float64   `json:"local_ratio_median,omitempty"`
	PinnedLocalRatioRounds []float64 `json:"pinned_local_ratio_rounds,omitempty"`
	PinnedLocalRatioMedian float64   `json:"pinned_local_ratio_median,omitempty"`
	Direct                 *bool     `json:"direct,omitempty"`
	Skipped                string    `json:"skipped,omitempty"`
	// Users asked at once (kind concurrent), each through a client of its
	// own; TokensPerSecond is then all their generated tokens over the
	// round's wall time, AloneTokensPerSecond the round's first request's
	// (asked alone, before), and the latencies are of that request.
	Users                int     `json:"users,omitempty"`
	AloneTokensPerSecond float64 `json:"alone_tokens_per_second,omitempty"`
	// Batch says whether the gating node batched the users' MoE layers
	// into shared rounds of expert calls ("on", "off"; kind concurrent),
	// and SharedLayerShare the share of their layers that went out so.
	// On the llama.cpp rows of several users ("llama.cpp": the users'
	// prompts answered in one llama.cpp context, as llama-server batches its
	// slots) EqualUsers counts the sequences whose tokens are llama.cpp's
	// alone (its batches of several rows take other kernels).
	Batch            string  `json:"batch,omitempty"`
	SharedLayerShare float64 `json:"shared_layer_share,omitempty"`
	EqualUsers       *int    `json:"equal_users,omitempty"`
	// MsPerToken is the decode steps' mean latency (with speculative
	// decoding the tokens of one pass come at once, so p50 says little).
	// Speculative decoding (kind speculate): the drafter (off, ngram,
	// draft), and the drafted tokens kept per pass that checked a draft,
	// of those drafted.
	Speculate       string  `json:"speculate,omitempty"`
	MsPerToken      float64 `json:"ms_per_token,omitempty"`
	AcceptedPerPass float64 `json:"accepted_per_pass,omitempty"`
	Acceptance      float64 `json:"acceptance,omitempty"`
	// Layer spans (kind spans): the row's model's MoE layers, the spans a
	// forward pass went through, the failovers and hedged requests, what
	// the failovers cost (replayed
	// bytes and time, the time from a failed request's start until the
	// next provider answered it), the token after which a span node was
	// killed and that token's latency, and the row's p50 over the layer by
	// layer row's (goal: at most 1/8 with 4 spans of 12 layers).
	Layers            int     `json:"layers,omitempty"`
	SpansPerToken     float64 `json:"spans_per_token,omitempty"`
	SpanFailovers     uint64  `json:"span_failovers,omitempty"`
	SpanHedges        uint64  `json:"span_hedges,omitempty"`
	SpanReplayBytes   uint64  `json:"span_replay_bytes,omitempty"`
	SpanReplayMs      float64 `json:"span_replay_ms,omitempty"`
	SpanRecoveryMs    float64 `json:"span_recovery_ms,omitempty"`
	KilledAfter       int     `json:"killed_after,omitempty"`
	KillTokenMs       float64 `json:"kill_token_ms,omitempty"`
	LayerByLayerRatio float64 `json:"layer_by_layer_ratio,omitempty"`
}

// BenchReport is `neurod bench --json` and report.json.
type BenchReport struct {
	Model     string     `json:"model"`
	Params    string     `json:"params"`
	Prompt    string     `json:"prompt"`
	MaxTokens int        `json:"max_tokens"`
	Layers    int        `json:"layers"`
	ComputeMs float64    `json:"compute_ms"`
	Machine   string     `json:"machine"`
	When      string     `json:"when"`
	Rows      []BenchRow `json:"rows"`
	Dir       string     `json:"dir"`
}

// BenchPrompt is the prompt every bench run answers.
const BenchPrompt = "The history of distributed computing"

// Bench answers BenchPrompt greedily on one model in every way neuro
// runs it, in this process: the whole model in llama.cpp and split (both
// through OnMachine, which the binary gives: package testnet does not link
// llama.cpp), the loopback testnet, the netns testnet at each RTT, and
// two placement runs; every way must give the same tokens. `neurod bench`
// drives it and writes the report.
type Bench struct {
	Log       *slog.Logger
	Timeout   time.Duration
	MaxTokens int
	// NetnsErr, if set, is why the netns runs are skipped.
	NetnsErr error
	// NoLoopback leaves out the two loopback testnet rows (default and
	// pinned); llama.cpp's and the split rows always run: every other row
	// is checked against their tokens and compute.
	NoLoopback bool
	// Rounds is how many times each loopback testnet (default and pinned)
	// answers the prompt, each answer paired with llama.cpp's just before
	// it (default 1; Bench.loopback, BenchRow.RoundsP50Ms); every answer
	// is checked for llama.cpp's tokens.
	Rounds int
	// PlacementRTT (0: leave out) and PlacementFar are the RTTs from the
	// gating node to the near and the far expert home in the two placement
	// runs, with PlacementJitter on every line.
	PlacementRTT, PlacementFar, PlacementJitter time.Duration
	// Binary is the neurod executable the testnets' nodes run.
	Binary string
	// Concurrency lists the numbers of users the loopback testnet also
	// serves at once (none: left out), and, at ConcurrencyRTT (0: left
	// out), the netns testnet.
	Concurrency    []int
	ConcurrencyRTT time.Duration
	// SpeculateRTT, if positive, adds the speculative decoding runs: the
	// netns testnet at that RTT (the loopback testnet where namespaces are
	// unavailable) answering SpeculatePrompt with a model of the bench
	// model's shape that speaks SpeculateText (it repeats the list the
	// prompt starts), without speculation, with prompt lookup and with a
	// draft model (the same model in q4_0); SpeculationModels (given by
	// the binary) writes the two models of that shape into a directory.
	SpeculateRTT      time.Duration
	SpeculationModels func(dir string, shape *neuropb.ModelParams) (model, draft string, err error)
	// SpansRTT, if positive, adds the layer-span runs (Bench.spans): a
	// model of SpansLayers MoE layers (default 48) on SpansHomes expert
	// homes (default 4) at that RTT, layer by layer and through spans.
	SpansRTT                time.Duration
	SpansLayers, SpansHomes int
	// OnMachine answers the prompt on this machine: the whole GGUF in
	// llama.cpp, or (split) the gating compute with in-process experts.
	OnMachine func(ctx context.Context, model string, split bool, prompt string, maxTokens int) (*Generation, error)
	// OnMachineSeqs answers the prompt seqs times at once in one llama.cpp
	// context on this machine (nil: left out): what llama.cpp itself makes
	// of the users rows' load. It returns each sequence's generation and
	// the wall time of them all.
	OnMachineSeqs func(ctx context.Context, model, prompt string, maxTokens, seqs int) ([]*Generation, time.Duration, error)

	model string
	shape *neuropb.ModelParams // the bench model's
	rep   *BenchReport
	want  []int32 // llama.cpp's tokens, which every run must give
	// seqsAlone is llama.cpp's tokens/s for one sequence in OnMachineSeqs
	seqsAlone float64
}

// benchGen is what one run gave, whichever way it ran.
type benchGen struct {
	Tokens          []int32
	TokensPerSecond float64
	PerTokenMs      []float64
	Stats           *Stats
	Connections     []Conn
	Link            *LinkReport
}

// Run runs every way at each of rtts into a report for directory out.
func (b *Bench) Run(ctx context.Context, modelPath, out string, rtts []time.Duration) (*BenchReport, error) {
	if b.OnMachine == nil || b.Binary == "" {
		return nil, errors.New("bench: OnMachine and Binary are required")
	}
	if b.Log == nil {
		b.Log = slog.Default()
	}
	cleanup, err := b.prepare(modelPath, out)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	if err := b.onMachine(ctx); err != nil {
		return nil, err
	}
	if !b.NoLoopback {
		b.Log.Info("bench: testnet on 127.0.0.1")
		if err := b.loopback(ctx, "testnet", false); err != nil {
			return nil, err
		}
		b.Log.Info("bench: llama.cpp pinned to a core, one thread")
		if err := b.pinnedLocal(ctx); err != nil {
			return nil, err
		}
		b.Log.Info("bench: testnet on 127.0.0.1, each process pinned to a core")
		if err := b.loopback(ctx, PinnedTestnetRow, true); err != nil {
			return nil, err
		}
	}
	for _, users := range b.Concurrency {
		if err := b.llamaUsers(ctx, users); err != nil {
			return nil, err
		}
		b.Log.Info("bench: testnet on 127.0.0.1, users at once", "users", users)
		if err := b.concurrent(ctx, users, 0); err != nil {
			return nil, err
		}
	}
	for _, rtt := range rtts {
		b.Log.Info("bench: netns testnet", "rtt", rtt)
		t := &Netns{Publics: 4, NATs: []netns.NAT{netns.Cone, netns.Cone}}
		if rtt > 0 {
			t.Links = []netns.Link{{RTT: rtt}, {RTT: rtt}}
		}
		if err := b.scenario(ctx, "netns "+FmtRTT(rtt), "netns", rtt, t); err != nil {
			return nil, err
		}
	}
	if err := b.placement(ctx); err != nil {
		return nil, err
	}
	if b.ConcurrencyRTT > 0 {
		for _, users := range b.Concurrency {
			b.Log.Info("bench: netns testnet, users at once", "users", users, "rtt", b.ConcurrencyRTT)
			if err := b.concurrent(ctx, users, b.ConcurrencyRTT); err != nil {
				return nil, err
			}
		}
	}
	if err := b.speculation(ctx); err != nil {
		return nil, err
	}
	if err := b.spans(ctx); err != nil {
		return nil, err
	}
	pinned := b.rep.Row(PinnedLocalRow)
	for i := range b.rep.Rows {
		r := &b.rep.Rows[i]
		if r.Kind == "testnet" && r.PerTokenP50Ms > 0 && r.LocalRatio == 0 { // the loopback rows' are their rounds'
			r.LocalRatio = b.rep.Rows[0].PerTokenP50Ms / r.PerTokenP50Ms
			if r.Name == PinnedTestnetRow && pinned != nil && pinned.PerTokenP50Ms > 0 {
				r.PinnedLocalRatio = pinned.PerTokenP50Ms / r.PerTokenP50Ms
			}
		}
		if r.Skipped != "" || r.Kind == "local" || r.Kind == "split" || r.Kind == "concurrent" || r.Kind == "speculate" || r.Kind == "spans" {
			continue
		}
		r.FloorMs = float64(b.rep.Layers)*r.RTTMs + b.rep.ComputeMs
		if r.FloorMs > 0 {
			r.Ratio = r.PerTokenP50Ms / r.FloorMs
		}
	}
	return b.rep, nil
}

// prepare makes the report's directory and the bench model (unless given)
// and reads its shape.
func (b *Bench) prepare(modelPath, out string) (cleanup func(), err error) {
	cleanup = func() {}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("flag --out: %w", err)
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return nil, err
	}
	b.rep = &BenchReport{Prompt: BenchPrompt, MaxTokens: b.MaxTokens, Dir: abs, When: time.Now().UTC().Format(time.RFC3339),
		Machine: machineLine(), Model: filepath.Base(modelPath)}
	if modelPath == "" {
		tmp, err := os.MkdirTemp("", "neuro-bench-")
		if err != nil {
			return nil, err
		}
		cleanup = func() { os.RemoveAll(tmp) }
		modelPath = filepath.Join(tmp, "bench.gguf")
		b.Log.Info("generating the bench model", "path", modelPath)
		if err := writeBenchModel(modelPath); err != nil {
			cleanup()
			return nil, err
		}
		b.rep.Model = "bench preset, q8_0, seed 3"
	}
	b.model = modelPath
	p, err := model.ReadParams(modelPath)
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("bench: %w", err)
	}
	b.shape = p
	b.rep.Layers = int(p.GetLayers())
	b.rep.Params = fmt.Sprintf("%d layers, %d experts (top %d), embd %d, ff %d", p.GetLayers(), p.GetExperts(), p.GetExpertsUsed(),
		p.GetEmbd(), p.GetFf())
	return cleanup, nil
}

// writeBenchModel generates the bench preset (about 1 GiB) straight into
// path.
func writeBenchModel(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("bench model: %w", err)
	}
	if err := model.Generate(f, model.Presets["bench"], model.Q8_0, 3); err != nil {
		f.Close()
		return fmt.Errorf("bench model: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("bench model: %w", err)
	}
	return nil
}

// onMachine runs the model in llama.cpp and split, in this process.
func (b *Bench) onMachine(ctx context.Context) error {
	for _, run := range []struct{ name, kind string }{{"llama.cpp", "local"}, {"split", "split"}} {
		b.Log.Info("bench: " + run.name)
		out, err := b.OnMachine(ctx, b.model, run.kind == "split", BenchPrompt, b.MaxTokens)
		if err != nil {
			return fmt.Errorf("%s: %w", run.name, err)
		}
		if err := b.add(run.name, run.kind, 0, genOf(out)); err != nil {
			return err
		}
	}
	b.rep.ComputeMs = b.rep.Rows[1].PerTokenP50Ms
	return nil
}

// The rows of the pinned runs: llama.cpp in a process of its own on one
// core with one compute thread, and the loopback testnet with each
// process so (Loopback.Pin).
const (
	PinnedLocalRow   = "llama.cpp, pinned (a core and a thread)"
	PinnedTestnetRow = "testnet, pinned (a core and a thread each)"
)

// Row is the report's row of that name, or nil.
func (r *BenchReport) Row(name string) *BenchRow {
	for i := range r.Rows {
		if r.Rows[i].Name == name {
			return &r.Rows[i]
		}
	}
	return nil
}

// pinnedLocal runs llama.cpp as the pinned testnet runs each of its
// nodes: `neurod generate --local --threads 1` on core 0 (taskset), the
// gating node's core. Its row is the pinned testnet's reference: two
// processes of one thread each against one.
func (b *Bench) pinnedLocal(ctx context.Context) error {
	g, err := b.runPinnedLocal(ctx)
	if err != nil {
		return err
	}
	return b.add(PinnedLocalRow, "local", 0, g)
}

// runPinnedLocal answers the bench prompt once with llama.cpp on core 0
// and one thread.
func (b *Bench) runPinnedLocal(ctx context.Context) (benchGen, error) {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "taskset", "-c", "0", b.Binary, "generate", "--local", b.model, "--threads", "1",
		"--prompt", BenchPrompt, "--max-tokens", strconv.Itoa(b.MaxTokens), "--json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 600 {
			msg = "…" + msg[len(msg)-600:]
		}
		return benchGen{}, fmt.Errorf("%s: %w: %s", PinnedLocalRow, err, msg)
	}
	var g Generation
	if err := json.Unmarshal(out, &g); err != nil {
		return benchGen{}, fmt.Errorf("%s: its output: %w", PinnedLocalRow, err)
	}
	return genOf(&g), nil
}

// genOf is what a generation on this machine gave.
func genOf(g *Generation) benchGen {
	return benchGen{Tokens: g.Tokens, TokensPerSecond: g.TokensPerSecond, PerTokenMs: g.PerTokenMs}
}

// loopback runs the loopback testnet of a gating node and one expert node
// (pin: each process on a core of its own with one thread) as row name:
// one network answers the bench prompt Rounds times (at least once), and
// before each answer llama.cpp answers it on this machine with the nodes
// paused (Network.Pause) — in this process with every core, and beside the
// pinned testnet also as it runs pinned (runPinnedLocal). Each round's
// ratios so compare runs seconds apart: a noisy host's speed drifts by a
// fifth within minutes, and rows measured minutes apart said more of the
// drift than of the testnet. The row's own fields are the last round's,
// its ratios the last round's pair.
func (b *Bench) loopback(ctx context.Context, name string, pin bool) error {
	rounds := max(b.Rounds, 1)
	var local, pinnedLocal, p50s []float64
	ref := func(what string, run func() (benchGen, error), into *[]float64) error {
		g, err := run()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if fmt.Sprint(g.Tokens) != fmt.Sprint(b.want) {
			return fmt.Errorf("%s: tokens %v differ from llama.cpp's %v", what, g.Tokens, b.want)
		}
		*into = append(*into, p50Of(g.PerTokenMs))
		return nil
	}
	s := &Scenario{Topology: &Loopback{ExpertNodes: 1, Dashboard: "127.0.0.1:0", Pin: pin}, Model: b.model, Prompt: BenchPrompt,
		Requests: rounds,
		BeforeRequest: func(ctx context.Context, req int, nw *Network) error {
			b.Log.Info("bench: round", "round", req+1, "of", rounds, "run", name)
			resume := nw.Pause()
			defer resume()
			if err := ref("llama.cpp", func() (benchGen, error) {
				out, err := b.OnMachine(ctx, b.model, false, BenchPrompt, b.MaxTokens)
				if err != nil {
					return benchGen{}, err
				}
				return genOf(out), nil
			}, &local); err != nil || !pin {
				return err
			}
			return ref(PinnedLocalRow, func() (benchGen, error) { return b.runPinnedLocal(ctx) }, &pinnedLocal)
		},
		AfterRequest: func(_ int, rep *Report) { p50s = append(p50s, p50Of(rep.PerTokenMs)) },
	}
	rep, err := b.runChecked(ctx, name, s, b.want)
	if err != nil {
		return err
	}
	if len(p50s) != rounds || len(local) != rounds || pin && len(pinnedLocal) != rounds {
		return fmt.Errorf("%s: %d rounds answered, %d beside llama.cpp, %d beside it pinned; want %d", name, len(p50s), len(local), len(pinnedLocal), rounds)
	}
	if err := b.add(name, "testnet", 0, benchGen{Tokens: rep.Tokens, TokensPerSecond: rep.TokensPerSecond, PerTokenMs: rep.PerTokenMs,
		Stats: rep.Stats, Connections: rep.Connections, Link: rep.Link}); err != nil {
		return err
	}
	row := &b.rep.Rows[len(b.rep.Rows)-1]
	median := func(xs []float64) float64 { return Percentile(slices.Sorted(slices.Values(xs)), 0.5) }
	row.RoundsP50Ms, row.LocalRoundsP50Ms = p50s, local
	for i := range rounds {
		row.LocalRatioRounds = append(row.LocalRatioRounds, ratio(local[i], p50s[i]))
	}
	row.LocalRatio, row.LocalRatioMedian = row.LocalRatioRounds[rounds-1], median(row.LocalRatioRounds)
	if !pin {
		b.rep.Rows[0].RoundsP50Ms = local
		return nil
	}
	row.PinnedLocalRoundsP50Ms = pinnedLocal
	for i := range rounds {
		row.PinnedLocalRatioRounds = append(row.PinnedLocalRatioRounds, ratio(pinnedLocal[i], p50s[i]))
	}
	row.PinnedLocalRatio, row.PinnedLocalRatioMedian = row.PinnedLocalRatioRounds[rounds-1], median(row.PinnedLocalRatioRounds)
	if r := b.rep.Row(PinnedLocalRow); r != nil {
		r.RoundsP50Ms = pinnedLocal
	}
	return nil
}

// p50Of is the decode steps' per-token p50 of perTokenMs (the first
// token, which carries the prompt, left out).
func p50Of(perTokenMs []float64) float64 {
	var one BenchRow
	one.decodeLatency(perTokenMs)
	return one.PerTokenP50Ms
}

// ratio is a / b, 0 when b is.
func ratio(a, b float64) float64 {
	if b <= 0 {
		return 0
	}
	return a / b
}

// scenario runs a testnet scenario on topology t, in this process, and
// adds its row; a netns run is skipped where namespaces are not available.
func (b *Bench) scenario(ctx context.Context, name, kind string, rtt time.Duration, t Topology) error {
	if _, ok := t.(*Netns); ok && b.NetnsErr != nil {
		b.rep.Rows = append(b.rep.Rows, BenchRow{Name: name, Kind: kind, RTTMs: ms(rtt), Skipped: b.NetnsErr.Error()})
		return nil
	}
	g, err := b.runTestnet(ctx, t)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return b.add(name, kind, rtt, g)
}

// runTestnet answers the bench prompt once on a testnet of topology t.
func (b *Bench) runTestnet(ctx context.Context, t Topology) (benchGen, error) {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	s := &Scenario{Topology: t, Binary: b.Binary, Model: b.model, Prompt: BenchPrompt, MaxTokens: b.MaxTokens,
		Timeout: b.Timeout, Check: true, Log: b.Log}
	rep, _, err := s.Run(ctx)
	if err != nil {
		return benchGen{}, err
	}
	return benchGen{Tokens: rep.Tokens, TokensPerSecond: rep.TokensPerSecond, PerTokenMs: rep.PerTokenMs,
		Stats: rep.Stats, Connections: rep.Connections, Link: rep.Link}, nil
}

// concurrent runs a gating node and one expert node with users asking at
// once, after one alone — on 127.0.0.1, or (rtt > 0) in the netns testnet
// at that RTT (skipped without namespaces) — with the gating node's
// continuous batching and, for several users, without it; every answer
// must be llama.cpp's.
func (b *Bench) concurrent(ctx context.Context, users int, rtt time.Duration) error {
	for _, batch := range []bool{true, false} {
		if !batch && users < 2 {
			break
		}
		if err := b.concurrentRun(ctx, users, rtt, batch); err != nil {
			return err
		}
	}
	return nil
}

// LlamaUsersRow names the row of llama.cpp answering users at once.
func LlamaUsersRow(users int) string {
	return fmt.Sprintf("llama.cpp, %d users at once in one context", users)
}

// llamaUsers adds the row of llama.cpp answering the bench prompt for
// users at once, in one context of as many sequences (OnMachineSeqs), its
// tokens/s beside one sequence's: on a machine whose cores the model's
// compute fills, the most a batch of users can gain.
func (b *Bench) llamaUsers(ctx context.Context, users int) error {
	if b.OnMachineSeqs == nil {
		return nil
	}
	b.Log.Info("bench: llama.cpp, users at once in one context", "users", users)
	run := func(seqs int) ([]*Generation, float64, error) {
		ctx, cancel := context.WithTimeout(ctx, b.Timeout)
		defer cancel()
		gens, wall, err := b.OnMachineSeqs(ctx, b.model, BenchPrompt, b.MaxTokens, seqs)
		if err != nil {
			return nil, 0, fmt.Errorf("llama.cpp, %d sequences at once: %w", seqs, err)
		}
		if len(gens) != seqs || wall <= 0 {
			return nil, 0, fmt.Errorf("llama.cpp, %d sequences at once: %d generations in %v", seqs, len(gens), wall)
		}
		n := 0
		for _, g := range gens {
			n += len(g.Tokens)
		}
		return gens, float64(n) / wall.Seconds(), nil
	}
	if b.seqsAlone == 0 {
		_, tps, err := run(1)
		if err != nil {
			return err
		}
		b.seqsAlone = tps
	}
	gens, tps, err := run(users)
	if err != nil {
		return err
	}
	equal := 0
	for _, g := range gens {
		if slices.Equal(g.Tokens, b.want) {
			equal++
		}
	}
	row := BenchRow{Name: LlamaUsersRow(users), Kind: "concurrent", Users: users, Batch: "llama.cpp", TokensPerSecond: tps,
		AloneTokensPerSecond: b.seqsAlone, EqualUsers: &equal}
	row.decodeLatency(gens[0].PerTokenMs)
	b.rep.Rows = append(b.rep.Rows, row)
	b.Log.Info("bench run done", "run", row.Name, "tokens_per_s", tps, "alone", b.seqsAlone, "equal", equal)
	return nil
}

func (b *Bench) concurrentRun(ctx context.Context, users int, rtt time.Duration, batch bool) error {
	var t Topology = &Loopback{ExpertNodes: 1, Dashboard: "127.0.0.1:0"}
	name := fmt.Sprintf("testnet (1 expert node), %d users at once", users)
	if rtt > 0 {
		name = fmt.Sprintf("netns %s, %d users at once", FmtRTT(rtt), users)
	}
	mode, wait := "on", time.Duration(0)
	if !batch {
		mode, wait = "off", -1
		name += ", batching off"
	}
	if rtt > 0 {
		if b.NetnsErr != nil {
			b.rep.Rows = append(b.rep.Rows, BenchRow{Name: name, Kind: "concurrent", RTTMs: ms(rtt), Users: users, Batch: mode, Skipped: b.NetnsErr.Error()})
			return nil
		}
		t = &Netns{Publics: 4, NATs: []netns.NAT{netns.Cone, netns.Cone}, Links: []netns.Link{{RTT: rtt}, {RTT: rtt}}}
	}
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	s := &Scenario{Topology: t, Binary: b.Binary, Model: b.model, Prompt: BenchPrompt, BatchWait: wait,
		MaxTokens: b.MaxTokens, Concurrency: users, Timeout: b.Timeout, Check: true, Log: b.Log}
	rep, _, err := s.Run(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := b.add(name, "concurrent", rtt, benchGen{Tokens: rep.Tokens, TokensPerSecond: rep.AggregateTokensPerS, PerTokenMs: rep.PerTokenMs,
		Stats: rep.Stats}); err != nil {
		return err
	}
	row := &b.rep.Rows[len(b.rep.Rows)-1]
	row.Users, row.AloneTokensPerSecond, row.Batch, row.SharedLayerShare = users, rep.TokensPerSecond, mode, rep.SharedLayerShare
	return nil
}

// placement runs two expert homes, one near and one far, with jitter; in
// one run both host every expert (the gating node sends a layer's calls
// to one of them), in the other each expert is on one home only.
func (b *Bench) placement(ctx context.Context) error {
	if b.PlacementRTT <= 0 {
		return nil
	}
	for _, spread := range []bool{false, true} {
		name := fmt.Sprintf("placement: expert nodes %s and %s away ±%s, experts together", FmtRTT(b.PlacementRTT), FmtRTT(b.PlacementFar), FmtRTT(b.PlacementJitter))
		if spread {
			name = strings.Replace(name, "together", "spread", 1)
		}
		b.Log.Info("bench: netns testnet, placement", "near", b.PlacementRTT, "far", b.PlacementFar, "spread", spread)
		// Each home's line adds half its RTT each way: the gating home and
		// the near one get the near RTT; the far one what puts it
		// placementFar from the gating node.
		far := 2*b.PlacementFar - b.PlacementRTT
		j := b.PlacementJitter
		t := &Netns{Publics: 4, NATs: []netns.NAT{netns.Cone, netns.Cone, netns.Cone}, Spread: spread,
			Links: []netns.Link{{RTT: b.PlacementRTT, Jitter: j}, {RTT: b.PlacementRTT, Jitter: j}, {RTT: far, Jitter: j}}}
		if err := b.scenario(ctx, name, "placement", b.PlacementRTT, t); err != nil {
			return err
		}
	}
	return nil
}

// SpeculateText is what the speculation runs' model says: a list, which
// SpeculatePrompt gives once and begins again, so that the answer repeats
// it (as answers that quote, list or edit their input do).
const SpeculateText = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega " +
	"one two three four five six seven eight nine ten eleven twelve"

// SpeculatePrompt asks for SpeculateText again.
const SpeculatePrompt = SpeculateText + " alpha beta"

// speculation runs the speculative decoding rows: without it, with prompt
// lookup and with a draft model, each giving llama.cpp's tokens.
func (b *Bench) speculation(ctx context.Context) error {
	if b.SpeculateRTT <= 0 || b.SpeculationModels == nil {
		return nil
	}
	dir := filepath.Join(b.rep.Dir, "speculation")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b.Log.Info("bench: speculation models")
	m, draft, err := b.SpeculationModels(dir, b.shape)
	if err != nil {
		return fmt.Errorf("speculation: %w", err)
	}
	ref, err := b.OnMachine(ctx, m, false, SpeculatePrompt, b.MaxTokens)
	if err != nil {
		return fmt.Errorf("speculation: llama.cpp: %w", err)
	}
	rtt := b.SpeculateRTT
	where := "netns " + FmtRTT(rtt)
	if b.NetnsErr != nil {
		rtt, where = 0, "testnet"
	}
	for _, kind := range []string{"off", "ngram", "draft"} {
		var t Topology = &Loopback{ExpertNodes: 1, Dashboard: "127.0.0.1:0"}
		if rtt > 0 {
			t = &Netns{Publics: 4, NATs: []netns.NAT{netns.Cone, netns.Cone}, Links: []netns.Link{{RTT: rtt}, {RTT: rtt}}}
		}
		name := fmt.Sprintf("speculation %s, %s, repeating a list", kind, where)
		b.Log.Info("bench: "+name, "rtt", rtt)
		s := &Scenario{Topology: t, Model: m, Prompt: SpeculatePrompt, Speculate: kind}
		if kind == "draft" {
			s.Draft = draft
		}
		rep, err := b.runChecked(ctx, name, s, ref.Tokens)
		if err != nil {
			return err
		}
		row := BenchRow{Name: name, Kind: "speculate", RTTMs: ms(rtt), TokensPerSecond: rep.TokensPerSecond, Speculate: kind}
		row.decodeLatency(rep.PerTokenMs)
		if st := rep.Stats; st != nil {
			row.RoundTripsPerToken, row.AcceptedPerPass = st.RoundTripsPerToken, st.AcceptedPerPass
			if st.DraftTokens > 0 {
				row.Acceptance = float64(st.AcceptedTokens) / float64(st.DraftTokens)
			}
		}
		b.rep.Rows = append(b.rep.Rows, row)
		b.Log.Info("bench run done", "run", name, "ms_per_token", row.MsPerToken, "accepted_per_pass", row.AcceptedPerPass)
	}
	return nil
}

// runChecked runs scenario s (its binary, tokens, timeout and log the
// bench's) within the bench's timeout, and checks that it gave want,
// llama.cpp's tokens for its model and prompt.
func (b *Bench) runChecked(ctx context.Context, name string, s *Scenario, want []int32) (*Report, error) {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	s.Binary, s.MaxTokens, s.Timeout, s.Check, s.Log = b.Binary, b.MaxTokens, b.Timeout, true, b.Log
	rep, _, err := s.Run(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if fmt.Sprint(rep.Tokens) != fmt.Sprint(want) {
		return nil, fmt.Errorf("%s: tokens %v differ from llama.cpp's %v", name, rep.Tokens, want)
	}
	return rep, nil
}

// add checks a run's tokens against llama.cpp's and adds its row.
func (b *Bench) add(name, kind string, rtt time.Duration, g benchGen) error {
	if b.want == nil {
		b.want = g.Tokens
	} else if fmt.Sprint(g.Tokens) != fmt.Sprint(b.want) {
		return fmt.Errorf("%s: tokens %v differ from llama.cpp's %v", name, g.Tokens, b.want)
	}
	row := BenchRow{Name: name, Kind: kind, RTTMs: ms(rtt), TokensPerSecond: g.TokensPerSecond}
	row.decodeLatency(g.PerTokenMs)
	if st := g.Stats; st != nil && len(g.Tokens) > 0 {
		row.RoundTripsPerToken = float64(st.MoELayers) / float64(len(g.Tokens))
		row.CallsPerToken = float64(st.ExpertCalls) / float64(len(g.Tokens))
		row.DispatchUsPerLayer = st.DispatchPerLay
		row.DispatchDecodeUs, row.DispatchP50Us, row.DispatchP90Us = st.DispatchDecodeUs, st.DispatchP50Us, st.DispatchP90Us
		if st.MoELayers > 0 {
			row.OneNodeShare = float64(st.OneNodeLayers) / float64(st.MoELayers)
		}
	}
	if len(g.Connections) > 0 {
		d := g.Connections[0].Direct
		row.Direct = &d
	}
	if g.Link != nil {
		row.MeasuredRTTMs = g.Link.MeasuredRTTMs
	}
	b.rep.Rows = append(b.rep.Rows, row)
	b.Log.Info("bench run done", "run", name, "tokens_per_second", row.TokensPerSecond, "per_token_p50_ms", row.PerTokenP50Ms)
	return nil
}

// decodeLatency sets the row's p50, p90 and mean of the decode steps'
// latencies (the first token, which carries the prompt, left out).
func (row *BenchRow) decodeLatency(perTokenMs []float64) {
	if len(perTokenMs) < 2 {
		return
	}
	decode := slices.Clone(perTokenMs[1:])
	var sum float64
	for _, d := range decode {
		sum += d
	}
	row.MsPerToken = sum / float64(len(decode))
	slices.Sort(decode)
	row.PerTokenP50Ms, row.PerTokenP90Ms = Percentile(decode, 0.5), Percentile(decode, 0.9)
}

// FmtRTT writes an RTT for the report (0 ms, 20 ms).
func FmtRTT(d time.Duration) string {
	if d == 0 {
		return "0 ms"
	}
	return strconv.FormatFloat(ms(d), 'f', -1, 64) + " ms"
}

// machineLine describes this machine for the report.
func machineLine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d cores", cpu, runtime.NumCPU())
}
