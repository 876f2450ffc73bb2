package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/node"
)

func newLedgerCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ledger",
		Short: "NEURO balances, transfers and stake, through the running node",
		Long: `ledger talks to the node running in --home (over its local control API).
The node signs with its own key: its peer ID is its account. A validator
answers from its chain; any other node asks a validator over libp2p.
Amounts are in NEURO with up to six decimals (1 NEURO = 1,000,000 base
units).`,
	}
	api := func() (string, error) {
		home, err := g.homeDir()
		if err != nil {
			return "", err
		}
		return node.ReadAPIAddr(home)
	}
	cmd.AddCommand(ledgerQueryCmds(api)...)
	cmd.AddCommand(ledgerTxCmds(api)...)
	cmd.AddCommand(newLedgerSimulateCmd())
	return cmd
}

// ledgerQueryCmds are `ledger status` and `ledger balance`.
func ledgerQueryCmds(api func() (string, error)) []*cobra.Command {
	var asJSON bool
	show := func(cmd *cobra.Command, p string) error { return showLedger(cmd, api, p, asJSON) }
	status := &cobra.Command{
		Use: "status [--json]", Short: "Chain height, app hash, and this node's balance and stake", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return show(cmd, "") },
	}
	balance := &cobra.Command{
		Use: "balance [PEER] [--json]", Short: "A peer's balance and stake (default: this node's)", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := ""
			if len(args) == 1 {
				if _, err := peer.Decode(args[0]); err != nil {
					return fmt.Errorf("peer %q: %w", args[0], err)
				}
				p = args[0]
			}
			return show(cmd, p)
		},
	}
	for _, c := range []*cobra.Command{status, balance} {
		c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	}
	return []*cobra.Command{status, balance}
}

// showLedger prints the chain and peer p's account (p "": this node's).
func showLedger(cmd *cobra.Command, api func() (string, error), p string, asJSON bool) error {
	addr, err := api()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
	defer cancel()
	info, err := node.FetchLedger(ctx, addr, p)
	if err != nil {
		return err
	}
	if asJSON {
		writeJSON(cmd.OutOrStdout(), info)
		return nil
	}
	fmt.Fprintf(cmd.OutOrStdout(), "chain %s at height %d (app hash %s; %s)\naccount %s: balance %s NEURO, escrowed %s, staked %s, unbonding %s, nonce %d\ntreasury %s, burned %s, emitted %s; supply %s (%s)\n",
		info.ChainID, info.Height, info.AppHash, info.Source, info.Peer, neuro(info.Balance), neuro(info.Escrowed), neuro(info.Staked), neuro(info.Unbonding), info.Nonce,
		neuro(info.Treasury), neuro(info.Burned), neuro(info.Emitted), neuro(info.Supply), map[bool]string{true: "invariant holds", false: "INVARIANT BROKEN"}[info.SupplyOK])
	for _, p := range info.Proposals {
		what := "new parameters"
		if p.AddModel != "" {
			what = "add model " + p.AddModel
		}
		state := fmt.Sprintf("open until height %d", p.Ends)
		if p.Done {
			state = map[bool]string{true: "passed", false: "rejected"}[p.Passed]
		}
		fmt.Fprintf(cmd.OutOrStdout(), "proposal %d: %s (%s; yes %s, no %s staked NEURO)\n", p.ID, what, state, neuro(p.Yes), neuro(p.No))
	}
	return nil
}

// ledgerTxCmds are the commands that send a transaction.
func ledgerTxCmds(api func() (string, error)) []*cobra.Command {
	return append(append(ledgerAmountCmds(api), ledgerGovCmds(api)...), ledgerAllowCmd(api))
}

// ledgerAmountCmds are send, stake and unstake.
func ledgerAmountCmds(api func() (string, error)) []*cobra.Command {
	submit := func(cmd *cobra.Command, req node.LedgerTxRequest, amount string) error {
		return submitAmount(cmd, api, req, amount)
	}
	send := &cobra.Command{
		Use: "send PEER AMOUNT", Short: "Transfer NEURO to a peer", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := peer.Decode(args[0]); err != nil {
				return fmt.Errorf("peer %q: %w", args[0], err)
			}
			return submit(cmd, node.LedgerTxRequest{Type: "transfer", To: args[0]}, args[1])
		},
	}
	stake := &cobra.Command{
		Use: "stake AMOUNT", Short: "Bond NEURO as stake", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return submit(cmd, node.LedgerTxRequest{Type: "stake"}, args[0])
		},
	}
	unstake := &cobra.Command{
		Use: "unstake AMOUNT", Short: "Start unbonding stake (it returns after the unbonding period)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return submit(cmd, node.LedgerTxRequest{Type: "unstake"}, args[0])
		},
	}
	return []*cobra.Command{send, stake, unstake}
}

// ledgerGovCmds are propose and vote.
func ledgerGovCmds(api func() (string, error)) []*cobra.Command {
	propose := &cobra.Command{
		Use: "propose add-model CID", Short: "Propose a governance change: add a model escrows may pay for (needs the minimum stake)",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] != "add-model" {
				return fmt.Errorf("proposal %q: want add-model CID", args[0])
			}
			if _, err := cid.Decode(args[1]); err != nil {
				return fmt.Errorf("model %q: %w", args[1], err)
			}
			return submitRaw(cmd, api, node.LedgerTxRequest{Type: "propose", Model: args[1]})
		},
	}
	vote := &cobra.Command{
		Use: "vote ID yes|no", Short: "Vote on a proposal with this node's stake", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.ParseUint(args[0], 10, 64)
			if err != nil || id == 0 {
				return fmt.Errorf("proposal %q: want its number (see 'neurod ledger status')", args[0])
			}
			if args[1] != "yes" && args[1] != "no" {
				return fmt.Errorf("vote %q: want yes or no", args[1])
			}
			return submitRaw(cmd, api, node.LedgerTxRequest{Type: "vote", Proposal: id, Yes: args[1] == "yes"})
		},
	}
	return []*cobra.Command{propose, vote}
}

