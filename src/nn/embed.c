/*
 * embed.c - token embedding and position encodings: sinusoidal (Vaswani et al. 2017), learned
 * (GPT-2's wpe) and axial (Reformer, Kitaev et al. 2020; as HF's AxialPositionEmbeddings).
 * Declarations, shapes and conventions: nn.h; backward derivations: docs/nn.md.
 *
 * Every layer here is a gather (forward) and a scatter-add (backward). The scatter-adds are
 * deterministic without atomics: the work is split over blocks of columns (embedding) or over
 * rows of the table (positions), so each gradient element is summed by one owner in one fixed
 * order (token index n, or batch b then the sequence index).
 *
 * Saved for backward: nothing but the tokens (embedding). Cost O(rows C) each way; the
 * sinusoidal values are computed in double (len C sin/cos, once per position, not per
 * sequence), on the fly or into a table (ef_pos_sinusoidal_table) that a model keeps.
 */
#include "nn/nn.h"

#include <math.h>
#include <string.h>

enum { NN_ITEM_FLOATS = 16384, NN_COL_BLOCK = 64 };

static int64_t rows_per_item(int c) { return EF_MAX(1, NN_ITEM_FLOATS / EF_MAX(c, 1)); }
static int64_t items_for(int64_t rows, int c) {
    const int64_t rpi = rows_per_item(c);
    return (rows + rpi - 1) / rpi;
}

/* ------------------------------------------------------------------------------------------
 * Token embedding
 * ---------------------------------------------------------------------------------------- */
typedef struct emb_ctx {
    float *out;
    const float *in;
    const int32_t *tok;
    int n, c, batch, len;
} emb_ctx;

static ef_status check_tokens(const char *who, const int32_t *tok, int n, int vocab) {
    for (int i = 0; i < n; i++)
        if (tok[i] < 0 || tok[i] >= vocab)
            return ef_error(EF_ERR_ARG, "%s: token %d at index %d is outside [0, vocab=%d)", who,
                            (int)tok[i], i, vocab);
    return EF_OK;
}

static ef_status emb_check(const char *who, const void *a, const void *b, const int32_t *tok, int n,
                           int vocab, int c) {
    if (n < 0 || c < 0 || vocab < 0)
        return ef_error(EF_ERR_SHAPE, "%s: sizes must be >= 0 (n=%d vocab=%d C=%d)", who, n, vocab,
                        c);
    if (n == 0) return EF_OK;
    if (!a || !b || !tok)
        return ef_error(EF_ERR_ARG, "%s: %s is NULL", who, !tok ? "tok" : "a tensor");
    return check_tokens(who, tok, n, vocab);
}

static void emb_forward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const emb_ctx *k = vctx;
    const int64_t rpi = rows_per_item(k->c), r1 = EF_MIN((int64_t)k->n, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++)
        memcpy(k->out + (size_t)r * k->c, k->in + (size_t)k->tok[r] * k->c,
               (size_t)k->c * sizeof(float));
}

ef_status ef_embedding_forward(float *out, const int32_t *tok, const float *table, int n, int vocab,
                               int c) {
    ef_status st = emb_check("embedding_forward", out, table, tok, n, vocab, c);
    if (st || n == 0 || c == 0) return st;
    /* out[r] = table[tok[r]] */
    emb_ctx k = {.out = out, .in = table, .tok = tok, .n = n, .c = c};
    ef_parallel_for(items_for(n, c), ef_threads(), emb_forward_item, &k);
    return EF_OK;
}

static void emb_backward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const emb_ctx *k = vctx;
    const int j0 = (int)item * NN_COL_BLOCK, j1 = EF_MIN(k->c, j0 + NN_COL_BLOCK);
    for (int r = 0; r < k->n; r++) {
        float *d = k->out + (size_t)k->tok[r] * k->c;
        const float *g = k->in + (size_t)r * k->c;
        for (int j = j0; j < j1; j++) d[j] += g[j];
    }
}

ef_status ef_embedding_backward(float *dtable, const float *dout, const int32_t *tok, int n,
                                int vocab, int c) {
    ef_status st = emb_check("embedding_backward", dtable, dout, tok, n, vocab, c);
    if (st || n == 0 || c == 0) return st;
    /* backward of out[r] = table[tok[r]]: dtable[tok[r]] += dout[r], r in order */
    emb_ctx k = {.out = dtable, .in = dout, .tok = tok, .n = n, .c = c};
    ef_parallel_for((c + NN_COL_BLOCK - 1) / NN_COL_BLOCK, ef_threads(), emb_backward_item, &k);
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * Sinusoidal positions
 * ---------------------------------------------------------------------------------------- */
/* pe[t][2i] = sin(t / 10000^(2i/C)), pe[t][2i+1] = cos(t / 10000^(2i/C)), in double, rounded once */
static float sin_value(int64_t t, int j, int c) {
    const double ang = (double)t * exp(-log(10000.0) * (double)(j & ~1) / c);
    return (float)((j & 1) ? cos(ang) : sin(ang));
}

static void sin_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const emb_ctx *k = vctx;
    const int c = k->c;
    const int64_t rpi = rows_per_item(c), t1 = EF_MIN((int64_t)k->len, (item + 1) * rpi);
    for (int64_t t = item * rpi; t < t1; t++)
        for (int j = 0; j < c; j++) {
            const float v = sin_value(t, j, c);
            if (k->batch == 0) /* the table */
                k->out[(size_t)t * c + j] = v;
            else
                for (int b = 0; b < k->batch; b++) k->out[((size_t)b * k->len + t) * c + j] += v;
        }
}

