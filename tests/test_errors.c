/*
 * test_errors.c - the error returns no other test reached (issue 14: "every failure path
 * exercised"). `./run.sh coverage` lists the `ef_error` calls the suite never executes; this
 * file takes them one by one: each check gives the bad input and wants the exact status and a
 * message that names the bad value.
 */
#define _DEFAULT_SOURCE /* mkdtemp */
#include "harness.h"
#include "model/params.h"
#include "nn/nn.h"
#include "train/optim.h"
#include "train/tasks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LABEL(...) (snprintf(label, sizeof label, __VA_ARGS__), label)
static char label[600];
static char dir[] = "/tmp/ef_errors_XXXXXX";

/* st must be `want` and the message must contain `needle` (NULL: any non-empty message) */
static void want(const char *name, ef_status st, ef_status want_st, const char *needle) {
    const char *msg = ef_last_error();
    int ok = st == want_st && msg && msg[0] && (!needle || strstr(msg, needle));
    ef_check(name, ok, "%s (want %s%s%s): '%s'", ef_status_str(st), ef_status_str(want_st),
             needle ? " naming " : "", needle ? needle : "", msg ? msg : "(null)");
}

static void model_err(const char *spec, ef_status st_want, const char *needle) {
    ef_model *m = (ef_model *)&m;
    ef_model_opts o = {1, 1, 0};
    ef_status st = ef_model_new(&m, spec, &o);
    want(LABEL("model spec '%.80s'", spec), st, st_want, needle);
    ef_check(LABEL("model spec '%.80s': *out = NULL", spec), m == NULL, "%p", (void *)m);
    if (st == EF_OK) ef_model_free(m);
}

/* ---------------------------------------------------------------------------------------------
 * Attention options and calls
 * ------------------------------------------------------------------------------------------- */
