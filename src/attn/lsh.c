/*
 * lsh.c - Reformer LSH attention (Kitaev, Kaiser, Levskaya 2020), HF/trax semantics
 * (ALGORITHMS.md b.8) with reformer-pytorch's duplicate-attention correction. docs/lsh.md.
 *
 * Shared QK: the keys are the unit-normalised queries, k_j = q_j / |q_j| (io->k is ignored,
 * q_len must equal kv_len). Logits are scale * q_i . k_j (HF/trax use no scale; see the docs).
 * Per (batch b, head h) only the first L = min(kv_lens[b], q_lens[b]) positions exist: later
 * ones are never hashed, sorted or read, output zeros and get zero gradients. Per round r:
 *   hashing  x = q / |q| (fp32, computed in double and rounded), R = rotation [D][cols] drawn
 *            with ef_rng_normal(seed, LSH_STREAM | (h * hashes + r)); the nb buckets are one
 *            factor (cols = nb/2, bucket = first argmax of [xR, -xR]) or, with buckets=auto
 *            past HF's limit, two factors b1 b2 = nb on consecutive column slices (cols =
 *            b1/2 + b2/2, bucket = a1 + b1 a2 with a_f the first argmax of [xR_f, -xR_f]); xR
 *            in double; the fast path projects with an fp32 GEMM and redoes near-ties in
 *            double, so the result is the double definition's, bit for bit;
 *   sorting  stable counting sort of positions [0, L) by (bucket, position);
 *   visible  causal=0 (and causal=1,reformer_causal=1): Reformer's sorted chunks - sorted
 *            indices cut into chunks of C, chunk c sees the set of chunks
 *            {(c + o) mod nc : -before <= o <= after}, nc = ceil(L / C); key j visible to
 *            query i when in the window, j != i (and j <= i with reformer_causal=1: NOT
 *            strictly causal, the chunk edges move with later positions' buckets);
 *            causal=1 (strict): within each bucket, positions in position order, rank =
 *            number of earlier positions of the bucket, chunk = rank / C; query i sees the
 *            keys j < i of its bucket whose rank is >= (chunk(i) - before) C (its own chunk
 *            and the `before` previous chunks of the bucket). Every quantity a row uses is a
 *            function of positions <= i only;
 *            in every mode a query sees itself only when it sees nothing else (HF's self-mask,
 *            by exclusion rather than a finite sentinel);
 *   dedup    c_ij = rounds in which i sees j; logits get -log c_ij, so every distinct key
 *            counts once (reformer-pytorch allow_duplicate_attention=False);
 *   combine  lse_r(i) = logsumexp_j s'_rij, out_i = sum_r softmax_r(lse_r(i)) o_r(i).
 * The combination is one softmax over the (round, key) entries of row i: out_i = sum P_rij v_j,
 * P_rij = exp(s'_rij - L_i), L_i = logsumexp_r lse_r(i). Backward is the softmax backward over
 * those entries with the hashing held fixed (read from saved):
 *   delta_i = dO_i . out_i;  dS_rij = P_rij (dO_i . v_j - delta_i)
 *   dq_i += scale sum dS_rij k_j;  dk_j += scale dS_rij q_i;  dv_j += P_rij dO_i
 *   dq_j += (I - k_j k_j^T) dk_j / |q_j| (nothing when q_j = 0); io->k gets a zero gradient.
 *
 * Saved for backward (bytes = B H R N (4 + 4), every byte written by forward):
 *   bucket [B][H][R][N] int32   bucket of each position per round (-1: position >= L)
 *   lse    [B][H][R][N] float   per-row, per-round log-sum-exp (-inf: row >= L)
 * Replay (ef_attn_forward_replay, both paths): the buckets are read from saved instead of hashed
 * (after checking them against io's lengths); everything after the hashing is the forward's own
 * code, so saved comes out as a forward with those buckets would write it.
 * Work: (batch, head) items in parallel, one workspace slot per thread, products
 * single-threaded, every failure of a product reported. Hashing: one fp32 GEMM per block of rows
 * for every round. Attention: per round the rows are gathered into sorted order once; tiles of
 * <= 64 queries against their keys (sorted modes: the chunk's window, W = C |window|; strict:
 * ranks [lo, end of tile) of the bucket) run on the tiled engine's micro-kernel (ef_tile_gemm),
 * scores transposed (lanes = queries); results go back to their positions once per round.
 * Strict mode: ef_tile_gemm sums every element in a fixed order whatever the tile's shape, so
 * earlier rows are computed bit for bit the same whatever (finite) values come later: later
 * entries enter only as exact zeros at the end of a sum. Time O(B H R (N D cols + N W (D + Dv))),
 * memory O(B H R N) saved + per thread O(N (D + Dv + R) + C W); no N x N buffer.
 * Reference (ref=1): its own double hashing, sort, windows and per-query visible sets, written
 * out by loops over all positions (lsh_ref_* below; no code or workspace shared).
 */
#include "attn/attn.h"
#include "core/vec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MSG = 256 }; /* bytes of a worker's error message */
enum { OPT_HASHES, OPT_BUCKETS, OPT_CHUNK, OPT_BEFORE, OPT_AFTER, OPT_DEDUP, OPT_REFORMER };
/* causal=0; causal=1 (strict); causal=1,reformer_causal=1 (sorted chunks, j <= i) */
enum { LSH_BIDIR, LSH_STRICT, LSH_SORTED };
#define LSH_STREAM (0x4c534800ull << 32)
#define TRY(x)                                                                                     \
    do {                                                                                           \
        ef_status st_ = (x);                                                                       \
        if (st_) return st_;                                                                       \
    } while (0)

typedef struct lwork {
    float *xn;          /* [N][D] normalised queries (the keys), rows < L */
    float *nrm;         /* [N] |q| */
    float *dkn;         /* [N][D] gradient wrt the normalised keys (backward) */
    int32_t *bkt;       /* [R][N] buckets when forward saves nothing */
    float *lse;         /* [R][N] when forward saves nothing */
    int32_t *perm;      /* [R][N] sorted index -> position */
    int32_t *inv;       /* [R][N] position -> sorted index */
    int32_t *kb;        /* [N][R] bucket (strict dedup) */
    int32_t *kr;        /* [N][R] rank in the bucket (strict) or chunk (sorted modes) */
    int32_t *kl;        /* [N][R] lowest visible rank (strict) */
    int32_t *selfc;     /* [N] rounds in which the row sees only itself */
    int32_t *cnt;       /* [nb + 1] counting sort */
    double *y;          /* [cols] projections */
    float *yb;          /* [hb][R cols] projections of a block of rows (fp32 GEMM) */
    float *m, *sw;      /* [N] online combination: running max, running weight sum */
    float *delta;       /* [N] dO . out */
    /* tiles of QW query lanes (dp, dvp = D, Dv padded to 16); rows of a round in sorted order */
    float *Ks, *Qs;   /* [N][dp] normalised queries (the keys), scale * queries */
    float *Vs, *Gs;   /* [N][dvp] values; dout (backward) or the unnormalised O (forward) */
    float *dQs, *dKs; /* [N][dp] gradients (backward; dQ without the scale) */
    float *dVs;       /* [N][dvp] */
    float *ls, *sm;   /* [N] the round's lse, sum of exponentials (forward) */
    float *qt;        /* [D][QW] scaled queries of a tile, transposed */
    float *st, *dpt;  /* [Wk][QW] scores then probabilities; dP then dS (transposed) */
    float *dot;       /* [Dv][QW] dO transposed (backward) */
    int32_t *krs;     /* [N][R] kr of the round's sorted rows (dedup) */
    int32_t *cib;     /* [2][R][QW] strict dedup: each lane's bucket and lowest rank per round */
    uint64_t *lw;     /* [R][nc] lanes of the tile whose window holds the chunk (dedup; zero
                       * between tiles) */
} lwork;

typedef struct lplan {
    int mode, R, nb, C, before, after, dedup;
    /* bucket factors (nb = bf[0] bf[1] when nf = 2) and rotation columns per round */
    int nf, bf[2], cols;
    int nwin;       /* distinct window chunks (sorted modes, nc = ceil(N / C)) */
    int Wk;          /* keys of a tile, at most */
    int QW, dp, dvp; /* query lanes per tile, D and Dv padded to 16 */
    float *rot;     /* [H][D][R][cols] (all rounds of a head in one product) */
    int hb;         /* rows per projection block */
    float *rmax;    /* [H][R] max |rot| (error bound of the fp32 projections) */
    float logc[65]; /* log(count), count = 0..R */
    lwork *ws;
    void *block;
    ef_status *status; /* [slots] first failure of each worker */
    char *msg;         /* [slots][MSG] its message (ef_last_error is per thread) */
    /* reference path (ref=1): nothing above is allocated or used */
    float *rrot;             /* [H][R][D][cols], its own copy of the draw */
    double *rk, *rn;         /* [N][D] keys in double, [N] |q| */
    double *rdot;            /* [N] q_i . k_j of the current row */
    double *rgq, *rgk, *rgv; /* [N][D], [N][D], [N][Dv] gradients */
    double *ry;              /* [cols] */
    int32_t *rbk;            /* [R][N] buckets (forward without saved) */
    int32_t *rord;           /* [R][N] sorted index (sorted modes) or rank in bucket (strict) */
    int32_t *rcnt;           /* [N] rounds in which the current row sees key j */
    unsigned char *rvis;     /* [R][N] visible keys of the current row */
    float *rx;               /* [D] the hash input of one row */
    void *rblock;
} lplan;

static int lsh_valid(const ef_attn *a, const ef_attn_io *io, int b) {
    return EF_MIN(ef_attn_kv_valid(a, io, b), ef_attn_q_valid(a, io, b));
}

/* ---------------------------------------------------------------------------------------------
 * Hashing and sorting (fast path)
 * ------------------------------------------------------------------------------------------- */
/* x = q / |q| in fp32 for rows [0, n) (double arithmetic: every product below is of two floats,
 * exact in double, so the result does not depend on FMA contraction; the squares are summed in
 * the order t = 0..D-1, as the reference does); nrm = |q| (0: x = 0). */
