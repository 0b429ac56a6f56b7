/*
 * test_lsh.c - `lsh` (Reformer LSH attention, src/attn/lsh.c).
 *
 * Checks:
 *   - fast path == reference path (ref=1, double, explicit per-query sets from the same
 *     permutations), forward and backward: N a multiple of chunk and not (last chunk shorter),
 *     causal, padding, dedup on/off, before/after windows, more chunks than the window;
 *   - limit case #1 (ALGORITHMS.md): hashes=1 and 2 chunks with before=1 cover every key once,
 *     so lsh == full attention on (q, q/|q|) with the self-mask, built here in double;
 *   - bucket assignment == a scalar re-implementation, bit for bit (the saved permutations),
 *     zero query rows included (every projection ties: the first bucket);
 *   - more rounds give a smaller error against full attention on clustered inputs;
 *   - causality: future v, and future q rescaled by 2 (same keys, same buckets), leave past
 *     outputs bit-identical (hashing itself is not causal: future buckets move chunk edges);
 *   - padding invariance: the content of padded positions never changes valid outputs;
 *   - directional finite-difference check of the reference gradient (hashing unchanged);
 *   - 1 vs 2 threads bit-identical; bad options.
 *
 * Tolerances: fast (fp32 GEMMs, fp32 exp) vs double reference, relative to the output scale:
 * 1e-4 forward, 5e-4 backward (sums over <= 4 rounds x 192 keys of fp32 terms, plus the
 * normalisation Jacobian; a wrong mask or a wrong count gives errors of order 0.1-1).
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ef_test_bufs bufs;

/* Rows 3 and 10 of every (b, h) of q set to zero: k = 0, all projections tie (exercises the
 * exact fallback of the fp32 hashing) and no gradient flows through the key. */
static int g_zero_rows;
static void zero_rows(bufs *in) {
    if (!g_zero_rows) return;
    for (int bh = 0; bh < in->s.batch * in->s.heads; bh++)
        for (int i = 3; i < in->s.q_len && i <= 10; i += 7)
            memset(in->q + ((size_t)bh * in->s.q_len + i) * in->s.head_dim, 0,
                   sizeof(float) * in->s.head_dim);
}

static void fast_vs_ref(const char *label, ef_attn_shape s, const char *opts,
                        const int32_t *kv_lens) {
    char name[256], sf[256], sr[256];
    snprintf(sf, sizeof sf, "lsh:%s", opts);
    snprintf(sr, sizeof sr, "lsh:%s,ref=1", opts);
    bufs in, rf, fa;
    ef_test_inputs(&in, s, 77 + (uint64_t)s.q_len, 1.0f);
    zero_rows(&in);
    ef_test_outputs(&rf, &in), ef_test_outputs(&fa, &in);
    ef_status st1 = ef_test_run(sr, &in, kv_lens, &rf), st2 = ef_test_run(sf, &in, kv_lens, &fa);
    snprintf(name, sizeof name, "%s: both run", label);
    if (ef_check(name, !st1 && !st2, "%s %s %s", ef_status_str(st1), ef_status_str(st2),
                 ef_last_error())) {
        snprintf(name, sizeof name, "%s: outputs finite", label);
        ef_check(name,
                 !ef_test_any_nonfinite(fa.out, in.no) && !ef_test_any_nonfinite(fa.dq, in.nq),
                 "%s", "");
        snprintf(name, sizeof name, "%s: out", label);
        ef_check_err(name, ef_max_rel_diff(fa.out, rf.out, in.no), 1e-4);
        snprintf(name, sizeof name, "%s: dq", label);
        ef_check_err(name, ef_max_rel_diff(fa.dq, rf.dq, in.nq), 5e-4);
        snprintf(name, sizeof name, "%s: dv", label);
        ef_check_err(name, ef_max_rel_diff(fa.dv, rf.dv, in.nv), 5e-4);
        snprintf(name, sizeof name, "%s: dk is zero (k ignored)", label);
        float *zero = ef_test_zeros(in.nk);
        ef_check_err(name,
                     ef_max_abs_diff(fa.dk, zero, in.nk) + ef_max_abs_diff(rf.dk, zero, in.nk), 0);
        free(zero);
    }
    ef_test_free_outputs(&rf), ef_test_free_outputs(&fa), ef_test_free_inputs(&in);
}

