"""One decode token's attention on the bf16 kernel (bf16_attention.c), behind torch's own SDPA entry point.

Why behind `torch.nn.functional.scaled_dot_product_attention`: every model this project serves
reaches attention through it: transformers' native models (sdpa_attention_forward), Qwen-7B-Chat's
remote code (QWenAttention._attn) and ChatGLM3's (CoreAttention). Wrapping that one function
covers all three without touching their code. Only the case the kernel computes exactly like
SDPA is taken (CPU, bf16, one query, no dropout, not is_causal, a 4D mask or none); every other
call goes to the original function unchanged.

Installed by prepack_linears where bf16 runs on the AVX2 kernels (launch/batching/kernels.py),
so only in a process that serves or benchmarks such a model.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

MAX_HEAD_DIM = 256  # the kernel keeps one head's query and sums on its stack

_original = F.scaled_dot_product_attention


def install(kernel) -> None:
    """Route single-query bf16 attention in this process to `kernel.decode_attention`. Idempotent."""
    if getattr(F.scaled_dot_product_attention, "cpu_arena_kernel", None) is kernel:
        return

    @functools.wraps(_original)
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False, **kwargs):
        if not kwargs and _fits(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
            return _decode(kernel, query, key, value, attn_mask, scale)
        return _original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, **kwargs)

    scaled_dot_product_attention.cpu_arena_kernel = kernel
    F.scaled_dot_product_attention = scaled_dot_product_attention


def uninstall() -> None:
    F.scaled_dot_product_attention = _original


def _fits(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> bool:
    if dropout_p or is_causal:  # a causal mask with one query would hide all but the first key
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        return False
    B, H, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or D > MAX_HEAD_DIM or T == 0:
        return False
    if not (Hkv == H or (enable_gqa and H % Hkv == 0)):  # what SDPA itself accepts
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if mask is not None:
        if mask.dim() != 4 or mask.shape[2] != 1 or mask.shape[3] != T or mask.shape[0] not in (1, B) \
                or mask.shape[1] not in (1, H):
            return False
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return False
    return True


def _decode(kernel, q, k, v, mask, scale) -> torch.Tensor:
    B, H, _, D = q.shape
    T = k.shape[2]
    if mask is not None:
        if mask.dtype == torch.bool:  # SDPA: True = may attend
            mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
        # expand gives a broadcast dim stride 0, which is what the kernel indexes with (a size-1 dim's
        # own stride can be anything).
        mask = mask.to(torch.float32).expand(B, H, 1, T)[:, :, 0, :]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = kernel.decode_attention(q[:, :, 0, :], k, v, mask, scale)
    return out.view(B, H, 1, D)
