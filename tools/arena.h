/*
 * arena.h - the parts of `eformer arena` that tests check on their own (arena_core.c): the
 * exact attention it measures errors against, its structured inputs, the exponent fit and the
 * survey's claims per mechanism.
 */
#ifndef EF_ARENA_H
#define EF_ARENA_H

#include "eformer.h"

#include <stdint.h>

/* Least-squares slope of log(y) on log(x) over the n points with x > 0 and y > 0 (others are
 * left out). NAN when fewer than 2 such points or all their x are equal. */
double arena_slope(const double *x, const double *y, int n);

/* The survey's view of a mechanism (Tay et al., Table 1 and section 3): its family, the time
 * complexity the paper claims (text), the exponent of N that claim means for a fixed
 * configuration (1 for O(N), 1.5 for O(N sqrt N), 2 for O(N^2)), and the family of the
 * memory claim. NULL fields for a name it does not know. */
typedef struct arena_claim {
    const char *name;
    const char *family;     /* "exact", "fixed pattern", "global memory", "learnable pattern",
                             * "low rank", "kernel" (combinations joined by '+') */
    const char *complexity; /* "O(N^2)", "O(N*w)", ... */
    double exponent;        /* of N, for the configuration held fixed */
    double mem_exponent;    /* of N, of the memory the mechanism keeps */
} arena_claim;
/* The claim for mechanism `name`; a claim with NULL fields for an unknown name. */
arena_claim arena_claim_of(const char *name);

/* The inputs: [B][H][N][D] row-major float tensors (the library's layout). */
typedef struct arena_shape {
    int batch, heads, len, dim;
} arena_shape;

/* Gaussian inputs N(0, 1), from (seed, stream 0..3 for q, k, v, dout). */
void arena_gaussian(const arena_shape *s, uint64_t seed, float *q, float *k, float *v,
                    float *dout);

/* Structured inputs: attention peaked on nearby positions plus one long-range match per query,
 * as in trained models. Per (batch, head): positions p_i in D/2 dims (random Fourier features
 * of a Gaussian bump of width `width` positions: p_i . p_j ~ exp(-(i-j)^2 / (2 width^2))),
 * contents c_j ~ N(0, 1/(D - D/2)) in the other dims; k_j = [p_j, c_j], q_i = s [p_i,
 * c_m(i)] with m(i) a uniform random position (causal: before i; none for i = 0) and s such
 * that the logit scale 1/sqrt(D) times s is `sharp`. v and dout are N(0, 1). EF_ERR_NOMEM
 * (nothing written) when its scratch cannot be had. */
ef_status arena_structured(const arena_shape *s, int causal, double width, double sharp, uint64_t seed,
                      float *q, float *k, float *v, float *dout);

/* Exact softmax attention, forward and (dout != NULL) backward, for the arena's errors:
 * scores by ef_sgemm in blocks of query rows, a softmax with its sums in double, and the
 * gradients by the softmax backward with ef_sgemm. It shares no code with the mechanisms
 * (only ef_sgemm). causal: query i sees keys j <= i. shared_qk: the keys are q_j / |q_j| (k
 * is not read, dk is not written) and a query sees itself only when it sees nothing else
 * (Reformer's shared-QK attention); dq then includes the route through the keys.
 * scale = logit scale. dq, dk, dv are overwritten. Memory: rows x N floats twice (rows = 128).
 * Returns EF_OK, EF_ERR_NOMEM or ef_sgemm's failure. */
ef_status arena_exact(const arena_shape *s, int causal, int shared_qk, float scale,
                      const float *q, const float *k, const float *v, const float *dout,
                      float *out, float *dq, float *dk, float *dv);

/* Relative Frobenius error |x - ref|_F / |ref|_F over n values (sums in double); NAN if either
 * holds a non-finite value; |x|_F when ref is 0. */
double arena_rel_err(const float *x, const float *ref, size_t n);

/* --quality: one mechanism trained on a task for a fixed time by `eformer train` (run as a
 * child process of the same binary), then its held-out accuracy / bits per byte (arena_quality.c). */
typedef struct arena_quality_cfg {
    const char *exe;   /* the eformer binary */
    const char *task;  /* task spec */
    const char *model; /* model keys without attn= (the task adds vocab, max_len, head) */
    const char *dir;   /* where checkpoints and logs go */
    double seconds;    /* --time-limit of each run */
    double lr;
    int batch, threads, eval_samples;
} arena_quality_cfg;

typedef struct arena_quality {
    int ok;           /* 0: the run failed (note says why) */
    char note[240];
    long long steps;
    double tokens_per_s, loss, acc, bpb; /* the final eval; bpb NAN unless a text task */
    double seconds;                      /* wall time of the run */
} arena_quality;

/* Trains `spec` (file names use `name`) and fills *q. Returns 0, or -1 when the run failed. */
int arena_quality_run(const arena_quality_cfg *c, const char *name, const char *spec,
                      arena_quality *q);

#endif
