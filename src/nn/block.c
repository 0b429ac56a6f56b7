/*
 * block.c - the pre-LN residual layer and the reversible layer (block.h has the equations, what
 * is saved and the conventions; docs/reversible.md the derivation and the memory).
 *
 * Residual backward (restating the forward lines, in reverse):
 *   y = h + G(h):   dh = dy + G'(h)^T dy      G recomputed inside ef_ffn_backward, LN2 from h
 *   h = x + F(x):   dx = dh + F'(x)^T dh      LN1 recomputed from x; the attention block's own
 *                                             saved (q, k, v, o, record) was kept by forward
 * Reversible backward (in place; a = activations, d = gradients):
 *   y2 = x2 + G(y1): recompute g = G(y1); d1 = dy1 + G'(y1)^T dy2;  x2 = y2 - g
 *   y1 = x1 + F(x2): recompute f = F(x2) replaying the saved record;
 *                    d2 = dy2 + F'(x2)^T d1;  x1 = y1 - f;  dx1 = d1
 * Cost: forward as the residual layer's; reversible backward adds one forward of F and of G (the
 * feed-forward's forward is run once more than in the residual layer: ef_ffn_backward
 * recomputes only the hidden activation, and the inversion needs the output g).
 *
 * Scratch `ws` (byte offsets ws_*, each region 64-byte aligned; nothing lives between calls):
 *   u, t, w    [B][N][C]  LN output (sub-layer input), sub-layer output, gradients / inference h
 *   mean, rstd [B][N]     the layer norm's statistics
 *   ffn | attn            ONE region of max(ef_ffn_ws_floats * 4, ef_attn_block_ws_bytes) bytes:
 *                         the feed-forward's chunk scratch and the attention block's scratch
 *                         (q, k, v, o in inference; dO, dQ, dK, dV in backward)
 *   bsaved                reversible only: an attention block saved buffer (the forward's q, k,
 *                         v, o + record, then the recomputation's)
 * The ffn and attention scratches may share bytes because each is live only inside its own
 * sub-layer call (ffn_forward / ffn_backward, ef_attn_block_*), and no call of one sub-layer
 * happens inside the other's. Everything else is live across an attention call somewhere:
 *   res forward:   Attn(u) -> t                   (inference: h = w is written after it)
 *   res backward:  Attn'(u, dh) -> w; ln_backward then reads mean, rstd
 *   rev forward:   Attn(u) -> t, into bsaved when training
 *   rev backward:  replay Attn(u) -> t into bsaved, then Attn'(u, bsaved, d1) -> w; t (= f, for
 *                  x1 = y1 - f) and mean, rstd (ln_backward) are read after
 * so u, t, w, mean, rstd and bsaved stay disjoint from the attention scratch.
 */
#include "nn/block.h"

#include "nn/nn.h"

#include <stdlib.h>
#include <string.h>

struct ef_block {
    ef_block_kind kind;
    ef_attn_block *attn;
    int batch, len, dim, ff, chunks;
    float eps;
    size_t act;       /* floats of one [B][N][C] tensor */
    size_t rec;       /* the attention plan's record bytes */
    size_t rec_off;   /* where the record starts in an attention block saved buffer */
    size_t blk_saved; /* ef_attn_block_saved_bytes */
    size_t ws_u, ws_t, ws_w, ws_mean, ws_rstd, ws_ffn, ws_attn, ws_bsaved, ws_total; /* bytes */
};

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

