"""What the config file says about a checkpoint: its entry, remote-code permission and dtype.

Every FastChat process gets CPU_ARENA_CONFIG from the launcher; a worker also gets
CPU_ARENA_MODEL (its entry's name). FastChat itself only hands adapters a model path, so the
path is mapped back to its entry here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from launch.config import CONFIG_ENV, ArenaConfig, ModelConfig, current_config

MODEL_ENV = "CPU_ARENA_MODEL"


class RemoteCodeNotAllowed(RuntimeError):
    """The checkpoint ships Python code and its config entry does not allow running it."""


def config_path_for_name(name: str) -> Path | None:
    cfg = current_config(optional=True)
    if cfg is None:
        return None
    try:
        return cfg.model_path(cfg.model(name))
    except KeyError:
        return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def entry_for_path(model_path: str | os.PathLike) -> tuple[ArenaConfig, ModelConfig] | tuple[None, None]:
    """The config entry serving this path: the worker's own (CPU_ARENA_MODEL) first, else by path."""
    from worker_adapters.modelscope import modelscope_variants

    cfg = current_config(optional=True)
    if cfg is None:
        return None, None
    path = Path(model_path)
    candidates = list(cfg.models)
    own = os.environ.get(MODEL_ENV)
    if own:
        candidates.sort(key=lambda m: m.name != own)
    for m in candidates:
        configured = cfg.model_path(m)
        if any(_same(v, path) for v in modelscope_variants(configured)):
            return cfg, m
    return None, None


def check_remote_code(model_path: str | os.PathLike, auto_map: dict) -> bool:
    """True when the checkpoint may run its own code; raises with the fix when it needs to but may not."""
    if not auto_map:
        return False
    cfg, entry = entry_for_path(model_path)
    if entry is not None and entry.trust_remote_code:
        return True
    modules = sorted({str(v).split(".")[0] for v in auto_map.values() if isinstance(v, str)})
    where = (
        f"set `trust_remote_code = true` in the [[models]] entry `{entry.name}` of {cfg.source}"
        if entry is not None
        else f"add a [[models]] entry with this path and `trust_remote_code = true` to the config "
             f"({os.environ.get(CONFIG_ENV) or 'deploy/models.toml'})"
    )
    raise RemoteCodeNotAllowed(
        f"{model_path} ships its own Python code ({', '.join(m + '.py' for m in modules)}, named in "
        f"config.json auto_map) that would run inside this process at load time, and its config entry "
        f"does not allow that. If you trust the checkpoint's source, {where}."
    )


def implementation_for(model_path: str | os.PathLike) -> str:
    """"native" (transformers' own class, no remote code) or "remote" (the checkpoint's modelling code), as the
    model's config entry says; native where no entry names the path."""
    _, entry = entry_for_path(model_path)
    return entry.implementation if entry is not None else "native"


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_dtype(model_path: str | os.PathLike, requested) -> torch.dtype:
    """bf16 or fp32, never fp16 on CPU: the worker's --dtype, else the config entry, else fp32."""
    from engine.host.hardware import resolve_dtype

    if isinstance(requested, torch.dtype) and requested in _DTYPES.values():
        return requested
    _, entry = entry_for_path(model_path)
    if entry is not None:
        return _DTYPES[resolve_dtype(entry.dtype)]
    # float16 / "auto" / None: fp16 matmuls are unimplemented or crawl on CPU; fp32 is always right.
    return torch.float32
