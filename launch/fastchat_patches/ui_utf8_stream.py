"""Streamed text never ends in half a character (no U+FFFD flicker in Chinese answers).

fschat's generate_stream decodes the whole output on every step. With a byte-level tokenizer
(SmolLM2, Qwen2.5) one CJK character often spans two or three tokens; decoded after the first of
them, the text ends in U+FFFD, which the UI shows until the next chunk (and keeps for good when the
answer is cut at max_new_tokens in the middle of a character). Each chunk carries the full text so
far, so dropping the trailing replacement characters is exactly "hold back the incomplete bytes
until they decode"; the next chunk brings the whole character. A U+FFFD in the middle of the text
(really invalid bytes) is left alone. The OpenAI API server already strips U+FFFD (its own fix);
this one covers the Gradio UI, which reads the worker directly. Upstream: lm-sys/FastChat#1190 (closed unmerged; it
stripped every U+FFFD in the UI).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

UPSTREAM = "https://github.com/lm-sys/FastChat/pull/1190"
REPLACEMENT = "\ufffd"


def hold_back_partial(text: str) -> str:
    return text.rstrip(REPLACEMENT)


def wrap_stream(func: Callable[..., Iterator[dict]]) -> Callable[..., Iterator[dict]]:
    if getattr(func, "_cpu_arena_utf8", False):
        return func

    @functools.wraps(func)
    def stream(*args, **kwargs):
        for out in func(*args, **kwargs):
            if isinstance(out, dict) and isinstance(out.get("text"), str):
                out = {**out, "text": hold_back_partial(out["text"])}
            yield out

    stream._cpu_arena_utf8 = True
    return stream


def _patch(model_worker) -> None:
    original = model_worker.get_generate_stream_function
    if getattr(original, "_cpu_arena_utf8", False):
        return

    @functools.wraps(original)
    def get_generate_stream_function(*args, **kwargs):
        # Looked up at call time on model_adapter, not captured: the adapter dispatch patch may be installed
        # there after this one, and both must apply whichever came first.
        from fastchat.model import model_adapter

        return wrap_stream(model_adapter.get_generate_stream_function(*args, **kwargs))

    get_generate_stream_function._cpu_arena_utf8 = True
    model_worker.get_generate_stream_function = get_generate_stream_function


def apply() -> None:
    # Lazy: only worker processes import model_worker (and torch); the controller must start fast.
    from launch.fastchat_patches.api_guard.on_import import when_imported

    when_imported("fastchat.serve.model_worker", _patch)
