package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/testnet"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// benchLong is `neurod bench --help`.
const benchLong = `bench answers one fixed prompt greedily, --max-tokens tokens, on the bench
model (about 1 B parameters, q8_0, generated; or --model) in each of these
ways, and checks that every way gives the same tokens:

  llama.cpp      'neurod generate --local': the whole model in llama.cpp
  split          'neurod generate --split': the gating compute and the
                 experts from their shards, in one process
  testnet        'neurod testnet': a gating node and one expert node,
                 processes on 127.0.0.1
  llama.cpp, pinned  'neurod generate --local --threads 1' on one core
                 (taskset): the pinned testnet's reference
  testnet, pinned  the same with each process on a core of its own and one
                 compute thread (taskset), so that they do not compete
  netns RTT      'neurod testnet --netns --rtt RTT': the gating node and the
                 expert node each in a home behind its NAT, hole punched,
                 RTT apart (one run per --rtt; needs root, else skipped)
  placement      two expert homes, one --placement-rtt from the gating
                 node and one --placement-far (± --placement-jitter): once
                 with both hosting every expert (a layer's calls go to
                 the near node), once with each expert on one home only
                 (a layer often waits on the far one)
  speculation    a model of the bench model's shape that repeats a list,
                 in the netns testnet at --speculate-rtt: without
                 speculative decoding, with prompt lookup (ngram) and with
                 a q4_0 draft model of it (ms per token, round trips per
                 token, drafted tokens kept per pass)
  spans          a model of --spans-layers MoE layers in Qwen3-30B-A3B's
                 proportions, scaled down, on --spans-homes expert homes
                 at --spans-rtt, each home serving a run of consecutive
                 layers: layer by layer (one round trip a layer), through
                 the spans (one a span), through the spans with the node
                 of the first span in use SIGKILLed mid-generation (a
                 spare serves that span too: recovery and replay cost),
                 and through the spans with speculative decoding

For each it reports tokens per second, the per-token latency (p50 and p90
of the decode steps), for the loopback testnets the dispatch overhead per
MoE layer (its expert calls' time beyond the experts' compute) and
llama.cpp's p50 over theirs (for the pinned one also the pinned llama.cpp's),
and, over the network, the floor a token cannot beat,
layers × RTT + compute (compute: the split run's p50), and the latency's
ratio to it. It writes report.md (the table), report.png (tokens/s and
per-token latency against RTT, the floor drawn in) and report.json into
--out.`

// benchFlags are the flags of `neurod bench`.
type benchFlags struct {
	model, out, rtts, concurrency   string
	maxTokens, rounds               int
	json, noNetns, noLoopback       bool
	timeout                         time.Duration
	placement, placementFar, jitter time.Duration
	speculateRTT, concurrencyRTT    time.Duration
	spansRTT                        time.Duration
	spansLayers, spansHomes         int
}

