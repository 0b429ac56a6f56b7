/*
 * test_linformer.c - `linformer` (learned projections E, F of keys and values, then exact
 * attention over the k projected keys): the fast path (ef_sgemm + inner flash) against the
 * double-precision reference (ref=1) for every share mode, forward, backward and parameter
 * gradients, with key padding (kv_lens including 0) and odd sizes; k = kv_len with E = F = I
 * equals `full`; padding invariance and the equivalence "kv_lens = L" == "a plan of kv_len L
 * with the projections sliced"; parameter gradients accumulate; finite differences of the
 * reference; refusals (causal, bad k, large heads); parameter counts; the seeded init.
 *
 * Tolerances: the fast path is fp32 (a GEMM over L <= 90 keys for K', V', then flash over k
 * keys), the reference is double. As in test_flash we measure max|fast - ref| / max|ref| and
 * accept 2e-5 forward and 1e-4 backward (the backward chains the flash backward with two more
 * products); a wrong slice, a transposed projection or a missing head offset gives errors of
 * order 1. Equalities that involve the same arithmetic on the same values are checked exactly.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const shares[4] = {"none", "kv", "headwise", "layerwise"};

typedef ef_test_bufs bufs; /* inputs only: the outputs live elsewhere here */

typedef struct res {
    float *out, *dq, *dk, *dv;
    float *params, *grads; /* copies, np floats */
    size_t np;
} res;

/* Output buffers start as NaN: an element the library does not write fails every check. */
static float *nans(size_t n) {
    float *p = ef_test_zeros(n);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static void res_free(res *r) {
    free(r->out), free(r->dq), free(r->dk), free(r->dv), free(r->params), free(r->grads);
    memset(r, 0, sizeof *r);
}

/* Makes `spec` at in->s, overwrites its parameters with `params` when given, runs forward and
 * backward with query lengths q_lens and key lengths kv_lens (NULL: all) and copies everything
 * into r. */
static ef_status run_q(const char *spec, const bufs *in, const int32_t *q_lens,
                       const int32_t *kv_lens, const float *params, res *r) {
    memset(r, 0, sizeof *r);
    r->out = nans(in->no), r->dq = nans(in->nq), r->dk = nans(in->nk), r->dv = nans(in->nv);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &in->s);
    if (st) return st;
    r->np = ef_attn_param_count(a);
    r->params = ef_test_zeros(r->np), r->grads = ef_test_zeros(r->np);
    if (params && r->np) memcpy(ef_attn_params(a), params, r->np * sizeof(float));
    void *saved = ef_test_saved(a);
    ef_attn_io io = {in->q, in->k, in->v, kv_lens, r->out, q_lens};
    st = ef_attn_forward(a, &io, saved);
    if (!st) st = ef_attn_backward(a, &io, saved, in->g, r->dq, r->dk, r->dv);
    if (!st && r->np) { /* `full` has none (NULL pointers) */
        memcpy(r->params, ef_attn_params(a), r->np * sizeof(float));
        memcpy(r->grads, ef_attn_param_grads(a), r->np * sizeof(float));
    }
    ef_free(saved);
    ef_attn_free(a);
    return st;
}

static ef_status run(const char *spec, const bufs *in, const int32_t *kv_lens, const float *params,
                     res *r) {
    return run_q(spec, in, NULL, kv_lens, params, r);
}

static int any_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 1;
    return 0;
}

static double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

