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
 * Patterns beyond chunk classification (attn.h, docs/sparse.md): a grid origin (tiles start
 * after a prefix), one-block tiles for blocks below 64, key spans listed by the pattern, and a
 * stride pass: each residue class (queries and keys r, r + s, ...) as a dense problem,
 * resuming the first pass's online softmax from its (out, lse); its backward adds the class
 * pairs' gradient terms with the same lse and delta.
 * Tiles of at most 16 queries whose spans need no mask run in the row layout (below: queries
 * as rows, keys as lanes, from per-thread panels of the head's K and V, D x N floats each per
 * thread slot), where the transposed layout would leave one vector per product.
 */
#include "attn/attn.h"
#include "attn/softmax.h"
#include "core/vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { QT = EF_QT, QV = QT / EF_VL, KT = EF_KT, TILED_MAX_DIM = 256 };
/* the row layout: tiles of at most ROW_QT queries, key chunks of at most RK keys */
enum { ROW_QT = 16, RK = 128, RKV = RK / EF_VL };

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
                  const float *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc,
                  const float *cs) {
    vf c[MK_RB][MK_NV];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            c[r][v] = acc ? vf_load(C + r * ldc + v * EF_VL) : vf_set1(0);
            if (cs) c[r][v] *= vf_load(cs + v * EF_VL);
        }
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
    mk(RB, NV, T, A + r0 * ars, ars, ats, B + l0, ldb, C + r0 * ldc + l0, ldc, acc,                \
       cs ? cs + l0 : NULL)
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

/* ef_tile_gemm with the accumulator's columns (lanes) scaled first: C[r][l] = C[r][l] * cs[l]
 * + sum_t A(r, t) B[t][l] (cs NULL: no scaling). The online softmax's O^T e^(m - m') + V^T P^T
 * in one pass over O^T. */
static void tile_gemm(int R, int T, int L, const float *A, ptrdiff_t ars, ptrdiff_t ats,
                      const float *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc,
                      const float *cs) {
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

void ef_tile_gemm(int R, int T, int L, const float *A, ptrdiff_t ars, ptrdiff_t ats, const float *B,
                  ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc) {
    tile_gemm(R, T, L, A, ars, ats, B, ldb, C, ldc, acc, NULL);
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
    float *dk;            /* [rows][Dp]  dK accumulator of one key range (backward; NULL past
                             bwd_slots) */
    float *dv;            /* [rows][Dvp] dV accumulator of one key range (idem) */
    uint8_t *kz;          /* [rows / EF_ZB + 2] backward: ef_kacc's blocks zeroed already */
    float *kt, *vt;       /* one head's K and V in panels (row layout; vt backward): panel b =
                             keys [b EF_VL, (b+1) EF_VL) transposed, [D][EF_VL] */
    float *kpan;          /* [RKV][max(D, Dv)][EF_VL] panels of a chunk's unaligned vectors */
    int64_t kt_bh;        /* the (batch, head) kt holds in this call; -1 = none */
} tiled_ws;

typedef struct ef_span {
    int32_t j0, j1; /* keys [j0, j1) */
    int32_t masked; /* apply the pattern's tile_mask to each chunk */
} ef_span;

typedef struct tiled_plan {
    int dp, dvp, ntiles; /* padded dims, query tiles */
    int q0;              /* the grids' origin (positions before it form tiles of their own) */
    int qt, nv;          /* query tile height (lanes used, <= QT) and its vectors */
    int kt;              /* the key grid the pattern is asked about (chunk width, <= KT) */
    int stride;          /* the pattern's stride (0 = none): the stride pass */
    int rows;            /* tiles of at most ROW_QT queries use the row layout (below) */
    int mp;              /* keys in kt, vt: kv_len rounded up to whole panels */
    int fgroups;         /* row layout or short tiles: forward work items per head (groups of
                            tiles); 0 = a tile per item */
    int cgroup;          /* classes per stride-pass work item */
    int bwd_slots;       /* threads backward may use: (head, split) pairs are its work items */
    int splits;          /* key ranges per head in backward (> 1 only when heads are few) */
    float *dqpart;       /* [(splits-1)][B*H][N][D] partial dQ of splits 1.. (summed in order) */
    float *lse_tmp;      /* [B*H][N] lse when the caller saves none (stride pass only) */
    tiled_ws *ws;
    void *block;
    ef_tiled_pattern pat;
    void *user;
    int layout_heads; /* heads with their own spans: 1 or heads */
    int64_t *off;     /* spans of (head, tile) are spans[off[h*ntiles+t] .. off[h*ntiles+t+1]) */
    ef_span *spans;
} tiled_plan;

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

/* Positions [*i0, *i0 + *len) of tile t of a grid of width w over n positions that starts at
 * q0: the positions before q0 form tiles of their own. */
static void grid_range(int q0, int w, int n, int t, int *i0, int *len) {
    int lead = (q0 + w - 1) / w;
    int a = t < lead ? t * w : q0 + (t - lead) * w;
    int end = t < lead ? EF_MIN(q0, a + w) : a + w;
    *i0 = a, *len = EF_MIN(end, n) - a;
}
static int grid_count(int q0, int w, int n) { return (q0 + w - 1) / w + (n - q0 + w - 1) / w; }
/* Query tile t; key chunk t of the pattern's grid. */
static void tile_range(const tiled_plan *p, int n, int t, int *i0, int *len) {
    grid_range(p->q0, p->qt, n, t, i0, len);
}
static void chunk_range(const tiled_plan *p, int m, int t, int *j0, int *len) {
    grid_range(p->q0, p->kt, m, t, j0, len);
}

/* Prefetches rows [r0, r1) (ld floats apart, n floats each) of x: the stride pass's rows are a
 * residue class, s rows apart, which the hardware prefetchers do not follow across pages.
 * Always inlined, as pf_issue (below): a call whose only effects are prefetches may be
 * dropped. */
EF_INLINE void prefetch_rows(const float *x, size_t ld, int n, int r0, int r1) {
    for (int r = r0; r < r1; r++) ef_prefetch(x + (size_t)r * ld, n);
}

/* Members of residue class r (positions r, r + s, ...) below `limit`. */
static int class_count(int limit, int r, int s) { return limit > r ? (limit - r + s - 1) / s : 0; }
/* Residue classes of the stride pass (the queries' residues). */
static int stride_classes(const tiled_plan *p, const ef_attn_shape *s) {
    return EF_MIN(p->stride, s->q_len);
}

static ef_status build_spans(ef_attn *a);
static int short_tiles(const tiled_plan *p);

ef_status ef_tiled_init(ef_attn *a, const ef_tiled_pattern *pat, void *user) {
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) {
        ef_free(user);
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
    p->q0 = pat->origin ? EF_MIN(pat->origin(a), EF_MIN(s->q_len, s->kv_len)) : 0;
    p->stride = pat->stride ? pat->stride(a) : 0;
    /* classes per stride-pass work item: up to 16, as long as each thread gets several items */
    int ncls = stride_classes(p, s);
    p->cgroup = 16;
    while (p->cgroup > 1 &&
           (int64_t)s->batch * s->heads * ((ncls + p->cgroup - 1) / p->cgroup) < 8 * a->slots)
        p->cgroup /= 2;
    /* a pattern of small blocks gets tiles of one block: no query tile holds two blocks */
    /* (blocks below the vector width share a tile anyway: the key grid is no finer than the
     * tile, which keeps the (tiles x chunks) classification at plan creation in bounds) */
    p->kt = pat->grid ? EF_MIN(KT, pad16(EF_MAX(1, pat->grid(a)))) : KT;
    p->qt = p->kt, p->nv = p->qt / EF_VL;
    p->dp = pad16(d), p->dvp = pad16(dv), p->ntiles = grid_count(p->q0, p->qt, s->q_len);
    /* Backward gives each thread a head; with fewer heads than EF_BWD_ITEMS it also splits each
     * head's keys into ranges, whose partial dQ are summed in a fixed order. The split depends
     * on the shape only, so results do not depend on the thread count. */
    enum { EF_BWD_ITEMS = 2 };
    int64_t bh = (int64_t)s->batch * s->heads;
    int nch = grid_count(p->q0, p->kt, s->kv_len);
    p->splits = bh >= EF_BWD_ITEMS ? 1 : (int)EF_MIN((int64_t)nch, (EF_BWD_ITEMS + bh - 1) / bh);
    p->bwd_slots = (int)EF_MIN((int64_t)a->slots, bh * p->splits);
    enum { NSMALL = 8 };
    size_t small[NSMALL] = {(size_t)d * QT,     (size_t)KT * QT, (size_t)dv * QT,
                            (size_t)QT * p->dp, (size_t)dv * QT, (size_t)QT * p->dvp,
                            (size_t)KT * QT,    (size_t)d * QT};
    /* a backward item accumulates dK, dV of its key range only: at most ceil(nch / splits)
     * chunks, or (stride pass) one residue class of keys */
    size_t rows = p->splits > 1 ? (size_t)((nch + p->splits - 1) / p->splits) * p->kt
                                : (size_t)s->kv_len;
    if (p->stride) rows = EF_MAX(rows, (size_t)class_count(s->kv_len, 0, p->stride));
    size_t big[3] = {rows * p->dp, rows * p->dvp, (rows / EF_ZB + 2 + 3) / 4};
    /* the row layout: query tiles of one vector group, head dimensions whole vectors (K, V and
     * dO rows are read as vectors) */
    p->rows = p->qt <= ROW_QT && d % EF_VL == 0 && dv % EF_VL == 0;
    p->mp = pad16(s->kv_len);
    /* forward items as groups of a head's tiles (the row layout, short tiles): at least 4
     * items per thread slot, else whole heads */
    int64_t want = (4 * (int64_t)a->slots + bh - 1) / bh;
    int fgroups = (int)EF_MAX(1, EF_MIN((int64_t)p->ntiles, want));
    if (p->rows) p->fgroups = fgroups;
    size_t kvt[3] = {p->rows ? (size_t)d * p->mp : 0, p->rows ? (size_t)dv * p->mp : 0,
                     p->rows ? (size_t)RK * EF_MAX(d, dv) : 0};
    size_t total = 0;
    for (int i = 0; i < NSMALL; i++) total += round16(small[i]) * a->slots;
    for (int i = 0; i < 3; i++) total += round16(big[i]) * p->bwd_slots;
    total += (round16(kvt[0]) + round16(kvt[1]) + round16(kvt[2])) * a->slots;
    size_t part = (size_t)(p->splits - 1) * bh * s->q_len * d;
    size_t lse_tmp = p->stride ? (size_t)bh * s->q_len : 0;
    total += round16(part) + round16(lse_tmp);
    p->ws = ef_mem_calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_attn_ws_alloc(a, total * sizeof(float)); /* shareable: see attn.h */
    if (!p->ws || !p->block)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of workspace", a->ops->name,
                        total * 4.0 / 1e6);
    a->ws_bytes = total * sizeof(float);
    memset(p->block, 0, a->ws_bytes); /* padding lanes and columns start (and stay) zero */
    float *cur = p->block;
    p->dqpart = part ? cur : NULL;
    cur += round16(part);
    p->lse_tmp = lse_tmp ? cur : NULL;
    cur += round16(lse_tmp);
    for (int t = 0; t < a->slots; t++) {
        tiled_ws *w = &p->ws[t];
        float **f[NSMALL] = {&w->qt,  &w->st,  &w->ot,  &w->qp,
                             &w->dot, &w->dop, &w->dpt, &w->dqt};
        for (int i = 0; i < NSMALL; i++) *f[i] = cur, cur += round16(small[i]);
        if (t < p->bwd_slots) {
            w->dk = cur, cur += round16(big[0]);
            w->dv = cur, cur += round16(big[1]);
            w->kz = (uint8_t *)cur, cur += round16(big[2]);
        }
        if (p->rows) {
            w->kt = cur, cur += round16(kvt[0]);
            w->vt = cur, cur += round16(kvt[1]);
            w->kpan = cur, cur += round16(kvt[2]);
        }
    }
    ef_status st = build_spans(a);
    if (st == EF_OK && short_tiles(p)) p->fgroups = fgroups; /* see next_tile_rows */
    return st;
}

