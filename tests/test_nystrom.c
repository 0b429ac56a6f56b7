/*
 * test_nystrom.c - `nystrom` (Nyströmformer): the fast path against the double-precision
 * reference (ref=1), the hand-derived backward (through three softmaxes, the segment means and
 * the pseudo-inverse iterations) against central finite differences in double, the limit case
 * landmarks = every token (ALGORITHMS.md, limit-case equivalence #10: K1 pinv(K2) K3 =
 * A A+ A = A, so the output equals `full`), convergence of the pseudo-inverse iteration, key
 * padding (invariance, kv_lens = 0, lengths not divisible by the landmark count), inference ==
 * training, thread-count independence, the causal refusal and option errors.
 *
 * Inputs are Gaussian, sigma 1 unless a test says otherwise (STYLE.md).
 *
 * Tolerances (max |fast - ref| / max |ref| per tensor, ef_max_rel_diff) are stated where
 * they are used, with the reason.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Test hook of src/attn/nystrom.c (not part of the API): the reference forward of one head
 * entirely in double. Needs a nystrom plan with ref=1. */
ef_status ef_nystrom_ref_head(ef_attn *a, int q_valid, int kv_valid, const double *q,
                              const double *k, const double *v, double *out);

typedef ef_test_bufs bufs; /* inputs only: the outputs live elsewhere here */

typedef struct outs {
    float *out, *dq, *dk, *dv;
} outs;

static void outs_alloc(outs *o, const bufs *in) {
    o->out = ef_test_zeros(in->no), o->dq = ef_test_zeros(in->nq);
    o->dk = ef_test_zeros(in->nk), o->dv = ef_test_zeros(in->nv);
}

static void outs_free(outs *o) { free(o->out), free(o->dq), free(o->dk), free(o->dv); }

static void fill_nan(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

/* max |x_i|; infinite when any x_i is NaN (fmax would skip it) */
static double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != x[i]) return INFINITY;
        m = fmax(m, fabs(x[i]));
    }
    return m;
}

/* Forward (+ backward) of `spec` with query lengths q_lens and key lengths kv_lens (NULL:
 * all); returns the status. The outputs are NaN before the call, so an element the library
 * forgets to write fails every comparison. */
static ef_status run_q(const char *spec, const bufs *in, const int32_t *q_lens,
                       const int32_t *kv_lens, outs *o, int backward) {
    fill_nan(o->out, in->no);
    if (backward) fill_nan(o->dq, in->nq), fill_nan(o->dk, in->nk), fill_nan(o->dv, in->nv);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    if (st) return st;
    void *saved = backward ? ef_test_saved(a) : NULL;
    ef_attn_io io = {in->q, in->k, in->v, kv_lens, o->out, q_lens};
    st = ef_attn_forward(a, &io, saved);
    if (!st && backward) st = ef_attn_backward(a, &io, saved, in->g, o->dq, o->dk, o->dv);
    ef_free(saved);
    ef_attn_free(a);
    return st;
}

static ef_status run(const char *spec, const bufs *in, const int32_t *kv_lens, outs *o,
                     int backward) {
    return run_q(spec, in, NULL, kv_lens, o, backward);
}

static int any_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Fast path vs reference path
 * ------------------------------------------------------------------------------------------- */

/* Both paths are the same algorithm; the reference runs in double. With the default 6
 * iterations the fp32 fast path stays within a few ulps times the depth of the computation:
 * measured <= 1e-6 forward and <= 2e-6 for gradients over these cases; we accept 1e-5 and 1e-4.
 * A long iteration is different: Z converges to pinv(K2), whose norm is 1/sigma_min(K2), and
 * K2 of 16 landmarks that each average ~5 Gaussian tokens has small logits, so it is close to
 * the rank-one uniform matrix and ill-conditioned. fp32 rounding is then amplified by cond(K2):
 * measured 1e-4 forward and 5e-4 for gradients with 20 iterations, for which we accept 1e-3 and
 * 5e-3. A wrong segment boundary, mask or transpose gives errors of order 1e-1 .. 1. */
#define TOL_FWD 1e-5
#define TOL_BWD 1e-4
#define TOL_FWD_LONG 1e-3
#define TOL_BWD_LONG 5e-3

static void compare_ref_q(const char *label, ef_attn_shape s, const char *opts,
                          const int32_t *q_lens, const int32_t *kv_lens, double tol_f,
                          double tol_b) {
    char name[256], fast[160], ref[160];
    snprintf(fast, sizeof fast, "nystrom:%s", opts);
    snprintf(ref, sizeof ref, "nystrom:%s,ref=1", opts);
    bufs in;
    outs of, orf;
    ef_test_inputs(&in, s, 100 + (uint64_t)s.q_len * 3 + s.kv_len, 1.0f);
    outs_alloc(&of, &in), outs_alloc(&orf, &in);
    ef_status st1 = run_q(fast, &in, q_lens, kv_lens, &of, 1);
    ef_status st2 = run_q(ref, &in, q_lens, kv_lens, &orf, 1);
    snprintf(name, sizeof name, "%s %s: both run", label, opts);
    if (ef_check(name, !st1 && !st2, "%s / %s: %s", ef_status_str(st1), ef_status_str(st2),
                 ef_last_error())) {
        int bad = any_nonfinite(of.out, in.no) || any_nonfinite(of.dq, in.nq) ||
                  any_nonfinite(of.dk, in.nk) || any_nonfinite(of.dv, in.nv);
        snprintf(name, sizeof name, "%s %s: finite", label, opts);
        ef_check(name, !bad, "%s", bad ? "NaN or inf" : "");
        snprintf(name, sizeof name, "%s %s: out", label, opts);
        ef_check_err(name, ef_max_rel_diff(of.out, orf.out, in.no), tol_f);
        snprintf(name, sizeof name, "%s %s: dq", label, opts);
        ef_check_err(name, ef_max_rel_diff(of.dq, orf.dq, in.nq), tol_b);
        snprintf(name, sizeof name, "%s %s: dk", label, opts);
        ef_check_err(name, ef_max_rel_diff(of.dk, orf.dk, in.nk), tol_b);
        snprintf(name, sizeof name, "%s %s: dv", label, opts);
        ef_check_err(name, ef_max_rel_diff(of.dv, orf.dv, in.nv), tol_b);
    }
    outs_free(&of), outs_free(&orf), ef_test_free_inputs(&in);
}

