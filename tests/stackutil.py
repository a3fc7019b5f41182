"""Build configs on free ports, run the real stack from tests, and the small helpers stack tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from launch.config import DEFAULT_CONFIG, REPO_ROOT, ArenaConfig, load_config, write_config
from launch.ports import on_free_ports

# Chat-template control tokens of both embedded models: none may reach a client's text.
MARKERS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def default_models(names: list[str] | None = None, **overrides) -> list[dict]:
    """The shipped default model entries with absolute paths (optionally a subset, with overrides)."""
    raw = tomllib.loads(DEFAULT_CONFIG.read_text())
    out = []
    for m in raw["models"]:
        if names and m["name"] not in names:
            continue
        m = dict(m, path=str((DEFAULT_CONFIG.parent / m["path"]).resolve()))
        m.update(overrides)
        out.append(m)
    return out


def free_ports_config(tmp: Path, models: list[dict] | None = None, **server) -> Path:
    models = models if models is not None else default_models()
    base, models = on_free_ports({"run_dir": str(tmp / "run"), "startup_timeout": 600}, models)
    base.update(server)
    return write_config(tmp / "arena.toml", base, models)


@dataclass
class Stack:
    config_path: Path
    cfg: ArenaConfig

    @property
    def api_url(self) -> str:
        return self.cfg.api_url()

    @property
    def ui_url(self) -> str:
        return self.cfg.ui_url()

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    def launch(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "launch", *args, "--config", str(self.config_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "no_proxy": "localhost,127.0.0.1,::1"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"launch {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, api_keys: str | None = None) -> subprocess.CompletedProcess:
        """`launch up`; with `api_keys`, only this stack's supervisor gets CPU_ARENA_API_KEYS (it keeps its
        environment for restarts): later stacks in the same test run must not inherit it."""
        with pytest.MonkeyPatch.context() as mp:
            if api_keys is not None:
                mp.setenv("CPU_ARENA_API_KEYS", api_keys)
            return self.launch("up")

    def down(self) -> subprocess.CompletedProcess:
        return self.launch("down", timeout=180)


def stack_for(config_path: Path) -> Stack:
    return Stack(config_path, load_config(config_path))


def assert_stopped(st: Stack) -> None:
    """After `down`: the supervisor and every service it started are gone."""
    from launch.state import pid_alive, read_state

    state = read_state(st.run_dir)
    assert state is not None
    left = [s.name for s in state.services.values() if pid_alive(s.pid)]
    if pid_alive(state.supervisor_pid):
        left.append("supervisor")
    assert not left, f"processes left after down: {left}"


def worker_url(st: Stack, model: str) -> str:
    """The address the controller routes `model` to."""
    r = httpx.post(f"{st.cfg.controller_url()}/get_worker_address", json={"model": model}, timeout=10)
    return r.json()["address"]


def stream_text(stream) -> tuple[str, str | None]:
    """An openai chat stream read to its end: (the text, the last finish_reason)."""
    parts, finish = [], None
    for c in stream:
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    return "".join(parts), finish
