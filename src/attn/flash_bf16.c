/*
 * flash_bf16.c - `flash:precision=bf16`: exact softmax attention whose matrix products take
 * bf16 inputs with fp32 accumulation (S = Q K^T and O = P V forward; dV = P^T dO, dP = dO V^T,
 * dK = dS^T Q, dQ = dS K backward), with the softmax, its statistics, the log-sum-exp and every
 * elementwise step in fp32 (Kalamkar et al., A Study of BFLOAT16 for Deep Learning Training,
 * 2019; FlashAttention-2 for the tiling). docs/flash.md ("bf16") has the layouts and the error.
 *
 * The structure is the tiled engine's (tiled.c), for the pattern "everything": lanes =
 * queries, query tiles of EF_QT = 64 rows, key chunks of EF_KT = 64, transposed score tiles
 * S^T = K Qt, an online softmax, lse saved, backward recomputing P from lse per (batch, head)
 * (keys split into ranges only when there are fewer than two heads), the same causal and
 * kv_lens / q_lens rules, and a work order that does not depend on the thread count.
 *
 * What changes is the product. vdpbf16ps (AVX512-BF16) multiplies the two bf16 halves of
 * each 32-bit lane of two vectors and adds both products to an fp32 lane: a product must bring
 * its reduction index in *pairs*. Every operand is therefore a uint32 array of bf16 pairs
 * (low half = even reduction index, high half = odd). K and V of a (batch, head) are converted
 * once per thread (forward) or backward item, the query and dO tiles once per tile, P^T and dS^T
 * once per chunk:
 *   - along D (S, dP): a row of K or V converted in place is already pairs (K[j][2t], K[j][2t+1]);
 *     the query (dO) tile is converted row by row and transposed to Qt2 [D/2][QT];
 *   - along the keys (P V, dQ): two rows of P^T (of V, of K, of dS^T) interleaved lane by
 *     lane, (P^T[2u][i], P^T[2u+1][i]) - a vcvtne2ps2bf16 and one vpermw per 16 pairs;
 *   - along the queries (dV, dK): a row of P^T or dS^T converted in place, and dO, Q as pairs
 *     of consecutive rows.
 * An odd count pads the last pair with a zero. Rounding is to nearest even with denormals
 * flushed to zero, which is what vcvtne2ps2bf16 does.
 *
 * Kernels: the AVX512-BF16 ones (target attribute, chosen at run time) and an emulation
 * that rounds the same inputs to bf16 and forms each lane's two products with fp32 FMAs in the
 * order vdpbf16ps uses (the odd pair element first; both products are exact in fp32, so the
 * emulation is bitwise equal on normal numbers). The emulation runs where the CPU lacks the
 * instruction, in the portable build on such a CPU, and when EF_BF16=emulate.
 * Saved for backward: lse [batch][heads][q_len] floats, in base 2 (below, "softmax in base 2").
 * Time O(B H N M D), memory O(B H N) saved + per thread a few tiles, K and V of one head in bf16
 * pairs (M (D + Dv) 32-bit words, the size of one head's fp32 K and V) and (backward) dK, dV of one
 * key range in fp32.
 */
#include "attn/flash_bf16.h"
#include "attn/softmax.h"
#include "core/vec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define BF_X86 1
#define BF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define BF_X86 0
#endif
#if BF_X86 || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { QT = EF_QT, QV = QT / EF_VL, KT = EF_KT, QT2 = QT / 2, KT2 = KT / 2, BF_MAX_DIM = 256 };

/* The operations of the products, in a native and an emulated version:
 *   gemm:  C[r][0:L] (+)= sum_{t<T} A(r, t) . B[t][0:L], A(r, t) = A[r*ars + t*ats] a broadcast
 *          pair, B rows of L pairs (L a multiple of 16), C fp32; acc = 0 overwrites; cs
 *          non-NULL: C[r][l] is scaled by cs[l] first (the online softmax's rescale of O^T);
 *   rows:  row r < rows of src (stride lds) as pairs along it: dst[r*ldd + t] =
 *          (src[r][2t], src[r][2t+1]) * s for t < ceil(n/2) (an odd n pads with 0);
 *   pairs: rows of src two by two: dst[u*ldd + x] = (src[2u][x], src[2u+1][x]) * s for x < n,
 *          u < ceil(rows/2) (an odd count pads with 0).
 *   ds:    dS^T = P^T o (dP^T - delta) (fp32: a difference, then a product) for rows r < kn
 *          and lanes < L (a multiple of 16) of st and dpt ([KT][QT]; delta[QT]) into pairs of
 *          queries sq[r][0:L/2] and pairs of keys sk[u][0:L] (an odd kn pads with 0); dpt may
 *          be overwritten (with dS^T).
 *   smpairs: the online softmax step of a key chunk (ef_online_softmax with bf_exp2 on the kn
 *          rows and first 16 nv lanes of st; mx, l, alpha: [QT] floats) with P^T written as
 *          pairs of keys, pb[u][0:16 nv] (the pairs function's layout), instead of into st.
 *   exprows: backward's Pᵀ = 2^(Sᵀ - lse) in place on the kn rows and first 16 nv lanes of st,
 *          and each row as pairs of queries into pq (rows QT2 apart; the rows function's layout).
 * A whole tile per call: these run once per chunk and are short. */
typedef void (*bf_gemm_fn)(int R, int T, int L, const uint32_t *A, ptrdiff_t ars, ptrdiff_t ats,
                           const uint32_t *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc,
                           const float *cs);
typedef void (*bf_rows_fn)(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds, int rows,
                           int n, float s);
typedef void (*bf_pairs_fn)(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds, int rows,
                            int n, float s);
typedef void (*bf_ds_fn)(int kn, int L, const float *st, float *dpt, const float *delta,
                         uint32_t *sq, uint32_t *sk);
typedef void (*bf_smpairs_fn)(float *st, int kn, int nv, float *mx, float *l, float *alpha,
                              uint32_t *pb);
