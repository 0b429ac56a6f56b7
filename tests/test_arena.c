/*
 * test_arena.c - `eformer arena` (tools/arena.c, tools/arena_core.c):
 *   - the exponent fit is exact on synthetic power laws and ignores what it must;
 *   - the exact attention the arena measures errors against agrees with a plain double-loop
 *     softmax (forward) and with central finite differences of it (gradients), bidirectional,
 *     causal and shared-QK;
 *   - structured inputs are what they claim (attention peaked near the diagonal plus a distant
 *     match), Gaussian ones are not;
 *   - with the eformer binary as argument: a small run gives flash at machine precision,
 *     well-formed complete CSV and JSON (cJSON), valid PNGs (libpng); a tiny --budget skips
 *     and marks lengths instead of failing; usage errors exit 2.
 */
#define _XOPEN_SOURCE 700

#include "../tools/arena.h"
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef EF_HAVE_CJSON
#include <cjson/cJSON.h>
#endif
#ifdef EF_HAVE_PNG
#include <png.h>
#endif

/* ---------------------------------------------------------------------------------------------
 * The fit
 * ------------------------------------------------------------------------------------------- */
static void test_slope(void) {
    double x[6] = {1024, 2048, 4096, 8192, 16384, 32768}, y[6];
    const double e[] = {1, 1.5, 2, 0.25, 1.15};
    for (size_t k = 0; k < sizeof e / sizeof e[0]; k++) {
        for (int i = 0; i < 6; i++) y[i] = 3.7e-4 * pow(x[i], e[k]);
        char name[64];
        snprintf(name, sizeof name, "slope of c N^%.2f", e[k]);
        ef_check_err(name, fabs(arena_slope(x, y, 6) - e[k]), 1e-12);
    }
    /* uneven lengths: still exact */
    double xu[4] = {100, 300, 1000, 7777}, yu[4];
    for (int i = 0; i < 4; i++) yu[i] = 2 * xu[i] * sqrt(xu[i]);
    ef_check_err("slope, uneven lengths", fabs(arena_slope(xu, yu, 4) - 1.5), 1e-12);
    /* points with y <= 0 or non-finite are left out */
    for (int i = 0; i < 6; i++) y[i] = pow(x[i], 2);
    y[1] = NAN, y[3] = 0;
    ef_check_err("slope ignores NaN and 0", fabs(arena_slope(x, y, 6) - 2), 1e-12);
    ef_check("slope of one point is NaN", isnan(arena_slope(x, y, 1)), "%g", arena_slope(x, y, 1));
    double xs[3] = {5, 5, 5}, ys[3] = {1, 2, 3};
    ef_check("slope over equal x is NaN", isnan(arena_slope(xs, ys, 3)), "%g",
             arena_slope(xs, ys, 3));
    /* least squares: noise around N^1 gives about 1 */
    for (int i = 0; i < 6; i++) y[i] = x[i] * (i % 2 ? 1.05 : 0.95);
    ef_check_err("slope of noisy N^1", fabs(arena_slope(x, y, 6) - 1), 0.03);
}

static void test_claims(void) {
    int n = ef_attn_count(), missing = 0;
    for (int i = 0; i < n; i++) {
        arena_claim c = arena_claim_of(ef_attn_name(i));
        if (!c.name || !c.family || !c.complexity || !(c.exponent >= 1)) missing++;
    }
    ef_check("every registered mechanism has the survey's claim", missing == 0, "%d missing",
             missing);
    ef_check("an unknown name has none", arena_claim_of("nosuch").name == NULL, "%s", "");
}

/* ---------------------------------------------------------------------------------------------
 * Exact attention against double loops
 * ------------------------------------------------------------------------------------------- */
