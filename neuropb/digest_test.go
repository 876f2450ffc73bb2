package neuropb

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"math"
	"testing"
)

// TestFloatsDigest: the digest is SHA-256 of the floats as little-endian
// F32, whether given at once or a run at a time, NaNs' bits included, and
// it allocates nothing beyond the digest.
func TestFloatsDigest(t *testing.T) {
	x := make([]float32, 3000)
	for i := range x {
		x[i] = float32(i)*0.37 - 500
	}
	x[7] = float32(math.Inf(-1))
	x[11] = math.Float32frombits(0x7fc00123) // a NaN with a payload
	x[13] = float32(math.Copysign(0, -1))
	le := make([]byte, 4*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint32(le[4*i:], math.Float32bits(v))
	}
	want := sha256.Sum256(le)
	if got := FloatsDigest(x); !bytes.Equal(got, want[:]) {
		t.Fatalf("FloatsDigest = %x, want %x", got, want)
	}
	var h FloatsHash
	for rest := x; len(rest) > 0; {
		n := min(len(rest), 1100) // runs across the hash's block size
		h.Write(rest[:n])
		rest = rest[n:]
	}
	if got := h.Sum(); !bytes.Equal(got, want[:]) {
		t.Fatalf("FloatsHash in runs = %x, want %x", got, want)
	}
	empty := sha256.Sum256(nil)
	if got := FloatsDigest(nil); !bytes.Equal(got, empty[:]) {
		t.Fatalf("FloatsDigest(nil) = %x, want %x", got, empty)
	}
	if n := testing.AllocsPerRun(20, func() { FloatsDigest(x) }); n > 1 {
		t.Errorf("FloatsDigest allocates %v times a call, want at most 1 (its digest)", n)
	}
}
