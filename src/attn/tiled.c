/*
 * tiled.c - the tiled engine: exact softmax attention over a pattern of visible key chunks,
 * fused with an online softmax (Dao et al., FlashAttention-2, 2023; Rabe & Staats 2021), in
 * O(N) memory. `flash` (every chunk visible) and the block-sparse layouts run on it.
 * docs/flash.md has the derivation, docs/sparse.md the patterns.
 *
 * Layout trick: inside a tile every vector holds EF_VL *queries* (lanes = queries). Scores are
 * computed transposed, S^T[j][i] = sum_d K[j][d] * Qt[d][i], by broadcasting K elements
 * against rows of a transposed query tile, so the per-query softmax statistics (running max,
 * running sum) are plain vertical vector operations and K, V are read in place. The only
 * transposes are the query tile in and the output tile out, once per query tile.
 *
 * Forward, for each (batch, head, query tile of QT rows), over the visible key chunks of KT:
 *   S^T = K_j Qt (scale folded into Qt), masked (-inf) where j > i (causal), j >= kv_lens[b],
 *         or (partial chunks) where the pattern hides the pair
 *   m' = max(m, max_j S^T);  P^T = exp(S^T - m');  l = l e^(m-m') + sum_j P^T
 *   O^T = O^T e^(m-m') + V_j^T P^T
 *   finally O = O^T / l, lse = m + log l (l = 0: O = 0, lse = -inf).
 * Saved for backward: lse [batch][heads][q_len] floats.
 * Backward, for each (batch, head) and each query tile i: delta_i = dO_i . O_i; then for each
 * visible chunk j: recompute P^T = exp(S^T - lse); dV_j += P^T dO_i; dP^T = V_j dO_i^T;
 * dS^T = P^T o (dP^T - delta); dK_j += dS^T (scale Q_i); dQ_i^T += K_j^T dS^T. The query and dO
 * tiles are packed once per query tile; dK, dV accumulate over the head in per-thread buffers.
 * Work items are (b, h, query tile) forward and (b, h, key range) backward (one range per head
 * unless there are fewer than two heads: then partial dQ of the ranges are summed in a fixed
 * order), each done by one thread in a fixed order: results are bitwise identical for any
 * thread count.
 * Workspace: per thread, a few tiles plus, in backward, dK and dV of one key range (at most
 * kv_len x (D+Dv)), and the partial dQ of the extra ranges; the spans: a few per query tile (per
 * head if the pattern differs between heads). Time O(B H (visible chunks) QT KT D); memory O(B H N)
 * saved + O(threads (N D + tiles)).
 */
#include "attn/attn.h"
#include "core/vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { QT = EF_QT, QV = QT / EF_VL, KT = EF_KT, TILED_MAX_DIM = 256 };

static int pad16(int x) { return (x + EF_VL - 1) / EF_VL * EF_VL; }

/* ---------------------------------------------------------------------------------------------
 * The one micro-kernel: C[r][0:L] (+)= sum_t A(r, t) * B[t][0:L], with A(r, t) = A[r*ars + t*ats]
 * broadcast and the rows of B and C vectors (L a multiple of 16, B and C 64-byte aligned rows).
 * Register tile: up to MK_RB rows x MK_NV vectors, sized to the register file so that the
 * accumulators never spill: AVX-512 has 32 zmm (6 x 4 = 24 accumulators, 64 lanes); AVX2 has
 * 16 ymm (6 x 2 = 12, 16 lanes); NEON 32 q registers (6 x 4 = 24, 16 lanes); SSE 16 xmm
 * (4 x 2 = 8, 8 lanes).
 * ------------------------------------------------------------------------------------------- */
#if defined(__AVX512F__) || defined(__aarch64__)
#define MK_RB 6
#define MK_NV 4
#elif defined(__AVX__)
#define MK_RB 6
#define MK_NV 2
#else
#define MK_RB 4
#define MK_NV 2
#endif

