/*
 * softmax.h - the online softmax step of one key chunk over a transposed score tile (lanes =
 * queries, rows = keys), shared by the tiled engine (tiled.c, exp in fp32) and
 * flash:precision=bf16 (flash_bf16.c, 2^x on scores in base 2). docs/flash.md derives it.
 */
#ifndef EF_SOFTMAX_H
#define EF_SOFTMAX_H

#include "core/core.h"
#include "core/vec.h"

/* Vectors u0 .. u0+NV-1 of the kn rows of st (rows ld floats apart), NV <= 4 a compile-time
 * count so that the running maxima and sums are registers (NV independent chains; each lane's
 * operations are the same whichever group it is in):
 *   m' = max(m, max_j S^T);  P^T = ex(S^T - m') in place;  alpha = ex(m - m');
 *   l = l alpha + sum_j P^T.
 * A lane that has seen only -inf subtracts 0, so ex(-inf - 0) = 0, never NaN. */
EF_INLINE void ef_softmax_group(const int NV, int u0, float *st, int ld, int kn, vf *mx, vf *l,
                                vf *alpha, vf (*ex)(vf)) {
    vf tmax[4], use[4], sum[4];
    st += u0 * EF_VL;
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) tmax[u] = mx[u0 + u];
    for (int r = 0; r < kn; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) tmax[u] = vf_max(tmax[u], vf_load(st + r * ld + u * EF_VL));
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) {
        use[u] = vf_select(tmax[u] == -__builtin_inff(), vf_set1(0), tmax[u]);
        alpha[u0 + u] = ex(mx[u0 + u] - use[u]);
        sum[u] = vf_set1(0);
    }
    for (int r = 0; r < kn; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) {
            float *ps = st + r * ld + u * EF_VL;
            vf e = ex(vf_load(ps) - use[u]);
            vf_store(ps, e);
            sum[u] += e;
        }
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++)
        l[u0 + u] = l[u0 + u] * alpha[u0 + u] + sum[u], mx[u0 + u] = tmax[u];
}

/* The step for the first nv vectors of lanes, in groups of up to four. ex is a constant at
 * each call site (vf_exp_nonpos, bf_exp2): inlined, it becomes a direct, inlined call. */
EF_INLINE void ef_online_softmax(float *st, int ld, int kn, int nv, vf *mx, vf *l, vf *alpha,
                                 vf (*ex)(vf)) {
    for (int u0 = 0; u0 < nv; u0 += 4) {
        switch (EF_MIN(4, nv - u0)) {
        case 1: ef_softmax_group(1, u0, st, ld, kn, mx, l, alpha, ex); break;
        case 2: ef_softmax_group(2, u0, st, ld, kn, mx, l, alpha, ex); break;
        case 3: ef_softmax_group(3, u0, st, ld, kn, mx, l, alpha, ex); break;
        default: ef_softmax_group(4, u0, st, ld, kn, mx, l, alpha, ex); break;
        }
    }
}

#endif
