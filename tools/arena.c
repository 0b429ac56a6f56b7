/*
 * arena.c - `eformer arena`: the survey's comparison of the mechanisms, measured on this
 * machine (docs/arena.md).
 *
 * For each length (ascending) the arena makes the inputs of every kind asked for (Gaussian,
 * structured), computes exact attention on each with arena_exact (forward and gradients; it
 * shares nothing with the mechanisms but ef_sgemm), then for every mechanism:
 *   - skips the length, marked, when the time a pass would take (extrapolated from the shorter
 *     lengths) is over --budget, or when its workspace + saved bytes are over --mem-budget;
 *   - times forward and forward+backward on the first input kind (a warm-up, then up to --reps
 *     runs, fewer when one run is long; the median);
 *   - measures the relative Frobenius error of the output and of dq, dk, dv against exact
 *     attention on every input kind.
 * The SGEMM rate is measured again before each length. Then it fits the time and memory
 * exponents (log-log slope over the lengths run), prints the survey's table, and writes
 * results.csv, results.json, report.md and the gnuplot plots into --out.
 */
#define _POSIX_C_SOURCE 200809L

#include "arena.h"
#include "cli.h"
#include "train/optim.h"
#include "train/tasks.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_SPECS 64
#define MAX_LENS 32
#define MAX_INPUTS 4
#define INPUT_SEED 2024

static const char *const default_lens = "1024,2048,4096,8192,16384";

enum { IN_GAUSSIAN, IN_STRUCTURED, IN_MODEL };
/* structured inputs: bump width (positions) and peak logit */
#define ST_WIDTH 8.0
#define ST_SHARP 10.0

typedef enum {
    CELL_PENDING = 0,
    CELL_OK,
    CELL_SKIP_TIME,   /* predicted over --budget */
    CELL_SKIP_MEMORY, /* workspace + saved over --mem-budget, or the memory is not there */
    CELL_REFUSED,     /* the plan was refused (shape, option, causal) */
    CELL_FAILED,      /* a pass returned an error */
    CELL_NO_INPUT     /* none of the input kinds exists at this length */
} cell_status;
static const char *const status_name[] = {"pending", "ok",     "skipped-time", "skipped-memory",
                                          "refused", "failed", "no-input"};

typedef struct cell {
    cell_status status;
    char note[200];
    double fwd_s, fwdbwd_s; /* medians; NAN when not measured */
    int reps;
    double flops_fwd, flops_fwdbwd; /* ef_attn_flops */
    size_t ws_bytes, saved_bytes, rss_bytes;
    double err[MAX_INPUTS][4]; /* out, dq, dk, dv; NAN = not measured or not applicable */
    double sgemm;              /* GFLOP/s measured before this length */
} cell;

typedef struct arena_spec {
    char spec[512];  /* as run (causal=1 added with --causal) */
    char canon[768]; /* the plan's canonical spec (from the first plan made) */
    char name[32];
    char label[40]; /* in tables, plots and file names: the name, "-bf16" for precision=bf16,
                     * "-auto" for block=auto */
    ef_attn_caps caps;
    int no_causal; /* --causal and the mechanism cannot */
} arena_spec;

typedef struct arena_run {
    arena_shape base; /* batch, heads, dim (len per cell) */
    int lens[MAX_LENS], n_lens;
    arena_spec specs[MAX_SPECS];
    int n_specs;
    int inputs[MAX_INPUTS], n_inputs;
    int causal, backward, reps, threads, plots;
    double budget, mem_budget;
    const char *out;
    char cmdline[2048];
    cell cells[MAX_LENS][MAX_SPECS];
    double exact_s[MAX_LENS]; /* time of the exact references at each length */
    double t0;
    int tty;
    char cpu[128];
    char compiler[128];
    /* --inputs model:FILE: the model, its task (eval samples), the layer captured */
    const char *model_path;
    ef_model *model;
    ef_task *task;
    int layer, model_len; /* model_len: the longest length its inputs cover */
    /* --quality TASK: each mechanism trained for the same time (arena_quality.c) */
    arena_quality_cfg qcfg;
    int q_causal, q_text; /* the task is next-token; a text task (bits per byte) */
    arena_quality quality[MAX_SPECS];
    char q_spec[MAX_SPECS][600]; /* the spec trained ("" = not run) */
} arena_run;

static const char *input_name(int in) {
    return in == IN_GAUSSIAN ? "gaussian" : in == IN_STRUCTURED ? "structured" : "model";
}

/* ---------------------------------------------------------------------------------------------
 * Progress
 * ------------------------------------------------------------------------------------------- */
static void fmt_secs(char *buf, size_t cap, double s) {
    if (!isfinite(s) || s < 0)
        snprintf(buf, cap, "?");
    else if (s < 3600)
        snprintf(buf, cap, "%d:%02d", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, cap, "%d:%02d:%02d", (int)s / 3600, (int)s / 60 % 60, (int)s % 60);
}

/* Predicted seconds of one forward+backward (or forward) pass of spec s at length index li,
 * from its measured lengths below: the fitted exponent over them (two or more), else the
 * survey's claim (2 when unknown). NAN when nothing is measured yet. */
static double predict_pass(const arena_run *R, int s, int li) {
    double x[MAX_LENS], y[MAX_LENS];
    int n = 0;
    for (int l = 0; l < li; l++) {
        const cell *c = &R->cells[l][s];
        if (c->status != CELL_OK) continue;
        x[n] = R->lens[l], y[n] = R->backward ? c->fwdbwd_s : c->fwd_s, n++;
    }
    if (!n) return NAN;
    double e = n >= 2 ? arena_slope(x, y, n) : NAN;
    if (!isfinite(e)) e = arena_claim_of(R->specs[s].name).exponent;
    if (!isfinite(e)) e = 2;
    if (e < 1) e = 1; /* short lengths are dominated by fixed costs: never predict sub-linear */
    return y[n - 1] * pow((double)R->lens[li] / x[n - 1], e);
}

/* Seconds a cell will take: warm-up + reps of each pass and one error run per input kind. */
static double cell_cost(const arena_run *R, double pass) {
    if (!isfinite(pass)) return NAN;
    int reps = R->reps;
    while (reps > 1 && pass * reps > R->budget) reps--;
    /* forward is about a third of forward+backward */
    return pass * (1 + reps) * (R->backward ? 4.0 / 3 : 1) + pass * (R->n_inputs - 1);
}

/* Rough seconds left after cell (li, s), from the predictions (cells not predictable yet count
 * as the mean of the cells done). */
static double eta(const arena_run *R, int li, int s, double done_s, int done_n) {
    double left = 0;
    double mean = done_n ? done_s / done_n : 0;
    for (int l = li; l < R->n_lens; l++)
        for (int k = l == li ? s + 1 : 0; k < R->n_specs; k++) {
            double p = predict_pass(R, k, l);
            if (isfinite(p) && p > R->budget) continue; /* will be skipped */
            double c = cell_cost(R, p);
            left += isfinite(c) ? c : mean;
        }
    return left;
}

