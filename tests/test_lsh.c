/*
 * test_lsh.c - `lsh` (Reformer LSH attention, src/attn/lsh.c), through the public API only.
 *
 * Checks:
 *   - fast path == reference path (ref=1: its own double hashing, sort and per-query visible
 *     sets), forward and backward, and identical saved buckets: the three rules (causal=0,
 *     strict causal=1, causal=1 with reformer_causal=1), N a multiple of chunk and not, odd
 *     sizes, buckets with several chunks and partial query blocks, key and query padding,
 *     dedup on/off, before/after windows, more chunks than the window, zero query rows;
 *   - limit cases built here in double: hashes=1 with two chunks and before=1 (sorted rules)
 *     is full (causal) shared-QK attention; strict causal with one chunk per bucket is causal
 *     attention within the bucket (buckets from this file's own hashing);
 *   - buckets in `saved` == a scalar re-implementation of the documented hash, bit for bit;
 *   - strict causality: redrawing q and v of positions >= t leaves rows < t of out, dq and dv
 *     bit-identical (dout of rows >= t zero in both runs), and then dq, dv of rows >= t are
 *     exactly zero; reformer_causal=1 is shown to leak (an earlier row changes);
 *   - padding: q, v, dout rows >= min(kv_lens, q_lens) and all of k NaN change nothing valid;
 *     padded rows output zeros and get zero gradients; a padded sequence equals the truncated
 *     one;
 *   - ef_attn_visible_pairs <= q_len * kv_len and >= the distinct pairs actually attended
 *     (counted with v = identity);
 *   - directional finite differences of <dout, out> (fast and reference), with a step that
 *     flips no bucket (the saved buckets at +-step are compared);
 *   - saved fully written (two fill patterns give the same saved bytes), 1 vs 2 threads
 *     bit-identical, bad options, help text; more rounds help; the duplication task;
 *   - replay (ef_attn_forward_replay), three rules with padding, fast and reference: == forward
 *     bitwise on the same inputs (out, saved, backward after it); on q perturbed by 1e-3 where a
 *     fresh forward moves a bucket, the recorded buckets are kept and fast == reference replay;
 *     NULL, garbage and mismatched-length records refused; flash replays as its forward.
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

/* Forward (saved pre-filled with `fill`) and backward of spec on in, with key and query
 * lengths (NULL = all). */
static ef_status run_fill(const char *spec, const bufs *in, const int32_t *kv_lens,
                          const int32_t *q_lens, bufs *o, int fill) {
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    if (!st) {
        ef_free(o->saved);
        o->saved = ef_test_saved(a);
        memset(o->saved, fill, ef_attn_saved_bytes(a));
        ef_attn_io io = {in->q, in->k, in->v, kv_lens, o->out, q_lens};
        st = ef_attn_forward(a, &io, o->saved);
        if (!st) st = ef_attn_backward(a, &io, o->saved, in->g, o->dq, o->dk, o->dv);
    }
    ef_attn_free(a);
    return st;
}
static ef_status run(const char *spec, const bufs *in, const int32_t *kv_lens,
                     const int32_t *q_lens, bufs *o) {
    return run_fill(spec, in, kv_lens, q_lens, o, 0xA5);
}

static int len_of(const int32_t *kv, const int32_t *ql, int b, int n) {
    int l = kv ? kv[b] : n, m = ql ? ql[b] : n;
    return l < m ? l : m;
}

/* Rows 3 and 10 of every (b, h) of q set to zero: k = 0, all projections tie (the first
 * bucket) and no gradient flows through the key. */
static void zero_rows(bufs *in) {
    for (int bh = 0; bh < in->s.batch * in->s.heads; bh++)
        for (int i = 3; i < in->s.q_len && i <= 10; i += 7)
            memset(in->q + ((size_t)bh * in->s.q_len + i) * in->s.head_dim, 0,
                   sizeof(float) * in->s.head_dim);
}

static int all_zero(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f) return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * Fast path vs reference path
 * ------------------------------------------------------------------------------------------- */
static void fast_vs_ref(const char *label, ef_attn_shape s, const char *opts, const int32_t *kv,
                        const int32_t *ql, int zero) {
    char name[256], sf[256], sr[256];
    snprintf(sf, sizeof sf, "lsh:%s", opts);
    snprintf(sr, sizeof sr, "lsh:%s,ref=1", opts);
    bufs in, rf, fa;
    ef_test_inputs(&in, s, 77 + (uint64_t)s.q_len, 1.0f);
    if (zero) zero_rows(&in);
    ef_test_outputs(&rf, &in), ef_test_outputs(&fa, &in);
    ef_status st1 = run(sr, &in, kv, ql, &rf), st2 = run(sf, &in, kv, ql, &fa);
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
        ef_check(name, all_zero(fa.dk, in.nk) && all_zero(rf.dk, in.nk), "%s", "");
        /* both save the buckets first, [B][H][R][N] int32 (docs/lsh.md) */
        int R = 4;
        const char *hs = strstr(opts, "hashes=");
        if (hs) R = atoi(hs + 7);
        size_t nb = (size_t)s.batch * s.heads * R * s.q_len;
        snprintf(name, sizeof name, "%s: saved buckets identical", label);
        ef_check(name, !memcmp(fa.saved, rf.saved, nb * sizeof(int32_t)), "%s", "");
    }
    ef_test_free_outputs(&rf), ef_test_free_outputs(&fa), ef_test_free_inputs(&in);
}

static void versus_reference(void) {
    static const char *modes[3] = {"", "causal=1,", "causal=1,reformer_causal=1,"};
    static const char *mname[3] = {"bidir", "strict", "reformer"};
    int32_t lens[2] = {256, 171}, qlens[2] = {200, 256};
    ef_attn_shape s1 = {2, 2, 256, 256, 24, 20};
    ef_attn_shape s2 = {1, 3, 203, 203, 16, 12};
    int32_t l2[1] = {190}, q2[1] = {181};
    ef_attn_shape s3 = {1, 1, 5, 5, 8, 3};
    /* sorted modes run chunks as tiles of <= 64 query lanes: chunk=130 gives tiles 64+64+2, the
     * last chunk of 519 valid positions holds 129 (64+64+1) */
    ef_attn_shape s4 = {1, 2, 530, 530, 40, 36};
    int32_t l4[1] = {519};
    int32_t l3[1] = {0};
    for (int m = 0; m < 3; m++) {
        char o[256], lab[256];
#define CASE(label, shape, opts, kv, ql, zero)                                                     \
    do {                                                                                           \
        snprintf(o, sizeof o, "%s%s", modes[m], opts);                                             \
        snprintf(lab, sizeof lab, "%s %s", mname[m], label);                                       \
        fast_vs_ref(lab, shape, o, kv, ql, zero);                                                  \
    } while (0)
        CASE("N=256 chunk=32", s1, "chunk=32", NULL, NULL, 0);
        CASE("N=256 kv+q padded", s1, "chunk=32", lens, qlens, 0);
        CASE("N=256 dedup=0 padded", s1, "chunk=32,dedup=0", lens, NULL, 0);
        CASE("N=256 before=2 after=1 hashes=3", s1, "chunk=32,before=2,after=1,hashes=3", lens,
             NULL, 0);
        CASE("N=203 chunk=32", s2, "chunk=32,seed=5", NULL, NULL, 0);
        CASE("N=203 padded", s2, "chunk=32,seed=5", l2, q2, 0);
        CASE("N=203 chunk=40 buckets=4 scale=0.7", s2, "chunk=40,buckets=4,scale=0.7", l2, NULL, 0);
        CASE("N=203 chunk=8 buckets=2 before=0", s2, "chunk=8,buckets=2,before=0,hashes=2", NULL,
             q2, 0);
        CASE("N=203 chunk=72 buckets=2 (blocks 32+32+8)", s2, "chunk=72,buckets=2,hashes=3", l2,
             NULL, 0);
        CASE("N=203 window > chunks", s2, "chunk=64,before=3,after=2", l2, NULL, 0);
        CASE("N=256 chunk=72 hashes=5 (tiles 64+8)", s1, "chunk=72,hashes=5", lens, qlens, 0);
        CASE("N=530 chunk=130 before=2 (tiles 64+64+2)", s4, "chunk=130,before=2,hashes=3", l4,
             NULL, 0);
        CASE("N=5 chunk=64 (one chunk)", s3, "hashes=2", NULL, NULL, 0);
        CASE("N=5 all padded", s3, "hashes=2", l3, NULL, 0);
        CASE("N=203 zero query rows", s2, "chunk=32,seed=5", l2, NULL, 1);
#undef CASE
    }
}

