/*
 * sparse.c - fixed and global attention patterns on the tiled engine (tiled.c): sliding
 * windows, non-overlapping blocks, the Sparse Transformer's strided and fixed patterns
 * (Child et al. 2019), Longformer (Beltagy et al. 2020) and BigBird ITC / ETC (Zaheer et al.
 * 2020). docs/sparse.md defines each pattern; ALGORITHMS.md b.10-b.12 says how the reference
 * implementations compute them and where they differ.
 *
 * Each pattern is three functions that must agree: `visible` (one pair; the reference path and
 * the tests use it), `classify` (a query tile against a key chunk: none / all / partial; it
 * decides which chunks the engine computes) and `tile_mask` (hides the invisible pairs of a
 * partial chunk, vectorised over the 16 or so queries of a lane group). Causal masking and
 * key padding are the engine's. Positions are aligned top-left (query i and key i are the
 * same token) also when q_len != kv_len.
 * Saved for backward: lse [batch][heads][q_len]. Work: visible chunks x 64 x 64 x (D + Dv).
 */
#include "attn/attn.h"
#include "core/vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NEG_INF (-__builtin_inff())

/* Hides lanes where keep is false in row r of a transposed score tile. */
EF_INLINE void hide_row(float *st, int r, int u, vi keep) {
    float *p = st + (size_t)r * EF_QT + u * EF_VL;
    vf_store(p, vf_select(keep, vf_load(p), vf_set1(NEG_INF)));
}

/* block=auto (strided, fixed): the Sparse Transformer's l of about sqrt(N) (N the longer of
 * q_len and kv_len), which makes the work O(N sqrt N); a multiple of 16, at least 16. */
static void sqrt_block(ef_attn *a, int idx) {
    if (!a->opt[idx].is_auto) return;
    int n = EF_MAX(a->shape.q_len, a->shape.kv_len);
    a->opt[idx].i = EF_MAX(16, (int64_t)(sqrt((double)n) / 16 + 0.5) * 16);
}

/* Lane query indices of lane group u of the tile starting at i0. */
EF_INLINE vi lanes_of(int i0, int u) { return vi_iota() + (i0 + u * EF_VL); }

/* The smallest and largest i - j over queries [i0, i1) and keys [j0, j1). */
static void diff_range(int i0, int i1, int j0, int j1, int *lo, int *hi) {
    *lo = i0 - (j1 - 1);
    *hi = (i1 - 1) - j0;
}

/* ---------------------------------------------------------------------------------------------
 * local:window=W - query i sees |i - j| <= W/2; with causal=1, i - W < j <= i
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc local_opts[] = {
    {"window", EF_OPT_INT, "256", 1, 1 << 30, NULL, 0,
     "window width in tokens: |i-j| <= window/2 (causal: the window keys up to i)"},
};
enum { LOCAL_WINDOW };

/* Is i - j inside the window? (for causal the engine also requires j <= i) */
static int local_in(const ef_attn *a, int64_t w, int diff) {
    return a->causal ? diff < w : (diff <= w / 2 && -diff <= w / 2);
}

static int local_visible(const ef_attn *a, int head, int i, int j) {
    (void)head;
    return local_in(a, ef_opt_i(a, LOCAL_WINDOW), i - j);
}

static int local_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)head;
    int64_t w = ef_opt_i(a, LOCAL_WINDOW);
    int lo, hi;
    diff_range(i0, i1, j0, j1, &lo, &hi);
    if (a->causal) /* pattern i - j < w; pairs with j > i are the engine's to hide */
        return lo >= w ? EF_CHUNK_NONE : hi < w ? EF_CHUNK_ALL : EF_CHUNK_PARTIAL;
    int64_t h = w / 2;
    if (lo > h || hi < -h) return EF_CHUNK_NONE;
    return (lo >= -h && hi <= h) ? EF_CHUNK_ALL : EF_CHUNK_PARTIAL;
}

static void local_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    (void)head;
    int w = (int)ef_opt_i(a, LOCAL_WINDOW);
    for (int r = 0; r < kn; r++)
        for (int u = 0; u < EF_QT / EF_VL; u++) {
            vi d = lanes_of(i0, u) - (j0 + r); /* i - j */
            vi keep = a->causal ? d < w : (d <= w / 2) & (d >= -(w / 2));
            hide_row(st, r, u, keep);
        }
}

