#include "exec.h"
#include "neuro.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"

extern void neuroLog(int level, char * text, void * user_data);

void neuro_log_install(void) {
    llama_log_set((ggml_log_callback) neuroLog, NULL);
}

// neuro_timer_slack runs before the Go runtime starts (a constructor:
// the binary is linked externally, and the C runtime runs these before it
// calls the runtime's main), so that every thread the runtime creates,
// sysmon first, inherits the process's timer slack: NEURO_TIMER_SLACK_US
// microseconds (0 keeps Linux's 50), by default NEURO_TIMER_SLACK_DEFAULT_US.
//
// Why: Go's sysmon thread sleeps 20 µs at a time (plus the slack) for
// the first millisecond after the process wakes from idle, and again
// whenever it finds work. A node wakes from idle for every expert call;
// during the call's compute both ggml threads hold both cores, so every
// sysmon wake preempts one of them and the other spins at the next
// barrier (measured on an expert node of the loopback testnet on 2 cores:
// about 2,900 sysmon wakes and 113 ms of its CPU a second with Linux's
// 50 µs, 840 and 63 ms with 1 ms). The slack only makes timed sleeps
// wake later (by at most that much); wakes for data, locks and signals
// stay immediate.
#define NEURO_TIMER_SLACK_DEFAULT_US 1000L

// Whether NEURO_TIMER_SLACK_US was set to something the constructor
// ignored (for neurod to warn about once it can log).
static int timer_slack_env_bad;

__attribute__((constructor)) static void neuro_timer_slack(void) {
    long us = NEURO_TIMER_SLACK_DEFAULT_US;
    const char * s = getenv("NEURO_TIMER_SLACK_US");
    if (s != NULL && *s != 0) {
        char * end = NULL;
        long v = strtol(s, &end, 10);
        if (end != NULL && *end == 0 && v >= 0 && v <= 100000) {
            us = v;
        } else {
            timer_slack_env_bad = 1;
        }
    }
    if (us > 0) {
        prctl(PR_SET_TIMERSLACK, (unsigned long) us * 1000UL, 0, 0, 0);
    }
}

long neuro_timer_slack_ns(void) {
    return (long) prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
}

int neuro_timer_slack_env_bad(void) {
    return timer_slack_env_bad;
}

// The process's threadpools, one for each thread count and polling level
// (neuro_pool).
struct pool_entry {
    int n_threads;
    int poll; // the level it was made with (poll_level then)
    struct ggml_threadpool * tp;
    struct pool_entry * next;
};
static struct pool_entry * pools;

// The threadpool's polling level (ggml's 0-100; -1: ggml's default).
static int poll_level = -1;

void neuro_set_poll(int level) {
    poll_level = level < 0 ? -1 : level;
}

int neuro_poll(void) {
    return poll_level;
}

// new_threadpool makes a threadpool of n_threads threads at the polling
// level set (neuro_set_poll).
static struct ggml_threadpool * new_threadpool(int n_threads) {
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    if (poll_level >= 0) {
        tpp.poll = (uint32_t) poll_level;
    }
    return ggml_threadpool_new(&tpp);
}

struct ggml_threadpool * neuro_pool(int n_threads) {
    if (n_threads < 1) {
        n_threads = 1;
    }
    for (struct pool_entry * p = pools; p != NULL; p = p->next) {
        if (p->n_threads == n_threads && p->poll == poll_level) {
            return p->tp;
        }
    }
    struct pool_entry * p = calloc(1, sizeof(*p));
    if (p == NULL) {
        return NULL;
    }
    p->tp = new_threadpool(n_threads);
    if (p->tp == NULL) {
        free(p);
        return NULL;
    }
    p->n_threads = n_threads;
    p->poll = poll_level;
    p->next = pools;
    pools = p;
    return p->tp;
}

// Graph metadata: a handful of tensors and one graph.
#define EXPERT_MAX_NODES 16

