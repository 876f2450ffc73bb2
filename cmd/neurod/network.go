package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
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
	// wallet pays (a key file); dryRun only asks for a quote.
	wallet string
	dryRun bool
	// concurrency asks the prompt that many times at once through the one
	// client (with json: one generation per line).
	concurrency int
	// progress writes a JSON line to stderr as each token arrives.
	progress bool
}

// progressLine is what --progress writes to stderr for each token: how
// many the generation holds now, and whether this one rewound earlier
// ones (speculative decoding's correction).
type progressLine struct {
	Tokens int  `json:"tokens"`
	Rewind bool `json:"rewind"`
}

// quoteOutput is the JSON of `generate --network --dry-run`.
type quoteOutput struct {
	Gating          string  `json:"gating"`
	PricePerMFLOP   uint64  `json:"price_per_mflop"`
	FLOPsPerToken   uint64  `json:"flops_per_token"`
	CostPer1kTokens float64 `json:"cost_per_1k_tokens"`
	MaxCost         float64 `json:"max_cost"`
	MaxCostBase     uint64  `json:"max_cost_base_units"`
	PromptTokens    int     `json:"prompt_tokens"`
	MaxTokens       int     `json:"max_tokens"`
	PaymentRequired bool    `json:"payment_required"`
	// Account and Balance: the paying wallet's (with --wallet).
	Account string   `json:"account,omitempty"`
	Balance *float64 `json:"balance,omitempty"`
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
	if r.dryRun {
		return printQuote(cmd, c, req, r.wallet != "", r.json)
	}
	if r.concurrency > 1 {
		return concurrentGenerations(cmd, c, req, r.concurrency)
	}
	return streamGeneration(cmd, c, req, r.json, r.progress)
}

// concurrentGenerations asks req n times at once through c and prints
// each generation's JSON on a line of its own, in order.
func concurrentGenerations(cmd *cobra.Command, c *client.Client, req client.Request, n int) error {
	gens := make([]*testnet.Generation, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			gens[i], _, errs[i] = collectGeneration(cmd.Context(), c, req, nil, nil)
			if errs[i] != nil {
				errs[i] = fmt.Errorf("request %d of %d: %w", i+1, n, errs[i])
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	enc := json.NewEncoder(cmd.OutOrStdout())
	for _, g := range gens {
		if err := enc.Encode(g); err != nil {
			return err
		}
	}
	return nil
}

// printQuote prints what req would cost, running nothing.
func printQuote(cmd *cobra.Command, c *client.Client, req client.Request, wallet, asJSON bool) error {
	q, err := c.Quote(cmd.Context(), req)
	if err != nil {
		return err
	}
	out := quoteOutput{Gating: q.Gating.String(), PricePerMFLOP: q.PricePerMFLOP, FLOPsPerToken: q.FLOPsPerToken,
		CostPer1kTokens: float64(q.CostPer1kTokens) / 1e6, MaxCost: float64(q.MaxCost) / 1e6, MaxCostBase: q.MaxCost,
		PromptTokens: q.PromptTokens, MaxTokens: q.MaxTokens, PaymentRequired: q.PaymentRequired}
	if wallet {
		b := float64(q.Balance) / 1e6
		out.Account, out.Balance = c.ID().String(), &b
	}
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "gating node %s: %s NEURO per 1,000 tokens (%s MFLOP of expert work a token at %d base units per MFLOP)\n"+
		"this request: %d prompt tokens + up to %d new: at most %s NEURO (with re-executions for validation); payment required: %v\n",
		out.Gating, neuro(q.CostPer1kTokens), strconv.FormatFloat(float64(q.FLOPsPerToken)/1e6, 'f', -1, 64), q.PricePerMFLOP, q.PromptTokens, q.MaxTokens, neuro(q.MaxCost), q.PaymentRequired)
	if wallet {
		fmt.Fprintf(cmd.OutOrStdout(), "wallet %s holds %s NEURO\n", out.Account, neuro(q.Balance))
	}
	return nil
}

// client joins the network as a light client.
func (r networkRequest) client(cmd *cobra.Command) (*client.Client, error) {
	log, err := node.NewLogger(cmd.ErrOrStderr(), node.LogConfig{Level: "warn", Format: "text"})
	if err != nil {
		return nil, err
	}
	opts := []client.Option{client.WithLogger(log)}
	if r.wallet != "" {
		k, err := node.LoadKey(r.wallet)
		if err != nil {
			return nil, fmt.Errorf("flag --wallet: %w", err)
		}
		opts = append(opts, client.WithWallet(k))
	}
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
func streamGeneration(cmd *cobra.Command, c *client.Client, req client.Request, asJSON, progress bool) error {
	var show func(string)
	if !asJSON {
		fmt.Fprint(cmd.OutOrStdout(), req.Prompt)
		show = func(text string) { fmt.Fprint(cmd.OutOrStdout(), text) }
	}
	var each func(progressLine)
	if progress {
		enc := json.NewEncoder(cmd.ErrOrStderr())
		each = func(l progressLine) { _ = enc.Encode(l) }
	}
	out, d, err := collectGeneration(cmd.Context(), c, req, show, each)
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	}
	fmt.Fprintln(cmd.OutOrStdout(), d.Rest)
	fmt.Fprintf(cmd.ErrOrStderr(), "%d tokens, %.1f tokens/s, from gating node %s\n", len(out.Tokens), out.TokensPerSecond, d.Gating)
	if d.Escrow != 0 {
		fmt.Fprintf(cmd.ErrOrStderr(), "paid %s NEURO from escrow %d for %s MFLOP of expert work\n", neuro(d.Cost), d.Escrow,
			strconv.FormatFloat(float64(d.FLOPs)/1e6, 'f', -1, 64))
	}
	return nil
}

// collectGeneration runs one generation through c, showing each token's
// text as it comes when show is set, and telling progress of each.
func collectGeneration(ctx context.Context, c *client.Client, req client.Request, show func(string), progress func(progressLine)) (*testnet.Generation, *client.Done, error) {
	start := time.Now()
	s, err := c.Generate(ctx, req)
	if err != nil {
		return nil, nil, fmt.Errorf("generate: %w", err)
	}
	defer s.Close()
	out := &testnet.Generation{Tokens: []int32{}, PromptTokens: s.PromptTokens(), PerTokenMs: []float64{}, Gating: s.Gating().String()}
	for {
		t, err := s.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, nil, fmt.Errorf("generate: after %d tokens: %w", len(out.Tokens), err)
		}
		shown := testnet.ApplyToken(&out.Tokens, &out.PerTokenMs, &out.PerTokenComputeMs, t)
		if show != nil {
			show(shown)
		}
		if progress != nil {
			progress(progressLine{Tokens: len(out.Tokens), Rewind: t.Rewind != nil})
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
	out.Escrow, out.Cost, out.CostBaseUnits = d.Escrow, float64(d.Cost)/1e6, d.Cost
	return out, d, nil
}