/* ---------------------------------------------------------------------------------------------
 * blocklocal:block=B - query i sees the keys of its own block, floor(i/B) == floor(j/B)
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc blocklocal_opts[] = {
    {"block", EF_OPT_INT, "64", 1, 1 << 30, NULL, 0, "block length in tokens"},
};
enum { BL_BLOCK };

static int blocklocal_visible(const ef_attn *a, int head, int i, int j) {
    (void)head;
    int64_t b = ef_opt_i(a, BL_BLOCK);
    return i / b == j / b;
}

/* Blocks below 64 tokens: tiles and chunks of one block (the engine rounds the tile up to the
 * vector width). */
static int blocklocal_grid(const ef_attn *a) { return (int)EF_MIN(ef_opt_i(a, BL_BLOCK), EF_KT); }

static int blocklocal_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)head;
    int64_t b = ef_opt_i(a, BL_BLOCK);
    int64_t qa = i0 / b, qb = (i1 - 1) / b, ka = j0 / b, kb = (j1 - 1) / b;
    if (qb < ka || kb < qa) return EF_CHUNK_NONE;
    return qa == qb && ka == kb ? EF_CHUNK_ALL : EF_CHUNK_PARTIAL;
}

static void blocklocal_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    (void)head;
    int b = (int)ef_opt_i(a, BL_BLOCK);
    for (int r = 0; r < kn; r++) {
        int start = (j0 + r) / b * b;
        for (int u = 0; u < EF_QT / EF_VL; u++) {
            vi i = lanes_of(i0, u);
            hide_row(st, r, u, (i >= start) & (i < start + b));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * strided:block=B - Sparse Transformer strided: |i - j| < B or (i - j) mod B == 0
 * (causal: i - j < B or B divides i - j, with j <= i)
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc strided_opts[] = {
    {"block", EF_OPT_INT, "128", 1, 1 << 30, NULL, 1,
     "stride l: the previous l tokens and every l-th token before them; auto = sqrt(N)"},
};
enum { ST_BLOCK };

static int strided_visible(const ef_attn *a, int head, int i, int j) {
    (void)head;
    int64_t b = ef_opt_i(a, ST_BLOCK);
    int d = i - j;
    return (a->causal ? d < b : (d < b && -d < b)) || d % b == 0;
}

static int strided_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)head;
    int64_t b = ef_opt_i(a, ST_BLOCK);
    if (b == 1) return EF_CHUNK_ALL; /* every key is a multiple of 1 away */
    /* the window |i - j| < b (causal: i - j < b) only; the stride pass adds the multiples */
    int lo, hi;
    diff_range(i0, i1, j0, j1, &lo, &hi);
    if (a->causal ? lo >= b : (lo >= b || -hi >= b)) return EF_CHUNK_NONE;
    return (a->causal ? hi < b : (hi < b && -lo < b)) ? EF_CHUNK_ALL : EF_CHUNK_PARTIAL;
}

static int strided_stride(const ef_attn *a) {
    int64_t b = ef_opt_i(a, ST_BLOCK);
    return b >= 2 && b < EF_MAX(a->shape.q_len, a->shape.kv_len) ? (int)b : 0;
}

/* Keeps, in row r, the lanes l (queries i0 + l) with i - j a multiple of `step` on top of
 * `keep` (an array of QT lane flags): those are l = (j - i0) mod step, + step, ... */
static void keep_multiples(int32_t *keep, int i0, int j, int step, int lo, int hi) {
    int first = ((j - i0) % step + step) % step;
    for (int l = first; l < EF_QT; l += step) {
        int d = i0 + l - j; /* i - j */
        if (d >= lo && d <= hi) keep[l] = -1;
    }
}

static void apply_keep(float *st, int r, const int32_t *keep) {
    for (int u = 0; u < EF_QT / EF_VL; u++) hide_row(st, r, u, *(const vi *)(keep + u * EF_VL));
}

static void strided_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    (void)head;
    int b = (int)ef_opt_i(a, ST_BLOCK);
    for (int r = 0; r < kn; r++)
        for (int u = 0; u < EF_QT / EF_VL; u++) {
            vi d = lanes_of(i0, u) - (j0 + r);
            hide_row(st, r, u, a->causal ? d < b : (d < b) & (-d < b));
        }
}

