/*
 * layers.c - the dense layers that act on rows of activations: linear, layer norm, GELU and the
 * chunked feed-forward layer (Reformer, Kitaev et al. 2020, section 3). Declarations, shapes
 * and conventions: nn.h; backward derivations: docs/nn.md.
 *
 * Saved for backward: linear and the feed-forward layer need only their input (the feed-forward
 * layer recomputes its hidden activation chunk by chunk); layer norm saves mean and rstd per
 * row; GELU needs its input.
 *
 * Determinism: row-wise loops (layer norm, GELU, bias add) run through ef_parallel_for on
 * blocks of rows whose size depends only on the shape; the sums over rows (bias and gain
 * gradients) are split over blocks of columns, each summing every row in order, so every
 * output element has one owner and one summation order. Products: the input gradients
 * dout W^T go through ef_sgemm_fixed (single-threaded products on fixed blocks of rows):
 * oneDNN's multi-threaded transposed-B product gives different bits with 1 and 2 threads once
 * k is large (measured, oneDNN 2.6: 4096x256x1024, 512x256x1024, 4096x512x2048 NT), and the
 * fixed blocks were as fast (155-177 against 124-148 GFLOP/s at 4096x256x1024). The forward
 * products (NN) and the weight gradients (TN, k = rows) stay plain ef_sgemm calls: bitwise
 * equal with 1 and 2 threads at every shape tried (up to 4096x1024x256 NN, 512x2048x8192 and
 * 64x64x65536 TN), and the fixed form would run a TN weight gradient with i <= 256 on one
 * thread, or lose 20 % on the 4096x1024x256 NN product. tests/test_nn.c checks 1 vs 2 threads.
 *
 * Cost: linear 2 n i o flops forward, 4 n i o backward; layer norm and GELU O(n C); the
 * feed-forward layer 4 n C ff forward, 10 n C ff backward (the 8 of its two linear backwards
 * plus 2 to recompute the chunk's pre-activation; h W2 is not recomputed).
 */
#include "nn/nn.h"

#include "core/vec.h"

#include <math.h>
#include <string.h>

/* Elements per parallel work item: a block of rows of about this many floats. */
enum { NN_ITEM_FLOATS = 16384, NN_COL_BLOCK = 64 };

static int64_t rows_per_item(int c) { return EF_MAX(1, NN_ITEM_FLOATS / EF_MAX(c, 1)); }

static ef_status check_dims(const char *who, int n, int a, int b) {
    if (n < 0 || a < 0 || b < 0)
        return ef_error(EF_ERR_SHAPE, "%s: sizes must be >= 0 (got %d, %d, %d)", who, n, a, b);
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * Shared row helpers
 * ---------------------------------------------------------------------------------------- */
typedef struct rows_ctx {
    float *x;       /* [n][c] */
    const float *v; /* [c]: the row vector to add */
    float *acc;     /* [c]: column sums (colsum) */
    const float *y; /* [n][c]: rows summed (colsum) */
    int n, c;
} rows_ctx;

static void add_row_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const rows_ctx *k = vctx;
    const int64_t rpi = rows_per_item(k->c);
    const int64_t r1 = EF_MIN((int64_t)k->n, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++) {
        float *xr = k->x + (size_t)r * k->c;
        for (int j = 0; j < k->c; j++) xr[j] += k->v[j];
    }
}

/* x [n][c] += v [c] on every row */
static void add_row_vector(float *x, const float *v, int n, int c) {
    rows_ctx k = {.x = x, .v = v, .n = n, .c = c};
    const int64_t rpi = rows_per_item(c);
    ef_parallel_for(((int64_t)n + rpi - 1) / rpi, ef_threads(), add_row_item, &k);
}

static void colsum_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const rows_ctx *k = vctx;
    const int j0 = (int)item * NN_COL_BLOCK, j1 = EF_MIN(k->c, j0 + NN_COL_BLOCK);
    float *acc = k->acc;
    for (int r = 0; r < k->n; r++) {
        const float *yr = k->y + (size_t)r * k->c;
        for (int j = j0; j < j1; j++) acc[j] += yr[j];
    }
}

