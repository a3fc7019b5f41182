"""Turns the config into the processes to run: the only place FastChat's command lines are built.

A worker's settings travel one way: the config is read here, and everything a worker needs from it goes on
its command line (worker_spec), so a worker never reads the config file itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from engine.host.hardware import resolve_dtype
from launch.config import ArenaConfig, ModelConfig, url_host

ENTRY = "launch.fastchat_entry"
WORKER_MODULES = {
    "fastchat": "fastchat.serve.model_worker",
    "batching": "engine.worker",
}


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "controller", "worker:<model>", "api", "ui"
    kind: str  # controller | worker | api | ui
    argv: tuple[str, ...]
    port: int
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    # Workers only: the address they register under (what the controller routes to).
    worker_url: str | None = None


def _python_entry(module: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", ENTRY, module, *args)


def base_env(cfg: ArenaConfig) -> dict[str, str]:
    """Environment shared by every service process."""
    run_dir = cfg.run_dir()
    return {
        "CPU_ARENA_CONFIG": str(cfg.source),
        "CPU_ARENA_RUN_DIR": str(run_dir),
        # FastChat writes conversation and vote logs under LOGDIR.
        "LOGDIR": str(run_dir / "conversations"),
        "FASTCHAT_WORKER_API_TIMEOUT": str(int(cfg.server.worker_api_timeout)),
        # Read by fastchat.constants at import: how fast workers find a restarted controller,
        # and how long the controller keeps a silent worker.
        "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(cfg.server.heartbeat_interval),
        "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(cfg.server.heartbeat_expiration),
        # Local calls must never go through a proxy (offline machines often set one for package mirrors).
        "no_proxy": "localhost,127.0.0.1,::1",
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "PYTHONUNBUFFERED": "1",
        # Keep the UI from phoning home (analytics) on offline machines.
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def worker_env(cfg: ArenaConfig, model: ModelConfig) -> dict[str, str]:
    """The standard variables the OpenMP and MKL runtimes read themselves; the worker's own settings are on
    its command line (worker_args)."""
    threads = str(cfg.threads(model))
    env = {
        # Every thread's OpenMP pool starts at this size, and torch takes its thread count from it. It is the
        # only thread setting FastChat's stock worker gets: its parser refuses options it does not know, and
        # with the variable set torch already runs that many threads on every thread of the process.
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        # Not a setting: FastChat hands the adapters only a model path, and worker_adapters/policy.py uses the
        # name to find this worker's own entry (remote-code permission, dtype) when two entries share a path.
        "CPU_ARENA_MODEL": model.name,
    }
    # Workers sharing the cores through the lease take cores // busy workers threads at each step, so threads
    # never outnumber cores and OpenMP's default (spin, then sleep) is the fast choice. Otherwise OpenMP's
    # busy-wait makes a worker 28x slower when another process holds a core; passive waiting costs a little on
    # a quiet machine but never collapses.
    if not cfg.shares_cores() and cfg.threads(model) * len(cfg.models) > 1 and len(cfg.models) > 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def worker_args(cfg: ArenaConfig, model: ModelConfig) -> list[str]:
    """The model's settings as its worker's options: every one the worker acts on, so it reads no config file.

    Both workers take FastChat's options (dtype, queue bound, stream interval, template); only the project's
    worker (engine/worker.py) knows the rest, and FastChat's stock worker would refuse them.
    """
    args = [
        "--model-path", str(cfg.model_path(model)),
        "--model-names", model.name,
        "--device", "cpu",
        "--dtype", resolve_dtype(model.dtype),
        "--limit-worker-concurrency", str(model.max_queue),
        "--stream-interval", str(model.stream_interval),
    ]
    if model.conv_template:
        args += ["--conv-template", model.conv_template]
    if model.worker == "batching":
        args += [
            "--threads", str(cfg.threads(model)),
            "--max-batch", str(model.max_batch),
            "--prepack" if model.prepack_weights else "--no-prepack",
            "--paths", model.paths,
            "--prefix-cache-mb", str(model.prefix_cache_mb),
        ]
        if cfg.shares_cores():
            # The stack's workers divide the cores step by step through this file (engine/host/cores.py).
            args += ["--core-lease", str(cfg.run_dir() / "cores.lease"),
                     "--core-slot", str(cfg.models.index(model))]
    return args


def worker_spec(cfg: ArenaConfig, model: ModelConfig, *, controller_url: str | None = None,
                advertise_host: str | None = None, host: str | None = None,
                port: int | None = None) -> ServiceSpec:
    # A local worker binds loopback unless server.expose_internal; a remote one (launch.remote_worker)
    # passes the address it binds and the one the controller and API server use to reach it.
    host = host or cfg.server.internal_host()
    port = port or cfg.worker_port(model)
    published = cfg.server.advertise_host if cfg.server.expose_internal else None
    reach = url_host(advertise_host or published or host)
    args = [
        "--host", host,
        "--port", str(port),
        "--worker-address", f"http://{reach}:{port}",
        "--controller-address", controller_url or cfg.controller_url(),
        *worker_args(cfg, model),
    ]
    return ServiceSpec(
        name=f"worker:{model.name}",
        kind="worker",
        argv=_python_entry(WORKER_MODULES[model.worker], *args),
        port=port,
        health_url=f"http://{url_host(host)}:{port}/worker_get_status",
        env=worker_env(cfg, model),
        model=model.name,
        worker_url=f"http://{reach}:{port}",
    )


def build_services(cfg: ArenaConfig) -> list[ServiceSpec]:
    s = cfg.server
    h = url_host(s.host)
    internal = s.internal_host()
    controller = ServiceSpec(
        name="controller",
        kind="controller",
        argv=_python_entry("fastchat.serve.controller", "--host", internal, "--port", str(s.controller_port)),
        port=s.controller_port,
        health_url=f"http://{url_host(internal)}:{s.controller_port}/test_connection",
    )
    workers = [worker_spec(cfg, m) for m in cfg.models]
    api = ServiceSpec(
        name="api",
        kind="api",
        argv=_python_entry(
            "fastchat.serve.openai_api_server",
            "--host", s.host, "--port", str(s.api_port),
            "--controller-address", cfg.controller_url(),
        ),
        port=s.api_port,
        health_url=f"http://{h}:{s.api_port}/v1/models",
    )
    ui = ServiceSpec(
        name="ui",
        kind="ui",
        argv=_python_entry(
            "launch.ui.app",  # our page on FastChat's UI pieces (launch/ui/app.py says why)
            "--host", s.host, "--port", str(s.ui_port),
            "--controller-url", cfg.controller_url(),
            "--model-list-mode", "reload",
        ),
        port=s.ui_port,
        health_url=f"http://{h}:{s.ui_port}/",
    )
    return [controller, *workers, api, ui]


def process_env(cfg: ArenaConfig, spec: ServiceSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(base_env(cfg))
    env.update(spec.env)
    # API keys reach the API server through the environment, never argv (visible in `ps`).
    return env
