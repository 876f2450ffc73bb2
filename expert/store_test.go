package expert

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// shardCIDs are the CIDs of m's shards.
func shardCIDs(t *testing.T, m *neuropb.Manifest) []cid.Cid {
	t.Helper()
	var out []cid.Cid
	for _, ref := range model.ShardRefs(m) {
		c, err := cid.Cast(ref.GetCid())
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// importChecked imports the split in dir (model mc, manifest m) into a
// store opened in storeDir and checks that every shard of m is in it,
// readable and verified, and that no partial file is left; linked says
// whether each must be the split's own file (a hard link) or a copy of it.
func importChecked(t *testing.T, storeDir string, mc cid.Cid, m *neuropb.Manifest, dir string, linked bool) *Store {
	t.Helper()
	s, err := OpenStore(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.ImportSplit(dir)
	if err != nil || !got.Equals(mc) {
		t.Fatalf("import: %v %v", got, err)
	}
	for _, ref := range model.ShardRefs(m) {
		if _, err := s.OpenShard(ref); err != nil {
			t.Fatalf("stored shard: %v", err)
		}
		c, _ := cid.Cast(ref.GetCid())
		src, err := os.Stat(model.ShardPath(dir, c))
		if err != nil {
			t.Fatal(err)
		}
		dst, err := os.Stat(s.Path(c))
		if err != nil {
			t.Fatal(err)
		}
		if os.SameFile(src, dst) != linked {
			t.Fatalf("shard %s: the store's file is the split's own: %v, want %v", c, !linked, linked)
		}
	}
	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), partialExt) {
			t.Fatalf("partial file left: %s", e.Name())
		}
	}
	return s
}

// A split on the store's file system is linked into it, not copied.
func TestImportSplitLinksOnTheSameFileSystem(t *testing.T) {
	mc, m, dir := tinyShards(t, model.Q8_0)
	s := importChecked(t, filepath.Join(filepath.Dir(dir), "store"), mc, m, dir, true)
	if _, err := s.Manifest(mc); err != nil {
		t.Fatal(err)
	}
	// The split removed, the store keeps every shard.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	for _, ref := range model.ShardRefs(m) {
		if _, err := s.OpenShard(ref); err != nil {
			t.Fatalf("shard after the split was removed: %v", err)
		}
	}
}

// A linked shard is checked against its CID as a copied one is: a shard
// whose bytes changed is refused, and nothing of it stays in the store.
func TestImportSplitChecksLinkedShards(t *testing.T) {
	_, m, dir := tinyShards(t, model.Q8_0)
	bad := shardCIDs(t, m)[1]
	path := model.ShardPath(dir, bad)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)-1] ^= 0xff
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := OpenStore(filepath.Join(filepath.Dir(dir), "store"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ImportSplit(dir); !errors.Is(err, model.ErrCIDMismatch) {
		t.Fatalf("import of a changed shard: %v, want %v", err, model.ErrCIDMismatch)
	}
	if s.Has(bad) {
		t.Fatal("the changed shard was stored")
	}
	if _, err := os.Stat(s.partial(bad)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("partial file of the changed shard: %v", err)
	}
}

// A split on another file system (a tmpfs) is copied into the store.
func TestImportSplitCopiesAcrossFileSystems(t *testing.T) {
	mc, m, dir := tinyShards(t, model.Q8_0)
	shm, err := os.MkdirTemp("/dev/shm", "neuro-store-test-")
	if err != nil {
		t.Skipf("no /dev/shm: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	var a, b syscall.Stat_t
	if syscall.Stat(dir, &a) != nil || syscall.Stat(shm, &b) != nil || a.Dev == b.Dev {
		t.Skip("/dev/shm is on the split's file system")
	}
	importChecked(t, filepath.Join(shm, "store"), mc, m, dir, false)
}
