/*
 * lsh.c - Reformer LSH attention (Kitaev, Kaiser, Levskaya 2020), HF/trax semantics
 * (ALGORITHMS.md b.8) with reformer-pytorch's duplicate-attention correction. docs/lsh.md.
 *
 * Shared QK: the keys are the unit-normalised queries, k_j = q_j / |q_j| (io->k is ignored,
 * q_len must equal kv_len). Logits are scale * q_i . k_j (HF/trax use no scale; see the docs).
 * Per (batch b, head h, round r):
 *   hashing  x = q / |q| (fp32, computed in double and rounded), R = rotation [D][nb/2] drawn
 *            with ef_rng_normal(seed, LSH_STREAM | (h * hashes + r)), bucket = first argmax of
 *            [xR, -xR] with xR in double; the fast path projects with an fp32 GEMM and redoes
 *            near-ties in double, so both paths hash identically; positions >= kv_lens[b] go
 *            to an extra bucket nb (sorted last);
 *   sorting  stable counting sort by (bucket, position): perm[s] = position at sorted index s;
 *   chunks   sorted indices [c C, (c+1) C), the last one shorter when C does not divide N;
 *            chunk c attends to the *set* of chunks {(c + o) mod nc : -before <= o <= after};
 *   masks    key j is attended by query i in round r when j is in the window, j < kv_lens[b],
 *            (!causal || j <= i) and j != i; when no such key exists and i < kv_lens[b], i
 *            attends to itself alone (the self-mask of HF, without a finite sentinel);
 *   dedup    c_ij = number of rounds in which (i, j) is attended; logits get -log c_ij, so
 *            every distinct key counts once (reformer-pytorch allow_duplicate_attention=False);
 *   per round lse_r(i) = logsumexp_j s'_ij, o_r(i) = sum_j exp(s'_ij - lse_r) v_j;
 *   combine  out_i = sum_r softmax_r(lse_r(i)) o_r(i) (online, over the rounds).
 * The combination is one softmax over the (round, key) entries of row i with logits s'_rij:
 * out_i = sum_rj P_rij v_j, P_rij = exp(s'_rij - L_i), L_i = logsumexp_r lse_r(i). Backward is
 * therefore the usual softmax backward over those entries with the hashing held fixed:
 *   delta_i = dO_i . out_i;  dS_rij = P_rij (dO_i . v_j - delta_i)
 *   dq_i += scale sum dS_rij k_j;  dk_j += scale dS_rij q_i;  dv_j += P_rij dO_i
 * and the key gradient flows back into q through k = q/|q|: dq_j += (I - k_j k_j^T) dk_j / |q_j|.
 * io->k gets a zero gradient. A query with |q| = 0 has k = 0 and no gradient through its key.
 *
 * Saved for backward (bytes = B H R N (4 + 4)):
 *   perm [B][H][R][N] int32   sorted index -> position, per round
 *   lse  [B][H][R][N] float   per-row, per-round log-sum-exp (-inf: the row saw nothing)
 * Work: (batch, head) items in parallel, one workspace slot per thread, GEMMs single-threaded.
 * Per chunk: C x W scores, W = C * |window| keys. Time O(B H R (N D nb/2 + N W (D + Dv))),
 * memory O(B H R N) saved + per thread O(N (D + Dv) + C W); no N x N buffer.
 * Reference (ref=1): the attended (round, key) sets built per query by plain loops over all
 * N keys from the same permutations, in double.
 */
#include "attn/attn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { HB = 64 }; /* rows per fp32 projection block */
enum { OPT_HASHES, OPT_BUCKETS, OPT_CHUNK, OPT_BEFORE, OPT_AFTER, OPT_DEDUP };
#define LSH_STREAM (0x4c534800ull << 32)

typedef struct lwork {
    float *xn;           /* [N][D] normalised queries (the keys) */
    float *nrm;          /* [N] |q| */
    float *dkn;          /* [N][D] gradient wrt the normalised keys (backward) */
    int32_t *perm;       /* [R][N] when forward saves nothing */
    float *lse;          /* [R][N] when forward saves nothing */
    int32_t *inv;        /* [R][N] position -> sorted index */
    int32_t *chk;        /* [N][R] position -> chunk, per round (dedup counts) */
    int32_t *selfc;      /* [N] rounds in which the row attends only to itself */
    int32_t *cnt;        /* [nb + 2] counting sort */
    int32_t *bucket;     /* [N] */
    double *y;           /* [nb/2] projections */
    float *yb;           /* [HB][nb/2] projections of a block of rows (fp32 GEMM) */
    float *m, *sw;       /* [N] online combination: running max, running weight sum */
    float *delta;        /* [N] dO . out */
    int32_t *kpos;       /* [W] positions of the window's keys */
    float *Q, *K, *V;    /* [C][D], [W][D], [W][Dv] */
    float *S, *dP;       /* [C][W] */
    float *O, *dO;       /* [C][Dv] */
    float *dQ, *dK, *dV; /* [C][D], [W][D], [W][Dv] */
} lwork;

typedef struct lplan {
    int R, nb, C, before, after, dedup, nc, nwin, W;
    float *rot;     /* [H][R][D][nb/2] */
    float *rmax;    /* [H][R] max |rot| (error bound of the fp32 projections) */
    float logc[65]; /* log(count), count = 0..R */
    lwork *ws;
    void *block;
    /* reference path */
    double *rk, *rs, *rgq, *rgk, *rgv, *rlse, *ro;
    int32_t *rperm, *rinv, *rcount;
    unsigned char *ratt;
    void *rblock;
} lplan;

