package gating

import (
	"cmp"
	"math"
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

// dist is the distribution Sample draws from: the candidates after
// temperature, top-k and top-p, most likely first, their p summing to 1.
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
	// Most likely first; equal logits in token order, so that a seed gives
	// the same draw everywhere.
	slices.SortFunc(c, func(a, b candidate) int {
		if r := cmp.Compare(b.logit, a.logit); r != 0 {
			return r
		}
		return cmp.Compare(a.id, b.id)
	})
	if s.topK > 0 && s.topK < len(c) {
		c = c[:s.topK]
	}
	maxL := float64(c[0].logit)
	var sum float64
	for i := range c {
		c[i].p = math.Exp((float64(c[i].logit) - maxL) / s.temperature)
		sum += c[i].p
	}
	for i := range c {
		c[i].p /= sum
	}
	if s.topP > 0 && s.topP < 1 {
		var cum float64
		for i := range c {
			cum += c[i].p
			if cum >= s.topP {
				c = c[:i+1]
				sum = cum
				break
			}
		}
		for i := range c {
			c[i].p /= sum
		}
	}
	return c
}
