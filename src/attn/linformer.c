/*
 * linformer.c - `linformer`: low-rank attention with learned sequence projections (Wang et al.,
 * "Linformer: Self-Attention with Linear Complexity", 2020). docs/linformer.md has the
 * derivation; ALGORITHMS.md b.4 says how fairseq, lucidrains and xformers do it.
 *
 * Per (batch b, head h), with L = kv_lens[b] (kv_len when NULL) and E, F of shape k x kv_len:
 *   K' = E[:, :L] K[:L]          (k x D)    padded keys are dropped before the projection,
 *   V' = F[:, :L] V[:L]          (k x Dv)   which is also fairseq's "slice for short inputs"
 *   O  = softmax(scale Q K'^T) V'           exact attention over all k projected keys (flash)
 * A sequence with L = 0 outputs zeros and gets zero gradients (K' = V' = 0 would already give
 * O = 0 and dQ = 0; both are also written explicitly). Query padding (q_lens) is the inner
 * flash plan's: rows i >= q_lens[b] output zeros, get zero dq, and their q, dO rows are never
 * read, so they do not reach dK', dV' and hence dK, dV, dE, dF. Padded keys (rows >= L of k and
 * v) are never read either: every product is sized to the L valid rows.
 * Backward: the inner flash gives dQ, dK', dV'; then
 *   dK[:L] = E[:, :L]^T dK',  dK[L:] = 0,  dE[:, :L] += dK' K[:L]^T   (same for V, F)
 * and parameter gradients accumulate over batch (and over heads when shared).
 *
 * Tensors: q [B][H][N][D], k [B][H][M][D], v [B][H][M][Dv], out [B][H][N][Dv] (M = kv_len).
 * Parameters (a->params, gradients in a->grads with the same layout), k = option k:
 *   share=none       [H][2][k][M]   E_h = [h][0], F_h = [h][1]
 *   share=kv         [H][k][M]      E_h = F_h
 *   share=headwise   [2][k][M]      one E and one F for every head
 *   share=layerwise  [k][M]         E = F for every head; sharing across layers means the
 *                                   caller ties the parameter buffers of several plans
 * Init: E[r][c] = (2u - 1) / sqrt(k), u = ef_rng_uniform(seed, stream LIN_STREAM + matrix,
 * offset r * 2^32 + c): U(-1/sqrt(k), 1/sqrt(k)) as lucidrains' linformer (fairseq uses xavier).
 * An element does not depend on kv_len, so a plan with a shorter kv_len and the same seed holds
 * exactly the slice E[:, :kv_len].
 * Saved for backward: [lse of the inner flash: B*H*N floats][K': B*H*k*D][V': B*H*k*Dv]
 * (K' and V' are kept, not recomputed: k*(D+Dv) floats per head, independent of the sequence
 * length, 32 K floats at k = 256, D = Dv = 64; recomputing would repeat the forward
 * projections, 2kL(D+Dv) flops). Each part starts on a 64-byte boundary; forward zeroes the
 * gaps, so every byte of `saved` is written.
 * Workspace: the inner flash plan (kv_len = k), K', V' for inference and dK', dV' for backward.
 * Causal masking is refused: the projections mix all positions, every output would see the
 * future. Time O(B H k (M + N) (D + Dv)); memory O(B H (N + k (D + Dv))) saved.
 * The reference path (ref=1) is plain double-precision loops: explicit projection, explicit
 * softmax, its own handling of q_lens and kv_lens, no BLAS and no inner plan.
 */
#include "attn/attn.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const ef_opt_desc lin_opts[] = {
    {"k", EF_OPT_INT, "256", 1, 1 << 20, NULL, 0,
     "projected length: keys and values are compressed to k rows (k > kv_len is allowed)"},
    {"share", EF_OPT_ENUM, "none", 0, 0, "none|kv|headwise|layerwise", 0,
     "none: E, F per head; kv: E = F per head; headwise: one E, F for all heads; "
     "layerwise: one E = F"},
};
enum { LIN_K, LIN_SHARE };
enum { SHARE_NONE, SHARE_KV, SHARE_HEADWISE, SHARE_LAYERWISE };