/* ---------------------------------------------------------------------------------------------
 * Hashing, shared by both paths
 * ------------------------------------------------------------------------------------------- */
/* x = q / |q| in fp32 (double arithmetic: every product below is of two floats, exact in
 * double, so the result does not depend on FMA contraction); nrm = |q| (0 gives x = 0). */
static void normalise(const float *q, int n, int d, float *x, float *nrm) {
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int t = 0; t < d; t++) ss += (double)q[(size_t)i * d + t] * q[(size_t)i * d + t];
        double r = sqrt(ss);
        nrm[i] = (float)r;
        for (int t = 0; t < d; t++)
            x[(size_t)i * d + t] = r > 0 ? (float)(q[(size_t)i * d + t] / r) : 0.0f;
    }
}

/* The bucket of one normalised row: first argmax of [xR, -xR], xR in double (exact products). */
static int exact_bucket(const float *x, const float *rot, int d, int half, double *y) {
    for (int c = 0; c < half; c++) y[c] = 0;
    for (int t = 0; t < d; t++) {
        double xt = x[t];
        for (int c = 0; c < half; c++) y[c] += xt * rot[(size_t)t * half + c];
    }
    int best = 0;
    double bv = y[0];
    for (int c = 1; c < half; c++)
        if (y[c] > bv) bv = y[c], best = c;
    for (int c = 0; c < half; c++)
        if (-y[c] > bv) bv = -y[c], best = half + c;
    return best;
}

/* The same buckets from fp32 GEMM projections of HB rows at a time: a row whose best value
 * beats the runner-up by more than twice the rounding bound of a D-term fp32 dot product
 * (D 2^-23 sum|x_t| max|R|, any summation order) has the same argmax as exact_bucket; the
 * others (near-ties) are recomputed by exact_bucket. Results are identical, only faster. */
static void fast_buckets(const ef_attn *a, lwork *w, int h, int r, int valid, const float *x,
                         int32_t *bucket) {
    const lplan *p = a->impl;
    int d = a->shape.head_dim, half = p->nb / 2;
    const float *rot = p->rot + ((size_t)h * p->R + r) * d * half;
    double rmax = p->rmax[h * p->R + r];
    for (int i0 = 0; i0 < valid; i0 += HB) {
        int rows = EF_MIN(HB, valid - i0);
        ef_sgemm(0, 0, rows, half, d, 1.0f, x + (size_t)i0 * d, d, rot, half, 0.0f, w->yb, half);
        for (int l = 0; l < rows; l++) {
            const float *y = w->yb + (size_t)l * half, *xi = x + (size_t)(i0 + l) * d;
            float b1 = -INFINITY, b2 = -INFINITY;
            int best = 0;
            for (int c = 0; c < 2 * half; c++) {
                float v = c < half ? y[c] : -y[c - half];
                if (v > b1)
                    b2 = b1, b1 = v, best = c;
                else if (v > b2)
                    b2 = v;
            }
            double ax = 0;
            for (int t = 0; t < d; t++) ax += fabsf(xi[t]);
            double bound = (d + 2) * 0x1p-23 * ax * rmax + 1e-30;
            bucket[i0 + l] =
                (double)b1 - b2 > 2 * bound ? best : exact_bucket(xi, rot, d, half, w->y);
        }
    }
}

/* perm[s] (sorted index -> position) and inv for one round from bucket[] (positions >= valid
 * get bucket nb here); buckets computed exactly unless `known`. */
static void hash_round(const ef_attn *a, int h, int r, int valid, const float *x, double *y,
                       int32_t *bucket, int32_t *cnt, int32_t *perm, int32_t *inv, int known) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, half = p->nb / 2;
    const float *rot = p->rot + ((size_t)h * p->R + r) * d * half;
    if (known)
        for (int i = valid; i < n; i++) bucket[i] = p->nb;
    else
        for (int i = 0; i < n; i++)
            bucket[i] = i < valid ? exact_bucket(x + (size_t)i * d, rot, d, half, y) : p->nb;
    for (int c = 0; c <= p->nb + 1; c++) cnt[c] = 0;
    for (int i = 0; i < n; i++) cnt[bucket[i] + 1]++;
    for (int c = 1; c <= p->nb + 1; c++) cnt[c] += cnt[c - 1];
    for (int i = 0; i < n; i++) {
        int s = cnt[bucket[i]]++;
        perm[s] = i;
        inv[i] = s;
    }
}

/* 1 when chunk cj is in the window of chunk ci (a set: each chunk at most once). */
static int in_window(const lplan *p, int ci, int cj) {
    int dd = ((cj - ci) % p->nc + p->nc) % p->nc;
    return dd <= p->after || p->nc - dd <= p->before;
}

/* Number of rounds in which query i attends key j != i (the pair's masks do not depend on
 * the round, only the window does); chk = [N][R] chunk of each position in each round. */
static int pair_count(const lplan *p, const int32_t *chk, int i, int j) {
    const int32_t *ci = chk + (size_t)i * p->R, *cj = chk + (size_t)j * p->R;
    int c = 0;
    for (int r = 0; r < p->R; r++) {
        int dd = cj[r] - ci[r];
        dd += dd < 0 ? p->nc : 0;
        c += dd <= p->after || p->nc - dd <= p->before;
    }
    return c;
}

