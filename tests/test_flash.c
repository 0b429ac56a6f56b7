/*
 * test_flash.c - `flash` (fused, tiled, online softmax) against `full` (materialised scores),
 * forward and backward, over shapes that stress the tiling: N = 1, odd N, N not a multiple of
 * the 64-row tile, q_len != kv_len, head dims 1..256, causal, key padding, fully padded
 * sequences, custom scales, logits of magnitude 1e4; plus thread-count bitwise equality.
 *
 * Tolerances: both paths accumulate in fp32 over M keys in different orders (flash rescales a
 * running sum, full normalises once), so they differ by a few ulps per accumulated term. We
 * measure max|flash - full| / max|full| and accept 2e-5 forward and 1e-4 backward (the
 * backward chains three products and a subtraction of nearly equal terms, dP - delta). These
 * are the fp32 tolerances of xformers' memory-efficient attention tests (ALGORITHMS.md b.1)
 * made relative; a wrong mask or a wrong tile edge gives errors of order 1.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ef_test_bufs bufs;

/* spec_fast vs spec_ref on one configuration, forward and backward. */
static void compare_specs_q(const char *label, ef_attn_shape s, const char *spec_fast,
                            const char *spec_ref, const int32_t *kv_lens, const int32_t *q_lens,
                            float sigma, double tol_f, double tol_b) {
    char name[256];
    bufs in, rf, fl;
    ef_test_inputs(&in, s, 1000 + (uint64_t)s.q_len * 7 + s.kv_len, sigma);
    ef_test_outputs(&rf, &in), ef_test_outputs(&fl, &in);
    ef_status st1 = ef_test_run_lens(spec_ref, &in, kv_lens, q_lens, &rf),
              st2 = ef_test_run_lens(spec_fast, &in, kv_lens, q_lens, &fl);
    snprintf(name, sizeof name, "%s: both run", label);
    if (ef_check(name, st1 == EF_OK && st2 == EF_OK, "%s %s, %s %s %s", spec_ref,
                 ef_status_str(st1), spec_fast, ef_status_str(st2), ef_last_error())) {
        int bad = ef_test_any_nonfinite(fl.out, in.no) || ef_test_any_nonfinite(fl.dq, in.nq) ||
                  ef_test_any_nonfinite(fl.dk, in.nk) || ef_test_any_nonfinite(fl.dv, in.nv);
        snprintf(name, sizeof name, "%s: outputs finite", label);
        ef_check(name, !bad, "%s", bad ? "NaN or inf found" : "");
        snprintf(name, sizeof name, "%s: out", label);
        ef_check_err(name, ef_max_rel_diff(fl.out, rf.out, in.no), tol_f);
        snprintf(name, sizeof name, "%s: dq", label);
        ef_check_err(name, ef_max_rel_diff(fl.dq, rf.dq, in.nq), tol_b);
        snprintf(name, sizeof name, "%s: dk", label);
        ef_check_err(name, ef_max_rel_diff(fl.dk, rf.dk, in.nk), tol_b);
        snprintf(name, sizeof name, "%s: dv", label);
        ef_check_err(name, ef_max_rel_diff(fl.dv, rf.dv, in.nv), tol_b);
    }
    ef_test_free_outputs(&rf), ef_test_free_outputs(&fl), ef_test_free_inputs(&in);
}

static void compare_specs(const char *label, ef_attn_shape s, const char *spec_fast,
                          const char *spec_ref, const int32_t *kv_lens, float sigma, double tol_f,
                          double tol_b) {
    compare_specs_q(label, s, spec_fast, spec_ref, kv_lens, NULL, sigma, tol_f, tol_b);
}

/* flash vs full; opts is appended to both names (e.g. ":causal=1"). */
static void compare_tol(const char *label, ef_attn_shape s, const char *opts,
                        const int32_t *kv_lens, float sigma, double tol_f, double tol_b) {
    char s_full[256], s_flash[256];
    snprintf(s_full, sizeof s_full, "full%s", opts);
    snprintf(s_flash, sizeof s_flash, "flash%s", opts);
    compare_specs(label, s, s_flash, s_full, kv_lens, sigma, tol_f, tol_b);
}

