/*
 * nystrom.c - `nystrom`: Nyströmformer attention (Xiong et al. 2021, "Nyströmformer: A
 * Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021; ALGORITHMS.md b.5).
 * docs/nystrom.md derives the forward, the backward (through the iterative pseudo-inverse) and
 * what is saved.
 *
 * For each (batch b, head h), with Q [N][D], K [M][D], V [M][Dv], tau the plan's scale,
 * n = q_lens[b] valid queries (N without q_lens) and L = kv_lens[b] valid keys (M without
 * kv_lens):
 *   mq = min(m, n) query landmarks, m' = min(m, L) key landmarks (m = landmarks option)
 *   Ql [mq][D]  = segment means of Q[0..n): landmark r averages queries [rn/mq, (r+1)n/mq)
 *   Kl [m'][D]  = segment means of K[0..L), likewise
 *   K1 [n][m']  = softmax(tau Q[0..n) Kl^T)
 *   K2 [mq][m'] = softmax(tau Ql Kl^T)
 *   K3 [mq][L]  = softmax(tau Ql K[0..L)^T)
 *   Z  [m'][mq] = pinv(K2) by the Razavi iteration:
 *                 Z0 = K2^T / (max_j sum_i |K2_ij| * max_i sum_j |K2_ij|)
 *                 Z <- 1/4 Z (13I - K2 Z (15I - K2 Z (7I - K2 Z)))   pinv_iters times
 *   out[0..n)   = K1 (Z (K3 V[0..L)))      (evaluated right to left: never N x L)
 * Padded rows (queries >= n, keys >= L) never enter a landmark, a segment size or a product:
 * every product is sized to the valid rows, so NaN or Inf there changes nothing. Output rows
 * >= n are zero and get zero dq; n = 0 or L = 0 gives zero output and zero gradients. With
 * fewer valid queries (keys) than landmarks, each valid row is its own landmark. Every product
 * is one ef_sgemm call (its status is checked and reported); the row softmaxes and segment
 * means are vectorised (vec.h) and sum in a fixed order, so results do not depend on the
 * thread count.
 *
 * Saved for backward, per (b, h), one record (regions sized for m' = min(m, M), mq = min(m, N);
 * the matrices inside are compact with the call's own sizes, and forward zeroes the rest):
 *   Ql [mq][D], Kl [m'][D], K1 [n][m'], K2 [mq][m'], K3 [mq][L], W = K3 V [mq][Dv],
 *   U = Z W [m'][Dv], and the iterates Z_0 .. Z_T [T+1][m'][mq] (T = pinv_iters).
 * The backward recomputes each iteration's m x m products (K2 Z, the T matrices) from Z_t.
 * Workspace, per thread: four mq x mq pinv temporaries, plus the larger of an inference record
 * (two Z buffers, ping-pong) and the backward temporaries (dK1 [N][m'], dK3 [mq][M], small
 * m x m and m x D matrices). Heads run in parallel, one per thread, each on its own slot;
 * with fewer heads than threads the products themselves use the threads.
 * Time O(B H (N + M) m (D + Dv) + B H T m^3); memory O(B H (N + M) m) when training.
 *
 * Reference path (ref=1): the same steps as plain loops in double, one head at a time, with its
 * own segment assignment, products and softmaxes; it saves nothing and its backward recomputes
 * the forward, then runs reverse mode through it.
 */
#include "attn/attn.h"
#include "core/vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const ef_opt_desc nys_opts[] = {
    {"landmarks", EF_OPT_INT, "64", 1, 1 << 20, NULL, 0,
     "landmarks m: segment means of the valid queries and of the valid keys"},
    {"pinv_iters", EF_OPT_INT, "6", 0, 100, NULL, 0,
     "iterations of the pseudo-inverse (0: the scaled transpose Z0)"},
};
enum { NYS_LANDMARKS, NYS_PINV_ITERS };

typedef struct nys_plan {
    int m, iters;       /* the options */
    int mk, mq;         /* landmark counts at full length: min(m, kv_len), min(m, q_len) */
    size_t rec_floats;  /* one (b, h) record of `saved` (iters + 1 Z iterates) */
    size_t slot_floats; /* one thread's workspace */
    int slots;
    float *ws;         /* [slots][slot_floats] */
    ef_status *status; /* [slots]: first failure seen by a thread */
    double *rws;       /* reference path workspace */
} nys_plan;

/* The dimensions of one (b, h): n valid queries, L valid keys, mq = min(m, n) query and
 * mk = min(m, L) key landmarks. Rows at or past n (queries) and L (keys) are padding: no
 * product below reaches them. */
typedef struct nys_dims {
    int n, L, mk, mq, d, e, iters;
    float tau;
} nys_dims;

static nys_dims head_dims(const ef_attn *a, int q_valid, int kv_valid) {
    const nys_plan *p = a->impl;
    nys_dims h = {.n = q_valid,
                  .L = kv_valid,
                  .mk = EF_MIN(p->m, kv_valid),
                  .mq = EF_MIN(p->m, q_valid),
                  .d = a->shape.head_dim,
                  .e = a->shape.v_dim,
                  .iters = p->iters,
                  .tau = a->scale};
    return h;
}

/* Rounds a float count up to whole 64-byte lines. */
static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; }

/* ---------------------------------------------------------------------------------------------
 * Records and workspace layout. Regions are sized for the plan's largest landmark counts; the
 * matrices inside are compact with the call's own dimensions (mk <= p->mk when L < M).
 * ------------------------------------------------------------------------------------------- */
typedef struct nys_rec {
    float *ql; /* [mq][D] */
    float *kl; /* [mk][D] */
    float *k1; /* [N][mk] */
    float *k2; /* [mq][mk] */
    float *k3; /* [mq][L] */
    float *w;  /* [mq][Dv]  K3 V */
    float *u;  /* [mk][Dv]  Z_T W */
    float *z;  /* [nz][mk][mq] iterates */
} nys_rec;

enum { REC_PARTS = 8 };

/* Floats of each part of a record holding nz Z buffers: sized for the plan's largest landmark
 * counts (fill) or for the matrices of one call with dimensions h (used). */
static void rec_sizes(const ef_attn *a, int nz, const nys_dims *h, size_t sz[REC_PARTS]) {
    const nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t mk = h ? h->mk : p->mk, mq = h ? h->mq : p->mq, n = h ? h->n : s->q_len;
    size_t m = h ? h->L : s->kv_len;
    size_t part[REC_PARTS] = {mq * s->head_dim, mk * s->head_dim, n * mk,        mq * mk,
                              mq * m,           mq * s->v_dim,    mk * s->v_dim, nz * mk * mq};
    memcpy(sz, part, sizeof part);
}

/* Floats of a record holding nz Z buffers; fills r from `base` when base is not NULL. */
static size_t rec_layout(const ef_attn *a, int nz, float *base, nys_rec *r) {
    size_t sz[REC_PARTS];
    rec_sizes(a, nz, NULL, sz);
    float **dst[REC_PARTS] = {NULL};
    if (r) {
        float **d[REC_PARTS] = {&r->ql, &r->kl, &r->k1, &r->k2, &r->k3, &r->w, &r->u, &r->z};
        memcpy(dst, d, sizeof d);
    }
    size_t off = 0;
    for (int i = 0; i < REC_PARTS; i++) {
        if (base) *dst[i] = base + off;
        off += up16(sz[i]);
    }
    return off;
}

