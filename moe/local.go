package moe

import (
	"context"
	"errors"
	"fmt"
)

// LocalExperts computes experts in this process (the single-machine split
// path, and the oracle for networked experts).
type LocalExperts struct {
	// Group, if set, computes each layer's experts in one pass.
	Group GroupComputer
	// Layers, where set, compute a whole layer's routed experts at once
	// (as llama.cpp's build_moe_ffn: one expert-indexed product per
	// projection); Experts then holds only what they lack (a hosted
	// shared expert).
	Layers map[int]LayerComputer
	// Used is the model's experts per token; a call may route a token to
	// more (a hosted shared expert rides as one more, with weight 1).
	Embd, Used int
	// Experts maps (layer, expert) to its compute.
	Experts map[[2]int]Expert
}

var _ Experts = (*LocalExperts)(nil)

// MoE implements Experts: each expert gets the batch of tokens routed to
// it in one call, and Combine weighs and sums the results.
func (le *LocalExperts) MoE(_ context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	used, err := SlotsPerToken(x, n, selected, weights, le.Embd)
	if err != nil {
		return nil, err
	}
	outs := make([]float32, n*used*le.Embd)
	if lc := le.Layers[layer]; lc != nil {
		if done, err := le.stacked(lc, layer, x, n, used, selected, outs); err != nil || done {
			if err != nil {
				return nil, err
			}
			return Combine(outs, weights, n, used, le.Embd), nil
		}
	}
	r := Route(selected)
	calls := make([]ExpertCall, 0, len(r.Experts))
	for _, e := range r.Experts {
		ex := le.Experts[[2]int{layer, int(e)}]
		if ex == nil {
			return nil, fmt.Errorf("no expert %d:%d", layer, e)
		}
		slots := r.Slots[e]
		in := Gather(x, slots, used, le.Embd)
		calls = append(calls, ExpertCall{Expert: ex, X: in, N: len(slots), Out: make([]float32, len(in))})
	}
	if le.Group != nil {
		if err := le.Group.ComputeGroup(calls); err != nil {
			return nil, fmt.Errorf("experts of layer %d: %w", layer, err)
		}
	} else {
		for i, c := range calls {
			if err := ComputeBatched(c.Expert, c.X, c.N, c.Out); err != nil {
				return nil, fmt.Errorf("expert %d:%d: %w", layer, r.Experts[i], err)
			}
		}
	}
	for i, c := range calls {
		Scatter(outs, c.Out, r.Slots[r.Experts[i]], le.Embd)
	}
	return Combine(outs, weights, n, used, le.Embd), nil
}

// stacked computes a layer through its stack: all slots at once when every
// expert is in it, else (a hosted shared expert, numbered after the
// stack's) the stack's slots at once and the others one expert at a
// time. It reports false when the layer has a slot it cannot compute.
func (le *LocalExperts) stacked(lc LayerComputer, layer int, x []float32, n, used int, selected []int32, outs []float32) (bool, error) {
	var in, out []int // slots in the stack, and out of it
	for i, e := range selected {
		if int(e) < lc.Experts() {
			in = append(in, i)
		} else {
			out = append(out, i)
		}
	}
	if len(out) == 0 {
		if err := lc.ComputeLayer(x, n, selected, outs); err != nil {
			return false, fmt.Errorf("experts of layer %d: %w", layer, err)
		}
		return true, nil
	}
	// Every token has the same slots out of the stack (the shared expert
	// last): compute the stack's slots, then the rest.
	k := len(in) / n
	if k == 0 || len(in)%n != 0 {
		return false, nil
	}
	sel := make([]int32, 0, len(in))
	for _, i := range in {
		sel = append(sel, selected[i])
	}
	part := make([]float32, len(in)*le.Embd)
	if err := lc.ComputeLayer(x, n, sel, part); err != nil {
		return false, fmt.Errorf("experts of layer %d: %w", layer, err)
	}
	for j, i := range in {
		copy(outs[i*le.Embd:(i+1)*le.Embd], part[j*le.Embd:(j+1)*le.Embd])
	}
	r := Route(func() []int32 {
		s := make([]int32, len(selected))
		for i := range s {
			s[i] = -1
		}
		for _, i := range out {
			s[i] = selected[i]
		}
		return s
	}())
	for _, e := range r.Experts {
		if e < 0 {
			continue
		}
		ex := le.Experts[[2]int{layer, int(e)}]
		if ex == nil {
			return false, fmt.Errorf("no expert %d:%d", layer, e)
		}
		slots := r.Slots[e]
		xin := Gather(x, slots, used, le.Embd)
		o := make([]float32, len(xin))
		if err := ComputeBatched(ex, xin, len(slots), o); err != nil {
			return false, fmt.Errorf("expert %d:%d: %w", layer, e, err)
		}
		Scatter(outs, o, slots, le.Embd)
	}
	return true, nil
}

