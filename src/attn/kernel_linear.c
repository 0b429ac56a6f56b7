/*
 * kernel_linear.c - `linear` (Linear Transformer, phi = elu + 1, F = D): its own fast path,
 * run by kernel.c's forward / backward for (batch, head) work items (docs/kernel.md,
 * "`linear`'s own fast path").
 *
 * phi needs no shift (it is never above x + 1), so kernel.c's chunk engine (shifts, rescaling)
 * reduces to plain products, and here the feature map is fused into them: a chunk's features
 * are computed into an L1/L2-resident buffer by one vector pass (which also sums z, or dots the
 * row with z) right before the GEMM that reads them, and the
 * normaliser, the quotient rule and the map's derivative are folded into the epilogue of the
 * GEMM that writes out, dq or dk in place (no phi(Q), phi(K), G or dPhi pass over N).
 *   non-causal forward: S = Phi_K^T V, z = Phi_K^T 1 (key chunks of LN), then per query chunk
 *     out = (Phi_q S) / (Phi_q z + eps); saved: den and S, z (backward reads no key for them);
 *   non-causal backward, with inv = 1/den and e = dO.out per row:
 *     dq = (inv (dO S^T) - inv e z^T) o phi'(q);  dS = (inv Phi_q)^T dO;  dz = -(inv Phi_q)^T e
 *     dk = (V dS^T + 1 dz^T) o phi'(k);  dv = Phi_k dS
 *   causal (chunks of LCC, the state S_<c, z_<c between them, a masked product inside):
 *     out_c = (Phi_q,c S_<c + tril(Phi_q,c Phi_k,c^T) V_c) / (Phi_q,c z_<c + row sums + eps);
 *     backward: a forward sweep rebuilds S_<c for dq (M = tril(dO_c V_c^T - e 1^T)):
 *       dq = inv (dO S_<c^T - e z_<c^T + M Phi_k,c) o phi'(q);
 *     a reverse sweep carries dS, dz of the later chunks for dk, dv:
 *       dk = (V dS^T + 1 dz^T + M^T (inv Phi_q)) o phi'(k),
 *       dv = Phi_k dS + tril((inv Phi_q) Phi_k^T)^T dO.
 * phi'(x) = 1 for x > 0, else exp(x) = phi(x). Everything per (batch, head) in one thread and a
 * fixed order: results do not depend on the thread count.
 */
#include "attn/kernel.h"
#include "core/vec.h"

#include <math.h>
#include <string.h>

EF_INLINE vf lin_phi(vf x) { /* elu(x) + 1 */
    vi pos = x > 0;
    return vf_select(pos, x + 1.0f, vf_exp_nonpos(vf_select(pos, vf_set1(0), x)));
}

/* ph[r][:] = phi(x[r][:]) for n rows of d; z[:] += sum_r ph[r][:] when z != NULL. */
static void lin_map(const float *x, int n, int d, float *ph, float *z) {
    int full = d / EF_VL * EF_VL;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * d;
        float *o = ph + (size_t)r * d;
        for (int t = 0; t < full; t += EF_VL) {
            vf y = lin_phi(vf_loadu(xr + t));
            vf_storeu(o + t, y);
            if (z) vf_storeu(z + t, vf_loadu(z + t) + y);
        }
        if (full < d) {
            float buf[EF_VL] __attribute__((aligned(64))) = {0};
            memcpy(buf, xr + full, sizeof(float) * (size_t)(d - full));
            vf_store(buf, lin_phi(vf_load(buf)));
            for (int t = full; t < d; t++) {
                o[t] = buf[t - full];
                if (z) z[t] += buf[t - full];
            }
        }
    }
}

static float lin_dot(const float *a, const float *b, int n) {
    int full = n / EF_VL * EF_VL;
    vf acc = vf_set1(0);
    for (int t = 0; t < full; t += EF_VL) acc += vf_loadu(a + t) * vf_loadu(b + t);
    float s = 0;
    for (int i = 0; i < EF_VL; i++) s += acc[i];
    for (int t = full; t < n; t++) s += a[t] * b[t];
    return s;
}

