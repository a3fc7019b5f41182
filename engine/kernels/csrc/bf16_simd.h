/* bf16 <-> fp32 and AVX2 helpers shared by the kernels (linear.c, linear_avx512bf16.c, attention.c, fused_ops.c).
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

/* 8 floats rounded to bf16 as float_to_bf16 rounds one (to nearest even, NaN -> 0x7fc0), kept as fp32 values
 * (low 16 bits zero): a bf16 result that the next operation reads, as torch rounds between two bf16 ops. */
static inline __m256 round8_bf16(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan);
}

static inline void store8_bf16(uint16_t *p, __m256 f) {
    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(round8_bf16(f)), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

static inline __m256 round8_f32(__m256 f) { return f; }

/* e^x for 8 floats x <= 0 (attention.c's softmax after subtracting the maximum, fused_ops.c's SiLU): Cephes' expf (x = n ln2 + r, a degree-5
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

/* PASTE(name, SUFFIX) -> name_SUFFIX: the kernels' bodies are included once per element type (attention_body.h,
 * fused_ops_body.h) and name each copy's functions with the SUFFIX the includer defines. */
#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)

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
