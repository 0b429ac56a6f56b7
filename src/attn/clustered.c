/*
 * clustered.c - clustered attention (Vyas et al. 2020, fast-transformers), two mechanisms:
 *   clustered   queries are grouped by k-means on LSH codes; each cluster attends once with the
 *               mean of its queries and every member receives that cluster's output.
 *   iclustered  "improved clustered": the centroid's top-k keys are recomputed exactly per
 *               query, the remaining keys keep the centroid's attention (ALGORITHMS.md b.7).
 * docs/clustered.md states the formulas, the random draws and the backward.
 *
 * Layouts: q [B][H][N][D], k [B][H][M][D], v [B][H][M][Dv], out [B][H][N][Dv].
 * Per (batch, head), C = min(clusters, N), K = min(topk, M); clustered refuses causal=1:
 *   hash   h_i = sum_b 2^b [q_i . a_b > 0], a_b ~ N(0, I) rows of a bits x D matrix drawn per
 *          head from the seed (cosine LSH, no bias term: fast-transformers' hash_bias=False);
 *   k-means in Hamming space (ef_clustered_kmeans): initial centroids = codes of C distinct
 *          positions sampled from the seed; `iters` rounds of (assign: argmin popcount(h ^ c), ties
 * to the lowest id; update: per-bit majority, a tie gives 0, an empty cluster gets a random code);
 * then one final assignment, which is the one used; Qc     = mean of the member queries (C x D); S
 * = scale Qc K^T over the visible keys; A = softmax(S) (C x M). clustered:  out_i = (A V)[c(i)].
 *   iclustered: T_c = top-K logits of row c (K_b = min(topk, kv_lens[b]), ties to the lower
 *          key), m_c = sum_{j in T_c} A_cj, Vb_c = sum_{j not in T_c} A_cj v_j;
 *          out_i = m_c sum_{j in T_c} softmax_j(scale q_i.k_j) v_j + Vb_c.
 *          causal=1: out_i = sum_{j in T_c, j <= i} softmax_j(scale q_i.k_j) v_j only (no
 *          bottom part; a member that sees none of T_c outputs zeros).
 * Saved for backward: the assignment [B][H][N] (int32) and the top-k keys [B][H][C][K]
 * (int32, iclustered): O(N + C K) per head. Backward holds the clusters and the top-k sets
 * fixed; it recomputes Qc, A and the per-query top softmax.
 * Time O(N bits D + iters N C + C M (D + Dv) + N K (D + Dv)) per head; memory per thread
 * O(C M) for the centroid scores; the top part runs per cluster on blocks of RB members
 * with small GEMMs. Work items are (batch, head) pairs; their GEMMs run
 * single-threaded so results do not depend on the thread count.
 */
#include "attn/attn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { RB = 128 }; /* members of a cluster processed together in the top part */

/* random streams: hyperplanes per head, k-means draws per (batch, head) */
#define STREAM_PLANES (0x636c7573ull << 32)
#define STREAM_KMEANS (0x6b6d6e73ull << 32)

typedef struct cwork {
    uint64_t *hash, *cent;      /* [N], [C] */
    int32_t *asg, *cnt;         /* [N], [C] */
    int32_t *kw;                /* [N + C bits] k-means scratch */
    int32_t *tk;                /* [C][K] top-k keys */
    float *qc, *dqc;            /* [C][D] */
    float *S, *dP;              /* [C][M] scores / probabilities, their gradient */
    float *G, *vb;              /* [C][Dv] summed output gradients, bottom values */
    float *mass, *dm;           /* [C] */
    int32_t *order, *off, *cur; /* [N] queries sorted by cluster, [C + 1] offsets, [C] */
    float *kt, *dkt;            /* [K][D] top keys of a cluster, their gradient */
    float *vt, *dvt;            /* [K][Dv] */
    float *qm, *gm, *om;        /* [RB][D], [RB][Dv], [RB][max(D, Dv)] a block of members */
    float *P, *D1;              /* [RB][K] top probabilities, their gradient */
    double *row;                /* [M] one logit row for the top-k selection */
} cwork;

typedef struct cplan {
    int improved, C, K, bits, iters, topk;
    float *planes; /* [H][D][bits] hyperplanes, transposed */
    cwork *ws;
    void *block;
    double *rblock; /* reference path (ref=1) */
} cplan;

/* ---------------------------------------------------------------------------------------------
 * Hashing and k-means (shared by the fast and the reference path, so both see the same clusters)
 * ------------------------------------------------------------------------------------------- */
/* planes_t is the head's hyperplane matrix transposed, [D][bits], so that the loop over bits is
 * the inner (vector) one; the dot products are accumulated in double over t in order. */
__attribute__((noinline)) static uint64_t hash_query(const float *q, const float *planes_t,
                                                     int bits, int d) {
    double dot[64] = {0};
    for (int t = 0; t < d; t++) {
        double qt = q[t];
        const float *pt = planes_t + (size_t)t * bits;
        for (int b = 0; b < bits; b++) dot[b] += qt * pt[b];
    }
    uint64_t h = 0;
    for (int b = 0; b < bits; b++)
        if (dot[b] > 0) h |= 1ull << b;
    return h;
}

