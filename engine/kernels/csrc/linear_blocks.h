/* The linear kernel's body, included by linear.c once per weight type. Before including, define:
 *   W       weight element type            (uint16_t for bf16, float for fp32)
 *   LOAD8   8 weights -> __m256            (load8_bf16, _mm256_loadu_ps)
 *   WTOF    one weight -> float            (bf16_to_float, f32_to_float)
 *   DOT     a weight row . an fp32 row     (dot_bf16, dot_f32: bf16_simd.h)
 *   X       activation element type (x, bias, y), XTOF/FTOX to and from float
 *   LINEAR  the exported function's name
 *   DECODE_BLOCK  weight rows per block for 2 to PROMPT_ROWS-1 input rows: 8 (block8xn) or 4 (block4x2)
 * Every output element is computed by the same instructions in the same order whatever the number of
 * rows, so a row's result does not depend on the rows batched with it. */

#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)
#define BLOCK4X2 PASTE(block4x2, LINEAR)
#define BLOCK8XN PASTE(block8xn, LINEAR)
#define BLOCK3X4 PASTE(block3x4, LINEAR)
#define PROMPT_BLOCK PASTE(prompt_block, LINEAR)
#define PAIRS_BLOCK PASTE(pairs_block, LINEAR)
#define STORE_ROWS PASTE(store_rows, LINEAR)

/* The outputs of a chunked block of wrows weight rows: acc holds each input row's 8-lane sums, one vector per
 * weight row ([tile][wrows]); each is summed across lanes, then the columns past the last multiple of 8 are
 * added one by one, then the bias, and it is converted once. */
static void STORE_ROWS(const W *wb, int n_in, const float *buf, int tile, int wrows, const __m256 *acc,
                       const X *bias, int o0, X *y, long ldy) {
    const int n8 = n_in & ~7;
    for (int m = 0; m < tile; m++)
        for (int k = 0; k < wrows; k++) {
            float r = hsum(acc[m * wrows + k]);
            const float *xm = buf + (long)m * n_in;
            for (int j = n8; j < n_in; j++)
                r += WTOF(wb[(long)k * n_in + j]) * xm[j];
            y[m * ldy + o0 + k] = FTOX(bias ? r + XTOF(bias[o0 + k]) : r);
        }
}

/* 4 weight rows times 2 input rows, for bf16 decode passes of 2-8 rows (DECODE_BLOCK 4): 8 accumulators,
 * 4 widened weights and 2 inputs in 16 registers; each weight is widened once for 2 rows. Runs over columns
 * [c, e) only, its accumulators kept in acc (memory) between calls (PAIRS_BLOCK goes over the columns in
 * chunks). x1 == x0 for a lone last row (its second sums are dropped). */
static void BLOCK4X2(const W *w, long ld, int c, int e, const float *x0, const float *x1, __m256 *acc) {
    const W *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
    __m256 a00 = acc[0], a01 = acc[1], a02 = acc[2], a03 = acc[3];
    __m256 a10 = acc[4], a11 = acc[5], a12 = acc[6], a13 = acc[7];
    for (int i = c; i < e; i += 8) {
        __m256 v0 = LOAD8(w0 + i), v1 = LOAD8(w1 + i), v2 = LOAD8(w2 + i), v3 = LOAD8(w3 + i);
        __m256 p = _mm256_loadu_ps(x0 + i), q = _mm256_loadu_ps(x1 + i);
        a00 = _mm256_fmadd_ps(v0, p, a00); a01 = _mm256_fmadd_ps(v1, p, a01);
        a02 = _mm256_fmadd_ps(v2, p, a02); a03 = _mm256_fmadd_ps(v3, p, a03);
        a10 = _mm256_fmadd_ps(v0, q, a10); a11 = _mm256_fmadd_ps(v1, q, a11);
        a12 = _mm256_fmadd_ps(v2, q, a12); a13 = _mm256_fmadd_ps(v3, q, a13);
    }
    acc[0] = a00; acc[1] = a01; acc[2] = a02; acc[3] = a03;
    acc[4] = a10; acc[5] = a11; acc[6] = a12; acc[7] = a13;
}

