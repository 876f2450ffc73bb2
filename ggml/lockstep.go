package ggml

/*
#include "neuro.h"
*/
import "C"

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/neuro-p2p/neuro/moe"
)

// maxLockstep is the most sessions one graph computes together.
const maxLockstep = C.NEURO_MAX_SESSIONS

// nextGrace is how long, at most, the sessions' next passes wait for a
// session whose head was computed with theirs: the time to sample its
// token and ask for the next pass.
const nextGrace = 2 * time.Millisecond

// dutyWindow is how often the lockstep judges how busy the gating's
// compute was (SetLockstep's busy).
const dutyWindow = 250 * time.Millisecond

// lockstep computes the one-row forward passes of a gating's sessions
// together, as llama.cpp's server decodes its slots in one batch: the
// sessions that reach the same layer (or the head) within wait of each
// other compute it in one graph (neuro_layer_multi), so that its weights
// are read once for all of them, and their MoE calls then leave together
// for the gating node's continuous batching. A session's row is exactly
// what it gets alone: each row takes the kernels of a one-row product.
//
// A call waits only for the sessions behind it (a layer at or before its
// own) that are expected there within wait of its arrival, judged by how
// long a session has taken from one layer's compute to the next (its MoE
// layer's expert calls) and a graph's compute: on one machine a laggard a
// layer or two behind catches up while the others wait, and the two then
// compute together; over a WAN, where the expert calls take a round trip
// longer than the wait, only the sessions whose round comes back now are
// waited for. Sessions ahead are not waited for. A session computing
// several rows (a prompt, a speculative pass) computes alone and is not
// waited for.
type lockstep struct {
	g    *Gating
	wait time.Duration
	// busy: the share of the time the lockstep's graphs must have taken
	// over the last dutyWindow for the sessions to wait for each other
	// (0: always); below it, each call goes at once. engaged says
	// whether they wait, judged at the end of each window (winStart,
	// winBusy; window long, dutyWindow); it turns off below busy ×
	// dutyOff.
	busy     float64
	window   time.Duration
	engaged  bool
	winStart time.Time
	winBusy  time.Duration
	// grace: how long a session whose head was computed is waited for
	// (min(wait, nextGrace))
	grace time.Duration

	mu sync.Mutex
	// at holds the sessions in a one-row pass and the layer each computes
	// next (hp.Layers: the head).
	at map[*Session]int
	// next holds the sessions whose head was just computed, heading for
	// their next pass, until when they are waited for (nextGrace): the
	// others' next pass begins with them.
	next map[*Session]time.Time
	// left is when each session in a pass left its last layer (or began
	// the pass); away and graph are moving averages of the time from a
	// layer's compute to the session's next call (the expert calls), and
	// of a graph's compute.
	left        map[*Session]time.Time
	away, graph time.Duration
	pending     []*stepCall
	timer       *time.Timer
	timerAt     time.Time

	// graphs counts the graphs computed, rows the sessions' rows in them.
	graphs, rows atomic.Int64
}

// stepCall is one session's row waiting to be computed at a layer (or
// the head: layer hp.Layers).
type stepCall struct {
	s        *Session
	layer    int
	lastOnly bool
	x        []float32
	since    time.Time
	out      layerOut  // a layer's outputs, filled by the group
	logits   []float32 // the head's
	done     chan error
}

// layerOut is a layer's outputs for rows rows (neuro_layer's).
type layerOut struct {
	ffnInp, moeIn, extra []float32
	selected             []int32
	weights              []float32
}

func newLayerOut(hp moe.Hparams, rows int) layerOut {
	return layerOut{ffnInp: make([]float32, rows*hp.Embd), moeIn: make([]float32, rows*hp.Embd), extra: make([]float32, rows*hp.Embd),
		selected: make([]int32, rows*hp.ExpertsUsed), weights: make([]float32, rows*hp.ExpertsUsed)}
}

// SetLockstep makes the sessions' one-row forward passes compute each
// layer and the head together, a call waiting at most wait for the
// sessions behind it (0 or less: each alone) while the gating's compute
// is busy at least busy of the time (0: always; see lockstep). It reports
// whether the gating can: on the CPU, for models without latent
// attention.
func (g *Gating) SetLockstep(wait time.Duration, busy float64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.ls = nil
	if wait <= 0 || g.hp.MLA || !g.onCPU() {
		return false
	}
	g.ls = &lockstep{g: g, wait: wait, grace: min(wait, nextGrace), busy: busy, window: dutyWindow, winStart: time.Now(),
		at: map[*Session]int{}, next: map[*Session]time.Time{}, left: map[*Session]time.Time{}}
	return true
}

