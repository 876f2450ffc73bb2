package ggml

import "C"

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"unsafe"
)

// ggml log levels (ggml.h).
const (
	logDebug = 1
	logInfo  = 2
	logWarn  = 3
	logError = 4
	logCont  = 5
)

var (
	logMu    sync.Mutex
	logLevel = slog.LevelWarn
	logLine  strings.Builder
)

//export neuroLog
func neuroLog(level C.int, text *C.char, _ unsafe.Pointer) {
	msg := C.GoString(text)
	logMu.Lock()
	defer logMu.Unlock()
	lvl := logLevel
	// llama.cpp's info and warnings describe the model it loads (dozens
	// of lines per load): debug detail for neurod. Its errors also come
	// back to us as failed calls, which neurod reports; they are logged as
	// warnings for the detail they add.
	switch int(level) {
	case logDebug, logInfo, logWarn:
		lvl = slog.LevelDebug
	case logError:
		lvl = slog.LevelWarn
	case logCont:
		// continues the previous line at its level
	}
	logLevel = lvl
	logLine.WriteString(msg)
	if !strings.HasSuffix(msg, "\n") {
		return
	}
	line := strings.TrimSpace(logLine.String())
	logLine.Reset()
	if line != "" {
		slog.Default().Log(context.Background(), lvl, line, "component", "llama.cpp")
	}
}
