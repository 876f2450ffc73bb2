package gating

import (
	"errors"
	"fmt"
	"sync"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
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
	if sm.Gating, err = LoadGating(backend, store, mc, threads); err != nil {
		return nil, err
	}
	return sm, nil
}

// LoadGating loads a model's whole gating part (every layer and the head)
// from the gating shard in a node's store.
func LoadGating(backend moe.GatingLoader, store *expert.Store, mc cid.Cid, threads int) (moe.Gating, error) {
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
	return backend.NewGating(hp, gs, threads)
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

// LoadHead loads a model's head alone — the head shard's embeddings, final
// norm and output head, and its tokenizer — and leaves the layers' weights
// (the gating shard) to be loaded when a session first needs them
// (layers): a head whose generations all go through spans never loads
// them. The model's Gating is then a *Layered. The manifest must have
// layer shards (format 2) and backend must load parts.
func LoadHead(backend moe.GatingLoader, store *expert.Store, mc cid.Cid, threads int, layers func() (moe.Gating, error)) (_ *Model, err error) {
	pl, ok := backend.(moe.PartLoader)
	if !ok {
		return nil, errors.New("the compute backend cannot load part of a model")
	}
	m, err := store.Manifest(mc)
	if err != nil {
		return nil, err
	}
	if m.GetHead() == nil {
		return nil, fmt.Errorf("model %s was split without layer shards (manifest format %d)", mc, m.GetFormat())
	}
	hs, err := store.OpenShard(m.GetHead())
	if err != nil {
		return nil, fmt.Errorf("head %w", err)
	}
	hp, err := moe.HparamsOf(m, hs)
	if err != nil {
		return nil, err
	}
	hc, _ := cid.Cast(m.GetHead().GetCid())
	sm := &Model{}
	defer func() {
		if err != nil {
			err = errors.Join(err, sm.Close())
		}
	}()
	if sm.Vocab, err = backend.LoadVocab(store.Path(hc)); err != nil {
		return nil, err
	}
	head, err := pl.NewGatingPart(hp, model.Shards{hs}, moe.Part{Head: true}, threads)
	if err != nil {
		return nil, err
	}
	sm.Gating = &Layered{head: head, load: layers}
	return sm, nil
}

// Layered is a model's gating whose head is loaded and whose layers are
// loaded the first time a session needs them: a head session
// (moe.HeadSessioner, a chain of spans' head) needs the head only; any
// other session, the whole gating part.
type Layered struct {
	head moe.Gating
	load func() (moe.Gating, error)

	// loading is held while the layers load (one load at a time); mu
	// guards the state and is never held across a load, so that what
	// asks whether the layers are loaded (a status, the models' list
	// under the engine's lock) does not wait for a load that may itself
	// wait for that lock (the engine sizes its sessions from the loaded
	// layers).
	loading sync.Mutex
	mu      sync.Mutex
	layers  moe.Gating
	closed  bool
}

var (
	_ moe.Gating        = (*Layered)(nil)
	_ moe.HeadSessioner = (*Layered)(nil)
	_ moe.SessionSizer  = (*Layered)(nil)
)

// sizer is the gating whose sessions size the memory: the layers' once
// loaded (loaded), else the head's (a head session keeps no KV cache).
func (l *Layered) sizer() (sz moe.SessionSizer, loaded bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if sz, ok := l.layers.(moe.SessionSizer); ok && l.layers != nil {
		return sz, true
	}
	if sz, ok := l.head.(moe.SessionSizer); ok {
		return sz, false
	}
	return nil, false
}

// SessionBytes is a session's memory: the layers' KV cache once they are
// loaded, else a head session's, at least a byte (it keeps no cache: as
// many as the engine allows).
func (l *Layered) SessionBytes(nCtx int) int64 {
	sz, loaded := l.sizer()
	switch {
	case loaded:
		return sz.SessionBytes(nCtx)
	case sz != nil:
		return max(sz.SessionBytes(nCtx), 1)
	}
	return 1
}

// SessionMemory is the memory the sessions may take in all.
func (l *Layered) SessionMemory() int64 {
	if sz, _ := l.sizer(); sz != nil {
		return sz.SessionMemory()
	}
	return 0
}

// Hparams returns the model's hyper-parameters.
func (l *Layered) Hparams() moe.Hparams { return l.head.Hparams() }

// NewHeadSession makes a session of the head alone (no KV cache, no
// layers).
func (l *Layered) NewHeadSession(nCtx int) (moe.Session, error) {
	if hs, ok := l.head.(moe.HeadSessioner); ok {
		return hs.NewHeadSession(nCtx)
	}
	return l.head.NewSession(nCtx)
}

// NewSession makes a session of the whole gating part, loading its layers
// first if they are not yet (the caller waits for that once).
func (l *Layered) NewSession(nCtx int) (moe.Session, error) {
	g, err := l.Layers()
	if err != nil {
		return nil, err
	}
	return g.NewSession(nCtx)
}

// Layers returns the whole gating part, loading it if it is not yet.
func (l *Layered) Layers() (moe.Gating, error) {
	loaded := func() (moe.Gating, error) {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.closed {
			return nil, errors.New("the model is closed")
		}
		return l.layers, nil
	}
	if g, err := loaded(); g != nil || err != nil {
		return g, err
	}
	l.loading.Lock()
	defer l.loading.Unlock()
	if g, err := loaded(); g != nil || err != nil {
		return g, err // another caller loaded them meanwhile
	}
	g, err := l.load()
	if err != nil {
		return nil, fmt.Errorf("load the model's layers: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errors.Join(errors.New("the model is closed"), g.Close())
	}
	l.layers = g
	return g, nil
}

// Lockstep counts the loaded layers' lockstep graphs and rows (0 before
// they load).
func (l *Layered) Lockstep() (graphs, rows int64) {
	l.mu.Lock()
	g := l.layers
	l.mu.Unlock()
	if c, ok := g.(lockstepCounter); ok {
		return c.Lockstep()
	}
	return 0, 0
}

// LayersLoaded says whether the layers' weights are loaded.
func (l *Layered) LayersLoaded() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.layers != nil
}

// Close frees the head and the layers, if loaded.
func (l *Layered) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	errs := []error{l.head.Close()}
	if l.layers != nil {
		errs = append(errs, l.layers.Close())
		l.layers = nil
	}
	return errors.Join(errs...)
}
