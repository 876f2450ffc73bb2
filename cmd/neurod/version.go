package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/p2p"
)

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print neurod's version, build, ggml's CPU features, the GPU backends it loads and the devices it sees",
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
			printDevices(out)
			return nil
		},
	}
}

// deviceUsage is the help of every --device flag.
const deviceUsage = "where to compute: cpu, vulkan:N, cuda:N (GPU backends built by 'make vulkan' / 'make cuda'), or auto (the fastest there is)"

// printDevices lists the GPU backends neurod finds and every device ggml
// sees, as `neurod version` prints them.
func printDevices(out io.Writer) {
	loaded, err := ggml.LoadBackends()
	fmt.Fprintf(out, "backends: CPU (built in)")
	for _, p := range loaded {
		fmt.Fprintf(out, ", %s", p)
	}
	fmt.Fprintln(out)
	if err != nil {
		fmt.Fprintf(out, "backend errors: %v\n", err)
	}
	if len(loaded) == 0 {
		fmt.Fprintf(out, "  (no GPU backend in %s: build one with 'make vulkan' or 'make cuda')\n", strings.Join(ggml.BackendDirs(), ", "))
	}
	fmt.Fprintln(out, "devices:")
	shown := map[string]bool{}
	for _, d := range ggml.Devices() {
		soft := ""
		if ggml.Software(d) {
			soft = " (software: Mesa's lavapipe or the like, slower than the CPU backend)"
		}
		fmt.Fprintf(out, "  %-10s %-7s %-5s %s, %.1f of %.1f GiB free%s\n", d.Spec(), d.Backend, d.Type, d.Description,
			float64(d.MemoryFree)/(1<<30), float64(d.MemoryTotal)/(1<<30), soft)
		if d.Backend == "Vulkan" {
			shown[d.Description] = true
		}
	}
	// Devices the Vulkan backend leaves out by default (lavapipe, a
	// Vulkan device on the CPU) and how to use them.
	for _, d := range ggml.VulkanDevices() {
		if !shown[d.Name] {
			fmt.Fprintf(out, "  (Vulkan device %d, %s, %s: shown as vulkan:N with GGML_VK_VISIBLE_DEVICES=%d)\n", d.Index, d.Name, d.Type, d.Index)
		}
	}
}