// LayerComputer computes a whole layer's routed experts: n rows of x, row t
// routed to selected[t*k:(t+1)*k] (k = len(selected)/n), each slot's output
// before its weight to out (n x k rows).
type LayerComputer interface {
	Experts() int
	ComputeLayer(x []float32, n int, selected []int32, out []float32) error
	Close() error
}

// ExpertCall is one expert's share of a layer: N rows of X in, N rows to
// Out.
type ExpertCall struct {
	Expert Expert
	X      []float32
	N      int
	Out    []float32
}

// GroupComputer computes several experts at once, each exactly as its
// own Compute would (a backend saves the launches).
type GroupComputer interface {
	ComputeGroup(calls []ExpertCall) error
}

// SlotsPerToken checks one MoE call's arguments (n rows of embd floats in
// x; selected and weights alike, a whole number of experts per token) and
// returns the experts per token.
func SlotsPerToken(x []float32, n int, selected []int32, weights []float32, embd int) (int, error) {
	if n < 1 || len(x) != n*embd || len(selected) != len(weights) || len(selected) == 0 || len(selected)%n != 0 {
		return 0, fmt.Errorf("moe: %d tokens of %d floats, %d experts and %d weights", n, len(x), len(selected), len(weights))
	}
	return len(selected) / n, nil
}

// Close closes every expert and layer.
func (le *LocalExperts) Close() error {
	var errs []error
	for _, e := range le.Experts {
		errs = append(errs, e.Close())
	}
	for _, l := range le.Layers {
		errs = append(errs, l.Close())
	}
	return errors.Join(errs...)
}

// Batcher is what ComputeBatched needs of an expert.
type Batcher interface {
	Compute(x []float32, n int, out []float32) error
	Embd() int
	MaxBatch() int
}

// ComputeBatched runs n rows of x through e in batches of at most
// e.MaxBatch() rows, writing n rows to out.
func ComputeBatched(e Batcher, x []float32, n int, out []float32) error {
	embd, mb := e.Embd(), e.MaxBatch()
	if mb < 1 {
		return fmt.Errorf("expert: max batch %d", mb)
	}
	for start := 0; start < n; start += mb {
		end := min(start+mb, n)
		if err := e.Compute(x[start*embd:end*embd], end-start, out[start*embd:end*embd]); err != nil {
			return err
		}
	}
	return nil
}

// CheckBatch checks the arguments of Expert.Compute: n rows of embd floats
// in x and out, n from 1 to maxBatch.
func CheckBatch(x []float32, n int, out []float32, embd, maxBatch int) error {
	if n < 1 || n > maxBatch {
		return fmt.Errorf("expert: batch of %d, want 1 to %d", n, maxBatch)
	}
	if len(x) != n*embd || len(out) != n*embd {
		return fmt.Errorf("expert: input %d and output %d floats, want %d (%d x %d)", len(x), len(out), n*embd, n, embd)
	}
	return nil
}
