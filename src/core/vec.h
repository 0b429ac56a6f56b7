/*
 * vec.h - the native float vector of the target (GCC/Clang vector extensions) and the math the
 * kernels need, written once for every target.
 *
 * EF_VL lanes: 16 with AVX-512 (one zmm), 8 with AVX/AVX2 (one ymm), 4 elsewhere (SSE, NEON,
 * or scalar code the compiler splits). Wider-than-native vector types are avoided on purpose:
 * GCC lowers them through the stack. Files using this header are compiled with
 * -ffp-contract=fast so that a*b+c becomes one fused multiply-add where the CPU has one.
 *
 * exp(x) = 2^n * p(r), n = round(x*log2 e), r = x - n*ln2 (Cody-Waite split), p the Cephes
 * degree-7 polynomial: relative error under 2e-7 on [-87.3, 88.7]; x < -87.3 (and -inf) gives
 * exactly 0, x > 88.7 gives +inf, NaN gives NaN.
 */
#ifndef EF_VEC_H
#define EF_VEC_H

#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define EF_VL 16
#elif defined(__AVX__)
#define EF_VL 8
#else
#define EF_VL 4
#endif
typedef float vf __attribute__((vector_size(EF_VL * 4), aligned(EF_VL * 4)));
typedef int32_t vi __attribute__((vector_size(EF_VL * 4), aligned(EF_VL * 4)));
typedef float vfu __attribute__((vector_size(EF_VL * 4), aligned(4), may_alias));

#define EF_INLINE static inline __attribute__((always_inline))

/* Lane permutations of a vector (vf or vi) by an index vector: EF_SHUFFLE(a, idx) picks
 * a[idx[l]], EF_SHUFFLE2(a, b, idx) picks from the concatenation (a, b). GCC's
 * __builtin_shuffle; clang has no variable-index form, so it gets the same permutation lane by
 * lane. (Wrap a compound-literal index in parentheses: its commas would split the macro
 * arguments.) */
#if defined(__clang__)
#define EF_SHUFFLE(a, idx)                                                                         \
    ({                                                                                             \
        __typeof__(a) ef_a_ = (a), ef_r_;                                                          \
        vi ef_i_ = (idx);                                                                          \
        for (int ef_l_ = 0; ef_l_ < EF_VL; ef_l_++) ef_r_[ef_l_] = ef_a_[ef_i_[ef_l_] & (EF_VL - 1)]; \
        ef_r_;                                                                                     \
    })
#define EF_SHUFFLE2(a, b, idx)                                                                     \
    ({                                                                                             \
        __typeof__(a) ef_a_ = (a), ef_b_ = (b), ef_r_;                                             \
        vi ef_i_ = (idx);                                                                          \
        for (int ef_l_ = 0; ef_l_ < EF_VL; ef_l_++) {                                              \
            int ef_j_ = ef_i_[ef_l_] & (2 * EF_VL - 1);                                            \
            ef_r_[ef_l_] = ef_j_ < EF_VL ? ef_a_[ef_j_] : ef_b_[ef_j_ - EF_VL];                    \
        }                                                                                          \
        ef_r_;                                                                                     \
    })
#else
#define EF_SHUFFLE(a, idx) __builtin_shuffle((a), (idx))
#define EF_SHUFFLE2(a, b, idx) __builtin_shuffle((a), (b), (idx))
#endif

/* Written as a loop, not (vf){0} + x: that is a scalar add of +0 before the broadcast (the
 * compiler must keep it, -0 + 0 = +0), one more instruction on the kernels' critical path. */
EF_INLINE vf vf_set1(float x) {
    vf r;
    for (int i = 0; i < EF_VL; i++) r[i] = x;
    return r;
}
EF_INLINE vf vf_load(const float *p) { return *(const vf *)p; } /* aligned to EF_VL floats */
EF_INLINE void vf_store(float *p, vf x) { *(vf *)p = x; }
EF_INLINE vf vf_loadu(const float *p) { return *(const vfu *)p; }
EF_INLINE void vf_storeu(float *p, vf x) { *(vfu *)p = x; }
/* Asks for the n floats at x to be brought into cache (one request per 64-byte line). */
EF_INLINE void ef_prefetch(const float *x, int n) {
    for (int t = 0; t < n; t += 16) __builtin_prefetch(x + t);
}
EF_INLINE vf vf_select(vi m, vf a, vf b) { /* m ? a : b, m lanes all-ones or zero */
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
/* a > b ? a : b per lane (b when either is NaN): the native max instruction, which is exactly
 * this, where there is one. */
EF_INLINE vf vf_max(vf a, vf b) {
#if defined(__AVX512F__) && EF_VL == 16
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && EF_VL == 8
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__) && EF_VL == 4
    return (vf)_mm_max_ps((__m128)a, (__m128)b);
#else
    return vf_select(a > b, a, b);
#endif
}
/* Horizontal max / sum in a fixed tree order (halves, then quarters, ...): the same result
 * wherever it is called. */
