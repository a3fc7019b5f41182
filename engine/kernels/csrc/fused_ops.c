/* RMSNorm, rotary position embedding and SiLU-and-multiply of Llama-family models, one call each, for bf16
 * and fp32; built by native.py and called through fused_ops.py.
 *
 * Why: transformers computes each of them in 2-16 small torch ops (RMSNorm: to fp32, pow, mean, add, rsqrt,
 * mul, to bf16, mul; rotary: 2 x (mul, 2 slices, neg, cat, mul, add)), each with a fixed cost far above its
 * arithmetic (fused_ops.py has the measurements).
 *
 * Each operation rounds where torch rounds between its ops (round8: a bf16 product that the next op reads
 * was rounded to bf16 by torch), so the results equal transformers' except for the RMSNorm's sum of squares
 * (8 lanes, then left to right) and SiLU's e^x (exp8, a few ulp of expf) - below one bf16 ulp before
 * rounding. Every row is computed alone, in the same order whatever the batch: a row's result does not
 * depend on the rows beside it, nor on which thread computed it.
 * Threads: a decode step's rows are a few kB, done on the calling thread; a prompt's are split over `threads`
 * from PARALLEL_MIN elements on (SmolLM2, a 108-row prompt pass: silu_mul 184 us a layer on one thread).
 * Widths are multiples of 8 (hidden sizes, intermediate sizes, half head dims): fused_ops.py checks.
 */
#include <math.h>
#include "bf16_simd.h"

#define PARALLEL_MIN 16384

#define ELEM uint16_t
#define LOAD8 load8_bf16
#define STORE8 store8_bf16
#define ROUND8 round8_bf16
#define SUFFIX bf16
#include "fused_ops_body.h"
#undef ELEM
#undef LOAD8
#undef STORE8
#undef ROUND8
#undef SUFFIX

#define ELEM float
#define LOAD8 _mm256_loadu_ps
#define STORE8 _mm256_storeu_ps
#define ROUND8 round8_f32
#define SUFFIX f32
#include "fused_ops_body.h"

/* The rest of a Llama/Qwen2 decoder layer after attention, in one call, for bf16 weights on the AVX512_BF16
 * linear kernel (linear_avx512bf16.c; called only where the CPU has it):
 *   h = residual + o_proj(attn);  out = h + down(silu(gate(n)) * up(n)),  n = rms_norm(h)
 * each step rounded to bf16 where transformers rounds (linears, the adds, rms_norm, silu_mul as above).
 * Why: between two linears Python and torch's dispatcher run with caches that the weights' stream has just
 * emptied: each such gap costs 150-250 us on a 7B-shaped layer (fused_ops.py). This takes three of a layer's
 * four gaps away. Weights packed by native.pack_avx512bf16 (gate_up: gate's rows then up's); biases or NULL.
 * attn: [rows, attn_dim]; residual, out: [rows, hidden]; scratch: rows * (hidden + 3 * inter) elements. */
void linear_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
                        int n_out, int n_in, int threads);

static void add_bf16(const uint16_t *a, const uint16_t *b, uint16_t *out, long n, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)
    for (long i = 0; i < n; i += 8)
        store8_bf16(out + i, _mm256_add_ps(load8_bf16(a + i), load8_bf16(b + i)));
}

void mlp_block_bf16(const uint16_t *residual, const uint16_t *attn, const uint16_t *o_w, const uint16_t *o_b,
                    const uint16_t *norm_w, float eps, const uint16_t *gate_up_w, const uint16_t *gate_up_b,
                    const uint16_t *down_w, const uint16_t *down_b, uint16_t *out, uint16_t *scratch, int rows,
                    int attn_dim, int hidden, int inter, int threads) {
    uint16_t *h = scratch, *gu = scratch + (long)rows * hidden, *act = gu + (long)rows * 2 * inter;
    const long n = (long)rows * hidden;
    linear_bf16_avx512(o_w, attn, o_b, h, rows, hidden, attn_dim, threads);
    add_bf16(residual, h, out, n, threads);
    rms_norm_bf16(out, hidden, norm_w, h, rows, hidden, eps, threads);
    linear_bf16_avx512(gate_up_w, h, gate_up_b, gu, rows, 2 * inter, hidden, threads);
    silu_mul_bf16(gu, 2L * inter, gu + inter, 2L * inter, act, rows, inter, threads);
    linear_bf16_avx512(down_w, act, down_b, h, rows, hidden, inter, threads);
    add_bf16(out, h, out, n, threads);
}
