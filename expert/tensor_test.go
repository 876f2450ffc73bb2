package expert

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/neuro-p2p/neuro/neuropb"
)

// A tensor's digest is the digest of the values its receiver decodes, in
// either wire type (receipts bind experts to outputs by it).
func TestTensorDigest(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 3))
	x := make([]float32, 3*1500) // more than FloatsDigest's buffer
	for i := range x {
		x[i] = rng.Float32()*2 - 1
	}
	for _, dt := range []neuropb.WireDType{neuropb.WireDType_WIRE_DTYPE_F32, neuropb.WireDType_WIRE_DTYPE_F16} {
		enc := EncodeFloats(x, 3, 1500, dt)
		if !bytes.Equal(TensorDigest(enc), neuropb.FloatsDigest(DecodeFloats(enc))) {
			t.Fatalf("%v: digest of the tensor differs from that of its values", dt)
		}
	}
}
