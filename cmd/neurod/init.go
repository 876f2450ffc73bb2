package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/node"
)

func newInitCmd(g *globalFlags) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a node's home: identity key and commented config",
		Long: `init creates the node's home directory (--home, else $NEURO_HOME, else
~/.neuro) holding a new Ed25519 identity key (identity.key, mode 0600) and a
commented default config (config.toml).

It refuses to touch a home that already has an identity or a config. With
--force it makes a new identity and config and keeps the old files as
*.bak-<time>.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			home, err := g.homeDir()
			if err != nil {
				return err
			}
			res, err := node.Init(home, force)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			for _, b := range res.Backups {
				fmt.Fprintf(out, "kept old file as %s\n", b)
			}
			fmt.Fprintf(out, "initialized %s\npeer ID: %s\nconfig:  %s\n",
				home, res.PeerID, filepath.Join(home, node.ConfigFile))
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing identity and config (old files are kept as backups)")
	return cmd
}
