/*
 * test_props.c - the attention contract of include/eformer.h, checked for every registered
 * mechanism through the public API only: no header from src/, no code shared with a mechanism.
 * The mechanisms come from the registry (ef_attn_count / ef_attn_name / ef_attn_get_caps), so
 * a new mechanism is covered by registering it; OPTS below only makes the approximations'
 * structure (chunks, clusters, landmarks, blocks) appear at the small sizes used here.
 *
 * For every mechanism, option set, causal in {0, 1 when caps.causal or the plan accepts it},
 * ref in {0, 1}, and a self-attention shape (plus a q_len != kv_len shape when caps.cross or the
 * plan accepts it); batch 0 is never padded, batch 1 carries the padding:
 *   a. causality (causal=1): the future (q, k, v at positions >= t, dout of rows >= t zeroed)
 *      redrawn: outputs and dq, dk, dv of rows < t (and parameter gradients) bitwise unchanged;
 *      dq of rows >= t and dk, dv of keys >= t exactly 0;
 *   b. key padding: padded k, v rows redrawn / NaN / +Inf: every result bitwise unchanged, dk, dv
 *      of padded keys exactly 0, nothing non-finite;
 *   c. query padding: padded q and dout rows redrawn / NaN / +Inf: valid results bitwise
 *      unchanged, padded output rows and their dq exactly 0; both paddings at once; a sequence
 *      with kv_lens = 0 or q_lens = 0 gives zeros there and no NaN anywhere;
 *   d. determinism: rerun on one plan, on two plans, 1 vs 2 and 1 vs 4 threads (a plan made
 *      for 4): bitwise equal;
 *   e. directional finite differences of f = <dout, out> for q, k, v and learned parameters,
 *      unpadded and padded; parameter gradients accumulate;
 *   f. `saved`: forward writes every byte of it, backward does not depend on stale content,
 *      a misaligned buffer is refused by forward and backward;
 *   g. caps: causal (refused with a message when 0), cross, decode (the steps reproduce the
 *      causal forward), params agree with what the plans do; caps.exact: fast and reference
 *      paths equal a double-precision dense softmax over ef_attn_visible and the paddings,
 *      outputs and gradients; ef_attn_visible_pairs agrees with ef_attn_visible.
 * Every output buffer is filled with NaN before each call, so a value the library does not
 * write shows up as non-finite (the header says dq, dk, dv and out are overwritten).
 *
 * "Bitwise" comparisons compare bit patterns, except that +0 and -0 count as equal (the sign
 * of an exact zero is not a result anyone reads).
 *
 * Usage: test_props [mechanism ...]   (no argument: every registered mechanism)
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "eformer.h"
#include "harness.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { NB = 2, NH = 2 }; /* batch 0 is never padded; batch 1 carries the padding */

/* Options per mechanism, chosen so that the approximation's structure exists at N ~ 150-240:
 * several LSH chunks and buckets, several clusters with top-k smaller than the keys, fewer
 * landmarks / projected rows / features than positions, several blocks and windows smaller
 * than the sequence. A mechanism may appear more than once (each option set is tested); a
 * mechanism not listed runs with its defaults. */
static const struct {
    const char *name, *opts;
} OPTS[] = {
    {"local", "window=32"},
    {"blocklocal", "block=16"},
    {"strided", "block=16"},
    {"fixed", "block=16,summary=4"},
    {"longformer", "window=32"},
    {"bigbird", "block=16"},
    {"bigbird-etc", "block=16,extra=5"},
    {"performer", "features=32"},
    {"performer", "features=32,eps=0.01"}, /* eps > 0: the stabilising shifts must still be exact */
    {"linformer", "k=16"},
    {"nystrom", "landmarks=8"},
    {"clustered", "clusters=8"},
    {"iclustered", "clusters=8,topk=16"},
    {"lsh", "chunk=16"},
};
enum { NOPTS = (int)(sizeof OPTS / sizeof OPTS[0]) };

