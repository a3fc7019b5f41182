/* y = x @ w.T (+ bias) for bf16 weights and activations on CPUs with AVX512_BF16 (built by native.py into the
 * same library as linear.c; native.py calls it only where the CPU has avx512f, avx512bw, avx512vl and
 * avx512_bf16).
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
 * Weights up to native.PACK_MAX_IN wide are packed once (native.pack_avx512bf16): rows in blocks of 8, and
 * within a block the 8 rows' 32-column pieces side by side (512 bytes per 32 columns), so that a thread reads
 * its blocks as one sequential stream. Read in place, 8 rows of an 896-wide weight are 8 streams of 1.8 KB,
 * too short for the hardware prefetcher (native.py has the figures). Rows past the last multiple of 8 stay
 * whole, after the blocks; every packed row is zero-padded to a multiple of 32 columns. Wider weights are read
 * in place. Both layouts give bitwise the same results: only where a weight is read from changes.
 *
 * w: packed [n_out, n_in rounded up to 32] or plain [n_out, n_in], x: [rows, n_in], bias: [n_out] or NULL,
 * y: [rows, n_out], all bf16, row-major.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include "bf16_simd.h"

typedef __m512 V;

#define WR 8      /* weight rows per packed block (native.PACK_ROWS) */
#define PIECE 256 /* bf16 elements of one 32-column step of a block: 8 rows x 32 */

/* Input rows per pass over the weight, as linear.c's XTILE: 64 rows of a 4096-wide bf16 input are 512 KB. */
#define XTILE 64
/* A pass of this many rows or more is a prompt's (decode passes have at most max_batch = 8 rows). */
#define PROMPT_ROWS 9
/* Input rows per group: the accumulators of 8 weight rows times DXR (decode) or PXR (prompt) rows are registers
 * (16 or 24 of the 32). */
#define DXR 2
#define PXR 3
/* Columns per chunk of a pass with more than one group: the block's chunk (8 x 1 KB, or 8 x 2 KB) is read
 * from memory by the first group and from L1 by the others. Multiples of 32. */
#define DCHUNK 512
#define PCHUNK 1024

/* The sums of 8 accumulators (16 lanes each), as 8 lanes in order. Every output of the kernel is summed by this
 * one tree: lane i + lane i+8, then + the one 4 further, then +2, then +1 (the tree of GCC's
 * _mm512_reduce_add_ps, written out here so that no compiler's choice decides an output's bits). 8 at a time
 * with shuffles: ~25 instructions where 8 separate reductions and roundings took ~100 (a 64-row prompt pass
 * over Qwen2.5-0.5B's weights got no measurably faster from it alone: the multiplications dominate). */
static inline __m256 reduce8(const V *a) {
    V h[4], q[2];
    for (int j = 0; j < 4; j++)  /* [a.lo256 + a.hi256 | b.lo256 + b.hi256] for the pair a, b */
        h[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xee));
    for (int j = 0; j < 2; j++)  /* each row's 8 sums -> 4: s[i] + s[i + 4], one 128-bit lane per row */
        q[j] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * j], h[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(h[2 * j], h[2 * j + 1], 0xdd));
    /* lane r of q[0] is row r, of q[1] row r + 4: [t0 t1 t2 t3] -> [t0+t2 t1+t3] for both rows */
    const V u = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], 0x44), _mm512_shuffle_ps(q[0], q[1], 0xee));
    /* lane r: [u0 u1 u0' u1'] -> [u0+u1 u0'+u1' ..]: row r's sum at element 4r, row r+4's at 4r+1 */
    const V r = _mm512_add_ps(_mm512_shuffle_ps(u, u, 0x88), _mm512_shuffle_ps(u, u, 0xdd));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r));
}

/* 8 sums (+ bias[o0..o0+7]) rounded to bf16 as float_to_bf16 does (to nearest even, NaN -> 0x7fc0), stored at y. */
static inline void store8(__m256 r, const uint16_t *bias, int o0, uint16_t *y) {
    if (bias)
        r = _mm256_add_ps(r, load8_bf16(bias + o0));
    const __m256i u = _mm256_castps_si256(r);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), nan);
    _mm_storeu_si128((__m128i *)y, _mm256_cvtepi32_epi16(h));
}

/* One output: a lone accumulator through the same tree (the other 7 zero: +0 changes no sum). */
static inline uint16_t finish1(V acc, const uint16_t *bias, int o) {
    V a[WR] = {acc};
    for (int k = 1; k < WR; k++)
        a[k] = _mm512_setzero_ps();
    const float r = _mm256_cvtss_f32(reduce8(a));
    return float_to_bf16(bias ? r + bf16_to_float(bias[o]) : r);
}

