/*
 * dense.c - dense attention with GEMMs: the fast path of `full` (the "naive attention"
 * baseline every benchmark compares against). The slow reference is reference.c.
 *
 * For each (batch, head), with Q [N][D], K [M][D], V [M][Dv], and only the valid rows
 * (i < q_lens[b]) and keys (j < kv_lens[b]) entering any product, so that the content of padded
 * positions (NaN included) never reaches a valid result:
 *   S = scale * Q K^T                         (one GEMM, valid N x valid M)
 *   S_ij = -inf where key j is invisible: j >= kv_lens[b], j > i when causal, or the
 *          mechanism's `visible` rule says no
 *   P = softmax_rows(S), a row with no visible key is all zeros
 *   O = P V                                   (one GEMM)
 * Backward (P saved):
 *   dV = P^T dO,  dP = dO V^T,  delta_i = sum_j P_ij dP_ij,
 *   dS = P o (dP - delta) * scale,  dQ = dS K,  dK = dS^T Q.
 * Padded rows output zeros and get dQ = 0; padded keys get dK = dV = 0; P is zero outside the
 * valid block, so every saved byte is written.
 * Saved: P [batch][heads][N][M]. Workspace: one N x M buffer (a->dense_ws).
 * Time O(B H N M (D + Dv)), memory O(B H N M) when training.
 */
#include "attn/attn.h"
#include "core/vec.h"

#include <math.h>
#include <string.h>

ef_status ef_dense_init(ef_attn *a) {
    if (a->dense_ws) return EF_OK;
    size_t n = (size_t)a->shape.q_len * a->shape.kv_len;
    a->dense_ws = ef_malloc(n * sizeof(float));
    if (!a->dense_ws)
        return ef_error(EF_ERR_NOMEM,
                        "%s: out of memory for the dense %d x %d score buffer (%.1f MB)",
                        a->ops->name, a->shape.q_len, a->shape.kv_len, n * 4.0 / 1e6);
    a->dense_ws_bytes = n * sizeof(float);
    return EF_OK;
}

size_t ef_dense_saved_bytes(const ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    return (size_t)s->batch * s->heads * s->q_len * s->kv_len * sizeof(float);
}

typedef struct dense_rows {
    const ef_attn *a;
    int head, kv_valid, q_valid;
    float *p;          /* [N][M]: scores in, probabilities out (forward) */
    const float *dp_p; /* backward: P */
    float *ds;         /* backward: dP in, dS out */
} dense_rows;

enum { DENSE_ROWS_PER_ITEM = 32 };

static void softmax_rows(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dense_rows *c = ctx;
    const ef_attn *a = c->a;
    int n = a->shape.q_len, m = a->shape.kv_len;
    int i1 = (int)EF_MIN((int64_t)n, (item + 1) * DENSE_ROWS_PER_ITEM);
    for (int i = (int)(item * DENSE_ROWS_PER_ITEM); i < i1; i++) {
        float *row = c->p + (size_t)i * m;
        /* columns past the valid keys, and padded rows, were not computed: zero them */
        int mv = i < c->q_valid ? c->kv_valid : 0, lim = ef_attn_row_limit(a, mv, i);
        memset(row + mv, 0, sizeof(float) * (size_t)(m - mv));
        int seen = 0, j = 0;
        if (a->ops->visible) {
            for (; j < mv; j++) {
                if (j >= lim || !a->ops->visible(a, c->head, i, j)) row[j] = -INFINITY;
                else seen = 1;
            }
        } else { /* keys [0, lim) visible */
            seen = lim > 0;
            for (j = EF_MAX(lim, 0); j < mv; j++) row[j] = -INFINITY;
        }
        if (!seen) { /* nothing visible: zeros, and zero gradient downstream */
            memset(row, 0, sizeof(float) * mv);
            continue;
        }
        /* the largest score (NaN never taken); visible scores that are all NaN or -inf (a NaN
         * or infinite q or k) leave mx = -inf: row - mx is then NaN or +inf and the row's NaN
         * propagates, as in flash, instead of passing for a row that sees no key */
        vf vm = vf_set1(-INFINITY);
        for (j = 0; j + EF_VL <= mv; j += EF_VL) vm = vf_max(vf_loadu(row + j), vm);
        float mx = vf_hmax(vm);
        for (; j < mv; j++) mx = row[j] > mx ? row[j] : mx;
        ef_vexp_shift(row, (size_t)mv, mx, 1.0f);
        float inv = (float)(1.0 / ef_sum_d(row, mv));
        for (j = 0; j + EF_VL <= mv; j += EF_VL) vf_storeu(row + j, vf_loadu(row + j) * inv);
        for (; j < mv; j++) row[j] *= inv;
    }
}

