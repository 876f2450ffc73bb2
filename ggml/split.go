package ggml

import (
	"context"
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// SplitModel is a model run from its shards in one process: the gating
// compute, every expert as a moe.LocalExperts, and llama.cpp's tokenizer read
// from the gating shard. It is the single-machine form of the distributed
// forward pass.
type SplitModel struct {
	Vocab   *Llama
	Gating  *Gating
	Experts *moe.LocalExperts
	// UBatch is the most tokens GenerateGreedy's forward passes compute at
	// a time (0: DefaultUBatch), as ContextOptions.UBatch for llama.cpp.
	UBatch int
}

// LoadSplit loads the split model in dir (verifying the manifest against
// want, if defined, and every shard against its CID).
func LoadSplit(dir string, want cid.Cid, threads int) (_ *SplitModel, err error) {
	return LoadSplitOn(Device{}, dir, want, threads)
}

// LoadSplitOn is LoadSplit with the gating compute and every expert on
// device dev.
func LoadSplitOn(dev Device, dir string, want cid.Cid, threads int) (_ *SplitModel, err error) {
	m, _, err := model.LoadManifest(dir, want)
	if err != nil {
		return nil, err
	}
	gs, err := model.OpenShard(dir, m.GetGating())
	if err != nil {
		return nil, fmt.Errorf("gating %w", err)
	}
	hp, err := moe.HparamsOf(m, gs)
	if err != nil {
		return nil, err
	}
	sm := &SplitModel{Experts: &moe.LocalExperts{Embd: hp.Embd, Used: hp.ExpertsUsed, Experts: map[[2]int]moe.Expert{},
		Layers: map[int]moe.LayerComputer{}}}
	defer func() {
		if err != nil {
			err = errors.Join(err, sm.Close())
		}
	}()
	c, _ := cid.Cast(m.GetGating().GetCid())
	if sm.Vocab, err = LoadVocab(model.ShardPath(dir, c)); err != nil {
		return nil, err
	}
	if sm.Gating, err = NewGatingOn(dev, hp, gs, threads); err != nil {
		return nil, err
	}
	// Each MoE layer's routed experts in one stack, computed as
	// llama.cpp computes a layer; the hosted shared experts on their own.
	layers := map[int][]moe.ExpertWeights{}
	for _, ref := range m.GetExperts() {
		s, err := model.OpenShard(dir, ref.GetShard())
		if err != nil {
			return nil, fmt.Errorf("expert %d:%d: %w", ref.GetLayer(), ref.GetExpert(), err)
		}
		w, err := moe.ExpertWeightsOf(s, int(ref.GetLayer()))
		if err != nil {
			return nil, fmt.Errorf("expert %d:%d: %w", ref.GetLayer(), ref.GetExpert(), err)
		}
		layers[int(ref.GetLayer())] = append(layers[int(ref.GetLayer())], w)
	}
	for l, ws := range layers {
		st, err := NewStack(dev, ws, hp.ExpertsUsed, moe.ExpertOptions{Threads: threads})
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", l, err)
		}
		sm.Experts.Layers[l] = st
	}
	for _, ref := range m.GetShared() {
		s, err := model.OpenShard(dir, ref.GetShard())
		if err != nil {
			return nil, fmt.Errorf("shared expert %d:%d: %w", ref.GetLayer(), ref.GetExpert(), err)
		}
		e, err := moe.NewExpertFromShard(Backend{Device: dev}, s, int(ref.GetLayer()), moe.ExpertOptions{Threads: threads})
		if err != nil {
			return nil, fmt.Errorf("shared expert %d:%d: %w", ref.GetLayer(), ref.GetExpert(), err)
		}
		sm.Experts.Experts[[2]int{int(ref.GetLayer()), int(ref.GetExpert())}] = e
	}
	return sm, nil
}

// Close frees everything.
func (sm *SplitModel) Close() error {
	var errs []error
	if sm.Experts != nil {
		errs = append(errs, sm.Experts.Close())
	}
	if sm.Gating != nil {
		errs = append(errs, sm.Gating.Close())
	}
	if sm.Vocab != nil {
		errs = append(errs, sm.Vocab.Close())
	}
	return errors.Join(errs...)
}

// GenerateGreedy generates as Llama.GenerateGreedy does, through the
// gating compute and experts (sm.Experts when experts is nil).
func (sm *SplitModel) GenerateGreedy(ctx context.Context, prompt string, maxTokens, nCtx int, experts moe.Experts, keepLogits bool) (*Generation, error) {
	if maxTokens < 1 {
		return nil, fmt.Errorf("max tokens %d: must be at least 1", maxTokens)
	}
	if experts == nil {
		experts = sm.Experts
	}
	toks, err := sm.Vocab.Tokenize(prompt, true)
	if err != nil {
		return nil, err
	}
	if nCtx <= 0 {
		nCtx = min(sm.Gating.Hparams().CtxLen, 4096)
	}
	if len(toks)+maxTokens > nCtx {
		return nil, fmt.Errorf("prompt of %d tokens + %d new tokens: %w (%d tokens)", len(toks), maxTokens, moe.ErrContextFull, nCtx)
	}
	s, err := sm.Gating.NewSessionUBatch(nCtx, sm.UBatch)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return sm.Vocab.greedy(toks, maxTokens, keepLogits, func(next []int32) ([]float32, error) {
		return s.Forward(ctx, next, experts)
	})
}
