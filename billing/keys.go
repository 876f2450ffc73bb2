// Package billing keeps a gating node's API keys. Each key is bound to a
// ledger account (which pays for the key's requests through escrows the
// gating node opens on the strength of the account's allowance), a budget
// (the most the key may spend, in base units) and a rate (requests per
// minute). Keys are stored hashed with the node's peer ID, so that the
// file never holds a usable key and a key issued by one gating node is
// useless on another; they are compared in constant time.
//
// The store is a JSON file (mode 0600) rewritten atomically on every
// change: what a key has spent survives a crash.
package billing

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/time/rate"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
)

// Errors of the store.
var (
	// ErrNoKey: the request carries no key, or one this node never issued.
	ErrNoKey = errors.New("no valid API key")
	// ErrRevoked: the key was revoked.
	ErrRevoked = errors.New("API key revoked")
	// ErrBudget: the key's budget cannot cover the request.
	ErrBudget = errors.New("API key budget exhausted")
	// ErrUnknownID: no key has that ID.
	ErrUnknownID = errors.New("no API key with that ID")
)

// KeyPrefix starts every key, so that a leaked one is recognisable.
const KeyPrefix = "neuro-"

// maxKeys bounds the keys of one node.
const maxKeys = 10000

// Key is one API key as stored: never the key itself.
type Key struct {
	// ID is the key's public name (its first characters after the
	// prefix), for list and revoke.
	ID string `json:"id"`
	// Hash is SHA-256 of the node's peer ID and the key.
	Hash string `json:"hash"`
	// Account is the ledger account (peer ID) that pays.
	Account string `json:"account"`
	// Budget and Spent are in base units; Spent counts settled requests.
	Budget uint64 `json:"budget"`
	Spent  uint64 `json:"spent"`
	// Reserved is what requests in flight may still cost (not stored).
	Reserved uint64 `json:"-"`
	// RatePerMin is the most requests a minute (0: no limit).
	RatePerMin int       `json:"rate_per_min"`
	Created    time.Time `json:"created"`
	Revoked    bool      `json:"revoked,omitempty"`
	// Requests counts the requests the key was charged for.
	Requests uint64 `json:"requests"`
}

// Left is what the key may still spend.
func (k Key) Left() uint64 {
	used := k.Spent + k.Reserved
	if used >= k.Budget {
		return 0
	}
	return k.Budget - used
}

// Store is a node's API keys.
type Store struct {
	path string
	node peer.ID

	mu       sync.Mutex
	keys     []*Key
	limiters map[string]*rate.Limiter
}

type storeFile struct {
	Keys []*Key `json:"keys"`
}

// Open reads the store at path (a missing file is an empty store) of the
// node whose peer ID is self.
func Open(path string, self peer.ID) (*Store, error) {
	s := &Store{path: path, node: self, limiters: map[string]*rate.Limiter{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("api keys: %w", err)
	}
	var f storeFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("api keys %s: %w", path, err)
	}
	for i, k := range f.Keys {
		if k == nil || k.ID == "" || len(k.Hash) != 64 {
			return nil, fmt.Errorf("api keys %s: key %d is malformed", path, i)
		}
		if _, err := peer.Decode(k.Account); err != nil {
			return nil, fmt.Errorf("api keys %s: key %s: account: %w", path, k.ID, err)
		}
	}
	s.keys = f.Keys
	return s, nil
}

func (s *Store) hash(secret string) string {
	h := sha256.New()
	h.Write([]byte(s.node))
	h.Write([]byte{0})
	h.Write([]byte(secret))
	return hex.EncodeToString(h.Sum(nil))
}

func (s *Store) find(id string) *Key {
	for _, k := range s.keys {
		if k.ID == id {
			return k
		}
	}
	return nil
}

