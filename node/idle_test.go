package node

import (
	"io"
	"log/slog"
	"testing"
)

// The idle guard pauses on the first busy sample (other processes' CPU,
// a GPU in use, or the load cap) and resumes after resumeAfter idle ones;
// a busy sample in between starts the count again.
func TestIdleGuard(t *testing.T) {
	var calls []bool
	g := newIdleGuard(HomeConfig{IdleOnly: true, IdleThreshold: 0.5, MaxLoad: 2}, nil,
		func(p bool) { calls = append(calls, p) }, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	idle, busyCPU := LoadSample{Others: 0.1, Load1PerCore: 0.3}, LoadSample{Others: 0.7}
	steps := []struct {
		s      LoadSample
		paused bool
	}{
		{idle, false},
		{busyCPU, true},
		{idle, true}, {idle, true},
		{LoadSample{GPUInUse: true}, true}, // restarts the count
		{idle, true}, {idle, true}, {idle, false},
		{LoadSample{Load1PerCore: 2.5}, true},
		{idle, true}, {idle, true}, {idle, false},
	}
	for i, st := range steps {
		g.observe(st.s)
		if g.Paused() != st.paused {
			t.Fatalf("step %d (%+v): paused %v, want %v", i, st.s, g.Paused(), st.paused)
		}
		if st.paused && g.Reason() == "" {
			t.Fatalf("step %d: paused without a reason", i)
		}
	}
	if want := []bool{true, false, true, false}; len(calls) != len(want) {
		t.Fatalf("expert server told %v, want %v", calls, want)
	}
	// Without idle_only only the load cap counts.
	g = newIdleGuard(HomeConfig{IdleThreshold: 0.5, MaxLoad: 2}, nil, func(bool) {}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if g.observe(LoadSample{Others: 0.99, GPUInUse: true}); g.Paused() {
		t.Fatal("paused for others' CPU without idle_only")
	}
	// The machine's own readings parse.
	p := newProcLoad()
	if _, err := p.sample(); err != nil {
		t.Fatal(err)
	}
}
