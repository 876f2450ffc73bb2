package testnet

import (
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/moe/moetest"
)

// A simulation's settings are checked before anything starts: each bad
// one is refused with a message naming it, and unset ones get their
// defaults.
func TestSimSettings(t *testing.T) {
	ok := func() Sim { return Sim{Nodes: 10, Compute: moetest.Backend{}, Dir: t.TempDir()} }
	for _, tc := range []struct {
		name string
		edit func(*Sim)
		want string
	}{
		{"too few nodes", func(s *Sim) { s.Nodes = 4 }, "--nodes 4: need at least 5"},
		{"negative churn", func(s *Sim) { s.Churn = -1 }, "churn -1 a minute is negative"},
		{"negative min asks", func(s *Sim) { s.MinAsks = -2 }, "-2 prompts a user is negative"},
		{"negative prompt timeout", func(s *Sim) { s.PromptTimeout = -time.Second }, "prompt timeout of -1s is negative"},
		{"no backend", func(s *Sim) { s.Compute = nil }, "no compute backend"},
		{"no directory", func(s *Sim) { s.Dir = "" }, "no directory"},
	} {
		s := ok()
		tc.edit(&s)
		if err := s.defaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
	s := ok()
	if err := s.defaults(); err != nil {
		t.Fatal(err)
	}
	if s.Gating != 1 || s.Bootstrap != 2 || s.PromptTimeout != time.Minute || s.MaxTokens != 8 || s.Duration != time.Minute || s.Timeout <= 2*time.Minute {
		t.Fatalf("defaults: %+v", s)
	}
}
