"""A model's settings reach its worker one way: launch turns the config entry into the worker's command line,
and the worker (engine/worker.py) reads them from there, with no config file and no CPU_ARENA_* variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch.config import REPO_ROOT, ModelConfig, load_config
from launch.services import WORKER_MODULES, worker_spec
from tests.stackutil import write_config

BASE = {"name": "m1", "path": "ckpt", "dtype": "bfloat16"}

# Entry field -> a value other than its default, and the worker option (parse_args attribute) that carries it.
# threads and the core lease are covered by their own tests; a new field fails test_every_field_is_decided
# until it is added here or to NOT_ON_ARGV.
ON_ARGV = {
    "name": ("other-name", "model_names", ["other-name"]),
    "path": ("elsewhere", "model_path", None),  # resolved against the config file's folder
    "dtype": ("float32", "dtype", "float32"),
    "threads": (3, "threads", 3),
    "port": (23456, "port", 23456),
    "max_queue": (5, "limit_worker_concurrency", 5),
    "max_batch": (3, "max_batch", 3),
    "prepack_weights": (False, "prepack", False),
    "prefix_cache_mb": (7, "prefix_cache_mb", 7),
    "paths": ("decode=kernel,prompt_torch_from=512", "paths", "decode=kernel,prompt_torch_from=512"),
    "stream_interval": (5, "stream_interval", 5),
    "conv_template": ("chatml", "conv_template", "chatml"),
}
NOT_ON_ARGV = {
    # Which worker program runs: the module on the command line (WORKER_MODULES), not an option.
    "worker",
    # FastChat hands the adapters only a model path: worker_adapters/policy.py checks the remote-code
    # permission in the config entry the launcher names with CPU_ARENA_CONFIG and CPU_ARENA_MODEL.
    "trust_remote_code",
    # Which modelling code loads ChatGLM3/Qwen, decided in the adapters' loading, like trust_remote_code.
    "implementation",
    # Only `make download` uses these.
    "modelscope_id", "modelscope_revision",
}

# Parses each command line in a fresh interpreter started without the config file or any CPU_ARENA_* variable;
# prints what parse_args read and whether importing the worker imported launch.
PARSE = r"""
import json, sys
from engine import worker
lines = json.loads(sys.argv[1])
out = [vars(worker.parse_args(argv)) for argv in lines]
print(json.dumps({"args": out, "launch": sorted(m for m in sys.modules if m.split(".")[0] == "launch")}))
"""


def _worker_args(spec) -> list[str]:
    argv = list(spec.argv)
    return argv[argv.index(WORKER_MODULES["batching"]) + 1:]


def _parse_without_config(lines: list[list[str]], tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPU_ARENA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", PARSE, json.dumps(lines)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_field_is_decided():
    fields = set(ModelConfig.model_fields)
    assert set(ON_ARGV) <= fields and fields - set(ON_ARGV) - NOT_ON_ARGV == set()


def test_each_setting_of_the_config_is_on_the_command_line_and_read_from_there(tmp_path):
    """Change one setting at a time; the worker's command line changes with it, and the worker, started
    where there is no config file and no CPU_ARENA_* variable, reads the new value."""
    base_cfg = load_config(write_config(tmp_path / "base.toml", {}, [BASE]))
    base_argv = _worker_args(worker_spec(base_cfg, base_cfg.models[0]))
    lines, expected = [base_argv], []
    for field, (value, _attr, _want) in ON_ARGV.items():
        cfg = load_config(write_config(tmp_path / f"{field}.toml", {}, [{**BASE, field: value}]))
        argv = _worker_args(worker_spec(cfg, cfg.models[0]))
        assert argv != base_argv, f"{field} = {value!r} does not reach the command line"
        lines.append(argv)
        expected.append(str(cfg.model_path(cfg.models[0])))
    for path in tmp_path.glob("*.toml"):
        path.unlink()  # nothing left to read
    got = _parse_without_config(lines, tmp_path)
    assert got["launch"] == []  # the worker imports nothing from launch
    base, changed = got["args"][0], got["args"][1:]
    for (field, (_value, attr, want)), args, path in zip(ON_ARGV.items(), changed, expected, strict=True):
        assert args[attr] == (path if field == "path" else want), (field, args[attr])
        assert args[attr] != base[attr], field
    # The defaults the launcher passes are the config's, and the worker's own when it is started by hand.
    defaults = {f: ModelConfig.model_fields[f].default for f in ON_ARGV}
    assert base["limit_worker_concurrency"] == defaults["max_queue"]
    assert base["max_batch"] == defaults["max_batch"] and base["prepack"] == defaults["prepack_weights"]
    assert base["prefix_cache_mb"] == defaults["prefix_cache_mb"]
    assert base["paths"] == defaults["paths"] == "measure"
    assert base["stream_interval"] == defaults["stream_interval"]


def test_the_workers_own_defaults_are_the_configs():
    from engine.worker import parse_args

    args = parse_args(["--model-path", "m"])
    fields = ModelConfig.model_fields
    assert (args.limit_worker_concurrency, args.max_batch, args.prepack, args.prefix_cache_mb,
            args.stream_interval, args.paths) == (fields["max_queue"].default, fields["max_batch"].default,
                                                  fields["prepack_weights"].default, fields["prefix_cache_mb"].default,
                                                  fields["stream_interval"].default, fields["paths"].default)
    assert args.stream_interval == 2  # FastChat's worker's default
    assert args.threads is None and args.core_lease is None  # torch's own thread count, no lease


def test_the_core_lease_comes_from_the_command_line(tmp_path, monkeypatch):
    from engine.worker import core_lease, parse_args

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    for k in [k for k in os.environ if k.startswith("CPU_ARENA_") and k != "CPU_ARENA_RUN_DIR"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("CPU_ARENA_RUN_DIR", str(tmp_path / "run"))
    cfg = load_config(write_config(tmp_path / "c.toml", {}, [BASE, {**BASE, "name": "m2"}]))
    leases = [core_lease(parse_args(_worker_args(worker_spec(cfg, m)))) for m in cfg.models]
    assert [(lease.slot, lease.cores) for lease in leases] == [(0, 4), (1, 4)]
    assert leases[0].acquire() == 4 and leases[1].acquire() == 2  # one file: the two split the cores
    assert core_lease(parse_args(["--model-path", "m"])) is None


def test_the_stock_worker_gets_only_fastchats_options(tmp_path, monkeypatch):
    """FastChat's parser refuses options it does not know; the thread count goes by OMP_NUM_THREADS."""
    import fastchat.serve.model_worker as stock

    cfg = load_config(write_config(tmp_path / "c.toml", {}, [{**BASE, "worker": "fastchat", "threads": 3,
                                                              "max_queue": 5, "stream_interval": 4,
                                                              "conv_template": "chatml"}]))
    spec = worker_spec(cfg, cfg.models[0])
    argv = list(spec.argv)
    module = argv.index(WORKER_MODULES["fastchat"])
    assert spec.env["OMP_NUM_THREADS"] == "3" and "--threads" not in argv
    # FastChat's own factory parses the command line (the model is not loaded: ModelWorker is a stand-in).
    made = {}
    monkeypatch.setattr(stock, "ModelWorker", lambda *a, **k: made.update(args=a, kwargs=k))
    monkeypatch.setattr(sys, "argv", argv[module:])
    args, _ = stock.create_model_worker()
    assert (args.dtype, args.limit_worker_concurrency, args.stream_interval, args.conv_template) == (
        "bfloat16", 5, 4, "chatml")
    assert args.model_path == str(cfg.model_path(cfg.models[0])) and args.model_names == ["m1"]
    assert made["kwargs"]["stream_interval"] == 4 and made["kwargs"]["conv_template"] == "chatml"


