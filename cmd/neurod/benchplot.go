package main

import (
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/neuro-p2p/neuro/testnet"
)

// benchPlot draws the netns runs against RTT: per-token latency (p50, p90
// and the floor layers × RTT + compute) and tokens per second (with the
// most the floor allows), the runs without a network as flat references.
func benchPlot(rep *testnet.BenchReport, path string) error {
	lat, thr := plot.New(), plot.New()
	lat.Title.Text = "Per-token latency against RTT"
	lat.X.Label.Text = "RTT between gating and expert node (ms)"
	lat.Y.Label.Text = "ms per token"
	thr.Title.Text = "Tokens per second against RTT (log scale)"
	thr.X.Label.Text = lat.X.Label.Text
	thr.Y.Label.Text = "tokens/s"
	maxRTT, err := plotNetns(rep, lat, thr)
	if err != nil {
		return fmt.Errorf("bench plot: %w", err)
	}
	if err := plotReferences(rep, lat, thr, maxRTT); err != nil {
		return fmt.Errorf("bench plot: %w", err)
	}
	for _, p := range []*plot.Plot{lat, thr} {
		p.Legend.Top, p.Legend.Left = true, true
		p.Add(plotter.NewGrid())
	}
	lat.Y.Min = 0
	// Throughput spans orders of magnitude between the runs on one
	// machine and those across a network: a log scale.
	thr.Y.Scale, thr.Y.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
	thr.Legend.Left = false
	if err := writePlots(path, [][]*plot.Plot{{lat, thr}}, 13*vg.Centimeter, 11*vg.Centimeter); err != nil {
		return fmt.Errorf("bench plot: %w", err)
	}
	return nil
}

// plotNetns draws the netns runs' series; it returns the largest RTT.
func plotNetns(rep *testnet.BenchReport, lat, thr *plot.Plot) (float64, error) {
	var p50, p90, floor, tps, tpsFloor plotter.XYs
	maxRTT := 0.0
	for _, r := range rep.Rows {
		if r.Skipped != "" || r.Kind != "netns" {
			continue
		}
		p50 = append(p50, plotter.XY{X: r.RTTMs, Y: r.PerTokenP50Ms})
		p90 = append(p90, plotter.XY{X: r.RTTMs, Y: r.PerTokenP90Ms})
		floor = append(floor, plotter.XY{X: r.RTTMs, Y: r.FloorMs})
		tps = append(tps, plotter.XY{X: r.RTTMs, Y: r.TokensPerSecond})
		if r.FloorMs > 0 {
			tpsFloor = append(tpsFloor, plotter.XY{X: r.RTTMs, Y: 1000 / r.FloorMs})
		}
		maxRTT = max(maxRTT, r.RTTMs)
	}
	blue, orange, grey := color.RGBA{31, 119, 180, 255}, color.RGBA{255, 127, 14, 255}, color.RGBA{90, 90, 90, 255}
	for _, s := range []struct {
		p      *plot.Plot
		name   string
		xys    plotter.XYs
		c      color.Color
		dashed bool
	}{
		{lat, "netns p50", p50, blue, false},
		{lat, "netns p90", p90, orange, false},
		{lat, fmt.Sprintf("floor: %d layers x RTT + compute", rep.Layers), floor, grey, true},
		{thr, "netns", tps, blue, false},
		{thr, "most the floor allows", tpsFloor, grey, true},
	} {
		if err := series(s.p, s.name, s.xys, s.c, s.dashed); err != nil {
			return 0, err
		}
	}
	return maxRTT, nil
}

// series adds a line with points, solid or dashed, and its legend.
func series(p *plot.Plot, name string, xys plotter.XYs, c color.Color, dashed bool) error {
	if len(xys) == 0 {
		return nil
	}
	l, s, err := plotter.NewLinePoints(xys)
	if err != nil {
		return err
	}
	l.Color, s.Color = c, c
	if dashed {
		l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
	}
	p.Add(l, s)
	p.Legend.Add(name, l, s)
	return nil
}

// plotReferences draws the runs on one machine as flat references.
func plotReferences(rep *testnet.BenchReport, lat, thr *plot.Plot, maxRTT float64) error {
	for i, r := range rep.Rows {
		if r.Skipped != "" || r.Kind == "netns" || r.Kind == "placement" || r.Kind == "concurrent" || r.Kind == "speculate" {
			continue
		}
		c := color.RGBA{uint8(40 + 60*i), uint8(160 - 30*i), uint8(60 + 40*i), 255}
		for _, x := range []struct {
			p *plot.Plot
			y float64
		}{{lat, r.PerTokenP50Ms}, {thr, r.TokensPerSecond}} {
			l, err := plotter.NewLine(plotter.XYs{{X: 0, Y: x.y}, {X: max(maxRTT, 1), Y: x.y}})
			if err != nil {
				return err
			}
			l.Color = c
			l.Dashes = []vg.Length{vg.Points(1), vg.Points(3)}
			x.p.Add(l)
			x.p.Legend.Add(r.Name+" (no network)", l)
		}
	}
	return nil
}

// writePlots draws grid's plots, row by row, into a PNG at path, each
// plot w × h.
func writePlots(path string, grid [][]*plot.Plot, w, h vg.Length) error {
	cols := 0
	for _, row := range grid {
		cols = max(cols, len(row))
	}
	img := vgimg.New(vg.Length(cols)*w, vg.Length(len(grid))*h)
	tiles := draw.Tiles{Rows: len(grid), Cols: cols, PadX: vg.Centimeter, PadY: vg.Centimeter,
		PadTop: vg.Millimeter * 3, PadBottom: vg.Millimeter * 3, PadLeft: vg.Millimeter * 3, PadRight: vg.Millimeter * 3}
	canvases := plot.Align(grid, tiles, draw.New(img))
	for r, row := range grid {
		for c, p := range row {
			p.Draw(canvases[r][c])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