/* out, dq, dk, dv (and parameter gradients when both have them) of two results. */
static void compare_res(const char *label, const bufs *in, const res *x, const res *ref,
                        double tol_f, double tol_b, double tol_qk) {
    char name[256];
    int bad = any_nonfinite(x->out, in->no) || any_nonfinite(x->dq, in->nq) ||
              any_nonfinite(x->dk, in->nk) || any_nonfinite(x->dv, in->nv) ||
              any_nonfinite(x->grads, x->np);
    snprintf(name, sizeof name, "%s: finite", label);
    ef_check(name, !bad, "%s", bad ? "NaN or inf found" : "");
    snprintf(name, sizeof name, "%s: out", label);
    ef_check_err(name, ef_max_rel_diff(x->out, ref->out, in->no), tol_f);
    snprintf(name, sizeof name, "%s: dq", label);
    ef_check_err(name, ef_max_rel_diff(x->dq, ref->dq, in->nq), tol_qk);
    snprintf(name, sizeof name, "%s: dk", label);
    ef_check_err(name, ef_max_rel_diff(x->dk, ref->dk, in->nk), tol_qk);
    snprintf(name, sizeof name, "%s: dv", label);
    ef_check_err(name, ef_max_rel_diff(x->dv, ref->dv, in->nv), tol_b);
    if (x->np && ref->np) {
        snprintf(name, sizeof name, "%s: dE, dF", label);
        if (x->np != ref->np)
            ef_check(name, 0, "param counts %zu vs %zu", x->np, ref->np);
        else
            ef_check_err(name, ef_max_rel_diff(x->grads, ref->grads, x->np), tol_b);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Fast vs reference, every share mode, padding including an empty sequence, odd sizes
 * ------------------------------------------------------------------------------------------- */
static void versus_reference(void) {
    ef_attn_shape s = {3, 2, 77, 90, 24, 40};
    int32_t lens[3] = {90, 45, 0};
    const int ks[] = {1, 16, 90, 300};
    bufs in;
    ef_test_inputs(&in, s, 100, 1.0f);
    for (int sh = 0; sh < 4; sh++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
            char fast[128], ref[160], label[160];
            snprintf(fast, sizeof fast, "linformer:k=%d,share=%s,seed=3", ks[ki], shares[sh]);
            snprintf(ref, sizeof ref, "%s,ref=1", fast);
            snprintf(label, sizeof label, "k=%d share=%s vs ref (kv_lens 90,45,0)", ks[ki],
                     shares[sh]);
            res f, r;
            ef_status st1 = run(fast, &in, lens, NULL, &f), st2 = run(ref, &in, lens, NULL, &r);
            char name[200];
            snprintf(name, sizeof name, "%s: both run", label);
            if (ef_check(name, !st1 && !st2, "%s %s %s", ef_status_str(st1), ef_status_str(st2),
                         ef_last_error())) {
                snprintf(name, sizeof name, "%s: same init in both paths", label);
                ef_check(name, f.np == r.np && !memcmp(f.params, r.params, f.np * 4), "np %zu",
                         f.np);
                /* k = 1: one projected key, P = 1, so dS = P (dP - delta) is exactly 0 and the
                 * true dq and dk are 0. In fp32 dP - delta leaves a few ulps of |dP| ~ |dO||V'|
                 * (|V'| ~ sqrt(L/3) ~ 5 here), times scale |K'|: ~1e-4 absolutely, 1e-2 against
                 * the harness' 1e-2 floor. out, dv and dE, dF keep the tight bounds. */
                double tol_qk = ks[ki] == 1 ? 2e-2 : 1e-4;
                compare_res(label, &in, &f, &r, 2e-5, 1e-4, tol_qk);
            }
            res_free(&f), res_free(&r);
        }
    ef_test_free_inputs(&in);
}

/* The same with query padding: q_lens (77, 40, 1) and (0, 33, 77) against kv_lens (90, 45, 0)
 * and (17, 90, 90), odd sizes; the reference handles q_lens with its own loops. */
static void versus_reference_q_lens(void) {
    ef_attn_shape s = {3, 2, 77, 90, 24, 40};
    int32_t ql[2][3] = {{77, 40, 1}, {0, 33, 77}}, kl[2][3] = {{90, 45, 0}, {17, 90, 90}};
    bufs in;
    ef_test_inputs(&in, s, 150, 1.0f);
    for (int sh = 0; sh < 4; sh++)
        for (int c = 0; c < 2; c++) {
            char fast[128], ref[160], label[200], name[240];
            int k = c ? 300 : 16;
            snprintf(fast, sizeof fast, "linformer:k=%d,share=%s,seed=4", k, shares[sh]);
            snprintf(ref, sizeof ref, "%s,ref=1", fast);
            snprintf(label, sizeof label, "k=%d share=%s vs ref (q_lens %d,%d,%d kv_lens %d,%d,%d)",
                     k, shares[sh], ql[c][0], ql[c][1], ql[c][2], kl[c][0], kl[c][1], kl[c][2]);
            res f, r;
            ef_status st1 = run_q(fast, &in, ql[c], kl[c], NULL, &f);
            ef_status st2 = run_q(ref, &in, ql[c], kl[c], NULL, &r);
            snprintf(name, sizeof name, "%s: both run", label);
            if (ef_check(name, !st1 && !st2, "%s %s %s", ef_status_str(st1), ef_status_str(st2),
                         ef_last_error()))
                compare_res(label, &in, &f, &r, 2e-5, 1e-4, 1e-4);
            res_free(&f), res_free(&r);
        }
    ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * k = kv_len with E = F = I is exact attention (ALGORITHMS.md equivalence 11)
 * ------------------------------------------------------------------------------------------- */
static void identity_is_full(void) {
    ef_attn_shape s = {2, 2, 77, 90, 24, 40};
    bufs in;
    ef_test_inputs(&in, s, 200, 1.0f);
    res full;
    ef_status st = run("full", &in, NULL, NULL, &full);
    ef_check_status("full runs", st, EF_OK);
    for (int sh = 0; sh < 4; sh++) {
        char spec[128], label[128];
        snprintf(spec, sizeof spec, "linformer:k=90,share=%s", shares[sh]);
        snprintf(label, sizeof label, "k=M=90 E=F=I share=%s == full", shares[sh]);
        ef_attn *a = NULL;
        size_t np = 0;
        if (!ef_attn_new(&a, spec, &s)) np = ef_attn_param_count(a);
        ef_attn_free(a);
        float *eye = ef_test_zeros(np);
        size_t mat = (size_t)90 * 90;
        for (size_t x = 0; x < np / mat; x++)
            for (int r = 0; r < 90; r++) eye[x * mat + (size_t)r * 90 + r] = 1.0f;
        res lin;
        st = run(spec, &in, NULL, eye, &lin);
        char name[160];
        snprintf(name, sizeof name, "%s: runs", label);
        if (ef_check(name, !st && np > 0, "%s np=%zu %s", ef_status_str(st), np, ef_last_error())) {
            lin.np = 0; /* full has no parameters */
            compare_res(label, &in, &lin, &full, 2e-5, 1e-4, 1e-4);
        }
        res_free(&lin), free(eye);
    }
    res_free(&full), ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * Padding
 * ------------------------------------------------------------------------------------------- */
/* Values in padded keys change nothing (they are dropped before the projection). */
static void padding_values_ignored(void) {
    ef_attn_shape s = {2, 2, 77, 90, 24, 40};
    int32_t lens[2] = {53, 90};
    for (int sh = 0; sh < 4; sh++) {
        bufs in;
        ef_test_inputs(&in, s, 300, 1.0f);
        char spec[128], name[160];
        snprintf(spec, sizeof spec, "linformer:k=16,share=%s", shares[sh]);
        res a, b;
        ef_status st = run(spec, &in, lens, NULL, &a);
        for (int h = 0; h < 2; h++) /* batch 0: keys 53..89 of both heads */
            for (int j = 53; j < 90; j++) {
                for (int t = 0; t < 24; t++) in.k[((size_t)h * 90 + j) * 24 + t] = 1e4f;
                for (int t = 0; t < 40; t++) in.v[((size_t)h * 90 + j) * 40 + t] = 1e9f;
            }
        if (!st) st = run(spec, &in, lens, NULL, &b);
        snprintf(name, sizeof name, "share=%s: padded K, V set to 1e4, 1e9: runs", shares[sh]);
        if (ef_check(name, !st, "%s", ef_last_error())) {
            double e =
                fmax(fmax(ef_max_abs_diff(a.out, b.out, in.no), ef_max_abs_diff(a.dq, b.dq, in.nq)),
                     fmax(ef_max_abs_diff(a.dk, b.dk, in.nk), ef_max_abs_diff(a.dv, b.dv, in.nv)));
            e = fmax(e, ef_max_abs_diff(a.grads, b.grads, a.np));
            snprintf(name, sizeof name, "share=%s: ... out, dq, dk, dv, dE, dF unchanged",
                     shares[sh]);
            ef_check_err(name, e, 0.0);
            double pad = 0; /* padded keys of batch 0 get exactly zero gradient */
            for (int h = 0; h < 2; h++) {
                pad = fmax(pad, max_abs(b.dk + ((size_t)h * 90 + 53) * 24, 37 * 24));
                pad = fmax(pad, max_abs(b.dv + ((size_t)h * 90 + 53) * 40, 37 * 40));
            }
            snprintf(name, sizeof name, "share=%s: padded keys get zero dk, dv", shares[sh]);
            ef_check_err(name, pad, 0.0);
        }
        res_free(&a), res_free(&b), ef_test_free_inputs(&in);
    }
}


/* max |x| over rows i >= lens[b] of x [B][H][rows][w]; infinite when one is NaN */

static int same_res(const res *a, const res *b, const bufs *in) {
    return a->np == b->np && !memcmp(a->out, b->out, in->no * 4) &&
           !memcmp(a->dq, b->dq, in->nq * 4) && !memcmp(a->dk, b->dk, in->nk * 4) &&
           !memcmp(a->dv, b->dv, in->nv * 4) && !memcmp(a->grads, b->grads, a->np * 4);
}

/* Query and key padding (the contract in eformer.h), both paths, every share mode: redrawing
 * the padded rows of q, dO, k and v, or filling them with NaN or +-Inf, leaves out, dq, dk, dv
 * and the parameter gradients dE, dF bitwise unchanged; padded rows output zeros and get zero
 * dq, dk, dv; a sequence without queries (q_lens = 0) gets zero dk, dv as well. */
static void query_padding_invariance(void) {
    ef_attn_shape s = {3, 2, 77, 90, 24, 40};
    int32_t ql[3] = {50, 77, 0}, kl[3] = {53, 90, 20};
    for (int sh = 0; sh < 4; sh++)
        for (int path = 0; path < 2; path++) {
            char spec[128], name[240];
            snprintf(spec, sizeof spec, "linformer:k=16,share=%s%s", shares[sh],
                     path ? ",ref=1" : "");
            bufs in;
            ef_test_inputs(&in, s, 1100 + (uint64_t)sh, 1.0f);
            res base, o;
            ef_status st = run_q(spec, &in, ql, kl, NULL, &base);
            snprintf(name, sizeof name, "%s q_lens={50,77,0} kv_lens={53,90,20}: runs", spec);
            if (!ef_check(name, !st, "%s", st ? ef_last_error() : "")) {
                res_free(&base), ef_test_free_inputs(&in);
                continue;
            }
            /* sequence 2 has no query: all of its dk, dv must be zero too */
            int32_t kl2[3] = {kl[0], kl[1], 0};
            double z = fmax(ef_test_padded_max(base.out, s, s.q_len, s.v_dim, ql),
                            ef_test_padded_max(base.dq, s, s.q_len, s.head_dim, ql));
            z = fmax(z, fmax(ef_test_padded_max(base.dk, s, s.kv_len, s.head_dim, kl2),
                             ef_test_padded_max(base.dv, s, s.kv_len, s.v_dim, kl2)));
            snprintf(name, sizeof name, "%s: padded rows output 0, padded dq dk dv are 0", spec);
            ef_check_err(name, z, 0.0);
            const char *what[4] = {"redrawn", "NaN", "+Inf", "-Inf"};
            for (int mode = 0; mode < 4; mode++) {
                ef_test_spoil_rows(in.q, s, s.q_len, s.head_dim, ql, mode, 1150 + (uint64_t)mode);
                ef_test_spoil_rows(in.g, s, s.q_len, s.v_dim, ql, mode, 1160 + (uint64_t)mode);
                ef_test_spoil_rows(in.k, s, s.kv_len, s.head_dim, kl, mode, 1170 + (uint64_t)mode);
                ef_test_spoil_rows(in.v, s, s.kv_len, s.v_dim, kl, mode, 1180 + (uint64_t)mode);
                st = run_q(spec, &in, ql, kl, NULL, &o);
                int same = !st && same_res(&base, &o, &in);
                snprintf(name, sizeof name,
                         "%s: padded q, dO, k, v rows %s: out dq dk dv dE dF bitwise unchanged",
                         spec, what[mode]);
                ef_check(name, same, "%s", st ? ef_last_error() : same ? "identical" : "differ");
                res_free(&o);
            }
            res_free(&base), ef_test_free_inputs(&in);
        }
}

/* Forward writes every byte of `saved` (the inner plan's part, K', V' and the alignment gaps
 * between them), with query and key padding and empty sequences: two forwards into buffers
 * pre-filled with 0x00 and 0xFF bytes leave identical buffers. */
static void saved_fully_written(void) {
    ef_attn_shape s = {3, 2, 41, 50, 13, 7}; /* odd sizes: parts end off a 64-byte boundary */
    int32_t ql[3] = {41, 0, 17}, kl[3] = {9, 50, 0};
    bufs in;
    ef_test_inputs(&in, s, 1250, 1.0f);
    for (int sh = 0; sh < 4; sh += 3) {
        char spec[96], name[160];
        snprintf(spec, sizeof spec, "linformer:k=11,share=%s", shares[sh]);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &s);
        size_t sb = st ? 0 : ef_attn_saved_bytes(a);
        void *s0 = st ? NULL : ef_test_saved(a), *s1 = st ? NULL : ef_test_saved(a);
        float *out = ef_test_zeros(in.no);
        ef_attn_io io = {in.q, in.k, in.v, kl, out, ql};
        if (!st) memset(s0, 0x00, sb), memset(s1, 0xFF, sb);
        if (!st) st = ef_attn_forward(a, &io, s0);
        if (!st) st = ef_attn_forward(a, &io, s1);
        snprintf(name, sizeof name, "%s: forward writes every byte of saved (%zu bytes)", spec, sb);
        ef_check(name, !st && !memcmp(s0, s1, sb), "%s",
                 st                   ? ef_last_error()
                 : memcmp(s0, s1, sb) ? "differ"
                                      : "identical");
        ef_free(s0), ef_free(s1), free(out), ef_attn_free(a);
    }
    ef_test_free_inputs(&in);
}

/* kv_lens = L on a kv_len = M plan == a kv_len = L plan on the unpadded prefix with E[:, :L]
 * (fairseq's slicing for short inputs is our padding path). Also: the seeded init of the short
 * plan is exactly that slice. */
static void padding_equals_sliced_plan(void) {
    enum { M = 90, L = 53, N = 77, D = 24, DV = 40, H = 2, K = 16 };
    ef_attn_shape big = {1, H, N, M, D, DV}, small = {1, H, N, L, D, DV};
    int32_t lens[1] = {L};
    for (int sh = 0; sh < 4; sh++) {
        bufs in, pre;
        ef_test_inputs(&in, big, 400, 1.0f);
        ef_test_inputs(&pre, small, 400, 1.0f);
        memcpy(pre.q, in.q, in.nq * 4), memcpy(pre.g, in.g, in.no * 4);
        for (int h = 0; h < H; h++) {
            memcpy(pre.k + (size_t)h * L * D, in.k + (size_t)h * M * D, sizeof(float) * L * D);
            memcpy(pre.v + (size_t)h * L * DV, in.v + (size_t)h * M * DV, sizeof(float) * L * DV);
        }
        char spec[128], name[200];
        snprintf(spec, sizeof spec, "linformer:k=%d,share=%s,seed=9", K, shares[sh]);
        res a, b, c;
        ef_status st = run(spec, &in, lens, NULL, &a);
        size_t nmat = a.np / ((size_t)K * M);
        float *sliced = ef_test_zeros(nmat * K * L);
        for (size_t x = 0; x < nmat * K; x++) /* row x of every matrix, first L columns */
            memcpy(sliced + x * L, a.params + x * M, sizeof(float) * L);
        if (!st) st = run(spec, &pre, NULL, sliced, &b);
        if (!st) st = run(spec, &pre, NULL, NULL, &c); /* its own init */
        snprintf(name, sizeof name, "share=%s: kv_lens=%d of %d vs plan kv_len=%d: runs",
                 shares[sh], L, M, L);
        if (ef_check(name, !st && b.np == nmat * K * L, "%s", ef_last_error())) {
            /* the same products on the same values; only the leading dimension of E differs */
            snprintf(name, sizeof name, "share=%s: sliced plan: out", shares[sh]);
            ef_check_err(name, ef_max_rel_diff(a.out, b.out, in.no), 1e-6);
            snprintf(name, sizeof name, "share=%s: sliced plan: dq", shares[sh]);
            ef_check_err(name, ef_max_rel_diff(a.dq, b.dq, in.nq), 1e-6);
            double ek = 0, ev = 0, rest = 0, sk = 1e-2, sv = 1e-2;
            for (int h = 0; h < H; h++) {
                for (size_t x = 0; x < (size_t)L * D; x++) {
                    ek = fmax(ek, fabs(a.dk[(size_t)h * M * D + x] - b.dk[(size_t)h * L * D + x]));
                    sk = fmax(sk, fabs(b.dk[(size_t)h * L * D + x]));
                }
                for (size_t x = 0; x < (size_t)L * DV; x++) {
                    ev =
                        fmax(ev, fabs(a.dv[(size_t)h * M * DV + x] - b.dv[(size_t)h * L * DV + x]));
                    sv = fmax(sv, fabs(b.dv[(size_t)h * L * DV + x]));
                }
                rest = fmax(rest, max_abs(a.dk + ((size_t)h * M + L) * D, (size_t)(M - L) * D));
                rest = fmax(rest, max_abs(a.dv + ((size_t)h * M + L) * DV, (size_t)(M - L) * DV));
            }
            snprintf(name, sizeof name, "share=%s: sliced plan: dk[:L]", shares[sh]);
            ef_check_err(name, ek / sk, 1e-6);
            snprintf(name, sizeof name, "share=%s: sliced plan: dv[:L]", shares[sh]);
            ef_check_err(name, ev / sv, 1e-6);
            snprintf(name, sizeof name, "share=%s: dk[L:], dv[L:] exactly zero", shares[sh]);
            ef_check_err(name, rest, 0.0);
            double eg = 0, sg = 1e-2, gpad = 0;
            for (size_t x = 0; x < nmat * K; x++) {
                for (int j = 0; j < L; j++) {
                    eg = fmax(eg, fabs(a.grads[x * M + j] - b.grads[x * L + j]));
                    sg = fmax(sg, fabs(b.grads[x * L + j]));
                }
                gpad = fmax(gpad, max_abs(a.grads + x * M + L, M - L));
            }
            snprintf(name, sizeof name, "share=%s: sliced plan: dE[:, :L], dF[:, :L]", shares[sh]);
            ef_check_err(name, eg / sg, 1e-6);
            snprintf(name, sizeof name, "share=%s: dE[:, L:], dF[:, L:] exactly zero", shares[sh]);
            ef_check_err(name, gpad, 0.0);
            snprintf(name, sizeof name, "share=%s: init of kv_len=%d plan == slice of kv_len=%d",
                     shares[sh], L, M);
            ef_check(name, c.np == b.np && !memcmp(c.params, sliced, c.np * 4), "%zu params", c.np);
        }
        free(sliced);
        res_free(&a), res_free(&b), res_free(&c), ef_test_free_inputs(&in),
            ef_test_free_inputs(&pre);
    }
}

/* A sequence with no key: zero output and zero gradients, in both paths. */
static void empty_sequence(void) {
    ef_attn_shape s = {2, 2, 33, 40, 16, 8};
    int32_t lens[2] = {0, 40};
    bufs in;
    ef_test_inputs(&in, s, 500, 1.0f);
    const char *specs[] = {"linformer:k=8", "linformer:k=8,ref=1"};
    for (int i = 0; i < 2; i++) {
        res r;
        ef_status st = run(specs[i], &in, lens, NULL, &r);
        char name[160];
        snprintf(name, sizeof name, "%s: kv_lens[0]=0 -> zero out, dq, dk, dv", specs[i]);
        if (st) {
            ef_check(name, 0, "%s", ef_last_error());
        } else {
            double m = fmax(fmax(max_abs(r.out, in.no / 2), max_abs(r.dq, in.nq / 2)),
                            fmax(max_abs(r.dk, in.nk / 2), max_abs(r.dv, in.nv / 2)));
            ef_check_err(name, m, 0.0);
            snprintf(name, sizeof name, "%s: ... while the other sequence is nonzero", specs[i]);
            ef_check(name,
                     max_abs(r.out + in.no / 2, in.no / 2) > 0.05 &&
                         max_abs(r.dq + in.nq / 2, in.nq / 2) > 1e-3,
                     "max |out| %.3g", max_abs(r.out + in.no / 2, in.no / 2));
        }
        res_free(&r);
    }
    ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * Gradients: accumulation, saved state, finite differences
 * ------------------------------------------------------------------------------------------- */
/* Two backward calls give twice the parameter gradient; dq, dk, dv are overwritten. Backward
 * uses only `saved` (not the plan's workspace): a forward in between, on other inputs and
 * without saved, changes nothing. */
static void accumulate_and_saved(void) {
    ef_attn_shape s = {2, 2, 50, 60, 16, 24};
    int32_t lens[2] = {60, 31};
    for (int sh = 0; sh < 4; sh += 2) { /* none, headwise */
        bufs in, other;
        ef_test_inputs(&in, s, 600, 1.0f);
        ef_test_inputs(&other, s, 700, 1.0f);
        char spec[96], name[160];
        snprintf(spec, sizeof spec, "linformer:k=20,share=%s", shares[sh]);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &s);
        ef_check_status("plan for accumulation", st, EF_OK);
        if (st) continue;
        size_t np = ef_attn_param_count(a);
        float *g1 = ef_test_zeros(np), *out = ef_test_zeros(in.no), *out2 = ef_test_zeros(in.no);
        float *dq1 = ef_test_zeros(in.nq), *dq2 = ef_test_zeros(in.nq);
        float *dk = ef_test_zeros(in.nk), *dv = ef_test_zeros(in.nv);
        void *saved = ef_test_saved(a);
        snprintf(name, sizeof name, "share=%s: gradients start at zero", shares[sh]);
        ef_check_err(name, max_abs(ef_attn_param_grads(a), np), 0.0);
        ef_attn_io io = {in.q, in.k, in.v, lens, out};
        ef_attn_io io_other = {other.q, other.k, other.v, NULL, out2};
        st = ef_attn_forward(a, &io, saved);
        if (!st) st = ef_attn_backward(a, &io, saved, in.g, dq1, dk, dv);
        memcpy(g1, ef_attn_param_grads(a), np * 4);
        if (!st) st = ef_attn_forward(a, &io_other, NULL); /* overwrites the workspace */
        if (!st) st = ef_attn_backward(a, &io, saved, in.g, dq2, dk, dv);
        snprintf(name, sizeof name, "share=%s: two backward calls run", shares[sh]);
        if (ef_check(name, !st, "%s", ef_last_error())) {
            float *g2 = ef_attn_param_grads(a);
            double scale = max_abs(g1, np), err = 0;
            for (size_t x = 0; x < np; x++) err = fmax(err, fabs(g2[x] - 2.0 * g1[x]));
            snprintf(name, sizeof name, "share=%s: first gradient is nonzero", shares[sh]);
            ef_check(name, scale > 1e-2, "max |dE| %.3g", scale);
            /* shared matrices sum several heads: (g + a) + b vs 2 (a + b) differ by rounding */
            snprintf(name, sizeof name, "share=%s: second backward doubles dE, dF", shares[sh]);
            ef_check_err(name, err / scale, 1e-6);
            snprintf(name, sizeof name, "share=%s: dq overwritten, from saved only", shares[sh]);
            ef_check_err(name, ef_max_abs_diff(dq1, dq2, in.nq), 0.0);
        }
        ef_free(saved), free(g1), free(out), free(out2), free(dq1), free(dq2), free(dk), free(dv);
        ef_attn_free(a), ef_test_free_inputs(&in), ef_test_free_inputs(&other);
    }
}

/* Loss sum(g o out) of the reference path, in double. */
static double ref_loss(ef_attn *a, const bufs *in, const int32_t *q_lens, const int32_t *lens,
                       float *out) {
    ef_attn_io io = {in->q, in->k, in->v, lens, out, q_lens};
    if (ef_attn_forward(a, &io, NULL)) return NAN;
    double l = 0;
    for (size_t i = 0; i < in->no; i++) l += (double)in->g[i] * out[i];
    return l;
}

/* Central difference of the loss along x[i]; the step actually taken is measured in float. */
static double fd(ef_attn *a, const bufs *in, const int32_t *q_lens, const int32_t *lens, float *out,
                 float *x) {
    const float h = 1e-2f, x0 = *x;
    *x = x0 + h;
    float up = *x;
    double lp = ref_loss(a, in, q_lens, lens, out);
    *x = x0 - h;
    float dn = *x;
    double lm = ref_loss(a, in, q_lens, lens, out);
    *x = x0;
    return (lp - lm) / ((double)up - dn);
}

/* The reference's analytic gradients (parameters, q, k, v) against finite differences. The
 * reference computes in double and rounds its outputs to fp32: a loss of ~24 terms of size ~1
 * carries ~3e-7 of rounding, over a step of 2e-2 that is ~2e-5; the truncation error of the
 * central difference is h^2/6 f''' ~ 2e-5 f''' (measured: about 1e-5 in all). We accept 2e-4
 * of the largest gradient; a wrong transpose, slice or factor gives order 1. Run without and
 * with query padding (q_lens = {2, 1} of 3: the padded entries of q must get 0, and so must
 * their differences, since the forward never reads them). */
static void finite_differences(const int32_t *q_lens) {
    ef_attn_shape s = {2, 2, 3, 5, 3, 2};
    int32_t lens[2] = {5, 3};
    const char *qtag = q_lens ? " q_lens={2,1}" : "";
    for (int sh = 0; sh < 4; sh++) {
        bufs in;
        ef_test_inputs(&in, s, 800, 1.0f);
        char spec[96], name[160];
        snprintf(spec, sizeof spec, "linformer:k=3,share=%s,ref=1,seed=5", shares[sh]);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &s);
        float *out = ef_test_zeros(in.no), *dq = ef_test_zeros(in.nq);
        float *dk = ef_test_zeros(in.nk), *dv = ef_test_zeros(in.nv);
        ef_attn_io io = {in.q, in.k, in.v, lens, out, q_lens};
        if (!st) st = ef_attn_forward(a, &io, NULL);
        if (!st) st = ef_attn_backward(a, &io, NULL, in.g, dq, dk, dv);
        snprintf(name, sizeof name, "FD share=%s%s: reference runs", shares[sh], qtag);
        if (ef_check(name, !st, "%s", ef_last_error())) {
            size_t np = ef_attn_param_count(a);
            float *p = ef_attn_params(a), *gp = ef_attn_param_grads(a);
            struct {
                const char *what;
                float *x, *grad;
                size_t n;
            } sets[4] = {{"dE, dF", p, gp, np},
                         {"dq", in.q, dq, in.nq},
                         {"dk", in.k, dk, in.nk},
                         {"dv", in.v, dv, in.nv}};
            for (int t = 0; t < 4; t++) {
                double err = 0, scale = 1e-2;
                for (size_t i = 0; i < sets[t].n; i++) {
                    double num = fd(a, &in, q_lens, lens, out, &sets[t].x[i]);
                    err = fmax(err, fabs(num - sets[t].grad[i]));
                    scale = fmax(scale, fabs(sets[t].grad[i]));
                }
                snprintf(name, sizeof name, "FD share=%s%s: %s (%zu entries)", shares[sh], qtag,
                         sets[t].what, sets[t].n);
                ef_check_err(name, err / scale, 2e-4);
            }
        }
        free(out), free(dq), free(dk), free(dv);
        ef_attn_free(a), ef_test_free_inputs(&in);
    }
}

/* Loss sum(g o out) of plan a (any path), accumulated in double. */
static double plan_loss(ef_attn *a, const bufs *in, const int32_t *q_lens, const int32_t *lens,
                        float *out) {
    ef_attn_io io = {in->q, in->k, in->v, lens, out, q_lens};
    if (ef_attn_forward(a, &io, NULL)) return NAN;
    double l = 0;
    for (size_t i = 0; i < in->no; i++) l += (double)in->g[i] * out[i];
    return l;
}

/* Directional derivatives of the fast path (and of the reference) with query and key padding:
 * for a Gaussian direction u of q, of k, of v and of the parameters (E, F), the central
 * difference D(h) = (loss(x + h u) - loss(x - h u)) / 2h, extrapolated as
 * (4 D(h/2) - D(h)) / 3 with h = 1e-2, against <grad, u> from backward.
 * Errors: the fp32 loss (312 terms of order 1) carries ~1e-6 of rounding, ~1e-4 after dividing
 * by 2h = 1e-2 and extrapolating; the h^2 truncation term cancels (D(h) alone was off by 3e-3
 * along E, F: u moves all ~700 parameters at once). Measured: <= 2.1e-4 of
 * max(|<grad, u>|, 1); we accept 2e-3. A wrong gradient (a missed mask, transpose or factor)
 * is off by order 1. */
static void directional_derivatives(void) {
    ef_attn_shape s = {2, 2, 13, 17, 8, 6};
    int32_t ql[2] = {9, 13}, kl[2] = {17, 11};
    for (int sh = 0; sh < 4; sh++)
        for (int path = 0; path < 2; path++) {
            char spec[96], name[200];
            snprintf(spec, sizeof spec, "linformer:k=5,share=%s,seed=2%s", shares[sh],
                     path ? ",ref=1" : "");
            bufs in;
            ef_test_inputs(&in, s, 1500 + (uint64_t)sh, 1.0f);
            ef_attn *a = NULL;
            ef_status st = ef_attn_new(&a, spec, &s);
            float *out = ef_test_zeros(in.no), *dq = ef_test_zeros(in.nq);
            float *dk = ef_test_zeros(in.nk), *dv = ef_test_zeros(in.nv);
            void *saved = st ? NULL : ef_test_saved(a);
            ef_attn_io io = {in.q, in.k, in.v, kl, out, ql};
            if (!st) st = ef_attn_forward(a, &io, saved);
            if (!st) st = ef_attn_backward(a, &io, saved, in.g, dq, dk, dv);
            snprintf(name, sizeof name, "directional %s q_lens={9,13} kv_lens={17,11}: runs", spec);
            if (ef_check(name, !st, "%s", st ? ef_last_error() : "")) {
                size_t np = ef_attn_param_count(a);
                float *gp = ef_test_zeros(np);
                memcpy(gp, ef_attn_param_grads(a), np * sizeof(float));
                struct {
                    const char *what;
                    float *x, *grad;
                    size_t n;
                } sets[4] = {{"q", in.q, dq, in.nq},
                             {"k", in.k, dk, in.nk},
                             {"v", in.v, dv, in.nv},
                             {"E, F", ef_attn_params(a), gp, np}};
                for (int t = 0; t < 4; t++) {
                    size_t n = sets[t].n;
                    float *u = ef_test_randn(n, 1600 + (uint64_t)t, 1.0f);
                    float *x0 = ef_test_zeros(n);
                    memcpy(x0, sets[t].x, n * sizeof(float));
                    /* D(h) = (loss(x + h u) - loss(x - h u)) / 2h at h and h/2, combined
                     * by Richardson: (4 D(h/2) - D(h)) / 3 cancels the h^2 term */
                    double dh[2];
                    for (int r = 0; r < 2; r++) {
                        const float h = r ? 5e-3f : 1e-2f;
                        for (size_t i = 0; i < n; i++) sets[t].x[i] = x0[i] + h * u[i];
                        double lp = plan_loss(a, &in, ql, kl, out);
                        for (size_t i = 0; i < n; i++) sets[t].x[i] = x0[i] - h * u[i];
                        double lm = plan_loss(a, &in, ql, kl, out);
                        dh[r] = (lp - lm) / (2.0 * h);
                    }
                    memcpy(sets[t].x, x0, n * sizeof(float));
                    double num = (4 * dh[1] - dh[0]) / 3, an = 0;
                    for (size_t i = 0; i < n; i++) an += (double)sets[t].grad[i] * u[i];
                    snprintf(name, sizeof name, "directional %s: d/d%s (%.4g vs %.4g)", spec,
                             sets[t].what, an, num);
                    ef_check_err(name, fabs(num - an) / fmax(fabs(an), 1.0), 2e-3);
                    free(u), free(x0);
                }
                free(gp);
            }
            free(out), free(dq), free(dk), free(dv), ef_free(saved);
            ef_attn_free(a), ef_test_free_inputs(&in);
        }
}

/* ---------------------------------------------------------------------------------------------
 * Plans: refusals, parameter counts, init, description, saved size, threads
 * ------------------------------------------------------------------------------------------- */
static void refusals(void) {
    ef_attn_shape s = {1, 2, 16, 16, 8, 8};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "linformer:causal=1", &s);
    ef_check_status("causal=1 refused", st, EF_ERR_UNSUPPORTED);
    ef_check("... the message says why", st && strstr(ef_last_error(), "future") != NULL, "%s",
             ef_last_error());
    ef_check("... and no plan", a == NULL, "%p", (void *)a);
    st = ef_attn_new(&a, "linformer:causal=1,ref=1", &s);
    ef_check_status("causal=1 refused on the reference path too", st, EF_ERR_UNSUPPORTED);
    const char *bad[] = {"linformer:k=0", "linformer:k=-1", "linformer:k=1048577",
                         "linformer:k=abc", "linformer:share=both"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "%s -> EF_ERR_ARG", bad[i]);
        ef_check_status(name, ef_attn_new(&a, bad[i], &s), EF_ERR_ARG);
    }
    ef_attn_shape big_d = {1, 1, 8, 8, 257, 8}, big_v = {1, 1, 8, 8, 8, 300},
                  max_d = {1, 1, 8, 8, 256, 256};
    ef_check_status("head_dim=257 refused", ef_attn_new(&a, "linformer:k=4", &big_d),
                    EF_ERR_UNSUPPORTED);
    ef_check_status("v_dim=300 refused", ef_attn_new(&a, "linformer:k=4", &big_v),
                    EF_ERR_UNSUPPORTED);
    st = ef_attn_new(&a, "linformer:k=4", &max_d);
    ef_check_status("head_dim=v_dim=256 accepted", st, EF_OK);
    ef_attn_free(a);
}

