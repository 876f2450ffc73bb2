package main

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
)

// walletOutput is the JSON of `neurod wallet new|show|import --json`.
type walletOutput struct {
	Account string `json:"account"`
	File    string `json:"file"`
	// From the running node in --home, when there is one.
	Balance    *uint64           `json:"balance,omitempty"`
	Escrowed   *uint64           `json:"escrowed,omitempty"`
	Nonce      *uint64           `json:"nonce,omitempty"`
	Allowances map[string]uint64 `json:"allowances,omitempty"`
}

func newWalletCmd(g *globalFlags) *cobra.Command {
	w := &walletFlags{g: g}
	cmd := &cobra.Command{
		Use:   "wallet",
		Short: "A ledger account of your own, to pay for requests",
		Long: `wallet keeps the key of a ledger account that pays for requests: an
Ed25519 key in <home>/wallet.key (or --wallet FILE), mode 0600, like a
node's identity. Its peer ID is the account.

'generate --network --wallet FILE' pays from it: the gating node quotes
the request, the wallet signs an escrow for its most, and the rest returns
when the request ends. 'wallet allow GATING AMOUNT' lets a gating node
draw on the account for the API keys it issues for it. Commands that need
the ledger go through the node running in --home, which relays what the
wallet signed; the node never holds the wallet's key.`,
	}
	newCmd, showCmd, importCmd, allowCmd := w.newCmd(), w.showCmd(), w.importCmd(), w.allowCmd()
	for _, c := range []*cobra.Command{newCmd, showCmd, importCmd, allowCmd} {
		c.Flags().StringVar(&w.file, "wallet", "", "the wallet's key file (default <home>/wallet.key)")
	}
	for _, c := range []*cobra.Command{newCmd, importCmd} {
		c.Flags().BoolVar(&w.force, "force", false, "replace an existing wallet file (kept as FILE.bak)")
	}
	for _, c := range []*cobra.Command{newCmd, showCmd, importCmd} {
		c.Flags().BoolVar(&w.asJSON, "json", false, `print {"account": ..., "file": ..., "balance": ...}`)
	}
	cmd.AddCommand(newCmd, showCmd, importCmd, allowCmd)
	return cmd
}

// walletFlags are the wallet subcommands' flags.
type walletFlags struct {
	g             *globalFlags
	file          string
	force, asJSON bool
}

// path is the wallet's key file: --wallet, or <home>/wallet.key.
func (w *walletFlags) path() (string, error) {
	if w.file != "" {
		return filepath.Abs(w.file)
	}
	home, err := w.g.homeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, node.WalletFile), nil
}

// load reads the wallet's key.
func (w *walletFlags) load() (string, crypto.PrivKey, error) {
	p, err := w.path()
	if err != nil {
		return "", nil, err
	}
	k, err := node.LoadKey(p)
	return p, k, err
}

// show prints the wallet at p, with its funds when the node in --home
// answers.
func (w *walletFlags) show(cmd *cobra.Command, p string, id peer.ID) error {
	out := walletOutput{Account: id.String(), File: p}
	if home, err := w.g.homeDir(); err == nil {
		if addr, err := node.ReadAPIAddr(home); err == nil {
			ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
			defer cancel()
			if info, err := node.FetchLedger(ctx, addr, id.String()); err == nil {
				out.Balance, out.Escrowed, out.Nonce, out.Allowances = &info.Balance, &info.Escrowed, &info.Nonce, info.Allowances
			}
		}
	}
	if w.asJSON {
		writeJSON(cmd.OutOrStdout(), out)
		return nil
	}
	fmt.Fprintf(cmd.OutOrStdout(), "account: %s\nkey: %s\n", out.Account, out.File)
	if out.Balance != nil {
		fmt.Fprintf(cmd.OutOrStdout(), "balance: %s NEURO (and %s in open escrows)\n", neuro(*out.Balance), neuro(*out.Escrowed))
		for sp, v := range out.Allowances {
			fmt.Fprintf(cmd.OutOrStdout(), "allows %s: %s NEURO\n", sp, neuro(v))
		}
	}
	return nil
}

// save makes k the wallet and shows it.
func (w *walletFlags) save(cmd *cobra.Command, k crypto.PrivKey) error {
	p, err := w.path()
	if err != nil {
		return err
	}
	id, err := node.SaveKey(p, k, w.force)
	if err != nil {
		return err
	}
	return w.show(cmd, p, id)
}

func (w *walletFlags) newCmd() *cobra.Command {
	return &cobra.Command{
		Use: "new [--wallet FILE] [--force]", Short: "Make a new wallet key", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, _, err := crypto.GenerateEd25519Key(nil)
			if err != nil {
				return err
			}
			return w.save(cmd, k)
		},
	}
}

func (w *walletFlags) showCmd() *cobra.Command {
	return &cobra.Command{
		Use: "show [--wallet FILE]", Short: "Print the wallet's account, and its funds through the running node", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, k, err := w.load()
			if err != nil {
				return err
			}
			id, err := peer.IDFromPrivateKey(k)
			if err != nil {
				return err
			}
			return w.show(cmd, p, id)
		},
	}
}

func (w *walletFlags) importCmd() *cobra.Command {
	return &cobra.Command{
		Use: "import KEYFILE [--wallet FILE] [--force]", Short: "Take an existing key (another wallet's, or a node's identity.key) as the wallet",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			k, err := node.LoadKey(args[0])
			if err != nil {
				return err
			}
			return w.save(cmd, k)
		},
	}
}

func (w *walletFlags) allowCmd() *cobra.Command {
	return &cobra.Command{
		Use: "allow GATING AMOUNT [--wallet FILE]", Short: "Let a gating node draw up to AMOUNT NEURO from the wallet into escrows (for API keys it issues for this account); 0 revokes",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			gp, err := peer.Decode(args[0])
			if err != nil {
				return fmt.Errorf("gating node %q: %w", args[0], err)
			}
			amount, err := parseNeuroOrZero(args[1])
			if err != nil {
				return err
			}
			_, k, err := w.load()
			if err != nil {
				return err
			}
			res, err := signAndRelay(cmd, w.g, k, func(tx *neuropb.LedgerTx) {
				tx.Body = &neuropb.LedgerTx_Allow{Allow: &neuropb.Allow{Spender: []byte(gp), Amount: amount}}
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "submitted allowance of %s NEURO to %s (nonce %d)\n", neuro(amount), gp, res.Nonce)
			return nil
		},
	}
}

// signAndRelay signs a transaction with key at the account's next nonce
// (from the ledger, through the node in --home) and has that node relay
// it.
func signAndRelay(cmd *cobra.Command, g *globalFlags, key crypto.PrivKey, body func(*neuropb.LedgerTx)) (*node.LedgerTxResult, error) {
	home, err := g.homeDir()
	if err != nil {
		return nil, err
	}
	addr, err := node.ReadAPIAddr(home)
	if err != nil {
		return nil, fmt.Errorf("%w: the wallet's transactions go through a running node", err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
	defer cancel()
	info, err := node.FetchLedger(ctx, addr, id.String())
	if err != nil {
		return nil, err
	}
	tx := &neuropb.LedgerTx{Nonce: info.Nonce + 1}
	body(tx)
	if err := ledger.SignTx(key, tx); err != nil {
		return nil, err
	}
	raw, err := ledger.EncodeTx(tx)
	if err != nil {
		return nil, err
	}
	return node.SubmitLedgerTx(ctx, addr, node.LedgerTxRequest{Type: "signed", Signed: raw})
}
