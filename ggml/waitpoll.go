package ggml

/*
#include "neuro.h"
*/
import "C"

import (
	"time"

	"github.com/neuro-p2p/neuro/moe"
)

// PollFor implements moe.WaitPoller: the process's wait-poll thread
// (started the first time) polls until d from now.
func (Backend) PollFor(d time.Duration) {
	d = min(d, moe.MaxLanePoll)
	if d < time.Microsecond {
		return
	}
	C.neuro_poll_for(C.int(d / time.Microsecond))
}

// StopPolling implements moe.WaitPoller.
func (Backend) StopPolling() { C.neuro_poll_stop() }

// pollRounds counts the polls the wait-poll thread started.
func pollRounds() int64 { return int64(C.neuro_poll_rounds()) }
