/*
 * checkpoint.c - parameter tables saved and loaded in the safetensors format
 * (https://github.com/huggingface/safetensors, docs/checkpoints.md):
 *
 *   [8 bytes]  N, unsigned little-endian: the header's length
 *   [N bytes]  JSON object, UTF-8: {"__metadata__": {"key": "value", ...},
 *              "name": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}, ...}
 *              padded with spaces so that 8 + N is a multiple of 8
 *   [rest]     the data section: each tensor's values, little-endian F32, row-major; offsets are
 *              relative to the section's start; tensors are packed in table order, no gaps
 *
 * Writing builds the header with snprintf (tensor names are validated printable ASCII without
 * quotes or backslashes; metadata strings are escaped here) and replaces the file atomically:
 * temporary file in the same folder, fsync, rename, fsync of the folder. Reading parses the
 * header with cJSON and validates every field, bound and size before writing anything into the
 * table; the rules match the reference implementation's (header starts with '{', is at most
 * 100 MB, tensors cover the data section exactly, without overlap or gap).
 *
 * Byte order: the data section is the in-memory image of the floats, which is right on a
 * little-endian machine only; the check below refuses to build elsewhere rather than write
 * files no other reader can use.
 */
#define _POSIX_C_SOURCE 200809L

#include "model/params.h"
#include "core/core.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoint.c writes floats in memory order; safetensors is little-endian (add a byte swap)"
#endif
#else
#error "checkpoint.c cannot tell the byte order (__BYTE_ORDER__); safetensors is little-endian"
#endif
_Static_assert(sizeof(float) == 4, "safetensors F32 is 4 bytes");

#ifndef EF_HAVE_CJSON

int ef_ckpt_supported(void) { return 0; }

static ef_status unsupported(const char *fn) {
    return ef_error(EF_ERR_UNSUPPORTED,
                    "%s: this build has no checkpoint support: cJSON was not "
                    "found at configure time (install libcjson-dev and "
                    "re-run cmake)",
                    fn);
}
ef_status ef_ckpt_save(const ef_params *p, const char *path, const ef_ckpt_meta *meta, int n_meta) {
    (void)p, (void)path, (void)meta, (void)n_meta;
    return unsupported("ef_ckpt_save");
}
ef_status ef_ckpt_load(ef_params *p, const char *path) {
    (void)p, (void)path;
    return unsupported("ef_ckpt_load");
}
ef_status ef_ckpt_read_meta(const char *path, const char *key, char **value) {
    (void)path, (void)key;
    if (value) *value = NULL;
    return unsupported("ef_ckpt_read_meta");
}

#else /* EF_HAVE_CJSON */

#include <cjson/cJSON.h>
#include <stdatomic.h>

/* The reference implementation's bound on the header (safetensors' MAX_HEADER_SIZE). */
#define CKPT_MAX_HEADER 100000000ull
/* Offsets and sizes are JSON numbers, read as doubles: exact up to 2^53. */
#define CKPT_MAX_INT 9007199254740992.0

int ef_ckpt_supported(void) { return 1; }

/* cJSON allocates through the library's allocator, so that its failures can be injected and its
 * blocks counted (core.h). The hooks are process-wide: another cJSON user in the process then
 * allocates through ef_mem_malloc too, which is malloc unless a test arms a failure. */
static void json_hooks_once(void) {
    cJSON_Hooks h = {ef_mem_malloc, ef_free};
    cJSON_InitHooks(&h);
}
static void json_hooks(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, json_hooks_once);
}

/* 1 when s[0..n) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF); else 0 and *bad is
 * the offset of the first invalid sequence. */
