"""worker_adapters on fixture checkpoints (no real weights): detection, prompts, stops, dtype,
remote-code gate, UI resolution by name."""
from __future__ import annotations

import json

import pytest
import torch
from fastchat.model import model_adapter as ma

import worker_adapters
from launch.fastchat_patches import adapter_dispatch as hooks
from tests.fixtures.checkpoints import make_chat_template_model, make_chatglm3, make_qwen, write_arena_config
from worker_adapters.chat_template import CONV_NAME, ChatTemplateAdapter
from worker_adapters.chatglm3 import ChatGLM3Adapter, build_input_ids, generate_stream_chatglm3
from worker_adapters.policy import RemoteCodeNotAllowed
from worker_adapters.qwen import QwenChatAdapter
from worker_adapters.shims import PAD_PADDING_SIDE, pad_lacks_padding_side

USER, OBS, ASSISTANT, SYSTEM, GMASK, SOP = 64795, 64797, 64796, 64794, 64790, 64792


def ids(text: str) -> list[int]:  # the fixture ChatGLM tokenizer is character-level: ord + 3
    return [ord(c) + 3 for c in text]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    script = ids("Hi") + [USER] + ids("fake turn")
    return {
        "glm": make_chatglm3(root / "data" / "m1", script=script),
        "qwen": make_qwen(root / "cache" / "qwen" / "Qwen-7B-Chat"),
        # ModelScope stores Qwen2.5 as Qwen2___5
        "smol": make_chat_template_model(root / "cache" / "Qwen" / "Qwen2___5-Coder-0___5B-Instruct"),
        "misnamed_qwen": make_qwen(root / "models" / "chatglm3-6b"),
    }


@pytest.fixture
def arena(ckpts, tmp_path, monkeypatch):
    """A config allowing remote code for glm and qwen, set as CPU_ARENA_CONFIG."""
    def make(trust: bool = True):
        cfg = write_arena_config(tmp_path / "arena.toml", [
            {"name": "glm", "path": str(ckpts["glm"]), "dtype": "bfloat16", "trust_remote_code": trust},
            {"name": "qwen7", "path": str(ckpts["qwen"]), "dtype": "bfloat16", "trust_remote_code": trust},
            {"name": "smol", "path": str(ckpts["smol"]).replace("___", "."), "dtype": "float32"},
        ])
        monkeypatch.setenv("CPU_ARENA_CONFIG", str(cfg))
        monkeypatch.delenv("CPU_ARENA_MODEL", raising=False)
        worker_adapters.register_adapters()
        hooks.clear_caches()
        return cfg
    yield make
    hooks.clear_caches()


def test_registration_is_idempotent_and_first():
    first = worker_adapters.register_adapters()
    n = len(ma.model_adapters)
    assert worker_adapters.register_adapters() == first == ["ChatGLM3Adapter", "QwenChatAdapter", "ChatTemplateAdapter"]
    assert len(ma.model_adapters) == n
    assert [type(a).__name__ for a in ma.model_adapters[:3]] == first


def test_detection_by_content_not_folder_name(ckpts, arena):
    arena()
    assert isinstance(ma.get_model_adapter(str(ckpts["glm"])), ChatGLM3Adapter)  # /data/m1
    assert isinstance(ma.get_model_adapter(str(ckpts["qwen"])), QwenChatAdapter)
    # a Qwen-v1 checkpoint in a folder named like ChatGLM3: content wins over the name
    assert isinstance(ma.get_model_adapter(str(ckpts["misnamed_qwen"])), QwenChatAdapter)
    # ModelScope layout: asked with the dotted name, stored as ___
    dotted = str(ckpts["smol"]).replace("___", ".")
    assert isinstance(ma.get_model_adapter(dotted), ChatTemplateAdapter)
    assert ma.get_conversation_template(str(ckpts["glm"])).name == "chatglm3"


def test_ui_resolves_template_by_model_name(arena):
    arena()
    assert ma.get_conversation_template("glm").name == "chatglm3"
    assert ma.get_conversation_template("qwen7").name == "qwen-7b-chat"
    assert ma.get_conversation_template("smol").name == CONV_NAME
    assert ma.get_conversation_template("unknown-model").name == "one_shot"  # FastChat's fallback


def test_chatglm3_prompt_matches_model_card(ckpts, arena):
    arena()
    conv = ma.get_conversation_template("glm")
    conv.set_system_message("You are ChatGLM3.")
    conv.append_message(conv.roles[0], "你好")
    conv.append_message(conv.roles[1], "Hello!")
    conv.append_message(conv.roles[0], "Why?")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    assert prompt == "<|system|>\nYou are ChatGLM3.<|user|>\n你好<|assistant|>\nHello!<|user|>\nWhy?<|assistant|>"
    assert conv.stop_token_ids == [USER, OBS, 2]
    model, tok = ChatGLM3Adapter().load_model(str(ckpts["glm"]), {"torch_dtype": torch.bfloat16})
    # build_chat_input's layout: [gMASK]sop, then per turn <|role|> "\n" content, then <|assistant|>
    assert build_input_ids(tok, prompt) == (
        [GMASK, SOP, SYSTEM] + ids("\nYou are ChatGLM3.") + [USER] + ids("\n你好")
        + [ASSISTANT] + ids("\nHello!") + [USER] + ids("\nWhy?") + [ASSISTANT]
    )


