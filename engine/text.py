"""Output text, built incrementally: each new token costs two small decodes, not a full re-decode.

FastChat's stock worker re-decodes the whole output every `stream_interval` tokens (quadratic in
the answer length). Here the decoded text only grows: the incomplete tail of a multi-byte UTF-8
character (decoded as U+FFFD) is held back until the next token completes it, so streamed
Chinese never shows replacement characters. Stop strings are cut, and a tail that could still
become a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Tokens of the prompt decoded along with the output, so the first output token gets the
# right leading space (SentencePiece/BPE decoders strip it at the start of a sequence).
CONTEXT_TOKENS = 5
_DECODE = {"skip_special_tokens": True, "spaces_between_special_tokens": False,
           "clean_up_tokenization_spaces": False}


@dataclass
class IncrementalText:
    tokenizer: object
    prompt_ids: list[int]
    # Text the model writes before its answer proper, cut once from the answer's start (ChatGLM3's metadata
    # line ends in a newline after <|assistant|>); "" for none.
    drop_leading: str = ""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    _prefix: int = 0
    _read: int = 0
    _pending: str = ""

    def __post_init__(self) -> None:
        self.ids = list(self.prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **_DECODE)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly completed text (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return self._append(delta)
        return ""

    def _append(self, delta: str) -> str:
        if self.drop_leading and not self.text:
            # Held until the answer is long enough to tell whether it begins with the text to drop.
            pending = self._pending + delta
            if len(pending) < len(self.drop_leading) and self.drop_leading.startswith(pending):
                self._pending = pending
                return ""
            self._pending = ""
            delta = pending[len(self.drop_leading):] if pending.startswith(self.drop_leading) else pending
            self.drop_leading = ""
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back, minus an unfinished character."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:]).rstrip("\ufffd")
        delta = after[len(before):] if len(after) > len(before) else ""
        self._prefix = self._read = len(self.ids)
        delta = self._append(delta)
        if self._pending:  # the answer ended before it could tell: what was held is answer text
            held, self._pending, self.drop_leading = self._pending, "", ""
            self.text += held
            delta += held
        return delta


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string at or after `start` (-1 if none)."""
    hits = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(hits) if hits else -1


def partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class StopText:
    """Applies stop strings to growing text; `visible` is what may be sent to the client."""

    stops: tuple[str, ...]
    text: str = ""
    stopped: bool = False

    def extend(self, delta: str) -> None:
        if self.stopped or not delta:
            return
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, len(self.text) - longest + 1)
        self.text += delta
        pos = find_stop(self.text, self.stops, start)
        if pos != -1:
            self.text = self.text[:pos]
            self.stopped = True

    def visible(self, final: bool = False) -> str:
        if self.stopped or final:
            return self.text
        hold = partial_stop_len(self.text, self.stops)
        return self.text[: len(self.text) - hold] if hold else self.text