func newBenchCmd(g *globalFlags) *cobra.Command {
	var f benchFlags
	cmd := &cobra.Command{
		Use:   "bench [--model FILE.gguf] [--out DIR] [--rtt LIST] [--max-tokens N] [--json]",
		Short: "Measure generation on one machine, split, on a local testnet and over emulated latency; write a report",
		Long:  benchLong,
		Example: `  sudo neurod bench --out bench-report
  neurod bench --model mixtral.gguf --rtt 0,50ms --max-tokens 16`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rtts, err := f.check()
			if err != nil {
				return err
			}
			b, err := f.bench(cmd, g)
			if err != nil {
				return err
			}
			rep, err := b.Run(cmd.Context(), f.model, f.out, rtts)
			if err != nil {
				return err
			}
			if err := writeBenchReport(rep); err != nil {
				return err
			}
			if f.json {
				writeJSON(cmd.OutOrStdout(), rep)
				return nil
			}
			fmt.Fprint(cmd.OutOrStdout(), benchMarkdown(rep))
			fmt.Fprintf(cmd.OutOrStdout(), "\nwrote %s, %s and %s\n", filepath.Join(rep.Dir, "report.md"),
				filepath.Join(rep.Dir, "report.png"), filepath.Join(rep.Dir, "report.json"))
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "GGUF MoE model to run (default: the generated bench model)")
	fs.StringVar(&f.out, "out", "bench-report", "directory to write report.md, report.png and report.json into")
	fs.StringVar(&f.rtts, "rtt", "0,20ms,50ms,100ms", "round-trip times of the netns runs, comma-separated (none: no plain netns run)")
	fs.IntVar(&f.maxTokens, "max-tokens", 32, "tokens to generate in each run")
	fs.StringVar(&f.concurrency, "concurrency", "4,16", "users the loopback testnet also serves at once, comma-separated (each through a client and wallet of its own; the row's tokens/s are theirs in all), each count also answered by llama.cpp in one context of as many sequences (what batching them can gain on this machine); 0 leaves them out")
	fs.BoolVar(&f.json, "json", false, "print the report as JSON")
	fs.BoolVar(&f.noNetns, "no-netns", false, "leave out the netns runs")
	fs.BoolVar(&f.noLoopback, "no-loopback", false, "leave out the two loopback testnet rows (default and pinned)")
	fs.IntVar(&f.rounds, "rounds", 1, "answer the prompt this many times on each loopback testnet (default and pinned), each answer paired with llama.cpp's just before it (the nodes paused), and report each round's p50 and the ratios' medians (a noisy host's single run says little)")
	fs.DurationVar(&f.timeout, "timeout", 20*time.Minute, "how long each run may take")
	fs.DurationVar(&f.placement, "placement-rtt", 50*time.Millisecond, "placement runs (a layer's experts on one node, or spread over two): RTT from the gating node to the near expert home; 0 leaves them out")
	fs.DurationVar(&f.placementFar, "placement-far", 100*time.Millisecond, "placement runs: RTT from the gating node to the far expert home")
	fs.DurationVar(&f.jitter, "placement-jitter", 2*time.Millisecond, "placement runs: jitter on every home's line")
	fs.DurationVar(&f.concurrencyRTT, "concurrency-rtt", 50*time.Millisecond, "also run --concurrency's users in the netns testnet at this RTT; 0 leaves them out")
	fs.DurationVar(&f.speculateRTT, "speculate-rtt", 50*time.Millisecond, "speculative decoding runs (a model of the bench shape repeating a list: without speculation, with prompt lookup, with a q4_0 draft model) in the netns testnet at this RTT (the loopback testnet without namespaces); 0 leaves them out")
	fs.DurationVar(&f.spansRTT, "spans-rtt", 50*time.Millisecond, "layer-span runs (layer by layer against spans of consecutive layers, and a span node killed) in the netns testnet at this RTT; 0 leaves them out")
	fs.IntVar(&f.spansLayers, "spans-layers", 48, "layer-span runs: MoE layers of their model")
	fs.IntVar(&f.spansHomes, "spans-homes", 4, "layer-span runs: expert homes, each serving layers/homes consecutive layers")
	return cmd
}

