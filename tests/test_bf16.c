/*
 * test_bf16.c - `flash:precision=bf16` (src/attn/flash_bf16.c): bf16 products with fp32
 * accumulation, forward and backward, against the double-precision reference (ref=1), the
 * AVX512-BF16 kernel against its fp32 emulation (EF_BF16=emulate), causal masking, key and
 * query padding (NaN in padding is never read), odd N and D, thread-count determinism and the
 * refusals.
 *
 * Tolerance against the reference (relative Frobenius error |x - ref|_F / |ref|_F, as the
 * arena reports it). bf16 keeps 8 significant bits: rounding to nearest has a relative error
 * of at most u = 2^-9 = 1.95e-3, uniform, so of rms u/sqrt(3) = 1.1e-3. Forward, each output
 * O_i = sum_j P_ij V_j carries the rounding of V_j and P_ij (two roundings) and the error of
 * the logit s_ij = sum_t q_t k_t, whose D products each carry two roundings: with Gaussian
 * inputs the logit's error is ~ sqrt(2) u/sqrt(3) |s_ij|-sized, about 1.6e-3 for logits of
 * order 1, and passes to P_ij relatively. Independent errors add in quadrature: about
 * sqrt(2 + 2) x 1.1e-3 = 2.3e-3 relative per output, which the Frobenius norm averages (a
 * measured 2e-3 to 3e-3). We accept 1e-2 = 5u forward, a margin of 3-4 over the estimate and
 * far below the error of order 1 a wrong mask, pairing or tile edge gives. Backward chains one
 * more rounded product (dP = dO V^T, each operand rounded) and the difference dP - delta, in
 * which the cancelled part keeps its absolute error: measured 3e-3 to 6e-3; we accept 2e-2.
 * The error must also be *above* 1e-4: fp32 flash is at 1e-7 to 1e-6 here, so an error
 * under 1e-4 would mean the products did not run in bf16.
 *
 * Native against emulation: both round the same fp32 values to the same bf16 values and
 * accumulate the same exact products in the same order (vdpbf16ps adds the odd element's
 * product first, then the even one's, each rounded to fp32: measured on Zen 4 and what
 * Intel's SDM states), so they agree bitwise; we allow fp32 accumulation-order rounding, the
 * tolerances of flash against full (2e-5 forward, 1e-4 backward, max relative), in case a CPU
 * rounds the pair's two additions once.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "harness.h"

#include "attn/flash_bf16.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ef_test_bufs bufs;

#define TOL_FWD 1e-2
#define TOL_BWD 2e-2
#define FLOOR 1e-4 /* an error below this is not bf16's: the bf16 path did not run */

static double rel_frob(const float *x, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - ref[i];
        num += d * d, den += (double)ref[i] * ref[i];
    }
    if (!isfinite(num) || !isfinite(den)) return NAN;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Runs spec with EF_BF16 set to env (NULL: unset) for the plan's creation. */
static ef_status run_env(const char *spec, const char *env, const bufs *in, const int32_t *kl,
                         const int32_t *ql, bufs *o, int *native) {
    if (env)
        setenv("EF_BF16", env, 1);
    else
        unsetenv("EF_BF16");
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    unsetenv("EF_BF16");
    if (st) return st;
    if (native) *native = ef_bf16_native(a);
    st = ef_test_run_plan_lens(a, in, kl, ql, o, 1);
    ef_attn_free(a);
    return st;
}

