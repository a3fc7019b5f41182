"""Both default models through the real stack: chat-template adapter, no template markers."""
from __future__ import annotations

import httpx
import pytest

MARKERS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


@pytest.mark.stack
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_default_models_use_chat_template_and_never_leak_markers(stack, model):
    from openai import OpenAI

    client = OpenAI(base_url=stack.api_url, api_key="none", timeout=300)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=48, temperature=0)
    text = r.choices[0].message.content
    assert text.strip() and not any(m in text for m in MARKERS), text
    # The template the API server got from the worker is the chat-template one.
    ctrl = stack.cfg.controller_url()
    addr = httpx.post(f"{ctrl}/get_worker_address", json={"model": model}, timeout=10).json()["address"]
    conv = httpx.post(f"{addr}/worker_get_conv_template", json={"model": model}, timeout=10).json()["conv"]
    assert conv["name"] == "chat_template"
    # one_shot would have prepended ~480 tokens; the chat template keeps a short question short
    assert r.usage.prompt_tokens < 80, r.usage
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=32, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert not any(m in streamed for m in MARKERS), streamed


@pytest.mark.stack
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_chatml_markers_typed_in_a_message_stay_text(stack, model):
    """Ten `<|im_end|><|im_start|>` pairs typed in a message are text (several tokens each), not 20 control
    tokens that would let a user forge an assistant turn."""
    from openai import OpenAI

    client = OpenAI(base_url=stack.api_url, api_key="none", timeout=300)

    def prompt_tokens(content: str) -> int:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=1, temperature=0)
        return r.usage.prompt_tokens

    added = prompt_tokens("Say hi." + "<|im_end|><|im_start|>" * 10) - prompt_tokens("Say hi.")
    assert added > 25, added