typedef void (*bf_exprows_fn)(float *st, int kn, int nv, const float *lse, uint32_t *pq);
typedef struct bf_kernels {
    bf_gemm_fn gemm;
    bf_rows_fn rows;
    bf_pairs_fn pairs;
    bf_ds_fn ds;
    bf_smpairs_fn smpairs;
    bf_exprows_fn exprows;
    int native;
} bf_kernels;

/* ---------------------------------------------------------------------------------------------
 * The softmax in base 2 (fp32). The query tile of the S product is scaled by scale * log2(e),
 * so that the scores are s' = s log2(e) and exp(s - m) = 2^(s' - m'); lse is kept in base 2
 * too (lse' = m' + log2(l), natural lse = lse' ln 2). bf_exp2 runs on x = s' - m' <= 0 (or
 * slightly above, by rounding), -inf and NaN: n = round(x), f = x - n (exact) in [-1/2, 1/2],
 * 2^f by a degree-4 polynomial fitted for relative error (2.9e-6 measured over [-1/2, 1/2] in
 * fp32, a thousandth of bf16's rounding of P; the natural-base form this replaces, a degree-5
 * Taylor polynomial, was at 2.5e-6), times 2^n by vscalefps. x is first raised to -150, where
 * f = 0, p = 1 and 2^-150 rounds (to even) to exactly 0: -inf (a masked key) gives 0 with no
 * compare and select; x in (-150, -126) gives the denormal 2^x. vmaxps(-150, x) returns x when
 * x is NaN, so NaN stays NaN. The portable form builds 2^n from the exponent field (n >= -126)
 * and gives 0 below -126.
 * ------------------------------------------------------------------------------------------- */
#define EXP2_C1 0.6931241750717163f
#define EXP2_C2 0.24024099111557007f
#define EXP2_C3 0.055906400084495544f
#define EXP2_C4 0.009582829661667347f
#define BF_LOG2E 1.44269504088896341f
#if BF_X86 || defined(__AVX512F__)
/* (avx512f only, so that it inlines into AVX-512 builds and into the native kernels alike) */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) __m512
exp2_512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_C4), f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif
#if defined(__AVX512F__) && EF_VL == 16
EF_INLINE vf bf_exp2(vf x) { return (vf)exp2_512((__m512)x); }
#else
EF_INLINE vf bf_exp2(vf x) {
    vi small = x < -126.0f;
    vf xc = vf_select(small, vf_set1(-126.0f), x);
    const float magic = 12582912.0f; /* round to nearest even: |x| < 2^22 */
    vf n = (xc + magic) - magic;
    vf f = xc - n;
    vf p = vf_set1(EXP2_C4) * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* n >= -126: 2^n is a normal float */
    return vf_select(small, vf_set1(0.0f), p * (vf)e);
}
#endif

/* ---------------------------------------------------------------------------------------------
 * The emulation (portable C)
 * ------------------------------------------------------------------------------------------- */
/* fp32 -> bf16 bits: round to nearest even, denormals to signed zero, NaN stays (quiet) NaN;
 * vcvtne2ps2bf16's rounding. */
static uint32_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return (u >> 16) & 0x8000u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

static void rows_emul(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds, int rows,
                      int n, float s) {
    for (int r = 0; r < rows; r++) {
        uint32_t *o = dst + r * ldd;
        const float *x = src + r * lds;
        for (int t = 0; t < n / 2; t++)
            o[t] = bf16_round(x[2 * t] * s) | bf16_round(x[2 * t + 1] * s) << 16;
        if (n & 1) o[n / 2] = bf16_round(x[n - 1] * s);
    }
}

static void pairs_emul(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds, int rows,
                       int n, float s) {
    for (int u = 0; 2 * u < rows; u++) {
        uint32_t *o = dst + u * ldd;
        const float *a = src + 2 * u * lds, *b = 2 * u + 1 < rows ? a + lds : NULL;
        for (int x = 0; x < n; x++)
            o[x] = bf16_round(a[x] * s) | (b ? bf16_round(b[x] * s) << 16 : 0);
    }
}

static void ds_emul(int kn, int L, const float *st, float *dpt, const float *delta, uint32_t *sq,
                    uint32_t *sk) {
    for (int r = 0; r < kn; r++)
        for (int i = 0; i < L; i++) dpt[r * QT + i] = st[r * QT + i] * (dpt[r * QT + i] - delta[i]);
    rows_emul(sq, QT2, dpt, QT, kn, L, 1.0f);
    pairs_emul(sk, QT, dpt, QT, kn, L, 1.0f);
}

typedef int32_t viu __attribute__((vector_size(EF_VL * 4), aligned(4), may_alias));

static float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void gemm_emul(int R, int T, int L, const uint32_t *A, ptrdiff_t ars, ptrdiff_t ats,
                      const uint32_t *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc,
                      const float *cs) {
    const vi hi_mask = (vi){0} + (int32_t)0xffff0000u;
    for (int r = 0; r < R; r++)
        for (int l0 = 0; l0 < L; l0 += EF_VL) {
            vf c = acc ? vf_loadu(C + (size_t)r * ldc + l0) : vf_set1(0);
            if (cs) c *= vf_loadu(cs + l0);
            for (int t = 0; t < T; t++) {
                uint32_t a = A[r * ars + t * ats];
                vf ahi = vf_set1(bits_f(a & 0xffff0000u)), alo = vf_set1(bits_f(a << 16));
                vi b = *(const viu *)(B + t * ldb + l0);
                vf bhi = (vf)(b & hi_mask), blo = (vf)(b << 16);
                /* both products are exact in fp32: FMA or multiply-then-add round alike */
                c = c + ahi * bhi;
                c = c + alo * blo;
            }
            vf_storeu(C + (size_t)r * ldc + l0, c);
        }
}

/* smpairs and exprows as two steps: the build's softmax with bf_exp2, then the conversion
 * (the emulation's, or the native one where a build without AVX-512 runs the native kernels:
 * their exponentials must then be the build's bf_exp2 too, whose rounding the emulation
 * shares). */