/* ---------------------------------------------------------------------------------------------
 * Hashing re-implemented from docs/lsh.md (this file's own code)
 * ------------------------------------------------------------------------------------------- */
/* Buckets [B][H][R][N] of q (-1 past the length) for bucket factors bf[0..nf) (one factor:
 * bf[0] = nb): rotation D x cols from ef_rng_normal(seed, 0x4c534800 << 32 | (h * R + r), 0,
 * D * cols), cols = sum bf[f]/2, x = q/|q| rounded to fp32, y = x R in double; factor f owns
 * the next bf[f]/2 columns, a_f = first argmax over its [y, -y], bucket = a_0 + bf[0] a_1.
 * gap (optional, [B][H][N]): the smallest margin, over the rounds and factors, between a best
 * and second-best value. */
static int32_t *my_buckets_fgap(ef_attn_shape s, const float *q, int R, const int *bf, int nf,
                                uint64_t seed, const int32_t *kv, const int32_t *ql, double *gap) {
    int cols = 0, n = s.q_len, d = s.head_dim;
    for (int f = 0; f < nf; f++) cols += bf[f] / 2;
    int32_t *bk = malloc(sizeof(int32_t) * s.batch * s.heads * R * n);
    float *rot = malloc(sizeof(float) * d * cols), *x = malloc(sizeof(float) * d);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int r = 0; r < R; r++) {
                ef_rng_normal(seed, (0x4c534800ull << 32) | (uint64_t)(h * R + r), 0,
                              (size_t)d * cols, rot);
                const float *qq = q + ((size_t)b * s.heads + h) * n * d;
                int32_t *out = bk + (((size_t)b * s.heads + h) * R + r) * n;
                int L = len_of(kv, ql, b, n);
                for (int i = 0; i < n; i++) {
                    if (i >= L) {
                        out[i] = -1;
                        continue;
                    }
                    double ss = 0;
                    for (int t = 0; t < d; t++) ss += (double)qq[i * d + t] * qq[i * d + t];
                    for (int t = 0; t < d; t++)
                        x[t] = ss > 0 ? (float)(qq[i * d + t] / sqrt(ss)) : 0.0f;
                    int bucket = 0, unit = 1, c0 = 0;
                    double *gp = gap ? gap + ((size_t)b * s.heads + h) * n + i : NULL;
                    for (int f = 0; f < nf; f++) {
                        int half = bf[f] / 2, best = 0;
                        double bv = -INFINITY, b2 = -INFINITY;
                        for (int c = 0; c < bf[f]; c++) {
                            double y = 0;
                            for (int t = 0; t < d; t++)
                                y += (double)x[t] * rot[t * cols + c0 + c % half];
                            if (c >= half) y = -y;
                            if (y > bv)
                                b2 = bv, bv = y, best = c;
                            else if (y > b2)
                                b2 = y;
                        }
                        bucket += unit * best, unit *= bf[f], c0 += half;
                        if (gp) *gp = r == 0 && f == 0 ? bv - b2 : fmin(*gp, bv - b2);
                    }
                    out[i] = bucket;
                }
            }
    free(rot), free(x);
    return bk;
}
static int32_t *my_buckets_gap(ef_attn_shape s, const float *q, int R, int nb, uint64_t seed,
                               const int32_t *kv, const int32_t *ql, double *gap) {
    return my_buckets_fgap(s, q, R, &nb, 1, seed, kv, ql, gap);
}
static int32_t *my_buckets(ef_attn_shape s, const float *q, int R, int nb, uint64_t seed,
                           const int32_t *kv, const int32_t *ql) {
    return my_buckets_gap(s, q, R, nb, seed, kv, ql, NULL);
}

/* Rows of q (batch 0, head h, round 0's rotation of `cols` columns) on the boundary between
 * columns c1 and c2 of [lo, lo + width): x = z - (z.u / u.u) u with z = R_c1 + R_c2,
 * u = R_c1 - R_c2, so x.R_c1 = x.R_c2 up to rounding (near-ties that the fast path must
 * recompute exactly); rows 20, 27, 34, ... */
static void near_tie_cols(bufs *in, int R, int cols, int lo, int width, uint64_t seed) {
    int d = in->s.head_dim, n = in->s.q_len;
    float *rot = malloc(sizeof(float) * d * cols);
    for (int h = 0; h < in->s.heads; h++) {
        ef_rng_normal(seed, (0x4c534800ull << 32) | (uint64_t)(h * R), 0, (size_t)d * cols, rot);
        for (int i = 20, k = 0; i < n; i += 7, k++) {
            int c1 = k % width, c2 = (k * 7 + 3) % width;
            if (c2 == c1) c2 = (c1 + 1) % width;
            c1 += lo, c2 += lo;
            double zu = 0, uu = 0;
            for (int t = 0; t < d; t++) {
                double z = rot[t * cols + c1] + rot[t * cols + c2];
                double u = rot[t * cols + c1] - rot[t * cols + c2];
                zu += z * u, uu += u * u;
            }
            float *qi = in->q + ((size_t)h * n + i) * d;
            for (int t = 0; t < d; t++) {
                double u = rot[t * cols + c1] - rot[t * cols + c2];
                qi[t] = (float)(rot[t * cols + c1] + rot[t * cols + c2] - zu / uu * u);
            }
        }
    }
    free(rot);
}
static void near_tie_rows(bufs *in, int R, int nb, uint64_t seed) {
    near_tie_cols(in, R, nb / 2, 0, nb / 2, seed);
}

/* Runs spec on in and checks that the buckets it saves equal want (cnt of them); label names
 * the check after the spec. */
static void check_saved_buckets(const char *spec, bufs *in, const int32_t *lens, const int32_t *ql,
                                const int32_t *want, size_t cnt, int near, const char *label) {
    bufs o;
    char name[256];
    ef_test_outputs(&o, in);
    ef_status st = run(spec, in, lens, ql, &o);
    long bad = 0;
    if (!st)
        for (size_t x = 0; x < cnt; x++) bad += ((const int32_t *)o.saved)[x] != want[x];
    snprintf(name, sizeof name, "%s: %s", label, spec + 4);
    ef_check(name, !st && bad == 0, "%ld mismatches (%d near-tie rows) %s", bad, near,
             st ? ef_last_error() : "");
    ef_test_free_outputs(&o);
}

/* nb covers the fast path's top-two search: scalar only (nb/2 < 16), vectors plus a tail, and
 * whole vectors; near-tie rows make it fall back to the double computation. */
