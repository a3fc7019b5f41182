"""The three places FastChat must consult our adapters (installed by register_adapters, idempotent).

1. `get_model_adapter(model_path)`: FastChat tries every adapter on the path's *basename* first,
   so a built-in adapter matching the folder name ("chatglm3-6b", "Qwen2.5-...") wins before any
   content check on the full path. We ask our adapters by checkpoint content first; a model *name*
   (API server, UI) is resolved through the config file. Everything else falls through to FastChat.
2. `get_generate_stream_function(model, model_path)`: FastChat picks it from the model's class
   name (ChatGLM -> generate_stream_chatglm, which passes no stop ids: lm-sys/FastChat#2726,
   #3421). An adapter with `generate_stream_function()` supplies its own.
3. `Conversation.get_prompt`: conversations named chat_template.CONV_NAME are rendered by the
   tokenizer's template (see chat_template.py for why this is routed by name), and in the conversations
   our adapters serve, message text is marked so that the worker tokenizes it as text
   (worker_adapters/message_text.py: a typed `<|im_end|>` must not become a control token).
"""

from __future__ import annotations

import functools
import sys

UPSTREAM = "https://github.com/lm-sys/FastChat/issues/2726"  # also "https://github.com/lm-sys/FastChat/issues/3421"


def content_adapter(model_path: str):
    """Our adapter for this checkpoint (path or configured name), or None."""
    from worker_adapters import our_adapters
    from worker_adapters.checkpoint import read_checkpoint

    info = read_checkpoint(model_path)
    if info is None:
        return None
    for a in our_adapters():
        if a.match_checkpoint(info):
            return a
    return None


def _install_get_model_adapter(ma) -> None:
    if getattr(ma.get_model_adapter, "_cpu_arena", False):
        return
    original = ma.get_model_adapter

    @functools.cache
    def get_model_adapter(model_path: str):
        return content_adapter(model_path) or original(model_path)

    get_model_adapter._cpu_arena = True
    get_model_adapter.original = original
    ma.get_model_adapter = get_model_adapter


def _install_generate_stream(ma) -> None:
    if not getattr(ma.get_generate_stream_function, "_cpu_arena", False):
        original = ma.get_generate_stream_function

        def get_generate_stream_function(model, model_path: str):
            a = ma.get_model_adapter(model_path)
            pick = getattr(a, "generate_stream_function", None)
            fn = pick(model, model_path) if pick else None
            return fn or original(model, model_path)

        get_generate_stream_function._cpu_arena = True
        ma.get_generate_stream_function = get_generate_stream_function
    # model_worker imports the function by name; patch its copy if it is already imported.
    # (Unless ui_utf8_stream already wrapped that copy: its wrapper looks the function up on `ma` at call time.)
    worker = sys.modules.get("fastchat.serve.model_worker")
    if worker is not None and not getattr(worker.get_generate_stream_function, "_cpu_arena_utf8", False):
        worker.get_generate_stream_function = ma.get_generate_stream_function


def _install_get_prompt() -> None:
    from fastchat.conversation import Conversation

    if getattr(Conversation.get_prompt, "_cpu_arena", False):
        return
    original = Conversation.get_prompt

    def get_prompt(self) -> str:
        from worker_adapters import message_text
        from worker_adapters.chat_template import CONV_NAME, render_prompt

        if self.name == CONV_NAME:
            return render_prompt(self)
        return original(message_text.marked_copy(self))

    get_prompt._cpu_arena = True
    Conversation.get_prompt = get_prompt


def install() -> None:
    from fastchat.model import model_adapter as ma

    _install_get_model_adapter(ma)
    _install_generate_stream(ma)
    _install_get_prompt()
    clear_caches()


def clear_caches() -> None:
    """Forget adapter choices (tests change CPU_ARENA_CONFIG; the UI caches nothing else)."""
    from fastchat.model import model_adapter as ma

    for fn in (ma.get_model_adapter, getattr(ma.get_model_adapter, "original", None)):
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    from worker_adapters import chat_template

    chat_template._template_spec.cache_clear()


def apply() -> None:
    # Our adapters must be in FastChat's list for the dispatch to find them.
    from worker_adapters import register_adapters

    register_adapters()
    install()
