/*
 * arena_core.c - what `eformer arena` measures against and with (arena.h): exact attention by
 * plain GEMMs, Gaussian and structured inputs, the log-log exponent fit, the survey's claims.
 */
#include "arena.h"
#include "core/core.h" /* ef_error */

#include <math.h>
#include <stdlib.h>
#include <string.h>

double arena_slope(const double *x, const double *y, int n) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (!(x[i] > 0) || !(y[i] > 0) || !isfinite(x[i]) || !isfinite(y[i])) continue;
        double lx = log(x[i]), ly = log(y[i]);
        sx += lx, sy += ly, sxx += lx * lx, sxy += lx * ly, m++;
    }
    if (m < 2) return NAN;
    double den = m * sxx - sx * sx;
    if (!(fabs(den) > 1e-12 * (m * sxx + 1))) return NAN;
    return (m * sxy - sx * sy) / den;
}

/* Tay et al., Efficient Transformers: A Survey (2020/2022), Table 1 and section 3: family and
 * claimed complexity. The exponent is that of N with the mechanism's own sizes (window,
 * block, features, landmarks, clusters, buckets) held fixed, as the arena runs it; the
 * Sparse Transformer's O(N^1.5) = O(N sqrt N) assumes a block of about sqrt N. */
static const arena_claim claims[] = {
    {"full", "exact", "O(N^2)", 2, 2},
    {"flash", "exact", "O(N^2)", 2, 1},
    {"local", "fixed pattern", "O(N*w)", 1, 1},
    {"blocklocal", "fixed pattern", "O(N*b)", 1, 1},
    {"strided", "fixed pattern", "O(N^1.5)", 1.5, 1},
    {"fixed", "fixed pattern", "O(N^1.5)", 1.5, 1},
    {"longformer", "fixed pattern+global memory", "O(N*(w+g))", 1, 1},
    {"bigbird", "fixed pattern+global memory", "O(N)", 1, 1},
    {"bigbird-etc", "fixed pattern+global memory", "O(N)", 1, 1},
    {"linear", "kernel", "O(N)", 1, 1},
    {"performer", "kernel", "O(N)", 1, 1},
    {"linformer", "low rank", "O(N)", 1, 1},
    {"nystrom", "low rank", "O(N)", 1, 1},
    {"clustered", "learnable pattern", "O(N*C)", 1, 1},
    {"iclustered", "learnable pattern", "O(N*(C+k))", 1, 1},
    {"lsh", "learnable pattern", "O(N log N)", 1, 1},
};

arena_claim arena_claim_of(const char *name) {
    for (size_t i = 0; i < sizeof claims / sizeof claims[0]; i++)
        if (name && !strcmp(name, claims[i].name)) return claims[i];
    arena_claim none = {NULL, NULL, NULL, NAN, NAN};
    return none;
}

/* ---------------------------------------------------------------------------------------------
 * Inputs
 * ------------------------------------------------------------------------------------------- */
void arena_gaussian(const arena_shape *s, uint64_t seed, float *q, float *k, float *v,
                    float *dout) {
    size_t n = (size_t)s->batch * s->heads * s->len * s->dim;
    ef_rng_normal(seed, 0, 0, n, q);
    ef_rng_normal(seed, 1, 0, n, k);
    ef_rng_normal(seed, 2, 0, n, v);
    if (dout) ef_rng_normal(seed, 3, 0, n, dout);
}

/* streams of the structured draws, per (batch, head) g: frequencies, phases, contents, matches */
#define ST_FREQ(g) ((uint64_t)0x100 << 32 | (uint64_t)(g))
#define ST_PHASE(g) ((uint64_t)0x101 << 32 | (uint64_t)(g))
#define ST_CONTENT(g) ((uint64_t)0x102 << 32 | (uint64_t)(g))
#define ST_MATCH(g) ((uint64_t)0x103 << 32 | (uint64_t)(g))

