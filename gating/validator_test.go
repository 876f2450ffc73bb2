package gating

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// A check waiting on a peer that will never answer (one SIGKILLed
// mid-generation) ends when the validator closes, cancelled, rather than
// holding the node's shutdown to the check's timeout.
func TestValidatorCloseEndsChecksInFlight(t *testing.T) {
	v := NewValidator("self", nil, ValidatorConfig{}, nil)
	started := make(chan struct{})
	ended := make(chan error, 1)
	v.spawn(nil, func(ctx context.Context) {
		close(started)
		<-ctx.Done()
		ended <- ctx.Err()
	})
	<-started
	v.Close()
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Fatalf("check ended with %v, want it cancelled by Close", err)
	}
}
