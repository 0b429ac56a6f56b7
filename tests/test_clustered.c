/*
 * test_clustered.c - `clustered` and `iclustered` (fast-transformers' clustered and improved
 * clustered attention): fast path against the double-precision reference (ref=1, same clusters),
 * forward and backward; the reference's backward against central differences; the limit cases
 * of ALGORITHMS.md (#4: identical queries make clustered == full; #3: topk >= keys makes
 * iclustered == full, with and without padding); Hamming k-means on two separable groups
 * (#17); key-padding invariance; thread-count independence; option errors and the causal
 * refusal.
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

typedef ef_test_bufs bufs;

static int run_ok(const char *label, ef_status st) {
    char name[300];
    snprintf(name, sizeof name, "%s: runs", label);
    return ef_check(name, st == EF_OK, "%s %s", ef_status_str(st), ef_last_error());
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
                          const int32_t *lens, double tol_f, double tol_b, int relative) {
    bufs x, y;
    ef_test_outputs(&x, in), ef_test_outputs(&y, in);
    ef_status s1 = ef_test_run(spec_a, in, lens, &x), s2 = ef_test_run(spec_b, in, lens, &y);
    if (run_ok(label, s1 != EF_OK ? s1 : s2))
        compare_all(label, in, &x, &y, tol_f, tol_b, relative);
    ef_test_free_outputs(&x), ef_test_free_outputs(&y);
}

/* Fast (fp32, GEMMs) vs reference (double loops), same clusters and top-k sets. The fast path
 * accumulates the centroid logits, softmax and products in fp32 over up to M = 83 keys: errors
 * of a few 1e-6 relative; the backward chains two softmax backwards (the centroid's and the
 * per-query top-k one), so 2e-5 / 1e-4 relative (max|diff| / max|ref|) leave a margin of ~40x
 * over the largest error measured (5e-7).
 * A wrong cluster, mask or top-k set gives errors of order 1. */
static void fast_vs_ref(void) {
    ef_attn_shape s = {2, 2, 97, 83, 24, 40};
    int32_t lens[2] = {83, 30};
    bufs in;
    ef_test_inputs(&in, s, 11, 1.0f);
    const char *specs[] = {"clustered:clusters=7",
                           "clustered",
                           "iclustered:clusters=7,topk=9",
                           "iclustered:clusters=5,topk=40,bits=20,iters=3",
                           "iclustered:clusters=7,topk=9,causal=1",
                           "iclustered:causal=1"};
    for (int i = 0; i < 6; i++)
        for (int pad = 0; pad < 2; pad++) {
            char label[256], ref[256];
            snprintf(ref, sizeof ref, "%s%sref=1", specs[i], strchr(specs[i], ':') ? "," : ":");
            snprintf(label, sizeof label, "%s vs ref%s", specs[i], pad ? " (padded)" : "");
            compare_specs(label, &in, specs[i], ref, pad ? lens : NULL, 2e-5, 1e-4, 1);
        }
    ef_test_free_inputs(&in);
}

/* f(x) = sum g . out(x) in the reference path; its directional derivative along a random d
 * against the central difference (f(x + eps d) - f(x - eps d)) / 2 eps. Clusters and top-k
 * sets are piecewise constant in x: the step 1e-3 is small enough not to move them here (a
 * moved set would give an error of order 1). Inputs are fp32, so the difference quotient has a
 * rounding error of ~1e-7 |f| / eps: tolerance 2e-3 relative to the derivative's scale. */
static double eval_f(ef_attn *a, const bufs *in, const float *q, const float *k, const float *v,
                     const int32_t *lens, float *out) {
    ef_attn_io io = {q, k, v, lens, out};
    if (ef_attn_forward(a, &io, NULL) != EF_OK) return NAN;
    double f = 0;
    for (size_t x = 0; x < in->no; x++) f += (double)in->g[x] * out[x];
    return f;
}

