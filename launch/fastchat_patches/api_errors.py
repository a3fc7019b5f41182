"""OpenAI-style errors with the right HTTP status from FastChat's API server.

fschat 0.2.36's openai_api_server answers every error with status 400 in its own shape
({"object": "error", "message", "code": 40301}); lets top_p = 0, n > 1, empty messages and unknown
roles through (the last two become 500s while building the prompt); answers 500 when a model has
no live worker or a worker is unreachable; and a worker that dies mid-stream ends the stream with
a chunk the openai client cannot recognise as an error. This patch, on the imported module:
- replaces create_error_response (code -> status table in launch/fastchat_patches/api_guard/errors.py),
  check_requests (launch/fastchat_patches/api_guard/validate.py) and check_model (404 unknown, 503 configured but
  not registered);
- turns controller/worker connection failures into 503 (and tells the controller to drop a worker
  it cannot reach), and a broken worker stream into an `{"error": ...}` event;
- answers a worker's failed generation (error_code INTERNAL_ERROR) with a 500 server_error that
  carries the worker's text ("<ExceptionClass>: <message>", launch/fastchat_patches/worker_errors.py),
  streamed or not, instead of FastChat's "NETWORK ERROR DUE TO HIGH TRAFFIC" line;
- renders validation errors, HTTPException (401 from check_api_key) and any other exception in
  OpenAI's shape, never a bare 500 page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import ModuleType

from launch.fastchat_patches.api_guard import context, errors, validate
from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/openai_api_server.py#L121-L150"
MODULE = "fastchat.serve.openai_api_server"
log = logging.getLogger("cpu_arena.api")


def configured_models() -> dict[str, int]:
    """Model name -> max_queue from the project's config (the API process gets CPU_ARENA_CONFIG)."""
    from launch.config import current_config

    cfg = current_config(optional=True)
    return {m.name: m.max_queue for m in cfg.models} if cfg else {}


def _drop_worker_later(mod: ModuleType, worker_url: str) -> None:
    from launch.fastchat_patches.api_guard.controller_client import remove_worker

    controller = mod.app_settings.controller_address
    if worker_url and not worker_url.startswith(controller):
        log.warning("worker %s unreachable: asking the controller to stop routing to it", worker_url)
        asyncio.get_running_loop().run_in_executor(None, remove_worker, controller, worker_url)


def _patch(mod: ModuleType) -> None:
    if getattr(mod, "_cpu_arena_api_errors", False):
        return
    mod._cpu_arena_api_errors = True
    import aiohttp
    import httpx
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = mod.app
    context.install(app)
    known = configured_models()

    def create_error_response(code: int, message: str):
        return errors.from_fastchat(code, message).response()

    def check_requests(request):
        err = validate.check_request(request)
        return err.response() if err else None

    orig_fetch = mod.fetch_remote

    async def fetch_remote(url, pload=None, name=None):
        try:
            res = await orig_fetch(url, pload, name)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            base = url.rsplit("/", 1)[0]
            _drop_worker_later(mod, base)
            if name == "":  # a worker generation: the endpoint turns error_code into the response
                return {"text": f"worker {base} is unreachable ({type(e).__name__}); retry shortly",
                        "error_code": 50006}
            what = "controller" if base == mod.app_settings.controller_address else f"worker {base}"
            raise errors.unavailable(f"the {what} is unreachable ({type(e).__name__}); retry shortly") from e
        if name == "" and isinstance(res, str):  # fastchat returns a JSON string on a non-200 answer
            res = json.loads(res)
        return res

    async def check_model(request):
        models = await mod.fetch_remote(mod.app_settings.controller_address + "/list_models", None, "models")
        ctx = context.current()
        if ctx is not None:
            ctx.model = request.model
        if request.model in models:
            return None
        if request.model in known:
            return errors.unavailable(f"model `{request.model}` has no live worker right now "
                                      "(starting or restarting); retry shortly").response()
        return errors.not_found(request.model, list(models)).response()

    orig_get_worker_address = mod.get_worker_address

    async def get_worker_address(model_name: str) -> str:
        try:
            return await orig_get_worker_address(model_name)
        except ValueError:  # "No available worker": the worker vanished after check_model
            raise errors.unavailable(f"model `{model_name}` has no live worker right now; retry shortly") from None

    orig_stream = mod.generate_completion_stream

    async def generate_completion_stream(payload, worker_addr):
        ctx = context.current()
        try:
            async for content in orig_stream(payload, worker_addr):
                if content.get("error_code", 0) != 0:
                    if ctx is not None:
                        ctx.stream_error = str(content.get("error_code"))
                    err = errors.from_fastchat(content["error_code"], content.get("text", ""))
                    yield errors.stream_event(err, content["error_code"])
                    return
                if ctx is not None:
                    if ctx.first_token is None and content.get("text"):
                        ctx.first_token = time.monotonic()
                    usage = content.get("usage") or {}
                    ctx.completion_tokens = usage.get("completion_tokens", ctx.completion_tokens)
                    ctx.prompt_tokens = usage.get("prompt_tokens", ctx.prompt_tokens)
                yield content
        except (httpx.TransportError, json.JSONDecodeError) as e:
            # The worker died or hung up mid-answer: end the stream with an error event at once.
            _drop_worker_later(mod, worker_addr)
            if ctx is not None:
                ctx.stream_error = type(e).__name__
            err = errors.unavailable(f"the worker serving this request failed mid-answer "
                                     f"({type(e).__name__}); retry")
            yield errors.stream_event(err)

    orig_generate = mod.generate_completion

    async def generate_completion(payload, worker_addr):
        content = await orig_generate(payload, worker_addr)
        ctx = context.current()
        if ctx is not None and isinstance(content, dict):
            usage = content.get("usage") or {}
            ctx.completion_tokens += usage.get("completion_tokens", 0)
            ctx.prompt_tokens += usage.get("prompt_tokens", 0)
        return content

    for name, fn in {
        "create_error_response": create_error_response, "check_requests": check_requests,
        "fetch_remote": fetch_remote, "check_model": check_model, "get_worker_address": get_worker_address,
        "generate_completion_stream": generate_completion_stream, "generate_completion": generate_completion,
    }.items():
        setattr(mod, name, fn)

    async def on_api_error(request, exc: errors.ApiError):
        return exc.response()

    async def on_validation_error(request, exc: RequestValidationError):
        return validate.describe_validation_error(list(exc.errors())).response()

    async def on_http_error(request, exc: StarletteHTTPException):
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:  # check_api_key's 401
            body = {"error": dict(detail["error"])}
            if exc.status_code == 401 and not body["error"].get("message"):
                body["error"]["message"] = ("Invalid or missing API key: send `Authorization: Bearer <key>` "
                                            "with a key from the server's configuration")
            return errors.ApiError(exc.status_code, body["error"]["message"], body["error"].get("type") or
                                   "invalid_request_error", body["error"].get("code")).response()
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return errors.ApiError(exc.status_code, str(detail), type_, str(exc.status_code)).response()

    async def on_unexpected(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return errors.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                               "internal_error").response()

    app.add_exception_handler(errors.ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def apply() -> None:
    when_imported(MODULE, _patch)