static uint64_t random_code(uint64_t seed, uint64_t stream, uint64_t ctr, int bits) {
    uint32_t r[4];
    ef_rng_raw(seed, stream, ctr, r);
    uint64_t x = (uint64_t)r[0] | (uint64_t)r[1] << 32;
    return bits >= 64 ? x : x & ((1ull << bits) - 1);
}

static void assign_all(const uint64_t *hash, int n, const uint64_t *cent, int C, int32_t *asg) {
    for (int i = 0; i < n; i++) {
        int best = 0, bd = 65;
        for (int c = 0; c < C; c++) {
            int dd = __builtin_popcountll(hash[i] ^ cent[c]);
            if (dd < bd) bd = dd, best = c;
        }
        asg[i] = best;
    }
}

/* Test hook (declared again in tests/test_clustered.c; not part of the API). Lloyd's k-means
 * of n codes of `bits` bits into C <= n clusters, draws from (seed, stream). Writes the final
 * assignment, the centroids and the member counts; work holds n + C * bits ints. */
void ef_clustered_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt,
                         int32_t *work);
void ef_clustered_kmeans(const uint64_t *hash, int n, int bits, int C, int iters, uint64_t seed,
                         uint64_t stream, int32_t *asg, uint64_t *cent, int32_t *cnt,
                         int32_t *work) {
    int32_t *perm = work, *ones = work + n;
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
    for (int it = 0; it < iters; it++) {
        assign_all(hash, n, cent, C, asg);
        memset(cnt, 0, sizeof(int32_t) * C);
        memset(ones, 0, sizeof(int32_t) * C * bits);
        for (int i = 0; i < n; i++) {
            int c = asg[i];
            cnt[c]++;
            for (uint64_t h = hash[i]; h; h &= h - 1) ones[c * bits + __builtin_ctzll(h)]++;
        }
        for (int c = 0; c < C; c++) {
            if (!cnt[c]) {
                cent[c] = random_code(seed, stream, (uint64_t)C + (uint64_t)it * C + c, bits);
                continue;
            }
            uint64_t h = 0;
            for (int b = 0; b < bits; b++)
                if (2 * ones[c * bits + b] > cnt[c]) h |= 1ull << b;
            cent[c] = h;
        }
    }
    assign_all(hash, n, cent, C, asg);
    memset(cnt, 0, sizeof(int32_t) * C);
    for (int i = 0; i < n; i++) cnt[asg[i]]++;
}

/* Clusters the queries of head (b, h): w->asg and w->cnt. */
static void cluster_head(const ef_attn *a, cwork *w, const float *q, int64_t bh) {
    const cplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, h = (int)(bh % a->shape.heads);
    const float *planes = p->planes + (size_t)h * p->bits * d;
    for (int i = 0; i < n; i++) w->hash[i] = hash_query(q + (size_t)i * d, planes, p->bits, d);
    ef_clustered_kmeans(w->hash, n, p->bits, p->C, p->iters, a->seed, STREAM_KMEANS | (uint64_t)bh,
                        w->asg, w->cent, w->cnt, w->kw);
}

/* Indices of the k best values of s[0..n) (larger first, ties to the lower index), written to
 * idx in increasing index order. */
static int better(const double *s, int x, int y) { return s[x] > s[y] || (s[x] == s[y] && x < y); }

