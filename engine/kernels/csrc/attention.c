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

/* Queries per tile (attention_body.h): the scores scratch holds QT rows of T + 8 floats per thread. */
#define QT 16
/* Value rows widened per block (VB * D floats on the stack, at most 32 KB). */
#define VB 32

int attention_tile_queries(void) { return QT; }

/* The scores of the 8 keys at kp[0..7] (fp32 rows) against the fp32 query qf: 8 lanes a key, D rounded down to
 * 8, then reduce8, then the scalar tail (D % 8) left to right. Every key's score is this one sequence of
 * operations, wherever it sits in the block of 8 and whichever keys share the block. */
static inline __m256 scores8(const float *const *kp, const float *qf, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m256 x = _mm256_loadu_ps(qf + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[0] + d), x, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[1] + d), x, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[2] + d), x, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[3] + d), x, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[4] + d), x, a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[5] + d), x, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[6] + d), x, a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[7] + d), x, a7);
    }
    __m256 r = reduce8(a0, a1, a2, a3, a4, a5, a6, a7);
    if (d < D) {
        float tail[8];
        for (int j = 0; j < 8; j++) {
            float t = 0.0f;
            for (int e = d; e < D; e++)
                t += kp[j][e] * qf[e];
            tail[j] = t;
        }
        r = _mm256_add_ps(r, _mm256_loadu_ps(tail));
    }
    return r;
}

/* acc[0..nv*8) (+)= sum over t < n of p[t] * row t's dims d0 + ... (row t at vr + t * vs, fp32), t left to
 * right, each lane one fused multiply-add a key (nv: 1..8 vectors, a constant where inlined, so the sums stay in
 * registers); a zero weight adds nothing. `first`: start from 0, else from the sums parked in acc. */
static inline __attribute__((always_inline)) void weigh(const float *vr, long vs, const float *p, int n, int d0,
                                                        const int nv, float *acc, int first) {
    __m256 a[8];
    for (int j = 0; j < nv; j++)
        a[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + 8 * j);
    for (int t = 0; t < n; t++) {
        if (p[t] == 0.0f)
            continue;
        const __m256 pv = _mm256_set1_ps(p[t]);
        const float *vt = vr + t * vs + d0;
        for (int j = 0; j < nv; j++)
            a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(vt + 8 * j), pv, a[j]);
    }
    for (int j = 0; j < nv; j++)
        _mm256_storeu_ps(acc + 8 * j, a[j]);
}

#define ELEM uint16_t
#define TOF bf16_to_float
#define FROMF float_to_bf16
#define WIDE 1
#define NAME attention_bf16
#define SUFFIX bf16
#include "attention_body.h"
#undef ELEM
#undef TOF
#undef FROMF
#undef WIDE
#undef NAME
#undef SUFFIX

#define ELEM float
#define TOF f32_to_float
#define FROMF f32_to_float
#define WIDE 0
#define NAME attention_f32
#define SUFFIX f32
#include "attention_body.h"