static void compare_ref(const char *label, ef_attn_shape s, const char *opts,
                        const int32_t *kv_lens, double tol_f, double tol_b) {
    compare_ref_q(label, s, opts, NULL, kv_lens, tol_f, tol_b);
}

static void versus_reference(void) {
    const int lm[] = {1, 7, 16, 64};
    /* kv_lens: all, none, 33 (not a multiple of 7, 16 or 64: uneven segments), 5 (fewer keys
     * than 7, 16, 64 landmarks: every key is its own landmark, K2 is rectangular) */
    ef_attn_shape s1 = {4, 2, 77, 77, 24, 40}, s2 = {4, 2, 90, 70, 24, 40};
    int32_t l1[4] = {77, 0, 33, 5}, l2[4] = {70, 33, 0, 5};
    for (int i = 0; i < 4; i++) {
        char opts[64];
        snprintf(opts, sizeof opts, "landmarks=%d", lm[i]);
        compare_ref("N77 M77", s1, opts, NULL, TOL_FWD, TOL_BWD);
        compare_ref("N77 M77 kv_lens={77,0,33,5}", s1, opts, l1, TOL_FWD, TOL_BWD);
        compare_ref("N90 M70 kv_lens={70,33,0,5}", s2, opts, l2, TOL_FWD, TOL_BWD);
    }
    /* pinv_iters = 0 (Z0 only), a long iteration, a custom scale, head_dim 1 and v_dim 1 */
    compare_ref("N90 M70 kv_lens={70,33,0,5}", s2, "landmarks=16,pinv_iters=0", l2, TOL_FWD,
                TOL_BWD);
    compare_ref("N90 M70 kv_lens={70,33,0,5}", s2, "landmarks=16,pinv_iters=20", l2, TOL_FWD_LONG,
                TOL_BWD_LONG);
    compare_ref("N90 M70 kv_lens={70,33,0,5}", s2, "landmarks=7,scale=0.5", l2, TOL_FWD, TOL_BWD);
    ef_attn_shape s3 = {1, 3, 31, 45, 1, 1};
    compare_ref("N31 M45 D1 Dv1", s3, "landmarks=7", NULL, TOL_FWD, TOL_BWD);
    /* more landmarks than queries and keys: mq = N, m' = M */
    ef_attn_shape s4 = {2, 1, 13, 9, 8, 6};
    int32_t l4[2] = {9, 4};
    compare_ref("N13 M9 kv_lens={9,4}", s4, "landmarks=64", l4, TOL_FWD, TOL_BWD);
    /* query padding: q_lens 77 (all), 40, 3 (fewer valid queries than 7, 16 landmarks: every
     * valid query is its own landmark), 0 (no query), against kv_lens all / {77,0,33,5} /
     * {70,33,0,5}, odd sizes; and self-attention lengths q_lens = kv_lens */
    int32_t q1[4] = {77, 40, 3, 0}, q2[4] = {61, 1, 50, 90};
    for (int i = 1; i < 3; i++) {
        char opts[64];
        snprintf(opts, sizeof opts, "landmarks=%d", lm[i]);
        compare_ref_q("N77 M77 q_lens={77,40,3,0}", s1, opts, q1, NULL, TOL_FWD, TOL_BWD);
        compare_ref_q("N77 M77 q_lens={77,40,3,0} kv_lens={77,0,33,5}", s1, opts, q1, l1, TOL_FWD,
                      TOL_BWD);
        compare_ref_q("N90 M70 q_lens={61,1,50,90} kv_lens={70,33,0,5}", s2, opts, q2, l2, TOL_FWD,
                      TOL_BWD);
    }
    int32_t self[4] = {77, 33, 0, 5};
    compare_ref_q("N77 M77 q_lens = kv_lens = {77,33,0,5}", s1, "landmarks=16", self, self, TOL_FWD,
                  TOL_BWD);
    compare_ref_q("N90 M70 q_lens={61,1,50,90} kv_lens={70,33,0,5}", s2, "landmarks=7,pinv_iters=0",
                  q2, l2, TOL_FWD, TOL_BWD);
}

/* ---------------------------------------------------------------------------------------------
 * Finite differences in double
 * ------------------------------------------------------------------------------------------- */

/* loss = sum_ix g_ix out_ix of one head, in double through the reference forward. */
static double fd_loss(ef_attn *a, int nq, int L, const double *q, const double *k, const double *v,
                      const double *g, double *out, size_t no) {
    if (ef_nystrom_ref_head(a, nq, L, q, k, v, out)) return NAN;
    double s = 0;
    for (size_t x = 0; x < no; x++) s += g[x] * out[x];
    return s;
}

