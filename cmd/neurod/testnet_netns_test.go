package main

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/testnet/netns"
)

// The netns testnet: two homes behind NAT, the gating node in one and an
// expert node in the other, and four public nodes. Behind two cone NATs
// hole punching opens a direct connection and the expert traffic uses it;
// behind two symmetric NATs it cannot, and the traffic goes through the
// relay. Either way the tokens are llama.cpp's, and no namespace is left.
// With 50 ms between the homes (the user-space delay line, 40 and 60 ms
// on their lines) the tokens are
// still llama.cpp's, and no token came sooner than its layers' round trips
// allow: the line really delayed the expert traffic.
func TestTestnetNetns(t *testing.T) {
	t.Parallel() // mostly waiting: the testnets overlap well
	if err := netns.Available(); err != nil {
		if os.Getenv("NEURO_REQUIRE_NETNS") != "" {
			t.Fatalf("network namespaces: %v", err)
		}
		t.Skipf("network namespaces unavailable here: %v", err)
	}
	const layers = 3
	path := makeModel(t, "--preset", "tiny", "--type", "q8_0", "--seed", "77", "--layers", fmt.Sprint(layers), "--experts", "5")
	const prompt = "homes behind routers"
	want := generateLocal(t, path, prompt, 16)
	for _, tc := range []struct {
		name, nat      string
		rtt            time.Duration
		direct, relay  bool
		wantTransports []string
	}{
		{"cone", "cone", 0, true, false, []string{"tcp", "quic-v1"}},
		{"symmetric", "symmetric", 0, false, true, []string{"tcp", "quic-v1"}},
		{"cone-rtt50ms", "cone", 50 * time.Millisecond, true, false, []string{"tcp", "quic-v1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each testnet has namespaces of its own
			args := []string{"testnet", "--netns", "--homes", "2", "--nat", tc.nat, "--model", path, "--prompt", prompt,
				"--max-tokens", "16", "--check", "--json"}
			if tc.rtt > 0 {
				// One RTT per home: 40 and 60 ms put the two homes 50 ms apart.
				args = append(args, "--rtt", "40ms,60ms", "--jitter", "1ms")
			}
			r := neurod(t, nil, args...)
			if r.code != 0 {
				t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
			}
			rep := parseTestnet(t, r.stdout)
			if fmt.Sprint(rep.Tokens) != fmt.Sprint(want) {
				t.Fatalf("netns testnet tokens %v\nllama.cpp          %v", rep.Tokens, want)
			}
			if len(rep.Connections) != 1 {
				t.Fatalf("connections %+v", rep.Connections)
			}
			c := rep.Connections[0]
			if c.Direct != tc.direct || c.ViaRelay != tc.relay || c.Calls == 0 || !strings.Contains(strings.Join(tc.wantTransports, " "), c.Transport) ||
				c.NATs != [2]string{tc.nat, tc.nat} || c.A == c.B {
				t.Fatalf("%s homes: connection %+v", tc.nat, c)
			}
			if tc.rtt > 0 {
				if l := rep.Link; l == nil || l.RTTMs != 50 || fmt.Sprint(l.HomeRTTMs) != "[40 60]" || len(l.Lines) != 2 ||
					l.Lines[0].Out == 0 || l.Lines[1].Out == 0 || c.RTTMs != 50 {
					t.Fatalf("link report %+v, connection %+v", rep.Link, c)
				}
				// A lower bound only (a busy machine adds time, never takes
				// it): each token's forward pass on the gating node waits
				// for one round trip a layer, ±1 ms of jitter each way. The
				// client's gaps between tokens are held to it on average
				// only: one token delivered late (a busy machine) makes the
				// next gap shorter by as much, as CI once saw (105 ms).
				floor := float64(layers) * (float64(tc.rtt.Milliseconds()) - 2)
				if len(rep.PerTokenComputeMs) != len(rep.Tokens) {
					t.Fatalf("per_token_compute_ms %v for %d tokens", rep.PerTokenComputeMs, len(rep.Tokens))
				}
				if m := slices.Min(rep.PerTokenComputeMs); m < floor {
					t.Fatalf("a token computed in %.1f ms, below %d layers' round trips (%.0f ms): the line did not delay", m, layers, floor)
				}
				if m := mean(rep.PerTokenMs[1:]); m < floor {
					t.Fatalf("tokens %.1f ms apart on average, below %d layers' round trips (%.0f ms): the line did not delay", m, layers, floor)
				}
			} else if rep.Link != nil {
				t.Fatalf("link report without --rtt: %+v", rep.Link)
			}
			out, err := exec.Command("ip", "netns", "list").Output()
			if err != nil {
				t.Fatal(err)
			}
			if rep.Topology == nil || len(rep.Topology.Publics) != 4 || len(rep.Topology.Homes) != 2 {
				t.Fatalf("topology %+v", rep.Topology)
			}
			for _, h := range append(rep.Topology.Publics, rep.Topology.Homes...) {
				if strings.Contains(string(out), h.Namespace) {
					t.Fatalf("namespace %s left behind:\n%s", h.Namespace, out)
				}
			}
		})
	}
}

// Spans over the emulated internet: two span nodes behind their NATs,
// 30 ms from the gating node's home, each serving the whole model; the
// one the chain uses is SIGKILLed mid-generation, and the other takes
// over by replaying the session's inputs: llama.cpp's tokens, one round
// trip a token, and no token faster than that round trip.
func TestTestnetNetnsSpansSurviveAKill(t *testing.T) {
	t.Parallel()
	if err := netns.Available(); err != nil {
		if os.Getenv("NEURO_REQUIRE_NETNS") != "" {
			t.Fatalf("network namespaces: %v", err)
		}
		t.Skipf("network namespaces unavailable here: %v", err)
	}
	rep := spanTestnet(t, 29, "a span behind a router", 16, "--netns", "--homes", "3", "--rtt", "30ms", "--kill", "1@6")
	if len(rep.Killed) != 1 || rep.KilledAfter != 6 || rep.Killed[0] < 5 {
		t.Fatalf("killed %v after %d: want one expert home's node after token 6", rep.Killed, rep.KilledAfter)
	}
	if st := rep.Stats; st.SpansPerToken != 1 || st.RoundTripsPerToken != 1 || st.SpanFailovers < 1 || st.SpanReplays < 6 {
		t.Fatalf("stats %+v: want one span and one round trip a token, a failover replaying the tokens before it", st)
	}
	if n := rep.Nodes; len(n) != 7 || !slices.Equal(n[5].Spans, []string{"0-3"}) || !slices.Equal(n[6].Spans, []string{"0-3"}) {
		t.Fatalf("nodes %+v: want the two expert homes serving 0-3", n)
	}
	// Every home's line is 30 ms, so two homes are 30 ms apart: each token
	// waits for one round trip after the one before. The client sees the
	// gaps between tokens as they arrive, and one delivered late (a busy
	// machine) makes the next gap look shorter by as much, so the bound is
	// on the median gap, not on every one (2 ms for rounding).
	if m := median(rep.PerTokenMs[1:]); m < 28 {
		t.Fatalf("tokens %.1f ms apart (median), below one round trip of 30 ms: the line did not delay", m)
	}
}

// mean is the average of xs.
func mean(xs []float64) float64 {
	sum := 0.0
	for _, x := range xs {
		sum += x
	}
	return sum / float64(max(1, len(xs)))
}

// median is the middle of xs (the mean of the two middle ones).
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