/* ---------------------------------------------------------------------------------------------
 * fixed:block=B,summary=C - Sparse Transformer fixed: the own block (floor(i/B) == floor(j/B))
 * or a summary key, j mod B >= B - C (the last C tokens of every block)
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc fixed_opts[] = {
    {"block", EF_OPT_INT, "128", 1, 1 << 30, NULL, 1, "block length l; auto = sqrt(N)"},
    {"summary", EF_OPT_INT, "32", 1, 1 << 30, NULL, 1,
     "c: the last c tokens of every block are seen by every query (c <= block); auto = min(32, l)"},
};
enum { FX_BLOCK, FX_SUMMARY };

static int fixed_is_summary(const ef_attn *a, int64_t j) {
    int64_t b = ef_opt_i(a, FX_BLOCK);
    return j % b >= b - ef_opt_i(a, FX_SUMMARY);
}

static int fixed_grid(const ef_attn *a) { return (int)EF_MIN(ef_opt_i(a, FX_BLOCK), EF_KT); }

static int fixed_visible(const ef_attn *a, int head, int i, int j) {
    (void)head;
    int64_t b = ef_opt_i(a, FX_BLOCK);
    return i / b == j / b || fixed_is_summary(a, j);
}

/* The visible ranges of queries [i0, i1): the own block(s) whole (masked when the tile spans
 * two blocks), and the summary keys of every other block -- runs of C keys, so the work is the
 * visible pairs, not the N x N grid the 64-key chunks would give. */
static void fixed_spans(const ef_attn *a, int head, int i0, int i1,
                        void (*emit)(void *ctx, int j0, int j1, int masked), void *ctx) {
    (void)head;
    int64_t b = ef_opt_i(a, FX_BLOCK), c = ef_opt_i(a, FX_SUMMARY), m = a->shape.kv_len;
    int64_t qa = i0 / b, qb = (i1 - 1) / b;
    for (int64_t s0 = 0; s0 < m; s0 += b) {
        int64_t kb = s0 / b, s1 = EF_MIN(m, s0 + b);
        if (kb >= qa && kb <= qb)
            emit(ctx, (int)s0, (int)s1, qa != qb);
        else
            emit(ctx, (int)EF_MIN(s1, s0 + b - c), (int)s1, 0);
    }
}

static void fixed_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    (void)head;
    int b = (int)ef_opt_i(a, FX_BLOCK);
    for (int r = 0; r < kn; r++) {
        if (fixed_is_summary(a, j0 + r)) continue; /* a summary key is seen by every query */
        int start = (j0 + r) / b * b;
        for (int u = 0; u < EF_QT / EF_VL; u++) {
            vi i = lanes_of(i0, u);
            hide_row(st, r, u, (i >= start) & (i < start + b));
        }
    }
}

static ef_status fixed_check(ef_attn *a) {
    sqrt_block(a, FX_BLOCK);
    /* summary=auto: LRA's 32, or the whole block when it is shorter. A summary that grows with
     * the block (say block/4) would keep the summary part at N^2/4: the O(N sqrt N) of
     * block=auto needs a constant c. */
    if (a->opt[FX_SUMMARY].is_auto) a->opt[FX_SUMMARY].i = EF_MIN(32, ef_opt_i(a, FX_BLOCK));
    if (ef_opt_i(a, FX_SUMMARY) > ef_opt_i(a, FX_BLOCK))
        return ef_error(EF_ERR_ARG, "fixed: summary=%lld is larger than block=%lld",
                        (long long)ef_opt_i(a, FX_SUMMARY), (long long)ef_opt_i(a, FX_BLOCK));
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * longformer:window=W,dilation=D,global=G - a (dilated) sliding window, i - j a multiple of D
 * and |i - j| <= (W/2) D (causal: i - j < W D), plus global tokens that see and are seen by
 * every token. global=G takes the first G positions; global=a;b;c (or p; for one) lists them.
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc longformer_opts[] = {
    {"window", EF_OPT_INT, "512", 1, 1 << 30, NULL, 0, "window width in (dilated) steps"},
    {"dilation", EF_OPT_INT, "1", 1, 1 << 20, NULL, 0, "gap between window keys"},
    {"global", EF_OPT_LIST, "1", 0, 1 << 30, NULL, 0,
     "G = the first G positions are global; a;b;c (or p;) = these positions"},
};
enum { LF_WINDOW, LF_DILATION, LF_GLOBAL };

typedef struct lf_data {
    int n;        /* positions covered: max(q_len, kv_len) */
    uint8_t *g;   /* [n] global flag */
    int32_t *pre; /* [n+1] prefix counts of g */
} lf_data;

static int lf_window(const ef_attn *a, int d) {
    int64_t w = ef_opt_i(a, LF_WINDOW), dil = ef_opt_i(a, LF_DILATION);
    if (d % dil) return 0;
    return a->causal ? d < w * dil : (d <= w / 2 * dil && -d <= w / 2 * dil);
}

static int longformer_visible(const ef_attn *a, int head, int i, int j) {
    (void)head;
    const lf_data *g = ef_tiled_user(a);
    return g->g[i] || g->g[j] || lf_window(a, i - j);
}

static int longformer_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)head;
    const lf_data *g = ef_tiled_user(a);
    int64_t w = ef_opt_i(a, LF_WINDOW), dil = ef_opt_i(a, LF_DILATION);
    int gq = g->pre[i1] - g->pre[i0], gk = g->pre[j1] - g->pre[j0];
    if (gq == i1 - i0 || gk == j1 - j0) return EF_CHUNK_ALL;
    int lo, hi, wc;
    diff_range(i0, i1, j0, j1, &lo, &hi);
    int64_t ext = a->causal ? w * dil - 1 : w / 2 * dil; /* |i - j| bound of the window */
    if (a->causal ? lo > ext : (lo > ext || hi < -ext))
        wc = EF_CHUNK_NONE;
    else if (dil == 1 && (a->causal ? hi <= ext : (lo >= -ext && hi <= ext)))
        wc = EF_CHUNK_ALL;
    else
        wc = EF_CHUNK_PARTIAL;
    if (gq || gk) return wc == EF_CHUNK_ALL ? EF_CHUNK_ALL : EF_CHUNK_PARTIAL;
    return wc;
}

