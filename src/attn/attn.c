/*
 * attn.c - the public attention API: spec parsing, plan creation, dispatch to a mechanism's
 * fast or reference path, parameters, and the registry queries.
 *
 * Spec grammar:  spec  := name [ ':' opt { ',' opt } ]      opt := key '=' value
 * Names, keys and values contain no spaces. Each key may be given once. Every failure names
 * the offending text.
 */
#include "attn/attn.h"

#include <errno.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Options every mechanism takes (DESIGN.md). Their values live in struct ef_attn fields. */
enum { COMMON_CAUSAL, COMMON_SCALE, COMMON_SEED, COMMON_REF, N_COMMON };
static const ef_opt_desc common_opts[N_COMMON] = {
    {"causal", EF_OPT_BOOL, "0", 0, 1, NULL, 0, "query i sees key j only when j <= i (top-left)"},
    {"scale", EF_OPT_FLOAT, "auto", 1e-30, 1e30, NULL, 1, "logit scale; auto = 1/sqrt(head_dim)"},
    {"seed", EF_OPT_INT, "0", 0, 9.2233720368547758e18, NULL, 0,
     "seed of every random draw (counter-based: reproducible in any thread)"},
    {"ref", EF_OPT_BOOL, "0", 0, 1, NULL, 0, "run the slow, obviously-correct reference path"},
};

/* ---------------------------------------------------------------------------------------------
 * Registry queries
 * ------------------------------------------------------------------------------------------- */
const ef_attn_ops *ef_attn_find(const char *name) {
    for (int i = 0; i < ef_attn_registry_count; i++)
        if (strcmp(ef_attn_registry[i]->name, name) == 0) return ef_attn_registry[i];
    return NULL;
}

int ef_attn_count(void) { return ef_attn_registry_count; }

const char *ef_attn_name(int i) {
    return i >= 0 && i < ef_attn_registry_count ? ef_attn_registry[i]->name : NULL;
}

ef_status ef_attn_random_features(const ef_attn *a, float *out, size_t n, size_t *count) {
    if (!a || !count)
        return ef_error(EF_ERR_ARG, "ef_attn_random_features: %s is NULL", !a ? "plan" : "count");
    *count = 0;
    if (!a->ops->features)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "ef_attn_random_features: %s draws no random projections", a->ops->name);
    ef_status st = a->ops->features(a, NULL, count);
    if (st || !out) return st;
    if (n < *count)
        return ef_error(EF_ERR_ARG, "ef_attn_random_features: n=%zu floats, the projections "
                                    "have %zu", n, *count);
    return a->ops->features(a, out, count);
}

ef_status ef_attn_get_caps(const char *name, ef_attn_caps *caps) {
    if (!name) return ef_error(EF_ERR_ARG, "ef_attn_get_caps: name is NULL");
    if (!caps) return ef_error(EF_ERR_ARG, "ef_attn_get_caps: caps is NULL");
    const ef_attn_ops *ops = ef_attn_find(name);
    if (!ops) return ef_error(EF_ERR_ARG, "ef_attn_get_caps: unknown mechanism '%s'", name);
    *caps = ops->caps;
    ef_clear_error();
    return EF_OK;
}

int ef_attn_opt_index(const ef_attn_ops *ops, const char *key) {
    for (int i = 0; i < ops->n_opts; i++)
        if (strcmp(ops->opts[i].key, key) == 0) return i;
    return -1;
}

static void append(char *buf, size_t cap, size_t *len, const char *fmt, ...) EF_PRINTF(4, 5);
static void append(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
    if (*len >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n > 0) *len = EF_MIN(cap - 1, *len + (size_t)n);
}

static void describe_opt(char *buf, size_t cap, size_t *len, const ef_opt_desc *d) {
    append(buf, cap, len, "  %-10s default %-8s ", d->key, d->def);
    switch (d->type) {
    case EF_OPT_INT:
        if (d->max >= 9e18)
            append(buf, cap, len, "[%.0f..2^64-1] ", d->min); /* the seed */
        else
            append(buf, cap, len, "[%.0f..%.0f]%s ", d->min, d->max,
                   d->allow_auto ? " or auto" : "");
        break;
    case EF_OPT_FLOAT:
        append(buf, cap, len, "[%g..%g]%s ", d->min, d->max, d->allow_auto ? " or auto" : "");
        break;
    case EF_OPT_BOOL: append(buf, cap, len, "0|1 "); break;
    case EF_OPT_ENUM: append(buf, cap, len, "%s ", d->choices); break;
    case EF_OPT_LIST: append(buf, cap, len, "list a;b;c in [%.0f..%.0f] ", d->min, d->max); break;
    }
    append(buf, cap, len, " %s\n", d->help);
}

