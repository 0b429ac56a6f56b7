/*
 * model.c - the Transformer: token embedding + positions, a stack of pre-LN residual or
 * reversible layers (block.h) whose attention specs cycle over the layers, a final layer norm
 * and an lm or cls head; one parameter table (params.h); safetensors checkpoints.
 * The public side (ef_model_*) and the spec grammar are in include/eformer.h; the derivations,
 * memory and the head's chunking in docs/model.md.
 *
 * Shapes (B, N = the model's batch and len; C = dim; W = C, or 2C for reversible layers):
 *   x      [B][N][C]  = embed[tokens] + pos            (valid rows; padded rows 0; with
 *                      sinusoidal positions embed[tokens] * sqrt(C) + pos, as Vaswani et al.)
 *   stack  residual:   x <- layer_l(x)                  a1 = x
 *          reversible: (a1, a2) = (x, x) <- layer_l(a1, a2)
 *   f      [rows][W]  = a1 | concat(a1, a2)            per valid row
 *   lm:    logits [rows][V] = LN_f(f) Wh + bh;  loss = mean over targets of lse - logit[target]
 *   cls:   p [B][W] = LN_f(f) of row 0, or the mean over valid rows;  logits = p Wh + bh
 * The lm head runs over each sequence's rows in chunks of HEAD_ROWS rows, in forward and in
 * backward (which recomputes LN_f and the chunk's logits), so the [rows][V] logits never exist
 * whole unless the caller asks for them.
 */
#define _POSIX_C_SOURCE 200809L
#include "model/params.h"
#include "nn/block.h"
#include "nn/nn.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { HEAD_ROWS = 256, MAX_CYCLE = 64, SPEC_MAX = 4096 };

typedef enum { POS_NONE, POS_SINUSOIDAL, POS_LEARNED, POS_AXIAL } pos_kind;
typedef enum { POOL_FIRST, POOL_MEAN } pool_kind;

/* What the spec says (after defaults). */
typedef struct model_cfg {
    int layers, dim, heads, ff, vocab, max_len;
    float ln_eps;
    pos_kind pos;
    int ax_n1, ax_n2, ax_d1, ax_d2;
    int n_attn;
    char *attn[MAX_CYCLE]; /* the attention specs as given (trimmed), owned */
    int reversible, chunks;
    int classes; /* 0: lm head */
    pool_kind pool;
} model_cfg;

/* Tensor indices of one layer in the table (-1: absent). */
typedef struct layer_t {
    ef_block *blk;
    ef_attn *attn; /* the plan inside blk */
    int ln1_g, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, mech, ln2_g, ln2_b, w1, b1, w2, b2;
    size_t mech_n; /* the plan's own parameters (linformer's projections, ...) */
    void *saved;   /* what forward keeps for backward (train models) */
    size_t saved_bytes;
} layer_t;

struct ef_model {
    model_cfg cfg;
    char *desc;
    uint64_t seed;
    int B, N, train, causal, W;
    ef_params *P;
    unsigned char *decay; /* [tensors] */
    layer_t *L;
    int emb, pos0, pos1, lnf_g, lnf_b, head_w, head_b;
    /* activations: residual a1 (x) and d1 (dx); reversible a1, a2, d1, d2 */
    float *a1, *a2, *d1, *d2;
    void *ws; /* the layers' shared scratch (the largest ef_block_ws_bytes) */
    size_t ws_bytes;
    /* head scratch: rows of the final features, normalised, logits, their gradients */
    float *h_f, *h_xn, *h_lg, *h_dxn, *h_mean, *h_rstd;
    float *pooled, *dpooled, *cls_lg; /* [B][W], [B][W], [B][K] */
    int32_t *tok, *tgt, *lens;        /* the last forward's input, internal layout */
    int has_tgt, ready;               /* ready: a training forward awaits its backward */
    int64_t count;
    ef_model_stats stats;
    size_t head_bytes, act_bytes, io_bytes;
    float *pe; /* pos=sinusoidal: the table [max_len][C] (counted in io_bytes) */
};

static size_t round64(size_t b) { return (b + 63) / 64 * 64; }

/* ---------------------------------------------------------------------------------------------
 * The spec
 * ------------------------------------------------------------------------------------------- */
static const char *const model_keys[] = {
    "layers", "dim",  "heads",      "ff",     "vocab", "max_len", "ln_eps", "pos",
    "axial_shape", "axial_dims", "attn", "reversible", "chunks", "head", NULL};

static int is_model_key(const char *item) {
    const char *eq = strchr(item, '=');
    size_t n = eq ? (size_t)(eq - item) : strlen(item);
    for (int i = 0; model_keys[i]; i++)
        if (strlen(model_keys[i]) == n && !strncmp(item, model_keys[i], n)) return 1;
    return 0;
}

static void cfg_free(model_cfg *c) {
    for (int i = 0; i < c->n_attn; i++) ef_free(c->attn[i]);
    c->n_attn = 0;
}

static ef_status parse_int_in(const char *key, const char *v, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi)
        return ef_error(EF_ERR_ARG, "model spec: %s=%s is not an integer in [%d, %d]", key, v, lo,
                        hi);
    *out = (int)x;
    return EF_OK;
}

static ef_status parse_pair(const char *key, const char *v, int lo, int *a, int *b) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (end == v || *end != 'x' || errno || x < lo || x > (1 << 24)) goto bad;
    const char *w = end + 1;
    long y = strtol(w, &end, 10);
    if (end == w || *end || errno || y < lo || y > (1 << 24)) goto bad;
    *a = (int)x, *b = (int)y;
    return EF_OK;
bad:
    return ef_error(EF_ERR_ARG, "model spec: %s=%s is not AxB with integers A, B >= %d", key, v,
                    lo);
}

static char *trim_dup(const char *s, size_t n) {
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && isspace((unsigned char)s[n - 1])) n--;
    char *r = ef_mem_malloc(n + 1);
    if (r) memcpy(r, s, n), r[n] = 0;
    return r;
}

/* Splits `spec` at commas into items, gathering the items that follow attn= / head= (until
 * the next model key) into those keys' values. */
