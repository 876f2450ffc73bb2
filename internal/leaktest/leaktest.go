// Package leaktest checks that a service leaves no goroutine behind once
// it is closed: no goroutine that runs, or was created by, a function of
// the packages under test. Goroutines of libraries the service uses (a
// libp2p host the test made, CometBFT) are not its own and are left
// alone, which is why this is a check by package rather than goleak's
// whole-process one.
package leaktest

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Snapshot records the goroutines of pkgs (import paths, e.g.
// "github.com/neuro-p2p/neuro/expert") that exist now: other tests' and
// the test's own are not the service's.
type Snapshot struct {
	pkgs   []string
	before map[string]bool
}

// Take records the goroutines of pkgs running now.
func Take(pkgs ...string) *Snapshot {
	s := &Snapshot{pkgs: pkgs, before: map[string]bool{}}
	for id := range s.find() {
		s.before[id] = true
	}
	return s
}

// find returns the stacks of the goroutines with a frame (or a creator)
// in one of the packages, by goroutine header line ("goroutine 7").
func (s *Snapshot) find() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	out := map[string]string{}
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		text := string(g)
		header, _, _ := strings.Cut(text, "\n")
		id := strings.Join(strings.Fields(header)[:2], " ")
		for _, line := range strings.Split(text, "\n")[1:] {
			line = strings.TrimPrefix(strings.TrimSpace(line), "created by ")
			if s.ours(line) {
				out[id] = text
				break
			}
		}
	}
	return out
}

// ours says whether a stack line names a function of one of the packages
// (not of a sub-package, nor a test function or its closures).
func (s *Snapshot) ours(line string) bool {
	for _, p := range s.pkgs {
		if rest, ok := strings.CutPrefix(line, p+"."); ok && !strings.HasPrefix(rest, "Test") {
			return true
		}
	}
	return false
}

// Check fails t if a goroutine of the packages that did not exist at Take
// is still running. Like goleak it looks again a bounded number of times
// over about a second, for goroutines that are returning.
func (s *Snapshot) Check(t testing.TB) {
	t.Helper()
	var left map[string]string
	for i := range 20 {
		left = s.find()
		for id := range s.before {
			delete(left, id)
		}
		if len(left) == 0 {
			return
		}
		time.Sleep(time.Duration(min(100, 5<<i)) * time.Millisecond)
	}
	for _, stack := range left {
		t.Errorf("goroutine left running after Close:\n%s", stack)
	}
}
