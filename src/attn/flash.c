/*
 * flash.c - `flash`: exact attention in O(N) memory, fused and tiled with an online softmax
 * (Dao et al., FlashAttention-2, 2023). It is the tiled engine (tiled.c) with the pattern
 * "every key chunk is visible"; docs/flash.md has the derivation.
 * Saved for backward: lse [batch][heads][q_len]. Time O(B H N M D); memory O(B H N).
 */
#include "attn/attn.h"

static int flash_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)a, (void)head, (void)i0, (void)i1, (void)j0, (void)j1;
    return EF_CHUNK_ALL;
}

static ef_status flash_init(ef_attn *a) {
    static const ef_tiled_pattern everything = {.classify = flash_classify};
    return ef_tiled_init(a, &everything, NULL);
}

const ef_attn_ops ef_attn_ops_flash = {
    .caps = {.causal = 1, .cross = 1, .exact = 1, .deterministic = 1},
    .name = "flash",
    .summary = "exact attention, fused and tiled with an online softmax (O(N) memory)",
    .notes = "  saves the per-row log-sum-exp (B*H*N floats); backward recomputes the\n"
             "  probabilities tile by tile; head_dim and v_dim up to 256; tested against\n"
             "  full and the double-precision reference (ref=1).",
    .init = flash_init,
    .destroy = ef_tiled_destroy,
    .saved_bytes = ef_tiled_saved_bytes,
    .forward = ef_tiled_forward,
    .backward = ef_tiled_backward,
};
