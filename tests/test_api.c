/*
 * test_api.c - the public attention API at its edges: every function given NULL or nonsense
 * returns a status (or its documented neutral value) with a message naming what was wrong, and
 * never crashes; inference (saved = NULL) matches training-mode forward bit for bit; the plan
 * reports its shape, saved bytes, parameters and analytic FLOP count as documented. Run for
 * `full` and `flash`.
 *
 * Comparisons are exact (statuses, sizes, bit patterns) except the FLOP counts, which are
 * doubles compared at 1e-12 relative (a few roundings of products of integers < 2^53).
 */
#include "harness.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const MECH[] = {"full", "flash"};
enum { NMECH = 2 };

/* `word` occurs in `msg` delimited by characters that cannot be part of a C identifier, so
 * "q" matches "io->q is NULL" but not "seq" or "dq". */
static int has_token(const char *msg, const char *word) {
    size_t n = strlen(word);
    for (const char *p = msg ? strstr(msg, word) : NULL; p; p = strstr(p + 1, word)) {
        int before = p == msg || !(isalnum((unsigned char)p[-1]) || p[-1] == '_');
        int after = !(isalnum((unsigned char)p[n]) || p[n] == '_');
        if (before && after) return 1;
    }
    return 0;
}

/* status == want and the message names `word` (or contains `text` when word is NULL) */
static void check_err(const char *label, ef_status st, ef_status want, const char *word,
                      const char *text) {
    const char *msg = ef_last_error();
    int named = word ? has_token(msg, word) : strstr(msg, text) != NULL;
    ef_check(label, st == want && msg[0] && named, "%s (want %s, naming '%s'): '%s'",
             ef_status_str(st), ef_status_str(want), word ? word : text, msg);
}

/* ---------------------------------------------------------------------------------------------
 * Functions taking a plan, given NULL
 * ------------------------------------------------------------------------------------------- */
static void test_null_plan(void) {
    const ef_attn_shape s = {1, 2, 3, 4, 8, 8};
    static int sentinel;
    ef_attn *a = (ef_attn *)&sentinel;
    check_err("ef_attn_new(out=NULL)", ef_attn_new(NULL, "full", &s), EF_ERR_ARG, "out", NULL);
    ef_status st = ef_attn_new(&a, NULL, &s);
    check_err("ef_attn_new(spec=NULL)", st, EF_ERR_ARG, "spec", NULL);
    ef_check("ef_attn_new(spec=NULL) sets *out = NULL", a == NULL, "%p", (void *)a);
    a = (ef_attn *)&sentinel;
    st = ef_attn_new(&a, "flash", NULL);
    check_err("ef_attn_new(shape=NULL)", st, EF_ERR_ARG, "shape", NULL);
    ef_check("ef_attn_new(shape=NULL) sets *out = NULL", a == NULL, "%p", (void *)a);
    check_err("ef_attn_new(NULL, NULL, NULL)", ef_attn_new(NULL, NULL, NULL), EF_ERR_ARG, "out",
              NULL);

    /* the neutral values, and no side effect on the last error */
    char before[512];
    snprintf(before, sizeof before, "%s", ef_last_error());
    ef_attn_free(NULL);
    const char *d = ef_attn_describe(NULL);
    size_t sb = ef_attn_saved_bytes(NULL), wb = ef_attn_workspace_bytes(NULL);
    double f0 = ef_attn_flops(NULL, 0), f1 = ef_attn_flops(NULL, 1);
    size_t pc = ef_attn_param_count(NULL);
    float *pp = ef_attn_params(NULL), *pg = ef_attn_param_grads(NULL);
    ef_attn_shape z = ef_attn_get_shape(NULL);
    int zero_shape = !z.batch && !z.heads && !z.q_len && !z.kv_len && !z.head_dim && !z.v_dim;
    ef_check("ef_attn_free(NULL) and the queries leave the last error alone",
             strcmp(before, ef_last_error()) == 0, "'%s'", ef_last_error());
    ef_check("ef_attn_describe(NULL) = NULL", d == NULL, "%p", (const void *)d);
    ef_check("ef_attn_saved_bytes/workspace_bytes(NULL) = 0", sb == 0 && wb == 0, "%zu %zu", sb,
             wb);
    ef_check("ef_attn_flops(NULL, 0|1) = 0", f0 == 0 && f1 == 0, "%g %g", f0, f1);
    ef_check("ef_attn_param_count(NULL) = 0, params/grads NULL", pc == 0 && !pp && !pg, "%zu %p %p",
             pc, (void *)pp, (void *)pg);
    ef_check("ef_attn_get_shape(NULL) is all zeros", zero_shape, "{%d,%d,%d,%d,%d,%d}", z.batch,
             z.heads, z.q_len, z.kv_len, z.head_dim, z.v_dim);
}

