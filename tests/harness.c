/* harness.c - see harness.h. */
#include "harness.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail;

static int record(int ok) {
    if (ok)
        n_pass++;
    else
        n_fail++;
    return ok;
}

int ef_check_err(const char *name, double err, double tol) {
    int ok = err <= tol; /* NaN compares false: fails */
    printf("%s  %-60s err %.3e  tol %.1e\n", ok ? "PASS" : "FAIL", name, err, tol);
    return record(ok);
}

int ef_check(const char *name, int cond, const char *fmt, ...) {
    char buf[512] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
    }
    printf("%s  %-60s %s\n", cond ? "PASS" : "FAIL", name, buf);
    return record(cond);
}

int ef_check_status(const char *name, ef_status got, ef_status want) {
    const char *msg = ef_last_error();
    int ok = got == want && (got == EF_OK || (msg && msg[0]));
    printf("%s  %-60s %s (want %s)%s%s\n", ok ? "PASS" : "FAIL", name, ef_status_str(got),
           ef_status_str(want), got != EF_OK ? ": " : "", got != EF_OK ? msg : "");
    return record(ok);
}

int ef_test_finish(void) {
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

double ef_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d) return INFINITY;
        if (d > m) m = d;
    }
    return m;
}

double ef_max_rel_diff(const float *a, const float *b, size_t n) {
    double scale = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)b[i]));
    /* floor: a reference that is exactly zero (dq and dk when a row sees a single key: P = 1 and
     * dS = P (dP - delta) cancels exactly in double, to ~1e-7 in fp32) is compared absolutely at
     * the 1e-2 scale rather than divided by zero; test inputs and gradients are O(0.1..1) */
    return ef_max_abs_diff(a, b, n) / fmax(scale, 1e-2);
}

float *ef_test_randn(size_t n, uint64_t seed, float sigma) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    ef_rng_normal(seed, 0, 0, n, p);
    for (size_t i = 0; i < n; i++) p[i] *= sigma;
    return p;
}

float *ef_test_zeros(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

void ef_test_inputs(ef_test_bufs *b, ef_attn_shape s, uint64_t seed, float sigma) {
    memset(b, 0, sizeof *b);
    b->s = s;
    size_t bh = (size_t)s.batch * s.heads;
    b->nq = bh * s.q_len * s.head_dim, b->nk = bh * s.kv_len * s.head_dim;
    b->nv = bh * s.kv_len * s.v_dim, b->no = bh * s.q_len * s.v_dim;
    b->q = ef_test_randn(b->nq, seed, sigma);
    b->k = ef_test_randn(b->nk, seed + 1, sigma);
    b->v = ef_test_randn(b->nv, seed + 2, 1.0f);
    b->g = ef_test_randn(b->no, seed + 3, 1.0f);
}

void ef_test_free_inputs(ef_test_bufs *b) { free(b->q), free(b->k), free(b->v), free(b->g); }

void ef_test_outputs(ef_test_bufs *o, const ef_test_bufs *in) {
    memset(o, 0, sizeof *o);
    o->out = ef_test_zeros(in->no), o->dq = ef_test_zeros(in->nq);
    o->dk = ef_test_zeros(in->nk), o->dv = ef_test_zeros(in->nv);
}

void ef_test_free_outputs(ef_test_bufs *o) {
    free(o->out), free(o->dq), free(o->dk), free(o->dv), ef_free(o->saved);
    o->out = o->dq = o->dk = o->dv = NULL, o->saved = NULL;
}

ef_status ef_test_run_plan(ef_attn *a, const ef_test_bufs *in, const int32_t *kv_lens,
                           ef_test_bufs *o, int backward) {
    return ef_test_run_plan_lens(a, in, kv_lens, NULL, o, backward);
}

ef_status ef_test_run_lens(const char *spec, const ef_test_bufs *in, const int32_t *kv_lens,
                           const int32_t *q_lens, ef_test_bufs *o) {
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    if (!st) st = ef_test_run_plan_lens(a, in, kv_lens, q_lens, o, 1);
    ef_attn_free(a);
    return st;
}

ef_status ef_test_run_plan_lens(ef_attn *a, const ef_test_bufs *in, const int32_t *kv_lens,
                                const int32_t *q_lens, ef_test_bufs *o, int backward) {
    ef_free(o->saved);
    o->saved = ef_test_saved(a);
    ef_attn_io io = {in->q, in->k, in->v, kv_lens, o->out, q_lens};
    ef_status st = ef_attn_forward(a, &io, backward ? o->saved : NULL);
    if (!st && backward) st = ef_attn_backward(a, &io, o->saved, in->g, o->dq, o->dk, o->dv);
    return st;
}

ef_status ef_test_run(const char *spec, const ef_test_bufs *in, const int32_t *kv_lens,
                      ef_test_bufs *o) {
    return ef_test_run_lens(spec, in, kv_lens, NULL, o);
}

void ef_test_spoil_rows(float *x, ef_attn_shape s, int rows, int w, const int32_t *lens, int mode,
                        uint64_t seed) {
    float *r = ef_test_randn((size_t)rows * w, seed, 3.0f);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int i = lens[b]; i < rows; i++)
                for (int t = 0; t < w; t++) {
                    float val = mode == 0   ? r[(size_t)i * w + t]
                                : mode == 1 ? NAN
                                : mode == 2 ? INFINITY
                                            : -INFINITY;
                    x[(((size_t)b * s.heads + h) * rows + i) * w + t] = val;
                }
    free(r);
}

double ef_test_padded_max(const float *x, ef_attn_shape s, int rows, int w, const int32_t *lens) {
    double m = 0;
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int i = lens[b]; i < rows; i++)
                for (int t = 0; t < w; t++) {
                    float v = x[(((size_t)b * s.heads + h) * rows + i) * w + t];
                    if (v != v) return INFINITY;
                    m = fmax(m, fabs(v));
                }
    return m;
}

void *ef_test_saved(const ef_attn *a) {
    size_t sb = ef_attn_saved_bytes(a);
    void *p = ef_malloc(sb > 64 ? sb : 64);
    if (!p) {
        fprintf(stderr, "out of memory for %zu saved bytes\n", sb);
        exit(2);
    }
    return p;
}

int ef_test_any_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 1;
    return 0;
}

unsigned char *ef_test_read_file(const char *path, size_t *n) {
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = sz >= 0 ? malloc((size_t)sz + 1) : NULL;
    if (b && fread(b, 1, (size_t)sz, f) != (size_t)sz) free(b), b = NULL;
    fclose(f);
    if (!b) return NULL;
    b[sz] = 0;
    *n = (size_t)sz;
    return b;
}

int ef_test_write_file(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(b, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}
