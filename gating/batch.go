package gating

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Batcher is the gating node's continuous batching across generations,
// as llama.cpp's server batches its slots: the MoE calls of every
// generation inside a forward pass go out together, one round of expert
// calls per layer with one request per expert holding every generation's
// tokens routed to it (each generation's rows a segment paid from its own
// escrow, computed as its own request would be). A round leaves once every
// generation inside a forward pass waits for one (or after Wait, so that
// one long prompt does not hold the others); a generation that starts
// joins the next round. Generations' results are exactly what each gets
// alone: the expert nodes compute each segment as its own request.
type Batcher struct {
	r *RemoteExperts
	// wait bounds how long a call waits for the other generations' (0:
	// every call goes alone).
	wait time.Duration

	mu      sync.Mutex
	active  int // generations inside a forward pass
	pending []*pendingCall
	timer   *time.Timer
	seq     uint64 // counts rounds sent, so that a stale timer does nothing

	// rounds counts the rounds sent, calls the generations' MoE calls
	// they carried.
	rounds, calls atomic.Int64
}

// NewBatcher batches the calls of r's generations, each waiting at most
// wait for the others (0: no batching).
func NewBatcher(r *RemoteExperts, wait time.Duration) *Batcher {
	return &Batcher{r: r, wait: wait}
}

// Rounds counts the layer rounds sent and the generations' MoE calls they
// carried: calls ÷ rounds is the mean number of generations per round.
func (b *Batcher) Rounds() (rounds, calls int64) { return b.rounds.Load(), b.calls.Load() }

type pendingCall struct {
	ctx   context.Context
	layer int
	p     part
	done  chan roundResult
}

type roundResult struct {
	pr  partResult
	err error
}

// Member is a generation's side of the batcher: its moe.Experts (and
// moe.ApartExperts), and Enter and Leave around each forward pass.
type Member struct {
	b *Batcher
	g *Generation
}

// Join binds generation g to the batcher.
func (b *Batcher) Join(g *Generation) *Member { return &Member{b: b, g: g} }

// Enter marks the start of a forward pass: rounds wait for its calls.
func (m *Member) Enter() {
	m.b.mu.Lock()
	m.b.active++
	m.b.mu.Unlock()
}

// Leave marks its end.
func (m *Member) Leave() {
	b := m.b
	b.mu.Lock()
	b.active--
	ready := b.readyLocked()
	b.mu.Unlock()
	if ready != nil {
		go b.send(ready)
	}
}

// MoE implements moe.Experts.
func (m *Member) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	return m.b.call(ctx, m.g, false, layer, x, n, selected, weights)
}

// MoEApart implements moe.ApartExperts: the expert nodes compute each row
// as a batch of one where their results depend on the batch.
func (m *Member) MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	return m.b.call(ctx, m.g, true, layer, x, n, selected, weights)
}

func (b *Batcher) call(ctx context.Context, g *Generation, apart bool, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	if b.wait <= 0 {
		return b.r.moe(ctx, g, apart, layer, x, n, selected, weights)
	}
	start := time.Now()
	c := &pendingCall{ctx: ctx, layer: layer, done: make(chan roundResult, 1),
		p: part{cs: g.callState(apart), x: x, n: n, selected: selected, weights: weights}}
	b.mu.Lock()
	b.pending = append(b.pending, c)
	ready := b.readyLocked()
	b.mu.Unlock()
	switch {
	case len(ready) == 1:
		b.send(ready) // alone: no other goroutine
	case ready != nil:
		go b.send(ready)
	}
	select {
	case res := <-c.done:
		if res.err != nil {
			return nil, res.err
		}
		res.pr.account(time.Since(start))
		return res.pr.out, nil
	case <-ctx.Done():
		b.mu.Lock()
		if i := slices.Index(b.pending, c); i >= 0 {
			b.pending = slices.Delete(b.pending, i, i+1)
		}
		b.mu.Unlock()
		return nil, ctx.Err()
	}
}

// readyLocked takes the pending calls when every generation inside a
// forward pass waits (or when called by the timer), else starts the timer.
func (b *Batcher) readyLocked() []*pendingCall {
	if len(b.pending) == 0 {
		return nil
	}
	if len(b.pending) < b.active {
		if b.timer == nil {
			seq := b.seq
			b.timer = time.AfterFunc(b.wait, func() { b.expire(seq) })
		}
		return nil
	}
	return b.takeLocked()
}

func (b *Batcher) takeLocked() []*pendingCall {
	out := b.pending
	b.pending = nil
	b.seq++
	if b.timer != nil {
		b.timer.Stop()
		b.timer = nil
	}
	return out
}

// expire sends the calls waiting since round seq began, when the others
// were too slow to join them.
func (b *Batcher) expire(seq uint64) {
	b.mu.Lock()
	var ready []*pendingCall
	if seq == b.seq && len(b.pending) > 0 {
		ready = b.takeLocked()
	}
	b.mu.Unlock()
	if ready != nil {
		b.send(ready)
	}
}

// send sends calls as rounds, one per layer (and rows-apart kind), in
// parallel, and hands each call its result.
func (b *Batcher) send(calls []*pendingCall) {
	type key struct {
		layer int
		apart bool
	}
	var keys []key
	groups := map[key][]*pendingCall{}
	for _, c := range calls {
		k := key{c.layer, c.p.cs.apart}
		if _, ok := groups[k]; !ok {
			keys = append(keys, k)
		}
		groups[k] = append(groups[k], c)
	}
	var wg sync.WaitGroup
	for i, k := range keys {
		if i == len(keys)-1 {
			b.round(k.layer, groups[k])
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.round(k.layer, groups[k])
		}()
	}
	wg.Wait()
}

// round sends one layer's calls as one round; it is cancelled once every
// call's own context is.
func (b *Batcher) round(layer int, calls []*pendingCall) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var left atomic.Int64
	left.Store(int64(len(calls)))
	parts := make([]part, len(calls))
	for i, c := range calls {
		parts[i] = c.p
		stop := context.AfterFunc(c.ctx, func() {
			if left.Add(-1) == 0 {
				cancel()
			}
		})
		defer stop()
	}
	b.rounds.Add(1)
	b.calls.Add(int64(len(calls)))
	res, err := b.r.round(ctx, layer, parts)
	for i, c := range calls {
		if err != nil {
			c.done <- roundResult{err: err}
			continue
		}
		if len(calls) > 1 && res[i].stats != nil {
			res[i].stats.SharedLayers.Add(1)
		}
		c.done <- roundResult{pr: res[i]}
	}
}