// dutyOff is where an engaged lockstep turns off, as a share of busy:
// grouping makes the same sessions' compute shorter, which must not turn
// it off again at once.
const dutyOff = 0.6

// judgeLocked adds a graph's compute to the window and, at its end,
// engages the lockstep or not by how busy the compute was.
func (ls *lockstep) judgeLocked(now time.Time, took time.Duration) {
	ls.winBusy += took
	w := now.Sub(ls.winStart)
	if w < ls.window {
		return
	}
	switch duty := float64(ls.winBusy) / float64(w); {
	case duty >= ls.busy:
		ls.engaged = true
	case duty < ls.busy*dutyOff:
		ls.engaged = false
	}
	ls.winStart, ls.winBusy = now, 0
}

// waitLocked is how long a call waits for the sessions behind it: wait
// while engaged (or always, busy 0), else 0.
func (ls *lockstep) waitLocked() time.Duration {
	if ls.busy <= 0 || ls.engaged {
		return ls.wait
	}
	return 0
}

// Lockstep counts the graphs the sessions' lockstep computed and the rows
// they held: rows ÷ graphs is the mean number of sessions a graph served.
func (g *Gating) Lockstep() (graphs, rows int64) {
	g.mu.Lock()
	ls := g.ls
	g.mu.Unlock()
	if ls == nil {
		return 0, 0
	}
	return ls.graphs.Load(), ls.rows.Load()
}

// lockstepper is the gating's lockstep, nil when off.
func (g *Gating) lockstepper() *lockstep {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ls
}

// begin marks s in a one-row pass that computes layer first next.
func (ls *lockstep) begin(s *Session, first int) {
	ls.mu.Lock()
	ls.at[s] = first
	ls.left[s] = time.Now()
	delete(ls.next, s)
	ls.mu.Unlock()
}

// end takes s out of the lockstep (its pass done or failed, or closed):
// the calls that waited for it need not.
func (ls *lockstep) end(s *Session) {
	ls.mu.Lock()
	if _, ok := ls.at[s]; !ok {
		ls.mu.Unlock()
		return
	}
	ls.forgetLocked(s)
	ready := ls.readyLocked(time.Now())
	ls.mu.Unlock()
	if ready != nil {
		go ls.run(ready)
	}
}

// forgetLocked takes s out.
func (ls *lockstep) forgetLocked(s *Session) {
	delete(ls.at, s)
	delete(ls.next, s)
	delete(ls.left, s)
}

// average moves the moving average avg towards d.
func average(avg, d time.Duration) time.Duration {
	if avg == 0 {
		return d
	}
	return avg + (d-avg)/8
}

// layer computes s's row x at layer l (lastOnly: the model's last layer
// of a pass that wants only the last row), together with the sessions
// that get there within the wait, into out.
func (ls *lockstep) layer(ctx context.Context, s *Session, l int, lastOnly bool, x []float32, out layerOut) error {
	return ls.call(ctx, &stepCall{s: s, layer: l, lastOnly: lastOnly, x: x, out: out})
}

// head computes s's row x through the output head into logits.
func (ls *lockstep) head(ctx context.Context, s *Session, x, logits []float32) error {
	return ls.call(ctx, &stepCall{s: s, layer: ls.g.hp.Layers, x: x, logits: logits})
}