/* RNG stream of matrix 0; matrix x (in parameter order) draws from stream LIN_STREAM + x. */
#define LIN_STREAM 0x4c494e46ull /* "LINF" */

/* Where the projections of a head live in the parameter buffer. */
typedef struct lin_layout {
    size_t mat;     /* k * M floats, one matrix */
    size_t hstride; /* E of head h = params + h * hstride */
    size_t f_off;   /* F of head h = E of head h + f_off (0: F = E) */
    int64_t nmat;   /* matrices in the buffer (2 x heads may exceed an int) */
} lin_layout;

static lin_layout layout_of(const ef_attn *a) {
    size_t mat = (size_t)ef_opt_i(a, LIN_K) * (size_t)a->shape.kv_len;
    int64_t h = a->shape.heads;
    switch (ef_opt_i(a, LIN_SHARE)) {
    case SHARE_NONE: return (lin_layout){mat, 2 * mat, mat, 2 * h};
    case SHARE_KV: return (lin_layout){mat, mat, 0, h};
    case SHARE_HEADWISE: return (lin_layout){mat, 0, mat, 2};
    default: return (lin_layout){mat, 0, 0, 1};
    }
}

typedef struct lin_plan {
    int k;
    lin_layout lay;
    ef_attn *inner;               /* flash:scale=<scale> over the k projected keys */
    size_t off_kp, off_vp, saved; /* byte offsets of K', V' in `saved`, and its size */
    float *kp, *vp;               /* [B][H][k][D], [B][H][k][Dv]: K', V' of inference */
    float *dkp, *dvp;             /* [B][H][k][D], [B][H][k][Dv]: dK', dV' (backward) */
    double *rw;                   /* reference workspace (ref=1 only), see ref_ws_doubles */
} lin_plan;

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* SIZE_MAX when the count does not fit a size_t (the core then refuses the plan) */
static size_t lin_param_count(const ef_attn *a) {
    lin_layout l = layout_of(a);
    if (l.nmat > 0 && l.mat > SIZE_MAX / (size_t)l.nmat) return SIZE_MAX;
    return l.mat * (size_t)l.nmat;
}

/* ---------------------------------------------------------------------------------------------
 * Plan
 * ------------------------------------------------------------------------------------------- */
typedef struct init_ctx {
    float *params;
    uint64_t seed;
    int k, m;
    float bound;
} init_ctx;

/* Row r of matrix x: U(-bound, bound) from (seed, stream LIN_STREAM + x, offset r << 32). */
static void init_row(void *ctx, int64_t item, int tid) {
    (void)tid;
    const init_ctx *c = ctx;
    int64_t x = item / c->k, r = item % c->k;
    float *row = c->params + (size_t)item * c->m;
    ef_rng_uniform(c->seed, LIN_STREAM + (uint64_t)x, (uint64_t)r << 32, (size_t)c->m, row);
    for (int j = 0; j < c->m; j++) row[j] = (2.0f * row[j] - 1.0f) * c->bound;
}

static size_t ref_ws_doubles(const ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    size_t k = (size_t)ef_opt_i(a, LIN_K);
    /* K', V', dK', dV' of one head, the probabilities of one row, dq of one row */
    return 2 * k * (size_t)(s->head_dim + s->v_dim) + k + (size_t)s->head_dim;
}

static void lin_destroy(ef_attn *a) {
    lin_plan *p = a->impl;
    if (!p) return;
    ef_attn_free(p->inner);
    ef_free(p->kp);
    ef_free(p->vp);
    ef_free(p->dkp);
    ef_free(p->dvp);
    ef_free(p->rw);
    ef_free(p);
    a->impl = NULL;
}