ef_status ef_block_new(ef_block **out, const ef_block_config *cfg) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_block_new: out is NULL");
    *out = NULL;
    if (!cfg || !cfg->attn)
        return ef_error(EF_ERR_ARG, "ef_block_new: %s is NULL", !cfg ? "cfg" : "cfg->attn");
    if (cfg->kind != EF_BLOCK_RESIDUAL && cfg->kind != EF_BLOCK_REVERSIBLE)
        return ef_error(EF_ERR_ARG,
                        "ef_block_new: kind=%d is neither residual (0) nor "
                        "reversible (1)",
                        (int)cfg->kind);
    if (cfg->chunks < 1)
        return ef_error(EF_ERR_ARG, "ef_block_new: chunks=%d must be >= 1", cfg->chunks);
    if (!(cfg->eps > 0))
        return ef_error(EF_ERR_ARG, "ef_block_new: eps=%g must be > 0", (double)cfg->eps);
    if (cfg->ff < 1) return ef_error(EF_ERR_ARG, "ef_block_new: ff=%d must be >= 1", cfg->ff);
    if (cfg->batch < 1 || cfg->len < 1)
        return ef_error(EF_ERR_SHAPE, "ef_block_new: batch=%d and len=%d must be >= 1", cfg->batch,
                        cfg->len);
    ef_attn_block *ab = NULL;
    ef_status st = ef_attn_block_new_sharing(&ab, cfg->attn, cfg->batch, cfg->len, cfg->dim,
                                             cfg->heads, cfg->share ? cfg->share->attn : NULL);
    if (st) return st;
    ef_block *blk = ef_mem_calloc(1, sizeof *blk);
    if (!blk) {
        ef_attn_block_free(ab);
        return ef_error(EF_ERR_NOMEM, "out of memory for a block");
    }
    blk->kind = cfg->kind, blk->attn = ab;
    blk->batch = cfg->batch, blk->len = cfg->len, blk->dim = cfg->dim;
    blk->ff = cfg->ff, blk->chunks = cfg->chunks, blk->eps = cfg->eps;
    blk->act = (size_t)cfg->batch * cfg->len * cfg->dim;
    blk->rec = ef_attn_block_record_bytes(ab);
    blk->rec_off = ef_attn_block_record_offset(ab);
    blk->blk_saved = ef_attn_block_saved_bytes(ab);
    size_t at = 0, act_b = round64(blk->act * sizeof(float));
    size_t rows_b = round64((size_t)cfg->batch * cfg->len * sizeof(float));
    blk->ws_u = at, at += act_b;
    blk->ws_t = at, at += act_b;
    blk->ws_w = at, at += act_b;
    blk->ws_mean = at, at += rows_b;
    blk->ws_rstd = at, at += rows_b;
    /* the feed-forward's and the attention block's scratch share one region (see the top) */
    size_t ffn_b = round64(ef_ffn_ws_floats(cfg->len, cfg->ff, cfg->chunks) * sizeof(float));
    blk->ws_ffn = blk->ws_attn = at, at += EF_MAX(ffn_b, ef_attn_block_ws_bytes(ab));
    blk->ws_bsaved = at;
    if (cfg->kind == EF_BLOCK_REVERSIBLE) at += round64(blk->blk_saved);
    blk->ws_total = at;
    ef_clear_error();
    *out = blk;
    return EF_OK;
}

void ef_block_free(ef_block *blk) {
    if (!blk) return;
    ef_attn_block_free(blk->attn);
    ef_free(blk);
}

ef_block_kind ef_block_get_kind(const ef_block *blk) { return blk ? blk->kind : EF_BLOCK_RESIDUAL; }
ef_attn_block *ef_block_attn(const ef_block *blk) { return blk ? blk->attn : NULL; }

/* residual saved: x, h [B][N][C], then the attention block's saved */
static size_t res_off_h(const ef_block *blk) { return round64(blk->act * sizeof(float)); }
static size_t res_off_attn(const ef_block *blk) { return 2 * round64(blk->act * sizeof(float)); }

size_t ef_block_saved_bytes(const ef_block *blk) {
    if (!blk) return 0;
    if (blk->kind == EF_BLOCK_REVERSIBLE) return EF_MAX((size_t)64, round64(blk->rec));
    return res_off_attn(blk) + blk->blk_saved;
}

size_t ef_block_ws_bytes(const ef_block *blk) { return blk ? blk->ws_total : 0; }

size_t ef_block_stack_saved_bytes(ef_block *const *layers, int n) {
    if (!layers || n < 1 || !layers[0]) return 0;
    size_t total = 0;
    for (int l = 0; l < n; l++) {
        if (!layers[l] || layers[l]->kind != layers[0]->kind) return 0;
        total += ef_block_saved_bytes(layers[l]);
    }
    if (layers[0]->kind == EF_BLOCK_REVERSIBLE) /* the final y1, y2 */
        total += 2 * layers[n - 1]->act * sizeof(float);
    return total;
}

/* ---------------------------------------------------------------------------------------------
 * Helpers: sequences' valid rows
 * ------------------------------------------------------------------------------------------- */
static int valid_rows(const ef_block *blk, const int32_t *lens, int b) {
    return lens ? lens[b] : blk->len;
}

