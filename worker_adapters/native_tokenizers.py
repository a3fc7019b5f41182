"""Tokenizers for Qwen-7B-Chat and ChatGLM3-6B built from their data files alone, without their Python code.

Both checkpoints ship their tokenizer as remote code (`tokenization_qwen.py`, `tokenization_chatglm.py`),
which `trust_remote_code=True` would run. The files those classes read are plain data: `qwen.tiktoken` (one
base64 token and its rank per line) and `tokenizer.model` (a sentencepiece model). The classes here read
the same data and give the same ids and the same decoded text as the published tokenizers, so the native
serving path never imports a checkpoint's `.py` file.

- `load_qwen_tokenizer(folder)`: a transformers fast tokenizer (byte-level BPE, Qwen2's layout: NFC, the
  tiktoken split regex, merges derived from the ranks). Deriving the merges takes seconds, so the
  resulting tokenizer.json is cached per hash of `qwen.tiktoken`.
- `load_chatglm3_tokenizer(folder)`: the project's own sentencepiece tokenizer with ChatGLM3's nine command
  tokens, `get_command` and `build_chat_input`; `tokenizer(prompt)` on a prompt rendered by FastChat's
  `chatglm3` template gives build_chat_input's ids.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from tokenizers import AddedToken
from transformers import BatchEncoding, PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

log = logging.getLogger(__name__)

CACHE_ENV = "CPU_ARENA_TOKENIZER_CACHE"
DEFAULT_CACHE = Path("~/.cache/cpu-arena/tokenizers")

# ---------------------------------------------------------------------------------------------------------
# Qwen-7B-Chat
# ---------------------------------------------------------------------------------------------------------

QWEN_VOCAB_FILE = "qwen.tiktoken"
# tiktoken's split pattern and the special tokens, as the published tokenization_qwen.py defines them
# (PAT_STR; ENDOFTEXT, IMSTART, IMEND, then EXTRAS, numbered from SPECIAL_START_ID).
QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIAL_START_ID = 151643
QWEN_SPECIAL_TOKENS = (QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
# Part of the cache file's name: a change to how the tokenizer.json is derived must not reuse old files.
QWEN_CONVERSION_VERSION = 1

# The fast tokenizer's encode sets `encode_special_tokens` (how `split_special_tokens` reaches Rust) and its
# truncation/padding on the shared Rust object for each call, then encodes with the GIL released. Two
# threads encoding at once either get each other's settings or fail with "RuntimeError: Already borrowed"
# (a marked prompt alone switches split_special_tokens for every message). One lock makes each call's
# settings its own; decoding changes nothing and needs none.
_ENCODE_LOCK = threading.Lock()


class QwenNativeTokenizer(PreTrainedTokenizerFast):
    """Qwen-7B-Chat's tokenizer as a transformers fast tokenizer; see load_qwen_tokenizer."""

    # Qwen2's tokenizer returns no token_type_ids (the published class returns zeros that no model needs).
    model_input_names = ["input_ids", "attention_mask"]

    # The published tokenizer's attribute names, for code written against it (qwen_generation_utils).
    @property
    def eod_id(self) -> int:
        return QWEN_SPECIAL_START_ID

    @property
    def im_start_id(self) -> int:
        return QWEN_SPECIAL_START_ID + 1

    @property
    def im_end_id(self) -> int:
        return QWEN_SPECIAL_START_ID + 2

    def _batch_encode_plus(self, *args, **kwargs):
        with _ENCODE_LOCK:
            return super()._batch_encode_plus(*args, **kwargs)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        # QWenTokenizer.decode is tiktoken's decode (UTF-8, errors="replace"): it never cleans up spaces, even
        # when asked to (FastChat's generate_stream asks). skip_special_tokens drops ids >= <|endoftext|>,
        # which are exactly this tokenizer's special tokens.
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False,
                               **kwargs)


def tokenizer_cache_dir() -> Path:
    raw = os.environ.get(CACHE_ENV)
    return Path(raw).expanduser() if raw else DEFAULT_CACHE.expanduser()


