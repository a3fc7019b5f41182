"""A FastChat-compatible model worker that batches concurrent requests (continuous batching).

    python -m launch.fastchat_entry engine.worker <fastchat.serve.model_worker's options and its own>

It speaks FastChat's worker protocol unchanged (register + heartbeat with the controller,
/worker_generate_stream, /worker_generate, /worker_get_status, /count_token,
/worker_get_conv_template, /model_details), so FastChat's API server and UI use it as they use
the stock worker. Differences that matter: requests arriving while others decode join the
running batch (engine/batching.py), output text is built incrementally and streamed at the
first token, then every `--stream-interval` tokens as FastChat's worker does (default 2; chunks the HTTP
side has not sent yet are merged: the text is cumulative), and the
model, conversation template and generate function come from FastChat's adapters (`load_model`,
`get_conversation_template`, `get_generate_stream_function`), which honour the project's
worker_adapters. A model whose adapter brings its own generate function (ChatGLM3) is served
one request at a time through that function (engine/select.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import kernels
from engine.batching import Chunk
from engine.host.cores import CoreLease
from engine.host.hugepages import collapse_model, release_checkpoint_files
from engine.kernels import paths
from engine.kernels.linear import batch_rows_limit, linear_backend
from engine.kernels.path_choice import paths_for
from engine.params import GenParams
from engine.prefix_cache import PrefixCache
from engine.prefix_cache import usable as prefix_cache_usable
from engine.protocol import (
    MAX_BATCH,
    MAX_QUEUE,
    PATHS,
    PREFIX_CACHE_MB,
    PREPACK_WEIGHTS,
    STREAM_INTERVAL,
    error_chunk,
    exception_text,
)
from engine.select import build_engine, plan_for
from engine.thread import off_main_thread

app = FastAPI()
worker: BatchingWorker | None = None
log = logging.getLogger("batching")


def _chunk_json(c: Chunk) -> dict:
    if c.error:  # the exception's class and message, as the patched stock worker answers (not FastChat's UI line)
        return error_chunk(c.error)
    out = {
        "text": c.text,
        "error_code": 0,
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
        "finish_reason": c.finish_reason,
    }
    return out


def _base_worker_class():
    from fastchat.serve.base_model_worker import BaseModelWorker

    class BatchingWorker(BaseModelWorker):
        def __init__(self, args: argparse.Namespace, worker_id: str):
            super().__init__(
                args.controller_address, args.worker_address, worker_id, args.model_path,
                args.model_names, args.limit_worker_concurrency, conv_template=args.conv_template,
            )
            from fastchat.model.model_adapter import load_model
            from fastchat.utils import get_context_length, str_to_torch_dtype

            def load():
                model, tokenizer = load_model(
                    args.model_path, device="cpu", num_gpus=1, dtype=str_to_torch_dtype(args.dtype),
                )
                model.eval()
                if args.prepack:
                    chosen = paths_for(args.paths, model, say=lambda line: print(f"batching worker: {line}", flush=True))
                    print(f"batching worker: {kernels.install(model, chosen)} linear layers on "
                          f"{linear_backend(model.dtype)}", flush=True)
                    huge, why = collapse_model(model)
                    print(f"batching worker: {huge / 1e9:.2f} GB of weights on 2 MB pages"
                          f"{f' ({why})' if why else ''}", flush=True)
                release_checkpoint_files(model)
                return model, tokenizer

            # Not on the main thread: its OpenMP pool would outlive the loading (engine/thread.py).
            self.model, self.tokenizer = off_main_thread(load)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.context_len = get_context_length(self.model.config)
            self.max_queue = args.limit_worker_concurrency
            self.plan = plan_for(self.model, args.model_path)
            print(f"batching worker: {self.plan.describe()}", flush=True)
            lease = core_lease(args)
            if lease:
                print(f"batching worker: sharing {lease.cores} cores with the stack's other workers "
                      f"(slot {lease.slot})", flush=True)
            max_batch = args.max_batch
            limit, why = batch_rows_limit(self.model.dtype)
            if limit is not None and max_batch > limit:
                print(f"batching worker: max_batch {max_batch} -> {limit}: {why}", flush=True)
                max_batch = limit
            self.engine = build_engine(self.plan, self.model, self.tokenizer, max_batch=max_batch,
                                       context_len=self.context_len, lease=lease,
                                       stream_interval=args.stream_interval,
                                       prefix_cache=self._prefix_cache(args.prefix_cache_mb)).start()
            if hasattr(self.engine, "decode_path"):
                print(f"batching worker: decode steps on {self.engine.decode_path}", flush=True)
            if not args.no_register:
                self.init_heart_beat()

        def _prefix_cache(self, mb: int) -> PrefixCache | None:
            if self.plan.kind != "batching" or mb == 0:
                return None
            why = prefix_cache_usable(self.model)
            if why:
                print(f"batching worker: no prefix cache: {why}", flush=True)
                return None
            print(f"batching worker: prefix cache of {mb} MB (finished requests' keys and values)", flush=True)
            return PrefixCache(mb * 2**20)

        def get_queue_length(self) -> int:
            # Like FastChat's worker: requests running + waiting. The controller routes on it.
            return self.engine.load()

        def params(self, raw: dict) -> GenParams:
            return GenParams.from_fastchat(raw, self.tokenizer.eos_token_id, self.plan.stop_ids)

    return BatchingWorker


BatchingWorker = None  # set by create_worker (the class needs fastchat imported)


class _Mailbox:
    """Chunks from the engine thread to the event loop, with one loop wake-up per batch of chunks.

    Why: a decode step produces a chunk for every row at once. Waking the loop once per chunk
    (call_soon_threadsafe each) makes the loop thread run, and take a core and the GIL, once per
    row per step, in the middle of the engine's multithreaded step; one wake-up for all of them
    costs far less.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, Chunk]] = []
        self._lock = threading.Lock()

    def post(self, q: asyncio.Queue, c: Chunk) -> None:  # engine thread
        with self._lock:
            self._pending.append((q, c))
            if len(self._pending) > 1:
                return  # a wake-up is already on its way
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._pending = self._pending, []
        for q, c in items:
            q.put_nowait(c)


_mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}


def _mailbox() -> _Mailbox:
    loop = asyncio.get_running_loop()
    if loop not in _mailboxes:
        _mailboxes[loop] = _Mailbox(loop)
    return _mailboxes[loop]


async def _stream(raw: dict):
    """Yield Chunk objects for one request; cancels the request if the client goes away."""
    box = _mailbox()
    q: asyncio.Queue[Chunk] = asyncio.Queue()
    try:
        req = worker.engine.submit(worker.params(raw), lambda c: box.post(q, c))
    except Exception as e:
        # Parameters or a prompt the tokenizer refuses: an error chunk like an engine error. Raised here it
        # would cut a stream whose headers are sent, and the API server would take the worker for dead.
        log.exception("request refused before generation")
        yield Chunk("", 0, 0, None, exception_text(e))
        return
    try:
        while True:
            c = latest(await q.get(), q)
            yield c
            if c.finish_reason is not None or c.error:
                return
    finally:
        req.cancel()


def latest(c: Chunk, q: asyncio.Queue) -> Chunk:
    """The newest chunk already queued: each carries the whole text so far, so when the HTTP side
    falls behind the decode loop the older ones are redundant and sending them only costs time."""
    while not q.empty() and c.finish_reason is None and not c.error:
        c = q.get_nowait()
    return c


def _overloaded(stream: bool) -> Response | None:
    """429 once max_queue requests are running or waiting (`--limit-worker-concurrency`, the
    config's max_queue, the same bound the API guard applies per worker), for callers that come
    straight to the worker (the UI). A stream answer is NUL-terminated like every stream chunk,
    so FastChat's API server and UI relay its error_code instead of dropping it."""
    from fastchat.constants import ErrorCode

    if worker.engine.load() < worker.max_queue:
        return None
    body = {"text": f"worker overloaded ({worker.max_queue} requests queued), retry later",
            "error_code": int(ErrorCode.ENGINE_OVERLOADED)}
    if stream:
        return Response(json.dumps(body).encode() + b"\0", status_code=429, headers={"Retry-After": "5"})
    return JSONResponse(body, status_code=429, headers={"Retry-After": "5"})


