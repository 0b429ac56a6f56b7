/*
 * optim.c - AdamW, the learning-rate schedule, gradient clipping and accumulation, and the
 * training checkpoint (optim.h, docs/training.md).
 *
 * Determinism: the update is elementwise, run over fixed chunks of at most OPT_CHUNK floats
 * of one tensor each, so an element's arithmetic never depends on which thread runs it; the
 * gradient norm sums parts whose sizes depend on the buffer's length only, in a fixed order.
 */
#include "train/optim.h"
#include "core/core.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EF_PI 3.14159265358979323846

enum {
    OPT_CHUNK = 16384,    /* floats per work item of the update (a multiple of 16) */
    NORM_PARTS = 256,     /* at most this many parts in ef_grad_norm */
    NORM_MIN_PART = 4096, /* floats: smaller buffers are one part */
};

/* ---------------------------------------------------------------------------------------------
 * Learning-rate schedule
 * ------------------------------------------------------------------------------------------- */
static const char *const sched_names[] = {"constant", "cosine", "rsqrt", "linear"};
#define N_SCHED ((int)(sizeof sched_names / sizeof sched_names[0]))

ef_sched ef_sched_defaults(void) { return (ef_sched){EF_SCHED_CONSTANT, 1e-3, 0.0, 0, 0}; }

ef_status ef_sched_check(const ef_sched *s) {
    if (!s) return ef_error(EF_ERR_ARG, "ef_sched_check: schedule is NULL");
    if ((int)s->kind < 0 || (int)s->kind >= N_SCHED)
        return ef_error(EF_ERR_ARG, "learning-rate schedule kind %d is unknown", (int)s->kind);
    if (!(isfinite(s->lr) && s->lr >= 0))
        return ef_error(EF_ERR_ARG, "learning-rate schedule: lr=%g must be finite and >= 0", s->lr);
    if (!(isfinite(s->min_lr) && s->min_lr >= 0))
        return ef_error(EF_ERR_ARG, "learning-rate schedule: min_lr=%g must be finite and >= 0",
                        s->min_lr);
    if (s->warmup < 0)
        return ef_error(EF_ERR_ARG, "learning-rate schedule: warmup=%" PRId64 " must be >= 0",
                        s->warmup);
    if (s->total < 0)
        return ef_error(EF_ERR_ARG, "learning-rate schedule: total=%" PRId64 " must be >= 0",
                        s->total);
    if ((s->kind == EF_SCHED_COSINE || s->kind == EF_SCHED_LINEAR) && s->total <= s->warmup)
        return ef_error(EF_ERR_ARG,
                        "learning-rate schedule %s: total=%" PRId64 " must be > warmup=%" PRId64
                        " (the step at which the rate reaches min_lr)",
                        sched_names[s->kind], s->total, s->warmup);
    return EF_OK;
}

/* A whole string as a finite double / an integer in [0, 2^63). */
static int parse_double(const char *v, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno == ERANGE || !isfinite(x)) return 0;
    *out = x;
    return 1;
}

static int parse_i64(const char *v, int64_t *out) {
    char *end;
    errno = 0;
    if (!*v || *v == '-' || *v == '+') return 0;
    long long x = strtoll(v, &end, 10);
    if (*end || errno == ERANGE) return 0;
    *out = (int64_t)x;
    return 1;
}

