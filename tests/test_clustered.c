/*
 * test_clustered.c - `clustered` and `iclustered` (fast-transformers' clustered and improved
 * clustered attention):
 *   - fast path against the reference (ref=1, an independent double-precision implementation
 *     of hashing, k-means, top-k and attention), forward and backward, with key and query
 *     padding and odd sizes;
 *   - directional finite differences of <dout, out> for q, k and v, fast and reference paths,
 *     at a step verified not to move any cluster or top-k set;
 *   - padding: redrawing or NaN/Inf-filling padded q, k, v and dout rows changes no valid
 *     result (bitwise), padded rows output zeros and get zero gradients, `saved` is fully
 *     written (prefilled with different bytes, it comes out identical);
 *   - the limit cases of ALGORITHMS.md (#4: identical queries make clustered == full; #3:
 *     topk >= keys makes iclustered == full); Hamming k-means on separable groups (#17);
 *   - the fast hash codes (fp32 product + exact recompute of doubtful signs) equal the
 *     double-sum specification bitwise, on queries nearly orthogonal to a plane; the fast
 *     top-k selection equals a plain one (ties at the k-th place included);
 *   - thread-count independence, inference == training, kv_lens = 0, option errors, the
 *     refusal of causal=1 (with its reason) and a foreign `saved` buffer;
 *   - replay (ef_attn_forward_replay), fast and reference: == forward bitwise on the same
 *     inputs (out, saved, backward after it); on inputs perturbed by 1e-3 where a fresh forward
 *     moves a cluster or top-k key, the record is kept and fast == reference replay of it;
 *     NULL, garbage, other-length and repeated-key records refused.
 *
 * Inputs are Gaussian, sigma 1 (STYLE.md). Tolerances are stated where they are used.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Test hook of src/attn/clustered.c (not part of the API): Lloyd's k-means in Hamming space. */
void ef_clustered_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt,
                         int32_t *work);
/* Test hook: the fast path's top-k selection (larger first, ties to the lower index). */
void ef_clustered_topk(const float *s, int n, int k, int32_t *idx);
/* Test hook: the fast path's codes of n queries against planes_t [d][64] (64-byte aligned). */
void ef_clustered_hash(const float *q, int n, int d, int bits, const float *planes_t,
                       uint64_t *out);

typedef ef_test_bufs bufs;

static int run_ok(const char *label, ef_status st) {
    char name[600];
    snprintf(name, sizeof name, "%s: runs", label);
    return ef_check(name, st == EF_OK, "%s %s", ef_status_str(st), ef_last_error());
}

static char *with_ref(char *buf, size_t cap, const char *spec) {
    snprintf(buf, cap, "%s%sref=1", spec, strchr(spec, ':') ? "," : ":");
    return buf;
}

/* Forward and backward of plan a on (q, k, v) with output gradient g and both length vectors,
 * into o. Every output buffer is first filled with NaN bit patterns and `saved` with the byte
 * `fill`, so that anything left unwritten, or read before being written, shows. */
static ef_status run_io(ef_attn *a, const bufs *in, const float *q, const float *k, const float *v,
                        const float *g, const int32_t *kv_lens, const int32_t *q_lens, bufs *o,
                        int fill) {
    ef_free(o->saved);
    o->saved = ef_test_saved(a);
    size_t sb = ef_attn_saved_bytes(a);
    memset(o->saved, fill, sb > 64 ? sb : 64);
    memset(o->out, 0xff, in->no * 4), memset(o->dq, 0xff, in->nq * 4);
    memset(o->dk, 0xff, in->nk * 4), memset(o->dv, 0xff, in->nv * 4);
    ef_attn_io io = {q, k, v, kv_lens, o->out, q_lens};
    ef_status st = ef_attn_forward(a, &io, o->saved);
    if (!st) st = ef_attn_backward(a, &io, o->saved, g, o->dq, o->dk, o->dv);
    return st;
}

static ef_status run_spec(const char *spec, const bufs *in, const int32_t *kv_lens,
                          const int32_t *q_lens, bufs *o) {
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    if (!st) st = run_io(a, in, in->q, in->k, in->v, in->g, kv_lens, q_lens, o, 0);
    ef_attn_free(a);
    return st;
}

static void compare_all(const char *label, const bufs *in, const bufs *x, const bufs *y,
                        double tol_f, double tol_b, int relative) {
    char name[256];
    double (*diff)(const float *, const float *, size_t) =
        relative ? ef_max_rel_diff : ef_max_abs_diff;
    int bad = ef_test_any_nonfinite(x->out, in->no) || ef_test_any_nonfinite(x->dq, in->nq) ||
              ef_test_any_nonfinite(x->dk, in->nk) || ef_test_any_nonfinite(x->dv, in->nv);
    snprintf(name, sizeof name, "%s: finite", label);
    ef_check(name, !bad, "%s", bad ? "NaN or inf found" : "");
    snprintf(name, sizeof name, "%s: out", label);
    ef_check_err(name, diff(x->out, y->out, in->no), tol_f);
    snprintf(name, sizeof name, "%s: dq", label);
    ef_check_err(name, diff(x->dq, y->dq, in->nq), tol_b);
    snprintf(name, sizeof name, "%s: dk", label);
    ef_check_err(name, diff(x->dk, y->dk, in->nk), tol_b);
    snprintf(name, sizeof name, "%s: dv", label);
    ef_check_err(name, diff(x->dv, y->dv, in->nv), tol_b);
}

/* spec_a vs spec_b on the same inputs. */
static void compare_specs(const char *label, const bufs *in, const char *spec_a, const char *spec_b,
                          const int32_t *kv_lens, const int32_t *q_lens, double tol_f, double tol_b,
                          int relative) {
    bufs x, y;
    ef_test_outputs(&x, in), ef_test_outputs(&y, in);
    ef_status s1 = run_spec(spec_a, in, kv_lens, q_lens, &x);
    ef_status s2 = s1 ? s1 : run_spec(spec_b, in, kv_lens, q_lens, &y);
    if (run_ok(label, s2)) compare_all(label, in, &x, &y, tol_f, tol_b, relative);
    ef_test_free_outputs(&x), ef_test_free_outputs(&y);
}

/* Fast (fp32, GEMMs) vs reference (its own hashing, k-means, top-k and attention in double).
 * Both make the same discrete choices (same draws, same tie rules; see clustered.c), so a
 * wrong cluster, mask or top-k set gives errors of order 1. The fast path accumulates the
 * centroid logits, softmax and products in fp32 over up to M = 83 keys: errors of a few 1e-7
 * relative (max|diff| / max|ref|); the backward chains two softmax backwards (the centroid's and
 * the per-query top-k one), so 2e-5 / 1e-4 leave a margin of ~40x over the largest error
 * measured (5e-7). Length sets: none; keys only; queries and keys (q_lens below clusters=7 in
 * one of them, and q_lens = 0 / kv_lens = 0 sequences). */
