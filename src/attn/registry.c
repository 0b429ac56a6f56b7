/* registry.c - every mechanism, one line each. */
#include "attn/attn.h"

extern const ef_attn_ops ef_attn_ops_full;
extern const ef_attn_ops ef_attn_ops_flash;
extern const ef_attn_ops ef_attn_ops_linear, ef_attn_ops_performer;
extern const ef_attn_ops ef_attn_ops_local, ef_attn_ops_blocklocal, ef_attn_ops_strided,
    ef_attn_ops_fixed, ef_attn_ops_longformer, ef_attn_ops_bigbird, ef_attn_ops_bigbird_etc;
extern const ef_attn_ops ef_attn_ops_linformer;

extern const ef_attn_ops ef_attn_ops_nystrom;
extern const ef_attn_ops ef_attn_ops_clustered, ef_attn_ops_iclustered;
extern const ef_attn_ops ef_attn_ops_lsh;

const ef_attn_ops *const ef_attn_registry[] = {
    &ef_attn_ops_full,
    &ef_attn_ops_flash,
    &ef_attn_ops_local,
    &ef_attn_ops_blocklocal,
    &ef_attn_ops_strided,
    &ef_attn_ops_fixed,
    &ef_attn_ops_longformer,
    &ef_attn_ops_bigbird,
    &ef_attn_ops_bigbird_etc,
    &ef_attn_ops_linear,
    &ef_attn_ops_performer,
    &ef_attn_ops_linformer,
    &ef_attn_ops_nystrom,
    &ef_attn_ops_clustered,
    &ef_attn_ops_iclustered,
    &ef_attn_ops_lsh,
};
const int ef_attn_registry_count = (int)(sizeof ef_attn_registry / sizeof ef_attn_registry[0]);