ef_status ef_sched_parse(const char *spec, ef_sched *out) {
    if (!spec || !out)
        return ef_error(EF_ERR_ARG, "ef_sched_parse: %s is NULL", !spec ? "spec" : "out");
    ef_sched s = ef_sched_defaults();
    const char *colon = strchr(spec, ':');
    size_t klen = colon ? (size_t)(colon - spec) : strlen(spec);
    int kind = -1;
    for (int i = 0; i < N_SCHED; i++)
        if (strlen(sched_names[i]) == klen && !strncmp(spec, sched_names[i], klen)) kind = i;
    if (kind < 0)
        return ef_error(EF_ERR_ARG,
                        "learning-rate schedule '%.*s' is unknown (constant, cosine, rsqrt, "
                        "linear)",
                        (int)EF_MIN(klen, 100), spec);
    s.kind = (ef_sched_kind)kind;
    const char *p = colon ? colon + 1 : NULL;
    while (p && *p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[128];
        if (len >= sizeof item)
            return ef_error(EF_ERR_ARG, "learning-rate schedule item '%.40s...' is too long", p);
        memcpy(item, p, len);
        item[len] = '\0';
        char *eq = strchr(item, '=');
        if (!eq)
            return ef_error(EF_ERR_FORMAT, "learning-rate schedule item '%s' is not key=value",
                            item);
        *eq = '\0';
        const char *key = item, *val = eq + 1;
        int ok;
        if (!strcmp(key, "lr"))
            ok = parse_double(val, &s.lr);
        else if (!strcmp(key, "min_lr"))
            ok = parse_double(val, &s.min_lr);
        else if (!strcmp(key, "warmup"))
            ok = parse_i64(val, &s.warmup);
        else if (!strcmp(key, "total"))
            ok = parse_i64(val, &s.total);
        else
            return ef_error(EF_ERR_ARG,
                            "learning-rate schedule key '%s' is unknown (lr, warmup, total, "
                            "min_lr)",
                            key);
        if (!ok)
            return ef_error(EF_ERR_ARG, "learning-rate schedule: %s='%s' is not a %s", key, val,
                            key[0] == 'w' || key[0] == 't' ? "non-negative integer"
                                                           : "finite number");
        p = comma ? comma + 1 : NULL;
    }
    ef_status st = ef_sched_check(&s);
    if (st) return st;
    *out = s;
    return EF_OK;
}

ef_status ef_sched_describe(const ef_sched *s, char *buf, size_t size) {
    if (!s || !buf) return ef_error(EF_ERR_ARG, "ef_sched_describe: NULL argument");
    if ((int)s->kind < 0 || (int)s->kind >= N_SCHED)
        return ef_error(EF_ERR_ARG, "learning-rate schedule kind %d is unknown", (int)s->kind);
    int n = snprintf(buf, size, "%s:lr=%.17g,warmup=%" PRId64 ",total=%" PRId64 ",min_lr=%.17g",
                     sched_names[s->kind], s->lr, s->warmup, s->total, s->min_lr);
    if (n < 0 || (size_t)n >= size)
        return ef_error(EF_ERR_ARG,
                        "ef_sched_describe: the spec needs %d bytes, the buffer has %zu", n + 1,
                        size);
    return EF_OK;
}

double ef_sched_lr(const ef_sched *s, int64_t t) {
    if (!s) return 0.0;
    if (t < 1) t = 1;
    double w = (double)s->warmup, tt = (double)t;
    if (t < s->warmup) return s->lr * tt / w; /* linear warmup: lr at t = W */
    double u = s->total > s->warmup ? fmin(1.0, (tt - w) / ((double)s->total - w)) : 1.0;
    switch (s->kind) {
    case EF_SCHED_CONSTANT: return s->lr;
    case EF_SCHED_COSINE: return s->min_lr + (s->lr - s->min_lr) * 0.5 * (1.0 + cos(EF_PI * u));
    case EF_SCHED_LINEAR: return s->lr + (s->min_lr - s->lr) * u;
    case EF_SCHED_RSQRT: return s->lr * sqrt(fmax(w, 1.0) / tt);
    }
    return s->lr;
}

/* ---------------------------------------------------------------------------------------------
 * Gradient norm and clipping
 * ------------------------------------------------------------------------------------------- */
/* sum g_i^2 of n floats in double: 8 interleaved partial sums, added in a fixed tree. */
static double sum_squares(const float *g, size_t n) {
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) a[k] += (double)g[i + k] * (double)g[i + k];
    for (int k = 0; i < n; i++, k++) a[k] += (double)g[i] * (double)g[i];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

typedef struct norm_ctx {
    const float *g;
    size_t n, part;
    double *sums;
} norm_ctx;

