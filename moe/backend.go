package moe

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/neuro-p2p/neuro/model"
)

// Backend is a compute backend: everything a node computes with. Package
// ggml implements it with llama.cpp's ggml; moetest has a pure-Go one for
// tests. Consumers take the part they use (ExpertLoader, GatingLoader,
// Quantizer).
type Backend interface {
	ExpertLoader
	GatingLoader
	Quantizer
}

// ExpertLoader loads experts.
type ExpertLoader interface {
	// NewExpert copies an expert's weights into the backend's memory.
	NewExpert(w ExpertWeights, o ExpertOptions) (Expert, error)
}

// GatingLoader loads the gating part of a model and its tokenizer.
type GatingLoader interface {
	// NewGating copies the gating shard's tensors into the backend's
	// memory, checking each against the shape hp implies.
	NewGating(hp Hparams, shard *model.Shard, threads int) (Gating, error)
	// LoadVocab loads the tokenizer of the GGUF file at path (a gating
	// shard carries the model's whole tokenizer).
	LoadVocab(path string) (Vocab, error)
}

// Quantizer converts between float32 and a dtype's encoding.
type Quantizer interface {
	// Quantize encodes rows of float32 values (each of rowLen values) as t.
	Quantize(t model.DType, x []float32, rowLen int) ([]byte, error)
	// Dequantize decodes t-encoded data to float32.
	Dequantize(t model.DType, b []byte) ([]float32, error)
}

// DeviceInfo describes a compute device a backend sees.
type DeviceInfo struct {
	Backend     string // "CPU", "Vulkan", "CUDA"
	Name        string // "CPU", "Vulkan0", "CUDA0"
	Description string // the device's own name
	Type        string // cpu, gpu, igpu or accel
	MemoryFree  uint64
	MemoryTotal uint64
	// Selected marks the device the backend computes on.
	Selected bool
}

// DeviceLister is a backend that can say which devices it sees (the
// node's heartbeats and state carry them).
type DeviceLister interface {
	Devices() []DeviceInfo
}

// Expert computes one MoE expert's feed-forward block,
// down(act(gate·x, up·x)) with the activation and biases its weights
// name (ExpertWeights). Implementations are safe for concurrent use.
type Expert interface {
	// Compute runs n token vectors (x holds n rows of Embd floats) through
	// the expert and writes n rows of Embd floats to out.
	Compute(x []float32, n int, out []float32) error
	// Embd is the hidden size, FF the feed-forward size.
	Embd() int
	FF() int
	// MaxBatch is the largest n Compute accepts.
	MaxBatch() int
	// Close frees the weights; it is safe to call more than once.
	Close() error
}

// ExpertOptions tunes an expert.
type ExpertOptions struct {
	// Threads is the number of compute threads (default: every core).
	Threads int
	// MaxBatch is the largest batch Compute accepts (default 512); compute
	// memory for it is reserved up front.
	MaxBatch int
	// Lanes is how many experts of a group (Grouper) are computed at the
	// same time, each lane by Threads threads of its own (0 or 1: the
	// group's experts in one graph on the shared threads). A node whose
	// cores idle while a gating node beside it waits on the experts
	// computes a layer's experts each on a core, with no barrier between
	// them for a descheduled thread to hold up.
	Lanes int
	// LanePoll is how long a lane that finished its share of a group
	// polls for the next group (yielding its core to any thread that wants
	// it) before it sleeps; 0: it sleeps at once. Waking a sleeping thread
	// took 200 us at the mean on a virtual machine's idle core, where a
	// decode step's next layer comes within about a millisecond.
	LanePoll time.Duration
}

// MaxLanePoll bounds ExpertOptions.LanePoll (and expert.lane_poll_us).
const MaxLanePoll = time.Second

// WaitPoller keeps one of the process's cores awake while an answer is
// due (a backend's thread polls, yielding the core to any thread that
// wants it): the thread the answer wakes then starts on a running core,
// where a core the hypervisor halted takes 0.1-0.2 ms to wake on a
// virtual machine. For a node whose cores would idle while it waits: a
// gating node waiting on expert nodes of other machines, an expert node
// with one lane between a gating node's layers.
type WaitPoller interface {
	// PollFor polls until d from now (at most MaxLanePoll), replacing an
	// earlier call's end.
	PollFor(d time.Duration)
	// StopPolling stops the poll at once.
	StopPolling()
}

// Tensor is one weight tensor's encoded bytes.
type Tensor struct {
	Type model.DType
	Data []byte
}

