/*
 * test_block.c - the multi-head attention block (src/nn/attn_block.c).
 *
 * - forward against the composition written out here: projections as double loops, the
 *   attention through a separate plan of the same spec, the output projection as double loops;
 * - directional finite differences of f = <dy, y> for x and every parameter tensor;
 * - padding: NaN in padded rows of x and dy changes no valid result; padded rows are zero;
 * - 1 vs 2 threads bitwise; shared-QK (lsh) leaves Wk, bk without gradient;
 * - the caller's scratch ws: refused when NULL where needed or misaligned; results bitwise the
 *   same whether it starts as NaN or as zeros (every element read was written by the call).
 */
#include "harness.h"
#include "nn/attn_block.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { B = 2, N = 37, C = 24, H = 3, D = C / H };

/* The eight parameter tensors in one buffer: Wq bq Wk bk Wv bv Wo bo. */
enum { NPAR = 4 * (C * C + C) };
static const size_t par_off[8] = {0,
                                  C *C,
                                  C *C + C,
                                  2 * C *C + C,
                                  2 * C *C + 2 * C,
                                  3 * C *C + 2 * C,
                                  3 * C *C + 3 * C,
                                  4 * C *C + 3 * C};
static const size_t par_len[8] = {C * C, C, C *C, C, C *C, C, C *C, C};
static const char *const par_name[8] = {"Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"};

static ef_attn_block_params params_of(const float *w) {
    ef_attn_block_params p = {w + par_off[0], w + par_off[1], w + par_off[2], w + par_off[3],
                              w + par_off[4], w + par_off[5], w + par_off[6], w + par_off[7]};
    return p;
}
static ef_attn_block_grads grads_of(float *w) {
    ef_attn_block_grads g = {w + par_off[0], w + par_off[1], w + par_off[2], w + par_off[3],
                             w + par_off[4], w + par_off[5], w + par_off[6], w + par_off[7]};
    return g;
}

typedef struct run_out {
    float *y, *dx, *gpar;
} run_out;

static float ws_fill = 0.0f; /* what the caller's scratch holds before each run_block */

/* forward (and backward when dy) of a fresh block, with a fresh scratch buffer filled with
 * ws_fill; 0 on success */
static ef_status run_block(const char *spec, const float *x, const float *w, const int32_t *lens,
                           const float *dy, run_out *r) {
    ef_attn_block *blk = NULL;
    ef_status st = ef_attn_block_new(&blk, spec, B, N, C, H);
    if (st) return st;
    void *saved = ef_malloc(ef_attn_block_saved_bytes(blk));
    size_t wsb = ef_attn_block_ws_bytes(blk);
    float *ws = ef_malloc(wsb);
    if (!saved || !ws) {
        ef_free(saved), ef_free(ws), ef_attn_block_free(blk);
        return EF_ERR_NOMEM;
    }
    for (size_t i = 0; i < wsb / sizeof(float); i++) ws[i] = ws_fill;
    ef_attn_block_params p = params_of(w);
    st = ef_attn_block_forward(blk, &p, x, lens, r->y, dy ? saved : NULL, ws);
    if (!st && dy) {
        memset(r->gpar, 0, sizeof(float) * NPAR);
        ef_attn_block_grads g = grads_of(r->gpar);
        st = ef_attn_block_backward(blk, &p, x, lens, saved, dy, r->dx, &g, ws);
    }
    ef_free(saved), ef_free(ws);
    ef_attn_block_free(blk);
    return st;
}

/* The scratch is fully written before it is read: NaN-filled vs zero-filled ws give bitwise
 * the same y (inference forward: q, k, v, o in ws) and y, dx, gradients (training forward and
 * backward: dO, dQ, dK, dV in ws). */