static void buckets_exact(void) {
    ef_attn_shape s = {2, 3, 150, 150, 20, 4};
    int R = 3;
    uint64_t seed = 1234567;
    const int nbs[] = {2, 8, 34, 64};
    for (size_t k = 0; k < sizeof nbs / sizeof nbs[0]; k++) {
        int nb = nbs[k];
        bufs in;
        ef_test_inputs(&in, s, 9, 1.5f);
        zero_rows(&in);
        if (nb > 2) near_tie_rows(&in, R, nb, seed);
        int32_t lens[2] = {150, 101}, ql[2] = {140, 150};
        double *gap = malloc(sizeof(double) * s.batch * s.heads * s.q_len);
        int32_t *want = my_buckets_gap(s, in.q, R, nb, seed, lens, ql, gap);
        int near = 0; /* rows whose round-0 margin is within fp32 rounding of a tie */
        for (int i = 20; i < 100 && nb > 2; i += 7) near += gap[i] < 1e-5 && gap[i] > 0;
        size_t cnt = (size_t)s.batch * s.heads * R * s.q_len;
        for (int pass = 0; pass < 3; pass++) {
            char spec[128];
            snprintf(spec, sizeof spec, "lsh:hashes=%d,buckets=%d,chunk=16,seed=%llu%s", R, nb,
                     (unsigned long long)seed,
                     pass == 0   ? ""
                     : pass == 1 ? ",causal=1"
                                 : ",causal=1,ref=1");
            check_saved_buckets(spec, &in, lens, ql, want, cnt, near,
                                "buckets: saved == scalar re-implementation");
        }
        if (nb > 2) {
            char name[128];
            snprintf(name, sizeof name, "buckets: nb=%d inputs hold near-tie rows", nb);
            ef_check(name, near >= 5, "%d rows with margin < 1e-5", near);
        }
        free(want), free(gap);
        ef_test_free_inputs(&in);
    }
}

/* buckets=auto past HF's limit: nb = 2^floor(log2(2N/C)) split into 2^floor(lg/2) and
 * 2^ceil(lg/2) buckets when nb > 2 max(floor(sqrt(floor(N/C))), C) (HF's _set_num_buckets with
 * max_position_embeddings = N). N = 150: C = 4 gives nb = 64 > 12, factors 8 x 8; C = 8 gives
 * 32 > 16, factors 4 x 8; C = 16 gives 16 <= 32, one factor. Saved buckets against this file's
 * own factored hash, with near-ties inside the second factor's columns. */
