package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/node"
)

func newModelCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "model",
		Short: "Make, split and join MoE model files",
		Long: `model works on GGUF model files: make generates a seeded random MoE model
for tests and benchmarks, split cuts a model into content-addressed shards
(one per layer and expert, plus the gating shard) and a manifest whose CID is
the model's ID, and join rebuilds the GGUF from the shards.`,
	}
	cmd.AddCommand(newModelMakeCmd(), newModelQuantizeCmd(), newModelInfoCmd(g), newModelSplitCmd(), newModelJoinCmd(), newModelImportCmd(g))
	return cmd
}

func newModelImportCmd(g *globalFlags) *cobra.Command {
	var shared string
	cmd := &cobra.Command{
		Use:   "import MODEL.gguf [--home DIR]",
		Short: "Split a model into the node's store; it spreads through the network by CID",
		Long: `import splits MODEL.gguf and puts the manifest and every shard, verified
by CID, into the node's store (<home>/store). The node announces them in the
DHT (a running node picks them up within seconds), and other nodes fetch
what they host from it: no other node needs the GGUF. The shards are split
into a directory of the home (.import-*, removed afterwards, and by the next
import if this one is killed) and linked into the store, so the import
writes the model's size once and needs that much free space in the home.
Prints the model CID last.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			home, err := g.homeDir()
			if err != nil {
				return err
			}
			if _, err := os.Stat(filepath.Join(home, node.ConfigFile)); err != nil {
				return fmt.Errorf("home %s: %w (run 'neurod init' first)", home, node.ErrNotInitialized)
			}
			store, err := expert.OpenStore(filepath.Join(home, node.StoreDir))
			if err != nil {
				return err
			}
			// The split goes beside the store, on its file system: its
			// shards are then linked into the store, not copied.
			removeStaleImports(cmd.ErrOrStderr(), home, time.Now())
			tmp, err := os.MkdirTemp(home, importPrefix)
			if err != nil {
				return err
			}
			defer os.RemoveAll(tmp)
			res, err := splitShowing(cmd.ErrOrStderr(), args[0], tmp, shared)
			if err != nil {
				return err
			}
			bar := progress.New(cmd.ErrOrStderr()).Bar(-1, "storing and checking shards", false)
			mc, err := store.ImportSplitProgress(tmp, func(done, total int) {
				bar.ChangeMax(total)
				_ = bar.Set(done)
			})
			_ = bar.Finish()
			if err != nil {
				return err
			}
			p := res.Manifest.GetParams()
			fmt.Fprintf(cmd.OutOrStdout(), "imported %s: %d layers x %d experts into %s\n%s\n",
				args[0], p.GetLayers(), p.GetExperts(), store.Dir(), mc)
			return nil
		},
	}
	cmd.Flags().StringVar(&shared, "shared-experts", "gating", sharedExpertsHelp)
	return cmd
}

// importPrefix names the directories model import splits into, in the
// home.
const importPrefix = ".import-"

// staleImport is how long an import's directory goes unchanged before
// another import takes it for the leftover of one that was killed: a
// running import adds a shard to it every few seconds.
const staleImport = time.Hour

// removeStaleImports removes what killed imports left in home: their
// directories unchanged for staleImport, each said on w.
func removeStaleImports(w io.Writer, home string, now time.Time) {
	dirs, _ := filepath.Glob(filepath.Join(home, importPrefix+"*"))
	for _, d := range dirs {
		st, err := os.Stat(d)
		if err != nil || !st.IsDir() || now.Sub(st.ModTime()) < staleImport {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			fmt.Fprintf(w, "could not remove %s, an interrupted import's split: %v\n", d, err)
			continue
		}
		fmt.Fprintf(w, "removed %s, an interrupted import's split\n", d)
	}
}

// sharedExpertsHelp is the --shared-experts flag's help.
const sharedExpertsHelp = "where a model's shared experts (GLM, DeepSeek) run: gating (in the gating shard, computed where the attention runs) or remote (shards of their own, hosted and called like routed experts)"

// sharedRemote parses --shared-experts.
func sharedRemote(v string) (bool, error) {
	switch v {
	case "gating", "":
		return false, nil
	case "remote":
		return true, nil
	}
	return false, fmt.Errorf("flag --shared-experts %q: want gating or remote", v)
}

// splitShowing splits the model at path into dir with a progress bar on w
// (a terminal only).
func splitShowing(w io.Writer, path, dir, shared string) (*model.SplitResult, error) {
	remote, err := sharedRemote(shared)
	if err != nil {
		return nil, err
	}
	bar := progress.New(w).Bar(-1, "splitting into shards", false)
	defer bar.Finish()
	return model.SplitWith(path, dir, model.SplitOptions{SharedRemote: remote, Progress: func(done, total int) {
		bar.ChangeMax(total)
		_ = bar.Set(done)
	}})
}

func presetNames() string {
	var names []string
	for n := range model.Presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, "|")
}

func newModelQuantizeCmd() *cobra.Command {
	var (
		out, typ string
		threads  int
		force    bool
	)
	cmd := &cobra.Command{
		Use:   "quantize IN.gguf --type TYPE --out OUT.gguf",
		Short: "Re-quantize a model with llama.cpp's quantizer (q4_k_m, q6_k, iq4_xs, mxfp4, …)",
		Long: `quantize writes IN.gguf re-quantized to --type through llama.cpp's own
quantizer (llama_model_quantize), so the file has the same type mix per tensor
as the models people download: q4_k_m keeps gate and up experts in Q4_K and
about half the layers' down experts in Q6_K; mxfp4 puts the experts in MXFP4.
Tensors whose rows do not fit a type's blocks get llama.cpp's fallback type.
Types: ` + strings.Join(ggml.FileTypes(), ", ") + `.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("flag --out: required")
			}
			if typ == "" {
				return errors.New("flag --type: required (" + strings.Join(ggml.FileTypes(), ", ") + ")")
			}
			if _, err := os.Stat(out); err == nil && !force {
				return fmt.Errorf("flag --out %s: the file exists (--force replaces it)", out)
			}
			if err := ggml.QuantizeModel(args[0], out, typ, threads); err != nil {
				return err
			}
			st, err := os.Stat(out)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %s, %.1f MiB\n", out, strings.ToLower(typ), float64(st.Size())/(1<<20))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&out, "out", "", "output GGUF file (required)")
	f.StringVar(&typ, "type", "", "file type: "+strings.Join(ggml.FileTypes(), "|"))
	f.IntVar(&threads, "threads", 0, "quantization threads (0: every core)")
	f.BoolVar(&force, "force", false, "replace an existing --out file")
	return cmd
}

