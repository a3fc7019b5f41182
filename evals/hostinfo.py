"""Run metadata that makes results comparable later: host CPU, package versions, model dtypes."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "fschat", "openai", "tokenizers", "accelerate", "pydantic")


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key == "flags" and "flags" not in info:
            flags = set(value.split())
            info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_info_from_config(config_path: str | None, models: list[str]) -> dict[str, dict]:
    """dtype/threads/path per served model as the config says (FastChat's API does not report them)."""
    from engine.host.hardware import resolve_dtype
    from launch.config import current_config

    cfg = current_config(config_path, optional=True)  # a remote endpoint may have no local config
    if cfg is None:
        return {}
    out = {}
    for name in models:
        try:
            m = cfg.model(name)
        except KeyError:
            continue
        out[name] = {
            "dtype": resolve_dtype(m.dtype),
            "dtype_config": m.dtype,
            "threads": cfg.threads(m),
            "path": str(cfg.model_path(m)),
            "worker": m.worker,
        }
    return out


def collect(config_path: str | None, models: list[str]) -> dict:
    return {
        "host": {"hostname": platform.node(), "python": platform.python_version(), "cpu": cpu_info()},
        "packages": package_versions(),
        "models_info": model_info_from_config(config_path, models),
    }