static int cmp_int(const void *x, const void *y) {
    int a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

static void topk_select(const double *s, int n, int k, int32_t *idx) {
    /* min-heap on "better": the root is the worst of the kept */
    int size = 0;
    for (int j = 0; j < n; j++) {
        int pos;
        if (size < k) {
            pos = size++;
            while (pos > 0 && better(s, idx[(pos - 1) / 2], j)) {
                idx[pos] = idx[(pos - 1) / 2];
                pos = (pos - 1) / 2;
            }
            idx[pos] = j;
            continue;
        }
        if (!better(s, j, idx[0])) continue;
        pos = 0;
        for (;;) {
            int l = 2 * pos + 1, r = l + 1, m = pos;
            int cur = j;
            if (l < size && better(s, cur, idx[l])) m = l, cur = idx[l];
            if (r < size && better(s, cur, idx[r])) m = r;
            if (m == pos) break;
            idx[pos] = idx[m];
            pos = m;
        }
        idx[pos] = j;
    }
    qsort(idx, (size_t)size, sizeof(int32_t), cmp_int);
}

/* ---------------------------------------------------------------------------------------------
 * Fast path
 * ------------------------------------------------------------------------------------------- */
typedef struct cctx {
    ef_attn *a;
    const ef_attn_io *io;
    void *saved;
    const float *dout;
    float *dq, *dk, *dv;
} cctx;

static int32_t *saved_asg(const ef_attn *a, void *saved, int64_t bh) {
    const cplan *p = a->impl;
    size_t per = (size_t)a->shape.q_len + (size_t)p->C * p->K;
    return (int32_t *)saved + (size_t)bh * per;
}

/* Qc = mean of members (rows of empty clusters are zero). */
static void centroids(const ef_attn *a, cwork *w, const float *q) {
    const cplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    memset(w->qc, 0, sizeof(float) * p->C * d);
    for (int i = 0; i < n; i++) {
        float *c = w->qc + (size_t)w->asg[i] * d;
        for (int t = 0; t < d; t++) c[t] += q[(size_t)i * d + t];
    }
    for (int c = 0; c < p->C; c++) {
        float inv = w->cnt[c] ? 1.0f / (float)w->cnt[c] : 0;
        for (int t = 0; t < d; t++) w->qc[(size_t)c * d + t] *= inv;
    }
}

/* S = scale Qc K^T over keys [0, mv) (C x mv, row stride M). */
static void centroid_logits(const ef_attn *a, cwork *w, const float *k, int mv) {
    const cplan *p = a->impl;
    int m = a->shape.kv_len, d = a->shape.head_dim;
    ef_sgemm(0, 1, p->C, mv, d, a->scale, w->qc, d, k, d, 0, w->S, m);
}

/* Row softmax of S in place: A. */
static void centroid_softmax(const ef_attn *a, cwork *w, int mv) {
    const cplan *p = a->impl;
    int m = a->shape.kv_len;
    for (int c = 0; c < p->C; c++) {
        float *s = w->S + (size_t)c * m, mx = -INFINITY;
        for (int j = 0; j < mv; j++) mx = s[j] > mx ? s[j] : mx;
        for (int j = 0; j < mv; j++) s[j] -= mx;
        ef_vexp(s, s, (size_t)mv);
        double sum = 0;
        for (int j = 0; j < mv; j++) sum += s[j];
        float inv = (float)(1 / sum);
        for (int j = 0; j < mv; j++) s[j] *= inv;
    }
}

/* Top-K of each centroid row (logits ordered as the probabilities) into w->tk. */
static void select_topk(const ef_attn *a, cwork *w, int mv, int kb) {
    const cplan *p = a->impl;
    int m = a->shape.kv_len;
    for (int c = 0; c < p->C; c++) {
        const float *s = w->S + (size_t)c * m;
        for (int j = 0; j < mv; j++) w->row[j] = s[j];
        topk_select(w->row, mv, kb, w->tk + (size_t)c * p->K);
    }
}

/* Members of every cluster in increasing query order: order[off[c] .. off[c+1]). */
static void sort_members(const ef_attn *a, cwork *w) {
    const cplan *p = a->impl;
    int n = a->shape.q_len, C = p->C;
    w->off[0] = 0;
    for (int c = 0; c < C; c++) w->off[c + 1] = w->off[c] + w->cnt[c];
    for (int c = 0; c < C; c++) w->cur[c] = w->off[c];
    for (int i = 0; i < n; i++) w->order[w->cur[w->asg[i]]++] = i;
}

/* Rows rows[0..nr) of x (stride ld) into dst (nr x ld). */
static void gather(float *dst, const float *x, const int32_t *rows, int nr, int ld) {
    for (int r = 0; r < nr; r++)
        memcpy(dst + (size_t)r * ld, x + (size_t)rows[r] * ld, sizeof(float) * ld);
}

/* P (nr x kb) = row softmax of scale Qm KT^T over the top keys each query may see (causal: key
 * tk[x] <= query); a row that sees none is zero. */
static void top_softmax(const ef_attn *a, cwork *w, const int32_t *rows, int nr, const int32_t *tk,
                        int kb) {
    int d = a->shape.head_dim;
    ef_sgemm(0, 1, nr, kb, d, a->scale, w->qm, d, w->kt, d, 0, w->P, kb);
    for (int r = 0; r < nr; r++) {
        float *pr = w->P + (size_t)r * kb, mx = -INFINITY;
        for (int x = 0; x < kb; x++) {
            if (a->causal && tk[x] > rows[r]) pr[x] = -INFINITY;
            mx = pr[x] > mx ? pr[x] : mx;
        }
        if (mx == -INFINITY) {
            memset(pr, 0, sizeof(float) * kb);
            continue;
        }
        for (int x = 0; x < kb; x++) pr[x] -= mx;
        ef_vexp(pr, pr, (size_t)kb);
        float sum = 0;
        for (int x = 0; x < kb; x++) sum += pr[x];
        float inv = 1 / sum;
        for (int x = 0; x < kb; x++) pr[x] *= inv;
    }
}

/* Gathers the top keys and values of cluster c into kt (kb x D) and vt (kb x Dv). */
static void gather_top(const ef_attn *a, cwork *w, const int32_t *tk, int kb, const float *k,
                       const float *v) {
    gather(w->kt, k, tk, kb, a->shape.head_dim);
    gather(w->vt, v, tk, kb, a->shape.v_dim);
}

static void forward_head(void *vctx, int64_t bh, int tid) {
    cctx *cx = vctx;
    ef_attn *a = cx->a;
    const ef_attn_io *io = cx->io;
    cplan *p = a->impl;
    cwork *w = &p->ws[tid];
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C, K = p->K;
    int mv = ef_attn_kv_valid(a, io, (int)(bh / s->heads));
    int kb = EF_MIN(p->topk, mv);
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * dv;
    float *out = io->out + (size_t)bh * n * dv;
    int old = ef_gemm_local_threads(1);
    cluster_head(a, w, q, bh);
    if (cx->saved) {
        int32_t *sa = saved_asg(a, cx->saved, bh);
        memcpy(sa, w->asg, sizeof(int32_t) * n);
        memset(sa + n, 0, sizeof(int32_t) * C * K);
    }
    if (mv == 0) {
        memset(out, 0, sizeof(float) * n * dv);
        ef_gemm_local_threads(old);
        return;
    }
    centroids(a, w, q);
    centroid_logits(a, w, k, mv);
    if (p->improved) select_topk(a, w, mv, kb);
    centroid_softmax(a, w, mv);
    if (!p->improved) {
        ef_sgemm(0, 0, C, dv, mv, 1, w->S, m, v, dv, 0, w->vb, dv);
        for (int i = 0; i < n; i++)
            memcpy(out + (size_t)i * dv, w->vb + (size_t)w->asg[i] * dv, sizeof(float) * dv);
        ef_gemm_local_threads(old);
        return;
    }
    if (cx->saved) memcpy(saved_asg(a, cx->saved, bh) + n, w->tk, sizeof(int32_t) * C * K);
    /* bottom part: mass of the top keys, then the centroid attention without them */
    for (int c = 0; c < C; c++) {
        float *r = w->S + (size_t)c * m;
        const int32_t *tk = w->tk + (size_t)c * K;
        double ms = 0;
        for (int x = 0; x < kb; x++) ms += r[tk[x]], r[tk[x]] = 0;
        w->mass[c] = a->causal ? 1 : (float)ms;
    }
    if (a->causal)
        memset(w->vb, 0, sizeof(float) * C * dv);
    else
        ef_sgemm(0, 0, C, dv, mv, 1, w->S, m, v, dv, 0, w->vb, dv);
    /* top part, per cluster in blocks of RB members: out = m_c P V_T + Vb_c */
    sort_members(a, w);
    for (int c = 0; c < C; c++) {
        const int32_t *tk = w->tk + (size_t)c * K;
        if (!w->cnt[c]) continue;
        gather_top(a, w, tk, kb, k, v);
        for (int r0 = w->off[c]; r0 < w->off[c + 1]; r0 += RB) {
            const int32_t *rows = w->order + r0;
            int nr = EF_MIN(RB, w->off[c + 1] - r0);
            gather(w->qm, q, rows, nr, d);
            top_softmax(a, w, rows, nr, tk, kb);
            ef_sgemm(0, 0, nr, dv, kb, w->mass[c], w->P, kb, w->vt, dv, 0, w->om, dv);
            const float *vb = w->vb + (size_t)c * dv;
            for (int r = 0; r < nr; r++) {
                float *o = out + (size_t)rows[r] * dv;
                const float *om = w->om + (size_t)r * dv;
                for (int e = 0; e < dv; e++) o[e] = om[e] + vb[e];
            }
        }
    }
    ef_gemm_local_threads(old);
}

static ef_status clu_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    cctx c = {a, io, saved, NULL, NULL, NULL, NULL};
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), forward_head, &c);
    return EF_OK;
}

