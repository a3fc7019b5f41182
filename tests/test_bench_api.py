"""bench/api.py against a stub OpenAI streaming server with known timing."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.api import PROMPT, aggregate_rounds, client_order, concurrent, stream_chat

DELAY_S = 0.2  # before the first token, and between tokens
WORDS = ["one", " two", " three"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        self.wfile.write(f"data: {json.dumps(role)}\n\n".encode())
        for w in WORDS:
            time.sleep(DELAY_S)
            chunk = {"choices": [{"index": 0, "delta": {"content": w}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


class _Words:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": text.split()})()


def test_stream_chat_times_first_and_last_text(api):
    url = f"http://127.0.0.1:{api.server_address[1]}/v1"
    r = stream_chat(url, "m", 8)
    assert r.text == "one two three"
    assert DELAY_S * 0.9 <= r.ttft_s < DELAY_S * 2.5  # the role chunk does not count as the first token
    assert (len(WORDS) - 1) * DELAY_S * 0.9 <= r.decode_s < len(WORDS) * DELAY_S * 2
    assert api.bodies[-1]["stream"] is True and api.bodies[-1]["temperature"] == 0


def test_concurrent_clients_overlap_and_count_tokens(api):
    url = f"http://127.0.0.1:{api.server_address[1]}/v1"
    sent = len(api.bodies)
    wall, results, tokens = concurrent(url, [("m", _Words())] * 4, 8)
    # Each client asks its own question (identical prompts would share their whole prefill).
    questions = [b["messages"][-1]["content"] for b in api.bodies[sent:]]
    assert len(set(questions)) == 4 and all(PROMPT in q for q in questions)
    assert [r.text for r in results] == ["one two three"] * 4
    assert tokens == [3] * 4
    # The stub serves the 4 streams in parallel: the wall time is one stream's, not four.
    assert len(WORDS) * DELAY_S * 0.9 <= wall < 2 * len(WORDS) * DELAY_S


def test_client_counts_alternate_direction_round_by_round():
    assert client_order((4, 1, 2), 3) == [1, 2, 4, 4, 2, 1, 1, 2, 4]


def test_aggregate_rounds_keep_one_rate_per_round_in_round_order(api):
    url = f"http://127.0.0.1:{api.server_address[1]}/v1"
    sent = len(api.bodies)
    seen = []
    rates = aggregate_rounds(url, "m", _Words(), (1, 2), 3, 2, progress=seen.append)
    assert seen == [1, 2, 2, 1]
    assert len(api.bodies) - sent == 1 + 2 + 2 + 1
    assert sorted(rates) == [1, 2] and all(len(v) == 2 for v in rates.values())
    # 3 words per stream over ~3 delays; two parallel streams give up to twice that. The lower bounds are loose:
    # on the 2-core VM a 2-client round once took 1.28 s where 0.6 s is ideal (whether streams overlap is
    # test_concurrent_clients_overlap_and_count_tokens's check; this one is about rounds and their order).
    one = len(WORDS) / (len(WORDS) * DELAY_S)
    for r in rates[1]:
        assert one / 2 < r <= one * 1.1
    for r in rates[2]:
        assert one / 2 < r <= 2 * one * 1.1
