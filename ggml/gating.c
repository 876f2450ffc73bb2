// The gating part of a llama-architecture MoE model, built op for op as
// llama.cpp's llm_build_llama, build_attn (KV cache, no flash attention)
// and build_moe_ffn (softmax router, top-k, normalised weights) build it,
// so that a split forward pass reproduces llama.cpp's arithmetic.
#include "exec.h"
#include "neuro.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#define GATING_MAX_NODES 2048
#define NEURO_MAX_LAYERS 1024

struct gating_layer {
    struct ggml_tensor * attn_norm;
    struct ggml_tensor * q_norm; // qk_norm only
    struct ggml_tensor * k_norm;
    struct ggml_tensor * bq; // qkv_bias only
    struct ggml_tensor * bk;
    struct ggml_tensor * bv;
    struct ggml_tensor * ffn_gate; // dense leading layers
    struct ggml_tensor * ffn_up;
    struct ggml_tensor * ffn_down;
    struct ggml_tensor * probs_b; // probs_bias only
    struct ggml_tensor * sh_gate; // shared experts
    struct ggml_tensor * sh_up;
    struct ggml_tensor * sh_down;
    struct ggml_tensor * wq;
    struct ggml_tensor * wk;
    struct ggml_tensor * wv;
    struct ggml_tensor * wo;
    struct ggml_tensor * ffn_norm;
    struct ggml_tensor * gate_inp;
    struct ggml_tensor * gate_inp_b; // router_bias only
    struct ggml_tensor * bo;         // attn_out_bias only
    struct ggml_tensor * sinks;      // sinks only
    // mla only
    struct ggml_tensor * wq_a;
    struct ggml_tensor * q_a_norm;
    struct ggml_tensor * wq_b;
    struct ggml_tensor * wkv_a_mqa;
    struct ggml_tensor * kv_a_norm;
    struct ggml_tensor * wk_b;
    struct ggml_tensor * wv_b;
};

struct neuro_gating {
    neuro_hparams hp;
    // RoPE as llama.cpp's context computes it from the hyper-parameters,
    // and attention's scale
    float freq_scale, ext_factor, attn_factor, kq_scale;
    neuro_exec x;
    struct ggml_context * wctx;
    ggml_backend_buffer_t wbuf;
    struct ggml_tensor * tok_embd;
    struct ggml_tensor * output_norm;
    struct ggml_tensor * output;
    struct gating_layer * layers;
    // The part loaded: layers [first, end) (their weights and KV caches)
    // and, with head, the embeddings, final norm and output head.
    int first, end, head;
    size_t meta_size;
    void * meta;
};

struct neuro_session {
    neuro_gating * g;
    int n_ctx;
    // Sliding-window layers keep a smaller cache of n_swa_cells cells, used
    // as a ring (llama_kv_cache_iswa's SWA cache): position p lives in cell
    // p % n_swa_cells, where llama.cpp's find_slot puts it in a sequence
    // that only grows. cellpos[c] is the position cell c holds (-1: none).
    int n_swa_cells;
    int32_t * cellpos;
    struct ggml_context * kvctx;
    ggml_backend_buffer_t kvbuf;
    struct ggml_tensor ** k; // [n_embd_k_gqa, cells] F16 per layer
    struct ggml_tensor ** v; // [n_embd_v_gqa * cells] F16 per layer, transposed
};

// is_swa says whether layer il attends through a sliding window.
static int is_swa(const neuro_hparams * hp, int il) {
    return hp->n_swa > 0 && hp->swa_pattern > 0 && il % hp->swa_pattern < hp->swa_pattern - 1;
}

static int pad256(int n) {
    return (n + 255) / 256 * 256;
}

// swa_cells is the size of the sliding-window layers' cache.
static int swa_cells(const neuro_hparams * hp, int n_ctx, int n_ubatch) {
    // llama_kv_cache_iswa: GGML_PAD(min(n_ctx, n_swa + n_ubatch), 256)
    // cells, n_ctx being the context llama.cpp pads to 256
    int base = pad256(n_ctx);
    int want = hp->n_swa + n_ubatch;
    int cells = pad256(base < want ? base : want);
    return cells < n_ctx ? cells : n_ctx; // else it never wraps: the full-size layout
}

size_t neuro_session_bytes(const neuro_gating * g, int n_ctx, int n_ubatch) {
    const neuro_hparams * hp = &g->hp;
    const int64_t n_embd_k_gqa = (int64_t) hp->n_embd_head * hp->n_head_kv;
    const int64_t n_embd_v_gqa = (int64_t) hp->n_embd_head_v * hp->n_head_kv;
    size_t n = 0;
    for (int il = g->first; il < g->end; il++) {
        const int cells = is_swa(hp, il) ? swa_cells(hp, n_ctx, n_ubatch) : n_ctx;
        n += ggml_row_size(GGML_TYPE_F16, n_embd_k_gqa) * cells + ggml_row_size(GGML_TYPE_F16, n_embd_v_gqa) * cells;
    }
    return n;
}

static struct ggml_tensor * find_weight(neuro_gating * g, const neuro_weight * ws, int n_ws, const char * name,
                                        char * err, size_t err_len) {
    for (int i = 0; i < n_ws; i++) {
        if (strcmp(ws[i].name, name) == 0) {
            struct ggml_tensor * t = ggml_new_tensor(g->wctx, (enum ggml_type) ws[i].type, ws[i].n_dims, ws[i].ne);
            ggml_set_name(t, name);
            if (ggml_nbytes(t) != ws[i].size) {
                snprintf(err, err_len, "tensor %s: %zu bytes, want %zu", name, ws[i].size, ggml_nbytes(t));
                return NULL;
            }
            return t;
        }
    }
    snprintf(err, err_len, "missing tensor %s", name);
    return NULL;
}

