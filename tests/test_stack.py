"""The real stack with both embedded models: the foundation's end-to-end promise."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from launch.state import pid_alive, read_state
from tests.stackutil import default_models, free_ports_config, stack_for

pytestmark = pytest.mark.stack


def test_every_configured_model_is_listed(stack, stack_client):
    listed = {m.id for m in stack_client.models.list().data}
    assert listed == {m.name for m in stack.cfg.models}


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_chat_completion_non_streaming(stack_client, model):
    r = stack_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=48,
    )
    text = r.choices[0].message.content
    assert text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "paris" in text.lower(), text
    assert r.usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_chat_completion_streaming(stack_client, model):
    stream = stack_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name one primary colour."}],
        temperature=0, max_tokens=24, stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts).strip()
    assert finish in ("stop", "length")


def test_qwen_answers_chinese_in_chinese(stack_client):
    r = stack_client.chat.completions.create(
        model="qwen2.5-coder-0.5b",
        messages=[{"role": "user", "content": "明明明明明白白白喜欢他，可她就是不说。这句话里，明明和白白谁喜欢谁？"}],
        temperature=0, max_tokens=64,
    )
    text = r.choices[0].message.content
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert cjk >= 5, text
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_ui_answers_http_200(stack):
    r = httpx.get(stack.ui_url, timeout=30)
    assert r.status_code == 200
    assert "gradio" in r.text.lower()


def test_status_shows_every_service_alive_and_registered(stack):
    out = stack.launch("status").stdout
    for name in ["controller", "api", "ui", "worker:smollm2-135m", "worker:qwen2.5-coder-0.5b"]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert " yes " in line, line
    assert "registered models: qwen2.5-coder-0.5b, smollm2-135m" in out


def test_failed_start_reports_the_service_and_leaves_nothing(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights, no tokenizer
    models = default_models(["smollm2-135m"], name="broken", path=str(broken))
    st = stack_for(free_ports_config(tmp_path, models=models, startup_timeout=240))
    proc = st.launch("up", check=False)
    assert proc.returncode != 0
    assert "worker:broken" in proc.stdout and "FAILED" in proc.stdout
    state = read_state(st.run_dir)
    assert state.phase == "failed"
    assert not any(pid_alive(s.pid) for s in state.services.values())
    assert not pid_alive(state.supervisor_pid)
    # down after a failure, and twice, is harmless
    assert st.down().returncode == 0 and st.down().returncode == 0


def test_up_refuses_a_port_in_use_before_starting_anything(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        st = stack_for(free_ports_config(tmp_path, api_port=port))
        proc = subprocess.run([sys.executable, "-m", "launch", "up", "--config", str(st.config_path)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"server.api_port = {port} is already in use" in proc.stderr
    assert read_state(st.run_dir) is None
