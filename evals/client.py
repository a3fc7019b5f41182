"""One streamed chat completion over an OpenAI-compatible API, timed, as an `Answer`.

FastChat 0.2.36's API server does not send `usage` in streamed responses (it ignores
`stream_options`), so when usage is missing the output tokens are counted by the serving
worker's own tokenizer through FastChat's `/api/v1/token_check`; on other servers, without
that endpoint, the count is recorded as null (tokens_source=None) rather than guessed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import httpx
import openai

from evals.schema import Answer

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def make_client(base_url: str, api_key: str | None, timeout: float) -> openai.OpenAI:
    host = urlparse(base_url).hostname or ""
    # A local stack must not go through an HTTP proxy from the environment (offline machines often set one).
    http_client = httpx.Client(trust_env=host not in LOOPBACK, timeout=timeout)
    return openai.OpenAI(
        base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0, http_client=http_client
    )


def list_models(client: openai.OpenAI) -> list[str]:
    return sorted(m.id for m in client.models.list())


class TokenCounter:
    """Counts tokens of a text with the serving worker's tokenizer (FastChat's token_check).

    The worker's count includes special tokens its tokenizer adds (a BOS, say); the count of
    the empty string is subtracted so only the text's own tokens remain.
    """

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 30.0):
        root = base_url.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.url = f"{root}/api/v1/token_check"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._empty: dict[str, int] = {}
        self._unsupported = False
        self._lock = threading.Lock()
        host = urlparse(base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def _count(self, model: str, text: str) -> int | None:
        body = json.dumps({"prompts": [{"model": model, "prompt": text, "max_tokens": 0}]}).encode()
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return int(json.loads(r.read())["prompts"][0]["tokenCount"])
        except urllib.error.HTTPError as e:
            if e.code in (404, 405):
                self._unsupported = True  # not FastChat: do not ask again
            return None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def count(self, model: str, text: str) -> int | None:
        if self._unsupported:
            return None
        with self._lock:
            empty = self._empty.get(model)
        if empty is None:
            empty = self._count(model, "")
            if empty is None:
                return None
            with self._lock:
                self._empty[model] = empty
        n = self._count(model, text)
        return None if n is None else max(0, n - empty)


def stream_answer(
    client: openai.OpenAI,
    model: str,
    question_id: str,
    question: str,
    *,
    repeat: int = 0,
    temperature: float = 0.0,
    max_tokens: int = 256,
    system: str | None = None,
    counter: TokenCounter | None = None,
) -> Answer:
    """Ask one question; never raises for server/model errors: they end up in `Answer.error`."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ans = Answer(model=model, question_id=question_id, repeat=repeat, started_at=time.time())
    parts: list[str] = []
    usage_tokens: int | None = None
    t0 = time.perf_counter()
    try:
        # Close the stream explicitly (also on `break`): an abandoned stream is closed later by the
        # garbage collector, which can run while httpcore holds its pool lock in another request of
        # this thread and deadlock on it (seen in CI: the run hung in PoolByteStream.close).
        with client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            for chunk in stream:
                extra = chunk.model_extra or {}
                if extra.get("error_code"):
                    # FastChat reports a worker error as a chunk {"text": ..., "error_code": N}, not as HTTP.
                    ans.error = f"server error_code {extra['error_code']}: {extra.get('text', '')}".strip()
                    break
                if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta = choice.delta.content if choice.delta else None
                    if delta:
                        if ans.ttft_s is None:
                            ans.ttft_s = time.perf_counter() - t0
                        parts.append(delta)
                    if choice.finish_reason:
                        ans.finish_reason = choice.finish_reason
    except Exception as e:  # noqa: BLE001 - any failure is a recorded result, the run goes on
        ans.error = f"{type(e).__name__}: {e}"
    ans.total_s = time.perf_counter() - t0
    ans.text = "".join(parts)
    if ans.error is None and ans.finish_reason is None:
        # OpenAI-compatible servers (FastChat included) always end a complete answer with a
        # finish_reason; a stream that closes without one was cut (a worker died mid-answer).
        # The partial text is kept, but it is not a finished answer.
        ans.error = f"stream ended without a finish_reason after {len(ans.text)} characters"
    if usage_tokens is not None:
        ans.output_tokens, ans.tokens_source = usage_tokens, "usage"
    elif ans.text and counter is not None and ans.error is None:
        n = counter.count(model, ans.text)
        if n is not None:
            ans.output_tokens, ans.tokens_source = n, "tokenizer"
    elif ans.error is None and not ans.text:
        ans.output_tokens, ans.tokens_source = 0, "empty"
    if ans.output_tokens and ans.output_tokens > 1 and ans.ttft_s is not None and ans.total_s > ans.ttft_s:
        # Decode speed: tokens after the first over the time after the first.
        ans.tokens_per_s = (ans.output_tokens - 1) / (ans.total_s - ans.ttft_s)
    return ans
