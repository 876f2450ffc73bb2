// Package ggml is neuro's only cgo: bindings to llama.cpp and ggml (as
// vendored by the pinned github.com/ollama/ollama module). Backend
// implements moe.Backend (the expert feed-forward compute, the gating
// compute and llama.cpp's tokenizer), which the binary hands to the node;
// no other package imports this one. It also gives the reference path (a
// whole GGUF through llama.cpp's own forward pass) and SplitModel, the
// distributed forward pass in one process.
//
// The C headers live in that module; the Makefile points cgo at them
// (CGO_CPPFLAGS) and turns on ggml's SIMD paths (CGO_CFLAGS/CGO_CXXFLAGS).
// Build through make, or run `eval "$(make -s env)"` first. A plain build
// compiles llama.cpp and ggml through the module's cgo packages
// (llama_src.go); with -tags llamalib, as the Makefile builds, the package
// links them from a static library scripts/llama-lib.sh built once per
// machine (llama_lib.go, CGO_LDFLAGS from make env), so that an empty Go
// build cache does not compile them again.
//
// Every entry point checks dimensions and sizes in Go before calling C, so
// bad input is an error, never a crash of the process.
package ggml

/*
#cgo CXXFLAGS: -std=c++17
#include <stdlib.h>
#include "llama.h"
#include "neuro.h"
*/
import "C"

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"
)

var initOnce sync.Once

// computeMu serialises every ggml compute and construction of this
// process: they share the threadpools (see neuro_pool: one for each thread
// count), and one graph at a time is what the cores can run anyway.
var computeMu sync.Mutex

// poolThreads is the most threads a graph computes on: every core.
var poolThreads = runtime.NumCPU()

// SetPolling sets how long the threadpools' idle workers spin before they
// sleep, from 0 (they sleep at once) to 100 (ggml's most); call it before
// the first model is loaded (a pool keeps the level it was made with).
// ggml's default, 50, spins each idle worker for up to tens of
// milliseconds after every graph: right for one process that computes
// graph after graph, wrong for a node that computes one layer and then
// waits on the network while the process it waits for needs the same cores
// (on two cores a loopback gating + expert testnet of the bench model went
// from 13.8 to 20.1 tokens/s with 0).
//
// Models loaded after a change compute on pools of the new level. A level
// below 0 restores ggml's default.
func SetPolling(level int) {
	computeMu.Lock()
	defer computeMu.Unlock()
	C.neuro_set_poll(C.int(max(-1, min(level, 100))))
}

// Polling is the level SetPolling set last (-1: ggml's default).
func Polling() int {
	computeMu.Lock()
	defer computeMu.Unlock()
	return int(C.neuro_poll())
}

// TimerSlack is the process's timer slack: how late Linux may wake a
// timed sleep so as to wake it with others. The package sets it before the
// Go runtime starts, for every thread (NEURO_TIMER_SLACK_US microseconds,
// 1,000 by default; 0 keeps Linux's 50), because Go's sysmon thread,
// polling every 20 µs after the process wakes from idle, otherwise
// preempts a compute thread thousands of times a second (see neuro.c).
func TimerSlack() time.Duration {
	return time.Duration(C.neuro_timer_slack_ns())
}

// TimerSlackEnv is the variable that sets TimerSlack (read before the Go
// runtime starts; a value that is not a whole number of microseconds from
// 0 to 100,000 is ignored).
const TimerSlackEnv = "NEURO_TIMER_SLACK_US"

// CheckTimerSlackEnv says what is wrong with TimerSlackEnv's value, if it
// is set and was ignored.
func CheckTimerSlackEnv() error {
	if C.neuro_timer_slack_env_bad() == 0 {
		return nil
	}
	return fmt.Errorf("%s=%q: not a number of microseconds from 0 to 100000; the timer slack is %v",
		TimerSlackEnv, os.Getenv(TimerSlackEnv), TimerSlack())
}

// initBackend initializes llama.cpp once and routes its logs to slog.
func initBackend() {
	initOnce.Do(func() {
		C.neuro_log_install()
		C.llama_backend_init()
	})
}

// SystemInfo is llama.cpp's description of the CPU features ggml was built
// with ("AVX2 = 1 | FMA = 1 | F16C = 1 ...").
func SystemInfo() string {
	initBackend()
	return C.GoString(C.llama_print_system_info())
}
