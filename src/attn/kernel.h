/*
 * kernel.h - what kernel.c (the kernel-attention engine, `linear` and `performer`) shares with
 * kernel_linear.c (`linear`'s own fast path): the plan, the per-thread workspace, the call of
 * one forward / backward and the layout of `saved`. Internal to those two files.
 */
#ifndef EF_ATTN_KERNEL_H
#define EF_ATTN_KERNEL_H

#include "attn/attn.h"

#include <stdatomic.h>

enum { KC = 128 };
/* linear: non-causal chunk (rows of a feature buffer), causal chunk (LCC <= LN) */
enum { LN = 256, LCC = 64 };
enum { KM_ELU, KM_SOFTMAX, KM_HYP, KM_TRIG, KM_RELU };

extern const ef_attn_ops ef_attn_ops_linear, ef_attn_ops_performer;

/* Returns the status of `expr` from the enclosing function when it is not EF_OK. */
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        ef_status try_st_ = (expr);                                                                \
        if (try_st_ != EF_OK) return try_st_;                                                      \
    } while (0)

typedef struct kwork {
    float *phq, *phk; /* [KC][F] features of a query / key chunk (log values before exp) */
    float *uq, *uk;   /* [KC][m] projections W x^ (performer) */
    float *nq, *nk;   /* [KC] |x^|^2 / 2 */
    float *shq;       /* [KC] per-row query shifts (0 without stabilisation) */
    float *shk;       /* [KC] per-key own shifts (causal) */
    float *pr, *rho;  /* [KC] per-row prefix key shift P_r, exp(c_prev - P_r) (causal) */
    float *ksc;       /* [KC] per-key factor exp(s_j - c) (causal backward) */
    float *A;         /* [KC][KC] intra-chunk scores (causal) */
    float *num;       /* [KC][Dv] */
    float *S, *z;     /* [F][Dv], [F] */
    float *dS, *dz;   /* [F][Dv], [F] */
    float *G, *dd;    /* [KC][Dv] dO / den, [KC] -(dO . out) / den */
    float *dph;       /* [KC][F] gradient wrt features */
    float *dA;        /* [KC][KC] */
    float *tmp;       /* [KC][max(F, D)] */
    /* linear only: features of a chunk [LN][F], the causal chunk's masked products
     * [LCC][LCC], per-row 1/den and dO.out [LN] */
    float *lq, *lk, *lA, *lM, *linv, *le;
} kwork;

typedef struct kplan {
    int kind, F, m; /* feature map, features, random projections */
    float xs;       /* x^ = x * xs */
    float eps;      /* added to the (unshifted) normaliser */
    int stabilize, ortho, redraw, nchunks;
    int64_t epoch, calls; /* feature draw in use; training forwards since the last draw */
    int replaying;        /* inside ef_attn_forward_replay: the record's draw, no counting */
    float *W;             /* [m][D] random projections (performer) */
    double *qr;           /* QR workspace (D x D doubles) */
    float *gtmp;          /* [D] Gaussian draws for the row norms */
    kwork *ws;
    void *block;
    /* reference path (ref=1), doubles, one (batch, head): features and projections of q and k,
     * their shifts, gradients wrt the features, dV accumulators, one row of scratch */
    double *rfq, *rfk, *ruq, *ruk, *rsq, *rsk, *rgq, *rgk, *rdv, *rrow;
    void *rblock;
} kplan;

/* One forward or backward call: its arguments and the first failure of a work item. */
typedef struct kcall {
    ef_attn *a;
    const ef_attn_io *io;
    float *saved;
    const float *dout;
    float *dq, *dk, *dv;
    atomic_int failed; /* 0 until a work item fails; the first failure is kept below */
    ef_status st;
    char msg[256];
} kcall;

/* saved: den [B][H][q_len], the key shift of every chunk [B][H][nchunks], then (non-causal
 * linear) S, z [B][H][F*Dv + F], and the feature epoch (int64, last 8 bytes). */
static inline float *den_of(const ef_attn *a, float *saved, int64_t bh) {
    return saved + (size_t)bh * a->shape.q_len;
}
static inline float *shifts_of(const ef_attn *a, float *saved, int64_t bh) {
    const kplan *p = a->impl;
    return saved + (size_t)a->shape.batch * a->shape.heads * a->shape.q_len +
           (size_t)bh * p->nchunks;
}

/* `linear`'s fast path for (batch, head) bh (kernel_linear.c): forward writes out and, with
 * c->saved, den, the shifts (-inf) and, non-causal, S and z; backward overwrites dq, dk, dv. */
ef_status ef_kernel_linear_forward(kcall *c, int64_t bh, kwork *w);
ef_status ef_kernel_linear_backward(kcall *c, int64_t bh, kwork *w);

#endif
