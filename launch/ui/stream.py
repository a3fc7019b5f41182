"""One answer streamed from a model worker, with its timing (TTFT, tokens/s) and the record FastChat logs.

Each side of a battle streams in its own thread, so a slow model never delays the other's chunks
(FastChat's round-robin reads would inflate the faster model's TTFT) and a Stop/vote can end both at once.
The conversation keeps only real text; the cursor and the per-answer line are added when rendering.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field

import requests
from fastchat.constants import WORKER_API_TIMEOUT, ErrorCode
from fastchat.serve.gradio_web_server import State

from launch.fastchat_patches.ui_utf8_stream import hold_back_partial
from launch.ui import logs, models


@dataclass
class AnswerStats:
    model: str
    dtype: str
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    stopped: bool = False
    done: bool = False

    def line(self, label: str | None = None) -> str:
        """The small line shown under an answer; `label` hides the model (anonymous battle)."""
        who = label if label is not None else f"{self.model} · {self.dtype}"
        parts = [who]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if self.stopped:
            parts.append("stopped")
        elif not self.done:
            parts.append("generating…")
        return " · ".join(parts)


@dataclass
class Session:
    """What one chat side needs across turns: FastChat's State plus our per-answer stats and stop flag."""

    state: State
    stats: list[AnswerStats] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # Shown instead of the model name under each answer until the battle vote reveals it.
    label: str | None = None

    @property
    def model(self) -> str:
        return self.state.model_name

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def new_session(model: str) -> Session:
    return Session(State(model))


def add_question(s: Session, text: str) -> None:
    conv = s.state.conv
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)


def _worker_address(model: str) -> str:
    ret = requests.post(models.controller_url() + "/get_worker_address", json={"model": model}, timeout=10)
    return ret.json().get("address", "")


def _run(s: Session, gen: dict, request_meta: dict) -> None:
    conv = s.state.conv
    stats = s.stats[-1]
    start = time.time()
    first = None
    text = ""
    try:
        addr = _worker_address(s.model)
        if not addr:
            text = f"(no worker is serving {s.model} right now)"
            stats.finish_reason = "error"
            return
        params = {
            "model": s.model, "prompt": conv.get_prompt(), "temperature": gen["temperature"],
            "repetition_penalty": 1.0, "top_p": gen["top_p"], "max_new_tokens": gen["max_new_tokens"],
            "stop": conv.stop_str, "stop_token_ids": conv.stop_token_ids, "echo": False,
        }
        with requests.post(addr + "/worker_generate_stream", json=params, stream=True,
                           timeout=WORKER_API_TIMEOUT) as resp:
            for chunk in resp.iter_lines(decode_unicode=False, delimiter=b"\0"):
                if not chunk:
                    continue
                data = json.loads(chunk.decode("utf-8"))
                now = time.time()
                if first is None:
                    first = now
                    stats.ttft_s = now - start
                if data.get("error_code", 0) != 0:
                    text = f"{data.get('text', '')}\n\n(error_code: {data['error_code']})"
                    stats.finish_reason = "error"
                    break
                # The worker sends the full text so far; a trailing half character waits for the next chunk.
                text = hold_back_partial(data["text"].strip())
                usage = data.get("usage") or {}
                stats.completion_tokens = int(usage.get("completion_tokens", stats.completion_tokens))
                if now > first and stats.completion_tokens:
                    stats.tokens_per_s = stats.completion_tokens / (now - first)
                stats.finish_reason = data.get("finish_reason") or stats.finish_reason
                conv.update_last_message(text)
                if s.stop.is_set():
                    # Closing the response makes the worker's stream stop generating (client disconnect).
                    stats.stopped = True
                    break
    except requests.RequestException as e:
        text = f"{text}\n\n(error_code: {ErrorCode.GRADIO_REQUEST_ERROR}, {e})"
        stats.finish_reason = "error"
    finally:
        conv.update_last_message(text)
        stats.done = True
        finish = time.time()
        logs.append_record({
            "tstamp": round(finish, 4), "type": "chat", "model": s.model,
            "gen_params": dict(gen), "start": round(start, 4), "finish": round(finish, 4),
            "state": s.state.dict(), **request_meta, "answer_stats": asdict(stats),
        })


def start_answer(s: Session, gen: dict, request_meta: dict) -> None:
    """Start streaming the answer to the last question in a thread (the caller polls `busy()`)."""
    s.stop.clear()
    s.stats.append(AnswerStats(model=s.model, dtype=models.dtype_of(s.model)))
    s.thread = threading.Thread(target=_run, args=(s, gen, request_meta), daemon=True, name=f"answer-{s.model}")
    s.thread.start()


def stop_answers(sessions: list[Session | None], wait_s: float = 5.0) -> None:
    """Ask every running answer to stop and wait (bounded) until its text and log record are final."""
    live = [s for s in sessions if s is not None]
    for s in live:
        s.stop.set()
    deadline = time.time() + wait_s
    for s in live:
        if s.thread is not None:
            s.thread.join(max(0.0, deadline - time.time()))
        if s.stats and not s.stats[-1].done:
            s.stats[-1].stopped = True
