"""Append-only JSON-lines files that a kill cannot corrupt.

Every record is one `os.write` of a complete line to a file opened with O_APPEND, then fsync:
a process killed at any moment leaves each record either whole or absent (never half a line),
writers in several processes never interleave inside a line, and a completed record survives
a crash of the machine. Used for the UI's conversation and vote logs
(launch/fastchat_patches/durable_ui_logs.py), the API access log and eval results.

    from launch.jsonl_log import append_record, read_records
    append_record(path, {"model": "m", "score": 1})      # one durable line
    for rec in read_records(path): ...                    # skips nothing but a torn tail
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path


def append_line(path: str | os.PathLike, line: str, *, fsync: bool = True) -> None:
    """Append `line` (a newline is added if missing) in a single write."""
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; finish the line rather than tear it
            written += os.write(fd, data[written:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def append_record(path: str | os.PathLike, record: dict, *, fsync: bool = True) -> None:
    # ensure_ascii=False keeps Chinese readable in the file; no newline can occur inside a dumps() line.
    append_line(path, json.dumps(record, ensure_ascii=False), fsync=fsync)


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Every complete record. A line without its newline (torn by a crash of an older, non-atomic
    writer) is skipped; any other undecodable line raises, since it means real corruption."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield json.loads(raw)