static inline void smpairs_split(bf_pairs_fn pairs, float *st, int kn, int nv, float *mx, float *l,
                                 float *alpha, uint32_t *pb) {
    ef_online_softmax(st, QT, kn, nv * 16 / EF_VL, (vf *)mx, (vf *)l, (vf *)alpha, bf_exp2);
    pairs(pb, QT, st, QT, kn, nv * 16, 1.0f);
}
static inline void exprows_split(bf_rows_fn rows, float *st, int kn, int nv, const float *lse,
                                 uint32_t *pq) {
    for (int r = 0; r < kn; r++)
        for (int x = 0; x < 16 * nv; x += EF_VL) {
            float *ps = st + r * QT + x;
            vf_store(ps, bf_exp2(vf_load(ps) - vf_load(lse + x)));
        }
    rows(pq, QT2, st, QT, kn, nv * 16, 1.0f);
}
static void smpairs_emul(float *st, int kn, int nv, float *mx, float *l, float *alpha,
                         uint32_t *pb) {
    smpairs_split(pairs_emul, st, kn, nv, mx, l, alpha, pb);
}
static void exprows_emul(float *st, int kn, int nv, const float *lse, uint32_t *pq) {
    exprows_split(rows_emul, st, kn, nv, lse, pq);
}

static const bf_kernels kernels_emul = {gemm_emul,    rows_emul,    pairs_emul, ds_emul,
                                        smpairs_emul, exprows_emul, 0};

/* ---------------------------------------------------------------------------------------------
 * AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16), compiled for that target whatever the build's
 * -march, used only when the CPU reports avx512bf16. Register tile as tiled.c's mk: 6 rows x 4
 * vectors = 24 accumulators of 32 zmm.
 * ------------------------------------------------------------------------------------------- */
