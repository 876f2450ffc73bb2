package gating

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/moe"
)

// namedGating is a gating whose sessions say which gating made them.
type namedGating struct {
	name   string
	closed atomic.Bool
}

type namedSession struct {
	moe.Session
	from string
}

func (g *namedGating) Hparams() moe.Hparams { return moe.Hparams{Layers: 2, Embd: 4} }
func (g *namedGating) NewSession(int) (moe.Session, error) {
	return namedSession{from: g.name}, nil
}
func (g *namedGating) Close() error { g.closed.Store(true); return nil }

// A Layered gating makes head sessions from its head without loading the
// layers; the first full session loads them, once, however many ask at
// once; a failed load is tried again by the next session; Close frees
// both.
func TestLayeredLoadsTheLayersOnce(t *testing.T) {
	head, layers := &namedGating{name: "head"}, &namedGating{name: "layers"}
	var loads atomic.Int64
	fail := true
	l := &Layered{head: head, load: func() (moe.Gating, error) {
		loads.Add(1)
		if fail {
			fail = false
			return nil, errors.New("no gating shard yet")
		}
		return layers, nil
	}}
	for range 3 {
		s, err := l.NewHeadSession(0)
		if err != nil || s.(namedSession).from != "head" {
			t.Fatalf("head session: %v %v", s, err)
		}
	}
	if loads.Load() != 0 || l.LayersLoaded() {
		t.Fatalf("head sessions loaded the layers (%d loads)", loads.Load())
	}
	if _, err := l.NewSession(0); err == nil {
		t.Fatal("a session while the layers cannot load")
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s, err := l.NewSession(0); err != nil || s.(namedSession).from != "layers" {
				t.Errorf("session: %v %v", s, err)
			}
		}()
	}
	wg.Wait()
	if loads.Load() != 2 || !l.LayersLoaded() {
		t.Fatalf("%d loads (want the failed one and one more), loaded %v", loads.Load(), l.LayersLoaded())
	}
	if err := l.Close(); err != nil || !head.closed.Load() || !layers.closed.Load() {
		t.Fatalf("close: %v, head closed %v, layers closed %v", err, head.closed.Load(), layers.closed.Load())
	}
	if _, err := l.NewSession(0); err == nil {
		t.Fatal("a session after Close")
	}
}

// What asks about a Layered gating's state (whether its layers are
// loaded, its sessions' memory) does not wait for a load in progress: the
// engine asks under its lock, and a load sizes the engine's sessions
// under that lock (16 first requests at once through the OpenAI API
// deadlocked the gating node this way). Close during the load frees the
// layers it brings.
func TestLayeredStateDoesNotWaitForALoad(t *testing.T) {
	head, layers := &namedGating{name: "head"}, &namedGating{name: "layers"}
	started, release := make(chan struct{}), make(chan struct{})
	l := &Layered{head: head, load: func() (moe.Gating, error) {
		close(started)
		<-release
		return layers, nil
	}}
	done := make(chan error, 1)
	go func() {
		_, err := l.NewSession(0)
		done <- err
	}()
	<-started
	asked := make(chan bool, 1)
	go func() {
		l.SessionBytes(16)
		l.SessionMemory()
		asked <- l.LayersLoaded()
	}()
	select {
	case loaded := <-asked:
		if loaded {
			t.Fatal("layers loaded before their load returned")
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("asking whether the layers are loaded waited for their load")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err == nil {
		t.Fatal("a session from layers loaded after Close")
	}
	if !layers.closed.Load() || l.LayersLoaded() {
		t.Fatalf("layers loaded after Close: closed %v, loaded %v", layers.closed.Load(), l.LayersLoaded())
	}
}