const char *ef_attn_help(const char *name) {
    static _Thread_local char buf[8192];
    if (!name) return NULL;
    const ef_attn_ops *ops = ef_attn_find(name);
    if (!ops) return NULL;
    size_t len = 0;
    buf[0] = '\0';
    append(buf, sizeof buf, &len, "%s - %s\n", ops->name, ops->summary);
    if (ops->notes) append(buf, sizeof buf, &len, "%s\n", ops->notes);
    const ef_attn_caps *c = &ops->caps;
    append(buf, sizeof buf, &len, "abilities:%s%s%s%s%s%s%s%s\n",
           c->causal ? " causal" : " non-causal only", c->cross ? ", q_len != kv_len" : "",
           c->decode ? ", decoding" : "", c->params ? ", learned parameters" : "",
           c->exact ? ", exact on its pattern" : ", approximate", c->random ? ", seeded draws" : "",
           c->discrete ? ", discrete choices (hashes/clusters)" : "",
           c->shared_qk ? ", keys from q (k ignored)" : "");
    append(buf, sizeof buf, &len, "options:\n");
    for (int i = 0; i < ops->n_opts; i++) describe_opt(buf, sizeof buf, &len, &ops->opts[i]);
    for (int i = 0; i < N_COMMON; i++) describe_opt(buf, sizeof buf, &len, &common_opts[i]);
    return buf;
}

/* ---------------------------------------------------------------------------------------------
 * Parsing one value
 * ------------------------------------------------------------------------------------------- */
static ef_status parse_int(const char *mech, const ef_opt_desc *d, const char *s, int64_t *out) {
    errno = 0;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno == ERANGE)
        return ef_error(EF_ERR_ARG, "%s: option %s=%s is not an integer", mech, d->key, s);
    if ((double)v < d->min || (double)v > d->max)
        return ef_error(EF_ERR_ARG, "%s: option %s=%s is out of range [%.0f, %.0f]", mech, d->key,
                        s, d->min, d->max);
    *out = v;
    return EF_OK;
}

static ef_status parse_value(const char *mech, const ef_opt_desc *d, const char *s, ef_opt_val *v) {
    memset(v, 0, sizeof *v);
    if (d->allow_auto && strcmp(s, "auto") == 0) {
        v->is_auto = 1;
        return EF_OK;
    }
    switch (d->type) {
    case EF_OPT_INT: return parse_int(mech, d, s, &v->i);
    case EF_OPT_FLOAT: {
        errno = 0;
        char *end = NULL;
        double x = strtod(s, &end);
        if (*s == '\0' || *end != '\0' || errno == ERANGE || !isfinite(x))
            return ef_error(EF_ERR_ARG, "%s: option %s=%s is not a finite number%s", mech, d->key,
                            s, d->allow_auto ? " (or auto)" : "");
        /* the range is checked on the value as stored (a float), so a described plan parses back */
        if ((float)x < (float)d->min || (float)x > (float)d->max)
            return ef_error(EF_ERR_ARG, "%s: option %s=%s is out of range [%g, %g]", mech, d->key,
                            s, d->min, d->max);
        v->f = x;
        return EF_OK;
    }
    case EF_OPT_BOOL:
        if (!strcmp(s, "1") || !strcmp(s, "true"))
            v->i = 1;
        else if (!strcmp(s, "0") || !strcmp(s, "false"))
            v->i = 0;
        else
            return ef_error(EF_ERR_ARG, "%s: option %s=%s must be 0 or 1", mech, d->key, s);
        return EF_OK;
    case EF_OPT_ENUM: {
        size_t n = strlen(s);
        const char *c = d->choices;
        for (int idx = 0; c && *c; idx++) {
            const char *bar = strchr(c, '|');
            size_t len = bar ? (size_t)(bar - c) : strlen(c);
            if (n > 0 && len == n && strncmp(c, s, n) == 0) {
                v->i = idx;
                return EF_OK;
            }
            c = bar ? bar + 1 : c + len;
        }
        return ef_error(EF_ERR_ARG, "%s: option %s=%s must be one of %s", mech, d->key, s,
                        d->choices);
    }
    case EF_OPT_LIST: {
        char item[64];
        const char *p = s;
        v->i = 0;
        if (*p == '\0') return EF_OK;
        v->f = strchr(s, ';') != NULL; /* "5" and "5;" differ: a count or a one-item list */
        for (;;) {
            const char *semi = strchr(p, ';');
            size_t len = semi ? (size_t)(semi - p) : strlen(p);
            if (len == 0 && !semi && v->i == 1) break; /* "17;": a single item */
            if (len == 0 || len >= sizeof item)
                return ef_error(EF_ERR_ARG, "%s: option %s=%s has an empty or too long item", mech,
                                d->key, s);
            if (v->i >= EF_OPT_LIST_MAX)
                return ef_error(EF_ERR_ARG, "%s: option %s has more than %d items", mech, d->key,
                                EF_OPT_LIST_MAX);
            memcpy(item, p, len);
            item[len] = '\0';
            ef_status st = parse_int(mech, d, item, &v->list[v->i]);
            if (st) return st;
            v->i++;
            if (!semi) break;
            p = semi + 1;
        }
        return EF_OK;
    }
    }
    return ef_error(EF_ERR_ARG, "%s: option %s has an unknown type", mech, d->key);
}