static void normalise(const float *q, int n, int d, float *x, float *nrm) {
    typedef double vd8 __attribute__((vector_size(64)));
    typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
    for (int i = 0; i < n; i++) {
        const float *qi = q + (size_t)i * d;
        float *xi = x + (size_t)i * d;
        double ss = 0;
        for (int t = 0; t < d; t++) ss += (double)qi[t] * qi[t];
        double r = sqrt(ss);
        nrm[i] = (float)r;
        if (!(r > 0)) {
            for (int t = 0; t < d; t++) xi[t] = 0.0f;
            continue;
        }
        int t = 0; /* the quotients in double, eight at a time (IEEE division: the same bits) */
        for (; t + 8 <= d; t += 8) {
            vd8 qd = __builtin_convertvector(*(const vf8 *)(qi + t), vd8);
            *(vf8 *)(xi + t) = __builtin_convertvector(qd / r, vf8);
        }
        for (; t < d; t++) xi[t] = (float)(qi[t] / r);
    }
}

/* The bucket of one normalised row: first argmax of [xR, -xR], xR in double (exact products,
 * summed in the order t = 0..D-1); R is D x half with row stride ld. */
static int exact_bucket(const float *x, const float *rot, ptrdiff_t ld, int d, int half,
                        double *y) {
    for (int c = 0; c < half; c++) y[c] = 0;
    for (int t = 0; t < d; t++) {
        double xt = x[t];
        for (int c = 0; c < half; c++) y[c] += xt * rot[(size_t)t * ld + c];
    }
    int best = 0;
    double bv = y[0];
    for (int c = 1; c < half; c++)
        if (y[c] > bv) bv = y[c], best = c;
    for (int c = 0; c < half; c++)
        if (-y[c] > bv) bv = -y[c], best = half + c;
    return best;
}

/* The largest value *b1 of [y, -y] (y of n floats) and the runner-up *b2 (the second largest
 * |y_c|, or -b1 when n = 1); returns an index of b1 in [y, -y] (used only when b1 > b2, where
 * it is unique). */
static int top2(const float *y, int n, float *b1, float *b2) {
    vf m1 = vf_set1(-INFINITY), m2 = m1;
    vi at = (vi){0}, cv = vi_iota();
    int c = 0;
    for (; c + EF_VL <= n; c += EF_VL, cv += EF_VL) { /* lane-wise top two of |y|, where */
        vf v = vf_loadu(y + c);
        vf av = vf_select(v < 0, -v, v);
        vi up = av > m1;
        m2 = vf_max(m2, vf_select(up, m1, av));
        m1 = vf_select(up, av, m1);
        at = (at & ~up) | (cv & up);
    }
    float t1 = -INFINITY, t2 = -INFINITY;
    int best = 0;
    if (n >= EF_VL) { /* across lanes: t1 = the largest m1; t2 = the largest m2 or other m1 */
        vf h1 = m1;
        for (int sh = EF_VL / 2; sh > 0; sh /= 2) /* butterfly: every lane gets the max */
            h1 = vf_max(h1, EF_SHUFFLE(h1, vi_iota() ^ sh));
        t1 = h1[0];
        vi top = m1 == h1, ties = top & 1, at1 = at & top;
        vf h2 = vf_select(top, m2, m1);
        for (int sh = EF_VL / 2; sh > 0; sh /= 2) {
            h2 = vf_max(h2, EF_SHUFFLE(h2, vi_iota() ^ sh));
            ties += EF_SHUFFLE(ties, vi_iota() ^ sh);
            at1 += EF_SHUFFLE(at1, vi_iota() ^ sh);
        }
        t2 = ties[0] > 1 ? t1 : h2[0];
        best = at1[0]; /* the argmax when unique (else unused) */
    }
    for (; c < n; c++) {
        float v = fabsf(y[c]);
        best = v > t1 ? c : best;
        t2 = v > t1 ? t1 : v > t2 ? v : t2;
        t1 = v > t1 ? v : t1;
    }
    /* [y, -y] holds |y_c| and -|y_c| for each c: below the best comes the second largest |y_c|
     * (>= 0 >= -b1) when n >= 2, else -b1 */
    *b1 = t1, *b2 = -t1 > t2 ? -t1 : t2;
    return y[best] > 0 ? best : n + best;
}

/* Every round's buckets from fp32 GEMM projections of hb rows at a time (all rounds in one
 * product: the rotations are stored [H][D][R][cols]): per factor, a row whose best value beats
 * the runner-up by more than twice the rounding bound of a D-term fp32 dot product
 * (D 2^-23 sum|x_t| max|R|, any summation order) has the same argmax as exact_bucket; the
 * others (near-ties) are recomputed by exact_bucket. Results are identical, only faster. Row
 * i's bucket depends on row i alone. bkt is [R][N]. */
static ef_status fast_buckets(const ef_attn *a, lwork *w, int h, int valid, const float *x,
                              int32_t *bkt) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, cols = p->cols, R = p->R;
    int ld = R * cols;
    const float *rot = p->rot + (size_t)h * d * ld;
    for (int i0 = 0; i0 < valid; i0 += p->hb) {
        int rows = EF_MIN(p->hb, valid - i0);
        TRY(ef_sgemm(0, 0, rows, ld, d, 1.0f, x + (size_t)i0 * d, d, rot, ld, 0.0f, w->yb, ld));
        for (int l = 0; l < rows; l++) {
            int i = i0 + l;
            const float *xi = x + (size_t)i * d;
            double ax = 0; /* sum |x_t| (any order: a bound with slack) */
            {
                vf sa = vf_set1(0);
                int t = 0;
                for (; t + EF_VL <= d; t += EF_VL) {
                    vf xv = vf_loadu(xi + t);
                    sa += vf_select(xv < 0, -xv, xv);
                }
                for (int l = 0; l < EF_VL; l++) ax += sa[l];
                for (; t < d; t++) ax += fabsf(xi[t]);
            }
            for (int r = 0; r < R; r++) {
                double bound = (d + 2) * 0x1p-23 * ax * p->rmax[h * R + r] + 1e-30;
                int bucket = 0, unit = 1, off = r * cols;
                for (int f = 0; f < p->nf; f++) {
                    int half = p->bf[f] / 2;
                    float b1, b2;
                    int best = top2(w->yb + (size_t)l * ld + off, half, &b1, &b2);
                    if (!((double)b1 - b2 > 2 * bound))
                        best = exact_bucket(xi, rot + off, ld, d, half, w->y);
                    bucket += unit * best, unit *= p->bf[f], off += half;
                }
                bkt[(size_t)r * n + i] = bucket;
            }
        }
    }
    return EF_OK;
}

/* Stable counting sort of positions [0, valid) by bucket: perm (sorted index -> position), inv
 * (position -> sorted index); afterwards cnt[c] = the end of bucket c in sorted order. */
static void sort_round(const lplan *p, int valid, const int32_t *bucket, int32_t *cnt,
                       int32_t *perm, int32_t *inv) {
    memset(cnt, 0, sizeof(int32_t) * (p->nb + 1));
    for (int i = 0; i < valid; i++) cnt[bucket[i] + 1]++;
    for (int c = 1; c <= p->nb; c++) cnt[c] += cnt[c - 1];
    for (int i = 0; i < valid; i++) {
        int s = cnt[bucket[i]]++;
        perm[s] = i;
        inv[i] = s;
    }
}

/* The distinct chunks of the window of chunk c among nc, in offset order -before..after. */
static int window_chunks(const lplan *p, int nc, int c, int *out) {
    int m = 0;
    for (int o = -p->before; o <= p->after; o++) {
        int cc = ((c + o) % nc + nc) % nc, dup = 0;
        for (int t = 0; t < m; t++) dup |= out[t] == cc;
        if (!dup) out[m++] = cc;
    }
    return m;
}

/* Lowest rank a query of rank rho sees in strict mode (its chunk minus `before` chunks). */
static int strict_lo(const lplan *p, int rho) { return EF_MAX(0, (rho / p->C - p->before) * p->C); }

/* Sorted modes: rounds in which each row has no visible key but itself. */
static void self_counts_sorted(const ef_attn *a, lwork *w, int valid, int nc) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, chunks[130];
    int causal = p->mode == LSH_SORTED;
    memset(w->selfc, 0, sizeof(int32_t) * valid);
    for (int r = 0; r < p->R; r++) {
        const int32_t *pr = w->perm + (size_t)r * n;
        for (int c = 0; c < nc; c++) {
            int m = window_chunks(p, nc, c, chunks);
            for (int sq = c * p->C; sq < EF_MIN(valid, (c + 1) * p->C); sq++) {
                int i = pr[sq], any = 0;
                for (int t = 0; t < m && !any; t++)
                    for (int sk = chunks[t] * p->C; sk < EF_MIN(valid, (chunks[t] + 1) * p->C);
                         sk++) {
                        int j = pr[sk];
                        if ((!causal || j <= i) && j != i) {
                            any = 1;
                            break;
                        }
                    }
                w->selfc[i] += !any;
            }
        }
    }
}

/* Normalised keys of rows [0, valid); per round the buckets (hashed into bkt, or read from it),
 * the sort, and what the dedup counts need. Positions >= valid get bucket -1 and are not
 * sorted. */
static ef_status prepare(const ef_attn *a, lwork *w, const float *q, int h, int valid, int32_t *bkt,
                         int rehash) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, R = p->R;
    normalise(q, valid, d, w->xn, w->nrm);
    if (rehash) {
        TRY(fast_buckets(a, w, h, valid, w->xn, bkt));
        for (int r = 0; r < R; r++)
            for (int i = valid; i < n; i++) bkt[(size_t)r * n + i] = -1;
    }
    for (int r = 0; r < R; r++) {
        int32_t *br = bkt + (size_t)r * n, *pr = w->perm + (size_t)r * n;
        int32_t *ir = w->inv + (size_t)r * n;
        if (!rehash)
            for (int i = 0; i < valid; i++)
                if (br[i] < 0 || br[i] >= p->nb)
                    return ef_error(EF_ERR_ARG,
                                    "lsh: saved holds bucket %d at position %d of round %d "
                                    "(not written by this plan's forward with this io?)",
                                    (int)br[i], i, r);
        sort_round(p, valid, br, w->cnt, pr, ir);
        if (!(p->dedup && R > 1)) continue;
        for (int i = 0; i < valid; i++) {
            if (p->mode == LSH_STRICT) {
                int c = br[i], rho = ir[i] - (c ? w->cnt[c - 1] : 0);
                w->kb[(size_t)i * R + r] = c;
                w->kr[(size_t)i * R + r] = rho;
                w->kl[(size_t)i * R + r] = strict_lo(p, rho);
            } else
                w->kr[(size_t)i * R + r] = ir[i] / p->C;
        }
    }
    if (!(p->dedup && R > 1)) return EF_OK;
    if (p->mode == LSH_STRICT)
        for (int i = 0; i < valid; i++) {
            int c = 0;
            for (int r = 0; r < R; r++) c += w->kr[(size_t)i * R + r] == w->kl[(size_t)i * R + r];
            w->selfc[i] = c;
        }
    else
        self_counts_sorted(a, w, valid, (valid + p->C - 1) / p->C);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Sorted modes: tiles of QW query lanes against their window, on the tiled engine's kernel
 * ------------------------------------------------------------------------------------------- */
