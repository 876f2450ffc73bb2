#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of neuro on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh prepare   here, with Go: stage everything in .gpu/
#   scripts/gpu-check.sh run [tests|bench|all]
#                                  there, with nvcc, cmake and ninja (no Go
#                                  needed): build the CUDA backend, run the
#                                  device tests on CUDA and on Vulkan, and
#                                  print the benchmarks beside llama.cpp's
#
# prepare builds the ggml package's test binary (go test -c), copies the
# pinned ggml sources and the Vulkan backend (make vulkan) into .gpu/; carry
# that folder (and .gl/ with Debian's libvulkan1, for Vulkan) to the GPU
# machine. run prints every figure and exits non-zero if a test failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=$root/.gpu

prepare() {
	rm -rf "$stage"
	mkdir -p "$stage"
	eval "$(make -s env)"
	go test -c -ldflags='-s -w' -o "$stage/ggml.test" ./ggml
	mod=$(go list -m -f '{{.Dir}}' github.com/ollama/ollama)
	cp -r "$mod/ml/backend/ggml/ggml" "$stage/ggml-src"
	chmod -R u+w "$stage/ggml-src"
	rm -rf "$stage/ggml-src/src/ggml-vulkan/vulkan-shaders" "$stage/ggml-src/src/ggml-metal" "$stage/ggml-src/src/ggml-hip"
	vk=$(scripts/gpu-backend.sh vulkan | tail -1)
	mkdir -p "$stage/vulkan"
	cp "$vk"/libggml-vulkan.so "$vk"/libggml-base.so* "$stage/vulkan/"
	mkdir -p "$root/.gl"
	if ! ls "$root"/.gl/libvulkan1_*.deb >/dev/null 2>&1; then
		(cd "$root/.gl" && apt-get download libvulkan1)
	fi
	du -sh "$stage" "$root/.gl"
}

# setup: Vulkan's loader, the CUDA backend (built once per machine), and
# the devices to test.
setup() {
	for f in "$root"/.gl/*.deb; do dpkg -x "$f" /; done
	ldconfig
	if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
		export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
	fi
	echo "== machine (Vulkan ICDs: $(ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | tr '\n' ' '))"
	nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
	nvcc --version | tail -2
	echo "cores: $(nproc)"
	cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
	echo "== CUDA backend (sm_$cap only, to fit the lease; make cuda builds sm_75/86/89/90)"
	devices=vulkan:0
	local cuda=""
	if [ -f "$stage/cuda-lib.tar.xz" ]; then
		# A backend built on an earlier lease (same sources and flags).
		cuda=/tmp/neuro-gpu/prebuilt/lib
		mkdir -p "$cuda" && tar -xJf "$stage/cuda-lib.tar.xz" -C "$cuda"
		devices=cuda:0,vulkan:0
		echo "(loaded, built earlier: $(cat "$cuda/.built"))"
	elif cuda=$(CUDA_ARCHS="${cap}-real" GGML_SRC="$stage/ggml-src" NEURO_GPU_CACHE=/tmp/neuro-gpu \
		timeout 400 "$root/scripts/gpu-backend.sh" cuda 2>"$logs/cuda-build.log" | tail -1) && [ -n "$cuda" ]; then
		devices=cuda:0,vulkan:0
		grep '^== ggml-cuda built' "$logs/cuda-build.log" || echo "(cached: $cuda)"
	else
		echo "CUDA backend build failed:"
		tail -30 "$logs/cuda-build.log"
		rc=1
	fi
	export NEURO_BACKENDS="${cuda:+$cuda:}$stage/vulkan"
	echo "== $(($(date +%s) - t0)) s; devices"
	"$stage/ggml.test" -test.run '^TestDeviceList$' -test.v >"$logs/devices.log" 2>&1 || rc=1
	grep -v '^=== RUN' "$logs/devices.log"
	# Test only the devices that are there (a missing one is reported above).
	local have=""
	for d in ${devices//,/ }; do
		if grep -q "device_test.go:[0-9]*: $d " "$logs/devices.log"; then have="$have,$d"; fi
	done
	devices=${have#,}
	echo "testing: ${devices:-no GPU device}"
}

tests() {
	echo "== $(($(date +%s) - t0)) s; equivalence on $devices, every type"
	NEURO_TEST_DEVICES=$devices NEURO_TEST_TYPES=all timeout 200 "$stage/ggml.test" -test.run '^TestDevice' -test.v \
		>"$logs/tests.log" 2>&1 || rc=1
	grep -E 'rel L2|split|llama.cpp|panic|Error|error|^(---|ok|FAIL|PASS)' "$logs/tests.log" || true
}

bench() {
	echo "== $(($(date +%s) - t0)) s; benchmarks (cpu = all $(nproc) cores)"
	NEURO_BENCH_DEVICES=cpu,$devices timeout 300 "$stage/ggml.test" -test.run '^$' -test.bench '^BenchmarkDevice' \
		-test.benchtime 8x -test.timeout 290s >"$logs/bench.log" 2>&1 || rc=1
	grep -E '^Benchmark|FAIL|^ok|panic' "$logs/bench.log" || true
}

run() {
	t0=$(date +%s)
	rc=0
	logs=${OUT:-$stage/logs}
	mkdir -p "$logs"
	setup
	case "${1:-all}" in
	tests) tests ;;
	bench) bench ;;
	all) tests; bench ;;
	*) echo "run: tests, bench or all" >&2; return 2 ;;
	esac
	echo "== done in $(($(date +%s) - t0)) s (full logs in $logs)"
	return $rc
}

case "${1:-}" in
prepare) prepare ;;
run) run "${2:-all}" ;;
*)
	echo "usage: $0 prepare|run" >&2
	exit 2
	;;
esac
