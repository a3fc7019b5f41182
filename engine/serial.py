"""One request at a time through a model's own FastChat generate function (no batching).

Some adapters generate in their own way: ChatGLM3 builds its input ids from the prompt with
`build_chat_input` and stops on its role tokens (worker_adapters/chatglm3.py), and stock FastChat
has its own functions for ChatGLM, Falcon, CodeT5+... The batching engine tokenizes the prompt
and drives a plain causal-LM forward, which would be wrong for them. The batching worker routes
such models here (engine/select.py): the same worker protocol and queue accounting,
the adapter's generate function run to completion one request after another, like FastChat's
stock worker does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from engine.batching import Chunk
from engine.host.cores import CoreLease
from engine.params import GenParams
from engine.protocol import STREAM_INTERVAL
from engine.thread import EngineThread

log = logging.getLogger("batching")


@dataclass
class SerialRequest:
    params: GenParams
    sink: Callable[[Chunk], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class SerialEngine(EngineThread):
    """Same interface as BatchEngine (submit/load/start/shutdown), max_batch 1."""

    max_batch = 1
    thread_name = "serial-engine"

    def __init__(self, model, tokenizer, generate: Callable, *, context_len: int = 2048,
                 lease: CoreLease | None = None, stream_interval: int = STREAM_INTERVAL):
        super().__init__()
        self.model, self.tokenizer, self.generate = model, tokenizer, generate
        self.stream_interval = stream_interval
        self.lease = lease
        self.context_len = context_len
        self.running = 0
        self.steps = 0  # chunks produced (diagnostics)

    def submit(self, params: GenParams, sink: Callable[[Chunk], None]) -> SerialRequest:
        req = SerialRequest(params, sink)
        self.incoming.put(req)
        return req

    def load(self) -> int:
        return self.running + self.incoming.qsize()

    def _loop(self) -> None:
        while True:
            if self.lease and self.incoming.empty():
                self.lease.release()  # idle: the other workers may use our cores
            if (req := self.incoming.get()) is None:
                break
            if req.cancelled:
                continue
            self.running = 1
            try:
                self._run(req)
            except Exception as e:  # reported to this request only; the worker keeps serving
                log.exception("generation failed")
                _deliver(req, Chunk("", 0, 0, None, f"{type(e).__name__}: {e}"))
            finally:
                self.running = 0

    def _run(self, req: SerialRequest) -> None:
        # Positional, as FastChat's own worker passes them (generate functions name the last one differently).
        gen = self.generate(self.model, self.tokenizer, req.params.to_fastchat(), "cpu", self.context_len,
                            self.stream_interval)
        last = None
        try:
            while True:
                if self.lease:  # the generator runs a forward pass on this thread at each next()
                    self.lease.claim()
                out = next(gen, None)
                if out is None:
                    break
                self.steps += 1
                last = _to_chunk(out)
                if req.cancelled:
                    return
                if last.finish_reason is None:
                    _deliver(req, last)
        finally:
            gen.close()
        if last is None:
            last = Chunk("", 0, 0, "stop")
        # FastChat's generate functions may end on a chunk without finish_reason; the stream needs one.
        _deliver(req, Chunk(last.text, last.prompt_tokens, last.completion_tokens, last.finish_reason or "stop"))


def _to_chunk(out: dict) -> Chunk:
    usage = out.get("usage") or {}
    return Chunk(out.get("text", ""), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                 out.get("finish_reason"))


def _deliver(req: SerialRequest, c: Chunk) -> None:
    try:
        req.sink(c)
    except Exception:  # a closed client must not stop the engine
        req.cancel()
