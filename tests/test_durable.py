"""Append-only logs that a kill cannot corrupt: launch/jsonl_log.py and the UI's log writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch.config import REPO_ROOT
from launch.fastchat_patches.durable_ui_logs import DurableAppend
from launch.jsonl_log import append_record, read_records

WRITER = r"""
import hashlib, random, sys
from launch.jsonl_log import append_record
path = sys.argv[1]
rnd = random.Random(7)
n = 0
while True:
    # Sizes from a few bytes to 300 kB: many records need several pages, some exceed pipe/page buffers.
    pad = "明" * rnd.choice([1, 100, 5000, 100_000]) + "x" * rnd.randrange(1000)
    append_record(path, {"n": n, "pad": pad, "sha": hashlib.sha256(pad.encode()).hexdigest()},
                  fsync=n % 4 == 0)
    n += 1
"""


def test_roundtrip_keeps_unicode_and_order(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    for i in range(3):
        append_record(path, {"i": i, "text": "明明喜欢白"})
    assert [r["i"] for r in read_records(path)] == [0, 1, 2]
    assert "明明喜欢白" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes


def test_reader_skips_only_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    append_record(path, {"ok": 1})
    with open(path, "a") as f:
        f.write('{"torn": ')  # what a crash of a non-atomic writer leaves
    assert list(read_records(path)) == [{"ok": 1}]


def test_killed_writer_leaves_every_completed_record_readable(tmp_path):
    import hashlib

    path = tmp_path / "votes.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 3_000_000):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: it writes continuously
    finally:
        proc.kill()
        proc.wait(timeout=10)
    raw = path.read_bytes()
    complete, _, torn = raw.rpartition(b"\n")
    lines = complete.decode("utf-8").splitlines()
    assert len(lines) > 10
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert rec["n"] == i
        assert hashlib.sha256(rec["pad"].encode()).hexdigest() == rec["sha"]
    # The record being written at the kill may be torn (Linux ends a write early on SIGKILL);
    # it is the only thing lost, readers skip it, and the next append cuts it off.
    assert [r["n"] for r in read_records(path)] == list(range(len(lines)))
    if torn:
        assert not torn.endswith(b"}")
    append_record(path, {"n": len(lines), "after": "kill"})
    assert path.read_bytes().endswith(b"\n")
    assert [r["n"] for r in read_records(path)] == list(range(len(lines) + 1))


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_append_after_a_torn_record_cuts_it_off(tmp_path, kept):
    path = tmp_path / "log.jsonl"
    for i in range(kept):
        append_record(path, {"i": i})
    with open(path, "ab") as f:  # a 200 kB record cut short, as a killed writer leaves it
        f.write(b'{"i": 99, "pad": "' + b"x" * 200_000)
    append_record(path, {"i": kept})
    assert [r["i"] for r in read_records(path)] == list(range(kept + 1))


def test_durable_append_writes_whole_record_on_close_and_nothing_on_error(tmp_path):
    path = tmp_path / "conv.json"
    with DurableAppend(path) as f:
        f.write(json.dumps({"a": 1}))
        assert not path.exists()  # nothing reaches the file half-way
        f.write("\n")
    with pytest.raises(RuntimeError), DurableAppend(path) as f:
        f.write('{"b": ')
        raise RuntimeError("state.dict() failed mid-record")
    assert list(read_records(path)) == [{"a": 1}]


UI_WRITE = r"""
import json, sys
import launch.jsonl_log as jl
calls = []
orig = jl.append_line
jl.append_line = lambda *a, **k: (calls.append(a[0]), orig(*a, **k))
if sys.argv[1] == "patched":
    from launch.fastchat_patches import apply_all
    apply_all()
import fastchat.serve.gradio_web_server as g
import fastchat.serve.gradio_block_arena_named as named

class State:
    def dict(self):
        return {"conv": "明明喜欢白"}

class Request:
    headers = {}
    class client:
        host = "127.0.0.1"

g.vote_last_response(State(), "upvote", "smollm2-135m", Request())
named.vote_last_response([State(), State()], "leftvote", ["a", "b"], Request())
open(sys.argv[2], "w").write(json.dumps(calls))
"""


@pytest.mark.parametrize("mode", ["patched", "stock"])
def test_ui_vote_logs_go_through_the_durable_writer(tmp_path, mode):
    env = {**os.environ, "LOGDIR": str(tmp_path)}
    out = tmp_path / "calls.out"
    proc = subprocess.run([sys.executable, "-c", UI_WRITE, mode, str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(out.read_text())
    logs = list(tmp_path.glob("*-conv.json"))
    assert len(logs) == 1
    records = list(read_records(logs[0]))
    assert [r["type"] for r in records] == ["upvote", "leftvote"]
    if mode == "patched":
        assert calls == [str(logs[0])] * 2
    else:  # stock FastChat writes through a buffered open(): the check above is what the patch adds
        assert calls == []
