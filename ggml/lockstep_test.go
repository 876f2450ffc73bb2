package ggml

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Sessions decoding at once in lockstep (each layer and the head one graph
// for all of them) get each token's logits to the bit as each alone, in
// every architecture it serves and in each type, with prompts of different
// lengths (so different positions and caches) and a window shorter than
// them; their graphs really held several sessions. Latent attention
// (deepseek2) is refused.
func TestLockstepIsAlone(t *testing.T) {
	ctx := t.Context()
	for _, arch := range []string{"llama", "qwen3moe", "gpt-oss", "glm4moe", "deepseek2"} {
		types := []string{"f16", "q8_0", "q4_k_m"}
		if arch == "glm4moe" {
			types = append(types, "q8_0-remote")
		}
		if arch == "deepseek2" {
			types = []string{"q8_0"}
		}
		for _, typ := range types {
			t.Run(arch+"/"+typ, func(t *testing.T) {
				sm, _ := archSplit(t, arch, typ, 9)
				if arch == "deepseek2" {
					if sm.Gating.SetLockstep(time.Second, 0) {
						t.Fatal("lockstep with latent attention")
					}
					return
				}
				const sessions, steps = 5, 6
				prompts := make([][]int32, sessions)
				for k := range prompts {
					for i := range 20 + 13*k {
						prompts[k] = append(prompts[k], int32(3+(i*11+k*7)%300))
					}
				}
				next := func(k, step int) int32 { return int32(40 + k*9 + step*5) }
				// each alone, one after another
				want := make([][][]float32, sessions)
				for k := range sessions {
					s, err := sm.Gating.NewSession(0)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := s.Forward(ctx, prompts[k], sm.Experts); err != nil {
						t.Fatal(err)
					}
					for step := range steps {
						l, err := s.Forward(ctx, []int32{next(k, step)}, sm.Experts)
						if err != nil {
							t.Fatal(err)
						}
						want[k] = append(want[k], l)
					}
					s.Close()
				}
				// The prompts first, alone (several rows each), then the
				// decode steps in lockstep, all sessions starting together.
				ss := promptedSessions(t, sm, prompts)
				if !sm.Gating.SetLockstep(time.Second, 0) {
					t.Fatal("no lockstep")
				}
				defer sm.Gating.SetLockstep(0, 0)
				// The sessions sample nothing between their steps: waited
				// for from one step to the next however slow a busy
				// machine makes them, they stay together.
				sm.Gating.lockstepper().grace = 200 * time.Millisecond
				got := make([][][]float32, sessions)
				errs := make([]error, sessions)
				var wg sync.WaitGroup
				for k, s := range ss {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for step := range steps {
							l, err := s.Forward(ctx, []int32{next(k, step)}, sm.Experts)
							if err != nil {
								errs[k] = err
								return
							}
							got[k] = append(got[k], l)
						}
					}()
				}
				wg.Wait()
				for k := range sessions {
					if errs[k] != nil {
						t.Fatalf("session %d: %v", k, errs[k])
					}
					for step := range steps {
						for j := range want[k][step] {
							if got[k][step][j] != want[k][step][j] {
								t.Fatalf("session %d, step %d, logit %d: %v in lockstep, %v alone", k, step, j, got[k][step][j], want[k][step][j])
							}
						}
					}
				}
				graphs, rows := sm.Gating.Lockstep()
				t.Logf("%d graphs for %d rows", graphs, rows)
				// (layers + head) × steps graphs, each of several sessions
				// (all five, but where a busy machine splits a layer)
				if graphs == 0 || float64(rows)/float64(graphs) < 1.5 {
					t.Fatalf("%d graphs for %d rows: the sessions did not compute together", graphs, rows)
				}
			})
		}
	}
}

