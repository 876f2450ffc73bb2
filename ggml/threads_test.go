package ggml

import (
	"flag"
	"os"
	"testing"
)

// testThreads is the compute threads of the tests that compare a split
// model's generation with llama.cpp's (both sides get the same number).
// One: ggml's threads spin at every barrier of a graph, so on a shared
// machine a thread burns its whole time slice waiting for a partner that
// is not running. make test runs these tests beside a compile and the
// testnets on 2 cores: this package's tests took 268 CPU seconds beside two
// busy processes with 2 threads, 21 with 1 (alone: 35 and 23). The
// comparisons are the same either way (llama.cpp and the split model get
// the same threads); cmd/neurod's tests compare the two with every core.
const testThreads = 1

func TestMain(m *testing.M) {
	flag.Parse()
	if flag.Lookup("test.bench").Value.String() == "" {
		// Tests, not benchmarks: the shared threadpool's idle workers sleep
		// at once, as a node's do (neurod run), instead of polling beside
		// the one thread the tests compute with.
		SetPolling(0)
	}
	os.Exit(m.Run())
}
