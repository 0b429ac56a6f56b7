/*
 * test_faults.c - allocation-failure injection (issue 14, item 2), as SQLite's malloc tests do
 * it: for n = 1, 2, ... the n-th allocation of an operation fails (core.h, ef_alloc_fail), until
 * n passes the operation's last allocation. At every n the operation must either fail with
 * EF_ERR_NOMEM and a message, or succeed with the same bits as without the failure; it must
 * leak nothing (the library's live-block count returns to where it was; LeakSanitizer in the
 * sanitizer build sees the rest); and what it worked on must stay usable: the same call
 * without the failure then gives the reference bits. Each sweep runs twice: the n-th
 * allocation alone fails, then every allocation from the n-th on ("persistent", so that the
 * clean-up paths run out of memory too).
 *
 * Operations: plan creation and a padded forward + backward for every mechanism (causal too
 * where it has it; one and two threads), the decoding state and a step, model creation,
 * a training step, a checkpoint load (model, parameters only, training resume) and a
 * checkpoint save (the previous file must survive bitwise).
 */
#define _DEFAULT_SOURCE /* mkdtemp */
#include "harness.h"
#include "core/core.h"
#include "train/optim.h"
#include "train/tasks.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LABEL(...) (snprintf(label, sizeof label, __VA_ARGS__), label)
static char label[512];

static long live_now(void) {
    long live;
    ef_alloc_counts(NULL, NULL, &live);
    return live;
}

/* The outcome of one armed call: checks the status against the failures injected. Returns 1
 * when a failure was injected (the sweep goes on), 0 when the call ran past its last
 * allocation (the sweep is over). */
static int armed_outcome(const char *what, long n, int persistent, ef_status st, int *bad) {
    long calls, failed;
    ef_alloc_counts(&calls, &failed, NULL);
    ef_alloc_fail(0, 0);
    if (failed == 0) {
        if (st != EF_OK) {
            ef_check(
                LABEL("%s: n=%ld%s with no failure injected", what, n, persistent ? " (p)" : ""), 0,
                "%s: %s", ef_status_str(st), ef_last_error());
            (*bad)++;
        }
        return 0;
    }
    const char *msg = ef_last_error();
    if (st != EF_OK && (st != EF_ERR_NOMEM || !msg || !msg[0])) {
        ef_check(LABEL("%s: n=%ld%s fails with EF_ERR_NOMEM and a message", what, n,
                       persistent ? " (p)" : ""),
                 0, "%s: '%s'", ef_status_str(st), msg ? msg : "(null)");
        (*bad)++;
    }
    return 1;
}

/* The live-block count is back where it was before the armed call (and its clean-up). */
static void check_no_leak(const char *op, const char *what, long n, int persistent, long live0,
                          int *bad) {
    long live = live_now();
    if (live == live0) return;
    ef_check(LABEL("%s%s%s: n=%ld%s leaks nothing", op, op[0] ? " " : "", what, n,
                   persistent ? " (p)" : ""),
             0, "%ld blocks", live - live0);
    (*bad)++;
}

static void sweep_done(const char *op, const char *what, int persistent, long points, long nomem,
                       int bad) {
    /* forward, backward and a training step allocate nothing (plans and models allocate all
     * they need when made): zero failure points is their expected result */
    int may_be_none = !strcmp(op, "fwd+bwd") || !strcmp(op, "ef_train_step");
    if (points == 0)
        ef_check(LABEL("%s %s%s: allocates nothing", op, what, persistent ? ", persistent" : ""),
                 bad == 0 && may_be_none, "%d bad", bad);
    else
        ef_check(LABEL("%s %s%s: %ld failure points (%ld refused with EF_ERR_NOMEM, the rest "
                       "recovered), each clean",
                       op, what, persistent ? ", persistent" : "", points, nomem),
                 bad == 0, "%d bad", bad);
}

static int same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* ---------------------------------------------------------------------------------------------
 * Attention: plan creation, forward + backward, decoding
 * ------------------------------------------------------------------------------------------- */
static const ef_attn_shape SHAPE = {2, 2, 37, 37, 16, 16};
static const int32_t KV_LENS[2] = {37, 29}, Q_LENS[2] = {37, 31};

