package gating

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/billing"
)

// keyAuth admits requests by their API key (billing.Store.Check), the
// check a gating node makes before it reads a body, and lets the admitted
// run unpaid (the ledger's part is not what the benchmarks measure).
type keyAuth struct{ s *billing.Store }

func (a keyAuth) Authorize(r *http.Request) (Bill, *billing.Refusal) {
	if _, refused := a.s.Check(r, time.Now()); refused != nil {
		return nil, refused
	}
	return nil, nil
}

// BenchmarkRefusal is the CPU one refused request costs the HTTP API's
// handler (no network): a bad key (401), a key over its rate (429), and
// no key at all.
func BenchmarkRefusal(b *testing.B) {
	self, _ := peer.Decode("12D3KooWDHXsJbXxgPhBvEfsnmCUw3n6xZH9fc6LeQNmQU5ZrJNh")
	account, _ := peer.Decode("12D3KooWKT1H7JGZua5ziofxNSDHw65BxX9JPum3vnsTGmnmGFQj")
	store, err := billing.Open(filepath.Join(b.TempDir(), "keys.json"), self)
	if err != nil {
		b.Fatal(err)
	}
	limited, lk, _ := store.Create(account, 1, 1)
	store.Allow(lk.ID, time.Now()) // its one request a minute is taken
	h := HTTPHandler(nil, HTTPOptions{Log: quiet(), Auth: keyAuth{store}})
	for _, tc := range []struct{ name, header string }{
		{"bad-key", "Bearer neuro-" + strings.Repeat("x", 43)},
		{"over-rate", "Bearer " + limited},
		{"no-key", ""},
	} {
		b.Run(tc.name, func(b *testing.B) {
			body := `{"model":"m","prompt":"x"}`
			for b.Loop() {
				r := httptest.NewRequest(http.MethodPost, "/v1/completions", strings.NewReader(body))
				if tc.header != "" {
					r.Header.Set("Authorization", tc.header)
				}
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				if w.Code != 401 && w.Code != 429 {
					b.Fatalf("status %d", w.Code)
				}
			}
		})
	}
}
