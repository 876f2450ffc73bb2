package ggml

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pollThread finds the wait-poll thread: its state letter and its CPU time
// in clock ticks ("" when there is none).
func pollThread(t *testing.T) (state string, ticks int64) {
	t.Helper()
	tids, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, d := range tids {
		comm, err := os.ReadFile(filepath.Join("/proc/self/task", d.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "neuro-waitpoll" {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc/self/task", d.Name(), "stat"))
		if err != nil {
			continue
		}
		// the fields after the name: state is the first, utime and
		// stime the 12th and 13th
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		return f[0], u + s
	}
	return "", 0
}

// The wait poller keeps a thread running while armed and sleeps once
// stopped or past its end.
func TestWaitPoller(t *testing.T) {
	var b Backend
	b.PollFor(0) // nothing to poll: no thread yet needed
	before := pollRounds()
	b.PollFor(10 * time.Second) // stopped below
	deadline := time.Now().Add(5 * time.Second)
	for pollRounds() == before && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if pollRounds() == before {
		t.Fatal("the poll did not start within 5 s")
	}
	// Polling, the thread never sleeps: it is running or ready to run
	// (state R) each time it is looked at, however loaded the machine.
	for i := range 20 {
		state, _ := pollThread(t)
		if state != "R" {
			t.Fatalf("look %d: the polling thread in state %q, want R", i, state)
		}
		time.Sleep(2 * time.Millisecond)
	}
	// Stopped, it sleeps.
	b.StopPolling()
	state, _ := pollThread(t)
	for state != "S" && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
		state, _ = pollThread(t)
	}
	if state != "S" {
		t.Fatalf("stopped poller in state %q, want S (sleeping)", state)
	}
	_, ticks := pollThread(t)
	time.Sleep(50 * time.Millisecond)
	if _, after := pollThread(t); after != ticks {
		t.Fatalf("a stopped poller used CPU: %d ticks then %d", ticks, after)
	}
	// A short poll ends on its own.
	b.PollFor(20 * time.Millisecond)
	deadline = time.Now().Add(5 * time.Second)
	time.Sleep(30 * time.Millisecond)
	for state, _ = pollThread(t); state != "S" && time.Now().Before(deadline); state, _ = pollThread(t) {
		time.Sleep(time.Millisecond)
	}
	if state != "S" {
		t.Fatalf("poller past its end in state %q, want S", state)
	}
}
