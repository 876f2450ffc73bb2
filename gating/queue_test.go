package gating

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// Sessions go to the waiters in arrival order; each learns its place when
// it joins and when it moves; one more than the line holds is refused at
// once; a waiter gives up at its timeout or when its context ends, and a
// session granted as it gives up is handed on, never lost.
func TestSessionQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := newSessionQueue(1, 2)
		ctx := t.Context()
		if err := q.acquire(ctx, time.Minute, nil); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		places := map[string][]int{}
		order := []string{}
		wait := func(name string, timeout time.Duration, done chan<- error) {
			err := q.acquire(ctx, timeout, func(p int) error {
				mu.Lock()
				defer mu.Unlock()
				places[name] = append(places[name], p)
				return nil
			})
			if err == nil {
				mu.Lock()
				order = append(order, name)
				mu.Unlock()
			}
			done <- err
		}
		b, c := make(chan error, 1), make(chan error, 1)
		go wait("b", time.Minute, b)
		synctest.Wait()
		go wait("c", time.Minute, c)
		synctest.Wait()
		var qr *queueRefusal
		if err := q.acquire(ctx, time.Minute, nil); !errors.As(err, &qr) || !qr.full || qr.waiting != 2 {
			t.Fatalf("a third waiter in a line of two: %v", err)
		}
		q.release() // to b
		if err := <-b; err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		q.release() // to c
		if err := <-c; err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		if len(order) != 2 || order[0] != "b" || order[1] != "c" || len(places["b"]) != 1 || places["b"][0] != 1 ||
			len(places["c"]) != 2 || places["c"][0] != 2 || places["c"][1] != 1 {
			t.Fatalf("order %v, places %v", order, places)
		}
		mu.Unlock()
		// c holds the session. A waiter times out; another is cancelled.
		d := make(chan error, 1)
		go wait("d", 10*time.Second, d)
		time.Sleep(11 * time.Second)
		if err := <-d; !errors.As(err, &qr) || qr.full || qr.waited < 10*time.Second {
			t.Fatalf("a waiter past its timeout: %v", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		e := make(chan error, 1)
		go func() { e <- q.acquire(cctx, time.Minute, nil) }()
		synctest.Wait()
		cancel()
		if err := <-e; !errors.Is(err, context.Canceled) {
			t.Fatalf("a cancelled waiter: %v", err)
		}
		if q.Len() != 0 {
			t.Fatalf("%d left in line", q.Len())
		}
		q.release() // c's session is free again: the next takes it at once
		if err := q.acquire(ctx, time.Nanosecond, nil); err != nil {
			t.Fatalf("a free session after everyone left: %v", err)
		}
	})
}

// Resizing hands new sessions to those in line at once; sessions taken
// away are not handed on when they come back.
func TestSessionQueueResize(t *testing.T) {
	q := newSessionQueue(1, 8)
	if err := q.acquire(t.Context(), time.Second, nil); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 2)
	for range 2 {
		go func() { got <- q.acquire(t.Context(), 10*time.Second, nil) }()
	}
	for i := 0; q.Len() < 2; i++ {
		if i > 1000 {
			t.Fatal("the two never queued")
		}
		time.Sleep(time.Millisecond)
	}
	q.resize(3)
	for range 2 {
		if err := <-got; err != nil {
			t.Fatal(err)
		}
	}
	if q.Sessions() != 3 || q.Len() != 0 {
		t.Fatalf("%d sessions, %d waiting", q.Sessions(), q.Len())
	}
	q.resize(1) // three in use, one session in all
	q.release()
	q.release()
	if err := q.acquire(t.Context(), 10*time.Millisecond, nil); err == nil {
		t.Fatal("a session beyond the one left was handed out")
	}
	q.release()
	if err := q.acquire(t.Context(), time.Second, nil); err != nil {
		t.Fatal(err)
	}
}
