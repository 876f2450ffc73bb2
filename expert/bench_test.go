//go:build ggml

package expert

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
)

// benchExpert is a Q4_0 expert with Mixtral's hidden size and a smaller
// FF, so that wire time is visible next to compute.
func benchExpert(b *testing.B, ff int) *ggml.Expert {
	b.Helper()
	const embd = 4096
	rng := rand.New(rand.NewPCG(1, 1))
	w := func() []byte {
		x := make([]float32, embd*ff)
		for i := range x {
			x[i] = 0.02 * (2*rng.Float32() - 1)
		}
		q, err := model.Encode(model.Q4_0, x)
		if err != nil {
			b.Fatal(err)
		}
		return q
	}
	e, err := ggml.NewExpert(moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q4_0, Data: w()},
		Up: moe.Tensor{Type: model.Q4_0, Data: w()}, Down: moe.Tensor{Type: model.Q4_0, Data: w()}}, moe.ExpertOptions{MaxBatch: 512})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return e
}

var benchModel, _ = cid.Decode("bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee")

// BenchmarkExpertRoundTrip: one call of one token (hidden 4096, F16 on the
// wire) on loopback, split into compute time (reported by the node) and
// wire time (the rest: framing, libp2p, scheduling).
func BenchmarkExpertRoundTrip(b *testing.B) {
	for _, ff := range []int{1024, 14336} {
		b.Run(fmt.Sprintf("ff=%d", ff), func(b *testing.B) {
			e := benchExpert(b, ff)
			sh, ch := hostPair(b)
			srv, err := NewServer(sh, DefaultConfig(), quiet())
			if err != nil {
				b.Fatal(err)
			}
			defer srv.Close()
			srv.Add(benchModel, 0, 0, e)
			srv.Start()
			cl := NewClient(ch, quiet())
			defer cl.Close()
			x := make([]float32, 4096)
			var compute, total time.Duration
			b.ResetTimer()
			for range b.N {
				t0 := time.Now()
				r, err := cl.Call(b.Context(), sh.ID(), Request{Model: benchModel, Hidden: x, N: 1})
				if err != nil {
					b.Fatal(err)
				}
				total += time.Since(t0)
				compute += r.Compute
			}
			n := float64(b.N)
			b.ReportMetric(float64(total.Microseconds())/n/1e3, "rtt_ms")
			b.ReportMetric(float64(compute.Microseconds())/n/1e3, "compute_ms")
			b.ReportMetric(float64((total-compute).Microseconds())/n/1e3, "wire_ms")
		})
	}
}

// BenchmarkExpertThroughput: calls per second one node sustains with 1, 8
// and 64 concurrent callers (one token each, FF 14336), with batching on
// (the default) and off (one request per ggml call).
func BenchmarkExpertThroughput(b *testing.B) {
	e := benchExpert(b, 14336)
	for _, batching := range []bool{true, false} {
		for _, callers := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("batching=%v/callers=%d", batching, callers), func(b *testing.B) {
				sh, ch := hostPair(b)
				cfg := DefaultConfig()
				cfg.MaxQueue = 128
				srv, err := NewServer(sh, cfg, quiet())
				if err != nil {
					b.Fatal(err)
				}
				defer srv.Close()
				var c Computer = e
				if !batching {
					c = oneAtATime{e}
				}
				srv.Add(benchModel, 0, 0, c)
				srv.Start()
				cl := NewClient(ch, quiet())
				defer cl.Close()
				x := make([]float32, 4096)
				var wg sync.WaitGroup
				per := max(1, b.N/callers)
				b.ResetTimer()
				for range callers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range per {
							if _, err := cl.Call(b.Context(), sh.ID(), Request{Model: benchModel, Hidden: x, N: 1,
								DType: neuropb.WireDType_WIRE_DTYPE_F16}); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				b.ReportMetric(float64(per*callers)/b.Elapsed().Seconds(), "calls/s")
			})
		}
	}
}

// oneAtATime turns batching off: a batch holds one token.
type oneAtATime struct{ *ggml.Expert }

func (oneAtATime) MaxBatch() int { return 1 }