struct neuro_expert {
    int n_embd, n_ff, max_batch;
    int n_exp, k_max; // a stack of n_exp experts, each token routed to at most k_max
    int act;   // NEURO_ACT_*
    int dense; // NEURO_EXPERT_DENSE: plain matrix products (a shared expert)
    int down_prec_f32;
    neuro_exec x;
    struct ggml_context * wctx;
    ggml_backend_buffer_t wbuf;
    struct ggml_tensor * gate;
    struct ggml_tensor * up;
    struct ggml_tensor * down;
    struct ggml_tensor * gate_b; // biases (gpt-oss), or NULL
    struct ggml_tensor * up_b;
    struct ggml_tensor * down_b;
    size_t meta_size;
    void * meta;
    int32_t * zeros; // expert ids of a batch: all 0
};

// build_expert adds the ops for n tokens, each routed to k of the stack's
// experts, to gf: *x is the input, *ids_out the expert ids [k, n] (a single
// expert: k = 1, ids all 0; a dense expert: NULL), *out [n_embd, k, n],
// each slot's expert output before its weight.
static void build_expert(struct ggml_context * ctx, struct ggml_cgraph * gf, neuro_expert * e, int n, int k,
                         struct ggml_tensor ** x, struct ggml_tensor ** ids_out, struct ggml_tensor ** out) {
    *ids_out = NULL;
    if (e->dense) {
        // a layer's shared experts: llama.cpp's build_ffn (LLM_FFN_SILU,
        // LLM_FFN_PAR), plain matrix products on 2-D weights
        *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, e->n_embd, n);
        ggml_set_input(*x);
        struct ggml_tensor * up2 = ggml_view_2d(ctx, e->up, e->n_embd, e->n_ff, e->up->nb[1], 0);
        struct ggml_tensor * gate2 = ggml_view_2d(ctx, e->gate, e->n_embd, e->n_ff, e->gate->nb[1], 0);
        struct ggml_tensor * down2 = ggml_view_2d(ctx, e->down, e->n_ff, e->n_embd, e->down->nb[1], 0);
        struct ggml_tensor * u = ggml_mul_mat(ctx, up2, *x);
        struct ggml_tensor * g = ggml_mul_mat(ctx, gate2, *x);
        *out = ggml_mul_mat(ctx, down2, ggml_swiglu_split(ctx, g, u));
        if (e->down_prec_f32) ggml_mul_mat_set_prec(*out, GGML_PREC_F32);
        ggml_set_output(*out);
        ggml_build_forward_expand(gf, *out);
        return;
    }
    // The ops of llama.cpp's build_moe_ffn, so that the arithmetic is the
    // same: the weights are a stack of one expert, every token is routed
    // to it through mul_mat_id, biases are added by expert id (add_id),
    // and silu(gate) * up is the fused swiglu (gpt-oss: swiglu_oai).
    *x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, e->n_embd, 1, n);
    ggml_set_input(*x);
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, n);
    ggml_set_input(ids);
    struct ggml_tensor * u = ggml_mul_mat_id(ctx, e->up, *x, ids); // [n_ff, k, n]
    if (e->up_b) u = ggml_add_id(ctx, u, e->up_b, ids);
    struct ggml_tensor * g = ggml_mul_mat_id(ctx, e->gate, *x, ids); // [n_ff, k, n]
    if (e->gate_b) g = ggml_add_id(ctx, g, e->gate_b, ids);
    struct ggml_tensor * h = e->act == NEURO_ACT_SWIGLU_OAI ? ggml_swiglu_oai(ctx, g, u, 1.702f, 7.0f) : ggml_swiglu_split(ctx, g, u);
    *out = ggml_mul_mat_id(ctx, e->down, h, ids); // [n_embd, k, n]
    if (e->down_b) *out = ggml_add_id(ctx, *out, e->down_b, ids);
    ggml_set_output(*out);
    ggml_build_forward_expand(gf, *out);
    *ids_out = ids;
}

// build_graph builds the expert's graph for n tokens in a context that
// lives in e->meta.
static struct ggml_cgraph * build_graph(neuro_expert * e, int n, int k, struct ggml_context ** ctx_out,
                                        struct ggml_tensor ** x, struct ggml_tensor ** ids, struct ggml_tensor ** out) {
    struct ggml_init_params p = { e->meta_size, e->meta, true };
    struct ggml_context * ctx = ggml_init(p);
    if (ctx == NULL) {
        return NULL;
    }
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, EXPERT_MAX_NODES, false);
    build_expert(ctx, gf, e, n, k, x, ids, out);
    *ctx_out = ctx;
    return gf;
}

