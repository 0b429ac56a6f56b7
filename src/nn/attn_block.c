/*
 * attn_block.c - the multi-head attention block (attn_block.h has the equations and layouts).
 *
 * Backward, per sequence b with nv valid rows and per head h (restating the forward lines):
 *   y = sum_h O_h Wo_h + bo:        dO_h = dy Wo_h^T;  dWo_h += O_h^T dy;  dbo += sum_rows dy
 *   O = attention(Q, K, V):         dQ, dK, dV from ef_attn_backward
 *   Q_h = x Wq_h + bq_h (K, V alike): dx = sum_h dQ_h Wq_h^T + dK_h Wk_h^T + dV_h Wv_h^T;
 *                                   dWq_h += x^T dQ_h;  dbq_h += sum_rows dQ_h
 * Time: 8 B N C^2 for the projections (forward), twice that backward, plus the attention's.
 * Scratch: the caller's ws (4 [B][H][N][D] tensors); every element of the tensors a call uses is
 * written before it is read (padded rows included, by zero_tail), so ws may hold anything.
 */
#include "nn/attn_block.h"

#include "attn/attn.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ef_attn_block {
    double seconds; /* inside ef_attn_* calls since made or reset */
    ef_attn *attn;
    int batch, len, dim, heads, hd;
    int shared_qk;
    size_t per;        /* floats of one [B][H][N][D] tensor */
    size_t attn_saved; /* the plan's saved bytes */
    float *cap;        /* ef_attn_block_capture: the next forward copies q, k, v here */
};

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

ef_status ef_attn_block_new(ef_attn_block **out, const char *spec, int batch, int len, int dim,
                            int heads) {
    return ef_attn_block_new_sharing(out, spec, batch, len, dim, heads, NULL);
}

ef_status ef_attn_block_new_sharing(ef_attn_block **out, const char *spec, int batch, int len,
                                    int dim, int heads, const ef_attn_block *donor) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_attn_block_new: out is NULL");
    *out = NULL;
    if (heads < 1 || dim < 1 || dim % heads != 0)
        return ef_error(EF_ERR_SHAPE, "attention block: dim=%d is not a multiple of heads=%d", dim,
                        heads);
    ef_attn_shape s = {batch, heads, len, len, dim / heads, dim / heads};
    ef_attn *attn = NULL;
    ef_status st = ef_attn_new_sharing(&attn, spec, &s, donor ? donor->attn : NULL);
    if (st) return st;
    ef_attn_block *blk = ef_mem_calloc(1, sizeof *blk);
    if (!blk) {
        ef_attn_free(attn);
        return ef_error(EF_ERR_NOMEM, "out of memory for an attention block");
    }
    blk->attn = attn;
    blk->batch = batch, blk->len = len, blk->dim = dim, blk->heads = heads, blk->hd = dim / heads;
    /* the mechanism's name is the canonical spec up to ':' */
    char name[64];
    const char *desc = ef_attn_describe(attn), *colon = strchr(desc, ':');
    size_t n = colon ? (size_t)(colon - desc) : strlen(desc);
    snprintf(name, sizeof name, "%.*s", (int)EF_MIN(n, sizeof name - 1), desc);
    ef_attn_caps caps;
    if ((st = ef_attn_get_caps(name, &caps))) {
        ef_attn_block_free(blk);
        return st;
    }
    blk->shared_qk = caps.shared_qk;
    blk->per = (size_t)batch * len * dim;
    blk->attn_saved = ef_attn_saved_bytes(attn);
    ef_clear_error();
    *out = blk;
    return EF_OK;
}

void ef_attn_block_free(ef_attn_block *blk) {
    if (!blk) return;
    ef_attn_free(blk->attn);
    ef_free(blk);
}

ef_attn *ef_attn_block_attn(const ef_attn_block *blk) { return blk ? blk->attn : NULL; }
int ef_attn_block_shared_qk(const ef_attn_block *blk) { return blk ? blk->shared_qk : 0; }