/* Zeroes what a call with dimensions h leaves unwritten in a record of `saved` at `base` (the
 * matrices are compact, so each part has a tail past its used floats), or all of it when h is
 * NULL: forward writes every byte of `saved`. */
static void rec_zero_unused(const ef_attn *a, int nz, float *base, const nys_dims *h) {
    size_t full[REC_PARTS], used[REC_PARTS] = {0};
    rec_sizes(a, nz, NULL, full);
    if (h) rec_sizes(a, nz, h, used);
    size_t off = 0;
    for (int i = 0; i < REC_PARTS; i++) {
        size_t cap = up16(full[i]);
        memset(base + off + used[i], 0, sizeof(float) * (cap - used[i]));
        off += cap;
    }
}

typedef struct nys_tmp {
    float *P, *T1, *T2, *T3; /* [mq][mq] pinv: P = K2 Z and the three nested factors */
    /* backward */
    float *dk1;            /* [N][mk]  dK1, then dS1 */
    float *dk3;            /* [mq][L]  dK3, then dS3 */
    float *du, *dw;        /* [mk][Dv], [mq][Dv] */
    float *dz, *dzp;       /* [mk][mq] dZ_t, dZ_{t-1} */
    float *dP, *dTa, *dTb; /* [mq][mq] */
    float *dA;             /* [mq][mk] dK2, then dS2 */
    float *dql, *dkl;      /* [mq][D], [mk][D] */
    float *rec;            /* the inference record (aliases the backward temporaries) */
} nys_tmp;

/* Floats of one thread's slot; fills t from `base` when base is not NULL. */
static size_t slot_layout(const ef_attn *a, float *base, nys_tmp *t) {
    const nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t mk = p->mk, mq = p->mq, n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim;
    size_t off = 0;
    float **pin[4] = {NULL};
    if (t) pin[0] = &t->P, pin[1] = &t->T1, pin[2] = &t->T2, pin[3] = &t->T3;
    for (int i = 0; i < 4; i++) {
        if (base) *pin[i] = base + off;
        off += up16(mq * mq);
    }
    size_t sz[12] = {n * mk,  mq * m,  mk * e,  mq * e,  mk * mq, mk * mq,
                     mq * mq, mq * mq, mq * mq, mq * mk, mq * d,  mk * d};
    float **bw[12] = {NULL};
    if (t) {
        float **b[12] = {&t->dk1, &t->dk3, &t->du,  &t->dw, &t->dz,  &t->dzp,
                         &t->dP,  &t->dTa, &t->dTb, &t->dA, &t->dql, &t->dkl};
        memcpy(bw, b, sizeof b);
    }
    size_t bwd = 0;
    for (int i = 0; i < 12; i++) {
        if (base) *bw[i] = base + off + bwd;
        bwd += up16(sz[i]);
    }
    if (t && base) t->rec = base + off;
    size_t inf = rec_layout(a, EF_MIN(p->iters + 1, 2), NULL, NULL);
    return off + EF_MAX(bwd, inf);
}

/* ---------------------------------------------------------------------------------------------
 * Small kernels of the fast path
 * ------------------------------------------------------------------------------------------- */
enum { ROWS_PER_ITEM = 64 };

typedef struct rows_ctx {
    float *x;       /* [rows][len]: logits in, probabilities out; or dP in, dS out */
    const float *p; /* softmax backward: the probabilities */
    int rows, len;
} rows_ctx;

/* Row kernels on EF_VL-float vectors with a scalar tail. Sums run in float lanes over blocks
 * of SUM_BLOCK vectors and are folded into a double, in a fixed order: the result depends on
 * the row alone, never on the thread that runs it. */
enum { SUM_BLOCK = 64 };

static double lanes_sum(vf acc) {
    double s = 0;
    for (int l = 0; l < EF_VL; l++) s += acc[l];
    return s;
}

/* x[j] = exp(x[j] - mx); returns the sum of the new x */
static double row_exp_sum(float *x, int n, float mx) {
    vf vm = vf_set1(mx);
    double sum = 0;
    int j = 0;
    while (j + EF_VL <= n) {
        vf acc = vf_set1(0);
        for (int b = 0; b < SUM_BLOCK && j + EF_VL <= n; b++, j += EF_VL) {
            vf e = vf_exp(vf_loadu(x + j) - vm);
            vf_storeu(x + j, e);
            acc += e;
        }
        sum += lanes_sum(acc);
    }
    for (; j < n; j++) sum += x[j] = ef_expf(x[j] - mx);
    return sum;
}

static double row_dot(const float *x, const float *y, int n) {
    double sum = 0;
    int j = 0;
    while (j + EF_VL <= n) {
        vf acc = vf_set1(0);
        for (int b = 0; b < SUM_BLOCK && j + EF_VL <= n; b++, j += EF_VL)
            acc += vf_loadu(x + j) * vf_loadu(y + j);
        sum += lanes_sum(acc);
    }
    for (; j < n; j++) sum += (double)x[j] * y[j];
    return sum;
}

static void softmax_item(void *ctx, int64_t item, int tid) {
    (void)tid;
    const rows_ctx *c = ctx;
    int i1 = (int)EF_MIN((int64_t)c->rows, (item + 1) * ROWS_PER_ITEM);
    for (int i = (int)(item * ROWS_PER_ITEM); i < i1; i++) {
        float *row = c->x + (size_t)i * c->len;
        double sum = row_exp_sum(row, c->len, ef_row_max(row, c->len));
        ef_row_scale(row, (float)(1.0 / sum), c->len);
    }
}

/* dS = P o (dP - rowsum(P o dP)), in place on dP (the scale is applied by the products). */
static void softmax_grad_item(void *ctx, int64_t item, int tid) {
    (void)tid;
    const rows_ctx *c = ctx;
    int i1 = (int)EF_MIN((int64_t)c->rows, (item + 1) * ROWS_PER_ITEM);
    for (int i = (int)(item * ROWS_PER_ITEM); i < i1; i++) {
        const float *p = c->p + (size_t)i * c->len;
        float *ds = c->x + (size_t)i * c->len;
        float delta = (float)row_dot(p, ds, c->len);
        vf vd = vf_set1(delta);
        int j = 0;
        for (; j + EF_VL <= c->len; j += EF_VL)
            vf_storeu(ds + j, vf_loadu(p + j) * (vf_loadu(ds + j) - vd));
        for (; j < c->len; j++) ds[j] = p[j] * (ds[j] - delta);
    }
}

