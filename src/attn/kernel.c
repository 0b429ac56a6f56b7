/*
 * kernel.c - kernelised attention: out_i = phi(q_i) S / (phi(q_i) z + eps) with
 * S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j), in O(N F (D + Dv)) time and O(F Dv) state.
 * Two mechanisms share it (the plan's kind is set from a->ops in kernel_init):
 *   linear     Linear Transformer (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, F = D
 *   performer  Performer FAVOR+ (Choromanski et al. 2021): random features of the softmax
 *              kernel, phi(x) ~ exp(W x^ - |x^|^2/2) / sqrt(m), x^ = x sqrt(scale)
 * docs/kernel.md derives the forward, the backward and the stabilisation.
 *
 * `linear` has a path of its own (kernel_linear.c, through kernel.h): elu+1
 * needs no shift, so the feature map is fused into the chunk products and the quotient rule
 * into their epilogues. What follows describes the generic engine, which performer runs.
 * Per (batch, head), in chunks of KC positions:
 *   non-causal: pass 1 over key chunks accumulates S, z; pass 2 over query chunks computes
 *     num = Phi_q S, den = Phi_q z (+ eps), out = num / den;
 *   causal: one pass; chunk c adds the intra-chunk part A = tril(Phi_q,c Phi_k,c^T):
 *     num = Phi_q,c S_<c + A V_c, den = Phi_q,c z_<c + A 1, then S += Phi_k,c^T V_c, z += ...
 * Padding: only valid positions are ever read. Keys j >= kv_lens[b] and query rows
 * i >= q_lens[b] are outside every loop and every GEMM size (NaN there changes nothing);
 * padded query rows output 0 and get dq = 0, padded keys get dk = dv = 0. With causal=1 the
 * keys j >= q_lens[b] are seen by no valid query and are skipped as well.
 * Stabilisation (performer, stabilize=1): exponent features are computed as exp(g - c) with
 * c = the row's max for a query and, for keys, a running max over the chunks seen so far;
 * when it grows, S and z are rescaled by exp(c_old - c_new), as an online softmax does, so the
 * causal result never depends on future keys and never overflows. The result is defined with
 * eps added to the *unshifted* normaliser, so eps is scaled by exp(-(c_q + c_k)) (eps_at):
 * stabilize changes rounding only, and backward may treat the shifts as constants.
 * Saved for backward: den [B][H][N] (normaliser with eps; 0 on padded rows), the key shift of
 * every chunk [B][H][chunks] and the feature epoch (int64, last 8 bytes); all written.
 * Backward: causal = a forward sweep for dq (S, z rebuilt) and a reverse sweep for dk, dv
 * (dS, dz of the later chunks carried back, rescaled by the saved shifts); non-causal = the
 * same without the triangle. Nothing per position is stored beyond den.
 * Work items are (batch, head) pairs; their GEMMs run single-threaded so results do not
 * depend on the thread count. Every ef_sgemm status is checked; a failure inside the parallel
 * loop is kept (the first one, with its message) and returned by forward / backward.
 * The reference (ref=1, bottom of the file) shares no code with the fast path.
 */
#include "attn/kernel.h"
#include "core/vec.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Random features: orthogonal blocks (Gram-Schmidt on Gaussian D x D blocks, rows rescaled to
 * the norms of fresh Gaussian vectors: the paper's "scaling 0") or iid Gaussian rows.
 * Draw number `epoch` of the plan's seed; stream per purpose, counter per element.
 * ------------------------------------------------------------------------------------------- */
static void draw_features(ef_attn *a) {
    kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m;
    uint64_t stream = 0x70657266ull << 32 | (uint64_t)p->epoch;
    ef_rng_normal(a->seed, stream, 0, (size_t)m * d, p->W);
    if (!p->ortho) return;
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
 * Feature maps (fast path). fm_log writes, for the n rows of x (all valid positions), the
 * features in "log form" into ph and the largest log value into *mx: for exp-type maps the
 * exponent g, for the others the feature itself (*mx = -inf). fm_exp then turns row r into
 * features with shift sh[r] (exp(g - sh)) and applies the trig factors.
 * ------------------------------------------------------------------------------------------- */
static int fm_is_exp(const kplan *p) {
    return p->kind == KM_SOFTMAX || p->kind == KM_HYP || p->kind == KM_TRIG;
}
/* Exponent features are shifted (stabilize=1 on an exp-type map). */
static int fm_stab(const kplan *p) { return fm_is_exp(p) && p->stabilize; }

/* The shift of a row of exponents, as the scalar chain s = s > x ? s : x from -inf gives it:
 * a NaN resets the chain, so the result is the largest after the row's last NaN, or NaN when
 * the last element is NaN. (A NaN or infinite input makes exponents NaN and -inf; which of
 * them ends the row decides whether its outputs turn NaN: docs/hostile.md records the
 * outcome, kept as it was.) */
static float row_shift(const float *x, int n) {
    int t = n;
    while (t >= EF_VL) { /* the last vector holding a NaN */
        vi nan = vf_loadu(x + t - EF_VL) != vf_loadu(x + t - EF_VL);
        int any = 0;
        for (int l = 0; l < EF_VL; l++) any |= nan[l];
        if (any) break;
        t -= EF_VL;
    }
    for (int j = t - 1; j >= 0 && j >= t - EF_VL; j--) /* its last NaN (or the head's) */
        if (x[j] != x[j]) return j == n - 1 ? NAN : ef_row_max(x + j + 1, n - j - 1);
    return ef_row_max(x, n);
}
static ef_status fm_log(const ef_attn *a, const float *x, int n, float *u, float *nrm, float *ph,
                        float *mx_out) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m, F = p->F;
    float mx = -INFINITY;
    if (p->kind == KM_ELU) {
        for (int r = 0; r < n; r++)
            for (int t = 0; t < d; t++) {
                float v = x[(size_t)r * d + t];
                ph[(size_t)r * F + t] = v > 0 ? v + 1 : v; /* exp applied in fm_exp */
            }
        *mx_out = mx;
        return EF_OK;
    }
    /* u = x^ W^T with x^ = xs x; a single row (a decoding step) as m dot products, not a GEMM
     * call (a library call and two system calls cost more than the products) */
    if (n == 1)
        for (int f = 0; f < m; f++) {
            const float *wf = p->W + (size_t)f * d;
            vf acc = vf_set1(0);
            int t = 0;
            for (; t + EF_VL <= d; t += EF_VL) acc += vf_loadu(x + t) * vf_loadu(wf + t);
            float r = vf_hsum(acc);
            for (; t < d; t++) r += x[t] * wf[t];
            u[f] = p->xs * r;
        }
    else
        TRY(ef_sgemm(0, 1, n, m, d, p->xs, x, d, p->W, d, 0.0f, u, m));
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * d;
        nrm[r] = (float)(ef_dot_d(xr, xr, d) * p->xs * p->xs * 0.5);
    }
    for (int r = 0; r < n; r++) {
        float *o = ph + (size_t)r * F;
        const float *ur = u + (size_t)r * m;
        switch (p->kind) {
        case KM_RELU:
            for (int f = 0; f < m; f++) o[f] = (ur[f] > 0 ? ur[f] : 0) + 1e-3f;
            break;
        case KM_SOFTMAX: {
            int f = 0;
            for (; f + EF_VL <= m; f += EF_VL) vf_storeu(o + f, vf_loadu(ur + f) - nrm[r]);
            for (; f < m; f++) o[f] = ur[f] - nrm[r];
            break;
        }
        case KM_HYP:
            for (int f = 0; f < m; f++) o[f] = ur[f] - nrm[r], o[m + f] = -ur[f] - nrm[r];
            break;
        case KM_TRIG:
            for (int f = 0; f < F; f++) o[f] = nrm[r];
            break;
        }
        if (fm_is_exp(p)) {
            float rm = ef_row_max(o, F);
            mx = rm > mx ? rm : mx;
        }
    }
    *mx_out = mx;
    return EF_OK;
}

