package gating

import (
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
)

// Load loads a model's gating part from a node's store (the manifest and
// gating shard, verified by CID): the gating compute and the tokenizer.
// Its Experts are nil: pass RemoteExperts to GenerateGreedy.
func Load(store *expert.Store, mc cid.Cid, threads int) (_ *ggml.SplitModel, err error) {
	m, err := store.Manifest(mc)
	if err != nil {
		return nil, err
	}
	gs, err := store.OpenShard(m.GetGating())
	if err != nil {
		return nil, fmt.Errorf("gating %w", err)
	}
	hp, err := ggml.HparamsOf(m, gs)
	if err != nil {
		return nil, err
	}
	gc, _ := cid.Cast(m.GetGating().GetCid())
	sm := &ggml.SplitModel{}
	defer func() {
		if err != nil {
			err = errors.Join(err, sm.Close())
		}
	}()
	if sm.Vocab, err = ggml.LoadVocab(store.Path(gc)); err != nil {
		return nil, err
	}
	if sm.Gating, err = ggml.NewGating(hp, gs, threads); err != nil {
		return nil, err
	}
	return sm, nil
}