/* One block of 8 weight rows times 1, 2 or 3 input rows over columns [c, e) (full 32-column steps),
 * plus the last, partial step at column e when tail != 0 (x and w zero-filled past n_in). Row k's 32 columns
 * at step i are at wb + (i / 32) * ss + k * rs: ss = PIECE, rs = 32 in a packed block; ss = 32, rs = the row
 * length for a weight read in place. Accumulators in acc ([rows][8]) between calls, in named registers while
 * in here: GCC kept an array of them in memory, with a load and a store around every VDPBF16PS, and prompt
 * passes ran at half speed. xr0-xr2: the input rows (a repeated row's sums are dropped by the caller). Every
 * accumulator takes the same steps in the same order in all three. */
#define K8(F, m) F(m, 0) F(m, 1) F(m, 2) F(m, 3) F(m, 4) F(m, 5) F(m, 6) F(m, 7)
#define ACC_IN(m, k) V a##m##k = acc[(m) * 8 + (k)];
#define ACC_OUT(m, k) acc[(m) * 8 + (k)] = a##m##k;
#define WLOAD(k) const __m512bh w##k = (__m512bh)_mm512_loadu_si512(ws + (k) * rs);
#define WTAIL(k) const __m512bh w##k = (__m512bh)_mm512_maskz_loadu_epi16(tail, ws + (k) * rs);
#define DP(m, k) a##m##k = _mm512_dpbf16_ps(a##m##k, w##k, x##m);
#define XLOAD(m) const __m512bh x##m = (__m512bh)_mm512_loadu_si512(xr##m + i);
#define XTAIL(m) const __m512bh x##m = (__m512bh)_mm512_maskz_loadu_epi16(tail, xr##m + i);
/* Weight row k of the step (loaded by W), multiplied with the 1, 2 or 3 input rows right away: in this order
 * 24 accumulators + 3 inputs + 1 weight fit the 32 registers. Loading the 8 weight rows first (35 live
 * values) made GCC spill 4 accumulators to the stack, a load and a store around their VDPBF16PS every step. */
#define ROW1(W, k) W(k) DP(0, k)
#define ROW2(W, k) W(k) DP(0, k) DP(1, k)
#define ROW3(W, k) W(k) DP(0, k) DP(1, k) DP(2, k)
/* The full steps, then the tail step: XLOADS / XTAILS load the step's input rows, ROWS multiplies. */
#define STEPS(XLOADS, XTAILS, ROWS)                                 \
    const uint16_t *ws = wb + (long)(c / 32) * ss;                  \
    for (int i = c; i < e; i += 32, ws += ss) {                     \
        XLOADS K8(ROWS, WLOAD)                                      \
    }                                                               \
    if (tail) {                                                     \
        const int i = e;                                            \
        XTAILS K8(ROWS, WTAIL)                                      \
    }

/* Inlined where rs and ss are constants (a packed weight): the 8 rows' loads then take fixed offsets. */
#define INLINE static inline __attribute__((always_inline))

INLINE void block8x1(const uint16_t *wb, long rs, long ss, int c, int e, __mmask32 tail, const uint16_t *xr0,
                     V *acc) {
    K8(ACC_IN, 0)
    STEPS(XLOAD(0), XTAIL(0), ROW1)
    K8(ACC_OUT, 0)
}

INLINE void block8x2(const uint16_t *wb, long rs, long ss, int c, int e, __mmask32 tail, const uint16_t *xr0,
                     const uint16_t *xr1, V *acc) {
    K8(ACC_IN, 0) K8(ACC_IN, 1)
    STEPS(XLOAD(0) XLOAD(1), XTAIL(0) XTAIL(1), ROW2)
    K8(ACC_OUT, 0) K8(ACC_OUT, 1)
}

INLINE void block8x3(const uint16_t *wb, long rs, long ss, int c, int e, __mmask32 tail, const uint16_t *xr0,
                     const uint16_t *xr1, const uint16_t *xr2, V *acc) {
    K8(ACC_IN, 0) K8(ACC_IN, 1) K8(ACC_IN, 2)
    STEPS(XLOAD(0) XLOAD(1) XLOAD(2), XTAIL(0) XTAIL(1) XTAIL(2), ROW3)
    K8(ACC_OUT, 0) K8(ACC_OUT, 1) K8(ACC_OUT, 2)
}

/* A lone weight row (past the last whole block) times one input row: the same steps. */
static V row1x1(const uint16_t *w, int n32, __mmask32 tail, const uint16_t *x) {
    V a = _mm512_setzero_ps();
    for (int i = 0; i < n32; i += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    if (tail)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + n32),
                             (__m512bh)_mm512_maskz_loadu_epi16(tail, x + n32));
    return a;
}

/* XR (1-3) input rows, xs apart, nx of them real, over one block. */
INLINE void group(const uint16_t *wb, long rs, long ss, int c, int e, __mmask32 tail, const uint16_t *x,
                  long xs, int nx, int XR, V *acc) {
    const uint16_t *x1 = nx > 1 ? x + xs : x, *x2 = nx > 2 ? x + 2 * xs : x;
    if (XR == 1)
        block8x1(wb, rs, ss, c, e, tail, x, acc);
    else if (XR == 2)
        block8x2(wb, rs, ss, c, e, tail, x, x1, acc);
    else
        block8x3(wb, rs, ss, c, e, tail, x, x1, x2, acc);
}

