/*
 * fuzz_model.c - libFuzzer target: the model spec parser (ef_model_new) and, when a spec is
 * accepted, one small forward and backward (issue 14).
 * Input: 2 bytes, then the spec string.
 *   byte 0: bit 0 batch 2 (else 1), bit 1 a train model, bits 2-7 the call's length (1 ..
 *           max_len); byte 1: the padding of the call (lens) and which targets are -1.
 * The spec is given after small defaults (FUZZ_MODEL_DEFAULTS: later keys win) and only when
 * fuzz_model_small accepts it: big dimensions are legitimate specs that would allocate
 * gigabytes (see fuzz_util.h); the library is not asked to refuse them.
 * Accepted spec: the canonical spec (ef_model_describe) parses to the same canonical spec;
 * the info, tensor table and byte counts are consistent; a forward with targets gives a finite
 * loss, count and correct within their ranges; the captured q, k, v of a layer are finite;
 * a model with a decoding state decodes sequence 0 to the forward's logits up to rounding;
 * a train model runs backward and its gradients are finite. Refused spec: a status and a
 * message.
 * Build: `./run.sh fuzz`; corpus in fuzz/corpus/model.
 */
#include "fuzz_util.h"

#include "eformer.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SPEC_CAP = 4096 };

static void check_tables(const ef_model *m) {
    size_t sum = 0, end = 0;
    int n = ef_model_tensor_count(m);
    for (int i = 0; i < n; i++) {
        ef_tensor_info t, u;
        if (ef_model_tensor(m, i, &t) != EF_OK || ef_model_find(m, t.name, &u) != EF_OK) abort();
        if (u.offset != t.offset || t.offset < end || t.numel < 1) abort();
        size_t prod = 1;
        for (int d = 0; d < t.ndim; d++) prod *= (size_t)t.shape[d];
        if (prod != t.numel) abort();
        end = t.offset + t.numel, sum += t.numel;
    }
    if (sum != ef_model_param_count(m) || end > ef_model_param_floats(m)) abort();
    ef_tensor_info t;
    if (ef_model_tensor(m, n, &t) == EF_OK || !ef_last_error()[0]) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    char spec[SPEC_CAP], full[SPEC_CAP + 64];
    size_t n = size - 2 < SPEC_CAP - 1 ? size - 2 : SPEC_CAP - 1;
    memcpy(spec, data + 2, n);
    spec[n] = 0;
    if (!fuzz_model_small(spec, fuzz_dims_prefixed)) return 0;
    snprintf(full, sizeof full, "%s%s", FUZZ_MODEL_DEFAULTS, spec);

    ef_set_num_threads(1);
    ef_model_opts o = {.batch = 1 + (data[0] & 1), .seed = data[1], .train = (data[0] >> 1) & 1};
    ef_model *m = NULL;
    ef_status st = ef_model_new(&m, full, &o);
    if (st != EF_OK) {
        if (m || !ef_last_error()[0]) abort();
        return 0;
    }
    /* the canonical spec is a fixed point */
    ef_model *m2 = NULL;
    const char *desc = ef_model_describe(m);
    if (ef_model_new(&m2, desc, &o) != EF_OK || strcmp(ef_model_describe(m2), desc)) abort();
    if (ef_model_param_count(m2) != ef_model_param_count(m) ||
        memcmp(ef_model_params(m2), ef_model_params(m), ef_model_param_floats(m) * sizeof(float)))
        abort();
    ef_model_free(m2);

    ef_model_info in;
    ef_model_bytes by;
    if (ef_model_get_info(m, &in) != EF_OK || ef_model_get_bytes(m, &by) != EF_OK) abort();
    if (in.batch != o.batch || in.len != in.max_len || in.train != o.train || in.vocab < 1 ||
        (in.train && !by.grads) || by.total < by.params + by.grads + by.saved)
        abort();
    check_tables(m);

    /* one call: tokens from the input's bytes, some sequences padded, some targets absent */
    int B = o.batch, N = 1 + (data[0] >> 2) % in.max_len, K = in.classes ? in.classes : in.vocab;
    int32_t *tok = malloc((size_t)B * N * sizeof *tok), *tgt = malloc((size_t)B * N * sizeof *tgt);
    int32_t lens[2];
    float *logits = malloc((size_t)B * N * K * sizeof *logits);
    for (int i = 0; i < B * N; i++) {
        tok[i] = (int32_t)((data[(size_t)i % size] * 31u + (unsigned)i) % (unsigned)in.vocab);
        tgt[i] =
            (data[1] >> (i % 8)) & 1 && i % 3 == 0 ? -1 : (int32_t)((unsigned)i * 7 % (unsigned)K);
    }
    for (int b = 0; b < B; b++) lens[b] = data[1] & (1 << b) ? (data[1] >> 2) % (N + 1) : N;
    ef_model_batch batch = {B, N, tok, lens, tgt, 0};
    ef_model_out out = {logits, 0, 0, 0};
    st = ef_model_forward(m, &batch, &out);
    if (st != EF_OK) abort(); /* a valid call */
    if (!isfinite(out.loss) || out.loss < 0 || out.count < 0 || out.correct < 0 ||
        out.correct > out.count || out.count > (int64_t)B * N)
        abort();
    if (in.train) {
        if (ef_model_backward(m) != EF_OK) abort();
        const float *g = ef_model_grads(m);
        for (size_t i = 0; i < ef_model_param_floats(m); i++)
            if (!isfinite(g[i])) abort();
    } else if (ef_model_backward(m) == EF_OK || !ef_last_error()[0]) {
        abort();
    }
    /* the attention inputs of a layer: an evaluation forward, which overwrites what backward
     * reads (so after it) */
    size_t nqkv = (size_t)B * N * in.dim;
    float *q = malloc(nqkv * sizeof *q), *k = malloc(nqkv * sizeof *k), *v = malloc(nqkv * 4);
    if (ef_model_capture_qkv(m, &batch, data[1] % in.layers, q, k, v) != EF_OK) abort();
    for (size_t i = 0; i < nqkv; i++)
        if (!isfinite(q[i]) || !isfinite(k[i]) || !isfinite(v[i])) abort();
    free(q), free(k), free(v);
    /* incremental decoding, where the layers have a state: sequence 0's logits again */
    ef_model_decoder *d = NULL;
    if (ef_model_decoder_new(&d, m) != EF_OK) {
        if (d || !ef_last_error()[0]) abort();
    } else {
        float *row = malloc((size_t)in.vocab * sizeof *row);
        for (int t = 0; t < lens[0]; t++) {
            if (ef_model_decode_step(d, tok[t], row) != EF_OK) abort();
            const float *want = logits + (size_t)t * in.vocab;
            double scale = 1, err = 0;
            for (int j = 0; j < in.vocab; j++) {
                scale = fmax(scale, fabs(want[j]));
                err = fmax(err, fabs((double)row[j] - want[j]));
            }
            if (!(err <= 1e-3 * scale)) abort(); /* rounding only: different summation orders */
        }
        if (ef_model_decoder_position(d) != lens[0]) abort();
        free(row);
        ef_model_decoder_free(d);
    }
    free(tok), free(tgt), free(logits);
    ef_model_free(m);
    return 0;
}
