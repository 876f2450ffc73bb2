package testnet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// SpansShape is the spans runs' model for layers MoE layers: Qwen3-30B-A3B's
// proportions scaled down so that a gating node and five homes of it run
// on a small machine — experts 3/8 as wide as the embedding, 2 of 32
// used (Qwen3: 8 of 128), heads twice as wide as embd/heads, 8:1
// grouped-query attention.
func SpansShape(layers int) model.Params {
	return model.Params{Layers: layers, Experts: 32, ExpertsUsed: 2, Embd: 256, FF: 96, Heads: 8, KVHeads: 1, HeadSize: 64,
		Vocab: 4096, Context: 512, RopeFreqBase: 1e6, RMSEps: 1e-6}
}

// spanRanges cuts layers into homes runs of consecutive layers, as
// testnet --spans takes them ("0-11,12-23,...").
func spanRanges(layers, homes int) []string {
	var out []string
	for h := range homes {
		a, b := h*layers/homes, (h+1)*layers/homes-1
		out = append(out, fmt.Sprintf("%d-%d", a, b))
	}
	return out
}

// spans runs the layer-span rows: a model of SpansLayers MoE layers
// (SpansShape, qwen3moe, q8_0) on the netns testnet with SpansHomes expert
// homes SpansRTT from the gating node, each home serving one run of
// layers/homes consecutive layers and all their experts. Layer by layer
// (the gating node calls every MoE layer's experts: one round trip a
// layer), through the spans (one a span), and through the spans with a
// spare provider of the first span whose sibling in use is SIGKILLed
// mid-generation: the recovery's time and the replay's bytes and time;
// and through the spans with speculative decoding by prompt lookup (the
// drafted tokens kept make fewer passes, each one round trip a span).
// Every run gives llama.cpp's tokens.
func (b *Bench) spans(ctx context.Context) error {
	if b.SpansRTT <= 0 {
		return nil
	}
	layers, homes := max(b.SpansLayers, 2), max(b.SpansHomes, 1)
	rtt := b.SpansRTT
	label := fmt.Sprintf("spans: %d layers, %d expert homes, netns %s", layers, homes, FmtRTT(rtt))
	ranges := spanRanges(layers, homes)
	runs := []struct {
		name  string
		spans []string
		kill  bool
		lbl   bool
		spec  string
	}{
		{"layer by layer", ranges, false, true, ""},
		{fmt.Sprintf("through %d spans of %d layers", homes, layers/homes), ranges, false, false, ""},
		{"through the spans, the first span's node in use killed mid-generation (a spare serves it too)", append(slices.Clone(ranges), ranges[0]), true, false, ""},
		{"through the spans, with speculative decoding (prompt lookup)", ranges, false, false, "ngram"},
	}
	if b.NetnsErr != nil {
		for _, run := range runs {
			b.rep.Rows = append(b.rep.Rows, BenchRow{Name: label + ", " + run.name, Kind: "spans", RTTMs: ms(rtt), Skipped: b.NetnsErr.Error()})
		}
		return nil
	}
	dir := filepath.Join(b.rep.Dir, "spans")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "spans.gguf")
	b.Log.Info("bench: spans model", "layers", layers, "path", path)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := model.GenerateArch(f, "qwen3moe", SpansShape(layers), model.Q8_0, 48); err != nil {
		f.Close()
		return fmt.Errorf("spans model: %w", err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	ref, err := b.OnMachine(ctx, path, false, BenchPrompt, b.MaxTokens)
	if err != nil {
		return fmt.Errorf("spans: llama.cpp: %w", err)
	}
	var layerByLayer float64
	for _, run := range runs {
		name := label + ", " + run.name
		links := make([]netns.Link, len(run.spans)+1)
		nats := make([]netns.NAT, len(run.spans)+1)
		for i := range links {
			links[i], nats[i] = netns.Link{RTT: rtt}, netns.Cone
		}
		t := &Netns{Publics: 4, NATs: nats, Links: links, Spans: strings.Join(run.spans, ",")}
		if run.kill {
			t.KillNodes, t.KillAfter = 1, b.MaxTokens/2
		}
		b.Log.Info("bench: "+name, "rtt", rtt, "spans", t.Spans)
		rep, err := b.runChecked(ctx, name, &Scenario{Topology: t, Model: path, Prompt: BenchPrompt, LayerByLayer: run.lbl, Speculate: run.spec}, ref.Tokens)
		if err != nil {
			return err
		}
		row := BenchRow{Name: name, Kind: "spans", RTTMs: ms(rtt), TokensPerSecond: rep.TokensPerSecond, Layers: layers, Speculate: run.spec}
		row.decodeLatency(rep.PerTokenMs)
		if st := rep.Stats; st != nil {
			row.RoundTripsPerToken, row.SpansPerToken, row.AcceptedPerPass = st.RoundTripsPerToken, st.SpansPerToken, st.AcceptedPerPass
			row.SpanFailovers, row.SpanReplayBytes, row.SpanReplayMs, row.SpanRecoveryMs = st.SpanFailovers, st.SpanReplayBytes, st.SpanReplayMs, st.SpanRecoveryMs
			row.SpanHedges = st.SpanHedges
		}
		if run.kill {
			row.KilledAfter = rep.KilledAfter
			if rep.KilledAfter < len(rep.PerTokenMs) {
				row.KillTokenMs = rep.PerTokenMs[rep.KilledAfter]
			}
		}
		if run.lbl {
			layerByLayer = row.PerTokenP50Ms
		} else if layerByLayer > 0 {
			row.LayerByLayerRatio = row.PerTokenP50Ms / layerByLayer
		}
		if run.kill && row.SpanFailovers == 0 {
			return fmt.Errorf("%s: no failover after the kill", name)
		}
		b.rep.Rows = append(b.rep.Rows, row)
		b.Log.Info("bench run done", "run", name, "per_token_p50_ms", row.PerTokenP50Ms, "round_trips_per_token", row.RoundTripsPerToken,
			"layer_by_layer_ratio", row.LayerByLayerRatio)
	}
	return nil
}
