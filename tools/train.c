/*
 * train.c - `eformer train`, `eformer eval` and `eformer generate`: the trainer of issue 10 on the
 * tasks of src/train/tasks.h with the optimizer of src/train/optim.h.
 *
 * train: the model is SPEC + "," + ef_task_model_keys(task); step s (1-based) trains on the
 * train samples (s-1)*B*K .. s*B*K - 1 (B = --batch, K = --accum micro-batches) in order, so
 * the data position is a pure function of the step, and ef_train_step does the update. A
 * checkpoint is ef_train_save's pair of files with the run's options as metadata ("train.*"):
 * --resume restores the model, the optimizer and those options, and continues at the saved step
 * exactly as the uninterrupted run would have (bit for bit). SIGINT / SIGTERM only set a flag;
 * the loop stops after the current step, saves and exits with 128 + the signal number.
 *
 * eval: a model file's loss, accuracy (and bits per byte for text) on the task's eval split.
 * generate: bytes from a causal byte-level model, recomputing the whole prefix per byte.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#include "train/optim.h"
#include "train/tasks.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Where an interrupted run without --save writes its checkpoint. */
#define INTERRUPTED_PATH "eformer-interrupted.safetensors"

/* ---------------------------------------------------------------------------------------------
 * Signals: the handler only records the signal; the loop looks at it between steps.
 * ------------------------------------------------------------------------------------------- */
static volatile sig_atomic_t stop_signal = 0;

static void on_stop_signal(int sig) { stop_signal = sig; }

/* SIGINT and SIGTERM set stop_signal. SA_RESETHAND: a second signal of the same kind takes
 * its default action (ends the process at once), for a user who does not want to wait. */
static void install_stop_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */
/* The exit status for a task the library refused: a bad spec is bad usage, a file that cannot
 * be read or is malformed is a failure. */
static int task_error(const char *cmd, ef_status st, const char *spec) {
    char ctx[1200];
    snprintf(ctx, sizeof ctx, "making the task '%s'", spec);
    cli_lib_error_hint(st, ctx,
                       st == EF_ERR_ARG || st == EF_ERR_FORMAT
                           ? "tasks: dup:len=1024,symbols=127  copy:len=128,symbols=10  "
                             "recall:len=256,pairs=16  listops  text:FILE,len=1024  mnist[:DIR]  "
                             "fashion-mnist[:DIR] (docs/tasks.md)"
                           : NULL);
    (void)cmd;
    return st == EF_ERR_ARG || st == EF_ERR_FORMAT || st == EF_ERR_UNSUPPORTED ? CLI_USAGE
                                                                               : CLI_FAIL;
}

/* A metadata value of PATH.opt (malloc'd), or NULL when the key is absent or the file cannot
 * be read (*st receives the status). */
static char *read_meta(const char *path, const char *key, ef_status *st) {
    char *v = NULL;
    ef_status s = ef_train_read_meta(path, key, &v);
    if (st) *st = s;
    return s ? NULL : v;
}

