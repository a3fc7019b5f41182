"""Shared fixtures. The real stack (both embedded models) is started once per test session,
lazily, by the first test that asks for `stack`; every stack test shares it to keep CI short."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from launch.config import load_config
from tests.stackutil import Stack, free_ports_config, stack_for

os.environ.setdefault("no_proxy", "localhost,127.0.0.1,::1")
# FastChat's loggers write <name>.log into $LOGDIR (default: the cwd) as soon as a module is imported.
if "LOGDIR" not in os.environ:
    _OWN_LOGDIR = tempfile.mkdtemp(prefix="cpu-arena-test-logs-")
    os.environ["LOGDIR"] = _OWN_LOGDIR
else:
    _OWN_LOGDIR = None


def pytest_sessionfinish(session, exitstatus):
    # Every run made one; they piled up in /tmp. Kept when a test failed and something was logged.
    if _OWN_LOGDIR and (exitstatus == 0 or not any(f.stat().st_size for f in Path(_OWN_LOGDIR).iterdir())):
        shutil.rmtree(_OWN_LOGDIR, ignore_errors=True)


def _models_present() -> bool:
    cfg = load_config()
    return all((cfg.model_path(m) / "config.json").is_file() for m in cfg.models)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    if not _models_present():
        pytest.fail("embedded models are missing: run `make setup` before `make test`")
    tmp = tmp_path_factory.mktemp("stack")
    st = stack_for(free_ports_config(tmp))
    st.up()
    yield st
    st.down()
    assert_stopped(st)


def assert_stopped(st: Stack) -> None:
    """After `down`: the supervisor and every service it started are gone."""
    from launch.state import pid_alive, read_state

    state = read_state(st.run_dir)
    assert state is not None
    left = [s.name for s in state.services.values() if pid_alive(s.pid)]
    if pid_alive(state.supervisor_pid):
        left.append("supervisor")
    assert not left, f"processes left after down: {left}"


@pytest.fixture(scope="session")
def lab_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight ChatGLM3-6B and Qwen-7B-Chat checkpoints built from the published files, laid out
    as ModelScope downloads them (skipped with the reason where the files are absent; CI fails instead)."""
    from tests.fixtures.seed_models import build_chatglm3, build_qwen

    root = tmp_path_factory.mktemp("modelscope")
    return {"chatglm3-6b": build_chatglm3(root / "ZhipuAI" / "chatglm3-6b"),
            "qwen-7b-chat": build_qwen(root / "qwen" / "Qwen-7B-Chat")}
