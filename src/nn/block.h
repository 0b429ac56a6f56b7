/*
 * block.h - the two residual layers of the Transformer (internal): the pre-LN residual layer and
 * the reversible layer of RevNet / Reformer (Gomez et al. 2017; Kitaev et al. 2020, section 3).
 * Derivation of the reversible backward, what is stored and the memory per layer:
 * docs/reversible.md.
 *
 * Both are built from the same sub-layers and parameters, for x [B][N][C] (C = dim):
 *   F(x) = Attn(LN1(x))     the attention block (attn_block.h) on a layer norm
 *   G(x) = FFN(LN2(x))      the chunked feed-forward layer (nn.h, `chunks`) on a layer norm
 * residual    (EF_BLOCK_RESIDUAL):   h = x + F(x);         y = h + G(h)
 * reversible  (EF_BLOCK_REVERSIBLE): y1 = x1 + F(x2);      y2 = x2 + G(y1)
 *
 * What forward saves for backward (`saved`, ef_block_saved_bytes, 64-byte aligned):
 *   residual:   x, h [B][N][C] and the attention block's saved (q, k, v, o + the plan's record);
 *               the layer norms (outputs and statistics) are recomputed from x and h.
 *   reversible: the attention plan's record only (ef_attn_block_record_bytes: lsh's buckets,
 *               flash's row log-sum-exps, ...), so that the recomputation attends exactly as
 *               forward did. Activations are rebuilt from the outputs in backward:
 *                 x2 = y2 - G(y1),  x1 = y1 - F(x2)
 *               so a stack keeps its final (y1, y2) plus one record per layer.
 *
 * Padding: lens[b] valid tokens per sequence (NULL = all). The sub-layers see valid rows only
 * (layer norms and feed-forward run per sequence on rows < lens[b]); padded rows pass through
 * unchanged (y = x there, and dx = dy in backward): nothing in a padded row, NaN included, reaches
 * a valid row or a parameter gradient.
 *
 * Conventions as nn.h: backward overwrites input gradients and ACCUMULATES parameter gradients
 * (those of the attention plan's own parameters too, in ef_attn_param_grads); results are
 * bitwise independent of the thread count; nothing prints or exits.
 */
#ifndef EF_NN_BLOCK_H
#define EF_NN_BLOCK_H

#include "nn/attn_block.h"

typedef enum ef_block_kind { EF_BLOCK_RESIDUAL = 0, EF_BLOCK_REVERSIBLE = 1 } ef_block_kind;

typedef struct ef_block_config {
    ef_block_kind kind;
    const char *attn;   /* attention spec ("flash", "lsh:chunk=64", ...) */
    int batch, len;     /* the batch and length of every call (the attention plan's shape) */
    int dim, heads, ff; /* C, H (C % H == 0), feed-forward hidden units */
    int chunks;         /* feed-forward chunks per sequence (>= 1; 1 = unchunked) */
    float eps;          /* layer norm epsilon (> 0) */
    const struct ef_block *share; /* NULL, or a layer never called at the same time as this one
                                   * (of the same stack) whose attention plan's workspace this
                                   * layer's may share (attn_block.h, ef_attn_block_new_sharing) */
} ef_block_config;

typedef struct ef_block_params {
    const float *ln1_g, *ln1_b; /* [C], [C] */
    ef_attn_block_params attn;  /* Wq..bo, see attn_block.h */
    const float *ln2_g, *ln2_b; /* [C], [C] */
    const float *w1, *b1;       /* [C][ff], [ff] */
    const float *w2, *b2;       /* [ff][C], [C] */
} ef_block_params;

typedef struct ef_block_grads {
    float *ln1_g, *ln1_b;
    ef_attn_block_grads attn;
    float *ln2_g, *ln2_b;
    float *w1, *b1, *w2, *b2;
} ef_block_grads;

typedef struct ef_block ef_block;

