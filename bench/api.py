"""Measurements through the running OpenAI-compatible API: streaming decode speed, TTFT, concurrency."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx

from bench.stats import Stat

PROMPT = "Count from 1 to 300, separated by commas, and say nothing else."


def client_prompt(i: int) -> str:
    """Concurrent client i's prompt: no two clients send the same text (the worker computes a common
    beginning once, so identical prompts would flatter it; here only the chat template and "Request" are
    common), and the task stays the one every model answers at length. Other questions were tried: asked
    "Count from 301 to 600" or told a name first, SmolLM2-135M stopped after 5-25 tokens, which measures
    answer length instead of speed."""
    return f"Request {i + 1}. {PROMPT}"


@dataclass
class StreamResult:
    ttft_s: float
    decode_s: float  # first content chunk -> last content chunk
    text: str
    wall_s: float


def _client(timeout: float = 600) -> httpx.Client:
    # Built before the clock starts: a new httpx client loads the CA bundle (30-60 ms of CPU here),
    # which is the client's cost, not the server's.
    return httpx.Client(timeout=timeout, trust_env=False)


def stream_chat(api_url: str, model: str, max_tokens: int, *, headers: dict | None = None,
                prompt: str = PROMPT, client: httpx.Client | None = None) -> StreamResult:
    if client is None:
        with _client() as own:
            return stream_chat(api_url, model, max_tokens, headers=headers, prompt=prompt, client=own)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    first = last = None
    parts: list[str] = []
    with client.stream("POST", f"{api_url}/chat/completions", json=body, headers=headers or {}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "choices" not in data:
                raise RuntimeError(f"stream error: {data}")
            content = data["choices"][0].get("delta", {}).get("content")
            if content:
                now = time.perf_counter()
                first = first or now
                last = now
                parts.append(content)
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{model}: the stream carried no text")
    return StreamResult(first - t0, last - first, "".join(parts), end - t0)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def api_decode(api_url: str, model: str, tokenizer, max_tokens: int, repeats: int,
               headers: dict | None = None) -> tuple[Stat, Stat]:
    """(decode tokens/s, TTFT) of single streaming requests; tokens counted by re-tokenizing the text."""
    stream_chat(api_url, model, 4, headers=headers)  # warm: template fetch, first-call costs
    rates, ttfts = [], []
    for _ in range(repeats):
        with _client() as client:
            r = stream_chat(api_url, model, max_tokens, headers=headers, client=client)
        n = count_tokens(tokenizer, r.text)
        if n > 1 and r.decode_s > 0:
            rates.append((n - 1) / r.decode_s)
        ttfts.append(r.ttft_s)
    return Stat.of(rates), Stat.of(ttfts)


def concurrent(api_url: str, jobs: list[tuple[str, object]], max_tokens: int,
               headers: dict | None = None) -> tuple[float, list[StreamResult | Exception], list[int]]:
    """Start every (model, tokenizer) job at once, job i asking client_prompt(i); returns wall time (from
    the moment all clients are ready to send), results and token counts."""
    results: list[StreamResult | Exception] = [None] * len(jobs)  # type: ignore[list-item]
    start: list[float] = []
    barrier = threading.Barrier(len(jobs), action=lambda: start.append(time.perf_counter()))

    def run(i: int, model: str) -> None:
        with _client() as client:
            barrier.wait()
            try:
                results[i] = stream_chat(api_url, model, max_tokens, headers=headers, client=client,
                                         prompt=client_prompt(i))
            except Exception as e:  # reported, not raised: one failed client must not hide the rest
                results[i] = e

    threads = [threading.Thread(target=run, args=(i, m)) for i, (m, _) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start[0]
    tokens = [count_tokens(tok, r.text) if isinstance(r, StreamResult) else 0
              for r, (_, tok) in zip(results, jobs, strict=True)]
    return wall, results, tokens


def aggregate_tps(api_url: str, model: str, tokenizer, clients: int, max_tokens: int,
                  headers: dict | None = None) -> float:
    """Total tokens/s of `clients` streaming clients started at once, over the wall time of the slowest."""
    wall, results, tokens = concurrent(api_url, [(model, tokenizer)] * clients, max_tokens, headers)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{model}: {len(errors)}/{clients} clients failed: {errors[0]}")
    if min(tokens) < 0.8 * max_tokens:  # then the rate says how long the answers were, not how fast
        print(f"  warning: {model} answered {clients} client(s) with {tokens} tokens, asked for "
              f"{max_tokens}: short answers lower this rate", flush=True)
    return sum(tokens) / wall


def client_order(counts: tuple[int, ...], rounds: int) -> list[int]:
    """The client counts in measuring order: every round measures each count once, ascending in even
    rounds and descending in odd ones. Why: on a shared VM the speed drifts within minutes (memory
    bandwidth read 12 to 29 GB/s on the reference machine). Measuring all 1-client runs first and all
    4-client runs minutes later put that drift into the scaling ratio; within a round the counts sit
    next to each other, and reversing the order every other round cancels a steady drift."""
    up = sorted(counts)
    return [c for r in range(rounds) for c in (up if r % 2 == 0 else up[::-1])]


def aggregate_rounds(api_url: str, model: str, tokenizer, counts: tuple[int, ...], max_tokens: int, rounds: int,
                     headers: dict | None = None, progress=None) -> dict[int, list[float]]:
    """Aggregate tokens/s per client count, one value per round, in round order (so that the rates of one
    round can be compared with each other: bench_stats.paired_scaling)."""
    rates: dict[int, list[float]] = {c: [] for c in sorted(counts)}
    for c in client_order(counts, rounds):
        if progress:
            progress(c)
        rates[c].append(aggregate_tps(api_url, model, tokenizer, c, max_tokens, headers))
    return rates


def shared_decode(api_url: str, jobs: list[tuple[str, object]], max_tokens: int, repeats: int,
                  headers: dict | None = None) -> dict[str, Stat | None]:
    """Every model decoding at once (one client each): each model's own decode tokens/s."""
    per: dict[str, list[float]] = {m: [] for m, _ in jobs}
    for _ in range(repeats):
        _, results, tokens = concurrent(api_url, jobs, max_tokens, headers)
        for (m, _), r, n in zip(jobs, results, tokens, strict=True):
            if isinstance(r, StreamResult) and n > 1 and r.decode_s > 0:
                per[m].append((n - 1) / r.decode_s)
    return {m: Stat.of(v) for m, v in per.items()}
