// C side of package ggml: graphs built with ggml's C API for the parts of a
// MoE model that neuro computes itself.
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Routes llama.cpp's and ggml's logs to Go (neuroLog in log.go).
void neuro_log_install(void);

// neuro_expert computes one MoE expert's feed-forward block,
// down(silu(gate x) * (up x)), on ggml's CPU backend. Not thread-safe.
typedef struct neuro_expert neuro_expert;

// neuro_expert_new copies the three weight matrices (ggml type `type`;
// gate and up are [n_embd, n_ff], down is [n_ff, n_embd], ne0 first) into
// backend memory and reserves compute memory for batches up to max_batch.
// On failure it returns NULL and writes a message to err.
neuro_expert * neuro_expert_new(int n_embd, int n_ff, int type,
                                const void * gate, const void * up, const void * down,
                                int n_threads, int max_batch, char * err, size_t err_len);

// neuro_expert_compute reads n_tokens rows of n_embd floats from x and
// writes n_tokens rows of n_embd floats to out. Returns 0 on success.
int neuro_expert_compute(neuro_expert * e, const float * x, int n_tokens, float * out);

void neuro_expert_free(neuro_expert * e);

#ifdef __cplusplus
}
#endif