static ef_status parse_cfg(const char *spec, model_cfg *c) {
    memset(c, 0, sizeof *c);
    c->layers = 2, c->dim = 256, c->heads = 4, c->ff = 0, c->vocab = 256, c->max_len = 1024;
    c->ln_eps = 1e-5f, c->pos = POS_SINUSOIDAL, c->chunks = 1, c->pool = POOL_FIRST;
    int have_axs = 0, have_axd = 0;
    char *attn_raw = NULL, *head_raw = NULL;
    if (!spec) return ef_error(EF_ERR_ARG, "ef_model_new: spec is NULL");
    size_t len = strlen(spec);
    if (len > SPEC_MAX)
        return ef_error(EF_ERR_ARG, "model spec: %zu characters (at most %d)", len, SPEC_MAX);
    char *buf = ef_mem_malloc(len + 1), **open = NULL;
    if (!buf) return ef_error(EF_ERR_NOMEM, "out of memory parsing a model spec");
    memcpy(buf, spec, len + 1);
    ef_status st = EF_OK;
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *it = trim_dup(item, strlen(item));
        if (!it) {
            st = ef_error(EF_ERR_NOMEM, "out of memory parsing a model spec");
            break;
        }
        if (!*it) {
            ef_free(it);
            continue;
        }
        if (!is_model_key(it)) {
            if (!open) {
                st = ef_error(EF_ERR_ARG,
                              "model spec: unknown key '%s' (model keys: layers, dim, heads, ff, "
                              "vocab, max_len, ln_eps, pos, axial_shape, axial_dims, attn, "
                              "reversible, chunks, head)",
                              it);
                ef_free(it);
                break;
            }
            /* an option of the attention or head spec before it */
            size_t a = strlen(*open), b = strlen(it);
            char *grown = ef_mem_realloc(*open, a + b + 2);
            if (!grown) {
                ef_free(it);
                st = ef_error(EF_ERR_NOMEM, "out of memory parsing a model spec");
                break;
            }
            grown[a] = ',', memcpy(grown + a + 1, it, b + 1);
            *open = grown;
            ef_free(it);
            continue;
        }
        open = NULL;
        char *eq = strchr(it, '=');
        if (!eq || !eq[1]) {
            st = ef_error(EF_ERR_FORMAT, "model spec: '%s' is not key=value", it);
            ef_free(it);
            break;
        }
        *eq = 0;
        const char *k = it, *v = eq + 1;
        if (!strcmp(k, "layers")) st = parse_int_in(k, v, 1, 1024, &c->layers);
        else if (!strcmp(k, "dim")) st = parse_int_in(k, v, 1, 65536, &c->dim);
        else if (!strcmp(k, "heads")) st = parse_int_in(k, v, 1, 4096, &c->heads);
        else if (!strcmp(k, "ff")) st = parse_int_in(k, v, 1, 1 << 20, &c->ff);
        else if (!strcmp(k, "vocab")) st = parse_int_in(k, v, 1, 1 << 24, &c->vocab);
        else if (!strcmp(k, "max_len")) st = parse_int_in(k, v, 1, 1 << 24, &c->max_len);
        else if (!strcmp(k, "chunks")) st = parse_int_in(k, v, 1, 1 << 24, &c->chunks);
        else if (!strcmp(k, "reversible")) st = parse_int_in(k, v, 0, 1, &c->reversible);
        else if (!strcmp(k, "ln_eps")) {
            char *end;
            double e = strtod(v, &end);
            if (*end || !(e > 0) || e > 1)
                st = ef_error(EF_ERR_ARG, "model spec: ln_eps=%s must be a number in (0, 1]", v);
            else c->ln_eps = (float)e;
            if (!st && !(c->ln_eps > 0))
                st = ef_error(EF_ERR_ARG, "model spec: ln_eps=%s underflows in fp32", v);
        } else if (!strcmp(k, "pos")) {
            if (!strcmp(v, "none")) c->pos = POS_NONE;
            else if (!strcmp(v, "sinusoidal")) c->pos = POS_SINUSOIDAL;
            else if (!strcmp(v, "learned")) c->pos = POS_LEARNED;
            else if (!strcmp(v, "axial")) c->pos = POS_AXIAL;
            else
                st = ef_error(EF_ERR_ARG,
                              "model spec: pos=%s is not sinusoidal, learned, axial or none", v);
        } else if (!strcmp(k, "axial_shape")) {
            st = parse_pair(k, v, 1, &c->ax_n1, &c->ax_n2), have_axs = 1;
        } else if (!strcmp(k, "axial_dims")) {
            st = parse_pair(k, v, 0, &c->ax_d1, &c->ax_d2), have_axd = 1;
        } else if (!strcmp(k, "attn") || !strcmp(k, "head")) {
            char **dst = !strcmp(k, "attn") ? &attn_raw : &head_raw;
            if (*dst) {
                st = ef_error(EF_ERR_ARG, "model spec: %s= given twice", k);
            } else if (!(*dst = ef_mem_strdup(v))) {
                st = ef_error(EF_ERR_NOMEM, "out of memory parsing a model spec");
            }
            open = dst;
        }
        ef_free(it);
        if (st) break;
    }
    ef_free(buf);
    if (!st && !c->ff) c->ff = 4 * c->dim;
    if (!st && c->dim % c->heads)
        st = ef_error(EF_ERR_SHAPE, "model spec: dim=%d is not a multiple of heads=%d", c->dim,
                      c->heads);
    /* attention specs, '|'-separated */
    if (!st) {
        const char *a = attn_raw ? attn_raw : "flash";
        while (!st) {
            const char *bar = strchr(a, '|');
            size_t n = bar ? (size_t)(bar - a) : strlen(a);
            if (c->n_attn == MAX_CYCLE) {
                st = ef_error(EF_ERR_ARG, "model spec: more than %d attention specs", MAX_CYCLE);
                break;
            }
            char *one = trim_dup(a, n);
            if (!one) st = ef_error(EF_ERR_NOMEM, "out of memory parsing a model spec");
            else if (!*one) {
                ef_free(one);
                st = ef_error(EF_ERR_ARG, "model spec: attn=%s has an empty attention spec",
                              attn_raw);
            } else c->attn[c->n_attn++] = one;
            if (!bar) break;
            a = bar + 1;
        }
    }
    /* head */
    if (!st && head_raw) {
        if (!strcmp(head_raw, "lm")) {
            c->classes = 0;
        } else if (!strncmp(head_raw, "cls", 3) && (!head_raw[3] || head_raw[3] == ':')) {
            c->classes = -1;
            char *opts = head_raw[3] ? head_raw + 4 : head_raw + 3, *sv = NULL;
            for (char *o = strtok_r(opts, ",", &sv); o && !st; o = strtok_r(NULL, ",", &sv)) {
                if (!strncmp(o, "classes=", 8))
                    st = parse_int_in("head=cls:classes", o + 8, 2, 1 << 24, &c->classes);
                else if (!strcmp(o, "pool=first")) c->pool = POOL_FIRST;
                else if (!strcmp(o, "pool=mean")) c->pool = POOL_MEAN;
                else
                    st = ef_error(EF_ERR_ARG,
                                  "model spec: head=cls option '%s' is not classes=K or "
                                  "pool=first|mean",
                                  o);
            }
            if (!st && c->classes < 0)
                st = ef_error(EF_ERR_ARG, "model spec: head=cls needs classes=K (K >= 2)");
        } else {
            st = ef_error(EF_ERR_ARG, "model spec: head=%s is not lm or cls:classes=K[,pool=...]",
                          head_raw);
        }
    }
    /* positions */
    if (!st && c->pos == POS_AXIAL) {
        if (!have_axs) {
            int n2 = 1;
            while ((double)n2 * n2 * 2 <= c->max_len) n2 *= 2; /* nearest power of two to sqrt */
            c->ax_n2 = n2, c->ax_n1 = (c->max_len + n2 - 1) / n2;
        }
        if (!have_axd) c->ax_d1 = c->dim / 4, c->ax_d2 = c->dim - c->dim / 4;
        if ((int64_t)c->ax_n1 * c->ax_n2 < c->max_len)
            st = ef_error(EF_ERR_SHAPE, "model spec: axial_shape=%dx%d covers %lld < max_len=%d",
                          c->ax_n1, c->ax_n2, (long long)c->ax_n1 * c->ax_n2, c->max_len);
        else if (c->ax_d1 + c->ax_d2 != c->dim)
            st = ef_error(EF_ERR_SHAPE, "model spec: axial_dims=%dx%d do not add up to dim=%d",
                          c->ax_d1, c->ax_d2, c->dim);
    } else if (!st && (have_axs || have_axd)) {
        st = ef_error(EF_ERR_ARG, "model spec: axial_shape / axial_dims need pos=axial");
    }
    ef_free(attn_raw);
    ef_free(head_raw);
    if (st) cfg_free(c);
    return st;
}

/* 1 when the attention spec sets seed= itself. */
static int spec_has_seed(const char *s) {
    const char *colon = strchr(s, ':');
    if (!colon) return 0;
    for (const char *p = colon + 1; *p;) {
        while (*p == ' ') p++;
        if (!strncmp(p, "seed", 4)) {
            const char *q = p + 4;
            while (*q == ' ') q++;
            if (*q == '=') return 1;
        }
        const char *comma = strchr(p, ',');
        if (!comma) break;
        p = comma + 1;
    }
    return 0;
}