static ef_status lin_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    if (a->causal)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "linformer: causal=1 is not supported: the projections E K and F V mix all "
                        "kv_len positions, so every output would see future keys");
    if (s->head_dim > 256 || s->v_dim > 256)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "linformer: head_dim=%d v_dim=%d; the inner flash kernel supports "
                        "dimensions up to 256",
                        s->head_dim, s->v_dim);
    lin_plan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "linformer: out of memory");
    a->impl = p;
    p->k = (int)ef_opt_i(a, LIN_K);
    p->lay = layout_of(a);

    /* U(-1/sqrt(k), 1/sqrt(k)), one row per work item (counter-based: any thread order) */
    init_ctx ic = {a->params, a->seed, p->k, s->kv_len, 1.0f / sqrtf((float)p->k)};
    ef_parallel_for((int64_t)p->lay.nmat * p->k, ef_attn_threads(a), init_row, &ic);

    if (a->ref) { /* the reference path needs only its double workspace */
        size_t n = ref_ws_doubles(a);
        p->rw = ef_malloc(n * sizeof(double));
        if (!p->rw)
            return ef_error(EF_ERR_NOMEM, "linformer: out of memory for the reference path");
        a->ws_bytes = n * sizeof(double);
        return EF_OK;
    }

    char spec[64];
    snprintf(spec, sizeof spec, "flash:scale=%.9g", a->scale);
    ef_attn_shape in = {s->batch, s->heads, s->q_len, p->k, s->head_dim, s->v_dim};
    ef_status st = ef_attn_new(&p->inner, spec, &in);
    if (st) return st;
    size_t bh = (size_t)s->batch * s->heads;
    size_t nkp = bh * p->k * s->head_dim, nvp = bh * p->k * s->v_dim;
    p->off_kp = round64(ef_attn_saved_bytes(p->inner));
    p->off_vp = p->off_kp + round64(nkp * sizeof(float));
    p->saved = p->off_vp + nvp * sizeof(float);
    p->kp = ef_malloc(nkp * sizeof(float));
    p->vp = ef_malloc(nvp * sizeof(float));
    p->dkp = ef_malloc(nkp * sizeof(float));
    p->dvp = ef_malloc(nvp * sizeof(float));
    if (!p->kp || !p->vp || !p->dkp || !p->dvp)
        return ef_error(EF_ERR_NOMEM, "linformer: out of memory for %.1f MB of projected keys",
                        2.0 * (nkp + nvp) * sizeof(float) / 1e6);
    a->ws_bytes = 2 * (nkp + nvp) * sizeof(float) + ef_attn_workspace_bytes(p->inner);
    return EF_OK;
}

static size_t lin_saved_bytes(const ef_attn *a) { return ((const lin_plan *)a->impl)->saved; }

/* Per (batch, head), L = kv_len (the plan does not know the padding), K = k:
 *   forward:  projections 2 K L (D + Dv)  +  attention over K keys 2 N K (D + Dv)
 *   backward: projections 4 K L (D + Dv)  (dK = E^T dK', dE += dK' K^T; the same for V, F)
 *             + attention 2 N K (3 D + 2 Dv)  (flash recomputes S, then dP, dV', dK', dQ)
 *   forward + backward = 6 K L (D + Dv) + 2 N K (4 D + 3 Dv), about 3x the forward. */
static double lin_flops(const ef_attn *a, int backward) {
    const ef_attn_shape *s = &a->shape;
    double bh = (double)s->batch * s->heads, k = (double)ef_opt_i(a, LIN_K);
    double l = s->kv_len, n = s->q_len, d = s->head_dim, dv = s->v_dim;
    if (!backward) return bh * (2 * k * l * (d + dv) + 2 * n * k * (d + dv));
    return bh * (6 * k * l * (d + dv) + 2 * n * k * (4 * d + 3 * dv));
}

/* ---------------------------------------------------------------------------------------------
 * Fast path: projections with ef_sgemm, attention with the inner flash plan
 * ------------------------------------------------------------------------------------------- */
/* Zeroes rows [b][*][0:n][0:w] of x for every b whose sequence has no key. */
static void zero_empty(const ef_attn *a, const ef_attn_io *io, float *x, int n, int w) {
    if (!io->kv_lens) return;
    size_t per_b = (size_t)a->shape.heads * n * w;
    for (int b = 0; b < a->shape.batch; b++)
        if (io->kv_lens[b] == 0) memset(x + b * per_b, 0, per_b * sizeof(float));
}

/* Work of one fast-path call. The (b, h) pairs or gradient blocks are the work items of the
 * library's parallel loop, and each item makes its products with a single-threaded ef_sgemm
 * (ef_gemm_local_threads(1)): one parallel region per phase instead of one per product, and
 * every output element is summed in an order that does not depend on the thread count. With
 * fewer (b, h) pairs than threads the projections use only B*H threads (as flash's backward). */