size_t ef_attn_block_saved_bytes(const ef_attn_block *blk) {
    return blk ? round64(4 * blk->per * sizeof(float)) + blk->attn_saved : 0;
}

/* q, k, v, o (or dO, dQ, dK, dV) [B][H][N][D], one after the other */
size_t ef_attn_block_ws_bytes(const ef_attn_block *blk) {
    return blk ? round64(4 * blk->per * sizeof(float)) : 0;
}

size_t ef_attn_block_workspace_bytes(const ef_attn_block *blk) {
    return blk ? ef_attn_workspace_bytes(blk->attn) : 0;
}

/* The caller's scratch: present and 64-byte aligned (ef_malloc). */
static ef_status check_ws(const ef_attn_block *blk, const void *ws, const char *fn) {
    if (!ws)
        return ef_error(EF_ERR_ARG, "%s: ws is NULL (ef_attn_block_ws_bytes = %zu bytes needed)",
                        fn, ef_attn_block_ws_bytes(blk));
    if ((uintptr_t)ws % 64 != 0)
        return ef_error(EF_ERR_ARG, "%s: ws=%p is not 64-byte aligned (use ef_malloc)", fn, ws);
    return EF_OK;
}

static ef_status check_lens(const ef_attn_block *blk, const int32_t *lens) {
    for (int b = 0; lens && b < blk->batch; b++)
        if (lens[b] < 0 || lens[b] > blk->len)
            return ef_error(EF_ERR_ARG, "attention block: lens[%d]=%d is outside [0, len=%d]", b,
                            lens[b], blk->len);
    return EF_OK;
}

/* Zeros rows [r0, rows) of x [rows][cols]. */
static void zero_tail(float *x, int r0, int rows, int cols) {
    if (rows > r0) memset(x + (size_t)r0 * cols, 0, sizeof(float) * (size_t)(rows - r0) * cols);
}

/* One head's projection of the valid rows: out [N][D] = x [nv][C] W[:, hD:(h+1)D] + bias. */
static ef_status project(const ef_attn_block *blk, const float *x, const float *w,
                         const float *bias, int h, int nv, float *out) {
    int c = blk->dim, d = blk->hd;
    ef_status st = ef_sgemm_fixed(0, 0, nv, d, c, 1.0f, x, c, w + (size_t)h * d, c, 0.0f, out, d);
    if (st) return st;
    for (int i = 0; i < nv; i++)
        for (int t = 0; t < d; t++) out[(size_t)i * d + t] += bias[(size_t)h * d + t];
    zero_tail(out, nv, blk->len, d);
    return EF_OK;
}

size_t ef_attn_block_record_offset(const ef_attn_block *blk) {
    return blk ? round64(4 * blk->per * sizeof(float)) : 0;
}
size_t ef_attn_block_record_bytes(const ef_attn_block *blk) { return blk ? blk->attn_saved : 0; }