/* The distinct chunks of the window of chunk c, in offset order -before..after. */
static int window_chunks(const lplan *p, int c, int *out) {
    int m = 0;
    for (int o = -p->before; o <= p->after; o++) {
        int cc = ((c + o) % p->nc + p->nc) % p->nc, dup = 0;
        for (int t = 0; t < m; t++) dup |= out[t] == cc;
        if (!dup) out[m++] = cc;
    }
    return m;
}

/* ---------------------------------------------------------------------------------------------
 * Plan
 * ------------------------------------------------------------------------------------------- */
static void lsh_destroy(ef_attn *a) {
    lplan *p = a->impl;
    if (!p) return;
    ef_free(p->rot);
    free(p->rmax);
    ef_free(p->block);
    ef_free(p->rblock);
    free(p->ws);
    free(p);
    a->impl = NULL;
}

static ef_status lsh_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    if (s->q_len != s->kv_len)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "lsh: shared-QK attention needs q_len == kv_len "
                        "(got %d and %d)",
                        s->q_len, s->kv_len);
    lplan *p = calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the plan");
    a->impl = p;
    int n = s->q_len, d = s->head_dim, dv = s->v_dim;
    p->R = (int)ef_opt_i(a, OPT_HASHES);
    p->C = (int)ef_opt_i(a, OPT_CHUNK);
    p->before = (int)ef_opt_i(a, OPT_BEFORE);
    p->after = (int)ef_opt_i(a, OPT_AFTER);
    p->dedup = (int)ef_opt_i(a, OPT_DEDUP);
    if (a->opt[OPT_BUCKETS].is_auto) {
        p->nb = 2; /* 2^floor(log2(2N / chunk)), at least 2 */
        while ((double)p->nb * 2 <= 2.0 * n / p->C) p->nb *= 2;
    } else {
        p->nb = (int)ef_opt_i(a, OPT_BUCKETS);
        if (p->nb % 2)
            return ef_error(EF_ERR_ARG, "lsh: buckets=%d must be even (argmax over [xR, -xR])",
                            p->nb);
    }
    p->nc = (n + p->C - 1) / p->C;
    for (int c = 1; c <= p->R; c++) p->logc[c] = logf((float)c);
    int tmp[130];
    p->nwin = window_chunks(p, 0, tmp);
    p->W = EF_MIN(n, p->nwin * p->C);
    int half = p->nb / 2, C = EF_MIN(p->C, n), W = p->W, R = p->R;

    size_t nrot = (size_t)s->heads * R * d * half;
    p->rot = ef_malloc(nrot * sizeof(float));
    p->rmax = malloc(sizeof(float) * s->heads * R);
    if (!p->rot || !p->rmax) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the rotations");
    for (int h = 0; h < s->heads; h++)
        for (int r = 0; r < R; r++) {
            float *rot = p->rot + ((size_t)h * R + r) * d * half, mx = 0;
            ef_rng_normal(a->seed, LSH_STREAM | (uint64_t)(h * R + r), 0, (size_t)d * half, rot);
            for (size_t x = 0; x < (size_t)d * half; x++)
                mx = fabsf(rot[x]) > mx ? fabsf(rot[x]) : mx;
            p->rmax[h * R + r] = mx;
        }

    if (a->ref) {
        size_t no = (size_t)EF_MAX(R * dv, half);
        size_t nd = (size_t)n * d * 3 + (size_t)n * dv + (size_t)R * n + (size_t)(R + n) + no;
        size_t ni = (size_t)R * n * 2 + (size_t)n * 2 + (size_t)p->nb + 2;
        size_t bytes = nd * sizeof(double) + ni * sizeof(int32_t) + (size_t)R * n;
        p->rblock = ef_malloc(bytes);
        if (!p->rblock) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for the reference");
        a->ws_bytes = bytes + nrot * sizeof(float);
        double *x = p->rblock;
        p->rk = x, x += (size_t)n * d;
        p->rgq = x, x += (size_t)n * d;
        p->rgk = x, x += (size_t)n * d;
        p->rgv = x, x += (size_t)n * dv;
        p->rs = x, x += (size_t)R * n;
        p->rlse = x, x += (size_t)(R + n);
        p->ro = x, x += no;
        int32_t *iw = (int32_t *)x;
        p->rperm = iw, iw += (size_t)R * n;
        p->rinv = iw, iw += (size_t)R * n;
        p->rcount = iw, iw += (size_t)n * 2 + p->nb + 2;
        p->ratt = (unsigned char *)iw;
        return EF_OK;
    }
    size_t f = (size_t)n * d * 2 + (size_t)n * 5 + (size_t)R * n + (size_t)C * d * 2 +
               (size_t)W * d * 2 + (size_t)W * dv * 2 + (size_t)C * W * 2 + (size_t)C * dv * 2;
    size_t ni = (size_t)R * n * 3 + (size_t)n * 2 + (size_t)p->nb + 2 + (size_t)W;
    size_t per =
        ((f * 4 + ni * 4 + (size_t)half * 8 + (size_t)HB * half * 4) + 63) / 64 * 64 + 64 * 32;
    p->ws = calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_malloc(per * a->slots);
    if (!p->ws || !p->block) return ef_error(EF_ERR_NOMEM, "lsh: out of memory for workspace");
    a->ws_bytes = per * a->slots + nrot * sizeof(float);
    for (int t = 0; t < a->slots; t++) {
        char *c = (char *)p->block + per * t;
#define TAKE(ptr, cnt)                                                                             \
    do {                                                                                           \
        ptr = (void *)c;                                                                           \
        c += ((cnt) * sizeof *(ptr) + 63) / 64 * 64;                                               \
    } while (0)
        lwork *w = &p->ws[t];
        TAKE(w->y, (size_t)half);
        TAKE(w->yb, (size_t)HB * half);
        TAKE(w->xn, (size_t)n * d);
        TAKE(w->dkn, (size_t)n * d);
        TAKE(w->nrm, (size_t)n);
        TAKE(w->m, (size_t)n);
        TAKE(w->sw, (size_t)n);
        TAKE(w->delta, (size_t)n);
        TAKE(w->lse, (size_t)R * n);
        TAKE(w->Q, (size_t)C * d);
        TAKE(w->dQ, (size_t)C * d);
        TAKE(w->K, (size_t)W * d);
        TAKE(w->dK, (size_t)W * d);
        TAKE(w->V, (size_t)W * dv);
        TAKE(w->dV, (size_t)W * dv);
        TAKE(w->S, (size_t)C * W);
        TAKE(w->dP, (size_t)C * W);
        TAKE(w->O, (size_t)C * dv);
        TAKE(w->dO, (size_t)C * dv);
        TAKE(w->perm, (size_t)R * n);
        TAKE(w->inv, (size_t)R * n);
        TAKE(w->chk, (size_t)R * n);
        TAKE(w->selfc, (size_t)n);
        TAKE(w->bucket, (size_t)n);
        TAKE(w->cnt, (size_t)p->nb + 2);
        TAKE(w->kpos, (size_t)W);
#undef TAKE
    }
    return EF_OK;
}

