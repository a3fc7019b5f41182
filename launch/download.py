"""`python -m launch download --config deploy/seed-models.toml <model>`: fetch a seed model from ModelScope.

Into the folder the config entry's `path` names, with the modelscope SDK (progress bars, and it
resumes partial files). Before calling the SDK we probe the hub with a short timeout: offline,
the SDK retries for ~22 s and ends in a stack trace; here the user gets one line in seconds.
After the download every file in ModelScope's file list is checked (size, and sha256 when the
list has one) so a truncated or corrupted file is named instead of failing later at load time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from launch.config import ArenaConfig, ConfigError

PROBE_TIMEOUT = 4.0


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None


def hub_endpoint() -> str:
    domain = os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn"
    return domain if "://" in domain else f"https://{domain}"


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to the hub opens within `timeout`; else why not."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    t0 = time.monotonic()
    try:
        socket.setdefaulttimeout(timeout)
        addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
        with socket.create_connection(addr[:2], timeout=max(0.5, timeout - (time.monotonic() - t0))):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        socket.setdefaulttimeout(None)


def remote_files(listing: Iterable[dict]) -> list[RemoteFile]:
    """ModelScope's file list (HubApi.get_model_files) as RemoteFile, blobs only."""
    out = []
    for f in listing:
        if (f.get("Type") or "blob") != "blob":
            continue
        size = f.get("Size")
        out.append(RemoteFile(f["Path"], int(size) if size is not None else None, f.get("Sha256") or None))
    return out


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, files: list[RemoteFile], *, hash_files: bool = True,
           progress: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Problems found (empty = every listed file arrived intact)."""
    problems = []
    for f in files:
        local = folder / f.path
        if not local.is_file():
            problems.append(f"{f.path}: missing")
            continue
        size = local.stat().st_size
        if f.size is not None and size != f.size:
            problems.append(f"{f.path}: {size} bytes, expected {f.size} (incomplete; rerun to resume)")
            continue
        if hash_files and f.sha256:
            progress(f"  sha256 {f.path}")
            digest = sha256_of(local)
            if digest != f.sha256.lower():
                problems.append(f"{f.path}: sha256 {digest[:12]}..., expected {f.sha256[:12]}... (corrupt; delete it and rerun)")
    return problems


def download(model_id: str, folder: Path, revision: str | None, *, hash_files: bool = True) -> None:
    endpoint = hub_endpoint()
    why = probe(endpoint)
    if why:
        raise DownloadError(
            f"cannot reach ModelScope at {endpoint} ({why}); check the network or proxy "
            f"(MODELSCOPE_DOMAIN selects another endpoint), then rerun: the download resumes"
        )
    from modelscope.hub.api import HubApi
    from modelscope.hub.snapshot_download import snapshot_download

    folder.mkdir(parents=True, exist_ok=True)
    kw = {"revision": revision} if revision else {}
    listing = remote_files(HubApi().get_model_files(model_id, recursive=True, **kw))
    total = sum(f.size or 0 for f in listing)
    print(f"{model_id}: {len(listing)} files, {total / 1e9:.2f} GB -> {folder}", flush=True)
    snapshot_download(model_id=model_id, local_dir=str(folder), **kw)  # shows tqdm bars, resumes
    problems = verify(folder, listing, hash_files=hash_files, progress=lambda m: print(m, flush=True))
    if problems:
        raise DownloadError("download incomplete:\n  " + "\n  ".join(problems))


def main(cfg: ArenaConfig, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m launch download", description=__doc__)
    p.add_argument("model", help="model name in the config (e.g. chatglm3-6b)")
    p.add_argument("--no-hash", action="store_true", help="check sizes only (hashing 12 GB takes a minute)")
    args = p.parse_args(argv)
    try:
        entry = cfg.model(args.model)
    except KeyError:
        raise ConfigError(f"{cfg.source}: no model named {args.model!r}; "
                          f"known: {', '.join(m.name for m in cfg.models)}") from None
    if not entry.modelscope_id:
        raise ConfigError(f"{cfg.source}: model {entry.name} has no modelscope_id to download from")
    folder = cfg.model_path(entry)
    try:
        download(entry.modelscope_id, folder, entry.modelscope_revision, hash_files=not args.no_hash)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{entry.name}: all files verified in {folder}")
    return 0
