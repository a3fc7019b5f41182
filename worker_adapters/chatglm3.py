"""ChatGLM3-6B (ZhipuAI/chatglm3-6b): remote code, `chatglm3` prompt format, stops on its role tokens.

Stock FastChat gets it wrong on CPU in three ways: it matches by folder name only; its
generate_stream_chatglm calls the remote `stream_generate` with no stop ids, so the model runs
on past `<|user|>` / `<|observation|>` and invents the next turn (lm-sys/FastChat#2726, #3421);
and that remote helper breaks on transformers >= 4.43 (`_eos_token_tensor`), >= 4.49
(`_extract_past_from_model_output`). Here generation is a plain decode loop over the model's
forward (position ids supplied, as the remote prepare_inputs_for_generation would), stopping on
eos, `<|user|>` and `<|observation|>` (ids 2, 64795, 64797) before they reach the text. The
worker's non-streaming path consumes the same generator, so both paths stop the same way.
"""

from __future__ import annotations

import torch
from fastchat.conversation import Conversation, get_conv_template
from transformers import AutoModel, AutoTokenizer

from worker_adapters import adapter
from worker_adapters.chatglm3_prompt import ROLE_TOKENS, build_input_ids
from worker_adapters.checkpoint import CheckpointInfo, read_checkpoint
from worker_adapters.common import CheckpointAdapter, ensure_dtype, with_stop_ids
from worker_adapters.policy import check_remote_code, cpu_dtype, implementation_for
from worker_adapters.shims import apply_tokenizer_shims

STOP_TOKENS = ("<|user|>", "<|observation|>")
EOS_ID = 2
USER_ID, OBSERVATION_ID = 64795, 64797  # the published tokenizer's ids of <|user|> and <|observation|>


def is_chatglm3(info: CheckpointInfo) -> bool:
    if info.model_type != "chatglm":
        return False
    # ChatGLM2 shares model_type and config keys; ChatGLM3's tokenizer defines the role tokens.
    tokenizer_code = info.file_text("tokenization_chatglm.py")
    return (
        "<|observation|>" in tokenizer_code
        or "<|observation|>" in str(info.tokenizer_config)
        or "chatglm3" in str(info.config.get("_name_or_path", "")).lower()
    )


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.get_command(t) for t in STOP_TOKENS}
    ids.add(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID)
    return ids


def _clean(text: str) -> str:
    # After <|assistant|> the model writes "<metadata>\n"; plain chat has empty metadata.
    text = text[1:] if text.startswith("\n") else text
    for t in ROLE_TOKENS:  # belt and braces: a marker never reaches the caller
        cut = text.find(t)
        if cut != -1:
            text = text[:cut]
    return text


@torch.inference_mode()
def generate_stream_chatglm3(model, tokenizer, params, device, context_len=8192, stream_interval=2,
                             judge_sent_end=False):
    from fastchat.serve.inference import prepare_logits_processor

    prompt = params["prompt"]
    temperature = float(params.get("temperature", 1.0))
    max_new_tokens = int(params.get("max_new_tokens", 256))
    echo = bool(params.get("echo", True))
    stop_str = params.get("stop") or []
    stop_str = [stop_str] if isinstance(stop_str, str) else list(stop_str)
    stops = stop_ids(tokenizer) | set(params.get("stop_token_ids") or [])
    processor = prepare_logits_processor(
        temperature, float(params.get("repetition_penalty", 1.0)), float(params.get("top_p", 1.0)),
        int(params.get("top_k", -1)),
    )

    input_ids = build_input_ids(tokenizer, prompt)
    max_src = max(8, context_len - max_new_tokens - 1)
    if len(input_ids) > max_src:  # keep the [gMASK]sop prefix, drop the oldest turns' tokens
        input_ids = input_ids[:2] + input_ids[-(max_src - 2):]
    n_in = len(input_ids)
    dev = getattr(model, "device", device)
    past = None
    step_ids = torch.tensor([input_ids], device=dev)
    positions = torch.arange(n_in, device=dev).unsqueeze(0)
    output_ids: list[int] = []
    finish = "length"
    text = ""
    for i in range(max_new_tokens):
        out = model(input_ids=step_ids, position_ids=positions, past_key_values=past, use_cache=True,
                    return_dict=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if processor:
            logits = processor(torch.tensor([input_ids + output_ids], device=dev), logits)
        if not torch.isfinite(logits).all():  # as ChatGLM's InvalidScoreLogitsProcessor
            logits = torch.nan_to_num(logits, nan=-1e4, posinf=1e4, neginf=-1e4)
        if temperature < 1e-5:
            token = int(torch.argmax(logits, dim=-1))
        else:
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1))
        if token in stops:
            finish = "stop"
            break
        output_ids.append(token)
        text = _clean(tokenizer.decode(output_ids))
        hit = min((p for p in (text.find(s) for s in stop_str) if p != -1), default=-1)
        if hit != -1:
            text, finish = text[:hit], "stop"
            break
        if i % stream_interval == 0:
            yield _chunk(prompt, text, echo, n_in, len(output_ids), None)
        step_ids = torch.tensor([[token]], device=dev)
        positions = torch.tensor([[n_in + len(output_ids) - 1]], device=dev)
    yield _chunk(prompt, text, echo, n_in, len(output_ids), finish)


def _chunk(prompt: str, text: str, echo: bool, n_in: int, n_out: int, finish):
    return {
        "text": (prompt + text) if echo else text,
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        "finish_reason": finish,
    }


@adapter
class ChatGLM3Adapter(CheckpointAdapter):
    def match_checkpoint(self, info: CheckpointInfo) -> bool:
        return is_chatglm3(info)

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        info = read_checkpoint(model_path)
        dtype = cpu_dtype(model_path, from_pretrained_kwargs.get("torch_dtype"))
        if implementation_for(model_path) == "native":
            # GlmForCausalLM and a sentencepiece tokenizer of the project's own: no remote code runs. The
            # tokenizer turns the rendered prompt into build_chat_input's ids itself (native_tokenizers.py).
            from worker_adapters.native_loader import load_native
            from worker_adapters.native_tokenizers import load_chatglm3_tokenizer

            return load_native(info.path, dtype), load_chatglm3_tokenizer(info.path)
        check_remote_code(model_path, info.auto_map or {"AutoModel": "modeling_chatglm"})
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
        apply_tokenizer_shims(tokenizer)
        # config.json says float16; the requested CPU dtype wins (bf16 or fp32, never fp16).
        model = AutoModel.from_pretrained(
            model_path, torch_dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=True
        ).eval()
        return ensure_dtype(model, dtype), tokenizer

    def get_default_conv_template(self, model_path: str) -> Conversation:
        # FastChat's own `chatglm3` template is the model card's format; its stop ids are 64795, 64797, 2.
        return get_conv_template("chatglm3")

    def generate_stream_function(self, model, model_path: str):
        if getattr(model.config, "model_type", "") == "glm":
            # Native: an ordinary causal LM fed tokenizer(prompt), so the batching engine serves it. The answer
            # begins after ChatGLM3's (empty) metadata line: its newline is not answer text.
            from fastchat.serve.inference import generate_stream

            return with_stop_ids(generate_stream, (EOS_ID, USER_ID, OBSERVATION_ID), drop_leading="\n")
        return generate_stream_chatglm3