/* the idx-th option set of `name` ("" = defaults when it has none listed), NULL past the end */
static const char *mech_opts(const char *name, int idx) {
    int seen = 0;
    for (int i = 0; i < NOPTS; i++)
        if (!strcmp(OPTS[i].name, name) && seen++ == idx) return OPTS[i].opts;
    return !seen && idx == 0 ? "" : NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Problems and results
 * ------------------------------------------------------------------------------------------- */
typedef struct prob {
    ef_attn_shape s;
    size_t nq, nk, nv, no;
    float *q, *k, *v, *g; /* g = dout */
    int32_t ql[NB], kl[NB];
    int has_ql, has_kl;
} prob;

typedef struct res {
    float *out, *dq, *dk, *dv, *dp; /* dp: the learned-parameter gradients of this run alone */
    size_t np;
} res;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static float *fdup(const float *x, size_t n) {
    float *p = xmalloc(n * sizeof *p);
    memcpy(p, x, n * sizeof *p);
    return p;
}

static void prob_new(prob *p, ef_attn_shape s, uint64_t seed) {
    memset(p, 0, sizeof *p);
    p->s = s;
    size_t bh = (size_t)s.batch * s.heads;
    p->nq = bh * s.q_len * s.head_dim, p->nk = bh * s.kv_len * s.head_dim;
    p->nv = bh * s.kv_len * s.v_dim, p->no = bh * s.q_len * s.v_dim;
    p->q = xmalloc(p->nq * sizeof(float)), p->k = xmalloc(p->nk * sizeof(float));
    p->v = xmalloc(p->nv * sizeof(float)), p->g = xmalloc(p->no * sizeof(float));
    /* Gaussian, sigma 1, from the library's counter-based generator */
    ef_rng_normal(seed, 1, 0, p->nq, p->q), ef_rng_normal(seed, 2, 0, p->nk, p->k);
    ef_rng_normal(seed, 3, 0, p->nv, p->v), ef_rng_normal(seed, 4, 0, p->no, p->g);
    for (int b = 0; b < NB; b++) p->ql[b] = s.q_len, p->kl[b] = s.kv_len;
}

static void prob_dup(prob *d, const prob *p) {
    *d = *p;
    d->q = fdup(p->q, p->nq), d->k = fdup(p->k, p->nk);
    d->v = fdup(p->v, p->nv), d->g = fdup(p->g, p->no);
}

static void prob_free(prob *p) { free(p->q), free(p->k), free(p->v), free(p->g); }

static void res_new(res *r, const prob *p, size_t np) {
    r->out = xmalloc(p->no * sizeof(float)), r->dq = xmalloc(p->nq * sizeof(float));
    r->dk = xmalloc(p->nk * sizeof(float)), r->dv = xmalloc(p->nv * sizeof(float));
    r->dp = xmalloc((np ? np : 1) * sizeof(float)), r->np = np;
}

static void res_free(res *r) { free(r->out), free(r->dq), free(r->dk), free(r->dv), free(r->dp); }

static void fill_nan(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

static ef_attn_io make_io(const prob *p, float *out) {
    ef_attn_io io = {p->q, p->k, p->v, p->has_kl ? p->kl : NULL, out, p->has_ql ? p->ql : NULL};
    return io;
}

/* Forward (saved filled with byte `fill` first) and backward of plan a on p into r. The
 * parameter gradients accumulate, so they are zeroed before backward and copied to r->dp.
 * saved_copy (ef_attn_saved_bytes bytes), when not NULL, receives saved as forward left it. */
static ef_status run(ef_attn *a, const prob *p, res *r, int fill, unsigned char *saved_copy) {
    size_t sb = ef_attn_saved_bytes(a), np = ef_attn_param_count(a);
    unsigned char *saved = ef_malloc(sb > 64 ? sb : 64);
    if (!saved) return EF_ERR_NOMEM;
    memset(saved, fill, sb > 64 ? sb : 64);
    fill_nan(r->out, p->no), fill_nan(r->dq, p->nq), fill_nan(r->dk, p->nk);
    fill_nan(r->dv, p->nv), fill_nan(r->dp, r->np ? r->np : 1);
    ef_attn_io io = make_io(p, r->out);
    ef_status st = ef_attn_forward(a, &io, saved);
    if (!st && saved_copy) memcpy(saved_copy, saved, sb);
    if (!st) {
        if (np) memset(ef_attn_param_grads(a), 0, np * sizeof(float));
        st = ef_attn_backward(a, &io, saved, p->g, r->dq, r->dk, r->dv);
        if (np && !st) memcpy(r->dp, ef_attn_param_grads(a), np * sizeof(float));
    }
    ef_free(saved);
    return st;
}

/* A failed call is a failed check (with the library's message); returns 1 when st is EF_OK. */
static int ran(const char *label, const char *prop, ef_status st) {
    if (st == EF_OK) return 1;
    char name[512];
    snprintf(name, sizeof name, "%s: %s", label, prop);
    ef_check(name, 0, "call failed: %s: %s", ef_status_str(st), ef_last_error());
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Row-wise comparisons. Tensors are [NB][NH][L][C]; a row selection is [lo[b], hi[b]) per batch.
 * ------------------------------------------------------------------------------------------- */
typedef struct dstat {
    size_t n, bad;  /* values looked at, values that failed */
    double maxd;    /* max |a - b| (or max |x| for zero checks); inf when NaN is involved */
    int fb, fh, fi; /* first failing (batch, head, row) */
} dstat;

static void ds_init(dstat *d) { memset(d, 0, sizeof *d), d->fb = d->fh = d->fi = -1; }

static int same_val(float x, float y) {
    uint32_t a, b;
    memcpy(&a, &x, 4), memcpy(&b, &y, 4);
    return x == y || a == b;
}

static void ds_bad(dstat *d, double m, int b, int h, int i) {
    if (!d->bad++) d->fb = b, d->fh = h, d->fi = i;
    if (!(m <= d->maxd)) d->maxd = m == m ? m : INFINITY;
}

/* rows of x and y in the selection that differ */
static void diff_rows(dstat *d, const float *x, const float *y, int L, int C, const int lo[NB],
                      const int hi[NB]) {
    for (int b = 0; b < NB; b++)
        for (int h = 0; h < NH; h++)
            for (int i = lo[b]; i < hi[b]; i++) {
                size_t o = (((size_t)b * NH + h) * L + i) * C;
                for (int c = 0; c < C; c++) {
                    d->n++;
                    if (!same_val(x[o + c], y[o + c]))
                        ds_bad(d, fabs((double)x[o + c] - y[o + c]), b, h, i);
                }
            }
}

static void diff_flat(dstat *d, const float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) {
        d->n++;
        if (!same_val(x[i], y[i])) ds_bad(d, fabs((double)x[i] - y[i]), -1, -1, (int)i);
    }
}

/* values in the selection that are not exactly zero (NaN included) */
static void nonzero_rows(dstat *d, const float *x, int L, int C, const int lo[NB],
                         const int hi[NB]) {
    for (int b = 0; b < NB; b++)
        for (int h = 0; h < NH; h++)
            for (int i = lo[b]; i < hi[b]; i++) {
                size_t o = (((size_t)b * NH + h) * L + i) * C;
                for (int c = 0; c < C; c++) {
                    d->n++;
                    if (x[o + c] != 0.0f) ds_bad(d, fabs((double)x[o + c]), b, h, i);
                }
            }
}

static size_t count_nonfinite(const float *x, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += !isfinite(x[i]);
    return c;
}

static void sel(int lo[NB], int hi[NB], int lo0, int hi0, int lo1, int hi1) {
    lo[0] = lo0, hi[0] = hi0, lo[1] = lo1, hi[1] = hi1;
}

/* "name 3/1234 differ (max 1.2e-03, first b=1 h=0 row 17); " appended to buf */
static void ds_describe(char *buf, size_t cap, const char *what, const dstat *d) {
    size_t len = strlen(buf);
    if (len >= cap) return;
    if (!d->bad)
        snprintf(buf + len, cap - len, "%s ok; ", what);
    else if (d->fb < 0)
        snprintf(buf + len, cap - len, "%s %zu/%zu (max %.2e, first [%d]); ", what, d->bad, d->n,
                 d->maxd, d->fi);
    else
        snprintf(buf + len, cap - len, "%s %zu/%zu (max %.2e, first b=%d h=%d row %d); ", what,
                 d->bad, d->n, d->maxd, d->fb, d->fh, d->fi);
}

static void check_named(const char *label, const char *prop, int ok, const char *detail) {
    char name[512];
    snprintf(name, sizeof name, "%s: %s", label, prop);
    ef_check(name, ok, "%s", detail);
}

/* nothing non-finite anywhere in r */
static void check_finite(const char *label, const char *prop, const prob *p, const res *r) {
    size_t a = count_nonfinite(r->out, p->no), b = count_nonfinite(r->dq, p->nq);
    size_t c = count_nonfinite(r->dk, p->nk), d = count_nonfinite(r->dv, p->nv);
    size_t e = r->np ? count_nonfinite(r->dp, r->np) : 0;
    char det[256];
    snprintf(det, sizeof det, "non-finite: out %zu, dq %zu, dk %zu, dv %zu, dparams %zu", a, b, c,
             d, e);
    check_named(label, prop, !(a + b + c + d + e), det);
}

/* ---------------------------------------------------------------------------------------------
 * Changing rows of a tensor: redraw (a new Gaussian draw), NaN, +Inf or zero
 * ------------------------------------------------------------------------------------------- */
enum { M_REDRAW, M_NAN, M_INF, M_ZERO };
static const char *const MODE_NAME[] = {"redrawn", "NaN", "+Inf", "zero"};

static void set_rows(float *x, int L, int C, int b, int i0, int i1, int mode, uint64_t seed) {
    for (int h = 0; h < NH; h++)
        for (int i = i0; i < i1; i++) {
            float *r = x + (((size_t)b * NH + h) * L + i) * C;
            if (mode == M_REDRAW)
                ef_rng_normal(seed, 1000 + (uint64_t)b * NH + h, (uint64_t)i * C, (size_t)C, r);
            else
                for (int c = 0; c < C; c++)
                    r[c] = mode == M_NAN ? NAN : mode == M_INF ? INFINITY : 0;
        }
}

/* ---------------------------------------------------------------------------------------------
 * a. causality
 * ------------------------------------------------------------------------------------------- */
static void test_causal(ef_attn *a, const char *label, const prob *base, size_t np) {
    const ef_attn_shape s = base->s;
    int N = s.q_len, M = s.kv_len, mn = N < M ? N : M;
    int t[NB]; /* odd positions in the middle, one per sequence */
    for (int b = 0; b < NB; b++) t[b] = (int)(mn * (0.35 + 0.25 * b)) | 1;
    prob A, F;
    prob_dup(&A, base);
    for (int b = 0; b < NB; b++) set_rows(A.g, N, s.v_dim, b, t[b], N, M_ZERO, 0);
    prob_dup(&F, &A);
    for (int b = 0; b < NB; b++) {
        set_rows(F.q, N, s.head_dim, b, t[b], N, M_REDRAW, 77);
        set_rows(F.k, M, s.head_dim, b, t[b], M, M_REDRAW, 78);
        set_rows(F.v, M, s.v_dim, b, t[b], M, M_REDRAW, 79);
    }
    res ra, rf;
    res_new(&ra, &A, np), res_new(&rf, &A, np);
    if (ran(label, "causality (original)", run(a, &A, &ra, 0, NULL)) &&
        ran(label, "causality (future redrawn)", run(a, &F, &rf, 0, NULL))) {
        int lo[NB], hi[NB];
        char det[512] = "";
        dstat d;
        sel(lo, hi, 0, t[0], 0, t[1]);
        ds_init(&d), diff_rows(&d, ra.out, rf.out, N, s.v_dim, lo, hi);
        snprintf(det, sizeof det, "t = %d, %d: ", t[0], t[1]);
        ds_describe(det, sizeof det, "out", &d);
        check_named(label, "causality: out rows < t unchanged when q, k, v >= t are redrawn",
                    !d.bad, det);

        dstat zq, zk, zv;
        ds_init(&zq), ds_init(&zk), ds_init(&zv);
        sel(lo, hi, t[0], N, t[1], N);
        nonzero_rows(&zq, ra.dq, N, s.head_dim, lo, hi);
        nonzero_rows(&zq, rf.dq, N, s.head_dim, lo, hi);
        sel(lo, hi, t[0], M, t[1], M);
        nonzero_rows(&zk, ra.dk, M, s.head_dim, lo, hi);
        nonzero_rows(&zk, rf.dk, M, s.head_dim, lo, hi);
        nonzero_rows(&zv, ra.dv, M, s.v_dim, lo, hi);
        nonzero_rows(&zv, rf.dv, M, s.v_dim, lo, hi);
        det[0] = 0;
        ds_describe(det, sizeof det, "dq", &zq);
        check_named(label, "causality: dq of rows >= t is 0 when dout rows >= t are 0", !zq.bad,
                    det);
        det[0] = 0;
        ds_describe(det, sizeof det, "dk", &zk), ds_describe(det, sizeof det, "dv", &zv);
        check_named(label, "causality: dk, dv of keys >= t are 0 when dout rows >= t are 0",
                    !zk.bad && !zv.bad, det);

        dstat gq, gk, gv, gp;
        ds_init(&gq), ds_init(&gk), ds_init(&gv), ds_init(&gp);
        sel(lo, hi, 0, t[0], 0, t[1]);
        diff_rows(&gq, ra.dq, rf.dq, N, s.head_dim, lo, hi);
        diff_rows(&gk, ra.dk, rf.dk, M, s.head_dim, lo, hi);
        diff_rows(&gv, ra.dv, rf.dv, M, s.v_dim, lo, hi);
        if (np) diff_flat(&gp, ra.dp, rf.dp, np);
        det[0] = 0;
        ds_describe(det, sizeof det, "dq", &gq), ds_describe(det, sizeof det, "dk", &gk);
        ds_describe(det, sizeof det, "dv", &gv);
        if (np) ds_describe(det, sizeof det, "dparams", &gp);
        check_named(label, "causality: gradients of rows < t unchanged when the future is redrawn",
                    !gq.bad && !gk.bad && !gv.bad && !gp.bad, det);
        check_finite(label, "causality: nothing non-finite", &F, &rf);
    }
    res_free(&ra), res_free(&rf);
    prob_free(&A), prob_free(&F);
}

/* ---------------------------------------------------------------------------------------------
 * b, c. padding: q_lens[1] = ql1 (< 0: no q_lens), kv_lens[1] = kl1 (< 0: no kv_lens); the
 * padded rows of batch 1 (q and dout rows >= ql1, k and v rows >= kl1) changed per mode
 * ------------------------------------------------------------------------------------------- */
static void test_padding(ef_attn *a, const char *label, const prob *base, size_t np, int ql1,
                         int kl1, const int *modes, int nmodes) {
    const ef_attn_shape s = base->s;
    int N = s.q_len, M = s.kv_len, D = s.head_dim, Dv = s.v_dim;
    prob P0;
    prob_dup(&P0, base);
    P0.has_ql = ql1 >= 0, P0.has_kl = kl1 >= 0;
    P0.ql[1] = ql1 >= 0 ? ql1 : N, P0.kl[1] = kl1 >= 0 ? kl1 : M;
    char what[128], prop[256];
    if (ql1 >= 0 && kl1 >= 0)
        snprintf(what, sizeof what, "q_lens={%d,%d} kv_lens={%d,%d}", N, ql1, M, kl1);
    else if (ql1 >= 0)
        snprintf(what, sizeof what, "q_lens={%d,%d}", N, ql1);
    else
        snprintf(what, sizeof what, "kv_lens={%d,%d}", M, kl1);
    res r0, r;
    res_new(&r0, &P0, np), res_new(&r, &P0, np);
    snprintf(prop, sizeof prop, "%s run", what);
    if (!ran(label, prop, run(a, &P0, &r0, 0, NULL))) goto done;
    int vq[NB] = {0, 0}, eq[NB] = {N, P0.ql[1]};   /* valid query rows */
    int vk[NB] = {0, 0}, ek[NB] = {M, P0.kl[1]};   /* valid keys */
    int pq0[NB] = {N, P0.ql[1]}, pq1[NB] = {N, N}; /* padded query rows */
    int pk0[NB] = {M, P0.kl[1]}, pk1[NB] = {M, M}; /* padded keys */
    for (int mi = -1; mi < nmodes; mi++) {
        int mode = mi < 0 ? -1 : modes[mi];
        const res *rr = &r0;
        prob P;
        if (mode >= 0) {
            prob_dup(&P, &P0);
            if (ql1 >= 0) {
                set_rows(P.q, N, D, 1, ql1, N, mode, 91);
                set_rows(P.g, N, Dv, 1, ql1, N, mode, 92);
            }
            if (kl1 >= 0) {
                set_rows(P.k, M, D, 1, kl1, M, mode, 93);
                set_rows(P.v, M, Dv, 1, kl1, M, mode, 94);
            }
            snprintf(prop, sizeof prop, "%s padded rows %s", what, MODE_NAME[mode]);
            int ok = ran(label, prop, run(a, &P, &r, 0, NULL));
            if (!ok) {
                prob_free(&P);
                continue;
            }
            rr = &r;
            /* invariance against the run with the original padded content */
            dstat d[5];
            for (int i = 0; i < 5; i++) ds_init(&d[i]);
            diff_rows(&d[0], r.out, r0.out, N, Dv, vq, eq);
            diff_rows(&d[1], r.dq, r0.dq, N, D, vq, eq);
            diff_rows(&d[2], r.dk, r0.dk, M, D, vk, ek);
            diff_rows(&d[3], r.dv, r0.dv, M, Dv, vk, ek);
            if (np) diff_flat(&d[4], r.dp, r0.dp, np);
            char det[768] = "";
            ds_describe(det, sizeof det, "out", &d[0]), ds_describe(det, sizeof det, "dq", &d[1]);
            ds_describe(det, sizeof det, "dk", &d[2]), ds_describe(det, sizeof det, "dv", &d[3]);
            if (np) ds_describe(det, sizeof det, "dparams", &d[4]);
            snprintf(prop, sizeof prop,
                     "%s padded rows %s: valid out, dq, dk, dv%s bitwise unchanged", what,
                     MODE_NAME[mode], np ? ", param grads" : "");
            check_named(label, prop, !(d[0].bad + d[1].bad + d[2].bad + d[3].bad + d[4].bad), det);
            prob_free(&P);
        }
        /* zeros where the contract puts them, in every run */
        dstat z[4];
        for (int i = 0; i < 4; i++) ds_init(&z[i]);
        nonzero_rows(&z[0], rr->out, N, Dv, pq0, pq1);
        nonzero_rows(&z[1], rr->dq, N, D, pq0, pq1);
        nonzero_rows(&z[2], rr->dk, M, D, pk0, pk1);
        nonzero_rows(&z[3], rr->dv, M, Dv, pk0, pk1);
        for (int b = 0; b < NB; b++) {
            int lo[NB] = {0, 0}, hq[NB] = {0, 0}, hk[NB] = {0, 0}; /* all rows of batch b */
            hq[b] = N, hk[b] = M;
            if (P0.kl[b] == 0) { /* no key at all: every row outputs 0 and gets dq = 0 */
                nonzero_rows(&z[0], rr->out, N, Dv, lo, hq);
                nonzero_rows(&z[1], rr->dq, N, D, lo, hq);
            }
            if (P0.ql[b] == 0) { /* no query at all: no key gets a gradient */
                nonzero_rows(&z[2], rr->dk, M, D, lo, hk);
                nonzero_rows(&z[3], rr->dv, M, Dv, lo, hk);
            }
        }
        char det[768] = "";
        ds_describe(det, sizeof det, "out", &z[0]), ds_describe(det, sizeof det, "dq", &z[1]);
        ds_describe(det, sizeof det, "dk", &z[2]), ds_describe(det, sizeof det, "dv", &z[3]);
        snprintf(prop, sizeof prop, "%s padded rows %s: padded out, dq, dk, dv exactly 0", what,
                 mode < 0 ? "as drawn" : MODE_NAME[mode]);
        if (z[0].n + z[1].n + z[2].n + z[3].n)
            check_named(label, prop, !(z[0].bad + z[1].bad + z[2].bad + z[3].bad), det);
        snprintf(prop, sizeof prop, "%s padded rows %s: nothing non-finite", what,
                 mode < 0 ? "as drawn" : MODE_NAME[mode]);
        check_finite(label, prop, &P0, rr);
    }
done:
    res_free(&r0), res_free(&r);
    prob_free(&P0);
}

/* ---------------------------------------------------------------------------------------------
 * d. determinism
 * ------------------------------------------------------------------------------------------- */
static void describe_res_diff(char *det, size_t cap, const prob *p, const res *x, const res *y,
                              int *bad) {
    const ef_attn_shape s = p->s;
    int lo[NB] = {0, 0}, hq[NB] = {s.q_len, s.q_len}, hk[NB] = {s.kv_len, s.kv_len};
    dstat d[5];
    for (int i = 0; i < 5; i++) ds_init(&d[i]);
    diff_rows(&d[0], x->out, y->out, s.q_len, s.v_dim, lo, hq);
    diff_rows(&d[1], x->dq, y->dq, s.q_len, s.head_dim, lo, hq);
    diff_rows(&d[2], x->dk, y->dk, s.kv_len, s.head_dim, lo, hk);
    diff_rows(&d[3], x->dv, y->dv, s.kv_len, s.v_dim, lo, hk);
    if (x->np) diff_flat(&d[4], x->dp, y->dp, x->np);
    det[0] = 0;
    ds_describe(det, cap, "out", &d[0]), ds_describe(det, cap, "dq", &d[1]);
    ds_describe(det, cap, "dk", &d[2]), ds_describe(det, cap, "dv", &d[3]);
    if (x->np) ds_describe(det, cap, "dparams", &d[4]);
    *bad = d[0].bad + d[1].bad + d[2].bad + d[3].bad + d[4].bad != 0;
}

static void test_determinism(ef_attn *a, const char *spec, const char *label, const prob *p,
                             const res *r0, size_t np) {
    res r;
    res_new(&r, p, np);
    char det[768];
    int bad;
    if (ran(label, "determinism: rerun", run(a, p, &r, 0, NULL))) {
        describe_res_diff(det, sizeof det, p, r0, &r, &bad);
        check_named(label, "determinism: rerun on the same plan bitwise equal", !bad, det);
    }
    ef_attn *a2 = NULL;
    if (ran(label, "determinism: second plan", ef_attn_new(&a2, spec, &p->s)) &&
        ran(label, "determinism: second plan run", run(a2, p, &r, 0, NULL))) {
        describe_res_diff(det, sizeof det, p, r0, &r, &bad);
        check_named(label, "determinism: a second plan of the same spec bitwise equal", !bad, det);
    }
    ef_attn_free(a2);
    int nt = ef_get_num_threads();
    res r1;
    res_new(&r1, p, np);
    ef_set_num_threads(1);
    ef_status s1 = run(a, p, &r1, 0, NULL);
    ef_set_num_threads(2);
    ef_status s2 = run(a, p, &r, 0, NULL);
    ef_set_num_threads(nt);
    if (ran(label, "determinism: 1 thread", s1) && ran(label, "determinism: 2 threads", s2)) {
        describe_res_diff(det, sizeof det, p, &r1, &r, &bad);
        check_named(label, "determinism: 1 vs 2 threads bitwise equal", !bad, det);
    }
    /* 4 threads (oversubscribed on small machines): a plan sized for 4 workspace slots */
    ef_attn *a4 = NULL;
    ef_set_num_threads(4);
    ef_status s4 = ef_attn_new(&a4, spec, &p->s);
    if (!s4) s4 = run(a4, p, &r, 0, NULL);
    ef_set_num_threads(nt);
    if (ran(label, "determinism: 1 thread", s1) && ran(label, "determinism: 4 threads", s4)) {
        describe_res_diff(det, sizeof det, p, &r1, &r, &bad);
        check_named(label, "determinism: 1 vs 4 threads bitwise equal", !bad, det);
    }
    ef_attn_free(a4);
    res_free(&r1), res_free(&r);
}

/* ---------------------------------------------------------------------------------------------
 * e. directional finite differences of f = <dout, out>
 *
 * For a direction u, the achieved steps d+ = fl(x + s u) - x and d- = fl(x - s u) - x are used
 * (computed exactly in double), so the rounding of the perturbed inputs to fp32 is not an
 * error: A(s) = <grad, d+ - d-> / 2s is what the gradient predicts for
 * D(s) = (f(x + d+) - f(x + d-)) / 2s, with f summed in double from the fp32 outputs.
 * D(s) - A(s) = c s^2 + noise for a smooth f; with s = h and h/2, the Richardson combination
 * R = (4 D(h/2) - D(h)) / 3 against Ahat = (4 A(h/2) - A(h)) / 3 cancels the s^2 term.
 * Tolerance on |R - Ahat|, three terms (the detail prints each):
 *   3 |E(h) - E(h/2)| (E = D - A): what the s^2 term and the noise actually did between the two
 *       steps (a flip of a discrete choice inside [-h, h] moves R by at most 7/6 J/h while it
 *       moves E(h) - E(h/2) by J/2h, hence the 3);
 *   f rounding 32 eps_f / h, eps_f = u sqrt(sum (g_i out_i)^2) over the outputs that changed
 *       (u = 2^-24): each fp32 output carries a few ulps of rounding (reductions, the vector
 *       exp), independent between outputs (quadrature); R's noise is ~1.9 eps_f / h per ulp rms,
 *       so 32 is ~4 sigma at 4 ulps rms (flash's dk was measured at ~5 sigma of 1 ulp);
 *   grad rounding 64 u max|grad| |d+ - d-| / 2s: each gradient element is a reduction over
 *       ~200 terms, ~16 u of the largest gradient in absolute error (sqrt(200) ~ 14),
 *       independent between elements, so <grad, d> is off by ~16 u max|grad| |d|; 4 sigma.
 * Measured: the tolerance is a median ~5e-4 of |A| and the largest |R - Ahat| is ~0.7 of its
 * tolerance; a gradient scaled by 1.003 (1.01) fails ~80% (~90%) of these checks, the rest
 * being directions where <grad, d> cancels to a small value.
 * Steps: h = 1e-2 (inputs have sigma 1; parameters: 1e-2 times their rms), where smooth.
 * Smoothness: |E(h) - E(h/2)| must stay below 0.5% of max(|A|, |D|, Q) (Q = sqrt(sum
 * (grad_i d_i)^2) / 2s, the size <grad, d> has before cancellation) plus the rounding terms, else
 * the function has a kink or jump within the step. For caps.discrete mechanisms (hash buckets,
 * clusters, top-k sets made from q or k) a step flips a choice somewhere when every element of
 * q or k moves, so for q and k the direction is sparse (3 random valid rows of one random
 * (batch, head), all columns) with h = 2e-3, and a direction that is not smooth by that test is
 * replaced by a fresh random one, up to 6 tries (the detail says how many were needed); v and
 * parameters enter no discrete choice and use dense directions. Key-ignoring mechanisms (lsh
 * ignores io->k): f does not change, D = 0 exactly, and dk must be exactly 0 for A = 0.
 * Random mechanisms: one plan (its seed fixes the draw) for every evaluation.
 * ------------------------------------------------------------------------------------------- */
enum { IN_Q, IN_K, IN_V, IN_P };

static double f_dot(const prob *p, const float *out) {
    double f = 0;
    for (size_t i = 0; i < p->no; i++) f += (double)p->g[i] * out[i];
    return f;
}

/* f at the perturbed input (written into x), output in out */
static ef_status f_eval(ef_attn *a, const prob *p, void *saved, float *out, double *f) {
    fill_nan(out, p->no);
    ef_attn_io io = make_io(p, out);
    ef_status st = ef_attn_forward(a, &io, saved);
    *f = st ? NAN : f_dot(p, out);
    return st;
}

static void test_fd(ef_attn *a, const char *label, const char *tag, const prob *p0, const res *r0,
                    const ef_attn_caps *caps, int which, uint64_t seed) {
    static const char *const IN_NAME[] = {"dq", "dk", "dv", "dparams"};
    const ef_attn_shape s = p0->s;
    prob p = *p0; /* shallow: the perturbed tensor is swapped in */
    size_t n;
    float *x0, *grad, *px;
    float *params = NULL;
    int L = 0, C = 0;
    switch (which) {
    case IN_Q: n = p0->nq, x0 = p0->q, grad = r0->dq, L = s.q_len, C = s.head_dim; break;
    case IN_K: n = p0->nk, x0 = p0->k, grad = r0->dk, L = s.kv_len, C = s.head_dim; break;
    case IN_V: n = p0->nv, x0 = p0->v, grad = r0->dv, L = s.kv_len, C = s.v_dim; break;
    default:
        n = ef_attn_param_count(a), params = ef_attn_params(a), grad = r0->dp;
        x0 = fdup(params, n);
        break;
    }
    if (which != IN_P) {
        px = fdup(x0, n);
        if (which == IN_Q)
            p.q = px;
        else if (which == IN_K)
            p.k = px;
        else
            p.v = px;
    } else {
        px = params;
    }
    int sparse = caps->discrete && (which == IN_Q || which == IN_K);
    double h = sparse ? 2e-3 : 1e-2;
    if (which == IN_P) {
        double ss = 0;
        for (size_t i = 0; i < n; i++) ss += (double)x0[i] * x0[i];
        if (ss > 0) h *= sqrt(ss / n);
    }
    size_t sb = ef_attn_saved_bytes(a);
    void *saved = ef_malloc(sb > 64 ? sb : 64);
    double *u2 = xmalloc(n * sizeof *u2);
    float *u = xmalloc(n * sizeof *u), *outp = xmalloc(p.no * sizeof(float));
    float *outm = xmalloc(p.no * sizeof(float));
    const int max_tries = caps->discrete ? 6 : 1;
    int tries = 0, smooth = 0, failed = 0;
    double D[2] = {0, 0}, A[2] = {0, 0}, Q = 0, dn = 0, epsf = 0, gmax = 0;
    for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(grad[i]));
    for (tries = 1; tries <= max_tries && !smooth && !failed; tries++) {
        uint64_t dseed = seed * 131 + (uint64_t)which * 17 + (uint64_t)tries;
        if (sparse) {
            memset(u, 0, n * sizeof *u);
            uint32_t rw[4];
            ef_rng_raw(dseed, 7, 0, rw);
            int b = rw[0] % NB, hh = rw[1] % NH;
            int valid = which == IN_Q ? (p.has_ql ? p.ql[b] : L) : (p.has_kl ? p.kl[b] : L);
            if (valid <= 0) b = 0, valid = L;
            for (int r = 0; r < 3; r++) {
                ef_rng_raw(dseed, 8, (uint64_t)r, rw);
                int i = (int)(rw[0] % (uint32_t)valid);
                ef_rng_normal(dseed, 9 + (uint64_t)r, 0, (size_t)C,
                              u + (((size_t)b * NH + hh) * L + i) * C);
            }
        } else {
            ef_rng_normal(dseed, 7, 0, n, u);
        }
        for (int k = 0; k < 2; k++) {
            double st = k ? h / 2 : h, fp, fm;
            for (size_t i = 0; i < n; i++) px[i] = (float)(x0[i] + st * u[i]);
            ef_status s1 = f_eval(a, &p, saved, outp, &fp);
            /* the achieved steps (exact in double) */
            double acc = 0, qacc = 0, dacc = 0;
            for (size_t i = 0; i < n; i++) u2[i] = (double)px[i] - x0[i];
            for (size_t i = 0; i < n; i++) px[i] = (float)(x0[i] - st * u[i]);
            ef_status s2 = f_eval(a, &p, saved, outm, &fm);
            for (size_t i = 0; i < n; i++) {
                double di = u2[i] - ((double)px[i] - x0[i]); /* d+ - d- */
                acc += (double)grad[i] * di, qacc += (double)grad[i] * di * grad[i] * di;
                dacc += di * di;
            }
            if (s1 || s2) {
                failed = 1;
                ran(label, tag, s1 ? s1 : s2);
                break;
            }
            D[k] = (fp - fm) / (2 * st), A[k] = acc / (2 * st);
            if (k == 1) Q = sqrt(qacc) / (2 * st), dn = sqrt(dacc) / (2 * st);
            if (k == 1) {
                double q = 0;
                for (size_t i = 0; i < p.no; i++)
                    if (!same_val(outp[i], outm[i])) {
                        double m = fmax(fabs(outp[i]), fabs(outm[i])) * p.g[i];
                        q += m * m;
                    }
                epsf = 0x1p-24 * sqrt(q);
            }
        }
        if (failed) break;
        double e1 = D[0] - A[0], e2 = D[1] - A[1];
        double noise = 32 * epsf / h + 64 * 0x1p-24 * gmax * dn;
        smooth = fabs(e1 - e2) <= 5e-3 * fmax(fmax(fabs(A[1]), fabs(D[1])), Q) + noise;
        smooth = smooth && isfinite(D[0]) && isfinite(D[1]) && isfinite(A[0]) && isfinite(A[1]);
    }
    tries--;
    if (!failed) {
        double R = (4 * D[1] - D[0]) / 3, Ah = (4 * A[1] - A[0]) / 3;
        double e1 = D[0] - A[0], e2 = D[1] - A[1];
        double err = fabs(R - Ah);
        double tround = 32 * epsf / h, tgrad = 64 * 0x1p-24 * gmax * dn;
        double tol = 3 * fabs(e1 - e2) + tround + tgrad;
        char prop[256], det[512];
        snprintf(prop, sizeof prop, "%sfinite differences %s", tag, IN_NAME[which]);
        snprintf(det, sizeof det,
                 "grad.dir %.6e  fd %.6e  err %.2e  tol %.2e (3|E(h)-E(h/2)| %.1e, f rounding "
                 "%.1e, grad rounding %.1e)  rel %.1e  h %.1e%s%s  directions tried %d",
                 Ah, R, err, tol, 3 * fabs(e1 - e2), tround, tgrad, err / fmax(fabs(Ah), 1e-300), h,
                 sparse ? " (sparse)" : "", smooth ? "" : "  NOT SMOOTH", tries);
        check_named(label, prop, smooth && err <= tol, det);
        if (D[0] == 0 && D[1] == 0 && epsf == 0) {
            /* no output moved at all: the input is ignored (lsh's io->k), so its gradient must
             * be exactly 0, not merely small */
            size_t nz = 0;
            for (size_t i = 0; i < n; i++) nz += grad[i] != 0.0f;
            snprintf(prop, sizeof prop, "%s%s exactly 0 (no output depends on it)", tag,
                     IN_NAME[which]);
            snprintf(det, sizeof det, "%zu of %zu non-zero, max |%s| %.2e", nz, n, IN_NAME[which],
                     gmax);
            check_named(label, prop, nz == 0, det);
        }
    }
    memcpy(px, x0, n * sizeof *px); /* restores the parameters */
    if (which == IN_P)
        free(x0);
    else
        free(px);
    free(u), free(u2), free(outp), free(outm);
    ef_free(saved);
}

/* ---------------------------------------------------------------------------------------------
 * f. saved
 * ------------------------------------------------------------------------------------------- */
static void test_saved(ef_attn *a, const char *label, const prob *p, size_t np) {
    size_t sb = ef_attn_saved_bytes(a);
    unsigned char *s1 = xmalloc(sb ? sb : 1), *s2 = xmalloc(sb ? sb : 1);
    res r1, r2;
    res_new(&r1, p, np), res_new(&r2, p, np);
    if (ran(label, "saved 0xFF", run(a, p, &r1, 0xFF, s1)) &&
        ran(label, "saved 0x00", run(a, p, &r2, 0x00, s2))) {
        size_t nd = 0, first = 0;
        for (size_t i = 0; i < sb; i++)
            if (s1[i] != s2[i] && !nd++) first = i;
        char det[768];
        snprintf(det, sizeof det, "%zu of %zu bytes depend on the prior content (first at %zu)", nd,
                 sb, first);
        check_named(label, "saved: forward writes every byte (0xFF vs 0x00 prefill)", !nd, det);
        int bad;
        describe_res_diff(det, sizeof det, p, &r1, &r2, &bad);
        check_named(label, "saved: results independent of its stale content (0xFF vs 0x00)", !bad,
                    det);
    }
    res_free(&r1), res_free(&r2);
    free(s1), free(s2);

    /* misaligned: 4 bytes into an ef_malloc'd block */
    unsigned char *blk = ef_malloc(sb + 128), *ok = ef_malloc(sb > 64 ? sb : 64);
    float *out = xmalloc(p->no * sizeof(float)), *dq = xmalloc(p->nq * sizeof(float));
    float *dk = xmalloc(p->nk * sizeof(float)), *dv = xmalloc(p->nv * sizeof(float));
    ef_attn_io io = make_io(p, out);
    char name[512];
    snprintf(name, sizeof name, "%s: saved misaligned (+4 bytes): forward refuses", label);
    ef_check_status(name, ef_attn_forward(a, &io, blk + 4), EF_ERR_ARG);
    if (ran(label, "saved misaligned: aligned forward", ef_attn_forward(a, &io, ok))) {
        memcpy(blk + 4, ok, sb);
        snprintf(name, sizeof name, "%s: saved misaligned (+4 bytes): backward refuses", label);
        ef_check_status(name, ef_attn_backward(a, &io, blk + 4, p->g, dq, dk, dv), EF_ERR_ARG);
    }
    ef_free(blk), ef_free(ok);
    free(out), free(dq), free(dk), free(dv);
}

/* ---------------------------------------------------------------------------------------------
 * g. exact mechanisms against a double-precision dense softmax over ef_attn_visible (and the
 * paddings), outputs and gradients
 * ------------------------------------------------------------------------------------------- */
static double rel_err(const float *x, const double *ref, size_t n) {
    double m = 0, sc = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(x[i] - ref[i]);
        if (d != d) return INFINITY;
        if (d > m) m = d;
        if (fabs(ref[i]) > sc) sc = fabs(ref[i]);
    }
    return m / fmax(sc, 1e-2);
}

