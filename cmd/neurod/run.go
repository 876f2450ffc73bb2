package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/internal/progress"

	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/p2p"
)

// runFlags are the flags of `neurod run`.
type runFlags struct {
	listen, bootstrap, roles []string
	dhtMode, api             string
	heartbeat                node.Duration
	modelID, experts, memory string
	spans                    string
	spanExperts              string
	gatingOn                 bool
	httpAddr                 string
	threads                  int
	maxLoad                  float64
	idleOnly                 bool
	slowCompute              time.Duration
	testnetMode              bool
	faulty                   string
	device                   string
}

func newRunCmd(g *globalFlags) *cobra.Command {
	var rf runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run a node until SIGINT or SIGTERM",
		Long: `run starts the node: it listens on its addresses, dials the bootstrap
peers (failing if none answers within p2p.bootstrap_timeout), joins the DHT
and GossipSub, and publishes a heartbeat on the routing topic. On SIGINT or
SIGTERM it shuts down cleanly: control API, pubsub, DHT, host.

Flags override NEURO_* environment variables, which override the config.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			home, err := g.homeDir()
			if err != nil {
				return err
			}
			cfg, err := loadConfig(home, cmd.Flags(), g, rf.keys())
			if err != nil {
				return err
			}
			return runNode(cmd, home, cfg, &rf)
		},
	}
	rf.register(cmd.Flags())
	return cmd
}

// keys are the config keys the flags override.
func (rf *runFlags) keys() []flagKey {
	return []flagKey{
		{"listen", "p2p.listen", func(c *node.Config, _ *pflag.FlagSet) error { c.P2P.Listen = rf.listen; return nil }},
		{"bootstrap", "p2p.bootstrap", func(c *node.Config, _ *pflag.FlagSet) error { c.P2P.Bootstrap = rf.bootstrap; return nil }},
		{"roles", "p2p.roles", func(c *node.Config, _ *pflag.FlagSet) error { c.P2P.Roles = rf.roles; return nil }},
		{"dht-mode", "p2p.dht.mode", func(c *node.Config, _ *pflag.FlagSet) error { c.P2P.DHT.Mode = rf.dhtMode; return nil }},
		{"api", "api.listen", func(c *node.Config, _ *pflag.FlagSet) error { c.API.Listen = rf.api; return nil }},
		{"heartbeat-interval", "gossip.heartbeat_interval", func(c *node.Config, _ *pflag.FlagSet) error {
			c.Gossip.HeartbeatInterval = rf.heartbeat
			return nil
		}},
		{"model", "expert.model", func(c *node.Config, _ *pflag.FlagSet) error { c.Expert.Model = rf.modelID; return nil }},
		{"experts", "expert.experts", func(c *node.Config, _ *pflag.FlagSet) error { c.Expert.Experts = rf.experts; return nil }},
		{"spans", "expert.spans", func(c *node.Config, _ *pflag.FlagSet) error { c.Expert.Spans = rf.spans; return nil }},
		{"span-experts", "expert.span_experts", func(c *node.Config, _ *pflag.FlagSet) error { c.Expert.SpanExperts = rf.spanExperts; return nil }},
		{"memory", "home.memory_mb", func(c *node.Config, _ *pflag.FlagSet) error {
			mb, err := parseMiB(rf.memory)
			c.Home.MemoryMB, c.Expert.MemoryMB = mb, mb
			return err
		}},
		{"threads", "home.threads", func(c *node.Config, _ *pflag.FlagSet) error { c.Home.Threads = rf.threads; return nil }},
		{"max-load", "home.max_load", func(c *node.Config, _ *pflag.FlagSet) error { c.Home.MaxLoad = rf.maxLoad; return nil }},
		{"idle-only", "home.idle_only", func(c *node.Config, _ *pflag.FlagSet) error { c.Home.IdleOnly = rf.idleOnly; return nil }},
		{"gating", "gating.enabled", func(c *node.Config, _ *pflag.FlagSet) error { c.Gating.Enabled = rf.gatingOn; return nil }},
		{"http", "http.listen", func(c *node.Config, _ *pflag.FlagSet) error { c.HTTP.Listen = rf.httpAddr; return nil }},
		{"device", "home.device", func(c *node.Config, _ *pflag.FlagSet) error { c.Home.Device = rf.device; return nil }},
	}
}

func (rf *runFlags) register(f *pflag.FlagSet) {
	f.StringArrayVar(&rf.listen, "listen", nil, "multiaddr to listen on (repeat for several; overrides p2p.listen)")
	f.StringArrayVar(&rf.bootstrap, "bootstrap", nil, "bootstrap peer multiaddr ending in /p2p/<peer ID> (repeat for several)")
	f.StringSliceVar(&rf.roles, "roles", nil, "roles to announce: bootstrap, relay, gating, expert (comma-separated)")
	f.StringVar(&rf.dhtMode, "dht-mode", "", "DHT mode: auto, server or client")
	f.StringVar(&rf.api, "api", "", "control API host:port on loopback; empty string disables it")
	f.Var(&durationFlag{&rf.heartbeat}, "heartbeat-interval", "how often to publish a heartbeat (e.g. 5s)")
	f.StringVar(&rf.modelID, "model", "", "CID of the model to work on: host its experts and, with --gating, serve it")
	f.StringVar(&rf.experts, "experts", "", `experts to host: "auto", "none" or e.g. "0:3,0:5,1:*"`)
	f.StringVar(&rf.spans, "spans", "", `serve a span of layers on the span protocol, with every expert of them: "auto" or e.g. "12-23"`)
	f.StringVar(&rf.spanExperts, "span-experts", "host", `where a span's experts are computed: "host" (every one hosted here) or "call" (those --experts lists here, the others called on other nodes)`)
	f.BoolVar(&rf.gatingOn, "gating", false, "be a gating node of the model: answer prompts, sending each layer to the expert nodes")
	f.StringVar(&rf.httpAddr, "http", "", "serve the dashboard (/), its data (/api/v1/state), Prometheus /metrics and, on a gating node, the OpenAI-compatible API (/v1) on this host:port (off by default)")
	f.IntVar(&rf.threads, "threads", 0, "most compute threads, expert and gating (0: every core)")
	f.Float64Var(&rf.maxLoad, "max-load", 0, "pause expert work while the 1-minute load average per core is above this (0: never)")
	f.BoolVar(&rf.idleOnly, "idle-only", false, "take expert work only while the machine is otherwise idle (other processes' CPU under home.idle_threshold, no GPU in use)")
	f.DurationVar(&rf.slowCompute, "test-slow-compute", 0, "test only: delay every expert compute by this much")
	f.BoolVar(&rf.testnetMode, "testnet", false, "this node is part of a local test network (allows the test-only flags)")
	f.StringVar(&rf.faulty, "faulty", "", "test only (with --testnet): misbehave on purpose: wrong, lowprec, slow, drop or flaky")
	for _, name := range []string{"test-slow-compute", "testnet", "faulty"} {
		_ = f.MarkHidden(name)
	}
	f.StringVar(&rf.device, "device", "", deviceUsage+` (overrides home.device; default cpu)`)
	f.StringVar(&rf.memory, "memory", "", "memory the node may use, e.g. 8GiB or 512MiB: the expert weights' budget (expert.memory_mb), and GOMEMLIMIT for the rest")
}

