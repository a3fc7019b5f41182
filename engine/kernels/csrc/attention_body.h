/* The attention kernel's body, included by attention.c once per element type. Before including, define:
 *   ELEM   the element type of q, k, v and out   (uint16_t for bf16, float)
 *   TOF    one element -> float                   (bf16_to_float, f32_to_float)
 *   FROMF  float -> one element                   (float_to_bf16, f32_to_float)
 *   WIDE   1 if rows of keys and values are widened to fp32 rows before use (bf16), 0 if they are read in place
 *   NAME   the exported function's name
 * and SUFFIX, which names this copy's helpers apart from the other copy's.
 */
#define WIDEN PASTE(widen, SUFFIX)

/* Rows r0 .. r0 + n - 1 of a key or value head (row r at src + r * stride) as fp32 rows: in place where the
 * elements are fp32 (WIDE 0), else widened into buf, D floats a row. Sets *rows and *rs (row stride) so that row
 * r0 + j is at *rows + j * *rs. Widening is exact, so a row is the same numbers either way. */
static inline void WIDEN(const ELEM *src, long stride, int r0, int n, int D, float *buf, const float **rows,
                         long *rs) {
#if WIDE
    for (int j = 0; j < n; j++) {
        const ELEM *e = src + (long)(r0 + j) * stride;
        float *f = buf + (long)j * D;
        int d = 0;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(f + d, load8_bf16(e + d));
        for (; d < D; d++)
            f[d] = TOF(e[d]);
    }
    *rows = buf;
    *rs = D;
#else
    (void)n;
    (void)D;
    (void)buf;
    *rows = (const float *)(src + (long)r0 * stride);
    *rs = stride;
#endif
}

/* One call computes tiles of up to QT queries that read the same key/value head: the query heads of a group
 * (grouped-query attention) times up to QT / heads query positions. Each block of keys or values is widened
 * (bf16) and brought into L1 once for the whole tile, instead of once per query (SmolLM2 has 3 query heads a key
 * head, Qwen2.5-0.5B 7), and a block is read as one sequential stream. Measured against the one-query-at-a-time
 * kernel (2 threads, bf16, keys and values evicted from the caches first as a decode step's weights evict them):
 * SmolLM2 512-token causal prompt 4.01 -> 3.12 ms a layer, 4 prompts' 27 queries after a shared beginning
 * 258 -> 210 us; Qwen2.5-0.5B 4 rows at 1500 tokens 343 -> 305 us; Qwen-7B shape, one row at 1000 tokens
 * 804 -> 507 us (warm it is 247 -> 324: a lone query pays the widening, which a decode step's cold cache hides);
 * SmolLM2 4 rows at 100 tokens unchanged (66 -> 68 us: there a call is its fixed cost and the cold reads).
 *
 * Every query is still computed alone, in the same order whatever its tile: its scores 8 keys at a time
 * (scores8), a partial last block repeating its last real key; softmax (exp_scores); its weighted sum, key by
 * key left to right, parked in fp32 (exact) between blocks of values. So a query's output does not depend on
 * the queries, rows or padding beside it. */
