/*
 * clustered.c - clustered attention (Vyas et al. 2020, fast-transformers), two mechanisms:
 *   clustered   queries are grouped by k-means on LSH codes; each cluster attends once with the
 *               mean of its queries and every member receives that cluster's output.
 *   iclustered  "improved clustered": the centroid's top-k keys are recomputed exactly per
 *               query, the remaining keys keep the centroid's attention (ALGORITHMS.md b.7).
 * docs/clustered.md states the formulas, the random draws and the backward.
 *
 * Layouts: q [B][H][N][D], k [B][H][M][D], v [B][H][M][Dv], out [B][H][N][Dv].
 * Per (batch b, head h): n = q_lens[b] valid queries, m = kv_lens[b] valid keys,
 * C_b = min(clusters, n), k_b = min(topk, m). Only valid rows take part in anything below;
 * padded query rows output zeros and get zero gradients, padded keys get zero gradients.
 *   hash   h_i = sum_b 2^b [q_i . a_b > 0], a_b ~ N(0, I) rows of a bits x D matrix drawn per
 *          head from the seed (cosine LSH, no bias term: fast-transformers' hash_bias=False);
 *   k-means in Hamming space (ef_clustered_kmeans) of the n codes into C_b clusters: initial
 *          centroids = codes of C_b distinct positions sampled from the seed; `iters` rounds of
 *          (assign: argmin popcount(h ^ c), ties to the lowest id; update: per-bit majority, a
 *          tie gives 0, an empty cluster gets a random code); then one final assignment, which
 *          is the one used;
 *   Qc = mean of the member queries (C_b x D); S = scale Qc K^T over the m keys; A = softmax(S).
 *   clustered:  out_i = (A V)[c(i)].
 *   iclustered: T_c = top-k_b logits of row c (ties to the lower key), m_c = sum_{j in T_c} A_cj,
 *          Vb_c = sum_{j not in T_c} A_cj v_j; out_i = m_c sum_{j in T_c} softmax_j(scale
 *          q_i.k_j) v_j + Vb_c.
 * Both refuse causal=1: the clusters (and so every centroid and top-k set) come from all the
 * queries of the sequence, future ones included.
 * Saved for backward, per (batch, head), int32: the assignment [N] (-1 for padded rows), then
 * for iclustered the top-k keys [C][K] (-1 past k_b and for clusters >= C_b): O(N + C K), every
 * byte written (the top-k keys of a cluster in increasing order). Backward holds the clusters
 * and the top-k sets fixed; it recomputes Qc, A and the per-query top softmax.
 * Replay (ef_attn_forward_replay, both paths): the assignment and top-k sets are read from saved
 * (checked against the call's lengths) instead of hashing, k-means and top-k selection; the
 * centroids, attention and outputs are then the forward's own code, on the current inputs.
 * Time O(N bits D + iters N C + C M (D + Dv) + N K (D + Dv)) per head; memory per thread
 * O(C M) for the centroid scores. Fast path: hashing is an ef_tile_gemm product with an exact
 * double recompute of the signs the fp32 sum cannot vouch for; k-means compares codes as
 * vectors of keys (popcount << 32 | id) and after the first round rescans only the centroids
 * that moved; the top part runs per cluster on blocks of RB members with ef_tile_gemm.
 * Work items are (batch, head) pairs, single-threaded inside, so results do not depend on the
 * thread count.
 */
#include "attn/attn.h"
#include "core/vec.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const ef_attn_ops ef_attn_ops_iclustered;

enum { RB = 128 }; /* members of a cluster processed together in the top part */

/* random streams: hyperplanes per head, k-means draws per (batch, head) */
#define STREAM_PLANES (0x636c7573ull << 32)
#define STREAM_KMEANS (0x6b6d6e73ull << 32)

typedef struct cwork {
    uint64_t *hash, *cent;      /* [N], [C] */
    int32_t *asg, *cnt;         /* [N], [C] */
    int32_t *kw;                /* [N + 67 C] k-means scratch */
    float *hs;                  /* [HB][PLANE_ROW] a block's plane products */
    int32_t *tk;                /* [C][K] top-k keys */
    float *qc, *dqc;            /* [C][D] */
    float *S, *dP;              /* [C][M] scores / probabilities, their gradient */
    float *G, *vb;              /* [C][Dv] summed output gradients, bottom values */
    float *mass, *dm, *rinv;    /* [C]; rinv: 1 / the centroid softmax sums (forward) */
    int32_t *order, *off, *cur; /* [N] queries sorted by cluster, [C + 1] offsets, [C] */
    /* the top part; row strides padded to multiples of 16 (Kp, Dp, Dvp), 64-byte aligned */
    float *kt, *dkt;            /* [K][Dp] top keys of a cluster, their gradient */
    float *vt, *dvt;            /* [K][Dvp] */
    float *ktT, *vtT;           /* [D][Kp], [Dv][Kp] the same, transposed */
    float *qm, *gm, *om;        /* [RB][Dp], [RB][Dvp], [RB][max(Dp, Dvp)] a block of members */
    float *P, *D1;              /* [RB][Kp] top probabilities, their gradient */
    ef_status st;               /* first failure of a work item run in this slot */
    char msg[256];              /* its message (ef_last_error is per thread) */
} cwork;

/* The reference path's own workspace (ref=1 plans), carved by ref_layout. */
typedef struct rws {
    double *planes;             /* [H][bits][D] the hyperplanes, from the same draw */
    uint64_t *code, *cent;      /* [N], [C] */
    int32_t *asg, *cnt, *perm;  /* [N], [C], [N] */
    int32_t *tk;                /* [C][K] top-k keys */
    char *top;                  /* [C][M] 1 when key j is in T_c */
    double *qc, *lg, *A;        /* [C][D], [C][M] logits (reused for dA), [C][M] */
    double *mass, *vb, *G, *dm; /* [C], [C][Dv], [C][Dv], [C] */
    double *dqc, *gk, *gv, *gq; /* [C][D], [M][D], [M][Dv], [D] */
    double *p, *dp;             /* [K] */
} rws;

typedef struct cplan {
    int improved;                /* iclustered: set from a->ops in clu_init, never inferred */
    int C, K, bits, iters, topk; /* C = min(clusters, N), K = min(topk, M) (0 for clustered) */
    int Kp, dp, dvp;             /* K, D, Dv rounded up to multiples of 16 (ef_tile_gemm rows) */
    float *planes;               /* [H][D][PLANE_ROW] hyperplanes, transposed (fast path) */
    float *pnorm;                /* [H][PLANE_ROW] their norms, rounded up, zero past bits */
    cwork *ws;                   /* [slots] (fast path) */
    void *block;                 /* everything above (fast path) */
    rws ref;                     /* the reference's own workspace (ref=1 plans only) */
    void *rblock;                /* its storage */
} cplan;

/* ---------------------------------------------------------------------------------------------
 * Hashing and k-means of the fast path
 * ------------------------------------------------------------------------------------------- */
/* planes_t is the head's hyperplane matrix transposed and padded, [D][PLANE_ROW] (zeros past
 * `bits`). The code bit b of query i is the sign of q_i . a_b summed in double over t in order
 * (a product of two floats is exact in double, so a fused multiply-add gives the same sum): the
 * reference's scalar sums agree bit for bit. The fast path gets the same bits from an fp32
 * product: a block of queries times planes_t with ef_tile_gemm, whose sum s differs from the
 * exact one by at most gamma_D sum_t |q_t a_t| <= D u ||q|| ||a_b|| (u = 2^-24, fused multiply-
 * adds in any order); wherever |s| is not above twice that bound (or s is not finite) the sign
 * could differ, and the dot product is recomputed in double as the specification says. With
 * Gaussian data that is about one plane in 10^4. */
enum { PLANE_ROW = 64, HB = 96 }; /* HB queries hashed per product (a multiple of 6) */

/* Bit l of the result is lane l of m (all-ones or zero lanes) is set. */
static inline uint32_t mask_bits(vi m) {
#if defined(__AVX512F__) && EF_VL == 16
    return (uint32_t)_mm512_cmplt_epi32_mask((__m512i)m, _mm512_setzero_si512());
#elif defined(__AVX__) && EF_VL == 8
    return (uint32_t)_mm256_movemask_ps((__m256)m);
#else
    uint32_t r = 0;
    for (int l = 0; l < EF_VL; l++) r |= (uint32_t)(m[l] < 0) << l;
    return r;
#endif
}

/* Codes of nb <= HB queries q (rows of d) into out; hs holds HB x PLANE_ROW floats; pnorm the
 * head's plane norms (rounded up, zero past bits). */
static void hash_block(const float *q, int nb, int d, const float *planes_t, const float *pnorm,
                       int bits, float *hs, uint64_t *out) {
    ef_tile_gemm(nb, d, PLANE_ROW, q, d, 1, planes_t, PLANE_ROW, hs, PLANE_ROW, 0);
    const double tolc = (d + 2) * 0x1p-23 * (1 + 0x1p-20);
    uint64_t keep = bits >= 64 ? ~0ull : (1ull << bits) - 1;
    for (int i = 0; i < nb; i++) {
        const float *qi = q + (size_t)i * d, *si = hs + (size_t)i * PLANE_ROW;
        float qn = (float)(sqrt(ef_dot_d(qi, qi, d)) * tolc);
        uint64_t pos = 0, unsure = 0;
        for (int u = 0; u < PLANE_ROW / EF_VL; u++) {
            vf x = vf_load(si + u * EF_VL);
            vf tol = vf_load(pnorm + u * EF_VL) * qn + 1e-37f; /* 1e-37: fp32 underflow */
            vf ax = (vf)((vi)x & 0x7fffffff);
            pos |= (uint64_t)mask_bits(x > 0) << (u * EF_VL);
            unsure |= (uint64_t)mask_bits(~((ax > tol) & (ax < __builtin_inff()))) << (u * EF_VL);
        }
        pos &= keep, unsure &= keep;
        for (; unsure; unsure &= unsure - 1) {
            int b = __builtin_ctzll(unsure);
            double acc = 0;
            for (int t = 0; t < d; t++) acc += (double)qi[t] * planes_t[(size_t)t * PLANE_ROW + b];
            pos = acc > 0 ? pos | 1ull << b : pos & ~(1ull << b);
        }
        out[i] = pos;
    }
}

