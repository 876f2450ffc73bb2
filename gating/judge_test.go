package gating

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/moe/moetest"
)

// storeFetcher is a Fetcher whose store already holds every blob.
type storeFetcher struct{ s *expert.Store }

func (f storeFetcher) Fetch(context.Context, cid.Cid) error { return nil }
func (f storeFetcher) Store() *expert.Store                 { return f.s }

// gatedLoader loads experts through moetest's backend, each load
// announced on entered and held until release is closed.
type gatedLoader struct {
	entered chan expert.Key
	release chan struct{}
}

func (l gatedLoader) NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (moe.Expert, error) {
	l.entered <- expert.Key{}
	<-l.release
	return moetest.Backend{}.NewExpert(w, o)
}

// TestJudgeGetsOneExpertAtATime: while the judge loads one expert's shard,
// a check that needs another is answered busy at once instead of loading
// a second shard beside it, or, when it waits its turn, loads after it; a
// check of an expert already loaded is computed meanwhile.
func TestJudgeGetsOneExpertAtATime(t *testing.T) {
	p := model.Presets["tiny"]
	dir, split := splitModel(t, p, model.F32, 5)
	st, err := expert.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.ImportSplit(filepath.Join(dir, "shards")); err != nil {
		t.Fatal(err)
	}
	l := gatedLoader{entered: make(chan expert.Key, 8), release: make(chan struct{})}
	j := newLocalJudge(storeFetcher{st}, l, 1)
	defer j.Close()
	ctx := t.Context()
	first, _ := split.Manifest.MoELayers()
	k0, k1, k2 := expert.Key{Layer: first, Expert: 0}, expert.Key{Layer: first, Expert: 1}, expert.Key{Layer: first, Expert: 2}
	in := make([]float32, p.Embd)
	for i := range in {
		in[i] = float32(i%7) - 3
	}

	// k0 is loaded first, unhindered.
	close(l.release)
	if _, err := j.compute(ctx, split.ModelCID, k0, in, 1, nil); err != nil {
		t.Fatalf("judge k0: %v", err)
	}
	<-l.entered
	l.release = make(chan struct{})
	j.loader = l

	// k1's load is held; k2 meanwhile is busy, k0 computes.
	done := make(chan error, 1)
	go func() {
		_, err := j.compute(ctx, split.ModelCID, k1, in, 1, nil)
		done <- err
	}()
	select {
	case <-l.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("k1's load did not start")
	}
	busy := make(chan error, 1)
	go func() {
		_, err := j.compute(ctx, split.ModelCID, k2, in, 1, nil)
		busy <- err
	}()
	select {
	case err := <-busy:
		if !errors.Is(err, ErrJudgeBusy) {
			t.Fatalf("judge k2 while k1 loads: %v, want busy", err)
		}
	case <-l.entered:
		close(l.release) // let both end
		t.Fatal("k2's load started beside k1's")
	case <-time.After(30 * time.Second):
		t.Fatal("judge k2 while k1 loads: no answer")
	}
	if out, err := j.compute(ctx, split.ModelCID, k0, in, 1, nil); err != nil || len(out) != p.Embd {
		t.Fatalf("judge k0 (loaded) while k1 loads: %d floats, %v", len(out), err)
	}
	// A check that waits for its turn (a used answer of a new peer that no
	// proven peer could check) waits for k1's load, then loads k2.
	yes := func() bool { return true }
	waited := make(chan error, 1)
	go func() {
		_, err := j.compute(ctx, split.ModelCID, k2, in, 1, yes)
		waited <- err
	}()
	select {
	case <-l.entered:
		t.Fatal("a second load started beside k1's")
	case err := <-waited:
		t.Fatalf("a check of k2 that waits its turn came back while k1 loads: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(l.release)
	if err := <-done; err != nil {
		t.Fatalf("judge k1: %v", err)
	}
	select {
	case <-l.entered: // k2's load, after k1's
	case <-time.After(30 * time.Second):
		t.Fatal("k2's load did not start after k1's")
	}
	if err := <-waited; err != nil {
		t.Fatalf("judge k2 after waiting its turn: %v", err)
	}
	if _, err := j.compute(ctx, split.ModelCID, k2, in, 1, nil); err != nil {
		t.Fatalf("judge k2 once loaded: %v", err)
	}
	// A waiting check gives up when its context ends.
	l.release = make(chan struct{})
	j.loader = l
	k3 := expert.Key{Layer: first, Expert: 3}
	go func() {
		_, err := j.compute(ctx, split.ModelCID, k3, in, 1, nil)
		done <- err
	}()
	<-l.entered
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := j.compute(cctx, split.ModelCID, k0, in, 1, yes); err != nil {
		t.Fatalf("judge k0 (loaded) while k3 loads: %v", err)
	}
	k4 := expert.Key{Layer: first + 1, Expert: 0} // never loaded
	if _, err := j.compute(cctx, split.ModelCID, k4, in, 1, yes); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a waiting check whose context ended: %v", err)
	}
	close(l.release)
	if err := <-done; err != nil {
		t.Fatalf("judge k3: %v", err)
	}
}