/* acc [c] += sum over rows r = 0, 1, ..., n-1 (in that order) of y [n][c]. The order makes the
 * sum over a whole matrix equal to the sums over consecutive chunks of its rows, bitwise. */
static void colsum_add(float *acc, const float *y, int n, int c) {
    rows_ctx k = {.acc = acc, .y = y, .n = n, .c = c};
    ef_parallel_for((c + NN_COL_BLOCK - 1) / NN_COL_BLOCK, ef_threads(), colsum_item, &k);
}

/* ------------------------------------------------------------------------------------------
 * Linear
 * ---------------------------------------------------------------------------------------- */
ef_status ef_linear_forward(float *out, const float *inp, const float *w, const float *b, int n,
                            int i, int o) {
    ef_status st = check_dims("linear_forward", n, i, o);
    if (st) return st;
    if (n == 0 || o == 0) return EF_OK;
    if (!out || !inp || !w)
        return ef_error(EF_ERR_ARG, "linear_forward: %s is NULL",
                        !out   ? "out"
                        : !inp ? "inp"
                               : "w");
    /* out = inp @ w + b */
    st = ef_sgemm(0, 0, n, o, i, 1.0f, inp, EF_MAX(i, 1), w, o, 0.0f, out, o);
    if (st) return st;
    if (b) add_row_vector(out, b, n, o);
    return EF_OK;
}

ef_status ef_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, int n, int i, int o) {
    ef_status st = check_dims("linear_backward", n, i, o);
    if (st) return st;
    if (n == 0 || i == 0) return EF_OK;
    if (o == 0) { /* out has no columns: dinp = 0 */
        if (dinp) memset(dinp, 0, (size_t)n * i * sizeof(float));
        return EF_OK;
    }
    if (!dw || !dout || !inp || (dinp && !w))
        return ef_error(EF_ERR_ARG, "linear_backward: %s is NULL",
                        !dw     ? "dw"
                        : !dout ? "dout"
                        : !inp  ? "inp"
                                : "w");
    /* backward of out = inp @ w + b:
     * dinp = dout @ w^T */
    if (dinp) {
        st = ef_sgemm_fixed(0, 1, n, i, o, 1.0f, dout, o, w, o, 0.0f, dinp, i);
        if (st) return st;
    }
    /* dw += inp^T @ dout */
    st = ef_sgemm(1, 0, i, o, n, 1.0f, inp, i, dout, o, 1.0f, dw, o);
    if (st) return st;
    /* db += column sums of dout */
    if (db) colsum_add(db, dout, n, o);
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * Layer norm
 * ---------------------------------------------------------------------------------------- */
typedef struct ln_ctx {
    float *out, *mean, *rstd, *dinp, *dgain, *dbias;
    const float *inp, *gain, *bias, *dout, *cmean, *crstd;
    int n, c;
    float eps;
} ln_ctx;

/* Row reductions of the layer norm, EF_VL lanes at a time (the tail in the first lanes), then
 * the lanes summed in order: a fixed order for a given c, so results do not depend on threads.
 * sum_dev2 = sum_j (x_j - m)^2;  sum_ab: a = sum_j d_j, b = sum_j d_j (x_j - m) s. */
EF_INLINE float lanes_sum(vf v) {
    float t = 0.0f;
    for (int l = 0; l < EF_VL; l++) t += v[l];
    return t;
}
EF_INLINE vf tail_load(const float *x, int n) { /* n < EF_VL floats, the other lanes 0 */
    float buf[EF_VL] __attribute__((aligned(64))) = {0};
    memcpy(buf, x, (size_t)n * sizeof(float));
    return vf_load(buf);
}
static float row_sum(const float *x, int c) {
    vf acc = vf_set1(0.0f);
    int j = 0;
    for (; j + EF_VL <= c; j += EF_VL) acc += vf_loadu(x + j);
    if (j < c) acc += tail_load(x + j, c - j);
    return lanes_sum(acc);
}
static float row_sum_dev2(const float *x, float m, int c) {
    vf acc = vf_set1(0.0f);
    int j = 0;
    for (; j + EF_VL <= c; j += EF_VL) {
        vf d = vf_loadu(x + j) - m;
        acc += d * d;
    }
    if (j < c) {
        vi live = vi_iota() < (c - j); /* padding lanes would add m^2 */
        vf d = vf_select(live, tail_load(x + j, c - j) - m, vf_set1(0.0f));
        acc += d * d;
    }
    return lanes_sum(acc);
}
static void row_sum_ab(const float *d, const float *x, float m, float s, int c, float *a,
                       float *b) {
    vf va = vf_set1(0.0f), vb = vf_set1(0.0f);
    int j = 0;
    for (; j + EF_VL <= c; j += EF_VL) {
        vf dj = vf_loadu(d + j);
        va += dj;
        vb += dj * ((vf_loadu(x + j) - m) * s);
    }
    if (j < c) {
        vf dj = tail_load(d + j, c - j); /* 0 in the padding lanes: they add nothing */
        va += dj;
        vb += dj * ((tail_load(x + j, c - j) - m) * s);
    }
    *a = lanes_sum(va), *b = lanes_sum(vb);
}

static void ln_forward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const ln_ctx *k = vctx;
    const int c = k->c;
    const int64_t rpi = rows_per_item(c);
    const int64_t r1 = EF_MIN((int64_t)k->n, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++) {
        const float *x = k->inp + (size_t)r * c;
        float *y = k->out + (size_t)r * c;
        const float m = row_sum(x, c) / (float)c;
        /* two passes: no cancellation for rows with a large mean */
        const float v = row_sum_dev2(x, m, c) / (float)c;
        const float s = 1.0f / sqrtf(v + k->eps);
        if (k->mean) k->mean[r] = m, k->rstd[r] = s;
        for (int j = 0; j < c; j++) y[j] = (x[j] - m) * s * k->gain[j] + k->bias[j];
    }
}

