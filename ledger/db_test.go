package ledger

import (
	"testing"

	cmtcfg "github.com/cometbft/cometbft/config"
)

// A CometBFT database read after it was closed (a consensus goroutine the
// node's Stop does not wait for) reads as empty; before, the same read
// finds what was written, and a write after close still fails.
func TestClosedDatabaseReadsEmpty(t *testing.T) {
	c := cmtcfg.DefaultConfig()
	c.SetRoot(t.TempDir())
	c.DBBackend = "goleveldb"
	db, err := closedReadsEmpty(&cmtcfg.DBContext{ID: "blockstore", Config: c})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Set([]byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if v, err := db.Get([]byte("k")); err != nil || string(v) != "v" {
		t.Fatalf("get before close: %q, %v", v, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if v, err := db.Get([]byte("k")); err != nil || v != nil {
		t.Fatalf("get after close: %q, %v; want nothing and no error", v, err)
	}
	if ok, err := db.Has([]byte("k")); err != nil || ok {
		t.Fatalf("has after close: %v, %v", ok, err)
	}
	if err := db.Set([]byte("k"), []byte("w")); err == nil {
		t.Fatal("a write after close succeeded")
	}
}