static void test_exact(ef_attn *a, const char *label, const prob *p, const res *r) {
    const ef_attn_shape s = p->s;
    int N = s.q_len, M = s.kv_len, D = s.head_dim, Dv = s.v_dim;
    /* the plan's logit scale, from its canonical spec: auto = 1/sqrt(head_dim) */
    double scale = 1.0 / sqrt((double)D);
    const char *sc = ef_attn_describe(a) ? strstr(ef_attn_describe(a), "scale=") : NULL;
    if (sc && strncmp(sc + 6, "auto", 4) != 0) scale = strtod(sc + 6, NULL);
    double *out = calloc(p->no, sizeof(double)), *dq = calloc(p->nq, sizeof(double));
    double *dk = calloc(p->nk, sizeof(double)), *dv = calloc(p->nv, sizeof(double));
    double *pr = xmalloc(M * sizeof(double)), *dpr = xmalloc(M * sizeof(double));
    int *vis = xmalloc(M * sizeof(int));
    if (!out || !dq || !dk || !dv) exit(2);
    int vis_err = 0;
    for (int b = 0; b < NB; b++)
        for (int h = 0; h < NH; h++) {
            size_t bh = (size_t)b * NH + h;
            const float *q = p->q + bh * N * D, *k = p->k + bh * M * D, *v = p->v + bh * M * Dv;
            const float *g = p->g + bh * N * Dv;
            int nq = p->has_ql ? p->ql[b] : N, nk = p->has_kl ? p->kl[b] : M;
            for (int i = 0; i < nq; i++) {
                double mx = -INFINITY;
                for (int j = 0; j < M; j++) {
                    int w = ef_attn_visible(a, h, i, j);
                    if (w < 0) vis_err = 1;
                    vis[j] = w == 1 && j < nk;
                    if (!vis[j]) continue;
                    double t = 0;
                    for (int c = 0; c < D; c++) t += (double)q[i * D + c] * k[j * D + c];
                    pr[j] = t * scale;
                    if (pr[j] > mx) mx = pr[j];
                }
                if (mx == -INFINITY) continue; /* sees no key: zeros */
                double z = 0;
                for (int j = 0; j < M; j++)
                    if (vis[j]) z += (pr[j] = exp(pr[j] - mx));
                double *o = out + (bh * N + i) * Dv, delta = 0;
                for (int j = 0; j < M; j++) {
                    if (!vis[j]) continue;
                    pr[j] /= z;
                    for (int c = 0; c < Dv; c++) o[c] += pr[j] * v[j * Dv + c];
                }
                for (int c = 0; c < Dv; c++) delta += (double)g[i * Dv + c] * o[c];
                for (int j = 0; j < M; j++) {
                    if (!vis[j]) continue;
                    double dp = 0;
                    for (int c = 0; c < Dv; c++) dp += (double)g[i * Dv + c] * v[j * Dv + c];
                    dpr[j] = pr[j] * (dp - delta) * scale; /* d logit, times the scale */
                    for (int c = 0; c < D; c++) {
                        dq[(bh * N + i) * D + c] += dpr[j] * k[j * D + c];
                        dk[(bh * M + j) * D + c] += dpr[j] * q[i * D + c];
                    }
                    for (int c = 0; c < Dv; c++) dv[(bh * M + j) * Dv + c] += pr[j] * g[i * Dv + c];
                }
            }
        }
    char name[512];
    snprintf(name, sizeof name, "%s: ef_attn_visible answers in range", label);
    if (vis_err) ef_check(name, 0, "ef_attn_visible returned -1: %s", ef_last_error());
    /* fp32 softmax attention against double: ~1e-6 of the largest value (reductions over
     * <= 237 keys, the online softmax's rescaling); 1e-5 leaves a 10x margin (measured <= 8e-7
     * for outputs and gradients alike) */
    static const char *const what[] = {"out", "dq", "dk", "dv"};
    const float *got[] = {r->out, r->dq, r->dk, r->dv};
    const double *want[] = {out, dq, dk, dv};
    const size_t cnt[] = {p->no, p->nq, p->nk, p->nv};
    for (int t = 0; t < 4; t++) {
        snprintf(name, sizeof name, "%s: exact: %s = dense double softmax over visible", label,
                 what[t]);
        ef_check_err(name, rel_err(got[t], want[t], cnt[t]), 1e-5);
    }
    free(out), free(dq), free(dk), free(dv), free(pr), free(dpr), free(vis);
}

