"""Each FastChat patch: the upstream bug is still there without it, and gone with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.fastchat_patches import PATCHES, apply_all

CHUNK = """
from fastchat.protocol.openai_api_protocol import (
    ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, DeltaMessage)
chunk = ChatCompletionStreamResponse(model="m", choices=[ChatCompletionResponseStreamChoice(
    index=0, delta=DeltaMessage(content="明明"), finish_reason=None)])
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_streaming_json_upstream_bug_exists_without_the_patch():
    # If this starts passing, fschat fixed #3140 and the patch can go.
    proc = _run(CHUNK + "chunk.json(exclude_unset=True, ensure_ascii=False)")
    assert proc.returncode != 0
    assert "ensure_ascii" in proc.stderr or "TypeError" in proc.stderr


@pytest.mark.slow
def test_streaming_json_patched_chunk_serialises_like_openai():
    proc = _run("from launch.fastchat_patches import apply_all; apply_all()\n" + CHUNK +
                "print(chunk.json(exclude_unset=True, ensure_ascii=False))")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "明明" in proc.stdout  # UTF-8, not \\u escapes
    assert data["object"] == "chat.completion.chunk" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["delta"] == {"content": "明明"}


def test_apply_all_is_idempotent_and_applies_every_listed_patch():
    first = apply_all()
    assert apply_all() == first
    assert set(first) == set(PATCHES)


def test_every_patch_names_its_upstream_issue():
    import importlib

    for name in PATCHES:
        mod = importlib.import_module(f"launch.fastchat_patches.{name}")
        assert mod.UPSTREAM.startswith("https://"), name
        assert mod.__doc__ and len(mod.__doc__) > 40, f"{name}: say why the patch exists"


STREAMS = r"""
import asyncio, json, sys
import httpx
from aiohttp import web

made = []
_init = httpx.AsyncClient.__init__
httpx.AsyncClient.__init__ = lambda self, *a, **k: (made.append(1), _init(self, *a, **k))[1]
if sys.argv[1] == "patched":
    from launch.fastchat_patches import api_stream_client
    api_stream_client.apply()
import fastchat.serve.openai_api_server as api


async def worker_stream(request):
    resp = web.StreamResponse()
    await resp.prepare(request)
    for i in range(3):
        await resp.write(json.dumps({"text": "x" * (i + 1), "error_code": 0}).encode() + b"\0")
    return resp


async def main():
    app = web.Application()
    app.router.add_post("/worker_generate_stream", worker_stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]

    async def one(addr):
        return [c["text"] async for c in api.generate_completion_stream({}, addr)]

    outs = await asyncio.gather(*[one(url) for _ in range(4)])
    try:  # a worker that is gone: the transport error still reaches api_errors' handler
        await one("http://127.0.0.1:1")
        err = None
    except httpx.TransportError as e:
        err = type(e).__name__
    await runner.cleanup()
    # FastChat's logger takes over stdout: the result goes to a file.
    open(sys.argv[2], "w").write(json.dumps({"outs": outs, "clients": len(made), "err": err}))


asyncio.run(main())
"""


def _streams(mode: str, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run([sys.executable, "-c", STREAMS, mode, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_stream_client_upstream_builds_a_client_per_request(tmp_path):
    stock = _streams("stock", tmp_path)
    assert stock["clients"] == 5  # 4 streams + the failed one, 30-60 ms of CPU each here


def test_stream_client_patched_streams_share_one_client_and_errors_still_surface(tmp_path):
    patched = _streams("patched", tmp_path)
    assert patched["clients"] == 1
    assert patched["outs"] == [["x", "xx", "xxx"]] * 4
    assert patched["err"] == "ConnectError"
