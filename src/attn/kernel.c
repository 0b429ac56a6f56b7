/*
 * kernel.c - kernelised attention: out_i = phi(q_i) S / phi(q_i) z with S = sum_j phi(k_j) v_j^T
 * and z = sum_j phi(k_j), in O(N F (D + Dv)) time and O(F Dv) state. Two mechanisms share it:
 *   linear     Linear Transformer (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, F = D
 *   performer  Performer FAVOR+ (Choromanski et al. 2021): random features of the softmax
 *              kernel, phi(x) ~ exp(W x^ - |x^|^2/2) / sqrt(m), x^ = x sqrt(scale)
 * docs/kernel.md derives the forward, the backward and the stabilisation.
 *
 * Per (batch, head), in chunks of KC positions:
 *   non-causal: pass 1 over key chunks accumulates S, z; pass 2 over query chunks computes
 *     num = Phi_q S, den = Phi_q z (+ eps), out = num / den;
 *   causal: one pass; chunk c adds the intra-chunk part A = tril(Phi_q,c Phi_k,c^T):
 *     num = Phi_q,c S_<c + A V_c, den = Phi_q,c z_<c + A 1, then S += Phi_k,c^T V_c, z += ...
 * Padded keys (j >= kv_lens[b]) get phi = 0 *after* the feature map, so they vanish from the
 * numerator and the normaliser alike (elu(0)+1 != 0: masking V alone would leak them).
 * Stabilisation (performer, stabilize=1): exponent features are computed as exp(g - c) with
 * c = the row's max for a query (cancels in num / den) and, for keys, a running max over the
 * chunks seen so far; when it grows, S and z are rescaled by exp(c_old - c_new), as an online
 * softmax does, so the causal result never depends on future keys and never overflows.
 * Saved for backward: den [B][H][N] and the key shift of every chunk [B][H][chunks].
 * Backward: causal = a forward sweep for dq (S, z rebuilt) and a reverse sweep for dk, dv
 * (dS, dz of the later chunks carried back, rescaled by the saved shifts); non-causal = the
 * same without the triangle. Nothing per position is stored beyond den.
 * Work items are (batch, head) pairs; their GEMMs run single-threaded so results do not
 * depend on the thread count.
 */
#include "attn/attn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { KC = 128 };
enum { KM_ELU, KM_SOFTMAX, KM_HYP, KM_TRIG, KM_RELU };

typedef struct kwork {
    float *phq, *phk; /* [KC][F] features of a query / key chunk (log values before exp) */
    float *uq, *uk;   /* [KC][m] projections W x^ (performer) */
    float *nq, *nk;   /* [KC] |x^|^2 / 2 */
    float *shq;       /* [KC] per-row query shifts */
    float *shk;       /* [KC] per-key own shifts (causal) */
    float *pr, *rho;  /* [KC] per-row prefix key shift P_r, exp(c_prev - P_r) (causal) */
    float *ksc;       /* [KC] per-key factor exp(s_j - c) (causal backward) */
    float *A;         /* [KC][KC] intra-chunk scores (causal) */
    float *num;       /* [KC][Dv] */
    float *S, *z;     /* [F][Dv], [F] */
    float *dS, *dz;   /* [F][Dv], [F] */
    float *G, *dd;    /* [KC][Dv] dO / den, [KC] -(dO . out) / den */
    float *dph;       /* [KC][F] gradient wrt features */
    float *dA;        /* [KC][KC] */
    float *tmp;       /* [KC][max(F, D)] */
} kwork;

typedef struct kplan {
    int kind, F, m; /* feature map, features, random projections */
    float xs;       /* x^ = x * xs */
    float eps;      /* added to the denominator */
    int stabilize, redraw, nchunks;
    int64_t epoch, calls; /* feature draw in use; training forwards since the last draw */
    float *W;             /* [m][D] random projections (performer) */
    double *qr;           /* QR workspace (D x D doubles) */
    float *gtmp;          /* [D] Gaussian draws for the row norms */
    kwork *ws;
    void *block;
    float *rq, *rk, *ruq, *ruk, *rnq, *rnk, *rdq, *rdk, *rtmp; /* reference path (ref=1) */
    void *rblock;
} kplan;

/* ---------------------------------------------------------------------------------------------
 * Random features: orthogonal blocks (Gram-Schmidt on Gaussian D x D blocks, rows rescaled to
 * the norms of fresh Gaussian vectors: the paper's "scaling 0") or iid Gaussian rows.
 * Draw number `epoch` of the plan's seed; stream per purpose, counter per element.
 * ------------------------------------------------------------------------------------------- */
enum { OPT_P_FEATURES, OPT_P_KERNEL, OPT_P_ORTHO, OPT_P_REDRAW, OPT_P_STABILIZE };

