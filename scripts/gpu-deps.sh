#!/usr/bin/env bash
# gpu-deps.sh vulkan|cuda: install what building (and, for vulkan, testing)
# a GPU backend needs, from Debian's packages, when it is missing.
#   vulkan: cmake, ninja, libvulkan-dev, glslc, glslang-tools, spirv-headers,
#           and mesa-vulkan-drivers (lavapipe: a Vulkan device on the CPU,
#           for the tests)
#   cuda:   cmake and ninja; nvcc is not installed here (NVIDIA's toolkit,
#           or Debian's non-free nvidia-cuda-toolkit): it must be on the PATH
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
case "${1:-}" in
vulkan)
	[ -f /usr/include/vulkan/vulkan.h ] || need+=(libvulkan-dev)
	command -v glslc >/dev/null || need+=(glslc)
	command -v glslangValidator >/dev/null || need+=(glslang-tools)
	[ -d /usr/include/spirv ] || need+=(spirv-headers)
	ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
	;;
cuda)
	if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
		echo "no nvcc: install NVIDIA's CUDA toolkit (or Debian non-free's nvidia-cuda-toolkit with g++-11) and put nvcc on the PATH" >&2
		exit 1
	fi
	;;
*)
	echo "usage: $0 vulkan|cuda" >&2
	exit 2
	;;
esac
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${need[@]}" >/dev/null
fi