ef_status arena_structured(const arena_shape *s, int causal, double width, double sharp,
                           uint64_t seed, float *q, float *k, float *v, float *dout) {
    int N = s->len, D = s->dim, dp = D / 2, dc = D - dp;
    size_t hd = (size_t)N * D, G = (size_t)s->batch * s->heads;
    double amp = sharp * sqrt((double)D); /* s: scale 1/sqrt(D) times s = sharp */
    float *w = malloc(sizeof(float) * (size_t)(2 * dp + 1) + sizeof(float) * (size_t)N);
    if (!w) return ef_error(EF_ERR_NOMEM, "arena_structured: out of memory for %d positions", N);
    for (size_t g = 0; g < G; g++) {
        float *Q = q + g * hd, *K = k + g * hd;
        float *freq = w, *phase = w + dp, *match = w + 2 * dp;
        ef_rng_normal(seed, ST_FREQ(g), 0, (size_t)dp, freq);
        ef_rng_uniform(seed, ST_PHASE(g), 0, (size_t)dp, phase);
        ef_rng_uniform(seed, ST_MATCH(g), 0, (size_t)N, match);
        double c = sqrt(2.0 / dp), cs = 1 / sqrt((double)dc);
        /* keys: positions then contents (contents drawn into the key rows' tails) */
        for (int j = 0; j < N; j++) {
            float *kr = K + (size_t)j * D;
            for (int f = 0; f < dp; f++)
                kr[f] = (float)(c * cos(freq[f] / width * j + 6.283185307179586 * phase[f]));
            ef_rng_normal(seed, ST_CONTENT(g), (uint64_t)j * dc, (size_t)dc, kr + dp);
            for (int t = 0; t < dc; t++) kr[dp + t] = (float)(kr[dp + t] * cs);
        }
        for (int i = 0; i < N; i++) {
            float *qr = Q + (size_t)i * D;
            const float *kr = K + (size_t)i * D;
            for (int f = 0; f < dp; f++) qr[f] = (float)(amp * kr[f]);
            int range = causal ? i : N, m = (int)(match[i] * range);
            if (m >= range) m = range - 1;
            const float *km = K + (size_t)(m < 0 ? 0 : m) * D;
            for (int t = 0; t < dc; t++) qr[dp + t] = range > 0 ? (float)(amp * km[dp + t]) : 0.0f;
        }
    }
    free(w);
    size_t n = G * hd;
    ef_rng_normal(seed, 2, 0, n, v);
    if (dout) ef_rng_normal(seed, 3, 0, n, dout);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Exact attention
 * ------------------------------------------------------------------------------------------- */
#define REF_ROWS 128

double arena_rel_err(const float *x, const float *ref, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i]) || !isfinite(ref[i])) return NAN;
        double e = (double)x[i] - ref[i];
        d += e * e, r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* Whether query i sees key j. */
static int ref_visible(int i, int j, int causal, int shared_qk) {
    if (causal && j > i) return 0;
    if (shared_qk && j == i) return causal ? i == 0 : 0; /* itself only when nothing else */
    return 1;
}