static void draw_features(ef_attn *a) {
    kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m;
    int ortho = (int)ef_opt_i(a, OPT_P_ORTHO);
    uint64_t stream = 0x70657266ull << 32 | (uint64_t)p->epoch;
    ef_rng_normal(a->seed, stream, 0, (size_t)m * d, p->W);
    if (!ortho) return;
    double *q = p->qr;
    for (int b0 = 0; b0 < m; b0 += d) {
        int rows = EF_MIN(d, m - b0);
        /* Gram-Schmidt (twice, for stability) on the d x d Gaussian block starting at row b0;
         * the first `rows` orthonormal rows are kept */
        for (int i = 0; i < d; i++)
            for (int t = 0; t < d; t++)
                q[i * d + t] = b0 + i < m ? p->W[(size_t)(b0 + i) * d + t] : 0;
        if (rows < d) { /* a truncated last block still starts from a full Gaussian block */
            float extra[1];
            for (int i = rows; i < d; i++)
                for (int t = 0; t < d; t++) {
                    ef_rng_normal(a->seed, stream + 1, (uint64_t)(b0 + i) * d + t, 1, extra);
                    q[i * d + t] = extra[0];
                }
        }
        for (int i = 0; i < d; i++)
            for (int pass = 0; pass < 2; pass++) {
                for (int j = 0; j < i; j++) {
                    double dot = 0;
                    for (int t = 0; t < d; t++) dot += q[i * d + t] * q[j * d + t];
                    for (int t = 0; t < d; t++) q[i * d + t] -= dot * q[j * d + t];
                }
                double nrm = 0;
                for (int t = 0; t < d; t++) nrm += q[i * d + t] * q[i * d + t];
                nrm = sqrt(nrm);
                for (int t = 0; t < d; t++) q[i * d + t] /= nrm > 0 ? nrm : 1;
            }
        /* row norms: chi-distributed, the norm of a fresh Gaussian d-vector */
        for (int i = 0; i < rows; i++) {
            float *g = p->gtmp;
            ef_rng_normal(a->seed, stream + 2, (uint64_t)(b0 + i) * d, (size_t)d, g);
            double nrm = 0;
            for (int t = 0; t < d; t++) nrm += (double)g[t] * g[t];
            nrm = sqrt(nrm);
            for (int t = 0; t < d; t++)
                p->W[(size_t)(b0 + i) * d + t] = (float)(q[i * d + t] * nrm);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Feature maps. fm_log writes, for rows [0, n) of x, the features in "log form" into ph and
 * returns the largest log value over rows < valid (-inf if none): for exp-type maps the
 * exponent g, for the others the feature itself. fm_exp then turns row r into features with
 * shift sh[r] (exp(g - sh)), zeroes rows >= valid, and applies the trig factors.
 * ------------------------------------------------------------------------------------------- */
static int fm_is_exp(const kplan *p) {
    return p->kind == KM_SOFTMAX || p->kind == KM_HYP || p->kind == KM_TRIG;
}

static float fm_log(const ef_attn *a, const float *x, int n, int valid, float *u, float *nrm,
                    float *ph) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m, F = p->F;
    if (p->kind == KM_ELU) {
        for (int r = 0; r < n; r++)
            for (int t = 0; t < d; t++) {
                float v = x[(size_t)r * d + t];
                ph[(size_t)r * F + t] = v > 0 ? v + 1 : v; /* exp applied in fm_exp */
            }
        return 0;
    }
    /* u = x^ W^T with x^ = xs x */
    ef_sgemm(0, 1, n, m, d, p->xs, x, d, p->W, d, 0.0f, u, m);
    for (int r = 0; r < n; r++) {
        double s = 0;
        for (int t = 0; t < d; t++) s += (double)x[(size_t)r * d + t] * x[(size_t)r * d + t];
        nrm[r] = (float)(s * p->xs * p->xs * 0.5);
    }
    float mx = -INFINITY;
    for (int r = 0; r < n; r++) {
        float *o = ph + (size_t)r * F;
        const float *ur = u + (size_t)r * m;
        switch (p->kind) {
        case KM_RELU:
            for (int f = 0; f < m; f++) o[f] = (ur[f] > 0 ? ur[f] : 0) + 1e-3f;
            break;
        case KM_SOFTMAX:
            for (int f = 0; f < m; f++) o[f] = ur[f] - nrm[r];
            break;
        case KM_HYP:
            for (int f = 0; f < m; f++) o[f] = ur[f] - nrm[r], o[m + f] = -ur[f] - nrm[r];
            break;
        case KM_TRIG:
            for (int f = 0; f < F; f++) o[f] = nrm[r];
            break;
        }
        if (r < valid && fm_is_exp(p))
            for (int f = 0; f < F; f++) mx = o[f] > mx ? o[f] : mx;
    }
    return mx;
}

static void fm_exp(const ef_attn *a, int n, int valid, const float *sh, const float *u, float *ph) {
    const kplan *p = a->impl;
    int F = p->F, m = p->m;
    float norm = p->kind == KM_SOFTMAX ? 1 / sqrtf((float)m)
                 : p->kind == KM_HYP || p->kind == KM_TRIG
                     ? 1 / sqrtf((float)(p->kind == KM_HYP ? 2 * m : m))
                     : 1;
    for (int r = 0; r < n; r++) {
        float *o = ph + (size_t)r * F;
        if (r >= valid) {
            memset(o, 0, sizeof(float) * F);
            continue;
        }
        if (p->kind == KM_ELU) { /* o = v + 1 for v > 0 (> 1), else v: exp(v) */
            float e[1024];
            for (int f0 = 0; f0 < F; f0 += 1024) {
                int fn = EF_MIN(1024, F - f0);
                for (int f = 0; f < fn; f++) e[f] = EF_MIN(o[f0 + f], 0.0f);
                ef_vexp(e, e, (size_t)fn);
                for (int f = 0; f < fn; f++) o[f0 + f] = o[f0 + f] > 1 ? o[f0 + f] : e[f];
            }
            continue;
        }
        if (p->kind == KM_RELU) continue;
        float s = p->stabilize ? sh[r] : 0;
        for (int f = 0; f < F; f++) o[f] -= s;
        ef_vexp(o, o, (size_t)F);
        for (int f = 0; f < F; f++) o[f] *= norm;
        if (p->kind == KM_TRIG) {
            const float *ur = u + (size_t)r * m;
            for (int f = 0; f < m; f++) o[f] *= cosf(ur[f]), o[m + f] *= sinf(ur[f]);
        }
    }
}

/* dx (n x D, overwritten) from dph (n x F) for features ph of x. */
static void fm_backward(const ef_attn *a, const float *x, int n, const float *u, const float *ph,
                        const float *dph, float *tmp, float *dx) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m, F = p->F;
    if (p->kind == KM_ELU) {
        for (int r = 0; r < n; r++)
            for (int t = 0; t < d; t++) {
                size_t i = (size_t)r * d + t;
                dx[i] = dph[(size_t)r * F + t] * (x[i] > 0 ? 1.0f : ph[(size_t)r * F + t]);
            }
        return;
    }
    /* du (n x m) into tmp; c_r = coefficient of x^ in dx^ */
    for (int r = 0; r < n; r++) {
        const float *o = ph + (size_t)r * F, *g = dph + (size_t)r * F, *ur = u + (size_t)r * m;
        float *du = tmp + (size_t)r * m;
        double c = 0;
        switch (p->kind) {
        case KM_RELU:
            for (int f = 0; f < m; f++) du[f] = ur[f] > 0 ? g[f] : 0;
            break;
        case KM_SOFTMAX:
            for (int f = 0; f < m; f++) du[f] = g[f] * o[f], c -= du[f];
            break;
        case KM_HYP:
            for (int f = 0; f < m; f++) {
                float pp = g[f] * o[f], pm = g[m + f] * o[m + f];
                du[f] = pp - pm, c -= pp + pm;
            }
            break;
        case KM_TRIG:
            for (int f = 0; f < m; f++) {
                du[f] = -g[f] * o[m + f] + g[m + f] * o[f];
                c += g[f] * o[f] + g[m + f] * o[m + f];
            }
            break;
        }
        /* dx = xs (du W + c x^) = xs du W + c xs^2 x */
        float cx = (float)c * p->xs * p->xs;
        for (int t = 0; t < d; t++) dx[(size_t)r * d + t] = cx * x[(size_t)r * d + t];
    }
    ef_sgemm(0, 0, n, d, m, p->xs, tmp, m, p->W, d, 1.0f, dx, d);
}

/* Maps a chunk of n rows of x: keys with one shift (running, updated in *key_shift and the
 * rescale factor returned), queries with per-row shifts (into shq). */
static float map_keys(const ef_attn *a, kwork *w, const float *x, int n, int valid,
                      float *key_shift) {
    kplan *p = a->impl;
    float mx = fm_log(a, x, n, valid, w->uk, w->nk, w->phk);
    float resc = 1;
    if (fm_is_exp(p) && p->stabilize && mx > *key_shift) {
        resc = *key_shift == -INFINITY ? 0 : expf(*key_shift - mx);
        *key_shift = mx;
    }
    float sh[KC];
    for (int r = 0; r < n; r++) sh[r] = *key_shift;
    fm_exp(a, n, valid, sh, w->uk, w->phk);
    return resc;
}

static void map_queries(const ef_attn *a, kwork *w, const float *x, int n) {
    const kplan *p = a->impl;
    fm_log(a, x, n, n, w->uq, w->nq, w->phq);
    if (fm_is_exp(p) && p->stabilize)
        for (int r = 0; r < n; r++) {
            float mx = -INFINITY;
            for (int f = 0; f < p->F; f++) mx = EF_MAX(mx, w->phq[(size_t)r * p->F + f]);
            w->shq[r] = mx;
        }
    fm_exp(a, n, n, w->shq, w->uq, w->phq);
}

/* Causal chunks. A key is mapped at its own shift s_j (the largest exponent of its row), so no
 * key of the chunk shrinks another; query row r then uses P_r = max(c_prev, max s_j over the
 * keys j <= r of the chunk): the intra-chunk score of (r, j) carries exp(s_j - P_r) and the
 * prefix terms exp(c_prev - P_r), both <= 1, and row r never depends on a later key.
 * Returns the chunk's new running shift max(c_prev, max s_j). Non-exp maps (and stabilize=0)
 * use s_j = 0, which makes every factor 1. */
static float map_keys_own(const ef_attn *a, kwork *w, const float *x, int n, int valid) {
    const kplan *p = a->impl;
    fm_log(a, x, n, valid, w->uk, w->nk, w->phk);
    int stab = fm_is_exp(p) && p->stabilize;
    float mx = -INFINITY;
    for (int r = 0; r < n; r++) {
        float s = -INFINITY;
        if (r < valid) {
            s = 0;
            if (stab) {
                s = -INFINITY;
                for (int f = 0; f < p->F; f++) s = EF_MAX(s, w->phk[(size_t)r * p->F + f]);
            }
        }
        w->shk[r] = s;
        mx = EF_MAX(mx, s);
    }
    fm_exp(a, n, valid, w->shk, w->uk, w->phk);
    return mx;
}

static float chunk_prefix(kwork *w, int qn, int kval, float c_prev) {
    float run = c_prev, cnew = c_prev;
    for (int j = 0; j < kval; j++) cnew = EF_MAX(cnew, w->shk[j]);
    for (int r = 0; r < qn; r++) {
        if (r < kval) run = EF_MAX(run, w->shk[r]);
        w->pr[r] = run;
        w->rho[r] = c_prev == -INFINITY || run == -INFINITY ? 0 : expf(c_prev - run);
    }
    return cnew;
}

/* Multiplies A[r][j] by exp(s_j - P_r) for j <= r (0 elsewhere). */
static void scale_intra(const kwork *w, float *A, int qn, int kn) {
    for (int r = 0; r < qn; r++)
        for (int j = 0; j < kn; j++) {
            float *x = A + (size_t)r * KC + j;
            *x = j > r || w->shk[j] == -INFINITY || w->pr[r] == -INFINITY
                     ? 0
                     : *x * expf(w->shk[j] - w->pr[r]);
        }
}

/* Adds the chunk to the state: S = S exp(c_prev - c_new) + sum_j phi_j exp(s_j - c_new) v_j^T. */
static void state_add(const ef_attn *a, kwork *w, const float *v, int kn, float c_prev,
                      float c_new) {
    const kplan *p = a->impl;
    int F = p->F, dv = a->shape.v_dim;
    if (c_prev != c_new) {
        float resc = c_prev == -INFINITY ? 0 : expf(c_prev - c_new);
        for (int x = 0; x < F * dv; x++) w->S[x] *= resc;
        for (int f = 0; f < F; f++) w->z[f] *= resc;
    }
    for (int r = 0; r < kn; r++) {
        float e = w->shk[r] == -INFINITY ? 0 : expf(w->shk[r] - c_new);
        for (int f = 0; f < F; f++) w->phk[(size_t)r * F + f] *= e;
    }
    ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v, dv, 1.0f, w->S, dv);
    for (int r = 0; r < kn; r++)
        for (int f = 0; f < F; f++) w->z[f] += w->phk[(size_t)r * F + f];
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
typedef struct kcall {
    ef_attn *a;
    const ef_attn_io *io;
    float *saved;
    const float *dout;
    float *dq, *dk, *dv;
} kcall;

static float *den_of(const ef_attn *a, float *saved, int64_t bh) {
    return saved + (size_t)bh * a->shape.q_len;
}
static float *shifts_of(const ef_attn *a, float *saved, int64_t bh) {
    const kplan *p = a->impl;
    return saved + (size_t)a->shape.batch * a->shape.heads * a->shape.q_len +
           (size_t)bh * p->nchunks;
}

/* out rows [c0, c0+n) from num and den; returns nothing, stores den if saved. */
static void finish_rows(const ef_attn *a, kwork *w, int n, float *out, float *den_out) {
    int dv = a->shape.v_dim;
    for (int r = 0; r < n; r++) {
        float den = den_out[r];
        float inv = den != 0 ? 1 / den : 0; /* a row that sees nothing (den = 0): zeros */
        for (int e = 0; e < dv; e++) out[(size_t)r * dv + e] = w->num[(size_t)r * dv + e] * inv;
    }
}

static void forward_head(void *ctx, int64_t bh, int tid) {
    const kcall *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    kplan *p = a->impl;
    kwork *w = &p->ws[tid];
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F;
    int b = (int)(bh / s->heads), L = ef_attn_kv_valid(a, c->io, b);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv;
    float *out = c->io->out + (size_t)bh * n * dv;
    float *shifts = c->saved ? shifts_of(a, c->saved, bh) : NULL;
    float dbuf[KC];
    int old = ef_gemm_local_threads(1);
    memset(w->S, 0, sizeof(float) * F * dv);
    memset(w->z, 0, sizeof(float) * F);
    float kshift = -INFINITY;
    if (!a->causal) {
        for (int j0 = 0; j0 < L; j0 += KC) {
            int kn = EF_MIN(KC, L - j0);
            float resc = map_keys(a, w, k + (size_t)j0 * d, kn, kn, &kshift);
            if (resc != 1) {
                for (int x = 0; x < F * dv; x++) w->S[x] *= resc;
                for (int f = 0; f < F; f++) w->z[f] *= resc;
            }
            ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v + (size_t)j0 * dv, dv, 1.0f, w->S, dv);
            for (int r = 0; r < kn; r++)
                for (int f = 0; f < F; f++) w->z[f] += w->phk[(size_t)r * F + f];
        }
        if (shifts) shifts[0] = kshift;
        for (int i0 = 0; i0 < n; i0 += KC) {
            int qn = EF_MIN(KC, n - i0);
            map_queries(a, w, q + (size_t)i0 * d, qn);
            ef_sgemm(0, 0, qn, dv, F, 1.0f, w->phq, F, w->S, dv, 0.0f, w->num, dv);
            float *den = shifts ? den_of(a, c->saved, bh) + i0 : dbuf;
            for (int r = 0; r < qn; r++) {
                double acc = 0;
                for (int f = 0; f < F; f++) acc += (double)w->phq[(size_t)r * F + f] * w->z[f];
                den[r] = L > 0 ? (float)acc + p->eps : 0;
            }
            finish_rows(a, w, qn, out + (size_t)i0 * dv, den);
        }
    } else {
        /* causal: position chunks [c0, c0+KC) of queries and keys together (top-left) */
        int npos = EF_MAX(n, m);
        for (int c0 = 0, ci = 0; c0 < npos; c0 += KC, ci++) {
            int kn = EF_MAX(0, EF_MIN(KC, m - c0)), kval = EF_MAX(0, EF_MIN(kn, L - c0));
            int qn = EF_MAX(0, EF_MIN(KC, n - c0));
            if (kn > 0) map_keys_own(a, w, k + (size_t)c0 * d, kn, kval);
            float cnew = chunk_prefix(w, qn, kval, kshift);
            if (shifts && ci < p->nchunks) shifts[ci] = cnew;
            if (qn > 0) {
                map_queries(a, w, q + (size_t)c0 * d, qn);
                /* prefix part, at each row's shift */
                ef_sgemm(0, 0, qn, dv, F, 1.0f, w->phq, F, w->S, dv, 0.0f, w->num, dv);
                float *den = shifts ? den_of(a, c->saved, bh) + c0 : dbuf;
                for (int r = 0; r < qn; r++) {
                    double acc = 0;
                    for (int f = 0; f < F; f++) acc += (double)w->phq[(size_t)r * F + f] * w->z[f];
                    den[r] = (float)acc * w->rho[r];
                    for (int e = 0; e < dv; e++) w->num[(size_t)r * dv + e] *= w->rho[r];
                }
                if (kn > 0) { /* intra-chunk: A = tril(Phi_q Phi_k^T) exp(s_j - P_r) */
                    ef_sgemm(0, 1, qn, kn, F, 1.0f, w->phq, F, w->phk, F, 0.0f, w->A, KC);
                    scale_intra(w, w->A, qn, kn);
                    for (int r = 0; r < qn; r++) {
                        double acc = 0;
                        for (int j = 0; j < kn; j++) acc += w->A[(size_t)r * KC + j];
                        den[r] += (float)acc;
                    }
                    ef_sgemm(0, 0, qn, dv, kn, 1.0f, w->A, KC, v + (size_t)c0 * dv, dv, 1.0f,
                             w->num, dv);
                }
                for (int r = 0; r < qn; r++) {
                    int sees = EF_MIN(L, c0 + r + 1) > 0;
                    den[r] = sees ? den[r] + p->eps : 0;
                }
                finish_rows(a, w, qn, out + (size_t)c0 * dv, den);
            }
            if (kn > 0) state_add(a, w, v + (size_t)c0 * dv, kn, kshift, cnew);
            kshift = cnew;
        }
    }
    ef_gemm_local_threads(old);
}