void ef_pos_sinusoidal_forward(float *x, int batch, int len, int c) {
    if (batch <= 0 || len <= 0 || c <= 0) return;
    emb_ctx k = {.out = x, .batch = batch, .len = len, .c = c};
    ef_parallel_for(items_for(len, c), ef_threads(), sin_item, &k);
}

void ef_pos_sinusoidal_table(float *pe, int len, int c) {
    if (len <= 0 || c <= 0) return;
    emb_ctx k = {.out = pe, .batch = 0, .len = len, .c = c};
    ef_parallel_for(items_for(len, c), ef_threads(), sin_item, &k);
}

/* ------------------------------------------------------------------------------------------
 * Learned positions
 * ---------------------------------------------------------------------------------------- */
static ef_status pos_check(const char *who, const void *a, const void *b, int batch, int len,
                           int c) {
    if (batch < 0 || len < 0 || c < 0)
        return ef_error(EF_ERR_SHAPE, "%s: sizes must be >= 0 (batch=%d len=%d C=%d)", who, batch,
                        len, c);
    if (batch && len && c && (!a || !b)) return ef_error(EF_ERR_ARG, "%s: a tensor is NULL", who);
    return EF_OK;
}

static void learned_forward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const emb_ctx *k = vctx;
    const int c = k->c;
    const int64_t rpi = rows_per_item(c);
    const int64_t r1 = EF_MIN((int64_t)k->batch * k->len, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++) {
        float *x = k->out + (size_t)r * c;
        const float *p = k->in + (size_t)(r % k->len) * c;
        for (int j = 0; j < c; j++) x[j] += p[j];
    }
}

ef_status ef_pos_learned_forward(float *x, const float *table, int batch, int len, int max_len,
                                 int c) {
    ef_status st = pos_check("pos_learned_forward", x, table, batch, len, c);
    if (st) return st;
    if (len > max_len)
        return ef_error(EF_ERR_SHAPE, "pos_learned_forward: len=%d exceeds max_len=%d", len,
                        max_len);
    if (!batch || !len || !c) return EF_OK;
    /* x[b][t] += table[t] */
    emb_ctx k = {.out = x, .in = table, .batch = batch, .len = len, .c = c};
    ef_parallel_for(items_for((int64_t)batch * len, c), ef_threads(), learned_forward_item, &k);
    return EF_OK;
}

static void learned_backward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const emb_ctx *k = vctx;
    const int c = k->c;
    const int64_t rpi = rows_per_item(c), t1 = EF_MIN((int64_t)k->len, (item + 1) * rpi);
    for (int64_t t = item * rpi; t < t1; t++) {
        float *d = k->out + (size_t)t * c;
        for (int b = 0; b < k->batch; b++) {
            const float *g = k->in + ((size_t)b * k->len + t) * c;
            for (int j = 0; j < c; j++) d[j] += g[j];
        }
    }
}