static void fm_exp(const ef_attn *a, int n, const float *sh, const float *u, float *ph) {
    const kplan *p = a->impl;
    int F = p->F, m = p->m;
    float norm = p->kind == KM_SOFTMAX ? 1 / sqrtf((float)m)
                 : p->kind == KM_HYP || p->kind == KM_TRIG
                     ? 1 / sqrtf((float)(p->kind == KM_HYP ? 2 * m : m))
                     : 1;
    for (int r = 0; r < n; r++) {
        float *o = ph + (size_t)r * F;
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
        ef_vexp_shift(o, (size_t)F, s, norm);
        if (p->kind == KM_TRIG) {
            const float *ur = u + (size_t)r * m;
            for (int f = 0; f < m; f++) o[f] *= cosf(ur[f]), o[m + f] *= sinf(ur[f]);
        }
    }
}

/* dx (n x D, overwritten) from dph (n x F) for features ph of x (shifts held constant: they
 * cancel, see eps_at). */
static ef_status fm_backward(const ef_attn *a, const float *x, int n, const float *u,
                             const float *ph, const float *dph, float *tmp, float *dx) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m, F = p->F;
    if (p->kind == KM_ELU) {
        for (int r = 0; r < n; r++)
            for (int t = 0; t < d; t++) {
                size_t i = (size_t)r * d + t;
                dx[i] = dph[(size_t)r * F + t] * (x[i] > 0 ? 1.0f : ph[(size_t)r * F + t]);
            }
        return EF_OK;
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
        case KM_SOFTMAX: {
            int f = 0;
            for (; f + EF_VL <= m; f += EF_VL)
                vf_storeu(du + f, vf_loadu(g + f) * vf_loadu(o + f));
            for (; f < m; f++) du[f] = g[f] * o[f];
            c = -ef_dot_d(g, o, m);
            break;
        }
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
        float cx = (float)c * p->xs * p->xs, *dxr = dx + (size_t)r * d;
        const float *xr = x + (size_t)r * d;
        int t = 0;
        for (; t + EF_VL <= d; t += EF_VL) vf_storeu(dxr + t, vf_loadu(xr + t) * cx);
        for (; t < d; t++) dxr[t] = cx * xr[t];
    }
    return ef_sgemm(0, 0, n, d, m, p->xs, tmp, m, p->W, d, 1.0f, dx, d);
}

/* Maps a chunk of n keys with one shift (running: updated in *key_shift, the rescale factor
 * of what was summed before in *resc). */
static ef_status map_keys(const ef_attn *a, kwork *w, const float *x, int n, float *key_shift,
                          float *resc) {
    kplan *p = a->impl;
    float mx;
    TRY(fm_log(a, x, n, w->uk, w->nk, w->phk, &mx));
    *resc = 1;
    if (fm_stab(p) && mx > *key_shift) {
        *resc = *key_shift == -INFINITY ? 0 : expf(*key_shift - mx);
        *key_shift = mx;
    }
    float sh[KC];
    for (int r = 0; r < n; r++) sh[r] = *key_shift;
    fm_exp(a, n, sh, w->uk, w->phk);
    return EF_OK;
}

/* Maps n query rows, each at its own shift (its largest exponent; 0 without stabilisation),
 * kept in shq. */
static ef_status map_queries(const ef_attn *a, kwork *w, const float *x, int n) {
    const kplan *p = a->impl;
    float mx;
    TRY(fm_log(a, x, n, w->uq, w->nq, w->phq, &mx));
    for (int r = 0; r < n; r++) {
        w->shq[r] = fm_stab(p) ? row_shift(w->phq + (size_t)r * p->F, p->F) : 0;
    }
    fm_exp(a, n, w->shq, w->uq, w->phq);
    return EF_OK;
}

/* Causal chunks. A key is mapped at its own shift s_j (the largest exponent of its row), so no
 * key of the chunk shrinks another; query row r then uses P_r = max(c_prev, max s_j over the
 * keys j <= r of the chunk): the intra-chunk score of (r, j) carries exp(s_j - P_r) and the
 * prefix terms exp(c_prev - P_r), both <= 1, and row r never depends on a later key.
 * Non-exp maps (and stabilize=0) use s_j = 0, which makes every factor 1. All n keys are valid. */
static ef_status map_keys_own(const ef_attn *a, kwork *w, const float *x, int n) {
    const kplan *p = a->impl;
    float mx;
    TRY(fm_log(a, x, n, w->uk, w->nk, w->phk, &mx));
    for (int r = 0; r < n; r++) {
        w->shk[r] = fm_stab(p) ? row_shift(w->phk + (size_t)r * p->F, p->F) : 0;
    }
    fm_exp(a, n, w->shk, w->uk, w->phk);
    return EF_OK;
}

/* Per-row prefix shifts P_r and factors rho_r = exp(c_prev - P_r) of a causal chunk with qn
 * query rows and kval keys; returns the chunk's new running shift max(c_prev, max s_j). */
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

/* Multiplies A[r][j] by exp(s_j - P_r) for j <= r and sets it to 0 for j > r (assigned, never
 * multiplied: a later key's score cannot leak). */
static void scale_intra(const kwork *w, float *A, int qn, int kn) {
    for (int r = 0; r < qn; r++) {
        float *x = A + (size_t)r * KC;
        int j = 0;
        if (w->pr[r] != -INFINITY) /* in vectors (vf_exp is ef_expf's function) */
            for (; j + EF_VL <= kn; j += EF_VL) {
                vf sk = vf_loadu(w->shk + j);
                vi hide = (sk == -INFINITY) | (vi_iota() + j > r);
                vf e = vf_exp(vf_select(hide, vf_set1(0), sk - w->pr[r]));
                vf_storeu(x + j, vf_select(hide, vf_set1(0), vf_loadu(x + j) * e));
            }
        for (; j < kn; j++)
            x[j] = j > r || w->shk[j] == -INFINITY || w->pr[r] == -INFINITY
                       ? 0
                       : x[j] * ef_expf(w->shk[j] - w->pr[r]);
    }
}

/* Adds the chunk's kn (valid) keys to the state:
 * S = S exp(c_prev - c_new) + sum_j phi_j exp(s_j - c_new) v_j^T. */
static ef_status state_add(const ef_attn *a, kwork *w, const float *v, int kn, float c_prev,
                           float c_new) {
    const kplan *p = a->impl;
    int F = p->F, dv = a->shape.v_dim;
    if (c_prev != c_new) {
        float resc = c_prev == -INFINITY ? 0 : expf(c_prev - c_new);
        ef_row_scale(w->S, resc, F * dv);
        ef_row_scale(w->z, resc, F);
    }
    for (int r = 0; r < kn; r++)
        ef_row_scale(w->phk + (size_t)r * F, w->shk[r] == -INFINITY ? 0 : expf(w->shk[r] - c_new),
                  F);
    TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v, dv, 1.0f, w->S, dv));
    for (int r = 0; r < kn; r++) ef_row_add(w->z, w->phk + (size_t)r * F, F);
    return EF_OK;
}

/* The normaliser of a row is defined as phi(q).sum phi(k) + eps with the *unshifted*
 * features, whatever `stabilize` is. The fast path holds the normaliser in shifted units
 * (query features at exp(-c_q), key features at exp(-c_k)), so eps enters as
 * eps exp(-(c_q + c_k)): the shifts cancel exactly in out = num / den, and backward may treat
 * them as constants. (Adding eps to the shifted normaliser instead would make the result
 * depend on the maxima, non-smoothly, and on keys the row does not see.) */
static double eps_at(const kplan *p, double shift) {
    if (p->eps == 0) return 0;
    return fm_stab(p) ? p->eps * exp(-shift) : p->eps;
}

/* den + eps in shifted units, as fp32; +inf when eps dominates beyond fp32 (the true output
 * is then below fp32's range: out = 0, gradients 0). */