static void fast_vs_ref(void) {
    ef_attn_shape s = {2, 2, 97, 83, 24, 40};
    const int32_t kv[3][2] = {{83, 30}, {83, 30}, {0, 59}};
    const int32_t ql[3][2] = {{97, 97}, {60, 41}, {5, 0}};
    bufs in;
    ef_test_inputs(&in, s, 11, 1.0f);
    const char *specs[] = {"clustered:clusters=7", "clustered", "iclustered:clusters=7,topk=9",
                           "iclustered:clusters=5,topk=40,bits=20,iters=3", "iclustered"};
    for (int i = 0; i < 5; i++)
        for (int pad = 0; pad < 4; pad++) {
            char label[256], ref[256];
            const char *what[4] = {"", " (kv_lens)", " (q_lens, kv_lens)", " (short q_lens)"};
            snprintf(label, sizeof label, "%s vs ref%s", specs[i], what[pad]);
            compare_specs(label, &in, specs[i], with_ref(ref, sizeof ref, specs[i]),
                          pad ? kv[pad - 1] : NULL, pad > 1 ? ql[pad - 1] : NULL, 2e-5, 1e-4, 1);
        }
    ef_test_free_inputs(&in);
    /* a longer sequence, D = Dv = 64: the fast paths' blocks (96 queries hashed per product,
     * 32 codes per assignment block, several key vectors per top-k group, top-k sets of 32 of
     * several hundred keys, clusters of dozens of members) all run more than once; logits over
     * up to 500 keys in fp32: same tolerances */
    ef_attn_shape s2 = {1, 2, 700, 500, 64, 64};
    const int32_t kv2[1] = {437}, ql2[1] = {611};
    ef_test_inputs(&in, s2, 13, 1.0f);
    const char *specs2[] = {"clustered:clusters=23", "iclustered:clusters=23,topk=32"};
    for (int i = 0; i < 2; i++)
        for (int pad = 0; pad < 2; pad++) {
            char label[256], ref[256];
            snprintf(label, sizeof label, "%s vs ref, N=700 M=500 D=64%s", specs2[i],
                     pad ? " (q_lens, kv_lens)" : "");
            compare_specs(label, &in, specs2[i], with_ref(ref, sizeof ref, specs2[i]),
                          pad ? kv2 : NULL, pad ? ql2 : NULL, 2e-5, 1e-4, 1);
        }
    ef_test_free_inputs(&in);
}

/* f(x) = <g, out(x)>; its derivative along a random direction of one input (q, k or v) against
 * the central difference (f(x + eps d) - f(x - eps d)) / 2 eps, with query and key padding.
 * Clusters and top-k sets are piecewise constant in x; the check first verifies with the fast
 * plan's `saved` (assignment and top-k sets) that neither moves at x +- eps d, so both sides
 * see the same smooth function (the reference makes the same choices: fast_vs_ref). eps = 1e-3
 * is small enough here (3e-3 already moves a hash bit for q); larger steps are refused by that
 * check, not silently averaged over a jump. Outputs are fp32: the quotient carries a rounding
 * error of ~6e-8 |out| sqrt(#out) / eps, up to 5e-4 measured, against derivatives of order
 * 1..10: tolerance 2e-3 relative to max(|derivative|, 1). A wrong gradient term is off by O(1). */
static double eval_f(ef_attn *a, const bufs *in, const float *const x[3], const int32_t *kv_lens,
                     const int32_t *q_lens, float *out) {
    ef_attn_io io = {x[0], x[1], x[2], kv_lens, out, q_lens};
    if (ef_attn_forward(a, &io, NULL) != EF_OK) return NAN;
    double f = 0;
    for (size_t i = 0; i < in->no; i++) f += (double)in->g[i] * out[i];
    return f;
}

/* Forward of the fast plan at x into a fresh `saved`: 1 when it equals `want` bitwise. */
static int same_choices(ef_attn *fast, const float *const x[3], const int32_t *kv_lens,
                        const int32_t *q_lens, const void *want, float *out) {
    void *sv = ef_test_saved(fast);
    ef_attn_io io = {x[0], x[1], x[2], kv_lens, out, q_lens};
    int same =
        ef_attn_forward(fast, &io, sv) == EF_OK && !memcmp(sv, want, ef_attn_saved_bytes(fast));
    ef_free(sv);
    return same;
}

static void gradient_check(const char *spec) {
    ef_attn_shape s = {2, 2, 29, 23, 8, 6};
    const int32_t kv_lens[2] = {23, 14}, q_lens[2] = {29, 17};
    const double eps = 1e-3;
    const char *names[3] = {"q", "k", "v"};
    char refspec[256], label[300];
    with_ref(refspec, sizeof refspec, spec);
    snprintf(label, sizeof label, "%s: finite differences", spec);
    bufs in, o[2];
    ef_test_inputs(&in, s, 21, 1.0f);
    ef_test_outputs(&o[0], &in), ef_test_outputs(&o[1], &in);
    ef_attn *a[2] = {NULL, NULL}; /* fast, reference */
    ef_status st = ef_attn_new(&a[0], spec, &s);
    if (!st) st = ef_attn_new(&a[1], refspec, &s);
    for (int path = 0; path < 2 && !st; path++)
        st = run_io(a[path], &in, in.q, in.k, in.v, in.g, kv_lens, q_lens, &o[path], 0);
    if (run_ok(label, st)) {
        float *out = malloc(in.no * sizeof(float));
        const float *src[3] = {in.q, in.k, in.v};
        const size_t cnt[3] = {in.nq, in.nk, in.nv};
        for (int t = 0; t < 3; t++) {
            float *dir = ef_test_randn(cnt[t], 22 + t, 1.0f);
            float *xp = malloc(cnt[t] * sizeof(float)), *xm = malloc(cnt[t] * sizeof(float));
            for (size_t x = 0; x < cnt[t]; x++) {
                xp[x] = src[t][x] + (float)eps * dir[x];
                xm[x] = src[t][x] - (float)eps * dir[x];
            }
            const float *P[3] = {in.q, in.k, in.v}, *M[3] = {in.q, in.k, in.v};
            P[t] = xp, M[t] = xm;
            int fixed = same_choices(a[0], P, kv_lens, q_lens, o[0].saved, out) &&
                        same_choices(a[0], M, kv_lens, q_lens, o[0].saved, out);
            snprintf(label, sizeof label, "%s: clusters and top-k fixed at x +- %g d%s", spec, eps,
                     names[t]);
            ef_check(label, fixed, "%s", fixed ? "same saved choices" : "a choice MOVED");
            for (int path = 0; path < 2; path++) {
                const float *grad[3] = {o[path].dq, o[path].dk, o[path].dv};
                double an = 0;
                for (size_t x = 0; x < cnt[t]; x++) an += (double)grad[t][x] * dir[x];
                double num = (eval_f(a[path], &in, P, kv_lens, q_lens, out) -
                              eval_f(a[path], &in, M, kv_lens, q_lens, out)) /
                             (2 * eps);
                snprintf(label, sizeof label, "%s: d/d%s along a direction", path ? refspec : spec,
                         names[t]);
                ef_check_err(label, fabs(num - an) / fmax(fabs(an), 1), 2e-3);
            }
            free(dir), free(xp), free(xm);
        }
        free(out);
    }
    ef_attn_free(a[0]), ef_attn_free(a[1]);
    ef_test_free_outputs(&o[0]), ef_test_free_outputs(&o[1]), ef_test_free_inputs(&in);
}

