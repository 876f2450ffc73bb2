package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/client"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/node"
)

type networkRequest struct {
	model             string
	bootstrap, gating []string
	prompt            string
	maxTokens         int
	temperature       float32
	topK              int
	topP              float32
	seed              int64
	seedSet           bool
	stop              []string
	json              bool
}

// generateNetwork runs `neurod generate --network`: a light client streams
// a generation from a gating node.
func generateNetwork(cmd *cobra.Command, r networkRequest) error {
	if r.model == "" {
		return errors.New("flag --model: required with --network (the model's CID)")
	}
	mc, err := cid.Decode(r.model)
	if err != nil {
		return fmt.Errorf("flag --model %q: not a CID: %w", r.model, err)
	}
	if len(r.bootstrap) == 0 && len(r.gating) == 0 {
		return errors.New("flags --bootstrap and --gating: give at least one peer to join the network through")
	}
	ctx := cmd.Context()
	log, err := node.NewLogger(cmd.ErrOrStderr(), node.LogConfig{Level: "warn", Format: "text"})
	if err != nil {
		return err
	}
	opts := []client.Option{client.WithLogger(log)}
	if len(r.bootstrap) > 0 {
		opts = append(opts, client.WithBootstrap(r.bootstrap...))
	}
	if len(r.gating) > 0 {
		opts = append(opts, client.WithGatingNodes(r.gating...))
	}
	c, err := client.New(ctx, opts...)
	if err != nil {
		return err
	}
	defer c.Close()
	req := client.Request{Model: mc, Prompt: r.prompt, MaxTokens: r.maxTokens, Temperature: r.temperature,
		TopK: r.topK, TopP: r.topP, Stop: r.stop}
	if r.seedSet {
		s := uint64(r.seed)
		req.Seed = &s
	}
	start := time.Now()
	s, err := c.Generate(ctx, req)
	if err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	defer s.Close()
	out := generateOutput{Tokens: []int32{}, PromptTokens: s.PromptTokens(), PerTokenMs: []float64{}, Gating: s.Gating().String()}
	if !r.json {
		fmt.Fprint(cmd.OutOrStdout(), r.prompt)
	}
	for {
		t, err := s.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("generate: after %d tokens: %w", len(out.Tokens), err)
		}
		shown := streamToken(&out.Tokens, &out.PerTokenMs, t)
		if !r.json {
			fmt.Fprint(cmd.OutOrStdout(), shown)
		}
	}
	d := s.Done()
	out.Text = d.Text
	out.FinishReason = "stop"
	if d.Reason == neuropb.FinishReason_FINISH_REASON_LENGTH {
		out.FinishReason = "length"
	}
	out.TokensPerSecond = float64(len(out.Tokens)) / time.Since(start).Seconds()
	out.Stats = generationStats(d, out.PerTokenMs)
	if r.json {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	}
	fmt.Fprintln(cmd.OutOrStdout(), d.Rest)
	fmt.Fprintf(cmd.ErrOrStderr(), "%d tokens, %.1f tokens/s, from gating node %s\n", len(out.Tokens), out.TokensPerSecond, d.Gating)
	return nil
}

// streamToken applies a streamed token, or a rewind, to the tokens and
// latencies kept so far and returns what to print: the token's text, or
// a line saying the text shown after token Keep was withdrawn (the
// terminal cannot take it back).
func streamToken(tokens *[]int32, perTokenMs *[]float64, t client.Token) string {
	if t.Rewind != nil {
		*tokens = (*tokens)[:min(t.Rewind.Keep, len(*tokens))]
		*perTokenMs = (*perTokenMs)[:min(t.Rewind.Keep, len(*perTokenMs))]
		return fmt.Sprintf("\n[a wrong expert result was caught: generating again after token %d]\n", t.Rewind.Keep)
	}
	*tokens = append(*tokens, t.ID)
	*perTokenMs = append(*perTokenMs, float64(t.Latency.Microseconds())/1000)
	return t.Text
}
