//go:build llamalib

package main

// buildTags are the tags this test binary was built with, which TestMain
// builds neurod with too (the Makefile's: llama.cpp from the cached
// library).
const buildTags = "llamalib"