static ef_status check_call(const ef_block *blk, const ef_block_params *p, const int32_t *lens,
                            const void *ws, ef_block_kind kind, const char *fn) {
    if (!blk) return ef_error(EF_ERR_ARG, "%s: blk is NULL", fn);
    if (blk->kind != kind)
        return ef_error(EF_ERR_ARG, "%s: the layer was made %s", fn,
                        blk->kind == EF_BLOCK_REVERSIBLE ? "reversible" : "residual");
    if (!p) return ef_error(EF_ERR_ARG, "%s: params is NULL", fn);
    int sqk = ef_attn_block_shared_qk(blk->attn); /* lsh: Wk, bk unused */
    const void *need[] = {p->ln1_g,   p->ln1_b,   p->ln2_g,   p->ln2_b,   p->w1,      p->b1,
                          p->w2,      p->b2,      p->attn.wq, p->attn.bq, p->attn.wv, p->attn.bv,
                          p->attn.wo, p->attn.bo, p->attn.wk, p->attn.bk};
    const char *names[] = {"ln1_g",   "ln1_b",   "ln2_g",   "ln2_b",   "w1",      "b1",
                           "w2",      "b2",      "attn.wq", "attn.bq", "attn.wv", "attn.bv",
                           "attn.wo", "attn.bo", "attn.wk", "attn.bk"};
    for (int i = 0; i < (sqk ? 14 : 16); i++)
        if (!need[i]) return ef_error(EF_ERR_ARG, "%s: params->%s is NULL", fn, names[i]);
    if (!ws)
        return ef_error(EF_ERR_ARG, "%s: ws is NULL (ef_block_ws_bytes = %zu bytes needed)", fn,
                        blk->ws_total);
    if ((uintptr_t)ws % 64 != 0)
        return ef_error(EF_ERR_ARG, "%s: ws=%p is not 64-byte aligned (use ef_malloc)", fn, ws);
    for (int b = 0; lens && b < blk->batch; b++)
        if (lens[b] < 0 || lens[b] > blk->len)
            return ef_error(EF_ERR_ARG, "%s: lens[%d]=%d is outside [0, len=%d]", fn, b, lens[b],
                            blk->len);
    return EF_OK;
}

static ef_status check_grads(const ef_block *blk, const ef_block_grads *g, const char *fn) {
    if (!g) return ef_error(EF_ERR_ARG, "%s: grads is NULL", fn);
    int sqk = ef_attn_block_shared_qk(blk->attn);
    const void *need[] = {g->ln1_g,   g->ln1_b,   g->ln2_g,   g->ln2_b,   g->w1,      g->b1,
                          g->w2,      g->b2,      g->attn.wq, g->attn.bq, g->attn.wv, g->attn.bv,
                          g->attn.wo, g->attn.bo, g->attn.wk, g->attn.bk};
    const char *names[] = {"ln1_g",   "ln1_b",   "ln2_g",   "ln2_b",   "w1",      "b1",
                           "w2",      "b2",      "attn.wq", "attn.bq", "attn.wv", "attn.bv",
                           "attn.wo", "attn.bo", "attn.wk", "attn.bk"};
    for (int i = 0; i < (sqk ? 14 : 16); i++)
        if (!need[i]) return ef_error(EF_ERR_ARG, "%s: grads->%s is NULL", fn, names[i]);
    return EF_OK;
}

/* out = a + b (sign > 0) or a - b (sign < 0) on the valid rows; out = a on the padded rows.
 * out may be a; element-wise, so any thread count gives the same bits. Work items are blocks of
 * about ADD_FLOATS floats of the [B*N] rows (one item, run in the caller, for small tensors). */
typedef struct addrows_ctx {
    float *out;
    const float *a, *b;
    const int32_t *lens;
    int len, c, sign;
    int64_t rows, per_item;
} addrows_ctx;
enum { ADD_FLOATS = 16384 };

static void addrows_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const addrows_ctx *k = vctx;
    int64_t r1 = EF_MIN(k->rows, (item + 1) * k->per_item);
    for (int64_t r = item * k->per_item; r < r1; r++) {
        int b = (int)(r / k->len), i = (int)(r % k->len);
        size_t off = (size_t)r * k->c;
        float *o = k->out + off;
        const float *x = k->a + off, *y = k->b + off;
        if (i >= (k->lens ? k->lens[b] : k->len)) {
            if (o != x) memcpy(o, x, sizeof(float) * (size_t)k->c);
        } else if (k->sign > 0) {
            for (int j = 0; j < k->c; j++) o[j] = x[j] + y[j];
        } else {
            for (int j = 0; j < k->c; j++) o[j] = x[j] - y[j];
        }
    }
}

