"""The KV cache of finished requests, kept so that a prompt which begins like one of them is not computed again.

Why: a chat client sends the whole conversation at every turn (FastChat's UI and the OpenAI API alike), and
every request of a model begins with its chat template's system prompt. On CPU a prompt is compute-bound: a
Qwen-7B-shaped model takes ~2 s for 64 tokens, so a conversation of 500 tokens would wait ~16 s before every
answer, most of it recomputing the turns before. Here a request's keys and values (its prompt and its answer)
are kept when it leaves the batch, and a new prompt whose first tokens are the same tokens starts from them:
only its own rest is prefilled (vLLM's automatic prefix caching, at the granularity of whole requests).

The kept values are the ones a fresh prefill would compute, bit for bit: the project's kernels compute every
row alone (linear, norm, rotary) and a query's attention over its own keys only, in the same order whether it
was a prompt position or a decode step (tests/test_native_kernel.py), so a prompt answered from here gets the
same logits as one prefilled whole (tests/test_prefix_cache.py). Only where that holds (`usable`).

Bounded by bytes: the least recently used entries go first; an entry is one request's tokens and, per layer,
its keys and values [1, key heads, tokens, head dim].
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.model_inputs import takes_ready_mask

# A common beginning shorter than this is computed again: starting a prompt from kept keys costs a prefill
# pass apart from the prompts that start from nothing kept, which a few tokens do not pay for.
MIN_TOKENS = 16


@dataclass(frozen=True)
class Hit:
    tokens: int  # how many leading tokens of the prompt the kept keys and values cover
    layers: tuple  # per layer (keys, values), [1, key heads, tokens, head dim]


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = MIN_TOKENS):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be 0 or more, got {budget_bytes}")
        self.budget, self.min_tokens = budget_bytes, min_tokens
        self._entries: OrderedDict[tuple[int, ...], tuple] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], layers: tuple) -> None:
        """Keep the keys and values of `tokens` (per layer, [1, heads, len(tokens), dim]; copied here, so the
        caller may go on writing its own). A sequence that an entry already covers only refreshes it; entries
        that the new one extends are dropped."""
        key = tuple(tokens)
        size = _nbytes(layers)
        if len(key) < self.min_tokens or size > self.budget:
            return
        for old in list(self._entries):
            if old[:len(key)] == key:  # kept already, as it is or inside a longer sequence
                self._entries.move_to_end(old)
                return
            if key[:len(old)] == old:
                self._drop(old)
        self._entries[key] = tuple((k.clone(), v.clone()) for k, v in layers)
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def lookup(self, tokens: list[int]) -> Hit | None:
        """The kept keys and values of the longest beginning of `tokens` (at least min_tokens, and never the
        whole prompt: its last token is computed, for the logits of the first answer token)."""
        limit = len(tokens) - 1
        best, best_n = None, 0
        for key in self._entries:
            n = _common(key, tokens, limit)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best)
        return Hit(best_n, tuple((k[:, :, :best_n], v[:, :, :best_n]) for k, v in self._entries[best]))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= _nbytes(self._entries.pop(key))


def _common(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0 or a[0] != b[0]:
        return 0
    if list(a[:n]) == b[:n]:  # the usual case for a hit: one comparison in C
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[:mid]) == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _nbytes(layers: tuple) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def row_layers(layers: tuple, row: int, start: int, stop: int) -> tuple:
    """One row's keys and values at columns [start, stop) of a batch cache's per-layer tensors, as [1, ...]
    (views: PrefixCache.put copies what it keeps)."""
    return tuple((k[row:row + 1, :, start:stop], v[row:row + 1, :, start:stop]) for k, v in layers)


def usable(model) -> str | None:
    """None where a prompt started from kept keys and values gets the logits of a whole prefill, else why not:
    the model must take a cache and explicit positions in its prefill (model_inputs.takes_ready_mask) and run its
    attention on the project's kernel (attention.py; engine.kernels.install puts it there with the kernel linears),
    whose results do not depend on how a prompt was split. PyTorch's own kernels sum in blocks that do."""
    import torch.nn.functional as F

    if not takes_ready_mask(model):
        return "the model builds its own attention mask (remote code, eager attention or a sliding window)"
    if getattr(F.scaled_dot_product_attention, "cpu_arena_kernel", None) is None:
        return "attention is on PyTorch's kernels (no prepacked linears, or no C compiler)"
    return None