/* y = (y * sy + zc * z) o phi'(x), phi'(x) = x > 0 ? 1 : ph (one row of d). */
static void lin_dmap(float *y, float sy, float zc, const float *z, const float *x, const float *ph,
                     int d) {
    int full = d / EF_VL * EF_VL;
    for (int t = 0; t < full; t += EF_VL) {
        vf g = vf_loadu(y + t) * sy + vf_loadu(z + t) * zc;
        vf_storeu(y + t, vf_select(vf_loadu(x + t) > 0, g, g * vf_loadu(ph + t)));
    }
    for (int t = full; t < d; t++) {
        float g = y[t] * sy + z[t] * zc;
        y[t] = x[t] > 0 ? g : g * ph[t];
    }
}

/* y[:] += c * x[:] (n floats). */
static void lin_axpy(float *y, float c, const float *x, int n) {
    int full = n / EF_VL * EF_VL;
    for (int t = 0; t < full; t += EF_VL) vf_storeu(y + t, vf_loadu(y + t) + vf_loadu(x + t) * c);
    for (int t = full; t < n; t++) y[t] += c * x[t];
}

static void lin_scale(float *y, float c, int n) {
    int full = n / EF_VL * EF_VL;
    for (int t = 0; t < full; t += EF_VL) vf_storeu(y + t, vf_loadu(y + t) * c);
    for (int t = full; t < n; t++) y[t] *= c;
}

/* S, z of one (batch, head) in saved (non-causal linear): [F][Dv] then [F]. */
static float *lin_state_of(const ef_attn *a, float *saved, int64_t bh) {
    const kplan *p = a->impl;
    const ef_attn_shape *s = &a->shape;
    size_t bhs = (size_t)s->batch * s->heads, per = (size_t)p->F * s->v_dim + p->F;
    return saved + bhs * s->q_len + bhs * p->nchunks + (size_t)bh * per;
}

/* The inputs of one (batch, head). */
typedef struct lin_io {
    int n, m, d, dv, L, Q; /* q_len, kv_len, head_dim, v_dim, valid keys, valid queries */
    const float *q, *k, *v, *out, *g;
    float *o, *dq, *dk, *dv_;
    float *den;   /* saved den [n] (NULL: inference) */
    float *state; /* saved S, z (non-causal, NULL: inference) */
} lin_io;

static void lin_io_of(kcall *c, int64_t bh, lin_io *x) {
    const ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    int b = (int)(bh / s->heads);
    x->n = s->q_len, x->m = s->kv_len, x->d = s->head_dim, x->dv = s->v_dim;
    x->L = ef_attn_kv_valid(a, c->io, b), x->Q = ef_attn_q_valid(a, c->io, b);
    x->q = c->io->q + (size_t)bh * x->n * x->d, x->k = c->io->k + (size_t)bh * x->m * x->d;
    x->v = c->io->v + (size_t)bh * x->m * x->dv;
    x->out = c->io->out + (size_t)bh * x->n * x->dv;
    x->o = c->io->out + (size_t)bh * x->n * x->dv;
    x->g = c->dout ? c->dout + (size_t)bh * x->n * x->dv : NULL;
    x->dq = c->dq ? c->dq + (size_t)bh * x->n * x->d : NULL;
    x->dk = c->dk ? c->dk + (size_t)bh * x->m * x->d : NULL;
    x->dv_ = c->dv ? c->dv + (size_t)bh * x->m * x->dv : NULL;
    x->den = c->saved ? den_of(a, c->saved, bh) : NULL;
    x->state = c->saved && !a->causal ? lin_state_of(a, c->saved, bh) : NULL;
}

