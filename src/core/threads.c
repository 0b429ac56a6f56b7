/*
 * threads.c - the library's thread count and its one parallel-for.
 *
 * With OpenMP the loop is `omp parallel for schedule(dynamic)`; without it, items run in the
 * caller. Work items must be independent, so results never depend on the thread count.
 */
#include "core/core.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef EF_HAVE_OPENMP
#include <omp.h>
#endif

static atomic_int ef_nthreads; /* 0 = not chosen yet: machine default */

static int ef_default_threads(void) {
#ifdef EF_HAVE_OPENMP
    return EF_MAX(1, omp_get_max_threads());
#else
    return 1;
#endif
}

void ef_set_num_threads(int n) {
    if (n <= 0) n = ef_default_threads();
#ifndef EF_HAVE_OPENMP
    n = 1;
#endif
    atomic_store(&ef_nthreads, n);
    ef_gemm_set_threads(n);
}

int ef_get_num_threads(void) {
    int n = atomic_load(&ef_nthreads);
    return n > 0 ? n : ef_default_threads();
}

int ef_threads(void) { return ef_get_num_threads(); }

int ef_max_threads(void) {
    int n = ef_get_num_threads(), d = ef_default_threads();
    return EF_MAX(n, d);
}

void ef_parallel_for(int64_t n, int threads, ef_parallel_fn body, void *ctx) {
    if (n <= 0) return;
    if (threads > n) threads = (int)n;
#ifdef EF_HAVE_OPENMP
    if (threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t i = 0; i < n; i++) body(ctx, i, omp_get_thread_num());
        return;
    }
#else
    (void)threads;
#endif
    for (int64_t i = 0; i < n; i++) body(ctx, i, 0);
}