/* As in tiled.c, a vector holds EF_VL *queries* (lanes) and scores are kept transposed,
 * S^T[x][l] for key x of the window and query lane l, so that the per-query softmax statistics
 * are vertical vector operations and every product is an ef_tile_gemm. Per round, the rows
 * are gathered once into sorted order (Ks keys, Qs scaled queries, Vs values, Gs dout) and
 * the per-row results are written in sorted order (Os, dQs, dKs, dVs) and scattered back to
 * their positions once: the only accesses by position are these two streaming passes (with
 * prefetch), and a window is one contiguous run of sorted rows or a few (a segment each;
 * chunk 0 wraps onto the last chunk). ef_tile_gemm sums every element over t in order whatever
 * the tile shape, and each (batch, head) is one thread's work in a fixed order: results do not
 * depend on the thread count. */
typedef struct lseg {
    int k0, kn, off; /* sorted indices [k0, k0 + kn) are rows [off, off + kn) of S^T */
} lseg;

enum { PF = 8 }; /* rows prefetched ahead in the passes by position */

/* dst[0:n] = s src[0:n] (dst aligned to 64 bytes, src anywhere). */
static inline void copy_row(float *dst, const float *src, int n, float s) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) vf_store(dst + t, vf_loadu(src + t) * s);
    for (; t < n; t++) dst[t] = src[t] * s;
}

/* dst[0:n] += s src[0:n] (src aligned to 64 bytes, dst anywhere). */
static inline void add_row(float *dst, const float *src, int n, float s) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) vf_storeu(dst + t, vf_loadu(dst + t) + vf_load(src + t) * s);
    for (; t < n; t++) dst[t] += src[t] * s;
}

/* dst[0:n] = fo dst[0:n] + f src[0:n] (src aligned to 64 bytes, dst anywhere). */
static inline void combine_row(float *dst, float fo, const float *src, float f, int n) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL)
        vf_storeu(dst + t, vf_loadu(dst + t) * fo + vf_load(src + t) * f);
    for (; t < n; t++) dst[t] = dst[t] * fo + src[t] * f;
}

/* Round r's rows in sorted order: Ks = normalised queries, Qs = scale q, Vs = v, Gs = dout
 * (backward only, g != NULL); rows padded to dp, dvp. */
static void gather_round(const ef_attn *a, lwork *w, const float *q, const float *v,
                         const float *g, const int32_t *pr, int valid) {
    const lplan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim;
    for (int s = 0; s < valid; s++) {
        int j = pr[s];
        if (s + PF < valid) {
            int jn = pr[s + PF];
            ef_prefetch(w->xn + (size_t)jn * d, d), ef_prefetch(q + (size_t)jn * d, d);
            ef_prefetch(v + (size_t)jn * dv, dv);
            if (g) ef_prefetch(g + (size_t)jn * dv, dv);
        }
        copy_row(w->Ks + (size_t)s * p->dp, w->xn + (size_t)j * d, d, 1.0f);
        copy_row(w->Qs + (size_t)s * p->dp, q + (size_t)j * d, d, a->scale);
        copy_row(w->Vs + (size_t)s * p->dvp, v + (size_t)j * dv, dv, 1.0f);
        if (g) copy_row(w->Gs + (size_t)s * p->dvp, g + (size_t)j * dv, dv, 1.0f);
        if (p->dedup && p->R > 1)
            memcpy(w->krs + (size_t)s * p->R, w->kr + (size_t)j * p->R, sizeof(int32_t) * p->R);
    }
}

/* The window of chunk c as segments of consecutive sorted indices (window order; adjacent
 * chunks merged); *self_off = the row of chunk c's first key. Returns the segment count. */
static int window_segments(const lplan *p, int valid, int nc, int c, lseg *seg, int *self_off) {
    int chunks[130], m = window_chunks(p, nc, c, chunks), ns = 0, off = 0;
    for (int t = 0; t < m; t++) {
        int k0 = chunks[t] * p->C, kn = EF_MIN(valid, k0 + p->C) - k0;
        if (chunks[t] == c) *self_off = off;
        if (ns && seg[ns - 1].k0 + seg[ns - 1].kn == k0)
            seg[ns - 1].kn += kn;
        else
            seg[ns++] = (lseg){k0, kn, off};
        off += kn;
    }
    return ns;
}

/* Dedup: sets (set = 1) or clears the bits of the nq lanes (the queries at sorted indices
 * s0 + l) in w->lw[rr][chunk] for the chunks of their round-rr windows, every round rr != r. */
static void lane_windows(const ef_attn *a, lwork *w, int r, int nc, int s0, int nq, int set) {
    const lplan *p = a->impl;
    int R = p->R, span = p->before + p->after;
    if (!set && (size_t)nc <= (size_t)nq * (span + 1)) { /* fewer words than lanes' chunks */
        memset(w->lw, 0, sizeof(uint64_t) * R * nc);
        return;
    }
    for (int l = 0; l < nq; l++) {
        const int32_t *ki = w->krs + (size_t)(s0 + l) * R;
        for (int rr = 0; rr < R; rr++) {
            if (rr == r) continue;
            uint64_t *lw = w->lw + (size_t)rr * nc;
            int cb = ki[rr] - p->before; /* before < nc - after here */
            cb += cb < 0 ? nc : 0;
            for (int o = 0; o <= span; o++) {
                int ch = cb + o < nc ? cb + o : cb + o - nc;
                lw[ch] = set ? lw[ch] | (uint64_t)1 << l : 0;
            }
        }
    }
}

/* One tile: the queries at sorted indices [s0, s0 + nq) of round r against keys (segments of
 * sorted indices). Sorted modes: chunk c of nc, its own keys from row self_off. Strict mode:
 * the keys are ranks [lo, ...) of the queries' bucket and lane l (rank lo + rel + l) sees the
 * keys x < rel + l. */
typedef struct ltile {
    int r, s0, nq, nseg, nk;
    const int32_t *pr; /* the round's sorted index -> position */
    lseg seg[130];
    int nc, c, self_off; /* sorted modes */
    int rel;             /* strict mode */
} ltile;

/* Strict mode: masks and dedup of a tile's S^T (one segment, keys of ranks lo + x). Row i
 * attends key j in round rr when they share its bucket and j's rank is at least i's lowest
 * (kb, kr, kl); a lane that sees no key (rank lo: only lane 0 of a tile with rel = 0) sees
 * itself, key x = 0. */
static void strict_masks(const ef_attn *a, lwork *w, const ltile *t) {
    const lplan *p = a->impl;
    int R = p->R, QW = p->QW, QV = QW / EF_VL, dd = p->dedup && R > 1, r = t->r;
    int32_t *vb = w->cib, *vl = w->cib + (size_t)R * QW; /* [R][QW] lanes' buckets, lowest ranks */
    if (dd)
        for (int l = 0; l < QW; l++) {
            const int32_t *bi = w->kb + (size_t)(l < t->nq ? t->pr[t->s0 + l] : 0) * R;
            const int32_t *li = w->kl + (size_t)(l < t->nq ? t->pr[t->s0 + l] : 0) * R;
            for (int rr = 0; rr < R; rr++) {
                vb[(size_t)rr * QW + l] = l < t->nq ? bi[rr] : -1;
                vl[(size_t)rr * QW + l] = li[rr];
            }
        }
    float self0 = w->st[0];
    for (int x = 0; x < t->nk; x++) {
        int j = t->pr[t->seg[0].k0 + x];
        const int32_t *bj = w->kb + (size_t)j * R, *rj = w->kr + (size_t)j * R;
        float *srow = w->st + (size_t)x * QW;
        for (int u = 0; u < QV; u++) {
            vi lane = vi_iota() + u * EF_VL;
            vf sv = vf_load(srow + u * EF_VL);
            if (dd) {
                vi cnt = (vi){0} + 1;
                for (int rr = 0; rr < R; rr++) {
                    if (rr == r) continue;
                    vi same = *(const vi *)(vb + (size_t)rr * QW + u * EF_VL) == bj[rr];
                    vi inwin = *(const vi *)(vl + (size_t)rr * QW + u * EF_VL) <= rj[rr];
                    cnt -= same & inwin;
                }
                vf sub = vf_set1(0);
                for (int cc = 2; cc <= R; cc++)
                    sub = vf_select(cnt == cc, vf_set1(p->logc[cc]), sub);
                sv -= sub;
            }
            /* key x is visible to lane l when x < rel + l */
            vf_store(srow + u * EF_VL, vf_select(lane + t->rel <= x, vf_set1(-INFINITY), sv));
        }
    }
    if (t->rel == 0) /* the self-mask: the lowest rank sees only itself */
        w->st[0] = self0 - (dd ? p->logc[w->selfc[t->pr[t->s0]]] : 0.0f);
}

/* S^T of the queries at sorted indices [s0, s0 + nq) of chunk c (round r) against the window:
 * st[x][l] = scale q_l . k_x, minus log(rounds that attend the pair) with dedup, -inf where
 * the key is the query itself (or later, reformer_causal); a lane that sees no other key sees
 * itself (the self-mask). mx (may be NULL) gets each lane's max. Returns the window's key
 * count. Strict mode: strict_masks instead.
 * Dedup: a pair of the window is attended in round r and in each other round rr whose window
 * of the query holds the key's chunk. Per tile, lw[rr][chunk] is the bit set of the lanes whose
 * round-rr window holds that chunk, so a key's other rounds are a few table reads and its
 * count exceeds 1 only on the lanes in the union of its bit sets (a few of the QW <= 64). */