func newModelMakeCmd() *cobra.Command {
	m := &modelMakeFlags{}
	cmd := &cobra.Command{
		Use:   "make --out FILE [--arch A] [--preset tiny|bench] [shape flags] [--type f32|f16|q8_0|q4_0] [--seed N] [--planted TEXT]",
		Short: "Generate a MoE model (Mixtral, Qwen3, gpt-oss, GLM-4.5 or DeepSeek-V3 layout) with seeded random weights",
		Long: `make writes a GGUF MoE model in the layout of --arch (llama: Mixtral;
qwen3moe; gpt-oss; glm4moe; deepseek2: DeepSeek-V3) with random weights drawn
from --seed, and the family's tokenizer, control tokens and chat template,
all of which llama.cpp loads. The same flags and seed always give a
byte-identical file. Shape flags override the preset: tiny loads in
milliseconds (tests), bench has about 1 B parameters in the real model's
proportions (benchmarks). --planted TEXT makes a model whose greedy
decoding continues TEXT from any of its first words, through its experts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return m.run(cmd) },
	}
	m.register(cmd.Flags())
	return cmd
}

// modelMakeFlags are model make's flags.
type modelMakeFlags struct {
	out, preset, dtype, arch string
	planted                  string
	seed                     uint64
	force                    bool
	p                        model.Params
}

func (m *modelMakeFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&m.out, "out", "", "output GGUF file (required)")
	fs.StringVar(&m.preset, "preset", "tiny", "shape preset: "+presetNames())
	fs.StringVar(&m.arch, "arch", "llama", "layout: llama (Mixtral), qwen3moe (per-head Q/K norms, NEOX RoPE, --head-size), deepseek2 (DeepSeek-V3: latent attention, expert groups, dense leading layer, shared expert), gpt-oss (sliding-window layers, attention sinks, biases, YaRN, swiglu_oai experts with biases) or glm4moe (GLM-4.5: dense leading layer, shared expert, sigmoid router, Q/K/V biases, partial rotary)")
	fs.IntVar(&m.p.SlidingWindow, "sliding-window", 0, "gpt-oss: the window of its sliding-window (even) layers")
	fs.IntVar(&m.p.HeadSize, "head-size", 0, "attention head size when not embd/heads (qwen3moe; Qwen3-30B-A3B has 128)")
	fs.BoolVar(&m.p.TiedOutput, "tied-output", false, "no output.weight: the output head is the token embeddings")
	fs.StringVar(&m.dtype, "type", "f32", "weight type: f32, f16, q8_0 or q4_0 (norms and router stay f32); for other mixes, make f16 and 'neurod model quantize' it")
	fs.Uint64Var(&m.seed, "seed", 1, "random seed")
	fs.StringVar(&m.planted, "planted", "", "make a model that speaks: greedy decoding of any start of this text continues it, through the experts (each token may be followed by one token only)")
	fs.BoolVar(&m.force, "force", false, "replace an existing --out file")
	fs.IntVar(&m.p.Layers, "layers", 0, "MoE layers")
	fs.IntVar(&m.p.Experts, "experts", 0, "experts per layer")
	fs.IntVar(&m.p.ExpertsUsed, "experts-used", 0, "experts each token is routed to (top-k)")
	fs.IntVar(&m.p.Embd, "embd", 0, "hidden size (multiple of 32)")
	fs.IntVar(&m.p.FF, "ff", 0, "expert feed-forward size (multiple of 32)")
	fs.IntVar(&m.p.Heads, "heads", 0, "attention heads")
	fs.IntVar(&m.p.KVHeads, "kv-heads", 0, "key/value heads (grouped-query attention)")
	fs.IntVar(&m.p.Vocab, "vocab", 0, "vocabulary size")
	fs.IntVar(&m.p.Context, "context", 0, "context length")
}

// run writes the model.
func (m *modelMakeFlags) run(cmd *cobra.Command) error {
	if m.out == "" {
		return errors.New("flag --out: required")
	}
	params, err := modelShape(cmd.Flags(), m.arch, m.preset, m.p)
	if err != nil {
		return err
	}
	dt, err := model.ParseDType(m.dtype)
	if err != nil || !slices.Contains([]model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0}, dt) {
		return fmt.Errorf("flag --type %q: make writes f32, f16, q8_0 or q4_0; for q4_k_m, iq4_xs, mxfp4 and the rest, make f16 and run 'neurod model quantize'", m.dtype)
	}
	if m.planted != "" {
		params.PlantPieces = model.PlantPieces(m.arch, m.planted)
		if room := params.Vocab - 3 - 256 - 53; len(params.PlantPieces) > room {
			return fmt.Errorf("flag --planted: its words need %d vocabulary pieces, a vocabulary of %d has room for %d (use --vocab)",
				len(params.PlantPieces), params.Vocab, room)
		}
		if params.Plant, err = plantTokens(m.out, m.arch, params, m.planted); err != nil {
			return fmt.Errorf("flag --planted: %w", err)
		}
	}
	if err := writeModel(m.out, m.arch, params, dt, m.seed, m.force); err != nil {
		return err
	}
	st, _ := os.Stat(m.out)
	fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %s, %.2f M parameters, %s, %.1f MiB, seed %d\n",
		m.out, m.arch, float64(params.ParamCount())/1e6, dt, float64(st.Size())/(1<<20), m.seed)
	return nil
}

// modelShape is the preset's shape with the shape flags that were given.
func modelShape(fs *pflag.FlagSet, arch, preset string, p model.Params) (model.Params, error) {
	params, ok := model.Preset(arch, preset)
	if !ok {
		return params, fmt.Errorf("flag --preset %q: want %s", preset, presetNames())
	}
	for _, f := range []struct {
		name string
		dst  *int
		v    int
	}{
		{"layers", &params.Layers, p.Layers}, {"experts", &params.Experts, p.Experts},
		{"experts-used", &params.ExpertsUsed, p.ExpertsUsed}, {"embd", &params.Embd, p.Embd},
		{"ff", &params.FF, p.FF}, {"heads", &params.Heads, p.Heads}, {"kv-heads", &params.KVHeads, p.KVHeads},
		{"vocab", &params.Vocab, p.Vocab}, {"context", &params.Context, p.Context}, {"head-size", &params.HeadSize, p.HeadSize},
		{"sliding-window", &params.SlidingWindow, p.SlidingWindow},
	} {
		if fs.Changed(f.name) {
			*f.dst = f.v
		}
	}
	params.TiedOutput = p.TiedOutput
	if err := params.Validate(); err != nil {
		return params, fmt.Errorf("model shape: %w", err)
	}
	return params, nil
}

// writeModel generates a model into out through a temporary file, so that
// a failure leaves no half-written file (and, without force, replaces
// none).
// plantTokens tokenizes text as llama.cpp does with the vocabulary an
// arch model of params gets (read from a small model of the same
// vocabulary written beside out).
func plantTokens(out, arch string, params model.Params, text string) ([]int32, error) {
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".vocab-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	vp, _ := model.Preset(arch, "tiny")
	vp.Vocab, vp.PlantPieces = params.Vocab, params.PlantPieces
	if err := model.GenerateArch(tmp, arch, vp, model.F32, 1); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	l, err := ggml.LoadLlama(tmp.Name())
	if err != nil {
		return nil, err
	}
	defer l.Close()
	toks, err := l.Tokenize(text, false)
	if err != nil {
		return nil, err
	}
	if len(toks) == 0 {
		return nil, errors.New("the text has no tokens")
	}
	return toks, nil
}

func writeModel(out, arch string, params model.Params, dt model.DType, seed uint64, force bool) error {
	if _, err := os.Stat(out); err == nil && !force {
		return fmt.Errorf("flag --out %s: %w (use --force to replace it)", out, fs.ErrExist)
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return fmt.Errorf("flag --out %s: %w", out, err)
	}
	defer os.Remove(tmp.Name())
	if err := model.GenerateArch(tmp, arch, params, dt, seed); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	return nil
}

func newModelSplitCmd() *cobra.Command {
	var out, shared string
	cmd := &cobra.Command{
		Use:   "split MODEL.gguf --out DIR",
		Short: "Split a MoE model into content-addressed shards; prints the model CID last",
		Long: `split writes to DIR one shard per (layer, expert) holding exactly that
expert's gate, up and down tensors, one gating shard with everything else,
and manifest.pb listing every shard's CID (CIDv1, raw, sha2-256), tensors and
the model's hyper-parameters. The model's ID is the manifest's CID, printed on
the last line. With --shared-experts remote, each MoE layer's shared experts
(GLM, DeepSeek) get a shard of their own, hosted and called like a routed
expert (number "experts" of its layer) instead of in the gating shard.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("flag --out: required")
			}
			res, err := splitShowing(cmd.ErrOrStderr(), args[0], out, shared)
			if err != nil {
				return err
			}
			p := res.Manifest.GetParams()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "split %s (%s): %d layers x %d experts (top-%d) = %d expert shards + 1 gating shard in %s\n",
				args[0], res.Manifest.GetArchitecture(), p.GetLayers(), p.GetExperts(), p.GetExpertsUsed(),
				len(res.Manifest.AllExperts()), out)
			if n := len(res.Manifest.GetShared()); n > 0 {
				fmt.Fprintf(w, "the shared experts are hosted like routed ones: %d of the expert shards, expert %d of each MoE layer\n", n, p.GetExperts())
			}
			fmt.Fprintln(w, res.ModelCID)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "output directory (required)")
	cmd.Flags().StringVar(&shared, "shared-experts", "gating", sharedExpertsHelp)
	return cmd
}