/* The forward of ef_attn_block_forward (replay = 0) and ef_attn_block_forward_replay (1). */
static ef_status block_forward(ef_attn_block *blk, const ef_attn_block_params *p, const float *x,
                               const int32_t *lens, float *y, void *saved, void *ws, int replay) {
    const char *fn = replay ? "ef_attn_block_forward_replay" : "ef_attn_block_forward";
    if (!blk || !p || !x || !y)
        return ef_error(EF_ERR_ARG, "%s: %s is NULL", fn,
                        !blk ? "blk"
                        : !p ? "params"
                        : !x ? "x"
                             : "y");
    ef_status st = saved ? EF_OK : check_ws(blk, ws, fn); /* ws holds q, k, v, o without saved */
    if (!st) st = check_lens(blk, lens);
    if (st) return st;
    int n = blk->len, c = blk->dim, d = blk->hd, H = blk->heads;
    float *q = saved ? (float *)saved : (float *)ws, *k = q + blk->per, *v = k + blk->per,
          *o = v + blk->per;
    void *asaved = saved ? (char *)saved + round64(4 * blk->per * sizeof(float)) : NULL;
    for (int b = 0; b < blk->batch; b++) {
        int nv = lens ? lens[b] : n;
        const float *xb = x + (size_t)b * n * c;
        for (int h = 0; h < H; h++) {
            size_t off = ((size_t)b * H + h) * n * d;
            if ((st = project(blk, xb, p->wq, p->bq, h, nv, q + off))) return st;
            if (blk->shared_qk)
                memset(k + off, 0, sizeof(float) * (size_t)n * d); /* unused; saved fully written */
            else if ((st = project(blk, xb, p->wk, p->bk, h, nv, k + off)))
                return st;
            if ((st = project(blk, xb, p->wv, p->bv, h, nv, v + off))) return st;
        }
    }
    if (blk->cap) { /* q, k (shared-QK: q), v with the rows past each length zeroed */
        const float *src[3] = {q, blk->shared_qk ? q : k, v};
        for (int t = 0; t < 3; t++)
            for (int b = 0; b < blk->batch; b++) {
                size_t nv = (size_t)(lens ? lens[b] : n), bh = (size_t)b * H * n * d;
                for (int h = 0; h < H; h++) {
                    float *dst = blk->cap + t * blk->per + bh + (size_t)h * n * d;
                    memcpy(dst, src[t] + bh + (size_t)h * n * d, sizeof(float) * nv * d);
                    memset(dst + nv * d, 0, sizeof(float) * (n - nv) * d);
                }
            }
        blk->cap = NULL;
    }
    ef_attn_io io = {q, blk->shared_qk ? q : k, v, lens, o, lens};
    double t0 = ef_now();
    st = replay ? ef_attn_forward_replay(blk->attn, &io, asaved)
                : ef_attn_forward(blk->attn, &io, asaved);
    blk->seconds += ef_now() - t0;
    if (st) return st;
    for (int b = 0; b < blk->batch; b++) {
        int nv = lens ? lens[b] : n;
        float *yb = y + (size_t)b * n * c;
        for (int h = 0; h < H && nv > 0; h++) {
            const float *obh = o + ((size_t)b * H + h) * n * d;
            st = ef_sgemm_fixed(0, 0, nv, c, d, 1.0f, obh, d, p->wo + (size_t)h * d * c, c,
                                h ? 1.0f : 0.0f, yb, c);
            if (st) return st;
        }
        for (int i = 0; i < nv; i++)
            for (int t = 0; t < c; t++) yb[(size_t)i * c + t] += p->bo[t];
        zero_tail(yb, nv, n, c);
    }
    return EF_OK;
}

void ef_attn_block_capture(ef_attn_block *blk, float *dst) {
    if (blk) blk->cap = dst;
}

ef_status ef_attn_block_forward(ef_attn_block *blk, const ef_attn_block_params *p, const float *x,
                                const int32_t *lens, float *y, void *saved, void *ws) {
    return block_forward(blk, p, x, lens, y, saved, ws, 0);
}

ef_status ef_attn_block_forward_replay(ef_attn_block *blk, const ef_attn_block_params *p,
                                       const float *x, const int32_t *lens, float *y, void *saved,
                                       void *ws) {
    if (!saved)
        return ef_error(EF_ERR_ARG, "ef_attn_block_forward_replay: saved is NULL (pass the buffer "
                                    "holding an earlier training forward's record)");
    return block_forward(blk, p, x, lens, y, saved, ws, 1);
}

/* g[t] += sum over rows i < nv of x[i][t] (x [nv][cols]), rows in order. */
static void add_colsum(float *g, const float *x, int nv, int cols) {
    for (int i = 0; i < nv; i++)
        for (int t = 0; t < cols; t++) g[t] += x[(size_t)i * cols + t];
}