static int tile_scores(const ef_attn *a, lwork *w, const ltile *t, vf *mx) {
    const lplan *p = a->impl;
    int d = a->shape.head_dim, R = p->R, QW = p->QW, QV = QW / EF_VL;
    int causal = p->mode == LSH_SORTED, dd = p->dedup && R > 1;
    int r = t->r, nc = t->nc, c = t->c, s0 = t->s0, nq = t->nq, nseg = t->nseg, nk = t->nk;
    int allwin = p->before + p->after + 1 >= nc, self_off = t->self_off;
    const int32_t *pr = t->pr;
    const lseg *seg = t->seg;
    const float *qs = w->Qs + (size_t)s0 * p->dp;
    ef_tile_pack_t(w->qt, QW, qs, p->dp, d, nq, QW, 1.0f);
    for (int x = 0; x < nseg; x++)
        ef_tile_gemm(seg[x].kn, d, QW, w->Ks + (size_t)seg[x].k0 * p->dp, p->dp, 1, w->qt, QW,
                     w->st + (size_t)seg[x].off * QW, QW, 0);
    if (p->mode == LSH_STRICT) {
        strict_masks(a, w, t);
        if (mx)
            for (int u = 0; u < QV; u++) {
                vf mu = vf_set1(-INFINITY);
                for (int x = 0; x < nk; x++)
                    mu = vf_max(mu, vf_load(w->st + (size_t)x * QW + u * EF_VL));
                mx[u] = mu;
            }
        return nk;
    }
    int selfrow = self_off + s0 - c * p->C; /* row of lane 0's own key; lane l's is + l */
    float selfv[EF_QT];
    for (int l = 0; l < nq; l++) selfv[l] = w->st[(size_t)(selfrow + l) * QW + l];
    if (dd && allwin) /* every pair is attended in every round */
        for (int x = 0; x < nk; x++)
            for (int u = 0; u < QV; u++) {
                float *ps = w->st + (size_t)x * QW + u * EF_VL;
                vf_store(ps, vf_load(ps) - p->logc[R]);
            }
    else if (dd) {
        lane_windows(a, w, r, nc, s0, nq, 1);
        for (int x = 0; x < nseg; x++)
            for (int xx = 0; xx < seg[x].kn; xx++) {
                const int32_t *kj = w->krs + (size_t)(seg[x].k0 + xx) * R;
                float *srow = w->st + (size_t)(seg[x].off + xx) * QW;
                uint64_t one = 0, two = 0; /* lanes of >= 1, >= 2 other rounds */
                for (int rr = 0; rr < R; rr++) {
                    if (rr == r) continue;
                    uint64_t m = w->lw[(size_t)rr * nc + kj[rr]];
                    two |= one & m, one |= m;
                }
                uint64_t b1 = one & ~two; /* lanes in one other round: a vector at a time */
                for (int u = 0; u < QV && b1 >> (u * EF_VL); u++) {
                    int32_t mb = (int32_t)(b1 >> (u * EF_VL) & ((1u << EF_VL) - 1));
                    vi hit = (((vi){0} + mb) >> vi_iota()) & 1;
                    float *ps = srow + u * EF_VL;
                    vf_store(ps, vf_load(ps) - vf_select(hit != 0, vf_set1(p->logc[2]), vf_set1(0)));
                }
                for (; two; two &= two - 1) { /* rare: count the rounds */
                    int l = __builtin_ctzll(two), cnt = 1;
                    for (int rr = 0; rr < R; rr++)
                        if (rr != r) cnt += (int)(w->lw[(size_t)rr * nc + kj[rr]] >> l) & 1;
                    srow[l] -= p->logc[cnt];
                }
            }
        lane_windows(a, w, r, nc, s0, nq, 0);
    }
    if (causal) { /* reformer_causal: keys later than the query */
        int32_t qpos[EF_QT] __attribute__((aligned(64)));
        for (int l = 0; l < QW; l++) qpos[l] = l < nq ? pr[s0 + l] : INT32_MAX;
        for (int x = 0; x < nseg; x++)
            for (int xx = 0; xx < seg[x].kn; xx++) {
                int j = pr[seg[x].k0 + xx];
                float *srow = w->st + (size_t)(seg[x].off + xx) * QW;
                for (int u = 0; u < QV; u++) {
                    vi later = *(const vi *)(qpos + u * EF_VL) < j;
                    vf_store(srow + u * EF_VL,
                             vf_select(later, vf_set1(-INFINITY), vf_load(srow + u * EF_VL)));
                }
            }
    }
    for (int l = 0; l < nq; l++) w->st[(size_t)(selfrow + l) * QW + l] = -INFINITY;
    vf m[EF_QT / EF_VL];
    for (int u = 0; u < QV; u++) {
        vf mu = vf_set1(-INFINITY);
        for (int x = 0; x < nk; x++) mu = vf_max(mu, vf_load(w->st + (size_t)x * QW + u * EF_VL));
        m[u] = mu;
    }
    for (int l = 0; l < nq; l++) { /* the self-mask: itself only when nothing else is visible */
        if (m[l / EF_VL][l % EF_VL] != -INFINITY) continue;
        float sv = selfv[l] - (dd ? p->logc[w->selfc[pr[s0 + l]]] : 0.0f);
        w->st[(size_t)(selfrow + l) * QW + l] = sv;
        m[l / EF_VL][l % EF_VL] = sv;
    }
    if (mx)
        for (int u = 0; u < QV; u++) mx[u] = m[u];
    return nk;
}

/* Forward of a tile: the unnormalised O = exp(S - max) V into Os (sorted rows), and per row
 * its round's lse and the sum of the exponentials (ls, sm). */
static void tile_forward(const ef_attn *a, lwork *w, const ltile *t) {
    const lplan *p = a->impl;
    int QW = p->QW, QV = QW / EF_VL, s0 = t->s0, nq = t->nq, nseg = t->nseg;
    const lseg *seg = t->seg;
    vf mx[EF_QT / EF_VL];
    int nk = tile_scores(a, w, t, mx);
    float sum[EF_QT] __attribute__((aligned(64))), use[EF_QT] __attribute__((aligned(64)));
    for (int u = 0; u < QV; u++) {
        /* lanes past nq may have seen only -inf: subtract 0 there (never NaN) */
        vf m = vf_select(mx[u] == -INFINITY, vf_set1(0), mx[u]), sm = vf_set1(0);
        for (int x = 0; x < nk; x++) {
            float *ps = w->st + (size_t)x * QW + u * EF_VL;
            vf e = vf_exp(vf_load(ps) - m);
            vf_store(ps, e);
            sm += e;
        }
        vf_store(sum + u * EF_VL, sm);
        vf_store(use + u * EF_VL, m);
    }
    /* O[l][e] = sum_x P^T[x][l] V[x][e] */
    for (int x = 0; x < nseg; x++)
        ef_tile_gemm(nq, seg[x].kn, p->dvp, w->st + (size_t)seg[x].off * QW, 1, QW,
                     w->Vs + (size_t)seg[x].k0 * p->dvp, p->dvp, w->Gs + (size_t)s0 * p->dvp,
                     p->dvp, x > 0);
    for (int l = 0; l < nq; l++) w->ls[s0 + l] = use[l] + logf(sum[l]), w->sm[s0 + l] = sum[l];
}

/* Backward of a tile: P = exp(S - L_i) (L_i in w->m), dV += P^T dO, dP = dO V^T,
 * dS = P (dP - delta), dK += dS^T (scale Q), dQ = dS K (sorted rows: dVs, dKs, dQs). */
static void tile_backward(const ef_attn *a, lwork *w, const ltile *t) {
    const lplan *p = a->impl;
    int dv = a->shape.v_dim, QW = p->QW, QV = QW / EF_VL, dp = p->dp, dvp = p->dvp;
    int s0 = t->s0, nq = t->nq, nseg = t->nseg;
    const int32_t *pr = t->pr;
    const lseg *seg = t->seg;
    float Lq[EF_QT] __attribute__((aligned(64))), dl[EF_QT] __attribute__((aligned(64)));
    const float *gs = w->Gs + (size_t)s0 * dvp, *qs = w->Qs + (size_t)s0 * dp;
    for (int l = 0; l < QW; l++) {
        if (l < nq) { /* lanes past the tile: P = exp(S - inf) = 0, dO = 0 */
            int i = pr[s0 + l];
            Lq[l] = w->m[i], dl[l] = w->delta[i];
        } else
            Lq[l] = INFINITY, dl[l] = 0.0f;
    }
    ef_tile_pack_t(w->dot, QW, gs, dvp, dv, nq, QW, 1.0f);
    int nk = tile_scores(a, w, t, NULL);
    for (int x = 0; x < nk; x++)
        for (int u = 0; u < QV; u++) {
            float *ps = w->st + (size_t)x * QW + u * EF_VL;
            vf_store(ps, vf_exp(vf_load(ps) - vf_load(Lq + u * EF_VL)));
        }
    for (int x = 0; x < nseg; x++) {
        const float *pt = w->st + (size_t)seg[x].off * QW;
        /* dV[k][e] += sum_l P^T[k][l] dO[l][e];  dP^T[k][l] = sum_e V[k][e] dO^T[e][l] */
        ef_tile_gemm(seg[x].kn, nq, dvp, pt, QW, 1, gs, dvp, w->dVs + (size_t)seg[x].k0 * dvp,
                     dvp, 1);
        ef_tile_gemm(seg[x].kn, dv, QW, w->Vs + (size_t)seg[x].k0 * dvp, dvp, 1, w->dot, QW,
                     w->dpt + (size_t)seg[x].off * QW, QW, 0);
    }
    for (int x = 0; x < nk; x++)
        for (int u = 0; u < QV; u++) {
            float *pd = w->dpt + (size_t)x * QW + u * EF_VL;
            vf pp = vf_load(w->st + (size_t)x * QW + u * EF_VL);
            vf_store(pd, pp * (vf_load(pd) - vf_load(dl + u * EF_VL)));
        }
    for (int x = 0; x < nseg; x++) {
        const float *ds = w->dpt + (size_t)seg[x].off * QW;
        /* dK[k][t] += sum_l dS^T[k][l] (scale Q)[l][t];  dQ[l][t] (+)= sum_k dS^T[k][l] K[k][t] */
        ef_tile_gemm(seg[x].kn, nq, dp, ds, QW, 1, qs, dp, w->dKs + (size_t)seg[x].k0 * dp, dp,
                     1);
        ef_tile_gemm(nq, seg[x].kn, dp, ds, 1, QW, w->Ks + (size_t)seg[x].k0 * dp, dp,
                     w->dQs + (size_t)s0 * dp, dp, x > 0);
    }
}

