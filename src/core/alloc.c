/* alloc.c - every allocation of the library: 64-byte-aligned buffers (one cache line, one zmm
 * register) and the libc-like ef_mem_* for small objects, all through one counter that a test
 * can arm to make the n-th allocation fail (issue 14: allocation-failure injection). */
#include "core/core.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The failure injection state (core.h, ef_alloc_fail): allocation number `fail_at` since the
 * arming fails (and with `persist`, every later one). Relaxed atomics: the counts are exact
 * whatever the interleaving; which allocation is "the n-th" is deterministic with one thread. */
static atomic_long fail_at, n_calls, n_failed, n_live;
static atomic_int persist;
/* allocations of this thread that returned NULL, injected or not */
static _Thread_local unsigned long failed_here;

unsigned long ef_alloc_failures(void) { return failed_here; }

void ef_alloc_fail(long n, int persistent) {
    atomic_store_explicit(&fail_at, 0, memory_order_relaxed);
    atomic_store_explicit(&persist, persistent, memory_order_relaxed);
    atomic_store_explicit(&n_failed, 0, memory_order_relaxed);
    atomic_store_explicit(&n_calls, 0, memory_order_relaxed);
    atomic_store_explicit(&fail_at, n > 0 ? n : 0, memory_order_relaxed);
}

void ef_alloc_counts(long *calls, long *failed, long *live) {
    if (calls) *calls = atomic_load_explicit(&n_calls, memory_order_relaxed);
    if (failed) *failed = atomic_load_explicit(&n_failed, memory_order_relaxed);
    if (live) *live = atomic_load_explicit(&n_live, memory_order_relaxed);
}

/* 1 when this allocation is to fail. */
static int injected(void) {
    long c = atomic_fetch_add_explicit(&n_calls, 1, memory_order_relaxed) + 1;
    long at = atomic_load_explicit(&fail_at, memory_order_relaxed);
    if (at <= 0 || c < at || (c > at && !atomic_load_explicit(&persist, memory_order_relaxed)))
        return 0;
    atomic_fetch_add_explicit(&n_failed, 1, memory_order_relaxed);
    failed_here++;
    return 1;
}

static void *counted(void *p) {
    if (p)
        atomic_fetch_add_explicit(&n_live, 1, memory_order_relaxed);
    else
        failed_here++;
    return p;
}

void *ef_mem_malloc(size_t bytes) { return injected() ? NULL : counted(malloc(bytes ? bytes : 1)); }

void *ef_mem_calloc(size_t n, size_t size) {
    return injected() ? NULL : counted(calloc(n ? n : 1, size ? size : 1));
}

void *ef_mem_realloc(void *p, size_t bytes) {
    if (!p) return ef_mem_malloc(bytes);
    if (injected()) return NULL; /* p stays valid, as with realloc */
    void *q = realloc(p, bytes ? bytes : 1);
    if (!q) failed_here++;
    return q;
}

char *ef_mem_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = ef_mem_malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

void *ef_malloc(size_t bytes) {
    if (bytes == 0) {
        ef_error(EF_ERR_ARG, "ef_malloc: bytes=0");
        return NULL;
    }
    /* aligned_alloc wants a multiple of the alignment */
    if (bytes > SIZE_MAX - 63) {
        ef_error(EF_ERR_NOMEM, "ef_malloc: %zu bytes is too large", bytes);
        return NULL;
    }
    /* a request beyond the machine's memory fails here with a clear message rather than
     * deep inside the allocator (or, under a sanitizer, as an abort) */
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && bytes / (size_t)page > (size_t)pages) {
        ef_error(EF_ERR_NOMEM, "ef_malloc: %.3g GB requested, the machine has %.3g GB", bytes / 1e9,
                 (double)pages * page / 1e9);
        return NULL;
    }
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *p = injected() ? NULL : counted(aligned_alloc(64, rounded));
    if (!p) ef_error(EF_ERR_NOMEM, "ef_malloc: out of memory allocating %zu bytes", bytes);
    return p;
}

void ef_free(void *p) {
    if (!p) return;
    atomic_fetch_sub_explicit(&n_live, 1, memory_order_relaxed);
    free(p);
}
