package ggml

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// threadSlacks reads the timer slack of every thread of this process.
func threadSlacks(t *testing.T) map[string]time.Duration {
	t.Helper()
	tids, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	out := map[string]time.Duration{}
	for _, d := range tids {
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "timerslack_ns"))
		if err != nil {
			continue // the thread ended, or the kernel is older than 4.6
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			t.Fatalf("thread %s: timerslack_ns %q: %v", d.Name(), b, err)
		}
		out[d.Name()] = time.Duration(ns)
	}
	if len(out) == 0 {
		t.Skip("no thread's timerslack_ns is readable")
	}
	return out
}

// Every thread of the process, the Go runtime's own (sysmon) included,
// has the slack the package sets before the runtime starts.
func TestTimerSlackOnEveryThread(t *testing.T) {
	want := time.Millisecond
	if v := os.Getenv(TimerSlackEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 100000 {
			t.Skipf("%s=%q is ignored", TimerSlackEnv, v)
		}
		if n == 0 {
			t.Skip("the slack is the inherited one")
		}
		want = time.Duration(n) * time.Microsecond
	}
	if got := TimerSlack(); got != want {
		t.Fatalf("TimerSlack() = %v, want %v", got, want)
	}
	for tid, got := range threadSlacks(t) {
		if got != want {
			t.Errorf("thread %s: timer slack %v, want %v", tid, got, want)
		}
	}
}

// The variable sets the slack of a new process; a bad value is ignored
// and reported.
func TestTimerSlackEnv(t *testing.T) {
	if os.Getenv("NEURO_TEST_SLACK_CHILD") != "" {
		t.Logf("slack=%d", TimerSlack())
		if err := CheckTimerSlackEnv(); err != nil {
			t.Logf("err=%v", err)
		}
		return
	}
	for _, c := range []struct {
		env     string
		want    time.Duration
		wantErr bool
	}{
		{"250", 250 * time.Microsecond, false},
		{"", time.Millisecond, false},
		{"2ms", time.Millisecond, true},
		{"-5", time.Millisecond, true},
		{" 7", 7 * time.Microsecond, false}, // taken as strtol takes it, and not reported
		{"100001", time.Millisecond, true},
	} {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestTimerSlackEnv$", "-test.v")
		cmd.Env = append(os.Environ(), "NEURO_TEST_SLACK_CHILD=1", TimerSlackEnv+"="+c.env)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s=%q: %v\n%s", TimerSlackEnv, c.env, err, out)
		}
		if !strings.Contains(string(out), "slack="+strconv.FormatInt(int64(c.want), 10)+"\n") {
			t.Errorf("%s=%q: want slack %v:\n%s", TimerSlackEnv, c.env, c.want, out)
		}
		if got := strings.Contains(string(out), "err="+TimerSlackEnv); got != c.wantErr {
			t.Errorf("%s=%q: reported an error: %v, want %v:\n%s", TimerSlackEnv, c.env, got, c.wantErr, out)
		}
	}
}
