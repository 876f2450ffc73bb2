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
	"github.com/neuro-p2p/neuro/testnet"
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
	c, err := r.client(cmd)
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
	return streamGeneration(cmd, c, req, r.json)
}

// client joins the network as a light client.
func (r networkRequest) client(cmd *cobra.Command) (*client.Client, error) {
	log, err := node.NewLogger(cmd.ErrOrStderr(), node.LogConfig{Level: "warn", Format: "text"})
	if err != nil {
		return nil, err
	}
	opts := []client.Option{client.WithLogger(log)}
	if len(r.bootstrap) > 0 {
		opts = append(opts, client.WithBootstrap(r.bootstrap...))
	}
	if len(r.gating) > 0 {
		opts = append(opts, client.WithGatingNodes(r.gating...))
	}
	return client.New(cmd.Context(), opts...)
}

// streamGeneration prints a generation as it streams (or its JSON at the
// end).
func streamGeneration(cmd *cobra.Command, c *client.Client, req client.Request, asJSON bool) error {
	start := time.Now()
	s, err := c.Generate(cmd.Context(), req)
	if err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	defer s.Close()
	out := testnet.Generation{Tokens: []int32{}, PromptTokens: s.PromptTokens(), PerTokenMs: []float64{}, Gating: s.Gating().String()}
	if !asJSON {
		fmt.Fprint(cmd.OutOrStdout(), req.Prompt)
	}
	for {
		t, err := s.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("generate: after %d tokens: %w", len(out.Tokens), err)
		}
		shown := testnet.ApplyToken(&out.Tokens, &out.PerTokenMs, t)
		if !asJSON {
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
	out.Stats = testnet.GenerationStats(d, out.PerTokenMs)
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	}
	fmt.Fprintln(cmd.OutOrStdout(), d.Rest)
	fmt.Fprintf(cmd.ErrOrStderr(), "%d tokens, %.1f tokens/s, from gating node %s\n", len(out.Tokens), out.TokensPerSecond, d.Gating)
	return nil
}
