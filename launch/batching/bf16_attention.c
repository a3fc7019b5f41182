/* Attention of one new token over a bf16 KV cache (decode), for CPUs without bf16 units (built by native.py).
 *
 * Why: PyTorch's CPU scaled_dot_product_attention on bf16 with a single query costs ~0.6 ms per 7B
 * layer at 80 cached tokens and ~7.8 ms at 1000, where reading that cache takes ~1 ms: 250 ms per
 * token of a 7B model at 1000 tokens of context. This reads each cached key and value once.
 *
 * q: [B, H, D] at q_strides; k, v: [B, Hkv, T, D] at their strides (D contiguous); the query heads
 * H / Hkv share a key head (grouped-query attention). mask: additive fp32 [B, H, T] at mask
 * strides (0 where broadcast), or NULL. out: [B, H, D] bf16, contiguous. scores: B * H * T floats.
 * Scores, softmax and the weighted sum are fp32; the output is rounded once.
 */
#include <math.h>
#include "bf16_simd.h"

void decode_attention_bf16(const uint16_t *q, const long *q_strides, const uint16_t *k, const long *k_strides,
                           const uint16_t *v, const long *v_strides, const float *mask, const long *mask_strides,
                           uint16_t *out, float *scores, int B, int H, int Hkv, int T, int D, float scale,
                           int threads) {
    const int group = H / Hkv;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, g = h / group;
        const uint16_t *qp = q + b * q_strides[0] + h * q_strides[1];
        const uint16_t *kp = k + b * k_strides[0] + g * k_strides[1];
        const uint16_t *vp = v + b * v_strides[0] + g * v_strides[1];
        const float *mp = mask ? mask + b * mask_strides[0] + h * mask_strides[1] : 0;
        float *s = scores + (long)bh * T;
        float qf[D];  /* D <= 256, checked by the caller */
        for (int d = 0; d < D; d++)
            qf[d] = bf16_to_float(qp[d]) * scale;
        float top = -INFINITY;
        for (int t = 0; t < T; t++) {
            float r = dot_bf16(kp + t * k_strides[2], D, qf);
            if (mp)
                r += mp[t * mask_strides[2]];
            s[t] = r;
            if (r > top)
                top = r;
        }
        float total = 0.0f;
        for (int t = 0; t < T; t++) {
            s[t] = top == -INFINITY ? 0.0f : expf(s[t] - top);  /* a fully masked row gives zeros, not NaN */
            total += s[t];
        }
        const float norm = total > 0.0f ? 1.0f / total : 0.0f;
        float acc[D];
        for (int d = 0; d < D; d++)
            acc[d] = 0.0f;
        for (int t = 0; t < T; t++) {
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
        uint16_t *o = out + (long)bh * D;
        for (int d = 0; d < D; d++)
            o[d] = float_to_bf16(acc[d]);
    }
}