static float den_total(const kplan *p, double den, double shift) {
    double t = den + eps_at(p, shift);
    return t > FLT_MAX ? INFINITY : (float)t;
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
static void kcall_init(kcall *c, ef_attn *a, const ef_attn_io *io, float *saved, const float *dout,
                       float *dq, float *dk, float *dv) {
    c->a = a, c->io = io, c->saved = saved, c->dout = dout, c->dq = dq, c->dk = dk, c->dv = dv;
    atomic_init(&c->failed, 0);
    c->st = EF_OK;
    c->msg[0] = 0;
}

/* Records the first failing status of a work item with its (thread-local) message. */
static void kcall_fail(kcall *c, ef_status st) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&c->failed, &expected, 1)) {
        c->st = st;
        snprintf(c->msg, sizeof c->msg, "%s", ef_last_error());
    }
}

/* After the parallel loop: the kept failure, re-raised in the calling thread. */
static ef_status kcall_status(const kcall *c) {
    if (c->st == EF_OK) return EF_OK;
    return ef_error(c->st, "%s: %s", c->a->ops->name, c->msg);
}

/* out rows [0, n) of a chunk from num and den (a row whose normaliser is 0 or inf: zeros). */
static void finish_rows(const ef_attn *a, kwork *w, int n, float *out, const float *den) {
    int dv = a->shape.v_dim;
    for (int r = 0; r < n; r++) {
        float dn = den[r], *o = out + (size_t)r * dv;
        const float *x = w->num + (size_t)r * dv;
        if (dn == 0 || dn == INFINITY) {
            memset(o, 0, sizeof(float) * dv);
            continue;
        }
        int e = 0;
        for (; e + EF_VL <= dv; e += EF_VL) vf_storeu(o + e, vf_loadu(x + e) / dn);
        for (; e < dv; e++) o[e] = x[e] / dn;
    }
}

static ef_status forward_one(kcall *c, int64_t bh, kwork *w) {
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    kplan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F;
    int b = (int)(bh / s->heads);
    int L = ef_attn_kv_valid(a, c->io, b), Q = ef_attn_q_valid(a, c->io, b);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv;
    float *out = c->io->out + (size_t)bh * n * dv;
    float *den_all = c->saved ? den_of(a, c->saved, bh) : NULL;
    float *shifts = c->saved ? shifts_of(a, c->saved, bh) : NULL;
    float dbuf[KC];
    /* padded query rows: zeros; saved fully written (chunks no query reaches: -inf) */
    memset(out + (size_t)Q * dv, 0, sizeof(float) * (size_t)(n - Q) * dv);
    if (den_all)
        for (int i = Q; i < n; i++) den_all[i] = 0;
    if (shifts)
        for (int ci = 0; ci < p->nchunks; ci++) shifts[ci] = -INFINITY;
    if (L == 0) { /* no query sees a key */
        memset(out, 0, sizeof(float) * (size_t)Q * dv);
        if (den_all)
            for (int i = 0; i < Q; i++) den_all[i] = 0;
        return EF_OK;
    }
    memset(w->S, 0, sizeof(float) * F * dv);
    memset(w->z, 0, sizeof(float) * F);
    float kshift = -INFINITY;
    if (!a->causal) {
        for (int j0 = 0; j0 < L && Q > 0; j0 += KC) {
            int kn = EF_MIN(KC, L - j0);
            float resc;
            TRY(map_keys(a, w, k + (size_t)j0 * d, kn, &kshift, &resc));
            if (resc != 1) {
                ef_row_scale(w->S, resc, F * dv);
                ef_row_scale(w->z, resc, F);
            }
            TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v + (size_t)j0 * dv, dv, 1.0f, w->S,
                         dv));
            for (int r = 0; r < kn; r++) ef_row_add(w->z, w->phk + (size_t)r * F, F);
        }
        if (shifts) shifts[0] = kshift;
        for (int i0 = 0; i0 < Q; i0 += KC) {
            int qn = EF_MIN(KC, Q - i0);
            TRY(map_queries(a, w, q + (size_t)i0 * d, qn));
            TRY(ef_sgemm(0, 0, qn, dv, F, 1.0f, w->phq, F, w->S, dv, 0.0f, w->num, dv));
            float *den = den_all ? den_all + i0 : dbuf;
            for (int r = 0; r < qn; r++)
                den[r] = den_total(p, ef_dot_d(w->phq + (size_t)r * F, w->z, F),
                                   (double)w->shq[r] + kshift);
            finish_rows(a, w, qn, out + (size_t)i0 * dv, den);
        }
        return EF_OK;
    }
    /* causal: position chunks [c0, c0+KC) of queries and keys together (top-left); only
     * queries < Q and keys < min(L, Q) take part */
    int Lc = EF_MIN(L, Q);
    for (int c0 = 0, ci = 0; c0 < Q; c0 += KC, ci++) {
        int kn = EF_MAX(0, EF_MIN(KC, Lc - c0)), qn = EF_MIN(KC, Q - c0);
        if (kn > 0) TRY(map_keys_own(a, w, k + (size_t)c0 * d, kn));
        float cnew = chunk_prefix(w, qn, kn, kshift);
        if (shifts) shifts[ci] = cnew;
        TRY(map_queries(a, w, q + (size_t)c0 * d, qn));
        /* prefix part, at each row's shift */
        TRY(ef_sgemm(0, 0, qn, dv, F, 1.0f, w->phq, F, w->S, dv, 0.0f, w->num, dv));
        float *den = den_all ? den_all + c0 : dbuf;
        for (int r = 0; r < qn; r++) {
            den[r] = (float)ef_dot_d(w->phq + (size_t)r * F, w->z, F) * w->rho[r];
            ef_row_scale(w->num + (size_t)r * dv, w->rho[r], dv);
        }
        if (kn > 0) { /* intra-chunk: A = tril(Phi_q Phi_k^T) exp(s_j - P_r) */
            TRY(ef_sgemm(0, 1, qn, kn, F, 1.0f, w->phq, F, w->phk, F, 0.0f, w->A, KC));
            scale_intra(w, w->A, qn, kn);
            for (int r = 0; r < qn; r++) den[r] += (float)ef_sum_d(w->A + (size_t)r * KC, kn);
            TRY(ef_sgemm(0, 0, qn, dv, kn, 1.0f, w->A, KC, v + (size_t)c0 * dv, dv, 1.0f, w->num,
                         dv));
        }
        for (int r = 0; r < qn; r++) {
            int sees = EF_MIN(L, c0 + r + 1) > 0;
            den[r] = sees ? den_total(p, den[r], (double)w->shq[r] + w->pr[r]) : 0;
        }
        finish_rows(a, w, qn, out + (size_t)c0 * dv, den);
        if (kn > 0 && c0 + KC < Q) TRY(state_add(a, w, v + (size_t)c0 * dv, kn, kshift, cnew));
        kshift = cnew;
    }
    return EF_OK;
}

static void forward_head(void *ctx, int64_t bh, int tid) {
    kcall *c = ctx;
    kplan *p = c->a->impl;
    int old = ef_gemm_local_threads(1);
    ef_status st = p->kind == KM_ELU ? ef_kernel_linear_forward(c, bh, &p->ws[tid])
                                     : forward_one(c, bh, &p->ws[tid]);
    ef_gemm_local_threads(old);
    if (st) kcall_fail(c, st);
}

/* Feature redraws: a training forward (saved != NULL) counts towards `redraw` and stores its
 * feature epoch in the last 8 bytes of saved; a backward regenerates that draw if the plan has
 * moved on, and restores the current one afterwards. Fast and reference paths alike. */
static void epoch_forward(ef_attn *a, void *saved) {
    kplan *p = a->impl;
    if (saved && p->redraw > 0 && p->W && !p->replaying) {
        if (p->calls >= p->redraw) {
            p->epoch++, p->calls = 0;
            draw_features(a);
        }
        p->calls++;
    }
    if (saved)
        memcpy((char *)saved + ef_attn_saved_bytes(a) - sizeof(int64_t), &p->epoch,
               sizeof(int64_t));
}