/* The canonical attention spec minus the item "seed=..." (the model's per-layer seed). */
static void strip_seed(char *s) {
    char *colon = strchr(s, ':');
    if (!colon) return;
    char *p = colon + 1;
    while (*p) {
        char *comma = strchr(p, ',');
        char *end = comma ? comma + 1 : p + strlen(p);
        if (!strncmp(p, "seed=", 5)) {
            if (comma) memmove(p, end, strlen(end) + 1);
            else if (p > colon + 1) p[-1] = 0; /* drop the comma before it */
            else *colon = 0;                   /* the only option */
            return;
        }
        p = end;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Building
 * ------------------------------------------------------------------------------------------- */
static ef_status add_t(ef_model *m, const char *name, int ndim, int64_t d0, int64_t d1,
                       ef_init init, int decay, int *idx) {
    int64_t shape[2] = {d0, d1};
    ef_status st = ef_params_add(m->P, name, ndim, shape, init, idx);
    if (st) return st;
    unsigned char *g = ef_mem_realloc(m->decay, (size_t)m->P->n);
    if (!g) return ef_error(EF_ERR_NOMEM, "out of memory for the tensor table");
    m->decay = g, g[*idx] = (unsigned char)decay;
    return EF_OK;
}

#define ADD(idx, ndim, d0, d1, init, decay, ...)                                               \
    do {                                                                                       \
        snprintf(name, sizeof name, __VA_ARGS__);                                              \
        if ((st = add_t(m, name, ndim, d0, d1, init, decay, &(idx)))) return st;              \
    } while (0)

static ef_status build_table(ef_model *m) {
    const model_cfg *c = &m->cfg;
    char name[128];
    ef_status st;
    int C = c->dim;
    float std = 0.02f, ostd = 0.02f / sqrtf(2.0f * (float)c->layers);
    ADD(m->emb, 2, c->vocab, C, ef_init_normal(std), 1, "embed.weight");
    m->pos0 = m->pos1 = -1;
    if (c->pos == POS_LEARNED) ADD(m->pos0, 2, c->max_len, C, ef_init_normal(std), 0, "pos.weight");
    if (c->pos == POS_AXIAL) {
        if (c->ax_d1) ADD(m->pos0, 2, c->ax_n1, c->ax_d1, ef_init_normal(std), 0, "pos.axial.0");
        if (c->ax_d2) ADD(m->pos1, 2, c->ax_n2, c->ax_d2, ef_init_normal(std), 0, "pos.axial.1");
    }
    for (int l = 0; l < c->layers; l++) {
        layer_t *L = &m->L[l];
        int sqk = ef_attn_block_shared_qk(ef_block_attn(L->blk));
        ADD(L->ln1_g, 1, C, 1, ef_init_ones(), 0, "layers.%d.ln1.weight", l);
        ADD(L->ln1_b, 1, C, 1, ef_init_zeros(), 0, "layers.%d.ln1.bias", l);
        ADD(L->wq, 2, C, C, ef_init_normal(std), 1, "layers.%d.attn.q.weight", l);
        ADD(L->bq, 1, C, 1, ef_init_zeros(), 0, "layers.%d.attn.q.bias", l);
        L->wk = L->bk = -1;
        if (!sqk) {
            ADD(L->wk, 2, C, C, ef_init_normal(std), 1, "layers.%d.attn.k.weight", l);
            ADD(L->bk, 1, C, 1, ef_init_zeros(), 0, "layers.%d.attn.k.bias", l);
        }
        ADD(L->wv, 2, C, C, ef_init_normal(std), 1, "layers.%d.attn.v.weight", l);
        ADD(L->bv, 1, C, 1, ef_init_zeros(), 0, "layers.%d.attn.v.bias", l);
        ADD(L->wo, 2, C, C, ef_init_normal(ostd), 1, "layers.%d.attn.o.weight", l);
        ADD(L->bo, 1, C, 1, ef_init_zeros(), 0, "layers.%d.attn.o.bias", l);
        L->mech = -1;
        if (L->mech_n) /* values copied from the plan's own initialisation after init */
            ADD(L->mech, 1, (int64_t)L->mech_n, 1, ef_init_zeros(), 0, "layers.%d.attn.mech", l);
        ADD(L->ln2_g, 1, C, 1, ef_init_ones(), 0, "layers.%d.ln2.weight", l);
        ADD(L->ln2_b, 1, C, 1, ef_init_zeros(), 0, "layers.%d.ln2.bias", l);
        ADD(L->w1, 2, C, c->ff, ef_init_normal(std), 1, "layers.%d.ff.fc1.weight", l);
        ADD(L->b1, 1, c->ff, 1, ef_init_zeros(), 0, "layers.%d.ff.fc1.bias", l);
        ADD(L->w2, 2, c->ff, C, ef_init_normal(ostd), 1, "layers.%d.ff.fc2.weight", l);
        ADD(L->b2, 1, C, 1, ef_init_zeros(), 0, "layers.%d.ff.fc2.bias", l);
    }
    int W = m->W, K = c->classes ? c->classes : c->vocab;
    ADD(m->lnf_g, 1, W, 1, ef_init_ones(), 0, "ln_f.weight");
    ADD(m->lnf_b, 1, W, 1, ef_init_zeros(), 0, "ln_f.bias");
    ADD(m->head_w, 2, W, K, ef_init_normal(std), 1, "head.weight");
    ADD(m->head_b, 1, K, 1, ef_init_zeros(), 0, "head.bias");
    return EF_OK;
}
#undef ADD

static float *T(const ef_model *m, int idx) {
    return idx < 0 ? NULL : m->P->data + m->P->t[idx].offset;
}
static float *G(const ef_model *m, int idx) {
    return idx < 0 || !m->P->grad ? NULL : m->P->grad + m->P->t[idx].offset;
}

static ef_block_params layer_params(const ef_model *m, const layer_t *L) {
    ef_block_params p = {T(m, L->ln1_g), T(m, L->ln1_b),
                         {T(m, L->wq), T(m, L->bq), T(m, L->wk), T(m, L->bk), T(m, L->wv),
                          T(m, L->bv), T(m, L->wo), T(m, L->bo)},
                         T(m, L->ln2_g), T(m, L->ln2_b), T(m, L->w1), T(m, L->b1), T(m, L->w2),
                         T(m, L->b2)};
    return p;
}
static ef_block_grads layer_grads(const ef_model *m, const layer_t *L) {
    ef_block_grads g = {G(m, L->ln1_g), G(m, L->ln1_b),
                        {G(m, L->wq), G(m, L->bq), G(m, L->wk), G(m, L->bk), G(m, L->wv),
                         G(m, L->bv), G(m, L->wo), G(m, L->bo)},
                        G(m, L->ln2_g), G(m, L->ln2_b), G(m, L->w1), G(m, L->b1), G(m, L->w2),
                        G(m, L->b2)};
    return g;
}

static ef_status make_desc(ef_model *m) {
    const model_cfg *c = &m->cfg;
    size_t cap = 1024;
    for (int i = 0; i < c->n_attn && i < c->layers; i++) /* specs past the layers are unused */
        cap += strlen(ef_attn_describe(m->L[i].attn)) + 2;
    char *d = ef_mem_malloc(cap);
    if (!d) return ef_error(EF_ERR_NOMEM, "out of memory for a model description");
    static const char *pos_names[] = {"none", "sinusoidal", "learned", "axial"};
    int n = snprintf(d, cap, "layers=%d,dim=%d,heads=%d,ff=%d,vocab=%d,max_len=%d,ln_eps=%g,pos=%s",
                     c->layers, c->dim, c->heads, c->ff, c->vocab, c->max_len, (double)c->ln_eps,
                     pos_names[c->pos]);
    if (c->pos == POS_AXIAL)
        n += snprintf(d + n, cap - n, ",axial_shape=%dx%d,axial_dims=%dx%d", c->ax_n1, c->ax_n2,
                      c->ax_d1, c->ax_d2);
    n += snprintf(d + n, cap - n, ",attn=");
    for (int i = 0; i < c->n_attn && i < c->layers; i++) {
        char one[4096]; /* an attention plan's canonical spec has at most 4095 (attn.c) */
        snprintf(one, sizeof one, "%s", ef_attn_describe(m->L[i].attn));
        if (!spec_has_seed(c->attn[i])) strip_seed(one);
        n += snprintf(d + n, cap - n, "%s%s", i ? "|" : "", one);
    }
    n += snprintf(d + n, cap - n, ",reversible=%d,chunks=%d", c->reversible, c->chunks);
    if (c->classes)
        snprintf(d + n, cap - n, ",head=cls:classes=%d,pool=%s", c->classes,
                 c->pool == POOL_MEAN ? "mean" : "first");
    else snprintf(d + n, cap - n, ",head=lm");
    /* the canonical spec must parse (ef_model_load builds a checkpoint's model from it): every
     * attention option written out can make it longer than the spec that was given */
    size_t len = strlen(d);
    if (len > SPEC_MAX) {
        ef_free(d);
        return ef_error(EF_ERR_ARG,
                        "model spec: its canonical form (every option of every attention spec "
                        "written out) has %zu characters, more than a spec may have (%d): use "
                        "fewer distinct attention specs",
                        len, SPEC_MAX);
    }
    m->desc = d;
    return EF_OK;
}

void ef_model_free(ef_model *m) {
    if (!m) return;
    for (int l = 0; m->L && l < m->cfg.layers; l++) {
        ef_block_free(m->L[l].blk);
        ef_free(m->L[l].saved);
    }
    ef_free(m->L);
    ef_params_free(m->P);
    ef_free(m->decay);
    ef_free(m->a1), ef_free(m->a2), ef_free(m->d1), ef_free(m->d2), ef_free(m->ws);
    ef_free(m->h_f), ef_free(m->h_xn), ef_free(m->h_lg), ef_free(m->h_dxn);
    ef_free(m->h_mean), ef_free(m->h_rstd);
    ef_free(m->pooled), ef_free(m->dpooled), ef_free(m->cls_lg);
    ef_free(m->tok), ef_free(m->tgt), ef_free(m->lens), ef_free(m->pe);
    ef_free(m->desc);
    cfg_free(&m->cfg);
    ef_free(m);
}

/* ef_malloc of `floats` floats, counted into *acc. */
static float *falloc(size_t floats, size_t *acc) {
    size_t b = round64(EF_MAX(floats, (size_t)1) * sizeof(float));
    *acc += b;
    return ef_malloc(b);
}

ef_status ef_model_new(ef_model **out, const char *spec, const ef_model_opts *opts) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_model_new: out is NULL");
    *out = NULL;
    ef_model_opts o = opts ? *opts : (ef_model_opts){0};
    if (o.batch < 0)
        return ef_error(EF_ERR_ARG, "ef_model_new: batch=%d must be >= 0", o.batch);
    if (o.train != 0 && o.train != 1)
        return ef_error(EF_ERR_ARG, "ef_model_new: train=%d is neither 0 nor 1", o.train);
    ef_model *m = ef_mem_calloc(1, sizeof *m);
    if (!m) return ef_error(EF_ERR_NOMEM, "out of memory for a model");
    ef_status st = parse_cfg(spec, &m->cfg);
    if (st) {
        ef_free(m);
        return st;
    }
    model_cfg *c = &m->cfg;
    m->B = o.batch ? o.batch : 1, m->N = c->max_len;
    m->train = o.train, m->seed = o.seed;
    m->W = c->reversible ? 2 * c->dim : c->dim;
    if ((int64_t)m->B * m->N * (int64_t)c->dim > ((int64_t)1 << 40) / 4)
        st = ef_error(EF_ERR_SHAPE, "ef_model_new: batch=%d x max_len=%d x dim=%d is too large",
                      m->B, m->N, c->dim);
    if (st) {
        ef_model_free(m); /* after the message: it names fields of m */
        return st;
    }
    /* layers: attention specs cycle; each gets seed = model seed + layer unless it sets one */
    m->L = ef_mem_calloc((size_t)c->layers, sizeof *m->L);
    if (!m->L) {
        ef_model_free(m);
        return ef_error(EF_ERR_NOMEM, "out of memory for a model's layers");
    }
    int causal = -1;
    for (int l = 0; l < c->layers && !st; l++) {
        const char *s = c->attn[l % c->n_attn];
        char spec_l[SPEC_MAX + 64];
        if (spec_has_seed(s)) snprintf(spec_l, sizeof spec_l, "%s", s);
        else
            snprintf(spec_l, sizeof spec_l, "%s%sseed=%llu", s, strchr(s, ':') ? "," : ":",
                     (unsigned long long)(m->seed + (uint64_t)l));
        ef_block_config bc = {c->reversible ? EF_BLOCK_REVERSIBLE : EF_BLOCK_RESIDUAL,
                              spec_l,
                              m->B,
                              m->N,
                              c->dim,
                              c->heads,
                              c->ff,
                              c->chunks,
                              c->ln_eps,
                              /* layers of one spec share their plans' per-call workspace */
                              l >= c->n_attn ? m->L[l % c->n_attn].blk : NULL};
        if ((st = ef_block_new(&m->L[l].blk, &bc))) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", ef_last_error());
            st = ef_error(st, "model layer %d (attn=%s): %s", l, s, msg);
            break;
        }
        m->L[l].attn = ef_attn_block_attn(ef_block_attn(m->L[l].blk));
        m->L[l].mech_n = ef_attn_param_count(m->L[l].attn);
        int cl = strstr(ef_attn_describe(m->L[l].attn), "causal=1") != NULL;
        if (causal >= 0 && cl != causal)
            st = ef_error(EF_ERR_UNSUPPORTED,
                          "model spec: layer %d's attention is %s but layer 0's is %s (the "
                          "attention specs must agree on causal)",
                          l, cl ? "causal" : "not causal", causal ? "causal" : "not causal");
        causal = cl;
    }
    m->causal = causal > 0;
    if (!st && (st = ef_params_new(&m->P)) == EF_OK && (st = build_table(m)) == EF_OK &&
        (st = ef_params_alloc(m->P)) == EF_OK && (st = ef_params_init(m->P, m->seed)) == EF_OK) {
        for (int l = 0; l < c->layers; l++)
            if (m->L[l].mech_n)
                memcpy(T(m, m->L[l].mech), ef_attn_params(m->L[l].attn),
                       m->L[l].mech_n * sizeof(float));
        st = make_desc(m);
    }
    if (st) {
        ef_model_free(m);
        return st;
    }
    /* buffers */
    size_t act = (size_t)m->B * m->N * c->dim, bn = (size_t)m->B * m->N;
    int K = c->classes ? c->classes : c->vocab;
    m->a1 = falloc(act, &m->act_bytes);
    if (c->reversible) m->a2 = falloc(act, &m->act_bytes);
    if (m->train) {
        m->d1 = falloc(act, &m->act_bytes);
        if (c->reversible) m->d2 = falloc(act, &m->act_bytes);
    }
    for (int l = 0; l < c->layers; l++) m->ws_bytes = EF_MAX(m->ws_bytes, ef_block_ws_bytes(m->L[l].blk));
    m->ws = ef_malloc(m->ws_bytes);
    int hr = HEAD_ROWS;
    m->h_f = falloc((size_t)hr * m->W, &m->head_bytes);
    m->h_xn = falloc((size_t)hr * m->W, &m->head_bytes);
    m->h_lg = falloc((size_t)hr * K, &m->head_bytes);
    m->h_dxn = falloc((size_t)hr * m->W, &m->head_bytes);
    m->h_mean = falloc(hr, &m->head_bytes);
    m->h_rstd = falloc(hr, &m->head_bytes);
    if (c->classes) {
        m->pooled = falloc((size_t)m->B * m->W, &m->head_bytes);
        m->dpooled = falloc((size_t)m->B * m->W, &m->head_bytes);
        m->cls_lg = falloc((size_t)m->B * K, &m->head_bytes);
    }
    m->io_bytes = 0;
    m->tok = (int32_t *)falloc(bn, &m->io_bytes);
    m->tgt = (int32_t *)falloc(c->classes ? (size_t)m->B : bn, &m->io_bytes);
    m->lens = (int32_t *)falloc((size_t)m->B, &m->io_bytes);
    if (c->pos == POS_SINUSOIDAL) { /* the table, once: sin and cos were 5 % of a small model */
        m->pe = falloc((size_t)c->max_len * c->dim, &m->io_bytes);
        if (m->pe) ef_pos_sinusoidal_table(m->pe, c->max_len, c->dim);
    }
    int bad = !m->a1 || (c->reversible && !m->a2) || (m->train && (!m->d1 || (c->reversible && !m->d2))) ||
              !m->ws || !m->h_f || !m->h_xn || !m->h_lg || !m->h_dxn || !m->h_mean || !m->h_rstd ||
              (c->classes && (!m->pooled || !m->dpooled || !m->cls_lg)) || !m->tok || !m->tgt ||
              !m->lens || (c->pos == POS_SINUSOIDAL && !m->pe);
    for (int l = 0; l < c->layers && !bad && m->train; l++) {
        m->L[l].saved_bytes = ef_block_saved_bytes(m->L[l].blk);
        if (!(m->L[l].saved = ef_malloc(m->L[l].saved_bytes))) bad = 1;
    }
    if (bad) {
        ef_model_bytes b;
        ef_model_get_bytes(m, &b);
        ef_model_free(m);
        return ef_error(EF_ERR_NOMEM, "ef_model_new: out of memory (the model needs %.1f MB)",
                        (double)b.total / 1e6);
    }
    ef_clear_error();
    *out = m;
    return EF_OK;
}

