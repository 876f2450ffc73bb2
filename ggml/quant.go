package ggml

/*
#include "ggml.h"
#include "ggml-cpu.h"

static void ggml_dequantize(ggml_to_float_t f, const void * x, float * y, int64_t n) { f(x, y, n); }
static void ggml_quantize_ref(ggml_from_float_t f, const float * x, void * y, int64_t n) { f(x, y, n); }
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
)

// quantizable reports whether ggml_quantize_chunk makes t without an
// importance matrix (IQ2_XXS, IQ2_XS, IQ1_S and IQ1_M need one); Q8_K (an
// activation type) goes through its reference routine instead.
func quantizable(t model.DType) bool {
	return t.Known() && t != model.Q8_K && !bool(C.ggml_quantize_requires_imatrix(C.enum_ggml_type(t)))
}

// Quantize converts rows of float32 values (each of rowLen values) to t
// with ggml's own quantizer, k-quants included.
func Quantize(t model.DType, x []float32, rowLen int) ([]byte, error) {
	if !quantizable(t) && t != model.Q8_K {
		if t.Known() {
			return nil, fmt.Errorf("quantize %s: ggml needs an importance matrix for it", t)
		}
		return nil, fmt.Errorf("quantize: %w %s", model.ErrUnsupportedDType, t)
	}
	if rowLen <= 0 || uint64(rowLen)%t.BlockSize() != 0 || len(x)%rowLen != 0 || len(x) == 0 {
		return nil, fmt.Errorf("quantize %s: %d values in rows of %d", t, len(x), rowLen)
	}
	rows := len(x) / rowLen
	out := make([]byte, t.RowSize(uint64(rowLen))*uint64(rows))
	initBackend()
	if t == model.Q8_K {
		// The CPU backend's quantizer: what ggml applies to activations.
		traits := C.ggml_get_type_traits_cpu(C.enum_ggml_type(t))
		if traits == nil || traits.from_float == nil {
			return nil, fmt.Errorf("quantize %s: ggml has no routine", t)
		}
		C.ggml_quantize_ref(traits.from_float, (*C.float)(&x[0]), unsafe.Pointer(&out[0]), C.int64_t(len(x)))
		return out, nil
	}
	C.ggml_quantize_chunk(C.enum_ggml_type(t), (*C.float)(&x[0]), unsafe.Pointer(&out[0]), 0,
		C.int64_t(rows), C.int64_t(rowLen), nil)
	return out, nil
}

// Dequantize converts t-encoded data back to float32 with ggml's own
// routine; F32, which ggml has none for (it is already float32), is read
// as it is.
func Dequantize(t model.DType, b []byte) ([]float32, error) {
	if t == model.F32 {
		return model.Decode(t, b)
	}
	block := t.RowSize(t.BlockSize())
	if !t.Known() || block == 0 || len(b) == 0 || uint64(len(b))%block != 0 {
		return nil, fmt.Errorf("dequantize %s: %d bytes", t, len(b))
	}
	n := uint64(len(b)) / block * t.BlockSize()
	out := make([]float32, n)
	traits := C.ggml_get_type_traits(C.enum_ggml_type(t))
	if traits == nil || traits.to_float == nil {
		return nil, fmt.Errorf("dequantize %s: ggml has no routine", t)
	}
	C.ggml_dequantize(traits.to_float, unsafe.Pointer(&b[0]), (*C.float)(&out[0]), C.int64_t(n))
	return out, nil
}

// ggmlTypeInfo is ggml's own block size, bytes per block and name of t.
func ggmlTypeInfo(t model.DType) (blck, size int, name string) {
	return int(C.ggml_blck_size(C.enum_ggml_type(t))), int(C.ggml_type_size(C.enum_ggml_type(t))),
		C.GoString(C.ggml_type_name(C.enum_ggml_type(t)))
}
