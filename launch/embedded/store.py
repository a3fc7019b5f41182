"""The checkpoints on disk: marker file, validity check, staging + atomic rename, and the models-dir lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from .sources import REPO_ROOT, ModelSource

MODELS_DIR_ENV = "CPU_ARENA_MODELS_DIR"
MARKER_NAME = ".cpu-arena-source.json"
LOCK_NAME = ".embedded-models.lock"
STAGING_PREFIX = ".staging-"
# Bump when the conversion output changes: checkpoints with an older marker are then rebuilt.
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / "models"


def read_marker(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_is_valid(checkpoint: Path, source: ModelSource) -> bool:
    """Cheap check (no hashing of weights): marker for this exact GGUF and format, all files present."""
    marker = read_marker(checkpoint)
    return (
        marker is not None
        and marker.get("gguf_sha256") == source.sha256
        and marker.get("format_version") == FORMAT_VERSION
        and all((checkpoint / f).is_file() for f in REQUIRED_FILES)
    )


def _marker(source: ModelSource, timings: dict[str, float]) -> dict:
    from importlib.metadata import version

    src = asdict(source)
    src["packages"] = [str(p) for p in source.packages]
    return {
        "format_version": FORMAT_VERSION,
        "gguf_sha256": source.sha256,
        "source": src,
        "converted_with": {p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "safetensors")},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _readme(source: ModelSource) -> str:
    packages = ", ".join(f"`{p}`" for p in source.packages)
    return (
        f"# {source.name}\n\n{source.credit}\n\nLicense: {source.license}\n\n"
        f"Converted by cpu-arena (`python -m launch.embedded`) from the GGUF carried by {packages}, "
        f"SHA-256 `{source.sha256}`, dequantized to bfloat16 safetensors. The weights are the GGUF's quantized "
        "values (mostly 4-bit), not the upstream bf16 release. Details in `.cpu-arena-source.json`.\n"
    )


@contextlib.contextmanager
def staging_dir(models_dir: Path, name: str) -> Iterator[Path]:
    """A scratch directory inside models_dir (same file system, so the final rename is atomic), always removed."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=models_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_checkpoint(out: Path, final: Path, source: ModelSource, timings: dict[str, float]) -> None:
    """Add README and marker to a converted checkpoint in staging, then move it to `final`."""
    (out / "README.md").write_text(_readme(source))
    # The marker goes last: its presence is what says "this checkpoint is complete".
    (out / MARKER_NAME).write_text(json.dumps(_marker(source, timings), indent=2, ensure_ascii=False) + "\n")
    for f in out.iterdir():  # safetensors writes 0600; workers may run as another user
        f.chmod(0o644)
    _replace_dir(out, final)


def _replace_dir(staged: Path, final: Path) -> None:
    """Move a finished checkpoint into place; an older (invalid) one is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f"{STAGING_PREFIX}{final.name}-old-{os.getpid()}")
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def models_dir_lock(models_dir: Path) -> Iterator[None]:
    # Two `make setup` runs at once would otherwise both convert and race on the rename.
    with open(models_dir / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_staging(models_dir: Path) -> None:
    # Left by a run that was killed mid-conversion (we hold the lock, so no live run owns them).
    for p in models_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
