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

/* 1 when the model spec, read as ef_model_new reads it (items at commas, trimmed, key=value,
 * numbers by strtol), asks for a small model: layers, dim, ff, max_len, vocab, classes and
 * the axial table within the bounds below. Big values are legitimate specs that would allocate
 * and compute for seconds or gigabytes, which is not what the fuzzer is looking for; the
 * caller prepends small defaults (FUZZ_MODEL_DEFAULTS) so that an absent key is small too.
 * Over-strict on purpose: any "classes=" or "dim=" anywhere (also inside an attention spec's
 * options) is bounded. */
#define FUZZ_MODEL_DEFAULTS "layers=1,dim=8,heads=2,ff=16,vocab=16,max_len=16,"
static inline int fuzz_model_small(const char *spec) {
    static const struct {
        const char *key;
        long max;
    } keys[] = {{"layers=", 3}, {"dim=", 32},   {"ff=", 128},   {"max_len=", 32},
                {"vocab=", 256}, {"heads=", 32}, {"chunks=", 64}};
    for (const char *p = spec; (p = strstr(p, "classes=")); p++)
        if (strtol(p + 8, NULL, 10) > 256) return 0;
    for (const char *p = spec; (p = strstr(p, "dim=")); p++)
        if (strtol(p + 4, NULL, 10) > 32) return 0;
    const char *item = spec;
    while (item) {
        while (*item && isspace((unsigned char)*item)) item++;
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
            size_t n = strlen(keys[k].key);
            if (!strncmp(item, keys[k].key, n) && strtol(item + n, NULL, 10) > keys[k].max)
                return 0;
        }
        if (!strncmp(item, "axial_shape=", 12)) {
            char *end;
            long a = strtol(item + 12, &end, 10), b = *end == 'x' ? strtol(end + 1, NULL, 10) : 1;
            if (a > 4096 || b > 4096 || a * b > 4096) return 0;
        }
        item = strchr(item, ',');
        if (item) item++;
    }
    return 1;
}

#endif
