package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/testnet"
)

// generateLong is `neurod generate --help`.
const generateLong = `generate runs a prompt through a model and prints the continuation, picking
the most likely token at each step (greedy decoding).

--local runs the whole GGUF through llama.cpp on this machine: the
single-machine mode, and the reference every distributed computation is
checked against.

--split runs the distributed forward pass in one process: the gating
compute (embeddings, attention, router, output head) and the experts, each
loaded from its CID-verified shard. MODEL is a GGUF file (split into a
temporary directory first) or a directory written by 'neurod model split'.
Its tokens equal --local's.

--device chooses where --local and --split compute: cpu (the default),
vulkan:N or cuda:N (a GPU backend that 'make vulkan' or 'make cuda' built),
or auto (the fastest device there is). A device that is asked for and
missing is an error, never a silent fall back to the CPU.

--network asks the network: it joins as a light client through the
--bootstrap peers, finds a gating node of the model (--model CID) in the
DHT, and streams the tokens as the experts on other nodes compute them.
Only --network samples (--temperature, --top-k, --top-p, --seed, --stop);
at temperature 0, the default, its tokens equal --local's. --wallet FILE
pays from that wallet's ledger account: the gating node quotes the
request, the wallet signs an escrow for its most, and what the experts'
work did not use returns at once; the cost is printed at the end.
--dry-run prints the quote (price per 1,000 tokens, the request's most)
and runs nothing.`

// generateFlags are the flags of `neurod generate`.
type generateFlags struct {
	local, split string
	prompt       string
	maxTokens    int
	threads      int
	ctxSize      int
	ubatch       int
	asJSON       bool
	network      bool
	concurrency  int
	progress     bool
	modelCID     string
	bootstrap    []string
	gatingAddrs  []string
	temperature  float32
	topK         int
	topP         float32
	seed         int64
	stop         []string
	device       string
	wallet       string
	dryRun       bool
}

func newGenerateCmd() *cobra.Command {
	var gf generateFlags
	cmd := &cobra.Command{
		Use:   "generate (--local MODEL|--split MODEL|--network --model CID) --prompt TEXT [--max-tokens N] [--json]",
		Short: "Generate text from a prompt, on this machine or through the network",
		Long:  generateLong,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := gf.validate(cmd.Flags()); err != nil {
				return err
			}
			if gf.network {
				return generateNetwork(cmd, networkRequest{model: gf.modelCID, bootstrap: gf.bootstrap, gating: gf.gatingAddrs,
					prompt: gf.prompt, maxTokens: gf.maxTokens, temperature: gf.temperature, topK: gf.topK, topP: gf.topP,
					seed: gf.seed, seedSet: cmd.Flags().Changed("seed"), stop: gf.stop, json: gf.asJSON, wallet: gf.wallet, dryRun: gf.dryRun,
					concurrency: gf.concurrency, progress: gf.progress})
			}
			dev, err := ggml.SelectDevice(gf.device)
			if err != nil {
				return fmt.Errorf("flag --device: %w", err)
			}
			out, err := generateOnMachine(cmd.Context(), dev, gf.local, gf.split, gf.prompt, gf.maxTokens,
				ggml.ContextOptions{Context: gf.ctxSize, Threads: gf.threads, UBatch: gf.ubatch})
			if err != nil {
				return err
			}
			if gf.asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				return enc.Encode(out)
			}
			fmt.Fprintln(cmd.OutOrStdout(), gf.prompt+out.Text)
			fmt.Fprintf(cmd.ErrOrStderr(), "%d tokens, %.1f tokens/s\n", len(out.Tokens), out.TokensPerSecond)
			return nil
		},
	}
	gf.register(cmd.Flags())
	return cmd
}

// validate checks the flags' values and combinations.
func (gf *generateFlags) validate(fs *pflag.FlagSet) error {
	modes := 0
	for _, on := range []bool{gf.local != "", gf.split != "", gf.network} {
		if on {
			modes++
		}
	}
	if modes != 1 {
		return errors.New("flags --local, --split and --network: give exactly one")
	}
	if gf.prompt == "" {
		return errors.New("flag --prompt: required and non-empty")
	}
	if gf.maxTokens < 1 {
		return fmt.Errorf("flag --max-tokens %d: must be at least 1", gf.maxTokens)
	}
	if gf.ubatch < 0 {
		return fmt.Errorf("flag --ubatch %d: must be positive (0: 512)", gf.ubatch)
	}
	if gf.network && fs.Changed("ubatch") {
		return errors.New("flag --ubatch: only with --local or --split (the network's gating nodes choose their own)")
	}
	if gf.network && fs.Changed("device") {
		return errors.New("flag --device: only with --local or --split (the network's nodes choose their own)")
	}
	if gf.progress && (!gf.network || gf.concurrency > 1 || gf.dryRun) {
		return errors.New("flag --progress: only with --network, one generation at a time and without --dry-run")
	}
	if gf.network {
		if gf.concurrency < 1 || gf.concurrency > 256 || gf.concurrency > 1 && (!gf.asJSON || gf.dryRun) {
			return fmt.Errorf("flag --concurrency %d: want 1 to 256, above 1 with --json and without --dry-run", gf.concurrency)
		}
		return nil
	}
	for _, name := range []string{"model", "bootstrap", "gating", "temperature", "top-k", "top-p", "seed", "stop", "wallet", "dry-run", "concurrency"} {
		if fs.Changed(name) {
			return fmt.Errorf("flag --%s: only with --network", name)
		}
	}
	return nil
}

