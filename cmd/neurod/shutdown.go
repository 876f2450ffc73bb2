package main

import (
	"bytes"
	"log/slog"
	"runtime/pprof"
	"time"
)

// shutdownStall is how long a node may take to shut down before it logs
// what every goroutine is doing: a stuck shutdown then says where it sticks.
const shutdownStall = 8 * time.Second

// watchShutdown logs the stacks of all goroutines if the returned stop is
// not called within after.
func watchShutdown(log *slog.Logger, after time.Duration) (stop func()) {
	t := time.AfterFunc(after, func() {
		var b bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
		log.Error("shutdown is taking long; goroutines follow", "after", after, "stacks", b.String())
	})
	return func() { t.Stop() }
}