static void norm_part(void *ctx, int64_t i, int tid) {
    (void)tid;
    norm_ctx *c = ctx;
    size_t b = (size_t)i * c->part, e = EF_MIN(c->n, b + c->part);
    c->sums[i] = sum_squares(c->g + b, e - b);
}

double ef_grad_norm(const float *g, size_t n) {
    if (!g || n == 0) return 0.0;
    /* part = max(NORM_MIN_PART, ceil(n / NORM_PARTS) rounded up to 16): a function of n */
    size_t part = (n + NORM_PARTS - 1) / NORM_PARTS;
    part = (part + 15) / 16 * 16;
    if (part < NORM_MIN_PART) part = NORM_MIN_PART;
    int64_t parts = (int64_t)((n + part - 1) / part);
    double sums[NORM_PARTS];
    norm_ctx c = {g, n, part, sums};
    ef_parallel_for(parts, ef_threads(), norm_part, &c);
    double s = 0.0;
    for (int64_t i = 0; i < parts; i++) s += sums[i];
    return sqrt(s);
}

ef_status ef_clip_grad_norm(float *g, size_t n, double clip, double *norm) {
    if ((!g && n) || !norm)
        return ef_error(EF_ERR_ARG, "ef_clip_grad_norm: %s is NULL", !norm ? "norm" : "g");
    if (!(isfinite(clip) && clip >= 0))
        return ef_error(EF_ERR_ARG, "ef_clip_grad_norm: clip=%g must be finite and >= 0", clip);
    double nrm = ef_grad_norm(g, n);
    *norm = nrm;
    if (!isfinite(nrm))
        return ef_error(EF_ERR_NUMERIC, "the gradient norm is %g: a gradient is NaN or infinite",
                        nrm);
    if (clip > 0 && nrm > clip) {
        float s = (float)(clip / nrm);
        for (size_t i = 0; i < n; i++) g[i] *= s;
    }
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * AdamW
 * ------------------------------------------------------------------------------------------- */
typedef struct opt_chunk {
    size_t off, len; /* floats of one tensor: [off, off + len) of the buffers */
    int tensor;
    int decay;
} opt_chunk;

struct ef_optim {
    ef_model *model;
    ef_optim_opts opts;
    int64_t step;
    size_t floats;    /* ef_model_param_floats */
    ef_params *state; /* "adam.m", "adam.v" of shape [floats] (data only: grad released) */
    float *m, *v;     /* into state->data */
    opt_chunk *chunks;
    int64_t n_chunks;
};

ef_optim_opts ef_optim_defaults(void) {
    ef_optim_opts o;
    memset(&o, 0, sizeof o);
    o.sched = ef_sched_defaults();
    o.beta1 = 0.9, o.beta2 = 0.999, o.eps = 1e-8;
    o.weight_decay = 0.0, o.clip = 0.0, o.accum = 1;
    return o;
}

ef_status ef_optim_check(const ef_optim_opts *o) {
    if (!o) return ef_error(EF_ERR_ARG, "ef_optim_check: options are NULL");
    ef_status st = ef_sched_check(&o->sched);
    if (st) return st;
    if (!(o->beta1 >= 0 && o->beta1 < 1))
        return ef_error(EF_ERR_ARG, "AdamW: beta1=%g must be in [0, 1)", o->beta1);
    if (!(o->beta2 >= 0 && o->beta2 < 1))
        return ef_error(EF_ERR_ARG, "AdamW: beta2=%g must be in [0, 1)", o->beta2);
    if (!(isfinite(o->eps) && o->eps > 0))
        return ef_error(EF_ERR_ARG,
                        "AdamW: eps=%g must be finite and > 0 (with 0 a parameter whose "
                        "gradient is 0 would become 0/0)",
                        o->eps);
    if (!(isfinite(o->weight_decay) && o->weight_decay >= 0))
        return ef_error(EF_ERR_ARG, "AdamW: weight_decay=%g must be finite and >= 0",
                        o->weight_decay);
    if (!(isfinite(o->clip) && o->clip >= 0))
        return ef_error(EF_ERR_ARG, "AdamW: clip=%g must be finite and >= 0 (0 = no clipping)",
                        o->clip);
    if (o->accum < 1) return ef_error(EF_ERR_ARG, "AdamW: accum=%d must be >= 1", o->accum);
    return EF_OK;
}

ef_status ef_optim_describe(const ef_optim_opts *o, char *buf, size_t size) {
    if (!o || !buf) return ef_error(EF_ERR_ARG, "ef_optim_describe: NULL argument");
    char sched[256];
    ef_status st = ef_sched_describe(&o->sched, sched, sizeof sched);
    if (st) return st;
    int n = snprintf(buf, size,
                     "adamw:beta1=%.17g,beta2=%.17g,eps=%.17g,weight_decay=%.17g,clip=%.17g,"
                     "accum=%d;sched=%s",
                     o->beta1, o->beta2, o->eps, o->weight_decay, o->clip, o->accum, sched);
    if (n < 0 || (size_t)n >= size)
        return ef_error(EF_ERR_ARG,
                        "ef_optim_describe: the text needs %d bytes, the buffer has %zu", n + 1,
                        size);
    return EF_OK;
}

/* A table holding the moments: "adam.m" and "adam.v", both [floats], zero. ef_params_alloc also
 * makes a gradient buffer, which moments do not need: it is released at once (ef_params_free
 * and ef_ckpt_save / ef_ckpt_load never touch grad). */
static ef_status new_state(size_t floats, ef_params **out) {
    ef_params *p = NULL;
    int64_t shape[1] = {(int64_t)floats};
    ef_status st = ef_params_new(&p);
    if (!st) st = ef_params_add(p, "adam.m", 1, shape, ef_init_zeros(), NULL);
    if (!st) st = ef_params_add(p, "adam.v", 1, shape, ef_init_zeros(), NULL);
    if (!st) st = ef_params_alloc(p);
    if (st) {
        ef_params_free(p);
        return st;
    }
    ef_free(p->grad);
    p->grad = NULL;
    *out = p;
    return EF_OK;
}

static void set_state(ef_optim *o, ef_params *state) {
    ef_params_free(o->state);
    o->state = state;
    o->m = state->data + state->t[0].offset;
    o->v = state->data + state->t[1].offset;
}

ef_status ef_optim_new(ef_optim **out, ef_model *m, const ef_optim_opts *opts) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_optim_new: out is NULL");
    *out = NULL;
    if (!m || !opts) return ef_error(EF_ERR_ARG, "ef_optim_new: %s is NULL", !m ? "model" : "opts");
    if (!ef_model_grads(m))
        return ef_error(EF_ERR_ARG,
                        "ef_optim_new: the model was made with train=0 (it has no gradients)");
    ef_status st = ef_optim_check(opts);
    if (st) return st;
    ef_optim *o = ef_mem_calloc(1, sizeof *o);
    if (!o) return ef_error(EF_ERR_NOMEM, "ef_optim_new: out of memory");
    o->model = m, o->opts = *opts, o->floats = ef_model_param_floats(m);
    int nt = ef_model_tensor_count(m);
    for (int pass = 0; pass < 2 && !st; pass++) {
        int64_t k = 0;
        for (int i = 0; i < nt && !st; i++) {
            ef_tensor_info ti;
            if ((st = ef_model_tensor(m, i, &ti))) break;
            if (ti.offset > o->floats || ti.numel > o->floats - ti.offset) {
                st = ef_error(EF_ERR_ARG,
                              "ef_optim_new: tensor '%s' [%zu, %zu) lies outside the "
                              "parameter buffer of %zu floats",
                              ti.name, ti.offset, ti.offset + ti.numel, o->floats);
                break;
            }
            for (size_t b = 0; b < ti.numel; b += OPT_CHUNK, k++)
                if (pass)
                    o->chunks[k] =
                        (opt_chunk){ti.offset + b, EF_MIN((size_t)OPT_CHUNK, ti.numel - b), i,
                                    ti.decay ? 1 : 0};
        }
        if (!st && !pass) {
            o->n_chunks = k;
            o->chunks = ef_mem_malloc((size_t)(k ? k : 1) * sizeof *o->chunks);
            if (!o->chunks) st = ef_error(EF_ERR_NOMEM, "ef_optim_new: out of memory");
        }
    }
    ef_params *state = NULL;
    if (!st) st = new_state(o->floats, &state);
    if (st) {
        ef_optim_free(o);
        return st;
    }
    set_state(o, state);
    ef_clear_error();
    *out = o;
    return EF_OK;
}

