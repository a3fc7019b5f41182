/* The attention kernel's body, included by attention.c once per element type. Before including, define:
 *   ELEM   the element type of q, k, v and out   (uint16_t for bf16, float)
 *   TOF    one element -> float                   (bf16_to_float, f32_to_float)
 *   FROMF  float -> one element                   (float_to_bf16, f32_to_float)
 *   LOAD8  8 elements -> __m256                   (load8_bf16, _mm256_loadu_ps)
 *   NAME   the exported function's name
 * and SUFFIX, which names this copy's helpers apart from the other copy's.
 */
#define SCORES8 PASTE(scores8, SUFFIX)
#define WEIGH PASTE(weigh, SUFFIX)

/* The scores of the 8 keys at kp[0..7] (kp[j] points at key j's first element) against the fp32 query qf: 8
 * lanes a key, D rounded down to 8, then reduce8, then the scalar tail (D % 8) left to right. Every key's score
 * is this one sequence of operations, wherever it sits in the block of 8 and whichever keys share the block. */
static inline __m256 SCORES8(const ELEM *const *kp, const float *qf, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m256 x = _mm256_loadu_ps(qf + d);
        a0 = _mm256_fmadd_ps(LOAD8(kp[0] + d), x, a0);
        a1 = _mm256_fmadd_ps(LOAD8(kp[1] + d), x, a1);
        a2 = _mm256_fmadd_ps(LOAD8(kp[2] + d), x, a2);
        a3 = _mm256_fmadd_ps(LOAD8(kp[3] + d), x, a3);
        a4 = _mm256_fmadd_ps(LOAD8(kp[4] + d), x, a4);
        a5 = _mm256_fmadd_ps(LOAD8(kp[5] + d), x, a5);
        a6 = _mm256_fmadd_ps(LOAD8(kp[6] + d), x, a6);
        a7 = _mm256_fmadd_ps(LOAD8(kp[7] + d), x, a7);
    }
    __m256 r = reduce8(a0, a1, a2, a3, a4, a5, a6, a7);
    if (d < D) {
        float tail[8];
        for (int j = 0; j < 8; j++) {
            float t = 0.0f;
            for (int e = d; e < D; e++)
                t += TOF(kp[j][e]) * qf[e];
            tail[j] = t;
        }
        r = _mm256_add_ps(r, _mm256_loadu_ps(tail));
    }
    return r;
}

/* out[0..nv*8) = sum over t < n of p[t] * v_t[d0 + ...], t left to right, each lane one fused multiply-add a key
 * (nv: 1..8 vectors, a constant where inlined, so the sums stay in registers); a zero weight adds nothing. */
static inline __attribute__((always_inline)) void WEIGH(const ELEM *vp, long vs, const float *p, int n, int d0,
                                                        const int nv, float *out) {
    __m256 acc[8];
    for (int j = 0; j < nv; j++)
        acc[j] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
        if (p[t] == 0.0f)
            continue;
        const __m256 pv = _mm256_set1_ps(p[t]);
        const ELEM *vt = vp + t * vs + d0;
        for (int j = 0; j < nv; j++)
            acc[j] = _mm256_fmadd_ps(LOAD8(vt + 8 * j), pv, acc[j]);
    }
    for (int j = 0; j < nv; j++)
        _mm256_storeu_ps(out + 8 * j, acc[j]);
}

void NAME(const ELEM *q, const long *q_strides, const ELEM *k, const long *k_strides, const ELEM *v,
          const long *v_strides, const float *mask, const long *mask_strides, ELEM *out, float *scores, int B,
          int H, int Hkv, int Q, int T, int D, float scale, int causal, int threads) {
    const int group = H / Hkv;
    const long rows = (long)B * H * Q;
    const long ks = k_strides[2], vs = v_strides[2];
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
        float *s = scores + (long)omp_get_thread_num() * (T + 8);  /* + 8: a last block's spare lanes */
        float qf[D];  /* D <= 256, checked by the caller */
        for (int d = 0; d < D; d++)
            qf[d] = TOF(qp[d]) * scale;
        /* Scores 8 keys at a time; a last, partial block repeats its last key in the spare lanes. */
        __m256 top8 = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < n; t += 8) {
            const ELEM *kb[8];
            for (int j = 0; j < 8; j++)
                kb[j] = kp + (t + j < n ? t + j : n - 1) * ks;
            __m256 r = SCORES8(kb, qf, D);
            if (mp) {
                float m8[8];
                for (int j = 0; j < 8; j++)
                    m8[j] = mp[(t + j < n ? t + j : n - 1) * mask_strides[3]];
                r = _mm256_add_ps(r, _mm256_loadu_ps(m8));
            }
            _mm256_storeu_ps(s + t, r);
            top8 = _mm256_max_ps(top8, r);  /* spare lanes repeat a real key: the maximum is the same */
        }
        float top8s[8];
        _mm256_storeu_ps(top8s, top8);
        float top = top8s[0];
        for (int j = 1; j < 8; j++)
            top = top8s[j] > top ? top8s[j] : top;
        float total = 0.0f;
        if (top == -INFINITY) {  /* a fully masked row gives zeros, not NaN */
            for (int t = 0; t < n; t++)
                s[t] = 0.0f;
        } else {
            total = exp_scores(s, n, top);
        }
        const float norm = total > 0.0f ? 1.0f / total : 0.0f;
        for (int t = 0; t < n; t++)
            s[t] *= norm;
        float acc[D];
        int d = 0;
        for (; d + 64 <= D; d += 64)
            WEIGH(vp, vs, s, n, d, 8, acc + d);
        switch ((D - d) / 8) {
        case 1: WEIGH(vp, vs, s, n, d, 1, acc + d); break;
        case 2: WEIGH(vp, vs, s, n, d, 2, acc + d); break;
        case 3: WEIGH(vp, vs, s, n, d, 3, acc + d); break;
        case 4: WEIGH(vp, vs, s, n, d, 4, acc + d); break;
        case 5: WEIGH(vp, vs, s, n, d, 5, acc + d); break;
        case 6: WEIGH(vp, vs, s, n, d, 6, acc + d); break;
        case 7: WEIGH(vp, vs, s, n, d, 7, acc + d); break;
        default: break;
        }
        for (d += (D - d) / 8 * 8; d < D; d++) {
            float a = 0.0f;
            for (int t = 0; t < n; t++)
                if (s[t] != 0.0f)
                    a += TOF(vp[t * vs + d]) * s[t];
            acc[d] = a;
        }
        ELEM *o = out + row * D;
        for (int e = 0; e < D; e++)
            o[e] = FROMF(acc[e]);
    }
}

#undef SCORES8
#undef WEIGH