/* "1h02m", "3m05s", "12s" */
static void fmt_duration(char *buf, size_t cap, double s) {
    if (!isfinite(s) || s < 0) {
        snprintf(buf, cap, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60)
        snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(buf, cap, "%lds", t);
}

/* "950", "12.3k", "1.25M" */
static void fmt_rate(char *buf, size_t cap, double x) {
    if (!isfinite(x))
        snprintf(buf, cap, "-");
    else if (x >= 1e6)
        snprintf(buf, cap, "%.2fM", x / 1e6);
    else if (x >= 1e4)
        snprintf(buf, cap, "%.1fk", x / 1e3);
    else
        snprintf(buf, cap, "%.0f", x);
}

static int is_text_task(const ef_task_info *ti) { return strcmp(ti->kind, "text") == 0; }

/* Whether model m can run task t: the same head, a vocabulary covering the task's, rows that
 * fit, and causal attention for a next-token task. Prints a usage error and returns CLI_USAGE
 * if not. */
static int check_model_fits(const char *cmd, const ef_model_info *mi, const ef_task_info *ti,
                            const char *task_spec) {
    if (ti->classes != mi->classes)
        return cli_usage_error(cmd,
                               "%s: the task '%s' needs head=%s%.0d, the model has head=%s%.0d",
                               cmd, task_spec, ti->classes ? "cls:classes=" : "lm", ti->classes,
                               mi->classes ? "cls:classes=" : "lm", mi->classes);
    if (mi->vocab < ti->vocab)
        return cli_usage_error(cmd, "%s: the task '%s' has vocab %d, the model only %d", cmd,
                               task_spec, ti->vocab, mi->vocab);
    if (mi->max_len < ti->len)
        return cli_usage_error(cmd,
                               "%s: the task '%s' has rows of %d positions, the model's "
                               "max_len is %d",
                               cmd, task_spec, ti->len, mi->max_len);
    if (ti->causal && !mi->causal) {
        fprintf(stderr,
                "eformer: %s: the task '%s' is next-token prediction and needs a causal model, "
                "but the model's attention is not causal (it would see the tokens it predicts)\n",
                cmd, task_spec);
        fprintf(stderr, "eformer: hint: add causal=1 to every attention spec, e.g. "
                        "attn=flash:causal=1 or attn=local:window=128,causal=1|lsh:causal=1\n");
        return CLI_USAGE;
    }
    return CLI_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Evaluation on the eval split
 * ------------------------------------------------------------------------------------------- */
typedef struct eval_result {
    double loss, acc, bpb; /* mean loss in nats over every target, accuracy, bits per byte
                            * (NaN unless a text task) */
    int64_t count, correct, samples;
    double seconds;
    int interrupted; /* a stop signal arrived: the figures cover part of the split */
} eval_result;

/* Samples 0 .. n-1 of the eval split in batches of at most `batch` (the last one smaller):
 * count-weighted loss and accuracy over every scored target. Stops early at a stop signal. */
static ef_status run_eval(ef_model *m, const ef_task *t, int batch, int64_t n, eval_result *r) {
    ef_task_info ti;
    ef_task_get_info(t, &ti);
    memset(r, 0, sizeof *r);
    double t0 = cli_now();
    size_t row = (size_t)ti.len;
    int32_t *tok = malloc((size_t)batch * row * sizeof *tok);
    int32_t *lens = malloc((size_t)batch * sizeof *lens);
    int32_t *tgt = malloc((size_t)batch * (ti.classes ? 1 : row) * sizeof *tgt);
    ef_status st = EF_OK;
    double loss_sum = 0;
    if (!tok || !lens || !tgt) {
        st = EF_ERR_NOMEM;
        fprintf(stderr, "eformer: out of memory for an eval batch of %d x %d\n", batch, ti.len);
        goto done;
    }
    for (int64_t first = 0; first < n; first += batch) {
        if (stop_signal) {
            r->interrupted = 1;
            break;
        }
        int nb = (int)(n - first < batch ? n - first : batch);
        if ((st = ef_task_batch(t, EF_SPLIT_EVAL, first, nb, tok, lens, tgt))) goto done;
        ef_model_batch in = {.batch = nb,
                             .len = ti.len,
                             .tokens = tok,
                             .lens = lens,
                             .targets = tgt,
                             .no_grad = 1}; /* evaluation: not a training forward */
        ef_model_out out = {.logits = NULL};
        if ((st = ef_model_forward(m, &in, &out))) goto done;
        loss_sum += out.loss * (double)out.count;
        r->count += out.count, r->correct += out.correct, r->samples += nb;
    }
done:
    r->loss = r->count ? loss_sum / (double)r->count : NAN;
    r->acc = r->count ? (double)r->correct / (double)r->count : NAN;
    r->bpb = is_text_task(&ti) && r->count ? ef_bits_per_byte(r->loss) : NAN;
    r->seconds = cli_now() - t0;
    free(tok), free(lens), free(tgt);
    return st;
}

/* One eval line: text on stdout, or a JSON object ("split":"eval"). step < 0: unknown. */
static void print_eval(int json, int64_t step, const eval_result *r) {
    if (json) {
        printf("{\"split\":\"eval\"");
        if (step >= 0)
            printf(",\"step\":%" PRId64, step);
        else
            printf(",\"step\":null");
        cli_json_num(stdout, "loss", r->loss, "%.6g");
        cli_json_num(stdout, "acc", r->acc, "%.6g");
        if (isfinite(r->bpb)) cli_json_num(stdout, "bpb", r->bpb, "%.6g");
        printf(",\"count\":%" PRId64 ",\"samples\":%" PRId64, r->count, r->samples);
        cli_json_num(stdout, "elapsed_s", r->seconds, "%.3f");
        printf(",\"complete\":%s}\n", r->interrupted ? "false" : "true");
    } else {
        char sb[32] = "";
        if (step >= 0) snprintf(sb, sizeof sb, "step %" PRId64 "  ", step);
        printf("eval   %sloss %.4f  acc %6.2f%%", sb, r->loss, 100 * r->acc);
        if (isfinite(r->bpb)) printf("  bpb %.4f", r->bpb);
        printf("  (%" PRId64 " samples, %" PRId64 " targets, %.1fs%s)\n", r->samples, r->count,
               r->seconds, r->interrupted ? ", INTERRUPTED: partial" : "");
    }
    fflush(stdout);
}

/* ---------------------------------------------------------------------------------------------
 * train: options
 * ------------------------------------------------------------------------------------------- */
enum {
    O_TASK,
    O_MODEL,
    O_BATCH,
    O_STEPS,
    O_STOP,
    O_LR,
    O_SCHED,
    O_WARMUP,
    O_MINLR,
    O_WD,
    O_CLIP,
    O_ACCUM,
    O_EVERY,
    O_ESAMPLES,
    O_SAVE,
    O_SAVE_EVERY,
    O_RESUME,
    O_SEED,
    O_THREADS,
    O_JSON,
    O_LOG_EVERY,
    O_TIME_LIMIT,
    O_HELP,
    N_TRAIN_OPTS
};

static const char *const sched_kinds[] = {"constant", "cosine", "rsqrt", "linear"};

typedef struct train_cfg {
    const char *task, *model, *save, *resume;
    int batch, steps, stop_at, warmup, accum, eval_every, eval_samples, save_every, seed;
    int threads, json, log_every;
    int sched; /* ef_sched_kind */
    double lr, min_lr, wd, clip;
    double time_limit; /* seconds; 0 = none */
} train_cfg;

typedef enum { V_INT, V_DBL, V_SCHED } vkind;

/* The options a checkpoint records ("train.<key>"). must_agree: the option determines the
 * parameters, so a resumed run given another value is refused; otherwise (what is evaluated
 * and saved when) the stored value is only the default. */
typedef struct stored_opt {
    int opt;
    const char *key;
    vkind kind;
    long min, max; /* V_INT range; V_DBL: [min, +inf) */
    int must_agree;
} stored_opt;

static const stored_opt stored_opts[] = {
    {O_SEED, "train.seed", V_INT, 0, INT_MAX, 1},
    {O_BATCH, "train.batch", V_INT, 1, INT_MAX, 1},
    {O_ACCUM, "train.accum", V_INT, 1, 1 << 20, 1},
    {O_SCHED, "train.sched", V_SCHED, 0, 0, 1},
    {O_LR, "train.lr", V_DBL, 0, 0, 1},
    {O_WARMUP, "train.warmup", V_INT, 0, INT_MAX, 1},
    {O_MINLR, "train.min_lr", V_DBL, 0, 0, 1},
    {O_WD, "train.wd", V_DBL, 0, 0, 1},
    {O_CLIP, "train.clip", V_DBL, 0, 0, 1},
    /* after train.sched: whether --steps may differ depends on the schedule */
    {O_STEPS, "train.steps", V_INT, 1, INT_MAX, 1},
    {O_EVERY, "train.eval_every", V_INT, 0, INT_MAX, 0},
    {O_ESAMPLES, "train.eval_samples", V_INT, 0, INT_MAX, 0},
    {O_SAVE_EVERY, "train.save_every", V_INT, 0, INT_MAX, 0},
};
#define N_STORED ((int)(sizeof stored_opts / sizeof stored_opts[0]))

static void *opt_dst(train_cfg *c, int opt) {
    switch (opt) {
    case O_SEED: return &c->seed;
    case O_BATCH: return &c->batch;
    case O_ACCUM: return &c->accum;
    case O_STEPS: return &c->steps;
    case O_SCHED: return &c->sched;
    case O_LR: return &c->lr;
    case O_WARMUP: return &c->warmup;
    case O_MINLR: return &c->min_lr;
    case O_WD: return &c->wd;
    case O_CLIP: return &c->clip;
    case O_EVERY: return &c->eval_every;
    case O_ESAMPLES: return &c->eval_samples;
    case O_SAVE_EVERY: return &c->save_every;
    default: return NULL;
    }
}

static int parse_sched(const char *s, int *out) {
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, sched_kinds[i])) {
            *out = i;
            return CLI_OK;
        }
    return cli_usage_error("train", "train: --sched '%s' is not cosine, constant, rsqrt or linear",
                           s);
}

/* Parses the value `s` of stored option `so` into dst. */
static int parse_stored(const stored_opt *so, const char *name, const char *s, void *dst) {
    switch (so->kind) {
    case V_INT: return cli_parse_int("train", name, s, so->min, so->max, dst);
    case V_DBL: return cli_parse_double("train", name, s, 0, HUGE_VAL, dst);
    case V_SCHED: return parse_sched(s, dst);
    }
    return CLI_USAGE;
}