func (ls *lockstep) call(ctx context.Context, c *stepCall) error {
	c.since, c.done = time.Now(), make(chan error, 1)
	ls.mu.Lock()
	if at, ok := ls.at[c.s]; ok && at == c.layer && c.layer > ls.g.part.First && c.layer < ls.g.hp.Layers {
		if left, ok := ls.left[c.s]; ok {
			ls.away = average(ls.away, c.since.Sub(left)) // back from the last layer's expert calls
		}
	}
	ls.at[c.s] = c.layer
	delete(ls.next, c.s)
	ls.pending = append(ls.pending, c)
	ready := ls.readyLocked(c.since)
	ls.mu.Unlock()
	if len(ready) == 1 && slices.Contains(ready[0], c) {
		ls.run(ready) // its own group: no other goroutine
	} else if ready != nil {
		go ls.run(ready)
	}
	select {
	case err := <-c.done:
		return err
	case <-ctx.Done():
		ls.mu.Lock()
		if i := slices.Index(ls.pending, c); i >= 0 {
			ls.pending = slices.Delete(ls.pending, i, i+1)
			ls.forgetLocked(c.s)
			ready := ls.readyLocked(time.Now())
			ls.mu.Unlock()
			if ready != nil {
				go ls.run(ready)
			}
			return ctx.Err()
		}
		ls.mu.Unlock()
		// Taken into a group: the graph writes into c's buffers.
		return <-c.done
	}
}

// readyLocked takes the groups of pending calls, one per layer (the
// lowest first), that no session behind them will join or whose first
// call waited its time, and sets the timer for the others.
func (ls *lockstep) readyLocked(now time.Time) [][]*stepCall {
	if len(ls.pending) == 0 {
		return nil
	}
	wait := ls.waitLocked()
	waiting := map[*Session]bool{}
	for _, c := range ls.pending {
		waiting[c.s] = true
	}
	var graceEnds time.Time
	// behind: a session that is not waiting at layer l and is expected
	// there by deadline (one waiting at an earlier layer will come too)
	behind := func(l int, deadline time.Time) bool {
		for s, at := range ls.at {
			if at > l || at == l && waiting[s] {
				continue
			}
			if until, ok := ls.next[s]; ok {
				if !now.Before(until) {
					continue
				}
				if graceEnds.IsZero() || until.Before(graceEnds) {
					graceEnds = until
				}
				return true // sampling after the head: its next pass comes now
			}
			// waiting at an earlier layer: a graph and the expert calls for
			// each layer before l; else, from its last layer's compute, the
			// expert calls first
			eta := now.Add(time.Duration(l-at) * (ls.graph + ls.away))
			if !waiting[s] {
				from, ok := ls.left[s]
				if !ok {
					from = now
				}
				eta = from.Add(ls.away + time.Duration(l-at)*(ls.graph+ls.away))
			}
			if !eta.After(deadline) {
				return true
			}
		}
		return false
	}
	goes := map[int]bool{}
	for _, c := range ls.pending {
		if deadline := c.since.Add(wait); !goes[c.layer] && (!now.Before(deadline) || !behind(c.layer, deadline)) {
			goes[c.layer] = true
		}
	}
	var ready [][]*stepCall
	group := map[int]int{}
	left := ls.pending[:0]
	var next time.Time
	for _, c := range ls.pending {
		if goes[c.layer] {
			i, ok := group[c.layer]
			if !ok {
				i, group[c.layer] = len(ready), len(ready)
				ready = append(ready, nil)
			}
			ready[i] = append(ready[i], c)
			continue
		}
		left = append(left, c)
		if due := c.since.Add(wait); next.IsZero() || due.Before(next) {
			next = due
		}
	}
	clear(ls.pending[len(left):])
	ls.pending = left
	if len(left) > 0 && !graceEnds.IsZero() && (next.IsZero() || graceEnds.Before(next)) {
		next = graceEnds // a waited-for session's grace ends first
	}
	ls.arm(now, next)
	slices.SortFunc(ready, func(a, b []*stepCall) int { return a[0].layer - b[0].layer })
	return ready
}

// arm sets the timer for the earliest pending deadline next (zero: none).
func (ls *lockstep) arm(now, next time.Time) {
	if next.IsZero() || ls.timer != nil && !next.Before(ls.timerAt) {
		return
	}
	if ls.timer != nil {
		ls.timer.Stop()
	}
	ls.timerAt = next
	ls.timer = time.AfterFunc(next.Sub(now), ls.expire)
}

// expire sends the groups whose calls waited their time.
func (ls *lockstep) expire() {
	ls.mu.Lock()
	ls.timer = nil
	ready := ls.readyLocked(time.Now())
	ls.mu.Unlock()
	if ready != nil {
		ls.run(ready)
	}
}