static void progress(const arena_run *R, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void progress(const arena_run *R, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (R->tty)
        fprintf(stderr, "\r\033[K%s", msg);
    else
        fprintf(stderr, "%s\n", msg);
    fflush(stderr);
}

/* ---------------------------------------------------------------------------------------------
 * One length
 * ------------------------------------------------------------------------------------------- */
typedef struct tensors {
    float *q, *k, *v, *g;              /* inputs */
    float *ro, *rdq, *rdk, *rdv;       /* exact attention */
    float *so, *sdq, *sdk, *sdv;       /* exact shared-QK attention (made when needed) */
    int have_shared;
    int na; /* these inputs do not exist at this length (a model's beyond its samples) */
} tensors;

typedef struct pass_ctx {
    ef_attn *a;
    ef_attn_io io;
    void *saved;
    const float *g;
    float *dq, *dk, *dv;
    int backward;
} pass_ctx;

static ef_status run_pass(pass_ctx *p) {
    ef_status st = ef_attn_forward(p->a, &p->io, p->backward ? p->saved : NULL);
    if (st || !p->backward) return st;
    return ef_attn_backward(p->a, &p->io, p->saved, p->g, p->dq, p->dk, p->dv);
}

/* Median seconds of `reps` timed passes after one warm-up; fewer reps when the warm-up says
 * they would take over the budget. */
static ef_status time_pass(arena_run *R, pass_ctx *p, double *med, int *reps_done) {
    double t0 = cli_now();
    ef_status st = run_pass(p);
    if (st) return st;
    double warm = cli_now() - t0;
    int reps = R->reps;
    while (reps > 1 && warm * reps > R->budget) reps--;
    double t[64];
    for (int r = 0; r < reps; r++) {
        t0 = cli_now();
        if ((st = run_pass(p))) return st;
        t[r] = cli_now() - t0;
    }
    *med = cli_median(t, reps);
    *reps_done = reps;
    return EF_OK;
}

static void cell_note(cell *c, cell_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void cell_note(cell *c, cell_status st, const char *fmt, ...) {
    c->status = st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->note, sizeof c->note, fmt, ap);
    va_end(ap);
}

/* The exact reference for input kind `in` (shared: Reformer's shared-QK variant) */
static ef_status make_exact(arena_run *R, const arena_shape *sh, tensors *T, int in, int shared) {
    size_t n = (size_t)sh->batch * sh->heads * sh->len * sh->dim;
    float scale = (float)(1 / sqrt((double)sh->dim));
    float *q = T[in].q, *k = T[in].k, *v = T[in].v, *g = R->backward ? T[in].g : NULL;
    if (!shared)
        return arena_exact(sh, R->causal, 0, scale, q, k, v, g, T[in].ro, T[in].rdq, T[in].rdk,
                           T[in].rdv);
    if (!T[in].so) {
        T[in].so = ef_malloc(n * 4), T[in].sdq = ef_malloc(n * 4), T[in].sdv = ef_malloc(n * 4);
        if (!T[in].so || !T[in].sdq || !T[in].sdv) return EF_ERR_NOMEM;
    }
    ef_status st = arena_exact(sh, R->causal, 1, scale, q, k, v, g, T[in].so, T[in].sdq, NULL,
                               T[in].sdv);
    if (!st) T[in].have_shared = 1;
    return st;
}

static void free_tensors(tensors *T, int n) {
    for (int i = 0; i < n; i++) {
        float **p[] = {&T[i].q,  &T[i].k,   &T[i].v,   &T[i].g,   &T[i].ro,  &T[i].rdq,
                       &T[i].rdk, &T[i].rdv, &T[i].so,  &T[i].sdq, &T[i].sdk, &T[i].sdv};
        for (size_t j = 0; j < sizeof p / sizeof p[0]; j++) ef_free(*p[j]), *p[j] = NULL;
        T[i].have_shared = 0;
    }
}

/* q, k, v of the model's layer R->layer on the first `batch` eval samples of its task, cut to
 * sh->len positions (every one valid: sh->len <= R->model_len); dout Gaussian. */
static ef_status model_inputs(arena_run *R, const arena_shape *sh, float *q, float *k, float *v,
                              float *dout) {
    ef_task_info ti;
    ef_task_get_info(R->task, &ti);
    int B = sh->batch, N = sh->len;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B * ti.len);
    int32_t *lens = malloc(sizeof(int32_t) * (size_t)B);
    int32_t *tgt = malloc(sizeof(int32_t) * (size_t)B * (ti.classes ? 1 : ti.len));
    ef_status st = EF_ERR_NOMEM;
    if (tok && lens && tgt && !(st = ef_task_batch(R->task, EF_SPLIT_EVAL, 0, B, tok, lens, tgt))) {
        for (int b = 0; b < B; b++) { /* rows of N */
            memmove(tok + (size_t)b * N, tok + (size_t)b * ti.len, sizeof(int32_t) * N);
            lens[b] = N;
        }
        ef_model_batch in = {.batch = B, .len = N, .tokens = tok, .lens = lens};
        st = ef_model_capture_qkv(R->model, &in, R->layer, q, k, v);
    }
    free(tok), free(lens), free(tgt);
    size_t n = (size_t)B * sh->heads * N * sh->dim;
    ef_rng_normal(INPUT_SEED, 3, 0, n, dout);
    return st;
}

/* Runs every spec at length index li. Returns CLI_OK, or CLI_FAIL when the length's own
 * buffers cannot be had (every cell of it is marked). */
static int run_length(arena_run *R, int li, double *done_s, int *done_n) {
    int N = R->lens[li];
    arena_shape sh = R->base;
    sh.len = N;
    size_t n = (size_t)sh.batch * sh.heads * N * sh.dim;
    tensors T[MAX_INPUTS];
    memset(T, 0, sizeof T);
    float *o = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
    char el[32];

    double sg = 0;
    if (cli_sgemm_gflops(1024, 3, &sg)) sg = NAN;

    /* the inputs and their exact attention: 8 tensors per kind and 4 outputs */
    double need = (double)n * 4 * (8.0 * R->n_inputs + 4);
    int ok = need <= R->mem_budget;
    for (int i = 0; ok && i < R->n_inputs; i++) {
        T[i].q = ef_malloc(n * 4), T[i].k = ef_malloc(n * 4), T[i].v = ef_malloc(n * 4);
        T[i].g = ef_malloc(n * 4), T[i].ro = ef_malloc(n * 4), T[i].rdq = ef_malloc(n * 4);
        T[i].rdk = ef_malloc(n * 4), T[i].rdv = ef_malloc(n * 4);
        ok = T[i].q && T[i].k && T[i].v && T[i].g && T[i].ro && T[i].rdq && T[i].rdk && T[i].rdv;
    }
    if (ok) {
        o = ef_malloc(n * 4), dq = ef_malloc(n * 4), dk = ef_malloc(n * 4), dv = ef_malloc(n * 4);
        ok = o && dq && dk && dv;
    }
    if (!ok) {
        for (int s = 0; s < R->n_specs; s++)
            cell_note(&R->cells[li][s], CELL_SKIP_MEMORY,
                      "the inputs and exact attention need %.1f GB (--mem-budget %.1f GB)",
                      need / 1e9, R->mem_budget / 1e9);
        fprintf(stderr, "eformer: arena: length %d skipped: its inputs and exact attention need "
                        "%.1f GB\n", N, need / 1e9);
        free_tensors(T, R->n_inputs);
        ef_free(o), ef_free(dq), ef_free(dk), ef_free(dv);
        return CLI_OK;
    }
    double t0 = cli_now();
    for (int i = 0; i < R->n_inputs; i++) {
        fmt_secs(el, sizeof el, cli_now() - R->t0);
        progress(R, "arena: N=%d: exact attention on %s inputs  (elapsed %s)", N,
                 input_name(R->inputs[i]), el);
        ef_status st = EF_OK;
        const char *what = "making the structured inputs";
        if (R->inputs[i] == IN_GAUSSIAN)
            arena_gaussian(&sh, INPUT_SEED, T[i].q, T[i].k, T[i].v, T[i].g);
        else if (R->inputs[i] == IN_STRUCTURED)
            st = arena_structured(&sh, R->causal, ST_WIDTH, ST_SHARP, INPUT_SEED, T[i].q, T[i].k,
                                  T[i].v, T[i].g);
        else if (N > R->model_len) {
            T[i].na = 1;
            continue;
        } else {
            what = "capturing q, k, v from the model";
            st = model_inputs(R, &sh, T[i].q, T[i].k, T[i].v, T[i].g);
        }
        if (!st) {
            what = "computing exact attention for the errors";
            st = make_exact(R, &sh, T, i, 0);
        }
        if (st) {
            cli_lib_error(st, what);
            free_tensors(T, R->n_inputs);
            ef_free(o), ef_free(dq), ef_free(dk), ef_free(dv);
            return CLI_FAIL;
        }
    }
    R->exact_s[li] = cli_now() - t0;

    ef_attn_shape ash = {sh.batch, sh.heads, N, N, sh.dim, sh.dim};
    for (int s = 0; s < R->n_specs; s++) {
        arena_spec *A = &R->specs[s];
        cell *c = &R->cells[li][s];
        c->sgemm = sg, c->fwd_s = c->fwdbwd_s = NAN;
        c->flops_fwd = c->flops_fwdbwd = NAN;
        for (int i = 0; i < MAX_INPUTS; i++)
            for (int t = 0; t < 4; t++) c->err[i][t] = NAN;
        double t_cell = cli_now();
        char left[32];
        fmt_secs(el, sizeof el, cli_now() - R->t0);
        fmt_secs(left, sizeof left, eta(R, li, s - 1, *done_s, *done_n));
        progress(R, "arena: [%d/%d] %s N=%d  (elapsed %s, about %s left)",
                 li * R->n_specs + s + 1, R->n_lens * R->n_specs, A->spec, N, el, left);
        if (A->no_causal) {
            cell_note(c, CELL_REFUSED, "no causal form (ef_attn_get_caps)");
            continue;
        }
        /* a spec over a budget at a shorter length is over it here too (a refused plan is
         * asked again: some shapes only work from some length on) */
        if (li > 0 && (R->cells[li - 1][s].status == CELL_SKIP_TIME ||
                       R->cells[li - 1][s].status == CELL_SKIP_MEMORY)) {
            const cell *p = &R->cells[li - 1][s];
            cell_note(c, p->status, "%s%s", strncmp(p->note, "as at", 5) ? "as at a shorter "
                                                                            "length: " : "",
                      p->note);
            continue;
        }
        double pred = predict_pass(R, s, li);
        if (isfinite(pred) && pred > R->budget) {
            cell_note(c, CELL_SKIP_TIME, "a pass would take about %.0f s (--budget %.0f s)", pred,
                      R->budget);
            continue;
        }
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, A->spec, &ash);
        if (st) {
            cell_note(c, st == EF_ERR_NOMEM ? CELL_SKIP_MEMORY : CELL_REFUSED, "%s: %s",
                      ef_status_str(st), ef_last_error());
            continue;
        }
        if (!A->canon[0]) snprintf(A->canon, sizeof A->canon, "%s", ef_attn_describe(a));
        c->ws_bytes = ef_attn_workspace_bytes(a);
        c->saved_bytes = R->backward ? ef_attn_saved_bytes(a) : 0;
        c->flops_fwd = ef_attn_flops(a, 0);
        c->flops_fwdbwd = ef_attn_flops(a, 1);
        double lib = (double)c->ws_bytes + c->saved_bytes;
        if (lib > R->mem_budget) {
            cell_note(c, CELL_SKIP_MEMORY, "workspace + saved %.1f GB (--mem-budget %.1f GB)",
                      lib / 1e9, R->mem_budget / 1e9);
            ef_attn_free(a);
            continue;
        }
        int rss_row = cli_reset_peak_rss();
        void *saved = c->saved_bytes ? ef_malloc(c->saved_bytes) : NULL;
        if (c->saved_bytes && !saved) {
            cell_note(c, CELL_SKIP_MEMORY, "%s", ef_last_error());
            ef_attn_free(a);
            continue;
        }
        int t0i = 0; /* the timing input: the first that exists at this length */
        while (t0i < R->n_inputs - 1 && T[t0i].na) t0i++;
        if (T[t0i].na) {
            cell_note(c, CELL_NO_INPUT, "the model's inputs end at N=%d", R->model_len);
            ef_free(saved);
            ef_attn_free(a);
            continue;
        }
        pass_ctx p = {a, {T[t0i].q, T[t0i].k, T[t0i].v, NULL, o, NULL}, saved, T[t0i].g, dq, dk,
                      dv, 0};
        int reps = 0;
        st = time_pass(R, &p, &c->fwd_s, &reps);
        if (!st && R->backward) {
            p.backward = 1;
            st = time_pass(R, &p, &c->fwdbwd_s, &reps);
        }
        c->reps = reps;
        /* errors: the last timed pass left input 0's results; one pass for each other kind */
        int shared = A->caps.shared_qk;
        for (int i = t0i; !st && i < R->n_inputs; i++) {
            if (T[i].na) continue;
            if (i > t0i) {
                p.io.q = T[i].q, p.io.k = T[i].k, p.io.v = T[i].v, p.g = T[i].g;
                if ((st = run_pass(&p))) break;
            }
            if (shared && !T[i].have_shared && (st = make_exact(R, &sh, T, i, 1))) {
                cli_lib_error(st, "computing exact shared-QK attention for the errors");
                break;
            }
            const float *ro = shared ? T[i].so : T[i].ro;
            c->err[i][0] = arena_rel_err(o, ro, n);
            if (R->backward) {
                c->err[i][1] = arena_rel_err(dq, shared ? T[i].sdq : T[i].rdq, n);
                c->err[i][2] = shared ? NAN : arena_rel_err(dk, T[i].rdk, n);
                c->err[i][3] = arena_rel_err(dv, shared ? T[i].sdv : T[i].rdv, n);
            }
        }
        c->rss_bytes = cli_peak_rss();
        if (!rss_row) c->rss_bytes = 0; /* not measurable per row here */
        if (st) {
            cell_note(c, CELL_FAILED, "%s: %s", ef_status_str(st), ef_last_error());
            fprintf(stderr, "\neformer: arena: %s at N=%d failed: %s\n", A->spec, N, c->note);
        } else {
            c->status = CELL_OK;
            if (shared) snprintf(c->note, sizeof c->note, "errors against shared-QK attention");
        }
        ef_free(saved);
        ef_attn_free(a);
        *done_s += cli_now() - t_cell, (*done_n)++;
    }
    free_tensors(T, R->n_inputs);
    ef_free(o), ef_free(dq), ef_free(dk), ef_free(dv);
    return CLI_OK;
}