static size_t lsh_saved_bytes(const ef_attn *a) {
    const lplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads * p->R * a->shape.q_len *
           (sizeof(int32_t) + sizeof(float));
}

static int64_t lsh_pairs(const ef_attn *a, int head) {
    (void)head;
    const lplan *p = a->impl;
    return (int64_t)p->R * a->shape.q_len * p->W;
}

static double lsh_flops(const ef_attn *a, int backward) {
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double pairs = (double)s->batch * s->heads * lsh_pairs(a, 0), d = s->head_dim, dv = s->v_dim;
    double hash = (double)s->batch * s->heads * p->R * s->q_len * d * p->nb;
    return hash + (backward ? pairs * (2 * (3 * d + 2 * dv) + 2 * (d + dv)) : pairs * 2 * (d + dv));
}

/* ---------------------------------------------------------------------------------------------
 * Fast path
 * ------------------------------------------------------------------------------------------- */
typedef struct ljob {
    ef_attn *a;
    const ef_attn_io *io;
    int32_t *perm; /* saved (or NULL) */
    float *lse;
    const float *dout;
    float *dq, *dv;
} ljob;

/* Rows of one round's chunk c: gathers Q, K, V, computes the masked, deduplicated logits into
 * w->S (C x nk, row stride W). Returns the number of keys nk; *nq gets the rows. */
static int chunk_scores(const ef_attn *a, lwork *w, const float *q, const float *v, int valid,
                        const int32_t *perm, int c, int *nq_out, int32_t *qpos) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim, dv = a->shape.v_dim, W = p->W;
    int chunks[130];
    int m = window_chunks(p, c, chunks), nk = 0, self_base = -1;
    for (int t = 0; t < m; t++) {
        int s0 = chunks[t] * p->C, s1 = EF_MIN(n, s0 + p->C);
        if (chunks[t] == c) self_base = nk;
        for (int sidx = s0; sidx < s1; sidx++, nk++) {
            int j = perm[sidx];
            w->kpos[nk] = j;
            memcpy(w->K + (size_t)nk * d, w->xn + (size_t)j * d, sizeof(float) * d);
            memcpy(w->V + (size_t)nk * dv, v + (size_t)j * dv, sizeof(float) * dv);
        }
    }
    int s0 = c * p->C, nq = EF_MIN(n, s0 + p->C) - s0;
    for (int l = 0; l < nq; l++) {
        qpos[l] = perm[s0 + l];
        memcpy(w->Q + (size_t)l * d, q + (size_t)qpos[l] * d, sizeof(float) * d);
    }
    ef_sgemm(0, 1, nq, nk, d, a->scale, w->Q, d, w->K, d, 0.0f, w->S, W);
    for (int l = 0; l < nq; l++) {
        int i = qpos[l], any = 0;
        float *srow = w->S + (size_t)l * W, selfv = srow[self_base + l];
        for (int x = 0; x < nk; x++) {
            int j = w->kpos[x];
            if (j >= valid || (a->causal && j > i) || j == i) {
                srow[x] = -INFINITY;
                continue;
            }
            any = 1;
            if (p->dedup && p->R > 1) {
                int cn = pair_count(p, w->chk, i, j);
                srow[x] -= p->logc[cn];
            }
        }
        if (!any && i < valid) { /* the self-mask: itself only when nothing else is visible */
            srow[self_base + l] = selfv;
            if (p->dedup && p->R > 1) srow[self_base + l] -= p->logc[w->selfc[i]];
        }
    }
    *nq_out = nq;
    return nk;
}