// runNode builds the node of cfg with the ggml backend, runs it until
// the command's context ends and shuts it down.
func runNode(cmd *cobra.Command, home string, cfg node.Config, rf *runFlags) error {
	log, err := node.NewLogger(cmd.ErrOrStderr(), cfg.Log)
	if err != nil {
		return err
	}
	fault, err := expert.ParseFault(rf.faulty)
	if err != nil {
		return fmt.Errorf("flag --faulty: %w", err)
	}
	if rf.testnetMode {
		// The netns testnet's sealed internet uses documentation ranges.
		p2p.TreatDocumentationRangesAsPublic()
	}
	if (fault != expert.FaultNone || rf.slowCompute > 0) && !rf.testnetMode {
		return errors.New("flags --faulty and --test-slow-compute make a node misbehave on purpose: only with --testnet")
	}
	opts, err := nodeOptions(cmd, home, &cfg, rf, fault, log)
	if err != nil {
		return err
	}
	n, err := node.New(cfg, opts...)
	if err != nil {
		return err
	}
	stopProfile, err := startCPUProfile(home)
	if err != nil {
		return joinClose(err, n)
	}
	defer stopProfile()
	ctx := cmd.Context()
	if err := n.Start(ctx); err != nil {
		return joinClose(err, n)
	}
	printRunning(cmd.OutOrStdout(), n)
	<-ctx.Done()
	log.Info("shutting down")
	stopWatch := watchShutdown(log, shutdownStall)
	err = n.Close()
	stopWatch()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("shut down cleanly")
	return nil
}