/* Sorted modes, one head: every round, every chunk, tiles of QW queries; forward (g == NULL:
 * lse into lse, the online combination over the rounds into out, w->m, w->sw) or backward
 * (g = dout: gradients into dq, dvo, w->dkn). */
static void run_sorted(const ef_attn *a, lwork *w, const float *q, const float *v, int valid,
                       const int32_t *bkt, const float *g, float *out, float *lse, float *dq,
                       float *dvo) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, dv = a->shape.v_dim, C = p->C;
    int nc = (valid + C - 1) / C, dp = p->dp, dvp = p->dvp;
    ltile t;
    for (int r = 0; r < p->R; r++) {
        const int32_t *pr = w->perm + (size_t)r * n, *br = bkt + (size_t)r * n;
        gather_round(a, w, q, v, g, pr, valid);
        if (g) {
            memset(w->dKs, 0, sizeof(float) * (size_t)valid * dp);
            memset(w->dVs, 0, sizeof(float) * (size_t)valid * dvp);
        }
        t.r = r, t.pr = pr;
        if (p->mode == LSH_STRICT) /* per bucket (a run of the sorted order), per chunk */
            for (int s0b = 0, s1b; s0b < valid; s0b = s1b) {
                for (s1b = s0b + 1; s1b < valid && br[pr[s1b]] == br[pr[s0b]];) s1b++;
                int m = s1b - s0b;
                for (int q0 = 0; q0 < m; q0 += C) {
                    int lo = strict_lo(p, q0), qend = EF_MIN(m, q0 + C);
                    for (int t0 = q0; t0 < qend; t0 += p->QW) {
                        t.s0 = s0b + t0, t.nq = EF_MIN(p->QW, qend - t0), t.rel = t0 - lo;
                        t.nk = t0 + t.nq - lo, t.nseg = 1, t.seg[0] = (lseg){s0b + lo, t.nk, 0};
                        if (g)
                            tile_backward(a, w, &t);
                        else
                            tile_forward(a, w, &t);
                    }
                }
            }
        else
            for (int c = 0; c < nc; c++) {
                t.nc = nc, t.c = c, t.nseg = window_segments(p, valid, nc, c, t.seg, &t.self_off);
                t.nk = t.seg[t.nseg - 1].off + t.seg[t.nseg - 1].kn;
                int end = EF_MIN(valid, (c + 1) * C);
                for (t.s0 = c * C; t.s0 < end; t.s0 += p->QW) {
                    t.nq = EF_MIN(p->QW, end - t.s0);
                    if (g)
                        tile_backward(a, w, &t);
                    else
                        tile_forward(a, w, &t);
                }
            }
        for (int s = 0; s < valid; s++) { /* the round's rows, back to their positions */
            int i = pr[s];
            if (g) {
                if (s + PF < valid) {
                    int jn = pr[s + PF];
                    ef_prefetch(dq + (size_t)jn * d, d), ef_prefetch(dvo + (size_t)jn * dv, dv);
                    ef_prefetch(w->dkn + (size_t)jn * d, d);
                }
                add_row(dq + (size_t)i * d, w->dQs + (size_t)s * dp, d, a->scale);
                add_row(w->dkn + (size_t)i * d, w->dKs + (size_t)s * dp, d, 1.0f);
                add_row(dvo + (size_t)i * dv, w->dVs + (size_t)s * dvp, dv, 1.0f);
                continue;
            }
            if (s + PF < valid) ef_prefetch(out + (size_t)pr[s + PF] * dv, dv);
            /* online combination over the rounds: out_i = sum_r e^(lse_r - m) O_r / sum_r e^.. */
            float lr = w->ls[s], mo = w->m[i], mnew = lr > mo ? lr : mo;
            float fo = mo == -INFINITY ? 0.0f : expf(mo - mnew), fr = expf(lr - mnew);
            float *o = out + (size_t)i * dv;
            lse[(size_t)r * n + i] = lr;
            combine_row(o, fo, w->Gs + (size_t)s * dvp, fr / w->sm[s], dv);
            w->sw[i] = w->sw[i] * fo + fr;
            w->m[i] = mnew;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Plan
 * ------------------------------------------------------------------------------------------- */
static void lsh_destroy(ef_attn *a) {
    lplan *p = a->impl;
    if (!p) return;
    ef_free(p->rot);
    ef_free(p->rmax);
    ef_attn_ws_free(a, p->block);
    ef_free(p->rblock);
    ef_free(p->rrot);
    ef_free(p->ws);
    ef_free(p->status);
    ef_free(p->msg);
    ef_free(p);
    a->impl = NULL;
}

/* Carves one slot's workspace from base (NULL: only measures); returns its bytes. */
static size_t slot_layout(const ef_attn *a, char *base, lwork *w) {
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t n = s->q_len, d = s->head_dim, dv = s->v_dim, R = p->R, cols = p->cols;
    size_t Wk = p->Wk, off = 0;
#define TAKE(ptr, cnt)                                                                             \
    do {                                                                                           \
        ptr = (void *)(base ? base + off : NULL);                                                  \
        off += ((size_t)(cnt) * sizeof *(ptr) + 63) / 64 * 64;                                     \
    } while (0)
    TAKE(w->y, cols);
    TAKE(w->yb, (size_t)p->hb * R * cols);
    TAKE(w->xn, n * d);
    TAKE(w->dkn, n * d);
    TAKE(w->nrm, n);
    TAKE(w->m, n);
    TAKE(w->sw, n);
    TAKE(w->delta, n);
    TAKE(w->lse, R * n);
    TAKE(w->bkt, R * n);
    TAKE(w->perm, R * n);
    TAKE(w->inv, R * n);
    TAKE(w->kb, R * n);
    TAKE(w->kr, R * n);
    TAKE(w->kl, R * n);
    TAKE(w->selfc, n);
    TAKE(w->cnt, (size_t)p->nb + 1);
    { /* tiles of QW lanes, ef_tile_gemm products */
        size_t QW = p->QW, dp = p->dp, dvp = p->dvp;
        TAKE(w->Ks, n * dp);
        TAKE(w->Qs, n * dp);
        TAKE(w->Vs, n * dvp);
        TAKE(w->Gs, n * dvp);
        TAKE(w->dQs, n * dp);
        TAKE(w->dKs, n * dp);
        TAKE(w->dVs, n * dvp);
        TAKE(w->ls, n);
        TAKE(w->sm, n);
        TAKE(w->qt, d * QW);
        TAKE(w->st, Wk * QW);
        TAKE(w->dpt, Wk * QW);
        TAKE(w->dot, dv * QW);
        TAKE(w->lw, R * ((n + p->C - 1) / p->C));
        TAKE(w->cib, 2 * R * QW);
        TAKE(w->krs, R * n);
    }
#undef TAKE
    return off;
}

static ef_status ref_init(ef_attn *a);

static ef_status lsh_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    if (s->q_len != s->kv_len)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "lsh: shared-QK attention needs q_len == kv_len (got %d and %d)", s->q_len,
                        s->kv_len);
    lplan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the plan");
    a->impl = p;
    int n = s->q_len, d = s->head_dim;
    p->R = (int)ef_opt_i(a, OPT_HASHES);
    p->C = (int)ef_opt_i(a, OPT_CHUNK);
    p->before = (int)ef_opt_i(a, OPT_BEFORE);
    p->after = (int)ef_opt_i(a, OPT_AFTER);
    p->dedup = (int)ef_opt_i(a, OPT_DEDUP);
    int reformer = (int)ef_opt_i(a, OPT_REFORMER);
    if (reformer && !a->causal)
        return ef_error(EF_ERR_ARG,
                        "lsh: reformer_causal=1 chooses the causal rule of causal=1; it means "
                        "nothing with causal=0");
    p->mode = !a->causal ? LSH_BIDIR : reformer ? LSH_SORTED : LSH_STRICT;
    p->nf = 1;
    if (a->opt[OPT_BUCKETS].is_auto) {
        int lg = 1; /* nb = 2^lg = 2^floor(log2(2N / chunk)), at least 2 */
        while (lg < 30 && (double)(2 << lg) <= 2.0 * n / p->C) lg++;
        p->nb = 1 << lg;
        /* HF's _set_num_buckets, with max_position_embeddings = N: past
         * 2 max(floor(sqrt(floor(N / chunk))), chunk) buckets, two factors 2^floor(lg/2) and
         * 2^ceil(lg/2), so that hashing costs N D (b1 + b2)/2 instead of N D nb/2 */
        int root = 0; /* floor(sqrt(floor(N / chunk))), at most 2^15 steps */
        while ((int64_t)(root + 1) * (root + 1) <= n / p->C) root++;
        if ((int64_t)p->nb > 2 * (int64_t)EF_MAX(root, p->C))
            p->nf = 2, p->bf[0] = 1 << (lg / 2), p->bf[1] = 1 << (lg - lg / 2);
    } else {
        p->nb = (int)ef_opt_i(a, OPT_BUCKETS);
        if (p->nb % 2)
            return ef_error(EF_ERR_ARG, "lsh: buckets=%d must be even (argmax over [xR, -xR])",
                            p->nb);
    }
    if (p->nf == 1) p->bf[0] = p->nb;
    p->cols = p->nf == 1 ? p->nb / 2 : p->bf[0] / 2 + p->bf[1] / 2;
    for (int c = 1; c <= p->R; c++) p->logc[c] = logf((float)c);
    int tmp[130];
    p->nwin = window_chunks(p, (n + p->C - 1) / p->C, 0, tmp);
    /* tile shapes (also what lsh_flops counts, for either path) */
    int64_t win = p->mode == LSH_STRICT ? p->before + 1 : p->nwin;
    p->Wk = (int)EF_MIN((int64_t)n, win * p->C);
    p->QW = EF_MIN(EF_QT, (EF_MIN(p->C, n) + 15) / 16 * 16);
    p->dp = (d + 15) / 16 * 16;
    p->dvp = (s->v_dim + 15) / 16 * 16;
    if (a->ref) return ref_init(a);

    int cols = p->cols, R = p->R;
    size_t nrot = (size_t)s->heads * R * d * cols;
    p->rot = ef_malloc(nrot * sizeof(float));
    p->rmax = ef_mem_malloc(sizeof(float) * s->heads * R);
    if (!p->rot || !p->rmax) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the rotations");
    /* the draw of (h, r) is D x cols row-major; stored interleaved, row t of head h holds
     * every round's row t */
    float *draw = ef_mem_malloc(sizeof(float) * d * cols);
    if (!draw) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the rotations");
    for (int h = 0; h < s->heads; h++)
        for (int r = 0; r < R; r++) {
            float mx = 0;
            ef_rng_normal(a->seed, LSH_STREAM | (uint64_t)(h * R + r), 0, (size_t)d * cols, draw);
            for (size_t x = 0; x < (size_t)d * cols; x++)
                mx = fabsf(draw[x]) > mx ? fabsf(draw[x]) : mx;
            p->rmax[h * R + r] = mx;
            for (int t = 0; t < d; t++)
                memcpy(p->rot + (((size_t)h * d + t) * R + r) * cols, draw + (size_t)t * cols,
                       sizeof(float) * cols);
        }
    ef_free(draw);
    /* about 64K floats of projections per block, 1 to 256 rows */
    p->hb = (int)EF_MAX(1, EF_MIN(256, 65536 / ((int64_t)R * cols)));
    lwork probe;
    size_t per = slot_layout(a, NULL, &probe);
    p->ws = ef_mem_calloc((size_t)a->slots, sizeof *p->ws);
    p->status = ef_mem_calloc((size_t)a->slots, sizeof *p->status);
    p->msg = ef_mem_calloc((size_t)a->slots, MSG);
    p->block = ef_attn_ws_alloc(a, per * a->slots); /* shareable: see attn.h */
    if (!p->ws || !p->status || !p->msg || !p->block)
        return ef_error(EF_ERR_NOMEM, "lsh: out of memory for workspace");
    a->ws_bytes = per * a->slots + nrot * sizeof(float);
    if (!a->ws_borrowed) memset(p->block, 0, per * a->slots); /* zero padding columns */
    for (int t = 0; t < a->slots; t++) slot_layout(a, (char *)p->block + per * t, &p->ws[t]);
    return EF_OK;
}