typedef struct lin_call {
    ef_attn *a;
    const ef_attn_io *io;
    float *kp, *vp;           /* forward: K', V' written here */
    float *dk, *dv;           /* backward outputs */
    _Atomic ef_status status; /* the first failure of a product (out of memory in ef_sgemm) */
} lin_call;

static void fail(lin_call *c, ef_status st) {
    ef_status ok = EF_OK;
    if (st) atomic_compare_exchange_strong(&c->status, &ok, st);
}

static ef_status call_status(lin_call *c) {
    ef_status st = atomic_load(&c->status);
    return st ? ef_error(st, "linformer: a projection product failed (%s)", ef_status_str(st))
              : EF_OK;
}

/* Item (b, h): K' = E[:, :L] K[:L],  V' = F[:, :L] V[:L]  (L = 0: ef_sgemm writes zeros). */
static void project_head(void *ctx, int64_t bh, int tid) {
    (void)tid;
    lin_call *c = ctx;
    const ef_attn *a = c->a;
    const lin_plan *p = a->impl;
    int m = a->shape.kv_len, d = a->shape.head_dim, dv = a->shape.v_dim, k = p->k;
    int h = (int)(bh % a->shape.heads);
    int l = ef_attn_kv_valid(a, c->io, (int)(bh / a->shape.heads));
    const float *e = a->params + h * p->lay.hstride, *f = e + p->lay.f_off;
    int old = ef_gemm_local_threads(1);
    fail(c, ef_sgemm(0, 0, k, d, l, 1.0f, e, m, c->io->k + bh * m * d, d, 0.0f, c->kp + bh * k * d,
                     d));
    fail(c, ef_sgemm(0, 0, k, dv, l, 1.0f, f, m, c->io->v + bh * m * dv, dv, 0.0f,
                     c->vp + bh * k * dv, dv));
    ef_gemm_local_threads(old);
}

static ef_status lin_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    lin_plan *p = a->impl;
    float *kp = saved ? (float *)((char *)saved + p->off_kp) : p->kp;
    float *vp = saved ? (float *)((char *)saved + p->off_vp) : p->vp;
    if (saved) { /* the alignment gaps after the inner plan's part and after K' */
        size_t inner = ef_attn_saved_bytes(p->inner);
        size_t nkp = (size_t)s->batch * s->heads * p->k * s->head_dim;
        size_t kp_end = p->off_kp + nkp * sizeof(float);
        memset((char *)saved + inner, 0, p->off_kp - inner);
        memset((char *)saved + kp_end, 0, p->off_vp - kp_end);
    }
    lin_call c = {a, io, kp, vp, NULL, NULL, EF_OK};
    ef_parallel_for((int64_t)s->batch * s->heads, ef_attn_threads(a), project_head, &c);
    ef_status st = call_status(&c);
    if (st) return st;
    ef_attn_io in = {io->q, c.kp, c.vp, NULL, io->out, io->q_lens};
    st = ef_attn_forward(p->inner, &in, saved); /* its lse at the start of saved */
    if (st) return st;
    zero_empty(a, io, io->out, s->q_len, s->v_dim);
    return EF_OK;
}

/* Item (b, h): dK[:L] = E[:, :L]^T dK',  dV[:L] = F[:, :L]^T dV';  padded keys get zero. */
static void key_grads(void *ctx, int64_t bh, int tid) {
    (void)tid;
    lin_call *c = ctx;
    const ef_attn *a = c->a;
    const lin_plan *p = a->impl;
    int m = a->shape.kv_len, d = a->shape.head_dim, dv = a->shape.v_dim, k = p->k;
    int h = (int)(bh % a->shape.heads);
    int l = ef_attn_kv_valid(a, c->io, (int)(bh / a->shape.heads));
    const float *e = a->params + h * p->lay.hstride, *f = e + p->lay.f_off;
    float *dkb = c->dk + bh * m * d, *dvb = c->dv + bh * m * dv;
    int old = ef_gemm_local_threads(1);
    fail(c, ef_sgemm(1, 0, l, d, k, 1.0f, e, m, p->dkp + bh * k * d, d, 0.0f, dkb, d));
    fail(c, ef_sgemm(1, 0, l, dv, k, 1.0f, f, m, p->dvp + bh * k * dv, dv, 0.0f, dvb, dv));
    ef_gemm_local_threads(old);
    memset(dkb + (size_t)l * d, 0, sizeof(float) * (size_t)(m - l) * d);
    memset(dvb + (size_t)l * dv, 0, sizeof(float) * (size_t)(m - l) * dv);
}

