package main

import (
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
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// benchRow is one configuration's measurements in `neurod bench`.
type benchRow struct {
	Name string `json:"name"`
	// Kind is local, split, testnet, netns (the RTT sweep) or placement.
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
	Direct       *bool   `json:"direct,omitempty"`
	Skipped      string  `json:"skipped,omitempty"`
}

// benchReport is `neurod bench --json` and report.json.
type benchReport struct {
	Model     string     `json:"model"`
	Params    string     `json:"params"`
	Prompt    string     `json:"prompt"`
	MaxTokens int        `json:"max_tokens"`
	Layers    int        `json:"layers"`
	ComputeMs float64    `json:"compute_ms"`
	Machine   string     `json:"machine"`
	When      string     `json:"when"`
	Rows      []benchRow `json:"rows"`
	Dir       string     `json:"dir"`
}

const benchPrompt = "The history of distributed computing"

func newBenchCmd(g *globalFlags) *cobra.Command {
	var (
		modelPath, out, rtts string
		maxTokens            int
		asJSON, noNetns      bool
		timeout              time.Duration
		placement            time.Duration
		placementFar         time.Duration
		placementJitter      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "bench [--model FILE.gguf] [--out DIR] [--rtt LIST] [--max-tokens N] [--json]",
		Short: "Measure generation on one machine, split, on a local testnet and over emulated latency; write a report",
		Long: `bench answers one fixed prompt greedily, --max-tokens tokens, on the bench
model (about 1 B parameters, q8_0, generated; or --model) in each of these
ways, and checks that every way gives the same tokens:

  llama.cpp      'neurod generate --local': the whole model in llama.cpp
  split          'neurod generate --split': the gating compute and the
                 experts from their shards, in one process
  testnet        'neurod testnet': a gating node and one expert node,
                 processes on 127.0.0.1
  netns RTT      'neurod testnet --netns --rtt RTT': the gating node and the
                 expert node each in a home behind its NAT, hole punched,
                 RTT apart (one run per --rtt; needs root, else skipped)
  placement      two expert homes, one --placement-rtt from the gating
                 node and one --placement-far (± --placement-jitter): once
                 with both hosting every expert (a layer's calls go to
                 the near node), once with each expert on one home only
                 (a layer often waits on the far one)

For each it reports tokens per second, the per-token latency (p50 and p90
of the decode steps) and, over the network, the floor a token cannot beat,
layers × RTT + compute (compute: the split run's p50), and the latency's
ratio to it. It writes report.md (the table), report.png (tokens/s and
per-token latency against RTT, the floor drawn in) and report.json into
--out.`,
		Example: `  sudo neurod bench --out bench-report
  neurod bench --model mixtral.gguf --rtt 0,50ms --max-tokens 16`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if maxTokens < 2 {
				return fmt.Errorf("flag --max-tokens %d: want at least 2 (the first token carries the prompt)", maxTokens)
			}
			var list []time.Duration
			for _, s := range strings.Split(rtts, ",") {
				s = strings.TrimSpace(s)
				if s == "0" {
					s = "0s"
				}
				d, err := time.ParseDuration(s)
				if err != nil || d < 0 || d > 2*time.Second {
					return fmt.Errorf("flag --rtt %q: want durations from 0 to 2s, comma-separated (0,20ms,50ms)", rtts)
				}
				list = append(list, d)
			}
			if modelPath != "" {
				if _, err := os.Stat(modelPath); err != nil {
					return fmt.Errorf("flag --model: %w", err)
				}
			}
			log, err := testnetLogger(cmd.ErrOrStderr(), g)
			if err != nil {
				return err
			}
			if placement < 0 || placementFar < placement || placementJitter < 0 || placementJitter > placement/2 {
				return fmt.Errorf("flags --placement-rtt %v, --placement-far %v, --placement-jitter %v: want an RTT of 0 (leave out) or more, a far one at least as long, and jitter up to half the RTT",
					placement, placementFar, placementJitter)
			}
			b := &bencher{log: log, timeout: timeout, maxTokens: maxTokens,
				placementRTT: placement, placementFar: placementFar, placementJitter: placementJitter}
			if !noNetns {
				b.netnsErr = netns.Available()
			} else {
				b.netnsErr = errors.New("--no-netns")
			}
			rep, err := b.run(cmd.Context(), modelPath, out, list)
			if err != nil {
				return err
			}
			if asJSON {
				writeJSON(cmd.OutOrStdout(), rep)
				return nil
			}
			fmt.Fprint(cmd.OutOrStdout(), benchMarkdown(rep))
			fmt.Fprintf(cmd.OutOrStdout(), "\nwrote %s, %s and %s\n", filepath.Join(rep.Dir, "report.md"),
				filepath.Join(rep.Dir, "report.png"), filepath.Join(rep.Dir, "report.json"))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&modelPath, "model", "", "GGUF MoE model to run (default: the generated bench model)")
	f.StringVar(&out, "out", "bench-report", "directory to write report.md, report.png and report.json into")
	f.StringVar(&rtts, "rtt", "0,20ms,50ms,100ms", "round-trip times of the netns runs, comma-separated")
	f.IntVar(&maxTokens, "max-tokens", 32, "tokens to generate in each run")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.BoolVar(&noNetns, "no-netns", false, "leave out the netns runs")
	f.DurationVar(&timeout, "timeout", 20*time.Minute, "how long each run may take")
	f.DurationVar(&placement, "placement-rtt", 50*time.Millisecond, "placement runs (a layer's experts on one node, or spread over two): RTT from the gating node to the near expert home; 0 leaves them out")
	f.DurationVar(&placementFar, "placement-far", 100*time.Millisecond, "placement runs: RTT from the gating node to the far expert home")
	f.DurationVar(&placementJitter, "placement-jitter", 2*time.Millisecond, "placement runs: jitter on every home's line")
	return cmd
}

type bencher struct {
	log       *slog.Logger
	timeout   time.Duration
	maxTokens int
	netnsErr  error
	// placementRTT (0: leave out) and placementFar are the RTTs from the
	// gating node to the near and the far expert home in the two placement
	// runs, with placementJitter on every line.
	placementRTT, placementFar, placementJitter time.Duration
}

// neurod runs this binary with args and decodes its JSON output into v.
func (b *bencher) neurod(ctx context.Context, v any, args ...string) error {
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	// On Ctrl-C (or the run's timeout) a testnet is asked to stop, so that
	// it stops its nodes and removes its namespaces and directories.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	// And it stops, the same way, when this process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tail := stderr.String()
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		return fmt.Errorf("neurod %s: %w\n%s", strings.Join(args, " "), err, tail)
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("neurod %s: decode its output: %w", strings.Join(args, " "), err)
	}
	return nil
}