static int utf8_valid(const unsigned char *s, size_t n, size_t *bad) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0)
            len = 2, min = 0x80, c &= 0x1f;
        else if ((c & 0xf0) == 0xe0)
            len = 3, min = 0x800, c &= 0x0f;
        else if ((c & 0xf8) == 0xf0)
            len = 4, min = 0x10000, c &= 0x07;
        else
            goto fail;
        if (n - i < len) goto fail;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) goto fail;
            c = (c << 6) | (s[i + k] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) goto fail;
        i += len;
    }
    return 1;
fail:
    if (bad) *bad = i;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Writing
 * ------------------------------------------------------------------------------------------- */

/* A growing text buffer; `failed` latches an allocation failure. */
typedef struct sbuf {
    char *s;
    size_t len, cap;
    int failed;
} sbuf;

static void sb_reserve(sbuf *b, size_t more) {
    if (b->failed || b->len + more + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1) cap *= 2;
    char *s = ef_mem_realloc(b->s, cap);
    if (!s) {
        b->failed = 1;
        return;
    }
    b->s = s, b->cap = cap;
}

static void sb_put(sbuf *b, const char *s, size_t n) {
    sb_reserve(b, n);
    if (b->failed) return;
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void sb_printf(sbuf *b, const char *fmt, ...) EF_PRINTF(2, 3);
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) { /* only short items go through here */
        b->failed = 1;
        return;
    }
    sb_put(b, tmp, (size_t)n);
}

/* A JSON string literal of the (valid UTF-8) string s: '"' and '\\' escaped, control characters
 * as \n, \t, ... or \u00XX; other bytes, UTF-8 sequences included, as they are. */
static void sb_json_string(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        switch (*c) {
        case '"': sb_put(b, "\\\"", 2); break;
        case '\\': sb_put(b, "\\\\", 2); break;
        case '\n': sb_put(b, "\\n", 2); break;
        case '\r': sb_put(b, "\\r", 2); break;
        case '\t': sb_put(b, "\\t", 2); break;
        case '\b': sb_put(b, "\\b", 2); break;
        case '\f': sb_put(b, "\\f", 2); break;
        default:
            if (*c < 0x20 || *c == 0x7f)
                sb_printf(b, "\\u%04x", *c);
            else
                sb_put(b, (const char *)c, 1);
        }
    }
    sb_put(b, "\"", 1);
}

static ef_status check_meta(const ef_ckpt_meta *meta, int n_meta) {
    if (n_meta < 0 || (n_meta > 0 && !meta))
        return ef_error(EF_ERR_ARG, "ef_ckpt_save: n_meta=%d with meta %s", n_meta,
                        meta ? "set" : "NULL");
    for (int i = 0; i < n_meta; i++) {
        const char *k = meta[i].key, *v = meta[i].value;
        size_t bad = 0;
        if (!k || !k[0])
            return ef_error(EF_ERR_ARG, "ef_ckpt_save: metadata key %d is NULL or empty", i);
        if (!v) return ef_error(EF_ERR_ARG, "ef_ckpt_save: metadata value of '%s' is NULL", k);
        if (!utf8_valid((const unsigned char *)k, strlen(k), &bad))
            return ef_error(EF_ERR_ARG,
                            "ef_ckpt_save: metadata key %d is not valid UTF-8 "
                            "(byte %zu)",
                            i, bad);
        if (!utf8_valid((const unsigned char *)v, strlen(v), &bad))
            return ef_error(EF_ERR_ARG,
                            "ef_ckpt_save: metadata value of '%s' is not valid "
                            "UTF-8 (byte %zu)",
                            k, bad);
        for (int j = 0; j < i; j++)
            if (strcmp(meta[j].key, k) == 0)
                return ef_error(EF_ERR_ARG, "ef_ckpt_save: duplicate metadata key '%s'", k);
    }
    return EF_OK;
}

/* The header, padded with spaces so that 8 + N is a multiple of 8 (the data then starts 8-byte
 * aligned in the file, as the reference writer does). *out is malloc'd, *n its length. */