// A session that leaves mid-pass (its context cancelled while it waits)
// holds no one up: the others' calls go once it has left, long before
// their wait is over.
func TestLockstepCancelledSessionLeaves(t *testing.T) {
	sm := splitOf(t, archModel(t, t.TempDir(), "llama", func() model.Params { p, _ := model.Preset("llama", "tiny"); return p }(), "q8_0", 3),
		model.SplitOptions{}, testThreads)
	sm.Gating.SetLockstep(time.Hour, 0)
	a, _ := sm.Gating.NewSession(0)
	defer a.Close()
	b, _ := sm.Gating.NewSession(0)
	defer b.Close()
	ctx := t.Context()
	for _, s := range []*Session{a, b} {
		if _, err := s.Forward(ctx, []int32{1, 2, 3}, sm.Experts); err != nil {
			t.Fatal(err)
		}
	}
	// b begins a one-row pass and stops before its first layer: a's calls
	// would wait for it (an hour) until it leaves.
	ls := sm.Gating.lockstepper()
	ls.begin(b, 0)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := a.Forward(cctx, []int32{4}, sm.Experts)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a's pass did not wait for b: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	ls.end(b)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("a still waits after b left")
	}
	// a pass whose context ends while it waits returns its error
	ls.begin(b, 0)
	go func() {
		_, err := a.Forward(cctx, []int32{5}, sm.Experts)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a cancelled pass gave no error")
		}
	case <-time.After(time.Minute):
		t.Fatal("a cancelled pass still waits")
	}
	ls.end(b)
}

// With a busy share set, the sessions wait for each other only while the
// gating's compute is that busy: sessions whose experts answer at once
// keep it busy and compute together; the same sessions whose experts take
// a long round trip leave it idle most of the time, and each call then
// goes at once, alone.
func TestLockstepByLoad(t *testing.T) {
	sm := splitOf(t, archModel(t, t.TempDir(), "llama", func() model.Params { p, _ := model.Preset("llama", "tiny"); return p }(), "q8_0", 5),
		model.SplitOptions{}, testThreads)
	const sessions = 4
	prompts := make([][]int32, sessions)
	for k := range prompts {
		prompts[k] = []int32{1, 2, 3, int32(4 + k)}
	}
	ss := promptedSessions(t, sm, prompts)
	if !sm.Gating.SetLockstep(time.Second, 0.5) {
		t.Fatal("no lockstep")
	}
	defer sm.Gating.SetLockstep(0, 0)
	ls := sm.Gating.lockstepper()
	// windows short enough for a context of 256 tokens
	window := 20 * time.Millisecond
	ls.mu.Lock()
	ls.window = window
	ls.mu.Unlock()
	engaged := func() bool {
		ls.mu.Lock()
		defer ls.mu.Unlock()
		return ls.engaged
	}
	if engaged() {
		t.Fatal("engaged before any compute")
	}
	hp := sm.Gating.hp
	pos := 4
	// steps decodes a step of every session at once, with experts, for
	// at least d, until want is seen (at most the context's room).
	steps := func(experts moe.Experts, d time.Duration, want bool) bool {
		end := time.Now().Add(d)
		for i := 0; i < 400 && pos < 250; i++ {
			err := stepAll(t.Context(), ss, 5+pos, experts)
			pos++
			if err != nil {
				t.Fatal(err)
			}
			if engaged() == want && time.Now().After(end) {
				return true
			}
		}
		return engaged() == want
	}
	if !steps(zeroAnswers{hp.Embd}, 3*window, true) {
		t.Fatal("not engaged while the experts answer at once")
	}
	ga, ra := sm.Gating.Lockstep()
	steps(zeroAnswers{hp.Embd}, 0, true)
	g0, r0 := sm.Gating.Lockstep()
	if float64(r0-ra)/float64(max(g0-ga, 1)) < 1.5 {
		t.Fatalf("engaged: %d rows in %d graphs, the sessions did not compute together", r0-ra, g0-ga)
	}
	if !steps(slowAnswers{embd: hp.Embd, wait: 20 * time.Millisecond}, 3*window, false) {
		t.Fatal("still engaged while the experts take 20 ms a layer")
	}
	// once disengaged, the calls go at once, alone
	g1, r1 := sm.Gating.Lockstep()
	steps(slowAnswers{embd: hp.Embd, wait: 20 * time.Millisecond}, 0, false)
	g2, r2 := sm.Gating.Lockstep()
	ls.mu.Lock()
	wait := ls.waitLocked()
	ls.mu.Unlock()
	if engaged() || wait != 0 {
		t.Fatalf("engaged again (a call waits %v)", wait)
	}
	t.Logf("engaged then disengaging: %d rows in %d graphs; disengaged: %d rows in %d graphs", r1-r0, g1-g0, r2-r1, g2-g1)
}

