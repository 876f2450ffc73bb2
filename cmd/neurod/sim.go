package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/internal/meminfo"
	"github.com/neuro-p2p/neuro/testnet"
)

func newSimCmd(g *globalFlags) *cobra.Command {
	f := &simFlags{g: g}
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Simulate a network of hundreds of real nodes in this process",
		Long: `sim runs a network of many real nodes inside one process, so that the
network itself (the DHT, GossipSub heartbeats, automatic hosting, gating
nodes finding providers, churn) can be measured at a size no machine could
run as processes. Each node is a whole neurod node on its own libp2p host,
with its own home and store; the hosts connect through an in-memory
transport (Noise and yamux over a pipe that delays each write by
--latency), so no node needs a socket. The model is a small generated
one (4 MoE layers of 16 experts): its experts compute for real, in well
under a millisecond.

The first --bootstrap nodes are bootstrap nodes and hold the model; the
next --gating nodes are gating nodes, each asked the same prompt every
--ask-every by a user of its own through the client library; the others
join --join-rate a second, knowing only the bootstrap nodes, and host
experts chosen automatically (with a memory budget that gives each expert
about four providers), fetched from the nodes that have them. With --churn,
expert nodes are killed (closed without a word to the others) and new
ones join at that rate.

sim waits until the network is healthy (every expert served by two live
nodes, every gating node loaded and seeing them, every routing table
filled), runs it for --duration and prints what it measured: time to
healthy, gossip per node, provider lookups in the DHT (latency, hops),
coverage over time, prompts asked and answered, per-token latency, memory
and CPU per node. It exits 1 when a prompt went unanswered or an expert
ended with fewer than two providers.`,
		Example: `  neurod testnet sim --nodes 100 --duration 1m
  neurod testnet sim --nodes 300 --churn 10/min --duration 5m --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return f.run(cmd) },
	}
	f.register(cmd.Flags())
	cmd.AddCommand(newSimPlotCmd())
	return cmd
}

// simFlags are testnet sim's flags.
type simFlags struct {
	g        *globalFlags
	sim      testnet.Sim
	churn    string
	dir      string
	asJSON   bool
	seed     uint64
	duration time.Duration
	profile  string
	healthy  bool
	// pprofAddr serves net/http/pprof (--pprof).
	pprofAddr string
	gogc      int
	// nodeLevel is the nodes' log level in nodes.log (--node-log-level).
	nodeLevel string
}

func (f *simFlags) register(fs *pflag.FlagSet) {
	fs.IntVar(&f.sim.Nodes, "nodes", 50, "nodes in the network (the bootstrap node, the gating nodes and the expert nodes)")
	fs.IntVar(&f.sim.Gating, "gating", 0, "gating nodes, each with a user asking prompts (default: 1 per 100 nodes, at least 1)")
	fs.IntVar(&f.sim.Bootstrap, "bootstrap", 0, "bootstrap nodes, which every other node knows (default: 1 per 100 nodes, at least 2)")
	fs.Float64Var(&f.sim.JoinRate, "join-rate", 4, "nodes that join a second while the network starts")
	fs.DurationVar(&f.sim.JoinLatency, "join-latency", 50*time.Millisecond, "while the network starts, hold each joining node back (by up to three join intervals) while the process's scheduler latency (p90 over the last second) is above this; negative: never")
	fs.StringVar(&f.churn, "churn", "0", "expert nodes replaced (one killed, one new) per minute: N/min, N/s or N/h")
	fs.BoolVar(&f.sim.ChurnLeaves, "churn-leaves", false, "churned nodes tell their peers they leave, as a node stopped by its owner does (default: they vanish, as in a crash)")
	fs.DurationVar(&f.duration, "duration", time.Minute, "how long the network runs once healthy")
	fs.DurationVar(&f.sim.Latency, "latency", 0, "one-way delay of every link between two nodes (half the round trip), e.g. 25ms")
	fs.DurationVar(&f.sim.Jitter, "jitter", 0, "with --latency: each pair of nodes' delay is spread by up to ± this")
	fs.DurationVar(&f.sim.Sample, "sample", 5*time.Second, "interval of the samples over time")
	fs.DurationVar(&f.sim.AskEvery, "ask-every", 3*time.Second, "each user asks its gating node the prompt this often")
	fs.IntVar(&f.sim.MinAsks, "min-asks", 0, "let the users ask past --duration (at most 3m more; churn stops at --duration) until each has asked this many prompts")
	fs.IntVar(&f.sim.MaxTokens, "max-tokens", 8, "tokens of each answer")
	fs.DurationVar(&f.sim.PromptTimeout, "prompt-timeout", time.Minute, "how long a user waits for a whole answer before counting its prompt unanswered")
	fs.Uint64Var(&f.seed, "seed", 1, "seed of the model and of the simulation's choices")
	fs.DurationVar(&f.sim.Timeout, "timeout", 0, "how long the network may take to be healthy (default 2m + 1.5s a node)")
	fs.DurationVar(&f.sim.Warmup, "warmup", 0, "let the healthy network run this long on its own before the measured run (no users, churn or Sybils)")
	fs.StringVar(&f.dir, "dir", "", "directory for the homes and nodes.log (kept; default: a temporary one, removed)")
	fs.StringVar(&f.nodeLevel, "node-log-level", "warn", "level of the nodes' log in the --dir's nodes.log: debug, info, warn or error")
	fs.BoolVar(&f.asJSON, "json", false, "print a machine-readable report on stdout")
	fs.StringVar(&f.profile, "cpuprofile", "", "write the process's CPU profile (go tool pprof) to this file")
	fs.StringVar(&f.pprofAddr, "pprof", "", "serve Go's profiles of the running simulation (net/http/pprof) on this address, e.g. 127.0.0.1:6060: goroutines and CPU of a run that is stuck or slow")
	fs.BoolVar(&f.healthy, "profile-healthy", false, "start the --cpuprofile once the network is healthy (the steady state, without the joining)")
	fs.StringVar(&f.sim.HeapProfile, "memprofile", "", "write the process's heap profile (go tool pprof) to this file when the run ends, before the nodes stop")
	fs.IntVar(&f.sim.Sybils, "sybils", 0, "Sybil peers that join once the network is healthy: liars (claim every expert, never answer), junk (heartbeats others must reject), droppers (forward nothing) and eclipse (surround the first gating node), a quarter each")
	fs.IntVar(&f.gogc, "gogc", 200, "the process's GOGC (100 is Go's default), under a soft memory limit of three quarters of the memory available at the start; the GOGC and GOMEMLIMIT variables, when set, win")
}

// run simulates the network and prints its report.
func (f *simFlags) run(cmd *cobra.Command) error {
	rate, err := parseChurn(f.churn)
	if err != nil {
		return fmt.Errorf("flag --churn: %w", err)
	}
	f.sim.Churn, f.sim.Duration, f.sim.Seed = rate, f.duration, f.seed
	if f.sim.Log, err = testnetLogger(cmd.ErrOrStderr(), f.g); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.nodeLevel)); err != nil {
		return fmt.Errorf("flag --node-log-level %q: debug, info, warn or error", f.nodeLevel)
	}
	cleanup, err := simDir(&f.sim, f.dir, level)
	if err != nil {
		return err
	}
	defer cleanup()
	if f.pprofAddr != "" {
		if err := servePprof(cmd.Context(), f.pprofAddr, f.sim.Log); err != nil {
			return fmt.Errorf("flag --pprof: %w", err)
		}
	}
	stopProfile := func() {}
	ggml.SetPolling(0)
	f.sim.Compute = ggml.Backend{}
	simGC(f.sim.Log, f.gogc)
	if f.healthy && f.profile == "" {
		return fmt.Errorf("flag --profile-healthy: needs --cpuprofile")
	}
	if f.profile != "" {
		start := func() error {
			stop, err := cpuProfile(f.profile)
			if err != nil {
				return fmt.Errorf("flag --cpuprofile: %w", err)
			}
			stopProfile = stop
			return nil
		}
		defer func() { stopProfile() }()
		if f.healthy {
			f.sim.OnHealthy = func() {
				if err := start(); err != nil {
					f.sim.Log.Warn("sim: no CPU profile", "err", err)
				}
			}
		} else if err := start(); err != nil {
			return err
		}
	}
	rep, err := f.sim.Run(cmd.Context())
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	if f.asJSON {
		writeJSON(w, rep)
	} else {
		printSim(w, rep)
	}
	if rep.Answered != rep.Asked || rep.CoverageMin < 2 {
		return fmt.Errorf("sim: %d of %d prompts answered, coverage %d at the end", rep.Answered, rep.Asked, rep.CoverageMin)
	}
	return nil
}

// simGC sets the garbage collector of the simulation's process. Every node
// of the simulation allocates into one heap: with Go's default GOGC of 100
// a quarter of the process's CPU went to collecting it (150 nodes), CPU
// the nodes then lacked. With a higher GOGC the process trades memory for
// that CPU, and a soft limit at three quarters of the available memory
// keeps the trade from exhausting the machine (near the limit the
// collector runs as often as it must; at 300 nodes, with a limit at half,
// it ran back to back and the network stalled).
func simGC(log *slog.Logger, gogc int) {
	if os.Getenv("GOGC") == "" && gogc > 0 {
		debug.SetGCPercent(gogc)
	}
	if avail, ok := meminfo.Bytes("MemAvailable"); ok && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(avail / 4 * 3))
	}
	percent := debug.SetGCPercent(-1) // reads it, and turns collection off:
	debug.SetGCPercent(percent)       // on again
	log.Info("sim: garbage collector", "gogc", percent, "memory_limit_mb", debug.SetMemoryLimit(-1)>>20)
}

// simDir sets the simulation's directory (dir, else a temporary one,
// removed by cleanup) and sends its nodes' warnings to nodes.log there.
func simDir(sim *testnet.Sim, dir string, level slog.Level) (cleanup func(), err error) {
	removeTmp := func() {}
	if dir == "" {
		if dir, err = os.MkdirTemp("", "neuro-sim-"); err != nil {
			return nil, err
		}
		tmp := dir
		removeTmp = func() { os.RemoveAll(tmp) }
	} else if dir, err = filepath.Abs(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		removeTmp()
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "nodes.log"))
	if err != nil {
		removeTmp()
		return nil, err
	}
	sim.Dir = dir
	sim.NodeLog = slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: level}))
	return func() {
		logf.Close()
		removeTmp()
	}, nil
}

// parseChurn reads a rate per minute: N, N/min, N/s or N/h.
func parseChurn(s string) (float64, error) {
	num, unit, per := strings.Cut(strings.TrimSpace(s), "/")
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q: want a non-negative number a minute, e.g. 10/min", s)
	}
	switch {
	case !per, unit == "min", unit == "m":
		return v, nil
	case unit == "s":
		return v * 60, nil
	case unit == "h":
		return v / 60, nil
	}
	return 0, fmt.Errorf("%q: unit %q: want /s, /min or /h", s, unit)
}

// printSim prints a simulation's report for people.
func printSim(w io.Writer, r *testnet.SimReport) {
	fmt.Fprintf(w, "%d nodes (%d bootstrap, %d gating), churn %.3g/min: healthy after %.1f s, ran %.0f s (%d killed, %d joined, %d failed to join)\n",
		r.NodeCount, r.BootstrapNodes, r.GatingNodes, r.ChurnPerMin, r.HealthyS, r.DurationS, r.Killed, r.Joined, r.JoinFailed)
	fmt.Fprintf(w, "prompts: %d asked, %d answered; per-token latency p50 %.1f ms, p99 %.1f ms (%d tokens)\n",
		r.Asked, r.Answered, r.TokenMs.P50, r.TokenMs.P99, r.TokenMs.N)
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
	fmt.Fprintf(w, "coverage: fewest live providers of an expert %d at the end (settled in %.1f s), %d at the lowest\n", r.CoverageMin, r.SettleS, r.CoverageLowest)
	fmt.Fprintf(w, "DHT provider lookups: %d of %d found, p50 %.1f ms, p99 %.1f ms, hops p50 %.0f max %.0f, peers queried p50 %.0f\n",
		r.DHT.Found, r.DHT.Lookups, r.DHT.Ms.P50, r.DHT.Ms.P99, r.DHT.Hops.P50, r.DHT.Hops.Max, r.DHT.Queried.P50)
	fmt.Fprintf(w, "gossip per node: %.0f bytes/s (median of the samples %.0f), %.1f messages/s; per node: %.1f MB resident, %.2f%% of a core\n",
		r.GossipBytesPerS, r.GossipBytesPerSP50, r.GossipMsgsPerS, float64(r.RSSBytesPerNode)/(1<<20), 100*r.CPUPerNode)
	fmt.Fprintln(w, "\n  at_s   live  coverage  gossip_B/s/node  asked  answered  cpu_cores  rss_MB")
	for _, s := range r.Samples {
		fmt.Fprintf(w, "  %5.0f  %4d  %8d  %15.0f  %5d  %8d  %9.2f  %6.0f\n", s.AtS, s.Live, s.CoverageMin, s.GossipBytesPerS,
			s.Asked, s.Answered, s.CPUCores, float64(s.RSSBytes)/(1<<20))
	}
}

// servePprof serves net/http/pprof's handlers on addr until ctx ends.
func servePprof(ctx context.Context, addr string, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", httppprof.Index)
	mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("sim: pprof server", "err", err)
		}
	}()
	log.Info("sim: serving Go's profiles", "url", "http://"+ln.Addr().String()+"/debug/pprof/")
	return nil
}