static int64_t epoch_backward_begin(ef_attn *a, const void *saved) {
    kplan *p = a->impl;
    int64_t epoch, current = p->epoch;
    memcpy(&epoch, (const char *)saved + ef_attn_saved_bytes(a) - sizeof(int64_t), sizeof epoch);
    if (p->W && epoch != p->epoch) { /* features were redrawn since this forward: draw its set */
        p->epoch = epoch;
        draw_features(a);
    }
    return current;
}

static void epoch_backward_end(ef_attn *a, int64_t current) {
    kplan *p = a->impl;
    if (p->W && p->epoch != current) { /* back to the features the next forward expects */
        p->epoch = current;
        draw_features(a);
    }
}

/* ef_attn_forward_replay: the forward of the record's feature draw (a reversible layer's
 * recomputation must see the features its original forward saw, even after a redraw), not
 * counted towards `redraw`; the plan's current draw is restored afterwards. */
static ef_status replay_with(ef_attn *a, const ef_attn_io *io, void *saved,
                             ef_status (*fwd)(ef_attn *, const ef_attn_io *, void *)) {
    kplan *p = a->impl;
    int64_t current = epoch_backward_begin(a, saved);
    p->replaying = 1;
    ef_status st = fwd(a, io, saved);
    p->replaying = 0;
    epoch_backward_end(a, current);
    return st;
}

static ef_status kernel_forward(ef_attn *a, const ef_attn_io *io, void *saved);
static ef_status kernel_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved);
static ef_status kernel_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    return replay_with(a, io, saved, kernel_forward);
}
static ef_status kernel_ref_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    return replay_with(a, io, saved, kernel_ref_forward);
}

static ef_status kernel_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    epoch_forward(a, saved);
    kcall c;
    kcall_init(&c, a, io, saved, NULL, NULL, NULL, NULL);
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), forward_head, &c);
    return kcall_status(&c);
}

/* ---------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------- */
/* G = dO / den and dd = -(dO . out) / den for the qn query rows of a chunk. */
static void grad_rows(const ef_attn *a, kwork *w, const float *g, const float *out,
                      const float *den, int qn) {
    int dv = a->shape.v_dim;
    for (int r = 0; r < qn; r++) {
        float inv = den[r] != 0 ? 1 / den[r] : 0, *gr = w->G + (size_t)r * dv;
        const float *gi = g + (size_t)r * dv;
        int e = 0;
        for (; e + EF_VL <= dv; e += EF_VL) vf_storeu(gr + e, vf_loadu(gi + e) * inv);
        for (; e < dv; e++) gr[e] = gi[e] * inv;
        w->dd[r] = (float)(-ef_dot_d(gi, out + (size_t)r * dv, dv) * inv);
    }
}

/* Keys of a chunk mapped with a known shift (no running update). */
static ef_status map_keys_fixed(const ef_attn *a, kwork *w, const float *x, int n, float shift) {
    float mx, sh[KC];
    TRY(fm_log(a, x, n, w->uk, w->nk, w->phk, &mx));
    for (int r = 0; r < n; r++) sh[r] = shift;
    fm_exp(a, n, sh, w->uk, w->phk);
    return EF_OK;
}

/* For kn valid keys: dPhi_k = V dS^T + 1 dz^T (+ intra); dV = Phi_k dS (+ intra); dk. */
static ef_status key_grads(const ef_attn *a, kwork *w, const float *k, const float *v, int kn,
                           float *dk, float *dvo, int intra, int qn) {
    const kplan *p = a->impl;
    int dv = a->shape.v_dim, F = p->F;
    TRY(ef_sgemm(0, 1, kn, F, dv, 1.0f, v, dv, w->dS, dv, 0.0f, w->dph, F));
    for (int r = 0; r < kn; r++) ef_row_add(w->dph + (size_t)r * F, w->dz, F);
    TRY(ef_sgemm(0, 0, kn, dv, F, 1.0f, w->phk, F, w->dS, dv, 0.0f, dvo, dv));
    if (intra) /* causal: key j entered the state at exp(s_j - c) */
        for (int r = 0; r < kn; r++) {
            ef_row_scale(w->dph + (size_t)r * F, w->ksc[r], F);
            ef_row_scale(dvo + (size_t)r * dv, w->ksc[r], dv);
        }
    if (intra && qn > 0) {
        TRY(ef_sgemm(1, 0, kn, F, qn, 1.0f, w->dA, KC, w->phq, F, 1.0f, w->dph, F));
        TRY(ef_sgemm(1, 0, kn, dv, qn, 1.0f, w->A, KC, w->G, dv, 1.0f, dvo, dv));
    }
    return fm_backward(a, k, kn, w->uk, w->phk, w->dph, w->tmp, dk);
}

/* A = tril(Phi_q Phi_k^T) and dA = tril(G V^T + dd 1^T), times exp(s_j - P_r), of one causal
 * chunk (keys at their own shifts, see map_keys_own). */
static ef_status intra_scores(const ef_attn *a, kwork *w, const float *v, int qn, int kn) {
    const kplan *p = a->impl;
    int dv = a->shape.v_dim, F = p->F;
    TRY(ef_sgemm(0, 1, qn, kn, F, 1.0f, w->phq, F, w->phk, F, 0.0f, w->A, KC));
    TRY(ef_sgemm(0, 1, qn, kn, dv, 1.0f, w->G, dv, v, dv, 0.0f, w->dA, KC));
    for (int r = 0; r < qn; r++) {
        float *x = w->dA + (size_t)r * KC;
        int j = 0;
        for (; j + EF_VL <= kn; j += EF_VL) vf_storeu(x + j, vf_loadu(x + j) + w->dd[r]);
        for (; j < kn; j++) x[j] += w->dd[r];
    }
    scale_intra(w, w->A, qn, kn);
    scale_intra(w, w->dA, qn, kn);
    return EF_OK;
}

