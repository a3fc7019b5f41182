"""Calls to the controller endpoints added by launch/fastchat_patches/controller_fast_removal.py."""

from __future__ import annotations

import json
import urllib.request

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, payload: dict, timeout: float) -> dict | None:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except (OSError, ValueError):
        return None


def remove_worker(controller_url: str, worker_url: str, timeout: float = 2.0) -> bool:
    """Tell the controller to stop routing to a worker now (it re-registers on its next heartbeat)."""
    ret = _post(f"{controller_url}/remove_worker", {"worker_name": worker_url}, timeout)
    return bool(ret and ret.get("removed"))


def list_workers(controller_url: str, timeout: float = 2.0) -> list[dict]:
    ret = _post(f"{controller_url}/list_workers", {}, timeout)
    return list(ret.get("workers", [])) if isinstance(ret, dict) else []