void ef_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gain,
                          const float *bias, int n, int c, float eps) {
    if (n <= 0 || c <= 0) return;
    ln_ctx k = {.out = out,
                .mean = mean && rstd ? mean : NULL,
                .rstd = rstd,
                .inp = inp,
                .gain = gain,
                .bias = bias,
                .n = n,
                .c = c,
                .eps = eps};
    const int64_t rpi = rows_per_item(c);
    ef_parallel_for(((int64_t)n + rpi - 1) / rpi, ef_threads(), ln_forward_item, &k);
}

static void ln_backward_rows(void *vctx, int64_t item, int tid) {
    (void)tid;
    const ln_ctx *k = vctx;
    const int c = k->c;
    const int64_t rpi = rows_per_item(c);
    const int64_t r1 = EF_MIN((int64_t)k->n, (item + 1) * rpi);
    for (int64_t r = item * rpi; r < r1; r++) {
        const float *x = k->inp + (size_t)r * c, *dy = k->dout + (size_t)r * c;
        float *dx = k->dinp + (size_t)r * c;
        const float m = k->cmean[r], s = k->crstd[r];
        /* forward: y = xh * gain + bias, xh = (x - mean) * rstd
         * dxh = dy * gain; dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))
         * dxh is stored in dx (rounded once, read back as that value in both places: with FMA
         * contraction a recomputed dy * gain would differ from the one in the mean, and
         * rstd * (dxh - a) would amplify the difference, e.g. C = 1 must give exactly 0) */
        float a, b;
        for (int j = 0; j < c; j++) dx[j] = dy[j] * k->gain[j]; /* dx may alias dy */
        row_sum_ab(dx, x, m, s, c, &a, &b);
        a /= (float)c;
        b /= (float)c;
        for (int j = 0; j < c; j++) dx[j] = s * (dx[j] - a - ((x[j] - m) * s) * b);
    }
}