static ef_status backward_one(kcall *c, int64_t bh, kwork *w) {
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    kplan *p = a->impl;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F;
    int b = (int)(bh / s->heads);
    int L = ef_attn_kv_valid(a, c->io, b), Q = ef_attn_q_valid(a, c->io, b);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv, *out = c->io->out + (size_t)bh * n * dv;
    const float *g = c->dout + (size_t)bh * n * dv;
    float *dq = c->dq + (size_t)bh * n * d, *dk = c->dk + (size_t)bh * m * d;
    float *dvo = c->dv + (size_t)bh * m * dv;
    const float *den = den_of(a, c->saved, bh), *shifts = shifts_of(a, c->saved, bh);
    /* rows and keys no loop below reaches keep these zeros */
    memset(dq + (size_t)Q * d, 0, sizeof(float) * (size_t)(n - Q) * d);
    memset(dk, 0, sizeof(float) * (size_t)m * d);
    memset(dvo, 0, sizeof(float) * (size_t)m * dv);
    if (L == 0 || Q == 0) {
        memset(dq, 0, sizeof(float) * (size_t)Q * d);
        return EF_OK;
    }
    memset(w->S, 0, sizeof(float) * F * dv);
    memset(w->z, 0, sizeof(float) * F);
    memset(w->dS, 0, sizeof(float) * F * dv);
    memset(w->dz, 0, sizeof(float) * F);
    if (!a->causal) {
        for (int j0 = 0; j0 < L; j0 += KC) { /* S, z again, with the saved shift */
            int kn = EF_MIN(KC, L - j0);
            TRY(map_keys_fixed(a, w, k + (size_t)j0 * d, kn, shifts[0]));
            TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->phk, F, v + (size_t)j0 * dv, dv, 1.0f, w->S,
                         dv));
            for (int r = 0; r < kn; r++) ef_row_add(w->z, w->phk + (size_t)r * F, F);
        }
        for (int i0 = 0; i0 < Q; i0 += KC) {
            int qn = EF_MIN(KC, Q - i0);
            TRY(map_queries(a, w, q + (size_t)i0 * d, qn));
            grad_rows(a, w, g + (size_t)i0 * dv, out + (size_t)i0 * dv, den + i0, qn);
            /* dPhi_q = G S^T + dd z^T;  dS += Phi_q^T G;  dz += Phi_q^T dd */
            TRY(ef_sgemm(0, 1, qn, F, dv, 1.0f, w->G, dv, w->S, dv, 0.0f, w->dph, F));
            for (int r = 0; r < qn; r++) {
                ef_row_axpy(w->dph + (size_t)r * F, w->dd[r], w->z, F);
                ef_row_axpy(w->dz, w->dd[r], w->phq + (size_t)r * F, F);
            }
            TRY(ef_sgemm(1, 0, F, dv, qn, 1.0f, w->phq, F, w->G, dv, 1.0f, w->dS, dv));
            TRY(fm_backward(a, q + (size_t)i0 * d, qn, w->uq, w->phq, w->dph, w->tmp,
                            dq + (size_t)i0 * d));
        }
        for (int j0 = 0; j0 < L; j0 += KC) {
            int kn = EF_MIN(KC, L - j0);
            TRY(map_keys_fixed(a, w, k + (size_t)j0 * d, kn, shifts[0]));
            TRY(key_grads(a, w, k + (size_t)j0 * d, v + (size_t)j0 * dv, kn, dk + (size_t)j0 * d,
                          dvo + (size_t)j0 * dv, 0, 0));
        }
        return EF_OK;
    }
    /* causal, forward sweep: S, z rebuilt chunk by chunk; dq */
    int Lc = EF_MIN(L, Q), nch = (Q + KC - 1) / KC;
    float kshift = -INFINITY;
    for (int c0 = 0; c0 < Q; c0 += KC) {
        int kn = EF_MAX(0, EF_MIN(KC, Lc - c0)), qn = EF_MIN(KC, Q - c0);
        if (kn > 0) TRY(map_keys_own(a, w, k + (size_t)c0 * d, kn));
        float cnew = chunk_prefix(w, qn, kn, kshift);
        TRY(map_queries(a, w, q + (size_t)c0 * d, qn));
        grad_rows(a, w, g + (size_t)c0 * dv, out + (size_t)c0 * dv, den + c0, qn);
        /* dPhi_q = rho (G S^T + dd z^T) + (dA o E) Phi_k */
        TRY(ef_sgemm(0, 1, qn, F, dv, 1.0f, w->G, dv, w->S, dv, 0.0f, w->dph, F));
        for (int r = 0; r < qn; r++) {
            ef_row_axpy(w->dph + (size_t)r * F, w->dd[r], w->z, F);
            ef_row_scale(w->dph + (size_t)r * F, w->rho[r], F);
        }
        if (kn > 0) {
            TRY(intra_scores(a, w, v + (size_t)c0 * dv, qn, kn));
            TRY(ef_sgemm(0, 0, qn, F, kn, 1.0f, w->dA, KC, w->phk, F, 1.0f, w->dph, F));
        }
        TRY(fm_backward(a, q + (size_t)c0 * d, qn, w->uq, w->phq, w->dph, w->tmp,
                        dq + (size_t)c0 * d));
        if (kn > 0 && c0 + KC < Q) TRY(state_add(a, w, v + (size_t)c0 * dv, kn, kshift, cnew));
        kshift = cnew;
    }
    /* reverse sweep: dS, dz = gradient wrt the state after chunk c (at its shift c_c), carried
     * back to the state before it (at c_{c-1}) once the chunk's keys have used it */
    for (int ci = nch - 1; ci >= 0; ci--) {
        int c0 = ci * KC;
        int kn = EF_MAX(0, EF_MIN(KC, Lc - c0)), qn = EF_MIN(KC, Q - c0);
        float sh = shifts[ci], prev = ci > 0 ? shifts[ci - 1] : -INFINITY;
        if (kn > 0) TRY(map_keys_own(a, w, k + (size_t)c0 * d, kn));
        chunk_prefix(w, qn, kn, prev);
        TRY(map_queries(a, w, q + (size_t)c0 * d, qn));
        grad_rows(a, w, g + (size_t)c0 * dv, out + (size_t)c0 * dv, den + c0, qn);
        if (kn > 0) {
            TRY(intra_scores(a, w, v + (size_t)c0 * dv, qn, kn));
            for (int r = 0; r < kn; r++)
                w->ksc[r] = w->shk[r] == -INFINITY || sh == -INFINITY ? 0 : expf(w->shk[r] - sh);
            TRY(key_grads(a, w, k + (size_t)c0 * d, v + (size_t)c0 * dv, kn, dk + (size_t)c0 * d,
                          dvo + (size_t)c0 * dv, 1, qn));
        }
        if (ci == 0) break; /* no earlier keys to carry dS, dz to */
        if (prev != sh) {
            float resc = prev == -INFINITY ? 0 : expf(prev - sh);
            ef_row_scale(w->dS, resc, F * dv);
            ef_row_scale(w->dz, resc, F);
        }
        /* this chunk's queries saw the state before it at exp(c_{c-1} - P_r) */
        for (int r = 0; r < qn; r++) {
            ef_row_scale(w->G + (size_t)r * dv, w->rho[r], dv);
            w->dd[r] *= w->rho[r];
        }
        TRY(ef_sgemm(1, 0, F, dv, qn, 1.0f, w->phq, F, w->G, dv, 1.0f, w->dS, dv));
        for (int r = 0; r < qn; r++) ef_row_axpy(w->dz, w->dd[r], w->phq + (size_t)r * F, F);
    }
    return EF_OK;
}

static void backward_head(void *ctx, int64_t bh, int tid) {
    kcall *c = ctx;
    kplan *p = c->a->impl;
    int old = ef_gemm_local_threads(1);
    ef_status st = p->kind == KM_ELU ? ef_kernel_linear_backward(c, bh, &p->ws[tid])
                                     : backward_one(c, bh, &p->ws[tid]);
    ef_gemm_local_threads(old);
    if (st) kcall_fail(c, st);
}

static ef_status kernel_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                 const float *dout, float *dq, float *dk, float *dv) {
    int64_t current = epoch_backward_begin(a, saved);
    kcall c;
    kcall_init(&c, a, io, (float *)saved, dout, dq, dk, dv);
    ef_parallel_for((int64_t)a->shape.batch * a->shape.heads, ef_attn_threads(a), backward_head,
                    &c);
    epoch_backward_end(a, current);
    return kcall_status(&c);
}

/* ---------------------------------------------------------------------------------------------
 * Reference (ref=1): the explicit N x M form, written apart from the fast path above (it calls
 * none of its feature-map, shift, chunk or GEMM helpers), in double:
 *   A_ij = phi(q_i).phi(k_j) for the visible pairs: i < q_lens[b], j < kv_lens[b] and, with
 *          causal=1, j <= i;
 *   out_i = sum_j A_ij v_j / (sum_j A_ij + eps);  a row that sees no key (or a padded row): 0.
 * The features are computed here from their definitions (docs/kernel.md) with the plan's
 * projection matrix W. W is the one thing shared with the fast path: it is the mechanism's
 * random draw (the "reported" matrix of the plan's seed and epoch), not a computation.
 * Exponent features are held as exp(g_f - s) with s the row's own largest exponent, so
 * A_ij = exp(s_i + s_j) phi^_i.phi^_j; row i is then scaled by exp(-(s_i + B_i)), B_i the
 * largest s_j it sees, and eps by the same factor: exactly the function above, for any input
 * size, whatever `stabilize` says (double does not need the option; the result does not
 * depend on it). Backward recomputes everything in double (nothing is saved but the feature
 * epoch), differentiates the quotient pair by pair (shifts held constant: they cancel), then
 * the feature maps row by row. Time O(B H N M F), one thread.
 * ------------------------------------------------------------------------------------------- */