static void format_value(char *buf, size_t cap, size_t *len, const ef_opt_desc *d,
                         const ef_opt_val *v) {
    if (v->is_auto) {
        append(buf, cap, len, "auto");
        return;
    }
    switch (d->type) {
    case EF_OPT_INT:
    case EF_OPT_BOOL: append(buf, cap, len, "%lld", (long long)v->i); break;
    case EF_OPT_FLOAT: append(buf, cap, len, "%.9g", v->f); break;
    case EF_OPT_ENUM: {
        const char *c = d->choices;
        for (int64_t idx = 0; idx < v->i; idx++) c = strchr(c, '|') + 1;
        const char *bar = strchr(c, '|');
        append(buf, cap, len, "%.*s", (int)(bar ? (size_t)(bar - c) : strlen(c)), c);
        break;
    }
    case EF_OPT_LIST:
        for (int64_t idx = 0; idx < v->i; idx++)
            append(buf, cap, len, "%s%lld", idx ? ";" : "", (long long)v->list[idx]);
        if (v->i == 1 && v->f) append(buf, cap, len, ";");
        break;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Plans
 * ------------------------------------------------------------------------------------------- */
static ef_status check_shape(const ef_attn_shape *s) {
    const struct {
        const char *name;
        int v;
    } f[] = {{"batch", s->batch},   {"heads", s->heads},       {"q_len", s->q_len},
             {"kv_len", s->kv_len}, {"head_dim", s->head_dim}, {"v_dim", s->v_dim}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        if (f[i].v < 1)
            return ef_error(EF_ERR_SHAPE, "shape: %s=%d must be >= 1", f[i].name, f[i].v);
        /* the mechanisms round sizes up to tiles, blocks and chunks (x + w - 1 with options
         * up to 2^30) in int: every size stays at most 2^30, so no such sum overflows */
        if (f[i].v > EF_ATTN_MAX_DIM)
            return ef_error(EF_ERR_SHAPE, "shape: %s=%d is too large (at most 2^30 = %d)",
                            f[i].name, f[i].v, EF_ATTN_MAX_DIM);
    }
    /* every tensor has at most 2^48 elements (1 PiB of fp32), so that the byte counts the
     * mechanisms derive from them (saved records, workspace: a few times a tensor's size, or a
     * tensor's rows times a few small factors) stay far from 2^64; and the dense N x M scores
     * (full's saved probabilities) are indexable with int64 and size_t */
    double bh = (double)s->batch * s->heads;
    double big = EF_MAX(EF_MAX(s->q_len, s->kv_len), 1) * (double)EF_MAX(s->head_dim, s->v_dim);
    if (bh * big > EF_ATTN_MAX_ELEMS || bh * s->q_len * (double)s->kv_len > 4.0e18)
        return ef_error(EF_ERR_SHAPE,
                        "shape: batch=%d heads=%d q_len=%d kv_len=%d head_dim=%d v_dim=%d is too "
                        "large (a tensor beyond 2^48 elements or B*H*N*M beyond 4e18)",
                        s->batch, s->heads, s->q_len, s->kv_len, s->head_dim, s->v_dim);
    return EF_OK;
}

static ef_status build_desc(ef_attn *a) {
    char buf[4096];
    size_t len = 0;
    const ef_attn_ops *ops = a->ops;
    append(buf, sizeof buf, &len, "%s:", ops->name);
    for (int i = 0; i < ops->n_opts; i++) {
        append(buf, sizeof buf, &len, "%s=", ops->opts[i].key);
        format_value(buf, sizeof buf, &len, &ops->opts[i], &a->opt[i]);
        append(buf, sizeof buf, &len, ",");
    }
    append(buf, sizeof buf, &len, "causal=%d,scale=", a->causal);
    if (a->scale_auto)
        append(buf, sizeof buf, &len, "auto");
    else
        append(buf, sizeof buf, &len, "%.9g", a->scale);
    append(buf, sizeof buf, &len, ",seed=%llu,ref=%d", (unsigned long long)a->seed, a->ref);
    a->desc = ef_mem_malloc(len + 1);
    if (!a->desc) return ef_error(EF_ERR_NOMEM, "out of memory for the plan description");
    memcpy(a->desc, buf, len + 1);
    return EF_OK;
}

/* Parses "name:k=v,..." into a (ops, opt[], common fields). */
static ef_status parse_spec(ef_attn *a, const char *spec) {
    char buf[1024];
    size_t n = strlen(spec);
    if (n == 0) return ef_error(EF_ERR_FORMAT, "empty spec: expected name[:key=value,...]");
    if (n >= sizeof buf)
        return ef_error(EF_ERR_FORMAT, "spec longer than %zu characters", sizeof buf - 1);
    memcpy(buf, spec, n + 1);
    for (size_t i = 0; i < n; i++)
        if (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n')
            return ef_error(EF_ERR_FORMAT, "spec '%s': white space at position %zu", spec, i);
    char *colon = strchr(buf, ':');
    if (colon) *colon = '\0';
    if (buf[0] == '\0')
        return ef_error(EF_ERR_FORMAT, "spec '%s': no mechanism name before ':'", spec);
    a->ops = ef_attn_find(buf);
    if (!a->ops) {
        char names[512];
        size_t len = 0;
        names[0] = '\0';
        for (int i = 0; i < ef_attn_registry_count; i++)
            append(names, sizeof names, &len, "%s%s", i ? ", " : "", ef_attn_registry[i]->name);
        return ef_error(EF_ERR_ARG, "unknown mechanism '%s' (known: %s)", buf, names);
    }
    const ef_attn_ops *ops = a->ops;
    if (ops->n_opts > EF_MAX_OPTS)
        return ef_error(EF_ERR_UNSUPPORTED, "%s: too many options", ops->name);

    /* defaults first */
    int given[EF_MAX_OPTS + N_COMMON] = {0};
    ef_opt_val common[N_COMMON];
    for (int i = 0; i < ops->n_opts; i++) {
        ef_status st = parse_value(ops->name, &ops->opts[i], ops->opts[i].def, &a->opt[i]);
        if (st) return st;
    }
    for (int i = 0; i < N_COMMON; i++) {
        ef_status st = parse_value(ops->name, &common_opts[i], common_opts[i].def, &common[i]);
        if (st) return st;
    }

    if (colon) {
        char *p = colon + 1;
        if (*p == '\0') return ef_error(EF_ERR_FORMAT, "spec '%s': nothing after ':'", spec);
        for (;;) {
            char *comma = strchr(p, ',');
            if (comma) *comma = '\0';
            char *eq = strchr(p, '=');
            if (*p == '\0')
                return ef_error(EF_ERR_FORMAT, "spec '%s': empty option (stray ',')", spec);
            if (!eq)
                return ef_error(EF_ERR_FORMAT, "spec '%s': option '%s' has no '=value'", spec, p);
            *eq = '\0';
            const char *key = p, *val = eq + 1;
            if (*key == '\0')
                return ef_error(EF_ERR_FORMAT, "spec '%s': '=%s' has no key", spec, val);
            if (*val == '\0')
                return ef_error(EF_ERR_FORMAT, "spec '%s': option '%s=' has no value", spec, key);
            int idx = ef_attn_opt_index(ops, key);
            const ef_opt_desc *d;
            ef_opt_val *dst;
            int slot;
            if (idx >= 0) {
                d = &ops->opts[idx], dst = &a->opt[idx], slot = idx;
            } else {
                int c = 0;
                while (c < N_COMMON && strcmp(common_opts[c].key, key) != 0) c++;
                if (c == N_COMMON) {
                    char keys[512];
                    size_t len = 0;
                    keys[0] = '\0';
                    for (int i = 0; i < ops->n_opts; i++)
                        append(keys, sizeof keys, &len, "%s, ", ops->opts[i].key);
                    for (int i = 0; i < N_COMMON; i++)
                        append(keys, sizeof keys, &len, "%s%s", common_opts[i].key,
                               i + 1 < N_COMMON ? ", " : "");
                    return ef_error(EF_ERR_ARG, "%s: unknown option '%s' (known: %s)", ops->name,
                                    key, keys);
                }
                d = &common_opts[c], dst = &common[c], slot = EF_MAX_OPTS + c;
            }
            if (given[slot])
                return ef_error(EF_ERR_ARG, "%s: option '%s' given twice", ops->name, key);
            given[slot] = 1;
            if (d == &common_opts[COMMON_SEED]) {
                /* the seed is a full 64-bit unsigned value */
                errno = 0;
                char *end = NULL;
                if (val[0] == '-')
                    return ef_error(EF_ERR_ARG, "%s: option seed=%s must be >= 0", ops->name, val);
                unsigned long long s = strtoull(val, &end, 10);
                if (*end != '\0' || errno == ERANGE)
                    return ef_error(EF_ERR_ARG, "%s: option seed=%s is not an integer in [0, 2^64)",
                                    ops->name, val);
                memset(dst, 0, sizeof *dst);
                dst->i = (int64_t)s;
            } else {
                ef_status st = parse_value(ops->name, d, val, dst);
                if (st) return st;
            }
            if (!comma) break;
            p = comma + 1;
        }
    }
    a->causal = (int)common[COMMON_CAUSAL].i;
    a->scale_auto = common[COMMON_SCALE].is_auto;
    a->scale =
        a->scale_auto ? 1.0f / sqrtf((float)a->shape.head_dim) : (float)common[COMMON_SCALE].f;
    a->seed = (uint64_t)common[COMMON_SEED].i;
    a->ref = (int)common[COMMON_REF].i;
    return EF_OK;
}

struct ef_ws_share {
    void *ptr;
    size_t bytes;
    int refs;
};

/* 1 when plans a and b compute with the same options (the seed aside) on the same shape. */
static int same_setup(const ef_attn *a, const ef_attn *b) {
    if (a->ops != b->ops || memcmp(&a->shape, &b->shape, sizeof a->shape) ||
        a->causal != b->causal || a->ref != b->ref || a->scale_auto != b->scale_auto ||
        a->scale != b->scale || a->slots != b->slots)
        return 0;
    for (int i = 0; i < a->ops->n_opts; i++) {
        const ef_opt_val *x = &a->opt[i], *y = &b->opt[i];
        if (x->is_auto != y->is_auto || x->i != y->i || x->f != y->f) return 0;
        if (a->ops->opts[i].type == EF_OPT_LIST &&
            memcmp(x->list, y->list, sizeof(int64_t) * (size_t)EF_MIN(x->i, EF_OPT_LIST_MAX)))
            return 0;
    }
    return 1;
}

void *ef_attn_ws_alloc(ef_attn *a, size_t bytes) {
    if (a->wshare) return ef_malloc(bytes); /* one shareable block per plan */
    const ef_attn *d = a->donor;
    if (d && d->wshare && d->wshare->bytes == bytes && same_setup(a, d)) {
        a->wshare = d->wshare, a->wshare->refs++, a->ws_borrowed = 1;
        return a->wshare->ptr;
    }
    struct ef_ws_share *s = ef_mem_calloc(1, sizeof *s);
    void *ptr = s ? ef_malloc(bytes) : NULL;
    if (!ptr) {
        ef_free(s);
        return NULL;
    }
    s->ptr = ptr, s->bytes = bytes, s->refs = 1;
    a->wshare = s;
    return ptr;
}

void ef_attn_ws_free(ef_attn *a, void *block) {
    if (!block) return;
    if (!a->wshare || block != a->wshare->ptr) {
        ef_free(block);
        return;
    }
    if (--a->wshare->refs == 0) {
        ef_free(a->wshare->ptr);
        ef_free(a->wshare);
    }
    a->wshare = NULL;
}

size_t ef_attn_ws_borrowed_bytes(const ef_attn *a) {
    return a && a->ws_borrowed && a->wshare ? a->wshare->bytes : 0;
}

ef_status ef_attn_new(ef_attn **out, const char *spec, const ef_attn_shape *shape) {
    return ef_attn_new_sharing(out, spec, shape, NULL);
}

ef_status ef_attn_new_sharing(ef_attn **out, const char *spec, const ef_attn_shape *shape,
                              const ef_attn *donor) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_attn_new: out is NULL");
    *out = NULL;
    if (!spec) return ef_error(EF_ERR_ARG, "ef_attn_new: spec is NULL");
    if (!shape) return ef_error(EF_ERR_ARG, "ef_attn_new: shape is NULL");
    ef_status st = check_shape(shape);
    if (st) return st;
    ef_attn *a = ef_mem_calloc(1, sizeof *a);
    if (!a) return ef_error(EF_ERR_NOMEM, "out of memory for a plan");
    a->shape = *shape;
    a->slots = ef_max_threads();
    st = parse_spec(a, spec);
    if (!st && a->ops->param_count) {
        a->n_params = a->ops->param_count(a);
        if (a->n_params > SIZE_MAX / sizeof(float)) { /* its bytes would not fit a size_t */
            st = ef_error(EF_ERR_NOMEM, "%s: %zu%s learned parameters do not fit in memory",
                          a->ops->name, a->n_params, a->n_params == SIZE_MAX ? "+" : "");
            a->n_params = 0;
        } else if (a->n_params) {
            a->params = ef_malloc(a->n_params * sizeof(float));
            a->grads = ef_malloc(a->n_params * sizeof(float));
            if (!a->params || !a->grads)
                st = ef_error(EF_ERR_NOMEM, "out of memory for %zu parameters", a->n_params);
            else
                memset(a->grads, 0, a->n_params * sizeof(float)),
                    memset(a->params, 0, a->n_params * sizeof(float));
        }
    }
    a->donor = donor;
    if (!st && a->ops->init) st = a->ops->init(a);
    a->donor = NULL;
    if (!st && a->ref && !a->ops->ref_forward) st = ef_ref_init(a);
    if (!st) st = build_desc(a);
    if (st) {
        ef_attn_free(a);
        return st;
    }
    ef_clear_error();
    *out = a;
    return EF_OK;
}

void ef_attn_free(ef_attn *a) {
    if (!a) return;
    if (a->ops && a->ops->destroy) a->ops->destroy(a);
    ef_free(a->params);
    ef_free(a->grads);
    ef_free(a->dense_ws);
    ef_free(a->ref_ws);
    ef_free(a->desc);
    ef_free(a);
}

const char *ef_attn_describe(const ef_attn *a) { return a ? a->desc : NULL; }

ef_attn_shape ef_attn_get_shape(const ef_attn *a) {
    ef_attn_shape zero = {0, 0, 0, 0, 0, 0};
    return a ? a->shape : zero;
}

size_t ef_attn_saved_bytes(const ef_attn *a) {
    if (!a) return 0;
    if (a->ref) return a->ops->ref_forward ? a->ops->ref_saved_bytes(a) : 0;
    return a->ops->saved_bytes(a);
}

size_t ef_attn_workspace_bytes(const ef_attn *a) {
    if (!a) return 0;
    return a->ws_bytes + a->dense_ws_bytes + a->ref_ws_bytes + 2 * a->n_params * sizeof(float);
}

int ef_attn_visible(const ef_attn *a, int head, int i, int j) {
    if (!a) {
        ef_error(EF_ERR_ARG, "ef_attn_visible: plan is NULL");
        return -1;
    }
    const ef_attn_shape *s = &a->shape;
    if (head < 0 || head >= s->heads || i < 0 || i >= s->q_len || j < 0 || j >= s->kv_len) {
        ef_error(EF_ERR_ARG,
                 "ef_attn_visible: head=%d i=%d j=%d outside heads=%d q_len=%d kv_len=%d", head, i,
                 j, s->heads, s->q_len, s->kv_len);
        return -1;
    }
    if (a->causal && j > i) return 0;
    return !a->ops->visible || a->ops->visible(a, head, i, j) ? 1 : 0;
}

/* Visible pairs of the top-left causal triangle of an n x m grid, or of the whole grid. */
static int64_t dense_pairs(const ef_attn *a) {
    int64_t n = a->shape.q_len, m = a->shape.kv_len;
    if (!a->causal) return n * m;
    return n <= m ? n * (n + 1) / 2 : m * (m + 1) / 2 + (n - m) * m;
}

int64_t ef_attn_visible_pairs(const ef_attn *a, int head) {
    if (!a) {
        ef_error(EF_ERR_ARG, "ef_attn_visible_pairs: plan is NULL");
        return -1;
    }
    if (head < 0 || head >= a->shape.heads) {
        ef_error(EF_ERR_ARG, "ef_attn_visible_pairs: head=%d outside [0, %d)", head,
                 a->shape.heads);
        return -1;
    }
    return a->ops->pairs ? a->ops->pairs(a, head) : dense_pairs(a);
}

double ef_attn_flops(const ef_attn *a, int backward) {
    if (!a) return 0;
    if (a->ops->flops) return a->ops->flops(a, backward);
    const ef_attn_shape *s = &a->shape;
    /* per visible pair: QK^T and PV forward, 2(D+Dv); backward adds recomputed S, dP, dV, dQ, dK,
     * 2(3D+2Dv). With D = Dv: 4NMD forward, 14NMD forward+backward (FlashAttention's count). */
    double pairs = 0;
    for (int h = 0; h < s->heads; h++) pairs += (double)ef_attn_visible_pairs(a, h);
    pairs *= s->batch;
    double d = s->head_dim, dv = s->v_dim;
    return backward ? pairs * (2 * (3 * d + 2 * dv) + 2 * (d + dv)) : pairs * 2 * (d + dv);
}

/* lens[b] in [0, max] for every sequence b; the message names the array, index and value. */
static ef_status check_lens(const ef_attn *a, const int32_t *lens, const char *what,
                            const char *dim, int max) {
    if (!lens) return EF_OK;
    for (int b = 0; b < a->shape.batch; b++)
        if (lens[b] < 0 || lens[b] > max)
            return ef_error(EF_ERR_ARG, "%s[%d]=%d is outside [0, %s=%d]", what, b, lens[b], dim,
                            max);
    return EF_OK;
}

ef_status ef_attn_check_kv_lens(const ef_attn *a, const int32_t *kv_lens) {
    return check_lens(a, kv_lens, "kv_lens", "kv_len", a->shape.kv_len);
}


static ef_status check_saved(const void *saved, const char *fn) {
    if (saved && (uintptr_t)saved % EF_SAVED_ALIGN != 0)
        return ef_error(EF_ERR_ARG,
                        "%s: saved=%p is not %d-byte aligned (allocate it with ef_malloc)", fn,
                        saved, EF_SAVED_ALIGN);
    return EF_OK;
}

static ef_status check_io(const ef_attn *a, const ef_attn_io *io, const char *fn) {
    if (!a) return ef_error(EF_ERR_ARG, "%s: plan is NULL", fn);
    if (!io) return ef_error(EF_ERR_ARG, "%s: io is NULL", fn);
    if (!io->q) return ef_error(EF_ERR_ARG, "%s: io->q is NULL", fn);
    if (!io->k) return ef_error(EF_ERR_ARG, "%s: io->k is NULL", fn);
    if (!io->v) return ef_error(EF_ERR_ARG, "%s: io->v is NULL", fn);
    ef_status st = ef_attn_check_kv_lens(a, io->kv_lens);
    return st ? st : check_lens(a, io->q_lens, "q_lens", "q_len", a->shape.q_len);
}

ef_status ef_attn_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    ef_status st = check_io(a, io, "ef_attn_forward");
    if (st) return st;
    if (!io->out) return ef_error(EF_ERR_ARG, "ef_attn_forward: io->out is NULL");
    if ((st = check_saved(saved, "ef_attn_forward"))) return st;
    if (a->ref)
        st = a->ops->ref_forward ? a->ops->ref_forward(a, io, saved) : ef_ref_forward(a, io, saved);
    else
        st = a->ops->forward(a, io, saved);
    if (!st) ef_clear_error();
    return st;
}

ef_status ef_attn_forward_replay(ef_attn *a, const ef_attn_io *io, void *saved) {
    ef_status st = check_io(a, io, "ef_attn_forward_replay");
    if (st) return st;
    if (!io->out) return ef_error(EF_ERR_ARG, "ef_attn_forward_replay: io->out is NULL");
    if (!saved && ef_attn_saved_bytes(a) > 0)
        return ef_error(EF_ERR_ARG, "ef_attn_forward_replay: saved is NULL (pass the buffer an "
                                    "earlier training forward filled)");
    if ((st = check_saved(saved, "ef_attn_forward_replay"))) return st;
    ef_status (*replay)(ef_attn *, const ef_attn_io *, void *) =
        a->ref ? a->ops->ref_replay : a->ops->replay;
    if (replay)
        st = replay(a, io, saved);
    else if (a->ops->caps.discrete)
        return ef_error(EF_ERR_UNSUPPORTED, "%s: replaying saved choices is not implemented%s",
                        a->ops->name, a->ref ? " on the reference path" : "");
    else
        return ef_attn_forward(a, io, saved);
    if (!st) ef_clear_error();
    return st;
}

ef_status ef_attn_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                           float *dq, float *dk, float *dv) {
    ef_status st = check_io(a, io, "ef_attn_backward");
    if (st) return st;
    if (!saved && ef_attn_saved_bytes(a) > 0)
        return ef_error(EF_ERR_ARG,
                        "ef_attn_backward: saved is NULL (pass the buffer forward filled)");
    if ((st = check_saved(saved, "ef_attn_backward"))) return st;
    if (!dout) return ef_error(EF_ERR_ARG, "ef_attn_backward: dout is NULL");
    if (!dq || !dk || !dv)
        return ef_error(EF_ERR_ARG, "ef_attn_backward: %s is NULL", !dq ? "dq" : !dk ? "dk" : "dv");
    if (!io->out)
        return ef_error(EF_ERR_ARG,
                        "ef_attn_backward: io->out is NULL (backward reads the forward output)");
    if (a->ref)
        st = a->ops->ref_backward ? a->ops->ref_backward(a, io, saved, dout, dq, dk, dv)
                                  : ef_ref_backward(a, io, saved, dout, dq, dk, dv);
    else
        st = a->ops->backward(a, io, saved, dout, dq, dk, dv);
    if (!st) ef_clear_error();
    return st;
}