func (s *Store) save() error {
	b, err := json.MarshalIndent(storeFile{Keys: s.keys}, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(s.path, b, 0o600); err != nil {
		return fmt.Errorf("api keys: %w", err)
	}
	return nil
}

// Create issues a key for account with budget (base units) and a rate
// (requests per minute, 0: none). The returned key is shown once; only
// its hash is kept.
func (s *Store) Create(account peer.ID, budget uint64, perMin int) (string, Key, error) {
	if err := account.Validate(); err != nil {
		return "", Key{}, fmt.Errorf("account: %w", err)
	}
	if budget == 0 {
		return "", Key{}, errors.New("budget must be positive")
	}
	if perMin < 0 {
		return "", Key{}, fmt.Errorf("rate %d/min: must not be negative", perMin)
	}
	secret, err := newSecret(rand.Reader)
	if err != nil {
		return "", Key{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.keys) >= maxKeys {
		return "", Key{}, fmt.Errorf("this node holds %d keys already", maxKeys)
	}
	id := secret[len(KeyPrefix) : len(KeyPrefix)+8]
	if s.find(id) != nil {
		return "", Key{}, errors.New("key ID collision: try again")
	}
	k := &Key{ID: id, Hash: s.hash(secret), Account: account.String(), Budget: budget, RatePerMin: perMin,
		Created: time.Now().UTC().Truncate(time.Second)}
	s.keys = append(s.keys, k)
	if err := s.save(); err != nil {
		s.keys = s.keys[:len(s.keys)-1]
		return "", Key{}, err
	}
	return secret, *k, nil
}

// newSecret draws a key from r: KeyPrefix and 32 random bytes in
// base64url, drawn again while its ID (its first 8 characters) would
// begin with '-', which a command line takes for a flag ('neurod apikey
// revoke -V5oLq9o' failed so).
func newSecret(r io.Reader) (string, error) {
	for range 64 {
		var raw [32]byte
		if _, err := io.ReadFull(r, raw[:]); err != nil {
			return "", err
		}
		enc := base64.RawURLEncoding.EncodeToString(raw[:])
		if enc[0] != '-' {
			return KeyPrefix + enc, nil
		}
	}
	return "", errors.New("no key drawn whose ID does not begin with '-'")
}

// Get returns key id.
func (s *Store) Get(id string) (Key, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(id)
	if k == nil {
		return Key{}, false
	}
	return *k, true
}

// List returns every key, oldest first.
func (s *Store) List() []Key {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Key, len(s.keys))
	for i, k := range s.keys {
		out[i] = *k
	}
	return out
}

// Revoke revokes key id (kept in the list, refused from now on).
func (s *Store) Revoke(id string) (Key, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(id)
	if k == nil {
		return Key{}, fmt.Errorf("%w: %q", ErrUnknownID, id)
	}
	if k.Revoked {
		return *k, nil
	}
	k.Revoked = true
	if err := s.save(); err != nil {
		k.Revoked = false
		return Key{}, err
	}
	delete(s.limiters, id)
	return *k, nil
}

// Authenticate finds the key whose secret this is. It never says which
// part of a wrong key is wrong.
func (s *Store) Authenticate(secret string) (Key, error) {
	if !strings.HasPrefix(secret, KeyPrefix) || len(secret) != len(KeyPrefix)+43 {
		return Key{}, ErrNoKey
	}
	want := s.hash(secret)
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(secret[len(KeyPrefix) : len(KeyPrefix)+8])
	if k == nil || subtle.ConstantTimeCompare([]byte(k.Hash), []byte(want)) != 1 {
		return Key{}, ErrNoKey
	}
	if k.Revoked {
		return Key{}, ErrRevoked
	}
	return *k, nil
}

// Allow takes one request from key id's rate; when it is over, it says
// how long until the next one may come.
func (s *Store) Allow(id string, now time.Time) (bool, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(id)
	if k == nil || k.RatePerMin <= 0 {
		return true, 0
	}
	l := s.limiters[id]
	if l == nil {
		l = rate.NewLimiter(rate.Limit(float64(k.RatePerMin)/60), k.RatePerMin)
		s.limiters[id] = l
	}
	r := l.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

// Reserve holds amount of key id's budget for a request in flight.
func (s *Store) Reserve(id string, amount uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(id)
	if k == nil {
		return fmt.Errorf("%w: %q", ErrUnknownID, id)
	}
	if k.Revoked {
		return ErrRevoked
	}
	if left := k.Left(); amount > left {
		return fmt.Errorf("%w: the request may cost up to %s NEURO, the key has %s left of %s", ErrBudget,
			Format(amount), Format(left), Format(k.Budget))
	}
	k.Reserved += amount
	return nil
}

// Charge ends a request that reserved reserved: it spent cost (at most
// reserved), which is stored before Charge returns.
func (s *Store) Charge(id string, reserved, cost uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.find(id)
	if k == nil {
		return fmt.Errorf("%w: %q", ErrUnknownID, id)
	}
	k.Reserved -= min(k.Reserved, reserved)
	k.Spent = satAdd(k.Spent, min(cost, reserved))
	k.Requests++
	return s.save()
}

func satAdd(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// Format writes base units as NEURO ("0.0042").
func Format(v uint64) string {
	s := fmt.Sprintf("%d.%06d", v/1_000_000, v%1_000_000)
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}
