"""Security defaults: loopback binding, keys required beyond loopback, internal ports private,
API keys never on a command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import REPO_ROOT, ConfigError, load_config
from launch.services import base_env, build_services
from tests.stackutil import write_config

KEY = "sk-test-4f9a1c77e2"


def _fake_model(tmp: Path) -> str:
    d = tmp / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _config(tmp: Path, **server):
    base = {"host": "127.0.0.1", "controller_port": 31001, "api_port": 31000, "ui_port": 31002,
            "worker_base_port": 31003, "run_dir": str(tmp / "run")}
    base.update(server)
    return write_config(tmp / "arena.toml", base, [
        {"name": "m1", "path": _fake_model(tmp)}, {"name": "m2", "path": _fake_model(tmp)}])


def _hosts(cfg) -> dict[str, str]:
    out = {}
    for spec in build_services(cfg):
        argv = list(spec.argv)
        out[spec.kind if spec.kind != "worker" else spec.name] = argv[argv.index("--host") + 1]
    return out


def test_every_service_binds_loopback_by_default(tmp_path):
    cfg = load_config(_config(tmp_path))
    assert set(_hosts(cfg).values()) == {"127.0.0.1"}


def test_public_host_without_keys_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CPU_ARENA_API_KEYS", raising=False)
    cfg = load_config(_config(tmp_path, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="CPU_ARENA_API_KEYS"):
        cfg.check_exposure()
    monkeypatch.setenv("CPU_ARENA_API_KEYS", KEY)
    cfg.check_exposure()  # keys from the environment are enough
    load_config(_config(tmp_path, host="127.0.0.1")).check_exposure()


def test_up_refuses_public_host_without_keys_before_starting_anything(tmp_path):
    path = _config(tmp_path, host="0.0.0.0")
    env = {k: v for k, v in os.environ.items() if k != "CPU_ARENA_API_KEYS"}
    proc = subprocess.run([sys.executable, "-m", "launch", "up", "--config", str(path)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no API key is configured" in proc.stderr and "CPU_ARENA_API_KEYS" in proc.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_controller_and_workers_stay_on_loopback_when_the_api_is_public(tmp_path, monkeypatch):
    monkeypatch.setenv("CPU_ARENA_API_KEYS", KEY)
    cfg = load_config(_config(tmp_path, host="0.0.0.0"))
    hosts = _hosts(cfg)
    assert hosts["api"] == hosts["ui"] == "0.0.0.0"
    assert hosts["controller"] == hosts["worker:m1"] == hosts["worker:m2"] == "127.0.0.1"
    assert cfg.controller_url().startswith("http://127.0.0.1:")
    workers = [s for s in build_services(cfg) if s.kind == "worker"]
    assert all(s.worker_url.startswith("http://127.0.0.1:") for s in workers)


def test_expose_internal_opens_controller_and_workers_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("CPU_ARENA_API_KEYS", KEY)
    cfg = load_config(_config(tmp_path, host="0.0.0.0", expose_internal=True, advertise_host="10.1.2.3"))
    assert set(_hosts(cfg).values()) == {"0.0.0.0"}
    workers = [s for s in build_services(cfg) if s.kind == "worker"]
    assert all(s.worker_url.startswith("http://10.1.2.3:") for s in workers)


def test_no_command_line_carries_an_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CPU_ARENA_API_KEYS", KEY)
    cfg = load_config(write_config(tmp_path / "k.toml", {"host": "0.0.0.0", "api_keys": ["sk-in-config-991"]},
                                   [{"name": "m1", "path": _fake_model(tmp_path)}]))
    assert set(cfg.server.resolved_api_keys()) == {KEY, "sk-in-config-991"}
    for spec in build_services(cfg):
        line = " ".join(spec.argv)
        assert KEY not in line and "sk-in-config-991" not in line and "--api-keys" not in line, spec.name


_FACTORY = """
import sys
from launch.fastchat_patches import apply_all
apply_all()
import fastchat.serve.openai_api_server as m
sys.argv = ["api"] + sys.argv[1:]
m.create_openai_api_server()
print("KEYS=" + ",".join(m.app_settings.api_keys or []))
"""


def _factory(tmp: Path, *argv: str, keys: str | None) -> subprocess.CompletedProcess:
    cfg = write_config(tmp / "f.toml", {"api_keys": ["cfg-key-1"]}, [{"name": "m1", "path": _fake_model(tmp)}])
    env = {k: v for k, v in os.environ.items() if k != "CPU_ARENA_API_KEYS"}
    env.update({"CPU_ARENA_CONFIG": str(cfg), "LOGDIR": str(tmp)})
    if keys is not None:
        env["CPU_ARENA_API_KEYS"] = keys
    return subprocess.run([sys.executable, "-c", _FACTORY, *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_api_server_reads_keys_from_config_and_environment_not_argv(tmp_path):
    proc = _factory(tmp_path, keys="env-key-1,env-key-2")
    assert proc.returncode == 0, proc.stderr
    # FastChat's logger captures print(); the line may land on stdout or stderr.
    keys = (proc.stdout + proc.stderr).split("KEYS=")[1].split()[0].split(",")
    assert keys == ["cfg-key-1", "env-key-1", "env-key-2"]  # stock FastChat: None (no auth at all)


@pytest.mark.slow
def test_api_server_refuses_keys_on_its_command_line(tmp_path):
    proc = _factory(tmp_path, "--api-keys", "visible-in-ps", keys=None)
    assert proc.returncode != 0
    assert "refusing --api-keys" in proc.stderr


def test_services_get_heartbeat_and_timeouts_from_the_config(tmp_path):
    cfg = load_config(_config(tmp_path, worker_api_timeout=1234, heartbeat_interval=3, heartbeat_expiration=20))
    env = base_env(cfg)
    assert env["FASTCHAT_WORKER_API_TIMEOUT"] == "1234"
    assert env["FASTCHAT_WORKER_HEART_BEAT_INTERVAL"] == "3"
    assert env["FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"] == "20"
    code = "import fastchat.constants as c; import json; print(json.dumps([c.WORKER_API_TIMEOUT, " \
           "c.WORKER_HEART_BEAT_INTERVAL, c.CONTROLLER_HEART_BEAT_EXPIRATION]))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == [1234, 3, 20]  # what FastChat's modules will actually use


def test_heartbeat_expiration_must_exceed_the_interval(tmp_path):
    with pytest.raises(ConfigError, match="heartbeat_expiration"):
        load_config(_config(tmp_path, heartbeat_interval=10, heartbeat_expiration=10))