/* 8 weight rows times nx input rows (1 to PROMPT_ROWS-1): every 1-row pass, and fp32 decode passes of
 * 2-8 rows (DECODE_BLOCK 8). Eight weight streams per thread keep more reads in flight than four
 * (7B-shaped 11008x4096 bf16 weight, 2 threads, 1 row: 19.1 GB/s against 16.6 with block4x2, where a
 * plain read of a large array gives 20.5).
 * The columns go in chunks of CHUNK8: in each, the first input row streams the 8 weight rows' chunk from
 * memory (8 KB of fp32) and the other rows reread it from L1. Running each row over the whole width
 * instead reread the weights from L2 (a Qwen2.5-0.5B down projection: 8 rows x 4864 fp32 = 155 KB): in
 * interleaved runs over Qwen2.5-0.5B-shaped fp32 weights on 2 MB pages, 4 rows took 130 -> 116 ms and
 * 139 -> 127 ms, 8 rows 179 -> 159; 1 row and SmolLM2-shaped weights (576 wide, already in L1) the same.
 * Accumulators wait in memory between chunks (8 stores and loads per 256 FMAs).
 * bf16 decode passes stay on block4x2: widening every weight again for each row made two 7B-shaped layers
 * slower (4 rows 62 -> 82 ms). Each output is the same sequence of operations as in the other blocks. */
#define CHUNK8 256
static void BLOCK8XN(const W *w, long ld, int n, const float *x, int nx, float *y) {
    __m256 acc[PROMPT_ROWS - 1][8];
    for (int m = 0; m < nx; m++)
        for (int k = 0; k < 8; k++)
            acc[m][k] = _mm256_setzero_ps();
    const int n8 = n & ~7;
    for (int c = 0; c < n8; c += CHUNK8) {
        const int e = c + CHUNK8 < n8 ? c + CHUNK8 : n8;
        for (int m = 0; m < nx; m++) {
            const float *xm = x + (long)m * n;
            __m256 a[8];
            for (int k = 0; k < 8; k++)
                a[k] = acc[m][k];
            for (int i = c; i < e; i += 8) {
                __m256 p = _mm256_loadu_ps(xm + i);
                for (int k = 0; k < 8; k++)
                    a[k] = _mm256_fmadd_ps(LOAD8(w + k * ld + i), p, a[k]);
            }
            for (int k = 0; k < 8; k++)
                acc[m][k] = a[k];
        }
    }
    for (int m = 0; m < nx; m++)
        for (int k = 0; k < 8; k++) {
            float r = hsum(acc[m][k]);
            for (int j = n8; j < n; j++)
                r += WTOF(w[k * ld + j]) * x[(long)m * n + j];
            y[m * 8 + k] = r;
        }
}

/* 3 weight rows times 4 input rows, for prompts (a pass of PROMPT_ROWS rows or more): 12 accumulators,
 * 3 widened weights and 1 input in 16 registers, 12 FMAs for 7 loads where a 4x2 block has 8 for 6.
 * Prefill is compute-bound; there, in interleaved runs on the reference machine, it was 6% faster than
 * that 4x2 block over Qwen2.5-0.5B-shaped fp32 layers (53 and 122 rows) and 20% faster over one
 * 7B-shaped bf16 layer (64 rows: 290 -> 233 ms). From memory (decode) it is no faster, so decode keeps
 * the blocks above. x: 4 input rows, n apart; nx: how many of them are real (the others repeat x0, their
 * sums are dropped).
 * It runs over columns [c, e) only and keeps its 12 accumulators in acc (memory) between calls: a prompt pass
 * goes over the columns in chunks of KCHUNK (see LINEAR). Each output is the same sequence of operations as
 * in the other blocks. */