static ef_status kernel_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    kplan *p = a->impl;
    if (saved && p->redraw > 0 && p->W) {
        /* a training forward: redraw the features every `redraw` calls */
        if (p->calls >= p->redraw) {
            p->epoch++, p->calls = 0;
            draw_features(a);
        }
        p->calls++;
    }
    if (saved)
        memcpy((char *)saved + ef_attn_saved_bytes(a) - sizeof(int64_t), &p->epoch,
               sizeof(int64_t));
    kcall c = {a, io, saved, NULL, NULL, NULL, NULL};
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), forward_head, &c);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------- */
/* G = dO / den and dd = -(dO . out) / den for query rows [r0, r0+qn). */
static void grad_rows(const ef_attn *a, kwork *w, const float *g, const float *out,
                      const float *den, int qn) {
    int dv = a->shape.v_dim;
    for (int r = 0; r < qn; r++) {
        float inv = den[r] != 0 ? 1 / den[r] : 0;
        double acc = 0;
        for (int e = 0; e < dv; e++) {
            w->G[(size_t)r * dv + e] = g[(size_t)r * dv + e] * inv;
            acc += (double)g[(size_t)r * dv + e] * out[(size_t)r * dv + e];
        }
        w->dd[r] = (float)(-acc * inv);
    }
}

