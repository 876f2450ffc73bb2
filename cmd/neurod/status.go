package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/node"
)

func newStatusCmd(g *globalFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "What the running node sees: peers, reachability, expert coverage, throughput, ledger",
		Long: `status asks the node running in --home (over its local control API) for
the picture its dashboard shows: the nodes it hears (roles, reachability,
RTT, hosted experts, reputation score, load), each model's expert coverage
(experts with fewer than two live providers are at risk: host them), live
throughput and the ledger. --json prints the dashboard's /api/v1/state.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			home, err := g.homeDir()
			if err != nil {
				return err
			}
			addr, err := node.ReadAPIAddr(home)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
			defer cancel()
			st, err := node.FetchState(ctx, addr)
			if err != nil {
				return err
			}
			if asJSON {
				writeJSON(cmd.OutOrStdout(), st)
				return nil
			}
			printState(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON (the dashboard's /api/v1/state)")
	return cmd
}

func printState(w io.Writer, st node.State) {
	fmt.Fprintf(w, "node %s (neurod %s), up %s, reachability %s\n", st.PeerID, st.Version,
		(time.Duration(st.UptimeS) * time.Second).String(), st.Reachability)
	if st.Paused {
		fmt.Fprintf(w, "expert work PAUSED: %s\n", st.PauseReason)
	}
	fmt.Fprintf(w, "\n%d nodes:\n", len(st.Nodes))
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  PEER\tROLES\tREACH\tRTT ms\tEXPERTS\tSCORE\tLOAD\tQUEUE\tSEEN")
	for _, n := range st.Nodes {
		seen := fmt.Sprintf("%.1fs ago", float64(n.LastSeenMsAgo)/1000)
		if n.Self {
			seen = "this node"
		} else if n.Paused {
			seen = "paused, " + seen
		}
		rtt := "-"
		if n.RTTMs > 0 {
			rtt = fmt.Sprintf("%.2f", n.RTTMs)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%.2f\t%.2f\t%d\t%s\n", n.PeerID, strings.Join(n.Roles, ","), n.Reachability,
			rtt, len(n.Experts), n.Score, n.CPULoad, n.QueueDepth, seen)
	}
	tw.Flush()
	for _, m := range st.Models {
		var risky []string
		total := 0
		for _, c := range st.Coverage {
			if c.Model != m.Model {
				continue
			}
			total++
			if c.Providers < 2 {
				risky = append(risky, fmt.Sprintf("%d:%d (%d)", c.Layer, c.Expert, c.Providers))
			}
		}
		fmt.Fprintf(w, "\nmodel %s: %d layers x %d experts, %d of %d experts with 2+ live providers\n",
			m.Model, m.Layers, m.Experts, total-len(risky), total)
		if len(risky) > 0 {
			fmt.Fprintf(w, "  at risk (layer:expert (providers)): %s\n", strings.Join(risky, ", "))
		}
	}
	t := st.Throughput
	fmt.Fprintf(w, "\nthroughput: %.1f tokens/s (%d generated), %.1f expert calls/s (%d answered)\n",
		t.TokensPerS, t.Generated, t.ExpertCallsPerS, t.ExpertCalls)
	if l := st.Ledger; l != nil {
		if l.Error != "" {
			fmt.Fprintf(w, "ledger: %s\n", l.Error)
			return
		}
		fmt.Fprintf(w, "ledger at height %d (%s): supply %s NEURO (%s), treasury %s, burned %s; this node: balance %s, staked %s\n",
			l.Height, l.Source, neuro(l.Supply), map[bool]string{true: "invariant holds", false: "INVARIANT BROKEN"}[l.SupplyOK],
			neuro(l.Treasury), neuro(l.Burned), neuro(l.Balance), neuro(l.Staked))
	}
}