/* bf16 (native where the CPU has it, and emulated) against the double reference. */
static void versus_reference(const char *label, ef_attn_shape s, const char *opts,
                             const int32_t *kl, const int32_t *ql) {
    char spec[200], rspec[200], name[300];
    snprintf(spec, sizeof spec, "flash:precision=bf16%s", opts);
    snprintf(rspec, sizeof rspec, "flash:ref=1%s", opts);
    bufs in, rf, nat, emu;
    ef_test_inputs(&in, s, 500 + (uint64_t)s.q_len * 3 + s.head_dim, 1.0f);
    ef_test_outputs(&rf, &in), ef_test_outputs(&nat, &in), ef_test_outputs(&emu, &in);
    int native = 0;
    ef_status st0 = ef_test_run_lens(rspec, &in, kl, ql, &rf);
    ef_status st1 = run_env(spec, NULL, &in, kl, ql, &nat, &native);
    ef_status st2 = run_env(spec, "emulate", &in, kl, ql, &emu, NULL);
    snprintf(name, sizeof name, "%s: reference, bf16 (%s) and emulated bf16 run", label,
             native ? "AVX512-BF16" : "emulated: the CPU has no AVX512-BF16");
    if (ef_check(name, !st0 && !st1 && !st2, "%s / %s / %s: %s", ef_status_str(st0),
                 ef_status_str(st1), ef_status_str(st2), ef_last_error())) {
        const char *what[4] = {"out", "dq", "dk", "dv"};
        float *xs[2][4] = {{nat.out, nat.dq, nat.dk, nat.dv}, {emu.out, emu.dq, emu.dk, emu.dv}};
        float *rs[4] = {rf.out, rf.dq, rf.dk, rf.dv};
        size_t ns[4] = {in.no, in.nq, in.nk, in.nv};
        for (int k = 0; k < 2; k++)
            for (int t = 0; t < 4; t++) {
                double e = rel_frob(xs[k][t], rs[t], ns[t]);
                snprintf(name, sizeof name, "%s: %s%s vs double reference (rel. Frobenius)", label,
                         k ? "emulated " : "", what[t]);
                ef_check_err(name, e, t ? TOL_BWD : TOL_FWD);
                /* a reference that is all zero (every row padded) has no error to see */
                int zero_ref = 1;
                for (size_t i = 0; i < ns[t] && zero_ref; i++) zero_ref = rs[t][i] == 0;
                if (!zero_ref) {
                    snprintf(name, sizeof name, "%s: %s%s error above fp32's (bf16 really ran)",
                             label, k ? "emulated " : "", what[t]);
                    ef_check(name, e > FLOOR, "%.3g (want > %g)", e, FLOOR);
                }
            }
        /* native and emulated: same rounding, same exact products, same order */
        if (native)
            for (int t = 0; t < 4; t++) {
                double e = ef_max_rel_diff(xs[0][t], xs[1][t], ns[t]);
                snprintf(name, sizeof name,
                         "%s: %s AVX512-BF16 vs emulation (max rel.; 0 = bitwise)", label, what[t]);
                ef_check_err(name, e, t ? 1e-4 : 2e-5);
            }
    }
    ef_test_free_outputs(&rf), ef_test_free_outputs(&nat), ef_test_free_outputs(&emu);
    ef_test_free_inputs(&in);
}

static void shapes(void) {
    struct {
        int b, h, n, m, d, e;
    } cases[] = {
        {1, 2, 256, 256, 64, 64}, /* the benchmark's head dim */
        {1, 1, 1, 1, 1, 1},       {1, 1, 1, 5, 8, 8},         {2, 2, 7, 7, 3, 5},
        {1, 1, 65, 65, 16, 16},   {2, 1, 127, 129, 33, 17},   {1, 3, 200, 70, 64, 64},
        {1, 1, 70, 200, 64, 64},  {1, 1, 130, 130, 128, 128}, {1, 1, 96, 80, 256, 256},
        {1, 1, 50, 90, 100, 1},   {1, 1, 33, 260, 1, 48},
    };
    const char *optsets[] = {"", ",causal=1", ",causal=1,scale=0.3"};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t o = 0; o < sizeof optsets / sizeof optsets[0]; o++) {
            ef_attn_shape s = {cases[c].b, cases[c].h, cases[c].n,
                               cases[c].m, cases[c].d, cases[c].e};
            /* one key of head dim 1 with a unit query: nothing for bf16 to get wrong beyond
             * rounding v, whose error can be exactly 0; the small cases run causal only */
            if (s.q_len * s.kv_len < 64 && o != 1) continue;
            char label[160];
            snprintf(label, sizeof label, "B%d H%d N%d M%d D%d E%d%s", s.batch, s.heads, s.q_len,
                     s.kv_len, s.head_dim, s.v_dim, optsets[o]);
            versus_reference(label, s, optsets[o], NULL, NULL);
        }
}

static void padding(void) {
    ef_attn_shape s = {4, 2, 130, 97, 24, 40};
    int32_t kl[4] = {97, 30, 1, 97}, ql[4] = {130, 64, 129, 0};
    versus_reference("padding kv_lens={97,30,1,97} q_lens={130,64,129,0}", s, "", kl, ql);
    versus_reference("padding kv_lens={97,30,1,97} q_lens={130,64,129,0} causal", s, ",causal=1",
                     kl, ql);
}