static void BLOCK3X4(const W *w, long ld, int c, int e, const float *x, long n, int nx, __m256 *acc) {
    const W *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld;
    const float *x0 = x, *x1 = nx > 1 ? x + n : x, *x2 = nx > 2 ? x + 2 * n : x, *x3 = nx > 3 ? x + 3 * n : x;
    __m256 a00 = acc[0], a01 = acc[1], a02 = acc[2], a10 = acc[3], a11 = acc[4], a12 = acc[5];
    __m256 a20 = acc[6], a21 = acc[7], a22 = acc[8], a30 = acc[9], a31 = acc[10], a32 = acc[11];
    for (int i = c; i < e; i += 8) {
        __m256 v0 = LOAD8(w0 + i), v1 = LOAD8(w1 + i), v2 = LOAD8(w2 + i), p;
        p = _mm256_loadu_ps(x0 + i);
        a00 = _mm256_fmadd_ps(v0, p, a00); a01 = _mm256_fmadd_ps(v1, p, a01); a02 = _mm256_fmadd_ps(v2, p, a02);
        p = _mm256_loadu_ps(x1 + i);
        a10 = _mm256_fmadd_ps(v0, p, a10); a11 = _mm256_fmadd_ps(v1, p, a11); a12 = _mm256_fmadd_ps(v2, p, a12);
        p = _mm256_loadu_ps(x2 + i);
        a20 = _mm256_fmadd_ps(v0, p, a20); a21 = _mm256_fmadd_ps(v1, p, a21); a22 = _mm256_fmadd_ps(v2, p, a22);
        p = _mm256_loadu_ps(x3 + i);
        a30 = _mm256_fmadd_ps(v0, p, a30); a31 = _mm256_fmadd_ps(v1, p, a31); a32 = _mm256_fmadd_ps(v2, p, a32);
    }
    acc[0] = a00; acc[1] = a01; acc[2] = a02; acc[3] = a10; acc[4] = a11; acc[5] = a12;
    acc[6] = a20; acc[7] = a21; acc[8] = a22; acc[9] = a30; acc[10] = a31; acc[11] = a32;
}

/* A bf16 decode pass of 2 to PROMPT_ROWS-1 rows over 4 weight rows (wb), into y. The columns go in chunks of
 * CHUNK8, and in each every pair of input rows runs over the 4 rows' chunk, which the first pair brought into
 * L1. Running each pair over the whole width instead reread the weights from L2 for the second pair on
 * (4 rows of a 4096-wide bf16 weight are 32 KB). Interleaved kernel-only runs over one 7B-shaped bf16 layer:
 * 4 rows 34 -> 30 ms, 8 rows 50 -> 42-44 ms; 2 rows (one pair) and 1 row (block8xn) unchanged. */
static void PAIRS_BLOCK(const W *wb, int n_in, const float *buf, int tile, const X *bias, int o0, X *y, long ldy) {
    __m256 acc[PROMPT_ROWS / 2][8];  /* up to PROMPT_ROWS - 1 rows, in pairs */
    const int pairs = (tile + 1) / 2, n8 = n_in & ~7;
    for (int g = 0; g < pairs; g++)
        for (int k = 0; k < 8; k++)
            acc[g][k] = _mm256_setzero_ps();
    for (int c = 0; c < n8; c += CHUNK8) {
        const int e = c + CHUNK8 < n8 ? c + CHUNK8 : n8;
        for (int g = 0; g < pairs; g++) {
            const float *x0 = buf + (long)2 * g * n_in;
            BLOCK4X2(wb, n_in, c, e, x0, 2 * g + 1 < tile ? x0 + n_in : x0, acc[g]);
        }
    }
    STORE_ROWS(wb, n_in, buf, tile, 4, acc[0], bias, o0, y, ldy);
}

