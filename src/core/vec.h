/*
 * vec.h - a 16-float vector type (GCC/Clang vector extensions) and the math the kernels need.
 *
 * The same source compiles to one zmm register with AVX-512, two ymm with AVX2, four xmm with
 * SSE or NEON: the portable fallback is the same code. Files using it are compiled with
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

#define EF_VL 16
typedef float v16 __attribute__((vector_size(64), aligned(64)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

#define EF_INLINE static inline __attribute__((always_inline))

EF_INLINE v16 v16_set1(float x) { return (v16){0} + x; }
EF_INLINE v16 v16_load(const float *p) { return *(const v16 *)p; }   /* 64-byte aligned */
EF_INLINE void v16_store(float *p, v16 x) { *(v16 *)p = x; }
EF_INLINE v16 v16_loadu(const float *p) { return *(const v16u *)p; }
EF_INLINE void v16_storeu(float *p, v16 x) { *(v16u *)p = x; }
EF_INLINE v16 v16_select(v16i m, v16 a, v16 b) { /* m ? a : b, m lanes all-ones or zero */
    return (v16)(((v16i)a & m) | ((v16i)b & ~m));
}
EF_INLINE v16 v16_max(v16 a, v16 b) { return v16_select(a > b, a, b); }
EF_INLINE float v16_hsum(v16 x) {
    float s = 0;
    for (int i = 0; i < EF_VL; i++) s += x[i];
    return s;
}
EF_INLINE v16i v16i_iota(void) {
    return (v16i){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

EF_INLINE v16 v16_exp(v16 x) {
    const float lo = -87.3365479f, hi = 88.7228317f;
    v16i small = ~(x >= lo); /* x < lo, or NaN */
    v16i nan = x != x;
    v16i big = x > hi;
    v16 xc = v16_select(small, v16_set1(lo), v16_select(big, v16_set1(hi), x));
    /* round to nearest even with the 1.5*2^23 trick (|x*log2e| < 2^22 here) */
    const float magic = 12582912.0f;
    v16 t = xc * 1.44269504088896341f + magic;
    v16 n = t - magic;
    v16 r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v16 p = v16_set1(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r;
    p = p + 1.0f;
    /* 2^n from the exponent field; n = 128 (x in [88.38, 88.72]) is not a float: build 2^127
     * and double the result */
    v16i ni = __builtin_convertvector(n, v16i);
    v16i top = ni > 127;
    v16i e = (ni + top + 127) << 23; /* top lanes are -1 */
    v16 y = p * (v16)e;
    y = v16_select(top, y + y, y);
    y = v16_select(big, v16_set1(__builtin_inff()), y);
    y = v16_select(small, v16_set1(0.0f), y);
    return v16_select(nan, x, y);
}

#endif
