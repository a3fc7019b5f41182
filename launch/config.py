"""The one config file (deploy/models.toml) that is the source of truth for models and ports.

Commands read it with `load_config`; the long-lived processes with `current_config` (the same, cached until
the file changes). Nothing else restates ports or model lists. Errors name the field and the fix, and are
raised before anything starts. A worker never reads this file: launch/services.py puts the model's settings on
its command line.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine import protocol

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "deploy" / "models.toml"
CONFIG_ENV = "CPU_ARENA_CONFIG"

DTYPES = ("bfloat16", "float32", "auto")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("cpu_arena.config")


class ConfigError(ValueError):
    """A config problem, worded for the user: which file, which field, how to fix it."""


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    controller_port: int = Field(21001, ge=1, le=65535)
    api_port: int = Field(8000, ge=1, le=65535)
    ui_port: int = Field(7860, ge=1, le=65535)
    worker_base_port: int = Field(21002, ge=1, le=65535)
    # Address other hosts use to reach this machine's controller (multi-host); defaults to host.
    advertise_host: str | None = None
    # Controller and worker ports have no authentication: they bind 127.0.0.1 even when `host` is
    # public, unless the user opts in here (multi-host: remote workers must reach the controller).
    expose_internal: bool = False
    run_dir: str = "../run"
    # API keys: listed here or, better, in the environment variable named by api_keys_env.
    api_keys: tuple[str, ...] = ()
    api_keys_env: str = "CPU_ARENA_API_KEYS"
    # FastChat's worker calls time out after 100 s; a long CPU answer takes minutes.
    worker_api_timeout: float = Field(900.0, gt=0)
    startup_timeout: float = Field(900.0, gt=0)
    # FastChat's defaults (heartbeat every 45 s, expiry after 90 s) leave a restarted controller
    # without workers for up to a minute; workers re-register on the first heartbeat it answers.
    heartbeat_interval: int = Field(5, ge=1)
    heartbeat_expiration: int = Field(30, ge=2)
    # Restart a crashed worker, waiting backoff_initial * 2**n seconds (capped) between tries.
    restart_backoff_initial: float = Field(1.0, gt=0)
    restart_backoff_max: float = Field(30.0, gt=0)
    # `check`/`up` refuse models whose weights plus overhead exceed the memory available
    # (launch/memory_check.py); true skips that, like `--skip-memory-check`.
    skip_memory_check: bool = False

    def resolved_api_keys(self) -> tuple[str, ...]:
        env = os.environ.get(self.api_keys_env, "")
        from_env = tuple(k.strip() for k in env.split(",") if k.strip())
        return tuple(self.api_keys) + from_env

    def internal_host(self) -> str:
        """Where the controller and workers bind: loopback unless expose_internal says otherwise."""
        return self.host if self.expose_internal else "127.0.0.1"

    @model_validator(mode="after")
    def _heartbeat(self) -> ServerConfig:
        if self.heartbeat_expiration <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_expiration ({self.heartbeat_expiration}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}), or live workers get dropped between heartbeats"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:-]+$")
    path: str
    dtype: str = "auto"
    threads: int | Literal["auto"] = "auto"
    trust_remote_code: bool = False
    # ChatGLM3-6B and Qwen-7B-Chat: "native" runs them on transformers' own GlmForCausalLM / Qwen2ForCausalLM
    # (no remote code, continuous batching, the project's kernels); "remote" runs the checkpoint's own modelling
    # code, which needs trust_remote_code = true (worker_adapters/native_loader.py). Other models ignore it.
    implementation: Literal["native", "remote"] = "native"
    # "batching": the project's continuous-batching worker; "fastchat": stock model_worker.
    worker: Literal["batching", "fastchat"] = "batching"
    port: int | None = Field(None, ge=1, le=65535)
    # The defaults of the settings a worker gets on its command line are the worker's own (engine/protocol.py).
    # Requests waiting beyond this answer 429 instead of queueing without bound.
    max_queue: int = Field(protocol.MAX_QUEUE, ge=1)
    max_batch: int = Field(protocol.MAX_BATCH, ge=1)
    # Batching worker: linear layers on the AVX2 kernel or oneDNN prepacked weights (engine/kernels/linear.py).
    prepack_weights: bool = protocol.PREPACK_WEIGHTS
    # Batching worker: which implementation runs decode steps, prompt passes and attention (engine/kernels/paths.py):
    # "measure" (the fastest here, timed at worker start and cached), "kernels", or a fixed
    # "decode=kernel,prompt_torch_from=256,attention_torch_from=1024".
    paths: str = protocol.PATHS
    # Batching worker: MB of finished requests' keys and values kept, so that a prompt beginning like one of them
    # (the next turn of a chat, a common system prompt) starts from them; 0 = off (engine/prefix_cache.py).
    prefix_cache_mb: int = Field(protocol.PREFIX_CACHE_MB, ge=0)
    # Both workers: a request's text is sent at its first token, then every this many tokens (FastChat's option).
    stream_interval: int = Field(protocol.STREAM_INTERVAL, ge=1)
    # Conversation template override; normally the adapter detects it from the checkpoint.
    conv_template: str | None = None
    # ModelScope id for `make download`, e.g. "ZhipuAI/chatglm3-6b".
    modelscope_id: str | None = None
    modelscope_revision: str | None = None

    @field_validator("paths")
    @classmethod
    def _paths_ok(cls, v: str) -> str:
        from engine.kernels.paths import parse

        parse(v)  # raises ValueError naming what to write instead
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype_ok(cls, v: str) -> str:
        if v in ("float16", "fp16", "half"):
            raise ValueError(
                "float16 is refused on CPU (matmuls are unimplemented or crawl there); "
                "use dtype = \"bfloat16\" or \"float32\" (or \"auto\": bf16 where the CPU has bf16 units)"
            )
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
        return v


class ArenaConfig(_Strict):
    server: ServerConfig = ServerConfig()
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    # Filled in by load_config, not read from the file.
    source: Path = Field(default=DEFAULT_CONFIG, exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> ArenaConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        ports: dict[int, str] = {}
        for label, port in self.ports().items():
            if port in ports:
                raise ValueError(
                    f"port clash: {label} and {ports[port]} both use port {port}; "
                    "give one of them another port in [server] or the model's `port`"
                )
            ports[port] = label
        return self

    # ---- derived values: the only place ports and paths are computed ----
    def worker_port(self, model: ModelConfig) -> int:
        if model.port is not None:
            return model.port
        return self.server.worker_base_port + self.models.index(model)

    def ports(self) -> dict[str, int]:
        s = self.server
        out = {"server.controller_port": s.controller_port, "server.api_port": s.api_port, "server.ui_port": s.ui_port}
        for m in self.models:
            out[f"models[{m.name}].port"] = self.worker_port(m)
        return out

    def model_path(self, model: ModelConfig) -> Path:
        p = Path(os.path.expanduser(os.path.expandvars(model.path)))
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    def run_dir(self) -> Path:
        p = Path(os.environ.get("CPU_ARENA_RUN_DIR") or os.path.expanduser(self.server.run_dir))
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def threads(self, model: ModelConfig) -> int:
        """The most torch threads this model's worker uses."""
        if model.threads != "auto":
            return model.threads
        cores = os.cpu_count() or 1
        if self.shares_cores():
            return cores  # leased step by step: all of them while the other workers are idle
        # A static split: N workers x all cores each oversubscribes, and OpenMP's busy-wait then crawls.
        return max(1, cores // len(self.models))

    def shares_cores(self) -> bool:
        """Workers divide the cores between the busy ones at each step (engine/host/cores.py).

        Only when every worker takes part: a stock FastChat worker, or one with fixed threads,
        cannot give cores back, so then every worker gets a static split instead.
        """
        return len(self.models) > 1 and all(m.worker == "batching" and m.threads == "auto" for m in self.models)

    def controller_url(self) -> str:
        return f"http://{url_host(self.server.internal_host())}:{self.server.controller_port}"

    def api_url(self) -> str:
        return f"http://{url_host(self.server.host)}:{self.server.api_port}/v1"

    def ui_url(self) -> str:
        return f"http://{url_host(self.server.host)}:{self.server.ui_port}"

    def check_paths(self) -> None:
        """Refuse to start when a model folder is missing: say which entry and how to get it."""
        for i, m in enumerate(self.models):
            p = self.model_path(m)
            if not (p / "config.json").is_file():
                how = (
                    f"run `make download MODEL={m.name} CONFIG={self.source}`"
                    if m.modelscope_id
                    else "run `make setup` (embedded models) or fix the path"
                )
                raise ConfigError(
                    f"{self.source}: models[{i}] ({m.name}).path: no checkpoint at {p} "
                    f"(config.json missing); {how}"
                )

    def check_exposure(self) -> None:
        """Binding beyond loopback without API keys would open the models to the network."""
        if self.server.host not in LOOPBACK and not self.server.resolved_api_keys():
            raise ConfigError(
                f"{self.source}: server.host = {self.server.host!r} exposes the API beyond this machine "
                f"but no API key is configured; set {self.server.api_keys_env}=key1,key2 in the environment "
                "(or server.api_keys), or bind host = \"127.0.0.1\""
            )


def url_host(host: str) -> str:
    """`host` as it goes in a URL: a wildcard bind address becomes loopback (where a client on this machine
    reaches the service), an IPv6 address gets its brackets (`http://[::1]:8000`)."""
    if host in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if x != "__root__")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?); remove it or see deploy/models.toml for the known keys"
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def config_path(path: str | Path | None = None) -> Path:
    """Which file: `path`, else $CPU_ARENA_CONFIG (the launcher sets it for every service), else the default."""
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).resolve()


