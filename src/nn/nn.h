/*
 * nn.h - the dense layers of the Transformer (internal, not installed): linear, layer norm,
 * GELU, token embedding, position encodings (sinusoidal, learned, axial) and the chunked
 * feed-forward layer. Derivations of every backward: docs/nn.md.
 *
 * Style (llm.c): each layer is a pair
 *     x_forward(out, saved..., inputs..., params..., dims)
 *     x_backward(dinp, dparams..., dout, saved..., inputs..., params..., dims)
 * and the backward restates the forward line it differentiates.
 *
 * Conventions (every function below):
 *   - fp32, row-major, contiguous. Activations are [rows][C] with rows = batch * len (tokens);
 *     the layers that need the sequence structure (positions) take batch and len.
 *   - Backward OVERWRITES input gradients (dinp, dx) and ACCUMULATES parameter gradients
 *     (dw, db, dgain, dtable, ...): zero the parameter gradients once per step, not per call.
 *   - Functions that can fail (bad token ids, sizes that do not fit, a GEMM failure) return an
 *     ef_status and set ef_last_error() to a message naming the bad value; the others cannot
 *     fail and return void. Nothing prints, exits or allocates: a layer that needs scratch
 *     memory takes a caller's workspace of *_ws_floats(...) floats.
 *   - Results are bitwise identical whatever the thread count (ef_set_num_threads):
 *     element-wise loops run on fixed blocks of rows through ef_parallel_for, every reduction
 *     (column sums, gradient scatters, table sums over the batch) has one fixed order and one
 *     owner per output element, no float atomics. Products go through ef_sgemm, except the
 *     input gradients dout W^T, whose multi-threaded oneDNN result was measured to depend on
 *     the thread count: they use ef_sgemm_fixed (layers.c says why and what was measured).
 *   - Sizes are int (ef_sgemm's type) and must be >= 0; rows = 0 is a no-op.
 */
#ifndef EF_NN_H
#define EF_NN_H

#include "core/core.h"

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------------
 * Linear: out = inp W + b
 * ------------------------------------------------------------------------------------------- */
/* out [n][o] = inp [n][i] @ w [i][o] + b [o]      (b may be NULL: no bias)
 * Errors: a GEMM failure, negative sizes, NULL tensors. out must not alias inp. */
ef_status ef_linear_forward(float *out, const float *inp, const float *w, const float *b, int n,
                            int i, int o);
/* dinp [n][i]  = dout [n][o] @ w^T                 (overwritten; dinp NULL: not computed)
 * dw   [i][o] += inp^T @ dout                      (accumulated)
 * db   [o]    += sum over rows of dout             (accumulated, rows in order; NULL: none)
 * dinp must not alias dout or inp. */
ef_status ef_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, int n, int i, int o);

/* ---------------------------------------------------------------------------------------------
 * Layer norm over the last dim, with gain and bias
 * ------------------------------------------------------------------------------------------- */
/* mean [n] = sum_c inp[r][c] / C,  rstd [n] = 1 / sqrt(sum_c (inp[r][c] - mean)^2 / C + eps)
 * out  [n][C] = (inp - mean) * rstd * gain [C] + bias [C]
 * gain and bias are required (a plain normalisation: gain = 1, bias = 0). mean and rstd are
 * saved for backward (NULL both: inference). out may alias inp. */
void ef_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *gain,
                          const float *bias, int n, int c, float eps);
/* dinp  [n][C]  = rstd * (dxh - mean_c(dxh) - xh * mean_c(dxh * xh)),
 *                 xh = (inp - mean) * rstd, dxh = dout * gain             (overwritten)
 * dgain [C]    += sum over rows of dout * xh                              (accumulated)
 * dbias [C]    += sum over rows of dout                                   (accumulated)
 * dinp may alias dout (each row is read before it is written), not inp. */
void ef_layernorm_backward(float *dinp, float *dgain, float *dbias, const float *dout,
                           const float *inp, const float *mean, const float *rstd,
                           const float *gain, int n, int c);

/* ---------------------------------------------------------------------------------------------
 * GELU, the tanh approximation (GPT-2, HF "gelu_new" / "gelu_pytorch_tanh"):
 *     gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 * (not the erf form; the two differ by < 1e-3 absolute.)
 * ------------------------------------------------------------------------------------------- */
/* out [n] = gelu(inp [n])   for n floats; out may alias inp. */
void ef_gelu_forward(float *out, const float *inp, size_t n);
/* dinp [n] = gelu'(inp) * dout     (overwritten; dinp may alias dout or inp) */
void ef_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);

/* ---------------------------------------------------------------------------------------------
 * Token embedding
 * ------------------------------------------------------------------------------------------- */
/* out [n][C] = table [vocab][C] [tok [n]]
 * Errors: EF_ERR_ARG for a token outside [0, vocab) (the message names its index and value);
 * nothing is written then. */
ef_status ef_embedding_forward(float *out, const int32_t *tok, const float *table, int n, int vocab,
                               int c);
/* dtable [vocab][C] += dout [n][C] scattered to the rows tok[n]   (accumulated, rows in
 * order n = 0, 1, ...: a repeated token sums in the same order whatever the thread count)
 * Errors: as forward (checked before anything is written). */
ef_status ef_embedding_backward(float *dtable, const float *dout, const int32_t *tok, int n,
                                int vocab, int c);

/* ---------------------------------------------------------------------------------------------
 * Positions, added in place to x [batch][len][C] (position t of every sequence gets the same
 * vector). The gradient with respect to x is the identity (dx passes through unchanged), so
 * the backward functions only accumulate into the tables: dtable += sum over the batch, in
 * batch order.
 * ------------------------------------------------------------------------------------------- */
