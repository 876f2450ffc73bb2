package gating

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestSamplerGreedyTakesFirstMaximum(t *testing.T) {
	s := NewSampler(0, 0, 0, 1)
	if got := s.Sample([]float32{1, 5, 3, 5}); got != 1 {
		t.Fatalf("greedy picked %d, want 1", got)
	}
	if got := NewSampler(0.8, 1, 0, 1).Sample([]float32{1, 5, 9, 5}); got != 2 {
		t.Fatalf("top-k 1 picked %d, want 2", got)
	}
}

func TestSamplerSeedReproduces(t *testing.T) {
	logits := []float32{1, 2, 3, 2.5, 0.5, 2.9}
	draw := func(seed uint64) []int32 {
		s := NewSampler(1, 0, 0, seed)
		var out []int32
		for range 50 {
			out = append(out, s.Sample(logits))
		}
		return out
	}
	a, b, c := draw(7), draw(7), draw(8)
	if string(int32s(a)) != string(int32s(b)) {
		t.Fatal("the same seed gave different draws")
	}
	if string(int32s(a)) == string(int32s(c)) {
		t.Fatal("different seeds gave the same 50 draws")
	}
}

func int32s(x []int32) []byte {
	b := make([]byte, len(x))
	for i, v := range x {
		b[i] = byte(v)
	}
	return b
}

// The draws follow the softmax, restricted by top-k and top-p.
func TestSamplerDistribution(t *testing.T) {
	logits := []float32{0, float32(math.Log(2)), float32(math.Log(3)), float32(math.Log(4))} // p = 1,2,3,4 /10
	count := func(s *Sampler) []float64 {
		n := make([]float64, len(logits))
		const draws = 20000
		for range draws {
			n[s.Sample(logits)]++
		}
		for i := range n {
			n[i] /= draws
		}
		return n
	}
	near := func(name string, got, want []float64) {
		t.Helper()
		for i := range want {
			if math.Abs(got[i]-want[i]) > 0.02 {
				t.Fatalf("%s: frequencies %.3f, want %.3f", name, got, want)
			}
		}
	}
	near("full", count(NewSampler(1, 0, 0, 1)), []float64{0.1, 0.2, 0.3, 0.4})
	near("top-k 2", count(NewSampler(1, 2, 0, 2)), []float64{0, 0, 3.0 / 7, 4.0 / 7})
	// The nucleus reaching 0.65 is {4, 3}: 0.4 + 0.3 = 0.7.
	near("top-p 0.65", count(NewSampler(1, 0, 0.65, 3)), []float64{0, 0, 3.0 / 7, 4.0 / 7})
	// A low temperature sharpens towards the maximum.
	if f := count(NewSampler(0.1, 0, 0, 4)); f[3] < 0.9 {
		t.Fatalf("temperature 0.1: top token frequency %.3f, want > 0.9", f[3])
	}
}

// benchLogits are a vocabulary's logits as a model's look: most tokens
// far below a few likely ones (normal, sd 3, with a handful of peaks).
func benchLogits(vocab int) []float32 {
	rng := rand.New(rand.NewPCG(1, 2))
	l := make([]float32, vocab)
	for i := range l {
		l[i] = float32(rng.NormFloat64() * 3)
	}
	for range 8 {
		l[rng.IntN(vocab)] = 14 + float32(rng.Float64()*4)
	}
	return l
}

// BenchmarkSample draws a token with the OpenAI API's default sampling
// (temperature 1, every token), with top-k 40 and with top-p 0.95, from
// the vocabularies of the bench model (32,000) and of Qwen3 (151,936).
func BenchmarkSample(b *testing.B) {
	for _, vocab := range []int{32000, 151936} {
		logits := benchLogits(vocab)
		for _, c := range []struct {
			name string
			topK int
			topP float32
		}{{"full", 0, 0}, {"top-k-40", 40, 0}, {"top-p-0.95", 0, 0.95}} {
			b.Run(fmt.Sprintf("vocab-%d/%s", vocab, c.name), func(b *testing.B) {
				s := NewSampler(1, c.topK, c.topP, 1)
				for b.Loop() {
					s.Sample(logits)
				}
			})
		}
	}
}

