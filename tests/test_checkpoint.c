/*
 * test_checkpoint.c - the parameter table (src/model/params.h) and its safetensors checkpoints.
 *
 * Table: names refused or accepted by the rules, duplicates, shapes, aligned layout, lookup,
 * initialisation reproducible from the seed and independent per tensor (same values whatever the
 * other tensors of the table), with the init's distribution checked statistically.
 * Checkpoints: bit-exact round trip of arbitrary bit patterns (NaN payloads, -0, infinities,
 * subnormals), metadata round trip with characters that need escaping, the header read by
 * Python's json module when python3 is there; every malformed file of the validation list
 * rejected with EF_ERR_FORMAT and a message naming the problem (hand-built files, each a
 * one-field change of a control file that loads); I/O errors naming the path and leaving no
 * temporary file; replacing a checkpoint leaves a complete file, and a reader holding the old
 * one still reads the old one whole.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"
#include "model/params.h"

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[256];

static void path_in(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", tmpdir, name);
}

/* The number of entries of `dir` whose name contains `needle` (-1 when dir cannot be read). */
static int count_files(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strstr(e->d_name, needle)) n++;
    closedir(d);
    return n;
}

static long file_size(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

/* Passes when st == want and the last error contains every one of the NULL-terminated needles. */
static void check_msg(const char *name, ef_status st, ef_status want, const char *n1,
                      const char *n2, const char *n3) {
    const char *msg = ef_last_error();
    int ok = st == want;
    const char *needles[3] = {n1, n2, n3};
    for (int i = 0; i < 3; i++)
        if (needles[i] && !strstr(msg, needles[i])) ok = 0;
    ef_check(name, ok, "%s: %s", ef_status_str(st), msg);
}

/* ---------------------------------------------------------------------------------------------
 * The table
 * ------------------------------------------------------------------------------------------- */
static void test_names(void) {
    ef_params *p;
    ef_check_status("ef_params_new", ef_params_new(&p), EF_OK);
    int64_t s2[2] = {3, 5};
    int idx = -1;
    ef_check_status("add layers.3.attn.q.weight",
                    ef_params_add(p, "layers.3.attn.q.weight", 2, s2, ef_init_normal(0.02f), &idx),
                    EF_OK);
    ef_check("first index is 0", idx == 0, "index %d", idx);
    ef_status st = ef_params_add(p, "layers.3.attn.q.weight", 2, s2, ef_init_zeros(), NULL);
    check_msg("duplicate name refused, named", st, EF_ERR_ARG, "duplicate",
              "layers.3.attn.q.weight", NULL);
    char longname[EF_PARAM_NAME_MAX + 2];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    static const struct {
        const char *name, *what;
    } bad[] = {{"", "empty"},
               {"a b", "space"},
               {"a\"b", "quote"},
               {"a\\b", "backslash"},
               {"a\nb", "newline"},
               {"a\x7f", "DEL"},
               {"caf\xc3\xa9", "non-ASCII"},
               {"__metadata__", "reserved"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "name refused: %s", bad[i].what);
        ef_check_status(name, ef_params_add(p, bad[i].name, 2, s2, ef_init_zeros(), NULL),
                        EF_ERR_ARG);
    }
    ef_check_status("name refused: NULL", ef_params_add(p, NULL, 2, s2, ef_init_zeros(), NULL),
                    EF_ERR_ARG);
    ef_check_status("name refused: 256 bytes",
                    ef_params_add(p, longname, 2, s2, ef_init_zeros(), NULL), EF_ERR_ARG);
    longname[EF_PARAM_NAME_MAX] = '\0';
    ef_check_status("name accepted: 255 bytes",
                    ef_params_add(p, longname, 1, s2, ef_init_zeros(), NULL), EF_OK);
    ef_check_status("name accepted: punctuation",
                    ef_params_add(p, "a-b_c:d/e.f[0]", 1, s2, ef_init_zeros(), NULL), EF_OK);

    int64_t s5[5] = {1, 1, 1, 1, 1}, zero[2] = {3, 0}, neg[1] = {-2};
    ef_check_status("ndim 0 refused", ef_params_add(p, "z0", 0, s2, ef_init_zeros(), NULL),
                    EF_ERR_ARG);
    ef_check_status("ndim 5 refused", ef_params_add(p, "z5", 5, s5, ef_init_zeros(), NULL),
                    EF_ERR_ARG);
    check_msg("zero dimension refused, named",
              ef_params_add(p, "zd", 2, zero, ef_init_zeros(), NULL), EF_ERR_ARG, "zd", NULL, NULL);
    ef_check_status("negative dimension refused",
                    ef_params_add(p, "zn", 1, neg, ef_init_zeros(), NULL), EF_ERR_ARG);
    ef_check_status("normal std < 0 refused",
                    ef_params_add(p, "i1", 1, s2, ef_init_normal(-1.0f), NULL), EF_ERR_ARG);
    ef_check_status("normal std NaN refused",
                    ef_params_add(p, "i2", 1, s2, ef_init_normal(NAN), NULL), EF_ERR_ARG);
    ef_check_status("uniform a > b refused",
                    ef_params_add(p, "i3", 1, s2, ef_init_uniform(1.0f, -1.0f), NULL), EF_ERR_ARG);
    ef_check("refused adds leave the table alone", p->n == 3, "n=%d", p->n);

    const ef_param *t = NULL;
    ef_check_status("find before alloc", ef_params_find(p, "layers.3.attn.q.weight", &t, NULL),
                    EF_OK);
    ef_check("data view NULL before alloc", ef_params_data(p, "layers.3.attn.q.weight") == NULL,
             "%s", ef_last_error());
    ef_check_status("alloc", ef_params_alloc(p), EF_OK);
    ef_check_status("alloc twice refused", ef_params_alloc(p), EF_ERR_ARG);
    check_msg("add after alloc refused", ef_params_add(p, "late", 1, s2, ef_init_zeros(), NULL),
              EF_ERR_ARG, "late", "allocated", NULL);
    ef_params_free(p);

    ef_params *empty;
    ef_params_new(&empty);
    ef_check_status("alloc of an empty table refused", ef_params_alloc(empty), EF_ERR_ARG);
    ef_params_free(empty);
    ef_params_free(NULL);
    ef_check("ef_params_free(NULL) is a no-op", 1, " ");
}

/* A table of tensors of awkward sizes (so there is alignment padding), with every init kind. */
static ef_params *make_table(int variant) {
    ef_params *p;
    if (ef_params_new(&p) != EF_OK) return NULL;
    int64_t emb[2] = {37, 24}, q[2] = {24, 24}, b[1] = {24}, ln[1] = {24}, h4[4] = {2, 3, 5, 7},
            head[2] = {24, 11};
    int ok = 1;
    if (variant == 1) { /* other tensors first: must not change the shared tensors' init */
        int64_t extra[3] = {4, 4, 9};
        ok &= ef_params_add(p, "extra.weight", 3, extra, ef_init_normal(1.0f), NULL) == EF_OK;
    }
    ok &= ef_params_add(p, "embed.weight", 2, emb, ef_init_normal(1.0f), NULL) == EF_OK;
    ok &= ef_params_add(p, "layers.0.attn.q.weight", 2, q, ef_init_normal(0.02f), NULL) == EF_OK;
    ok &= ef_params_add(p, "layers.0.attn.q.bias", 1, b, ef_init_zeros(), NULL) == EF_OK;
    ok &= ef_params_add(p, "layers.0.ln1.weight", 1, ln, ef_init_ones(), NULL) == EF_OK;
    ok &= ef_params_add(p, "layers.0.mix", 4, h4, ef_init_uniform(-0.5f, 0.25f), NULL) == EF_OK;
    ok &= ef_params_add(p, "head.weight", 2, head, ef_init_normal(0.5f), NULL) == EF_OK;
    ok &= ef_params_alloc(p) == EF_OK;
    if (!ok) {
        printf("make_table: %s\n", ef_last_error());
        ef_params_free(p);
        return NULL;
    }
    return p;
}

static void test_layout_and_lookup(void) {
    ef_params *p = make_table(0);
    ef_check("table built", p != NULL, "%s", p ? "" : ef_last_error());
    if (!p) return;
    size_t count = 0;
    int aligned = ((uintptr_t)p->data % 64 == 0) && ((uintptr_t)p->grad % 64 == 0);
    size_t prev_end = 0;
    int ordered = 1;
    for (int i = 0; i < p->n; i++) {
        const ef_param *t = &p->t[i];
        count += t->numel;
        aligned &= t->offset % EF_PARAM_ALIGN == 0;
        ordered &= t->offset >= prev_end && t->offset - prev_end < EF_PARAM_ALIGN;
        prev_end = t->offset + t->numel;
    }
    ef_check("buffers and tensors 64-byte aligned", aligned, " ");
    ef_check("tensors in order, padding < 16 floats", ordered && prev_end == p->total, "total %zu",
             p->total);
    ef_check("count = sum of numel",
             count == p->count && p->count == 37 * 24 + 24 * 24 + 24 + 24 + 210 + 24 * 11,
             "count %zu", p->count);
    const ef_param *t = NULL;
    int idx = -1;
    ef_check_status("find layers.0.ln1.weight", ef_params_find(p, "layers.0.ln1.weight", &t, &idx),
                    EF_OK);
    ef_check("found the right tensor",
             t && idx == 3 && t == &p->t[3] && t->ndim == 1 && t->shape[0] == 24, "idx %d", idx);
    check_msg("unknown name refused, named", ef_params_find(p, "layers.9.nope", &t, NULL),
              EF_ERR_ARG, "layers.9.nope", NULL, NULL);
    float *d = ef_params_data(p, "head.weight"), *g = ef_params_grad(p, "head.weight");
    ef_check("data/grad views at the offset",
             d == p->data + p->t[5].offset && g == p->grad + p->t[5].offset, " ");
    ef_check("unknown view is NULL with a message",
             ef_params_data(p, "missing") == NULL && strstr(ef_last_error(), "missing"), "%s",
             ef_last_error());
    int zero = 1;
    for (size_t i = 0; i < p->total; i++) zero &= p->data[i] == 0.0f && p->grad[i] == 0.0f;
    ef_check("alloc zero-fills data and grad", zero, " ");
    ef_params_free(p);
}

static void test_init(void) {
    ef_params *a = make_table(0), *b = make_table(0), *c = make_table(1), *e = make_table(0);
    if (!a || !b || !c || !e) {
        ef_check("tables for init", 0, "%s", ef_last_error());
        ef_params_free(a), ef_params_free(b), ef_params_free(c), ef_params_free(e);
        return;
    }
    ef_check_status("init seed 7", ef_params_init(a, 7), EF_OK);
    ef_params_init(b, 7);
    ef_params_init(c, 7);
    ef_params_init(e, 8);
    ef_check("same seed: identical buffers",
             memcmp(a->data, b->data, a->total * sizeof(float)) == 0, " ");
    ef_check("other seed: different normal tensors",
             memcmp(ef_params_data(a, "embed.weight"), ef_params_data(e, "embed.weight"),
                    37 * 24 * sizeof(float)) != 0,
             " ");
    /* c has an extra tensor in front: every shared tensor still has a's values */
    int same = 1;
    for (int i = 0; i < a->n; i++) {
        const char *nm = a->t[i].name;
        same &= memcmp(ef_params_data(a, nm), ef_params_data(c, nm), a->t[i].numel * 4) == 0;
    }
    ef_check("init independent of the other tensors", same, " ");
    ef_check("different names draw different streams",
             memcmp(ef_params_data(a, "layers.0.attn.q.weight"), ef_params_data(a, "embed.weight"),
                    24 * 24 * sizeof(float)) != 0,
             " ");

    /* distributions: embed N(0,1) n=888, mix U[-0.5,0.25) n=210 */
    const float *x = ef_params_data(a, "embed.weight");
    double s = 0, s2 = 0;
    for (int i = 0; i < 888; i++) s += x[i], s2 += (double)x[i] * x[i];
    double mean = s / 888, sd = sqrt(s2 / 888 - mean * mean);
    /* standard errors: mean 1/sqrt(888) = 0.034, sd 1/sqrt(2*888) = 0.024; bound 4 SE */
    ef_check_err("normal(1): |mean| (4 standard errors)", fabs(mean), 4 * 0.034);
    ef_check_err("normal(1): |sd - 1| (4 standard errors)", fabs(sd - 1), 4 * 0.024);
    const float *w = ef_params_data(a, "layers.0.attn.q.weight");
    s2 = 0;
    for (int i = 0; i < 576; i++) s2 += (double)w[i] * w[i];
    /* sd of sd estimate ~ 0.02/sqrt(2*576) = 5.9e-4 */
    ef_check_err("normal(0.02): |sd - 0.02| (4 standard errors)", fabs(sqrt(s2 / 576) - 0.02),
                 4 * 5.9e-4);
    const float *u = ef_params_data(a, "layers.0.mix");
    int inrange = 1;
    s = 0;
    for (int i = 0; i < 210; i++) inrange &= u[i] >= -0.5f && u[i] < 0.25f, s += u[i];
    ef_check("uniform in [-0.5, 0.25)", inrange, " ");
    /* mean -0.125, sd of the mean 0.75/sqrt(12*210) = 0.015 */
    ef_check_err("uniform: |mean + 0.125| (4 standard errors)", fabs(s / 210 + 0.125), 4 * 0.015);
    const float *ones = ef_params_data(a, "layers.0.ln1.weight"),
                *zeros = ef_params_data(a, "layers.0.attn.q.bias");
    int ok1 = 1, ok0 = 1;
    for (int i = 0; i < 24; i++) ok1 &= ones[i] == 1.0f, ok0 &= zeros[i] == 0.0f;
    ef_check("ones and zeros", ok1 && ok0, " ");
    int pad0 = 1;
    for (int i = 0; i < a->n; i++) {
        size_t end = a->t[i].offset + a->t[i].numel;
        size_t next = i + 1 < a->n ? a->t[i + 1].offset : a->total;
        for (size_t j = end; j < next; j++) pad0 &= a->data[j] == 0.0f;
    }
    ef_check("padding stays zero after init", pad0, " ");
    ef_params_free(a), ef_params_free(b), ef_params_free(c), ef_params_free(e);
}

/* ---------------------------------------------------------------------------------------------
 * Checkpoints
 * ------------------------------------------------------------------------------------------- */

/* Arbitrary 32-bit patterns: NaNs with payloads, infinities, subnormals, -0 among them. */
static void fill_bits(ef_params *p, uint64_t seed) {
    for (int i = 0; i < p->n; i++) {
        const ef_param *t = &p->t[i];
        uint32_t *x = (uint32_t *)(p->data + t->offset);
        for (size_t j = 0; j < t->numel; j++) {
            uint32_t w[4];
            ef_rng_raw(seed, (uint64_t)i, j, w);
            x[j] = w[0];
        }
    }
    uint32_t special[] = {0x80000000u /* -0 */,   0x7fc00001u /* qNaN payload */,
                          0x7f800001u /* sNaN */, 0xffc12345u /* -NaN payload */,
                          0x7f800000u /* inf */,  0x00000001u /* smallest subnormal */};
    memcpy(p->data + p->t[0].offset, special, sizeof special);
}

static const char *SPEC = "layers=6,dim=256,heads=4,attn=local:window=128|lsh:hashes=4,"
                          "note=\"quoted\" back\\slash\nnewline\ttab caf\xc3\xa9 \xe2\x88\x9a";

static void python_check(const char *path, int n_tensors) {
    if (system("python3 -c 'import json, struct' >/dev/null 2>&1") != 0) {
        ef_check("python3 json cross-check skipped (no python3 with json)", 1, " ");
        return;
    }
    /* the header through json.loads, the bounds as a safetensors reader checks them, and the
     * first value of the first tensor by struct.unpack('<f') */
    static const char *script = "import json, struct, sys\n"
                                "b = open(sys.argv[1], 'rb').read()\n"
                                "n = struct.unpack('<Q', b[:8])[0]\n"
                                "h = json.loads(b[8:8 + n].decode('utf-8'))\n"
                                "meta = h.pop('__metadata__')\n"
                                "assert all(isinstance(v, str) for v in meta.values())\n"
                                "ts = sorted(h.items(), key=lambda kv: kv[1]['data_offsets'])\n"
                                "pos = 0\n"
                                "for name, t in ts:\n"
                                "    s, e = t['data_offsets']\n"
                                "    assert t['dtype'] == 'F32' and s == pos\n"
                                "    k = 4\n"
                                "    for d in t['shape']: k *= d\n"
                                "    assert e - s == k\n"
                                "    pos = e\n"
                                "assert 8 + n + pos == len(b) and (8 + n) % 8 == 0\n"
                                "first = ts[0][1]['data_offsets'][0]\n"
                                "v = struct.unpack('<I', b[8 + n + first:12 + n + first])[0]\n"
                                "print(len(ts), meta['spec'] == sys.argv[2], hex(v))\n";
    char script_path[300], cmd[1200];
    path_in(script_path, sizeof script_path, "check.py");
    FILE *f = fopen(script_path, "w");
    if (!f) {
        ef_check("python script written", 0, "%s", script_path);
        return;
    }
    fputs(script, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "python3 '%s' '%s' 'layers=2,dim=8' 2>&1", script_path, path);
    FILE *pp = popen(cmd, "r");
    char out[512] = "";
    if (pp) {
        if (!fgets(out, sizeof out, pp)) out[0] = '\0';
        pclose(pp);
    }
    out[strcspn(out, "\n")] = '\0';
    char want[64];
    snprintf(want, sizeof want, "%d True 0x80000000", n_tensors);
    ef_check("python json + struct read the checkpoint", strcmp(out, want) == 0,
             "got '%.200s' want '%s'", out, want);
    remove(script_path);
}

static void test_round_trip(void) {
    ef_params *a = make_table(0), *b = make_table(0);
    if (!a || !b) {
        ef_check("tables for the round trip", 0, "%s", ef_last_error());
        ef_params_free(a), ef_params_free(b);
        return;
    }
    fill_bits(a, 99);
    ef_params_init(b, 1);
    char path[300];
    path_in(path, sizeof path, "model.safetensors");
    ef_ckpt_meta meta[] = {{"spec", SPEC}, {"format", "eformer"}, {"step", "1200"}};
    ef_check_status("save with metadata", ef_ckpt_save(a, path, meta, 3), EF_OK);
    ef_check("no temporary file left", count_files(tmpdir, ".tmp-") == 0, "%d",
             count_files(tmpdir, ".tmp-"));
    ef_check_status("load", ef_ckpt_load(b, path), EF_OK);
    ef_check("round trip bit-exact (NaN payloads, -0, inf, subnormals)",
             memcmp(a->data, b->data, a->total * sizeof(float)) == 0, " ");
    char *v = NULL;
    ef_check_status("read_meta spec", ef_ckpt_read_meta(path, "spec", &v), EF_OK);
    ef_check("metadata spec round trip (quotes, backslash, control, UTF-8)",
             v && strcmp(v, SPEC) == 0, "%zu bytes, want %zu", v ? strlen(v) : 0, strlen(SPEC));
    free(v);
    v = NULL;
    ef_ckpt_read_meta(path, "step", &v);
    ef_check("metadata step round trip", v && strcmp(v, "1200") == 0, "got '%s'", v ? v : "(null)");
    free(v);
    check_msg("missing metadata key: EF_ERR_FORMAT naming it",
              ef_ckpt_read_meta(path, "optimizer", &v), EF_ERR_FORMAT, "optimizer", NULL, NULL);
    ef_check("missing key leaves value NULL", v == NULL, " ");

    /* the file's framing: N little-endian, data starting 8-aligned, exact size */
    unsigned char head[8];
    FILE *f = fopen(path, "rb");
    size_t got = f ? fread(head, 1, 8, f) : 0;
    if (f) fclose(f);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | head[i];
    long want = (long)(8 + n + a->count * 4);
    ef_check("file = 8 + N + packed data, N % 8 == 0",
             got == 8 && n % 8 == 0 && file_size(path) == want, "N=%llu size %ld want %ld",
             (unsigned long long)n, file_size(path), want);

    /* without metadata: no __metadata__ key; read_meta says so */
    char path2[300];
    path_in(path2, sizeof path2, "nometa.safetensors");
    ef_check_status("save without metadata", ef_ckpt_save(a, path2, NULL, 0), EF_OK);
    ef_check_status("load without metadata", ef_ckpt_load(b, path2), EF_OK);
    check_msg("read_meta of a file without metadata", ef_ckpt_read_meta(path2, "spec", &v),
              EF_ERR_FORMAT, "spec", NULL, NULL);
    remove(path2);

    /* Python reads it: a plain spec, finite values, -0 first */
    ef_params *c = make_table(0);
    ef_params_init(c, 3);
    c->data[c->t[0].offset] = -0.0f;
    ef_ckpt_meta m2[] = {{"spec", "layers=2,dim=8"}};
    ef_check_status("save for python", ef_ckpt_save(c, path2, m2, 1), EF_OK);
    python_check(path2, c->n);
    remove(path2);
    ef_params_free(c);

    /* save arguments */
    ef_ckpt_meta dup[] = {{"spec", "a"}, {"spec", "b"}};
    check_msg("duplicate metadata key refused", ef_ckpt_save(a, path2, dup, 2), EF_ERR_ARG, "spec",
              NULL, NULL);
    ef_ckpt_meta badutf[] = {{"spec", "caf\xc3"}};
    check_msg("invalid UTF-8 metadata refused", ef_ckpt_save(a, path2, badutf, 1), EF_ERR_ARG,
              "UTF-8", NULL, NULL);
    ef_ckpt_meta nullv[] = {{"spec", NULL}};
    ef_check_status("NULL metadata value refused", ef_ckpt_save(a, path2, nullv, 1), EF_ERR_ARG);
    ef_check_status("NULL path refused", ef_ckpt_save(a, NULL, NULL, 0), EF_ERR_ARG);
    ef_params *un;
    ef_params_new(&un);
    ef_check_status("unallocated table refused", ef_ckpt_save(un, path2, NULL, 0), EF_ERR_ARG);
    ef_params_free(un);
    ef_check("refused saves wrote nothing", file_size(path2) < 0, " ");
    ef_params_free(a), ef_params_free(b);
    remove(path);
}

/* Writes a file: 8-byte N = declared, the header text, data_len zero bytes. */
static void write_raw(const char *path, uint64_t declared, const char *header, size_t data_len) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(declared >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++) fputc(0, f);
    fclose(f);
}

