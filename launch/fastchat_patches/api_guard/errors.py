"""OpenAI's error schema and the HTTP status of every error the API server returns.

Clients (the `openai` package among them) pick the exception class from the status and read
`{"error": {"message", "type", "param", "code"}}`; FastChat answers 400 for everything, in its
own shape. This module is the one table from FastChat's ErrorCode to status, type and code.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

RETRY_AFTER_S = 2  # busy worker or one restarting: both clear within seconds on this stack


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def not_found(model: str, available: list[str]) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist. Available models: {', '.join(sorted(available)) or 'none'}.",
                    "invalid_request_error", "model_not_found", "model")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", "model_unavailable", retry_after=RETRY_AFTER_S)


def queue_full(model: str, limit: int) -> ApiError:
    return ApiError(429, f"The worker serving `{model}` already has {limit} requests in flight "
                         f"(max_queue = {limit}); retry later.",
                    "rate_limit_error", "queue_full", retry_after=RETRY_AFTER_S)


# fastchat.constants.ErrorCode values (ints, so this module imports nothing from FastChat).
_FASTCHAT: dict[int, tuple[int, str, str]] = {
    40001: (400, "invalid_request_error", "invalid_value"),       # VALIDATION_TYPE_ERROR
    40101: (401, "invalid_request_error", "invalid_api_key"),     # INVALID_AUTH_KEY
    40102: (401, "invalid_request_error", "invalid_api_key"),     # INCORRECT_AUTH_KEY
    40103: (403, "invalid_request_error", "permission_denied"),   # NO_PERMISSION
    40301: (404, "invalid_request_error", "model_not_found"),     # INVALID_MODEL
    40302: (400, "invalid_request_error", "invalid_value"),       # PARAM_OUT_OF_RANGE
    40303: (400, "invalid_request_error", "context_length_exceeded"),  # CONTEXT_OVERFLOW
    42901: (429, "rate_limit_error", "rate_limit_exceeded"),
    42902: (429, "rate_limit_error", "insufficient_quota"),
    42903: (429, "rate_limit_error", "engine_overloaded"),
    50001: (500, "server_error", "internal_error"),               # INTERNAL_ERROR: the worker's exception
    50005: (503, "service_unavailable", "model_unavailable"),     # CONTROLLER_NO_WORKER
    50006: (503, "service_unavailable", "model_unavailable"),     # CONTROLLER_WORKER_TIMEOUT
}


def from_fastchat(code: int, message: str) -> ApiError:
    status, type_, name = _FASTCHAT.get(int(code), (500, "server_error", "internal_error"))
    message = _without_ui_line(message or "")
    if not message and status == 500:
        message = f"the model worker failed (FastChat error code {code}) without saying why; see the worker's log"
    return ApiError(status, message or "internal error", type_, name,
                    retry_after=RETRY_AFTER_S if status in (429, 503) else None)


def _without_ui_line(text: str) -> str:
    """A worker's error text without FastChat's line for web UI users.

    FastChat's workers answer a failed generation `f"{SERVER_ERROR_MSG}\n\n({exception message})"`, and
    SERVER_ERROR_MSG is "NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.",
    which is neither true nor useful to an API client. Our workers no longer send it
    (launch/fastchat_patches/worker_errors.py); a worker on another host without the patch still may.
    """
    from fastchat.constants import SERVER_ERROR_MSG

    if SERVER_ERROR_MSG not in text:
        return text
    rest = text.replace(SERVER_ERROR_MSG, "").strip()
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1].strip()
    return f"the model worker failed while generating: {rest}" if rest else ""


def stream_event(err: ApiError, fastchat_code: int = 50006) -> dict:
    """A stream chunk that FastChat's generators forward as-is and the openai client raises on.

    FastChat ends a stream on `error_code != 0` and json-dumps the chunk; the `error` key is what
    OpenAI clients look for in an event to raise APIError instead of reading a malformed chunk.
    """
    return {"text": err.message, "error_code": fastchat_code, **err.body()}
