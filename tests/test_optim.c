/*
 * test_optim.c - the training machinery of src/train/optim.h (docs/training.md):
 *
 *  1. AdamW against a double-precision computation of the update equations over 3 steps, for
 *     decay and no-decay tensors, with bias correction, weight decay, accumulation scale;
 *     weight decay only on decay=1 tensors; the padding floats stay 0;
 *  2. the learning-rate schedules at chosen steps against hand values; parse, describe, errors;
 *  3. the gradient norm against a double reference, independent of the thread count; clipping
 *     (the clipped norm, clip 0, the optimizer's clip = clipping first); a NaN gradient is
 *     EF_ERR_NUMERIC naming the step and tensor, nothing changed;
 *  4. accumulation: two half micro-batches with accum=2 equal one batch;
 *  5. resume: 10 steps equal 5 steps + save + free + resume + 5 steps, bitwise (parameters, m,
 *     v); 1 vs 2 threads bitwise; a truncated state file, another model size, another spec,
 *     files from different saves and reserved metadata keys are refused;
 *  6. errors of the options and calls.
 *
 * The model is tiny (dim 16, 1 layer, vocab 13, len 16), so the suite takes well under a second.
 */
#define _POSIX_C_SOURCE 200809L
#include "harness.h"
#include "train/optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char label[640];
#define LABEL(...) (snprintf(label, sizeof label, __VA_ARGS__), label)

static const char *SPEC = "layers=1,dim=16,heads=2,ff=32,vocab=13,max_len=16,attn=flash:causal=1";
/* dim 12: the 12-float tensors (norms, biases) are followed by 4 padding floats */
static const char *SPEC_PAD =
    "layers=1,dim=12,heads=2,ff=20,vocab=13,max_len=16,attn=flash:causal=1";
enum { VOCAB = 13, LEN = 16, BATCH = 4 };

static ef_model *mk(const char *spec, int batch, uint64_t seed) {
    ef_model *m = NULL;
    ef_model_opts o = {batch, seed, 1};
    ef_status st = ef_model_new(&m, spec, &o);
    if (st)
        ef_check(LABEL("model builds: %.500s", spec), 0, "%s: %s", ef_status_str(st),
                 ef_last_error());
    return m;
}

static int contains(const char *s, const char *needle) { return s && needle && strstr(s, needle); }

/* Passes when st == want and ef_last_error() contains both needles (NULL: not checked). */
static void check_err_msg(const char *name, ef_status st, ef_status want, const char *n1,
                          const char *n2) {
    const char *msg = ef_last_error();
    int ok = st == want && (want == EF_OK || (msg && msg[0])) && (!n1 || contains(msg, n1)) &&
             (!n2 || contains(msg, n2));
    ef_check(name, ok, "%s (want %s%s%s%s%s): '%s'", ef_status_str(st), ef_status_str(want),
             n1 ? ", naming '" : "", n1 ? n1 : "", n2 ? "' and '" : "", n2 ? n2 : "", msg);
}

static float *copy_of(const float *x, size_t n) {
    float *c = malloc(n * sizeof(float));
    memcpy(c, x, n * sizeof(float));
    return c;
}

