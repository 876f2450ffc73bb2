package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/p2p"
)

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print neurod's version, build and ggml's CPU features",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "neurod %s\n", p2p.Version)
			fmt.Fprintf(out, "go: %s %s/%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH)
			if bi, ok := debug.ReadBuildInfo(); ok {
				for _, dep := range bi.Deps {
					switch dep.Path {
					case "github.com/libp2p/go-libp2p", "github.com/libp2p/go-libp2p-kad-dht", "github.com/libp2p/go-libp2p-pubsub":
						fmt.Fprintf(out, "%s %s\n", dep.Path, dep.Version)
					}
				}
			}
			fmt.Fprintf(out, "ggml: %s\n", ggml.SystemInfo())
			return nil
		},
	}
}
