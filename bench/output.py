"""Where a bench's figures go and what they are tagged with: the JSON report, the CPU model, a process's RSS."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from launch.config import REPO_ROOT


def process_rss(pid: int | None) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cpu_model() -> str:
    """lscpu's "Model name" (what the figures were measured on), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_json(args: argparse.Namespace, out: dict) -> Path:
    path = args.json or (REPO_ROOT / "run" / "bench" / time.strftime("bench-%Y%m%d-%H%M%S.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"JSON: {path}")
    return path
