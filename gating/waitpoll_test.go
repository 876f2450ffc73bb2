//go:build ggml

package gating

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
)

// pollRecorder is a moe.WaitPoller that records its calls.
type pollRecorder struct {
	mu           sync.Mutex
	polls, stops int
	on           bool
	longest      time.Duration
}

func (p *pollRecorder) PollFor(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.polls++
	p.on = true
	p.longest = max(p.longest, d)
}

func (p *pollRecorder) StopPolling() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stops++
	p.on = false
}

func (p *pollRecorder) state() (polls, stops int, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.polls, p.stops, p.on
}

// The gating node keeps a core awake while each round of expert calls is
// out and the expert node after each answer, but not for an expert node
// or a caller on this machine unless told to (poll_nearby); the tokens
// stay llama.cpp's.
func TestWaitPollWhileExpertsAnswer(t *testing.T) {
	p := model.Presets["tiny"]
	dir, res := splitModel(t, p, model.F32, 91)
	for _, nearby := range []bool{false, true} {
		t.Run(map[bool]string{false: "loopback-not-polled", true: "poll-nearby"}[nearby], func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 120*time.Second)
			defer cancel()
			hs := p2ptest.Cluster(t, ctx, 2, p2ptest.Config(500*time.Millisecond))
			expertSide := &pollRecorder{}
			cfg := expert.DefaultConfig()
			cfg.WaitPoll, cfg.WaitPollFor, cfg.WaitPollNearby = expertSide, 2*time.Millisecond, nearby
			srv, err := expert.NewServer(hs[1].LibP2P(), cfg, quiet())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { srv.Close() })
			serveExperts(t, srv, dir, res, ggml.Backend{}, nil)
			srv.Start()
			client := expert.NewClient(hs[0].LibP2P(), quiet())
			defer client.Close()
			gatingSide := &pollRecorder{}
			remote := &RemoteExperts{Client: client, Model: res.ModelCID, Embd: p.Embd, Used: p.ExpertsUsed,
				Providers: func(expert.Key) []peer.ID { return []peer.ID{hs[1].ID()} },
				DType:     neuropb.WireDType_WIRE_DTYPE_F32,
				WaitPoll:  gatingSide, WaitPollFor: 5 * time.Millisecond, PollNearby: nearby}
			generateLikeLlama(t, ctx, dir, res, remote)
			if !client.Nearby() {
				t.Fatal("an expert node on 127.0.0.1 is not nearby")
			}
			gp, gs, gon := gatingSide.state()
			ep, es, _ := expertSide.state()
			if !nearby {
				if gp != 0 || ep != 0 {
					t.Fatalf("polled for a node on this machine: gating %d times, expert %d", gp, ep)
				}
				return
			}
			// one poll per round, each stopped when its answers came
			if gp == 0 || gs != gp || gon {
				t.Fatalf("gating node: %d polls, %d stops, polling at the end %v", gp, gs, gon)
			}
			if gatingSide.longest != 5*time.Millisecond {
				t.Fatalf("gating node polled for %v, want the 5ms set", gatingSide.longest)
			}
			// a poll after each answer, stopped by each request read
			if ep < gp || es < ep {
				t.Fatalf("expert node: %d polls, %d stops for %d rounds", ep, es, gp)
			}
		})
	}
}