/* ---------------------------------------------------------------------------------------------
 * The summary per spec
 * ------------------------------------------------------------------------------------------- */
typedef struct summary {
    double t_exp, m_exp;  /* fitted */
    int last;             /* index of the largest length run, -1 none */
    double time_s, bytes; /* at it */
    double speedup;       /* flash time / this time at the largest length both ran */
    int speedup_len;
    double err[MAX_INPUTS]; /* output error at `last` */
} summary;

static double pass_time(const arena_run *R, const cell *c) {
    return R->backward ? c->fwdbwd_s : c->fwd_s;
}

static summary summarise(const arena_run *R, int s) {
    summary m = {NAN, NAN, -1, NAN, NAN, NAN, 0, {NAN, NAN, NAN, NAN}};
    double x[MAX_LENS] = {0}, t[MAX_LENS] = {0}, b[MAX_LENS] = {0};
    int n = 0;
    for (int l = 0; l < R->n_lens; l++) {
        const cell *c = &R->cells[l][s];
        if (c->status != CELL_OK) continue;
        x[n] = R->lens[l], t[n] = pass_time(R, c), b[n] = (double)c->ws_bytes + c->saved_bytes;
        n++;
        m.last = l;
    }
    m.t_exp = arena_slope(x, t, n);
    m.m_exp = arena_slope(x, b, n);
    if (m.last >= 0) {
        const cell *c = &R->cells[m.last][s];
        m.time_s = pass_time(R, c), m.bytes = (double)c->ws_bytes + c->saved_bytes;
    }
    for (int i = 0; i < R->n_inputs; i++) /* at the largest length this input exists */
        for (int l = m.last; l >= 0 && !isfinite(m.err[i]); l--)
            if (R->cells[l][s].status == CELL_OK) m.err[i] = R->cells[l][s].err[i][0];
    int f = -1;
    for (int k = 0; k < R->n_specs; k++)
        if (!strcmp(R->specs[k].label, "flash")) { /* fp32 flash */
            f = k;
            break;
        }
    for (int l = R->n_lens - 1; f >= 0 && l >= 0; l--) {
        const cell *c = &R->cells[l][s], *cf = &R->cells[l][f];
        if (c->status == CELL_OK && cf->status == CELL_OK) {
            m.speedup = pass_time(R, cf) / pass_time(R, c), m.speedup_len = R->lens[l];
            break;
        }
    }
    return m;
}

static const char *family_code(const char *family) {
    if (!family) return "?";
    if (!strcmp(family, "exact")) return "exact";
    if (!strcmp(family, "fixed pattern")) return "FP";
    if (!strcmp(family, "fixed pattern+global memory")) return "FP+M";
    if (!strcmp(family, "learnable pattern")) return "LP";
    if (!strcmp(family, "low rank")) return "LR";
    if (!strcmp(family, "kernel")) return "KR";
    return "?";
}

static void fmt_num(char *buf, size_t cap, const char *fmt, double x) {
    if (isfinite(x))
        snprintf(buf, cap, fmt, x);
    else
        snprintf(buf, cap, "-");
}

static void fmt_len(char *buf, size_t cap, int n) {
    if (n >= 1024 && n % 1024 == 0)
        snprintf(buf, cap, "%dK", n / 1024);
    else
        snprintf(buf, cap, "%d", n);
}