static void test_attn(void) {
    const ef_attn_shape s = {1, 2, 64, 64, 8, 8};
    char spec[1024];
    struct {
        const char *spec, *needle;
    } bad[] = {
        {"longformer:global=1;;3", "empty or too long item"},
        {"longformer:global=;", "empty or too long item"},
        {"longformer:global=1;"
         "000000000000000000000000000000000000000000000000000000000000000000002",
         "empty or too long item"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ef_attn *a = NULL;
        want(LABEL("ef_attn_new '%.60s'", bad[i].spec), ef_attn_new(&a, bad[i].spec, &s),
             EF_ERR_ARG, bad[i].needle);
        ef_attn_free(a);
    }
    /* 65 items: one more than a list holds */
    int n = snprintf(spec, sizeof spec, "longformer:global=0");
    for (int i = 1; i < 65; i++) n += snprintf(spec + n, sizeof spec - (size_t)n, ";%d", i);
    ef_attn *a = NULL;
    want("longformer: a global list of 65 items", ef_attn_new(&a, spec, &s), EF_ERR_ARG,
         "more than 64 items");
    ef_attn_free(a);

    /* ef_attn_visible / _visible_pairs: a NULL plan and a head outside the plan */
    a = NULL;
    if (ef_attn_new(&a, "local:window=4", &s) == EF_OK) {
        ef_check("ef_attn_visible(NULL) is -1", ef_attn_visible(NULL, 0, 0, 0) == -1, "%s", "");
        want("ef_attn_visible(NULL) sets the error", EF_ERR_ARG, EF_ERR_ARG, "plan is NULL");
        ef_check("ef_attn_visible head=2 of 2 is -1", ef_attn_visible(a, 2, 0, 0) == -1, "%s", "");
        want("ef_attn_visible head=2 names it", EF_ERR_ARG, EF_ERR_ARG, "head=2");
        ef_check("ef_attn_visible_pairs(NULL) < 0", ef_attn_visible_pairs(NULL, 0) < 0, "%s", "");
        want("ef_attn_visible_pairs(NULL) sets the error", EF_ERR_ARG, EF_ERR_ARG, "plan is NULL");
        ef_check("ef_attn_visible_pairs head=-1 < 0", ef_attn_visible_pairs(a, -1) < 0, "%s", "");
        want("ef_attn_visible_pairs head=-1 names it", EF_ERR_ARG, EF_ERR_ARG, "head=-1");
    }
    ef_attn_free(a);

    /* replay: every mechanism that makes discrete choices either replays them or says it
     * cannot (EF_ERR_UNSUPPORTED naming itself); the others replay as a forward */
    ef_test_bufs in, o;
    ef_test_inputs(&in, s, 3, 1.0f);
    ef_test_outputs(&o, &in);
    for (int i = 0; i < ef_attn_count(); i++) {
        const char *name = ef_attn_name(i);
        ef_attn_caps caps;
        a = NULL;
        if (ef_attn_get_caps(name, &caps) || ef_attn_new(&a, name, &s)) continue;
        void *saved = ef_test_saved(a);
        ef_attn_io io = {in.q, in.k, in.v, NULL, o.out};
        ef_status st = ef_attn_forward(a, &io, saved);
        if (!st) st = ef_attn_forward_replay(a, &io, saved);
        if (st == EF_ERR_UNSUPPORTED)
            want(LABEL("%s: replay unsupported, said so", name), st, EF_ERR_UNSUPPORTED,
                 "replaying saved choices is not implemented");
        else
            ef_check(LABEL("%s: forward then replay", name), st == EF_OK && caps.discrete >= 0,
                     "%s", ef_last_error());
        ef_free(saved);
        ef_attn_free(a);
    }
    ef_test_free_outputs(&o);
    ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * Model specs, options, the decoder
 * ------------------------------------------------------------------------------------------- */
static void test_model(void) {
    const char *base = "layers=1,dim=16,heads=2,vocab=11,max_len=16";
    char spec[6000];
    struct {
        const char *extra;
        ef_status st;
        const char *needle;
    } bad[] = {
        {"pos=axial,axial_shape=4x", EF_ERR_ARG, "axial_shape=4x is not AxB"},
        {"pos=axial,axial_shape=axb", EF_ERR_ARG, "is not AxB"},
        {"layers", EF_ERR_FORMAT, "'layers' is not key=value"},
        {"ff=", EF_ERR_FORMAT, "'ff=' is not key=value"},
        {"ln_eps=0", EF_ERR_ARG, "ln_eps=0 must be a number in (0, 1]"},
        {"ln_eps=2", EF_ERR_ARG, "ln_eps=2 must be"},
        {"ln_eps=nan", EF_ERR_ARG, "ln_eps=nan must be"},
        {"ln_eps=1e-50", EF_ERR_ARG, "ln_eps=1e-50 underflows in fp32"},
        {"attn=flash,attn=local", EF_ERR_ARG, "attn= given twice"},
        {"head=lm,head=lm", EF_ERR_ARG, "head= given twice"},
        {"attn=flash||local", EF_ERR_ARG, "empty attention spec"},
        {"head=pool", EF_ERR_ARG, "head=pool is not lm or cls:classes=K"},
        {"axial_shape=4x4", EF_ERR_ARG, "need pos=axial"},
        {"axial_dims=8x8", EF_ERR_ARG, "need pos=axial"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(spec, sizeof spec, "%s,%s", base, bad[i].extra);
        model_err(spec, bad[i].st, bad[i].needle);
    }
    /* 65 attention specs in the cycle: one more than a cycle holds */
    int n = snprintf(spec, sizeof spec, "%s,attn=flash", base);
    for (int i = 1; i < 65; i++) n += snprintf(spec + n, sizeof spec - (size_t)n, "|flash");
    model_err(spec, EF_ERR_ARG, "more than 64 attention specs");
    /* a spec longer than 4096 characters */
    memset(spec, 'x', 5000);
    memcpy(spec, "layers=1,", 9);
    spec[5000] = 0;
    model_err(spec, EF_ERR_ARG, "5000 characters (at most 4096)");

    ef_model *m = NULL;
    ef_model_opts o = {-1, 0, 0};
    want("ef_model_new batch=-1", ef_model_new(&m, base, &o), EF_ERR_ARG, "batch=-1 must be >= 0");
    o = (ef_model_opts){1, 0, 2};
    want("ef_model_new train=2", ef_model_new(&m, base, &o), EF_ERR_ARG,
         "train=2 is neither 0 nor 1");
    ef_model_decoder *d = NULL;
    want("ef_model_decoder_new(out NULL)", ef_model_decoder_new(NULL, (ef_model *)&d), EF_ERR_ARG,
         "out is NULL");
    want("ef_model_decoder_new(model NULL)", ef_model_decoder_new(&d, NULL), EF_ERR_ARG,
         "model is NULL");
}

/* ---------------------------------------------------------------------------------------------
 * Checkpoints whose metadata was changed: the same length, so the file stays well formed
 * ------------------------------------------------------------------------------------------- */
/* Replaces the first `from` in the file by `to` (same length); 1 on success. */
static int patch_file(const char *path, const char *from, const char *to) {
    size_t n, k = strlen(from);
    unsigned char *b = ef_test_read_file(path, &n);
    unsigned char *at = NULL;
    for (size_t i = 0; b && strlen(to) == k && i + k <= n && !at; i++)
        if (!memcmp(b + i, from, k)) at = b + i;
    if (at) memcpy(at, to, k);
    int ok = at && ef_test_write_file(path, b, n) == 0;
    free(b);
    return ok;
}

static void copy_file(const char *from, const char *to) {
    size_t n;
    unsigned char *b = ef_test_read_file(from, &n);
    if (b) ef_test_write_file(to, b, n);
    free(b);
}

static void test_checkpoints(void) {
    const char *spec = "layers=1,dim=16,heads=2,ff=32,vocab=11,max_len=16,attn=flash:causal=1";
    char path[256], opt[300], work[256], wopt[300];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    snprintf(opt, sizeof opt, "%s%s", path, EF_TRAIN_OPT_SUFFIX);
    snprintf(work, sizeof work, "%s/b.safetensors", dir);
    snprintf(wopt, sizeof wopt, "%s%s", work, EF_TRAIN_OPT_SUFFIX);
    ef_model_opts mo = {1, 12345, 1};
    ef_model *m = NULL, *m2 = NULL;
    ef_optim *o = NULL, *o2 = NULL;
    ef_optim_opts oo = ef_optim_defaults();
    ef_status st = ef_model_new(&m, spec, &mo);
    if (!st) st = ef_optim_new(&o, m, &oo);
    if (!st) st = ef_train_save(o, path, NULL, 0);
    if (st) {
        ef_check("a training checkpoint to tamper with", 0, "%s", ef_last_error());
        ef_optim_free(o), ef_model_free(m);
        return;
    }

    /* the model file: eformer.seed not an integer; a spec that does not build */
    copy_file(path, work);
    ef_check("tamper: seed", patch_file(work, "12345", "12a45"), "%s", "");
    want("ef_model_load: eformer.seed='12a45'", ef_model_load(&m2, work, &mo), EF_ERR_FORMAT,
         "eformer.seed='12a45' is not an integer");
    copy_file(path, work);
    ef_check("tamper: spec", patch_file(work, "layers=1,", "layers=0,"), "%s", "");
    want("ef_model_load: layers=0 in eformer.spec", ef_model_load(&m2, work, &mo), EF_ERR_FORMAT,
         "its model spec cannot be built");
    ef_check("ef_model_load failures leave *out NULL", m2 == NULL, "%s", "");

    /* the optimizer file: a step that is not a number; a hash that is not 16 hex digits */
    copy_file(path, work);
    copy_file(opt, wopt);
    ef_check("tamper: step", patch_file(wopt, "\"eformer.step\":\"0\"", "\"eformer.step\":\"x\""),
             "%s", "");
    want("ef_train_load: eformer.step='x'", ef_train_load(o, work), EF_ERR_FORMAT,
         "eformer.step='x' is not a non-negative integer");
    copy_file(opt, wopt);
    char *hash = NULL, from[64], to[64];
    if (ef_ckpt_read_meta(opt, "eformer.params_hash", &hash) == EF_OK && strlen(hash) == 16) {
        snprintf(from, sizeof from, "\"%s\"", hash);
        snprintf(to, sizeof to, "\"g%s\"", hash + 1);
    }
    ef_free(hash);
    ef_check("tamper: hash", patch_file(wopt, from, to), "%s", "");
    want("ef_train_load: params_hash not hex", ef_train_load(o, work), EF_ERR_FORMAT,
         "is not 16 hex digits");

    /* ef_train_save and ef_train_resume arguments */
    ef_ckpt_meta meta[2] = {{"run", "1"}, {NULL, "x"}};
    want("ef_train_save: n_meta=-1", ef_train_save(o, work, meta, -1), EF_ERR_ARG, "n_meta=-1");
    want("ef_train_save: n_meta=1, meta NULL", ef_train_save(o, work, NULL, 1), EF_ERR_ARG,
         "n_meta=1 with meta NULL");
    want("ef_train_save: a NULL key", ef_train_save(o, work, meta, 2), EF_ERR_ARG,
         "entry 1 has a NULL key");
    meta[1] = (ef_ckpt_meta){"k", NULL};
    want("ef_train_save: a NULL value", ef_train_save(o, work, meta, 2), EF_ERR_ARG,
         "entry 1 has a NULL value");
    want("ef_train_resume(m NULL)", ef_train_resume(NULL, &o2, path, &mo, NULL), EF_ERR_ARG,
         "m is NULL");
    want("ef_train_resume(o NULL)", ef_train_resume(&m2, NULL, path, &mo, NULL), EF_ERR_ARG,
         "o is NULL");
    want("ef_train_resume(path NULL)", ef_train_resume(&m2, &o2, NULL, &mo, NULL), EF_ERR_ARG,
         "path is NULL");

    /* ef_ckpt_save (the parameter table's writer): metadata arguments */
    ef_params *p = NULL;
    if (ef_params_new(&p) == EF_OK &&
        ef_params_add(p, "w", 1, (int64_t[]){4}, ef_init_zeros(), NULL) == EF_OK &&
        ef_params_alloc(p) == EF_OK) {
        want("ef_ckpt_save: n_meta=-2", ef_ckpt_save(p, work, NULL, -2), EF_ERR_ARG,
             "n_meta=-2 with meta NULL");
        want("ef_ckpt_save: n_meta=1, meta NULL", ef_ckpt_save(p, work, NULL, 1), EF_ERR_ARG,
             "n_meta=1 with meta NULL");
        ef_ckpt_meta bad_utf8[1] = {{"\xff\xfe", "v"}};
        want("ef_ckpt_save: a key that is not UTF-8", ef_ckpt_save(p, work, bad_utf8, 1),
             EF_ERR_ARG, "not valid UTF-8");
    } else {
        ef_check("a parameter table", 0, "%s", ef_last_error());
    }
    ef_params_free(p);
    remove(work), remove(wopt), remove(path), remove(opt);
    ef_optim_free(o);
    ef_model_free(m);
}

/* Hand-written safetensors files: 8-byte little-endian header length, the header, the data */
static void write_st(const char *path, const char *header, size_t data_bytes) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(header);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, n, f);
    for (size_t i = 0; i < data_bytes; i++) fputc(0, f);
    fclose(f);
}

static void test_safetensors(void) {
    char path[256];
    snprintf(path, sizeof path, "%s/h.safetensors", dir);
    struct {
        const char *header, *needle;
    } bad[] = {
        {"[1,2,3]", "header is not a JSON object"},
        {"{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
         "has field 'dtype' twice"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}",
         "has a shape that is not"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,16]}}",
         "shape is too large"},
        {"{\"__metadata__\":{\"a\":\"b\"},\"__metadata__\":{\"c\":\"d\"},"
         "\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
         "'__metadata__' appears twice"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_st(path, bad[i].header, 16);
        char *v = NULL;
        want(LABEL("safetensors header %.70s", bad[i].header), ef_ckpt_read_meta(path, "a", &v),
             EF_ERR_FORMAT, bad[i].needle);
        ef_free(v);
    }
    remove(path);
}