static void versus_reference(void) {
    int32_t lens[2] = {256, 171};
    ef_attn_shape s1 = {2, 2, 256, 256, 24, 20};
    fast_vs_ref("N=256 chunk=32", s1, "chunk=32", NULL);
    fast_vs_ref("N=256 chunk=32 padded", s1, "chunk=32", lens);
    fast_vs_ref("N=256 causal padded", s1, "chunk=32,causal=1", lens);
    fast_vs_ref("N=256 dedup=0", s1, "chunk=32,dedup=0", lens);
    fast_vs_ref("N=256 before=2 after=1 hashes=3", s1, "chunk=32,before=2,after=1,hashes=3", lens);
    ef_attn_shape s2 = {1, 3, 203, 203, 16, 12};
    int32_t l2[1] = {190};
    fast_vs_ref("N=203 chunk=32 (last chunk 11)", s2, "chunk=32,seed=5", NULL);
    fast_vs_ref("N=203 causal padded", s2, "chunk=32,causal=1,seed=5", l2);
    fast_vs_ref("N=203 buckets=4 scale=0.7", s2, "chunk=40,buckets=4,scale=0.7", l2);
    fast_vs_ref("N=203 window > chunks", s2, "chunk=64,before=3,after=2", l2);
    ef_attn_shape s3 = {1, 1, 5, 5, 8, 3};
    int32_t l3[1] = {0};
    fast_vs_ref("N=5 chunk=64 (one chunk)", s3, "hashes=2", NULL);
    fast_vs_ref("N=5 all padded", s3, "hashes=2", l3);
    g_zero_rows = 1;
    fast_vs_ref("N=203 zero query rows", s2, "chunk=32,causal=1,seed=5", l2);
    g_zero_rows = 0;
}

/* Shared-QK full attention in double: logits scale q_i.k_j (k = q/|q|), keys j < valid
 * (and j <= i when causal), self excluded unless it is the only visible key. */
static void full_shared_qk(ef_attn_shape s, const float *q, const float *v, const int32_t *lens,
                           int causal, double scale, float *out) {
    int n = s.q_len, d = s.head_dim, e = s.v_dim;
    double *kk = malloc(sizeof(double) * n * d), *w = malloc(sizeof(double) * n);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++) {
            size_t bh = (size_t)b * s.heads + h;
            const float *qq = q + bh * n * d, *vv = v + bh * n * e;
            int valid = lens ? lens[b] : n;
            for (int j = 0; j < n; j++) {
                double ss = 0;
                for (int t = 0; t < d; t++) ss += (double)qq[j * d + t] * qq[j * d + t];
                for (int t = 0; t < d; t++) kk[j * d + t] = ss > 0 ? qq[j * d + t] / sqrt(ss) : 0;
            }
            for (int i = 0; i < n; i++) {
                int any = 0;
                for (int j = 0; j < n; j++) {
                    int vis = j < valid && (!causal || j <= i) && j != i;
                    any |= vis;
                    w[j] = vis ? 1 : 0;
                }
                if (!any && i < valid) w[i] = 1;
                double mx = -INFINITY;
                for (int j = 0; j < n; j++) {
                    if (!w[j]) {
                        w[j] = -INFINITY;
                        continue;
                    }
                    double dot = 0;
                    for (int t = 0; t < d; t++) dot += (double)qq[i * d + t] * kk[j * d + t];
                    w[j] = scale * dot;
                    mx = w[j] > mx ? w[j] : mx;
                }
                double sum = 0;
                for (int j = 0; j < n; j++) sum += w[j] = w[j] == -INFINITY ? 0 : exp(w[j] - mx);
                for (int t = 0; t < e; t++) {
                    double o = 0;
                    for (int j = 0; j < n; j++) o += w[j] * vv[j * e + t];
                    out[(bh * n + i) * e + t] = sum > 0 ? (float)(o / sum) : 0.0f;
                }
            }
        }
    free(kk), free(w);
}