static void gradient_check(const char *spec, const int32_t *lens) {
    ef_attn_shape s = {1, 2, 19, 23, 8, 6};
    bufs in, o;
    ef_test_inputs(&in, s, 21, 1.0f);
    ef_test_outputs(&o, &in);
    char label[256];
    snprintf(label, sizeof label, "%s: directional derivative%s", spec, lens ? " (padded)" : "");
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    if (st == EF_OK) st = ef_test_run_plan(a, &in, lens, &o, 1);
    if (run_ok(label, st)) {
        size_t nt = in.nq + in.nk + in.nv;
        float *dir = ef_test_randn(nt, 22, 1.0f);
        float *qp = malloc(nt * sizeof(float)), *qm = malloc(nt * sizeof(float));
        float *out = malloc(in.no * sizeof(float));
        double eps = 1e-3, an = 0;
        const float *src[3] = {in.q, in.k, in.v};
        const float *grad[3] = {o.dq, o.dk, o.dv};
        size_t cnt[3] = {in.nq, in.nk, in.nv}, off = 0;
        for (int t = 0; t < 3; t++) {
            for (size_t x = 0; x < cnt[t]; x++) {
                qp[off + x] = src[t][x] + (float)eps * dir[off + x];
                qm[off + x] = src[t][x] - (float)eps * dir[off + x];
                an += (double)grad[t][x] * dir[off + x];
            }
            off += cnt[t];
        }
        double fp = eval_f(a, &in, qp, qp + in.nq, qp + in.nq + in.nk, lens, out);
        double fm = eval_f(a, &in, qm, qm + in.nq, qm + in.nq + in.nk, lens, out);
        double num = (fp - fm) / (2 * eps);
        ef_check_err(label, fabs(num - an) / fmax(fabs(an), 1), 2e-3);
        free(dir), free(qp), free(qm), free(out);
    }
    ef_attn_free(a);
    ef_test_free_outputs(&o), ef_test_free_inputs(&in);
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
    ef_status s1 = ef_test_run(spec, in, lens, &x), s2 = ef_test_run(full, in, lens, &y);
    if (run_ok(label, s1 != EF_OK ? s1 : s2)) {
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
                  1e-4, 1e-4, 0);
    compare_specs("iclustered topk=64 == full (padded)", &in, "iclustered:clusters=5,topk=64",
                  "full", lens, 1e-4, 1e-4, 0);
    compare_specs("iclustered topk=45 causal == full causal", &in,
                  "iclustered:clusters=5,topk=45,causal=1", "full:causal=1", lens, 1e-4, 1e-4, 0);
    ef_test_free_inputs(&in);
}

/* ALGORITHMS #17 (FT test_cluster_cpu): codes 0 and 2^bits - 1, 50 each, interleaved, into 2
 * clusters must give exactly these centroids with counts 50/50, for every bits in 1..62. */
static void kmeans_separable(void) {
    enum { N = 100 };
    uint64_t hash[N], cent[2];
    int32_t asg[N], cnt[2], work[N + 2 * 63];
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
    int32_t a3[90], n3[3], w3[90 + 3 * 63];
    for (int i = 0; i < 90; i++) h3[i] = g[i % 3];
    ef_clustered_kmeans(h3, 90, bits, 3, 10, 3, 9, a3, c3, n3, w3);
    int ok = n3[0] == 30 && n3[1] == 30 && n3[2] == 30;
    for (int i = 0; i < 90 && ok; i++) ok = c3[a3[i]] == h3[i];
    ef_check("k-means: three separable groups -> exact centroids, counts 30/30/30", ok,
             "counts %d %d %d", n3[0], n3[1], n3[2]);
}

/* Keys past kv_lens never matter: replacing padded k and v by huge values leaves out, dq and
 * the valid rows of dk, dv bit-identical, and the padded rows of dk, dv zero. */
