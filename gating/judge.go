package gating

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
)

// maxJudged bounds the experts a gating node keeps loaded to judge with.
const maxJudged = 16

// judgeFetchRate caps the judge's shard fetches (bytes a second): they run
// beside the generations, on the same links and cores as the expert calls.
const judgeFetchRate = 4 << 20

// ErrJudgeBusy: the judge is fetching or loading another expert's shard
// (LocalFunc without wait).
var ErrJudgeBusy = errors.New("fetching or loading another expert's shard")

// localJudge computes expert tasks on the gating node from the experts'
// shards, fetched by CID (and so verified) when the store lacks them. It
// keeps the last maxJudged experts loaded, and gets one expert at a time:
// a check of a new peer comes with each of its answers until the first
// is decided, and each took a shard read, verified and loaded at once (8
// to 24 shards of 12 MiB in the first tokens of a loopback testnet's
// generation, 0.2 to 1.3 s of the gating node's core, which has the
// generation's attention to compute). A check that finds it busy asks a
// proven peer instead, or waits its turn (LocalFunc's wait).
type localJudge struct {
	f       Fetcher
	loader  moe.ExpertLoader
	threads int

	mu     sync.Mutex
	loaded map[judgedKey]moe.Expert
	order  []judgedKey   // least recently used first
	turn   chan struct{} // held while a shard is fetched or loaded: one at a time
}

type judgedKey struct {
	model cid.Cid
	k     expert.Key
}

func newLocalJudge(f Fetcher, loader moe.ExpertLoader, threads int) *localJudge {
	return &localJudge{f: f, loader: loader, threads: max(1, threads), loaded: map[judgedKey]moe.Expert{}, turn: make(chan struct{}, 1)}
}

func (j *localJudge) get(ctx context.Context, model cid.Cid, k expert.Key, wait func() bool) (moe.Expert, error) {
	key := judgedKey{model, k}
	if e := j.cached(key); e != nil {
		return e, nil
	}
	// One expert fetched or loaded at a time: checks must not crowd out
	// the expert calls they check.
	waited := false
	select {
	case j.turn <- struct{}{}:
	default:
		if wait == nil {
			return nil, ErrJudgeBusy
		}
		select {
		case j.turn <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		waited = true
	}
	defer func() { <-j.turn }()
	// Loaded by the turn's last holder, between the look above and this.
	if e := j.cached(key); e != nil {
		return e, nil
	}
	if waited && !wait() {
		return nil, ErrJudgeBusy
	}
	return j.load(ctx, key)
}

// load fetches, verifies and loads key's shard. Hold the turn.
func (j *localJudge) load(ctx context.Context, key judgedKey) (moe.Expert, error) {
	model, k := key.model, key.k
	m, err := j.f.Store().Manifest(model)
	if err != nil {
		return nil, err
	}
	er := m.ExpertRef(k.Layer, k.Expert)
	if er == nil {
		return nil, fmt.Errorf("expert %s: not in the manifest", k)
	}
	ref := er.GetShard()
	c, err := cid.Cast(ref.GetCid())
	if err != nil {
		return nil, err
	}
	if !j.f.Store().Has(c) {
		// the fetch's rate capped too
		if err := j.f.Fetch(expert.WithRateLimit(ctx, judgeFetchRate), c); err != nil {
			return nil, err
		}
	}
	shard, err := j.f.Store().OpenShard(ref)
	if err != nil {
		return nil, err
	}
	e, err := moe.NewExpertFromShard(j.loader, shard, k.Layer, moe.ExpertOptions{Threads: j.threads})
	if err != nil {
		return nil, err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.loaded[key] = e // the turn's holder alone loads: not loaded meanwhile
	j.order = append(j.order, key)
	for len(j.order) > maxJudged {
		j.loaded[j.order[0]].Close()
		delete(j.loaded, j.order[0])
		j.order = j.order[1:]
	}
	return e, nil
}

// cached is key's expert if it is loaded (marked most recently used), or nil.
func (j *localJudge) cached(key judgedKey) moe.Expert {
	j.mu.Lock()
	defer j.mu.Unlock()
	e := j.loaded[key]
	if e != nil {
		j.touch(key)
	}
	return e
}

// touch marks key most recently used. Hold mu.
func (j *localJudge) touch(key judgedKey) {
	for i, x := range j.order {
		if x == key {
			j.order = append(append(j.order[:i:i], j.order[i+1:]...), key)
			return
		}
	}
}

// compute implements LocalFunc.
func (j *localJudge) compute(ctx context.Context, model cid.Cid, k expert.Key, in []float32, n int, wait func() bool) ([]float32, error) {
	var e moe.Expert
	for attempt := 0; ; attempt++ {
		var err error
		if e, err = j.get(ctx, model, k, wait); err != nil {
			return nil, fmt.Errorf("judge %s: %w", k, err)
		}
		// Compute under mu, so that no eviction closes the expert meanwhile;
		// if one did before the lock, load it again.
		j.mu.Lock()
		if j.loaded[judgedKey{model, k}] == e {
			break
		}
		j.mu.Unlock()
		if attempt == 2 {
			return nil, fmt.Errorf("judge %s: evicted while loading", k)
		}
	}
	defer j.mu.Unlock()
	if len(in) != n*e.Embd() {
		return nil, fmt.Errorf("judge %s: %d floats for %d tokens of %d", k, len(in), n, e.Embd())
	}
	out := make([]float32, len(in))
	if err := moe.ComputeBatched(e, in, n, out); err != nil {
		return nil, fmt.Errorf("judge %s: %w", k, err)
	}
	return out, nil
}

// Close frees the loaded experts.
func (j *localJudge) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	var errs []error
	for _, e := range j.loaded {
		errs = append(errs, e.Close())
	}
	j.loaded = map[judgedKey]moe.Expert{}
	j.order = nil
	return errors.Join(errs...)
}
