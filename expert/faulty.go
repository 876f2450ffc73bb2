package expert

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Fault makes an expert node misbehave on purpose, for the adversarial
// testnet (neurod run --testnet --faulty MODE). Never set on a real node.
type Fault string

// The faulty modes.
const (
	// FaultNone is an honest node.
	FaultNone Fault = ""
	// FaultWrong perturbs every output (scaled and shifted by about half
	// its norm).
	FaultWrong Fault = "wrong"
	// FaultLowPrec computes with the weights requantized to Q4_0 instead
	// of the shard's dtype: cheaper, and about 15% off (relative L2).
	FaultLowPrec Fault = "lowprec"
	// FaultSlow delays every compute by SlowFaultDelay.
	FaultSlow Fault = "slow"
	// FaultDrop resets the stream instead of answering.
	FaultDrop Fault = "drop"
	// FaultFlaky is wrong once in FlakyEvery results, honest otherwise.
	FaultFlaky Fault = "flaky"
)

// SlowFaultDelay is the delay of FaultSlow; FlakyEvery the period of
// FaultFlaky.
const (
	SlowFaultDelay = 200 * time.Millisecond
	FlakyEvery     = 10
)

// Faults lists the modes, for help and errors.
var Faults = []Fault{FaultWrong, FaultLowPrec, FaultSlow, FaultDrop, FaultFlaky}

// ParseFault parses a mode name ("" is an honest node).
func ParseFault(s string) (Fault, error) {
	f := Fault(strings.TrimSpace(s))
	if f == FaultNone {
		return f, nil
	}
	for _, x := range Faults {
		if f == x {
			return f, nil
		}
	}
	names := make([]string, len(Faults))
	for i, x := range Faults {
		names[i] = string(x)
	}
	return "", fmt.Errorf("faulty mode %q: want one of %s", s, strings.Join(names, ", "))
}

// faultyComputer wraps an expert's compute with a fault.
type faultyComputer struct {
	Computer
	fault Fault
	calls atomic.Int64
	// offset puts a flaky node's bad results at a different point of its
	// period on every expert, so that they are not all at call 1.
	offset int64
	// scale and shift make each liar's perturbation its own: independent
	// liars do not agree with each other (collusion is another matter).
	scale, shift float32
}

// FF is the wrapped expert's feed-forward size, for usage receipts.
func (f *faultyComputer) FF() int {
	if x, ok := f.Computer.(interface{ FF() int }); ok {
		return x.FF()
	}
	return 0
}

// RowsVary is the wrapped expert's (moe.RowVariant).
func (f *faultyComputer) RowsVary() bool { return moe.RowsVary(f.Computer) }

func (f *faultyComputer) Compute(x []float32, n int, out []float32) error {
	if err := f.Computer.Compute(x, n, out); err != nil {
		return err
	}
	c := f.calls.Add(1)
	if f.fault == FaultWrong || (f.fault == FaultFlaky && (c+f.offset)%FlakyEvery == 0) {
		for i, v := range out {
			out[i] = f.scale*v + f.shift
		}
	}
	return nil
}

// withFault wraps c with fault (a no-op for the modes that act elsewhere).
func withFault(c Computer, fault Fault) Computer {
	switch fault {
	case FaultWrong, FaultFlaky:
		// Off by 30% to 70% of its size: far outside any honest difference,
		// yet finite and plausible-looking.
		return &faultyComputer{Computer: c, fault: fault, offset: rand.Int64N(FlakyEvery),
			scale: 1.3 + 0.4*rand.Float32(), shift: 0.02 * (rand.Float32() - 0.5)}
	}
	return c
}

// lowPrecExpert builds an expert from a shard with its weights requantized
// to Q4_0: what a node that cuts corners to save memory and time would
// compute.
func lowPrecExpert(c Compute, s *model.Shard, layer int, o moe.ExpertOptions) (moe.Expert, error) {
	w, err := moe.ExpertWeightsOf(s, layer)
	if err != nil {
		return nil, err
	}
	for _, t := range []struct {
		t      *moe.Tensor
		rowLen int
	}{{&w.Gate, w.Embd}, {&w.Up, w.Embd}, {&w.Down, w.FF}} {
		if t.t.Type == model.Q4_0 {
			return nil, fmt.Errorf("lowprec: shard %s is already Q4_0", s.CID)
		}
		x, err := c.Dequantize(t.t.Type, t.t.Data)
		if err != nil {
			return nil, fmt.Errorf("lowprec: %w", err)
		}
		if t.t.Data, err = c.Quantize(model.Q4_0, x, t.rowLen); err != nil {
			return nil, fmt.Errorf("lowprec: %w", err)
		}
		t.t.Type = model.Q4_0
	}
	return c.NewExpert(w, o)
}
