/* Attention for bf16 and fp32 models: decode (one new token over the KV cache) and prompts (many queries),
 * built by native.py and called through attention.py.
 *
 * Why decode: PyTorch's CPU scaled_dot_product_attention on bf16 with a single query costs ~0.6 ms per 7B
 * layer at 80 cached tokens and ~7.8 ms at 1000, where reading that cache takes ~1 ms: 250 ms per
 * token of a 7B model at 1000 tokens of context. This reads each cached key and value once.
 *
 * Why prompts, and fp32: the batching worker prefills prompts that arrive together in one pass, left-padded,
 * and computes their common beginning once, and it decodes rows of different lengths left-padded in one
 * batch. PyTorch's attention sums a row's keys in blocks that depend on the padding and on the split, so a
 * prompt's cache came out different batched than alone (SmolLM2-135M, 4 prompts: 27-96 thousand differing key
 * elements in bf16, 35-115 thousand in fp32), and answers can change. Here a query's output depends only on
 * its own real keys, in order: a masked key adds an exact zero.
 *
 * q: [B, H, Q, D] at q_strides; k, v: [B, Hkv, T, D] at their strides (D contiguous); the query heads
 * H / Hkv share a key head (grouped-query attention). mask: additive fp32 [B, H, Q, T] at mask strides
 * (0 where broadcast), or NULL. causal: query i sees keys 0..i only (top-left, as SDPA's is_causal).
 * out: [B, H, Q, D], contiguous, in the inputs' type. scores: threads * T floats. Scores, softmax and the
 * weighted sum are fp32; a bf16 output is rounded once.
 */
#include <math.h>
#include <omp.h>
#include "bf16_simd.h"

/* e^x for 8 floats x <= 0 (softmax after subtracting the maximum): Cephes' expf (x = n ln2 + r, a degree-5
 * polynomial for e^r, 2^n from the exponent bits), within a few ulp of expf. Below -87, e^x is under FLT_MIN
 * and comes out exactly 0: a masked key (-inf) must add an exact zero. Why: one expf call per score; 8 at a
 * time, a decode call of 4 rows x 14 heads over 1500 keys took 0.52 -> 0.43 ms, a 512-token causal prompt
 * 11.3 -> 9.3 ms a layer (the dot products are the rest). Every score goes through this same function, the
 * last partial 8 too (exp_scores), so a key's weight does not depend on where it falls in the row. */
static inline __m256 exp8(__m256 x) {
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  /* also turns -inf into a number */
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* s[t] = e^(s[t] - top) for t < n, every one through exp8 (the last partial 8 padded with -inf); returns their
 * sum, added left to right. */
static inline float exp_scores(float *s, int n, float top) {
    const __m256 m = _mm256_set1_ps(top);
    int t = 0;
    for (; t + 8 <= n; t += 8)
        _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m)));
    if (t < n) {
        float part[8];
        for (int j = 0; j < 8; j++)
            part[j] = t + j < n ? s[t + j] : -INFINITY;
        _mm256_storeu_ps(part, exp8(_mm256_sub_ps(_mm256_loadu_ps(part), m)));
        for (int j = 0; t + j < n; j++)
            s[t + j] = part[j];
    }
    float total = 0.0f;
    for (t = 0; t < n; t++)
        total += s[t];
    return total;
}

#define ELEM uint16_t
#define TOF bf16_to_float
#define FROMF float_to_bf16
#define DOT dot_bf16
#define LOAD8 load8_bf16
#define NAME attention_bf16
#include "attention_body.h"
#undef ELEM
#undef TOF
#undef FROMF
#undef DOT
#undef LOAD8
#undef NAME

#define ELEM float
#define TOF f32_to_float
#define FROMF f32_to_float
#define DOT dot_f32
#define LOAD8 _mm256_loadu_ps
#define NAME attention_f32
#include "attention_body.h"