static void softmax_rows(float *x, int rows, int len, int threads) {
    rows_ctx c = {x, NULL, rows, len};
    ef_parallel_for((rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, threads, softmax_item, &c);
}

static void softmax_grad_rows(float *dp, const float *p, int rows, int len, int threads) {
    rows_ctx c = {dp, p, rows, len};
    ef_parallel_for((rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, threads, softmax_grad_item, &c);
}

/* Segment r of `cnt` segments over `len` rows: [seg_lo(r), seg_lo(r + 1)). len >= cnt makes
 * every segment non-empty; lengths differ by at most one. */
static int seg_lo(int r, int len, int cnt) { return (int)((int64_t)r * len / cnt); }

/* y [cnt][d] = segment means of x [len][d]. */
static void seg_mean(const float *x, int len, int cnt, int d, float *y) {
    for (int r = 0; r < cnt; r++) {
        int j0 = seg_lo(r, len, cnt), j1 = seg_lo(r + 1, len, cnt);
        float *yr = y + (size_t)r * d;
        memset(yr, 0, sizeof(float) * d);
        for (int j = j0; j < j1; j++) ef_row_axpy(yr, 1.0f, x + (size_t)j * d, d);
        ef_row_scale(yr, 1.0f / (float)(j1 - j0), d);
    }
}

/* dx[j] += dy[seg(j)] / |seg|: the transpose of seg_mean. */
static void seg_mean_grad(const float *dy, int len, int cnt, int d, float *dx) {
    for (int r = 0; r < cnt; r++) {
        int j0 = seg_lo(r, len, cnt), j1 = seg_lo(r + 1, len, cnt);
        const float *gr = dy + (size_t)r * d;
        float inv = 1.0f / (float)(j1 - j0);
        for (int j = j0; j < j1; j++) ef_row_axpy(dx + (size_t)j * d, inv, gr, d);
    }
}

/* The scale of Z0 = A^T / c, c = (max column sum) * (max row sum) of A [mq][mk] (A >= 0, so
 * |A| = A). *jc, *ir receive the first maximising column and row (the gradient of a max goes
 * to its argument); *cc, *cr the two maxima. Sums in double so the fast path and the
 * reference pick the same column. */
static double z0_scale(const float *A, int mq, int mk, int *jc, int *ir, double *cc, double *cr) {
    *cc = -1, *cr = -1, *jc = 0, *ir = 0;
    for (int j = 0; j < mk; j++) {
        double s = 0;
        for (int i = 0; i < mq; i++) s += A[(size_t)i * mk + j];
        if (s > *cc) *cc = s, *jc = j;
    }
    for (int i = 0; i < mq; i++) {
        double s = 0;
        for (int j = 0; j < mk; j++) s += A[(size_t)i * mk + j];
        if (s > *cr) *cr = s, *ir = i;
    }
    return *cc * *cr;
}

static void add_diag(float *X, int n, float v) {
    for (int i = 0; i < n; i++) X[(size_t)i * n + i] += v;
}

/* The factors of one iteration from A [mq][mk] and Z [mk][mq]:
 * P = A Z, T1 = 7I - P, T2 = 15I - P T1, T3 = 13I - P T2. */
static ef_status pinv_factors(const float *A, const float *Z, int mq, int mk, nys_tmp *t) {
    ef_status st;
    if ((st = ef_sgemm(0, 0, mq, mq, mk, 1.0f, A, mk, Z, mq, 0.0f, t->P, mq))) return st;
    for (size_t x = 0; x < (size_t)mq * mq; x++) t->T1[x] = -t->P[x];
    add_diag(t->T1, mq, 7.0f);
    if ((st = ef_sgemm(0, 0, mq, mq, mq, -1.0f, t->P, mq, t->T1, mq, 0.0f, t->T2, mq))) return st;
    add_diag(t->T2, mq, 15.0f);
    if ((st = ef_sgemm(0, 0, mq, mq, mq, -1.0f, t->P, mq, t->T2, mq, 0.0f, t->T3, mq))) return st;
    add_diag(t->T3, mq, 13.0f);
    return EF_OK;
}

/* Z buffer of iterate it: all iterates kept (training) or two alternating (inference). */
static float *z_at(const nys_rec *r, const nys_dims *h, int it, int keep_all) {
    return r->z + (size_t)(keep_all ? it : (it & 1)) * h->mk * h->mq;
}

/* ---------------------------------------------------------------------------------------------
 * Fast forward and backward of one (b, h)
 * ------------------------------------------------------------------------------------------- */
static ef_status head_forward(const nys_dims *h, const float *q, const float *k, const float *v,
                              float *out, const nys_rec *r, int keep_all, nys_tmp *t, int threads) {
    int n = h->n, L = h->L, mk = h->mk, mq = h->mq, d = h->d, e = h->e;
    ef_status st;
    seg_mean(q, n, mq, d, r->ql);
    seg_mean(k, L, mk, d, r->kl);
    /* K1 = softmax(tau Q Kl^T), K2 = softmax(tau Ql Kl^T), K3 = softmax(tau Ql K^T) */
    if ((st = ef_sgemm(0, 1, n, mk, d, h->tau, q, d, r->kl, d, 0.0f, r->k1, mk))) return st;
    if ((st = ef_sgemm(0, 1, mq, mk, d, h->tau, r->ql, d, r->kl, d, 0.0f, r->k2, mk))) return st;
    if ((st = ef_sgemm(0, 1, mq, L, d, h->tau, r->ql, d, k, d, 0.0f, r->k3, L))) return st;
    softmax_rows(r->k1, n, mk, threads);
    softmax_rows(r->k2, mq, mk, 1);
    softmax_rows(r->k3, mq, L, threads);
    /* Z0 = K2^T / c */
    int jc, ir;
    double cc, cr;
    float inv_c = (float)(1.0 / z0_scale(r->k2, mq, mk, &jc, &ir, &cc, &cr));
    float *z = z_at(r, h, 0, keep_all);
    for (int i = 0; i < mq; i++)
        for (int j = 0; j < mk; j++) z[(size_t)j * mq + i] = r->k2[(size_t)i * mk + j] * inv_c;
    /* Z <- 1/4 Z T3 */
    for (int it = 1; it <= h->iters; it++) {
        const float *zp = z_at(r, h, it - 1, keep_all);
        z = z_at(r, h, it, keep_all);
        if ((st = pinv_factors(r->k2, zp, mq, mk, t))) return st;
        if ((st = ef_sgemm(0, 0, mk, mq, mq, 0.25f, zp, mq, t->T3, mq, 0.0f, z, mq))) return st;
    }
    /* W = K3 V, U = Z W, out = K1 U */
    if ((st = ef_sgemm(0, 0, mq, e, L, 1.0f, r->k3, L, v, e, 0.0f, r->w, e))) return st;
    if ((st = ef_sgemm(0, 0, mk, e, mq, 1.0f, z, mq, r->w, e, 0.0f, r->u, e))) return st;
    return ef_sgemm(0, 0, n, e, mk, 1.0f, r->k1, mk, r->u, e, 0.0f, out, e);
}

static ef_status head_backward(const nys_dims *h, const float *q, const float *k, const float *v,
                               const float *g, float *dq, float *dk, float *dv, const nys_rec *r,
                               nys_tmp *t, int threads) {
    int n = h->n, L = h->L, mk = h->mk, mq = h->mq, d = h->d, e = h->e;
    float tau = h->tau;
    const float *A = r->k2, *zt = z_at(r, h, h->iters, 1);
    ef_status st;
    /* out = K1 U:  dK1 = dO U^T,  dU = K1^T dO */
    if ((st = ef_sgemm(0, 1, n, mk, e, 1.0f, g, e, r->u, e, 0.0f, t->dk1, mk))) return st;
    if ((st = ef_sgemm(1, 0, mk, e, n, 1.0f, r->k1, mk, g, e, 0.0f, t->du, e))) return st;
    /* U = Z W:  dZ = dU W^T,  dW = Z^T dU */
    if ((st = ef_sgemm(0, 1, mk, mq, e, 1.0f, t->du, e, r->w, e, 0.0f, t->dz, mq))) return st;
    if ((st = ef_sgemm(1, 0, mq, e, mk, 1.0f, zt, mq, t->du, e, 0.0f, t->dw, e))) return st;
    /* W = K3 V:  dK3 = dW V^T,  dV = K3^T dW */
    if ((st = ef_sgemm(0, 1, mq, L, e, 1.0f, t->dw, e, v, e, 0.0f, t->dk3, L))) return st;
    if ((st = ef_sgemm(1, 0, L, e, mq, 1.0f, r->k3, L, t->dw, e, 0.0f, dv, e))) return st;

    /* The iterations in reverse. Z' = 1/4 Z T3 with T3 = 13I - P T2, T2 = 15I - P T1,
     * T1 = 7I - P, P = A Z:
     *   dZ  = 1/4 dZ' T3^T + A^T dP        dT3 = 1/4 Z^T dZ'
     *   dP  = -dT3 T2^T - dT2 T1^T - dT1   dT2 = -P^T dT3,  dT1 = -P^T dT2
     *   dA += dP Z^T */
    size_t qq = (size_t)mq * mq;
    memset(t->dA, 0, sizeof(float) * mq * mk);
    for (int it = h->iters; it >= 1; it--) {
        const float *zp = z_at(r, h, it - 1, 1);
        if ((st = pinv_factors(A, zp, mq, mk, t))) return st;
        if ((st = ef_sgemm(0, 1, mk, mq, mq, 0.25f, t->dz, mq, t->T3, mq, 0.0f, t->dzp, mq)))
            return st;
        float *dT3 = t->dTa, *dT2 = t->dTb, *dT1 = t->dTa;
        if ((st = ef_sgemm(1, 0, mq, mq, mk, 0.25f, zp, mq, t->dz, mq, 0.0f, dT3, mq))) return st;
        if ((st = ef_sgemm(0, 1, mq, mq, mq, -1.0f, dT3, mq, t->T2, mq, 0.0f, t->dP, mq)))
            return st;
        if ((st = ef_sgemm(1, 0, mq, mq, mq, -1.0f, t->P, mq, dT3, mq, 0.0f, dT2, mq))) return st;
        if ((st = ef_sgemm(0, 1, mq, mq, mq, -1.0f, dT2, mq, t->T1, mq, 1.0f, t->dP, mq)))
            return st;
        /* dT1 overwrites dT3, which is no longer needed */
        if ((st = ef_sgemm(1, 0, mq, mq, mq, -1.0f, t->P, mq, dT2, mq, 0.0f, dT1, mq))) return st;
        for (size_t x = 0; x < qq; x++) t->dP[x] -= dT1[x];
        if ((st = ef_sgemm(0, 1, mq, mk, mq, 1.0f, t->dP, mq, zp, mq, 1.0f, t->dA, mk))) return st;
        if ((st = ef_sgemm(1, 0, mk, mq, mq, 1.0f, A, mk, t->dP, mq, 1.0f, t->dzp, mq))) return st;
        float *sw = t->dz;
        t->dz = t->dzp, t->dzp = sw;
    }
    /* Z0 = A^T / c, c = cc * cr:  dA += dZ0^T / c;  dc = -<dZ0, Z0> / c;
     * dcc = dc cr goes to column jc of A, dcr = dc cc to row ir */
    {
        int jc, ir;
        double cc, cr, c = z0_scale(A, mq, mk, &jc, &ir, &cc, &cr);
        const float *z0 = z_at(r, h, 0, 1);
        float inv_c = (float)(1.0 / c);
        double dot = 0;
        for (size_t x = 0; x < (size_t)mk * mq; x++) dot += (double)t->dz[x] * z0[x];
        double dc = -dot / c;
        float dcc = (float)(dc * cr), dcr = (float)(dc * cc);
        for (int i = 0; i < mq; i++)
            for (int j = 0; j < mk; j++)
                t->dA[(size_t)i * mk + j] += t->dz[(size_t)j * mq + i] * inv_c;
        for (int i = 0; i < mq; i++) t->dA[(size_t)i * mk + jc] += dcc;
        for (int j = 0; j < mk; j++) t->dA[(size_t)ir * mk + j] += dcr;
    }
    /* the three softmaxes: dS = K o (dK - rowsum(K o dK)), in place */
    softmax_grad_rows(t->dk1, r->k1, n, mk, threads);
    softmax_grad_rows(t->dA, A, mq, mk, 1);
    softmax_grad_rows(t->dk3, r->k3, mq, L, threads);
    /* S1 = tau Q Kl^T:   dQ = tau dS1 Kl,   dKl = tau dS1^T Q
     * S2 = tau Ql Kl^T:  dQl = tau dS2 Kl,  dKl += tau dS2^T Ql
     * S3 = tau Ql K^T:   dQl += tau dS3 K,  dK = tau dS3^T Ql */
    if ((st = ef_sgemm(0, 0, n, d, mk, tau, t->dk1, mk, r->kl, d, 0.0f, dq, d))) return st;
    if ((st = ef_sgemm(1, 0, mk, d, n, tau, t->dk1, mk, q, d, 0.0f, t->dkl, d))) return st;
    if ((st = ef_sgemm(1, 0, mk, d, mq, tau, t->dA, mk, r->ql, d, 1.0f, t->dkl, d))) return st;
    if ((st = ef_sgemm(0, 0, mq, d, mk, tau, t->dA, mk, r->kl, d, 0.0f, t->dql, d))) return st;
    if ((st = ef_sgemm(0, 0, mq, d, L, tau, t->dk3, L, k, d, 1.0f, t->dql, d))) return st;
    if ((st = ef_sgemm(1, 0, L, d, mq, tau, t->dk3, L, r->ql, d, 0.0f, dk, d))) return st;
    /* the segment means */
    seg_mean_grad(t->dql, n, mq, d, dq);
    seg_mean_grad(t->dkl, L, mk, d, dk);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Fast path: heads in parallel, one workspace slot per thread
 * ------------------------------------------------------------------------------------------- */
typedef struct nys_job {
    const ef_attn *a;
    const ef_attn_io *io;
    float *saved; /* NULL: inference */
    const float *dout;
    float *dq, *dk, *dv;
    int inner_threads; /* threads for row loops inside a head (1 when heads run in parallel) */
} nys_job;

static void note_status(const ef_attn *a, int tid, ef_status st) {
    nys_plan *p = a->impl;
    if (st && !p->status[tid]) p->status[tid] = st;
}

static void forward_item(void *ctx, int64_t bh, int tid) {
    const nys_job *j = ctx;
    const ef_attn *a = j->a;
    const ef_attn_shape *s = &a->shape;
    const nys_plan *p = a->impl;
    int b = (int)(bh / s->heads);
    int L = ef_attn_kv_valid(a, j->io, b), nq = ef_attn_q_valid(a, j->io, b);
    float *out = j->io->out + (size_t)bh * s->q_len * s->v_dim;
    float *rec = j->saved ? j->saved + (size_t)bh * p->rec_floats : NULL;
    /* padded query rows output zeros (all rows when the sequence has no query or no key) */
    int rows = L == 0 ? 0 : nq;
    memset(out + (size_t)rows * s->v_dim, 0, sizeof(float) * (s->q_len - rows) * s->v_dim);
    if (rows == 0) {
        if (rec) rec_zero_unused(a, p->iters + 1, rec, NULL);
        return;
    }
    nys_tmp t;
    nys_rec r;
    slot_layout(a, p->ws + (size_t)tid * p->slot_floats, &t);
    if (rec)
        rec_layout(a, p->iters + 1, rec, &r);
    else
        rec_layout(a, EF_MIN(p->iters + 1, 2), t.rec, &r);
    nys_dims h = head_dims(a, nq, L);
    const float *q = j->io->q + (size_t)bh * s->q_len * s->head_dim;
    const float *k = j->io->k + (size_t)bh * s->kv_len * s->head_dim;
    const float *v = j->io->v + (size_t)bh * s->kv_len * s->v_dim;
    note_status(a, tid, head_forward(&h, q, k, v, out, &r, rec != NULL, &t, j->inner_threads));
    if (rec) rec_zero_unused(a, p->iters + 1, rec, &h);
}

static void backward_item(void *ctx, int64_t bh, int tid) {
    const nys_job *j = ctx;
    const ef_attn *a = j->a;
    const ef_attn_shape *s = &a->shape;
    const nys_plan *p = a->impl;
    int b = (int)(bh / s->heads);
    int L = ef_attn_kv_valid(a, j->io, b), nq = ef_attn_q_valid(a, j->io, b);
    if (nq == 0) L = 0; /* no query: no key receives a gradient either */
    if (L == 0) nq = 0;
    size_t oq = (size_t)bh * s->q_len * s->head_dim, ok = (size_t)bh * s->kv_len * s->head_dim;
    size_t ov = (size_t)bh * s->kv_len * s->v_dim;
    float *dq = j->dq + oq, *dk = j->dk + ok, *dv = j->dv + ov;
    /* padded queries, keys and values get zero gradient (all of them for an empty sequence) */
    memset(dq + (size_t)nq * s->head_dim, 0, sizeof(float) * (s->q_len - nq) * s->head_dim);
    memset(dk + (size_t)L * s->head_dim, 0, sizeof(float) * (s->kv_len - L) * s->head_dim);
    memset(dv + (size_t)L * s->v_dim, 0, sizeof(float) * (s->kv_len - L) * s->v_dim);
    if (L == 0) return;
    nys_tmp t;
    nys_rec r;
    slot_layout(a, p->ws + (size_t)tid * p->slot_floats, &t);
    rec_layout(a, p->iters + 1, j->saved + (size_t)bh * p->rec_floats, &r);
    nys_dims h = head_dims(a, nq, L);
    note_status(a, tid,
                head_backward(&h, j->io->q + oq, j->io->k + ok, j->io->v + ov,
                              j->dout + (size_t)bh * s->q_len * s->v_dim, dq, dk, dv, &r, &t,
                              j->inner_threads));
}

static ef_status run_heads(const ef_attn *a, nys_job *j, ef_parallel_fn fn) {
    nys_plan *p = a->impl;
    int64_t items = (int64_t)a->shape.batch * a->shape.heads;
    int threads = (int)EF_MIN((int64_t)EF_MIN(ef_attn_threads(a), p->slots), items);
    j->inner_threads = threads > 1 ? 1 : ef_attn_threads(a);
    memset(p->status, 0, sizeof(ef_status) * p->slots);
    ef_parallel_for(items, threads, fn, j);
    for (int i = 0; i < p->slots; i++)
        if (p->status[i])
            return ef_error(p->status[i], "nystrom: a dense product failed (%s)",
                            ef_status_str(p->status[i]));
    return EF_OK;
}

static size_t nys_saved_bytes(const ef_attn *a) {
    const nys_plan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads * p->rec_floats * sizeof(float);
}

static ef_status nys_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    nys_job j = {a, io, saved, NULL, NULL, NULL, NULL, 1};
    return run_heads(a, &j, forward_item);
}

static ef_status nys_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    /* the records are only read */
    nys_job j = {a, io, (float *)(uintptr_t)saved, dout, dq, dk, dv, 1};
    return run_heads(a, &j, backward_item);
}

/* ---------------------------------------------------------------------------------------------
 * Reference path: the same steps as plain loops in double, one head at a time.
 * ------------------------------------------------------------------------------------------- */
typedef struct nys_ref {
    double *q, *k, *v, *out;        /* [N][D], [M][D], [M][Dv], [N][Dv] inputs of the head */
    double *ql, *kl, *k1, *k2, *k3; /* as the fast record */
    double *z, *w, *u;              /* z: [T+1][mk][mq] */
    double *P, *T1, *T2, *T3;       /* [mq][mq] */
    double *g, *dq, *dk, *dv;       /* dO and the input gradients of the head */
    double *dk1, *dk2, *dk3, *dql, *dkl, *du, *dw, *dz, *dzp, *dP, *dT3, *dT2, *dT1;
} nys_ref;

static size_t ref_layout(const ef_attn *a, double *base, nys_ref *R) {
    const nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, mk = p->mk, mq = p->mq;
    size_t T = p->iters;
    size_t sz[] = {n * d,   m * d,   m * e,   n * e,   mq * d,
                   mk * d,  n * mk,  mq * mk, mq * m,  (T + 1) * mk * mq,
                   mq * e,  mk * e,  mq * mq, mq * mq, mq * mq,
                   mq * mq, n * e,   n * d,   m * d,   m * e,
                   n * mk,  mq * mk, mq * m,  mq * d,  mk * d,
                   mk * e,  mq * e,  mk * mq, mk * mq, mq * mq,
                   mq * mq, mq * mq, mq * mq};
    double **dst[sizeof sz / sizeof sz[0]] = {NULL};
    if (R) {
        double **d_[] = {&R->q,   &R->k,   &R->v,   &R->out, &R->ql, &R->kl, &R->k1,
                         &R->k2,  &R->k3,  &R->z,   &R->w,   &R->u,  &R->P,  &R->T1,
                         &R->T2,  &R->T3,  &R->g,   &R->dq,  &R->dk, &R->dv, &R->dk1,
                         &R->dk2, &R->dk3, &R->dql, &R->dkl, &R->du, &R->dw, &R->dz,
                         &R->dzp, &R->dP,  &R->dT3, &R->dT2, &R->dT1};
        memcpy(dst, d_, sizeof d_);
    }
    size_t off = 0;
    for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) {
        if (base) *dst[i] = base + off;
        off += sz[i];
    }
    return off;
}

