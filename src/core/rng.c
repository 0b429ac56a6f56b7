/*
 * rng.c - counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
 *
 * The key is the 64-bit seed; the 128-bit counter is (stream, ctr). Each counter gives four
 * 32-bit words, so uniform element i of a draw is word (offset+i) % 4 of counter (offset+i) / 4.
 * Nothing is kept between calls: any thread can regenerate any element of any draw.
 */
#include "core/core.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi) {
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void ef_rng_raw(uint64_t seed, uint64_t stream, uint64_t ctr, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32);
    uint32_t c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = mulhilo(PHILOX_M0, c0, &hi0);
        uint32_t lo1 = mulhilo(PHILOX_M1, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        k0 += PHILOX_W0, k1 += PHILOX_W1;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* Uniform [0,1) from the top 24 bits: exactly representable, never 1. */
static inline float u24(uint32_t w) { return (float)(w >> 8) * (1.0f / 16777216.0f); }

void ef_rng_uniform(uint64_t seed, uint64_t stream, uint64_t offset, size_t n, float *out) {
    if (!out) return;
    size_t i = 0;
    while (i < n) {
        uint64_t idx = offset + i;
        uint32_t w[4];
        ef_rng_raw(seed, stream, idx >> 2, w);
        for (unsigned j = (unsigned)(idx & 3); j < 4 && i < n; j++, i++) out[i] = u24(w[j]);
    }
}

void ef_rng_normal(uint64_t seed, uint64_t stream, uint64_t offset, size_t n, float *out) {
    if (!out) return;
    /* element e uses uniforms (2*(e/2), 2*(e/2)+1): e even takes the cosine, odd the sine */
    for (size_t i = 0; i < n; i++) {
        uint64_t e = offset + i, pair = e >> 1;
        uint32_t w[4];
        ef_rng_raw(seed, stream, pair >> 1, w);
        uint32_t a = w[(pair & 1) * 2], b = w[(pair & 1) * 2 + 1];
        double u1 = ((double)(a >> 8) + 1.0) / 16777217.0; /* (0,1): log is finite */
        double u2 = (double)(b >> 8) / 16777216.0;
        double r = sqrt(-2.0 * log(u1)), t = 6.283185307179586 * u2;
        out[i] = (float)(e & 1 ? r * sin(t) : r * cos(t));
    }
}