/* All tile input rows over one block of 8 weight rows (wb; rs, ss as in block8x1), in groups of XR rows, the
 * columns in chunks of `chunk`. */
INLINE void rows_block(const uint16_t *wb, long rs, long ss, int n32, __mmask32 tail, const uint16_t *xt, int n_in,
                       int tile, int chunk, const uint16_t *bias, int o0, uint16_t *yt, long ldy, const int XR) {
    V acc[(XTILE + XR - 1) / XR][XR * WR];
    const int groups = (tile + XR - 1) / XR;
    for (int g = 0; g < groups; g++)
        for (int k = 0; k < XR * WR; k++)
            acc[g][k] = _mm512_setzero_ps();
    int c = 0;
    do {  /* at least once: a width under 32 is all tail */
        const int e = groups > 1 && c + chunk < n32 ? c + chunk : n32;
        const __mmask32 t = e == n32 ? tail : 0;
        /* A prompt pass, or a decode pass of 5-8 rows, over a packed weight: after the first group every group
         * multiplies from L1 and the memory would idle. What this thread reads next (the next chunk of this
         * block, or its next block: static schedule) is the memory right after this chunk; it is fetched into L2
         * a few lines per group. Kernel alone over Qwen2.5-0.5B's weights and head, interleaved: 64-row prompt
         * pass -9%, 26 rows -16%, 8 rows 62 -> 50 ms; with 2 groups (3-4 rows) the best runs got slower
         * (27 -> 36 ms), with 1 group too, and for weights read in place (8 row pieces) it made no difference. */
        const int lines = (XR == PXR || groups > 2) && ss == PIECE ? (e - c) / 32 * (PIECE * 2 / 64) : 0;
        const int per = (lines + groups - 1) / groups;
        const char *next = (const char *)(wb + (long)(e / 32) * ss);
        for (int g = 0; g < groups; g++) {
            const int nx = tile - XR * g < XR ? tile - XR * g : XR;
            for (int l = g * per; l < (g + 1) * per && l < lines; l++)
                _mm_prefetch(next + 64L * l, _MM_HINT_T1);
            group(wb, rs, ss, c, e, t, xt + (long)XR * g * n_in, n_in, nx, XR, acc[g]);
        }
        c = e;
    } while (c < n32);
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < XR && XR * g + m < tile; m++)
            store8(reduce8(acc[g] + m * WR), bias, o0, yt + (long)(XR * g + m) * ldy + o0);
}

/* One block of 8 weight rows times the tile's input rows: 1 row (a single decode), up to 8 (batched decode steps)
 * or a prompt's, each with its chunk and group size. */
INLINE void block(const uint16_t *wb, long rs, long ss, int n32, __mmask32 tail, const uint16_t *xt, int n_in,
                  int tile, const uint16_t *bias, int o0, uint16_t *yt, long ldy) {
    if (tile == 1)
        rows_block(wb, rs, ss, n32, tail, xt, n_in, 1, n32, bias, o0, yt, ldy, 1);
    else if (tile < PROMPT_ROWS)
        rows_block(wb, rs, ss, n32, tail, xt, n_in, tile, DCHUNK, bias, o0, yt, ldy, DXR);
    else
        rows_block(wb, rs, ss, n32, tail, xt, n_in, tile, PCHUNK, bias, o0, yt, ldy, PXR);
}

/* w: packed (pack_avx512bf16) when `packed`, else the plain [n_out, n_in] weight. */
void linear_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
                        int n_out, int n_in, int packed, int threads) {
    const int n32 = n_in & ~31;
    const __mmask32 tail = n_in == n32 ? 0 : (__mmask32)((1u << (n_in - n32)) - 1u);
    const long ld = packed ? (n_in + 31) & ~31 : n_in;  /* one weight row's length in memory */
    const int blocks = n_out / WR;
    for (int m0 = 0; m0 < rows; m0 += XTILE) {
        const int tile = rows - m0 < XTILE ? rows - m0 : XTILE;
        const uint16_t *xt = x + (long)m0 * n_in;
        uint16_t *yt = y + (long)m0 * n_out;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < blocks + 1; b++) {
            if (b == blocks) {  /* the last n_out % 8 weight rows, whole rows after the blocks */
                for (int o = WR * blocks; o < n_out; o++)
                    for (int m = 0; m < tile; m++) {
                        const V acc = row1x1(w + (long)o * ld, n32, tail, xt + (long)m * n_in);
                        yt[(long)m * n_out + o] = finish1(acc, bias, o);
                    }
                continue;
            }
            const uint16_t *wb = w + (long)b * WR * ld;
            if (packed)
                block(wb, 32, PIECE, n32, tail, xt, n_in, tile, bias, b * WR, yt, n_out);
            else
                block(wb, ld, 32, n32, tail, xt, n_in, tile, bias, b * WR, yt, n_out);
        }
    }
}
