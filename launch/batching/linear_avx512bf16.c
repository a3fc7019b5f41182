/* y = x @ w.T (+ bias) for bf16 weights and activations on CPUs with AVX512_BF16 (built by native.py into the
 * same library as linear.c; native.py calls it only where the CPU has avx512f, avx512bw and avx512_bf16).
 *
 * Why: linear.c widens every bf16 weight to fp32 and multiplies it with AVX2 FMAs, 8 products per
 * instruction. VDPBF16PS multiplies 32 bf16 pairs and adds them into 16 fp32 sums in one instruction, with no
 * widening: prompts and batched decode steps, which are compute-bound, get up to 4x the arithmetic. oneDNN
 * uses the same instruction, but its result for a row depends on how many rows are multiplied with it
 * (kernels.choose_backend); here, as in linear.c, every output element is computed by the same instructions
 * in the same order whatever the number of rows: 16 lanes that each sum their pairs of columns 32 at a
 * time, left to right, the last partial 32 columns zero-filled, then one fixed reduction of the lanes, then
 * the bias, then one rounding to bf16 (to nearest even, as torch).
 *
 * w: [n_out, n_in], x: [rows, n_in], bias: [n_out] or NULL, y: [rows, n_out], all bf16, row-major.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include "bf16_simd.h"

typedef __m512 V;

/* Input rows per pass over the weight, as linear.c's XTILE: 64 rows of a 4096-wide bf16 input are 512 KB. */
#define XTILE 64
/* A pass of this many rows or more reads the weight in column chunks of KCHUNK, so that the 4 weight rows of
 * a block (4 x 2 KB) stay in L1 while every group of 4 input rows goes over them. A multiple of 32. */
#ifndef DWR
#define DWR 8
#define DXR 2
#define DCHUNK 512
#define PWR 4
#define PXR 6
#endif
#define PROMPT_ROWS 9
#ifndef KCHUNK
#define KCHUNK 1024
#endif

static inline V step(V acc, const uint16_t *w, const uint16_t *x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}

static inline V step_tail(V acc, const uint16_t *w, const uint16_t *x, __mmask32 m) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, w), (__m512bh)_mm512_maskz_loadu_epi16(m, x));
}

static inline uint16_t finish(V acc, const uint16_t *bias, int o) {
    float r = _mm512_reduce_add_ps(acc);
    return float_to_bf16(bias ? r + bf16_to_float(bias[o]) : r);
}

/* WR weight rows times XR input rows over columns [c, e) (full 32-column steps), plus the zero-filled tail
 * when tail != 0; accumulators in acc ([XR][WR]) between calls. x rows are xs apart; nx of them are real
 * (the others repeat x0 and their sums are dropped). Inlined with constant WR and XR: the accumulators are
 * registers (8x1: 8, 4x4: 16 of the 32). */
static inline __attribute__((always_inline)) void block(const uint16_t *w, long ld, int c, int e, __mmask32 tail,
                                                        const uint16_t *x, long xs, int nx, V *acc,
                                                        const int WR, const int XR) {
    V a[XR][WR];
    const uint16_t *xr[XR];
    for (int m = 0; m < XR; m++) {
        xr[m] = m < nx ? x + m * xs : x;
        for (int k = 0; k < WR; k++)
            a[m][k] = acc[m * WR + k];
    }
    for (int i = c; i < e; i += 32)
        for (int m = 0; m < XR; m++)
            for (int k = 0; k < WR; k++)
                a[m][k] = step(a[m][k], w + k * ld + i, xr[m] + i);
    if (tail)
        for (int m = 0; m < XR; m++)
            for (int k = 0; k < WR; k++)
                a[m][k] = step_tail(a[m][k], w + k * ld + e, xr[m] + e, tail);
    for (int m = 0; m < XR; m++)
        for (int k = 0; k < WR; k++)
            acc[m * WR + k] = a[m][k];
}

static void block8x1(const uint16_t *w, long ld, int n32, __mmask32 tail, const uint16_t *x, V *acc) {
    block(w, ld, 0, n32, tail, x, 0, 1, acc, 8, 1);
}

