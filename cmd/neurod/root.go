package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/node"
)

// globalFlags are the flags every command has.
type globalFlags struct {
	home      string
	logLevel  string
	logFormat string
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "neurod",
		Short: "neurod runs a node of the neuro peer-to-peer MoE inference network",
		Long: `neurod runs a node of neuro, a peer-to-peer network that runs large
Mixture-of-Experts language models on many ordinary machines at once.

Start with 'neurod init', then 'neurod run'. 'neurod testnet' starts a
whole local network of real neurod processes on 127.0.0.1.

Settings come from <home>/config.toml, overridden by NEURO_* environment
variables, overridden by flags. The home is --home, else $NEURO_HOME, else
~/.neuro.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&g.home, "home", "", "node data directory (default $NEURO_HOME or ~/.neuro)")
	pf.StringVar(&g.logLevel, "log-level", "", "log level: debug, info, warn or error (overrides log.level)")
	pf.StringVar(&g.logFormat, "log-format", "", "log format: text or json (overrides log.format)")
	root.AddCommand(
		newInitCmd(g),
		newRunCmd(g),
		newStatusCmd(g),
		newIDCmd(g),
		newTestnetCmd(g),
		newBenchCmd(g),
		newModelCmd(g),
		newGenerateCmd(),
		newLedgerCmd(g),
		newWalletCmd(g),
		newAPIKeyCmd(g),
		newVersionCmd(),
	)
	return root
}

// homeDir resolves --home, $NEURO_HOME or ~/.neuro to an absolute path.
func (g *globalFlags) homeDir() (string, error) {
	h := g.home
	if h == "" {
		var err error
		if h, err = node.DefaultHome(); err != nil {
			return "", err
		}
	}
	abs, err := filepath.Abs(h)
	if err != nil {
		return "", fmt.Errorf("--home %s: %w", h, err)
	}
	return abs, nil
}

// flagKey ties a command-line flag to the config key it overrides.
type flagKey struct {
	flag string
	key  string
	set  func(cfg *node.Config, f *pflag.FlagSet) error
}

// loadConfig reads <home>/config.toml, applies NEURO_* variables and then
// the flags that were set, and validates the result. A bad value is
// reported against the flag, variable or file it came from.
func loadConfig(home string, fs *pflag.FlagSet, g *globalFlags, flags []flagKey) (node.Config, error) {
	file := filepath.Join(home, node.ConfigFile)
	cfg, err := node.LoadConfig(file)
	if err != nil {
		return cfg, err
	}
	src := node.Sources{}
	if err := node.ApplyEnv(&cfg, os.LookupEnv, src); err != nil {
		return cfg, err
	}
	flags = append(flags,
		flagKey{"log-level", "log.level", func(c *node.Config, _ *pflag.FlagSet) error { c.Log.Level = g.logLevel; return nil }},
		flagKey{"log-format", "log.format", func(c *node.Config, _ *pflag.FlagSet) error { c.Log.Format = g.logFormat; return nil }},
	)
	for _, f := range flags {
		if !fs.Changed(f.flag) {
			continue
		}
		if err := f.set(&cfg, fs); err != nil {
			return cfg, fmt.Errorf("flag --%s: %w", f.flag, err)
		}
		src[f.key] = "flag --" + f.flag
	}
	if err := cfg.Validate(); err != nil {
		return cfg, src.Describe(err, file)
	}
	return cfg, nil
}