func newModelJoinCmd() *cobra.Command {
	var out, want string
	cmd := &cobra.Command{
		Use:   "join DIR --out FILE [--model CID]",
		Short: "Rebuild a GGUF model from its verified shards",
		Long: `join checks every shard in DIR against its CID (and the manifest against
--model, if given) and writes the model back as one GGUF file whose tensors
are byte-identical to the original's.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("flag --out: required")
			}
			c := cid.Undef
			if want != "" {
				var err error
				if c, err = cid.Decode(want); err != nil {
					return fmt.Errorf("flag --model %q: %w", want, err)
				}
			}
			if _, err := os.Stat(out); err == nil {
				return fmt.Errorf("flag --out %s: %w", out, fs.ErrExist)
			}
			if err := model.Join(args[0], c, out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s\n", out)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "output GGUF file (required; must not exist)")
	cmd.Flags().StringVar(&want, "model", "", "expected model CID")
	return cmd
}

func newModelInfoCmd(g *globalFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "info FILE.gguf|CID [--json]",
		Short: "A model's architecture, shape, tensor types and what hosting it takes",
		Long: `info describes a GGUF file, or a model in the node's store by its CID:
architecture, layers (MoE and dense), experts and experts used per token,
shared experts, the tensors' types with their counts and the experts' type
mixes, and sizes: the whole model, the gating part, one expert, and the
largest layer's experts (what a node needs to host a whole layer).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			in, err := modelInfo(g, args[0])
			if err != nil {
				return err
			}
			in.CostPer1kTokens = float64(billing.PerThousand(in.ExpertFLOPsPerToken, ledger.DefaultParams().GetPricePerMflop())) / 1e6
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(in)
			}
			printInfo(cmd.OutOrStdout(), in)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the JSON object")
	return cmd
}