/* Item (matrix x, columns [j0, j0 + GRAD_COLS)): dX[:, j0:j1] += dK'_bh K_bh[j0:j1]^T for every
 * (b, h) whose E (or dV'_bh V_bh^T for every F) is matrix x, in the order b, h, E before F.
 * A matrix shared by several heads (share=kv, headwise, layerwise) is thus summed by one
 * thread in a fixed order: no races, and the same bits for any thread count. */
enum { GRAD_COLS = 512 };

static void param_grads(void *ctx, int64_t item, int tid) {
    (void)tid;
    lin_call *c = ctx;
    const ef_attn *a = c->a;
    const lin_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int m = s->kv_len, k = p->k, nblk = (m + GRAD_COLS - 1) / GRAD_COLS;
    size_t x = (size_t)(item / nblk);
    int j0 = (int)(item % nblk) * GRAD_COLS, j1 = EF_MIN(m, j0 + GRAD_COLS);
    float *gx = a->grads + x * p->lay.mat + j0;
    int old = ef_gemm_local_threads(1);
    for (int b = 0; b < s->batch; b++) {
        int n = EF_MIN(j1, ef_attn_kv_valid(a, c->io, b)) - j0; /* keys of this block that exist */
        if (n <= 0) continue;
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h, off = h * p->lay.hstride;
            if (off == x * p->lay.mat) { /* E of head h */
                int d = s->head_dim;
                fail(c, ef_sgemm(0, 1, k, n, d, 1.0f, p->dkp + bh * k * d, d,
                                 c->io->k + (bh * m + j0) * d, d, 1.0f, gx, m));
            }
            if (off + p->lay.f_off == x * p->lay.mat) { /* F of head h */
                int dv = s->v_dim;
                fail(c, ef_sgemm(0, 1, k, n, dv, 1.0f, p->dvp + bh * k * dv, dv,
                                 c->io->v + (bh * m + j0) * dv, dv, 1.0f, gx, m));
            }
        }
    }
    ef_gemm_local_threads(old);
}

static ef_status lin_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    lin_plan *p = a->impl;
    const float *kp = (const float *)((const char *)saved + p->off_kp);
    const float *vp = (const float *)((const char *)saved + p->off_vp);
    ef_attn_io in = {io->q, kp, vp, NULL, io->out, io->q_lens};
    ef_status st = ef_attn_backward(p->inner, &in, saved, dout, dq, p->dkp, p->dvp);
    if (st) return st;
    zero_empty(a, io, dq, s->q_len, s->head_dim);
    lin_call c = {a, io, NULL, NULL, dk, dv, EF_OK};
    int threads = ef_attn_threads(a);
    ef_parallel_for((int64_t)s->batch * s->heads, threads, key_grads, &c);
    int64_t nblk = (s->kv_len + GRAD_COLS - 1) / GRAD_COLS;
    ef_parallel_for((int64_t)p->lay.nmat * nblk, threads, param_grads, &c);
    return call_status(&c);
}

/* ---------------------------------------------------------------------------------------------
 * Reference path (ref=1): double precision, plain loops, one head at a time
 * ------------------------------------------------------------------------------------------- */
static size_t lin_ref_saved_bytes(const ef_attn *a) {
    (void)a;
    return 0; /* backward recomputes the projections and every softmax row */
}

/* X'[r][t] = sum_{j<L} P[r][j] X[j][t], P of row stride m, X of L x w. */
static void ref_project(const float *pm, int m, int k, int l, const float *x, int w, double *out) {
    for (int r = 0; r < k; r++)
        for (int t = 0; t < w; t++) {
            double acc = 0;
            for (int j = 0; j < l; j++) acc += (double)pm[(size_t)r * m + j] * x[(size_t)j * w + t];
            out[(size_t)r * w + t] = acc;
        }
}

