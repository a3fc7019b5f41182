"""Config validation: a bad config stops before anything starts, naming the field and the fix."""

from __future__ import annotations

import logging
import os
import time

import pytest

from launch.config import ConfigError, load_config
from tests.stackutil import write_config

GOOD_MODEL = {"name": "m1", "path": "ckpt", "dtype": "bfloat16"}


def _cfg(tmp_path, server=None, models=None):
    return write_config(tmp_path / "c.toml", server or {}, models if models is not None else [GOOD_MODEL])


def test_default_config_parses_and_serves_two_embedded_models():
    cfg = load_config()
    assert [m.name for m in cfg.models] == ["smollm2-135m", "qwen2.5-coder-0.5b"]
    assert cfg.server.host == "127.0.0.1"
    assert cfg.ports()["server.controller_port"] == 21001
    assert cfg.worker_port(cfg.models[0]) == 21002 and cfg.worker_port(cfg.models[1]) == 21003
    assert cfg.model_path(cfg.models[0]).name == "SmolLM2-135M-Instruct"


def test_seed_config_serves_the_lab_models_natively():
    from launch.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "deploy" / "seed-models.toml")
    by_name = {m.name: m for m in cfg.models}
    assert by_name["chatglm3-6b"].modelscope_id == "ZhipuAI/chatglm3-6b"
    assert by_name["qwen-7b-chat"].modelscope_id == "qwen/Qwen-7B-Chat"
    # transformers' own classes: no checkpoint code runs, so none may be trusted
    assert all(m.implementation == "native" and not m.trust_remote_code and m.dtype == "bfloat16"
               for m in cfg.models)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, models=[{**GOOD_MODEL, "dtpye": "float32"}]))
    assert "models.0.dtpye" in str(e.value) and "unknown key" in str(e.value)


def test_float16_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, models=[{**GOOD_MODEL, "dtype": "float16"}]))
    msg = str(e.value)
    assert "models.0.dtype" in msg and "bfloat16" in msg and "float32" in msg


def test_unknown_dtype(tmp_path):
    with pytest.raises(ConfigError, match="models.0.dtype: unknown dtype 'int8'"):
        load_config(_cfg(tmp_path, models=[{**GOOD_MODEL, "dtype": "int8"}]))


def test_a_negative_prefix_cache_is_named(tmp_path):
    with pytest.raises(ConfigError, match="models.0.prefix_cache_mb") as e:
        load_config(_cfg(tmp_path, models=[{**GOOD_MODEL, "prefix_cache_mb": -5}]))
    assert "greater than or equal to 0" in str(e.value)


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"models.0.path: required field is missing"):
        load_config(_cfg(tmp_path, models=[{"name": "m1"}]))


def test_no_models(tmp_path):
    with pytest.raises(ConfigError, match="models"):
        load_config(_cfg(tmp_path, models=[]))


def test_port_clash_names_both_sides(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, server={"api_port": 7000, "ui_port": 7000}))
    assert "server.api_port" in str(e.value) and "server.ui_port" in str(e.value) and "7000" in str(e.value)


