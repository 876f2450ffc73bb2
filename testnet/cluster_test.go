package testnet_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet"
)

// Eight nodes that know only the first node's address find each other
// through the DHT, and each one's heartbeat reaches all others.
func TestClusterOfEightConverges(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	c, err := testnet.NewCluster(ctx, 8, testnet.ClusterOptions{Log: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
}

// testLogger sends warnings and errors to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}