/* The survey's table (fits 100 columns); markdown = 1 for report.md. */
static void print_table(FILE *f, const arena_run *R, int markdown) {
    /* one error column per input kind, in the order run */
    const char *hdr[13] = {"mechanism", "family", "claim", "causal", "t-exp", "m-exp", "time",
                           "memory", "at N", "x flash"};
    int w[13] = {12, 6, 10, 6, 5, 5, 7, 7, 4, 7};
    int ncol = 10, narrow = !markdown && R->n_inputs > 2; /* 1-digit errors fit 100 columns */
    for (int i = 0; i < R->n_inputs && i < 3; i++) {
        static const char *const eh[] = {"err g", "err s", "err m"};
        hdr[ncol] = eh[R->inputs[i]], w[ncol++] = narrow ? 5 : 7;
    }
    if (markdown) {
        for (int c = 0; c < ncol; c++) fprintf(f, "| %s ", hdr[c]);
        fprintf(f, "|\n");
        for (int c = 0; c < ncol; c++) fprintf(f, "|%s", c == 0 || c == 1 || c == 2 ? "---" : "--:");
        fprintf(f, "|\n");
    } else {
        for (int c = 0; c < ncol; c++) fprintf(f, c ? " %*s" : "%-*s", c < 3 ? -w[c] : w[c], hdr[c]);
        fprintf(f, "\n");
    }
    for (int s = 0; s < R->n_specs; s++) {
        const arena_spec *A = &R->specs[s];
        arena_claim cl = arena_claim_of(A->name);
        summary m = summarise(R, s);
        char col[13][48];
        snprintf(col[0], 48, "%s", A->label);
        snprintf(col[1], 48, "%s", family_code(cl.family));
        snprintf(col[2], 48, "%s", cl.complexity ? cl.complexity : "?");
        snprintf(col[3], 48, "%s", A->caps.causal ? "yes" : "no");
        fmt_num(col[4], 48, "%.2f", m.t_exp);
        fmt_num(col[5], 48, "%.2f", m.m_exp);
        if (isfinite(m.time_s) && m.time_s < 1)
            snprintf(col[6], 48, "%.1f ms", m.time_s * 1e3);
        else
            fmt_num(col[6], 48, "%.2f s", m.time_s);
        fmt_num(col[7], 48, m.bytes < 1e7 ? "%.2f MB" : "%.0f MB", m.bytes / 1e6);
        if (m.last >= 0)
            fmt_len(col[8], 48, R->lens[m.last]);
        else
            snprintf(col[8], 48, "-");
        fmt_num(col[9], 48, "%.3g", m.speedup);
        if (isfinite(m.speedup) && m.last >= 0 && m.speedup_len != R->lens[m.last]) {
            char l[16];
            fmt_len(l, sizeof l, m.speedup_len);
            snprintf(col[9], 48, "%.3g@%s", m.speedup, l);
        }
        for (int i = 0; i < ncol - 10; i++)
            fmt_num(col[10 + i], 48, narrow ? "%.0e" : "%.1e", m.err[i]);
        if (m.last < 0) { /* say why */
            const cell *c = &R->cells[0][s];
            snprintf(col[6], 48, "%s", status_name[c->status]);
        }
        if (markdown) {
            for (int c = 0; c < ncol; c++) fprintf(f, "| %s ", col[c]);
            fprintf(f, "|\n");
        } else {
            for (int c = 0; c < ncol; c++)
                fprintf(f, c ? " %*s" : "%-*s", c < 3 ? -w[c] : w[c], col[c]);
            fprintf(f, "\n");
        }
    }
}

static const char table_legend[] =
    "family: exact; FP fixed pattern; FP+M fixed pattern + global memory; LP learnable "
    "pattern;\nLR low rank; KR kernel (the survey's taxonomy). claim: the survey's time "
    "complexity.\nt-exp, m-exp: log-log slope of the time and of the library's bytes over the "
    "lengths run.\ntime, memory: at the largest length run (at N). x flash: flash's time over "
    "this one at\nthe largest length both ran. err g, s, m: relative Frobenius error of the output "
    "against\nexact attention at that length on Gaussian, structured and model inputs.\n";

/* ---------------------------------------------------------------------------------------------
 * Files
 * ------------------------------------------------------------------------------------------- */
/* One record: (length l, spec s, input kind i) as named fields, written as a CSV row or a JSON
 * object by the same list. Times and bytes are those of the timing input, repeated on the other
 * kinds' records; NAN = not measured or not applicable (empty in CSV, null in JSON). */
typedef struct field {
    const char *key;
    const char *str; /* a string field, or NULL for a number */
    double num;
    const char *fmt;
} field;

#define MAX_FIELDS 32

static int record_fields(const arena_run *R, int l, int s, int i, field *F) {
    const cell *c = &R->cells[l][s];
    const arena_spec *A = &R->specs[s];
    arena_claim cl = arena_claim_of(A->name);
    int ok = c->status == CELL_OK, n = 0;
    double gf = ok ? c->flops_fwd / c->fwd_s / 1e9 : NAN;
    double gfb = ok ? c->flops_fwdbwd / c->fwdbwd_s / 1e9 : NAN;
#define STR(k, v) F[n++] = (field){k, v, 0, NULL}
#define NUM(k, v, f) F[n++] = (field){k, NULL, v, f}
    STR("machine", R->cpu);
    STR("compiler", R->compiler);
    NUM("threads", R->threads, "%.0f");
    NUM("sgemm_gflops", c->sgemm, "%.2f");
    STR("spec", A->canon[0] ? A->canon : A->spec);
    STR("mechanism", A->name);
    STR("family", cl.family ? cl.family : "");
    STR("input", input_name(R->inputs[i]));
    NUM("batch", R->base.batch, "%.0f");
    NUM("heads", R->base.heads, "%.0f");
    NUM("len", R->lens[l], "%.0f");
    NUM("dim", R->base.dim, "%.0f");
    NUM("causal", R->causal, "%.0f");
    STR("status", status_name[c->status]);
    STR("note", c->note);
    NUM("fwd_s", ok ? c->fwd_s : NAN, "%.6g");
    NUM("fwdbwd_s", ok ? c->fwdbwd_s : NAN, "%.6g");
    NUM("reps", ok ? c->reps : 0, "%.0f");
    NUM("gflops_fwd", gf, "%.4g");
    NUM("gflops_fwdbwd", gfb, "%.4g");
    NUM("fraction_of_sgemm", (R->backward ? gfb : gf) / c->sgemm, "%.4f");
    NUM("workspace_bytes", ok ? (double)c->ws_bytes : NAN, "%.0f");
    NUM("saved_bytes", ok ? (double)c->saved_bytes : NAN, "%.0f");
    NUM("rss_bytes", ok && c->rss_bytes ? (double)c->rss_bytes : NAN, "%.0f");
    NUM("err_out", c->err[i][0], "%.4g");
    NUM("err_dq", c->err[i][1], "%.4g");
    NUM("err_dk", c->err[i][2], "%.4g");
    NUM("err_dv", c->err[i][3], "%.4g");
#undef STR
#undef NUM
    return n;
}

/* a CSV field: quoted, quotes doubled */
static void csv_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static int write_csv(const arena_run *R, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    field F[MAX_FIELDS];
    int n = record_fields(R, 0, 0, 0, F);
    for (int k = 0; k < n; k++) fprintf(f, "%s%s", k ? "," : "", F[k].key);
    fputc('\n', f);
    for (int l = 0; l < R->n_lens; l++)
        for (int s = 0; s < R->n_specs; s++)
            for (int i = 0; i < R->n_inputs; i++) {
                n = record_fields(R, l, s, i, F);
                for (int k = 0; k < n; k++) {
                    if (k) fputc(',', f);
                    if (F[k].str)
                        csv_str(f, F[k].str);
                    else if (isfinite(F[k].num))
                        fprintf(f, F[k].fmt, F[k].num);
                }
                fputc('\n', f);
            }
    return fclose(f) ? -1 : 0;
}

static int write_json(const arena_run *R, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "{\"machine\":");
    cli_json_string(f, R->cpu);
    fprintf(f, ",\"compiler\":");
    cli_json_string(f, R->compiler);
    fprintf(f, ",\"eformer\":");
    cli_json_string(f, ef_version());
    fprintf(f, ",\"command\":");
    cli_json_string(f, R->cmdline);
    fprintf(f, ",\"threads\":%d,\"batch\":%d,\"heads\":%d,\"dim\":%d,\"causal\":%d,"
               "\"backward\":%d",
            R->threads, R->base.batch, R->base.heads, R->base.dim, R->causal, R->backward);
    cli_json_num(f, "budget_s", R->budget, "%.6g");
    cli_json_num(f, "mem_budget_bytes", R->mem_budget, "%.6g");
    fprintf(f, ",\"records\":[\n");
    int first = 1;
    field F[MAX_FIELDS];
    for (int l = 0; l < R->n_lens; l++)
        for (int s = 0; s < R->n_specs; s++)
            for (int i = 0; i < R->n_inputs; i++) {
                int n = record_fields(R, l, s, i, F);
                fputs(first ? "{" : ",\n{", f);
                first = 0;
                for (int k = 0; k < n; k++) {
                    if (F[k].str) {
                        fprintf(f, "%s\"%s\":", k ? "," : "", F[k].key);
                        cli_json_string(f, F[k].str);
                    } else if (k)
                        cli_json_num(f, F[k].key, F[k].num, F[k].fmt);
                    else /* cli_json_num writes the leading comma */
                        return fclose(f), -1;
                }
                fputc('}', f);
            }
    fprintf(f, "\n]}\n");
    return fclose(f) ? -1 : 0;
}

