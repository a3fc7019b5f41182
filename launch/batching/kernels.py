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

`CPU_ARENA_PREPACK=0` (or the model's `prepack_weights = false`) keeps stock linears, for comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import torch
from torch import nn

log = logging.getLogger("batching")


class PackedLinear(nn.Module):
    """`nn.Linear` computed by oneDNN from a weight packed once at load time."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a Parameter: an opaque oneDNN tensor has no place in a state dict.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

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


def prepack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` in `model` by a PackedLinear; returns how many were replaced."""
    dtype = next(model.parameters()).dtype
    why_not = can_prepack(dtype)
    if why_not:
        log.info("weights not prepacked: %s", why_not)
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Exact type: subclasses (quantized, LoRA...) compute something else.
            if type(child) is nn.Linear and child.weight.dtype == dtype:
                setattr(parent, name, PackedLinear(child))
                n += 1
    _give_back_freed_memory()
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