static void add_rows(const ef_block *blk, float *out, const float *a, const float *b, int sign,
                     const int32_t *lens) {
    addrows_ctx k = {out,
                     a,
                     b,
                     lens,
                     blk->len,
                     blk->dim,
                     sign,
                     (int64_t)blk->batch * blk->len,
                     EF_MAX(1, ADD_FLOATS / EF_MAX(blk->dim, 1))};
    ef_parallel_for((k.rows + k.per_item - 1) / k.per_item, ef_threads(), addrows_item, &k);
}

static void zero_tail(float *x, int r0, int rows, int cols) {
    if (rows > r0) memset(x + (size_t)r0 * cols, 0, sizeof(float) * (size_t)(rows - r0) * cols);
}

/* out = LN(inp) per sequence on its valid rows (padded rows of out zero); stats per row. */
static void ln_forward(const ef_block *blk, float *out, float *mean, float *rstd, const float *inp,
                       const float *gain, const float *bias, const int32_t *lens) {
    int n = blk->len, c = blk->dim;
    for (int b = 0; b < blk->batch; b++) {
        int nv = valid_rows(blk, lens, b);
        size_t off = (size_t)b * n * c;
        ef_layernorm_forward(out + off, mean + (size_t)b * n, rstd + (size_t)b * n, inp + off, gain,
                             bias, nv, c, blk->eps);
        zero_tail(out + off, nv, n, c);
    }
}

/* dinp (may be dout) of LN per sequence, valid rows only; dgain, dbias accumulate. */
static void ln_backward(const ef_block *blk, float *dinp, float *dgain, float *dbias,
                        const float *dout, const float *inp, const float *mean, const float *rstd,
                        const float *gain, const int32_t *lens) {
    int n = blk->len, c = blk->dim;
    for (int b = 0; b < blk->batch; b++) {
        size_t off = (size_t)b * n * c;
        ef_layernorm_backward(dinp + off, dgain, dbias, dout + off, inp + off, mean + (size_t)b * n,
                              rstd + (size_t)b * n, gain, valid_rows(blk, lens, b), c);
    }
}

/* out = FFN(inp) per sequence on its valid rows (padded rows of out zero). */
static ef_status ffn_forward(const ef_block *blk, const ef_block_params *p, float *out,
                             const float *inp, float *fws, const int32_t *lens) {
    int n = blk->len, c = blk->dim;
    for (int b = 0; b < blk->batch; b++) {
        int nv = valid_rows(blk, lens, b);
        size_t off = (size_t)b * n * c;
        if (nv > 0) {
            ef_status st = ef_ffn_forward(out + off, inp + off, p->w1, p->b1, p->w2, p->b2, fws, nv,
                                          c, blk->ff, blk->chunks);
            if (st) return st;
        }
        zero_tail(out + off, nv, n, c);
    }
    return EF_OK;
}

/* dinp = FFN'(inp)^T dout per sequence on its valid rows; parameter gradients accumulate. */
static ef_status ffn_backward(const ef_block *blk, const ef_block_params *p, ef_block_grads *g,
                              float *dinp, const float *dout, const float *inp, float *fws,
                              const int32_t *lens) {
    int n = blk->len, c = blk->dim;
    for (int b = 0; b < blk->batch; b++) {
        int nv = valid_rows(blk, lens, b);
        size_t off = (size_t)b * n * c;
        if (nv > 0) {
            ef_status st =
                ef_ffn_backward(dinp + off, g->w1, g->b1, g->w2, g->b2, dout + off, inp + off,
                                p->w1, p->b1, p->w2, fws, nv, c, blk->ff, blk->chunks);
            if (st) return st;
        }
    }
    return EF_OK;
}

typedef struct ws_view {
    float *u, *t, *w, *mean, *rstd, *ffn;
    void *attn; /* the attention block's scratch: the same bytes as ffn */
    void *bsaved;
} ws_view;

