package model

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Float32ToFloat16 converts to IEEE half precision with round-to-nearest-
// even, as ggml's GGML_FP32_TO_FP16 does.
func Float32ToFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23&0xff) - 127 + 15
	mant := b & 0x7fffff
	switch {
	case b&0x7fffffff > 0x7f800000: // NaN
		return sign | 0x7e00
	case exp >= 0x1f: // overflow or Inf
		return sign | 0x7c00
	case exp <= 0: // subnormal or zero
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint32(14 - exp)
		half := uint32(1) << (shift - 1)
		r := mant >> shift
		rem := mant & (1<<shift - 1)
		if rem > half || (rem == half && r&1 == 1) {
			r++
		}
		return sign | uint16(r)
	}
	r := uint32(exp)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && r&1 == 1) {
		r++ // may carry into the exponent, which is right
	}
	return sign | uint16(r)
}

// Float16ToFloat32 converts from IEEE half precision.
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// Encode converts float32 values into t's byte layout. F32, F16, Q8_0 and
// Q4_0 are supported, with ggml's reference rounding; len(x) must be a
// multiple of t's block size.
func Encode(t DType, x []float32) ([]byte, error) {
	if uint64(len(x))%t.BlockSize() != 0 {
		return nil, fmt.Errorf("encode %s: %d values is not a multiple of the block size %d", t, len(x), t.BlockSize())
	}
	out := make([]byte, t.RowSize(uint64(len(x))))
	le := binary.LittleEndian
	switch t {
	case F32:
		for i, v := range x {
			le.PutUint32(out[4*i:], math.Float32bits(v))
		}
	case F16:
		for i, v := range x {
			le.PutUint16(out[2*i:], Float32ToFloat16(v))
		}
	case Q8_0:
		for b := 0; b < len(x)/32; b++ {
			blk, dst := x[32*b:32*b+32], out[34*b:34*b+34]
			var amax float32
			for _, v := range blk {
				amax = max(amax, float32(math.Abs(float64(v))))
			}
			d := amax / 127
			var id float32
			if d != 0 {
				id = 1 / d
			}
			le.PutUint16(dst, Float32ToFloat16(d))
			for j, v := range blk {
				dst[2+j] = byte(int8(roundf(v * id)))
			}
		}
	case Q4_0:
		for b := 0; b < len(x)/32; b++ {
			blk, dst := x[32*b:32*b+32], out[18*b:18*b+18]
			var amax, maxv float32
			for _, v := range blk {
				if a := float32(math.Abs(float64(v))); a > amax {
					amax, maxv = a, v
				}
			}
			d := maxv / -8
			var id float32
			if d != 0 {
				id = 1 / d
			}
			le.PutUint16(dst, Float32ToFloat16(d))
			for j := 0; j < 16; j++ {
				x0 := min(15, int8(blk[j]*id+8.5))
				x1 := min(15, int8(blk[16+j]*id+8.5))
				dst[2+j] = byte(x0) | byte(x1)<<4
			}
		}
	default:
		return nil, fmt.Errorf("encode: %w %s (generator supports f32, f16, q8_0, q4_0)", ErrUnsupportedDType, t)
	}
	return out, nil
}

// roundf rounds half away from zero, like C's roundf.
func roundf(v float32) float32 { return float32(math.Round(float64(v))) }

// Decode converts t's byte layout back to float32 values. F32, F16, Q8_0,
// Q4_0 and Q8_K are supported; len(b) must be a whole number of blocks.
func Decode(t DType, b []byte) ([]float32, error) {
	bs := t.RowSize(t.BlockSize())
	if bs == 0 || uint64(len(b))%bs != 0 {
		return nil, fmt.Errorf("decode %s: %d bytes is not a whole number of %d-byte blocks", t, len(b), bs)
	}
	n := uint64(len(b)) / bs * t.BlockSize()
	out := make([]float32, n)
	le := binary.LittleEndian
	switch t {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(le.Uint32(b[4*i:]))
		}
	case F16:
		for i := range out {
			out[i] = Float16ToFloat32(le.Uint16(b[2*i:]))
		}
	case Q8_0:
		for blk := 0; blk < len(out)/32; blk++ {
			src := b[34*blk:]
			d := Float16ToFloat32(le.Uint16(src))
			for j := range 32 {
				out[32*blk+j] = d * float32(int8(src[2+j]))
			}
		}
	case Q4_0:
		for blk := 0; blk < len(out)/32; blk++ {
			src := b[18*blk:]
			d := Float16ToFloat32(le.Uint16(src))
			for j := range 16 {
				out[32*blk+j] = d * float32(int(src[2+j]&0x0f)-8)
				out[32*blk+16+j] = d * float32(int(src[2+j]>>4)-8)
			}
		}
	case Q8_K:
		// float32 d, 256 int8 quants, 16 int16 block sums (unused here)
		for blk := 0; blk < len(out)/256; blk++ {
			src := b[292*blk:]
			d := math.Float32frombits(le.Uint32(src))
			for j := range 256 {
				out[256*blk+j] = d * float32(int8(src[4+j]))
			}
		}
	default:
		return nil, fmt.Errorf("decode: %w %s (want f32, f16, q8_0, q4_0 or q8_k)", ErrUnsupportedDType, t)
	}
	return out, nil
}