/* Every entry of dq, dk, dv of one head (batch = heads = 1) against central differences of the
 * double forward with step 1e-5: truncation ~ h^2 |f'''| ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-11,
 * so the differences are good to ~1e-9 relative. The reference backward (rounded to float:
 * 6e-8) must match to 1e-6 (measured 4e-8); the fast fp32 backward to 1e-5 (measured 4e-7: a
 * tiny, well-conditioned problem).
 * A sign or transpose error anywhere in the pinv backward is off by O(1). */
static void finite_differences(const char *label, ef_attn_shape s, const char *opts, int nq,
                               int L) {
    char ref_spec[128], fast_spec[128], name[256];
    snprintf(ref_spec, sizeof ref_spec, "nystrom:%s,ref=1", opts);
    snprintf(fast_spec, sizeof fast_spec, "nystrom:%s", opts);
    bufs in;
    ef_test_inputs(&in, s, 4242 + (uint64_t)L + 100 * (uint64_t)nq, 1.0f);
    int32_t lens[1] = {L}, qlens[1] = {nq};
    outs rf, fs;
    outs_alloc(&rf, &in), outs_alloc(&fs, &in);
    ef_status st = run_q(ref_spec, &in, qlens, lens, &rf, 1);
    if (!st) st = run_q(fast_spec, &in, qlens, lens, &fs, 1);
    ef_attn *a = NULL;
    if (!st) st = ef_attn_new(&a, ref_spec, &s);
    snprintf(name, sizeof name, "fd %s %s: runs", label, opts);
    if (!ef_check(name, !st, "%s", st ? ef_last_error() : "")) {
        outs_free(&rf), outs_free(&fs), ef_test_free_inputs(&in);
        return;
    }
    size_t nx[3] = {in.nq, in.nk, in.nv}, tot = in.nq + in.nk + in.nv;
    double *x = malloc(sizeof(double) * tot), *g = malloc(sizeof(double) * in.no);
    double *out = malloc(sizeof(double) * in.no), *fd = malloc(sizeof(double) * tot);
    for (size_t i = 0; i < in.nq; i++) x[i] = in.q[i];
    for (size_t i = 0; i < in.nk; i++) x[in.nq + i] = in.k[i];
    for (size_t i = 0; i < in.nv; i++) x[in.nq + in.nk + i] = in.v[i];
    for (size_t i = 0; i < in.no; i++) g[i] = in.g[i];
    const double h = 1e-5;
    for (size_t i = 0; i < tot; i++) {
        double x0 = x[i];
        x[i] = x0 + h;
        double fp = fd_loss(a, nq, L, x, x + in.nq, x + in.nq + in.nk, g, out, in.no);
        x[i] = x0 - h;
        double fm = fd_loss(a, nq, L, x, x + in.nq, x + in.nq + in.nk, g, out, in.no);
        x[i] = x0;
        fd[i] = (fp - fm) / (2 * h);
    }
    const char *tn[3] = {"dq", "dk", "dv"};
    const float *gr[3] = {rf.dq, rf.dk, rf.dv}, *gf[3] = {fs.dq, fs.dk, fs.dv};
    size_t off = 0;
    for (int t = 0; t < 3; t++) {
        double scale = 0, er = 0, ef = 0;
        for (size_t i = 0; i < nx[t]; i++) scale = fmax(scale, fabs(fd[off + i]));
        for (size_t i = 0; i < nx[t]; i++) {
            er = fmax(er, fabs(gr[t][i] - fd[off + i]));
            ef = fmax(ef, fabs(gf[t][i] - fd[off + i]));
        }
        scale = fmax(scale, 1e-2);
        snprintf(name, sizeof name, "fd %s %s: ref %s vs central differences", label, opts, tn[t]);
        ef_check_err(name, er / scale, 1e-6);
        snprintf(name, sizeof name, "fd %s %s: fast %s vs central differences", label, opts, tn[t]);
        ef_check_err(name, ef / scale, 1e-5);
        off += nx[t];
    }
    /* the gradients of the padded queries, keys and values are exactly zero (their differences
     * are zero too: padded inputs do not enter the forward) */
    double pad = fmax(max_abs(fs.dk + (size_t)L * s.head_dim, in.nk - (size_t)L * s.head_dim),
                      max_abs(fs.dv + (size_t)L * s.v_dim, in.nv - (size_t)L * s.v_dim));
    pad = fmax(pad, max_abs(fs.dq + (size_t)nq * s.head_dim, in.nq - (size_t)nq * s.head_dim));
    snprintf(name, sizeof name, "fd %s %s: padded dq, dk, dv are 0", label, opts);
    ef_check_err(name, pad, 0.0);
    free(x), free(g), free(out), free(fd);
    ef_attn_free(a);
    outs_free(&rf), outs_free(&fs), ef_test_free_inputs(&in);
}

static void gradients(void) {
    ef_attn_shape s = {1, 1, 9, 11, 5, 3};
    /* uneven segments both sides (9 queries / 4, 10 keys / 4), one padded key */
    finite_differences("N9 M11 L10", s, "landmarks=4,pinv_iters=3", 9, 10);
    /* K2 rectangular: mq = 6 query landmarks, m' = 4 key landmarks (L = 4 < 6) */
    finite_differences("N9 M11 L4", s, "landmarks=6,pinv_iters=2", 9, 4);
    /* Z0 only: the gradient through the scale c = max col sum * max row sum */
    finite_differences("N9 M11 L11", s, "landmarks=5,pinv_iters=0", 9, 11);
    /* the default iteration count, a custom scale */
    finite_differences("N9 M11 L11", s, "landmarks=3,pinv_iters=6,scale=0.7", 9, 11);
    /* query padding: 7 of 9 queries valid (uneven query segments 7 / 3), 8 of 11 keys */
    finite_differences("N9 M11 nq7 L8", s, "landmarks=3,pinv_iters=4", 7, 8);
    /* 3 valid queries, 4 landmarks: every valid query is its own landmark, K2 is 3 x 4 */
    finite_differences("N9 M11 nq3 L10", s, "landmarks=4,pinv_iters=3", 3, 10);
}