void *ef_tiled_user(const ef_attn *a) {
    return a->impl ? ((const tiled_plan *)a->impl)->user : NULL;
}

/* Collects the spans of one tile, merging a span into the previous one when they touch and
 * agree. */
typedef struct span_sink {
    ef_span *out; /* NULL in the counting pass */
    ef_span last; /* the previous span (when n > 0) */
    int64_t n;
    int limit; /* keys at or past it are dropped (kv_len; causal: the tile's last query + 1) */
} span_sink;

static void span_emit(void *ctx, int j0, int j1, int masked) {
    span_sink *k = ctx;
    j1 = EF_MIN(j1, k->limit);
    if (j1 <= j0) return;
    if (k->n && k->last.j1 == j0 && k->last.masked == masked) {
        k->last.j1 = j1;
    } else {
        k->last = (ef_span){j0, j1, masked};
        k->n++;
    }
    if (k->out) k->out[k->n - 1] = k->last;
}

/* Asks the pattern about every (query tile, key chunk) -- or for its spans directly -- and
 * keeps the visible chunks, merged into spans of equal kind. Two passes: count, then fill. */
static ef_status build_spans(ef_attn *a) {
    tiled_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int nchunks = grid_count(p->q0, p->kt, s->kv_len);
    p->layout_heads = p->pat.per_head ? s->heads : 1;
    int64_t cells = (int64_t)p->layout_heads * p->ntiles;
    p->off = ef_mem_malloc(sizeof(int64_t) * (size_t)(cells + 1));
    if (!p->off) return ef_error(EF_ERR_NOMEM, "%s: out of memory for the layout", a->ops->name);
    for (int pass = 0; pass < 2; pass++) {
        int64_t n = 0;
        for (int h = 0; h < p->layout_heads; h++)
            for (int t = 0; t < p->ntiles; t++) {
                int i0, qn;
                tile_range(p, s->q_len, t, &i0, &qn);
                int i1 = i0 + qn;
                p->off[(int64_t)h * p->ntiles + t] = n;
                /* keys past the tile's last query are never visible when causal */
                span_sink k = {pass ? p->spans + n : NULL, {0, 0, 0}, 0,
                               a->causal ? EF_MIN(s->kv_len, i1) : s->kv_len};
                if (p->pat.spans) {
                    p->pat.spans(a, h, i0, i1, span_emit, &k);
                } else {
                    for (int c = 0; c < nchunks; c++) {
                        int j0, kn;
                        chunk_range(p, s->kv_len, c, &j0, &kn);
                        if (j0 >= k.limit) break;
                        int kind = p->pat.classify(a, h, i0, i1, j0, j0 + kn);
                        if (kind != EF_CHUNK_NONE)
                            span_emit(&k, j0, j0 + kn, kind == EF_CHUNK_PARTIAL);
                    }
                }
                n += k.n;
            }
        p->off[cells] = n;
        if (!pass) {
            p->spans = ef_mem_malloc(sizeof(ef_span) * (size_t)(n ? n : 1));
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

/* Short tiles: at most SHORT_KEYS keys (next_tile_rows). */
enum { SHORT_KEYS = 2 * KT };

static int span_keys(const ef_span *sp, int nspans, int kv_end) {
    int keys = 0;
    for (int x = 0; x < nspans; x++) keys += EF_MAX(0, EF_MIN(sp[x].j1, kv_end) - sp[x].j0);
    return keys;
}

/* Whether every tile of the plan is short (then forward items are groups of a head's tiles,
 * so that the tile a thread prefetches for is its own next one). */
static int short_tiles(const tiled_plan *p) {
    for (int64_t cell = 0; cell < (int64_t)p->layout_heads * p->ntiles; cell++)
        if (span_keys(p->spans + p->off[cell], (int)(p->off[cell + 1] - p->off[cell]), INT32_MAX) >
            SHORT_KEYS)
            return 0;
    return 1;
}

void ef_tiled_destroy(ef_attn *a) {
    tiled_plan *p = a->impl;
    if (!p) return;
    ef_attn_ws_free(a, p->block);
    ef_free(p->ws);
    ef_free(p->off);
    ef_free(p->spans);
    ef_free(p->user);
    ef_free(p);
    a->impl = NULL;
}

size_t ef_tiled_saved_bytes(const ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    return (size_t)s->batch * s->heads * s->q_len * sizeof(float);
}

/* In-register transpose of EF_VL vectors (r[x][l] becomes r[l][x]): log2(EF_VL) stages, the
 * stage of width b swapping the off-diagonal b x b blocks of every 2b x 2b block. Its shuffle
 * indices into the concatenation (row x, row x + b), made once per pack. */
enum { TR_STAGES = EF_VL == 16 ? 4 : EF_VL == 8 ? 3 : 2 };
typedef struct tr_masks {
    vi lo[TR_STAGES], hi[TR_STAGES];
} tr_masks;

static void tr_init(tr_masks *m) {
    for (int s = 0, b = EF_VL / 2; s < TR_STAGES; s++, b /= 2)
        for (int l = 0; l < EF_VL; l++) {
            m->lo[s][l] = (l & b) ? EF_VL + l - b : l;
            m->hi[s][l] = (l & b) ? EF_VL + l : l + b;
        }
}

EF_INLINE void transpose(vf *r, const tr_masks *m) {
#pragma GCC unroll 4
    for (int s = 0; s < TR_STAGES; s++) {
        int b = EF_VL >> (s + 1);
#pragma GCC unroll 16
        for (int x = 0; x < EF_VL; x++)
            if (!(x & b)) {
                vf a = r[x], c = r[x + b];
                r[x] = EF_SHUFFLE2(a, c, m->lo[s]);
                r[x + b] = EF_SHUFFLE2(a, c, m->hi[s]);
            }
    }
}

/* Transposed, scaled copy of n rows of q (ld floats apart) into qt[D][ldt]; lanes n .. width-1
 * are zero (lanes past the tile height `width` are never read). */
static void pack_t(float *qt, size_t ldt, const float *q, size_t ld, int d, int n, int width,
                   float scale) {
    int i = 0, d_full = d / EF_VL * EF_VL;
    tr_masks m;
    if (n >= EF_VL) tr_init(&m);
    for (; i + EF_VL <= n; i += EF_VL) { /* whole EF_VL x EF_VL blocks in registers */
        for (int t = 0; t < d_full; t += EF_VL) {
            vf r[EF_VL];
#pragma GCC unroll 16
            for (int x = 0; x < EF_VL; x++) r[x] = vf_loadu(q + (size_t)(i + x) * ld + t) * scale;
            transpose(r, &m);
#pragma GCC unroll 16
            for (int x = 0; x < EF_VL; x++) vf_storeu(qt + (size_t)(t + x) * ldt + i, r[x]);
        }
        for (int x = i; x < i + EF_VL; x++)
            for (int t = d_full; t < d; t++) qt[(size_t)t * ldt + x] = q[(size_t)x * ld + t] * scale;
    }
    for (; i < n; i++) /* rows read in order: q may be rows of a residue class */
        for (int t = 0; t < d; t++) qt[(size_t)t * ldt + i] = q[(size_t)i * ld + t] * scale;
    if (n < width)
        for (int t = 0; t < d; t++) memset(qt + (size_t)t * ldt + n, 0, sizeof(float) * (width - n));
}

void ef_tile_pack_t(float *dst, size_t ldt, const float *src, size_t ld, int d, int n, int width,
                    float scale) {
    pack_t(dst, ldt, src, ld, d, n, width, scale);
}

static void pack_qt(float *qt, const float *q, size_t ld, int d, int n, int width, float scale) {
    pack_t(qt, QT, q, ld, d, n, width, scale);
}

/* The way back: out[i][t] (+)= xt[t][i] * rs[i] for rows i < n, t < d (out rows ld floats
 * apart); rs = NULL is a row scale of 1, and `scale` multiplies every element. */
static void unpack_tile(float *out, size_t ld, const float *xt, int d, int n, const float *rs,
                        float scale, int acc) {
    int i = 0, d_full = d / EF_VL * EF_VL;
    tr_masks m;
    if (n >= EF_VL) tr_init(&m);
    for (; i + EF_VL <= n; i += EF_VL) {
        for (int t = 0; t < d_full; t += EF_VL) {
            vf r[EF_VL];
#pragma GCC unroll 16
            for (int x = 0; x < EF_VL; x++) r[x] = vf_load(xt + (size_t)(t + x) * QT + i);
            transpose(r, &m);
#pragma GCC unroll 16
            for (int x = 0; x < EF_VL; x++) {
                float *o = out + (size_t)(i + x) * ld + t;
                vf y = r[x] * (rs ? rs[i + x] : 1.0f) * scale;
                vf_storeu(o, acc ? vf_loadu(o) + y : y);
            }
        }
        for (int x = i; x < i + EF_VL; x++)
            for (int t = d_full; t < d; t++) {
                float y = xt[(size_t)t * QT + x] * (rs ? rs[x] : 1.0f) * scale;
                out[(size_t)x * ld + t] = acc ? out[(size_t)x * ld + t] + y : y;
            }
    }
    for (; i < n; i++)
        for (int t = 0; t < d; t++) {
            float y = xt[(size_t)t * QT + i] * (rs ? rs[i] : 1.0f) * scale;
            out[(size_t)i * ld + t] = acc ? out[(size_t)i * ld + t] + y : y;
        }
}

/* Zeros the first `width` lanes of rows rows of a [rows][QT] tile. */
static void zero_lanes(float *x, int rows, int width) {
    for (int r = 0; r < rows; r++) memset(x + (size_t)r * QT, 0, sizeof(float) * width);
}

/* S^T masked for causality: lanes (queries i0+l) with j > i0+l get -inf. */
static void mask_causal(float *st, int rows, int j0, int i0, int nv) {
    vi iota = vi_iota();
    for (int r = 0; r < rows; r++) {
        int j = j0 + r;
        if (j <= i0) continue;
        for (int v = 0; v < nv; v++) {
            vi qi = iota + (i0 + v * EF_VL);
            vi hide = qi < j;
            float *p = st + (size_t)r * QT + v * EF_VL;
            vf_store(p, vf_select(hide, vf_set1(-__builtin_inff()), vf_load(p)));
        }
    }
}

/* S^T with the diagonal hidden: the lane (query i0+l) with j == i0+l gets -inf. */
static void mask_diagonal(float *st, int rows, int j0, int i0) {
    for (int r = 0; r < rows; r++) {
        int l = j0 + r - i0;
        if (l >= 0 && l < QT) st[(size_t)r * QT + l] = -__builtin_inff();
    }
}

/* ---------------------------------------------------------------------------------------------
 * The row layout, for query tiles of at most ROW_QT queries (patterns of small blocks) whose key
 * spans need no pattern mask. In the transposed layout such a tile fills one vector, and every
 * product is a strip of one vector, which runs at 63-75 % of the FMA peak (docs/sparse.md). Here
 * the queries are rows (broadcast operands) and the keys the lanes: S = Q K^T takes vectors of
 * EF_VL consecutive keys from the head's K^T (converted once per thread and head; keys past
 * kv_len read zeros), P V and dS K take the key rows by pointer, so a register tile is MK_RB
 * queries x MK_NV key vectors (or value vectors) as in the dense tiles. A tile's keys run in
 * chunks of up to RK (the vectors of its spans, in order), with an online softmax per row.
 * ------------------------------------------------------------------------------------------- */
/* C[r][v EF_VL + l] = sum_t A[r ars + t] Bv[v][t EF_VL + l]: key vectors from panels. */
EF_INLINE void mkv(const int RB, const int NV, int T, const float *A, ptrdiff_t ars,
                   const float *const *Bv, float *C, ptrdiff_t ldc) {
    vf c[MK_RB][MK_NV];
    const float *bp[MK_NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) bp[v] = Bv[v];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = vf_set1(0);
    for (int t = 0; t < T; t++) {
        vf b[MK_NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = vf_load(bp[v] + t * EF_VL);
#pragma GCC unroll 6
        for (int r = 0; r < RB; r++) {
            vf a = vf_set1(A[r * ars + t]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] += a * b[v];
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) vf_store(C + r * ldc + v * EF_VL, c[r][v]);
}

/* C[r][0:NV EF_VL] += sum_t A[r ars + t] Bp[t][0:NV EF_VL]: rows of B by pointer. */
EF_INLINE void mkp(const int RB, const int NV, int T, const float *A, ptrdiff_t ars,
                   const float *const *Bp, ptrdiff_t l0, float *C, ptrdiff_t ldc) {
    vf c[MK_RB][MK_NV];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = vf_load(C + r * ldc + v * EF_VL);
    for (int t = 0; t < T; t++) {
        vf b[MK_NV];
        const float *bt = Bp[t] + l0;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = vf_loadu(bt + v * EF_VL);
#pragma GCC unroll 6
        for (int r = 0; r < RB; r++) {
            vf a = vf_set1(A[r * ars + t]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] += a * b[v];
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) vf_store(C + r * ldc + v * EF_VL, c[r][v]);
}

#define ROWS_SWITCH(CALL)                                                                          \
    switch (R - r0) {                                                                              \
    case 1: CALL(1); break;                                                                        \
    case 2: CALL(2); break;                                                                        \
    case 3: CALL(3); break;                                                                        \
    ROWS_CASE_45(CALL)                                                                             \
    default: CALL(MK_RB); break;                                                                   \
    }
#if MK_RB > 5
#define ROWS_CASE_45(CALL)                                                                         \
    case 4: CALL(4); break;                                                                        \
    case 5: CALL(5); break;
#else
#define ROWS_CASE_45(CALL)
#endif
#define NV_SWITCH(CALL, RB)                                                                        \
    switch (nv) {                                                                                  \
    case 1: CALL(RB, 1); break;                                                                    \
    NV_CASE_34(CALL, RB)                                                                           \
    default: CALL(RB, 2); break;                                                                   \
    }
#if MK_NV >= 4
#define NV_CASE_34(CALL, RB)                                                                       \
    case 3: CALL(RB, 3); break;                                                                    \
    case 4: CALL(RB, 4); break;
#else
#define NV_CASE_34(CALL, RB)
#endif

/* C[r][0:nvec EF_VL] = rows r < R of A (ars) times the key panels Bv[0..nvec), T deep. */
static void rows_kv(int R, int T, const float *A, ptrdiff_t ars, const float *const *Bv, int nvec,
                    float *C, ptrdiff_t ldc) {
    for (int v0 = 0; v0 < nvec; v0 += MK_NV) {
        int nv = EF_MIN(MK_NV, nvec - v0);
        for (int r0 = 0; r0 < R; r0 += MK_RB) {
#define MKV(RB, NV) mkv(RB, NV, T, A + r0 * ars, ars, Bv + v0, C + r0 * ldc + v0 * EF_VL, ldc)
#define MKV_R(RB) NV_SWITCH(MKV, RB)
            ROWS_SWITCH(MKV_R)
#undef MKV_R
#undef MKV
        }
    }
}

/* C[r][0:L] += rows r < R of A (ars) times the rows Bp[0..T) (L a multiple of EF_VL). */
static void rows_pv(int R, int T, const float *A, ptrdiff_t ars, const float *const *Bp, int L,
                    float *C, ptrdiff_t ldc) {
    for (int l0 = 0; l0 < L; l0 += MK_NV * EF_VL) {
        int nv = EF_MIN(MK_NV, (L - l0) / EF_VL);
        for (int r0 = 0; r0 < R; r0 += MK_RB) {
#define MKP(RB, NV) mkp(RB, NV, T, A + r0 * ars, ars, Bp, l0, C + r0 * ldc + l0, ldc)
#define MKP_R(RB) NV_SWITCH(MKP, RB)
            ROWS_SWITCH(MKP_R)
#undef MKP_R
#undef MKP
        }
    }
}

/* C[r][0:L] += sum_t A[t RK + r] B[t][0:L] for rows r < R, t < T (L a multiple of EF_VL): dK, dV
 * over a run of keys (rows) with a tile's queries (t) as the reduction. mk with A's strides
 * constants, called directly: through tile_gemm's general loops (runtime strides, its
 * dispatch) the short reduction spent a third of its time on spilled addresses. */
static void rows_grad(int R, int T, const float *A, const float *B, ptrdiff_t ldb, int L,
                      float *C, ptrdiff_t ldc) {
    for (int l0 = 0; l0 < L; l0 += MK_NV * EF_VL) {
        int nv = EF_MIN(MK_NV, (L - l0) / EF_VL);
        for (int r0 = 0; r0 < R; r0 += MK_RB) {
#define MKG(RB, NV) mk(RB, NV, T, A + r0, 1, RK, B + l0, ldb, C + r0 * ldc + l0, ldc, 1, NULL)
#define MKG_R(RB) NV_SWITCH(MKG, RB)
            ROWS_SWITCH(MKG_R)
#undef MKG_R
#undef MKG
        }
    }
}

static const float row_zero[TILED_MAX_DIM] __attribute__((aligned(64)));

/* Whether tile `it` of head h runs in the row layout: a row-layout plan, and no span that
 * needs the pattern's mask (tile_mask works on transposed tiles). */
static int tile_rows(const tiled_plan *p, const ef_span *sp, int nspans) {
    if (!p->rows) return 0;
    for (int x = 0; x < nspans; x++)
        if (sp[x].masked) return 0;
    return 1;
}

/* The key vectors of a tile, chunk by chunk: spans clipped to [lo, hi). */
typedef struct key_iter {
    const ef_span *sp;
    int nspans, x, j, lo, hi;
} key_iter;

static void key_iter_init(key_iter *it, const ef_span *sp, int nspans, int lo, int hi) {
    *it = (key_iter){sp, nspans, 0, nspans ? EF_MAX(sp[0].j0, lo) : 0, lo, hi};
}

/* The next chunk's vectors: off[v] = first key, cnt[v] = keys (1..EF_VL); returns their count
 * (0 at the end). */
static int key_iter_next(key_iter *it, int32_t *off, int32_t *cnt) {
    int n = 0;
    while (n < RKV && it->x < it->nspans) {
        int end = EF_MIN(it->sp[it->x].j1, it->hi);
        if (it->j >= end) {
            if (++it->x < it->nspans) it->j = EF_MAX(it->sp[it->x].j0, it->lo);
            continue;
        }
        off[n] = it->j, cnt[n] = EF_MIN(EF_VL, end - it->j);
        it->j += cnt[n++];
    }
    return n;
}

/* Whether a chunk's rows need rows_mask: a vector short of EF_VL keys, or (causal) a key after
 * the tile's first query i0. */
static int rows_need_mask(const int32_t *off, const int32_t *cnt, int nvec, int causal, int i0) {
    int need = causal && off[nvec - 1] + cnt[nvec - 1] - 1 > i0;
    for (int x = 0; x < nvec; x++) need |= cnt[x] < EF_VL;
    return need;
}

/* Row r of a chunk's scores: -inf in the lanes past each vector's keys and, causal, where the
 * key follows query i. */
static void rows_mask(float *s, const int32_t *off, const int32_t *cnt, int nvec, int causal,
                      int i) {
    vi iota = vi_iota();
    for (int v = 0; v < nvec; v++) {
        vi hide = ~(iota < cnt[v]);
        if (causal) hide |= iota + off[v] > i;
        float *x = s + v * EF_VL;
        vf_store(x, vf_select(hide, vf_set1(-__builtin_inff()), vf_load(x)));
    }
}

/* The key rows of a chunk by lane, for the products over keys: lanes past a vector's keys get a
 * zero row (their probabilities are 0, and 0 times a key's value could be NaN). */
static void rows_ptrs(const float **bp, const float *x, size_t ld, const int32_t *off,
                      const int32_t *cnt, int nvec) {
    for (int v = 0; v < nvec; v++)
        for (int l = 0; l < EF_VL; l++)
            bp[v * EF_VL + l] = l < cnt[v] ? x + (size_t)(off[v] + l) * ld : row_zero;
}

/* x's rows [0, n) (d floats each, ld apart) in panels of EF_VL: panel b at dst + b d EF_VL holds
 * rows b EF_VL .. transposed; rows past n are zero, up to m rows. */
static void to_panels(float *dst, const float *x, size_t ld, int d, int n, int m) {
    for (int r = 0; r < m; r += EF_VL)
        pack_t(dst + (size_t)r * d, EF_VL, x + (size_t)r * ld, ld, d, EF_MAX(0, EF_MIN(EF_VL, n - r)),
               EF_VL, 1.0f);
}

/* K of head bh into the thread's panels (keys past kv_valid zero), unless they hold it already
 * (forward: kt_bh is reset by each call); with v (backward), K and V, always. */
static void rows_convert(const tiled_plan *p, tiled_ws *w, const float *k, const float *v, int d,
                         int dv, int kv_valid, int64_t bh) {
    if (!v && w->kt_bh == bh) return;
    to_panels(w->kt, k, d, d, kv_valid, p->mp);
    if (v) to_panels(w->vt, v, dv, dv, kv_valid, p->mp);
    w->kt_bh = v ? -1 : bh; /* a backward item converts its own */
}

/* The panels of a chunk's key vectors: the head's panel where a vector starts on one, else one
 * made in scratch (w->kpan) from the rows of x (d floats each, ld apart). */
static void rows_panels(const float **bv, const float *pan, float *scratch, const float *x,
                        size_t ld, int d, const int32_t *off, const int32_t *cnt, int nvec) {
    for (int v = 0; v < nvec; v++) {
        if (off[v] % EF_VL == 0) {
            bv[v] = pan + (size_t)off[v] * d;
        } else {
            float *s = scratch + (size_t)v * d * EF_VL;
            pack_t(s, EF_VL, x + (size_t)off[v] * ld, ld, d, cnt[v], EF_VL, 1.0f);
            bv[v] = s;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
typedef struct tiled_call {
    ef_attn *a;
    const ef_attn_io *io;
    float *lse; /* saved (or the plan's lse_tmp), or NULL */
    const float *dout;
    float *dq, *dk, *dv;
} tiled_call;

/* The online-softmax state of a query tile: running max and sum per lane; w->ot holds O^T. */
typedef struct fwd_state {
    vf mx[QV], l[QV];
} fwd_state;

/* One key chunk of kn keys (rows of v, ldv floats apart, dv wide) whose masked scores are in
 * w->st:
 * m' = max(m, max_j S^T);  P^T = exp(S^T - m');  l = l e^(m-m') + sum_j P^T;
 * O^T = O^T e^(m-m') + V^T P^T. */
static void fwd_chunk(tiled_ws *w, fwd_state *f, const float *v, size_t ldv, int kn, int dv,
                      int nv) {
    vf alpha[QV];
    ef_online_softmax(w->st, QT, kn, nv, f->mx, f->l, alpha, vf_exp_nonpos);
    /* O^T[e][i] = O^T[e][i] alpha[i] + sum_j V[j][e] P^T[j][i] */
    tile_gemm(dv, kn, nv * EF_VL, v, 1, (ptrdiff_t)ldv, w->st, QT, w->ot, QT, 1,
              (const float *)alpha);
}

/* O = O^T / l and lse = m + log l (l = 0: O = 0, lse = -inf) for the first qv lanes: output
 * rows ldo floats apart, lse entries ldl apart (lse may be NULL). */
static void fwd_finish(const tiled_ws *w, const fwd_state *f, int qv, int dv, float *out,
                       size_t ldo, float *lse, size_t ldl) {
    float inv[QT] __attribute__((aligned(64))), ls[QT] __attribute__((aligned(64)));
    for (int u = 0; u < QV; u++) { /* lanes past the tile: l = 0 (set up so) */
        vf has = vf_select(f->l[u] > 0, vf_set1(1), vf_set1(0));
        vf_store(inv + u * EF_VL, has / vf_select(f->l[u] > 0, f->l[u], vf_set1(1)));
        for (int t = 0; t < EF_VL; t++)
            ls[u * EF_VL + t] =
                f->l[u][t] > 0 ? f->mx[u][t] + logf(f->l[u][t]) : -__builtin_inff();
    }
    unpack_tile(out, ldo, w->ot, dv, qv, inv, 1.0f, 0);
    if (lse)
        for (int i = 0; i < qv; i++) lse[(size_t)i * ldl] = ls[i];
}

/* Forward of one tile in the row layout (tile_rows): qv query rows at i0 (q, out rows; lse
 * entries or NULL), keys of the spans below kv_end. */
static void forward_rows(const ef_attn *a, tiled_ws *w, const float *q, const float *k,
                         const float *v, int i0, int qv, const ef_span *sp, int nspans, int kv_end,
                         float *out, float *lse) {
    const tiled_plan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim, dp = p->dp, dvp = p->dvp;
    float *qs = w->qp, *orow = w->ot, *sr = w->st; /* [qv][Dp], [qv][Dvp], [qv][RK] */
    /* the output rows for writing and the next tile's queries for reading are prefetched row by
     * row in the first chunk's softmax (short tiles spent a third of their time waiting for
     * both; the same prefetches in one burst at the tile's start stalled: 8 % slower) */
    for (int i = 0; i < qv; i++)
        for (int t = 0; t < d; t += EF_VL)
            vf_store(qs + (size_t)i * dp + t, vf_loadu(q + (size_t)i * d + t) * a->scale);
    memset(orow, 0, sizeof(float) * (size_t)qv * dvp);
    float mrow[ROW_QT], lrow[ROW_QT];
    for (int i = 0; i < qv; i++) mrow[i] = -__builtin_inff(), lrow[i] = 0;
    int32_t off[RKV], cnt[RKV];
    const float *bp[RK], *bv[RKV];
    key_iter ki;
    key_iter_init(&ki, sp, nspans, 0, kv_end);
    for (int nvec, first = 1; (nvec = key_iter_next(&ki, off, cnt)) > 0; first = 0) {
        /* S[i][key] = sum_t (scale q_i)[t] K^T[t][key] */
        rows_panels(bv, w->kt, w->kpan, k, (size_t)d, d, off, cnt, nvec);
        rows_kv(qv, d, qs, dp, bv, nvec, sr, RK);
        int need_mask = rows_need_mask(off, cnt, nvec, a->causal, i0);
        for (int i = 0; i < qv; i++) { /* the online softmax of row i */
            float *s = sr + (size_t)i * RK;
            if (first) {
                for (int t = 0; t < dv; t += 16) __builtin_prefetch(out + (size_t)i * dv + t, 1);
                ef_prefetch(q + (size_t)(qv + i) * d, d);
            }
            if (need_mask) rows_mask(s, off, cnt, nvec, a->causal, i0 + i);
            vf mv = vf_set1(-__builtin_inff());
            for (int x = 0; x < nvec; x++) mv = vf_max(mv, vf_load(s + x * EF_VL));
            float mx = EF_MAX(mrow[i], vf_hmax(mv));
            float use = mx == -__builtin_inff() ? 0 : mx; /* exp(-inf - 0) = 0, never NaN */
            vf sum = vf_set1(0);
            for (int x = 0; x < nvec; x++) {
                vf e = vf_exp_nonpos(vf_load(s + x * EF_VL) - use);
                vf_store(s + x * EF_VL, e);
                sum += e;
            }
            /* the rescale of the row's sum and output: none on its first keys (both are 0) or
             * when the maximum stays */
            if (mrow[i] != -__builtin_inff() && mx != mrow[i]) {
                float al = vf_exp_nonpos(vf_set1(mrow[i] - use))[0];
                float *o = orow + (size_t)i * dvp;
                for (int t = 0; t < dv; t += EF_VL) vf_store(o + t, vf_load(o + t) * al);
                lrow[i] *= al;
            }
            lrow[i] += vf_hsum(sum), mrow[i] = mx;
        }
        /* O[i] += sum_key P[i][key] V[key] */
        rows_ptrs(bp, v, (size_t)dv, off, cnt, nvec);
        rows_pv(qv, nvec * EF_VL, sr, RK, bp, dv, orow, dvp);
    }
    for (int i = 0; i < qv; i++) {
        float inv = lrow[i] > 0 ? 1.0f / lrow[i] : 0.0f;
        for (int t = 0; t < dv; t += EF_VL)
            vf_storeu(out + (size_t)i * dv + t, vf_load(orow + (size_t)i * dvp + t) * inv);
        if (lse) lse[i] = lrow[i] > 0 ? mrow[i] + logf(lrow[i]) : -__builtin_inff();
    }
}

/* Rows to prefetch, as byte ranges, issued a few lines at a time: a tile's prefetches in
 * one burst stalled on the core's outstanding misses (row-layout forward 8 % slower). */
enum { PF_RANGES = 24 };
typedef struct pf_list {
    const char *at[PF_RANGES];
    int lines[PF_RANGES], rows[PF_RANGES]; /* lines per row, rows */
    size_t ld[PF_RANGES];                  /* bytes from row to row */
    int n, cur, row, off, total, step;
} pf_list;

/* rows of `floats` floats each, ld floats apart */
EF_INLINE void pf_add_rows(pf_list *l, const float *x, size_t floats, size_t ld, int rows) {
    if (l->n == PF_RANGES || floats == 0 || rows <= 0) return; /* more are not prefetched */
    l->at[l->n] = (const char *)x;
    l->lines[l->n] = (int)((floats * sizeof(float) + 63) / 64);
    l->rows[l->n] = rows;
    l->ld[l->n] = ld * sizeof(float);
    l->total += l->lines[l->n++] * rows;
}
EF_INLINE void pf_add(pf_list *l, const float *x, size_t floats) { pf_add_rows(l, x, floats, 0, 1); }

/* The next `lines` lines of the list (all that are left when lines < 0). Always inlined: a
 * function whose only effects are prefetches may be judged free of side effects and dropped
 * (GCC 12 did so). */
EF_INLINE void pf_issue(pf_list *l, int lines) {
    for (; l->cur < l->n && lines != 0; lines--) {
        __builtin_prefetch(l->at[l->cur] + l->row * l->ld[l->cur] + (size_t)l->off * 64);
        if (++l->off == l->lines[l->cur]) {
            l->off = 0;
            if (++l->row == l->rows[l->cur]) l->row = 0, l->cur++;
        }
    }
}

EF_INLINE void pf_init(pf_list *l) { l->n = l->cur = l->row = l->off = l->total = l->step = 0; }
EF_INLINE void pf_steps(pf_list *l, int steps) { l->step = (l->total + steps - 1) / EF_MAX(steps, 1); }

/* The next tile's query rows (backward: and its dO and O rows) and, if it is short (at most
 * SHORT_KEYS keys, as `blocklocal`'s, and not in the row layout), its keys' K and V rows, into
 * l, to be issued while this tile computes, spread over `steps` calls of pf_issue: a short
 * tile reads rows that no other tile reads, and had waited for them (blocklocal forward 5.7 ->
 * 4.7 ms, one thread). */
EF_INLINE void next_tile_rows(const tiled_call *c, int64_t bh, int h, int it, int bwd, int steps,
                              pf_list *l) {
    const ef_attn_shape *s = &c->a->shape;
    const tiled_plan *p = c->a->impl;
    pf_init(l);
    if (it + 1 < p->ntiles) {
        int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, i1, qn1, ns1;
        tile_range(p, n, it + 1, &i1, &qn1);
        size_t r = (size_t)bh * n + i1, rows = (size_t)EF_MIN(qn1, n - i1);
        pf_add(l, c->io->q + r * d, rows * d);
        if (bwd) pf_add(l, c->dout + r * dv, rows * dv), pf_add(l, c->io->out + r * dv, rows * dv);
        const ef_span *sp1 = spans_of(p, h, it + 1, &ns1);
        /* a row-layout tile reads K and V through the thread's panels (and K rows only for
         * dQ): prefetching its 128 K and V rows made bigbird:block=16's backward 2-5 % slower */
        if (span_keys(sp1, ns1, m) <= SHORT_KEYS && !(p->rows && tile_rows(p, sp1, ns1))) {
            const float *k = c->io->k + (size_t)bh * m * d, *v = c->io->v + (size_t)bh * m * dv;
            for (int x = 0; x < ns1; x++) {
                int j0 = sp1[x].j0, j1 = EF_MIN(sp1[x].j1, m);
                if (j1 <= j0) continue;
                pf_add(l, k + (size_t)j0 * d, (size_t)(j1 - j0) * d);
                pf_add(l, v + (size_t)j0 * dv, (size_t)(j1 - j0) * dv);
            }
        }
    }
    pf_steps(l, steps);
}

static void forward_one(const tiled_call *c, tiled_ws *w, int64_t bh, int it) {
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    int b = (int)(bh / s->heads), i0, qn;
    tile_range(p, n, it, &i0, &qn);
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

    int h = (int)(bh % s->heads), nspans;
    const ef_span *sp = spans_of(p, h, it, &nspans);
    if (tile_rows(p, sp, nspans)) {
        rows_convert(p, w, k, NULL, d, dv, ef_attn_kv_valid(a, c->io, b), bh);
        forward_rows(a, w, q, k, v, i0, qv, sp, nspans, kv_end, out,
                     c->lse ? c->lse + (size_t)bh * n + i0 : NULL);
        return;
    }
    /* a short tile (the last one, a short q_len, the positions before the origin) computes
     * the vectors its queries fill, not the whole tile */
    int lanes = EF_MIN(p->qt, pad16(qv)), nv = lanes / EF_VL;
    int keys = span_keys(sp, nspans, kv_end);
    pf_list pf;
    pf_init(&pf);
    if (keys <= SHORT_KEYS) next_tile_rows(c, bh, h, it, 0, 1 + 2 * ((keys + KT - 1) / KT), &pf);
    pf_issue(&pf, pf.step);
    pack_qt(w->qt, q, d, d, qv, lanes, a->scale);
    fwd_state f;
    for (int u = 0; u < QV; u++) f.mx[u] = vf_set1(-__builtin_inff()), f.l[u] = vf_set1(0);
    zero_lanes(w->ot, dv, lanes);
    for (int x = 0; x < nspans; x++)
        for (int j0 = sp[x].j0; j0 < EF_MIN(sp[x].j1, kv_end); j0 += KT) {
            int kn = EF_MIN(KT, EF_MIN(sp[x].j1, kv_end) - j0);
            ef_tile_gemm(kn, d, lanes, k + (size_t)j0 * d, d, 1, w->qt, QT, w->st, QT, 0);
            pf_issue(&pf, pf.step);
            if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0, nv);
            if (sp[x].masked) p->pat.tile_mask(a, h, i0, j0, kn, w->st);
            fwd_chunk(w, &f, v + (size_t)j0 * dv, dv, kn, dv, nv);
            pf_issue(&pf, pf.step);
        }
    pf_issue(&pf, -1);
    fwd_finish(w, &f, qv, dv, out, dv, c->lse ? c->lse + (size_t)bh * n + i0 : NULL, 1);
}

/* A forward work item: one tile, or (row layout) a group of a head's tiles, so that a thread
 * converts a head's keys once and reads the next tile's queries while it computes one. */
static void forward_tile(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    const tiled_plan *p = c->a->impl;
    tiled_ws *w = &p->ws[tid];
    if (!p->fgroups) {
        forward_one(c, w, item / p->ntiles, (int)(item % p->ntiles));
        return;
    }
    int64_t bh = item / p->fgroups;
    int g = (int)(item % p->fgroups);
    for (int it = (int)((int64_t)g * p->ntiles / p->fgroups);
         it < (int)((int64_t)(g + 1) * p->ntiles / p->fgroups); it++)
        forward_one(c, w, bh, it);
}

/* The masked scores of keys c0 .. c0+kn-1 of a residue class (k: the class's first key, rows
 * ldk floats apart, read in place) against the packed class queries a0 .. in w->st (lanes of
 * them): the class pattern is c != a (causal: c < a). */
static void class_scores(const ef_attn *a, tiled_ws *w, const float *k, size_t ldk, int c0,
                         int kn, int a0, int lanes) {
    ef_tile_gemm(kn, a->shape.head_dim, lanes, k + (size_t)c0 * ldk, (ptrdiff_t)ldk, 1, w->qt, QT,
                 w->st, QT, 0);
    if (a->causal)
        mask_causal(w->st, kn, c0, a0 - 1, lanes / EF_VL); /* hides c > a - 1 */
    else
        mask_diagonal(w->st, kn, c0, a0);
}

/* The rows of class r's tile a0 that its forward (bwd = 0) or backward (bwd = 1) reads first:
 * its queries' q and out (backward: q, dO, O and dQ) rows and its first chunk's K and V rows,
 * all s rows apart. */
/* Class r's valid queries from a0 in one tile (*qv) and its valid keys (*nk). */
static void class_size(const tiled_call *c, int64_t bh, int r, int a0, int *qv, int *nk) {
    const ef_attn *a = c->a;
    const tiled_plan *p = a->impl;
    int b = (int)(bh / a->shape.heads), st = p->stride;
    *qv = EF_MIN(p->qt, class_count(ef_attn_q_valid(a, c->io, b), r, st) - a0);
    *nk = class_count(ef_attn_kv_valid(a, c->io, b), r, st);
}

EF_INLINE void class_rows(const tiled_call *c, int64_t bh, int r, int a0, int bwd, pf_list *l) {
    const ef_attn_shape *s = &c->a->shape;
    const tiled_plan *p = c->a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, st = p->stride, qv, nk;
    class_size(c, bh, r, a0, &qv, &nk);
    if (qv <= 0 || nk <= 0) return;
    size_t first = (size_t)bh * n + r + (size_t)a0 * st, kr = (size_t)bh * m + r;
    size_t ldq = (size_t)st * d, ldv = (size_t)st * dv;
    pf_add_rows(l, c->io->q + first * d, d, ldq, qv);
    pf_add_rows(l, c->io->out + first * dv, dv, ldv, qv);
    if (bwd) {
        pf_add_rows(l, c->dout + first * dv, dv, ldv, qv);
        pf_add_rows(l, c->dq + first * d, d, ldq, qv);
    }
    pf_add_rows(l, c->io->k + kr * d, d, ldq, EF_MIN(KT, nk));
    pf_add_rows(l, c->io->v + kr * dv, dv, ldv, EF_MIN(KT, nk));
}

/* The stride pass: query i also sees the keys j = i (mod s) with |i - j| >= s (causal:
 * j <= i - s). For (batch bh, residue r, class tile from a0): the queries r + (a0 + l) s of
 * class r, packed into a dense transposed tile, against the keys r + c s, read in place (rows
 * s apart, prefetched: the hardware does not follow such strides across pages; `own`: this
 * class's in one burst, as the first of its work item; `next`: the next class's, issued a
 * share at a time while this one computes, 6 % faster than a burst each); the online
 * softmax resumes from the first pass's result (running max = lse, sum = 1, O^T = out). In
 * class coordinates (a, c) the pattern is c != a (causal: c < a). */
static void stride_forward_class(const tiled_call *c, tiled_ws *w, int64_t bh, int r, int a0,
                                 int own, pf_list *next) {
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    const tiled_plan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, st = p->stride, qv, nk;
    class_size(c, bh, r, a0, &qv, &nk);
    int c_end = a->causal ? EF_MIN(nk, a0 + qv - 1) : nk;
    if (qv <= 0 || c_end <= 0) {
        pf_issue(next, -1);
        return;
    }
    int lanes = pad16(qv), nv = lanes / EF_VL; /* a short class fills fewer lanes */
    size_t first = (size_t)bh * n + r + (size_t)a0 * st; /* row of the tile's first query */
    const float *k = c->io->k + ((size_t)bh * m + r) * d;
    const float *v = c->io->v + ((size_t)bh * m + r) * dv;
    float *out = c->io->out + first * dv, *lse = c->lse + first;
    if (own) { /* this class's rows, in one burst: nothing to overlap them with yet */
        pf_list mine;
        pf_init(&mine);
        class_rows(c, bh, r, a0, 0, &mine);
        pf_issue(&mine, -1);
    }
    pf_steps(next, 2 + 2 * ((c_end + KT - 1) / KT));
    pack_qt(w->qt, c->io->q + first * d, (size_t)st * d, d, qv, lanes, a->scale);
    pf_issue(next, next->step);
    pack_qt(w->ot, out, (size_t)st * dv, dv, qv, lanes, 1.0f);
    pf_issue(next, next->step);
    fwd_state f;
    float m0[QT] __attribute__((aligned(64)));
    for (int l = 0; l < QT; l++) m0[l] = l < qv ? lse[(size_t)l * st] : -__builtin_inff();
    for (int u = 0; u < QV; u++) {
        f.mx[u] = vf_load(m0 + u * EF_VL);
        f.l[u] = vf_select(f.mx[u] == -__builtin_inff(), vf_set1(0), vf_set1(1));
    }
    for (int c0 = 0; c0 < c_end; c0 += KT) {
        int kn = EF_MIN(KT, c_end - c0);
        class_scores(a, w, k, (size_t)st * d, c0, kn, a0, lanes);
        prefetch_rows(k, (size_t)st * d, d, c0 + KT, EF_MIN(c0 + 2 * KT, c_end));
        prefetch_rows(v, (size_t)st * dv, dv, c0 + KT, EF_MIN(c0 + 2 * KT, c_end));
        pf_issue(next, next->step);
        fwd_chunk(w, &f, v + (size_t)c0 * st * dv, (size_t)st * dv, kn, dv, nv);
        pf_issue(next, next->step);
    }
    pf_issue(next, -1);
    fwd_finish(w, &f, qv, dv, out, (size_t)st * dv, lse, st);
}

/* Stride-pass work items: (batch, head, group of p->cgroup consecutive classes, class tile).
 * Neighbouring classes share pages and cache lines (the rows of classes r .. r + 15 are
 * contiguous), so one thread takes them together. Each class is computed alone: the grouping
 * does not change results. */
static int stride_tiles(const tiled_plan *p, const ef_attn_shape *s) { /* per class */
    return (class_count(s->q_len, 0, p->stride) + p->qt - 1) / p->qt;
}
static int stride_groups(const tiled_plan *p, const ef_attn_shape *s) { /* per head */
    return (stride_classes(p, s) + p->cgroup - 1) / p->cgroup;
}

static void stride_forward(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    const ef_attn_shape *s = &c->a->shape;
    tiled_plan *p = c->a->impl;
    int tpc = stride_tiles(p, s), ng = stride_groups(p, s);
    int64_t bh = item / ((int64_t)ng * tpc);
    int rest = (int)(item % ((int64_t)ng * tpc)), g = rest / tpc, a0 = rest % tpc * p->qt;
    int r1 = EF_MIN(stride_classes(p, s), (g + 1) * p->cgroup);
    for (int r = g * p->cgroup; r < r1; r++) { /* each class prefetches the next one's rows */
        pf_list next;
        pf_init(&next);
        if (r + 1 < r1) class_rows(c, bh, r + 1, a0, 0, &next);
        stride_forward_class(c, &p->ws[tid], bh, r, a0, r == g * p->cgroup, &next);
    }
}

ef_status ef_tiled_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    tiled_call c = {a, io, saved ? saved : p->lse_tmp, NULL, NULL, NULL, NULL};
    int threads = ef_attn_threads(a);
    for (int t = 0; t < a->slots; t++) p->ws[t].kt_bh = -1; /* the inputs are new */
    ef_parallel_for((int64_t)s->batch * s->heads * (p->fgroups ? p->fgroups : p->ntiles), threads,
                    forward_tile, &c);
    if (p->stride)
        ef_parallel_for((int64_t)s->batch * s->heads * stride_groups(p, s) * stride_tiles(p, s),
                        threads, stride_forward, &c);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------- */
/* x . y over n floats: fp32 products summed in the vector lanes, the lanes and the tail in
 * double (a scalar double chain was most of bwd_pack's time on 16-row tiles). */
static double dot_rows(const float *x, const float *y, int n) {
    vf acc = vf_set1(0);
    int e = 0;
    for (; e + EF_VL <= n; e += EF_VL) acc += vf_loadu(x + e) * vf_loadu(y + e);
    double sum = 0;
    for (int l = 0; l < EF_VL; l++) sum += acc[l];
    for (; e < n; e++) sum += (double)x[e] * y[e];
    return sum;
}

/* Packs qv query rows (ldq, ldg, ldo floats apart) of a tile for backward: Q^T and dO^T
 * (w->qt, w->dot), Q and dO row-padded (w->qp, w->dop), delta_i = dO_i . O_i and the lse to
 * subtract (+inf for rows that saw no key and for padding lanes, so that P = 0 there). */
static void bwd_pack(const ef_attn *a, tiled_ws *w, const float *q, size_t ldq, const float *g,
                     size_t ldg, const float *o, size_t ldo, const float *lse, size_t ldl, int qv,
                     float *lse_use, float *dl) {
    int d = a->shape.head_dim, dv = a->shape.v_dim;
    const tiled_plan *p = a->impl;
    int dp = p->dp, dvp = p->dvp;
    float scale = a->scale;
    pack_qt(w->qt, q, ldq, d, qv, p->qt, scale);
    pack_qt(w->dot, g, ldg, dv, qv, p->qt, 1.0f);
    for (int i = 0; i < p->qt; i++) {
        float *qr = w->qp + (size_t)i * dp, *gr = w->dop + (size_t)i * dvp;
        if (i < qv) {
            const float *qi = q + (size_t)i * ldq, *gi = g + (size_t)i * ldg;
            const float *oi = o + (size_t)i * ldo;
            int t = 0;
            for (; t + EF_VL <= d; t += EF_VL) vf_store(qr + t, vf_loadu(qi + t) * scale);
            for (; t < d; t++) qr[t] = qi[t] * scale;
            memcpy(gr, gi, sizeof(float) * dv);
            dl[i] = (float)dot_rows(gi, oi, dv); /* delta_i = dO_i . O_i */
            float li = lse[(size_t)i * ldl];
            lse_use[i] = li != -__builtin_inff() ? li : __builtin_inff();
        } else {
            memset(qr, 0, sizeof(float) * d);
            memset(gr, 0, sizeof(float) * dv);
            dl[i] = 0, lse_use[i] = __builtin_inff();
        }
    }
    zero_lanes(w->dqt, d, p->qt);
}

/* One key chunk of kn keys (k, v rows ldk, ldv floats apart) whose masked scores are in w->st:
 * P^T = exp(S^T - lse); dV += P^T dO; dP^T = V dO^T; dS^T = P^T o (dP^T - delta);
 * dK += dS^T (scale Q); dQ^T += K^T dS^T (times scale later). dk, dvacc: rows of this chunk. */
static void bwd_chunk(const ef_attn *a, tiled_ws *w, const float *k, size_t ldk, const float *v,
                      size_t ldv, int kn, int qt, const float *lse_use, const float *dl,
                      float *dk, float *dvacc) {
    int d = a->shape.head_dim, dv = a->shape.v_dim;
    const tiled_plan *p = a->impl;
    int dp = p->dp, dvp = p->dvp;
    int nv = qt / EF_VL;
    for (int r = 0; r < kn; r++)
        for (int u = 0; u < nv; u++) {
            float *ps = w->st + r * QT + u * EF_VL;
            vf_store(ps, vf_exp_nonpos(vf_load(ps) - vf_load(lse_use + u * EF_VL)));
        }
    /* dV[j][e] += sum_i P^T[j][i] dO[i][e] */
    ef_tile_gemm(kn, qt, dvp, w->st, QT, 1, w->dop, dvp, dvacc, dvp, 1);
    /* dP^T[j][i] = sum_e V[j][e] dO^T[e][i];  dS^T = P^T o (dP^T - delta) */
    ef_tile_gemm(kn, dv, qt, v, (ptrdiff_t)ldv, 1, w->dot, QT, w->dpt, QT, 0);
    for (int r = 0; r < kn; r++)
        for (int u = 0; u < nv; u++) {
            float *pd = w->dpt + r * QT + u * EF_VL;
            vf pp = vf_load(w->st + r * QT + u * EF_VL);
            vf_store(pd, pp * (vf_load(pd) - vf_load(dl + u * EF_VL)));
        }
    /* dK[j][t] += sum_i dS^T[j][i] (scale Q)[i][t] */
    ef_tile_gemm(kn, qt, dp, w->dpt, QT, 1, w->qp, dp, dk, dp, 1);
    /* dQ^T[t][i] += sum_j K[j][t] dS^T[j][i] */
    ef_tile_gemm(d, kn, qt, k, 1, (ptrdiff_t)ldk, w->dpt, QT, w->dqt, QT, 1);
}

void ef_kacc_init(ef_kacc *z, float *dk_out, float *dv_out, int d, int dv, float *dk_ws,
                  float *dv_ws, int dp, int dvp, uint8_t *done, int klo, int khi) {
    int direct = dp == d && dvp == dv && (uintptr_t)(dk_out + (size_t)klo * d) % 64 == 0 &&
                 (uintptr_t)(dv_out + (size_t)klo * dv) % 64 == 0;
    *z = (ef_kacc){direct ? dk_out + (size_t)klo * d : dk_ws,
                   direct ? dv_out + (size_t)klo * dv : dv_ws,
                   dp, dvp, klo, khi, done, dk_out, dv_out, d, dv, direct};
    memset(done, 0, (size_t)(khi - klo + EF_ZB - 1) / EF_ZB);
}

static void kacc_block(const ef_kacc *z, int b) {
    int r0 = b * EF_ZB, r1 = EF_MIN(z->khi - z->klo, r0 + EF_ZB);
    memset(z->dk + (size_t)r0 * z->ldk, 0, sizeof(float) * (size_t)(r1 - r0) * z->ldk);
    memset(z->dv + (size_t)r0 * z->ldv, 0, sizeof(float) * (size_t)(r1 - r0) * z->ldv);
    z->done[b] = 1;
}

void ef_kacc_touch(const ef_kacc *z, int j0, int j1) {
    for (int b = (j0 - z->klo) / EF_ZB; b <= (j1 - 1 - z->klo) / EF_ZB; b++)
        if (!z->done[b]) kacc_block(z, b);
}

void ef_kacc_finish(const ef_kacc *z) {
    for (int b = 0; b < (z->khi - z->klo + EF_ZB - 1) / EF_ZB; b++)
        if (!z->done[b]) kacc_block(z, b); /* keys no query saw (past kv_valid, say) */
    for (int j = z->klo; j < z->khi && !z->direct; j++) {
        memcpy(z->dk_out + (size_t)j * z->d, z->dk + (size_t)(j - z->klo) * z->ldk,
               sizeof(float) * z->d);
        memcpy(z->dv_out + (size_t)j * z->dvd, z->dv + (size_t)(j - z->klo) * z->ldv,
               sizeof(float) * z->dvd);
    }
}

/* dacc[key] += sum_i A[i][key] B[i] over the runs of consecutive keys of a chunk's vectors: A
 * [qv][RK] (lanes = the chunk's key slots), B [qv][ldb], dacc rows of the item's key range from
 * klo, ld floats apart (dV += P^T dO, dK += dS^T (scale Q)). */
static void rows_keygrad(int qv, const float *A, const float *B, int ldb, float *dacc, int ld,
                         int klo, const int32_t *off, const int32_t *cnt, int nvec) {
    for (int v = 0; v < nvec;) {
        int u = v, keys = cnt[v];
        while (u + 1 < nvec && cnt[u] == EF_VL && off[u + 1] == off[u] + EF_VL)
            keys += cnt[++u];
        rows_grad(keys, qv, A + v * EF_VL, B, ldb, ldb, dacc + (size_t)(off[v] - klo) * ld, ld);
        v = u + 1;
    }
}

/* Backward of one tile in the row layout (tile_rows): qv query rows at i0 (q, g = dO, o rows;
 * lse entries), qn rows of dq written (rows past qv zero); keys of the spans in [klo, kv_end),
 * whose dK, dV accumulate in z's rows (from klo). The head's K and V are in panels. */
static void backward_rows(const ef_attn *a, tiled_ws *w, const float *q, const float *g,
                          const float *o, const float *lse, const float *k, const float *v,
                          int i0, int qv, int qn, const ef_span *sp, int nspans, int klo,
                          int kv_end, float *dq, const ef_kacc *z) {
    const tiled_plan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim, dp = p->dp, dvp = p->dvp;
    float *qs = w->qp, *gs = w->dop, *dqr = w->dqt; /* [qv][Dp], [qv][Dvp], [qv][Dp] */
    float *sr = w->st, *dpr = w->dpt;               /* [qv][RK] P, dP then dS */
    float lse_use[ROW_QT], dl[ROW_QT];
    for (int i = 0; i < qv; i++) {
        const float *qi = q + (size_t)i * d, *gi = g + (size_t)i * dv;
        for (int t = 0; t < d; t += EF_VL)
            vf_store(qs + (size_t)i * dp + t, vf_loadu(qi + t) * a->scale);
        for (int t = 0; t < dv; t += EF_VL) vf_store(gs + (size_t)i * dvp + t, vf_loadu(gi + t));
        dl[i] = (float)dot_rows(gi, o + (size_t)i * dv, dv); /* delta_i = dO_i . O_i */
        lse_use[i] = lse[i] != -__builtin_inff() ? lse[i] : __builtin_inff();
    }
    memset(dqr, 0, sizeof(float) * (size_t)qv * dp);
    int32_t off[RKV], cnt[RKV];
    const float *bp[RK], *bv[RKV];
    key_iter ki;
    key_iter_init(&ki, sp, nspans, klo, kv_end);
    for (int nvec, first = 1; (nvec = key_iter_next(&ki, off, cnt)) > 0; first = 0) {
        /* P = exp(S - lse), S as forward */
        rows_panels(bv, w->kt, w->kpan, k, (size_t)d, d, off, cnt, nvec);
        rows_kv(qv, d, qs, dp, bv, nvec, sr, RK);
        int need_mask = rows_need_mask(off, cnt, nvec, a->causal, i0);
        for (int i = 0; i < qv; i++) {
            float *s = sr + (size_t)i * RK;
            if (first) { /* the next tile's q, dO, O rows and the dQ row, as forward_rows */
                ef_prefetch(q + (size_t)(qv + i) * d, d);
                ef_prefetch(g + (size_t)(qv + i) * dv, dv);
                ef_prefetch(o + (size_t)(qv + i) * dv, dv);
                for (int t = 0; t < d; t += 16) __builtin_prefetch(dq + (size_t)i * d + t, 1);
            }
            if (need_mask) rows_mask(s, off, cnt, nvec, a->causal, i0 + i);
            for (int x = 0; x < nvec; x++)
                vf_store(s + x * EF_VL, vf_exp_nonpos(vf_load(s + x * EF_VL) - lse_use[i]));
        }
        /* dP[i][key] = dO_i . V[key];  dS = P o (dP - delta) */
        rows_panels(bv, w->vt, w->kpan, v, (size_t)dv, dv, off, cnt, nvec);
        rows_kv(qv, dv, gs, dvp, bv, nvec, dpr, RK);
        for (int i = 0; i < qv; i++)
            for (int x = 0; x < nvec; x++) {
                float *t = dpr + (size_t)i * RK + x * EF_VL;
                vf_store(t, vf_load(sr + (size_t)i * RK + x * EF_VL) * (vf_load(t) - dl[i]));
            }
        /* dQ_i += sum_key dS[i][key] K[key] (times scale at the end) */
        rows_ptrs(bp, k, (size_t)d, off, cnt, nvec);
        rows_pv(qv, nvec * EF_VL, dpr, RK, bp, d, dqr, dp);
        /* dV[key] += sum_i P[i][key] dO_i;  dK[key] += sum_i dS[i][key] (scale q_i) */
        for (int x = 0; x < nvec; x++) ef_kacc_touch(z, off[x], off[x] + cnt[x]);
        rows_keygrad(qv, sr, gs, dvp, z->dv, dvp, klo, off, cnt, nvec);
        rows_keygrad(qv, dpr, qs, dp, z->dk, dp, klo, off, cnt, nvec);
    }
    for (int i = 0; i < qv; i++)
        for (int t = 0; t < d; t += EF_VL)
            vf_storeu(dq + (size_t)i * d + t, vf_load(dqr + (size_t)i * dp + t) * a->scale);
    if (qn > qv) memset(dq + (size_t)qv * d, 0, sizeof(float) * (size_t)(qn - qv) * d);
}

static void backward_head(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    tiled_plan *p = a->impl;
    tiled_ws *w = &p->ws[tid];
    int64_t bh = item / p->splits;
    int split = (int)(item % p->splits), nch = grid_count(p->q0, p->kt, s->kv_len);
    /* this item's keys: chunks [split nch / splits, (split+1) nch / splits) */
    int klo, khi, len;
    chunk_range(p, s->kv_len, (int)((int64_t)split * nch / p->splits), &klo, &len);
    if (split + 1 < p->splits)
        chunk_range(p, s->kv_len, (int)((int64_t)(split + 1) * nch / p->splits), &khi, &len);
    else
        khi = s->kv_len;
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

    ef_kacc z;
    ef_kacc_init(&z, dk, dvo, d, dv, w->dk, w->dv, dp, dvp, w->kz, klo, khi);
    if (p->rows) rows_convert(p, w, k, v, d, dv, kv_valid, bh);
    for (int it = 0; it < p->ntiles; it++) {
        int i0, qn;
        tile_range(p, n, it, &i0, &qn);
        /* rows past q_lens[b] are padding lanes: their q, dO and O are never read, dQ = 0 */
        int qv = EF_MAX(0, EF_MIN(qn, q_valid - i0));
        int kv_end = a->causal ? EF_MIN(kv_valid, i0 + qv) : kv_valid;
        kv_end = EF_MIN(kv_end, khi);
        if (qv == 0 || kv_end <= klo) { /* no query of this tile sees a key of this range */
            memset(dq + (size_t)i0 * d, 0, sizeof(float) * (size_t)qn * d);
            continue;
        }
        int nspans, h = (int)(bh % s->heads);
        const ef_span *sp = spans_of(p, h, it, &nspans);
        if (tile_rows(p, sp, nspans)) {
            backward_rows(a, w, q + (size_t)i0 * d, g + (size_t)i0 * dv, o + (size_t)i0 * dv,
                          lse + i0, k, v, i0, qv, qn, sp, nspans, klo, kv_end,
                          dq + (size_t)i0 * d, &z);
            continue;
        }
        /* (row-layout tiles prefetch their own, above) */
        pf_list pf;
        int keys = span_keys(sp, nspans, kv_end) - span_keys(sp, nspans, klo);
        next_tile_rows(c, bh, h, it, 1, 1 + 2 * ((keys + KT - 1) / KT), &pf);
        pf_issue(&pf, pf.step);
        float lse_use[QT] __attribute__((aligned(64))), dl[QT] __attribute__((aligned(64)));
        bwd_pack(a, w, q + (size_t)i0 * d, d, g + (size_t)i0 * dv, dv, o + (size_t)i0 * dv, dv,
                 lse + i0, 1, qv, lse_use, dl);
        int lanes = EF_MIN(p->qt, pad16(qv)); /* as forward: the vectors the queries fill */
        for (int x = 0; x < nspans; x++)
            for (int j0 = EF_MAX(sp[x].j0, klo); j0 < EF_MIN(sp[x].j1, kv_end); j0 += KT) {
                int kn = EF_MIN(KT, EF_MIN(sp[x].j1, kv_end) - j0);
                ef_tile_gemm(kn, d, lanes, k + (size_t)j0 * d, d, 1, w->qt, QT, w->st, QT, 0);
                pf_issue(&pf, pf.step);
                if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0, lanes / EF_VL);
                if (sp[x].masked) p->pat.tile_mask(a, h, i0, j0, kn, w->st);
                ef_kacc_touch(&z, j0, j0 + kn);
                bwd_chunk(a, w, k + (size_t)j0 * d, d, v + (size_t)j0 * dv, dv, kn, lanes,
                          lse_use, dl, z.dk + (size_t)(j0 - klo) * dp,
                          z.dv + (size_t)(j0 - klo) * dvp);
                pf_issue(&pf, pf.step);
            }
        pf_issue(&pf, -1);
        unpack_tile(dq + (size_t)i0 * d, d, w->dqt, d, qn, NULL, a->scale, 0);
    }
    ef_kacc_finish(&z);
}

/* The stride pass's backward, added to the first pass's gradients, for (batch bh, residue r):
 * the class's queries tile by tile against its keys, read in place; dK, dV of the class
 * accumulate in w->dk, w->dv (row c = key r + c s) and are added at the end. Classes
 * touch disjoint rows of dQ, dK and dV, so items are independent. Rows prefetched as forward
 * (`own`, `next`; tiles after a class's first prefetch their own). */
static void stride_backward_class(const tiled_call *c, tiled_ws *w, int64_t bh, int r, int own,
                                  pf_list *next) {
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    const tiled_plan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, st = p->stride;
    int dp = p->dp, dvp = p->dvp, b = (int)(bh / s->heads);
    int nq = class_count(ef_attn_q_valid(a, c->io, b), r, st);
    int nk = class_count(ef_attn_kv_valid(a, c->io, b), r, st);
    if (nq == 0 || nk == 0 || (a->causal && nq < 2)) {
        pf_issue(next, -1);
        return;
    }
    size_t base_q = (size_t)bh * n + r, base_k = (size_t)bh * m + r;
    const float *k = c->io->k + base_k * d, *v = c->io->v + base_k * dv;
    size_t ldq = (size_t)st * d, ldv = (size_t)st * dv;
    memset(w->dk, 0, sizeof(float) * (size_t)nk * dp);
    memset(w->dv, 0, sizeof(float) * (size_t)nk * dvp);
    for (int a0 = 0; a0 < nq; a0 += p->qt) {
        int qv = EF_MIN(p->qt, nq - a0), lanes = pad16(qv);
        int c_end = a->causal ? EF_MIN(nk, a0 + qv - 1) : nk;
        if (c_end <= 0) continue;
        size_t first = base_q + (size_t)a0 * st;
        float lse_use[QT] __attribute__((aligned(64))), dl[QT] __attribute__((aligned(64)));
        if (own || a0 > 0) { /* as forward */
            pf_list mine;
            pf_init(&mine);
            class_rows(c, bh, r, a0, 1, &mine);
            pf_issue(&mine, -1);
        }
        if (a0 + p->qt >= nq) pf_steps(next, 1 + 2 * ((c_end + KT - 1) / KT)); /* last tile */
        bwd_pack(a, w, c->io->q + first * d, ldq, c->dout + first * dv, ldv,
                 c->io->out + first * dv, ldv, c->lse + first, st, qv, lse_use, dl);
        pf_issue(next, next->step);
        for (int c0 = 0; c0 < c_end; c0 += KT) {
            int kn = EF_MIN(KT, c_end - c0);
            class_scores(a, w, k, ldq, c0, kn, a0, lanes);
            prefetch_rows(k, ldq, d, c0 + KT, EF_MIN(c0 + 2 * KT, c_end));
            prefetch_rows(v, ldv, dv, c0 + KT, EF_MIN(c0 + 2 * KT, c_end));
            pf_issue(next, next->step);
            bwd_chunk(a, w, k + (size_t)c0 * ldq, ldq, v + (size_t)c0 * ldv, ldv, kn, lanes,
                      lse_use, dl, w->dk + (size_t)c0 * dp, w->dv + (size_t)c0 * dvp);
            pf_issue(next, next->step);
        }
        float *dq = c->dq + first * d;
        unpack_tile(dq, ldq, w->dqt, d, qv, NULL, a->scale, 1);
    }
    float *dk = c->dk + base_k * d, *dvo = c->dv + base_k * dv;
    enum { AHEAD = 8 }; /* rows prefetched ahead of the additions */
    prefetch_rows(dk, ldq, d, 0, EF_MIN(AHEAD, nk));
    prefetch_rows(dvo, ldv, dv, 0, EF_MIN(AHEAD, nk));
    for (int j = 0; j < nk; j++) {
        if (j + AHEAD < nk)
            ef_prefetch(dk + (size_t)(j + AHEAD) * ldq, d),
                ef_prefetch(dvo + (size_t)(j + AHEAD) * ldv, dv);
        ef_row_add(dk + (size_t)j * ldq, w->dk + (size_t)j * dp, d);
        ef_row_add(dvo + (size_t)j * ldv, w->dv + (size_t)j * dvp, dv);
    }
}

/* Work item (batch, head, group of classes), as forward. */
static void stride_backward(void *ctx, int64_t item, int tid) {
    const tiled_call *c = ctx;
    const ef_attn_shape *s = &c->a->shape;
    tiled_plan *p = c->a->impl;
    int ng = stride_groups(p, s), g = (int)(item % ng);
    int r1 = EF_MIN(stride_classes(p, s), (g + 1) * p->cgroup);
    for (int r = g * p->cgroup; r < r1; r++) { /* each class prefetches the next one's rows */
        pf_list next;
        pf_init(&next);
        if (r + 1 < r1) class_rows(c, item / ng, r + 1, 0, 1, &next);
        stride_backward_class(c, &p->ws[tid], item / ng, r, r == g * p->cgroup,
                              &next);
    }
}

ef_status ef_tiled_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                            float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    tiled_call c = {a, io, (float *)saved, dout, dq, dk, dv};
    tiled_plan *p = a->impl;
    int64_t bh = (int64_t)s->batch * s->heads;
    int threads = EF_MIN(ef_attn_threads(a), p->bwd_slots);
    ef_parallel_for(bh * p->splits, threads, backward_head, &c);
    size_t per = (size_t)s->q_len * s->head_dim;
    for (int split = 1; split < p->splits; split++) /* fixed order: split 1, 2, ... */
        for (int64_t h = 0; h < bh; h++) {
            const float *src = p->dqpart + ((size_t)(split - 1) * bh + h) * per;
            float *dst = dq + (size_t)h * per;
            for (size_t x = 0; x < per; x++) dst[x] += src[x];
        }
    if (p->stride) ef_parallel_for(bh * stride_groups(p, s), threads, stride_backward, &c);
    return EF_OK;
}

/* Visible pairs of one head: closed form on whole chunks, the masks counted on partial ones,
 * and the stride pass's classes in closed form. */
int64_t ef_tiled_pairs(const ef_attn *a, int head) {
    const tiled_plan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    float st[KT * QT] __attribute__((aligned(64)));
    int64_t total = 0;
    for (int t = 0; t < p->ntiles; t++) {
        int i0, qn, nspans;
        tile_range(p, s->q_len, t, &i0, &qn);
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
                if (a->causal) mask_causal(st, kn, j0, i0, p->nv);
                p->pat.tile_mask(a, head, i0, j0, kn, st);
                for (int r = 0; r < kn; r++)
                    for (int l = 0; l < qn; l++) total += st[r * QT + l] != -__builtin_inff();
            }
    }
    if (p->stride) /* query i = r + a s: the keys c of its class with c != a (causal: c < a) */
        for (int i = 0; i < s->q_len; i++) {
            int r = i % p->stride, ai = i / p->stride, mc = class_count(s->kv_len, r, p->stride);
            total += a->causal ? EF_MIN(ai, mc) : mc - (ai < mc);
        }
    return total;
}