// ExpertWeights are one expert's three tensors: gate and up are
// [Embd, FF] and down is [FF, Embd] (ggml order, ne0 first); where the
// model has them (gpt-oss), a bias after each (FF, FF and Embd floats;
// nil: none); and the activation between the projections
// (model.ActSwiGLU when empty, or model.ActSwiGLUOAI). The expert computes
// down(act(gate·x + gate_b, up·x + up_b)) + down_b, as llama.cpp's
// build_moe_ffn does.
type ExpertWeights struct {
	Embd, FF                   int
	Gate, Up, Down             Tensor
	GateBias, UpBias, DownBias []float32
	Act                        string
	// Dense: a layer's shared experts, which llama.cpp computes as a
	// dense feed-forward block (plain matrix products, build_ffn), not
	// through the expert stack; DownPrecF32: the down projection at F32
	// precision (GLM-4's).
	Dense, DownPrecF32 bool
}

// Activation is the activation the expert computes (model.ActSwiGLU when
// none is named).
func (w ExpertWeights) Activation() string {
	if w.Act == "" {
		return model.ActSwiGLU
	}
	return w.Act
}

// Check verifies the shape and that each tensor holds the bytes its type
// and shape need.
func (w ExpertWeights) Check() error {
	if w.Embd <= 0 || w.FF <= 0 {
		return fmt.Errorf("expert: bad shape embd=%d ff=%d", w.Embd, w.FF)
	}
	if a := w.Activation(); a != model.ActSwiGLU && a != model.ActSwiGLUOAI {
		return fmt.Errorf("expert: activation %q: want %s or %s", a, model.ActSwiGLU, model.ActSwiGLUOAI)
	}
	if w.Dense && (w.Activation() != model.ActSwiGLU || w.GateBias != nil || w.UpBias != nil || w.DownBias != nil) {
		return errors.New("expert: a shared (dense) expert computes swiglu without biases")
	}
	for _, b := range []struct {
		name string
		b    []float32
		n    int
	}{{"gate", w.GateBias, w.FF}, {"up", w.UpBias, w.FF}, {"down", w.DownBias, w.Embd}} {
		if b.b != nil && len(b.b) != b.n {
			return fmt.Errorf("expert: %s bias of %d floats, want %d", b.name, len(b.b), b.n)
		}
	}
	for _, t := range []struct {
		name       string
		t          Tensor
		rowLen, rs int
	}{{"gate", w.Gate, w.Embd, w.FF}, {"up", w.Up, w.Embd, w.FF}, {"down", w.Down, w.FF, w.Embd}} {
		if !t.t.Type.Known() || t.t.Type.BlockSize() == 0 {
			return fmt.Errorf("expert: %s: %w %s", t.name, model.ErrUnsupportedDType, t.t.Type)
		}
		if uint64(t.rowLen)%t.t.Type.BlockSize() != 0 {
			return fmt.Errorf("expert: %s rows of %d are not a multiple of %s's block of %d", t.name, t.rowLen, t.t.Type, t.t.Type.BlockSize())
		}
		want := t.t.Type.RowSize(uint64(t.rowLen)) * uint64(t.rs)
		if uint64(len(t.t.Data)) != want {
			return fmt.Errorf("expert: %s weights are %d bytes, want %d for %s [%d x %d]", t.name, len(t.t.Data), want, t.t.Type, t.rowLen, t.rs)
		}
	}
	return nil
}