// check checks the flags and reads --rtt.
func (f *benchFlags) check() ([]time.Duration, error) {
	if f.maxTokens < 2 {
		return nil, fmt.Errorf("flag --max-tokens %d: want at least 2 (the first token carries the prompt)", f.maxTokens)
	}
	var list []time.Duration
	if f.rtts == "none" {
		return list, f.checkRest()
	}
	for _, s := range strings.Split(f.rtts, ",") {
		s = strings.TrimSpace(s)
		if s == "0" {
			s = "0s"
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d > 2*time.Second {
			return nil, fmt.Errorf("flag --rtt %q: want durations from 0 to 2s, comma-separated (0,20ms,50ms)", f.rtts)
		}
		list = append(list, d)
	}
	return list, f.checkRest()
}

// checkRest checks the flags other than --rtt.
func (f *benchFlags) checkRest() error {
	if f.rounds < 1 || f.rounds > 20 {
		return fmt.Errorf("flag --rounds %d: want 1 to 20", f.rounds)
	}
	if f.model != "" {
		if _, err := os.Stat(f.model); err != nil {
			return fmt.Errorf("flag --model: %w", err)
		}
	}
	if f.speculateRTT < 0 || f.speculateRTT > 2*time.Second {
		return fmt.Errorf("flag --speculate-rtt %v: want 0 (leave out) to 2s", f.speculateRTT)
	}
	if f.spansRTT < 0 || f.spansRTT > 2*time.Second {
		return fmt.Errorf("flag --spans-rtt %v: want 0 (leave out) to 2s", f.spansRTT)
	}
	if f.spansLayers < 2 || f.spansLayers > 256 {
		return fmt.Errorf("flag --spans-layers %d: want 2 to 256", f.spansLayers)
	}
	if f.spansHomes < 1 || f.spansHomes > f.spansLayers || f.spansHomes > 16 {
		return fmt.Errorf("flag --spans-homes %d: want 1 to 16, at most one a layer", f.spansHomes)
	}
	if f.concurrencyRTT < 0 || f.concurrencyRTT > 2*time.Second {
		return fmt.Errorf("flag --concurrency-rtt %v: want 0 (leave out) to 2s", f.concurrencyRTT)
	}
	if f.placement < 0 || f.placementFar < f.placement || f.jitter < 0 || f.jitter > f.placement/2 {
		return fmt.Errorf("flags --placement-rtt %v, --placement-far %v, --placement-jitter %v: want an RTT of 0 (leave out) or more, a far one at least as long, and jitter up to half the RTT",
			f.placement, f.placementFar, f.jitter)
	}
	return nil
}

// bench is the testnet.Bench the flags ask for, computing on this machine
// with ggml.
func (f *benchFlags) bench(cmd *cobra.Command, g *globalFlags) (*testnet.Bench, error) {
	log, err := testnetLogger(cmd.ErrOrStderr(), g)
	if err != nil {
		return nil, err
	}
	bin, err := os.Executable()
	if err != nil {
		return nil, err
	}
	users, err := parseUsers(f.concurrency)
	if err != nil {
		return nil, err
	}
	b := &testnet.Bench{Log: log, Timeout: f.timeout, MaxTokens: f.maxTokens, Binary: bin, Concurrency: users, Rounds: f.rounds,
		PlacementRTT: f.placement, PlacementFar: f.placementFar, PlacementJitter: f.jitter,
		OnMachine: func(ctx context.Context, model string, split bool, prompt string, maxTokens int) (*testnet.Generation, error) {
			if split {
				return generateOnMachine(ctx, ggml.Device{}, "", model, prompt, maxTokens, ggml.ContextOptions{})
			}
			return generateOnMachine(ctx, ggml.Device{}, model, "", prompt, maxTokens, ggml.ContextOptions{})
		},
		OnMachineSeqs: llamaSeqs,
		SpeculateRTT:  f.speculateRTT, SpeculationModels: speculationModels, ConcurrencyRTT: f.concurrencyRTT,
		SpansRTT: f.spansRTT, SpansLayers: f.spansLayers, SpansHomes: f.spansHomes,
		NoLoopback: f.noLoopback}
	if b.NetnsErr = errors.New("--no-netns"); !f.noNetns {
		b.NetnsErr = netns.Available()
	}
	return b, nil
}

// llamaSeqs answers prompt seqs times at once in one llama.cpp context on
// the CPU (testnet.Bench.OnMachineSeqs).
func llamaSeqs(ctx context.Context, path, prompt string, maxTokens, seqs int) ([]*testnet.Generation, time.Duration, error) {
	l, err := ggml.LoadLlama(path)
	if err != nil {
		return nil, 0, err
	}
	defer l.Close()
	gens, wall, err := l.GenerateGreedySeqs(ctx, prompt, maxTokens, seqs, ggml.ContextOptions{})
	if err != nil {
		return nil, 0, err
	}
	out := make([]*testnet.Generation, len(gens))
	for i, g := range gens {
		out[i] = &testnet.Generation{Tokens: g.Tokens, Text: g.Text, PromptTokens: len(g.Prompt), PerTokenMs: []float64{},
			TokensPerSecond: float64(len(g.Tokens)) / wall.Seconds()}
		for _, d := range g.Steps[:len(g.Tokens)] {
			out[i].PerTokenMs = append(out[i].PerTokenMs, float64(d.Microseconds())/1000)
		}
	}
	return out, wall, nil
}

// speculationModels writes the bench's speculation models into dir: a
// llama model of the bench model's shape speaking testnet.SpeculateText in
// q8_0, and the same weights in q4_0 as its draft model.
func speculationModels(dir string, shape *neuropb.ModelParams) (string, string, error) {
	params := model.Presets["bench"]
	params.Layers, params.Experts, params.ExpertsUsed = int(shape.GetLayers()), int(shape.GetExperts()), int(shape.GetExpertsUsed())
	params.Embd, params.FF, params.Heads, params.KVHeads = int(shape.GetEmbd()), int(shape.GetFf()), int(shape.GetHeads()), int(shape.GetKvHeads())
	params.Vocab, params.Context = int(shape.GetVocab()), int(shape.GetContext())
	m, draft := filepath.Join(dir, "speaks.gguf"), filepath.Join(dir, "speaks-q4_0.gguf")
	params.PlantPieces = model.PlantPieces("llama", testnet.SpeculateText)
	var err error
	if params.Plant, err = plantTokens(m, "llama", params, testnet.SpeculateText); err != nil {
		return "", "", err
	}
	if err := writeModel(m, "llama", params, model.Q8_0, 11, true); err != nil {
		return "", "", err
	}
	if err := writeModel(draft, "llama", params, model.Q4_0, 11, true); err != nil {
		return "", "", err
	}
	return m, draft, nil
}

// benchMarkdown is the report's table.
func benchMarkdown(rep *testnet.BenchReport) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Model: %s (%s). Prompt %q, %d tokens, greedy; every run gave the same tokens.\n", rep.Model, rep.Params, rep.Prompt, rep.MaxTokens)
	fmt.Fprintf(&sb, "Machine: %s. %s.\n\n", rep.Machine, rep.When)
	fmt.Fprintln(&sb, "| run | RTT (measured) | tokens/s | per token p50 | p90 | floor = layers × RTT + compute | p50 / floor | round trips / token | expert calls / token | layers one node served | dispatch overhead / layer | llama.cpp p50 ÷ p50 |")
	fmt.Fprintln(&sb, "|---|---|---|---|---|---|---|---|---|---|---|---|")
	var spec, spans []testnet.BenchRow
	for _, r := range rep.Rows {
		if r.Kind == "speculate" {
			spec = append(spec, r)
			continue
		}
		if r.Kind == "spans" {
			spans = append(spans, r)
			continue
		}
		benchRowMarkdown(&sb, r)
	}
	fmt.Fprintf(&sb, "\ncompute = the split run's p50 (%.1f ms); %d MoE layers. The first token (the prompt) is left out of p50/p90. "+
		"Round trips and calls per token count the prompt's pass too (a layer's expert calls go out at once: one round trip).\n", rep.ComputeMs, rep.Layers)
	if len(spec) > 0 {
		speculateMarkdown(&sb, spec)
	}
	if len(spans) > 0 {
		spansMarkdown(&sb, spans)
	}
	return sb.String()
}