/* out = softmax(scale q k^T) v in double for one (batch, head) slice. */
static void naive(int N, int D, int causal, int shared, double scale, const double *q,
                  const double *k, const double *v, double *out) {
    double *kk = malloc(sizeof(double) * (size_t)N * D), *p = malloc(sizeof(double) * (size_t)N);
    for (int j = 0; j < N; j++) {
        double ss = 0;
        for (int t = 0; t < D; t++) ss += q[j * D + t] * q[j * D + t];
        for (int t = 0; t < D; t++)
            kk[j * D + t] = shared ? (ss > 0 ? q[j * D + t] / sqrt(ss) : 0) : k[j * D + t];
    }
    for (int i = 0; i < N; i++) {
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < N; j++) {
            int vis = !(causal && j > i) && !(shared && j == i && !(causal && i == 0));
            double s = 0;
            for (int t = 0; t < D; t++) s += q[i * D + t] * kk[j * D + t];
            p[j] = vis ? scale * s : -INFINITY;
            if (p[j] > mx) mx = p[j];
        }
        for (int j = 0; j < N; j++) sum += p[j] = exp(p[j] - mx);
        for (int t = 0; t < D; t++) {
            double o = 0;
            for (int j = 0; j < N; j++) o += p[j] / sum * v[j * D + t];
            out[i * D + t] = o;
        }
    }
    free(kk), free(p);
}

static double loss(int N, int D, int causal, int shared, double scale, const double *q,
                   const double *k, const double *v, const double *g, double *tmp) {
    naive(N, D, causal, shared, scale, q, k, v, tmp);
    double l = 0;
    for (int i = 0; i < N * D; i++) l += tmp[i] * g[i];
    return l;
}

static double max_rel(const float *x, const double *ref, size_t n) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs(x[i] - ref[i])), s = fmax(s, fabs(ref[i]));
    return d / (s > 0 ? s : 1);
}

static void test_exact(int causal, int shared) {
    arena_shape sh = {2, 2, 37, 8};
    int N = sh.len, D = sh.dim;
    size_t hd = (size_t)N * D, n = 4 * hd;
    float *q = ef_test_randn(n, 11, 1.5f), *k = ef_test_randn(n, 12, 1.5f);
    float *v = ef_test_randn(n, 13, 1), *g = ef_test_randn(n, 14, 1);
    float *o = ef_test_zeros(n), *dq = ef_test_zeros(n), *dk = ef_test_zeros(n);
    float *dv = ef_test_zeros(n);
    double scale = 1 / sqrt((double)D);
    ef_status st = arena_exact(&sh, causal, shared, (float)scale, q, k, v, g, o, dq, dk, dv);
    char name[128];
    snprintf(name, sizeof name, "arena_exact runs (causal %d, shared_qk %d)", causal, shared);
    ef_check_status(name, st, EF_OK);
    double *Q = malloc(sizeof(double) * hd), *K = malloc(sizeof(double) * hd);
    double *V = malloc(sizeof(double) * hd), *G = malloc(sizeof(double) * hd);
    double *O = malloc(sizeof(double) * hd), *tmp = malloc(sizeof(double) * hd);
    double *dQ = malloc(sizeof(double) * hd), *dK = malloc(sizeof(double) * hd);
    double *dV = malloc(sizeof(double) * hd);
    double eo = 0, eq = 0, ek = 0, ev = 0;
    for (int b = 0; b < 4; b++) {
        size_t off = (size_t)b * hd;
        for (size_t i = 0; i < hd; i++)
            Q[i] = q[off + i], K[i] = k[off + i], V[i] = v[off + i], G[i] = g[off + i];
        naive(N, D, causal, shared, scale, Q, K, V, O);
        eo = fmax(eo, max_rel(o + off, O, hd));
        /* central differences of L = sum out . g (double; h relative to the entries' size) */
        double *X[3] = {Q, K, V}, *dX[3] = {dQ, dK, dV};
        for (int t = 0; t < 3; t++)
            for (size_t i = 0; i < hd; i++) {
                double x0 = X[t][i], h = 1e-5 * fmax(1, fabs(x0));
                X[t][i] = x0 + h;
                double lp = loss(N, D, causal, shared, scale, Q, K, V, G, tmp);
                X[t][i] = x0 - h;
                double lm = loss(N, D, causal, shared, scale, Q, K, V, G, tmp);
                X[t][i] = x0;
                dX[t][i] = (lp - lm) / (2 * h);
            }
        eq = fmax(eq, max_rel(dq + off, dQ, hd));
        if (!shared) ek = fmax(ek, max_rel(dk + off, dK, hd));
        ev = fmax(ev, max_rel(dv + off, dV, hd));
    }
    const char *tag = shared ? (causal ? "causal shared-QK" : "shared-QK")
                             : (causal ? "causal" : "bidirectional");
    snprintf(name, sizeof name, "arena_exact out vs double loops (%s)", tag);
    ef_check_err(name, eo, 1e-5);
    snprintf(name, sizeof name, "arena_exact dq vs finite differences (%s)", tag);
    ef_check_err(name, eq, 1e-4);
    if (!shared) {
        snprintf(name, sizeof name, "arena_exact dk vs finite differences (%s)", tag);
        ef_check_err(name, ek, 1e-4);
    }
    snprintf(name, sizeof name, "arena_exact dv vs finite differences (%s)", tag);
    ef_check_err(name, ev, 1e-4);
    free(Q), free(K), free(V), free(G), free(O), free(tmp), free(dQ), free(dK), free(dV);
    free(q), free(k), free(v), free(g), free(o), free(dq), free(dk), free(dv);
}

