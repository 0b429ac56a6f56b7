/*
 * eformer.h - the only public header of eformer, efficient attention on the CPU.
 *
 * Conventions (they hold for every function below):
 *   - Functions that can fail return an ef_status. On failure ef_last_error() returns a
 *     thread-local message naming the bad value; the library never prints, exits or aborts.
 *   - Tensors are fp32, row-major and contiguous. Attention tensors use PyTorch's B,H,N,D order:
 *       q   [batch][heads][q_len][head_dim]
 *       k   [batch][heads][kv_len][head_dim]
 *       v   [batch][heads][kv_len][v_dim]
 *       out [batch][heads][q_len][v_dim]
 *   - Objects are opaque handles created by *_new and released by *_free; *_free(NULL) is a no-op.
 *   - The caller owns every buffer it passes; the library keeps no pointer to them after a call.
 *   - A plan owns its workspace, so one plan serves one call at a time; plans are independent
 *     (use one plan per thread to run attention from several threads).
 */
#ifndef EFORMER_H
#define EFORMER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EF_API
#else
#define EF_API __attribute__((visibility("default")))
#endif

#define EF_VERSION_MAJOR 0
#define EF_VERSION_MINOR 1
#define EF_VERSION_PATCH 0
EF_API const char *ef_version(void); /* "0.1.0" */

/* ---------------------------------------------------------------------------------------------
 * Status and errors
 * ------------------------------------------------------------------------------------------- */
typedef enum ef_status {
    EF_OK = 0,
    EF_ERR_ARG,         /* a bad argument: NULL pointer, value out of range, bad spec value */
    EF_ERR_SHAPE,       /* tensor sizes that do not fit together or the plan */
    EF_ERR_NOMEM,       /* an allocation failed */
    EF_ERR_IO,          /* a file could not be read or written */
    EF_ERR_FORMAT,      /* malformed text or file (spec string syntax, checkpoint) */
    EF_ERR_UNSUPPORTED, /* a valid request this build or mechanism cannot do; the message says why */
    EF_ERR_NUMERIC      /* a non-finite value where a finite one is required */
} ef_status;

/* A short constant name for a status ("EF_ERR_ARG"); unknown values give "EF_ERR_UNKNOWN". */
EF_API const char *ef_status_str(ef_status s);
/* Detail of the last failure in the calling thread ("" if none). Valid until the next failing
 * call in the same thread. */
EF_API const char *ef_last_error(void);

/* ---------------------------------------------------------------------------------------------
 * Memory, threads, random numbers
 * ------------------------------------------------------------------------------------------- */
/* 64-byte-aligned allocation; ef_free(NULL) is a no-op. Returns NULL (and sets the error) on
 * failure or when bytes == 0. */
EF_API void *ef_malloc(size_t bytes);
EF_API void ef_free(void *p);

/* Threads used by every parallel loop of the library (and by the BLAS it calls). n <= 0 selects
 * the machine default (the number of online processors, or OMP_NUM_THREADS when set).
 * Determinism: for identical inputs, options and seeds, every mechanism (ef_attn_caps
 * .deterministic, all of them today), a model's forward and backward and a whole training step
 * (the trainer's ef_train_step, src/train/optim.h, clipping and AdamW included) give bitwise
 * identical results on every run, on every plan or model made with the same spec and seed, and
 * at any thread count (tested at 1, 2 and 4 threads: tests/test_props.c, tests/test_optim.c). Work is split into items of fixed
 * extent, each done by one thread in a fixed order, and partial sums are combined in a fixed
 * order. The same binary on the same CPU is assumed: another build or GEMM library (oneDNN,
 * OpenBLAS, the built-in kernel) may round differently. */
EF_API void ef_set_num_threads(int n);
EF_API int ef_get_num_threads(void);

/* Counter-based random numbers (Philox4x32-10). Element i of a draw depends only on
 * (seed, stream, offset + i): any thread can regenerate any part of any draw, in any order.
 * uniform: [0,1) with 24 random bits; normal: standard Gaussian (Box-Muller on pairs, so
 * element i uses the uniform pair of index (offset + i) / 2). */