ef_status arena_exact(const arena_shape *s, int causal, int shared_qk, float scale,
                      const float *q, const float *k, const float *v, const float *dout,
                      float *out, float *dq, float *dk, float *dv) {
    int N = s->len, D = s->dim;
    size_t hd = (size_t)N * D, G = (size_t)s->batch * s->heads;
    float *S = ef_malloc(sizeof(float) * REF_ROWS * (size_t)N);
    float *P = ef_malloc(sizeof(float) * REF_ROWS * (size_t)N);
    float *kn = shared_qk ? ef_malloc(sizeof(float) * hd) : NULL;
    float *dkn = shared_qk && dout ? ef_malloc(sizeof(float) * hd) : NULL;
    double *nrm = shared_qk ? malloc(sizeof(double) * (size_t)N) : NULL;
    ef_status st = EF_OK;
    if (!S || !P || (shared_qk && (!kn || !nrm || (dout && !dkn)))) {
        st = EF_ERR_NOMEM;
        goto done;
    }
    /* a shared-QK query with no other key (N = 1 non-causal) sees itself */
    int lone_self = shared_qk && !causal && N == 1;
    for (size_t g = 0; g < G && !st; g++) {
        const float *Q = q + g * hd, *V = v + g * hd, *K = k + g * hd;
        float *O = out + g * hd;
        if (shared_qk) {
            for (int j = 0; j < N; j++) {
                double ss = 0;
                for (int t = 0; t < D; t++) ss += (double)Q[(size_t)j * D + t] * Q[(size_t)j * D + t];
                nrm[j] = sqrt(ss);
                for (int t = 0; t < D; t++)
                    kn[(size_t)j * D + t] = nrm[j] > 0 ? (float)(Q[(size_t)j * D + t] / nrm[j]) : 0;
            }
            K = kn;
        }
        float *dK = shared_qk ? dkn : dout ? dk + g * hd : NULL, *dV = dout ? dv + g * hd : NULL;
        if (dout) {
            memset(dK, 0, sizeof(float) * hd);
            memset(dV, 0, sizeof(float) * hd);
        }
        for (int i0 = 0; i0 < N && !st; i0 += REF_ROWS) {
            int r = N - i0 < REF_ROWS ? N - i0 : REF_ROWS, M = causal ? i0 + r : N;
            st = ef_sgemm(0, 1, r, M, D, scale, Q + (size_t)i0 * D, D, K, D, 0, S, M);
            if (st) break;
#ifdef EF_HAVE_OPENMP
#pragma omp parallel for schedule(static)
#endif
            for (int l = 0; l < r; l++) {
                int i = i0 + l;
                float *sr = S + (size_t)l * M, *pr = P + (size_t)l * M;
                float mx = -INFINITY;
                double sum = 0;
                for (int j = 0; j < M; j++)
                    if ((lone_self || ref_visible(i, j, causal, shared_qk)) && sr[j] > mx) mx = sr[j];
                for (int j = 0; j < M; j++) {
                    float e = lone_self || ref_visible(i, j, causal, shared_qk) ? expf(sr[j] - mx) : 0;
                    pr[j] = e;
                    sum += e;
                }
                for (int j = 0; j < M; j++) pr[j] = (float)(pr[j] / sum);
            }
            st = ef_sgemm(0, 0, r, D, M, 1, P, M, V, D, 0, O + (size_t)i0 * D, D);
            if (st || !dout) continue;
            const float *Gr = dout + g * hd + (size_t)i0 * D;
            /* dP = dout V^T into S; dS = scale P (dP - delta), delta_i = sum_j P_ij dP_ij */
            if ((st = ef_sgemm(0, 1, r, M, D, 1, Gr, D, V, D, 0, S, M))) break;
#ifdef EF_HAVE_OPENMP
#pragma omp parallel for schedule(static)
#endif
            for (int l = 0; l < r; l++) {
                float *sr = S + (size_t)l * M, *pr = P + (size_t)l * M;
                double delta = 0;
                for (int j = 0; j < M; j++) delta += (double)pr[j] * sr[j];
                for (int j = 0; j < M; j++) sr[j] = (float)(scale * pr[j] * (sr[j] - delta));
            }
            if ((st = ef_sgemm(0, 0, r, D, M, 1, S, M, K, D, 0, dq + g * hd + (size_t)i0 * D, D)))
                break;
            if ((st = ef_sgemm(1, 0, M, D, r, 1, S, M, Q + (size_t)i0 * D, D, 1, dK, D))) break;
            st = ef_sgemm(1, 0, M, D, r, 1, P, M, Gr, D, 1, dV, D);
        }
        if (!st && dout && shared_qk) { /* dq_j += (I - kn_j kn_j^T) dkn_j / |q_j| */
            float *dQ = dq + g * hd;
            for (int j = 0; j < N; j++) {
                if (!(nrm[j] > 0)) continue;
                const float *x = kn + (size_t)j * D, *dx = dkn + (size_t)j * D;
                double dot = 0;
                for (int t = 0; t < D; t++) dot += (double)x[t] * dx[t];
                for (int t = 0; t < D; t++)
                    dQ[(size_t)j * D + t] += (float)((dx[t] - x[t] * dot) / nrm[j]);
            }
        }
    }
done:
    ef_free(S), ef_free(P), ef_free(kn), ef_free(dkn);
    free(nrm);
    return st;
}