static void test_rel_err(void) {
    float a[3] = {3, 4, 0}, b[3] = {3, 4, 0}, c[3] = {0, 0, 0}, d[3] = {3, 4, NAN};
    ef_check_err("rel_err of equal tensors", arena_rel_err(a, b, 3), 0);
    ef_check_err("rel_err of 0 against x is 1", fabs(arena_rel_err(c, a, 3) - 1), 1e-15);
    ef_check("rel_err with NaN is NaN", isnan(arena_rel_err(d, a, 3)), "%s", "");
}

/* ---------------------------------------------------------------------------------------------
 * Structured inputs
 * ------------------------------------------------------------------------------------------- */
/* Of exact attention's probability per query (averaged): the mass within `w` positions of the
 * diagonal, and the largest single probability farther away. */
static void peakedness(const arena_shape *sh, int causal, const float *q, const float *k,
                       double w, double *near, double *far_max) {
    int N = sh->len, D = sh->dim;
    double *p = malloc(sizeof(double) * (size_t)N), sn = 0, sf = 0;
    double scale = 1 / sqrt((double)D);
    for (int i = 1; i < N; i++) {
        double mx = -INFINITY, sum = 0;
        int M = causal ? i + 1 : N;
        for (int j = 0; j < M; j++) {
            double s = 0;
            for (int t = 0; t < D; t++) s += (double)q[i * D + t] * k[j * D + t];
            p[j] = scale * s;
            mx = fmax(mx, p[j]);
        }
        for (int j = 0; j < M; j++) sum += p[j] = exp(p[j] - mx);
        double nm = 0, fm = 0;
        for (int j = 0; j < M; j++) {
            if (fabs((double)i - j) <= w)
                nm += p[j] / sum;
            else
                fm = fmax(fm, p[j] / sum);
        }
        sn += nm, sf += fm;
    }
    *near = sn / (N - 1), *far_max = sf / (N - 1);
    free(p);
}

static void test_structured(void) {
    arena_shape sh = {1, 1, 1024, 64};
    size_t n = (size_t)sh.len * sh.dim;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *g = malloc(n * 4);
    for (int causal = 0; causal <= 1; causal++) {
        ef_check_status("structured inputs made", arena_structured(&sh, causal, 8, 10, 7, q, k, v, g),
                        EF_OK);
        double near, far;
        peakedness(&sh, causal, q, k, 24, &near, &far);
        char name[96];
        snprintf(name, sizeof name, "structured%s: mass within 24 positions >= 0.3",
                 causal ? " causal" : "");
        ef_check(name, near >= 0.3, "%.3f", near);
        snprintf(name, sizeof name, "structured%s: the distant match gets >= 0.1", causal ? " causal" : "");
        ef_check(name, far >= 0.1, "%.3f", far);
        int finite = 1;
        for (size_t i = 0; i < n; i++) finite &= isfinite(q[i]) && isfinite(k[i]) && isfinite(v[i]);
        snprintf(name, sizeof name, "structured%s inputs are finite", causal ? " causal" : "");
        ef_check(name, finite, "%s", "");
    }
    arena_gaussian(&sh, 7, q, k, v, g);
    double near, far;
    peakedness(&sh, 0, q, k, 24, &near, &far);
    ef_check("gaussian: diffuse (mass within 24 positions < 0.1, no key over 0.1)",
             near < 0.1 && far < 0.1, "near %.3f, far %.3f", near, far);
    free(q), free(k), free(v), free(g);
}