static void compare(const char *label, ef_attn_shape s, const char *opts, const int32_t *kv_lens,
                    float sigma) {
    compare_tol(label, s, opts, kv_lens, sigma, 2e-5, 1e-4);
}

/* flash and full against the slow double-precision reference path (ref=1). */
static void versus_reference(void) {
    ef_attn_shape s = {2, 2, 97, 83, 24, 40};
    int32_t lens[2] = {83, 30};
    const char *fast[] = {"flash", "flash:causal=1", "full", "full:causal=1,scale=0.5"};
    const char *ref[] = {"flash:ref=1", "flash:causal=1,ref=1", "full:ref=1",
                         "full:causal=1,scale=0.5,ref=1"};
    for (int i = 0; i < 4; i++) {
        char label[128];
        snprintf(label, sizeof label, "%s vs %s (padded)", fast[i], ref[i]);
        compare_specs(label, s, fast[i], ref[i], lens, 1.0f, 2e-5, 1e-4);
    }
}

/* Query padding (q_lens) at tile edges, with and without key padding: every path against the
 * reference. (Invariance to the content of padded rows is tests/test_props.c's job.) */
static void query_padding(void) {
    ef_attn_shape s = {4, 2, 130, 97, 24, 40};
    int32_t ql[4] = {130, 64, 1, 0}, kl[4] = {97, 30, 97, 97}, ql2[4] = {65, 63, 129, 77};
    const char *fast[] = {"flash", "flash:causal=1", "full", "full:causal=1"};
    const char *ref[] = {"flash:ref=1", "flash:causal=1,ref=1", "full:ref=1",
                         "full:causal=1,ref=1"};
    for (int i = 0; i < 4; i++) {
        char label[128];
        snprintf(label, sizeof label, "%s q_lens={130,64,1,0}", fast[i]);
        compare_specs_q(label, s, fast[i], ref[i], NULL, ql, 1.0f, 2e-5, 1e-4);
        snprintf(label, sizeof label, "%s q_lens={65,63,129,77} kv_lens={97,30,97,97}", fast[i]);
        compare_specs_q(label, s, fast[i], ref[i], kl, ql2, 1.0f, 2e-5, 1e-4);
    }
}

static void shapes(void) {
    struct {
        int b, h, n, m, d, e;
    } cases[] = {
        {1, 1, 1, 1, 1, 1},       {1, 1, 1, 5, 8, 8},      {2, 2, 7, 7, 3, 5},
        {1, 2, 64, 64, 64, 64},   {1, 1, 65, 65, 16, 16},  {2, 1, 127, 129, 33, 17},
        {1, 3, 200, 70, 64, 64},  {1, 1, 70, 200, 64, 64}, {1, 1, 130, 130, 128, 128},
        {1, 1, 96, 80, 256, 256}, {1, 1, 50, 90, 100, 1},  {1, 1, 33, 260, 1, 48},
    };
    const char *optsets[] = {"", ":causal=1", ":scale=0.3", ":causal=1,scale=2"};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ef_attn_shape s = {cases[c].b, cases[c].h, cases[c].n, cases[c].m, cases[c].d, cases[c].e};
        for (size_t o = 0; o < sizeof optsets / sizeof optsets[0]; o++) {
            char label[160];
            snprintf(label, sizeof label, "B%d H%d N%d M%d D%d E%d %s", s.batch, s.heads, s.q_len,
                     s.kv_len, s.head_dim, s.v_dim, optsets[o]);
            compare(label, s, optsets[o], NULL, 1.0f);
        }
    }
}