static void block1x1(const uint16_t *w, int n32, __mmask32 tail, const uint16_t *x, V *acc) {
    block(w, 0, 0, n32, tail, x, 0, 1, acc, 1, 1);
}

/* All tile input rows over WR weight rows (wb), in groups of XR rows, the columns in chunks of `chunk`: the
 * weight rows' chunk is read from memory by the first group and from L1 by the others. */
static inline __attribute__((always_inline)) void rows_block(const uint16_t *wb, int n_in, int n32, __mmask32 tail,
                                                             const uint16_t *xt, int tile, int chunk,
                                                             const uint16_t *bias, int o0, uint16_t *yt, long ldy,
                                                             const int WR, const int XR) {
    V acc[(XTILE + XR - 1) / XR][XR * WR];
    const int groups = (tile + XR - 1) / XR;
    for (int g = 0; g < groups; g++)
        for (int k = 0; k < XR * WR; k++)
            acc[g][k] = _mm512_setzero_ps();
    int c = 0;
    do {  /* at least once: a width under 32 is all tail */
        const int e = c + chunk < n32 ? c + chunk : n32;
        const __mmask32 t = e == n32 ? tail : 0;
        for (int g = 0; g < groups; g++) {
            const int nx = tile - XR * g < XR ? tile - XR * g : XR;
            block(wb, n_in, c, e, t, xt + (long)XR * g * n_in, n_in, nx, acc[g], WR, XR);
        }
        c = e;
    } while (c < n32);
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < XR && XR * g + m < tile; m++)
            for (int k = 0; k < WR; k++)
                yt[(long)(XR * g + m) * ldy + o0 + k] = finish(acc[g][m * WR + k], bias, o0 + k);
}

static void decode_rows(const uint16_t *wb, int n_in, int n32, __mmask32 tail, const uint16_t *xt, int tile,
                        const uint16_t *bias, int o0, uint16_t *yt, long ldy) {
    rows_block(wb, n_in, n32, tail, xt, tile, DCHUNK, bias, o0, yt, ldy, DWR, DXR);
}

static void prompt_rows(const uint16_t *wb, int n_in, int n32, __mmask32 tail, const uint16_t *xt, int tile,
                        const uint16_t *bias, int o0, uint16_t *yt, long ldy) {
    rows_block(wb, n_in, n32, tail, xt, tile, KCHUNK, bias, o0, yt, ldy, PWR, PXR);
}

void linear_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
                        int n_out, int n_in, int threads) {
    const int n32 = n_in & ~31;
    const __mmask32 tail = n_in == n32 ? 0 : (__mmask32)((1u << (n_in - n32)) - 1u);
    for (int m0 = 0; m0 < rows; m0 += XTILE) {
        const int tile = rows - m0 < XTILE ? rows - m0 : XTILE, wr = tile == 1 ? 8 : tile >= PROMPT_ROWS ? PWR : DWR;
        const int blocks = n_out / wr;
        const uint16_t *xt = x + (long)m0 * n_in;
        uint16_t *yt = y + (long)m0 * n_out;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < blocks + 1; b++) {
            if (b == blocks) {  /* the last n_out % wr weight rows, one at a time */
                for (int o = wr * blocks; o < n_out; o++)
                    for (int m = 0; m < tile; m++) {
                        V acc = _mm512_setzero_ps();
                        block1x1(w + (long)o * n_in, n32, tail, xt + (long)m * n_in, &acc);
                        yt[(long)m * n_out + o] = finish(acc, bias, o);
                    }
                continue;
            }
            const uint16_t *wb = w + (long)b * wr * n_in;
            const int o0 = b * wr;
            if (tile == 1) {
                V acc[8];
                for (int k = 0; k < 8; k++)
                    acc[k] = _mm512_setzero_ps();
                block8x1(wb, n_in, n32, tail, xt, acc);
                for (int k = 0; k < 8; k++)
                    yt[o0 + k] = finish(acc[k], bias, o0 + k);
                continue;
            }
            if (tile >= PROMPT_ROWS)
                prompt_rows(wb, n_in, n32, tail, xt, tile, bias, o0, yt, n_out);
            else
                decode_rows(wb, n_in, n32, tail, xt, tile, bias, o0, yt, n_out);
        }
    }
}