// run computes each group (in pieces of at most maxLockstep sessions)
// and hands each call its result; each session then heads for its next
// layer (after the head: out of the lockstep until its next pass).
func (ls *lockstep) run(groups [][]*stepCall) {
	for _, group := range groups {
		for len(group) > 0 {
			n := min(len(group), maxLockstep)
			part := group[:n]
			group = group[n:]
			start := time.Now()
			busy, err := ls.compute(part)
			took := time.Since(start)
			ls.graphs.Add(1)
			ls.rows.Add(int64(len(part)))
			ls.mu.Lock()
			now := time.Now()
			ls.graph = average(ls.graph, took)
			ls.judgeLocked(now, busy)
			for _, c := range part {
				ls.left[c.s] = now
				switch {
				case err != nil:
					ls.forgetLocked(c.s)
				case c.layer >= ls.g.hp.Layers:
					// heading for its next pass, waited for a moment
					ls.at[c.s], ls.next[c.s] = ls.g.part.First, now.Add(ls.grace)
				default:
					ls.at[c.s] = c.layer + 1
				}
			}
			ready := ls.readyLocked(now)
			ls.mu.Unlock()
			for _, c := range part {
				c.done <- err
			}
			if ready != nil {
				go ls.run(ready)
			}
		}
	}
}

// compute runs one graph for calls, all at one layer (or the head), and
// says how long it computed (once it had the gating to itself).
func (ls *lockstep) compute(calls []*stepCall) (time.Duration, error) {
	g := ls.g
	g.mu.Lock()
	defer g.mu.Unlock()
	computeMu.Lock()
	defer computeMu.Unlock()
	start := time.Now()
	err := ls.computeLocked(calls)
	return time.Since(start), err
}

// computeLocked is compute with the gating and ggml's compute held.
func (ls *lockstep) computeLocked(calls []*stepCall) error {
	g, hp := ls.g, ls.g.hp
	n := len(calls)
	if g.c == nil {
		return moe.ErrClosed
	}
	ss := make([]*C.neuro_session, n)
	for i, c := range calls {
		if c.s.c == nil {
			return moe.ErrClosed
		}
		ss[i] = c.s.c
	}
	x := make([]float32, n*hp.Embd)
	for i, c := range calls {
		copy(x[i*hp.Embd:], c.x)
	}
	if n > 1 && g.threads < poolThreads {
		// Several sessions' rows are worth waking every core for; one
		// session's row computes as it does alone.
		if C.neuro_gating_set_threads(g.c, C.int(poolThreads)) == 0 {
			defer C.neuro_gating_set_threads(g.c, C.int(g.threads))
		}
	}
	if calls[0].layer >= hp.Layers {
		logits := make([]float32, n*hp.Vocab)
		if rc := C.neuro_output(ss[0], (*C.float)(&x[0]), C.int(n), cbool(n > 1), (*C.float)(&logits[0])); rc != 0 {
			return fmt.Errorf("output of %d sessions: ggml compute failed (code %d)", n, int(rc))
		}
		for i, c := range calls {
			copy(c.logits, logits[i*hp.Vocab:(i+1)*hp.Vocab])
		}
		return nil
	}
	pos := make([]C.int, n)
	for i, c := range calls {
		pos[i] = C.int(c.s.pos)
	}
	// Alone, the call's own graph (with llama.cpp's output row); together,
	// one row each, for which that row is the same.
	lastOnly := n == 1 && calls[0].lastOnly
	out := newLayerOut(hp, n)
	if rc := C.neuro_layer_multi(&ss[0], C.int(n), C.int(calls[0].layer), (*C.float)(&x[0]), 1, &pos[0], cbool(lastOnly),
		(*C.float)(&out.ffnInp[0]), (*C.float)(&out.moeIn[0]), (*C.int32_t)(unsafe.Pointer(&out.selected[0])), (*C.float)(&out.weights[0]),
		(*C.float)(&out.extra[0])); rc != 0 {
		return fmt.Errorf("layer %d of %d sessions: ggml compute failed (code %d)", calls[0].layer, n, int(rc))
	}
	e, u := hp.Embd, hp.ExpertsUsed
	for i, c := range calls {
		copy(c.out.ffnInp, out.ffnInp[i*e:(i+1)*e])
		copy(c.out.moeIn, out.moeIn[i*e:(i+1)*e])
		copy(c.out.extra, out.extra[i*e:(i+1)*e])
		copy(c.out.selected, out.selected[i*u:(i+1)*u])
		copy(c.out.weights, out.weights[i*u:(i+1)*u])
	}
	return nil
}
