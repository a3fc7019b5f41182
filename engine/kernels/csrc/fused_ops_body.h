/* fused_ops.c's functions, included once per element type. Before including, define:
 *   ELEM    the element type                        (uint16_t for bf16, float)
 *   LOAD8   8 elements -> __m256                    (load8_bf16, _mm256_loadu_ps)
 *   STORE8  __m256 -> 8 elements, rounded           (store8_bf16, _mm256_storeu_ps)
 *   ROUND8  round to ELEM, kept as fp32             (round8_bf16, round8_f32)
 *   SUFFIX  the exported names' suffix              (bf16, f32)
 */
/* y = w * ELEM(x * 1/sqrt(mean(x^2) + eps)) for each of `rows` rows of n (transformers' LlamaRMSNorm and
 * Qwen2RMSNorm: squares, sum and scaling in fp32). x rows x_stride elements apart; y contiguous. */
void PASTE(rms_norm, SUFFIX)(const ELEM *x, long x_stride, const ELEM *w, ELEM *y, int rows, int n, float eps,
                             int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const ELEM *xr = x + r * x_stride;
        ELEM *yr = y + (long)r * n;
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < n; i += 8) {
            const __m256 v = LOAD8(xr + i);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        const __m256 scale = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / (float)n + eps));
        for (int i = 0; i < n; i += 8)
            STORE8(yr + i, _mm256_mul_ps(LOAD8(w + i), ROUND8(_mm256_mul_ps(LOAD8(xr + i), scale))));
    }
}

/* out = x * cos + rotate_half(x) * sin (transformers' apply_rotary_pos_emb, one of q or k), each product
 * rounded to ELEM before the sum as torch does. x: [B, H, S, D] at x_strides (D contiguous); cos, sin: [B, S, D]
 * at cs_strides (D contiguous, stride 0 where broadcast); out: [B, H, S, D] contiguous. rotate_half(x) is
 * (-x[D/2:], x[:D/2]). */
void PASTE(rotary, SUFFIX)(const ELEM *x, const long *x_strides, const ELEM *cos, const ELEM *sin,
                         const long *cs_strides, ELEM *out, int B, int H, int S, int D, int threads) {
    const int half = D / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    #pragma omp parallel for collapse(3) schedule(static) num_threads(threads) if ((long)B * H * S * D >= PARALLEL_MIN)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int s = 0; s < S; s++) {
                const ELEM *xr = x + b * x_strides[0] + h * x_strides[1] + s * x_strides[2];
                const long cs = b * cs_strides[0] + s * cs_strides[1];
                ELEM *o = out + (((long)b * H + h) * S + s) * D;
                for (int d = 0; d < half; d += 8) {
                    const __m256 x1 = LOAD8(xr + d), x2 = LOAD8(xr + half + d);
                    const __m256 lo = _mm256_add_ps(ROUND8(_mm256_mul_ps(x1, LOAD8(cos + cs + d))),
                                                    ROUND8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), LOAD8(sin + cs + d))));
                    const __m256 hi = _mm256_add_ps(ROUND8(_mm256_mul_ps(x2, LOAD8(cos + cs + half + d))),
                                                    ROUND8(_mm256_mul_ps(x1, LOAD8(sin + cs + half + d))));
                    STORE8(o + d, lo);
                    STORE8(o + half + d, hi);
                }
            }
}

/* out = ELEM(silu(g)) * u for `rows` rows of n (transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)),
 * silu(g) = g / (1 + e^-g), computed as g * e^g / (1 + e^g) for negative g so that exp8 only sees x <= 0.
 * g and u rows g_stride and u_stride elements apart (slices of one fused gate|up output); out contiguous. */
void PASTE(silu_mul, SUFFIX)(const ELEM *g, long g_stride, const ELEM *u, long u_stride, ELEM *out, int rows, int n,
                             int threads) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    #pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i += 8) {
            const __m256 gv = LOAD8(g + r * g_stride + i);
            const __m256 e = exp8(_mm256_or_ps(gv, sign));  /* e^-|g| */
            const __m256 neg = _mm256_cmp_ps(gv, zero, _CMP_LT_OQ);
            const __m256 num = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, e), neg);
            const __m256 silu = ROUND8(_mm256_div_ps(num, _mm256_add_ps(one, e)));
            STORE8(out + (long)r * n + i, _mm256_mul_ps(silu, LOAD8(u + r * u_stride + i)));
        }
}