static void write_hdr(const char *path, const char *header, size_t data_len) {
    write_raw(path, strlen(header), header, data_len);
}

/* the small table: a [2,3] (24 bytes), b [4] (16 bytes) */
#define A_OK "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}"
#define B_OK "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}"

static void test_malformed(void) {
    ef_params *p;
    ef_params_new(&p);
    int64_t sa[2] = {2, 3}, sb[1] = {4};
    ef_params_add(p, "a", 2, sa, ef_init_ones(), NULL);
    ef_params_add(p, "b", 1, sb, ef_init_ones(), NULL);
    if (ef_params_alloc(p) != EF_OK) {
        ef_check("small table", 0, "%s", ef_last_error());
        return;
    }
    ef_params_init(p, 1);
    char path[300];
    path_in(path, sizeof path, "bad.safetensors");

    write_hdr(path, "{" A_OK "," B_OK "}", 40);
    ef_check_status("control: the hand-built file loads", ef_ckpt_load(p, path), EF_OK);
    write_hdr(path, "{\"__metadata__\":{\"spec\":\"x\"}," B_OK "," A_OK "}  \n ", 40);
    ef_check_status("control: other order, metadata, whitespace padding", ef_ckpt_load(p, path),
                    EF_OK);
    ef_params_init(p, 1);

    static const struct {
        const char *what, *header;
        size_t data;
        const char *n1, *n2;
    } cases[] = {
        {"broken JSON", "{" A_OK "," B_OK, 40, "not valid JSON", NULL},
        {"broken JSON (bad literal)", "{\"a\":{\"dtype\":F32}}", 0, "not valid JSON", NULL},
        {"not an object", "[1,2]", 0, "not a JSON object", NULL},
        {"bytes after the object", "{" A_OK "," B_OK "} x", 40, "after the object", NULL},
        {"invalid UTF-8 in the header", "{\"\xff\":1}", 0, "UTF-8", NULL},
        {"wrong shape",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24]}," B_OK "}", 40, "'a'",
         "[3,2]"},
        {"wrong rank", "{\"a\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}," B_OK "}",
         40, "'a'", "shape"},
        {"wrong dtype",
         "{\"a\":{\"dtype\":\"F64\",\"shape\":[2,3],\"data_offsets\":[0,48]}," B_OK "}", 56, "'a'",
         "F64"},
        {"dtype not a string",
         "{\"a\":{\"dtype\":4,\"shape\":[2,3],\"data_offsets\":[0,24]}," B_OK "}", 40, "'a'",
         "dtype"},
        {"overlapping offsets",
         "{" A_OK ",\"b\":{\"dtype\":\"F32\",\"shape\":[4],"
         "\"data_offsets\":[16,32]}}",
         32, "overlap", "'b'"},
        {"gap between tensors",
         "{" A_OK ",\"b\":{\"dtype\":\"F32\",\"shape\":[4],"
         "\"data_offsets\":[28,44]}}",
         44, "unused bytes", "'b'"},
        {"size != shape product * 4",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
         "\"data_offsets\":[0,20]}," B_OK "}",
         40, "'a'", "needs 24"},
        {"reversed offsets",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,0]}," B_OK "}", 40, "'a'",
         "reversed"},
        {"negative offset",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[-24,0]}," B_OK "}", 40, "'a'",
         "non-negative integers"},
        {"fractional offset",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
         "\"data_offsets\":[0.5,24.5]}," B_OK "}",
         40, "'a'", "integers"},
        {"string offset",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
         "\"data_offsets\":[\"0\",24]}," B_OK "}",
         40, "'a'", "integers"},
        {"three offsets",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
         "\"data_offsets\":[0,24,24]}," B_OK "}",
         40, "'a'", "data_offsets"},
        {"negative dimension",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2,-3],"
         "\"data_offsets\":[0,24]}," B_OK "}",
         40, "'a'", "dimension"},
        {"offset beyond the data section",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
         "\"data_offsets\":[40,64]}," B_OK "}",
         40, "truncated", "'a'"},
        {"data section truncated", "{" A_OK "," B_OK "}", 36, "truncated", "'b'"},
        {"trailing bytes", "{" A_OK "," B_OK "}", 44, "4 trailing bytes", NULL},
        {"missing tensor", "{" A_OK "}", 24, "lacks tensor 'b'", NULL},
        {"extra tensor",
         "{" A_OK "," B_OK ",\"c\":{\"dtype\":\"F32\",\"shape\":[1],"
         "\"data_offsets\":[40,44]}}",
         44, "'c'", "does not have"},
        {"duplicate tensor", "{" A_OK "," B_OK "," B_OK "}", 40, "'b'", "twice"},
        {"missing field", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3]}," B_OK "}", 40, "'a'",
         "data_offsets"},
        {"unknown field",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24],"
         "\"scale\":2}," B_OK "}",
         40, "'a'", "scale"},
        {"tensor not an object", "{\"a\":[1]," B_OK "}", 16, "'a'", "not a JSON object"},
        {"metadata value not a string", "{\"__metadata__\":{\"layers\":6}," A_OK "," B_OK "}", 40,
         "'layers'", "not a string"},
        {"metadata not an object", "{\"__metadata__\":\"x\"," A_OK "," B_OK "}", 40, "__metadata__",
         "not a JSON object"},
        {"duplicate metadata key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}," A_OK "," B_OK "}",
         40, "'k'", "twice"},
    };
    float before[10];
    memcpy(before, p->data, 6 * 4), memcpy(before + 6, p->data + p->t[1].offset, 16);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_hdr(path, cases[i].header, cases[i].data);
        char name[120];
        snprintf(name, sizeof name, "rejected: %s", cases[i].what);
        check_msg(name, ef_ckpt_load(p, path), EF_ERR_FORMAT, cases[i].n1, cases[i].n2, path);
    }
    int intact =
        memcmp(before, p->data, 24) == 0 && memcmp(before + 6, p->data + p->t[1].offset, 16) == 0;
    ef_check("rejected loads leave the table's values untouched", intact, " ");

    /* framing: short file, header length beyond the file or absurd */
    write_raw(path, 0, "", 0);
    FILE *f = fopen(path, "wb");
    if (f) fwrite("\x10\0\0\0\0", 1, 5, f), fclose(f);
    check_msg("rejected: file shorter than 8 bytes", ef_ckpt_load(p, path), EF_ERR_FORMAT,
              "shorter than the 8-byte", path, NULL);
    write_raw(path, 1000, "{" A_OK "," B_OK "}", 40);
    check_msg("rejected: header length beyond the file", ef_ckpt_load(p, path), EF_ERR_FORMAT,
              "header length 1000", "beyond the end", path);
    write_raw(path, 0xffffffffffffffffull, "{}", 0);
    check_msg("rejected: header length 2^64-1", ef_ckpt_load(p, path), EF_ERR_FORMAT,
              "beyond the end", NULL, NULL);
    /* a 200 MB sparse file declaring a 150 MB header: beyond the format's 100 MB limit */
    write_raw(path, 150000000ull, "{", 0);
    int big = truncate(path, 200000000) == 0;
    if (big)
        check_msg("rejected: header length > 100 MB", ef_ckpt_load(p, path), EF_ERR_FORMAT,
                  "exceeds the format's limit", NULL, NULL);
    else
        ef_check("header > 100 MB case skipped (truncate failed)", 1, " ");
    write_hdr(path, "", 0);
    check_msg("rejected: empty header", ef_ckpt_load(p, path), EF_ERR_FORMAT, "JSON object", NULL,
              NULL);
    /* read_meta validates the file too */
    write_hdr(path, "{\"__metadata__\":{\"spec\":\"x\"}," A_OK "," B_OK "}", 36);
    char *v = NULL;
    check_msg("read_meta rejects a truncated file", ef_ckpt_read_meta(path, "spec", &v),
              EF_ERR_FORMAT, "truncated", NULL, NULL);
    write_hdr(path, "{\"__metadata__\":{\"spec\":\"x\"}," A_OK "," B_OK "}", 40);
    ef_check_status("read_meta of the good file", ef_ckpt_read_meta(path, "spec", &v), EF_OK);
    ef_check("read_meta value", v && strcmp(v, "x") == 0, " ");
    free(v);

    /* a real checkpoint cut short anywhere is rejected */
    ef_check_status("save the small table", ef_ckpt_save(p, path, NULL, 0), EF_OK);
    long full = file_size(path);
    int all = 1;
    char cut_path[300];
    path_in(cut_path, sizeof cut_path, "cut.safetensors");
    FILE *src = fopen(path, "rb");
    unsigned char buf[1024];
    size_t nb = src ? fread(buf, 1, sizeof buf, src) : 0;
    if (src) fclose(src);
    for (long cut = 0; cut < full && (size_t)full == nb; cut++) {
        FILE *o = fopen(cut_path, "wb");
        if (!o) break;
        fwrite(buf, 1, (size_t)cut, o);
        fclose(o);
        ef_status st = ef_ckpt_load(p, cut_path);
        if (st != EF_ERR_FORMAT) {
            all = 0;
            printf("  cut at %ld: %s %s\n", cut, ef_status_str(st), ef_last_error());
        }
    }
    ef_check("every truncation of a real checkpoint is EF_ERR_FORMAT", all && full > 0,
             "%ld prefixes", full);
    remove(cut_path);
    remove(path);
    ef_params_free(p);
}