static void plan_sweep(const char *spec, int persistent) {
    int bad = 0;
    long n, nomem = 0;
    for (n = 1;; n++) {
        long live0 = live_now();
        ef_attn *a = (ef_attn *)1; /* must come back NULL on failure */
        ef_alloc_fail(n, persistent);
        ef_status st = ef_attn_new(&a, spec, &SHAPE);
        int more = armed_outcome(spec, n, persistent, st, &bad);
        if (st != EF_OK && a != NULL) {
            ef_check(LABEL("%s: n=%ld a failed ef_attn_new sets *out = NULL", spec, n), 0, "%p",
                     (void *)a);
            bad++;
            a = NULL;
        }
        nomem += st == EF_ERR_NOMEM;
        ef_attn_free(a);
        check_no_leak("ef_attn_new", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_attn_new", spec, persistent, n - 1, nomem, bad);
}

typedef struct fb_ref {
    float *out, *dq, *dk, *dv;
} fb_ref;

static ef_status fwd_bwd(ef_attn *a, const ef_test_bufs *in, ef_test_bufs *o) {
    ef_attn_io io = {in->q, in->k, in->v, KV_LENS, o->out, Q_LENS};
    ef_status st = ef_attn_forward(a, &io, o->saved);
    if (!st) st = ef_attn_backward(a, &io, o->saved, in->g, o->dq, o->dk, o->dv);
    return st;
}

static int same_as_ref(const ef_test_bufs *in, const ef_test_bufs *o, const fb_ref *r) {
    return same_bits(o->out, r->out, in->no) && same_bits(o->dq, r->dq, in->nq) &&
           same_bits(o->dk, r->dk, in->nk) && same_bits(o->dv, r->dv, in->nv);
}

static void fb_sweep(const char *spec, int threads, int persistent) {
    ef_set_num_threads(threads);
    ef_test_bufs in, o;
    ef_test_inputs(&in, SHAPE, 7, 1.0f);
    ef_test_outputs(&o, &in);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &SHAPE);
    if (st) {
        ef_check(LABEL("fwd+bwd %s: plan", spec), 0, "%s", ef_last_error());
        ef_test_free_outputs(&o);
        ef_test_free_inputs(&in);
        return;
    }
    o.saved = ef_test_saved(a);
    /* the reference: two clean runs (the first may make lazily kept buffers) */
    fb_ref r;
    st = fwd_bwd(a, &in, &o);
    if (!st) st = fwd_bwd(a, &in, &o);
    r.out = malloc(in.no * 4), r.dq = malloc(in.nq * 4), r.dk = malloc(in.nk * 4),
    r.dv = malloc(in.nv * 4);
    memcpy(r.out, o.out, in.no * 4), memcpy(r.dq, o.dq, in.nq * 4), memcpy(r.dk, o.dk, in.nk * 4),
        memcpy(r.dv, o.dv, in.nv * 4);
    char name[256];
    snprintf(name, sizeof name, "fwd+bwd %s, %d thread%s", spec, threads, threads > 1 ? "s" : "");
    int bad = st != EF_OK;
    long n, nomem = 0;
    for (n = 1; !bad || n > 1; n++) {
        long live0 = live_now();
        memset(o.out, 0xff, in.no * 4); /* NaN: a call that claims success must write */
        ef_alloc_fail(n, persistent);
        st = fwd_bwd(a, &in, &o);
        int more = armed_outcome(name, n, persistent, st, &bad);
        if (st == EF_OK && !same_as_ref(&in, &o, &r)) {
            ef_check(LABEL("%s: n=%ld succeeded with other bits", name, n), 0, "%s", "");
            bad++;
        }
        nomem += st == EF_ERR_NOMEM;
        if (st != EF_OK) { /* the plan is usable: the clean call gives the reference */
            ef_status st2 = fwd_bwd(a, &in, &o);
            if (st2 != EF_OK || !same_as_ref(&in, &o, &r)) {
                ef_check(LABEL("%s: n=%ld the plan works after the failure", name, n), 0, "%s: %s",
                         ef_status_str(st2), ef_last_error());
                bad++;
            }
        }
        check_no_leak("", name, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("fwd+bwd", name + 8, persistent, n - 1, nomem, bad);
    free(r.out), free(r.dq), free(r.dk), free(r.dv);
    ef_free(o.saved);
    o.saved = NULL;
    ef_attn_free(a);
    ef_test_free_outputs(&o);
    ef_test_free_inputs(&in);
    ef_set_num_threads(1);
}

/* ef_attn_state_new and one ef_attn_step, for a mechanism that decodes */
static void decode_sweep(const char *spec, int persistent) {
    ef_attn_shape s = {1, 2, 37, 37, 16, 16};
    ef_attn *a = NULL;
    if (ef_attn_new(&a, spec, &s)) {
        ef_check(LABEL("decode %s: plan", spec), 0, "%s", ef_last_error());
        return;
    }
    float *x = ef_test_randn(3 * 2 * 16, 11, 1.0f), ref[32], out[32];
    ef_attn_state *st0 = NULL;
    ef_status st = ef_attn_state_new(&st0, a);
    if (!st) st = ef_attn_step(a, st0, x, x + 32, x + 64, ref);
    ef_attn_state_free(st0);
    int bad = st != EF_OK;
    long n, nomem = 0;
    for (n = 1; !bad; n++) {
        long live0 = live_now();
        ef_attn_state *d = NULL;
        ef_alloc_fail(n, persistent);
        st = ef_attn_state_new(&d, a);
        if (!st) st = ef_attn_step(a, d, x, x + 32, x + 64, out);
        int more = armed_outcome(spec, n, persistent, st, &bad);
        if (st == EF_OK && !same_bits(out, ref, 32)) {
            ef_check(LABEL("decode %s: n=%ld succeeded with other bits", spec, n), 0, "%s", "");
            bad++;
        }
        nomem += st == EF_ERR_NOMEM;
        ef_attn_state_free(d);
        check_no_leak("decode", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("decode", spec, persistent, n - 1, nomem, bad);
    free(x);
    ef_attn_free(a);
}

/* ---------------------------------------------------------------------------------------------
 * Models, training, checkpoints
 * ------------------------------------------------------------------------------------------- */
static const char *MODELS[] = {
    "layers=2,dim=16,heads=2,ff=32,vocab=13,max_len=24,attn=flash:causal=1",
    "layers=2,dim=16,heads=2,ff=32,vocab=13,max_len=24,attn=lsh:chunk=8,causal=1,reversible=1",
    "layers=2,dim=16,heads=2,ff=32,vocab=13,max_len=24,attn=local:window=4|performer:features=8,"
    "head=cls:classes=3",
    "layers=1,dim=16,heads=2,ff=32,vocab=13,max_len=24,attn=linformer:k=8",
};
enum { NMODELS = sizeof MODELS / sizeof *MODELS, LEN = 24, BATCH = 2 };

static void model_new_sweep(const char *spec, int persistent) {
    int bad = 0;
    long n, nomem = 0;
    ef_model_opts mo = {BATCH, 5, 1};
    for (n = 1;; n++) {
        long live0 = live_now();
        ef_model *m = (ef_model *)1;
        ef_optim *o = NULL;
        ef_alloc_fail(n, persistent);
        ef_status st = ef_model_new(&m, spec, &mo);
        if (st != EF_OK && m != NULL) {
            ef_check(LABEL("model %s: n=%ld failed ef_model_new sets *out = NULL", spec, n), 0,
                     "%s", "");
            bad++;
            m = NULL;
        }
        if (!st) {
            ef_optim_opts oo = ef_optim_defaults();
            st = ef_optim_new(&o, m, &oo);
        }
        int more = armed_outcome(spec, n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        ef_optim_free(o);
        ef_model_free(m);
        check_no_leak("model", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_model_new + ef_optim_new", spec, persistent, n - 1, nomem, bad);
}

/* ef_model_decoder_new and two decoding steps of a causal model */
static void model_decode_sweep(const char *spec, int persistent) {
    ef_model_opts mo = {1, 5, 0};
    ef_model *m = NULL;
    ef_model_decoder *d = NULL;
    float ref[2 * 13], out[2 * 13];
    ef_status st = ef_model_new(&m, spec, &mo);
    if (!st) st = ef_model_decoder_new(&d, m);
    if (!st) st = ef_model_decode_step(d, 3, ref);
    if (!st) st = ef_model_decode_step(d, 5, ref + 13);
    ef_model_decoder_free(d);
    int bad = st != EF_OK;
    if (bad) ef_check(LABEL("decoder %s: reference", spec), 0, "%s", ef_last_error());
    long n, nomem = 0;
    for (n = 1; !bad; n++) {
        long live0 = live_now();
        d = NULL;
        ef_alloc_fail(n, persistent);
        st = ef_model_decoder_new(&d, m);
        if (!st) st = ef_model_decode_step(d, 3, out);
        if (!st) st = ef_model_decode_step(d, 5, out + 13);
        int more = armed_outcome(spec, n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (st == EF_OK && !same_bits(out, ref, 26)) {
            ef_check(LABEL("decoder %s: n=%ld succeeded with other bits", spec, n), 0, "%s", "");
            bad++;
        }
        ef_model_decoder_free(d);
        check_no_leak("decoder", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_model_decoder_new + 2 steps", spec, persistent, n - 1, nomem, bad);
    ef_model_free(m);
}

typedef struct batch {
    int32_t tokens[BATCH * LEN], targets[BATCH * LEN], lens[BATCH];
    ef_model_batch b;
} batch;

static void make_batch(batch *t, int cls) {
    for (int i = 0; i < BATCH * LEN; i++) {
        t->tokens[i] = (i * 7 + 3) % 13;
        t->targets[i] = (i * 5 + 1) % 13;
    }
    if (cls) t->targets[0] = 1, t->targets[1] = 2;
    t->lens[0] = LEN, t->lens[1] = LEN - 5;
    t->b = (ef_model_batch){BATCH, LEN, t->tokens, t->lens, t->targets, 0};
}

static ef_status new_trainer(const char *spec, ef_model **m, ef_optim **o) {
    ef_model_opts mo = {BATCH, 5, 1};
    *o = NULL;
    ef_status st = ef_model_new(m, spec, &mo);
    ef_optim_opts oo = ef_optim_defaults();
    if (!st) st = ef_optim_new(o, *m, &oo);
    return st;
}

static void train_sweep(const char *spec, int persistent) {
    batch t;
    make_batch(&t, strstr(spec, "cls") != NULL);
    ef_model *m = NULL;
    ef_optim *o = NULL;
    ef_status st = new_trainer(spec, &m, &o);
    /* the reference: the parameters after two steps from the seed */
    if (!st) st = ef_train_step(o, &t.b, 1, NULL);
    if (!st) st = ef_train_step(o, &t.b, 1, NULL);
    size_t np = m ? ef_model_param_floats(m) : 0;
    float *ref = malloc(np * 4 + 4), *before = malloc(np * 4 + 4);
    if (!st) memcpy(ref, ef_model_params(m), np * 4);
    ef_optim_free(o);
    ef_model_free(m);
    int bad = st != EF_OK;
    if (bad) ef_check(LABEL("train %s: reference", spec), 0, "%s", ef_last_error());
    long n, nomem = 0;
    /* the armed step is the first (where the model makes its lazily kept buffers); a failed
     * one changes nothing and is retried; then a clean second step */
    for (n = 1; !bad; n++) {
        long live0 = live_now();
        st = new_trainer(spec, &m, &o);
        if (st) {
            ef_check(LABEL("train %s: a clean trainer", spec), 0, "%s", ef_last_error());
            bad++;
            break;
        }
        memcpy(before, ef_model_params(m), np * 4);
        ef_alloc_fail(n, persistent);
        st = ef_train_step(o, &t.b, 1, NULL);
        int more = armed_outcome(spec, n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (st != EF_OK) {
            if (!same_bits(ef_model_params(m), before, np) || ef_optim_steps(o) != 0) {
                ef_check(LABEL("train %s: n=%ld a failed step changes nothing", spec, n), 0, "%s",
                         "");
                bad++;
            }
            st = ef_train_step(o, &t.b, 1, NULL);
        }
        if (!st) st = ef_train_step(o, &t.b, 1, NULL);
        if (st != EF_OK || !same_bits(ef_model_params(m), ref, np)) {
            ef_check(LABEL("train %s: n=%ld%s two steps (the first retried after a failure) give "
                           "the reference parameters",
                           spec, n, persistent ? " (p)" : ""),
                     0, "%s", st ? ef_last_error() : "other bits");
            bad++;
        }
        ef_optim_free(o);
        ef_model_free(m);
        check_no_leak("train", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_train_step", spec, persistent, n - 1, nomem, bad);
    free(ref);
    free(before);
}

static int dir_entries(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    if (!d) return -1;
    for (struct dirent *e; (e = readdir(d));) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* Checkpoint load (ef_model_load, ef_model_load_params, ef_train_resume) and save
 * (ef_train_save over a previous checkpoint) of one trained model. */
static void ckpt_sweeps(const char *spec, const char *dir, int persistent) {
    char path[512], path2[512];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    snprintf(path2, sizeof path2, "%s/m2.safetensors", dir);
    batch t;
    make_batch(&t, strstr(spec, "cls") != NULL);
    ef_model *m = NULL, *m2 = NULL;
    ef_optim *o = NULL, *o2 = NULL;
    ef_status st = new_trainer(spec, &m, &o);
    if (!st) st = ef_train_step(o, &t.b, 1, NULL);
    if (!st) st = ef_train_save(o, path, NULL, 0);
    size_t np = m ? ef_model_param_floats(m) : 0;
    if (st) {
        ef_check(LABEL("checkpoint %s: a clean save", spec), 0, "%s", ef_last_error());
        ef_optim_free(o);
        ef_model_free(m);
        return;
    }
    float *want = malloc(np * 4);
    memcpy(want, ef_model_params(m), np * 4);
    ef_model_opts mo = {BATCH, 5, 1};

    /* ef_model_load: a new model with the saved parameters, or NULL and nothing leaked */
    int bad = 0;
    long n, nomem = 0;
    for (n = 1;; n++) {
        long live0 = live_now();
        ef_alloc_fail(n, persistent);
        st = ef_model_load(&m2, path, &mo);
        int more = armed_outcome("ef_model_load", n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if ((st == EF_OK) != (m2 != NULL) ||
            (st == EF_OK && !same_bits(ef_model_params(m2), want, np))) {
            ef_check(LABEL("ef_model_load %s: n=%ld a model with the saved bits or NULL", spec, n),
                     0, "%s", ef_status_str(st));
            bad++;
        }
        ef_model_free(m2);
        m2 = NULL;
        check_no_leak("ef_model_load", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_model_load", spec, persistent, n - 1, nomem, bad);

    /* ef_model_load_params into a fresh model: on failure its parameters are unchanged */
    bad = 0, nomem = 0;
    st = ef_model_new(&m2, spec, &mo);
    float *fresh = malloc(np * 4);
    memcpy(fresh, ef_model_params(m2), np * 4);
    for (n = 1; !st; n++) {
        long live0 = live_now();
        memcpy(ef_model_params(m2), fresh, np * 4);
        ef_alloc_fail(n, persistent);
        st = ef_model_load_params(m2, path);
        int more = armed_outcome("ef_model_load_params", n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (!same_bits(ef_model_params(m2), st == EF_OK ? want : fresh, np)) {
            ef_check(LABEL("ef_model_load_params %s: n=%ld the saved bits, or unchanged", spec, n),
                     0, "%s", ef_status_str(st));
            bad++;
        }
        check_no_leak("ef_model_load_params", spec, n, persistent, live0, &bad);
        st = EF_OK;
        if (!more) break;
    }
    sweep_done("ef_model_load_params", spec, persistent, n - 1, nomem, bad);
    ef_model_free(m2);
    m2 = NULL;
    free(fresh);

    /* ef_train_resume: both objects, or both NULL */
    bad = 0, nomem = 0;
    for (n = 1;; n++) {
        long live0 = live_now();
        ef_alloc_fail(n, persistent);
        st = ef_train_resume(&m2, &o2, path, &mo, NULL);
        int more = armed_outcome("ef_train_resume", n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (st == EF_OK
                ? !m2 || !o2 || !same_bits(ef_model_params(m2), want, np) || ef_optim_steps(o2) != 1
                : m2 != NULL || o2 != NULL) {
            ef_check(LABEL("ef_train_resume %s: n=%ld the saved state, or both NULL", spec, n), 0,
                     "%s", ef_status_str(st));
            bad++;
        }
        ef_optim_free(o2);
        ef_model_free(m2);
        o2 = NULL, m2 = NULL;
        check_no_leak("ef_train_resume", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_train_resume", spec, persistent, n - 1, nomem, bad);

    /* ef_train_save over an older checkpoint: on failure both old files are intact and no
     * temporary file is left behind; on success the new state loads back */
    bad = 0, nomem = 0;
    st = ef_train_save(o, path2, NULL, 0);
    size_t n_old = 0, n_old_opt = 0;
    char opt2[600];
    snprintf(opt2, sizeof opt2, "%s%s", path2, EF_TRAIN_OPT_SUFFIX);
    char *old = (char *)ef_test_read_file(path2, &n_old),
         *old_opt = (char *)ef_test_read_file(opt2, &n_old_opt);
    int entries = dir_entries(dir);
    if (!st) st = ef_train_step(o, &t.b, 1, NULL); /* the state to save differs from the file */
    for (n = 1; !st; n++) {
        long live0 = live_now();
        ef_alloc_fail(n, persistent);
        st = ef_train_save(o, path2, NULL, 0);
        int more = armed_outcome("ef_train_save", n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (st != EF_OK) {
            size_t a = 0, b = 0;
            char *now = (char *)ef_test_read_file(path2, &a),
                 *now_opt = (char *)ef_test_read_file(opt2, &b);
            /* PATH.opt is written first: a failure on PATH leaves the new PATH.opt beside the
             * old PATH (optim.h), which ef_train_load then refuses */
            int model_kept = now && a == n_old && !memcmp(now, old, a);
            int opt_kept = now_opt && b == n_old_opt && !memcmp(now_opt, old_opt, b);
            if (!model_kept || (!opt_kept && !now_opt) || dir_entries(dir) != entries) {
                ef_check(LABEL("ef_train_save %s: n=%ld the old files survive, no temporary "
                               "left",
                               spec, n),
                         0, "model %s, opt %s, %d entries (want %d)", model_kept ? "kept" : "LOST",
                         opt_kept ? "kept" : "new", dir_entries(dir), entries);
                bad++;
            }
            free(now), free(now_opt);
        }
        check_no_leak("ef_train_save", spec, n, persistent, live0, &bad);
        if (more) { /* put the old pair back for the next n */
            ef_test_write_file(path2, old, n_old);
            ef_test_write_file(opt2, old_opt, n_old_opt);
        }
        st = EF_OK;
        if (!more) break;
    }
    sweep_done("ef_train_save", spec, persistent, n - 1, nomem, bad);
    /* the last save succeeded: it loads back */
    st = ef_train_resume(&m2, &o2, path2, &mo, NULL);
    ef_check(LABEL("ef_train_save %s: the saved state loads back", spec),
             st == EF_OK && same_bits(ef_model_params(m2), ef_model_params(m), np) &&
                 ef_optim_steps(o2) == 2,
             "%s", st ? ef_last_error() : "");
    free(old), free(old_opt), free(want);
    ef_optim_free(o2);
    ef_model_free(m2);
    ef_optim_free(o);
    ef_model_free(m);
    remove(path), remove(path2), remove(opt2);
    snprintf(opt2, sizeof opt2, "%s%s", path, EF_TRAIN_OPT_SUFFIX);
    remove(opt2);
}

/* ef_task_new and a batch of 3 samples from each split */
static void task_sweep(const char *spec, int persistent) {
    enum { TB = 3, TMAX = 600 };
    static int32_t ref[2][TB * TMAX * 2 + TB], got[2][TB * TMAX * 2 + TB];
    ef_task *t = NULL;
    ef_task_info info = {0};
    ef_status st = ef_task_new(&t, spec, 9);
    if (!st) ef_task_get_info(t, &info);
    if (!st && info.len > TMAX) st = ef_error(EF_ERR_ARG, "len %d > %d", info.len, TMAX);
    for (int s = 0; s < 2 && !st; s++)
        st = ef_task_batch(t, (ef_split)s, 1, TB, ref[s], ref[s] + TB * info.len,
                           ref[s] + TB * info.len + TB);
    ef_task_free(t);
    int bad = st != EF_OK;
    if (bad) ef_check(LABEL("task %s: reference", spec), 0, "%s", ef_last_error());
    size_t words = (size_t)TB * info.len * 2 + TB;
    long n, nomem = 0;
    for (n = 1; !bad; n++) {
        long live0 = live_now();
        t = NULL;
        ef_alloc_fail(n, persistent);
        st = ef_task_new(&t, spec, 9);
        for (int s = 0; s < 2 && !st; s++)
            st = ef_task_batch(t, (ef_split)s, 1, TB, got[s], got[s] + TB * info.len,
                               got[s] + TB * info.len + TB);
        int more = armed_outcome(spec, n, persistent, st, &bad);
        nomem += st == EF_ERR_NOMEM;
        if (st == EF_OK &&
            (memcmp(got[0], ref[0], words * 4) || memcmp(got[1], ref[1], words * 4))) {
            ef_check(LABEL("task %s: n=%ld succeeded with other samples", spec, n), 0, "%s", "");
            bad++;
        }
        ef_task_free(t);
        check_no_leak("task", spec, n, persistent, live0, &bad);
        if (!more) break;
    }
    sweep_done("ef_task_new + batches", spec, persistent, n - 1, nomem, bad);
}

int main(int argc, char **argv) {
    /* a name on the command line: only the sweeps whose spec contains it */
    const char *only = argc > 1 ? argv[1] : NULL;
    ef_set_num_threads(1);
    for (int i = 0; i < ef_attn_count(); i++) {
        const char *name = ef_attn_name(i);
        ef_attn_caps caps;
        if (ef_attn_get_caps(name, &caps) != EF_OK) continue;
        /* the defaults, or smaller blocks (and fewer random ones) where they do not fit */
        char plain[100], causal[128];
        ef_attn *a = NULL;
        static const char *const fits[] = {"", ":block=4", ":block=4,random=1"};
        for (int f = 0; f < 3 && !a; f++) {
            snprintf(plain, sizeof plain, "%s%s", name, fits[f]);
            if (ef_attn_new(&a, plain, &SHAPE) != EF_OK) a = NULL;
        }
        ef_attn_free(a);
        snprintf(causal, sizeof causal, "%s%scausal=1", plain, strchr(plain, ':') ? "," : ":");
        for (int c = 0; c < 1 + caps.causal; c++) {
            const char *spec = c ? causal : plain;
            if (only && !strstr(spec, only)) continue;
            for (int p = 0; p < 2; p++) {
                plan_sweep(spec, p);
                fb_sweep(spec, 1, p);
            }
            fb_sweep(spec, 2, 0);
            /* the slow reference path (ref=1) has its own workspace */
            char ref[160];
            snprintf(ref, sizeof ref, "%s%sref=1", spec, strchr(spec, ':') ? "," : ":");
            plan_sweep(ref, 0);
            fb_sweep(ref, 1, 0);
            if (c && caps.decode) decode_sweep(spec, 0), decode_sweep(spec, 1);
        }
    }
    char dir[] = "/tmp/ef_faults_XXXXXX";
    if (!mkdtemp(dir)) {
        ef_check("a temporary folder", 0, "mkdtemp failed");
        return ef_test_finish();
    }
    for (int i = 0; i < NMODELS; i++) {
        if (only && !strstr(MODELS[i], only)) continue;
        for (int p = 0; p < 2; p++) {
            model_new_sweep(MODELS[i], p);
            train_sweep(MODELS[i], p);
            if (i < 2) ckpt_sweeps(MODELS[i], dir, p);
            if (i == 0)
                model_decode_sweep("layers=2,dim=16,heads=2,ff=32,vocab=13,max_len=24,"
                                   "attn=linear:causal=1|performer:features=8,causal=1",
                                   p);
        }
    }
    char text[600], spec[700];
    snprintf(text, sizeof text, "%s/t.txt", dir);
    FILE *f = fopen(text, "w");
    for (int i = 0; f && i < 400; i++) fprintf(f, "line %d of a small text for the task.\n", i);
    if (f) fclose(f);
    snprintf(spec, sizeof spec, "text:%s,len=64", text);
    const char *tasks[] = {"dup:len=32", "copy:len=32", "recall:len=64",
                           "listops:min=20,max=60,eval=10", spec};
    for (int i = 0; i < 5; i++)
        if (!only || strstr(tasks[i], only)) task_sweep(tasks[i], 0), task_sweep(tasks[i], 1);
    remove(text);
    rmdir(dir);
    return ef_test_finish();
}
