/*
 * bench.c - `eformer bench`: time a mechanism, after checking it against its reference; or
 * time training / inference steps of a Transformer model (--model).
 *
 * For each requested length: make the plan; unless --no-check, compare the fast path with the
 * mechanism's reference path (ref=1) at a small odd shape with key and query padding (forward, and the
 * gradients with --backward); then time warm-up + R repetitions of forward (or forward +
 * backward) on Gaussian inputs and report the median, GFLOP/s from the library's analytic
 * count, the fraction of this machine's SGEMM rate measured in the same run, the bytes the
 * library reports (workspace + saved) and the peak resident set.
 *
 * A length whose plan or buffers cannot be had is reported and skipped; a failed check stops
 * that spec (its timings would mean nothing).
 *
 * --model: build the model (ef_model_new), then time warm-up + R steps of forward (or forward +
 * zero_grad + backward) on random tokens, and report the median step, tokens/s, GFLOP/s from
 * ef_model_flops and its fraction of the same run's SGEMM rate, the share of the time inside the
 * attention mechanisms (ef_model_get_stats), the last loss, the bytes the library reports
 * (ef_model_get_bytes) and the peak resident set. The timing, SGEMM probe, RSS measurement,
 * memory refusal and JSON numbers are the ones the mechanism bench uses.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LENS 64
#define MIN_I(a, b) ((a) < (b) ? (a) : (b))

/* Tolerances of the check, as max |fast - ref| / max |ref| over a tensor. Both paths are fp32;
 * the reference sums in a different order (and differentiates a materialised softmax), so
 * forward agrees to a few ulps times log(length); gradients go through two more products and
 * the softmax Jacobian, hence the looser bound. */
#define CHECK_TOL_FWD 1e-4
#define CHECK_TOL_BWD 1e-3
/* precision=bf16 rounds every product's inputs to 8 significant bits (unit roundoff
 * u = 2^-9 = 2e-3): the max relative error of the check's shape is a few u (measured 6e-3
 * forward, ~1e-2 gradients at dim 64; tests/test_bf16.c derives the typical error); 10u and
 * 25u flag a wrong kernel (errors of order 1) without flagging bf16's rounding. */
#define CHECK_TOL_FWD_BF16 2e-2
#define CHECK_TOL_BWD_BF16 5e-2

enum { PASS_FWD = 0, PASS_FWDBWD = 1 };
static const char *const pass_name[2] = {"fwd", "fwdbwd"};

/* The seed of the benchmark's inputs (Gaussian tensors, model tokens and targets): fixed, so
 * that every run times the same work. */
#define DATA_SEED 2024

typedef struct bench_opts {
    const char *spec;
    int batch, heads, dim, v_dim;
    int lens[MAX_LENS], n_lens;
    int kv[MAX_LENS], n_kv; /* n_kv = 0: kv_len = len; 1: one value for all; else one per len */
    int backward, reps, warmup, threads, json, check;
    /* --model */
    const char *model;
    int model_len; /* 0 = the spec's max_len */
    int valid_len; /* --lens: 0 = every position valid */
    int seed;
} bench_opts;

/* State of one invocation. */
typedef struct bench_run {
    const bench_opts *o;
    int have_sgemm;
    double sgemm; /* GFLOP/s, 0 if the probe failed */
    int header_done;
    int rows;   /* rows reported */
    int failed; /* a check failed or a pass returned an error */
    /* the last check that passed, so that a list of lengths checks once */
    char checked_spec[1024];
    int checked_n, checked_m, checked_bwd;
    double checked_fwd, checked_bwd_err;
} bench_run;

/* ---------------------------------------------------------------------------------------------
 * Buffers
 * ------------------------------------------------------------------------------------------- */
typedef struct buflist {
    void *p[32];
    int n;
} buflist;

/* ef_malloc'd buffer remembered in `b`; NULL (library error set) on failure. */
static void *buf_alloc(buflist *b, size_t bytes) {
    if (b->n >= (int)(sizeof b->p / sizeof b->p[0])) return NULL;
    void *p = ef_malloc(bytes);
    if (p) b->p[b->n++] = p;
    return p;
}

static void buf_free_all(buflist *b) {
    for (int i = 0; i < b->n; i++) ef_free(b->p[i]);
    b->n = 0;
}

static void fill_normal(float *x, size_t n, uint64_t stream) {
    ef_rng_normal(DATA_SEED, stream, 0, n, x);
}

/* ---------------------------------------------------------------------------------------------
 * The check against the reference path
 * ------------------------------------------------------------------------------------------- */
/* max |x - ref| / max |ref|; NaN when either holds a non-finite value. */
static double rel_err(const float *x, const float *ref, size_t n) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i]) || !isfinite(ref[i])) return NAN;
        diff = fmax(diff, fabs((double)x[i] - ref[i]));
        scale = fmax(scale, fabs((double)ref[i]));
    }
    return scale > 0 ? diff / scale : diff;
}

static double worst(double a, double b) { return isnan(a) || isnan(b) ? NAN : fmax(a, b); }

/* The reference twin of `spec` in `out`: its `ref` option set to 1, appended (",ref=1", or
 * ":ref=1" when the spec has no options) unless the spec names it. Returns 0, 1 when the spec
 * already runs the reference path (nothing to compare), -1 when the result does not fit. */