// ExpertWeightsOf reads expert weights of layer from a verified expert
// shard, checking that the three tensors form an expert.
func ExpertWeightsOf(s *model.Shard, layer int) (ExpertWeights, error) {
	var ts [3]Tensor
	var infos [3]model.TensorInfo
	for i, name := range []string{"gate", "up", "down"} {
		b, t, err := s.TensorBytes(model.ExpertTensorName(layer, name))
		if err != nil {
			return ExpertWeights{}, err
		}
		if len(t.Shape) != 2 {
			return ExpertWeights{}, fmt.Errorf("shard %s: tensor %s has shape %v, want 2 dimensions", s.CID, t.Name, t.Shape)
		}
		ts[i], infos[i] = Tensor{Type: t.Type, Data: b}, t
	}
	g, u, d := infos[0], infos[1], infos[2]
	if g.Shape[0] != u.Shape[0] || g.Shape[1] != u.Shape[1] || d.Shape[0] != g.Shape[1] || d.Shape[1] != g.Shape[0] {
		return ExpertWeights{}, fmt.Errorf("shard %s: shapes gate %v up %v down %v do not form an expert", s.CID, g.Shape, u.Shape, d.Shape)
	}
	w := ExpertWeights{Embd: int(g.Shape[0]), FF: int(g.Shape[1]), Gate: ts[0], Up: ts[1], Down: ts[2]}
	if k, ok := s.File.Get(model.KeyExpertKind).(string); ok {
		if k != model.ExpertKindShared {
			return ExpertWeights{}, fmt.Errorf("shard %s: expert kind %q: want %q or none", s.CID, k, model.ExpertKindShared)
		}
		w.Dense = true
	}
	w.DownPrecF32, _ = s.File.Get(model.KeyDownPrecF32).(bool)
	if a, ok := s.File.Get(model.KeyActivation).(string); ok {
		w.Act = a
	} else if s.File.Get(model.KeyActivation) != nil {
		return ExpertWeights{}, fmt.Errorf("shard %s: %s is not a string", s.CID, model.KeyActivation)
	}
	for _, b := range []struct {
		part string
		dst  *[]float32
	}{{"gate", &w.GateBias}, {"up", &w.UpBias}, {"down", &w.DownBias}} {
		name := model.ExpertBiasName(layer, b.part)
		if !s.Has(name) {
			continue
		}
		raw, t, err := s.TensorBytes(name)
		if err != nil {
			return ExpertWeights{}, err
		}
		if t.Type != model.F32 || len(t.Shape) != 1 {
			return ExpertWeights{}, fmt.Errorf("shard %s: bias %s is %s %v, want a row of f32", s.CID, name, t.Type, t.Shape)
		}
		if *b.dst, err = model.Decode(model.F32, raw); err != nil {
			return ExpertWeights{}, fmt.Errorf("shard %s: bias %s: %w", s.CID, name, err)
		}
	}
	if err := w.Check(); err != nil {
		return ExpertWeights{}, fmt.Errorf("shard %s: %w", s.CID, err)
	}
	return w, nil
}

// NewExpertFromShard loads expert weights of layer from a verified shard.
func NewExpertFromShard(l ExpertLoader, s *model.Shard, layer int, o ExpertOptions) (Expert, error) {
	w, err := ExpertWeightsOf(s, layer)
	if err != nil {
		return nil, err
	}
	return l.NewExpert(w, o)
}

// Gating is the gating part of a model in a backend's memory: embeddings,
// attention, norms, router and output head. Sessions share it.
type Gating interface {
	// Hparams returns the model's hyper-parameters.
	Hparams() Hparams
	// NewSession makes a session with a KV cache of nCtx tokens (default:
	// the model's context, at most 4096).
	NewSession(nCtx int) (Session, error)
	// Close frees the memory. Close the sessions first.
	Close() error
}

// Lockstepper is a Gating that computes its sessions' one-token passes
// together, as llama.cpp's server decodes its slots in one batch: each
// layer and the head one computation for all the sessions that reach it
// within wait of each other (ggml: one graph, the weights read once), each
// session's logits exactly what it gets alone.
type Lockstepper interface {
	// SetLockstep turns it on with wait (0 or less: off) and reports
	// whether the gating can. The sessions wait for each other only
	// while the gating's compute is busy at least busy of the time (0:
	// always): where it has time to spare (expert calls that take a
	// round trip longer than the sessions' compute), computing their
	// steps together only puts every session's compute on each one's way.
	SetLockstep(wait time.Duration, busy float64) bool
}

// SessionSizer is a Gating that knows its sessions' memory.
type SessionSizer interface {
	// SessionBytes is the memory of a session of nCtx tokens' KV cache.
	SessionBytes(nCtx int) int64
	// SessionMemory is the memory the sessions may take in all.
	SessionMemory() int64
}

// Session is one sequence: its KV cache and position. Not safe for
// concurrent use.
type Session interface {
	// Forward runs tokens through the model after those already in the
	// session, asking experts for each MoE layer's expert outputs, and
	// returns the last token's logits.
	Forward(ctx context.Context, tokens []int32, experts Experts) ([]float32, error)
	// ForwardEach runs tokens as that many one-token Forward calls would,
	// each token's logits identical to theirs, with one expert call per
	// layer for all of them (speculative decoding's verification).
	ForwardEach(ctx context.Context, tokens []int32, experts Experts) ([][]float32, error)
	// Rewind drops the tokens after the first pos: the next Forward
	// continues at position pos. It fails with ErrWindowLost, changing
	// nothing, when a sliding-window layer's cache no longer holds the
	// positions before pos.
	Rewind(pos int) error
	// Len is the number of tokens in the KV cache.
	Len() int
	// Close frees the KV cache; it is safe to call more than once.
	Close() error
}

