package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/neuro-p2p/neuro/ggml"
)

// generateOutput is the JSON of `neurod generate --json`.
type generateOutput struct {
	Tokens       []int32 `json:"tokens"`
	Text         string  `json:"text"`
	PromptTokens int     `json:"prompt_tokens"`
	// TokensPerSecond counts generated tokens over the generation's wall
	// time (prompt included).
	TokensPerSecond float64 `json:"tokens_per_second"`
}

func newGenerateCmd() *cobra.Command {
	var (
		local, prompt string
		maxTokens     int
		threads       int
		ctxSize       int
		asJSON        bool
	)
	cmd := &cobra.Command{
		Use:   "generate --local MODEL.gguf --prompt TEXT [--max-tokens N] [--json]",
		Short: "Generate text greedily from a prompt",
		Long: `generate runs a prompt through a model and prints the continuation, picking
the most likely token at each step (greedy decoding).

--local runs the whole GGUF through llama.cpp on this machine: the
single-machine mode, and the reference every distributed computation is
checked against.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if local == "" {
				return errors.New("flag --local: required (the model file)")
			}
			if prompt == "" {
				return errors.New("flag --prompt: required and non-empty")
			}
			if maxTokens < 1 {
				return fmt.Errorf("flag --max-tokens %d: must be at least 1", maxTokens)
			}
			l, err := ggml.LoadLlama(local)
			if err != nil {
				return err
			}
			defer l.Close()
			start := time.Now()
			g, err := l.GenerateGreedy(prompt, maxTokens, ggml.ContextOptions{Context: ctxSize, Threads: threads}, false)
			if err != nil {
				return fmt.Errorf("generate: %w", err)
			}
			out := generateOutput{Tokens: g.Tokens, Text: g.Text, PromptTokens: len(g.Prompt),
				TokensPerSecond: float64(len(g.Tokens)) / time.Since(start).Seconds()}
			if out.Tokens == nil {
				out.Tokens = []int32{}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				return enc.Encode(out)
			}
			fmt.Fprintln(cmd.OutOrStdout(), prompt+g.Text)
			fmt.Fprintf(cmd.ErrOrStderr(), "%d tokens, %.1f tokens/s\n", len(g.Tokens), out.TokensPerSecond)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&local, "local", "", "run this GGUF model through llama.cpp on this machine")
	f.StringVar(&prompt, "prompt", "", "the prompt")
	f.IntVar(&maxTokens, "max-tokens", 32, "most tokens to generate")
	f.IntVar(&threads, "threads", 0, "compute threads (default: all cores)")
	f.IntVar(&ctxSize, "context", 0, "context size in tokens (default: the model's, at most 4096)")
	f.BoolVar(&asJSON, "json", false, `print {"tokens": [...], "text": ...}`)
	return cmd
}
