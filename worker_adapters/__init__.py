"""Custom FastChat model adapters for local checkpoints on CPU.

`register_adapters()` is the named registration point: every FastChat process calls it (through
the adapter_dispatch patch that launch.fastchat_entry applies) so the worker, the API server and the
UI all agree on templates.

Each adapter lives in its own module and registers itself with the `@adapter` decorator when the
module is imported (the `llm` plugin style). ADAPTER_MODULES lists them in priority order: the
specific remote-code families first, then the generic chat-template adapter. FastChat tries
adapters in list order, so ours are inserted at the front of `model_adapters`, ahead of the
built-in ones, and the patch `launch.fastchat_patches.adapter_dispatch` makes FastChat ask them by checkpoint
content first.

To add an adapter: write `worker_adapters/<name>.py` with a `common.CheckpointAdapter` subclass (a FastChat
BaseModelAdapter that matches on `match_checkpoint(info)`) decorated with `@adapter`, and list the module
in ADAPTER_MODULES.
"""

from __future__ import annotations

import importlib

ADAPTER_MODULES: tuple[str, ...] = (
    "worker_adapters.chatglm3",
    "worker_adapters.qwen",
    "worker_adapters.chat_template",
)

# Adapter classes in registration order, filled by @adapter as the modules above are imported.
ADAPTERS: list[type] = []


def adapter(cls: type) -> type:
    """Class decorator: declare a FastChat adapter of this project (idempotent)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def our_adapters() -> list:
    """The instances of our adapters that FastChat holds, in priority order."""
    from fastchat.model import model_adapter as ma

    by_type = {type(a): a for a in ma.model_adapters}
    return [by_type[c] for c in _in_priority_order() if c in by_type]


def _in_priority_order() -> list[type]:
    # Priority is ADAPTER_MODULES' order, not import order (a test may import any module first).
    rank = {m: i for i, m in enumerate(ADAPTER_MODULES)}
    return sorted(ADAPTERS, key=lambda c: rank.get(c.__module__, len(rank)))


def register_adapters() -> list[str]:
    """Insert our adapters at the front of FastChat's list. Idempotent. FastChat asks them by content
    only once the patch launch.fastchat_patches.adapter_dispatch is applied (its apply() calls this)."""
    for mod in ADAPTER_MODULES:
        importlib.import_module(mod)
    from fastchat.model import model_adapter as ma

    present = {type(a) for a in ma.model_adapters}
    missing = [cls() for cls in _in_priority_order() if cls not in present]
    ma.model_adapters[0:0] = missing
    return [type(a).__name__ for a in our_adapters()]