static size_t lsh_saved_bytes(const ef_attn *a) {
    const lplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads * p->R * a->shape.q_len *
           (sizeof(int32_t) + sizeof(float));
}

/* Strict mode: (query, key) products of one bucket of m members (fast path's tile shapes). */
static double strict_bucket_products(const lplan *p, int m) {
    double t = 0;
    for (int q0 = 0; q0 < m; q0 += p->C) {
        int lo = strict_lo(p, q0), qend = EF_MIN(m, q0 + p->C);
        for (int t0 = q0; t0 < qend; t0 += p->QW) {
            int nq = EF_MIN(p->QW, qend - t0);
            t += (double)nq * (t0 + nq - lo);
        }
    }
    return t;
}

/* (query, key) products one round of one head computes on the fast path: every chunk times
 * its window in the sorted modes; in strict mode (data-dependent) the blocks of buckets of
 * equal size, as near as integers allow. */
static double round_products(const lplan *p, int n) {
    if (p->mode == LSH_STRICT) {
        int nbe = EF_MIN(p->nb, n), small = n / nbe, extra = n % nbe;
        return extra * strict_bucket_products(p, small + 1) +
               (double)(nbe - extra) * strict_bucket_products(p, small);
    }
    int nc = (n + p->C - 1) / p->C, ch[130];
    double t = 0;
    for (int c = 0; c < nc; c++) {
        int m = window_chunks(p, nc, c, ch);
        double keys = 0;
        for (int x = 0; x < m; x++) keys += EF_MIN(p->C, n - ch[x] * p->C);
        t += EF_MIN(p->C, n - c * p->C) * keys;
    }
    return t;
}

/* Distinct visible pairs can only be bounded from the plan (they depend on the hashes): query
 * i sees, per round, at most `per` keys (its window's other members, or itself alone), so over
 * R rounds at most min(R per, keys the causal rule allows) distinct keys. */
static int64_t lsh_pairs(const ef_attn *a, int head) {
    (void)head;
    const lplan *p = a->impl;
    int64_t n = a->shape.q_len;
    int64_t win = p->mode == LSH_STRICT ? (int64_t)(p->before + 1) * p->C : (int64_t)p->nwin * p->C;
    int64_t per = EF_MAX(1, EF_MIN(n, win) - 1), cap = p->R * per, tot = 0;
    if (p->mode == LSH_BIDIR) return n * EF_MIN(n, cap);
    for (int64_t i = 0; i < n; i++) tot += EF_MIN(i + 1, cap);
    return tot;
}

static double lsh_flops(const ef_attn *a, int backward) {
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double bh = (double)s->batch * s->heads, d = s->head_dim, dv = s->v_dim;
    double prod = bh * p->R * round_products(p, s->q_len);
    double hash = bh * p->R * s->q_len * d * 2.0 * p->cols;
    return hash + (backward ? prod * (2 * (3 * d + 2 * dv) + 2 * (d + dv)) : prod * 2 * (d + dv));
}

/* ---------------------------------------------------------------------------------------------
 * Fast path
 * ------------------------------------------------------------------------------------------- */
typedef struct ljob {
    ef_attn *a;
    const ef_attn_io *io;
    int32_t *bkt; /* saved (or NULL) */
    float *lse;
    const float *dout;
    float *dq, *dv;
    int replay; /* forward: reuse the buckets in bkt (validated by the caller) instead of hashing */
} ljob;

static ef_status forward_one(ljob *j, int64_t item, lwork *w) {
    ef_attn *a = j->a;
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, b = (int)(item / s->heads),
        h = (int)(item % s->heads), valid = lsh_valid(a, j->io, b);
    const float *q = j->io->q + (size_t)item * n * d, *v = j->io->v + (size_t)item * n * dv;
    float *out = j->io->out + (size_t)item * n * dv;
    int32_t *bkt = j->bkt ? j->bkt + (size_t)item * p->R * n : w->bkt;
    float *lse = j->lse ? j->lse + (size_t)item * p->R * n : w->lse;
    memset(out, 0, sizeof(float) * n * dv);
    for (int r = 0; r < p->R; r++)
        for (int i = valid; i < n; i++) lse[(size_t)r * n + i] = -INFINITY;
    TRY(prepare(a, w, q, h, valid, bkt, !j->replay));
    for (int i = 0; i < valid; i++) w->m[i] = -INFINITY, w->sw[i] = 0;
    run_sorted(a, w, q, v, valid, bkt, NULL, out, lse, NULL, NULL);
    for (int i = 0; i < valid; i++) {
        if (w->sw[i] == 0) continue;
        float inv = 1.0f / w->sw[i];
        for (int e = 0; e < dv; e++) out[(size_t)i * dv + e] *= inv;
    }
    return EF_OK;
}

static ef_status backward_one(ljob *j, int64_t item, lwork *w) {
    ef_attn *a = j->a;
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, b = (int)(item / s->heads),
        h = (int)(item % s->heads), valid = lsh_valid(a, j->io, b);
    const float *q = j->io->q + (size_t)item * n * d, *v = j->io->v + (size_t)item * n * dv;
    const float *out = j->io->out + (size_t)item * n * dv, *g = j->dout + (size_t)item * n * dv;
    float *dq = j->dq + (size_t)item * n * d, *dvo = j->dv + (size_t)item * n * dv;
    int32_t *bkt = j->bkt + (size_t)item * p->R * n;
    const float *lse = j->lse + (size_t)item * p->R * n;
    memset(dq, 0, sizeof(float) * n * d);
    memset(dvo, 0, sizeof(float) * n * dv);
    if (valid == 0) return EF_OK;
    TRY(prepare(a, w, q, h, valid, bkt, 0));
    /* L_i = logsumexp_r lse_r(i) (w->m), delta_i = dO_i . out_i, rows < valid only */
    for (int i = 0; i < valid; i++) {
        float mx = -INFINITY;
        for (int r = 0; r < p->R; r++)
            mx = lse[(size_t)r * n + i] > mx ? lse[(size_t)r * n + i] : mx;
        if (mx == -INFINITY)
            w->m[i] = -INFINITY;
        else {
            double sum = 0;
            for (int r = 0; r < p->R; r++) sum += exp((double)lse[(size_t)r * n + i] - mx);
            w->m[i] = mx + (float)log(sum);
        }
        w->delta[i] = (float)ef_dot_d(g + (size_t)i * dv, out + (size_t)i * dv, dv);
    }
    memset(w->dkn, 0, sizeof(float) * valid * d);
    run_sorted(a, w, q, v, valid, bkt, g, NULL, NULL, dq, dvo);
    /* k = q/|q|: dq += (dk - k (k . dk)) / |q| */
    for (int i = 0; i < valid; i++) {
        if (w->nrm[i] == 0) continue;
        const float *k = w->xn + (size_t)i * d, *dk = w->dkn + (size_t)i * d;
        float kd = (float)ef_dot_d(k, dk, d), inv = 1.0f / w->nrm[i];
        float *dqi = dq + (size_t)i * d;
        int t = 0;
        for (; t + EF_VL <= d; t += EF_VL)
            vf_storeu(dqi + t, vf_loadu(dqi + t) + (vf_loadu(dk + t) - vf_loadu(k + t) * kd) * inv);
        for (; t < d; t++) dqi[t] += (dk[t] - k[t] * kd) * inv;
    }
    return EF_OK;
}

/* Workers record their first failure (status and message) in their slot. */
static void run_item(void *ctx, int64_t item, int tid, int fwd) {
    ljob *j = ctx;
    lplan *p = j->a->impl;
    if (p->status[tid]) return;
    lwork *w = &p->ws[tid];
    int old = ef_gemm_local_threads(1);
    ef_status st = fwd ? forward_one(j, item, w) : backward_one(j, item, w);
    ef_gemm_local_threads(old);
    if (st) {
        p->status[tid] = st;
        snprintf(p->msg + (size_t)tid * MSG, MSG, "%s", ef_last_error());
    }
}
static void forward_item(void *ctx, int64_t item, int tid) { run_item(ctx, item, tid, 1); }
static void backward_item(void *ctx, int64_t item, int tid) { run_item(ctx, item, tid, 0); }

