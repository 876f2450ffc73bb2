package model

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// DType is a ggml tensor type, numbered as in ggml.h.
type DType uint32

// The ggml types neuro reads. Others are refused with ErrUnsupportedDType.
const (
	F32  DType = 0
	F16  DType = 1
	Q4_0 DType = 2
	Q4_1 DType = 3
	Q5_0 DType = 6
	Q5_1 DType = 7
	Q8_0 DType = 8
	Q2_K DType = 10
	Q3_K DType = 11
	Q4_K DType = 12
	Q5_K DType = 13
	Q6_K DType = 14
	// Q8_K is the activation type ggml pairs with k-quant weights.
	Q8_K    DType = 15
	IQ2_XXS DType = 16
	IQ2_XS  DType = 17
	IQ3_XXS DType = 18
	IQ1_S   DType = 19
	IQ4_NL  DType = 20
	IQ3_S   DType = 21
	IQ2_S   DType = 22
	IQ4_XS  DType = 23
	IQ1_M   DType = 29
	BF16    DType = 30
	TQ1_0   DType = 34
	TQ2_0   DType = 35
	// MXFP4 is gpt-oss's expert type: 32 4-bit floats with a shared
	// 8-bit exponent.
	MXFP4 DType = 39
)

// ErrUnsupportedDType is returned for a ggml type neuro does not handle.
var ErrUnsupportedDType = errors.New("unsupported dtype")

type dtypeInfo struct {
	name      string
	blockSize uint64 // elements per block
	typeSize  uint64 // bytes per block
}

var dtypes = map[DType]dtypeInfo{
	F32:  {"f32", 1, 4},
	F16:  {"f16", 1, 2},
	BF16: {"bf16", 1, 2},
	Q4_0: {"q4_0", 32, 18},
	Q4_1: {"q4_1", 32, 20},
	Q5_0: {"q5_0", 32, 22},
	Q5_1: {"q5_1", 32, 24},
	Q8_0: {"q8_0", 32, 34},
	Q2_K: {"q2_k", 256, 84},
	Q3_K: {"q3_k", 256, 110},
	Q4_K: {"q4_k", 256, 144},
	Q5_K: {"q5_k", 256, 176},
	Q6_K: {"q6_k", 256, 210},
	Q8_K: {"q8_k", 256, 292},

	IQ2_XXS: {"iq2_xxs", 256, 66},
	IQ2_XS:  {"iq2_xs", 256, 74},
	IQ3_XXS: {"iq3_xxs", 256, 98},
	IQ1_S:   {"iq1_s", 256, 50},
	IQ4_NL:  {"iq4_nl", 32, 18},
	IQ3_S:   {"iq3_s", 256, 110},
	IQ2_S:   {"iq2_s", 256, 82},
	IQ4_XS:  {"iq4_xs", 256, 136},
	IQ1_M:   {"iq1_m", 256, 56},
	TQ1_0:   {"tq1_0", 256, 54},
	TQ2_0:   {"tq2_0", 256, 66},
	MXFP4:   {"mxfp4", 32, 17},
}

// DTypes lists every type neuro reads, in ggml's order.
func DTypes() []DType {
	out := make([]DType, 0, len(dtypes))
	for t := range dtypes {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// Known reports whether neuro handles the type.
func (t DType) Known() bool { _, ok := dtypes[t]; return ok }

// String is the lower-case ggml name ("q8_0").
func (t DType) String() string {
	if i, ok := dtypes[t]; ok {
		return i.name
	}
	return fmt.Sprintf("ggml_type(%d)", uint32(t))
}

// BlockSize is the number of elements in one quantization block.
func (t DType) BlockSize() uint64 {
	if i, ok := dtypes[t]; ok {
		return i.blockSize
	}
	return 1
}

// RowSize is the number of bytes of n elements (n a multiple of BlockSize).
func (t DType) RowSize(n uint64) uint64 {
	i, ok := dtypes[t]
	if !ok {
		return 0
	}
	return n / i.blockSize * i.typeSize
}

// ParseDType parses a type name such as "q8_0" (case-insensitive).
func ParseDType(s string) (DType, error) {
	for t, i := range dtypes {
		if strings.EqualFold(s, i.name) {
			return t, nil
		}
	}
	return 0, fmt.Errorf("%w %q", ErrUnsupportedDType, s)
}