EF_API void ef_rng_uniform(uint64_t seed, uint64_t stream, uint64_t offset, size_t n, float *out);
EF_API void ef_rng_normal(uint64_t seed, uint64_t stream, uint64_t offset, size_t n, float *out);
/* Four raw 32-bit words for counter `ctr`. */
EF_API void ef_rng_raw(uint64_t seed, uint64_t stream, uint64_t ctr, uint32_t out[4]);

/* ---------------------------------------------------------------------------------------------
 * Dense products
 * ------------------------------------------------------------------------------------------- */
/* Row-major C[m][n] = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T (trans_* = 0 or 1).
 * op(A) is m x k, op(B) is k x n. Uses the fastest BLAS found at run time (see ef_blas_get_info),
 * or the built-in portable kernel. beta == 0 ignores the previous content of C (NaN included).
 * The one exception to "results never depend on the thread count": an external BLAS (oneDNN,
 * OpenBLAS, BLIS) may split one product by its thread count and sum in another order, so the
 * last bits of C may differ between thread counts. The attention mechanisms and layers do not
 * inherit this: they call products in fixed single-threaded blocks. */
EF_API ef_status ef_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const float *a, int lda, const float *b, int ldb, float beta, float *c,
                          int ldc);

typedef struct ef_blas_info {
    const char *name;   /* "openblas", "blis", "builtin", ... */
    const char *kernel; /* the kernel family in use ("SkylakeX", "Haswell", "avx512", "generic") */
    const char *detail; /* how it was chosen (library path, environment) */
} ef_blas_info;
EF_API void ef_blas_get_info(ef_blas_info *info);

/* ---------------------------------------------------------------------------------------------
 * Attention
 *
 * A mechanism is named by a spec string `name[:key=value,...]`, e.g. "flash:causal=1".
 * Options every mechanism takes:
 *   causal=0|1    query i sees key j only when j <= i (top-left aligned)          default 0
 *   scale=auto|x  logit scale; auto = 1/sqrt(head_dim)                            default auto
 *   seed=n        seed of every random draw the mechanism makes (0..2^64-1)      default 0
 *   ref=0|1       run the mechanism's slow, obviously-correct reference path      default 0
 * `eformer info --mechanisms` (or ef_attn_help) lists the mechanisms and their own options.
 *
 * The contract every mechanism keeps (tests/test_props.c checks it for every registered one):
 *   - causal=1 is strict: no output row, and no gradient it produces, depends on a later
 *     position through any route (hash buckets, chunk composition, clusters, landmarks). A
 *     mechanism that cannot keep that refuses causal=1 at ef_attn_new with the reason.
 *   - Key padding is io->kv_lens (keys j >= kv_lens[b] are invisible); query padding is
 *     io->q_lens (rows i >= q_lens[b] output zeros, get zero gradients, and never influence
 *     another row: landmarks, centroids, clusters and hash sorts exclude them). The content of
 *     padded positions (q rows, k and v rows, dout rows) is never read into a valid result:
 *     NaN or Inf there changes nothing. A query row that sees no key outputs zeros and gets
 *     zero gradients.
 *   - Where its discrete choices (hash buckets, clusters, top-k sets, made from the inputs)
 *     are fixed, a mechanism's output is a smooth function of q, k, v and its parameters, and
 *     backward is the exact derivative of that function.
 *   - Results are bitwise identical for identical inputs, whatever the thread count.
 *   NaN or Inf at a valid (unpadded) position is an invalid input: it may reach other rows (0*NaN
 *   in a masked product), and nothing above is promised for it. For mechanisms whose pattern
 *   depends on the data (lsh), ef_attn_visible reports only the causal rule and
 *   ef_attn_visible_pairs an upper bound.
 * ef_attn_get_caps says which of the optional abilities a mechanism has.
 * ------------------------------------------------------------------------------------------- */
typedef struct ef_attn_shape {
    int batch, heads, q_len, kv_len, head_dim, v_dim;
} ef_attn_shape;

typedef struct ef_attn ef_attn; /* opaque plan */