/* gnuplot: time and memory vs length (log-log, a line per mechanism), error vs speed-up. The
 * data go to plots.dat (an index per mechanism), the script to plots.gp. Returns 0 when the
 * three PNGs were drawn. */
static int write_plots(const arena_run *R, const char *dir) {
    char path[1200];
    snprintf(path, sizeof path, "%s/plots.dat", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    for (int s = 0; s < R->n_specs; s++) {
        fprintf(f, "# %s\n", R->specs[s].label);
        for (int l = 0; l < R->n_lens; l++) {
            const cell *c = &R->cells[l][s];
            if (c->status != CELL_OK) continue;
            fprintf(f, "%d %.6g %.6g\n", R->lens[l], pass_time(R, c),
                    ((double)c->ws_bytes + c->saved_bytes) / 1e6);
        }
        fprintf(f, "\n\n");
    }
    /* error vs speed-up: one point per mechanism, a block per input kind */
    int npts = 0;
    for (int i = 0; i < R->n_inputs; i++) {
        fprintf(f, "# error vs speed-up, %s inputs\n", input_name(R->inputs[i]));
        for (int s = 0; s < R->n_specs; s++) {
            summary m = summarise(R, s);
            if (!isfinite(m.speedup) || m.last < 0 || !isfinite(m.err[i])) continue;
            double e = m.err[i];
            fprintf(f, "%.6g %.6g %s\n", m.speedup, e > 1e-9 ? e : 1e-9, R->specs[s].label);
            npts++;
        }
        fprintf(f, "\n\n");
    }
    /* quality vs speed-up (the last block) */
    int nq = 0;
    if (R->qcfg.task) {
        fprintf(f, "# quality vs speed-up\n");
        for (int s = 0; s < R->n_specs; s++) {
            summary m = summarise(R, s);
            double y = R->q_text ? R->quality[s].bpb : 100 * R->quality[s].acc;
            if (!isfinite(m.speedup) || !isfinite(y)) continue;
            fprintf(f, "%.6g %.6g %s\n", m.speedup, y, R->specs[s].label);
            nq++;
        }
        fprintf(f, "\n\n");
    }
    if (fclose(f)) return -1;

    snprintf(path, sizeof path, "%s/plots.gp", dir);
    if (!(f = fopen(path, "w"))) return -1;
    const char *pass = R->backward ? "forward+backward" : "forward";
    fprintf(f,
            "# eformer arena plots (gnuplot); run in this folder: gnuplot plots.gp\n"
            "set terminal pngcairo size 1000,700 noenhanced font ',11'\n"
            "set logscale xy 2\nset grid\nset key outside right\n"
            "set xlabel 'sequence length N'\n");
    static const char *const what[2] = {"time", "memory"};
    for (int w = 0; w < 2; w++) {
        fprintf(f, "set output '%s.png'\n", what[w]);
        fprintf(f, "set ylabel '%s'\n",
                w ? "library memory: workspace + saved (MB)" : "median seconds per pass");
        fprintf(f, "set title '%s vs length (%s, batch %d, heads %d, dim %d, %s, %d threads)'\n",
                what[w], pass, R->base.batch, R->base.heads, R->base.dim,
                R->causal ? "causal" : "bidirectional", R->threads);
        fprintf(f, "set logscale y 10\nplot ");
        int any = 0;
        for (int s = 0; s < R->n_specs; s++) {
            summary m = summarise(R, s);
            if (m.last < 0) continue;
            fprintf(f, "%s'plots.dat' index %d using 1:%d with linespoints title '%s'",
                    any ? ", \\\n     " : "", s, w ? 3 : 2, R->specs[s].label);
            any = 1;
        }
        if (!any) fprintf(f, "NaN notitle");
        fprintf(f, "\n");
    }
    fprintf(f,
            "set output 'error_vs_speedup.png'\nunset logscale\nset logscale xy 10\n"
            "set xlabel 'speed-up over flash (at the largest length both ran)'\n"
            "set ylabel 'relative Frobenius error of the output'\n"
            "set format y '%%.0e'\nset key inside top right\n"
            "set title 'error against exact attention vs speed-up over flash (%s)'\n",
            pass);
    if (npts) {
        fprintf(f, "plot ");
        for (int i = 0; i < R->n_inputs; i++)
            fprintf(f, "%s'plots.dat' index %d using 1:2 with points pt %d ps 1.5 title '%s "
                       "inputs', '' index %d using 1:2:3 with labels offset 0,1 notitle",
                    i ? ", \\\n     " : "", R->n_specs + i, 7 + 2 * i,
                    input_name(R->inputs[i]), R->n_specs + i);
        fprintf(f, "\n");
    } else
        fprintf(f, "plot NaN notitle\n");
    if (R->qcfg.task) {
        fprintf(f,
                "set output 'quality.png'\nunset logscale\nset logscale x 10\nset format y '%%g'\n"
                "set xlabel 'speed-up over flash (at the largest length both ran)'\n"
                "set ylabel '%s'\nset key off\n"
                "set title '%s after %g minutes of training vs speed-up'\n",
                R->q_text ? "held-out bits per byte (lower is better)" : "held-out accuracy (%)",
                R->qcfg.task, R->qcfg.seconds / 60);
        if (nq)
            fprintf(f, "plot 'plots.dat' index %d using 1:2 with points pt 7 ps 1.5, '' index %d "
                       "using 1:2:3 with labels offset 0,1\n",
                    R->n_specs + R->n_inputs, R->n_specs + R->n_inputs);
        else
            fprintf(f, "plot NaN notitle\n");
    }
    if (fclose(f)) return -1;
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "cd '%s' && gnuplot plots.gp", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void print_quality(FILE *f, const arena_run *R, int markdown);

static int write_report(const arena_run *R, const char *path, int plots_ok) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "# eformer arena\n\n");
    fprintf(f, "`%s`\n\n", R->cmdline);
    double lo = INFINITY, hi = 0;
    for (int l = 0; l < R->n_lens; l++)
        for (int s = 0; s < R->n_specs; s++)
            if (isfinite(R->cells[l][s].sgemm))
                lo = fmin(lo, R->cells[l][s].sgemm), hi = fmax(hi, R->cells[l][s].sgemm);
    fprintf(f, "- machine: %s, %d threads; compiler: %s; eformer %s\n", R->cpu, R->threads,
            R->compiler, ef_version());
    fprintf(f, "- sgemm at 1024^3, measured before each length: %.0f-%.0f GFLOP/s\n", lo, hi);
    fprintf(f, "- shape: batch %d, heads %d, head dim %d, %s; passes timed: forward%s; "
               "median of up to %d runs after a warm-up, on Gaussian inputs\n",
            R->base.batch, R->base.heads, R->base.dim, R->causal ? "causal" : "bidirectional",
            R->backward ? " and forward+backward" : "", R->reps);
    fprintf(f, "- budgets: a pass over %.0f s (extrapolated) or workspace + saved over %.1f GB "
               "is skipped\n\n",
            R->budget, R->mem_budget / 1e9);
    fprintf(f, "## The survey's table, measured\n\n");
    print_table(f, R, 1);
    fprintf(f, "\n%s\n", table_legend);
    if (plots_ok)
        fprintf(f, "![time vs length](time.png)\n\n![memory vs length](memory.png)\n\n"
                   "![error vs speed-up](error_vs_speedup.png)\n\n");
    else
        fprintf(f, "(no plots: gnuplot failed or is not installed; Debian package gnuplot-nox)\n\n");
    if (R->qcfg.task) {
        fprintf(f, "## Quality: %s, %g minutes of training each\n\n", R->qcfg.task,
                R->qcfg.seconds / 60);
        fprintf(f, "Model `%s,attn=SPEC` (the task adds vocab, max_len and the head), batch %d, "
                   "AdamW lr %g constant after 100 warm-up steps, %d threads; held-out figures "
                   "from the final evaluation (quality.csv; logs and checkpoints "
                   "quality_NAME.*).\n\n",
                R->qcfg.model, R->qcfg.batch, R->qcfg.lr, R->threads);
        print_quality(f, R, 1);
        if (plots_ok) fprintf(f, "\n![quality vs speed-up](quality.png)\n");
        fprintf(f, "\n");
    }
    fprintf(f, "## Every measurement\n\n");
    fprintf(f, "Times in ms; GF/s = the library's analytic FLOP count over the time; %% = of the "
               "sgemm rate measured before that length; MB = workspace + saved; errors: relative "
               "Frobenius error of out, dq, dk, dv against exact attention.\n\n");
    fprintf(f, "| mechanism | N | fwd ms | fwd+bwd ms | GF/s | %% sgemm | MB | RSS MB |");
    for (int i = 0; i < R->n_inputs; i++)
        fprintf(f, " err out / dq / dk / dv (%s) |", input_name(R->inputs[i]));
    fprintf(f, " status |\n|---|--:|--:|--:|--:|--:|--:|--:|");
    for (int i = 0; i < R->n_inputs; i++) fprintf(f, "--:|");
    fprintf(f, "---|\n");
    for (int s = 0; s < R->n_specs; s++)
        for (int l = 0; l < R->n_lens; l++) {
            const cell *c = &R->cells[l][s];
            int ok = c->status == CELL_OK;
            char b[8][48];
            fmt_num(b[0], 48, "%.2f", ok ? c->fwd_s * 1e3 : NAN);
            fmt_num(b[1], 48, "%.2f", ok ? c->fwdbwd_s * 1e3 : NAN);
            double gf = ok ? (R->backward ? c->flops_fwdbwd / c->fwdbwd_s : c->flops_fwd / c->fwd_s) / 1e9
                           : NAN;
            fmt_num(b[2], 48, "%.1f", gf);
            fmt_num(b[3], 48, "%.1f", 100 * gf / c->sgemm);
            fmt_num(b[4], 48, "%.1f", ok ? ((double)c->ws_bytes + c->saved_bytes) / 1e6 : NAN);
            fmt_num(b[5], 48, "%.0f", ok && c->rss_bytes ? c->rss_bytes / 1e6 : NAN);
            fprintf(f, "| %s | %d | %s | %s | %s | %s | %s | %s |", R->specs[s].label, R->lens[l],
                    b[0], b[1], b[2], b[3], b[4], b[5]);
            for (int i = 0; i < R->n_inputs; i++) {
                char e[4][16];
                for (int t = 0; t < 4; t++) fmt_num(e[t], 16, "%.1e", c->err[i][t]);
                fprintf(f, " %s / %s / %s / %s |", e[0], e[1], e[2], e[3]);
            }
            fprintf(f, " %s%s%s |\n", status_name[c->status], c->note[0] ? ": " : "", c->note);
        }
    fprintf(f, "\nThe specs as run (every option filled in):\n\n");
    for (int s = 0; s < R->n_specs; s++)
        fprintf(f, "- `%s`\n", R->specs[s].canon[0] ? R->specs[s].canon : R->specs[s].spec);
    fprintf(f, "\nFiles: results.csv and results.json (one record per mechanism, length and input; "
               "times and bytes from the Gaussian run), plots.gp and plots.dat (the plots' "
               "gnuplot script and data).\n");
    return fclose(f) ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------------------------- */
static void read_cpu(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *p = strchr(line, ':');
            if (!p) break;
            p++;
            while (*p == ' ' || *p == '\t') p++;
            p[strcspn(p, "\n")] = 0;
            snprintf(buf, cap, "%s", p);
            break;
        }
    fclose(f);
}