static void softmax_grad_rows(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dense_rows *c = ctx;
    const ef_attn *a = c->a;
    int m = a->shape.kv_len, mv = c->kv_valid;
    int i1 = (int)EF_MIN((int64_t)c->q_valid, (item + 1) * DENSE_ROWS_PER_ITEM);
    for (int i = (int)(item * DENSE_ROWS_PER_ITEM); i < i1; i++) {
        const float *p = c->dp_p + (size_t)i * m;
        float *ds = c->ds + (size_t)i * m;
        double delta = ef_dot_d(p, ds, mv);
        int j = 0; /* in double, 8 lanes at a time */
        for (; j + 8 <= mv; j += 8) {
            ef_v8f pf, df;
            memcpy(&pf, p + j, sizeof pf);
            memcpy(&df, ds + j, sizeof df);
            ef_v8d r = __builtin_convertvector(pf, ef_v8d) *
                       (__builtin_convertvector(df, ef_v8d) - delta) * (double)a->scale;
            ef_v8f o = __builtin_convertvector(r, ef_v8f);
            memcpy(ds + j, &o, sizeof o);
        }
        for (; j < mv; j++) ds[j] = (float)(p[j] * (ds[j] - delta) * a->scale);
    }
}

/* Zeros rows [r0, r1) of a row-major matrix with `cols` columns. */
static void zero_rows(float *x, int r0, int r1, int cols) {
    if (r1 > r0) memset(x + (size_t)r0 * cols, 0, sizeof(float) * (size_t)(r1 - r0) * cols);
}

ef_status ef_dense_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    int64_t items = (n + DENSE_ROWS_PER_ITEM - 1) / DENSE_ROWS_PER_ITEM;
    for (int b = 0; b < s->batch; b++) {
        int mv = ef_attn_kv_valid(a, io, b), nv = ef_attn_q_valid(a, io, b);
        if (mv == 0) nv = 0; /* no key: every row is zero */
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            const float *q = io->q + bh * n * d, *k = io->k + bh * m * d, *v = io->v + bh * m * dv;
            float *p = saved ? (float *)saved + bh * n * m : a->dense_ws,
                  *o = io->out + bh * n * dv;
            ef_status st;
            if (nv > 0 && (st = ef_sgemm_fixed(0, 1, nv, mv, d, a->scale, q, d, k, d, 0.0f, p, m)))
                return st;
            dense_rows c = {a, h, mv, nv, p, NULL, NULL};
            ef_parallel_for(items, ef_threads(), softmax_rows, &c);
            if (nv > 0 && (st = ef_sgemm_fixed(0, 0, nv, dv, mv, 1.0f, p, m, v, dv, 0.0f, o, dv)))
                return st;
            zero_rows(o, nv, n, dv);
        }
    }
    return EF_OK;
}

ef_status ef_dense_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                            float *dq, float *dk, float *dv_) {
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    int64_t items = (n + DENSE_ROWS_PER_ITEM - 1) / DENSE_ROWS_PER_ITEM;
    float *ds = a->dense_ws;
    for (int b = 0; b < s->batch; b++) {
        int mv = ef_attn_kv_valid(a, io, b), nv = ef_attn_q_valid(a, io, b);
        if (mv == 0) nv = 0;
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            const float *q = io->q + bh * n * d, *k = io->k + bh * m * d, *v = io->v + bh * m * dv;
            const float *p = (const float *)saved + bh * n * m, *g = dout + bh * n * dv;
            float *gq = dq + bh * n * d, *gk = dk + bh * m * d, *gv = dv_ + bh * m * dv;
            zero_rows(gq, nv, n, d);
            if (nv == 0) {
                zero_rows(gk, 0, m, d), zero_rows(gv, 0, m, dv);
                continue;
            }
            zero_rows(gk, mv, m, d), zero_rows(gv, mv, m, dv);
            ef_status st;
            if ((st = ef_sgemm_fixed(1, 0, mv, dv, nv, 1.0f, p, m, g, dv, 0.0f, gv, dv))) return st;
            if ((st = ef_sgemm_fixed(0, 1, nv, mv, dv, 1.0f, g, dv, v, dv, 0.0f, ds, m))) return st;
            dense_rows c = {a, h, mv, nv, NULL, p, ds};
            ef_parallel_for(items, ef_threads(), softmax_grad_rows, &c);
            if ((st = ef_sgemm_fixed(0, 0, nv, d, mv, 1.0f, ds, m, k, d, 0.0f, gq, d))) return st;
            if ((st = ef_sgemm_fixed(1, 0, mv, d, nv, 1.0f, ds, m, q, d, 0.0f, gk, d))) return st;
        }
    }
    return EF_OK;
}
