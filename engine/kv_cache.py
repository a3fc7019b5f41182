"""The batch's KV cache: transformers' DynamicCache, with layers that grow in place.

Why: DynamicCache appends a decode step's keys and values with torch.cat, which copies the whole cache
of every layer at every step: O(length) per token, O(length^2) per answer. For Qwen2.5-0.5B (2 key/value
heads) that is small (4 rows at 1000 tokens: 1.6 ms a step), for a Qwen-7B-shaped model (32 heads of 128)
it is not: 4 rows at 1000 tokens copied 137 ms a step, at 2000 tokens 1.4 s (each copy allocates the whole
cache again). Here each layer keeps its keys and values in a buffer with room to spare, a step writes its
column into it, and `keys`/`values` are views of the filled part (strided: the attention kernel and
torch's SDPA both take that). The buffer grows by a quarter (at least GROW_MIN tokens) when full, so
copies are rare and the spare memory stays a fraction of the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

GROW_MIN = 64  # tokens of room added at least, when a layer's buffer is full


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are the filled part of a larger buffer. The same values as
    DynamicLayer's at every point; only where they live differs."""

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        if not self._views_of_buffer() or n + add > self._k.shape[-2]:
            self._grow(n, n + add, key_states, value_states)
        self._k[:, :, n:n + add] = key_states
        self._v[:, :, n:n + add] = value_states
        self.keys, self.values = self._k[:, :, :n + add], self._v[:, :, :n + add]
        return self.keys, self.values

    def reserve(self, add: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers, with room for `add` tokens past the filled part, for a writer other than
        update() (decode_step.py writes a step's column from C); `advance` then takes them in."""
        n = self.get_seq_length()
        if not self._views_of_buffer() or n + add > self._k.shape[-2]:
            self._grow(n, n + add, self.keys, self.values)
        return self._k, self._v

    def advance(self, add: int) -> None:
        """The `add` tokens written past the filled part (after `reserve`) are part of the cache now."""
        n = self.get_seq_length() + add
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def _views_of_buffer(self) -> bool:
        # False after crop/batch_select_indices/reorder replaced keys with other tensors, or before the first fill.
        # A crop that kept a prefix of the buffer (same start and strides) still counts: writing on at the new
        # length is right.
        return (self._k is not None and self.keys.data_ptr() == self._k.data_ptr()
                and self.keys.stride() == self._k.stride() and self.values.data_ptr() == self._v.data_ptr())

    def _grow(self, n: int, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cap = need + max(GROW_MIN, need // 4)
        k = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
        v = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
        if n:
            k[:, :, :n] = self.keys
            v[:, :, :n] = self.values
        self._k, self._v = k, v


class GrowingCache(DynamicCache):
    """DynamicCache with GrowingLayers (from_legacy_cache, to_legacy_cache and the rest as DynamicCache)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
