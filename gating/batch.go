package gating

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Batcher is the gating node's continuous batching across generations,
// as llama.cpp's server batches its slots: the generations inside a
// forward pass that reach the same MoE layer send its tokens together,
// one round of expert calls with one request per expert holding every
// generation's tokens routed to it (each generation's rows a segment paid
// from its own escrow, computed as its own request would be). A call
// waits only for the generations computing toward the same layer (the
// attention before it), at most Wait, so that one long prompt does not
// hold the others up; generations a round trip or more behind or ahead
// are not waited for. Generations that advance together stay together:
// from one pass to the next they reach each layer at about the same time.
// Each generation's results are exactly what it gets alone: the expert
// nodes compute each segment as its own request.
type Batcher struct {
	r *RemoteExperts
	// wait bounds how long a call waits for the other generations' (0 or
	// less: every call goes alone).
	wait time.Duration

	mu      sync.Mutex
	inPass  map[*Member]struct{} // generations inside a forward pass
	pending []*pendingCall
	timer   *time.Timer
	timerAt time.Time

	// rounds counts the rounds sent, calls the generations' MoE calls
	// they carried.
	rounds, calls atomic.Int64
}

// NewBatcher batches the calls of r's generations, each waiting at most
// wait for the others (0 or less: no batching).
func NewBatcher(r *RemoteExperts, wait time.Duration) *Batcher {
	return &Batcher{r: r, wait: wait, inPass: map[*Member]struct{}{}}
}

// Rounds counts the layer rounds sent and the generations' MoE calls they
// carried: calls ÷ rounds is the mean number of generations per round.
func (b *Batcher) Rounds() (rounds, calls int64) { return b.rounds.Load(), b.calls.Load() }

type pendingCall struct {
	ctx   context.Context
	m     *Member
	phase int // the member's MoE calls before this one in its pass
	since time.Time
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
	// guarded by b.mu: the MoE calls answered in the current pass, and
	// whether one is waiting or in flight
	calls   int
	waiting bool
}

// Join binds generation g to the batcher.
func (b *Batcher) Join(g *Generation) *Member { return &Member{b: b, g: g} }

// Enter marks the start of a forward pass: the calls of the generations
// at its first MoE layer wait for its own.
func (m *Member) Enter() {
	m.b.mu.Lock()
	m.b.inPass[m] = struct{}{}
	m.calls, m.waiting = 0, false
	m.b.mu.Unlock()
}

// Leave marks its end.
func (m *Member) Leave() {
	b := m.b
	b.mu.Lock()
	delete(b.inPass, m)
	ready := b.readyLocked(time.Now())
	b.mu.Unlock()
	if ready != nil {
		go b.send(ready)
	}
}

// MoE implements moe.Experts.
func (m *Member) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	return m.b.call(ctx, m, false, layer, x, n, selected, weights)
}

// MoEApart implements moe.ApartExperts: the expert nodes compute each row
// as a batch of one where their results depend on the batch.
func (m *Member) MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	return m.b.call(ctx, m, true, layer, x, n, selected, weights)
}

func (b *Batcher) call(ctx context.Context, m *Member, apart bool, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	if b.wait <= 0 {
		return b.r.moe(ctx, m.g, apart, layer, x, n, selected, weights)
	}
	start := time.Now()
	c := &pendingCall{ctx: ctx, m: m, since: start, layer: layer, done: make(chan roundResult, 1),
		p: part{cs: m.g.callState(apart), x: x, n: n, selected: selected, weights: weights}}
	b.mu.Lock()
	c.phase, m.waiting = m.calls, true
	b.pending = append(b.pending, c)
	ready := b.readyLocked(start)
	b.mu.Unlock()
	switch {
	case len(ready) == 1 && ready[0] == c:
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
		m.waiting = false
		b.mu.Unlock()
		return nil, ctx.Err()
	}
}

// readyLocked takes the pending calls of each phase (the count of MoE
// calls their generations made before in their pass, which is their
// layer) that no generation computing toward that phase will join, or
// that waited their time; it sets the timer for the others.
func (b *Batcher) readyLocked(now time.Time) []*pendingCall {
	if len(b.pending) == 0 {
		return nil
	}
	// coming: some generation computes toward the phase
	coming := func(phase int) bool {
		for m := range b.inPass {
			if !m.waiting && m.calls == phase {
				return true
			}
		}
		return false
	}
	var ready, left []*pendingCall
	var next time.Time
	for _, c := range b.pending {
		due := c.since.Add(b.wait)
		if !now.Before(due) || !coming(c.phase) {
			ready = append(ready, c)
			continue
		}
		left = append(left, c)
		if next.IsZero() || due.Before(next) {
			next = due
		}
	}
	// A call leaves with the others of its phase.
	if len(ready) > 0 && len(left) > 0 {
		go1 := map[int]bool{}
		for _, c := range ready {
			go1[c.phase] = true
		}
		kept := left[:0]
		for _, c := range left {
			if go1[c.phase] {
				ready = append(ready, c)
			} else {
				kept = append(kept, c)
			}
		}
		left = kept
	}
	b.pending = left
	if len(left) > 0 && (b.timer == nil || next.Before(b.timerAt)) {
		if b.timer != nil {
			b.timer.Stop()
		}
		b.timerAt = next
		b.timer = time.AfterFunc(next.Sub(now), b.expire)
	}
	return ready
}

// expire sends the calls that waited their time.
func (b *Batcher) expire() {
	b.mu.Lock()
	b.timer = nil
	ready := b.readyLocked(time.Now())
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
	// Each generation now computes toward its next MoE layer: the calls of
	// the others that get there first wait for it.
	b.mu.Lock()
	for _, c := range calls {
		c.m.calls, c.m.waiting = c.phase+1, false
	}
	b.mu.Unlock()
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