static void limit_full(void) {
    struct {
        ef_attn_shape s;
        const char *opts;
        int causal;
        int pad;
    } cs[] = {
        {{2, 2, 128, 128, 16, 8}, "hashes=1,chunk=64", 0, 0},
        {{2, 2, 128, 128, 16, 8}, "hashes=1,chunk=64,causal=1", 1, 1},
        {{1, 2, 100, 100, 12, 8}, "hashes=1,chunk=50,buckets=8,seed=3", 0, 1},
        {{1, 2, 100, 100, 12, 8}, "hashes=1,chunk=60,seed=3,ref=1", 0, 1}, /* chunks 60 + 40 */
    };
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        bufs in, o;
        ef_test_inputs(&in, cs[c].s, 300 + c, 1.0f);
        ef_test_outputs(&o, &in);
        int32_t lens[2] = {cs[c].s.q_len - 17, cs[c].s.q_len};
        const int32_t *kl = cs[c].pad ? lens : NULL;
        char spec[128], name[256];
        snprintf(spec, sizeof spec, "lsh:%s", cs[c].opts);
        ef_status st = ef_test_run(spec, &in, kl, &o);
        float *want = malloc(sizeof(float) * in.no);
        full_shared_qk(cs[c].s, in.q, in.v, kl, cs[c].causal, 1.0 / sqrt(cs[c].s.head_dim), want);
        snprintf(name, sizeof name, "limit case 1: %s == full shared-QK attention", spec);
        if (ef_check(name, !st, "%s", ef_last_error()))
            ef_check_err(name, ef_max_rel_diff(o.out, want, in.no), 1e-4);
        free(want);
        ef_test_free_outputs(&o), ef_test_free_inputs(&in);
    }
}

/* Scalar re-implementation of the hashing (docs/lsh.md): rotation from
 * ef_rng_normal(seed, 0x4c534800 << 32 | (h * hashes + r), 0, D * nb/2), x = q/|q| rounded to
 * fp32, y = x R in double, bucket = first argmax over [y, -y], padded -> nb, stable sort. */
static void buckets_exact(void) {
    ef_attn_shape s = {2, 3, 150, 150, 20, 4};
    int R = 3, nb = 8, half = nb / 2, n = s.q_len, d = s.head_dim;
    uint64_t seed = 1234567;
    bufs in, o;
    ef_test_inputs(&in, s, 9, 1.5f);
    g_zero_rows = 1, zero_rows(&in), g_zero_rows = 0;
    ef_test_outputs(&o, &in);
    int32_t lens[2] = {150, 101};
    char spec[128];
    snprintf(spec, sizeof spec, "lsh:hashes=%d,buckets=%d,chunk=16,seed=%llu", R, nb,
             (unsigned long long)seed);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    if (!st) {
        ef_free(o.saved);
        o.saved = ef_test_saved(a);
        ef_attn_io io = {in.q, in.k, in.v, lens, o.out};
        st = ef_attn_forward(a, &io, o.saved);
    }
    long bad = 0;
    if (ef_check("buckets: plan runs", !st, "%s", ef_last_error())) {
        const int32_t *perm = o.saved;
        float *rot = malloc(sizeof(float) * d * half), *x = malloc(sizeof(float) * d);
        int *bk = malloc(sizeof(int) * n);
        for (int b = 0; b < s.batch; b++)
            for (int h = 0; h < s.heads; h++)
                for (int r = 0; r < R; r++) {
                    ef_rng_normal(seed, (0x4c534800ull << 32) | (uint64_t)(h * R + r), 0,
                                  (size_t)d * half, rot);
                    const float *q = in.q + ((size_t)b * s.heads + h) * n * d;
                    for (int i = 0; i < n; i++) {
                        if (i >= lens[b]) {
                            bk[i] = nb;
                            continue;
                        }
                        double ss = 0;
                        for (int t = 0; t < d; t++) ss += (double)q[i * d + t] * q[i * d + t];
                        for (int t = 0; t < d; t++)
                            x[t] = ss > 0 ? (float)(q[i * d + t] / sqrt(ss)) : 0.0f;
                        int best = 0;
                        double bv = -INFINITY;
                        for (int c = 0; c < nb; c++) {
                            double y = 0;
                            for (int t = 0; t < d; t++)
                                y += (double)x[t] * rot[t * half + c % half];
                            if (c >= half) y = -y;
                            if (y > bv) bv = y, best = c;
                        }
                        bk[i] = best;
                    }
                    const int32_t *pr = perm + (((size_t)b * s.heads + h) * R + r) * n;
                    int sidx = 0;
                    for (int c = 0; c <= nb; c++)
                        for (int i = 0; i < n; i++)
                            if (bk[i] == c) bad += pr[sidx++] != i;
                }
        free(rot), free(x), free(bk);
        ef_check("buckets: saved permutations == scalar re-implementation", bad == 0,
                 "%ld mismatches", bad);
    }
    ef_attn_free(a);
    ef_test_free_outputs(&o), ef_test_free_inputs(&in);
}

