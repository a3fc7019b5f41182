"""Where a bench's figures go and what they are tagged with: the JSON report, the CPU model, a process's RSS."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.host.hardware import cpu_model
from launch.config import REPO_ROOT

__all__ = ["cpu_model", "process_rss", "write_json"]


def process_rss(pid: int | None) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def write_json(args: argparse.Namespace, out: dict) -> Path:
    path = args.json or (REPO_ROOT / "run" / "bench" / time.strftime("bench-%Y%m%d-%H%M%S.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"JSON: {path}")
    return path