static float get_mscale(float scale, float mscale) {
    return scale <= 1.0f ? 1.0f : (0.1f * mscale * logf(scale) + 1.0f);
}

// rope_params computes RoPE's frequency scale, YaRN's extrapolation mix
// and attention factor in float, as llama_context's constructor does
// (rope_yarn_log_mul, DeepSeek's, is not read: 0).
static void rope_params(neuro_gating * g) {
    const neuro_hparams * hp = &g->hp;
    g->freq_scale = hp->rope_scale == 0.0f ? 1.0f : 1.0f / hp->rope_scale;
    if (hp->rope_scaling == 0) {
        g->freq_scale = 1.0f; // never scale if scaling type is none
    }
    g->ext_factor = hp->rope_scaling == 2 ? 1.0f : 0.0f;
    g->attn_factor = 1.0f;
    // hparams.rope_yarn_log_mul: DeepSeek's key, with the convert
    // script's factor 0.1 cancelled
    const float log_mul = hp->mla ? hp->yarn_log_mul / 0.1f : 0.0f;
    if (g->ext_factor != 0) {
        const float factor = 1.0f / g->freq_scale;
        if (log_mul != 0.0f) {
            float mscale = 1.0f;
            const float mscale_all_dims = log_mul;
            if (mscale_all_dims != 1.0f) {
                mscale = mscale_all_dims; // llama.cpp's DeepSeek-V2 special case
            }
            g->attn_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dims);
        } else {
            g->attn_factor = get_mscale(factor, 1.0f);
        }
        g->attn_factor *= 1.0f / (1.0f + 0.1f * logf(factor));
    }
    g->attn_factor *= hp->rope_attn_factor;
    g->kq_scale = 1.0f / sqrtf((float) hp->n_embd_head);
    if (hp->mla) {
        // llm_build_deepseek2: the YaRN factor pre-scales kq_scale
        const float attn_factor_org = g->attn_factor * (1.0f + 0.1f * logf(1.0f / g->freq_scale));
        const float mscale = attn_factor_org * (1.0f + 0.1f * log_mul * logf(1.0f / g->freq_scale));
        g->kq_scale = 1.0f * mscale * mscale / sqrtf((float) hp->n_embd_head_k_mla);
    }
}

void neuro_gating_free(neuro_gating * g) {
    if (g == NULL) {
        return;
    }
    if (g->wbuf) ggml_backend_buffer_free(g->wbuf);
    if (g->wctx) ggml_free(g->wctx);
    exec_free(&g->x);
    free(g->layers);
    free(g->meta);
    free(g);
}

