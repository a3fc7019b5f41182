"""ChatGLM3-6B's prompt format: FastChat's `chatglm3` template text back into messages, and into the ids of
the published `build_chat_input`. Shared by the adapter (remote path) and the native tokenizer."""

from __future__ import annotations

from worker_adapters import message_text

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_ROLE_RE = message_text.markers_pattern(ROLE_TOKENS)
# build_chat_input encodes message text with sentencepiece alone: a role token typed in a message is text.
message_text.register_conversation("chatglm3", _ROLE_RE)


def parse_prompt(prompt: str) -> list[dict]:
    """The `chatglm3` template's text back into messages (role token, newline, content). Only the
    template's role tokens start a message: a role token inside marked message text is text."""
    messages: list[dict] = []
    for is_text, piece in message_text.pieces(prompt):
        if is_text:
            if not messages:
                messages.append({"role": "user", "content": ""})
            messages[-1]["content"] += piece
            continue
        pos = 0
        for m in _ROLE_RE.finditer(piece):
            if messages:
                messages[-1]["content"] += piece[pos:m.start()]
            messages.append({"role": m.group(0)[2:-2], "content": ""})
            pos = m.end()
        if messages:
            messages[-1]["content"] += piece[pos:]
        elif piece:
            messages.append({"role": "user", "content": piece})
    for msg in messages:
        msg["content"] = msg["content"][1:] if msg["content"].startswith("\n") else msg["content"]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the trailing "<|assistant|>" generation prompt
    if not messages:
        messages = [{"role": "user", "content": prompt}]
    return messages


def build_input_ids(tokenizer, prompt: str) -> list[int]:
    messages = parse_prompt(prompt)
    last = messages[-1]
    role = last["role"] if last["role"] in ("user", "observation") else "user"
    inputs = tokenizer.build_chat_input(query=last["content"], history=messages[:-1], role=role)
    return inputs["input_ids"][0].tolist()