/* phi(x) of one row in double: phi[f] = fac_f exp(lg_f - s) with s = max_f lg_f for exp-type
 * maps (the return value), s = 0 for elu+1 and relu; u = W x^ (performer). */
static double ref_map_row(const ef_attn *a, const float *x, double *u, double *phi) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m;
    if (p->kind == KM_ELU) {
        for (int t = 0; t < d; t++) phi[t] = x[t] > 0 ? (double)x[t] + 1.0 : exp((double)x[t]);
        return 0;
    }
    double xs = sqrt((double)a->scale), h = 0;
    for (int t = 0; t < d; t++) h += (double)x[t] * x[t];
    h *= xs * xs / 2; /* |x^|^2 / 2 */
    for (int f = 0; f < m; f++) {
        double acc = 0;
        for (int t = 0; t < d; t++) acc += (double)p->W[(size_t)f * d + t] * x[t];
        u[f] = acc * xs;
    }
    double s = -INFINITY;
    switch (p->kind) {
    case KM_RELU: /* relu(u) + 1e-3 */
        for (int f = 0; f < m; f++) phi[f] = (u[f] > 0 ? u[f] : 0) + 1e-3;
        return 0;
    case KM_SOFTMAX: /* exp(u - h) / sqrt(m) */
        for (int f = 0; f < m; f++) s = fmax(s, u[f] - h);
        for (int f = 0; f < m; f++) phi[f] = exp(u[f] - h - s) / sqrt((double)m);
        return s;
    case KM_HYP: /* [exp(u - h), exp(-u - h)] / sqrt(2m) */
        for (int f = 0; f < m; f++) s = fmax(s, fabs(u[f]) - h);
        for (int f = 0; f < m; f++) {
            phi[f] = exp(u[f] - h - s) / sqrt(2.0 * m);
            phi[m + f] = exp(-u[f] - h - s) / sqrt(2.0 * m);
        }
        return s;
    default: /* KM_TRIG: exp(h) [cos u, sin u] / sqrt(m); every exponent is h */
        for (int f = 0; f < m; f++) {
            phi[f] = cos(u[f]) / sqrt((double)m);
            phi[m + f] = sin(u[f]) / sqrt((double)m);
        }
        return h;
    }
}

/* dx (D floats) of one row from g = dL/dphi (phi, u as ref_map_row gave them; the row's shift
 * is a constant). du: m doubles of scratch. */
static void ref_back_row(const ef_attn *a, const float *x, const double *u, const double *phi,
                         const double *g, double *du, float *dx) {
    const kplan *p = a->impl;
    int d = a->shape.head_dim, m = p->m;
    if (p->kind == KM_ELU) { /* d(elu(x)+1)/dx = 1 for x > 0, else exp(x) = phi */
        for (int t = 0; t < d; t++) dx[t] = (float)(g[t] * (x[t] > 0 ? 1.0 : phi[t]));
        return;
    }
    /* phi depends on x^ through u = W x^ (du) and through h = |x^|^2/2 (coefficient c of x^) */
    double c = 0;
    for (int f = 0; f < m; f++) {
        switch (p->kind) {
        case KM_RELU: du[f] = u[f] > 0 ? g[f] : 0; break;
        case KM_SOFTMAX: du[f] = g[f] * phi[f], c -= g[f] * phi[f]; break;
        case KM_HYP:
            du[f] = g[f] * phi[f] - g[m + f] * phi[m + f];
            c -= g[f] * phi[f] + g[m + f] * phi[m + f];
            break;
        default: /* trig: dphi_f/du_f = -phi_{m+f}, dphi_{m+f}/du_f = phi_f; d/dh = phi */
            du[f] = -g[f] * phi[m + f] + g[m + f] * phi[f];
            c += g[f] * phi[f] + g[m + f] * phi[m + f];
        }
    }
    double xs = sqrt((double)a->scale);
    for (int t = 0; t < d; t++) { /* dx = xs (W^T du + c x^) */
        double acc = 0;
        for (int f = 0; f < m; f++) acc += du[f] * p->W[(size_t)f * d + t];
        dx[t] = (float)(xs * (acc + c * xs * x[t]));
    }
}

/* Features of the Q valid queries and L valid keys of one (batch, head). */
static void ref_features(ef_attn *a, const float *q, const float *k, int Q, int L) {
    kplan *p = a->impl;
    int d = a->shape.head_dim, F = p->F, mm = EF_MAX(p->m, 1);
    for (int i = 0; i < Q; i++)
        p->rsq[i] =
            ref_map_row(a, q + (size_t)i * d, p->ruq + (size_t)i * mm, p->rfq + (size_t)i * F);
    for (int j = 0; j < L; j++)
        p->rsk[j] =
            ref_map_row(a, k + (size_t)j * d, p->ruk + (size_t)j * mm, p->rfk + (size_t)j * F);
}

/* Keys row i sees. */
static int ref_visible(const ef_attn *a, int L, int i) { return a->causal ? EF_MIN(L, i + 1) : L; }

/* A_ij exp(-(s_i + B)) = phi^_i.phi^_j exp(s_j - B). */
static double ref_a(const kplan *p, int i, int j, double B) {
    double acc = 0;
    for (int f = 0; f < p->F; f++)
        acc += p->rfq[(size_t)i * p->F + f] * p->rfk[(size_t)j * p->F + f];
    return acc * exp(p->rsk[j] - B);
}

/* Row i (valid, lim > 0 visible keys): num [Dv] and den (with eps), both times
 * exp(-(s_i + B)); returns B. */
static double ref_row(const ef_attn *a, int i, int lim, const float *v, double *num, double *den) {
    const kplan *p = a->impl;
    int dv = a->shape.v_dim;
    double B = -INFINITY, acc = 0;
    for (int j = 0; j < lim; j++) B = fmax(B, p->rsk[j]);
    for (int e = 0; e < dv; e++) num[e] = 0;
    for (int j = 0; j < lim; j++) {
        double aij = ref_a(p, i, j, B);
        acc += aij;
        for (int e = 0; e < dv; e++) num[e] += aij * v[(size_t)j * dv + e];
    }
    *den = acc + (p->eps > 0 ? p->eps * exp(-(p->rsq[i] + B)) : 0);
    return B;
}

static ef_status kernel_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim;
    epoch_forward(a, saved);
    double *num = p->rrow;
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        int b = (int)(bh / s->heads);
        int L = ef_attn_kv_valid(a, io, b), Q = ef_attn_q_valid(a, io, b);
        const float *v = io->v + (size_t)bh * m * dv;
        float *out = io->out + (size_t)bh * n * dv;
        ref_features(a, io->q + (size_t)bh * n * d, io->k + (size_t)bh * m * d, Q, L);
        for (int i = 0; i < n; i++) {
            int lim = i < Q ? ref_visible(a, L, i) : 0;
            double den = 0;
            if (lim > 0) ref_row(a, i, lim, v, num, &den);
            for (int e = 0; e < dv; e++)
                out[(size_t)i * dv + e] = lim > 0 && den != 0 ? (float)(num[e] / den) : 0;
        }
    }
    return EF_OK;
}

