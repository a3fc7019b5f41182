"""One httpx client for the API server's worker streams, instead of one per request.

fschat 0.2.36's `generate_completion_stream` opens `httpx.AsyncClient()` for every streamed
answer. Building that client loads the CA bundle into a new SSL context: 30-60 ms of CPU on this
machine, on the API server's one event loop, so requests sent together leave for the worker one
after another (4 simultaneous requests reached the worker over ~210 ms) and miss each other's
batched prefill. Upstream: lm-sys/FastChat#2256 ("requests processed nearly sequentially"); its
fix (#2273) moved the other calls to aiohttp and left this one on httpx.

Inside that module only, `httpx.AsyncClient()` hands out one shared client per event loop, which
`async with` does not close. It keeps no idle connections (a new localhost TCP connection costs
far less than the client did), so it can never reuse a connection a restarted worker has closed.
"""

from __future__ import annotations

import asyncio
import weakref
from types import ModuleType

from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/issues/2256"
MODULE = "fastchat.serve.openai_api_server"


class _Borrowed:
    """`async with` over a shared client: enter gives it, exit leaves it open."""

    def __init__(self, client) -> None:
        self.client = client

    async def __aenter__(self):
        return self.client

    async def __aexit__(self, *exc) -> bool:
        return False


class SharedClientHttpx:
    """Stands in for the `httpx` module inside the API server module."""

    def __init__(self, httpx: ModuleType) -> None:
        self._httpx = httpx
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.created = 0

    def __getattr__(self, name: str):
        return getattr(self._httpx, name)

    def AsyncClient(self, *args, **kwargs):  # noqa: N802 - the name FastChat calls
        if args or kwargs:  # not the call this patch is for: the real thing
            return self._httpx.AsyncClient(*args, **kwargs)
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._httpx.AsyncClient(limits=self._httpx.Limits(max_keepalive_connections=0))
            self._clients[loop] = client
            self.created += 1
        return _Borrowed(client)


def _patch(mod: ModuleType) -> None:
    if isinstance(mod.httpx, SharedClientHttpx):
        return
    mod.httpx = SharedClientHttpx(mod.httpx)


def apply() -> None:
    when_imported(MODULE, _patch)