/* Exact mechanisms compute exactly the pairs ef_attn_visible names, so the count equals them;
 * for approximations ef_attn_visible says which pairs a query may see (lsh: any, the buckets
 * decide per call) and the count is the work per call: at most those pairs. */
static void test_pairs(ef_attn *a, const char *label, const ef_attn_shape *s, int exact) {
    int ok = 1;
    char det[512] = "";
    for (int h = 0; h < NH; h++) {
        int64_t cnt = 0, bad = 0;
        for (int i = 0; i < s->q_len; i++)
            for (int j = 0; j < s->kv_len; j++) {
                int w = ef_attn_visible(a, h, i, j);
                if (w == 1)
                    cnt++;
                else if (w != 0)
                    bad++;
            }
        int64_t pairs = ef_attn_visible_pairs(a, h);
        if ((exact ? pairs != cnt : pairs < 0 || pairs > cnt) || bad) {
            ok = 0;
            size_t l = strlen(det);
            snprintf(det + l, sizeof det - l,
                     "head %d: visible_pairs %lld, ef_attn_visible counts %lld of %lld "
                     "(%lld invalid answers); ",
                     h, (long long)pairs, (long long)cnt, (long long)s->q_len * s->kv_len,
                     (long long)bad);
        }
    }
    check_named(label,
                exact ? "ef_attn_visible_pairs = pairs ef_attn_visible names"
                      : "ef_attn_visible_pairs <= pairs ef_attn_visible names",
                ok, det);
}