/* ---------------------------------------------------------------------------------------------
 * Forward and backward arguments
 * ------------------------------------------------------------------------------------------- */
typedef struct bufs {
    ef_attn_shape s;
    size_t nq, nk, nv, no;
    float *q, *k, *v, *out, *dout, *dq, *dk, *dv;
} bufs;

static bufs make_bufs(ef_attn_shape s, uint64_t seed) {
    bufs b = {s, 0, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    size_t bh = (size_t)s.batch * s.heads;
    b.nq = bh * s.q_len * s.head_dim, b.nk = bh * s.kv_len * s.head_dim;
    b.nv = bh * s.kv_len * s.v_dim, b.no = bh * s.q_len * s.v_dim;
    b.q = ef_test_randn(b.nq, seed, 1.0f), b.k = ef_test_randn(b.nk, seed + 1, 1.0f);
    b.v = ef_test_randn(b.nv, seed + 2, 1.0f), b.dout = ef_test_randn(b.no, seed + 3, 1.0f);
    b.out = ef_test_zeros(b.no), b.dq = ef_test_zeros(b.nq), b.dk = ef_test_zeros(b.nk);
    b.dv = ef_test_zeros(b.nv);
    return b;
}

static void free_bufs(bufs *b) {
    free(b->q), free(b->k), free(b->v), free(b->out), free(b->dout), free(b->dq), free(b->dk);
    free(b->dv);
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static void test_call_args(const char *mech) {
    const ef_attn_shape s = {2, 2, 19, 23, 16, 12};
    bufs b = make_bufs(s, 100);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, mech, &s);
    char label[128];
    snprintf(label, sizeof label, "%s: plan", mech);
    ef_check_status(label, st, EF_OK);
    if (st) return;
    size_t sbytes = ef_attn_saved_bytes(a);
    void *saved = ef_malloc(sbytes);
    const ef_attn_io good = {b.q, b.k, b.v, NULL, b.out};

    /* forward */
#define FWD(what, plan, io, word)                                                                  \
    do {                                                                                           \
        snprintf(label, sizeof label, "%s: forward %s", mech, what);                               \
        check_err(label, ef_attn_forward(plan, io, saved), EF_ERR_ARG, word, NULL);                \
    } while (0)
    ef_attn_io io;
    FWD("plan=NULL", NULL, &good, "plan");
    FWD("io=NULL", a, NULL, "io");
    io = good, io.q = NULL;
    FWD("io->q=NULL", a, &io, "q");
    io = good, io.k = NULL;
    FWD("io->k=NULL", a, &io, "k");
    io = good, io.v = NULL;
    FWD("io->v=NULL", a, &io, "v");
    io = good, io.out = NULL;
    FWD("io->out=NULL", a, &io, "out");
#undef FWD

    /* a good forward, then backward with one bad argument at a time */
    st = ef_attn_forward(a, &good, saved);
    snprintf(label, sizeof label, "%s: forward with saved", mech);
    ef_check_status(label, st, EF_OK);
#define BWD(what, plan, io, sv, g, q_, k_, v_, word)                                               \
    do {                                                                                           \
        snprintf(label, sizeof label, "%s: backward %s", mech, what);                              \
        check_err(label, ef_attn_backward(plan, io, sv, g, q_, k_, v_), EF_ERR_ARG, word, NULL);   \
    } while (0)
    BWD("plan=NULL", NULL, &good, saved, b.dout, b.dq, b.dk, b.dv, "plan");
    BWD("io=NULL", a, NULL, saved, b.dout, b.dq, b.dk, b.dv, "io");
    io = good, io.q = NULL;
    BWD("io->q=NULL", a, &io, saved, b.dout, b.dq, b.dk, b.dv, "q");
    io = good, io.k = NULL;
    BWD("io->k=NULL", a, &io, saved, b.dout, b.dq, b.dk, b.dv, "k");
    io = good, io.v = NULL;
    BWD("io->v=NULL", a, &io, saved, b.dout, b.dq, b.dk, b.dv, "v");
    io = good, io.out = NULL;
    BWD("io->out=NULL", a, &io, saved, b.dout, b.dq, b.dk, b.dv, "out");
    BWD("saved=NULL", a, &good, NULL, b.dout, b.dq, b.dk, b.dv, "saved");
    BWD("dout=NULL", a, &good, saved, NULL, b.dq, b.dk, b.dv, "dout");
    BWD("dq=NULL", a, &good, saved, b.dout, NULL, b.dk, b.dv, "dq");
    BWD("dk=NULL", a, &good, saved, b.dout, b.dq, NULL, b.dv, "dk");
    BWD("dv=NULL", a, &good, saved, b.dout, b.dq, b.dk, NULL, "dv");
#undef BWD

    /* kv_lens outside [0, kv_len]: the message names the batch index and the value */
    const int32_t bad[][2] = {{-1, 23}, {23, 24}, {5, INT_MIN}, {INT_MAX, 0}};
    const char *want[] = {"kv_lens[0]=-1", "kv_lens[1]=24", "kv_lens[1]=-2147483648",
                          "kv_lens[0]=2147483647"};
    for (int i = 0; i < 4; i++) {
        io = good, io.kv_lens = bad[i];
        snprintf(label, sizeof label, "%s: forward kv_lens={%d,%d}", mech, bad[i][0], bad[i][1]);
        check_err(label, ef_attn_forward(a, &io, saved), EF_ERR_ARG, NULL, want[i]);
        snprintf(label, sizeof label, "%s: backward kv_lens={%d,%d}", mech, bad[i][0], bad[i][1]);
        check_err(label, ef_attn_backward(a, &io, saved, b.dout, b.dq, b.dk, b.dv), EF_ERR_ARG,
                  NULL, want[i]);
    }

    /* q_lens outside [0, q_len]: the message names the batch index and the value */
    const int32_t badq[][2] = {{-3, 19}, {19, 20}};
    const char *wantq[] = {"q_lens[0]=-3", "q_lens[1]=20"};
    for (int i = 0; i < 2; i++) {
        io = good, io.q_lens = badq[i];
        snprintf(label, sizeof label, "%s: forward q_lens={%d,%d}", mech, badq[i][0], badq[i][1]);
        check_err(label, ef_attn_forward(a, &io, saved), EF_ERR_ARG, NULL, wantq[i]);
        snprintf(label, sizeof label, "%s: backward q_lens={%d,%d}", mech, badq[i][0],
                 badq[i][1]);
        check_err(label, ef_attn_backward(a, &io, saved, b.dout, b.dq, b.dk, b.dv), EF_ERR_ARG,
                  NULL, wantq[i]);
    }

    /* saved must be EF_SAVED_ALIGN-aligned (a plan that saves nothing ignores saved) */
    if (sbytes > 0) {
        char *raw = ef_malloc(sbytes + EF_SAVED_ALIGN);
        snprintf(label, sizeof label, "%s: forward with saved misaligned by 4 bytes", mech);
        check_err(label, ef_attn_forward(a, &good, raw + 4), EF_ERR_ARG, NULL, "aligned");
        snprintf(label, sizeof label, "%s: backward with saved misaligned by 4 bytes", mech);
        check_err(label, ef_attn_backward(a, &good, raw + 4, b.dout, b.dq, b.dk, b.dv),
                  EF_ERR_ARG, NULL, "aligned");
        ef_free(raw);
    }

    /* the argument errors above left a usable plan: a full forward + backward still works */
    st = ef_attn_forward(a, &good, saved);
    if (!st) st = ef_attn_backward(a, &good, saved, b.dout, b.dq, b.dk, b.dv);
    snprintf(label, sizeof label, "%s: forward + backward after the errors, finite", mech);
    ef_check(label,
             !st && all_finite(b.out, b.no) && all_finite(b.dq, b.nq) && all_finite(b.dk, b.nk) &&
                 all_finite(b.dv, b.nv),
             "%s", ef_status_str(st));
    ef_free(saved);
    ef_attn_free(a);
    free_bufs(&b);
}

/* ---------------------------------------------------------------------------------------------
 * Inference, padding extremes, plan queries
 * ------------------------------------------------------------------------------------------- */
static void test_inference(const char *mech, int causal) {
    const ef_attn_shape s = {2, 3, 37, 29, 16, 24};
    bufs b = make_bufs(s, 200 + causal);
    char spec[64], label[128];
    snprintf(spec, sizeof spec, "%s:causal=%d", mech, causal);
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &s);
    void *saved = st ? NULL : ef_malloc(ef_attn_saved_bytes(a));
    float *out2 = ef_test_zeros(b.no);
    ef_attn_io io = {b.q, b.k, b.v, NULL, b.out};
    if (!st) st = ef_attn_forward(a, &io, saved);
    io.out = out2;
    if (!st) st = ef_attn_forward(a, &io, NULL);
    snprintf(label, sizeof label, "%s: forward(saved=NULL) == forward(saved) bit for bit", spec);
    ef_check(label,
             !st && memcmp(b.out, out2, b.no * sizeof(float)) == 0 && all_finite(b.out, b.no),
             "%s, max diff %.3e", ef_status_str(st), ef_max_abs_diff(out2, b.out, b.no));

    /* kv_lens {0, kv_len}: batch 0 sees no key (zeros out, zero gradients), batch 1 all keys
     * (identical to kv_lens = NULL) */
    const int32_t lens[2] = {0, s.kv_len};
    float *out3 = ef_test_zeros(b.no);
    for (size_t i = 0; i < b.no; i++) out3[i] = NAN; /* every element must be written */
    io.out = out3, io.kv_lens = lens;
    ef_status st2 = st ? st : ef_attn_forward(a, &io, saved);
    size_t half_o = b.no / 2;
    double z0 = 0;
    for (size_t i = 0; i < half_o; i++) z0 = fmax(z0, isnan(out3[i]) ? INFINITY : fabs(out3[i]));
    snprintf(label, sizeof label, "%s: kv_lens[0]=0: batch 0 output exactly zero", spec);
    ef_check(label, !st2 && z0 == 0, "%s, max |out| %.3e", ef_status_str(st2), z0);
    snprintf(label, sizeof label, "%s: kv_lens[1]=kv_len: batch 1 == kv_lens NULL", spec);
    ef_check(label, !st2 && memcmp(out3 + half_o, b.out + half_o, half_o * sizeof(float)) == 0,
             "%s, max diff %.3e", ef_status_str(st2),
             ef_max_abs_diff(out3 + half_o, b.out + half_o, half_o));
    for (size_t i = 0; i < b.nq; i++) b.dq[i] = NAN; /* backward must overwrite them */
    for (size_t i = 0; i < b.nk; i++) b.dk[i] = NAN;
    for (size_t i = 0; i < b.nv; i++) b.dv[i] = NAN;
    if (!st2) st2 = ef_attn_backward(a, &io, saved, b.dout, b.dq, b.dk, b.dv);
    double g0 = 0;
    for (size_t i = 0; i < b.nq / 2; i++) g0 = fmax(g0, isnan(b.dq[i]) ? INFINITY : fabs(b.dq[i]));
    for (size_t i = 0; i < b.nk / 2; i++) g0 = fmax(g0, isnan(b.dk[i]) ? INFINITY : fabs(b.dk[i]));
    for (size_t i = 0; i < b.nv / 2; i++) g0 = fmax(g0, isnan(b.dv[i]) ? INFINITY : fabs(b.dv[i]));
    int fin = all_finite(b.dq, b.nq) && all_finite(b.dk, b.nk) && all_finite(b.dv, b.nv);
    snprintf(label, sizeof label, "%s: kv_lens={0,M}: batch 0 gradients zero, all finite", spec);
    ef_check(label, !st2 && g0 == 0 && fin, "%s, max |grad| batch 0 %.3e, finite %d",
             ef_status_str(st2), g0, fin);
    free(out2), free(out3);
    ef_free(saved);
    ef_attn_free(a);
    free_bufs(&b);
}

