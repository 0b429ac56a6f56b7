/*
 * twin_dump.c - helper of bench/twin_check.py (not part of the library or its tests).
 *
 * Builds an eformer model (ef_model_new with train=1, seed 1) from SPEC, reads B*N token ids
 * from stdin, runs one forward with next-token targets (none at the last position), zero_grad
 * and backward, prints "loss L count C params P" and writes every tensor to OUT:
 *   one text line "name ndim d0 d1 numel\n", then numel fp32 parameters, then numel fp32
 *   gradients (native byte order; eformer's layout: linear weights are [in][out]).
 *
 * Build: cc -O2 -I include bench/twin_dump.c build/libeformer.so -Wl,-rpath,$PWD/build
 * Usage: twin_dump SPEC B N OUT < tokens
 */
#include <eformer.h>

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: twin_dump SPEC B N OUT < tokens\n");
        return 2;
    }
    const char *spec = argv[1], *path = argv[4];
    int B = atoi(argv[2]), N = atoi(argv[3]);
    if (B < 1 || N < 1) {
        fprintf(stderr, "twin_dump: B and N must be >= 1\n");
        return 2;
    }
    ef_model *m = NULL;
    ef_model_opts o = {.batch = B, .seed = 1, .train = 1};
    if (ef_model_new(&m, spec, &o)) {
        fprintf(stderr, "twin_dump: %s\n", ef_last_error());
        return 1;
    }
    size_t bn = (size_t)B * N;
    int32_t *tok = malloc(bn * sizeof *tok), *tgt = malloc(bn * sizeof *tgt);
    if (!tok || !tgt) return 1;
    for (size_t i = 0; i < bn; i++)
        if (scanf("%d", &tok[i]) != 1) {
            fprintf(stderr, "twin_dump: expected %zu token ids on stdin\n", bn);
            return 2;
        }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < N; t++)
            tgt[(size_t)b * N + t] = t + 1 < N ? tok[(size_t)b * N + t + 1] : -1;
    ef_model_batch in = {.batch = B, .len = N, .tokens = tok, .targets = tgt};
    ef_model_out out = {.logits = NULL};
    if (ef_model_forward(m, &in, &out)) {
        fprintf(stderr, "twin_dump: forward: %s\n", ef_last_error());
        return 1;
    }
    ef_model_zero_grad(m);
    if (ef_model_backward(m)) {
        fprintf(stderr, "twin_dump: backward: %s\n", ef_last_error());
        return 1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return 1;
    }
    const float *P = ef_model_params(m), *G = ef_model_grads(m);
    for (int i = 0; i < ef_model_tensor_count(m); i++) {
        ef_tensor_info t;
        ef_model_tensor(m, i, &t);
        fprintf(f, "%s %d %lld %lld %zu\n", t.name, t.ndim, (long long)t.shape[0],
                (long long)t.shape[1], t.numel);
        fwrite(P + t.offset, sizeof(float), t.numel, f);
        fwrite(G + t.offset, sizeof(float), t.numel, f);
    }
    if (fclose(f)) {
        perror(path);
        return 1;
    }
    printf("loss %.9g count %lld params %zu\n", out.loss, (long long)out.count,
           ef_model_param_count(m));
    free(tok);
    free(tgt);
    ef_model_free(m);
    return 0;
}
