/*
 * full.c - `full`: exact softmax attention that materialises the scores (Vaswani et al. 2017).
 *
 * The "naive attention" baseline of the benchmarks and the fast exact reference the tiled
 * mechanisms are tested against: S = scale * Q K^T, P = softmax(S), O = P V, each product one
 * GEMM per (batch, head) (dense.c has the masks and the backward equations). Its own
 * reference (ref=1) is the plain double-precision loop of reference.c.
 * Saved for backward: P [batch][heads][q_len][kv_len] floats. Workspace: one q_len x kv_len
 * buffer. Time O(B H N M D); memory O(N M) inference, O(B H N M) training.
 */
#include "attn/attn.h"

static ef_status full_init(ef_attn *a) { return ef_dense_init(a); }

const ef_attn_ops ef_attn_ops_full = {
    .caps = {.causal = 1, .cross = 1, .exact = 1, .deterministic = 1},
    .name = "full",
    .summary = "exact softmax attention, scores materialised with GEMMs (O(N*M) memory)",
    .notes = "  the naive baseline; saves the probabilities (B*H*N*M floats) for backward;\n"
             "  any head_dim, v_dim; ref=1 runs plain double-precision loops.",
    .opts = NULL,
    .n_opts = 0,
    .init = full_init,
    .saved_bytes = ef_dense_saved_bytes,
    .forward = ef_dense_forward,
    .backward = ef_dense_backward,
};