#if EF_VL == 16
#define EF_HSTEPS(op)                                                                              \
    v = op(v, EF_SHUFFLE(v, ((vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7})));        \
    v = op(v, EF_SHUFFLE(v, ((vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11})));        \
    v = op(v, EF_SHUFFLE(v, ((vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13})));        \
    v = op(v, EF_SHUFFLE(v, ((vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14})));
#elif EF_VL == 8
#define EF_HSTEPS(op)                                                                              \
    v = op(v, EF_SHUFFLE(v, ((vi){4, 5, 6, 7, 0, 1, 2, 3})));                                      \
    v = op(v, EF_SHUFFLE(v, ((vi){2, 3, 0, 1, 6, 7, 4, 5})));                                      \
    v = op(v, EF_SHUFFLE(v, ((vi){1, 0, 3, 2, 5, 4, 7, 6})));
#else
#define EF_HSTEPS(op)                                                                              \
    v = op(v, EF_SHUFFLE(v, ((vi){2, 3, 0, 1})));                                                  \
    v = op(v, EF_SHUFFLE(v, ((vi){1, 0, 3, 2})));
#endif
EF_INLINE vf ef_vadd_(vf a, vf b) { return a + b; }
EF_INLINE float vf_hmax(vf v) {
    EF_HSTEPS(vf_max)
    return v[0];
}
EF_INLINE float vf_hsum(vf v) {
    EF_HSTEPS(ef_vadd_)
    return v[0];
}
/* Rows of n floats (unaligned), in vectors with a scalar tail: y *= s; y += s x; y += x; the
 * largest of x as `x > m ? x : m` from -inf finds it (a NaN is never taken). */
EF_INLINE void ef_row_scale(float *y, float s, int n) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) vf_storeu(y + t, vf_loadu(y + t) * s);
    for (; t < n; t++) y[t] *= s;
}
EF_INLINE void ef_row_axpy(float *y, float s, const float *x, int n) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) vf_storeu(y + t, vf_loadu(y + t) + s * vf_loadu(x + t));
    for (; t < n; t++) y[t] += s * x[t];
}
EF_INLINE void ef_row_add(float *y, const float *x, int n) {
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) vf_storeu(y + t, vf_loadu(y + t) + vf_loadu(x + t));
    for (; t < n; t++) y[t] += x[t];
}
EF_INLINE float ef_row_max(const float *x, int n) {
    vf m = vf_set1(-__builtin_inff());
    int t = 0;
    for (; t + EF_VL <= n; t += EF_VL) m = vf_max(vf_loadu(x + t), m);
    float r = vf_hmax(m);
    for (; t < n; t++) r = x[t] > r ? x[t] : r;
    return r;
}

/* sum_t x_t y_t in double (the products of floats exact there, no overflow or underflow): in 8
 * double lanes, then the tail, then the lanes, in a fixed order. */
typedef double ef_v8d __attribute__((vector_size(64)));
typedef float ef_v8f __attribute__((vector_size(32)));
EF_INLINE double ef_dot_d(const float *x, const float *y, int n) {
    ef_v8d acc = {0};
    int nf = n / 8 * 8;
    for (int t = 0; t < nf; t += 8) {
        ef_v8f a, b;
        memcpy(&a, x + t, sizeof a);
        memcpy(&b, y + t, sizeof b);
        acc += __builtin_convertvector(a, ef_v8d) * __builtin_convertvector(b, ef_v8d);
    }
    double s = 0;
    for (int t = nf; t < n; t++) s += (double)x[t] * y[t];
    for (int l = 0; l < 8; l++) s += acc[l];
    return s;
}
/* sum_t x_t in double: 8 double lanes, then the tail, then the lanes, in a fixed order. */
EF_INLINE double ef_sum_d(const float *x, int n) {
    ef_v8d acc = {0};
    int nf = n / 8 * 8;
    for (int t = 0; t < nf; t += 8) {
        ef_v8f a;
        memcpy(&a, x + t, sizeof a);
        acc += __builtin_convertvector(a, ef_v8d);
    }
    double s = 0;
    for (int t = nf; t < n; t++) s += x[t];
    for (int l = 0; l < 8; l++) s += acc[l];
    return s;
}
EF_INLINE vi vi_iota(void) {
    vi r;
    for (int i = 0; i < EF_VL; i++) r[i] = i;
    return r;
}

