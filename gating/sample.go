package gating

import (
	"cmp"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"

	"github.com/neuro-p2p/neuro/moe"
)

// Sampler picks the next token from a forward pass's logits. With
// temperature 0 it is greedy (llama.cpp's argmax: the first of equal
// maxima), so a greedy generation is the same on every node. Otherwise it
// keeps the top-k tokens, then the top-p nucleus, and draws from the
// softmax of logits / temperature with a seeded PCG, so a seed reproduces
// a generation.
type Sampler struct {
	temperature float64
	topK        int
	topP        float64
	rng         *rand.Rand
	cand        []candidate
}

type candidate struct {
	id    int32
	logit float32
	p     float64
}

// NewSampler makes a sampler. topK 0 keeps every token; topP 0 or 1 keeps
// the whole distribution.
func NewSampler(temperature float32, topK int, topP float32, seed uint64) *Sampler {
	return &Sampler{temperature: float64(temperature), topK: topK, topP: float64(topP),
		rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Greedy reports whether the sampler always takes the most likely token.
func (s *Sampler) Greedy() bool { return s.temperature <= 0 || s.topK == 1 }

// Sample returns the next token.
func (s *Sampler) Sample(logits []float32) int32 {
	if s.Greedy() {
		return moe.Argmax(logits)
	}
	c := s.dist(logits)
	if len(c) == 0 {
		return 0
	}
	r := s.rng.Float64()
	var cum float64
	for _, x := range c {
		cum += x.p
		if r < cum {
			return x.id
		}
	}
	return c[len(c)-1].id
}

// SampleDraft is speculative sampling of a drafted token (a draft that is
// certain, as prompt lookup's: q(draft) = 1): it keeps draft with the
// model's probability of it, else samples from the model's distribution
// without it, renormalised (max(0, p - q)), so that the token returned is
// distributed as Sample's. Greedy: the most likely token, which keeps the
// draft when it is the draft.
func (s *Sampler) SampleDraft(logits []float32, draft int32) (tok int32, kept bool) {
	if s.Greedy() {
		tok = moe.Argmax(logits)
		return tok, tok == draft
	}
	c := s.dist(logits)
	if len(c) == 0 {
		return 0, false
	}
	pd := 0.0
	for _, x := range c {
		if x.id == draft {
			pd = x.p
		}
	}
	if s.rng.Float64() < pd {
		return draft, true
	}
	r := s.rng.Float64() * (1 - pd)
	var cum float64
	last := c[len(c)-1].id
	for _, x := range c {
		if x.id == draft {
			continue
		}
		last = x.id
		cum += x.p
		if r < cum {
			return x.id, false
		}
	}
	return last, false
}

// dist is the distribution Sample draws from, in the order it draws: with
// top-k or top-p, the tokens kept, most likely first (equal logits in
// token order, so that a seed gives the same draw everywhere); with
// neither, every token in token order, which needs no sort (a sort of the
// vocabulary took 8 ms a token for 32,000 tokens, 40 for Qwen3's 151,936,
// where llama.cpp's whole decode of the bench model takes 12-20). Their p
// sum to 1, after temperature.
func (s *Sampler) dist(logits []float32) []candidate {
	c := s.cand[:0]
	for i, l := range logits {
		if !math.IsNaN(float64(l)) {
			c = append(c, candidate{id: int32(i), logit: l})
		}
	}
	s.cand = c
	if len(c) == 0 {
		return nil
	}
	sorted := false
	if s.topK > 0 && s.topK < len(c) {
		// The top k, then only those sorted: a selection is linear.
		selectTop(c, s.topK)
		c = c[:s.topK]
		slices.SortFunc(c, byLikelihood)
		sorted = true
	}
	maxL := c[0].logit
	for _, x := range c[1:] {
		maxL = max(maxL, x.logit)
	}
	var sum float64
	for i := range c {
		c[i].p = math.Exp((float64(c[i].logit) - float64(maxL)) / s.temperature)
		sum += c[i].p
	}
	for i := range c {
		c[i].p /= sum
	}
	if s.topP > 0 && s.topP < 1 {
		// The nucleus: the most likely tokens until their p reaches
		// top-p, sorted in chunks as far as the walk goes (most of a
		// model's probability is on a few tokens).
		n, cum := nucleus(c, s.topP, sorted)
		c = c[:n]
		for i := range c {
			c[i].p /= cum
		}
	}
	return c
}

// byLikelihood orders candidates most likely first, equal logits in token
// order.
func byLikelihood(a, b candidate) int {
	if r := cmp.Compare(b.logit, a.logit); r != 0 {
		return r
	}
	return cmp.Compare(a.id, b.id)
}

// nucleus sorts c's head, most likely first, until the p of its first n
// candidates reach topP, and returns n and their sum. sorted says c is
// sorted already.
func nucleus(c []candidate, topP float64, sorted bool) (n int, cum float64) {
	done := 0 // c[:done] is sorted, and ranks before all of c[done:]
	chunk := 64
	for i := range c {
		if i == done && !sorted {
			m := min(chunk, len(c)-done)
			selectTop(c[done:], m)
			slices.SortFunc(c[done:done+m], byLikelihood)
			done += m
			chunk *= 8
		}
		cum += c[i].p
		if cum >= topP {
			return i + 1, cum
		}
	}
	return len(c), cum
}

// selectTop moves c's k most likely candidates (byLikelihood) to c[:k], in
// no order: a quickselect on the median of three, which falls back to a
// sort of what is left when its partitions stop shrinking (linear time on
// a model's logits, n log n at worst).
func selectTop(c []candidate, k int) {
	if k <= 0 || k >= len(c) {
		return
	}
	lo, hi := 0, len(c) // the k-th lies in c[lo:hi]
	for budget := 2 * bits.Len(uint(len(c))); hi-lo > 16; budget-- {
		if budget == 0 {
			slices.SortFunc(c[lo:hi], byLikelihood)
			return
		}
		mid := lo + (hi-lo)/2
		// median of three to c[hi-1] as the pivot
		a, b, z := lo, mid, hi-1
		if byLikelihood(c[b], c[a]) < 0 {
			a, b = b, a
		}
		if byLikelihood(c[z], c[b]) < 0 {
			b = z
			if byLikelihood(c[b], c[a]) < 0 {
				b = a
			}
		}
		c[b], c[hi-1] = c[hi-1], c[b]
		pivot := c[hi-1]
		store := lo
		for i := lo; i < hi-1; i++ {
			if byLikelihood(c[i], pivot) < 0 {
				c[i], c[store] = c[store], c[i]
				store++
			}
		}
		c[store], c[hi-1] = c[hi-1], c[store]
		switch {
		case store == k || store == k-1:
			return
		case store > k:
			hi = store
		default:
			lo = store + 1
		}
	}
	slices.SortFunc(c[lo:hi], byLikelihood)
}