/* ---------------------------------------------------------------------------------------------
 * landmarks = every token: K1 = K2 = K3 = A, out = A pinv(A) A V = A V = `full`
 * ------------------------------------------------------------------------------------------- */

/* Runs nystrom (landmarks >= N, M) and full on the same inputs; returns max|diff|/max|full|. */
static double versus_full(ef_attn_shape s, const char *nys, const char *full,
                          const int32_t *kv_lens, float sigma, int identity_v, ef_status *st) {
    bufs in;
    ef_test_inputs(&in, s, 77, sigma);
    if (identity_v) /* V = I (v_dim = kv_len): out = K1 Z K3 itself, K2 Z K2 here */
        for (size_t i = 0; i < in.nv; i++) in.v[i] = (i / s.v_dim) % s.kv_len == i % s.v_dim;
    outs a, b;
    outs_alloc(&a, &in), outs_alloc(&b, &in);
    *st = run(nys, &in, kv_lens, &a, 0);
    if (!*st) *st = run(full, &in, kv_lens, &b, 0);
    double e = *st ? INFINITY : ef_max_rel_diff(a.out, b.out, in.no);
    outs_free(&a), outs_free(&b), ef_test_free_inputs(&in);
    return e;
}

/* The equivalence needs a converged iteration and an A that can be pseudo-inverted at the
 * working precision. Conditioning: A = softmax(tau Q K^T) is close to the rank-one uniform
 * matrix when the logits are small, so *smaller* inputs make it *worse* conditioned, and
 * head_dim < N makes the logits rank-deficient. Measured residual floors (N = 24, 30
 * iterations, V = I, max relative): D = 32: sigma 0.25 -> 2e-4, 0.5 -> 1e-5, 1 -> 1e-6,
 * 2 -> 3e-6; D = 16: sigma 0.5 -> 3e-5, 1 -> 1e-5. We use sigma 1 and D = 32 >= N.
 * In fp32, out = K1 (Z (K3 V)) with ||Z|| = 1/sigma_min(A) loses eps_fp32 * cond(A): over 24
 * random draws (N = 16..32, Gaussian V) it measured 6e-6 .. 3e-4; these inputs measure 1.4e-5
 * and we accept 1e-4 (cond(A) up to ~1e3). The reference path runs the same iteration in
 * double, where the identity holds to the float rounding of the outputs: accepted 1e-6.
 * Stopped early (pinv_iters = 2) the comparison is off by ~1e-1 (checked), so it can fail. */
#define SIGMA_FULL 1.0f
#define TOL_FULL 1e-4
#define TOL_FULL_REF 1e-6

static void equals_full(void) {
    ef_status st;
    ef_attn_shape s = {2, 2, 24, 24, 32, 16};
    double e =
        versus_full(s, "nystrom:landmarks=24,pinv_iters=30", "full", NULL, SIGMA_FULL, 0, &st);
    ef_check_err("landmarks = N = M = 24, 30 iterations == full", e, TOL_FULL);
    e = versus_full(s, "nystrom:landmarks=24,pinv_iters=30,ref=1", "full:ref=1", NULL, SIGMA_FULL,
                    0, &st);
    ef_check_err("... in double (ref=1): A pinv(A) A = A", e, TOL_FULL_REF);
    e = versus_full(s, "nystrom:landmarks=24,pinv_iters=2", "full", NULL, SIGMA_FULL, 0, &st);
    ef_check("... and 2 iterations are measurably not converged", e > 1e-2,
             "err %.3e (want > 1e-2)", e);
    /* more landmarks than tokens: the landmarks are the tokens */
    e = versus_full(s, "nystrom:landmarks=1000,pinv_iters=30", "full", NULL, SIGMA_FULL, 0, &st);
    ef_check_err("landmarks = 1000 > N = M = 24 == full", e, TOL_FULL);
    /* rectangular A (N = 20 queries, L = 12 of 16 keys): A [20][12] has rank 12 and the
     * iteration converges to its pseudo-inverse; A A+ A = A still holds */
    ef_attn_shape r = {2, 1, 20, 16, 32, 8};
    int32_t lens[2] = {12, 16};
    e = versus_full(r, "nystrom:landmarks=20,pinv_iters=30", "full", lens, SIGMA_FULL, 0, &st);
    ef_check_err("landmarks = N = 20 >= L = {12, 16}, 30 iterations == full (padded)", e, TOL_FULL);
    e = versus_full(r, "nystrom:landmarks=20,pinv_iters=30,ref=1", "full:ref=1", lens, SIGMA_FULL,
                    0, &st);
    ef_check_err("... in double (ref=1)", e, TOL_FULL_REF);
}