/* Errors: EF_ERR_ARG (NULL, a bad kind, chunks < 1, eps <= 0, ff < 1), EF_ERR_SHAPE, what
 * ef_attn_block_new returns for the spec, and EF_ERR_UNSUPPORTED for a reversible layer whose
 * mechanism cannot be recomputed exactly (performer with redraw > 0: docs/reversible.md). */
ef_status ef_block_new(ef_block **out, const ef_block_config *cfg);
void ef_block_free(ef_block *blk);
ef_block_kind ef_block_get_kind(const ef_block *blk);
ef_attn_block *ef_block_attn(const ef_block *blk); /* the attention block inside */

/* Bytes forward keeps per layer for backward (see above): residual 2 BNC floats + the attention
 * block's saved; reversible the attention plan's record (at least 64, so never 0). */
size_t ef_block_saved_bytes(const ef_block *blk);
/* Scratch bytes one call needs (`ws` below, 64-byte aligned: ef_malloc). Nothing in it lives
 * from one call to the next, so the layers of a stack share one buffer of the largest size.
 * Residual: 3 BNC + 2 BN floats + one region for the larger of the feed-forward's chunk and
 * the attention block's scratch (ef_attn_block_ws_bytes, 4 BNC floats; the two are never live
 * together); reversible adds one attention block saved buffer (the recomputation's q, k, v, o
 * and record). The attention block's scratch is thus shared by the layers too: per layer there
 * remains only the attention plan's own workspace (ef_attn_block_workspace_bytes). */
size_t ef_block_ws_bytes(const ef_block *blk);

/* Bytes a stack of n layers keeps for backward between its forward and its backward:
 *   residual:   sum of ef_block_saved_bytes   (every layer's activations)
 *   reversible: 2 B N C floats (the final y1, y2) + sum of the records
 * The layers must all be of one kind; 0 on bad arguments. */
size_t ef_block_stack_saved_bytes(ef_block *const *layers, int n);

/* Residual layer.
 * y [B][N][C] from x [B][N][C]; y may alias x. saved NULL: inference. */
ef_status ef_block_res_forward(ef_block *blk, const ef_block_params *p, const float *x,
                               const int32_t *lens, float *y, void *saved, void *ws);
/* dx [B][N][C] (overwritten; may alias dy) from dy, for the forward that filled saved. */
ef_status ef_block_res_backward(ef_block *blk, const ef_block_params *p, const float *dy,
                                const int32_t *lens, const void *saved, float *dx,
                                ef_block_grads *g, void *ws);

/* Reversible layer, IN PLACE (so a stack needs two activation buffers, whatever its depth):
 * on entry x1, x2 [B][N][C]; on return y1 = x1 + F(x2) in x1, y2 = x2 + G(y1) in x2.
 * saved: ef_block_saved_bytes (the attention record), NULL for inference. */
ef_status ef_block_rev_forward(ef_block *blk, const ef_block_params *p, float *x1, float *x2,
                               const int32_t *lens, void *saved, void *ws);
/* IN PLACE: on entry a1, a2 hold the outputs (y1, y2) and d1, d2 their gradients (dy1, dy2);
 * on return a1, a2 hold the inputs (x1, x2) rebuilt (equal to the forward's up to rounding) and
 * d1, d2 the input gradients (dx1, dx2). Recomputes G(y1) and F(x2) (the attention through
 * ef_attn_block_forward_replay with the saved record). Errors: those of the sub-layers;
 * EF_ERR_UNSUPPORTED when the mechanism cannot replay its discrete choices. A call that fails
 * after its checks leaves a1, a2, d1, d2 and the gradients unspecified (partly updated). */
ef_status ef_block_rev_backward(ef_block *blk, const ef_block_params *p, float *a1, float *a2,
                                float *d1, float *d2, const int32_t *lens, const void *saved,
                                ef_block_grads *g, void *ws);

#endif