// promptedSessions opens a session of sm's gating for each prompt, each
// prompt computed alone; they close with the test.
func promptedSessions(t *testing.T, sm *SplitModel, prompts [][]int32) []*Session {
	t.Helper()
	ss := make([]*Session, len(prompts))
	for k := range ss {
		s, err := sm.Gating.NewSession(0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		if _, err := s.Forward(t.Context(), prompts[k], sm.Experts); err != nil {
			t.Fatal(err)
		}
		ss[k] = s
	}
	return ss
}

// stepAll decodes one token in every session at once (session k's token
// tok+k), each in a goroutine of its own.
func stepAll(ctx context.Context, ss []*Session, tok int, experts moe.Experts) error {
	var wg sync.WaitGroup
	errs := make([]error, len(ss))
	for k, s := range ss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[k] = s.Forward(ctx, []int32{int32(tok + k)}, experts)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// slowAnswers are experts that answer zeros after wait.
type slowAnswers struct {
	embd int
	wait time.Duration
}

func (z slowAnswers) MoE(ctx context.Context, _ int, _ []float32, n int, _ []int32, _ []float32) ([]float32, error) {
	select {
	case <-time.After(z.wait):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return make([]float32, n*z.embd), nil
}

// zeroAnswers are experts that answer zeros at once, safe for concurrent
// use.
type zeroAnswers struct{ embd int }

func (z zeroAnswers) MoE(_ context.Context, _ int, _ []float32, n int, _ []int32, _ []float32) ([]float32, error) {
	return make([]float32, n*z.embd), nil
}

// BenchmarkLockstep times a decode step of several sessions at once (each
// a one-token pass, experts answering zeros at once) with the sessions in
// lockstep (each layer and the head one graph for them all) and alone
// (each pass its own graphs, one at a time), on one thread: ms/step and
// tokens/s side by side. The gating reads its weights once a step in
// lockstep, once a session alone. The bench preset's shape with 4 layers
// (NEURO_BENCH_MODEL for another).
func BenchmarkLockstep(b *testing.B) {
	_, gs, hp := splitGating(b, benchModel(b))
	for _, sessions := range []int{1, 4, 16} {
		for _, mode := range []string{"alone", "lockstep"} {
			b.Run(fmt.Sprintf("sessions=%d/%s", sessions, mode), func(b *testing.B) {
				g, err := NewGating(hp, gs, 1)
				if err != nil {
					b.Fatal(err)
				}
				defer g.Close()
				if mode == "lockstep" && !g.SetLockstep(time.Second, 0) {
					b.Fatal("no lockstep")
				}
				ss := make([]*Session, sessions)
				for k := range ss {
					if ss[k], err = g.NewSession(512); err != nil {
						b.Fatal(err)
					}
					defer ss[k].Close()
					if _, err := ss[k].Forward(context.Background(), []int32{1, 2, 3, int32(4 + k)}, zeroAnswers{hp.Embd}); err != nil {
						b.Fatal(err)
					}
				}
				if b.N > 400 {
					b.Fatal("context full: use -benchtime 400x or less")
				}
				b.ResetTimer()
				for i := range b.N {
					if err := stepAll(context.Background(), ss, 5+i, zeroAnswers{hp.Embd}); err != nil {
						b.Fatal(err)
					}
				}
				step := b.Elapsed().Seconds() / float64(b.N)
				b.ReportMetric(step*1e3, "ms/step")
				b.ReportMetric(float64(sessions)/step, "tokens/s")
			})
		}
	}
}