/* The segment boundaries, pinned independently of the library: landmark r of m over n rows
 * averages rows [floor(r n / m), floor((r + 1) n / m)). If the queries are constant on their
 * segments and the valid keys on theirs, every landmark is exactly one of those constants, so
 * K1 row i = K2 row seg(i), and K3 V row r is attention of landmark query r over the keys.
 * With Z = K2^-1 (square, converged) out_i = (K2 Z K3 V)_seg(i) = (K3 V)_seg(i), which is full
 * attention of q_i over the valid keys. A boundary off by one mixes two constants into a
 * landmark and changes the output by O(0.1). m x m K2 with m = 4, 5 is well conditioned:
 * measured 2e-7 .. 7e-6; accepted TOL_FULL. */
static void segments(void) {
    struct {
        int n, m, len, lm;
    } cases[] = {{10, 13, 10, 4}, {23, 23, 17, 5}, {77, 70, 33, 7}};
    for (int c = 0; c < 3; c++) {
        ef_attn_shape s = {1, 1, cases[c].n, cases[c].m, 32, 8};
        int lm = cases[c].lm, L = cases[c].len;
        bufs in;
        ef_test_inputs(&in, s, 900 + (uint64_t)c, 1.0f);
        float *tq = ef_test_randn((size_t)lm * 32, 950 + (uint64_t)c, 1.0f);
        float *tk = ef_test_randn((size_t)lm * 32, 960 + (uint64_t)c, 1.0f);
        /* query i (valid key j) := row r of a Gaussian table, r the segment holding it:
         * floor(r n / m) <= i < floor((r + 1) n / m) */
        for (int i = 0; i < s.q_len; i++) {
            int r = 0;
            while ((int64_t)(r + 1) * s.q_len / lm <= i) r++;
            memcpy(in.q + (size_t)i * 32, tq + (size_t)r * 32, 32 * sizeof(float));
        }
        for (int j = 0; j < L; j++) {
            int r = 0;
            while ((int64_t)(r + 1) * L / lm <= j) r++;
            memcpy(in.k + (size_t)j * 32, tk + (size_t)r * 32, 32 * sizeof(float));
        }
        int32_t lens[1] = {L};
        outs a, b;
        outs_alloc(&a, &in), outs_alloc(&b, &in);
        char spec[96], name[160];
        snprintf(spec, sizeof spec, "nystrom:landmarks=%d,pinv_iters=30", lm);
        ef_status st = run(spec, &in, lens, &a, 0);
        if (!st) st = run("full", &in, lens, &b, 0);
        snprintf(name, sizeof name, "segments N=%d L=%d m=%d: constant on segments == full",
                 s.q_len, L, lm);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            ef_check_err(name, ef_max_rel_diff(a.out, b.out, in.no), TOL_FULL);
        free(tq), free(tk), outs_free(&a), outs_free(&b), ef_test_free_inputs(&in);
    }
}

/* ||K2 Z_T K2 - K2|| / ||K2|| after T iterations, observed through the API: with
 * landmarks = N = M, K1 = K2 = K3 = A, and with V = I the output is A Z_T A itself, while full
 * attention outputs A. The residual must shrink with T and end small: on the eigenvalues x of
 * A Z the iteration is x -> x (13 - 15x + 7x^2 - x^3) / 4, which grows small ones by 13/4 per
 * step and then converges fast (f(1) = 1, f'(1) = 0), so from x0 = sigma_i^2 / c it needs
 * about log(c / sigma_min^2) / log(3.25) steps before the fast phase (~12 here). */
static void convergence(void) {
    ef_attn_shape s = {1, 2, 24, 24, 32, 24};
    const int iters[] = {0, 2, 4, 8, 12, 16, 30};
    double res[7];
    char buf[512];
    size_t len = 0;
    int mono = 1;
    ef_status st = EF_OK;
    for (int i = 0; i < 7 && !st; i++) {
        char spec[96];
        snprintf(spec, sizeof spec, "nystrom:landmarks=24,pinv_iters=%d", iters[i]);
        res[i] = versus_full(s, spec, "full", NULL, SIGMA_FULL, 1, &st);
        len += (size_t)snprintf(buf + len, sizeof buf - len, "T=%d %.1e  ", iters[i], res[i]);
        /* once converged the residual sits at the fp32 floor and may wobble there */
        if (i > 0 && res[i] > res[i - 1] && res[i - 1] > 1e-4) mono = 0;
    }
    ef_check_status("convergence runs", st, EF_OK);
    if (st) return;
    ef_check("pinv: ||A Z A - A|| decreases with the iteration count", mono, "%s", buf);
    ef_check("pinv: Z0 alone is far from a pseudo-inverse (residual > 0.1)", res[0] > 0.1, "%.3e",
             res[0]);
    /* these inputs: floor 1e-6 (see above), accepted 1e-5 */
    ef_check_err("pinv: residual ||A Z A - A|| / ||A|| after 30 iterations", res[6], 1e-5);
}

/* ---------------------------------------------------------------------------------------------
 * Padding, empty sequences, inference, threads, options
 * ------------------------------------------------------------------------------------------- */