/* Backward of the top part of iclustered, out_i += m_c sum_x P_ix v_x (m_c = 1 when causal):
 *   D1 = dO V_T^T;  dm_c += sum P o D1;  dP = m_c D1;  dS = P o (dP - rowsum(P o dP))
 *   dV_T += m_c P^T dO;  dq += scale dS K_T;  dK_T += scale dS^T Q  (scattered to the keys). */
static void top_backward(const ef_attn *a, cwork *w, const float *q, const float *k, const float *v,
                         const float *g, int kb, float *dq, float *dk, float *dvv) {
    const cplan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim, C = p->C, K = p->K;
    sort_members(a, w);
    for (int c = 0; c < C; c++) {
        const int32_t *tk = w->tk + (size_t)c * K;
        w->dm[c] = 0;
        if (!w->cnt[c]) continue;
        gather_top(a, w, tk, kb, k, v);
        float mc = w->mass[c];
        double dm = 0;
        for (int r0 = w->off[c]; r0 < w->off[c + 1]; r0 += RB) {
            const int32_t *rows = w->order + r0;
            int nr = EF_MIN(RB, w->off[c + 1] - r0);
            gather(w->qm, q, rows, nr, d);
            gather(w->gm, g, rows, nr, dv);
            top_softmax(a, w, rows, nr, tk, kb);
            ef_sgemm(0, 1, nr, kb, dv, 1, w->gm, dv, w->vt, dv, 0, w->D1, kb);
            for (int r = 0; r < nr; r++) {
                const float *pr = w->P + (size_t)r * kb;
                float *ds = w->D1 + (size_t)r * kb, delta = 0;
                for (int x = 0; x < kb; x++) delta += pr[x] * ds[x];
                dm += delta;
                for (int x = 0; x < kb; x++) ds[x] = pr[x] * (ds[x] - delta) * mc;
            }
            int first = r0 == w->off[c];
            ef_sgemm(1, 0, kb, dv, nr, mc, w->P, kb, w->gm, dv, first ? 0 : 1, w->dvt, dv);
            ef_sgemm(1, 0, kb, d, nr, a->scale, w->D1, kb, w->qm, d, first ? 0 : 1, w->dkt, d);
            ef_sgemm(0, 0, nr, d, kb, a->scale, w->D1, kb, w->kt, d, 0, w->om, d);
            for (int r = 0; r < nr; r++) {
                float *dqi = dq + (size_t)rows[r] * d;
                const float *src = w->om + (size_t)r * d;
                for (int t = 0; t < d; t++) dqi[t] += src[t];
            }
        }
        w->dm[c] = (float)dm;
        for (int x = 0; x < kb; x++) {
            float *dkj = dk + (size_t)tk[x] * d, *dvj = dvv + (size_t)tk[x] * dv;
            const float *a1 = w->dkt + (size_t)x * d, *a2 = w->dvt + (size_t)x * dv;
            for (int t = 0; t < d; t++) dkj[t] += a1[t];
            for (int e = 0; e < dv; e++) dvj[e] += a2[e];
        }
    }
}

