"""A worker whose generation raises: the API client gets a 500 server_error naming the exception (never
FastChat's "NETWORK ERROR DUE TO HIGH TRAFFIC" line), streamed or not, and the worker logs the traceback.

Both worker kinds run in this process on a tiny fixture checkpoint: the batching worker's app and FastChat's
stock worker app, each served by uvicorn on a thread with a two-route stand-in controller in front, and
FastChat's API server (with every patch) called through a TestClient, raw and with the `openai` client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import torch

from engine.batching import Chunk
from engine.params import GenParams
from engine.serial import SerialEngine
from launch.fastchat_patches import adapter_dispatch as hooks
from launch.fastchat_patches import apply_all
from tests.fixtures.checkpoints import serve_from, write_arena_config

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


def _boom(*args, **kwargs):
    raise ValueError("boom")


@contextmanager
def _serving(make_app):
    """uvicorn on a thread, on a free port; make_app(url) builds the app knowing its own address."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(make_app(url), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _behind_controller(worker_app):
    """The worker's routes plus the two controller routes the API server asks, at one address."""
    from fastapi import FastAPI

    def make(url: str):
        app = FastAPI()
        app.add_api_route("/list_models", lambda: {"models": [MODEL]}, methods=["POST"])
        app.add_api_route("/get_worker_address", lambda: {"address": url}, methods=["POST"])
        app.mount("/", worker_app)
        return app

    return make


@pytest.fixture(scope="module")
def mp():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.fixture(scope="module")
def patched(chat_template_model, tmp_path_factory, mp):
    """Every FastChat patch applied, and our adapters serving the fixture checkpoint."""
    cfg = write_arena_config(tmp_path_factory.mktemp("arena") / "arena.toml",
                             [{"name": MODEL, "path": str(chat_template_model), "dtype": "float32"}])
    mp.delenv("CPU_ARENA_API_KEYS", raising=False)
    apply_all()
    serve_from(mp, cfg)
    yield
    hooks.clear_caches()


@pytest.fixture(scope="module")
def batching_worker(chat_template_model, patched, mp):
    """The project's batching worker, its model raising ValueError("boom") at its first forward pass."""
    from fastchat.serve import base_model_worker

    from engine import worker as bw

    # create_worker sets these module globals (and FastChat's, for the first worker of a process).
    for mod, name in ((bw, "worker"), (bw, "BatchingWorker"), (base_model_worker, "worker")):
        mp.setattr(mod, name, getattr(mod, name))
    _, w = bw.create_worker(["--model-path", str(chat_template_model), "--model-names", MODEL, "--dtype", "float32",
                             "--no-register", "--no-prepack", "--prefix-cache-mb", "0", "--max-batch", "2"])
    mp.setattr(w.model, "forward", _boom)
    try:
        yield w
    finally:
        w.engine.shutdown()


@pytest.fixture(scope="module")
def stock_worker(chat_template_model, patched, mp):
    """FastChat's own ModelWorker (`worker = "fastchat"`) whose generate function raises."""
    from fastchat.serve import base_model_worker
    from fastchat.serve.model_worker import ModelWorker

    mp.setattr(base_model_worker, "worker", None)  # the endpoints serve the module's worker: this one
    w = ModelWorker("http://127.0.0.1:1", "http://127.0.0.1:1", "test", str(chat_template_model), [MODEL], 2,
                    no_register=True, device="cpu", num_gpus=1, max_gpu_memory=None, dtype=torch.float32)
    assert base_model_worker.worker is w
    return w


@pytest.fixture(scope="module")
def api(patched):
    import fastchat.serve.openai_api_server as mod
    from fastapi.testclient import TestClient

    with TestClient(mod.app, raise_server_exceptions=False) as client:
        yield mod, client


@contextmanager
def _api_for(api, worker_app, mp):
    mod, client = api
    with _serving(_behind_controller(worker_app)) as url:
        mp.setattr(mod.app_settings, "controller_address", url)
        yield client, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client,
                                    max_retries=0)


def _assert_names_the_exception(message: str, cls: str = "ValueError", text: str = "boom") -> None:
    assert cls in message and text in message, message
    assert "NETWORK ERROR" not in message, message


def _assert_500_server_error(r) -> dict:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error", err
    _assert_names_the_exception(err["message"])
    return err


def _tracebacks(caplog, text: str = "boom") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and text in str(r.exc_info[1])]


# ---- the batching worker (the default) ----------------------------------------------------------------