ef_status ef_kernel_linear_forward(kcall *c, int64_t bh, kwork *w) {
    ef_attn *a = c->a;
    const kplan *p = a->impl;
    lin_io x;
    lin_io_of(c, bh, &x);
    int d = x.d, dv = x.dv, F = p->F, L = x.L, Q = x.Q;
    if (c->saved)
        for (int ci = 0; ci < p->nchunks; ci++) shifts_of(a, c->saved, bh)[ci] = -INFINITY;
    /* padded query rows: zeros (den 0) */
    memset(x.o + (size_t)Q * dv, 0, sizeof(float) * (size_t)(x.n - Q) * dv);
    if (x.den)
        for (int i = Q; i < x.n; i++) x.den[i] = 0;
    float *S = x.state ? x.state : w->S, *z = x.state ? x.state + (size_t)F * dv : w->z;
    memset(S, 0, sizeof(float) * (size_t)F * dv);
    memset(z, 0, sizeof(float) * F);
    if (L == 0 || Q == 0) { /* no query sees a key */
        memset(x.o, 0, sizeof(float) * (size_t)Q * dv);
        if (x.den)
            for (int i = 0; i < Q; i++) x.den[i] = 0;
        return EF_OK;
    }
    if (!a->causal) {
        for (int j0 = 0; j0 < L; j0 += LN) {
            int kn = EF_MIN(LN, L - j0);
            lin_map(x.k + (size_t)j0 * d, kn, d, w->lk, z);
            TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->lk, F, x.v + (size_t)j0 * dv, dv, 1.0f, S, dv));
        }
        for (int i0 = 0; i0 < Q; i0 += LN) {
            int qn = EF_MIN(LN, Q - i0);
            float *o = x.o + (size_t)i0 * dv;
            lin_map(x.q + (size_t)i0 * d, qn, d, w->lq, NULL);
            TRY(ef_sgemm(0, 0, qn, dv, F, 1.0f, w->lq, F, S, dv, 0.0f, o, dv));
            for (int r = 0; r < qn; r++) {
                float den = lin_dot(w->lq + (size_t)r * F, z, F) + p->eps;
                lin_scale(o + (size_t)r * dv, den != 0 ? 1 / den : 0, dv);
                if (x.den) x.den[i0 + r] = den;
            }
        }
        return EF_OK;
    }
    /* causal: chunks [c0, c0 + LCC) of queries and keys together; keys < min(L, Q) */
    int Lc = EF_MIN(L, Q);
    for (int c0 = 0; c0 < Q; c0 += LCC) {
        int kn = EF_MAX(0, EF_MIN(LCC, Lc - c0)), qn = EF_MIN(LCC, Q - c0);
        float *o = x.o + (size_t)c0 * dv, *A = w->lA;
        const float *vc = x.v + (size_t)c0 * dv;
        lin_map(x.q + (size_t)c0 * d, qn, d, w->lq, NULL);
        TRY(ef_sgemm(0, 0, qn, dv, F, 1.0f, w->lq, F, S, dv, 0.0f, o, dv));
        for (int r = 0; r < qn; r++) w->linv[r] = lin_dot(w->lq + (size_t)r * F, z, F);
        if (kn > 0) {
            lin_map(x.k + (size_t)c0 * d, kn, d, w->lk, NULL);
            TRY(ef_sgemm(0, 1, qn, kn, F, 1.0f, w->lq, F, w->lk, F, 0.0f, A, LCC));
            for (int r = 0; r < qn; r++) { /* tril: keys j > r assigned 0, never multiplied */
                float *ar = A + (size_t)r * LCC, sum = 0;
                int lim = EF_MIN(r + 1, kn);
                for (int j = 0; j < lim; j++) sum += ar[j];
                for (int j = lim; j < kn; j++) ar[j] = 0;
                w->linv[r] += sum;
            }
            TRY(ef_sgemm(0, 0, qn, dv, kn, 1.0f, A, LCC, vc, dv, 1.0f, o, dv));
        }
        for (int r = 0; r < qn; r++) {
            float den = w->linv[r] + p->eps;
            lin_scale(o + (size_t)r * dv, den != 0 ? 1 / den : 0, dv);
            if (x.den) x.den[c0 + r] = den;
        }
        if (kn > 0 && c0 + LCC < Q) { /* S += Phi_k^T V_c, z += Phi_k^T 1 */
            TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->lk, F, vc, dv, 1.0f, S, dv));
            for (int j = 0; j < kn; j++) lin_axpy(z, 1.0f, w->lk + (size_t)j * F, F);
        }
    }
    return EF_OK;
}

/* inv = 1/den (0 where den is 0 or inf) and e = dO.out of qn rows from row i0. */
static void lin_rows(const lin_io *x, kwork *w, int i0, int qn) {
    for (int r = 0; r < qn; r++) {
        float den = x->den[i0 + r];
        w->linv[r] = den != 0 ? 1 / den : 0;
        w->le[r] =
            lin_dot(x->g + (size_t)(i0 + r) * x->dv, x->out + (size_t)(i0 + r) * x->dv, x->dv);
    }
}

