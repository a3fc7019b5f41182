"""Linear layers on kernels that read each weight once per decode step, however many rows it has.

Why: PyTorch's CPU `F.linear` goes to MKL's sgemm. On this project's reference machine (AMD EPYC,
AVX2) MKL multiplies one row at a third of memory speed and 2-8 rows at 2-3x the time of one row, so a
continuous batch of 4 gained little. Two backends fix that, chosen per dtype by `choose_backend`:

- The project's kernel (linear.c, built by native.py) for fp32 and bf16: on AVX2, bf16 widened to fp32;
  on AVX512_BF16 units where the CPU has them (linear_avx512bf16.c). It computes each output the same
  way whatever the number of rows (oneDNN's bf16 matmul does not, see choose_backend). linear.c reads the
  module's own weight, so nothing is copied and a tied output projection stays tied; linear_avx512bf16.c
  reads every weight from a packed copy in tiles of 64 rows (native.pack_avx512bf16; the plain one goes,
  except a tied output projection's, which the embedding keeps). Qwen2.5-0.5B fp32
  decode step, 2 threads, AVX2: 219 ms with oneDNN packed weights, 150 ms on the kernel (4 rows: 283 ->
  210 ms). Attention goes to attention.c as well (attention.py; engine.kernels.install puts a served model on
  both).
- oneDNN with the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`, the
  kernel inductor's freezing pass uses), where there is no kernel (no compiler, no AVX2). The packed
  copy replaces the module's weight, except where the output projection shares its weight with the
  input embedding (tied): the embedding keeps the plain tensor and the packed copy is extra.

Projections of one input (q/k/v, gate/up) share one matmul on either backend (_SharedInput).
The model's `prepack_weights = false` in the config (or the worker's `--no-prepack`) keeps stock linears,
for comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.host.hugepages import give_back_freed_memory
from engine.kernels import paths
from engine.kernels.native import native_kernel, pack_avx512bf16, unpack_avx512bf16

log = logging.getLogger("batching")


@dataclass(frozen=True)
class LinearBackend:
    """How linears of one dtype are computed here: `run(x, operand, bias)` where operand is
    `pack(weight)`; `copies` when that is a new tensor (the plain weight can go). `unpack(operand, n_in)` gives
    the plain weight back, for PyTorch's matmul on a prompt pass that runs there (engine/kernels/paths.py); None
    where the backend is PyTorch's own already."""

    name: str
    pack: Callable[[torch.Tensor], torch.Tensor]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    copies: bool
    unpack: Callable[[torch.Tensor, int], torch.Tensor] | None = None


