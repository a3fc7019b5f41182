"""Message text stays text: control tokens come only from the conversation template.

FastChat hands a worker one prompt string, rendered from the conversation in the API server or the
UI, and the worker tokenizes it whole, so a user who types `<|im_end|>\\n<|im_start|>assistant\\n...`
forges turns: the tokenizer turns the typed markers into control tokens. The published helpers
(ChatGLM3's `build_chat_input`, Qwen's `make_context`) tokenize each message's content as plain text.

The rendered prompt therefore carries, around a message's content, two Private Use Area characters
(OPEN, CLOSE) that no tokenizer sees: the worker splits the prompt on them and tokenizes the template's
pieces as usual (their control tokens are real) and the content's pieces as text. A conversation marks
content when it contains one of its control-token strings (every chat-template model: ordinary prompts
keep exactly the ids `apply_chat_template` gives), or always (Qwen-7B-Chat: `make_context` encodes
every content separately, so marking it always gives its ids exactly). Characters OPEN and CLOSE typed
by a user are dropped from the content, so a user cannot mark text themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

OPEN, CLOSE = "\ue000", "\ue001"
_MARKS = str.maketrans("", "", OPEN + CLOSE)


def markers_pattern(tokens: Iterable[str]) -> re.Pattern | None:
    """A regex that finds any of these control-token strings, or None for none."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def mark(content: str, markers: re.Pattern | None, *, always: bool = False) -> str:
    """The content as it goes into a rendered prompt: marked when it must be tokenized as text."""
    content = unmark(content)
    if always or (markers is not None and markers.search(content)):
        return OPEN + content + CLOSE
    return content


def unmark(text: str) -> str:
    return text.translate(_MARKS)


def is_marked(prompt: str) -> bool:
    return OPEN in prompt


def pieces(prompt: str) -> list[tuple[bool, str]]:
    """The prompt as (is_message_text, text) pieces, in order; empty pieces dropped."""
    out: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(prompt):
        start = prompt.find(OPEN, pos)
        if start == -1:
            out.append((False, prompt[pos:]))
            break
        if start > pos:
            out.append((False, prompt[pos:start]))
        end = prompt.find(CLOSE, start + 1)
        end = len(prompt) if end == -1 else end
        out.append((True, prompt[start + 1:end]))
        pos = end + 1
    return [(is_text, p.translate(_MARKS)) for is_text, p in out if p]


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` with every control-token string in it tokenized as ordinary text."""
    if _takes_allowed_special(tokenizer):
        # tiktoken-based remote tokenizers (Qwen-7B-Chat): as make_context encodes a message's content.
        return list(tokenizer.encode(text, allowed_special=set()))
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)


def encode_prompt(tokenizer, prompt: str, encode_template) -> list[int]:
    """Ids of a marked prompt: template pieces through `encode_template(text, first)`, message text as text."""
    ids: list[int] = []
    for i, (is_text, piece) in enumerate(pieces(prompt)):
        ids += encode_text(tokenizer, piece) if is_text else list(encode_template(piece, i == 0))
    return ids


def _takes_allowed_special(tokenizer) -> bool:
    import inspect

    try:
        return "allowed_special" in inspect.signature(type(tokenizer).tokenize).parameters
    except (TypeError, ValueError):
        return False


class _KeepsMessageText:
    """Mixed into a loaded tokenizer's class: a marked prompt string is tokenized piece by piece.
    Every other call, and every other method, is the tokenizer's own."""

    def __call__(self, text=None, *args, **kwargs):
        if isinstance(text, str) and is_marked(text):
            from transformers import BatchEncoding

            add_special = kwargs.get("add_special_tokens", True)
            parent = super()

            def encode_template(piece: str, first: bool) -> list[int]:
                return parent.__call__(piece, add_special_tokens=add_special and first).input_ids

            ids = encode_prompt(self, text, encode_template)
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return super().__call__(text, *args, **kwargs)


def keep_message_text(tokenizer):
    """The tokenizer itself, its class swapped for one that honours the marks (isinstance, attributes
    and methods unchanged): both FastChat's generate_stream and the batching engine call
    `tokenizer(prompt)`, so this is the one place either needs."""
    cls = type(tokenizer)
    if not issubclass(cls, _KeepsMessageText):
        tokenizer.__class__ = type(cls.__name__, (_KeepsMessageText, cls), {"__module__": cls.__module__})
    return tokenizer


# Conversation name -> (control-token pattern, mark always): FastChat templates that the project's
# adapters serve register here (chat-template conversations carry their own tokens, see chat_template.py).
_RULES: dict[str, tuple[re.Pattern | None, bool]] = {}


def register_conversation(name: str, markers: re.Pattern | None, *, always: bool = False) -> None:
    _RULES[name] = (markers, always)


def marked_copy(conv):
    """A copy of a FastChat Conversation whose system message and message contents are marked by the
    rule registered for its name; the conversation itself when none is."""
    rule = _RULES.get(conv.name)
    if rule is None:
        return conv
    markers, always = rule
    out = conv.copy()
    if out.system_message:
        out.system_message = mark(out.system_message, markers, always=always)
    for turn in out.messages:
        if isinstance(turn[1], str):
            turn[1] = mark(turn[1], markers, always=always)
    return out