/* The shared core of the two exps, for xc already clamped to [lo, hi]: p(r) with
 * r = xc - n ln2, and *n = round(xc log2 e) (ties to even, the 1.5*2^23 trick: |xc log2 e| <
 * 2^22). exp(xc) = 2^n p. */
EF_INLINE vf exp_reduce_poly(vf xc, vi *ni) {
    const float magic = 12582912.0f;
    vf t = xc * 1.44269504088896341f + magic;
    vf n = t - magic;
    vf r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vf_set1(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r;
    *ni = __builtin_convertvector(n, vi);
    return p + 1.0f;
}

#if defined(__AVX512F__) && defined(__FMA__) && EF_VL == 16
/* exp_reduce_poly's operations with the contractions GCC makes of them (a fused x log2e + magic,
 * fused reductions and polynomial steps), hence the same bits as the portable forms below, with
 * 2^n applied by vscalefps (exact, as the multiply by 2^n is, up to overflow, which both round
 * to inf) and the x < lo lanes zeroed by a mask; a NaN lane compares false and stays NaN
 * through every step; big_check: x > 88.72 gives inf (vf_exp). About 15 instructions instead
 * of 21 (vf_exp_nonpos) and 27 (vf_exp). */
EF_INLINE vf vf_exp_avx512(vf x, float lo, int big_check) {
    __m512 xm = (__m512)x;
    __mmask16 keep = _mm512_cmp_ps_mask(xm, _mm512_set1_ps(lo), _CMP_NLT_UQ); /* x >= lo, NaN */
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __m512 n =
        _mm512_sub_ps(_mm512_fmadd_ps(xm, _mm512_set1_ps(1.44269504088896341f), magic), magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xm);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p =
        _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    __m512 y = _mm512_maskz_scalef_ps(keep, p, n);
    if (big_check) { /* vf_exp's hi */
        __mmask16 big = _mm512_cmp_ps_mask(xm, _mm512_set1_ps(88.7228317f), _CMP_GT_OQ);
        y = _mm512_mask_mov_ps(y, big, _mm512_set1_ps(__builtin_inff()));
    }
    return (vf)y;
}
#endif

EF_INLINE vf vf_exp(vf x) {
    const float lo = -87.3365479f, hi = 88.7228317f;
#if defined(__AVX512F__) && defined(__FMA__) && EF_VL == 16
    (void)hi;
    return vf_exp_avx512(x, lo, 1);
#else
    vi small = ~(x >= lo); /* x < lo, or NaN */
    vi nan = x != x;
    vi big = x > hi;
    vf xc = vf_select(small, vf_set1(lo), vf_select(big, vf_set1(hi), x));
    vi ni;
    vf p = exp_reduce_poly(xc, &ni);
    /* 2^n from the exponent field; n = 128 (x in [88.38, 88.72]) is not a float: build 2^127
     * and double the result */
    vi top = ni > 127;
    vi e = (ni + top + 127) << 23; /* top lanes are -1 */
    vf y = p * (vf)e;
    y = vf_select(top, y + y, y);
    y = vf_select(big, vf_set1(__builtin_inff()), y);
    y = vf_select(small, vf_set1(0.0f), y);
    return vf_select(nan, x, y);
#endif
}

/* vf_exp for x <= 0 (and NaN): the same reduction and polynomial, hence the same values, without
 * the overflow and 2^128 cases that only x > 0 reaches (x < -87.34 gives 0, NaN gives NaN).
 * Positive x is not allowed. The softmax's exp(s - max) and exp(s - lse) (tiled.c) and elu+1
 * (kernel_linear.c) use it. */
EF_INLINE vf vf_exp_nonpos(vf x) {
    const float lo = -87.3365479f;
#if defined(__AVX512F__) && defined(__FMA__) && EF_VL == 16
    return vf_exp_avx512(x, lo, 0);
#else
    vi small = ~(x >= lo); /* x < lo, or NaN */
    vi nan = x != x;
    vf xc = vf_select(small, vf_set1(lo), x);
    vi ni;
    vf p = exp_reduce_poly(xc, &ni);
    vf y = p * (vf)((ni + 127) << 23); /* n in [-126, 0] */
    y = vf_select(small, vf_set1(0.0f), y);
    return vf_select(nan, x, y);
#endif
}

#endif