/* Padding: rows i >= q_lens[b] and keys j >= kv_lens[b] never reach a valid result. Three runs
 * of the same plan: the inputs as drawn; padded q, k, v and dout rows redrawn; the same rows
 * filled with NaN (q, dout, k) and Inf (v). Every output (out, dq, dk, dv: padded entries
 * must be exact zeros) and `saved` must be bitwise identical across the runs, with `saved`
 * prefilled with a different byte each time and the plan used without padding before the
 * second and third runs (so `saved` is fully written, and not from stale workspace). */
static void fill_rows(float *x, ef_attn_shape s, int len, int dim, const int32_t *lens, int mode,
                      uint64_t seed) {
    float *z = ef_test_randn((size_t)s.batch * s.heads * len * dim, seed, 1.0f);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int i = lens[b]; i < len; i++)
                for (int t = 0; t < dim; t++) {
                    size_t at = (((size_t)b * s.heads + h) * len + i) * dim + t;
                    x[at] = mode == 1 ? z[at] : mode == 2 ? NAN : INFINITY;
                }
    free(z);
}

static int rows_zero(const float *x, ef_attn_shape s, int len, int dim, const int32_t *lens) {
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int i = lens[b]; i < len; i++)
                for (int t = 0; t < dim; t++)
                    if (x[(((size_t)b * s.heads + h) * len + i) * dim + t] != 0) return 0;
    return 1;
}

static void padding_invariance(const char *spec, const int32_t *q_lens, const int32_t *kv_lens) {
    ef_attn_shape s = {2, 2, 45, 50, 16, 8};
    bufs in, x[3];
    ef_test_inputs(&in, s, 51, 1.0f);
    char label[300];
    snprintf(label, sizeof label, "%s: q_lens {%d,%d} kv_lens {%d,%d}", spec, q_lens[0], q_lens[1],
             kv_lens[0], kv_lens[1]);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    float *kd = malloc(in.nk * sizeof(float));
    int old = ef_get_num_threads();
    ef_set_num_threads(1); /* the heads run in order: leftovers of the last head reach the first */
    for (int r = 0; r < 3; r++) {
        ef_test_outputs(&x[r], &in);
        if (r) { /* 1: redrawn, 2: NaN / Inf; each after a call without padding (on k, then
                  * on -k: other top-k sets), whose leftovers in the workspace must not reach
                  * `saved` */
            for (size_t i = 0; i < in.nk; i++) kd[i] = r == 1 ? -in.k[i] : in.k[i];
            if (!st) st = run_io(a, &in, in.q, kd, in.v, in.g, NULL, NULL, &x[r], 0x77);
            int mode = r == 1 ? 1 : 2;
            fill_rows(in.q, s, s.q_len, s.head_dim, q_lens, mode, 52);
            fill_rows(in.g, s, s.q_len, s.v_dim, q_lens, mode, 53);
            fill_rows(in.k, s, s.kv_len, s.head_dim, kv_lens, mode, 54);
            fill_rows(in.v, s, s.kv_len, s.v_dim, kv_lens, r == 1 ? 1 : 3, 55);
        }
        if (!st) st = run_io(a, &in, in.q, in.k, in.v, in.g, kv_lens, q_lens, &x[r], 0x11 * r);
    }
    if (run_ok(label, st)) {
        size_t sb = ef_attn_saved_bytes(a);
        int same = 1, saved_same = 1;
        for (int r = 1; r < 3; r++) {
            same = same && !memcmp(x[0].out, x[r].out, in.no * 4) &&
                   !memcmp(x[0].dq, x[r].dq, in.nq * 4) && !memcmp(x[0].dk, x[r].dk, in.nk * 4) &&
                   !memcmp(x[0].dv, x[r].dv, in.nv * 4);
            saved_same = saved_same && !memcmp(x[0].saved, x[r].saved, sb);
        }
        char name[400];
        snprintf(name, sizeof name, "%s: redrawn / NaN padding, results bitwise", label);
        ef_check(name, same, "%s", same ? "identical" : "DIFFERENT");
        snprintf(name, sizeof name, "%s: saved fully written", label);
        ef_check(name, saved_same, "%zu bytes %s", sb, saved_same ? "identical" : "DIFFER");
        int zero = rows_zero(x[2].out, s, s.q_len, s.v_dim, q_lens) &&
                   rows_zero(x[2].dq, s, s.q_len, s.head_dim, q_lens) &&
                   rows_zero(x[2].dk, s, s.kv_len, s.head_dim, kv_lens) &&
                   rows_zero(x[2].dv, s, s.kv_len, s.v_dim, kv_lens);
        int finite =
            !ef_test_any_nonfinite(x[2].out, in.no) && !ef_test_any_nonfinite(x[2].dq, in.nq) &&
            !ef_test_any_nonfinite(x[2].dk, in.nk) && !ef_test_any_nonfinite(x[2].dv, in.nv);
        snprintf(name, sizeof name, "%s: padded rows/keys exactly zero", label);
        ef_check(name, zero && finite, "zeros %s, %s", zero ? "yes" : "NO",
                 finite ? "all finite" : "NON-FINITE values");
    }
    ef_set_num_threads(old);
    for (int r = 0; r < 3; r++) ef_test_free_outputs(&x[r]);
    free(kd);
    ef_attn_free(a);
    ef_test_free_inputs(&in);
}

/* ALGORITHMS #4: every query identical -> every code is the same -> one cluster whose centroid
 * equals every query, so out, dk and dv equal full attention's. dq does not: dq_i = dQc / |c|
 * is the transpose of the mean, the average over the cluster of full's per-row dq (the sum
 * is the same), so full's dq is averaged per (batch, head) before comparing. Both sides are
 * fp32 with different summation orders: 2e-5 / 1e-4 relative, as test_flash.c uses. */
static void identical_case(const char *label, const bufs *in, const char *spec, const char *full,
                           const int32_t *lens, double tol_f, double tol_b) {
    const ef_attn_shape s = in->s;
    bufs x, y;
    ef_test_outputs(&x, in), ef_test_outputs(&y, in);
    ef_status st = run_spec(spec, in, lens, NULL, &x);
    if (!st) st = run_spec(full, in, lens, NULL, &y);
    if (run_ok(label, st)) {
        for (int bh = 0; bh < s.batch * s.heads; bh++)
            for (int t = 0; t < s.head_dim; t++) {
                double m = 0;
                for (int i = 0; i < s.q_len; i++)
                    m += y.dq[((size_t)bh * s.q_len + i) * s.head_dim + t];
                for (int i = 0; i < s.q_len; i++)
                    y.dq[((size_t)bh * s.q_len + i) * s.head_dim + t] = (float)(m / s.q_len);
            }
        compare_all(label, in, &x, &y, tol_f, tol_b, 1);
    }
    ef_test_free_outputs(&x), ef_test_free_outputs(&y);
}