void NAME(const ELEM *q, const long *q_strides, const ELEM *k, const long *k_strides, const ELEM *v,
          const long *v_strides, const float *mask, const long *mask_strides, ELEM *out, float *scores, int B,
          int H, int Hkv, int Q, int T, int D, float scale, int causal, int threads) {
    const int group = H / Hkv;
    const int th = group < QT ? group : QT;           /* query heads in a tile */
    const int tp = QT / th;                           /* query positions in a tile */
    const int hchunks = (group + th - 1) / th, pchunks = (Q + tp - 1) / tp;
    const long tiles = (long)B * Hkv * hchunks * pchunks;
    const long ks = k_strides[2], vs = v_strides[2];
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long tile = 0; tile < tiles; tile++) {
        const int pc = tile % pchunks, hc = (tile / pchunks) % hchunks;
        const int g = (tile / ((long)pchunks * hchunks)) % Hkv, b = tile / ((long)pchunks * hchunks * Hkv);
        const int h0 = g * group + hc * th, nh = group - hc * th < th ? group - hc * th : th;
        const int i0 = pc * tp, ni = Q - i0 < tp ? Q - i0 : tp;
        const int nq = nh * ni;
        const ELEM *kp = k + b * k_strides[0] + g * k_strides[1];
        const ELEM *vp = v + b * v_strides[0] + g * v_strides[1];
        float *s0 = scores + (long)omp_get_thread_num() * QT * (T + 8);  /* + 8: a last block's spare lanes */
        float qf[QT * D], acc[QT * D], buf[VB * D];  /* D <= 256, checked by the caller */
        int n[QT];
        long row[QT];
        const float *mp[QT];
        __m256 top8[QT];
        int nmax = 0;
        for (int j = 0; j < nq; j++) {
            const int h = h0 + j / ni, i = i0 + j % ni;
            row[j] = ((long)b * H + h) * Q + i;
            const ELEM *qp = q + b * q_strides[0] + h * q_strides[1] + i * q_strides[2];
            for (int d = 0; d < D; d++)
                qf[j * D + d] = TOF(qp[d]) * scale;
            mp[j] = mask ? mask + b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2] : 0;
            n[j] = causal ? (i + 1 < T ? i + 1 : T) : T;
            nmax = n[j] > nmax ? n[j] : nmax;
            top8[j] = _mm256_set1_ps(-INFINITY);
        }
        /* Scores, 8 keys at a time; a query's last, partial block repeats its last key in the spare lanes. */
        for (int t = 0; t < nmax; t += 8) {
            const float *kr;
            long krs;
            WIDEN(kp, ks, t, nmax - t < 8 ? nmax - t : 8, D, buf, &kr, &krs);
            for (int j = 0; j < nq; j++) {
                if (t >= n[j])
                    continue;
                const float *kb[8];
                for (int e = 0; e < 8; e++)
                    kb[e] = kr + (t + e < n[j] ? e : n[j] - 1 - t) * krs;
                __m256 r = scores8(kb, qf + j * D, D);
                if (mp[j]) {
                    float m8[8];
                    for (int e = 0; e < 8; e++)
                        m8[e] = mp[j][(t + e < n[j] ? t + e : n[j] - 1) * mask_strides[3]];
                    r = _mm256_add_ps(r, _mm256_loadu_ps(m8));
                }
                _mm256_storeu_ps(s0 + (long)j * (T + 8) + t, r);
                top8[j] = _mm256_max_ps(top8[j], r);  /* spare lanes repeat a real key: the maximum is the same */
            }
        }
        for (int j = 0; j < nq; j++) {
            float *s = s0 + (long)j * (T + 8);
            float top8s[8];
            _mm256_storeu_ps(top8s, top8[j]);
            float top = top8s[0];
            for (int e = 1; e < 8; e++)
                top = top8s[e] > top ? top8s[e] : top;
            float total = 0.0f;
            if (top == -INFINITY) {  /* a fully masked row gives zeros, not NaN */
                for (int t = 0; t < n[j]; t++)
                    s[t] = 0.0f;
            } else {
                total = exp_scores(s, n[j], top);
            }
            const float norm = total > 0.0f ? 1.0f / total : 0.0f;
            for (int t = 0; t < n[j]; t++)
                s[t] *= norm;
        }
        /* The weighted sums, VB values at a time, 64 dims at a time in registers (weigh). */
        const int d8 = D / 8 * 8;
        for (int t0 = 0; t0 < nmax; t0 += VB) {
            const float *vr;
            long vrs;
            WIDEN(vp, vs, t0, nmax - t0 < VB ? nmax - t0 : VB, D, buf, &vr, &vrs);
            for (int j = 0; j < nq; j++) {
                const int m = (n[j] < t0 + VB ? n[j] : t0 + VB) - t0;
                if (m <= 0)
                    continue;
                const float *p = s0 + (long)j * (T + 8) + t0;
                float *a = acc + j * D;
                const int first = t0 == 0;
                int d = 0;
                for (; d + 64 <= d8; d += 64)
                    weigh(vr, vrs, p, m, d, 8, a + d, first);
                switch ((d8 - d) / 8) {
                case 1: weigh(vr, vrs, p, m, d, 1, a + d, first); break;
                case 2: weigh(vr, vrs, p, m, d, 2, a + d, first); break;
                case 3: weigh(vr, vrs, p, m, d, 3, a + d, first); break;
                case 4: weigh(vr, vrs, p, m, d, 4, a + d, first); break;
                case 5: weigh(vr, vrs, p, m, d, 5, a + d, first); break;
                case 6: weigh(vr, vrs, p, m, d, 6, a + d, first); break;
                case 7: weigh(vr, vrs, p, m, d, 7, a + d, first); break;
                default: break;
                }
            }
        }
        for (int j = 0; j < nq; j++) {
            const float *s = s0 + (long)j * (T + 8);
            float *a = acc + j * D;
            for (int d = d8; d < D; d++) {  /* D % 8 dims: left to right, in scalar */
                float x = 0.0f;
                for (int t = 0; t < n[j]; t++)
                    if (s[t] != 0.0f)
                        x += TOF(vp[t * vs + d]) * s[t];
                a[d] = x;
            }
            ELEM *o = out + row[j] * D;
            for (int d = 0; d < D; d++)
                o[d] = FROMF(a[d]);
        }
    }
}

#undef WIDEN