/* pnorm[b] = ||column b of planes_t|| rounded up (b < bits), zero for b in [bits, PLANE_ROW). */
static void plane_norms(const float *planes_t, int d, int bits, float *pnorm) {
    for (int b = 0; b < PLANE_ROW; b++) {
        double nn = 0;
        for (int t = 0; t < d && b < bits; t++) {
            double x = planes_t[(size_t)t * PLANE_ROW + b];
            nn += x * x;
        }
        pnorm[b] = (float)(sqrt(nn) * (1 + 0x1p-20));
    }
}

/* Test hook (declared again in tests/test_clustered.c; not part of the API): the codes of n
 * queries (rows of d floats) against planes_t ([d][64], 64-byte aligned, columns past bits
 * zero), as the fast path computes them. */
void ef_clustered_hash(const float *q, int n, int d, int bits, const float *planes_t,
                       uint64_t *out);
void ef_clustered_hash(const float *q, int n, int d, int bits, const float *planes_t,
                       uint64_t *out) {
    float pnorm[PLANE_ROW] __attribute__((aligned(64)));
    static _Thread_local float hs[HB * PLANE_ROW] __attribute__((aligned(64)));
    plane_norms(planes_t, d, bits, pnorm);
    for (int i0 = 0; i0 < n; i0 += HB)
        hash_block(q + (size_t)i0 * d, EF_MIN(HB, n - i0), d, planes_t, pnorm, bits, hs, out + i0);
}

static uint64_t random_code(uint64_t seed, uint64_t stream, uint64_t ctr, int bits) {
    uint32_t r[4];
    ef_rng_raw(seed, stream, ctr, r);
    uint64_t x = (uint64_t)r[0] | (uint64_t)r[1] << 32;
    return bits >= 64 ? x : x & ((1ull << bits) - 1);
}

/* Nearest centroid (lowest id among equals) of every code, AV codes at a time held in AV / 8
 * vectors of 8: xor, popcount (vpopcntq where the CPU has it), compare and select. */
typedef int64_t v8l __attribute__((vector_size(64)));
static inline v8l popcount8(v8l x) {
#if defined(__AVX512VPOPCNTDQ__)
    return (v8l)_mm512_popcnt_epi64((__m512i)x);
#else
    for (int l = 0; l < 8; l++) x[l] = __builtin_popcountll((uint64_t)x[l]);
    return x;
#endif
}
static inline v8l min8(v8l a, v8l b) {
#if defined(__AVX512F__)
    return (v8l)_mm512_min_epi64((__m512i)a, (__m512i)b);
#else
    v8l lt = a < b;
    return (lt & a) | (~lt & b);
#endif
}
/* o[b] += sg * bit b of h, b < 64, sg = +-1 (vectorises as shifts by a lane index). */
static inline void add_bits(int32_t *o, uint64_t h, int32_t sg) {
    uint32_t lo = (uint32_t)h, hi = (uint32_t)(h >> 32);
    for (int l = 0; l < 32; l++) o[l] += sg * (int32_t)((lo >> l) & 1);
    for (int l = 0; l < 32; l++) o[32 + l] += sg * (int32_t)((hi >> l) & 1);
}

/* The members' counts of a clustering: cnt[c] and the number of members with bit b set,
 * ones[c][b]. */
typedef struct kcounts {
    int32_t *cnt, *ones;
} kcounts;

/* Point i (code h) moves from cluster from to cluster to: the counts follow. */
static inline void kcounts_move(const kcounts *k, uint64_t h, int32_t from, int32_t to) {
    k->cnt[from]--, k->cnt[to]++;
    add_bits(k->ones + (size_t)from * 64, h, -1);
    add_bits(k->ones + (size_t)to * 64, h, 1);
}

enum { AV = 32, AU = AV / 8 };
/* For the codes of points pts[0..np) (all points 0..np-1 when pts is NULL): the nearest among
 * centroids cl[0..nc) (ids in increasing order), lowest id among equals, compared as keys
 * (distance << 32 | id); with keep = 1 the current assignment asg[i] competes too. With kc,
 * asg holds an assignment that kc counts, and kc follows each point that changes cluster. */
static void assign_list(const uint64_t *hash, const int32_t *pts, int np, const uint64_t *cent,
                        const int32_t *cl, int nc, int keep, int32_t *asg, const kcounts *kc) {
    for (int i0 = 0; i0 < np; i0 += AV) {
        int nb = EF_MIN(AV, np - i0);
        v8l x[AU], best[AU];
        for (int u = 0; u < AU; u++)
            for (int l = 0; l < 8; l++) {
                int r = 8 * u + l, i = r < nb ? (pts ? pts[i0 + r] : i0 + r) : -1;
                uint64_t h = i >= 0 ? hash[i] : 0;
                x[u][l] = (int64_t)h;
                best[u][l] = keep && i >= 0
                                 ? (int64_t)__builtin_popcountll(h ^ cent[asg[i]]) << 32 | asg[i]
                                 : (int64_t)65 << 32;
            }
        for (int j = 0; j < nc; j++) {
            v8l cc = (v8l){0} + (int64_t)cent[cl[j]], cv = (v8l){0} + cl[j];
#pragma GCC unroll 4
            for (int u = 0; u < AU; u++) {
                best[u] = min8(best[u], popcount8(x[u] ^ cc) << 32 | cv);
            }
        }
        for (int r = 0; r < nb; r++) {
            int i = pts ? pts[i0 + r] : i0 + r;
            int32_t c = (int32_t)(best[r / 8][r % 8] & 0xffffffff);
            if (kc && c != asg[i]) kcounts_move(kc, hash[i], asg[i], c);
            asg[i] = c;
        }
    }
}

/* The nearest centroid of every code, given that only the centroids flagged in chg moved since
 * asg was computed (chg = NULL: all, or no earlier assignment). A code whose centroid did not
 * move was nearest to it among all the centroids that did not move either, so only the moved
 * ones can take it (the keys keep the lowest-id rule); a code whose centroid moved is scanned
 * against all. Exactly the assignment of a full scan; lists use `pts` (n ints) and `cl` (C).
 * kc (or NULL) as assign_list's. */
static void assign_all(const uint64_t *hash, int n, const uint64_t *cent, int C, const char *chg,
                       int32_t *asg, int32_t *pts, int32_t *cl, const kcounts *kc) {
    int nc = 0;
    for (int c = 0; c < C; c++)
        if (!chg || chg[c]) cl[nc++] = c;
    if (!chg || nc == C) {
        for (int c = 0; c < C; c++) cl[c] = c;
        assign_list(hash, NULL, n, cent, cl, C, 0, asg, kc);
        return;
    }
    if (nc == 0) return;
    int nf = 0, np = n;
    for (int i = 0; i < n; i++) { /* moved: from the front; kept: from the back */
        int m = chg[asg[i]] != 0;
        pts[m ? nf : np - 1] = i;
        nf += m, np -= !m;
    }
    int32_t *all = cl + nc; /* the full list after the moved ones */
    for (int c = 0; c < C; c++) all[c] = c;
    assign_list(hash, pts + np, n - np, cent, cl, nc, 1, asg, kc);
    assign_list(hash, pts, nf, cent, all, C, 0, asg, kc);
}

/* Test hook (declared again in tests/test_clustered.c; not part of the API). Lloyd's k-means
 * of n codes of `bits` bits into 1 <= C <= n clusters, draws from (seed, stream). Writes the
 * final assignment, the centroids and the member counts; work holds n + 67 C ints. */
void ef_clustered_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt,
                         int32_t *work);
void ef_clustered_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt,
                         int32_t *work) {
    int32_t *perm = work, *ones = work + n, *cl = ones + (size_t)64 * C;
    char *chg = (char *)(cl + 2 * (size_t)C), *moved = NULL; /* C bytes: centroid c moved */
    /* C distinct positions: partial Fisher-Yates shuffle */
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = 0; i < C; i++) {
        uint32_t r[4];
        ef_rng_raw(seed, stream, (uint64_t)i, r);
        int j = i + (int)(r[0] % (uint32_t)(n - i));
        int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
        cent[i] = hash[perm[i]];
    }
    /* the counts: from scratch after the first assignment, then moved along with the points
     * that change cluster (integers: the same counts) */
    kcounts kc = {cnt, ones};
    for (int it = 0; it < iters; it++) {
        assign_all(hash, n, cent, C, moved, asg, perm, cl, moved ? &kc : NULL);
        if (!moved) {
            memset(cnt, 0, sizeof(int32_t) * C);
            memset(ones, 0, sizeof(int32_t) * C * 64);
            for (int i = 0; i < n; i++) {
                int c = asg[i];
                cnt[c]++;
                add_bits(ones + (size_t)c * 64, hash[i], 1);
            }
        }
        for (int c = 0; c < C; c++) {
            uint64_t h = 0;
            if (!cnt[c])
                h = random_code(seed, stream, (uint64_t)C + (uint64_t)it * C + c, bits);
            else /* majority: bit b when 2 ones_b > cnt (64 lanes; ones past bits are 0) */
                for (int u = 0; u < 64 / EF_VL; u++) {
                    vi o;
                    memcpy(&o, ones + (size_t)c * 64 + u * EF_VL, sizeof o);
                    h |= (uint64_t)mask_bits(o + o > cnt[c]) << (u * EF_VL);
                }
            chg[c] = h != cent[c];
            cent[c] = h;
        }
        moved = chg;
    }
    assign_all(hash, n, cent, C, moved, asg, perm, cl, moved ? &kc : NULL);
    if (!moved) {
        memset(cnt, 0, sizeof(int32_t) * C);
        for (int i = 0; i < n; i++) cnt[asg[i]]++;
    }
}

/* Clusters the nv valid queries of head (b, h) into C clusters: w->asg[0..nv), w->cnt. */
static void cluster_head(const ef_attn *a, cwork *w, const float *q, int64_t bh, int nv, int C) {
    const cplan *p = a->impl;
    int d = a->shape.head_dim, h = (int)(bh % a->shape.heads);
    const float *planes = p->planes + (size_t)h * PLANE_ROW * d, *pn = p->pnorm + h * PLANE_ROW;
    for (int i0 = 0; i0 < nv; i0 += HB)
        hash_block(q + (size_t)i0 * d, EF_MIN(HB, nv - i0), d, planes, pn, p->bits, w->hs,
                   w->hash + i0);
    ef_clustered_kmeans(w->hash, nv, p->bits, C, p->iters, a->seed, STREAM_KMEANS | (uint64_t)bh,
                        w->asg, w->cent, w->cnt, w->kw);
}

