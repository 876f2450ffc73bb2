//go:build llamalib

package main

// The Makefile's builds take llama.cpp from the cached library.
func init() { buildTags = append(buildTags, "llamalib") }