static void buckets_factored(void) {
    ef_attn_shape s = {2, 3, 150, 150, 20, 4};
    int R = 2;
    uint64_t seed = 77;
    struct {
        int chunk, nf, bf[2];
    } cs[] = {{4, 2, {8, 8}}, {8, 2, {4, 8}}, {16, 1, {16, 0}}};
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++) {
        bufs in;
        ef_test_inputs(&in, s, 21, 1.5f);
        int cols = cs[k].bf[0] / 2 + (cs[k].nf > 1 ? cs[k].bf[1] / 2 : 0);
        int lo = cs[k].nf > 1 ? cs[k].bf[0] / 2 : 0, width = cols - lo;
        near_tie_cols(&in, R, cols, lo, width, seed);
        int32_t lens[2] = {150, 131}, ql[2] = {150, 140};
        double *gap = malloc(sizeof(double) * s.batch * s.heads * s.q_len);
        int32_t *want = my_buckets_fgap(s, in.q, R, cs[k].bf, cs[k].nf, seed, lens, ql, gap);
        int near = 0, nb = cs[k].nf > 1 ? cs[k].bf[0] * cs[k].bf[1] : cs[k].bf[0];
        for (int i = 20; i < 100; i += 7) near += gap[i] < 1e-5 && gap[i] > 0;
        size_t cnt = (size_t)s.batch * s.heads * R * s.q_len;
        int top = -1; /* the largest bucket any row got: factored buckets reach past bf[0] */
        for (size_t x = 0; x < cnt; x++) top = want[x] > top ? want[x] : top;
        for (int pass = 0; pass < 3; pass++) {
            char spec[128], label[128];
            snprintf(spec, sizeof spec, "lsh:hashes=%d,chunk=%d,seed=%llu%s", R, cs[k].chunk,
                     (unsigned long long)seed,
                     pass == 0   ? ""
                     : pass == 1 ? ",causal=1"
                                 : ",ref=1");
            snprintf(label, sizeof label, "buckets=auto factors %d x %d: saved == own hash",
                     cs[k].bf[0], cs[k].nf > 1 ? cs[k].bf[1] : 1);
            check_saved_buckets(spec, &in, lens, ql, want, cnt, near, label);
        }
        char name[128];
        snprintf(name, sizeof name, "buckets=auto chunk=%d: buckets span [0, %d), near-ties held",
                 cs[k].chunk, nb);
        ef_check(name, top < nb && top >= nb / 2 && near >= 5, "largest %d, %d near-tie rows", top,
                 near);
        free(want), free(gap);
        ef_test_free_inputs(&in);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Limit cases
 * ------------------------------------------------------------------------------------------- */
/* Shared-QK attention in double over rows/keys < L (rows >= L: zeros): logits scale q_i.k_j
 * (k = q/|q|), keys allowed by `rule` (0 all, 1 j <= i, 2 j <= i in i's bucket, bk [B][H][N]),
 * self excluded unless it is the only allowed key. */
static void shared_qk(ef_attn_shape s, const float *q, const float *v, const int32_t *kv,
                      const int32_t *ql, int rule, const int32_t *bk, double scale, float *out) {
    int n = s.q_len, d = s.head_dim, e = s.v_dim;
    double *kk = malloc(sizeof(double) * n * d), *w = malloc(sizeof(double) * n);
    memset(out, 0, sizeof(float) * s.batch * s.heads * n * e);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++) {
            size_t bh = (size_t)b * s.heads + h;
            const float *qq = q + bh * n * d, *vv = v + bh * n * e;
            const int32_t *bb = bk ? bk + bh * n : NULL;
            int L = len_of(kv, ql, b, n);
            for (int j = 0; j < L; j++) {
                double ss = 0;
                for (int t = 0; t < d; t++) ss += (double)qq[j * d + t] * qq[j * d + t];
                for (int t = 0; t < d; t++) kk[j * d + t] = ss > 0 ? qq[j * d + t] / sqrt(ss) : 0;
            }
            for (int i = 0; i < L; i++) {
                int any = 0;
                for (int j = 0; j < L; j++) {
                    int ok = j != i && (rule == 0 || j <= i) && (rule != 2 || bb[j] == bb[i]);
                    any |= ok;
                    w[j] = ok;
                }
                if (!any) w[i] = 1;
                double mx = -INFINITY;
                for (int j = 0; j < L; j++) {
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
                for (int j = 0; j < L; j++) sum += w[j] = w[j] == -INFINITY ? 0 : exp(w[j] - mx);
                for (int t = 0; t < e; t++) {
                    double o = 0;
                    for (int j = 0; j < L; j++) o += w[j] * vv[j * e + t];
                    out[(bh * n + i) * e + t] = (float)(o / sum);
                }
            }
        }
    free(kk), free(w);
}

static void limit_cases(void) {
    struct {
        ef_attn_shape s;
        const char *opts;
        int rule, pad;
    } cs[] = {
        {{2, 2, 128, 128, 16, 8}, "hashes=1,chunk=64", 0, 0},
        {{2, 2, 128, 128, 16, 8}, "hashes=1,chunk=64,causal=1,reformer_causal=1", 1, 1},
        {{1, 2, 100, 100, 12, 8}, "hashes=1,chunk=50,buckets=8,seed=3", 0, 1},
        {{1, 2, 100, 100, 12, 8}, "hashes=1,chunk=60,seed=3,ref=1", 0, 1}, /* chunks 60 + 40 */
        /* strict: one chunk holds the whole bucket, so each query sees its bucket's past */
        {{2, 2, 128, 128, 16, 8}, "hashes=1,chunk=128,buckets=4,causal=1,seed=8", 2, 1},
        {{1, 2, 100, 100, 12, 8}, "hashes=1,chunk=100,buckets=2,causal=1,ref=1", 2, 1},
    };
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        bufs in, o;
        ef_test_inputs(&in, cs[c].s, 300 + c, 1.0f);
        ef_test_outputs(&o, &in);
        int32_t lens[2] = {cs[c].s.q_len - 17, cs[c].s.q_len}, ql[2] = {cs[c].s.q_len, 101};
        const int32_t *kl = cs[c].pad ? lens : NULL, *qq = cs[c].pad ? ql : NULL;
        char spec[128], name[256];
        snprintf(spec, sizeof spec, "lsh:%s", cs[c].opts);
        ef_status st = run(spec, &in, kl, qq, &o);
        int32_t *bk = NULL;
        if (cs[c].rule == 2) {
            const char *sd = strstr(cs[c].opts, "seed="), *nb = strstr(cs[c].opts, "buckets=");
            bk = my_buckets(cs[c].s, in.q, 1, atoi(nb + 8), sd ? strtoull(sd + 5, NULL, 10) : 0, kl,
                            qq);
        }
        float *want = malloc(sizeof(float) * in.no);
        shared_qk(cs[c].s, in.q, in.v, kl, qq, cs[c].rule, bk, 1.0 / sqrt(cs[c].s.head_dim), want);
        snprintf(name, sizeof name, "limit case: %s == %s", spec,
                 cs[c].rule == 2   ? "causal attention within buckets"
                 : cs[c].rule == 1 ? "causal shared-QK attention"
                                   : "full shared-QK attention");
        if (ef_check(name, !st, "%s", ef_last_error()))
            ef_check_err(name, ef_max_rel_diff(o.out, want, in.no), 1e-4);
        free(want), free(bk);
        ef_test_free_outputs(&o), ef_test_free_inputs(&in);
    }
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
    shared_qk(s, in.q, in.v, NULL, NULL, 0, NULL, 0.25, want);
    double err[3];
    int hs[3] = {1, 2, 8};
    for (int t = 0; t < 3; t++) {
        bufs o;
        ef_test_outputs(&o, &in);
        char spec[128];
        snprintf(spec, sizeof spec, "lsh:hashes=%d,chunk=32,seed=4", hs[t]);
        run(spec, &in, NULL, NULL, &o);
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

/* ---------------------------------------------------------------------------------------------
 * Causality
 * ------------------------------------------------------------------------------------------- */
/* Rows [t, n) of every (b, h) of x (row width w) set from a fresh Gaussian draw. */
static void redraw(float *x, ef_attn_shape s, int w, int t, uint64_t seed) {
    float *f = ef_test_randn((size_t)s.q_len * w, seed, 1.0f);
    for (int bh = 0; bh < s.batch * s.heads; bh++)
        memcpy(x + ((size_t)bh * s.q_len + t) * w, f + (size_t)t * w,
               sizeof(float) * (s.q_len - t) * w);
    free(f);
}

/* 1 when rows [0, t) of every (b, h) of x and y (row width w) are bit-identical. */
static int same_rows(const float *x, const float *y, ef_attn_shape s, int w, int t) {
    for (int bh = 0; bh < s.batch * s.heads; bh++)
        if (memcmp(x + (size_t)bh * s.q_len * w, y + (size_t)bh * s.q_len * w,
                   sizeof(float) * t * w))
            return 0;
    return 1;
}

/* 1 when rows [t, n) of every (b, h) of x are exactly zero. */
static int zero_tail(const float *x, ef_attn_shape s, int w, int t) {
    for (int bh = 0; bh < s.batch * s.heads; bh++)
        if (!all_zero(x + ((size_t)bh * s.q_len + t) * w, (size_t)(s.q_len - t) * w)) return 0;
    return 1;
}

static void causality(void) {
    ef_attn_shape s = {2, 2, 200, 200, 16, 8};
    int32_t lens[2] = {200, 171};
    const char *specs[] = {
        "lsh:chunk=16,buckets=4,hashes=3,causal=1",         /* several chunks per bucket */
        "lsh:chunk=8,buckets=2,hashes=2,before=2,causal=1", /* many chunks, before=2 */
        "lsh:causal=1",                                     /* defaults: one chunk per bucket */
        "lsh:chunk=16,buckets=4,hashes=3,causal=1,ref=1",
    };
    int cuts[] = {1, 57, 120, 199};
    for (size_t c = 0; c < sizeof specs / sizeof specs[0]; c++) {
        int ok_rows = 1, ok_zero = 1, leaked_at = -1;
        ef_status st = EF_OK;
        for (size_t k = 0; k < sizeof cuts / sizeof cuts[0]; k++) {
            int t = cuts[k];
            bufs in, o1, o2;
            ef_test_inputs(&in, s, 31 + k, 1.0f);
            for (int bh = 0; bh < s.batch * s.heads; bh++)
                memset(in.g + ((size_t)bh * s.q_len + t) * s.v_dim, 0,
                       sizeof(float) * (s.q_len - t) * s.v_dim);
            ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
            st |= run(specs[c], &in, lens, NULL, &o1);
            redraw(in.q, s, s.head_dim, t, 700 + k);
            redraw(in.v, s, s.v_dim, t, 800 + k);
            st |= run(specs[c], &in, lens, NULL, &o2);
            int same = same_rows(o1.out, o2.out, s, s.v_dim, t) &&
                       same_rows(o1.dq, o2.dq, s, s.head_dim, t) &&
                       same_rows(o1.dv, o2.dv, s, s.v_dim, t);
            if (!same && leaked_at < 0) leaked_at = t;
            ok_rows &= same;
            ok_zero &= zero_tail(o1.dq, s, s.head_dim, t) && zero_tail(o1.dv, s, s.v_dim, t) &&
                       zero_tail(o2.dq, s, s.head_dim, t) && zero_tail(o2.dv, s, s.v_dim, t);
            ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
        }
        char name[256];
        snprintf(name, sizeof name, "strict causal: redrawn q, v >= t leave rows < t (%s)",
                 specs[c] + 4);
        ef_check(name, !st && ok_rows,
                 "out, dq, dv bit-identical at t = 1, 57, 120, 199 (first t that "
                 "changed: %d, -1 = none)",
                 leaked_at);
        snprintf(name, sizeof name, "strict causal: dout = 0 past t gives dq, dv = 0 past t (%s)",
                 specs[c] + 4);
        ef_check(name, !st && ok_zero, "%s", st ? ef_last_error() : "");
    }
}

/* reformer_causal=1 is documented as not strictly causal: show it (and that strict is not). */
static void reformer_leaks(void) {
    ef_attn_shape s = {1, 2, 200, 200, 16, 8};
    int t = 120;
    const char *specs[2] = {"lsh:chunk=16,hashes=2,causal=1,reformer_causal=1",
                            "lsh:chunk=16,hashes=2,causal=1"};
    for (int c = 0; c < 2; c++) {
        bufs in, o1, o2;
        ef_test_inputs(&in, s, 91, 1.0f);
        ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
        ef_status st = run(specs[c], &in, NULL, NULL, &o1);
        redraw(in.q, s, s.head_dim, t, 92);
        st |= run(specs[c], &in, NULL, NULL, &o2);
        int changed = 0;
        for (int h = 0; h < s.heads; h++)
            for (int i = 0; i < t; i++)
                changed += memcmp(o1.out + ((size_t)h * s.q_len + i) * s.v_dim,
                                  o2.out + ((size_t)h * s.q_len + i) * s.v_dim,
                                  sizeof(float) * s.v_dim) != 0;
        if (c == 0)
            ef_check("reformer_causal=1 leaks: redrawn future q change earlier rows",
                     !st && changed, "%d of %d rows < %d changed", changed, s.heads * t, t);
        else
            ef_check("strict causal, same data: no earlier row changes", !st && !changed,
                     "%d rows changed", changed);
        ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
    }
    const char *help = ef_attn_help("lsh");
    ef_check("help says reformer_causal is NOT strictly causal",
             help && strstr(help, "reformer_causal") && strstr(help, "NOT strictly causal"), "%s",
             "");
}

/* ---------------------------------------------------------------------------------------------
 * Padding
 * ------------------------------------------------------------------------------------------- */
static void nan_fill(float *x, ef_attn_shape s, int w, const int32_t *kv, const int32_t *ql) {
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++) {
            int L = len_of(kv, ql, b, s.q_len);
            float *row = x + (((size_t)b * s.heads + h) * s.q_len + L) * w;
            for (size_t i = 0; i < (size_t)(s.q_len - L) * w; i++) row[i] = NAN;
        }
}

static void padding(void) {
    ef_attn_shape s = {3, 2, 160, 160, 16, 8};
    int32_t kv[3] = {160, 97, 130}, ql[3] = {150, 160, 61};
    const char *specs[] = {"lsh:chunk=32,hashes=2", "lsh:chunk=16,buckets=4,hashes=3,causal=1",
                           "lsh:chunk=32,hashes=2,causal=1,reformer_causal=1",
                           "lsh:chunk=16,buckets=4,hashes=3,causal=1,ref=1",
                           "lsh:chunk=32,hashes=2,ref=1"};
    for (size_t c = 0; c < sizeof specs / sizeof specs[0]; c++) {
        bufs in, o1, o2;
        ef_test_inputs(&in, s, 41, 1.0f);
        ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
        ef_status st = run(specs[c], &in, kv, ql, &o1);
        nan_fill(in.q, s, s.head_dim, kv, ql);
        nan_fill(in.v, s, s.v_dim, kv, ql);
        nan_fill(in.g, s, s.v_dim, kv, ql);
        for (size_t x = 0; x < in.nk; x++) in.k[x] = NAN;
        st |= run(specs[c], &in, kv, ql, &o2);
        int same = !memcmp(o1.out, o2.out, sizeof(float) * in.no) &&
                   !memcmp(o1.dq, o2.dq, sizeof(float) * in.nq) &&
                   !memcmp(o1.dv, o2.dv, sizeof(float) * in.nv);
        int zeros = all_zero(o2.dk, in.nk);
        for (int b = 0; b < s.batch; b++)
            for (int h = 0; h < s.heads; h++) {
                size_t bh = (size_t)b * s.heads + h;
                int L = len_of(kv, ql, b, s.q_len);
                zeros &=
                    all_zero(o2.out + (bh * s.q_len + L) * s.v_dim,
                             (size_t)(s.q_len - L) * s.v_dim) &&
                    all_zero(o2.dq + (bh * s.q_len + L) * s.head_dim,
                             (size_t)(s.q_len - L) * s.head_dim) &&
                    all_zero(o2.dv + (bh * s.q_len + L) * s.v_dim, (size_t)(s.q_len - L) * s.v_dim);
            }
        char name[256];
        snprintf(name, sizeof name, "padding: NaN past min(kv, q) changes nothing (%s)",
                 specs[c] + 4);
        ef_check(name, !st && same && !ef_test_any_nonfinite(o2.out, in.no), "%s",
                 st ? ef_last_error() : "");
        snprintf(name, sizeof name, "padding: padded rows zero out/dq/dv, dk zero (%s)",
                 specs[c] + 4);
        ef_check(name, !st && zeros, "%s", "");
        ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
    }
}

/* A sequence padded to N gives the rows of the same sequence cut to its length L. */
static void truncation(void) {
    ef_attn_shape s = {1, 2, 150, 150, 16, 8}, t = {1, 2, 111, 111, 16, 8};
    int32_t kv[1] = {111};
    /* buckets fixed: auto buckets depend on N */
    const char *specs[] = {"lsh:chunk=16,buckets=4,hashes=3",
                           "lsh:chunk=16,buckets=4,hashes=3,causal=1",
                           "lsh:chunk=16,buckets=8,hashes=3,causal=1,reformer_causal=1"};
    for (size_t c = 0; c < 3; c++) {
        bufs in, cut, o1, o2;
        ef_test_inputs(&in, s, 61, 1.0f);
        ef_test_inputs(&cut, t, 62, 1.0f);
        for (int h = 0; h < 2; h++) {
            memcpy(cut.q + (size_t)h * 111 * 16, in.q + (size_t)h * 150 * 16, 111 * 16 * 4);
            memcpy(cut.v + (size_t)h * 111 * 8, in.v + (size_t)h * 150 * 8, 111 * 8 * 4);
            memcpy(cut.g + (size_t)h * 111 * 8, in.g + (size_t)h * 150 * 8, 111 * 8 * 4);
        }
        ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &cut);
        ef_status st = run(specs[c], &in, kv, NULL, &o1) | run(specs[c], &cut, NULL, NULL, &o2);
        double e = 0;
        for (int h = 0; h < 2; h++) {
            e = fmax(e, ef_max_rel_diff(o1.out + (size_t)h * 150 * 8, o2.out + (size_t)h * 111 * 8,
                                        111 * 8));
            e = fmax(e, ef_max_rel_diff(o1.dq + (size_t)h * 150 * 16, o2.dq + (size_t)h * 111 * 16,
                                        111 * 16));
        }
        char name[256];
        snprintf(name, sizeof name, "padding: padded to 150 == cut to 111 (%s)", specs[c] + 4);
        if (ef_check(name, !st, "%s", ef_last_error())) ef_check_err(name, e, 1e-6);
        ef_test_free_outputs(&o1), ef_test_free_outputs(&o2);
        ef_test_free_inputs(&in), ef_test_free_inputs(&cut);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Visible pairs
 * ------------------------------------------------------------------------------------------- */
/* v = identity: out[i][j] > 0 exactly for the keys j that row i attends in some round. */
static void visible_pairs(void) {
    enum { N = 128 };
    ef_attn_shape s = {1, 1, N, N, 8, N};
    const char *specs[] = {"lsh:chunk=16,hashes=4",
                           "lsh:chunk=16,hashes=8,buckets=4,causal=1",
                           "lsh:chunk=16,hashes=4,causal=1,reformer_causal=1",
                           "lsh:chunk=32,hashes=64,before=2,after=1",
                           "lsh:chunk=4,hashes=64,buckets=2,causal=1",
                           "lsh:chunk=64,hashes=64,before=64,after=64"};
    float *q = ef_test_randn((size_t)N * 8, 5, 0.3f), *k = ef_test_zeros((size_t)N * 8);
    float *v = ef_test_zeros((size_t)N * N), *out = ef_test_zeros((size_t)N * N);
    for (int i = 0; i < N; i++) v[(size_t)i * N + i] = 1;
    for (size_t c = 0; c < sizeof specs / sizeof specs[0]; c++) {
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, specs[c], &s);
        int64_t vp = st ? -1 : ef_attn_visible_pairs(a, 0), seen = 0;
        ef_attn_io io = {q, k, v, NULL, out, NULL};
        if (!st) st = ef_attn_forward(a, &io, NULL);
        for (size_t x = 0; x < (size_t)N * N; x++) seen += out[x] > 0;
        char name[256];
        snprintf(name, sizeof name, "visible_pairs: attended <= reported <= N*N (%s)",
                 specs[c] + 4);
        ef_check(name, !st && seen <= vp && vp <= (int64_t)N * N, "%lld <= %lld <= %d",
                 (long long)seen, (long long)vp, N * N);
        ef_attn_free(a);
    }
    free(q), free(k), free(v), free(out);
}

/* ---------------------------------------------------------------------------------------------
 * Finite differences
 * ------------------------------------------------------------------------------------------- */
/* loss = sum g . out; compare dq . u + dv . uv with the central difference along (u, uv).
 * The hashing is held fixed by the derivative, so the step must flip no bucket: u is zero on
 * the rows whose hash margin (best minus second-best projection, from this file's own hashing)
 * is below 50 eps (a step moves a projection by about eps |u_i| / |q_i| max|R| < 10 eps), and
 * the buckets saved at +-eps are compared with those at 0. */
static void finite_difference(const char *spec, int nb, double eps, double tol) {
    ef_attn_shape s = {1, 2, 70, 70, 8, 5};
    bufs in, o, op, om;
    ef_test_inputs(&in, s, 51, 1.0f);
    ef_test_outputs(&o, &in), ef_test_outputs(&op, &in), ef_test_outputs(&om, &in);
    float *u = ef_test_randn(in.nq, 52, 1.0f), *uv = ef_test_randn(in.nv, 53, 1.0f);
    double *gap = malloc(sizeof(double) * s.heads * s.q_len);
    free(my_buckets_gap(s, in.q, 3, nb, 0, NULL, NULL, gap));
    int frozen = 0;
    for (int r = 0; r < s.heads * s.q_len; r++)
        if (gap[r] < 50 * eps)
            memset(u + (size_t)r * s.head_dim, 0, sizeof(float) * s.head_dim), frozen++;
    free(gap);
    float *q0 = malloc(sizeof(float) * in.nq), *v0 = malloc(sizeof(float) * in.nv);
    memcpy(q0, in.q, sizeof(float) * in.nq), memcpy(v0, in.v, sizeof(float) * in.nv);
    int32_t lens[1] = {63};
    ef_status st = run(spec, &in, lens, NULL, &o);
    double dir = 0;
    for (size_t x = 0; x < in.nq; x++) dir += (double)o.dq[x] * u[x];
    for (size_t x = 0; x < in.nv; x++) dir += (double)o.dv[x] * uv[x];
    double f[2];
    bufs *oo[2] = {&op, &om};
    for (int sgn = 0; sgn < 2; sgn++) {
        double e = sgn ? -eps : eps;
        for (size_t x = 0; x < in.nq; x++) in.q[x] = (float)(q0[x] + e * u[x]);
        for (size_t x = 0; x < in.nv; x++) in.v[x] = (float)(v0[x] + e * uv[x]);
        st |= run(spec, &in, lens, NULL, oo[sgn]);
        f[sgn] = 0;
        for (size_t x = 0; x < in.no; x++) f[sgn] += (double)in.g[x] * oo[sgn]->out[x];
    }
    size_t pb = (size_t)2 * 3 * 70 * sizeof(int32_t); /* buckets, hashes=3 */
    int same_hash = !memcmp(op.saved, o.saved, pb) && !memcmp(om.saved, o.saved, pb);
    double fd = (f[0] - f[1]) / (2 * eps);
    char name[256];
    snprintf(name, sizeof name, "finite differences: buckets unchanged at +-%g (%s)", eps,
             spec + 4);
    if (ef_check(name, !st && same_hash, "%d of %d rows held fixed %s", frozen, s.heads * s.q_len,
                 st ? ef_last_error() : "")) {
        snprintf(name, sizeof name, "finite differences: directional derivative (%s)", spec + 4);
        ef_check_err(name, fabs(fd - dir) / fmax(fabs(dir), 1e-3), tol);
    }
    free(u), free(uv), free(q0), free(v0);
    ef_test_free_outputs(&o), ef_test_free_outputs(&op), ef_test_free_outputs(&om);
    ef_test_free_inputs(&in);
}

static void finite_differences(void) {
    /* reference (double inside, fp32 output): eps 1e-3 keeps the rounding of <g, out>
     * (~1e-7 relative) well under 2e-3 */
    finite_difference("lsh:chunk=16,hashes=3,buckets=8,ref=1", 8, 1e-3, 2e-3);
    finite_difference("lsh:chunk=8,buckets=4,hashes=3,causal=1,ref=1", 4, 1e-3, 2e-3);
    finite_difference("lsh:chunk=16,hashes=3,buckets=8,causal=1,reformer_causal=1,ref=1", 8, 1e-3,
                      2e-3);
    /* fast path (fp32 throughout): a larger step against the rounding of the sum (~1e-6
     * relative), with curvature error O(eps^2) */
    finite_difference("lsh:chunk=16,hashes=3,buckets=8", 8, 1e-3, 5e-3);
    finite_difference("lsh:chunk=8,buckets=4,hashes=3,causal=1", 4, 1e-3, 5e-3);
}

/* ---------------------------------------------------------------------------------------------
 * Saved, threads, options
 * ------------------------------------------------------------------------------------------- */
static void saved_written(void) {
    ef_attn_shape s = {2, 2, 100, 100, 8, 4};
    int32_t kv[2] = {100, 70}, ql[2] = {80, 100};
    const char *specs[] = {"lsh:chunk=16,hashes=3", "lsh:chunk=16,buckets=4,hashes=3,causal=1",
                           "lsh:chunk=16,hashes=3,causal=1,reformer_causal=1",
                           "lsh:chunk=16,hashes=3,causal=1,ref=1"};
    for (size_t c = 0; c < 4; c++) {
        bufs in, o1, o2;
        ef_test_inputs(&in, s, 71, 1.0f);
        ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
        ef_status st = run_fill(specs[c], &in, kv, ql, &o1, 0x00);
        st |= run_fill(specs[c], &in, kv, ql, &o2, 0xFF);
        ef_attn *a = NULL;
        size_t sb = 0;
        if (!ef_attn_new(&a, specs[c], &s)) sb = ef_attn_saved_bytes(a);
        ef_attn_free(a);
        int same = sb > 0 && !memcmp(o1.saved, o2.saved, sb) &&
                   !memcmp(o1.dq, o2.dq, sizeof(float) * in.nq);
        char name[256];
        snprintf(name, sizeof name, "saved: every byte written by forward (%s)", specs[c] + 4);
        ef_check(name, !st && same, "%zu bytes", sb);
        ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
    }
}

static void threads(void) {
    ef_attn_shape s = {2, 3, 300, 300, 32, 32};
    int32_t lens[2] = {300, 211}, ql[2] = {250, 300};
    const char *specs[] = {"lsh:chunk=32", "lsh:chunk=32,causal=1",
                           "lsh:chunk=32,causal=1,reformer_causal=1",
                           "lsh:chunk=72,hashes=5,before=2"};
    for (size_t c = 0; c < sizeof specs / sizeof specs[0]; c++) {
        bufs in, o1, o2;
        ef_test_inputs(&in, s, 61, 1.0f);
        ef_test_outputs(&o1, &in), ef_test_outputs(&o2, &in);
        ef_set_num_threads(1);
        ef_status st = run(specs[c], &in, lens, ql, &o1);
        ef_set_num_threads(2);
        st |= run(specs[c], &in, lens, ql, &o2);
        ef_set_num_threads(0);
        int same = !memcmp(o1.out, o2.out, sizeof(float) * in.no) &&
                   !memcmp(o1.dq, o2.dq, sizeof(float) * in.nq) &&
                   !memcmp(o1.dv, o2.dv, sizeof(float) * in.nv);
        char name[256];
        snprintf(name, sizeof name, "threads: 1 vs 2 bit-identical (%s)", specs[c] + 4);
        ef_check(name, !st && same, "%s", st ? ef_last_error() : "");
        ef_test_free_outputs(&o1), ef_test_free_outputs(&o2), ef_test_free_inputs(&in);
    }
}

static void bad_options(void) {
    ef_attn_shape s = {1, 1, 64, 64, 8, 8}, s2 = {1, 1, 64, 32, 8, 8};
    ef_attn *a = NULL;
    ef_check_status("chunk=0 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:chunk=0", &s), EF_ERR_ARG);
    ef_check_status("hashes=0 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:hashes=0", &s), EF_ERR_ARG);
    ef_check_status("buckets=3 -> EF_ERR_ARG", ef_attn_new(&a, "lsh:buckets=3", &s), EF_ERR_ARG);
    ef_check_status("reformer_causal=1 without causal=1 -> EF_ERR_ARG",
                    ef_attn_new(&a, "lsh:reformer_causal=1", &s), EF_ERR_ARG);
    ef_check_status("q_len != kv_len -> EF_ERR_UNSUPPORTED", ef_attn_new(&a, "lsh", &s2),
                    EF_ERR_UNSUPPORTED);
    ef_status st = ef_attn_new(&a, "lsh", &s);
    if (ef_check_status("defaults parse", st, EF_OK))
        ef_check("describe",
                 strcmp(ef_attn_describe(a),
                        "lsh:hashes=4,buckets=auto,chunk=64,before=1,after=0,dedup=1,"
                        "reformer_causal=0,causal=0,scale=auto,seed=0,ref=0") == 0,
                 "%s", ef_attn_describe(a));
    ef_attn_free(a);
    ef_attn_caps caps;
    st = ef_attn_get_caps("lsh", &caps);
    ef_check("caps: causal, discrete, random, deterministic",
             !st && caps.causal && caps.discrete && caps.random && caps.deterministic &&
                 !caps.cross,
             "%s", "");
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
    ef_attn_io io = {q, k, v, NULL, out, NULL};
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
                hit[pass][r] =
                    fmin(hit[pass][r], duplication_hits(1 << r, seed, pass ? 0.3f : 0.0f));
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