static void param_counts(void) {
    ef_attn_shape s = {2, 3, 10, 11, 8, 8}; /* H=3, M=11, k=7 */
    const size_t want[4] = {3 * 2 * 7 * 11, 3 * 7 * 11, 2 * 7 * 11, 7 * 11};
    for (int sh = 0; sh < 4; sh++) {
        char spec[96], name[128];
        snprintf(spec, sizeof spec, "linformer:k=7,share=%s", shares[sh]);
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &s);
        size_t np = st ? 0 : ef_attn_param_count(a);
        snprintf(name, sizeof name, "share=%s: %zu parameters", shares[sh], want[sh]);
        ef_check(name, !st && np == want[sh] && ef_attn_params(a) && ef_attn_param_grads(a),
                 "got %zu (%s)", np, ef_status_str(st));
        ef_attn_free(a);
    }
}

static float *init_of(const char *spec, ef_attn_shape s, size_t *np) {
    ef_attn *a = NULL;
    *np = 0;
    if (ef_attn_new(&a, spec, &s)) return NULL;
    *np = ef_attn_param_count(a);
    float *p = ef_test_zeros(*np);
    memcpy(p, ef_attn_params(a), *np * sizeof(float));
    ef_attn_free(a);
    return p;
}

static void init_determinism(void) {
    ef_attn_shape s = {1, 2, 10, 90, 8, 8};
    size_t n1, n2, n3, n4;
    float *a = init_of("linformer:k=16,seed=7", s, &n1),
          *b = init_of("linformer:k=16,seed=7", s, &n2);
    float *c = init_of("linformer:k=16,seed=8", s, &n3);
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    float *d = init_of("linformer:k=16,seed=7", s, &n4);
    ef_set_num_threads(old);
    int ok = a && b && c && d && n1 == 2 * 2 * 16 * 90 && n2 == n1 && n3 == n1 && n4 == n1;
    ef_check("init plans made", ok, "np %zu", n1);
    if (ok) {
        ef_check("same seed -> identical parameters", !memcmp(a, b, n1 * 4), NULL);
        ef_check("same seed, 1 thread -> identical parameters", !memcmp(a, d, n1 * 4), NULL);
        size_t same = 0;
        for (size_t i = 0; i < n1; i++) same += a[i] == c[i];
        ef_check("another seed -> other parameters", same < n1 / 100, "%zu of %zu equal", same, n1);
        double lo = 1, hi = -1, mean = 0, var = 0, bound = 0.25; /* 1/sqrt(16) */
        for (size_t i = 0; i < n1; i++) lo = fmin(lo, a[i]), hi = fmax(hi, a[i]), mean += a[i];
        mean /= n1;
        for (size_t i = 0; i < n1; i++) var += (a[i] - mean) * (a[i] - mean);
        var /= n1;
        ef_check("values in [-1/sqrt(k), 1/sqrt(k))",
                 lo >= -bound && hi < bound && hi > 0.24 && lo < -0.24, "min %.4f max %.4f", lo,
                 hi);
        /* U(-b, b): mean 0 (std error sqrt(b^2/3/n) = 0.0019), variance b^2/3 (std error ~1%) */
        ef_check_err("mean of the init ~ 0", fabs(mean), 0.01);
        ef_check_err("variance of the init / (1/(3k)) ~ 1", fabs(var / (bound * bound / 3) - 1),
                     0.05);
    }
    free(a), free(b), free(c), free(d);
}

