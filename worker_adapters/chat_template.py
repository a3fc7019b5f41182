"""Any checkpoint whose tokenizer carries a chat template (SmolLM2, Qwen2.x, Llama-style).

The prompt is rendered by the tokenizer's own Jinja template, with transformers' renderer, so it
is exactly what `tokenizer.apply_chat_template` produces. FastChat has no such template style:
its Conversation builds prompts from a fixed `sep_style`, and without a matching adapter such a
model falls back to `one_shot` (a long canned conversation is prepended).

How the template travels: the conversation is named CONV_NAME and its `system_template` field
carries the template and special tokens as JSON. FastChat ships conversations between processes
as plain dicts (the API server rebuilds a bare `Conversation` from the worker's
/worker_get_conv_template answer, `copy()` returns a bare `Conversation` too), so a subclass
would be lost; the field survives every copy, and the `adapter_dispatch` patch routes `get_prompt` here by name.
`system_template` is otherwise only read by `get_prompt`, which this replaces.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastchat.conversation import Conversation, SeparatorStyle
from transformers import AutoModelForCausalLM

from worker_adapters import adapter, message_text
from worker_adapters.checkpoint import CheckpointInfo, read_checkpoint
from worker_adapters.common import CheckpointAdapter, ensure_dtype, load_tokenizer, with_stop_ids
from worker_adapters.policy import check_remote_code, cpu_dtype

CONV_NAME = "chat_template"
# End-of-turn / turn-start markers: when a template uses one and the vocabulary has it as a
# single token, generating it means the answer is over (or a new turn is being invented).
TURN_MARKERS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")


def _eos_ids(generation_config: dict) -> list[int]:
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


@lru_cache(maxsize=32)
def _template_spec(path: Path) -> tuple[str, int, ...]:
    """(conversation payload JSON, stop ids...) for a checkpoint; cached: the UI asks per chat."""
    info = read_checkpoint(path)
    template = info.chat_template
    trust = check_remote_code(path, info.auto_map) if info.auto_map else False
    tok = load_tokenizer(path, info, trust_remote_code=trust)
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    # FastChat's generate_stream tokenizes the prompt with special tokens added; if the tokenizer
    # adds BOS itself and the template writes it too, the model would see two BOS tokens.
    strip_bos = None
    bos = tok.bos_token
    if bos and tok.bos_token_id is not None:
        ids = tok("x").input_ids
        if ids and ids[0] == tok.bos_token_id:
            strip_bos = bos
    stop_ids = _eos_ids(info.generation_config)
    markers = []
    vocab = tok.get_vocab()
    for m in TURN_MARKERS:
        if m in template and m in vocab:
            markers.append(m)
            stop_ids.append(vocab[m])
    if tok.eos_token_id is not None:
        stop_ids.append(tok.eos_token_id)
        if tok.eos_token and tok.eos_token not in markers:
            markers.append(tok.eos_token)
    stop_ids = list(dict.fromkeys(stop_ids))
    # Every control-token string the tokenizer would parse inside a prompt: message text containing
    # one is marked, so it is tokenized as text (message_text.py).
    control = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special} | set(special.values()))
    payload = json.dumps(
        {"chat_template": template, "special_tokens": special, "strip_bos": strip_bos, "stop_str": markers,
         "control_tokens": control},
        ensure_ascii=False,
    )
    return (payload, *stop_ids)


def conversation_for(path: Path) -> Conversation:
    payload, *stop_ids = _template_spec(Path(path))
    return Conversation(
        name=CONV_NAME,
        system_template=payload,
        system_message="",
        roles=("user", "assistant"),
        messages=[],
        sep_style=SeparatorStyle.ADD_COLON_SINGLE,  # unused: get_prompt is routed to render_prompt
        sep="",
        stop_str=json.loads(payload)["stop_str"] or None,
        stop_token_ids=list(stop_ids),
    )


def to_messages(conv: Conversation, markers=None) -> tuple[list[dict], bool]:
    """FastChat's (role, message) list as chat messages; True when the last turn awaits the model.
    markers: control-token pattern; message text containing one is marked (message_text.mark)."""

    def text(content: str) -> str:
        return message_text.mark(content, markers) if markers is not None else content

    messages = []
    if conv.system_message:
        messages.append({"role": "system", "content": text(conv.system_message)})
    pending = False
    for role, msg in conv.messages[conv.offset:]:
        if msg is None:
            pending = True
            continue
        if isinstance(msg, tuple):  # (text, images): text only, these models are not multimodal
            msg = msg[0]
        messages.append({"role": "user" if role == conv.roles[0] else "assistant", "content": text(msg)})
    return messages, pending


def render_prompt(conv: Conversation) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    spec = json.loads(conv.system_template)
    messages, pending = to_messages(conv, message_text.markers_pattern(spec.get("control_tokens") or ()))
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=spec["chat_template"],
        add_generation_prompt=pending,
        **spec["special_tokens"],
    )
    text = rendered[0]
    bos = spec.get("strip_bos")
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


@adapter
class ChatTemplateAdapter(CheckpointAdapter):
    """Prompt from the tokenizer's chat template, stop ids from generation_config + tokenizer."""

    def match_checkpoint(self, info: CheckpointInfo) -> bool:
        return info.chat_template is not None

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        info = read_checkpoint(model_path)
        trust = check_remote_code(model_path, info.auto_map)
        dtype = cpu_dtype(model_path, from_pretrained_kwargs.get("torch_dtype"))
        tokenizer = message_text.keep_message_text(load_tokenizer(model_path, info, trust_remote_code=trust))
        model = AutoModelForCausalLM.from_pretrained(
            model_path, torch_dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=trust
        ).eval()
        return ensure_dtype(model, dtype), tokenizer

    def get_default_conv_template(self, model_path: str) -> Conversation:
        return conversation_for(read_checkpoint(model_path).path)

    def generate_stream_function(self, model, model_path: str):
        from fastchat.serve.inference import generate_stream

        return with_stop_ids(generate_stream, self.get_default_conv_template(model_path).stop_token_ids)