/* Learned-parameter gradients accumulate: a second backward onto the first one's gradients
 * doubles them. The second sum adds the contributions to a non-zero start, so it may round
 * differently from 2 g: ~1e-7 relative, checked at 1e-6. */
static void test_accumulate(ef_attn *a, const char *label, const prob *p, const res *r) {
    size_t np = ef_attn_param_count(a), sb = ef_attn_saved_bytes(a);
    void *saved = ef_malloc(sb > 64 ? sb : 64);
    float *out = xmalloc(p->no * sizeof(float)), *dq = xmalloc(p->nq * sizeof(float));
    float *dk = xmalloc(p->nk * sizeof(float)), *dv = xmalloc(p->nv * sizeof(float));
    float *twice = xmalloc(np * sizeof(float));
    ef_attn_io io = make_io(p, out);
    ef_status st = ef_attn_forward(a, &io, saved);
    float *pg = ef_attn_param_grads(a);
    if (!st) {
        memcpy(pg, r->dp, np * sizeof(float));
        st = ef_attn_backward(a, &io, saved, p->g, dq, dk, dv);
    }
    if (ran(label, "param grads accumulate", st)) {
        for (size_t i = 0; i < np; i++) twice[i] = 2 * r->dp[i];
        char name[512];
        snprintf(name, sizeof name, "%s: param grads accumulate (2nd backward doubles them)",
                 label);
        ef_check_err(name, ef_max_rel_diff(pg, twice, np), 1e-6);
    }
    ef_free(saved);
    free(out), free(dq), free(dk), free(dv), free(twice);
}