static void ln_backward_cols(void *vctx, int64_t item, int tid) {
    (void)tid;
    const ln_ctx *k = vctx;
    const int c = k->c, j0 = (int)item * NN_COL_BLOCK, j1 = EF_MIN(c, j0 + NN_COL_BLOCK);
    /* dgain += sum_rows dy * xh;  dbias += sum_rows dy    (rows in order) */
    for (int r = 0; r < k->n; r++) {
        const float *x = k->inp + (size_t)r * c, *dy = k->dout + (size_t)r * c;
        const float m = k->cmean[r], s = k->crstd[r];
        for (int j = j0; j < j1; j++) {
            k->dgain[j] += dy[j] * ((x[j] - m) * s);
            k->dbias[j] += dy[j];
        }
    }
}

void ef_layernorm_backward(float *dinp, float *dgain, float *dbias, const float *dout,
                           const float *inp, const float *mean, const float *rstd,
                           const float *gain, int n, int c) {
    if (n <= 0 || c <= 0) return;
    ln_ctx k = {.dinp = dinp,
                .dgain = dgain,
                .dbias = dbias,
                .dout = dout,
                .inp = inp,
                .cmean = mean,
                .crstd = rstd,
                .gain = gain,
                .n = n,
                .c = c};
    /* parameter sums first: dinp may alias dout */
    ef_parallel_for((c + NN_COL_BLOCK - 1) / NN_COL_BLOCK, ef_threads(), ln_backward_cols, &k);
    const int64_t rpi = rows_per_item(c);
    ef_parallel_for(((int64_t)n + rpi - 1) / rpi, ef_threads(), ln_backward_rows, &k);
}

/* ------------------------------------------------------------------------------------------
 * GELU (tanh approximation)
 * ---------------------------------------------------------------------------------------- */
#define GELU_K 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* With s = sigmoid(2u) = 1 / (1 + exp(-2u)):  0.5 (1 + tanh(u)) = s  and  1 - tanh(u)^2 =
 * 4 s (1 - s), so
 *   gelu(x)  = x s
 *   gelu'(x) = s + 2 x s (1 - s) k (1 + 3 a x^2)
 * computed EF_VL lanes at a time with the kernels' vector exp (vec.h, relative error < 2e-7):
 * libm's scalar tanhf was a fifth of a training step. exp(-2u) = inf for very negative x gives
 * s = 0 (gelu = -0, gelu' = 0), exp = 0 for large x gives s = 1; NaN stays NaN. The tail of
 * an array goes through the same vector code on a padded copy, so every element is computed
 * alike whatever its position. */
EF_INLINE vf gelu_s(vf x) {
    vf u = GELU_K * (x + GELU_A * x * x * x);
    return 1.0f / (1.0f + vf_exp(-2.0f * u));
}
EF_INLINE vf gelu_v(vf x) { return x * gelu_s(x); }
EF_INLINE vf gelu_grad_v(vf x) {
    vf s = gelu_s(x);
    return s + 2.0f * x * s * (1.0f - s) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
}

typedef struct gelu_ctx {
    float *out;
    const float *inp, *dout;
    size_t n;
} gelu_ctx;

static void gelu_forward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const gelu_ctx *k = vctx;
    const size_t i0 = (size_t)item * NN_ITEM_FLOATS, i1 = EF_MIN(k->n, i0 + NN_ITEM_FLOATS);
    size_t i = i0;
    for (; i + EF_VL <= i1; i += EF_VL) vf_storeu(k->out + i, gelu_v(vf_loadu(k->inp + i)));
    if (i < i1) {
        float y[EF_VL] __attribute__((aligned(64)));
        vf_store(y, gelu_v(tail_load(k->inp + i, (int)(i1 - i))));
        memcpy(k->out + i, y, (i1 - i) * sizeof(float));
    }
}