/* Rounds in which each valid row has no visible key but itself (needed by dedup counts). */
static void self_counts(const ef_attn *a, lwork *w, const int32_t *perm, int valid) {
    const lplan *p = a->impl;
    int n = a->shape.q_len;
    memset(w->selfc, 0, sizeof(int32_t) * n);
    int chunks[130];
    for (int r = 0; r < p->R; r++) {
        const int32_t *pr = perm + (size_t)r * n;
        for (int c = 0; c < p->nc; c++) {
            int m = window_chunks(p, c, chunks);
            for (int sq = c * p->C; sq < EF_MIN(n, (c + 1) * p->C); sq++) {
                int i = pr[sq], any = 0;
                if (i >= valid) continue;
                for (int t = 0; t < m && !any; t++)
                    for (int sk = chunks[t] * p->C; sk < EF_MIN(n, (chunks[t] + 1) * p->C); sk++) {
                        int j = pr[sk];
                        if (j < valid && (!a->causal || j <= i) && j != i) {
                            any = 1;
                            break;
                        }
                    }
                w->selfc[i] += !any;
            }
        }
    }
}

/* Normalised keys, permutations (hashed, or read from saved), inverse permutations, self counts. */
static void prepare(const ef_attn *a, lwork *w, const float *q, int h, int valid, int32_t *perm,
                    int rehash) {
    const lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    normalise(q, n, d, w->xn, w->nrm);
    for (int r = 0; r < p->R; r++) {
        int32_t *pr = perm + (size_t)r * n, *ir = w->inv + (size_t)r * n;
        if (rehash) {
            fast_buckets(a, w, h, r, valid, w->xn, w->bucket);
            hash_round(a, h, r, valid, w->xn, w->y, w->bucket, w->cnt, pr, ir, 1);
        } else
            for (int s = 0; s < n; s++) ir[pr[s]] = s;
    }
    if (p->dedup && p->R > 1) {
        for (int r = 0; r < p->R; r++)
            for (int i = 0; i < n; i++)
                w->chk[(size_t)i * p->R + r] = w->inv[(size_t)r * n + i] / p->C;
        self_counts(a, w, perm, valid);
    } else
        for (int i = 0; i < n; i++) w->selfc[i] = 1;
}