/* ---------------------------------------------------------------------------------------------
 * Training: schedules, clipping
 * ------------------------------------------------------------------------------------------- */
static void test_optim(void) {
    ef_sched s = ef_sched_defaults();
    s.kind = (ef_sched_kind)99;
    want("ef_sched_check: kind 99", ef_sched_check(&s), EF_ERR_ARG, "kind 99 is unknown");
    char buf[256];
    want("ef_sched_describe: kind 99", ef_sched_describe(&s, buf, sizeof buf), EF_ERR_ARG,
         "kind 99 is unknown");
    s = ef_sched_defaults(), s.min_lr = -1;
    want("ef_sched_check: min_lr=-1", ef_sched_check(&s), EF_ERR_ARG, "min_lr=-1 must be");
    s = ef_sched_defaults(), s.warmup = -3;
    want("ef_sched_check: warmup=-3", ef_sched_check(&s), EF_ERR_ARG, "warmup=-3 must be >= 0");
    s = ef_sched_defaults(), s.total = -4;
    want("ef_sched_check: total=-4", ef_sched_check(&s), EF_ERR_ARG, "total=-4 must be >= 0");
    want("ef_sched_parse(NULL spec)", ef_sched_parse(NULL, &s), EF_ERR_ARG, "spec is NULL");
    want("ef_sched_parse(NULL out)", ef_sched_parse("cosine", NULL), EF_ERR_ARG, "out is NULL");
    float g[2] = {1, 2};
    double norm;
    want("ef_clip_grad_norm(norm NULL)", ef_clip_grad_norm(g, 2, 1.0, NULL), EF_ERR_ARG,
         "norm is NULL");
    want("ef_clip_grad_norm(g NULL, n=2)", ef_clip_grad_norm(NULL, 2, 1.0, &norm), EF_ERR_ARG,
         "g is NULL");
    ef_optim_opts oo = ef_optim_defaults();
    want("ef_optim_describe: a 4-byte buffer", ef_optim_describe(&oo, buf, 4), EF_ERR_ARG,
         "the buffer has 4");
}

