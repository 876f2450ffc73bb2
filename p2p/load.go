package p2p

import (
	"bytes"
	"os"
	"strconv"
)

// ProcessRSS returns this process's resident memory in bytes, or 0 where
// /proc is missing.
func ProcessRSS() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := bytes.Fields(b)
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseUint(string(f[1]), 10, 64)
	if err != nil {
		return 0
	}
	return pages * uint64(os.Getpagesize())
}

// readLoad1Centi returns the one-minute load average times 100, or 0 where
// /proc is missing.
func readLoad1Centi() uint32 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := bytes.Fields(b)
	if len(f) < 1 {
		return 0
	}
	v, err := strconv.ParseFloat(string(f[0]), 64)
	if err != nil || v < 0 {
		return 0
	}
	return uint32(v * 100)
}

// Load1 is the machine's one-minute load average (0 where /proc is
// missing).
func Load1() float64 { return float64(readLoad1Centi()) / 100 }
