package moe

import (
	"context"
	"errors"
	"fmt"
)

// LocalExperts computes experts in this process (the single-machine split
// path, and the oracle for networked experts).
type LocalExperts struct {
	// Layers, where set, compute a layer's routed experts at once (as
	// llama.cpp's build_moe_ffn: one expert-indexed product per
	// projection); Experts then holds only what they lack (a hosted
	// shared expert, numbered after them).
	Layers map[int]LayerComputer
	// Used is the model's experts per token; a call may route a token to
	// more (a hosted shared expert rides as one more, with weight 1).
	Embd, Used int
	// Experts maps (layer, expert) to its compute.
	Experts map[[2]int]Expert
}

var _ Experts = (*LocalExperts)(nil)

// MoE implements Experts: the layer's stack computes the slots of its
// experts in one call, every other expert gets the batch of tokens routed
// to it in one call, and Combine weighs and sums the results.
func (le *LocalExperts) MoE(_ context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	used, err := SlotsPerToken(x, n, selected, weights, le.Embd)
	if err != nil {
		return nil, err
	}
	outs := make([]float32, n*used*le.Embd)
	lc := le.Layers[layer]
	inStack := func(e int32) bool { return lc != nil && int(e) < lc.Experts() }
	var stack []int // the slots the stack computes: as many for every token
	for i, e := range selected {
		if inStack(e) {
			stack = append(stack, i)
		}
	}
	if len(stack)%n != 0 {
		stack, lc = nil, nil // uneven: expert by expert
	}
	if len(stack) > 0 {
		sel := make([]int32, len(stack))
		for j, i := range stack {
			sel[j] = selected[i]
		}
		part := make([]float32, len(stack)*le.Embd)
		if err := lc.ComputeLayer(x, n, sel, part); err != nil {
			return nil, fmt.Errorf("experts of layer %d: %w", layer, err)
		}
		Scatter(outs, part, stack, le.Embd)
	}
	r := Route(selected)
	for _, e := range r.Experts {
		if inStack(e) {
			continue
		}
		ex := le.Experts[[2]int{layer, int(e)}]
		if ex == nil {
			return nil, fmt.Errorf("no expert %d:%d", layer, e)
		}
		slots := r.Slots[e]
		in := Gather(x, slots, used, le.Embd)
		out := make([]float32, len(in))
		if err := ComputeBatched(ex, in, len(slots), out); err != nil {
			return nil, fmt.Errorf("expert %d:%d: %w", layer, e, err)
		}
		Scatter(outs, out, slots, le.Embd)
	}
	return Combine(outs, weights, n, used, le.Embd), nil
}

// MoEApart implements ApartExperts: one token at a time.
func (le *LocalExperts) MoEApart(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	used, err := SlotsPerToken(x, n, selected, weights, le.Embd)
	if err != nil {
		return nil, err
	}
	res := make([]float32, 0, n*le.Embd)
	for t := range n {
		out, err := le.MoE(ctx, layer, x[t*le.Embd:(t+1)*le.Embd], 1, selected[t*used:(t+1)*used], weights[t*used:(t+1)*used])
		if err != nil {
			return nil, err
		}
		res = append(res, out...)
	}
	return res, nil
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

// LayerComputer computes a whole layer's routed experts: n rows of x, row t
// routed to selected[t*k:(t+1)*k] (k = len(selected)/n), each slot's output
// before its weight to out (n x k rows).
type LayerComputer interface {
	Experts() int
	ComputeLayer(x []float32, n int, selected []int32, out []float32) error
	Close() error
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
