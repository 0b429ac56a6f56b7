/*
 * harness.h - the tiny test harness every test executable uses.
 *
 * Each check prints one line: PASS/FAIL, its name, the measured value and the tolerance.
 * ef_test_finish() prints "N passed, M failed" and returns the process exit status
 * (non-zero when any check failed), so `return ef_test_finish();` ends main.
 */
#ifndef EF_HARNESS_H
#define EF_HARNESS_H

#include "eformer.h"

#include <stddef.h>
#include <stdint.h>

/* Passes when err <= tol (err NaN fails). */
int ef_check_err(const char *name, double err, double tol);
/* Passes when cond is true; `detail` says what was seen. */
int ef_check(const char *name, int cond, const char *detail_fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Passes when the status equals `want`; prints ef_last_error(). Also fails when a failing
 * status leaves ef_last_error() empty. */
int ef_check_status(const char *name, ef_status got, ef_status want);
int ef_test_finish(void);

/* Max |a-b| / (atol + rtol*|b|) style helpers: returns max_i |a_i - b_i|. */
double ef_max_abs_diff(const float *a, const float *b, size_t n);
/* max_i |a_i - b_i| / max(max_i |b_i|, 1e-2): error relative to the reference's scale (inputs
 * of the tests are O(1), so an all-zero reference is compared absolutely at 1e-2). */
double ef_max_rel_diff(const float *a, const float *b, size_t n);
/* Gaussian N(0, sigma^2) buffer from the library's counter-based generator (malloc'd). */
float *ef_test_randn(size_t n, uint64_t seed, float sigma);
float *ef_test_zeros(size_t n);

/* Inputs and outputs of one attention problem, shared by the mechanism tests.
 * Inputs are Gaussian: q and k with `sigma`, v and the output gradient g with sigma 1. */
typedef struct ef_test_bufs {
    ef_attn_shape s;
    size_t nq, nk, nv, no; /* element counts of q, k, v, out */
    float *q, *k, *v, *g;
    float *out, *dq, *dk, *dv; /* outputs (ef_test_outputs: zero-filled) */
    void *saved;
} ef_test_bufs;
void ef_test_inputs(ef_test_bufs *b, ef_attn_shape s, uint64_t seed, float sigma);
void ef_test_free_inputs(ef_test_bufs *b);
void ef_test_outputs(ef_test_bufs *o, const ef_test_bufs *in);
void ef_test_free_outputs(ef_test_bufs *o); /* frees and clears the output pointers */
/* Forward (saved buffer in o->saved) and, when backward, backward of plan a on in into o. */
ef_status ef_test_run_plan(ef_attn *a, const ef_test_bufs *in, const int32_t *kv_lens,
                           ef_test_bufs *o, int backward);
/* Creates the plan of `spec` for in->s, runs forward and backward into o, frees the plan. */
ef_status ef_test_run(const char *spec, const ef_test_bufs *in, const int32_t *kv_lens,
                      ef_test_bufs *o);
/* The same with query padding too (q_lens may be NULL). */
ef_status ef_test_run_plan_lens(ef_attn *a, const ef_test_bufs *in, const int32_t *kv_lens,
                                const int32_t *q_lens, ef_test_bufs *o, int backward);
ef_status ef_test_run_lens(const char *spec, const ef_test_bufs *in, const int32_t *kv_lens,
                           const int32_t *q_lens, ef_test_bufs *o);
/* 1 when any of the n values is NaN or infinite. */
int ef_test_any_nonfinite(const float *x, size_t n);
/* Spoils the padded rows i >= lens[b] of x [batch][heads][rows][w] (batch and heads from s):
 * mode 0 redraws them (Gaussian, sigma 3, from seed), 1 fills them with NaN, 2 with +Inf, 3 with
 * -Inf. */
void ef_test_spoil_rows(float *x, ef_attn_shape s, int rows, int w, const int32_t *lens, int mode,
                        uint64_t seed);
/* max |x| over the padded rows i >= lens[b] of x [batch][heads][rows][w]; +inf when one of them
 * is NaN (a padded row must be exactly zero, and fmax would skip a NaN). */
double ef_test_padded_max(const float *x, ef_attn_shape s, int rows, int w, const int32_t *lens);
/* A `saved` buffer for plan a (ef_malloc: EF_SAVED_ALIGN-aligned; at least 64 bytes, so never
 * NULL for a plan that saves nothing). Release with ef_free. */
void *ef_test_saved(const ef_attn *a);

/* The whole file at path (malloc'd, NUL-terminated after its *n bytes); NULL when it cannot be
 * opened or read. */
unsigned char *ef_test_read_file(const char *path, size_t *n);
/* Writes n bytes to path (replacing it); 0 on success, -1 on failure. */
int ef_test_write_file(const char *path, const void *b, size_t n);

#endif
