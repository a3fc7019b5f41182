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
    # Why a model fed tokenizer(prompt) still runs one request at a time: what it did not accept.
    refused: str = ""
    # Text the model writes before its answer proper, cut once (the adapter's generate function says which).
    drop_leading: str = ""

    def describe(self) -> str:
        name = getattr(self.generate, "__name__", repr(self.generate))
        if self.kind == "batching":
            return f"continuous batching (stop ids {list(self.stop_ids)})"
        if self.refused:
            return f"one request at a time through {name}: the batching engine cannot drive it ({self.refused})"
        return f"one request at a time through the adapter's {name} (it cannot be batched)"


def plan_for(model, model_path: str) -> EnginePlan:
    from fastchat.model import model_adapter as ma
    from fastchat.serve.inference import generate_stream

    # Looked up on the module: the adapter_dispatch patch replaces it there.
    fn = ma.get_generate_stream_function(model, model_path)
    if getattr(fn, "wrapped", fn) is not generate_stream:
        return EnginePlan("serial", fn)
    refused = batching_refusal(model)
    if refused:
        return EnginePlan("serial", fn, refused=refused)
    return EnginePlan("batching", fn, tuple(int(i) for i in getattr(fn, "stop_ids", ())),
                      drop_leading=getattr(fn, "drop_leading", ""))


PROBE_TOKENS = 3  # a length no model dimension is likely to share, so the cache's sequence axis is unambiguous


def batching_refusal(model) -> str:
    """Why the batching engine cannot drive this model, or "" when it can. Decided by what the model
    accepts: the engine calls forward with `logits_to_keep` and reads the returned cache (a transformers
    Cache, or legacy per-layer (key, value) pairs) as [batch, heads, sequence, dim]. Remote code written
    for older transformers (Qwen-7B-Chat's QWenLMHeadModel: no logits_to_keep, keys as [batch, sequence,
    heads, dim]) fails one of these; FastChat's generate_stream, on the serial engine, still serves it."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in params:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    from engine.thread import off_main_thread

    def probe():
        with torch.inference_mode():
            return model(input_ids=torch.zeros(1, PROBE_TOKENS, dtype=torch.long), use_cache=True, logits_to_keep=1)

    try:
        # On a short-lived thread: a forward on the worker's main thread would leave an OpenMP pool there
        # that halves every later decode step's speed (engine/thread.py).
        out = off_main_thread(probe)
    except Exception as e:  # noqa: BLE001 - any failure of the engine's call is a reason to stay serial
        return f"a forward as the engine calls it raised {type(e).__name__}: {e}"
    from engine.prefill import legacy

    try:
        layers = legacy(out.past_key_values)
        key = layers[0][0]
    except Exception as e:  # noqa: BLE001
        return f"its cache cannot be read as per-layer keys and values ({type(e).__name__}: {e})"
    if out.logits.shape[1] != 1:
        return f"logits_to_keep=1 returned {out.logits.shape[1]} positions"
    if key.dim() != 4 or key.shape[0] != 1 or key.shape[2] != PROBE_TOKENS:
        return f"its cache keys have shape {tuple(key.shape)}, not [batch, heads, sequence, dim]"
    return ""


def build_engine(plan: EnginePlan, model, tokenizer, *, max_batch: int, context_len: int, lease=None,
                 stream_interval: int | None = None, prefix_cache=None):
    """The plan's engine (not started). stream_interval: None for the engines' default (engine.protocol.STREAM_INTERVAL).
    prefix_cache: a prefix_cache.PrefixCache for the batching engine, or None."""
    chosen = {} if stream_interval is None else {"stream_interval": stream_interval}
    if plan.kind == "batching":
        from engine.batching import BatchEngine

        return BatchEngine(model, tokenizer, max_batch=max_batch, context_len=context_len, lease=lease,
                           prefix_cache=prefix_cache, drop_leading=plan.drop_leading, **chosen)
    from engine.serial import SerialEngine

    return SerialEngine(model, tokenizer, plan.generate, context_len=context_len, lease=lease, **chosen)
