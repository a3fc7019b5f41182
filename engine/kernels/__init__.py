"""The kernels: linear layers, attention and fused ops on the project's C sources (csrc/) or oneDNN.

`install(model)` puts a loaded model on all of them, as the batching worker serves it. Each module does one part
(linear.prepack_linears, attention.install, fused_ops.install), so that a test or the bench can take only the
part it is about.
"""

from __future__ import annotations

import logging

log = logging.getLogger("batching")


def install(model, chosen=None) -> int:
    """Put `model` on the kernels as the batching worker serves it; returns how many linears were replaced.

    `chosen`: the paths.Paths this process runs each kind of call on (the worker's, measured by
    path_choice.choose_paths; default paths.KERNELS, everything on the kernels). First its linears
    (linear.prepack_linears, on the backend linear.choose_backend picks for its dtype). Then,
    only where that backend is the project's kernel (not oneDNN, not PyTorch's): this process's attention
    (attention.install: a query's attention the same batched or alone, and faster bf16 decode), and the model's
    norms, MLPs, rotary embedding and decoder layers (fused_ops.install, after the linears: a decoder layer is
    fused only where prepacking put its projections on linear_avx512bf16.c)."""
    # Imported here, not at the top: every import of an engine.kernels module runs this file first, and
    # fused_ops loads transformers' Llama and Qwen2 modelling code, which native.py's users need not load.
    from engine.kernels import attention, fused_ops, paths
    from engine.kernels.linear import ONEDNN, choose_backend, prepack_linears
    from engine.kernels.native import native_kernel

    paths.activate(chosen or paths.KERNELS)
    backend, _ = choose_backend(next(model.parameters()).dtype, paths.current().decode)
    n = prepack_linears(model)
    if backend is not None and backend is not ONEDNN and native_kernel()[0] is not None:
        kernel = native_kernel()[0]
        attention.install(kernel)
        log.info("%d norms, MLPs and decoder layers on fused_ops.c", fused_ops.install(model, kernel))
    return n


def uninstall() -> None:
    """Undo what install changed in this process rather than in a model (torch's SDPA, transformers' check for
    grouped key heads, the Llama and Qwen2 rotary embedding), so that models run after it on stock transformers.
    A model install changed keeps its replaced modules."""
    from engine.kernels import attention, fused_ops, paths

    paths.reset()
    attention.uninstall()
    fused_ops.uninstall_rotary()