size_t ef_attn_param_count(const ef_attn *a) { return a ? a->n_params : 0; }
float *ef_attn_params(ef_attn *a) { return a ? a->params : NULL; }
float *ef_attn_param_grads(ef_attn *a) { return a ? a->grads : NULL; }

/* ---------------------------------------------------------------------------------------------
 * Incremental decoding
 * ------------------------------------------------------------------------------------------- */
struct ef_attn_state {
    const ef_attn *a;
    int64_t pos;
    void *buf;
};

ef_status ef_attn_state_new(ef_attn_state **out, const ef_attn *a) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_attn_state_new: out is NULL");
    *out = NULL;
    if (!a) return ef_error(EF_ERR_ARG, "ef_attn_state_new: plan is NULL");
    if (!a->ops->step)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "%s has no incremental decoding (linear and performer "
                        "with causal=1 have it)",
                        a->ops->name);
    if (!a->causal)
        return ef_error(EF_ERR_UNSUPPORTED,
                        "%s: incremental decoding needs causal=1 (a non-causal "
                        "output depends on keys that have not arrived)",
                        a->ops->name);
    ef_attn_state *st = ef_mem_calloc(1, sizeof *st);
    if (!st) return ef_error(EF_ERR_NOMEM, "out of memory for a decoding state");
    st->a = a;
    st->buf = ef_malloc(a->ops->state_bytes(a));
    if (!st->buf) {
        ef_free(st);
        return EF_ERR_NOMEM;
    }
    a->ops->state_init(a, st->buf);
    ef_clear_error();
    *out = st;
    return EF_OK;
}