static void forward_head(void *ctx, int64_t item, int tid) {
    ljob *j = ctx;
    ef_attn *a = j->a;
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    lwork *w = &p->ws[tid];
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, b = (int)(item / s->heads),
        h = (int)(item % s->heads), valid = ef_attn_kv_valid(a, j->io, b), W = p->W;
    const float *q = j->io->q + (size_t)item * n * d, *v = j->io->v + (size_t)item * n * dv;
    float *out = j->io->out + (size_t)item * n * dv;
    int32_t *perm = j->perm ? j->perm + (size_t)item * p->R * n : w->perm;
    float *lse = j->lse ? j->lse + (size_t)item * p->R * n : w->lse;
    int old = ef_gemm_local_threads(1);
    prepare(a, w, q, h, valid, perm, 1);
    memset(out, 0, sizeof(float) * n * dv);
    for (int i = 0; i < n; i++) w->m[i] = -INFINITY, w->sw[i] = 0;
    for (int r = 0; r < p->R; r++) {
        const int32_t *pr = perm + (size_t)r * n;
        for (int c = 0; c < p->nc; c++) {
            int nq;
            int32_t *rows = w->bucket; /* [N] scratch, free once hashed */
            int nk = chunk_scores(a, w, q, v, valid, pr, c, &nq, rows);
            for (int l = 0; l < nq; l++) {
                float *srow = w->S + (size_t)l * W, mx = -INFINITY;
                for (int x = 0; x < nk; x++) mx = srow[x] > mx ? srow[x] : mx;
                int i = rows[l];
                if (mx == -INFINITY) {
                    for (int x = 0; x < nk; x++) srow[x] = 0;
                    lse[(size_t)r * n + i] = -INFINITY;
                    continue;
                }
                for (int x = 0; x < nk; x++) srow[x] -= mx;
                ef_vexp(srow, srow, (size_t)nk);
                double sum = 0;
                for (int x = 0; x < nk; x++) sum += srow[x];
                float inv = (float)(1.0 / sum);
                for (int x = 0; x < nk; x++) srow[x] *= inv;
                lse[(size_t)r * n + i] = mx + (float)log(sum);
            }
            ef_sgemm(0, 0, nq, dv, nk, 1.0f, w->S, W, w->V, dv, 0.0f, w->O, dv);
            for (int l = 0; l < nq; l++) { /* online combination over the rounds */
                int i = rows[l];
                float lr = lse[(size_t)r * n + i];
                if (lr == -INFINITY) continue;
                float mnew = lr > w->m[i] ? lr : w->m[i];
                float fo = w->m[i] == -INFINITY ? 0.0f : expf(w->m[i] - mnew), fr = expf(lr - mnew);
                float *o = out + (size_t)i * dv;
                for (int e = 0; e < dv; e++) o[e] = o[e] * fo + w->O[(size_t)l * dv + e] * fr;
                w->sw[i] = w->sw[i] * fo + fr;
                w->m[i] = mnew;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        if (w->sw[i] == 0) continue;
        float inv = 1.0f / w->sw[i];
        for (int e = 0; e < dv; e++) out[(size_t)i * dv + e] *= inv;
    }
    ef_gemm_local_threads(old);
}

static ef_status lsh_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    const lplan *p = a->impl;
    size_t bhrn = (size_t)s->batch * s->heads * p->R * s->q_len;
    ljob j = {a,
              io,
              saved ? (int32_t *)saved : NULL,
              saved ? (float *)((int32_t *)saved + bhrn) : NULL,
              NULL,
              NULL,
              NULL};
    ef_parallel_for((int64_t)s->batch * s->heads, ef_attn_threads(a), forward_head, &j);
    return EF_OK;
}

static void backward_head(void *ctx, int64_t item, int tid) {
    ljob *j = ctx;
    ef_attn *a = j->a;
    const lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    lwork *w = &p->ws[tid];
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, b = (int)(item / s->heads),
        h = (int)(item % s->heads), valid = ef_attn_kv_valid(a, j->io, b), W = p->W;
    const float *q = j->io->q + (size_t)item * n * d, *v = j->io->v + (size_t)item * n * dv;
    const float *out = j->io->out + (size_t)item * n * dv, *g = j->dout + (size_t)item * n * dv;
    float *dq = j->dq + (size_t)item * n * d, *dvo = j->dv + (size_t)item * n * dv;
    int32_t *perm = j->perm + (size_t)item * p->R * n;
    const float *lse = j->lse + (size_t)item * p->R * n;
    int old = ef_gemm_local_threads(1);
    prepare(a, w, q, h, valid, perm, 0);
    /* L_i = logsumexp_r lse_r(i) (w->m), delta_i = dO_i . out_i */
    for (int i = 0; i < n; i++) {
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
        double dl = 0;
        for (int e = 0; e < dv; e++) dl += (double)g[(size_t)i * dv + e] * out[(size_t)i * dv + e];
        w->delta[i] = (float)dl;
    }
    memset(dq, 0, sizeof(float) * n * d);
    memset(dvo, 0, sizeof(float) * n * dv);
    memset(w->dkn, 0, sizeof(float) * n * d);
    for (int r = 0; r < p->R; r++) {
        const int32_t *pr = perm + (size_t)r * n;
        for (int c = 0; c < p->nc; c++) {
            int nq;
            int32_t *rows = w->bucket;
            int nk = chunk_scores(a, w, q, v, valid, pr, c, &nq, rows);
            for (int l = 0; l < nq; l++) {
                int i = rows[l];
                float *srow = w->S + (size_t)l * W, L = w->m[i];
                memcpy(w->dO + (size_t)l * dv, g + (size_t)i * dv, sizeof(float) * dv);
                if (L == -INFINITY) {
                    for (int x = 0; x < nk; x++) srow[x] = 0;
                    continue;
                }
                for (int x = 0; x < nk; x++) srow[x] -= L;
                ef_vexp(srow, srow, (size_t)nk);
            }
            /* dP = dO V^T; dS = P (dP - delta) */
            ef_sgemm(0, 1, nq, nk, dv, 1.0f, w->dO, dv, w->V, dv, 0.0f, w->dP, W);
            for (int l = 0; l < nq; l++) {
                float *pp = w->S + (size_t)l * W, *dp = w->dP + (size_t)l * W,
                      de = w->delta[rows[l]];
                for (int x = 0; x < nk; x++) dp[x] = pp[x] * (dp[x] - de);
            }
            ef_sgemm(0, 0, nq, d, nk, a->scale, w->dP, W, w->K, d, 0.0f, w->dQ, d);
            ef_sgemm(1, 0, nk, d, nq, a->scale, w->dP, W, w->Q, d, 0.0f, w->dK, d);
            ef_sgemm(1, 0, nk, dv, nq, 1.0f, w->S, W, w->dO, dv, 0.0f, w->dV, dv);
            for (int l = 0; l < nq; l++) {
                float *dst = dq + (size_t)rows[l] * d;
                for (int t = 0; t < d; t++) dst[t] += w->dQ[(size_t)l * d + t];
            }
            for (int x = 0; x < nk; x++) {
                int jj = w->kpos[x];
                float *dk = w->dkn + (size_t)jj * d, *dvv = dvo + (size_t)jj * dv;
                for (int t = 0; t < d; t++) dk[t] += w->dK[(size_t)x * d + t];
                for (int e = 0; e < dv; e++) dvv[e] += w->dV[(size_t)x * dv + e];
            }
        }
    }
    /* k = q/|q|: dq += (dk - k (k . dk)) / |q| */
    for (int i = 0; i < n; i++) {
        if (w->nrm[i] == 0) continue;
        const float *k = w->xn + (size_t)i * d, *dk = w->dkn + (size_t)i * d;
        double kd = 0;
        for (int t = 0; t < d; t++) kd += (double)k[t] * dk[t];
        float inv = 1.0f / w->nrm[i];
        for (int t = 0; t < d; t++) dq[(size_t)i * d + t] += (dk[t] - k[t] * (float)kd) * inv;
    }
    ef_gemm_local_threads(old);
}

static ef_status lsh_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    const lplan *p = a->impl;
    size_t bhrn = (size_t)s->batch * s->heads * p->R * s->q_len;
    ljob j = {a, io, (int32_t *)saved, (float *)((const int32_t *)saved + bhrn), dout, dq, dv};
    memset(dk, 0, sizeof(float) * s->batch * s->heads * s->kv_len * s->head_dim);
    ef_parallel_for((int64_t)s->batch * s->heads, ef_attn_threads(a), backward_head, &j);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Reference (ref=1): per query, the attended (round, key) pairs by plain loops, in double.
 * Saved: the same perm/lse layout (lse filled too), so backward reuses the hashing.
 * ------------------------------------------------------------------------------------------- */
/* Hashing of one (b, h) into perm/inv (fp32 keys as in the fast path); kd = keys in double. */
static void ref_prepare(const ef_attn *a, const float *q, int h, int valid, int32_t *perm,
                        int rehash, double *nrmd) {
    lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    float *xf = (float *)p->rgq, *nf = (float *)p->rgv; /* scratch, reused before use */
    normalise(q, n, d, xf, nf);
    for (int r = 0; r < p->R; r++) {
        int32_t *pr = perm + (size_t)r * n, *ir = p->rinv + (size_t)r * n;
        if (rehash)
            hash_round(a, h, r, valid, xf, p->ro, p->rcount, p->rcount + n, pr, ir, 0);
        else
            for (int s = 0; s < n; s++) ir[pr[s]] = s;
    }
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int t = 0; t < d; t++) ss += (double)q[(size_t)i * d + t] * q[(size_t)i * d + t];
        nrmd[i] = sqrt(ss);
        for (int t = 0; t < d; t++)
            p->rk[(size_t)i * d + t] = nrmd[i] > 0 ? q[(size_t)i * d + t] / nrmd[i] : 0;
    }
}

