// Where package ggml's graphs run: the CPU backend alone, or a device's
// backend (Vulkan, CUDA) with the CPU's behind it in a scheduler for any op
// the device lacks. Internal to the C side.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

typedef struct {
    ggml_backend_t backend;     // weights, caches and compute live here
    ggml_backend_t cpu;         // == backend on the CPU
    ggml_backend_sched_t sched; // NULL on the CPU: graphs are allocated by galloc
    ggml_gallocr_t galloc;
    struct ggml_threadpool * pool; // the CPU backend's threadpool, of pool_threads threads
    int pool_threads;
    bool own_pool; // pool is the caller's (exec_own_pool), not neuro_pool's
} neuro_exec;

// exec_init opens device dev (an index of ggml_backend_dev_get; -1 or the
// CPU device: the CPU) computing on n_threads threads of the process's pool
// of that size (neuro_pool). Returns false and writes err on failure.
bool exec_init(neuro_exec * x, int dev, int n_threads, size_t graph_size, char * err, size_t err_len);
void exec_free(neuro_exec * x);
// exec_reserve sizes compute memory for the largest graph.
bool exec_reserve(neuro_exec * x, struct ggml_cgraph * gf);
// exec_alloc allocates gf's tensors; set its inputs after it.
bool exec_alloc(neuro_exec * x, struct ggml_cgraph * gf);
// exec_compute runs gf; 0 on success.
int exec_compute(neuro_exec * x, struct ggml_cgraph * gf);
// exec_set_threads makes the next graphs compute on n_threads threads: of
// the process's pool of n_threads (neuro_pool), or of the exec's own pool.
// Returns false when that pool cannot be made.
bool exec_set_threads(neuro_exec * x, int n_threads);
// exec_own_pool makes x compute on tp, a pool of the caller's of n_threads
// threads, from now on.
void exec_own_pool(neuro_exec * x, struct ggml_threadpool * tp, int n_threads);
