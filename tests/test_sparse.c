/*
 * test_sparse.c - the block-sparse layouts of sparse.c (local, blocklocal, strided, fixed,
 * longformer, bigbird, bigbird-etc), all on the tiled engine.
 *
 *   1. fast path == reference path (the same spec with ref=1: double-precision loops with the
 *      mask of `visible` explicit), forward and backward (out, dq, dk, dv), for every option
 *      value of every pattern, causal 0 and 1, on sizes that are and are not multiples of the
 *      block and of the 64-token tile, odd head dims, batch and heads >= 2, key padding
 *      (including a sequence padded to 0 keys, whose outputs must be exactly zero) and
 *      q_len != kv_len;
 *   2. limit cases that equal `flash` (a window or block covering everything, every token
 *      global), each paired with a near miss that must differ, so the comparison can fail;
 *   3. the layouts: ef_attn_visible_pairs against a brute-force count of ef_attn_visible (the
 *      engine's span and mask bookkeeping), every pattern against its definition written out
 *      here independently, Longformer's global rows and columns, BigBird's block structure,
 *      global blocks, window, exactly `random` distinct extra blocks per query block, its
 *      "does not fit" boundary, seeds and heads, ETC as a shifted ITC layout, and closed-form
 *      pair counts;
 *   4. bad specs (status and a message naming the value), thread-count bitwise equality and
 *      padding invariance.
 *
 * Tolerances (as test_flash.c, same reason): both paths accumulate over the visible keys in
 * different orders (fp32 tiles with an online softmax vs one double row at a time), so they
 * differ by a few ulps per term. We measure max|fast - ref| / max|ref| and accept 2e-5 forward
 * and 1e-4 backward (the backward chains three products and the cancelling dP - delta); these
 * are xformers' fp32 tolerances (ALGORITHMS.md b.1) made relative. A wrong mask, tile edge or
 * span gives errors of order 1. Layout counts are integers: compared exactly (tol 0).
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int imax(int a, int b) { return a > b ? a : b; }
static const double TOL_F = 2e-5, TOL_B = 1e-4;

/* ---------------------------------------------------------------------------------------------
 * Buffers and runs (as test_flash.c)
 * ------------------------------------------------------------------------------------------- */
typedef ef_test_bufs bufs;

static uint64_t input_seed(ef_attn_shape s) { return 1000 + (uint64_t)s.q_len * 7 + s.kv_len; }

static void shape_str(char *buf, size_t cap, ef_attn_shape s, const int32_t *lens) {
    int n = snprintf(buf, cap, "B%d H%d %dx%d D%d/%d", s.batch, s.heads, s.q_len, s.kv_len,
                     s.head_dim, s.v_dim);
    for (int b = 0; lens && b < s.batch && n > 0 && (size_t)n < cap; b++)
        n += snprintf(buf + n, cap - (size_t)n, "%s%d%s", b ? "," : " lens{", lens[b],
                      b + 1 == s.batch ? "}" : "");
}

/* max|a - b| / max(max|b|, floor). */
static double rel_diff_floor(const float *a, const float *b, size_t n, double floor) {
    double scale = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)b[i]));
    return ef_max_abs_diff(a, b, n) / fmax(scale, floor);
}

/* fast vs ref outputs of one run: finite, then the four relative errors. dq and dk are
 * measured against max(max|ref|, qk_floor): qk_floor = 1e-2 is the harness's floor; patterns in
 * which every row sees a single key pass 1 (see check_mech). */
static void compare_outs(const char *label, const bufs *in, const bufs *fa, const bufs *rf,
                         double tol_f, double tol_b, double qk_floor) {
    char name[512];
    int bad = ef_test_any_nonfinite(fa->out, in->no) || ef_test_any_nonfinite(fa->dq, in->nq) ||
              ef_test_any_nonfinite(fa->dk, in->nk) || ef_test_any_nonfinite(fa->dv, in->nv);
    snprintf(name, sizeof name, "%s: outputs finite", label);
    ef_check(name, !bad, "%s", bad ? "NaN or inf found" : "all finite");
    snprintf(name, sizeof name, "%s: out", label);
    ef_check_err(name, ef_max_rel_diff(fa->out, rf->out, in->no), tol_f);
    snprintf(name, sizeof name, "%s: dq", label);
    ef_check_err(name, rel_diff_floor(fa->dq, rf->dq, in->nq, qk_floor), tol_b);
    snprintf(name, sizeof name, "%s: dk", label);
    ef_check_err(name, rel_diff_floor(fa->dk, rf->dk, in->nk, qk_floor), tol_b);
    snprintf(name, sizeof name, "%s: dv", label);
    ef_check_err(name, ef_max_rel_diff(fa->dv, rf->dv, in->nv), tol_b);
}

/* Two specs on the same inputs (fast paths of both, e.g. a limit case against flash). */
static void compare_specs(const char *label, ef_attn_shape s, const char *spec_a,
                          const char *spec_b, const int32_t *kv_lens) {
    char name[512];
    bufs in, ra, rb;
    ef_test_inputs(&in, s, input_seed(s), 1.0f);
    ef_test_outputs(&ra, &in), ef_test_outputs(&rb, &in);
    ef_status st1 = ef_test_run(spec_a, &in, kv_lens, &ra);
    ef_status st2 = st1 ? st1 : ef_test_run(spec_b, &in, kv_lens, &rb);
    snprintf(name, sizeof name, "%s: both run", label);
    if (ef_check(name, st1 == EF_OK && st2 == EF_OK, "%s / %s: %s %s", spec_a, spec_b,
                 ef_status_str(st1 ? st1 : st2), ef_last_error()))
        compare_outs(label, &in, &ra, &rb, TOL_F, TOL_B, 1e-2);
    ef_test_free_outputs(&ra), ef_test_free_outputs(&rb), ef_test_free_inputs(&in);
}

/* A near miss of a limit case: spec_a and spec_b differ in a few pairs, so their outputs must
 * differ by more than the forward tolerance (shows the equality check above can fail). */