static ef_status run_items(ef_attn *a, ljob *j, ef_parallel_fn fn) {
    lplan *p = a->impl;
    memset(p->status, 0, sizeof(ef_status) * a->slots);
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), fn, j);
    for (int t = 0; t < a->slots; t++)
        if (p->status[t]) return ef_error(p->status[t], "lsh: %s", p->msg + (size_t)t * MSG);
    return EF_OK;
}

/* Forward, hashing (replay = 0) or reusing the buckets already in saved (replay = 1); the
 * sort, chunks, masks, lse and output are computed the same way from the buckets either way. */
static ef_status lsh_run_forward(ef_attn *a, const ef_attn_io *io, void *saved, int replay) {
    const ef_attn_shape *s = &a->shape;
    const lplan *p = a->impl;
    size_t bhrn = (size_t)s->batch * s->heads * p->R * s->q_len;
    ljob j = {.a = a,
              .io = io,
              .bkt = saved ? (int32_t *)saved : NULL,
              .lse = saved ? (float *)((int32_t *)saved + bhrn) : NULL,
              .replay = replay};
    return run_items(a, &j, forward_item);
}

static ef_status lsh_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    return lsh_run_forward(a, io, saved, 0);
}

/* Buckets in saved must be those a forward of this plan wrote for this io (checked here, in
 * the caller's thread, so that the message reaches it). */
static ef_status check_saved_buckets(const ef_attn *a, const ef_attn_io *io, const int32_t *bkt,
                                     int nb, int R) {
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len;
    for (int b = 0; b < s->batch; b++) {
        int valid = lsh_valid(a, io, b);
        for (int h = 0; h < s->heads; h++)
            for (int r = 0; r < R; r++) {
                const int32_t *br = bkt + (((size_t)b * s->heads + h) * R + r) * n;
                for (int i = 0; i < valid; i++)
                    if (br[i] < 0 || br[i] >= nb)
                        return ef_error(EF_ERR_ARG,
                                        "lsh: saved holds bucket %d for position %d (batch %d, "
                                        "head %d, round %d): not written by this plan's forward "
                                        "with these lengths",
                                        (int)br[i], i, b, h, r);
            }
    }
    return EF_OK;
}

/* A replay reuses every bucket, so the record must match io's lengths exactly: a bucket in
 * [0, nb) at each position below L = min(kv_lens, q_lens), -1 at each one past it. Checked in
 * the caller's thread (shared by both paths: the reference saves the same bucket layout). */
static ef_status check_replay_buckets(const ef_attn *a, const ef_attn_io *io, const int32_t *bkt,
                                      int nb, int R) {
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len;
    if (!bkt)
        return ef_error(EF_ERR_ARG, "lsh: replay needs the saved buckets of an earlier forward "
                                    "(saved is NULL)");
    for (int b = 0; b < s->batch; b++) {
        int valid = lsh_valid(a, io, b);
        for (int h = 0; h < s->heads; h++)
            for (int r = 0; r < R; r++) {
                const int32_t *br = bkt + (((size_t)b * s->heads + h) * R + r) * n;
                for (int i = 0; i < n; i++) {
                    int ok = i < valid ? br[i] >= 0 && br[i] < nb : br[i] == -1;
                    if (!ok)
                        return ef_error(EF_ERR_ARG,
                                        "lsh: replay: saved holds bucket %d for position %d "
                                        "(batch %d, head %d, round %d), where io's lengths "
                                        "(min(kv_lens, q_lens) = %d) want %s: not written by "
                                        "this plan's forward with these lengths",
                                        (int)br[i], i, b, h, r, valid,
                                        i < valid ? "a bucket in [0, buckets) at a valid position"
                                                  : "-1 at a padded position");
                }
            }
    }
    return EF_OK;
}

/* The forward of a reversible layer's recomputation: the buckets come from saved, not from q. */
static ef_status lsh_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    const lplan *p = a->impl;
    TRY(check_replay_buckets(a, io, saved, p->nb, p->R));
    return lsh_run_forward(a, io, saved, 1);
}

static ef_status lsh_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    const lplan *p = a->impl;
    size_t bhrn = (size_t)s->batch * s->heads * p->R * s->q_len;
    TRY(check_saved_buckets(a, io, saved, p->nb, p->R));
    ljob j = {.a = a,
              .io = io,
              .bkt = (int32_t *)(uintptr_t)saved,
              .lse = (float *)((const int32_t *)saved + bhrn),
              .dout = dout,
              .dq = dq,
              .dv = dv};
    memset(dk, 0, sizeof(float) * s->batch * s->heads * s->kv_len * s->head_dim);
    return run_items(a, &j, backward_item);
}

/* ---------------------------------------------------------------------------------------------
 * Reference (ref=1): a second implementation written from docs/lsh.md, sharing no code and no
 * workspace with the fast path. Per (batch, head): hashing in double by plain loops, ranks and
 * sorted indices by counting over all positions (O(L^2)), the windows and causal rules as an
 * explicit predicate per (query, key) pair, and the output as one softmax over the attended
 * (round, key) entries of each row, in double. Saved: the buckets only, [B][H][R][N] int32
 * (-1 past L); backward rebuilds everything else from them.
 * ------------------------------------------------------------------------------------------- */
static ef_status ref_init(ef_attn *a) {
    lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t n = s->q_len, d = s->head_dim, dv = s->v_dim, R = p->R, cols = p->cols;
    size_t nrot = (size_t)s->heads * R * d * cols;
    /* the shared random choice: the same Philox draw as the fast path, read into our own copy */
    p->rrot = ef_malloc(nrot * sizeof(float));
    if (!p->rrot) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the rotations");
    for (int h = 0; h < s->heads; h++)
        for (size_t r = 0; r < R; r++)
            ef_rng_normal(a->seed, LSH_STREAM | (uint64_t)(h * R + r), 0, d * cols,
                          p->rrot + ((size_t)h * R + r) * d * cols);
    size_t nd = n * d * 3 + n * 2 + n * dv + cols;
    size_t bytes =
        nd * sizeof(double) + (R * n * 2 + n) * sizeof(int32_t) + d * sizeof(float) + R * n;
    p->rblock = ef_malloc(bytes);
    if (!p->rblock) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the reference");
    a->ws_bytes = bytes + nrot * sizeof(float);
    double *x = p->rblock;
    p->rk = x, x += n * d;
    p->rgq = x, x += n * d;
    p->rgk = x, x += n * d;
    p->rn = x, x += n;
    p->rdot = x, x += n;
    p->rgv = x, x += n * dv;
    p->ry = x, x += cols;
    int32_t *iw = (int32_t *)x;
    p->rbk = iw, iw += R * n;
    p->rord = iw, iw += R * n;
    p->rcnt = iw, iw += n;
    p->rx = (float *)iw;
    p->rvis = (unsigned char *)(p->rx + d);
    return EF_OK;
}

/* The documented hash of one row: x = fp32(q / |q|) (norm and quotient in double), y = x R in
 * double summed over t = 0..D-1 (R is D x cols), bucket = the first index of the largest entry
 * of [y, -y] (one factor), or a1 + b1 a2 with a_f that index within factor f's columns (y_1 =
 * columns [0, b1/2), y_2 = the next b2/2).
 * Discrete choices this reuses from the definition (not from the fast path's code): the fp32
 * rounding of x and the first-index rule for exact ties (a zero row ties everywhere and takes
 * bucket 0). Every product x_t R_tc is exact in double, so the sum is the same with or without
 * FMA contraction. */
static int ref_bucket(const float *q, int d, const float *rot, const lplan *p, float *x,
                      double *y) {
    int cols = p->cols;
    double ss = 0;
    for (int t = 0; t < d; t++) ss += (double)q[t] * q[t];
    double nr = sqrt(ss);
    for (int t = 0; t < d; t++) x[t] = nr > 0 ? (float)(q[t] / nr) : 0.0f;
    for (int c = 0; c < cols; c++) {
        double acc = 0;
        for (int t = 0; t < d; t++) acc += (double)x[t] * rot[(size_t)t * cols + c];
        y[c] = acc;
    }
    int bucket = 0, unit = 1;
    for (int f = 0; f < p->nf; f++) {
        int half = p->bf[f] / 2, best = -1;
        double bv = 0;
        for (int c = 0; c < 2 * half; c++) {
            double val = c < half ? y[c] : -y[c - half];
            if (best < 0 || val > bv) best = c, bv = val;
        }
        bucket += unit * best, unit *= p->bf[f], y += half;
    }
    return bucket;
}

/* ord[i] for i < L: the rank of i among the earlier positions of its bucket (strict), or its
 * index in the stable sort by (bucket, position) (sorted modes), by counting. */
static void ref_order(const lplan *p, const int32_t *bk, int L, int32_t *ord) {
    for (int i = 0; i < L; i++) {
        int c = 0;
        for (int j = 0; j < L; j++) {
            if (p->mode == LSH_STRICT)
                c += j < i && bk[j] == bk[i];
            else
                c += bk[j] < bk[i] || (bk[j] == bk[i] && j < i);
        }
        ord[i] = c;
    }
}

/* 1 when query i sees key j != i in a round with buckets bk and order ord (before the
 * self-mask), as docs/lsh.md states the rules. */
static int ref_sees(const lplan *p, const int32_t *bk, const int32_t *ord, int L, int i, int j) {
    if (j == i) return 0;
    if (p->mode == LSH_STRICT) /* same bucket, earlier, rank in the chunk or `before` chunks */
        return bk[j] == bk[i] && j < i && ord[j] >= (ord[i] / p->C - p->before) * p->C;
    if (p->mode == LSH_SORTED && j > i) return 0;
    int nc = (L + p->C - 1) / p->C, ci = ord[i] / p->C, cj = ord[j] / p->C;
    for (int o = -p->before; o <= p->after; o++)
        if (((ci + o) % nc + nc) % nc == cj) return 1;
    return 0;
}

/* Hashes (when hash) or reads (bk) the buckets of one (b, h), orders them, and computes the
 * double keys k_j = q_j / |q_j| of the L valid rows. */