/* Visible (query, key) pairs of a top-left causal mask on an n x m grid, by counting. */
static double causal_pairs(int n, int m) {
    double c = 0;
    for (int i = 0; i < n; i++) c += i + 1 < m ? i + 1 : m;
    return c;
}

static void test_queries(const char *mech) {
    char label[160];
    const ef_attn_shape s = {3, 2, 19, 23, 16, 12};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, mech, &s);
    snprintf(label, sizeof label, "%s: plan for the queries", mech);
    ef_check_status(label, st, EF_OK);
    if (st) return;
    ef_attn_shape g = ef_attn_get_shape(a);
    snprintf(label, sizeof label, "%s: ef_attn_get_shape", mech);
    ef_check(label, memcmp(&g, &s, sizeof g) == 0, "{%d,%d,%d,%d,%d,%d}", g.batch, g.heads, g.q_len,
             g.kv_len, g.head_dim, g.v_dim);
    size_t pc = ef_attn_param_count(a);
    float *pp = ef_attn_params(a), *pg = ef_attn_param_grads(a);
    snprintf(label, sizeof label, "%s: no learned parameters (count 0, pointers NULL)", mech);
    ef_check(label, pc == 0 && !pp && !pg, "%zu %p %p", pc, (void *)pp, (void *)pg);

    size_t bhn = (size_t)s.batch * s.heads * s.q_len;
    size_t want = strcmp(mech, "flash") == 0 ? bhn * 4 : bhn * s.kv_len * 4;
    size_t sb = ef_attn_saved_bytes(a), wb = ef_attn_workspace_bytes(a);
    snprintf(label, sizeof label, "%s: saved bytes = %s", mech,
             strcmp(mech, "flash") == 0 ? "B*H*N*4 (log-sum-exp)" : "B*H*N*M*4 (probabilities)");
    ef_check(label, sb == want, "%zu want %zu", sb, want);
    /* full keeps one N x M score buffer; flash per-thread tiles */
    size_t wmin = strcmp(mech, "full") == 0 ? (size_t)s.q_len * s.kv_len * 4 : 1;
    snprintf(label, sizeof label, "%s: workspace bytes >= %zu", mech, wmin);
    ef_check(label, wb >= wmin, "%zu", wb);
    ef_attn_free(a);

    /* FLOP counts. Forward: S = QK^T (2NMD) and O = PV (2NMDv). Backward: S again (2NMD),
     * dV = P^T dO (2NMDv), dP = dO V^T (2NMDv), dQ = dS K (2NMD), dK = dS^T Q (2NMD); so
     * forward + backward = 2NM(4D + 3Dv): 14NMD = 3.5 x forward when D = Dv. Causal: times the
     * fraction of visible pairs. */
    static const ef_attn_shape shapes[] = {{2, 3, 40, 40, 32, 32},
                                           {1, 4, 64, 100, 16, 16},
                                           {3, 1, 100, 64, 8, 8},
                                           {2, 2, 19, 23, 16, 12}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const ef_attn_shape *h = &shapes[i];
        double nm = (double)h->batch * h->heads * h->q_len * h->kv_len;
        double fwd = 2 * nm * (h->head_dim + h->v_dim),
               both = 2 * nm * (4 * h->head_dim + 3 * h->v_dim);
        double frac = causal_pairs(h->q_len, h->kv_len) / ((double)h->q_len * h->kv_len);
        for (int causal = 0; causal <= 1; causal++) {
            char spec[64];
            snprintf(spec, sizeof spec, "%s:causal=%d", mech, causal);
            ef_attn *p = NULL;
            st = ef_attn_new(&p, spec, h);
            double f0 = st ? NAN : ef_attn_flops(p, 0), f1 = st ? NAN : ef_attn_flops(p, 1);
            double w0 = causal ? fwd * frac : fwd, w1 = causal ? both * frac : both;
            snprintf(label, sizeof label, "%s N=%d M=%d D=%d Dv=%d: flops fwd rel err", spec,
                     h->q_len, h->kv_len, h->head_dim, h->v_dim);
            ef_check_err(label, fabs(f0 - w0) / w0, 1e-12); /* exact up to double rounding */
            snprintf(label, sizeof label, "%s N=%d M=%d D=%d Dv=%d: flops fwd+bwd rel err", spec,
                     h->q_len, h->kv_len, h->head_dim, h->v_dim);
            ef_check_err(label, fabs(f1 - w1) / w1, 1e-12);
            if (h->head_dim == h->v_dim) {
                snprintf(label, sizeof label, "%s N=%d M=%d: fwd+bwd / fwd - 3.5", spec, h->q_len,
                         h->kv_len);
                ef_check_err(label, fabs(f1 / f0 - 3.5), 1e-12);
            }
            if (causal && h->q_len == h->kv_len) {
                ef_attn *nc = NULL;
                snprintf(spec, sizeof spec, "%s:causal=0", mech);
                st = ef_attn_new(&nc, spec, h);
                double r = st ? NAN : f0 / ef_attn_flops(nc, 0);
                double wr = (h->q_len + 1.0) / (2.0 * h->q_len);
                snprintf(label, sizeof label, "%s N=M=%d: causal/non-causal - (N+1)/(2N)", mech,
                         h->q_len);
                ef_check_err(label, fabs(r - wr), 1e-12);
                ef_attn_free(nc);
            }
            ef_attn_free(p);
        }
    }
}

