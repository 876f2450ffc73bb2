package testnet_test

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"

	"github.com/neuro-p2p/neuro/testnet"
)

// BenchmarkGossipLatency measures GossipSub delivery latency across an
// 8-node in-process network on loopback, with neuro's GossipSub settings
// (strict signing, peer scoring, flood publishing). Each iteration one node
// (round robin) publishes a timestamped message on a bench topic and waits
// until the 7 others have it; every delivery is one sample.
//
// Reported: p50_ms, p99_ms and max_ms per delivery, and the cluster's
// start-to-healthy time (healthy_ms).
func BenchmarkGossipLatency(b *testing.B) {
	const n = 8
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := testnet.NewCluster(ctx, n, testnet.ClusterOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := c.WaitHealthy(ctx); err != nil {
		b.Fatal(err)
	}
	healthy := time.Since(start)

	const topic = "/neuro/bench/1.0.0"
	topics := make([]*pubsub.Topic, n)
	arrivals := make(chan time.Duration, 1024)
	for i, nd := range c.Nodes() {
		t, err := nd.P2P().PubSub().Join(topic)
		if err != nil {
			b.Fatal(err)
		}
		topics[i] = t
		sub, err := t.Subscribe()
		if err != nil {
			b.Fatal(err)
		}
		self := nd.ID()
		go func() {
			for {
				msg, err := sub.Next(ctx)
				if err != nil {
					return
				}
				if msg.GetFrom() == self || len(msg.Data) != 8 {
					continue
				}
				sent := time.Unix(0, int64(binary.BigEndian.Uint64(msg.Data)))
				arrivals <- time.Since(sent)
			}
		}()
	}
	// Wait (bounded) until every node sees the other 7 on the bench topic.
	for range 200 {
		ready := true
		for _, t := range topics {
			ready = ready && len(t.ListPeers()) == n-1
		}
		if ready {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}

	var lat []time.Duration
	buf := make([]byte, 8)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint64(buf, uint64(time.Now().UnixNano()))
		if err := topics[i%n].Publish(ctx, slices.Clone(buf)); err != nil {
			b.Fatal(err)
		}
		timeout := time.After(5 * time.Second)
		for got := 0; got < n-1; got++ {
			select {
			case d := <-arrivals:
				lat = append(lat, d)
			case <-timeout:
				b.Fatalf("message %d reached %d of %d nodes in 5 s", i, got, n-1)
			}
		}
	}
	b.StopTimer()
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(q(0.50), "p50_ms")
	b.ReportMetric(q(0.99), "p99_ms")
	b.ReportMetric(q(1), "max_ms")
	b.ReportMetric(float64(healthy.Milliseconds()), "healthy_ms")
}
