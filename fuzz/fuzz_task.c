/*
 * fuzz_task.c - libFuzzer target: the task spec parser (ef_task_new, src/train/tasks.c) and the
 * text loader behind `text:FILE` (issue 14), then a few samples of the task.
 * Input: the spec, a NUL byte, then the bytes of a file. Every '@' in the spec is replaced by
 * the path of that file in a scratch folder (fuzz_util.h), so "text:@,len=8" reads it.
 * Skipped: specs with a '/' (no other files are read), and mnist specs without an '@' (the
 * installed Fashion-MNIST would be loaded: seconds per input; fuzz_idx covers the IDX reader).
 * Accepted spec: the canonical spec (ef_task_describe) makes a task with the same canonical
 * spec and info; samples of both splits (first, last, far indices) have lengths in 1 .. len,
 * tokens in [0, vocab), pad after the length, targets in range (-1 or a token id; a class),
 * a ListOps label equal to ef_listops_value of its tokens, and text targets the next token.
 * Rows longer than 2^16 positions are not sampled (legitimate, only slow).
 * Refused spec: a status and a message.
 * Build: `./run.sh fuzz`; corpus in fuzz/corpus/task.
 */
#include "fuzz_util.h"

#include "eformer.h"
#include "train/tasks.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { SPEC_CAP = 1024 };

static void check_sample(const ef_task *t, const ef_task_info *in, ef_split split, int64_t index,
                         int32_t *tok, int32_t *tgt) {
    int32_t len = -1;
    ef_status st = ef_task_sample(t, split, index, tok, &len, tgt);
    int in_range = index >= 0 && (split == EF_SPLIT_TRAIN || index < in->n_eval);
    if (st != EF_OK) {
        /* out of range, or a ListOps window the generator gives up on */
        if (!ef_last_error()[0] || (in_range && strcmp(in->kind, "listops"))) abort();
        return;
    }
    if (!in_range || len < 1 || len > in->len) abort();
    for (int i = 0; i < in->len; i++) {
        if (i < len && (tok[i] < 0 || tok[i] >= in->vocab)) abort();
        if (i >= len && tok[i] != in->pad) abort();
    }
    if (in->classes) {
        if (tgt[0] < 0 || tgt[0] >= in->classes) abort();
        int v = -1;
        if (!strcmp(in->kind, "listops") && (ef_listops_value(tok, len, &v) || v != tgt[0]))
            abort();
        return;
    }
    int scored = 0;
    for (int i = 0; i < in->len; i++) {
        if (tgt[i] < -1 || tgt[i] >= in->vocab || (i >= len && tgt[i] != -1)) abort();
        scored += tgt[i] >= 0;
        if (!strcmp(in->kind, "text") && i + 1 < len && tgt[i] != tok[i + 1]) abort();
    }
    if (!scored && strcmp(in->kind, "text")) abort(); /* every generated lm sample scores */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    size_t n = nul ? (size_t)(nul - data) : size;
    if (n >= SPEC_CAP || memchr(data, '/', n)) return 0;
    const char *file = fuzz_path("text");
    size_t fl = strlen(file);
    char spec[SPEC_CAP * 64];
    size_t k = 0;
    int at = 0;
    for (size_t i = 0; i < n; i++) {
        if (data[i] == '@')
            memcpy(spec + k, file, fl), k += fl, at = 1;
        else
            spec[k++] = (char)data[i];
    }
    spec[k] = 0;
    if (strstr(spec, "mnist") && !at) return 0;
    if (nul)
        fuzz_write(file, nul + 1, size - n - 1);
    else
        fuzz_write(file, "", 0);

    ef_task *t = NULL, *t2 = NULL;
    uint64_t seed = size;
    if (ef_task_new(&t, spec, seed) != EF_OK) {
        if (t || !ef_last_error()[0]) abort();
        return 0;
    }
    ef_task_info in, in2;
    ef_task_get_info(t, &in);
    if (ef_task_new(&t2, ef_task_describe(t), seed) != EF_OK ||
        strcmp(ef_task_describe(t), ef_task_describe(t2)) ||
        strcmp(ef_task_model_keys(t), ef_task_model_keys(t2)))
        abort();
    ef_task_get_info(t2, &in2);
    if (memcmp(&in, &in2, sizeof in) || in.vocab < 1 || in.len < 1 || in.max_len != in.len ||
        in.n_eval < 1 || in.n_train < 0 || in.classes < 0)
        abort();
    ef_task_free(t2);
    if (in.len <= 1 << 16) {
        int32_t *tok = malloc((size_t)in.len * sizeof *tok), *tgt = malloc((size_t)in.len * 4);
        int64_t idx[] = {0,
                         1,
                         in.n_eval - 1,
                         in.n_eval,
                         -1,
                         ((int64_t)1 << 48) - 1,
                         in.n_train ? in.n_train - 1 : 12345,
                         in.n_train ? in.n_train : 1 << 30};
        for (size_t i = 0; i < sizeof idx / sizeof *idx; i++) {
            check_sample(t, &in, EF_SPLIT_EVAL, idx[i], tok, tgt);
            check_sample(t, &in, EF_SPLIT_TRAIN, idx[i], tok, tgt);
        }
        free(tok), free(tgt);
    }
    ef_task_free(t);
    return 0;
}
