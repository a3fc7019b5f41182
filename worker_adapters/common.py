"""Pieces shared by the adapters: their base class, tokenizer loading, stop-id merging around a generate function,
dtype check."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from fastchat.model.model_adapter import BaseModelAdapter
from transformers import AutoTokenizer

from worker_adapters.checkpoint import CheckpointInfo, read_checkpoint


class CheckpointAdapter(BaseModelAdapter):
    """A FastChat adapter that recognises a local checkpoint by its files (read_checkpoint), not by the
    folder's name as FastChat's own adapters do: a ModelScope download can be called anything."""

    def match_checkpoint(self, info: CheckpointInfo) -> bool:
        raise NotImplementedError

    def match(self, model_path: str) -> bool:
        info = read_checkpoint(model_path)
        return info is not None and self.match_checkpoint(info)


# The model types whose (tekken) tokenizer.json may carry the wrong pre-tokenizer regex transformers warns about;
# the same list transformers 4.57.6 checks in PreTrainedTokenizerBase._patch_mistral_regex.
MISTRAL_MODEL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def load_tokenizer(path: str | Path, info: CheckpointInfo, *, trust_remote_code: bool):
    """AutoTokenizer for a checkpoint, without transformers 4.57.6's false "incorrect regex pattern" warning.

    Why it is false: for a local folder whose fast tokenizer has more than 100k base tokens and a
    pre-tokenizer, transformers reads config.json and, unless `transformers_version` is <= 4.57.2 (with a
    non-Mistral `model_type`) or >= 5.0.0, assumes a Mistral tokenizer with a broken regex; in between it
    looks at neither `model_type` nor the regex. So every such checkpoint saved by 4.57.3+ is flagged, e.g.
    the embedded Qwen2.5-Coder (151k tokens, converted with 4.57.6). The bug it means is Mistral's: some
    tekken tokenizer.json files shipped a Llama-3-style split, and `fix_mistral_regex=True` swaps in
    tekken's case-splitting regex. That would be wrong for Qwen2, whose split (launch/embedded/convert.py's
    _QWEN2_SPLIT, the one in upstream Qwen2's tokenizer.json and llama.cpp's "qwen2") is already right.
    Passing the flag explicitly is transformers' documented way to say "checked": with False the tokenizer
    stays exactly as saved. Only for non-Mistral model types (later transformers releases skip those too),
    so a real Mistral checkpoint still gets the warning.

    Done here rather than in the converted checkpoint: the only checkpoint-side way past the check is a
    false `transformers_version` in config.json.
    """
    kwargs = {}
    if info.model_type and info.model_type not in MISTRAL_MODEL_TYPES:
        kwargs["fix_mistral_regex"] = False
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)


def with_stop_ids(generate: Callable, stop_ids: Iterable[int], *, drop_leading: str = "") -> Callable:
    """Wrap a FastChat generate_stream function so the model's own stop ids always apply.

    The API server and UI send the template's stop ids, but a direct /worker_generate call may
    send none; the model's end-of-turn ids must stop it either way. `drop_leading`: text the model
    writes before its answer proper (ChatGLM3's metadata line ends in a newline), cut from the answer
    once; the batching engine reads it from the function's attribute of that name.
    """
    ids = [int(i) for i in stop_ids if i is not None]

    def generate_stream(model, tokenizer, params, device, context_len, stream_interval=2, judge_sent_end=False):
        params = dict(params)
        merged = list(params.get("stop_token_ids") or [])
        merged += [i for i in ids if i not in merged]
        params["stop_token_ids"] = merged
        cut = drop_leading if drop_leading and not params.get("echo", True) else ""
        for out in generate(model, tokenizer, params, device, context_len, stream_interval, judge_sent_end):
            if cut and isinstance(out.get("text"), str) and out["text"].startswith(cut):
                out = {**out, "text": out["text"][len(cut):]}
            yield out

    generate_stream.stop_ids = ids  # for tests and diagnostics
    generate_stream.drop_leading = drop_leading
    generate_stream.wrapped = generate
    return generate_stream


def ensure_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Remote code may cast itself (Qwen's fp16 flag, a config torch_dtype); end in the chosen dtype."""
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating and floating != {dtype}:
        model = model.to(dtype)
    return model
