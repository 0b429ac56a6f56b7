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
 * the machine default (the number of online processors, or OMP_NUM_THREADS when set). Results
 * never depend on the thread count. */
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
 * EF_ERR_SHAPE (a non-positive size), EF_ERR_UNSUPPORTED (a combination the mechanism cannot
 * do), EF_ERR_NOMEM. *out is NULL on failure. */
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

/* Learned parameters of the mechanism (none for exact attention: count 0, pointers NULL). */
EF_API size_t ef_attn_param_count(const ef_attn *a);
EF_API float *ef_attn_params(ef_attn *a);
EF_API float *ef_attn_param_grads(ef_attn *a);

/* The registry: mechanisms by index (0 .. ef_attn_count()-1); NULL past the end. */
EF_API int ef_attn_count(void);
EF_API const char *ef_attn_name(int i);
/* A multi-line description of a mechanism and its options with defaults; NULL if unknown. */
EF_API const char *ef_attn_help(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* EFORMER_H */
