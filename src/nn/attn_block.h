/*
 * attn_block.h - the multi-head attention block of the Transformer (internal; the model uses it
 * like any user of the attention API: through ef_attn_* with a spec string).
 *
 * For one batch of token rows x [B][N][C] (C = H*D) and any attention spec:
 *   Q_h = x Wq[:, hD:(h+1)D] + bq[hD:(h+1)D]       q [B][H][N][D]
 *   K_h = x Wk[:, hD:(h+1)D] + bk[...]               k [B][H][N][D]  (not computed for shared-QK
 *   V_h = x Wv[:, hD:(h+1)D] + bv[...]               v [B][H][N][D]   mechanisms: lsh ignores k)
 *   O   = attention(Q, K, V)                         o [B][H][N][D]
 *   y   = sum_h O_h Wo[hD:(h+1)D, :] + bo            y [B][N][C]
 * The head layout the attention API wants ([B][H][N][D]) is written directly by the projection
 * GEMMs (one product per head, ldb = C), and read directly by the output projection (one
 * product per head accumulated into y), so no transpose is ever made.
 * Padding: lens[b] valid tokens per sequence (NULL = all; self-attention, so q_lens = kv_lens =
 * lens). Only valid rows enter any product: padded rows of x (and of dy) are never read, their
 * y rows and dx rows are 0.
 * Parameters (row-major): Wq, Wk, Wv [C][C], Wo [C][C], biases [C]. Backward overwrites dx and
 * accumulates the parameter gradients. Every product goes through ef_sgemm_fixed, so results do
 * not depend on the thread count.
 * saved (ef_attn_block_saved_bytes, 64-byte aligned): q, k, v, o [B][H][N][D] then the attention
 * plan's own saved bytes.
 * Workspace (the caller's, `ws`, ef_attn_block_ws_bytes, 64-byte aligned): 4 [B][H][N][D]
 * tensors, one after the other: q, k, v, o in an inference forward (saved NULL), dO, dQ, dK, dV
 * in backward. Nothing in it lives from one call to the next (every call writes what it reads),
 * so the blocks of a stack share one buffer. The block itself owns only the attention plan
 * (its workspace and parameters: ef_attn_block_workspace_bytes).
 */
#ifndef EF_NN_ATTN_BLOCK_H
#define EF_NN_ATTN_BLOCK_H

#include "core/core.h"

typedef struct ef_attn_block ef_attn_block;

typedef struct ef_attn_block_params {
    const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
} ef_attn_block_params;
typedef struct ef_attn_block_grads {
    float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
} ef_attn_block_grads;

/* An attention block for batch x len tokens of width `dim` split over `heads` heads
 * (dim % heads == 0). EF_ERR_ARG / EF_ERR_SHAPE / EF_ERR_UNSUPPORTED as ef_attn_new says. */
ef_status ef_attn_block_new(ef_attn_block **out, const char *spec, int batch, int len, int dim,
                            int heads);
/* The same, sharing the attention plan's per-call workspace with donor's plan where the
 * mechanism allows it (attn.h, ef_attn_new_sharing): for blocks never called at the same time,
 * such as the layers of one model. donor NULL: ef_attn_block_new. */
ef_status ef_attn_block_new_sharing(ef_attn_block **out, const char *spec, int batch, int len,
                                    int dim, int heads, const ef_attn_block *donor);
void ef_attn_block_free(ef_attn_block *blk);
/* Bytes the block owns that are not shared with a donor (ef_attn_block_workspace_bytes minus the
 * plan's borrowed workspace). */
size_t ef_attn_block_own_bytes(const ef_attn_block *blk);
/* The attention plan inside (to ask its caps, describe it or read its parameters). */
ef_attn *ef_attn_block_attn(const ef_attn_block *blk);
/* 1 when the mechanism ignores k (shared-QK lsh): Wk, bk are then unused and get no gradient. */
int ef_attn_block_shared_qk(const ef_attn_block *blk);
size_t ef_attn_block_saved_bytes(const ef_attn_block *blk);
/* Bytes of the caller's scratch `ws` below: 4 B H N D floats (= 4 B N C), rounded up to 64. */
size_t ef_attn_block_ws_bytes(const ef_attn_block *blk);
/* Bytes the block itself owns: the attention plan's (ef_attn_workspace_bytes). */
size_t ef_attn_block_workspace_bytes(const ef_attn_block *blk);

/* The next forward (or replay) copies its q, k, v into dst (3 [B][H][N][D] tensors one after
 * the other; rows past each sequence's length 0; shared-QK: k = q), then forgets dst. NULL
 * cancels. For ef_model_capture_qkv. */
void ef_attn_block_capture(ef_attn_block *blk, float *dst);

/* y [B][N][C] from x [B][N][C]; saved may be NULL (inference: ws holds q, k, v, o then, and is
 * required; with saved, ws is unused and may be NULL). Errors: EF_ERR_ARG for a NULL pointer, a
 * ws that is needed but NULL or not 64-byte aligned, lens outside [0, len]. */
ef_status ef_attn_block_forward(ef_attn_block *blk, const ef_attn_block_params *p, const float *x,
                                const int32_t *lens, float *y, void *saved, void *ws);
/* dx [B][N][C] (overwritten) and the parameter gradients (accumulated) for dy [B][N][C].
 * ws (required, 64-byte aligned) holds dO, dQ, dK, dV. */
ef_status ef_attn_block_backward(ef_attn_block *blk, const ef_attn_block_params *p, const float *x,
                                 const int32_t *lens, const void *saved, const float *dy, float *dx,
                                 ef_attn_block_grads *g, void *ws);

/* Replay (reversible layers). The plan's own record is the tail of `saved`: the
 * ef_attn_saved_bytes of the plan (lsh: buckets; flash: row log-sum-exps; ...) starting at byte
 * ef_attn_block_record_offset. A reversible layer keeps only that part per layer and rebuilds
 * the rest (q, k, v, o) by a forward that reuses the record's discrete choices: */
size_t ef_attn_block_record_offset(const ef_attn_block *blk);
size_t ef_attn_block_record_bytes(const ef_attn_block *blk);
/* ef_attn_block_forward through ef_attn_forward_replay: saved (required) must hold, at the record
 * offset, the record of an earlier training forward of this block; q, k, v, o are recomputed
 * into saved from x and the record rewritten with the same choices (ws is unused: may be NULL).
 * EF_ERR_UNSUPPORTED where the mechanism cannot replay yet. */
ef_status ef_attn_block_forward_replay(ef_attn_block *blk, const ef_attn_block_params *p,
                                       const float *x, const int32_t *lens, float *y, void *saved,
                                       void *ws);

/* Seconds spent inside the attention mechanism's calls (forward, replay, backward) since the
 * block was made or the last reset (the model's attention vs dense split). */
double ef_attn_block_seconds(const ef_attn_block *blk);
void ef_attn_block_reset_seconds(ef_attn_block *blk);

#endif
