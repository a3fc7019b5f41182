"""The runner against a fake OpenAI-compatible server (FastAPI on a free port, started here):
recorded fields, error recording, resume after an interrupt, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from evals import cli, store
from launch.config import REPO_ROOT
from launch.ports import free_port

QUESTIONS = [{"id": f"q{i}", "category": "c", "question": f"question {i}", "keypoints": [f"answer {i}"]}
             for i in range(4)]


# What the fake's /v1/models lists by default; it answers every model named in FakeServer's docstring.
LISTED = ("good", "good2")
EVERY_MODEL = (*LISTED, "usage", "crash", "errchunk", "drop")


class FakeServer:
    """Mimics FastChat's API: streams words, no usage unless asked, token_check, error chunks.

    Models: "good" answers "answer <n> ...", "crash" answers HTTP 500, "errchunk" sends FastChat's
    {"text", "error_code"} chunk, "drop" closes the stream without a finish reason, "usage" sends usage.
    """

    def __init__(self, delay: float = 0.0, listed: tuple[str, ...] = LISTED):
        self.delay, self.listed = delay, listed
        self.requests: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.listed]}

        @app.post("/api/v1/token_check")
        async def token_check(req: Request):
            body = await req.json()
            # one "BOS" token plus one per word: the client must subtract the empty prompt's count
            counts = [1 + len(p["prompt"].split()) for p in body["prompts"]]
            return {"prompts": [{"fits": True, "contextLength": 2048, "tokenCount": n} for n in counts]}

        @app.post("/v1/chat/completions")
        async def chat(req: Request):
            body = await req.json()
            model, question = body["model"], body["messages"][-1]["content"]
            with self.lock:
                self.requests.append((model, question))
            if model == "crash":
                return JSONResponse({"object": "error", "message": "worker down", "code": 50001}, status_code=500)
            n = question.split()[-1]
            words = f"answer {n} is here".split()

            async def gen():
                with self.lock:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model}
                    yield "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
                    for i, w in enumerate(words):
                        await asyncio.sleep(self.delay / len(words))
                        if model == "errchunk" and i == 1:
                            yield "data: " + json.dumps({"text": "CUDA? no: out of memory", "error_code": 50002}) + "\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        if model == "drop" and i == 1:
                            return
                        delta = {"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}
                        yield "data: " + json.dumps({**head, "choices": [delta]}) + "\n\n"
                    yield "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
                    if model == "usage" and (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": 3, "completion_tokens": 42, "total_tokens": 45}
                        yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    with self.lock:
                        self.in_flight -= 1

            return StreamingResponse(gen(), media_type="text/event-stream")

        return app


@pytest.fixture
def fake():
    """Yields a function starting a FakeServer on a free port; every server is stopped at the end."""
    servers = []

    def start(delay: float = 0.0, listed: tuple[str, ...] = LISTED) -> tuple[FakeServer, str]:
        fs = FakeServer(delay, listed)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(fs.app, host="127.0.0.1", port=port, log_level="warning"))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        servers.append((server, t))
        return fs, f"http://127.0.0.1:{port}/v1"

    yield start
    for server, t in servers:
        server.should_exit = True
        t.join(timeout=5)


@pytest.fixture
def qfile(tmp_path) -> Path:
    p = tmp_path / "questions.jsonl"
    p.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return p


def _run(base_url: str, qfile: Path, out: Path, *extra: str) -> int:
    return cli.main(["run", "--base-url", base_url, "--questions", str(qfile), "--out", str(out),
                     "--max-tokens", "32", *extra])


def test_run_records_every_field_for_every_served_model(fake, qfile, tmp_path):
    fs, url = fake(delay=0.05)
    out = tmp_path / "run"
    assert _run(url, qfile, out) == 0
    answers = {a.key: a for a in store.read_answers(out)}
    assert set(answers) == {(m, q["id"], 0) for m in ("good", "good2") for q in QUESTIONS}  # from /v1/models
    a = answers[("good", "q2", 0)]
    assert a.text == "answer 2 is here" and a.ok and a.finish_reason == "stop"
    assert (a.output_tokens, a.tokens_source) == (4, "tokenizer")  # 5 - the empty prompt's 1
    assert 0 < a.ttft_s < a.total_s and a.tokens_per_s == pytest.approx(3 / (a.total_s - a.ttft_s))
    meta = store.read_meta(out)
    assert meta["complete"] and meta["settings"]["max_tokens"] == 32 and meta["packages"]["openai"]
    # the report runs on it
    assert cli.main(["report", str(out)]) == 0
    assert "| good | " in (out / "report.md").read_text()


def test_usage_from_the_server_is_preferred(fake, qfile, tmp_path):
    _, url = fake(listed=EVERY_MODEL)
    out = tmp_path / "run"
    assert _run(url, qfile, out, "--models", "usage", "--limit", "1") == 0
    (a,) = store.read_answers(out)
    assert (a.output_tokens, a.tokens_source) == (42, "usage")


def test_failures_are_recorded_and_the_run_goes_on(fake, qfile, tmp_path):
    fs, url = fake(listed=EVERY_MODEL)
    out = tmp_path / "run"
    assert _run(url, qfile, out, "--models", "crash,errchunk,drop,good") == 0
    answers = {a.key: a for a in store.read_answers(out)}
    assert len(answers) == 16
    for q in QUESTIONS:
        assert "InternalServerError" in answers[("crash", q["id"], 0)].error
        assert "error_code 50002" in answers[("errchunk", q["id"], 0)].error
        drop = answers[("drop", q["id"], 0)]
        # the stream closed after one word with no finish reason: partial text kept, marked as an error
        assert drop.text == "answer" and drop.error
        assert answers[("good", q["id"], 0)].ok
    assert cli.main(["report", str(out)]) == 0
    assert "| crash | ? | 4 | 4 |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_resume_after_interrupt_skips_what_is_done(fake, qfile, tmp_path):
    fs, url = fake(delay=0.6)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "evals", "run", "--base-url", url, "--questions", str(qfile), "--out", str(out),
           "--models", "good", "--max-tokens", "32"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "no_proxy": "127.0.0.1,localhost"})
    try:
        deadline = time.monotonic() + 60
        while len(store.read_answers(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the third answer
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    first = store.read_answers(out)
    assert 2 <= len(first) < 4 and all(a.ok for a in first)
    done_before = {a.question_id for a in first}
    asked_before = len(fs.requests)

    assert _run(url, qfile, out, "--models", "good") == 0
    answers = store.read_answers(out)
    assert sorted(a.question_id for a in answers) == ["q0", "q1", "q2", "q3"]
    asked_again = [q.split()[-1] for _, q in fs.requests[asked_before:]]
    assert not {f"q{n}" for n in asked_again} & done_before  # done answers are not asked again
    lines = store.read_jsonl(out / store.ANSWERS)
    assert len(lines) == 4  # nothing duplicated


def test_default_run_resumes_the_unfinished_latest_run(fake, qfile, tmp_path):
    fs, url = fake(listed=EVERY_MODEL)
    root = tmp_path / "runs"
    args = ["run", "--base-url", url, "--questions", str(qfile), "--runs-root", str(root), "--models", "good,crash",
            "--max-tokens", "32"]
    assert cli.main(args) == 0
    (run,) = store.list_runs(root)
    # pretend it was interrupted: mark incomplete; the errors of "crash" are retried, the rest skipped
    meta = store.read_meta(run)
    meta["complete"] = False
    (run / store.META).write_text(json.dumps(meta))
    n = len(fs.requests)
    assert cli.main(args) == 0
    assert store.list_runs(root) == [run]
    assert sorted(m for m, _ in fs.requests[n:]) == ["crash"] * 4
    assert cli.main([*args, "--new"]) == 0 and len(store.list_runs(root)) == 2
    # other generation settings never mix into an existing run
    with pytest.raises(SystemExit, match="max_tokens"):
        cli.main(["run", "--base-url", url, "--questions", str(qfile), "--out", str(run), "--max-tokens", "64"])


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_bounds_requests_in_flight(fake, qfile, tmp_path, concurrency):
    fs, url = fake(delay=0.4)
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert _run(url, qfile, out, "--models", "good,good2", "--concurrency", str(concurrency)) == 0
    assert fs.max_in_flight == concurrency
    assert len(store.read_answers(out)) == 8
    if concurrency == 3:
        assert time.monotonic() - t0 < 8 * 0.4  # overlapped, not sequential


def test_a_model_the_api_does_not_serve_is_refused_before_anything_runs(fake, qfile, tmp_path, capsys):
    fs, url = fake()
    out = tmp_path / "run"
    assert _run(url, qfile, out, "--models", "good,goood,other") == 2
    err = capsys.readouterr().err
    assert "goood, other: not served" in err and "served: good, good2" in err
    assert "not in the arena config (models: smollm2-135m, qwen2.5-coder-0.5b)" in err
    assert fs.requests == [] and not out.exists()  # nothing asked, no run directory left behind


def test_a_configured_model_that_is_not_served_now_runs_with_a_warning(fake, qfile, tmp_path, capsys):
    """Its worker may have crashed or still be loading: its answers are recorded (as errors when the API
    refuses them) and a second run retries them, so the run is not refused like a misspelt name."""
    fs, url = fake()
    out = tmp_path / "run"
    assert _run(url, qfile, out, "--models", "good,smollm2-135m") == 0
    assert "smollm2-135m: configured but not served" in capsys.readouterr().err
    assert {m for m, _ in fs.requests} == {"good", "smollm2-135m"} and len(store.read_answers(out)) == 8


def test_unreachable_api_is_a_clear_error(qfile, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert _run(url, qfile, tmp_path / "run") == 2
    assert "cannot list models" in capsys.readouterr().err
    assert _run(url, qfile, tmp_path / "run", "--models", "good") == 2  # named models are checked too
    assert "cannot list models" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report"], ["judge", "--judge-model", "m"]])
def test_report_and_judge_of_a_run_that_is_not_there_say_so(tmp_path, capsys, command):
    from evals.cli import main

    assert main([command[0], "no-such-run", "--runs-root", str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-run" in err