def _read_tiktoken(data: bytes) -> dict[bytes, int]:
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def build_qwen_backend(ranks: dict[bytes, int]):
    """The `tokenizers.Tokenizer` for these tiktoken ranks (the slow part: every merge is derived)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    class _RanksConverter(TikTokenConverter):
        # TikTokenConverter reads the ranks through tiktoken.load, which also copies the file into tiktoken's
        # own cache; the ranks are already read here.
        def extract_vocab_merges_from_model(self, tiktoken_url):
            byte_encoder = bytes_to_unicode()

            def as_str(b: bytes) -> str:
                return "".join(byte_encoder[x] for x in b)

            vocab, merges = {}, []
            for token, rank in ranks.items():
                vocab[as_str(token)] = rank
                # Same merges, in the same order, as TikTokenConverter derives: every split of a token into two
                # tokens, ordered by the merged token's rank, then by the parts' ranks.
                local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                         if token[:i] in ranks and token[i:] in ranks]
                local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
                merges.extend(local)
            merges.sort(key=lambda m: m[2])
            return vocab, [(as_str(a), as_str(b)) for a, b, _ in merges]

    # ignore_merges (set by the converter): a piece that is a token is that token, as tiktoken looks it up.
    backend = _RanksConverter(vocab_file=None, pattern=QWEN_PAT_STR, additional_special_tokens=[]).converted()
    # QWenTokenizer.tokenize normalizes to NFC before tiktoken runs, special tokens included: they are found
    # in the normalized text (normalized=True), so e.g. "<|im_end|>" followed by U+0338 is text as published.
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in QWEN_SPECIAL_TOKENS])
    return backend


def _qwen_backend_ok(backend) -> bool:
    return (backend.get_vocab_size(with_added_tokens=True) == QWEN_SPECIAL_START_ID + len(QWEN_SPECIAL_TOKENS)
            and backend.token_to_id(QWEN_IM_END) == QWEN_SPECIAL_START_ID + 2)


def qwen_cache_file(digest: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or tokenizer_cache_dir()) / f"qwen-tiktoken-{digest}-v{QWEN_CONVERSION_VERSION}.tokenizer.json"


def _write_atomically(backend, path: Path) -> None:
    """Write the tokenizer.json beside its final name, then rename: a worker that reads the cache while
    another writes it sees either no file or a whole one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        backend.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep workers running as other users from sharing it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _qwen_tokenizer(folder: Path, cache_dir: Path | None) -> QwenNativeTokenizer:
    vocab_file = folder / QWEN_VOCAB_FILE
    data = vocab_file.read_bytes()
    path = qwen_cache_file(hashlib.sha256(data).hexdigest(), cache_dir)
    # The control tokens other than eos are listed as additional special tokens, so that all_special_ids
    # names every one that skip_special_tokens drops.
    args = {"name_or_path": str(folder), "eos_token": QWEN_ENDOFTEXT, "pad_token": QWEN_ENDOFTEXT,
            "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "clean_up_tokenization_spaces": False,
            **_max_length(folder)}
    if path.is_file():
        try:
            tok = QwenNativeTokenizer(tokenizer_file=str(path), **args)
            if _qwen_backend_ok(tok.backend_tokenizer):
                return tok
        except Exception as e:  # a damaged cache file is rebuilt, not fatal
            log.warning("rebuilding the unreadable cached tokenizer %s (%s)", path, e)
        else:
            log.warning("rebuilding the cached tokenizer %s: not Qwen-7B-Chat's vocabulary", path)
    started = time.monotonic()
    ranks = _read_tiktoken(data)
    backend = build_qwen_backend(ranks)
    if not _qwen_backend_ok(backend):
        raise ValueError(f"{vocab_file}: {len(ranks)} ranks, not Qwen-7B-Chat's {QWEN_SPECIAL_START_ID}")
    log.info("built the tokenizer of %s in %.1f s", vocab_file, time.monotonic() - started)
    try:
        _write_atomically(backend, path)
    except OSError as e:  # a read-only home must not stop the worker: it only costs the next start the time
        log.warning("could not cache the tokenizer in %s (%s)", path.parent, e)
    return QwenNativeTokenizer(tokenizer_object=backend, **args)


def _tokenizer_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _max_length(folder: Path) -> dict:
    value = _tokenizer_config(folder).get("model_max_length")
    return {"model_max_length": int(value)} if isinstance(value, (int, float)) else {}


def load_qwen_tokenizer(folder, *, cache_dir=None) -> PreTrainedTokenizerFast:
    """Qwen-7B-Chat's tokenizer from `qwen.tiktoken` alone: the ids and decoded text of the published
    QWenTokenizer. eos and pad are `<|endoftext|>` (151643), no BOS is added, a marker string in text is a
    control token unless `split_special_tokens=True`, and a prompt marked by worker_adapters.message_text
    keeps its message text as text (as make_context encodes it). The tokenizer.json derived from the ranks is
    cached in `cache_dir` (default: $CPU_ARENA_TOKENIZER_CACHE, else ~/.cache/cpu-arena/tokenizers)."""
    from worker_adapters.message_text import keep_message_text

    tok = _qwen_tokenizer(Path(folder), Path(cache_dir).expanduser() if cache_dir else None)
    return keep_message_text(tok)


