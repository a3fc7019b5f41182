"""Which implementation each kind of call runs on, fixed for a worker's life: the decode step's linears, a prompt
pass's linears, and attention. engine/kernels/path_choice.py measures the candidates on the loaded model's shapes
and picks; this module holds the choice and answers, call by call, which way to go.

Why per call kind and not per machine flag: the project's kernels read each weight once however many rows a
decode step has, which PyTorch's matmul does not; but a prompt pass is compute-bound, and where the CPU has
matrix units PyTorch's oneDNN matmul uses them (AMX) while the kernels do not. Which side wins depends on the
CPU, the model's widths and the prompt's length, so it is measured.

Why prompts on PyTorch are prefilled alone and whole: oneDNN's result for a row depends on the rows computed
with it, and PyTorch's flash attention sums in blocks that depend on padding. A prompt of `alone_from` tokens or
more is therefore always prefilled by itself, from its first token (never grouped, never from a prefix cache, and
its keys are not kept for others): its tokens then depend on the prompt only, whatever else the worker serves.
Shorter prompts and every decode step run on the kernels, which compute each row the same way alone or batched.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

KERNEL, TORCH = "kernel", "torch"
NEVER = 1 << 62  # a prompt length no prompt reaches


@dataclass(frozen=True)
class Paths:
    """decode: KERNEL (the project's linear kernel) or TORCH (PyTorch's matmul, each row alone: one row's result
    never depends on the others). prompt_torch_from: prompts of this many tokens or more run their linears on
    PyTorch's matmul. attention_torch_from: attention of this many queries or more runs on PyTorch's SDPA (at least
    2: decode steps stay on the kernel, the only one whose result is the same padded or not). `figures`: what the
    measurement saw, for the log and the bench (empty when the paths were given, not measured)."""

    decode: str = KERNEL
    prompt_torch_from: int = NEVER
    attention_torch_from: int = 1025
    figures: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.decode not in (KERNEL, TORCH):
            raise ValueError(f"paths: decode must be {KERNEL!r} or {TORCH!r}, got {self.decode!r}")
        if self.prompt_torch_from < 1:
            raise ValueError(f"paths: prompt_torch_from must be 1 or more, got {self.prompt_torch_from}")
        if self.attention_torch_from < 2:
            raise ValueError("paths: attention_torch_from must be 2 or more (decode steps' attention stays on the "
                             f"kernel), got {self.attention_torch_from}")
        if self.decode == TORCH and self.prompt_torch_from != 1:
            # A grouped prompt pass on PyTorch's matmul would depend on the group: every prompt goes alone.
            object.__setattr__(self, "prompt_torch_from", 1)

    @property
    def alone_from(self) -> int:
        """Prompts this long or longer are prefilled alone and whole (see the module's docstring)."""
        return min(self.prompt_torch_from, self.attention_torch_from)

    def describe(self) -> dict[str, str]:
        """One phrase per call kind, for the worker's log and the bench's table."""
        def from_(n: int, what: str) -> str:
            if n >= NEVER:
                return "the project's kernel"
            if n <= 1:
                return what
            return f"the project's kernel up to {n - 1} tokens, {what} from {n}"

        return {
            "decode": "PyTorch's matmul, one row at a time" if self.decode == TORCH else "the project's kernel",
            "prompt": from_(self.prompt_torch_from, "PyTorch's matmul (oneDNN)"),
            "attention": from_(self.attention_torch_from, "PyTorch's SDPA"),
        }

    def spec(self) -> str:
        """The text parse() reads back."""
        def n(v: int) -> str:
            return "never" if v >= NEVER else str(v)

        return f"decode={self.decode},prompt_torch_from={n(self.prompt_torch_from)}," \
               f"attention_torch_from={n(self.attention_torch_from)}"


# Everything on the kernels but the attention of prompts over 1024 tokens, which torch's flash attention computed
# faster (SmolLM2-135M bf16, AMD EPYC with AVX512_BF16, one prompt, kernel against flash: 600 tokens 0.48 against
# 0.52 s, 1000 tokens 0.93 against 0.94 s, 2000 tokens 2.55 against 2.32 s). What a worker runs when told
# `--paths kernels`, and what tests and tools get unless they choose.
KERNELS = Paths()

MEASURE = "measure"


def parse(spec: str) -> Paths | str:
    """A worker's --paths: "measure" (returned as is), "kernels" (KERNELS), or Paths.spec() text such as
    "decode=kernel,prompt_torch_from=512,attention_torch_from=never". Raises ValueError naming the fix."""
    spec = spec.strip()
    if spec == MEASURE:
        return MEASURE
    if spec == "kernels":
        return KERNELS
    values: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("decode", "prompt_torch_from", "attention_torch_from"):
            raise ValueError(f"paths: {part!r} is not one of decode=kernel|torch, prompt_torch_from=N|never, "
                             "attention_torch_from=N|never (or say 'measure' or 'kernels')")
        if key == "decode":
            values[key] = value
        elif value == "never":
            values[key] = NEVER
        elif value.isdigit():
            values[key] = int(value)
        else:
            raise ValueError(f"paths: {key} takes a whole number of tokens or 'never', got {value!r}")
    return Paths(**values)


# ---- the process's current paths, and the prompt pass being run ----

_current = KERNELS
_local = threading.local()


def current() -> Paths:
    return _current


def activate(paths: Paths) -> None:
    """Make `paths` this process's (engine.kernels.install does, once per served model)."""
    global _current
    _current = paths


def reset() -> None:
    activate(KERNELS)


@contextlib.contextmanager
def lone_prompt(tokens: int):
    """Around the prefill of one whole prompt of `tokens` tokens (engine.prefill.prefill): the linears inside take
    PyTorch's matmul when the prompt is `prompt_torch_from` long or longer. Only the thread that runs it."""
    before = getattr(_local, "tokens", 0)
    _local.tokens = tokens
    try:
        yield
    finally:
        _local.tokens = before


def linears_on_torch() -> bool:
    """Whether the linear being called now belongs to a lone prompt pass that runs on PyTorch's matmul."""
    tokens = getattr(_local, "tokens", 0)
    return tokens > 0 and tokens >= _current.prompt_torch_from


def attention_on_torch(queries: int) -> bool:
    return queries >= _current.attention_torch_from