/* Parses `spec`, checks it against `shape`, allocates the plan's workspace and parameters.
 * Errors: EF_ERR_ARG (unknown mechanism or key, bad value), EF_ERR_FORMAT (spec syntax),
 * EF_ERR_SHAPE (a size < 1 or > 2^30, a tensor beyond 2^48 elements, B*H*N*M beyond 4e18),
 * EF_ERR_UNSUPPORTED (a combination the mechanism cannot do), EF_ERR_NOMEM (docs/hostile.md).
 * *out is NULL on failure. */
EF_API ef_status ef_attn_new(ef_attn **out, const char *spec, const ef_attn_shape *shape);
EF_API void ef_attn_free(ef_attn *a);
/* The canonical spec with every option filled in; parsing it gives the same plan. Owned by a. */
EF_API const char *ef_attn_describe(const ef_attn *a);
/* The shape the plan was made for. */
EF_API ef_attn_shape ef_attn_get_shape(const ef_attn *a);

typedef struct ef_attn_io {
    const float *q, *k, *v;
    const int32_t *kv_lens; /* [batch] valid keys per sequence (key padding), NULL = all */
    float *out;
    const int32_t *q_lens; /* [batch] valid queries per sequence (query padding), NULL = all */
} ef_attn_io;

/* What a mechanism can do, so that callers (the model, the arena, bindings) can ask instead of
 * trying: each field is 1 or 0. */
typedef struct ef_attn_caps {
    int causal;        /* accepts causal=1 and keeps it strictly (see the contract above) */
    int cross;         /* accepts q_len != kv_len */
    int decode;        /* incremental decoding (ef_attn_state_new / ef_attn_step) with causal=1 */
    int params;        /* has learned parameters (ef_attn_params) */
    int exact;         /* computes exact softmax attention over the pairs ef_attn_visible names */
    int random;        /* draws random numbers from its seed (features, rotations, blocks) */
    int discrete;      /* makes discrete choices from q or k (hash buckets, clusters, top-k): its
                        * output is smooth only where none of them flips */
    int deterministic; /* bitwise identical results for identical inputs at any thread count */
    int shared_qk;     /* derives its keys from q and ignores io->k (dk is 0): Reformer's lsh */
} ef_attn_caps;
/* Fills *caps for mechanism `name`. EF_ERR_ARG for an unknown name or a NULL argument. */
EF_API ef_status ef_attn_get_caps(const char *name, ef_attn_caps *caps);

/* Bytes forward keeps for backward. The caller allocates `saved` of this size, aligned to
 * EF_SAVED_ALIGN bytes (ef_malloc gives that); forward and backward refuse a misaligned buffer.
 * Forward writes every byte of it. */
#define EF_SAVED_ALIGN 64
EF_API size_t ef_attn_saved_bytes(const ef_attn *a);
/* Bytes the plan owns: its workspace (allocated by ef_attn_new, reused by every call) plus the
 * storage of learned parameters and their gradients. */
EF_API size_t ef_attn_workspace_bytes(const ef_attn *a);
/* Analytic floating-point operation count of one forward (backward = 0) or forward+backward
 * (backward = 1) pass, as `eformer bench` reports it: per visible pair 2(D+Dv) forward and
 * 2(4D+3Dv) forward+backward (4NMD and 14NMD for dense attention with D = Dv). */
EF_API double ef_attn_flops(const ef_attn *a, int backward);

/* The pattern of a plan: 1 when query i of `head` may see key j (the mechanism's pattern and
 * the causal rule; key padding is given per call and is not included), 0 when not, -1 (with the
 * error set) for a NULL plan or an index out of range. Exact attention sees every pair (or the
 * causal triangle). */
EF_API int ef_attn_visible(const ef_attn *a, int head, int i, int j);
/* Visible (query, key) pairs of one head over the q_len x kv_len grid (at most q_len * kv_len;
 * an upper bound where the pattern depends on the data); -1 on bad arguments. For the exact
 * mechanisms ef_attn_flops counts work on these pairs only; the others count their own work. */
EF_API int64_t ef_attn_visible_pairs(const ef_attn *a, int head);

/* out = attention(q, k, v). `saved` = NULL for inference, else a buffer of
 * ef_attn_saved_bytes(a) bytes that backward will read. */
