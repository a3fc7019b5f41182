/* bf16 <-> fp32 and AVX2 helpers shared by the kernels (linear.c, linear_avx512bf16.c, attention.c).
 * bf16 is the top half of an fp32, so widening is a 16-bit shift and narrowing is a rounding. */
#ifndef CPU_ARENA_BF16_SIMD_H
#define CPU_ARENA_BF16_SIMD_H

#include <immintrin.h>
#include <stdint.h>

static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;  /* NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline float f32_to_float(float f) { return f; }

/* sum_i w[i] * x[i] in fp32: 8 lanes, then the tail. The linear kernel's blocks compute each of their
 * outputs by this same sequence, so it does not matter which one computed a row. One definition per
 * weight type (W, its 8-lane load, its scalar widening). */
#define DEFINE_DOT(name, W, LOAD8, WTOF)                                   \
    static inline float name(const W *w, int n, const float *x) {          \
        __m256 a = _mm256_setzero_ps();                                    \
        int i = 0;                                                         \
        for (; i + 8 <= n; i += 8)                                         \
            a = _mm256_fmadd_ps(LOAD8(w + i), _mm256_loadu_ps(x + i), a);  \
        float r = hsum(a);                                                 \
        for (; i < n; i++)                                                 \
            r += WTOF(w[i]) * x[i];                                        \
        return r;                                                          \
    }

DEFINE_DOT(dot_bf16, uint16_t, load8_bf16, bf16_to_float)
DEFINE_DOT(dot_f32, float, _mm256_loadu_ps, f32_to_float)

#endif