static void test_ws_fill(const char *spec, const float *x, const float *w, const float *dy,
                         const int32_t *lens) {
    size_t nx = (size_t)B * N * C;
    run_out z = {ef_test_zeros(nx), ef_test_zeros(nx), ef_test_zeros(NPAR)};
    run_out n = {ef_test_zeros(nx), ef_test_zeros(nx), ef_test_zeros(NPAR)};
    char label[256];
    for (int train = 0; train < 2; train++) {
        const float *d = train ? dy : NULL;
        ws_fill = 0.0f;
        ef_status st = run_block(spec, x, w, lens, d, &z);
        ws_fill = NAN;
        ef_status st2 = run_block(spec, x, w, lens, d, &n);
        ws_fill = 0.0f;
        int same = !st && !st2 && memcmp(z.y, n.y, nx * 4) == 0 && !ef_test_any_nonfinite(n.y, nx);
        if (train)
            same = same && memcmp(z.dx, n.dx, nx * 4) == 0 &&
                   memcmp(z.gpar, n.gpar, NPAR * 4) == 0 && !ef_test_any_nonfinite(n.dx, nx) &&
                   !ef_test_any_nonfinite(n.gpar, NPAR);
        snprintf(label, sizeof label, "%s%s: ws NaN vs zeros, %s bitwise equal", spec,
                 lens ? " padded" : "", train ? "forward+backward y, dx, grads" : "inference y");
        ef_check(label, same, "%s / %s", ef_status_str(st), ef_status_str(st2));
    }
    free(z.y), free(z.dx), free(z.gpar), free(n.y), free(n.dx), free(n.gpar);
}