static void identical_queries(void) {
    ef_attn_shape s = {2, 3, 50, 61, 16, 12};
    int32_t lens[2] = {61, 17};
    bufs in;
    ef_test_inputs(&in, s, 31, 1.0f);
    for (int bh = 0; bh < s.batch * s.heads; bh++)
        for (int i = 1; i < s.q_len; i++)
            memcpy(in.q + ((size_t)bh * s.q_len + i) * s.head_dim,
                   in.q + (size_t)bh * s.q_len * s.head_dim, sizeof(float) * s.head_dim);
    identical_case("clustered == full (identical queries)", &in, "clustered:clusters=4", "full",
                   NULL, 2e-5, 1e-4);
    identical_case("clustered == full (identical queries, padded)", &in, "clustered:clusters=4",
                   "full", lens, 2e-5, 1e-4);
    /* both in double: only the final rounding to fp32 differs */
    identical_case("clustered:ref=1 == full:ref=1 (identical queries)", &in,
                   "clustered:clusters=4,ref=1", "full:ref=1", lens, 1e-6, 1e-6);
    ef_test_free_inputs(&in);
}

/* ALGORITHMS #3: topk >= visible keys -> every key is recomputed exactly and the bottom mass
 * is 0, so iclustered == full. FT checks max abs diff < 1e-4; we check the same absolutely. */
static void topk_equals_length(void) {
    ef_attn_shape s = {2, 2, 70, 45, 16, 20};
    int32_t lens[2] = {45, 9};
    bufs in;
    ef_test_inputs(&in, s, 41, 1.0f);
    compare_specs("iclustered topk=45 == full", &in, "iclustered:clusters=5,topk=45", "full", NULL,
                  NULL, 1e-4, 1e-4, 0);
    compare_specs("iclustered topk=64 == full (padded)", &in, "iclustered:clusters=5,topk=64",
                  "full", lens, NULL, 1e-4, 1e-4, 0);
    compare_specs("iclustered:ref=1 topk=64 == full:ref=1 (padded)", &in,
                  "iclustered:clusters=5,topk=64,ref=1", "full:ref=1", lens, NULL, 1e-6, 1e-6, 0);
    ef_test_free_inputs(&in);
}

/* The fast path's codes (an fp32 product, with the exact double sum where its sign is in
 * doubt) against the specification: bit b = [sum_t q_t a_bt > 0], summed in double in increasing
 * t. Half the queries are Gaussian; the other half are made nearly orthogonal to one plane
 * (x minus its projection, rounded to float: |q.a| ~ 1e-7 |q||a|, where the fp32 sum's sign is
 * often wrong), plus a zero query, one with entries of 1e36 (fp32 products overflow) and one of
 * 1e-30 (they underflow). Any differing bit fails (no tolerance: the codes are discrete). */
static void hash_exact(void) {
    const int dims[3] = {64, 40, 7}, nbits[3] = {63, 17, 1};
    for (int c = 0; c < 3; c++) {
        int d = dims[c], bits = nbits[c], n = 301;
        float *pl = ef_malloc(sizeof(float) * d * 64), *q = malloc(sizeof(float) * n * d);
        uint64_t *got = malloc(sizeof(uint64_t) * n);
        memset(pl, 0, sizeof(float) * d * 64);
        float *z = malloc(sizeof(float) * (size_t)(bits + n) * d);
        ef_rng_normal(5, 77, 0, (size_t)(bits + n) * d, z);
        for (int b = 0; b < bits; b++)
            for (int t = 0; t < d; t++) pl[t * 64 + b] = z[b * d + t];
        for (int i = 0; i < n; i++) {
            float *qi = q + (size_t)i * d;
            memcpy(qi, z + (size_t)(bits + i) * d, sizeof(float) * d);
            if (i % 2 && d > 1) { /* remove the component along plane b */
                int b = (i / 2) % bits;
                double xa = 0, aa = 0;
                for (int t = 0; t < d; t++) xa += (double)qi[t] * pl[t * 64 + b];
                for (int t = 0; t < d; t++) aa += (double)pl[t * 64 + b] * pl[t * 64 + b];
                for (int t = 0; t < d; t++) qi[t] = (float)(qi[t] - xa / aa * pl[t * 64 + b]);
            }
            if (i == 0) memset(qi, 0, sizeof(float) * d);
            for (int t = 0; t < d && i == 2; t++) qi[t] = t % 2 ? 1e36f : -1e36f;
            for (int t = 0; t < d && i == 4; t++) qi[t] *= 1e-30f;
        }
        ef_clustered_hash(q, n, d, bits, pl, got);
        int bad = 0, first = -1, near = 0;
        for (int i = 0; i < n; i++) {
            uint64_t want = 0;
            for (int b = 0; b < bits; b++) {
                double acc = 0;
                float f = 0;
                for (int t = 0; t < d; t++) acc += (double)q[i * d + t] * pl[t * 64 + b];
                for (int t = 0; t < d; t++) f += q[i * d + t] * pl[t * 64 + b];
                near += (f > 0) != (acc > 0);
                if (acc > 0) want |= 1ull << b;
            }
            if (got[i] != want && !bad++) first = i;
        }
        char name[160];
        snprintf(name, sizeof name, "hash: fast codes == double-sum codes (D=%d, bits=%d)", d, bits);
        ef_check(name, !bad, "%d of %d codes differ (first: query %d); %d bits where a plain fp32 "
                 "sum has the other sign", bad, n, first, near);
        free(z), free(got), free(q), ef_free(pl);
    }
}

/* The fast top-k selection (a lower bound from group maxima, a vector filter, then a heap)
 * against "k passes of the largest not yet taken, ties to the lower index", on Gaussian values
 * and on values from a set of 3 (many ties, at the k-th place too), for lengths around the
 * vector and group sizes and k from 1 to n. Any differing index fails. */