/* ---------------------------------------------------------------------------------------------
 * Replay (ef_attn_forward_replay): a forward that reuses the saved buckets
 * ------------------------------------------------------------------------------------------- */
/* A copy of n bytes into a fresh saved buffer of plan a (ef_malloc, aligned). */
static void *saved_copy(const ef_attn *a, const void *src, size_t n) {
    void *sv = ef_test_saved(a);
    memcpy(sv, src, n);
    return sv;
}

/* One rule (causal=0, strict, reformer_causal) with key and query padding:
 *   1. replay on the forward's own inputs == that forward, bitwise (out and every saved byte),
 *      fast and reference, and backward after the replay == backward after the forward;
 *   2. q perturbed by 1e-3 relative (the first of a few perturbation seeds for which a fresh
 *      forward moves at least one bucket): the fast replay keeps the recorded buckets, the
 *      reference replay of the same record keeps them too, and the two agree (1e-4 forward,
 *      5e-4 backward, as fast_vs_ref: the same function evaluated in fp32 and in double);
 *      a fresh forward's output there differs from the replay's by more than that tolerance
 *      (so the comparison would see a path that rehashed). */
static void replay_rule(const char *opts) {
    ef_attn_shape s = {2, 2, 160, 160, 16, 8};
    int32_t kv[2] = {160, 131}, ql[2] = {147, 160};
    char sf[256], sr[256], name[400];
    snprintf(sf, sizeof sf, "lsh:%s", opts);
    snprintf(sr, sizeof sr, "lsh:%s,ref=1", opts);
    bufs in;
    ef_test_inputs(&in, s, 401, 1.0f);
    ef_attn *fa = NULL, *ra = NULL;
    ef_status st = ef_attn_new(&fa, sf, &s);
    if (!st) st = ef_attn_new(&ra, sr, &s);
    snprintf(name, sizeof name, "replay (%s): plans", opts);
    if (!ef_check(name, !st, "%s", ef_last_error())) {
        ef_attn_free(fa), ef_attn_free(ra), ef_test_free_inputs(&in);
        return;
    }
    size_t sb = ef_attn_saved_bytes(fa), rb = ef_attn_saved_bytes(ra); /* rb: the buckets */
    bufs f0, f1, r0, r1;
    ef_test_outputs(&f0, &in), ef_test_outputs(&f1, &in);
    ef_test_outputs(&r0, &in), ef_test_outputs(&r1, &in);
    /* 1. same inputs */
    for (int path = 0; path < 2; path++) {
        ef_attn *a = path ? ra : fa;
        bufs *o0 = path ? &r0 : &f0, *o1 = path ? &r1 : &f1;
        size_t nb = path ? rb : sb;
        o0->saved = ef_test_saved(a);
        memset(o0->saved, 0xA5, nb);
        ef_attn_io io0 = {in.q, in.k, in.v, kv, o0->out, ql};
        st = ef_attn_forward(a, &io0, o0->saved);
        if (!st) st = ef_attn_backward(a, &io0, o0->saved, in.g, o0->dq, o0->dk, o0->dv);
        o1->saved = saved_copy(a, o0->saved, nb);
        memset(o1->out, 0x7f, sizeof(float) * in.no);
        ef_attn_io io1 = {in.q, in.k, in.v, kv, o1->out, ql};
        if (!st) st = ef_attn_forward_replay(a, &io1, o1->saved);
        if (!st) st = ef_attn_backward(a, &io1, o1->saved, in.g, o1->dq, o1->dk, o1->dv);
        snprintf(name, sizeof name, "replay (%s%s): same inputs: runs", opts, path ? ",ref=1" : "");
        if (ef_check(name, !st, "%s", ef_last_error())) {
            snprintf(name, sizeof name, "replay (%s%s): same inputs: out and saved == forward",
                     opts, path ? ",ref=1" : "");
            int same = !memcmp(o0->out, o1->out, sizeof(float) * in.no) &&
                       !memcmp(o0->saved, o1->saved, nb);
            ef_check(name, same, "%s (%zu saved bytes)", same ? "bitwise" : "DIFFERENT", nb);
            snprintf(name, sizeof name,
                     "replay (%s%s): backward after replay == backward after forward", opts,
                     path ? ",ref=1" : "");
            same = !memcmp(o0->dq, o1->dq, sizeof(float) * in.nq) &&
                   !memcmp(o0->dk, o1->dk, sizeof(float) * in.nk) &&
                   !memcmp(o0->dv, o1->dv, sizeof(float) * in.nv);
            ef_check(name, same, "%s", same ? "dq, dk, dv bitwise" : "DIFFERENT");
        }
    }
    /* 2. perturbed inputs: q (1 + 1e-3 z), z ~ N(0, 1), the first seed that moves a bucket */
    float *qp = malloc(sizeof(float) * in.nq);
    void *fresh = ef_test_saved(fa);
    int found = -1;
    for (int seed = 0; seed < 20 && found < 0 && !st; seed++) {
        float *z = ef_test_randn(in.nq, 500 + (uint64_t)seed, 1.0f);
        for (size_t x = 0; x < in.nq; x++) qp[x] = in.q[x] * (1.0f + 1e-3f * z[x]);
        free(z);
        ef_attn_io io = {qp, in.k, in.v, kv, f1.out, ql};
        st = ef_attn_forward(fa, &io, fresh);
        if (!st && memcmp(fresh, f0.saved, rb)) found = seed;
    }
    snprintf(name, sizeof name, "replay (%s): a 1e-3 perturbation of q moves a bucket", opts);
    if (ef_check(name, !st && found >= 0, "perturbation seed %d %s", found, ef_last_error())) {
        float *fresh_out = malloc(sizeof(float) * in.no);
        memcpy(fresh_out, f1.out, sizeof(float) * in.no);
        long moved = 0;
        for (size_t x = 0; x < rb / sizeof(int32_t); x++)
            moved += ((const int32_t *)fresh)[x] != ((const int32_t *)f0.saved)[x];
        ef_free(f1.saved), ef_free(r1.saved);
        f1.saved = saved_copy(fa, f0.saved, sb);
        r1.saved = saved_copy(ra, f0.saved, rb); /* the fast record's buckets */
        ef_attn_io iof = {qp, in.k, in.v, kv, f1.out, ql}, ior = {qp, in.k, in.v, kv, r1.out, ql};
        st = ef_attn_forward_replay(fa, &iof, f1.saved);
        if (!st) st = ef_attn_backward(fa, &iof, f1.saved, in.g, f1.dq, f1.dk, f1.dv);
        if (!st) st = ef_attn_forward_replay(ra, &ior, r1.saved);
        if (!st) st = ef_attn_backward(ra, &ior, r1.saved, in.g, r1.dq, r1.dk, r1.dv);
        snprintf(name, sizeof name, "replay (%s): perturbed q: replay and backward run", opts);
        if (ef_check(name, !st, "%s", ef_last_error())) {
            snprintf(name, sizeof name, "replay (%s): perturbed q keeps the recorded buckets",
                     opts);
            int kept = !memcmp(f1.saved, f0.saved, rb) && !memcmp(r1.saved, f0.saved, rb);
            ef_check(name, kept, "fast %s, ref %s (a fresh forward moved %ld)",
                     memcmp(f1.saved, f0.saved, rb) ? "MOVED" : "kept",
                     memcmp(r1.saved, f0.saved, rb) ? "MOVED" : "kept", moved);
            snprintf(name, sizeof name, "replay (%s): perturbed: fast == ref replay, out", opts);
            ef_check_err(name, ef_max_rel_diff(f1.out, r1.out, in.no), 1e-4);
            snprintf(name, sizeof name, "replay (%s): perturbed: fast == ref, dq after replay",
                     opts);
            ef_check_err(name, ef_max_rel_diff(f1.dq, r1.dq, in.nq), 5e-4);
            snprintf(name, sizeof name, "replay (%s): perturbed: fast == ref, dv after replay",
                     opts);
            ef_check_err(name, ef_max_rel_diff(f1.dv, r1.dv, in.nv), 5e-4);
            double off = ef_max_rel_diff(fresh_out, r1.out, in.no);
            snprintf(name, sizeof name,
                     "replay (%s): perturbed: a fresh forward differs from the replay", opts);
            ef_check(name, off > 1e-3, "max rel diff %.3g (> 1e-3: the moved bucket shows)", off);
        }
        free(fresh_out);
    }
    free(qp);
    ef_free(fresh);
    ef_attn_free(fa), ef_attn_free(ra);
    ef_test_free_outputs(&f0), ef_test_free_outputs(&f1);
    ef_test_free_outputs(&r0), ef_test_free_outputs(&r1);
    ef_test_free_inputs(&in);
}