/* ---------------------------------------------------------------------------------------------
 * The command
 * ------------------------------------------------------------------------------------------- */
static char *slurp(const char *path, size_t *len) { /* the harness's reader, as text */
    size_t n;
    char *s = (char *)ef_test_read_file(path, &n);
    if (len) *len = n;
    return s;
}

/* Splits one CSV line (quoted fields, "" inside quotes) into at most cap fields (copied into
 * buf); returns the field count, -1 if malformed. */
static int csv_fields(const char *line, char fields[][256], int cap) {
    int n = 0;
    const char *p = line;
    for (;;) {
        if (n >= cap) return -1;
        size_t w = 0;
        if (*p == '"') {
            p++;
            for (;;) {
                if (!*p) return -1;
                if (*p == '"' && p[1] == '"') p++;
                else if (*p == '"') break;
                if (w < 255) fields[n][w++] = *p;
                p++;
            }
            p++;
        } else
            while (*p && *p != ',' && *p != '\n') {
                if (w < 255) fields[n][w++] = *p;
                p++;
            }
        fields[n++][w] = 0;
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p == '\n' || !*p) return n;
        return -1;
    }
}

static int png_ok(const char *path, unsigned *w, unsigned *h) {
    *w = *h = 0;
#ifdef EF_HAVE_PNG
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&im, path)) return 0;
    im.format = PNG_FORMAT_RGBA;
    size_t sz = PNG_IMAGE_SIZE(im);
    void *buf = malloc(sz);
    int ok = buf && png_image_finish_read(&im, NULL, buf, 0, NULL);
    *w = im.width, *h = im.height;
    free(buf);
    png_image_free(&im);
    return ok;
#else
    unsigned char sig[8];
    FILE *f = fopen(path, "rb");
    int ok = f && fread(sig, 1, 8, f) == 8 && !memcmp(sig, "\x89PNG\r\n\x1a\n", 8);
    if (f) fclose(f);
    *w = *h = ok;
    return ok;
#endif
}

static int run(const char *cmd) {
    int st = system(cmd);
    return st == -1 ? -1 : WEXITSTATUS(st);
}