static void longformer_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    (void)head;
    const lf_data *g = ef_tiled_user(a);
    int64_t w = ef_opt_i(a, LF_WINDOW);
    int dil = (int)ef_opt_i(a, LF_DILATION);
    /* in 64 bits: window x dilation reaches 2^50; |i - j| < 2^31, so INT32_MAX means no bound */
    int ext = (int)EF_MIN(a->causal ? w * dil - 1 : w / 2 * dil, (int64_t)INT32_MAX);
    int32_t gq[EF_QT] __attribute__((aligned(64))), keep[EF_QT] __attribute__((aligned(64)));
    for (int l = 0; l < EF_QT; l++) gq[l] = i0 + l < g->n && g->g[i0 + l] ? -1 : 0;
    for (int r = 0; r < kn; r++) {
        int j = j0 + r;
        if (g->g[j]) continue; /* a global key is seen by every query */
        if (dil == 1) {
            for (int u = 0; u < EF_QT / EF_VL; u++) {
                vi d = lanes_of(i0, u) - j;
                vi win = a->causal ? d <= ext : (d <= ext) & (d >= -ext);
                hide_row(st, r, u, win | *(const vi *)(gq + u * EF_VL));
            }
        } else {
            memcpy(keep, gq, sizeof keep);
            keep_multiples(keep, i0, j, dil, a->causal ? -(1 << 30) : -ext, ext);
            apply_keep(st, r, keep);
        }
    }
}

static ef_status longformer_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    const ef_opt_val *gv = &a->opt[LF_GLOBAL];
    int n = EF_MAX(s->q_len, s->kv_len), lim = EF_MIN(s->q_len, s->kv_len);
    lf_data *g = ef_mem_calloc(1, sizeof *g + (size_t)n + sizeof(int32_t) * (size_t)(n + 1) + 8);
    if (!g) return ef_error(EF_ERR_NOMEM, "longformer: out of memory");
    g->n = n;
    g->pre = (int32_t *)(g + 1);
    g->g = (uint8_t *)(g->pre + n + 1);
    if (!gv->f && gv->i == 1) { /* a count: the first G positions */
        if (gv->list[0] > lim) {
            ef_free(g);
            return ef_error(EF_ERR_ARG,
                            "longformer: global=%lld asks for more global tokens than the "
                            "sequence has (%d)",
                            (long long)gv->list[0], lim);
        }
        memset(g->g, 1, (size_t)gv->list[0]);
    } else {
        for (int64_t x = 0; x < gv->i; x++) {
            if (gv->list[x] >= lim) {
                ef_free(g);
                return ef_error(EF_ERR_ARG,
                                "longformer: global position %lld is outside the sequence "
                                "(q_len=%d, kv_len=%d)",
                                (long long)gv->list[x], s->q_len, s->kv_len);
            }
            g->g[gv->list[x]] = 1;
        }
    }
    for (int p = 0; p < n; p++) g->pre[p + 1] = g->pre[p] + g->g[p];
    static const ef_tiled_pattern pat = {.classify = longformer_classify,
                                         .tile_mask = longformer_mask};
    return ef_tiled_init(a, &pat, g);
}