/* C [m][n] = alpha op(A) op(B) + beta C, op(A) m x k (A stored k x m when ta), op(B) k x n
 * (B stored n x k when tb); beta = 0 overwrites C. Every product of the reference is one call. */
static void ref_mm(int ta, int tb, int m, int n, int k, double alpha, const double *A,
                   const double *B, double beta, double *C) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int t = 0; t < k; t++)
                s += (ta ? A[(size_t)t * m + i] : A[(size_t)i * k + t]) *
                     (tb ? B[(size_t)j * k + t] : B[(size_t)t * n + j]);
            C[(size_t)i * n + j] = alpha * s + (beta != 0 ? beta * C[(size_t)i * n + j] : 0);
        }
}

/* The segment of row i when `len` rows are split into `cnt` landmarks (len >= cnt), written
 * from the other side of the definition (the fast path uses the boundaries
 * floor(r len / cnt)): row i is in segment r iff floor(r len / cnt) <= i < floor((r+1) len / cnt),
 * i.e. r len < (i + 1) cnt <= (r + 1) len, so r = ceil((i + 1) cnt / len) - 1. */
static int ref_seg_of(int i, int len, int cnt) {
    return (int)(((int64_t)(i + 1) * cnt + len - 1) / len) - 1;
}

/* Rows of segment r: counted, not computed from the boundaries. */
static int ref_seg_count(int r, int len, int cnt) {
    int c = 0;
    for (int i = 0; i < len; i++) c += ref_seg_of(i, len, cnt) == r;
    return c;
}

