/* y = x @ w.T (+ bias) on CPUs with AVX2 + FMA (built by native.py), for bf16 and fp32 weights.
 *
 * Why bf16: on a CPU without bf16 units PyTorch runs a bf16 linear on generic kernels: one row reads a
 * 7B-shaped weight at ~11 GB/s where a plain read of memory gives ~20, every further row costs about one
 * more row (4 rows: 2.8x the time of one), and a 64-token prompt runs at ~19 GFLOP/s. A bf16 weight
 * widens to fp32 with one shift, so this kernel reads each weight once from memory, widens it in
 * registers, and multiplies it with up to XTILE input rows while it is in cache.
 *
 * Why fp32: the same shape of kernel reads an fp32 weight at memory speed for one decode row, where
 * MKL's sgemm and oneDNN's packed matmul reach about a third of it on the reference machine (AMD EPYC,
 * AVX2; SmolLM2-135M step: 79 ms in aten::mm for 540 MB of weights, 6.8 GB/s).
 *
 * Accumulation is fp32 in both, like PyTorch's. Every output element is computed by the same
 * instructions in the same order whatever the number of rows, so a row's result does not depend on
 * the rows batched with it (the batching worker's "batched equals single" rests on that).
 *
 * w: [n_out, n_in], x: [rows, n_in], bias: [n_out] or NULL, y: [rows, n_out], row-major;
 * buf: XTILE * n_in floats of scratch.
 */
#include "bf16_simd.h"

/* Input rows multiplied per pass over the weight; more rows read the weight again, once per XTILE rows.
 * Prefill (many rows) is where it matters. 64 rows of a 4096-wide input (1 MB fp32) no longer fit in L2,
 * but reading them from L3 costs less than reading the weight from memory again: on the reference machine
 * a 196-row pass over Qwen2.5-0.5B-shaped fp32 weights took 2.13 s with 16 rows per pass and 1.77 s with
 * 64, and 64 rows over 7B-shaped bf16 layers 216 ms against 183 ms. 1-16 rows are unchanged. */
#define XTILE 64

/* A pass over this many input rows or more is a prompt's (decode passes have at most max_batch = 8 rows):
 * it takes block3x4 (compute-bound, linear_blocks.h), fewer rows the blocks tuned for reading memory. */
#define PROMPT_ROWS 9

/* Columns per chunk of a prompt pass (linear_blocks.h, PROMPT_BLOCK says why). A multiple of 8. */
#define KCHUNK 1024

/* The scratch the caller allocates depends on it (native.py reads it here, so the two cannot disagree). */
int linear_xtile(void) { return XTILE; }

/* bf16 weight, bf16 activations (rounded once per output, to nearest even like torch). */
#define W uint16_t
#define LOAD8 load8_bf16
#define WTOF bf16_to_float
#define DOT dot_bf16
#define X uint16_t
#define XTOF bf16_to_float
#define FTOX float_to_bf16
#define LINEAR linear_bf16
#define DECODE_BLOCK 4
#include "linear_blocks.h"
#undef W
#undef LOAD8
#undef WTOF
#undef DOT
#undef X
#undef XTOF
#undef FTOX
#undef LINEAR
#undef DECODE_BLOCK

/* fp32 weight, fp32 activations. */
#define W float
#define LOAD8 _mm256_loadu_ps
#define WTOF f32_to_float
#define DOT dot_f32
#define X float
#define XTOF f32_to_float
#define FTOX f32_to_float
#define LINEAR linear_f32
#define DECODE_BLOCK 8
#include "linear_blocks.h"
