/*
 * attn.h - what a mechanism implements to join the registry, and the plan it receives.
 *
 * A mechanism is one file that defines `const ef_attn_ops ef_attn_ops_NAME` and one line in
 * registry.c. The core (attn.c) parses the spec string against the mechanism's option table,
 * validates the shape and the common options, calls `init` to size workspace and parameters,
 * and dispatches forward/backward to the fast or the reference path (`ref=1`).
 *
 * Families that follow hook in through optional members:
 *   - block-sparse layouts: `visible` makes the pattern explicit for the dense reference;
 *   - learned projections: `param_count` + `init` fill a->params (grads are zeroed by the core);
 *   - random features / hashing: draw from a->seed with ef_rng_* (counter based), so a
 *     recomputation (reversible layers) regenerates exactly the same draw;
 *   - incremental decoding: `state_bytes` / `step` (left NULL by mechanisms without it).
 */
#ifndef EF_ATTN_H
#define EF_ATTN_H

#include "core/core.h"

typedef enum ef_opt_type {
    EF_OPT_INT,   /* integer in [min, max]; "auto" allowed when allow_auto */
    EF_OPT_FLOAT, /* real in [min, max]; "auto" allowed when allow_auto */
    EF_OPT_BOOL,  /* 0|1 (also false|true) */
    EF_OPT_ENUM,  /* one of `choices`, "a|b|c" */
    EF_OPT_LIST   /* ';'-separated integers in [min, max], e.g. "0;17;512" (may be empty);
                   * val.f = 1 when a ';' was written, so "5" and "5;" can mean different things */
} ef_opt_type;

typedef struct ef_opt_desc {
    const char *key;
    ef_opt_type type;
    const char *def; /* default, as it would be written in a spec */
    double min, max; /* inclusive range (INT, FLOAT, LIST) */
    const char *choices;
    int allow_auto;
    const char *help;
} ef_opt_desc;

#define EF_OPT_LIST_MAX 64
typedef struct ef_opt_val {
    int is_auto;
    int64_t i;   /* INT, BOOL, ENUM (index into choices), LIST (count) */
    double f;    /* FLOAT */
    int64_t list[EF_OPT_LIST_MAX];
} ef_opt_val;

#define EF_MAX_OPTS 24

/* The largest size ef_attn_new accepts in any field of a shape (and the largest length-like
 * option value): 2^30, so that a size plus an option (a tile, block or window length) still
 * fits an int. */
#define EF_ATTN_MAX_DIM (1 << 30)
/* The most elements a tensor of a plan may have: 2^48. */
#define EF_ATTN_MAX_ELEMS 281474976710656.0

/* The path a call runs: the fast kernels or the slow reference. */
typedef struct ef_attn_ops {
    const char *name;
    const char *summary; /* one line */
    const char *notes;   /* behaviour a user must know (what is saved, what is refused) */
    const ef_opt_desc *opts;
    int n_opts;
    ef_attn_caps caps; /* what ef_attn_get_caps reports (keep it true: test_props checks it) */

    /* Checks mechanism options against the shape, resolves "auto" values, allocates a->impl
     * (workspace) and fills a->params. Returns EF_ERR_UNSUPPORTED for combinations it cannot
     * do. May be NULL. */
    ef_status (*init)(ef_attn *a);
    void (*destroy)(ef_attn *a);
    size_t (*param_count)(const ef_attn *a);      /* NULL = none */
    double (*flops)(const ef_attn *a, int backward); /* NULL = dense 4NMD / 14NMD formula */

    /* The fast path. */
    size_t (*saved_bytes)(const ef_attn *a);
    ef_status (*forward)(ef_attn *a, const ef_attn_io *io, void *saved);
    ef_status (*backward)(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                          float *dq, float *dk, float *dv);
    /* Forward that reuses the discrete choices recorded in `saved` by an earlier forward
     * (ef_attn_forward_replay); NULL for mechanisms without discrete choices (the core runs
     * forward). ref_replay likewise for the reference path. */
    ef_status (*replay)(ef_attn *a, const ef_attn_io *io, void *saved);
    ef_status (*ref_replay)(ef_attn *a, const ef_attn_io *io, void *saved);

    /* The reference path (ref=1). NULL = the generic reference (reference.c), which honours
     * causal, kv_lens, scale and `visible`. */
    size_t (*ref_saved_bytes)(const ef_attn *a);
    ef_status (*ref_forward)(ef_attn *a, const ef_attn_io *io, void *saved);
    ef_status (*ref_backward)(ef_attn *a, const ef_attn_io *io, const void *saved,
                              const float *dout, float *dq, float *dk, float *dv);

    /* Optional extra visibility rule for the dense paths (block-sparse layouts): returns
     * nonzero when query i of head h may see key j, before causal and padding are applied. */
    int (*visible)(const ef_attn *a, int head, int i, int j);
    /* Visible (query, key) pairs of one head over the whole q_len x kv_len grid, causal rule
     * included, padding not. NULL = every pair (or the causal triangle). */
    int64_t (*pairs)(const ef_attn *a, int head);

    /* The random projections the plan holds (ef_attn_random_features): *count floats, copied
     * into out when out != NULL (the core checks n). NULL = none. */
    ef_status (*features)(const ef_attn *a, float *out, size_t *count);

    /* Incremental decoding (causal kernel mechanisms; NULL elsewhere): a state of state_bytes,
     * set up by state_init, advanced one position of every (batch, head) by step. */
    size_t (*state_bytes)(const ef_attn *a);
    void (*state_init)(const ef_attn *a, void *state);
    ef_status (*step)(ef_attn *a, void *state, const float *q, const float *k, const float *v,
                      float *out);
} ef_attn_ops;