def compute(backend: LinearBackend, x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias on the backend, or on PyTorch's matmul inside a lone prompt pass that paths.py sends
    there (the weight unpacked for the call: the model keeps one copy, in the backend's layout). Not the output
    projection of that pass, which computes the last position's logits only: one row, which the kernel reads the
    weight for once, where unpacking it would copy the largest weight of the model for nothing."""
    if backend.unpack is not None and x.numel() > x.shape[-1] and paths.linears_on_torch():
        return F.linear(x, backend.unpack(operand, x.shape[-1]), bias)
    return backend.run(x, operand, bias)


def _plain_weight(weight: torch.Tensor, n_in: int) -> torch.Tensor:
    return weight


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _onednn_run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # "none", [], "": no activation fused after the matmul.
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


ONEDNN = LinearBackend("oneDNN packed weights", _onednn_pack, _onednn_run, copies=True)


def _kernel_backend(kernel, dtype: torch.dtype) -> LinearBackend:
    if dtype == torch.bfloat16 and kernel.bf16_units:
        def run_avx512(x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            y = kernel.linear_avx512(x.reshape(-1, x.shape[-1]), operand, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        # Every weight is packed into a new tensor (native.pack_avx512bf16): a tied output projection gets a
        # copy of its own, as on oneDNN.
        return LinearBackend("the AVX512_BF16 kernel (linear_avx512bf16.c)", pack_avx512bf16, run_avx512,
                             copies=True, unpack=unpack_avx512bf16)

    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = kernel(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return LinearBackend("the AVX2 kernel (linear.c)", torch.Tensor.contiguous, run, copies=False,
                         unpack=_plain_weight)


def torch_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's matmul one row at a time: a row's result is the one it gets alone, whatever the batch
    (oneDNN's result for a row changes with the rows computed beside it, choose_backend)."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.cat([F.linear(rows[i:i + 1], weight, bias) for i in range(rows.shape[0])])
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Decode steps on PyTorch's matmul (paths.decode = "torch"), where measurement says it beats the kernel: each row
# alone, and every prompt pass whole on F.linear (paths.Paths sends every prompt alone then).
TORCH_ROWS = LinearBackend("PyTorch's matmul, one row at a time", torch.Tensor.contiguous, torch_rows,
                           copies=False, unpack=_plain_weight)


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


def choose_backend(dtype: torch.dtype, decode: str = paths.KERNEL) -> tuple[LinearBackend | None, str]:
    """(the backend for linears of this dtype here, "") or (None, why they stay on PyTorch's kernels).
    decode = paths.TORCH (measured faster for decode steps, engine/kernels/path_choice.py): TORCH_ROWS.

    The project's kernel first, for both dtypes: it computes every output the same way whatever the
    number of rows, which the batching worker's "batched equals single" rests on. oneDNN's bf16 matmul
    does not: on an AMD EPYC with AVX512_BF16, a [896 x 4864] bf16 weight gave row 0 a different result
    at 3 rows than at 1, and SmolLM2-135M answered 2 of 4 prompts differently batched than alone
    (tests/test_batching_stack.py). Where the CPU has AVX512_BF16 the kernel computes bf16 on those units
    (linear_avx512bf16.c). oneDNN only where there is no kernel (no compiler, no AVX2).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        return None, f"no faster linears for {dtype}"
    if decode == paths.TORCH:
        return TORCH_ROWS, ""
    kernel, kernel_why = native_kernel()
    if kernel is not None:
        return _kernel_backend(kernel, dtype), ""
    onednn_why = can_prepack(dtype)
    if onednn_why is None:
        return ONEDNN, ""
    return None, f"{onednn_why}; {kernel_why}"


class KernelLinear(nn.Module):
    """`nn.Linear` computed by a LinearBackend. Where the backend reads the plain weight, the module
    keeps the same Parameter (a tied embedding stays tied, nothing is copied)."""

    def __init__(self, linear: nn.Linear, backend: LinearBackend):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        if backend.copies:
            # A non-persistent buffer: a packed layout has no place in a state dict, and model.buffers() is
            # what hugepages.collapse_model walks.
            self.register_buffer("packed", backend.pack(linear.weight.detach()), persistent=False)
        else:
            self.weight = linear.weight
            if not self.weight.is_contiguous():
                self.weight = nn.Parameter(backend.pack(self.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compute(self.backend, x, self.packed if self.backend.copies else self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend.name!r}"


class _SharedInput:
    """One matmul for several projections of the same input (q/k/v, gate/up).

    Why: each kernel call has a fixed cost (thread fork/join, setup), paid ~7 times per layer
    per step; with small models it is a large part of a step. The attention and MLP blocks of
    Llama-family models call their projections one after the other on the same tensor, so the
    first call computes all of them at once and the others pick up their slice.
    """

    def __init__(self, linears: list[nn.Linear], backend: LinearBackend):
        self.backend = backend
        self.weight = backend.pack(torch.cat([lin.weight.detach() for lin in linears]))
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
            y = compute(self.backend, x, self.weight, self.bias)
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
        if index == 0:
            # The first projection owns the fused tensors, so that model.buffers() walks them like any
            # weight (hugepages.collapse_model put only half of Qwen2.5-0.5B's weights on 2 MB pages while
            # they sat in the plain group object). Non-persistent: kernel layouts have no place in a state dict.
            self.register_buffer("fused_weight", group.weight, persistent=False)
            self.register_buffer("fused_bias", group.bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused_slice={self.index}"


# Projections that Llama, Qwen2, Mistral... compute from one input, in this call order.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _parents(model: nn.Module) -> list[nn.Module]:
    """The modules that may hold linears, not the linears themselves: a list that held them would keep every
    replaced weight alive until prepacking ends."""
    return [m for m in model.modules() if type(m) is not nn.Linear]


def _fuse_shared_inputs(model: nn.Module, dtype: torch.dtype, backend: LinearBackend) -> int:
    n = 0
    for parent in _parents(model):
        for names in SHARED_INPUT_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(lin) is nn.Linear and lin.weight.dtype == dtype for lin in linears):
                continue
            if len({lin.in_features for lin in linears}) != 1:
                continue
            group = _SharedInput(linears, backend)
            for i, name in enumerate(names):  # no loop variable left holding the last old linear
                setattr(parent, name, SharedInputLinear(group, i, linears[i]))
            n += len(names)
    return n


def batch_rows_limit(dtype: torch.dtype) -> tuple[int | None, str]:
    """(the most rows worth decoding together for this dtype here or None for no limit, why).

    bf16 without the project's kernel (no compiler, no AVX2) is decoded one request at a time. On
    PyTorch's generic kernels (no bf16 units) every row costs about one more row: a 7B-shaped bf16 model
    decoded 1.03 tok/s at batch 1 and 0.70 tok/s in total at batch 4 on an AVX2-only machine
    (`make bench ARGS=--shape qwen-7b`). On oneDNN (bf16 units) a row's result depends on the rows batched with
    it (choose_backend), and a batched answer must equal the single one.
    """
    if dtype == torch.bfloat16 and native_kernel()[0] is None:
        return 1, "bf16 without the project's kernel: batched rows would cost or change too much"
    return None, ""


def linear_backend(dtype: torch.dtype) -> str:
    """What prepack_linears puts a model of this dtype on, in words (worker log, bench JSON)."""
    backend, why = choose_backend(dtype, paths.current().decode)
    return backend.name if backend else f"PyTorch's kernels ({why})"


def prepack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of the model's dtype by a KernelLinear on the backend
    `choose_backend` picks (projections of one input share one matmul); returns how many. Linears only:
    engine.kernels.install puts the attention and the fused ops on the kernels too, as the worker serves."""
    dtype = next(model.parameters()).dtype
    backend, _ = choose_backend(dtype, paths.current().decode)
    if backend is None:
        log.info("linears stay on %s", linear_backend(dtype))
        return 0
    n = _fuse_shared_inputs(model, dtype, backend)
    for parent in _parents(model):
        for name, child in list(parent.named_children()):
            # Exact type: subclasses (quantized, LoRA...) compute something else.
            if type(child) is nn.Linear and child.weight.dtype == dtype:
                setattr(parent, name, KernelLinear(child, backend))
                n += 1
    give_back_freed_memory()
    return n