/* ---------------------------------------------------------------------------------------------
 * bigbird:block=64,window=3,random=3,global=2 - BigBird ITC on blocks of `block` tokens: each
 * query block sees the `window` blocks around it, `random` other blocks drawn per head and per
 * query block from the seed (distinct, outside the window and the global blocks), and the
 * global blocks (the first ceil(global/2) and the last floor(global/2)), which also see every
 * block. bigbird-etc adds `extra` global tokens in front of the blocks (ETC).
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc bigbird_opts[] = {
    {"block", EF_OPT_INT, "64", 1, 1 << 20, NULL, 0, "block length in tokens"},
    {"window", EF_OPT_INT, "3", 1, 1 << 20, NULL, 0, "sliding window in blocks (odd)"},
    {"random", EF_OPT_INT, "3", 0, 1 << 20, NULL, 0, "random key blocks per query block"},
    {"global", EF_OPT_INT, "2", 0, 1 << 20, NULL, 0,
     "global blocks: the first ceil(g/2) and the last floor(g/2)"},
    {"extra", EF_OPT_INT, "16", 0, 1 << 20, NULL, 0,
     "(bigbird-etc) global tokens in front of the blocked sequence"},
};
enum { BB_BLOCK, BB_WINDOW, BB_RANDOM, BB_GLOBAL, BB_EXTRA };

typedef struct bb_data {
    int bs, nb, w, r, g, extra;
    int32_t *rand; /* [heads][nb][r] random key blocks, -1 for global query blocks */
} bb_data;

static int bb_global(const bb_data *d, int b) {
    return b < (d->g + 1) / 2 || b >= d->nb - d->g / 2;
}

static int bb_vis(const bb_data *d, int h, int qb, int kb) {
    if (bb_global(d, qb) || bb_global(d, kb)) return 1;
    int diff = qb - kb;
    if (diff <= d->w / 2 && -diff <= d->w / 2) return 1;
    const int32_t *r = d->rand + ((size_t)h * d->nb + qb) * d->r;
    for (int x = 0; x < d->r; x++)
        if (r[x] == kb) return 1;
    return 0;
}

static int bigbird_visible(const ef_attn *a, int head, int i, int j) {
    const bb_data *d = ef_tiled_user(a);
    if (i < d->extra || j < d->extra) return 1;
    return bb_vis(d, head, (i - d->extra) / d->bs, (j - d->extra) / d->bs);
}

/* The first key block at or after kb that query block qb sees (nb if none): the smallest of
 * the next global block, the window and the next random block (each row of d->rand sorted). */
static int bb_next(const bb_data *d, int h, int qb, int kb) {
    int g0 = (d->g + 1) / 2, g1 = d->nb - d->g / 2;
    if (kb >= d->nb || bb_global(d, qb) || kb < g0 || kb >= g1) return kb;
    int best = g1, lo = qb - d->w / 2, hi = qb + d->w / 2;
    if (kb <= hi) best = EF_MAX(kb, lo);
    const int32_t *r = d->rand + ((size_t)h * d->nb + qb) * d->r;
    int a = 0, z = d->r; /* first random block >= kb */
    while (a < z) {
        int mid = (a + z) / 2;
        if (r[mid] < kb)
            a = mid + 1;
        else
            z = mid;
    }
    if (a < d->r) best = EF_MIN(best, r[a]);
    return best;
}

/* The visible key blocks of queries [i0, i1), listed in increasing order by merging the
 * tile's query blocks' own lists: O(visible blocks x query blocks in the tile x log random)
 * per tile, instead of asking about every (tile, chunk) pair. A block is masked when some
 * query block of the tile does not see it. */
static void bigbird_spans(const ef_attn *a, int head, int i0, int i1,
                          void (*emit)(void *ctx, int j0, int j1, int masked), void *ctx) {
    const bb_data *d = ef_tiled_user(a);
    int e = d->extra, m = a->shape.kv_len;
    if (i0 < e) { /* ETC rows see every key (rows past them: the mask) */
        emit(ctx, 0, m, i1 > e);
        return;
    }
    if (e > 0) emit(ctx, 0, e, 0); /* ETC keys are seen by every row */
    int qa = (i0 - e) / d->bs, qz = (i1 - 1 - e) / d->bs;
    for (int kb = 0; kb < d->nb;) {
        int next = d->nb, seen = 0;
        for (int qb = qa; qb <= qz; qb++) {
            int x = bb_next(d, head, qb, kb);
            if (x < next)
                next = x, seen = 1;
            else if (x == next)
                seen++;
        }
        if (next >= d->nb) break;
        emit(ctx, e + next * d->bs, e + (next + 1) * d->bs, seen < qz - qa + 1);
        kb = next + 1;
    }
}

