/* y = x @ w.T (+ bias) for bf16 weights and activations on CPUs with AVX512_BF16 (built by native.py into the
 * same library as linear.c; native.py calls it only where the CPU has avx512f, avx512bw, avx512vl and
 * avx512_bf16).
 *
 * Why: linear.c widens every bf16 weight to fp32 and multiplies it with AVX2 FMAs, 8 products per
 * instruction. VDPBF16PS multiplies 32 bf16 pairs and adds them into 16 fp32 sums in one instruction, with no
 * widening: prompts and batched decode steps, which are compute-bound, get up to 4x the arithmetic.
 *
 * How ("outer product", as oneDNN's bf16 GEMM): a register holds one column pair (2 columns) of 16 weight
 * rows; it is multiplied with the same column pair of each input row, broadcast, into that input row's 16
 * sums: every lane is one output. So each weight byte, once loaded, serves up to 6 input rows from a register
 * (4 vectors x 6 rows = 24 accumulators), and a decode step of up to 6 rows reads its weights once, in one
 * pass that the memory streams at full speed: 4 rows cost what 1 row costs. The kernel before this one summed
 * 16 lanes per output and reduced them; its weights went through registers once per 2 or 3 input rows, and a
 * 4-row step took 1.3x a 1-row step (README, "On a CPU with AVX512_BF16").
 *
 * Bitwise the same whatever the rows: every output is one fp32 sum that starts at 0 and takes the column
 * pairs left to right, one VDPBF16PS per pair (an odd last column pairs with a zero), then + bias, then one
 * rounding to bf16 (to nearest even, as torch). No row count, group or chunk changes that order: chunks only
 * park the sums in memory (fp32, exact) between the pairs.
 *
 * w: packed by native.pack_avx512bf16, n_out x (2 x pairs) elements: tiles of 64 weight rows, each tile
 * [pairs][64][2] (a column pair of its rows side by side), the last tile [pairs][r][2] for its r = n_out % 64
 * rows (read with masks, so that nothing is padded past n_out); pairs = n_in / 2 rounded up (a zero column
 * past an odd n_in). A thread reads each of its tiles as one sequential stream.
 * x: [rows, n_in], bias: [n_out] or NULL, y: [rows, n_out], all bf16, row-major.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <string.h>

#include "bf16_simd.h"

typedef __m512 V;

#define NV 4                /* 16-row vectors per tile */
#define TILE (NV * 16)      /* weight rows per tile (native.PACK_ROWS) */
#define GR 6                /* input rows per group: 6 x NV = 24 accumulators + 4 weights + 1 broadcast */
#define XTILE 64            /* input rows per pass over the weight (the sums' scratch holds that many) */
/* Column pairs per chunk when several groups share a tile: 256 pairs of a tile are 64 KB, read from memory by
 * the first group and from L2 by the others. A single group takes the whole row in one chunk. */
#define KCHUNK 256

/* Input row m's column pair p as a 32-bit broadcast; the caller passes `last` for an odd n_in's last pair,
 * whose second column lies past the row (it pairs with 0, as the zero weight column packed there). */
static inline __m512bh xpair(const uint16_t *xr, int p, int last) {
    uint32_t v;
    if (last)
        v = xr[2 * p];
    else
        memcpy(&v, xr + 2 * p, 4);
    return (__m512bh)_mm512_set1_epi32((int)v);
}

/* The tile's 4 weight vectors of column pair p (`step` elements apart from pair to pair): plain loads in a
 * whole tile, masked ones in the last, partial tile (`part`, a constant where inlined; k: each vector's mask). */
#define WLOADS                                                                                          \
    const __m512bh w0 = (__m512bh)(part ? _mm512_maskz_loadu_epi16(k[0], ws) : _mm512_loadu_si512(ws)),      \
                   w1 = (__m512bh)(part ? _mm512_maskz_loadu_epi16(k[1], ws + 32) : _mm512_loadu_si512(ws + 32)), \
                   w2 = (__m512bh)(part ? _mm512_maskz_loadu_epi16(k[2], ws + 64) : _mm512_loadu_si512(ws + 64)), \
                   w3 = (__m512bh)(part ? _mm512_maskz_loadu_epi16(k[3], ws + 96) : _mm512_loadu_si512(ws + 96));
/* Every input row m of the group times the 4 vectors of pair p (`last`: an odd n_in's last pair). */
#define DPS(last)                                                \
    for (int m = 0; m < M; m++) {                                \
        const __m512bh xb = xpair(x + m * ldx, p, last);         \
        a[m][0] = _mm512_dpbf16_ps(a[m][0], w0, xb);             \
        a[m][1] = _mm512_dpbf16_ps(a[m][1], w1, xb);             \
        a[m][2] = _mm512_dpbf16_ps(a[m][2], w2, xb);             \
        a[m][3] = _mm512_dpbf16_ps(a[m][3], w3, xb);             \
    }

/* Sums of `M` input rows (1..GR, a constant where inlined) times one tile over pairs [p0, p1): s[m * TILE + j]
 * holds row m's sum for the tile's output j between chunks. `odd`: pair p1 - 1 is an odd n_in's last. */
