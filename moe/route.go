package moe

// Routing is one layer's tokens grouped by the expert they go to.
type Routing struct {
	// Experts in order of first use.
	Experts []int32
	// Slots of each expert: indexes t*used+j of selected.
	Slots map[int32][]int
}

// Route groups the slots of selected (n tokens x used experts) by expert.
func Route(selected []int32) Routing {
	r := Routing{Slots: map[int32][]int{}}
	for slot, e := range selected {
		if _, ok := r.Slots[e]; !ok {
			r.Experts = append(r.Experts, e)
		}
		r.Slots[e] = append(r.Slots[e], slot)
	}
	return r
}

// Gather returns the hidden states (rows of embd floats of x) of the
// tokens in slots, one row per slot, for a request to one expert.
func Gather(x []float32, slots []int, used, embd int) []float32 {
	in := make([]float32, len(slots)*embd)
	for i, slot := range slots {
		t := slot / used
		copy(in[i*embd:], x[t*embd:(t+1)*embd])
	}
	return in
}

// Scatter puts one expert's outputs (a row per slot) into outs, the
// token-major n x used x embd array Combine reads.
func Scatter(outs, out []float32, slots []int, embd int) {
	for i, slot := range slots {
		copy(outs[slot*embd:(slot+1)*embd], out[i*embd:(i+1)*embd])
	}
}

// Combine returns, for each of n tokens, Σ_j outs[t][j] * weights[t][j]
// with the slots added in order, rounding each product and each sum to
// float32 exactly as llama.cpp's build_moe_ffn does (ggml_mul, then
// ggml_add of the slots in order). outs holds n x used rows of embd floats
// (token-major).
func Combine(outs []float32, weights []float32, n, used, embd int) []float32 {
	res := make([]float32, n*embd)
	for t := range n {
		dst := res[t*embd : (t+1)*embd]
		for j := range used {
			w := weights[t*used+j]
			src := outs[(t*used+j)*embd : (t*used+j+1)*embd]
			if j == 0 {
				for i, v := range src {
					dst[i] = float32(v * w)
				}
				continue
			}
			for i, v := range src {
				// The conversions round each step and forbid a fused
				// multiply-add, which would round once.
				p := float32(v * w)
				dst[i] = float32(dst[i] + p)
			}
		}
	}
	return res
}

// Argmax returns the index of the largest value (the first on ties), as
// greedy sampling does.
func Argmax(x []float32) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}