static void fmt_stored(const stored_opt *so, const void *v, char *buf, size_t cap) {
    switch (so->kind) {
    case V_INT: snprintf(buf, cap, "%d", *(const int *)v); break;
    case V_DBL: snprintf(buf, cap, "%.17g", *(const double *)v); break;
    case V_SCHED: snprintf(buf, cap, "%s", sched_kinds[*(const int *)v]); break;
    }
}

static int stored_equal(const stored_opt *so, const void *a, const void *b) {
    return so->kind == V_DBL ? *(const double *)a == *(const double *)b
                             : *(const int *)a == *(const int *)b;
}

/* The values of the given options, then (with --resume) the checkpoint's for the others, and the
 * check that the given ones agree with it. Returns an exit status. `stored_task` and
 * `stored_model` receive the checkpoint's train.task and train.model (malloc'd, NULL when
 * absent). */
static int resolve_options(const cli_opt *opts, train_cfg *c, char **stored_task,
                           char **stored_model) {
    int rc;
    *stored_task = *stored_model = NULL;
    for (int i = 0; i < N_STORED; i++) {
        const stored_opt *so = &stored_opts[i];
        const cli_opt *o = &opts[so->opt];
        if (o->value && (rc = parse_stored(so, o->name, o->value, opt_dst(c, so->opt)))) return rc;
    }
    if (!c->resume) return CLI_OK;

    /* the checkpoint must be readable before anything else is asked of it */
    ef_status st;
    char *step_s = read_meta(c->resume, "eformer.step", &st);
    if (!step_s) {
        char ctx[1200];
        snprintf(ctx, sizeof ctx, "reading the training checkpoint %s%s (--resume)", c->resume,
                 EF_TRAIN_OPT_SUFFIX);
        cli_lib_error_hint(st, ctx,
                           "--resume names the model file a run wrote with --save; the "
                           "optimizer state is beside it, in PATH" EF_TRAIN_OPT_SUFFIX);
        return CLI_FAIL;
    }
    free(step_s);
    *stored_task = read_meta(c->resume, "train.task", NULL);
    *stored_model = read_meta(c->resume, "train.model", NULL);
    for (int i = 0; i < N_STORED; i++) {
        const stored_opt *so = &stored_opts[i];
        const cli_opt *o = &opts[so->opt];
        char *sv = read_meta(c->resume, so->key, NULL);
        if (!sv) continue; /* not recorded (a checkpoint not written by `eformer train`) */
        union {
            int i;
            double d;
        } val;
        rc = parse_stored(so, o->name, sv, &val);
        if (rc) {
            fprintf(stderr, "eformer: train: the checkpoint's %s='%s' (%s%s) is malformed\n",
                    so->key, sv, c->resume, EF_TRAIN_OPT_SUFFIX);
            free(sv);
            return CLI_FAIL;
        }
        void *dst = opt_dst(c, so->opt);
        if (!o->value) {
            memcpy(dst, &val, so->kind == V_DBL ? sizeof(double) : sizeof(int));
        } else if (so->must_agree && !stored_equal(so, dst, &val)) {
            /* --steps may move the end of a run whose schedule does not depend on it */
            int kind = c->sched;
            if (so->opt == O_STEPS && (kind == EF_SCHED_CONSTANT || kind == EF_SCHED_RSQRT)) {
                free(sv);
                continue;
            }
            char given[64], saved[64];
            fmt_stored(so, dst, given, sizeof given);
            fmt_stored(so, &val, saved, sizeof saved);
            if (so->opt == O_STEPS)
                rc = cli_usage_error(
                    "train",
                    "train: --steps %s differs from the checkpoint's %s (%s%s): the %s schedule "
                    "ends at the run's last step, so the continued run would not be the one that "
                    "was started (use --stop-at S to end a run early and resume it later; with "
                    "--sched constant or rsqrt --steps may change)",
                    given, saved, c->resume, EF_TRAIN_OPT_SUFFIX, sched_kinds[kind]);
            else
                rc = cli_usage_error("train",
                                     "train: --%s %s differs from the checkpoint's %s (%s in "
                                     "%s%s); give the same value or leave --%s out",
                                     o->name, given, saved, so->key, c->resume, EF_TRAIN_OPT_SUFFIX,
                                     o->name);
            free(sv);
            return rc;
        }
        free(sv);
    }
    return CLI_OK;
}

/* ---------------------------------------------------------------------------------------------
 * train: the run
 * ------------------------------------------------------------------------------------------- */
typedef struct train_run {
    const train_cfg *c;
    ef_task *task;
    ef_task_info ti;
    ef_model *m;
    ef_optim *o;
    const char *model_arg; /* the --model value recorded in the checkpoint ("" if unknown) */
    int64_t start_step, end_step;
    /* progress */
    int bar;      /* draw the progress bar on stderr */
    int lines;    /* print plain log lines on stdout */
    int bar_live; /* the bar is on screen */
    double t_start, train_seconds, last_bar;
    int64_t steps_done, tokens_done;
    double ema_loss, ema_acc;
    /* the log window: steps since the last log line */
    int64_t w_steps, w_count, w_correct, w_tokens;
    double w_loss, w_seconds;
} train_run;

static void bar_clear(train_run *R) {
    if (R->bar_live) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        R->bar_live = 0;
    }
}

static void bar_draw(train_run *R, int64_t step, double lr) {
    int64_t total = R->end_step - R->start_step, done = step - R->start_step;
    int width = 20, fill = total > 0 ? (int)(width * done / total) : width;
    char bar[32], tok[32], eta[48];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = '\0';
    double per_step = R->steps_done ? R->train_seconds / (double)R->steps_done : NAN;
    fmt_rate(tok, sizeof tok, R->train_seconds > 0 ? R->tokens_done / R->train_seconds : NAN);
    fmt_duration(eta, sizeof eta, per_step * (double)(R->end_step - step));
    fprintf(stderr,
            "\r\033[K%" PRId64 "/%" PRId64 " [%s] loss %.4f acc %5.1f%% %s tok/s lr %.2e "
            "ETA %s",
            step, (int64_t)R->c->steps, bar, R->ema_loss, 100 * R->ema_acc, tok, lr, eta);
    fflush(stderr);
    R->bar_live = 1;
}

/* A line on stdout, with the bar out of its way when both share the terminal. */
static void before_line(train_run *R) {
    if (R->bar_live && isatty(STDOUT_FILENO)) bar_clear(R);
}

