#!/usr/bin/env bash
# gpu-backend.sh vulkan|cuda: build ggml's Vulkan or CUDA backend from the
# pinned ollama module's sources into a cache outside the work tree, and
# print the folder that holds the libraries (libggml-vulkan.so or
# libggml-cuda.so, with libggml-base.so) on the last line. A second run with
# the same sources and flags prints the cached folder at once.
#
# Needs cmake (and ninja, else make) and, for vulkan, Debian's libvulkan-dev,
# glslc and glslang-tools; for cuda, nvcc on the PATH (or CUDACXX).
#
# Environment:
#   GGML_SRC          the ggml tree (default: ml/backend/ggml/ggml of the
#                     ollama module that go.mod pins, found with `go list`)
#   NEURO_GPU_CACHE   the cache (default ~/.cache/neuro-gpu)
#   CUDA_ARCHS        CUDA architectures (default 75-real;86-real;89-real;90-real;90-virtual)
#   JOBS              parallel compile jobs (default: every core)
set -euo pipefail

kind=${1:-}
case "$kind" in
vulkan | cuda) ;;
*)
	echo "usage: $0 vulkan|cuda" >&2
	exit 2
	;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${GGML_SRC:-}" ]; then
	mod=$(cd "$root" && go mod download github.com/ollama/ollama >/dev/null && go list -m -f '{{.Dir}}' github.com/ollama/ollama)
	GGML_SRC=$mod/ml/backend/ggml/ggml
fi
if [ ! -f "$GGML_SRC/src/CMakeLists.txt" ]; then
	echo "$0: GGML_SRC=$GGML_SRC is not a ggml tree" >&2
	exit 1