struct ef_attn {
    const ef_attn_ops *ops;
    ef_attn_shape shape;
    ef_opt_val opt[EF_MAX_OPTS]; /* mechanism options, in ops->opts order */
    /* common options */
    int causal;
    int ref;
    int scale_auto;
    float scale;
    uint64_t seed;
    /* per-thread workspace slots the plan was sized for (clamps the thread count of a call) */
    int slots;
    size_t ws_bytes; /* workspace the mechanism allocated (reported by ef_attn_workspace_bytes) */
    void *impl;      /* mechanism-private state */
    size_t n_params;
    float *params, *grads;
    char *desc; /* canonical spec */
    float *dense_ws; /* workspace of dense.c (ef_dense_init), freed by the core */
    size_t dense_ws_bytes;
    double *ref_ws; /* workspace of reference.c (ef_ref_init), freed by the core */
    size_t ref_ws_bytes;
    struct ef_ws_share *wshare; /* the per-call block from ef_attn_ws_alloc (maybe shared) */
    const ef_attn *donor;       /* during init: the plan whose block may be shared */
    int ws_borrowed;            /* 1 when wshare came from the donor */
};

/* Workspace blocks shared between plans (internal; the model's layers use it).
 * A mechanism whose per-call workspace holds nothing from one call to the next except what its
 * init wrote identically for every plan of the same options and shape (zero padding lanes)
 * allocates that block with ef_attn_ws_alloc and frees it with ef_attn_ws_free. A plan made by
 * ef_attn_new_sharing(..., donor) then uses the donor's block instead of its own when both
 * are of the same mechanism, shape, options (the seed aside) and block size: plans that are
 * never called at the same time (the layers of one model) hold one block between them.
 * Mechanisms that keep per-plan state in their block must not use these. */
void *ef_attn_ws_alloc(ef_attn *a, size_t bytes);
void ef_attn_ws_free(ef_attn *a, void *block);
ef_status ef_attn_new_sharing(ef_attn **out, const char *spec, const ef_attn_shape *shape,
                              const ef_attn *donor);
/* Bytes of a's workspace that belong to a donor's block (counted there, not here). */
size_t ef_attn_ws_borrowed_bytes(const ef_attn *a);

/* Registry (registry.c). */
extern const ef_attn_ops *const ef_attn_registry[];
extern const int ef_attn_registry_count;
const ef_attn_ops *ef_attn_find(const char *name);

/* Index of option `key` in a->ops->opts (a programming error if absent: returns -1). */
int ef_attn_opt_index(const ef_attn_ops *ops, const char *key);
static inline int64_t ef_opt_i(const ef_attn *a, int idx) { return a->opt[idx].i; }
static inline double ef_opt_f(const ef_attn *a, int idx) { return a->opt[idx].f; }

/* Threads a call of this plan may use. */
static inline int ef_attn_threads(const ef_attn *a) { return EF_MIN(ef_threads(), a->slots); }

/* Valid keys of sequence b: kv_lens[b], or every key when kv_lens is NULL. */
static inline int ef_attn_kv_valid(const ef_attn *a, const ef_attn_io *io, int b) {
    return io->kv_lens ? io->kv_lens[b] : a->shape.kv_len;
}
/* Valid queries of sequence b: q_lens[b], or every query when q_lens is NULL. Rows at or past
 * it output zeros, get zero gradients and are never read into another row's result. */