/* Padding is never read: NaN (mode 1) or +Inf (mode 2) in padded keys, values, queries and
 * output gradients changes no valid result, and padded rows are exactly zero (out, dq) as are
 * padded keys' dk, dv. kv_lens 77 is odd: the last pair of keys is half padding. */
static void padding_nan(const char *env, int mode) {
    ef_attn_shape s = {2, 2, 150, 140, 40, 24};
    int32_t kl[2] = {140, 77}, ql[2] = {150, 101};
    const char *specs[] = {"flash:precision=bf16", "flash:precision=bf16,causal=1"};
    const char *what = mode == 1 ? "NaN" : "Inf";
    for (int c = 0; c < 2; c++) {
        bufs in, a, b;
        ef_test_inputs(&in, s, 91, 1.0f);
        ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
        ef_status st = run_env(specs[c], env, &in, kl, ql, &a, NULL);
        ef_test_spoil_rows(in.k, s, s.kv_len, s.head_dim, kl, mode, 0);
        ef_test_spoil_rows(in.v, s, s.kv_len, s.v_dim, kl, mode, 0);
        ef_test_spoil_rows(in.q, s, s.q_len, s.head_dim, ql, mode, 0);
        ef_test_spoil_rows(in.g, s, s.q_len, s.v_dim, ql, mode, 0);
        /* NaN pre-fill of the outputs: a value never written cannot pass as zero */
        for (size_t j = 0; j < in.no; j++) b.out[j] = NAN;
        for (size_t j = 0; j < in.nq; j++) b.dq[j] = NAN;
        for (size_t j = 0; j < in.nk; j++) b.dk[j] = NAN;
        for (size_t j = 0; j < in.nv; j++) b.dv[j] = NAN;
        if (!st) st = run_env(specs[c], env, &in, kl, ql, &b, NULL);
        char name[200];
        snprintf(name, sizeof name, "%s%s: %s padding runs", specs[c], env ? " (emulated)" : "",
                 what);
        if (ef_check_status(name, st, EF_OK)) {
            snprintf(name, sizeof name, "%s%s: %s in padding changes nothing (out, dq, dk, dv)",
                     specs[c], env ? " (emulated)" : "", what);
            int same = !memcmp(a.out, b.out, in.no * 4) && !memcmp(a.dq, b.dq, in.nq * 4) &&
                       !memcmp(a.dk, b.dk, in.nk * 4) && !memcmp(a.dv, b.dv, in.nv * 4);
            ef_check(name, same, "%s", same ? "bitwise identical" : "differ");
            double pad = fmax(fmax(ef_test_padded_max(b.out, s, s.q_len, s.v_dim, ql),
                                   ef_test_padded_max(b.dq, s, s.q_len, s.head_dim, ql)),
                              fmax(ef_test_padded_max(b.dk, s, s.kv_len, s.head_dim, kl),
                                   ef_test_padded_max(b.dv, s, s.kv_len, s.v_dim, kl)));
            snprintf(name, sizeof name, "%s%s: padded rows are zero (max |value|)", specs[c],
                     env ? " (emulated)" : "");
            ef_check_err(name, pad, 0.0);
        }
        ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
    }
}

/* Results do not depend on the thread count (many heads; one head, whose keys backward splits). */
static void threads_bitwise(void) {
    for (int shape = 0; shape < 2; shape++) {
        ef_attn_shape s = shape ? (ef_attn_shape){1, 1, 300, 280, 40, 24}
                                : (ef_attn_shape){2, 3, 150, 170, 40, 24};
        const char *specs[] = {"flash:precision=bf16", "flash:precision=bf16,causal=1"};
        int32_t lens[2] = {shape ? 250 : 170, 99};
        for (int i = 0; i < 2; i++) {
            bufs in, a, b;
            ef_test_inputs(&in, s, 11, 1.0f);
            ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
            int old = ef_get_num_threads();
            ef_set_num_threads(1);
            ef_status st = ef_test_run(specs[i], &in, lens, &a);
            ef_set_num_threads(2);
            if (!st) st = ef_test_run(specs[i], &in, lens, &b);
            ef_set_num_threads(old);
            char name[160];
            snprintf(name, sizeof name, "%s B%d H%d: 1 vs 2 threads bitwise (out, dq, dk, dv)",
                     specs[i], s.batch, s.heads);
            int same = !st && !memcmp(a.out, b.out, in.no * 4) && !memcmp(a.dq, b.dq, in.nq * 4) &&
                       !memcmp(a.dk, b.dk, in.nk * 4) && !memcmp(a.dv, b.dv, in.nv * 4);
            ef_check(name, same, "%s", st ? ef_last_error() : (same ? "identical" : "differ"));
            ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
        }
    }
}

