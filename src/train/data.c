/*
 * data.c - the data files tasks read (tasks.h, docs/tasks.md): whole files (text) and IDX
 * files (MNIST, Fashion-MNIST), plain or gzipped.
 *
 * IDX (http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic 0x0000TTDD (TT = 0x08,
 * unsigned bytes; DD = the number of dims), DD big-endian uint32 dims, then prod(dims) bytes.
 * zlib's gzread reads both plain and gzip files, so one path serves the npm package's raw files
 * and Debian's .gz ones. Every check is made before the data is trusted: magic, dims, and the
 * data length against the dims (a truncated file and trailing bytes are both format errors;
 * a damaged gzip stream too).
 */
#define _POSIX_C_SOURCE 200809L

#include "train/tasks.h"
#include "core/core.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef EF_HAVE_ZLIB
#include <zlib.h>
#endif

ef_status ef_file_read(const char *path, uint8_t **data, size_t *bytes) {
    if (!path || !data || !bytes) return ef_error(EF_ERR_ARG, "ef_file_read: NULL argument");
    *data = NULL, *bytes = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return ef_error(EF_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        int err = errno;
        fclose(f);
        return ef_error(EF_ERR_IO, "'%s' is not a readable regular file%s%s", path, err ? ": " : "",
                        err ? strerror(err) : "");
    }
    size_t n = (size_t)sb.st_size;
    uint8_t *buf = ef_mem_malloc(n ? n : 1);
    if (!buf) {
        fclose(f);
        return ef_error(EF_ERR_NOMEM, "out of memory reading '%s' (%zu bytes)", path, n);
    }
    size_t got = fread(buf, 1, n, f);
    int err = ferror(f) ? errno : 0;
    fclose(f);
    if (got != n) {
        ef_free(buf);
        return ef_error(EF_ERR_IO, "cannot read '%s': %s", path,
                        err ? strerror(err) : "the file shrank while being read");
    }
    *data = buf, *bytes = n;
    return EF_OK;
}

void ef_idx_free(ef_idx *x) {
    if (!x) return;
    ef_free(x->data);
    memset(x, 0, sizeof *x);
}

#ifndef EF_HAVE_ZLIB

ef_status ef_idx_read(const char *path, int want_ndim, ef_idx *out) {
    (void)want_ndim;
    if (out) memset(out, 0, sizeof *out);
    return ef_error(EF_ERR_UNSUPPORTED,
                    "cannot read IDX file '%s': eformer was built without zlib (install "
                    "zlib1g-dev and rebuild)",
                    path ? path : "(null)");
}

#else

/* zlib's message for g without the "path: " it starts with. */
static const char *gz_message(gzFile g, const char *path, int *errnum) {
    const char *msg = gzerror(g, errnum);
    size_t n = strlen(path);
    if (!strncmp(msg, path, n) && !strncmp(msg + n, ": ", 2)) msg += n + 2;
    return msg;
}

/* Reads up to n bytes; returns the count read (< n only at the end of the data) or -1 with
 * the error recorded (a damaged or truncated gzip stream is a format error). */
static int64_t gz_read_all(gzFile g, const char *path, uint8_t *dst, size_t n, ef_status *st) {
    size_t done = 0;
    while (done < n) {
        unsigned chunk = (unsigned)EF_MIN(n - done, (size_t)1 << 24);
        int r = gzread(g, dst + done, chunk);
        if (r < 0) {
            int errnum;
            const char *msg = gz_message(g, path, &errnum);
            *st = errnum == Z_ERRNO
                      ? ef_error(EF_ERR_IO, "cannot read '%s': %s", path, strerror(errno))
                      : ef_error(EF_ERR_FORMAT, "'%s': damaged gzip data (%s)", path, msg);
            return -1;
        }
        if (r == 0) {
            /* end of data; a gzip stream cut short reports it only here */
            int errnum;
            const char *msg = gz_message(g, path, &errnum);
            if (errnum != Z_OK) {
                *st =
                    ef_error(EF_ERR_FORMAT, "'%s': truncated or damaged gzip data (%s)", path, msg);
                return -1;
            }
            break;
        }
        done += (size_t)r;
    }
    return (int64_t)done;
}