// modelInfo reads a GGUF file, or a manifest from the node's store when arg
// is a CID and no such file exists.
func modelInfo(g *globalFlags, arg string) (*model.Info, error) {
	if f, err := os.Open(arg); err == nil {
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return nil, err
		}
		gf, err := model.ReadFile(f, st.Size())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", arg, err)
		}
		return model.InfoOfFile(gf)
	}
	c, err := cid.Decode(arg)
	if err != nil {
		return nil, fmt.Errorf("%s: neither a file nor a model CID", arg)
	}
	home, err := g.homeDir()
	if err != nil {
		return nil, err
	}
	store, err := expert.OpenStore(filepath.Join(home, node.StoreDir))
	if err != nil {
		return nil, err
	}
	m, err := store.Manifest(c)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w (import it, or run a node that fetches it)", c, err)
	}
	return model.InfoOfManifest(m), nil
}

func printInfo(w io.Writer, in *model.Info) {
	mib := func(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
	fmt.Fprintf(w, "architecture  %s\n", in.Architecture)
	fmt.Fprintf(w, "layers        %d (%d MoE, %d dense)\n", in.Layers, in.MoELayers, in.DenseLayers)
	fmt.Fprintf(w, "experts       %d per layer, %d used per token, %d shared\n", in.Experts, in.ExpertsUsed, in.SharedExperts)
	fmt.Fprintf(w, "shape         embd %d, expert ff %d, heads %d (kv %d), vocab %d, context %d\n", in.Embd, in.FF, in.Heads, in.KVHeads, in.Vocab, in.Context)
	names := make([]string, 0, len(in.Types))
	for n := range in.Types {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprint(w, "types        ")
	for _, n := range names {
		fmt.Fprintf(w, " %s×%d", n, in.Types[n])
	}
	fmt.Fprintln(w)
	mixes := make([]string, 0, len(in.ExpertTypes))
	for n := range in.ExpertTypes {
		mixes = append(mixes, n)
	}
	sort.Strings(mixes)
	fmt.Fprint(w, "expert types ")
	for _, n := range mixes {
		fmt.Fprintf(w, " %s×%d", n, in.ExpertTypes[n])
	}
	fmt.Fprintln(w, " (gate/up/down)")
	fmt.Fprintf(w, "size          %s in all, gating %s, one expert %s to %s\n", mib(in.TotalBytes), mib(in.GatingBytes), mib(in.ExpertBytesMin), mib(in.ExpertBytesMax))
	fmt.Fprintf(w, "to host       %s for the largest layer's experts\n", mib(in.LayerExpertBytes))
	fmt.Fprintf(w, "price         %s NEURO per 1,000 tokens at the default price (%s MFLOP of expert work a token, %d base unit per MFLOP)\n",
		strconv.FormatFloat(in.CostPer1kTokens, 'f', -1, 64), strconv.FormatFloat(float64(in.ExpertFLOPsPerToken)/1e6, 'f', -1, 64),
		ledger.DefaultParams().GetPricePerMflop())
}
