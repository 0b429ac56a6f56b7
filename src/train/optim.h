/*
 * optim.h - optimisation of a model's flat parameter buffer (docs/training.md): AdamW with
 * decoupled weight decay, the learning-rate schedule, global-norm gradient clipping, gradient
 * accumulation over micro-batches, and the training checkpoint (model + optimizer state) from
 * which a resumed run continues bitwise identically to an uninterrupted one.
 *
 * Internal (src/train/): the command line (tools/) includes it and links the static library;
 * nothing here is in include/eformer.h. Everything works on the public ef_model_* calls
 * (ef_model_params / ef_model_grads / ef_model_param_floats / ef_model_tensor) and the
 * checkpoint machinery of src/model/params.h.
 *
 * Life cycle:
 *   ef_optim_opts oo = ef_optim_defaults();
 *   ef_sched_parse("cosine:lr=1e-3,warmup=100,total=10000", &oo.sched);
 *   oo.weight_decay = 0.01, oo.clip = 1.0, oo.accum = 2;
 *   ef_optim_new(&o, model, &oo);                   the model must be made with train=1
 *   for (...) ef_train_step(o, micro, 2, &rep);      zero_grad, forward + backward of each
 *                                                    micro-batch, then one AdamW update
 *   ef_train_save(o, "run.ckpt", meta, n_meta);      run.ckpt (model) + run.ckpt.opt (state)
 *   ...
 *   ef_train_resume(&model, &o, "run.ckpt", &mo, &oo);   both rebuilt, state restored
 *
 * Steps are numbered from 1: step t is the t-th update (Adam's t, the schedule's t).
 * Every result is bitwise identical whatever the thread count: the update is elementwise over
 * fixed blocks, and the gradient norm sums fixed parts in a fixed order.
 */
#ifndef EF_TRAIN_OPTIM_H
#define EF_TRAIN_OPTIM_H