/* y [cnt][d] = segment means of the first len rows of x [.][d] (rows past len are padding and
 * are not read) */
static void ref_seg_mean(const double *x, int len, int cnt, int d, double *y) {
    for (size_t t = 0; t < (size_t)cnt * d; t++) y[t] = 0;
    for (int i = 0; i < len; i++) {
        int r = ref_seg_of(i, len, cnt);
        for (int t = 0; t < d; t++) y[(size_t)r * d + t] += x[(size_t)i * d + t];
    }
    for (int r = 0; r < cnt; r++) {
        int c = ref_seg_count(r, len, cnt);
        for (int t = 0; t < d; t++) y[(size_t)r * d + t] /= c;
    }
}

/* dx[i] += dy[seg(i)] / |seg(i)| for the first len rows: the transpose of ref_seg_mean. */
static void ref_seg_mean_grad(const double *dy, int len, int cnt, int d, double *dx) {
    for (int i = 0; i < len; i++) {
        int r = ref_seg_of(i, len, cnt), c = ref_seg_count(r, len, cnt);
        for (int t = 0; t < d; t++) dx[(size_t)i * d + t] += dy[(size_t)r * d + t] / c;
    }
}

/* P [rows][cols] = softmax over each row of tau * X [rows][D] Y [cols][D]^T */
static void ref_softmax_scores(const double *X, const double *Y, int rows, int cols, int d,
                               double tau, double *P) {
    for (int i = 0; i < rows; i++) {
        double *p = P + (size_t)i * cols, mx = -INFINITY, sum = 0;
        for (int j = 0; j < cols; j++) {
            double dot = 0;
            for (int t = 0; t < d; t++) dot += X[(size_t)i * d + t] * Y[(size_t)j * d + t];
            p[j] = tau * dot;
            if (p[j] > mx) mx = p[j];
        }
        for (int j = 0; j < cols; j++) sum += p[j] = exp(p[j] - mx);
        for (int j = 0; j < cols; j++) p[j] /= sum;
    }
}

