/*
 * fuzz_listops.c - libFuzzer target: the ListOps expression parser ef_listops_value and the
 * generator ef_listops_generate (issue 14). ListOps has no text form in eformer: samples are
 * token ids (tasks.h: PAD 0, digits 1..10, MIN MAX MED SM 11..14, CLOSE 15), so the input is a
 * token sequence.
 * Input: byte 0 chooses the mode.
 *   even: the other bytes are tokens (b < 0xf0: b % 16; above: ids outside the vocabulary).
 *     ef_listops_value must agree with an independent evaluator written here (an explicit
 *     stack, children's values sorted for the median): the same acceptance, the same value
 *     (0..9); a refusal is EF_ERR_FORMAT with a message.
 *   odd: bytes 1..10 are a seed, a stream and a window of lengths; one generated tree must
 *     be in the window, made of valid tokens, and evaluate to the generator's label.
 * Build: `./run.sh fuzz`; corpus in fuzz/corpus/listops.
 */
#include "eformer.h"
#include "train/tasks.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_TOKENS = 4096, MAX_NESTING = 256 }; /* tasks.c accepts nodes at depth <= 256 */

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* The value of tok[0..n) or -1 when it is not one well-formed expression. */
static int reference_value(const int32_t *tok, int n) {
    static int vals[MAX_TOKENS];    /* the values of the open operators' children, in order */
    static int open_op[MAX_TOKENS]; /* operator of each open node */
    static int open_at[MAX_TOKENS]; /* where its children start in vals */
    int depth = 0, nv = 0, root = -1;
    for (int i = 0; i < n; i++) {
        int t = tok[i], v;
        if (root >= 0) return -1; /* tokens after the end */
        if (t >= EF_LISTOPS_DIGIT0 && t < EF_LISTOPS_DIGIT0 + 10) {
            if (depth > MAX_NESTING) return -1;
            v = t - EF_LISTOPS_DIGIT0;
        } else if (t >= EF_LISTOPS_MIN && t <= EF_LISTOPS_SM) {
            if (depth > MAX_NESTING) return -1;
            open_op[depth] = t, open_at[depth] = nv, depth++;
            continue;
        } else if (t == EF_LISTOPS_CLOSE && depth > 0) {
            int op = open_op[--depth], *c = vals + open_at[depth], k = nv - open_at[depth];
            if (k == 0) return -1;
            qsort(c, (size_t)k, sizeof *c, cmp_int);
            int sum = 0;
            for (int j = 0; j < k; j++) sum += c[j];
            v = op == EF_LISTOPS_MIN   ? c[0]
                : op == EF_LISTOPS_MAX ? c[k - 1]
                : op == EF_LISTOPS_MED ? (c[(k - 1) / 2] + c[k / 2]) / 2
                                       : sum % 10;
            nv = open_at[depth];
        } else {
            return -1;
        }
        if (depth == 0)
            root = v;
        else
            vals[nv++] = v;
    }
    return depth == 0 ? root : -1;
}

static const int32_t odd_ids[16] = {-1,  16,      17, 255, 256, INT32_MIN, INT32_MAX, -16,
                                    -15, 1 << 16, 31, 32,  -2,  100,       1 << 30,   -(1 << 30)};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int32_t tok[MAX_TOKENS];
    if (size < 1) return 0;
    if (!(data[0] & 1)) {
        int n = (int)(size - 1 < MAX_TOKENS ? size - 1 : MAX_TOKENS);
        for (int i = 0; i < n; i++) {
            uint8_t b = data[1 + i];
            tok[i] = b < 0xf0 ? b % 16 : odd_ids[b - 0xf0];
        }
        int value = -7, want = reference_value(tok, n);
        ef_status st = ef_listops_value(tok, n, &value);
        if (st == EF_OK) {
            if (value != want || value < 0 || value > 9) abort();
        } else {
            if (want >= 0 || st != EF_ERR_FORMAT || !ef_last_error()[0]) abort();
        }
        return 0;
    }
    if (size < 11) return 0;
    uint64_t seed = 0, stream = 0;
    for (int i = 0; i < 4; i++) seed = seed << 8 | data[1 + i], stream = stream << 8 | data[5 + i];
    /* windows of 16 .. 143 lengths from below 128: each generation takes a few hundred trees at
     * most, where narrow windows far out take up to a million (LRA's own is 500 .. 2000) */
    int min_len = data[9] % 128, max_len = min_len + 16 + data[10] % 128;
    int len = -1, value = -1, check = -1;
    ef_listops_stats stats = {0};
    ef_status st = ef_listops_generate(seed, stream, min_len, max_len, tok, &len, &value, &stats);
    if (st != EF_OK) {
        if (!ef_last_error()[0]) abort();
        return 0;
    }
    if (len <= min_len || len >= max_len || value < 0 || value > 9 || stats.attempts < 1) abort();
    if (ef_listops_value(tok, len, &check) != EF_OK || check != value) abort();
    if (reference_value(tok, len) != value) abort();
    return 0;
}