/* y by the definition: double loops around a separate attention plan. */
static ef_status reference_y(const char *spec, const float *x, const float *w, const int32_t *lens,
                             float *y) {
    size_t per = (size_t)B * H * N * D;
    float *q = calloc(per, 4), *k = calloc(per, 4), *v = calloc(per, 4), *o = calloc(per, 4);
    const float *wm[3] = {w + par_off[0], w + par_off[2], w + par_off[4]};
    const float *bm[3] = {w + par_off[1], w + par_off[3], w + par_off[5]};
    float *dst[3] = {q, k, v};
    for (int b = 0; b < B; b++)
        for (int i = 0; i < (lens ? lens[b] : N); i++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < D; t++)
                    for (int m = 0; m < 3; m++) {
                        double acc = bm[m][h * D + t];
                        for (int c = 0; c < C; c++)
                            acc +=
                                (double)x[((size_t)b * N + i) * C + c] * wm[m][c * C + h * D + t];
                        dst[m][(((size_t)b * H + h) * N + i) * D + t] = (float)acc;
                    }
    ef_attn_shape s = {B, H, N, N, D, D};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    ef_attn_io io = {q, k, v, lens, o, lens};
    if (!st) st = ef_attn_forward(a, &io, NULL);
    ef_attn_free(a);
    const float *wo = w + par_off[6], *bo = w + par_off[7];
    for (int b = 0; b < B; b++)
        for (int i = 0; i < N; i++)
            for (int c = 0; c < C; c++) {
                int valid = i < (lens ? lens[b] : N);
                double acc = valid ? bo[c] : 0;
                for (int h = 0; h < H && valid; h++)
                    for (int t = 0; t < D; t++)
                        acc += (double)o[(((size_t)b * H + h) * N + i) * D + t] *
                               wo[(h * D + t) * C + c];
                y[((size_t)b * N + i) * C + c] = (float)acc;
            }
    free(q), free(k), free(v), free(o);
    return st;
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* f(x + h dir) for the tensor `which` (-1 = x, else parameter tensor which) */
static double f_at(const char *spec, const float *x, const float *w, const int32_t *lens,
                   const float *dy, int which, const float *dir, double hstep, float *ybuf) {
    size_t nx = (size_t)B * N * C;
    float *xx = malloc(nx * 4), *ww = malloc(NPAR * 4);
    memcpy(xx, x, nx * 4), memcpy(ww, w, NPAR * 4);
    if (which < 0)
        for (size_t i = 0; i < nx; i++) xx[i] += (float)(hstep * dir[i]);
    else
        for (size_t i = 0; i < par_len[which]; i++)
            ww[par_off[which] + i] += (float)(hstep * dir[i]);
    run_out r = {ybuf, NULL, NULL};
    ef_status st = run_block(spec, xx, ww, lens, NULL, &r);
    free(xx), free(ww);
    return st ? NAN : dot(dy, ybuf, nx);
}

static void test_spec(const char *spec, uint64_t seed) {
    size_t nx = (size_t)B * N * C;
    float *x = ef_test_randn(nx, seed, 1.0f), *w = ef_test_randn(NPAR, seed + 1, 0.3f);
    float *dy = ef_test_randn(nx, seed + 2, 1.0f);
    int32_t lens[B] = {N, 23};
    char label[256];
    for (int padded = 0; padded < 2; padded++) {
        const int32_t *ln = padded ? lens : NULL;
        run_out r = {ef_test_zeros(nx), ef_test_zeros(nx), ef_test_zeros(NPAR)};
        float *yr = ef_test_zeros(nx);
        ef_status st = run_block(spec, x, w, ln, dy, &r);
        ef_status st2 = reference_y(spec, x, w, ln, yr);
        snprintf(label, sizeof label, "%s%s: block runs", spec, padded ? " padded" : "");
        if (!ef_check(label, !st && !st2, "%s / %s: %s", ef_status_str(st), ef_status_str(st2),
                      ef_last_error()))
            goto next;
        snprintf(label, sizeof label, "%s%s: y vs definition (double projections)", spec,
                 padded ? " padded" : "");
        /* fp32 GEMMs vs double loops on O(1) values summed over C=24: a few ulps */
        ef_check_err(label, ef_max_rel_diff(r.y, yr, nx), 2e-5);

        /* directional derivatives: x, then each parameter tensor */
        float *ybuf = ef_test_zeros(nx);
        ef_attn_caps caps;
        char name[32];
        snprintf(name, sizeof name, "%.*s", (int)strcspn(spec, ":"), spec);
        ef_attn_get_caps(name, &caps);
        for (int which = -1; which < 8; which++) {
            size_t len = which < 0 ? nx : par_len[which];
            /* Central differences at h and h/2, Richardson-extrapolated; what is left is fp32
             * rounding of f (~1e-7 |f| / h) and the next Taylor term. For mechanisms with
             * discrete choices (lsh buckets) the direction is sparse — a few rows of x, a few
             * columns of a weight — so that few choices can flip, the step small, and a
             * direction whose two differences disagree (a bucket flipped) is replaced (up to 6
             * tries; the count is printed). */
            double hs = caps.discrete ? 1e-3 : 1e-2, an = 0, fd = 0, d1 = 0, d2 = 0, mag = 0;
            int tries = 0;
            for (; tries < 6; tries++) {
                float *dir = ef_test_randn(len, seed + 10 + (uint64_t)which + 97 * tries, 1.0f);
                for (size_t e = 0; e < len; e++) {
                    size_t row = e / C, col = e % C; /* x: token row; W: input row, output col */
                    int keep = 1;
                    if (which < 0 && padded && row >= (size_t)N + lens[1]) keep = 0;
                    if (caps.discrete && which < 0)
                        keep &= row >= (size_t)(5 + tries) && row < (size_t)(8 + tries);
                    if (caps.discrete && which >= 0 && par_len[which] > C)
                        keep &= col % 8 == (size_t)tries;
                    if (!keep) dir[e] = 0;
                }
                const float *gsrc = which < 0 ? r.dx : r.gpar + par_off[which];
                an = dot(gsrc, dir, len);
                mag = 0; /* the size of the terms of <g, dir>: the scale rounding works on */
                for (size_t e = 0; e < len; e++) mag += fabs((double)gsrc[e] * dir[e]);
                d1 = (f_at(spec, x, w, ln, dy, which, dir, hs, ybuf) -
                      f_at(spec, x, w, ln, dy, which, dir, -hs, ybuf)) /
                     (2 * hs);
                d2 = (f_at(spec, x, w, ln, dy, which, dir, hs / 2, ybuf) -
                      f_at(spec, x, w, ln, dy, which, dir, -hs / 2, ybuf)) /
                     hs;
                free(dir);
                fd = (4 * d2 - d1) / 3;
                if (!caps.discrete || fabs(d1 - d2) <= 1e-3 * fmax(fabs(fd), 1.0)) break;
            }
            double scale = fmax(fmax(fabs(fd), mag), 1.0);
            snprintf(label, sizeof label, "%s%s: d<dy,y>/d%s (finite differences, %d tr%s)", spec,
                     padded ? " padded" : "", which < 0 ? "x" : par_name[which], tries + 1,
                     tries ? "ies" : "y");
            /* Judged on the scale of max(|fd|, sum_i |g_i dir_i|, 1): the rounding of f in fp32
             * divided by the step is ~1e-3 at these sizes with h = 1e-2 (measured: up to 2.5e-3
             * on the built-in GEMM for derivatives that cancel to ~0, such as the key bias's),
             * the Richardson remainder is O(h^4); tolerance 4e-3, still well below a 1 %
             * gradient error. `linear`'s elu+1 features are only C1 (elu'' jumps at 0), so the
             * remainder is larger there: 3e-3 more. */
            double c1 = strcmp(name, "linear") == 0 ? 3e-3 : 0;
            if (which >= 0 && (which == 2 || which == 3) && caps.shared_qk) /* Wk, bk unused */
                ef_check(label, an == 0 && fabs(fd) < 1e-3, "grad %.3e fd %.3e", an, fd);
            else
                ef_check_err(label, fabs(an - fd) / scale, 4e-3 + c1);
        }
        free(ybuf);

        if (padded) {
            /* NaN in the padded rows of x and dy: bitwise identical valid results, zero rows */
            float *x2 = malloc(nx * 4), *dy2 = malloc(nx * 4);
            memcpy(x2, x, nx * 4), memcpy(dy2, dy, nx * 4);
            for (int i = lens[1]; i < N; i++)
                for (int c = 0; c < C; c++)
                    x2[((size_t)N + i) * C + c] = NAN, dy2[((size_t)N + i) * C + c] = NAN;
            run_out r2 = {ef_test_zeros(nx), ef_test_zeros(nx), ef_test_zeros(NPAR)};
            st = run_block(spec, x2, w, lens, dy2, &r2);
            int same = !st && memcmp(r.y, r2.y, nx * 4) == 0 && memcmp(r.dx, r2.dx, nx * 4) == 0 &&
                       memcmp(r.gpar, r2.gpar, NPAR * 4) == 0;
            double tail = 0;
            for (int i = lens[1]; i < N; i++)
                for (int c = 0; c < C; c++)
                    tail = fmax(tail, fabs(r2.y[((size_t)N + i) * C + c]) +
                                          fabs(r2.dx[((size_t)N + i) * C + c]));
            snprintf(label, sizeof label, "%s: NaN in padded x, dy rows: results bitwise equal",
                     spec);
            ef_check(label, same, "%s", ef_status_str(st));
            snprintf(label, sizeof label, "%s: padded rows of y and dx exactly 0", spec);
            ef_check(label, tail == 0, "max %.3e", tail);
            free(x2), free(dy2), free(r2.y), free(r2.dx), free(r2.gpar);
        } else {
            /* 1 vs 2 threads */
            run_out r1 = {ef_test_zeros(nx), ef_test_zeros(nx), ef_test_zeros(NPAR)};
            int old = ef_get_num_threads();
            ef_set_num_threads(1);
            st = run_block(spec, x, w, NULL, dy, &r1);
            ef_set_num_threads(old);
            int same = !st && memcmp(r.y, r1.y, nx * 4) == 0 && memcmp(r.dx, r1.dx, nx * 4) == 0 &&
                       memcmp(r.gpar, r1.gpar, NPAR * 4) == 0;
            snprintf(label, sizeof label, "%s: 1 vs %d threads bitwise", spec, old);
            ef_check(label, same, "%s", ef_status_str(st));
            free(r1.y), free(r1.dx), free(r1.gpar);
        }
        test_ws_fill(spec, x, w, dy, ln);
    next:
        free(r.y), free(r.dx), free(r.gpar), free(yr);
    }
    free(x), free(w), free(dy);
}

static void test_errors(void) {
    ef_attn_block *blk = NULL;
    ef_check_status("dim not a multiple of heads", ef_attn_block_new(&blk, "flash", 1, 8, 10, 3),
                    EF_ERR_SHAPE);
    ef_check_status("unknown mechanism", ef_attn_block_new(&blk, "nosuch", 1, 8, 12, 3),
                    EF_ERR_ARG);
    ef_check("failed new leaves NULL", blk == NULL, "%p", (void *)blk);
    ef_check_status("block ok", ef_attn_block_new(&blk, "flash", B, N, C, H), EF_OK);
    float *x = ef_test_zeros((size_t)B * N * C), *y = ef_test_zeros((size_t)B * N * C);
    float *w = ef_test_zeros(NPAR);
    ef_attn_block_params p = params_of(w);
    size_t wsb = ef_attn_block_ws_bytes(blk);
    char *ws = ef_malloc(wsb + 64);
    int32_t bad[B] = {N, N + 1};
    ef_check_status("lens beyond len refused", ef_attn_block_forward(blk, &p, x, bad, y, NULL, ws),
                    EF_ERR_ARG);
    ef_check("message names lens[1]", strstr(ef_last_error(), "lens[1]") != NULL, "'%s'",
             ef_last_error());

    /* the caller's scratch */
    size_t want = ((size_t)4 * B * N * C * sizeof(float) + 63) / 64 * 64;
    ef_check("ws bytes = 4 BHND floats rounded up to 64", wsb == want, "%zu (want %zu)", wsb, want);
    ef_check("block owns only the plan's workspace",
             ef_attn_block_workspace_bytes(blk) == ef_attn_workspace_bytes(ef_attn_block_attn(blk)),
             "%zu vs plan %zu", ef_attn_block_workspace_bytes(blk),
             ef_attn_workspace_bytes(ef_attn_block_attn(blk)));
    void *saved = ef_malloc(ef_attn_block_saved_bytes(blk));
    float *dy = ef_test_zeros((size_t)B * N * C), *dx = ef_test_zeros((size_t)B * N * C);
    float *gpar = ef_test_zeros(NPAR);
    ef_attn_block_grads g = grads_of(gpar);
    char want_msg[64];
    snprintf(want_msg, sizeof want_msg, "%zu bytes", wsb);
    ef_check_status("inference forward with NULL ws refused",
                    ef_attn_block_forward(blk, &p, x, NULL, y, NULL, NULL), EF_ERR_ARG);
    ef_check("message names ws and its size",
             strstr(ef_last_error(), "ws is NULL") && strstr(ef_last_error(), want_msg), "'%s'",
             ef_last_error());
    ef_check_status("training forward with NULL ws accepted (ws unused)",
                    ef_attn_block_forward(blk, &p, x, NULL, y, saved, NULL), EF_OK);
    ef_check_status("backward with NULL ws refused",
                    ef_attn_block_backward(blk, &p, x, NULL, saved, dy, dx, &g, NULL), EF_ERR_ARG);
    ef_check("message names ws and its size",
             strstr(ef_last_error(), "ws is NULL") && strstr(ef_last_error(), want_msg), "'%s'",
             ef_last_error());
    ef_check_status("inference forward with misaligned ws refused",
                    ef_attn_block_forward(blk, &p, x, NULL, y, NULL, ws + 4), EF_ERR_ARG);
    ef_check("message names ws", strstr(ef_last_error(), "ws=") != NULL, "'%s'", ef_last_error());
    ef_check_status("backward with misaligned ws refused",
                    ef_attn_block_backward(blk, &p, x, NULL, saved, dy, dx, &g, ws + 4),
                    EF_ERR_ARG);
    ef_check("message names ws", strstr(ef_last_error(), "ws=") != NULL, "'%s'", ef_last_error());
    ef_check_status("backward with an aligned ws runs",
                    ef_attn_block_backward(blk, &p, x, NULL, saved, dy, dx, &g, ws), EF_OK);
    ef_free(saved), ef_free(ws);
    free(dy), free(dx), free(gpar);
    ef_attn_block_free(blk);
    ef_attn_block_free(NULL);
    free(x), free(y), free(w);
}

int main(void) {
    test_errors();
    const char *specs[] = {"flash",
                           "full:causal=1",
                           "local:window=8,causal=1",
                           "performer:features=16",
                           "linear:causal=1",
                           "lsh:chunk=8,hashes=2",
                           "bigbird:block=4,window=3,random=1,global=1"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) test_spec(specs[i], 100 + 10 * i);
    return ef_test_finish();
}
