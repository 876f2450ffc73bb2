//go:build ggml

package gating

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/model"
)

// BenchmarkRejectFlood measures what a bounded flood of requests that are
// refused (bad keys: 401; a key over its rate: 429) costs a paying user:
// the user's completion latency alone and during the flood, side by side
// in one run, and how many refusals a second the gating node answered.
// go test -tags ggml ./gating -run '^$' -bench RejectFlood -benchtime 1x
func BenchmarkRejectFlood(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	net := newGatingNet(b, ctx, model.Presets["tiny"], model.F32, 17, []string{"0:*,1:*"})
	store, err := billing.Open(filepath.Join(b.TempDir(), "keys.json"), net.hosts[0].ID())
	if err != nil {
		b.Fatal(err)
	}
	account, _ := peer.Decode("12D3KooWKT1H7JGZua5ziofxNSDHw65BxX9JPum3vnsTGmnmGFQj")
	paid, _, _ := store.Create(account, 1_000_000_000, 0)
	limited, _, _ := store.Create(account, 1_000_000_000, 1)
	srv := httptest.NewServer(HTTPHandler(net.engine, HTTPOptions{Log: quiet(), Auth: keyAuth{store}}))
	defer srv.Close()
	body := fmt.Sprintf(`{"model":%q,"prompt":"a paying user","max_tokens":8,"temperature":0}`, net.model)
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	do := func(key string) (int, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	const asks = 30
	userP50 := func() float64 {
		var lat []float64
		for range asks {
			start := time.Now()
			if code, err := do(paid); err != nil || code != 200 {
				b.Fatalf("paid request: %d %v", code, err)
			}
			lat = append(lat, float64(time.Since(start).Microseconds())/1000)
		}
		slices.Sort(lat)
		return lat[len(lat)/2]
	}
	// flood sends refused requests at rate a second (0: as fast as 8
	// senders go), at most 200,000, while the user asks; it returns the
	// user's p50 and the refusals a second.
	flood := func(rate int) (float64, float64) {
		var refused, other, sent atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		const senders, most = 8, 200_000
		start := time.Now()
		for i := range senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				key := "neuro-" + strings.Repeat("x", 43)
				if i%2 == 1 {
					key = limited
				}
				for n := sent.Add(1); n <= most; n = sent.Add(1) {
					if rate > 0 { // paced: request n leaves at n/rate
						if d := time.Until(start.Add(time.Duration(n) * time.Second / time.Duration(rate))); d > 0 {
							select {
							case <-stop:
								return
							case <-time.After(d):
							}
						}
					}
					select {
					case <-stop:
						return
					default:
					}
					code, err := do(key)
					if err == nil && (code == 401 || code == 429) {
						refused.Add(1)
					} else {
						other.Add(1)
					}
				}
			}()
		}
		time.Sleep(200 * time.Millisecond)
		during := userP50()
		close(stop)
		wg.Wait()
		if other.Load() > 1 { // the limited key's first request may pass
			b.Fatalf("%d flood requests were not refused", other.Load())
		}
		return during, float64(refused.Load()) / time.Since(start).Seconds()
	}
	for range b.N {
		_ = userP50() // warm up
		alone, again := userP50(), userP50()
		b.ReportMetric(alone, "user-p50-ms")
		b.ReportMetric(again/alone, "alone-again/alone") // the noise
		for _, rate := range []int{250, 500, 1000, 2000, 0} {
			during, perS := flood(rate)
			name := fmt.Sprint(rate)
			if rate == 0 {
				name = "max"
			}
			b.ReportMetric(during/alone, "flood"+name+"/alone")
			b.ReportMetric(perS, "refused/s@"+name)
		}
	}
}
