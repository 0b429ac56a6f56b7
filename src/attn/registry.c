/* registry.c - every mechanism, one line each. */
#include "attn/attn.h"

extern const ef_attn_ops ef_attn_ops_full;
extern const ef_attn_ops ef_attn_ops_flash;

const ef_attn_ops *const ef_attn_registry[] = {
    &ef_attn_ops_full,
    &ef_attn_ops_flash,
};
const int ef_attn_registry_count = (int)(sizeof ef_attn_registry / sizeof ef_attn_registry[0]);
