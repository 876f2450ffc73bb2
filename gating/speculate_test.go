package gating

import (
	"math"
	"slices"
	"testing"
)

func TestNgramDraft(t *testing.T) {
	seq := []int32{1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3}
	for _, c := range []struct {
		seq        []int32
		k          int
		minN, maxN int
		want       []int32
	}{
		// "2 3" last appeared before at 6: 4 7 8 2 3 followed; the longest
		// n that matches wins (n = 3: "8 2 3" never appeared before)
		{seq, 3, 1, 3, []int32{4, 7, 8}},
		{seq, 10, 1, 3, []int32{4, 7, 8, 2, 3}},
		{seq, 0, 1, 3, nil},
		// no earlier 7 after ... 9: no draft
		{[]int32{1, 2, 3}, 4, 1, 3, nil},
		// n = 1 only: the latest earlier 3
		{[]int32{3, 5, 3, 6, 3}, 2, 1, 1, []int32{6, 3}},
		// a repeated sentence drafts its continuation
		{[]int32{10, 11, 12, 13, 14, 10, 11}, 3, 1, 3, []int32{12, 13, 14}},
		{nil, 3, 1, 3, nil},
		{[]int32{4}, 3, 1, 3, nil},
	} {
		if got := NgramDraft(c.seq, c.k, c.minN, c.maxN); !slices.Equal(got, c.want) {
			t.Errorf("NgramDraft(%v, %d, %d, %d) = %v, want %v", c.seq, c.k, c.minN, c.maxN, got, c.want)
		}
	}
}

// The draft's length doubles while drafts are kept whole, and falls to one
// more than was kept.
func TestSpeculationAdapts(t *testing.T) {
	s := newSpeculation(SpeculateNgram, 8, nil)
	for _, c := range []struct{ drafted, kept, want int }{{4, 4, 8}, {8, 8, 8}, {8, 2, 3}, {3, 0, 1}, {1, 1, 2}} {
		s.passed(c.drafted, c.kept)
		if s.k != c.want {
			t.Fatalf("after %d of %d kept: k = %d, want %d", c.kept, c.drafted, s.k, c.want)
		}
	}
	if d := newSpeculation(SpeculateOff, 8, nil).draft([]int32{1, 2, 1}, nil, 4); d != nil {
		t.Fatalf("off drafted %v", d)
	}
	if d := s.draft([]int32{1, 2, 3, 1, 2}, nil, 1); !slices.Equal(d, []int32{3}) {
		t.Fatalf("a draft longer than the room: %v", d)
	}
}

// Speculative sampling of a certain draft returns tokens distributed as
// Sample's: counted over 40,000 draws for drafts of a likely, an unlikely
// and an excluded (top-k) token, each frequency is within 4.5 standard
// deviations of the model's probability.
func TestSampleDraftKeepsTheDistribution(t *testing.T) {
	logits := []float32{2.0, 1.5, 0.3, -0.5, 1.0, -2.0}
	const draws = 40000
	probs := func(topK int) []float64 {
		s := NewSampler(0.8, topK, 0, 1)
		c := s.dist(logits)
		p := make([]float64, len(logits))
		for _, x := range c {
			p[x.id] = x.p
		}
		return p
	}
	for _, c := range []struct {
		draft int32
		topK  int
	}{{0, 0}, {3, 0}, {5, 3}} {
		want := probs(c.topK)
		s := NewSampler(0.8, c.topK, 0, 7)
		n := make([]int, len(logits))
		kept := 0
		for range draws {
			tok, ok := s.SampleDraft(logits, c.draft)
			if ok != (tok == c.draft) {
				t.Fatalf("token %d reported kept %v for draft %d", tok, ok, c.draft)
			}
			if ok {
				kept++
			}
			n[tok]++
		}
		for i, p := range want {
			got := float64(n[i]) / draws
			sd := math.Sqrt(p * (1 - p) / draws)
			if math.Abs(got-p) > 4.5*sd+1e-12 {
				t.Errorf("draft %d (top-k %d): token %d drawn %.4f of the time, the model's probability %.4f", c.draft, c.topK, i, got, p)
			}
		}
		t.Logf("draft %d (top-k %d): kept %.3f of the time, its probability %.3f", c.draft, c.topK, float64(kept)/draws, want[c.draft])
	}
	// greedy: the argmax, kept when it is the draft
	g := NewSampler(0, 0, 0, 1)
	if tok, ok := g.SampleDraft(logits, 0); tok != 0 || !ok {
		t.Fatalf("greedy draft of the argmax: %d %v", tok, ok)
	}
	if tok, ok := g.SampleDraft(logits, 2); tok != 0 || ok {
		t.Fatalf("greedy draft of another token: %d %v", tok, ok)
	}
}
