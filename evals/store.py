"""A run on disk: <runs_root>/<name>/ with meta.json, answers.jsonl, judgments.jsonl, report.*.

Records are appended one JSON line at a time, flushed and fsynced, so Ctrl-C or a crash loses
at most the answer being generated. Reading keeps the last record per key (a retried error is
superseded by its later answer) and skips a torn last line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from evals.schema import Answer, RunSettings

ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
META = "meta.json"


class JsonlWriter:
    """Thread-safe append-only JSONL writer; every record is on disk when `write` returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, record: dict | str) -> None:
        line = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write: that answer is simply redone
    return out


def read_answers(run_dir: Path) -> list[Answer]:
    latest: dict[tuple, Answer] = {}
    for d in read_jsonl(run_dir / ANSWERS):
        a = Answer.from_dict(d)
        latest[a.key] = a  # last record wins
    return list(latest.values())


def write_meta(run_dir: Path, settings: RunSettings, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    old = read_meta(run_dir) or {}
    meta = {
        "created_at": old.get("created_at", time.time()),
        "updated_at": time.time(),
        "settings": asdict(settings),
        **info,
    }
    tmp = run_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, run_dir / META)


def read_meta(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / META).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def list_runs(runs_root: Path) -> list[Path]:
    """Runs under runs_root, oldest first (by creation time recorded in meta.json)."""
    runs = [p for p in runs_root.glob("*/") if (p / META).is_file()] if runs_root.is_dir() else []
    return sorted(runs, key=lambda p: ((read_meta(p) or {}).get("created_at", 0), p.name))


def resolve_run(spec: str, runs_root: Path) -> Path:
    """'latest', a run name under runs_root, or a path to a run folder."""
    if spec == "latest":
        runs = list_runs(runs_root)
        if not runs:
            raise FileNotFoundError(f"no runs under {runs_root}; run `python -m evals run` first")
        return runs[-1]
    p = Path(spec)
    if (p / META).is_file() or (p / ANSWERS).is_file():
        return p
    if (runs_root / spec / META).is_file():
        return runs_root / spec
    raise FileNotFoundError(f"no run {spec!r} (looked for {p} and {runs_root / spec})")
