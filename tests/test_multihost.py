"""A worker on another address joins the controller: controller on 127.0.0.1, the remote worker
bound to 127.0.0.2 only, started with `python -m launch worker`; the API serves through it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

from launch.config import REPO_ROOT
from launch.fastchat_patches.api_guard.controller_client import list_workers
from launch.ports import free_port
from tests.stackutil import default_models, free_ports_config, stack_for, write_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REMOTE = "127.0.0.2"


def _second_loopback_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((REMOTE, 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def main_stack(tmp_path_factory):
    st = stack_for(free_ports_config(tmp_path_factory.mktemp("main"), models=default_models(["smollm2-135m"])))
    try:
        st.up()
        yield st
    finally:
        st.down()


def test_remote_worker_joins_and_serves(main_stack, tmp_path):
    if not _second_loopback_usable():
        pytest.fail("127.0.0.2 is not bindable here; Linux routes all of 127.0.0.0/8 to lo")
    port = free_port()
    base = default_models(["smollm2-135m"])[0]
    # The "other host" has its own config: its own model entry and run folder.
    remote_cfg = write_config(tmp_path / "remote.toml", {"run_dir": str(tmp_path / "run")},
                              [dict(base, name="smollm2-remote", port=port)])
    controller = main_stack.cfg.controller_url()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "worker", "--config", str(remote_cfg), "--model", "smollm2-remote",
         "--controller-url", controller, "--advertise-host", REMOTE],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            workers = {w["name"]: w for w in list_workers(controller)}
            if f"http://{REMOTE}:{port}" in workers:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("remote worker did not register within 300 s")
        assert workers[f"http://{REMOTE}:{port}"]["model_names"] == ["smollm2-remote"]
        # Bound to 127.0.0.2 only: the same port on 127.0.0.1 refuses.
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        client = openai.OpenAI(base_url=main_stack.api_url, api_key="none", timeout=300, max_retries=0)
        assert "smollm2-remote" in {m.id for m in client.models.list().data}
        r = client.chat.completions.create(model="smollm2-remote", max_tokens=6,
                                           messages=[{"role": "user", "content": "Say hi."}])
        assert r.choices[0].message.content is not None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    # Stopping it removes it from the controller at once (no 90 s of routing to a dead address).
    assert all(w["name"] != f"http://{REMOTE}:{port}" for w in list_workers(controller))


def test_worker_command_refuses_an_unreachable_controller(tmp_path):
    cfg = write_config(tmp_path / "r.toml", {}, default_models(["smollm2-135m"]))
    proc = subprocess.run([sys.executable, "-m", "launch", "worker", "--config", str(cfg), "--model", "smollm2-135m",
                           "--controller-url", f"http://127.0.0.1:{free_port()}", "--advertise-host", REMOTE],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no controller answers" in proc.stderr