static void ref_head(const ef_attn *a, const float *q, int h, int L, int32_t *bk, int hash) {
    lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    for (int r = 0; r < p->R; r++) {
        int32_t *br = bk + (size_t)r * n;
        const float *rot = p->rrot + ((size_t)h * p->R + r) * d * p->cols;
        if (hash) {
            for (int i = 0; i < L; i++)
                br[i] = ref_bucket(q + (size_t)i * d, d, rot, p, p->rx, p->ry);
            for (int i = L; i < n; i++) br[i] = -1;
        }
        ref_order(p, br, L, p->rord + (size_t)r * n);
    }
    for (int j = 0; j < L; j++) {
        double ss = 0;
        for (int t = 0; t < d; t++) ss += (double)q[(size_t)j * d + t] * q[(size_t)j * d + t];
        p->rn[j] = sqrt(ss);
        for (int t = 0; t < d; t++)
            p->rk[(size_t)j * d + t] = p->rn[j] > 0 ? q[(size_t)j * d + t] / p->rn[j] : 0.0;
    }
}

/* Row i (< L): vis[r][j] = 1 when i attends j in round r (itself only when it sees nothing
 * else), cnt[j] = rounds, dot[j] = the logit scale q_i.k_j - log cnt_j (dedup) of each attended
 * key. Returns the row's log-sum-exp over its (round, key) entries. */
static double ref_row(const ef_attn *a, const float *q, const int32_t *bk, int L, int i) {
    lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    for (int j = 0; j < L; j++) p->rcnt[j] = 0;
    for (int r = 0; r < p->R; r++) {
        unsigned char *vis = p->rvis + (size_t)r * n;
        const int32_t *br = bk + (size_t)r * n, *ord = p->rord + (size_t)r * n;
        int any = 0;
        for (int j = 0; j < L; j++) any |= vis[j] = (unsigned char)ref_sees(p, br, ord, L, i, j);
        if (!any) vis[i] = 1;
        for (int j = 0; j < L; j++) p->rcnt[j] += vis[j];
    }
    double mx = -INFINITY;
    for (int j = 0; j < L; j++) {
        if (!p->rcnt[j]) continue;
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)q[(size_t)i * d + t] * p->rk[(size_t)j * d + t];
        p->rdot[j] = a->scale * dot - (p->dedup ? log((double)p->rcnt[j]) : 0.0);
        mx = p->rdot[j] > mx ? p->rdot[j] : mx;
    }
    double sum = 0;
    for (int r = 0; r < p->R; r++)
        for (int j = 0; j < L; j++)
            if (p->rvis[(size_t)r * n + j]) sum += exp(p->rdot[j] - mx);
    return mx + log(sum);
}

static size_t lsh_ref_saved_bytes(const ef_attn *a) {
    const lplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads * p->R * a->shape.q_len * sizeof(int32_t);
}

/* Forward of the reference: hashes (hash = 1) or reuses the buckets in saved (hash = 0, replay),
 * then the same per-row sets and softmax either way. */
static ef_status ref_run_forward(ef_attn *a, const ef_attn_io *io, void *saved, int hash) {
    lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, R = p->R;
    for (int b = 0; b < s->batch; b++)
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            int L = lsh_valid(a, io, b);
            const float *q = io->q + bh * n * d, *v = io->v + bh * n * dv;
            int32_t *bk = saved ? (int32_t *)saved + bh * R * n : p->rbk;
            float *out = io->out + bh * n * dv;
            ref_head(a, q, h, L, bk, hash);
            memset(out, 0, sizeof(float) * n * dv);
            for (int i = 0; i < L; i++) {
                double lse = ref_row(a, q, bk, L, i);
                for (int e = 0; e < dv; e++) {
                    double acc = 0;
                    for (int r = 0; r < R; r++)
                        for (int j = 0; j < L; j++)
                            if (p->rvis[(size_t)r * n + j])
                                acc += exp(p->rdot[j] - lse) * v[(size_t)j * dv + e];
                    out[(size_t)i * dv + e] = (float)acc;
                }
            }
        }
    return EF_OK;
}

static ef_status lsh_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    return ref_run_forward(a, io, saved, 1);
}

static ef_status lsh_ref_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    const lplan *p = a->impl;
    TRY(check_replay_buckets(a, io, saved, p->nb, p->R));
    return ref_run_forward(a, io, saved, 0);
}

static ef_status lsh_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, e_ = s->v_dim, R = p->R;
    TRY(check_saved_buckets(a, io, saved, p->nb, R));
    memset(dk, 0, sizeof(float) * s->batch * s->heads * n * d);
    for (int b = 0; b < s->batch; b++)
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            int L = lsh_valid(a, io, b);
            const float *q = io->q + bh * n * d, *v = io->v + bh * n * e_;
            int32_t *bk = (int32_t *)(uintptr_t)saved + bh * R * n;
            ref_head(a, q, h, L, bk, 0);
            double *gq = p->rgq, *gk = p->rgk, *gv = p->rgv;
            memset(gq, 0, sizeof(double) * n * d);
            memset(gk, 0, sizeof(double) * n * d);
            memset(gv, 0, sizeof(double) * n * e_);
            for (int i = 0; i < L; i++) {
                double lse = ref_row(a, q, bk, L, i);
                const float *gi = dout + (bh * n + i) * e_;
                /* out_i = sum_rj P_rij v_j, P = exp(s' - lse); delta = sum P (dO_i . v_j) */
                double delta = 0;
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < L; j++) {
                        if (!p->rvis[(size_t)r * n + j]) continue;
                        double dp = 0;
                        for (int e = 0; e < e_; e++) dp += (double)gi[e] * v[(size_t)j * e_ + e];
                        delta += exp(p->rdot[j] - lse) * dp;
                    }
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < L; j++) {
                        if (!p->rvis[(size_t)r * n + j]) continue;
                        double pj = exp(p->rdot[j] - lse), dp = 0;
                        for (int e = 0; e < e_; e++) dp += (double)gi[e] * v[(size_t)j * e_ + e];
                        double ds = pj * (dp - delta) * a->scale;
                        for (int t = 0; t < d; t++) {
                            gq[(size_t)i * d + t] += ds * p->rk[(size_t)j * d + t];
                            gk[(size_t)j * d + t] += ds * q[(size_t)i * d + t];
                        }
                        for (int e = 0; e < e_; e++) gv[(size_t)j * e_ + e] += pj * gi[e];
                    }
            }
            /* through k = q/|q|: dq_j += (I - k_j k_j^T) dk_j / |q_j| */
            memset(dq + bh * n * d, 0, sizeof(float) * n * d);
            memset(dv + bh * n * e_, 0, sizeof(float) * n * e_);
            for (int j = 0; j < L; j++) {
                double kd = 0;
                for (int t = 0; t < d; t++) kd += p->rk[(size_t)j * d + t] * gk[(size_t)j * d + t];
                for (int t = 0; t < d; t++) {
                    double x = gq[(size_t)j * d + t];
                    if (p->rn[j] > 0)
                        x += (gk[(size_t)j * d + t] - p->rk[(size_t)j * d + t] * kd) / p->rn[j];
                    dq[(bh * n + j) * d + t] = (float)x;
                }
                for (int e = 0; e < e_; e++)
                    dv[(bh * n + j) * e_ + e] = (float)gv[(size_t)j * e_ + e];
            }
        }
    return EF_OK;
}

static const ef_opt_desc lsh_opts[] = {
    {"hashes", EF_OPT_INT, "4", 1, 64, NULL, 0, "hashing rounds, combined by their log-sum-exp"},
    {"buckets", EF_OPT_INT, "auto", 2, 1 << 24, NULL, 1,
     "buckets per round (even); auto = 2^floor(log2(2N/chunk)), at least 2, as two factors past "
     "2 max(sqrt(N/chunk), chunk) (HF)"},
    {"chunk", EF_OPT_INT, "64", 1, 1 << 20, NULL, 0,
     "positions per chunk (of the sorted order; of each bucket with strict causal=1)"},
    {"before", EF_OPT_INT, "1", 0, 64, NULL, 0,
     "previous chunks a chunk attends (cyclic; strict causal=1: of its bucket, not cyclic)"},
    {"after", EF_OPT_INT, "0", 0, 64, NULL, 0,
     "next chunks a chunk attends (cyclic; no effect with strict causal=1)"},
    {"dedup", EF_OPT_BOOL, "1", 0, 1, NULL, 0,
     "count each (query, key) pair once over the rounds (logit - log count)"},
    {"reformer_causal", EF_OPT_BOOL, "0", 0, 1, NULL, 0,
     "with causal=1: Reformer's sorted-chunk causal rule (keys j <= i of the window); NOT "
     "strictly causal: a row's chunk composition depends on later positions' hashes"},
};

const ef_attn_ops ef_attn_ops_lsh = {
    .caps = {.causal = 1, .random = 1, .discrete = 1, .deterministic = 1, .shared_qk = 1},
    .name = "lsh",
    .summary = "Reformer LSH attention: shared QK, hashed buckets, sorted chunks, O(N R W D)",
    .notes =
        "  shared QK: keys are q/|q| (io->k is ignored and gets a zero gradient); needs\n"
        "  q_len == kv_len; logits are scale * q.k (HF/trax use no scale: pass scale=1).\n"
        "  a query sees itself only when no other key is visible. only positions below\n"
        "  min(kv_lens, q_lens) are hashed; later rows output zeros, get zero gradients and\n"
        "  are never read. causal=1 is strictly causal: chunks are cut in each bucket's own\n"
        "  position order and a query sees earlier positions of its bucket only (its chunk and\n"
        "  `before` chunks back). reformer_causal=1 (with causal=1) gives Reformer's sorted-\n"
        "  chunk causal rule instead, which is NOT strictly causal (later positions' hashes\n"
        "  move the chunk edges). saves the buckets and per-round lse of every row (backward\n"
        "  reuses the hashing); reference (ref=1): its own double hashing and per-query sets.\n"
        "  ef_attn_forward_replay reuses the saved buckets instead of hashing (a reversible\n"
        "  layer's recomputation attends as the forward did); they must match io's lengths.\n"
        "  ef_attn_visible_pairs is an upper bound on the distinct pairs (they depend on q).",
    .opts = lsh_opts,
    .n_opts = 7,
    .init = lsh_init,
    .destroy = lsh_destroy,
    .flops = lsh_flops,
    .pairs = lsh_pairs,
    .saved_bytes = lsh_saved_bytes,
    .forward = lsh_forward,
    .backward = lsh_backward,
    .replay = lsh_replay,
    .ref_saved_bytes = lsh_ref_saved_bytes,
    .ref_forward = lsh_ref_forward,
    .ref_backward = lsh_ref_backward,
    .ref_replay = lsh_ref_replay,
};