/* Indices of the k best values of s[0..n) (larger first, ties to the lower index), written to
 * idx in increasing index order. */
static int better(const float *s, int x, int y) { return s[x] > s[y] || (s[x] == s[y] && x < y); }

/* One candidate j for a min-heap idx[0..*size) of at most k on "better" (the root is the worst
 * kept). */
static void heap_offer(const float *s, int j, int k, int32_t *idx, int *size) {
    int pos;
    if (*size < k) {
        pos = (*size)++;
        while (pos > 0 && better(s, idx[(pos - 1) / 2], j)) {
            idx[pos] = idx[(pos - 1) / 2];
            pos = (pos - 1) / 2;
        }
        idx[pos] = j;
        return;
    }
    if (!better(s, j, idx[0])) return;
    pos = 0;
    for (;;) {
        int l = 2 * pos + 1, r = l + 1, m = pos;
        int cur = j;
        if (l < *size && better(s, cur, idx[l])) m = l, cur = idx[l];
        if (r < *size && better(s, cur, idx[r])) m = r;
        if (m == pos) break;
        idx[pos] = idx[m];
        pos = m;
    }
    idx[pos] = j;
}

/* r[i] = the rank of x[i] among x[0..m) (larger first, ties to the lower position): the count of
 * j with x[j] > x[i], or x[j] == x[i] and j < i. No NaN; x holds m rounded up to EF_VL floats,
 * -inf past m. Vectors of EF_VL i against each x[j] broadcast: m^2 / EF_VL steps, no branch. */
static void ranks(const float *x, int m, int32_t *r) {
    for (int i0 = 0; i0 < m; i0 += EF_VL) {
        vf xi = vf_loadu(x + i0);
        vi pos = vi_iota() + i0, cnt = pos - pos;
        for (int j = 0; j < m; j++) {
            vf xj = vf_set1(x[j]);
            cnt -= (xj > xi) | ((xj == xi) & (pos > j)); /* true lanes are -1 */
        }
        memcpy(r + i0, &cnt, sizeof cnt);
    }
}

/* The k best keys are among the candidates, the keys at or above some lower bound t0 of the k-th
 * best value. t0 is the k-th largest of G ~ 2k group maxima (disjoint groups: lane l of the
 * vectors of block b; each maximum is the value of a key of its group, so k keys are at least
 * t0). With Gaussian logits, 4096 keys and k = 32, a few dozen keys are candidates. They are
 * ranked against each other (ranks above), and those of rank < k kept, in index order: no
 * branch per key or per comparison (a heap and a quickselect spent most of their time on
 * mispredicted branches). Past TK_RANK candidates (many ties), or with NaN logits, a heap in
 * index order, which keeps the same keys. */
enum { TK_GROUPS = 128, TK_RANK = 512 };

/* The candidates >= t0 of s[0..n) ranked; 0 (nothing written) past TK_RANK of them or with a NaN
 * among them. */
static int topk_ranked(const float *s, int n, int k, float t0, int32_t *idx) {
    float cv[TK_RANK + EF_VL];
    int32_t ci[TK_RANK + EF_VL], rk[TK_RANK + EF_VL];
    int m = 0, j = 0, kept = 0, nan = 0;
    vf th = vf_set1(t0);
    for (; j + EF_VL <= n; j += EF_VL) {
        if (j + 4 * EF_VL <= n) { /* most keys are not candidates: 4 vectors per test */
            vi below = (vf_loadu(s + j) < th) & (vf_loadu(s + j + EF_VL) < th) &
                       (vf_loadu(s + j + 2 * EF_VL) < th) & (vf_loadu(s + j + 3 * EF_VL) < th);
            if (!mask_bits(~below)) {
                j += 3 * EF_VL;
                continue;
            }
        }
        uint32_t in = mask_bits(~(vf_loadu(s + j) < th)); /* >= t0, or NaN */
        if (!in) continue;
        if (m + __builtin_popcount(in) > TK_RANK) return 0;
        for (; in; in &= in - 1) ci[m] = j + __builtin_ctz(in), cv[m] = s[ci[m]], m++;
    }
    for (; j < n; j++)
        if (!(s[j] < t0)) {
            if (m == TK_RANK) return 0;
            ci[m] = j, cv[m++] = s[j];
        }
    for (int x = 0; x < m; x++) nan |= cv[x] != cv[x];
    if (nan) return 0;
    vf_storeu(cv + m, vf_set1(-__builtin_inff())); /* the last vector's lanes past m */
    ranks(cv, m, rk);
    for (int x = 0; x < m; x++) {
        ci[kept] = ci[x]; /* kept <= x: in place */
        kept += rk[x] < k;
    }
    if (kept != k) return 0; /* cannot happen: k keys are at least t0, and no NaN */
    memcpy(idx, ci, sizeof(int32_t) * (size_t)k);
    return 1;
}

static void topk_select(const float *s, int n, int k, int32_t *idx) {
    int size = 0, nb = EF_MIN((2 * k + EF_VL - 1) / EF_VL, TK_GROUPS / EF_VL);
    float t0 = -__builtin_inff();
    if (nb * EF_VL >= k && nb <= n / (2 * EF_VL)) { /* else every key is a candidate */
        float gm[TK_GROUPS];
        int32_t gr[TK_GROUPS];
        int per = n / EF_VL / nb * EF_VL, nan = 0; /* block length, a multiple of EF_VL */
        for (int b = 0; b < nb; b++) {
            vf m = vf_loadu(s + b * per), m1 = m, m2 = m, m3 = m; /* 4 chains */
            int j = b * per + EF_VL, e = (b + 1) * per;
            for (; j + 4 * EF_VL <= e; j += 4 * EF_VL) {
                m = vf_max(m, vf_loadu(s + j)), m1 = vf_max(m1, vf_loadu(s + j + EF_VL));
                m2 = vf_max(m2, vf_loadu(s + j + 2 * EF_VL));
                m3 = vf_max(m3, vf_loadu(s + j + 3 * EF_VL));
            }
            for (; j < e; j += EF_VL) m = vf_max(m, vf_loadu(s + j));
            m = vf_max(vf_max(m, m1), vf_max(m2, m3));
            nan |= mask_bits(m != m) != 0;
            memcpy(gm + b * EF_VL, &m, sizeof m);
        }
        if (!nan) { /* NaN logits (NaN inputs): no bound */
            ranks(gm, nb * EF_VL, gr);
            for (int g = 0; g < nb * EF_VL; g++)
                if (gr[g] == k - 1) t0 = gm[g]; /* the k-th largest */
            if (2 * k <= TK_RANK && topk_ranked(s, n, k, t0, idx)) return;
        }
    }
    int j = 0;
    for (; j + EF_VL <= n; j += EF_VL) {
        float th = size == k ? EF_MAX(t0, s[idx[0]]) : t0;
        uint32_t in = mask_bits(~(vf_loadu(s + j) < vf_set1(th))); /* >= th, or NaN */
        for (; in; in &= in - 1) heap_offer(s, j + __builtin_ctz(in), k, idx, &size);
    }
    for (; j < n; j++) heap_offer(s, j, k, idx, &size);
    if (size < k) /* only with NaN logits, which the filter may have skipped: every key */
        for (j = size = 0; j < n; j++) heap_offer(s, j, k, idx, &size);
    if (size > 64) {
        qsort(idx, (size_t)size, sizeof(int32_t), ef_cmp_i32);
        return;
    }
    for (int x = 1; x < size; x++) { /* insertion sort: a few dozen indices */
        int32_t v = idx[x];
        int y = x;
        for (; y > 0 && idx[y - 1] > v; y--) idx[y] = idx[y - 1];
        idx[y] = v;
    }
}

/* Test hook (declared again in tests/test_clustered.c; not part of the API): the fast path's
 * top-k selection of s[0..n), 1 <= k <= n, into idx (increasing). */
void ef_clustered_topk(const float *s, int n, int k, int32_t *idx);
void ef_clustered_topk(const float *s, int n, int k, int32_t *idx) { topk_select(s, n, k, idx); }

/* ---------------------------------------------------------------------------------------------
 * Fast path
 * ------------------------------------------------------------------------------------------- */
typedef struct cctx {
    ef_attn *a;
    const ef_attn_io *io;
    void *saved;
    const float *dout;
    float *dq, *dk, *dv;
    int replay; /* forward: reuse the assignment and top-k sets in saved (ef_attn_forward_replay) */
} cctx;

static size_t clu_saved_bytes(const ef_attn *a) {
    const cplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads *
           ((size_t)a->shape.q_len + (size_t)p->C * p->K) * sizeof(int32_t);
}

/* The saved block of head bh: assignment [N], then top-k keys [C][K]. */
static int32_t *saved_head(const ef_attn *a, const void *saved, int64_t bh) {
    const cplan *p = a->impl;
    size_t per = (size_t)a->shape.q_len + (size_t)p->C * p->K;
    return (int32_t *)saved + (size_t)bh * per;
}

/* Checks head bh's record in `saved` against this call's lengths before anything indexes with
 * it: the cluster of each valid query in [0, C), each cluster's top-k keys strictly increasing
 * in [0, kv_lens[b]) (a forward writes them sorted, each once). exact = 1 (replay, which
 * rewrites the record from what it reads) also asks for -1 wherever a forward with these
 * lengths writes -1 (padded rows, slots past k, clusters >= C), so that a record made with other
 * lengths is refused too. Shared by both paths (the reference saves the same record). */
