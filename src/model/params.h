/*
 * params.h - the parameter table: every learned tensor of a model in one contiguous fp32 buffer,
 * with a table of named views, and the gradients in a second buffer of the identical layout (so
 * an optimizer is one flat loop over `total` floats). Checkpoints (safetensors) of a table.
 *
 * Internal: the model (src/model/) builds one table; nothing here is in include/eformer.h.
 *
 * Life cycle:
 *   ef_params_new(&p);
 *   ef_params_add(p, "layers.0.attn.q.weight", 2, (int64_t[]){256, 256}, ef_init_normal(0.02f),
 * &i);
 *   ...                                    names: see ef_params_add
 *   ef_params_alloc(p);                    data and grad allocated, zero-filled; table frozen
 *   ef_params_init(p, seed);               every tensor from its own random stream
 *   ef_params_find(p, "layers.0.attn.q.weight", &t);   p->data + t->offset is the tensor
 *   ef_ckpt_save(p, path, meta, n_meta);   ef_ckpt_load(p, path);
 *   ef_params_free(p);
 *
 * Layout: tensors are placed in the order they were added; each starts at a multiple of
 * EF_PARAM_ALIGN floats (64 bytes, the alignment of the buffer), so every tensor is 64-byte
 * aligned. The padding floats between tensors are zero in data and grad and stay zero under any
 * elementwise optimizer (their gradient is zero). `count` is the number of parameters (without
 * padding), `total` the buffer's length in floats (with it). Checkpoints store the tensors
 * packed, without the padding.
 */
#ifndef EF_MODEL_PARAMS_H
#define EF_MODEL_PARAMS_H

#include "eformer.h"

#include <stddef.h>
#include <stdint.h>

#define EF_PARAM_MAX_DIMS 4
#define EF_PARAM_NAME_MAX 255 /* bytes, without the terminating NUL */
#define EF_PARAM_ALIGN 16     /* floats: tensor offsets are multiples of this (64 bytes) */

/* How a tensor is initialised by ef_params_init. */
typedef enum ef_init_kind {
    EF_INIT_ZEROS = 0, /* the default of a zero-initialised ef_init */
    EF_INIT_ONES,
    EF_INIT_NORMAL,  /* N(0, a^2): a is the standard deviation */
    EF_INIT_UNIFORM, /* U[a, b) */
} ef_init_kind;

typedef struct ef_init {
    ef_init_kind kind;
    float a, b;
} ef_init;

static inline ef_init ef_init_zeros(void) { return (ef_init){EF_INIT_ZEROS, 0.0f, 0.0f}; }
static inline ef_init ef_init_ones(void) { return (ef_init){EF_INIT_ONES, 0.0f, 0.0f}; }
static inline ef_init ef_init_normal(float std) { return (ef_init){EF_INIT_NORMAL, std, 0.0f}; }
static inline ef_init ef_init_uniform(float a, float b) { return (ef_init){EF_INIT_UNIFORM, a, b}; }

/* One named tensor: data + offset .. data + offset + numel, row-major. */
typedef struct ef_param {
    char *name;                       /* owned by the table */
    int ndim;                         /* 1 .. EF_PARAM_MAX_DIMS */
    int64_t shape[EF_PARAM_MAX_DIMS]; /* shape[ndim..] are 1 */
    size_t numel;                     /* product of the shape */
    size_t offset;                    /* in floats from the start of data (and of grad) */
    ef_init init;
} ef_param;

typedef struct ef_params {
    ef_param *t; /* [n] in the order added */
    int n, cap;
    size_t count; /* parameters: sum of numel */
    size_t total; /* floats in data and in grad (count + alignment padding) */
    float *data;  /* [total], 64-byte aligned; NULL until ef_params_alloc */
    float *grad;  /* [total], same layout as data */
} ef_params;

/* An empty table. EF_ERR_ARG (NULL out), EF_ERR_NOMEM. */
ef_status ef_params_new(ef_params **out);
/* Releases the table and its buffers; NULL is a no-op. */
void ef_params_free(ef_params *p);