/* Keys of a chunk mapped with a known shift (no running update). */
static void map_keys_fixed(const ef_attn *a, kwork *w, const float *x, int n, int valid,
                           float shift) {
    fm_log(a, x, n, valid, w->uk, w->nk, w->phk);
    float sh[KC];
    for (int r = 0; r < n; r++) sh[r] = shift;
    fm_exp(a, n, valid, sh, w->uk, w->phk);
}

/* dPhi_k = V dS^T + 1 dz^T (+ intra), rows >= valid zeroed; dV = Phi_k dS (+ intra); dk. */
static void key_grads(const ef_attn *a, kwork *w, const float *k, const float *v, int kn, int valid,
                      float *dk, float *dvo, int intra, int qn) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, dv = a->shape.v_dim, F = p->F;
    ef_sgemm(0, 1, kn, F, dv, 1.0f, v, dv, w->dS, dv, 0.0f, w->dph, F);
    for (int r = 0; r < kn; r++)
        for (int f = 0; f < F; f++) w->dph[(size_t)r * F + f] += w->dz[f];
    ef_sgemm(0, 0, kn, dv, F, 1.0f, w->phk, F, w->dS, dv, 0.0f, dvo, dv);
    if (intra) /* causal: key j entered the state at exp(s_j - c) */
        for (int r = 0; r < kn; r++) {
            for (int f = 0; f < F; f++) w->dph[(size_t)r * F + f] *= w->ksc[r];
            for (int e = 0; e < dv; e++) dvo[(size_t)r * dv + e] *= w->ksc[r];
        }
    if (intra && qn > 0) {
        ef_sgemm(1, 0, kn, F, qn, 1.0f, w->dA, KC, w->phq, F, 1.0f, w->dph, F);
        ef_sgemm(1, 0, kn, dv, qn, 1.0f, w->A, KC, w->G, dv, 1.0f, dvo, dv);
    }
    for (int r = valid; r < kn; r++) {
        memset(w->dph + (size_t)r * F, 0, sizeof(float) * F);
        memset(dvo + (size_t)r * dv, 0, sizeof(float) * dv);
    }
    fm_backward(a, k, kn, w->uk, w->phk, w->dph, w->tmp, dk);
    (void)d;
}

/* A = tril(Phi_q Phi_k^T) and dA = tril(G V^T + dd 1^T), times exp(s_j - P_r), of one causal
 * chunk (keys at their own shifts, see map_keys_own). */