static void backward_head(void *vctx, int64_t bh, int tid) {
    cctx *cx = vctx;
    ef_attn *a = cx->a;
    const ef_attn_io *io = cx->io;
    cplan *p = a->impl;
    cwork *w = &p->ws[tid];
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C, K = p->K;
    int mv = ef_attn_kv_valid(a, io, (int)(bh / s->heads));
    int kb = EF_MIN(p->topk, mv);
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * dv, *g = cx->dout + (size_t)bh * n * dv;
    float *dq = cx->dq + (size_t)bh * n * d, *dk = cx->dk + (size_t)bh * m * d,
          *dvv = cx->dv + (size_t)bh * m * dv;
    memset(dq, 0, sizeof(float) * n * d);
    memset(dk, 0, sizeof(float) * m * d);
    memset(dvv, 0, sizeof(float) * m * dv);
    if (mv == 0) return;
    int old = ef_gemm_local_threads(1);
    const int32_t *sa = saved_asg(a, (void *)cx->saved, bh);
    memcpy(w->asg, sa, sizeof(int32_t) * n);
    if (p->improved) memcpy(w->tk, sa + n, sizeof(int32_t) * C * K);
    memset(w->cnt, 0, sizeof(int32_t) * C);
    for (int i = 0; i < n; i++) w->cnt[w->asg[i]]++;
    centroids(a, w, q);
    int bottom = !(p->improved && a->causal);
    if (bottom) { /* A, and the masses m_c of the top keys */
        centroid_logits(a, w, k, mv);
        centroid_softmax(a, w, mv);
    }
    if (p->improved) {
        for (int c = 0; c < C; c++) {
            const float *A = w->S + (size_t)c * m;
            const int32_t *tk = w->tk + (size_t)c * K;
            double ms = 0;
            for (int x = 0; x < kb && bottom; x++) ms += A[tk[x]];
            w->mass[c] = bottom ? (float)ms : 1;
        }
        top_backward(a, w, q, k, v, g, kb, dq, dk, dvv);
    }
    if (bottom) {
        /* G_c = sum of member dO; dA = G V^T (top columns: dm_c); dS = A (dA - rowsum(A dA)) */
        memset(w->G, 0, sizeof(float) * C * dv);
        for (int i = 0; i < n; i++) {
            float *gc = w->G + (size_t)w->asg[i] * dv;
            for (int e = 0; e < dv; e++) gc[e] += g[(size_t)i * dv + e];
        }
        ef_sgemm(0, 1, C, mv, dv, 1, w->G, dv, v, dv, 0, w->dP, m);
        for (int c = 0; c < C; c++) {
            float *A = w->S + (size_t)c * m, *dA = w->dP + (size_t)c * m;
            const int32_t *tk = w->tk + (size_t)c * K;
            for (int x = 0; x < kb && p->improved; x++) dA[tk[x]] = w->dm[c];
            double delta = 0;
            for (int j = 0; j < mv; j++) delta += (double)A[j] * dA[j];
            float dl = (float)delta;
            for (int j = 0; j < mv; j++) dA[j] = A[j] * (dA[j] - dl);
            /* V_bottom uses A without the top columns */
            for (int x = 0; x < kb && p->improved; x++) A[tk[x]] = 0;
        }
        ef_sgemm(1, 0, mv, dv, C, 1, w->S, m, w->G, dv, 1, dvv, dv);
        ef_sgemm(0, 0, C, d, mv, a->scale, w->dP, m, k, d, 0, w->dqc, d);
        ef_sgemm(1, 0, mv, d, C, a->scale, w->dP, m, w->qc, d, 1, dk, d);
        for (int i = 0; i < n; i++) {
            int c = w->asg[i];
            float inv = 1.0f / (float)w->cnt[c];
            for (int t = 0; t < d; t++) dq[(size_t)i * d + t] += w->dqc[(size_t)c * d + t] * inv;
        }
    }
    ef_gemm_local_threads(old);
}

static ef_status clu_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    cctx c = {a, io, (void *)saved, dout, dq, dk, dv};
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), backward_head,
                    &c);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Reference path (ref=1): the same clusters (ef_clustered_kmeans on the same codes), everything
 * else as explicit double loops, one (batch, head) at a time. Backward when dout != NULL.
 * ------------------------------------------------------------------------------------------- */
typedef struct rws {
    double *qc, *lg, *A, *G, *dqc, *gk, *gv, *gq, *p, *dp, *vb, *mass, *dm, *mark;
} rws;

static rws ref_views(const ef_attn *a) {
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t C = p->C, K = EF_MAX(p->K, 1), m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    rws r;
    double *x = p->rblock;
    r.qc = x, x += C * d;
    r.lg = x, x += C * m;
    r.A = x, x += C * m;
    r.G = x, x += C * dv;
    r.dqc = x, x += C * d;
    r.gk = x, x += m * d;
    r.gv = x, x += m * dv;
    r.gq = x, x += d;
    r.p = x, x += K;
    r.dp = x, x += K;
    r.vb = x, x += C * dv;
    r.mass = x, x += C;
    r.dm = x, x += C;
    r.mark = x;
    return r;
}