static void log_line(train_run *R, int64_t step, const ef_train_report *rep) {
    double loss = R->w_steps ? R->w_loss / (double)R->w_steps : NAN;
    double acc = R->w_count ? (double)R->w_correct / (double)R->w_count : NAN;
    double tps = R->w_seconds > 0 ? (double)R->w_tokens / R->w_seconds : NAN;
    double elapsed = cli_now() - R->t_start;
    if (R->c->json) {
        printf("{\"split\":\"train\",\"step\":%" PRId64, step);
        cli_json_num(stdout, "loss", loss, "%.6g");
        cli_json_num(stdout, "acc", acc, "%.6g");
        cli_json_num(stdout, "tokens_per_s", tps, "%.6g");
        cli_json_num(stdout, "lr", rep->opt.lr, "%.6g");
        cli_json_num(stdout, "grad_norm", rep->opt.grad_norm, "%.6g");
        cli_json_num(stdout, "elapsed_s", elapsed, "%.3f");
        puts("}");
        fflush(stdout);
    } else if (R->lines) {
        before_line(R);
        char tok[32];
        fmt_rate(tok, sizeof tok, tps);
        printf("step %7" PRId64 "/%" PRId64 "  loss %.4f  acc %6.2f%%  tok/s %7s  lr %.3e  "
               "gnorm %.3g  %.1fs\n",
               step, (int64_t)R->c->steps, loss, 100 * acc, tok, rep->opt.lr, rep->opt.grad_norm,
               elapsed);
        fflush(stdout);
    }
    R->w_steps = R->w_count = R->w_correct = R->w_tokens = 0;
    R->w_loss = R->w_seconds = 0;
}

/* The checkpoint's caller metadata: everything `train --resume` restores. */
static ef_status save_checkpoint(train_run *R, const char *path, int64_t step) {
    const train_cfg *c = R->c;
    char vals[N_STORED][64], pos[32];
    ef_ckpt_meta meta[N_STORED + 3];
    int n = 0;
    meta[n++] = (ef_ckpt_meta){"train.task", ef_task_describe(R->task)};
    meta[n++] = (ef_ckpt_meta){"train.model", R->model_arg};
    for (int i = 0; i < N_STORED; i++) {
        const stored_opt *so = &stored_opts[i];
        fmt_stored(so, opt_dst((train_cfg *)c, so->opt), vals[i], sizeof vals[i]);
        meta[n++] = (ef_ckpt_meta){so->key, vals[i]};
    }
    /* information: the next train sample (a pure function of step, batch and accum) */
    snprintf(pos, sizeof pos, "%" PRId64, step * c->batch * c->accum);
    meta[n++] = (ef_ckpt_meta){"train.data_position", pos};
    return ef_train_save(R->o, path, meta, n);
}

/* Saves and reports; returns 0 or CLI_FAIL. */
static int do_save(train_run *R, const char *path, int64_t step) {
    double t0 = cli_now();
    ef_status st = save_checkpoint(R, path, step);
    if (st) {
        bar_clear(R);
        char ctx[1200];
        snprintf(ctx, sizeof ctx, "saving the checkpoint %s at step %" PRId64, path, step);
        cli_lib_error(st, ctx);
        return CLI_FAIL;
    }
    if (R->c->json) {
        bar_clear(R);
        fprintf(stderr, "eformer: train: saved %s (+%s) at step %" PRId64 " in %.2fs\n", path,
                EF_TRAIN_OPT_SUFFIX, step, cli_now() - t0);
    } else {
        before_line(R);
        printf("save   step %" PRId64 "  -> %s (+%s)  %.2fs\n", step, path, EF_TRAIN_OPT_SUFFIX,
               cli_now() - t0);
        fflush(stdout);
    }
    return CLI_OK;
}

static int do_eval(train_run *R, int64_t step) {
    int64_t n = R->ti.n_eval;
    if (R->c->eval_samples > 0 && R->c->eval_samples < n) n = R->c->eval_samples;
    if (n <= 0) return CLI_OK;
    eval_result r;
    ef_status st = run_eval(R->m, R->task, R->c->batch, n, &r);
    if (st) {
        bar_clear(R);
        char ctx[64];
        snprintf(ctx, sizeof ctx, "evaluating at step %" PRId64, step);
        cli_lib_error(st, ctx);
        return CLI_FAIL;
    }
    if (!R->c->json) before_line(R);
    print_eval(R->c->json, step, &r);
    return CLI_OK;
}

static void print_start(train_run *R) {
    const train_cfg *c = R->c;
    char optim[1024] = "?";
    ef_optim_describe(ef_optim_get_opts(R->o), optim, sizeof optim);
    size_t params = ef_model_param_count(R->m);
    int64_t per_step = (int64_t)c->batch * c->accum;
    if (c->json) {
        fputs("{\"split\":\"start\",\"model\":", stdout);
        cli_json_string(stdout, ef_model_describe(R->m));
        printf(",\"params\":%zu,\"task\":", params);
        cli_json_string(stdout, ef_task_describe(R->task));
        printf(",\"seed\":%d,\"batch\":%d,\"accum\":%d,\"steps\":%d,\"start_step\":%" PRId64
               ",\"end_step\":%" PRId64 ",\"optim\":",
               c->seed, c->batch, c->accum, c->steps, R->start_step, R->end_step);
        cli_json_string(stdout, optim);
        printf(",\"eval_samples\":%" PRId64 ",\"threads\":%d",
               c->eval_samples > 0 && c->eval_samples < R->ti.n_eval ? c->eval_samples
                                                                     : R->ti.n_eval,
               ef_get_num_threads());
        if (c->resume) {
            fputs(",\"resumed_from\":", stdout);
            cli_json_string(stdout, c->resume);
        }
        puts("}");
    } else {
        printf("# model: %s\n", ef_model_describe(R->m));
        printf("# parameters: %zu (%.1f MB fp32)\n", params, params * 4.0 / 1e6);
        printf("# task: %s (seed %d; %" PRId64 " eval samples)\n", ef_task_describe(R->task),
               c->seed, R->ti.n_eval);
        printf("# optim: %s\n", optim);
        printf("# step = %d micro-batch%s of %d samples (%" PRId64 " x %d positions); threads %d\n",
               c->accum, c->accum == 1 ? "" : "es", c->batch, per_step, R->ti.len,
               ef_get_num_threads());
        if (c->resume)
            printf("# resumed from %s at step %" PRId64 " (train sample %" PRId64 ")\n", c->resume,
                   R->start_step, R->start_step * per_step);
        if (R->end_step < c->steps)
            printf("# stopping at step %" PRId64 " of %d (--stop-at)\n", R->end_step, c->steps);
    }
    fflush(stdout);
}