static void intra_scores(const ef_attn *a, kwork *w, const float *v, int qn, int kn) {
    const kplan *p = a->impl;
    int dv = a->shape.v_dim, F = p->F;
    ef_sgemm(0, 1, qn, kn, F, 1.0f, w->phq, F, w->phk, F, 0.0f, w->A, KC);
    ef_sgemm(0, 1, qn, kn, dv, 1.0f, w->G, dv, v, dv, 0.0f, w->dA, KC);
    for (int r = 0; r < qn; r++)
        for (int j = 0; j < kn; j++) w->dA[(size_t)r * KC + j] += w->dd[r];
    scale_intra(w, w->A, qn, kn);
    scale_intra(w, w->dA, qn, kn);
}

static void backward_head(void *ctx, int64_t bh, int tid) {
    const kcall *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    kplan *p = a->impl;
    kwork *w = &p->ws[tid];
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F;
    int b = (int)(bh / s->heads), L = ef_attn_kv_valid(a, c->io, b);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv, *out = c->io->out + (size_t)bh * n * dv;
    const float *g = c->dout + (size_t)bh * n * dv;
    float *dq = c->dq + (size_t)bh * n * d, *dk = c->dk + (size_t)bh * m * d;
    float *dvo = c->dv + (size_t)bh * m * dv;
    const float *den = den_of(a, c->saved, bh), *shifts = shifts_of(a, c->saved, bh);
    int old = ef_gemm_local_threads(1);
    memset(w->S, 0, sizeof(float) * F * dv);
    memset(w->z, 0, sizeof(float) * F);
    memset(w->dS, 0, sizeof(float) * F * dv);
    memset(w->dz, 0, sizeof(float) * F);
    memset(dk, 0, sizeof(float) * (size_t)m * d);
    memset(dvo, 0, sizeof(float) * (size_t)m * dv);
    if (!a->causal) {
        for (int j0 = 0; j0 < L; j0 += KC) { /* S, z again, with the saved shift */
            int kn = EF_MIN(KC, L - j0);
            map_keys_fixed(a, w, k + (size_t)j0 * d, kn, kn, shifts[0]);
            ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v + (size_t)j0 * dv, dv, 1.0f, w->S, dv);
            for (int r = 0; r < kn; r++)
                for (int f = 0; f < F; f++) w->z[f] += w->phk[(size_t)r * F + f];
        }
        for (int i0 = 0; i0 < n; i0 += KC) {
            int qn = EF_MIN(KC, n - i0);
            map_queries(a, w, q + (size_t)i0 * d, qn);
            grad_rows(a, w, g + (size_t)i0 * dv, out + (size_t)i0 * dv, den + i0, qn);
            /* dPhi_q = G S^T + dd z^T;  dS += Phi_q^T G;  dz += Phi_q^T dd */
            ef_sgemm(0, 1, qn, F, dv, 1.0f, w->G, dv, w->S, dv, 0.0f, w->dph, F);
            for (int r = 0; r < qn; r++)
                for (int f = 0; f < F; f++) {
                    w->dph[(size_t)r * F + f] += w->dd[r] * w->z[f];
                    w->dz[f] += w->dd[r] * w->phq[(size_t)r * F + f];
                }
            ef_sgemm(1, 0, F, dv, qn, 1.0f, w->phq, F, w->G, dv, 1.0f, w->dS, dv);
            fm_backward(a, q + (size_t)i0 * d, qn, w->uq, w->phq, w->dph, w->tmp,
                        dq + (size_t)i0 * d);
        }
        for (int j0 = 0; j0 < L; j0 += KC) {
            int kn = EF_MIN(KC, L - j0);
            map_keys_fixed(a, w, k + (size_t)j0 * d, kn, kn, shifts[0]);
            key_grads(a, w, k + (size_t)j0 * d, v + (size_t)j0 * dv, kn, kn, dk + (size_t)j0 * d,
                      dvo + (size_t)j0 * dv, 0, 0);
        }
        ef_gemm_local_threads(old);
        return;
    }
    /* causal, forward sweep: S, z rebuilt chunk by chunk; dq */
    int npos = EF_MAX(n, m);
    float kshift = -INFINITY;
    for (int c0 = 0; c0 < npos; c0 += KC) {
        int kn = EF_MAX(0, EF_MIN(KC, m - c0)), kval = EF_MAX(0, EF_MIN(kn, L - c0));
        int qn = EF_MAX(0, EF_MIN(KC, n - c0));
        if (kn > 0) map_keys_own(a, w, k + (size_t)c0 * d, kn, kval);
        float cnew = chunk_prefix(w, qn, kval, kshift);
        if (qn > 0) {
            map_queries(a, w, q + (size_t)c0 * d, qn);
            grad_rows(a, w, g + (size_t)c0 * dv, out + (size_t)c0 * dv, den + c0, qn);
            /* dPhi_q = rho (G S^T + dd z^T) + (dA o E) Phi_k */
            ef_sgemm(0, 1, qn, F, dv, 1.0f, w->G, dv, w->S, dv, 0.0f, w->dph, F);
            for (int r = 0; r < qn; r++)
                for (int f = 0; f < F; f++)
                    w->dph[(size_t)r * F + f] =
                        (w->dph[(size_t)r * F + f] + w->dd[r] * w->z[f]) * w->rho[r];
            if (kn > 0) {
                intra_scores(a, w, v + (size_t)c0 * dv, qn, kn);
                ef_sgemm(0, 0, qn, F, kn, 1.0f, w->dA, KC, w->phk, F, 1.0f, w->dph, F);
            }
            fm_backward(a, q + (size_t)c0 * d, qn, w->uq, w->phq, w->dph, w->tmp,
                        dq + (size_t)c0 * d);
        }
        if (kn > 0) state_add(a, w, v + (size_t)c0 * dv, kn, kshift, cnew);
        kshift = cnew;
    }
    /* reverse sweep: dS, dz = gradient wrt the state after chunk c (at its shift c_c), carried
     * back to the state before it (at c_{c-1}) once the chunk's keys have used it */
    for (int ci = p->nchunks - 1; ci >= 0; ci--) {
        int c0 = ci * KC;
        int kn = EF_MAX(0, EF_MIN(KC, m - c0)), kval = EF_MAX(0, EF_MIN(kn, L - c0));
        int qn = EF_MAX(0, EF_MIN(KC, n - c0));
        float sh = shifts[ci], prev = ci > 0 ? shifts[ci - 1] : -INFINITY;
        if (kn > 0) map_keys_own(a, w, k + (size_t)c0 * d, kn, kval);
        chunk_prefix(w, qn, kval, prev);
        if (qn > 0) {
            map_queries(a, w, q + (size_t)c0 * d, qn);
            grad_rows(a, w, g + (size_t)c0 * dv, out + (size_t)c0 * dv, den + c0, qn);
        }
        if (kn > 0) {
            if (qn > 0) intra_scores(a, w, v + (size_t)c0 * dv, qn, kn);
            for (int r = 0; r < kn; r++)
                w->ksc[r] = w->shk[r] == -INFINITY || sh == -INFINITY ? 0 : expf(w->shk[r] - sh);
            key_grads(a, w, k + (size_t)c0 * d, v + (size_t)c0 * dv, kn, kval, dk + (size_t)c0 * d,
                      dvo + (size_t)c0 * dv, 1, qn);
        }
        if (prev != sh) {
            float resc = prev == -INFINITY ? 0 : expf(prev - sh);
            for (int x = 0; x < F * dv; x++) w->dS[x] *= resc;
            for (int f = 0; f < F; f++) w->dz[f] *= resc;
        }
        if (qn > 0) { /* this chunk's queries saw the state before it at exp(c_{c-1} - P_r) */
            for (int r = 0; r < qn; r++) {
                for (int e = 0; e < dv; e++) w->G[(size_t)r * dv + e] *= w->rho[r];
                w->dd[r] *= w->rho[r];
            }
            ef_sgemm(1, 0, F, dv, qn, 1.0f, w->phq, F, w->G, dv, 1.0f, w->dS, dv);
            for (int r = 0; r < qn; r++)
                for (int f = 0; f < F; f++) w->dz[f] += w->dd[r] * w->phq[(size_t)r * F + f];
        }
    }
    ef_gemm_local_threads(old);
}