/* att[r][j] = 1 when query i attends key j in round r; count[j] = rounds. */
static void ref_attended(const ef_attn *a, int i, int valid) {
    lplan *p = a->impl;
    int n = a->shape.q_len;
    memset(p->rcount, 0, sizeof(int32_t) * n);
    for (int r = 0; r < p->R; r++) {
        unsigned char *att = p->ratt + (size_t)r * n;
        const int32_t *ir = p->rinv + (size_t)r * n;
        int any = 0;
        for (int j = 0; j < n; j++) {
            att[j] = in_window(p, ir[i] / p->C, ir[j] / p->C) && j < valid &&
                     (!a->causal || j <= i) && j != i;
            any |= att[j];
        }
        if (!any && i < valid) att[i] = 1;
        for (int j = 0; j < n; j++) p->rcount[j] += att[j];
    }
}

/* Logits s_rj (double, -inf when not attended) of row i into p->rs [R][N]; returns L_i. */
static double ref_logits(const ef_attn *a, const float *q, int i, double *lse_r) {
    lplan *p = a->impl;
    int n = a->shape.q_len, d = a->shape.head_dim;
    double L = -INFINITY;
    for (int r = 0; r < p->R; r++) {
        double *sr = p->rs + (size_t)r * n, mx = -INFINITY;
        const unsigned char *att = p->ratt + (size_t)r * n;
        for (int j = 0; j < n; j++) {
            sr[j] = -INFINITY;
            if (!att[j]) continue;
            double dot = 0;
            for (int t = 0; t < d; t++)
                dot += (double)q[(size_t)i * d + t] * p->rk[(size_t)j * d + t];
            sr[j] = a->scale * dot - (p->dedup ? log((double)p->rcount[j]) : 0.0);
            if (sr[j] > mx) mx = sr[j];
        }
        double sum = 0;
        for (int j = 0; j < n; j++)
            if (att[j]) sum += exp(sr[j] - mx);
        lse_r[r] = mx == -INFINITY ? -INFINITY : mx + log(sum);
    }
    double mx = -INFINITY;
    for (int r = 0; r < p->R; r++) mx = lse_r[r] > mx ? lse_r[r] : mx;
    if (mx == -INFINITY) return mx;
    double sum = 0;
    for (int r = 0; r < p->R; r++) sum += exp(lse_r[r] - mx);
    L = mx + log(sum);
    return L;
}

static ef_status lsh_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, dv = s->v_dim, R = p->R;
    size_t bhrn = (size_t)s->batch * s->heads * R * n;
    for (int b = 0; b < s->batch; b++)
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            int valid = ef_attn_kv_valid(a, io, b);
            const float *q = io->q + bh * n * d, *v = io->v + bh * n * dv;
            int32_t *perm = saved ? (int32_t *)saved + bh * R * n : p->rperm;
            float *lse = saved ? (float *)((int32_t *)saved + bhrn) + bh * R * n : NULL;
            double *nrmd = p->rgk;
            ref_prepare(a, q, h, valid, perm, 1, nrmd);
            for (int i = 0; i < n; i++) {
                ref_attended(a, i, valid);
                ref_logits(a, q, i, p->rlse);
                /* per round: o_r = sum_j exp(s - lse_r) v_j; then out = sum_r softmax(lse) o_r */
                double mx = -INFINITY, wsum = 0;
                for (int r = 0; r < R; r++) mx = p->rlse[r] > mx ? p->rlse[r] : mx;
                for (int r = 0; r < R; r++) {
                    if (lse) lse[(size_t)r * n + i] = (float)p->rlse[r];
                    double *o = p->ro + (size_t)r * dv;
                    for (int e = 0; e < dv; e++) o[e] = 0;
                    if (p->rlse[r] == -INFINITY) continue;
                    wsum += exp(p->rlse[r] - mx);
                    for (int j = 0; j < n; j++) {
                        double sj = p->rs[(size_t)r * n + j];
                        if (sj == -INFINITY) continue;
                        double pj = exp(sj - p->rlse[r]);
                        for (int e = 0; e < dv; e++) o[e] += pj * v[(size_t)j * dv + e];
                    }
                }
                float *out = io->out + (bh * n + i) * dv;
                for (int e = 0; e < dv; e++) {
                    double acc = 0;
                    for (int r = 0; r < R; r++)
                        if (p->rlse[r] != -INFINITY)
                            acc += exp(p->rlse[r] - mx) / wsum * p->ro[(size_t)r * dv + e];
                    out[e] = (float)acc;
                }
            }
        }
    return EF_OK;
}