/* The training loop; returns the exit status. */
static int train_loop(train_run *R) {
    const train_cfg *c = R->c;
    int K = c->accum, B = c->batch, N = R->ti.len;
    size_t row = (size_t)N, tgt_row = R->ti.classes ? 1 : row;
    int32_t *tok = malloc((size_t)K * B * row * sizeof *tok);
    int32_t *lens = malloc((size_t)K * B * sizeof *lens);
    int32_t *tgt = malloc((size_t)K * B * tgt_row * sizeof *tgt);
    ef_model_batch *micro = calloc((size_t)K, sizeof *micro);
    int rc = CLI_OK;
    if (!tok || !lens || !tgt || !micro) {
        fprintf(stderr, "eformer: out of memory for %d micro-batches of %d x %d tokens\n", K, B, N);
        rc = CLI_FAIL;
        goto done;
    }
    for (int k = 0; k < K; k++)
        micro[k] = (ef_model_batch){.batch = B,
                                    .len = N,
                                    .tokens = tok + (size_t)k * B * row,
                                    .lens = lens + (size_t)k * B,
                                    .targets = tgt + (size_t)k * B * tgt_row};
    const char *save_path = c->save;
    int64_t step = R->start_step;
    ef_train_report rep;
    memset(&rep, 0, sizeof rep);
    while (step < R->end_step && !stop_signal) {
        int64_t s = step + 1;
        double t0 = cli_now();
        ef_status st = EF_OK;
        int64_t first = (s - 1) * B * K, tokens = 0;
        for (int k = 0; k < K && !st; k++)
            st = ef_task_batch(R->task, EF_SPLIT_TRAIN, first + (int64_t)k * B, B,
                               (int32_t *)micro[k].tokens, (int32_t *)micro[k].lens,
                               (int32_t *)micro[k].targets);
        if (!st) st = ef_train_step(R->o, micro, K, &rep);
        if (st) {
            bar_clear(R);
            char ctx[160];
            snprintf(ctx, sizeof ctx,
                     "training step %" PRId64 " (train samples %" PRId64 " .. %" PRId64 ")", s,
                     first, first + (int64_t)B * K - 1);
            cli_lib_error_hint(st, ctx,
                               st == EF_ERR_NUMERIC
                                   ? "the model diverged: try a smaller --lr, a longer --warmup "
                                     "or --clip"
                                   : NULL);
            rc = CLI_FAIL;
            goto done;
        }
        step = s;
        double dt = cli_now() - t0;
        for (int b = 0; b < K * B; b++) tokens += lens[b];
        double acc = rep.count ? (double)rep.correct / (double)rep.count : 0;
        R->ema_loss = R->steps_done ? 0.9 * R->ema_loss + 0.1 * rep.loss : rep.loss;
        R->ema_acc = R->steps_done ? 0.9 * R->ema_acc + 0.1 * acc : acc;
        R->steps_done++, R->tokens_done += tokens, R->train_seconds += dt;
        R->w_steps++, R->w_loss += rep.loss, R->w_count += rep.count;
        R->w_correct += rep.correct, R->w_tokens += tokens, R->w_seconds += dt;

        /* --time-limit: this step is the last; the run ends as at --steps (eval, save) */
        int out_of_time = c->time_limit > 0 && cli_now() - R->t_start >= c->time_limit;
        int last = step == R->end_step || out_of_time;
        if (step % c->log_every == 0 || last) log_line(R, step, &rep);
        if (R->bar && (cli_now() - R->last_bar > 0.1 || last)) {
            bar_draw(R, step, rep.opt.lr);
            R->last_bar = cli_now();
        }
        if (out_of_time && step < R->end_step) {
            bar_clear(R);
            if (c->json)
                printf("{\"split\":\"stop\",\"step\":%" PRId64 ",\"reason\":\"time-limit\"}\n",
                       step);
            else
                printf("# stopping at step %" PRId64 " of %d: --time-limit %gs reached\n", step,
                       c->steps, c->time_limit);
        }
        if (last || stop_signal) break;
        if (c->eval_every && step % c->eval_every == 0 && (rc = do_eval(R, step))) goto done;
        if (save_path && c->save_every && step % c->save_every == 0 &&
            (rc = do_save(R, save_path, step)))
            goto done;
    }
    bar_clear(R);
    if (stop_signal) {
        int sig = stop_signal;
        const char *path = save_path ? save_path : INTERRUPTED_PATH;
        fprintf(stderr, "eformer: train: %s at step %" PRId64 " of %d: saving the checkpoint\n",
                sig == SIGINT ? "interrupted (SIGINT)" : "terminated (SIGTERM)", step, c->steps);
        if ((rc = do_save(R, path, step))) goto done;
        fprintf(stderr,
                "eformer: train: checkpoint written to %s (and %s%s)%s; continue with\n"
                "  eformer train --resume %s\n",
                path, path, EF_TRAIN_OPT_SUFFIX,
                save_path ? "" : " (no --save was given: the default path of an interrupted run)",
                path);
        rc = 128 + sig;
        goto done;
    }
    if ((rc = do_eval(R, step))) goto done;
    if (stop_signal) { /* interrupted during the final evaluation: the steps are done */
        fprintf(stderr, "eformer: train: interrupted during the final evaluation\n");
        if (!save_path) save_path = INTERRUPTED_PATH;
    }
    if (save_path && step > R->start_step && (rc = do_save(R, save_path, step))) goto done;
    if (stop_signal) {
        rc = 128 + stop_signal;
    } else if (!c->json && step > R->start_step) {
        char tok[32];
        fmt_rate(tok, sizeof tok, R->train_seconds > 0 ? R->tokens_done / R->train_seconds : NAN);
        printf("# done: steps %" PRId64 "..%" PRId64 " in %.1fs (%.1fs training, %s tok/s)\n",
               R->start_step + 1, step, cli_now() - R->t_start, R->train_seconds, tok);
    }
done:
    bar_clear(R);
    free(tok), free(lens), free(tgt), free(micro);
    return rc;
}