static void test_cli(const char *eformer) {
    char dir[] = "/tmp/ef_arena_XXXXXX";
    if (!mkdtemp(dir)) {
        ef_check("a temporary folder", 0, "mkdtemp failed");
        return;
    }
    char cmd[2048], path[512];
    const char *specs =
        "flash;flash:precision=bf16;local:window=32;performer:features=32;lsh;linformer:k=16;"
        "strided:block=auto";
    int n_specs = 7, n_lens = 2, n_inputs = 2;
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs '%s' --lens 96,192 --heads 2 --dim 16 --reps 2 --out %s/a "
             "--threads 2 >%s/out.txt 2>%s/err.txt",
             eformer, specs, dir, dir, dir);
    int st = run(cmd);
    ef_check("arena small run exits 0", st == 0, "status %d", st);

    /* CSV: header + one record per (length, spec, input), all with the header's field count */
    snprintf(path, sizeof path, "%s/a/results.csv", dir);
    size_t len;
    char *csv = slurp(path, &len);
    ef_check("results.csv exists", csv != NULL, "%s", path);
    static char fields[64][256];
    int rows = 0, bad = 0, ncol = -1, flash_rows = 0, bf16_rows = 0;
    double flash_worst = 0, bf16_worst = 0, bf16_least = INFINITY;
    int c_mech = -1, c_status = -1, c_err[4] = {-1, -1, -1, -1}, c_fwd = -1, c_spec = -1;
    for (char *line = csv; line && *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) {
            bad++;
            break;
        }
        *nl = 0;
        int n = csv_fields(line, fields, 64);
        if (ncol < 0) {
            ncol = n;
            for (int i = 0; i < n; i++) {
                if (!strcmp(fields[i], "mechanism")) c_mech = i;
                if (!strcmp(fields[i], "spec")) c_spec = i;
                if (!strcmp(fields[i], "status")) c_status = i;
                if (!strcmp(fields[i], "fwd_s")) c_fwd = i;
                static const char *const ek[] = {"err_out", "err_dq", "err_dk", "err_dv"};
                for (int t = 0; t < 4; t++)
                    if (!strcmp(fields[i], ek[t])) c_err[t] = i;
            }
        } else {
            rows++;
            if (n != ncol) bad++;
            else if (c_mech >= 0 && c_spec >= 0 && !strcmp(fields[c_mech], "flash") &&
                     strstr(fields[c_spec], "precision=bf16")) {
                /* the canonical spec tells bf16 flash from flash */
                bf16_rows++;
                if (strcmp(fields[c_status], "ok")) bad++;
                for (int t = 0; t < 4; t++) {
                    double e = c_err[t] >= 0 && fields[c_err[t]][0] ? atof(fields[c_err[t]]) : NAN;
                    bf16_worst = isnan(e) || isnan(bf16_worst) ? NAN : fmax(bf16_worst, e);
                    bf16_least = isnan(e) ? NAN : fmin(bf16_least, e);
                }
            } else if (c_mech >= 0 && !strcmp(fields[c_mech], "flash")) {
                flash_rows++;
                if (strcmp(fields[c_status], "ok")) bad++;
                for (int t = 0; t < 4; t++) {
                    double e = c_err[t] >= 0 && fields[c_err[t]][0] ? atof(fields[c_err[t]]) : NAN;
                    flash_worst = isnan(e) || isnan(flash_worst) ? NAN : fmax(flash_worst, e);
                }
                if (c_fwd < 0 || !(atof(fields[c_fwd]) > 0)) bad++;
            }
        }
        line = nl + 1;
    }
    ef_check("results.csv: a record per length, spec and input, every one complete",
             rows == n_lens * n_specs * n_inputs && bad == 0 && ncol >= 20,
             "%d rows (want %d), %d bad, %d columns", rows, n_lens * n_specs * n_inputs, bad,
             ncol);
    ef_check("results.csv: flash has its records", flash_rows == n_lens * n_inputs, "%d",
             flash_rows);
    /* flash against the independent exact attention: fp32 rounding only */
    ef_check_err("flash's error against exact attention (out, dq, dk, dv, both inputs)",
                 flash_worst, 1e-5);
    /* bf16 products: bf16's rounding (tests/test_bf16.c: at most 1e-2 forward, 2e-2 gradients),
     * and well above fp32's, so the bf16 kernel really ran */
    ef_check("results.csv: flash:precision=bf16 has its records", bf16_rows == n_lens * n_inputs,
             "%d", bf16_rows);
    ef_check_err("flash:precision=bf16's error against exact attention (worst of all)", bf16_worst,
                 2e-2);
    ef_check("flash:precision=bf16's error is bf16's, not fp32's (least of all > 1e-4)",
             bf16_least > 1e-4, "%.3g", bf16_least);
    free(csv);
    snprintf(path, sizeof path, "%s/out.txt", dir);
    char *table = slurp(path, NULL);
    ef_check("the survey's table has a flash-bf16 row", table && strstr(table, "\nflash-bf16 "),
             "%s", table ? "" : "no out.txt");
    free(table);

