/*
 * flash_bf16.h - `flash:precision=bf16` (flash_bf16.c): the products of exact attention in bf16
 * with fp32 accumulation, the softmax in fp32. flash.c dispatches here; nothing else does.
 */
#ifndef EF_FLASH_BF16_H
#define EF_FLASH_BF16_H

#include "attn/attn.h"

/* Sizes the plan's workspace and picks the product kernel: AVX512-BF16 (vdpbf16ps) when the
 * CPU has it, else the fp32 emulation of the same arithmetic. The environment variable
 * EF_BF16=emulate forces the emulation (tests use it to compare the two on one machine);
 * EF_BF16=auto or unset chooses by CPU; any other value is EF_ERR_ARG. */
ef_status ef_bf16_init(ef_attn *a);
void ef_bf16_destroy(ef_attn *a);
size_t ef_bf16_saved_bytes(const ef_attn *a);
ef_status ef_bf16_forward(ef_attn *a, const ef_attn_io *io, void *saved);
ef_status ef_bf16_backward(ef_attn *a, const ef_attn_io *io, const void *saved, const float *dout,
                           float *dq, float *dk, float *dv);
/* 1 when the plan (made by ef_bf16_init) runs vdpbf16ps, 0 when it runs the emulation. */
int ef_bf16_native(const ef_attn *a);
/* 1 when this CPU and build can run vdpbf16ps. */
int ef_bf16_cpu_native(void);

#endif
