/* Every decoder layer of a Llama/Qwen2 bf16 decode step in one call: for each layer, the calls
 * FusedDecoderLayer._direct_forward makes one by one from Python (fused_ops.py), in the same order on the same
 * data, so the same bits:
 *   n = rms_norm(x);  qkv = linear(n);  q, k = rotary(q), rotary(k);  the cache's new column = k, v;
 *   a = attention(q, cache);  x = mlp_block(x, a)   (o_proj, residual, post-attention norm, MLP, residual)
 * Built by native.py with the other kernels; called through decode_step.py, only where the CPU has AVX512_BF16.
 *
 * Why: between two kernel calls a decode step ran Python, module calls and torch's dispatcher, ~6 of SmolLM2's
 * 14.5 ms a step; here a step's 30 layers cost one ctypes call, which also releases the GIL for the whole step.
 *
 * The layer table: one row of LAYER_FIELDS int64 per layer (decode_step.py fills it): its weights (packed by
 * native.pack_avx512bf16; biases or 0), its key and value buffers [B, Hkv, capacity, D] at their strides. The
 * new column goes at position `pos` of every row; keys 0..pos are attended, an additive fp32 mask [B, pos + 1]
 * (0 or -inf; NULL: none) hides a row's left padding. */
#include <stdint.h>
#include <string.h>

void rms_norm_bf16(const uint16_t *x, long x_stride, const uint16_t *w, uint16_t *y, int rows, int n, float eps,
                   int threads);
void rotary_bf16(const uint16_t *x, const long *x_strides, const uint16_t *cos, const uint16_t *sin,
                 const long *cs_strides, uint16_t *out, int B, int H, int S, int D, int threads);
void linear_bf16_avx512(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
                        int n_out, int n_in, int threads);
void attention_bf16(const uint16_t *q, const long *q_strides, const uint16_t *k, const long *k_strides,
                    const uint16_t *v, const long *v_strides, const float *mask, const long *mask_strides,
                    uint16_t *out, float *scores, int B, int H, int Hkv, int Q, int T, int D, float scale,
                    int causal, int threads);
void mlp_block_bf16(const uint16_t *residual, const uint16_t *attn, const uint16_t *o_w, const uint16_t *o_b,
                    const uint16_t *norm_w, float eps, const uint16_t *gate_up_w, const uint16_t *gate_up_b,
                    const uint16_t *down_w, const uint16_t *down_b, uint16_t *out, uint16_t *scratch, int rows,
                    int attn_dim, int hidden, int inter, int threads);

enum { IN_NORM, POST_NORM, QKV_W, QKV_B, O_W, O_B, GATE_UP_W, GATE_UP_B, DOWN_W, DOWN_B,
       K_BUF, K_S0, K_S1, K_S2, V_BUF, V_S0, V_S1, V_S2, LAYER_FIELDS };

int decode_step_layer_fields(void) { return LAYER_FIELDS; }

/* Scratch elements (bf16) decoder_layers_bf16 needs for B rows. */
long decode_step_scratch(int B, int hidden, int H, int Hkv, int D, int inter) {
    const long qkv = (long)(H + 2 * Hkv) * D;
    return (long)B * (2 * hidden + qkv + 2L * H * D + (long)Hkv * D + hidden + 3L * inter);
}

#define P(field) ((const uint16_t *)(intptr_t)L[field])

/* x: [B, hidden], the embedded tokens in, the last layer's output out. cos, sin: [B, D] (each row's position).
 * scores: attention_bf16's, threads * attention_tile_queries() * (pos + 1 + 8) floats. */
void decoder_layers_bf16(const int64_t *table, int n_layers, uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                         const float *mask, int pos, int B, int hidden, int H, int Hkv, int D, int inter,
                         float eps, float scale, uint16_t *scratch, float *scores, int threads) {
    const int qkv_dim = (H + 2 * Hkv) * D, T = pos + 1;
    uint16_t *normed = scratch, *other = normed + (long)B * hidden, *qkv = other + (long)B * hidden;
    uint16_t *q = qkv + (long)B * qkv_dim, *k = q + (long)B * H * D, *attn = k + (long)B * Hkv * D;
    uint16_t *block = attn + (long)B * H * D;  /* mlp_block's own: B * (hidden + 3 * inter) */
    /* qkv's q (or k) heads as [B, heads, 1, D]; the rotated ones contiguous; cos and sin [B, 1, D] */
    const long qkv_strides[4] = {qkv_dim, D, qkv_dim, 1}, cs_strides[2] = {D, D};
    const long q_strides[4] = {(long)H * D, D, D, 1}, mask_strides[4] = {T, 0, 0, 1};
    uint16_t *in = x, *out = other;
    for (int l = 0; l < n_layers; l++) {
        const int64_t *L = table + (long)l * LAYER_FIELDS;
        uint16_t *kb = (uint16_t *)(intptr_t)L[K_BUF], *vb = (uint16_t *)(intptr_t)L[V_BUF];
        const long k_strides[4] = {L[K_S0], L[K_S1], L[K_S2], 1}, v_strides[4] = {L[V_S0], L[V_S1], L[V_S2], 1};
        rms_norm_bf16(in, hidden, P(IN_NORM), normed, B, hidden, eps, threads);
        linear_bf16_avx512(P(QKV_W), normed, P(QKV_B), qkv, B, qkv_dim, hidden, threads);
        rotary_bf16(qkv, qkv_strides, cos, sin, cs_strides, q, B, H, 1, D, threads);
        rotary_bf16(qkv + (long)H * D, qkv_strides, cos, sin, cs_strides, k, B, Hkv, 1, D, threads);
        for (int b = 0; b < B; b++)
            for (int h = 0; h < Hkv; h++) {
                memcpy(kb + b * k_strides[0] + h * k_strides[1] + pos * k_strides[2], k + ((long)b * Hkv + h) * D,
                       (size_t)D * sizeof(uint16_t));
                memcpy(vb + b * v_strides[0] + h * v_strides[1] + pos * v_strides[2],
                       qkv + (long)b * qkv_dim + (long)(H + Hkv) * D + (long)h * D, (size_t)D * sizeof(uint16_t));
            }
        attention_bf16(q, q_strides, kb, k_strides, vb, v_strides, mask, mask_strides, attn, scores, B, H, Hkv, 1,
                       T, D, scale, 0, threads);
        mlp_block_bf16(in, attn, P(O_W), P(O_B), P(POST_NORM), eps, P(GATE_UP_W), P(GATE_UP_B), P(DOWN_W),
                       P(DOWN_B), out, block, B, H * D, hidden, inter, threads);
        uint16_t *t = in; in = out; out = t;
    }
    if (in != x)
        memcpy(x, in, (size_t)B * hidden * sizeof(uint16_t));
}
