"""launch/download.py: offline failure is fast and clear; verification against a file list."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time

import pytest

from launch.config import REPO_ROOT
from launch.download import RemoteFile, probe, remote_files, verify


def test_offline_fails_within_seconds_with_clear_message(monkeypatch):
    # Point the hub at a port nothing listens on, so the test means the same with or without network.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "download", "--config", "deploy/seed-models.toml", "chatglm3-6b"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "MODELSCOPE_DOMAIN": f"http://127.0.0.1:{port}"},
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert "cannot reach ModelScope" in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 15, elapsed  # the SDK alone retries for ~22 s


def test_probe_reports_unreachable_quickly():
    t0 = time.monotonic()
    assert probe("https://nonexistent.invalid", timeout=2) is not None
    assert time.monotonic() - t0 < 5


def test_unknown_model_is_a_config_error():
    proc = subprocess.run([sys.executable, "-m", "launch", "download", "--config", "deploy/seed-models.toml", "nope"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no model named 'nope'" in proc.stderr


@pytest.fixture
def listing(tmp_path):
    files = {"config.json": b'{"model_type": "chatglm"}', "sub/model-00001.safetensors": b"\x00" * 1000}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    raw = [{"Path": n, "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest(), "Type": "blob"} for n, d in files.items()]
    raw.append({"Path": "sub", "Type": "tree"})
    return tmp_path, remote_files(raw)


def test_verify_accepts_complete_download(listing):
    folder, files = listing
    assert [f.path for f in files] == ["config.json", "sub/model-00001.safetensors"]
    assert verify(folder, files) == []


def test_verify_names_missing_truncated_and_corrupt_files(listing):
    folder, files = listing
    (folder / "config.json").write_bytes(b'{"model_type": "chatglX"}')  # same size, other content
    (folder / "sub/model-00001.safetensors").write_bytes(b"\x00" * 10)
    extra = RemoteFile("tokenizer.model", 5, None)
    problems = verify(folder, [*files, extra])
    assert any(p.startswith("config.json: sha256") for p in problems)
    assert any("model-00001.safetensors: 10 bytes, expected 1000" in p for p in problems)
    assert "tokenizer.model: missing" in problems
    assert not any(p.startswith("config.json") for p in verify(folder, files, hash_files=False))
