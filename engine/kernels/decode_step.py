"""A bf16 Llama/Qwen2 decode step with every decoder layer in one C call (csrc/decode_step.c).

Why: the kernels read a step's weights at memory speed, but between two kernel calls the step ran Python:
transformers' model forward (its mask and output objects), one module call per layer, the attention function and
torch's SDPA entry, the cache update, ~30 small torch ops a layer. On SmolLM2-135M that was ~6 of a 14.5 ms step
[AVX512_BF16]. `NativeDecodeStep` keeps in Python only what a step does once (the embedding, the rotary table,
the final norm and the output projection, through the model's own modules) and hands the layers to
decoder_layers_bf16, which makes the calls FusedDecoderLayer._direct_forward makes, in the same order on the same
data: the logits and the cache are bitwise the model's own forward's (tests/test_decode_step.py), so a row's
tokens stay the same whichever way it was decoded, batched or alone. One call also releases the GIL for the
whole step: the worker's HTTP thread, streaming meanwhile, no longer takes it between two kernel calls.
Measured [AVX512_BF16, 2 threads]: SmolLM2 steps alternating in one process 18.5 -> 10.7 ms (1 row), 16.3 ->
11.8 ms (4 rows), Qwen2.5-0.5B 29.4 -> 24.9 ms; served SmolLM2 decode against llama.cpp BF16 in the same runs
x0.78-0.80 -> x1.08-1.37 (docs/performance.md, "A decode step in one call").

`for_model` gives one only where that holds: the exact transformers Llama and Qwen2 classes in bf16 on SDPA (the
attention this process routes to attention.c), every layer a FusedDecoderLayer on the inlined path, full
attention (no sliding window), decode steps on the kernels (paths.py), and a CPU with AVX512_BF16. Elsewhere the
decode loop calls the model (and where CPU_ARENA_NO_DECODE_STEP is set, for comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from engine.kernels import paths
from engine.kernels.fused_ops import FusedDecoderLayer, FusedRMSNorm
from engine.kernels.native import NativeKernel, native_kernel
from engine.kv_cache import GrowingCache

MODELS = (modeling_llama.LlamaForCausalLM, modeling_qwen2.Qwen2ForCausalLM)
# decode_step.c's layer table, one int64 row per layer
IN_NORM, POST_NORM, QKV_W, QKV_B, O_W, O_B, GATE_UP_W, GATE_UP_B, DOWN_W, DOWN_B, \
    K_BUF, K_S0, K_S1, K_S2, V_BUF, V_S0, V_S1, V_S2, LAYER_FIELDS = range(19)


def unfit_reason(model) -> str:
    """Why `model` cannot decode on decoder_layers_bf16 here ("" when it can)."""
    kernel = native_kernel()[0]
    if kernel is None or not kernel.bf16_units:
        return "needs the C kernels on a CPU with AVX512_BF16"
    if type(model) not in MODELS:
        return f"{type(model).__name__} is not one of the transformers Llama or Qwen2 classes"
    cfg, inner = model.config, model.model
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return "the model's attention is not SDPA"
    if getattr(F.scaled_dot_product_attention, "cpu_arena_kernel", None) is not kernel:
        return "attention is not on attention.c in this process"
    if paths.current().decode != paths.KERNEL:  # (a decode step's attention is always on the kernel: paths.py)
        return "decode steps are on PyTorch (paths)"
    layers = list(inner.layers)
    if not layers or not all(isinstance(layer, FusedDecoderLayer) and layer._direct for layer in layers):
        return "not every decoder layer is a FusedDecoderLayer on the inlined path"
    if any(layer.attention_type != "full_attention" for layer in layers) \
            or any(getattr(layer.self_attn, "sliding_window", None) for layer in layers):
        return "a layer attends through a sliding window"
    if not isinstance(inner.norm, FusedRMSNorm):
        return "the final norm is not on fused_ops.c"
    a = layers[0].self_attn
    eps = {m.variance_epsilon for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)}
    if len(eps) != 1:
        return "the layers' norms differ in eps"
    if a.head_dim % 16 or a.head_dim > 256 or any(layer.self_attn.scaling != a.scaling for layer in layers):
        return "head size or scaling the step does not take"
    return ""


class NativeDecodeStep:
    """`logits = step(input_ids, positions, mask, cache)`: what `model(input_ids=..., attention_mask=...,
    position_ids=..., past_key_values=cache).logits[:, -1]` computes, with the cache updated in place."""

    def __init__(self, model, kernel: NativeKernel):
        self.model, self.kernel = model, kernel
        layers = list(model.model.layers)
        a = layers[0].self_attn
        cfg = model.config
        self.n_layers = len(layers)
        self.hidden = cfg.hidden_size
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
        self.inter = layers[0]._gate_up[0].shape[0] // 2
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.scale = float(a.scaling)
        self._layers = layers
        self._table: torch.Tensor | None = None
        self._weights_at: int | None = None
        if kernel.layer_fields != LAYER_FIELDS:
            raise RuntimeError("decode_step.c's layer table does not match decode_step.py's")

    def _weights_table(self) -> torch.Tensor:
        """The table's weight columns (its cache columns are filled at each step). Built at the first step, and
        again if the weights moved since (hugepages.collapse_model moves them after loading)."""
        first = self._layers[0]._qkv.weight.data_ptr()
        if self._table is None or self._weights_at != first:
            table = torch.zeros(self.n_layers, LAYER_FIELDS, dtype=torch.int64)
            for i, layer in enumerate(self._layers):
                table[i, IN_NORM] = layer.input_layernorm.weight.data_ptr()
                table[i, POST_NORM] = layer.post_attention_layernorm.weight.data_ptr()
                for (w, b), (wf, bf) in (((layer._qkv.weight, layer._qkv.bias), (QKV_W, QKV_B)),
                                         (layer._o, (O_W, O_B)), (layer._gate_up, (GATE_UP_W, GATE_UP_B)),
                                         (layer._down, (DOWN_W, DOWN_B))):
                    table[i, wf] = w.data_ptr()
                    table[i, bf] = b.data_ptr() if b is not None else 0
            self._table, self._weights_at = table, first
        return self._table

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: GrowingCache) -> torch.Tensor:
        """input_ids, positions: [B, 1]; mask: [B, T] (1 = attend, T = the cache's length + 1) or None where no
        row is padded. Returns the logits [B, vocab]."""
        inner = self.model.model
        B, pos = input_ids.shape[0], cache.get_seq_length()
        h = inner.embed_tokens(input_ids)  # [B, 1, hidden]
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos.contiguous(), sin.contiguous()
        x = h.reshape(B, self.hidden).contiguous()
        table = self._weights_table()
        bufs = [layer.reserve(1) for layer in cache.layers]
        table[:, K_BUF:LAYER_FIELDS] = torch.tensor(
            [(k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3]) for k, v in bufs], dtype=torch.int64)
        additive = None
        if mask is not None:  # SDPA's reading of a boolean mask (attention.py): 0 where it may attend, else -inf
            additive = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(mask == 0, float("-inf"))
        self.kernel.decoder_layers(table, x, cos.view(B, -1), sin.view(B, -1), additive, pos, self.heads, self.kv_heads,
                                   self.head_dim, self.inter, self.eps, self.scale)
        for layer in cache.layers:
            layer.advance(1)
        return self.model.lm_head(inner.norm(x.view(B, 1, self.hidden)))[:, -1, :]


def for_model(model) -> tuple[NativeDecodeStep | None, str]:
    """(the step, "") where `model` can decode on it here, else (None, why not). CPU_ARENA_NO_DECODE_STEP=1 in the
    worker's environment keeps the model's forward, to measure one against the other."""
    why = "CPU_ARENA_NO_DECODE_STEP is set" if os.environ.get("CPU_ARENA_NO_DECODE_STEP") else unfit_reason(model)
    if why:
        return None, why
    return NativeDecodeStep(model, native_kernel()[0]), ""