EF_API ef_status ef_attn_forward(ef_attn *a, const ef_attn_io *io, void *saved);
/* A forward that reuses the discrete choices (LSH buckets, cluster assignments, top-k sets)
 * that an earlier training forward of this plan wrote into `saved`, instead of making them
 * again from io: a reversible layer's recomputation, whose inputs differ from the original ones
 * by rounding, then attends exactly as the original forward did. `saved` must hold such a
 * forward's record; it is rewritten as a forward would write it, with the same choices.
 * A replay also attends with the random draw the record names (performer's `redraw` moves on
 * between training forwards) and does not count as a training forward. Mechanisms with nothing
 * to reproduce run ef_attn_forward. */
EF_API ef_status ef_attn_forward_replay(ef_attn *a, const ef_attn_io *io, void *saved);
/* Gradients for the forward call that filled `saved` (same io, including io->out, which holds
 * that call's output and is read, not written). dq, dk, dv are overwritten;
 * gradients of learned parameters accumulate into ef_attn_param_grads. */
EF_API ef_status ef_attn_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                  const float *dout, float *dq, float *dk, float *dv);

/* Incremental decoding for the causal kernel mechanisms (linear, performer with causal=1): a
 * state holds what the prefix contributes (O(features x v_dim) per batch and head), and each
 * ef_attn_step appends one position to every (batch, head) and returns its output, equal to
 * row t of the causal forward on the whole sequence (up to rounding). Other mechanisms, and
 * causal=0, give EF_ERR_UNSUPPORTED. Tensors: q [batch][heads][head_dim],
 * k [batch][heads][head_dim], v [batch][heads][v_dim], out [batch][heads][v_dim]. The plan
 * must outlive its states; a plan and its states are used from one thread at a time. */
typedef struct ef_attn_state ef_attn_state;
EF_API ef_status ef_attn_state_new(ef_attn_state **out, const ef_attn *a);
EF_API void ef_attn_state_free(ef_attn_state *st);
EF_API ef_status ef_attn_state_reset(ef_attn_state *st); /* back to the empty prefix */
EF_API int64_t ef_attn_state_position(const ef_attn_state *st); /* positions consumed; -1 if NULL */
EF_API ef_status ef_attn_step(ef_attn *a, ef_attn_state *st, const float *q, const float *k,
                              const float *v, float *out);

/* The random projections a mechanism draws from its seed, for checking it against its formula
 * (docs/kernel.md): performer's W [features][head_dim], one matrix for every head, of the
 * plan's current draw (the one an inference forward uses; with redraw=n a training forward may
 * move to the next draw first). *count receives the number of floats; out (NULL: only the
 * count) receives them when n >= *count (EF_ERR_ARG otherwise). EF_ERR_UNSUPPORTED for a
 * mechanism without such projections. */
EF_API ef_status ef_attn_random_features(const ef_attn *a, float *out, size_t n, size_t *count);

/* Learned parameters of the mechanism (none for exact attention: count 0, pointers NULL). */
EF_API size_t ef_attn_param_count(const ef_attn *a);
EF_API float *ef_attn_params(ef_attn *a);
EF_API float *ef_attn_param_grads(ef_attn *a);

/* The registry: mechanisms by index (0 .. ef_attn_count()-1); NULL past the end. */
EF_API int ef_attn_count(void);
EF_API const char *ef_attn_name(int i);
/* A multi-line description of a mechanism and its options with defaults; NULL if unknown. */
EF_API const char *ef_attn_help(const char *name);