// benchRowMarkdown is one row of the report's main table.
func benchRowMarkdown(sb *strings.Builder, r testnet.BenchRow) {
	if r.Skipped != "" {
		fmt.Fprintf(sb, "| %s | %s | skipped: %s | | | | | | | | | |\n", r.Name, testnet.FmtRTT(time.Duration(r.RTTMs*float64(time.Millisecond))), r.Skipped)
		return
	}
	rtt := "–"
	if r.Kind == "netns" || r.Kind == "placement" || r.Kind == "concurrent" && r.RTTMs > 0 {
		rtt = fmt.Sprintf("%.0f ms", r.RTTMs)
		if r.MeasuredRTTMs > 0 {
			rtt += fmt.Sprintf(" (%.1f)", r.MeasuredRTTMs)
		}
	}
	floor, ratio, rt, calls, one := "–", "–", "–", "–", "–"
	if r.FloorMs > 0 {
		floor, ratio = fmt.Sprintf("%.1f ms", r.FloorMs), fmt.Sprintf("%.2f", r.Ratio)
	}
	if r.RoundTripsPerToken > 0 {
		rt, calls, one = fmt.Sprintf("%.1f", r.RoundTripsPerToken), fmt.Sprintf("%.1f", r.CallsPerToken), fmt.Sprintf("%.0f%%", 100*r.OneNodeShare)
	}
	disp, lr := "–", "–"
	if r.DispatchUsPerLayer > 0 {
		disp = fmt.Sprintf("%.2f ms", r.DispatchUsPerLayer/1000)
		if r.DispatchDecodeUs > 0 {
			disp += fmt.Sprintf("; decode %.2f (p50 %.2f, p90 %.2f)", r.DispatchDecodeUs/1000, float64(r.DispatchP50Us)/1000, float64(r.DispatchP90Us)/1000)
		}
	}
	if r.LocalRatio > 0 {
		lr = fmt.Sprintf("%.2f", r.LocalRatio)
	}
	if r.PinnedLocalRatio > 0 {
		lr += fmt.Sprintf(" (pinned llama.cpp's: %.2f)", r.PinnedLocalRatio)
	}
	if len(r.LocalRatioRounds) > 1 {
		lr += fmt.Sprintf("; median of %d rounds %.2f (%s)", len(r.LocalRatioRounds), r.LocalRatioMedian, joinFloats(r.LocalRatioRounds, "%.2f"))
		if len(r.PinnedLocalRatioRounds) > 1 {
			lr += fmt.Sprintf(", pinned llama.cpp's %.2f (%s)", r.PinnedLocalRatioMedian, joinFloats(r.PinnedLocalRatioRounds, "%.2f"))
		}
	}
	p50 := fmt.Sprintf("%.1f ms", r.PerTokenP50Ms)
	if len(r.RoundsP50Ms) > 1 {
		p50 += " (rounds: " + joinFloats(r.RoundsP50Ms, "%.1f") + ")"
	}
	tps := fmt.Sprintf("%.1f", r.TokensPerSecond)
	if r.AloneTokensPerSecond > 0 {
		tps += fmt.Sprintf(" (%.1f× one alone", r.TokensPerSecond/r.AloneTokensPerSecond)
		if r.Batch == "on" {
			tps += fmt.Sprintf("; %.0f%% of layers in shared rounds", 100*r.SharedLayerShare)
		}
		if r.EqualUsers != nil {
			tps += fmt.Sprintf("; %d of %d with llama.cpp's tokens alone", *r.EqualUsers, r.Users)
		}
		tps += ")"
	}
	fmt.Fprintf(sb, "| %s | %s | %s | %s | %.1f ms | %s | %s | %s | %s | %s | %s | %s |\n", r.Name, rtt, tps,
		p50, r.PerTokenP90Ms, floor, ratio, rt, calls, one, disp, lr)
}

