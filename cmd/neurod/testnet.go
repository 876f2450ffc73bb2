package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/testnet"
)

// testnetReport is the JSON of `neurod testnet --json`. Later issues add
// fields; none is ever renamed or removed.
type testnetReport struct {
	Healthy bool          `json:"healthy"`
	Error   string        `json:"error,omitempty"`
	TookMs  int64         `json:"took_ms"`
	Dir     string        `json:"dir"`
	Nodes   []testnetNode `json:"nodes"`
	// Stopped is filled in once the nodes have been stopped (--check).
	Stopped []testnetExit `json:"stopped,omitempty"`
}

type testnetNode struct {
	Index            int      `json:"index"`
	PeerID           string   `json:"peer_id"`
	Addrs            []string `json:"addrs"`
	Roles            []string `json:"roles"`
	PID              int      `json:"pid"`
	Home             string   `json:"home"`
	API              string   `json:"api"`
	RSSBytes         uint64   `json:"rss_bytes"`
	RoutingTableSize int      `json:"routing_table_size"`
	HeardPeers       int      `json:"heard_peers"`
}

type testnetExit struct {
	Index  int    `json:"index"`
	PID    int    `json:"pid"`
	Clean  bool   `json:"clean"`
	Killed bool   `json:"killed"`
	Error  string `json:"error,omitempty"`
}

func newTestnetCmd(g *globalFlags) *cobra.Command {
	var (
		nodes   int
		dir     string
		asJSON  bool
		check   bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "testnet",
		Short: "Start a local network of real neurod processes on 127.0.0.1",
		Long: `testnet starts --nodes real neurod processes on 127.0.0.1. Node 0 is the
bootstrap (and relay) node; the others know only its address. It waits
until every node has every other in its DHT routing table and has heard a
GossipSub heartbeat from every other, prints the nodes, and keeps the
network running until Ctrl-C; then it stops every node and reports.

With --check it exits after the health check: status 0 when healthy, 1 when
not. --json prints a machine-readable report on stdout. Node homes and logs
are in --dir (default: a temporary directory, removed afterwards).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nodes < 1 {
				return fmt.Errorf("flag --nodes %d: need at least 1", nodes)
			}
			if timeout <= 0 {
				return fmt.Errorf("flag --timeout %v: must be positive", timeout)
			}
			return runTestnet(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, testnetArgs{
				nodes: nodes, dir: dir, json: asJSON, check: check, timeout: timeout,
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&nodes, "nodes", 5, "number of neurod processes")
	f.StringVar(&dir, "dir", "", "directory for the node homes and logs (kept afterwards; default: a temporary one, removed)")
	f.BoolVar(&asJSON, "json", false, "print a machine-readable report on stdout")
	f.BoolVar(&check, "check", false, "exit after the health check: 0 when healthy, 1 otherwise")
	f.DurationVar(&timeout, "timeout", 60*time.Second, "how long to wait for the network to be up and healthy")
	return cmd
}

type testnetArgs struct {
	nodes   int
	dir     string
	json    bool
	check   bool
	timeout time.Duration
}

func runTestnet(ctx context.Context, stdout, stderr io.Writer, g *globalFlags, a testnetArgs) (err error) {
	level := slog.LevelInfo
	if g.logLevel != "" {
		if err := level.UnmarshalText([]byte(g.logLevel)); err != nil {
			return fmt.Errorf("flag --log-level %q: want debug, info, warn or error", g.logLevel)
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("testnet: find neurod binary: %w", err)
	}
	dir := a.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "neuro-testnet-"); err != nil {
			return fmt.Errorf("testnet: %w", err)
		}
		defer func() {
			if rerr := os.RemoveAll(dir); rerr != nil && err == nil {
				err = fmt.Errorf("testnet: remove %s: %w", dir, rerr)
			}
		}()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("flag --dir %s: %w", dir, err)
	}

	rep := testnetReport{Dir: dir, Nodes: []testnetNode{}}
	log.Info("starting testnet", "nodes", a.nodes, "dir", dir)
	nw, err := testnet.Launch(ctx, testnet.LaunchOptions{Nodes: a.nodes, Dir: dir, Binary: bin, Timeout: a.timeout, Log: log})
	if err != nil {
		rep.Error = err.Error()
		if a.json {
			writeJSON(stdout, rep)
		}
		return &exitError{code: 1, err: err}
	}
	healthErr := nw.WaitHealthy(ctx)
	rep.Healthy = healthErr == nil
	rep.TookMs = nw.Took.Milliseconds()
	for _, p := range nw.Processes() {
		st := p.Status
		rep.Nodes = append(rep.Nodes, testnetNode{
			Index: p.Index, PeerID: st.PeerID, Addrs: st.Addrs, Roles: st.Roles, PID: p.PID(),
			Home: p.Home, API: p.APIAddr, RSSBytes: st.RSSBytes,
			RoutingTableSize: len(st.RoutingTable), HeardPeers: len(st.Heard),
		})
	}
	if healthErr != nil {
		rep.Error = healthErr.Error()
		for _, p := range nw.Processes() {
			fmt.Fprint(stderr, p.LogTail(10))
		}
	}
	if !a.json {
		printNodes(stdout, rep)
	}
	if a.check || healthErr != nil {
		rep.Stopped = stopNetwork(nw, log)
		if a.json {
			writeJSON(stdout, rep)
		}
		if healthErr != nil {
			return &exitError{code: 1, err: fmt.Errorf("testnet unhealthy: %w", healthErr)}
		}
		return nil
	}
	if a.json {
		writeJSON(stdout, rep)
	}
	fmt.Fprintln(stderr, "testnet is up; press Ctrl-C to stop it")
	<-ctx.Done()
	stopNetwork(nw, log)
	return nil
}

// stopNetwork stops every node and logs how each ended.
func stopNetwork(nw *testnet.Network, log *slog.Logger) []testnetExit {
	var out []testnetExit
	clean := 0
	for _, r := range nw.Stop() {
		e := testnetExit{Index: r.Index, PID: r.PID, Clean: r.Clean, Killed: r.Killed}
		if r.Err != nil {
			e.Error = r.Err.Error()
		}
		if r.Clean {
			clean++
		} else {
			log.Warn("node did not stop cleanly", "node", r.Index, "pid", r.PID, "killed", r.Killed, "err", r.Err)
		}
		out = append(out, e)
	}
	log.Info("testnet stopped", "nodes", len(out), "clean", clean)
	return out
}

func printNodes(w io.Writer, rep testnetReport) {
	state := "healthy"
	if !rep.Healthy {
		state = "NOT healthy: " + rep.Error
	}
	fmt.Fprintf(w, "neuro testnet: %d nodes, %s (%.1fs), homes in %s\n\n", len(rep.Nodes), state,
		float64(rep.TookMs)/1000, rep.Dir)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tPEER ID\tROLES\tPID\tADDRESSES")
	for _, n := range rep.Nodes {
		roles := strings.Join(n.Roles, ",")
		if roles == "" {
			roles = "peer"
		}
		first := ""
		if len(n.Addrs) > 0 {
			first = n.Addrs[0]
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\n", n.Index, n.PeerID, roles, n.PID, first)
		for _, a := range n.Addrs[min(1, len(n.Addrs)):] {
			fmt.Fprintf(tw, "\t\t\t\t%s\n", a)
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
}

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil && !errors.Is(err, os.ErrClosed) {
		fmt.Fprintln(os.Stderr, "neurod: write json:", err)
	}
}
