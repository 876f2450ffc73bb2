package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/node"
)

const apikeyLong = `apikey manages the API keys of the gating node in --home. A key is
bound to a ledger account that pays for its requests, a budget (the most
it may spend, in NEURO) and a rate (requests a minute). Clients send it as
every OpenAI client does: 'Authorization: Bearer KEY'. Each request is
charged to the account through an escrow the gating node opens from the
account's allowance ('neurod wallet allow' or 'neurod ledger allow' by the
account's holder), and its usage reports the cost.

Once a node has issued a key, every request to its /v1/ API needs one: no
key or a revoked one gets 401, a spent budget 402, a request over the rate
429 with Retry-After. Keys are stored hashed (<home>/apikeys.json, mode
0600); the key itself is printed once, at creation.

The commands go through the node running in --home, or edit its key file
when none runs.`

func newAPIKeyCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "apikey", Short: "Issue, list and revoke the API keys of a gating node's HTTP API", Long: apikeyLong}
	a := &apikeyFlags{g: g}
	create, list, revoke := a.createCmd(), a.listCmd(), a.revokeCmd()
	for _, c := range []*cobra.Command{create, list, revoke} {
		c.Flags().BoolVar(&a.asJSON, "json", false, "print JSON")
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}

// apikeyFlags are the apikey subcommands' flags.
type apikeyFlags struct {
	g                         *globalFlags
	asJSON                    bool
	account, budget, rateSpec string
}

func (a *apikeyFlags) createCmd() *cobra.Command {
	create := &cobra.Command{
		Use: "create --account PEER --budget NEURO [--rate N/min] [--json]", Short: "Issue a key (printed once)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := peer.Decode(a.account); err != nil {
				return fmt.Errorf("flag --account %q: %w", a.account, err)
			}
			b, err := parseNeuro(a.budget)
			if err != nil {
				return fmt.Errorf("flag --budget: %w", err)
			}
			perMin, err := parseRate(a.rateSpec)
			if err != nil {
				return fmt.Errorf("flag --rate: %w", err)
			}
			req := node.APIKeyRequest{Account: a.account, Budget: b, RatePerMin: perMin}
			var info node.APIKeyInfo
			err = withKeys(cmd, a.g, func(ctx context.Context, addr string) (err error) {
				info, err = node.CreateAPIKey(ctx, addr, req)
				return err
			}, func(s *billing.Store) (err error) {
				info, err = node.CreateKey(s, req)
				return err
			})
			if err != nil {
				return err
			}
			if a.asJSON {
				writeJSON(cmd.OutOrStdout(), info)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "key %s for account %s, budget %s NEURO, %s\n%s\n(shown once: keep it; only its hash is stored)\n",
				info.ID, info.Account, neuro(info.Budget), rateString(info.RatePerMin), info.Key)
			return nil
		},
	}
	create.Flags().StringVar(&a.account, "account", "", "the ledger account (peer ID) that pays")
	create.Flags().StringVar(&a.budget, "budget", "", "the most the key may spend, in NEURO")
	create.Flags().StringVar(&a.rateSpec, "rate", "60/min", "most requests: N/min, N/s, N/h, or 0 for no limit")
	_ = create.MarkFlagRequired("account")
	_ = create.MarkFlagRequired("budget")
	return create
}

func (a *apikeyFlags) listCmd() *cobra.Command {
	return &cobra.Command{
		Use: "list [--json]", Short: "List the keys (never the keys themselves)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var out []node.APIKeyInfo
			err := withKeys(cmd, a.g, func(ctx context.Context, addr string) (err error) {
				out, err = node.ListAPIKeys(ctx, addr)
				return err
			}, func(s *billing.Store) error {
				for _, k := range s.List() {
					out = append(out, node.KeyInfo(k))
				}
				return nil
			})
			if err != nil {
				return err
			}
			if out == nil {
				out = []node.APIKeyInfo{}
			}
			if a.asJSON {
				writeJSON(cmd.OutOrStdout(), out)
				return nil
			}
			for _, k := range out {
				state := "live"
				if k.Revoked {
					state = "revoked"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s  %s  account %s  spent %s of %s NEURO in %d requests  %s  created %s\n",
					k.ID, state, k.Account, neuro(k.Spent), neuro(k.Budget), k.Requests, rateString(k.RatePerMin), k.Created.Format(time.RFC3339))
			}
			return nil
		},
	}
}

func (a *apikeyFlags) revokeCmd() *cobra.Command {
	return &cobra.Command{
		Use: "revoke ID", Short: "Revoke a key: it is refused (401) from now on", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var info node.APIKeyInfo
			err := withKeys(cmd, a.g, func(ctx context.Context, addr string) (err error) {
				info, err = node.RevokeAPIKey(ctx, addr, args[0])
				return err
			}, func(s *billing.Store) error {
				k, err := s.Revoke(args[0])
				info = node.KeyInfo(k)
				return err
			})
			if err != nil {
				return err
			}
			if a.asJSON {
				writeJSON(cmd.OutOrStdout(), info)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "key %s revoked\n", info.ID)
			return nil
		},
	}
}

// withKeys runs online against the node running in --home, or offline on
// its key file when none runs.
func withKeys(cmd *cobra.Command, g *globalFlags, online func(context.Context, string) error, offline func(*billing.Store) error) error {
	home, err := g.homeDir()
	if err != nil {
		return err
	}
	if addr, err := node.ReadAPIAddr(home); err == nil {
		ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
		defer cancel()
		return online(ctx, addr)
	}
	key, err := node.LoadIdentity(home)
	if err != nil {
		return err
	}
	self, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return err
	}
	s, err := billing.Open(filepath.Join(home, node.APIKeysFile), self)
	if err != nil {
		return err
	}
	return offline(s)
}

// parseRate reads "60/min", "2/s", "100/h" or "0" as requests a minute.
func parseRate(s string) (int, error) {
	s = strings.TrimSpace(s)
	if s == "0" {
		return 0, nil
	}
	num, unit, ok := strings.Cut(s, "/")
	n, err := strconv.Atoi(num)
	if !ok || err != nil || n <= 0 {
		return 0, fmt.Errorf("%q: want N/min, N/s or N/h with N a positive integer, or 0", s)
	}
	switch unit {
	case "min", "m":
		return n, nil
	case "s", "sec":
		return n * 60, nil
	case "h", "hour":
		if n < 60 {
			return 0, fmt.Errorf("%q: under one a minute; the rate counts whole requests a minute", s)
		}
		return n / 60, nil
	}
	return 0, fmt.Errorf("%q: unit %q, want min, s or h", s, unit)
}

func rateString(perMin int) string {
	if perMin == 0 {
		return "no rate limit"
	}
	return fmt.Sprintf("%d requests/min", perMin)
}
