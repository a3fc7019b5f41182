/* Attention over bf16 queries, keys and values: decode (one new token over the KV cache) and prompts (many
 * queries), built by native.py.
 *
 * Why decode: PyTorch's CPU scaled_dot_product_attention on bf16 with a single query costs ~0.6 ms per 7B
 * layer at 80 cached tokens and ~7.8 ms at 1000, where reading that cache takes ~1 ms: 250 ms per
 * token of a 7B model at 1000 tokens of context. This reads each cached key and value once.
 *
 * Why prompts: the batching worker prefills prompts that arrive together in one pass, left-padded, and
 * computes their common beginning once; PyTorch's flash attention then sums a row's keys in blocks that
 * depend on the padding and on the split, so in bf16 a prompt's cache came out different batched than alone
 * (SmolLM2-135M, 4 prompts: 27-96 thousand differing key elements) and answers changed. Here a query's
 * output depends only on its own real keys, in order: a masked key adds an exact zero.
 *
 * q: [B, H, Q, D] at q_strides; k, v: [B, Hkv, T, D] at their strides (D contiguous); the query heads
 * H / Hkv share a key head (grouped-query attention). mask: additive fp32 [B, H, Q, T] at mask strides
 * (0 where broadcast), or NULL. causal: query i sees keys 0..i only (top-left, as SDPA's is_causal).
 * out: [B, H, Q, D] bf16, contiguous. scores: threads * T floats. Scores, softmax and the weighted sum
 * are fp32; the output is rounded once.
 */
#include <math.h>
#include <omp.h>
#include "bf16_simd.h"

void attention_bf16(const uint16_t *q, const long *q_strides, const uint16_t *k, const long *k_strides,
                    const uint16_t *v, const long *v_strides, const float *mask, const long *mask_strides,
                    uint16_t *out, float *scores, int B, int H, int Hkv, int Q, int T, int D, float scale,
                    int causal, int threads) {
    const int group = H / Hkv;
    const long rows = (long)B * H * Q;
    /* Prompt rows differ in length (causal): dynamic, in small pieces. Which thread computes a row does not
     * change its result. */
    #pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (long row = 0; row < rows; row++) {
        const int i = row % Q, h = (row / Q) % H, b = row / ((long)Q * H), g = h / group;
        const uint16_t *qp = q + b * q_strides[0] + h * q_strides[1] + i * q_strides[2];
        const uint16_t *kp = k + b * k_strides[0] + g * k_strides[1];
        const uint16_t *vp = v + b * v_strides[0] + g * v_strides[1];
        const float *mp = mask ? mask + b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2] : 0;
        const int n = causal ? (i + 1 < T ? i + 1 : T) : T;
        float *s = scores + (long)omp_get_thread_num() * T;
        float qf[D];  /* D <= 256, checked by the caller */
        for (int d = 0; d < D; d++)
            qf[d] = bf16_to_float(qp[d]) * scale;
        float top = -INFINITY;
        for (int t = 0; t < n; t++) {
            float r = dot_bf16(kp + t * k_strides[2], D, qf);
            if (mp)
                r += mp[t * mask_strides[3]];
            s[t] = r;
            if (r > top)
                top = r;
        }
        float total = 0.0f;
        for (int t = 0; t < n; t++) {
            s[t] = top == -INFINITY ? 0.0f : expf(s[t] - top);  /* a fully masked row gives zeros, not NaN */
            total += s[t];
        }
        const float norm = total > 0.0f ? 1.0f / total : 0.0f;
        float acc[D];
        for (int d = 0; d < D; d++)
            acc[d] = 0.0f;
        for (int t = 0; t < n; t++) {
            const float p = s[t] * norm;
            if (p == 0.0f)
                continue;
            const uint16_t *vt = vp + t * v_strides[2];
            const __m256 pv = _mm256_set1_ps(p);
            int d = 0;
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(load8_bf16(vt + d), pv, _mm256_loadu_ps(acc + d)));
            for (; d < D; d++)
                acc[d] += bf16_to_float(vt[d]) * p;
        }
        uint16_t *o = out + row * D;
        for (int d = 0; d < D; d++)
            o[d] = float_to_bf16(acc[d]);
    }
}