neuro_gating * neuro_gating_new(const neuro_hparams * hp, const neuro_weight * ws, int n_ws, int first, int end,
                                int head, int dev, int n_threads, char * err, size_t err_len) {
    if (hp->n_layer < 1 || hp->n_layer > NEURO_MAX_LAYERS) {
        snprintf(err, err_len, "%d layers", hp->n_layer);
        return NULL;
    }
    if (first < 0 || end > hp->n_layer || first > end || (first == end && !head)) {
        snprintf(err, err_len, "layers [%d, %d) of %d%s", first, end, hp->n_layer, head ? " and the head" : "");
        return NULL;
    }
    neuro_gating * g = calloc(1, sizeof(*g));
    if (g == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    g->hp = *hp;
    g->first = first;
    g->end = end;
    g->head = head;
    g->layers = calloc(hp->n_layer, sizeof(struct gating_layer));
    if (g->layers == NULL) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    if (!exec_init(&g->x, dev, n_threads, GATING_MAX_NODES, err, err_len)) {
        goto fail;
    }

    struct ggml_init_params wp = { (size_t) (8 + 24 * hp->n_layer) * ggml_tensor_overhead(), NULL, true };
    g->wctx = ggml_init(wp);
    if (g->wctx == NULL) {
        snprintf(err, err_len, "ggml weight context failed");
        goto fail;
    }
    char name[128];
#define WEIGHT(dst, ...)                                                   \
    do {                                                                   \
        snprintf(name, sizeof(name), __VA_ARGS__);                         \
        if (((dst) = find_weight(g, ws, n_ws, name, err, err_len)) == NULL) \
            goto fail;                                                     \
    } while (0)
    if (head) {
        WEIGHT(g->tok_embd, "token_embd.weight");
        WEIGHT(g->output_norm, "output_norm.weight");
        if (hp->tied_output) {
            g->output = g->tok_embd;
        } else {
            WEIGHT(g->output, "output.weight");
        }
    }
    for (int il = first; il < end; il++) {
        struct gating_layer * l = &g->layers[il];
        WEIGHT(l->attn_norm, "blk.%d.attn_norm.weight", il);
        if (hp->mla) {
            if (hp->n_lora_q > 0) {
                WEIGHT(l->wq_a, "blk.%d.attn_q_a.weight", il);
                WEIGHT(l->q_a_norm, "blk.%d.attn_q_a_norm.weight", il);
                WEIGHT(l->wq_b, "blk.%d.attn_q_b.weight", il);
            } else {
                WEIGHT(l->wq, "blk.%d.attn_q.weight", il);
            }
            WEIGHT(l->wkv_a_mqa, "blk.%d.attn_kv_a_mqa.weight", il);
            WEIGHT(l->kv_a_norm, "blk.%d.attn_kv_a_norm.weight", il);
            WEIGHT(l->wk_b, "blk.%d.attn_k_b.weight", il);
            WEIGHT(l->wv_b, "blk.%d.attn_v_b.weight", il);
        } else {
            WEIGHT(l->wq, "blk.%d.attn_q.weight", il);
            WEIGHT(l->wk, "blk.%d.attn_k.weight", il);
            WEIGHT(l->wv, "blk.%d.attn_v.weight", il);
        }
        WEIGHT(l->wo, "blk.%d.attn_output.weight", il);
        if (hp->post_norm) {
            WEIGHT(l->ffn_norm, "blk.%d.post_attention_norm.weight", il);
        } else {
            WEIGHT(l->ffn_norm, "blk.%d.ffn_norm.weight", il);
        }
        if (hp->qk_norm) {
            WEIGHT(l->q_norm, "blk.%d.attn_q_norm.weight", il);
            WEIGHT(l->k_norm, "blk.%d.attn_k_norm.weight", il);
        }
        if (hp->qkv_bias) {
            WEIGHT(l->bq, "blk.%d.attn_q.bias", il);
            WEIGHT(l->bk, "blk.%d.attn_k.bias", il);
            WEIGHT(l->bv, "blk.%d.attn_v.bias", il);
        }
        if (hp->attn_out_bias) {
            WEIGHT(l->bo, "blk.%d.attn_output.bias", il);
        }
        if (hp->sinks) {
            WEIGHT(l->sinks, "blk.%d.attn_sinks.weight", il);
        }
        if (il < hp->n_dense_lead) {
            WEIGHT(l->ffn_gate, "blk.%d.ffn_gate.weight", il);
            WEIGHT(l->ffn_up, "blk.%d.ffn_up.weight", il);
            WEIGHT(l->ffn_down, "blk.%d.ffn_down.weight", il);
            continue;
        }
        WEIGHT(l->gate_inp, "blk.%d.ffn_gate_inp.weight", il);
        if (hp->router_bias) {
            WEIGHT(l->gate_inp_b, "blk.%d.ffn_gate_inp.bias", il);
        }
        if (hp->probs_bias) {
            WEIGHT(l->probs_b, "blk.%d.exp_probs_b.bias", il);
        }
        if (hp->n_ff_shared > 0) {
            WEIGHT(l->sh_gate, "blk.%d.ffn_gate_shexp.weight", il);
            WEIGHT(l->sh_up, "blk.%d.ffn_up_shexp.weight", il);
            WEIGHT(l->sh_down, "blk.%d.ffn_down_shexp.weight", il);
        }
    }
#undef WEIGHT
    g->wbuf = ggml_backend_alloc_ctx_tensors(g->wctx, g->x.backend);
    if (g->wbuf == NULL) {
        size_t free = 0, total = 0;
        ggml_backend_dev_t d = ggml_backend_get_device(g->x.backend);
        if (d) ggml_backend_dev_memory(d, &free, &total);
        snprintf(err, err_len, "%s: no room for the gating weights (%.1f MiB free of %.1f MiB)", ggml_backend_name(g->x.backend),
                 free / 1048576.0, total / 1048576.0);
        goto fail;
    }
    // Weights: the scheduler runs each op where its weights are.
    ggml_backend_buffer_set_usage(g->wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (struct ggml_tensor * t = ggml_get_first_tensor(g->wctx); t != NULL; t = ggml_get_next_tensor(g->wctx, t)) {
        for (int i = 0; i < n_ws; i++) {
            if (strcmp(ws[i].name, ggml_get_name(t)) == 0) {
                ggml_backend_tensor_set(t, ws[i].data, 0, ws[i].size);
                break;
            }
        }
    }
    rope_params(g);
    g->meta_size = GATING_MAX_NODES * ggml_tensor_overhead() + ggml_graph_overhead_custom(GATING_MAX_NODES, false);
    g->meta = malloc(g->meta_size);
    if (g->meta == NULL) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    return g;
fail:
    neuro_gating_free(g);
    return NULL;
}

void neuro_session_free(neuro_session * s) {
    if (s == NULL) {
        return;
    }
    if (s->kvbuf) ggml_backend_buffer_free(s->kvbuf);
    if (s->kvctx) ggml_free(s->kvctx);
    free(s->k);
    free(s->v);
    free(s->cellpos);
    free(s);
}

neuro_session * neuro_session_new(neuro_gating * g, int n_ctx, int n_ubatch, int layers, char * err, size_t err_len) {
    const neuro_hparams * hp = &g->hp;
    if (!layers && !g->head) {
        snprintf(err, err_len, "a session without layers needs the head");
        return NULL;
    }
    neuro_session * s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    s->g = g;
    s->n_ctx = n_ctx;
    // The layers this session caches: none for a head alone.
    const int first = layers ? g->first : 0, end = layers ? g->end : 0;
    if (hp->n_swa > 0 && end > first) {
        s->n_swa_cells = swa_cells(hp, n_ctx, n_ubatch);
        s->cellpos = malloc(sizeof(int32_t) * s->n_swa_cells);
        if (s->cellpos == NULL) {
            snprintf(err, err_len, "out of memory");
            goto fail;
        }
        for (int c = 0; c < s->n_swa_cells; c++) {
            s->cellpos[c] = -1;
        }
    }
    s->k = calloc(hp->n_layer, sizeof(*s->k));
    s->v = calloc(hp->n_layer, sizeof(*s->v));
    struct ggml_init_params p = { (size_t) (2 * (end - first) + 2) * ggml_tensor_overhead(), NULL, true };
    s->kvctx = ggml_init(p);
    if (s->k == NULL || s->v == NULL || s->kvctx == NULL) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    const int64_t n_embd_k_gqa = (int64_t) hp->n_embd_head * hp->n_head_kv;
    const int64_t n_embd_v_gqa = (int64_t) hp->n_embd_head_v * hp->n_head_kv;
    for (int il = first; il < end; il++) {
        const int cells = is_swa(hp, il) ? s->n_swa_cells : n_ctx;
        s->k[il] = ggml_new_tensor_2d(s->kvctx, GGML_TYPE_F16, n_embd_k_gqa, cells);
        s->v[il] = ggml_new_tensor_2d(s->kvctx, GGML_TYPE_F16, n_embd_v_gqa, cells);
    }
    if (end == first) {
        return s; // a head alone keeps no cache
    }
    s->kvbuf = ggml_backend_alloc_ctx_tensors(s->kvctx, g->x.backend);
    if (s->kvbuf == NULL) {
        snprintf(err, err_len, "allocating a KV cache of %d tokens on %s failed", n_ctx, ggml_backend_name(g->x.backend));
        goto fail;
    }
    ggml_backend_buffer_clear(s->kvbuf, 0);
    return s;
fail:
    neuro_session_free(s);
    return NULL;
}

int neuro_gating_set_threads(neuro_gating * g, int n_threads) {
    return exec_set_threads(&g->x, n_threads) ? 0 : 1;
}

static struct ggml_context * graph_ctx(neuro_gating * g) {
    struct ggml_init_params p = { g->meta_size, g->meta, true };
    return ggml_init(p);
}

// run allocates and computes gf after set_inputs has filled its inputs.
static int run(neuro_gating * g, struct ggml_cgraph * gf) {
    if (!exec_alloc(&g->x, gf)) {
        return 3;
    }
    return 0;
}

static int compute(neuro_gating * g, struct ggml_cgraph * gf) {
    return exec_compute(&g->x, gf);
}

static struct ggml_tensor * rms_norm(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * w, float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
}

int neuro_embed(neuro_session * s, const int32_t * tokens, int n, float * out) {
    neuro_gating * g = s->g;
    if (!g->head) return 1;
    struct ggml_context * ctx = graph_ctx(g);
    if (ctx == NULL) return 2;
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, GATING_MAX_NODES, false);
    struct ggml_tensor * toks = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(toks);
    struct ggml_tensor * x = ggml_get_rows(ctx, g->tok_embd, toks);
    ggml_set_output(x);
    ggml_build_forward_expand(gf, x);
    int rc = run(g, gf);
    if (rc == 0) {
        ggml_backend_tensor_set(toks, tokens, 0, ggml_nbytes(toks));
        rc = compute(g, gf);
    }
    if (rc == 0) ggml_backend_tensor_get(x, out, 0, ggml_nbytes(x));
    ggml_free(ctx);
    return rc;
}

// kv_len is llama.cpp's n_kv: the cache cells attention looks at, padded
// to 256 so that graphs keep their shape (llama_kv_cache::get_n_kv).
static int kv_len(int n_ctx, int used) {
    int pad = 256;
    int padded = (used + pad - 1) / pad * pad;
    int n = padded > pad ? padded : pad;
    return n < n_ctx ? n : n_ctx;
}

// ffn builds llama.cpp's build_ffn with LLM_FFN_SILU and LLM_FFN_PAR:
// down(swiglu(gate x, up x)).
static struct ggml_tensor * ffn(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * gate,
                                struct ggml_tensor * up, struct ggml_tensor * down, int prec_f32) {
    struct ggml_tensor * u = ggml_mul_mat(ctx, up, x);
    struct ggml_tensor * g = ggml_mul_mat(ctx, gate, x);
    struct ggml_tensor * h = ggml_swiglu_split(ctx, g, u);
    struct ggml_tensor * out = ggml_mul_mat(ctx, down, h);
    if (prec_f32) ggml_mul_mat_set_prec(out, GGML_PREC_F32); // as llama.cpp sets it for GLM-4
    return out;
}

// mla_qkv builds llm_build_deepseek2's latent attention inputs with the
// absorption optimisation (MQA over the compressed KV): Q = [rope(q_pe),
// wk_b q_nope] per head, K = [rope(k_pe), norm(kv)] and V = norm(kv) in
// one KV head.
static void mla_qkv(struct ggml_context * ctx, const neuro_gating * g, const struct gating_layer * L, struct ggml_tensor * cur,
                    struct ggml_tensor * pos, int n, struct ggml_tensor ** q_out, struct ggml_tensor ** k_out, struct ggml_tensor ** v_out) {
    const neuro_hparams * hp = &g->hp;
    const int64_t n_head = hp->n_head, rope = hp->n_rot, kv_rank = hp->n_lora_kv;
    const int64_t k_mla = hp->n_embd_head_k_mla, nope = k_mla - rope;
    struct ggml_tensor * q;
    if (L->wq_a) {
        q = ggml_mul_mat(ctx, L->wq_a, cur);
        q = rms_norm(ctx, q, L->q_a_norm, hp->rms_eps);
        q = ggml_mul_mat(ctx, L->wq_b, q);
    } else {
        q = ggml_mul_mat(ctx, L->wq, cur);
    }
    struct ggml_tensor * q_nope = ggml_view_3d(ctx, q, nope, n_head, n, ggml_row_size(q->type, k_mla),
                                               ggml_row_size(q->type, k_mla) * n_head, 0);
    struct ggml_tensor * q_pe = ggml_view_3d(ctx, q, rope, n_head, n, ggml_row_size(q->type, k_mla),
                                             ggml_row_size(q->type, k_mla) * n_head, ggml_row_size(q->type, nope));
    struct ggml_tensor * kv_cmpr_pe = ggml_mul_mat(ctx, L->wkv_a_mqa, cur);
    struct ggml_tensor * kv_cmpr = ggml_view_2d(ctx, kv_cmpr_pe, kv_rank, n, ggml_row_size(kv_cmpr_pe->type, kv_rank + rope), 0);
    struct ggml_tensor * k_pe = ggml_view_3d(ctx, kv_cmpr_pe, rope, 1, n, ggml_row_size(kv_cmpr_pe->type, kv_rank + rope),
                                             ggml_row_size(kv_cmpr_pe->type, kv_rank + rope), ggml_row_size(kv_cmpr_pe->type, kv_rank));
    const int rope_type = hp->rope_neox ? 2 : 0;
    q_pe = ggml_rope_ext(ctx, q_pe, pos, NULL, hp->n_rot, rope_type, hp->n_ctx_orig, hp->rope_freq_base, g->freq_scale,
                         g->ext_factor, g->attn_factor, 32.0f, 1.0f);
    k_pe = ggml_rope_ext(ctx, k_pe, pos, NULL, hp->n_rot, rope_type, hp->n_ctx_orig, hp->rope_freq_base, g->freq_scale,
                         g->ext_factor, g->attn_factor, 32.0f, 1.0f);
    kv_cmpr = rms_norm(ctx, kv_cmpr, L->kv_a_norm, hp->rms_eps);
    q_nope = ggml_permute(ctx, q_nope, 0, 2, 1, 3);
    struct ggml_tensor * q_abs = ggml_mul_mat(ctx, L->wk_b, q_nope);
    q_abs = ggml_permute(ctx, q_abs, 0, 2, 1, 3);
    *q_out = ggml_concat(ctx, q_pe, q_abs, 0); // rope first, as llama.cpp (context shifts rotate in place)
    kv_cmpr = ggml_reshape_3d(ctx, kv_cmpr, kv_rank, 1, n);
    *k_out = ggml_concat(ctx, k_pe, kv_cmpr, 0);
    *v_out = kv_cmpr;
}

// group_topk is build_moe_ffn's group-limited selection (DeepSeek-V3):
// the n_group_used groups with the best two scores keep their experts'
// scores, the others' become -inf.
static struct ggml_tensor * group_topk(struct ggml_context * ctx, const neuro_hparams * hp, struct ggml_tensor * sel, int n_tokens) {
    const int64_t per_group = hp->n_expert / hp->n_expert_groups;
    struct ggml_tensor * groups = ggml_reshape_3d(ctx, sel, per_group, hp->n_expert_groups, n_tokens);
    struct ggml_tensor * scores = ggml_argsort_top_k(ctx, groups, 2);
    scores = ggml_get_rows(ctx, ggml_reshape_4d(ctx, groups, 1, groups->ne[0], groups->ne[1], groups->ne[2]), scores);
    scores = ggml_sum_rows(ctx, ggml_reshape_3d(ctx, scores, scores->ne[1], scores->ne[2], scores->ne[3]));
    scores = ggml_reshape_2d(ctx, scores, scores->ne[1], scores->ne[2]);
    struct ggml_tensor * chosen = ggml_argsort_top_k(ctx, scores, hp->n_group_used);
    struct ggml_tensor * kept = ggml_get_rows(ctx, groups, chosen);
    kept = ggml_set_rows(ctx, ggml_fill(ctx, groups, -INFINITY), kept, chosen);
    return ggml_reshape_2d(ctx, kept, hp->n_expert, n_tokens);
}

int neuro_layer(neuro_session * s, int il, const float * inp, int n, int pos0, int last_only,
                float * ffn_inp_out, float * moe_in_out, int32_t * selected_ids, float * weights_out, float * extra_out) {
    return neuro_layer_multi(&s, 1, il, inp, n, &pos0, last_only, ffn_inp_out, moe_in_out, selected_ids, weights_out, extra_out);
}

int neuro_layer_multi(neuro_session ** ss, int N, int il, const float * inp, int n, const int * pos0s, int last_only,
                      float * ffn_inp_out, float * moe_in_out, int32_t * selected_ids, float * weights_out, float * extra_out) {
    if (N < 1 || N > NEURO_MAX_SESSIONS || (N > 1 && (n != 1 || last_only))) {
        return 1;
    }
    neuro_gating * g = ss[0]->g;
    const neuro_hparams * hp = &g->hp;
    if (N > 1 && hp->mla) {
        return 1; // MLA's per-head products would take a batch's kernels
    }
    const int64_t n_embd_head = hp->n_embd_head;     // the KV cache's key head
    const int64_t n_embd_head_v = hp->n_embd_head_v; // and value head
    const int64_t n_embd_gqa = n_embd_head * hp->n_head_kv;
    const int64_t n_embd_v_gqa = n_embd_head_v * hp->n_head_kv;
    const int rope_type = hp->rope_neox ? 2 /* LLAMA_ROPE_TYPE_NEOX */ : 0 /* LLAMA_ROPE_TYPE_NORM */;
    const int swa = is_swa(hp, il);
    const struct gating_layer * L = &g->layers[il];
    int cells[NEURO_MAX_SESSIONS], n_kv[NEURO_MAX_SESSIONS];
    for (int j = 0; j < N; j++) {
        neuro_session * s = ss[j];
        const int pos0 = pos0s[j];
        if (s->g != g || il < g->first || il >= g->end || s->k[il] == NULL || n < 1 || pos0 < 0 || pos0 + n > s->n_ctx) {
            return 1;
        }
        cells[j] = swa ? s->n_swa_cells : s->n_ctx; // this layer's cache
        if (swa && cells[j] < s->n_ctx && n > cells[j] - hp->n_swa) {
            return 1; // the ubatch would overwrite cells its own window reads
        }
        const int used = pos0 + n < cells[j] ? pos0 + n : cells[j];
        n_kv[j] = kv_len(cells[j], used);
    }
    const int n_out = last_only ? 1 : n;
    const int T = n * N; // rows in all

    struct ggml_context * ctx = graph_ctx(g);
    if (ctx == NULL) return 2;
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, GATING_MAX_NODES, false);

    // Each session's n rows are a slice of the last dimension: a product
    // with a weight then takes the same kernel for a session's row as it
    // does alone (ggml's tinyBLAS takes a batch of two rows or more in
    // the second dimension, and N sessions' single rows stay one row each).
    struct ggml_tensor * inpL = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, hp->n_embd, n, N);
    ggml_set_input(inpL);
    struct ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T);
    ggml_set_input(pos);
    struct ggml_tensor * k_idxs[NEURO_MAX_SESSIONS], * v_idxs[NEURO_MAX_SESSIONS], * mask[NEURO_MAX_SESSIONS];
    for (int j = 0; j < N; j++) {
        k_idxs[j] = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
        ggml_set_input(k_idxs[j]);
        v_idxs[j] = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n * n_embd_v_gqa);
        ggml_set_input(v_idxs[j]);
        mask[j] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_kv[j], n, 1, 1);
        ggml_set_input(mask[j]);
    }
    struct ggml_tensor * out_ids = NULL; // llama.cpp's inp_out_ids: the last layer keeps only the output row
    if (last_only) {
        out_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
        ggml_set_input(out_ids);
    }

    // attention
    struct ggml_tensor * cur = rms_norm(ctx, inpL, L->attn_norm, hp->rms_eps);
    struct ggml_tensor * q;
    struct ggml_tensor * k;
    struct ggml_tensor * v;
    if (hp->mla) {
        mla_qkv(ctx, g, L, cur, pos, n, &q, &k, &v);
    } else {
        q = ggml_mul_mat(ctx, L->wq, cur);
        if (L->bq) q = ggml_add(ctx, q, L->bq);
        k = ggml_mul_mat(ctx, L->wk, cur);
        if (L->bk) k = ggml_add(ctx, k, L->bk);
        v = ggml_mul_mat(ctx, L->wv, cur);
        if (L->bv) v = ggml_add(ctx, v, L->bv);
        q = ggml_reshape_3d(ctx, q, n_embd_head, hp->n_head, T);
        k = ggml_reshape_3d(ctx, k, n_embd_head, hp->n_head_kv, T);
        v = ggml_reshape_3d(ctx, v, n_embd_head, hp->n_head_kv, T);
        if (hp->qk_norm) {
            // llm_build_qwen3moe: each head of Q and K RMS-normed before RoPE
            q = rms_norm(ctx, q, L->q_norm, hp->rms_eps);
            k = rms_norm(ctx, k, L->k_norm, hp->rms_eps);
        }
        // llama.cpp's YaRN defaults: beta_fast 32, beta_slow 1
        q = ggml_rope_ext(ctx, q, pos, NULL, hp->n_rot, rope_type, hp->n_ctx_orig,
                          hp->rope_freq_base, g->freq_scale, g->ext_factor, g->attn_factor, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, pos, NULL, hp->n_rot, rope_type, hp->n_ctx_orig,
                          hp->rope_freq_base, g->freq_scale, g->ext_factor, g->attn_factor, 32.0f, 1.0f);
    }
    ggml_build_forward_expand(gf, q);
    ggml_build_forward_expand(gf, k);
    ggml_build_forward_expand(gf, v);

    // each session's attention over its own cache
    struct ggml_tensor * att = NULL;
    for (int j = 0; j < N; j++) {
        neuro_session * s = ss[j];
        // store K and V (llama_kv_cache::cpy_k / cpy_v with a transposed V)
        struct ggml_tensor * kc = s->k[il];
        struct ggml_tensor * vc = s->v[il];
        struct ggml_tensor * k2 = ggml_view_2d(ctx, k, n_embd_gqa, n, k->nb[2], (size_t) j * n * k->nb[2]);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, kc, k2, k_idxs[j]));
        struct ggml_tensor * v2 = N == 1 ? ggml_reshape_2d(ctx, v, n_embd_v_gqa, n)
                                         : ggml_view_2d(ctx, v, n_embd_v_gqa, n, v->nb[2], (size_t) j * n * v->nb[2]);
        struct ggml_tensor * v_view = ggml_reshape_2d(ctx, vc, 1, ggml_nelements(vc));
        v2 = ggml_reshape_2d(ctx, v2, 1, ggml_nelements(v2));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, v_view, v2, v_idxs[j]));

        // read the cache (llama_kv_cache::get_k / get_v)
        const int c = cells[j];
        struct ggml_tensor * kk = ggml_view_4d(ctx, kc, n_embd_head, hp->n_head_kv, n_kv[j], 1,
                                               ggml_row_size(kc->type, n_embd_head),
                                               ggml_row_size(kc->type, n_embd_gqa),
                                               ggml_row_size(kc->type, n_embd_gqa * c), 0);
        struct ggml_tensor * vv = ggml_view_4d(ctx, vc, n_kv[j], hp->n_head_kv, n_embd_head_v, 1,
                                               ggml_row_size(vc->type, (int64_t) c * n_embd_head_v),
                                               ggml_row_size(vc->type, c),
                                               ggml_row_size(vc->type, (int64_t) c * n_embd_v_gqa), 0);

        // build_attn_mha without flash attention
        struct ggml_tensor * qj = N == 1 ? q : ggml_view_3d(ctx, q, q->ne[0], q->ne[1], n, q->nb[1], q->nb[2], (size_t) j * n * q->nb[2]);
        struct ggml_tensor * qp = ggml_permute(ctx, qj, 0, 2, 1, 3);
        struct ggml_tensor * kp = ggml_permute(ctx, kk, 0, 2, 1, 3);
        struct ggml_tensor * vp = ggml_permute(ctx, vv, 0, 2, 1, 3);
        struct ggml_tensor * kq = ggml_mul_mat(ctx, kp, qp);
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        kq = ggml_soft_max_ext(ctx, kq, mask[j], g->kq_scale, 0.0f);
        if (L->sinks) ggml_soft_max_add_sinks(kq, L->sinks);
        struct ggml_tensor * kqv = ggml_mul_mat(ctx, vp, kq);
        if (hp->mla) kqv = ggml_mul_mat(ctx, L->wv_b, kqv); // MLA: decompress each head's value
        struct ggml_tensor * o = ggml_permute(ctx, kqv, 0, 2, 1, 3);
        o = ggml_cont_2d(ctx, o, o->ne[0] * o->ne[1], o->ne[2] * o->ne[3]);
        att = att == NULL ? o : ggml_concat(ctx, att, o, 1);
    }
    cur = att;
    if (N > 1) cur = ggml_reshape_3d(ctx, cur, cur->ne[0], n, N);
    ggml_build_forward_expand(gf, cur);
    cur = ggml_mul_mat(ctx, L->wo, cur);
    if (L->bo) cur = ggml_add(ctx, cur, L->bo);

    struct ggml_tensor * inpSA = inpL;
    if (last_only) {
        cur = ggml_get_rows(ctx, cur, out_ids);
        inpSA = ggml_get_rows(ctx, inpSA, out_ids);
    }
    struct ggml_tensor * ffn_inp = ggml_add(ctx, cur, inpSA);
    ggml_set_output(ffn_inp);

    struct ggml_tensor * moe_in = rms_norm(ctx, ffn_inp, L->ffn_norm, hp->rms_eps);
    ggml_set_output(moe_in);
    ggml_build_forward_expand(gf, ffn_inp);
    ggml_build_forward_expand(gf, moe_in);
    const int rows_out = n_out * N;
    struct ggml_tensor * selected_out = NULL;
    struct ggml_tensor * weights = NULL;
    struct ggml_tensor * extra = NULL;
    if (il < hp->n_dense_lead) {
        // a dense leading layer: its FFN here, no experts
        extra = ffn(ctx, moe_in, L->ffn_gate, L->ffn_up, L->ffn_down, hp->ffn_prec_f32);
    } else {
        // build_moe_ffn up to the expert calls: softmax or sigmoid router,
        // the selection bias, top-k, weights normalised by their (clamped)
        // sum and scaled
        struct ggml_tensor * logits = ggml_mul_mat(ctx, L->gate_inp, moe_in); // [n_expert, n_out, N]
        if (N > 1) logits = ggml_reshape_2d(ctx, logits, hp->n_expert, rows_out);
        if (L->gate_inp_b) logits = ggml_add(ctx, logits, L->gate_inp_b);
        struct ggml_tensor * probs = hp->softmax_weight ? logits : hp->sigmoid ? ggml_sigmoid(ctx, logits) : ggml_soft_max(ctx, logits);
        struct ggml_tensor * selection = probs;
        if (L->probs_b) selection = ggml_add(ctx, probs, L->probs_b);
        if (hp->n_expert_groups > 1) selection = group_topk(ctx, hp, selection, rows_out);
        struct ggml_tensor * selected = ggml_argsort_top_k(ctx, selection, hp->n_expert_used); // [n_used, rows_out], a view
        // A contiguous copy to read back: the view's parent is freed for
        // reuse once the graph no longer needs it.
        selected_out = ggml_cont(ctx, selected);
        ggml_set_output(selected_out);
        probs = ggml_reshape_3d(ctx, probs, 1, hp->n_expert, rows_out);
        weights = ggml_get_rows(ctx, probs, selected); // [1, n_used, rows_out]
        weights = ggml_reshape_2d(ctx, weights, hp->n_expert_used, rows_out);
        if (hp->softmax_weight) weights = ggml_soft_max(ctx, weights); // over the chosen experts' logits
        if (hp->norm_w) {
            struct ggml_tensor * wsum = ggml_sum_rows(ctx, weights);
            wsum = ggml_clamp(ctx, wsum, 6.103515625e-5f, INFINITY);
            weights = ggml_div(ctx, weights, wsum);
        }
        if (hp->scale_w != 0.0f) weights = ggml_scale(ctx, weights, hp->scale_w);
        ggml_set_output(weights);
        ggml_build_forward_expand(gf, selected_out);
        ggml_build_forward_expand(gf, weights);
        if (hp->n_ff_shared > 0) {
            extra = ffn(ctx, moe_in, L->sh_gate, L->sh_up, L->sh_down, hp->ffn_prec_f32);
        }
    }
    if (extra) {
        ggml_set_output(extra);
        ggml_build_forward_expand(gf, extra);
    }

    int rc = run(g, gf);
    int32_t * p = NULL;
    int64_t * ki = NULL;
    int64_t * vi = NULL;
    float * m = NULL;
    if (rc == 0) {
        ggml_backend_tensor_set(inpL, inp, 0, ggml_nbytes(inpL));
        int max_kv = 0;
        for (int j = 0; j < N; j++) max_kv = n_kv[j] > max_kv ? n_kv[j] : max_kv;
        p = malloc(sizeof(int32_t) * T);
        ki = malloc(sizeof(int64_t) * n);
        vi = malloc(sizeof(int64_t) * n * n_embd_v_gqa);
        m = malloc(sizeof(float) * max_kv * n);
        if (p == NULL || ki == NULL || vi == NULL || m == NULL) {
            rc = 5;
        }
    }
    for (int j = 0; j < N && rc == 0; j++) {
        neuro_session * s = ss[j];
        const int pos0 = pos0s[j], c = cells[j];
        if (swa) {
            // the ubatch's cells, before attention reads them (as
            // llama.cpp applies a ubatch to its cells first)
            for (int t = 0; t < n; t++) {
                s->cellpos[(pos0 + t) % c] = pos0 + t;
            }
        }
        for (int t = 0; t < n; t++) {
            const int p1 = pos0 + t;
            const int cell = p1 % c;
            p[j * n + t] = p1;
            ki[t] = cell;
            for (int64_t d = 0; d < n_embd_v_gqa; d++) {
                vi[t * n_embd_v_gqa + d] = d * c + cell;
            }
            for (int cc = 0; cc < n_kv[j]; cc++) {
                // causal: a cell is visible to a token at or after its
                // position; in a sliding-window layer, only the last
                // n_swa positions (llama_hparams::is_masked_swa)
                const int pc = swa ? s->cellpos[cc] : cc;
                const int visible = pc >= 0 && pc <= p1 && !(swa && p1 - pc >= hp->n_swa);
                m[(int64_t) t * n_kv[j] + cc] = visible ? 0.0f : -INFINITY;
            }
        }
        ggml_backend_tensor_set(k_idxs[j], ki, 0, ggml_nbytes(k_idxs[j]));
        ggml_backend_tensor_set(v_idxs[j], vi, 0, ggml_nbytes(v_idxs[j]));
        ggml_backend_tensor_set(mask[j], m, 0, ggml_nbytes(mask[j]));
    }
    if (rc == 0) {
        int32_t last = n - 1;
        ggml_backend_tensor_set(pos, p, 0, ggml_nbytes(pos));
        if (out_ids != NULL) {
            ggml_backend_tensor_set(out_ids, &last, 0, sizeof(last));
        }
        rc = compute(g, gf);
    }
    free(p);
    free(ki);
    free(vi);
    free(m);
    if (rc == 0) {
        ggml_backend_tensor_get(ffn_inp, ffn_inp_out, 0, ggml_nbytes(ffn_inp));
        ggml_backend_tensor_get(moe_in, moe_in_out, 0, ggml_nbytes(moe_in));
        if (selected_out) ggml_backend_tensor_get(selected_out, selected_ids, 0, ggml_nbytes(selected_out));
        if (weights) ggml_backend_tensor_get(weights, weights_out, 0, ggml_nbytes(weights));
        if (extra) ggml_backend_tensor_get(extra, extra_out, 0, ggml_nbytes(extra));
    }
    ggml_free(ctx);
    return rc;
}