/* Clustered queries: 6 random directions, each query = 4 * centre + N(0, 0.5). */
static void rounds_help(void) {
    ef_attn_shape s = {1, 4, 512, 512, 16, 8};
    bufs in;
    ef_test_inputs(&in, s, 21, 1.0f);
    float *cent = ef_test_randn(6 * 16, 22, 1.0f), *noise = ef_test_randn(in.nq, 23, 0.5f);
    for (size_t x = 0; x < in.nq; x++) {
        size_t row = x / 16;
        in.q[x] = 4 * cent[(row * 2654435761u % 6) * 16 + x % 16] + noise[x];
    }
    float *want = malloc(sizeof(float) * in.no);
    full_shared_qk(s, in.q, in.v, NULL, 0, 0.25, want);
    double err[3];
    int hs[3] = {1, 2, 8};
    for (int t = 0; t < 3; t++) {
        bufs o;
        ef_test_outputs(&o, &in);
        char spec[128];
        snprintf(spec, sizeof spec, "lsh:hashes=%d,chunk=32,seed=4", hs[t]);
        ef_test_run(spec, &in, NULL, &o);
        double e2 = 0, w2 = 0;
        for (size_t x = 0; x < in.no; x++)
            e2 += (o.out[x] - want[x]) * (double)(o.out[x] - want[x]),
                w2 += (double)want[x] * want[x];
        err[t] = sqrt(e2 / w2);
        ef_test_free_outputs(&o);
    }
    printf("  clustered: relative RMS error vs full, hashes 1/2/8: %.4f %.4f %.4f\n", err[0],
           err[1], err[2]);
    ef_check("more rounds: error(2) < error(1)", err[1] < err[0], "%.4f vs %.4f", err[1], err[0]);
    ef_check("more rounds: error(8) < 0.5 error(1)", err[2] < 0.5 * err[0], "%.4f vs %.4f", err[2],
             err[0]);
    free(want), free(cent), free(noise);
    ef_test_free_inputs(&in);
}

static void causality(void) {
    ef_attn_shape s = {1, 2, 200, 200, 16, 8};
    int cut = 120;
    bufs in, o1, o2;
    ef_test_inputs(&in, s, 31, 1.0f);
    ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
    const char *spec = "lsh:chunk=32,causal=1,hashes=3";
    ef_status st = ef_test_run(spec, &in, NULL, &o1);
    for (int h = 0; h < s.heads; h++)
        for (int i = cut; i < s.q_len; i++) {
            for (int t = 0; t < s.head_dim; t++)
                in.q[((size_t)h * s.q_len + i) * s.head_dim + t] *= 2;
            for (int t = 0; t < s.v_dim; t++) in.v[((size_t)h * s.q_len + i) * s.v_dim + t] = 1e9f;
        }
    st |= ef_test_run(spec, &in, NULL, &o2);
    int same = 1;
    for (int h = 0; h < s.heads; h++)
        for (int i = 0; i < cut; i++)
            same &= !memcmp(o1.out + ((size_t)h * s.q_len + i) * s.v_dim,
                            o2.out + ((size_t)h * s.q_len + i) * s.v_dim, sizeof(float) * s.v_dim);
    ef_check("causal: future v = 1e9 and future q x2 leave past outputs bit-identical", !st && same,
             "%s", st ? ef_last_error() : "");
    ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
}

