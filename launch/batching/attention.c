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
 * out: [B, H, Q, D], contiguous, in the inputs' type. scores: threads * (T + 8) floats. Scores, softmax and the
 * weighted sum are fp32; a bf16 output is rounded once.
 */
#include <math.h>
#include <omp.h>
#include "bf16_simd.h"

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

/* Lane sums of 8 vectors: lane j of the result is a_j's 8 lanes added as ((0+1)+(2+3)) + ((4+5)+(6+7)), the
 * same order for every j. */
static inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    /* u0: a0..a3's lanes 0-3 summed (low half) and lanes 4-7 summed (high half); u1 the same for a4..a7 */
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#define ELEM uint16_t
#define TOF bf16_to_float
#define FROMF float_to_bf16
#define LOAD8 load8_bf16
#define NAME attention_bf16
#define SUFFIX bf16
#include "attention_body.h"
#undef ELEM
#undef TOF
#undef FROMF
#undef LOAD8
#undef NAME
#undef SUFFIX

#define ELEM float
#define TOF f32_to_float
#define FROMF f32_to_float
#define LOAD8 _mm256_loadu_ps
#define NAME attention_f32
#define SUFFIX f32
#include "attention_body.h"
