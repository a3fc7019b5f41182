"""Qwen-7B-Chat (qwen/Qwen-7B-Chat): remote code, ChatML, dtype flags set from the config.

Stock FastChat's QwenChatAdapter matches any path containing "qwen" (so Qwen2.x folders get it
too) and forces `config.fp16 = True`, which fails or crawls on CPU ("addmm_impl_cpu_ not
implemented for 'Half'"). Qwen's remote code casts the whole model by its `bf16`/`fp16`/`fp32`
flags, so the flags must say the configured CPU dtype. Matched by model_type "qwen" (Qwen v1
only; Qwen2.x is "qwen2" and goes to the chat-template adapter).
"""

from __future__ import annotations

import re

import torch
from fastchat.conversation import Conversation, get_conv_template
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from worker_adapters import adapter
from worker_adapters.checkpoint import CheckpointInfo, read_checkpoint
from worker_adapters.common import CheckpointAdapter, ensure_dtype, with_stop_ids
from worker_adapters.message_text import keep_message_text, register_conversation
from worker_adapters.policy import check_remote_code, cpu_dtype, implementation_for
from worker_adapters.shims import apply_import_shims

CHATML_STOP_IDS = (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>
# Every control-token string of qwen.tiktoken's tokenizer: make_context encodes message text with
# allowed_special=set(), so none of these typed in a message may become a control token.
CONTROL_TOKENS = re.compile(r"<\|(?:endoftext|im_start|im_end|extra_\d+)\|>")
# make_context encodes every message's content on its own: marking it always gives its ids exactly.
register_conversation("qwen-7b-chat", CONTROL_TOKENS, always=True)


def set_precision_flags(config, dtype: torch.dtype) -> None:
    config.bf16 = dtype == torch.bfloat16
    config.fp16 = False
    config.fp32 = dtype == torch.float32


@adapter
class QwenChatAdapter(CheckpointAdapter):
    def match_checkpoint(self, info: CheckpointInfo) -> bool:
        return info.model_type == "qwen"

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        info = read_checkpoint(model_path)
        dtype = cpu_dtype(model_path, from_pretrained_kwargs.get("torch_dtype"))
        if implementation_for(model_path) == "native":
            # Qwen2ForCausalLM and a tokenizer built from qwen.tiktoken: no remote code runs (native_loader.py).
            from worker_adapters.native_loader import load_native
            from worker_adapters.native_tokenizers import load_qwen_tokenizer

            return load_native(info.path, dtype), keep_message_text(load_qwen_tokenizer(info.path))
        check_remote_code(model_path, info.auto_map or {"AutoModelForCausalLM": "modeling_qwen"})
        apply_import_shims()
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
        set_precision_flags(config, dtype)
        if hasattr(config, "use_flash_attn"):
            config.use_flash_attn = False  # CUDA-only; "auto" would try to import it
        model = AutoModelForCausalLM.from_pretrained(
            model_path, config=config, torch_dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=True
        ).eval()
        tokenizer = keep_message_text(AutoTokenizer.from_pretrained(model_path, trust_remote_code=True))
        return ensure_dtype(model, dtype), tokenizer

    def get_default_conv_template(self, model_path: str) -> Conversation:
        # FastChat's `qwen-7b-chat` is the model card's ChatML (make_context) with its default system.
        return get_conv_template("qwen-7b-chat")

    def generate_stream_function(self, model, model_path: str):
        from fastchat.serve.inference import generate_stream

        return with_stop_ids(generate_stream, CHATML_STOP_IDS)
