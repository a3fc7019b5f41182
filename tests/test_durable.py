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


def test_ui_log_records_go_through_the_durable_writer(tmp_path, monkeypatch):
    import launch.jsonl_log as jl
    from launch.ui import logs

    calls = []
    real = jl.append_line
    monkeypatch.setattr(jl, "append_line", lambda path, line, **kw: calls.append(str(path)) or real(path, line, **kw))
    monkeypatch.setattr(logs, "log_path", lambda: str(tmp_path / "conversations" / "2026-01-01-conv.json"))
    path = logs.append_record({"type": "upvote", "text": "明明喜欢白"})
    assert calls == [path]  # one durable append per record, even in a folder that did not exist
    assert list(read_records(path)) == [{"type": "upvote", "text": "明明喜欢白"}]
