/*
 * fuzz_util.h - what several fuzz targets share (issue 14): a private scratch folder for the
 * files the loaders read, and a bound on the size of a model spec.
 * Target-side code (it may abort: a failed check is the fuzzer's finding), never in the library.
 */
#ifndef EF_FUZZ_UTIL_H
#define EF_FUZZ_UTIL_H

#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The files fuzz_path named, removed with their folder when the process ends. */
static char fuzz_dir[64], fuzz_names[16][128];
static int fuzz_n_names;

static inline void fuzz_cleanup(void) {
    for (int i = 0; i < fuzz_n_names; i++) unlink(fuzz_names[i]);
    rmdir(fuzz_dir);
}

/* dir/name in a folder of this process (/dev/shm, else /tmp), made on the first call. The
 * string lives until the process ends; at most 16 distinct names. */
static inline const char *fuzz_path(const char *name) {
    if (!fuzz_dir[0]) {
        const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(fuzz_dir, sizeof fuzz_dir, "%s/eformer-fuzz-%ld", base, (long)getpid());
        if (mkdir(fuzz_dir, 0700) != 0) abort();
        atexit(fuzz_cleanup);
    }
    char p[128];
    snprintf(p, sizeof p, "%s/%s", fuzz_dir, name);
    for (int i = 0; i < fuzz_n_names; i++)
        if (!strcmp(fuzz_names[i], p)) return fuzz_names[i];
    if (fuzz_n_names == 16) abort();
    memcpy(fuzz_names[fuzz_n_names], p, sizeof p);
    return fuzz_names[fuzz_n_names++];
}

/* Writes n bytes to path (replacing it). */
static inline void fuzz_write(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) abort();
}

/* A model's sizes as a spec sets them; FUZZ_MODEL_DEFAULTS and FUZZ_MODEL_LIBRARY are where
 * they start (ff 0: 4 x dim, as the library). */
typedef struct fuzz_dims {
    long layers, dim, ff, vocab, max_len, classes, axial;
} fuzz_dims;
#define FUZZ_MODEL_DEFAULTS "layers=1,dim=8,heads=2,ff=16,vocab=16,max_len=16,"
static const fuzz_dims fuzz_dims_prefixed = {1, 8, 16, 16, 16, 0, 0}; /* after the prefix */
static const fuzz_dims fuzz_dims_library = {2, 256, 0, 256, 1024, 0, 0};

/* 1 when the model spec, read as ef_model_new reads it (items at commas, trimmed, key=value,
 * later items win, numbers by strtol), is small: at most 2^17 parameters and 2^20
 * multiply-adds per position-row of a forward over max_len positions. Big values are
 * legitimate specs that would allocate gigabytes or compute for seconds, which is not what
 * the fuzzers look for; the library is not asked to refuse them. Over-strict on purpose: any
 * "classes=K" anywhere (also inside an attention spec) counts. */
static inline int fuzz_model_small(const char *spec, fuzz_dims d) {
    static const char *const keys[] = {"layers=", "dim=", "ff=", "vocab=", "max_len=", NULL};
    long *slot[] = {&d.layers, &d.dim, &d.ff, &d.vocab, &d.max_len};
    for (const char *p = spec; (p = strstr(p, "classes=")); p++)
        d.classes = strtol(p + 8, NULL, 10);
    for (const char *item = spec; item;) {
        while (*item && isspace((unsigned char)*item)) item++;
        for (int k = 0; keys[k]; k++)
            if (!strncmp(item, keys[k], strlen(keys[k])))
                *slot[k] = strtol(item + strlen(keys[k]), NULL, 10);
        if (!strncmp(item, "axial_shape=", 12)) {
            char *end;
            long a = strtol(item + 12, &end, 10), b = *end == 'x' ? strtol(end + 1, NULL, 10) : 1;
            d.axial = a < 1 || b < 1 ? 0 : a > 4096 || b > 4096 ? LONG_MAX : a + b;
        }
        item = strchr(item, ',');
        if (item) item++;
    }
    /* beyond these the parser refuses anyway, and the products below cannot overflow */
    if (d.dim > 4096) return 0;
    if (!d.ff && d.dim > 0) d.ff = 4 * d.dim;
    if (d.layers > 1024 || d.ff > 1 << 20 || d.vocab > 1 << 24 || d.max_len > 1 << 24 ||
        d.classes > 1 << 24 || d.axial > 8192)
        return 0;
    double C = (double)d.dim, K = (double)(d.classes > 0 ? d.classes : d.vocab);
    double layer = 4 * C * C + 2 * C * (double)d.ff;
    double params =
        (double)d.layers * layer + (double)d.vocab * C + K * C + (double)(d.max_len + d.axial) * C;
    double work = (double)d.max_len * ((double)d.layers * (layer + (double)d.max_len * C) + C * K);
    return params <= (1 << 17) && work <= (1 << 20);
}

#endif