static ef_status check_choices(const ef_attn *a, const int32_t *sa, int64_t bh, int nv, int mv,
                               int exact) {
    const cplan *p = a->impl;
    int n = a->shape.q_len, K = p->K, has = nv > 0 && mv > 0;
    int C = EF_MIN(p->C, nv), kb = EF_MIN(p->topk, mv);
    int b = (int)(bh / a->shape.heads), h = (int)(bh % a->shape.heads);
    for (int i = 0; i < n; i++) {
        int used = has && i < nv;
        if (used ? sa[i] < 0 || sa[i] >= C : exact && sa[i] != -1)
            return ef_error(EF_ERR_ARG,
                            "saved holds cluster %d for %s query %d (batch %d, head %d; want %s, "
                            "q_lens %d, kv_lens %d): not this plan's forward record for these "
                            "lengths",
                            (int)sa[i], used ? "valid" : "padded", i, b, h,
                            used ? "[0, min(clusters, q_lens))" : "-1", nv, mv);
    }
    for (int c = 0; c < p->C * p->improved; c++)
        for (int x = 0; x < K; x++) {
            int32_t j = sa[n + (size_t)c * K + x];
            int used = has && c < C && x < kb;
            int bad = used ? j < 0 || j >= mv || (x > 0 && j <= sa[n + (size_t)c * K + x - 1])
                           : exact && j != -1;
            if (bad)
                return ef_error(EF_ERR_ARG,
                                "saved holds key %d in slot %d of cluster %d's top-k set (batch "
                                "%d, head %d; want %s, kv_lens %d): not this plan's forward "
                                "record for these lengths",
                                (int)j, x, c, b, h, used ? "increasing keys in [0, kv_lens)" : "-1",
                                mv);
        }
    return EF_OK;
}

/* The assignment (w->asg, w->cnt) and top-k sets (w->tk) of a record check_choices accepted. */
static void load_choices(const ef_attn *a, cwork *w, const int32_t *sa, int nv, int C) {
    const cplan *p = a->impl;
    memset(w->cnt, 0, sizeof(int32_t) * C);
    for (int i = 0; i < nv; i++) w->asg[i] = sa[i], w->cnt[sa[i]]++;
    if (p->improved) memcpy(w->tk, sa + a->shape.q_len, sizeof(int32_t) * C * p->K);
}



/* y[0..n) = b + s x (unaligned rows). */
static void mul_add_row(float *y, const float *b, const float *x, float s, int n) {
    int nf = n / EF_VL * EF_VL;
    vf vs = vf_set1(s);
    for (int j = 0; j < nf; j += EF_VL) vf_storeu(y + j, vf_loadu(b + j) + vs * vf_loadu(x + j));
    for (int j = nf; j < n; j++) y[j] = b[j] + s * x[j];
}

/* Softmax backward of one row in place: dA <- A o (dA - sum_j A_j dA_j); the sum in EF_VL lanes
 * added in a fixed order. */
static void softmax_backward_row(const float *A, float *dA, int n) {
    int nf = n / EF_VL * EF_VL;
    vf vs = vf_set1(0);
    for (int j = 0; j < nf; j += EF_VL) vs += vf_loadu(A + j) * vf_loadu(dA + j);
    float dl = 0;
    for (int j = nf; j < n; j++) dl += A[j] * dA[j];
    dl += vf_hsum(vs);
    vf vd = vf_set1(dl);
    for (int j = 0; j < nf; j += EF_VL)
        vf_storeu(dA + j, vf_loadu(A + j) * (vf_loadu(dA + j) - vd));
    for (int j = nf; j < n; j++) dA[j] = A[j] * (dA[j] - dl);
}

/* Qc = mean of the members among the nv valid queries (rows of empty clusters are zero). */
static void centroids(const ef_attn *a, cwork *w, const float *q, int nv, int C) {
    int d = a->shape.head_dim;
    memset(w->qc, 0, sizeof(float) * C * d);
    for (int i = 0; i < nv; i++) ef_row_axpy(w->qc + (size_t)w->asg[i] * d, 1, q + (size_t)i * d, d);
    for (int c = 0; c < C; c++) {
        float inv = w->cnt[c] ? 1.0f / (float)w->cnt[c] : 0;
        for (int t = 0; t < d; t++) w->qc[(size_t)c * d + t] *= inv;
    }
}

/* S = scale Qc K^T over keys [0, mv) (C x mv, row stride M). */
static ef_status centroid_logits(const ef_attn *a, cwork *w, const float *k, int C, int mv) {
    int m = a->shape.kv_len, d = a->shape.head_dim;
    return ef_sgemm(0, 1, C, mv, d, a->scale, w->qc, d, k, d, 0, w->S, m);
}

/* Softmax of one row of s x[0..n) in place (unaligned), vectorised: max, exp and the sum in
 * EF_VL lanes (added in a fixed order), then the normalisation; with inv_out != NULL the row is
 * left unnormalised, exp(s x - max), and 1 / sum is written there instead. */
static void softmax_row(float *x, int n, float s, float *inv_out) {
    int nf = n / EF_VL * EF_VL;
    vf vm = vf_set1(-__builtin_inff()), vs = vf_set1(s);
    if (s != 1) {
        for (int j = 0; j < nf; j += EF_VL) vf_storeu(x + j, vf_loadu(x + j) * vs);
        for (int j = nf; j < n; j++) x[j] *= s;
    }
    for (int j = 0; j < nf; j += EF_VL) vm = vf_max(vm, vf_loadu(x + j));
    float mx = vf_hmax(vm);
    for (int j = nf; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    vf sum_v = vf_set1(0), m = vf_set1(mx);
    for (int j = 0; j < nf; j += EF_VL) {
        vf e = vf_exp(vf_loadu(x + j) - m);
        vf_storeu(x + j, e);
        sum_v += e;
    }
    float sum = 0;
    for (int j = nf; j < n; j++) x[j] = ef_expf(x[j] - mx), sum += x[j];
    sum += vf_hsum(sum_v);
    float inv = 1 / sum;
    if (inv_out) {
        *inv_out = inv;
        return;
    }
    vf vi_ = vf_set1(inv);
    for (int j = 0; j < nf; j += EF_VL) vf_storeu(x + j, vf_loadu(x + j) * vi_);
    for (int j = nf; j < n; j++) x[j] *= inv;
}

/* Row softmax of S in place: A. */
static void centroid_softmax(const ef_attn *a, cwork *w, int C, int mv) {
    int m = a->shape.kv_len;
    for (int c = 0; c < C; c++) softmax_row(w->S + (size_t)c * m, mv, 1, NULL);
}

/* Top-kb of centroid row c (logits ordered as the probabilities) into w->tk; the slots of a
 * row past kb are -1 (they go to `saved`, which is written in full). */
static void select_topk(const cplan *p, cwork *w, int c, const float *row, int mv, int kb) {
    int32_t *tk = w->tk + (size_t)c * p->K;
    topk_select(row, mv, kb, tk);
    for (int x = kb; x < p->K; x++) tk[x] = -1;
}

/* Members of every cluster in increasing query order: order[off[c] .. off[c+1]). */
static void sort_members(cwork *w, int nv, int C) {
    w->off[0] = 0;
    for (int c = 0; c < C; c++) w->off[c + 1] = w->off[c] + w->cnt[c];
    for (int c = 0; c < C; c++) w->cur[c] = w->off[c];
    for (int i = 0; i < nv; i++) w->order[w->cur[w->asg[i]]++] = i;
}

/* Rows rows[0..nr) of x (n floats each, stride n) into dst (row stride ld >= n). */
static void gather(float *dst, int ld, const float *x, int n, const int32_t *rows, int nr) {
    for (int r = 0; r < nr; r++) { /* short rows: an inline copy, not a call to memcpy each */
        float *o = dst + (size_t)r * ld;
        const float *s = x + (size_t)rows[r] * n;
        int t = 0;
        for (; t + EF_VL <= n; t += EF_VL) vf_storeu(o + t, vf_loadu(s + t));
        for (; t < n; t++) o[t] = s[t];
    }
}

/* P (nr x kb, row stride Kp) = row softmax of scale Qm KT^T, with ef_tile_gemm. */
static void top_softmax(const ef_attn *a, cwork *w, int nr, int kb) {
    const cplan *p = a->impl;
    ef_tile_gemm(nr, a->shape.head_dim, p->Kp, w->qm, p->dp, 1, w->ktT, p->Kp, w->P, p->Kp, 0);
    for (int r = 0; r < nr; r++) {
        softmax_row(w->P + (size_t)r * p->Kp, kb, a->scale, NULL);
    }
}

/* Gathers the top keys and values of a cluster into kt [kb][Dp], ktT [D][Kp], vt [kb][Dvp], and
 * for backward (all = 1) vtT [Dv][Kp]: whole rows first (random rows of k and v miss the cache;
 * row copies overlap the misses), then the transposes from L1. */
static void gather_top(const ef_attn *a, cwork *w, const int32_t *tk, int kb, const float *k,
                       const float *v, int all) {
    const cplan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim;
    gather(w->kt, p->dp, k, d, tk, kb);
    ef_tile_pack_t(w->ktT, p->Kp, w->kt, p->dp, d, kb, kb, 1.0f);
    gather(w->vt, p->dvp, v, dv, tk, kb);
    if (all) ef_tile_pack_t(w->vtT, p->Kp, w->vt, p->dvp, dv, kb, kb, 1.0f);
}

static ef_status forward_head(const cctx *cx, cwork *w, int64_t bh) {
    ef_attn *a = cx->a;
    const ef_attn_io *io = cx->io;
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int b = (int)(bh / s->heads);
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, K = p->K;
    int nv = ef_attn_q_valid(a, io, b), mv = ef_attn_kv_valid(a, io, b);
    int C = EF_MIN(p->C, nv), kb = EF_MIN(p->topk, mv);
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * dv;
    float *out = io->out + (size_t)bh * n * dv;
    int32_t *sa = cx->saved ? saved_head(a, cx->saved, bh) : NULL;
    ef_status st;
    /* the discrete choices: made below from q and k (forward), or read here from the record of
     * an earlier forward (replay); everything else is the same code */
    if (cx->replay) {
        if ((st = check_choices(a, sa, bh, nv, mv, 1))) return st;
        if (nv > 0 && mv > 0) load_choices(a, w, sa, nv, C);
    }
    if (sa) /* padded rows, unused top-k slots and clusters >= C stay -1 */
        for (size_t x = 0; x < (size_t)n + (size_t)p->C * K; x++) sa[x] = -1;
    memset(out + (size_t)nv * dv, 0, sizeof(float) * (n - nv) * dv);
    if (nv == 0 || mv == 0) {
        memset(out, 0, sizeof(float) * nv * dv);
        return EF_OK;
    }
    if (!cx->replay) cluster_head(a, w, q, bh, nv, C);
    if (sa) memcpy(sa, w->asg, sizeof(int32_t) * nv);
    centroids(a, w, q, nv, C);
    if ((st = centroid_logits(a, w, k, C, mv))) return st;
    /* row by row, while the row is in cache (S is C x M, larger than L2): its top keys from
     * the logits, then E = exp(S - rowmax), unnormalised (A = E / rowsum): the 1 / rowsum scale
     * the C x Dv products instead of the C x M probabilities */
    for (int c = 0; c < C; c++) {
        float *row = w->S + (size_t)c * m;
        if (p->improved && !cx->replay) select_topk(p, w, c, row, mv, kb);
        softmax_row(row, mv, 1, w->rinv + c);
        if (p->improved) { /* the mass of the top keys, then the row without them (below) */
            const int32_t *tk = w->tk + (size_t)c * K;
            double ms = 0;
            for (int x = 0; x < kb; x++) ms += row[tk[x]], row[tk[x]] = 0;
            w->mass[c] = (float)(ms * w->rinv[c]);
        }
    }
    if (!p->improved) {
        if ((st = ef_sgemm(0, 0, C, dv, mv, 1, w->S, m, v, dv, 0, w->vb, dv))) return st;
        for (int c = 0; c < C; c++) ef_row_scale(w->vb + (size_t)c * dv, w->rinv[c], dv);
        for (int i = 0; i < nv; i++)
            memcpy(out + (size_t)i * dv, w->vb + (size_t)w->asg[i] * dv, sizeof(float) * dv);
        return EF_OK;
    }
    if (sa) memcpy(sa + n, w->tk, sizeof(int32_t) * C * K);
    /* bottom part: the centroid attention without the top keys */
    if ((st = ef_sgemm(0, 0, C, dv, mv, 1, w->S, m, v, dv, 0, w->vb, dv))) return st;
    for (int c = 0; c < C; c++) ef_row_scale(w->vb + (size_t)c * dv, w->rinv[c], dv);
    /* top part, per cluster in blocks of RB members: out = m_c P V_T + Vb_c */
    sort_members(w, nv, C);
    for (int c = 0; c < C; c++) {
        const int32_t *tk = w->tk + (size_t)c * K;
        if (!w->cnt[c]) continue;
        gather_top(a, w, tk, kb, k, v, 0);
        for (int r0 = w->off[c]; r0 < w->off[c + 1]; r0 += RB) {
            const int32_t *rows = w->order + r0;
            int nr = EF_MIN(RB, w->off[c + 1] - r0);
            gather(w->qm, p->dp, q, d, rows, nr);
            top_softmax(a, w, nr, kb);
            ef_tile_gemm(nr, kb, p->dvp, w->P, p->Kp, 1, w->vt, p->dvp, w->om, p->dvp, 0);
            const float *vb = w->vb + (size_t)c * dv;
            for (int r = 0; r < nr; r++)
                mul_add_row(out + (size_t)rows[r] * dv, vb, w->om + (size_t)r * p->dvp, w->mass[c], dv);
        }
    }
    return EF_OK;
}

/* Parallel loops over (batch, head): a failing item records its status and message in its
 * thread's slot (the message is thread-local); the caller reports the first slot that failed. */
static void slots_reset(ef_attn *a, int threads) {
    cplan *p = a->impl;
    for (int t = 0; t < threads; t++) p->ws[t].st = EF_OK, p->ws[t].msg[0] = 0;
}

static void slot_fail(cwork *w, ef_status st) {
    if (w->st) return;
    w->st = st;
    snprintf(w->msg, sizeof w->msg, "%s", ef_last_error());
}

static ef_status slots_status(const ef_attn *a, int threads) {
    const cplan *p = a->impl;
    for (int t = 0; t < threads; t++)
        if (p->ws[t].st) return ef_error(p->ws[t].st, "%s: %s", a->ops->name, p->ws[t].msg);
    return EF_OK;
}

static void forward_item(void *vctx, int64_t bh, int tid) {
    const cctx *cx = vctx;
    cwork *w = &((cplan *)cx->a->impl)->ws[tid];
    if (w->st) return;
    int old = ef_gemm_local_threads(1);
    ef_status st = forward_head(cx, w, bh);
    ef_gemm_local_threads(old);
    if (st) slot_fail(w, st);
}

static ef_status run_forward(ef_attn *a, const ef_attn_io *io, void *saved, int replay) {
    cctx c = {.a = a, .io = io, .saved = saved, .replay = replay};
    int threads = ef_attn_threads(a);
    slots_reset(a, threads);
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, threads, forward_item, &c);
    return slots_status(a, threads);
}

