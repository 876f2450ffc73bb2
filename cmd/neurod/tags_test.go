//go:build !llamalib

package main

// buildTags are the tags this test binary was built with, which TestMain
// builds neurod with too (none: llama.cpp compiled from the module).
const buildTags = ""