static inline __attribute__((always_inline)) void group(const uint16_t *wt, long step, const __mmask32 *k,
                                                        const int part, const uint16_t *x, long ldx, const int M,
                                                        int p0, int p1, int odd, float *s) {
    V a[GR][NV];
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++)
            a[m][v] = _mm512_loadu_ps(s + m * TILE + v * 16);
    const int full = odd ? p1 - 1 : p1;
    const uint16_t *ws = wt + p0 * step;
    int p = p0;
    for (; p < full; p++, ws += step) {
        WLOADS
        DPS(0)
    }
    if (odd) {
        WLOADS
        DPS(1)
    }
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++)
            _mm512_storeu_ps(s + m * TILE + v * 16, a[m][v]);
}

#define GROUP_CASES(part)                                                     \
    switch (m) {                                                              \
    case 1: group(wt, step, k, part, x, ldx, 1, p0, p1, odd, s); break;       \
    case 2: group(wt, step, k, part, x, ldx, 2, p0, p1, odd, s); break;       \
    case 3: group(wt, step, k, part, x, ldx, 3, p0, p1, odd, s); break;       \
    case 4: group(wt, step, k, part, x, ldx, 4, p0, p1, odd, s); break;       \
    case 5: group(wt, step, k, part, x, ldx, 5, p0, p1, odd, s); break;       \
    default: group(wt, step, k, part, x, ldx, GR, p0, p1, odd, s); break;     \
    }

/* One group of m rows, dispatched to a copy compiled for that constant (the accumulators then stay registers). */
static void group_rows(const uint16_t *wt, int rows_in_tile, const uint16_t *x, long ldx, int m, int p0, int p1,
                       int odd, float *s) {
    const long step = 2L * rows_in_tile;
    if (rows_in_tile == TILE) {
        const __mmask32 *k = 0;
        GROUP_CASES(0)
    } else {
        __mmask32 k[NV];
        for (int v = 0; v < NV; v++) {
            const int left = 2 * rows_in_tile - 32 * v;  /* this vector's real elements */
            k[v] = left >= 32 ? 0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1u) : 0;
        }
        GROUP_CASES(1)
    }
}

/* 16 sums (+ bias[o0..o0+15]) rounded to bf16 as float_to_bf16 does (to nearest even, NaN -> 0x7fc0); the
 * first n stored at y. */
static inline void store16(V r, const uint16_t *bias, int o0, int n, uint16_t *y) {
    const __mmask16 k = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
    if (bias)
        r = _mm512_add_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, bias + o0)), 16)));
    const __m512i u = _mm512_castps_si512(r);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    h = _mm512_mask_mov_epi32(h, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(y, k, _mm512_cvtepi32_epi16(h));
}

/* Passes over the weight for `rows` input rows: one per XTILE rows, more when that leaves the threads unevenly
 * loaded and every pass keeps at least GR rows. Why: a pass's tiles are the work the threads share, and a
 * Llama/Qwen2 linear of 576 or 896 outputs has 9 or 14 tiles, 192 outputs 3: on 2 threads a prompt's pass over
 * 9 tiles kept one thread idle for a ninth of it. The passes only regroup rows: no output changes. */
static int passes_for(int rows, int tiles, int threads) {
    const int base = (rows + XTILE - 1) / XTILE;
    for (int p = base; p <= base * threads; p++)
        if ((long)tiles * p % threads == 0 && rows / p >= GR)
            return p;
    return base;
}

void linear_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
                        int n_out, int n_in, int threads) {
    const int pairs = (n_in + 1) / 2, tiles = (n_out + TILE - 1) / TILE;
    const int passes = passes_for(rows, tiles, threads), per_pass = (rows + passes - 1) / passes;
    /* Every (pass, tile) is one piece of work: the passes of a prompt share the threads too. */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int item = 0; item < passes * tiles; item++) {
        const int t = item % tiles, m0 = item / tiles * per_pass;
        if (m0 >= rows)
            continue;
        const int tile_rows = rows - m0 < per_pass ? rows - m0 : per_pass;
        /* Groups of at most GR rows, as even as they can be (8 rows: 4 + 4, not 6 + 2). */
        const int groups = (tile_rows + GR - 1) / GR, per = (tile_rows + groups - 1) / groups;
        const int chunk = groups > 1 ? KCHUNK : pairs;
        const uint16_t *xt = x + (long)m0 * n_in;
        uint16_t *yt = y + (long)m0 * n_out;
        float s[XTILE * TILE] __attribute__((aligned(64)));
        memset(s, 0, sizeof(float) * tile_rows * TILE);
        const uint16_t *wt = w + (long)t * TILE * 2 * pairs;
        const int n = n_out - t * TILE < TILE ? n_out - t * TILE : TILE;  /* this tile's weight rows */
        for (int p0 = 0; p0 < pairs; p0 += chunk) {
            const int p1 = p0 + chunk < pairs ? p0 + chunk : pairs;
            const int odd = p1 == pairs && (n_in & 1);
            for (int g = 0; g < tile_rows; g += per) {
                const int m = tile_rows - g < per ? tile_rows - g : per;
                group_rows(wt, n, xt + (long)g * n_in, n_in, m, p0, p1, odd, s + g * TILE);
            }
        }
        for (int m = 0; m < tile_rows; m++)
            for (int v = 0; v * 16 < n; v++)
                store16(_mm512_load_ps(s + m * TILE + v * 16), bias, t * TILE + v * 16,
                        n - v * 16, yt + (long)m * n_out + t * TILE + v * 16);
    }
}
