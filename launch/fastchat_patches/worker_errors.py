"""A worker's failed generation reaches the client as the exception it was, with a traceback in its log.

fschat 0.2.36's ModelWorker.generate_stream_gate catches only ValueError and RuntimeError, logs
nothing, and answers `SERVER_ERROR_MSG + "\\n\\n(<message>)"`: the API client reads "NETWORK ERROR
DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE." and the message without its class.
Any other exception escapes the generator: a stream breaks off mid-answer (the API server then
takes the worker for dead and has the controller drop it), /worker_generate answers a bare 500,
and in both cases the worker's concurrency semaphore is never released.

This patch replaces generate_stream_gate (generate_gate drains it, so both endpoints are covered):
every exception is logged with its traceback and answered with one chunk
`{"text": worker_error_text(...), "error_code": INTERNAL_ERROR}` (engine/protocol.py). The project's batching worker
(engine/worker.py) answers its engines' errors with the same text, and the API server
maps INTERNAL_ERROR to a 500 server_error carrying it (launch/fastchat_patches/api_guard/errors.py).
"""

from __future__ import annotations

import json
from types import ModuleType

# The error chunk is part of the worker protocol the batching worker speaks too: it lives in engine/protocol.py,
# which the engine imports without importing launch.
from engine.protocol import error_chunk, exception_text
from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/model_worker.py#L104-L144"
MODULE = "fastchat.serve.model_worker"


def _patch(mod: ModuleType) -> None:
    cls = mod.ModelWorker
    if getattr(cls, "_cpu_arena_worker_errors", False):
        return
    cls._cpu_arena_worker_errors = True

    # Upstream's body without its NPU device switch (workers here run on CPU) and with one handler
    # for every exception.
    def generate_stream_gate(self, params):
        self.call_ct += 1
        try:
            if self.seed is not None:
                mod.set_seed(self.seed)
            for output in self.generate_stream_func(self.model, self.tokenizer, params, self.device,
                                                    self.context_len, self.stream_interval):
                ret = {"text": output["text"], "error_code": 0}
                for key in ("usage", "finish_reason", "logprobs"):
                    if key in output:
                        ret[key] = output[key]
                yield json.dumps(ret).encode() + b"\0"
        except Exception as e:  # reported to this request only; the worker keeps serving
            mod.logger.exception("generation failed")
            yield json.dumps(error_chunk(exception_text(e))).encode() + b"\0"

    cls.generate_stream_gate = generate_stream_gate


def apply() -> None:
    when_imported(MODULE, _patch)