static int bitwise_equal(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* 1 for floats of the parameter buffer that belong to a tensor, 0 for padding. */
static unsigned char *tensor_mask(const ef_model *m) {
    size_t F = ef_model_param_floats(m);
    unsigned char *mask = calloc(F, 1);
    for (int i = 0; i < ef_model_tensor_count(m); i++) {
        ef_tensor_info t;
        ef_model_tensor(m, i, &t);
        memset(mask + t.offset, 1, t.numel);
    }
    return mask;
}

/* Gradients of "step" k: N(0, 0.1^2) on the tensors, 0 on the padding. */
static void fill_grads(ef_model *m, const unsigned char *mask, uint64_t k) {
    size_t F = ef_model_param_floats(m);
    float *g = ef_model_grads(m);
    ef_rng_normal(777, k, 0, F, g);
    for (size_t i = 0; i < F; i++) g[i] = mask[i] ? 0.1f * g[i] : 0.0f;
}

/* A synthetic lm batch of `batch` full sequences, a pure function of `id`. */
typedef struct test_batch {
    int32_t tokens[BATCH * LEN], targets[BATCH * LEN];
    ef_model_batch b;
} test_batch;

static void make_batch(test_batch *tb, int batch, uint64_t id) {
    for (int i = 0; i < batch * LEN; i++) {
        uint32_t r[4];
        ef_rng_raw(4242, id, (uint64_t)i, r);
        tb->tokens[i] = (int32_t)(r[0] % VOCAB);
        tb->targets[i] = (int32_t)(r[1] % VOCAB);
    }
    tb->b = (ef_model_batch){batch, LEN, tb->tokens, NULL, tb->targets};
}

/* ---------------------------------------------------------------------------------------------
 * 1. AdamW against the equations in double
 * ------------------------------------------------------------------------------------------- */
static void test_adamw_reference(void) {
    ef_model *m = mk(SPEC_PAD, 2, 11);
    if (!m) return;
    size_t F = ef_model_param_floats(m);
    unsigned char *mask = tensor_mask(m);
    ef_optim_opts oo = ef_optim_defaults();
    oo.sched = (ef_sched){EF_SCHED_CONSTANT, 0.01, 0.0, 2, 0}; /* warmup 2: lr 0.005, 0.01, 0.01 */
    oo.weight_decay = 0.1;
    oo.beta1 = 0.8, oo.beta2 = 0.95, oo.eps = 1e-6;
    oo.accum = 2; /* the gradient buffer is halved */
    ef_optim *o = NULL;
    ef_status st = ef_optim_new(&o, m, &oo);
    ef_check_status("adamw: ef_optim_new", st, EF_OK);
    if (st) goto done;

    double *p = malloc(F * sizeof(double)), *mm = calloc(F, sizeof(double)),
           *vv = calloc(F, sizeof(double));
    unsigned char *decay = calloc(F, 1);
    for (int i = 0; i < ef_model_tensor_count(m); i++) {
        ef_tensor_info t;
        ef_model_tensor(m, i, &t);
        memset(decay + t.offset, t.decay ? 1 : 0, t.numel);
    }
    for (size_t i = 0; i < F; i++) p[i] = ef_model_params(m)[i];
    int steps_ok = 1;
    for (int t = 1; t <= 3; t++) {
        fill_grads(m, mask, (uint64_t)t);
        const float *g = ef_model_grads(m);
        double lr = t == 1 ? 0.005 : 0.01; /* by hand: warmup 2 -> 0.01 * 1/2, then 0.01 */
        double bc1 = 1 - pow(0.8, t), bc2 = 1 - pow(0.95, t);
        for (size_t i = 0; i < F; i++) {
            if (!mask[i]) continue;
            double gi = 0.5 * g[i];
            if (decay[i]) p[i] *= 1 - lr * 0.1;
            mm[i] = 0.8 * mm[i] + 0.2 * gi;
            vv[i] = 0.95 * vv[i] + 0.05 * gi * gi;
            p[i] -= lr * (mm[i] / bc1) / (sqrt(vv[i] / bc2) + 1e-6);
        }
        ef_optim_report rep;
        st = ef_optim_step(o, &rep);
        steps_ok &= st == EF_OK && rep.step == t && fabs(rep.lr - lr) <= 1e-15 &&
                    fabs(rep.scale - 0.5) == 0;
    }
    ef_check("adamw: 3 steps succeed, report step, lr (warmup), scale 1/accum", steps_ok,
             "steps %lld", (long long)ef_optim_steps(o));
    /* p: error relative to |p| + lr (fp32 keeps p to ~6e-8 |p| and computes each update, of
     * size ~lr, to a few ulps); m, v: relative to their largest value (a moment that nearly
     * cancels keeps the absolute rounding of its terms) */
    double err[2] = {0, 0}, errm = 0, errv = 0, maxm = 0, maxv = 0;
    size_t seen[2] = {0, 0};
    const float *pf = ef_model_params(m), *mf = ef_optim_m(o), *vf = ef_optim_v(o);
    for (size_t i = 0; i < F; i++) maxm = fmax(maxm, fabs(mm[i])), maxv = fmax(maxv, vv[i]);
    for (size_t i = 0; i < F; i++) {
        if (!mask[i]) continue;
        int d = decay[i];
        err[d] = fmax(err[d], fabs(pf[i] - p[i]) / (fabs(p[i]) + 0.01));
        errm = fmax(errm, fabs(mf[i] - mm[i]) / maxm);
        errv = fmax(errv, fabs(vf[i] - vv[i]) / maxv);
        seen[d]++;
    }
    ef_check("adamw: the model has decay and no-decay tensors", seen[0] > 0 && seen[1] > 0,
             "%zu no-decay, %zu decay floats", seen[0], seen[1]);
    ef_check_err("adamw: 3 steps vs double, decay=1 tensors (rel.)", err[1], 1e-6);
    ef_check_err("adamw: 3 steps vs double, decay=0 tensors (rel.)", err[0], 1e-6);
    ef_check_err("adamw: first moment m vs double (rel.)", errm, 1e-6);
    ef_check_err("adamw: second moment v vs double (rel.)", errv, 1e-6);

    /* a few named elements, as printed values */
    const char *names[] = {"embed.weight", "layers.0.ln1.bias", "layers.0.ln1.weight"};
    for (int k = 0; k < 3; k++) {
        ef_tensor_info t;
        if (ef_model_find(m, names[k], &t)) {
            ef_check(LABEL("adamw: tensor %s exists", names[k]), 0, "%s", ef_last_error());
            continue;
        }
        double e = 0;
        for (size_t j = 0; j < (t.numel < 5 ? t.numel : 5); j++)
            e = fmax(e, fabs(pf[t.offset + j] - p[t.offset + j]) / (fabs(p[t.offset + j]) + 0.01));
        ef_check_err(LABEL("adamw: %s (decay=%d) first 5 elements vs double", names[k], t.decay), e,
                     1e-6);
    }

    /* weight decay only on decay=1 tensors: with zero gradients a decay=0 tensor keeps every
     * bit, a decay=1 tensor is multiplied by (float)(1 - lr wd) exactly */
    float *before = copy_of(pf, F);
    int nodecay_same = 1, decay_scaled = 1;
    float keep = (float)(1.0 - 0.01 * 0.1);
    /* a fresh optimizer (m = v = 0), so the Adam part of the update is exactly 0 */
    ef_optim *o2 = NULL;
    ef_model_zero_grad(m);
    ef_optim_opts oo2 = oo;
    oo2.sched = (ef_sched){EF_SCHED_CONSTANT, 0.01, 0.0, 0, 0};
    st = ef_optim_new(&o2, m, &oo2);
    if (!st) st = ef_optim_step(o2, NULL);
    ef_check_status("adamw: step with zero gradients", st, EF_OK);
    for (int i = 0; i < ef_model_tensor_count(m); i++) {
        ef_tensor_info t;
        ef_model_tensor(m, i, &t);
        for (size_t j = 0; j < t.numel; j++) {
            float now = pf[t.offset + j], was = before[t.offset + j];
            if (t.decay)
                decay_scaled &= now == was * keep;
            else
                nodecay_same &= memcmp(&now, &was, sizeof now) == 0;
        }
    }
    ef_check("adamw: zero gradient, decay=0 tensors bitwise unchanged (no weight decay)",
             nodecay_same, " ");
    ef_check("adamw: zero gradient, decay=1 tensors scaled by exactly (1 - lr wd)", decay_scaled,
             "keep %.9g", (double)keep);

    /* padding floats of params, m and v are still 0 (after the 3 + 1 updates above) */
    int pad_zero = 1;
    size_t pads = 0;
    for (size_t i = 0; i < F; i++)
        if (!mask[i])
            pads++, pad_zero &= pf[i] == 0 && ef_optim_m(o)[i] == 0 && ef_optim_v(o)[i] == 0 &&
                                ef_optim_m(o2)[i] == 0 && ef_optim_v(o2)[i] == 0;
    ef_check("adamw: padding floats of parameters, m, v stay 0", pad_zero && pads > 0,
             "%zu padding floats", pads);
    ef_optim_free(o2);
    free(before);
    free(p), free(mm), free(vv), free(decay);
done:
    ef_optim_free(o);
    free(mask);
    ef_model_free(m);
}

/* ---------------------------------------------------------------------------------------------
 * 2. Schedules
 * ------------------------------------------------------------------------------------------- */
static void check_lr(const char *spec, int64_t t, double want) {
    ef_sched s;
    ef_status st = ef_sched_parse(spec, &s);
    if (st) {
        ef_check_status(LABEL("sched %s parses", spec), st, EF_OK);
        return;
    }
    double got = ef_sched_lr(&s, t);
    ef_check_err(LABEL("sched %s: lr(%lld) = %.10g", spec, (long long)t, want),
                 fabs(got - want) / fmax(fabs(want), 1e-300), 1e-14);
}

static void test_schedules(void) {
    /* constant with warmup 4: t/4 up to t = 4 */
    check_lr("constant:lr=1,warmup=4", 1, 0.25);
    check_lr("constant:lr=1,warmup=4", 3, 0.75);
    check_lr("constant:lr=1,warmup=4", 4, 1.0);
    check_lr("constant:lr=1,warmup=4", 1000, 1.0);
    check_lr("constant:lr=0.5", 1, 0.5);
    check_lr("constant:lr=1,warmup=4", 0, 0.25); /* t < 1 is taken as 1 */
    /* cosine from 1 to 0.1 over steps 10 .. 110: midpoint 60 gives (1 + 0.1) / 2 */
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 5, 0.5);
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 9, 0.9);
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 10, 1.0);
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 60, 0.55);
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 35, 0.1 + 0.9 * 0.5 * (1 + sqrt(0.5)));
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 110, 0.1);
    check_lr("cosine:lr=1,warmup=10,total=110,min_lr=0.1", 500, 0.1);
    check_lr("cosine:lr=2,total=100", 50, 1.0);
    /* rsqrt: lr sqrt(W / t) after warmup W = 100 */
    check_lr("rsqrt:lr=2,warmup=100", 50, 1.0);
    check_lr("rsqrt:lr=2,warmup=100", 100, 2.0);
    check_lr("rsqrt:lr=2,warmup=100", 400, 1.0);
    check_lr("rsqrt:lr=2,warmup=100", 10000, 0.2);
    /* LRA ListOps: learning_rate 0.05 * min(1, t/W) / sqrt(max(t, W)), W = 1000, is
     * lr = 0.05 / sqrt(1000) */
    char lra[80];
    snprintf(lra, sizeof lra, "rsqrt:lr=%.17g,warmup=1000", 0.05 / sqrt(1000.0));
    check_lr(lra, 4000, 0.05 / sqrt(4000.0));
    check_lr(lra, 500, 0.05 * 0.5 / sqrt(1000.0));
    check_lr(lra, 1000, 0.05 / sqrt(1000.0));
    check_lr("rsqrt:lr=1", 4, 0.5); /* no warmup: lr / sqrt(t) */
    /* linear from 1 to 0 over 10 .. 110 */
    check_lr("linear:lr=1,warmup=10,total=110", 60, 0.5);
    check_lr("linear:lr=1,warmup=10,total=110", 85, 0.25);
    check_lr("linear:lr=1,warmup=10,total=110", 110, 0.0);
    check_lr("linear:lr=1,warmup=10,total=110,min_lr=0.2", 200, 0.2);

    /* describe round trips, bit for bit */
    const char *specs[] = {"cosine:lr=0.0003,warmup=500,total=20000,min_lr=1e-5", "rsqrt:lr=0.1",
                           "linear:total=7", "constant"};
    for (int i = 0; i < 4; i++) {
        ef_sched a, b;
        char buf[256];
        ef_status st = ef_sched_parse(specs[i], &a);
        if (!st) st = ef_sched_describe(&a, buf, sizeof buf);
        if (!st) st = ef_sched_parse(buf, &b);
        ef_check(LABEL("sched describe round trip: %s", specs[i]),
                 !st && a.kind == b.kind && a.lr == b.lr && a.min_lr == b.min_lr &&
                     a.warmup == b.warmup && a.total == b.total,
                 "'%s'", st ? ef_last_error() : buf);
    }
    ef_sched s = ef_sched_defaults(), keep = s;
    check_err_msg("sched error: unknown kind", ef_sched_parse("exp:lr=1", &s), EF_ERR_ARG, "exp",
                  NULL);
    check_err_msg("sched error: unknown key", ef_sched_parse("constant:gamma=1", &s), EF_ERR_ARG,
                  "gamma", NULL);
    check_err_msg("sched error: bad number", ef_sched_parse("constant:lr=1e-3x", &s), EF_ERR_ARG,
                  "1e-3x", NULL);
    check_err_msg("sched error: negative lr", ef_sched_parse("constant:lr=-1", &s), EF_ERR_ARG,
                  "lr=-1", NULL);
    check_err_msg("sched error: negative warmup", ef_sched_parse("constant:warmup=-3", &s),
                  EF_ERR_ARG, "warmup", NULL);
    check_err_msg("sched error: cosine total <= warmup",
                  ef_sched_parse("cosine:warmup=10,total=10", &s), EF_ERR_ARG, "total=10", NULL);
    check_err_msg("sched error: linear without total", ef_sched_parse("linear:lr=1", &s),
                  EF_ERR_ARG, "total=0", NULL);
    check_err_msg("sched error: item without =", ef_sched_parse("constant:lr", &s), EF_ERR_FORMAT,
                  "lr", NULL);
    ef_check("sched error: *out unchanged on failure", memcmp(&s, &keep, sizeof s) == 0, " ");
    char small[8];
    check_err_msg("sched describe: buffer too small", ef_sched_describe(&s, small, sizeof small),
                  EF_ERR_ARG, NULL, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * 3. Norm and clipping
 * ------------------------------------------------------------------------------------------- */
static double ref_norm(const float *g, size_t n) {
    long double s = 0;
    for (size_t i = 0; i < n; i++) s += (long double)g[i] * g[i];
    return (double)sqrtl(s);
}

static void test_clipping(void) {
    size_t n = 1000003; /* several parts, an odd tail */
    float *g = ef_test_randn(n, 5, 0.01f);
    double want = ref_norm(g, n);
    int old = ef_get_num_threads();
    ef_set_num_threads(1);
    double n1 = ef_grad_norm(g, n);
    ef_set_num_threads(2);
    double n2 = ef_grad_norm(g, n);
    ef_set_num_threads(3);
    double n3 = ef_grad_norm(g, n);
    ef_set_num_threads(old);
    ef_check_err("norm: vs long double reference (rel.)", fabs(n1 - want) / want, 1e-13);
    ef_check("norm: 1, 2, 3 threads bitwise equal",
             memcmp(&n1, &n2, sizeof n1) == 0 && memcmp(&n1, &n3, sizeof n1) == 0,
             "%.17g %.17g %.17g", n1, n2, n3);
    ef_check_err("norm: small buffer (one part) vs reference",
                 fabs(ef_grad_norm(g, 37) - ref_norm(g, 37)) / ref_norm(g, 37), 1e-14);
    ef_check("norm: empty buffer is 0", ef_grad_norm(NULL, 0) == 0 && ef_grad_norm(g, 0) == 0, " ");

    /* clipping to half the norm: the clipped gradient has norm clip */
    double norm = 0, clip = want / 2;
    float *c = copy_of(g, n);
    ef_status st = ef_clip_grad_norm(c, n, clip, &norm);
    ef_check_status("clip: status", st, EF_OK);
    ef_check_err("clip: returns the norm before clipping", fabs(norm - n1), 0);
    ef_check_err("clip: clipped gradient has norm = clip (rel.)",
                 fabs(ref_norm(c, n) - clip) / clip, 1e-6);
    float s = (float)(clip / norm);
    int scaled = 1;
    for (size_t i = 0; i < n; i++) scaled &= c[i] == g[i] * s;
    ef_check("clip: every element multiplied by the same float clip/norm", scaled, "%.9g",
             (double)s);
    memcpy(c, g, n * sizeof(float));
    st = ef_clip_grad_norm(c, n, 0.0, &norm);
    ef_check("clip 0: no-op, norm still reported", !st && bitwise_equal(c, g, n) && norm == n1,
             " ");
    st = ef_clip_grad_norm(c, n, 2 * want, &norm);
    ef_check("clip above the norm: no-op", !st && bitwise_equal(c, g, n), " ");
    c[n / 2] = NAN;
    float *c2 = copy_of(c, n);
    st = ef_clip_grad_norm(c, n, 1e-3, &norm);
    check_err_msg("clip: NaN gradient is EF_ERR_NUMERIC", st, EF_ERR_NUMERIC, "nan", NULL);
    ef_check("clip: NaN gradient leaves g unchanged", bitwise_equal(c, c2, n), " ");
    c[n / 2] = INFINITY;
    check_err_msg("clip: Inf gradient is EF_ERR_NUMERIC", ef_clip_grad_norm(c, n, 0, &norm),
                  EF_ERR_NUMERIC, "inf", NULL);
    check_err_msg("clip: negative clip refused", ef_clip_grad_norm(g, n, -1, &norm), EF_ERR_ARG,
                  "clip=-1", NULL);
    free(c), free(c2), free(g);

    /* in the optimizer: clip with accum = clipping grad/accum first, bitwise */
    ef_model *ma = mk(SPEC_PAD, 2, 3), *mb = mk(SPEC_PAD, 2, 3);
    if (!ma || !mb) goto done;
    size_t F = ef_model_param_floats(ma);
    unsigned char *mask = tensor_mask(ma);
    ef_optim_opts oa = ef_optim_defaults(), ob;
    oa.weight_decay = 0.05, oa.accum = 2;
    fill_grads(ma, mask, 9);
    double gn = ef_grad_norm(ef_model_grads(ma), F) / 2;
    oa.clip = gn / 3;
    ob = oa;
    ob.clip = 0, ob.accum = 1;
    ef_optim *a = NULL, *b = NULL;
    st = ef_optim_new(&a, ma, &oa);
    if (!st) st = ef_optim_new(&b, mb, &ob);
    ef_check_status("clip in the optimizer: optimizers", st, EF_OK);
    if (st) goto free_opt;
    /* b gets grad/2 clipped to gn/3 by ef_clip_grad_norm, then an unclipped accum=1 step */
    float *gb = ef_model_grads(mb);
    memcpy(gb, ef_model_grads(ma), F * sizeof(float));
    for (size_t i = 0; i < F; i++) gb[i] *= 0.5f;
    double nb;
    ef_clip_grad_norm(gb, F, oa.clip, &nb);
    ef_optim_report ra, rb;
    st = ef_optim_step(a, &ra);
    if (!st) st = ef_optim_step(b, &rb);
    ef_check_status("clip in the optimizer: steps", st, EF_OK);
    ef_check_err("clip in the optimizer: reported norm = ||grad/accum|| (rel.)",
                 fabs(ra.grad_norm - gn) / gn, 1e-15);
    ef_check_err("clip in the optimizer: scale = clip / norm / accum (rel.)",
                 fabs(ra.scale - oa.clip / gn / 2) / ra.scale, 1e-15);
    ef_check("clip in the optimizer: equals clipping the averaged gradient first (bitwise)",
             bitwise_equal(ef_model_params(ma), ef_model_params(mb), F) &&
                 bitwise_equal(ef_optim_m(a), ef_optim_m(b), F) &&
                 bitwise_equal(ef_optim_v(a), ef_optim_v(b), F),
             "max |dp| %.3g", ef_max_abs_diff(ef_model_params(ma), ef_model_params(mb), F));

    /* a NaN gradient: EF_ERR_NUMERIC naming the step and the tensor; nothing changes */
    float *p0 = copy_of(ef_model_params(ma), F), *m0 = copy_of(ef_optim_m(a), F),
          *v0 = copy_of(ef_optim_v(a), F);
    fill_grads(ma, mask, 10);
    ef_tensor_info t;
    if (ef_model_find(ma, "layers.0.ff.w1.weight", &t) != EF_OK) ef_model_tensor(ma, 3, &t);
    ef_model_grads(ma)[t.offset + 7] = NAN;
    char want_where[300];
    snprintf(want_where, sizeof want_where, "%s[7]", t.name);
    st = ef_optim_step(a, &ra);
    check_err_msg("NaN gradient: EF_ERR_NUMERIC naming the step and the element", st,
                  EF_ERR_NUMERIC, "step 2", want_where);
    ef_check("NaN gradient: parameters, m, v and the step count unchanged",
             bitwise_equal(ef_model_params(ma), p0, F) && bitwise_equal(ef_optim_m(a), m0, F) &&
                 bitwise_equal(ef_optim_v(a), v0, F) && ef_optim_steps(a) == 1,
             "steps %lld", (long long)ef_optim_steps(a));
    ef_check("NaN gradient: the report still has the step and a NaN norm",
             ra.step == 2 && isnan(ra.grad_norm), "step %lld norm %g", (long long)ra.step,
             ra.grad_norm);
    free(p0), free(m0), free(v0);
free_opt:
    ef_optim_free(a), ef_optim_free(b);
    free(mask);
done:
    ef_model_free(ma), ef_model_free(mb);
}

/* ---------------------------------------------------------------------------------------------
 * 4. Accumulation
 * ------------------------------------------------------------------------------------------- */
static void test_accumulation(void) {
    ef_model *ma = mk(SPEC, BATCH, 21), *mb = mk(SPEC, BATCH, 21);
    if (!ma || !mb) goto done;
    size_t F = ef_model_param_floats(ma);
    test_batch tb;
    make_batch(&tb, BATCH, 99);
    /* the same four sequences as two micro-batches of two (equal target counts: 32 each) */
    ef_model_batch half[2] = {
        {BATCH / 2, LEN, tb.tokens, NULL, tb.targets},
        {BATCH / 2, LEN, tb.tokens + BATCH / 2 * LEN, NULL, tb.targets + BATCH / 2 * LEN}};
    ef_optim_opts oa = ef_optim_defaults(), ob;
    oa.sched.lr = 1e-2, oa.weight_decay = 0.01;
    /* eps 1e-4 rather than 1e-8: an element whose gradient is ~1e-8 would turn a 1e-13
     * difference in it into a visible change of m / (sqrt(v) + eps); the comparison is about
     * the gradients, which the moments then carry through a well-conditioned update */
    oa.eps = 1e-4;
    ob = oa;
    ob.accum = 2;
    ef_optim *a = NULL, *b = NULL;
    ef_status st = ef_optim_new(&a, ma, &oa);
    if (!st) st = ef_optim_new(&b, mb, &ob);
    ef_check_status("accum: optimizers", st, EF_OK);
    if (st) goto free_opt;
    ef_train_report ra, rb;
    double gerr = 0, lerr = 0;
    int ok = 1;
    for (int step = 0; step < 3; step++) {
        st = ef_train_step(a, &tb.b, 1, &ra);
        ok &= st == EF_OK;
        st = ef_train_step(b, half, 2, &rb);
        ok &= st == EF_OK;
        /* the buffers: full-batch gradient vs the sum of the halves' (scaled by 1/2 in the step) */
        float *h = copy_of(ef_model_grads(mb), F);
        for (size_t i = 0; i < F; i++) h[i] *= 0.5f;
        if (step == 0) gerr = ef_max_rel_diff(h, ef_model_grads(ma), F);
        free(h);
        lerr = fmax(lerr, fabs(ra.loss - rb.loss));
        ok &= ra.count == 64 && rb.count == 64 && ra.correct == rb.correct;
    }
    ef_check("accum: 3 steps succeed, counts 64 = 32 + 32", ok, "%lld %lld", (long long)ra.count,
             (long long)rb.count);
    ef_check_err("accum: (g_half1 + g_half2) / 2 = g_full (rel. to max |g|)", gerr, 1e-6);
    ef_check_err("accum: loss = mean of the micro-batch means", lerr, 1e-6);
    ef_check_err("accum: grad norm reported the same (rel.)",
                 fabs(ra.opt.grad_norm - rb.opt.grad_norm) / ra.opt.grad_norm, 1e-6);
    ef_check_err("accum: parameters after 3 steps, accum=2 vs one batch (max abs)",
                 ef_max_abs_diff(ef_model_params(mb), ef_model_params(ma), F), 1e-6);
    ef_check_status("accum: wrong number of micro-batches refused", ef_train_step(b, half, 1, NULL),
                    EF_ERR_ARG);
    ef_model_batch nt = half[0];
    nt.targets = NULL;
    ef_model_batch two[2] = {half[0], nt};
    check_err_msg("accum: a micro-batch without targets refused", ef_train_step(b, two, 2, NULL),
                  EF_ERR_ARG, "micro-batch 1", NULL);
    int32_t bad_tok[BATCH / 2 * LEN];
    memcpy(bad_tok, half[1].tokens, sizeof bad_tok);
    bad_tok[5] = VOCAB + 4;
    two[1] = half[1];
    two[1].tokens = bad_tok;
    float *p0 = copy_of(ef_model_params(mb), F);
    int64_t s0 = ef_optim_steps(b);
    check_err_msg("accum: a bad token in micro-batch 1 names it", ef_train_step(b, two, 2, NULL),
                  EF_ERR_ARG, "micro-batch 1 of 2", "17");
    ef_check("accum: failed step changes no parameter, no step count",
             bitwise_equal(p0, ef_model_params(mb), F) && ef_optim_steps(b) == s0, " ");
    free(p0);
free_opt:
    ef_optim_free(a), ef_optim_free(b);
done:
    ef_model_free(ma), ef_model_free(mb);
}

/* ---------------------------------------------------------------------------------------------
 * 5. Resume and thread counts
 * ------------------------------------------------------------------------------------------- */
static ef_optim_opts resume_opts(void) {
    ef_optim_opts oo = ef_optim_defaults();
    ef_sched_parse("cosine:lr=0.01,warmup=3,total=10,min_lr=0.001", &oo.sched);
    oo.weight_decay = 0.1, oo.clip = 0.5, oo.accum = 2;
    return oo;
}

/* Steps first+1 .. last of the fixed synthetic run (micro-batch j of step k is batch 2k + j). */
static ef_status run_steps(ef_optim *o, int first, int last) {
    for (int k = first; k < last; k++) {
        test_batch tb[2];
        make_batch(&tb[0], 2, (uint64_t)(2 * k));
        make_batch(&tb[1], 2, (uint64_t)(2 * k + 1));
        ef_model_batch mb[2] = {tb[0].b, tb[1].b};
        ef_status st = ef_train_step(o, mb, 2, NULL);
        if (st) return st;
    }
    return EF_OK;
}

static void test_resume(const char *dir) {
    char path[400], opt_path[420], bad[440];
    snprintf(path, sizeof path, "%s/run.ckpt", dir);
    snprintf(opt_path, sizeof opt_path, "%s.opt", path);
    ef_optim_opts oo = resume_opts();
    ef_model_opts mo = {2, 5, 1};

    /* A: 10 uninterrupted steps */
    ef_model *ma = NULL, *mb = NULL;
    ef_optim *a = NULL, *b = NULL;
    ef_status st = ef_model_new(&ma, SPEC, &mo);
    if (!st) st = ef_optim_new(&a, ma, &oo);
    if (!st) st = run_steps(a, 0, 10);
    ef_check_status("resume: 10 uninterrupted steps", st, EF_OK);
    if (st) goto done;
    size_t F = ef_model_param_floats(ma);

    /* B: 5 steps, save, free everything, resume, 5 steps */
    st = ef_model_new(&mb, SPEC, &mo);
    if (!st) st = ef_optim_new(&b, mb, &oo);
    if (!st) st = run_steps(b, 0, 5);
    ef_ckpt_meta meta[] = {{"train.data_position", "10"},
                           {"train.seed", "5"},
                           {"train.sched", "cosine:lr=0.01,warmup=3,total=10,min_lr=0.001"}};
    if (!st) st = ef_train_save(b, path, meta, 3);
    ef_check_status("resume: 5 steps and ef_train_save", st, EF_OK);
    if (st) goto done;
    ef_check("resume: PATH and PATH.opt written, no temporary files left",
             access(path, F_OK) == 0 && access(opt_path, F_OK) == 0, "%s", path);
    float *p5 = copy_of(ef_model_params(mb), F);
    ef_optim_free(b), b = NULL;
    ef_model_free(mb), mb = NULL;
    st = ef_train_resume(&mb, &b, path, &mo, &oo);
    ef_check_status("resume: ef_train_resume", st, EF_OK);
    if (st) {
        free(p5);
        goto done;
    }
    char *pos = NULL, *sched = NULL;
    st = ef_train_read_meta(path, "train.data_position", &pos);
    if (!st) st = ef_train_read_meta(path, "train.sched", &sched);
    ef_check("resume: caller's metadata read back",
             !st && pos && !strcmp(pos, "10") && sched && !strcmp(sched, meta[2].value),
             "'%s' '%s'", pos ? pos : "", sched ? sched : "");
    free(pos), free(sched);
    ef_check("resume: step count 5 and parameters restored bitwise",
             ef_optim_steps(b) == 5 && bitwise_equal(ef_model_params(mb), p5, F), "steps %lld",
             (long long)ef_optim_steps(b));
    st = run_steps(b, 5, 10);
    ef_check_status("resume: 5 more steps", st, EF_OK);
    ef_check("resume: 10 steps = 5 + save/free/resume + 5: parameters bitwise equal",
             bitwise_equal(ef_model_params(ma), ef_model_params(mb), F), "max |dp| %.3g",
             ef_max_abs_diff(ef_model_params(ma), ef_model_params(mb), F));
    ef_check("resume: moments m and v bitwise equal, step 10",
             bitwise_equal(ef_optim_m(a), ef_optim_m(b), F) &&
                 bitwise_equal(ef_optim_v(a), ef_optim_v(b), F) && ef_optim_steps(b) == 10,
             " ");

    /* ef_train_load into existing objects (another seed: every value must be replaced) */
    {
        ef_model *mc = NULL;
        ef_optim *c = NULL;
        ef_model_opts mo2 = {2, 999, 1};
        st = ef_model_new(&mc, SPEC, &mo2);
        if (!st) st = ef_optim_new(&c, mc, &oo);
        if (!st) st = run_steps(c, 0, 2); /* a state to overwrite */
        if (!st) st = ef_train_load(c, path);
        ef_check_status("load into existing objects: ef_train_load", st, EF_OK);
        if (!st) st = run_steps(c, 5, 10);
        ef_check("load into existing objects: then 5 steps = the uninterrupted run (bitwise)",
                 !st && bitwise_equal(ef_model_params(ma), ef_model_params(mc), F) &&
                     bitwise_equal(ef_optim_v(a), ef_optim_v(c), F),
                 " ");
        ef_optim_free(c);
        ef_model_free(mc);
    }

    /* errors: every refusal leaves the optimizer state as it was */
    {
        ef_model *mc = NULL;
        ef_optim *c = NULL;
        st = ef_model_new(&mc, SPEC, &mo);
        if (!st) st = ef_optim_new(&c, mc, &oo);
        if (!st) st = run_steps(c, 0, 1);
        if (st) {
            ef_check_status("errors: setup", st, EF_OK);
            ef_optim_free(c);
            ef_model_free(mc);
            free(p5);
            goto done;
        }
        float *m0 = copy_of(ef_optim_m(c), F), *v0 = copy_of(ef_optim_v(c), F);
#define UNCHANGED(what)                                                                            \
    ef_check(what ": optimizer state unchanged",                                                   \
             ef_optim_steps(c) == 1 && bitwise_equal(ef_optim_m(c), m0, F) &&                      \
                 bitwise_equal(ef_optim_v(c), v0, F),                                              \
             " ")
        /* a truncated state file */
        char tpath[420];
        snprintf(tpath, sizeof tpath, "%s/trunc.ckpt", dir);
        snprintf(bad, sizeof bad, "%s.opt", tpath);
        FILE *in = fopen(opt_path, "rb"), *out = fopen(bad, "wb");
        long size = 0;
        if (in && out) {
            fseek(in, 0, SEEK_END);
            size = ftell(in);
            fseek(in, 0, SEEK_SET);
            for (long i = 0; i < size - 100; i++) fputc(fgetc(in), out);
        }
        if (in) fclose(in);
        if (out) fclose(out);
        char cmd[1000];
        snprintf(cmd, sizeof cmd, "cp '%s' '%s'", path, tpath);
        int cp_ok = system(cmd) == 0;
        ef_check("errors: truncated copy made", size > 100 && cp_ok, "%ld bytes", size);
        check_err_msg("errors: truncated optimizer state is EF_ERR_FORMAT", ef_train_load(c, tpath),
                      EF_ERR_FORMAT, "trunc.ckpt.opt", "truncated");
        UNCHANGED("errors: truncated");
        /* a missing state file */
        snprintf(tpath, sizeof tpath, "%s/none.ckpt", dir);
        check_err_msg("errors: missing PATH.opt is EF_ERR_IO", ef_train_load(c, tpath), EF_ERR_IO,
                      "none.ckpt.opt", NULL);
        UNCHANGED("errors: missing");

        /* reserved metadata keys */
        ef_ckpt_meta r1[] = {{"eformer.step", "3"}}, r2[] = {{"format", "np"}};
        snprintf(tpath, sizeof tpath, "%s/reserved.ckpt", dir);
        check_err_msg("errors: metadata key eformer.* reserved", ef_train_save(c, tpath, r1, 1),
                      EF_ERR_ARG, "eformer.step", "reserved");
        check_err_msg("errors: metadata key format reserved", ef_train_save(c, tpath, r2, 1),
                      EF_ERR_ARG, "format", "reserved");
        ef_check("errors: a refused save writes nothing", access(tpath, F_OK) != 0, " ");

        /* files from different saves: PATH rewritten after PATH.opt (an interrupted pair) */
        snprintf(tpath, sizeof tpath, "%s/pair.ckpt", dir);
        st = ef_train_save(b, tpath, NULL, 0);
        if (!st) st = ef_model_save(mc, tpath);
        ef_check_status("errors: mismatched pair written", st, EF_OK);
        check_err_msg("errors: PATH and PATH.opt from different saves is EF_ERR_FORMAT",
                      ef_train_load(c, tpath), EF_ERR_FORMAT, "different saves", NULL);
        UNCHANGED("errors: different saves");
        ef_optim_free(c);
        ef_model_free(mc);
        free(m0), free(v0);

        /* another model size */
        ef_model *md = NULL;
        ef_optim *d = NULL;
        st = ef_model_new(
            &md, "layers=1,dim=32,heads=2,ff=32,vocab=13,max_len=16,attn=flash:causal=1", &mo);
        if (!st) st = ef_optim_new(&d, md, &oo);
        if (!st) {
            char want[64];
            snprintf(want, sizeof want, "%zu", ef_model_param_floats(md));
            check_err_msg("errors: another model size is EF_ERR_FORMAT naming both sizes",
                          ef_train_load(d, path), EF_ERR_FORMAT, "param_floats", want);
            ef_check("errors: another model size: step count still 0", ef_optim_steps(d) == 0, " ");
        }
        ef_optim_free(d);
        ef_model_free(md);
        /* another spec with the same parameter count */
        st = ef_model_new(
            &md, "layers=1,dim=16,heads=2,ff=32,vocab=13,max_len=16,attn=local:window=4,causal=1",
            &mo);
        if (!st) st = ef_optim_new(&d, md, &oo);
        if (!st) {
            ef_check("errors: other spec has the same param_floats", ef_model_param_floats(md) == F,
                     "%zu vs %zu", ef_model_param_floats(md), F);
            check_err_msg("errors: another model spec is EF_ERR_FORMAT naming it",
                          ef_train_load(d, path), EF_ERR_FORMAT, "local", NULL);
        }
        ef_optim_free(d);
        ef_model_free(md);
        /* resume refuses train=0, and leaves NULLs on failure */
        ef_model_opts inf = {2, 0, 0};
        ef_model *mx = (ef_model *)1;
        ef_optim *ox = (ef_optim *)1;
        check_err_msg("errors: resume with train=0", ef_train_resume(&mx, &ox, path, &inf, &oo),
                      EF_ERR_ARG, "train=0", NULL);
        ef_check("errors: failed resume returns NULL objects", !mx && !ox, " ");
        snprintf(tpath, sizeof tpath, "%s/trunc.ckpt", dir);
        check_err_msg("errors: resume from a truncated state",
                      ef_train_resume(&mx, &ox, tpath, &mo, &oo), EF_ERR_FORMAT, "truncated", NULL);
        ef_check("errors: failed resume returns NULL objects (no leak under ASan)", !mx && !ox,
                 " ");
#undef UNCHANGED
    }
    free(p5);
done:
    ef_optim_free(a), ef_optim_free(b);
    ef_model_free(ma), ef_model_free(mb);
}

static void test_threads_spec(const char *spec);

/* Whole training steps (forward, backward, clipping, AdamW) at 1, 2 and 4 threads give bitwise
 * the same parameters and optimizer state, for the model of SPEC and models of other
 * mechanisms (the attention layers' own determinism is test_props'). */
static void test_threads(void) {
    static const char *const specs[] = {
        "layers=1,dim=16,heads=2,ff=32,vocab=13,max_len=16,attn=flash:causal=1",
        "layers=2,dim=16,heads=4,ff=32,vocab=13,max_len=16,attn=local:window=5,causal=1",
        "layers=2,dim=16,heads=4,ff=32,vocab=13,max_len=16,attn=linear:causal=1",
        "layers=2,dim=16,heads=4,ff=32,vocab=13,max_len=16,attn=performer:features=8,causal=1",
        "layers=2,dim=16,heads=4,ff=32,vocab=13,max_len=16,attn=lsh:chunk=4,causal=1",
        ("layers=2,dim=16,heads=4,ff=32,vocab=13,max_len=16,reversible=1,"
         "attn=strided:block=3,causal=1"),
    };
    for (size_t x = 0; x < sizeof specs / sizeof specs[0]; x++) test_threads_spec(specs[x]);
}

static void test_threads_spec(const char *spec) {
    ef_optim_opts oo = resume_opts();
    ef_model_opts mo = {2, 8, 1};
    float *p[3] = {NULL, NULL, NULL}, *v[3] = {NULL, NULL, NULL};
    static const int threads[3] = {1, 2, 4}; /* 4: oversubscribed on a 2-core machine */
    size_t F = 0;
    int old = ef_get_num_threads();
    ef_status st = EF_OK;
    for (int r = 0; r < 3 && !st; r++) {
        ef_set_num_threads(threads[r]);
        ef_model *m = NULL;
        ef_optim *o = NULL;
        st = ef_model_new(&m, spec, &mo);
        if (!st) st = ef_optim_new(&o, m, &oo);
        if (!st) st = run_steps(o, 0, 6);
        if (!st) {
            F = ef_model_param_floats(m);
            p[r] = copy_of(ef_model_params(m), F);
            v[r] = copy_of(ef_optim_v(o), F);
        }
        ef_optim_free(o);
        ef_model_free(m);
    }
    ef_set_num_threads(old);
    char name[512];
    snprintf(name, sizeof name, "threads: %s: 6 steps at 1, 2 and 4 threads", spec);
    ef_check_status(name, st, EF_OK);
    for (int r = 1; r < 3 && !st; r++) {
        snprintf(name, sizeof name,
                 "threads: %s: 1 vs %d threads, parameters and v bitwise equal after 6 steps",
                 spec, threads[r]);
        ef_check(name, bitwise_equal(p[0], p[r], F) && bitwise_equal(v[0], v[r], F),
                 "max |dp| %.3g", ef_max_abs_diff(p[0], p[r], F));
    }
    for (int r = 0; r < 3; r++) free(p[r]), free(v[r]);
}

/* ---------------------------------------------------------------------------------------------
 * 6. Options and calls
 * ------------------------------------------------------------------------------------------- */
static void test_errors(void) {
    ef_model *m = mk(SPEC, 1, 1);
    ef_model *inf = NULL;
    ef_model_opts io = {1, 1, 0};
    ef_model_new(&inf, SPEC, &io);
    if (!m || !inf) goto done;
    ef_optim *o = (ef_optim *)1;
    ef_optim_opts d = ef_optim_defaults();
    ef_check("defaults: 0.9, 0.999, 1e-8, no decay, no clip, accum 1, constant 1e-3",
             d.beta1 == 0.9 && d.beta2 == 0.999 && d.eps == 1e-8 && d.weight_decay == 0 &&
                 d.clip == 0 && d.accum == 1 && d.sched.kind == EF_SCHED_CONSTANT &&
                 d.sched.lr == 1e-3,
             " ");
    check_err_msg("optim_new: train=0 model", ef_optim_new(&o, inf, &d), EF_ERR_ARG, "train=0",
                  NULL);
    ef_check("optim_new: *out NULL on failure", o == NULL, " ");
    struct {
        const char *what, *needle;
        ef_optim_opts o;
    } bad[6];
    for (int i = 0; i < 6; i++) bad[i].o = d;
    bad[0].what = "beta1=1", bad[0].needle = "beta1=1", bad[0].o.beta1 = 1;
    bad[1].what = "beta2=-0.1", bad[1].needle = "beta2=-0.1", bad[1].o.beta2 = -0.1;
    bad[2].what = "eps=0", bad[2].needle = "eps=0", bad[2].o.eps = 0;
    bad[3].what = "weight_decay=nan", bad[3].needle = "weight_decay", bad[3].o.weight_decay = NAN;
    bad[4].what = "clip=-1", bad[4].needle = "clip=-1", bad[4].o.clip = -1;
    bad[5].what = "accum=0", bad[5].needle = "accum=0", bad[5].o.accum = 0;
    for (int i = 0; i < 6; i++)
        check_err_msg(LABEL("optim_new: %s refused", bad[i].what), ef_optim_new(&o, m, &bad[i].o),
                      EF_ERR_ARG, bad[i].needle, NULL);
    ef_optim_opts cs = d;
    cs.sched = (ef_sched){EF_SCHED_COSINE, 1e-3, 0, 10, 5};
    check_err_msg("optim_new: a bad schedule refused", ef_optim_new(&o, m, &cs), EF_ERR_ARG,
                  "total=5", NULL);
    check_err_msg("optim_new: NULL model", ef_optim_new(&o, NULL, &d), EF_ERR_ARG, "model", NULL);
    check_err_msg("optim_step: NULL", ef_optim_step(NULL, NULL), EF_ERR_ARG, NULL, NULL);
    check_err_msg("train_step: NULL", ef_train_step(NULL, NULL, 0, NULL), EF_ERR_ARG, NULL, NULL);
    check_err_msg("train_save: NULL", ef_train_save(NULL, "/tmp/x", NULL, 0), EF_ERR_ARG, NULL,
                  NULL);
    check_err_msg("train_load: NULL", ef_train_load(NULL, "/tmp/x"), EF_ERR_ARG, NULL, NULL);
    ef_optim_free(NULL); /* no-op */
    char buf[512];
    ef_status st = ef_optim_describe(&d, buf, sizeof buf);
    ef_check("optim_describe",
             !st && contains(buf, "adamw:beta1=0.90000000000000002") &&
                 contains(buf, "sched=constant:lr=0.001"),
             "'%s'", buf);
done:
    ef_model_free(m);
    ef_model_free(inf);
}

int main(void) {
    test_adamw_reference();
    test_schedules();
    test_clipping();
    test_accumulation();
    test_threads();
    test_errors();
    if (ef_ckpt_supported()) {
        char dir[] = "/tmp/ef_test_optim_XXXXXX";
        if (!mkdtemp(dir)) {
            ef_check("checkpoints: mkdtemp", 0, "failed");
        } else {
            test_resume(dir);
            char cmd[200];
            snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
            if (system(cmd) != 0) printf("note: could not remove %s\n", dir);
        }
    } else {
        printf("SKIP  checkpoints: this build has no cJSON (ef_ckpt_supported() == 0)\n");
    }
    return ef_test_finish();
}