static void padding(void) {
    ef_attn_shape s = {2, 2, 160, 160, 16, 8};
    int32_t lens[2] = {160, 97};
    bufs in, o1, o2;
    ef_test_inputs(&in, s, 41, 1.0f);
    ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
    size_t bh0 = 2; /* batch 1, head 0 */
    for (int h = 0; h < 2; h++)
        for (int i = lens[1]; i < s.q_len; i++)
            for (int t = 0; t < s.v_dim; t++) in.g[((bh0 + h) * s.q_len + i) * s.v_dim + t] = 0;
    const char *spec = "lsh:chunk=32,hashes=2";
    ef_status st = ef_test_run(spec, &in, lens, &o1);
    for (int h = 0; h < 2; h++)
        for (int i = lens[1]; i < s.q_len; i++) {
            for (int t = 0; t < s.head_dim; t++)
                in.q[((bh0 + h) * s.q_len + i) * s.head_dim + t] = 3.0f * (t - i % 7);
            for (int t = 0; t < s.v_dim; t++) in.v[((bh0 + h) * s.q_len + i) * s.v_dim + t] = 1e9f;
        }
    st |= ef_test_run(spec, &in, lens, &o2);
    int same = 1;
    for (int b = 0; b < 2; b++)
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < lens[b]; i++) {
                size_t r = ((size_t)b * 2 + h) * s.q_len + i;
                same &=
                    !memcmp(o1.out + r * s.v_dim, o2.out + r * s.v_dim, sizeof(float) * s.v_dim);
                same &= !memcmp(o1.dq + r * s.head_dim, o2.dq + r * s.head_dim,
                                sizeof(float) * s.head_dim);
                same &= !memcmp(o1.dv + r * s.v_dim, o2.dv + r * s.v_dim, sizeof(float) * s.v_dim);
            }
    ef_check("padding: padded q, v content leaves valid out, dq, dv bit-identical", !st && same,
             "%s", st ? ef_last_error() : "");
    ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
}

/* loss = sum g . out; compare g . dq . u with the central difference along u (ref path). */
static void finite_difference(void) {
    ef_attn_shape s = {1, 2, 70, 70, 8, 5};
    bufs in, o, op, om;
    ef_test_inputs(&in, s, 51, 1.0f);
    ef_test_outputs(&o, &in), ef_test_outputs(&op, &in), ef_test_outputs(&om, &in);
    float *u = ef_test_randn(in.nq, 52, 1.0f), *uv = ef_test_randn(in.nv, 53, 1.0f);
    float *q0 = malloc(sizeof(float) * in.nq), *v0 = malloc(sizeof(float) * in.nv);
    memcpy(q0, in.q, sizeof(float) * in.nq), memcpy(v0, in.v, sizeof(float) * in.nv);
    const char *spec = "lsh:chunk=16,hashes=3,causal=1,ref=1";
    int32_t lens[1] = {63};
    ef_status st = ef_test_run(spec, &in, lens, &o);
    double eps = 1e-3, dir = 0;
    for (size_t x = 0; x < in.nq; x++) dir += (double)o.dq[x] * u[x];
    for (size_t x = 0; x < in.nv; x++) dir += (double)o.dv[x] * uv[x];
    double f[2];
    bufs *oo[2] = {&op, &om};
    for (int sgn = 0; sgn < 2; sgn++) {
        double e = sgn ? -eps : eps;
        for (size_t x = 0; x < in.nq; x++) in.q[x] = (float)(q0[x] + e * u[x]);
        for (size_t x = 0; x < in.nv; x++) in.v[x] = (float)(v0[x] + e * uv[x]);
        st |= ef_test_run(spec, &in, lens, oo[sgn]);
        f[sgn] = 0;
        for (size_t x = 0; x < in.no; x++) f[sgn] += (double)in.g[x] * oo[sgn]->out[x];
    }
    size_t pb = (size_t)2 * 3 * 70 * sizeof(int32_t);
    int same_hash = !memcmp(op.saved, o.saved, pb) && !memcmp(om.saved, o.saved, pb);
    double fd = (f[0] - f[1]) / (2 * eps);
    if (ef_check("finite differences: hashing unchanged by the perturbation", !st && same_hash,
                 "%s", st ? ef_last_error() : ""))
        ef_check_err("finite differences: directional derivative (relative)",
                     fabs(fd - dir) / fmax(fabs(dir), 1e-3), 2e-3);
    free(u), free(uv), free(q0), free(v0);
    ef_test_free_outputs(&o), ef_test_free_outputs(&op), ef_test_free_outputs(&om);
    ef_test_free_inputs(&in);
}