static ws_view ws_of(const ef_block *blk, void *ws) {
    char *base = ws;
    ws_view v = {(float *)(base + blk->ws_u),
                 (float *)(base + blk->ws_t),
                 (float *)(base + blk->ws_w),
                 (float *)(base + blk->ws_mean),
                 (float *)(base + blk->ws_rstd),
                 (float *)(base + blk->ws_ffn),
                 base + blk->ws_attn,
                 base + blk->ws_bsaved};
    return v;
}

/* ---------------------------------------------------------------------------------------------
 * Residual layer
 * ------------------------------------------------------------------------------------------- */
ef_status ef_block_res_forward(ef_block *blk, const ef_block_params *p, const float *x,
                               const int32_t *lens, float *y, void *saved, void *ws) {
    const char *fn = "ef_block_res_forward";
    ef_status st = check_call(blk, p, lens, ws, EF_BLOCK_RESIDUAL, fn);
    if (st) return st;
    if (!x || !y) return ef_error(EF_ERR_ARG, "%s: %s is NULL", fn, !x ? "x" : "y");
    if (saved && (uintptr_t)saved % 64 != 0)
        return ef_error(EF_ERR_ARG, "%s: saved=%p is not 64-byte aligned", fn, saved);
    ws_view v = ws_of(blk, ws);
    float *xs = saved ? (float *)saved : NULL;
    float *h = saved ? (float *)((char *)saved + res_off_h(blk)) : v.w;
    void *asaved = saved ? (char *)saved + res_off_attn(blk) : NULL;
    if (xs) memcpy(xs, x, blk->act * sizeof(float));
    /* h = x + Attn(LN1(x)) */
    ln_forward(blk, v.u, v.mean, v.rstd, x, p->ln1_g, p->ln1_b, lens);
    if ((st = ef_attn_block_forward(blk->attn, &p->attn, v.u, lens, v.t, asaved, v.attn)))
        return st;
    add_rows(blk, h, x, v.t, 1, lens);
    /* y = h + FFN(LN2(h)) */
    ln_forward(blk, v.u, v.mean, v.rstd, h, p->ln2_g, p->ln2_b, lens);
    if ((st = ffn_forward(blk, p, v.t, v.u, v.ffn, lens))) return st;
    add_rows(blk, y, h, v.t, 1, lens);
    return EF_OK;
}

