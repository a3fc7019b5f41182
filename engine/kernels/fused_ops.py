"""RMSNorm, rotary embedding and SiLU-and-multiply of transformers' Llama and Qwen2 models in one C call each
(fused_ops.c), for bf16 and fp32; and where the CPU has AVX512_BF16, everything of a decoder layer after its
attention (o_proj, both residual adds, the post-attention norm, the MLP) in one call (FusedDecoderLayer).

Why: a decode step is one pass over the weights on the project's linear kernel plus a fixed cost per torch op,
and transformers computes these three in ~900 small ops per 7B-shaped bf16 step: 65 RMSNorms of 8, 32 rotary
embeddings of 16, 32 SiLU-and-multiplies of 2 (the torch profiler counted 292 aten::mul, 194 add, 65 each of
pow, mean and rsqrt, 64 neg, 67 cat per step, nearly all of them theirs). The small served models, whose
weights take a few ms to read, spend half their step in such ops. Measured (steps interleaved in one process,
medians of 45, 2 threads, AMD EPYC with AVX512_BF16): SmolLM2-135M bf16 decode step 18.7 -> 17.4 ms at one row,
20.3 -> 18.0 ms at four; Qwen2.5-0.5B 41.0 -> 38.1 and 43.3 -> 42.6 ms. A 7B-shaped step (~460 ms) did not
move beyond its noise with these alone: what it loses between two linears is mostly Python and torch's
dispatcher running with caches the weights' stream has just emptied, 150-500 us per gap, four gaps a layer
(README, "Between the linears"). FusedDecoderLayer takes three of the four away: 7B-shaped steps alternating
with and without it, 448 -> 430 ms (slow memory phase), 281 -> 271 ms (fast), paired median ratio 0.962; with
the fused ops, SmolLM2-135M 18.5 -> 14.8 ms (one row), 19.9 -> 16.0 (four), Qwen2.5-0.5B 42.2 -> 38.1 and
43.8 -> 40.1 ms.

Installed by engine.kernels.install where linears run on the project's kernels, on the classes below only: their
forward is known (a subclass or another model's norm may compute something else, e.g. ChatGLM3 multiplies by
the weight before rounding; Qwen-7B-Chat's and ChatGLM3's remote code keep their own ops). Every call the C
code does not take (another dtype, a width not a multiple of 8, a device, gradients) goes to the stock code.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from engine.kernels import paths
from engine.kernels.linear import KernelLinear, SharedInputLinear
from engine.kernels.native import pack_avx512bf16

# Norms computing weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) from `weight` and `variance_epsilon`.
RMS_NORMS = (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm)
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLPS = (modeling_llama.LlamaMLP, modeling_qwen2.Qwen2MLP)
# Modules whose attention calls their global apply_rotary_pos_emb(q, k, cos, sin) (rotate_half convention).
ROTARY_MODULES = (modeling_llama, modeling_qwen2)
_STOCK_ROTARY = {module: module.apply_rotary_pos_emb for module in ROTARY_MODULES}
DTYPES = (torch.bfloat16, torch.float32)


def _plain(*tensors: torch.Tensor) -> bool:
    """CPU, one of DTYPES, the same dtype, last dim contiguous, and nothing for autograd to record (weights are
    Parameters that require grad: under inference_mode or no_grad that records nothing)."""
    first = tensors[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return first.dtype in DTYPES and all(
        t.dtype == first.dtype and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)


class FusedRMSNorm(nn.Module):
    """A RMS_NORMS module (same weight Parameter, same eps) on rms_norm_*."""

    def __init__(self, norm: nn.Module, kernel):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon
        self.kernel, self._stock = kernel, type(norm).forward  # the stock forward reads weight and eps only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if x.numel() and n % 8 == 0 and _plain(x, self.weight) and self.weight.shape == (n,) \
                and self.weight.is_contiguous():
            return self.kernel.rms_norm(x.reshape(-1, n), self.weight, self.variance_epsilon).view(x.shape)
        return self._stock(self, x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused_ops.c"


class FusedGatedMLP(nn.Module):
    """A GATED_MLPS module with a SiLU (same projections) whose activation-and-multiply is silu_mul_*."""

    def __init__(self, mlp: nn.Module, kernel):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)  # slices of one output where they share a matmul (kernels.py)
        n = g.shape[-1]
        if g.shape == u.shape and g.numel() and n % 8 == 0 and _plain(g, u):
            h = self.kernel.silu_mul(g.reshape(-1, n), u.reshape(-1, n)).view(g.shape)
        else:
            h = self.act_fn(g) * u
        return self.down_proj(h)


def _rotary_fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (S, D) or cos.shape[0] not in (1, B) or cos.shape[1:] != (S, D):
        return False
    return q.numel() > 0 and k.numel() > 0 and D % 16 == 0 and _plain(q, k, cos, sin)


def fused_apply_rotary_pos_emb(kernel, stock, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb on rotary_* where it fits, else the stock function."""
    if _rotary_fits(q, k, cos, sin, unsqueeze_dim):
        B, _, S, D = q.shape
        cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)  # stride 0 over a broadcast batch
        if cos.stride() != sin.stride():  # one set of strides for both in the C call
            cos, sin = cos.contiguous(), sin.contiguous()
        return kernel.rotary(q, cos, sin), kernel.rotary(k, cos, sin)
    return stock(q, k, cos, sin, position_ids, unsqueeze_dim)