/* ---------------------------------------------------------------------------------------------
 * The Transformer model (docs/model.md)
 *
 * A model is described by a spec string of comma-separated key=value items, in the attention
 * spec's style, e.g.
 *   layers=6,dim=256,heads=4,ff=1024,vocab=256,max_len=4096,pos=axial,
 *   attn=local:window=128|lsh:hashes=4,reversible=1,chunks=4,head=lm
 * Keys (defaults in brackets):
 *   layers=L [2]  dim=C [256]  heads=H [4] (C % H == 0)  ff=F [4C]  vocab=V [256]
 *   max_len=N [1024]  ln_eps=e [1e-5] (layer norms)
 *   pos=sinusoidal|learned|axial|none [sinusoidal] (sinusoidal: x = embed * sqrt(dim) + pos, as
 *     Vaswani et al.; the others x = embed + pos); axial: axial_shape=n1xn2 (n1 n2 >= max_len,
 *     default n2 = the power of two nearest sqrt(max_len)), axial_dims=d1xd2 (d1 + d2 = C,
 *     default d1 = C/4)
 *   attn=SPEC|SPEC|... [flash]: attention specs used by layers 0, 1, 2, ... in turn (Reformer
 *     alternates local and lsh layers). The items after attn= that are not model keys belong
 *     to the attention spec before them: attn=local:window=128,causal=1,layers=4 gives every
 *     layer "local:window=128,causal=1". Every layer gets its own seed (seed=model seed + layer
 *     index) unless its spec names one. All specs must agree on causal: with causal=1 the model
 *     is a causal (autoregressive) model, without it an encoder.
 *   reversible=0|1 [0]: RevNet layers (Reformer): the stack's input is (x, x), its output
 *     concat(y1, y2) [2C]; activations are recomputed in backward instead of stored, so the
 *     memory kept for backward does not grow with depth. 0: pre-LN residual layers.
 *   chunks=k [1]: the feed-forward layers process each sequence in k chunks of positions.
 *   head=lm [lm]: logits over the vocabulary at every position;
 *   head=cls:classes=K,pool=first|mean: K logits per sequence from the first or the mean of
 *     the valid positions' final features.
 * A model is made for calls of at most `batch` sequences of at most max_len positions (its
 * workspace, attention plans and saved-activation buffers are sized for that at creation).
 * The attention plans are made for max_len positions, so mechanisms whose structure depends on
 * the length (linformer's [k][N] projections, lsh's buckets=auto) compute the same function for
 * every call; shorter calls are padded. Set max_len to the length you train at.
 * Padding: lens[b] valid tokens per sequence; padded positions are never read (token ids
 * there may be anything) and change no logit, loss or gradient of a valid position.
 * Parameters are one contiguous fp32 buffer of named tensors ("layers.3.attn.q.weight");
 * gradients are a second buffer of the identical layout. Linear weights are [in][out]
 * (the transpose of PyTorch's nn.Linear.weight). Results are bitwise identical for identical
 * inputs whatever the thread count.
 * ------------------------------------------------------------------------------------------- */
typedef struct ef_model ef_model; /* opaque */

typedef struct ef_model_opts {
    int batch;     /* most sequences per call (>= 1; 0 = 1) */
    uint64_t seed; /* parameter initialisation and the attention layers' seeds */
    int train;     /* 1: gradients and the buffers backward needs are allocated; 0: inference */
} ef_model_opts;

/* Builds a model from `spec` and initialises its parameters from opts->seed (opts NULL: all
 * defaults). Errors: EF_ERR_ARG / EF_ERR_FORMAT naming the bad key or value, EF_ERR_SHAPE,
 * EF_ERR_UNSUPPORTED (an attention spec the model cannot use, e.g. a mechanism that cannot
 * recompute exactly in a reversible layer, or mixed causal flags), EF_ERR_NOMEM. */
EF_API ef_status ef_model_new(ef_model **out, const char *spec, const ef_model_opts *opts);
EF_API void ef_model_free(ef_model *m);
/* The canonical spec, every key filled in (the attention specs canonical too); parsing it gives
 * the same model. Owned by m. */
EF_API const char *ef_model_describe(const ef_model *m);

typedef struct ef_model_info {
    int layers, dim, heads, ff, vocab, max_len;
    int classes;    /* 0 for head=lm */
    int causal;     /* 1 when every layer's attention is causal */
    int reversible; /* 1 for RevNet layers */
    int batch, len; /* the most a call may have: opts.batch and max_len */
    int train;
} ef_model_info;
EF_API ef_status ef_model_get_info(const ef_model *m, ef_model_info *info);

