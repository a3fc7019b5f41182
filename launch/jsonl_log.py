"""Append-only JSON-lines files that a kill cannot corrupt.

Every record is one `os.write` of a complete line to a file opened with O_APPEND, then fsync.
What a kill can and cannot do:
- A record whose `append_record` returned is whole, and survives a crash of the machine (fsync).
- A writer killed *during* its write can leave that one record torn: Linux ends a write(2) to a
  regular file early when a fatal signal arrives (generic_perform_write checks
  fatal_signal_pending between pages), so a large record is not written atomically. A fresh-clone
  CI run showed it with a 300 kB record. `read_records` skips such a torn tail, and the next writer
  cuts it off before it appends, so a torn record never gets glued to the next one.
- Writers in several processes hold an exclusive flock while they repair and append, so they never
  interleave inside a line, and a repair never cuts a record another writer is still writing.
Used for the UI's conversation and vote logs (launch/ui/), the API access log and eval results.

    from launch.jsonl_log import append_record, read_records
    append_record(path, {"model": "m", "score": 1})      # one durable line
    for rec in read_records(path): ...                    # skips nothing but a torn tail
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path


def append_line(path: str | os.PathLike, line: str, *, fsync: bool = True) -> None:
    """Append `line` (a newline is added if missing) in a single write, after cutting off a record
    torn by a writer that was killed mid-write."""
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel when a writer dies
        _cut_torn_tail(fd)
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; finish the line rather than tear it
            written += os.write(fd, data[written:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int, chunk: int = 1 << 16) -> None:
    """Truncate the file after its last newline, if it does not end with one."""
    end = os.fstat(fd).st_size
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        newline = os.pread(fd, pos - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        pos = start
    os.ftruncate(fd, 0)  # not one complete record in the file


def append_record(path: str | os.PathLike, record: dict, *, fsync: bool = True) -> None:
    # ensure_ascii=False keeps Chinese readable in the file; no newline can occur inside a dumps() line.
    append_line(path, json.dumps(record, ensure_ascii=False), fsync=fsync)


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Every complete record. A last line without its newline (a record torn by a writer killed
    mid-write, or one being written now) is skipped; any other undecodable line raises, since it
    means real corruption."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield json.loads(raw)