static void padding(void) {
    ef_attn_shape s = {4, 2, 77, 90, 24, 40};
    int32_t lens[4] = {90, 45, 1, 0}; /* full, half, one key, fully padded */
    compare("padding kv_lens={90,45,1,0}", s, "", lens, 1.0f);
    compare("padding kv_lens={90,45,1,0} causal", s, ":causal=1", lens, 1.0f);
    int32_t lens2[4] = {64, 65, 63, 128};
    ef_attn_shape s2 = {4, 1, 130, 128, 64, 64};
    compare("padding at tile edges {64,65,63,128} causal", s2, ":causal=1", lens2, 1.0f);
}

/* A fully padded sequence gives zero output and zero gradients, never NaN (both paths). */
static void empty_rows(void) {
    ef_attn_shape s = {2, 1, 9, 11, 8, 8};
    int32_t lens[2] = {0, 11};
    const char *specs[] = {"full", "flash"};
    for (int i = 0; i < 2; i++) {
        bufs in, o;
        ef_test_inputs(&in, s, 77, 1.0f);
        ef_test_outputs(&o, &in);
        /* NaN pre-fill: an output the mechanism never writes cannot pass as zero */
        for (size_t j = 0; j < in.no; j++) o.out[j] = NAN;
        for (size_t j = 0; j < in.nq; j++) o.dq[j] = NAN;
        for (size_t j = 0; j < in.nk; j++) o.dk[j] = NAN;
        for (size_t j = 0; j < in.nv; j++) o.dv[j] = NAN;
        ef_status st = ef_test_run(specs[i], &in, lens, &o);
        size_t half_o = in.no / 2, half_q = in.nq / 2, half_k = in.nk / 2, half_v = in.nv / 2;
        float zeros[1] = {0};
        double m = 0; /* max |value|, NaN-aware (ef_max_abs_diff returns inf on NaN) */
        for (size_t j = 0; j < half_o; j++) m = fmax(m, ef_max_abs_diff(o.out + j, zeros, 1));
        for (size_t j = 0; j < half_q; j++) m = fmax(m, ef_max_abs_diff(o.dq + j, zeros, 1));
        for (size_t j = 0; j < half_k; j++) m = fmax(m, ef_max_abs_diff(o.dk + j, zeros, 1));
        for (size_t j = 0; j < half_v; j++) m = fmax(m, ef_max_abs_diff(o.dv + j, zeros, 1));
        char name[128];
        snprintf(name, sizeof name, "%s: fully padded sequence -> zeros (max |value|)", specs[i]);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            ef_check_err(name, m, 0.0);
        ef_test_free_outputs(&o), ef_test_free_inputs(&in);
    }
    /* causal with kv_len < q_len is fine; causal row 0 with kv_lens = 0 sees nothing */
}

/* Logits of magnitude ~1e4: a naive exp overflows; both paths must stay finite and agree. */
static void big_logits(void) {
    ef_attn_shape s = {1, 2, 100, 100, 16, 16};
    /* sigma 50 with scale 1/4: |logit| ~ 50*50*4/4 ~ 1e4. A logit of 1e4 carries an fp32
     * rounding error of 1e4 * 2^-24 * (a few operations) ~ 1e-3 in either path (flash folds the
     * scale into q, full applies it after the product), and a logit error e changes a
     * probability by a relative e: so the paths can only agree to ~1e-3 here. The check that
     * matters is that nothing overflows (finite outputs) and the answers still agree. */
    compare_tol("logits ~1e4", s, "", NULL, 50.0f, 2e-3, 5e-3);
    compare_tol("logits ~1e4 causal", s, ":causal=1", NULL, 50.0f, 2e-3, 5e-3);
}