void ef_optim_free(ef_optim *o) {
    if (!o) return;
    ef_params_free(o->state);
    ef_free(o->chunks);
    ef_free(o);
}

ef_model *ef_optim_model(const ef_optim *o) { return o ? o->model : NULL; }
const ef_optim_opts *ef_optim_get_opts(const ef_optim *o) { return o ? &o->opts : NULL; }
int64_t ef_optim_steps(const ef_optim *o) { return o ? o->step : 0; }
const float *ef_optim_m(const ef_optim *o) { return o ? o->m : NULL; }
const float *ef_optim_v(const ef_optim *o) { return o ? o->v : NULL; }

/* The scalars of one update, rounded to float once (every element uses the same values). */
typedef struct adamw_ctx {
    const opt_chunk *chunks;
    float *p, *m, *v;
    const float *g;
    float gscale;       /* s = c / accum */
    float keep;         /* 1 - lr * wd (decay tensors) */
    float b1, one_b1;   /* beta1, 1 - beta1 */
    float b2, one_b2;   /* beta2, 1 - beta2 */
    float step_size;    /* lr / (1 - beta1^t) */
    float inv_sqrt_bc2; /* 1 / sqrt(1 - beta2^t) */
    float eps;
} adamw_ctx;

static void adamw_chunk(void *ctx, int64_t i, int tid) {
    (void)tid;
    const adamw_ctx *c = ctx;
    const opt_chunk *ch = &c->chunks[i];
    float *restrict p = c->p + ch->off, *restrict m = c->m + ch->off, *restrict v = c->v + ch->off;
    const float *restrict g = c->g + ch->off;
    const float keep = ch->decay ? c->keep : 1.0f, gs = c->gscale, b1 = c->b1, ob1 = c->one_b1,
                b2 = c->b2, ob2 = c->one_b2, lr_t = c->step_size, ibc2 = c->inv_sqrt_bc2,
                eps = c->eps;
    for (size_t j = 0; j < ch->len; j++) {
        float gj = g[j] * gs;
        float mj = b1 * m[j] + ob1 * gj;        /* m = beta1 m + (1 - beta1) g */
        float vj = b2 * v[j] + ob2 * (gj * gj); /* v = beta2 v + (1 - beta2) g^2 */
        m[j] = mj, v[j] = vj;
        /* p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) */
        p[j] = p[j] * keep - lr_t * mj / (sqrtf(vj) * ibc2 + eps);
    }
}