def test_batching_worker_error_is_a_500_naming_the_exception(api, batching_worker, mp, caplog):
    from engine import worker as bw

    with _api_for(api, bw.app, mp) as (client, oai):
        _assert_500_server_error(client.post("/v1/chat/completions", json=CHAT))
        with pytest.raises(openai.InternalServerError) as exc:
            oai.chat.completions.create(**CHAT)
        assert exc.value.status_code == 500
        _assert_names_the_exception(exc.value.message)
    # The worker's log has the traceback (the engine thread logs it where it caught it).
    assert any(r.name == "batching" for r in _tracebacks(caplog))


def test_batching_worker_error_ends_a_stream_with_an_error_event(api, batching_worker, mp, caplog):
    from engine import worker as bw

    with _api_for(api, bw.app, mp) as (_, oai):
        with pytest.raises(openai.APIError) as exc:
            for _ in oai.chat.completions.create(**CHAT, stream=True):
                pass
    _assert_names_the_exception(exc.value.message)
    assert exc.value.body["type"] == "server_error"
    assert _tracebacks(caplog)


def test_batching_worker_answers_a_request_refused_before_generation_with_an_error_chunk(batching_worker, caplog):
    # Without "prompt" GenParams raises; before, it did so inside a stream whose headers were sent.
    import json

    from fastapi.testclient import TestClient

    from engine import worker as bw

    with TestClient(bw.app) as client:
        r = client.post("/worker_generate_stream", json={"temperature": 0})
        chunks = [json.loads(c) for c in r.content.split(b"\0") if c]
        r2 = client.post("/worker_generate", json={"temperature": 0})
    assert r.status_code == 200 and len(chunks) == 1 and r2.status_code == 200
    for chunk in (chunks[0], r2.json()):
        assert chunk["error_code"] == 50001
        _assert_names_the_exception(chunk["text"], "KeyError", "prompt")
    assert _tracebacks(caplog, "prompt")


def test_serial_engine_error_names_the_exception_and_logs_the_traceback(caplog):
    from engine.worker import _chunk_json

    def generate(*args):
        raise ValueError("boom")
        yield  # a generator, as FastChat's generate functions are

    engine = SerialEngine(None, None, generate).start()
    done, got = threading.Event(), []
    try:
        engine.submit(GenParams.from_fastchat({"prompt": "hi"}, None), lambda c: (got.append(c), done.set()))
        assert done.wait(30)
    finally:
        engine.shutdown()
    assert got[-1].error == "ValueError: boom"
    out = _chunk_json(got[-1])
    assert out["error_code"] == 50001
    _assert_names_the_exception(out["text"])
    assert _tracebacks(caplog)


def test_an_error_chunk_never_carries_fastchats_ui_line():
    from engine.worker import _chunk_json

    out = _chunk_json(Chunk("partial", 3, 1, None, "RuntimeError: out of memory"))
    assert out["error_code"] == 50001 and "RuntimeError: out of memory" in out["text"]
    assert "NETWORK ERROR" not in out["text"]


# ---- FastChat's stock worker (worker = "fastchat") ----------------------------------------------------

@pytest.mark.parametrize("exc_cls", [ValueError, KeyError])  # upstream catches the first only
def test_stock_worker_error_is_a_500_naming_the_exception(api, stock_worker, mp, caplog, exc_cls):
    from fastchat.serve import base_model_worker

    def generate(*args):
        raise exc_cls("boom")
        yield

    mp.setattr(stock_worker, "generate_stream_func", generate)
    name = exc_cls.__name__
    with _api_for(api, base_model_worker.app, mp) as (client, oai):
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        _assert_names_the_exception(r.json()["error"]["message"], name)
        with pytest.raises(openai.APIError) as exc:
            for _ in oai.chat.completions.create(**CHAT, stream=True):
                pass
        _assert_names_the_exception(exc.value.message, name)
        assert exc.value.body["type"] == "server_error"
    assert any(r.name == "model_worker" for r in _tracebacks(caplog))
    # Every request gave its concurrency slot back (upstream leaked it on an uncaught exception).
    assert stock_worker.semaphore._value == stock_worker.limit_worker_concurrency


# ---- the API server alone: a worker without our patch (another host) ---------------------------------

def test_api_drops_fastchats_ui_line_from_an_unpatched_workers_error(patched):
    from fastchat.constants import SERVER_ERROR_MSG

    from launch.fastchat_patches.api_guard import errors

    err = errors.from_fastchat(50001, f"{SERVER_ERROR_MSG}\n\n(boom)")
    assert err.status == 500 and err.type == "server_error"
    assert "boom" in err.message and "NETWORK ERROR" not in err.message
    assert "NETWORK ERROR" not in errors.from_fastchat(50001, SERVER_ERROR_MSG).message