# ---------------------------------------------------------------------------------------------------------
# ChatGLM3-6B
# ---------------------------------------------------------------------------------------------------------

CHATGLM3_VOCAB_FILE = "tokenizer.model"
CHATGLM3_ROLES = ("system", "user", "assistant", "observation")
# The published SPTokenizer numbers these after the sentencepiece vocabulary, in this order.
CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + tuple(f"<|{r}|>" for r in CHATGLM3_ROLES)


class ChatGLM3NativeTokenizer(PreTrainedTokenizer):
    """ChatGLM3-6B's tokenizer: sentencepiece plus its nine command tokens; see load_chatglm3_tokenizer.

    Text is encoded by sentencepiece alone (its dummy prefix included), as the published SPTokenizer.encode
    does: a command-token string in text stays text. With add_special_tokens (the default), a str is read as
    a prompt rendered by FastChat's `chatglm3` template and becomes build_chat_input's ids."""

    vocab_files_names = {"vocab_file": CHATGLM3_VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, eos_token="</s>",
                 unk_token="<unk>", pad_token="<unk>", **kwargs):
        from sentencepiece import SentencePieceProcessor

        self.vocab_file = str(vocab_file)
        self.sp_model = SentencePieceProcessor(model_file=self.vocab_file)
        self.n_words = self.sp_model.vocab_size()
        self.command_ids = {t: self.n_words + i for i, t in enumerate(CHATGLM3_SPECIAL_TOKENS)}
        self._command_by_id = {i: t for t, i in self.command_ids.items()}
        # get_command's names for the sentencepiece ids (the published ChatGLMTokenizer.special_tokens).
        self._sp_commands = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(),
                             "<unk>": self.sp_model.unk_id(), "<pad>": self.sp_model.unk_id()}
        self._vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_words)} | self.command_ids
        kwargs.setdefault("additional_special_tokens",
                          [AddedToken(t, normalized=False, special=True) for t in CHATGLM3_SPECIAL_TOKENS])
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         eos_token=eos_token, unk_token=unk_token, pad_token=pad_token, **kwargs)

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        return self.n_words + len(CHATGLM3_SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def get_command(self, token: str) -> int:
        if token in self._sp_commands:
            return self._sp_commands[token]
        if token not in self.command_ids:
            raise KeyError(f"{token} is not a special token of ChatGLM3")
        return self.command_ids[token]

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self.sp_model.unk_id())

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._command_by_id:
            return self._command_by_id[index]
        return self.sp_model.id_to_piece(index) if 0 <= index < self.n_words else ""

    # ---- encoding ----
    def tokenize(self, text: str, **kwargs) -> list[str]:
        # sentencepiece's pieces of the whole text: the base class would first cut the added tokens' strings
        # out of it, which the published SPTokenizer.encode does not.
        return self.sp_model.encode_as_pieces(text)

    def encode_text(self, text: str) -> list[int]:
        """The published SPTokenizer.encode: sentencepiece alone."""
        return self.sp_model.encode(text)

    def get_prefix_tokens(self) -> list[int]:
        return [self.command_ids["[gMASK]"], self.command_ids["sop"]]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in CHATGLM3_ROLES:
            raise ValueError(f"unknown ChatGLM3 role {role!r}")
        return [self.command_ids[f"<|{role}|>"]] + self.encode_text(f"{metadata}\n") + self.encode_text(message)

    def chat_ids(self, query: str, history: list[dict] | None = None, role: str = "user") -> list[int]:
        """build_chat_input's ids as a list: [gMASK] sop, each message, the query, <|assistant|>."""
        ids = self.get_prefix_tokens()
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        return ids + self.build_single_message(role, "", query) + [self.command_ids["<|assistant|>"]]

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user") -> BatchEncoding:
        """As the published build_chat_input: a batch of one, as torch tensors."""
        ids = self.chat_ids(query, history, role)
        n = len(ids)
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * n], "position_ids": [list(range(n))]},
                             tensor_type="pt")

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids of a prompt rendered by FastChat's `chatglm3` template (message text marked as
        worker_adapters.message_text does): the ids the ChatGLM3 adapter's build_input_ids gives."""
        from worker_adapters.chatglm3_prompt import build_input_ids

        return build_input_ids(self, prompt)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def _text_ids(self, text: str, pair: str | None, add_special_tokens: bool, split_special_tokens: bool):
        """(first ids, pair ids, whether prepare_for_model still adds special tokens) for str inputs."""
        if add_special_tokens and pair is None and not split_special_tokens:
            return self.prompt_ids(text), None, False
        return self.encode_text(text), (self.encode_text(pair) if pair is not None else None), add_special_tokens

    @staticmethod
    def _is_text(text, pair, is_split_into_words: bool) -> bool:
        return isinstance(text, str) and not is_split_into_words and (pair is None or isinstance(pair, str))

    def _encode_plus(self, text, text_pair=None, add_special_tokens: bool = True,
                     padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
                     truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
                     is_split_into_words: bool = False, split_special_tokens: bool = False, **kwargs):
        if not self._is_text(text, text_pair, is_split_into_words):
            return super()._encode_plus(text, text_pair, add_special_tokens=add_special_tokens,
                                        padding_strategy=padding_strategy, truncation_strategy=truncation_strategy,
                                        is_split_into_words=is_split_into_words, **kwargs)
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offsets_mapping needs a fast tokenizer")
        first, second, add = self._text_ids(text, text_pair, add_special_tokens, split_special_tokens)
        return self.prepare_for_model(first, pair_ids=second, add_special_tokens=add, padding=padding_strategy.value,
                                      truncation=truncation_strategy.value, prepend_batch_axis=True, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, add_special_tokens: bool = True,
                           is_split_into_words: bool = False, split_special_tokens: bool = False, **kwargs):
        items = [(x, None) if isinstance(x, str) else tuple(x) for x in batch_text_or_text_pairs]
        if not all(len(x) == 2 and self._is_text(*x, is_split_into_words) for x in items):
            return super()._batch_encode_plus(batch_text_or_text_pairs, add_special_tokens=add_special_tokens,
                                              is_split_into_words=is_split_into_words,
                                              split_special_tokens=split_special_tokens, **kwargs)
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offsets_mapping needs a fast tokenizer")
        ids, adds = [], set()
        for text, pair in items:
            first, second, add = self._text_ids(text, pair, add_special_tokens, split_special_tokens)
            ids.append((first, second))
            adds.add(add)
        if len(adds) > 1:  # some prompts became chat ids, text pairs still want the pair special tokens
            ids = [(self.build_inputs_with_special_tokens(a, b) if b is not None else a, None) for a, b in ids]
            adds = {False}
        # The base class passes leftovers on to tokenize(); _batch_prepare_for_model takes only its own.
        known = inspect.signature(self._batch_prepare_for_model).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in known}
        return BatchEncoding(self._batch_prepare_for_model(ids, add_special_tokens=adds.pop() if adds else False,
                                                           **kwargs))

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, padding_side=None, return_attention_mask=None):
        # position_ids as the published _pad gives them: 0..n-1, and 0 on padding.
        n = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.get("position_ids", range(n)))
        out = super()._pad(encoded_inputs, max_length=max_length, padding_strategy=padding_strategy,
                           pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                           return_attention_mask=return_attention_mask)
        extra = len(out[self.model_input_names[0]]) - n
        left = (padding_side or self.padding_side) == "left"
        out["position_ids"] = [0] * extra + positions if left else positions + [0] * extra
        return out

    # ---- decoding ----
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                spaces_between_special_tokens: bool = True, **kwargs) -> str:
        """Text as the published tokenizer decodes it: sentencepiece's decode of the pieces, where <unk>,
        <s> and </s> are empty; a command token is its string, the text around it decoded on its own (the
        published SPTokenizer.decode), or dropped with skip_special_tokens. spaces_between_special_tokens is
        ignored: nothing is inserted around command tokens."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        blank = {self.sp_model.unk_id(), self.sp_model.bos_id(), self.sp_model.eos_id()}
        parts, pieces = [], []
        for i in token_ids:
            i = int(i)
            command = self._command_by_id.get(i)
            if command is None:
                pieces.append("" if i in blank else self._convert_id_to_token(i))
                continue
            if pieces:
                parts.append(self.sp_model.decode_pieces(pieces))
                pieces = []
            if not skip_special_tokens:
                parts.append(command)
        if pieces:
            parts.append(self.sp_model.decode_pieces(pieces))
        text = "".join(parts)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + CHATGLM3_VOCAB_FILE
        path = Path(save_directory) / name if Path(save_directory).is_dir() else Path(save_directory)
        path.write_bytes(Path(self.vocab_file).read_bytes())
        return (str(path),)


def load_chatglm3_tokenizer(folder) -> ChatGLM3NativeTokenizer:
    """ChatGLM3-6B's tokenizer from `tokenizer.model` alone: the published ids (text, command tokens,
    build_chat_input), eos `</s>` (2), pad and unk `<unk>` (0), padding on the left."""
    folder = Path(folder)
    return ChatGLM3NativeTokenizer(vocab_file=folder / CHATGLM3_VOCAB_FILE, name_or_path=str(folder),
                                   **_max_length(folder))