/* Adds causal=1 to spec (":causal=1" or ",causal=1") into out. */
static void with_causal(const char *spec, char *out, size_t cap) {
    size_t n = strlen(spec);
    if (n + 10 > cap) n = cap - 10; /* the callers' specs are shorter */
    memcpy(out, spec, n);
    memcpy(out + n, strchr(spec, ':') ? ",causal=1" : ":causal=1", 10);
}

static int add_spec(arena_run *R, const char *spec, size_t len) {
    if (R->n_specs >= MAX_SPECS)
        return cli_usage_error("arena", "arena: more than %d specs", MAX_SPECS);
    arena_spec *A = &R->specs[R->n_specs];
    memset(A, 0, sizeof *A);
    if (len == 0 || len >= sizeof A->spec - 16)
        return cli_usage_error("arena", "arena: --specs: an empty or overlong spec");
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%.*s", (int)len, spec);
    size_t nl = strcspn(tmp, ":");
    if (nl >= sizeof A->name)
        return cli_usage_error("arena", "arena: --specs: unknown mechanism '%s'", tmp);
    snprintf(A->name, sizeof A->name, "%.*s", (int)nl, tmp);
    if (ef_attn_get_caps(A->name, &A->caps) != EF_OK)
        return cli_usage_error("arena",
                               "arena: --specs: unknown mechanism '%s' (`eformer info "
                               "--mechanisms` lists them)",
                               A->name);
    size_t ln = strlen(A->name); /* (no snprintf between two fields: GCC's -Wrestrict) */
    memcpy(A->label, A->name, ln + 1);
    if (cli_spec_key_is(tmp, "precision", "bf16")) memcpy(A->label + ln, "-bf16", 6);
    if (cli_spec_key_is(tmp, "block", "auto")) memcpy(A->label + ln, "-auto", 6);
    if (R->causal && !cli_spec_has_key(tmp, "causal")) {
        with_causal(tmp, A->spec, sizeof A->spec);
        A->no_causal = !A->caps.causal;
    } else
        snprintf(A->spec, sizeof A->spec, "%s", tmp);
    R->n_specs++;
    return CLI_OK;
}

/* --quality: every spec trained on the task for the same time. */
static void run_quality(arena_run *R) {
    const arena_quality_cfg *c = &R->qcfg;
    for (int s = 0; s < R->n_specs; s++) {
        arena_spec *A = &R->specs[s];
        arena_quality *q = &R->quality[s];
        memset(q, 0, sizeof *q);
        q->tokens_per_s = q->loss = q->acc = q->bpb = NAN;
        if (R->q_causal && !A->caps.causal) {
            snprintf(q->note, sizeof q->note, "no causal form for a next-token task");
            continue;
        }
        if (R->q_causal && !cli_spec_has_key(A->spec, "causal"))
            with_causal(A->spec, R->q_spec[s], sizeof R->q_spec[s]);
        else {
            size_t n = strlen(A->spec) < sizeof R->q_spec[s] ? strlen(A->spec)
                                                              : sizeof R->q_spec[s] - 1;
            memcpy(R->q_spec[s], A->spec, n); /* (snprintf: GCC's -Wrestrict sees R twice) */
            R->q_spec[s][n] = 0;
        }
        char el[32], left[32];
        fmt_secs(el, sizeof el, cli_now() - R->t0);
        fmt_secs(left, sizeof left, (R->n_specs - s) * (c->seconds + 15));
        progress(R, "arena: quality [%d/%d] %s on %s, %.0f s  (elapsed %s, about %s left)",
                 s + 1, R->n_specs, R->q_spec[s], c->task, c->seconds, el, left);
        double t = cli_now();
        arena_quality_run(c, A->label, R->q_spec[s], q);
        q->seconds = cli_now() - t;
        if (!q->ok) fprintf(stderr, "%seformer: arena: quality of %s: %s\n", R->tty ? "\n" : "",
                            A->label, q->note);
    }
}

static void print_quality(FILE *f, const arena_run *R, int markdown) {
    const char *metric = R->q_text ? "bpb" : "acc";
    if (markdown)
        fprintf(f, "| mechanism | steps | tokens/s | eval loss | eval %s | x flash (speed) | note |\n"
                   "|---|--:|--:|--:|--:|--:|---|\n", metric);
    else
        fprintf(f, "%-12s %8s %9s %9s %9s %8s  %s\n", "mechanism", "steps", "tokens/s",
                "eval loss", R->q_text ? "eval bpb" : "eval acc", "x flash", "note");
    for (int s = 0; s < R->n_specs; s++) {
        const arena_quality *q = &R->quality[s];
        summary m = summarise(R, s);
        char b[5][32];
        fmt_num(b[0], 32, "%.0f", q->ok ? (double)q->steps : NAN);
        fmt_num(b[1], 32, "%.0f", q->tokens_per_s);
        fmt_num(b[2], 32, "%.4f", q->loss);
        if (R->q_text)
            fmt_num(b[3], 32, "%.3f", q->bpb);
        else
            fmt_num(b[3], 32, "%.2f%%", 100 * q->acc);
        fmt_num(b[4], 32, "%.3g", m.speedup);
        if (markdown)
            fprintf(f, "| %s | %s | %s | %s | %s | %s | %s |\n", R->specs[s].label, b[0], b[1], b[2],
                    b[3], b[4], q->note);
        else
            fprintf(f, "%-12s %8s %9s %9s %9s %8s  %s\n", R->specs[s].label, b[0], b[1], b[2], b[3],
                    b[4], q->note);
    }
}