#if BF_X86
BF_TARGET static inline __attribute__((always_inline)) void
bmk(const int RB, const int NV, int T, const uint32_t *A, ptrdiff_t ars, ptrdiff_t ats,
    const uint32_t *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc, const float *cs) {
    __m512 c[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
            if (cs) c[r][v] = _mm512_mul_ps(c[r][v], _mm512_loadu_ps(cs + v * 16));
        }
    for (int t = 0; t < T; t++) {
        __m512i b[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_si512(B + t * ldb + v * 16);
#pragma GCC unroll 6
        for (int r = 0; r < RB; r++) {
            __m512i a = _mm512_set1_epi32((int)A[r * ars + t * ats]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + r * ldc + v * 16, c[r][v]);
}

#define BMK(RB, NV)                                                                                \
    bmk(RB, NV, T, A + r0 * ars, ars, ats, B + l0, ldb, C + r0 * ldc + l0, ldc, acc,               \
        cs ? cs + l0 : NULL)
#define BMK_NV(RB)                                                                                 \
    switch (nv) {                                                                                  \
    case 1: BMK(RB, 1); break;                                                                     \
    case 2: BMK(RB, 2); break;                                                                     \
    case 3: BMK(RB, 3); break;                                                                     \
    case 4: BMK(RB, 4); break;                                                                     \
    default: break;                                                                                \
    }

BF_TARGET static void gemm_native(int R, int T, int L, const uint32_t *A, ptrdiff_t ars,
                                  ptrdiff_t ats, const uint32_t *B, ptrdiff_t ldb, float *C,
                                  ptrdiff_t ldc, int acc, const float *cs) {
    for (int l0 = 0; l0 < L; l0 += 64) {
        int nv = EF_MIN(4, (L - l0) / 16);
        int r0 = 0;
        for (; r0 + 6 <= R; r0 += 6) BMK_NV(6)
        switch (R - r0) {
        case 5: BMK_NV(5) break;
        case 4: BMK_NV(4) break;
        case 3: BMK_NV(3) break;
        case 2: BMK_NV(2) break;
        case 1: BMK_NV(1) break;
        default: break;
        }
    }
}

static __mmask16 mask16(int m) { /* the first m of 16 lanes (m may be <= 0 or >= 16) */
    return m >= 16 ? (__mmask16)0xffff : m <= 0 ? (__mmask16)0 : (__mmask16)((1u << m) - 1);
}

BF_TARGET static void rows_native(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds,
                                  int rows, int n, float s) {
    const __m512 vs = _mm512_set1_ps(s);
    const int scaled = s != 1.0f; /* x * 1 = x: skip the multiply */
    for (int r = 0; r < rows; r++) {
        uint32_t *o = dst + r * ldd;
        const float *x = src + r * lds;
        for (int c = 0; c < n; c += 32) {
            int m = n - c;
            __m512 lo = _mm512_maskz_loadu_ps(mask16(m), x + c);
            __m512 hi = _mm512_maskz_loadu_ps(mask16(m - 16), x + c + 16);
            if (scaled) lo = _mm512_mul_ps(lo, vs), hi = _mm512_mul_ps(hi, vs);
            _mm512_mask_storeu_epi32(o + c / 2, mask16((m + 1) / 2),
                                     (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

BF_TARGET static void pairs_native(uint32_t *dst, ptrdiff_t ldd, const float *src, ptrdiff_t lds,
                                   int rows, int n, float s) {
    /* cvtne2ps2bf16(b, a) holds a's 16 halves then b's; vpermw interleaves them */
    const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                        8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 vs = _mm512_set1_ps(s);
    const int scaled = s != 1.0f;
    for (int u = 0; 2 * u < rows; u++) {
        uint32_t *o = dst + u * ldd;
        const float *a = src + 2 * u * lds, *b = a + lds;
        const int has_b = 2 * u + 1 < rows;
        for (int x = 0; x < n; x += 16) {
            __mmask16 m = mask16(n - x);
            __m512 va = _mm512_maskz_loadu_ps(m, a + x);
            __m512 vb = has_b ? _mm512_maskz_loadu_ps(m, b + x) : _mm512_setzero_ps();
            if (scaled) va = _mm512_mul_ps(va, vs), vb = _mm512_mul_ps(vb, vs);
            __m512i pr = _mm512_permutexvar_epi16(ix, (__m512i)_mm512_cvtne2ps_pbh(vb, va));
            _mm512_mask_storeu_epi32(o + x, m, pr);
        }
    }
}

BF_TARGET static inline __attribute__((always_inline)) void ds_nv(const int NV, int kn,
                                                                  const float *st, float *dpt,
                                                                  const float *delta, uint32_t *sq,
                                                                  uint32_t *sk) {
    const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                        8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 dl[QT / 16];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) dl[v] = _mm512_loadu_ps(delta + 16 * v);
    for (int u = 0; 2 * u < kn; u++) {
        const int has1 = 2 * u + 1 < kn;
        __m512 d0[QT / 16 + 1], d1[QT / 16 + 1];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const float *p0 = st + 2 * u * QT + 16 * v, *g0 = dpt + 2 * u * QT + 16 * v;
            d0[v] = _mm512_mul_ps(_mm512_loadu_ps(p0), _mm512_sub_ps(_mm512_loadu_ps(g0), dl[v]));
            d1[v] = has1 ? _mm512_mul_ps(_mm512_loadu_ps(p0 + QT),
                                         _mm512_sub_ps(_mm512_loadu_ps(g0 + QT), dl[v]))
                         : _mm512_setzero_ps();
            _mm512_storeu_si512(
                sk + u * QT + 16 * v,
                _mm512_permutexvar_epi16(ix, (__m512i)_mm512_cvtne2ps_pbh(d1[v], d0[v])));
        }
        d0[NV] = d1[NV] = _mm512_setzero_ps(); /* an odd NV pairs its last vector with zeros */
#pragma GCC unroll 4
        for (int v = 0; v < NV; v += 2) {
            _mm512_storeu_si512(sq + 2 * u * QT2 + 8 * v,
                                (__m512i)_mm512_cvtne2ps_pbh(d0[v + 1], d0[v]));
            if (has1)
                _mm512_storeu_si512(sq + (2 * u + 1) * QT2 + 8 * v,
                                    (__m512i)_mm512_cvtne2ps_pbh(d1[v + 1], d1[v]));
        }
    }
}

BF_TARGET static void ds_native(int kn, int L, const float *st, float *dpt, const float *delta,
                                uint32_t *sq, uint32_t *sk) {
    switch (L / 16) {
    case 1: ds_nv(1, kn, st, dpt, delta, sq, sk); break;
    case 2: ds_nv(2, kn, st, dpt, delta, sq, sk); break;
    case 3: ds_nv(3, kn, st, dpt, delta, sq, sk); break;
    default: ds_nv(QT / 16, kn, st, dpt, delta, sq, sk); break;
    }
}

#if defined(__AVX512F__) && EF_VL == 16 /* bf_exp2 is exp2_512: the fused kernels */
/* ef_softmax_group for the first NV vectors, in intrinsics, with P^T converted to pairs of keys as
 * it is made: the same operations on each lane in the same order (so the same bits as
 * ef_online_softmax followed by pairs_native), without storing P^T in fp32 and loading it
 * again. */
BF_TARGET static inline __attribute__((always_inline)) void
smpairs_nv(const int NV, float *st, int kn, float *mx, float *l, float *alpha, uint32_t *pb) {
    const __m512i ix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                        8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 tmax[4], use[4], sum[4];
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) tmax[u] = _mm512_loadu_ps(mx + u * 16);
    for (int r = 0; r < kn; r++)
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++)
            tmax[u] = _mm512_max_ps(tmax[u], _mm512_loadu_ps(st + r * QT + u * 16));
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) {
        __mmask16 none = _mm512_cmp_ps_mask(tmax[u], _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
        use[u] = _mm512_mask_blend_ps(none, tmax[u], _mm512_setzero_ps());
        __m512 al = exp2_512(_mm512_loadu_ps(mx + u * 16) - use[u]);
        _mm512_storeu_ps(alpha + u * 16, al);
        sum[u] = _mm512_setzero_ps();
    }
    for (int r = 0; r < kn; r += 2) {
        const int has1 = r + 1 < kn;
#pragma GCC unroll 4
        for (int u = 0; u < NV; u++) {
            __m512 e0 = exp2_512(_mm512_loadu_ps(st + r * QT + u * 16) - use[u]);
            sum[u] += e0;
            __m512 e1 = _mm512_setzero_ps();
            if (has1) {
                e1 = exp2_512(_mm512_loadu_ps(st + (r + 1) * QT + u * 16) - use[u]);
                sum[u] += e1;
            }
            _mm512_storeu_si512(pb + r / 2 * QT + u * 16,
                                _mm512_permutexvar_epi16(ix, (__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < NV; u++) {
        __m512 lv = _mm512_loadu_ps(l + u * 16), al = _mm512_loadu_ps(alpha + u * 16);
        _mm512_storeu_ps(l + u * 16, lv * al + sum[u]);
        _mm512_storeu_ps(mx + u * 16, tmax[u]);
    }
}

BF_TARGET static void smpairs_native(float *st, int kn, int nv, float *mx, float *l, float *alpha,
                                     uint32_t *pb) {
    switch (nv) { /* nv <= QT / 16 = 4: one group */
    case 1: smpairs_nv(1, st, kn, mx, l, alpha, pb); break;
    case 2: smpairs_nv(2, st, kn, mx, l, alpha, pb); break;
    case 3: smpairs_nv(3, st, kn, mx, l, alpha, pb); break;
    default: smpairs_nv(4, st, kn, mx, l, alpha, pb); break;
    }
}

/* Backward's exponentials with the conversion to pairs of queries as they are made: the
 * operations of the exp loop and then rows_native, in one pass (the same bits). */
BF_TARGET static void exprows_native(float *st, int kn, int nv, const float *lse, uint32_t *pq) {
    for (int r = 0; r < kn; r++) {
        float *ps = st + r * QT;
        for (int u = 0; u < nv; u += 2) {
            __m512 e0 = exp2_512(_mm512_loadu_ps(ps + u * 16) - _mm512_loadu_ps(lse + u * 16));
            __m512 e1 = _mm512_setzero_ps();
            _mm512_storeu_ps(ps + u * 16, e0);
            if (u + 1 < nv) {
                e1 = exp2_512(_mm512_loadu_ps(ps + u * 16 + 16) - _mm512_loadu_ps(lse + u * 16 + 16));
                _mm512_storeu_ps(ps + u * 16 + 16, e1);
            }
            _mm512_mask_storeu_epi32(pq + r * QT2 + u * 8, u + 1 < nv ? 0xffff : 0x00ff,
                                     (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
    }
}

#else
static void smpairs_native(float *st, int kn, int nv, float *mx, float *l, float *alpha,
                           uint32_t *pb) {
    smpairs_split(pairs_native, st, kn, nv, mx, l, alpha, pb);
}
static void exprows_native(float *st, int kn, int nv, const float *lse, uint32_t *pq) {
    exprows_split(rows_native, st, kn, nv, lse, pq);
}
#endif

static const bf_kernels kernels_native = {gemm_native, rows_native,    pairs_native,  ds_native,
                                          smpairs_native, exprows_native, 1};
#endif

int ef_bf16_cpu_native(void) {
#if BF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * Plan state
 * ------------------------------------------------------------------------------------------- */
typedef struct bf_ws { /* one per thread slot; pair arrays are uint32, 64-byte aligned rows */
    uint32_t *tmp;     /* [QT][max(D2, Dv2)]  a tile's rows as pairs, before the transpose */
    uint32_t *qb;      /* [D2][QT]   scaled Q tile, pairs along D, transposed */
    float *st;         /* [KT][QT]   S^T, then P^T (fp32) */
    uint32_t *pb;      /* [KT2][QT]  P^T, pairs of keys */
    float *ot;         /* [Dv][QT]   O^T accumulator */
    uint32_t *dob;     /* [Dv2][QT]  dO tile, pairs along Dv, transposed (backward) */
    uint32_t *dop;     /* [QT2][Dvp] dO tile, pairs of queries (backward) */
    uint32_t *qp;      /* [QT2][Dp]  scaled Q tile, pairs of queries (backward) */
    float *dpt;        /* [KT][QT]   dP^T then dS^T (backward) */
    uint32_t *pq;      /* [KT][QT2]  P^T, pairs of queries (backward) */
    uint32_t *sq;      /* [KT][QT2]  dS^T, pairs of queries (backward) */
    uint32_t *sk;      /* [KT2][QT]  dS^T, pairs of keys (backward) */
    float *dqt;        /* [D][QT]    dQ^T of one query tile (backward) */
    uint32_t *fix;     /* [max(D, Dv)] a chunk's last pair of keys when its second key is not in
                        * the chunk (zeroed, so that a later key is never multiplied in) */
    /* K and V of one (batch, head), converted once for all its tiles and chunks: */
    uint32_t *kall;  /* [M][D2]    K, pairs along D (S = K Qt) */
    uint32_t *vall;  /* [M2][Dv]   V, pairs of keys (forward: O^T += V^T P^T) */
    uint32_t *kpall; /* [M2][D]    K, pairs of keys (backward: dQ^T += K^T dS^T) */
    uint32_t *vnall; /* [M][Dv2]   V, pairs along Dv (backward: dP^T = V dO^T) */
    float *dk, *dv;  /* [rows][Dp], [rows][Dvp] fp32 accumulators of one key range (backward,
                      * when the output rows cannot be: ef_kacc) */
    uint8_t *kz;     /* [rows / EF_ZB + 2] ef_kacc's blocks zeroed already (backward) */
    int64_t conv_bh; /* forward: the (batch, head) kall, vall hold; -1 = none in this call */
} bf_ws;

typedef struct bf_plan {
    int d2, dv2, dp, dvp, ntiles;
    int bwd_slots, splits; /* as tiled.c */
    float *dqpart;         /* [(splits-1)][B*H][N][D] */
    bf_ws *ws;
    void *block;
    bf_kernels k;
} bf_plan;

static int pad16(int x) { return (x + 15) / 16 * 16; }
static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

ef_status ef_bf16_init(ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    bf_plan *p = ef_mem_calloc(1, sizeof *p);
    if (!p) return ef_error(EF_ERR_NOMEM, "%s: out of memory", a->ops->name);
    a->impl = p;
    if (s->head_dim > BF_MAX_DIM || s->v_dim > BF_MAX_DIM)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "%s: precision=bf16: head_dim=%d v_dim=%d; the kernel supports dimensions "
                        "up to %d",
                        a->ops->name, s->head_dim, s->v_dim, BF_MAX_DIM);
    const char *env = getenv("EF_BF16");
    int emulate = 0;
    if (env && *env) {
        if (!strcmp(env, "emulate"))
            emulate = 1;
        else if (strcmp(env, "auto") != 0)
            return ef_error(EF_ERR_ARG,
                            "%s: precision=bf16: EF_BF16=%s in the environment; expected auto or "
                            "emulate",
                            a->ops->name, env);
    }
    p->k = kernels_emul;
#if BF_X86
    if (!emulate && ef_bf16_cpu_native()) p->k = kernels_native;
#else
    (void)emulate;
#endif
    int d = s->head_dim, dv = s->v_dim;
    p->d2 = (d + 1) / 2, p->dv2 = (dv + 1) / 2, p->dp = pad16(d), p->dvp = pad16(dv);
    p->ntiles = (s->q_len + QT - 1) / QT;
    enum { BWD_ITEMS = 2 };
    int64_t bh = (int64_t)s->batch * s->heads;
    int nch = (s->kv_len + KT - 1) / KT;
    p->splits = bh >= BWD_ITEMS ? 1 : (int)EF_MIN((int64_t)nch, (BWD_ITEMS + bh - 1) / bh);
    p->bwd_slots = (int)EF_MIN((int64_t)a->slots, bh * p->splits);
    enum { NSMALL = 18 };
    int m = s->kv_len, m2 = (m + 1) / 2;
    size_t dmax2 = (size_t)EF_MAX(p->d2, p->dv2);
    size_t small[NSMALL] = {QT * dmax2,           (size_t)p->d2 * QT,    (size_t)KT * QT,
                            (size_t)KT2 * QT,     (size_t)dv * QT,       (size_t)p->dv2 * QT,
                            QT2 * (size_t)p->dvp, QT2 * (size_t)p->dp,   (size_t)KT * QT,
                            (size_t)KT * QT2,     (size_t)KT * QT2,      (size_t)KT2 * QT,
                            (size_t)d * QT,       (size_t)EF_MAX(d, dv), (size_t)m * p->d2,
                            (size_t)m2 * dv,      (size_t)m2 * d,        (size_t)m * p->dv2};
    size_t rows =
        p->splits > 1 ? (size_t)((nch + p->splits - 1) / p->splits) * KT : (size_t)s->kv_len;
    size_t big[3] = {rows * p->dp, rows * p->dvp, (rows / EF_ZB + 2 + 3) / 4};
    size_t total = 0;
    for (int i = 0; i < NSMALL; i++) total += round16(small[i]) * a->slots;
    for (int i = 0; i < 3; i++) total += round16(big[i]) * p->bwd_slots;
    size_t part = (size_t)(p->splits - 1) * bh * s->q_len * d;
    total += round16(part);
    p->ws = ef_mem_calloc((size_t)a->slots, sizeof *p->ws);
    p->block = ef_attn_ws_alloc(a, total * 4); /* shareable: only zero padding persists */
    if (!p->ws || !p->block)
        return ef_error(EF_ERR_NOMEM, "%s: out of memory for %.1f MB of workspace", a->ops->name,
                        total * 4.0 / 1e6);
    a->ws_bytes = total * 4;
    memset(p->block, 0, a->ws_bytes); /* padding lanes start (and stay) zero */
    float *cur = p->block;
    p->dqpart = part ? cur : NULL;
    cur += round16(part);
    for (int t = 0; t < a->slots; t++) {
        bf_ws *w = &p->ws[t];
        void **f[NSMALL] = {(void **)&w->tmp,  (void **)&w->qb,    (void **)&w->st,
                            (void **)&w->pb,   (void **)&w->ot,    (void **)&w->dob,
                            (void **)&w->dop,  (void **)&w->qp,    (void **)&w->dpt,
                            (void **)&w->pq,   (void **)&w->sq,    (void **)&w->sk,
                            (void **)&w->dqt,  (void **)&w->fix,   (void **)&w->kall,
                            (void **)&w->vall, (void **)&w->kpall, (void **)&w->vnall};
        for (int i = 0; i < NSMALL; i++) *f[i] = cur, cur += round16(small[i]);
        if (t < p->bwd_slots) {
            w->dk = cur, cur += round16(big[0]);
            w->dv = cur, cur += round16(big[1]);
            w->kz = (uint8_t *)cur, cur += round16(big[2]);
        }
    }
    return EF_OK;
}

void ef_bf16_destroy(ef_attn *a) {
    bf_plan *p = a->impl;
    if (!p) return;
    ef_attn_ws_free(a, p->block);
    ef_free(p->ws);
    ef_free(p);
    a->impl = NULL;
}

int ef_bf16_native(const ef_attn *a) { return a->impl ? ((const bf_plan *)a->impl)->k.native : 0; }

size_t ef_bf16_saved_bytes(const ef_attn *a) {
    const ef_attn_shape *s = &a->shape;
    return (size_t)s->batch * s->heads * s->q_len * sizeof(float);
}

/* Rows [0, n) of x [n][d] (row stride d) as pairs along d, scaled, transposed into
 * dst[ceil(d/2)][QT]; lanes >= n are zero. */
static void pack_t(const bf_plan *p, uint32_t *dst, uint32_t *tmp, const float *x, int d, int n,
                   float scale) {
    int d2 = (d + 1) / 2;
    p->k.rows(tmp, d2, x, d, n, d, scale);
    for (int t = 0; t < d2; t++) {
        uint32_t *row = dst + (size_t)t * QT;
        for (int i = 0; i < n; i++) row[i] = tmp[(size_t)i * d2 + t];
        for (int i = n; i < QT; i++) row[i] = 0;
    }
}

/* Rows [0, n) of x [n][d] as pairs of consecutive rows (x[2u], x[2u+1]), scaled, into
 * dst[QT2][ld]; rows >= n count as zero. Lanes d..ld-1 are never written (zero since init). */
static void pack_rowpairs(const bf_plan *p, uint32_t *dst, int ld, const float *x, int d, int n,
                          float scale) {
    p->k.pairs(dst, ld, x, d, n, d, scale);
    for (int u = (n + 1) / 2; u < QT2; u++) memset(dst + (size_t)u * ld, 0, sizeof(uint32_t) * d);
}


/* C[r][0:L] += sum over the key pairs u of [j0, j0+kn) of A[u][r] . B[u][0:L], with
 * A = all + j0/2 * R the head's pairs of keys ([M2][R]). An odd kn takes its last pair from
 * `fix` with the second key zeroed: the head's array pairs it with key j0+kn, which this
 * chunk must not see (a later key under causal masking: 0 times an infinite value there would
 * be NaN). The split leaves each lane's order of additions unchanged. cs (or NULL) scales C's
 * lanes first, once. */
static void keypair_gemm(const bf_plan *p, uint32_t *fix, int R, int kn, int L, const uint32_t *A,
                         const uint32_t *B, float *C, const float *cs) {
    int full = kn / 2;
    p->k.gemm(R, full, L, A, 1, R, B, QT, C, QT, 1, cs);
    if (kn & 1) {
        const uint32_t *last = A + (size_t)full * R;
        for (int e = 0; e < R; e++) fix[e] = last[e] & 0xffffu;
        p->k.gemm(R, 1, L, fix, 1, R, B + (size_t)full * QT, QT, C, QT, 1, NULL);
    }
}

/* S^T masked for causality: lanes (queries i0+l) with j > i0+l get -inf (as tiled.c), in the
 * first nv vectors. */
static void mask_causal(float *st, int rows, int j0, int i0, int nv) {
    vi iota = vi_iota();
    for (int r = 0; r < rows; r++) {
        int j = j0 + r;
        if (j <= i0) continue;
        for (int v = 0; v < nv; v++) {
            vi qi = iota + (i0 + v * EF_VL);
            vi hide = qi < j;
            float *ps = st + (size_t)r * QT + v * EF_VL;
            vf_store(ps, vf_select(hide, vf_set1(-__builtin_inff()), vf_load(ps)));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
typedef struct bf_call {
    ef_attn *a;
    const ef_attn_io *io;
    float *lse;
    const float *dout;
    float *dq, *dk, *dv;
} bf_call;

static void forward_tile(void *ctx, int64_t item, int tid) {
    const bf_call *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    bf_plan *p = a->impl;
    bf_ws *w = &p->ws[tid];
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, d2 = p->d2;
    int64_t bh = item / p->ntiles;
    int it = (int)(item % p->ntiles), b = (int)(bh / s->heads);
    int i0 = it * QT, qn = EF_MIN(QT, n - i0);
    float *out = c->io->out + ((size_t)bh * n + i0) * dv;
    int qv = EF_MIN(qn, ef_attn_q_valid(a, c->io, b) - i0);
    if (qv < qn) { /* rows past q_lens[b]: zeros, lse = -inf, never read */
        int from = EF_MAX(qv, 0);
        memset(out + (size_t)from * dv, 0, sizeof(float) * (size_t)(qn - from) * dv);
        if (c->lse)
            for (int i = from; i < qn; i++) c->lse[(size_t)bh * n + i0 + i] = -__builtin_inff();
        if (qv <= 0) return;
    }
    const float *q = c->io->q + ((size_t)bh * n + i0) * d;
    const float *k = c->io->k + (size_t)bh * m * d, *v = c->io->v + (size_t)bh * m * dv;
    int kv_end = ef_attn_kv_valid(a, c->io, b);
    if (a->causal) kv_end = EF_MIN(kv_end, i0 + qv);

    if (w->conv_bh != bh) { /* this slot's first tile of this head in this call */
        int kv_valid = ef_attn_kv_valid(a, c->io, b);
        p->k.rows(w->kall, d2, k, d, kv_valid, d, 1.0f);
        p->k.pairs(w->vall, dv, v, dv, kv_valid, dv, 1.0f);
        w->conv_bh = bh;
    }
    pack_t(p, w->qb, w->tmp, q, d, qv, a->scale * BF_LOG2E);
    /* a short tile (the last one, a short q_len, padded queries) computes the 16-lane groups
     * its queries fill, not the whole tile: lanes past them are never read */
    int lanes = EF_MIN(QT, pad16(qv)), nv = lanes / EF_VL;
    vf mx[QV], l[QV];
    for (int u = 0; u < QV; u++) mx[u] = vf_set1(-__builtin_inff()), l[u] = vf_set1(0);
    memset(w->ot, 0, sizeof(float) * dv * QT);

    for (int j0 = 0; j0 < kv_end; j0 += KT) {
        int kn = EF_MIN(KT, kv_end - j0);
        /* S^T[j][i] = sum_t (K[j][2t], K[j][2t+1]) . (Qt[2t][i], Qt[2t+1][i]) */
        p->k.gemm(kn, d2, lanes, w->kall + (size_t)j0 * d2, d2, 1, w->qb, QT, w->st, QT, 0, NULL);
        if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0, nv);
        vf alpha[QV];
        p->k.smpairs(w->st, kn, lanes / 16, (float *)mx, (float *)l, (float *)alpha, w->pb);
        /* O^T[e][i] = O^T[e][i] alpha[i] + sum_u (V[2u][e], V[2u+1][e]) . (P^T[2u][i],
         * P^T[2u+1][i]) */
        keypair_gemm(p, w->fix, dv, kn, lanes, w->vall + (size_t)j0 / 2 * dv, w->pb, w->ot,
                     (const float *)alpha);
    }

    float inv[QT] __attribute__((aligned(64))), lse[QT] __attribute__((aligned(64)));
    for (int u = 0; u < QV; u++) {
        vf has = vf_select(l[u] > 0, vf_set1(1), vf_set1(0));
        vf_store(inv + u * EF_VL, has / vf_select(l[u] > 0, l[u], vf_set1(1)));
        for (int t = 0; t < EF_VL; t++)
            lse[u * EF_VL + t] = l[u][t] > 0 ? mx[u][t] + log2f(l[u][t]) : -__builtin_inff();
    }
    for (int i = 0; i < qv; i++)
        for (int e = 0; e < dv; e++) out[(size_t)i * dv + e] = w->ot[(size_t)e * QT + i] * inv[i];
    if (c->lse) memcpy(c->lse + (size_t)bh * n + i0, lse, sizeof(float) * qv);
}

ef_status ef_bf16_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    const ef_attn_shape *s = &a->shape;
    bf_plan *p = a->impl;
    bf_call c = {a, io, saved, NULL, NULL, NULL, NULL};
    for (int t = 0; t < a->slots; t++) p->ws[t].conv_bh = -1; /* the inputs are new */
    ef_parallel_for((int64_t)s->batch * s->heads * p->ntiles, ef_attn_threads(a), forward_tile, &c);
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------- */
static void backward_head(void *ctx, int64_t item, int tid) {
    const bf_call *c = ctx;
    ef_attn *a = c->a;
    const ef_attn_shape *s = &a->shape;
    bf_plan *p = a->impl;
    bf_ws *w = &p->ws[tid];
    int64_t bh = item / p->splits;
    int split = (int)(item % p->splits), nch = (s->kv_len + KT - 1) / KT;
    int klo = (int)((int64_t)split * nch / p->splits) * KT;
    int khi = EF_MIN(s->kv_len, (int)((int64_t)(split + 1) * nch / p->splits) * KT);
    int n = s->q_len, m = s->kv_len, d = s->head_dim, dv = s->v_dim, dp = p->dp, dvp = p->dvp;
    int d2 = p->d2, dv2 = p->dv2;
    int b = (int)(bh / s->heads);
    const float *q = c->io->q + (size_t)bh * n * d, *k = c->io->k + (size_t)bh * m * d;
    const float *v = c->io->v + (size_t)bh * m * dv, *o = c->io->out + (size_t)bh * n * dv;
    const float *g = c->dout + (size_t)bh * n * dv, *lse = c->lse + (size_t)bh * n;
    float *dq = split == 0 ? c->dq + (size_t)bh * n * d
                           : p->dqpart + ((size_t)(split - 1) * s->batch * s->heads + bh) * n * d;
    float *dk = c->dk + (size_t)bh * m * d;
    float *dvo = c->dv + (size_t)bh * m * dv;
    int kv_valid = ef_attn_kv_valid(a, c->io, b), q_valid = ef_attn_q_valid(a, c->io, b);

    ef_kacc z;
    ef_kacc_init(&z, dk, dvo, d, dv, w->dk, w->dv, dp, dvp, w->kz, klo, khi);
    /* this range's valid keys, converted once: rows [klo, kend) */
    int kend = EF_MIN(khi, kv_valid);
    if (kend > klo) {
        p->k.rows(w->kall, d2, k + (size_t)klo * d, d, kend - klo, d, 1.0f);
        p->k.rows(w->vnall, dv2, v + (size_t)klo * dv, dv, kend - klo, dv, 1.0f);
        p->k.pairs(w->kpall, d, k + (size_t)klo * d, d, kend - klo, d, 1.0f);
    }
    for (int it = 0; it < p->ntiles; it++) {
        int i0 = it * QT, qn = EF_MIN(QT, n - i0);
        int qv = EF_MAX(0, EF_MIN(qn, q_valid - i0));
        int kv_end = a->causal ? EF_MIN(kv_valid, i0 + qv) : kv_valid;
        kv_end = EF_MIN(kv_end, khi);
        if (qv == 0 || kv_end <= klo) {
            memset(dq + (size_t)i0 * d, 0, sizeof(float) * (size_t)qn * d);
            continue;
        }
        int lanes = EF_MIN(QT, pad16(qv)), nv = lanes / EF_VL, l2 = lanes / 2; /* as forward */
        const float *qi = q + (size_t)i0 * d, *gi = g + (size_t)i0 * dv;
        pack_t(p, w->qb, w->tmp, qi, d, qv, a->scale * BF_LOG2E);
        pack_t(p, w->dob, w->tmp, gi, dv, qv, 1.0f);
        pack_rowpairs(p, w->qp, dp, qi, d, qv, a->scale);
        pack_rowpairs(p, w->dop, dvp, gi, dv, qv, 1.0f);
        float lse_use[QT] __attribute__((aligned(64))), dl[QT] __attribute__((aligned(64)));
        for (int i = 0; i < QT; i++) {
            if (i < qv) {
                const float *gr = g + (size_t)(i0 + i) * dv, *orow = o + (size_t)(i0 + i) * dv;
                double acc = 0; /* delta_i = dO_i . O_i */
                for (int e = 0; e < dv; e++) acc += (double)gr[e] * orow[e];
                dl[i] = (float)acc;
                lse_use[i] = lse[i0 + i] != -__builtin_inff() ? lse[i0 + i] : __builtin_inff();
            } else {
                dl[i] = 0, lse_use[i] = __builtin_inff();
            }
        }
        memset(w->dqt, 0, sizeof(float) * d * QT);
        for (int j0 = klo; j0 < kv_end; j0 += KT) {
            int kn = EF_MIN(KT, kv_end - j0);
            /* P^T = exp(S^T - lse), S^T in bf16 products as forward */
            p->k.gemm(kn, d2, lanes, w->kall + (size_t)(j0 - klo) * d2, d2, 1, w->qb, QT, w->st, QT,
                      0, NULL);
            if (a->causal && j0 + kn - 1 > i0) mask_causal(w->st, kn, j0, i0, nv);
            p->k.exprows(w->st, kn, lanes / 16, lse_use, w->pq); /* and in pairs of queries */
            ef_kacc_touch(&z, j0, j0 + kn);
            /* dV[j][e] += sum_i' (P^T[j][2i'], P^T[j][2i'+1]) . (dO[2i'][e], dO[2i'+1][e]) */
            p->k.gemm(kn, l2, dvp, w->pq, QT2, 1, w->dop, dvp, z.dv + (size_t)(j0 - klo) * dvp,
                      dvp, 1, NULL);
            /* dP^T[j][i] = sum_e V[j][e] dO^T[e][i] (pairs along e);  dS^T = P^T o (dP^T - delta)
             */
            p->k.gemm(kn, dv2, lanes, w->vnall + (size_t)(j0 - klo) * dv2, dv2, 1, w->dob, QT,
                      w->dpt, QT, 0, NULL);
            p->k.ds(kn, lanes, w->st, w->dpt, dl, w->sq, w->sk);
            /* dK[j][t] += sum_i' (dS^T[j][2i'], dS^T[j][2i'+1]) . (sQ[2i'][t], sQ[2i'+1][t]) */
            p->k.gemm(kn, l2, dp, w->sq, QT2, 1, w->qp, dp, z.dk + (size_t)(j0 - klo) * dp, dp, 1,
                      NULL);
            /* dQ^T[t][i] += sum_u (K[2u][t], K[2u+1][t]) . (dS^T[2u][i], dS^T[2u+1][i]) */
            keypair_gemm(p, w->fix, d, kn, lanes, w->kpall + (size_t)(j0 - klo) / 2 * d, w->sk,
                         w->dqt, NULL);
        }
        for (int i = 0; i < qn; i++)
            for (int t = 0; t < d; t++)
                dq[(size_t)(i0 + i) * d + t] = w->dqt[(size_t)t * QT + i] * a->scale;
    }
    ef_kacc_finish(&z); /* keys past kv_valid: zero */
}

ef_status ef_bf16_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                           float *dq, float *dk, float *dv) {
    const ef_attn_shape *s = &a->shape;
    bf_call c = {a, io, (float *)saved, dout, dq, dk, dv};
    bf_plan *p = a->impl;
    int64_t bh = (int64_t)s->batch * s->heads;
    ef_parallel_for(bh * p->splits, EF_MIN(ef_attn_threads(a), p->bwd_slots), backward_head, &c);
    size_t per = (size_t)s->q_len * s->head_dim;
    for (int split = 1; split < p->splits; split++) /* fixed order: split 1, 2, ... */
        for (int64_t h = 0; h < bh; h++) {
            const float *src = p->dqpart + ((size_t)(split - 1) * bh + h) * per;
            float *dst = dq + (size_t)h * per;
            for (size_t x = 0; x < per; x++) dst[x] += src[x];
        }
    return EF_OK;
}
