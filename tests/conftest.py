"""Shared fixtures and the markers' rule.

Markers (pyproject.toml): `stack` for tests on a running stack, `browser` for headless Chromium, `models`
for tests that load the embedded models (built by `make setup`) in the test process. `make test-fast` runs
everything else: no stack, no built models.

The real stack (both embedded models, the default config on free ports) is started once, lazily, by the
first test that asks for `stack`; every stack test that needs nothing more shares it. Stacks with a config
of their own (API keys, faults that kill services, a second host, the lab models, two copies of one model)
belong to their test files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import make_chat_template_model, serve_from, write_arena_config
from tests.fixtures.embedded import models_present, smollm2_path
from tests.stackutil import Stack, assert_stopped, free_ports_config, stack_for

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


# Fixtures that need what `make test-fast` leaves out, and the marker every test using them must carry.
NEEDS_MARKER = {"stack": "stack", "smollm2": "models"}


def pytest_collection_modifyitems(config, items):
    # An unmarked test using these would start a stack, or fail without `make setup`, inside `make test-fast`.
    unmarked = [f"{item.nodeid} (`{fixture}`: mark it `{marker}`)" for item in items
                for fixture, marker in NEEDS_MARKER.items()
                if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None]
    if unmarked:
        raise pytest.UsageError("tests without the marker their fixtures need:\n  " + "\n  ".join(unmarked))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    if not models_present():
        pytest.fail("embedded models are missing: run `make setup` before `make test`")
    tmp = tmp_path_factory.mktemp("stack")
    st = stack_for(free_ports_config(tmp))
    st.up()
    yield st
    st.down()
    assert_stopped(st)


@pytest.fixture(scope="session")
def stack_client(stack):
    """The official openai client on the shared stack; no retries, so a 429 or 5xx shows as it is."""
    import openai

    return openai.OpenAI(base_url=stack.api_url, api_key="none", timeout=300, max_retries=0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (tests/fixtures/embedded.py); its tests are marked `models`."""
    return smollm2_path()


@pytest.fixture(scope="session")
def lab_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight ChatGLM3-6B and Qwen-7B-Chat checkpoints built from the published files, laid out
    as ModelScope downloads them (skipped with the reason where the files are absent; CI fails instead)."""
    from tests.fixtures.seed_models import build_chatglm3, build_qwen

    root = tmp_path_factory.mktemp("modelscope")
    return {"chatglm3-6b": build_chatglm3(root / "ZhipuAI" / "chatglm3-6b"),
            "qwen-7b-chat": build_qwen(root / "qwen" / "Qwen-7B-Chat")}


@pytest.fixture(scope="session")
def chat_template_model(tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's special tokens and chat template (tests/fixtures/checkpoints.py); read only."""
    return make_chat_template_model(tmp_path_factory.mktemp("ckpt") / "smol")


@pytest.fixture
def serve_config(tmp_path, monkeypatch):
    """serve_config(models) writes an arena config with these model entries and serves from it in this
    process (CPU_ARENA_CONFIG, our adapters first); returns its path. Adapter caches are cleared after,
    so the next test's detection is not answered from this config."""
    from launch.fastchat_patches import adapter_dispatch as hooks

    def make(models: list[dict]) -> Path:
        cfg = write_arena_config(tmp_path / "arena.toml", models)
        serve_from(monkeypatch, cfg)
        return cfg

    yield make
    hooks.clear_caches()
