// C side of package ggml: graphs built with ggml's C API for the parts of a
// MoE model that neuro computes itself.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Routes llama.cpp's and ggml's logs to Go (neuroLog in log.go).
void neuro_log_install(void);

// neuro_pool returns the process's ggml threadpool of n_threads threads at
// the polling level set (neuro_set_poll), creating it on first use (NULL
// if that fails). Every backend computes on
// these, one graph at a time (the Go side holds a lock), so that the cores
// are never oversubscribed; idle workers spin for the polling level
// (neuro_set_poll) before they sleep. A graph of n threads runs on the pool
// of n: ggml wakes every worker of a pool for each graph, and those past
// the graph's thread count only go back to sleep (a futex wake and a
// context switch on another core, which may be computing for the process
// this one waits for).
struct ggml_threadpool * neuro_pool(int n_threads);

// neuro_set_poll sets the polling level (0-100) of the threadpools that
// neuro_pool returns from now on (a pool keeps the level it was made with);
// -1: ggml's default.
void neuro_set_poll(int level);
// neuro_poll is the level neuro_set_poll set (-1: ggml's default).
int neuro_poll(void);

// neuro_timer_slack_ns is the calling thread's timer slack (see neuro.c:
// set for the whole process before the Go runtime starts).
long neuro_timer_slack_ns(void);

// neuro_timer_slack_env_bad is 1 when NEURO_TIMER_SLACK_US held a value the
// process ignored (not microseconds from 0 to 100,000).
int neuro_timer_slack_env_bad(void);

// Devices (device.c). neuro_backend_load opens a GPU backend library
// (libggml-vulkan.so, libggml-cuda.so) and registers its devices.
int neuro_backend_load(const char * path, char * err, size_t err_len);

// One device of ggml's registry (the CPU, then each loaded backend's).
typedef struct {
    char   name[64];         // "CPU", "Vulkan0", "CUDA0"
    char   description[256]; // the device's own name
    char   backend[32];      // "CPU", "Vulkan", "CUDA"
    size_t memory_free, memory_total;
    int    type;             // enum ggml_backend_dev_type
} neuro_device;

int neuro_device_count(void);

// The Vulkan loader's devices (vkprobe.c): type is VkPhysicalDeviceType
// (1 integrated, 2 discrete, 3 virtual, 4 CPU). Returns how many it wrote,
// or -1 when there is no Vulkan loader or instance.
typedef struct {
    char name[256];
    int  type;
} neuro_vk_device;

int neuro_vulkan_probe(neuro_vk_device * out, int max);
int neuro_device_info(int i, neuro_device * out);

// neuro_expert computes one MoE expert's feed-forward block,
// down(act(gate x + gate_b, up x + up_b)) + down_b, on device dev (-1: the
// CPU). Not thread-safe.
typedef struct neuro_expert neuro_expert;

// Expert activations: silu(g) * u, or gpt-oss's swiglu_oai (alpha 1.702,
// limit 7).
enum { NEURO_ACT_SWIGLU = 0, NEURO_ACT_SWIGLU_OAI = 1 };

// Expert flags: NEURO_EXPERT_DENSE computes a layer's shared experts as
// llama.cpp's build_ffn does (plain matrix products, not the expert stack's
// mul_mat_id); NEURO_EXPERT_DOWN_PREC_F32 sets the down projection's
// precision to F32 (GLM-4).
enum { NEURO_EXPERT_DENSE = 1, NEURO_EXPERT_DOWN_PREC_F32 = 2 };

// neuro_expert_new copies the three weight matrices (each of its own ggml
// type, as quantized files mix them; gate and up are [n_embd, n_ff], down
// is [n_ff, n_embd], ne0 first) and the biases (n_ff, n_ff and n_embd
// floats, each NULL when the expert has none) into backend memory and
// reserves compute memory for batches up to max_batch. On failure it
// returns NULL and writes a message to err.
neuro_expert * neuro_expert_new(int n_embd, int n_ff, int type_gate, int type_up, int type_down,
                                const void * gate, const void * up, const void * down,
                                const float * gate_b, const float * up_b, const float * down_b, int act, int flags,
                                int dev, int n_threads, int max_batch, char * err, size_t err_len);

// neuro_stack_new is neuro_expert_new for a stack of n_exp experts of one
// layer (gate[i], up[i], down[i] and the biases, if any, are expert i's),
// computed as llama.cpp's build_moe_ffn computes a layer: each token
// routed to up to k_max of them through one mul_mat_id per projection.
neuro_expert * neuro_stack_new(int n_embd, int n_ff, int n_exp, int k_max, int type_gate, int type_up, int type_down,
                               const void * const * gate, const void * const * up, const void * const * down,
                               const float * const * gate_b, const float * const * up_b, const float * const * down_b,
                               int act, int flags, int dev, int n_threads, int max_batch, char * err, size_t err_len);

// neuro_stack_compute reads n rows of n_embd floats from x, routes row t to
// experts ids[t*k .. t*k+k-1] of the stack and writes each slot's output
// (before its weight) to out: n x k rows of n_embd floats. Returns 0 on
// success.
int neuro_stack_compute(neuro_expert * e, const float * x, int n, const int32_t * ids, int k, float * out);

