package expert

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// Store holds content-addressed blobs (shards and manifests) in a
// directory, each named by its CID (<cid>.blob). A blob is written to a partial file
// while its hash is computed, and renamed into place only when the hash
// matches the CID; a partial file survives an interrupted transfer so that
// the next fetch resumes it.
type Store struct {
	dir string
}

// Suffixes of store files.
const (
	blobExt    = ".blob"
	partialExt = ".partial"
)

// ErrNotFound means the store does not hold the blob.
var ErrNotFound = errors.New("not in the store")

// OpenStore opens (creating) the store in dir.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("store %s: %w", dir, err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// OpenShard loads and verifies a stored shard.
func (s *Store) OpenShard(ref *neuropb.ShardRef) (*model.Shard, error) {
	c, err := cid.Cast(ref.GetCid())
	if err != nil {
		return nil, fmt.Errorf("shard: bad cid: %w", err)
	}
	return model.OpenShardFile(s.path(c), ref)
}

// Manifest loads and verifies a stored manifest by model CID.
func (s *Store) Manifest(c cid.Cid) (*neuropb.Manifest, error) {
	raw, err := s.ReadAll(c, neuropb.MaxManifestSize)
	if err != nil {
		return nil, err
	}
	m, _, err := model.ParseManifest(raw, c)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", c, err)
	}
	return m, nil
}

func (s *Store) path(c cid.Cid) string { return filepath.Join(s.dir, c.String()+blobExt) }

// Path is where a stored blob lies (for readers that take a file, such as
// llama.cpp's tokenizer loader).
func (s *Store) Path(c cid.Cid) string    { return s.path(c) }
func (s *Store) partial(c cid.Cid) string { return filepath.Join(s.dir, c.String()+partialExt) }

// Has reports whether the store holds the blob.
func (s *Store) Has(c cid.Cid) bool {
	_, err := os.Stat(s.path(c))
	return err == nil
}

// Open opens a stored blob for reading.
func (s *Store) Open(c cid.Cid) (*os.File, int64, error) {
	f, err := os.Open(s.path(c))
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, fmt.Errorf("blob %s: %w", c, ErrNotFound)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("blob %s: %w", c, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("blob %s: %w", c, err)
	}
	return f, st.Size(), nil
}

// ReadAll returns a stored blob's bytes after checking them against c
// (bounded by max bytes).
func (s *Store) ReadAll(c cid.Cid, max int64) ([]byte, error) {
	f, size, err := s.Open(c)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if size > max {
		return nil, fmt.Errorf("blob %s: %d bytes, at most %d", c, size, max)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", c, err)
	}
	if got := model.CIDOf(b); !got.Equals(c) {
		return nil, fmt.Errorf("blob %s: %w", c, model.ErrCIDMismatch)
	}
	return b, nil
}

// List returns the CIDs of every stored blob.
func (s *Store) List() ([]cid.Cid, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", s.dir, err)
	}
	var out []cid.Cid
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), blobExt)
		if !ok {
			continue
		}
		if c, err := cid.Decode(name); err == nil {
			out = append(out, c)
		}
	}
	return out, nil
}

// Writer receives one blob's bytes, resuming from what an earlier
// interrupted write left.
type Writer struct {
	s    *Store
	c    cid.Cid
	f    *os.File
	h    hash.Hash
	size int64
	done bool
}

// NewWriter starts (or resumes) writing blob c. Offset is where the data
// must continue; the bytes already there have been hashed.
func (s *Store) NewWriter(c cid.Cid) (*Writer, error) {
	if err := checkKind(c); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(s.partial(c), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", c, err)
	}
	h := sha256.New()
	n, err := io.Copy(h, f) // re-hash what an earlier attempt wrote
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blob %s: resume: %w", c, err)
	}
	return &Writer{s: s, c: c, f: f, h: h, size: n}, nil
}

// Offset is how many bytes the blob has so far.
func (w *Writer) Offset() int64 { return w.size }

// Write appends data, hashing it on the way.
func (w *Writer) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.size += int64(n)
	return n, err
}

// Commit checks the whole blob against its CID and moves it into place. On
// a mismatch the partial data is discarded (it cannot be told which bytes
// were bad) and model.ErrCIDMismatch returned.
func (w *Writer) Commit() error {
	w.done = true
	if err := w.f.Sync(); err != nil {
		w.f.Close()
		return fmt.Errorf("blob %s: %w", w.c, err)
	}
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("blob %s: %w", w.c, err)
	}
	if err := matchCID(w.c, w.h.Sum(nil), w.size); err != nil {
		os.Remove(w.s.partial(w.c))
		return err
	}
	if err := os.Rename(w.s.partial(w.c), w.s.path(w.c)); err != nil {
		return fmt.Errorf("blob %s: %w", w.c, err)
	}
	return nil
}