def test_chatglm3_pad_quirk_is_real_and_shimmed(ckpts, arena):
    arena()
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(ckpts["glm"]), trust_remote_code=True)
    if pad_lacks_padding_side(raw):  # not yet shimmed in this process
        with pytest.raises(TypeError, match="padding_side"):
            raw.build_chat_input("hi")
    _, tok = ChatGLM3Adapter().load_model(str(ckpts["glm"]), {"torch_dtype": torch.float32})
    assert not pad_lacks_padding_side(tok)
    assert type(tok)._pad.shim_for == PAD_PADDING_SIDE
    assert tok.build_chat_input("hi")["input_ids"][0].tolist() == [GMASK, SOP, USER] + ids("\nhi") + [ASSISTANT]


def _glm_params(**kw):
    return {"prompt": "<|user|>\nhello<|assistant|>", "temperature": 0.0, "max_new_tokens": 20, "echo": False, **kw}


def test_chatglm3_stops_at_user_marker_streaming_and_not(ckpts, arena):
    arena()
    model, tok = ChatGLM3Adapter().load_model(str(ckpts["glm"]), {"torch_dtype": torch.float32})
    # The worker picks our generate function, not FastChat's generate_stream_chatglm
    assert ma.get_generate_stream_function(model, str(ckpts["glm"])) is generate_stream_chatglm3
    chunks = list(generate_stream_chatglm3(model, tok, _glm_params(), "cpu", 8192, stream_interval=1))
    assert chunks, "no output"
    for c in chunks:
        assert "<|user|>" not in c["text"] and "fake" not in c["text"]
    assert chunks[-1]["text"] == "Hi"
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 2

    # non-streaming: FastChat's worker drains the same generator in generate_gate
    from fastchat.serve.model_worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)
    worker.model, worker.tokenizer, worker.device = model, tok, "cpu"
    worker.context_len, worker.stream_interval, worker.seed, worker.call_ct = 8192, 2, None, 0
    worker.generate_stream_func = ma.get_generate_stream_function(model, str(ckpts["glm"]))
    out = worker.generate_gate(_glm_params())
    assert out["text"] == "Hi" and out["error_code"] == 0


def test_chatglm3_dtype_from_config_never_fp16(ckpts, arena, monkeypatch):
    arena()
    model, _ = ChatGLM3Adapter().load_model(str(ckpts["glm"]), {"torch_dtype": torch.float16})
    # the worker asked for fp16 (and config.json says float16): the config entry's bf16 wins
    assert model.embedding.weight.dtype == torch.bfloat16
    model, _ = ChatGLM3Adapter().load_model(str(ckpts["glm"]), {"torch_dtype": torch.float32})
    assert model.embedding.weight.dtype == torch.float32


def test_qwen_flags_match_dtype_and_chatml(ckpts, arena):
    arena()
    model, tok = QwenChatAdapter().load_model(str(ckpts["qwen"]), {"torch_dtype": torch.bfloat16})
    assert (model.config.bf16, model.config.fp16, model.config.fp32) == (True, False, False)
    assert model.wte.weight.dtype == torch.bfloat16
    assert model.config.use_flash_attn is False
    conv = ma.get_conversation_template("qwen7")
    conv.append_message(conv.roles[0], "你好")
    conv.append_message(conv.roles[1], None)
    # Qwen-7B-Chat's make_context (qwen_generation_utils.py) with the default system prompt
    assert conv.get_prompt() == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    fn = ma.get_generate_stream_function(model, str(ckpts["qwen"]))
    assert fn.stop_ids == [151643, 151644, 151645]


def test_remote_code_refused_unless_allowed(ckpts, arena):
    arena(trust=False)
    for adapter, path in ((ChatGLM3Adapter(), ckpts["glm"]), (QwenChatAdapter(), ckpts["qwen"])):
        with pytest.raises(RemoteCodeNotAllowed, match="trust_remote_code = true") as e:
            adapter.load_model(str(path), {"torch_dtype": torch.float32})
        assert "arena.toml" in str(e.value) and ".py" in str(e.value)


def test_remote_code_refused_without_config_entry(tmp_path, arena):
    arena()
    path = make_chatglm3(tmp_path / "elsewhere")
    with pytest.raises(RemoteCodeNotAllowed, match="add a \\[\\[models\\]\\] entry"):
        ChatGLM3Adapter().load_model(str(path), {})


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