// neuro_expert_compute reads n_tokens rows of n_embd floats from x and
// writes n_tokens rows of n_embd floats to out. Returns 0 on success.
int neuro_expert_compute(neuro_expert * e, const float * x, int n_tokens, float * out);

void neuro_expert_free(neuro_expert * e);

// neuro_group computes several experts (each made by neuro_expert_new, on
// the CPU) in one graph: one threadpool dispatch and no return to the
// caller between them. Its compute memory grows to the largest group.
// Not thread-safe.
typedef struct neuro_group neuro_group;

neuro_group * neuro_group_new(int n_threads, char * err, size_t err_len);

// neuro_group_compute computes expert es[i] on n[i] rows of x[i] into
// out[i], for i < count, as neuro_expert_compute would each (the same ops
// on the same data), with n_threads threads of the pool. Returns 0 on
// success.
int neuro_group_compute(neuro_group * g, neuro_expert * const * es, int count, const float * const * x, const int * n,
                        float * const * out, int n_threads);

// neuro_group_last_threads is the threads of g's last compute;
// neuro_group_pool_threads the threads of the pool it computed on.
int neuro_group_last_threads(const neuro_group * g);
int neuro_group_pool_threads(const neuro_group * g);

void neuro_group_free(neuro_group * g);

// neuro_lanes computes a group's experts on lanes at the same time: lane 0
// on the caller's thread, each other on a thread of its own, every lane
// with a neuro_group and a threadpool of n_threads threads of its own, so
// that no lane's thread waits at a barrier for another's. Not thread-safe.
//
// A lane's thread that finished its share polls for the next compute for
// poll_us microseconds (yielding its core to any other thread that wants
// it) before it sleeps, and so does the caller for the other lanes'
// shares: waking a sleeping thread costs 50-250 us on a virtual machine's
// idle core, and a decode step's next layer comes sooner. 0: sleep at once.
typedef struct neuro_lanes neuro_lanes;

neuro_lanes * neuro_lanes_new(int lanes, int n_threads, int poll_us, char * err, size_t err_len);

// neuro_lanes_compute computes expert es[i] on n[i] rows of x[i] into
// out[i], as neuro_group_compute would (the same ops on the same data):
// lane k takes the members start[k] to start[k+1] (start has lanes + 1
// entries, the last the count). Returns 0 on success.
int neuro_lanes_compute(neuro_lanes * l, neuro_expert * const * es, const float * const * x, const int * n,
                        float * const * out, const int * start);

void neuro_lanes_free(neuro_lanes * l);

// The wait poller: one thread of the process that keeps a core awake while
// an answer is due, polling and yielding the core to any thread that wants
// it, so that the thread the answer wakes starts on a running core instead
// of one the hypervisor halted. neuro_poll_for polls until us microseconds
// from now (starting the thread the first time), neuro_poll_stop stops at
// once; the thread sleeps between. neuro_poll_rounds counts the polls
// started (for tests).
void neuro_poll_for(int us);
void neuro_poll_stop(void);
long neuro_poll_rounds(void);




// Hyper-parameters of a llama- or qwen3moe-architecture MoE model.
typedef struct {
    int   n_layer, n_embd, n_head, n_head_kv, n_rot;
    int   n_embd_head; // one head's size (Qwen3: not n_embd / n_head)
    int   qk_norm;     // RMS norm on each head of Q and K before RoPE (Qwen3)
    int   rope_neox;   // NEOX rotation (Qwen3) instead of llama's
    int   tied_output; // no output.weight: the output head is token_embd
    int   n_expert, n_expert_used, n_vocab, n_ctx_train;
    float rope_freq_base, rms_eps;
    // glm4moe
    int   qkv_bias;     // Q, K and V biases
    int   post_norm;    // the FFN norm is post_attention_norm
    int   n_dense_lead; // leading layers with a dense FFN of n_ff_dense
    int   n_ff_dense;
    int   n_ff_shared;  // shared experts' FFN size (0: none)
    int   sigmoid;      // router: sigmoid instead of softmax
    int   probs_bias;   // router: exp_probs_b added for selection
    int   norm_w;       // router: weights divided by their sum
    float scale_w;      // router: weights scaled (0: not)
    // gpt-oss
    int   attn_out_bias;  // attn_output.bias
    int   sinks;          // attn_sinks: a logit per head in the softmax
    int   n_swa;          // sliding window (0: none) in layers il % swa_pattern < swa_pattern - 1
    int   swa_pattern;
    int   router_bias;    // ffn_gate_inp.bias
    int   softmax_weight; // router: top-k of the logits, then softmax of their weights
    // RoPE scaling: 0 none, 1 linear, 2 yarn (llama_rope_scaling_type);
    // the factor (0: 1), YaRN's original context and attention factor
    int   rope_scaling;
    float rope_scale;
    int   n_ctx_orig;
    float rope_attn_factor;
    // deepseek2: multi-head latent attention. n_embd_head is then the KV
    // cache's key (n_lora_kv + n_rot) and n_embd_head_v its value
    // (n_lora_kv), in one KV head; a head's key is n_embd_head_k_mla and
    // its value n_embd_head_v_mla; n_lora_q 0: one Q projection (lite).
    int   mla;
    int   n_lora_q, n_lora_kv;
    int   n_embd_head_v;
    int   n_embd_head_k_mla, n_embd_head_v_mla;
    float yarn_log_mul;     // rope.scaling.yarn_log_multiplier as the GGUF has it
    int   n_expert_groups;  // group-limited top-k (> 1), keeping n_group_used groups
    int   n_group_used;
    int   ffn_prec_f32;     // dense and shared FFN down projections at F32 precision (GLM-4)
} neuro_hparams;