const char *ef_model_describe(const ef_model *m) { return m ? m->desc : NULL; }

ef_status ef_model_get_info(const ef_model *m, ef_model_info *info) {
    if (!m || !info)
        return ef_error(EF_ERR_ARG, "ef_model_get_info: %s is NULL", !m ? "model" : "info");
    const model_cfg *c = &m->cfg;
    *info = (ef_model_info){c->layers, c->dim, c->heads, c->ff, c->vocab, c->max_len, c->classes,
                            m->causal, c->reversible, m->B, m->N, m->train};
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Parameters
 * ------------------------------------------------------------------------------------------- */
size_t ef_model_param_count(const ef_model *m) { return m ? m->P->count : 0; }
size_t ef_model_param_floats(const ef_model *m) { return m ? m->P->total : 0; }
float *ef_model_params(ef_model *m) { return m ? m->P->data : NULL; }
float *ef_model_grads(ef_model *m) { return m && m->train ? m->P->grad : NULL; }
void ef_model_zero_grad(ef_model *m) {
    if (m && m->train) ef_params_zero_grad(m->P);
}
int ef_model_tensor_count(const ef_model *m) { return m ? m->P->n : 0; }

static void tensor_info(const ef_model *m, int i, ef_tensor_info *t) {
    const ef_param *p = &m->P->t[i];
    t->name = p->name, t->ndim = p->ndim;
    for (int d = 0; d < 4; d++) t->shape[d] = d < EF_PARAM_MAX_DIMS ? p->shape[d] : 1;
    t->numel = p->numel, t->offset = p->offset, t->decay = m->decay[i];
}

ef_status ef_model_tensor(const ef_model *m, int i, ef_tensor_info *t) {
    if (!m || !t) return ef_error(EF_ERR_ARG, "ef_model_tensor: %s is NULL", !m ? "model" : "t");
    if (i < 0 || i >= m->P->n)
        return ef_error(EF_ERR_ARG, "ef_model_tensor: index %d is outside [0, %d)", i, m->P->n);
    tensor_info(m, i, t);
    return EF_OK;
}

ef_status ef_model_find(const ef_model *m, const char *name, ef_tensor_info *t) {
    if (!m || !name || !t)
        return ef_error(EF_ERR_ARG, "ef_model_find: %s is NULL",
                        !m ? "model" : !name ? "name" : "t");
    const ef_param *p;
    int i;
    ef_status st = ef_params_find(m->P, name, &p, &i);
    if (st) return st;
    tensor_info(m, i, t);
    return EF_OK;
}

ef_status ef_model_get_bytes(const ef_model *m, ef_model_bytes *b) {
    if (!m || !b) return ef_error(EF_ERR_ARG, "ef_model_get_bytes: %s is NULL", !m ? "model" : "bytes");
    memset(b, 0, sizeof *b);
    size_t act = round64((size_t)m->B * m->N * m->cfg.dim * sizeof(float));
    b->params = m->P ? m->P->total * sizeof(float) : 0;
    b->grads = m->train ? b->params : 0;
    size_t plans = 0, saved = 0;
    for (int l = 0; m->L && l < m->cfg.layers; l++) {
        if (!m->L[l].blk) continue;
        plans += ef_attn_block_own_bytes(ef_block_attn(m->L[l].blk)); /* shared ones once */
        if (m->train) saved += ef_block_saved_bytes(m->L[l].blk);
    }
    /* what forward leaves for backward: the layers' saved, and the final activations (a1 [, a2]) */
    size_t final = (m->cfg.reversible ? 2 : 1) * act;
    b->saved = m->train ? saved + final : 0;
    /* inference: the activations a1 [, a2]; training: their gradients d1 [, d2] (a1, a2 are saved) */
    b->workspace = m->ws_bytes + plans + m->head_bytes + m->io_bytes + final;
    b->total = b->params + b->grads + b->saved + b->workspace;
    return EF_OK;
}

double ef_model_flops(const ef_model *m, int backward) {
    if (!m) return 0;
    const model_cfg *c = &m->cfg;
    double tok = (double)m->B * m->N, C = c->dim, f = 0;
    for (int l = 0; l < c->layers; l++) {
        int sqk = m->L[l].wk < 0;
        double dense = tok * (2.0 * (sqk ? 3 : 4) * C * C + 4.0 * C * c->ff);
        f += dense * (backward ? 3 : 1) + ef_attn_flops(m->L[l].attn, backward);
    }
    double head = c->classes ? (double)m->B * 2.0 * m->W * c->classes : tok * 2.0 * m->W * c->vocab;
    f += head * (backward ? 3 : 1);
    return f;
}

double ef_model_attn_flops(const ef_model *m, int backward) {
    double f = 0;
    for (int l = 0; m && l < m->cfg.layers; l++) f += ef_attn_flops(m->L[l].attn, backward);
    return f;
}

void ef_model_get_stats(const ef_model *m, ef_model_stats *s) {
    if (!s) return;
    memset(s, 0, sizeof *s);
    if (!m) return;
    *s = m->stats;
    for (int l = 0; l < m->cfg.layers; l++)
        s->attn_seconds += ef_attn_block_seconds(ef_block_attn(m->L[l].blk));
}
void ef_model_reset_stats(ef_model *m) {
    if (!m) return;
    memset(&m->stats, 0, sizeof m->stats);
    for (int l = 0; l < m->cfg.layers; l++) ef_attn_block_reset_seconds(ef_block_attn(m->L[l].blk));
}

/* ---------------------------------------------------------------------------------------------
 * Forward
 * ------------------------------------------------------------------------------------------- */
static ef_status check_batch(const ef_model *m, const ef_model_batch *in, const ef_model_out *out) {
    if (!in || !out)
        return ef_error(EF_ERR_ARG, "ef_model_forward: %s is NULL", !in ? "batch" : "out");
    if (in->batch < 1 || in->batch > m->B || in->len < 1 || in->len > m->N)
        return ef_error(EF_ERR_ARG,
                        "ef_model_forward: batch=%d, len=%d outside [1, %d] x [1, %d] (the "
                        "model's batch and max_len)",
                        in->batch, in->len, m->B, m->N);
    if (!in->tokens) return ef_error(EF_ERR_ARG, "ef_model_forward: tokens is NULL");
    const model_cfg *c = &m->cfg;
    for (int b = 0; b < in->batch; b++) {
        int nv = in->lens ? in->lens[b] : in->len;
        if (nv < 0 || nv > in->len)
            return ef_error(EF_ERR_ARG, "ef_model_forward: lens[%d]=%d is outside [0, len=%d]", b,
                            nv, in->len);
        for (int t = 0; t < nv; t++) {
            int32_t v = in->tokens[(size_t)b * in->len + t];
            if (v < 0 || v >= c->vocab)
                return ef_error(EF_ERR_ARG,
                                "ef_model_forward: tokens[%d][%d]=%d is outside [0, vocab=%d)", b,
                                t, (int)v, c->vocab);
        }
        if (!in->targets) continue;
        if (c->classes) {
            int32_t y = in->targets[b];
            if (y < -1 || y >= c->classes)
                return ef_error(EF_ERR_ARG,
                                "ef_model_forward: targets[%d]=%d is outside [-1, classes=%d)", b,
                                (int)y, c->classes);
        } else {
            for (int t = 0; t < nv; t++) {
                int32_t y = in->targets[(size_t)b * in->len + t];
                if (y < -1 || y >= c->vocab)
                    return ef_error(EF_ERR_ARG,
                                    "ef_model_forward: targets[%d][%d]=%d is outside [-1, "
                                    "vocab=%d)",
                                    b, t, (int)y, c->vocab);
            }
        }
    }
    return EF_OK;
}

/* x = embed[tok] + pos on each sequence's valid rows; padded rows 0. */
static ef_status embed_forward(ef_model *m, float *x) {
    const model_cfg *c = &m->cfg;
    int C = c->dim;
    for (int b = 0; b < m->B; b++) {
        int nv = m->lens[b];
        float *xb = x + (size_t)b * m->N * C;
        ef_status st = ef_embedding_forward(xb, m->tok + (size_t)b * m->N, T(m, m->emb), nv,
                                            c->vocab, C);
        if (st) return st;
        memset(xb + (size_t)nv * C, 0, sizeof(float) * (size_t)(m->N - nv) * C);
        if (!nv) continue;
        if (c->pos == POS_SINUSOIDAL) { /* Vaswani et al.: embed * sqrt(C) + sinusoid */
            const float s = sqrtf((float)C);
            for (size_t i = 0; i < (size_t)nv * C; i++) xb[i] = xb[i] * s + m->pe[i];
        }
        else if (c->pos == POS_LEARNED)
            st = ef_pos_learned_forward(xb, T(m, m->pos0), 1, nv, c->max_len, C);
        else if (c->pos == POS_AXIAL)
            st = ef_pos_axial_forward(xb, T(m, m->pos0), T(m, m->pos1), 1, nv, C, c->ax_n1,
                                      c->ax_n2, c->ax_d1, c->ax_d2);
        if (st) return st;
    }
    return EF_OK;
}

static ef_status embed_backward(ef_model *m, float *dx) { /* dx is scaled in place */
    const model_cfg *c = &m->cfg;
    int C = c->dim;
    for (int b = 0; b < m->B; b++) {
        int nv = m->lens[b];
        if (!nv) continue;
        float *db = dx + (size_t)b * m->N * C;
        if (c->pos == POS_SINUSOIDAL) { /* x = embed * sqrt(C) + pos: d embed = sqrt(C) dx */
            const float s = sqrtf((float)C);
            for (size_t i = 0; i < (size_t)nv * C; i++) db[i] *= s;
        }
        ef_status st = ef_embedding_backward(G(m, m->emb), db, m->tok + (size_t)b * m->N, nv,
                                             c->vocab, C);
        if (!st && c->pos == POS_LEARNED)
            st = ef_pos_learned_backward(G(m, m->pos0), db, 1, nv, c->max_len, C);
        if (!st && c->pos == POS_AXIAL)
            st = ef_pos_axial_backward(G(m, m->pos0), G(m, m->pos1), db, 1, nv, C, c->ax_n1,
                                       c->ax_n2, c->ax_d1, c->ax_d2);
        if (st) return st;
    }
    return EF_OK;
}

/* The final features of rows t0 .. t0+r of sequence b into f [r][W]: a1, or concat(a1, a2). */
static void gather_rows(const ef_model *m, int b, int t0, int r, float *f) {
    int C = m->cfg.dim;
    const float *s1 = m->a1 + ((size_t)b * m->N + t0) * C;
    if (!m->cfg.reversible) {
        memcpy(f, s1, sizeof(float) * (size_t)r * C);
        return;
    }
    const float *s2 = m->a2 + ((size_t)b * m->N + t0) * C;
    for (int i = 0; i < r; i++) {
        memcpy(f + (size_t)i * 2 * C, s1 + (size_t)i * C, sizeof(float) * C);
        memcpy(f + (size_t)i * 2 * C + C, s2 + (size_t)i * C, sizeof(float) * C);
    }
}

/* The gradient of those rows, df [r][W], into d1 (and d2): overwritten. */
static void scatter_rows(ef_model *m, int b, int t0, int r, const float *df) {
    int C = m->cfg.dim;
    float *s1 = m->d1 + ((size_t)b * m->N + t0) * C;
    if (!m->cfg.reversible) {
        memcpy(s1, df, sizeof(float) * (size_t)r * C);
        return;
    }
    float *s2 = m->d2 + ((size_t)b * m->N + t0) * C;
    for (int i = 0; i < r; i++) {
        memcpy(s1 + (size_t)i * C, df + (size_t)i * 2 * C, sizeof(float) * C);
        memcpy(s2 + (size_t)i * C, df + (size_t)i * 2 * C + C, sizeof(float) * C);
    }
}

/* Log-sum-exp of a row of n logits, and the index of its largest (the first on ties). */
static double row_lse(const float *z, int n, int *arg) {
    int a = 0;
    for (int j = 1; j < n; j++)
        if (z[j] > z[a]) a = j;
    double mx = z[a], s = 0;
    for (int j = 0; j < n; j++) s += exp((double)z[j] - mx);
    *arg = a;
    return mx + log(s);
}

/* lm head over every valid row, HEAD_ROWS at a time. backward = 0: loss, count, correct, and
 * the caller's logits when asked; backward = 1: the gradients into the head's parameters and
 * d1 (d2) for the valid rows (padded rows of d1, d2 are set to 0). */
static ef_status lm_head(ef_model *m, int backward, const ef_model_batch *in, ef_model_out *out) {
    const model_cfg *c = &m->cfg;
    int W = m->W, V = c->vocab, C = c->dim;
    double loss = 0;
    int64_t count = 0, correct = 0;
    float inv = m->count ? 1.0f / (float)m->count : 0.0f;
    ef_status st = EF_OK;
    for (int b = 0; b < m->B && !st; b++) {
        int nv = m->lens[b];
        if (backward) { /* padded rows get no gradient */
            memset(m->d1 + ((size_t)b * m->N + nv) * C, 0, sizeof(float) * (size_t)(m->N - nv) * C);
            if (m->d2)
                memset(m->d2 + ((size_t)b * m->N + nv) * C, 0,
                       sizeof(float) * (size_t)(m->N - nv) * C);
        }
        for (int t0 = 0; t0 < nv && !st; t0 += HEAD_ROWS) {
            int r = EF_MIN(HEAD_ROWS, nv - t0);
            gather_rows(m, b, t0, r, m->h_f);
            ef_layernorm_forward(m->h_xn, m->h_mean, m->h_rstd, m->h_f, T(m, m->lnf_g),
                                 T(m, m->lnf_b), r, W, c->ln_eps);
            if ((st = ef_linear_forward(m->h_lg, m->h_xn, T(m, m->head_w), T(m, m->head_b), r, W,
                                        V)))
                break;
            const int32_t *tg = m->tgt + (size_t)b * m->N + t0;
            if (!backward) {
                if (out->logits)
                    memcpy(out->logits + ((size_t)b * in->len + t0) * V, m->h_lg,
                           sizeof(float) * (size_t)r * V);
                if (!m->has_tgt) continue;
                for (int i = 0; i < r; i++) {
                    if (tg[i] < 0) continue;
                    int arg;
                    const float *z = m->h_lg + (size_t)i * V;
                    loss += row_lse(z, V, &arg) - z[tg[i]];
                    count++, correct += arg == tg[i];
                }
                continue;
            }
            /* dz = (softmax(z) - onehot(target)) / count; rows without a target: 0 */
            for (int i = 0; i < r; i++) {
                float *z = m->h_lg + (size_t)i * V;
                if (tg[i] < 0) {
                    memset(z, 0, sizeof(float) * V);
                    continue;
                }
                int arg;
                double lse = row_lse(z, V, &arg);
                for (int j = 0; j < V; j++) z[j] = (float)exp((double)z[j] - lse) * inv;
                z[tg[i]] -= inv;
            }
            if ((st = ef_linear_backward(m->h_dxn, G(m, m->head_w), G(m, m->head_b), m->h_lg,
                                         m->h_xn, T(m, m->head_w), r, W, V)))
                break;
            ef_layernorm_backward(m->h_dxn, G(m, m->lnf_g), G(m, m->lnf_b), m->h_dxn, m->h_f,
                                  m->h_mean, m->h_rstd, T(m, m->lnf_g), r, W);
            scatter_rows(m, b, t0, r, m->h_dxn);
        }
    }
    if (!backward && out) {
        if (out->logits)
            for (int b = 0; b < in->batch; b++) { /* padded rows of the caller's logits: 0 */
                int nv = m->lens[b];
                memset(out->logits + ((size_t)b * in->len + nv) * V, 0,
                       sizeof(float) * (size_t)(in->len - nv) * V);
            }
        out->loss = count ? loss / (double)count : 0, out->count = count, out->correct = correct;
    }
    return st;
}

/* cls head: p [B][W] pooled from the normalised final features, logits = p Wh + bh. */
static ef_status cls_head(ef_model *m, int backward, const ef_model_batch *in, ef_model_out *out) {
    const model_cfg *c = &m->cfg;
    int W = m->W, K = c->classes, C = c->dim;
    ef_status st = EF_OK;
    if (!backward) {
        for (int b = 0; b < m->B; b++) {
            int nv = m->lens[b], rows = c->pool == POOL_FIRST ? EF_MIN(nv, 1) : nv;
            float *p = m->pooled + (size_t)b * W;
            memset(p, 0, sizeof(float) * W);
            for (int t0 = 0; t0 < rows; t0 += HEAD_ROWS) {
                int r = EF_MIN(HEAD_ROWS, rows - t0);
                gather_rows(m, b, t0, r, m->h_f);
                ef_layernorm_forward(m->h_xn, NULL, NULL, m->h_f, T(m, m->lnf_g), T(m, m->lnf_b),
                                     r, W, c->ln_eps);
                for (int i = 0; i < r; i++)
                    for (int j = 0; j < W; j++) p[j] += m->h_xn[(size_t)i * W + j];
            }
            for (int j = 0; rows > 1 && j < W; j++) p[j] /= (float)rows;
        }
        if ((st = ef_linear_forward(m->cls_lg, m->pooled, T(m, m->head_w), T(m, m->head_b), m->B,
                                    W, K)))
            return st;
        double loss = 0;
        int64_t count = 0, correct = 0;
        for (int b = 0; b < in->batch; b++) {
            float *z = m->cls_lg + (size_t)b * K;
            if (!m->lens[b]) memset(z, 0, sizeof(float) * K);
            if (out->logits) memcpy(out->logits + (size_t)b * K, z, sizeof(float) * K);
            if (!m->has_tgt || m->tgt[b] < 0 || !m->lens[b]) continue;
            int arg;
            loss += row_lse(z, K, &arg) - z[m->tgt[b]];
            count++, correct += arg == m->tgt[b];
        }
        out->loss = count ? loss / (double)count : 0, out->count = count, out->correct = correct;
        return EF_OK;
    }
    /* backward: dz per sequence, dp = dz Wh^T, spread over the pooled rows through LN_f */
    float inv = m->count ? 1.0f / (float)m->count : 0.0f;
    for (int b = 0; b < m->B; b++) {
        float *z = m->cls_lg + (size_t)b * K;
        if (!m->lens[b] || m->tgt[b] < 0) {
            memset(z, 0, sizeof(float) * K);
            continue;
        }
        int arg;
        double lse = row_lse(z, K, &arg);
        for (int j = 0; j < K; j++) z[j] = (float)exp((double)z[j] - lse) * inv;
        z[m->tgt[b]] -= inv;
    }
    if ((st = ef_linear_backward(m->dpooled, G(m, m->head_w), G(m, m->head_b), m->cls_lg,
                                 m->pooled, T(m, m->head_w), m->B, W, K)))
        return st;
    memset(m->d1, 0, sizeof(float) * (size_t)m->B * m->N * C);
    if (m->d2) memset(m->d2, 0, sizeof(float) * (size_t)m->B * m->N * C);
    for (int b = 0; b < m->B; b++) {
        int nv = m->lens[b], rows = c->pool == POOL_FIRST ? EF_MIN(nv, 1) : nv;
        const float *dp = m->dpooled + (size_t)b * W;
        float w = rows > 1 ? 1.0f / (float)rows : 1.0f;
        for (int t0 = 0; t0 < rows; t0 += HEAD_ROWS) {
            int r = EF_MIN(HEAD_ROWS, rows - t0);
            gather_rows(m, b, t0, r, m->h_f);
            ef_layernorm_forward(m->h_xn, m->h_mean, m->h_rstd, m->h_f, T(m, m->lnf_g),
                                 T(m, m->lnf_b), r, W, c->ln_eps);
            for (int i = 0; i < r; i++)
                for (int j = 0; j < W; j++) m->h_dxn[(size_t)i * W + j] = dp[j] * w;
            ef_layernorm_backward(m->h_dxn, G(m, m->lnf_g), G(m, m->lnf_b), m->h_dxn, m->h_f,
                                  m->h_mean, m->h_rstd, T(m, m->lnf_g), r, W);
            scatter_rows(m, b, t0, r, m->h_dxn);
        }
    }
    return EF_OK;
}

/* The attention plans' own parameters live in the table: copied in before every forward. */
static void push_mech_params(ef_model *m) {
    for (int l = 0; l < m->cfg.layers; l++)
        if (m->L[l].mech_n)
            memcpy(ef_attn_params(m->L[l].attn), T(m, m->L[l].mech),
                   m->L[l].mech_n * sizeof(float));
}

ef_status ef_model_forward(ef_model *m, const ef_model_batch *in, ef_model_out *out) {
    if (!m) return ef_error(EF_ERR_ARG, "ef_model_forward: model is NULL");
    ef_status st = check_batch(m, in, out);
    if (st) return st;
    double t_start = ef_now();
    const model_cfg *c = &m->cfg;
    m->ready = 0;
    /* the input in the internal layout [B][N]: sequences past in->batch are empty */
    for (int b = 0; b < m->B; b++) {
        int nv = b < in->batch ? (in->lens ? in->lens[b] : in->len) : 0;
        m->lens[b] = nv;
        memcpy(m->tok + (size_t)b * m->N, in->tokens + (size_t)b * in->len, sizeof(int32_t) * nv);
        if (c->classes) m->tgt[b] = in->targets && b < in->batch ? in->targets[b] : -1;
        else if (in->targets)
            memcpy(m->tgt + (size_t)b * m->N, in->targets + (size_t)b * in->len,
                   sizeof(int32_t) * nv);
    }
    m->has_tgt = in->targets != NULL;
    int keep = m->train && m->has_tgt && !in->no_grad;
    push_mech_params(m);
    if ((st = embed_forward(m, m->a1))) return st;
    if (c->reversible) memcpy(m->a2, m->a1, sizeof(float) * (size_t)m->B * m->N * c->dim);
    for (int l = 0; l < c->layers && !st; l++) {
        ef_block_params p = layer_params(m, &m->L[l]);
        void *sv = keep ? m->L[l].saved : NULL;
        st = c->reversible ? ef_block_rev_forward(m->L[l].blk, &p, m->a1, m->a2, m->lens, sv, m->ws)
                           : ef_block_res_forward(m->L[l].blk, &p, m->a1, m->lens, m->a1, sv, m->ws);
    }
    if (!st) st = c->classes ? cls_head(m, 0, in, out) : lm_head(m, 0, in, out);
    if (st) return st;
    m->count = out->count;
    m->ready = keep;
    m->stats.forwards++;
    m->stats.total_seconds += ef_now() - t_start;
    return EF_OK;
}

ef_status ef_model_capture_qkv(ef_model *m, const ef_model_batch *in, int layer, float *q,
                                float *k, float *v) {
    if (!m || !in || !q || !k || !v)
        return ef_error(EF_ERR_ARG, "ef_model_capture_qkv: %s is NULL",
                        !m ? "model" : !in ? "in" : !q ? "q" : !k ? "k" : "v");
    if (layer < 0 || layer >= m->cfg.layers)
        return ef_error(EF_ERR_ARG, "ef_model_capture_qkv: layer %d is not in [0, %d)", layer,
                        m->cfg.layers);
    int H = m->cfg.heads, D = m->cfg.dim / H, N = m->N;
    size_t per = (size_t)m->B * H * N * D;
    float *cap = ef_malloc(3 * per * sizeof(float));
    if (!cap) return EF_ERR_NOMEM; /* ef_malloc said so */
    ef_model_batch b = *in;
    b.targets = NULL, b.no_grad = 1;
    ef_model_out out = {0};
    ef_attn_block *ab = ef_block_attn(m->L[layer].blk);
    ef_attn_block_capture(ab, cap);
    ef_status st = ef_model_forward(m, &b, &out);
    ef_attn_block_capture(ab, NULL);
    if (!st) /* [B][H][N][D] of the model -> [in->batch][H][in->len][D] */
        for (int t = 0; t < 3; t++) {
            float *dst = t == 0 ? q : t == 1 ? k : v;
            for (int bb = 0; bb < in->batch; bb++)
                for (int h = 0; h < H; h++)
                    memcpy(dst + ((size_t)bb * H + h) * in->len * D,
                           cap + t * per + ((size_t)bb * H + h) * N * D,
                           sizeof(float) * (size_t)in->len * D);
        }
    ef_free(cap);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Incremental decoding (ef_model_decoder_*): one position at a time through every layer, the
 * attention by ef_attn_step on each layer's decoding state. Row 0 of the plans' batch carries
 * the sequence (the other rows stay 0).
 * ------------------------------------------------------------------------------------------- */
struct ef_model_decoder {
    ef_model *m;
    ef_attn_state **st; /* [layers] */
    int64_t pos;
    float *pos_table;                       /* [max_len][C] learned/axial positions (or NULL) */
    float *x1, *x2, *u, *t, *hid, *q, *k, *v, *o, *f, *fx; /* rows of one position */
};

void ef_model_decoder_free(ef_model_decoder *d) {
    if (!d) return;
    for (int l = 0; d->st && l < d->m->cfg.layers; l++) ef_attn_state_free(d->st[l]);
    ef_free(d->st);
    ef_free(d->pos_table), ef_free(d->x1), ef_free(d->u), ef_free(d->t);
    ef_free(d->hid), ef_free(d->q), ef_free(d->k), ef_free(d->v), ef_free(d->o);
    ef_free(d->f), ef_free(d->fx);
    ef_free(d);
}

ef_status ef_model_decoder_new(ef_model_decoder **out, ef_model *m) {
    if (!out || !m)
        return ef_error(EF_ERR_ARG, "ef_model_decoder_new: %s is NULL", !out ? "out" : "model");
    *out = NULL;
    const model_cfg *c = &m->cfg;
    if (c->classes || !m->causal)
        return ef_error(EF_ERR_UNSUPPORTED, "ef_model_decoder_new: decoding needs a causal model "
                                            "with head=lm (this one is %s)",
                        c->classes ? "a classifier" : "an encoder");
    for (int l = 0; l < c->layers; l++) {
        ef_attn_caps caps;
        const char *spec = ef_attn_describe(m->L[l].attn);
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)strcspn(spec, ":"), spec);
        if (ef_attn_get_caps(name, &caps) || !caps.decode)
            return ef_error(EF_ERR_UNSUPPORTED,
                            "ef_model_decoder_new: layer %d's attention %s has no decoding state "
                            "(linear and performer with causal=1 have one; others recompute the "
                            "prefix)",
                            l, name);
    }
    ef_model_decoder *d = ef_mem_calloc(1, sizeof *d);
    if (!d) return ef_error(EF_ERR_NOMEM, "ef_model_decoder_new: out of memory");
    d->m = m;
    size_t C = (size_t)c->dim, row = (size_t)m->B * C;
    d->st = ef_mem_calloc((size_t)c->layers, sizeof *d->st);
    ef_status st = d->st ? EF_OK : ef_error(EF_ERR_NOMEM, "ef_model_decoder_new: out of memory");
    for (int l = 0; l < c->layers && !st; l++) st = ef_attn_state_new(&d->st[l], m->L[l].attn);
    if (!st) {
        d->x1 = ef_malloc(2 * C * sizeof(float)), d->x2 = d->x1 ? d->x1 + C : NULL;
        d->u = ef_malloc(C * sizeof(float)), d->t = ef_malloc(C * sizeof(float));
        d->hid = ef_malloc((size_t)c->ff * sizeof(float));
        d->q = ef_malloc(row * sizeof(float)), d->k = ef_malloc(row * sizeof(float));
        d->v = ef_malloc(row * sizeof(float)), d->o = ef_malloc(row * sizeof(float));
        d->f = ef_malloc(2 * C * sizeof(float)), d->fx = ef_malloc(2 * C * sizeof(float));
        if (!d->x1 || !d->u || !d->t || !d->hid || !d->q || !d->k || !d->v || !d->o || !d->f ||
            !d->fx)
            st = EF_ERR_NOMEM;
    }
    if (!st && (c->pos == POS_LEARNED || c->pos == POS_AXIAL)) { /* the table, from the layer */
        size_t n = (size_t)c->max_len * C;
        if (!(d->pos_table = ef_malloc(n * sizeof(float)))) st = EF_ERR_NOMEM;
        if (!st) {
            memset(d->pos_table, 0, n * sizeof(float));
            st = c->pos == POS_LEARNED
                     ? ef_pos_learned_forward(d->pos_table, T(m, m->pos0), 1, c->max_len,
                                              c->max_len, c->dim)
                     : ef_pos_axial_forward(d->pos_table, T(m, m->pos0), T(m, m->pos1), 1,
                                            c->max_len, c->dim, c->ax_n1, c->ax_n2, c->ax_d1,
                                            c->ax_d2);
        }
    }
    if (!st) {
        memset(d->q, 0, row * sizeof(float)), memset(d->k, 0, row * sizeof(float));
        memset(d->v, 0, row * sizeof(float));
        *out = d;
        return EF_OK;
    }
    ef_model_decoder_free(d);
    return st == EF_ERR_NOMEM ? ef_error(EF_ERR_NOMEM, "ef_model_decoder_new: out of memory") : st;
}

