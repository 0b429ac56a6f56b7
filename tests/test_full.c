/*
 * test_full.c - `full`, the reference, against an independent double-precision computation:
 * the forward against attention evaluated in double, the backward against central finite
 * differences of that double-precision forward (every input element, small shapes).
 *
 * Tolerances: `full` runs in fp32 with sums of at most 9 terms here, so its forward carries
 * relative errors of a few 2^-24 ~ 1e-7; we accept 2e-6 relative to the largest output. The
 * finite differences are taken in double with h = 1e-4 (truncation ~h^2 = 1e-8, round-off
 * ~1e-16/h = 1e-12), so they measure full's fp32 gradient error: accept 1e-5 relative to the
 * largest gradient (the backward subtracts nearly equal terms, dP - delta, losing a digit).
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cfg {
    ef_attn_shape s;
    int causal;
    double scale; /* 0 = 1/sqrt(D) */
    const int32_t *kv_lens;
} cfg;

/* loss = sum(g * attention(q, k, v)) in double. */
static double loss_double(const cfg *c, const double *q, const double *k, const double *v,
                          const double *g, double *out /* may be NULL */) {
    const ef_attn_shape *s = &c->s;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim;
    double scale = c->scale > 0 ? c->scale : 1.0 / sqrt((double)d);
    double loss = 0;
    double *w = malloc(sizeof(double) * m);
    for (int b = 0; b < s->batch; b++) {
        int valid = c->kv_lens ? c->kv_lens[b] : m;
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            for (int i = 0; i < n; i++) {
                int lim = c->causal ? (valid < i + 1 ? valid : i + 1) : valid;
                double mx = -INFINITY;
                for (int j = 0; j < lim; j++) {
                    double dot = 0;
                    for (int t = 0; t < d; t++)
                        dot += q[(bh * n + i) * d + t] * k[(bh * m + j) * d + t];
                    w[j] = dot * scale;
                    if (w[j] > mx) mx = w[j];
                }
                double sum = 0;
                for (int j = 0; j < lim; j++) sum += w[j] = exp(w[j] - mx);
                for (int t = 0; t < e; t++) {
                    double o = 0;
                    for (int j = 0; j < lim; j++) o += w[j] / sum * v[(bh * m + j) * e + t];
                    if (out) out[(bh * n + i) * e + t] = o;
                    loss += o * g[(bh * n + i) * e + t];
                }
            }
        }
    }
    free(w);
    return loss;
}

static double *to_double(const float *x, size_t n) {
    double *y = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

static double max_rel_vs_double(const float *a, const double *ref, size_t n) {
    double scale = 0, err = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(ref[i]));
    for (size_t i = 0; i < n; i++) {
        double dlt = fabs(a[i] - ref[i]);
        if (dlt != dlt) return INFINITY;
        err = fmax(err, dlt);
    }
    return scale > 0 ? err / scale : err;
}

static void check_cfg(const char *label, cfg c) {
    const ef_attn_shape *s = &c.s;
    size_t bh = (size_t)s->batch * s->heads;
    size_t nq = bh * s->q_len * s->head_dim, nk = bh * s->kv_len * s->head_dim;
    size_t nv = bh * s->kv_len * s->v_dim, no = bh * s->q_len * s->v_dim;
    float *q = ef_test_randn(nq, 1, 1.0f), *k = ef_test_randn(nk, 2, 1.0f);
    float *v = ef_test_randn(nv, 3, 1.0f), *g = ef_test_randn(no, 4, 1.0f);
    float *out = ef_test_zeros(no), *dq = ef_test_zeros(nq), *dk = ef_test_zeros(nk),
          *dv = ef_test_zeros(nv);
    char spec[128], name[200];
    if (c.scale > 0)
        snprintf(spec, sizeof spec, "full:causal=%d,scale=%.17g", c.causal, c.scale);
    else
        snprintf(spec, sizeof spec, "full:causal=%d", c.causal);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, s);
    void *saved = st ? NULL : ef_test_saved(a);
    ef_attn_io io = {q, k, v, c.kv_lens, out};
    if (!st) st = ef_attn_forward(a, &io, saved);
    if (!st) st = ef_attn_backward(a, &io, saved, g, dq, dk, dv);
    snprintf(name, sizeof name, "%s: full runs", label);
    if (ef_check_status(name, st, EF_OK)) {
        double *qd = to_double(q, nq), *kd = to_double(k, nk), *vd = to_double(v, nv),
               *gd = to_double(g, no);
        double *od = malloc(sizeof(double) * no);
        loss_double(&c, qd, kd, vd, gd, od);
        snprintf(name, sizeof name, "%s: forward vs double", label);
        ef_check_err(name, max_rel_vs_double(out, od, no), 2e-6);
        const double h = 1e-4;
        struct {
            const char *nm;
            double *x;
            size_t n;
            const float *grad;
        } t[3] = {{"dq", qd, nq, dq}, {"dk", kd, nk, dk}, {"dv", vd, nv, dv}};
        for (int w = 0; w < 3; w++) {
            double *fd = malloc(sizeof(double) * t[w].n);
            for (size_t i = 0; i < t[w].n; i++) {
                double x0 = t[w].x[i];
                t[w].x[i] = x0 + h;
                double lp = loss_double(&c, qd, kd, vd, gd, NULL);
                t[w].x[i] = x0 - h;
                double lm = loss_double(&c, qd, kd, vd, gd, NULL);
                t[w].x[i] = x0;
                fd[i] = (lp - lm) / (2 * h);
            }
            snprintf(name, sizeof name, "%s: %s vs finite differences (double)", label, t[w].nm);
            ef_check_err(name, max_rel_vs_double(t[w].grad, fd, t[w].n), 1e-5);
            free(fd);
        }
        free(qd), free(kd), free(vd), free(gd), free(od);
    }
    ef_attn_free(a);
    ef_free(saved), free(q), free(k), free(v), free(g), free(out), free(dq), free(dk), free(dv);
}

int main(void) {
    int32_t lens[2] = {3, 0}; /* a partly and a fully padded sequence */
    int32_t lens2[2] = {6, 2};
    cfg cases[] = {
        {{1, 1, 1, 1, 1, 1}, 0, 0, NULL},
        {{2, 2, 5, 7, 3, 4}, 0, 0, NULL},
        {{2, 2, 5, 7, 3, 4}, 1, 0, NULL},
        {{1, 2, 8, 5, 4, 2}, 1, 0, NULL},   /* q_len > kv_len, causal */
        {{2, 1, 6, 7, 5, 3}, 0, 0.7, lens}, /* custom scale, padding, an empty sequence */
        {{2, 1, 6, 7, 5, 3}, 1, 0, lens2},  /* causal and padding */
        {{1, 1, 9, 9, 2, 2}, 0, 3.0, NULL}, /* peaked softmax */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char label[128];
        const ef_attn_shape *s = &cases[i].s;
        snprintf(label, sizeof label, "B%d H%d N%d M%d D%d E%d causal=%d scale=%g%s", s->batch,
                 s->heads, s->q_len, s->kv_len, s->head_dim, s->v_dim, cases[i].causal,
                 cases[i].scale, cases[i].kv_lens ? " padded" : "");
        check_cfg(label, cases[i]);
    }
    return ef_test_finish();
}
