//go:build !llamalib

package ggml

// llama.cpp and ggml's CPU backend, compiled by cgo from the pinned
// ollama module's packages (see the package doc).
import _ "github.com/ollama/ollama/llama/llama.cpp/src"
