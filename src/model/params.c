/*
 * params.c - the parameter table (params.h): named tensors in one 64-byte-aligned fp32 buffer,
 * gradients in the identical layout, initialisation from a seed with one random stream per
 * tensor name.
 */
#include "model/params.h"
#include "core/core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

ef_status ef_params_new(ef_params **out) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_params_new: out is NULL");
    *out = ef_mem_calloc(1, sizeof(ef_params));
    if (!*out) return ef_error(EF_ERR_NOMEM, "ef_params_new: out of memory");
    return EF_OK;
}

void ef_params_free(ef_params *p) {
    if (!p) return;
    for (int i = 0; i < p->n; i++) ef_free(p->t[i].name);
    ef_free(p->t);
    ef_free(p->data);
    ef_free(p->grad);
    ef_free(p);
}

/* Names end up unescaped in the checkpoint's JSON header, so they are restricted to characters
 * that need no escaping there (and read well in messages): printable ASCII except '"', '\\'. */
static ef_status check_name(const char *name) {
    if (!name) return ef_error(EF_ERR_ARG, "parameter name is NULL");
    size_t len = strlen(name);
    if (len == 0) return ef_error(EF_ERR_ARG, "parameter name is empty");
    if (len > EF_PARAM_NAME_MAX)
        return ef_error(EF_ERR_ARG, "parameter name '%.40s...' is %zu bytes, longer than %d", name,
                        len, EF_PARAM_NAME_MAX);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x21 || c > 0x7e || c == '"' || c == '\\')
            return ef_error(EF_ERR_ARG,
                            "parameter name '%.*s' has byte 0x%02x at %zu: names are printable "
                            "ASCII without space, '\"' or '\\'",
                            (int)i, name, c, i);
    }
    if (strcmp(name, "__metadata__") == 0)
        return ef_error(EF_ERR_ARG, "parameter name '__metadata__' is reserved by safetensors");
    return EF_OK;
}

static ef_status check_init(const char *name, ef_init in) {
    switch (in.kind) {
    case EF_INIT_ZEROS:
    case EF_INIT_ONES: return EF_OK;
    case EF_INIT_NORMAL:
        if (!(isfinite(in.a) && in.a >= 0.0f))
            return ef_error(EF_ERR_ARG, "parameter '%s': normal init std=%g must be finite, >= 0",
                            name, in.a);
        return EF_OK;
    case EF_INIT_UNIFORM:
        if (!(isfinite(in.a) && isfinite(in.b) && in.a <= in.b))
            return ef_error(EF_ERR_ARG,
                            "parameter '%s': uniform init [%g, %g) must be finite "
                            "with a <= b",
                            name, in.a, in.b);
        return EF_OK;
    }
    return ef_error(EF_ERR_ARG, "parameter '%s': unknown init kind %d", name, (int)in.kind);
}

static int find_index(const ef_params *p, const char *name) {
    for (int i = 0; i < p->n; i++)
        if (strcmp(p->t[i].name, name) == 0) return i;
    return -1;
}

ef_status ef_params_add(ef_params *p, const char *name, int ndim, const int64_t *shape,
                        ef_init init, int *index) {
    if (!p) return ef_error(EF_ERR_ARG, "ef_params_add: table is NULL");
    ef_status st = check_name(name);
    if (st != EF_OK) return st;
    if (p->data)
        return ef_error(EF_ERR_ARG, "cannot add parameter '%s': the table is already allocated",
                        name);
    if (find_index(p, name) >= 0)
        return ef_error(EF_ERR_ARG, "duplicate parameter name '%s'", name);
    if (ndim < 1 || ndim > EF_PARAM_MAX_DIMS || !shape)
        return ef_error(EF_ERR_ARG, "parameter '%s': ndim=%d must be in 1..%d with a shape", name,
                        ndim, EF_PARAM_MAX_DIMS);
    if ((st = check_init(name, init)) != EF_OK) return st;
    /* the table's floats, with padding, stay below 2^60: far beyond any memory, and every
     * product and byte count below is then free of overflow */
    const size_t limit = (size_t)1 << 60;
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 1)
            return ef_error(EF_ERR_ARG, "parameter '%s': dimension %d is %lld, must be >= 1", name,
                            d, (long long)shape[d]);
        if ((uint64_t)shape[d] > limit / numel)
            return ef_error(EF_ERR_ARG, "parameter '%s': shape is too large", name);
        numel *= (size_t)shape[d];
    }
    size_t offset = (p->total + EF_PARAM_ALIGN - 1) / EF_PARAM_ALIGN * EF_PARAM_ALIGN;
    if (numel > limit - offset)
        return ef_error(EF_ERR_ARG, "parameter '%s': the table is too large", name);
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 16;
        ef_param *t = ef_mem_realloc(p->t, (size_t)cap * sizeof *t);
        if (!t) return ef_error(EF_ERR_NOMEM, "ef_params_add: out of memory");
        p->t = t, p->cap = cap;
    }
    ef_param *t = &p->t[p->n];
    memset(t, 0, sizeof *t);
    t->name = ef_mem_malloc(strlen(name) + 1);
    if (!t->name) return ef_error(EF_ERR_NOMEM, "ef_params_add: out of memory");
    strcpy(t->name, name);
    t->ndim = ndim;
    for (int d = 0; d < EF_PARAM_MAX_DIMS; d++) t->shape[d] = d < ndim ? shape[d] : 1;
    t->numel = numel;
    t->offset = offset;
    t->init = init;
    p->count += numel;
    p->total = offset + numel;
    if (index) *index = p->n;
    p->n++;
    return EF_OK;
}