EF_INLINE void mk(const int RB, const int NV, int T, const float *A, ptrdiff_t ars, ptrdiff_t ats,
                  const float *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc) {
    vf c[MK_RB][MK_NV];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = acc ? vf_load(C + r * ldc + v * EF_VL) : vf_set1(0);
    for (int t = 0; t < T; t++) {
        vf b[MK_NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = vf_load(B + t * ldb + v * EF_VL);
#pragma GCC unroll 6
        for (int r = 0; r < RB; r++) {
            vf a = vf_set1(A[r * ars + t * ats]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] += a * b[v];
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) vf_store(C + r * ldc + v * EF_VL, c[r][v]);
}

/* Calls mk with compile-time RB (1..MK_RB) and NV (1..MK_NV). */
#define MK_CALL(RB, NV)                                                                            \
    mk(RB, NV, T, A + r0 * ars, ars, ats, B + l0, ldb, C + r0 * ldc + l0, ldc, acc)
#if MK_NV >= 4
#define MK_CASE_34(RB)                                                                             \
    case 3: MK_CALL(RB, 3); break;                                                                 \
    case 4:                                                                                        \
        MK_CALL(RB, 4);                                                                            \
        break;
#else
#define MK_CASE_34(RB)
#endif
#define MK_NV_SWITCH(RB)                                                                           \
    switch (nv) {                                                                                  \
    case 1: MK_CALL(RB, 1); break;                                                                 \
    case 2:                                                                                        \
        MK_CALL(RB, 2);                                                                            \
        break;                                                                                     \
        MK_CASE_34(RB)                                                                             \
    default: break;                                                                                \
    }

void ef_tile_gemm(int R, int T, int L, const float *A, ptrdiff_t ars, ptrdiff_t ats, const float *B,
                  ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc) {
    for (int l0 = 0; l0 < L; l0 += MK_NV * EF_VL) {
        int nv = EF_MIN(MK_NV, (L - l0) / EF_VL);
        int r0 = 0;
        for (; r0 + MK_RB <= R; r0 += MK_RB) MK_NV_SWITCH(MK_RB)
        switch (R - r0) {
#if MK_RB > 5
        case 5: MK_NV_SWITCH(5) break;
        case 4: MK_NV_SWITCH(4) break;
#endif
        case 3: MK_NV_SWITCH(3) break;
        case 2: MK_NV_SWITCH(2) break;
        case 1: MK_NV_SWITCH(1) break;
        default: break;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Plan state
 * ------------------------------------------------------------------------------------------- */
typedef struct tiled_ws { /* one per thread slot; every array 64-byte aligned */
    float *qt;            /* [D][QT]   scaled, transposed query tile */
    float *st;            /* [KT][QT]  scores / probabilities, transposed */
    float *ot;            /* [Dv][QT]  output accumulator, transposed */
    float *qp;            /* [QT][Dp]  scaled query tile, zero-padded rows (backward) */
    float *dot;           /* [Dv][QT]  dO tile, transposed (backward) */
    float *dop;           /* [QT][Dvp] dO tile, zero-padded rows (backward) */
    float *dpt;           /* [KT][QT]  dP^T then dS^T (backward) */
    float *dqt;           /* [D][QT]   dQ^T of one query tile (backward) */
    float *dk;            /* [M][Dp]   dK accumulator of one head (backward; NULL past bwd_slots) */
    float *dv;            /* [M][Dvp]  dV accumulator of one head (backward; NULL past bwd_slots) */
} tiled_ws;

typedef struct ef_span {
    int32_t j0, j1; /* keys [j0, j1), multiples of KT except at kv_len */
    int32_t masked; /* apply the pattern's tile_mask to each chunk */
} ef_span;

typedef struct tiled_plan {
    int dp, dvp, ntiles; /* padded dims, query tiles */
    int bwd_slots;       /* threads backward may use: (head, split) pairs are its work items */
    int splits;          /* key ranges per head in backward (> 1 only when heads are few) */
    float *dqpart;       /* [(splits-1)][B*H][N][D] partial dQ of splits 1.. (summed in order) */
    tiled_ws *ws;
    void *block;
    ef_tiled_pattern pat;
    void *user;
    int layout_heads; /* heads with their own spans: 1 or heads */
    int64_t *off;     /* spans of (head, tile) are spans[off[h*ntiles+t] .. off[h*ntiles+t+1]) */
    ef_span *spans;
} tiled_plan;

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

static ef_status build_spans(ef_attn *a);

ef_status ef_tiled_init(ef_attn *a, const ef_tiled_pattern *pat, void *user) {
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = calloc(1, sizeof *p);
    if (!p) {
        free(user);
        return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    }
    a->impl = p;
    p->pat = *pat;
    p->user = user;
    if (s->head_dim > TILED_MAX_DIM || s->v_dim > TILED_MAX_DIM)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "%s: head_dim=%d v_dim=%d; the tiled kernel supports dimensions up to %d "
                        "(use full for larger heads)",
                        a->ops->name, s->head_dim, s->v_dim, TILED_MAX_DIM);
    int d = s->head_dim, dv = s->v_dim;
    p->dp = pad16(d), p->dvp = pad16(dv), p->ntiles = (s->q_len + QT - 1) / QT;
    /* Backward gives each thread a head; with fewer heads than EF_BWD_ITEMS it also splits each
     * head's keys into ranges, whose partial dQ are summed in a fixed order. The split depends
     * on the shape only, so results do not depend on the thread count. */
    enum { EF_BWD_ITEMS = 2 };
    int64_t bh = (int64_t)s->batch * s->heads;
    int nch = (s->kv_len + KT - 1) / KT;
    p->splits = bh >= EF_BWD_ITEMS ? 1 : (int)EF_MIN((int64_t)nch, (EF_BWD_ITEMS + bh - 1) / bh);
    p->bwd_slots = (int)EF_MIN((int64_t)a->slots, bh * p->splits);
    enum { NSMALL = 8 };
    size_t small[NSMALL] = {(size_t)d * QT,     (size_t)KT * QT, (size_t)dv * QT,
                            (size_t)QT * p->dp, (size_t)dv * QT, (size_t)QT * p->dvp,
                            (size_t)KT * QT,    (size_t)d * QT};
    /* a backward item accumulates dK, dV of its key range only: rows [klo, khi) */
    size_t rows =
        p->splits > 1 ? (size_t)((nch + p->splits - 1) / p->splits) * KT : (size_t)s->kv_len;
    size_t big[2] = {rows * p->dp, rows * p->dvp};
    size_t total = 0;
    for (int i = 0; i < NSMALL; i++) total += round16(small[i]) * a->slots;
    for (int i = 0; i < 2; i++) total += round16(big[i]) * p->bwd_slots;
    size_t part = (size_t)(p->splits - 1) * bh * s->q_len * d;
    total += round16(part);
    p->ws = calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_attn_ws_alloc(a, total * sizeof(float)); /* shareable: see attn.h */
    if (!p->ws || !p->block)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of workspace", a->ops->name,
                        total * 4.0 / 1e6);
    a->ws_bytes = total * sizeof(float);
    memset(p->block, 0, a->ws_bytes); /* padding lanes and columns start (and stay) zero */
    float *cur = p->block;
    p->dqpart = part ? cur : NULL;
    cur += round16(part);
    for (int t = 0; t < a->slots; t++) {
        tiled_ws *w = &p->ws[t];
        float **f[NSMALL] = {&w->qt, &w->st, &w->ot, &w->qp, &w->dot, &w->dop, &w->dpt, &w->dqt};
        for (int i = 0; i < NSMALL; i++) *f[i] = cur, cur += round16(small[i]);
        if (t < p->bwd_slots) {
            w->dk = cur, cur += round16(big[0]);
            w->dv = cur, cur += round16(big[1]);
        }
    }
    return build_spans(a);
}

void *ef_tiled_user(const ef_attn *a) {
    return a->impl ? ((const tiled_plan *)a->impl)->user : NULL;
}

/* Asks the pattern about every (query tile, key chunk) and keeps the visible chunks, merged
 * into spans of equal kind. Two passes: count, then fill. */
static ef_status build_spans(ef_attn *a) {
    tiled_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int nchunks = (s->kv_len + KT - 1) / KT;
    p->layout_heads = p->pat.per_head ? s->heads : 1;
    int64_t cells = (int64_t)p->layout_heads * p->ntiles;
    p->off = malloc(sizeof(int64_t) * (size_t)(cells + 1));
    if (!p->off) return ef_error(EF_ERR_NOMEM, "%s: out of memory for the layout", a->ops->name);
    for (int pass = 0; pass < 2; pass++) {
        int64_t n = 0;
        for (int h = 0; h < p->layout_heads; h++)
            for (int t = 0; t < p->ntiles; t++) {
                int i0 = t * QT, i1 = EF_MIN(s->q_len, i0 + QT), prev = EF_CHUNK_NONE;
                p->off[(int64_t)h * p->ntiles + t] = n;
                for (int c = 0; c < nchunks; c++) {
                    int j0 = c * KT, j1 = EF_MIN(s->kv_len, j0 + KT);
                    /* chunks wholly above the diagonal are never visible when causal */
                    int kind = a->causal && j0 > i1 - 1 ? EF_CHUNK_NONE
                                                        : p->pat.classify(a, h, i0, i1, j0, j1);
                    if (kind != EF_CHUNK_NONE && kind == prev) {
                        if (pass) p->spans[n - 1].j1 = j1;
                    } else if (kind != EF_CHUNK_NONE) {
                        if (pass) p->spans[n] = (ef_span){j0, j1, kind == EF_CHUNK_PARTIAL};
                        n++;
                    }
                    prev = kind;
                }
            }
        p->off[cells] = n;
        if (!pass) {
            p->spans = malloc(sizeof(ef_span) * (size_t)(n ? n : 1));
            if (!p->spans)
                return ef_error(EF_ERR_NOMEM, "%s: out of memory for %lld spans", a->ops->name,
                                (long long)n);
            a->ws_bytes += sizeof(ef_span) * (size_t)n + sizeof(int64_t) * (size_t)(cells + 1);
        }
    }
    return EF_OK;
}

static const ef_span *spans_of(const tiled_plan *p, int head, int tile, int *count) {
    int64_t cell = (int64_t)(p->layout_heads > 1 ? head : 0) * p->ntiles + tile;
    *count = (int)(p->off[cell + 1] - p->off[cell]);
    return p->spans + p->off[cell];
}

void ef_tiled_destroy(ef_attn *a) {
    tiled_plan *p = a->impl;
    if (!p) return;
    ef_attn_ws_free(a, p->block);
    free(p->ws);
    free(p->off);
    free(p->spans);
    free(p->user);
    free(p);
    a->impl = NULL;
}

size_t ef_tiled_saved_bytes(const ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    return (size_t)s->batch * s->heads * s->q_len * sizeof(float);
}

/* Transposed, scaled copy of query rows [i0, i0+n) into qt[D][QT]; lanes >= n are zero. */
static void pack_qt(float *qt, const float *q, int d, int n, float scale) {
    for (int t = 0; t < d; t++) {
        float *row = qt + (size_t)t * QT;
        for (int i = 0; i < n; i++) row[i] = q[(size_t)i * d + t] * scale;
        for (int i = n; i < QT; i++) row[i] = 0;
    }
}

/* S^T masked for causality: lanes (queries i0+l) with j > i0+l get -inf. */
static void mask_causal(float *st, int rows, int j0, int i0) {
    vi iota = vi_iota();
    for (int r = 0; r < rows; r++) {
        int j = j0 + r;
        if (j <= i0) continue;
        for (int v = 0; v < QV; v++) {
            vi qi = iota + (i0 + v * EF_VL);
            vi hide = qi < j;
            float *p = st + (size_t)r * QT + v * EF_VL;
            vf_store(p, vf_select(hide, vf_set1(-__builtin_inff()), vf_load(p)));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
typedef struct tiled_call {
    ef_attn *a;
    const ef_attn_io *io;
    float *lse; /* saved, or NULL */
    const float *dout;
    float *dq, *dk, *dv;
} tiled_call;

static void forward_tile(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    tiled_ws *w = &p->ws[tid];
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    int64_t bh = item / p->ntiles;
    int it = (int)(item % p->ntiles), b = (int)(bh / s->heads);
    int i0 = it * QT, qn = EF_MIN(QT, n - i0);
    float *out = c->io->out + ((size_t)bh * n + i0) * dv;
    /* rows past q_lens[b] are padding: never read, output zeros, lse = -inf */
    int qv = EF_MIN(qn, ef_attn_q_valid(a, c->io, b) - i0);
    if (qv < qn) {
        int from = EF_MAX(qv, 0);
        memset(out + (size_t)from * dv, 0, sizeof(float) * (size_t)(qn - from) * dv);
        if (c->lse)
            for (int i = from; i < qn; i++) c->lse[(size_t)bh * n + i0 + i] = -__builtin_inff();
        if (qv <= 0) return;
    }
    const float *q = c->io->q + ((size_t)bh * n + i0) * d;
    const float *k = c->io->k + (size_t)bh * m * d, *v = c->io->v + (size_t)bh * m * dv;
    int kv_end = ef_attn_kv_valid(a, c->io, b);
    if (a->causal) kv_end = EF_MIN(kv_end, i0 + qv);

    pack_qt(w->qt, q, d, qv, a->scale);
    vf mx[QV], l[QV];
    for (int u = 0; u < QV; u++) mx[u] = vf_set1(-__builtin_inff()), l[u] = vf_set1(0);
    memset(w->ot, 0, sizeof(float) * dv * QT);

    int h = (int)(bh % s->heads), nspans;
    const ef_span *sp = spans_of(p, h, it, &nspans);
    for (int x = 0; x < nspans; x++)
        for (int j0 = sp[x].j0; j0 < EF_MIN(sp[x].j1, kv_end); j0 += KT) {
            int kn = EF_MIN(KT, EF_MIN(sp[x].j1, kv_end) - j0);
            ef_tile_gemm(kn, d, QT, k + (size_t)j0 * d, d, 1, w->qt, QT, w->st, QT, 0);
            if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0);
            if (sp[x].masked) p->pat.tile_mask(a, h, i0, j0, kn, w->st);
            vf alpha[QV];
            for (int u = 0; u < QV; u++) {
                vf tmax = mx[u];
                for (int r = 0; r < kn; r++)
                    tmax = vf_max(tmax, vf_load(w->st + r * QT + u * EF_VL));
                /* a lane that has seen only -inf subtracts 0, so exp(-inf - 0) = 0, never NaN */
                vf use = vf_select(tmax == -__builtin_inff(), vf_set1(0), tmax);
                alpha[u] = vf_exp(mx[u] - use);
                vf sum = vf_set1(0);
                for (int r = 0; r < kn; r++) {
                    float *ps = w->st + r * QT + u * EF_VL;
                    vf e = vf_exp(vf_load(ps) - use);
                    vf_store(ps, e);
                    sum += e;
                }
                l[u] = l[u] * alpha[u] + sum;
                mx[u] = tmax;
            }
            for (int e = 0; e < dv; e++)
                for (int u = 0; u < QV; u++) {
                    float *po = w->ot + (size_t)e * QT + u * EF_VL;
                    vf_store(po, vf_load(po) * alpha[u]);
                }
            /* O^T[e][i] += sum_j V[j][e] P^T[j][i] */
            ef_tile_gemm(dv, kn, QT, v + (size_t)j0 * dv, 1, dv, w->st, QT, w->ot, QT, 1);
        }

    float inv[QT] __attribute__((aligned(64))), lse[QT] __attribute__((aligned(64)));
    for (int u = 0; u < QV; u++) {
        vf has = vf_select(l[u] > 0, vf_set1(1), vf_set1(0));
        vf_store(inv + u * EF_VL, has / vf_select(l[u] > 0, l[u], vf_set1(1)));
        for (int t = 0; t < EF_VL; t++)
            lse[u * EF_VL + t] = l[u][t] > 0 ? mx[u][t] + logf(l[u][t]) : -__builtin_inff();
    }
    for (int i = 0; i < qv; i++)
        for (int e = 0; e < dv; e++) out[(size_t)i * dv + e] = w->ot[(size_t)e * QT + i] * inv[i];
    if (c->lse) memcpy(c->lse + (size_t)bh * n + i0, lse, sizeof(float) * qv);
}

ef_status ef_tiled_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    tiled_call c = {a, io, saved, NULL, NULL, NULL, NULL};
    ef_parallel_for((int64_t)s->batch * s->heads * p->ntiles, ef_attn_threads(a), forward_tile, &c);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------- */
static void backward_head(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    tiled_ws *w = &p->ws[tid];
    int64_t bh = item / p->splits;
    int split = (int)(item % p->splits), nch = (s->kv_len + KT - 1) / KT;
    /* this item's keys: chunks [split nch / splits, (split+1) nch / splits) */
    int klo = (int)((int64_t)split * nch / p->splits) * KT;
    int khi = EF_MIN(s->kv_len, (int)((int64_t)(split + 1) * nch / p->splits) * KT);
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, dp = p->dp, dvp = p->dvp;
    int b = (int)(bh / s->heads);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv, *o = c->io->out + (size_t)bh * n * dv;
    const float *g = c->dout + (size_t)bh * n * dv, *lse = c->lse + (size_t)bh * n;
    float *dq = split == 0 ? c->dq + (size_t)bh * n * d
                           : p->dqpart + ((size_t)(split - 1) * s->batch * s->heads + bh) * n * d;
    float *dk = c->dk + (size_t)bh * m * d;
    float *dvo = c->dv + (size_t)bh * m * dv;
    int kv_valid = ef_attn_kv_valid(a, c->io, b), q_valid = ef_attn_q_valid(a, c->io, b);

    /* w->dk, w->dv hold rows [klo, khi) of this head's dK, dV */
    memset(w->dk, 0, sizeof(float) * (size_t)(khi - klo) * dp);
    memset(w->dv, 0, sizeof(float) * (size_t)(khi - klo) * dvp);
    for (int it = 0; it < p->ntiles; it++) {
        int i0 = it * QT, qn = EF_MIN(QT, n - i0);
        /* rows past q_lens[b] are padding lanes: their q, dO and O are never read, dQ = 0 */
        int qv = EF_MAX(0, EF_MIN(qn, q_valid - i0));
        int kv_end = a->causal ? EF_MIN(kv_valid, i0 + qv) : kv_valid;
        kv_end = EF_MIN(kv_end, khi);
        if (qv == 0 || kv_end <= klo) { /* no query of this tile sees a key of this range */
            memset(dq + (size_t)i0 * d, 0, sizeof(float) * (size_t)qn * d);
            continue;
        }
        /* pack Q (transposed and row-padded, both scaled) and dO (both ways) */
        pack_qt(w->qt, q + (size_t)i0 * d, d, qv, a->scale);
        pack_qt(w->dot, g + (size_t)i0 * dv, dv, qv, 1.0f);
        float lse_use[QT] __attribute__((aligned(64))), dl[QT] __attribute__((aligned(64)));
        for (int i = 0; i < QT; i++) {
            float *qr = w->qp + (size_t)i * dp, *gr = w->dop + (size_t)i * dvp;
            if (i < qv) {
                const float *qi = q + (size_t)(i0 + i) * d, *gi = g + (size_t)(i0 + i) * dv;
                const float *oi = o + (size_t)(i0 + i) * dv;
                for (int t = 0; t < d; t++) qr[t] = qi[t] * a->scale;
                memcpy(gr, gi, sizeof(float) * dv);
                double acc = 0; /* delta_i = dO_i . O_i */
                for (int e = 0; e < dv; e++) acc += (double)gi[e] * oi[e];
                dl[i] = (float)acc;
                /* a row that saw no key has lse = -inf: use +inf so P = exp(S - inf) = 0 */
                lse_use[i] = lse[i0 + i] != -__builtin_inff() ? lse[i0 + i] : __builtin_inff();
            } else {
                memset(qr, 0, sizeof(float) * d);
                memset(gr, 0, sizeof(float) * dv);
                dl[i] = 0, lse_use[i] = __builtin_inff(); /* padding lanes: P = 0 */
            }
        }
        memset(w->dqt, 0, sizeof(float) * d * QT);
        int nspans;
        const ef_span *sp = spans_of(p, (int)(bh % s->heads), it, &nspans);
        for (int x = 0; x < nspans; x++)
            for (int j0 = EF_MAX(sp[x].j0, klo); j0 < EF_MIN(sp[x].j1, kv_end); j0 += KT) {
                int kn = EF_MIN(KT, EF_MIN(sp[x].j1, kv_end) - j0);
                /* P^T = exp(S^T - lse) */
                ef_tile_gemm(kn, d, QT, k + (size_t)j0 * d, d, 1, w->qt, QT, w->st, QT, 0);
                if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0);
                if (sp[x].masked) p->pat.tile_mask(a, (int)(bh % s->heads), i0, j0, kn, w->st);
                for (int r = 0; r < kn; r++)
                    for (int u = 0; u < QV; u++) {
                        float *ps = w->st + r * QT + u * EF_VL;
                        vf_store(ps, vf_exp(vf_load(ps) - vf_load(lse_use + u * EF_VL)));
                    }
                /* dV[j][e] += sum_i P^T[j][i] dO[i][e] */
                ef_tile_gemm(kn, QT, dvp, w->st, QT, 1, w->dop, dvp, w->dv + (size_t)(j0 - klo) * dvp,
                           dvp, 1);
                /* dP^T[j][i] = sum_e V[j][e] dO^T[e][i];  dS^T = P^T o (dP^T - delta) */
                ef_tile_gemm(kn, dv, QT, v + (size_t)j0 * dv, dv, 1, w->dot, QT, w->dpt, QT, 0);
                for (int r = 0; r < kn; r++)
                    for (int u = 0; u < QV; u++) {
                        float *pd = w->dpt + r * QT + u * EF_VL;
                        vf pp = vf_load(w->st + r * QT + u * EF_VL);
                        vf_store(pd, pp * (vf_load(pd) - vf_load(dl + u * EF_VL)));
                    }
                /* dK[j][t] += sum_i dS^T[j][i] (scale Q)[i][t] */
                ef_tile_gemm(kn, QT, dp, w->dpt, QT, 1, w->qp, dp, w->dk + (size_t)(j0 - klo) * dp,
                           dp, 1);
                /* dQ^T[t][i] += sum_j K[j][t] dS^T[j][i]   (times scale below) */
                ef_tile_gemm(d, kn, QT, k + (size_t)j0 * d, 1, d, w->dpt, QT, w->dqt, QT, 1);
            }
        for (int i = 0; i < qn; i++)
            for (int t = 0; t < d; t++)
                dq[(size_t)(i0 + i) * d + t] = w->dqt[(size_t)t * QT + i] * a->scale;
    }
    for (int j = klo; j < khi; j++) { /* keys past kv_valid stay at zero */
        memcpy(dk + (size_t)j * d, w->dk + (size_t)(j - klo) * dp, sizeof(float) * d);
        memcpy(dvo + (size_t)j * dv, w->dv + (size_t)(j - klo) * dvp, sizeof(float) * dv);
    }
}

ef_status ef_tiled_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                            float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    tiled_call c = {a, io, (float *)saved, dout, dq, dk, dv};
    tiled_plan *p = a->impl;
    int64_t bh = (int64_t)s->batch * s->heads;
    ef_parallel_for(bh * p->splits, EF_MIN(ef_attn_threads(a), p->bwd_slots), backward_head, &c);
    size_t per = (size_t)s->q_len * s->head_dim;
    for (int split = 1; split < p->splits; split++) /* fixed order: split 1, 2, ... */
        for (int64_t h = 0; h < bh; h++) {
            const float *src = p->dqpart + ((size_t)(split - 1) * bh + h) * per;
            float *dst = dq + (size_t)h * per;
            for (size_t x = 0; x < per; x++) dst[x] += src[x];
        }
    return EF_OK;
}

/* Visible pairs of one head: closed form on whole chunks, the masks counted on partial ones. */
int64_t ef_tiled_pairs(const ef_attn *a, int head) {
    const tiled_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    float st[KT * QT] __attribute__((aligned(64)));
    int64_t total = 0;
    for (int t = 0; t < p->ntiles; t++) {
        int i0 = t * QT, qn = EF_MIN(QT, s->q_len - i0), nspans;
        const ef_span *sp = spans_of(p, head, t, &nspans);
        for (int x = 0; x < nspans; x++)
            for (int j0 = sp[x].j0; j0 < sp[x].j1; j0 += KT) {
                int kn = EF_MIN(KT, sp[x].j1 - j0);
                if (!sp[x].masked) {
                    for (int i = i0; i < i0 + qn; i++) /* keys j0..j0+kn-1 (<= i when causal) */
                        total += a->causal ? EF_MAX(0, EF_MIN(kn, i - j0 + 1)) : kn;
                    continue;
                }
                memset(st, 0, sizeof st);
                if (a->causal) mask_causal(st, kn, j0, i0);
                p->pat.tile_mask(a, head, i0, j0, kn, st);
                for (int r = 0; r < kn; r++)
                    for (int l = 0; l < qn; l++) total += st[r * QT + l] != -__builtin_inff();
            }
    }
    return total;
}