int64_t ef_model_decoder_position(const ef_model_decoder *d) { return d ? d->pos : -1; }

ef_status ef_model_decoder_reset(ef_model_decoder *d) {
    if (!d) return ef_error(EF_ERR_ARG, "ef_model_decoder_reset: decoder is NULL");
    for (int l = 0; l < d->m->cfg.layers; l++) {
        ef_status st = ef_attn_state_reset(d->st[l]);
        if (st) return st;
    }
    d->pos = 0;
    return EF_OK;
}

/* The attention sub-layer on one row: t = Attn(LN1(x)) (C floats). */
static ef_status decode_attn(ef_model_decoder *d, int l, const float *x, float *t) {
    ef_model *m = d->m;
    const model_cfg *c = &m->cfg;
    const layer_t *L = &m->L[l];
    int C = c->dim;
    ef_layernorm_forward(d->u, NULL, NULL, x, T(m, L->ln1_g), T(m, L->ln1_b), 1, C, c->ln_eps);
    ef_status st = ef_linear_forward(d->q, d->u, T(m, L->wq), T(m, L->bq), 1, C, C);
    if (!st && L->wk >= 0) st = ef_linear_forward(d->k, d->u, T(m, L->wk), T(m, L->bk), 1, C, C);
    if (!st) st = ef_linear_forward(d->v, d->u, T(m, L->wv), T(m, L->bv), 1, C, C);
    if (!st) st = ef_attn_step(L->attn, d->st[l], d->q, d->k, d->v, d->o);
    if (!st) st = ef_linear_forward(t, d->o, T(m, L->wo), T(m, L->bo), 1, C, C);
    return st;
}

