package ggml

/*
#cgo LDFLAGS: -rdynamic
#include <stdlib.h>
#include "ggml-backend.h"
#include "neuro.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// neurod computes on the CPU with the ggml compiled into it. GPU backends
// are separate libraries (libggml-vulkan.so, libggml-cuda.so, built by
// `make vulkan` and `make cuda`) that it opens at run time when present;
// their ggml symbols bind to the binary's own (it is linked with
// -rdynamic), so both sides share one ggml.

// BackendsEnv names the folders (colon-separated) searched for GPU
// backends, instead of the binary's folder and ../lib/neuro beside it.
const BackendsEnv = "NEURO_BACKENDS"

// gpuBackends are the GPU backends neuro knows, in the order auto prefers.
var gpuBackends = []string{"cuda", "vulkan"}

// Device is one compute device ggml sees.
type Device struct {
	Index       int    `json:"-"`
	Name        string `json:"name"`        // "CPU", "Vulkan0", "CUDA0"
	Description string `json:"description"` // the device's own name
	Backend     string `json:"backend"`     // "CPU", "Vulkan", "CUDA"
	Type        string `json:"type"`        // cpu, gpu, igpu or accel
	MemoryFree  uint64 `json:"memory_free"`
	MemoryTotal uint64 `json:"memory_total"`
}

// CPU is the CPU device, which every build has; the zero Device means it too.
func (d Device) CPU() bool { return d.Name == "" || d.Backend == "CPU" }

// Spec is the --device value that names d: cpu, vulkan:N or cuda:N.
func (d Device) Spec() string {
	if d.CPU() {
		return "cpu"
	}
	b := strings.ToLower(d.Backend)
	return b + ":" + strings.TrimPrefix(strings.ToLower(d.Name), b)
}

// index is d's index in ggml's registry, or -1 for the CPU.
func (d Device) index() C.int {
	if d.CPU() {
		return -1
	}
	return C.int(d.Index)
}

var (
	loadOnce   sync.Once
	loaded     []string // backend libraries opened
	loadErrs   error
	searchDirs []string
)

// BackendDirs are the folders searched for GPU backends: $NEURO_BACKENDS,
// else the binary's folder and ../lib/neuro beside it.
func BackendDirs() []string {
	if v, ok := os.LookupEnv(BackendsEnv); ok {
		return filepath.SplitList(v)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil
	}
	dir := filepath.Dir(exe)
	return []string{dir, filepath.Join(dir, "..", "lib", "neuro")}
}

// LoadBackends opens the GPU backend libraries found in BackendDirs, once
// per process, and returns the paths it opened. A library that fails to
// open is logged and reported in the error; the others still load.
func LoadBackends() ([]string, error) {
	loadOnce.Do(func() {
		initBackend()
		searchDirs = BackendDirs()
		seen := map[string]bool{}
		showSoftwareVulkan()
		for _, name := range gpuBackends {
			for _, dir := range searchDirs {
				p := filepath.Join(dir, "libggml-"+name+".so")
				if _, err := os.Stat(p); err != nil || seen[name] {
					continue
				}
				seen[name] = true
				cp := C.CString(p)
				var errbuf [512]C.char
				computeMu.Lock()
				rc := C.neuro_backend_load(cp, &errbuf[0], C.size_t(len(errbuf)))
				computeMu.Unlock()
				C.free(unsafe.Pointer(cp))
				if rc != 0 {
					err := errors.New(C.GoString(&errbuf[0]))
					slog.Warn("GPU backend not loaded", "path", p, "err", err)
					loadErrs = errors.Join(loadErrs, err)
					continue
				}
				loaded = append(loaded, p)
			}
		}
	})
	return loaded, loadErrs
}

// Devices lists the devices of the CPU and of every loaded backend, with
// their memory now.
func Devices() []Device {
	initBackend()
	computeMu.Lock()
	defer computeMu.Unlock()
	n := int(C.neuro_device_count())
	out := make([]Device, 0, n)
	for i := range n {
		var d C.neuro_device
		if C.neuro_device_info(C.int(i), &d) != 0 {
			continue
		}
		out = append(out, Device{
			Index: i, Name: C.GoString(&d.name[0]), Description: C.GoString(&d.description[0]),
			Backend: C.GoString(&d.backend[0]), Type: devType(int(d._type)),
			MemoryFree: uint64(d.memory_free), MemoryTotal: uint64(d.memory_total),
		})
	}
	return out
}

func devType(t int) string {
	switch t {
	case C.GGML_BACKEND_DEVICE_TYPE_CPU:
		return "cpu"
	case C.GGML_BACKEND_DEVICE_TYPE_GPU:
		return "gpu"
	case C.GGML_BACKEND_DEVICE_TYPE_IGPU:
		return "igpu"
	default:
		return "accel"
	}
}

// SelectDevice resolves a --device value: cpu, vulkan:N, cuda:N, or auto
// (the fastest of the CPU and the GPUs, measured; a software Vulkan device
// such as lavapipe is never a candidate). It never falls back: a device
// that is asked for and missing is an error that says what is missing.
func SelectDevice(spec string) (Device, error) {
	spec = strings.ToLower(strings.TrimSpace(spec))
	if spec == "" || spec == "cpu" {
		for _, d := range Devices() {
			if d.CPU() {
				return d, nil
			}
		}
		return Device{Name: "CPU", Backend: "CPU", Type: "cpu"}, nil
	}
	_, loadErr := LoadBackends()
	devs := Devices()
	if spec == "auto" {
		return fastest(devs), nil
	}
	kind, num, ok := strings.Cut(spec, ":")
	n, err := strconv.Atoi(num)
	if !ok || err != nil || n < 0 || (kind != "vulkan" && kind != "cuda") {
		return Device{}, fmt.Errorf("device %q: want auto, cpu, vulkan:N or cuda:N", spec)
	}
	var same []Device
	for _, d := range devs {
		if strings.EqualFold(d.Backend, kind) {
			same = append(same, d)
		}
	}
	label := map[string]string{"vulkan": "Vulkan", "cuda": "CUDA"}[kind]
	if len(same) == 0 {
		lib := "libggml-" + kind + ".so"
		if !backendLoaded(kind) {
			why := fmt.Sprintf("no %s backend: %s is not in %s (build it with `make %s`, or set %s)",
				label, lib, strings.Join(searchDirs, ", "), kind, BackendsEnv)
			if loadErr != nil && strings.Contains(loadErr.Error(), lib) {
				why = fmt.Sprintf("the %s backend did not load: %v", label, loadErr)
			}
			return Device{}, fmt.Errorf("device %s: %s", spec, why)
		}
		hint := ""
		if kind == "vulkan" {
			hint = " (a CPU-type Vulkan device such as lavapipe is shown only with GGML_VK_VISIBLE_DEVICES=0)"
		}
		return Device{}, fmt.Errorf("device %s: the %s backend is loaded but sees no device%s", spec, label, hint)
	}
	want := fmt.Sprintf("%s%d", label, n)
	for _, d := range same {
		if d.Name == want {
			return d, nil
		}
	}
	names := make([]string, len(same))
	for i, d := range same {
		names[i] = d.Spec() + " " + d.Description
	}
	return Device{}, fmt.Errorf("device %s: the %s backend sees %d device(s): %s", spec, label, len(same), strings.Join(names, "; "))
}

func backendLoaded(kind string) bool {
	for _, p := range loaded {
		if filepath.Base(p) == "libggml-"+kind+".so" {
			return true
		}
	}
	return false
}

// Software reports a device that emulates a GPU on the CPU (Mesa's
// lavapipe, whose devices are named llvmpipe; SwiftShader): slower than the
// CPU backend itself.
func Software(d Device) bool {
	s := strings.ToLower(d.Description)
	return strings.Contains(s, "llvmpipe") || strings.Contains(s, "lavapipe") || strings.Contains(s, "swiftshader")
}

// VulkanDevice is a device the Vulkan loader sees.
type VulkanDevice struct {
	Index int    // its index for GGML_VK_VISIBLE_DEVICES
	Name  string // e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
	Type  string // integrated, discrete, virtual, cpu or other
}

// VulkanDevices lists the Vulkan loader's devices, including those ggml's
// Vulkan backend leaves out unless GGML_VK_VISIBLE_DEVICES names them (a
// CPU-type device such as lavapipe). It returns nil without a Vulkan loader.
func VulkanDevices() []VulkanDevice {
	var buf [16]C.neuro_vk_device
	n := int(C.neuro_vulkan_probe(&buf[0], C.int(len(buf))))
	var out []VulkanDevice
	for i := range max(n, 0) {
		t := "other"
		switch buf[i]._type {
		case 1:
			t = "integrated"
		case 2:
			t = "discrete"
		case 3:
			t = "virtual"
		case 4:
			t = "cpu"
		}
		out = append(out, VulkanDevice{Index: i, Name: C.GoString(&buf[i].name[0]), Type: t})
	}
	return out
}

// showSoftwareVulkan makes a software Vulkan device (Mesa's lavapipe)
// visible to ggml when it is the only kind there is: ggml's Vulkan backend
// hides CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them, which
// on a machine without a GPU would leave vulkan:0 unusable. Where a real
// GPU exists, or the variable is set, ggml's own choice stands; auto never
// picks a software device either way.
func showSoftwareVulkan() {
	if _, set := os.LookupEnv("GGML_VK_VISIBLE_DEVICES"); set {
		return
	}
	var cpu []string
	for _, d := range VulkanDevices() {
		if d.Type != "cpu" {
			return
		}
		cpu = append(cpu, strconv.Itoa(d.Index))
	}
	if len(cpu) > 0 {
		os.Setenv("GGML_VK_VISIBLE_DEVICES", strings.Join(cpu, ","))
	}
}

// fastest times one expert of Qwen3-30B-A3B's shape (2048x768, Q8_0,
// batch 1) on the CPU and on every GPU that is not a software one, and
// returns the quickest. With no GPU it returns the CPU without measuring.
func fastest(devs []Device) Device {
	cpu := Device{Name: "CPU", Backend: "CPU", Type: "cpu"}
	var cands []Device
	for _, d := range devs {
		if d.CPU() {
			cpu = d
		} else if (d.Type == "gpu" || d.Type == "igpu") && !Software(d) {
			cands = append(cands, d)
		}
	}
	if len(cands) == 0 {
		return cpu
	}
	best, _ := fastestOf(append([]Device{cpu}, cands...))
	return best
}

// fastestOf measures each device (timeExpert) and returns the quickest,
// with the time of each (0 for one that could not be measured); the first
// device when none can be measured.
func fastestOf(devs []Device) (Device, []time.Duration) {
	times := make([]time.Duration, len(devs))
	const embd, ff = 2048, 768
	w := make([]float32, embd*ff)
	for i := range w {
		w[i] = float32(i%17-8) / 80
	}
	q, err := Quantize(model.Q8_0, w, embd)
	qd, err2 := Quantize(model.Q8_0, w, ff)
	if err != nil || err2 != nil {
		return devs[0], times
	}
	weights := moe.ExpertWeights{Embd: embd, FF: ff, Gate: moe.Tensor{Type: model.Q8_0, Data: q},
		Up: moe.Tensor{Type: model.Q8_0, Data: q}, Down: moe.Tensor{Type: model.Q8_0, Data: qd}}
	best, bestT := devs[0], time.Duration(math.MaxInt64)
	for i, d := range devs {
		t, err := timeExpert(d, weights)
		if err != nil {
			slog.Warn("auto device: not usable", "device", d.Spec(), "err", err)
			continue
		}
		times[i] = t
		slog.Debug("auto device", "device", d.Spec(), "name", d.Description, "expert_us", t.Microseconds())
		if t < bestT {
			best, bestT = d, t
		}
	}
	slog.Info("auto device", "chose", best.Spec(), "name", best.Description, "expert_us", bestT.Microseconds())
	return best, times
}

// timeExpert is the best of 10 calls of an expert on d, after 3 that warm
// it up (kernels compile on first use).
func timeExpert(d Device, w moe.ExpertWeights) (time.Duration, error) {
	e, err := NewExpertOn(d, w, moe.ExpertOptions{MaxBatch: 1})
	if err != nil {
		return 0, err
	}
	defer e.Close()
	x := make([]float32, w.Embd)
	for i := range x {
		x[i] = float32(i%7-3) / 3
	}
	out := make([]float32, w.Embd)
	best := time.Duration(math.MaxInt64)
	for i := range 13 {
		t0 := time.Now()
		if err := e.Compute(x, 1, out); err != nil {
			return 0, err
		}
		if i >= 3 {
			best = min(best, time.Since(t0))
		}
	}
	return best, nil
}
