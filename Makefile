# neuro — build, test and run a local network.
#
# `make help` lists the targets. Everything a target needs is installed or
# generated here; nothing is downloaded at run time.

GO        ?= go
BIN       := bin/neurod
TOOLS     := $(CURDIR)/.tools
NODES     ?= 4
STATICCHECK_VERSION := v0.8.2
# Built once per machine, outside the work tree, keyed by its version and
# the Go release that builds it.
TOOL_CACHE  ?= $(HOME)/.cache/neuro-tools
STATICCHECK := $(TOOL_CACHE)/staticcheck-$(STATICCHECK_VERSION)-$(shell $(GO) env GOVERSION)
# llama.cpp and ggml are compiled by cgo from the pinned ollama module; its
# headers are found there, never copied into this repository. ggml's SIMD
# paths are compiled only with -march=x86-64-v3 (or native): without it
# ggml runs 3-8x slower (see ../shared/DEPENDENCIES.md).
OLLAMA_DIR := $(shell $(GO) mod download github.com/ollama/ollama >/dev/null 2>&1; $(GO) list -m -f '{{.Dir}}' github.com/ollama/ollama 2>/dev/null)
export CGO_CPPFLAGS ?= -I$(OLLAMA_DIR)/llama/llama.cpp/include -I$(OLLAMA_DIR)/ml/backend/ggml/ggml/include
export CGO_CFLAGS   ?= -O3 -march=x86-64-v3
export CGO_CXXFLAGS ?= -O3 -march=x86-64-v3
# Only ggml/ and cmd/neurod link llama.cpp. Every other package is pure Go
# (it computes through the moe interfaces) and runs its tests with the race
# detector, which never compiles llama.cpp. The tests of those packages that
# need ggml's real compute (llama.cpp's tokens through the network, the
# validator's tolerances) are in files marked `//go:build ggml`; they run
# once, without the race detector, beside ggml's and cmd's own tests, so
# llama.cpp is compiled once.
CGO_PKGS  = ./ggml/... ./cmd/...
PURE_PKGS = $(shell $(GO) list ./... | grep -v -e '/ggml$$' -e '/cmd/')
GGML_TEST_FILES := $(shell grep -l '^//go:build ggml$$' $$(find . -name '*_test.go' -not -path './ggml/*' -not -path './cmd/*'))
GGML_TEST_PKGS  := $(sort $(addprefix ./,$(dir $(patsubst ./%,%,$(GGML_TEST_FILES)))))
GGML_TESTS      := $(shell sed -n 's/^func \(Test[A-Za-z0-9_]*\)(t \*testing.T).*/\1/p' $(GGML_TEST_FILES) | paste -sd'|')

.DEFAULT_GOAL := help
.PHONY: help env build llamalib test race lint fuzz-smoke proto proto-check bench bench-report testnet clean vulkan cuda test-vulkan

## help: list the targets
help:
	@awk '/^## /{sub(/^## /,""); i=index($$0,": "); printf "  %-12s %s\n", substr($$0,1,i-1), substr($$0,i+2)}' $(MAKEFILE_LIST)

## env: print the cgo settings, for plain go commands: eval "$$(make -s env)"
env:
	@echo export CGO_CPPFLAGS=\"$(CGO_CPPFLAGS)\"
	@echo export CGO_CFLAGS=\"$(CGO_CFLAGS)\"
	@echo export CGO_CXXFLAGS=\"$(CGO_CXXFLAGS)\"

# llama.cpp and ggml's CPU backend: compiled once per machine into a
# static library outside the work tree (scripts/llama-lib.sh, keyed by the
# pinned module's version, the compilers and the flags; about 95 s on 2
# cores) and linked with -tags llamalib, so that an empty Go build cache
# does not compile them again (a plain `go build` still compiles them
# from the module). ggml/llamalib/ holds a link to it.
LLAMA_CACHE ?= $(HOME)/.cache/neuro-llama
export NEURO_LLAMA_CACHE := $(LLAMA_CACHE)
# CometBFT's database package links pebble, whose zstd is DataDog's cgo
# package: it compiles its bundled copy of zstd (40 C files, about 45 CPU
# seconds on this machine, twice in make test: plain and for the race
# detector) unless the system's libzstd is there (Debian: libzstd-dev;
# .ci/run installs it). The ledger's chain uses goleveldb, so pebble's
# zstd never runs in neurod either way.
ZSTD_TAG := $(shell pkg-config --exists 'libzstd >= 1.4' 2>/dev/null && echo ,external_libzstd)
TAGS := llamalib$(ZSTD_TAG)

## llamalib: build llama.cpp and ggml into the cached static library the builds link (once per machine)
llamalib:
	@mkdir -p ggml/llamalib
	@lib=$$(scripts/llama-lib.sh) && ln -sfn "$$lib/libneurollama.a" ggml/llamalib/libneurollama.a && \
	  key="// The library ggml/llamalib links (make llamalib), named in the package so that\n// Go's build cache relinks when it changes.\n#define NEURO_LLAMALIB \"$$(basename "$$lib")\"" && \
	  if [ "$$(cat ggml/llamalib.h 2>/dev/null)" != "$$(printf "$$key")" ]; then printf "$$key\n" > ggml/llamalib.h; fi

