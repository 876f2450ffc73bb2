package billing

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Refusal is why an HTTP request is refused, in the terms of OpenAI's
// API: the status, the error's type and code, the message, and when to
// come back (429).
type Refusal struct {
	Status     int
	Type, Code string
	Message    string
	RetryAfter time.Duration
	// Authenticate: a 401, which asks for a bearer token.
	Authenticate bool
}

// Bearer is the key of an "Authorization: Bearer KEY" header (false:
// none, several, or another scheme).
func Bearer(r *http.Request) (string, bool) {
	h := r.Header.Values("Authorization")
	if len(h) != 1 {
		return "", false
	}
	scheme, key, ok := strings.Cut(strings.TrimSpace(h[0]), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	key = strings.TrimSpace(key)
	return key, key != ""
}

// Check admits an HTTP request by its bearer key: the key, live and
// within its rate and budget, or the refusal. It costs a hash and a map
// lookup: a flood of bad keys costs no model compute and no ledger
// transaction.
func (s *Store) Check(r *http.Request, now time.Time) (Key, *Refusal) {
	secret, ok := Bearer(r)
	if !ok {
		return Key{}, &Refusal{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
			Message: "missing API key: send it as 'Authorization: Bearer KEY'", Authenticate: true}
	}
	k, err := s.Authenticate(secret)
	switch {
	case errors.Is(err, ErrRevoked):
		return Key{}, &Refusal{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
			Message: "API key revoked", Authenticate: true}
	case err != nil:
		return Key{}, &Refusal{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
			Message: "invalid API key", Authenticate: true}
	}
	if ok, wait := s.Allow(k.ID, now); !ok {
		return Key{}, &Refusal{Status: http.StatusTooManyRequests, Type: "requests", Code: "rate_limit_exceeded",
			Message: fmt.Sprintf("rate limit of %d requests a minute reached for this API key", k.RatePerMin), RetryAfter: wait}
	}
	if k.Left() == 0 {
		return Key{}, &Refusal{Status: http.StatusPaymentRequired, Type: "insufficient_quota", Code: "insufficient_quota",
			Message: fmt.Sprintf("API key budget of %s NEURO is spent", Format(k.Budget))}
	}
	return k, nil
}

// Configured reports whether the store holds any key, live or revoked:
// once a node has issued keys, its API needs them.
func (s *Store) Configured() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.keys) > 0
}