// joinFloats formats xs with format, joined by " / ".
func joinFloats(xs []float64, format string) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(parts, " / ")
}

// speculateMarkdown is the report's table of the speculative-decoding rows.
func speculateMarkdown(sb *strings.Builder, spec []testnet.BenchRow) {
	fmt.Fprintf(sb, "\nSpeculative decoding: a model of the bench shape that repeats a list (%q, given once and begun again), q8_0; its draft model the same weights in q4_0. Every run gave llama.cpp's tokens.\n\n",
		testnet.SpeculatePrompt)
	fmt.Fprintln(sb, "| run | ms / token | × fewer than without | per token p50 | round trips / token | drafted tokens kept / pass | of those drafted |")
	fmt.Fprintln(sb, "|---|---|---|---|---|---|---|")
	base := spec[0].MsPerToken
	for _, r := range spec {
		gain, kept, acc := "–", "–", "–"
		if r.MsPerToken > 0 && base > 0 {
			gain = fmt.Sprintf("%.2f", base/r.MsPerToken)
		}
		if r.Speculate != "off" {
			kept, acc = fmt.Sprintf("%.2f", r.AcceptedPerPass), fmt.Sprintf("%.0f%%", 100*r.Acceptance)
		}
		fmt.Fprintf(sb, "| %s | %.1f ms | %s | %.1f ms | %.2f | %s | %s |\n", r.Name, r.MsPerToken, gain, r.PerTokenP50Ms, r.RoundTripsPerToken, kept, acc)
	}
	fmt.Fprintln(sb, "\nms / token: the decode steps' time over their tokens (the tokens one pass keeps arrive at once, so p50 falls to almost 0).")
}