ef_status ef_pos_learned_backward(float *dtable, const float *dx, int batch, int len, int max_len,
                                  int c) {
    ef_status st = pos_check("pos_learned_backward", dtable, dx, batch, len, c);
    if (st) return st;
    if (len > max_len)
        return ef_error(EF_ERR_SHAPE, "pos_learned_backward: len=%d exceeds max_len=%d", len,
                        max_len);
    if (!batch || !len || !c) return EF_OK;
    /* backward of x[b][t] += table[t]: dtable[t] += sum_b dx[b][t], b in order */
    emb_ctx k = {.out = dtable, .in = dx, .batch = batch, .len = len, .c = c};
    ef_parallel_for(items_for(len, c), ef_threads(), learned_backward_item, &k);
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * Axial positions
 * ---------------------------------------------------------------------------------------- */
typedef struct axial_ctx {
    float *x, *de1, *de2;
    const float *e1, *e2, *dx;
    int batch, len, c, n1, n2, d1, d2;
} axial_ctx;

static ef_status axial_check(const char *who, const void *x, const void *e1, const void *e2,
                             int batch, int len, int c, int n1, int n2, int d1, int d2) {
    if (batch < 0 || len < 0 || c < 0 || n1 < 0 || n2 < 0 || d1 < 0 || d2 < 0)
        return ef_error(EF_ERR_SHAPE,
                        "%s: sizes must be >= 0 (batch=%d len=%d C=%d n1=%d n2=%d d1=%d d2=%d)",
                        who, batch, len, c, n1, n2, d1, d2);
    if ((int64_t)n1 * n2 < len)
        return ef_error(EF_ERR_SHAPE, "%s: axial factors n1=%d * n2=%d = %lld < len=%d", who, n1,
                        n2, (long long)n1 * n2, len);
    if ((int64_t)d1 + d2 != c)
        return ef_error(EF_ERR_SHAPE, "%s: axial dims d1=%d + d2=%d != C=%d", who, d1, d2, c);
    if (batch && len && c && (!x || (d1 && !e1) || (d2 && !e2)))
        return ef_error(EF_ERR_ARG, "%s: %s is NULL", who, !x ? "x" : (d1 && !e1) ? "e1" : "e2");
    return EF_OK;
}

static void axial_forward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const axial_ctx *k = vctx;
    const int c = k->c, d1 = k->d1, d2 = k->d2;
    const int64_t rpi = rows_per_item(c);
    const int64_t r1 = EF_MIN((int64_t)k->batch * k->len, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++) {
        const int t = (int)(r % k->len);
        float *x = k->x + (size_t)r * c;
        if (d1) { /* e1 may be NULL when d1 = 0 */
            const float *p1 = k->e1 + (size_t)(t / k->n2) * d1;
            for (int j = 0; j < d1; j++) x[j] += p1[j];
        }
        if (d2) {
            const float *p2 = k->e2 + (size_t)(t % k->n2) * d2;
            for (int j = 0; j < d2; j++) x[d1 + j] += p2[j];
        }
    }
}

ef_status ef_pos_axial_forward(float *x, const float *e1, const float *e2, int batch, int len,
                               int c, int n1, int n2, int d1, int d2) {
    ef_status st = axial_check("pos_axial_forward", x, e1, e2, batch, len, c, n1, n2, d1, d2);
    if (st || !batch || !len || !c) return st;
    /* x[b][i*n2 + j] += concat(e1[i], e2[j]) */
    axial_ctx k = {.x = x,
                   .e1 = e1,
                   .e2 = e2,
                   .batch = batch,
                   .len = len,
                   .c = c,
                   .n1 = n1,
                   .n2 = n2,
                   .d1 = d1,
                   .d2 = d2};
    ef_parallel_for(items_for((int64_t)batch * len, c), ef_threads(), axial_forward_item, &k);
    return EF_OK;
}

/* Items [0, n1) own rows i of de1, items [n1, n1 + n2) own rows j of de2. */
static void axial_backward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const axial_ctx *k = vctx;
    const int c = k->c, d1 = k->d1, d2 = k->d2, n2 = k->n2;
    if (item < k->n1) {
        const int i = (int)item;
        float *d = k->de1 + (size_t)i * d1;
        for (int b = 0; b < k->batch; b++)
            for (int j = 0; j < n2 && (int64_t)i * n2 + j < k->len; j++) {
                const float *g = k->dx + ((size_t)b * k->len + (size_t)i * n2 + j) * c;
                for (int m = 0; m < d1; m++) d[m] += g[m];
            }
    } else {
        const int j = (int)(item - k->n1);
        float *d = k->de2 + (size_t)j * d2;
        for (int b = 0; b < k->batch; b++)
            for (int64_t t = j; t < k->len; t += n2) {
                const float *g = k->dx + ((size_t)b * k->len + (size_t)t) * c + d1;
                for (int m = 0; m < d2; m++) d[m] += g[m];
            }
    }
}

ef_status ef_pos_axial_backward(float *de1, float *de2, const float *dx, int batch, int len, int c,
                                int n1, int n2, int d1, int d2) {
    ef_status st = axial_check("pos_axial_backward", dx, de1, de2, batch, len, c, n1, n2, d1, d2);
    if (st || !batch || !len || !c) return st;
    /* backward of x[b][i*n2 + j] += concat(e1[i], e2[j]):
     * de1[i] += sum_{b, j} dx[b][i*n2 + j][0, d1);  de2[j] += sum_{b, i} dx[b][i*n2 + j][d1, C) */
    axial_ctx k = {.de1 = de1,
                   .de2 = de2,
                   .dx = dx,
                   .batch = batch,
                   .len = len,
                   .c = c,
                   .n1 = d1 ? n1 : 0,
                   .n2 = n2,
                   .d1 = d1,
                   .d2 = d2};
    ef_parallel_for((int64_t)k.n1 + (d2 ? n2 : 0), ef_threads(), axial_backward_item, &k);
    return EF_OK;
}