/* One call's input. */
typedef struct ef_model_batch {
    int batch, len;         /* 1 .. the model's batch and max_len */
    const int32_t *tokens;  /* [batch][len] ids in [0, vocab) (read at valid positions only) */
    const int32_t *lens;    /* [batch] valid positions per sequence (0 .. len; an empty
                             * sequence has no loss and, for cls, zero logits); NULL = all len */
    const int32_t *targets; /* head=lm: [batch][len] the id to predict at each position (for a
                             * next-token model tokens[b][t+1]), -1 = no loss there; read at
                             * valid positions only. head=cls: [batch] class ids, -1 = none.
                             * NULL = no loss (then ef_model_backward refuses). */
    int no_grad;            /* 1: an evaluation forward on a train=1 model: nothing is kept for
                             * backward and it does not count as a training forward (performer's
                             * `redraw` schedule does not advance). 0 (default): with targets, a
                             * train=1 model keeps what ef_model_backward needs. */
} ef_model_batch;

typedef struct ef_model_out {
    float *logits;   /* in: the caller's buffer, or NULL (not written: the lm head then never
                      * holds all logits at once). lm: [batch][len][vocab] (padded rows 0);
                      * cls: [batch][classes] (rows of sequences with lens 0 are 0) */
    double loss;     /* out: mean cross-entropy in nats over the counted targets (0 if none) */
    int64_t count;   /* out: targets counted */
    int64_t correct; /* out: counted targets whose largest logit is the target's (ties: the
                      * smallest id wins) */
} ef_model_out;

/* Runs the model on `in`. With targets (and no_grad 0), a model made with train=1 keeps what
 * ef_model_backward needs. Errors: EF_ERR_ARG (a token or target outside its range, lens, sizes
 * beyond the model's, NULL pointers; the message names the index and value). */
EF_API ef_status ef_model_forward(ef_model *m, const ef_model_batch *in, ef_model_out *out);
/* Gradients of the last forward's mean loss with respect to every parameter, ACCUMULATED into
 * ef_model_grads (zero them with ef_model_zero_grad). Needs a train=1 model and a forward with
 * targets since the last backward (EF_ERR_ARG otherwise). */
EF_API ef_status ef_model_backward(ef_model *m);
/* The queries, keys and values the attention of layer `layer` (0-based) computes on `in`: an
 * evaluation forward (no loss, nothing kept for backward, no state advanced: in->targets and
 * in->no_grad are ignored) that copies them out. q, k, v are [in->batch][heads][in->len]
 * [dim / heads] floats each; rows past a sequence's length are 0. A shared-QK layer (lsh) has no
 * keys of its own: k receives q. EF_ERR_ARG for a NULL pointer, a layer out of range or a
 * batch ef_model_forward refuses; EF_ERR_NOMEM. (`eformer arena --inputs model:FILE`.) */
EF_API ef_status ef_model_capture_qkv(ef_model *m, const ef_model_batch *in, int layer, float *q,
                                      float *k, float *v);

/* Incremental decoding of a causal head=lm model whose every layer's attention has a decoding
 * state (linear and performer with causal=1; ef_attn_get_caps().decode): each step appends one
 * token of sequence 0 and writes its logits [vocab], the full forward's logits at that position
 * up to rounding, in O(layers x (dim^2 + dim x ff + features x head_dim)) per token instead of
 * recomputing the prefix. Positions 0 .. max_len - 1. The decoder reads the model's parameters
 * at every step (change them and the next steps use the new values) and must not outlive it;
 * one decoder per model at a time, from one thread. Errors: EF_ERR_UNSUPPORTED naming the
 * first layer without a decoding state (or a classifier / an encoder), EF_ERR_ARG (a token
 * outside [0, vocab), a position past max_len), EF_ERR_NOMEM. */
typedef struct ef_model_decoder ef_model_decoder;
EF_API ef_status ef_model_decoder_new(ef_model_decoder **out, ef_model *m);
EF_API void ef_model_decoder_free(ef_model_decoder *d);
EF_API ef_status ef_model_decoder_reset(ef_model_decoder *d);            /* back to position 0 */
EF_API int64_t ef_model_decoder_position(const ef_model_decoder *d);     /* tokens consumed */
EF_API ef_status ef_model_decode_step(ef_model_decoder *d, int32_t token, float *logits);

/* Parameters: the flat buffers (ef_model_param_floats floats each, 64-byte aligned; the floats
 * between tensors are 0 and stay 0 under any elementwise update) and the named tensors in them. */