static void gelu_backward_item(void *vctx, int64_t item, int tid) {
    (void)tid;
    const gelu_ctx *k = vctx;
    const size_t i0 = (size_t)item * NN_ITEM_FLOATS, i1 = EF_MIN(k->n, i0 + NN_ITEM_FLOATS);
    /* backward of out = gelu(inp): dinp = gelu'(inp) * dout (out may alias inp or dout) */
    size_t i = i0;
    for (; i + EF_VL <= i1; i += EF_VL)
        vf_storeu(k->out + i, gelu_grad_v(vf_loadu(k->inp + i)) * vf_loadu(k->dout + i));
    if (i < i1) {
        const int n = (int)(i1 - i);
        float y[EF_VL] __attribute__((aligned(64)));
        vf_store(y, gelu_grad_v(tail_load(k->inp + i, n)) * tail_load(k->dout + i, n));
        memcpy(k->out + i, y, (size_t)n * sizeof(float));
    }
}

void ef_gelu_forward(float *out, const float *inp, size_t n) {
    gelu_ctx k = {.out = out, .inp = inp, .n = n};
    ef_parallel_for((int64_t)((n + NN_ITEM_FLOATS - 1) / NN_ITEM_FLOATS), ef_threads(),
                    gelu_forward_item, &k);
}

void ef_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    gelu_ctx k = {.out = dinp, .inp = inp, .dout = dout, .n = n};
    ef_parallel_for((int64_t)((n + NN_ITEM_FLOATS - 1) / NN_ITEM_FLOATS), ef_threads(),
                    gelu_backward_item, &k);
}

/* ------------------------------------------------------------------------------------------
 * Feed-forward, chunked
 *
 * Forward per chunk of R rows (ws: hp [R][ff]):
 *   hp = inp_R w1 + b1;  hp = gelu(hp);  out_R = hp w2 + b2
 * Backward per chunk (ws: hp [R][ff], h [R][ff]):
 *   hp = inp_R w1 + b1;  h = gelu(hp)                 recomputed
 *   dw2 += h^T dout_R                                  then h is reused for dh:
 *   h = dout_R w2^T  (dh);  hp = gelu'(hp) * dh  (dhp)
 *   dw1 += inp_R^T dhp;  db1 += colsum(dhp);  dinp_R = dhp w1^T
 * db2 += colsum(dout) once over all rows. The bias column sums accumulate straight into db1,
 * db2 with rows in order, so they do not depend on the chunking.
 * The linear layers are called as the same functions the unchunked layer would use, so a row's
 * arithmetic is the same in every chunking.
 * ---------------------------------------------------------------------------------------- */
static int ffn_chunk_rows(int n, int chunks) { return (int)(((int64_t)n + chunks - 1) / chunks); }

size_t ef_ffn_ws_floats(int n, int ff, int chunks) {
    if (n <= 0 || chunks <= 0 || ff <= 0) return 0;
    return 2 * (size_t)ffn_chunk_rows(n, chunks) * (size_t)ff;
}

static ef_status ffn_check(const char *who, int n, int c, int ff, int chunks) {
    ef_status st = check_dims(who, n, c, ff);
    if (st) return st;
    if (chunks < 1) return ef_error(EF_ERR_ARG, "%s: chunks=%d must be >= 1", who, chunks);
    return EF_OK;
}

