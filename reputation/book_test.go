package reputation

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

func TestBookExcludesAndReadmits(t *testing.T) {
	b, err := Open(Config{})
	if err != nil {
		t.Fatal(err)
	}
	liar, honest := peer.ID("liar"), peer.ID("honest")
	if b.CheckRate(liar) != 1 || b.Excluded(liar) {
		t.Fatal("a new peer must be checked every time and not excluded")
	}
	b.Validated(liar, false)
	if !b.Excluded(liar) || b.Score(liar) != 0 {
		t.Fatalf("one failed check from the prior: excluded %v score %v", b.Excluded(liar), b.Score(liar))
	}
	for range 4 {
		b.Validated(liar, true)
	}
	if !b.Excluded(liar) {
		t.Fatal("re-admitted before Readmit validated probes")
	}
	b.Validated(liar, true)
	if b.Excluded(liar) {
		t.Fatal("not re-admitted after Readmit validated probes")
	}
	// An honest peer's rate falls as 1/(n+1) to the floor.
	for i := range 100 {
		if got, want := b.CheckRate(honest), max(0.05, 1/float64(i+1)); got != want {
			t.Fatalf("after %d: rate %v, want %v", i, got, want)
		}
		b.Validated(honest, true)
	}
	// One false accusation of a long-trusted peer does not exclude it.
	b.Validated(honest, false)
	if b.Excluded(honest) {
		t.Fatal("one failure excluded a trusted peer")
	}
	b.Call(honest, false, 0, 0)
	if s := b.Score(honest); s <= 0 || s >= 1 {
		t.Fatalf("score %v", s)
	}
}

func TestBookPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reputation.json")
	b, err := Open(Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	p := peer.ID("\x00\x24\x08\x01\x12\x20" + string(make([]byte, 32))) // an identity multihash
	b.Validated(p, false)
	b.Call(p, true, 2*time.Millisecond, time.Millisecond)
	if err := b.Save(); err != nil {
		t.Fatal(err)
	}
	b2, err := Open(Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if !b2.Excluded(p) || b2.Snapshot()[0].Failed != 1 || b2.Snapshot()[0].Speed >= 1 {
		t.Fatalf("reloaded: %+v", b2.Snapshot())
	}
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(Config{Path: path}); err == nil {
		t.Fatal("corrupt file: no error")
	}
}
