#!/usr/bin/env bash
# llama-lib.sh builds llama.cpp and ggml's CPU backend, as vendored by the
# pinned github.com/ollama/ollama module, into one static library, once
# per machine: outside the work tree, keyed by the module's version, the
# compilers and the flags (and this script). It prints the directory
# that holds libneurollama.a.
#
# `go build` compiles the same sources itself, through the module's cgo
# packages, into the Go build cache; an empty cache (a fresh machine, a
# fresh CI runner) then spends about two minutes of its two cores on them.
# With `-tags llamalib` (the Makefile's builds) the ggml package links
# this library instead. Each source is compiled exactly as cgo compiles it
# (the package's #cgo flags, the CGO_* flags of the Makefile, -fPIC), so
# the two builds compute alike; the tests compare them with llama.cpp's
# own forward pass either way.
#
# Environment: GO (go), CGO_CPPFLAGS / CGO_CFLAGS / CGO_CXXFLAGS (as make
# exports them), NEURO_LLAMA_CACHE (default ~/.cache/neuro-llama), JOBS
# (default: every core).
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
dir=$($GO list -m -f '{{.Dir}}' github.com/ollama/ollama)
version=$($GO list -m -f '{{.Version}}' github.com/ollama/ollama)
[ -n "$dir" ] && [ -d "$dir" ] || { echo "llama-lib: the ollama module is not in the module cache (go mod download)" >&2; exit 1; }
cppflags=${CGO_CPPFLAGS:-"-I$dir/llama/llama.cpp/include -I$dir/ml/backend/ggml/ggml/include"}
cflags=${CGO_CFLAGS:-"-O3 -march=x86-64-v3"}
cxxflags=${CGO_CXXFLAGS:-"-O3 -march=x86-64-v3"}
cc=${CC:-gcc}
cxx=${CXX:-g++}
key=$( { echo "$version"; echo "$cppflags"; echo "$cflags"; echo "$cxxflags"; "$cc" --version | head -1; "$cxx" --version | head -1
	sha256sum "$0"; } | sha256sum | cut -c1-12)
cache=${NEURO_LLAMA_CACHE:-$HOME/.cache/neuro-llama}
out="$cache/$version-$key"
if [ -f "$out/libneurollama.a" ]; then
	echo "$out"
	exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT

# The module's cgo packages that ggml links (go list -deps ./ggml), with
# their #cgo CPPFLAGS, CFLAGS and CXXFLAGS on Linux.
L=llama/llama.cpp/src
G=ml/backend/ggml/ggml/src
packages=(
	"$L|-I$dir/$L/../include -I$dir/$L/../../../ml/backend/ggml/ggml/include||-std=c++17"
	"$L/models|-I$dir/$L/models/../../include -I$dir/$L/models/../../vendor -I$dir/$L/models/../../../../ml/backend/ggml/ggml/include||-std=c++17"
	"$G|-DNDEBUG -DGGML_USE_CPU -DGGML_VERSION=0x0 -DGGML_COMMIT=0x0 -I$dir/$G/../include -I$dir/$G/ggml-cpu||-std=c++17"
	"$G/ggml-cpu|-I$dir/$G/ggml-cpu/amx -I$dir/$G/ggml-cpu/llamafile -I$dir/$G/ggml-cpu/.. -I$dir/$G/ggml-cpu/../../include -DNDEBUG -DGGML_USE_LLAMAFILE -D_GNU_SOURCE|-O3 -Wno-implicit-function-declaration|-std=c++17"
	"$G/ggml-cpu/arch/x86|-I$dir/$G/ggml-cpu/arch/x86/../.. -I$dir/$G/ggml-cpu/arch/x86/../../.. -I$dir/$G/ggml-cpu/arch/x86/../../../../include||-std=c++17"
	"$G/ggml-cpu/llamafile|-I$dir/$G/ggml-cpu/llamafile/.. -I$dir/$G/ggml-cpu/llamafile/../.. -I$dir/$G/ggml-cpu/llamafile/../../../include||-std=c++17"
)
n=0
for p in "${packages[@]}"; do
	IFS='|' read -r pkg pcpp pc pcxx <<<"$p"
	for src in "$dir/$pkg"/*.c "$dir/$pkg"/*.cpp; do
		[ -f "$src" ] || continue
		n=$((n + 1))
		obj="$work/$n-$(basename "$src").o"
		case "$src" in
		*.c) echo "cd '$dir/$pkg' && $cc -I '$dir/$pkg' -fPIC -m64 -pthread -fmessage-length=0 $cppflags $pcpp $cflags $pc -o '$obj' -c '$src'" ;;
		*) echo "cd '$dir/$pkg' && $cxx -I '$dir/$pkg' -fPIC -m64 -pthread -fmessage-length=0 $cppflags $pcpp $cxxflags $pcxx -o '$obj' -c '$src'" ;;
		esac
	done
done >"$work/commands"
echo "llama-lib: compiling $n sources of llama.cpp and ggml $version into $out (about two minutes on two cores, once)" >&2
# The compilers' warnings (llama.cpp has many) go to a log, shown only
# when a source fails.
if ! sed "s|\$| 2>>'$work/log'|" "$work/commands" | tr '\n' '\0' | xargs -0 -P "${JOBS:-$(nproc)}" -n 1 sh -c; then
	cat "$work/log" >&2
	echo "llama-lib: a source did not compile" >&2
	exit 1
fi
ar rcs "$work/libneurollama.a" "$work"/*.o
mkdir -p "$out.tmp"
mv "$work/libneurollama.a" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