/* Lanes of the tile fall into a few query blocks (and the ETC tokens): visibility is decided
 * once per (query block, key row) and written for the block's whole lane range. */
static void bigbird_mask(const ef_attn *a, int head, int i0, int j0, int kn, float *st) {
    const bb_data *d = ef_tiled_user(a);
    int n = a->shape.q_len;
    int32_t keep[EF_QT] __attribute__((aligned(64)));
    for (int r = 0; r < kn; r++) {
        int j = j0 + r;
        if (j < d->extra) continue; /* an ETC key is seen by every query */
        int kb = (j - d->extra) / d->bs;
        for (int l = 0; l < EF_QT;) {
            int i = i0 + l;
            int run; /* lanes [l, l + run) share the decision */
            int32_t k;
            if (i >= n || i < d->extra) {
                run = i >= n ? EF_QT - l : EF_MIN(EF_QT - l, d->extra - i);
                k = -1; /* padding lanes, ETC rows */
            } else {
                int qb = (i - d->extra) / d->bs;
                int end = d->extra + (qb + 1) * d->bs; /* first position of the next block */
                run = EF_MIN(EF_QT - l, end - i);
                k = bb_vis(d, head, qb, kb) ? -1 : 0;
            }
            for (int t = 0; t < run; t++) keep[l + t] = k;
            l += run;
        }
        apply_keep(st, r, keep);
    }
}

/* The tile grid starts after the ETC tokens, so that blocks of 64 fill whole tiles. */
static int bigbird_origin(const ef_attn *a) {
    const bb_data *d = ef_tiled_user(a);
    return d->extra;
}
static int bigbird_grid(const ef_attn *a) {
    const bb_data *d = ef_tiled_user(a);
    return EF_MIN(d->bs, EF_KT);
}