static ef_status clu_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    return run_forward(a, io, saved, 0);
}

/* Forward with the clusters and top-k sets of the earlier forward recorded in saved (a
 * reversible layer's recomputation): centroids, attention and outputs from io. */
static ef_status clu_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    if (!saved)
        return ef_error(EF_ERR_ARG,
                        "%s: replay needs the record of an earlier forward (saved is NULL)",
                        a->ops->name);
    return run_forward(a, io, saved, 1);
}

/* Backward of the top part of iclustered, out_i += m_c sum_x P_ix v_x:
 *   D1 = dO V_T^T;  dm_c += sum P o D1;  dP = m_c D1;  dS = P o (dP - rowsum(P o dP))
 *   dV_T += m_c P^T dO;  dq += scale dS K_T;  dK_T += scale dS^T Q  (scattered to the keys). */
static ef_status top_backward(const ef_attn *a, cwork *w, const float *q, const float *k,
                              const float *v, const float *g, int nv, int C, int kb, float *dq,
                              float *dk, float *dvv) {
    const cplan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim, K = p->K;
    sort_members(w, nv, C);
    for (int c = 0; c < C; c++) {
        const int32_t *tk = w->tk + (size_t)c * K;
        w->dm[c] = 0;
        if (!w->cnt[c]) continue;
        gather_top(a, w, tk, kb, k, v, 1);
        float mc = w->mass[c];
        double dm = 0;
        int Kp = p->Kp, dp = p->dp, dvp = p->dvp;
        for (int r0 = w->off[c]; r0 < w->off[c + 1]; r0 += RB) {
            const int32_t *rows = w->order + r0;
            int nr = EF_MIN(RB, w->off[c + 1] - r0), acc = r0 > w->off[c];
            gather(w->qm, dp, q, d, rows, nr);
            gather(w->gm, dvp, g, dv, rows, nr);
            top_softmax(a, w, nr, kb);
            /* D1 = dO V_T^T, then dS (without tau) in place */
            ef_tile_gemm(nr, dv, Kp, w->gm, dvp, 1, w->vtT, Kp, w->D1, Kp, 0);
            for (int r = 0; r < nr; r++) {
                const float *pr = w->P + (size_t)r * Kp;
                float *ds = w->D1 + (size_t)r * Kp, delta = 0;
                for (int x = 0; x < kb; x++) delta += pr[x] * ds[x];
                dm += delta;
                for (int x = 0; x < kb; x++) ds[x] = pr[x] * (ds[x] - delta) * mc;
            }
            /* dvt (+)= P^T dO, dkt (+)= dS^T Qm (mc and tau applied at the scatter); dq += tau dS K_T */
            ef_tile_gemm(kb, nr, dvp, w->P, 1, Kp, w->gm, dvp, w->dvt, dvp, acc);
            ef_tile_gemm(kb, nr, dp, w->D1, 1, Kp, w->qm, dp, w->dkt, dp, acc);
            ef_tile_gemm(nr, kb, dp, w->D1, Kp, 1, w->kt, dp, w->om, dp, 0);
            for (int r = 0; r < nr; r++)
                ef_row_axpy(dq + (size_t)rows[r] * d, a->scale, w->om + (size_t)r * dp, d);
        }
        w->dm[c] = (float)dm;
        for (int x = 0; x < kb; x++) {
            ef_row_axpy(dk + (size_t)tk[x] * d, a->scale, w->dkt + (size_t)x * dp, d);
            ef_row_axpy(dvv + (size_t)tk[x] * dv, mc, w->dvt + (size_t)x * dvp, dv);
        }
    }
    return EF_OK;
}

static ef_status backward_head(const cctx *cx, cwork *w, int64_t bh) {
    ef_attn *a = cx->a;
    const ef_attn_io *io = cx->io;
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int b = (int)(bh / s->heads);
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, K = p->K;
    int nv = ef_attn_q_valid(a, io, b), mv = ef_attn_kv_valid(a, io, b);
    int C = EF_MIN(p->C, nv), kb = EF_MIN(p->topk, mv);
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * dv, *g = cx->dout + (size_t)bh * n * dv;
    float *dq = cx->dq + (size_t)bh * n * d, *dk = cx->dk + (size_t)bh * m * d,
          *dvv = cx->dv + (size_t)bh * m * dv;
    ef_status st;
    memset(dq, 0, sizeof(float) * n * d);
    memset(dk, 0, sizeof(float) * m * d);
    memset(dvv, 0, sizeof(float) * m * dv);
    if (nv == 0 || mv == 0) return EF_OK;
    const int32_t *sa = saved_head(a, cx->saved, bh);
    if ((st = check_choices(a, sa, bh, nv, mv, 0))) return st;
    load_choices(a, w, sa, nv, C);
    /* A, and the masses m_c of the top keys */
    centroids(a, w, q, nv, C);
    if ((st = centroid_logits(a, w, k, C, mv))) return st;
    centroid_softmax(a, w, C, mv);
    if (p->improved) {
        for (int c = 0; c < C; c++) {
            const float *A = w->S + (size_t)c * m;
            const int32_t *tk = w->tk + (size_t)c * K;
            double ms = 0;
            for (int x = 0; x < kb; x++) ms += A[tk[x]];
            w->mass[c] = (float)ms;
        }
        if ((st = top_backward(a, w, q, k, v, g, nv, C, kb, dq, dk, dvv))) return st;
    }
    /* G_c = sum of member dO; dA = G V^T (top columns: dm_c); dS = A (dA - rowsum(A dA)) */
    memset(w->G, 0, sizeof(float) * C * dv);
    for (int i = 0; i < nv; i++) ef_row_axpy(w->G + (size_t)w->asg[i] * dv, 1, g + (size_t)i * dv, dv);
    if ((st = ef_sgemm(0, 1, C, mv, dv, 1, w->G, dv, v, dv, 0, w->dP, m))) return st;
    for (int c = 0; c < C; c++) {
        float *A = w->S + (size_t)c * m, *dA = w->dP + (size_t)c * m;
        const int32_t *tk = w->tk + (size_t)c * K;
        for (int x = 0; x < kb && p->improved; x++) dA[tk[x]] = w->dm[c];
        softmax_backward_row(A, dA, mv);
        /* V_bottom uses A without the top columns */
        for (int x = 0; x < kb && p->improved; x++) A[tk[x]] = 0;
    }
    if ((st = ef_sgemm(1, 0, mv, dv, C, 1, w->S, m, w->G, dv, 1, dvv, dv))) return st;
    if ((st = ef_sgemm(0, 0, C, d, mv, a->scale, w->dP, m, k, d, 0, w->dqc, d))) return st;
    if ((st = ef_sgemm(1, 0, mv, d, C, a->scale, w->dP, m, w->qc, d, 1, dk, d))) return st;
    for (int c = 0; c < C; c++) { /* dQc / |c| */
        float inv = w->cnt[c] ? 1.0f / (float)w->cnt[c] : 0;
        for (int t = 0; t < d; t++) w->dqc[(size_t)c * d + t] *= inv;
    }
    for (int i = 0; i < nv; i++) ef_row_axpy(dq + (size_t)i * d, 1, w->dqc + (size_t)w->asg[i] * d, d);
    return EF_OK;
}