func (gf *generateFlags) register(f *pflag.FlagSet) {
	f.StringVar(&gf.local, "local", "", "run this GGUF model through llama.cpp on this machine")
	f.StringVar(&gf.split, "split", "", "run this GGUF model (or split directory) through the gating compute with in-process experts")
	f.StringVar(&gf.prompt, "prompt", "", "the prompt")
	f.IntVar(&gf.maxTokens, "max-tokens", 32, "most tokens to generate")
	f.IntVar(&gf.threads, "threads", 0, "compute threads (default: all cores)")
	f.IntVar(&gf.ctxSize, "context", 0, "context size in tokens (default: the model's, at most 4096)")
	f.IntVar(&gf.ubatch, "ubatch", 0, "most tokens computed at a time, llama.cpp's n_ubatch; it also sizes a sliding-window model's smaller cache (default 512)")
	f.BoolVar(&gf.asJSON, "json", false, `print {"tokens": [...], "text": ...}`)
	f.BoolVar(&gf.network, "network", false, "ask the network's gating nodes (needs --model and --bootstrap or --gating)")
	f.StringVar(&gf.modelCID, "model", "", "with --network: the model's CID (printed by 'neurod model import')")
	f.StringArrayVar(&gf.bootstrap, "bootstrap", nil, "with --network: bootstrap peer multiaddr ending in /p2p/<peer ID> (repeatable)")
	f.StringArrayVar(&gf.gatingAddrs, "gating", nil, "with --network: a gating node's multiaddr to try first (repeatable)")
	f.Float32Var(&gf.temperature, "temperature", 0, "with --network: sampling temperature (0: greedy)")
	f.IntVar(&gf.topK, "top-k", 0, "with --network: sample from the k most likely tokens (0: all)")
	f.Float32Var(&gf.topP, "top-p", 0, "with --network: sample from the nucleus of this probability (0: all)")
	f.Int64Var(&gf.seed, "seed", 0, "with --network: sampling seed (default: random)")
	f.StringArrayVar(&gf.stop, "stop", nil, "with --network: stop before this string (repeatable)")
	f.StringVar(&gf.device, "device", "cpu", deviceUsage)
	f.StringVar(&gf.wallet, "wallet", "", "with --network: pay from this wallet's account (a key file from 'neurod wallet new')")
	f.BoolVar(&gf.dryRun, "dry-run", false, "with --network: print what the request would cost, and run nothing")
	f.BoolVar(&gf.progress, "progress", false, `with --network: write {"tokens": N, "rewind": false} to stderr as each token arrives, for a program following the generation`)
	f.IntVar(&gf.concurrency, "concurrency", 1, "with --network and --json: ask the prompt this many times at once through the one client, one generation's JSON per line")
}

// generateOnMachine answers a prompt greedily on this machine: the whole
// GGUF in llama.cpp (local), or the gating compute and in-process experts
// from the shards (split), with the context size, threads and ubatch of o.
func generateOnMachine(ctx context.Context, dev ggml.Device, local, split, prompt string, maxTokens int, o ggml.ContextOptions) (*testnet.Generation, error) {
	var (
		g     *ggml.Generation
		start time.Time
	)
	if local != "" {
		l, err := ggml.LoadLlamaOn(dev, local)
		if err != nil {
			return nil, err
		}
		defer l.Close()
		start = time.Now()
		if g, err = l.GenerateGreedyContext(ctx, prompt, maxTokens, o, false); err != nil {
			return nil, fmt.Errorf("generate: %w", err)
		}
	} else {
		sm, err := loadSplit(dev, split, o.Threads)
		if err != nil {
			return nil, err
		}
		defer sm.Close()
		sm.UBatch = o.UBatch
		start = time.Now()
		if g, err = sm.GenerateGreedy(ctx, prompt, maxTokens, o.Context, nil, false); err != nil {
			return nil, fmt.Errorf("generate: %w", err)
		}
	}
	out := &testnet.Generation{Tokens: g.Tokens, Text: g.Text, PromptTokens: len(g.Prompt),
		TokensPerSecond: float64(len(g.Tokens)) / time.Since(start).Seconds(), PerTokenMs: []float64{}, Device: dev.Spec()}
	for _, d := range g.Steps[:len(g.Tokens)] {
		out.PerTokenMs = append(out.PerTokenMs, float64(d.Microseconds())/1000)
	}
	if out.Tokens == nil {
		out.Tokens = []int32{}
	}
	return out, nil
}

// loadSplit loads a split model from a directory of shards, or splits a
// GGUF file into a temporary directory first.
func loadSplit(dev ggml.Device, path string, threads int) (*ggml.SplitModel, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("flag --split: %w", err)
	}
	dir := path
	if !st.IsDir() {
		if dir, err = os.MkdirTemp("", "neuro-split-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir) // the loaded model keeps what it needs in memory
		if _, err := model.Split(path, dir); err != nil {
			return nil, err
		}
	}
	return ggml.LoadSplitOn(dev, dir, cid.Undef, threads)
}