// checkKind refuses a CID of a kind the store does not hold (it holds
// CIDv1 sha2-256 only).
func checkKind(c cid.Cid) error {
	if c.Prefix().MhType != mh.SHA2_256 || c.Version() != 1 {
		return fmt.Errorf("blob %s: not a CIDv1 sha2-256", c)
	}
	return nil
}

// matchCID checks a blob of size bytes whose SHA-256 is sum against c.
func matchCID(c cid.Cid, sum []byte, size int64) error {
	d, err := mh.Encode(sum, mh.SHA2_256)
	if err != nil {
		return fmt.Errorf("blob %s: %w", c, err)
	}
	if got := cid.NewCidV1(c.Type(), d); !got.Equals(c) {
		return fmt.Errorf("blob %s (%d bytes): %w: the bytes hash to %s", c, size, model.ErrCIDMismatch, got)
	}
	return nil
}

// Close keeps the partial data for a later resume (unless committed).
func (w *Writer) Close() error {
	if w.done {
		return nil
	}
	w.done = true
	return w.f.Close()
}

// link stores the file src as blob c without copying its bytes: a hard
// link, checked against c (as Put checks what it writes) and synced, then
// renamed into place. It reports false, and stores nothing, where src
// cannot be linked into the store's directory (another file system, one
// without hard links): the caller copies it then.
func (s *Store) link(c cid.Cid, src string) (bool, error) {
	if err := checkKind(c); err != nil {
		return false, err
	}
	part := s.partial(c)
	os.Remove(part) // a fresh write, not a resume
	if err := os.Link(src, part); err != nil {
		return false, nil
	}
	if err := checkFile(c, part); err != nil {
		os.Remove(part)
		return false, err
	}
	if err := os.Rename(part, s.path(c)); err != nil {
		os.Remove(part)
		return false, fmt.Errorf("blob %s: %w", c, err)
	}
	return true, nil
}

// checkFile hashes the file at path against c and syncs it to disk.
func checkFile(c cid.Cid, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("blob %s: %w", c, err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return fmt.Errorf("blob %s: %w", c, err)
	}
	if err := matchCID(c, h.Sum(nil), n); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("blob %s: %w", c, err)
	}
	return nil
}

// Put stores the blob read from r, checking it against c.
func (s *Store) Put(c cid.Cid, r io.Reader) error {
	os.Remove(s.partial(c)) // a fresh write, not a resume
	w, err := s.NewWriter(c)
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := io.Copy(w, r); err != nil {
		return fmt.Errorf("blob %s: %w", c, err)
	}
	return w.Commit()
}

// ImportSplit puts a split model directory (model.Split's output) into
// the store: the manifest under the model CID, then every shard, each
// checked against its CID. A shard on the store's file system is
// hard-linked, not copied (model.Split never rewrites a shard's file: a
// new split renames new files into place); one elsewhere is copied. It
// returns the model CID.
func (s *Store) ImportSplit(dir string) (cid.Cid, error) { return s.ImportSplitProgress(dir, nil) }

// ImportSplitProgress is ImportSplit that reports each shard stored (and
// checked against its CID): done of total.
func (s *Store) ImportSplitProgress(dir string, progress func(done, total int)) (cid.Cid, error) {
	if progress == nil {
		progress = func(int, int) {}
	}
	m, mc, err := model.LoadManifest(dir, cid.Undef)
	if err != nil {
		return cid.Undef, err
	}
	raw, err := os.ReadFile(filepath.Join(dir, model.ManifestFile))
	if err != nil {
		return cid.Undef, err
	}
	if err := s.Put(mc, bytes.NewReader(raw)); err != nil {
		return cid.Undef, err
	}
	refs := model.ShardRefs(m)
	for i, ref := range refs {
		progress(i, len(refs))
		c, err := cid.Cast(ref.GetCid())
		if err != nil {
			return cid.Undef, err
		}
		if s.Has(c) {
			continue
		}
		src := model.ShardPath(dir, c)
		linked, err := s.link(c, src)
		if err != nil {
			return cid.Undef, fmt.Errorf("import: %w", err)
		}
		if linked {
			continue
		}
		f, err := os.Open(src)
		if err != nil {
			return cid.Undef, fmt.Errorf("import: %w", err)
		}
		err = s.Put(c, f)
		f.Close()
		if err != nil {
			return cid.Undef, fmt.Errorf("import: %w", err)
		}
	}
	progress(len(refs), len(refs))
	return mc, nil
}
