package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"image/color"
	"io"
	"maps"
	"math"
	"os"
	"slices"

	"github.com/spf13/cobra"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/neuro-p2p/neuro/testnet"
)

// maxSimReport bounds a report file sim plot reads (a 300-node run's
// report, samples and nodes included, is about 1 MB).
const maxSimReport = 64 << 20

func newSimPlotCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "plot REPORT.json...",
		Short: "Plot how sim's figures grow with the number of nodes",
		Long: `plot reads reports of testnet sim (its --json output, one run per file)
and draws how the figures grow with the number of nodes, one panel each:
time to healthy, gossip per node (the median of the samples), resident
memory per node, CPU per node and for the whole process (the median of the
samples), DHT provider lookups (p50 and p99, log scale), per-token latency
(p50 and p99, log scale), prompts answered and the fewest live providers of
an expert at the end. Each run is a point; the line goes through the
median of the runs at each size. Runs with Sybils are left out (they
measure something else).`,
		Example: `  for n in 50 100 200 300; do
    neurod testnet sim --nodes $n --churn 10/min --json > sim-$n.json
  done
  neurod testnet sim plot --out sim-scaling.png sim-*.json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var reps []*testnet.SimReport
			for _, a := range args {
				r, err := readSimReport(a)
				if err != nil {
					return err
				}
				if r.Sybils != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "sim plot: %s left out: a run with %d Sybils\n", a, r.Sybils.Count)
					continue
				}
				reps = append(reps, r)
			}
			if len(reps) == 0 {
				return errors.New("sim plot: no report without Sybils to plot")
			}
			if err := simPlot(reps, out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s (%d runs)\n", out, len(reps))
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "sim-scaling.png", "PNG file to write")
	return cmd
}

// readSimReport reads one report of testnet sim --json.
func readSimReport(path string) (*testnet.SimReport, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("sim plot: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSimReport+1))
	if err != nil {
		return nil, fmt.Errorf("sim plot: read %s: %w", path, err)
	}
	if len(b) > maxSimReport {
		return nil, fmt.Errorf("sim plot: %s is over %d MiB: not a report of testnet sim", path, maxSimReport>>20)
	}
	var r testnet.SimReport
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("sim plot: %s is not a report of testnet sim --json: %w", path, err)
	}
	if r.NodeCount <= 0 {
		return nil, fmt.Errorf("sim plot: %s: no node_count: not a report of testnet sim --json", path)
	}
	return &r, nil
}

// simPanel is one panel of the plot: its series, each a figure of a run.
type simPanel struct {
	title, unit string
	log         bool
	series      []simSeries
}

type simSeries struct {
	name string
	of   func(*testnet.SimReport) float64
	c    color.Color
}

// simPlot draws the reports' figures against their node counts into a
// PNG at path.
func simPlot(reps []*testnet.SimReport, path string) error {
	blue, orange, green := color.RGBA{31, 119, 180, 255}, color.RGBA{255, 127, 14, 255}, color.RGBA{44, 160, 44, 255}
	panels := []simPanel{
		{title: "Time to healthy", unit: "s", series: []simSeries{
			{"healthy after", func(r *testnet.SimReport) float64 { return r.HealthyS }, blue}}},
		{title: "Gossip per node (both ways)", unit: "KB/s", series: []simSeries{
			{"median of the samples", func(r *testnet.SimReport) float64 { return r.GossipBytesPerSP50 / 1000 }, blue}}},
		{title: "Resident memory per node", unit: "MB", series: []simSeries{
			{"process RSS / nodes", func(r *testnet.SimReport) float64 { return float64(r.RSSBytesPerNode) / 1e6 }, blue}}},
		{title: "CPU", unit: "cores / % of a core", series: []simSeries{
			{"whole process, cores (median)", simCores, blue},
			{"per node, % of a core", func(r *testnet.SimReport) float64 { return 100 * r.CPUPerNode }, orange}}},
		{title: "DHT provider lookups", unit: "ms", log: true, series: []simSeries{
			{"p50", func(r *testnet.SimReport) float64 { return r.DHT.Ms.P50 }, blue},
			{"p99", func(r *testnet.SimReport) float64 { return r.DHT.Ms.P99 }, orange}}},
		{title: "Per-token latency", unit: "ms", log: true, series: []simSeries{
			{"p50", func(r *testnet.SimReport) float64 { return r.TokenMs.P50 }, blue},
			{"p99", func(r *testnet.SimReport) float64 { return r.TokenMs.P99 }, orange}}},
		{title: "Prompts answered", unit: "%", series: []simSeries{
			{"answered / asked", func(r *testnet.SimReport) float64 {
				if r.Asked == 0 {
					return math.NaN()
				}
				return 100 * float64(r.Answered) / float64(r.Asked)
			}, green}}},
		{title: "Coverage at the end", unit: "live providers", series: []simSeries{
			{"fewest of an expert", func(r *testnet.SimReport) float64 { return float64(r.CoverageMin) }, blue},
			{"lowest while running", func(r *testnet.SimReport) float64 { return float64(r.CoverageLowest) }, orange}}},
	}
	const cols = 4
	rows := (len(panels) + cols - 1) / cols
	grid := make([][]*plot.Plot, rows)
	for i, pn := range panels {
		p, err := simPanelPlot(pn, reps)
		if err != nil {
			return fmt.Errorf("sim plot: %s: %w", pn.title, err)
		}
		grid[i/cols] = append(grid[i/cols], p)
	}
	if err := writePlots(path, grid, 11*vg.Centimeter, 9*vg.Centimeter); err != nil {
		return fmt.Errorf("sim plot: %w", err)
	}
	return nil
}

// simCores is the median of the samples' process cores (the joining's
// burst and the settling after are in the mean, not in the median).
func simCores(r *testnet.SimReport) float64 {
	var c []float64
	for _, s := range r.Samples {
		c = append(c, s.CPUCores)
	}
	if len(c) == 0 {
		return math.NaN()
	}
	slices.Sort(c)
	return testnet.Percentile(c, 0.5)
}

// simPanelPlot draws one panel: each run a point, a line through the
// median at each node count.
func simPanelPlot(pn simPanel, reps []*testnet.SimReport) (*plot.Plot, error) {
	p := plot.New()
	top := 0.0
	p.Title.Text = pn.title
	p.X.Label.Text = "nodes"
	p.Y.Label.Text = pn.unit
	for _, s := range pn.series {
		var pts plotter.XYs
		byN := map[int][]float64{}
		for _, r := range reps {
			y := s.of(r)
			if math.IsNaN(y) || (pn.log && y <= 0) {
				continue
			}
			pts = append(pts, plotter.XY{X: float64(r.NodeCount), Y: y})
			top = max(top, y)
			byN[r.NodeCount] = append(byN[r.NodeCount], y)
		}
		if len(pts) == 0 {
			continue
		}
		var line plotter.XYs
		for _, n := range slices.Sorted(maps.Keys(byN)) {
			ys := byN[n]
			slices.Sort(ys)
			line = append(line, plotter.XY{X: float64(n), Y: testnet.Percentile(ys, 0.5)})
		}
		l, err := plotter.NewLine(line)
		if err != nil {
			return nil, err
		}
		sc, err := plotter.NewScatter(pts)
		if err != nil {
			return nil, err
		}
		l.Color, sc.Color = s.c, s.c
		p.Add(l, sc)
		p.Legend.Add(s.name, l, sc)
	}
	p.Add(plotter.NewGrid())
	p.Legend.Top, p.Legend.Left = true, true
	p.X.Min = 0
	// Room above the highest point for the legend.
	if pn.log {
		p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
		p.Y.Max = max(p.Y.Max, 10*top)
	} else {
		p.Y.Min, p.Y.Max = 0, max(p.Y.Max, 1.4*top)
	}
	return p, nil
}
