"""The batching worker through the real stack (controller, FastChat's API server, the official
`openai` client): outputs, streaming, concurrency, stops, usage, queue accounting and limits.

On the shared stack: the default config, whose models are served by the batching worker."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine.kernels.native import has_bf16_units
from launch.state import read_state
from tests.stackutil import MARKERS, stream_text, worker_url

pytestmark = pytest.mark.stack

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a CPU does.",
]
SMOL = "smollm2-135m"
QWEN = "qwen2.5-coder-0.5b"


def chat(client, prompt: str, model: str = SMOL, max_tokens: int = 24, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=max_tokens, **kw)


def test_the_worker_is_the_batching_worker_with_the_chat_template(stack):
    for model, stop_ids in ((SMOL, {2}), (QWEN, {151645, 151643})):
        addr = worker_url(stack, model)
        conv = httpx.post(f"{addr}/worker_get_conv_template", json={}, timeout=10).json()["conv"]
        # The prompt is rendered by the tokenizer's template; its stop ids include generation_config's eos.
        assert conv["name"] == "chat_template"
        assert stop_ids <= set(conv["stop_token_ids"])
    workers = [s for s in read_state(stack.run_dir).services.values() if s.model]
    assert len(workers) == 2
    for w in workers:
        assert "engine.worker" in Path(f"/proc/{w.pid}/cmdline").read_bytes().decode().split("\0")
        # The engine the worker chose (engine/select.py), as logged at start.
        log = Path(w.log).read_text()
        assert "batching worker: continuous batching" in log
        # The paths each call kind runs on, chosen by measurement at start (engine/kernels/path_choice.py), or read
        # back from the cache of an earlier measurement on this machine: one line per call kind, with figures.
        for kind in ("decode", "prompt", "attention"):
            assert re.search(rf"batching worker: paths: {kind} on .*kernel .* ms, torch .* ms", log), kind
        assert re.search(r"batching worker: paths: measured (now|before on this machine)", log)
        # Both embedded models are transformers Llama/Qwen2 classes in bf16: their decode steps are one C call
        # where the CPU has AVX512_BF16 (engine/kernels/decode_step.py), else the model's forward, and the log says so.
        expected = "decoder layers in one C call (decode_step.c)" if has_bf16_units() else "the model's forward ("
        assert f"batching worker: decode steps on {expected}" in log


def test_non_streaming_and_streaming_agree_with_usage(stack_client):
    r = chat(stack_client, PROMPTS[0], max_tokens=32)
    text = r.choices[0].message.content
    assert text.strip() and "paris" in text.lower(), text
    assert not any(m in text for m in MARKERS)
    u = r.usage
    assert 0 < u.prompt_tokens < 80 and 0 < u.completion_tokens <= 32
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed, finish = stream_text(chat(stack_client, PROMPTS[0], max_tokens=32, stream=True))
    assert streamed == text
    assert finish == r.choices[0].finish_reason


def test_completions_endpoint_plain_prompt(stack_client):
    prompt = "The capital of France is"
    r = stack_client.completions.create(model=SMOL, prompt=prompt, temperature=0, max_tokens=12)
    text = r.choices[0].text
    assert text.strip() and not text.startswith(prompt)  # echo off
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    parts = [c.choices[0].text for c in stack_client.completions.create(
        model=SMOL, prompt=prompt, temperature=0, max_tokens=12, stream=True) if c.choices]
    assert "".join(parts) == text


def test_concurrent_different_prompts_equal_their_solo_outputs(stack_client):
    solo = [chat(stack_client, p).choices[0].message.content for p in PROMPTS]
    results: list = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream_text(chat(stack_client, PROMPTS[i], stream=True))[0]
        except Exception as e:  # surfaced by the assertion below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == solo
    assert not any(m in t for t in solo for m in MARKERS)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_honoured(stack_client, stream):
    full = chat(stack_client, PROMPTS[1], max_tokens=24).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    word = words[2]
    cut = full[: full.index(word)]
    if stream:
        text, finish = stream_text(chat(stack_client, PROMPTS[1], max_tokens=24, stop=[word], stream=True))
    else:
        r = chat(stack_client, PROMPTS[1], max_tokens=24, stop=[word])
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == cut and word not in text
    assert finish == "stop"


def _first_text(stream) -> str:
    """Read a stream up to its first generated text. FastChat's API server sends the role chunk
    before it calls the worker, so only text proves the worker has the request."""
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            return c.choices[0].delta.content
    raise AssertionError("the stream ended without text")


def _status(addr: str) -> int:
    return httpx.post(f"{addr}/worker_get_status", timeout=10).json()["queue_length"]


def test_queue_length_counts_running_and_waiting_and_the_limit_holds(stack, stack_client):
    """max_queue long answers fill the worker: max_batch of them decode, the rest wait, queue_length counts
    both, and one more is refused with 429 by the API guard and by the worker itself."""
    entry = stack.cfg.model(SMOL)
    assert entry.worker == "batching" and entry.max_batch < entry.max_queue  # some requests really wait
    addr = worker_url(stack, SMOL)
    assert _status(addr) == 0
    long_prompt = "Count from 1 to 500, separated by commas."
    streams = [chat(stack_client, long_prompt, max_tokens=400, stream=True)]
    try:
        _first_text(streams[0])  # decoding
        streams += [chat(stack_client, long_prompt, max_tokens=400, stream=True) for _ in range(entry.max_queue - 1)]
        # The API server calls the worker after its first chunk; the worker counts a request as it arrives.
        deadline = time.monotonic() + 60
        while _status(addr) < entry.max_queue and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(addr) == entry.max_queue
        # One more through the API: refused by the API guard with 429, not queued.
        with pytest.raises(openai.RateLimitError):
            chat(stack_client, "hi", max_tokens=4)
        # One more straight to the worker (as the UI does): refused too, NUL-terminated for FastChat's readers.
        r = httpx.post(f"{addr}/worker_generate_stream", json={"prompt": "hi", "max_new_tokens": 4}, timeout=30)
        assert r.status_code == 429 and r.content.endswith(b"\0")
        assert json.loads(r.content[:-1])["error_code"] != 0
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 60
    while _status(addr) and time.monotonic() < deadline:  # closed clients leave the batch
        time.sleep(0.2)
    assert _status(addr) == 0


def test_qwen_on_the_batching_worker(stack_client):
    r = chat(stack_client, "What is the capital of France?", model=QWEN, max_tokens=48)
    text = r.choices[0].message.content
    assert "paris" in text.lower() and not any(m in text for m in MARKERS), text
    assert r.usage.prompt_tokens < 80
    # A short answer ends on the model's end-of-turn id, not on the length limit.
    r = chat(stack_client, "Say hi.", model=QWEN, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and not any(m in r.choices[0].message.content for m in MARKERS)
    streamed, finish = stream_text(chat(stack_client, "Say hi.", model=QWEN, max_tokens=64, stream=True))
    assert streamed == r.choices[0].message.content and finish == "stop"
    zh = chat(stack_client, "用中文回答：中国的首都是哪里？", model=QWEN, max_tokens=32).choices[0].message.content
    assert "北京" in zh and "\ufffd" not in zh, zh
