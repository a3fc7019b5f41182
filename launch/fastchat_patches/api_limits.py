"""Bounded queues: 429 with Retry-After when a worker already has max_queue requests in flight.

FastChat's API server forwards every request; the worker parks the excess on an asyncio
semaphore with no bound, so a burst of users queues forever-growing work on a CPU that serves a
few tokens per second. This patch counts, per worker address, the requests this API server has
in flight (from routing to the last byte sent, streams included) and refuses the one beyond the
model's `max_queue` (deploy/models.toml) with 429 and Retry-After, before any work is queued.
"""

from __future__ import annotations

from types import ModuleType

from launch.config import ModelConfig
from launch.fastchat_patches.api_guard import context, errors, metrics
from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/base_model_worker.py#L178-L190"
MODULE = "fastchat.serve.openai_api_server"
# A model registered by a remote worker but absent from this config gets the config default.
DEFAULT_MAX_QUEUE = ModelConfig.model_fields["max_queue"].default


def _patch(mod: ModuleType) -> None:
    if getattr(mod, "_cpu_arena_api_limits", False):
        return
    mod._cpu_arena_api_limits = True
    from launch.fastchat_patches.api_errors import configured_models

    context.install(mod.app)
    limits = configured_models()
    routed = mod.get_worker_address

    async def get_worker_address(model_name: str) -> str:
        addr = await routed(model_name)
        ctx = context.current()
        if ctx is None or ctx.worker is not None:  # not an API request, or its slot is already held
            return addr
        limit = limits.get(model_name, DEFAULT_MAX_QUEUE)
        if not context.SLOTS.try_acquire(addr, model_name, limit):
            metrics.REJECTED.inc(model=model_name)
            raise errors.queue_full(model_name, limit)
        ctx.worker = addr  # released by the middleware once the response is fully sent
        return addr

    mod.get_worker_address = get_worker_address


def apply() -> None:
    when_imported(MODULE, _patch)
