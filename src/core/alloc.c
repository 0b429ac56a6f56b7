/* alloc.c - 64-byte-aligned allocation (one cache line, one zmm register). */
#include "core/core.h"

#include <stdlib.h>
#include <unistd.h>

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
        ef_error(EF_ERR_NOMEM, "ef_malloc: %.3g GB requested, the machine has %.3g GB",
                 bytes / 1e9, (double)pages * page / 1e9);
        return NULL;
    }
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded);
    if (!p) ef_error(EF_ERR_NOMEM, "ef_malloc: out of memory allocating %zu bytes", bytes);
    return p;
}

void ef_free(void *p) { free(p); }