/* Padded keys/values set to 1e4 / 1e9 change nothing: they never enter a landmark or K3. */
static void padding_invariance(void) {
    ef_attn_shape s = {2, 2, 70, 70, 16, 16};
    int32_t lens[2] = {30, 70};
    bufs in;
    outs a, b;
    ef_test_inputs(&in, s, 5, 1.0f);
    outs_alloc(&a, &in), outs_alloc(&b, &in);
    ef_status st = run("nystrom:landmarks=16", &in, lens, &a, 1);
    for (int h = 0; h < 2; h++) /* batch 0, both heads, keys 30..69 */
        for (int j = 30; j < 70; j++)
            for (int t = 0; t < 16; t++) {
                in.k[((size_t)h * 70 + j) * 16 + t] = 1e4f;
                in.v[((size_t)h * 70 + j) * 16 + t] = 1e9f;
            }
    if (!st) st = run("nystrom:landmarks=16", &in, lens, &b, 1);
    ef_check_status("padding invariance runs", st, EF_OK);
    ef_check_err("padded keys/values set to 1e4/1e9 change no output",
                 ef_max_abs_diff(a.out, b.out, in.no), 0.0);
    ef_check_err("... no dq", ef_max_abs_diff(a.dq, b.dq, in.nq), 0.0);
    ef_check_err("... no dk", ef_max_abs_diff(a.dk, b.dk, in.nk), 0.0);
    ef_check_err("... no dv", ef_max_abs_diff(a.dv, b.dv, in.nv), 0.0);
    double pad = 0;
    for (int h = 0; h < 2; h++) {
        pad = fmax(pad, max_abs(b.dk + ((size_t)h * 70 + 30) * 16, 40 * 16));
        pad = fmax(pad, max_abs(b.dv + ((size_t)h * 70 + 30) * 16, 40 * 16));
    }
    ef_check_err("padded keys/values get zero gradient", pad, 0.0);
    outs_free(&a), outs_free(&b), ef_test_free_inputs(&in);
}

/* kv_lens = 0: zero output and zero gradients (fast and reference), never NaN. */
static void empty_sequences(void) {
    ef_attn_shape s = {2, 1, 9, 11, 8, 8};
    int32_t lens[2] = {0, 11};
    const char *specs[] = {"nystrom:landmarks=4", "nystrom:landmarks=4,ref=1"};
    for (int i = 0; i < 2; i++) {
        bufs in;
        outs o;
        ef_test_inputs(&in, s, 77, 1.0f);
        outs_alloc(&o, &in);
        ef_status st = run(specs[i], &in, lens, &o, 1);
        /* batch 0 is the first half of every tensor */
        double m = fmax(fmax(max_abs(o.out, in.no / 2), max_abs(o.dq, in.nq / 2)),
                        fmax(max_abs(o.dk, in.nk / 2), max_abs(o.dv, in.nv / 2)));
        double other = max_abs(o.out + in.no / 2, in.no / 2);
        char name[128];
        snprintf(name, sizeof name, "%s: kv_lens = 0 -> zero output and gradients", specs[i]);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            ef_check_err(name, m, 0.0);
        snprintf(name, sizeof name, "%s: ... while the other sequence is not zero", specs[i]);
        ef_check(name, !st && other > 0.01 && isfinite(other), "max %.3e", other);
        outs_free(&o), ef_test_free_inputs(&in);
    }
}


static int same_bits(const outs *a, const outs *b, const bufs *in) {
    return !memcmp(a->out, b->out, in->no * 4) && !memcmp(a->dq, b->dq, in->nq * 4) &&
           !memcmp(a->dk, b->dk, in->nk * 4) && !memcmp(a->dv, b->dv, in->nv * 4);
}

/* max |x| over rows i >= lens[b] of x [B][H][rows][w] (infinite when any is NaN) */

/* Query and key padding (the contract in eformer.h): redrawing the padded rows of q, k, v and
 * dO, or filling them with NaN or +-Inf, leaves every output and gradient bitwise unchanged
 * (padded rows are never read: the landmarks, segment sizes and products cover the valid rows
 * only), and padded rows output zeros and get zero gradients. First the probe of issue 8
 * (B=2 H=2 N=320 D=32, self-attention with lengths {320, 243}: the query landmarks used to
 * average the padded queries, 0.75 relative change), then cross-attention with different
 * query and key lengths, an empty query set and fewer valid queries than landmarks. */
static void query_padding_invariance(void) {
    struct {
        ef_attn_shape s;
        int32_t ql[3], kl[3];
        const char *opts;
    } cases[] = {
        {{2, 2, 320, 320, 32, 32}, {320, 243}, {320, 243}, "landmarks=64"},
        {{3, 2, 150, 170, 24, 40}, {150, 97, 0}, {101, 170, 33}, "landmarks=32"},
        {{3, 1, 90, 70, 16, 8}, {5, 61, 90}, {70, 3, 0}, "landmarks=16,pinv_iters=3"},
    };
    for (int c = 0; c < 3; c++) {
        ef_attn_shape s = cases[c].s;
        const int32_t *ql = cases[c].ql, *kl = cases[c].kl;
        for (int path = 0; path < 2; path++) {
            char spec[96], name[256];
            snprintf(spec, sizeof spec, "nystrom:%s%s", cases[c].opts, path ? ",ref=1" : "");
            bufs in;
            ef_test_inputs(&in, s, 1200 + (uint64_t)c, 1.0f);
            outs base, o;
            outs_alloc(&base, &in), outs_alloc(&o, &in);
            ef_status st = run_q(spec, &in, ql, kl, &base, 1);
            snprintf(name, sizeof name, "%s N%d M%d q_lens={%d,%d,%d} kv_lens={%d,%d,%d}: runs",
                     spec, s.q_len, s.kv_len, ql[0], ql[1], ql[2], kl[0], kl[1], kl[2]);
            if (!ef_check(name, !st, "%s", st ? ef_last_error() : "")) {
                outs_free(&base), outs_free(&o), ef_test_free_inputs(&in);
                continue;
            }
            double z = fmax(ef_test_padded_max(base.out, s, s.q_len, s.v_dim, ql),
                            ef_test_padded_max(base.dq, s, s.q_len, s.head_dim, ql));
            z = fmax(z, fmax(ef_test_padded_max(base.dk, s, s.kv_len, s.head_dim, kl),
                             ef_test_padded_max(base.dv, s, s.kv_len, s.v_dim, kl)));
            snprintf(name, sizeof name, "%s N%d: padded rows output 0, padded dq dk dv are 0", spec,
                     s.q_len);
            ef_check_err(name, z, 0.0);
            const char *what[4] = {"redrawn", "NaN", "+Inf", "-Inf"};
            for (int mode = 0; mode < 4; mode++) {
                ef_test_spoil_rows(in.q, s, s.q_len, s.head_dim, ql, mode, 1300 + (uint64_t)mode);
                ef_test_spoil_rows(in.g, s, s.q_len, s.v_dim, ql, mode, 1310 + (uint64_t)mode);
                ef_test_spoil_rows(in.k, s, s.kv_len, s.head_dim, kl, mode, 1320 + (uint64_t)mode);
                ef_test_spoil_rows(in.v, s, s.kv_len, s.v_dim, kl, mode, 1330 + (uint64_t)mode);
                st = run_q(spec, &in, ql, kl, &o, 1);
                snprintf(name, sizeof name,
                         "%s N%d: padded q, k, v, dO rows %s: out, dq, dk, dv bitwise unchanged",
                         spec, s.q_len, what[mode]);
                ef_check(name, !st && same_bits(&base, &o, &in), "%s",
                         st                          ? ef_last_error()
                         : same_bits(&base, &o, &in) ? "identical"
                                                     : "differ");
            }
            outs_free(&base), outs_free(&o), ef_test_free_inputs(&in);
        }
    }
}