// spansMarkdown is the report's table of the layer-span rows.
func spansMarkdown(sb *strings.Builder, rows []testnet.BenchRow) {
	fmt.Fprintf(sb, "\nLayer spans: a model of %d MoE layers in Qwen3-30B-A3B's proportions, scaled down (%s), q8_0. Every run gave llama.cpp's tokens.\n\n",
		rows[0].Layers, spansShapeLine(rows[0].Layers))
	fmt.Fprintln(sb, "| run | per token p50 | p90 | tokens/s | round trips / token | spans / pass | p50 ÷ layer by layer | failovers (hedged requests) | kill token | recovery | replayed |")
	fmt.Fprintln(sb, "|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		if r.Skipped != "" {
			fmt.Fprintf(sb, "| %s | skipped: %s | | | | | | | | | |\n", r.Name, r.Skipped)
			continue
		}
		ratio, kill, rec, replay := "–", "–", "–", "–"
		if r.LayerByLayerRatio > 0 {
			ratio = fmt.Sprintf("%.3f (1/%.1f)", r.LayerByLayerRatio, 1/r.LayerByLayerRatio)
		}
		if r.Speculate != "" {
			// Tokens kept from a pass arrive at once: p50 says little; the
			// mean and the drafted tokens kept per pass say what it gained.
			ratio += fmt.Sprintf("; %.1f ms a token on average, %.2f drafted tokens kept a pass", r.MsPerToken, r.AcceptedPerPass)
		}
		if r.KilledAfter > 0 {
			kill = fmt.Sprintf("after token %d: %.0f ms", r.KilledAfter, r.KillTokenMs)
		}
		if r.SpanFailovers > 0 {
			rec = fmt.Sprintf("%.0f ms", r.SpanRecoveryMs)
			replay = fmt.Sprintf("%.1f KiB in %.0f ms", float64(r.SpanReplayBytes)/1024, r.SpanReplayMs)
		}
		fmt.Fprintf(sb, "| %s | %.1f ms | %.1f ms | %.2f | %.1f | %.1f | %s | %d (%d) | %s | %s | %s |\n", r.Name, r.PerTokenP50Ms, r.PerTokenP90Ms,
			r.TokensPerSecond, r.RoundTripsPerToken, r.SpansPerToken, ratio, r.SpanFailovers, r.SpanHedges, kill, rec, replay)
	}
	fmt.Fprintln(sb, "\nrecovery: from the start of the request whose provider was killed until the spare answered it (the hedge delay or the deadline, a new stream, the replay); replayed: the session's earlier inputs sent to the spare, and their round trips.")
}

// spansShapeLine describes the spans runs' model.
func spansShapeLine(layers int) string {
	p := testnet.SpansShape(layers)
	return fmt.Sprintf("embd %d, %d of %d experts of ff %d, %d heads of %d over %d KV heads", p.Embd, p.ExpertsUsed, p.Experts, p.FF, p.Heads, p.HeadSize, p.KVHeads)
}

func writeBenchReport(rep *testnet.BenchReport) error {
	if err := os.WriteFile(filepath.Join(rep.Dir, "report.md"), []byte(benchMarkdown(rep)), 0o644); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rep.Dir, "report.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	return benchPlot(rep, filepath.Join(rep.Dir, "report.png"))
}

// parseUsers reads --concurrency: numbers of users from 2 to 256, or 0.
func parseUsers(s string) ([]int, error) {
	if strings.TrimSpace(s) == "0" || strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > 256 {
			return nil, fmt.Errorf("flag --concurrency %q: want numbers of users from 2 to 256, comma-separated, or 0", s)
		}
		out = append(out, n)
	}
	return out, nil
}
