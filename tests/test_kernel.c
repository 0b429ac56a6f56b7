/*
 * test_kernel.c - kernelised attention (src/attn/kernel.c): `linear` (phi = elu + 1) and
 * `performer` (FAVOR+ random features: softmax/positive, hyperbolic, trigonometric, relu).
 *
 *   1. fast path == reference path (the same spec with ref=1: the explicit N x M form
 *      phi(Q) phi(K)^T with the same features, in double), forward and backward, over kernels,
 *      causal, ortho, feature counts, odd sizes (N = 1, N = 129 across the 128-row chunk,
 *      q_len != kv_len), head dims, value dims, key padding (lengths 0 and 131) and key norms
 *      growing over three chunks (the per-chunk key shifts differ); `linear` also against
 *      elu+1 attention written out here (an oracle independent of kernel.c);
 *   2. causal forward == step-by-step decoding (ef_attn_step), also with growing key norms
 *      (the running key shift rises, S and z are rescaled), the decoding state API, and a
 *      row's output not depending on later keys of its chunk;
 *   3. padding invariance: padded keys/values set to 1e3/1e9 change no output or gradient;
 *   4. the statistics of Performer's estimators over thousands of independent feature draws
 *      against the closed forms of the paper (ALGORITHMS.md, last section), orthogonal vs iid,
 *      and the softmax-approximation error falling as the features grow;
 *   5. trig features: fast == ref at small inputs; at sigma 1, D = 64 only finiteness (the
 *      trig normaliser cancels there, docs/kernel.md "Known limits");
 *   6. determinism: seeds, feature redraws (a backward uses its own forward's features and
 *      leaves the plan on its current draw), 1 vs 2 threads bitwise;
 *   7. bad specs and small things (head_dim 1, flops, visibility).
 *
 * Tolerances of the fast-vs-reference checks: the fast path sums phi(k) v^T and phi(q) S in
 * fp32 chunk GEMMs, the reference sums the N x M form in double, so they differ by fp32
 * rounding of sums over up to 300 keys and 512 features: relative 1e-4 forward, 1e-3 backward
 * (the backward chains three such products and the cancelling G.v + delta terms of the
 * quotient rule); measured max|fast - ref| / max|ref| is <= 3e-6 forward and <= 5e-5 backward.
 * A wrong mask, chunk edge, shift or feature gives errors of order 1e-3..1.
 * Performer inputs have sigma 0.5 (values and output gradients sigma 1): the estimator's
 * variance grows like exp(|q^ + k^|^2) (ALGORITHMS.md b.3, measured pitfall), so only small
 * norms give softmax-like attention. Fast and ref use the same features and agree as well at
 * sigma 1 and 1.5 (measured <= 3e-6): the choice hides nothing, and two cases of part 1 run
 * at sigma 1 to show it. `linear` uses sigma 1 (STYLE.md).
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double TOL_F = 1e-4, TOL_B = 1e-3;
static const float SIG_P = 0.5f; /* performer inputs, see the header */
static const char *WHY_F = "fp32 chunked sums vs double N x M form";
static const char *WHY_B = "fp32 backward chains 3 products + cancelling quotient-rule terms";

/* Passes when err <= tol (NaN fails); prints the value, the tolerance and why. */
static int check_le(const char *name, double err, double tol, const char *why) {
    return ef_check(name, err <= tol, "err %.3e  tol %.1e  (%s)", err, tol, why);
}

/* ---------------------------------------------------------------------------------------------
 * Buffers and runs (as test_sparse.c)
 * ------------------------------------------------------------------------------------------- */
typedef ef_test_bufs bufs;

static int outs_nonfinite(const bufs *in, const bufs *o) {
    return ef_test_any_nonfinite(o->out, in->no) || ef_test_any_nonfinite(o->dq, in->nq) ||
           ef_test_any_nonfinite(o->dk, in->nk) || ef_test_any_nonfinite(o->dv, in->nv);
}

static int outs_identical(const bufs *in, const bufs *a, const bufs *b) {
    return !memcmp(a->out, b->out, in->no * sizeof(float)) &&
           !memcmp(a->dq, b->dq, in->nq * sizeof(float)) &&
           !memcmp(a->dk, b->dk, in->nk * sizeof(float)) &&
           !memcmp(a->dv, b->dv, in->nv * sizeof(float));
}

static uint64_t input_seed(ef_attn_shape s) {
    return 1000 + (uint64_t)s.q_len * 7 + (uint64_t)s.kv_len * 3 + (uint64_t)s.head_dim;
}