/* The feed-forward sub-layer on one row: t = FFN(LN2(x)). */
static ef_status decode_ffn(ef_model_decoder *d, int l, const float *x, float *t) {
    ef_model *m = d->m;
    const model_cfg *c = &m->cfg;
    const layer_t *L = &m->L[l];
    int C = c->dim;
    ef_layernorm_forward(d->u, NULL, NULL, x, T(m, L->ln2_g), T(m, L->ln2_b), 1, C, c->ln_eps);
    ef_status st = ef_linear_forward(d->hid, d->u, T(m, L->w1), T(m, L->b1), 1, C, c->ff);
    if (st) return st;
    ef_gelu_forward(d->hid, d->hid, (size_t)c->ff);
    return ef_linear_forward(t, d->hid, T(m, L->w2), T(m, L->b2), 1, c->ff, C);
}

ef_status ef_model_decode_step(ef_model_decoder *d, int32_t token, float *logits) {
    if (!d || !logits)
        return ef_error(EF_ERR_ARG, "ef_model_decode_step: %s is NULL", !d ? "decoder" : "logits");
    ef_model *m = d->m;
    const model_cfg *c = &m->cfg;
    int C = c->dim;
    if (token < 0 || token >= c->vocab)
        return ef_error(EF_ERR_ARG, "ef_model_decode_step: token %d is not in [0, %d)", token,
                        c->vocab);
    if (d->pos >= c->max_len)
        return ef_error(EF_ERR_ARG, "ef_model_decode_step: position %lld is past max_len %d",
                        (long long)d->pos, c->max_len);
    /* x = the embedding of the token at position pos, as embed_forward makes it */
    const float *e = T(m, m->emb) + (size_t)token * C;
    for (int i = 0; i < C; i++)
        d->x1[i] = c->pos == POS_SINUSOIDAL ? e[i] * sqrtf((float)C) + m->pe[d->pos * C + i]
                   : d->pos_table             ? e[i] + d->pos_table[d->pos * C + i]
                                              : e[i];
    ef_status st = EF_OK;
    if (c->reversible) memcpy(d->x2, d->x1, sizeof(float) * C);
    for (int l = 0; l < c->layers && !st; l++) {
        if (c->reversible) { /* y1 = x1 + F(x2); y2 = x2 + G(y1) */
            if ((st = decode_attn(d, l, d->x2, d->t))) break;
            for (int i = 0; i < C; i++) d->x1[i] += d->t[i];
            if ((st = decode_ffn(d, l, d->x1, d->t))) break;
            for (int i = 0; i < C; i++) d->x2[i] += d->t[i];
        } else { /* h = x + F(x); x = h + G(h) */
            if ((st = decode_attn(d, l, d->x1, d->t))) break;
            for (int i = 0; i < C; i++) d->x1[i] += d->t[i];
            if ((st = decode_ffn(d, l, d->x1, d->t))) break;
            for (int i = 0; i < C; i++) d->x1[i] += d->t[i];
        }
    }
    if (st) return st;
    /* the head: LN_f over W (C, or 2C for the reversible pair), then the vocabulary */
    int W = m->W;
    memcpy(d->f, d->x1, sizeof(float) * (size_t)W); /* x2 follows x1 in the pair's buffer */
    ef_layernorm_forward(d->fx, NULL, NULL, d->f, T(m, m->lnf_g), T(m, m->lnf_b), 1, W, c->ln_eps);
    if ((st = ef_linear_forward(logits, d->fx, T(m, m->head_w), T(m, m->head_b), 1, W, c->vocab)))
        return st;
    d->pos++;
    return EF_OK;
}