// RewindTo puts a session that holds prompt and generated tokens (the
// last one possibly not yet forwarded) back to before the forward pass
// that produced tokens[step], and returns the tokens that pass must take:
// the one before it, or, where a sliding-window layer's cache no longer
// holds the window there (ErrWindowLost), the whole sequence again from
// an empty session.
func RewindTo(s Session, prompt, tokens []int32, step int) ([]int32, error) {
	if step < 0 || step > len(tokens) {
		return nil, fmt.Errorf("rewind to step %d of %d tokens", step, len(tokens))
	}
	if step == 0 {
		return prompt, s.Rewind(0)
	}
	err := s.Rewind(len(prompt) + step - 1)
	if errors.Is(err, ErrWindowLost) {
		if err := s.Rewind(0); err != nil {
			return nil, err
		}
		return append(slices.Clone(prompt), tokens[:step]...), nil
	}
	if err != nil {
		return nil, err
	}
	return []int32{tokens[step-1]}, nil
}

// RowVariant is an Expert whose rows' results depend on the batch they
// are computed in (a plain matrix product, which ggml computes another way
// for two rows or more; a GPU's kernels): a row computed alone is what a
// one-token decode step computes.
type RowVariant interface {
	RowsVary() bool
}

// RowsVary reports whether e is a RowVariant whose rows vary.
func RowsVary(e any) bool {
	v, ok := e.(RowVariant)
	return ok && v.RowsVary()
}

// Computer is what a group computes with: an Expert's Compute.
type Computer interface {
	Compute(x []float32, n int, out []float32) error
}

// Grouper is an Expert that computes together with other experts of its
// backend in one call (ggml: one graph, one dispatch of its threadpool),
// each expert's rows exactly as Compute gives them.
type Grouper interface {
	// ComputeGroup computes es[i] on ns[i] rows of xs[i] into outs[i]; es
	// holds the receiver among others. It returns ErrNotGroupable, having
	// computed nothing, when it cannot take them all in one call.
	ComputeGroup(es []Computer, xs [][]float32, ns []int, outs [][]float32) error
}

// ErrNotGroupable: experts that cannot be computed in one call.
var ErrNotGroupable = errors.New("experts cannot be computed in one call")

// ComputeGroup computes es[i] on ns[i] rows of xs[i] into outs[i]: in one
// call where es[0] is a Grouper that takes them all, else one by one.
// Either way each expert's rows are what its Compute gives.
func ComputeGroup(es []Computer, xs [][]float32, ns []int, outs [][]float32) error {
	if len(xs) != len(es) || len(ns) != len(es) || len(outs) != len(es) {
		return fmt.Errorf("expert group: %d experts, %d inputs, %d sizes, %d outputs", len(es), len(xs), len(ns), len(outs))
	}
	if g, ok := es[0].(Grouper); ok && len(es) > 1 {
		err := g.ComputeGroup(es, xs, ns, outs)
		if !errors.Is(err, ErrNotGroupable) {
			return err
		}
	}
	for i, e := range es {
		if err := e.Compute(xs[i], ns[i], outs[i]); err != nil {
			return fmt.Errorf("expert group: expert %d: %w", i, err)
		}
	}
	return nil
}

// ApartExperts computes MoE calls whose rows are computed each as a batch
// of one, as that many one-token decode steps would (speculative
// decoding's verification).
type ApartExperts interface {
	Experts
	MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error)
}

// DraftLoader loads draft models for speculative decoding.
type DraftLoader interface {
	// LoadDraft loads the model at path (a GGUF file), computed with
	// threads threads (0: every core).
	LoadDraft(path string, threads int) (DraftModel, error)
}

// DraftModel is a small model of a served model's vocabulary whose greedy
// continuation drafts tokens for speculative decoding.
type DraftModel interface {
	// Vocab is the number of tokens in its vocabulary.
	Vocab() int
	// NewDrafter makes one generation's drafter with a context of nCtx
	// tokens.
	NewDrafter(nCtx int) (Drafter, error)
	Close() error
}

// Drafter drafts the tokens that follow a sequence. A draft is a function
// of the sequence (no randomness), so that speculative sampling can keep
// a drafted token with the model's probability of it.
type Drafter interface {
	// Draft returns up to k tokens to follow seq (the prompt and the
	// tokens generated so far).
	Draft(seq []int32, k int) ([]int32, error)
	Close() error
}

// ChatMessage is one turn of a chat.
type ChatMessage struct{ Role, Content string }

// Vocab is a model's tokenizer.
type Vocab interface {
	Tokenize(text string, addSpecial bool) ([]int32, error)
	Detokenize(tokens []int32) string
	// Continue is the text generated tokens add after their prompt (a
	// SentencePiece text's first word keeps its leading space).
	Continue(tokens []int32) string
	// IsEOG reports whether tok ends a generation.
	IsEOG(tok int32) bool
	// ApplyChatTemplate formats a chat into a prompt with the model's chat
	// template, ending with the start of the assistant's turn.
	ApplyChatTemplate(msgs []ChatMessage) (string, error)
	Close() error
}