static ef_status kernel_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                 const float *dout, float *dq, float *dk, float *dv) {
    kplan *p = a->impl;
    int64_t epoch, current = p->epoch;
    memcpy(&epoch, (const char *)saved + ef_attn_saved_bytes(a) - sizeof(int64_t), sizeof epoch);
    if (p->W && epoch != p->epoch) { /* features were redrawn since this forward: draw its set */
        p->epoch = epoch;
        draw_features(a);
    }
    kcall c = {a, io, (float *)saved, dout, dq, dk, dv};
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), backward_head,
                    &c);
    if (p->W && p->epoch != current) { /* back to the features the next forward expects */
        p->epoch = current;
        draw_features(a);
    }
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Reference (ref=1): the explicit N x M form with the same feature maps,
 *   A_ij = phi(q_i).phi(k_j) over visible pairs, out_i = sum_j A_ij v_j / (sum_j A_ij + eps),
 * in double, one (batch, head) at a time. Keys use one shift (the max over all valid keys),
 * queries one per row: both cancel exactly. Saved: the normaliser per row.
 * ------------------------------------------------------------------------------------------- */
/* Key j is mapped at its own shift s_j (kept in ref_sk); row i then weighs it by
 * exp(s_j - P_i), P_i = the largest s_j it sees (ref_row_shift): exact, and no key the row
 * does not see can shrink the ones it does. */
static float *ref_sk(const ef_attn *a) {
    const kplan *p = a->impl;
    int n = a->shape.q_len, mm = a->shape.kv_len, big = EF_MAX(n, mm);
    return p->rtmp + (size_t)big * EF_MAX(EF_MAX(p->F, a->shape.head_dim), EF_MAX(p->m, 1));
}

static void ref_features(ef_attn *a, const float *q, const float *k, int L) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, F = p->F;
    float *sk = ref_sk(a), *sh = sk + m;
    int stab = fm_is_exp(p) && p->stabilize;
    fm_log(a, k, m, L, p->ruk, p->rnk, p->rk);
    for (int j = 0; j < m; j++) {
        float mx = 0;
        if (stab) {
            mx = -INFINITY;
            for (int f = 0; f < F; f++) mx = EF_MAX(mx, p->rk[(size_t)j * F + f]);
        }
        sk[j] = j < L ? mx : -INFINITY;
    }
    fm_exp(a, m, L, sk, p->ruk, p->rk);
    fm_log(a, q, n, n, p->ruq, p->rnq, p->rq);
    for (int r = 0; r < n; r++) {
        float mx = -INFINITY;
        for (int f = 0; f < F; f++) mx = EF_MAX(mx, p->rq[(size_t)r * F + f]);
        sh[r] = mx;
    }
    fm_exp(a, n, n, sh, p->ruq, p->rq);
}

static int ref_lim(const ef_attn *a, int L, int i) { return a->causal ? EF_MIN(L, i + 1) : L; }

static double ref_row_shift(const ef_attn *a, int lim) {
    const float *sk = ref_sk(a);
    double mx = -INFINITY;
    for (int j = 0; j < lim; j++) mx = sk[j] > mx ? sk[j] : mx;
    return mx;
}

static double ref_a(const ef_attn *a, int i, int j, double pi) {
    const kplan *p = a->impl;
    double acc = 0;
    for (int f = 0; f < p->F; f++)
        acc += (double)p->rq[(size_t)i * p->F + f] * p->rk[(size_t)j * p->F + f];
    return acc * exp(ref_sk(a)[j] - pi);
}

static ef_status kernel_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        int L = ef_attn_kv_valid(a, io, (int)(bh / s->heads));
        const float *v = io->v + (size_t)bh * m * dv;
        ref_features(a, io->q + (size_t)bh * n * d, io->k + (size_t)bh * m * d, L);
        for (int i = 0; i < n; i++) {
            int lim = ref_lim(a, L, i);
            double pi = ref_row_shift(a, lim), den = 0, num[1024];
            for (int e0 = 0; e0 < dv; e0 += 1024) { /* v_dim is at most 1024 per block */
                int en = EF_MIN(1024, dv - e0);
                for (int e = 0; e < en; e++) num[e] = 0;
                den = 0;
                for (int j = 0; j < lim; j++) {
                    double aij = ref_a(a, i, j, pi);
                    den += aij;
                    for (int e = 0; e < en; e++) num[e] += aij * v[(size_t)j * dv + e0 + e];
                }
                den = lim > 0 ? den + p->eps : 0;
                for (int e = 0; e < en; e++)
                    io->out[((size_t)bh * n + i) * dv + e0 + e] =
                        den != 0 ? (float)(num[e] / den) : 0;
            }
            if (saved) ((float *)saved)[(size_t)bh * n + i] = (float)den;
        }
    }
    return EF_OK;
}

