package expert

import (
	"crypto/sha256"
	"encoding/binary"
	"math"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// EncodeFloats packs rows x cols values as a wire tensor of dtype (F16
// rounds to nearest even).
func EncodeFloats(x []float32, rows, cols int, dtype neuropb.WireDType) *neuropb.Tensor {
	t := &neuropb.Tensor{Dtype: dtype, Shape: []uint32{uint32(rows), uint32(cols)}}
	le := binary.LittleEndian
	if dtype == neuropb.WireDType_WIRE_DTYPE_F16 {
		t.Data = make([]byte, 2*len(x))
		for i, v := range x {
			le.PutUint16(t.Data[2*i:], model.Float32ToFloat16(v))
		}
		return t
	}
	t.Dtype = neuropb.WireDType_WIRE_DTYPE_F32
	t.Data = make([]byte, 4*len(x))
	for i, v := range x {
		le.PutUint32(t.Data[4*i:], math.Float32bits(v))
	}
	return t
}

// TensorDigest is neuropb.FloatsDigest of the values t holds as its
// receiver decodes them; an F32 tensor's bytes are already those values.
func TensorDigest(t *neuropb.Tensor) []byte {
	if t.GetDtype() == neuropb.WireDType_WIRE_DTYPE_F32 {
		d := sha256.Sum256(t.GetData())
		return d[:]
	}
	// F16: widened to F32 a block at a time, as DecodeFloats does.
	var h neuropb.FloatsHash
	var block [1024]float32
	d := t.GetData()
	for len(d) >= 2 {
		n := min(len(d)/2, len(block))
		widenF16(block[:n], d)
		h.Write(block[:n])
		d = d[2*n:]
	}
	return h.Sum()
}

// DecodeFloats unpacks a wire tensor checked by Tensor.Rows.
func DecodeFloats(t *neuropb.Tensor) []float32 {
	le := binary.LittleEndian
	d := t.GetData()
	if t.GetDtype() == neuropb.WireDType_WIRE_DTYPE_F16 {
		out := make([]float32, len(d)/2)
		widenF16(out, d)
		return out
	}
	out := make([]float32, len(d)/4)
	for i := range out {
		out[i] = math.Float32frombits(le.Uint32(d[4*i:]))
	}
	return out
}

// widenF16 decodes len(dst) little-endian F16 values from the front of d.
func widenF16(dst []float32, d []byte) {
	for i := range dst {
		dst[i] = model.Float16ToFloat32(binary.LittleEndian.Uint16(d[2*i:]))
	}
}