@app.post("/worker_generate_stream")
async def api_generate_stream(request: Request):
    raw = await request.json()
    if (busy := _overloaded(stream=True)) is not None:
        return busy
    worker.call_ct += 1

    async def body():
        async for c in _stream(raw):
            yield json.dumps(_chunk_json(c)).encode() + b"\0"

    return StreamingResponse(body())


@app.post("/worker_generate")
async def api_generate(request: Request):
    raw = await request.json()
    if (busy := _overloaded(stream=False)) is not None:
        return busy
    worker.call_ct += 1
    last = None
    async for c in _stream(raw):
        last = c
    return JSONResponse(_chunk_json(last))


@app.post("/worker_get_status")
async def api_get_status(request: Request):
    return worker.get_status()


@app.post("/count_token")
async def api_count_token(request: Request):
    return worker.count_token(await request.json())


@app.post("/worker_get_conv_template")
async def api_get_conv(request: Request):
    return worker.get_conv_template()


@app.post("/model_details")
async def api_model_details(request: Request):
    return {"context_length": worker.context_len}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's settings, all from the command line: launch/services.py worker_spec turns the config's
    model entry into these options, and the defaults here are the config's (engine/protocol.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", default="http://localhost:21002")
    p.add_argument("--controller-address", default="http://localhost:21001")
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-names", type=lambda s: s.split(","), default=None)
    p.add_argument("--conv-template", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--limit-worker-concurrency", type=_positive, default=MAX_QUEUE,
                   help="requests running or waiting before the worker answers 429 (the config's max_queue)")
    p.add_argument("--stream-interval", type=_positive, default=STREAM_INTERVAL,
                   help="send a request's text every N tokens (and at its first and last); FastChat's worker "
                        "option and default")
    p.add_argument("--max-batch", type=_positive, default=MAX_BATCH, help="rows decoded together")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=PREPACK_WEIGHTS,
                   help="put the model on the kernels: linear layers on the project's C kernels or oneDNN packed "
                        "weights, and where the C kernels serve them, attention and fused ops (engine/kernels/)")
    p.add_argument("--paths", type=_paths, default=PATHS,
                   help="which implementation runs decode steps, prompt passes and attention (engine/kernels/paths.py): "
                        "'measure' (time them here at start, cached), 'kernels', or "
                        "'decode=kernel,prompt_torch_from=N,attention_torch_from=N'")
    p.add_argument("--prefix-cache-mb", type=_non_negative, default=PREFIX_CACHE_MB,
                   help="MB of finished requests' keys and values kept for prompts that begin like them, 0 = off")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads (default: torch's own, from OMP_NUM_THREADS or every core); with "
                        "--core-lease, the cores shared with the other workers")
    p.add_argument("--core-lease", default=None,
                   help="file through which the workers of one stack share the cores step by step "
                        "(engine/host/cores.py)")
    p.add_argument("--core-slot", type=int, default=None, help="this worker's slot in --core-lease")
    p.add_argument("--no-register", action="store_true")
    # Accept (and ignore) the stock worker's other options so the command lines are interchangeable.
    args, _unknown = p.parse_known_args(argv)
    if (args.core_lease is None) != (args.core_slot is None):
        p.error("--core-lease and --core-slot go together")
    return args


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number, 1 or more")
    return n


def _paths(text: str) -> str:
    try:
        paths.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 (off) or more")
    return n


def core_lease(args: argparse.Namespace) -> CoreLease | None:
    """The lease the command line names, dividing --threads (else every core) between the busy workers."""
    if args.core_lease is None:
        return None
    return CoreLease(Path(args.core_lease), args.core_slot, args.threads or os.cpu_count() or 1)


def create_worker(argv: list[str] | None = None) -> tuple[argparse.Namespace, object]:
    global worker, BatchingWorker
    args = parse_args(argv)
    if args.threads:
        import torch

        # On the main thread: the loading thread and the engine's thread start from its count (engine/thread.py).
        torch.set_num_threads(args.threads)
    BatchingWorker = _base_worker_class()
    worker = BatchingWorker(args, str(uuid.uuid4())[:8])
    return args, worker


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args, _ = create_worker(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