static void padding_invariance(const char *spec) {
    ef_attn_shape s = {2, 2, 40, 50, 16, 8};
    int32_t lens[2] = {50, 23};
    bufs in, x, y;
    ef_test_inputs(&in, s, 51, 1.0f);
    ef_test_outputs(&x, &in), ef_test_outputs(&y, &in);
    ef_status st = ef_test_run(spec, &in, lens, &x);
    for (int h = 0; h < s.heads; h++)
        for (int j = lens[1]; j < s.kv_len; j++) {
            size_t r = (size_t)(s.heads + h) * s.kv_len + j;
            for (int t = 0; t < s.head_dim; t++) in.k[r * s.head_dim + t] = 1e4f;
            for (int t = 0; t < s.v_dim; t++) in.v[r * s.v_dim + t] = 1e9f;
        }
    if (st == EF_OK) st = ef_test_run(spec, &in, lens, &y);
    char label[256];
    snprintf(label, sizeof label, "%s: padded keys do not leak", spec);
    if (run_ok(label, st)) {
        int same = !memcmp(x.out, y.out, in.no * 4) && !memcmp(x.dq, y.dq, in.nq * 4) &&
                   !memcmp(x.dk, y.dk, in.nk * 4) && !memcmp(x.dv, y.dv, in.nv * 4);
        double pad = 0;
        for (int h = 0; h < s.heads; h++)
            for (int j = lens[1]; j < s.kv_len; j++) {
                size_t r = (size_t)(s.heads + h) * s.kv_len + j;
                for (int t = 0; t < s.head_dim; t++)
                    pad = fmax(pad, fabs(y.dk[r * s.head_dim + t]));
                for (int t = 0; t < s.v_dim; t++) pad = fmax(pad, fabs(y.dv[r * s.v_dim + t]));
            }
        ef_check(label, same && pad == 0, "bitwise %s, max |grad| on padded keys %g",
                 same ? "equal" : "DIFFERENT", pad);
    }
    ef_test_free_outputs(&x), ef_test_free_outputs(&y), ef_test_free_inputs(&in);
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
    if (run_ok(label, ef_test_run(spec, &in, lens, &x))) {
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
    int32_t lens[2] = {70, 41};
    bufs in, x, y;
    ef_test_inputs(&in, s, 71, 1.0f);
    ef_test_outputs(&x, &in), ef_test_outputs(&y, &in);
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    ef_status st = ef_test_run(spec, &in, lens, &x);
    ef_set_num_threads(2);
    if (st == EF_OK) st = ef_test_run(spec, &in, lens, &y);
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
    ef_attn_shape s = {1, 2, 33, 40, 8, 8};
    bufs in, x;
    ef_test_inputs(&in, s, 81, 1.0f);
    ef_test_outputs(&x, &in);
    float *out = ef_test_zeros(in.no);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    if (st == EF_OK) st = ef_test_run_plan(a, &in, NULL, &x, 0);
    ef_attn_io io = {in.q, in.k, in.v, NULL, out};
    if (st == EF_OK) st = ef_attn_forward(a, &io, NULL);
    char label[256];
    snprintf(label, sizeof label, "%s: inference == training forward", spec);
    if (run_ok(label, st)) ef_check(label, !memcmp(out, x.out, in.no * 4), "bitwise");
    ef_attn_free(a);
    free(out);
    ef_test_free_outputs(&x), ef_test_free_inputs(&in);
}

static void errors(void) {
    ef_attn_shape s = {1, 1, 16, 16, 8, 8};
    struct {
        const char *spec;
        ef_status want;
    } cases[] = {
        {"clustered:clusters=0", EF_ERR_ARG},  {"clustered:bits=64", EF_ERR_ARG},
        {"clustered:bits=0", EF_ERR_ARG},      {"clustered:iters=-1", EF_ERR_ARG},
        {"clustered:topk=4", EF_ERR_ARG},      {"iclustered:topk=0", EF_ERR_ARG},
        {"iclustered:clusters=x", EF_ERR_ARG}, {"clustered:causal=1", EF_ERR_UNSUPPORTED},
        {"iclustered:causal=1", EF_OK},        {"clustered:clusters=1000", EF_OK},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ef_attn *a = NULL;
        char name[128];
        snprintf(name, sizeof name, "spec %s", cases[i].spec);
        ef_check_status(name, ef_attn_new(&a, cases[i].spec, &s), cases[i].want);
        ef_attn_free(a);
    }
    ef_attn *a = NULL;
    if (ef_attn_new(&a, "iclustered", &s) == EF_OK)
        ef_check("iclustered describe",
                 !strcmp(ef_attn_describe(a), "iclustered:clusters=100,topk=32,bits=63,iters=10,"
                                              "causal=0,scale=auto,seed=0,ref=0"),
                 "%s", ef_attn_describe(a));
    ef_attn_free(a);
}

int main(void) {
    fast_vs_ref();
    int32_t lens[1] = {15};
    gradient_check("clustered:clusters=4,ref=1", NULL);
    gradient_check("clustered:clusters=4,ref=1", lens);
    gradient_check("iclustered:clusters=4,topk=5,ref=1", NULL);
    gradient_check("iclustered:clusters=4,topk=5,ref=1", lens);
    gradient_check("iclustered:clusters=4,topk=5,causal=1,ref=1", lens);
    gradient_check("iclustered:clusters=4,topk=5", lens);
    identical_queries();
    topk_equals_length();
    kmeans_separable();
    const char *specs[] = {"clustered:clusters=6", "iclustered:clusters=6,topk=8",
                           "iclustered:clusters=6,topk=8,causal=1"};
    for (int i = 0; i < 3; i++) {
        padding_invariance(specs[i]);
        empty_rows(specs[i]);
        threads_bitwise(specs[i]);
        inference_equals_training(specs[i]);
    }
    errors();
    return ef_test_finish();
}