EF_API size_t ef_model_param_count(const ef_model *m);  /* learned parameters */
EF_API size_t ef_model_param_floats(const ef_model *m); /* buffer length (with the padding) */
EF_API float *ef_model_params(ef_model *m);
EF_API float *ef_model_grads(ef_model *m); /* NULL for train=0 */
EF_API void ef_model_zero_grad(ef_model *m);

typedef struct ef_tensor_info {
    const char *name; /* owned by the model */
    int ndim;
    int64_t shape[4]; /* shape[ndim..] = 1 */
    size_t numel;
    size_t offset; /* in floats from ef_model_params (and ef_model_grads) */
    int decay;     /* 1 for the matrices of linear layers and the embedding (weight decay
                    * applies by convention), 0 for biases, norms' gains, position tables and
                    * the attention mechanisms' own parameters (layers.L.attn.mech) */
} ef_tensor_info;
EF_API int ef_model_tensor_count(const ef_model *m);
/* Tensor i (0 .. ef_model_tensor_count - 1), in buffer order. EF_ERR_ARG out of range. */
EF_API ef_status ef_model_tensor(const ef_model *m, int i, ef_tensor_info *t);
/* The tensor called `name`. EF_ERR_ARG naming an unknown name. */
EF_API ef_status ef_model_find(const ef_model *m, const char *name, ef_tensor_info *t);

/* Memory the model holds, in bytes, for its batch and max_len. */
typedef struct ef_model_bytes {
    size_t params;    /* the parameter buffer */
    size_t grads;     /* the gradient buffer (0 for train=0) */
    size_t saved;     /* kept from forward for backward: residual layers keep every layer's
                       * activations; reversible layers the final pair and each attention
                       * layer's record (buckets, log-sum-exps) */
    size_t workspace; /* activations and scratch shared by the layers, the attention plans' own */
    size_t total;     /* the sum: what a training step holds at its peak */
} ef_model_bytes;
EF_API ef_status ef_model_get_bytes(const ef_model *m, ef_model_bytes *bytes);

/* Analytic operation count of one forward (backward = 0) or forward + backward (1) of a full
 * call (batch x max_len valid positions): the dense layers 2 x multiply-adds
 * (backward twice forward), the attention ef_attn_flops. Recomputation by reversible layers is
 * not counted (the same model computes the same function). */
EF_API double ef_model_flops(const ef_model *m, int backward);
/* The attention mechanisms' part of ef_model_flops (ef_attn_flops of every layer); the rest is
 * the dense layers' (projections, feed-forward, head). */
EF_API double ef_model_attn_flops(const ef_model *m, int backward);

/* Time spent inside the attention mechanisms (ef_attn_forward / _replay / _backward) and in
 * all of forward and backward, since the model was made or the last reset. */
typedef struct ef_model_stats {
    double attn_seconds, total_seconds;
    int64_t forwards, backwards;
} ef_model_stats;
EF_API void ef_model_get_stats(const ef_model *m, ef_model_stats *s);
EF_API void ef_model_reset_stats(ef_model *m);

/* Checkpoints in the safetensors format (JSON header + little-endian F32 tensors, readable by
 * any safetensors reader; __metadata__ holds "eformer.spec" and "eformer.version"). Saving is
 * atomic (temporary file, fsync, rename, fsync of the folder). Loading builds the model the
 * file's spec describes (opts: batch, train; its seed is unused: the file's is) and checks every tensor's
 * name, dtype, shape and bounds: EF_ERR_FORMAT naming the problem, EF_ERR_IO. Without cJSON at
 * build time both return EF_ERR_UNSUPPORTED. */
EF_API ef_status ef_model_save(const ef_model *m, const char *path);
EF_API ef_status ef_model_load(ef_model **out, const char *path, const ef_model_opts *opts);
/* Loads a checkpoint's parameters into an existing model of the same spec (EF_ERR_FORMAT when
 * the file's tensors differ from the model's). */
EF_API ef_status ef_model_load_params(ef_model *m, const char *path);

#ifdef __cplusplus
}
#endif
#endif /* EFORMER_H */