void neuro_expert_free(neuro_expert * e) {
    if (e == NULL) {
        return;
    }
    if (e->wbuf) ggml_backend_buffer_free(e->wbuf);
    if (e->wctx) ggml_free(e->wctx);
    exec_free(&e->x);
    free(e->meta);
    free(e->zeros);
    free(e);
}

neuro_expert * neuro_expert_new(int n_embd, int n_ff, int type_gate, int type_up, int type_down,
                                const void * gate, const void * up, const void * down,
                                const float * gate_b, const float * up_b, const float * down_b, int act, int flags,
                                int dev, int n_threads, int max_batch, char * err, size_t err_len) {
    return neuro_stack_new(n_embd, n_ff, 1, 1, type_gate, type_up, type_down, &gate, &up, &down,
                           gate_b ? &gate_b : NULL, up_b ? &up_b : NULL, down_b ? &down_b : NULL, act, flags,
                           dev, n_threads, max_batch, err, err_len);
}

neuro_expert * neuro_stack_new(int n_embd, int n_ff, int n_exp, int k_max, int type_gate, int type_up, int type_down,
                               const void * const * gate, const void * const * up, const void * const * down,
                               const float * const * gate_b, const float * const * up_b, const float * const * down_b,
                               int act, int flags, int dev, int n_threads, int max_batch, char * err, size_t err_len) {
    neuro_expert * e = calloc(1, sizeof(*e));
    if (e == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    e->n_embd = n_embd;
    e->n_ff = n_ff;
    e->n_exp = n_exp;
    e->k_max = k_max;
    e->max_batch = max_batch;
    e->act = act;
    e->dense = (flags & NEURO_EXPERT_DENSE) != 0;
    e->down_prec_f32 = (flags & NEURO_EXPERT_DOWN_PREC_F32) != 0;

    if (!exec_init(&e->x, dev, n_threads, EXPERT_MAX_NODES, err, err_len)) {
        goto fail;
    }

    struct ggml_init_params wp = { 8 * ggml_tensor_overhead(), NULL, true };
    e->wctx = ggml_init(wp);
    if (e->wctx == NULL) {
        snprintf(err, err_len, "ggml weight context failed");
        goto fail;
    }
    e->gate = ggml_new_tensor_3d(e->wctx, (enum ggml_type) type_gate, n_embd, n_ff, n_exp);
    e->up = ggml_new_tensor_3d(e->wctx, (enum ggml_type) type_up, n_embd, n_ff, n_exp);
    e->down = ggml_new_tensor_3d(e->wctx, (enum ggml_type) type_down, n_ff, n_embd, n_exp);
    if (gate_b) e->gate_b = ggml_new_tensor_2d(e->wctx, GGML_TYPE_F32, n_ff, n_exp);
    if (up_b) e->up_b = ggml_new_tensor_2d(e->wctx, GGML_TYPE_F32, n_ff, n_exp);
    if (down_b) e->down_b = ggml_new_tensor_2d(e->wctx, GGML_TYPE_F32, n_embd, n_exp);
    e->wbuf = ggml_backend_alloc_ctx_tensors(e->wctx, e->x.backend);
    if (e->wbuf == NULL) {
        size_t free = 0, total = 0;
        ggml_backend_dev_t d = ggml_backend_get_device(e->x.backend);
        if (d) ggml_backend_dev_memory(d, &free, &total);
        snprintf(err, err_len, "%s: no room for this expert's %.1f MiB of weights (%.1f MiB free of %.1f MiB)",
                 ggml_backend_name(e->x.backend), (ggml_nbytes(e->gate) + ggml_nbytes(e->up) + ggml_nbytes(e->down)) / 1048576.0,
                 free / 1048576.0, total / 1048576.0);
        goto fail;
    }
    // Weights: the scheduler runs each op where its weights are.
    ggml_backend_buffer_set_usage(e->wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    // expert i's slice of each stacked tensor (ne2 counts the experts)
    for (int i = 0; i < n_exp; i++) {
        ggml_backend_tensor_set(e->gate, gate[i], i * e->gate->nb[2], e->gate->nb[2]);
        ggml_backend_tensor_set(e->up, up[i], i * e->up->nb[2], e->up->nb[2]);
        ggml_backend_tensor_set(e->down, down[i], i * e->down->nb[2], e->down->nb[2]);
        if (e->gate_b) ggml_backend_tensor_set(e->gate_b, gate_b[i], i * e->gate_b->nb[1], e->gate_b->nb[1]);
        if (e->up_b) ggml_backend_tensor_set(e->up_b, up_b[i], i * e->up_b->nb[1], e->up_b->nb[1]);
        if (e->down_b) ggml_backend_tensor_set(e->down_b, down_b[i], i * e->down_b->nb[1], e->down_b->nb[1]);
    }

    e->meta_size = EXPERT_MAX_NODES * ggml_tensor_overhead() + ggml_graph_overhead_custom(EXPERT_MAX_NODES, false);
    e->meta = malloc(e->meta_size);
    e->zeros = calloc(max_batch, sizeof(int32_t));
    if (e->meta == NULL || e->zeros == NULL) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    struct ggml_context * ctx;
    struct ggml_tensor * x;
    struct ggml_tensor * ids;
    struct ggml_tensor * out;
    struct ggml_cgraph * gf = build_graph(e, max_batch, k_max, &ctx, &x, &ids, &out);
    if (gf == NULL || !exec_reserve(&e->x, gf)) {
        snprintf(err, err_len, "reserving compute memory for a batch of %d failed", max_batch);
        if (gf) ggml_free(ctx);
        goto fail;
    }
    ggml_free(ctx);
    return e;
fail:
    neuro_expert_free(e);
    return NULL;
}

// run_expert computes n tokens, each routed to k of the stack's experts
// (ids_data: n x k ids; a dense expert reads none).
static int run_expert(neuro_expert * e, const float * xdata, int n, const int32_t * ids_data, int k, float * outdata) {
    struct ggml_context * ctx;
    struct ggml_tensor * x;
    struct ggml_tensor * ids;
    struct ggml_tensor * out;
    struct ggml_cgraph * gf = build_graph(e, n, k, &ctx, &x, &ids, &out);
    if (gf == NULL) {
        return 2;
    }
    int rc = 0;
    if (!exec_alloc(&e->x, gf)) {
        rc = 3;
        goto done;
    }
    ggml_backend_tensor_set(x, xdata, 0, ggml_nbytes(x));
    if (ids) ggml_backend_tensor_set(ids, ids_data, 0, ggml_nbytes(ids));
    if (exec_compute(&e->x, gf) != 0) {
        rc = 4;
        goto done;
    }
    ggml_backend_tensor_get(out, outdata, 0, ggml_nbytes(out));
done:
    ggml_free(ctx);
    return rc;
}

int neuro_expert_compute(neuro_expert * e, const float * xdata, int n, float * outdata) {
    if (n < 1 || n > e->max_batch || e->zeros == NULL) {
        return 1;
    }
    return run_expert(e, xdata, n, e->zeros, 1, outdata);
}

int neuro_stack_compute(neuro_expert * e, const float * xdata, int n, const int32_t * ids_data, int k, float * outdata) {
    if (n < 1 || n > e->max_batch || k < 1 || k > e->k_max || e->dense) {
        return 1;
    }
    for (int i = 0; i < n * k; i++) {
        if (ids_data[i] < 0 || ids_data[i] >= e->n_exp) {
            return 1;
        }
    }
    return run_expert(e, xdata, n, ids_data, k, outdata);
}

struct neuro_group {
    neuro_exec x;
    size_t meta_size;
    void * meta;
    int last_threads;              // of the last compute, for the tests
    struct ggml_threadpool * own; // a lane's own threadpool (neuro_lanes), or NULL: the process's (neuro_pool)
};

neuro_group * neuro_group_new(int n_threads, char * err, size_t err_len) {
    neuro_group * g = calloc(1, sizeof(*g));
    if (g == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    if (!exec_init(&g->x, -1, n_threads, EXPERT_MAX_NODES, err, err_len)) {
        free(g);
        return NULL;
    }
    return g;
}

int neuro_group_last_threads(const neuro_group * g) {
    return g == NULL ? 0 : g->last_threads;
}

int neuro_group_pool_threads(const neuro_group * g) {
    return g == NULL ? 0 : g->x.pool_threads;
}

void neuro_group_free(neuro_group * g) {
    if (g == NULL) {
        return;
    }
    exec_free(&g->x);
    if (g->own) ggml_threadpool_free(g->own);
    free(g->meta);
    free(g);
}

static neuro_group * group_new_own(int n_threads, char * err, size_t err_len) {
    neuro_group * g = neuro_group_new(n_threads, err, err_len);
    if (g == NULL) {
        return NULL;
    }
    g->own = new_threadpool(n_threads);
    if (g->own == NULL) {
        snprintf(err, err_len, "ggml threadpool of %d threads failed", n_threads);
        neuro_group_free(g);
        return NULL;
    }
    exec_own_pool(&g->x, g->own, n_threads);
    return g;
}

// A lane's share of a compute: its members' experts, rows and outputs
// (views of the caller's arrays).
struct lane_job {
    neuro_expert * const * es;
    const float * const * x;
    const int * n;
    float * const * out;
    int count;
    int rc;
};

struct neuro_lanes {
    int lanes, n_threads;
    int poll_us;      // how long a finished lane polls before it sleeps
    neuro_group ** g; // lane i's group, with its own threadpool
    pthread_t * th;   // lane i > 0's thread (th[0] unused: the caller's)
    struct lane_job * jobs;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long gen; // bumped for each compute, under mu (read atomically by polling)
    int pending;       // workers still computing, under mu (read atomically by polling)
    int stop;          // set under mu (read atomically by polling)
};

struct lane_arg {
    neuro_lanes * l;
    int i;
};

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

// no_next: no compute after seen has started, and the lanes go on.
static int no_next(const neuro_lanes * l, unsigned long seen) {
    return __atomic_load_n(&l->gen, __ATOMIC_ACQUIRE) == seen && !__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE);
}

// shares_left: another lane still computes its share.
static int shares_left(const neuro_lanes * l, unsigned long unused) {
    (void) unused;
    return __atomic_load_n(&l->pending, __ATOMIC_ACQUIRE) > 0;
}

// poll spins while waiting(l, arg) holds, at most l->poll_us, yielding
// the core to any thread that wants it.
static void poll(neuro_lanes * l, int (*waiting)(const neuro_lanes *, unsigned long), unsigned long arg) {
    if (l->poll_us <= 0) {
        return;
    }
    int64_t until = now_us() + l->poll_us;
    while (waiting(l, arg) && now_us() < until) {
        sched_yield();
    }
}

// The wait poller (neuro.h). until is the end of the poll (monotonic us;
// 0: none), read by the thread without the lock.
static struct {
    pthread_once_t once;
    int ok;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int64_t until;
    int sleeping; // under mu
    long rounds;
} waitpoll = { PTHREAD_ONCE_INIT, 0, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0 };

static void * waitpoll_main(void * p) {
    (void) p;
    prctl(PR_SET_NAME, "neuro-waitpoll", 0, 0, 0);
    for (;;) {
        pthread_mutex_lock(&waitpoll.mu);
        while (now_us() >= __atomic_load_n(&waitpoll.until, __ATOMIC_ACQUIRE)) {
            waitpoll.sleeping = 1;
            pthread_cond_wait(&waitpoll.wake, &waitpoll.mu);
            waitpoll.sleeping = 0;
        }
        pthread_mutex_unlock(&waitpoll.mu);
        __atomic_add_fetch(&waitpoll.rounds, 1, __ATOMIC_RELAXED);
        while (now_us() < __atomic_load_n(&waitpoll.until, __ATOMIC_ACQUIRE)) {
            sched_yield();
        }
    }
    return NULL;
}

static void waitpoll_start(void) {
    pthread_attr_t a;
    pthread_t t;
    if (pthread_attr_init(&a) != 0) {
        return;
    }
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    waitpoll.ok = pthread_create(&t, &a, waitpoll_main, NULL) == 0;
    pthread_attr_destroy(&a);
}

void neuro_poll_for(int us) {
    if (us <= 0) {
        return;
    }
    pthread_once(&waitpoll.once, waitpoll_start);
    if (!waitpoll.ok) {
        return;
    }
    __atomic_store_n(&waitpoll.until, now_us() + us, __ATOMIC_RELEASE);
    pthread_mutex_lock(&waitpoll.mu);
    if (waitpoll.sleeping) {
        pthread_cond_signal(&waitpoll.wake);
    }
    pthread_mutex_unlock(&waitpoll.mu);
}

void neuro_poll_stop(void) {
    __atomic_store_n(&waitpoll.until, 0, __ATOMIC_RELEASE);
}

long neuro_poll_rounds(void) {
    return __atomic_load_n(&waitpoll.rounds, __ATOMIC_RELAXED);
}

static void lane_run(neuro_lanes * l, int i) {
    struct lane_job * j = &l->jobs[i];
    j->rc = j->count == 0 ? 0 : neuro_group_compute(l->g[i], j->es, j->count, j->x, j->n, j->out, l->n_threads);
}

static void * lane_main(void * p) {
    struct lane_arg a = *(struct lane_arg *) p;
    free(p);
    neuro_lanes * l = a.l;
    unsigned long seen = 0;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        if (l->gen == seen && !l->stop && l->poll_us > 0) {
            // The next compute usually comes before the poll ends: no
            // wake from sleep.
            pthread_mutex_unlock(&l->mu);
            poll(l, no_next, seen);
            pthread_mutex_lock(&l->mu);
        }
        while (l->gen == seen && !l->stop) {
            pthread_cond_wait(&l->start, &l->mu);
        }
        if (l->stop) {
            break;
        }
        seen = l->gen;
        pthread_mutex_unlock(&l->mu);
        lane_run(l, a.i);
        pthread_mutex_lock(&l->mu);
        if (__atomic_sub_fetch(&l->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_cond_signal(&l->done);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

neuro_lanes * neuro_lanes_new(int lanes, int n_threads, int poll_us, char * err, size_t err_len) {
    if (lanes < 2 || n_threads < 1 || poll_us < 0) {
        snprintf(err, err_len, "lanes: %d lanes of %d threads polling %d us", lanes, n_threads, poll_us);
        return NULL;
    }
    neuro_lanes * l = calloc(1, sizeof(*l));
    if (l == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    l->lanes = lanes;
    l->n_threads = n_threads;
    l->poll_us = poll_us;
    l->g = calloc((size_t) lanes, sizeof(*l->g));
    l->th = calloc((size_t) lanes, sizeof(*l->th));
    l->jobs = calloc((size_t) lanes, sizeof(*l->jobs));
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->start, NULL);
    pthread_cond_init(&l->done, NULL);
    if (l->g == NULL || l->th == NULL || l->jobs == NULL) {
        snprintf(err, err_len, "out of memory");
        neuro_lanes_free(l);
        return NULL;
    }
    for (int i = 0; i < lanes; i++) {
        if ((l->g[i] = group_new_own(n_threads, err, err_len)) == NULL) {
            neuro_lanes_free(l);
            return NULL;
        }
    }
    for (int i = 1; i < lanes; i++) {
        struct lane_arg * a = malloc(sizeof(*a));
        if (a == NULL) {
            snprintf(err, err_len, "out of memory");
            neuro_lanes_free(l);
            return NULL;
        }
        a->l = l;
        a->i = i;
        int rc = pthread_create(&l->th[i], NULL, lane_main, a);
        if (rc != 0) {
            free(a);
            l->th[i] = 0;
            snprintf(err, err_len, "lane thread: error %d", rc);
            neuro_lanes_free(l);
            return NULL;
        }
    }
    return l;
}

int neuro_lanes_compute(neuro_lanes * l, neuro_expert * const * es, const float * const * xdata, const int * n,
                        float * const * outdata, const int * start) {
    for (int i = 0; i < l->lanes; i++) {
        if (start[i] < 0 || start[i + 1] < start[i]) {
            return 1;
        }
    }
    if (start[l->lanes] < 1) {
        return 1;
    }
    for (int i = 0; i < l->lanes; i++) {
        int s = start[i];
        l->jobs[i] = (struct lane_job) { es + s, xdata + s, n + s, outdata + s, start[i + 1] - s, 0 };
    }
    pthread_mutex_lock(&l->mu);
    __atomic_store_n(&l->pending, l->lanes - 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&l->gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&l->start);
    pthread_mutex_unlock(&l->mu);
    lane_run(l, 0);
    // The other lanes' shares end about when this one does.
    poll(l, shares_left, 0);
    pthread_mutex_lock(&l->mu);
    while (l->pending > 0) {
        pthread_cond_wait(&l->done, &l->mu);
    }
    pthread_mutex_unlock(&l->mu);
    int rc = 0;
    for (int i = 0; i < l->lanes && rc == 0; i++) {
        rc = l->jobs[i].rc;
    }
    return rc;
}

void neuro_lanes_free(neuro_lanes * l) {
    if (l == NULL) {
        return;
    }
    if (l->th != NULL) {
        pthread_mutex_lock(&l->mu);
        __atomic_store_n(&l->stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&l->start);
        pthread_mutex_unlock(&l->mu);
        for (int i = 1; i < l->lanes; i++) {
            if (l->th[i]) pthread_join(l->th[i], NULL);
        }
    }
    if (l->g != NULL) {
        for (int i = 0; i < l->lanes; i++) {
            neuro_group_free(l->g[i]);
        }
    }
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->start);
    pthread_cond_destroy(&l->done);
    free(l->g);
    free(l->th);
    free(l->jobs);
    free(l);
}

int neuro_group_compute(neuro_group * g, neuro_expert * const * es, int count, const float * const * xdata, const int * n,
                        float * const * outdata, int n_threads) {
    if (count < 1 || n_threads < 1) {
        return 1;
    }
    for (int i = 0; i < count; i++) {
        neuro_expert * e = es[i];
        // experts of one (not stacks), on the CPU, whose ids are all 0
        if (e == NULL || e->n_exp != 1 || e->zeros == NULL || n[i] < 1 || n[i] > e->max_batch || e->x.sched != NULL) {
            return 1;
        }
    }
    size_t nodes = (size_t) count * EXPERT_MAX_NODES;
    size_t need = nodes * ggml_tensor_overhead() + ggml_graph_overhead_custom(nodes, false);
    if (need > g->meta_size) {
        void * m = realloc(g->meta, need);
        if (m == NULL) {
            return 2;
        }
        g->meta = m;
        g->meta_size = need;
    }
    struct ggml_init_params p = { g->meta_size, g->meta, true };
    struct ggml_context * ctx = ggml_init(p);
    if (ctx == NULL) {
        return 2;
    }
    struct ggml_tensor ** t = calloc((size_t) count * 3, sizeof(*t)); // x, ids, out of each
    if (t == NULL) {
        ggml_free(ctx);
        return 2;
    }
    struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, nodes, false);
    for (int i = 0; i < count; i++) {
        build_expert(ctx, gf, es[i], n[i], 1, &t[3 * i], &t[3 * i + 1], &t[3 * i + 2]);
    }
    int rc = 0;
    if (!exec_alloc(&g->x, gf)) {
        rc = 3;
        goto done;
    }
    for (int i = 0; i < count; i++) {
        ggml_backend_tensor_set(t[3 * i], xdata[i], 0, ggml_nbytes(t[3 * i]));
        if (t[3 * i + 1]) ggml_backend_tensor_set(t[3 * i + 1], es[i]->zeros, 0, ggml_nbytes(t[3 * i + 1]));
    }
    if (!exec_set_threads(&g->x, n_threads)) {
        rc = 4;
        goto done;
    }
    g->last_threads = n_threads;
    if (exec_compute(&g->x, gf) != 0) {
        rc = 4;
        goto done;
    }
    for (int i = 0; i < count; i++) {
        ggml_backend_tensor_get(t[3 * i + 2], outdata[i], 0, ggml_nbytes(t[3 * i + 2]));
    }
done:
    free(t);
    ggml_free(ctx);
    return rc;
}