// nodeOptions are the node's options from its configuration and flags: the
// compute device, the memory budget's source, fetch progress.
func nodeOptions(cmd *cobra.Command, home string, cfg *node.Config, rf *runFlags, fault expert.Fault, log *slog.Logger) ([]node.Option, error) {
	// A node computes a layer, then waits on the network: its idle compute
	// threads spin home.compute_poll for the next (0 where the process it
	// waits for shares the cores: they sleep at once).
	ggml.SetPolling(cfg.Home.ComputePoll)
	if n := cfg.Expert.GoProcs; n > 0 && !cfg.Gating.Enabled {
		runtime.GOMAXPROCS(n)
		log.Info("go side on fewer threads", "expert.go_procs", n)
	}
	if err := ggml.CheckTimerSlackEnv(); err != nil {
		log.Warn("timer slack", "err", err)
	}
	dev, err := ggml.SelectDevice(cfg.Home.Device)
	if err != nil {
		return nil, fmt.Errorf("home.device (--device): %w", err)
	}
	opts := []node.Option{node.WithHome(home), node.WithLogger(log), node.WithExpertSlowDown(rf.slowCompute), node.WithFault(fault),
		node.WithCompute(ggml.Backend{Device: dev})}
	if src := budgetDevice(cfg, dev, log); src != "" {
		opts = append(opts, node.WithBudgetSource(src))
	}
	if pr := progress.New(cmd.ErrOrStderr()); pr.On() {
		show := pr.Fetches()
		opts = append(opts, node.WithProgress(func(c cid.Cid, done, total int64) { show(c.String(), done, total) }))
	}
	if cfg.Home.MemoryMB > 0 {
		// A soft limit on Go's heap; the weights live outside it and
		// are capped by expert.memory_mb.
		debug.SetMemoryLimit(int64(cfg.Home.MemoryMB) << 20)
	}
	return opts, nil
}

// printRunning prints what a started node listens on.
func printRunning(w io.Writer, n *node.Node) {
	st := n.Status()
	fmt.Fprintf(w, "neurod %s running\npeer ID: %s\n", st.Version, st.PeerID)
	for _, a := range st.Addrs {
		fmt.Fprintf(w, "listening on %s/p2p/%s\n", a, st.PeerID)
	}
	if a := n.HTTPAddr(); a != "" {
		fmt.Fprintf(w, "dashboard on http://%s/ (metrics on /metrics)\n", a)
		if n.Gating() != nil {
			fmt.Fprintf(w, "OpenAI-compatible API on http://%s/v1\n", a)
		}
	}
}