## build: build neurod into bin/neurod
build: llamalib
	$(GO) build -tags $(TAGS) -o $(BIN) ./cmd/neurod

## test: gofmt, vet and staticcheck, and every test, shuffled: neurod built first, then at once cmd/neurod's testnets, the race-detector run of the pure-Go packages, and the lint, the ggml tests and the Vulkan tests on lavapipe one after the other
test: build
	@$(MAKE) --no-print-directory -j3 TESTVET=-vet=off test-cmd-run test-race test-rest-run

# GPU backends: libraries neurod opens at run time from its own folder
# (bin/). Each is built once per machine into $(GPU_CACHE), keyed by the
# pinned module's version and the build flags (scripts/gpu-backend.sh); a
# plain `make build` never builds one.
GPU_CACHE ?= $(HOME)/.cache/neuro-gpu
export NEURO_GPU_CACHE := $(GPU_CACHE)

## vulkan: build ggml's Vulkan backend (Debian's packages, about 3 minutes on 2 cores, cached) into bin/
vulkan:
	scripts/gpu-deps.sh vulkan
	@mkdir -p bin
	@lib=$$(scripts/gpu-backend.sh vulkan | tail -1) && cp -f $$lib/libggml-vulkan.so $$lib/libggml-base.so* bin/ && echo "bin/libggml-vulkan.so (from $$lib)"

## cuda: build ggml's CUDA backend with nvcc for sm_75/86/89/90 (cached; CUDA_ARCHS to change) into bin/
cuda:
	scripts/gpu-deps.sh cuda
	@mkdir -p bin
	@lib=$$(scripts/gpu-backend.sh cuda | tail -1) && cp -f $$lib/libggml-cuda.so $$lib/libggml-base.so* bin/ && echo "bin/libggml-cuda.so (from $$lib)"

# The GPU tests on Mesa's lavapipe, a Vulkan device on the CPU: each
# shader's first use compiles for up to a minute there, so they are few and
# share one process per package.
VULKAN_ENV = NEURO_BACKENDS=$(CURDIR)/bin GGML_VK_VISIBLE_DEVICES=0 NEURO_TEST_DEVICES=vulkan:0 NEURO_REQUIRE_VULKAN=1

## test-vulkan: the device tests on lavapipe: an expert per type family against the CPU, the split model's tokens, generate and a two-node testnet on vulkan:0
test-vulkan: build
	@$(MAKE) --no-print-directory test-vulkan-run
test-vulkan-run: vulkan
	$(VULKAN_ENV) $(GO) test $(TESTVET) -tags $(TAGS) -count=1 -timeout 20m -run '^(TestDevice(ExpertMatchesCPU|SplitMatchesLlamaCpp)|TestAutoMeasuresTheDevices)$$' ./ggml/
	$(VULKAN_ENV) $(GO) test $(TESTVET) -tags $(TAGS) -count=1 -timeout 20m -run '^TestVulkan' ./cmd/neurod/

# make test builds neurod first, alone: everything else reuses what it
# compiled or needs the binary. Then three at once: cmd/neurod's testnets
# (the longest part: they mostly wait on their processes and emulated
# round trips), the race-detector run (every package compiled again with
# -race: CPU) and the rest one after the other: the lint first (Go, like
# the race run's compile), then the ggml tests and the Vulkan tests. ggml's
# threads wait for each other at a barrier by spinning, so beside a
# compile that keeps both cores busy a test computing with two threads
# burns CPU for nothing (the ggml package's tests took 282 s instead of 23
# beside the race run's compile): the ggml tests compute with one thread
# (ggml/threads_test.go). (The race run and the lint first, then the rest
# at once: 713 s, the testnets starting at 415 s.)
#
# go test's own vet (a subset of go vet's checks, with facts computed for
# every dependency again: 43 CPU seconds in the race run's cold build) is
# off in make test, whose lint runs the whole go vet over the same packages
# with the same tags; make test-cmd, test-ggml and race keep it.
#
# The *-run targets are the parts without their `build` prerequisite,
# which make test has met once before them: each `go build` of neurod
# relinks it, and a prerequisite shared by jobs of one -j make can have
# them wait on it.
.PHONY: test-race test-cmd test-ggml test-rest test-cmd-run test-ggml-run test-rest-run test-vulkan-run
test-race:
	$(GO) test -race $(TESTVET) -tags $(TAGS) -shuffle=on -count=1 -timeout 20m $(PURE_PKGS)

# Beside cmd/neurod's tests.
test-rest: build
	@$(MAKE) --no-print-directory test-rest-run
test-rest-run:
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory test-ggml-run
	@$(MAKE) --no-print-directory test-vulkan-run

# cmd/neurod's tests (its testnets) take longest: they start first, four
# at once rather than go test's default of one per core (they mostly wait
# on their processes and emulated round trips: 407 s with two at once, 248
# s with four, on 2 cores).
test-cmd: build
	@$(MAKE) --no-print-directory test-cmd-run