// refDist is the distribution as a sort of the whole vocabulary gives it:
// the candidates after top-k and top-p, most likely first.
func refDist(logits []float32, temperature float64, topK int, topP float64) []candidate {
	var c []candidate
	for i, l := range logits {
		if !math.IsNaN(float64(l)) {
			c = append(c, candidate{id: int32(i), logit: l})
		}
	}
	slices.SortFunc(c, byLikelihood)
	if topK > 0 && topK < len(c) {
		c = c[:topK]
	}
	var sum float64
	for i := range c {
		c[i].p = math.Exp((float64(c[i].logit) - float64(c[0].logit)) / temperature)
		sum += c[i].p
	}
	for i := range c {
		c[i].p /= sum
	}
	if topP > 0 && topP < 1 {
		var cum float64
		for i := range c {
			cum += c[i].p
			if cum >= topP {
				c = c[:i+1]
				break
			}
		}
		for i := range c {
			c[i].p /= cum
		}
	}
	return c
}

// testLogits are n logits of a few kinds: a model's (normal, peaks), many
// equal ones, sorted either way, and some NaN.
func testLogits(rng *rand.Rand, n, kind int) []float32 {
	l := make([]float32, n)
	for i := range l {
		switch kind {
		case 0:
			l[i] = float32(rng.NormFloat64() * 3)
		case 1:
			l[i] = float32(rng.IntN(4)) // ties everywhere
		case 2:
			l[i] = float32(i) / 100
		case 3:
			l[i] = -float32(i) / 100
		}
	}
	if n > 10 {
		l[rng.IntN(n)] = 12
		l[rng.IntN(n)] = float32(math.NaN())
	}
	return l
}

// The distribution without a sort of the vocabulary is the sorted one's:
// with top-k the same tokens in the same order with the same p, bit for
// bit; with top-p the same nucleus; with neither every token in token
// order. And selectTop moves the k most likely to the front.
func TestSamplerDistMatchesSortedDist(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{1, 2, 17, 100, 5000} {
		for kind := range 4 {
			logits := testLogits(rng, n, kind)
			for _, c := range []struct {
				temp float64
				topK int
				topP float64
			}{{1, 0, 0}, {0.7, 0, 0}, {1, 1, 0}, {1, 40, 0}, {0.8, 3, 0}, {1, 0, 0.9}, {1, 0, 0.5}, {1, 50, 0.95}, {1.3, n, 0.99}} {
				want := refDist(logits, float64(float32(c.temp)), c.topK, float64(float32(c.topP)))
				got := NewSampler(float32(c.temp), c.topK, float32(c.topP), 1).dist(logits)
				name := fmt.Sprintf("n %d kind %d temp %v top-k %d top-p %v", n, kind, c.temp, c.topK, c.topP)
				if len(got) != len(want) {
					t.Fatalf("%s: %d candidates, want %d", name, len(got), len(want))
				}
				kept := 0
				for _, l := range logits {
					if !math.IsNaN(float64(l)) {
						kept++
					}
				}
				topK := c.topK > 0 && c.topK < kept
				truncated := topK || (c.topP > 0 && c.topP < 1)
				byID := map[int32]float64{}
				for _, w := range want {
					byID[w.id] = w.p
				}
				for i, g := range got {
					if truncated && g.id != want[i].id {
						t.Fatalf("%s: candidate %d is token %d, want %d", name, i, g.id, want[i].id)
					}
					if !truncated && i > 0 && g.id <= got[i-1].id {
						t.Fatalf("%s: untruncated candidates not in token order at %d", name, i)
					}
					p, ok := byID[g.id]
					switch {
					case !ok:
						t.Fatalf("%s: token %d is not in the distribution", name, g.id)
					case topK && c.topP == 0 && g.p != p:
						t.Fatalf("%s: token %d has p %v, want %v bit for bit", name, g.id, g.p, p)
					case math.Abs(g.p-p) > 1e-12:
						t.Fatalf("%s: token %d has p %v, want %v", name, g.id, g.p, p)
					}
				}
			}
			for _, k := range []int{1, 2, 7, n / 2, n - 1} {
				if k < 1 || k >= n {
					continue
				}
				var c []candidate
				for i, l := range logits {
					if !math.IsNaN(float64(l)) {
						c = append(c, candidate{id: int32(i), logit: l})
					}
				}
				ref := slices.Clone(c)
				slices.SortFunc(ref, byLikelihood)
				selectTop(c, k)
				top := slices.Clone(c[:k])
				slices.SortFunc(top, byLikelihood)
				if !slices.Equal(top, ref[:k]) {
					t.Fatalf("n %d kind %d: selectTop(%d) moved another set to the front", n, kind, k)
				}
			}
		}
	}
}
