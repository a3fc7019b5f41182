"""Attention of bf16 and fp32 models on the project's kernel (attention.c), behind torch's own SDPA entry point.

Why behind `torch.nn.functional.scaled_dot_product_attention`: every model this project serves
reaches attention through it: transformers' native models (sdpa_attention_forward), Qwen-7B-Chat's
remote code (QWenAttention._attn) and ChatGLM3's (CoreAttention). Wrapping that one function
covers all three without touching their code. Only the cases the kernel computes like SDPA are taken
(CPU, bf16 or fp32, no dropout, a 4D mask or none, is_causal without a mask, fewer queries than the process's
paths.attention_torch_from); every other call goes to the original function unchanged.

Why the kernel: a query's attention comes out the same whether its prompt is prefilled alone, left-padded
in a group, or after a common beginning computed once, and whether its row is decoded alone or padded in
a batch (torch's attention sums in blocks that depend on those): the batching worker's "batched equals
single" rests on it. And one bf16 decode token's attention reads the cache once (torch's bf16 SDPA was 8x
slower at 1000 tokens; in fp32 torch's is about as fast: Qwen2.5-0.5B decode steps 122 against 127 ms at
one row, 178 against 178 at four, with the earlier bf16 decode kernel compiled for fp32).

Installed by engine.kernels.install where linears run on the project's kernels (engine/kernels/linear.py),
so only in a process that serves or benchmarks such a model.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from engine.kernels import paths

MAX_HEAD_DIM = 256  # the kernel keeps one head's query and sums on its stack

_original = F.scaled_dot_product_attention


def install(kernel) -> None:
    """Route bf16 and fp32 attention in this process to `kernel.attention`. Idempotent."""
    _install_gqa_with_masks()
    if getattr(F.scaled_dot_product_attention, "cpu_arena_kernel", None) is kernel:
        return

    @functools.wraps(_original)
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False, **kwargs):
        if not kwargs and _fits(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
            return _attend(kernel, query, key, value, attn_mask, scale, is_causal)
        return _original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, **kwargs)

    scaled_dot_product_attention.cpu_arena_kernel = kernel
    F.scaled_dot_product_attention = scaled_dot_product_attention


def uninstall() -> None:
    F.scaled_dot_product_attention = _original
    _uninstall_gqa_with_masks()


def _sdpa_module():
    from transformers.integrations import sdpa_attention

    return sdpa_attention


def _install_gqa_with_masks() -> None:
    """Let transformers' native models hand grouped key/value heads to SDPA as they are when a mask is given too.

    Why: transformers' `use_gqa_in_sdpa` says no whenever there is a mask (CUDA's fast kernels take none), and
    `repeat_kv` then copies every layer's keys and values once per query head of the group, at every step: a
    batch of rows of different lengths (padded, so masked) copied its whole cache three times over on SmolLM2
    (9 query heads, 3 key heads), and a prompt prefilled after a common beginning is masked too. The kernel reads
    the grouped heads in place; torch's own SDPA, for the calls the kernel does not take, computes the same with
    enable_gqa and a mask (its math path repeats them itself). Only CPU tensors change route."""
    mod = _sdpa_module()
    stock = mod.use_gqa_in_sdpa
    if getattr(stock, "cpu_arena_stock", None) is not None:
        return

    def use_gqa_in_sdpa(attention_mask, key):
        return stock(attention_mask, key) or (stock(None, key) and key.device.type == "cpu")

    use_gqa_in_sdpa.cpu_arena_stock = stock
    mod.use_gqa_in_sdpa = use_gqa_in_sdpa


def _uninstall_gqa_with_masks() -> None:
    mod = _sdpa_module()
    mod.use_gqa_in_sdpa = getattr(mod.use_gqa_in_sdpa, "cpu_arena_stock", mod.use_gqa_in_sdpa)


def _fits(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> bool:
    if dropout_p or (is_causal and mask is not None):  # SDPA refuses the latter: let it say so
        return False
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float32) and q.device.type == "cpu"):
        return False
    # Prompt passes of paths.attention_torch_from queries or more go to torch's SDPA where it is measured faster
    # (path_choice.py); the batching worker prefills such prompts alone and whole (paths.py), so a prompt gets the
    # same attention whether it came alone or with others.
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] == 0 or paths.attention_on_torch(q.shape[2]):
        return False
    B, H, Q, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or D > MAX_HEAD_DIM or T == 0:
        return False
    if not (Hkv == H or (enable_gqa and H % Hkv == 0)):  # what SDPA itself accepts
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if mask is not None:
        if mask.dim() != 4 or mask.shape[2] not in (1, Q) or mask.shape[3] != T or mask.shape[0] not in (1, B) \
                or mask.shape[1] not in (1, H):
            return False
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):  # what SDPA itself accepts
            return False
    return True


def _attend(kernel, q, k, v, mask, scale, is_causal) -> torch.Tensor:
    B, H, Q, D = q.shape
    T = k.shape[2]
    if mask is not None:
        if mask.dtype == torch.bool:  # SDPA: True = may attend
            mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
        # expand gives a broadcast dim stride 0, which is what the kernel indexes with (a size-1 dim's
        # own stride can be anything).
        mask = mask.to(torch.float32).expand(B, H, Q, T)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return kernel.attention(q, k, v, mask, scale, causal=is_causal)