/* ---------------------------------------------------------------------------------------------
 * Tasks
 * ------------------------------------------------------------------------------------------- */
static void test_tasks(void) {
    struct {
        const char *spec, *needle;
    } bad[] = {
        {"recall:len=64,colour=3", "unknown key 'colour'"},
        {"text:/nonexistent,colour=3", "unknown key 'colour' (keys: file, len, heldout)"},
        {"mnist:colour=3", "unknown key 'colour' (keys: dir, levels, side)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ef_task *t = NULL;
        want(LABEL("task spec '%s'", bad[i].spec), ef_task_new(&t, bad[i].spec, 1), EF_ERR_ARG,
             bad[i].needle);
        ef_task_free(t);
    }
    char spec[5000];
    memset(spec, 'a', 4999);
    memcpy(spec, "dup:", 4);
    spec[4999] = 0;
    ef_task *t = NULL;
    want("task spec of 4999 characters", ef_task_new(&t, spec, 1), EF_ERR_ARG, "4999 characters");

    int32_t tok[4096];
    int len, value;
    want("ef_listops_generate(NULL tokens)",
         ef_listops_generate(1, 0, 10, 40, NULL, &len, &value, NULL), EF_ERR_ARG, "NULL argument");
    want("ef_listops_generate min=10 max=11",
         ef_listops_generate(1, 0, 10, 11, tok, &len, &value, NULL), EF_ERR_ARG,
         "min=10 max=11 leave nothing");
    /* a nest deeper than the evaluator goes: [MAX [MAX ... 1 ] ] */
    int n = 0;
    for (int i = 0; i < 300; i++) tok[n++] = EF_LISTOPS_MAX;
    tok[n++] = EF_LISTOPS_DIGIT0 + 1;
    for (int i = 0; i < 300; i++) tok[n++] = EF_LISTOPS_CLOSE;
    want("ef_listops_value: 300 nested operators", ef_listops_value(tok, n, &value), EF_ERR_FORMAT,
         "nested deeper than 256");

    if (ef_task_new(&t, "dup:len=16", 1) == EF_OK) {
        int32_t l, tg[64];
        want("ef_task_sample(NULL tokens)", ef_task_sample(t, EF_SPLIT_TRAIN, 0, NULL, &l, tg),
             EF_ERR_ARG, "NULL argument");
        want("ef_task_sample split=7", ef_task_sample(t, (ef_split)7, 0, tok, &l, tg), EF_ERR_ARG,
             "split=7");
        want("ef_task_batch(NULL lens)", ef_task_batch(t, EF_SPLIT_TRAIN, 0, 1, tok, NULL, tg),
             EF_ERR_ARG, "NULL argument");
    } else {
        ef_check("dup task", 0, "%s", ef_last_error());
    }
    ef_task_free(t);
    /* the largest index: refused by the first sample, before first + 1 could overflow */
    t = NULL;
    if (ef_task_new(&t, "listops:n=0,min=20,max=60,eval=4", 1) == EF_OK) {
        int32_t lens[2];
        want("ef_task_batch first=INT64_MAX, batch 2",
             ef_task_batch(t, EF_SPLIT_TRAIN, INT64_MAX, 2, tok, lens, tok + 1024), EF_ERR_ARG,
             "train index 9223372036854775807 out of range");
    } else {
        ef_check("listops task", 0, "%s", ef_last_error());
    }
    ef_task_free(t);
}

/* ---------------------------------------------------------------------------------------------
 * The layers' argument checks (src/nn/nn.h: the model calls them; a NULL or a negative size
 * there is a bug of the caller, refused rather than followed)
 * ------------------------------------------------------------------------------------------- */
static void test_layers(void) {
    float x[64] = {0}, y[64] = {0}, w[64] = {0}, ws[4096];
    int32_t tok[4] = {0, 1, 2, 3};
    want("linear_forward(out NULL)", ef_linear_forward(NULL, x, w, NULL, 2, 2, 2), EF_ERR_ARG,
         "out is NULL");
    want("linear_forward(w NULL)", ef_linear_forward(y, x, NULL, NULL, 2, 2, 2), EF_ERR_ARG,
         "w is NULL");
    want("linear_backward(dw NULL)", ef_linear_backward(y, NULL, NULL, x, x, w, 2, 2, 2),
         EF_ERR_ARG, "dw is NULL");
    want("linear_backward(w NULL with dinp)", ef_linear_backward(y, w, NULL, x, x, NULL, 2, 2, 2),
         EF_ERR_ARG, "w is NULL");
    want("ffn_forward(ws NULL)", ef_ffn_forward(y, x, w, NULL, w, NULL, NULL, 2, 2, 2, 1),
         EF_ERR_ARG, "ws is NULL");
    want("ffn_forward(out NULL, ff=0)", ef_ffn_forward(NULL, x, w, NULL, w, NULL, ws, 2, 2, 0, 1),
         EF_ERR_ARG, "out is NULL");
    want("ffn_backward(dw2 NULL)",
         ef_ffn_backward(y, w, NULL, NULL, NULL, x, x, w, NULL, w, ws, 2, 2, 2, 1), EF_ERR_ARG,
         "dw2 is NULL");
    want("ffn_backward(dout NULL, ff=0)",
         ef_ffn_backward(y, NULL, NULL, NULL, NULL, NULL, x, w, NULL, w, ws, 2, 2, 0, 1),
         EF_ERR_ARG, "dout is NULL");
    want("embedding_forward n=-1", ef_embedding_forward(y, tok, w, -1, 4, 2), EF_ERR_SHAPE, "n=-1");
    want("embedding_forward(tok NULL)", ef_embedding_forward(y, NULL, w, 2, 4, 2), EF_ERR_ARG,
         "tok is NULL");
    want("embedding_backward(dtable NULL)", ef_embedding_backward(NULL, x, tok, 2, 4, 2),
         EF_ERR_ARG, "a tensor is NULL");
    want("pos_learned_forward batch=-1", ef_pos_learned_forward(x, w, -1, 2, 4, 2), EF_ERR_SHAPE,
         "batch=-1");
    want("pos_learned_backward len=5 > max_len=4", ef_pos_learned_backward(w, x, 1, 5, 4, 2),
         EF_ERR_SHAPE, "len=5 exceeds max_len=4");
    want("pos_axial_forward n1=-1", ef_pos_axial_forward(x, w, w, 1, 4, 4, -1, 2, 2, 2),
         EF_ERR_SHAPE, "n1=-1");
    want("pos_axial_forward d1+d2 != C", ef_pos_axial_forward(x, w, w, 1, 4, 4, 2, 2, 2, 3),
         EF_ERR_SHAPE, "d1=2 + d2=3 != C=4");
    want("pos_axial_forward(e2 NULL)", ef_pos_axial_forward(x, w, NULL, 1, 4, 4, 2, 2, 2, 2),
         EF_ERR_ARG, "e2 is NULL");
    want("pos_axial_backward(dx NULL)", ef_pos_axial_backward(w, w, NULL, 1, 4, 4, 2, 2, 2, 2),
         EF_ERR_ARG, "x is NULL");
}

int main(void) {
    if (!mkdtemp(dir)) {
        ef_check("a temporary folder", 0, "%s", "mkdtemp failed");
        return ef_test_finish();
    }
    test_attn();
    test_model();
    test_checkpoints();
    test_safetensors();
    test_optim();
    test_tasks();
    test_layers();
    rmdir(dir);
    return ef_test_finish();
}
