/*
 * tasks.h - training and evaluation tasks for the trainer (internal; docs/tasks.md).
 *
 * A task is made from a spec string in the attention and model specs' style,
 *   dup:len=1024,symbols=127        Reformer duplication, 0 w 0 w      causal LM
 *   copy:len=128,symbols=10         Katharopoulos et al. copy          causal LM
 *   recall:len=256,pairs=16,vocab=8192,power=0.01,noise=1   Zoology MQAR  causal LM
 *   listops[:n=0,eval=2000,min=500,max=2000]   LRA ListOps              10 classes
 *   text:FILE[,len=1024,heldout=0.05]   byte-level LM (vocab 256), bits per byte
 *   mnist[:DIR][,levels=256,side=28]          sequential pixels, 10 classes
 *   fashion-mnist[:DIR][,levels=256,side=32]  (padded to 32x32 = 1024 pixels)
 * and a seed. It says what the model needs (ef_task_info: vocab, head, row length, causal)
 * and fills ef_model_batch-compatible arrays.
 *
 * Splits and determinism: sample i of split s is a pure function of (canonical spec, seed, s,
 * i): generated tasks draw it from the counter-based generator with stream (purpose, split, i),
 * so the two splits are disjoint streams and a trainer's data position is just an index (resume
 * exactly by restarting at the index). Finite train sets (mnist, listops with n=N) are visited
 * in epochs, each a seeded permutation (a keyed Feistel bijection, no stored order): train index
 * i is item perm_e(i mod n) of epoch e = i / n. Eval indices run over 0 .. n_eval - 1 in order.
 * File data: text holds out the last part of the file; mnist evaluates on the t10k files.
 *
 * Objects are immutable after ef_task_new, so one task may serve several threads.
 */
#ifndef EF_TRAIN_TASKS_H
#define EF_TRAIN_TASKS_H

#include "eformer.h"

#include <stddef.h>
#include <stdint.h>

typedef enum ef_split { EF_SPLIT_TRAIN = 0, EF_SPLIT_EVAL = 1 } ef_split;

typedef struct ef_task ef_task; /* opaque */

typedef struct ef_task_info {
    const char *kind; /* "dup", "copy", "recall", "listops", "text", "mnist", "fashion-mnist" */
    int vocab;        /* token ids are in [0, vocab): the model's vocab= */
    int classes;      /* 0: head=lm (targets per position); K: head=cls:classes=K */
    int causal;       /* 1: a causal (next-token) model; 0: an encoder */
    int len;          /* N: positions per row of a batch (the longest sample) */
    int max_len;      /* the model's max_len= to use (= len) */
    int pad;          /* token written at positions >= lens[b] (never read by the model) */
    int64_t n_train;  /* distinct train samples; 0 = unbounded (every index a new sample) */
    int64_t n_eval;   /* eval samples: indices 0 .. n_eval - 1 */
} ef_task_info;

/* Makes the task of `spec` (see above and docs/tasks.md) with `seed`; files are read here.
 * Errors: EF_ERR_ARG naming the bad key or value (unknown task, unknown key, value out of
 * range), EF_ERR_IO naming a file that cannot be read, EF_ERR_FORMAT naming a malformed file
 * and what is wrong, EF_ERR_UNSUPPORTED (mnist in a build without zlib), EF_ERR_NOMEM. */
ef_status ef_task_new(ef_task **out, const char *spec, uint64_t seed);
void ef_task_free(ef_task *t);
/* The canonical spec, every key filled in (owned by t); ef_task_new of it with the same seed
 * gives the same samples. */
const char *ef_task_describe(const ef_task *t);
/* The model spec keys the task fixes, e.g. "vocab=128,max_len=1024,head=lm" or
 * "vocab=16,max_len=2000,head=cls:classes=10" (owned by t). Causality belongs to the attention
 * specs: add causal=1 to them when info.causal. */
const char *ef_task_model_keys(const ef_task *t);
void ef_task_get_info(const ef_task *t, ef_task_info *info);