/* ef_attn_get_caps: every registered name answers, with values 0 or 1; bad arguments fail. */
static void test_caps(void) {
    ef_attn_caps c;
    for (int i = 0; i < ef_attn_count(); i++) {
        const char *name = ef_attn_name(i);
        memset(&c, 0x55, sizeof c);
        ef_status st = ef_attn_get_caps(name, &c);
        const int *f = (const int *)&c;
        int ok = 1;
        for (size_t x = 0; x < sizeof c / sizeof(int); x++) ok &= f[x] == 0 || f[x] == 1;
        char label[128];
        snprintf(label, sizeof label, "caps of %s: answered, every field 0 or 1", name);
        ef_check(label, !st && ok, "%s", ef_status_str(st));
    }
    check_err("caps: unknown name", ef_attn_get_caps("nosuch", &c), EF_ERR_ARG, NULL, "nosuch");
    check_err("caps: name NULL", ef_attn_get_caps(NULL, &c), EF_ERR_ARG, NULL, "name");
    check_err("caps: caps NULL", ef_attn_get_caps("full", NULL), EF_ERR_ARG, NULL, "caps");
}

/* ef_attn_random_features: performer's W [m][D], the sizes, the refusals; and a mechanism
 * whose caps say random but that draws no projections (lsh's rotations, bigbird's blocks) is
 * not asked here: only performer has them. */