static void topk_exact(void) {
    const int ns[] = {1, 15, 16, 63, 64, 65, 200, 257, 1000, 4096};
    const int ks[] = {1, 2, 9, 16, 31, 32, 33, 64, 65, 200};
    float *s = malloc(sizeof(float) * 4096), *z = malloc(sizeof(float) * 4096);
    int32_t *got = malloc(sizeof(int32_t) * 4096), *want = malloc(sizeof(int32_t) * 4096);
    char *taken = malloc(4096);
    int cases = 0, bad = 0;
    char first[128] = "";
    for (int a = 0; a < 10; a++)
        for (int b = 0; b < 10; b++)
            for (int ties = 0; ties < 2; ties++) {
                int n = ns[a], k = ks[b] > n ? n : ks[b];
                ef_rng_normal(9, (uint64_t)(a * 10 + b), 0, (size_t)n, z);
                float *sn = malloc(sizeof(float) * n); /* exactly n: a read past it fails ASan */
                for (int j = 0; j < n; j++) sn[j] = ties ? (float)((int)(fabsf(z[j]) * 2) % 3) : z[j];
                ef_clustered_topk(sn, n, k, got);
                memcpy(s, sn, sizeof(float) * n);
                free(sn);
                memset(taken, 0, 4096);
                for (int x = 0; x < k; x++) {
                    int best = -1;
                    for (int j = 0; j < n; j++)
                        if (!taken[j] && (best < 0 || s[j] > s[best])) best = j;
                    taken[best] = 1;
                }
                for (int j = 0, x = 0; j < n; j++)
                    if (taken[j]) want[x++] = j;
                cases++;
                if (memcmp(got, want, sizeof(int32_t) * k) && !bad++)
                    snprintf(first, sizeof first, " (first: n=%d k=%d ties=%d)", n, k, ties);
            }
    ef_check("top-k: fast selection == k passes of the largest (ties to the lower index)", !bad,
             "%d of %d cases differ%s", bad, cases, first);
    free(s), free(z), free(got), free(want), free(taken);
}

/* The fast k-means (vectorised scans; after the first round only the centroids that moved are
 * rescanned for codes whose own centroid stayed) against a plain Lloyd's loop written from
 * docs/clustered.md (full scans, bit-by-bit majority), on random codes and on codes of a few
 * noisy prototypes (clusters settle, empty clusters get random codes): assignment, centroids
 * and counts must be identical. */
static void plain_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt) {
    int32_t *perm = malloc(sizeof(int32_t) * n);
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = 0; i < C; i++) {
        uint32_t r[4];
        ef_rng_raw(seed, stream, (uint64_t)i, r);
        int j = i + (int)(r[0] % (uint32_t)(n - i)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
        cent[i] = hash[perm[i]];
    }
    for (int it = 0; it <= iters; it++) {
        for (int i = 0; i < n; i++) {
            int best = 0, bd = 99;
            for (int c = 0; c < C; c++) {
                int dd = 0;
                for (int b = 0; b < 64; b++) dd += (int)((hash[i] ^ cent[c]) >> b & 1);
                if (dd < bd) bd = dd, best = c;
            }
            asg[i] = best;
        }
        memset(cnt, 0, sizeof(int32_t) * C);
        for (int i = 0; i < n; i++) cnt[asg[i]]++;
        if (it == iters) break;
        for (int c = 0; c < C; c++) {
            uint64_t h = 0;
            if (!cnt[c]) {
                uint32_t r[4];
                ef_rng_raw(seed, stream, (uint64_t)C + (uint64_t)it * C + c, r);
                h = ((uint64_t)r[0] | (uint64_t)r[1] << 32) & ((1ull << bits) - 1);
            }
            for (int b = 0; b < bits && cnt[c]; b++) {
                int ones = 0;
                for (int i = 0; i < n; i++) ones += asg[i] == c && (hash[i] >> b & 1);
                if (2 * ones > cnt[c]) h |= 1ull << b;
            }
            cent[c] = h;
        }
    }
    free(perm);
}

static void kmeans_plain(void) {
    enum { N = 700, CM = 61 };
    static uint64_t hash[N], c1[CM], c2[CM];
    static int32_t a1[N], a2[N], n1[CM], n2[CM], work[N + 67 * CM];
    int bad = 0, cases = 0;
    char first[128] = "";
    for (int kind = 0; kind < 2; kind++)
        for (int v = 0; v < 3; v++) {
            int bits = (int[]){63, 20, 5}[v], C = (int[]){61, 17, 8}[v], n = N - 37 * v;
            uint64_t keep = (1ull << bits) - 1, proto[6];
            for (int x = 0; x < 6; x++) {
                uint32_t r[4];
                ef_rng_raw(3, 50, (uint64_t)x, r);
                proto[x] = ((uint64_t)r[0] | (uint64_t)r[1] << 32) & keep;
            }
            for (int i = 0; i < n; i++) {
                uint32_t r[4];
                ef_rng_raw(3, 51 + (uint64_t)kind, (uint64_t)i, r);
                uint64_t z = ((uint64_t)r[0] | (uint64_t)r[1] << 32) & keep;
                /* kind 1: a prototype with each bit flipped with probability 1/16 */
                hash[i] = kind ? proto[r[2] % 6] ^ (z & (z >> 1) & (z >> 2) & (z >> 3)) : z;
            }
            ef_clustered_kmeans(hash, n, bits, C, 10, 9, 4, a1, c1, n1, work);
            plain_kmeans(hash, n, bits, C, 10, 9, 4, a2, c2, n2);
            cases++;
            if ((memcmp(a1, a2, sizeof(int32_t) * n) || memcmp(c1, c2, sizeof(uint64_t) * C) ||
                 memcmp(n1, n2, sizeof(int32_t) * C)) &&
                !bad++)
                snprintf(first, sizeof first, " (first: kind %d, bits %d, C %d)", kind, bits, C);
        }
    ef_check("k-means: fast == plain Lloyd's loop (assignment, centroids, counts)", !bad,
             "%d of %d cases differ%s", bad, cases, first);
}

/* ALGORITHMS #17 (FT test_cluster_cpu): codes 0 and 2^bits - 1, 50 each, interleaved, into 2
 * clusters must give exactly these centroids with counts 50/50, for every bits in 1..62. */
static void kmeans_separable(void) {
    enum { N = 100 };
    uint64_t hash[N], cent[2];
    int32_t asg[N], cnt[2], work[N + 2 * 67];
    int bad = 0, first = 0;
    for (int bits = 1; bits <= 62; bits++) {
        uint64_t ones = (1ull << bits) - 1;
        for (int i = 0; i < N; i++) hash[i] = i % 2 ? ones : 0;
        for (uint64_t seed = 0; seed < 4; seed++) {
            ef_clustered_kmeans(hash, N, bits, 2, 10, seed, 7, asg, cent, cnt, work);
            int ok = cnt[0] == 50 && cnt[1] == 50 &&
                     ((cent[0] == 0 && cent[1] == ones) || (cent[0] == ones && cent[1] == 0));
            for (int i = 0; i < N && ok; i++) ok = cent[asg[i]] == hash[i];
            if (!ok && !bad++) first = bits;
        }
    }
    ef_check("k-means: two separable groups -> centroids 0 and 2^bits-1, counts 50/50", !bad,
             "%d of 248 (bits, seed) cases wrong%s%d", bad, bad ? ", first bits=" : "",
             bad ? first : 0);
    /* 3 groups (0, low half, high half) with 3 clusters and enough iterations */
    int bits = 40;
    uint64_t g[3] = {0, (1ull << 20) - 1, ((1ull << 40) - 1) ^ ((1ull << 20) - 1)};
    uint64_t h3[90], c3[3];
    int32_t a3[90], n3[3], w3[90 + 3 * 67];
    for (int i = 0; i < 90; i++) h3[i] = g[i % 3];
    ef_clustered_kmeans(h3, 90, bits, 3, 10, 3, 9, a3, c3, n3, w3);
    int ok = n3[0] == 30 && n3[1] == 30 && n3[2] == 30;
    for (int i = 0; i < 90 && ok; i++) ok = c3[a3[i]] == h3[i];
    ef_check("k-means: three separable groups -> exact centroids, counts 30/30/30", ok,
             "counts %d %d %d", n3[0], n3[1], n3[2]);
}