size_t neuro_session_kv_bytes(const neuro_session * s) {
    size_t n = 0;
    for (int il = s->g->first; il < s->g->end; il++) {
        if (s->k[il] != NULL) {
            n += ggml_nbytes(s->k[il]) + ggml_nbytes(s->v[il]);
        }
    }
    return n;
}

int neuro_session_swa_cells(const neuro_session * s) {
    return s->n_swa_cells;
}

int neuro_rewind(neuro_session * s, int pos) {
    if (s->cellpos == NULL) {
        return 0;
    }
    const int cells = s->n_swa_cells;
    // the window the token at pos attends to, besides itself
    for (int x = pos - s->g->hp.n_swa + 1; x < pos; x++) {
        if (x >= 0 && s->cellpos[x % cells] != x) {
            return 1;
        }
    }
    for (int c = 0; c < cells; c++) {
        if (s->cellpos[c] >= pos) {
            s->cellpos[c] = -1; // llama_kv_cache::seq_rm
        }
    }
    return 0;
}

int neuro_output(neuro_session * s, const float * x, int n_out, int apart, float * logits_out) {
    neuro_gating * g = s->g;
    if (!g->head || n_out < 1) return 1;
    struct ggml_context * ctx = graph_ctx(g);
    if (ctx == NULL) return 2;
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, GATING_MAX_NODES, false);
    // apart: each row in the last dimension, so that the head's product
    // takes for each the kernel of one row alone (see neuro_layer_multi)
    struct ggml_tensor * in = apart ? ggml_new_tensor_3d(ctx, GGML_TYPE_F32, g->hp.n_embd, 1, n_out)
                                    : ggml_new_tensor_2d(ctx, GGML_TYPE_F32, g->hp.n_embd, n_out);
    ggml_set_input(in);
    struct ggml_tensor * cur = rms_norm(ctx, in, g->output_norm, g->hp.rms_eps);
    cur = ggml_mul_mat(ctx, g->output, cur);
    ggml_set_output(cur);
    ggml_build_forward_expand(gf, cur);
    int rc = run(g, gf);
    if (rc == 0) {
        ggml_backend_tensor_set(in, x, 0, ggml_nbytes(in));
        rc = compute(g, gf);
    }
    if (rc == 0) ggml_backend_tensor_get(cur, logits_out, 0, ggml_nbytes(cur));
    ggml_free(ctx);
    return rc;
}