/* q_lens[b] = 0 (with or without keys) and kv_lens[b] = 0: zero output and zero gradients for
 * the whole sequence; the other sequences are not zero. */
static void empty_queries(void) {
    ef_attn_shape s = {3, 2, 9, 11, 8, 8};
    int32_t ql[3] = {0, 9, 4}, kl[3] = {11, 0, 11};
    const char *specs[] = {"nystrom:landmarks=4", "nystrom:landmarks=4,ref=1"};
    for (int i = 0; i < 2; i++) {
        bufs in;
        outs o;
        ef_test_inputs(&in, s, 78, 1.0f);
        outs_alloc(&o, &in);
        ef_status st = run_q(specs[i], &in, ql, kl, &o, 1);
        /* batches 0 and 1 are the first two thirds of every tensor */
        double m = fmax(fmax(max_abs(o.out, in.no / 3 * 2), max_abs(o.dq, in.nq / 3 * 2)),
                        fmax(max_abs(o.dk, in.nk / 3 * 2), max_abs(o.dv, in.nv / 3 * 2)));
        double other = fmax(max_abs(o.out + in.no / 3 * 2, in.no / 3), 0);
        double odk = max_abs(o.dk + in.nk / 3 * 2, in.nk / 3);
        char name[160];
        snprintf(name, sizeof name, "%s: q_lens = 0 or kv_lens = 0 -> zero output and gradients",
                 specs[i]);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            ef_check_err(name, m, 0.0);
        snprintf(name, sizeof name, "%s: ... while the third sequence (4 of 9 queries) is not",
                 specs[i]);
        ef_check(name, !st && other > 0.01 && isfinite(other) && odk > 0 && isfinite(odk),
                 "max |out| %.3e |dk| %.3e", other, odk);
        outs_free(&o), ef_test_free_inputs(&in);
    }
}

/* Forward writes every byte of `saved`, with query and key padding and empty sequences
 * (regions are sized for the full lengths, the matrices inside for the valid ones): two
 * forwards into buffers pre-filled with 0x00 and 0xFF bytes leave identical buffers. */
static void saved_fully_written(void) {
    ef_attn_shape s = {3, 2, 90, 70, 24, 40};
    int32_t ql[3] = {61, 0, 90}, kl[3] = {33, 70, 5};
    bufs in;
    ef_test_inputs(&in, s, 1400, 1.0f);
    const char *specs[] = {"nystrom:landmarks=16", "nystrom:landmarks=64,pinv_iters=2"};
    for (int i = 0; i < 2; i++) {
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, specs[i], &s);
        size_t sb = st ? 0 : ef_attn_saved_bytes(a);
        void *s0 = st ? NULL : ef_test_saved(a), *s1 = st ? NULL : ef_test_saved(a);
        float *out = ef_test_zeros(in.no);
        ef_attn_io io = {in.q, in.k, in.v, kl, out, ql};
        if (!st) memset(s0, 0x00, sb), memset(s1, 0xFF, sb);
        if (!st) st = ef_attn_forward(a, &io, s0);
        if (!st) st = ef_attn_forward(a, &io, s1);
        char name[160];
        snprintf(name, sizeof name, "%s: forward writes every byte of saved (%zu bytes)", specs[i],
                 sb);
        ef_check(name, !st && !memcmp(s0, s1, sb), "%s",
                 st                   ? ef_last_error()
                 : memcmp(s0, s1, sb) ? "differ"
                                      : "identical");
        ef_free(s0), ef_free(s1), free(out), ef_attn_free(a);
    }
    ef_test_free_inputs(&in);
}