static void test_io_and_atomicity(void) {
    ef_params *a = make_table(0), *b = make_table(0);
    if (!a || !b) {
        ef_check("tables for I/O", 0, "%s", ef_last_error());
        ef_params_free(a), ef_params_free(b);
        return;
    }
    ef_params_init(a, 1);
    ef_params_init(b, 2);
    char path[300], nodir[300];
    path_in(path, sizeof path, "ckpt.safetensors");
    path_in(nodir, sizeof nodir, "no/such/folder/ckpt.safetensors");
    check_msg("load of a missing file: EF_ERR_IO naming it", ef_ckpt_load(a, path), EF_ERR_IO, path,
              "No such file", NULL);
    check_msg("save into a missing folder: EF_ERR_IO naming the path",
              ef_ckpt_save(a, nodir, NULL, 0), EF_ERR_IO, nodir, "No such file", NULL);
    /* the target is a folder: the temporary file is written, the rename fails, it is removed */
    char dirpath[300];
    path_in(dirpath, sizeof dirpath, "adir");
    mkdir(dirpath, 0700);
    check_msg("save over a folder: EF_ERR_IO naming the path", ef_ckpt_save(a, dirpath, NULL, 0),
              EF_ERR_IO, dirpath, "renaming", NULL);
    ef_check("no temporary file left after a failed save", count_files(tmpdir, ".tmp-") == 0,
             "%d left", count_files(tmpdir, ".tmp-"));
    rmdir(dirpath);
    check_msg("load of a folder: EF_ERR_IO", ef_ckpt_load(a, tmpdir), EF_ERR_IO, tmpdir, NULL,
              NULL);

    /* replacing: a reader that opened the old file keeps reading it whole; the path then holds
     * the complete new file */
    ef_ckpt_meta m1[] = {{"step", "1"}}, m2[] = {{"step", "2"}};
    ef_check_status("save old", ef_ckpt_save(a, path, m1, 1), EF_OK);
    long old_size = file_size(path);
    int fd_old = open(path, O_RDONLY);
    ef_check_status("save new over old", ef_ckpt_save(b, path, m2, 1), EF_OK);
    ef_check("no temporary file after replacing", count_files(tmpdir, ".tmp-") == 0, " ");
    ef_params *c = make_table(0);
    ef_check_status("load new", ef_ckpt_load(c, path), EF_OK);
    ef_check("path holds the new parameters",
             memcmp(c->data, b->data, b->total * sizeof(float)) == 0, " ");
    char *v = NULL;
    ef_ckpt_read_meta(path, "step", &v);
    ef_check("path holds the new metadata", v && strcmp(v, "2") == 0, " ");
    free(v);
    /* the old inode, read through the descriptor opened before: complete and the old values */
    char old_copy[300];
    path_in(old_copy, sizeof old_copy, "old-copy.safetensors");
    int ok_old = 0;
    if (fd_old >= 0) {
        FILE *o = fopen(old_copy, "wb");
        char buf[4096];
        ssize_t r;
        long total = 0;
        while (o && (r = read(fd_old, buf, sizeof buf)) > 0)
            fwrite(buf, 1, (size_t)r, o), total += r;
        if (o) fclose(o);
        close(fd_old);
        ok_old = total == old_size && ef_ckpt_load(c, old_copy) == EF_OK &&
                 memcmp(c->data, a->data, a->total * sizeof(float)) == 0;
    }
    ef_check("a reader of the old file reads the complete old checkpoint", ok_old, " ");
    remove(old_copy);
    remove(path);
    ef_params_free(a), ef_params_free(b), ef_params_free(c);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/eformer-ckpt-XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    test_names();
    test_layout_and_lookup();
    test_init();
    if (!ef_ckpt_supported()) {
        ef_params *p = make_table(0);
        char path[300];
        path_in(path, sizeof path, "x.safetensors");
        check_msg("without cJSON: save is EF_ERR_UNSUPPORTED saying what to install",
                  ef_ckpt_save(p, path, NULL, 0), EF_ERR_UNSUPPORTED, "libcjson-dev", NULL, NULL);
        check_msg("without cJSON: load is EF_ERR_UNSUPPORTED", ef_ckpt_load(p, path),
                  EF_ERR_UNSUPPORTED, "libcjson-dev", NULL, NULL);
        ef_check("checkpoint tests skipped: built without cJSON", 1, " ");
        ef_params_free(p);
    } else {
        test_round_trip();
        test_malformed();
        test_io_and_atomicity();
    }
    int left = count_files(tmpdir, "");
    ef_check("the tests removed their files", left == 0, "%d left in %s", left, tmpdir);
    rmdir(tmpdir);
    return ef_test_finish();
}
