//go:build llamalib

package ggml

// llama.cpp and ggml's CPU backend, linked from the static library
// scripts/llama-lib.sh builds, through the link `make llamalib` keeps in
// ggml/llamalib/; llamalib.h (made there too) names the library, so that
// Go's build cache, which hashes the package's headers and not the
// library, relinks when it changes. They are C++: their runtime comes
// with them.

/*
#cgo LDFLAGS: -L${SRCDIR}/llamalib -lneurollama -lstdc++ -lm
#include "llamalib.h"
*/
import "C"