static ef_status bigbird_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    const char *name = a->ops->name;
    int etc = ef_attn_opt_index(a->ops, "extra") >= 0;
    int bs = (int)ef_opt_i(a, BB_BLOCK), w = (int)ef_opt_i(a, BB_WINDOW);
    int r = (int)ef_opt_i(a, BB_RANDOM), g = (int)ef_opt_i(a, BB_GLOBAL);
    int extra = etc ? (int)ef_opt_i(a, BB_EXTRA) : 0;
    if (s->q_len != s->kv_len)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "%s: q_len=%d != kv_len=%d; BigBird's block layout is "
                        "defined for self-attention",
                        name, s->q_len, s->kv_len);
    if (w % 2 == 0)
        return ef_error(EF_ERR_ARG,
                        "%s: window=%d must be odd (the query block and w/2 on each side)", name,
                        w);
    if (extra >= s->q_len)
        return ef_error(EF_ERR_ARG, "%s: extra=%d leaves no tokens for the blocks (q_len=%d)", name,
                        extra, s->q_len);
    int nb = (s->q_len - extra + bs - 1) / bs;
    if (g > nb)
        return ef_error(EF_ERR_ARG,
                        "%s: global=%d blocks but the sequence has only %d blocks of %d", name, g,
                        nb, bs);
    /* The candidates for the random blocks of a non-global query block qb: the non-global
     * blocks [g0, g1) except its window [lo, hi] (which holds qb, so it is never empty), as the
     * virtual array cand(i) = g0 + i below the window, hi + 1 + (i - left) above it; count
     * c = (g1 - g0) - (hi - lo + 1). Closed forms: O(1) per block, whatever nb and w. */
    int g0 = (g + 1) / 2, g1 = nb - g / 2, hw = w / 2;
    int worst = nb;
    for (int qb = g0; qb < g1; qb++) {
        int lo = EF_MAX(g0, qb - EF_MIN(hw, qb)), hi = EF_MIN(g1 - 1, qb + EF_MIN(hw, nb - qb));
        worst = EF_MIN(worst, (g1 - g0) - (hi - lo + 1));
    }
    if (r > 0 && worst < r)
        return ef_error(EF_ERR_ARG,
                        "%s: random=%d does not fit: with %d blocks of %d tokens, window=%d "
                        "and global=%d, a query block has only %d other blocks to draw from (use a "
                        "longer sequence, a smaller block or fewer random blocks)",
                        name, r, nb, bs, w, g, worst);
    /* r <= worst < nb: heads * nb * r int32 must fit a size_t */
    if ((double)s->heads * nb * (double)r * sizeof(int32_t) > (double)(SIZE_MAX / 2))
        return ef_error(EF_ERR_NOMEM, "%s: %d heads x %d blocks x random=%d do not fit in memory",
                        name, s->heads, nb, r);
    size_t nrand = (size_t)s->heads * nb * r;
    bb_data *d = ef_mem_calloc(1, sizeof *d + sizeof(int32_t) * (nrand ? nrand : 1));
    /* the partial Fisher-Yates below touches positions x < r (front) and at most r picks >= r
     * (kept in a small open-addressing table: key position, value block) */
    int cap = 4;
    while (cap < 4 * r) cap *= 2;
    int32_t *front = ef_mem_malloc(sizeof(int32_t) * (size_t)(r ? r : 1));
    int32_t *hkey = ef_mem_malloc(sizeof(int32_t) * (size_t)cap),
            *hval = ef_mem_malloc(sizeof(int32_t) * (size_t)cap);
    if (!d || !front || !hkey || !hval) {
        ef_free(d), ef_free(front), ef_free(hkey), ef_free(hval);
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %zu random blocks", name, nrand);
    }
    *d = (bb_data){bs, nb, w, r, g, extra, (int32_t *)(d + 1)};
    for (int h = 0; h < s->heads; h++)
        for (int qb = 0; qb < nb; qb++) {
            int32_t *out = d->rand + ((size_t)h * nb + qb) * r;
            if (bb_global(d, qb)) {
                for (int x = 0; x < r; x++) out[x] = -1;
                continue;
            }
            int lo = EF_MAX(g0, qb - EF_MIN(hw, qb)), hi = EF_MIN(g1 - 1, qb + EF_MIN(hw, nb - qb));
            int left = lo - g0, c = (g1 - g0) - (hi - lo + 1);
            for (int x = 0; x < r; x++) front[x] = x < left ? g0 + x : hi + 1 + (x - left);
            for (int i = 0; i < cap; i++) hkey[i] = -1;
            /* partial Fisher-Yates over cand[0..c); draw x of (head, query block) is counter
             * (qb << 20) + x of stream `head`, so the layout depends only on the seed */
            for (int x = 0; x < r; x++) {
                uint32_t word[4];
                ef_rng_raw(a->seed, 0x6269676269726400ull + (uint64_t)h, ((uint64_t)qb << 20) + x,
                           word);
                int pick = x + (int)(((uint64_t)word[0] * (uint64_t)(c - x)) >> 32);
                int32_t t = front[x];
                if (pick < r) {
                    front[x] = front[pick], front[pick] = t;
                } else {
                    unsigned slot = (unsigned)pick * 2654435761u & (unsigned)(cap - 1);
                    while (hkey[slot] >= 0 && hkey[slot] != pick)
                        slot = (slot + 1) & (unsigned)(cap - 1);
                    if (hkey[slot] < 0) { /* untouched: the virtual array's own value */
                        hkey[slot] = pick;
                        hval[slot] = pick < left ? g0 + pick : hi + 1 + (pick - left);
                    }
                    front[x] = hval[slot], hval[slot] = t;
                }
                out[x] = front[x];
            }
            qsort(out, (size_t)r, sizeof *out, ef_cmp_i32); /* set semantics; bb_next searches */
        }
    ef_free(front), ef_free(hkey), ef_free(hval);
    static const ef_tiled_pattern pat = {.per_head = 1,
                                         .spans = bigbird_spans,
                                         .tile_mask = bigbird_mask,
                                         .origin = bigbird_origin,
                                         .grid = bigbird_grid};
    return ef_tiled_init(a, &pat, d);
}

/* ---------------------------------------------------------------------------------------------
 * The ops tables
 * ------------------------------------------------------------------------------------------- */
#define N_OPTS(o) ((int)(sizeof o / sizeof o[0]))