static inline int ef_attn_q_valid(const ef_attn *a, const ef_attn_io *io, int b) {
    return io->q_lens ? io->q_lens[b] : a->shape.q_len;
}
/* Validates kv_lens (NULL ok) against the plan; names the bad batch entry. */
ef_status ef_attn_check_kv_lens(const ef_attn *a, const int32_t *kv_lens);
/* The number of keys query i of batch b may see before any pattern: min(kv_len_b, i+1 if
 * causal). */
static inline int ef_attn_row_limit(const ef_attn *a, int kv_valid, int i) {
    return a->causal ? EF_MIN(kv_valid, i + 1) : kv_valid;
}

/* Dense attention with GEMMs (dense.c), the fast path of `full`: S = scale*Q K^T,
 * P = softmax(S masked), O = P V per (batch, head), differentiated with saved P.
 * saved layout: P [batch][heads][q_len][kv_len]. Workspace: one q_len x kv_len buffer
 * (a->dense_ws), allocated by ef_dense_init. Honours causal, kv_lens, scale and `visible`. */
ef_status ef_dense_init(ef_attn *a);
size_t ef_dense_saved_bytes(const ef_attn *a);
ef_status ef_dense_forward(ef_attn *a, const ef_attn_io *io, void *saved);
ef_status ef_dense_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                            const float *dout, float *dq, float *dk, float *dv);

/* The generic slow reference (reference.c): softmax attention written as plain loops in double
 * precision, one query row at a time, with every mask explicit (causal, kv_lens, `visible`).
 * Saves nothing; backward recomputes each row. The core uses it for ref=1 plans whose
 * mechanism has no reference of its own; ef_ref_init allocates its workspace (a->ref_ws). */
ef_status ef_ref_init(ef_attn *a);
ef_status ef_ref_forward(ef_attn *a, const ef_attn_io *io, void *saved);
ef_status ef_ref_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                          float *dq, float *dk, float *dv);

/* ---------------------------------------------------------------------------------------------
 * The tiled engine (tiled.c): fused online-softmax attention over query tiles of EF_QT rows and
 * key chunks of EF_KT keys, restricted to a pattern. `flash` is the pattern "everything";
 * block-sparse layouts supply `classify` and `tile_mask`. At plan creation the engine asks
 * `classify` about every (query tile, key chunk) pair of every head (of head 0 only unless
 * per_head) and keeps the visible chunks as sorted spans; forward and backward then touch only
 * those chunks, applying `tile_mask` to the partial ones. Causal masking and key padding are
 * the engine's own. Work and memory are proportional to the visible chunks.
 * ------------------------------------------------------------------------------------------- */
enum { EF_QT = 64, EF_KT = 64 };
enum { EF_CHUNK_NONE = 0, EF_CHUNK_ALL = 1, EF_CHUNK_PARTIAL = 2 };

typedef struct ef_tiled_pattern {
    int per_head; /* nonzero when heads have different layouts */
    /* Queries [i0, i1) of `head` against keys [j0, j1), pattern only (no causal, no padding):
     * EF_CHUNK_NONE when no pair is visible, EF_CHUNK_ALL when every pair is, else
     * EF_CHUNK_PARTIAL (always a safe answer). */
    int (*classify)(const ef_attn *a, int head, int i0, int i1, int j0, int j1);
    /* For a partial chunk: st[r * EF_QT + l] = -inf where query i0 + l cannot see key j0 + r
     * (r < kn, l < EF_QT; lanes past the last query may get any value). Must agree with the
     * ops' `visible`. */
    void (*tile_mask)(const ef_attn *a, int head, int i0, int j0, int kn, float *st);
    /* Optional (NULL = 0): the query tiles and key chunks start at this position instead of 0;
     * the positions before it form tiles and chunks of their own (bigbird-etc: the ETC tokens
     * in front of blocks that are then aligned with the tiles). */
    int (*origin)(const ef_attn *a);
    /* Optional, instead of classify on the chunk grid: lists the visible key ranges of queries
     * [i0, i1) of `head` in increasing, non-overlapping order by calling emit(ctx, j0, j1,
     * masked); masked = some pair in the range is hidden (tile_mask applies to it). Pattern
     * only: the engine clips to kv_len and the causal rule. Ranges may be of any length. */
    void (*spans)(const ef_attn *a, int head, int i0, int i1,
                  void (*emit)(void *ctx, int j0, int j1, int masked), void *ctx);
    /* Optional (NULL or 0 = none): a stride s >= 2. On top of the spans, query i also sees the
     * keys j = i (mod s) with |i - j| >= s (causal: j <= i - s), computed in a second pass
     * that gathers each residue class into dense tiles (the Sparse Transformer's strided
     * pattern at O(N (N/s) D)). classify, tile_mask and spans must then not include those
     * pairs; `visible` must. */
    int (*stride)(const ef_attn *a);
    /* Optional (NULL = 64): the pattern's block length when it is below 64. Query tiles and the
     * key chunks classify is asked about are then that long (rounded up to the vector width),
     * so that no tile mixes two query blocks and no chunk two key blocks. */
    int (*grid)(const ef_attn *a);
} ef_tiled_pattern;