ef_status ef_block_res_backward(ef_block *blk, const ef_block_params *p, const float *dy,
                                const int32_t *lens, const void *saved, float *dx,
                                ef_block_grads *g, void *ws) {
    const char *fn = "ef_block_res_backward";
    ef_status st = check_call(blk, p, lens, ws, EF_BLOCK_RESIDUAL, fn);
    if (!st) st = check_grads(blk, g, fn);
    if (st) return st;
    if (!dy || !dx || !saved)
        return ef_error(EF_ERR_ARG, "%s: %s is NULL", fn, !dy ? "dy" : !dx ? "dx" : "saved");
    if ((uintptr_t)saved % 64 != 0)
        return ef_error(EF_ERR_ARG, "%s: saved=%p is not 64-byte aligned", fn, saved);
    ws_view v = ws_of(blk, ws);
    const float *x = saved, *h = (const float *)((const char *)saved + res_off_h(blk));
    const void *asaved = (const char *)saved + res_off_attn(blk);
    /* y = h + FFN(LN2(h)):  dh = dy + LN2'^T FFN'^T dy */
    ln_forward(blk, v.u, v.mean, v.rstd, h, p->ln2_g, p->ln2_b, lens);
    if ((st = ffn_backward(blk, p, g, v.w, dy, v.u, v.ffn, lens))) return st;
    ln_backward(blk, v.w, g->ln2_g, g->ln2_b, v.w, h, v.mean, v.rstd, p->ln2_g, lens);
    add_rows(blk, dx, dy, v.w, 1, lens); /* dx holds dh */
    /* h = x + Attn(LN1(x)):  dx = dh + LN1'^T Attn'^T dh */
    ln_forward(blk, v.u, v.mean, v.rstd, x, p->ln1_g, p->ln1_b, lens);
    st = ef_attn_block_backward(blk->attn, &p->attn, v.u, lens, asaved, dx, v.w, &g->attn, v.attn);
    if (st) return st;
    ln_backward(blk, v.w, g->ln1_g, g->ln1_b, v.w, x, v.mean, v.rstd, p->ln1_g, lens);
    add_rows(blk, dx, dx, v.w, 1, lens);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Reversible layer
 * ------------------------------------------------------------------------------------------- */
ef_status ef_block_rev_forward(ef_block *blk, const ef_block_params *p, float *x1, float *x2,
                               const int32_t *lens, void *saved, void *ws) {
    const char *fn = "ef_block_rev_forward";
    ef_status st = check_call(blk, p, lens, ws, EF_BLOCK_REVERSIBLE, fn);
    if (st) return st;
    if (!x1 || !x2) return ef_error(EF_ERR_ARG, "%s: %s is NULL", fn, !x1 ? "x1" : "x2");
    ws_view v = ws_of(blk, ws);
    /* y1 = x1 + Attn(LN1(x2)) */
    ln_forward(blk, v.u, v.mean, v.rstd, x2, p->ln1_g, p->ln1_b, lens);
    st =
        ef_attn_block_forward(blk->attn, &p->attn, v.u, lens, v.t, saved ? v.bsaved : NULL, v.attn);
    if (st) return st;
    if (saved) memcpy(saved, (char *)v.bsaved + blk->rec_off, blk->rec);
    add_rows(blk, x1, x1, v.t, 1, lens);
    /* y2 = x2 + FFN(LN2(y1)) */
    ln_forward(blk, v.u, v.mean, v.rstd, x1, p->ln2_g, p->ln2_b, lens);
    if ((st = ffn_forward(blk, p, v.t, v.u, v.ffn, lens))) return st;
    add_rows(blk, x2, x2, v.t, 1, lens);
    return EF_OK;
}

ef_status ef_block_rev_backward(ef_block *blk, const ef_block_params *p, float *a1, float *a2,
                                float *d1, float *d2, const int32_t *lens, const void *saved,
                                ef_block_grads *g, void *ws) {
    const char *fn = "ef_block_rev_backward";
    ef_status st = check_call(blk, p, lens, ws, EF_BLOCK_REVERSIBLE, fn);
    if (!st) st = check_grads(blk, g, fn);
    if (st) return st;
    if (!a1 || !a2 || !d1 || !d2 || !saved)
        return ef_error(EF_ERR_ARG, "%s: %s is NULL", fn,
                        !a1   ? "a1"
                        : !a2 ? "a2"
                        : !d1 ? "d1"
                        : !d2 ? "d2"
                              : "saved");
    ws_view v = ws_of(blk, ws);
    /* y2 = x2 + G(y1):  recompute g = FFN(LN2(y1)); d1 = dy1 + LN2'^T FFN'^T dy2; x2 = y2 - g */
    ln_forward(blk, v.u, v.mean, v.rstd, a1, p->ln2_g, p->ln2_b, lens);
    if ((st = ffn_forward(blk, p, v.t, v.u, v.ffn, lens))) return st;
    if ((st = ffn_backward(blk, p, g, v.w, d2, v.u, v.ffn, lens))) return st;
    ln_backward(blk, v.w, g->ln2_g, g->ln2_b, v.w, a1, v.mean, v.rstd, p->ln2_g, lens);
    add_rows(blk, d1, d1, v.w, 1, lens);
    add_rows(blk, a2, a2, v.t, -1, lens);
    /* y1 = x1 + F(x2):  recompute f = Attn(LN1(x2)) with the forward's choices;
     *                   d2 = dy2 + LN1'^T Attn'^T d1;  x1 = y1 - f;  dx1 = d1 */
    memcpy((char *)v.bsaved + blk->rec_off, saved, blk->rec);
    ln_forward(blk, v.u, v.mean, v.rstd, a2, p->ln1_g, p->ln1_b, lens);
    st = ef_attn_block_forward_replay(blk->attn, &p->attn, v.u, lens, v.t, v.bsaved, v.attn);
    if (st) return st;
    st =
        ef_attn_block_backward(blk->attn, &p->attn, v.u, lens, v.bsaved, d1, v.w, &g->attn, v.attn);
    if (st) return st;
    ln_backward(blk, v.w, g->ln1_g, g->ln1_b, v.w, a2, v.mean, v.rstd, p->ln1_g, lens);
    add_rows(blk, d2, d2, v.w, 1, lens);
    add_rows(blk, a1, a1, v.t, -1, lens);
    return EF_OK;
}