func ledgerAllowCmd(api func() (string, error)) *cobra.Command {
	return &cobra.Command{
		Use: "allow GATING AMOUNT", Short: "Let a gating node draw up to AMOUNT NEURO from this node's account into escrows (API keys on it that name this account); 0 revokes",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := peer.Decode(args[0]); err != nil {
				return fmt.Errorf("gating node %q: %w", args[0], err)
			}
			v, err := parseNeuroOrZero(args[1])
			if err != nil {
				return err
			}
			res, err := sendLedgerTx(cmd, api, node.LedgerTxRequest{Type: "allow", To: args[0], Amount: v})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "submitted allowance of %s NEURO to %s (nonce %d)\n", neuro(v), args[0], res.Nonce)
			return nil
		},
	}
}

// submitAmount sends a transaction of an amount of NEURO.
func submitAmount(cmd *cobra.Command, api func() (string, error), req node.LedgerTxRequest, amount string) error {
	v, err := parseNeuro(amount)
	if err != nil {
		return err
	}
	req.Amount = v
	res, err := sendLedgerTx(cmd, api, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "submitted %s of %s NEURO (nonce %d)\n", req.Type, neuro(v), res.Nonce)
	return nil
}

func newLedgerSimulateCmd() *cobra.Command {
	var o ledger.SimulateOptions
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "simulate [--epochs N] [--json]",
		Short: "Run the ledger's state machine under a constant demand and print supply, treasury and burn by epoch",
		Long: `simulate runs the real state machine (signed escrows and settlements,
the default economics) without a network: every block, clients pay for
--inferences inferences of --tokens tokens at --flops-per-token, spread
over --experts expert nodes. It prints, at the end of every epoch, the
supply, the treasury, what was burned and emitted, the fees paid and what
the experts earned from them; the supply invariant is checked after every
block.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.Epochs < 1 || o.Experts < 1 || o.InferencesPerBlock < 1 || o.TokensPerInference < 1 || o.FlopsPerToken < 1 {
				return fmt.Errorf("every flag must be positive")
			}
			rows, err := ledger.Simulate(o)
			if err != nil {
				return err
			}
			if asJSON {
				writeJSON(cmd.OutOrStdout(), rows)
				return nil
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "%6s %16s %14s %14s %16s %16s %16s\n", "epoch", "supply", "treasury", "burned", "emitted", "fees", "experts earned")
			for _, r := range rows {
				fmt.Fprintf(w, "%6d %16s %14s %14s %16s %16s %16s\n", r.Epoch, neuro(r.Supply), neuro(r.Treasury), neuro(r.Burned),
					neuro(r.Emitted), neuro(r.Fees), neuro(r.ExpertsEarned))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Epochs, "epochs", 100, "epochs to simulate (100 blocks each)")
	f.IntVar(&o.Experts, "experts", 20, "staked expert nodes sharing the work")
	f.IntVar(&o.InferencesPerBlock, "inferences", 4, "inferences settled per block")
	f.IntVar(&o.TokensPerInference, "tokens", 256, "tokens per inference")
	f.Uint64Var(&o.FlopsPerToken, "flops-per-token", 22_500_000_000, "expert FLOPs per token (default: Mixtral 8x7B, 2 experts x 32 layers)")
	f.Uint64Var(&o.Seed, "seed", 1, "seed of the simulated peers' keys")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// submitRaw submits a transaction without an amount.
func submitRaw(cmd *cobra.Command, api func() (string, error), req node.LedgerTxRequest) error {
	res, err := sendLedgerTx(cmd, api, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "submitted %s (nonce %d)\n", req.Type, res.Nonce)
	return nil
}

// sendLedgerTx has the running node sign and submit req.
func sendLedgerTx(cmd *cobra.Command, api func() (string, error), req node.LedgerTxRequest) (*node.LedgerTxResult, error) {
	addr, err := api()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
	defer cancel()
	return node.SubmitLedgerTx(ctx, addr, req)
}

// neuro formats base units as NEURO.
func neuro(v uint64) string { return billing.Format(v) }

// parseNeuroOrZero is parseNeuro that also takes 0.
func parseNeuroOrZero(s string) (uint64, error) {
	if t := strings.Trim(strings.TrimSpace(s), "0."); t == "" && strings.ContainsAny(s, "0") {
		return 0, nil
	}
	return parseNeuro(s)
}

// parseNeuro parses "12", "0.5" or "1.000001" NEURO into base units.
func parseNeuro(s string) (uint64, error) {
	whole, frac, _ := strings.Cut(strings.TrimSpace(s), ".")
	bad := fmt.Errorf("amount %q: want a positive number of NEURO with at most 6 decimals", s)
	if whole == "" && frac == "" || len(frac) > 6 {
		return 0, bad
	}
	w := uint64(0)
	if whole != "" {
		var err error
		if w, err = strconv.ParseUint(whole, 10, 64); err != nil || w > (1<<64-1)/ledger.BaseUnits-1 {
			return 0, bad
		}
	}
	f := uint64(0)
	if frac != "" {
		v, err := strconv.ParseUint(frac+strings.Repeat("0", 6-len(frac)), 10, 64)
		if err != nil {
			return 0, bad
		}
		f = v
	}
	v := w*ledger.BaseUnits + f
	if v == 0 {
		return 0, bad
	}
	return v, nil
}