static void must_differ(const char *label, ef_attn_shape s, const char *spec_a, const char *spec_b,
                        const int32_t *kv_lens) {
    bufs in, ra, rb;
    ef_test_inputs(&in, s, input_seed(s), 1.0f);
    ef_test_outputs(&ra, &in), ef_test_outputs(&rb, &in);
    ef_status st = ef_test_run(spec_a, &in, kv_lens, &ra);
    if (!st) st = ef_test_run(spec_b, &in, kv_lens, &rb);
    double e = st ? 0 : ef_max_rel_diff(ra.out, rb.out, in.no);
    ef_check(label, !st && e > TOL_F, "%s vs %s: out differs by %.3e (must exceed %.1e) %s", spec_a,
             spec_b, e, TOL_F, st ? ef_last_error() : "");
    ef_test_free_outputs(&ra), ef_test_free_outputs(&rb), ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * Each pattern written out from its definition (sparse.c / eformer help), independently of
 * sparse.c's code. ef_attn_visible includes the causal rule (j <= i), so these do too.
 * ------------------------------------------------------------------------------------------- */
enum { P_LOCAL = 1, P_BLOCKLOCAL, P_STRIDED, P_FIXED, P_LONGFORMER };

typedef struct pcfg {
    int kind, causal;
    int p1, p2;        /* window | block, - | summary | dilation */
    int gcount;        /* longformer: the first gcount positions are global */
    int gpos[4], npos; /* longformer: listed global positions */
} pcfg;

static int lf_is_global(const pcfg *c, int p) {
    if (p < c->gcount) return 1;
    for (int x = 0; x < c->npos; x++)
        if (c->gpos[x] == p) return 1;
    return 0;
}

static int expect_visible(const pcfg *c, int i, int j) {
    int d = i - j, ad = d < 0 ? -d : d;
    if (c->causal && j > i) return 0;
    switch (c->kind) {
    case P_LOCAL: /* |i-j| <= W/2; causal: i-W < j <= i */
        return c->causal ? d < c->p1 : ad <= c->p1 / 2;
    case P_BLOCKLOCAL: /* same block */ return i / c->p1 == j / c->p1;
    case P_STRIDED: /* |i-j| < l (causal: i-j < l) or l divides i-j */
        return (c->causal ? d < c->p1 : ad < c->p1) || d % c->p1 == 0;
    case P_FIXED: /* same block, or j among the last c tokens of its block */
        return i / c->p1 == j / c->p1 || j % c->p1 >= c->p1 - c->p2;
    case P_LONGFORMER: { /* dilated window (W/2)*dil each side, causal W*dil back; globals */
        int w = c->p1, dil = c->p2;
        int win = d % dil == 0 && (c->causal ? d < w * dil : ad <= w / 2 * dil);
        return win || lf_is_global(c, i) || lf_is_global(c, j);
    }
    }
    return -1;
}

/* visible_pairs(h) == the number of pairs ef_attn_visible accepts, for every head. */
static void check_pairs(const char *label, const ef_attn *a) {
    ef_attn_shape s = ef_attn_get_shape(a);
    int64_t worst = 0, got0 = 0, want0 = 0;
    for (int h = 0; h < s.heads; h++) {
        int64_t want = 0;
        for (int i = 0; i < s.q_len; i++)
            for (int j = 0; j < s.kv_len; j++) {
                int v = ef_attn_visible(a, h, i, j);
                want += v < 0 ? 1000000000 : v; /* an error is a failure */
            }
        int64_t got = ef_attn_visible_pairs(a, h), diff = llabs(got - want);
        if (h == 0 || diff > worst) got0 = got, want0 = want;
        if (diff > worst) worst = diff;
    }
    char name[512];
    snprintf(name, sizeof name, "%.400s: visible_pairs == brute-force count", label);
    ef_check(name, worst == 0, "pairs %lld brute %lld, max |diff| over %d heads %lld (tol 0)",
             (long long)got0, (long long)want0, s.heads, (long long)worst);
}

/* ef_attn_visible == the definition above, over every pair of every head. */
static void check_pattern(const char *label, const ef_attn *a, const pcfg *c) {
    ef_attn_shape s = ef_attn_get_shape(a);
    int64_t bad = 0, total = 0;
    int fh = -1, fi = -1, fj = -1, fv = 0, fe = 0;
    for (int h = 0; h < s.heads; h++)
        for (int i = 0; i < s.q_len; i++)
            for (int j = 0; j < s.kv_len; j++) {
                int v = ef_attn_visible(a, h, i, j), e = expect_visible(c, i, j);
                total++;
                if (v != e && !bad++) fh = h, fi = i, fj = j, fv = v, fe = e;
            }
    char name[512];
    snprintf(name, sizeof name, "%.400s: visible == definition", label);
    ef_check(name, bad == 0, "%lld of %lld pairs differ (tol 0)%s h=%d i=%d j=%d: %d, want %d",
             (long long)bad, (long long)total, bad ? "; first" : "", fh, fi, fj, fv, fe);
}

/* Exactly zero outputs and gradients for every batch whose kv_lens entry is 0. */
static void check_empty(const char *label, const bufs *in, const bufs *o, const int32_t *lens) {
    ef_attn_shape s = in->s;
    for (int b = 0; lens && b < s.batch; b++) {
        if (lens[b] != 0) continue;
        size_t hq = (size_t)s.heads * s.q_len, hk = (size_t)s.heads * s.kv_len, b0 = (size_t)b;
        double m = 0;
        for (size_t x = 0; x < hq * s.v_dim; x++) m = fmax(m, fabs(o->out[b0 * hq * s.v_dim + x]));
        for (size_t x = 0; x < hq * s.head_dim; x++)
            m = fmax(m, fabs(o->dq[b0 * hq * s.head_dim + x]));
        for (size_t x = 0; x < hk * s.head_dim; x++)
            m = fmax(m, fabs(o->dk[b0 * hk * s.head_dim + x]));
        for (size_t x = 0; x < hk * s.v_dim; x++) m = fmax(m, fabs(o->dv[b0 * hk * s.v_dim + x]));
        char name[512];
        snprintf(name, sizeof name, "%.400s: batch %d (0 keys) out/dq/dk/dv == 0 (max |value|)",
                 label, b);
        ef_check_err(name, m, 0.0);
    }
}

/* The central check: spec's fast path against spec + ref=1, forward and backward, plus the
 * layout bookkeeping of the fast plan (and its definition when c != NULL). */
static void check_mech(const char *spec, ef_attn_shape s, const int32_t *lens, const pcfg *c) {
    char label[512], shp[160], ref_spec[300];
    shape_str(shp, sizeof shp, s, lens);
    snprintf(label, sizeof label, "%s %s", spec, shp);
    snprintf(ref_spec, sizeof ref_spec, "%s%sref=1", spec, strchr(spec, ':') ? "," : ":");
    bufs in, fa, rf;
    ef_test_inputs(&in, s, input_seed(s), 1.0f);
    ef_test_outputs(&fa, &in), ef_test_outputs(&rf, &in);
    ef_attn *a = NULL;
    ef_status st1 = ef_attn_new(&a, spec, &s), st2 = EF_OK;
    if (!st1) {
        check_pairs(label, a);
        if (c) check_pattern(label, a, c);
        st1 = ef_test_run_plan(a, &in, lens, &fa, 1);
    }
    ef_attn_free(a);
    if (!st1) st2 = ef_test_run(ref_spec, &in, lens, &rf);
    char name[600];
    snprintf(name, sizeof name, "%s: fast and ref run", label);
    if (ef_check(name, st1 == EF_OK && st2 == EF_OK, "%s %s", ef_status_str(st1 ? st1 : st2),
                 st1 || st2 ? ef_last_error() : "")) {
        /* window=1 / block=1: every row sees one key, P = 1, and the reference dq, dk are
         * exactly 0 (dS = P (dP - delta) with dP = delta). The fast path forms dP - delta in
         * fp32 from two dot products of size |dO||v| ~ 10-40, leaving a few ulps of that,
         * times scale |k|: ~1e-6 absolute. So dq, dk are compared absolutely (floor 1) at
         * 1e-4; a row that saw a second key would give O(0.1-1). */
        int single = c && (c->kind == P_LOCAL || c->kind == P_BLOCKLOCAL) && c->p1 == 1;
        compare_outs(label, &in, &fa, &rf, TOL_F, TOL_B, single ? 1.0 : 1e-2);
        check_empty(label, &in, &fa, lens);
    }
    ef_test_free_outputs(&fa), ef_test_free_outputs(&rf), ef_test_free_inputs(&in);
}

/* ---------------------------------------------------------------------------------------------
 * 1. Fast == reference for every option of local, blocklocal, strided, fixed, longformer
 * ------------------------------------------------------------------------------------------- */
typedef struct shape_case {
    ef_attn_shape s;
    int32_t lens[2];
    int has_lens;
} shape_case;

/* N a multiple of the tile and not, odd head dims, padding to 0 keys and to a non-multiple of
 * 64, a sequence of exactly one tile */
static const shape_case SQUARE[] = {
    {{2, 2, 200, 200, 24, 40}, {200, 77}, 1},
    {{1, 2, 128, 128, 64, 64}, {0, 0}, 0},
    {{2, 2, 257, 257, 24, 40}, {0, 130}, 1},
    {{2, 3, 64, 64, 7, 5}, {64, 33}, 1},
};
enum { N_SQUARE = sizeof SQUARE / sizeof SQUARE[0] };
/* q_len != kv_len (top-left aligned): rows past kv_len, padding to exactly one tile */
static const shape_case RECT[] = {
    {{2, 2, 150, 200, 24, 40}, {200, 111}, 1},
    {{2, 2, 200, 150, 24, 40}, {64, 150}, 1},
};
static int g_rot; /* rotates the square shapes over the option sets */

/* One option set of one mechanism, causal 0 and 1: the next square shape with q_len >= min_n,
 * and (rect) a q_len != kv_len shape. */
static void mech_case(const char *mech, const char *opts, pcfg c, int rect, int min_n) {
    for (int causal = 0; causal < 2; causal++) {
        char spec[256];
        snprintf(spec, sizeof spec, "%s:%s,causal=%d", mech, opts, causal);
        c.causal = causal;
        const shape_case *sc;
        do sc = &SQUARE[g_rot++ % N_SQUARE];
        while (sc->s.q_len < min_n);
        check_mech(spec, sc->s, sc->has_lens ? sc->lens : NULL, &c);
        if (rect) {
            const shape_case *rc = &RECT[(g_rot + causal) % 2];
            check_mech(spec, rc->s, rc->lens, &c);
        }
    }
}

static void fast_vs_ref(void) {
    char opts[128];
    /* plus 63 and 127: windows whose edge falls on a tile edge (i - j = 64k + 63) */
    static const int local_w[] = {1, 2, 17, 64, 65, 1000, 63, 127};
    for (size_t x = 0; x < sizeof local_w / sizeof local_w[0]; x++) {
        snprintf(opts, sizeof opts, "window=%d", local_w[x]);
        mech_case("local", opts, (pcfg){.kind = P_LOCAL, .p1 = local_w[x]}, 1, 0);
    }
    static const int bl_b[] = {1, 16, 64, 100};
    for (size_t x = 0; x < sizeof bl_b / sizeof bl_b[0]; x++) {
        snprintf(opts, sizeof opts, "block=%d", bl_b[x]);
        mech_case("blocklocal", opts, (pcfg){.kind = P_BLOCKLOCAL, .p1 = bl_b[x]}, 1, 0);
    }
    static const int st_b[] = {1, 7, 64, 130};
    for (size_t x = 0; x < sizeof st_b / sizeof st_b[0]; x++) {
        snprintf(opts, sizeof opts, "block=%d", st_b[x]);
        mech_case("strided", opts, (pcfg){.kind = P_STRIDED, .p1 = st_b[x]}, 1, 0);
    }
    static const int fx[][2] = {{16, 1}, {64, 16}, {100, 100}};
    for (size_t x = 0; x < sizeof fx / sizeof fx[0]; x++) {
        snprintf(opts, sizeof opts, "block=%d,summary=%d", fx[x][0], fx[x][1]);
        mech_case("fixed", opts, (pcfg){.kind = P_FIXED, .p1 = fx[x][0], .p2 = fx[x][1]}, 1, 0);
    }
    /* global positions up to 77: shapes with at least 78 positions */
    static const struct {
        int w, dil;
        const char *g;
        pcfg c;
    } lf[] = {
        {16, 1, "0", {.gcount = 0}},
        {31, 1, "2", {.gcount = 2}},
        {9, 3, "0;50;77", {.gpos = {0, 50, 77}, .npos = 3}},
        {8, 2, "5;", {.gpos = {5}, .npos = 1}},
        /* window edges on a tile edge: non-causal 127/2 = 63, causal 64 - 1 = 63 */
        {127, 1, "1", {.gcount = 1}},
        {64, 1, "3;", {.gpos = {3}, .npos = 1}},
    };
    for (size_t x = 0; x < sizeof lf / sizeof lf[0]; x++) {
        snprintf(opts, sizeof opts, "window=%d,dilation=%d,global=%s", lf[x].w, lf[x].dil, lf[x].g);
        pcfg c = lf[x].c;
        c.kind = P_LONGFORMER, c.p1 = lf[x].w, c.p2 = lf[x].dil;
        mech_case("longformer", opts, c, 1, 78);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 2. BigBird: the layout, written out independently, and fast == reference over the grid
 * block {8,16,64} x random {0,1,3} x window {1,3,5} x global {0,1,2}
 * ------------------------------------------------------------------------------------------- */
/* global blocks: the first ceil(g/2) and the last floor(g/2) */
static int bb_is_global(int nb, int g, int b) { return b < (g + 1) / 2 || b >= nb - g / 2; }

/* Non-global blocks inside the window of query block qb (|qb-kb| <= w/2, clipped). */
static int bb_window_ng(int nb, int w, int g, int qb) {
    int c = 0;
    for (int kb = qb - w / 2; kb <= qb + w / 2; kb++)
        c += kb >= 0 && kb < nb && !bb_is_global(nb, g, kb);
    return c;
}

/* Every non-global query block has at least r non-global blocks outside its window. */
static int bb_fits(int nb, int w, int g, int r) {
    if (g > nb) return 0;
    for (int qb = 0; qb < nb; qb++) {
        if (bb_is_global(nb, g, qb)) continue;
        if (nb - g - bb_window_ng(nb, w, g, qb) < r) return 0;
    }
    return 1;
}

/* Visible block pairs of one head: global rows see all nb blocks; every other row sees the g
 * global blocks, its non-global window blocks and r random blocks. */
static int64_t bb_block_pairs(int nb, int w, int g, int r) {
    int64_t c = 0;
    for (int qb = 0; qb < nb; qb++)
        c += bb_is_global(nb, g, qb) ? nb : g + bb_window_ng(nb, w, g, qb) + r;
    return c;
}

/* The layout properties of a non-causal BigBird ITC plan with n tokens. */
static void bigbird_layout(const char *label, const ef_attn *a, int bs, int w, int r, int g) {
    ef_attn_shape s = ef_attn_get_shape(a);
    int n = s.q_len, nb = (n + bs - 1) / bs;
    int64_t not_const = 0, glob_miss = 0, win_miss = 0, rand_bad = 0, pair_diff = 0;
    int rmin = 1 << 30, rmax = -1;
    int *cnt = calloc((size_t)nb, sizeof(int));
    for (int h = 0; h < s.heads; h++) {
        /* block structure: every pair sees what the first pair of its block pair sees */
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++)
                not_const +=
                    ef_attn_visible(a, h, i, j) != ef_attn_visible(a, h, i / bs * bs, j / bs * bs);
        memset(cnt, 0, sizeof(int) * (size_t)nb);
        for (int qb = 0; qb < nb; qb++)
            for (int kb = 0; kb < nb; kb++) {
                int v = ef_attn_visible(a, h, qb * bs, kb * bs), d = qb - kb;
                if (bb_is_global(nb, g, qb) || bb_is_global(nb, g, kb))
                    glob_miss += v != 1;
                else if (d <= w / 2 && -d <= w / 2)
                    win_miss += v != 1;
                else
                    cnt[qb] += v == 1;
            }
        for (int qb = 0; qb < nb; qb++) {
            if (bb_is_global(nb, g, qb)) continue;
            rand_bad += cnt[qb] != r;
            rmin = cnt[qb] < rmin ? cnt[qb] : rmin, rmax = cnt[qb] > rmax ? cnt[qb] : rmax;
        }
        if (n % bs == 0)
            pair_diff +=
                llabs(ef_attn_visible_pairs(a, h) - (int64_t)bs * bs * bb_block_pairs(nb, w, g, r));
    }
    free(cnt);
    char name[512];
    snprintf(name, sizeof name, "%.400s: visibility constant on block pairs", label);
    ef_check(name, not_const == 0, "%lld pairs differ from their block (tol 0)",
             (long long)not_const);
    snprintf(name, sizeof name, "%.400s: global block rows and columns complete", label);
    ef_check(name, glob_miss == 0, "%lld global block pairs hidden (tol 0)", (long long)glob_miss);
    snprintf(name, sizeof name, "%.400s: window blocks visible", label);
    ef_check(name, win_miss == 0, "%lld window block pairs hidden (tol 0)", (long long)win_miss);
    snprintf(name, sizeof name, "%.400s: exactly random=%d extra blocks per query block", label, r);
    ef_check(name, rand_bad == 0,
             "extra blocks per non-global query block in [%d, %d], want %d; "
             "%lld blocks wrong (tol 0)",
             rmax < 0 ? r : rmin, rmax < 0 ? r : rmax, r, (long long)rand_bad);
    if (n % bs == 0) {
        snprintf(name, sizeof name, "%.400s: pairs == bs^2 x predicted block pairs", label);
        ef_check(name, pair_diff == 0,
                 "predicted %lld per head, sum |diff| over heads %lld (tol 0)",
                 (long long)bs * bs * bb_block_pairs(nb, w, g, r), (long long)pair_diff);
    }
}

/* One combination of the grid (idx: its position, which picks the seed and N's kind). */
static void bigbird_combo(int idx, int bs, int r, int w, int g) {
    /* the fewest blocks that leave a non-global query block and fit; past g blocks, adding a
     * block never removes candidates, so every larger count fits too */
    int nb_min = g + 1;
    while (!bb_fits(nb_min, w, g, r)) nb_min++;
    char opts[160], spec[256], label[512], name[600];
    snprintf(opts, sizeof opts, "block=%d,window=%d,random=%d,global=%d,seed=%d", bs, w, r, g,
             100 + idx);
    snprintf(spec, sizeof spec, "bigbird:%s", opts);
    /* one block fewer must be refused as "does not fit" (the boundary) */
    if (r > 0 && nb_min - 1 > g) {
        ef_attn_shape s0 = {1, 2, (nb_min - 1) * bs, (nb_min - 1) * bs, 8, 8};
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, spec, &s0);
        const char *msg = ef_last_error();
        snprintf(label, sizeof label, "%s N=%d (%d blocks): refused, 'does not fit'", spec,
                 s0.q_len, nb_min - 1);
        ef_check(label, st == EF_ERR_ARG && strstr(msg, "does not fit"), "%s: %s",
                 ef_status_str(st), msg);
        ef_attn_free(a);
    }
    /* at least ~150 tokens for the small blocks; N a multiple of the block for every other
     * combination, else a last block of bs/2+1 tokens */
    int nb = bs < 64 ? imax(nb_min, 150 / bs + 1) : imax(nb_min, 3);
    while (!bb_fits(nb, w, g, r)) nb++;
    int n = idx % 2 ? nb * bs : (nb - 1) * bs + bs / 2 + 1;
    ef_attn_shape s = {2, 2, n, n, 12, 20};
    int32_t lens[2] = {n, n - n / 3};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    snprintf(label, sizeof label, "%s N=%d (%d blocks)", spec, n, nb);
    snprintf(name, sizeof name, "%s: accepted (fits)", label);
    ef_check_status(name, st, EF_OK);
    if (!st) bigbird_layout(label, a, bs, w, r, g);
    ef_attn_free(a);
    for (int causal = 0; causal < 2; causal++) {
        snprintf(spec, sizeof spec, "bigbird:%s,causal=%d", opts, causal);
        check_mech(spec, s, lens, NULL);
    }
}

static void bigbird_grid(void) {
    static const int BS[] = {8, 16, 64}, RND[] = {0, 1, 3}, WIN[] = {1, 3, 5}, GLB[] = {0, 1, 2};
    int idx = 0;
    for (int x = 0; x < 3; x++)
        for (int y = 0; y < 3; y++)
            for (int z = 0; z < 3; z++)
                for (int t = 0; t < 3; t++) bigbird_combo(idx++, BS[x], RND[y], WIN[z], GLB[t]);
    /* blocks that do not divide the 16-row vector tile (a tile then straddles two or three
     * query blocks and the spans merge their lists), and one longer than a tile */
    bigbird_combo(idx++, 24, 3, 3, 2);
    bigbird_combo(idx++, 5, 2, 3, 1);
    bigbird_combo(idx++, 40, 1, 1, 2);
    bigbird_combo(idx++, 96, 1, 3, 1);
}

/* Seeds and heads: the same seed gives the same layout in two plans, another seed another one,
 * and the heads of one plan differ from each other. */
static void bigbird_seeds(void) {
    ef_attn_shape s = {1, 4, 512, 512, 8, 8};
    const char *specs[3] = {"bigbird:block=16,window=3,random=3,global=2,seed=7",
                            "bigbird:block=16,window=3,random=3,global=2,seed=7",
                            "bigbird:block=16,window=3,random=3,global=2,seed=8"};
    ef_attn *p[3] = {NULL, NULL, NULL};
    ef_status st = EF_OK;
    for (int x = 0; x < 3 && !st; x++) st = ef_attn_new(&p[x], specs[x], &s);
    ef_check_status("bigbird seeds: plans created", st, EF_OK);
    if (!st) {
        int64_t same = 0, other = 0, heads_min = INT64_MAX;
        for (int h = 0; h < s.heads; h++)
            for (int i = 0; i < s.q_len; i++)
                for (int j = 0; j < s.kv_len; j++) {
                    int v = ef_attn_visible(p[0], h, i, j);
                    same += v != ef_attn_visible(p[1], h, i, j);
                    other += v != ef_attn_visible(p[2], h, i, j);
                }
        for (int h1 = 0; h1 < s.heads; h1++)
            for (int h2 = h1 + 1; h2 < s.heads; h2++) {
                int64_t d = 0;
                for (int i = 0; i < s.q_len; i++)
                    for (int j = 0; j < s.kv_len; j++)
                        d += ef_attn_visible(p[0], h1, i, j) != ef_attn_visible(p[0], h2, i, j);
                if (d < heads_min) heads_min = d;
            }
        ef_check("bigbird: same seed, two plans -> identical layout", same == 0,
                 "%lld pairs differ (tol 0)", (long long)same);
        ef_check("bigbird: seed 7 vs seed 8 -> different layouts", other > 0,
                 "%lld pairs differ (must be > 0)", (long long)other);
        ef_check("bigbird: the 4 heads have pairwise different layouts", heads_min > 0,
                 "fewest differing pairs between two heads %lld (must be > 0)",
                 (long long)heads_min);
    }
    for (int x = 0; x < 3; x++) ef_attn_free(p[x]);
}

/* bigbird-etc: `extra` global tokens, then the ITC layout shifted by extra. Each case with
 * another global count (with global=0 no block is global, so the extra rows and columns are the
 * only full ones). */
static void bigbird_etc(void) {
    static const struct {
        int extra;
        const char *opts;
    } cases[] = {
        {1, "block=16,window=3,random=1,global=2,seed=5"},
        {5, "block=16,window=1,random=2,global=0,seed=6"},
        {64, "block=16,window=3,random=1,global=1,seed=7"},
    };
    for (size_t x = 0; x < sizeof cases / sizeof cases[0]; x++) {
        int e = cases[x].extra, n = 200;
        const char *opts = cases[x].opts;
        char spec[256], spec_itc[256], label[512];
        snprintf(spec, sizeof spec, "bigbird-etc:%s,extra=%d", opts, e);
        snprintf(spec_itc, sizeof spec_itc, "bigbird:%s", opts);
        ef_attn_shape s = {2, 2, n, n, 24, 40}, s_itc = {1, 2, n - e, n - e, 8, 8};
        ef_attn *a = NULL, *b = NULL;
        ef_status st = ef_attn_new(&a, spec, &s);
        if (!st) st = ef_attn_new(&b, spec_itc, &s_itc);
        snprintf(label, sizeof label, "%.200s and %.200s N=%d: plans", spec, spec_itc, n - e);
        ef_check_status(label, st, EF_OK);
        if (!st) {
            int64_t etc_miss = 0, shift_diff = 0;
            for (int h = 0; h < s.heads; h++)
                for (int i = 0; i < n; i++)
                    for (int j = 0; j < n; j++) {
                        int v = ef_attn_visible(a, h, i, j);
                        if (i < e || j < e)
                            etc_miss += v != 1;
                        else
                            shift_diff += v != ef_attn_visible(b, h, i - e, j - e);
                    }
            snprintf(label, sizeof label, "%s: extra rows and columns complete", spec);
            ef_check(label, etc_miss == 0, "%lld pairs hidden (tol 0)", (long long)etc_miss);
            snprintf(label, sizeof label, "%s: the rest == bigbird at N-extra, same seed", spec);
            ef_check(label, shift_diff == 0, "%lld pairs differ (tol 0)", (long long)shift_diff);
        }
        ef_attn_free(a), ef_attn_free(b);
        int32_t lens[2] = {n, 101};
        for (int causal = 0; causal < 2; causal++) {
            snprintf(spec, sizeof spec, "bigbird-etc:%s,extra=%d,causal=%d", opts, e, causal);
            check_mech(spec, s, lens, NULL);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * 3. Limit cases equal to flash (fast paths), each with a near miss that must differ
 * ------------------------------------------------------------------------------------------- */
static void limit_cases(void) {
    ef_attn_shape s = {2, 2, 200, 200, 24, 40};
    int32_t lens[2] = {200, 77};
    /* local: window >= 2N-1 covers |i-j| <= N-1; causal: window >= N covers i-j <= N-1 */
    compare_specs("local:window=399 (2N-1) == flash", s, "local:window=399", "flash", lens);
    compare_specs("local:window=1000 == flash", s, "local:window=1000", "flash", lens);
    compare_specs("local:window=200,causal=1 (N) == flash:causal=1", s, "local:window=200,causal=1",
                  "flash:causal=1", lens);
    must_differ("near miss: local:window=397 != flash", s, "local:window=397", "flash", NULL);
    must_differ("near miss: local:window=199,causal=1 != flash:causal=1", s,
                "local:window=199,causal=1", "flash:causal=1", NULL);
    /* block=auto: sqrt(N) to a multiple of 16 (sqrt 200 = 14.1 -> 16); summary=auto = min(32,
     * block) */
    compare_specs("strided:block=auto == strided:block=16 at N=200", s, "strided:block=auto",
                  "strided:block=16", lens);
    compare_specs("fixed:block=auto,summary=auto == fixed:block=16,summary=16 at N=200", s,
                  "fixed:block=auto,summary=auto,causal=1", "fixed:block=16,summary=16,causal=1",
                  lens);
    must_differ("near miss: strided:block=auto != strided:block=32", s, "strided:block=auto",
                "strided:block=32", NULL);
    /* blocklocal: one block holds the sequence */
    compare_specs("blocklocal:block=200 == flash", s, "blocklocal:block=200", "flash", lens);
    compare_specs("blocklocal:block=1000,causal=1 == flash:causal=1", s,
                  "blocklocal:block=1000,causal=1", "flash:causal=1", lens);
    must_differ("near miss: blocklocal:block=199 != flash", s, "blocklocal:block=199", "flash",
                NULL);
    /* longformer: every token global */
    compare_specs("longformer:window=1,global=200 == flash", s, "longformer:window=1,global=200",
                  "flash", lens);
    compare_specs("longformer:window=1,global=200,causal=1 == flash:causal=1", s,
                  "longformer:window=1,global=200,causal=1", "flash:causal=1", lens);
    /* with N-1 globals the last token sees every global key and itself: all pairs */
    compare_specs("longformer:window=1,global=199 (N-1) == flash", s,
                  "longformer:window=1,global=199", "flash", lens);
    must_differ("near miss: longformer:window=1,global=198 != flash", s,
                "longformer:window=1,global=198", "flash", NULL);
    /* longformer without globals and dilation == local with the same window */
    compare_specs("longformer:window=17,global=0 == local:window=17", s,
                  "longformer:window=17,dilation=1,global=0", "local:window=17", lens);
    compare_specs("longformer:window=16,global=0,causal=1 == local:window=16,causal=1", s,
                  "longformer:window=16,dilation=1,global=0,causal=1", "local:window=16,causal=1",
                  lens);
    /* bigbird: 13 blocks of 16; window 25 = 2*13-1 blocks covers them all; or all global */
    compare_specs("bigbird:block=16,random=0,global=0,window=25 == flash", s,
                  "bigbird:block=16,random=0,global=0,window=25", "flash", lens);
    compare_specs("bigbird:block=16,random=0,global=1,window=25,causal=1 == flash:causal=1", s,
                  "bigbird:block=16,random=0,global=1,window=25,causal=1", "flash:causal=1", lens);
    compare_specs("bigbird:block=16,random=0,global=13,window=1 == flash", s,
                  "bigbird:block=16,random=0,global=13,window=1", "flash", lens);
    must_differ("near miss: bigbird:block=16,random=0,global=0,window=23 != flash", s,
                "bigbird:block=16,random=0,global=0,window=23", "flash", NULL);
    /* bigbird-etc: 199 extra tokens, the last one alone in its block sees its block */
    compare_specs("bigbird-etc:extra=199,random=0,global=0,window=1 == flash", s,
                  "bigbird-etc:extra=199,block=16,random=0,global=0,window=1", "flash", lens);
    /* strided with stride 1, or a stride beyond the sequence; fixed with summary = block */
    compare_specs("strided:block=1 == flash", s, "strided:block=1", "flash", lens);
    compare_specs("strided:block=200 == flash", s, "strided:block=200", "flash", lens);
    compare_specs("fixed:block=64,summary=64 == flash", s, "fixed:block=64,summary=64", "flash",
                  lens);
    must_differ("near miss: fixed:block=64,summary=63 != flash", s, "fixed:block=64,summary=63",
                "flash", NULL);
}

/* ---------------------------------------------------------------------------------------------
 * 4. Layout properties and closed-form densities
 * ------------------------------------------------------------------------------------------- */
static void local_density(void) {
    static const int ws[] = {1, 2, 17, 64, 65};
    int n = 1000;
    ef_attn_shape s = {1, 1, n, n, 8, 8};
    for (size_t x = 0; x < sizeof ws / sizeof ws[0]; x++)
        for (int causal = 0; causal < 2; causal++) {
            int64_t w = ws[x], h = w / 2;
            /* non-causal: N(2h+1) minus the clipped h(h+1)/2 at each end (N >= h);
             * causal: min(i+1, W) keys for row i, i.e. W(W+1)/2 + (N-W) W (N >= W) */
            int64_t want = causal ? w * (w + 1) / 2 + (n - w) * w : n * (2 * h + 1) - h * (h + 1);
            char spec[128], name[256];
            snprintf(spec, sizeof spec, "local:window=%d,causal=%d", ws[x], causal);
            ef_attn *a = NULL;
            ef_status st = ef_attn_new(&a, spec, &s);
            int64_t got = st ? -1 : ef_attn_visible_pairs(a, 0);
            snprintf(name, sizeof name, "%s N=%d: pairs == closed form", spec, n);
            ef_check(name, got == want, "pairs %lld, closed form %lld (tol 0) %s", (long long)got,
                     (long long)want, st ? ef_last_error() : "");
            if (!st && x == 2) { /* flops count exactly the visible pairs */
                double f = ef_attn_flops(a, 0), fw = (double)want * 2 * (8 + 8);
                snprintf(name, sizeof name, "%s: flops == pairs x 2(D+Dv)", spec);
                ef_check_err(name, fabs(f - fw), 0.0);
            }
            ef_attn_free(a);
        }
}

/* Longformer: global rows see every key (causal: every key <= i), every row sees a global key. */
static void longformer_globals(void) {
    static const struct {
        const char *spec;
        int gpos[3], np;
    } cases[] = {
        {"longformer:window=9,dilation=3,global=0;50;77", {0, 50, 77}, 3},
        {"longformer:window=9,dilation=3,global=0;50;77,causal=1", {0, 50, 77}, 3},
        {"longformer:window=8,dilation=2,global=5;", {5}, 1},
        {"longformer:window=31,global=2", {0, 1}, 2},
    };
    ef_attn_shape s = {1, 1, 150, 200, 8, 8};
    for (size_t x = 0; x < sizeof cases / sizeof cases[0]; x++) {
        ef_attn *a = NULL;
        ef_status st = ef_attn_new(&a, cases[x].spec, &s);
        int causal = strstr(cases[x].spec, "causal=1") != NULL;
        int64_t row_miss = 0, col_miss = 0;
        for (int t = 0; !st && t < cases[x].np; t++) {
            int p = cases[x].gpos[t];
            for (int j = 0; j < s.kv_len; j++)
                row_miss += ef_attn_visible(a, 0, p, j) != (!causal || j <= p);
            for (int i = 0; i < s.q_len; i++)
                col_miss += ef_attn_visible(a, 0, i, p) != (!causal || p <= i);
        }
        char name[256];
        snprintf(name, sizeof name, "%s 150x200: global rows complete", cases[x].spec);
        ef_check(name, !st && row_miss == 0, "%lld keys hidden from global queries (tol 0) %s",
                 (long long)row_miss, st ? ef_last_error() : "");
        snprintf(name, sizeof name, "%s 150x200: global columns complete", cases[x].spec);
        ef_check(name, !st && col_miss == 0, "%lld queries miss a global key (tol 0)",
                 (long long)col_miss);
        ef_attn_free(a);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 5. Bad specs
 * ------------------------------------------------------------------------------------------- */
static void spec_status(const char *spec, ef_attn_shape s, ef_status want, const char *needle) {
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    char msg[512], name[300];
    snprintf(msg, sizeof msg, "%s", ef_last_error());
    snprintf(name, sizeof name, "%s %dx%d -> %s", spec, s.q_len, s.kv_len, ef_status_str(want));
    ef_check_status(name, st, want);
    if (needle) {
        snprintf(name, sizeof name, "%s %dx%d: message names '%s'", spec, s.q_len, s.kv_len,
                 needle);
        ef_check(name, st != EF_OK && strstr(msg, needle) != NULL, "\"%s\"", msg);
    }
    if (st) {
        snprintf(name, sizeof name, "%s: no plan returned on failure", spec);
        ef_check(name, a == NULL, "plan %s", a ? "non-NULL" : "NULL");
    }
    ef_attn_free(a);
}

static void bad_specs(void) {
    ef_attn_shape s300 = {1, 2, 300, 300, 16, 16}, s256 = {1, 2, 256, 256, 16, 16};
    ef_attn_shape s64 = {1, 1, 64, 64, 8, 8}, rect = {1, 1, 150, 200, 8, 8};
    spec_status("local:window=0", s300, EF_ERR_ARG, "window=0");
    spec_status("local:window=-3", s300, EF_ERR_ARG, "window=-3");
    spec_status("blocklocal:block=0", s300, EF_ERR_ARG, "block=0");
    spec_status("bigbird:block=0", s300, EF_ERR_ARG, "block=0");
    spec_status("strided:block=-1", s300, EF_ERR_ARG, "block=-1");
    spec_status("fixed:block=16,summary=17", s300, EF_ERR_ARG, "summary=17");
    spec_status("fixed:block=16,summary=0", s300, EF_ERR_ARG, "summary=0");
    spec_status("longformer:dilation=0", s300, EF_ERR_ARG, "dilation=0");
    spec_status("longformer:global=0;5000", s300, EF_ERR_ARG, "5000");
    spec_status("longformer:global=300;", s300, EF_ERR_ARG, "300");
    spec_status("longformer:global=301", s300, EF_ERR_ARG, "301");
    spec_status("longformer:global=151", rect, EF_ERR_ARG, "151"); /* beyond min(q, kv) */
    spec_status("longformer:global=160;", rect, EF_ERR_ARG, "160");
    spec_status("bigbird:block=64,random=3", s256, EF_ERR_ARG, "does not fit");
    spec_status("bigbird:block=64,window=1,random=3,global=2", s256, EF_ERR_ARG, "does not fit");
    spec_status("bigbird:window=2", s300, EF_ERR_ARG, "window=2");
    spec_status("bigbird:block=64,random=0,global=6", s300, EF_ERR_ARG, "global=6");
    spec_status("bigbird-etc:extra=300,random=0", s300, EF_ERR_ARG, "extra=300");
    spec_status("bigbird", rect, EF_ERR_UNSUPPORTED, "q_len");
    spec_status("bigbird:random=0", (ef_attn_shape){1, 1, 200, 150, 8, 8}, EF_ERR_UNSUPPORTED,
                "q_len");
    spec_status("bigbird-etc:random=0", rect, EF_ERR_UNSUPPORTED, "q_len");
    /* a window (or block) longer than the sequence is fine */
    spec_status("local:window=1000", s64, EF_OK, NULL);
    spec_status("blocklocal:block=1000", s64, EF_OK, NULL);
    spec_status("strided:block=1000", s64, EF_OK, NULL);
    spec_status("fixed:block=1000,summary=1000", s64, EF_OK, NULL);
    spec_status("longformer:window=5000,global=0", s300, EF_OK, NULL);
    spec_status("bigbird:block=16,window=99,random=0", s300, EF_OK, NULL);
    spec_status("bigbird:block=1000,window=1,random=0,global=1", s300, EF_OK, NULL);
    spec_status("longformer:global=300", s300, EF_OK, NULL);
    spec_status("longformer:global=299;", s300, EF_OK, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * 5b. The engine's other paths: the stride pass (residue classes gathered into tiles; classes
 * longer than one tile), a grid origin past the first tile (bigbird-etc with extra > 64), tiles
 * of one small block, a single (batch, head) so that backward splits the keys into ranges, and
 * a forward without saved state (the stride pass then keeps the lse in the plan) equal bitwise
 * to the training forward.
 * ------------------------------------------------------------------------------------------- */
static void engine_paths(void) {
    static const char *specs[] = {"strided:block=2", "strided:block=9", "fixed:block=100,summary=7",
                                  "fixed:block=32,summary=5",
                                  "bigbird-etc:block=32,window=3,random=1,global=2,extra=70,seed=4",
                                  "bigbird:block=16,window=3,random=2,global=2,seed=9"};
    ef_attn_shape s = {1, 1, 300, 300, 24, 40};
    int32_t lens[1] = {283};
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++)
        for (int causal = 0; causal < 2; causal++) {
            char spec[256], name[512];
            snprintf(spec, sizeof spec, "%s,causal=%d", specs[x], causal);
            check_mech(spec, s, lens, NULL);
            /* inference forward (saved = NULL) == training forward, bitwise */
            bufs in, tr, inf;
            ef_attn_shape s2 = {2, 2, 300, 300, 24, 40};
            int32_t lens2[2] = {300, 141};
            ef_test_inputs(&in, s2, 21, 1.0f);
            ef_test_outputs(&tr, &in), ef_test_outputs(&inf, &in);
            ef_attn *a = NULL;
            ef_status st = ef_attn_new(&a, spec, &s2);
            if (!st) st = ef_test_run_plan(a, &in, lens2, &tr, 1);
            if (!st) st = ef_test_run_plan(a, &in, lens2, &inf, 0);
            int same = !st && !memcmp(tr.out, inf.out, in.no * sizeof(float));
            snprintf(name, sizeof name, "%s: inference forward == training forward", spec);
            ef_check(name, same, "%s; max |diff| %.3e (tol 0)", st ? ef_last_error() : "",
                     st ? 0 : ef_max_abs_diff(tr.out, inf.out, in.no));
            ef_attn_free(a);
            ef_test_free_outputs(&tr), ef_test_free_outputs(&inf), ef_test_free_inputs(&in);
        }
}

/* Query padding (q_lens) with key padding on the engine's new paths: fast == reference, and
 * the padded query rows give exactly zero output and zero dq. */
static void engine_query_padding(void) {
    static const char *specs[] = {"strided:block=7", "strided:block=9,causal=1",
                                  "fixed:block=16,summary=3", "fixed:block=100,summary=7,causal=1",
                                  "bigbird-etc:block=16,window=3,random=1,global=1,extra=20,seed=2",
                                  "bigbird:block=16,window=3,random=2,global=2,seed=9,causal=1"};
    ef_attn_shape s = {2, 2, 150, 150, 24, 40};
    int32_t kv[2] = {150, 97}, ql[2] = {123, 150};
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++) {
        char ref_spec[300], label[400], name[512];
        snprintf(ref_spec, sizeof ref_spec, "%s,ref=1", specs[x]);
        snprintf(label, sizeof label, "%s q_lens{123,150} kv_lens{150,97}", specs[x]);
        bufs in, fa, rf;
        ef_test_inputs(&in, s, 77, 1.0f);
        ef_test_outputs(&fa, &in), ef_test_outputs(&rf, &in);
        ef_status st = ef_test_run_lens(specs[x], &in, kv, ql, &fa);
        if (!st) st = ef_test_run_lens(ref_spec, &in, kv, ql, &rf);
        snprintf(name, sizeof name, "%s: runs", label);
        if (ef_check(name, st == EF_OK, "%s", st ? ef_last_error() : "ok")) {
            compare_outs(label, &in, &fa, &rf, TOL_F, TOL_B, 1e-2);
            double m = 0; /* batch 0, rows 123.. of every head */
            for (int h = 0; h < s.heads; h++)
                for (int i = ql[0]; i < s.q_len; i++) {
                    for (int e = 0; e < s.v_dim; e++)
                        m = fmax(m, fabs(fa.out[((size_t)h * s.q_len + i) * s.v_dim + e]));
                    for (int t = 0; t < s.head_dim; t++)
                        m = fmax(m, fabs(fa.dq[((size_t)h * s.q_len + i) * s.head_dim + t]));
                }
            snprintf(name, sizeof name, "%s: padded query rows: out and dq exactly 0", label);
            ef_check(name, m == 0, "max |x| %.3e (tol 0)", m);
        }
        ef_test_free_outputs(&fa), ef_test_free_outputs(&rf), ef_test_free_inputs(&in);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 6. Thread-count independence and padding invariance
 * ------------------------------------------------------------------------------------------- */
static void threads_bitwise(void) {
    ef_attn_shape s = {2, 3, 300, 300, 24, 40};
    int32_t lens[2] = {300, 170};
    const char *specs[] = {"bigbird:block=16,window=3,random=2,global=2,seed=3",
                           "bigbird:block=16,window=3,random=2,global=2,seed=3,causal=1",
                           "longformer:window=31,dilation=2,global=0;50;77",
                           "longformer:window=31,dilation=2,global=0;50;77,causal=1",
                           "strided:block=7",
                           "strided:block=7,causal=1",
                           "fixed:block=16,summary=3",
                           "bigbird-etc:block=16,window=3,random=1,global=1,extra=20,seed=2"};
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++) {
        bufs in, a, b;
        ef_test_inputs(&in, s, 11, 1.0f);
        ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
        int old = ef_get_num_threads();
        ef_set_num_threads(1);
        ef_status st = ef_test_run(specs[x], &in, lens, &a);
        ef_set_num_threads(2);
        if (!st) st = ef_test_run(specs[x], &in, lens, &b);
        ef_set_num_threads(old);
        char name[256];
        int fwd = !st && !memcmp(a.out, b.out, in.no * sizeof(float));
        int bwd = !st && !memcmp(a.dq, b.dq, in.nq * sizeof(float)) &&
                  !memcmp(a.dk, b.dk, in.nk * sizeof(float)) &&
                  !memcmp(a.dv, b.dv, in.nv * sizeof(float));
        snprintf(name, sizeof name, "%s: 1 vs 2 threads bitwise, forward (out)", specs[x]);
        ef_check(name, fwd, "%s; max |diff| %.3e (tol 0)",
                 st    ? ef_last_error()
                 : fwd ? "identical"
                       : "differ",
                 ef_max_abs_diff(a.out, b.out, in.no));
        snprintf(name, sizeof name, "%s: 1 vs 2 threads bitwise, backward (dq, dk, dv)", specs[x]);
        ef_check(
            name, bwd, "%s; max |diff| %.3e (tol 0)",
            st    ? ef_last_error()
            : bwd ? "identical"
                  : "differ",
            fmax(ef_max_abs_diff(a.dq, b.dq, in.nq),
                 fmax(ef_max_abs_diff(a.dk, b.dk, in.nk), ef_max_abs_diff(a.dv, b.dv, in.nv))));
        ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
    }
}

/* Padded keys must not leak: setting them (and their values) to 1e4 / 1e9 changes nothing. */
static void padding_invariance(void) {
    ef_attn_shape s = {2, 2, 150, 150, 16, 24};
    int32_t lens[2] = {150, 97};
    const char *specs[] = {"local:window=17", "local:window=17,causal=1",
                           "bigbird:block=16,window=3,random=1,global=2",
                           "bigbird:block=16,window=3,random=1,global=2,causal=1"};
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++) {
        bufs in, a, b;
        ef_test_inputs(&in, s, 5, 1.0f);
        ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
        ef_status st = ef_test_run(specs[x], &in, lens, &a);
        for (int h = 0; h < s.heads; h++) /* batch 1, keys 97.. */
            for (int j = lens[1]; j < s.kv_len; j++) {
                size_t row = ((size_t)1 * s.heads + h) * s.kv_len + j;
                for (int t = 0; t < s.head_dim; t++) in.k[row * s.head_dim + t] = 1e4f;
                for (int t = 0; t < s.v_dim; t++) in.v[row * s.v_dim + t] = 1e9f;
            }
        if (!st) st = ef_test_run(specs[x], &in, lens, &b);
        char name[256];
        snprintf(name, sizeof name, "%s: padded keys/values 1e4/1e9 change no out", specs[x]);
        if (st)
            ef_check(name, 0, "%s", ef_last_error());
        else
            ef_check_err(name, ef_max_abs_diff(a.out, b.out, in.no), 0.0);
        snprintf(name, sizeof name, "%s: ... and no dq, dk, dv", specs[x]);
        if (!st)
            ef_check_err(
                name,
                fmax(ef_max_abs_diff(a.dq, b.dq, in.nq),
                     fmax(ef_max_abs_diff(a.dk, b.dk, in.nk), ef_max_abs_diff(a.dv, b.dv, in.nv))),
                0.0);
        ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
    }
}

/* ---------------------------------------------------------------------------------------------
 * 7. Option values at the top of their ranges (window, block up to 2^30, dilation up to 2^20):
 * the pattern arithmetic must not overflow int. Last, because a sanitizer build stops at the
 * first overflow.
 * ------------------------------------------------------------------------------------------- */
static void extreme_options(void) {
    ef_attn_shape s = {2, 2, 100, 100, 8, 8};
    int32_t lens[2] = {100, 61};
    const char *specs[] = {
        "local:window=1073741824",
        "local:window=1073741824,causal=1",
        "blocklocal:block=1073741824",
        "strided:block=1073741824",
        "fixed:block=1073741824,summary=1073741824",
        "bigbird:block=1048576,window=1048575,random=0,global=0",
        /* (W/2) dilation = 2^31 and W dilation = 2^31, past INT_MAX */
        "longformer:window=1073741824,dilation=4,global=0",
        "longformer:window=1073741824,dilation=2,global=0,causal=1",
    };
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++) check_mech(specs[x], s, lens, NULL);
}

/* The row layout (tiled.c): tiles of at most 16 queries whose key spans need no pattern mask
 * take the queries as rows and the keys as lanes. It needs head dims that are whole vectors, so
 * on AVX-512 builds only dims that are multiples of 16 reach it (the odd dims of the other cases
 * run the transposed layout there; the portable build's 4-lane vectors take them through the row
 * layout). Fast == reference, causal and padded, odd lengths, blocks of 8 and 16 and ETC tokens
 * that shift the tiles; and 1 vs 2 threads bitwise. */
static void row_layout(void) {
    static const char *specs[] = {
        "bigbird:block=16,window=3,random=3,global=2,seed=11",
        "bigbird:block=8,window=3,random=2,global=1,seed=12",
        "bigbird:block=16,window=5,random=0,global=0",
        "bigbird-etc:block=16,window=3,random=1,global=1,extra=5,seed=13",
        "bigbird-etc:block=16,window=3,random=2,global=0,extra=32,seed=14",
        "blocklocal:block=16",
        "fixed:block=16,summary=3",
    };
    static const shape_case shapes[] = {
        {{2, 2, 211, 211, 16, 32}, {211, 90}, 1},
        {{1, 3, 160, 160, 32, 16}, {0, 0}, 0},
        {{2, 1, 97, 97, 64, 16}, {33, 97}, 1},
    };
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++)
        for (int causal = 0; causal < 2; causal++) {
            char spec[256];
            snprintf(spec, sizeof spec, "%s,causal=%d", specs[x], causal);
            const shape_case *sc = &shapes[(x + causal) % 3];
            check_mech(spec, sc->s, sc->has_lens ? sc->lens : NULL, NULL);
        }
    /* q_len != kv_len (blocklocal takes it): rows past kv_len, keys past q_len */
    static const shape_case rect[] = {{{2, 2, 150, 200, 16, 32}, {200, 111}, 1},
                                      {{2, 2, 200, 150, 32, 16}, {64, 150}, 1}};
    for (int x = 0; x < 2; x++)
        for (int causal = 0; causal < 2; causal++)
            check_mech(causal ? "blocklocal:block=16,causal=1" : "blocklocal:block=16", rect[x].s,
                       rect[x].lens, NULL);
    ef_attn_shape s = {2, 3, 300, 300, 32, 16};
    int32_t lens[2] = {300, 170};
    for (int causal = 0; causal < 2; causal++) {
        const char *spec = causal ? "bigbird:block=16,window=3,random=2,global=2,seed=3,causal=1"
                                  : "bigbird:block=16,window=3,random=2,global=2,seed=3";
        bufs in, a, b;
        ef_test_inputs(&in, s, 12, 1.0f);
        ef_test_outputs(&a, &in), ef_test_outputs(&b, &in);
        int old = ef_get_num_threads();
        ef_set_num_threads(1);
        ef_status st = ef_test_run(spec, &in, lens, &a);
        ef_set_num_threads(2);
        if (!st) st = ef_test_run(spec, &in, lens, &b);
        ef_set_num_threads(old);
        int same = !st && !memcmp(a.out, b.out, in.no * sizeof(float)) &&
                   !memcmp(a.dq, b.dq, in.nq * sizeof(float)) &&
                   !memcmp(a.dk, b.dk, in.nk * sizeof(float)) &&
                   !memcmp(a.dv, b.dv, in.nv * sizeof(float));
        char name[300];
        snprintf(name, sizeof name, "%s (dims 32, 16): 1 vs 2 threads bitwise (out, dq, dk, dv)",
                 spec);
        ef_check(name, same, "%s", st ? ef_last_error() : same ? "identical" : "differ");
        ef_test_free_outputs(&a), ef_test_free_outputs(&b), ef_test_free_inputs(&in);
    }
}

int main(void) {
    fast_vs_ref();
    bigbird_grid();
    bigbird_seeds();
    bigbird_etc();
    limit_cases();
    local_density();
    longformer_globals();
    bad_specs();
    engine_paths();
    engine_query_padding();
    threads_bitwise();
    row_layout();
    padding_invariance();
    extreme_options();
    return ef_test_finish();
}
