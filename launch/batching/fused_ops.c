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
 * depend on the rows beside it. Single-threaded: a decode step's rows are a few kB.
 * Widths are multiples of 8 (hidden sizes, intermediate sizes, half head dims): fused_ops.py checks.
 */
#include <math.h>
#include "bf16_simd.h"

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