def install_rotary(kernel) -> None:
    """Route ROTARY_MODULES' apply_rotary_pos_emb in this process to `kernel`. Idempotent."""
    for module, stock in _STOCK_ROTARY.items():
        fused = functools.partial(fused_apply_rotary_pos_emb, kernel, stock)
        module.apply_rotary_pos_emb = functools.update_wrapper(fused, stock)


def uninstall_rotary() -> None:
    for module, stock in _STOCK_ROTARY.items():
        module.apply_rotary_pos_emb = stock


# Decoder layers computing h = x + self_attn(input_layernorm(x)); h + mlp(post_attention_layernorm(h)), whose
# self_attn ends with o_proj(attention output).
DECODER_LAYERS = (modeling_llama.LlamaDecoderLayer, modeling_qwen2.Qwen2DecoderLayer)
# Attentions whose forward FusedDecoderLayer._direct_forward repeats call for call (transformers 4.57): q/k/v, their
# module's apply_rotary_pos_emb, the cache update, the configured attention function, the reshape.
INLINED_ATTENTIONS = (modeling_llama.LlamaAttention, modeling_qwen2.Qwen2Attention)


class DeferredProjection(nn.Module):
    """Stands in for an attention's o_proj whose FusedDecoderLayer applies the projection itself (in its block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return "applied by the FusedDecoderLayer's block"


def _packed(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(packed weight, bias) of a KernelLinear on linear_avx512bf16.c, else None."""
    if isinstance(linear, KernelLinear) and linear.backend.pack is pack_avx512bf16:
        return linear.packed, linear.bias
    return None


def _qkv(attn: nn.Module):
    """The q/k/v projections' shared matmul (kernels._SharedInput) of an INLINED_ATTENTIONS module, else None."""
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if type(attn) not in INLINED_ATTENTIONS or not all(isinstance(p, SharedInputLinear) for p in projections):
        return None
    group = projections[0].group
    if any(p.group is not group for p in projections) or [p.index for p in projections] != [0, 1, 2] \
            or len(group.sizes) != 3 or group.backend.pack is not pack_avx512bf16:
        return None
    return group