/* The factors of one iteration in double (see pinv_factors). */
static void ref_factors(const double *A, const double *Z, int mq, int mk, nys_ref *R) {
    ref_mm(0, 0, mq, mq, mk, 1, A, Z, 0, R->P);
    for (int i = 0; i < mq; i++)
        for (int j = 0; j < mq; j++) R->T1[i * mq + j] = (i == j ? 7.0 : 0.0) - R->P[i * mq + j];
    ref_mm(0, 0, mq, mq, mq, 1, R->P, R->T1, 0, R->T2);
    for (int i = 0; i < mq; i++)
        for (int j = 0; j < mq; j++) R->T2[i * mq + j] = (i == j ? 15.0 : 0.0) - R->T2[i * mq + j];
    ref_mm(0, 0, mq, mq, mq, 1, R->P, R->T2, 0, R->T3);
    for (int i = 0; i < mq; i++)
        for (int j = 0; j < mq; j++) R->T3[i * mq + j] = (i == j ? 13.0 : 0.0) - R->T3[i * mq + j];
}

/* c = (max column sum) (max row sum) of A [mq][mk], with the first maximisers. */
static double ref_z0_scale(const double *A, int mq, int mk, int *jc, int *ir, double *cc,
                           double *cr) {
    *cc = -1, *cr = -1, *jc = 0, *ir = 0;
    for (int j = 0; j < mk; j++) {
        double s = 0;
        for (int i = 0; i < mq; i++) s += A[i * mk + j];
        if (s > *cc) *cc = s, *jc = j;
    }
    for (int i = 0; i < mq; i++) {
        double s = 0;
        for (int j = 0; j < mk; j++) s += A[i * mk + j];
        if (s > *cr) *cr = s, *ir = i;
    }
    return *cc * *cr;
}

/* Forward of one head from R->q, R->k, R->v (h->n >= 1 valid queries, h->L >= 1 valid keys)
 * into R->out (h->n rows) and the intermediates. */
static void ref_head_forward(const nys_dims *h, nys_ref *R) {
    int n = h->n, L = h->L, mk = h->mk, mq = h->mq, d = h->d, e = h->e;
    size_t zz = (size_t)mk * mq;
    ref_seg_mean(R->q, n, mq, d, R->ql);
    ref_seg_mean(R->k, L, mk, d, R->kl);
    ref_softmax_scores(R->q, R->kl, n, mk, d, h->tau, R->k1);
    ref_softmax_scores(R->ql, R->kl, mq, mk, d, h->tau, R->k2);
    ref_softmax_scores(R->ql, R->k, mq, L, d, h->tau, R->k3);
    int jc, ir;
    double cc, cr, c = ref_z0_scale(R->k2, mq, mk, &jc, &ir, &cc, &cr);
    for (int r = 0; r < mk; r++)
        for (int i = 0; i < mq; i++) R->z[(size_t)r * mq + i] = R->k2[(size_t)i * mk + r] / c;
    for (int it = 1; it <= h->iters; it++) {
        const double *zp = R->z + (it - 1) * zz;
        double *z = R->z + it * zz;
        ref_factors(R->k2, zp, mq, mk, R);
        ref_mm(0, 0, mk, mq, mq, 1, zp, R->T3, 0, z);
        for (size_t x = 0; x < zz; x++) z[x] *= 0.25;
    }
    const double *z = R->z + h->iters * zz;
    for (int i = 0; i < mq; i++) /* W = K3 V */
        for (int x = 0; x < e; x++) {
            double s = 0;
            for (int j = 0; j < L; j++) s += R->k3[(size_t)i * L + j] * R->v[(size_t)j * e + x];
            R->w[(size_t)i * e + x] = s;
        }
    ref_mm(0, 0, mk, e, mq, 1, z, R->w, 0, R->u);      /* U = Z W */
    ref_mm(0, 0, n, e, mk, 1, R->k1, R->u, 0, R->out); /* out = K1 U */
}

/* dS = P o (dP - rowsum(P o dP)), in place on dP [rows][cols]. */
static void ref_softmax_grad(const double *P, double *dP, int rows, int cols) {
    for (int i = 0; i < rows; i++) {
        double delta = 0;
        for (int j = 0; j < cols; j++) delta += P[(size_t)i * cols + j] * dP[(size_t)i * cols + j];
        for (int j = 0; j < cols; j++)
            dP[(size_t)i * cols + j] = P[(size_t)i * cols + j] * (dP[(size_t)i * cols + j] - delta);
    }
}

/* Reverse mode through ref_head_forward (which must have just run on the same inputs), with
 * dO in R->g; writes R->dq, R->dk[0..L), R->dv[0..L). */