static int write_quality_csv(const arena_run *R, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "machine,threads,task,model,minutes,mechanism,spec,ok,note,steps,tokens_per_s,"
               "loss,acc,bpb,seconds\n");
    for (int s = 0; s < R->n_specs; s++) {
        const arena_quality *q = &R->quality[s];
        fprintf(f, "\"%s\",%d,\"%s\",\"%s\",%g,\"%s\",\"%s\",%d,\"%s\",%lld", R->cpu, R->threads,
                R->qcfg.task, R->qcfg.model, R->qcfg.seconds / 60, R->specs[s].name, R->q_spec[s],
                q->ok, q->note, q->steps);
        double v[5] = {q->tokens_per_s, q->loss, q->acc, q->bpb, q->seconds};
        for (int k = 0; k < 5; k++) {
            fputc(',', f);
            if (isfinite(v[k])) fprintf(f, "%.6g", v[k]);
        }
        fputc('\n', f);
    }
    return fclose(f) ? -1 : 0;
}

/* Loads --inputs model:FILE, its task (from FILE.opt, as `eformer eval` does) and fixes the
 * heads and head dim from it. Returns an exit status. */
static int open_model(arena_run *R, int heads_given, int dim_given) {
    const char *path = R->model_path;
    char *task_spec = NULL, *seed_s = NULL;
    ef_status st = ef_train_read_meta(path, "train.task", &task_spec);
    if (st) {
        cli_lib_error_hint(st, "reading the task of --inputs model:FILE",
                           "model:FILE is a checkpoint `eformer train --save FILE` wrote; its "
                           "task, whose eval samples feed the model, is in FILE" EF_TRAIN_OPT_SUFFIX);
        return CLI_FAIL;
    }
    int seed = 1;
    if (!ef_train_read_meta(path, "train.seed", &seed_s)) seed = atoi(seed_s);
    free(seed_s);
    int rc = CLI_OK;
    if ((st = ef_task_new(&R->task, task_spec, (uint64_t)seed))) {
        cli_lib_error(st, "making the model's task");
        rc = CLI_FAIL;
        goto out;
    }
    ef_model_opts mo = {.batch = R->base.batch, .seed = 0, .train = 0};
    if ((st = ef_model_load(&R->model, path, &mo))) {
        cli_lib_error(st, "loading --inputs model:FILE");
        rc = CLI_FAIL;
        goto out;
    }
    ef_model_info mi;
    ef_model_get_info(R->model, &mi);
    if (R->layer >= mi.layers) {
        rc = cli_usage_error("arena", "arena: --layer %d: the model has %d layers", R->layer,
                             mi.layers);
        goto out;
    }
    int D = mi.dim / mi.heads;
    if ((heads_given && R->base.heads != mi.heads) || (dim_given && R->base.dim != D)) {
        rc = cli_usage_error("arena",
                             "arena: --heads %d --dim %d, but the model's attention has %d heads "
                             "of dim %d (leave them out with model:FILE)",
                             R->base.heads, R->base.dim, mi.heads, D);
        goto out;
    }
    R->base.heads = mi.heads, R->base.dim = D;
    /* the lengths at which every one of the first `batch` eval samples fills the rows */
    ef_task_info ti;
    ef_task_get_info(R->task, &ti);
    int32_t *tok = malloc(sizeof(int32_t) * ti.len), tl = 0;
    int32_t *tgt = malloc(sizeof(int32_t) * (ti.classes ? 1 : ti.len));
    R->model_len = mi.max_len < ti.len ? mi.max_len : ti.len;
    for (int b = 0; tok && tgt && b < R->base.batch && b < ti.n_eval; b++)
        if (!ef_task_sample(R->task, EF_SPLIT_EVAL, b, tok, &tl, tgt) && tl < R->model_len)
            R->model_len = tl;
    if (R->base.batch > ti.n_eval) R->model_len = 0;
    free(tok), free(tgt);
    if (mi.causal && !R->causal)
        fprintf(stderr, "eformer: arena: note: the model is causal; --causal compares its q, k, v "
                        "with causal exact attention, as it was trained\n");
out:
    free(task_spec);
    return rc;
}