/* kv_lens = 0: rows see no key -> zero outputs and gradients. */
static void empty_rows(const char *spec) {
    ef_attn_shape s = {2, 1, 20, 30, 8, 8};
    int32_t lens[2] = {0, 30};
    bufs in, x;
    ef_test_inputs(&in, s, 61, 1.0f);
    ef_test_outputs(&x, &in);
    char label[256];
    snprintf(label, sizeof label, "%s: kv_lens=0 gives zeros", spec);
    if (run_ok(label, run_spec(spec, &in, lens, NULL, &x))) {
        double mx = 0;
        for (size_t i = 0; i < in.no / 2; i++) mx = fmax(mx, fabs(x.out[i]));
        for (size_t i = 0; i < in.nq / 2; i++) mx = fmax(mx, fabs(x.dq[i]));
        for (size_t i = 0; i < in.nk / 2; i++) mx = fmax(mx, fabs(x.dk[i]) + fabs(x.dv[i]));
        ef_check(label, mx == 0 && !ef_test_any_nonfinite(x.out, in.no), "max |value| %g", mx);
    }
    ef_test_free_outputs(&x), ef_test_free_inputs(&in);
}

static void threads_bitwise(const char *spec) {
    ef_attn_shape s = {2, 3, 64, 70, 16, 16};
    int32_t kv_lens[2] = {70, 41}, q_lens[2] = {37, 64};
    bufs in, x, y;
    ef_test_inputs(&in, s, 71, 1.0f);
    ef_test_outputs(&x, &in), ef_test_outputs(&y, &in);
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    ef_status st = run_spec(spec, &in, kv_lens, q_lens, &x);
    ef_set_num_threads(2);
    if (st == EF_OK) st = run_spec(spec, &in, kv_lens, q_lens, &y);
    ef_set_num_threads(old);
    char label[256];
    snprintf(label, sizeof label, "%s: 1 vs 2 threads bitwise", spec);
    if (run_ok(label, st)) {
        int same = !memcmp(x.out, y.out, in.no * 4) && !memcmp(x.dq, y.dq, in.nq * 4) &&
                   !memcmp(x.dk, y.dk, in.nk * 4) && !memcmp(x.dv, y.dv, in.nv * 4);
        ef_check(label, same, "%s", same ? "identical" : "DIFFERENT");
    }
    ef_test_free_outputs(&x), ef_test_free_outputs(&y), ef_test_free_inputs(&in);
}

/* Inference (saved = NULL) gives the same output as a training forward. */
static void inference_equals_training(const char *spec) {
    ef_attn_shape s = {2, 2, 33, 40, 8, 8};
    int32_t kv_lens[2] = {40, 21}, q_lens[2] = {19, 33};
    bufs in, x;
    ef_test_inputs(&in, s, 81, 1.0f);
    ef_test_outputs(&x, &in);
    float *out = ef_test_zeros(in.no);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    if (st == EF_OK) st = run_io(a, &in, in.q, in.k, in.v, in.g, kv_lens, q_lens, &x, 0);
    ef_attn_io io = {in.q, in.k, in.v, kv_lens, out, q_lens};
    if (st == EF_OK) st = ef_attn_forward(a, &io, NULL);
    char label[256];
    snprintf(label, sizeof label, "%s: inference == training forward", spec);
    if (run_ok(label, st)) ef_check(label, !memcmp(out, x.out, in.no * 4), "bitwise");
    ef_attn_free(a);
    free(out);
    ef_test_free_outputs(&x), ef_test_free_inputs(&in);
}

/* Backward given a `saved` that no forward of this plan wrote (all bytes 0xff: index -1) is
 * refused rather than indexing out of range. */
static void foreign_saved(const char *spec) {
    ef_attn_shape s = {1, 2, 20, 24, 8, 8};
    bufs in, x;
    ef_test_inputs(&in, s, 91, 1.0f);
    ef_test_outputs(&x, &in);
    ef_attn *a = NULL;
    char label[256];
    snprintf(label, sizeof label, "%s: backward refuses a foreign saved", spec);
    if (run_ok(label, ef_attn_new(&a, spec, &s))) {
        void *sv = ef_test_saved(a);
        memset(sv, 0xff, ef_attn_saved_bytes(a));
        ef_attn_io io = {in.q, in.k, in.v, NULL, x.out, NULL};
        ef_check_status(label, ef_attn_backward(a, &io, sv, in.g, x.dq, x.dk, x.dv), EF_ERR_ARG);
        ef_free(sv);
    }
    ef_attn_free(a);
    ef_test_free_outputs(&x), ef_test_free_inputs(&in);
}

static void errors(void) {
    ef_attn_shape s = {1, 1, 16, 16, 8, 8};
    struct {
        const char *spec;
        ef_status want;
    } cases[] = {
        {"clustered:clusters=0", EF_ERR_ARG},
        {"clustered:bits=64", EF_ERR_ARG},
        {"clustered:bits=0", EF_ERR_ARG},
        {"clustered:iters=-1", EF_ERR_ARG},
        {"clustered:topk=4", EF_ERR_ARG},
        {"iclustered:topk=0", EF_ERR_ARG},
        {"iclustered:clusters=x", EF_ERR_ARG},
        {"clustered:clusters=1000", EF_OK},
        {"iclustered:clusters=1000,topk=1000", EF_OK},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ef_attn *a = NULL;
        char name[128];
        snprintf(name, sizeof name, "spec %s", cases[i].spec);
        ef_check_status(name, ef_attn_new(&a, cases[i].spec, &s), cases[i].want);
        ef_attn_free(a);
    }
    /* causal=1 cannot be strict: clusters come from every query, future ones included. The
     * refusal must say so (EF_ERR_UNSUPPORTED, a message naming causal=1 and the reason). */
    const char *causal[] = {"clustered:causal=1", "iclustered:causal=1",
                            "iclustered:clusters=4,topk=8,causal=1,ref=1"};
    for (int i = 0; i < 3; i++) {
        ef_attn *a = NULL;
        char name[128];
        snprintf(name, sizeof name, "spec %s refused", causal[i]);
        ef_status st = ef_attn_new(&a, causal[i], &s);
        const char *msg = ef_last_error();
        ef_check_status(name, st, EF_ERR_UNSUPPORTED);
        snprintf(name, sizeof name, "spec %s: the message says why", causal[i]);
        int why = strstr(msg, "future") || strstr(msg, "later");
        ef_check(name, a == NULL && strstr(msg, "causal=1") && why, "\"%s\"", msg);
        ef_attn_free(a);
    }
    const char *names[2] = {"clustered", "iclustered"};
    for (int i = 0; i < 2; i++) {
        ef_attn_caps c;
        ef_status st = ef_attn_get_caps(names[i], &c);
        char name[128];
        snprintf(name, sizeof name, "%s caps: causal 0, cross, discrete, deterministic", names[i]);
        ef_check(name, !st && !c.causal && c.cross && c.discrete && c.deterministic && !c.exact,
                 "%s", ef_status_str(st));
    }
    ef_attn *a = NULL;
    if (ef_attn_new(&a, "iclustered", &s) == EF_OK)
        ef_check("iclustered describe",
                 !strcmp(ef_attn_describe(a), "iclustered:clusters=100,topk=32,bits=63,iters=10,"
                                              "causal=0,scale=auto,seed=0,ref=0"),
                 "%s", ef_attn_describe(a));
    ef_attn_free(a);
}

