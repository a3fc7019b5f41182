"""Which engine serves a model: continuous batching, or the adapter's own generate function.

FastChat picks a generate function per model (`get_generate_stream_function`; the project's
adapters supply theirs through the adapter_dispatch patch). When that function is FastChat's
plain `generate_stream` (optionally wrapped by worker_adapters.common.with_stop_ids, which adds
the model's end-of-turn ids), the model is an ordinary causal LM fed `tokenizer(prompt)`, and
the batching engine computes exactly the same thing. Anything else (ChatGLM3's
generate_stream_chatglm3, FastChat's Falcon/CodeT5+ functions...) runs unbatched, through that
very function, on the serial engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EnginePlan:
    kind: str  # "batching" | "serial"
    generate: Callable
    # The model's own stop ids (the adapter's), applied to every request on the batching engine.
    stop_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        name = getattr(self.generate, "__name__", repr(self.generate))
        if self.kind == "batching":
            return f"continuous batching (stop ids {list(self.stop_ids)})"
        return f"one request at a time through the adapter's {name} (it cannot be batched)"


def plan_for(model, model_path: str) -> EnginePlan:
    from fastchat.model import model_adapter as ma
    from fastchat.serve.inference import generate_stream

    # Looked up on the module: the adapter_dispatch patch replaces it there.
    fn = ma.get_generate_stream_function(model, model_path)
    if getattr(fn, "wrapped", fn) is generate_stream:
        return EnginePlan("batching", fn, tuple(int(i) for i in getattr(fn, "stop_ids", ())))
    return EnginePlan("serial", fn)


def build_engine(plan: EnginePlan, model, tokenizer, *, max_batch: int, context_len: int, lease=None,
                 stream_interval: int | None = None, prefix_cache=None):
    """The plan's engine (not started). stream_interval: None for the engines' default (engine.STREAM_INTERVAL).
    prefix_cache: a prefix_cache.PrefixCache for the batching engine, or None."""
    chosen = {} if stream_interval is None else {"stream_interval": stream_interval}
    if plan.kind == "batching":
        from launch.batching.engine import BatchEngine

        return BatchEngine(model, tokenizer, max_batch=max_batch, context_len=context_len, lease=lease,
                           prefix_cache=prefix_cache, **chosen)
    from launch.batching.serial import SerialEngine

    return SerialEngine(model, tokenizer, plan.generate, context_len=context_len, lease=lease, **chosen)