ef_status ef_model_backward(ef_model *m) {
    if (!m) return ef_error(EF_ERR_ARG, "ef_model_backward: model is NULL");
    if (!m->train)
        return ef_error(EF_ERR_ARG, "ef_model_backward: the model was made with train=0");
    if (!m->ready)
        return ef_error(EF_ERR_ARG, "ef_model_backward: no forward with targets to differentiate "
                                    "since the last backward");
    double t_start = ef_now();
    const model_cfg *c = &m->cfg;
    m->ready = 0;
    ef_status st = c->classes ? cls_head(m, 1, NULL, NULL) : lm_head(m, 1, NULL, NULL);
    for (int l = c->layers - 1; l >= 0 && !st; l--) {
        ef_block_params p = layer_params(m, &m->L[l]);
        ef_block_grads g = layer_grads(m, &m->L[l]);
        st = c->reversible ? ef_block_rev_backward(m->L[l].blk, &p, m->a1, m->a2, m->d1, m->d2,
                                                   m->lens, m->L[l].saved, &g, m->ws)
                           : ef_block_res_backward(m->L[l].blk, &p, m->d1, m->lens,
                                                   m->L[l].saved, m->d1, &g, m->ws);
    }
    if (st) return st;
    if (c->reversible) { /* x fed both halves: dx = dx1 + dx2 */
        size_t n = (size_t)m->B * m->N * c->dim;
        for (size_t i = 0; i < n; i++) m->d1[i] += m->d2[i];
    }
    if ((st = embed_backward(m, m->d1))) return st;
    for (int l = 0; l < c->layers; l++) { /* the plans' own gradients into the table */
        size_t n = m->L[l].mech_n;
        if (!n) continue;
        float *src = ef_attn_param_grads(m->L[l].attn), *dst = G(m, m->L[l].mech);
        for (size_t i = 0; i < n; i++) dst[i] += src[i];
        memset(src, 0, n * sizeof(float));
    }
    m->stats.backwards++;
    m->stats.total_seconds += ef_now() - t_start;
    return EF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Checkpoints
 * ------------------------------------------------------------------------------------------- */
ef_status ef_model_save(const ef_model *m, const char *path) {
    if (!m || !path) return ef_error(EF_ERR_ARG, "ef_model_save: %s is NULL", !m ? "model" : "path");
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)m->seed);
    ef_ckpt_meta meta[] = {{"eformer.spec", m->desc},
                           {"eformer.seed", seed},
                           {"eformer.version", ef_version()},
                           {"format", "pt"}};
    return ef_ckpt_save(m->P, path, meta, 4);
}