static ef_status build_header(const ef_params *p, const ef_ckpt_meta *meta, int n_meta, char **out,
                              size_t *n) {
    sbuf b = {0};
    sb_put(&b, "{", 1);
    if (n_meta > 0) {
        sb_put(&b, "\"__metadata__\":{", 16);
        for (int i = 0; i < n_meta; i++) {
            if (i) sb_put(&b, ",", 1);
            sb_json_string(&b, meta[i].key);
            sb_put(&b, ":", 1);
            sb_json_string(&b, meta[i].value);
        }
        sb_put(&b, "}", 1);
    }
    uint64_t off = 0;
    for (int i = 0; i < p->n; i++) {
        const ef_param *t = &p->t[i];
        if (n_meta > 0 || i > 0) sb_put(&b, ",", 1);
        sb_printf(&b, "\"%s\":{\"dtype\":\"F32\",\"shape\":[", t->name);
        for (int d = 0; d < t->ndim; d++)
            sb_printf(&b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        uint64_t end = off + (uint64_t)t->numel * 4;
        sb_printf(&b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                  (unsigned long long)end);
        off = end;
    }
    sb_put(&b, "}", 1);
    while (!b.failed && b.len % 8) sb_put(&b, " ", 1);
    if (b.failed) {
        ef_free(b.s);
        return ef_error(EF_ERR_NOMEM, "ef_ckpt_save: out of memory building the header");
    }
    if (b.len > CKPT_MAX_HEADER) {
        ef_free(b.s);
        return ef_error(EF_ERR_ARG,
                        "ef_ckpt_save: the header would be %zu bytes, beyond the "
                        "format's limit of %llu (metadata too large?)",
                        b.len, CKPT_MAX_HEADER);
    }
    *out = b.s, *n = b.len;
    return EF_OK;
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, p, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO; /* no progress and no reason: do not spin */
            return -1;
        }
        p += w, n -= (size_t)w;
    }
    return 0;
}

/* The folder of `path` ("." for a bare name). malloc'd. */
static char *folder_of(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t n = !slash ? 0 : slash == path ? 1 : (size_t)(slash - path);
    char *d = ef_mem_malloc(n ? n + 1 : 2);
    if (d && n)
        memcpy(d, path, n), d[n] = '\0';
    else if (d)
        strcpy(d, ".");
    return d;
}

ef_status ef_ckpt_save(const ef_params *p, const char *path, const ef_ckpt_meta *meta, int n_meta) {
    if (!p || !p->data) return ef_error(EF_ERR_ARG, "ef_ckpt_save: table is NULL or unallocated");
    if (!path || !path[0]) return ef_error(EF_ERR_ARG, "ef_ckpt_save: path is NULL or empty");
    ef_status st = check_meta(meta, n_meta);
    if (st != EF_OK) return st;
    char *header = NULL;
    size_t hlen = 0;
    if ((st = build_header(p, meta, n_meta, &header, &hlen)) != EF_OK) return st;

    /* the temporary file: next to the target (rename is atomic only within one file system),
     * created exclusively so that concurrent writers never share one */
    static atomic_uint counter;
    size_t tlen = strlen(path) + 64;
    char *tmp = ef_mem_malloc(tlen);
    /* the folder, for the sync after the rename: allocated now, since once the file is renamed
     * the save has happened and must not be reported as failed for want of memory */
    char *dir = tmp ? folder_of(path) : NULL;
    if (!dir) {
        ef_free(header), ef_free(tmp);
        return ef_error(EF_ERR_NOMEM, "ef_ckpt_save: out of memory");
    }
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
        snprintf(tmp, tlen, "%s.tmp-%ld-%u", path, (long)getpid(), atomic_fetch_add(&counter, 1));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) {
        st = ef_error(EF_ERR_IO,
                      "cannot write checkpoint '%s': creating the temporary file '%s' "
                      "failed: %s",
                      path, tmp, strerror(errno));
        ef_free(header), ef_free(tmp), ef_free(dir);
        return st;
    }

    const char *step = "writing";
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    int bad = write_all(fd, len8, 8) || write_all(fd, header, hlen);
    for (int i = 0; i < p->n && !bad; i++)
        bad = write_all(fd, p->data + p->t[i].offset, p->t[i].numel * sizeof(float));
    if (!bad) step = "syncing", bad = fsync(fd) != 0;
    int err = errno;
    if (close(fd) != 0 && !bad) step = "closing", bad = 1, err = errno;
    if (!bad) step = "renaming", bad = rename(tmp, path) != 0, err = errno;
    ef_free(header);
    if (bad) {
        unlink(tmp);
        st = ef_error(EF_ERR_IO,
                      "cannot write checkpoint '%s': %s the temporary file '%s' "
                      "failed: %s",
                      path, step, tmp, strerror(err));
        ef_free(tmp), ef_free(dir);
        return st;
    }
    ef_free(tmp);

    /* the rename is durable once the folder's entry is on disk */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* EINVAL: a file system that cannot sync folders; there is nothing more to do */
    if (dfd < 0 || (fsync(dfd) != 0 && errno != EINVAL)) {
        err = errno;
        st = ef_error(EF_ERR_IO,
                      "checkpoint '%s' was written but its folder '%s' could not be "
                      "synced: %s",
                      path, dir, strerror(err));
    }
    if (dfd >= 0) close(dfd);
    ef_free(dir);
    if (st == EF_OK) ef_clear_error();
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------------------------- */

