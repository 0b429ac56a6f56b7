/*
 * test_spec.c - the spec parser and plan validation of ef_attn_new: every accepted form of the
 * common options for `full` and `flash`, the canonical description and its round trip, every
 * syntax and value error (status, and a message that quotes the offending text), shape errors,
 * the flash dimension limit, and the registry queries (names, help).
 *
 * No tolerances here: every check is an exact comparison of a status, a string or a size.
 */
#include "harness.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const ef_attn_shape SHAPE = {2, 3, 5, 7, 16, 8};

static const char *nn(const char *s) { return s ? s : "(null)"; }

/* A copy of s with control characters shown as '?', so that each check stays on one line. */
static const char *printable(const char *s) {
    static char buf[600];
    size_t i = 0;
    for (; s && s[i] && i + 1 < sizeof buf; i++) buf[i] = (unsigned char)s[i] < 32 ? '?' : s[i];
    buf[i] = '\0';
    return s ? buf : "(null)";
}

/* `key` appears in `text` as a word of its own (not inside "reference", say). */
static int has_word(const char *text, const char *key) {
    size_t n = strlen(key);
    for (const char *p = text ? strstr(text, key) : NULL; p; p = strstr(p + 1, key)) {
        int before = p == text || isspace((unsigned char)p[-1]);
        int after = p[n] == '\0' || p[n] == '=' || isspace((unsigned char)p[n]);
        if (before && after) return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Valid specs: canonical form and round trip
 * ------------------------------------------------------------------------------------------- */
/* want = NULL: any description (only the round trip is pinned) */
static void check_valid(const char *spec, const char *want) {
    ef_attn *a = NULL, *b = NULL;
    ef_status st = ef_attn_new(&a, spec, &SHAPE);
    const char *d = st == EF_OK ? ef_attn_describe(a) : NULL;
    char name[160];
    snprintf(name, sizeof name, "valid '%.60s'", spec);
    ef_check(name, st == EF_OK && d && (!want || strcmp(d, want) == 0), "%s: '%s' want '%s' %s",
             ef_status_str(st), nn(d), want ? want : "(any)", st ? ef_last_error() : "");
    /* parsing the description gives the same plan, hence the same description */
    ef_status st2 = d ? ef_attn_new(&b, d, &SHAPE) : EF_ERR_ARG;
    const char *d2 = st2 == EF_OK ? ef_attn_describe(b) : NULL;
    snprintf(name, sizeof name, "round trip '%.60s'", spec);
    ef_check(name, st2 == EF_OK && d2 && d && strcmp(d, d2) == 0, "%s: '%s' %s", ef_status_str(st2),
             nn(d2), st2 ? ef_last_error() : "");
    ef_attn_free(b);
    ef_attn_free(a);
}

static void test_valid(void) {
    static const char *const cases[][2] = {
        {"full", "full:causal=0,scale=auto,seed=0,ref=0"},
        {"flash", "flash:precision=fp32,causal=0,scale=auto,seed=0,ref=0"},
        {"full:causal=1", "full:causal=1,scale=auto,seed=0,ref=0"},
        {"flash:causal=1", "flash:precision=fp32,causal=1,scale=auto,seed=0,ref=0"},
        {"full:causal=0", "full:causal=0,scale=auto,seed=0,ref=0"},
        {"full:causal=true", "full:causal=1,scale=auto,seed=0,ref=0"},
        {"flash:causal=false,ref=false", "flash:precision=fp32,causal=0,scale=auto,seed=0,ref=0"},
        {"full:scale=0.125", "full:causal=0,scale=0.125,seed=0,ref=0"},
        {"flash:scale=2.5e-1", "flash:precision=fp32,causal=0,scale=0.25,seed=0,ref=0"},
        {"full:scale=auto", "full:causal=0,scale=auto,seed=0,ref=0"},
        /* 0.1 is not a float: the plan holds 0.100000001, and says so */
        {"flash:scale=0.1", "flash:precision=fp32,causal=0,scale=0.100000001,seed=0,ref=0"},
        /* the ends of the scale range [1e-30, 1e30]; fp32 rounds 1e30 up to 1.00000002e+30,
         * and the description must still parse back to the same plan */
        {"full:scale=1e-30", "full:causal=0,scale=1e-30,seed=0,ref=0"},
        {"full:scale=1e30", NULL},
        {"flash:scale=1e+30,causal=1", NULL},
        {"full:seed=42", "full:causal=0,scale=auto,seed=42,ref=0"},
        {"full:seed=007", "full:causal=0,scale=auto,seed=7,ref=0"},
        {"flash:seed=18446744073709551615",
         "flash:precision=fp32,causal=0,scale=auto,seed=18446744073709551615,ref=0"},
        {"full:seed=9223372036854775808",
         "full:causal=0,scale=auto,seed=9223372036854775808,ref=0"},
        {"full:ref=1", "full:causal=0,scale=auto,seed=0,ref=1"},
        {"flash:ref=1", "flash:precision=fp32,causal=0,scale=auto,seed=0,ref=1"},
        {"flash:ref=1,seed=3,scale=0.5,causal=1",
         "flash:precision=fp32,causal=1,scale=0.5,seed=3,ref=1"},
        {"full:causal=1,scale=2,seed=18446744073709551615,ref=1",
         "full:causal=1,scale=2,seed=18446744073709551615,ref=1"},
        {"flash:causal=1,precision=bf16", "flash:precision=bf16,causal=1,scale=auto,seed=0,ref=0"},
        {"flash:precision=fp32", "flash:precision=fp32,causal=0,scale=auto,seed=0,ref=0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_valid(cases[i][0], cases[i][1]);

    /* the longest spec accepted: 1023 characters (seed with leading zeros) */
    char buf[1100];
    strcpy(buf, "full:seed=");
    size_t len = strlen(buf);
    while (len < 1022) buf[len++] = '0';
    buf[len++] = '9';
    buf[len] = '\0';
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, buf, &SHAPE);
    const char *d = st == EF_OK ? ef_attn_describe(a) : NULL;
    ef_check("valid 1023-character spec", st == EF_OK && d && strstr(d, ",seed=9,") != NULL,
             "%s: '%s' %s", ef_status_str(st), nn(d), st ? ef_last_error() : "");
    ef_attn_free(a);
}

/* The parsed options reach the plan: scale in the arithmetic, ref and causal in the plan's
 * saved size and FLOP count. */
static void test_options_take_effect(void) {
    ef_attn_shape s = {1, 2, 9, 11, 16, 8};
    size_t nq = 1 * 2 * 9 * 16, nk = 1 * 2 * 11 * 16, nv = 1 * 2 * 11 * 8, no = 1 * 2 * 9 * 8;
    float *q = ef_test_randn(nq, 1, 1.0f), *k = ef_test_randn(nk, 2, 1.0f);
    float *v = ef_test_randn(nv, 3, 1.0f);
    float *o_auto = ef_test_zeros(no), *o_q = ef_test_zeros(no), *o_x = ef_test_zeros(no);
    const char *mech[] = {"full", "flash"};
    for (int m = 0; m < 2; m++) {
        char s_auto[64], s_q[64], s_x[64];
        snprintf(s_auto, sizeof s_auto, "%s", mech[m]);
        snprintf(s_q, sizeof s_q, "%s:scale=0.25", mech[m]); /* = 1/sqrt(16) = auto */
        snprintf(s_x, sizeof s_x, "%s:scale=0.3", mech[m]);
        const char *specs[3] = {s_auto, s_q, s_x};
        float *outs[3] = {o_auto, o_q, o_x};
        ef_status st = EF_OK;
        for (int i = 0; i < 3 && !st; i++) {
            ef_attn *a = NULL;
            st = ef_attn_new(&a, specs[i], &s);
            ef_attn_io io = {q, k, v, NULL, outs[i]};
            if (!st) st = ef_attn_forward(a, &io, NULL);
            ef_attn_free(a);
        }
        char name[96];
        snprintf(name, sizeof name, "%s: scale=0.25 == scale=auto (head_dim 16) bit for bit",
                 mech[m]);
        ef_check(name, !st && memcmp(o_auto, o_q, no * sizeof(float)) == 0, "%s, max diff %.3e",
                 ef_status_str(st), ef_max_abs_diff(o_q, o_auto, no));
        snprintf(name, sizeof name, "%s: scale=0.3 changes the output", mech[m]);
        ef_check(name, !st && ef_max_abs_diff(o_x, o_auto, no) > 1e-3, "%s, max diff %.3e",
                 ef_status_str(st), ef_max_abs_diff(o_x, o_auto, no));
    }
    free(q), free(k), free(v), free(o_auto), free(o_q), free(o_x);

    /* ref=1 switches flash to the slow reference, which saves nothing (backward recomputes) */
    ef_attn *f = NULL, *fr = NULL, *c0 = NULL, *c1 = NULL;
    ef_status st = ef_attn_new(&f, "flash", &SHAPE);
    if (!st) st = ef_attn_new(&fr, "flash:ref=1", &SHAPE);
    if (!st) st = ef_attn_new(&c0, "full:causal=0", &SHAPE);
    if (!st) st = ef_attn_new(&c1, "full:causal=1", &SHAPE);
    size_t bhn = (size_t)SHAPE.batch * SHAPE.heads * SHAPE.q_len;
    size_t sf = ef_attn_saved_bytes(f), sr = ef_attn_saved_bytes(fr);
    ef_check("flash:ref=1 saves 0 bytes, flash B*H*N floats",
             !st && sf == bhn * 4 && sr == 0, "%s: %zu and %zu bytes",
             ef_status_str(st), sr, sf);
    double f0 = ef_attn_flops(c0, 0), f1 = ef_attn_flops(c1, 0);
    ef_check("causal=1 lowers the FLOP count", !st && f1 > 0 && f1 < f0, "%.0f vs %.0f", f1, f0);
    ef_attn_free(f), ef_attn_free(fr), ef_attn_free(c0), ef_attn_free(c1);
}

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */
/* ef_attn_new must fail with `want`, leave *out NULL, and say `mention` (and `mention2`). */
static void check_error(const char *label, const char *spec, const ef_attn_shape *s, ef_status want,
                        const char *mention, const char *mention2) {
    static int sentinel;
    ef_attn *a = (ef_attn *)&sentinel;
    ef_status st = ef_attn_new(&a, spec, s);
    const char *msg = ef_last_error();
    int ok = st == want && a == NULL && msg && msg[0] && strstr(msg, mention) &&
             (!mention2 || strstr(msg, mention2));
    char name[160];
    snprintf(name, sizeof name, "%s", label);
    ef_check(name, ok, "%s (want %s)%s: '%s'", ef_status_str(st), ef_status_str(want),
             a ? " *out not NULL" : "", printable(msg));
    if (st == EF_OK) ef_attn_free(a);
}

static void test_errors(void) {
    const ef_attn_shape *s = &SHAPE;
    check_error("empty spec", "", s, EF_ERR_FORMAT, "empty", NULL);
    check_error("unknown mechanism lists the known ones", "nope", s, EF_ERR_ARG, "'nope'", "flash");
    check_error("unknown mechanism (with options)", "nope:causal=1", s, EF_ERR_ARG, "'nope'",
                "full");
    check_error("no name before ':'", ":causal=1", s, EF_ERR_FORMAT, ":causal=1", NULL);
    check_error("unknown key (full)", "full:foo=1", s, EF_ERR_ARG, "'foo'", "causal");
    check_error("unknown key (flash)", "flash:causal=1,windw=3", s, EF_ERR_ARG, "'windw'", NULL);
    check_error("duplicate key", "full:causal=1,causal=0", s, EF_ERR_ARG, "'causal'", "twice");
    check_error("duplicate key (seed)", "flash:seed=1,seed=1", s, EF_ERR_ARG, "'seed'", "twice");
    check_error("missing '='", "full:causal", s, EF_ERR_FORMAT, "'causal'", NULL);
    check_error("missing '=' after a good option", "flash:causal=1,ref", s, EF_ERR_FORMAT, "'ref'",
                NULL);
    check_error("empty value", "full:causal=", s, EF_ERR_FORMAT, "'causal='", NULL);
    check_error("empty key", "full:=1", s, EF_ERR_FORMAT, "'=1'", NULL);
    check_error("trailing comma", "full:causal=1,", s, EF_ERR_FORMAT, "'full:causal=1,'", "','");
    check_error("double comma", "full:causal=1,,ref=1", s, EF_ERR_FORMAT, "'full:causal=1,,ref=1'",
                "','");
    check_error("stray ':' with nothing after", "full:", s, EF_ERR_FORMAT, "'full:'", NULL);
    check_error("second ':' inside a value", "flash:causal=1:ref=1", s, EF_ERR_ARG,
                "causal=1:ref=1", NULL);
    check_error("white space after ':'", "full: causal=1", s, EF_ERR_FORMAT, "position 5", NULL);
    check_error("leading white space", " full", s, EF_ERR_FORMAT, "position 0", NULL);
    check_error("tab at the end", "full:causal=1\t", s, EF_ERR_FORMAT, "position 13", NULL);
    check_error("newline inside", "full:causal=1,\nref=1", s, EF_ERR_FORMAT, "position 14", NULL);
    check_error("causal=2 out of range", "full:causal=2", s, EF_ERR_ARG, "causal=2", NULL);
    check_error("ref=-1 out of range", "flash:ref=-1", s, EF_ERR_ARG, "ref=-1", NULL);
    check_error("scale=-1 out of range", "full:scale=-1", s, EF_ERR_ARG, "scale=-1", NULL);
    check_error("scale=0 out of range", "flash:scale=0", s, EF_ERR_ARG, "scale=0", NULL);
    check_error("scale=1e-31 below the range", "full:scale=1e-31", s, EF_ERR_ARG, "scale=1e-31",
                NULL);
    check_error("scale=2e30 above the range", "full:scale=2e30", s, EF_ERR_ARG, "scale=2e30", NULL);
    check_error("seed=-1 negative", "full:seed=-1", s, EF_ERR_ARG, "seed=-1", NULL);
    check_error("seed=2^64 overflows", "full:seed=18446744073709551616", s, EF_ERR_ARG,
                "seed=18446744073709551616", NULL);
    check_error("scale=abc not numeric", "full:scale=abc", s, EF_ERR_ARG, "scale=abc", NULL);
    check_error("scale=0.5x trailing junk", "flash:scale=0.5x", s, EF_ERR_ARG, "scale=0.5x", NULL);
    check_error("causal=yes not 0|1", "full:causal=yes", s, EF_ERR_ARG, "causal=yes", NULL);
    check_error("seed=1x not an integer", "full:seed=1x", s, EF_ERR_ARG, "seed=1x", NULL);
    check_error("seed=1.5 not an integer", "flash:seed=1.5", s, EF_ERR_ARG, "seed=1.5", NULL);
    check_error("scale=inf", "full:scale=inf", s, EF_ERR_ARG, "scale=inf", NULL);
    check_error("scale=-inf", "full:scale=-inf", s, EF_ERR_ARG, "scale=-inf", NULL);
    check_error("scale=nan", "flash:scale=nan", s, EF_ERR_ARG, "scale=nan", NULL);
    check_error("scale=1e400 overflows", "full:scale=1e400", s, EF_ERR_ARG, "scale=1e400", NULL);

    /* 1024 characters: one more than the longest accepted (see test_valid) */
    char buf[5000];
    strcpy(buf, "full:seed=");
    size_t len = strlen(buf);
    while (len < 1023) buf[len++] = '0';
    buf[len++] = '9';
    buf[len] = '\0';
    check_error("1024-character spec", buf, s, EF_ERR_FORMAT, "longer than", NULL);
    while (len < 4999) buf[len++] = 'x';
    buf[len] = '\0';
    check_error("4999-character spec", buf, s, EF_ERR_FORMAT, "longer than", NULL);
}

static void test_shape_errors(void) {
    static const char *const field[6] = {"batch", "heads", "q_len", "kv_len", "head_dim", "v_dim"};
    const int bad[3] = {0, -1, INT_MIN};
    const char *mech[2] = {"full", "flash"};
    for (int m = 0; m < 2; m++)
        for (int f = 0; f < 6; f++)
            for (int b = 0; b < 3; b++) {
                ef_attn_shape s = SHAPE;
                int *p[6] = {&s.batch, &s.heads, &s.q_len, &s.kv_len, &s.head_dim, &s.v_dim};
                *p[f] = bad[b];
                char label[96], mention[64];
                snprintf(label, sizeof label, "%s shape %s=%d", mech[m], field[f], bad[b]);
                snprintf(mention, sizeof mention, " %s=%d ", field[f], bad[b]);
                check_error(label, mech[m], &s, EF_ERR_SHAPE, mention, NULL);
            }

    /* sizes whose element counts overflow an index: refused before anything is allocated
     * (each case trips a different product: B*H, N*M, M*D, everything) */
    const int big = INT_MAX;
    const ef_attn_shape huge[] = {{big, big, big, big, big, big},
                                  {big, big, 1, 1, 1, 1},
                                  {1, 1, big, big, 1, 1},
                                  {1, 1, 1, big, big, 1},
                                  {1, 1, big, 1, 1, big}};
    for (int m = 0; m < 2; m++)
        for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
            char label[128];
            const ef_attn_shape *h = &huge[i];
            snprintf(label, sizeof label, "%s enormous shape {%d,%d,%d,%d,%d,%d}", mech[m],
                     h->batch, h->heads, h->q_len, h->kv_len, h->head_dim, h->v_dim);
            check_error(label, mech[m], h, EF_ERR_SHAPE, "too large", NULL);
        }

    /* flash tiles head_dim and v_dim up to 256 */
    ef_attn_shape s = SHAPE;
    s.head_dim = 257;
    check_error("flash head_dim=257 unsupported", "flash", &s, EF_ERR_UNSUPPORTED, "257", "full");
    s = SHAPE;
    s.v_dim = 257;
    check_error("flash v_dim=257 unsupported", "flash:causal=1", &s, EF_ERR_UNSUPPORTED, "257",
                NULL);
    s = SHAPE;
    s.head_dim = s.v_dim = 256;
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, "flash", &s);
    ef_check_status("flash head_dim=v_dim=256 accepted", st, EF_OK);
    ef_attn_free(a);
    s.head_dim = s.v_dim = 257;
    st = ef_attn_new(&a, "full", &s);
    ef_check_status("full head_dim=v_dim=257 accepted", st, EF_OK);
    ef_attn_free(a);
}

/* ---------------------------------------------------------------------------------------------
 * Registry
 * ------------------------------------------------------------------------------------------- */
static void test_registry(void) {
    int n = ef_attn_count();
    ef_check("ef_attn_count() >= 2", n >= 2, "%d", n);
    int has_full = 0, has_flash = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = ef_attn_name(i);
        int distinct = 1;
        for (int j = 0; j < i; j++)
            if (nm && ef_attn_name(j) && strcmp(nm, ef_attn_name(j)) == 0) distinct = 0;
        has_full |= nm && strcmp(nm, "full") == 0;
        has_flash |= nm && strcmp(nm, "flash") == 0;
        char name[96];
        snprintf(name, sizeof name, "ef_attn_name(%d) non-empty and distinct", i);
        ef_check(name, nm && nm[0] && distinct, "'%s'", nn(nm));

        /* every registered name is a valid spec whose description starts with "name:", at a
         * self-attention shape long enough for every default (bigbird needs its random blocks
         * to fit: 10 blocks of 64) */
        const ef_attn_shape reg_shape = {1, 2, 640, 640, 16, 8};
        ef_attn *a = NULL;
        ef_status st = nm ? ef_attn_new(&a, nm, &reg_shape) : EF_ERR_ARG;
        const char *d = st ? NULL : ef_attn_describe(a);
        size_t l = nm ? strlen(nm) : 0;
        snprintf(name, sizeof name, "ef_attn_new('%s') and describe", nn(nm));
        ef_check(name, d && strncmp(d, nm, l) == 0 && d[l] == ':', "%s '%s'", ef_status_str(st),
                 nn(d));
        ef_attn_free(a);

        const char *h = nm ? ef_attn_help(nm) : NULL;
        snprintf(name, sizeof name, "ef_attn_help('%s') starts with the name", nn(nm));
        ef_check(name, h && strncmp(h, nm, l) == 0, "%.40s...", nn(h));
    }
    ef_check("registry has full and flash", has_full && has_flash, "full %d flash %d", has_full,
             has_flash);
    const char *neg = ef_attn_name(-1), *past = ef_attn_name(n), *far = ef_attn_name(INT_MAX);
    ef_check("ef_attn_name(-1), (count), (INT_MAX) are NULL", !neg && !past && !far,
             "'%s' '%s' '%s'", nn(neg), nn(past), nn(far));

    const char *h = ef_attn_help("flash");
    const char *keys[] = {"causal", "scale", "seed", "ref", "auto", "default"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "ef_attn_help(\"flash\") mentions the word '%s'", keys[i]);
        ef_check(name, has_word(h, keys[i]), "%zu characters", h ? strlen(h) : 0);
    }
    const char *h1 = ef_attn_help("nope"), *h2 = ef_attn_help(NULL), *h3 = ef_attn_help("");
    const char *h4 = ef_attn_help("flash:causal=1");
    ef_check("ef_attn_help of 'nope', NULL, '', a full spec: NULL", !h1 && !h2 && !h3 && !h4,
             "%p %p %p %p", (const void *)h1, (const void *)h2, (const void *)h3, (const void *)h4);
}

int main(void) {
    test_valid();
    test_options_take_effect();
    test_errors();
    test_shape_errors();
    test_registry();
    return ef_test_finish();
}