static void describe(void) {
    ef_attn_shape s = {1, 2, 16, 16, 8, 8};
    ef_attn *a = NULL, *b = NULL;
    ef_status st = ef_attn_new(&a, "linformer", &s);
    const char *want = "linformer:k=256,share=none,causal=0,scale=auto,seed=0,ref=0";
    ef_check("default spec described", !st && !strcmp(ef_attn_describe(a), want), "%s",
             st ? ef_last_error() : ef_attn_describe(a));
    ef_attn_free(a);
    st = ef_attn_new(&a, "linformer:share=layerwise,k=5,scale=0.5", &s);
    if (!st) st = ef_attn_new(&b, ef_attn_describe(a), &s);
    ef_check("description parses to the same plan",
             !st && !strcmp(ef_attn_describe(a), ef_attn_describe(b)), "%s",
             st ? ef_last_error() : ef_attn_describe(b));
    ef_attn_free(a), ef_attn_free(b);
    ef_check("help lists the mechanism",
             ef_attn_help("linformer") != NULL &&
                 strstr(ef_attn_help("linformer"), "share") != NULL,
             NULL);
}

/* saved = lse (B*H*N) + K', V' (B*H*k*(D+Dv)) floats, up to 64-byte alignment of the parts;
 * inference and training forward agree; the analytic count is the documented formula. */