static void shape_str(char *buf, size_t cap, ef_attn_shape s, const int32_t *lens) {
    int n = snprintf(buf, cap, "B%d H%d %dx%d D%d/%d", s.batch, s.heads, s.q_len, s.kv_len,
                     s.head_dim, s.v_dim);
    for (int b = 0; lens && b < s.batch && n > 0 && (size_t)n < cap; b++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%d%s", b ? "," : " lens{", lens[b],
                      b + 1 == s.batch ? "}" : "");
}

/* fast vs ref outputs: finite, then out against TOL_F and dq, dk, dv against TOL_B. */
static void compare_outs(const char *label, const bufs *in, const bufs *fa, const bufs *rf,
                         double tol_f, double tol_b) {
    char name[640];
    int bad = outs_nonfinite(in, fa);
    snprintf(name, sizeof name, "%s: finite", label);
    ef_check(name, !bad, "%s", bad ? "NaN or inf found" : "all finite");
    snprintf(name, sizeof name, "%s: out", label);
    check_le(name, ef_max_rel_diff(fa->out, rf->out, in->no), tol_f, WHY_F);
    snprintf(name, sizeof name, "%s: dq", label);
    check_le(name, ef_max_rel_diff(fa->dq, rf->dq, in->nq), tol_b, WHY_B);
    snprintf(name, sizeof name, "%s: dk", label);
    check_le(name, ef_max_rel_diff(fa->dk, rf->dk, in->nk), tol_b, WHY_B);
    snprintf(name, sizeof name, "%s: dv", label);
    check_le(name, ef_max_rel_diff(fa->dv, rf->dv, in->nv), tol_b, WHY_B);
}

/* Keys at position t multiplied by ks0 + (ks1 - ks0) t / (kv_len - 1): growing key norms raise
 * the largest exponent of exp-type key features along the sequence, so the running key shift
 * (and the per-chunk shifts the causal backward carries its gradients across) rises. */
static void grow_keys(bufs *b, float ks0, float ks1) {
    int m = b->s.kv_len, d = b->s.head_dim;
    for (int x = 0; x < b->s.batch * b->s.heads; x++)
        for (int t = 0; t < m; t++) {
            float sc = ks0 + (ks1 - ks0) * (float)t / (float)(m > 1 ? m - 1 : 1);
            for (int c = 0; c < d; c++) b->k[((size_t)x * m + t) * d + c] *= sc;
        }
}

/* spec (fast) against spec + ",ref=1" on one configuration; keys scaled by grow_keys when
 * ks0 > 0. */
static void fast_vs_ref_grow(const char *spec, ef_attn_shape s, const int32_t *lens, float sigma,
                             float ks0, float ks1, double tol_f, double tol_b) {
    char label[512], sh[128], ref[300];
    shape_str(sh, sizeof sh, s, lens);
    if (ks0 > 0)
        snprintf(label, sizeof label, "%s %s keys x%.2g..%.2g", spec, sh, ks0, ks1);
    else
        snprintf(label, sizeof label, "%s %s", spec, sh);
    snprintf(ref, sizeof ref, "%s,ref=1", spec);
    bufs in, fa, rf;
    ef_test_inputs(&in, s, input_seed(s), sigma);
    if (ks0 > 0) grow_keys(&in, ks0, ks1);
    ef_test_outputs(&fa, &in), ef_test_outputs(&rf, &in);
    ef_status st1 = ef_test_run(spec, &in, lens, &fa);
    ef_status st2 = st1 ? st1 : ef_test_run(ref, &in, lens, &rf);
    char name[600];
    snprintf(name, sizeof name, "%s: fast and ref run", label);
    if (ef_check(name, !st1 && !st2, "%s %s", ef_status_str(st1 ? st1 : st2), ef_last_error()))
        compare_outs(label, &in, &fa, &rf, tol_f, tol_b);
    ef_test_free_outputs(&fa), ef_test_free_outputs(&rf), ef_test_free_inputs(&in);
}

static void fast_vs_ref(const char *spec, ef_attn_shape s, const int32_t *lens, float sigma) {
    fast_vs_ref_grow(spec, s, lens, sigma, 0, 0, TOL_F, TOL_B);
}

/* ---------------------------------------------------------------------------------------------
 * 1. Fast path == reference path
 * ------------------------------------------------------------------------------------------- */
typedef struct kcase {
    const char *kernel; /* NULL: linear */
    int causal, ortho, features;
    int n, m, d, dv;
    int lens[2]; /* lens[0] < 0: no padding (kv_lens = NULL) */
} kcase;

static void run_kcase(const kcase *c) {
    char spec[256];
    if (c->kernel)
        snprintf(spec, sizeof spec, "performer:kernel=%s,features=%d,ortho=%d,causal=%d", c->kernel,
                 c->features, c->ortho, c->causal);
    else
        snprintf(spec, sizeof spec, "linear:causal=%d", c->causal);
    ef_attn_shape s = {2, 2, c->n, c->m, c->d, c->dv};
    int32_t lens[2] = {c->lens[0], c->lens[1]};
    fast_vs_ref(spec, s, c->lens[0] < 0 ? NULL : lens, c->kernel ? SIG_P : 1.0f);
}

static void test_fast_vs_ref(void) {
    printf("# 1. fast == ref (ref=1: explicit N x M form in double); performer inputs sigma 0.5, "
           "linear sigma 1; tol %.0e fwd / %.0e bwd relative to max|ref|\n",
           TOL_F, TOL_B);
    /* every level of every factor appears, in varied combinations: shapes 77x77, 150x200,
     * 200x150, N = 1 and 129x129 (the 128-row chunk plus one); D 8/24/64, Dv 5/40; padding with
     * a length 0 and lengths that are not multiples of 128 (131, 133, 40, 1) */
    static const kcase cases[] = {
        {NULL, 0, 0, 0, 77, 77, 8, 5, {-1, 0}},
        {NULL, 1, 0, 0, 77, 77, 24, 40, {77, 0}},
        {NULL, 0, 0, 0, 150, 200, 64, 5, {200, 131}},
        {NULL, 1, 0, 0, 150, 200, 8, 40, {131, 200}},
        {NULL, 1, 0, 0, 200, 150, 24, 5, {0, 133}},
        {NULL, 0, 0, 0, 200, 150, 64, 40, {150, 1}},
        {NULL, 0, 0, 0, 1, 77, 24, 5, {77, 40}},
        {NULL, 1, 0, 0, 1, 130, 8, 40, {-1, 0}},
        {NULL, 1, 0, 0, 129, 129, 64, 40, {100, 0}},
        {NULL, 0, 0, 0, 129, 129, 8, 5, {-1, 0}},
        {"softmax", 0, 1, 16, 77, 77, 8, 5, {-1, 0}},
        {"softmax", 1, 1, 64, 150, 200, 24, 40, {200, 131}},
        {"softmax", 0, 0, 256, 200, 150, 64, 5, {0, 133}},
        {"softmax", 1, 0, 16, 129, 129, 64, 40, {129, 0}},
        {"softmax", 0, 1, 64, 1, 77, 24, 5, {77, 40}},
        {"softmax", 1, 0, 256, 1, 130, 8, 40, {-1, 0}},
        {"softmax", 1, 1, 256, 77, 77, 64, 5, {77, 40}},
        {"softmax", 0, 0, 64, 129, 129, 8, 40, {131 - 2, 1}},
        {"hyp", 0, 1, 64, 77, 77, 24, 40, {77, 0}},
        {"hyp", 1, 1, 16, 200, 150, 8, 5, {150, 131}},
        {"hyp", 0, 0, 16, 150, 200, 64, 40, {-1, 0}},
        {"hyp", 1, 0, 64, 129, 129, 8, 5, {129, 100}},
        {"hyp", 0, 1, 256, 1, 77, 64, 5, {0, 77}},
        {"hyp", 1, 0, 256, 77, 77, 24, 40, {-1, 0}},
        {"relu", 0, 1, 256, 150, 200, 8, 5, {200, 0}},
        {"relu", 1, 1, 16, 77, 77, 64, 40, {-1, 0}},
        {"relu", 0, 0, 64, 129, 129, 24, 40, {100, 129}},
        {"relu", 1, 0, 256, 200, 150, 24, 5, {133, 150}},
        {"relu", 1, 1, 64, 1, 77, 64, 40, {0, 77}},
        {"relu", 0, 0, 16, 200, 150, 8, 40, {150, 1}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_kcase(&cases[i]);
    /* key norms growing over 3 chunks (|k^| ~0.2 -> ~2.6 at D = 16): the per-chunk key shifts
     * differ by several units, so the causal backward's rescaling of the carried dS, dz between
     * chunks is exercised at full strength (sigma 0.5 keys scaled by 0.2 .. 2.6) */
    ef_attn_shape g = {2, 2, 300, 300, 16, 8};
    int32_t glens[2] = {300, 250};
    fast_vs_ref_grow("performer:causal=1,features=64", g, glens, SIG_P, 0.2f, 2.6f, TOL_F, TOL_B);
    fast_vs_ref_grow("performer:causal=1,kernel=hyp,features=32,ortho=0", g, NULL, SIG_P, 0.2f,
                     2.6f, TOL_F, TOL_B);
    fast_vs_ref_grow("performer:features=64", g, glens, SIG_P, 0.2f, 2.6f, TOL_F, TOL_B);
    /* sigma 1 (STYLE.md): the estimate is far from softmax there, but fast and ref must agree */
    ef_attn_shape s1 = {2, 2, 150, 200, 64, 40};
    int32_t lens1[2] = {200, 131};
    fast_vs_ref("performer:features=64,causal=1", s1, lens1, 1.0f);
    fast_vs_ref("performer:kernel=hyp,features=64", s1, lens1, 1.0f);
}

/* elu + 1 attention written out from its definition (Katharopoulos et al.; eps 1e-6 as
 * fast-transformers), in double, for one (batch, head): independent of kernel.c. */
static void linear_oracle(const float *q, const float *k, const float *v, int n, int m, int d,
                          int dv, int causal, float *out) {
    for (int i = 0; i < n; i++) {
        double den = 0, num[64] = {0};
        int lim = causal ? (i + 1 < m ? i + 1 : m) : m;
        for (int j = 0; j < lim; j++) {
            double a = 0;
            for (int t = 0; t < d; t++) {
                double x = q[i * d + t], y = k[j * d + t];
                a += (x > 0 ? x + 1 : exp(x)) * (y > 0 ? y + 1 : exp(y));
            }
            den += a;
            for (int e = 0; e < dv; e++) num[e] += a * v[j * dv + e];
        }
        for (int e = 0; e < dv; e++) out[i * dv + e] = lim > 0 ? (float)(num[e] / (den + 1e-6)) : 0;
    }
}

static void test_linear_oracle(void) {
    printf("# 1b. linear == elu+1 attention written out here (double); tol 1e-5 relative "
           "(fp32 sums of <= 50 positive terms)\n");
    ef_attn_shape s = {1, 1, 40, 50, 8, 4};
    bufs in;
    ef_test_inputs(&in, s, 4242, 1.0f);
    /* entries near the elu kink: tiny positive (1 + x rounds to 1 in fp32), zero, tiny negative */
    const float kink[] = {1e-8f, 0.0f, -1e-8f, 3e-8f, 1e-30f};
    for (int i = 0; i < 5; i++) in.k[7 * i + 3] = kink[i], in.q[11 * i + 2] = kink[i];
    for (int causal = 0; causal < 2; causal++) {
        float *want = ef_test_zeros(in.no), *got = ef_test_zeros(in.no);
        linear_oracle(in.q, in.k, in.v, s.q_len, s.kv_len, s.head_dim, s.v_dim, causal, want);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, causal ? "linear:causal=1" : "linear", &s);
        ef_attn_io io = {in.q, in.k, in.v, NULL, got};
        if (!st) st = ef_attn_forward(a, &io, NULL);
        char name[128];
        snprintf(name, sizeof name, "linear causal=%d == elu+1 definition (inputs at the kink)",
                 causal);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            check_le(name, ef_max_rel_diff(got, want, in.no), 1e-5, "fp32 vs double, 50 terms");
        ef_attn_free(a), free(want), free(got);
    }
    ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * 2. Causal forward == incremental decoding
 * ------------------------------------------------------------------------------------------- */
/* Keys of position t get sigma ks0 + (ks1 - ks0) t / (n - 1): growing norms raise the running
 * key shift of exp-type features over time, so the decoder rescales S and z many times. */
static void decode_case(const char *spec, ef_attn_shape s, float qsig, float ks0, float ks1,
                        double tol) {
    int n = s.q_len, d = s.head_dim, dv = s.v_dim, bh = s.batch * s.heads;
    bufs in;
    ef_test_inputs(&in, s, input_seed(s) + 77, 1.0f);
    for (size_t i = 0; i < in.nq; i++) in.q[i] *= qsig;
    grow_keys(&in, ks0, ks1);
    float *fwd = ef_test_zeros(in.no), *dec = ef_test_zeros(in.no);
    float *qt = ef_test_zeros((size_t)bh * d), *kt = ef_test_zeros((size_t)bh * d);
    float *vt = ef_test_zeros((size_t)bh * dv), *ot = ef_test_zeros((size_t)bh * dv);
    ef_attn *a = NULL;
    ef_attn_state *st = NULL;
    ef_status rc = ef_attn_new(&a, spec, &s);
    ef_attn_io io = {in.q, in.k, in.v, NULL, fwd};
    if (!rc) rc = ef_attn_forward(a, &io, NULL);
    if (!rc) rc = ef_attn_state_new(&st, a);
    int64_t pos_ok = 1;
    for (int t = 0; t < n && !rc; t++) {
        for (int x = 0; x < bh; x++) {
            memcpy(qt + (size_t)x * d, in.q + ((size_t)x * n + t) * d, sizeof(float) * d);
            memcpy(kt + (size_t)x * d, in.k + ((size_t)x * n + t) * d, sizeof(float) * d);
            memcpy(vt + (size_t)x * dv, in.v + ((size_t)x * n + t) * dv, sizeof(float) * dv);
        }
        rc = ef_attn_step(a, st, qt, kt, vt, ot);
        for (int x = 0; x < bh; x++)
            memcpy(dec + ((size_t)x * n + t) * dv, ot + (size_t)x * dv, sizeof(float) * dv);
        pos_ok &= ef_attn_state_position(st) == t + 1;
    }
    char name[300], sh[128];
    shape_str(sh, sizeof sh, s, NULL);
    snprintf(name, sizeof name, "%s %s key sigma %.2g..%.2g: decode runs, position counts", spec,
             sh, ks0, ks1);
    if (ef_check(name, !rc && pos_ok, "%s position %lld after %d steps", rc ? ef_last_error() : "",
                 (long long)ef_attn_state_position(st), n)) {
        snprintf(name, sizeof name, "%s %s key sigma %.2g..%.2g: step t == row t of causal forward",
                 spec, sh, ks0, ks1);
        check_le(name, ef_max_rel_diff(dec, fwd, in.no), tol,
                 "fp32 running sums vs chunk GEMMs, rel. to max|out|");
        /* reset: back to position 0, and the first step reproduces the first output exactly */
        ef_status r2 = ef_attn_state_reset(st);
        int64_t p0 = ef_attn_state_position(st);
        for (int x = 0; x < bh; x++) {
            memcpy(qt + (size_t)x * d, in.q + (size_t)x * n * d, sizeof(float) * d);
            memcpy(kt + (size_t)x * d, in.k + (size_t)x * n * d, sizeof(float) * d);
            memcpy(vt + (size_t)x * dv, in.v + (size_t)x * n * dv, sizeof(float) * dv);
        }
        if (!r2) r2 = ef_attn_step(a, st, qt, kt, vt, ot);
        double e = 0;
        for (int x = 0; x < bh && !r2; x++)
            e = fmax(e, ef_max_abs_diff(ot + (size_t)x * dv, dec + (size_t)x * n * dv, (size_t)dv));
        snprintf(name, sizeof name, "%s: reset -> position 0, first output reproduced", spec);
        ef_check(name, !r2 && p0 == 0 && e == 0,
                 "position %lld, max|diff| %.3e (tol 0: same "
                 "arithmetic on the same empty state) %s",
                 (long long)p0, e, r2 ? ef_last_error() : "");
    }
    ef_attn_state_free(st), ef_attn_free(a);
    free(fwd), free(dec), free(qt), free(kt), free(vt), free(ot), ef_test_free_inputs(&in);
}

static void test_decode(void) {
    printf("# 2. causal forward == ef_attn_step decoding (tol 1e-5 linear, 1e-4 performer: fp32 "
           "running sums vs chunked GEMMs)\n");
    ef_attn_shape s = {2, 2, 150, 150, 16, 8}; /* 150 positions: across the 128-position chunk */
    decode_case("linear:causal=1", s, 1.0f, 1.0f, 1.0f, 1e-5);
    decode_case("linear:causal=1", (ef_attn_shape){1, 3, 131, 131, 24, 5}, 1.0f, 0.5f, 2.0f, 1e-5);
    decode_case("performer:causal=1", s, SIG_P, SIG_P, SIG_P, 1e-4);
    /* |k^| = |k| / 2 grows from ~0.2 to ~2.6: the largest exponent w.k^ - |k^|^2/2 of a key rises
     * with it, so the running shift increases at many steps and S, z are rescaled each time */
    decode_case("performer:causal=1", s, SIG_P, 0.1f, 1.3f, 1e-4);
    decode_case("performer:causal=1,kernel=hyp,features=64,ortho=0", s, SIG_P, 0.1f, 1.3f, 1e-4);
    decode_case("performer:causal=1,kernel=relu,features=64", s, SIG_P, 0.1f, 1.3f, 1e-4);
    decode_case("performer:causal=1,kernel=trig,features=64", s, 0.2f, 0.2f, 0.2f, 1e-4);
}

/* A row's output may not depend on keys after it. Within a 128-position chunk the fast causal
 * path shifts all key features of the chunk by one maximum that includes later keys; when a
 * later key's exponent exceeds an earlier one's by more than ~87 (fp32 exp underflow), the
 * earlier keys' features become 0 and the earlier rows see nothing. Minimal input: key 0 with
 * |k| = 40 (its exponents w.k^ - |k^|^2/2 are all below ~-120), key 1 = 0 (exponents 0). Row 0
 * sees key 0 only, so for any positive kernel its output is exactly v0. */
static void test_causal_future_key(void) {
    printf("# 2c. causal: row 0 sees only key 0 -> out = v0 exactly, whatever key 1 is "
           "(tol 1e-5 relative: a single fp32 ratio)\n");
    ef_attn_shape s = {1, 1, 2, 2, 16, 1};
    float q[32], k[32], v[2] = {3.0f, -1.0f}, out[2], so[1];
    for (int t = 0; t < 16; t++) {
        q[t] = 0.1f * (float)(t % 3), q[16 + t] = 0.1f;
        k[t] = t % 2 ? 10.0f : -10.0f, k[16 + t] = 0.0f;
    }
    const char *specs[] = {"performer:causal=1", "performer:causal=1,ref=1"};
    for (int i = 0; i < 2; i++) {
        ef_attn *a = NULL;
        ef_attn_state *st = NULL;
        ef_status rc = ef_attn_new(&a, specs[i], &s);
        ef_attn_io io = {q, k, v, NULL, out};
        if (!rc) rc = ef_attn_forward(a, &io, NULL);
        if (!rc) rc = ef_attn_state_new(&st, a);
        if (!rc) rc = ef_attn_step(a, st, q, k, v, so);
        char name[200];
        snprintf(name, sizeof name, "%s: |k0|=40, k1=0: forward row 0 == v0", specs[i]);
        if (rc)
            ef_check(name, 0, "%s", ef_last_error());
        else
            check_le(name, fabs(out[0] - 3.0) / 3.0, 1e-5, "one visible key: weight exactly 1");
        snprintf(name, sizeof name, "%s: |k0|=40, k1=0: decoding step 0 == v0", specs[i]);
        if (!rc) check_le(name, fabs(so[0] - 3.0) / 3.0, 1e-5, "one visible key: weight exactly 1");
        ef_attn_state_free(st), ef_attn_free(a);
    }
}

static void test_state_api(void) {
    printf("# 2b. decoding state API: errors and position\n");
    ef_attn_shape s = {1, 2, 8, 8, 4, 3};
    ef_attn *lin = NULL, *lin2 = NULL, *nc = NULL, *fl = NULL;
    ef_attn_state *st = NULL, *st2 = (ef_attn_state *)&st; /* non-NULL junk: must be reset */
    ef_attn_new(&lin, "linear:causal=1", &s);
    ef_attn_new(&lin2, "performer:causal=1,features=8", &s);
    ef_attn_new(&nc, "linear", &s);
    ef_attn_new(&fl, "flash:causal=1", &s);
    ef_check("state API plans created", lin && lin2 && nc && fl, "%s", ef_last_error());
    if (!(lin && lin2 && nc && fl)) goto done;
    ef_check_status("state_new on causal=0 linear -> UNSUPPORTED", ef_attn_state_new(&st2, nc),
                    EF_ERR_UNSUPPORTED);
    ef_check("... and *out is set to NULL", st2 == NULL, "%p", (void *)st2);
    ef_check_status("state_new on flash:causal=1 -> UNSUPPORTED", ef_attn_state_new(&st2, fl),
                    EF_ERR_UNSUPPORTED);
    ef_check_status("state_new(NULL out) -> ARG", ef_attn_state_new(NULL, lin), EF_ERR_ARG);
    ef_check_status("state_new(NULL plan) -> ARG", ef_attn_state_new(&st2, NULL), EF_ERR_ARG);
    ef_check_status("state_new on linear:causal=1", ef_attn_state_new(&st, lin), EF_OK);
    if (!st) goto done;
    float q[8] = {0.1f, 0.2f, -0.3f, 0.4f, 0.5f, -0.6f, 0.7f, 0.8f}, k[8],
          v[6] = {1, 2, 3, 4, 5, 6};
    float o[6];
    memcpy(k, q, sizeof k);
    ef_check("position of a new state is 0", ef_attn_state_position(st) == 0, "%lld",
             (long long)ef_attn_state_position(st));
    ef_check_status("step(NULL plan) -> ARG", ef_attn_step(NULL, st, q, k, v, o), EF_ERR_ARG);
    ef_check_status("step(NULL state) -> ARG", ef_attn_step(lin, NULL, q, k, v, o), EF_ERR_ARG);
    ef_check_status("step(NULL q) -> ARG", ef_attn_step(lin, st, NULL, k, v, o), EF_ERR_ARG);
    ef_check_status("step(NULL k) -> ARG", ef_attn_step(lin, st, q, NULL, v, o), EF_ERR_ARG);
    ef_check_status("step(NULL v) -> ARG", ef_attn_step(lin, st, q, k, NULL, o), EF_ERR_ARG);
    ef_check_status("step(NULL out) -> ARG", ef_attn_step(lin, st, q, k, v, NULL), EF_ERR_ARG);
    ef_check_status("step with a state of another plan -> ARG", ef_attn_step(lin2, st, q, k, v, o),
                    EF_ERR_ARG);
    ef_check("failed steps consume no position", ef_attn_state_position(st) == 0, "%lld",
             (long long)ef_attn_state_position(st));
    int ok = 1;
    for (int t = 0; t < 5; t++) ok &= ef_attn_step(lin, st, q, k, v, o) == EF_OK;
    ef_check("5 steps -> position 5", ok && ef_attn_state_position(st) == 5, "%lld",
             (long long)ef_attn_state_position(st));
    ef_check_status("state_reset", ef_attn_state_reset(st), EF_OK);
    ef_check("reset -> position 0", ef_attn_state_position(st) == 0, "%lld",
             (long long)ef_attn_state_position(st));
    ef_check_status("state_reset(NULL) -> ARG", ef_attn_state_reset(NULL), EF_ERR_ARG);
    ef_check("state_position(NULL) == -1", ef_attn_state_position(NULL) == -1, "%lld",
             (long long)ef_attn_state_position(NULL));
    ef_attn_state_free(NULL); /* a no-op */
done:
    ef_attn_state_free(st);
    ef_attn_free(lin), ef_attn_free(lin2), ef_attn_free(nc), ef_attn_free(fl);
}

/* ---------------------------------------------------------------------------------------------
 * 3. Padding invariance
 * ------------------------------------------------------------------------------------------- */
static void test_padding_invariance(void) {
    printf("# 3. padded keys/values set to 1e3/1e9 change nothing (tol 0: padded features are "
           "zeroed before any sum, so the arithmetic is identical)\n");
    const char *specs[] = {"linear", "linear:causal=1", "performer", "performer:causal=1",
                           "performer:kernel=hyp,features=64,causal=1"};
    ef_attn_shape s = {2, 2, 150, 150, 16, 8};
    int32_t lens[2] = {131, 70}; /* padding inside the second chunk and across both */
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        int perf = strncmp(specs[i], "performer", 9) == 0;
        bufs in, a, b;
        ef_test_inputs(&in, s, 4321, perf ? SIG_P : 1.0f);
        ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
        ef_status st = ef_test_run(specs[i], &in, lens, &a);
        for (int x = 0; x < s.batch * s.heads; x++) {
            int L = lens[x / s.heads];
            for (int j = L; j < s.kv_len; j++) {
                for (int t = 0; t < s.head_dim; t++)
                    in.k[((size_t)x * s.kv_len + j) * s.head_dim + t] = 1e3f;
                for (int t = 0; t < s.v_dim; t++)
                    in.v[((size_t)x * s.kv_len + j) * s.v_dim + t] = 1e9f;
            }
        }
        if (!st) st = ef_test_run(specs[i], &in, lens, &b);
        char name[200];
        snprintf(name, sizeof name, "%s lens{131,70}: runs", specs[i]);
        if (ef_check(name, !st, "%s", st ? ef_last_error() : "")) {
            snprintf(name, sizeof name, "%s: padding changes no out", specs[i]);
            check_le(name, ef_max_abs_diff(a.out, b.out, in.no), 0.0, "phi zeroed after the map");
            snprintf(name, sizeof name, "%s: ... no dq", specs[i]);
            check_le(name, ef_max_abs_diff(a.dq, b.dq, in.nq), 0.0, "phi zeroed after the map");
            snprintf(name, sizeof name, "%s: ... no dk, dv (padded rows 0)", specs[i]);
            check_le(name,
                     fmax(ef_max_abs_diff(a.dk, b.dk, in.nk), ef_max_abs_diff(a.dv, b.dv, in.nv)),
                     0.0, "phi zeroed after the map");
            double pad = 0;
            for (int x = 0; x < s.batch * s.heads; x++)
                for (int j = lens[x / s.heads]; j < s.kv_len; j++)
                    for (int t = 0; t < s.head_dim; t++)
                        pad = fmax(pad, fabs(b.dk[((size_t)x * s.kv_len + j) * s.head_dim + t]));
            snprintf(name, sizeof name, "%s: dk of padded keys is 0", specs[i]);
            check_le(name, pad, 0.0, "invisible keys get no gradient");
        }
        ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
    }
}

/* A fully padded sequence (kv_lens = 0): every row sees nothing -> exactly zero output and
 * gradients (the documented rule), never NaN from 0/0. */
static void test_empty_rows(void) {
    printf("# 3b. kv_lens = 0: zero output and gradients, exactly\n");
    const char *specs[] = {"linear",
                           "linear:causal=1",
                           "performer",
                           "performer:causal=1,kernel=hyp",
                           "performer:kernel=relu",
                           "performer:kernel=trig,causal=1"};
    ef_attn_shape s = {2, 2, 130, 140, 8, 8};
    int32_t lens[2] = {0, 140};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        bufs in, o;
        ef_test_inputs(&in, s, 77, strncmp(specs[i], "perf", 4) ? 1.0f : SIG_P);
        ef_test_outputs(&o, &in);
        ef_status st = ef_test_run(specs[i], &in, lens, &o);
        double m = 0; /* batch 0 is the first half of every tensor */
        for (size_t j = 0; j < in.no / 2; j++) m = fmax(m, fabs(o.out[j]));
        for (size_t j = 0; j < in.nq / 2; j++) m = fmax(m, fabs(o.dq[j]));
        for (size_t j = 0; j < in.nk / 2; j++) m = fmax(m, fabs(o.dk[j]));
        for (size_t j = 0; j < in.nv / 2; j++) m = fmax(m, fabs(o.dv[j]));
        int bad = outs_nonfinite(&in, &o);
        char name[160];
        snprintf(name, sizeof name, "%s: kv_len 0 -> out, dq, dk, dv max|value|", specs[i]);
        if (st || bad)
            ef_check(name, 0, "%s", st ? ef_last_error() : "NaN or inf");
        else
            check_le(name, m, 0.0, "a row that sees no key outputs 0 and gets 0 gradients");
        ef_test_free_outputs(&o), ef_test_free_inputs(&in);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 4. Statistics of Performer's estimators
 *
 * The kernel estimate K^(x, y) = phi(x).phi(y) of one feature draw is read through the public
 * API exactly: a plan with batch P, heads 1, q_len 1, kv_len 1, v_dim 1, scale 1 (so the plan
 * estimates SM(x, y) = exp(x.y): the 1/sqrt(d) is folded into x and y, as in the paper),
 * stabilize=0 (no shifts) and eps=1 gives out = K^ v / (K^ + 1); with v = 1,
 * K^ = out / (1 - out). fp32 rounding of out costs ~1e-7 relative in K^, far below the
 * estimator's spread (MSE ~1e-3..1e-1). Each seed is an independent draw of W; batch entry p
 * carries pair p, so one plan estimates all pairs with the same draw.
 * ------------------------------------------------------------------------------------------- */
enum { SD = 16, NPAIR = 5 };

typedef struct kpair {
    float x[SD], y[SD];
    double sm, s2, d2, nx, ny; /* exp(x.y), |x+y|^2, |x-y|^2, |x|^2, |y|^2 */
} kpair;

/* Pairs with |x+y|^2 = 0.5 .. 1.9 and |x-y|^2 = 0.4 .. 1.8: x = a u, y = b (c u + sqrt(1-c^2) w)
 * for orthonormal u, w drawn once. */
static void make_pairs(kpair *P) {
    static const double abc[NPAIR][3] = {
        {0.5, 0.5, 0.0}, {0.6, 0.6, 0.4}, {0.8, 0.6, 0.5}, {0.9, 0.8, 0.3}, {1.0, 0.7, -0.2}};
    for (int p = 0; p < NPAIR; p++) {
        float u[SD], w[SD];
        ef_rng_normal(99, (uint64_t)p, 0, SD, u);
        ef_rng_normal(99, (uint64_t)p + 100, 0, SD, w);
        double nu = 0, uw = 0, nw = 0;
        for (int t = 0; t < SD; t++) nu += (double)u[t] * u[t];
        for (int t = 0; t < SD; t++) u[t] = (float)(u[t] / sqrt(nu)), uw += (double)u[t] * w[t];
        for (int t = 0; t < SD; t++) w[t] = (float)(w[t] - uw * u[t]), nw += (double)w[t] * w[t];
        for (int t = 0; t < SD; t++) w[t] = (float)(w[t] / sqrt(nw));
        double a = abc[p][0], b = abc[p][1], c = abc[p][2], sn = sqrt(1 - c * c);
        kpair *k = &P[p];
        k->sm = k->s2 = k->d2 = k->nx = k->ny = 0;
        for (int t = 0; t < SD; t++)
            k->x[t] = (float)(a * u[t]), k->y[t] = (float)(b * (c * u[t] + sn * w[t]));
        double xy = 0;
        for (int t = 0; t < SD; t++) {
            double xi = k->x[t], yi = k->y[t];
            xy += xi * yi, k->s2 += (xi + yi) * (xi + yi), k->d2 += (xi - yi) * (xi - yi);
            k->nx += xi * xi, k->ny += yi * yi;
        }
        k->sm = exp(xy);
    }
}

/* Closed forms (Choromanski et al., Lemma 2 / Theorem 2; ALGORITHMS.md) for iid features with m
 * random projections: the plan's features=m (softmax: m features; hyp, trig: 2m). */
static double mse_pos(const kpair *k, int m) {
    return exp(k->s2) * k->sm * k->sm * (1 - exp(-k->s2)) / m;
}
static double mse_hyp(const kpair *k, int m) { return 0.5 * (1 - exp(-k->s2)) * mse_pos(k, m); }
static double mse_trig(const kpair *k, int m) {
    double t = 1 - exp(-k->d2);
    return exp(k->s2) / (k->sm * k->sm) * t * t / (2.0 * m);
}
/* Orthogonal positive features: every ordered pair of rows inside one orthogonal block lowers
 * the MSE by at least 2/(d+2) (SM - exp(-(|x|^2+|y|^2)/2))^2 / m^2 (the paper's proof, pair by
 * pair). With one block (m <= d) this is the paper's 2(m-1)/(m(d+2)) (...)^2; kernel.c draws
 * ceil(m/d) independent blocks, so the pairs are sum_b r_b (r_b - 1). */
static double mse_ortho_bound(const kpair *k, int m, int d) {
    double pairs = 0;
    for (int b0 = 0; b0 < m; b0 += d) {
        double r = m - b0 < d ? m - b0 : d;
        pairs += r * (r - 1);
    }
    double gap = k->sm - exp(-(k->nx + k->ny) / 2);
    return mse_pos(k, m) - 2.0 * pairs / ((double)m * m * (d + 2)) * gap * gap;
}

/* err[s * NPAIR + p] = K^_s(x_p, y_p) - SM(x_p, y_p) for seeds 1..S. Returns 0 on failure. */
static int draw_errors(const char *kernel, int m, int ortho, int S, const kpair *P, double *err) {
    ef_attn_shape sh = {NPAIR, 1, 1, 1, SD, 1};
    float x[NPAIR * SD], y[NPAIR * SD], v[NPAIR], out[NPAIR];
    for (int p = 0; p < NPAIR; p++) {
        memcpy(x + p * SD, P[p].x, sizeof P[p].x), memcpy(y + p * SD, P[p].y, sizeof P[p].y);
        v[p] = 1.0f;
    }
    for (int s = 0; s < S; s++) {
        char spec[200];
        snprintf(spec, sizeof spec,
                 "performer:kernel=%s,features=%d,ortho=%d,stabilize=0,eps=1,scale=1,seed=%d",
                 kernel, m, ortho, 1 + s);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &sh);
        ef_attn_io io = {x, y, v, NULL, out};
        if (!st) st = ef_attn_forward(a, &io, NULL);
        ef_attn_free(a);
        if (st) {
            ef_check("estimator draws run", 0, "%s: %s", spec, ef_last_error());
            return 0;
        }
        for (int p = 0; p < NPAIR; p++) err[s * NPAIR + p] = out[p] / (1.0 - out[p]) - P[p].sm;
    }
    return 1;
}

typedef struct mstat {
    double bias, sd_bias; /* mean error and its standard error */
    double mse, se_mse;   /* mean squared error and its standard error */
} mstat;

static mstat moments(const double *err, int S, int p) {
    double s1 = 0, s2 = 0, s4 = 0;
    for (int s = 0; s < S; s++) {
        double e = err[s * NPAIR + p];
        s1 += e, s2 += e * e, s4 += e * e * e * e;
    }
    mstat r;
    r.bias = s1 / S, r.mse = s2 / S;
    r.sd_bias = sqrt(fmax(r.mse - r.bias * r.bias, 0) / S);
    r.se_mse = sqrt(fmax(s4 / S - r.mse * r.mse, 0) / S);
    return r;
}

static const char *WHY_4SE = "4 standard errors of the sample";

/* Unbiasedness and the MSE against its closed form, for every pair. */
static void check_closed_form(const char *label, const double *err, int S, const kpair *P,
                              double (*pred)(const kpair *, int), int m) {
    for (int p = 0; p < NPAIR; p++) {
        mstat r = moments(err, S, p);
        char name[200];
        snprintf(name, sizeof name, "%s m=%d pair %d (|x+y|^2 %.2f): |mean K^ - SM|", label, m, p,
                 P[p].s2);
        check_le(name, fabs(r.bias), 4 * r.sd_bias, WHY_4SE);
        double want = pred(&P[p], m);
        snprintf(name, sizeof name, "%s m=%d pair %d: |MSE %.5f - closed form %.5f|", label, m, p,
                 r.mse, want);
        check_le(name, fabs(r.mse - want), 4 * r.se_mse, WHY_4SE);
    }
}

static void test_estimators(void) {
    const int S = 4000, S16 = 8000, d = SD;
    printf("# 4. Performer estimators: K^ = phi(x).phi(y) over independent feature draws "
           "(seeds), d=%d, %d pairs, scale=1, stabilize=0, eps=1 (K^ = out/(1-out))\n",
           d, NPAIR);
    kpair P[NPAIR];
    make_pairs(P);
    for (int p = 0; p < NPAIR; p++)
        printf("#   pair %d: |x+y|^2 %.3f  |x-y|^2 %.3f  SM %.4f\n", p, P[p].s2, P[p].d2, P[p].sm);
    double *ep = malloc(sizeof(double) * S * NPAIR), *eh = malloc(sizeof(double) * S * NPAIR);
    double *et = malloc(sizeof(double) * S * NPAIR), *eo = malloc(sizeof(double) * S * NPAIR);
    double *ei16 = malloc(sizeof(double) * S16 * NPAIR),
           *eo16 = malloc(sizeof(double) * S16 * NPAIR);
    if (!ep || !eh || !et || !eo || !ei16 || !eo16) {
        ef_check("estimator buffers", 0, "out of memory");
        goto done;
    }
    printf("#   iid features, m = 64, %d draws: mean (unbiased) and MSE vs the closed forms\n", S);
    /* one thread: 5 tiny work items per call, where a parallel region costs more than the work */
    int old_threads = ef_get_num_threads();
    ef_set_num_threads(1);
    int ok = draw_errors("softmax", 64, 0, S, P, ep) && draw_errors("hyp", 64, 0, S, P, eh) &&
             draw_errors("trig", 64, 0, S, P, et) && draw_errors("softmax", 64, 1, S, P, eo) &&
             draw_errors("softmax", 16, 0, S16, P, ei16) &&
             draw_errors("softmax", 16, 1, S16, P, eo16);
    ef_set_num_threads(old_threads);
    if (!ok) goto done;
    check_closed_form("positive iid", ep, S, P, mse_pos, 64);
    check_closed_form("hyperbolic iid", eh, S, P, mse_hyp, 64);
    check_closed_form("trigonometric iid", et, S, P, mse_trig, 64);
    check_closed_form("positive iid", ei16, S16, P, mse_pos, 16);

    /* hyperbolic / positive MSE ratio = (1 - exp(-|x+y|^2)) / 2. Same seed = same W for both
     * kernels, so the two errors are paired: ratio-of-means estimator R = sum eh^2 / sum ep^2 with
     * the delta-method standard error sd(eh^2 - R ep^2) / (sqrt(S) mean ep^2). */
    printf("#   hyperbolic vs positive (same draws): MSE ratio vs (1 - exp(-|x+y|^2))/2\n");
    for (int p = 0; p < NPAIR; p++) {
        double a = 0, b = 0;
        for (int s = 0; s < S; s++)
            a += eh[s * NPAIR + p] * eh[s * NPAIR + p], b += ep[s * NPAIR + p] * ep[s * NPAIR + p];
        double R = a / b, v = 0;
        for (int s = 0; s < S; s++) {
            double r =
                eh[s * NPAIR + p] * eh[s * NPAIR + p] - R * ep[s * NPAIR + p] * ep[s * NPAIR + p];
            v += r * r;
        }
        double se = sqrt(v / S) / (sqrt((double)S) * (b / S)), want = 0.5 * (1 - exp(-P[p].s2));
        char name[200];
        snprintf(name, sizeof name, "hyp/pos MSE ratio pair %d: |%.4f - %.4f|", p, R, want);
        check_le(name, fabs(R - want), 4 * se, "4 delta-method standard errors");
    }

    /* orthogonal blocks: unbiased, below the paper's bound, and below iid at the same m */
    printf("#   orthogonal features: unbiased, MSE <= bound (+4 SE), lower than iid (paired)\n");
    const double *eos[2] = {eo16, eo}, *eis[2] = {ei16, ep};
    const int ms[2] = {16, 64}, Ss[2] = {S16, S};
    for (int c = 0; c < 2; c++) {
        int m = ms[c], n = Ss[c];
        for (int p = 0; p < NPAIR; p++) {
            mstat r = moments(eos[c], n, p);
            char name[200];
            snprintf(name, sizeof name, "positive ortho m=%d pair %d: |mean K^ - SM|", m, p);
            check_le(name, fabs(r.bias), 4 * r.sd_bias, WHY_4SE);
            double bound = mse_ortho_bound(&P[p], m, d);
            snprintf(name, sizeof name, "positive ortho m=%d pair %d: MSE %.5f - bound %.5f", m, p,
                     r.mse, bound);
            check_le(name, r.mse - bound, 4 * r.se_mse, WHY_4SE);
        }
        /* ortho below iid: per draw s, T_s = sum_p (e_iid^2 - e_ortho^2) / closed-form iid MSE_p
         * (same seed: the ortho W is Gram-Schmidt of the iid W, so the pair is correlated and
         * the per-draw difference is the right sample; summing per draw keeps the pairs'
         * correlation through the shared W inside the variance). At m = 16 the pairs with
         * |x+y|^2 > 1.25 are left out: the 4th moment of the positive estimator grows like
         * exp(6 |x+y|^2) / m^3, so there a few huge draws dominate and no SE is trustworthy. */
        double mt = 0, vt = 0;
        int used = 0;
        for (int p = 0; p < NPAIR; p++) used += m > d || P[p].s2 <= 1.25;
        for (int s = 0; s < n; s++) {
            double t = 0;
            for (int p = 0; p < NPAIR; p++) {
                if (m <= d && P[p].s2 > 1.25) continue;
                double ei = eis[c][s * NPAIR + p], eo_ = eos[c][s * NPAIR + p];
                t += (ei * ei - eo_ * eo_) / mse_pos(&P[p], m);
            }
            mt += t, vt += t * t;
        }
        mt /= n, vt = vt / n - mt * mt;
        double se = sqrt(fmax(vt, 0) / n);
        char name[200];
        snprintf(name, sizeof name, "ortho below iid, m=%d, %d pairs: mean paired normalised gain",
                 m, used);
        ef_check(name, mt > 3 * se,
                 "gain %.4f must exceed 3 SE = %.4f (one-sided, 3 standard errors "
                 "of the per-draw mean)",
                 mt, 3 * se);
    }
done:
    free(ep), free(eh), free(et), free(eo), free(ei16), free(eo16);
}

/* The approximation error of softmax attention falls as the features grow. */
static void test_convergence(void) {
    printf("# 4b. performer vs full attention: N=64, D=16, sigma 0.5, mean over 5 seeds of "
           "||perf - full||_F / ||full||_F\n");
    ef_attn_shape s = {1, 2, 64, 64, 16, 16};
    bufs in;
    ef_test_inputs(&in, s, 555, SIG_P);
    float *full = ef_test_zeros(in.no), *perf = ef_test_zeros(in.no);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "full", &s);
    ef_attn_io io = {in.q, in.k, in.v, NULL, full};
    if (!st) st = ef_attn_forward(a, &io, NULL);
    ef_attn_free(a);
    const int ms[4] = {16, 64, 256, 1024};
    for (int ortho = 1; ortho >= 0 && !st; ortho--) {
        double err[4] = {0};
        for (int i = 0; i < 4 && !st; i++) {
            for (int seed = 0; seed < 5 && !st; seed++) {
                char spec[128];
                snprintf(spec, sizeof spec, "performer:features=%d,ortho=%d,seed=%d", ms[i], ortho,
                         17 + seed);
                st = ef_attn_new(&a, spec, &s);
                ef_attn_io io2 = {in.q, in.k, in.v, NULL, perf};
                if (!st) st = ef_attn_forward(a, &io2, NULL);
                ef_attn_free(a);
                double num = 0, den = 0;
                for (size_t j = 0; j < in.no; j++) {
                    num += ((double)perf[j] - full[j]) * ((double)perf[j] - full[j]);
                    den += (double)full[j] * full[j];
                }
                err[i] += sqrt(num / den) / 5;
            }
            printf("#   ortho=%d m = %4d: mean relative error %.4e\n", ortho, ms[i], err[i]);
        }
        char name[128];
        snprintf(name, sizeof name, "ortho=%d: convergence runs", ortho);
        if (!ef_check(name, !st, "%s", st ? ef_last_error() : "")) break;
        for (int i = 0; i + 1 < 4; i++) {
            snprintf(name, sizeof name, "ortho=%d: error falls m=%d -> %d: err(4m)/err(m)", ortho,
                     ms[i], ms[i + 1]);
            check_le(name, err[i + 1] / err[i], 0.8,
                     "MC error ~ 1/sqrt(m): expect ~0.5; 0.8 = noise of 5 seeds");
        }
        /* measured ~0.2, not 1/8: 5 seeds on one input, and with ortho=1 the orthogonal gain
         * shrinks for m > d (blocks of d rows are independent) */
        snprintf(name, sizeof name, "ortho=%d: err(m=1024) / err(m=16)", ortho);
        check_le(name, err[3] / err[0], 0.25, "1/sqrt(64) = 0.125 expected, 5 seeds");
    }
    free(full), free(perf), ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * 5. Trigonometric features
 * ------------------------------------------------------------------------------------------- */
static void test_trig(void) {
    printf("# 5. trig features: fast == ref at sigma 0.2 (same tolerances as 1)\n");
    fast_vs_ref("performer:kernel=trig,features=64", (ef_attn_shape){2, 2, 150, 200, 24, 5},
                (const int32_t[]){200, 131}, 0.2f);
    fast_vs_ref("performer:kernel=trig,features=16,ortho=0,causal=1",
                (ef_attn_shape){2, 2, 129, 129, 8, 40}, (const int32_t[]){0, 100}, 0.2f);
    fast_vs_ref("performer:kernel=trig,features=256,causal=1", (ef_attn_shape){2, 2, 77, 77, 64, 5},
                NULL, 0.2f);
    fast_vs_ref("performer:kernel=trig,features=64,ortho=0", (ef_attn_shape){2, 2, 1, 77, 24, 40},
                (const int32_t[]){77, 0}, 0.2f);
    /* Known property (docs/kernel.md, "Known limits"): at sigma 1, D = 64 the trig estimate of
     * each score can be negative and the normaliser sum_j phi(q).phi(k_j) cancels; fp32 and
     * double then differ by 1e-4..1e-3 relative (here ~1e-4 in out, ~5e-4 in dq; more where a
     * normaliser is near 0). Only finiteness is asserted; the difference is printed. */
    printf("# 5b. trig at sigma 1, D=64: normaliser cancels (known); only finiteness asserted\n");
    ef_attn_shape s = {2, 2, 100, 100, 64, 16};
    const char *sp[2] = {"performer:kernel=trig", "performer:kernel=trig,causal=1"};
    for (int i = 0; i < 2; i++) {
        char ref[128], name[200];
        snprintf(ref, sizeof ref, "%s,ref=1", sp[i]);
        bufs in, fa, rf;
        ef_test_inputs(&in, s, 9090, 1.0f);
        ef_test_outputs(&fa, &in), ef_test_outputs(&rf, &in);
        ef_status st = ef_test_run(sp[i], &in, NULL, &fa);
        if (!st) st = ef_test_run(ref, &in, NULL, &rf);
        int bad = st || outs_nonfinite(&in, &fa) || outs_nonfinite(&in, &rf);
        snprintf(name, sizeof name, "%s sigma 1 D64: fast and ref finite", sp[i]);
        ef_check(name, !bad,
                 "%s; measured fast vs ref out %.2e, dq %.2e (not asserted: cancelling "
                 "normaliser)",
                 st ? ef_last_error() : "finite", ef_max_rel_diff(fa.out, rf.out, in.no),
                 ef_max_rel_diff(fa.dq, rf.dq, in.nq));
        ef_test_free_outputs(&fa), ef_test_free_outputs(&rf), ef_test_free_inputs(&in);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 6. Determinism
 * ------------------------------------------------------------------------------------------- */
static void test_determinism(void) {
    printf("# 6. determinism: seeds, redraw, threads\n");
    ef_attn_shape s = {2, 2, 90, 90, 16, 8};
    bufs in, a, b;
    ef_test_inputs(&in, s, 6060, SIG_P);
    ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
    ef_status st = ef_test_run("performer:seed=7,features=64", &in, NULL, &a);
    if (!st) st = ef_test_run("performer:seed=7,features=64", &in, NULL, &b);
    ef_check("same seed, two plans: identical out, dq, dk, dv", !st && outs_identical(&in, &a, &b),
             "%s (tol 0: counter-based draws)", st ? ef_last_error() : "");
    if (!st) st = ef_test_run("performer:seed=8,features=64", &in, NULL, &b);
    double dseed = st ? 0 : ef_max_rel_diff(b.out, a.out, in.no);
    ef_check("different seed: outputs differ", !st && dseed > 10 * TOL_F,
             "rel. diff %.3e must exceed %.1e (another W: an O(0.1..1) change)", dseed, 10 * TOL_F);
    ef_test_free_outputs(&a), ef_test_free_outputs(&b);

    /* redraw=2: forwards A, B use draw 0; C (the third training forward) draws anew */
    const char *rspec = "performer:redraw=2,features=32,seed=3";
    ef_attn *p = NULL, *fresh = NULL;
    st = ef_attn_new(&p, rspec, &s);
    if (!st) st = ef_attn_new(&fresh, rspec, &s);
    if (!ef_check("redraw plans created", !st, "%s", st ? ef_last_error() : "")) goto threads;
    bufs A, B, C, D, F;
    ef_test_outputs(&A, &in), ef_test_outputs(&B, &in), ef_test_outputs(&C, &in), ef_test_outputs(&D, &in),
        ef_test_outputs(&F, &in);
    /* inference forwards (saved = NULL) never count */
    for (int i = 0; i < 3 && !st; i++) st = ef_test_run_plan(p, &in, NULL, &D, 0);
    A.saved = ef_test_saved(p);
    ef_attn_io io = {in.q, in.k, in.v, NULL, A.out};
    if (!st) st = ef_attn_forward(p, &io, A.saved);
    ef_check("3 inference forwards, then a training forward: same features",
             !st && !memcmp(A.out, D.out, in.no * 4), "%s",
             st ? ef_last_error() : "inference forwards do not advance the redraw count");
    io.out = B.out;
    B.saved = ef_test_saved(p);
    if (!st) st = ef_attn_forward(p, &io, B.saved);
    ef_check("redraw=2: 2nd training forward uses the same features",
             !st && !memcmp(A.out, B.out, in.no * 4), "%s", st ? ef_last_error() : "");
    io.out = C.out;
    C.saved = ef_test_saved(p);
    if (!st) st = ef_attn_forward(p, &io, C.saved);
    double dr = st ? 0 : ef_max_rel_diff(C.out, A.out, in.no);
    ef_check("redraw=2: 3rd training forward uses new features", !st && dr > 10 * TOL_F,
             "rel. diff %.3e must exceed %.1e", dr, 10 * TOL_F);
    /* backward of A after the redraw == backward of a fresh plan on A (its features) */
    io.out = A.out;
    if (!st) st = ef_attn_backward(p, &io, A.saved, in.g, A.dq, A.dk, A.dv);
    if (!st) st = ef_test_run_plan(fresh, &in, NULL, &F, 1);
    ef_check("backward(saved of A) after a redraw == fresh plan's backward on A",
             !st && outs_identical(&in, &A, &F), "%s (tol 0: the same draw regenerated)",
             st ? ef_last_error() : "");
    /* ... and leaves the plan on its current draw: the next inference forward uses C's draw */
    io.out = D.out;
    if (!st) st = ef_attn_forward(p, &io, NULL);
    double dd = st ? 1 : ef_max_abs_diff(D.out, C.out, in.no);
    ef_check("after that backward, forward still uses the current (C's) features", !st && dd == 0,
             "max|out - out_C| %.3e, tol 0 (max|out - out_A| %.3e)", dd,
             st ? 0 : ef_max_abs_diff(D.out, A.out, in.no));
    /* backward of C (current draw) after the old backward */
    io.out = C.out;
    if (!st) st = ef_attn_backward(p, &io, C.saved, in.g, C.dq, C.dk, C.dv);
    if (!st) {
        bufs C2;
        ef_test_outputs(&C2, &in);
        memcpy(C2.out, C.out, in.no * 4);
        ef_attn_io io2 = {in.q, in.k, in.v, NULL, C2.out};
        /* a reference for C's gradients: the same draw, reached by the same sequence */
        ef_attn *p2 = NULL;
        ef_status s2 = ef_attn_new(&p2, rspec, &s);
        void *sv = ef_test_saved(fresh);
        for (int i = 0; i < 3 && !s2; i++) s2 = ef_attn_forward(p2, &io2, sv);
        if (!s2) s2 = ef_attn_backward(p2, &io2, sv, in.g, C2.dq, C2.dk, C2.dv);
        ef_check("backward of C after backward of A == C's own gradients",
                 !s2 && outs_identical(&in, &C, &C2), "%s (tol 0)", s2 ? ef_last_error() : "");
        ef_free(sv), ef_attn_free(p2), ef_test_free_outputs(&C2);
    }
    ef_test_free_outputs(&A), ef_test_free_outputs(&B), ef_test_free_outputs(&C), ef_test_free_outputs(&D), ef_test_free_outputs(&F);
threads:
    ef_attn_free(p), ef_attn_free(fresh);
    /* 1 vs 2 threads: (batch, head) items with single-threaded GEMMs -> bitwise equal */
    {
        ef_attn_shape t = {2, 3, 150, 170, 24, 16};
        int32_t lens[2] = {170, 99};
        const char *specs[] = {"linear", "linear:causal=1", "performer:features=64",
                               "performer:causal=1,kernel=hyp,features=64"};
        for (int i = 0; i < 4; i++) {
            bufs tin, t1, t2;
            ef_test_inputs(&tin, t, 11, strncmp(specs[i], "perf", 4) ? 1.0f : SIG_P);
            ef_test_outputs(&t1, &tin), ef_test_outputs(&t2, &tin);
            int old = ef_get_num_threads();
            ef_set_num_threads(1);
            ef_status r = ef_test_run(specs[i], &tin, lens, &t1);
            ef_set_num_threads(2);
            if (!r) r = ef_test_run(specs[i], &tin, lens, &t2);
            ef_set_num_threads(old);
            char name[160];
            snprintf(name, sizeof name, "%s: 1 vs 2 threads bitwise (out, dq, dk, dv)", specs[i]);
            int same = !r && outs_identical(&tin, &t1, &t2);
            ef_check(name, same, "%s (tol 0)", r ? ef_last_error() : same ? "identical" : "differ");
            ef_test_free_outputs(&t1), ef_test_free_outputs(&t2), ef_test_free_inputs(&tin);
        }
    }
    ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * 7. Errors and small things
 * ------------------------------------------------------------------------------------------- */
static void test_errors(void) {
    printf("# 7. bad specs, head_dim 1, flops, visibility\n");
    ef_attn_shape s = {1, 2, 10, 12, 8, 4};
    ef_attn *a = (ef_attn *)&s;
    ef_check_status("performer:features=0 -> ARG (m >= 1)",
                    ef_attn_new(&a, "performer:features=0", &s), EF_ERR_ARG);
    ef_check("... and *out is NULL", a == NULL, "%p", (void *)a);
    ef_check_status("performer:kernel=foo -> ARG (not softmax|hyp|trig|relu)",
                    ef_attn_new(&a, "performer:kernel=foo", &s), EF_ERR_ARG);
    ef_check_status("performer:eps=-1 -> ARG (eps in [0, 1])",
                    ef_attn_new(&a, "performer:eps=-1", &s), EF_ERR_ARG);
    ef_check_status("linear:features=16 -> ARG (linear has no features)",
                    ef_attn_new(&a, "linear:features=16", &s), EF_ERR_ARG);
    ef_check_status("performer:ortho=2 -> ARG (0|1)", ef_attn_new(&a, "performer:ortho=2", &s),
                    EF_ERR_ARG);

    printf("# 7b. head_dim 1 (fast == ref, tolerances as 1)\n");
    ef_attn_shape s1 = {2, 1, 70, 70, 1, 3};
    int32_t lens[2] = {70, 33};
    fast_vs_ref("linear:causal=1", s1, lens, 1.0f);
    fast_vs_ref("performer:features=16", s1, lens, SIG_P);
    fast_vs_ref("performer:kernel=hyp,features=16,causal=1", s1, lens, SIG_P);
    fast_vs_ref("performer:kernel=relu,features=8,ortho=0", s1, lens, SIG_P);

    printf("# 7c. flops and visibility\n");
    const char *specs[] = {"linear", "linear:causal=1", "performer",
                           "performer:causal=1,kernel=hyp"};
    for (int i = 0; i < 4; i++) {
        ef_attn *p = NULL;
        ef_status st = ef_attn_new(&p, specs[i], &s);
        char name[160];
        double f0 = st ? 0 : ef_attn_flops(p, 0), f1 = st ? 0 : ef_attn_flops(p, 1);
        snprintf(name, sizeof name, "%s: flops > 0, forward+backward > forward", specs[i]);
        ef_check(name, !st && f0 > 0 && f1 > f0 && isfinite(f1), "fwd %.4g fwd+bwd %.4g", f0, f1);
        int causal = strstr(specs[i], "causal=1") != NULL, wrong = 0;
        for (int h = 0; h < s.heads && !st; h++)
            for (int x = 0; x < s.q_len; x++)
                for (int j = 0; j < s.kv_len; j++)
                    wrong += ef_attn_visible(p, h, x, j) != (!causal || j <= x);
        int64_t pairs = st ? -1 : ef_attn_visible_pairs(p, 0);
        int64_t want = causal ? 10 * 11 / 2 : 10 * 12;
        snprintf(name, sizeof name, "%s: visible == (j <= i if causal), pairs", specs[i]);
        ef_check(name, !st && !wrong && pairs == want, "%d wrong entries, pairs %lld want %lld",
                 wrong, (long long)pairs, (long long)want);
        ef_attn_free(p);
    }
}

int main(void) {
    test_fast_vs_ref();
    test_linear_oracle();
    test_decode();
    test_state_api();
    test_causal_future_key();
    test_padding_invariance();
    test_empty_rows();
    test_estimators();
    test_convergence();
    test_trig();
    test_determinism();
    test_errors();
    return ef_test_finish();
}