int cli_train(int argc, char **argv) {
    cli_opt opts[N_TRAIN_OPTS] = {
        [O_TASK] = {"task", 1, NULL},           [O_MODEL] = {"model", 1, NULL},
        [O_BATCH] = {"batch", 1, NULL},         [O_STEPS] = {"steps", 1, NULL},
        [O_STOP] = {"stop-at", 1, NULL},        [O_LR] = {"lr", 1, NULL},
        [O_SCHED] = {"sched", 1, NULL},         [O_WARMUP] = {"warmup", 1, NULL},
        [O_MINLR] = {"min-lr", 1, NULL},        [O_WD] = {"wd", 1, NULL},
        [O_CLIP] = {"clip", 1, NULL},           [O_ACCUM] = {"accum", 1, NULL},
        [O_EVERY] = {"eval-every", 1, NULL},    [O_ESAMPLES] = {"eval-samples", 1, NULL},
        [O_SAVE] = {"save", 1, NULL},           [O_SAVE_EVERY] = {"save-every", 1, NULL},
        [O_RESUME] = {"resume", 1, NULL},       [O_SEED] = {"seed", 1, NULL},
        [O_THREADS] = {"threads", 1, NULL},     [O_JSON] = {"json", 0, NULL},
        [O_LOG_EVERY] = {"log-every", 1, NULL}, [O_HELP] = {"help", 0, NULL},
        [O_TIME_LIMIT] = {"time-limit", 1, NULL},
    };
    int rc = cli_parse_opts("train", argc, argv, 1, opts, N_TRAIN_OPTS);
    if (rc) return rc;
    if (opts[O_HELP].value) {
        cli_usage(stdout, "train");
        return CLI_OK;
    }
    train_cfg c = {.batch = 8,
                   .steps = 1000,
                   .lr = 1e-3,
                   .sched = EF_SCHED_COSINE,
                   .warmup = 100,
                   .min_lr = 0,
                   .wd = 0.01,
                   .clip = 1.0,
                   .accum = 1,
                   .seed = 1,
                   .log_every = 10};
    c.task = opts[O_TASK].value;
    c.model = opts[O_MODEL].value;
    c.save = opts[O_SAVE].value;
    c.resume = opts[O_RESUME].value;
    c.json = opts[O_JSON].value != NULL;
    if (!c.resume && !c.task)
        return cli_usage_error("train", "train: --task is required (or --resume a checkpoint)");
    if (!c.resume && !c.model)
        return cli_usage_error("train", "train: --model is required (or --resume a checkpoint)");
    if ((opts[O_THREADS].value &&
         (rc = cli_parse_int("train", "threads", opts[O_THREADS].value, 1, 4096, &c.threads))) ||
        (opts[O_LOG_EVERY].value &&
         (rc = cli_parse_int("train", "log-every", opts[O_LOG_EVERY].value, 1, INT_MAX,
                             &c.log_every))) ||
        (opts[O_STOP].value &&
         (rc = cli_parse_int("train", "stop-at", opts[O_STOP].value, 1, INT_MAX, &c.stop_at))) ||
        (opts[O_TIME_LIMIT].value &&
         (rc = cli_parse_double("train", "time-limit", opts[O_TIME_LIMIT].value, 1e-3, 1e9,
                                &c.time_limit))))
        return rc;
    ef_set_num_threads(c.threads);
    /* from here on a signal stops the run at the next step boundary (before the first step:
     * the initial state is saved), however long the set-up takes */
    install_stop_handler();

    char *stored_task = NULL, *stored_model = NULL;
    ef_task *task = NULL;
    ef_model *m = NULL, *check = NULL;
    ef_optim *o = NULL;
    char *full = NULL;
    if ((rc = resolve_options(opts, &c, &stored_task, &stored_model))) goto done;
    /* a resumed run saves where it came from unless told otherwise */
    if (c.resume && !c.save) c.save = c.resume;
    if (c.save_every && !c.save) {
        rc = cli_usage_error("train", "train: --save-every needs --save PATH");
        goto done;
    }
    if (c.stop_at > c.steps) {
        rc = cli_usage_error("train", "train: --stop-at %d is beyond --steps %d", c.stop_at,
                             c.steps);
        goto done;
    }
    if (c.resume && !c.task) {
        if (!stored_task) {
            rc = cli_usage_error("train",
                                 "train: %s%s does not record the task (it was not written by "
                                 "`eformer train`): give --task",
                                 c.resume, EF_TRAIN_OPT_SUFFIX);
            goto done;
        }
        c.task = stored_task;
    }

    ef_optim_opts oo = ef_optim_defaults();
    oo.sched = (ef_sched){(ef_sched_kind)c.sched, c.lr, c.min_lr, c.warmup, c.steps};
    oo.weight_decay = c.wd, oo.clip = c.clip, oo.accum = c.accum;
    ef_status st = ef_optim_check(&oo);
    if (st) {
        rc = cli_usage_error("train",
                             "train: %s (--sched, --lr, --warmup, --min-lr, --steps, "
                             "--wd, --clip, --accum)",
                             ef_last_error());
        goto done;
    }

    if ((st = ef_task_new(&task, c.task, (uint64_t)c.seed))) {
        rc = task_error("train", st, c.task);
        goto done;
    }
    if (c.resume && stored_task && strcmp(ef_task_describe(task), stored_task)) {
        rc = cli_usage_error("train", "train: --task '%s' is not the checkpoint's task '%s' (%s%s)",
                             ef_task_describe(task), stored_task, c.resume, EF_TRAIN_OPT_SUFFIX);
        goto done;
    }
    ef_task_info ti;
    ef_task_get_info(task, &ti);
    const char *keys = ef_task_model_keys(task);
    if (c.model) {
        size_t n = strlen(c.model) + strlen(keys) + 2;
        if (!(full = malloc(n))) {
            fprintf(stderr, "eformer: out of memory\n");
            rc = CLI_FAIL;
            goto done;
        }
        /* a head= of the user's own (head=cls:classes=10,pool=mean) wins over the task's; the
         * model's check below still requires the task's head and classes */
        const char *head = strstr(keys, ",head=");
        int own_head = cli_spec_has_key(c.model, "head") && head;
        snprintf(full, n, "%s,%.*s", c.model, own_head ? (int)(head - keys) : (int)strlen(keys),
                 keys);
    }
    ef_model_opts mo = {.batch = c.batch, .seed = (uint64_t)c.seed, .train = 1};
    char ctx[2400];
    if (c.resume) {
        st = ef_train_resume(&m, &o, c.resume, &mo, &oo);
        if (st) {
            snprintf(ctx, sizeof ctx, "resuming from %s and %s%s", c.resume, c.resume,
                     EF_TRAIN_OPT_SUFFIX);
            cli_lib_error(st, ctx);
            rc = CLI_FAIL;
            goto done;
        }
        /* a --model given again must describe the checkpoint's model */
        if (c.model && !(stored_model && !strcmp(stored_model, c.model))) {
            ef_model_opts co = {.batch = 1, .seed = (uint64_t)c.seed, .train = 0};
            st = ef_model_new(&check, full, &co);
            if (st) {
                snprintf(ctx, sizeof ctx, "building the model '%s'", full);
                cli_lib_error_hint(st, ctx, cli_model_hint(st));
                rc = cli_model_exit(st);
                goto done;
            }
            if (strcmp(ef_model_describe(check), ef_model_describe(m))) {
                rc = cli_usage_error("train",
                                     "train: --model gives '%s', the checkpoint %s holds '%s'; "
                                     "leave --model out to continue the checkpoint's model",
                                     ef_model_describe(check), c.resume, ef_model_describe(m));
                goto done;
            }
        }
    } else {
        st = ef_model_new(&m, full, &mo);
        if (st) {
            snprintf(ctx, sizeof ctx,
                     "building the model '%s' (--model and the task's keys %s) for batch=%d", full,
                     keys, c.batch);
            char hint[1200];
            const char *h = cli_model_hint(st);
            if (st == EF_ERR_ARG || st == EF_ERR_FORMAT) {
                snprintf(hint, sizeof hint,
                         "the task appends its own keys (%s), so leave vocab= and "
                         "max_len= out of --model (a head= of yours must match the task's); %s",
                         keys, h);
                h = hint;
            }
            cli_lib_error_hint(st, ctx, h);
            rc = cli_model_exit(st);
            goto done;
        }
        if ((st = ef_optim_new(&o, m, &oo))) {
            cli_lib_error(st, "making the optimizer");
            rc = CLI_FAIL;
            goto done;
        }
    }
    ef_model_info mi;
    ef_model_get_info(m, &mi);
    if ((rc = check_model_fits("train", &mi, &ti, ef_task_describe(task)))) goto done;

    train_run R;
    memset(&R, 0, sizeof R);
    R.c = &c, R.task = task, R.ti = ti, R.m = m, R.o = o;
    R.model_arg = c.model ? c.model : stored_model ? stored_model : "";
    R.start_step = ef_optim_steps(o);
    R.end_step = c.stop_at ? c.stop_at : c.steps;
    if (R.start_step > R.end_step) {
        rc = cli_usage_error("train",
                             "train: the checkpoint %s is at step %" PRId64
                             ", beyond the end of this run (step %" PRId64 ")",
                             c.resume, R.start_step, R.end_step);
        goto done;
    }
    R.bar = isatty(STDERR_FILENO);
    R.lines = !(R.bar && isatty(STDOUT_FILENO));
    R.t_start = cli_now();
    print_start(&R);
    if (R.start_step == R.end_step && !c.json)
        printf("# nothing to train: the checkpoint is at step %" PRId64 "\n", R.start_step);
    rc = train_loop(&R);
done:
    ef_model_free(check);
    ef_optim_free(o);
    ef_model_free(m);
    ef_task_free(task);
    free(full);
    free(stored_task);
    free(stored_model);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * eval
 * ------------------------------------------------------------------------------------------- */
int cli_eval(int argc, char **argv) {
    enum { E_TASK, E_LOAD, E_BATCH, E_SAMPLES, E_SEED, E_THREADS, E_JSON, E_HELP, N_E };
    cli_opt opts[N_E] = {
        [E_TASK] = {"task", 1, NULL},   [E_LOAD] = {"load", 1, NULL},
        [E_BATCH] = {"batch", 1, NULL}, [E_SAMPLES] = {"eval-samples", 1, NULL},
        [E_SEED] = {"seed", 1, NULL},   [E_THREADS] = {"threads", 1, NULL},
        [E_JSON] = {"json", 0, NULL},   [E_HELP] = {"help", 0, NULL},
    };
    int rc = cli_parse_opts("eval", argc, argv, 1, opts, N_E);
    if (rc) return rc;
    if (opts[E_HELP].value) {
        cli_usage(stdout, "eval");
        return CLI_OK;
    }
    const char *path = opts[E_LOAD].value;
    if (!path) return cli_usage_error("eval", "eval: --load PATH is required");
    int batch = 8, samples = 0, seed = 1, threads = 0, json = opts[E_JSON].value != NULL;
    if ((opts[E_BATCH].value &&
         (rc = cli_parse_int("eval", "batch", opts[E_BATCH].value, 1, INT_MAX, &batch))) ||
        (opts[E_SAMPLES].value && (rc = cli_parse_int("eval", "eval-samples", opts[E_SAMPLES].value,
                                                      1, INT_MAX, &samples))) ||
        (opts[E_SEED].value &&
         (rc = cli_parse_int("eval", "seed", opts[E_SEED].value, 0, INT_MAX, &seed))) ||
        (opts[E_THREADS].value &&
         (rc = cli_parse_int("eval", "threads", opts[E_THREADS].value, 1, 4096, &threads))))
        return rc;
    ef_set_num_threads(threads);

    /* a training checkpoint records its task, seed and step beside the model (PATH.opt) */
    ef_status mst;
    char *meta_task = read_meta(path, "train.task", &mst);
    char *meta_seed = read_meta(path, "train.seed", NULL);
    char *meta_step = read_meta(path, "eformer.step", NULL);
    const char *task_spec = opts[E_TASK].value ? opts[E_TASK].value : meta_task;
    if (!opts[E_SEED].value && meta_seed) seed = atoi(meta_seed);
    int64_t step = meta_step ? strtoll(meta_step, NULL, 10) : -1;
    ef_task *task = NULL;
    ef_model *m = NULL;
    ef_status st;
    if (!task_spec) {
        rc = cli_usage_error("eval",
                             "eval: --task is required (%s%s, where `eformer train` "
                             "records its task, %s)",
                             path, EF_TRAIN_OPT_SUFFIX,
                             mst == EF_ERR_IO ? "cannot be read" : "records none");
        goto done;
    }
    if ((st = ef_task_new(&task, task_spec, (uint64_t)seed))) {
        rc = task_error("eval", st, task_spec);
        goto done;
    }
    ef_model_opts mo = {.batch = batch, .seed = 0, .train = 0};
    if ((st = ef_model_load(&m, path, &mo))) {
        char ctx[1200];
        snprintf(ctx, sizeof ctx, "loading the model %s", path);
        cli_lib_error(st, ctx);
        rc = CLI_FAIL;
        goto done;
    }
    ef_task_info ti;
    ef_model_info mi;
    ef_task_get_info(task, &ti);
    ef_model_get_info(m, &mi);
    if ((rc = check_model_fits("eval", &mi, &ti, ef_task_describe(task)))) goto done;
    int64_t n = samples > 0 && samples < ti.n_eval ? samples : ti.n_eval;
    if (json) {
        fputs("{\"split\":\"start\",\"model\":", stdout);
        cli_json_string(stdout, ef_model_describe(m));
        printf(",\"params\":%zu,\"task\":", ef_model_param_count(m));
        cli_json_string(stdout, ef_task_describe(task));
        printf(",\"seed\":%d,\"batch\":%d,\"eval_samples\":%" PRId64 ",\"load\":", seed, batch, n);
        cli_json_string(stdout, path);
        puts("}");
    } else {
        printf("# model: %s (%s)\n", ef_model_describe(m), path);
        printf("# parameters: %zu\n", ef_model_param_count(m));
        printf("# task: %s (seed %d; %" PRId64 " of %" PRId64 " eval samples)\n",
               ef_task_describe(task), seed, n, ti.n_eval);
    }
    install_stop_handler();
    eval_result r;
    if ((st = run_eval(m, task, batch, n, &r))) {
        cli_lib_error(st, "evaluating");
        rc = CLI_FAIL;
        goto done;
    }
    print_eval(json, step, &r);
    if (r.interrupted) rc = 128 + stop_signal;
done:
    ef_model_free(m);
    ef_task_free(task);
    free(meta_task), free(meta_seed), free(meta_step);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * generate
 * ------------------------------------------------------------------------------------------- */
/* The next byte from logits[256]: the largest (ties: the smallest id) at temperature 0, else a
 * draw from softmax(logits / temperature) with the uniform u in [0, 1). */
static int pick_byte(const float *logits, int vocab, double temperature, float u) {
    int best = 0;
    for (int i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature <= 0) return best;
    double z = 0, mx = logits[best];
    for (int i = 0; i < vocab; i++) z += exp((logits[i] - mx) / temperature);
    double target = (double)u * z, acc = 0;
    for (int i = 0; i < vocab; i++) {
        acc += exp((logits[i] - mx) / temperature);
        if (acc > target) return i;
    }
    return best; /* rounding left target at the very end */
}

int cli_generate(int argc, char **argv) {
    enum { G_LOAD, G_PROMPT, G_MAX, G_TEMP, G_SEED, G_THREADS, G_HELP, N_G };
    cli_opt opts[N_G] = {
        [G_LOAD] = {"load", 1, NULL},   [G_PROMPT] = {"prompt", 1, NULL},
        [G_MAX] = {"max-new", 1, NULL}, [G_TEMP] = {"temperature", 1, NULL},
        [G_SEED] = {"seed", 1, NULL},   [G_THREADS] = {"threads", 1, NULL},
        [G_HELP] = {"help", 0, NULL},
    };
    int rc = cli_parse_opts("generate", argc, argv, 1, opts, N_G);
    if (rc) return rc;
    if (opts[G_HELP].value) {
        cli_usage(stdout, "generate");
        return CLI_OK;
    }
    const char *path = opts[G_LOAD].value, *prompt = opts[G_PROMPT].value;
    if (!path) return cli_usage_error("generate", "generate: --load PATH is required");
    if (!prompt) return cli_usage_error("generate", "generate: --prompt TEXT is required");
    int max_new = 200, seed = 1, threads = 0;
    double temperature = 1.0;
    if ((opts[G_MAX].value &&
         (rc = cli_parse_int("generate", "max-new", opts[G_MAX].value, 0, 1 << 24, &max_new))) ||
        (opts[G_TEMP].value && (rc = cli_parse_double("generate", "temperature", opts[G_TEMP].value,
                                                      0, 1e6, &temperature))) ||
        (opts[G_SEED].value &&
         (rc = cli_parse_int("generate", "seed", opts[G_SEED].value, 0, INT_MAX, &seed))) ||
        (opts[G_THREADS].value &&
         (rc = cli_parse_int("generate", "threads", opts[G_THREADS].value, 1, 4096, &threads))))
        return rc;
    ef_set_num_threads(threads);

    ef_model *m = NULL;
    ef_model_opts mo = {.batch = 1, .seed = 0, .train = 0};
    ef_status st = ef_model_load(&m, path, &mo);
    if (st) {
        char ctx[1200];
        snprintf(ctx, sizeof ctx, "loading the model %s", path);
        cli_lib_error(st, ctx);
        return CLI_FAIL;
    }
    ef_model_info mi;
    ef_model_get_info(m, &mi);
    int32_t *seq = NULL;
    float *logits = NULL;
    if (mi.classes || mi.vocab != 256 || !mi.causal) {
        fprintf(stderr,
                "eformer: generate: %s is not a causal byte-level language model: it has %s, "
                "vocab %d and %s attention; generate needs head=lm, vocab=256 and causal=1 (a "
                "model trained on a text: task)\n",
                path, mi.classes ? "a classification head" : "head=lm", mi.vocab,
                mi.causal ? "causal" : "non-causal");
        rc = CLI_USAGE;
        goto done;
    }
    size_t plen = strlen(prompt), total = plen + (size_t)max_new;
    seq = malloc(total * sizeof *seq);
    logits = malloc((size_t)mi.max_len * 256 * sizeof *logits);
    if (!seq || !logits) {
        fprintf(stderr, "eformer: out of memory for %zu tokens\n", total);
        rc = CLI_FAIL;
        goto done;
    }
    for (size_t i = 0; i < plen; i++) seq[i] = (unsigned char)prompt[i];
    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    int last_nl = plen > 0 && prompt[plen - 1] == '\n';
    /* incremental decoding where every layer has a decoding state (linear, performer): the
     * prompt once, then one step per byte, up to max_len positions; after that (and for other
     * models) every byte recomputes the last max_len bytes */
    ef_model_decoder *dec = NULL;
    int incremental = plen < (size_t)mi.max_len && ef_model_decoder_new(&dec, m) == EF_OK;
    for (size_t i = 0; incremental && i < plen && !st; i++)
        st = ef_model_decode_step(dec, seq[i], logits);
    for (size_t cur = plen; cur < total && !st; cur++) {
        const float *row = logits;
        if (!incremental) {
            /* the model sees at most max_len positions: the last max_len bytes */
            size_t first = cur > (size_t)mi.max_len ? cur - (size_t)mi.max_len : 0;
            int n = (int)(cur - first);
            ef_model_batch in = {
                .batch = 1, .len = n, .tokens = seq + first, .lens = NULL, .targets = NULL};
            ef_model_out out = {.logits = logits};
            if ((st = ef_model_forward(m, &in, &out))) break;
            row = logits + (size_t)(n - 1) * 256;
        }
        float u = 0;
        if (temperature > 0) ef_rng_uniform((uint64_t)seed, 0, cur - plen, 1, &u);
        int b = pick_byte(row, 256, temperature, u);
        seq[cur] = b;
        putchar(b);
        fflush(stdout);
        last_nl = b == '\n';
        if (incremental && cur + 1 < total) {
            if (ef_model_decoder_position(dec) < mi.max_len)
                st = ef_model_decode_step(dec, b, logits);
            else
                incremental = 0; /* past max_len: recompute the window from here on */
        }
    }
    ef_model_decoder_free(dec);
    if (st) {
        fputc('\n', stdout);
        cli_lib_error(st, "running the model");
        rc = CLI_FAIL;
        goto done;
    }
    if (!last_nl && isatty(STDOUT_FILENO)) putchar('\n');
done:
    free(seq);
    free(logits);
    ef_model_free(m);
    return rc;
}