static void saved_and_flops(void) {
    ef_attn_shape s = {2, 3, 41, 50, 16, 24};
    bufs in;
    ef_test_inputs(&in, s, 900, 1.0f);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "linformer:k=12", &s);
    ef_check_status("plan", st, EF_OK);
    if (!st) {
        size_t sb = ef_attn_saved_bytes(a), base = 4 * (6 * 41 + 6 * 12 * (16 + 24));
        ef_check("saved bytes = lse + K' + V'", sb >= base && sb < base + 128, "%zu vs %zu", sb,
                 base);
        float *o1 = ef_test_zeros(in.no), *o2 = ef_test_zeros(in.no);
        void *saved = ef_test_saved(a);
        ef_attn_io io1 = {in.q, in.k, in.v, NULL, o1}, io2 = {in.q, in.k, in.v, NULL, o2};
        st = ef_attn_forward(a, &io1, NULL);
        if (!st) st = ef_attn_forward(a, &io2, saved);
        ef_check_status("inference and training forward run", st, EF_OK);
        ef_check_err("inference forward == training forward", ef_max_abs_diff(o1, o2, in.no), 0.0);
        double f = 6.0 * (2 * 12 * 50 * 40 + 2 * 41 * 12 * 40);
        double fb = 6.0 * (6 * 12 * 50 * 40 + 2 * 41 * 12 * (4 * 16 + 3 * 24));
        ef_check("flops: forward 2kM(D+Dv) + 2Nk(D+Dv)", ef_attn_flops(a, 0) == f, "%.0f vs %.0f",
                 ef_attn_flops(a, 0), f);
        ef_check("flops: fwd+bwd 6kM(D+Dv) + 2Nk(4D+3Dv)", ef_attn_flops(a, 1) == fb,
                 "%.0f vs %.0f", ef_attn_flops(a, 1), fb);
        free(o1), free(o2), ef_free(saved);
    }
    ef_attn_free(a), ef_test_free_inputs(&in);
}