/* ---------------------------------------------------------------------------------------------
 * One configuration: spec (with causal and ref), one shape
 * ------------------------------------------------------------------------------------------- */
static void spec_of(char *spec, size_t cap, const char *name, const char *opts, int causal,
                    int ref) {
    snprintf(spec, cap, "%s:%s%scausal=%d,ref=%d", name, opts, opts[0] ? "," : "", causal, ref);
}

static void test_config(const char *name, const char *opts, const ef_attn_caps *caps, int causal,
                        int ref, ef_attn_shape s, uint64_t seed) {
    char spec[256], label[384];
    spec_of(spec, sizeof spec, name, opts, causal, ref);
    snprintf(label, sizeof label, "%s%s%s causal=%d ref=%d%s", name, opts[0] ? ":" : "", opts,
             causal, ref, "");
    if (s.q_len != s.kv_len) {
        size_t l = strlen(label);
        snprintf(label + l, sizeof label - l, " [q_len %d kv_len %d]", s.q_len, s.kv_len);
    }
    ef_attn *a = NULL;
    if (!ran(label, "ef_attn_new", ef_attn_new(&a, spec, &s))) return;
    size_t np = ef_attn_param_count(a);
    struct timespec c0, c1;
    clock_gettime(CLOCK_MONOTONIC, &c0);

    prob base, pad;
    prob_new(&base, s, seed);
    prob_dup(&pad, &base);
    int N = s.q_len, M = s.kv_len;
    int Lq = (int)(N * 0.75) | 1, Lk = (int)(M * 0.625) | 1; /* odd, smaller, different */
    pad.has_ql = pad.has_kl = 1, pad.ql[1] = Lq, pad.kl[1] = Lk;

    res rb, rp;
    res_new(&rb, &base, np), res_new(&rp, &pad, np);
    int okb = ran(label, "forward+backward", run(a, &base, &rb, 0, NULL));
    int okp = ran(label, "forward+backward (padded)", run(a, &pad, &rp, 0, NULL));
    if (okb) check_finite(label, "out, dq, dk, dv all written and finite", &base, &rb);
    if (okb && np) test_accumulate(a, label, &base, &rb);

    /* a */
    if (causal) test_causal(a, label, &base, np);
    /* b, c */
    static const int RNI[] = {M_REDRAW, M_NAN, M_INF}, NANONLY[] = {M_NAN};
    test_padding(a, label, &base, np, -1, Lk, RNI, 3);
    test_padding(a, label, &base, np, Lq, -1, RNI, 3);
    test_padding(a, label, &base, np, Lq, Lk, RNI, 2);
    test_padding(a, label, &base, np, -1, 0, NANONLY, 1);
    test_padding(a, label, &base, np, 0, -1, NANONLY, 1);
    /* d */
    if (okp) {
        if (caps->deterministic)
            test_determinism(a, spec, label, &pad, &rp, np);
        else
            printf("NOTE  %s: caps.deterministic = 0: bitwise determinism not required\n", label);
    }
    /* e */
    for (int w = IN_Q; w <= IN_P; w++) {
        if (w == IN_P && !np) continue;
        if (okb) test_fd(a, label, "", &base, &rb, caps, w, seed + 11);
        if (okp) test_fd(a, label, "padded: ", &pad, &rp, caps, w, seed + 23);
    }
    /* f */
    test_saved(a, label, &pad, np);
    /* g */
    if (caps->exact && okp) test_exact(a, label, &pad, &rp);
    test_pairs(a, label, &s, caps->exact);

    res_free(&rb), res_free(&rp);
    prob_free(&base), prob_free(&pad);
    ef_attn_free(a);
    clock_gettime(CLOCK_MONOTONIC, &c1);
    printf("TIME  %s: %.2f s\n", label, (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec));
}

