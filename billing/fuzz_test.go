package billing

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzCheck reads any Authorization header. Properties: Check never
// panics; it admits a request only when the header carries the issued
// key itself (any case of "Bearer", surrounding spaces); every refusal
// has a status and a message.
func FuzzCheck(f *testing.F) {
	dir := f.TempDir()
	s, err := Open(filepath.Join(dir, "k.json"), "12D3KooWDHXsJbXxgPhBvEfsnmCUw3n6xZH9fc6LeQNmQU5ZrJNh")
	if err != nil {
		f.Fatal(err)
	}
	key, _, err := s.Create("12D3KooWKT1H7JGZua5ziofxNSDHw65BxX9JPum3vnsTGmnmGFQj", 1_000_000, 0)
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{"Bearer " + key, "bearer  " + key + " ", "Basic " + key, "Bearer", "", key, "Bearer neuro-",
		"Bearer " + key[:len(key)-1] + "x", "Bearer " + strings.Repeat("a", 5000)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, header string) {
		r, _ := http.NewRequest(http.MethodPost, "http://x/v1/completions", nil)
		r.Header.Set("Authorization", header)
		k, refused := s.Check(r, time.Unix(0, 0))
		if refused != nil {
			if refused.Status == 0 || refused.Message == "" {
				t.Fatalf("refusal without a status or message: %+v", refused)
			}
			return
		}
		got, ok := Bearer(r)
		if !ok || got != key || k.Account == "" {
			t.Fatalf("admitted %q", header)
		}
	})
}