/* The result does not depend on the thread count (the products run in a fixed order). */
static void threads_bitwise(void) {
    ef_attn_shape s = {2, 3, 150, 170, 40, 24};
    int32_t lens[2] = {170, 99}, qlens[2] = {150, 61};
    bufs in;
    ef_test_inputs(&in, s, 1000, 1.0f);
    res a, b;
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    ef_status st = run_q("linformer:k=64,share=headwise", &in, qlens, lens, NULL, &a);
    ef_set_num_threads(2);
    if (!st) st = run_q("linformer:k=64,share=headwise", &in, qlens, lens, NULL, &b);
    ef_set_num_threads(old);
    int same = !st && !memcmp(a.out, b.out, in.no * 4) && !memcmp(a.dq, b.dq, in.nq * 4) &&
               !memcmp(a.dk, b.dk, in.nk * 4) && !memcmp(a.dv, b.dv, in.nv * 4) &&
               !memcmp(a.grads, b.grads, a.np * 4);
    ef_check("1 vs 2 threads bitwise (out, dq, dk, dv, dE, dF; q_lens, kv_lens)", same, "%s",
             st     ? ef_last_error()
             : same ? "identical"
                    : "differ");
    res_free(&a), res_free(&b), ef_test_free_inputs(&in);
}

int main(void) {
    versus_reference();
    versus_reference_q_lens();
    identity_is_full();
    padding_values_ignored();
    query_padding_invariance();
    saved_fully_written();
    padding_equals_sliced_plan();
    empty_sequence();
    accumulate_and_saved();
    finite_differences(NULL);
    int32_t fd_q_lens[2] = {2, 1};
    finite_differences(fd_q_lens);
    directional_derivatives();
    refusals();
    param_counts();
    init_determinism();
    describe();
    saved_and_flops();
    threads_bitwise();
    return ef_test_finish();
}