/* A prompt pass over 3 weight rows (wb) for all tile input rows (buf), into y. The columns go in chunks of
 * KCHUNK; in each, the 3 rows' chunk is multiplied with every group of 4 input rows. Why: over a whole
 * 4096-wide row, 3 bf16 weight rows (24 KB) and 4 input rows (64 KB) overflow L1, so every group of input
 * rows read the weights again from L2. In interleaved kernel-only runs over one 7B-shaped bf16 layer, 64
 * rows took 288 -> 268 ms and 287 -> 254 ms, 16 rows 79 -> 65-68 ms; over Qwen2.5-0.5B-shaped fp32 layers
 * (896 wide, one chunk but the down projection) 2-10% less. Chunks of 128-512 columns were slower than none
 * (each chunk restarts the weight streams), 2048 no better than 1024. */
static void PROMPT_BLOCK(const W *wb, int n_in, const float *buf, int tile, const X *bias, int o0,
                         X *y, long ldy) {
    __m256 acc[XTILE / 4][12];
    const int groups = (tile + 3) / 4, n8 = n_in & ~7;
    for (int g = 0; g < groups; g++)
        for (int k = 0; k < 12; k++)
            acc[g][k] = _mm256_setzero_ps();
    for (int c = 0; c < n8; c += KCHUNK) {
        const int e = c + KCHUNK < n8 ? c + KCHUNK : n8;
        for (int g = 0; g < groups; g++) {
            const int nx = tile - 4 * g < 4 ? tile - 4 * g : 4;
            BLOCK3X4(wb, n_in, c, e, buf + (long)4 * g * n_in, n_in, nx, acc[g]);
        }
    }
    STORE_ROWS(wb, n_in, buf, tile, 3, acc[0], bias, o0, y, ldy);
}

/* The inputs are widened to fp32 once per pass (into buf: XTILE * n_in floats from the caller) and every
 * output is converted once, after the bias. Threads: the caller's count (torch.get_num_threads() on the
 * calling thread), on the OpenMP runtime torch already loaded (same soname, so the loader reuses it:
 * one thread pool). */
void LINEAR(const W *w, const X *x, const X *bias, X *y, float *buf, int rows, int n_out, int n_in, int threads) {
    for (int m0 = 0; m0 < rows; m0 += XTILE) {
        const int m1 = rows - m0 < XTILE ? rows : m0 + XTILE;
        const int tile = m1 - m0, per_block = tile >= PROMPT_ROWS ? 3 : tile == 1 ? 8 : DECODE_BLOCK;
        const int blocks = n_out / per_block;
        for (long i = 0; i < (long)tile * n_in; i++)
            buf[i] = XTOF(x[(long)m0 * n_in + i]);
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int b = 0; b < blocks + 1; b++) {
            float acc[8 * (PROMPT_ROWS - 1)];  /* the largest block: 8x8 */
            if (b == blocks) {  /* the last n_out % per_block weight rows, one at a time */
                for (int o = per_block * blocks; o < n_out; o++)
                    for (int m = m0; m < m1; m++) {
                        float r = DOT(w + (long)o * n_in, n_in, buf + (long)(m - m0) * n_in);
                        y[(long)m * n_out + o] = FTOX(bias ? r + XTOF(bias[o]) : r);
                    }
                continue;
            }
            const W *wb = w + (long)b * per_block * n_in;
            X *yb = y + (long)m0 * n_out;
            if (per_block == 3) {
                PROMPT_BLOCK(wb, n_in, buf, tile, bias, 3 * b, yb, n_out);
            } else if (per_block == 4) {
                PAIRS_BLOCK(wb, n_in, buf, tile, bias, 4 * b, yb, n_out);
            } else {  /* all the tile's rows in one call, acc holds [rows][8] */
                BLOCK8XN(wb, n_in, n_in, buf, tile, acc);
                for (int r = 0; r < tile; r++)
                    for (int k = 0; k < 8; k++) {
                        const int o = 8 * b + k;
                        yb[(long)r * n_out + o] = FTOX(bias ? acc[r * 8 + k] + XTOF(bias[o]) : acc[r * 8 + k]);
                    }
            }
        }
    }
}

#undef BLOCK4X2
#undef BLOCK8XN
#undef CHUNK8
#undef BLOCK3X4
#undef PROMPT_BLOCK
#undef PAIRS_BLOCK
#undef STORE_ROWS