void ef_attn_state_free(ef_attn_state *st) {
    if (!st) return;
    ef_free(st->buf);
    ef_free(st);
}

ef_status ef_attn_state_reset(ef_attn_state *st) {
    if (!st) return ef_error(EF_ERR_ARG, "ef_attn_state_reset: state is NULL");
    st->a->ops->state_init(st->a, st->buf);
    st->pos = 0;
    return EF_OK;
}

int64_t ef_attn_state_position(const ef_attn_state *st) { return st ? st->pos : -1; }

ef_status ef_attn_step(ef_attn *a, ef_attn_state *st, const float *q, const float *k,
                       const float *v, float *out) {
    if (!a) return ef_error(EF_ERR_ARG, "ef_attn_step: plan is NULL");
    if (!st) return ef_error(EF_ERR_ARG, "ef_attn_step: state is NULL");
    if (st->a != a) return ef_error(EF_ERR_ARG, "ef_attn_step: the state belongs to another plan");
    if (!q || !k || !v || !out)
        return ef_error(EF_ERR_ARG, "ef_attn_step: %s is NULL",
                        !q   ? "q"
                        : !k ? "k"
                        : !v ? "v"
                             : "out");
    ef_status s = a->ops->step(a, st->buf, q, k, v, out);
    if (!s) st->pos++, ef_clear_error();
    return s;
}
