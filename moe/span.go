package moe

import (
	"context"
	"fmt"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// meta is what HparamsOf reads: a shard's metadata, and the gating
// shard's tensor list as the manifest has it.
type meta struct {
	file    *model.File
	tensors map[string]*neuropb.TensorRef
}

func newMeta(m *neuropb.Manifest, s *model.Shard) meta {
	ts := m.GetGating().GetTensors()
	mt := meta{file: s.File, tensors: make(map[string]*neuropb.TensorRef, len(ts))}
	for _, t := range ts {
		mt.tensors[t.GetName()] = t
	}
	return mt
}

// Get is a metadata value (nil: none).
func (m meta) Get(key string) any { return m.file.Get(key) }

// Has reports whether the gating shard holds the named tensor.
func (m meta) Has(name string) bool { _, ok := m.tensors[name]; return ok }

// Tensor is the named gating tensor's description.
func (m meta) Tensor(name string) (model.TensorInfo, bool) {
	t, ok := m.tensors[name]
	if !ok {
		return model.TensorInfo{}, false
	}
	return model.TensorInfo{Name: name, Type: model.DType(t.GetDtype()), Shape: t.GetShape()}, true
}

// Tensors is where a gating part's weights are read from: the gating
// shard, or a span's layer shards with or without the head shard
// (model.Shards).
type Tensors interface {
	Has(name string) bool
	TensorBytes(name string) ([]byte, model.TensorInfo, error)
}

// Part is the part of a model's gating compute a node loads: layers
// [First, End) — their attention, norms, router and dense or shared
// feed-forward blocks, and their KV caches — and, with Head, the
// embeddings, the final norm and the output head. A gating node loads the
// whole (WholePart); a span node some layers without the head; a head
// that leaves every layer to span nodes the head alone.
type Part struct {
	First, End int
	Head       bool
}

// WholePart is every layer and the head.
func WholePart(hp Hparams) Part { return Part{First: 0, End: hp.Layers, Head: true} }

// Check refuses a part outside the model's layers, or an empty one.
func (p Part) Check(hp Hparams) error {
	if p.First < 0 || p.End > hp.Layers || p.First > p.End || (p.First == p.End && !p.Head) {
		return fmt.Errorf("gating part %s: the model has layers 0-%d", p, hp.Layers-1)
	}
	return nil
}

// Layers is the number of layers in the part.
func (p Part) Layers() int { return p.End - p.First }

// Has reports whether the part holds layer l.
func (p Part) Has(l int) bool { return l >= p.First && l < p.End }

// String is "layers 3-7", "layers 3-7 and the head" or "the head".
func (p Part) String() string {
	switch {
	case p.First == p.End:
		return "the head"
	case p.Head:
		return fmt.Sprintf("layers %d-%d and the head", p.First, p.End-1)
	}
	return fmt.Sprintf("layers %d-%d", p.First, p.End-1)
}

// PartLoader is a GatingLoader that loads parts of a model.
type PartLoader interface {
	// NewGatingPart loads part of the gating compute from t (which must
	// hold the part's tensors), checking each against the shape hp
	// implies.
	NewGatingPart(hp Hparams, t Tensors, part Part, threads int) (Gating, error)
}

// HeadSessioner is a Gating with the head that makes sessions of the
// head alone: embeddings and the output head (Steps' Embed and Output),
// without a KV cache, for a head whose layers all run on span nodes.
type HeadSessioner interface {
	NewHeadSession(nCtx int) (Session, error)
}

// Want says which rows a forward pass keeps and how its layers compute
// them.
type Want int

const (
	// WantAll keeps every row (a piece of a long prompt, whose logits
	// are not needed).
	WantAll Want = iota
	// WantLast keeps only the last row after the model's last layer's
	// attention (llama.cpp's output row).
	WantLast
	// WantEach keeps every row, each computed as a one-token decode step
	// would compute it (speculative decoding's verification): one graph
	// per token, and the experts asked to compute each row apart.
	WantEach
)

// Steps is a Session's forward pass in its three steps, so that the
// layers in between can run elsewhere: a head embeds and samples, span
// nodes run runs of layers with KV caches of their own.
type Steps interface {
	// Embed returns the tokens' embeddings, len(tokens) rows of Embd
	// floats (a part with the head).
	Embed(tokens []int32) ([]float32, error)
	// Layers runs n rows of x, the hidden states entering the part's
	// first layer at positions Len() to Len()+n-1, through the part's
	// layers, storing their keys and values, and returns the rows
	// leaving its last layer: n rows, or 1 where want is WantLast and the
	// part ends with the model's last layer. Len then grows by n.
	Layers(ctx context.Context, x []float32, n int, want Want, experts Experts) ([]float32, int, error)
	// Output applies the final norm and the output head to rows rows of x
	// and returns each row's logits (a part with the head).
	Output(x []float32, rows int) ([][]float32, error)
}

// InPieces runs a Forward of tokens as llama_decode splits a batch:
// pieces of at most ubatch tokens, those before the last keeping no
// logits (WantAll) and the last only its last row (WantLast), each run by
// piece; it returns the last token's logits. A failed piece ends it (the
// caller puts its session back).
func InPieces(tokens []int32, ubatch int, piece func([]int32, Want) ([][]float32, error)) ([]float32, error) {
	for len(tokens) > ubatch {
		if _, err := piece(tokens[:ubatch], WantAll); err != nil {
			return nil, err
		}
		tokens = tokens[ubatch:]
	}
	logits, err := piece(tokens, WantLast)
	if err != nil {
		return nil, err
	}
	return logits[0], nil
}