fi
# The module's version names the sources (…/ollama@v0.17.4/ml/…); a copy
# elsewhere is named by a hash of its files.
version=$(echo "$GGML_SRC" | sed -n 's,.*/ollama@\([^/]*\)/.*,\1,p')
if [ -z "$version" ]; then
	version=src-$(cd "$GGML_SRC" && find . -type f \( -name '*.c*' -o -name '*.h' -o -name '*.txt' -o -name '*.comp' -o -name '*.cu*' \) -print0 |
		sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
fi

flags="kind=$kind"
if [ "$kind" = cuda ]; then
	CUDA_ARCHS=${CUDA_ARCHS:-75-real;86-real;89-real;90-real;90-virtual}
	flags="$flags archs=$CUDA_ARCHS"
	if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
		echo "$0: no nvcc on the PATH (install the CUDA toolkit, or set CUDACXX)" >&2
		exit 1
	fi
	nvcc_version=$("${CUDACXX:-nvcc}" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
	flags="$flags nvcc=$nvcc_version"
fi
hash=$( (echo "$flags"; cat "$0" "$root/packaging/gpu/CMakeLists.txt") | sha256sum | cut -c1-12)
cache=${NEURO_GPU_CACHE:-$HOME/.cache/neuro-gpu}
out=$cache/$kind-$version-$hash
if [ -f "$out/lib/.built" ]; then
	echo "$out/lib"
	exit 0
fi

work=$out.build
rm -rf "$work"
mkdir -p "$work"
cp -r "$GGML_SRC" "$work/ggml"
chmod -R u+w "$work/ggml"

if [ "$kind" = vulkan ]; then
	# The module leaves out vulkan-shaders/feature-tests: without those
	# probes every glslc extension test "passes" and shaders that Debian's
	# glslc cannot compile are switched on (../shared/GPU.md).
	ft=$work/ggml/src/ggml-vulkan/vulkan-shaders/feature-tests
	mkdir -p "$ft"
	for p in coopmat:GL_KHR_cooperative_matrix coopmat2:GL_NV_cooperative_matrix2 \
		integer_dot:GL_EXT_integer_dot_product bfloat16:GL_EXT_bfloat16; do
		printf '#version 460\n#extension %s : require\nvoid main() {}\n' "${p#*:}" >"$ft/${p%%:*}.comp"
	done
	# Vulkan headers older than 1.3.261 (Debian bookworm has 1.3.239) lack
	# VK_EXT_layer_settings, which only the validation layer uses.
	perl -0pi -e 's/(    VkBool32 enable_best_practice = layer_settings;.*?)(    vk::InstanceCreateInfo instance_create_info\(vk::InstanceCreateFlags\{\}, &app_info, layers, extensions, &layer_setting_info\);)/#ifdef VK_EXT_layer_settings\n$1$2\n#else\n    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n#endif/s' \
		"$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
	grep -q '#ifdef VK_EXT_layer_settings' "$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp" || {
		echo "$0: the VK_EXT_layer_settings guard did not apply: the pinned sources changed" >&2
		exit 1
	}
	# ggml_vk_load_shaders compiles pipelines on std::async threads (as many
	# at once as there are cores) and each appends itself to the device's
	# all_pipelines without a lock: a data race on a std::vector (later
	# llama.cpp appends under a lock). So does this copy, with
	# compile_count_mutex (the caller holds device->mutex while it waits for
	# the compiles).
	perl -0pi -e 's/\n    device->all_pipelines\.push_back\(pipeline\);\n/\n    {\n        std::lock_guard<std::mutex> guard(compile_count_mutex);\n        device->all_pipelines.push_back(pipeline);\n    }\n/' \
		"$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
	grep -B1 'device->all_pipelines.push_back(pipeline);' "$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp" | grep -q 'guard(compile_count_mutex)' || {
		echo "$0: the all_pipelines lock did not apply: the pinned sources changed" >&2
		exit 1
	}
	# Every pipeline's descriptor set layout has MAX_PARAMETER_COUNT (12)
	# storage-buffer bindings, and a dispatch writes only the first
	# parameter_count of the set it takes from the context's pool (reused
	# by every graph): the others keep the buffers of an earlier graph,
	# which may have been freed since (a compute buffer grown, a KV cache
	# dropped, a model unloaded). Vulkan allows that while the shader does
	# not use them; Debian bookworm's lavapipe (Mesa 22.3.6) does not: it
	# takes a reference on every binding of a bound set, freed buffers
	# included, and later frees them again or calls through them (seen in
	# CI as "Unsupported command VK_CMD_NEXT_SUBPASS" and a segfault, and
	# here as "double free or corruption" in lavapipe's queue thread, in
	# about 1 run in 30 of the device tests beside other work). Each
	# dispatch now writes every binding, the unused ones with its first
	# buffer.
	perl -0pi -e 's/(\n    vk::WriteDescriptorSet write_descriptor_set\{ descriptor_set, 0, 0, )pipeline->parameter_count(, vk::DescriptorType::eStorageBuffer, nullptr, )descriptor_buffer_infos\.begin\(\)( \};\n)/\n    std::array<vk::DescriptorBufferInfo, MAX_PARAMETER_COUNT> all_buffer_infos;\n    {\n        size_t i = 0;\n        for (const auto & info : descriptor_buffer_infos) {\n            all_buffer_infos[i++] = info;\n        }\n        for (; i < MAX_PARAMETER_COUNT; i++) {\n            all_buffer_infos[i] = *descriptor_buffer_infos.begin();\n        }\n    }$1MAX_PARAMETER_COUNT$2all_buffer_infos.data()$3/' \
		"$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
	grep -q 'write_descriptor_set{ descriptor_set, 0, 0, MAX_PARAMETER_COUNT, vk::DescriptorType::eStorageBuffer, nullptr, all_buffer_infos.data() }' \
		"$work/ggml/src/ggml-vulkan/ggml-vulkan.cpp" || {
		echo "$0: the descriptor writes of every binding did not apply: the pinned sources changed" >&2
		exit 1
	}
fi

gen=()
if command -v ninja >/dev/null; then gen=(-G Ninja); fi
args=(-DGGML_SRC="$work/ggml" -DNEURO_BACKEND="$kind")
if [ "$kind" = cuda ]; then
	args+=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
fi
echo "== building ggml-$kind ($version, $flags) in $work" >&2
start=$(date +%s)
cmake -S "$root/packaging/gpu" -B "$work/build" "${gen[@]}" "${args[@]}" >&2
cmake --build "$work/build" --target "ggml-$kind" -j "${JOBS:-$(nproc)}" >&2
mkdir -p "$work/lib"
cp -L "$work/build/lib/libggml-$kind.so" "$work/build/lib/libggml-base.so" "$work/lib/"
# libggml-base.so is looked for by its soname.
if [ -e "$work/build/lib/libggml-base.so.0" ]; then cp -L "$work/build/lib/libggml-base.so.0" "$work/lib/"; fi
echo "$flags version=$version built in $(($(date +%s) - start)) s" >"$work/lib/.built"
rm -rf "$out"
mkdir -p "$out"
mv "$work/lib" "$out/lib"
rm -rf "$work"
echo "== ggml-$kind built in $(($(date +%s) - start)) s" >&2
echo "$out/lib"