/* "layers.0.ff.w1.weight[12] = nan" for the first non-finite value of g (or a padding float). */
static void first_nonfinite(const ef_optim *o, const float *g, char *buf, size_t size) {
    snprintf(buf, size, "none found");
    for (size_t i = 0; i < o->floats; i++) {
        if (isfinite(g[i])) continue;
        for (int64_t k = 0; k < o->n_chunks; k++) {
            const opt_chunk *ch = &o->chunks[k];
            if (i >= ch->off && i < ch->off + ch->len) {
                ef_tensor_info ti;
                if (ef_model_tensor(o->model, ch->tensor, &ti) == EF_OK) {
                    snprintf(buf, size, "%s[%zu] = %g", ti.name, i - ti.offset, (double)g[i]);
                    return;
                }
            }
        }
        snprintf(buf, size, "the padding float at offset %zu = %g", i, (double)g[i]);
        return;
    }
}

ef_status ef_optim_step(ef_optim *o, ef_optim_report *rep) {
    if (!o) return ef_error(EF_ERR_ARG, "ef_optim_step: optimizer is NULL");
    const ef_optim_opts *op = &o->opts;
    float *p = ef_model_params(o->model);
    const float *g = ef_model_grads(o->model);
    int64_t t = o->step + 1;
    double lr = ef_sched_lr(&op->sched, t);
    double inv_accum = 1.0 / op->accum;
    double norm = ef_grad_norm(g, o->floats) * inv_accum; /* ||grad / accum|| */
    double c = op->clip > 0 && norm > op->clip ? op->clip / norm : 1.0;
    double s = inv_accum * c;
    if (rep) *rep = (ef_optim_report){t, lr, norm, s};
    if (!isfinite(norm)) {
        char where[320];
        first_nonfinite(o, g, where, sizeof where);
        return ef_error(EF_ERR_NUMERIC,
                        "step %" PRId64 ": the gradient norm is %g (first non-finite gradient: "
                        "%s); parameters and optimizer state left unchanged",
                        t, norm, where);
    }
    double bc1 = 1.0 - pow(op->beta1, (double)t), bc2 = 1.0 - pow(op->beta2, (double)t);
    adamw_ctx ctx = {
        .chunks = o->chunks,
        .p = p,
        .m = o->m,
        .v = o->v,
        .g = g,
        .gscale = (float)s,
        .keep = (float)(1.0 - lr * op->weight_decay),
        .b1 = (float)op->beta1,
        .one_b1 = (float)(1.0 - op->beta1),
        .b2 = (float)op->beta2,
        .one_b2 = (float)(1.0 - op->beta2),
        .step_size = (float)(lr / bc1),
        .inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2)),
        .eps = (float)op->eps,
    };
    ef_parallel_for(o->n_chunks, ef_threads(), adamw_chunk, &ctx);
    o->step = t;
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * A training step with gradient accumulation
 * ------------------------------------------------------------------------------------------- */