static void backward_item(void *vctx, int64_t bh, int tid) {
    const cctx *cx = vctx;
    cwork *w = &((cplan *)cx->a->impl)->ws[tid];
    if (w->st) return;
    int old = ef_gemm_local_threads(1);
    ef_status st = backward_head(cx, w, bh);
    ef_gemm_local_threads(old);
    if (st) slot_fail(w, st);
}

static ef_status clu_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    cctx c = {.a = a, .io = io, .saved = (void *)saved, .dout = dout, .dq = dq, .dk = dk, .dv = dv};
    int threads = ef_attn_threads(a);
    slots_reset(a, threads);
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, threads, backward_item, &c);
    return slots_status(a, threads);
}

/* ---------------------------------------------------------------------------------------------
 * Reference path (ref=1): a scalar double-precision re-implementation with its own code and its
 * own workspace (allocated by clu_init for ref=1 plans; the fast path's is not even allocated).
 * It recomputes the codes, the Hamming k-means, the centroids, the top-k sets and the attention
 * of each (batch, head), one at a time, and records the choices in the fast path's layout;
 * backward (dout != NULL) and replay read them back (through check_choices and the layout
 * helpers, the only code shared with the fast path) and recompute everything else. What it shares
 * with the fast path is the specification of the discrete choices, so that both make the same ones:
 *   - the random draws: the hyperplanes (the same ef_rng_normal draw) and the k-means draws
 *     (initial positions by a partial Fisher-Yates shuffle, codes of empty clusters), from the
 *     same streams and counters;
 *   - code bits: the sign of q.a summed in double in increasing t; the products of two floats
 *     are exact in double, so both paths compute bitwise the same dot and the same bit;
 *   - ties: the nearest centroid in Hamming distance is the lowest id; a majority tie gives 0;
 *     among equal logits the top-k set prefers the lower key index.
 * The top-k sets are the one choice that is not made on identical numbers: the reference ranks
 * double-precision centroid logits, the fast path fp32 ones (differences ~1e-6 relative), so
 * two keys whose logits are that close at the k-th place could be ranked differently. The
 * tests would show it as an O(1) error; it does not occur in them.
 * ------------------------------------------------------------------------------------------- */
static size_t align64(size_t n) { return (n + 63) / 64 * 64; }
static size_t pad16(size_t n) { return (n + 15) / 16 * 16; }

/* Carves the reference workspace out of base (NULL: only counts); returns its bytes. */
static size_t ref_layout(const ef_attn *a, rws *r, char *base) {
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t C = p->C, K = EF_MAX(p->K, 1), n = s->q_len, m = s->kv_len, d = s->head_dim,
           e = s->v_dim, off = 0;
#define REF_PART(f, count)                                                                         \
    (r->f = base ? (void *)(base + off) : NULL, off += align64(sizeof *r->f * (count)))
    REF_PART(planes, (size_t)s->heads * p->bits * d);
    REF_PART(code, n);
    REF_PART(cent, C);
    REF_PART(asg, n);
    REF_PART(cnt, C);
    REF_PART(perm, n);
    REF_PART(tk, C * K);
    REF_PART(top, C * m);
    REF_PART(qc, C * d);
    REF_PART(lg, C * m);
    REF_PART(A, C * m);
    REF_PART(mass, C);
    REF_PART(vb, C * e);
    REF_PART(G, C * e);
    REF_PART(dm, C);
    REF_PART(dqc, C * d);
    REF_PART(gk, m * d);
    REF_PART(gv, m * e);
    REF_PART(gq, d);
    REF_PART(p, K);
    REF_PART(dp, K);
#undef REF_PART
    return off;
}

static uint64_t ref_code(const double *planes, const float *qi, int bits, int d) {
    uint64_t h = 0;
    for (int b = 0; b < bits; b++) {
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)qi[t] * planes[(size_t)b * d + t];
        if (dot > 0) h |= (uint64_t)1 << b;
    }
    return h;
}

static int ref_hamming(uint64_t x, uint64_t y, int bits) {
    int dist = 0;
    for (int b = 0; b < bits; b++) dist += (int)(((x >> b) ^ (y >> b)) & 1);
    return dist;
}

/* Nearest centroid of every code (lowest id on ties) and the member counts. */
static void ref_assign(rws *r, int nv, int C, int bits) {
    for (int c = 0; c < C; c++) r->cnt[c] = 0;
    for (int i = 0; i < nv; i++) {
        int best = 0;
        for (int c = 1; c < C; c++)
            if (ref_hamming(r->code[i], r->cent[c], bits) <
                ref_hamming(r->code[i], r->cent[best], bits))
                best = c;
        r->asg[i] = best;
        r->cnt[best]++;
    }
}

/* Lloyd's k-means of r->code[0..nv) into C clusters: r->asg, r->cnt. */
static void ref_kmeans(const ef_attn *a, rws *r, int64_t bh, int nv, int C) {
    const cplan *p = a->impl;
    uint64_t stream = STREAM_KMEANS | (uint64_t)bh, mask = ((uint64_t)1 << p->bits) - 1;
    uint32_t u[4];
    for (int i = 0; i < nv; i++) r->perm[i] = i;
    for (int c = 0; c < C; c++) { /* draw c swaps position c with one of [c, nv) */
        ef_rng_raw(a->seed, stream, (uint64_t)c, u);
        int j = c + (int)(u[0] % (uint32_t)(nv - c)), t = r->perm[c];
        r->perm[c] = r->perm[j], r->perm[j] = t;
        r->cent[c] = r->code[r->perm[c]];
    }
    for (int it = 0;; it++) {
        ref_assign(r, nv, C, p->bits);
        if (it == p->iters) break; /* the final assignment is the one used */
        for (int c = 0; c < C; c++) {
            if (r->cnt[c] == 0) {
                ef_rng_raw(a->seed, stream, (uint64_t)C * (1 + (uint64_t)it) + c, u);
                r->cent[c] = ((uint64_t)u[0] | (uint64_t)u[1] << 32) & mask;
                continue;
            }
            uint64_t h = 0;
            for (int b = 0; b < p->bits; b++) {
                int ones = 0;
                for (int i = 0; i < nv; i++) ones += r->asg[i] == c && (r->code[i] >> b & 1);
                if (2 * ones > r->cnt[c]) h |= (uint64_t)1 << b;
            }
            r->cent[c] = h;
        }
    }
}

/* p[x] = softmax over x < kb of scale q_i . k_{tk[x]} (double). */
static void ref_top_softmax(const ef_attn *a, const int32_t *tk, int kb, const float *qi,
                            const float *k, double *pr) {
    int d = a->shape.head_dim;
    double mx = -INFINITY, sum = 0;
    for (int x = 0; x < kb; x++) {
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)qi[t] * k[(size_t)tk[x] * d + t];
        pr[x] = a->scale * dot;
        mx = fmax(mx, pr[x]);
    }
    for (int x = 0; x < kb; x++) sum += pr[x] = exp(pr[x] - mx);
    for (int x = 0; x < kb; x++) pr[x] /= sum;
}

/* Forward (dout == NULL) or backward of head bh. The discrete choices are made from q and k
 * (reuse = 0: forward) or read from the record sa (reuse = 1: backward, and replay, which is a
 * forward with dout == NULL); a forward writes its record to sa when sa is not NULL. */
