// Devices: loading ggml's GPU backends at run time, listing what they see,
// and running graphs on the chosen one (exec.h).
#include "exec.h"
#include "neuro.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-cpu.h"

int neuro_backend_load(const char * path, char * err, size_t err_len) {
    ggml_backend_reg_t reg = ggml_backend_load(path);
    if (reg == NULL) {
        snprintf(err, err_len, "ggml could not load %s (see the log above for why)", path);
        return 1;
    }
    return 0;
}

int neuro_device_count(void) {
    return (int) ggml_backend_dev_count();
}

int neuro_device_info(int i, neuro_device * out) {
    if (i < 0 || (size_t) i >= ggml_backend_dev_count()) {
        return 1;
    }
    ggml_backend_dev_t d = ggml_backend_dev_get(i);
    struct ggml_backend_dev_props p;
    memset(&p, 0, sizeof(p));
    ggml_backend_dev_get_props(d, &p);
    memset(out, 0, sizeof(*out));
    snprintf(out->name, sizeof(out->name), "%s", p.name ? p.name : "");
    snprintf(out->description, sizeof(out->description), "%s", p.description ? p.description : "");
    snprintf(out->backend, sizeof(out->backend), "%s", ggml_backend_reg_name(ggml_backend_dev_backend_reg(d)));
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(d, &free, &total);
    out->memory_free = free;
    out->memory_total = total;
    out->type = (int) p.type;
    return 0;
}

bool exec_init(neuro_exec * x, int dev, int n_threads, size_t graph_size, char * err, size_t err_len) {
    memset(x, 0, sizeof(*x));
    ggml_backend_dev_t d = NULL;
    if (dev >= 0) {
        if ((size_t) dev >= ggml_backend_dev_count()) {
            snprintf(err, err_len, "no ggml device %d", dev);
            return false;
        }
        d = ggml_backend_dev_get(dev);
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            d = NULL;
        }
    }
    x->cpu = ggml_backend_cpu_init();
    if (x->cpu == NULL || !exec_set_threads(x, n_threads)) {
        snprintf(err, err_len, "ggml CPU backend init failed");
        exec_free(x);
        return false;
    }
    if (d == NULL) {
        x->backend = x->cpu;
        x->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(x->cpu));
        if (x->galloc == NULL) {
            snprintf(err, err_len, "out of memory");
            exec_free(x);
            return false;
        }
        return true;
    }
    x->backend = ggml_backend_dev_init(d, NULL);
    if (x->backend == NULL) {
        snprintf(err, err_len, "%s (%s): the device did not start", ggml_backend_dev_name(d),
                 ggml_backend_dev_description(d));
        exec_free(x);
        return false;
    }
    ggml_backend_t backends[2] = { x->backend, x->cpu };
    x->sched = ggml_backend_sched_new(backends, NULL, 2, graph_size, false, false);
    if (x->sched == NULL) {
        snprintf(err, err_len, "ggml scheduler for %s failed", ggml_backend_dev_name(d));
        exec_free(x);
        return false;
    }
    return true;
}

void exec_free(neuro_exec * x) {
    if (x->sched) ggml_backend_sched_free(x->sched);
    if (x->galloc) ggml_gallocr_free(x->galloc);
    if (x->backend && x->backend != x->cpu) ggml_backend_free(x->backend);
    if (x->cpu) ggml_backend_free(x->cpu);
    memset(x, 0, sizeof(*x));
}

bool exec_reserve(neuro_exec * x, struct ggml_cgraph * gf) {
    if (x->sched) {
        bool ok = ggml_backend_sched_reserve(x->sched, gf);
        ggml_backend_sched_reset(x->sched);
        return ok;
    }
    return ggml_gallocr_reserve(x->galloc, gf);
}

bool exec_alloc(neuro_exec * x, struct ggml_cgraph * gf) {
    if (x->sched) {
        ggml_backend_sched_reset(x->sched);
        return ggml_backend_sched_alloc_graph(x->sched, gf);
    }
    return ggml_gallocr_alloc_graph(x->galloc, gf);
}

bool exec_set_threads(neuro_exec * x, int n_threads) {
    if (n_threads < 1) {
        n_threads = 1;
    }
    if (!x->own_pool) {
        struct ggml_threadpool * tp = neuro_pool(n_threads);
        if (tp == NULL) {
            return false;
        }
        if (tp != x->pool) {
            // ggml pauses the pool it leaves; the next graph on it resumes it
            ggml_backend_cpu_set_threadpool(x->cpu, tp);
            x->pool = tp;
            x->pool_threads = n_threads;
        }
    }
    ggml_backend_cpu_set_n_threads(x->cpu, n_threads);
    return true;
}

void exec_own_pool(neuro_exec * x, struct ggml_threadpool * tp, int n_threads) {
    ggml_backend_cpu_set_threadpool(x->cpu, tp);
    x->pool = tp;
    x->pool_threads = n_threads;
    x->own_pool = true;
}

int exec_compute(neuro_exec * x, struct ggml_cgraph * gf) {
    if (x->sched && getenv("NEURO_DEBUG_SCHED")) {
        for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
            struct ggml_tensor * n = ggml_graph_node(gf, i);
            ggml_backend_t b = ggml_backend_sched_get_tensor_backend(x->sched, n);
            fprintf(stderr, "node %s %s on %s\n", ggml_op_desc(n), n->name, b ? ggml_backend_name(b) : "?");
        }
    }
    enum ggml_status st = x->sched ? ggml_backend_sched_graph_compute(x->sched, gf)
                                   : ggml_backend_graph_compute(x->backend, gf);
    return st == GGML_STATUS_SUCCESS ? 0 : 4;
}