static ef_status kernel_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                     const float *dout, float *dq, float *dk, float *dv) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e_ = s->v_dim, F = p->F;
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        int L = ef_attn_kv_valid(a, io, (int)(bh / s->heads));
        const float *v = io->v + (size_t)bh * m * e_, *out = io->out + (size_t)bh * n * e_;
        const float *g = dout + (size_t)bh * n * e_;
        float *dvo = dv + (size_t)bh * m * e_;
        ref_features(a, io->q + (size_t)bh * n * d, io->k + (size_t)bh * m * d, L);
        memset(p->rdq, 0, sizeof(float) * (size_t)n * F);
        memset(p->rdk, 0, sizeof(float) * (size_t)m * F);
        memset(dvo, 0, sizeof(float) * (size_t)m * e_);
        for (int i = 0; i < n; i++) {
            double den = ((const float *)saved)[(size_t)bh * n + i];
            if (den == 0) continue;
            double dd = 0;
            for (int e = 0; e < e_; e++)
                dd -= (double)g[(size_t)i * e_ + e] * out[(size_t)i * e_ + e];
            dd /= den;
            int lim = ref_lim(a, L, i);
            double pi = ref_row_shift(a, lim);
            for (int j = 0; j < lim; j++) {
                double aij = ref_a(a, i, j, pi), da = dd, e = exp(ref_sk(a)[j] - pi);
                for (int e = 0; e < e_; e++) {
                    da += g[(size_t)i * e_ + e] / den * v[(size_t)j * e_ + e];
                    dvo[(size_t)j * e_ + e] += (float)(aij * g[(size_t)i * e_ + e] / den);
                }
                for (int f = 0; f < F; f++) { /* A_ij = phi_i.phi_j e: d/dphi carries e */
                    p->rdq[(size_t)i * F + f] += (float)(da * e * p->rk[(size_t)j * F + f]);
                    p->rdk[(size_t)j * F + f] += (float)(da * e * p->rq[(size_t)i * F + f]);
                }
            }
        }
        fm_backward(a, io->q + (size_t)bh * n * d, n, p->ruq, p->rq, p->rdq, p->rtmp,
                    dq + (size_t)bh * n * d);
        fm_backward(a, io->k + (size_t)bh * m * d, m, p->ruk, p->rk, p->rdk, p->rtmp,
                    dk + (size_t)bh * m * d);
    }
    return EF_OK;
}

static size_t kernel_ref_saved_bytes(const ef_attn *a) {
    return (size_t)a->shape.batch * a->shape.heads * a->shape.q_len * sizeof(float);
}

/* ---------------------------------------------------------------------------------------------
 * Plans
 * ------------------------------------------------------------------------------------------- */
static const ef_opt_desc linear_opts[] = {
    {"eps", EF_OPT_FLOAT, "1e-06", 0, 1, NULL, 0,
     "added to the normaliser phi(q).sum phi(k) (fast-transformers' 1e-6)"},
};
static const ef_opt_desc performer_opts[] = {
    {"features", EF_OPT_INT, "256", 1, 1 << 16, NULL, 0,
     "random projections m (phi has m features; 2m for hyp and trig)"},
    {"kernel", EF_OPT_ENUM, "softmax", 0, 0, "softmax|hyp|trig|relu", 0,
     "positive softmax features, hyperbolic, trigonometric, or generalized relu+1e-3"},
    {"ortho", EF_OPT_BOOL, "1", 0, 1, NULL, 0, "orthogonal random blocks (else iid Gaussian)"},
    {"redraw", EF_OPT_INT, "0", 0, 1 << 30, NULL, 0,
     "draw new features every n training forwards (0 = never)"},
    {"stabilize", EF_OPT_BOOL, "1", 0, 1, NULL, 0,
     "exponents shifted by row / running maxima (exact; prevents overflow)"},
    {"eps", EF_OPT_FLOAT, "0", 0, 1, NULL, 0, "added to the normaliser"},
};
enum { OPT_L_EPS = 0, OPT_P_EPS = 5 };

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

static ef_status kernel_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    kplan *p = calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    a->impl = p;
    int d = s->head_dim, dv = s->v_dim;
    if (a->ops->n_opts == 1) { /* linear */
        p->kind = KM_ELU, p->F = d, p->m = 0, p->eps = (float)ef_opt_f(a, OPT_L_EPS);
    } else {
        static const int kinds[] = {KM_SOFTMAX, KM_HYP, KM_TRIG, KM_RELU};
        p->kind = kinds[ef_opt_i(a, OPT_P_KERNEL)];
        p->m = (int)ef_opt_i(a, OPT_P_FEATURES);
        p->F = p->kind == KM_HYP || p->kind == KM_TRIG ? 2 * p->m : p->m;
        p->redraw = (int)ef_opt_i(a, OPT_P_REDRAW);
        p->stabilize = (int)ef_opt_i(a, OPT_P_STABILIZE);
        p->eps = (float)ef_opt_f(a, OPT_P_EPS);
        p->xs = sqrtf(a->scale); /* phi(q).phi(k) ~ exp(scale q.k) */
    }
    p->nchunks = a->causal ? (EF_MAX(s->q_len, s->kv_len) + KC - 1) / KC : 1;
    int F = p->F, m = EF_MAX(p->m, 1), wide = EF_MAX(EF_MAX(F, d), m);
    enum { NWS = 21 };
    size_t sz[NWS] = {(size_t)KC * F,
                      (size_t)KC * F,
                      (size_t)KC * m,
                      (size_t)KC * m,
                      KC,
                      KC,
                      KC,
                      (size_t)KC * KC,
                      (size_t)KC * dv,
                      (size_t)F * dv,
                      (size_t)F,
                      (size_t)F * dv,
                      (size_t)F,
                      (size_t)KC * dv,
                      KC,
                      (size_t)KC * F,
                      (size_t)KC * KC,
                      KC,
                      KC,
                      KC,
                      KC};
    size_t per = round16((size_t)KC * wide);
    for (int i = 0; i < NWS; i++) per += round16(sz[i]);
    size_t extra =
        p->m ? round16((size_t)p->m * d) + round16((size_t)d) + 2 * round16((size_t)d * d) : 0;
    double total = (double)per * a->slots + extra;
    if (total * 4 > 1e12)
        return ef_error(EF_ERR_NOMEM, "%s: workspace of %.3g GB", a->ops->name, total * 4 / 1e9);
    p->ws = calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_malloc((size_t)total * sizeof(float));
    if (!p->ws || !p->block)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of workspace", a->ops->name,
                        total * 4 / 1e6);
    a->ws_bytes = (size_t)total * sizeof(float);
    float *cur = p->block;
    for (int t = 0; t < a->slots; t++) {
        kwork *w = &p->ws[t];
        float **f[NWS] = {&w->phq, &w->phk, &w->uq, &w->uk,  &w->nq, &w->nk,  &w->shq,
                          &w->A,   &w->num, &w->S,  &w->z,   &w->dS, &w->dz,  &w->G,
                          &w->dd,  &w->dph, &w->dA, &w->shk, &w->pr, &w->rho, &w->ksc};
        for (int i = 0; i < NWS; i++) *f[i] = cur, cur += round16(sz[i]);
        w->tmp = cur, cur += round16((size_t)KC * wide);
    }
    if (a->ref) { /* the reference path maps whole sequences */
        int n = s->q_len, mm = s->kv_len, big = EF_MAX(n, mm);
        size_t rs[9] = {(size_t)n * F,  (size_t)mm * F, (size_t)n * m,
                        (size_t)mm * m, (size_t)n,      (size_t)mm,
                        (size_t)n * F,  (size_t)mm * F, (size_t)big * wide + n + mm};
        /* rtmp: fm_backward's big x wide scratch, then key shifts (mm) and query shifts (n) */
        size_t rt = 0;
        for (int i = 0; i < 9; i++) rt += round16(rs[i]);
        float *rb = ef_malloc(rt * sizeof(float));
        if (!rb)
            return ef_error(EF_ERR_NOMEM, "%s: out of memory for the reference path", a->ops->name);
        p->rblock = rb;
        a->ws_bytes += rt * sizeof(float);
        float **f[9] = {&p->rq,  &p->rk,  &p->ruq, &p->ruk, &p->rnq,
                        &p->rnk, &p->rdq, &p->rdk, &p->rtmp};
        for (int i = 0; i < 9; i++) *f[i] = rb, rb += round16(rs[i]);
    }
    if (p->m) {
        p->W = cur, cur += round16((size_t)p->m * d);
        p->gtmp = cur, cur += round16((size_t)d);
        p->qr = (double *)cur;
        draw_features(a);
    }
    return EF_OK;
}

