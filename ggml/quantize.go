package ggml

/*
#include <stdlib.h>
#include "llama.h"
*/
import "C"

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
)

// fileTypes are the mixes `neurod model quantize --type` makes, as
// llama.cpp's llama_ftype: each picks a type per tensor the way
// llama-quantize does (Q4_K_M keeps about half the layers' ffn_down in
// Q6_K, MXFP4_MOE puts only the experts in MXFP4, …).
var fileTypes = map[string]C.enum_llama_ftype{
	"f32": C.LLAMA_FTYPE_ALL_F32, "f16": C.LLAMA_FTYPE_MOSTLY_F16, "bf16": C.LLAMA_FTYPE_MOSTLY_BF16,
	"q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": C.LLAMA_FTYPE_MOSTLY_Q4_1,
	"q5_0": C.LLAMA_FTYPE_MOSTLY_Q5_0, "q5_1": C.LLAMA_FTYPE_MOSTLY_Q5_1,
	"q2_k": C.LLAMA_FTYPE_MOSTLY_Q2_K, "q2_k_s": C.LLAMA_FTYPE_MOSTLY_Q2_K_S,
	"q3_k_s": C.LLAMA_FTYPE_MOSTLY_Q3_K_S, "q3_k_m": C.LLAMA_FTYPE_MOSTLY_Q3_K_M, "q3_k_l": C.LLAMA_FTYPE_MOSTLY_Q3_K_L,
	"q4_k_s": C.LLAMA_FTYPE_MOSTLY_Q4_K_S, "q4_k_m": C.LLAMA_FTYPE_MOSTLY_Q4_K_M,
	"q5_k_s": C.LLAMA_FTYPE_MOSTLY_Q5_K_S, "q5_k_m": C.LLAMA_FTYPE_MOSTLY_Q5_K_M, "q6_k": C.LLAMA_FTYPE_MOSTLY_Q6_K,
	"iq2_xxs": C.LLAMA_FTYPE_MOSTLY_IQ2_XXS, "iq2_xs": C.LLAMA_FTYPE_MOSTLY_IQ2_XS, "iq2_s": C.LLAMA_FTYPE_MOSTLY_IQ2_S,
	"iq2_m": C.LLAMA_FTYPE_MOSTLY_IQ2_M, "iq3_xxs": C.LLAMA_FTYPE_MOSTLY_IQ3_XXS, "iq3_xs": C.LLAMA_FTYPE_MOSTLY_IQ3_XS,
	"iq3_s": C.LLAMA_FTYPE_MOSTLY_IQ3_S, "iq3_m": C.LLAMA_FTYPE_MOSTLY_IQ3_M, "iq1_s": C.LLAMA_FTYPE_MOSTLY_IQ1_S,
	"iq1_m": C.LLAMA_FTYPE_MOSTLY_IQ1_M, "iq4_nl": C.LLAMA_FTYPE_MOSTLY_IQ4_NL, "iq4_xs": C.LLAMA_FTYPE_MOSTLY_IQ4_XS,
	"tq1_0": C.LLAMA_FTYPE_MOSTLY_TQ1_0, "tq2_0": C.LLAMA_FTYPE_MOSTLY_TQ2_0, "mxfp4": C.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
}

// imatrixTypes need an importance matrix, which neurod does not make:
// llama.cpp refuses them without one (iq3_xxs puts some attention tensors
// in IQ2_S then), or, for q2_k_s and iq2_m, makes them badly.
var imatrixTypes = []string{"iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "q2_k_s", "iq3_xxs"}

// FileTypes lists the --type values QuantizeModel takes.
func FileTypes() []string {
	var out []string
	for name := range fileTypes {
		if !slices.Contains(imatrixTypes, name) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// QuantizeModel writes the GGUF at in, re-quantized to the file type typ
// ("q4_k_m", …, FileTypes), to out, through llama.cpp's own quantizer
// (llama_model_quantize), so the result has exactly the type mix that
// llama-quantize gives the models people download. Tensors whose rows do
// not fit a type's blocks get llama.cpp's fallback type, as there.
func QuantizeModel(in, out, typ string, threads int) error {
	typ = strings.ToLower(typ)
	ft, ok := fileTypes[typ]
	if !ok {
		return fmt.Errorf("quantize: type %q: want one of %s", typ, strings.Join(FileTypes(), ", "))
	}
	if slices.Contains(imatrixTypes, typ) {
		return fmt.Errorf("quantize: type %s needs an importance matrix, which neurod does not make; choose one of %s", typ, strings.Join(FileTypes(), ", "))
	}
	f, err := os.Open(in)
	if err != nil {
		return fmt.Errorf("quantize: %w", err)
	}
	st, err := f.Stat()
	if err == nil {
		_, err = model.ReadFile(f, st.Size())
	}
	f.Close()
	if err != nil {
		return fmt.Errorf("quantize %s: %w", in, err)
	}
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	initBackend()
	p := C.llama_model_quantize_default_params()
	p.nthread = C.int32_t(threads)
	p.ftype = ft
	cin, cout := C.CString(in), C.CString(out)
	defer C.free(unsafe.Pointer(cin))
	defer C.free(unsafe.Pointer(cout))
	if rc := C.llama_model_quantize(cin, cout, &p); rc != 0 {
		os.Remove(out)
		return fmt.Errorf("quantize %s to %s: llama.cpp failed (code %d; its log says why)", in, typ, int(rc))
	}
	return nil
}