static ef_status local_init(ef_attn *a) {
    static const ef_tiled_pattern pat = {.classify = local_classify, .tile_mask = local_mask};
    return ef_tiled_init(a, &pat, NULL);
}
static ef_status blocklocal_init(ef_attn *a) {
    static const ef_tiled_pattern pat = {
        .classify = blocklocal_classify, .tile_mask = blocklocal_mask, .grid = blocklocal_grid};
    return ef_tiled_init(a, &pat, NULL);
}
static ef_status strided_init(ef_attn *a) {
    sqrt_block(a, ST_BLOCK);
    static const ef_tiled_pattern pat = {
        .classify = strided_classify, .tile_mask = strided_mask, .stride = strided_stride};
    return ef_tiled_init(a, &pat, NULL);
}
static ef_status fixed_init(ef_attn *a) {
    ef_status st = fixed_check(a);
    if (st) return st;
    static const ef_tiled_pattern pat = {
        .tile_mask = fixed_mask, .spans = fixed_spans, .grid = fixed_grid};
    return ef_tiled_init(a, &pat, NULL);
}

#define SPARSE_OPS(NAME, SUMMARY, NOTES, OPTS, NOPTS, INIT, VISIBLE, CAPS)                         \
    {                                                                                              \
        .name = NAME, .summary = SUMMARY, .notes = NOTES, .opts = OPTS, .n_opts = NOPTS,           \
        .caps = CAPS,                                                                              \
        .init = INIT, .destroy = ef_tiled_destroy, .saved_bytes = ef_tiled_saved_bytes,            \
        .forward = ef_tiled_forward, .backward = ef_tiled_backward, .visible = VISIBLE,            \
        .pairs = ef_tiled_pairs,                                                                   \
    }

/* every layout is exact attention over its pattern; BigBird's random blocks need q_len == kv_len */
#define SPARSE_CAPS {.causal = 1, .cross = 1, .exact = 1, .deterministic = 1}
#define BIGBIRD_CAPS {.causal = 1, .exact = 1, .random = 1, .deterministic = 1}

#define SPARSE_NOTES "  saves the per-row log-sum-exp; computes only the visible chunks."

const ef_attn_ops ef_attn_ops_local =
    SPARSE_OPS("local", "sliding-window attention: query i sees keys within window/2 of i",
               SPARSE_NOTES "\n  causal=1: the window keys up to i (i-window < j <= i).",
               local_opts, N_OPTS(local_opts), local_init, local_visible, SPARSE_CAPS);
const ef_attn_ops ef_attn_ops_blocklocal = SPARSE_OPS(
    "blocklocal", "non-overlapping blocks: query i sees the keys of its own block", SPARSE_NOTES,
    blocklocal_opts, N_OPTS(blocklocal_opts), blocklocal_init, blocklocal_visible, SPARSE_CAPS);
const ef_attn_ops ef_attn_ops_strided = SPARSE_OPS(
    "strided", "Sparse Transformer strided: the previous `block` keys and every block-th key",
    SPARSE_NOTES "\n  the strided keys run in a second pass over residue classes:\n"
                 "  work N (N/block + 2 block) pairs.",
    strided_opts, N_OPTS(strided_opts), strided_init, strided_visible, SPARSE_CAPS);
const ef_attn_ops ef_attn_ops_fixed = SPARSE_OPS(
    "fixed",
    "Sparse Transformer fixed: the own block plus the last `summary` tokens of every block",
    SPARSE_NOTES, fixed_opts, N_OPTS(fixed_opts), fixed_init, fixed_visible, SPARSE_CAPS);
const ef_attn_ops ef_attn_ops_longformer = SPARSE_OPS(
    "longformer", "Longformer: (dilated) sliding window plus global tokens",
    SPARSE_NOTES "\n  global=G: the first G tokens; global=a;b;c (p; for one): these tokens.",
    longformer_opts, N_OPTS(longformer_opts), longformer_init, longformer_visible, SPARSE_CAPS);
const ef_attn_ops ef_attn_ops_bigbird = SPARSE_OPS(
    "bigbird", "BigBird ITC: window, random and global blocks",
    SPARSE_NOTES "\n  random blocks per head and query block come from the seed, the same in\n"
                 "  training and evaluation; needs q_len == kv_len.",
    bigbird_opts, N_OPTS(bigbird_opts) - 1, bigbird_init, bigbird_visible, BIGBIRD_CAPS);
const ef_attn_ops ef_attn_ops_bigbird_etc =
    SPARSE_OPS("bigbird-etc", "BigBird ETC: `extra` global tokens in front of the ITC block layout",
               SPARSE_NOTES "\n  the blocks start after the extra tokens; needs q_len == kv_len.",
               bigbird_opts, N_OPTS(bigbird_opts), bigbird_init, bigbird_visible, BIGBIRD_CAPS);
