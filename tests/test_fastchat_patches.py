"""Each FastChat patch: the upstream bug is still there without it, and gone with it."""

from __future__ import annotations

import json
import subprocess
import sys

from launch.fastchat_patches import PATCHES, apply_all

CHUNK = """
from fastchat.protocol.openai_api_protocol import (
    ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, DeltaMessage)
chunk = ChatCompletionStreamResponse(model="m", choices=[ChatCompletionResponseStreamChoice(
    index=0, delta=DeltaMessage(content="明明"), finish_reason=None)])
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_streaming_json_upstream_bug_exists_without_the_patch():
    # If this starts passing, fschat fixed #3140 and the patch can go.
    proc = _run(CHUNK + "chunk.json(exclude_unset=True, ensure_ascii=False)")
    assert proc.returncode != 0
    assert "ensure_ascii" in proc.stderr or "TypeError" in proc.stderr


def test_streaming_json_patched_chunk_serialises_like_openai():
    proc = _run("from launch.fastchat_patches import apply_all; apply_all()\n" + CHUNK +
                "print(chunk.json(exclude_unset=True, ensure_ascii=False))")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "明明" in proc.stdout  # UTF-8, not \\u escapes
    assert data["object"] == "chat.completion.chunk" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["delta"] == {"content": "明明"}


def test_apply_all_is_idempotent_and_applies_every_listed_patch():
    first = apply_all()
    assert apply_all() == first
    assert set(first) == set(PATCHES)


def test_every_patch_names_its_upstream_issue():
    import importlib

    for name in PATCHES:
        mod = importlib.import_module(f"launch.fastchat_patches.{name}")
        assert mod.UPSTREAM.startswith("https://"), name
        assert mod.__doc__ and len(mod.__doc__) > 40, f"{name}: say why the patch exists"