/* ---------------------------------------------------------------------------------------------
 * g. what the caps promise, per mechanism and option set
 * ------------------------------------------------------------------------------------------- */
static void test_caps(const char *name, const char *opts, const ef_attn_caps *caps,
                      ef_attn_shape self, ef_attn_shape cross) {
    char spec[256], label[384], nm[512];
    snprintf(label, sizeof label, "%s%s%s", name, opts[0] ? ":" : "", opts);
    for (int ref = 0; ref <= 1; ref++) {
        ef_attn *a = NULL;
        spec_of(spec, sizeof spec, name, opts, 1, ref);
        ef_status st = ef_attn_new(&a, spec, &self);
        snprintf(nm, sizeof nm, "%s ref=%d: caps.causal=%d: causal=1 %s", label, ref, caps->causal,
                 caps->causal ? "accepted" : "refused");
        if (caps->causal)
            ef_check_status(nm, st, EF_OK);
        else {
            const char *msg = ef_last_error();
            ef_check(nm, st == EF_ERR_UNSUPPORTED && msg[0] && !a,
                     "%s (want EF_ERR_UNSUPPORTED): '%s'", ef_status_str(st), msg);
        }
        ef_attn_free(a);
        a = NULL;
        spec_of(spec, sizeof spec, name, opts, 0, ref);
        st = ef_attn_new(&a, spec, &cross);
        snprintf(nm, sizeof nm, "%s ref=%d: caps.cross=%d: q_len %d != kv_len %d %s", label, ref,
                 caps->cross, cross.q_len, cross.kv_len, caps->cross ? "accepted" : "refused");
        if (caps->cross)
            ef_check_status(nm, st, EF_OK);
        else {
            const char *msg = ef_last_error();
            ef_check(nm, (st == EF_ERR_UNSUPPORTED || st == EF_ERR_SHAPE) && msg[0] && !a,
                     "%s (want EF_ERR_UNSUPPORTED or EF_ERR_SHAPE): '%s'", ef_status_str(st), msg);
        }
        ef_attn_free(a);
    }

    /* params and decode on a plan of the self shape */
    ef_attn *a0 = NULL, *a1 = NULL;
    spec_of(spec, sizeof spec, name, opts, 0, 0);
    if (!ran(label, "ef_attn_new (caps)", ef_attn_new(&a0, spec, &self))) return;
    if (caps->causal) {
        spec_of(spec, sizeof spec, name, opts, 1, 0);
        if (!ran(label, "ef_attn_new causal=1 (caps)", ef_attn_new(&a1, spec, &self))) a1 = NULL;
    }
    size_t np = ef_attn_param_count(a0);
    snprintf(nm, sizeof nm, "%s: caps.params=%d <=> ef_attn_param_count > 0", label, caps->params);
    ef_check(nm,
             caps->params == (np > 0) &&
                 (np == 0 || (ef_attn_params(a0) && ef_attn_param_grads(a0))),
             "param_count %zu", np);

    ef_attn_state *st = NULL;
    ef_status s0 = ef_attn_state_new(&st, a0);
    ef_attn_state_free(st), st = NULL;
    snprintf(nm, sizeof nm, "%s: ef_attn_state_new on causal=0 refused", label);
    ef_check_status(nm, s0, EF_ERR_UNSUPPORTED);
    if (a1) {
        ef_status s1 = ef_attn_state_new(&st, a1);
        snprintf(nm, sizeof nm, "%s: caps.decode=%d: ef_attn_state_new on causal=1 %s", label,
                 caps->decode, caps->decode ? "works" : "refused");
        ef_check_status(nm, s1, caps->decode ? EF_OK : EF_ERR_UNSUPPORTED);
        if (caps->decode && !s1) {
            /* every step equals the row of the causal forward on the whole sequence: the prefix
             * is summed in another order (running state vs chunked products), fp32 rounding
             * ~1e-6 per reduction over <= 240 terms: 1e-5 relative to the largest output */
            prob p;
            prob_new(&p, self, 4242);
            res r;
            res_new(&r, &p, np);
            int N = self.q_len, D = self.head_dim, Dv = self.v_dim;
            float *qs = xmalloc(NB * NH * D * sizeof(float)),
                  *ks = xmalloc(NB * NH * D * sizeof(float));
            float *vs = xmalloc(NB * NH * Dv * sizeof(float)),
                  *os = xmalloc(NB * NH * Dv * sizeof(float));
            float *steps = xmalloc(p.no * sizeof(float));
            ef_status e = run(a1, &p, &r, 0, NULL);
            for (int t = 0; t < N && !e; t++) {
                for (int bh = 0; bh < NB * NH; bh++) {
                    memcpy(qs + bh * D, p.q + ((size_t)bh * N + t) * D, D * sizeof(float));
                    memcpy(ks + bh * D, p.k + ((size_t)bh * N + t) * D, D * sizeof(float));
                    memcpy(vs + bh * Dv, p.v + ((size_t)bh * N + t) * Dv, Dv * sizeof(float));
                }
                e = ef_attn_step(a1, st, qs, ks, vs, os);
                for (int bh = 0; bh < NB * NH; bh++)
                    memcpy(steps + ((size_t)bh * N + t) * Dv, os + bh * Dv, Dv * sizeof(float));
            }
            if (ran(label, "decode steps", e)) {
                snprintf(nm, sizeof nm, "%s: decode: steps = rows of the causal forward", label);
                ef_check_err(nm, ef_max_rel_diff(steps, r.out, p.no), 1e-5);
                snprintf(nm, sizeof nm, "%s: decode: state position after %d steps", label, N);
                int64_t pos = ef_attn_state_position(st);
                ef_check(nm, pos == N, "%lld", (long long)pos);
            }
            free(qs), free(ks), free(vs), free(os), free(steps);
            res_free(&r), prob_free(&p);
        }
        ef_attn_state_free(st);
    }
    ef_attn_free(a0), ef_attn_free(a1);
}