/* Sinusoidal (Vaswani et al. 2017, no parameters), k = floor(c / 2):
 *   x[b][t][2k]   += sin(t / 10000^(2k / C))
 *   x[b][t][2k+1] += cos(t / 10000^(2k / C))
 * (computed in double, rounded once; an odd C ends with a sine). No backward. */
void ef_pos_sinusoidal_forward(float *x, int batch, int len, int c);
/* The same values as a table pe [len][C] (x[b][t] += pe[t] is bitwise the forward above). */
void ef_pos_sinusoidal_table(float *pe, int len, int c);

/* Learned: x[b][t] += table [max_len][C] [t].  Errors: EF_ERR_SHAPE when len > max_len. */
ef_status ef_pos_learned_forward(float *x, const float *table, int batch, int len, int max_len,
                                 int c);
/* dtable [max_len][C] : dtable[t] += sum_b dx [batch][len][C] [b][t]  (rows t < len only) */
ef_status ef_pos_learned_backward(float *dtable, const float *dx, int batch, int len, int max_len,
                                  int c);

/* Axial, as HF Reformer's AxialPositionEmbeddings: factors n1 * n2 >= len, dims d1 + d2 = C;
 * position t = i * n2 + j gets concat(e1 [n1][d1] [i], e2 [n2][d2] [j]):
 *   x[b][t][0 .. d1)  += e1[t / n2]
 *   x[b][t][d1 .. C)  += e2[t % n2]
 * (HF requires n1 * n2 == len when training and <= in eval; here any len <= n1 * n2.)
 * Errors: EF_ERR_SHAPE when n1 * n2 < len or d1 + d2 != C (d1 or d2 may be 0). */
ef_status ef_pos_axial_forward(float *x, const float *e1, const float *e2, int batch, int len,
                               int c, int n1, int n2, int d1, int d2);
/* de1 [n1][d1] : de1[i] += sum_b sum_j dx[b][i*n2 + j][0 .. d1)    (b, then j, in order)
 * de2 [n2][d2] : de2[j] += sum_b sum_i dx[b][i*n2 + j][d1 .. C)    (b, then i, in order) */
ef_status ef_pos_axial_backward(float *de1, float *de2, const float *dx, int batch, int len, int c,
                                int n1, int n2, int d1, int d2);

/* ---------------------------------------------------------------------------------------------
 * Feed-forward, chunked (Reformer): out = gelu(inp W1 + b1) W2 + b2
 *
 * The n rows are processed in `chunks` chunks of rows = ceil(n / chunks) rows each (the last
 * one shorter), so the [rows][ff] hidden activation exists for one chunk at a time, in forward
 * AND backward: backward recomputes the chunk's pre-activation from inp (nothing is saved
 * between the calls). chunks = 1 is the plain layer; chunks > n is allowed (one row a chunk).
 *
 * Chunking and results: every output row is computed from its own input row only, with the
 * same operations in the same order, and the bias gradients are column sums over rows in row
 * order accumulated straight into db1 / db2 across chunks. So:
 *   - db2 (a column sum of dout) is bitwise equal for every `chunks`; so is out as long as
 *     ef_sgemm's result for a row does not depend on how many rows the product has: true of
 *     the built-in kernel, and of oneDNN for these (non-transposed) products as measured by
 *     tests/test_nn.c;
 *   - dinp and db1 also come from row-independent products (dout W2^T, dhp W1^T): bitwise with
 *     the built-in kernel; oneDNN picks its kernel for these transposed products by the row
 *     count, so they differ by a few ulp (measured 3e-7 of their scale; the test accepts 1e-5);
 *   - dw1 and dw2 are sums over rows computed one chunk at a time (dw += X_R^T D_R), so chunking
 *     re-associates them: NOT bitwise, equal to the fp32 rounding of sums of n terms (measured
 *     <= 6e-7 of their scale; the test accepts 1e-5).
 * With chunks fixed, every result is bitwise independent of the thread count.
 * ------------------------------------------------------------------------------------------- */
/* Workspace floats for n rows, ff hidden units and `chunks` chunks: 2 * ceil(n/chunks) * ff
 * (forward uses the first half). 0 when n, ff or chunks is <= 0 (ws may then be NULL). */
size_t ef_ffn_ws_floats(int n, int ff, int chunks);
/* out [n][C] = gelu(inp [n][C] @ w1 [C][ff] + b1 [ff]) @ w2 [ff][C] + b2 [C]
 * ws: ef_ffn_ws_floats(n, ff, chunks) floats. b1, b2 may be NULL. out must not alias inp.
 * Errors: chunks < 1, NULL tensors, a GEMM failure. */
ef_status ef_ffn_forward(float *out, const float *inp, const float *w1, const float *b1,
                         const float *w2, const float *b2, float *ws, int n, int c, int ff,
                         int chunks);
/* Per chunk (rows R): hp = inp_R w1 + b1, h = gelu(hp)            (recomputed, in ws)
 *   dw2 += h^T dout_R;  db2 += colsum(dout_R);  dh = dout_R w2^T;  dhp = gelu'(hp) * dh
 *   dw1 += inp_R^T dhp; db1 += colsum(dhp);     dinp_R = dhp w1^T  (overwritten; NULL: skip)
 * db1/db2 NULL: no bias (then b1 must be NULL in forward and here too). */
ef_status ef_ffn_backward(float *dinp, float *dw1, float *db1, float *dw2, float *db2,
                          const float *dout, const float *inp, const float *w1, const float *b1,
                          const float *w2, float *ws, int n, int c, int ff, int chunks);

#endif
