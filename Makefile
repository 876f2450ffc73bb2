# neuro — build, test and run a local network.
#
# `make help` lists the targets. Everything a target needs is installed or
# generated here; nothing is downloaded at run time.

GO        ?= go
BIN       := bin/neurod
TOOLS     := $(CURDIR)/.tools
NODES     ?= 5
# ggml's SIMD paths are compiled only with these (cgo packages; see
# ../shared/DEPENDENCIES.md). Harmless for pure-Go packages.
export CGO_CFLAGS   ?= -O3 -march=x86-64-v3
export CGO_CXXFLAGS ?= -O3 -march=x86-64-v3

.DEFAULT_GOAL := help
.PHONY: help build test race lint fuzz-smoke proto proto-check bench testnet clean

## help: list the targets
help:
	@awk '/^## /{sub(/^## /,""); i=index($$0,": "); printf "  %-12s %s\n", substr($$0,1,i-1), substr($$0,i+2)}' $(MAKEFILE_LIST)

## build: build neurod into bin/neurod
build:
	$(GO) build -o $(BIN) ./cmd/neurod

## test: gofmt and vet checks, then every test with the race detector, shuffled
test: lint
	$(GO) test -race -shuffle=on -count=1 -timeout 20m ./...

## race: the tests with the race detector only (no lint)
race:
	$(GO) test -race -count=1 ./...

## lint: fail on unformatted code and on go vet findings
lint:
	@out=$$(gofmt -l .); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

## fuzz-smoke: run every fuzz target for 10 s each
fuzz-smoke:
	$(GO) test ./proto/ -run '^$$' -fuzz FuzzHeartbeat -fuzztime 10s
	$(GO) test ./node/ -run '^$$' -fuzz FuzzDecodeConfig -fuzztime 10s
	$(GO) test ./model/ -run '^$$' -fuzz FuzzReadFile -fuzztime 10s

## proto: regenerate the protobuf Go code in proto/ (needs protoc: apt-get install protobuf-compiler)
proto:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go
	cd proto && PATH=$(TOOLS):$$PATH $(GO) generate ./...

## proto-check: regenerate the protobuf code and fail if it differs from the committed code
proto-check: proto
	git diff --exit-code -- proto/

## bench: run the benchmarks and print their figures
bench:
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./...

## testnet: build neurod and run a local network of NODES processes until Ctrl-C
testnet: build
	$(BIN) testnet --nodes $(NODES)

## clean: remove build outputs
clean:
	rm -rf bin $(TOOLS)