// joinClose closes n after a failed start and keeps the start error first.
func joinClose(err error, n *node.Node) error {
	if cerr := n.Close(); cerr != nil {
		fmt.Fprintln(os.Stderr, "neurod: while closing after the error:", strings.ReplaceAll(cerr.Error(), "\n", "; "))
	}
	return err
}

// durationFlag adapts node.Duration to pflag.
type durationFlag struct{ d *node.Duration }

func (f *durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.String()
}
func (f *durationFlag) Set(s string) error { return f.d.UnmarshalText([]byte(s)) }
func (f *durationFlag) Type() string       { return "duration" }

// parseMiB parses a size such as "8GiB", "512MiB" or "2048" (MiB).
func parseMiB(s string) (int, error) {
	num, mult := s, 1
	switch {
	case strings.HasSuffix(s, "GiB"):
		num, mult = strings.TrimSuffix(s, "GiB"), 1024
	case strings.HasSuffix(s, "MiB"):
		num = strings.TrimSuffix(s, "MiB")
	}
	n, err := strconv.Atoi(strings.TrimSpace(num))
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q: want a size such as 8GiB or 512MiB", s)
	}
	return n * mult, nil
}

// budgetDevice sizes the expert weights' budget (expert.memory_mb) from a
// GPU's free memory when none is set: what is free now, less room for the
// gating compute (its weights and every session's KV cache) on a gating
// node, less a margin for the compute buffers. The CPU keeps today's rule
// (no budget unless set).
func budgetDevice(cfg *node.Config, dev ggml.Device, log interface{ Info(string, ...any) }) string {
	if dev.CPU() || cfg.Expert.MemoryMB > 0 {
		return ""
	}
	const mib = 1 << 20
	free := int64(dev.MemoryFree)
	reserve := max(int64(512*mib), free/20) // compute buffers, the driver's own
	if cfg.Gating.Enabled {
		// A gating node keeps its weights and every session's KV cache on
		// the device too. The model's shape is not known before its
		// manifest is fetched, so this is an estimate: a quarter of the
		// free memory, at least 2 GiB.
		reserve += max(int64(2048*mib), free/4)
	}
	cfg.Expert.MemoryMB = int(max(0, free-reserve) / mib)
	log.Info("expert memory from the device", "device", dev.Spec(), "name", dev.Description,
		"free_mib", free/mib, "expert_mib", cfg.Expert.MemoryMB, "gating_reserve", cfg.Gating.Enabled)
	return fmt.Sprintf("%s, %s: %d MiB free, less %d MiB kept for compute buffers%s", dev.Spec(), dev.Description, free/mib,
		reserve/mib, map[bool]string{true: " and the gating compute"}[cfg.Gating.Enabled])
}

// ProfileEnv names a directory: with it set, `neurod run` writes a CPU
// profile of its whole run there (cpu-<home's name>.pprof) and, as it
// stops, the profile of what it allocated (allocs-<home's name>.pprof:
// `go tool pprof -sample_index=alloc_space`), for `go tool pprof`. The
// testnet's nodes inherit it.
const ProfileEnv = "NEURO_CPUPROFILE_DIR"

func startCPUProfile(home string) (stop func(), err error) {
	dir := os.Getenv(ProfileEnv)
	if dir == "" {
		return func() {}, nil
	}
	stopCPU, err := cpuProfile(filepath.Join(dir, "cpu-"+filepath.Base(home)+".pprof"))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ProfileEnv, err)
	}
	return func() {
		stopCPU()
		if err := writeProfile("allocs", filepath.Join(dir, "allocs-"+filepath.Base(home)+".pprof")); err != nil {
			slog.Warn("allocation profile not written", "env", ProfileEnv, "err", err)
		}
	}, nil
}

// writeProfile writes the runtime profile name (pprof.Lookup) to path.
func writeProfile(name, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.Lookup(name).WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("%s profile: %w", name, err)
	}
	return f.Close()
}

// cpuProfile writes this process's CPU profile to path until stop.
func cpuProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}