def test_worker_option_errors_name_the_option(capsys):
    from engine.worker import parse_args

    assert parse_args(["--model-path", "m", "--stream-interval", "1"]).stream_interval == 1
    assert parse_args(["--model-path", "m", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    assert parse_args(["--model-path", "m", "--no-prepack"]).prepack is False
    for option, value, says in (("--stream-interval", "0", "give a whole number, 1 or more"),
                                ("--max-batch", "0", "give a whole number, 1 or more"),
                                ("--prefix-cache-mb", "-1", "give 0 (off) or more")):
        with pytest.raises(SystemExit):
            parse_args(["--model-path", "m", option, value])
        assert f"{option}: {value}: {says}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--core-lease", "x"])
    assert "--core-lease and --core-slot go together" in capsys.readouterr().err


def test_the_remote_worker_builds_its_command_line_with_worker_spec(tmp_path, monkeypatch):
    from launch import remote_worker

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    cfg = load_config(write_config(tmp_path / "c.toml", {}, [{**BASE, "max_batch": 3, "prefix_cache_mb": 9}]))
    started = []

    class Proc:
        def __init__(self, argv, env, **_):
            started.append((argv, env))

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(remote_worker.probes, "http_ok", lambda *a, **k: True)
    monkeypatch.setattr(remote_worker, "remove_worker", lambda *a: None)
    monkeypatch.setattr(remote_worker.subprocess, "Popen", Proc)
    controller = "http://10.0.0.1:21001"
    assert remote_worker.main(cfg, ["--model", "m1", "--controller-url", controller,
                                    "--advertise-host", "10.0.0.2", "--port", "23999"]) == 0
    want = worker_spec(cfg, cfg.models[0], controller_url=controller, advertise_host="10.0.0.2",
                       host="10.0.0.2", port=23999)
    assert started[0][0] == want.argv
    assert "--max-batch" in want.argv and "--prefix-cache-mb" in want.argv