ef_status ef_model_load_params(ef_model *m, const char *path) {
    if (!m || !path)
        return ef_error(EF_ERR_ARG, "ef_model_load_params: %s is NULL", !m ? "model" : "path");
    char *spec = NULL;
    ef_status st = ef_ckpt_read_meta(path, "eformer.spec", &spec);
    if (st) return st;
    if (strcmp(spec, m->desc)) {
        st = ef_error(EF_ERR_FORMAT, "%s: its model spec '%s' differs from this model's '%s'",
                      path, spec, m->desc);
        ef_free(spec);
        return st;
    }
    ef_free(spec);
    if ((st = ef_ckpt_load(m->P, path))) return st;
    m->ready = 0;
    return EF_OK;
}

ef_status ef_model_load(ef_model **out, const char *path, const ef_model_opts *opts) {
    if (!out) return ef_error(EF_ERR_ARG, "ef_model_load: out is NULL");
    *out = NULL;
    if (!path) return ef_error(EF_ERR_ARG, "ef_model_load: path is NULL");
    char *spec = NULL, *seed_s = NULL;
    ef_status st = ef_ckpt_read_meta(path, "eformer.spec", &spec);
    if (!st) st = ef_ckpt_read_meta(path, "eformer.seed", &seed_s);
    ef_model_opts o = opts ? *opts : (ef_model_opts){0};
    if (!st) {
        char *end;
        errno = 0;
        unsigned long long s = strtoull(seed_s, &end, 10);
        if (!*seed_s || *end || errno)
            st = ef_error(EF_ERR_FORMAT, "%s: eformer.seed='%s' is not an integer", path, seed_s);
        o.seed = s;
    }
    ef_model *m = NULL;
    if (!st && (st = ef_model_new(&m, spec, &o)) && st != EF_ERR_NOMEM) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ef_last_error());
        st = ef_error(EF_ERR_FORMAT, "%s: its model spec cannot be built: %s", path, msg);
    }
    if (!st && (st = ef_model_load_params(m, path))) ef_model_free(m), m = NULL;
    ef_free(spec);
    ef_free(seed_s);
    if (!st) *out = m;
    return st;
}
