"""Request checks FastChat's `check_requests` lacks (it lets top_p = 0, n > 1, empty or role-less
messages and unknown roles through, and the last two then fail as 500s deep in prompt building)."""

from __future__ import annotations

from typing import Any

from launch.fastchat_patches.api_guard.errors import ApiError, bad_request

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image_url")


def _range(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> ApiError | None:
    if value is None:
        return None
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        return bad_request(f"{value} is not a valid value for '{name}': it must be in {left}{lo:g}, {hi:g}]", name)
    return None


def check_params(req: Any) -> ApiError | None:
    """Sampling parameters shared by chat and text completions."""
    for err in (
        _range(req.temperature, "temperature", 0, 2),
        _range(req.top_p, "top_p", 0, 1, lo_open=True),
        _range(getattr(req, "presence_penalty", None), "presence_penalty", -2, 2),
        _range(getattr(req, "frequency_penalty", None), "frequency_penalty", -2, 2),
    ):
        if err:
            return err
    if req.max_tokens is not None and req.max_tokens <= 0:
        return bad_request(f"{req.max_tokens} is less than the minimum of 1 - 'max_tokens'", "max_tokens")
    if req.n is not None and req.n != 1:
        # CPU serving: n answers cost n generations and would bypass the per-worker queue limit.
        return bad_request(f"n = {req.n} is not supported: this server returns exactly one choice (n = 1)", "n")
    top_k = getattr(req, "top_k", None)
    if top_k is not None and top_k != -1 and top_k < 1:
        return bad_request(f"{top_k} is not a valid value for 'top_k': use -1 (off) or >= 1", "top_k")
    return None


def check_messages(messages: Any) -> ApiError | None:
    if not isinstance(messages, list):
        return bad_request("'messages' must be an array of message objects", "messages", "invalid_type")
    if not messages:
        return bad_request("'messages' must contain at least one message", "messages", "empty_array")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return bad_request(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = msg.get("role")
        if role is None:
            return bad_request(f"{where} is missing 'role'", f"{where}.role", "missing_required_parameter")
        if role not in ROLES:
            return bad_request(f"{where}.role = {role!r} is not supported; use one of {', '.join(ROLES)}",
                               f"{where}.role", "invalid_value")
        if "content" not in msg:
            return bad_request(f"{where} is missing 'content'", f"{where}.content", "missing_required_parameter")
        content = msg["content"]
        if isinstance(content, list):
            if role != "user":
                return bad_request(f"{where}.content: only user messages may be a list of parts", f"{where}.content")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    return bad_request(f"{where}.content[{j}] must be a part of type 'text' or 'image_url'",
                                       f"{where}.content")
        elif not isinstance(content, str):
            return bad_request(f"{where}.content must be a string", f"{where}.content", "invalid_type")
    return None


def check_request(req: Any) -> ApiError | None:
    err = check_params(req)
    if err is None and hasattr(req, "messages"):
        err = check_messages(req.messages)
    if err is None and hasattr(req, "prompt") and req.prompt in ("", [], None):
        err = bad_request("'prompt' must not be empty", "prompt")
    return err


def describe_validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's RequestValidationError (wrong types, missing fields, a body that is not JSON)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("We could not parse the JSON body of your request: it is not valid JSON.",
                           None, "invalid_json")
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or ".".join(loc) or None
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return bad_request("Invalid request: " + "; ".join(parts), param, "invalid_type")