static int make_ref_spec(const char *spec, char *out, size_t cap) {
    const char *colon = strchr(spec, ':');
    if (colon) {
        for (const char *p = colon + 1; *p;) {
            const char *end = strchr(p, ',');
            size_t len = end ? (size_t)(end - p) : strlen(p);
            if (len >= 4 && strncmp(p, "ref=", 4) == 0) {
                const char *val = p + 4;
                size_t vlen = len - 4;
                if ((vlen == 1 && *val == '1') || (vlen == 4 && strncmp(val, "true", 4) == 0))
                    return 1;
                int n = snprintf(out, cap, "%.*sref=1%s", (int)(p - spec), spec, end ? end : "");
                return n < 0 || (size_t)n >= cap ? -1 : 0;
            }
            if (!end) break;
            p = end + 1;
        }
    }
    int n = snprintf(out, cap, "%s%sref=1", spec, colon ? "," : ":");
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

/* The check shape's lengths for a bench shape n x m; attempt 0 is odd (not a multiple of any
 * tile), later attempts are for mechanisms that need block-aligned or longer sequences. Equal
 * lengths stay equal (some mechanisms require it), unequal ones keep their order. */
static void check_lengths(int n, int m, int attempt, int *nc, int *mc) {
    static const int big[4] = {97, 128, 256, 600}, small[4] = {83, 128, 256, 600};
    if (n == m) {
        *nc = *mc = MIN_I(n, big[attempt]);
        return;
    }
    *nc = MIN_I(n, n > m ? big[attempt] : small[attempt]);
    *mc = MIN_I(m, n > m ? small[attempt] : big[attempt]);
}

typedef struct check_result {
    double fwd, bwd; /* max relative errors; bwd < 0 when not checked */
    int n, m;        /* lengths the check ran at */
    int32_t kv_lens[2], q_lens[2];
} check_result;

/* Runs `spec` and `ref_spec` on the same Gaussian inputs at `sh` (batch 2) and compares. The
 * returned status is a library failure; the comparison is in *r. */
static ef_status check_run(const char *spec, const char *ref_spec, const ef_attn_shape *sh,
                           int backward, check_result *r) {
    ef_attn *fast = NULL, *ref = NULL;
    buflist bl = {{0}, 0};
    ef_status st = ef_attn_new(&fast, spec, sh);
    if (!st) st = ef_attn_new(&ref, ref_spec, sh);
    if (st) goto done;

    size_t bh = (size_t)sh->batch * sh->heads;
    size_t nq = bh * sh->q_len * sh->head_dim, nk = bh * sh->kv_len * sh->head_dim;
    size_t nv = bh * sh->kv_len * sh->v_dim, no = bh * sh->q_len * sh->v_dim;
    float *q = buf_alloc(&bl, nq * 4), *k = buf_alloc(&bl, nk * 4), *v = buf_alloc(&bl, nv * 4);
    float *of = buf_alloc(&bl, no * 4), *orf = buf_alloc(&bl, no * 4);
    if (!q || !k || !v || !of || !orf) {
        st = EF_ERR_NOMEM;
        goto done;
    }
    fill_normal(q, nq, 0);
    fill_normal(k, nk, 1);
    fill_normal(v, nv, 2);
    /* the second sequence has a third of its keys and a fifth of its queries padded away */
    r->kv_lens[0] = sh->kv_len;
    r->kv_lens[1] = sh->kv_len - sh->kv_len / 3;
    r->q_lens[0] = sh->q_len;
    r->q_lens[1] = sh->q_len - sh->q_len / 5;
    ef_attn_io iof = {q, k, v, r->kv_lens, of, r->q_lens},
               ior = {q, k, v, r->kv_lens, orf, r->q_lens};
    r->n = sh->q_len, r->m = sh->kv_len, r->bwd = -1;

    if ((st = ef_attn_forward(fast, &iof, NULL)) || (st = ef_attn_forward(ref, &ior, NULL)))
        goto done;
    r->fwd = rel_err(of, orf, no);
    if (!backward) goto done;

    size_t sf = ef_attn_saved_bytes(fast), sr = ef_attn_saved_bytes(ref);
    void *savf = sf ? buf_alloc(&bl, sf) : NULL, *savr = sr ? buf_alloc(&bl, sr) : NULL;
    float *g = buf_alloc(&bl, no * 4);
    float *dqf = buf_alloc(&bl, nq * 4), *dkf = buf_alloc(&bl, nk * 4),
          *dvf = buf_alloc(&bl, nv * 4);
    float *dqr = buf_alloc(&bl, nq * 4), *dkr = buf_alloc(&bl, nk * 4),
          *dvr = buf_alloc(&bl, nv * 4);
    if ((sf && !savf) || (sr && !savr) || !g || !dqf || !dkf || !dvf || !dqr || !dkr || !dvr) {
        st = EF_ERR_NOMEM;
        goto done;
    }
    fill_normal(g, no, 3);
    /* the training forward (it fills `saved`) must agree too */
    if ((st = ef_attn_forward(fast, &iof, savf)) || (st = ef_attn_forward(ref, &ior, savr)))
        goto done;
    r->fwd = worst(r->fwd, rel_err(of, orf, no));
    if ((st = ef_attn_backward(fast, &iof, savf, g, dqf, dkf, dvf))) goto done;
    if ((st = ef_attn_backward(ref, &ior, savr, g, dqr, dkr, dvr))) goto done;
    r->bwd = worst(worst(rel_err(dqf, dqr, nq), rel_err(dkf, dkr, nk)), rel_err(dvf, dvr, nv));
    size_t np = ef_attn_param_count(fast);
    if (np > 0 && np == ef_attn_param_count(ref))
        r->bwd = worst(r->bwd, rel_err(ef_attn_param_grads(fast), ef_attn_param_grads(ref), np));
done:
    buf_free_all(&bl);
    ef_attn_free(fast);
    ef_attn_free(ref);
    return st;
}

/* Checks `spec` for the bench shape `bs` (memoised). Returns 0 when it passed, was skipped or
 * was already done (*err = the error to report, -1 if none); nonzero after printing why not. */
static int check_spec(bench_run *R, const char *spec, const ef_attn_shape *bs, int backward,
                      double *err) {
    *err = -1;
    char ref_spec[1100];
    int rs = make_ref_spec(spec, ref_spec, sizeof ref_spec);
    if (rs == 1) {
        if (strcmp(R->checked_spec, spec) != 0) /* once per spec */
            fprintf(stderr,
                    "eformer: note: '%s' runs the reference path itself; nothing to check\n", spec);
        snprintf(R->checked_spec, sizeof R->checked_spec, "%s", spec);
        R->checked_n = R->checked_m = -1;
        return 0;
    }
    if (rs < 0) {
        fprintf(stderr, "eformer: the spec '%s' is too long\n", spec);
        return 1;
    }
    check_result r = {0, -1, 0, 0, {0, 0}, {0, 0}};
    ef_status st = EF_OK;
    ef_attn_shape sh = *bs;
    sh.batch = 2;
    sh.heads = 2;
    char first_refusal[600] = "";
    for (int attempt = 0; attempt < 4; attempt++) {
        int nc, mc;
        check_lengths(bs->q_len, bs->kv_len, attempt, &nc, &mc);
        if (attempt > 0 && nc == sh.q_len && mc == sh.kv_len) continue; /* tried already */
        sh.q_len = nc, sh.kv_len = mc;
        if (strcmp(R->checked_spec, spec) == 0 && R->checked_n == nc && R->checked_m == mc &&
            R->checked_bwd >= backward) {
            *err = backward ? worst(R->checked_fwd, R->checked_bwd_err) : R->checked_fwd;
            return 0;
        }
        st = check_run(spec, ref_spec, &sh, backward, &r);
        /* a mechanism may want block-aligned or longer sequences (bigbird's random blocks must
         * fit, an EF_ERR_ARG): try the next check shape */
        if (st != EF_ERR_SHAPE && st != EF_ERR_UNSUPPORTED && st != EF_ERR_ARG) break;
        if (!first_refusal[0])
            snprintf(first_refusal, sizeof first_refusal, "len=%d kv-len=%d: %s", nc, mc,
                     ef_last_error());
    }
    char ctx[1400];
    snprintf(ctx, sizeof ctx,
             "checking '%s' against '%s' at batch=2 heads=2 len=%d kv-len=%d dim=%d v-dim=%d", spec,
             ref_spec, sh.q_len, sh.kv_len, sh.head_dim, sh.v_dim);
    if (st) {
        cli_lib_error(st, ctx);
        fprintf(stderr, "  (--no-check skips the check)\n");
        return 1;
    }
    int bf16 = cli_spec_key_is(spec, "precision", "bf16");
    double tol_fwd = bf16 ? CHECK_TOL_FWD_BF16 : CHECK_TOL_FWD;
    double tol_bwd = bf16 ? CHECK_TOL_BWD_BF16 : CHECK_TOL_BWD;
    int fwd_ok = r.fwd <= tol_fwd, bwd_ok = !backward || r.bwd <= tol_bwd;
    if (!fwd_ok || !bwd_ok) {
        fprintf(stderr, "eformer: check FAILED: '%s' disagrees with its reference path\n", spec);
        fprintf(stderr,
                "  at batch=2 heads=2 len=%d kv-len=%d dim=%d v-dim=%d, kv_lens={%d,%d} "
                "q_lens={%d,%d}:\n",
                r.n, r.m, sh.head_dim, sh.v_dim, r.kv_lens[0], r.kv_lens[1], r.q_lens[0],
                r.q_lens[1]);
        fprintf(stderr, "  forward max relative error %.3g (tolerance %g)%s\n", r.fwd,
                tol_fwd, fwd_ok ? "" : "  <-- FAIL");
        if (backward)
            fprintf(stderr, "  gradient max relative error %.3g (tolerance %g)%s\n", r.bwd,
                    tol_bwd, bwd_ok ? "" : "  <-- FAIL");
        fprintf(stderr, "  hint: this is a bug in the mechanism's fast path (or in its reference); "
                        "its timings would mean nothing, so it is not timed\n");
        return 1;
    }
    if (first_refusal[0])
        fprintf(stderr, "eformer: note: '%s' checked at len=%d kv-len=%d (refused %s)\n", spec, r.n,
                r.m, first_refusal);
    snprintf(R->checked_spec, sizeof R->checked_spec, "%s", spec);
    R->checked_n = r.n, R->checked_m = r.m, R->checked_bwd = backward;
    R->checked_fwd = r.fwd, R->checked_bwd_err = r.bwd;
    *err = backward ? worst(r.fwd, r.bwd) : r.fwd;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Output
 * ------------------------------------------------------------------------------------------- */
typedef struct bench_row {
    const char *spec; /* canonical */
    ef_attn_shape sh;
    int pass;
    double median_ms, gflops, check_err;
    size_t peak_bytes, rss_bytes;
    int rss_per_row;
} bench_row;

/* The first line of a table: version, threads, the SGEMM rate and the GEMM library. */
static void print_preamble(const bench_run *R) {
    ef_blas_info bi = {0};
    ef_blas_get_info(&bi);
    printf("# eformer %s, threads %d, sgemm 1024^3: %.1f GFLOP/s (%s, %s); sgemm%% is "
           "against a rate measured again right before each row\n", ef_version(),
           ef_get_num_threads(), R->sgemm, bi.name ? bi.name : "?", bi.kernel ? bi.kernel : "?");
}

static const char *rss_what(int rss_per_row) {
    return rss_per_row ? "peak resident set while the row ran"
                       : "peak resident set of the process so far";
}

static void print_row(bench_run *R, const bench_row *w) {
    const ef_attn_shape *s = &w->sh;
    double frac = R->sgemm > 0 ? w->gflops / R->sgemm : NAN;
    if (R->o->json) {
        fputs("{\"spec\":", stdout);
        cli_json_string(stdout, w->spec);
        printf(",\"batch\":%d,\"heads\":%d,\"q_len\":%d,\"kv_len\":%d,\"head_dim\":%d,\"v_dim\":%d",
               s->batch, s->heads, s->q_len, s->kv_len, s->head_dim, s->v_dim);
        printf(",\"pass\":\"%s\"", pass_name[w->pass]);
        cli_json_num(stdout, "median_ms", w->median_ms, "%.6g");
        cli_json_num(stdout, "gflops", w->gflops, "%.6g");
        cli_json_num(stdout, "sgemm_gflops", R->sgemm > 0 ? R->sgemm : NAN, "%.6g");
        printf(",\"peak_bytes\":%zu,\"rss_bytes\":%zu", w->peak_bytes, w->rss_bytes);
        cli_json_num(stdout, "check_err", w->check_err >= 0 ? w->check_err : NAN, "%.3g");
        printf(",\"threads\":%d", ef_get_num_threads());
        cli_json_num(stdout, "fraction_of_sgemm", frac, "%.4f");
        puts("}");
    } else {
        if (!R->header_done) {
            print_preamble(R);
            printf("# median of %d run%s after %d warm-up; peak = workspace (+ saved for fwdbwd);\n"
                   "# RSS = %s;\n"
                   "# check = max relative error against ref=1 (batch 2, heads 2, len <= 97, key "
                   "padding)\n",
                   R->o->reps, R->o->reps == 1 ? "" : "s", R->o->warmup,
                   rss_what(w->rss_per_row));
            printf("%-40s %3s %3s %6s %6s %4s %4s %-6s %10s %9s %7s %9s %9s %8s\n", "spec", "B",
                   "H", "N", "M", "D", "Dv", "pass", "median_ms", "GFLOP/s", "sgemm%", "peak_MB",
                   "RSS_MB", "check");
            R->header_done = 1;
        }
        char chk[16] = "-";
        if (w->check_err >= 0) snprintf(chk, sizeof chk, "%.1e", w->check_err);
        char pct[16] = "-";
        if (isfinite(frac)) snprintf(pct, sizeof pct, "%.1f%%", 100 * frac);
        printf("%-40s %3d %3d %6d %6d %4d %4d %-6s %10.3f %9.2f %7s %9.1f %9.1f %8s\n", w->spec,
               s->batch, s->heads, s->q_len, s->kv_len, s->head_dim, s->v_dim, pass_name[w->pass],
               w->median_ms, w->gflops, pct, w->peak_bytes / 1e6, w->rss_bytes / 1e6, chk);
    }
    fflush(stdout);
    R->rows++;
}

/* ---------------------------------------------------------------------------------------------
 * One shape
 * ------------------------------------------------------------------------------------------- */
/* Measures the SGEMM rate again right before each row is timed: the clock of these machines
 * wanders, so the fraction of SGEMM is only meaningful against a rate taken moments earlier. */
static void ensure_sgemm(bench_run *R) {
    R->have_sgemm = 1;
    ef_status st = cli_sgemm_gflops(1024, 3, &R->sgemm);
    if (st) {
        cli_lib_error(st, "measuring sgemm at 1024^3 (the fraction of sgemm is not reported)");
        R->sgemm = 0;
    }
}

static void shape_str(char *buf, size_t cap, const ef_attn_shape *s) {
    snprintf(buf, cap, "batch=%d heads=%d len=%d kv-len=%d dim=%d v-dim=%d", s->batch, s->heads,
             s->q_len, s->kv_len, s->head_dim, s->v_dim);
}

/* One step of what is timed (a mechanism's pass, a model's step). */
typedef ef_status (*step_fn)(void *ctx);

/* Times `iters` steps; t[] receives seconds (NULL: warm-up). Stops at the first failure. */
static ef_status time_steps(step_fn step, void *ctx, int iters, double *t) {
    for (int r = 0; r < iters; r++) {
        double t0 = cli_now();
        ef_status st = step(ctx);
        if (st) return st;
        if (t) t[r] = cli_now() - t0;
    }
    return EF_OK;
}

/* 1 when `need` bytes fit in the memory the process could still get (or that is unknown); else
 * prints why not (`what` needs them, `parts` says of what, `tail` ends the line) and returns 0.
 * Refusing before touching the memory matters: on an overcommitting kernel the allocation
 * succeeds and the process is killed later, or the machine swaps. */
static int fits_memory(double need, const char *what, const char *parts, const char *tail) {
    double avail = (double)cli_avail_mem();
    if (avail <= 0 || need <= avail) return 1;
    fprintf(stderr,
            "eformer: %s: %s needs %.1f GB (%s), more than the %.1f GB of memory available%s\n",
            ef_status_str(EF_ERR_NOMEM), what, need / 1e9, parts, avail / 1e9, tail);
    fprintf(stderr, "  hint: try a smaller --len or --batch\n");
    return 0;
}

/* A mechanism's pass: forward, or forward + backward. */
typedef struct attn_step {
    ef_attn *a;
    const ef_attn_io *io;
    int pass;
    void *saved;
    const float *g;
    float *dq, *dk, *dv;
} attn_step;

static ef_status attn_step_run(void *ctx) {
    const attn_step *s = ctx;
    if (s->pass == PASS_FWD) return ef_attn_forward(s->a, s->io, NULL);
    ef_status st = ef_attn_forward(s->a, s->io, s->saved);
    return st ? st : ef_attn_backward(s->a, s->io, s->saved, s->g, s->dq, s->dk, s->dv);
}

/* Benchmarks `spec` at `sh` for the passes in want[PASS_FWD], want[PASS_FWDBWD]. Returns 0, or
 * nonzero when the spec's check failed (the caller skips its other lengths). */
static int bench_shape(bench_run *R, const char *spec, ef_attn_shape sh, const int want[2]) {
    const bench_opts *o = R->o;
    char shp[160], ctx[1400];
    shape_str(shp, sizeof shp, &sh);

    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &sh);
    if (st) {
        snprintf(ctx, sizeof ctx, "creating the plan '%s' at %s (skipped)", spec, shp);
        cli_lib_error(st, ctx);
        /* a bad spec is bad at every length: do not repeat the message */
        return st == EF_ERR_ARG || st == EF_ERR_FORMAT;
    }
    const char *canon = ef_attn_describe(a);
    double check_err = -1;
    if (o->check && check_spec(R, spec, &sh, want[PASS_FWDBWD], &check_err)) {
        ef_attn_free(a);
        R->failed = 1;
        return 1;
    }

    ensure_sgemm(R);
    /* from here on the resident set grows by what this shape needs (the plan's touched
     * workspace is already resident; the check's and the sgemm probe's buffers are gone) */
    int rss_per_row = cli_reset_peak_rss();

    /* refuse what cannot fit in memory before touching it */
    int bwd = want[PASS_FWDBWD];
    double bhd = (double)sh.batch * sh.heads * 4;
    double tens = bhd * ((double)sh.q_len * sh.head_dim + (double)sh.kv_len * sh.head_dim +
                         (double)sh.kv_len * sh.v_dim + (double)sh.q_len * sh.v_dim);
    double ws = (double)ef_attn_workspace_bytes(a), sv = bwd ? (double)ef_attn_saved_bytes(a) : 0;
    if (bwd) tens *= 2; /* dout, dq, dk, dv */
    char what[1400], parts[160];
    snprintf(what, sizeof what, "'%s' at %s", canon, shp);
    snprintf(parts, sizeof parts, "workspace %.1f GB, saved %.1f GB, tensors %.1f GB", ws / 1e9,
             sv / 1e9, tens / 1e9);
    if (!fits_memory(ws + sv + tens, what, parts, " (skipped)")) {
        ef_attn_free(a);
        return 0;
    }

    buflist bl = {{0}, 0};
    size_t bh = (size_t)sh.batch * sh.heads;
    size_t nq = bh * sh.q_len * sh.head_dim, nk = bh * sh.kv_len * sh.head_dim;
    size_t nv = bh * sh.kv_len * sh.v_dim, no = bh * sh.q_len * sh.v_dim;
    size_t nsaved = ef_attn_saved_bytes(a);
    float *q = buf_alloc(&bl, nq * 4), *k = buf_alloc(&bl, nk * 4), *v = buf_alloc(&bl, nv * 4);
    float *out = buf_alloc(&bl, no * 4);
    float *g = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
    void *saved = NULL;
    double *times = NULL;
    int ok = q && k && v && out;
    if (ok && bwd) {
        g = buf_alloc(&bl, no * 4), dq = buf_alloc(&bl, nq * 4), dk = buf_alloc(&bl, nk * 4);
        dv = buf_alloc(&bl, nv * 4);
        saved = nsaved ? buf_alloc(&bl, nsaved) : NULL;
        ok = g && dq && dk && dv && (saved || !nsaved);
    }
    if (!ok) { /* ef_malloc has set the message */
        snprintf(ctx, sizeof ctx, "allocating the tensors for '%s' at %s (skipped)", canon, shp);
        cli_lib_error(EF_ERR_NOMEM, ctx);
        goto done;
    }
    times = malloc(sizeof(double) * (size_t)o->reps);
    if (!times) {
        fprintf(stderr, "eformer: out of memory for %d timings\n", o->reps);
        R->failed = 1;
        goto done;
    }
    fill_normal(q, nq, 10);
    fill_normal(k, nk, 11);
    fill_normal(v, nv, 12);
    ef_attn_io io = {q, k, v, NULL, out, NULL};

    for (int pass = PASS_FWD; pass <= PASS_FWDBWD; pass++) {
        if (!want[pass]) continue;
        if (pass == PASS_FWDBWD) fill_normal(g, no, 13); /* touched only now: fwd's RSS is fwd's */
        attn_step step = {a, &io, pass, saved, g, dq, dk, dv};
        st = time_steps(attn_step_run, &step, o->warmup, NULL);
        if (!st) st = time_steps(attn_step_run, &step, o->reps, times);
        if (st) {
            snprintf(ctx, sizeof ctx, "running %s of '%s' at %s", pass_name[pass], canon, shp);
            cli_lib_error(st, ctx);
            R->failed = 1;
            break;
        }
        bench_row w = {canon, sh, pass, 0, 0, check_err, 0, 0, rss_per_row};
        double med = cli_median(times, o->reps);
        w.median_ms = med * 1e3;
        w.gflops = med > 0 ? ef_attn_flops(a, pass == PASS_FWDBWD) / med / 1e9 : NAN;
        w.peak_bytes = ef_attn_workspace_bytes(a) + (pass == PASS_FWDBWD ? nsaved : 0);
        w.rss_bytes = cli_peak_rss();
        print_row(R, &w);
    }
done:
    free(times);
    buf_free_all(&bl);
    ef_attn_free(a);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A model (--model)
 * ------------------------------------------------------------------------------------------- */
typedef struct model_step {
    ef_model *m;
    const ef_model_batch *in;
    ef_model_out *out;
    int backward;
} model_step;

/* forward (logits not kept), and with --backward zero_grad + backward: one training step
 * without the optimizer. */
static ef_status model_step_run(void *ctx) {
    const model_step *s = ctx;
    ef_status st = ef_model_forward(s->m, s->in, s->out);
    if (st || !s->backward) return st;
    ef_model_zero_grad(s->m);
    return ef_model_backward(s->m);
}

typedef struct model_row {
    const char *spec; /* canonical */
    size_t params;    /* learned parameters */
    int batch, len, max_len, valid, pass;
    double median_ms, tokens_per_s, flops, gflops, attn_share, loss;
    double dense_gflops; /* (flops - attention flops) / time outside the attention */
    ef_model_bytes bytes;
    size_t rss_bytes;
    int rss_per_row;
} model_row;

static void print_model_row(bench_run *R, const model_row *w) {
    double frac = R->sgemm > 0 ? w->gflops / R->sgemm : NAN;
    double dense = isfinite(w->attn_share) ? 1 - w->attn_share : NAN;
    const ef_model_bytes *b = &w->bytes;
    if (R->o->json) {
        fputs("{\"model\":", stdout);
        cli_json_string(stdout, w->spec);
        printf(",\"params\":%zu,\"batch\":%d,\"len\":%d,\"max_len\":%d,\"valid_len\":%d,\"seed\":%d",
               w->params, w->batch, w->len, w->max_len, w->valid, R->o->seed);
        printf(",\"pass\":\"%s\"", pass_name[w->pass]);
        cli_json_num(stdout, "median_ms", w->median_ms, "%.6g");
        cli_json_num(stdout, "tokens_per_s", w->tokens_per_s, "%.6g");
        cli_json_num(stdout, "flops", w->flops, "%.6g");
        cli_json_num(stdout, "gflops", w->gflops, "%.6g");
        cli_json_num(stdout, "sgemm_gflops", R->sgemm > 0 ? R->sgemm : NAN, "%.6g");
        cli_json_num(stdout, "fraction_of_sgemm", frac, "%.4f");
        cli_json_num(stdout, "attn_share", w->attn_share, "%.4f");
        cli_json_num(stdout, "dense_share", dense, "%.4f");
        cli_json_num(stdout, "dense_gflops", w->dense_gflops, "%.6g");
        cli_json_num(stdout, "dense_fraction_of_sgemm",
                     R->sgemm > 0 ? w->dense_gflops / R->sgemm : NAN, "%.4f");
        cli_json_num(stdout, "loss", w->loss, "%.6g");
        printf(",\"params_bytes\":%zu,\"grads_bytes\":%zu,\"saved_bytes\":%zu,"
               "\"workspace_bytes\":%zu,\"peak_bytes\":%zu,\"rss_bytes\":%zu",
               b->params, b->grads, b->saved, b->workspace, b->total, w->rss_bytes);
        printf(",\"threads\":%d,\"reps\":%d,\"warmup\":%d}\n", ef_get_num_threads(), R->o->reps,
               R->o->warmup);
    } else {
        print_preamble(R);
        printf("# model: %s\n", w->spec);
        printf("# parameters: %zu (%.1f MB fp32); seed %d; made for batch %d x max_len %d; tokens "
               "from a fixed seed, targets the next token (lm) or a random class (cls)\n",
               w->params, w->params * 4.0 / 1e6, R->o->seed, w->batch, w->max_len);
        printf("# median of %d step%s after %d warm-up; a step = %s;\n"
               "# attn%% = time inside the attention mechanisms / time in forward%s "
               "(ef_model_get_stats), dense%% = the rest; dense GF/s = the dense layers' "
               "FLOPs (ef_model_flops - ef_model_attn_flops) / that rest, dsgemm%% its fraction "
               "of sgemm;\n"
               "# params + grads + saved + ws = peak: the bytes the library reports; RSS = %s\n",
               R->o->reps, R->o->reps == 1 ? "" : "s", R->o->warmup,
               w->pass == PASS_FWDBWD ? "forward + zero_grad + backward" : "forward",
               w->pass == PASS_FWDBWD ? " and backward" : "", rss_what(w->rss_per_row));
        printf("%3s %6s %6s %-6s %10s %9s %8s %7s %6s %6s %8s %7s %8s %9s %8s %8s %8s %8s %8s\n",
               "B", "N", "valid", "pass", "median_ms", "tok/s", "GFLOP/s", "sgemm%", "attn%",
               "dense%", "dGF/s", "dsgemm%", "loss", "params_MB", "grads_MB", "saved_MB", "ws_MB",
               "peak_MB", "RSS_MB");
        char gf[16] = "-", pct[16] = "-", at[16] = "-", dn[16] = "-", dg[16] = "-", dp[16] = "-";
        if (isfinite(w->dense_gflops)) snprintf(dg, sizeof dg, "%.2f", w->dense_gflops);
        if (isfinite(w->dense_gflops) && R->sgemm > 0)
            snprintf(dp, sizeof dp, "%.1f%%", 100 * w->dense_gflops / R->sgemm);
        if (isfinite(w->gflops)) snprintf(gf, sizeof gf, "%.2f", w->gflops);
        if (isfinite(frac)) snprintf(pct, sizeof pct, "%.1f%%", 100 * frac);
        if (isfinite(w->attn_share)) snprintf(at, sizeof at, "%.1f%%", 100 * w->attn_share);
        if (isfinite(dense)) snprintf(dn, sizeof dn, "%.1f%%", 100 * dense);
        printf("%3d %6d %6d %-6s %10.3f %9.0f %8s %7s %6s %6s %8s %7s %8.4f %9.1f %8.1f %8.1f "
               "%8.1f %8.1f %8.1f\n",
               w->batch, w->len, w->valid, pass_name[w->pass], w->median_ms, w->tokens_per_s, gf,
               pct, at, dn, dg, dp, w->loss, b->params / 1e6, b->grads / 1e6, b->saved / 1e6,
               b->workspace / 1e6, b->total / 1e6, w->rss_bytes / 1e6);
    }
    fflush(stdout);
    R->rows++;
}

/* An index in [0, n) from a uniform draw u in [0, 1). */
static int32_t uniform_index(float u, int n) {
    int32_t i = (int32_t)((double)u * n);
    return i < n ? i : n - 1;
}

/* Builds and times the model of --model; returns the command's exit status. */
static int bench_model(bench_run *R) {
    const bench_opts *o = R->o;
    int pass = o->backward ? PASS_FWDBWD : PASS_FWD;
    char ctx[1400];
    ef_model *m = NULL;
    ef_model_opts mo = {.batch = o->batch, .seed = (uint64_t)o->seed, .train = o->backward};
    ef_status st = ef_model_new(&m, o->model, &mo);
    if (st) {
        snprintf(ctx, sizeof ctx, "building the model '%s' for batch=%d train=%d", o->model,
                 o->batch, o->backward);
        cli_lib_error_hint(st, ctx, cli_model_hint(st));
        /* a spec or a shape the library refuses is bad usage; running out of memory is not */
        return cli_model_exit(st);
    }
    int rc = CLI_OK;
    int32_t *tok = NULL, *tgt = NULL, *lens = NULL;
    float *u = NULL;
    double *times = NULL;
    ef_model_info info;
    ef_model_bytes bytes;
    ef_model_get_info(m, &info);
    ef_model_get_bytes(m, &bytes);
    const char *canon = ef_model_describe(m);
    /* the model is sized for max_len positions (info.len); a call may be shorter */
    int B = info.batch, N = o->model_len ? o->model_len : info.len;
    int valid = o->valid_len ? o->valid_len : N;
    if (N > info.len) {
        rc = cli_usage_error("bench", "bench: --len %d is beyond the spec's max_len=%d", N,
                             info.len);
        goto done;
    }
    if (valid > N) {
        rc = cli_usage_error("bench", "bench: --lens %d is beyond --len %d", valid, N);
        goto done;
    }

    char what[1400], parts[200];
    snprintf(what, sizeof what, "the model '%s' at batch=%d max_len=%d", canon, B, info.len);
    snprintf(parts, sizeof parts, "params %.2f GB, grads %.2f GB, saved %.2f GB, workspace %.2f GB",
             bytes.params / 1e9, bytes.grads / 1e9, bytes.saved / 1e9, bytes.workspace / 1e9);
    /* the parameters are resident already (initialised); the rest is not touched yet */
    if (!fits_memory((double)(bytes.total - bytes.params), what, parts, "")) {
        rc = CLI_FAIL;
        goto done;
    }

    size_t bn = (size_t)B * N;
    tok = malloc(bn * sizeof *tok);
    tgt = malloc((info.classes ? (size_t)B : bn) * sizeof *tgt);
    lens = malloc((size_t)B * sizeof *lens);
    u = malloc(bn * sizeof *u);
    times = malloc((size_t)o->reps * sizeof *times);
    if (!tok || !tgt || !lens || !u || !times) {
        fprintf(stderr, "eformer: out of memory for the tokens of batch=%d len=%d\n", B, N);
        rc = CLI_FAIL;
        goto done;
    }
    ef_rng_uniform(DATA_SEED, 20, 0, bn, u);
    for (size_t i = 0; i < bn; i++) tok[i] = uniform_index(u[i], info.vocab);
    if (info.classes) {
        ef_rng_uniform(DATA_SEED, 21, 0, (size_t)B, u);
        for (int b = 0; b < B; b++) tgt[b] = uniform_index(u[b], info.classes);
    } else { /* next-token prediction: the last valid position has no target */
        for (int b = 0; b < B; b++)
            for (int t = 0; t < N; t++)
                tgt[(size_t)b * N + t] = t + 1 < valid ? tok[(size_t)b * N + t + 1] : -1;
    }
    for (int b = 0; b < B; b++) lens[b] = valid;
    free(u);
    u = NULL;
    ef_model_batch in = {.batch = B,
                         .len = N,
                         .tokens = tok,
                         .lens = o->valid_len ? lens : NULL,
                         .targets = tgt};
    ef_model_out out = {.logits = NULL}; /* the lm head then never holds all logits */
    model_step step = {m, &in, &out, o->backward};

    ensure_sgemm(R);
    int rss_per_row = cli_reset_peak_rss();
    st = time_steps(model_step_run, &step, o->warmup, NULL);
    if (!st) {
        ef_model_reset_stats(m); /* the attention share is the timed steps' */
        st = time_steps(model_step_run, &step, o->reps, times);
    }
    if (st) {
        snprintf(ctx, sizeof ctx, "running %s of the model '%s' at batch=%d len=%d",
                 pass_name[pass], canon, B, N);
        cli_lib_error(st, ctx);
        rc = CLI_FAIL;
        goto done;
    }
    ef_model_stats ms;
    ef_model_get_stats(m, &ms);
    double med = cli_median(times, o->reps);
    model_row w = {canon, ef_model_param_count(m), B, N, info.len, valid, pass, 0, 0, 0, 0, 0, 0,
                   0, bytes, 0, rss_per_row};
    w.median_ms = med * 1e3;
    w.tokens_per_s = med > 0 ? (double)B * valid / med : NAN;
    w.flops = ef_model_flops(m, o->backward);
    /* ef_model_flops counts batch x max_len positions: for a shorter or padded call it would
     * overstate the work */
    w.gflops = med > 0 && valid == info.len ? w.flops / med / 1e9 : NAN;
    if (valid < info.len)
        fprintf(stderr,
                "eformer: note: GFLOP/s not reported: ef_model_flops counts max_len=%d positions "
                "per sequence, the steps had %d valid (set max_len to the length timed)\n",
                info.len, valid);
    w.attn_share = ms.total_seconds > 0 ? ms.attn_seconds / ms.total_seconds : NAN;
    double dense_s = (ms.total_seconds - ms.attn_seconds) / o->reps;
    w.dense_gflops = dense_s > 0 && valid == info.len
                         ? (w.flops - ef_model_attn_flops(m, o->backward)) / dense_s / 1e9
                         : NAN;
    w.loss = out.loss;
    w.rss_bytes = cli_peak_rss();
    print_model_row(R, &w);
done:
    free(tok);
    free(tgt);
    free(lens);
    free(u);
    free(times);
    ef_model_free(m);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * The command
 * ------------------------------------------------------------------------------------------- */
/* The standard sweep: exact attention at three lengths, then every other registered mechanism
 * with its defaults at 4096, so that a new mechanism shows up here without a change. */
static void run_sweep(bench_run *R) {
    static const char *const specs[] = {"full", "flash", "flash:causal=1"};
    static const int lens[] = {1024, 2048, 4096};
    const int both[2] = {1, 1};
    for (size_t s = 0; s < sizeof specs / sizeof specs[0]; s++)
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
            ef_attn_shape sh = {1, 8, lens[l], lens[l], 64, 64};
            if (bench_shape(R, specs[s], sh, both)) break;
        }
    for (int i = 0; i < ef_attn_count(); i++) {
        const char *name = ef_attn_name(i);
        if (strcmp(name, "full") == 0 || strcmp(name, "flash") == 0) continue;
        ef_attn_shape sh = {1, 8, 4096, 4096, 64, 64};
        bench_shape(R, name, sh, both);
    }
}

int cli_bench(int argc, char **argv) {
    enum {
        O_SPEC,
        O_BATCH,
        O_HEADS,
        O_LEN,
        O_KV,
        O_DIM,
        O_VDIM,
        O_BWD,
        O_REPS,
        O_WARM,
        O_THR,
        O_JSON,
        O_NOCHECK,
        O_SWEEP,
        O_MODEL,
        O_SEED,
        O_VALID,
        O_HELP,
        N_OPTS
    };
    cli_opt opts[N_OPTS] = {
        [O_SPEC] = {"spec", 1, NULL},        [O_BATCH] = {"batch", 1, NULL},
        [O_HEADS] = {"heads", 1, NULL},      [O_LEN] = {"len", 1, NULL},
        [O_KV] = {"kv-len", 1, NULL},        [O_DIM] = {"dim", 1, NULL},
        [O_VDIM] = {"v-dim", 1, NULL},       [O_BWD] = {"backward", 0, NULL},
        [O_REPS] = {"reps", 1, NULL},        [O_WARM] = {"warmup", 1, NULL},
        [O_THR] = {"threads", 1, NULL},      [O_JSON] = {"json", 0, NULL},
        [O_NOCHECK] = {"no-check", 0, NULL}, [O_SWEEP] = {"sweep", 0, NULL},
        [O_MODEL] = {"model", 1, NULL},      [O_SEED] = {"seed", 1, NULL},
        [O_VALID] = {"lens", 1, NULL},       [O_HELP] = {"help", 0, NULL},
    };
    int rc = cli_parse_opts("bench", argc, argv, 1, opts, N_OPTS);
    if (rc) return rc;
    if (opts[O_HELP].value) {
        cli_usage(stdout, "bench");
        return CLI_OK;
    }

    bench_opts o = {.batch = 1,
                    .heads = 8,
                    .dim = 64,
                    .lens = {1024},
                    .n_lens = 1,
                    .reps = 5,
                    .warmup = 1,
                    .check = 1,
                    .seed = 1}; /* v_dim 0 = dim, threads 0 = machine default */
    int sweep = opts[O_SWEEP].value != NULL, model = opts[O_MODEL].value != NULL;
    if (model) {
        static const struct {
            int opt;
            const char *why;
        } not_model[] = {
            {O_SPEC, "the model spec names its attention: attn=SPEC"},
            {O_SWEEP, "--sweep runs a fixed set of mechanisms"},
            {O_HEADS, "the model spec sets heads="},
            {O_DIM, "the model spec sets dim="},
            {O_VDIM, "the model spec sets dim="},
            {O_KV, "a model's attention is self-attention"},
            {O_NOCHECK, "a model is not checked against a reference"},
        };
        for (size_t i = 0; i < sizeof not_model / sizeof not_model[0]; i++)
            if (opts[not_model[i].opt].value)
                return cli_usage_error("bench", "bench: --model cannot be combined with --%s (%s)",
                                       opts[not_model[i].opt].name, not_model[i].why);
    } else {
        static const int only_model[] = {O_SEED, O_VALID};
        for (size_t i = 0; i < sizeof only_model / sizeof only_model[0]; i++)
            if (opts[only_model[i]].value)
                return cli_usage_error("bench", "bench: --%s applies to --model only",
                                       opts[only_model[i]].name);
        if (sweep) {
            static const int fixed[] = {O_SPEC, O_BATCH, O_HEADS, O_LEN,
                                        O_KV,   O_DIM,   O_VDIM,  O_BWD};
            for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
                if (opts[fixed[i]].value)
                    return cli_usage_error("bench",
                                           "bench: --sweep runs a fixed set of specs and shapes; "
                                           "it cannot be combined with --%s",
                                           opts[fixed[i]].name);
        } else if (!opts[O_SPEC].value) {
            return cli_usage_error("bench", "bench: --spec is required (or use --sweep or --model)");
        }
    }
    o.spec = opts[O_SPEC].value;
    const struct {
        int opt;
        long min, max;
        int *dst;
    } ints[] = {{O_BATCH, 1, INT_MAX, &o.batch}, {O_HEADS, 1, INT_MAX, &o.heads},
                {O_DIM, 1, INT_MAX, &o.dim},     {O_VDIM, 1, INT_MAX, &o.v_dim},
                {O_REPS, 1, 1000000, &o.reps},   {O_WARM, 0, 1000000, &o.warmup},
                {O_THR, 1, 4096, &o.threads},    {O_SEED, 0, INT_MAX, &o.seed},
                {O_VALID, 1, INT_MAX, &o.valid_len}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        const cli_opt *c = &opts[ints[i].opt];
        if (c->value &&
            (rc = cli_parse_int("bench", c->name, c->value, ints[i].min, ints[i].max, ints[i].dst)))
            return rc;
    }
    if (model && opts[O_LEN].value) {
        if (strchr(opts[O_LEN].value, ','))
            return cli_usage_error("bench", "bench: --model takes one --len, not a list ('%s')",
                                   opts[O_LEN].value);
        if ((rc = cli_parse_int("bench", "len", opts[O_LEN].value, 1, INT_MAX, &o.model_len)))
            return rc;
    } else if (opts[O_LEN].value &&
               (rc = cli_parse_int_list("bench", "len", opts[O_LEN].value, 1, INT_MAX, o.lens,
                                        MAX_LENS, &o.n_lens))) {
        return rc;
    }
    if (opts[O_KV].value && (rc = cli_parse_int_list("bench", "kv-len", opts[O_KV].value, 1,
                                                     INT_MAX, o.kv, MAX_LENS, &o.n_kv)))
        return rc;
    if (!o.v_dim) o.v_dim = o.dim;
    if (o.n_kv > 1 && o.n_kv != o.n_lens)
        return cli_usage_error("bench",
                               "bench: --kv-len has %d values but --len has %d (give one "
                               "kv-len for all, or one per len)",
                               o.n_kv, o.n_lens);
    o.backward = opts[O_BWD].value != NULL;
    o.json = opts[O_JSON].value != NULL;
    o.check = opts[O_NOCHECK].value == NULL;

    /* 0 = the machine default; set either way so that the BLAS is told too */
    ef_set_num_threads(o.threads);

    bench_run R;
    memset(&R, 0, sizeof R);
    R.o = &o;
    if (model) {
        o.model = opts[O_MODEL].value;
        return bench_model(&R);
    }
    if (sweep) {
        run_sweep(&R);
    } else {
        const int want[2] = {!o.backward, o.backward};
        for (int i = 0; i < o.n_lens; i++) {
            int kv = o.n_kv == 0 ? o.lens[i] : o.n_kv == 1 ? o.kv[0] : o.kv[i];
            ef_attn_shape sh = {o.batch, o.heads, o.lens[i], kv, o.dim, o.v_dim};
            if (bench_shape(&R, o.spec, sh, want)) break;
        }
    }
    if (R.rows == 0 && !R.failed) fprintf(stderr, "eformer: bench: nothing ran\n");
    return R.failed || R.rows == 0 ? CLI_FAIL : CLI_OK;
}