func (b *bencher) run(ctx context.Context, modelPath, out string, rtts []time.Duration) (*benchReport, error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("flag --out: %w", err)
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return nil, err
	}
	rep := &benchReport{Prompt: benchPrompt, MaxTokens: b.maxTokens, Dir: abs, When: time.Now().UTC().Format(time.RFC3339),
		Machine: machineLine()}
	if modelPath == "" {
		tmp, err := os.MkdirTemp("", "neuro-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		modelPath = filepath.Join(tmp, "bench.gguf")
		b.log.Info("generating the bench model", "path", modelPath)
		bin, err := os.Executable()
		if err != nil {
			return nil, err
		}
		if o, err := exec.CommandContext(ctx, bin, "model", "make", "--preset", "bench", "--type", "q8_0", "--seed", "3",
			"--out", modelPath).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("model make: %w: %s", err, o)
		}
		rep.Model = "bench preset, q8_0, seed 3"
	} else {
		rep.Model = filepath.Base(modelPath)
	}
	p, err := model.ReadParams(modelPath)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	rep.Layers = int(p.GetLayers())
	rep.Params = fmt.Sprintf("%d layers, %d experts (top %d), embd %d, ff %d", p.GetLayers(), p.GetExperts(), p.GetExpertsUsed(),
		p.GetEmbd(), p.GetFf())

	type gen struct {
		Tokens          []int32       `json:"tokens"`
		TokensPerSecond float64       `json:"tokens_per_second"`
		PerTokenMs      []float64     `json:"per_token_ms"`
		Stats           *testnetStats `json:"stats"`
		Connections     []testnetConn `json:"connections"`
		Link            *testnetLink  `json:"link"`
	}
	var want []int32
	add := func(name, kind string, rtt time.Duration, g gen) error {
		if want == nil {
			want = g.Tokens
		} else if fmt.Sprint(g.Tokens) != fmt.Sprint(want) {
			return fmt.Errorf("%s: tokens %v differ from llama.cpp's %v", name, g.Tokens, want)
		}
		row := benchRow{Name: name, Kind: kind, RTTMs: ms(rtt), TokensPerSecond: g.TokensPerSecond}
		if len(g.PerTokenMs) > 1 {
			decode := slices.Clone(g.PerTokenMs[1:])
			slices.Sort(decode)
			row.PerTokenP50Ms, row.PerTokenP90Ms = percentile(decode, 0.5), percentile(decode, 0.9)
		}
		if st := g.Stats; st != nil && len(g.Tokens) > 0 {
			row.RoundTripsPerToken = float64(st.MoELayers) / float64(len(g.Tokens))
			row.CallsPerToken = float64(st.ExpertCalls) / float64(len(g.Tokens))
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
		rep.Rows = append(rep.Rows, row)
		b.log.Info("bench run done", "run", name, "tokens_per_second", row.TokensPerSecond, "per_token_p50_ms", row.PerTokenP50Ms)
		return nil
	}
	tokens := strconv.Itoa(b.maxTokens)
	var g gen
	b.log.Info("bench: llama.cpp")
	if err := b.neurod(ctx, &g, "generate", "--local", modelPath, "--prompt", benchPrompt, "--max-tokens", tokens, "--json"); err != nil {
		return nil, err
	}
	if err := add("llama.cpp", "local", 0, g); err != nil {
		return nil, err
	}
	g = gen{}
	b.log.Info("bench: split, experts in process")
	if err := b.neurod(ctx, &g, "generate", "--split", modelPath, "--prompt", benchPrompt, "--max-tokens", tokens, "--json"); err != nil {
		return nil, err
	}
	if err := add("split", "split", 0, g); err != nil {
		return nil, err
	}
	rep.ComputeMs = rep.Rows[1].PerTokenP50Ms
	g = gen{}
	b.log.Info("bench: testnet on 127.0.0.1")
	if err := b.neurod(ctx, &g, "testnet", "--nodes", "1", "--model", modelPath, "--prompt", benchPrompt, "--max-tokens", tokens,
		"--check", "--json", "--timeout", b.timeout.String()); err != nil {
		return nil, err
	}
	if err := add("testnet", "testnet", 0, g); err != nil {
		return nil, err
	}
	for _, rtt := range rtts {
		name := "netns " + fmtRTT(rtt)
		if b.netnsErr != nil {
			rep.Rows = append(rep.Rows, benchRow{Name: name, Kind: "netns", RTTMs: ms(rtt), Skipped: b.netnsErr.Error()})
			continue
		}
		g = gen{}
		b.log.Info("bench: netns testnet", "rtt", rtt)
		args := []string{"testnet", "--netns", "--homes", "2", "--nat", "cone", "--model", modelPath, "--prompt", benchPrompt,
			"--max-tokens", tokens, "--check", "--json", "--timeout", b.timeout.String()}
		if rtt > 0 {
			args = append(args, "--rtt", rtt.String())
		}
		if err := b.neurod(ctx, &g, args...); err != nil {
			return nil, err
		}
		if err := add(name, "netns", rtt, g); err != nil {
			return nil, err
		}
	}
	// Placement: two expert homes, the same latency with jitter; in one
	// run both host every expert (the gating node sends a layer's calls
	// to one of them), in the other each expert is on one home only.
	if b.placementRTT > 0 {
		for _, spread := range []bool{false, true} {
			name := fmt.Sprintf("placement: expert nodes %s and %s away ±%s, experts together", fmtRTT(b.placementRTT), fmtRTT(b.placementFar), fmtRTT(b.placementJitter))
			if spread {
				name = strings.Replace(name, "together", "spread", 1)
			}
			if b.netnsErr != nil {
				rep.Rows = append(rep.Rows, benchRow{Name: name, Kind: "placement", RTTMs: ms(b.placementRTT), Skipped: b.netnsErr.Error()})
				continue
			}
			g = gen{}
			b.log.Info("bench: netns testnet, placement", "near", b.placementRTT, "far", b.placementFar, "spread", spread)
			// Each home's line adds half its RTT each way: the gating home
			// and the near one get the near RTT; the far one what puts it
			// placementFar from the gating node.
			far := 2*b.placementFar - b.placementRTT
			args := []string{"testnet", "--netns", "--homes", "3", "--nat", "cone", "--model", modelPath, "--prompt", benchPrompt,
				"--max-tokens", tokens, "--check", "--json", "--timeout", b.timeout.String(),
				"--rtt", b.placementRTT.String() + "," + b.placementRTT.String() + "," + far.String(), "--jitter", b.placementJitter.String()}
			if spread {
				args = append(args, "--spread")
			}
			if err := b.neurod(ctx, &g, args...); err != nil {
				return nil, err
			}
			if err := add(name, "placement", b.placementRTT, g); err != nil {
				return nil, err
			}
		}
	}
	for i := range rep.Rows {
		r := &rep.Rows[i]
		if r.Skipped != "" || r.Kind == "local" || r.Kind == "split" {
			continue
		}
		r.FloorMs = float64(rep.Layers)*r.RTTMs + rep.ComputeMs
		if r.FloorMs > 0 {
			r.Ratio = r.PerTokenP50Ms / r.FloorMs
		}
	}
	if err := writeBenchReport(rep); err != nil {
		return nil, err
	}
	return rep, nil
}

