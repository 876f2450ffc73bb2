package gating

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"

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