static ef_status kernel_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                     const float *dout, float *dq, float *dk, float *dv) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int n = s->q_len, m = s->kv_len, d = s->head_dim, e_ = s->v_dim, F = p->F;
    int mm = EF_MAX(p->m, 1);
    int64_t current = epoch_backward_begin(a, saved);
    double *num = p->rrow, *G = num + e_, *du = G + e_;
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        int b = (int)(bh / s->heads);
        int L = ef_attn_kv_valid(a, io, b), Q = ef_attn_q_valid(a, io, b);
        const float *q = io->q + (size_t)bh * n * d, *k = io->k + (size_t)bh * m * d;
        const float *v = io->v + (size_t)bh * m * e_, *g = dout + (size_t)bh * n * e_;
        float *dqo = dq + (size_t)bh * n * d, *dko = dk + (size_t)bh * m * d;
        float *dvo = dv + (size_t)bh * m * e_;
        ref_features(a, q, k, Q, L);
        memset(p->rgq, 0, sizeof(double) * (size_t)Q * F);
        memset(p->rgk, 0, sizeof(double) * (size_t)L * F);
        memset(p->rdv, 0, sizeof(double) * (size_t)L * e_);
        for (int i = 0; i < Q; i++) {
            int lim = ref_visible(a, L, i);
            double den;
            if (lim == 0) continue;
            double B = ref_row(a, i, lim, v, num, &den);
            if (den == 0) continue; /* out_i = 0 is constant there */
            /* out = num / den: dnum = dO / den (G), dden = -(dO . out) / den (dd) */
            double dd = 0;
            for (int e = 0; e < e_; e++) {
                G[e] = g[(size_t)i * e_ + e] / den;
                dd -= G[e] * (num[e] / den);
            }
            for (int j = 0; j < lim; j++) {
                double ej = exp(p->rsk[j] - B), aij = ref_a(p, i, j, B), da = dd;
                for (int e = 0; e < e_; e++) {
                    da += G[e] * v[(size_t)j * e_ + e];
                    p->rdv[(size_t)j * e_ + e] += aij * G[e];
                }
                for (int f = 0; f < F; f++) { /* A_ij = phi^_i.phi^_j e_j */
                    p->rgq[(size_t)i * F + f] += da * ej * p->rfk[(size_t)j * F + f];
                    p->rgk[(size_t)j * F + f] += da * ej * p->rfq[(size_t)i * F + f];
                }
            }
        }
        for (int i = 0; i < n; i++) {
            if (i >= Q) {
                memset(dqo + (size_t)i * d, 0, sizeof(float) * d);
                continue;
            }
            ref_back_row(a, q + (size_t)i * d, p->ruq + (size_t)i * mm, p->rfq + (size_t)i * F,
                         p->rgq + (size_t)i * F, du, dqo + (size_t)i * d);
        }
        for (int j = 0; j < m; j++) {
            if (j >= L) {
                memset(dko + (size_t)j * d, 0, sizeof(float) * d);
                memset(dvo + (size_t)j * e_, 0, sizeof(float) * e_);
                continue;
            }
            ref_back_row(a, k + (size_t)j * d, p->ruk + (size_t)j * mm, p->rfk + (size_t)j * F,
                         p->rgk + (size_t)j * F, du, dko + (size_t)j * d);
            for (int e = 0; e < e_; e++)
                dvo[(size_t)j * e_ + e] = (float)p->rdv[(size_t)j * e_ + e];
        }
    }
    epoch_backward_end(a, current);
    return EF_OK;
}

/* The reference saves only the feature epoch (backward recomputes in double). */
static size_t kernel_ref_saved_bytes(const ef_attn *a) {
    (void)a;
    return sizeof(int64_t);
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
     "exponents shifted by row / running maxima, eps rescaled to match (same result up to "
     "rounding; prevents overflow)"},
    {"eps", EF_OPT_FLOAT, "0", 0, 1, NULL, 0,
     "added to the unshifted normaliser phi(q).sum phi(k)"},
};

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

static ef_status kernel_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    kplan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    a->impl = p;
    int d = s->head_dim, dv = s->v_dim;
    const ef_attn_ops *ops = a->ops;
    if (ops == &ef_attn_ops_linear) {
        p->kind = KM_ELU, p->F = d, p->m = 0;
        p->eps = (float)ef_opt_f(a, ef_attn_opt_index(ops, "eps"));
    } else if (ops == &ef_attn_ops_performer) {
        static const int kinds[] = {KM_SOFTMAX, KM_HYP, KM_TRIG, KM_RELU};
        p->kind = kinds[ef_opt_i(a, ef_attn_opt_index(ops, "kernel"))];
        p->m = (int)ef_opt_i(a, ef_attn_opt_index(ops, "features"));
        p->F = p->kind == KM_HYP || p->kind == KM_TRIG ? 2 * p->m : p->m;
        p->ortho = (int)ef_opt_i(a, ef_attn_opt_index(ops, "ortho"));
        p->redraw = (int)ef_opt_i(a, ef_attn_opt_index(ops, "redraw"));
        p->stabilize = (int)ef_opt_i(a, ef_attn_opt_index(ops, "stabilize"));
        p->eps = (float)ef_opt_f(a, ef_attn_opt_index(ops, "eps"));
        p->xs = sqrtf(a->scale); /* phi(q).phi(k) ~ exp(scale q.k) */
    } else {
        return ef_error(EF_ERR_ARG, "kernel.c: %s is not a kernel mechanism", ops->name);
    }
    /* causal chunks: only query positions start one (keys past q_len are seen by no query) */
    p->nchunks = a->causal ? (s->q_len + KC - 1) / KC : 1;
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
    enum { NLW = 6 };
    int lin = p->kind == KM_ELU;
    size_t lsz[NLW] = {(size_t)LN * F * lin,    (size_t)LN * F * lin, (size_t)LCC * LCC * lin,
                       (size_t)LCC * LCC * lin, (size_t)LN * lin,     (size_t)LN * lin};
    for (int i = 0; i < NLW; i++) per += round16(lsz[i]);
    size_t extra =
        p->m ? round16((size_t)p->m * d) + round16((size_t)d) + 2 * round16((size_t)d * d) : 0;
    double total = (double)per * a->slots + extra;
    if (total * 4 > 1e12)
        return ef_error(EF_ERR_NOMEM, "%s: workspace of %.3g GB", a->ops->name, total * 4 / 1e9);
    p->ws = ef_mem_calloc((size_t)a->slots, sizeof *p->ws);
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
        float **lf[NLW] = {&w->lq, &w->lk, &w->lA, &w->lM, &w->linv, &w->le};
        for (int i = 0; i < NLW; i++) *lf[i] = cur, cur += round16(lsz[i]);
    }
    if (a->ref) { /* the reference path holds one (batch, head) in double */
        size_t n = (size_t)s->q_len, mk = (size_t)s->kv_len;
        enum { NR = 10 };
        size_t rs[NR] = {n * F, mk * F, n * m,  mk * m,  n,
                         mk,    n * F,  mk * F, mk * dv, 2 * (size_t)dv + (size_t)m};
        double tot = 0;
        for (int i = 0; i < NR; i++) tot += (double)round16(rs[i]);
        if (tot * 8 > 1e12)
            return ef_error(EF_ERR_NOMEM, "%s: reference workspace of %.3g GB", a->ops->name,
                            tot * 8 / 1e9);
        double *rb = ef_malloc((size_t)tot * sizeof(double));
        if (!rb)
            return ef_error(EF_ERR_NOMEM, "%s: out of memory for the reference path (%.1f MB)",
                            a->ops->name, tot * 8 / 1e6);
        p->rblock = rb;
        a->ws_bytes += (size_t)tot * sizeof(double);
        double **f[NR] = {&p->rfq, &p->rfk, &p->ruq, &p->ruk, &p->rsq,
                          &p->rsk, &p->rgq, &p->rgk, &p->rdv, &p->rrow};
        for (int i = 0; i < NR; i++) *f[i] = rb, rb += round16(rs[i]);
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
    ef_free(p->ws);
    ef_free(p);
    a->impl = NULL;
}

static size_t kernel_saved_bytes(const ef_attn *a) {
    const kplan *p = a->impl;
    size_t bh = (size_t)a->shape.batch * a->shape.heads;
    /* non-causal linear also keeps S, z per (batch, head): its backward reads no key for them */
    size_t state = p->kind == KM_ELU && !a->causal ? (size_t)p->F * a->shape.v_dim + p->F : 0;
    return (bh * a->shape.q_len + bh * p->nchunks + bh * state) * sizeof(float) + sizeof(int64_t);
}