/* p[r] = softmax_r(scale q . K'_r) over all k projected keys. */
static void ref_probs(const ef_attn *a, const float *qi, const double *kp, int k, double *p) {
    int d = a->shape.head_dim;
    double mx = -INFINITY, sum = 0;
    for (int r = 0; r < k; r++) {
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)qi[t] * kp[(size_t)r * d + t];
        p[r] = dot * a->scale;
        if (p[r] > mx) mx = p[r];
    }
    for (int r = 0; r < k; r++) sum += p[r] = exp(p[r] - mx);
    for (int r = 0; r < k; r++) p[r] /= sum;
}

static ef_status lin_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    (void)saved;
    const ef_attn_shape *s = &a->shape;
    lin_plan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, k = p->k;
    double *kp = p->rw, *vp = kp + (size_t)k * d, *pr = vp + (size_t)k * e;
    for (int b = 0; b < s->batch; b++) {
        int l = ef_attn_kv_valid(a, io, b), nq = ef_attn_q_valid(a, io, b);
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            float *out = io->out + bh * n * e;
            memset(out, 0, sizeof(float) * (size_t)n * e); /* padded query rows stay zero */
            if (l == 0 || nq == 0) continue;               /* no key or no query: all zero */
            const float *ep = a->params + h * p->lay.hstride, *fp = ep + p->lay.f_off;
            ref_project(ep, m, k, l, io->k + bh * m * d, d, kp);
            ref_project(fp, m, k, l, io->v + bh * m * e, e, vp);
            for (int i = 0; i < nq; i++) { /* rows i >= nq are padding: not read */
                ref_probs(a, io->q + (bh * n + i) * d, kp, k, pr);
                for (int t = 0; t < e; t++) {
                    double o = 0;
                    for (int r = 0; r < k; r++) o += pr[r] * vp[(size_t)r * e + t];
                    out[(size_t)i * e + t] = (float)o;
                }
            }
        }
    }
    return EF_OK;
}