static ef_status ref_head(ef_attn *a, const ef_attn_io *io, int64_t bh, int32_t *sa, int reuse,
                          const float *dout, float *dq, float *dk, float *dv) {
    cplan *p = a->impl;
    rws *r = &p->ref;
    const ef_attn_shape *s = &a->shape;
    int b = (int)(bh / s->heads), h = (int)(bh % s->heads), improved = p->improved;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, K = EF_MAX(p->K, 1);
    int nv = ef_attn_q_valid(a, io, b), mv = ef_attn_kv_valid(a, io, b);
    int C = EF_MIN(p->C, nv), kb = improved ? EF_MIN(p->topk, mv) : 0;
    double tau = a->scale;
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * e;
    if (reuse) { /* the recorded choices, read before a replay rewrites the record */
        ef_status st = check_choices(a, sa, bh, nv, mv, !dout);
        if (st) return st;
        for (int c = 0; c < C; c++) r->cnt[c] = 0;
        for (int i = 0; i < nv && mv > 0; i++) r->asg[i] = sa[i], r->cnt[sa[i]]++;
        for (int c = 0; c < C && mv > 0; c++)
            for (int x = 0; x < kb; x++) r->tk[(size_t)c * K + x] = sa[n + (size_t)c * p->K + x];
    }
    if (!dout && sa) /* the record: -1 wherever nothing is chosen */
        for (size_t x = 0; x < (size_t)n + (size_t)p->C * p->K; x++) sa[x] = -1;
    /* every output of the head starts at zero: padded rows and keys keep it */
    if (!dout) memset(io->out + (size_t)bh * n * e, 0, sizeof(float) * n * e);
    if (dout) {
        memset(dq + (size_t)bh * n * d, 0, sizeof(float) * n * d);
        memset(dk + (size_t)bh * m * d, 0, sizeof(float) * m * d);
        memset(dv + (size_t)bh * m * e, 0, sizeof(float) * m * e);
    }
    if (nv == 0 || mv == 0) return EF_OK;
    if (!reuse) { /* clusters of the valid queries */
        for (int i = 0; i < nv; i++)
            r->code[i] =
                ref_code(r->planes + (size_t)h * p->bits * d, q + (size_t)i * d, p->bits, d);
        ref_kmeans(a, r, bh, nv, C);
    }
    if (!dout && sa)
        for (int i = 0; i < nv; i++) sa[i] = r->asg[i];
    /* centroids, their attention A over the valid keys, top-k sets T_c, masses, bottom values */
    for (int c = 0; c < C; c++) {
        double *qc = r->qc + (size_t)c * d, *lg = r->lg + (size_t)c * m, *A = r->A + (size_t)c * m;
        char *top = r->top + (size_t)c * m;
        int32_t *tk = r->tk + (size_t)c * K;
        for (int t = 0; t < d; t++) qc[t] = 0;
        for (int i = 0; i < nv; i++)
            if (r->asg[i] == c)
                for (int t = 0; t < d; t++) qc[t] += q[(size_t)i * d + t];
        for (int t = 0; t < d; t++) qc[t] /= r->cnt[c] ? r->cnt[c] : 1;
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < mv; j++) {
            double dot = 0;
            for (int t = 0; t < d; t++) dot += qc[t] * k[(size_t)j * d + t];
            lg[j] = tau * dot;
            mx = fmax(mx, lg[j]);
        }
        for (int j = 0; j < mv; j++) sum += A[j] = exp(lg[j] - mx);
        for (int j = 0; j < mv; j++) A[j] /= sum;
        /* T_c: kb times the largest logit not yet taken, the lowest index among equal ones
         * (or the recorded set); kept in increasing key order, as the record holds it */
        memset(top, 0, (size_t)mv);
        if (!reuse) {
            for (int x = 0; x < kb; x++) {
                int best = -1;
                for (int j = 0; j < mv; j++)
                    if (!top[j] && (best < 0 || lg[j] > lg[best])) best = j;
                top[best] = 1;
            }
            for (int j = 0, x = 0; j < mv; j++)
                if (top[j]) tk[x++] = j;
        } else
            for (int x = 0; x < kb; x++) top[tk[x]] = 1;
        r->mass[c] = 0;
        for (int x = 0; x < kb; x++) r->mass[c] += A[tk[x]];
        if (!dout && sa)
            for (int x = 0; x < kb; x++) sa[n + (size_t)c * p->K + x] = tk[x];
        for (int t = 0; t < e; t++) {
            double o = 0;
            for (int j = 0; j < mv; j++)
                if (!top[j]) o += A[j] * v[(size_t)j * e + t];
            r->vb[(size_t)c * e + t] = o;
        }
    }
    if (!dout) { /* out_i = Vb_c + m_c sum_x p_ix v_{T_c[x]} */
        float *out = io->out + (size_t)bh * n * e;
        for (int i = 0; i < nv; i++) {
            int c = r->asg[i];
            const int32_t *tk = r->tk + (size_t)c * K;
            ref_top_softmax(a, tk, kb, q + (size_t)i * d, k, r->p);
            for (int t = 0; t < e; t++) {
                double o = r->vb[(size_t)c * e + t];
                for (int x = 0; x < kb; x++) o += r->mass[c] * r->p[x] * v[(size_t)tk[x] * e + t];
                out[(size_t)i * e + t] = (float)o;
            }
        }
        return EF_OK;
    }
    /* backward of f = sum_i g_i . out_i, clusters and top-k sets fixed */
    const float *g = dout + (size_t)bh * n * e;
    float *dqh = dq + (size_t)bh * n * d;
    memset(r->gk, 0, sizeof(double) * mv * d);
    memset(r->gv, 0, sizeof(double) * mv * e);
    /* G_c = sum of the members' g_i; dm_c = sum_i sum_x p_ix g_i . v_{T_c[x]} */
    for (int c = 0; c < C; c++) {
        r->dm[c] = 0;
        for (int t = 0; t < e; t++) r->G[(size_t)c * e + t] = 0;
    }
    for (int i = 0; i < nv; i++) {
        int c = r->asg[i];
        const int32_t *tk = r->tk + (size_t)c * K;
        for (int t = 0; t < e; t++) r->G[(size_t)c * e + t] += g[(size_t)i * e + t];
        ref_top_softmax(a, tk, kb, q + (size_t)i * d, k, r->p);
        for (int x = 0; x < kb; x++)
            for (int t = 0; t < e; t++)
                r->dm[c] += r->p[x] * g[(size_t)i * e + t] * v[(size_t)tk[x] * e + t];
    }
    /* centroid part: dA_cj = G_c . v_j off T_c, dm_c on T_c; dS = A (dA - sum_l A_l dA_l);
     * dQc = tau dS K, dk_j += tau dS_cj Qc, dv_j += A_cj G_c off T_c */
    for (int c = 0; c < C; c++) {
        const double *A = r->A + (size_t)c * m, *qc = r->qc + (size_t)c * d;
        const char *top = r->top + (size_t)c * m;
        double *dA = r->lg + (size_t)c * m, delta = 0; /* the logits are no longer needed */
        for (int j = 0; j < mv; j++) {
            dA[j] = 0;
            if (top[j])
                dA[j] = r->dm[c];
            else
                for (int t = 0; t < e; t++) dA[j] += r->G[(size_t)c * e + t] * v[(size_t)j * e + t];
            delta += A[j] * dA[j];
        }
        for (int t = 0; t < d; t++) r->dqc[(size_t)c * d + t] = 0;
        for (int j = 0; j < mv; j++) {
            double ds = tau * A[j] * (dA[j] - delta);
            for (int t = 0; t < d; t++) {
                r->dqc[(size_t)c * d + t] += ds * k[(size_t)j * d + t];
                r->gk[(size_t)j * d + t] += ds * qc[t];
            }
            if (!top[j])
                for (int t = 0; t < e; t++)
                    r->gv[(size_t)j * e + t] += A[j] * r->G[(size_t)c * e + t];
        }
    }
    /* per query: dq_i = dQc_c / |c| + the top part; dp_x = m_c g_i . v_x,
     * ds_x = p_x (dp_x - sum_y p_y dp_y); dq_i += tau ds_x k_x, dk_x += tau ds_x q_i,
     * dv_x += m_c p_x g_i */
    for (int i = 0; i < nv; i++) {
        int c = r->asg[i];
        const int32_t *tk = r->tk + (size_t)c * K;
        const float *qi = q + (size_t)i * d, *gi = g + (size_t)i * e;
        for (int t = 0; t < d; t++) r->gq[t] = r->dqc[(size_t)c * d + t] / r->cnt[c];
        ref_top_softmax(a, tk, kb, qi, k, r->p);
        double delta = 0;
        for (int x = 0; x < kb; x++) {
            double dot = 0;
            for (int t = 0; t < e; t++) dot += (double)gi[t] * v[(size_t)tk[x] * e + t];
            r->dp[x] = r->mass[c] * dot;
            delta += r->p[x] * r->dp[x];
        }
        for (int x = 0; x < kb; x++) {
            int j = tk[x];
            double ds = tau * r->p[x] * (r->dp[x] - delta);
            for (int t = 0; t < d; t++) {
                r->gq[t] += ds * k[(size_t)j * d + t];
                r->gk[(size_t)j * d + t] += ds * qi[t];
            }
            for (int t = 0; t < e; t++) r->gv[(size_t)j * e + t] += r->mass[c] * r->p[x] * gi[t];
        }
        for (int t = 0; t < d; t++) dqh[(size_t)i * d + t] = (float)r->gq[t];
    }
    for (size_t x = 0; x < (size_t)mv * d; x++) dk[(size_t)bh * m * d + x] = (float)r->gk[x];
    for (size_t x = 0; x < (size_t)mv * e; x++) dv[(size_t)bh * m * e + x] = (float)r->gv[x];
    return EF_OK;
}

/* The reference records the same choices as the fast path, in the same layout. */
static size_t clu_ref_saved_bytes(const ef_attn *a) { return clu_saved_bytes(a); }

/* Every head of a reference call; a refused record is reported with the mechanism's name. */
static ef_status ref_heads(ef_attn *a, const ef_attn_io *io, void *saved, int reuse,
                           const float *dout, float *dq, float *dk, float *dv) {
    for (int64_t bh = 0; bh < (int64_t)a->shape.batch * a->shape.heads; bh++) {
        ef_status st =
            ref_head(a, io, bh, saved ? saved_head(a, saved, bh) : NULL, reuse, dout, dq, dk, dv);
        if (st) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s", ef_last_error());
            return ef_error(st, "%s: %s", a->ops->name, msg);
        }
    }
    return EF_OK;
}

static ef_status clu_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    return ref_heads(a, io, saved, 0, NULL, NULL, NULL, NULL);
}

static ef_status clu_ref_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    if (!saved)
        return ef_error(EF_ERR_ARG,
                        "%s: replay needs the record of an earlier forward (saved is NULL)",
                        a->ops->name);
    return ref_heads(a, io, saved, 1, NULL, NULL, NULL, NULL);
}

static ef_status clu_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    return ref_heads(a, io, (void *)(uintptr_t)saved, 1, dout, dq, dk, dv);
}