#ifdef EF_HAVE_CJSON
    snprintf(path, sizeof path, "%s/a/results.json", dir);
    char *js = slurp(path, NULL);
    cJSON *root = js ? cJSON_Parse(js) : NULL;
    ef_check("results.json parses", root != NULL, "%s", path);
    if (root) {
        cJSON *recs = cJSON_GetObjectItem(root, "records");
        int nrec = cJSON_GetArraySize(recs), complete = 0;
        static const char *const keys[] = {"machine", "compiler", "threads", "sgemm_gflops",
                                           "spec", "mechanism", "input", "len", "status",
                                           "fwd_s", "fwdbwd_s", "err_out", "err_dq", "err_dk",
                                           "err_dv", "workspace_bytes", "rss_bytes"};
        cJSON *r;
        cJSON_ArrayForEach(r, recs) {
            int ok = 1;
            for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
                ok &= cJSON_GetObjectItem(r, keys[i]) != NULL;
            cJSON *sg = cJSON_GetObjectItem(r, "sgemm_gflops");
            ok &= cJSON_IsNumber(sg) && sg->valuedouble > 0;
            complete += ok;
        }
        ef_check("results.json: every record complete (machine, threads, sgemm, ...)",
                 nrec == n_lens * n_specs * n_inputs && complete == nrec, "%d of %d", complete,
                 nrec);
        cJSON_Delete(root);
    }
    free(js);
#else
    printf("SKIP results.json parsing: built without cJSON\n");