test-cmd-run:
	$(GO) test $(TESTVET) -tags $(TAGS) -shuffle=on -count=1 -parallel 4 -timeout 20m ./cmd/...

test-ggml: build
	@$(MAKE) --no-print-directory test-ggml-run
test-ggml-run:
	$(GO) test $(TESTVET) -tags ggml,$(TAGS) -shuffle=on -count=1 -timeout 20m -run '^($(GGML_TESTS))$$' $(GGML_TEST_PKGS)
	$(GO) test $(TESTVET) -tags $(TAGS) -shuffle=on -count=1 -timeout 20m ./ggml/...

## race: the non-cgo packages' tests with the race detector only (no lint)
race:
	$(GO) test -race -tags $(TAGS) -count=1 $(PURE_PKGS)

## lint: fail on unformatted code, go vet findings and staticcheck findings
# With the build's tags: without llamalib, vet and staticcheck would need
# ggml's dependencies compiled, llama.cpp included (a cold build cache
# compiled it once more for them). The ggml tag only adds files (the tests
# that need ggml's compute), so one pass with it checks every file; a
# second pass without it took 95 s of a cold make test for nothing.
lint: $(STATICCHECK) llamalib
	@out=$$(gofmt -l .); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet -tags ggml,$(TAGS) ./...
	$(STATICCHECK) -tags ggml,$(TAGS) ./...

# staticcheck, pinned, installed from the Go module proxy into .tools.
$(STATICCHECK):
	mkdir -p $(TOOL_CACHE)/.bin
	GOBIN=$(TOOL_CACHE)/.bin $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv $(TOOL_CACHE)/.bin/staticcheck $@

## fuzz-smoke: run every fuzz target for 10 s each (FUZZTIME=30s for longer)
FUZZTIME ?= 10s
FUZZ_TARGETS = \
	./neuropb/:FuzzHeartbeat ./node/:FuzzDecodeConfig ./model/:FuzzReadFile ./model/:FuzzParseManifest \
	./p2p/wire/:FuzzExpertRequest ./ledger/:FuzzDecodeTx ./ledger/:FuzzReadGenesis ./ledger/:FuzzVerifyStatus \
	./reputation/:FuzzVerifyVerdict ./gating/:FuzzOpenAIBodies
fuzz-smoke:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; echo "== $$fn ($$pkg)"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME); \
	done

## proto: regenerate the protobuf Go code in neuropb/ (needs protoc: apt-get install protobuf-compiler)
proto:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go
	cd neuropb && PATH=$(TOOLS):$$PATH $(GO) generate ./...

## proto-check: regenerate the protobuf code and fail if it differs from the committed code
proto-check: proto
	git diff --exit-code -- neuropb/

## bench-report: neurod bench on the bench model: llama.cpp, split, testnet, netns at RTT 0/20/50/100 ms -> bench-report/ (root for netns)
bench-report: build
	./bin/neurod bench --out bench-report

## bench: run the benchmarks and print their figures (a few minutes)
bench: llamalib
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./testnet/
	$(GO) test -tags $(TAGS) -run '^$$' -bench ExpertFFN -benchtime 20x ./ggml/
	$(GO) test -tags $(TAGS) -run '^$$' -bench LlamaCppExpertMatmul -benchtime 50x ./ggml/
	$(GO) test -tags $(TAGS) -run '^$$' -bench Generate -benchtime 3x ./ggml/
	$(GO) test -tags ggml,$(TAGS) -run '^$$' -bench 'RoundTrip|Throughput' -benchtime 256x ./expert/
	$(GO) test -tags $(TAGS) -run '^$$' -bench 'SlowNode|Testnet$$' -benchtime 1x -timeout 60m ./cmd/neurod/
	$(GO) test -tags ggml,$(TAGS) -run '^$$' -bench 'Validation|FalseAccusations' -benchtime 1x -timeout 60m ./gating/
	$(GO) test -run '^$$' -bench ChainThroughput -benchtime 1x ./ledger/
	$(GO) test -run '^$$' -bench SettleCost -benchtime 20x ./ledger/

## testnet: build neurod; a gating node and NODES expert nodes answer a prompt, then run until Ctrl-C.
## The model speaks: its weights are planted so that the experts on the other nodes carry PLANTED on
## from its first words (RANDOM=1: the random tiny model instead).
PLANTED ?= Once upon a time, experts on many machines spoke through one network.
testnet: build
	@if [ -n "$(RANDOM)" ]; then $(BIN) testnet --nodes $(NODES); else \
	  dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && \
	  $(BIN) model make --planted "$(PLANTED)" --embd 128 --ff 128 --type q8_0 --out "$$dir/planted.gguf" && \
	  $(BIN) testnet --nodes $(NODES) --model "$$dir/planted.gguf" --prompt "$$(echo '$(PLANTED)' | cut -d' ' -f1-4)"; fi

## clean: remove build outputs
clean:
	rm -rf bin $(TOOLS) ggml/llamalib ggml/llamalib.h