static ef_status lin_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    (void)saved;
    const ef_attn_shape *s = &a->shape;
    lin_plan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, k = p->k;
    double *kp = p->rw, *vp = kp + (size_t)k * d, *gkp = vp + (size_t)k * e;
    double *gvp = gkp + (size_t)k * d, *pr = gvp + (size_t)k * e, *gq = pr + k;
    for (int b = 0; b < s->batch; b++) {
        int l = ef_attn_kv_valid(a, io, b), nq = ef_attn_q_valid(a, io, b);
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            const float *q = io->q + bh * n * d, *g = dout + bh * n * e;
            const float *kb = io->k + bh * m * d, *vb = io->v + bh * m * e;
            float *dqb = dq + bh * n * d, *dkb = dk + bh * m * d, *dvb = dv + bh * m * e;
            memset(dkb, 0, sizeof(float) * (size_t)m * d); /* padded keys: zero */
            memset(dvb, 0, sizeof(float) * (size_t)m * e);
            memset(dqb, 0, sizeof(float) * (size_t)n * d); /* padded queries: zero */
            if (l == 0 || nq == 0) continue; /* no key or no query: E and F get nothing */
            size_t off = h * p->lay.hstride;
            const float *ep = a->params + off, *fp = ep + p->lay.f_off;
            float *ge = a->grads + off, *gf = ge + p->lay.f_off;
            ref_project(ep, m, k, l, kb, d, kp);
            ref_project(fp, m, k, l, vb, e, vp);
            memset(gkp, 0, sizeof(double) * (size_t)k * d);
            memset(gvp, 0, sizeof(double) * (size_t)k * e);
            for (int i = 0; i < nq; i++) { /* rows i >= nq are padding: q, dO not read */
                const float *qi = q + (size_t)i * d, *gi = g + (size_t)i * e;
                ref_probs(a, qi, kp, k, pr);
                /* dp_r = dO_i . V'_r;  delta = sum_r p_r dp_r;  ds_r = p_r (dp_r - delta) */
                double delta = 0;
                for (int r = 0; r < k; r++) {
                    double dp = 0;
                    for (int t = 0; t < e; t++) dp += (double)gi[t] * vp[(size_t)r * e + t];
                    delta += pr[r] * dp;
                }
                for (int t = 0; t < d; t++) gq[t] = 0;
                for (int r = 0; r < k; r++) {
                    double dp = 0;
                    for (int t = 0; t < e; t++) dp += (double)gi[t] * vp[(size_t)r * e + t];
                    double ds = pr[r] * (dp - delta) * a->scale;
                    for (int t = 0; t < d; t++) {
                        gq[t] += ds * kp[(size_t)r * d + t];  /* dQ_i = scale sum ds K'_r */
                        gkp[(size_t)r * d + t] += ds * qi[t]; /* dK'_r += scale ds q_i */
                    }
                    for (int t = 0; t < e; t++) gvp[(size_t)r * e + t] += pr[r] * gi[t];
                }
                for (int t = 0; t < d; t++) dqb[(size_t)i * d + t] = (float)gq[t];
            }
            /* dK[j] = sum_r E[r][j] dK'_r  (j < L);  dE[r][j] += dK'_r . K[j]  (and V, F) */
            for (int j = 0; j < l; j++) {
                for (int t = 0; t < d; t++) {
                    double acc = 0;
                    for (int r = 0; r < k; r++)
                        acc += (double)ep[(size_t)r * m + j] * gkp[(size_t)r * d + t];
                    dkb[(size_t)j * d + t] = (float)acc;
                }
                for (int t = 0; t < e; t++) {
                    double acc = 0;
                    for (int r = 0; r < k; r++)
                        acc += (double)fp[(size_t)r * m + j] * gvp[(size_t)r * e + t];
                    dvb[(size_t)j * e + t] = (float)acc;
                }
            }
            for (int r = 0; r < k; r++)
                for (int j = 0; j < l; j++) {
                    double acc_e = 0, acc_f = 0;
                    for (int t = 0; t < d; t++)
                        acc_e += gkp[(size_t)r * d + t] * kb[(size_t)j * d + t];
                    for (int t = 0; t < e; t++)
                        acc_f += gvp[(size_t)r * e + t] * vb[(size_t)j * e + t];
                    /* share=kv, layerwise: ge == gf, both contributions land on E */
                    ge[(size_t)r * m + j] = (float)(ge[(size_t)r * m + j] + acc_e);
                    gf[(size_t)r * m + j] = (float)(gf[(size_t)r * m + j] + acc_f);
                }
        }
    }
    return EF_OK;
}

const ef_attn_ops ef_attn_ops_linformer = {
    .caps = {.cross = 1, .params = 1, .random = 1, .deterministic = 1},
    .name = "linformer",
    .summary = "low-rank attention: keys and values projected to k rows by learned E, F "
               "(Wang et al. 2020)",
    .notes = "  K' = E[:, :L] K[:L], V' = F[:, :L] V[:L] (L = kv_lens[b]: padded keys are dropped\n"
             "  before the projection, as slicing E for a shorter input), then exact softmax\n"
             "  attention over the k projected keys (flash). E, F are k x kv_len parameters\n"
             "  (ef_attn_params; gradients accumulate), init U(-1/sqrt(k), 1/sqrt(k)) from the\n"
             "  seed (lucidrains; fairseq uses xavier). share=layerwise ties E = F over heads;\n"
             "  across layers, tie the parameter buffers of several plans. L = 0: zero output\n"
             "  and gradients. Query rows >= q_lens[b] output zeros and get zero gradients.\n"
             "  causal=1 is refused (the projections mix all positions); head_dim and v_dim\n"
             "  up to 256. Saves lse (B*H*N floats) and K', V' (B*H*k*(D+Dv)).",
    .opts = lin_opts,
    .n_opts = (int)(sizeof lin_opts / sizeof lin_opts[0]),
    .init = lin_init,
    .destroy = lin_destroy,
    .param_count = lin_param_count,
    .flops = lin_flops,
    .saved_bytes = lin_saved_bytes,
    .forward = lin_forward,
    .backward = lin_backward,
    .ref_saved_bytes = lin_ref_saved_bytes,
    .ref_forward = lin_ref_forward,
    .ref_backward = lin_ref_backward,
};