static void threads(void) {
    ef_attn_shape s = {2, 3, 300, 300, 32, 32};
    int32_t lens[2] = {300, 211};
    bufs in, o1, o2;
    ef_test_inputs(&in, s, 61, 1.0f);
    ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
    ef_set_num_threads(1);
    ef_status st = ef_test_run("lsh:chunk=32,causal=1", &in, lens, &o1);
    ef_set_num_threads(2);
    st |= ef_test_run("lsh:chunk=32,causal=1", &in, lens, &o2);
    ef_set_num_threads(0);
    int same = !memcmp(o1.out, o2.out, sizeof(float) * in.no) &&
               !memcmp(o1.dq, o2.dq, sizeof(float) * in.nq) &&
               !memcmp(o1.dv, o2.dv, sizeof(float) * in.nv);
    ef_check("threads: 1 vs 2 bit-identical (out, dq, dv)", !st && same, "%s",
             st ? ef_last_error() : "");
    ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
}

static void bad_options(void) {
    ef_attn_shape s = {1, 1, 64, 64, 8, 8}, s2 = {1, 1, 64, 32, 8, 8};
    ef_attn *a = NULL;
    ef_check_status("chunk=0 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:chunk=0", &s), EF_ERR_ARG);
    ef_check_status("hashes=0 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:hashes=0", &s), EF_ERR_ARG);
    ef_check_status("buckets=3 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:buckets=3", &s), EF_ERR_ARG);
    ef_check_status("q_len != kv_len -> EF_ERR_UNSUPPORTED", ef_attn_new(&a, "lsh", &s2),
                    EF_ERR_UNSUPPORTED);
    ef_status st = ef_attn_new(&a, "lsh", &s);
    if (ef_check_status("defaults parse", st, EF_OK))
        ef_check("describe",
                 strcmp(ef_attn_describe(a),
                        "lsh:hashes=4,buckets=auto,chunk=64,before=1,"
                        "after=0,dedup=1,causal=0,scale=auto,seed=0,ref=0") == 0,
                 "%s", ef_attn_describe(a));
    ef_attn_free(a);
}

/* The Reformer duplication task's attention pattern (TASKS.md; Kitaev et al. 2020, 2.1):
 * sequences 0 w 0 w, w 511 symbols from 1..127, N = 1024. A model that solves it gives query
 * i of the second half the same vector as position i - 512: here q_i encodes the symbol and
 * its two predecessors (so the match is unique), scaled so the match dominates the softmax.
 * With v = identity, out[i] is row i of the attention matrix; the query "finds" its match when
 * the largest weight is at i - 512. Identical vectors always share buckets, so the question is
 * whether the sort puts them in the same or adjacent chunks in at least one round: the issue
 * asks 99 % for 4 rounds. */