/* ---------------------------------------------------------------------------------------------
 * Plans
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc clustered_opts[] = {
    {"clusters", EF_OPT_INT, "100", 1, 1 << 20, NULL, 0, "k-means clusters C (min(C, q_len) used)"},
    {"bits", EF_OPT_INT, "63", 1, 63, NULL, 0, "LSH hyperplanes per query code (< 64)"},
    {"iters", EF_OPT_INT, "10", 0, 1000, NULL, 0, "Lloyd iterations in Hamming space"},
};
static const ef_opt_desc iclustered_opts[] = {
    {"clusters", EF_OPT_INT, "100", 1, 1 << 20, NULL, 0, "k-means clusters C (min(C, q_len) used)"},
    {"topk", EF_OPT_INT, "32", 1, 1 << 20, NULL, 0,
     "keys per cluster recomputed exactly per query (min(topk, visible keys) used)"},
    {"bits", EF_OPT_INT, "63", 1, 63, NULL, 0, "LSH hyperplanes per query code (< 64)"},
    {"iters", EF_OPT_INT, "10", 0, 1000, NULL, 0, "Lloyd iterations in Hamming space"},
};

/* The reference's workspace and its copy of the hyperplanes, [H][bits][D] in double. */
static ef_status ref_init(ef_attn *a) {
    cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t bytes = ref_layout(a, &p->ref, NULL), d = s->head_dim;
    if ((double)bytes > 1e12)
        return ef_error(EF_ERR_NOMEM, "%s: reference workspace of %.3g GB", a->ops->name,
                        (double)bytes / 1e9);
    p->rblock = ef_malloc(bytes);
    if (!p->rblock)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of reference workspace",
                        a->ops->name, (double)bytes / 1e6);
    ref_layout(a, &p->ref, p->rblock);
    a->ws_bytes = bytes;
    for (int h = 0; h < s->heads; h++)
        for (size_t x = 0; x < (size_t)p->bits * d; x++) {
            float z;
            ef_rng_normal(a->seed, STREAM_PLANES | (uint64_t)h, x, 1, &z);
            p->ref.planes[(size_t)h * p->bits * d + x] = z;
        }
    return EF_OK;
}

static ef_status clu_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    int improved = a->ops == &ef_attn_ops_iclustered;
    if (a->causal && !improved)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "clustered: causal=1 is not supported: the clusters come from k-means over "
                        "all queries of a sequence, so a centroid (and every member's output) "
                        "mixes past and future positions");
    if (a->causal)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "iclustered: causal=1 is not supported: the clusters, their centroids and "
                        "each cluster's top-k keys come from k-means over all queries of a "
                        "sequence, so every row would depend on later positions");
    cplan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    a->impl = p;
    p->improved = improved;
    p->C = (int)EF_MIN(ef_opt_i(a, ef_attn_opt_index(a->ops, "clusters")), (int64_t)s->q_len);
    p->bits = (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "bits"));
    p->iters = (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "iters"));
    p->topk = improved ? (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "topk")) : 0;
    p->K = EF_MIN(p->topk, s->kv_len);
    if (a->ref) return ref_init(a);
    size_t n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C;
    size_t K = EF_MAX(p->K, 1);
    p->Kp = (int)pad16(K), p->dp = (int)pad16(d), p->dvp = (int)pad16(dv);
    size_t Kp = p->Kp, dp = p->dp, dvp = p->dvp;
    size_t rb = RB, wd = EF_MAX(dp, dvp);
    enum { NW = 24 };
    size_t sz[NW] = {8 * n,       8 * C,      4 * n,       4 * C,      4 * (n + C * 67),     
                     4 * C * K,   4 * C * d,  4 * C * d,   4 * C * m,  4 * C * m,
                     4 * C * dv,  4 * C * dv, 4 * C,       4 * C,      4 * n,
                     4 * (C + 1), 4 * C,      4 * K * dp,  4 * K * dp, 4 * K * dvp,
                     4 * K * dvp, 4 * rb * dp, 4 * rb * dvp, 4 * rb * wd};
    enum { NX = 6 };
    size_t extra[NX] = {4 * rb * Kp, 4 * rb * Kp, 4 * HB * PLANE_ROW, 4 * d * Kp, 4 * dv * Kp, 4 * C};
    size_t per = 0;
    for (int i = 0; i < NW; i++) per += align64(sz[i]);
    for (int i = 0; i < NX; i++) per += align64(extra[i]);
    size_t planes = align64(4 * (size_t)s->heads * PLANE_ROW * (d + 1));
    double total = (double)per * a->slots + planes;
    if (total > 1e12)
        return ef_error(EF_ERR_NOMEM, "%s: workspace of %.3g GB", a->ops->name, total / 1e9);
    p->ws = ef_mem_calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_malloc((size_t)total);
    if (!p->ws || !p->block)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of workspace", a->ops->name,
                        total / 1e6);
    a->ws_bytes = (size_t)total;
    char *cur = p->block;
    p->planes = (float *)cur, cur += planes;
    for (int t = 0; t < a->slots; t++) {
        cwork *w = &p->ws[t];
        void **f[NW] = {(void **)&w->hash, (void **)&w->cent, (void **)&w->asg,   (void **)&w->cnt,
                        (void **)&w->kw,   (void **)&w->tk,   (void **)&w->qc,    (void **)&w->dqc,
                        (void **)&w->S,    (void **)&w->dP,   (void **)&w->G,     (void **)&w->vb,
                        (void **)&w->mass, (void **)&w->dm,   (void **)&w->order, (void **)&w->off,
                        (void **)&w->cur,  (void **)&w->kt,   (void **)&w->dkt,   (void **)&w->vt,
                        (void **)&w->dvt,  (void **)&w->qm,   (void **)&w->gm,    (void **)&w->om};
        for (int i = 0; i < NW; i++) *f[i] = cur, cur += align64(sz[i]);
        float **fx[NX] = {&w->P, &w->D1, &w->hs, &w->ktT, &w->vtT, &w->rinv};
        for (int i = 0; i < NX; i++) *fx[i] = (float *)cur, cur += align64(extra[i]);
    }
    /* zero once: the padding lanes of the top part's rows are never written but are read (and
     * multiplied into lanes nobody reads) by ef_tile_gemm */
    memset(p->block, 0, (size_t)total);
    /* hyperplane b of head h is elements [b D, (b + 1) D) of the head's draw; stored transposed
     * in rows of PLANE_ROW, zero past bits (the block was not zeroed: do it here) */
    memset(p->planes, 0, planes);
    for (int h = 0; h < s->heads; h++)
        for (int b = 0; b < p->bits; b++)
            for (size_t t = 0; t < d; t++)
                ef_rng_normal(a->seed, STREAM_PLANES | (uint64_t)h, (uint64_t)b * d + t, 1,
                              p->planes + ((size_t)h * d + t) * PLANE_ROW + b);
    p->pnorm = p->planes + (size_t)s->heads * PLANE_ROW * d;
    for (int h = 0; h < s->heads; h++)
        plane_norms(p->planes + (size_t)h * d * PLANE_ROW, (int)d, p->bits,
                    p->pnorm + h * PLANE_ROW);
    return EF_OK;
}

static void clu_destroy(ef_attn *a) {
    cplan *p = a->impl;
    if (!p) return;
    ef_free(p->block);
    ef_free(p->rblock);
    ef_free(p->ws);
    ef_free(p);
    a->impl = NULL;
}

/* Analytic count per head: hashing 2 N bits D, k-means (iters + 1) N C popcounts (counted as 1),
 * centroid scores and values 2 C M (D + Dv), the top part 2 N K (D + Dv); backward recomputes
 * the scores and adds dA, dV, dQc, dK (2 C M (Dv + Dv + D + D)), recomputes the top logits
 * (2 N K D; uncounted before 2026-12-03, like the centroid scores' recompute it is work every
 * implementation that saves O(N + C K) does) and adds the top part's dP, dV, dQ, dK
 * (2 N K (Dv + Dv + D + D)). */
static double clu_flops(const ef_attn *a, int backward) {
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C, K = p->K;
    double fwd =
        2 * n * p->bits * d + (p->iters + 1) * n * C + 2 * C * m * (d + dv) + 2 * n * K * (d + dv);
    double bwd = 2 * C * m * d + 2 * C * m * (2 * dv + 2 * d) + 2 * n * K * d +
                 2 * n * K * (2 * dv + 2 * d);
    return (double)s->batch * s->heads * (backward ? fwd + bwd : fwd);
}

const ef_attn_ops ef_attn_ops_clustered = {
    .caps = {.cross = 1, .random = 1, .discrete = 1, .deterministic = 1},
    .name = "clustered",
    .summary =
        "clustered attention: queries k-means-clustered on LSH codes, one softmax per cluster",
    .notes =
        "  codes: bits random hyperplanes per head (sign of q.a, no bias); Hamming k-means of\n"
        "  the valid queries (q_lens) from the seed; each cluster attends with the mean of its\n"
        "  queries and every member gets that output. causal=1 is refused (clusters mix past\n"
        "  and future queries). saves the assignment (int32 per query); backward holds the\n"
        "  clusters fixed. ef_attn_forward_replay reuses the saved assignment (no hashing or\n"
        "  k-means) and recomputes centroids and outputs from io. reference (ref=1): its own\n"
        "  double-precision hashing, k-means and attention, from the same random draws and tie\n"
        "  rules; it saves the same record.",
    .opts = clustered_opts,
    .n_opts = 3,
    .init = clu_init,
    .destroy = clu_destroy,
    .flops = clu_flops,
    .saved_bytes = clu_saved_bytes,
    .forward = clu_forward,
    .backward = clu_backward,
    .replay = clu_replay,
    .ref_saved_bytes = clu_ref_saved_bytes,
    .ref_forward = clu_ref_forward,
    .ref_backward = clu_ref_backward,
    .ref_replay = clu_ref_replay,
};

const ef_attn_ops ef_attn_ops_iclustered = {
    .caps = {.cross = 1, .random = 1, .discrete = 1, .deterministic = 1},
    .name = "iclustered",
    .summary = "improved clustered attention: exact softmax on each cluster's top-k keys",
    .notes = "  clusters as `clustered`; per query: m_c * softmax over the centroid's top-k keys\n"
             "  plus the centroid's attention on the other keys (m_c = its mass on the top-k).\n"
             "  causal=1 is refused: clusters, centroids and top-k sets depend on every query,\n"
             "  future ones included. saves the assignment and the top-k keys; backward holds\n"
             "  both fixed. ef_attn_forward_replay reuses both (no hashing, k-means or top-k)\n"
             "  and recomputes centroids, masses and outputs from io. reference (ref=1): its own\n"
             "  double-precision hashing, k-means, top-k and attention (top-k ranked on double\n"
             "  logits, the fast path's on fp32 ones); it saves the same record.",
    .opts = iclustered_opts,
    .n_opts = 4,
    .init = clu_init,
    .destroy = clu_destroy,
    .flops = clu_flops,
    .saved_bytes = clu_saved_bytes,
    .forward = clu_forward,
    .backward = clu_backward,
    .replay = clu_replay,
    .ref_saved_bytes = clu_ref_saved_bytes,
    .ref_forward = clu_ref_forward,
    .ref_backward = clu_ref_backward,
    .ref_replay = clu_ref_replay,
};