/* ---------------------------------------------------------------------------------------------
 * Replay (ef_attn_forward_replay): a forward that reuses the recorded clusters and top-k sets
 * ------------------------------------------------------------------------------------------- */
static int outputs_same(const bufs *in, const bufs *x, const bufs *y) {
    return !memcmp(x->out, y->out, in->no * 4) && !memcmp(x->dq, y->dq, in->nq * 4) &&
           !memcmp(x->dk, y->dk, in->nk * 4) && !memcmp(x->dv, y->dv, in->nv * 4);
}

/* Replay of plan a on (q, k, v) from a copy of `rec`, then backward, into o. */
static ef_status replay_io(ef_attn *a, const bufs *in, const float *const x[3],
                           const int32_t *kv_lens, const int32_t *q_lens, const void *rec,
                           bufs *o) {
    ef_free(o->saved);
    o->saved = ef_test_saved(a);
    memcpy(o->saved, rec, ef_attn_saved_bytes(a));
    memset(o->out, 0xff, in->no * 4), memset(o->dq, 0xff, in->nq * 4);
    memset(o->dk, 0xff, in->nk * 4), memset(o->dv, 0xff, in->nv * 4);
    ef_attn_io io = {x[0], x[1], x[2], kv_lens, o->out, q_lens};
    ef_status st = ef_attn_forward_replay(a, &io, o->saved);
    if (!st) st = ef_attn_backward(a, &io, o->saved, in->g, o->dq, o->dk, o->dv);
    return st;
}

/* 1. Replay on the forward's own inputs == that forward bitwise (out and saved), and backward
 *    after it == backward after the forward, on both paths.
 * 2. q, k, v scaled by (1 + 1e-3 z), z ~ N(0, 1), with the first of a few perturbation seeds
 *    for which a fresh forward changes the record (a cluster or a top-k set moves) and its
 *    output differs from the replay's by more than 1e-3 relative (a moved choice can be
 *    harmless: with topk >= kv_lens the clusters do not matter), so that the comparison below
 *    would see a path that re-chose: the fast replay keeps the record, the reference's replay
 *    of the fast path's record keeps it too, and the two agree as in fast_vs_ref (2e-5
 *    forward, 1e-4 backward, relative). */
static void replay_spec(const char *spec) {
    ef_attn_shape s = {2, 2, 45, 50, 16, 8};
    const int32_t q_lens[2] = {45, 19}, kv_lens[2] = {31, 50};
    char refspec[256], name[400];
    with_ref(refspec, sizeof refspec, spec);
    bufs in, o0[2], o1[2];
    ef_test_inputs(&in, s, 111, 1.0f);
    ef_attn *a[2] = {NULL, NULL};
    ef_status st = ef_attn_new(&a[0], spec, &s);
    if (!st) st = ef_attn_new(&a[1], refspec, &s);
    snprintf(name, sizeof name, "%s: replay plans", spec);
    for (int path = 0; path < 2; path++)
        ef_test_outputs(&o0[path], &in), ef_test_outputs(&o1[path], &in);
    const float *x0[3] = {in.q, in.k, in.v};
    if (run_ok(name, st)) {
        size_t sb = ef_attn_saved_bytes(a[0]);
        for (int path = 0; path < 2 && !st; path++) {
            const char *sp = path ? refspec : spec;
            st = run_io(a[path], &in, in.q, in.k, in.v, in.g, kv_lens, q_lens, &o0[path], 0x5a);
            if (!st) st = replay_io(a[path], &in, x0, kv_lens, q_lens, o0[path].saved, &o1[path]);
            snprintf(name, sizeof name, "%s: replay on the same inputs", sp);
            if (!run_ok(name, st)) break;
            snprintf(name, sizeof name, "%s: replay on the same inputs: out, saved == forward", sp);
            int same = !memcmp(o0[path].out, o1[path].out, in.no * 4) &&
                       !memcmp(o0[path].saved, o1[path].saved, sb);
            ef_check(name, same, "%s (%zu saved bytes)", same ? "bitwise" : "DIFFERENT", sb);
            snprintf(name, sizeof name,
                     "%s: backward after replay == backward after forward (same inputs)", sp);
            same = outputs_same(&in, &o0[path], &o1[path]);
            ef_check(name, same, "%s", same ? "out, dq, dk, dv bitwise" : "DIFFERENT");
        }
        /* 2. perturbed inputs */
        float *xp[3] = {malloc(in.nq * 4), malloc(in.nk * 4), malloc(in.nv * 4)};
        const size_t cnt[3] = {in.nq, in.nk, in.nv};
        float *fresh_out = malloc(in.no * 4);
        void *fresh = ef_test_saved(a[0]);
        int found = -1;
        double off = 0;
        const float *xs[3] = {xp[0], xp[1], xp[2]};
        for (int seed = 0; seed < 20 && found < 0 && !st; seed++) {
            for (int t = 0; t < 3; t++) {
                float *z = ef_test_randn(cnt[t], 900 + 3 * (uint64_t)seed + t, 1.0f);
                for (size_t i = 0; i < cnt[t]; i++) xp[t][i] = x0[t][i] * (1.0f + 1e-3f * z[i]);
                free(z);
            }
            ef_attn_io io = {xp[0], xp[1], xp[2], kv_lens, fresh_out, q_lens};
            st = ef_attn_forward(a[0], &io, fresh);
            if (st || !memcmp(fresh, o0[0].saved, sb)) continue;
            st = replay_io(a[0], &in, xs, kv_lens, q_lens, o0[0].saved, &o1[0]);
            off = st ? 0 : ef_max_rel_diff(fresh_out, o1[0].out, in.no);
            if (off > 1e-3) found = seed;
        }
        snprintf(name, sizeof name,
                 "%s: a 1e-3 perturbation moves a cluster or top-k key (and the output)", spec);
        if (ef_check(name, !st && found >= 0,
                     "perturbation seed %d: fresh forward vs replay, max rel diff %.3g %s", found,
                     off, ef_last_error())) {
            long moved = 0;
            for (size_t i = 0; i < sb / 4; i++)
                moved += ((const int32_t *)fresh)[i] != ((const int32_t *)o0[0].saved)[i];
            st = replay_io(a[0], &in, xs, kv_lens, q_lens, o0[0].saved, &o1[0]);
            if (!st) st = replay_io(a[1], &in, xs, kv_lens, q_lens, o0[0].saved, &o1[1]);
            snprintf(name, sizeof name, "%s: perturbed: replay and backward, both paths", spec);
            if (run_ok(name, st)) {
                snprintf(name, sizeof name, "%s: perturbed: replay keeps the recorded choices",
                         spec);
                int kf = !memcmp(o1[0].saved, o0[0].saved, sb);
                int kr = !memcmp(o1[1].saved, o0[0].saved, sb);
                ef_check(name, kf && kr, "fast %s, ref %s (a fresh forward changed %ld entries)",
                         kf ? "kept" : "CHANGED", kr ? "kept" : "CHANGED", moved);
                snprintf(name, sizeof name, "%s: perturbed: fast replay vs ref replay", spec);
                compare_all(name, &in, &o1[0], &o1[1], 2e-5, 1e-4, 1);
            }
        }
        for (int t = 0; t < 3; t++) free(xp[t]);
        free(fresh_out);
        ef_free(fresh);
    }
    for (int path = 0; path < 2; path++) {
        ef_attn_free(a[path]);
        ef_test_free_outputs(&o0[path]), ef_test_free_outputs(&o1[path]);
    }
    ef_test_free_inputs(&in);
}