def test_worker_port_clash_with_controller(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[m1\].port"):
        load_config(_cfg(tmp_path, server={"controller_port": 9100}, models=[{**GOOD_MODEL, "port": 9100}]))


def test_duplicate_model_names(tmp_path):
    with pytest.raises(ConfigError, match="repeated"):
        load_config(_cfg(tmp_path, models=[GOOD_MODEL, {**GOOD_MODEL, "port": 9999}]))


def test_missing_checkpoint_names_the_entry_and_the_fix(tmp_path):
    cfg = load_config(_cfg(tmp_path))
    with pytest.raises(ConfigError) as e:
        cfg.check_paths()
    assert "models[0] (m1).path" in str(e.value) and "make setup" in str(e.value)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_public_host_without_keys_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv("CPU_ARENA_API_KEYS", raising=False)
    cfg = load_config(_cfg(tmp_path, server={"host": "0.0.0.0"}))
    with pytest.raises(ConfigError, match="CPU_ARENA_API_KEYS"):
        cfg.check_exposure()
    monkeypatch.setenv("CPU_ARENA_API_KEYS", "k1")
    cfg.check_exposure()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_config(_cfg(tmp_path))
    assert cfg.model_path(cfg.models[0]) == (tmp_path / "ckpt").resolve()


def _option(argv, name: str) -> str | None:
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


def test_auto_threads_split_the_cores(tmp_path, monkeypatch):
    """A stock FastChat worker cannot give cores back, so with one in the stack the split is static."""
    from launch.services import worker_spec

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cfg = load_config(_cfg(tmp_path, models=[GOOD_MODEL, {**GOOD_MODEL, "name": "m2", "worker": "fastchat"}]))
    assert not cfg.shares_cores()
    assert [cfg.threads(m) for m in cfg.models] == [2, 2]
    ours, stock = (worker_spec(cfg, m) for m in cfg.models)
    assert _option(ours.argv, "--threads") == "2" and "--core-lease" not in ours.argv
    # FastChat's worker refuses options it does not know: its thread count is OpenMP's standard variable.
    assert "--threads" not in stock.argv
    for spec in (ours, stock):
        assert spec.env["OMP_NUM_THREADS"] == "2" and spec.env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert not [k for k in spec.env if k.startswith("CPU_ARENA_") and k != "CPU_ARENA_MODEL"]


def test_batching_workers_lease_the_cores(tmp_path, monkeypatch):
    """Every worker may use all cores; the lease file splits them between the busy ones."""
    from launch.services import worker_spec

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cfg = load_config(_cfg(tmp_path, models=[GOOD_MODEL, {**GOOD_MODEL, "name": "m2"}]))
    assert cfg.shares_cores()
    assert [cfg.threads(m) for m in cfg.models] == [4, 4]
    specs = [worker_spec(cfg, m) for m in cfg.models]
    assert [_option(s.argv, "--core-slot") for s in specs] == ["0", "1"]
    assert {_option(s.argv, "--core-lease") for s in specs} == {str(cfg.run_dir() / "cores.lease")}
    assert [_option(s.argv, "--threads") for s in specs] == ["4", "4"]
    assert all("OMP_WAIT_POLICY" not in s.env for s in specs)  # never more threads than cores: spinning is safe


def test_fixed_threads_turn_the_lease_off(tmp_path, monkeypatch):
    from launch.services import worker_spec

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cfg = load_config(_cfg(tmp_path, models=[GOOD_MODEL, {**GOOD_MODEL, "name": "m2", "threads": 3}]))
    assert not cfg.shares_cores()
    assert [cfg.threads(m) for m in cfg.models] == [2, 3]
    specs = [worker_spec(cfg, m) for m in cfg.models]
    assert [_option(s.argv, "--threads") for s in specs] == ["2", "3"]
    assert not any("--core-lease" in s.argv for s in specs)


# ---- one reader for a process's config -----------------------------------------------------------------

def test_current_config_is_read_once_until_the_file_changes(tmp_path, monkeypatch):
    from launch import config

    path = _cfg(tmp_path)
    reads = []
    real = config.load_config
    monkeypatch.setattr(config, "load_config", lambda p=None: reads.append(p) or real(p))
    monkeypatch.setenv("CPU_ARENA_CONFIG", str(path))
    first = config.current_config()
    assert config.current_config() is first and config.current_config(path) is first and len(reads) == 1
    write_config(path, {}, [{**GOOD_MODEL, "max_batch": 3}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later mtime even on a coarse clock
    assert config.current_config().models[0].max_batch == 3 and len(reads) == 2


def test_current_config_has_one_error_policy(tmp_path, caplog):
    from launch.config import current_config

    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "m"\npath = "m"\ndtype = "float16"\n')
    missing = tmp_path / "nope.toml"
    for path, says in ((bad, "models.0.dtype"), (missing, "not found")):
        with pytest.raises(ConfigError, match=says):
            current_config(path)
        # Callers that work without a config get None, and the reason is logged once, not at every call.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cpu_arena.config"):
            assert current_config(path, optional=True) is None
            assert current_config(path, optional=True) is None
        assert len([r for r in caplog.records if says in r.getMessage()]) == 1
    unreadable = tmp_path / "dir.toml"
    unreadable.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        current_config(unreadable)


# ---- URLs ------------------------------------------------------------------------------------------------

def test_url_host_brackets_ipv6_and_maps_wildcards_to_loopback():
    from launch.config import url_host

    assert url_host("0.0.0.0") == url_host("::") == "127.0.0.1"
    assert url_host("::1") == url_host("[::1]") == "[::1]"
    assert url_host("10.0.0.2") == "10.0.0.2" and url_host("localhost") == "localhost"


def test_every_service_url_brackets_an_ipv6_host(tmp_path, monkeypatch):
    from launch.services import build_services, worker_spec

    monkeypatch.setenv("CPU_ARENA_API_KEYS", "k1")
    cfg = load_config(_cfg(tmp_path, server={"host": "::1", "expose_internal": True}))
    assert cfg.controller_url().startswith("http://[::1]:") and cfg.api_url().startswith("http://[::1]:")
    for spec in build_services(cfg):
        assert spec.health_url.startswith("http://[::1]:"), spec
    w = worker_spec(cfg, cfg.models[0], advertise_host="fd00::2")
    assert w.worker_url.startswith("http://[fd00::2]:") and _option(w.argv, "--worker-address") == w.worker_url


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    from launch.cli import main

    path = _cfg(tmp_path, models=[{**GOOD_MODEL, "dtype": "float16"}])
    assert main(["check", "--config", str(path)]) == 2
    assert "models.0.dtype" in capsys.readouterr().err