static void kernel_destroy(ef_attn *a) {
    kplan *p = a->impl;
    if (!p) return;
    ef_free(p->block);
    ef_free(p->rblock);
    free(p->ws);
    free(p);
    a->impl = NULL;
}

static size_t kernel_saved_bytes(const ef_attn *a) {
    const kplan *p = a->impl;
    size_t bh = (size_t)a->shape.batch * a->shape.heads;
    return (bh * a->shape.q_len + bh * p->nchunks) * sizeof(float) + sizeof(int64_t);
}

/* Analytic count: feature maps (projections 2 n D m per map, none for elu), S and z
 * (2 M F Dv), num and den (2 N F (Dv + 1)), the causal triangle (N KC (F + Dv)); backward:
 * the maps twice more and their gradients, dPhi_q, dS, dPhi_k, dV (each 2 x F x Dv). */
static double kernel_flops(const ef_attn *a, int backward) {
    const kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F, pm = p->m;
    double maps = 2 * (n + m) * d * pm;
    double tri = a->causal ? n * KC * (F + dv) : 0;
    double fwd = maps + 2 * m * F * dv + 2 * n * F * (dv + 1) + tri;
    double bwd =
        2 * maps + maps /* map gradients */ + 2 * n * F * dv * 2 + 2 * m * F * dv * 3 + 3 * tri;
    return (double)s->batch * s->heads * (backward ? fwd + bwd : fwd);
}

/* ---------------------------------------------------------------------------------------------
 * Incremental decoding: per (batch, head) the state S [F][Dv], z [F] and the key shift.
 * ------------------------------------------------------------------------------------------- */
static size_t kernel_state_bytes(const ef_attn *a) {
    const kplan *p = a->impl;
    return (size_t)a->shape.batch * a->shape.heads * ((size_t)p->F * a->shape.v_dim + p->F + 1) *
           sizeof(float);
}

static void kernel_state_init(const ef_attn *a, void *state) {
    const kplan *p = a->impl;
    size_t per = (size_t)p->F * a->shape.v_dim + p->F + 1;
    float *st = state;
    for (int64_t bh = 0; bh < (int64_t)a->shape.batch * a->shape.heads; bh++) {
        memset(st + bh * per, 0, sizeof(float) * (per - 1));
        st[bh * per + per - 1] = -INFINITY;
    }
}

static ef_status kernel_step(ef_attn *a, void *state, const float *q, const float *k,
                             const float *v, float *out) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int d = s->head_dim, dv = s->v_dim, F = p->F;
    size_t per = (size_t)F * dv + F + 1;
    kwork *w = &p->ws[0];
    int old = ef_gemm_local_threads(1);
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        float *S = (float *)state + bh * per, *z = S + (size_t)F * dv, *shift = z + F;
        float resc = map_keys(a, w, k + bh * d, 1, 1, shift);
        if (resc != 1) {
            for (size_t x = 0; x < (size_t)F * dv; x++) S[x] *= resc;
            for (int f = 0; f < F; f++) z[f] *= resc;
        }
        for (int f = 0; f < F; f++) {
            float pk = w->phk[f];
            z[f] += pk;
            for (int e = 0; e < dv; e++) S[(size_t)f * dv + e] += pk * v[bh * dv + e];
        }
        map_queries(a, w, q + bh * d, 1);
        double den = 0;
        for (int f = 0; f < F; f++) den += (double)w->phq[f] * z[f];
        float dn = (float)den + p->eps, inv = dn != 0 ? 1 / dn : 0;
        for (int e = 0; e < dv; e++) {
            double acc = 0;
            for (int f = 0; f < F; f++) acc += (double)w->phq[f] * S[(size_t)f * dv + e];
            out[bh * dv + e] = (float)acc * inv;
        }
    }
    ef_gemm_local_threads(old);
    return EF_OK;
}

const ef_attn_ops ef_attn_ops_linear = {
    .caps = {.causal = 1, .cross = 1, .decode = 1, .deterministic = 1},
    .name = "linear",
    .summary = "Linear Transformer: phi(x) = elu(x)+1, O(N D Dv) time, O(D Dv) state",
    .notes = "  padded keys are zeroed after the feature map; causal=1 runs in chunks of 128\n"
             "  (prefix sums at matrix speed); incremental decoding with ef_attn_step.\n"
             "  saves the normaliser per row; reference (ref=1): the explicit N x M form.",
    .opts = linear_opts,
    .n_opts = 1,
    .init = kernel_init,
    .destroy = kernel_destroy,
    .flops = kernel_flops,
    .saved_bytes = kernel_saved_bytes,
    .forward = kernel_forward,
    .backward = kernel_backward,
    .ref_saved_bytes = kernel_ref_saved_bytes,
    .ref_forward = kernel_ref_forward,
    .ref_backward = kernel_ref_backward,
    .state_bytes = kernel_state_bytes,
    .state_init = kernel_state_init,
    .step = kernel_step,
};

const ef_attn_ops ef_attn_ops_performer = {
    .caps = {.causal = 1, .cross = 1, .decode = 1, .random = 1, .deterministic = 1},
    .name = "performer",
    .summary = "Performer FAVOR+: random features of the softmax kernel, O(N m (D + Dv))",
    .notes =
        "  features from the seed (orthogonal blocks, rows rescaled to chi norms), shared by\n"
        "  all heads; stabilised exponents (exact: the shifts cancel); causal=1 in chunks;\n"
        "  incremental decoding with ef_attn_step; reference (ref=1): the explicit N x M form.",
    .opts = performer_opts,
    .n_opts = 6,
    .init = kernel_init,
    .destroy = kernel_destroy,
    .flops = kernel_flops,
    .saved_bytes = kernel_saved_bytes,
    .forward = kernel_forward,
    .backward = kernel_backward,
    .ref_saved_bytes = kernel_ref_saved_bytes,
    .ref_forward = kernel_ref_forward,
    .ref_backward = kernel_ref_backward,
    .state_bytes = kernel_state_bytes,
    .state_init = kernel_state_init,
    .step = kernel_step,
};