func fmtRTT(d time.Duration) string {
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

// benchMarkdown is the report's table.
func benchMarkdown(rep *benchReport) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Model: %s (%s). Prompt %q, %d tokens, greedy; every run gave the same tokens.\n", rep.Model, rep.Params, rep.Prompt, rep.MaxTokens)
	fmt.Fprintf(&sb, "Machine: %s. %s.\n\n", rep.Machine, rep.When)
	fmt.Fprintln(&sb, "| run | RTT (measured) | tokens/s | per token p50 | p90 | floor = layers × RTT + compute | p50 / floor | round trips / token | expert calls / token | layers one node served |")
	fmt.Fprintln(&sb, "|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rep.Rows {
		if r.Skipped != "" {
			fmt.Fprintf(&sb, "| %s | %s | skipped: %s | | | | | | | |\n", r.Name, fmtRTT(time.Duration(r.RTTMs*float64(time.Millisecond))), r.Skipped)
			continue
		}
		rtt := "–"
		if r.Kind == "netns" || r.Kind == "placement" {
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
		fmt.Fprintf(&sb, "| %s | %s | %.1f | %.1f ms | %.1f ms | %s | %s | %s | %s | %s |\n", r.Name, rtt, r.TokensPerSecond,
			r.PerTokenP50Ms, r.PerTokenP90Ms, floor, ratio, rt, calls, one)
	}
	fmt.Fprintf(&sb, "\ncompute = the split run's p50 (%.1f ms); %d MoE layers. The first token (the prompt) is left out of p50/p90. "+
		"Round trips and calls per token count the prompt's pass too (a layer's expert calls go out at once: one round trip).\n", rep.ComputeMs, rep.Layers)
	return sb.String()
}

func writeBenchReport(rep *benchReport) error {
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