ef_status ef_attn_block_backward(ef_attn_block *blk, const ef_attn_block_params *p, const float *x,
                                 const int32_t *lens, const void *saved, const float *dy, float *dx,
                                 ef_attn_block_grads *g, void *ws) {
    if (!blk || !p || !x || !saved || !dy || !dx || !g)
        return ef_error(EF_ERR_ARG, "ef_attn_block_backward: %s is NULL",
                        !blk     ? "blk"
                        : !p     ? "params"
                        : !x     ? "x"
                        : !saved ? "saved"
                        : !dy    ? "dy"
                        : !dx    ? "dx"
                                 : "grads");
    ef_status st = check_ws(blk, ws, "ef_attn_block_backward");
    if (!st) st = check_lens(blk, lens);
    if (st) return st;
    int n = blk->len, c = blk->dim, d = blk->hd, H = blk->heads;
    const float *q = saved, *k = q + blk->per, *v = k + blk->per, *o = v + blk->per;
    const void *asaved = (const char *)saved + round64(4 * blk->per * sizeof(float));
    float *gO = ws, *gQ = gO + blk->per, *gK = gQ + blk->per, *gV = gK + blk->per;

    /* y = sum_h O_h Wo_h + bo */
    for (int b = 0; b < blk->batch; b++) {
        int nv = lens ? lens[b] : n;
        const float *dyb = dy + (size_t)b * n * c;
        for (int h = 0; h < H; h++) {
            size_t off = ((size_t)b * H + h) * n * d;
            const float *woh = p->wo + (size_t)h * d * c;
            if (nv > 0) {
                if ((st = ef_sgemm_fixed(0, 1, nv, d, c, 1.0f, dyb, c, woh, c, 0.0f, gO + off, d)))
                    return st;
                if ((st = ef_sgemm_fixed(1, 0, d, c, nv, 1.0f, o + off, d, dyb, c, 1.0f,
                                         g->wo + (size_t)h * d * c, c)))
                    return st;
            }
            zero_tail(gO + off, nv, n, d);
        }
        add_colsum(g->bo, dyb, nv, c);
    }
    /* O = attention(Q, K, V) */
    ef_attn_io io = {q, blk->shared_qk ? q : k, v, lens, (float *)o, lens};
    double t0 = ef_now();
    st = ef_attn_backward(blk->attn, &io, asaved, gO, gQ, gK, gV);
    blk->seconds += ef_now() - t0;
    if (st) return st;
    /* Q_h = x Wq_h + bq_h, K_h and V_h alike */
    for (int b = 0; b < blk->batch; b++) {
        int nv = lens ? lens[b] : n;
        const float *xb = x + (size_t)b * n * c;
        float *dxb = dx + (size_t)b * n * c;
        zero_tail(dxb, nv, n, c);
        if (nv == 0) continue;
        int first = 1;
        for (int h = 0; h < H; h++) {
            size_t off = ((size_t)b * H + h) * n * d;
            const float *w[3] = {p->wq, p->wk, p->wv}, *gsrc[3] = {gQ + off, gK + off, gV + off};
            float *gw[3] = {g->wq, g->wk, g->wv}, *gb[3] = {g->bq, g->bk, g->bv};
            for (int x3 = 0; x3 < 3; x3++) {
                if (x3 == 1 && blk->shared_qk) continue; /* k is ignored: Wk gets nothing */
                const float *wh = w[x3] + (size_t)h * d;
                st = ef_sgemm_fixed(0, 1, nv, c, d, 1.0f, gsrc[x3], d, wh, c, first ? 0.0f : 1.0f,
                                    dxb, c);
                if (st) return st;
                first = 0;
                st = ef_sgemm_fixed(1, 0, c, d, nv, 1.0f, xb, c, gsrc[x3], d, 1.0f,
                                    gw[x3] + (size_t)h * d, c);
                if (st) return st;
                add_colsum(gb[x3] + (size_t)h * d, gsrc[x3], nv, d);
            }
        }
    }
    return EF_OK;
}

double ef_attn_block_seconds(const ef_attn_block *blk) { return blk ? blk->seconds : 0; }
void ef_attn_block_reset_seconds(ef_attn_block *blk) {
    if (blk) blk->seconds = 0;
}

size_t ef_attn_block_own_bytes(const ef_attn_block *blk) {
    return blk ? ef_attn_workspace_bytes(blk->attn) - ef_attn_ws_borrowed_bytes(blk->attn) : 0;
}