ef_status ef_ffn_forward(float *out, const float *inp, const float *w1, const float *b1,
                         const float *w2, const float *b2, float *ws, int n, int c, int ff,
                         int chunks) {
    ef_status st = ffn_check("ffn_forward", n, c, ff, chunks);
    if (st || n == 0 || c == 0) return st;
    if (ff == 0) { /* no hidden units: out = b2 */
        if (!out) return ef_error(EF_ERR_ARG, "ffn_forward: out is NULL");
        memset(out, 0, (size_t)n * c * sizeof(float));
        if (b2) add_row_vector(out, b2, n, c);
        return EF_OK;
    }
    if (!out || !inp || !w1 || !w2 || !ws)
        return ef_error(EF_ERR_ARG, "ffn_forward: %s is NULL",
                        !out   ? "out"
                        : !inp ? "inp"
                        : !w1  ? "w1"
                        : !w2  ? "w2"
                               : "ws");
    const int rows = ffn_chunk_rows(n, chunks);
    float *hp = ws; /* [rows][ff] */
    for (int r0 = 0; r0 < n; r0 += rows) {
        const int nr = EF_MIN(rows, n - r0);
        const float *x = inp + (size_t)r0 * c;
        float *y = out + (size_t)r0 * c;
        /* hp = x @ w1 + b1;  hp = gelu(hp);  y = hp @ w2 + b2 */
        if ((st = ef_linear_forward(hp, x, w1, b1, nr, c, ff))) return st;
        ef_gelu_forward(hp, hp, (size_t)nr * ff);
        if ((st = ef_linear_forward(y, hp, w2, b2, nr, ff, c))) return st;
    }
    return EF_OK;
}

ef_status ef_ffn_backward(float *dinp, float *dw1, float *db1, float *dw2, float *db2,
                          const float *dout, const float *inp, const float *w1, const float *b1,
                          const float *w2, float *ws, int n, int c, int ff, int chunks) {
    ef_status st = ffn_check("ffn_backward", n, c, ff, chunks);
    if (st || n == 0 || c == 0) return st;
    if (ff == 0) { /* the layer is out = b2: no path to inp */
        if (!dout) return ef_error(EF_ERR_ARG, "ffn_backward: dout is NULL");
        if (dinp) memset(dinp, 0, (size_t)n * c * sizeof(float));
        if (db2) colsum_add(db2, dout, n, c);
        return EF_OK;
    }
    if (!dw1 || !dw2 || !dout || !inp || !w1 || !w2 || !ws)
        return ef_error(EF_ERR_ARG, "ffn_backward: %s is NULL",
                        !dw1    ? "dw1"
                        : !dw2  ? "dw2"
                        : !dout ? "dout"
                        : !inp  ? "inp"
                        : !w1   ? "w1"
                        : !w2   ? "w2"
                                : "ws");
    const int rows = ffn_chunk_rows(n, chunks);
    float *hp = ws, *h = ws + (size_t)rows * ff; /* [rows][ff] each */
    /* backward of out = h @ w2 + b2: db2 += colsum(dout), over all rows at once */
    if (db2) colsum_add(db2, dout, n, c);
    for (int r0 = 0; r0 < n; r0 += rows) {
        const int nr = EF_MIN(rows, n - r0);
        const float *x = inp + (size_t)r0 * c, *dy = dout + (size_t)r0 * c;
        const size_t nh = (size_t)nr * ff;
        /* recompute: hp = x @ w1 + b1;  h = gelu(hp) */
        if ((st = ef_linear_forward(hp, x, w1, b1, nr, c, ff))) return st;
        ef_gelu_forward(h, hp, nh);
        /* backward of y = h @ w2 (+ b2, done above): dw2 += h^T @ dy;  dh = dy @ w2^T (into h) */
        if ((st = ef_sgemm(1, 0, ff, c, nr, 1.0f, h, ff, dy, c, 1.0f, dw2, c))) return st;
        if ((st = ef_sgemm_fixed(0, 1, nr, ff, c, 1.0f, dy, c, w2, c, 0.0f, h, ff))) return st;
        /* backward of h = gelu(hp): dhp = gelu'(hp) * dh (into hp) */
        ef_gelu_backward(hp, h, hp, nh);
        /* backward of hp = x @ w1 + b1 */
        if ((st = ef_linear_backward(dinp ? dinp + (size_t)r0 * c : NULL, dw1, db1, hp, x, w1, nr,
                                     c, ff)))
            return st;
    }
    return EF_OK;
}
