package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/node"
)

// idOutput is the JSON of `neurod id --json`.
type idOutput struct {
	PeerID string   `json:"peer_id"`
	Addrs  []string `json:"addrs"`
	// Running is true when the addresses come from the running node
	// rather than from the config's listen addresses.
	Running bool `json:"running"`
}

func newIDCmd(g *globalFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "id",
		Short: "Print the node's peer ID and addresses",
		Long: `id prints the peer ID of the node's identity and its addresses: those of the
running node when one runs in the home, else the configured listen addresses.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			home, err := g.homeDir()
			if err != nil {
				return err
			}
			key, err := node.LoadIdentity(home)
			if err != nil {
				return err
			}
			id, err := peer.IDFromPrivateKey(key)
			if err != nil {
				return fmt.Errorf("peer id: %w", err)
			}
			out := idOutput{PeerID: id.String(), Addrs: []string{}}
			if st, ok := runningStatus(cmd.Context(), home); ok && st.PeerID == out.PeerID {
				out.Addrs, out.Running = st.Addrs, true
			} else {
				cfg, err := node.LoadConfig(filepath.Join(home, node.ConfigFile))
				if err != nil {
					return err
				}
				out.Addrs = append(out.Addrs, cfg.P2P.Listen...)
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "peer ID: %s\n", out.PeerID)
			for _, a := range out.Addrs {
				fmt.Fprintf(cmd.OutOrStdout(), "address: %s/p2p/%s\n", a, out.PeerID)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, `print {"peer_id": ..., "addrs": [...]}`)
	return cmd
}

// runningStatus asks the node running in home, if any, for its status.
func runningStatus(ctx context.Context, home string) (node.Status, bool) {
	addr, err := node.ReadAPIAddr(home)
	if err != nil {
		return node.Status{}, false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := node.FetchStatus(ctx, addr)
	return st, err == nil
}