ef_status ef_params_alloc(ef_params *p) {
    if (!p) return ef_error(EF_ERR_ARG, "ef_params_alloc: table is NULL");
    if (p->data) return ef_error(EF_ERR_ARG, "ef_params_alloc: the table is already allocated");
    if (p->n == 0) return ef_error(EF_ERR_ARG, "ef_params_alloc: the table has no tensors");
    size_t bytes = p->total * sizeof(float);
    p->data = ef_malloc(bytes);
    p->grad = p->data ? ef_malloc(bytes) : NULL;
    if (!p->data || !p->grad) {
        ef_free(p->data);
        p->data = NULL;
        return ef_error(EF_ERR_NOMEM,
                        "ef_params_alloc: cannot allocate 2 x %zu bytes for %zu "
                        "parameters",
                        bytes, p->count);
    }
    memset(p->data, 0, bytes);
    memset(p->grad, 0, bytes);
    return EF_OK;
}

ef_status ef_params_find(const ef_params *p, const char *name, const ef_param **out, int *index) {
    if (!p || !name || !out) return ef_error(EF_ERR_ARG, "ef_params_find: NULL argument");
    int i = find_index(p, name);
    if (i < 0)
        return ef_error(EF_ERR_ARG, "unknown parameter '%s' (the table has %d tensors)", name,
                        p->n);
    *out = &p->t[i];
    if (index) *index = i;
    return EF_OK;
}

static float *view(ef_params *p, const char *name, int grad) {
    const ef_param *t;
    if (ef_params_find(p, name, &t, NULL) != EF_OK) return NULL;
    if (!p->data) {
        ef_error(EF_ERR_ARG, "parameter '%s': the table is not allocated", name);
        return NULL;
    }
    return (grad ? p->grad : p->data) + t->offset;
}

float *ef_params_data(ef_params *p, const char *name) { return view(p, name, 0); }
float *ef_params_grad(ef_params *p, const char *name) { return view(p, name, 1); }

uint64_t ef_params_stream(const char *name) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 */
    for (const unsigned char *s = (const unsigned char *)name; *s; s++) {
        h ^= *s;
        h *= 0x100000001b3ull;
    }
    return h | (1ull << 63);
}

ef_status ef_params_init(ef_params *p, uint64_t seed) {
    if (!p || !p->data) return ef_error(EF_ERR_ARG, "ef_params_init: table is NULL or unallocated");
    for (int i = 0; i < p->n; i++) {
        const ef_param *t = &p->t[i];
        float *x = p->data + t->offset;
        uint64_t stream = ef_params_stream(t->name);
        switch (t->init.kind) {
        case EF_INIT_ZEROS: memset(x, 0, t->numel * sizeof(float)); break;
        case EF_INIT_ONES:
            for (size_t j = 0; j < t->numel; j++) x[j] = 1.0f;
            break;
        case EF_INIT_NORMAL:
            ef_rng_normal(seed, stream, 0, t->numel, x);
            for (size_t j = 0; j < t->numel; j++) x[j] *= t->init.a;
            break;
        case EF_INIT_UNIFORM: {
            float a = t->init.a, w = t->init.b - t->init.a;
            ef_rng_uniform(seed, stream, 0, t->numel, x);
            /* u < 1 but a + w*u can round up to b; keep the interval half-open */
            for (size_t j = 0; j < t->numel; j++) {
                float v = a + w * x[j];
                x[j] = v < t->init.b ? v : (w > 0 ? nextafterf(t->init.b, a) : a);
            }
            break;
        }
        }
    }
    return EF_OK;
}

void ef_params_zero_grad(ef_params *p) {
    if (p && p->grad) memset(p->grad, 0, p->total * sizeof(float));
}
