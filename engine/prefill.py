"""Prefill: the first pass over the prompts of requests admitted together.

Prefill is compute-bound on CPU (every prompt token is a row of every matmul), unlike decoding. Prompts
that arrive together often begin alike: the chat template's system prompt, a shared few-shot preamble,
or the same question sent by several clients. Their common beginning is computed once, as one row, and
only each prompt's own rest runs for every request. On the reference machine a Qwen2.5-0.5B prompt of
48 tokens costs 0.5-0.8 s, four of them in one pass 2.2-2.7 s.

Every prefill returns the legacy KV cache in the engine's layout: one row per prompt, left-padded, each
row's real tokens contiguous at the right end, so the decode loop does not care how a prompt was prefilled.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from engine.kernels import paths

# A common beginning shorter than this is prefilled with the rest: a second pass costs a few ms of
# per-layer overhead, which a handful of shared tokens does not pay for.
SHARED_PREFIX_MIN = 16


def prefill_inputs(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Model inputs for prompts prefilled together: left-padded so every prompt ends in the last
    column, pads masked out, and positions counted from each prompt's first real token."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    if all(len(p) == width for p in prompts):
        return {"input_ids": ids}  # nothing padded: exactly the single-request inputs
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts have in common, leaving every prompt at least one token of its
    own (the next token is chosen from the logits of each prompt's last position)."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts[1:]):
        n += 1
    return n


def prefill(model, prompts: list[list[int]], pad: int, *, share: bool) -> tuple[torch.Tensor, tuple]:
    """(each prompt's last-position logits [rows, vocab], legacy KV cache in the engine's layout).

    `share`: the model takes a 2D mask with a gap and explicit positions over a cache (native transformers
    models, model_inputs.takes_ready_mask); then a common beginning of SHARED_PREFIX_MIN tokens or more is
    computed once."""
    shared = shared_prefix_len(prompts) if share and len(prompts) > 1 else 0
    if shared >= SHARED_PREFIX_MIN:
        return _prefill_shared(model, prompts, shared, pad)
    if len(prompts) == 1 and len(prompts[0]) >= paths.current().alone_from:
        # A whole prompt alone, as the batching engine sends those (paths.py): its linears may take PyTorch's matmul.
        with paths.lone_prompt(len(prompts[0])):
            return _prefill_whole(model, prompts, pad)
    return _prefill_whole(model, prompts, pad)


def _prefill_whole(model, prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, tuple]:
    # Only the last position's logits are needed: skips a [prompt x vocab] matmul.
    out = model(**prefill_inputs(prompts, pad), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], legacy(out.past_key_values)


def prefill_after(model, prompts: list[list[int]], hit, pad: int) -> tuple[torch.Tensor, tuple]:
    """prefill() of prompts that all begin with the hit.tokens tokens whose keys and values are kept
    (prefix_cache.Hit): only their rests run, together, over copies of them."""
    return _prefill_rests(model, prompts, hit.tokens, hit.layers, pad)


def _prefill_shared(model, prompts: list[list[int]], shared: int, pad: int) -> tuple[torch.Tensor, tuple]:
    head = model(input_ids=torch.tensor([prompts[0][:shared]]), use_cache=True, logits_to_keep=1)
    return _prefill_rests(model, prompts, shared, legacy(head.past_key_values), pad)


def _prefill_rests(model, prompts: list[list[int]], shared: int, head: tuple, pad: int) -> tuple[torch.Tensor, tuple]:
    """The prompts' own rests after their common first `shared` tokens, whose keys and values are `head` (per
    layer [1, heads, shared, dim]; copied, one per prompt)."""
    rows = len(prompts)
    cache = DynamicCache.from_legacy_cache(tuple(
        (k.expand(rows, -1, -1, -1).clone(memory_format=torch.contiguous_format),
         v.expand(rows, -1, -1, -1).clone(memory_format=torch.contiguous_format)) for k, v in head))
    rests = [p[shared:] for p in prompts]
    width = max(len(r) for r in rests)
    gaps = [width - len(r) for r in rests]
    inputs = prefill_inputs(rests, pad)
    if any(gaps):
        # The rests are left-padded after the shared part: [shared | gap | rest]; the gap is masked out.
        inputs["attention_mask"] = torch.cat([torch.ones(rows, shared, dtype=torch.long), inputs["attention_mask"]], 1)
        inputs["position_ids"] = inputs["position_ids"] + shared
    out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    layers = legacy(out.past_key_values)
    if any(gaps):
        # Move each row's gap in front of its shared part: [gap | shared | rest], the engine's left padding.
        # A cached key carries its rotary position already, so moving columns changes no value.
        for k, v in layers:
            for i, g in enumerate(gaps):
                if g:
                    k[i, :, :shared + g] = torch.roll(k[i, :, :shared + g], g, dims=-2)
                    v[i, :, :shared + g] = torch.roll(v[i, :, :shared + g], g, dims=-2)
    return out.logits[:, -1, :], layers


def legacy(cache) -> tuple:
    return cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