static void ref_head_backward(const nys_dims *h, nys_ref *R) {
    int n = h->n, L = h->L, mk = h->mk, mq = h->mq, d = h->d, e = h->e;
    double tau = h->tau;
    size_t zz = (size_t)mk * mq;
    const double *A = R->k2, *zt = R->z + h->iters * zz;
    /* out = K1 U: dK1 = G U^T, dU = K1^T G */
    ref_mm(0, 1, n, mk, e, 1, R->g, R->u, 0, R->dk1);
    ref_mm(1, 0, mk, e, n, 1, R->k1, R->g, 0, R->du);
    /* U = Z W: dZ = dU W^T, dW = Z^T dU */
    ref_mm(0, 1, mk, mq, e, 1, R->du, R->w, 0, R->dz);
    ref_mm(1, 0, mq, e, mk, 1, zt, R->du, 0, R->dw);
    /* W = K3 V: dK3 = dW V^T, dV = K3^T dW */
    ref_mm(0, 1, mq, L, e, 1, R->dw, R->v, 0, R->dk3);
    ref_mm(1, 0, L, e, mq, 1, R->k3, R->dw, 0, R->dv);
    /* iterations, last first: Z_t = 1/4 Z_{t-1} T3, T3 = 13I - P T2, T2 = 15I - P T1,
     * T1 = 7I - P, P = A Z_{t-1} (every matrix product X = Y W gives dY = dX W^T, dW = Y^T dX) */
    for (size_t x = 0; x < (size_t)mq * mk; x++) R->dk2[x] = 0;
    for (int it = h->iters; it >= 1; it--) {
        const double *zp = R->z + (it - 1) * zz;
        ref_factors(A, zp, mq, mk, R);
        ref_mm(0, 1, mk, mq, mq, 0.25, R->dz, R->T3, 0, R->dzp); /* dZ_{t-1} = 1/4 dZ_t T3^T */
        ref_mm(1, 0, mq, mq, mk, 0.25, zp, R->dz, 0, R->dT3);    /* dT3 = 1/4 Z_{t-1}^T dZ_t */
        /* T3 = 13I - P T2: dP = -dT3 T2^T, dT2 = -P^T dT3 */
        ref_mm(0, 1, mq, mq, mq, -1, R->dT3, R->T2, 0, R->dP);
        ref_mm(1, 0, mq, mq, mq, -1, R->P, R->dT3, 0, R->dT2);
        /* T2 = 15I - P T1: dP -= dT2 T1^T, dT1 = -P^T dT2 */
        ref_mm(0, 1, mq, mq, mq, -1, R->dT2, R->T1, 1, R->dP);
        ref_mm(1, 0, mq, mq, mq, -1, R->P, R->dT2, 0, R->dT1);
        /* T1 = 7I - P */
        for (size_t x = 0; x < (size_t)mq * mq; x++) R->dP[x] -= R->dT1[x];
        /* P = A Z_{t-1}: dA += dP Z_{t-1}^T, dZ_{t-1} += A^T dP */
        ref_mm(0, 1, mq, mk, mq, 1, R->dP, zp, 1, R->dk2);
        ref_mm(1, 0, mk, mq, mq, 1, A, R->dP, 1, R->dzp);
        double *sw = R->dz;
        R->dz = R->dzp, R->dzp = sw;
    }
    /* Z0[r][i] = A[i][r] / c, c = cc cr (cc = column sum jc, cr = row sum ir) */
    {
        int jc, ir;
        double cc, cr, c = ref_z0_scale(A, mq, mk, &jc, &ir, &cc, &cr), dc = 0;
        for (int r = 0; r < mk; r++)
            for (int i = 0; i < mq; i++) {
                R->dk2[(size_t)i * mk + r] += R->dz[(size_t)r * mq + i] / c;
                dc -= R->dz[(size_t)r * mq + i] * A[(size_t)i * mk + r] / (c * c);
            }
        for (int i = 0; i < mq; i++) R->dk2[(size_t)i * mk + jc] += dc * cr;
        for (int r = 0; r < mk; r++) R->dk2[(size_t)ir * mk + r] += dc * cc;
    }
    ref_softmax_grad(R->k1, R->dk1, n, mk);
    ref_softmax_grad(A, R->dk2, mq, mk);
    ref_softmax_grad(R->k3, R->dk3, mq, L);
    /* S1 = tau Q Kl^T, S2 = tau Ql Kl^T, S3 = tau Ql K^T */
    ref_mm(0, 0, n, d, mk, tau, R->dk1, R->kl, 0, R->dq);
    ref_mm(1, 0, mk, d, n, tau, R->dk1, R->q, 0, R->dkl);
    ref_mm(1, 0, mk, d, mq, tau, R->dk2, R->ql, 1, R->dkl);
    ref_mm(0, 0, mq, d, mk, tau, R->dk2, R->kl, 0, R->dql);
    ref_mm(0, 0, mq, d, L, tau, R->dk3, R->k, 1, R->dql);
    ref_mm(1, 0, L, d, mq, tau, R->dk3, R->ql, 0, R->dk);
    /* segment means: every row of a segment gets the segment's gradient / its length */
    ref_seg_mean_grad(R->dql, n, mq, d, R->dq);
    ref_seg_mean_grad(R->dkl, L, mk, d, R->dk);
}

static size_t nys_ref_saved_bytes(const ef_attn *a) {
    (void)a;
    return 0; /* the reference backward recomputes its forward */
}

/* Loads the valid rows of head bh of io (nq queries and dO rows, L keys and values) into R as
 * doubles; padded rows are not read. */
static void ref_load(const ef_attn *a, const ef_attn_io *io, const float *dout, size_t bh, int nq,
                     int L, nys_ref *R) {
    const ef_attn_shape *s = &a->shape;
    size_t d = s->head_dim, e = s->v_dim;
    const float *q = io->q + bh * s->q_len * d, *k = io->k + bh * s->kv_len * d;
    const float *v = io->v + bh * s->kv_len * e;
    for (size_t x = 0; x < (size_t)nq * d; x++) R->q[x] = q[x];
    for (size_t x = 0; x < (size_t)L * d; x++) R->k[x] = k[x];
    for (size_t x = 0; x < (size_t)L * e; x++) R->v[x] = v[x];
    if (dout)
        for (size_t x = 0; x < (size_t)nq * e; x++) R->g[x] = dout[bh * s->q_len * e + x];
}

static ef_status nys_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    (void)saved;
    nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t no = (size_t)s->q_len * s->v_dim;
    nys_ref R;
    ref_layout(a, p->rws, &R);
    for (int b = 0; b < s->batch; b++) {
        int L = ef_attn_kv_valid(a, io, b), nq = ef_attn_q_valid(a, io, b);
        for (int hh = 0; hh < s->heads; hh++) {
            size_t bh = (size_t)b * s->heads + hh;
            float *out = io->out + bh * no;
            for (size_t x = 0; x < no; x++) out[x] = 0; /* padded rows stay zero */
            if (L == 0 || nq == 0) continue;
            nys_dims h = head_dims(a, nq, L);
            ref_load(a, io, NULL, bh, nq, L, &R);
            ref_head_forward(&h, &R);
            for (size_t x = 0; x < (size_t)nq * s->v_dim; x++) out[x] = (float)R.out[x];
        }
    }
    return EF_OK;
}

