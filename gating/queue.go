package gating

import (
	"context"
	"slices"
	"sync"
	"time"
)

// sessionQueue hands out a gating node's sessions: at once while one is
// free, else in arrival order to at most max waiting requests, each for at
// most its timeout. A waiter learns its place whenever it changes.
type sessionQueue struct {
	mu      sync.Mutex
	free    int
	total   int // sessions in all
	max     int
	waiting []*ticket
	// moved is closed, and replaced, whenever the queue moves.
	moved chan struct{}
}

type ticket struct{ granted chan struct{} }

// errQueueFull and errQueueTimeout are acquire's refusals (the engine
// words them).
type queueRefusal struct {
	full    bool
	waiting int
	waited  time.Duration
}

func (q *queueRefusal) Error() string { return "no session" }

func newSessionQueue(sessions, max int) *sessionQueue {
	return &sessionQueue{free: sessions, total: sessions, max: max, moved: make(chan struct{})}
}

// Sessions is how many sessions there are.
func (q *sessionQueue) Sessions() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.total
}

// resize makes the sessions n in all (at least 1): new ones go to the
// first in line; sessions in use beyond n are not handed on when they
// come back.
func (q *sessionQueue) resize(n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	n = max(n, 1)
	q.free += n - q.total
	q.total = n
	granted := false
	for q.free > 0 && len(q.waiting) > 0 {
		close(q.waiting[0].granted)
		q.waiting = q.waiting[1:]
		q.free--
		granted = true
	}
	if granted {
		q.signal()
	}
}

// Len is how many requests wait.
func (q *sessionQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiting)
}

// acquire takes a session, waiting in line for at most timeout while ctx
// lives; position, if set, is told the request's place (1: next) when it
// joins and whenever it changes (an error from it gives up the place).
func (q *sessionQueue) acquire(ctx context.Context, timeout time.Duration, position func(int) error) error {
	q.mu.Lock()
	if q.free > 0 && len(q.waiting) == 0 {
		q.free--
		q.mu.Unlock()
		return nil
	}
	if len(q.waiting) >= q.max {
		n := len(q.waiting)
		q.mu.Unlock()
		return &queueRefusal{full: true, waiting: n}
	}
	t := &ticket{granted: make(chan struct{})}
	q.waiting = append(q.waiting, t)
	place, moved := len(q.waiting), q.moved
	q.mu.Unlock()
	start := time.Now()
	// give up leaves the line; a session granted meanwhile is handed on.
	giveUp := func(err error) error {
		if !q.leave(t) {
			q.release()
		}
		return err
	}
	if position != nil {
		if err := position(place); err != nil {
			return giveUp(err)
		}
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case <-t.granted:
			return nil
		case <-moved:
			q.mu.Lock()
			i := slices.Index(q.waiting, t)
			moved = q.moved
			q.mu.Unlock()
			if i >= 0 && i+1 != place && position != nil {
				place = i + 1
				if err := position(place); err != nil {
					return giveUp(err)
				}
			}
		case <-timer.C:
			if q.leave(t) {
				return &queueRefusal{waited: time.Since(start)}
			}
			return nil // granted as the time ran out
		case <-ctx.Done():
			return giveUp(ctx.Err())
		}
	}
}

// release returns a session: to the first in line, or to the free ones.
func (q *sessionQueue) release() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.waiting) == 0 {
		q.free++
		return
	}
	t := q.waiting[0]
	q.waiting = q.waiting[1:]
	close(t.granted)
	q.signal()
}

// leave takes t out of the line: false when it was granted a session
// already.
func (q *sessionQueue) leave(t *ticket) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := slices.Index(q.waiting, t)
	if i < 0 {
		return false
	}
	q.waiting = slices.Delete(q.waiting, i, i+1)
	q.signal()
	return true
}

func (q *sessionQueue) signal() {
	close(q.moved)
	q.moved = make(chan struct{})
}
