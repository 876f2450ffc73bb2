package testnet

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

// procState is the state letter of process pid (/proc/PID/stat: R, S,
// T for stopped, ...).
func procState(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// pid (comm) state ...: comm may hold spaces, the state follows its ')'
	s := string(b)
	return strings.Fields(s[strings.LastIndexByte(s, ')')+1:])[0]
}

// Pause stops every running node until resume, and leaves one that has
// exited alone.
func TestNetworkPause(t *testing.T) {
	var procs []*Process
	for i := range 3 {
		cmd := exec.Command("sleep", "30")
		if i == 2 {
			cmd = exec.Command("true")
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p := &Process{Index: i, cmd: cmd, done: make(chan struct{})}
		go func() { _ = cmd.Wait(); close(p.done) }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-p.done })
		procs = append(procs, p)
	}
	<-procs[2].done
	nw := &Network{procs: procs}
	// Each state within a bounded wait: a signal's effect is not instant.
	waitState := func(p *Process, stopped bool) {
		t.Helper()
		for range 200 {
			if (procState(t, p.PID()) == "T") == stopped {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("node %d: state %s, want stopped %v", p.Index, procState(t, p.PID()), stopped)
	}
	resume := nw.Pause()
	waitState(procs[0], true)
	waitState(procs[1], true)
	resume()
	waitState(procs[0], false)
	waitState(procs[1], false)
}

// The loopback testnet's expert nodes run their Go side on one thread
// where they share the cores with the gating node (expert.go_procs); the
// gating node keeps Go's default, and pinned nodes have a core each. No
// node's idle compute threads spin (home.compute_poll).
func TestLoopbackExpertGoProcs(t *testing.T) {
	for _, pin := range []bool{false, true} {
		l := &Loopback{ExpertNodes: 2, Pin: pin}
		r := &Run{Dir: t.TempDir(), Model: &Model{Manifest: &neuropb.Manifest{}}, log: slog.Default()}
		var o LaunchOptions
		if err := l.Launch(r, &o); err != nil {
			t.Fatal(err)
		}
		for i := range o.Nodes {
			c := LoopbackConfig() // as prepareHome writes it
			o.Config(i, &c)
			// The nodes share the machine's cores: idle compute threads
			// sleep at once (a node of its own polls: the default).
			if c.Home.ComputePoll != 0 {
				t.Errorf("pinned %v, node %d: home.compute_poll %d, want 0", pin, i, c.Home.ComputePoll)
			}
			want := 0
			if i != l.Gating() && !pin {
				want = 1
			}
			if c.Expert.GoProcs != want {
				t.Errorf("pinned %v, node %d: expert.go_procs %d, want %d", pin, i, c.Expert.GoProcs, want)
			}
		}
	}
}
