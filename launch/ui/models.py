"""Which models the UI offers, and their dtype: the controller's live list, limited to the config's models."""

from __future__ import annotations

import requests

from engine.host.hardware import resolve_dtype
from launch.config import current_config

_controller_url = "http://127.0.0.1:21001"


def set_controller_url(url: str) -> None:
    global _controller_url
    _controller_url = url.rstrip("/")


def controller_url() -> str:
    return _controller_url


def configured_dtypes() -> dict[str, str]:
    """name -> dtype actually passed to the worker (the launcher sets CPU_ARENA_CONFIG for every service)."""
    cfg = current_config(optional=True)
    if cfg is None:
        return {}
    return {m.name: resolve_dtype(m.dtype) for m in cfg.models}


def dtype_of(model: str) -> str:
    return configured_dtypes().get(model, "?")


def served_models() -> list[str]:
    """Models that have a live worker now; with a config, only the configured ones (no stray workers)."""
    try:
        requests.post(_controller_url + "/refresh_all_workers", timeout=10)
        names = requests.post(_controller_url + "/list_language_models", timeout=10).json()["models"]
    except (requests.RequestException, ValueError, KeyError):
        return []
    allowed = configured_dtypes()
    if allowed:
        names = [n for n in names if n in allowed]
        order = list(allowed)
        return sorted(set(names), key=order.index)
    return sorted(set(names))