ef_status ef_train_step(ef_optim *o, const ef_model_batch *micro, int n_micro,
                        ef_train_report *rep) {
    if (!o || !micro)
        return ef_error(EF_ERR_ARG, "ef_train_step: %s is NULL", !o ? "optimizer" : "micro");
    if (n_micro != o->opts.accum)
        return ef_error(EF_ERR_ARG,
                        "ef_train_step: %d micro-batches given, the optimizer "
                        "accumulates accum=%d",
                        n_micro, o->opts.accum);
    ef_model *m = o->model;
    ef_model_zero_grad(m);
    double loss = 0.0;
    int64_t count = 0, correct = 0;
    for (int k = 0; k < n_micro; k++) {
        if (!micro[k].targets)
            return ef_error(EF_ERR_ARG, "ef_train_step: micro-batch %d of %d has no targets", k,
                            n_micro);
        ef_model_out out;
        memset(&out, 0, sizeof out);
        ef_status st = ef_model_forward(m, &micro[k], &out);
        if (!st && out.count > 0) st = ef_model_backward(m);
        if (st) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s", ef_last_error());
            return ef_error(st, "micro-batch %d of %d: %s", k, n_micro, msg);
        }
        loss += out.loss, count += out.count, correct += out.correct;
    }
    ef_optim_report orep;
    ef_status st = ef_optim_step(o, &orep);
    if (rep) {
        rep->opt = orep;
        rep->loss = loss / n_micro, rep->count = count, rep->correct = correct;
    }
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Training checkpoints
 * ------------------------------------------------------------------------------------------- */
/* FNV-1a 64 over the buffer's 32-bit words (the parameters' bit patterns). */
static uint64_t params_hash(const float *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        uint32_t w;
        memcpy(&w, &p[i], sizeof w);
        h ^= w;
        h *= 0x100000001b3ull;
    }
    return h;
}