/* Adds a tensor (before ef_params_alloc). `name`: 1..EF_PARAM_NAME_MAX bytes of printable ASCII
 * (0x21..0x7e) other than '"' and '\\', not "__metadata__" (reserved by safetensors), unique in
 * the table. `ndim` in 1..EF_PARAM_MAX_DIMS, every dimension >= 1. The index of the new tensor
 * goes to *index when index is not NULL. EF_ERR_ARG naming the problem (bad or duplicate name,
 * bad shape, bad init, table already allocated), EF_ERR_NOMEM. */
ef_status ef_params_add(ef_params *p, const char *name, int ndim, const int64_t *shape,
                        ef_init init, int *index);
/* Allocates data and grad (zero-filled) and freezes the table. EF_ERR_ARG (empty table or
 * already allocated), EF_ERR_NOMEM. */
ef_status ef_params_alloc(ef_params *p);

/* The tensor called `name`: *out (and *index when not NULL). EF_ERR_ARG naming an unknown name. */
ef_status ef_params_find(const ef_params *p, const char *name, const ef_param **out, int *index);
/* Its values and gradients, or NULL (with the error set) for an unknown name or an unallocated
 * table. */
float *ef_params_data(ef_params *p, const char *name);
float *ef_params_grad(ef_params *p, const char *name);

/* Initialises every tensor by its ef_init from `seed`. Tensor t draws from the generator's stream
 * ef_params_stream(t->name): its values depend only on (seed, name, shape, init), never on the
 * other tensors of the table or on their order. EF_ERR_ARG when not allocated. */
ef_status ef_params_init(ef_params *p, uint64_t seed);
/* The random stream of a tensor name (64-bit FNV-1a of the name with the top bit set, so the
 * streams never meet the small stream numbers the attention mechanisms use). */
uint64_t ef_params_stream(const char *name);
/* grad = 0 over the whole buffer. */
void ef_params_zero_grad(ef_params *p);

/* ---------------------------------------------------------------------------------------------
 * Checkpoints in the safetensors format (checkpoint.c, docs/checkpoints.md):
 *   8-byte little-endian header length N, N bytes of JSON header
 *   {"__metadata__": {"key": "value", ...}, "name": {"dtype": "F32", "shape": [...],
 *    "data_offsets": [begin, end]}, ...} padded with spaces to a multiple of 8, then the tensors'
 *   little-endian F32 data, packed in table order (offsets relative to the data section).
 * They need cJSON (Debian libcjson-dev) at build time; without it every function below returns
 * EF_ERR_UNSUPPORTED and ef_ckpt_supported() is 0.
 * ------------------------------------------------------------------------------------------- */

/* One metadata entry: both strings valid UTF-8, keys non-empty and unique. */
typedef struct ef_ckpt_meta {
    const char *key, *value;
} ef_ckpt_meta;

/* 1 when this build reads and writes checkpoints. */
int ef_ckpt_supported(void);

/* Writes the table's parameters (not the gradients) and the n_meta metadata entries to `path`,
 * atomically: a temporary file in the same folder is written, flushed to disk, renamed over
 * `path`, and the folder is synced, so `path` holds either its old content or the complete new
 * one. EF_ERR_ARG (unallocated table, bad metadata), EF_ERR_IO naming the path and the system's
 * reason (no temporary file is left behind), EF_ERR_NOMEM. */
ef_status ef_ckpt_save(const ef_params *p, const char *path, const ef_ckpt_meta *meta, int n_meta);

/* Reads the parameters of `path` into the table's data (grad untouched). The file must hold
 * exactly the table's tensors (same names, F32, same shapes), with valid bounds; anything else is
 * EF_ERR_FORMAT naming the problem, checked before any value is written to the table.
 * EF_ERR_IO when the file cannot be read (then the values may be partly overwritten), EF_ERR_ARG
 * (unallocated table), EF_ERR_NOMEM. */
ef_status ef_ckpt_load(ef_params *p, const char *path);

/* The metadata value of `key` in checkpoint `path`, validated as a checkpoint (everything except
 * the match against a table), so a model can read its spec before building its table.
 * *value is a NUL-terminated copy; release it with ef_free(). EF_ERR_FORMAT for a malformed file or
 * a missing key, EF_ERR_IO, EF_ERR_NOMEM. */
ef_status ef_ckpt_read_meta(const char *path, const char *key, char **value);

#endif
