/*
 * core.h - internal helpers shared by every module: errors, threads, vector math, the GEMM
 * shim's private side. Not installed; nothing here is part of the public API.
 */
#ifndef EF_CORE_H
#define EF_CORE_H

#include "eformer.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define EF_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define EF_PRINTF(a, b)
#endif

/* Records a formatted message as the thread's last error and returns `s`, so that a failing
 * path reads `return ef_error(EF_ERR_ARG, "heads=%d must be >= 1", h);`. */
ef_status ef_error(ef_status s, const char *fmt, ...) EF_PRINTF(2, 3);
/* Clears the thread's last error (called at the start of public entry points that succeed). */
void ef_clear_error(void);

/* Calls `body(ctx, i)` for i in [0, n) on up to `threads` threads (1 = in the caller). Work
 * items are independent; the result must not depend on which thread runs which item.
 * `tid` is in [0, threads) and names a per-thread workspace slot. */
typedef void (*ef_parallel_fn)(void *ctx, int64_t i, int tid);
void ef_parallel_for(int64_t n, int threads, ef_parallel_fn body, void *ctx);
/* The thread count the library may use right now (>= 1). */
int ef_threads(void);
/* The largest thread count a plan made now may be asked to use (sizes per-thread workspace). */
int ef_max_threads(void);

/* y[i] = exp(x[i]) for n floats (in place allowed), with the kernels' vector exp: relative
 * error < 2e-7; exp(-inf) = 0 (vec.h). ef_expf is the same function on one value. */
void ef_vexp(const float *x, float *y, size_t n);
/* x[i] = exp(x[i] - s) * c in place, with ef_vexp's function (c = 1: exactly ef_vexp of x - s). */
void ef_vexp_shift(float *x, size_t n, float s, float c);
float ef_expf(float x);

/* qsort's order on int32_t values, increasing. */
static inline int ef_cmp_i32(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

/* Tells the BLAS in use how many threads it may use. */
void ef_gemm_set_threads(int n);
/* Limits the ef_sgemm calls of the calling thread to n threads (0 = no limit); returns the
 * previous limit. Kernels that split work themselves call GEMMs with n = 1 so that every
 * product has the same summation order whatever the thread count (oneDNN and the built-in
 * kernel honour it per thread; OpenBLAS and BLIS only globally). */
int ef_gemm_local_threads(int n);

/* ef_sgemm whose result does not depend on the thread count: C is computed in fixed blocks of
 * EF_GEMM_FIXED_ROWS rows (and, when that gives fewer than EF_GEMM_FIXED_TILES blocks, of
 * columns too), each one single-threaded product, the blocks spread over the library's
 * threads. A BLAS that splits one product by its thread count (oneDNN does for some
 * shapes) may sum in another order. The message of a failure is repeated in the caller's
 * thread. */
enum { EF_GEMM_FIXED_ROWS = 256, EF_GEMM_FIXED_TILES = 8 };
ef_status ef_sgemm_fixed(int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

/* Allocation. Every allocation of the library goes through ef_malloc (64-byte aligned, sets the
 * error) or these libc-like ones (set no error: the caller says what failed), and every release
 * through ef_free; a test (tests/test_faults.c) checks that src/ calls nothing else.
 * ef_mem_realloc leaves p valid when it fails; sizes of 0 allocate 1 byte. */
void *ef_mem_malloc(size_t bytes);
void *ef_mem_calloc(size_t n, size_t size);
void *ef_mem_realloc(void *p, size_t bytes);
char *ef_mem_strdup(const char *s);
/* Allocation-failure injection (issue 14): from now on, allocation number n (1-based, counted
 * over all threads) returns NULL, and with `persistent` every one after it too; n = 0 disarms.
 * Resets the counts. ef_alloc_counts gives the allocations since then, the failures injected,
 * and the blocks now live (allocated and not yet freed, since the process started). */
void ef_alloc_fail(long n, int persistent);
void ef_alloc_counts(long *calls, long *failed, long *live);
/* How many allocations of the calling thread have returned NULL so far (injected or real): a
 * caller of code that hides the cause of its failure (cJSON's parser returns NULL for bad
 * text and for no memory alike) compares it before and after. */
unsigned long ef_alloc_failures(void);

/* Seconds on a monotonic clock (for durations only). */
double ef_now(void);

#define EF_MIN(a, b) ((a) < (b) ? (a) : (b))
#define EF_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
