/* Memory read bandwidth probe for the bench (bench/raw.py): sums a large fp32 array.
 *
 * Why not torch's x.sum(): the roofline must be the most the memory gives a reader, and the bf16
 * decode kernel, which reads 8 rows at once per thread, outran torch's sum on this machine (decode
 * at 1.04x the "roofline" torch's sum gave). Here each thread reads 8 streams at once, like the
 * kernel, with 4 independent accumulators per stream pair so the adds never wait on each other.
 */
#include <immintrin.h>

float read_probe(const float *a, long n, int threads) {
    float total = 0.0f;
    const long chunk = 1L << 15;  /* 128 kB per stream block */
    const long blocks = n / (8 * chunk);
    #pragma omp parallel for schedule(static) reduction(+:total) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const float *p = a + b * 8 * chunk;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (long i = 0; i < chunk; i += 8) {
            s0 = _mm256_add_ps(s0, _mm256_add_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(p + chunk + i)));
            s1 = _mm256_add_ps(s1, _mm256_add_ps(_mm256_loadu_ps(p + 2 * chunk + i), _mm256_loadu_ps(p + 3 * chunk + i)));
            s2 = _mm256_add_ps(s2, _mm256_add_ps(_mm256_loadu_ps(p + 4 * chunk + i), _mm256_loadu_ps(p + 5 * chunk + i)));
            s3 = _mm256_add_ps(s3, _mm256_add_ps(_mm256_loadu_ps(p + 6 * chunk + i), _mm256_loadu_ps(p + 7 * chunk + i)));
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        float lane[8];
        _mm256_storeu_ps(lane, s);
        for (int k = 0; k < 8; k++)
            total += lane[k];
    }
    for (long i = blocks * 8 * chunk; i < n; i++)
        total += a[i];
    return total;
}
