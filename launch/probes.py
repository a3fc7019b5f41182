"""Small HTTP checks against the running services (stdlib only: used by the supervisor and CLI)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, *, data: bytes | None = None, headers: dict | None = None, timeout: float = 3.0):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    return _NO_PROXY.open(req, timeout=timeout)


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with _request(url, timeout=timeout) as r:
            return 200 <= r.status < 400
    except urllib.error.HTTPError as e:
        # A POST-only endpoint answering 405 to GET is alive.
        return e.code == 405
    except (OSError, ValueError):
        return False


def controller_models(controller_url: str) -> set[str]:
    """Model names currently registered with the controller (empty if unreachable)."""
    try:
        with _request(f"{controller_url}/list_models", data=b"", timeout=3.0) as r:
            return set(json.loads(r.read()).get("models", []))
    except (OSError, ValueError):
        return set()


def api_models(api_url: str, api_keys: tuple[str, ...] = ()) -> set[str] | None:
    headers = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else {}
    try:
        with _request(f"{api_url}/models", headers=headers, timeout=3.0) as r:
            return {m["id"] for m in json.loads(r.read()).get("data", [])}
    except (OSError, ValueError, KeyError):
        return None
