//go:build llamalib

package ggml

// llama.cpp and ggml's CPU backend, linked from the static library
// scripts/llama-lib.sh builds (the Makefile puts it on CGO_LDFLAGS, whole:
// backends register themselves from objects nothing else references).
// They are C++: their runtime comes with them.

/*
#cgo LDFLAGS: -L${SRCDIR}/llamalib -lneurollama -lstdc++ -lm
*/
import "C"
