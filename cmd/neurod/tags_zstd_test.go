//go:build external_libzstd

package main

// The Makefile's builds link the system's libzstd where there is one.
func init() { buildTags = append(buildTags, "external_libzstd") }
