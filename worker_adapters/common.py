"""Pieces shared by the adapters: their base class, stop-id merging around a generate function, dtype check."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from fastchat.model.model_adapter import BaseModelAdapter

from worker_adapters.checkpoint import CheckpointInfo, read_checkpoint


class CheckpointAdapter(BaseModelAdapter):
    """A FastChat adapter that recognises a local checkpoint by its files (read_checkpoint), not by the
    folder's name as FastChat's own adapters do: a ModelScope download can be called anything."""

    def match_checkpoint(self, info: CheckpointInfo) -> bool:
        raise NotImplementedError

    def match(self, model_path: str) -> bool:
        info = read_checkpoint(model_path)
        return info is not None and self.match_checkpoint(info)


def with_stop_ids(generate: Callable, stop_ids: Iterable[int]) -> Callable:
    """Wrap a FastChat generate_stream function so the model's own stop ids always apply.

    The API server and UI send the template's stop ids, but a direct /worker_generate call may
    send none; the model's end-of-turn ids must stop it either way.
    """
    ids = [int(i) for i in stop_ids if i is not None]

    def generate_stream(model, tokenizer, params, device, context_len, stream_interval=2, judge_sent_end=False):
        params = dict(params)
        merged = list(params.get("stop_token_ids") or [])
        merged += [i for i in ids if i not in merged]
        params["stop_token_ids"] = merged
        yield from generate(model, tokenizer, params, device, context_len, stream_interval, judge_sent_end)

    generate_stream.stop_ids = ids  # for tests and diagnostics
    generate_stream.wrapped = generate
    return generate_stream


def ensure_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Remote code may cast itself (Qwen's fp16 flag, a config torch_dtype); end in the chosen dtype."""
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating and floating != {dtype}:
        model = model.to(dtype)
    return model
