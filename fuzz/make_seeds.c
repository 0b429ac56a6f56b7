/*
 * make_seeds.c - writes the seed corpus of fuzz_safetensors (fuzz/corpus/safetensors) with the
 * library's own saver: checkpoints of fuzz_safetensors' small table and of tiny models, and
 * near misses made from them by editing bytes (truncated, a trailing byte, a wrong dtype, a
 * header length past the end, a missing spec, a spec that does not match the tensors, ...).
 * Built with EF_FUZZ (target make_seeds): `./build-fuzz/make_seeds fuzz/corpus/safetensors`.
 */
#define _POSIX_C_SOURCE 200809L
#include "eformer.h"
#include "model/params.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *dir;

static void die(const char *what) {
    fprintf(stderr, "make_seeds: %s: %s\n", what, ef_last_error());
    exit(1);
}

static char *path_of(const char *name) {
    static char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    static uint8_t buf[1 << 16];
    *n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    uint8_t *r = malloc(*n + 64);
    memcpy(r, buf, *n);
    return r;
}

static void put(const char *name, const uint8_t *b, size_t n) {
    FILE *f = fopen(path_of(name), "wb");
    if (!f || fwrite(b, 1, n, f) != n || fclose(f)) die(name);
}

/* A copy of b with the first `from` replaced by `to` (same length), written as name. */
static void edited(const char *name, const uint8_t *b, size_t n, const char *from, const char *to) {
    uint8_t *c = malloc(n);
    memcpy(c, b, n);
    size_t k = strlen(from);
    for (size_t i = 0; i + k <= n; i++)
        if (!memcmp(c + i, from, k)) {
            memcpy(c + i, to, k);
            put(name, c, n);
            free(c);
            return;
        }
    fprintf(stderr, "make_seeds: '%s' not found for %s\n", from, name);
    exit(1);
}

static void model_seed(const char *name, const char *spec) {
    ef_model *m;
    ef_model_opts o = {.batch = 1, .seed = 7};
    if (ef_model_new(&m, spec, &o) || ef_model_save(m, path_of(name))) die(spec);
    ef_model_free(m);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds DIR\n");
        return 2;
    }
    dir = argv[1];
    /* the table of fuzz_safetensors.c */
    ef_params *p = NULL;
    if (ef_params_new(&p) || ef_params_add(p, "a", 2, (int64_t[]){2, 3}, ef_init_normal(1), NULL) ||
        ef_params_add(p, "b.weight", 1, (int64_t[]){5}, ef_init_ones(), NULL) ||
        ef_params_add(p, "c", 4, (int64_t[]){1, 2, 1, 2}, ef_init_uniform(-1, 1), NULL) ||
        ef_params_alloc(p) || ef_params_init(p, 3))
        die("table");
    ef_ckpt_meta meta[] = {{"eformer.version", ef_version()}, {"note", "\xc3\xa9t\xc3\xa9"}};
    if (ef_ckpt_save(p, path_of("table"), meta, 2) ||
        ef_ckpt_save(p, path_of("table_nometa"), NULL, 0))
        die("table save");
    ef_params_free(p);

    model_seed("model", "layers=1,dim=4,heads=1,ff=4,vocab=4,max_len=4");
    model_seed("model_linformer",
               "layers=1,dim=4,heads=2,ff=4,vocab=5,max_len=4,attn=linformer:k=2");
    model_seed("model_cls", "layers=1,dim=4,heads=2,ff=4,vocab=3,max_len=4,head=cls:classes=2,"
                            "pool=mean,pos=learned");
    model_seed("model_rev", "layers=2,dim=4,heads=1,ff=4,vocab=3,max_len=4,reversible=1,"
                            "attn=lsh:chunk=2,causal=1");

    size_t n, nm;
    uint8_t *t = slurp(path_of("table"), &n), *m = slurp(path_of("model"), &nm);
    put("truncated", t, n - 4);
    uint8_t *c = malloc(n + 1);
    memcpy(c, t, n), c[n] = 0;
    put("trailing_byte", c, n + 1);
    memcpy(c, t, n), c[0] ^= 0x40;
    put("header_past_end", c, n);
    memcpy(c, t, n), c[8] = '[';
    put("not_object", c, n);
    free(c);
    put("empty", t, 0);
    put("length_only", (const uint8_t *)"\0\0\0\0\0\0\0\0", 8);
    put("empty_object", (const uint8_t *)"\2\0\0\0\0\0\0\0{}", 10);
    edited("dtype_f16", t, n, "F32", "F16");
    edited("shape_changed", t, n, "[2,3]", "[3,2]");
    edited("offsets_overlap", t, n, "[0,24]", "[4,28]");
    edited("extra_field", t, n, "\"dtype\"", "\"dtipe\"");
    edited("meta_not_string", t, n, "\"\xc3\xa9t\xc3\xa9\"", "[1,2,3,4]");
    edited("duplicate_name", t, n, "\"c\"", "\"a\"");
    edited("spec_missing", m, nm, "eformer.spec", "eformer.spex");
    edited("spec_other_dim", m, nm, "dim=4", "dim=2");
    edited("spec_bad", m, nm, "layers=1", "layers=x");
    edited("seed_bad", m, nm, "eformer.seed\":\"7", "eformer.seed\":\"x");
    free(t), free(m);
    return 0;
}
