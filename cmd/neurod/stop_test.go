package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet"
)

// A node that does not stop cleanly (here a wrapper that, on SIGTERM,
// stops neurod and then dies the way a C abort does, saying why on
// stderr) is reported with the end of its log, so that a crash in a
// testnet says what crashed.
func TestUncleanStopReportsTheLogTail(t *testing.T) {
	t.Parallel()
	abort := `neurod="$1"; shift; "$neurod" "$@" & pid=$!
trap 'kill -TERM $pid; wait $pid; echo "GGML_ASSERT(view_src == NULL) failed" >&2; exit 134' TERM
wait $pid`
	nw, err := testnet.Launch(t.Context(), testnet.LaunchOptions{Nodes: 1, Dir: t.TempDir(), Binary: neurodBin, Timeout: time.Minute,
		Log: slog.New(slog.DiscardHandler), Wrap: func(int) []string { return []string{"sh", "-c", abort, "abort"} }})
	if err != nil {
		t.Fatal(err)
	}
	rs := nw.Stop()
	if len(rs) != 1 || rs[0].Clean || !strings.Contains(rs[0].LogTail, "GGML_ASSERT(view_src == NULL) failed") {
		t.Fatalf("an aborted node's stop: %+v", rs)
	}
}

// With NEURO_CPUPROFILE_DIR set, a node writes its CPU profile and, as it
// stops, its allocations' (go tool pprof reads both).
func TestNodeWritesItsProfiles(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(ProfileEnv, dir)
	nw, err := testnet.Launch(t.Context(), testnet.LaunchOptions{Nodes: 1, Dir: t.TempDir(), Binary: neurodBin, Timeout: time.Minute,
		Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if rs := nw.Stop(); len(rs) != 1 || !rs[0].Clean {
		t.Fatalf("stop: %+v", rs)
	}
	for _, name := range []string{"cpu-node-0.pprof", "allocs-node-0.pprof"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		// a gzipped profile.proto
		if len(b) < 20 || b[0] != 0x1f || b[1] != 0x8b {
			t.Fatalf("%s: %d bytes, not a gzipped profile", name, len(b))
		}
	}
}
