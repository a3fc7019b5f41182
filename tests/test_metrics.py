"""Prometheus /metrics on the API server, and the structured access log in the run folder."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from launch.fastchat_patches.api_guard import metrics


def test_exposition_format_counters_and_cumulative_histograms():
    reg = metrics.Registry()
    c = reg.add(metrics.Counter("t_requests_total", "help"))
    h = reg.add(metrics.Histogram("t_latency_seconds", "help", buckets=(0.1, 1.0)))
    c.inc(model='a"b', code=200)
    c.inc(2, model='a"b', code=200)
    for v in (0.05, 0.5, 5.0):
        h.observe(v, model="m")
    text = reg.render()
    assert '# TYPE t_requests_total counter' in text
    assert 't_requests_total{code="200",model="a\\"b"} 3' in text
    assert 't_latency_seconds_bucket{model="m",le="0.1"} 1' in text
    assert 't_latency_seconds_bucket{model="m",le="1"} 2' in text
    assert 't_latency_seconds_bucket{model="m",le="+Inf"} 3' in text
    assert 't_latency_seconds_count{model="m"} 3' in text and 't_latency_seconds_sum{model="m"} 5.55' in text
    with pytest.raises(ValueError):
        c.inc(-1)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.stack
def test_metrics_count_requests_errors_tokens_and_latency(stack, stack_client):
    url = stack.api_url.removesuffix("/v1") + "/metrics"
    model = stack.cfg.models[0].name
    before = httpx.get(url, timeout=30).text
    client = stack_client
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, stream=True))
    assert chunks
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    d = lambda name, **kw: _metric(after, name, **kw) - _metric(before, name, **kw)  # noqa: E731
    assert d("cpu_arena_api_requests_total", path="/v1/chat/completions", model=model, code="200") == 1
    assert d("cpu_arena_api_errors_total", code="404") == 1
    assert d("cpu_arena_generated_tokens_total", model=model) >= 1
    assert d("cpu_arena_time_to_first_token_seconds_count", model=model) == 1
    assert d("cpu_arena_request_latency_seconds_count", model=model) == 1
    for m in stack.cfg.models:  # queue length per worker, as the workers report it
        assert re.search(rf'cpu_arena_worker_queue_length{{model="{re.escape(m.name)}",worker="http://[^"]+"}} \d', after)
    assert f"cpu_arena_worker_api_timeout_seconds {int(stack.cfg.server.worker_api_timeout)}" in after


@pytest.mark.stack
def test_structured_access_log_in_the_run_folder(stack):
    log = stack.run_dir / "logs" / "api-access.log"
    httpx.get(f"{stack.api_url}/models", timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["path"] == "/v1/models" and r["status"] == 200 for r in records)
    assert {"ts", "method", "path", "model", "status", "latency_s", "ttft_s", "completion_tokens"} <= set(records[-1])
    logs = stack.launch("logs", check=False).stdout
    assert "api-access.log" in logs and "controller.log" in logs  # `make logs` shows it with the others
