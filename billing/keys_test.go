package billing

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

func newPeer(t *testing.T) peer.ID {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(k)
	return id
}

// A key authenticates on the node that issued it only, its budget and
// spending survive a restart, and a revoked key is refused.
func TestKeysLifecycle(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "apikeys.json")
	self, account := newPeer(t), newPeer(t)
	s, err := Open(path, self)
	if err != nil {
		t.Fatal(err)
	}
	secret, k, err := s.Create(account, 5_000_000, 60)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(secret, KeyPrefix) || k.Account != account.String() || !s.Configured() {
		t.Fatalf("created %q %+v", secret, k)
	}
	raw, _ := os.ReadFile(path)
	if strings.Contains(string(raw), secret[len(KeyPrefix):]) {
		t.Fatal("the store holds the key itself")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("store mode %v", st.Mode().Perm())
	}
	if got, err := s.Authenticate(secret); err != nil || got.ID != k.ID {
		t.Fatalf("authenticate: %v %+v", err, got)
	}
	for _, bad := range []string{"", "neuro-", secret[:len(secret)-1] + "A", strings.ToUpper(secret), "Bearer " + secret, secret + "x"} {
		if bad == secret {
			continue
		}
		if _, err := s.Authenticate(bad); !errors.Is(err, ErrNoKey) {
			t.Fatalf("authenticate %q: %v", bad, err)
		}
	}
	b, _ := os.ReadFile(path)
	if err := os.WriteFile(filepath.Join(dir, "other.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	other, err := Open(filepath.Join(dir, "other.json"), newPeer(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Authenticate(secret); !errors.Is(err, ErrNoKey) {
		t.Fatalf("a key on another node's store (copied file): %v", err)
	}
	// Budget: reserve, charge, refuse past it.
	if err := s.Reserve(k.ID, 3_000_000); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(k.ID, 2_500_000); !errors.Is(err, ErrBudget) {
		t.Fatalf("reserve past the budget with one in flight: %v", err)
	}
	if err := s.Charge(k.ID, 3_000_000, 1_000_000); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(k.ID, 4_000_000); err != nil {
		t.Fatalf("reserve what is left after a cheaper charge: %v", err)
	}
	if err := s.Charge(k.ID, 4_000_000, 9_000_000); err != nil { // a cost is capped by its reservation
		t.Fatal(err)
	}
	if err := s.Reserve(k.ID, 1); !errors.Is(err, ErrBudget) {
		t.Fatalf("reserve on a spent key: %v", err)
	}
	again, err := Open(path, self)
	if err != nil {
		t.Fatal(err)
	}
	if ks := again.List(); len(ks) != 1 || ks[0].Spent != 5_000_000 || ks[0].Requests != 2 || ks[0].Reserved != 0 {
		t.Fatalf("after a restart %+v", ks)
	}
	if _, err := s.Revoke(k.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(secret); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked key: %v", err)
	}
	if _, err := s.Revoke("nope"); !errors.Is(err, ErrUnknownID) {
		t.Fatalf("revoke unknown: %v", err)
	}
	if ks := s.List(); len(ks) != 1 || !ks[0].Revoked || !s.Configured() {
		t.Fatalf("after revoking: %+v (a revoked key stays listed, and keys stay required)", ks)
	}
	if _, _, err := s.Create(account, 0, 1); err == nil {
		t.Fatal("a key with no budget was created")
	}
}

// The rate is a token bucket of a minute's requests: past it, Allow says
// when to come back.
func TestKeyRate(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "k.json"), newPeer(t))
	if err != nil {
		t.Fatal(err)
	}
	_, k, err := s.Create(newPeer(t), 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)
	for i := range 3 {
		if ok, _ := s.Allow(k.ID, now); !ok {
			t.Fatalf("request %d within the rate refused", i)
		}
	}
	ok, wait := s.Allow(k.ID, now)
	if ok || wait <= 0 || wait > 20*time.Second {
		t.Fatalf("over the rate: ok %v, retry after %v", ok, wait)
	}
	if ok, _ := s.Allow(k.ID, now.Add(wait)); !ok {
		t.Fatal("refused after the retry time")
	}
}

func TestCost(t *testing.T) {
	for _, tc := range []struct{ flops, price, want uint64 }{
		{0, 1, 0}, {999_999, 1, 0}, {1_000_000, 1, 1}, {5_000_000_000, 3, 15000}, {^uint64(0), ^uint64(0), ^uint64(0)},
	} {
		if got := Cost(tc.flops, tc.price); got != tc.want {
			t.Errorf("Cost(%d, %d) = %d, want %d", tc.flops, tc.price, got, tc.want)
		}
	}
	if got := MaxCost(10, 90, 2_000_000, 1); got != 400 {
		t.Errorf("MaxCost = %d, want 400", got)
	}
	if got := MaxCost(1, 1, 1, 1); got != 1 {
		t.Errorf("MaxCost of nearly nothing = %d, want 1", got)
	}
}

// A key's ID never begins with '-' (a command line would take it for a
// flag): a draw that would is drawn again.
func TestKeyIDNeverStartsWithDash(t *testing.T) {
	// 0xf8 encodes to '-' first; the second draw is all zeros ('A...').
	r := bytes.NewReader(append(bytes.Repeat([]byte{0xf8}, 32), make([]byte, 32)...))
	s, err := newSecret(r)
	if err != nil {
		t.Fatal(err)
	}
	if id := s[len(KeyPrefix) : len(KeyPrefix)+8]; id != "AAAAAAAA" {
		t.Fatalf("id %q, want the second draw's AAAAAAAA", id)
	}
	if _, err := newSecret(bytes.NewReader(bytes.Repeat([]byte{0xf8}, 32*64))); err == nil {
		t.Fatal("64 draws all beginning with '-': no error")
	}
}