/* One tensor entry of a header. */
typedef struct entry {
    const char *name;   /* the header's key (in the cJSON tree) */
    const cJSON *shape; /* the JSON array, for messages */
    int ndim;           /* -1 beyond EF_PARAM_MAX_DIMS (then it matches no table tensor) */
    int64_t dims[EF_PARAM_MAX_DIMS];
    uint64_t begin, end; /* byte offsets in the data section */
    int matched;         /* table index, during load */
} entry;

typedef struct ckpt_file {
    const char *path;
    int fd;
    uint64_t size, hlen; /* file size, header length N */
    char *header;        /* [hlen + 1] */
    cJSON *root;
    const cJSON *meta; /* the __metadata__ object, or NULL */
    entry *e;          /* [n] sorted by name */
    int *order;        /* [n] indices of e sorted by (begin, end) */
    int n;
} ckpt_file;

static void ckpt_close(ckpt_file *f) {
    if (f->fd >= 0) close(f->fd);
    cJSON_Delete(f->root);
    ef_free(f->header);
    ef_free(f->e);
    ef_free(f->order);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

static int read_at(int fd, void *buf, size_t n, uint64_t off) {
    char *p = buf;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t r = pread(fd, p, chunk, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) {
            errno = EIO; /* the file shrank since it was validated */
            return -1;
        }
        p += r, n -= (size_t)r, off += (uint64_t)r;
    }
    return 0;
}

/* A JSON number that is an integer in [0, 2^53]. */
static int json_uint(const cJSON *x, uint64_t *v) {
    if (!cJSON_IsNumber(x)) return 0;
    double d = x->valuedouble;
    if (!(d >= 0.0 && d <= CKPT_MAX_INT) || d != (double)(uint64_t)d) return 0;
    *v = (uint64_t)d;
    return 1;
}

/* qsort has no context argument: the offset order is sorted through this thread's entries */
static _Thread_local const entry *sort_entries;