static double duplication_hits(int hashes, uint64_t seed, float noise_sigma) {
    enum { N = 1024, HALF = 512, D = 64, SYM = 128 };
    int x[N];
    float w[HALF - 1];
    ef_rng_uniform(seed, 1, 0, HALF - 1, w);
    for (int i = 0; i < HALF - 1; i++) x[1 + i] = x[HALF + 1 + i] = 1 + (int)(w[i] * (SYM - 1));
    x[0] = x[HALF] = 0;
    float *emb = ef_test_randn((size_t)3 * SYM * D, seed + 2, 1.0f);
    /* a trained model's two vectors are close, not equal: independent noise per position */
    float *noise = ef_test_randn((size_t)N * D, seed + 3, noise_sigma);
    float *q = ef_test_zeros((size_t)N * D), *k = ef_test_zeros((size_t)N * D);
    float *v = ef_test_zeros((size_t)N * N), *out = ef_test_zeros((size_t)N * N);
    for (int i = 0; i < N; i++) {
        double nrm = 0;
        for (int t = 0; t < D; t++) {
            float a = emb[(size_t)x[i] * D + t];
            if (i >= 1) a += 0.7f * emb[((size_t)SYM + x[i - 1]) * D + t];
            if (i >= 2) a += 0.5f * emb[((size_t)2 * SYM + x[i - 2]) * D + t];
            a += noise[(size_t)i * D + t];
            q[(size_t)i * D + t] = a;
            nrm += (double)a * a;
        }
        for (int t = 0; t < D; t++) q[(size_t)i * D + t] *= (float)(160.0 / sqrt(nrm));
        v[(size_t)i * N + i] = 1;
    }
    ef_attn_shape s = {1, 1, N, N, D, N};
    char spec[64];
    snprintf(spec, sizeof spec, "lsh:hashes=%d,seed=%llu", hashes, (unsigned long long)seed);
    ef_attn *a = NULL;
    ef_attn_io io = {q, k, v, NULL, out};
    double hits = -1;
    if (!ef_attn_new(&a, spec, &s) && !ef_attn_forward(a, &io, NULL)) {
        int n_hit = 0, n = 0;
        for (int i = HALF + 2; i < N; i++, n++) { /* positions with two predecessors in w */
            const float *row = out + (size_t)i * N;
            int best = 0;
            for (int j = 1; j < N; j++)
                if (row[j] > row[best]) best = j;
            n_hit += best == i - HALF;
        }
        hits = (double)n_hit / n;
    }
    ef_attn_free(a);
    free(emb), free(noise), free(q), free(k), free(v), free(out);
    return hits;
}

static void duplication(void) {
    printf("# duplication task pattern (N=1024): fraction of second-half queries whose largest\n"
           "# attention weight is on the matching first-half position, worst of 3 seeds; exact\n"
           "# duplicates, then near-duplicates (noise 0.3 per coordinate: cosine ~0.95)\n");
    double hit[2][3];
    for (int pass = 0; pass < 2; pass++)
        for (int r = 0; r < 3; r++) {
            hit[pass][r] = 1;
            for (uint64_t seed = 1; seed <= 3; seed++)
                hit[pass][r] = fmin(hit[pass][r], duplication_hits(1 << r, seed, pass ? 0.3f : 0.0f));
        }
    /* exact duplicates share every bucket: the bound, 99 % with 4 rounds */
    ef_check("duplication: hashes=4 finds the exact match", hit[0][2] >= 0.99,
             "%.4f (need >= 0.99; hashes=1 %.4f, 2 %.4f)", hit[0][2], hit[0][0], hit[0][1]);
    /* near-duplicates can fall in different buckets: one round finds many (a broken hash or
     * sort finds almost none), and every extra round finds more */
    ef_check("duplication (noisy): hashes=1 finds a third or more", hit[1][0] >= 0.3,
             "%.4f (need >= 0.3)", hit[1][0]);
    ef_check("duplication (noisy): hashes=2 finds more than 1", hit[1][1] > hit[1][0],
             "%.4f vs %.4f", hit[1][1], hit[1][0]);
    ef_check("duplication (noisy): hashes=4 finds more than 2", hit[1][2] > hit[1][1],
             "%.4f vs %.4f", hit[1][2], hit[1][1]);
}

int main(void) {
    versus_reference();
    limit_full();
    buckets_exact();
    rounds_help();
    causality();
    padding();
    finite_difference();
    threads();
    bad_options();
    duplication();
    return ef_test_finish();
}
