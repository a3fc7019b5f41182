"""All runtime patches to FastChat (fschat 0.2.36), in one place.

Each patch lives in its own module of this package, names the upstream issue it works around,
and has a test in tests/test_fastchat_patches*.py that fails without it. A patch module exposes
`apply()`; it must be idempotent because every FastChat process calls `apply_all()` once and
tests may call it again.

To add one: write `launch/fastchat_patches/<name>.py` with `UPSTREAM = "..."` and `apply()`,
then list it in PATCHES below (order matters only where noted).
"""

from __future__ import annotations

import importlib

PATCHES: tuple[str, ...] = (
    "streaming_json",
    # Our adapters are asked first, by checkpoint content (worker_adapters/).
    "adapter_dispatch",
    "ui_utf8_stream",
    "ui_offline_page",
    # The API server's guard; api_errors wraps get_worker_address before api_limits.
    "api_errors",
    "api_limits",
    "api_keys",
    "api_metrics",
    "api_stream_client",
    # The stock worker's side of api_errors' 500s: the exception, not FastChat's "NETWORK ERROR" line.
    "worker_errors",
    "controller_fast_removal",
)

_applied: set[str] = set()


def apply_all() -> list[str]:
    """Apply every patch once; returns the names applied in this process."""
    for name in PATCHES:
        if name in _applied:
            continue
        importlib.import_module(f"{__name__}.{name}").apply()
        _applied.add(name)
    return sorted(_applied)
