/* The attention kernel's body, included by attention.c once per element type. Before including, define:
 *   ELEM   the element type of q, k, v and out   (uint16_t for bf16, float)
 *   TOF    one element -> float                   (bf16_to_float, f32_to_float)
 *   FROMF  float -> one element                   (float_to_bf16, f32_to_float)
 *   DOT    a key row . an fp32 query              (dot_bf16, dot_f32: bf16_simd.h)
 *   LOAD8  8 elements -> __m256                   (load8_bf16, _mm256_loadu_ps)
 *   NAME   the exported function's name
 */
void NAME(const ELEM *q, const long *q_strides, const ELEM *k, const long *k_strides, const ELEM *v,
          const long *v_strides, const float *mask, const long *mask_strides, ELEM *out, float *scores, int B,
          int H, int Hkv, int Q, int T, int D, float scale, int causal, int threads) {
    const int group = H / Hkv;
    const long rows = (long)B * H * Q;
    /* Prompt rows differ in length (causal): dynamic, in small pieces. Which thread computes a row does not
     * change its result. */
    #pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (long row = 0; row < rows; row++) {
        const int i = row % Q, h = (row / Q) % H, b = row / ((long)Q * H), g = h / group;
        const ELEM *qp = q + b * q_strides[0] + h * q_strides[1] + i * q_strides[2];
        const ELEM *kp = k + b * k_strides[0] + g * k_strides[1];
        const ELEM *vp = v + b * v_strides[0] + g * v_strides[1];
        const float *mp = mask ? mask + b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2] : 0;
        const int n = causal ? (i + 1 < T ? i + 1 : T) : T;
        float *s = scores + (long)omp_get_thread_num() * T;
        float qf[D];  /* D <= 256, checked by the caller */
        for (int d = 0; d < D; d++)
            qf[d] = TOF(qp[d]) * scale;
        float top = -INFINITY;
        for (int t = 0; t < n; t++) {
            float r = DOT(kp + t * k_strides[2], D, qf);
            if (mp)
                r += mp[t * mask_strides[3]];
            s[t] = r;
            if (r > top)
                top = r;
        }
        float total = 0.0f;
        if (top == -INFINITY) {  /* a fully masked row gives zeros, not NaN */
            for (int t = 0; t < n; t++)
                s[t] = 0.0f;
        } else {
            total = exp_scores(s, n, top);
        }
        const float norm = total > 0.0f ? 1.0f / total : 0.0f;
        float acc[D];
        for (int d = 0; d < D; d++)
            acc[d] = 0.0f;
        for (int t = 0; t < n; t++) {
            const float p = s[t] * norm;
            if (p == 0.0f)
                continue;
            const ELEM *vt = vp + t * v_strides[2];
            const __m256 pv = _mm256_set1_ps(p);
            int d = 0;
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(LOAD8(vt + d), pv, _mm256_loadu_ps(acc + d)));
            for (; d < D; d++)
                acc[d] += TOF(vt[d]) * p;
        }
        ELEM *o = out + row * D;
        for (int d = 0; d < D; d++)
            o[d] = FROMF(acc[d]);
    }
}