static void inference_equals_training(void) {
    ef_attn_shape s = {2, 2, 90, 70, 32, 24};
    int32_t lens[2] = {70, 41};
    bufs in;
    ef_test_inputs(&in, s, 31, 1.0f);
    float *o1 = ef_test_zeros(in.no), *o2 = ef_test_zeros(in.no);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "nystrom:landmarks=16,pinv_iters=5", &s);
    void *sv = st ? NULL : ef_test_saved(a);
    ef_attn_io io1 = {in.q, in.k, in.v, lens, o1}, io2 = {in.q, in.k, in.v, lens, o2};
    if (!st) st = ef_attn_forward(a, &io1, NULL);
    if (!st) st = ef_attn_forward(a, &io2, sv);
    ef_check_status("inference and training forward run", st, EF_OK);
    ef_check_err("inference forward == training forward (bitwise)", ef_max_abs_diff(o1, o2, in.no),
                 0.0);
    ef_attn_free(a), ef_free(sv), free(o1), free(o2), ef_test_free_inputs(&in);
}

static void threads_bitwise(void) {
    ef_attn_shape s = {2, 3, 150, 170, 40, 24};
    int32_t lens[2] = {170, 99}, qlens[2] = {77, 150};
    bufs in;
    outs a, b;
    ef_test_inputs(&in, s, 11, 1.0f);
    outs_alloc(&a, &in), outs_alloc(&b, &in);
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    ef_status st = run_q("nystrom:landmarks=32", &in, qlens, lens, &a, 1);
    ef_set_num_threads(2);
    if (!st) st = run_q("nystrom:landmarks=32", &in, qlens, lens, &b, 1);
    ef_set_num_threads(old);
    int same = !st && !memcmp(a.out, b.out, in.no * 4) && !memcmp(a.dq, b.dq, in.nq * 4) &&
               !memcmp(a.dk, b.dk, in.nk * 4) && !memcmp(a.dv, b.dv, in.nv * 4);
    ef_check("1 vs 2 threads bitwise (out, dq, dk, dv; q_lens, kv_lens)", same, "%s",
             st     ? ef_last_error()
             : same ? "identical"
                    : "differ");
    outs_free(&a), outs_free(&b), ef_test_free_inputs(&in);
}

static void options(void) {
    ef_attn_shape s = {1, 2, 100, 80, 16, 16};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "nystrom", &s);
    ef_check_status("nystrom with defaults", st, EF_OK);
    const char *want = "nystrom:landmarks=64,pinv_iters=6,causal=0,scale=auto,seed=0,ref=0";
    const char *got = a ? ef_attn_describe(a) : "";
    ef_check("canonical spec", !strcmp(got, want), "%s", got);
    ef_attn *b = NULL;
    st = ef_attn_new(&b, got, &s);
    ef_check("canonical spec parses to the same plan", !st && !strcmp(ef_attn_describe(b), got),
             "%s", st ? ef_last_error() : ef_attn_describe(b));
    ef_attn_free(b);
    /* saved bytes: linear in N + M (K1 [N][m], K3 [m][M]) plus the m x m iterates */
    size_t sb = a ? ef_attn_saved_bytes(a) : 0;
    double lo = 4.0 * 2 * (100 * 64 + 64 * 80 + 64 * 64 * 8.0), hi = lo * 1.2;
    ef_check("saved bytes ~ B H ((N + M) m + (T + 2) m^2 + ...)", sb >= lo && sb <= hi,
             "%zu bytes, expected [%.0f, %.0f]", sb, lo, hi);
    ef_check("flops: backward > forward > 0",
             a && ef_attn_flops(a, 1) > ef_attn_flops(a, 0) && ef_attn_flops(a, 0) > 0,
             "%.3g / %.3g", a ? ef_attn_flops(a, 0) : 0, a ? ef_attn_flops(a, 1) : 0);
    ef_attn_free(a);

    st = ef_attn_new(&a, "nystrom:causal=1", &s);
    ef_check_status("causal=1 refused", st, EF_ERR_UNSUPPORTED);
    ef_check("... with a message that says why",
             st && strstr(ef_last_error(), "future") && strstr(ef_last_error(), "751"), "%s",
             ef_last_error());
    ef_check("... and no plan", a == NULL, "%p", (void *)a);
    st = ef_attn_new(&a, "nystrom:causal=1,ref=1", &s);
    ef_check_status("causal=1 refused on the reference path too", st, EF_ERR_UNSUPPORTED);

    const char *bad[] = {"nystrom:landmarks=0",    "nystrom:landmarks=1048577",
                         "nystrom:landmarks=-3",   "nystrom:landmarks=abc",
                         "nystrom:landmarks=auto", "nystrom:pinv_iters=-1",
                         "nystrom:pinv_iters=101", "nystrom:pinv_iters=2.5",
                         "nystrom:landmark=8",     "nystrom:landmarks=8,landmarks=9"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "refused: %s", bad[i]);
        st = ef_attn_new(&a, bad[i], &s);
        ef_check_status(name, st, EF_ERR_ARG);
        ef_attn_free(a), a = NULL;
    }
    const char *good[] = {"nystrom:landmarks=1", "nystrom:landmarks=1048576",
                          "nystrom:pinv_iters=0", "nystrom:pinv_iters=100"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "accepted: %s", good[i]);
        st = ef_attn_new(&a, good[i], &s);
        ef_check_status(name, st, EF_OK);
        ef_attn_free(a), a = NULL;
    }
}

int main(void) {
    options();
    versus_reference();
    gradients();
    equals_full();
    segments();
    convergence();
    padding_invariance();
    empty_sequences();
    query_padding_invariance();
    empty_queries();
    saved_fully_written();
    inference_equals_training();
    threads_bitwise();
    return ef_test_finish();
}