static void test_random_features(void) {
    ef_attn_shape sh = {1, 2, 16, 16, 8, 8};
    ef_attn *a = NULL, *f = NULL;
    ef_attn_new(&a, "performer:features=12", &sh);
    size_t count = 0;
    ef_check_status("random features: the count", ef_attn_random_features(a, NULL, 0, &count),
                    EF_OK);
    ef_check("  12 x head_dim 8 floats", count == 96, "%zu", count);
    float w[96], w2[96];
    ef_check_status("random features: copied", ef_attn_random_features(a, w, 96, &count), EF_OK);
    int finite = 1, nonzero = 0;
    for (int i = 0; i < 96; i++) finite &= isfinite(w[i]), nonzero += w[i] != 0;
    ef_check("  finite and drawn", finite && nonzero > 90, "%d nonzero", nonzero);
    ef_attn *b = NULL;
    ef_attn_new(&b, "performer:features=12", &sh);
    ef_attn_random_features(b, w2, 96, &count);
    ef_check("  the same seed draws the same projections", !memcmp(w, w2, sizeof w), "%s", "");
    ef_attn_free(b);
    ef_attn_new(&b, "performer:features=12,seed=5", &sh);
    ef_attn_random_features(b, w2, 96, &count);
    ef_check("  another seed draws others", memcmp(w, w2, sizeof w) != 0, "%s", "");
    ef_attn_free(b);
    check_err("random features: n too small", ef_attn_random_features(a, w, 95, &count),
              EF_ERR_ARG, NULL, "n=95");
    check_err("random features: count NULL", ef_attn_random_features(a, w, 96, NULL), EF_ERR_ARG,
              NULL, "count");
    ef_attn_new(&f, "flash", &sh);
    check_err("random features: flash has none", ef_attn_random_features(f, w, 96, &count),
              EF_ERR_UNSUPPORTED, NULL, "flash");
    check_err("random features: plan NULL", ef_attn_random_features(NULL, w, 96, &count),
              EF_ERR_ARG, NULL, "plan");
    ef_attn_free(a), ef_attn_free(f);
}

int main(void) {
    test_null_plan();
    test_caps();
    test_random_features();
    for (int m = 0; m < NMECH; m++) {
        test_call_args(MECH[m]);
        test_inference(MECH[m], 0);
        test_inference(MECH[m], 1);
        test_queries(MECH[m]);
    }
    return ef_test_finish();
}