def _gate_up(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(packed weight, bias) of a FusedGatedMLP's gate/up pair sharing one matmul on linear_avx512bf16.c."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if isinstance(gate, SharedInputLinear) and isinstance(up, SharedInputLinear) and gate.group is up.group \
            and (gate.index, up.index) == (0, 1) and len(gate.group.sizes) == 2 \
            and gate.group.backend.pack is pack_avx512bf16:
        return gate.group.weight, gate.group.bias
    return None


class FusedDecoderLayer(nn.Module):
    """A DECODER_LAYERS layer whose o_proj, residual adds, post-attention norm and MLP run as one C call
    (NativeKernel.mlp_block) after the attention; where the q/k/v projections share one matmul the attention is
    inlined too (_direct_forward). `fit` checks the parts at install."""

    def __init__(self, layer: nn.Module, kernel):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.attention_type = getattr(layer, "attention_type", "full_attention")  # the model's mask lookup
        self.o_proj, self.kernel = layer.self_attn.o_proj, kernel
        self.self_attn.o_proj = DeferredProjection()
        self._o, self._gate_up, self._down = _packed(self.o_proj), _gate_up(self.mlp), _packed(self.mlp.down_proj)
        self._qkv = _qkv(self.self_attn)
        self._modeling = sys.modules[type(self.self_attn).__module__]  # its rotary and attention functions
        norm, post = self.input_layernorm, self.post_attention_layernorm
        # What _direct_forward hands the kernels unchecked: fixed per layer, so checked once, here.
        self._direct = (self._qkv is not None and isinstance(norm, FusedRMSNorm) and norm.weight.dtype == torch.bfloat16
                        and norm.weight.shape == post.weight.shape and norm.weight.is_contiguous()
                        and post.weight.is_contiguous())

    @staticmethod
    def fit(layer: nn.Module, kernel) -> bool:
        mlp, norm = layer.mlp, layer.post_attention_layernorm
        return (kernel.bf16_units and isinstance(mlp, FusedGatedMLP) and isinstance(norm, FusedRMSNorm)
                and norm.weight.dtype == torch.bfloat16 and norm.weight.shape[0] % 8 == 0
                and _packed(layer.self_attn.o_proj) is not None and _packed(mlp.down_proj) is not None
                and _gate_up(mlp) is not None and mlp.gate_proj.out_features % 8 == 0)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if paths.linears_on_torch():
            # A lone prompt pass on PyTorch's matmul (paths.py): the layer's own composition, each projection a
            # KernelLinear that takes F.linear there.
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            h = hidden_states + self.o_proj(attn)
            return h + self.mlp(self.post_attention_layernorm(h))
        if self._direct and hidden_states.numel() and hidden_states.dtype == torch.bfloat16 \
                and _plain(hidden_states, self.input_layernorm.weight, self.post_attention_layernorm.weight) \
                and "past_key_value" not in kwargs:  # (the deprecated name: the stock attention renames it)
            return self._direct_forward(hidden_states, **kwargs)
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden = hidden_states.shape[-1]
        if hidden_states.numel() and hidden_states.dtype == torch.bfloat16 \
                and _plain(hidden_states, attn, self.post_attention_layernorm.weight):
            out = self._block(hidden_states.reshape(-1, hidden).contiguous(), attn.reshape(-1, attn.shape[-1]).contiguous())
            return out.view(hidden_states.shape)
        h = hidden_states + self.o_proj(attn)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _direct_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                        attention_mask: torch.Tensor | None = None, past_key_values=None, cache_position=None,
                        **kwargs) -> torch.Tensor:
        """forward() with the attention module inlined and the kernels called directly: the same calls on the same
        tensors as the modules make (input norm, the q/k/v matmul, the module's rotary function, the cache update,
        the configured attention function, the block), so the same numbers, without the five module calls, the
        shared-input bookkeeping and the per-call checks around them (forward checked once: bf16, plain).
        Why: SmolLM2-135M spent ~40% of a decode step outside the kernels (6.3 of 14.5 ms); steps alternating with
        and without this in one process: 15.09 -> 14.12 ms at one row, 16.34 -> 15.27 at four; Qwen2.5-0.5B
        25.12 -> 24.08 and 26.50 -> 25.47 ms."""
        a, group, kernel = self.self_attn, self._qkv, self.kernel
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        norm = self.input_layernorm
        qkv = kernel.linear_avx512(kernel.rms_norm(x, norm.weight, norm.variance_epsilon), group.weight, group.bias)
        hidden_shape = (*shape[:-1], -1, a.head_dim)
        q, k, v = (t.view(hidden_shape).transpose(1, 2)
                   for t in qkv.view(*shape[:-1], qkv.shape[-1]).split(group.sizes, dim=-1))
        cos, sin = position_embeddings
        q, k = self._modeling.apply_rotary_pos_emb(q, k, cos, sin)  # fused_ops.c's, where install_rotary put it
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, a.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        implementation = a.config._attn_implementation
        attend = self._modeling.eager_attention_forward if implementation == "eager" \
            else self._modeling.ALL_ATTENTION_FUNCTIONS[implementation]
        if hasattr(a, "sliding_window"):  # Qwen2Attention passes it; LlamaAttention has none
            kwargs["sliding_window"] = a.sliding_window
        attn, _ = attend(a, q, k, v, attention_mask, dropout=0.0 if not a.training else a.attention_dropout,
                         scaling=a.scaling, **kwargs)
        return self._block(x, attn.reshape(x.shape[0], -1).contiguous()).view(shape)

    def _block(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x + o_proj(attn), then its post-attention norm and MLP added: one mlp_block call on [rows, ...] inputs."""
        post = self.post_attention_layernorm
        return self.kernel.mlp_block(x, attn, self._o, post.weight, post.variance_epsilon, self._gate_up, self._down)


def install(model: nn.Module, kernel) -> int:
    """Put the model's RMS_NORMS and SiLU GATED_MLPS on `kernel`'s fused ops (exact types: subclasses may compute
    something else), then its DECODER_LAYERS whose parts all run on linear_avx512bf16.c on FusedDecoderLayer, and
    this process's rotary embeddings (install_rotary); returns how many modules."""
    install_rotary(kernel)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in RMS_NORMS:
                setattr(parent, name, FusedRMSNorm(child, kernel))
                n += 1
            elif type(child) in GATED_MLPS and type(child.act_fn) in (SiLUActivation, nn.SiLU):
                setattr(parent, name, FusedGatedMLP(child, kernel))
                n += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in DECODER_LAYERS and FusedDecoderLayer.fit(child, kernel):
                setattr(parent, name, FusedDecoderLayer(child, kernel))
                n += 1
    return n