static size_t ref_doubles(const ef_attn *a) {
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t C = p->C, K = EF_MAX(p->K, 1), m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    return 2 * C * d + 2 * C * m + 2 * C * dv + m * d + m * dv + d + 2 * K + 2 * C + m;
}

/* Softmax of scale q_i.k_j over the top keys query i may see (double); 0 when none. */
static int ref_top(const ef_attn *a, const int32_t *tk, int kb, const float *qi, const float *k,
                   int i, double *pr) {
    int d = a->shape.head_dim, used = 0;
    double mx = -INFINITY;
    for (int x = 0; x < kb; x++) {
        int j = tk[x];
        pr[x] = -INFINITY;
        if (a->causal && j > i) continue;
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)qi[t] * k[(size_t)j * d + t];
        pr[x] = dot * a->scale;
        if (pr[x] > mx) mx = pr[x];
        used++;
    }
    double sum = 0;
    for (int x = 0; x < kb; x++) sum += pr[x] = used && pr[x] != -INFINITY ? exp(pr[x] - mx) : 0;
    for (int x = 0; x < kb; x++) pr[x] = used ? pr[x] / sum : 0;
    return used;
}

static void ref_head(ef_attn *a, const ef_attn_io *io, int64_t bh, const float *dout, float *dq,
                     float *dk, float *dv) {
    cplan *p = a->impl;
    cwork *w = &p->ws[0];
    rws r = ref_views(a);
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e = s->v_dim, C = p->C, K = p->K;
    int mv = ef_attn_kv_valid(a, io, (int)(bh / s->heads)), kb = EF_MIN(p->topk, mv);
    int improved = p->improved, bottom = !(improved && a->causal);
    const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d,
                *v = io->v + (size_t)bh * m * e;
    cluster_head(a, w, q, bh);
    /* centroids, their probabilities and top keys */
    memset(r.qc, 0, sizeof(double) * C * d);
    for (int i = 0; i < n; i++)
        for (int t = 0; t < d; t++) r.qc[(size_t)w->asg[i] * d + t] += q[(size_t)i * d + t];
    for (int c = 0; c < C; c++)
        for (int t = 0; t < d; t++) r.qc[(size_t)c * d + t] /= w->cnt[c] ? w->cnt[c] : 1;
    for (int j = 0; j < m; j++) r.mark[j] = -1;
    for (int c = 0; c < C && mv > 0; c++) {
        double *lg = r.lg + (size_t)c * m, *A = r.A + (size_t)c * m, mx = -INFINITY, sum = 0;
        for (int j = 0; j < mv; j++) {
            double dot = 0;
            for (int t = 0; t < d; t++) dot += r.qc[(size_t)c * d + t] * k[(size_t)j * d + t];
            lg[j] = dot * a->scale;
            if (lg[j] > mx) mx = lg[j];
        }
        for (int j = 0; j < mv; j++) sum += A[j] = exp(lg[j] - mx);
        for (int j = 0; j < mv; j++) A[j] /= sum;
        r.mass[c] = 1;
        if (improved) {
            topk_select(lg, mv, kb, w->tk + (size_t)c * K);
            double ms = 0;
            for (int x = 0; x < kb; x++) ms += A[w->tk[(size_t)c * K + x]];
            if (!a->causal) r.mass[c] = ms;
        }
        /* vb_c = sum over the keys outside the top set (every key for plain clustered) */
        for (int x = 0; x < kb && improved; x++) r.mark[w->tk[(size_t)c * K + x]] = c;
        for (int t = 0; t < e; t++) {
            double o = 0;
            for (int j = 0; j < mv; j++)
                if (r.mark[j] != c) o += A[j] * v[(size_t)j * e + t];
            r.vb[(size_t)c * e + t] = bottom ? o : 0;
        }
    }
    if (!dout) {
        float *out = io->out + (size_t)bh * n * e;
        for (int i = 0; i < n; i++) {
            int c = w->asg[i];
            const int32_t *tk = w->tk + (size_t)c * K;
            if (improved && mv > 0) ref_top(a, tk, kb, q + (size_t)i * d, k, i, r.p);
            for (int t = 0; t < e; t++) {
                double o = mv > 0 ? r.vb[(size_t)c * e + t] : 0;
                for (int x = 0; x < kb && improved; x++)
                    o += r.mass[c] * r.p[x] * v[(size_t)tk[x] * e + t];
                out[(size_t)i * e + t] = (float)o;
            }
        }
        return;
    }
    const float *g = dout + (size_t)bh * n * e;
    memset(r.gk, 0, sizeof(double) * m * d);
    memset(r.gv, 0, sizeof(double) * m * e);
    memset(r.G, 0, sizeof(double) * C * e);
    memset(r.dm, 0, sizeof(double) * C);
    memset(r.dqc, 0, sizeof(double) * C * d);
    for (int i = 0; i < n; i++)
        for (int t = 0; t < e; t++) r.G[(size_t)w->asg[i] * e + t] += g[(size_t)i * e + t];
    if (improved && mv > 0)
        for (int i = 0; i < n; i++) { /* dm_c = sum_i dO_i . sum_x p_x v_x */
            int c = w->asg[i];
            const int32_t *tk = w->tk + (size_t)c * K;
            ref_top(a, tk, kb, q + (size_t)i * d, k, i, r.p);
            for (int x = 0; x < kb; x++)
                for (int t = 0; t < e; t++)
                    r.dm[c] += r.p[x] * g[(size_t)i * e + t] * v[(size_t)tk[x] * e + t];
        }
    for (int c = 0; c < C && bottom && mv > 0; c++) {
        const double *A = r.A + (size_t)c * m;
        for (int j = 0; j < m; j++) r.mark[j] = -1;
        for (int x = 0; x < kb && improved; x++) r.mark[w->tk[(size_t)c * K + x]] = c;
        double delta = 0;
        for (int j = 0; j < mv; j++) { /* dA_cj = G_c . v_j, or dm_c on the top columns */
            double da = 0;
            if (r.mark[j] == c)
                da = r.dm[c];
            else
                for (int t = 0; t < e; t++) da += r.G[(size_t)c * e + t] * v[(size_t)j * e + t];
            r.lg[(size_t)c * m + j] = da;
            delta += A[j] * da;
        }
        for (int j = 0; j < mv; j++) {
            double ds = A[j] * (r.lg[(size_t)c * m + j] - delta) * a->scale;
            for (int t = 0; t < d; t++) {
                r.dqc[(size_t)c * d + t] += ds * k[(size_t)j * d + t];
                r.gk[(size_t)j * d + t] += ds * r.qc[(size_t)c * d + t];
            }
            if (r.mark[j] != c)
                for (int t = 0; t < e; t++)
                    r.gv[(size_t)j * e + t] += A[j] * r.G[(size_t)c * e + t];
        }
    }
    float *dqh = dq + (size_t)bh * n * d;
    for (int i = 0; i < n; i++) {
        int c = w->asg[i];
        const float *qi = q + (size_t)i * d, *gi = g + (size_t)i * e;
        for (int t = 0; t < d; t++)
            r.gq[t] = bottom && mv > 0 ? r.dqc[(size_t)c * d + t] / w->cnt[c] : 0;
        if (improved && mv > 0) {
            const int32_t *tk = w->tk + (size_t)c * K;
            ref_top(a, tk, kb, qi, k, i, r.p);
            double delta = 0;
            for (int x = 0; x < kb; x++) {
                double dot = 0;
                for (int t = 0; t < e; t++) dot += (double)gi[t] * v[(size_t)tk[x] * e + t];
                r.dp[x] = r.mass[c] * dot;
                delta += r.p[x] * r.dp[x];
            }
            for (int x = 0; x < kb; x++) {
                int j = tk[x];
                double ds = r.p[x] * (r.dp[x] - delta) * a->scale;
                for (int t = 0; t < d; t++) {
                    r.gq[t] += ds * k[(size_t)j * d + t];
                    r.gk[(size_t)j * d + t] += ds * qi[t];
                }
                for (int t = 0; t < e; t++) r.gv[(size_t)j * e + t] += r.mass[c] * r.p[x] * gi[t];
            }
        }
        for (int t = 0; t < d; t++) dqh[(size_t)i * d + t] = (float)r.gq[t];
    }
    for (size_t x = 0; x < (size_t)m * d; x++) dk[(size_t)bh * m * d + x] = (float)r.gk[x];
    for (size_t x = 0; x < (size_t)m * e; x++) dv[(size_t)bh * m * e + x] = (float)r.gv[x];
}

