"""Faults on a small stack of our own (two smollm2 workers under two names; we kill things):
a worker killed mid-stream, the controller restarted, a full queue, worker timeouts from config."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from launch.fastchat_patches.api_guard.controller_client import list_workers
from launch.state import read_state
from tests.stackutil import default_models, free_ports_config, stack_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
KEY = "sk-faults-0d1e"
MSG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def fstack(tmp_path_factory):
    base = default_models(["smollm2-135m"])[0]
    models = [dict(base, name="smollm2-a", max_queue=4), dict(base, name="smollm2-b", max_queue=2)]
    st = stack_for(free_ports_config(tmp_path_factory.mktemp("faults"), models=models,
                                     heartbeat_interval=2, heartbeat_expiration=10,
                                     restart_backoff_initial=3, worker_api_timeout=1234))
    try:
        st.up(api_keys=KEY)
        yield st
    finally:
        st.down()


def _http(st) -> httpx.Client:
    return httpx.Client(base_url=st.api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _oai(st) -> openai.OpenAI:
    return openai.OpenAI(base_url=st.api_url, api_key=KEY, timeout=60, max_retries=0)


def _registered(st) -> set[str]:
    return {m for w in list_workers(st.cfg.controller_url()) for m in w["model_names"]}


def _wait(cond, timeout: float, step: float = 0.1) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def _pid(st, service: str) -> int:
    return read_state(st.run_dir).services[service].pid


def _start_stream(st, model: str, max_tokens: int = 400) -> tuple[httpx.Client, object, list[str]]:
    """Open a raw streaming chat request and return once the first text arrived."""
    client = _http(st)
    cm = client.stream("POST", "/chat/completions", json={
        "model": model, "messages": MSG, "max_tokens": max_tokens, "stream": True, "temperature": 0})
    resp = cm.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    seen = []
    for line in lines:
        seen.append(line)
        if '"content"' in line:
            break
    return client, (cm, lines), seen


def test_worker_timeout_comes_from_the_config(fstack):
    m = _http(fstack).get(fstack.api_url.removesuffix("/v1") + "/metrics").text
    assert "cpu_arena_worker_api_timeout_seconds 1234" in m  # FastChat's default is 100 s
    env = open(f"/proc/{_pid(fstack, 'worker:smollm2-a')}/environ", "rb").read().split(b"\0")
    assert b"FASTCHAT_WORKER_API_TIMEOUT=1234" in env


def test_full_queue_answers_429_with_retry_after(fstack):
    # smollm2-b has max_queue = 2: hold two streams open, the third request is refused at once.
    held = [_start_stream(fstack, "smollm2-b", max_tokens=64) for _ in range(2)]
    try:
        t0 = time.monotonic()
        r = _http(fstack).post("/chat/completions", json={"model": "smollm2-b", "messages": MSG, "max_tokens": 8})
        assert time.monotonic() - t0 < 5
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            _oai(fstack).chat.completions.create(model="smollm2-b", messages=MSG, max_tokens=8)
        # Another model's queue is independent.
        ok = _oai(fstack).chat.completions.create(model="smollm2-a", messages=MSG, max_tokens=4)
        assert ok.choices[0].message.content is not None
    finally:
        for client, (cm, _), _ in held:
            cm.__exit__(None, None, None)
            client.close()
    # Slots are released when the streams end: the model serves again.
    assert _wait(lambda: _http(fstack).post("/chat/completions", json={
        "model": "smollm2-b", "messages": MSG, "max_tokens": 4}).status_code == 200, 60, 1.0) is not None


def test_worker_killed_mid_stream(fstack, record_property):
    st = fstack
    pid = _pid(st, "worker:smollm2-a")
    restarts_before = read_state(st.run_dir).services["worker:smollm2-a"].restarts

    # 1. The openai client, streaming, raises within 5 s of the kill (it does not hang).
    stream = _oai(st).chat.completions.create(model="smollm2-a", messages=MSG, max_tokens=400,
                                               temperature=0, stream=True)
    it = iter(stream)
    while not (next(it).choices[0].delta.content or ""):
        pass
    # 2. A raw HTTP stream on the same worker ends with an OpenAI error event.
    client, (cm, lines), _ = _start_stream(st, "smollm2-a")

    t_kill = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as exc:
        for _ in it:
            pass
    t_openai = time.monotonic() - t_kill
    assert "failed mid-answer" in str(exc.value) or "unreachable" in str(exc.value)
    events = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    t_raw = time.monotonic() - t_kill
    cm.__exit__(None, None, None)
    client.close()
    assert "error" in events[-1] and events[-1]["error"]["type"] == "service_unavailable", events[-1]
    assert t_openai < 5 and t_raw < 5

    # 3. The controller stops routing to it at once (FastChat alone: up to 90 s).
    t_gone = _wait(lambda: "smollm2-a" not in _registered(st), 5)
    assert t_gone is not None

    # 4. The other model keeps serving.
    other = _oai(st).chat.completions.create(model="smollm2-b", messages=MSG, max_tokens=4)
    assert other.choices[0].message.content is not None

    # 5. Meanwhile the dead model answers 503 + Retry-After (not 500, not a hang).
    r = _http(st).post("/chat/completions", json={"model": "smollm2-a", "messages": MSG, "max_tokens": 4})
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") and r.json()["error"]["code"] == "model_unavailable"
    with pytest.raises(openai.InternalServerError) as exc503:
        _oai(st).chat.completions.create(model="smollm2-a", messages=MSG, max_tokens=4)
    assert exc503.value.status_code == 503

    # 6. The supervisor restarts it with backoff; it re-registers and serves again.
    t_back = _wait(lambda: "smollm2-a" in _registered(st), 120, 0.25)
    assert t_back is not None
    t_rereg = time.monotonic() - t_kill
    again = _oai(st).chat.completions.create(model="smollm2-a", messages=MSG, max_tokens=4)
    assert again.choices[0].message.content is not None
    state = read_state(st.run_dir).services["worker:smollm2-a"]
    assert state.restarts == restarts_before + 1 and state.pid != pid
    status = st.launch("status", check=False).stdout
    row = next(line for line in status.splitlines() if line.startswith("worker:smollm2-a"))
    assert row.split()[5] == str(restarts_before + 1), status  # the restarts column
    record_property("kill_to_openai_error_s", round(t_openai, 3))
    record_property("kill_to_raw_error_event_s", round(t_raw, 3))
    record_property("kill_to_reregistered_s", round(t_rereg, 1))
    print(f"\nkill->openai error {t_openai:.2f} s, kill->raw error event {t_raw:.2f} s, "
          f"kill->unrouted {t_gone:.2f} s (after the error), kill->re-registered {t_rereg:.1f} s")


def test_controller_restart_workers_reregister_by_themselves(fstack, record_property):
    st = fstack
    pid = _pid(st, "controller")
    t0 = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    # The supervisor restarts the controller; the workers re-register on their next heartbeat
    # (2 s here, 5 s by default; FastChat's own default is 45 s).
    t = _wait(lambda: _registered(st) == {"smollm2-a", "smollm2-b"} and read_state(
        st.run_dir).services["controller"].pid != pid, 60, 0.25)
    assert t is not None, read_state(st.run_dir)
    r = _oai(st).chat.completions.create(model="smollm2-b", messages=MSG, max_tokens=4)
    assert r.choices[0].message.content is not None
    record_property("controller_kill_to_all_registered_s", round(time.monotonic() - t0, 1))
    print(f"\ncontroller kill -> both workers registered again: {time.monotonic() - t0:.1f} s")


def test_requests_during_controller_outage_get_503_not_500(fstack):
    st = fstack
    pid = _pid(st, "controller")
    # Stop it without the supervisor noticing a crash yet: a paused controller refuses nothing,
    # so kill it and race the restart (backoff >= 3 s here).
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.5)
    r = _http(st).post("/chat/completions", json={"model": "smollm2-a", "messages": MSG, "max_tokens": 4})
    assert r.status_code == 503, r.text
    assert "controller" in r.json()["error"]["message"]
    assert _wait(lambda: _registered(st) == {"smollm2-a", "smollm2-b"}, 60, 0.25) is not None


def test_concurrent_streams_are_not_cut_by_a_kill_of_another_worker(fstack):
    # A stream on smollm2-b completes normally while smollm2-a is killed.
    out: dict = {}

    def run():
        r = _oai(fstack).chat.completions.create(model="smollm2-b", messages=MSG, max_tokens=24, stream=True)
        out["text"] = "".join((c.choices[0].delta.content or "") for c in r if c.choices)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    os.killpg(_pid(fstack, "worker:smollm2-a"), signal.SIGKILL)
    t.join(60)
    assert out.get("text")
    assert _wait(lambda: "smollm2-a" in _registered(fstack), 120, 0.25) is not None