static int cmp_offset(const void *a, const void *b) {
    const entry *x = &sort_entries[*(const int *)a], *y = &sort_entries[*(const int *)b];
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The shape of an entry as text ("[2,3]"), for messages. */
static void shape_text(const entry *e, char *buf, size_t cap) {
    char *s = cJSON_PrintUnformatted(e->shape);
    snprintf(buf, cap, "%s", s ? s : "?");
    ef_free(s);
}

/* One tensor entry: {"dtype": "F32", "shape": [...], "data_offsets": [b, e]}, nothing else. */
static ef_status parse_entry(ckpt_file *f, const cJSON *item, entry *e) {
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return ef_error(EF_ERR_FORMAT, "checkpoint '%s': tensor '%.100s' is not a JSON object",
                        f->path, name);
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL;
    for (const cJSON *m = item->child; m; m = m->next) {
        const cJSON **slot = strcmp(m->string, "dtype") == 0          ? &dtype
                             : strcmp(m->string, "shape") == 0        ? &shape
                             : strcmp(m->string, "data_offsets") == 0 ? &offs
                                                                      : NULL;
        if (!slot)
            return ef_error(EF_ERR_FORMAT,
                            "checkpoint '%s': tensor '%.100s' has an unknown field "
                            "'%.100s'",
                            f->path, name, m->string);
        if (*slot)
            return ef_error(EF_ERR_FORMAT, "checkpoint '%s': tensor '%.100s' has field '%s' twice",
                            f->path, name, m->string);
        *slot = m;
    }
    if (!dtype || !shape || !offs)
        return ef_error(EF_ERR_FORMAT, "checkpoint '%s': tensor '%.100s' lacks its '%s' field",
                        f->path, name,
                        !dtype   ? "dtype"
                        : !shape ? "shape"
                                 : "data_offsets");
    if (!cJSON_IsString(dtype))
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s' has a dtype that is not a "
                        "string",
                        f->path, name);
    if (strcmp(dtype->valuestring, "F32") != 0)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s' has dtype '%.20s'; "
                        "eformer checkpoints hold F32 only",
                        f->path, name, dtype->valuestring);
    e->name = name;
    e->shape = shape;
    if (!cJSON_IsArray(shape))
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s' has a shape that is not "
                        "an array",
                        f->path, name);
    int nd = cJSON_GetArraySize(shape);
    e->ndim = nd <= EF_PARAM_MAX_DIMS ? nd : -1;
    uint64_t numel = 1;
    int d = 0;
    for (const cJSON *x = shape->child; x; x = x->next, d++) {
        uint64_t v;
        if (!json_uint(x, &v))
            return ef_error(EF_ERR_FORMAT,
                            "checkpoint '%s': tensor '%.100s': shape dimension %d "
                            "is not a non-negative integer",
                            f->path, name, d);
        if (v != 0 && numel > (((uint64_t)1 << 61) / v))
            return ef_error(EF_ERR_FORMAT, "checkpoint '%s': tensor '%.100s': shape is too large",
                            f->path, name);
        numel *= v;
        if (d < EF_PARAM_MAX_DIMS) e->dims[d] = (int64_t)v;
    }
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(offs->child, &e->begin) || !json_uint(offs->child->next, &e->end))
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s': data_offsets must be "
                        "two non-negative integers [begin, end]",
                        f->path, name);
    if (e->end < e->begin)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s': data_offsets [%llu, "
                        "%llu] are reversed",
                        f->path, name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end - e->begin != numel * 4) {
        char sh[128];
        shape_text(e, sh, sizeof sh);
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': tensor '%.100s': data_offsets [%llu, "
                        "%llu] span %llu bytes but shape %s of F32 needs %llu",
                        f->path, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                        (unsigned long long)(e->end - e->begin), sh,
                        (unsigned long long)(numel * 4));
    }
    e->matched = -1;
    return EF_OK;
}

/* Opens and validates `path` as a safetensors file of F32 tensors, independently of any table:
 * framing, header JSON, metadata, every entry, and the entries' cover of the data section. */