static size_t clu_ref_saved_bytes(const ef_attn *a) {
    (void)a;
    return 0;
}

static ef_status clu_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    (void)saved;
    for (int64_t bh = 0; bh < (int64_t)a->shape.batch * a->shape.heads; bh++)
        ref_head(a, io, bh, NULL, NULL, NULL, NULL);
    return EF_OK;
}

static ef_status clu_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    (void)saved;
    for (int64_t bh = 0; bh < (int64_t)a->shape.batch * a->shape.heads; bh++)
        ref_head(a, io, bh, dout, dq, dk, dv);
    return EF_OK;
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

static size_t align64(size_t n) { return (n + 63) / 64 * 64; }

static ef_status clu_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    int improved = a->ops->n_opts == 4;
    if (!improved && a->causal)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "clustered: causal=1 is not supported (a cluster mixes past and future "
                        "queries); use iclustered:causal=1, which attends only to top-k keys");
    cplan *p = calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    a->impl = p;
    p->improved = improved;
    p->C = (int)EF_MIN(ef_opt_i(a, ef_attn_opt_index(a->ops, "clusters")), (int64_t)s->q_len);
    p->bits = (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "bits"));
    p->iters = (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "iters"));
    p->topk = improved ? (int)ef_opt_i(a, ef_attn_opt_index(a->ops, "topk")) : 0;
    p->K = EF_MIN(p->topk, s->kv_len);
    size_t n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C;
    size_t K = EF_MAX(p->K, 1);
    size_t rb = RB, wd = EF_MAX(d, dv);
    enum { NW = 24 };
    size_t sz[NW] = {8 * n,       8 * C,      4 * n,       4 * C,      4 * (n + C * p->bits),
                     4 * C * K,   4 * C * d,  4 * C * d,   4 * C * m,  4 * C * m,
                     4 * C * dv,  4 * C * dv, 4 * C,       4 * C,      4 * n,
                     4 * (C + 1), 4 * C,      4 * K * d,   4 * K * d,  4 * K * dv,
                     4 * K * dv,  4 * rb * d, 4 * rb * dv, 4 * rb * wd};
    size_t extra[2] = {4 * rb * K, 4 * rb * K};
    size_t per = align64(8 * m);
    for (int i = 0; i < NW; i++) per += align64(sz[i]);
    per += align64(extra[0]) + align64(extra[1]);
    size_t planes = align64(4 * (size_t)s->heads * p->bits * d);
    double total = (double)per * a->slots + planes;
    if (total > 1e12)
        return ef_error(EF_ERR_NOMEM, "%s: workspace of %.3g GB", a->ops->name, total / 1e9);
    p->ws = calloc((size_t)a->slots, sizeof *p->ws);
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
        w->P = (float *)cur, cur += align64(extra[0]);
        w->D1 = (float *)cur, cur += align64(extra[1]);
        w->row = (double *)cur, cur += align64(8 * m);
    }
    /* hyperplane b of head h is elements [b D, (b + 1) D) of the head's draw; stored transposed */
    for (int h = 0; h < s->heads; h++)
        for (int b = 0; b < p->bits; b++)
            for (size_t t = 0; t < d; t++)
                ef_rng_normal(a->seed, STREAM_PLANES | (uint64_t)h, (uint64_t)b * d + t, 1,
                              p->planes + ((size_t)h * d + t) * p->bits + b);
    if (a->ref) {
        size_t nd = ref_doubles(a);
        p->rblock = ef_malloc(nd * sizeof(double));
        if (!p->rblock)
            return ef_error(EF_ERR_NOMEM, "%s: out of memory for the reference path", a->ops->name);
        a->ws_bytes += nd * sizeof(double);
    }
    return EF_OK;
}