def _unreadable(path: Path, e: OSError) -> ConfigError:
    if isinstance(e, FileNotFoundError):
        return ConfigError(f"config file not found: {path}; pass CONFIG=deploy/models.toml")
    return ConfigError(f"{path}: cannot read the config file: {e.strerror or e}")


def load_config(path: str | Path | None = None) -> ArenaConfig:
    """Read and validate the config file now. Every problem (missing, unreadable, not TOML, invalid) is a
    ConfigError naming the file, and the field and the fix where there is one."""
    path = config_path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _unreadable(path, e) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return ArenaConfig(**raw, source=path)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None


# path -> ((mtime_ns, size) of the file read, the config read from it)
_cache: dict[Path, tuple[tuple[int, int], ArenaConfig]] = {}
_reported: set[tuple[Path, str]] = set()


def current_config(path: str | Path | None = None, *, optional: bool = False) -> ArenaConfig | None:
    """The config this process runs with (`path`, else $CPU_ARENA_CONFIG, else the default file).

    For processes that consult it again and again (the API server's patches, the UI, the adapters): the file is
    parsed once and read again only when its modification time or size changes, so an edit is seen and an
    unchanged file costs one stat. Errors are load_config's ConfigError; with `optional=True` (callers that work
    without a config: the UI's model filter, the API server's queue limits, the adapters' lookups, run metadata)
    each distinct error is logged once and the answer is None.
    """
    path = config_path(path)
    try:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = _cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        cfg = load_config(path)
    except (OSError, ConfigError) as e:
        err = e if isinstance(e, ConfigError) else _unreadable(path, e)
        if not optional:
            raise err from None
        if (path, str(err)) not in _reported:
            _reported.add((path, str(err)))
            log.warning("config not used: %s", err)
        return None
    _cache[path] = (key, cfg)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_config(path: Path, server: dict, models: list[dict]) -> Path:
    """Write a config file (for derived configs: the bench's and the tests' stacks on free ports)."""
    lines = ["[server]"] + [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    for m in models:
        lines += ["", "[[models]]"] + [f"{k} = {_toml_value(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
