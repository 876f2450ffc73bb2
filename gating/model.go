package gating

import (
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
)

// Model is the gating part of a model, loaded: the gating compute and the
// tokenizer. Its experts are elsewhere (RemoteExperts).
type Model struct {
	Vocab  moe.Vocab
	Gating moe.Gating
	// Draft is the draft model of speculative decoding, if any.
	Draft moe.DraftModel
}

// Load loads a model's gating part from a node's store (the manifest and
// gating shard, verified by CID) with backend.
func Load(backend moe.GatingLoader, store *expert.Store, mc cid.Cid, threads int) (_ *Model, err error) {
	m, err := store.Manifest(mc)
	if err != nil {
		return nil, err
	}
	gs, err := store.OpenShard(m.GetGating())
	if err != nil {
		return nil, fmt.Errorf("gating %w", err)
	}
	hp, err := moe.HparamsOf(m, gs)
	if err != nil {
		return nil, err
	}
	gc, _ := cid.Cast(m.GetGating().GetCid())
	sm := &Model{}
	defer func() {
		if err != nil {
			err = errors.Join(err, sm.Close())
		}
	}()
	if sm.Vocab, err = backend.LoadVocab(store.Path(gc)); err != nil {
		return nil, err
	}
	if sm.Gating, err = backend.NewGating(hp, gs, threads); err != nil {
		return nil, err
	}
	return sm, nil
}

// Close frees the gating compute and the tokenizer.
func (m *Model) Close() error {
	var errs []error
	if m.Gating != nil {
		errs = append(errs, m.Gating.Close())
	}
	if m.Vocab != nil {
		errs = append(errs, m.Vocab.Close())
	}
	if m.Draft != nil {
		errs = append(errs, m.Draft.Close())
	}
	return errors.Join(errs...)
}
