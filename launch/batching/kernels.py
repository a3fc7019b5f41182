"""Linear layers on oneDNN with prepacked weights, so a decode step with several rows costs about one row.

Why: PyTorch's CPU `F.linear` goes to MKL's sgemm. On this project's reference machine (AMD EPYC,
AVX2) MKL multiplies one row at memory speed but 2-8 rows at 2-3x the time of one row, so a
continuous batch of 4 gained little (SmolLM2 step: 87 ms at 1 row, 167 ms at 4, one thread).
oneDNN with the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`,
the same kernel inductor's freezing pass uses for bf16) reads the weights once for all rows:
83 ms at 1 row and 105 ms at 4 rows with 2 threads (`python -m launch bench` measures it end to
end). The packed copy replaces the module's weight, so the memory stays the same, except where
the output projection shares its weight with the input embedding (tied): the embedding keeps
the plain tensor and the packed copy is extra.

bf16 on a CPU without bf16 units (no AVX512_BF16/AMX, so oneDNN has no bf16 kernels) runs on a small
AVX2 kernel instead (bf16_linear.c, built by native.py): batch 1 at memory speed, and several rows
for little more than one; one decode token's attention goes to bf16_attention.c (attention.py).

The model's `prepack_weights = false` in the config (or the worker's `--no-prepack`) keeps stock linears,
for comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import torch
from torch import nn

from launch.batching.native import bf16_kernel

log = logging.getLogger("batching")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # "none", [], "": no activation fused after the matmul.
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` computed by oneDNN from a weight packed once at load time."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a Parameter: an opaque oneDNN tensor has no place in a state dict.
        self.packed = _pack(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn_packed=True"


def can_prepack(dtype: torch.dtype) -> str | None:
    """None when oneDNN can run linears of this dtype here, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return "oneDNN has no bf16 kernels for this CPU"
    return f"oneDNN linears are not used for {dtype}"


class Bf16Linear(nn.Module):
    """`nn.Linear` on a bf16 weight, computed by the AVX2 kernel; the weight is the module's own (no copy)."""

    def __init__(self, linear: nn.Linear, kernel):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: a tied embedding stays tied, nothing is copied
        if not self.weight.is_contiguous():
            self.weight = nn.Parameter(self.weight.detach().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=bf16_linear.c"


class _SharedInput:
    """One packed matmul for several projections of the same input (q/k/v, gate/up).

    Why: each oneDNN call has a fixed cost (thread fork/join, setup), paid ~7 times per layer
    per step; with small models it is a large part of a step. The attention and MLP blocks of
    Llama-family models call their projections one after the other on the same tensor, so the
    first call computes all of them at once and the others pick up their slice.
    """

    def __init__(self, linears: list[nn.Linear]):
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.packed = _pack(weight)
        biases = [lin.bias for lin in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                                   for b, lin in zip(biases, linears, strict=True)])
        self.sizes = [lin.out_features for lin in linears]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._left = 0

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or self._left == 0:
            y = _packed_linear(x, self.packed, self.bias)
            self._input, self._outputs, self._left = x, y.split(self.sizes, dim=-1), len(self.sizes)
        out = self._outputs[index]
        self._left -= 1
        if self._left == 0:  # every projection took its slice: hold no tensors between steps
            self._input, self._outputs = None, ()
        return out


class SharedInputLinear(nn.Module):
    """One projection of a _SharedInput group; computes like the nn.Linear it replaces."""

    def __init__(self, group: _SharedInput, index: int, linear: nn.Linear):
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused_slice={self.index}"


# Projections that Llama, Qwen2, Mistral... compute from one input, in this call order.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fuse_shared_inputs(model: nn.Module, dtype: torch.dtype) -> int:
    n = 0
    for parent in list(model.modules()):
        for names in SHARED_INPUT_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(lin) is nn.Linear and lin.weight.dtype == dtype for lin in linears):
                continue
            if len({lin.in_features for lin in linears}) != 1:
                continue
            group = _SharedInput(linears)
            for i, (name, lin) in enumerate(zip(names, linears, strict=True)):
                setattr(parent, name, SharedInputLinear(group, i, lin))
            n += len(names)
    return n


def batch_rows_limit(dtype: torch.dtype) -> tuple[int | None, str]:
    """(the most rows worth decoding together for this dtype here or None for no limit, why).

    bf16 without bf16 units and without the AVX2 kernel (no compiler, no AVX2) runs on PyTorch's
    generic kernels, which compute every row separately: a 7B-shaped bf16 model decoded 1.03 tok/s
    at batch 1 and 0.70 tok/s in total at batch 4 on the reference machine (`python -m launch bench
    --shape qwen-7b`). There, requests are better served one after another.
    """
    if dtype == torch.bfloat16 and can_prepack(dtype) is not None and bf16_kernel()[0] is None:
        return 1, "bf16 without bf16 units: several rows cost several times one row on this CPU"
    return None, ""


def linear_backend(dtype: torch.dtype) -> str:
    """What prepack_linears puts a model of this dtype on, in words (worker log, bench JSON)."""
    why_not = can_prepack(dtype)
    if why_not is None:
        return "oneDNN packed weights"
    if dtype == torch.bfloat16:
        kernel, why = bf16_kernel()
        if kernel is not None:
            return "the AVX2 bf16 kernel"
        why_not = f"{why_not}; {why}"
    return f"PyTorch's kernels ({why_not})"


def prepack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` in `model` by a PackedLinear (projections of one input
    share one packed matmul), or by a Bf16Linear for bf16 where oneDNN has no bf16 kernels;
    returns how many were replaced."""
    dtype = next(model.parameters()).dtype
    why_not = can_prepack(dtype)
    if why_not and dtype == torch.bfloat16 and bf16_kernel()[0] is not None:
        return _use_bf16_kernel(model, bf16_kernel()[0])
    if why_not:
        log.info("linears stay on %s", linear_backend(dtype))
        return 0
    n = _fuse_shared_inputs(model, dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Exact type: subclasses (quantized, LoRA...) compute something else.
            if type(child) is nn.Linear and child.weight.dtype == dtype:
                setattr(parent, name, PackedLinear(child))
                n += 1
    _give_back_freed_memory()
    return n


def _use_bf16_kernel(model: nn.Module, kernel) -> int:
    from launch.batching import attention

    attention.install(kernel)  # one decode token's attention too: torch's bf16 SDPA is slow here
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, Bf16Linear(child, kernel))
                n += 1
    return n


def _give_back_freed_memory() -> None:
    # The plain weights are freed now, but glibc keeps freed heap pages in its arenas: without a
    # trim the worker's RSS stays at plain + packed (SmolLM2: 1.42 GB instead of 1.00 GB).
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