static ef_status ckpt_open(ckpt_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->path = path;
    json_hooks();
    if (!path || !path[0]) return ef_error(EF_ERR_ARG, "checkpoint path is NULL or empty");
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0)
        return ef_error(EF_ERR_IO, "cannot open checkpoint '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(f->fd, &sb) != 0)
        return ef_error(EF_ERR_IO, "cannot stat checkpoint '%s': %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return ef_error(EF_ERR_IO, "checkpoint '%s' is not a regular file", path);
    f->size = (uint64_t)sb.st_size;
    if (f->size < 8)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s' is %llu bytes, shorter than the 8-byte "
                        "header length (truncated file?)",
                        path, (unsigned long long)f->size);
    unsigned char len8[8];
    if (read_at(f->fd, len8, 8, 0) != 0)
        return ef_error(EF_ERR_IO, "cannot read checkpoint '%s': %s", path, strerror(errno));
    for (int i = 7; i >= 0; i--) f->hlen = (f->hlen << 8) | len8[i];
    if (f->hlen > f->size - 8)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': header length %llu is beyond the end of "
                        "the file (%llu bytes; truncated file or not a safetensors "
                        "file)",
                        path, (unsigned long long)f->hlen, (unsigned long long)f->size);
    if (f->hlen > CKPT_MAX_HEADER)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': header length %llu exceeds the format's "
                        "limit of %llu bytes",
                        path, (unsigned long long)f->hlen, CKPT_MAX_HEADER);
    f->header = ef_mem_malloc((size_t)f->hlen + 1);
    if (!f->header)
        return ef_error(EF_ERR_NOMEM, "checkpoint '%s': out of memory for a %llu-byte header", path,
                        (unsigned long long)f->hlen);
    if (read_at(f->fd, f->header, (size_t)f->hlen, 8) != 0)
        return ef_error(EF_ERR_IO, "cannot read checkpoint '%s': %s", path, strerror(errno));
    f->header[f->hlen] = '\0';

    /* the header: one JSON object (first byte '{', as the reference reader requires), UTF-8,
     * then only whitespace */
    size_t bad = 0;
    if (f->hlen == 0 || f->header[0] != '{')
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': header is not a JSON object (it does not "
                        "start with '{')",
                        path);
    if (!utf8_valid((const unsigned char *)f->header, (size_t)f->hlen, &bad))
        return ef_error(EF_ERR_FORMAT, "checkpoint '%s': header is not valid UTF-8 (byte %zu)",
                        path, bad);
    const char *end = NULL;
    unsigned long failures = ef_alloc_failures();
    f->root = cJSON_ParseWithLengthOpts(f->header, (size_t)f->hlen, &end, 0);
    if (!f->root && ef_alloc_failures() != failures)
        return ef_error(EF_ERR_NOMEM, "checkpoint '%s': out of memory parsing the %llu-byte header",
                        path, (unsigned long long)f->hlen);
    if (!f->root)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s': header is not valid JSON (parse error "
                        "near byte %lld of %llu)",
                        path, end ? (long long)(end - f->header) : -1LL,
                        (unsigned long long)f->hlen);
    for (const char *c = end; c < f->header + f->hlen; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r')
            return ef_error(EF_ERR_FORMAT,
                            "checkpoint '%s': header is not valid JSON (unexpected "
                            "bytes after the object at byte %lld)",
                            path, (long long)(c - f->header));
    if (!cJSON_IsObject(f->root))
        return ef_error(EF_ERR_FORMAT, "checkpoint '%s': header is not a JSON object", path);

    int n = 0;
    for (const cJSON *it = f->root->child; it; it = it->next) n++;
    f->e = ef_mem_calloc(n > 0 ? (size_t)n : 1, sizeof(entry));
    if (!f->e) return ef_error(EF_ERR_NOMEM, "checkpoint '%s': out of memory", path);
    for (const cJSON *it = f->root->child; it; it = it->next) {
        if (strcmp(it->string, "__metadata__") == 0) {
            if (f->meta)
                return ef_error(EF_ERR_FORMAT, "checkpoint '%s': '__metadata__' appears twice",
                                path);
            if (!cJSON_IsObject(it))
                return ef_error(EF_ERR_FORMAT,
                                "checkpoint '%s': '__metadata__' is not a JSON "
                                "object",
                                path);
            int nm = 0;
            for (const cJSON *m = it->child; m; m = m->next, nm++)
                if (!cJSON_IsString(m))
                    return ef_error(EF_ERR_FORMAT,
                                    "checkpoint '%s': metadata value of '%.100s' "
                                    "is not a string",
                                    path, m->string);
            f->meta = it;
            if (nm > 1) {
                const char **keys = ef_mem_malloc((size_t)nm * sizeof *keys);
                if (!keys) return ef_error(EF_ERR_NOMEM, "checkpoint '%s': out of memory", path);
                nm = 0;
                for (const cJSON *m = it->child; m; m = m->next) keys[nm++] = m->string;
                qsort(keys, (size_t)nm, sizeof *keys, cmp_str);
                for (int i = 1; i < nm; i++)
                    if (strcmp(keys[i - 1], keys[i]) == 0) {
                        ef_status st = ef_error(EF_ERR_FORMAT,
                                                "checkpoint '%s': metadata key "
                                                "'%.100s' appears twice",
                                                path, keys[i]);
                        ef_free(keys);
                        return st;
                    }
                ef_free(keys);
            }
            continue;
        }
        ef_status st = parse_entry(f, it, &f->e[f->n]);
        if (st != EF_OK) return st;
        f->n++;
    }
    if (f->n > 1) {
        qsort(f->e, (size_t)f->n, sizeof(entry), cmp_entry_name);
        for (int i = 1; i < f->n; i++)
            if (strcmp(f->e[i - 1].name, f->e[i].name) == 0)
                return ef_error(EF_ERR_FORMAT,
                                "checkpoint '%s': tensor '%.100s' appears twice in "
                                "the header",
                                path, f->e[i].name);
    }

    /* the data section is covered exactly: the file ends where the last tensor ends, and the
     * tensors, sorted by offset, neither overlap nor leave gaps */
    uint64_t avail = f->size - 8 - f->hlen, data_end = 0;
    const entry *last = NULL;
    for (int i = 0; i < f->n; i++)
        if (f->e[i].end >= data_end) data_end = f->e[i].end, last = &f->e[i];
    if (data_end > avail)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s' is truncated: its data section holds %llu "
                        "bytes but tensor '%.100s' ends at byte %llu",
                        path, (unsigned long long)avail, last->name, (unsigned long long)data_end);
    if (avail > data_end)
        return ef_error(EF_ERR_FORMAT,
                        "checkpoint '%s' has %llu trailing bytes after the tensor "
                        "data (file size %llu, expected 8 + %llu + %llu)",
                        path, (unsigned long long)(avail - data_end), (unsigned long long)f->size,
                        (unsigned long long)f->hlen, (unsigned long long)data_end);
    f->order = ef_mem_malloc((f->n > 0 ? (size_t)f->n : 1) * sizeof(int));
    if (!f->order) return ef_error(EF_ERR_NOMEM, "checkpoint '%s': out of memory", path);
    for (int i = 0; i < f->n; i++) f->order[i] = i;
    sort_entries = f->e;
    qsort(f->order, (size_t)f->n, sizeof(int), cmp_offset);
    uint64_t pos = 0;
    for (int i = 0; i < f->n; i++) {
        const entry *e = &f->e[f->order[i]];
        if (e->begin < pos) {
            const entry *prev = &f->e[f->order[i - 1]];
            return ef_error(EF_ERR_FORMAT,
                            "checkpoint '%s': tensors '%.100s' [%llu, %llu) and "
                            "'%.100s' [%llu, %llu) overlap",
                            path, prev->name, (unsigned long long)prev->begin,
                            (unsigned long long)prev->end, e->name, (unsigned long long)e->begin,
                            (unsigned long long)e->end);
        }
        if (e->begin > pos)
            return ef_error(EF_ERR_FORMAT,
                            "checkpoint '%s': %llu unused bytes before tensor "
                            "'%.100s' (at byte %llu of the data section)",
                            path, (unsigned long long)(e->begin - pos), e->name,
                            (unsigned long long)pos);
        pos = e->end;
    }
    return EF_OK;
}