#endif

    /* the plots and the report */
    static const char *const pngs[] = {"time.png", "memory.png", "error_vs_speedup.png"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/a/%s", dir, pngs[i]);
        unsigned w, h;
        int ok = png_ok(path, &w, &h);
        char name[96];
        snprintf(name, sizeof name, "%s is a valid PNG", pngs[i]);
        ef_check(name, ok && w > 0 && h > 0, "%ux%u", w, h);
    }
    snprintf(path, sizeof path, "%s/a/report.md", dir);
    char *rep = slurp(path, NULL);
    ef_check("report.md has the table and embeds the plots",
             rep && strstr(rep, "| mechanism |") && strstr(rep, "](time.png)") &&
                 strstr(rep, "](error_vs_speedup.png)"),
             "%s", "");
    ef_check("report.md labels block=auto as strided-auto and bf16 as flash-bf16",
             rep && strstr(rep, "| strided-auto |") && strstr(rep, "| flash-bf16 |"), "%s", "");
    free(rep);
    snprintf(path, sizeof path, "%s/out.txt", dir);
    char *out = slurp(path, NULL);
    int w100 = 1, in_table = 0; /* the table: from its header line to the first empty one */
    for (char *l = out; l && *l;) {
        size_t n = strcspn(l, "\n");
        if (!strncmp(l, "mechanism ", 10)) in_table = 1;
        if (n == 0) in_table = 0;
        if (in_table && n > 100) w100 = 0;
        l += n + (l[n] == '\n');
    }
    ef_check("the printed table fits 100 columns", out && strstr(out, "mechanism") && w100, "%s", "");
    free(out);

    /* a tiny budget: the second length is predicted over it, skipped and marked, exit 0 */
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs 'flash;local' --lens 64,128,256 --heads 1 --dim 8 --reps 1 "
             "--budget 0.000001 --inputs gaussian --no-plots --out %s/b >/dev/null 2>&1",
             eformer, dir);
    st = run(cmd);
    ef_check("arena with a tiny budget exits 0", st == 0, "status %d", st);
    snprintf(path, sizeof path, "%s/b/results.csv", dir);
    csv = slurp(path, NULL);
    int skipped = 0, okrows = 0;
    for (char *p = csv; p && (p = strstr(p, "\"skipped-time\"")); p++) skipped++;
    for (char *p = csv; p && (p = strstr(p, "\"ok\"")); p++) okrows++;
    ef_check("tiny budget: the first length runs, the others are marked skipped-time",
             okrows == 2 && skipped == 4, "%d ok, %d skipped", okrows, skipped);
    free(csv);

    /* a memory budget below the inputs: every cell marked, still exit 0 */
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs flash --lens 64 --heads 1 --dim 8 --reps 1 --mem-budget "
             "0.000001 --inputs gaussian --no-plots --out %s/c >/dev/null 2>&1",
             eformer, dir);
    st = run(cmd);
    snprintf(path, sizeof path, "%s/c/results.csv", dir);
    csv = slurp(path, NULL);
    ef_check("tiny memory budget: marked skipped-memory, exit 0",
             st == 0 && csv && strstr(csv, "\"skipped-memory\""), "status %d", st);
    free(csv);

    /* --causal adds causal=1 to a spec whose only "causal" is reformer_causal= */
    snprintf(cmd, sizeof cmd,
             "'%s' arena --causal --specs 'lsh:reformer_causal=1,chunk=16' --lens 64 --heads 1 "
             "--dim 8 --reps 1 --inputs gaussian --no-plots --out %s/r >/dev/null 2>&1",
             eformer, dir);
    st = run(cmd);
    snprintf(path, sizeof path, "%s/r/results.csv", dir);
    csv = slurp(path, NULL);
    ef_check("--causal: lsh:reformer_causal=1 runs with causal=1 added",
             st == 0 && csv && strstr(csv, "reformer_causal=1,causal=1,") &&
                 strstr(csv, "\"ok\""),
             "status %d", st);
    free(csv);

    /* usage errors: exit status 2 */
    const char *bad_args[] = {"--specs nosuch", "--lens 128,64", "--inputs bogus",
                              "--inputs gaussian,gaussian", "--budget -1", "--dim 0"};
    for (size_t i = 0; i < sizeof bad_args / sizeof bad_args[0]; i++) {
        snprintf(cmd, sizeof cmd, "'%s' arena %s --out %s/d >/dev/null 2>&1", eformer,
                 bad_args[i], dir);
        st = run(cmd);
        char name[128];
        snprintf(name, sizeof name, "arena %s: exit status 2", bad_args[i]);
        ef_check(name, st == 2, "status %d", st);
    }
    /* model inputs: a tiny trained model's layer 1; its rows end at the task's 16 positions */
    snprintf(cmd, sizeof cmd,
             "cd %s && '%s' train --task dup:len=16,symbols=4 --model "
             "layers=2,dim=16,heads=2,attn=flash:causal=1 --steps 5 --warmup 1 --batch 2 "
             "--save m.st --threads 1 >/dev/null 2>&1",
             dir, eformer);
    st = run(cmd);
    ef_check("a tiny model to capture from", st == 0, "status %d", st);
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs 'flash;local:window=4' --lens 8,16,32 --batch 2 --causal "
             "--layer 1 --inputs model:%s/m.st,gaussian --reps 1 --no-plots --out %s/e "
             ">/dev/null 2>&1",
             eformer, dir, dir);
    st = run(cmd);
    ef_check("arena --inputs model:FILE exits 0", st == 0, "status %d", st);
    snprintf(path, sizeof path, "%s/e/results.csv", dir);
    csv = slurp(path, NULL);
    int model_rows = 0, model_ok = 0, model_empty = 0;
    double model_worst = 0;
    for (char *line = csv; line && *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) break;
        *nl = 0;
        int n = csv_fields(line, fields, 64);
        if (n == ncol && !strcmp(fields[7], "model") && !strcmp(fields[5], "flash")) {
            model_rows++;
            int len = atoi(fields[10]);
            if (len <= 16 && fields[c_err[0]][0]) {
                model_ok++;
                for (int t = 0; t < 4; t++) model_worst = fmax(model_worst, atof(fields[c_err[t]]));
            }
            if (len == 32 && !fields[c_err[0]][0]) model_empty++;
        }
        line = nl + 1;
    }
    ef_check("model inputs: flash records at 8, 16 (errors) and 32 (none: past the rows)",
             model_rows == 3 && model_ok == 2 && model_empty == 1, "%d rows, %d ok, %d empty",
             model_rows, model_ok, model_empty);
    ef_check_err("model inputs: flash's error against exact attention",
                 model_ok ? model_worst : NAN, 1e-5);
    free(csv);
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs flash --lens 8 --heads 3 --inputs model:%s/m.st --out %s/f "
             ">/dev/null 2>&1", eformer, dir, dir);
    st = run(cmd);
    ef_check("model inputs with other --heads: exit status 2", st == 2, "status %d", st);
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs flash --lens 8 --inputs model:%s/nothing.st --out %s/f "
             ">/dev/null 2>&1", eformer, dir, dir);
    st = run(cmd);
    ef_check("model inputs from a missing file: exit status 1", st == 1, "status %d", st);

    /* --quality: two mechanisms trained for about a second each on a tiny task */
    snprintf(cmd, sizeof cmd,
             "'%s' arena --specs 'flash;local:window=8;linformer' --lens 32 --heads 1 --dim 8 "
             "--reps 1 --inputs gaussian --quality dup:len=32,symbols=4 --minutes 0.02 "
             "--quality-model layers=1,dim=16,heads=2 --out %s/g --threads 1 >%s/q.txt 2>&1",
             eformer, dir, dir);
    st = run(cmd);
    ef_check("arena --quality exits 0", st == 0, "status %d", st);
    snprintf(path, sizeof path, "%s/g/quality.csv", dir);
    csv = slurp(path, NULL);
    int qrows = 0, qok = 0, qrefused = 0;
    for (char *line = csv ? strchr(csv, '\n') : NULL; line && line[1];) {
        char *nl = strchr(line + 1, '\n');
        if (!nl) break;
        *nl = 0;
        int n = csv_fields(line + 1, fields, 64);
        qrows++;
        /* columns: ...,mechanism(5),spec,ok(7),note,steps(9),tokens_per_s,loss,acc(12),bpb,seconds */
        if (n == 15 && !strcmp(fields[7], "1") && atof(fields[9]) >= 1 && fields[12][0] &&
            atof(fields[12]) >= 0 && atof(fields[12]) <= 1)
            qok++;
        if (n == 15 && !strcmp(fields[5], "linformer") && !strcmp(fields[7], "0") &&
            strstr(fields[8], "causal"))
            qrefused++;
        *nl = '\n';
        line = nl;
    }
    ef_check("quality.csv: flash and local trained and evaluated, linformer refused (no causal)",
             qrows == 3 && qok == 2 && qrefused == 1, "%d rows, %d ok, %d refused", qrows, qok,
             qrefused);
    free(csv);
    snprintf(path, sizeof path, "%s/g/quality.png", dir);
    unsigned qw = 0, qh = 0;
    ef_check("quality.png is a valid PNG", png_ok(path, &qw, &qh) && qw > 0, "%ux%u", qw, qh);
    snprintf(cmd, sizeof cmd, "'%s' arena --minutes 1 --out %s/h >/dev/null 2>&1", eformer, dir);
    st = run(cmd);
    ef_check("--minutes without --quality: exit status 2", st == 2, "status %d", st);
    snprintf(cmd, sizeof cmd, "'%s' arena --quality nosuch --out %s/h >/dev/null 2>&1", eformer,
             dir);
    st = run(cmd);
    ef_check("--quality with an unknown task: exit status 2", st == 2, "status %d", st);

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (run(cmd) != 0) printf("note: could not remove %s\n", dir);
}

int main(int argc, char **argv) {
    test_slope();
    test_claims();
    test_rel_err();
    for (int shared = 0; shared <= 1; shared++)
        for (int causal = 0; causal <= 1; causal++) test_exact(causal, shared);
    test_structured();
    char *bin = argc > 1 ? realpath(argv[1], NULL) : NULL; /* the test changes folder */
    if (argc > 1 && !bin) printf("FAIL: %s not found\n", argv[1]);
    if (bin)
        test_cli(bin);
    else
        printf("SKIP the command's checks: run as test_arena /path/to/eformer\n");
    free(bin);
    return argc > 1 && !bin ? 1 : ef_test_finish();
}
