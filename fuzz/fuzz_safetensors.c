/*
 * fuzz_safetensors.c - libFuzzer target: the checkpoint readers of src/model/checkpoint.c
 * (safetensors: 8-byte header length, JSON header, F32 data) through every entry point
 * (issue 14): ef_ckpt_read_meta, ef_ckpt_load into a small fixed table, ef_model_load.
 * Input: the file, written to a scratch folder (fuzz_util.h).
 * Checks: a refusal has a status and a message (and ef_model_load leaves *out NULL). A table
 * load that succeeds round-trips: saved again and loaded into a second table, the values are
 * bitwise equal. A model load that succeeds has the file's spec as its canonical spec,
 * round-trips the same way through ef_model_save / ef_model_load, and runs a short forward.
 * ef_model_load builds whatever model the file's "eformer.spec" describes; specs that
 * fuzz_model_small refuses (large, legitimate models) are not loaded here.
 * Build: `./run.sh fuzz`; corpus in fuzz/corpus/safetensors (seeds written by the library's
 * own saver: fuzz/make_seeds.c).
 */
#include "fuzz_util.h"

#include "eformer.h"
#include "model/params.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The table the seeds' table checkpoints were saved from (make_seeds.c has the same). */
static ef_params *small_table(void) {
    ef_params *p = NULL;
    if (ef_params_new(&p) != EF_OK ||
        ef_params_add(p, "a", 2, (int64_t[]){2, 3}, ef_init_normal(1), NULL) != EF_OK ||
        ef_params_add(p, "b.weight", 1, (int64_t[]){5}, ef_init_ones(), NULL) != EF_OK ||
        ef_params_add(p, "c", 4, (int64_t[]){1, 2, 1, 2}, ef_init_uniform(-1, 1), NULL) != EF_OK ||
        ef_params_alloc(p) != EF_OK)
        abort();
    return p;
}

static void fuzz_table(const char *path, const char *copy) {
    ef_params *p = small_table(), *q = small_table();
    ef_status st = ef_ckpt_load(p, path);
    if (st != EF_OK) {
        if (!ef_last_error()[0]) abort();
    } else {
        ef_ckpt_meta meta = {"k", "v"};
        if (ef_ckpt_save(p, copy, &meta, 1) != EF_OK || ef_ckpt_load(q, copy) != EF_OK ||
            memcmp(p->data, q->data, p->total * sizeof(float)))
            abort();
    }
    ef_params_free(p), ef_params_free(q);
}

static void fuzz_model(const char *path, const char *copy) {
    char *spec = NULL;
    if (ef_ckpt_read_meta(path, "eformer.spec", &spec) != EF_OK) {
        if (spec || !ef_last_error()[0]) abort();
        return;
    }
    int small = fuzz_model_small(spec, fuzz_dims_library);
    free(spec);
    if (!small) return;
    ef_model_opts o = {.batch = 1, .train = 0};
    ef_model *m = (ef_model *)&o, *m2 = NULL;
    if (ef_model_load(&m, path, &o) != EF_OK) {
        if (m || !ef_last_error()[0]) abort();
        return;
    }
    if (ef_ckpt_read_meta(path, "eformer.spec", &spec) != EF_OK) abort();
    if (strcmp(spec, ef_model_describe(m))) abort();
    free(spec);
    if (ef_model_save(m, copy) != EF_OK || ef_model_load(&m2, copy, &o) != EF_OK) abort();
    if (strcmp(ef_model_describe(m), ef_model_describe(m2)) ||
        memcmp(ef_model_params(m), ef_model_params(m2), ef_model_param_floats(m) * sizeof(float)))
        abort();
    ef_model_free(m2);
    /* the loaded values (mechanisms' own parameters too) are usable: any float, no crash */
    ef_model_info in;
    ef_model_get_info(m, &in);
    int32_t tok[4] = {0, in.vocab - 1, 0, 0};
    ef_model_batch b = {1, in.max_len < 4 ? in.max_len : 4, tok, NULL, NULL, 0};
    ef_model_out out = {NULL, 0, 0, 0};
    if (ef_model_forward(m, &b, &out) != EF_OK) abort();
    ef_model_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_path("in.safetensors"), *copy = fuzz_path("copy.safetensors");
    fuzz_write(path, data, size);
    ef_set_num_threads(1);

    char *value = (char *)path;
    ef_status st = ef_ckpt_read_meta(path, "eformer.version", &value);
    if (st != EF_OK) {
        if (value || !ef_last_error()[0]) abort();
    } else if (!value) {
        abort();
    }
    free(value);
    fuzz_table(path, copy);
    fuzz_model(path, copy);
    return 0;
}