ef_status ef_idx_read(const char *path, int want_ndim, ef_idx *out) {
    if (!path || !out) return ef_error(EF_ERR_ARG, "ef_idx_read: NULL argument");
    memset(out, 0, sizeof *out);
    if (want_ndim != 1 && want_ndim != 3)
        return ef_error(EF_ERR_ARG, "ef_idx_read: want_ndim=%d (1 or 3)", want_ndim);
    errno = 0;
    gzFile g = gzopen(path, "rb");
    if (!g)
        return ef_error(EF_ERR_IO, "cannot open '%s': %s", path,
                        errno ? strerror(errno) : "out of memory");
    ef_status st = EF_OK;
    uint8_t head[16];
    size_t hbytes = 4 + 4 * (size_t)want_ndim;
    int64_t got = gz_read_all(g, path, head, hbytes, &st);
    if (got < 0) goto done;
    if (got < 4) {
        st = ef_error(EF_ERR_FORMAT, "'%s': %lld bytes, too short for an IDX header", path,
                      (long long)got);
        goto done;
    }
    uint32_t magic =
        (uint32_t)head[0] << 24 | (uint32_t)head[1] << 16 | (uint32_t)head[2] << 8 | head[3];
    uint32_t want_magic = 0x800u | (uint32_t)want_ndim;
    if (magic != want_magic) {
        st = ef_error(EF_ERR_FORMAT,
                      "'%s': magic number 0x%08x, expected 0x%08x (IDX unsigned bytes, %d "
                      "dim%s: %s)",
                      path, magic, want_magic, want_ndim, want_ndim == 1 ? "" : "s",
                      want_ndim == 1 ? "labels" : "images");
        goto done;
    }
    if ((size_t)got < hbytes) {
        st = ef_error(EF_ERR_FORMAT, "'%s': truncated header (%lld of %zu bytes)", path,
                      (long long)got, hbytes);
        goto done;
    }
    size_t total = 1;
    for (int d = 0; d < want_ndim; d++) {
        const uint8_t *p = head + 4 + 4 * d;
        uint32_t v = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        /* counts up to 2^31; image sides up to 65536: far beyond any real IDX file, and the
         * product then fits size_t */
        uint32_t cap = d == 0 ? 0x7fffffffu : 65536u;
        if (v == 0 || v > cap) {
            st = ef_error(EF_ERR_FORMAT, "'%s': dimension %d is %u (must be 1 .. %u)", path, d, v,
                          cap);
            goto done;
        }
        out->dims[d] = v;
        total *= v;
    }
    out->ndim = want_ndim;
    out->bytes = total;
    /* the buffer grows with the data that actually arrives (doubling from 64 KB): a header
     * announcing more than the file holds (up to 2^63 bytes) must not allocate it up front */
    size_t cap = 0, have = 0;
    got = 0;
    while (have < total) {
        size_t grow = EF_MIN(total, cap ? 2 * cap : (size_t)1 << 16);
        uint8_t *p = ef_mem_realloc(out->data, grow);
        if (!p) {
            st = ef_error(EF_ERR_NOMEM, "out of memory reading '%s' (%zu bytes)", path, grow);
            goto done;
        }
        out->data = p;
        got = gz_read_all(g, path, out->data + have, grow - have, &st);
        if (got < 0) goto done;
        have += (size_t)got, cap = grow;
        if (have < cap) break; /* the end of the data */
    }
    got = (int64_t)have;
    if ((size_t)got < total) {
        if (want_ndim == 3)
            st = ef_error(EF_ERR_FORMAT,
                          "'%s': truncated: the header says %lld images of %lldx%lld (%zu "
                          "bytes) but %lld bytes follow",
                          path, (long long)out->dims[0], (long long)out->dims[1],
                          (long long)out->dims[2], total, (long long)got);
        else
            st = ef_error(EF_ERR_FORMAT,
                          "'%s': truncated: the header says %lld labels but %lld bytes follow",
                          path, (long long)out->dims[0], (long long)got);
        goto done;
    }
    uint8_t extra;
    got = gz_read_all(g, path, &extra, 1, &st);
    if (got < 0) goto done;
    if (got > 0) {
        st = ef_error(EF_ERR_FORMAT,
                      "'%s': trailing bytes after the %zu data bytes its header announces", path,
                      total);
        goto done;
    }
done:
    gzclose(g);
    if (st != EF_OK) ef_idx_free(out);
    return st;
}

#endif /* EF_HAVE_ZLIB */

void ef_image_set_free(ef_image_set *s) {
    if (!s) return;
    ef_free(s->images), ef_free(s->labels);
    memset(s, 0, sizeof *s);
}

/* dir/name, or dir/name.gz when only that exists; EF_ERR_IO naming both when neither does. */
static ef_status find_file(const char *dir, const char *name, char **path) {
    size_t n = strlen(dir) + strlen(name) + 8;
    char *p = ef_mem_malloc(n);
    if (!p) return ef_error(EF_ERR_NOMEM, "out of memory");
    struct stat sb;
    snprintf(p, n, "%s/%s", dir, name);
    if (stat(p, &sb) == 0) return *path = p, EF_OK;
    snprintf(p, n, "%s/%s.gz", dir, name);
    if (stat(p, &sb) == 0) return *path = p, EF_OK;
    ef_free(p);
    return ef_error(EF_ERR_IO, "neither '%s/%s' nor '%s/%s.gz' exists", dir, name, dir, name);
}

ef_status ef_image_set_load(const char *dir, const char *prefix, ef_image_set *out) {
    if (!dir || !prefix || !out) return ef_error(EF_ERR_ARG, "ef_image_set_load: NULL argument");
    memset(out, 0, sizeof *out);
    char names[2][64], *paths[2] = {NULL, NULL};
    snprintf(names[0], sizeof names[0], "%s-images-idx3-ubyte", prefix);
    snprintf(names[1], sizeof names[1], "%s-labels-idx1-ubyte", prefix);
    ef_idx img = {0}, lab = {0};
    ef_status st = find_file(dir, names[0], &paths[0]);
    if (!st) st = find_file(dir, names[1], &paths[1]);
    if (!st) st = ef_idx_read(paths[0], 3, &img);
    if (!st) st = ef_idx_read(paths[1], 1, &lab);
    if (!st && img.dims[0] != lab.dims[0])
        st = ef_error(EF_ERR_FORMAT, "'%s' holds %lld images but '%s' %lld labels", paths[0],
                      (long long)img.dims[0], paths[1], (long long)lab.dims[0]);
    for (size_t i = 0; !st && i < lab.bytes; i++)
        if (lab.data[i] >= 10)
            st = ef_error(EF_ERR_FORMAT, "'%s': label %zu is %u (classes are 0 .. 9)", paths[1], i,
                          lab.data[i]);
    if (!st) {
        out->n = img.dims[0];
        out->rows = (int)img.dims[1], out->cols = (int)img.dims[2];
        out->images = img.data, out->labels = lab.data;
        img.data = lab.data = NULL;
    }
    ef_idx_free(&img), ef_idx_free(&lab);
    ef_free(paths[0]), ef_free(paths[1]);
    return st;
}
