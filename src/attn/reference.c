/*
 * reference.c - the generic slow reference: softmax attention as plain loops in double.
 *
 * Every mechanism whose result is "softmax attention restricted to a set of visible keys"
 * (full, flash, the block-sparse layouts) runs this with ref=1: no BLAS, no tiles, no
 * vectors, one query row at a time, every mask explicit. Per (batch, head, query i):
 *   visible(i, j) = i < q_lens[b] && j < kv_lens[b] && (!causal || j <= i) && ops->visible(h, i, j)
 *   w_j = exp(scale q_i.k_j - max), p_j = w_j / sum w   (over visible j; none: row of zeros)
 *   out_i = sum_j p_j v_j
 * Backward recomputes p for each row (nothing is saved):
 *   dv_j += p_j dO_i;  dp_j = dO_i.v_j;  ds_j = p_j (dp_j - sum_k p_k dp_k)
 *   dq_i = scale sum_j ds_j k_j;  dk_j += scale ds_j q_i
 * Workspace (a->ref_ws, doubles): scores of one row (M), dK, dV of one head (M x (D+Dv)) and
 * dq of one row (D).
 * Time O(B H N M (D + Dv)), single-threaded.
 */
#include "attn/attn.h"

#include <math.h>
#include <string.h>

ef_status ef_ref_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    size_t n = (size_t)s->kv_len * (1 + s->head_dim + s->v_dim) + s->head_dim;
    a->ref_ws = ef_malloc(n * sizeof(double));
    if (!a->ref_ws)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for the reference path (%.1f MB)",
                        a->ops->name, n * 8.0 / 1e6);
    a->ref_ws_bytes = n * sizeof(double);
    return EF_OK;
}

/* p[j] for query row i of head (b, h); returns 0 when no key is visible (p all zero). Padded
 * rows (i >= q_valid) and keys are never read. */
static int ref_row(const ef_attn *a, int h, int q_valid, int kv_valid, int i, const float *qi,
                   const float *k, double *p) {
    const ef_attn_shape *s = &a->shape;
    int m = s->kv_len, d = s->head_dim;
    double mx = -INFINITY;
    for (int j = 0; j < m; j++) {
        int vis = i < q_valid && j < kv_valid && (!a->causal || j <= i) &&
                  (!a->ops->visible || a->ops->visible(a, h, i, j));
        if (!vis) {
            p[j] = -INFINITY;
            continue;
        }
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)qi[t] * k[(size_t)j * d + t];
        p[j] = dot * a->scale;
        if (p[j] > mx) mx = p[j];
    }
    if (mx == -INFINITY) {
        for (int j = 0; j < m; j++) p[j] = 0;
        return 0;
    }
    double sum = 0;
    for (int j = 0; j < m; j++) sum += p[j] = p[j] == -INFINITY ? 0 : exp(p[j] - mx);
    for (int j = 0; j < m; j++) p[j] /= sum;
    return 1;
}

ef_status ef_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    (void)saved;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim;
    double *p = a->ref_ws;
    for (int b = 0; b < s->batch; b++) {
        int kv_valid = ef_attn_kv_valid(a, io, b), q_valid = ef_attn_q_valid(a, io, b);
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            const float *k = io->k + bh * m * d, *v = io->v + bh * m * e;
            for (int i = 0; i < n; i++) {
                ref_row(a, h, q_valid, kv_valid, i, io->q + (bh * n + i) * d, k, p);
                float *out = io->out + (bh * n + i) * e;
                for (int t = 0; t < e; t++) {
                    double o = 0;
                    for (int j = 0; j < m; j++)
                        if (p[j] != 0) o += p[j] * v[(size_t)j * e + t];
                    out[t] = (float)o;
                }
            }
        }
    }
    return EF_OK;
}

ef_status ef_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                          float *dq, float *dk, float *dv) {
    (void)saved;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim;
    double *p = a->ref_ws, *gk = p + m, *gv = gk + (size_t)m * d, *gq = gv + (size_t)m * e;
    for (int b = 0; b < s->batch; b++) {
        int kv_valid = ef_attn_kv_valid(a, io, b), q_valid = ef_attn_q_valid(a, io, b);
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            const float *k = io->k + bh * m * d, *v = io->v + bh * m * e;
            memset(gk, 0, sizeof(double) * m * d);
            memset(gv, 0, sizeof(double) * m * e);
            for (int i = 0; i < n; i++) {
                const float *qi = io->q + (bh * n + i) * d, *gi = dout + (bh * n + i) * e;
                float *dqi = dq + (bh * n + i) * d;
                if (!ref_row(a, h, q_valid, kv_valid, i, qi, k, p)) { /* padded or sees nothing */
                    for (int t = 0; t < d; t++) dqi[t] = 0;
                    continue;
                }
                double delta = 0;
                for (int j = 0; j < m; j++) {
                    if (p[j] == 0) continue;
                    double dp = 0;
                    for (int t = 0; t < e; t++) dp += (double)gi[t] * v[(size_t)j * e + t];
                    delta += p[j] * dp;
                }
                for (int t = 0; t < d; t++) gq[t] = 0;
                for (int j = 0; j < m; j++) {
                    if (p[j] == 0) continue;
                    double dp = 0;
                    for (int r = 0; r < e; r++) dp += (double)gi[r] * v[(size_t)j * e + r];
                    double ds = p[j] * (dp - delta) * a->scale;
                    for (int t = 0; t < d; t++) {
                        gq[t] += ds * k[(size_t)j * d + t];
                        gk[(size_t)j * d + t] += ds * qi[t];
                    }
                    for (int r = 0; r < e; r++) gv[(size_t)j * e + r] += p[j] * gi[r];
                }
                for (int t = 0; t < d; t++) dqi[t] = (float)gq[t];
            }
            for (size_t x = 0; x < (size_t)m * d; x++) dk[bh * m * d + x] = (float)gk[x];
            for (size_t x = 0; x < (size_t)m * e; x++) dv[bh * m * e + x] = (float)gv[x];
        }
    }
    return EF_OK;
}