/* Analytic count: feature maps (projections 2 n D m per map, none for elu), S and z
 * (2 M F Dv), num and den (2 N F (Dv + 1)), the causal triangle (N KC (F + Dv)); backward:
 * the maps twice more and their gradients, dPhi_q, dS, dPhi_k, dV (each 2 x F x Dv), S again
 * (not for non-causal linear, which saves it). The triangle is counted at the chunk in use. */
static double kernel_flops(const ef_attn *a, int backward) {
    const kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    double n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, F = p->F, pm = p->m;
    double maps = 2 * (n + m) * d * pm;
    int lin = p->kind == KM_ELU, chunk = lin ? LCC : KC;
    double tri = a->causal ? n * chunk * (F + dv) : 0;
    double fwd = maps + 2 * m * F * dv + 2 * n * F * (dv + 1) + tri;
    /* non-causal linear saves S, z: its backward does not rebuild them */
    double rebuild = lin && !a->causal ? 0 : 1;
    double bwd = 2 * maps + maps /* map gradients */ + 2 * n * F * dv * 2 +
                 2 * m * F * dv * (2 + rebuild) + 3 * tri;
    return (double)s->batch * s->heads * (backward ? fwd + bwd : fwd);
}

/* ---------------------------------------------------------------------------------------------
 * Incremental decoding: per (batch, head) the state S [F][Dv], z [F] and the key shift, the
 * same running-shift rule and eps convention as the causal forward.
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

static ef_status step_one(ef_attn *a, kwork *w, float *S, const float *q, const float *k,
                          const float *v, float *out) {
    kplan *p = a->impl;
    int dv = a->shape.v_dim, F = p->F;
    float *z = S + (size_t)F * dv, *shift = z + F, resc;
    TRY(map_keys(a, w, k, 1, shift, &resc));
    if (resc != 1) {
        ef_row_scale(S, resc, F * dv);
        ef_row_scale(z, resc, F);
    }
    ef_row_add(z, w->phk, F);
    for (int f = 0; f < F; f++) ef_row_axpy(S + (size_t)f * dv, w->phk[f], v, dv);
    TRY(map_queries(a, w, q, 1));
    float dn = den_total(p, ef_dot_d(w->phq, z, F), (double)w->shq[0] + *shift);
    float inv = dn != 0 ? 1 / dn : 0;
    /* out[e] = sum_f phq[f] S[f][e] in double, f in order: 32 e at a time in 4 x 8 double
     * lanes (registers), the rest one by one */
    int e0 = 0;
    for (; e0 + 32 <= dv; e0 += 32) {
        ef_v8d acc[4] = {{0}};
        for (int f = 0; f < F; f++) {
            const float *sf = S + (size_t)f * dv + e0;
            double pf = w->phq[f];
            for (int u = 0; u < 4; u++) {
                ef_v8f x;
                memcpy(&x, sf + 8 * u, sizeof x);
                acc[u] += pf * __builtin_convertvector(x, ef_v8d);
            }
        }
        for (int u = 0; u < 4; u++)
            for (int l = 0; l < 8; l++) out[e0 + 8 * u + l] = (float)acc[u][l] * inv;
    }
    for (; e0 < dv; e0++) {
        double acc = 0;
        for (int f = 0; f < F; f++) acc += (double)w->phq[f] * S[(size_t)f * dv + e0];
        out[e0] = (float)acc * inv;
    }
    return EF_OK;
}

static ef_status kernel_step(ef_attn *a, void *state, const float *q, const float *k,
                             const float *v, float *out) {
    kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    int d = s->head_dim, dv = s->v_dim;
    size_t per = (size_t)p->F * dv + p->F + 1;
    int old = ef_gemm_local_threads(1);
    ef_status st = EF_OK;
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads && !st; bh++)
        st = step_one(a, &p->ws[0], (float *)state + bh * per, q + bh * d, k + bh * d, v + bh * dv,
                      out + bh * dv);
    ef_gemm_local_threads(old);
    return st;
}

const ef_attn_ops ef_attn_ops_linear = {
    .caps = {.causal = 1, .cross = 1, .decode = 1, .deterministic = 1},
    .name = "linear",
    .summary = "Linear Transformer: phi(x) = elu(x)+1, O(N D Dv) time, O(D Dv) state",
    .notes = "  padded keys (kv_lens) and queries (q_lens) are skipped, never read; the feature\n"
             "  map is fused into the chunk products; causal=1 runs in chunks of 64 (masked\n"
             "  product inside, the running state across: prefix sums at matrix speed);\n"
             "  incremental decoding with ef_attn_step. saves the normaliser per row (and,\n"
             "  non-causal, S and z per head); reference (ref=1): the explicit N x M form in\n"
             "  double, with its own feature map.",
    .opts = linear_opts,
    .n_opts = (int)(sizeof linear_opts / sizeof linear_opts[0]),
    .init = kernel_init,
    .destroy = kernel_destroy,
    .flops = kernel_flops,
    .saved_bytes = kernel_saved_bytes,
    .forward = kernel_forward,
    .backward = kernel_backward,
    .ref_saved_bytes = kernel_ref_saved_bytes,
    .ref_forward = kernel_ref_forward,
    .replay = kernel_replay,
    .ref_replay = kernel_ref_replay,
    .ref_backward = kernel_ref_backward,
    .state_bytes = kernel_state_bytes,
    .state_init = kernel_state_init,
    .step = kernel_step,
};

/* W [m][D] of the current draw. */
static ef_status kernel_features(const ef_attn *a, float *out, size_t *count) {
    const kplan *p = a->impl;
    *count = p->W ? (size_t)p->m * a->shape.head_dim : 0;
    if (out && *count) memcpy(out, p->W, *count * sizeof(float));
    return EF_OK;
}

const ef_attn_ops ef_attn_ops_performer = {
    .caps = {.causal = 1, .cross = 1, .decode = 1, .random = 1, .deterministic = 1},
    .name = "performer",
    .summary = "Performer FAVOR+: random features of the softmax kernel, O(N m (D + Dv))",
    .notes =
        "  features from the seed (orthogonal blocks, rows rescaled to chi norms), shared by\n"
        "  all heads; causal=1 in chunks; incremental decoding with ef_attn_step; padded keys\n"
        "  and queries are skipped, never read.\n"
        "  eps is added to the unshifted normaliser phi(q).sum phi(k), so the result does not\n"
        "  depend on stabilize. stabilize=1 computes exponent features as exp(g - c) (c: the\n"
        "  query row's max, the keys' running max) and scales eps by exp(-(c_q + c_k)) to\n"
        "  match: the shifts cancel exactly and only rounding differs. Where it is not exact:\n"
        "  fp32 underflow: a product phi_q,f phi_k,f below about exp(c_q + c_k - 87) counts\n"
        "  as 0 (a row whose every product is that small outputs 0). stabilize=0\n"
        "  computes exp(g) as is: it overflows to inf/NaN above g ~ 88 and underflows below\n"
        "  g ~ -87 (large |q|, |k|).\n"
        "  reference (ref=1): the explicit N x M form in double, its own features from the\n"
        "  plan's W.",
    .opts = performer_opts,
    .n_opts = (int)(sizeof performer_opts / sizeof performer_opts[0]),
    .init = kernel_init,
    .destroy = kernel_destroy,
    .flops = kernel_flops,
    .saved_bytes = kernel_saved_bytes,
    .forward = kernel_forward,
    .backward = kernel_backward,
    .ref_saved_bytes = kernel_ref_saved_bytes,
    .ref_forward = kernel_ref_forward,
    .replay = kernel_replay,
    .ref_replay = kernel_ref_replay,
    .ref_backward = kernel_ref_backward,
    .state_bytes = kernel_state_bytes,
    .state_init = kernel_state_init,
    .step = kernel_step,
    .features = kernel_features,
};
