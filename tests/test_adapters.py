"""worker_adapters: registration, ModelScope folder names, UI resolution by name, chat-template models (a tiny
Llama with SmolLM2's template), and what the ChatGLM3-6B fixture built from its published files shows here beyond
tests/test_lab_models.py (the non-streaming path, a requested fp32, the template's stop ids)."""
from __future__ import annotations

import json

import pytest
import torch
from fastchat.model import model_adapter as ma

import worker_adapters
from tests.fixtures.checkpoints import make_chat_template_model
from worker_adapters.chat_template import CONV_NAME, ChatTemplateAdapter
from worker_adapters.chatglm3 import ChatGLM3Adapter, _clean, build_input_ids, generate_stream_chatglm3

GLM = "chatglm3-6b"
USER, OBS = 64795, 64797


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    # ModelScope stores Qwen2.5 as Qwen2___5
    return {"smol": make_chat_template_model(root / "cache" / "Qwen" / "Qwen2___5-Coder-0___5B-Instruct")}


@pytest.fixture
def arena(ckpts, serve_config):
    """A config with the chat-template model (and, given lab_models, ChatGLM3-6B), set as CPU_ARENA_CONFIG."""
    def make(lab_models: dict | None = None, glm_dtype: str = "float32"):
        models = [{"name": "smol", "path": str(ckpts["smol"]).replace("___", "."), "dtype": "float32"}]
        if lab_models is not None:
            models.append({"name": GLM, "path": str(lab_models[GLM]), "dtype": glm_dtype, "trust_remote_code": True,
                           "implementation": "remote"})
        return serve_config(models)
    return make


def test_registration_is_idempotent_and_first():
    first = worker_adapters.register_adapters()
    n = len(ma.model_adapters)
    assert worker_adapters.register_adapters() == first == ["ChatGLM3Adapter", "QwenChatAdapter", "ChatTemplateAdapter"]
    assert len(ma.model_adapters) == n
    assert [type(a).__name__ for a in ma.model_adapters[:3]] == first


def test_detection_finds_a_modelscope_folder_by_its_dotted_name(ckpts, arena):
    arena()
    # ModelScope layout: asked with the dotted name, stored as ___
    dotted = str(ckpts["smol"]).replace("___", ".")
    assert isinstance(ma.get_model_adapter(dotted), ChatTemplateAdapter)


def test_ui_resolves_template_by_model_name(arena):
    arena()
    assert ma.get_conversation_template("smol").name == CONV_NAME
    assert ma.get_conversation_template("unknown-model").name == "one_shot"  # FastChat's fallback


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens of the model's forward over the whole sequence each step (no stop, no cache)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(torch.argmax(model(torch.tensor([ids + out])).logits[0, -1].float())))
    return out


def test_chatglm3_non_streaming_stops_like_streaming(lab_models, arena):
    """FastChat's worker drains the same generator for /worker_generate: it stops on <|user|> too. The k-th
    greedy token's output row is swapped with <|user|>'s, so the model emits <|user|> there."""
    arena(lab_models)
    model, tok = ChatGLM3Adapter().load_model(str(lab_models[GLM]), {})
    # the worker picks our generate function, not FastChat's generate_stream_chatglm
    assert ma.get_generate_stream_function(model, str(lab_models[GLM])) is generate_stream_chatglm3
    conv = ma.get_conversation_template(GLM)
    # the template's stop ids are the tokenizer's <|user|>, <|observation|> and eos
    assert conv.stop_token_ids == [USER, OBS, 2]
    assert [tok.get_command("<|user|>"), tok.get_command("<|observation|>"), tok.eos_token_id] == [USER, OBS, 2]
    conv.append_message(conv.roles[0], "你好")
    conv.append_message(conv.roles[1], None)
    params = {"prompt": conv.get_prompt(), "temperature": 0.0, "max_new_tokens": 32, "echo": False,
              "stop_token_ids": conv.stop_token_ids}
    first = _greedy(model, build_input_ids(tok, params["prompt"]), 6)
    k = next(i for i, t in enumerate(first) if t not in first[:i] and i >= 2)
    head = model.transformer.output_layer.weight
    rows = torch.tensor([first[k], USER])
    head.data[rows] = head.data[rows].flip(0)  # this model is loaded for this test only
    expected = _clean(tok.decode(first[:k]))

    chunks = list(generate_stream_chatglm3(model, tok, params, "cpu", 8192, stream_interval=1))
    assert chunks[-1]["text"] == expected and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == k
    assert all("<|user|>" not in c["text"] for c in chunks)

    from fastchat.serve.model_worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)
    worker.model, worker.tokenizer, worker.device = model, tok, "cpu"
    worker.context_len, worker.stream_interval, worker.seed, worker.call_ct = 8192, 2, None, 0
    worker.generate_stream_func = ma.get_generate_stream_function(model, str(lab_models[GLM]))
    out = worker.generate_gate(params)
    assert out["text"] == expected and out["error_code"] == 0
    assert out["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == k


def test_chatglm3_takes_a_requested_fp32_over_the_entry(lab_models, arena):
    """The worker's --dtype float32 wins over the entry's bfloat16 (and config.json's float16)."""
    arena(lab_models, glm_dtype="bfloat16")
    model, _ = ChatGLM3Adapter().load_model(str(lab_models[GLM]), {"torch_dtype": torch.float32})
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_chat_template_prompt_and_stops(ckpts, arena):
    arena()
    from transformers import AutoTokenizer

    path = str(ckpts["smol"])
    tok = AutoTokenizer.from_pretrained(path)
    conv = ma.get_conversation_template("smol")
    conv.append_message(conv.roles[0], "hello")
    conv.append_message(conv.roles[1], None)
    msgs = [{"role": "user", "content": "hello"}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert conv.get_prompt() == expected
    assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # with a system message, as the API server sets it
    conv.set_system_message("Be brief.")
    assert conv.get_prompt() == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *msgs], tokenize=False, add_generation_prompt=True)
    assert conv.stop_token_ids == [2, 1]  # generation_config eos (<|im_end|>), then <|im_start|> from the template
    # The API server rebuilds a bare Conversation from the worker's JSON: still the template
    from fastchat.conversation import Conversation, SeparatorStyle

    d = json.loads(json.dumps(conv.__dict__, default=int))
    rebuilt = Conversation(name=d["name"], system_template=d["system_template"], system_message=d["system_message"],
                           roles=d["roles"], messages=d["messages"], offset=d["offset"],
                           sep_style=SeparatorStyle(d["sep_style"]), sep=d["sep"], sep2=d["sep2"],
                           stop_str=d["stop_str"], stop_token_ids=d["stop_token_ids"])
    assert rebuilt.get_prompt() == conv.get_prompt() == conv.copy().get_prompt()


def test_chat_template_model_loads_configured_dtype(ckpts, arena):
    arena()
    model, _ = ChatTemplateAdapter().load_model(str(ckpts["smol"]), {"torch_dtype": None})
    assert next(model.parameters()).dtype == torch.float32  # entry says float32, config.json bf16
