"""Prometheus GET /metrics on the API server (FastChat has none).

Requests by path, model and status; errors by code; prompt and generated tokens; request latency
and time-to-first-token histograms; requests in flight per worker (this server's count) and the
queue length each worker last reported to the controller. Guarded by the API key when one is
configured. Text exposition written by launch/fastchat_patches/api_guard/metrics.py (prometheus_client is not pinned).
"""

from __future__ import annotations

import asyncio
from types import ModuleType

from launch.fastchat_patches.api_guard import context, metrics
from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/openai_api_server.py"
MODULE = "fastchat.serve.openai_api_server"

WORKER_QUEUE = metrics.REGISTRY.add(metrics.Gauge(
    "cpu_arena_worker_queue_length", "queue length each worker last reported to the controller (heartbeat)"))
WORKERS = metrics.REGISTRY.add(metrics.Gauge("cpu_arena_workers_registered", "workers registered, by model"))
TIMEOUT = metrics.REGISTRY.add(metrics.Gauge(
    "cpu_arena_worker_api_timeout_seconds", "the worker call timeout this API server actually uses"))


def _patch(mod: ModuleType) -> None:
    if getattr(mod, "_cpu_arena_api_metrics", False):
        return
    mod._cpu_arena_api_metrics = True
    from fastapi import Depends
    from fastapi.responses import PlainTextResponse

    from launch.fastchat_patches.api_guard.controller_client import list_workers

    context.install(mod.app)
    TIMEOUT.set(float(mod.WORKER_API_TIMEOUT))

    async def show_metrics():
        workers = await asyncio.get_running_loop().run_in_executor(
            None, list_workers, mod.app_settings.controller_address)
        per_model: dict[str, int] = {}
        WORKER_QUEUE.clear()  # workers come and go: report the current set only
        for w in workers:
            for m in w.get("model_names", []):
                per_model[m] = per_model.get(m, 0) + 1
                WORKER_QUEUE.set(w.get("queue_length", 0), worker=w["name"], model=m)
        WORKERS.clear()
        for m, n in per_model.items():
            WORKERS.set(n, model=m)
        return PlainTextResponse(metrics.REGISTRY.render(), media_type=metrics.CONTENT_TYPE)

    mod.app.add_api_route("/metrics", show_metrics, methods=["GET"],
                          dependencies=[Depends(mod.check_api_key)], include_in_schema=False)


def apply() -> None:
    when_imported(MODULE, _patch)
