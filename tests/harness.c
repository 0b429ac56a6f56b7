/* harness.c - see harness.h. */
#include "harness.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail;

static int record(int ok) {
    if (ok) n_pass++;
    else n_fail++;
    return ok;
}

int ef_check_err(const char *name, double err, double tol) {
    int ok = err <= tol; /* NaN compares false: fails */
    printf("%s  %-60s err %.3e  tol %.1e\n", ok ? "PASS" : "FAIL", name, err, tol);
    return record(ok);
}

int ef_check(const char *name, int cond, const char *fmt, ...) {
    char buf[512] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
    }
    printf("%s  %-60s %s\n", cond ? "PASS" : "FAIL", name, buf);
    return record(cond);
}

int ef_check_status(const char *name, ef_status got, ef_status want) {
    const char *msg = ef_last_error();
    int ok = got == want && (got == EF_OK || (msg && msg[0]));
    printf("%s  %-60s %s (want %s)%s%s\n", ok ? "PASS" : "FAIL", name, ef_status_str(got),
           ef_status_str(want), got != EF_OK ? ": " : "", got != EF_OK ? msg : "");
    return record(ok);
}

int ef_test_finish(void) {
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

double ef_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d) return INFINITY;
        if (d > m) m = d;
    }
    return m;
}

double ef_max_rel_diff(const float *a, const float *b, size_t n) {
    double scale = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)b[i]));
    /* floor: a reference that is exactly zero (dq and dk when a row sees a single key: P = 1 and
     * dS = P (dP - delta) cancels exactly in double, to ~1e-7 in fp32) is compared absolutely at
     * the 1e-2 scale rather than divided by zero; test inputs and gradients are O(0.1..1) */
    return ef_max_abs_diff(a, b, n) / fmax(scale, 1e-2);
}

float *ef_test_randn(size_t n, uint64_t seed, float sigma) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    ef_rng_normal(seed, 0, 0, n, p);
    for (size_t i = 0; i < n; i++) p[i] *= sigma;
    return p;
}

float *ef_test_zeros(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}
