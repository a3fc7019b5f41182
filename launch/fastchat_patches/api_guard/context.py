"""One object per API request, set by an ASGI middleware and read by the patched FastChat code.

It carries what the request holds (a slot on a worker, for the per-worker queue limit) and what
it measured (model, first token, tokens), so that the middleware can release the slot and record
metrics and one access-log line when the response has been fully sent, streamed or not.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.fastchat_patches.api_guard import metrics

_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("cpu_arena_request", default=None)


class Slots:
    """Requests in flight through this API server, per worker address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inflight: dict[str, int] = {}
        self.models: dict[str, str] = {}

    def try_acquire(self, worker: str, model: str, limit: int) -> bool:
        with self._lock:
            n = self.inflight.get(worker, 0)
            if n >= limit:
                return False
            self.inflight[worker] = n + 1
            self.models[worker] = model
            return True

    def release(self, worker: str) -> None:
        with self._lock:
            self.inflight[worker] = max(0, self.inflight.get(worker, 0) - 1)

    def snapshot(self) -> list[tuple[dict, float]]:
        with self._lock:
            return [({"worker": w, "model": self.models.get(w, "")}, float(n)) for w, n in self.inflight.items()]


SLOTS = Slots()
metrics.REGISTRY.add(metrics.Gauge("cpu_arena_worker_inflight_requests",
                                   "requests this API server has in flight (running or queued) per worker",
                                   collect=SLOTS.snapshot))


@dataclass
class RequestContext:
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    model: str | None = None
    worker: str | None = None  # holds a slot on this worker until the response is sent
    status: int | None = None
    first_token: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    stream_error: str | None = None


def current() -> RequestContext | None:
    return _current.get()


def _access_log_path() -> Path | None:
    run_dir = os.environ.get("CPU_ARENA_RUN_DIR")
    return Path(run_dir) / "logs" / "api-access.log" if run_dir else None


def finish(ctx: RequestContext) -> None:
    """Release the slot, record metrics and the access-log line. Called once per request."""
    from launch.jsonl_log import append_record

    if ctx.worker:
        SLOTS.release(ctx.worker)
    elapsed = time.monotonic() - ctx.start
    model = ctx.model or ""
    status = ctx.status or 500
    if ctx.path.startswith("/v1/") or ctx.path.startswith("/api/"):
        metrics.REQUESTS.inc(path=ctx.path, model=model, code=status)
        if status >= 400:
            metrics.ERRORS.inc(code=status)
        elif ctx.stream_error:
            metrics.ERRORS.inc(code="stream_error")
        if model and status < 400:
            metrics.LATENCY.observe(elapsed, model=model)
            if ctx.first_token is not None:
                metrics.TTFT.observe(ctx.first_token - ctx.start, model=model)
            metrics.TOKENS.inc(ctx.completion_tokens, model=model)
            metrics.PROMPT_TOKENS.inc(ctx.prompt_tokens, model=model)
        log = _access_log_path()
        if log is not None:
            try:
                append_record(log, {
                    "ts": round(time.time(), 3), "method": ctx.method, "path": ctx.path, "model": ctx.model,
                    "status": status, "latency_s": round(elapsed, 4), "worker": ctx.worker,
                    "ttft_s": None if ctx.first_token is None else round(ctx.first_token - ctx.start, 4),
                    "completion_tokens": ctx.completion_tokens, "stream_error": ctx.stream_error,
                }, fsync=False)  # an access log need not survive power loss; requests must not wait on disk
            except OSError:
                pass


class RequestContextMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): runs in the request's task, so the endpoint sees the
    same context, and `await app(...)` returns only after a streamed body has been fully sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(method=scope.get("method", ""), path=scope.get("path", ""))
        token = _current.set(ctx)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _current.reset(token)
            finish(ctx)


def install(app) -> None:
    """Idempotent: several patches need the context; the middleware goes in once."""
    if not any(m.cls is RequestContextMiddleware for m in app.user_middleware):
        app.add_middleware(RequestContextMiddleware)