/* Sample `index` of `split` (train: index >= 0; eval: 0 <= index < n_eval):
 *   tokens  [info.len]  ids; positions >= *len hold info.pad
 *   len     the valid positions (1 .. info.len)
 *   targets lm:  [info.len] the id to predict at each position, -1 = not scored (positions
 *                >= *len are -1);  cls: [1] the class.
 * Errors: EF_ERR_ARG (index out of range, NULL pointer), EF_ERR_NOMEM. */
ef_status ef_task_sample(const ef_task *t, ef_split split, int64_t index, int32_t *tokens,
                         int32_t *len, int32_t *targets);
/* Samples first .. first + batch - 1 of `split` into ef_model_batch arrays:
 * tokens [batch][info.len], lens [batch], targets lm [batch][info.len] / cls [batch]. */
ef_status ef_task_batch(const ef_task *t, ef_split split, int64_t first, int batch, int32_t *tokens,
                        int32_t *lens, int32_t *targets);

/* Bits per byte (or per token) of a mean cross-entropy in nats: loss / ln 2. */
double ef_bits_per_byte(double loss_nats);

/* ---------------------------------------------------------------------------------------------
 * ListOps (LRA), exposed for the tests. Token ids: */
enum {
    EF_LISTOPS_PAD = 0,
    EF_LISTOPS_DIGIT0 = 1, /* digit d is 1 + d */
    EF_LISTOPS_MIN = 11,
    EF_LISTOPS_MAX = 12,
    EF_LISTOPS_MED = 13,
    EF_LISTOPS_SM = 14,
    EF_LISTOPS_CLOSE = 15,
    EF_LISTOPS_VOCAB = 16
};
/* The value of the expression `tokens` [n] (a digit, or OP args... CLOSE nested), computed by
 * parsing it: MIN, MAX, MED (median; of an even count the floor of the mean of the middle two),
 * SM (sum mod 10). EF_ERR_FORMAT naming the position of a malformed expression. */
ef_status ef_listops_value(const int32_t *tokens, int n, int *value);
/* One accepted tree drawn from (seed, stream): LRA's generator (root at depth 1; below depth
 * 10 a node is an operator with probability 0.25 with randint(2, 10) children, else a digit),
 * trees drawn until min_len < length < max_len. tokens needs max_len - 1 entries. *value is
 * the label computed while generating; *attempts counts the trees drawn (>= 1). */
typedef struct ef_listops_stats {
    int64_t attempts;
} ef_listops_stats;
ef_status ef_listops_generate(uint64_t seed, uint64_t stream, int min_len, int max_len,
                              int32_t *tokens, int *len, int *value, ef_listops_stats *stats);

/* ---------------------------------------------------------------------------------------------
 * Data files (data.c) */
/* An IDX file of unsigned bytes: magic 0x00000801 (ndim 1, labels) or 0x00000803 (ndim 3,
 * images [n][rows][cols]), big-endian dims, then the data; read plain or gzipped through zlib. */
typedef struct ef_idx {
    int ndim;
    int64_t dims[3];
    size_t bytes; /* the product of dims */
    uint8_t *data;
} ef_idx;
/* Reads `path` and checks it is an IDX file of `want_ndim` dims (1 or 3) whose data length
 * matches its dims exactly. EF_ERR_IO (cannot open / read, naming the path), EF_ERR_FORMAT
 * (wrong magic, bad dims, truncated, trailing bytes: the message names the file and the
 * problem), EF_ERR_UNSUPPORTED (built without zlib). */
ef_status ef_idx_read(const char *path, int want_ndim, ef_idx *out);
void ef_idx_free(ef_idx *x);

/* An image set: images [n][rows][cols] and labels [n] < 10. */
typedef struct ef_image_set {
    int64_t n;
    int rows, cols;
    uint8_t *images, *labels;
} ef_image_set;
/* Loads DIR/PREFIX-images-idx3-ubyte and DIR/PREFIX-labels-idx1-ubyte, each plain or with
 * ".gz" (PREFIX "train" or "t10k"); checks that the counts agree and every label is < 10. */
ef_status ef_image_set_load(const char *dir, const char *prefix, ef_image_set *out);
void ef_image_set_free(ef_image_set *s);

/* The whole file `path` in memory (malloc'd; *bytes its length). EF_ERR_IO naming the path. */
ef_status ef_file_read(const char *path, uint8_t **data, size_t *bytes);

#endif
