package gating

import (
	"slices"

	"github.com/neuro-p2p/neuro/moe"
)

// speculation drafts tokens for speculative decoding and adapts the
// draft's length to how much of it the model keeps.
type speculation struct {
	kind    string
	drafter moe.Drafter // SpeculateDraft's
	k       int         // the next draft's length
	max     int
	err     error // the drafter's failure, which ended the drafting
}

// newSpeculation returns the drafter kind names (off: one that never
// drafts; draft: d's), drafting at most max tokens (0: 8).
func newSpeculation(kind string, max int, d moe.Drafter) *speculation {
	if max <= 0 {
		max = 8
	}
	if kind == SpeculateDraft && d == nil {
		kind = SpeculateOff
	}
	return &speculation{kind: kind, drafter: d, k: min(4, max), max: max}
}

// draft proposes up to room tokens to follow prompt + tokens.
func (s *speculation) draft(prompt, tokens []int32, room int) []int32 {
	if s.kind == SpeculateOff || room <= 0 {
		return nil
	}
	seq := make([]int32, 0, len(prompt)+len(tokens))
	seq = append(append(seq, prompt...), tokens...)
	if s.kind == SpeculateNgram {
		return NgramDraft(seq, min(s.k, room), 1, 3)
	}
	d, err := s.drafter.Draft(seq, min(s.k, room))
	if err != nil {
		s.kind, s.err = SpeculateOff, err
		return nil
	}
	return d
}

// passed adapts the draft's length: twice as long after a draft kept
// whole, one more than was kept after one that was not.
func (s *speculation) passed(drafted, kept int) {
	if kept == drafted {
		s.k = min(2*s.k, s.max)
		return
	}
	s.k = min(max(1, kept+1), s.max)
}

// NgramDraft is prompt lookup decoding: for n from maxN down to minN, it
// finds the latest earlier place where seq's last n tokens appeared and
// proposes the (up to k) tokens that followed them there; nil when none
// did.
func NgramDraft(seq []int32, k, minN, maxN int) []int32 {
	if k <= 0 {
		return nil
	}
	for n := min(maxN, len(seq)-1); n >= max(minN, 1); n-- {
		tail := seq[len(seq)-n:]
		// the latest match that has at least one token after it
		for j := len(seq) - n - 1; j >= 0; j-- {
			if slices.Equal(seq[j:j+n], tail) {
				end := min(j+n+k, len(seq))
				return append([]int32(nil), seq[j+n:end]...)
			}
		}
	}
	return nil
}