/* Padded keys must not leak: changing them changes no output. */
static void padding_invariance(void) {
    ef_attn_shape s = {2, 1, 70, 70, 16, 16};
    int32_t lens[2] = {30, 70};
    bufs in, a, b;
    ef_test_inputs(&in, s, 5, 1.0f);
    ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
    ef_status st = ef_test_run("flash", &in, lens, &a);
    for (int j = 30; j < 70; j++) {
        for (int t = 0; t < 16; t++)
            in.k[(size_t)j * 16 + t] = 1e4f, in.v[(size_t)j * 16 + t] = 1e9f;
    }
    if (!st) st = ef_test_run("flash", &in, lens, &b);
    ef_check_status("flash padding invariance runs", st, EF_OK);
    ef_check_err("flash: padded keys/values set to 1e4/1e9 change no output",
                 ef_max_abs_diff(a.out, b.out, in.no), 0.0);
    ef_check_err("flash: ... and no dq", ef_max_abs_diff(a.dq, b.dq, in.nq), 0.0);
    ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
}

/* The result may not depend on the thread count: bitwise equality for 1 and 2 threads. */
static void threads_bitwise(void) {
    /* many heads (one thread per head in backward), then one head (backward splits its keys) */
    for (int shape = 0; shape < 2; shape++) {
        ef_attn_shape s = shape ? (ef_attn_shape){1, 1, 300, 280, 40, 24}
                                : (ef_attn_shape){2, 3, 150, 170, 40, 24};
        const char *specs[] = {"flash", "flash:causal=1"};
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
            char name[128];
            snprintf(name, sizeof name, "%s B%d H%d: 1 vs 2 threads bitwise (out, dq, dk, dv)",
                     specs[i], s.batch, s.heads);
            int same = !st && !memcmp(a.out, b.out, in.no * 4) && !memcmp(a.dq, b.dq, in.nq * 4) &&
                       !memcmp(a.dk, b.dk, in.nk * 4) && !memcmp(a.dv, b.dv, in.nv * 4);
            ef_check(name, same, "%s", st ? ef_last_error() : (same ? "identical" : "differ"));
            ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
        }
    }
}

/* Causality: perturbing future keys leaves past outputs bit-identical. */
static void causality(void) {
    ef_attn_shape s = {1, 1, 100, 100, 8, 8};
    bufs in, a, b;
    ef_test_inputs(&in, s, 21, 1.0f);
    ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
    ef_status st = ef_test_run("flash:causal=1", &in, NULL, &a);
    for (int j = 60; j < 100; j++)
        for (int t = 0; t < 8; t++) in.k[j * 8 + t] += 3.0f, in.v[j * 8 + t] -= 5.0f;
    if (!st) st = ef_test_run("flash:causal=1", &in, NULL, &b);
    ef_check_status("causality run", st, EF_OK);
    ef_check_err("flash causal: outputs of rows < 60 unchanged by keys >= 60",
                 ef_max_abs_diff(a.out, b.out, 60 * 8), 0.0);
    ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
}

/* saved = NULL (inference) gives the same output as a training forward. */
static void inference_equals_training(void) {
    ef_attn_shape s = {1, 2, 90, 90, 32, 32};
    bufs in;
    ef_test_inputs(&in, s, 31, 1.0f);
    float *o1 = ef_test_zeros(in.no), *o2 = ef_test_zeros(in.no);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "flash:causal=1", &s);
    void *sv = ef_test_saved(a);
    ef_attn_io io1 = {in.q, in.k, in.v, NULL, o1}, io2 = {in.q, in.k, in.v, NULL, o2};
    if (!st) st = ef_attn_forward(a, &io1, NULL);
    if (!st) st = ef_attn_forward(a, &io2, sv);
    ef_check_status("flash inference and training forward run", st, EF_OK);
    ef_check_err("flash: inference forward == training forward", ef_max_abs_diff(o1, o2, in.no),
                 0.0);
    ef_attn_free(a), ef_free(sv), free(o1), free(o2), ef_test_free_inputs(&in);
}

int main(void) {
    versus_reference();
    query_padding();
    shapes();
    padding();
    empty_rows();
    big_logits();
    padding_invariance();
    threads_bitwise();
    causality();
    inference_equals_training();
    return ef_test_finish();
}