int cli_arena(int argc, char **argv) {
    enum {
        O_SPECS, O_LENS, O_BATCH, O_HEADS, O_DIM, O_CAUSAL, O_NOBWD, O_INPUTS, O_BUDGET,
        O_MEM, O_REPS, O_OUT, O_THR, O_NOPLOTS, O_LAYER, O_QUALITY, O_MINUTES, O_QMODEL,
        O_QBATCH, O_QLR, O_HELP, N_OPTS
    };
    cli_opt opts[N_OPTS] = {
        [O_SPECS] = {"specs", 1, NULL},      [O_LENS] = {"lens", 1, NULL},
        [O_BATCH] = {"batch", 1, NULL},      [O_HEADS] = {"heads", 1, NULL},
        [O_DIM] = {"dim", 1, NULL},          [O_CAUSAL] = {"causal", 0, NULL},
        [O_NOBWD] = {"no-backward", 0, NULL}, [O_INPUTS] = {"inputs", 1, NULL},
        [O_BUDGET] = {"budget", 1, NULL},    [O_MEM] = {"mem-budget", 1, NULL},
        [O_REPS] = {"reps", 1, NULL},        [O_OUT] = {"out", 1, NULL},
        [O_THR] = {"threads", 1, NULL},      [O_NOPLOTS] = {"no-plots", 0, NULL},
        [O_LAYER] = {"layer", 1, NULL},      [O_HELP] = {"help", 0, NULL},
        [O_QUALITY] = {"quality", 1, NULL},  [O_MINUTES] = {"minutes", 1, NULL},
        [O_QMODEL] = {"quality-model", 1, NULL}, [O_QBATCH] = {"quality-batch", 1, NULL},
        [O_QLR] = {"quality-lr", 1, NULL},
    };
    int rc = cli_parse_opts("arena", argc, argv, 1, opts, N_OPTS);
    if (rc) return rc;
    if (opts[O_HELP].value) {
        cli_usage(stdout, "arena");
        return CLI_OK;
    }
    arena_run *R = calloc(1, sizeof *R);
    if (!R) {
        fprintf(stderr, "eformer: out of memory\n");
        return CLI_FAIL;
    }
    R->base.batch = 1, R->base.heads = 8, R->base.dim = 64, R->reps = 3, R->budget = 30;
    R->backward = !opts[O_NOBWD].value, R->causal = opts[O_CAUSAL].value != NULL;
    R->plots = !opts[O_NOPLOTS].value;
    R->out = opts[O_OUT].value ? opts[O_OUT].value : "arena";
    R->tty = isatty(2);
    double mem_gb = NAN;
    const char *v;
    if ((v = opts[O_BATCH].value) && (rc = cli_parse_int("arena", "batch", v, 1, 4096, &R->base.batch))) goto done;
    if ((v = opts[O_HEADS].value) && (rc = cli_parse_int("arena", "heads", v, 1, 4096, &R->base.heads))) goto done;
    if ((v = opts[O_DIM].value) && (rc = cli_parse_int("arena", "dim", v, 1, 256, &R->base.dim))) goto done;
    if ((v = opts[O_REPS].value) && (rc = cli_parse_int("arena", "reps", v, 1, 64, &R->reps))) goto done;
    if ((v = opts[O_BUDGET].value) &&
        (rc = cli_parse_double("arena", "budget", v, 1e-6, 1e6, &R->budget)))
        goto done;
    if ((v = opts[O_MEM].value) && (rc = cli_parse_double("arena", "mem-budget", v, 1e-6, 1e6, &mem_gb)))
        goto done;
    if ((v = opts[O_THR].value)) {
        int t;
        if ((rc = cli_parse_int("arena", "threads", v, 1, 1024, &t))) goto done;
        ef_set_num_threads(t);
    }
    R->threads = ef_get_num_threads();
    if ((rc = cli_parse_int_list("arena", "lens", opts[O_LENS].value ? opts[O_LENS].value : default_lens,
                                 1, 1 << 24, R->lens, MAX_LENS, &R->n_lens)))
        goto done;
    for (int l = 1; l < R->n_lens; l++)
        if (R->lens[l] <= R->lens[l - 1]) {
            rc = cli_usage_error("arena", "arena: --lens must ascend (%d after %d)", R->lens[l],
                                 R->lens[l - 1]);
            goto done;
        }
    /* inputs */
    {
        const char *s = opts[O_INPUTS].value ? opts[O_INPUTS].value : "gaussian,structured";
        while (*s) {
            size_t n = strcspn(s, ",");
            int kind = -1;
            if (n == 8 && !strncmp(s, "gaussian", 8)) kind = IN_GAUSSIAN;
            if (n == 10 && !strncmp(s, "structured", 10)) kind = IN_STRUCTURED;
            if (n > 6 && !strncmp(s, "model:", 6)) {
                kind = IN_MODEL;
                char *path = strndup(s + 6, n - 6);
                if (!path || R->model_path) {
                    free(path);
                    rc = cli_usage_error("arena", "arena: --inputs: one model:FILE at most");
                    goto done;
                }
                R->model_path = path;
            }
            if (kind < 0) {
                rc = cli_usage_error("arena", "arena: --inputs: '%.*s' is not gaussian or "
                                              "structured", (int)n, s);
                goto done;
            }
            for (int i = 0; i < R->n_inputs; i++)
                if (R->inputs[i] == kind) {
                    rc = cli_usage_error("arena", "arena: --inputs: '%.*s' given twice", (int)n, s);
                    goto done;
                }
            if (R->n_inputs >= MAX_INPUTS) break;
            R->inputs[R->n_inputs++] = kind;
            s += n;
            if (*s == ',') s++;
        }
        if (!R->n_inputs) {
            rc = cli_usage_error("arena", "arena: --inputs is empty");
            goto done;
        }
        /* times come from the first kind: the generated ones go first */
        for (int i = 0; i + 1 < R->n_inputs; i++)
            if (R->inputs[i] == IN_MODEL) {
                R->inputs[i] = R->inputs[i + 1];
                R->inputs[i + 1] = IN_MODEL;
            }
    }
    if ((v = opts[O_LAYER].value) &&
        (rc = cli_parse_int("arena", "layer", v, 0, 1 << 20, &R->layer)))
        goto done;
    if (R->model_path && (rc = open_model(R, opts[O_HEADS].value != NULL, opts[O_DIM].value != NULL)))
        goto done;
    if ((v = opts[O_QUALITY].value)) {
        arena_quality_cfg *q = &R->qcfg;
        double minutes = 5;
        q->task = v, q->model = "layers=2,dim=128,heads=4,ff=512", q->batch = 8, q->lr = 1e-3;
        q->dir = R->out, q->threads = R->threads, q->eval_samples = 0;
        if (opts[O_QMODEL].value) q->model = opts[O_QMODEL].value;
        if ((opts[O_MINUTES].value &&
             (rc = cli_parse_double("arena", "minutes", opts[O_MINUTES].value, 1e-3, 1e6, &minutes))) ||
            (opts[O_QBATCH].value &&
             (rc = cli_parse_int("arena", "quality-batch", opts[O_QBATCH].value, 1, 1 << 20, &q->batch))) ||
            (opts[O_QLR].value &&
             (rc = cli_parse_double("arena", "quality-lr", opts[O_QLR].value, 1e-9, 10, &q->lr))))
            goto done;
        q->seconds = minutes * 60;
        ef_task *t = NULL;
        ef_status st = ef_task_new(&t, v, 1);
        if (st) {
            rc = cli_usage_error("arena", "arena: --quality %s: %s", v, ef_last_error());
            goto done;
        }
        ef_task_info ti;
        ef_task_get_info(t, &ti);
        R->q_causal = ti.causal, R->q_text = !strcmp(ti.kind, "text");
        ef_task_free(t);
        static char exe[1024];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n <= 0) {
            fprintf(stderr, "eformer: arena: --quality runs `eformer train` and cannot find this "
                            "program (/proc/self/exe)\n");
            rc = CLI_FAIL;
            goto done;
        }
        exe[n] = 0;
        q->exe = exe;
    } else if (opts[O_MINUTES].value || opts[O_QMODEL].value || opts[O_QBATCH].value ||
               opts[O_QLR].value) {
        rc = cli_usage_error("arena", "arena: --minutes, --quality-model, --quality-batch and "
                                      "--quality-lr go with --quality TASK");
        goto done;
    }
    /* specs: ';'-separated (a spec's options are comma-separated), or all */
    {
        const char *s = opts[O_SPECS].value ? opts[O_SPECS].value : "all";
        if (!strcmp(s, "all")) {
            for (int i = 0; i < ef_attn_count(); i++) {
                if ((rc = add_spec(R, ef_attn_name(i), strlen(ef_attn_name(i))))) goto done;
                /* exact attention with bf16 products next to it: its time and its error; the
                 * Sparse Transformer patterns also with a block of sqrt N, the setting of the
                 * survey's O(N^1.5) */
                static const char *const extra[][2] = {
                    {"flash", "flash:precision=bf16"},
                    {"strided", "strided:block=auto"},
                    {"fixed", "fixed:block=auto,summary=auto"}};
                for (size_t x = 0; x < sizeof extra / sizeof extra[0]; x++)
                    if (!strcmp(ef_attn_name(i), extra[x][0]) &&
                        (rc = add_spec(R, extra[x][1], strlen(extra[x][1]))))
                        goto done;
            }
        } else {
            while (*s) {
                size_t n = strcspn(s, ";");
                if ((rc = add_spec(R, s, n))) goto done;
                s += n;
                if (*s == ';') s++;
            }
        }
        if (!R->n_specs) {
            rc = cli_usage_error("arena", "arena: --specs is empty");
            goto done;
        }
    }
    {
        double avail = (double)cli_avail_mem();
        R->mem_budget = isfinite(mem_gb) ? mem_gb * 1e9 : fmin(8e9, avail > 0 ? avail / 2 : 8e9);
    }
    /* the command line, for the report */
    {
        size_t k = 0;
        k += (size_t)snprintf(R->cmdline, sizeof R->cmdline, "eformer");
        for (int i = 0; i < argc && k < sizeof R->cmdline; i++)
            k += (size_t)snprintf(R->cmdline + k, sizeof R->cmdline - k,
                                  strpbrk(argv[i], " ;|") ? " '%s'" : " %s", argv[i]);
    }
    read_cpu(R->cpu, sizeof R->cpu);
#if defined(__clang__) || !defined(__GNUC__)
    snprintf(R->compiler, sizeof R->compiler, "%s", __VERSION__);
#elif defined(__VERSION__)
    snprintf(R->compiler, sizeof R->compiler, "gcc %s", __VERSION__);
#else
    snprintf(R->compiler, sizeof R->compiler, "unknown");
#endif
    if (mkdir(R->out, 0777) && errno != EEXIST) {
        fprintf(stderr, "eformer: arena: cannot create the folder '%s': %s\n", R->out,
                strerror(errno));
        fprintf(stderr, "eformer: hint: give another --out DIR\n");
        rc = CLI_FAIL;
        goto done;
    }

    /* the run */
    R->t0 = cli_now();
    double done_s = 0;
    int done_n = 0;
    for (int l = 0; l < R->n_lens && !rc; l++) rc = run_length(R, l, &done_s, &done_n);
    if (!rc && R->qcfg.task) run_quality(R);
    char el[32];
    fmt_secs(el, sizeof el, cli_now() - R->t0);
    progress(R, "arena: done in %s", el);
    if (R->tty) fputc('\n', stderr);
    if (rc) goto done;

    /* the table, the files */
    printf("# eformer arena: %s, %d threads; batch %d, heads %d, dim %d, %s, %s\n", R->cpu,
           R->threads, R->base.batch, R->base.heads, R->base.dim,
           R->causal ? "causal" : "bidirectional", R->backward ? "forward+backward" : "forward");
    print_table(stdout, R, 0);
    printf("\n%s", table_legend);
    if (R->qcfg.task) {
        printf("\n# quality: %s, model %s, %g minutes each (eformer train --time-limit)\n",
               R->qcfg.task, R->qcfg.model, R->qcfg.seconds / 60);
        print_quality(stdout, R, 0);
    }
    char path[1200];
    int bad = 0;
    if (R->qcfg.task) {
        snprintf(path, sizeof path, "%s/quality.csv", R->out);
        bad |= write_quality_csv(R, path) != 0;
    }
    snprintf(path, sizeof path, "%s/results.csv", R->out);
    bad |= write_csv(R, path) != 0;
    snprintf(path, sizeof path, "%s/results.json", R->out);
    bad |= write_json(R, path) != 0;
    int plots_ok = 0;
    if (R->plots) {
        plots_ok = write_plots(R, R->out) == 0;
        if (!plots_ok)
            fprintf(stderr, "eformer: arena: the plots were not drawn (gnuplot failed or is "
                            "missing: Debian package gnuplot-nox)\n");
    }
    snprintf(path, sizeof path, "%s/report.md", R->out);
    bad |= write_report(R, path, plots_ok) != 0;
    if (bad) {
        fprintf(stderr, "eformer: arena: writing into '%s' failed: %s\n", R->out, strerror(errno));
        rc = CLI_FAIL;
        goto done;
    }
    printf("\nreport: %s/report.md (tables%s), data: %s/results.csv, %s/results.json\n", R->out,
           plots_ok ? " and plots" : "", R->out, R->out);
    for (int l = 0; l < R->n_lens; l++)
        for (int s = 0; s < R->n_specs; s++)
            if (R->cells[l][s].status == CELL_FAILED) rc = CLI_FAIL;
done:
    ef_model_free(R->model);
    ef_task_free(R->task);
    free((char *)R->model_path);
    free(R);
    return rc;
}