// One weight tensor handed to neuro_gating_new (ggml order, ne0 first).
typedef struct {
    const char * name;
    int          type;
    int          n_dims;
    int64_t      ne[4];
    const void * data;
    size_t       size;
} neuro_weight;

// neuro_gating holds the gating part of a model (embeddings, attention,
// norms, router, output head) and computes it exactly as llama.cpp's
// llm_build_llama (or llm_build_qwen3moe) does, one MoE layer at a time.
// Not thread-safe.
typedef struct neuro_gating neuro_gating;

// neuro_session is one sequence's KV cache (F16, V transposed, as
// llama.cpp keeps it without flash attention).
typedef struct neuro_session neuro_session;

// The weights, KV caches and graphs live on device dev (-1: the CPU). It
// loads layers [first, end) and, with head, the embeddings, final norm and
// output head (a span node's part has no head; a head alone no layers):
// neuro_layer runs only those layers, neuro_embed and neuro_output only
// with the head.
neuro_gating * neuro_gating_new(const neuro_hparams * hp, const neuro_weight * ws, int n_ws, int first, int end,
                                int head, int dev, int n_threads, char * err, size_t err_len);
void neuro_gating_free(neuro_gating * g);

// n_ubatch is the most tokens one neuro_layer call stores: sliding-window
// layers keep llama.cpp's smaller SWA cache, sized from it. Without
// layers the session has no KV cache and runs only the head (neuro_embed,
// neuro_output): a head whose layers all run on span nodes.
neuro_session * neuro_session_new(neuro_gating * g, int n_ctx, int n_ubatch, int layers, char * err, size_t err_len);
void neuro_session_free(neuro_session * s);

// neuro_embed writes the n tokens' embeddings (n x n_embd floats) to out.
int neuro_embed(neuro_session * s, const int32_t * tokens, int n, float * out);

// neuro_layer runs layer il's attention (storing K and V for positions
// pos0..pos0+n-1), the residual add and the router. With last_only, only
// the last token continues past attention (llama.cpp's output rows), so
// n_out = 1; else n_out = n. Outputs: ffn_inp and moe_in (n_out x n_embd),
// selected (n_out x n_expert_used expert ids) and weights (n_out x
// n_expert_used, normalised), and extra (n_out x n_embd): in a dense
// leading layer the dense FFN's output (selected and weights untouched),
// in a MoE layer with shared experts their output. Returns 0 on success.
int neuro_layer(neuro_session * s, int il, const float * inp, int n, int pos0, int last_only,
                float * ffn_inp, float * moe_in, int32_t * selected, float * weights, float * extra);

// neuro_gating_set_threads makes g's next graphs compute on n_threads
// threads.
int neuro_gating_set_threads(neuro_gating * g, int n_threads);

// NEURO_MAX_SESSIONS is the most sessions one neuro_layer_multi computes.
#define NEURO_MAX_SESSIONS 16

// neuro_layer_multi is neuro_layer for N sessions of one gating at once
// (ss[j] at position pos0s[j]), one row each where N > 1 (n = 1, no
// last_only): one graph, each weight read once for them all, each
// session's rows exactly what neuro_layer gives it alone. inp and the
// outputs hold the sessions' rows one after another. Models with latent
// attention (MLA) compute one session at a time (N > 1 returns 1).
int neuro_layer_multi(neuro_session ** ss, int N, int il, const float * inp, int n, const int * pos0s, int last_only,
                      float * ffn_inp, float * moe_in, int32_t * selected, float * weights, float * extra);

// neuro_session_bytes is the memory of a session's KV cache;
// neuro_session_kv_bytes that of s's tensors.
size_t neuro_session_bytes(const neuro_gating * g, int n_ctx, int n_ubatch);
size_t neuro_session_kv_bytes(const neuro_session * s);

// neuro_session_swa_cells is the size of the sliding-window layers' cache.
int neuro_session_swa_cells(const neuro_session * s);

// neuro_rewind forgets positions pos and after. It returns 1, changing
// nothing, when a sliding-window layer's cache no longer holds the window
// before pos (newer positions overwrote it): the sequence must be computed
// again from the start.
int neuro_rewind(neuro_session * s, int pos);

// neuro_output applies the final norm and output head to n_out rows of x;
// apart, each row as it would be alone (one graph, the head read once).
int neuro_output(neuro_session * s, const float * x, int n_out, int apart, float * logits);

#ifdef __cplusplus
}
#endif