static ef_status lsh_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv) {
    lplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, d = s->head_dim, e_ = s->v_dim, R = p->R;
    memset(dk, 0, sizeof(float) * s->batch * s->heads * n * d);
    for (int b = 0; b < s->batch; b++)
        for (int h = 0; h < s->heads; h++) {
            size_t bh = (size_t)b * s->heads + h;
            int valid = ef_attn_kv_valid(a, io, b);
            const float *q = io->q + bh * n * d, *v = io->v + bh * n * e_;
            int32_t *perm = (int32_t *)saved + bh * R * n;
            double *nrmd = p->rlse + R; /* [N] after the R per-round lse values */
            ref_prepare(a, q, h, valid, perm, 0, nrmd);
            double *gq = p->rgq, *gk = p->rgk, *gv = p->rgv;
            memset(gq, 0, sizeof(double) * n * d);
            memset(gk, 0, sizeof(double) * n * d);
            memset(gv, 0, sizeof(double) * n * e_);
            for (int i = 0; i < n; i++) {
                ref_attended(a, i, valid);
                double L = ref_logits(a, q, i, p->rlse);
                if (L == -INFINITY) continue;
                const float *gi = dout + (bh * n + i) * e_;
                /* out_i = sum_rj P_rij v_j, P = exp(s' - L) */
                double delta = 0;
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < n; j++) {
                        double sj = p->rs[(size_t)r * n + j];
                        if (sj == -INFINITY) continue;
                        double pj = exp(sj - L), dp = 0;
                        for (int e = 0; e < e_; e++) dp += (double)gi[e] * v[(size_t)j * e_ + e];
                        delta += pj * dp;
                    }
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < n; j++) {
                        double sj = p->rs[(size_t)r * n + j];
                        if (sj == -INFINITY) continue;
                        double pj = exp(sj - L), dp = 0;
                        for (int e = 0; e < e_; e++) dp += (double)gi[e] * v[(size_t)j * e_ + e];
                        double ds = pj * (dp - delta) * a->scale;
                        for (int t = 0; t < d; t++) {
                            gq[(size_t)i * d + t] += ds * p->rk[(size_t)j * d + t];
                            gk[(size_t)j * d + t] += ds * q[(size_t)i * d + t];
                        }
                        for (int e = 0; e < e_; e++) gv[(size_t)j * e_ + e] += pj * gi[e];
                    }
            }
            for (int j = 0; j < n; j++) {
                double kd = 0;
                for (int t = 0; t < d; t++) kd += p->rk[(size_t)j * d + t] * gk[(size_t)j * d + t];
                for (int t = 0; t < d; t++) {
                    double x = gq[(size_t)j * d + t];
                    if (nrmd[j] > 0)
                        x += (gk[(size_t)j * d + t] - p->rk[(size_t)j * d + t] * kd) / nrmd[j];
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
     "buckets per round (even); auto = 2^floor(log2(2N/chunk)), at least 2"},
    {"chunk", EF_OPT_INT, "64", 1, 1 << 20, NULL, 0, "sorted positions per chunk"},
    {"before", EF_OPT_INT, "1", 0, 64, NULL, 0, "previous chunks each chunk attends (cyclic)"},
    {"after", EF_OPT_INT, "0", 0, 64, NULL, 0, "next chunks each chunk attends (cyclic)"},
    {"dedup", EF_OPT_BOOL, "1", 0, 1, NULL, 0,
     "count each (query, key) pair once over the rounds (logit - log count)"},
};

const ef_attn_ops ef_attn_ops_lsh = {
    .caps = {.causal = 1, .random = 1, .discrete = 1, .deterministic = 1},
    .name = "lsh",
    .summary = "Reformer LSH attention: shared QK, hashed buckets, sorted chunks, O(N R W D)",
    .notes = "  shared QK: keys are q/|q| (io->k is ignored and gets a zero gradient); needs\n"
             "  q_len == kv_len; logits are scale * q.k (HF/trax use no scale: pass scale=1).\n"
             "  a query sees itself only when no other key is visible; padded positions hash to\n"
             "  an extra last bucket. saves the sort permutation and per-round lse of every row\n"
             "  (backward reuses the hashing); reference (ref=1): explicit per-query sets.",
    .opts = lsh_opts,
    .n_opts = 6,
    .init = lsh_init,
    .destroy = lsh_destroy,
    .flops = lsh_flops,
    .pairs = lsh_pairs,
    .saved_bytes = lsh_saved_bytes,
    .forward = lsh_forward,
    .backward = lsh_backward,
    .ref_saved_bytes = lsh_saved_bytes,
    .ref_forward = lsh_ref_forward,
    .ref_backward = lsh_ref_backward,
};