#include "eformer.h"
#include "model/params.h"

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------------
 * Learning-rate schedule. Spec: KIND[:key=value,...], e.g. "cosine:lr=3e-4,warmup=500,total=20000"
 *   KIND = constant | cosine | rsqrt | linear
 *   lr=x [1e-3] (peak, reached at the end of warmup)  warmup=n [0]  total=n [0]
 *   min_lr=x [0] (cosine, linear: the rate at step total and after)
 * With W = warmup, T = total, t >= 1 the step (t < 1 is taken as 1):
 *   t < W:   lr(t) = lr * t / W                                          (linear warmup)
 *   t >= W:  constant  lr
 *            cosine    min_lr + (lr - min_lr) * (1 + cos(pi * u)) / 2,  u = min(1, (t-W)/(T-W))
 *            linear    lr + (min_lr - lr) * u
 *            rsqrt     lr * sqrt(max(W, 1) / t)   (LRA's "constant * linear_warmup *
 *                      rsqrt_decay": their learning_rate = lr * sqrt(W))
 * cosine and linear need T > W; constant and rsqrt ignore T and min_lr.
 * ------------------------------------------------------------------------------------------- */
typedef enum ef_sched_kind {
    EF_SCHED_CONSTANT = 0,
    EF_SCHED_COSINE,
    EF_SCHED_RSQRT,
    EF_SCHED_LINEAR,
} ef_sched_kind;

typedef struct ef_sched {
    ef_sched_kind kind;
    double lr, min_lr;     /* finite, >= 0 */
    int64_t warmup, total; /* >= 0 */
} ef_sched;

/* The defaults: constant, lr 1e-3, no warmup. */
ef_sched ef_sched_defaults(void);
/* Parses a schedule spec (above) into *out. EF_ERR_ARG naming an unknown kind or key or a bad
 * value (then *out is unchanged), EF_ERR_FORMAT for an item without '='. */
ef_status ef_sched_parse(const char *spec, ef_sched *out);
/* EF_ERR_ARG naming the bad field (negative or non-finite rates, negative steps, total <= warmup
 * for cosine and linear). */
ef_status ef_sched_check(const ef_sched *s);
/* The canonical spec, every key written (rates with 17 significant digits, so that parsing it
 * gives the identical schedule), into buf. EF_ERR_ARG when it does not fit in `size` bytes. */
ef_status ef_sched_describe(const ef_sched *s, char *buf, size_t size);
/* The learning rate of step t (the formulas above). */
double ef_sched_lr(const ef_sched *s, int64_t t);

/* ---------------------------------------------------------------------------------------------
 * Gradient norm and clipping (usable on any buffer; the optimizer applies the same rule)
 * ------------------------------------------------------------------------------------------- */
/* sqrt(sum g_i^2) accumulated in double: the buffer is cut into at most 256 parts of a size
 * that depends on n only (a multiple of 16, at least 4096 floats); each part is summed in
 * order (8 interleaved partial sums, added in a fixed order), the parts in order. The value
 * therefore depends on n and the data, never on the thread count. NaN or Inf in g gives a
 * non-finite norm. g may be NULL when n == 0. */
double ef_grad_norm(const float *g, size_t n);
/* Global-norm clipping: *norm = ef_grad_norm(g, n) (the norm before clipping); when clip > 0
 * and norm > clip, g_i *= clip / norm (as float), so the clipped norm is clip to rounding.
 * clip == 0 leaves g unchanged. EF_ERR_NUMERIC for a non-finite norm (g unchanged, *norm set),
 * EF_ERR_ARG for a negative or non-finite clip or NULL pointers. */
ef_status ef_clip_grad_norm(float *g, size_t n, double clip, double *norm);

/* ---------------------------------------------------------------------------------------------
 * AdamW (Loshchilov & Hutter; PyTorch's torch.optim.AdamW update, elementwise in fp32 with the
 * step's scalars computed in double). For step t with rate lr = lr(t), over every parameter
 * of every tensor (never the padding floats between tensors, which stay 0):
 *   g  = grad * s,    s = (1 / accum) * c,   c = min(1, clip / ||grad / accum||)  (c = 1 when
 *                                                                         clip == 0)
 *   p  = p * (1 - lr * wd)                     only for tensors with decay = 1 (ef_tensor_info)
 *   m  = beta1 * m + (1 - beta1) * g
 *   v  = beta2 * v + (1 - beta2) * g^2
 *   p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * m and v start at 0 and have the layout of the parameter buffer (ef_model_param_floats
 * floats, padding 0).
 *
 * Gradient accumulation: ef_model_backward gives the gradient of each micro-batch's MEAN loss
 * and adds it into ef_model_grads, so after `accum` micro-batches the buffer holds
 * sum_k grad(mean loss_k), and the update uses (1/accum) sum_k grad(mean loss_k): the gradient
 * of the average of the micro-batches' mean losses. That is the gradient of the mean loss of
 * the whole batch exactly when every micro-batch has the same number of counted targets (the
 * usual case: equal micro-batches of full sequences); otherwise a target of a small micro-batch
 * weighs more than one of a large micro-batch. A micro-batch without targets contributes a zero
 * gradient but still counts in 1/accum.
 * ------------------------------------------------------------------------------------------- */
typedef struct ef_optim_opts {
    ef_sched sched;      /* learning rate per step */
    double beta1, beta2; /* [0, 1): 0.9, 0.999 */
    double eps;          /* > 0: 1e-8 */
    double weight_decay; /* >= 0, decoupled, decay=1 tensors only: 0 */
    double clip;         /* global-norm clip of the averaged gradient, >= 0; 0 = none: 0 */
    int accum;           /* micro-batches per update, >= 1: 1 */
} ef_optim_opts;

/* The defaults above (ef_sched_defaults, no weight decay, no clipping, accum 1). */
ef_optim_opts ef_optim_defaults(void);
/* EF_ERR_ARG naming the bad field. */
ef_status ef_optim_check(const ef_optim_opts *o);
/* "adamw:beta1=..,beta2=..,eps=..,weight_decay=..,clip=..,accum=..;sched=<schedule spec>"
 * (17 significant digits) into buf; EF_ERR_ARG when it does not fit. */
ef_status ef_optim_describe(const ef_optim_opts *o, char *buf, size_t size);

typedef struct ef_optim ef_optim; /* the options, m, v, the step count; keeps a model pointer */

/* An optimizer for model m (which must outlive it and be made with train=1), step count 0,
 * m = v = 0. EF_ERR_ARG (NULL, a train=0 model, a bad option named), EF_ERR_NOMEM. */
ef_status ef_optim_new(ef_optim **out, ef_model *m, const ef_optim_opts *opts);
void ef_optim_free(ef_optim *o);
ef_model *ef_optim_model(const ef_optim *o);
const ef_optim_opts *ef_optim_get_opts(const ef_optim *o);
/* Updates made so far (0 for a new optimizer; restored by ef_train_load). */
int64_t ef_optim_steps(const ef_optim *o);
/* The moment buffers (ef_model_param_floats floats each), for inspection. */
const float *ef_optim_m(const ef_optim *o);
const float *ef_optim_v(const ef_optim *o);

typedef struct ef_optim_report {
    int64_t step;     /* the update just made, t >= 1 */
    double lr;        /* lr(t) */
    double grad_norm; /* ||grad / accum||, before clipping */
    double scale;     /* s: the factor the gradient buffer was multiplied by (1/accum * c) */
} ef_optim_report;

/* One update from the gradients in ef_model_grads (accumulated over opts.accum micro-batches;
 * they are read, not changed or zeroed). A non-finite gradient norm is EF_ERR_NUMERIC naming
 * the step and the first non-finite gradient (tensor and index); then nothing is changed: the
 * parameters, m, v and the step count are untouched. rep may be NULL; on the numeric error it
 * still receives the step, lr and norm. */
ef_status ef_optim_step(ef_optim *o, ef_optim_report *rep);

/* ---------------------------------------------------------------------------------------------
 * A training step with gradient accumulation
 * ------------------------------------------------------------------------------------------- */
typedef struct ef_train_report {
    ef_optim_report opt;
    double loss;            /* (1/accum) sum_k loss_k: the objective whose gradient was used */
    int64_t count, correct; /* summed over the micro-batches */
} ef_train_report;

/* ef_model_zero_grad; for each of the n_micro == opts.accum micro-batches ef_model_forward
 * (no logits) and, when it counted a target, ef_model_backward; then ef_optim_step. On a
 * failure (a bad batch: EF_ERR_ARG from the model; EF_ERR_NUMERIC) the parameters and the
 * optimizer state are unchanged, the gradient buffer holds whatever was accumulated. rep may
 * be NULL. */
ef_status ef_train_step(ef_optim *o, const ef_model_batch *micro, int n_micro,
                        ef_train_report *rep);

/* ---------------------------------------------------------------------------------------------
 * Training checkpoints: two safetensors files,
 *   PATH      the model, written by ef_model_save (loadable alone by ef_model_load);
 *   PATH.opt  the optimizer state: tensors "adam.m" and "adam.v" of shape [param_floats]
 *             (the parameter buffer's layout, padding included), metadata
 *               eformer.step          updates made ("%lld")
 *               eformer.spec          the model's canonical spec (checked on load)
 *               eformer.param_floats  ef_model_param_floats (checked on load)
 *               eformer.params_hash   FNV-1a 64 of the parameter buffer's 32-bit words, 16 hex
 *                                     digits: ties PATH.opt to the PATH written with it
 *               eformer.optim         ef_optim_describe of the options (information only:
 *                                     a run may resume with other options)
 *               eformer.version, format ("pt")
 *             and the caller's entries (data position, seeds, ...; keys starting with
 *             "eformer." and the key "format" are reserved).
 * Each file is replaced atomically (ef_ckpt_save); the pair is not: PATH.opt is written
 * first, then PATH, so a crash in between leaves a new PATH.opt beside an old PATH, which
 * ef_train_load refuses (the hash differs). Keep two checkpoint paths in turn when an
 * interrupted save must leave a loadable one.
 * ------------------------------------------------------------------------------------------- */
#define EF_TRAIN_OPT_SUFFIX ".opt"

/* Writes PATH.opt then PATH (above). EF_ERR_ARG (NULL, a reserved or bad metadata key),
 * EF_ERR_IO naming the path, EF_ERR_NOMEM, EF_ERR_UNSUPPORTED without cJSON. */
ef_status ef_train_save(const ef_optim *o, const char *path, const ef_ckpt_meta *meta, int n_meta);

/* Restores o's model parameters from PATH and m, v and the step count from PATH.opt. PATH.opt
 * is checked first, entirely (EF_ERR_FORMAT naming the problem: another param_floats or model
 * spec than o's model, a malformed or truncated file, a bad step), then PATH is loaded
 * (ef_model_load_params: same spec, every tensor checked before any is written), then the
 * parameters' hash is compared with PATH.opt's (EF_ERR_FORMAT: the files are from different
 * saves). The optimizer state changes only when everything succeeded; the parameters may
 * already hold PATH's values when only the hash check failed (or on an I/O error while
 * reading PATH). EF_ERR_IO, EF_ERR_NOMEM, EF_ERR_UNSUPPORTED without cJSON. */
ef_status ef_train_load(ef_optim *o, const char *path);

/* Resume in one call: *m = ef_model_load(PATH, mopts) (mopts NULL: batch 1, train 1; train
 * must be 1), *o = ef_optim_new(*m, oopts) (oopts NULL: ef_optim_defaults()), then the state of
 * PATH.opt as ef_train_load does. On failure both are NULL and nothing is leaked. The caller's
 * metadata: ef_train_read_meta. */
ef_status ef_train_resume(ef_model **m, ef_optim **o, const char *path, const ef_model_opts *mopts,
                          const ef_optim_opts *oopts);

/* The metadata value of `key` in PATH.opt (a malloc'd copy: ef_free() it). EF_ERR_FORMAT for a
 * missing key or a malformed file, EF_ERR_IO, EF_ERR_NOMEM. */
ef_status ef_train_read_meta(const char *path, const char *key, char **value);

#endif