static char *opt_path_of(const char *path) {
    size_t n = strlen(path);
    char *s = ef_mem_malloc(n + sizeof EF_TRAIN_OPT_SUFFIX);
    if (s) memcpy(s, path, n), memcpy(s + n, EF_TRAIN_OPT_SUFFIX, sizeof EF_TRAIN_OPT_SUFFIX);
    return s;
}

enum { N_OWN_META = 7 };

ef_status ef_train_save(const ef_optim *o, const char *path, const ef_ckpt_meta *meta, int n_meta) {
    if (!o || !path)
        return ef_error(EF_ERR_ARG, "ef_train_save: %s is NULL", !o ? "optimizer" : "path");
    if (n_meta < 0 || (n_meta > 0 && !meta))
        return ef_error(EF_ERR_ARG, "ef_train_save: n_meta=%d with meta %s", n_meta,
                        meta ? "given" : "NULL");
    for (int i = 0; i < n_meta; i++) {
        const char *k = meta[i].key;
        if (!k || !meta[i].value)
            return ef_error(EF_ERR_ARG, "ef_train_save: metadata entry %d has a NULL %s", i,
                            !k ? "key" : "value");
        if (!strncmp(k, "eformer.", 8) || !strcmp(k, "format"))
            return ef_error(EF_ERR_ARG,
                            "ef_train_save: metadata key '%.100s' is reserved (keys starting "
                            "with 'eformer.' and 'format' are the library's)",
                            k);
    }
    char step[32], floats[32], hash[32], optim[768];
    snprintf(step, sizeof step, "%" PRId64, o->step);
    snprintf(floats, sizeof floats, "%zu", o->floats);
    snprintf(hash, sizeof hash, "%016" PRIx64, params_hash(ef_model_params(o->model), o->floats));
    ef_status st = ef_optim_describe(&o->opts, optim, sizeof optim);
    if (st) return st;
    ef_ckpt_meta *all = ef_mem_malloc((size_t)(N_OWN_META + n_meta) * sizeof *all);
    char *opt_path = opt_path_of(path);
    if (!all || !opt_path) {
        ef_free(all), ef_free(opt_path);
        return ef_error(EF_ERR_NOMEM, "ef_train_save: out of memory");
    }
    all[0] = (ef_ckpt_meta){"eformer.step", step};
    all[1] = (ef_ckpt_meta){"eformer.spec", ef_model_describe(o->model)};
    all[2] = (ef_ckpt_meta){"eformer.param_floats", floats};
    all[3] = (ef_ckpt_meta){"eformer.params_hash", hash};
    all[4] = (ef_ckpt_meta){"eformer.optim", optim};
    all[5] = (ef_ckpt_meta){"eformer.version", ef_version()};
    all[6] = (ef_ckpt_meta){"format", "pt"};
    for (int i = 0; i < n_meta; i++) all[N_OWN_META + i] = meta[i];
    st = ef_ckpt_save(o->state, opt_path, all, N_OWN_META + n_meta);
    if (!st) st = ef_model_save(o->model, path);
    ef_free(all);
    ef_free(opt_path);
    if (!st) ef_clear_error();
    return st;
}

/* The checks and the restore of ef_train_load; load_model = 0 when the caller has just loaded
 * PATH into the model (ef_train_resume). */