static ef_status nys_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    (void)saved;
    nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t nq_ = (size_t)s->q_len * s->head_dim, nk = (size_t)s->kv_len * s->head_dim;
    size_t nv = (size_t)s->kv_len * s->v_dim;
    nys_ref R;
    ref_layout(a, p->rws, &R);
    for (int b = 0; b < s->batch; b++) {
        int L = ef_attn_kv_valid(a, io, b), nq = ef_attn_q_valid(a, io, b);
        for (int hh = 0; hh < s->heads; hh++) {
            size_t bh = (size_t)b * s->heads + hh;
            for (size_t x = 0; x < nq_; x++) dq[bh * nq_ + x] = 0;
            for (size_t x = 0; x < nk; x++) dk[bh * nk + x] = 0;
            for (size_t x = 0; x < nv; x++) dv[bh * nv + x] = 0;
            if (L == 0 || nq == 0) continue;
            nys_dims h = head_dims(a, nq, L);
            ref_load(a, io, dout, bh, nq, L, &R);
            ref_head_forward(&h, &R);
            ref_head_backward(&h, &R);
            for (size_t x = 0; x < (size_t)nq * s->head_dim; x++) dq[bh * nq_ + x] = (float)R.dq[x];
            for (size_t x = 0; x < (size_t)L * s->head_dim; x++) dk[bh * nk + x] = (float)R.dk[x];
            for (size_t x = 0; x < (size_t)L * s->v_dim; x++) dv[bh * nv + x] = (float)R.dv[x];
        }
    }
    return EF_OK;
}

/* Test hook (tests/test_nystrom.c; not part of the API): the reference forward of one head
 * entirely in double, for finite differences that float outputs would drown in rounding.
 * q [q_len][head_dim], k [kv_len][head_dim] and v [kv_len][v_dim] of one head; queries from
 * q_valid and keys from kv_valid on are padding (their rows of out are zero). The plan must
 * have ref=1. */
ef_status ef_nystrom_ref_head(ef_attn *a, int q_valid, int kv_valid, const double *q,
                              const double *k, const double *v, double *out);
ef_status ef_nystrom_ref_head(ef_attn *a, int q_valid, int kv_valid, const double *q,
                              const double *k, const double *v, double *out) {
    if (!a || !a->ref || a->ops->ref_forward != nys_ref_forward)
        return ef_error(EF_ERR_ARG, "ef_nystrom_ref_head: needs a nystrom plan with ref=1");
    const ef_attn_shape *s = &a->shape;
    if (kv_valid < 0 || kv_valid > s->kv_len || q_valid < 0 || q_valid > s->q_len)
        return ef_error(EF_ERR_ARG,
                        "ef_nystrom_ref_head: q_valid=%d outside [0, %d] or kv_valid=%d outside "
                        "[0, %d]",
                        q_valid, s->q_len, kv_valid, s->kv_len);
    size_t no = (size_t)s->q_len * s->v_dim;
    memset(out, 0, sizeof(double) * no);
    if (kv_valid == 0 || q_valid == 0) return EF_OK;
    nys_plan *p = a->impl;
    nys_ref R;
    ref_layout(a, p->rws, &R);
    memcpy(R.q, q, sizeof(double) * q_valid * s->head_dim);
    memcpy(R.k, k, sizeof(double) * kv_valid * s->head_dim);
    memcpy(R.v, v, sizeof(double) * kv_valid * s->v_dim);
    nys_dims h = head_dims(a, q_valid, kv_valid);
    ref_head_forward(&h, &R);
    memcpy(out, R.out, sizeof(double) * q_valid * s->v_dim);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Plan
 * ------------------------------------------------------------------------------------------- */
static void nys_destroy(ef_attn *a) {
    nys_plan *p = a->impl;
    if (!p) return;
    ef_free(p->ws);
    ef_free(p->rws);
    ef_free(p->status);
    ef_free(p);
    a->impl = NULL;
}

static ef_status nys_init(ef_attn *a) {
    if (a->causal)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "nystrom: causal=1 is not supported: the landmarks are means over "
                        "segments of the whole sequence, so every output would mix in future "
                        "tokens (masking K3 alone is not causal; xformers #751)");
    const ef_attn_shape *s = &a->shape;
    nys_plan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "nystrom: out of memory");
    a->impl = p;
    p->m = (int)ef_opt_i(a, NYS_LANDMARKS);
    p->iters = (int)ef_opt_i(a, NYS_PINV_ITERS);
    p->mk = EF_MIN(p->m, s->kv_len);
    p->mq = EF_MIN(p->m, s->q_len);
    if (a->ref) {
        size_t nd = ref_layout(a, NULL, NULL);
        p->rws = ef_malloc(nd * sizeof(double));
        if (!p->rws)
            return ef_error(EF_ERR_NOMEM, "nystrom: out of memory for the reference path (%.1f MB)",
                            nd * 8.0 / 1e6);
        a->ws_bytes = nd * sizeof(double);
        return EF_OK;
    }
    p->rec_floats = rec_layout(a, p->iters + 1, NULL, NULL);
    p->slot_floats = slot_layout(a, NULL, NULL);
    p->slots = (int)EF_MIN((int64_t)a->slots, (int64_t)s->batch * s->heads);
    p->status = ef_mem_calloc((size_t)p->slots, sizeof(ef_status));
    size_t nf = (size_t)p->slots * p->slot_floats;
    p->ws = ef_malloc(nf * sizeof(float));
    if (!p->status || !p->ws)
        return ef_error(EF_ERR_NOMEM, "nystrom: out of memory for the workspace (%.1f MB)",
                        nf * 4.0 / 1e6);
    a->ws_bytes = nf * sizeof(float);
    return EF_OK;
}

/* Products of the fast path, counted as 2 m n k each (element-wise work not counted), for
 * every key valid: m' = min(m, M), mq = min(m, N). */
static double nys_flops(const ef_attn *a, int backward) {
    const nys_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, mk = p->mk, mq = p->mq;
    double T = p->iters;
    double it = 4 * mq * mq * mk + 4 * mq * mq * mq;             /* P = A Z, P T1, P T2, Z T3 */
    double f = 2 * n * mk * d + 2 * mq * mk * d + 2 * mq * m * d /* S1, S2, S3 */
               + 2 * mq * m * e + 2 * mk * mq * e + 2 * n * mk * e /* W, U, out */ + T * it;
    if (backward)
        f += 4 * n * mk * e + 4 * mk * mq * e + 4 * mq * m * e /* dK1 dU, dZ dW, dK3 dV */
             + T * (it + 4 * mk * mq * mq + 8 * mq * mq * mq + 4 * mq * mq * mk) /* pinv */
             + 4 * n * mk * d + 4 * mq * mk * d + 4 * mq * m * d; /* dQ dKl, dKl dQl, dQl dK */
    return f * s->batch * s->heads;
}

const ef_attn_ops ef_attn_ops_nystrom = {
    .caps = {.cross = 1, .deterministic = 1},
    .name = "nystrom",
    .summary = "Nystromformer: softmax attention through m landmarks and an iterative pinv",
    .notes = "  landmarks are segment means of the valid queries (q_lens) and of the valid\n"
             "  keys (kv_lens); with fewer valid rows than landmarks, every valid row is its own\n"
             "  landmark. Padded rows are never read; they output zeros and get zero gradients.\n"
             "  causal=1 is refused (pooling mixes future tokens). Saves B*H*((N+M)*m + (T+2)*m*m\n"
             "  + m*(2D+2Dv)) floats (T = pinv_iters); any head_dim, v_dim.",
    .opts = nys_opts,
    .n_opts = (int)(sizeof nys_opts / sizeof nys_opts[0]),
    .init = nys_init,
    .destroy = nys_destroy,
    .flops = nys_flops,
    .saved_bytes = nys_saved_bytes,
    .forward = nys_forward,
    .backward = nys_backward,
    .ref_saved_bytes = nys_ref_saved_bytes,
    .ref_forward = nys_ref_forward,
    .ref_backward = nys_ref_backward,
};