/* ---------------------------------------------------------------------------------------------
 * Shapes: small and odd. The reference paths are O(N^2) double loops (and the suite runs each
 * configuration ~80 times), so they get smaller shapes.
 * ------------------------------------------------------------------------------------------- */
static ef_attn_shape shape_self(int ref) {
    ef_attn_shape s = {NB, NH, ref ? 139 : 181, ref ? 139 : 181, 16, 11};
    return s;
}
static ef_attn_shape shape_cross(int ref) {
    ef_attn_shape s = {NB, NH, ref ? 119 : 157, ref ? 163 : 219, 24, 13};
    return s;
}

static int accepts(const char *name, const char *opts, int causal, ef_attn_shape s) {
    char spec[256];
    spec_of(spec, sizeof spec, name, opts, causal, 0);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    ef_attn_free(a);
    return st == EF_OK;
}

static int selected(int argc, char **argv, const char *name) {
    if (argc < 2) return 1;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], name)) return 1;
    return 0;
}

int main(int argc, char **argv) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int n = ef_attn_count();
    ef_check("registry: at least one mechanism", n > 0, "%d", n);
    ef_check("registry: ef_attn_name(count) = NULL", ef_attn_name(n) == NULL, "%s",
             ef_attn_name(n) ? ef_attn_name(n) : "NULL");
    ef_attn_caps none;
    ef_check_status("ef_attn_get_caps(unknown name) refused", ef_attn_get_caps("no-such", &none),
                    EF_ERR_ARG);
    ef_check_status("ef_attn_get_caps(NULL name) refused", ef_attn_get_caps(NULL, &none),
                    EF_ERR_ARG);
    ef_check_status("ef_attn_get_caps(NULL caps) refused", ef_attn_get_caps("full", NULL),
                    EF_ERR_ARG);
    for (int m = 0; m < n; m++) {
        const char *name = ef_attn_name(m);
        ef_attn_caps caps;
        char nm[256];
        snprintf(nm, sizeof nm, "registry: ef_attn_get_caps(%s)", name ? name : "(null)");
        if (!name || !ef_check_status(nm, ef_attn_get_caps(name, &caps), EF_OK)) continue;
        if (!selected(argc, argv, name)) continue;
        printf("CAPS  %s: causal=%d cross=%d decode=%d params=%d exact=%d random=%d discrete=%d "
               "deterministic=%d\n",
               name, caps.causal, caps.cross, caps.decode, caps.params, caps.exact, caps.random,
               caps.discrete, caps.deterministic);
        const char *opts;
        for (int oi = 0; (opts = mech_opts(name, oi)); oi++) {
            test_caps(name, opts, &caps, shape_self(0), shape_cross(0));
            /* a combination the plan accepts keeps the contract whatever caps say (test_caps
             * reports the disagreement) */
            int do_causal = caps.causal || accepts(name, opts, 1, shape_self(0));
            int do_cross = caps.cross || accepts(name, opts, 0, shape_cross(0));
            for (int causal = 0; causal <= do_causal; causal++)
                for (int ref = 0; ref <= 1; ref++) {
                    uint64_t seed = 1000 + (uint64_t)m * 16 + causal * 2 + ref;
                    test_config(name, opts, &caps, causal, ref, shape_self(ref), seed);
                    if (do_cross)
                        test_config(name, opts, &caps, causal, ref, shape_cross(ref), seed + 7);
                }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("TIME  total %.1f s\n", (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
    return ef_test_finish();
}