static void clu_destroy(ef_attn *a) {
    cplan *p = a->impl;
    if (!p) return;
    ef_free(p->block);
    ef_free(p->rblock);
    free(p->ws);
    free(p);
    a->impl = NULL;
}

static size_t clu_saved_bytes(const ef_attn *a) {
    const cplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads *
           ((size_t)a->shape.q_len + (size_t)p->C * p->K) * sizeof(int32_t);
}

/* Analytic count per head: hashing 2 N bits D, k-means (iters + 1) N C popcounts (counted as 1),
 * centroid scores and values 2 C M (D + Dv), the top part 2 N K (D + Dv); backward recomputes
 * the scores and adds dA, dV, dQc, dK (2 C M (Dv + Dv + D + D)) and 2x the top part. */
static double clu_flops(const ef_attn *a, int backward) {
    const cplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, C = p->C, K = p->K;
    double fwd =
        2 * n * p->bits * d + (p->iters + 1) * n * C + 2 * C * m * (d + dv) + 2 * n * K * (d + dv);
    double bwd = 2 * C * m * d + 2 * C * m * (2 * dv + 2 * d) + 2 * 2 * n * K * (d + dv);
    return (double)s->batch * s->heads * (backward ? fwd + bwd : fwd);
}

const ef_attn_ops ef_attn_ops_clustered = {
    .caps = {.cross = 1, .random = 1, .discrete = 1, .deterministic = 1},
    .name = "clustered",
    .summary =
        "clustered attention: queries k-means-clustered on LSH codes, one softmax per cluster",
    .notes =
        "  codes: bits random hyperplanes per head (sign of q.a, no bias); Hamming k-means from\n"
        "  the seed; each cluster attends with the mean of its queries and every member gets\n"
        "  that output. causal=1 is refused. saves the assignment (int32 per query);\n"
        "  backward holds the clusters fixed. reference (ref=1): same clusters, double loops.",
    .opts = clustered_opts,
    .n_opts = 3,
    .init = clu_init,
    .destroy = clu_destroy,
    .flops = clu_flops,
    .saved_bytes = clu_saved_bytes,
    .forward = clu_forward,
    .backward = clu_backward,
    .ref_saved_bytes = clu_ref_saved_bytes,
    .ref_forward = clu_ref_forward,
    .ref_backward = clu_ref_backward,
};

const ef_attn_ops ef_attn_ops_iclustered = {
    .caps = {.cross = 1, .random = 1, .discrete = 1, .deterministic = 1},
    .name = "iclustered",
    .summary = "improved clustered attention: exact softmax on each cluster's top-k keys",
    .notes = "  clusters as `clustered`; per query: m_c * softmax over the centroid's top-k keys\n"
             "  plus the centroid's attention on the other keys (m_c = its mass on the top-k).\n"
             "  causal=1: only the top-k keys (taken over all visible keys), future ones masked\n"
             "  per query, renormalised; none visible -> zeros. saves the assignment and the\n"
             "  top-k keys; backward holds both fixed. reference (ref=1): double loops.",
    .opts = iclustered_opts,
    .n_opts = 4,
    .init = clu_init,
    .destroy = clu_destroy,
    .flops = clu_flops,
    .saved_bytes = clu_saved_bytes,
    .forward = clu_forward,
    .backward = clu_backward,
    .ref_saved_bytes = clu_ref_saved_bytes,
    .ref_forward = clu_ref_forward,
    .ref_backward = clu_ref_backward,
};