/* Causality: perturbing keys >= 60 leaves the outputs of rows < 60 bit-identical. */
static void causality(void) {
    ef_attn_shape s = {1, 1, 100, 100, 8, 8};
    bufs in, a, b;
    ef_test_inputs(&in, s, 21, 1.0f);
    ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
    ef_status st = ef_test_run("flash:precision=bf16,causal=1", &in, NULL, &a);
    for (int j = 60; j < 100; j++)
        for (int t = 0; t < 8; t++) in.k[j * 8 + t] += 3.0f, in.v[j * 8 + t] -= 5.0f;
    if (!st) st = ef_test_run("flash:precision=bf16,causal=1", &in, NULL, &b);
    ef_check_status("bf16 causality runs", st, EF_OK);
    ef_check_err("bf16 causal: outputs of rows < 60 unchanged by keys >= 60",
                 ef_max_abs_diff(a.out, b.out, 60 * 8), 0.0);
    ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
}

/* The option, its canonical spec, the fp32 default and the refusals. */
static void spec_and_refusals(void) {
    ef_attn_shape s = {1, 1, 8, 8, 4, 4};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "flash:precision=bf16", &s);
    ef_check("flash:precision=bf16 describes itself",
             !st && !strcmp(ef_attn_describe(a), "flash:precision=bf16,causal=0,scale=auto,seed=0,"
                                                 "ref=0"),
             "%s", st ? ef_last_error() : ef_attn_describe(a));
    ef_attn_free(a), a = NULL;
    st = ef_attn_new(&a, "flash:precision=fp16", &s);
    ef_check("flash:precision=fp16 is refused (EF_ERR_ARG, names the value)",
             st == EF_ERR_ARG && strstr(ef_last_error(), "fp16"), "%s: %s", ef_status_str(st),
             ef_last_error());
    ef_attn_free(a), a = NULL;
    ef_attn_shape big = {1, 1, 8, 8, 257, 4};
    st = ef_attn_new(&a, "flash:precision=bf16", &big);
    ef_check("flash:precision=bf16 with head_dim 257 is refused (EF_ERR_UNSUPPORTED)",
             st == EF_ERR_UNSUPPORTED && strstr(ef_last_error(), "257"), "%s: %s",
             ef_status_str(st), ef_last_error());
    ef_attn_free(a), a = NULL;
    setenv("EF_BF16", "amx", 1);
    st = ef_attn_new(&a, "flash:precision=bf16", &s);
    unsetenv("EF_BF16");
    ef_check("EF_BF16=amx is refused (EF_ERR_ARG, names the value)",
             st == EF_ERR_ARG && strstr(ef_last_error(), "EF_BF16=amx"), "%s: %s",
             ef_status_str(st), ef_last_error());
    ef_attn_free(a), a = NULL;
    setenv("EF_BF16", "emulate", 1);
    st = ef_attn_new(&a, "flash:precision=bf16", &s);
    unsetenv("EF_BF16");
    ef_check("EF_BF16=emulate gives the emulated kernel", !st && !ef_bf16_native(a), "%s",
             st                  ? ef_last_error()
             : ef_bf16_native(a) ? "native"
                                 : "emulated");
    ef_attn_free(a), a = NULL;
    st = ef_attn_new(&a, "flash:precision=bf16", &s);
    ef_check("without EF_BF16 the kernel follows the CPU",
             !st && ef_bf16_native(a) == ef_bf16_cpu_native(), "plan %s, CPU %s",
             !st && ef_bf16_native(a) ? "native" : "emulated",
             ef_bf16_cpu_native() ? "has AVX512-BF16" : "has no AVX512-BF16");
    ef_attn_free(a);
}

int main(void) {
    spec_and_refusals();
    shapes();
    padding();
    for (int mode = 1; mode <= 2; mode++) {
        padding_nan(NULL, mode);
        padding_nan("emulate", mode);
    }
    threads_bitwise();
    causality();
    return ef_test_finish();
}