/* Replay needs a record of this plan's forward with these lengths: NULL, garbage (out-of-range
 * buckets), and a record made with other lengths (a valid position with bucket -1, or a
 * padded one with a bucket) are refused with EF_ERR_ARG and a message, on both paths. A plan
 * without discrete choices (flash) runs its forward. */
static void replay_errors(void) {
    ef_attn_shape s = {2, 2, 64, 64, 8, 8};
    int32_t kv[2] = {64, 50}, ql[2] = {60, 64}, kv2[2] = {64, 40};
    bufs in, o;
    ef_test_inputs(&in, s, 601, 1.0f);
    ef_test_outputs(&o, &in);
    const char *specs[2] = {"lsh:chunk=16,hashes=2", "lsh:chunk=16,hashes=2,ref=1"};
    for (int c = 0; c < 2; c++) {
        ef_attn *a = NULL;
        char name[300];
        if (ef_attn_new(&a, specs[c], &s)) continue;
        size_t sb = ef_attn_saved_bytes(a);
        void *rec = ef_test_saved(a), *sv = ef_test_saved(a);
        ef_attn_io io = {in.q, in.k, in.v, kv, o.out, ql};
        ef_status st = ef_attn_forward(a, &io, rec);
        snprintf(name, sizeof name, "replay (%s): saved NULL -> EF_ERR_ARG", specs[c] + 4);
        ef_check_status(name, ef_attn_forward_replay(a, &io, NULL), EF_ERR_ARG);
        memset(sv, 0x7f, sb);
        snprintf(name, sizeof name, "replay (%s): garbage saved (bucket 0x7f7f7f7f) -> EF_ERR_ARG",
                 specs[c] + 4);
        ef_check_status(name, ef_attn_forward_replay(a, &io, sv), EF_ERR_ARG);
        snprintf(name, sizeof name, "replay (%s): the message names the bucket", specs[c] + 4);
        ef_check(name, strstr(ef_last_error(), "2139062143") != NULL, "\"%s\"", ef_last_error());
        memcpy(sv, rec, sb);
        ef_attn_io longer = {in.q, in.k, in.v, NULL, o.out, NULL};
        snprintf(name, sizeof name,
                 "replay (%s): record of shorter lengths (valid position, bucket -1) -> "
                 "EF_ERR_ARG",
                 specs[c] + 4);
        ef_check_status(name, ef_attn_forward_replay(a, &longer, sv), EF_ERR_ARG);
        ef_check(name, strstr(ef_last_error(), "valid position") != NULL, "\"%s\"",
                 ef_last_error());
        ef_attn_io shorter = {in.q, in.k, in.v, kv2, o.out, ql};
        snprintf(name, sizeof name,
                 "replay (%s): record of longer lengths (padded position with a bucket) -> "
                 "EF_ERR_ARG",
                 specs[c] + 4);
        ef_check_status(name, ef_attn_forward_replay(a, &shorter, sv), EF_ERR_ARG);
        ef_check(name, strstr(ef_last_error(), "padded position") != NULL, "\"%s\"",
                 ef_last_error());
        snprintf(name, sizeof name, "replay (%s): a refused replay leaves saved alone",
                 specs[c] + 4);
        ef_check(name, !st && !memcmp(sv, rec, sb), "%s", "");
        ef_free(rec), ef_free(sv);
        ef_attn_free(a);
    }
    /* flash makes no discrete choice: replay is its forward (out and saved bitwise) */
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "flash", &s);
    if (ef_check_status("replay: flash plan", st, EF_OK)) {
        size_t sb = ef_attn_saved_bytes(a);
        void *s1 = ef_test_saved(a), *s2 = ef_test_saved(a);
        float *out2 = ef_test_zeros(in.no);
        memset(s1, 0x11, sb), memset(s2, 0x22, sb);
        ef_attn_io io = {in.q, in.k, in.v, kv, o.out, ql}, io2 = {in.q, in.k, in.v, kv, out2, ql};
        st = ef_attn_forward(a, &io, s1);
        ef_status st2 = ef_attn_forward_replay(a, &io2, s2);
        ef_check("replay: flash (no discrete choices) runs its forward",
                 !st && !st2 && !memcmp(o.out, out2, sizeof(float) * in.no) && !memcmp(s1, s2, sb),
                 "%s %s %s", ef_status_str(st), ef_status_str(st2), ef_last_error());
        ef_free(s1), ef_free(s2), free(out2);
    }
    ef_attn_free(a);
    ef_test_free_outputs(&o), ef_test_free_inputs(&in);
}

static void replay(void) {
    replay_rule("chunk=16,hashes=3,buckets=8");
    replay_rule("chunk=16,hashes=3,buckets=4,causal=1");
    replay_rule("chunk=16,hashes=3,buckets=8,causal=1,reformer_causal=1");
    replay_errors();
}

int main(void) {
    versus_reference();
    limit_cases();
    buckets_exact();
    buckets_factored();
    rounds_help();
    causality();
    reformer_leaks();
    padding();
    truncation();
    visible_pairs();
    finite_differences();
    saved_written();
    threads();
    bad_options();
    duplication();
    replay();
    return ef_test_finish();
}