/* The engine's micro-kernel, for other mechanisms' small dense products:
 * C[r][0:L] (+)= sum_{t<T} A[r*ars + t*ats] * B[t*ldb + 0:L] for r < R (acc=0 overwrites).
 * L must be a multiple of EF_VL; B and C rows 64-byte aligned (ldb, ldc multiples of 16).
 * Register-tiled, single-threaded; fastest when L is 64 and R a multiple of 6. */
void ef_tile_gemm(int R, int T, int L, const float *A, ptrdiff_t ars, ptrdiff_t ats, const float *B,
                  ptrdiff_t ldb, float *C, ptrdiff_t ldc, int acc);

/* The engine's transposed copy: dst[t*ldt + i] = src[i*ld + t] * scale for rows i < n and
 * t < d, 16 x 16 blocks transposed in registers; lanes n .. width-1 of each dst row are zeroed
 * (none when width <= n). */
void ef_tile_pack_t(float *dst, size_t ldt, const float *src, size_t ld, int d, int n, int width,
                    float scale);

/* The dK and dV accumulators of a backward work item's key range [klo, khi) (tiled.c,
 * flash_bf16.c): the head's output rows themselves where they need no padding (D = Dp, Dv =
 * Dvp) and are 64-byte aligned, else workspace rows (ldk = Dp, ldv = Dvp floats apart) copied
 * out at the end. Either way a block of EF_ZB keys is zeroed just before its first use: zeroing
 * the whole range up front brought every line in once for the zeros and, evicted before its
 * keys came up, once more for the sums. */
enum { EF_ZB = 16 };
typedef struct ef_kacc {
    float *dk, *dv;         /* row klo of the accumulators */
    int ldk, ldv, klo, khi; /* row strides; the range */
    uint8_t *done;          /* a byte per block of EF_ZB keys: zeroed already */
    float *dk_out, *dv_out; /* the head's output rows (row 0), D and Dv floats apart */
    int d, dvd, direct;     /* output widths; direct: the accumulators are the output rows */
} ef_kacc;
/* done: (khi - klo) / EF_ZB + 1 bytes; dk_ws, dv_ws: (khi - klo) rows of dp, dvp floats. */
void ef_kacc_init(ef_kacc *z, float *dk_out, float *dv_out, int d, int dv, float *dk_ws,
                  float *dv_ws, int dp, int dvp, uint8_t *done, int klo, int khi);
/* Zeroes the untouched blocks of keys [j0, j1) (klo <= j0 < j1 <= khi). */
void ef_kacc_touch(const ef_kacc *z, int j0, int j1);
/* Zeroes the blocks no key of which was touched, and copies workspace rows out. */
void ef_kacc_finish(const ef_kacc *z);

/* Builds the spans and the workspace. `user` (may be NULL) is the pattern's own data, handed
 * back by ef_tiled_user and released with ef_free() by ef_tiled_destroy. On failure `user` is
 * still owned (and released) by the engine once ef_tiled_destroy runs. */
ef_status ef_tiled_init(ef_attn *a, const ef_tiled_pattern *pat, void *user);
void *ef_tiled_user(const ef_attn *a);
void ef_tiled_destroy(ef_attn *a);
size_t ef_tiled_saved_bytes(const ef_attn *a);
int64_t ef_tiled_pairs(const ef_attn *a, int head);
ef_status ef_tiled_forward(ef_attn *a, const ef_attn_io *io, void *saved);
ef_status ef_tiled_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                            const float *dout, float *dq, float *dk, float *dv);

#endif
