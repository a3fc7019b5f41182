"""The run folder: one state file (pids, ports, restarts) and one log per service.

The supervisor writes state.json atomically; `make status` / `make down` only read it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch.services import ENTRY


@dataclass
class ServiceState:
    name: str
    pid: int | None = None
    port: int | None = None
    status: str = "starting"  # starting | ready | restarting | failed | stopped
    restarts: int = 0
    started_at: float | None = None
    log: str | None = None
    model: str | None = None


@dataclass
class RunState:
    config: str
    supervisor_pid: int
    phase: str = "starting"  # starting | ready | failed | stopping | stopped
    message: str = ""
    urls: dict[str, str] = field(default_factory=dict)
    services: dict[str, ServiceState] = field(default_factory=dict)
    updated_at: float = 0.0


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def log_path(run_dir: Path, service: str) -> Path:
    return run_dir / "logs" / f"{service.replace(':', '-')}.log"


def write_state(run_dir: Path, state: RunState) -> None:
    state.updated_at = time.time()
    path = state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, path)  # readers never see a half-written file


def read_state(run_dir: Path) -> RunState | None:
    try:
        raw = json.loads(state_path(run_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    services = {k: ServiceState(**v) for k, v in raw.pop("services", {}).items()}
    return RunState(**raw, services=services)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def is_ours(pid: int | None) -> bool:
    """Only signal a pid whose command line is one of ours: pids get recycled."""
    if not pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return ENTRY in cmd or "launch supervise" in cmd or "launch.supervisor" in cmd


def terminate(pid: int, *, grace: float = 10.0) -> bool:
    """SIGTERM the process group, then SIGKILL after `grace` seconds. True if it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
    return not pid_alive(pid)
