"""Custom FastChat model adapters for local checkpoints on CPU.

`register_adapters()` is the named registration point: every FastChat process calls it (through
launch.fastchat_entry) so the worker, the API server and the UI all agree on templates.
"""

from __future__ import annotations

_registered = False


def register_adapters() -> None:
    global _registered
    if _registered:
        return
    _registered = True
