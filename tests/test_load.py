"""50 concurrent streaming requests across two workers: all complete, none is mixed with another,
no deadlock. Bounded: 50 requests, 8 tokens each, one overall deadline."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.stackutil import default_models, free_ports_config, stack_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_REQUESTS = 50
DEADLINE_S = 420


@pytest.fixture(scope="module")
def lstack(tmp_path_factory):
    base = default_models(["smollm2-135m"])[0]
    # Two workers (the same small checkpoint under two names), each allowed the whole half of the burst.
    models = [dict(base, name=f"smollm2-{x}", max_queue=N_REQUESTS // 2) for x in ("a", "b")]
    st = stack_for(free_ports_config(tmp_path_factory.mktemp("load"), models=models))
    try:
        st.up()
        yield st
    finally:
        st.down()


async def _one(client: httpx.AsyncClient, i: int, model: str) -> dict:
    # echo=True: the worker streams the prompt back first, so each stream proves whose it is.
    prompt = f"Request {i:02d} tag Z{i * 7919 % 10007:05d}: the weather today is"
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True, "echo": True}
    text, ids, errors = "", set(), []
    async with client.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            return {"i": i, "status": r.status_code, "body": (await r.aread()).decode()}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            ids.add(event["id"])
            text += event["choices"][0]["text"]
    return {"i": i, "status": 200, "prompt": prompt, "text": text, "ids": ids, "errors": errors}


async def _burst(api_url: str) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=api_url, timeout=DEADLINE_S, limits=limits) as client:
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(
            _one(client, i, "smollm2-a" if i % 2 else "smollm2-b") for i in range(N_REQUESTS))), DEADLINE_S)
        return results, time.monotonic() - t0


def test_fifty_concurrent_streams_all_complete_unmixed(lstack, record_property):
    results, elapsed = asyncio.run(_burst(lstack.api_url))
    completed = [r for r in results if r["status"] == 200 and not r["errors"]]
    print(f"\nload: sent {N_REQUESTS}, completed {len(completed)} in {elapsed:.1f} s")
    record_property("load_sent", N_REQUESTS)
    record_property("load_completed", len(completed))
    record_property("load_seconds", round(elapsed, 1))
    assert len(completed) == N_REQUESTS, [r for r in results if r not in completed][:3]
    for r in completed:
        assert r["text"].startswith(r["prompt"]), (r["prompt"], r["text"])  # its own prompt, nobody else's
        assert len(r["text"]) > len(r["prompt"])  # and something generated after it
        assert len(r["ids"]) == 1  # one stream, one id
    all_ids = [next(iter(r["ids"])) for r in completed]
    assert len(set(all_ids)) == N_REQUESTS
    # Nothing left in flight: every slot was released.
    metrics = httpx.get(lstack.api_url.removesuffix("/v1") + "/metrics", timeout=30).text
    inflight = [line for line in metrics.splitlines() if line.startswith("cpu_arena_worker_inflight_requests{")]
    assert inflight and all(line.endswith(" 0") for line in inflight), inflight
