package model

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/ipfs/go-cid"
	"google.golang.org/protobuf/proto"
)

// FuzzParseManifest reads any bytes as a manifest fetched from a peer.
// Properties: an accepted manifest encodes (deterministically) to bytes
// that parse to the same manifest and encode to the same bytes again,
// whose CID is the one that names them; and a manifest is refused under
// any CID but its own.
func FuzzParseManifest(f *testing.F) {
	dir := f.TempDir()
	src := filepath.Join(dir, "m.gguf")
	if err := os.WriteFile(src, genTiny(f, Q8_0, 5), 0o644); err != nil {
		f.Fatal(err)
	}
	res, err := Split(src, filepath.Join(dir, "shards"))
	if err != nil {
		f.Fatal(err)
	}
	raw, err := MarshalManifest(res.Manifest)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(raw)
	f.Add(raw[:len(raw)/2])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		m, c, err := ParseManifest(raw, cid.Undef)
		if err != nil {
			return
		}
		if !c.Equals(CIDOf(raw)) {
			t.Fatalf("manifest CID %s is not the CID of its bytes", c)
		}
		enc, err := MarshalManifest(m)
		if err != nil {
			t.Fatalf("an accepted manifest does not encode: %v", err)
		}
		m2, c2, err := ParseManifest(enc, CIDOf(enc))
		if err != nil || !proto.Equal(m, m2) {
			t.Fatalf("encode -> parse is not stable: %v", err)
		}
		enc2, err := MarshalManifest(m2)
		if err != nil || !bytes.Equal(enc, enc2) || !c2.Equals(CIDOf(enc2)) {
			t.Fatalf("the encoding is not deterministic: %v", err)
		}
		if _, _, err := ParseManifest(enc, CIDOf(append(enc, 0))); err == nil {
			t.Fatal("a manifest was accepted under another CID")
		}
	})
}
