"""The batch's KV cache (engine/kv_cache.py): DynamicCache's values, kept in buffers that grow in place."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from engine import kv_cache
from engine.kv_cache import GrowingCache


def _states(gen, rows: int, heads: int, tokens: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, heads, tokens, dim, generator=gen).to(torch.bfloat16),
            torch.randn(rows, heads, tokens, dim, generator=gen).to(torch.bfloat16))


def test_updates_give_what_dynamic_cache_gives_across_growth():
    gen = torch.Generator().manual_seed(0)
    prompt = [_states(gen, 3, 2, 50) for _ in range(2)]  # 2 layers
    grown, plain = GrowingCache.from_legacy_cache(prompt), DynamicCache.from_legacy_cache(prompt)
    assert isinstance(grown.layers[0], kv_cache.GrowingLayer)
    for _ in range(200):  # 250 tokens: the buffer grows several times
        for layer in range(2):
            k, v = _states(gen, 3, 2, 1)
            got, want = grown.update(k, v, layer), plain.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert grown.get_seq_length() == plain.get_seq_length() == 250
    for (gk, gv), (pk, pv) in zip(grown.to_legacy_cache(), plain.to_legacy_cache(), strict=True):
        assert torch.equal(gk, pk) and torch.equal(gv, pv)


def test_a_decode_step_writes_in_place_instead_of_copying_the_cache():
    gen = torch.Generator().manual_seed(1)
    cache = GrowingCache.from_legacy_cache([_states(gen, 4, 2, 100)])
    start = cache.layers[0].keys.data_ptr()
    grown_at = []
    for step in range(200):
        cache.update(*_states(gen, 4, 2, 1), 0)
        if cache.layers[0].keys.data_ptr() != start:
            grown_at.append(step)
            start = cache.layers[0].keys.data_ptr()
    # Room for a quarter more, at least GROW_MIN = 64 tokens, each time: full at 164, 229 and 294 tokens, so 3
    # copies in 200 steps where torch.cat made 200.
    assert kv_cache.GROW_MIN == 64 and grown_at == [64, 129, 194]
    assert cache.layers[0].keys.stride(-1) == 1


def test_crop_and_row_selection_then_more_steps_stay_right():
    gen = torch.Generator().manual_seed(2)
    prompt = [_states(gen, 4, 2, 30)]
    grown, plain = GrowingCache.from_legacy_cache(prompt), DynamicCache.from_legacy_cache(prompt)
    for cache in (grown, plain):
        cache.crop(20)
    for _ in range(5):
        k, v = _states(gen, 4, 2, 1)
        grown.update(k, v, 0)
        plain.update(k, v, 0)
    idx = torch.tensor([0, 2])
    for cache in (grown, plain):
        cache.batch_select_indices(idx)
    for _ in range(5):
        k, v = _states(gen, 2, 2, 1)
        got, want = grown.update(k, v, 0), plain.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert grown.get_seq_length() == 30