/* Replay needs this plan's record for these lengths: NULL, garbage (indices out of range: all
 * bytes 0x7f, or 0xff = -1 everywhere), a record made with other q_lens, and (iclustered) a
 * top-k set with a repeated key are refused with EF_ERR_ARG and a message, on both paths,
 * before anything is written. */
static void replay_refused(const char *spec) {
    ef_attn_shape s = {2, 2, 20, 24, 8, 8};
    const int32_t q_lens[2] = {20, 13}, kv_lens[2] = {24, 17};
    bufs in, x;
    ef_test_inputs(&in, s, 121, 1.0f);
    ef_test_outputs(&x, &in);
    ef_attn *a = NULL;
    char name[400];
    snprintf(name, sizeof name, "%s: replay refusals: plan", spec);
    if (run_ok(name, ef_attn_new(&a, spec, &s))) {
        size_t sb = ef_attn_saved_bytes(a);
        void *rec = ef_test_saved(a), *sv = ef_test_saved(a);
        ef_attn_io io = {in.q, in.k, in.v, kv_lens, x.out, q_lens};
        ef_status st = ef_attn_forward(a, &io, rec);
        snprintf(name, sizeof name, "%s: replay with saved NULL -> EF_ERR_ARG", spec);
        ef_check_status(name, ef_attn_forward_replay(a, &io, NULL), EF_ERR_ARG);
        const int fills[2] = {0x7f, 0xff};
        for (int f = 0; f < 2; f++) {
            memset(sv, fills[f], sb);
            snprintf(name, sizeof name,
                     "%s: replay of a garbage saved (bytes 0x%02x) -> EF_ERR_ARG", spec, fills[f]);
            ef_check_status(name, ef_attn_forward_replay(a, &io, sv), EF_ERR_ARG);
            ef_check(name, strstr(ef_last_error(), "saved holds") != NULL, "\"%s\"",
                     ef_last_error());
        }
        memcpy(sv, rec, sb);
        ef_attn_io all = {in.q, in.k, in.v, kv_lens, x.out, NULL};
        snprintf(name, sizeof name, "%s: replay of a record made with other q_lens -> EF_ERR_ARG",
                 spec);
        ef_check_status(name, ef_attn_forward_replay(a, &all, sv), EF_ERR_ARG);
        ef_check(name, strstr(ef_last_error(), "valid query") != NULL, "\"%s\"", ef_last_error());
        if (strstr(spec, "iclustered")) {
            int32_t *tk = (int32_t *)sv + s.q_len; /* head 0: cluster 0's set, slots 0 and 1 */
            tk[1] = tk[0];
            snprintf(name, sizeof name,
                     "%s: replay of a top-k set with a repeated key -> "
                     "EF_ERR_ARG",
                     spec);
            ef_check_status(name, ef_attn_forward_replay(a, &io, sv), EF_ERR_ARG);
            ef_check(name, strstr(ef_last_error(), "top-k") != NULL, "\"%s\"", ef_last_error());
            tk[1] = ((int32_t *)rec)[s.q_len + 1];
        }
        snprintf(name, sizeof name, "%s: a refused replay leaves saved alone", spec);
        ef_check(name, !st && !memcmp(sv, rec, sb), "%s", st ? ef_last_error() : "");
        ef_free(rec), ef_free(sv);
    }
    ef_attn_free(a);
    ef_test_free_outputs(&x), ef_test_free_inputs(&in);
}

int main(void) {
    fast_vs_ref();
    const char *fd[] = {"clustered:clusters=4", "iclustered:clusters=4,topk=5",
                        "iclustered:clusters=3,topk=30,bits=16"};
    for (int i = 0; i < 3; i++) gradient_check(fd[i]);
    identical_queries();
    topk_equals_length();
    kmeans_separable();
    hash_exact();
    topk_exact();
    kmeans_plain();
    const char *specs[] = {"clustered:clusters=6", "iclustered:clusters=6,topk=8",
                           "iclustered:clusters=6,topk=64", "clustered:clusters=6,ref=1",
                           "iclustered:clusters=6,topk=8,ref=1"};
    const int32_t ql[3][2] = {{45, 19}, {4, 0}, {45, 45}}, kv[3][2] = {{31, 50}, {50, 17}, {5, 0}};
    for (int i = 0; i < 5; i++) {
        for (int l = 0; l < 3; l++) padding_invariance(specs[i], ql[l], kv[l]);
        empty_rows(specs[i]);
        inference_equals_training(specs[i]);
        if (i < 3) threads_bitwise(specs[i]), foreign_saved(specs[i]);
    }
    errors();
    const char *rp[] = {"clustered:clusters=6", "iclustered:clusters=6,topk=8",
                        "iclustered:clusters=4,topk=20,bits=20,iters=3"};
    for (int i = 0; i < 3; i++) replay_spec(rp[i]);
    const char *rf[] = {"clustered:clusters=6", "iclustered:clusters=6,topk=8",
                        "clustered:clusters=6,ref=1", "iclustered:clusters=6,topk=8,ref=1"};
    for (int i = 0; i < 4; i++) replay_refused(rf[i]);
    return ef_test_finish();
}