/* M = tril(dO_c V_c^T - e 1^T), qn x kn (keys j > r: 0). */
static ef_status lin_intra_m(const lin_io *x, kwork *w, int c0, int qn, int kn) {
    int dv = x->dv;
    TRY(ef_sgemm(0, 1, qn, kn, dv, 1.0f, x->g + (size_t)c0 * dv, dv, x->v + (size_t)c0 * dv, dv,
                 0.0f, w->lM, LCC));
    for (int r = 0; r < qn; r++) {
        float *mr = w->lM + (size_t)r * LCC;
        int lim = EF_MIN(r + 1, kn);
        for (int j = 0; j < lim; j++) mr[j] -= w->le[r];
        for (int j = lim; j < kn; j++) mr[j] = 0;
    }
    return EF_OK;
}

ef_status ef_kernel_linear_backward(kcall *c, int64_t bh, kwork *w) {
    ef_attn *a = c->a;
    const kplan *p = a->impl;
    lin_io x;
    lin_io_of(c, bh, &x);
    int d = x.d, dv = x.dv, F = p->F, L = x.L, Q = x.Q;
    int Lk = a->causal ? EF_MIN(L, Q) : L; /* keys some valid query sees */
    if (Q == 0) Lk = 0;
    /* rows and keys no loop below reaches: zeros */
    memset(x.dq + (size_t)Q * d, 0, sizeof(float) * (size_t)(x.n - Q) * d);
    memset(x.dk + (size_t)Lk * d, 0, sizeof(float) * (size_t)(x.m - Lk) * d);
    memset(x.dv_ + (size_t)Lk * dv, 0, sizeof(float) * (size_t)(x.m - Lk) * dv);
    if (Lk == 0) {
        memset(x.dq, 0, sizeof(float) * (size_t)Q * d);
        return EF_OK;
    }
    float *dS = w->dS, *dz = w->dz;
    memset(dS, 0, sizeof(float) * (size_t)F * dv);
    memset(dz, 0, sizeof(float) * F);
    if (!a->causal) {
        const float *S = c->saved ? lin_state_of(a, (float *)c->saved, bh) : NULL;
        const float *z = S + (size_t)F * dv;
        for (int i0 = 0; i0 < Q; i0 += LN) {
            int qn = EF_MIN(LN, Q - i0);
            const float *qc = x.q + (size_t)i0 * d, *gc = x.g + (size_t)i0 * dv;
            float *dqc = x.dq + (size_t)i0 * d;
            lin_map(qc, qn, d, w->lq, NULL);
            lin_rows(&x, w, i0, qn);
            TRY(ef_sgemm(0, 1, qn, F, dv, 1.0f, gc, dv, S, dv, 0.0f, dqc, d));
            for (int r = 0; r < qn; r++) {
                float inv = w->linv[r], *ph = w->lq + (size_t)r * F;
                lin_dmap(dqc + (size_t)r * d, inv, -w->le[r] * inv, z, qc + (size_t)r * d, ph, d);
                lin_scale(ph, inv, F); /* inv Phi_q, for dS and dz */
                lin_axpy(dz, -w->le[r], ph, F);
            }
            TRY(ef_sgemm(1, 0, F, dv, qn, 1.0f, w->lq, F, gc, dv, 1.0f, dS, dv));
        }
        for (int j0 = 0; j0 < L; j0 += LN) {
            int kn = EF_MIN(LN, L - j0);
            const float *kc = x.k + (size_t)j0 * d;
            float *dkc = x.dk + (size_t)j0 * d;
            lin_map(kc, kn, d, w->lk, NULL);
            TRY(ef_sgemm(0, 1, kn, F, dv, 1.0f, x.v + (size_t)j0 * dv, dv, dS, dv, 0.0f, dkc, d));
            TRY(ef_sgemm(0, 0, kn, dv, F, 1.0f, w->lk, F, dS, dv, 0.0f, x.dv_ + (size_t)j0 * dv,
                         dv));
            for (int r = 0; r < kn; r++)
                lin_dmap(dkc + (size_t)r * d, 1.0f, 1.0f, dz, kc + (size_t)r * d,
                         w->lk + (size_t)r * F, d);
        }
        return EF_OK;
    }
    /* causal, forward sweep: S_<c, z_<c rebuilt chunk by chunk; dq */
    float *S = w->S, *z = w->z;
    memset(S, 0, sizeof(float) * (size_t)F * dv);
    memset(z, 0, sizeof(float) * F);
    int nch = (Q + LCC - 1) / LCC;
    for (int c0 = 0; c0 < Q; c0 += LCC) {
        int kn = EF_MAX(0, EF_MIN(LCC, Lk - c0)), qn = EF_MIN(LCC, Q - c0);
        const float *qc = x.q + (size_t)c0 * d, *gc = x.g + (size_t)c0 * dv;
        float *dqc = x.dq + (size_t)c0 * d;
        lin_map(qc, qn, d, w->lq, NULL);
        lin_rows(&x, w, c0, qn);
        TRY(ef_sgemm(0, 1, qn, F, dv, 1.0f, gc, dv, S, dv, 0.0f, dqc, d));
        if (kn > 0) {
            lin_map(x.k + (size_t)c0 * d, kn, d, w->lk, NULL);
            TRY(lin_intra_m(&x, w, c0, qn, kn));
            TRY(ef_sgemm(0, 0, qn, F, kn, 1.0f, w->lM, LCC, w->lk, F, 1.0f, dqc, d));
        }
        for (int r = 0; r < qn; r++)
            lin_dmap(dqc + (size_t)r * d, w->linv[r], -w->le[r] * w->linv[r], z, qc + (size_t)r * d,
                     w->lq + (size_t)r * F, d);
        if (kn > 0 && c0 + LCC < Q) {
            TRY(ef_sgemm(1, 0, F, dv, kn, 1.0f, w->lk, F, x.v + (size_t)c0 * dv, dv, 1.0f, S, dv));
            for (int j = 0; j < kn; j++) lin_axpy(z, 1.0f, w->lk + (size_t)j * F, F);
        }
    }
    /* reverse sweep: dS, dz of the queries after chunk c; dk, dv */
    for (int ci = nch - 1; ci >= 0; ci--) {
        int c0 = ci * LCC;
        int kn = EF_MAX(0, EF_MIN(LCC, Lk - c0)), qn = EF_MIN(LCC, Q - c0);
        const float *gc = x.g + (size_t)c0 * dv, *vc = x.v + (size_t)c0 * dv;
        lin_map(x.q + (size_t)c0 * d, qn, d, w->lq, NULL);
        lin_rows(&x, w, c0, qn);
        for (int r = 0; r < qn; r++) lin_scale(w->lq + (size_t)r * F, w->linv[r], F);
        if (kn > 0) {
            const float *kc = x.k + (size_t)c0 * d;
            float *dkc = x.dk + (size_t)c0 * d, *dvc = x.dv_ + (size_t)c0 * dv, *A = w->lA;
            lin_map(kc, kn, d, w->lk, NULL);
            TRY(lin_intra_m(&x, w, c0, qn, kn));
            /* A = tril((inv Phi_q) Phi_k^T) */
            TRY(ef_sgemm(0, 1, qn, kn, F, 1.0f, w->lq, F, w->lk, F, 0.0f, A, LCC));
            for (int r = 0; r < qn; r++)
                for (int j = r + 1; j < kn; j++) A[(size_t)r * LCC + j] = 0;
            TRY(ef_sgemm(0, 1, kn, F, dv, 1.0f, vc, dv, dS, dv, 0.0f, dkc, d));
            TRY(ef_sgemm(1, 0, kn, F, qn, 1.0f, w->lM, LCC, w->lq, F, 1.0f, dkc, d));
            TRY(ef_sgemm(0, 0, kn, dv, F, 1.0f, w->lk, F, dS, dv, 0.0f, dvc, dv));
            TRY(ef_sgemm(1, 0, kn, dv, qn, 1.0f, A, LCC, gc, dv, 1.0f, dvc, dv));
            for (int r = 0; r < kn; r++)
                lin_dmap(dkc + (size_t)r * d, 1.0f, 1.0f, dz, kc + (size_t)r * d,
                         w->lk + (size_t)r * F, d);
        }
        if (ci == 0) break;
        TRY(ef_sgemm(1, 0, F, dv, qn, 1.0f, w->lq, F, gc, dv, 1.0f, dS, dv));
        for (int r = 0; r < qn; r++) lin_axpy(dz, -w->le[r], w->lq + (size_t)r * F, F);
    }
    return EF_OK;
}
