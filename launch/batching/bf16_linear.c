/* y = x @ w.T (+ bias) for a bf16 weight on CPUs with AVX2 + FMA but no bf16 units (built by native.py).
 *
 * Why: there PyTorch runs a bf16 linear on generic kernels: one row reads a 7B-shaped weight at
 * ~11 GB/s where a plain read of memory gives ~20, every further row costs about one more row (4
 * rows: 2.8x the time of one), and a 64-token prompt runs at ~19 GFLOP/s. A bf16 weight widens to
 * fp32 with one shift, so this kernel reads each weight once from memory, widens it in registers,
 * and multiplies it with up to XTILE input rows while it is in cache. Accumulation is fp32, like
 * PyTorch's.
 *
 * Every output element is computed by the same instructions in the same order whatever the number
 * of rows, so a row's result does not depend on the rows batched with it (the batching worker's
 * "batched equals single" rests on that).
 *
 * w: [n_out, n_in], x: [rows, n_in], bias: [n_out] or NULL, y: [rows, n_out], all bf16 (as uint16),
 * row-major; buf: XTILE * n_in floats of scratch.
 */
#include "bf16_simd.h"

/* Input rows multiplied per pass over the weight: 16 rows of a 4096-wide input (256 kB fp32) stay
 * in L2 while the weight streams by. More rows read the weight again, once per 16 rows. */
#define XTILE 16

/* 4 weight rows times 2 input rows: 8 accumulators, 4 widened weights and 2 inputs in 16 registers.
 * y1 == NULL: one input row (x1 is then x0 again and its sums are dropped). */
static void block4x2(const uint16_t *w, long ld, int n, const float *x0, const float *x1, float *y0, float *y1) {
    const uint16_t *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v0 = load8_bf16(w0 + i), v1 = load8_bf16(w1 + i), v2 = load8_bf16(w2 + i), v3 = load8_bf16(w3 + i);
        __m256 p = _mm256_loadu_ps(x0 + i), q = _mm256_loadu_ps(x1 + i);
        a00 = _mm256_fmadd_ps(v0, p, a00); a01 = _mm256_fmadd_ps(v1, p, a01);
        a02 = _mm256_fmadd_ps(v2, p, a02); a03 = _mm256_fmadd_ps(v3, p, a03);
        a10 = _mm256_fmadd_ps(v0, q, a10); a11 = _mm256_fmadd_ps(v1, q, a11);
        a12 = _mm256_fmadd_ps(v2, q, a12); a13 = _mm256_fmadd_ps(v3, q, a13);
    }
    float r00 = hsum(a00), r01 = hsum(a01), r02 = hsum(a02), r03 = hsum(a03);
    float r10 = hsum(a10), r11 = hsum(a11), r12 = hsum(a12), r13 = hsum(a13);
    for (; i < n; i++) {
        float p = x0[i], q = x1[i];
        float v0 = bf16_to_float(w0[i]), v1 = bf16_to_float(w1[i]), v2 = bf16_to_float(w2[i]), v3 = bf16_to_float(w3[i]);
        r00 += v0 * p; r01 += v1 * p; r02 += v2 * p; r03 += v3 * p;
        r10 += v0 * q; r11 += v1 * q; r12 += v2 * q; r13 += v3 * q;
    }
    y0[0] = r00; y0[1] = r01; y0[2] = r02; y0[3] = r03;
    if (y1) {
        y1[0] = r10; y1[1] = r11; y1[2] = r12; y1[3] = r13;
    }
}

/* 8 weight rows times 1 input row, for a single row (decode at batch 1): eight weight streams per
 * thread keep more reads in flight than four (7B-shaped 11008x4096 weight, 2 threads: 19.1 GB/s
 * against 16.6 with block4x2, where a plain read of a large array gives 20.5). Each output is the
 * same sequence of operations as in block4x2, so results do not depend on which one ran. */
static void block8x1(const uint16_t *w, long ld, int n, const float *x, float *y) {
    __m256 a[8];
    for (int k = 0; k < 8; k++)
        a[k] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 p = _mm256_loadu_ps(x + i);
        for (int k = 0; k < 8; k++)
            a[k] = _mm256_fmadd_ps(load8_bf16(w + k * ld + i), p, a[k]);
    }
    for (int k = 0; k < 8; k++) {
        float r = hsum(a[k]);
        for (int j = i; j < n; j++)
            r += bf16_to_float(w[k * ld + j]) * x[j];
        y[k] = r;
    }
}

/* x, bias and y are bf16 like the model's activations; the inputs are widened to fp32 once per pass
 * (into buf: XTILE * n_in floats from the caller) and every output is rounded once, after the bias.
 * Threads: the caller's count (torch.get_num_threads() on the calling thread), on the OpenMP runtime
 * torch already loaded (same soname, so the loader reuses it: one thread pool). */
void linear_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, float *buf,
                 int rows, int n_out, int n_in, int threads) {
    for (int m0 = 0; m0 < rows; m0 += XTILE) {
        const int m1 = rows - m0 < XTILE ? rows : m0 + XTILE;
        const int per_block = m1 - m0 == 1 ? 8 : 4, blocks = n_out / per_block;
        for (long i = 0; i < (long)(m1 - m0) * n_in; i++)
            buf[i] = bf16_to_float(x[(long)m0 * n_in + i]);
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < blocks + 1; b++) {
            float acc[2][8];
            if (b == blocks) {  /* the last n_out % per_block weight rows, one at a time */
                for (int o = per_block * blocks; o < n_out; o++)
                    for (int m = m0; m < m1; m++) {
                        float r = dot_bf16(w + (long)o * n_in, n_in, buf + (long)(m - m0) * n_in);
                        y[(long)m * n_out + o] = float_to_bf16(bias ? r + bf16_to_float(bias[o]) : r);
                    }
                continue;
            }
            const uint16_t *wb = w + (long)b * per_block * n_in;
            for (int m = m0; m < m1; m += 2) {
                const int pair = m + 1 < m1;
                const float *x0 = buf + (long)(m - m0) * n_in;
                if (per_block == 8)
                    block8x1(wb, n_in, n_in, x0, acc[0]);
                else
                    block4x2(wb, n_in, n_in, x0, pair ? x0 + n_in : x0, acc[0], pair ? acc[1] : 0);
                for (int r = 0; r <= pair; r++)
                    for (int k = 0; k < per_block; k++) {
                        const int o = per_block * b + k;
                        y[(long)(m + r) * n_out + o] = float_to_bf16(bias ? acc[r][k] + bf16_to_float(bias[o]) : acc[r][k]);
                    }
            }
        }
    }
}
