package gating

import (
	"strings"
	"testing"
)

// Feeding a text piece by piece gives deltas that add up to the text cut
// at the first stop string, never splitting a UTF-8 character or giving
// out the start of a stop string early.
func TestTextStream(t *testing.T) {
	cases := []struct {
		pieces   []string
		stop     []string
		deltas   []string
		stopped  bool
		text     string
		restWant string
	}{
		{[]string{"he", "llo", " world"}, nil, []string{"he", "llo", " world"}, false, "hello world", ""},
		{[]string{"a", "bc", "dEN", "Dx"}, []string{"END"}, []string{"a", "bc", "d", ""}, true, "abcd", ""},
		{[]string{"a", "E", "Nx"}, []string{"END"}, []string{"a", "", "ENx"}, false, "aENx", ""},
		{[]string{"ab", "E"}, []string{"END"}, []string{"ab", ""}, false, "abE", "E"},
		{[]string{"x\xc3", "\xa9y"}, nil, []string{"x", "éy"}, false, "xéy", ""},
		{[]string{"x\xe2\x82", "\xac"}, nil, []string{"x", "€"}, false, "x€", ""},
		{[]string{"stop", "!"}, []string{"op", "st"}, []string{""}, true, "", ""},
	}
	for i, c := range cases {
		ts := newTextStream(c.stop)
		full := ""
		var got []string
		stopped := false
		for _, p := range c.pieces {
			full += p
			d, s := ts.add(full)
			got = append(got, d)
			if s {
				stopped = true
				break
			}
		}
		if strings.Join(got, "|") != strings.Join(c.deltas, "|") || stopped != c.stopped || ts.text() != c.text {
			t.Errorf("case %d: deltas %q stopped %v text %q; want %q %v %q", i, got, stopped, ts.text(), c.deltas, c.stopped, c.text)
		}
		if rest := ts.text()[ts.sent:]; rest != c.restWant {
			t.Errorf("case %d: rest %q, want %q", i, rest, c.restWant)
		}
	}
}
