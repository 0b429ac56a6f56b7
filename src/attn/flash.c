/*
 * flash.c - `flash`: exact attention in O(N) memory, fused and tiled with an online softmax
 * (Dao et al., FlashAttention-2, 2023). precision=fp32 (the default) is the tiled engine
 * (tiled.c) with the pattern "every key chunk is visible"; precision=bf16 runs the products in
 * bf16 with fp32 accumulation (flash_bf16.c). docs/flash.md has the derivation.
 * Saved for backward: lse [batch][heads][q_len]. Time O(B H N M D); memory O(B H N).
 */
#include "attn/attn.h"
#include "attn/flash_bf16.h"

enum { PREC_FP32 = 0, PREC_BF16 = 1 };

static const ef_opt_desc flash_opts[] = {
    {"precision", EF_OPT_ENUM, "fp32", 0, 0, "fp32|bf16", 0,
     "inputs of the matrix products: fp32, or bf16 with fp32 accumulation and an fp32 "
     "softmax (docs/flash.md)"},
};

static int is_bf16(const ef_attn *a) {
    return ef_opt_i(a, ef_attn_opt_index(a->ops, "precision")) == PREC_BF16;
}

static int flash_classify(const ef_attn *a, int head, int i0, int i1, int j0, int j1) {
    (void)a, (void)head, (void)i0, (void)i1, (void)j0, (void)j1;
    return EF_CHUNK_ALL;
}

static ef_status flash_init(ef_attn *a) {
    if (is_bf16(a)) return ef_bf16_init(a);
    static const ef_tiled_pattern everything = {.classify = flash_classify};
    return ef_tiled_init(a, &everything, NULL);
}

static void flash_destroy(ef_attn *a) {
    if (is_bf16(a))
        ef_bf16_destroy(a);
    else
        ef_tiled_destroy(a);
}

static size_t flash_saved_bytes(const ef_attn *a) {
    return is_bf16(a) ? ef_bf16_saved_bytes(a) : ef_tiled_saved_bytes(a);
}

static ef_status flash_forward(ef_attn *a, const ef_attn_io *io, void *saved) {
    return is_bf16(a) ? ef_bf16_forward(a, io, saved) : ef_tiled_forward(a, io, saved);
}

static ef_status flash_backward(ef_attn *a, const ef_attn_io *io, const void *saved,
                                const float *dout, float *dq, float *dk, float *dv) {
    return is_bf16(a) ? ef_bf16_backward(a, io, saved, dout, dq, dk, dv)
                      : ef_tiled_backward(a, io, saved, dout, dq, dk, dv);
}

const ef_attn_ops ef_attn_ops_flash = {
    .caps = {.causal = 1, .cross = 1, .exact = 1, .deterministic = 1},
    .name = "flash",
    .summary = "exact attention, fused and tiled with an online softmax (O(N) memory)",
    .notes = "  saves the per-row log-sum-exp (B*H*N floats); backward recomputes the\n"
             "  probabilities tile by tile; head_dim and v_dim up to 256; tested against\n"
             "  full and the double-precision reference (ref=1). precision=bf16 rounds the\n"
             "  inputs of every product to bf16 (relative error ~3e-3 at D=64, not fp32's\n"
             "  ~1e-7); AVX512-BF16 when the CPU has it, else an fp32 emulation (slower);\n"
             "  EF_BF16=emulate forces the emulation. No AMX kernel.",
    .opts = flash_opts,
    .n_opts = (int)(sizeof flash_opts / sizeof flash_opts[0]),
    .init = flash_init,
    .destroy = flash_destroy,
    .saved_bytes = flash_saved_bytes,
    .forward = flash_forward,
    .backward = flash_backward,
};
