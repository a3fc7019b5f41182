"""Stop routing to a dead worker at once, and let callers see the worker table.

FastChat's controller forgets a worker only when its heartbeat is 90 s old (or on a blocking
/refresh_all_workers that re-polls every worker); until then it keeps handing out the dead
address and every request to that model fails. This patch adds to the controller:
- POST /remove_worker {"worker_name": url}: forget one worker now. The supervisor calls it when a
  worker process exits; the API server calls it when a worker is unreachable. A worker that is in
  fact alive re-registers on its next heartbeat (server.heartbeat_interval seconds).
- POST /list_workers: name, models, queue length and heartbeat age of each worker (for /metrics,
  `make status` and tests).
"""

from __future__ import annotations

import time
from types import ModuleType

from fastapi import Request  # at module level: FastAPI resolves the string annotation here

from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/controller.py#L56-L59"
MODULE = "fastchat.serve.controller"


def _patch(mod: ModuleType) -> None:
    if getattr(mod, "_cpu_arena_fast_removal", False):
        return
    mod._cpu_arena_fast_removal = True

    async def remove_worker(request: Request):
        data = await request.json()
        name = data.get("worker_name", "")
        removed = name in mod.controller.worker_info
        if removed:
            mod.controller.remove_worker(name)
            mod.logger.info(f"Removed worker on request: {name}")
        return {"removed": removed}

    async def list_workers():
        now = time.time()
        return {"workers": [
            {"name": name, "model_names": list(info.model_names), "queue_length": info.queue_length,
             "speed": info.speed, "heartbeat_age_s": round(now - float(info.last_heart_beat), 3)}
            for name, info in list(mod.controller.worker_info.items())
        ]}

    mod.app.add_api_route("/remove_worker", remove_worker, methods=["POST"])
    mod.app.add_api_route("/list_workers", list_workers, methods=["POST"])


def apply() -> None:
    when_imported(MODULE, _patch)