static ef_status load_state(ef_optim *o, const char *path, int load_model) {
    char *opt_path = opt_path_of(path);
    if (!opt_path) return ef_error(EF_ERR_NOMEM, "ef_train_load: out of memory");
    char *floats_s = NULL, *spec = NULL, *step_s = NULL, *hash_s = NULL;
    ef_params *state = NULL;
    int64_t step = 0, floats = 0;
    uint64_t hash = 0;
    ef_status st = ef_ckpt_read_meta(opt_path, "eformer.param_floats", &floats_s);
    if (!st && !(parse_i64(floats_s, &floats) && (uint64_t)floats == (uint64_t)o->floats))
        st = ef_error(EF_ERR_FORMAT,
                      "%s: optimizer state for eformer.param_floats='%s' parameter floats, this "
                      "model has %zu",
                      opt_path, floats_s, o->floats);
    if (!st) st = ef_ckpt_read_meta(opt_path, "eformer.spec", &spec);
    if (!st && strcmp(spec, ef_model_describe(o->model)))
        st = ef_error(EF_ERR_FORMAT, "%s: optimizer state of model '%s', this model is '%s'",
                      opt_path, spec, ef_model_describe(o->model));
    if (!st) st = ef_ckpt_read_meta(opt_path, "eformer.step", &step_s);
    if (!st && !parse_i64(step_s, &step))
        st = ef_error(EF_ERR_FORMAT, "%s: eformer.step='%s' is not a non-negative integer",
                      opt_path, step_s);
    if (!st) st = ef_ckpt_read_meta(opt_path, "eformer.params_hash", &hash_s);
    if (!st) {
        char *end;
        errno = 0;
        unsigned long long h = strtoull(hash_s, &end, 16);
        if (strlen(hash_s) != 16 || *end || errno)
            st = ef_error(EF_ERR_FORMAT, "%s: eformer.params_hash='%s' is not 16 hex digits",
                          opt_path, hash_s);
        hash = (uint64_t)h;
    }
    /* the moments into a new table: o's state is replaced only when everything succeeded */
    if (!st) st = new_state(o->floats, &state);
    if (!st) st = ef_ckpt_load(state, opt_path);
    if (!st && load_model) st = ef_model_load_params(o->model, path);
    if (!st) {
        uint64_t have = params_hash(ef_model_params(o->model), o->floats);
        if (have != hash)
            st = ef_error(EF_ERR_FORMAT,
                          "%s holds parameters (hash %016" PRIx64 ") other than the ones %s was "
                          "saved with (%016" PRIx64 "): the two files are from different saves "
                          "(a save interrupted between them?)",
                          path, have, opt_path, hash);
    }
    if (!st) {
        set_state(o, state);
        state = NULL;
        o->step = step;
        ef_clear_error();
    }
    ef_params_free(state);
    ef_free(floats_s), ef_free(spec), ef_free(step_s), ef_free(hash_s), ef_free(opt_path);
    return st;
}

ef_status ef_train_load(ef_optim *o, const char *path) {
    if (!o || !path)
        return ef_error(EF_ERR_ARG, "ef_train_load: %s is NULL", !o ? "optimizer" : "path");
    return load_state(o, path, 1);
}

ef_status ef_train_resume(ef_model **m, ef_optim **o, const char *path, const ef_model_opts *mopts,
                          const ef_optim_opts *oopts) {
    if (m) *m = NULL;
    if (o) *o = NULL;
    if (!m || !o || !path)
        return ef_error(EF_ERR_ARG, "ef_train_resume: %s is NULL", !m ? "m" : !o ? "o" : "path");
    ef_model_opts mo = mopts ? *mopts : (ef_model_opts){1, 0, 1};
    ef_optim_opts oo = oopts ? *oopts : ef_optim_defaults();
    if (!mo.train) return ef_error(EF_ERR_ARG, "ef_train_resume: the model options have train=0");
    ef_model *model = NULL;
    ef_optim *opt = NULL;
    ef_status st = ef_model_load(&model, path, &mo);
    if (!st) st = ef_optim_new(&opt, model, &oo);
    if (!st) st = load_state(opt, path, 0);
    if (st) {
        ef_optim_free(opt);
        ef_model_free(model);
        return st;
    }
    *m = model, *o = opt;
    return EF_OK;
}

ef_status ef_train_read_meta(const char *path, const char *key, char **value) {
    if (!path || !key || !value) return ef_error(EF_ERR_ARG, "ef_train_read_meta: NULL argument");
    char *opt_path = opt_path_of(path);
    if (!opt_path) return ef_error(EF_ERR_NOMEM, "ef_train_read_meta: out of memory");
    ef_status st = ef_ckpt_read_meta(opt_path, key, value);
    ef_free(opt_path);
    return st;
}