static void table_shape_text(const ef_param *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->ndim && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, d ? ",%lld" : "%lld", (long long)t->shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

ef_status ef_ckpt_load(ef_params *p, const char *path) {
    if (!p || !p->data) return ef_error(EF_ERR_ARG, "ef_ckpt_load: table is NULL or unallocated");
    ckpt_file f;
    ef_status st = ckpt_open(&f, path);
    if (st != EF_OK) {
        ckpt_close(&f);
        return st;
    }
    /* every table tensor has an entry of the same shape (entries are sorted by name and
     * unique), and no entry is left over */
    for (int j = 0; j < p->n && st == EF_OK; j++) {
        const ef_param *t = &p->t[j];
        entry key = {.name = t->name};
        entry *e = f.n ? bsearch(&key, f.e, (size_t)f.n, sizeof(entry), cmp_entry_name) : NULL;
        if (!e) {
            st = ef_error(EF_ERR_FORMAT,
                          "checkpoint '%s' lacks tensor '%s' (it has %d tensors, "
                          "the model's table %d)",
                          path, t->name, f.n, p->n);
            break;
        }
        e->matched = j;
        int same = e->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = e->dims[d] == t->shape[d];
        if (!same) {
            char fs[128], ts[128];
            shape_text(e, fs, sizeof fs);
            table_shape_text(t, ts, sizeof ts);
            st = ef_error(EF_ERR_FORMAT,
                          "checkpoint '%s': tensor '%s' has shape %s, the model's "
                          "table expects %s",
                          path, t->name, fs, ts);
        }
    }
    for (int i = 0; i < f.n && st == EF_OK; i++)
        if (f.e[i].matched < 0)
            st = ef_error(EF_ERR_FORMAT,
                          "checkpoint '%s' has tensor '%.100s', which the model's "
                          "table does not have",
                          path, f.e[i].name);
    /* validated: now the values, in file order */
    uint64_t base = 8 + f.hlen;
    for (int i = 0; i < f.n && st == EF_OK; i++) {
        const entry *e = &f.e[f.order[i]];
        const ef_param *t = &p->t[e->matched];
        if (read_at(f.fd, p->data + t->offset, t->numel * sizeof(float), base + e->begin) != 0)
            st = ef_error(EF_ERR_IO, "cannot read checkpoint '%s' (tensor '%s'): %s", path, t->name,
                          strerror(errno));
    }
    ckpt_close(&f);
    if (st == EF_OK) ef_clear_error();
    return st;
}

ef_status ef_ckpt_read_meta(const char *path, const char *key, char **value) {
    if (!value || !key) return ef_error(EF_ERR_ARG, "ef_ckpt_read_meta: NULL argument");
    *value = NULL;
    ckpt_file f;
    ef_status st = ckpt_open(&f, path);
    if (st == EF_OK) {
        const cJSON *v = f.meta ? cJSON_GetObjectItemCaseSensitive(f.meta, key) : NULL;
        if (!v) {
            st = ef_error(EF_ERR_FORMAT, "checkpoint '%s' has no metadata key '%.100s'", path, key);
        } else {
            size_t n = strlen(v->valuestring);
            *value = ef_mem_malloc(n + 1);
            if (!*value)
                st = ef_error(EF_ERR_NOMEM, "ef_ckpt_read_meta: out of memory");
            else
                memcpy(*value, v->valuestring, n + 1);
        }
    }
    ckpt_close(&f);
    if (st == EF_OK) ef_clear_error();
    return st;
}

#endif /* EF_HAVE_CJSON */
