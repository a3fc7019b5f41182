"""The continuous-batching decode loop.

One thread owns the model. New requests that arrive together are prefilled together (left-padded
and masked; a request alone is prefilled exactly as a single request), then their KV cache joins
the running batch: every row is left-padded to the longest row and masked, and each decode step
runs all rows at once. A row leaves as soon as it stops (its own stop tokens/strings/length),
and fully padded leading columns are trimmed. Decoding on CPU is memory-bound: a step reads every
weight once whatever the batch size, so B rows cost little more than one (with the right matmul
kernels, engine/kernels/linear.py).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.host.cores import CoreLease
from engine.kernels import paths
from engine.kv_cache import GrowingCache
from engine.model_inputs import takes_ready_mask
from engine.params import GenParams, choose_token, greedy_tokens
from engine.prefill import prefill, prefill_after
from engine.prefix_cache import Hit, PrefixCache, row_layers, usable
from engine.protocol import STREAM_INTERVAL
from engine.text import IncrementalText, StopText
from engine.thread import EngineThread

log = logging.getLogger("batching")

# Prefill new requests together unless padding would waste more than this share of the padded
# tokens, and never more than this many padded tokens in one pass (activations scale with it).
PAD_WASTE = 0.25
PREFILL_TOKENS = 8192
# An idle engine that receives a request waits for others that follow within ADMIT_GAP_S (at most
# ADMIT_WINDOW_S in all) and prefills them together. FastChat's API server forwarded 4 requests
# sent at once 13, 2 and 3 ms apart (traced); one 4-prompt prefill then replaces a 1-prompt and a
# 3-prompt one (SmolLM2: 220 + 420 ms). A lone request pays ADMIT_GAP_S on its first token.
ADMIT_GAP_S = 0.015
ADMIT_WINDOW_S = 0.06


@dataclass
class Chunk:
    """What one request's stream receives: cumulative text, like FastChat's worker sends."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    params: GenParams
    prompt_ids: list[int]
    sink: Callable[[Chunk], None]
    id: int = field(default_factory=itertools.count().__next__)
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    # filled in by the engine
    detok: IncrementalText | None = None
    stop_text: StopText | None = None
    sent_len: int = -1
    # The kept keys and values its prompt begins with (prefix_cache.py), looked up once, when first grouped.
    prefix: Hit | None = None
    looked_up: bool = False

    def cancel(self) -> None:
        # Read by the engine thread between steps; a bool store is atomic under the GIL.
        self.cancelled = True


@dataclass
class _Row:
    req: Request
    length: int  # real tokens in this row's cache
    last_token: int


class BatchEngine(EngineThread):
    thread_name = "batch-engine"

    def __init__(self, model, tokenizer, *, max_batch: int = 8, context_len: int = 2048,
                 lease: CoreLease | None = None, stream_interval: int = STREAM_INTERVAL,
                 prefix_cache: PrefixCache | None = None, drop_leading: str = ""):
        super().__init__()
        self.drop_leading = drop_leading  # cut once from each answer's start (IncrementalText)
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be 1 or more, got {stream_interval}")
        self.stream_interval = stream_interval
        self.model = model
        self.lease = lease
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.context_len = context_len
        # Taken off `incoming` by the loop but not yet admitted (the batch is full).
        self.waiting: list[Request] = []
        self.rows: list[_Row] = []
        self.cache: GrowingCache | None = None
        self.steps = 0
        self._ready_mask = takes_ready_mask(model)
        # Every decoder layer of a step in one C call where the model allows it (bitwise the model's forward);
        # `decode_path` says which, for the worker's log.
        from engine.kernels import decode_step  # here: it loads transformers' Llama and Qwen2 modelling code

        self.native_step, why = decode_step.for_model(model)
        self.decode_path = "decoder layers in one C call (decode_step.c)" if self.native_step \
            else f"the model's forward ({why})"
        # Finished requests' keys and values, for prompts that begin like them (only where a prompt started from
        # them gets a whole prefill's logits: prefix_cache.usable).
        if prefix_cache is not None and (why := usable(model)):
            raise ValueError(f"a prefix cache cannot serve this model: {why}")
        self.prefix_cache = prefix_cache
        # Held while admitted requests move from `waiting` to `rows`, so that load(), read by the HTTP
        # thread, counts each request once (it read 7 for 4 requests when it fell between the two).
        self._moving = threading.Lock()

    # ---- public, any thread ----
    def submit(self, params: GenParams, sink: Callable[[Chunk], None]) -> Request:
        ids = self.tokenizer(params.prompt).input_ids
        # Leave room for the answer, as FastChat's generate_stream does.
        keep = max(1, self.context_len - params.max_new_tokens - 1)
        req = Request(params=params, prompt_ids=list(ids[-keep:]), sink=sink)
        self.incoming.put(req)
        return req

    def load(self) -> int:
        """Requests running or waiting: the queue_length FastChat's worker reports (running + waiting)."""
        with self._moving:
            return len(self.rows) + len(self.waiting) + self.incoming.qsize()

    # ---- engine thread ----
    def _loop(self) -> None:
        waiting = self.waiting
        while not self._stop.is_set():
            idle = not self.rows and not waiting
            if idle and self.lease:
                self.lease.release()  # idle: the other workers may use our cores
            self._take_incoming(wait=idle)
            if self._stop.is_set():
                break
            try:
                with torch.inference_mode():
                    while waiting and len(self.rows) < self.max_batch:
                        group = self._next_group()
                        self._claim()
                        try:
                            self._admit(group)
                        except Exception as e:  # these requests fail; the running rows go on
                            log.exception("prefill failed")
                            for req in group:
                                self._finish(req, None, error=f"{type(e).__name__}: {e}")
                        finally:  # never retried; a no-op when _admit moved them to the rows already
                            with self._moving:
                                self._dequeue(group)
                        # Requests that came in during that prefill get theirs before the next step.
                        self._take_incoming(wait=False)
                    if self.rows:
                        self._claim()
                        self._step()
            except Exception as e:  # never let one bad batch kill the worker
                log.exception("batch step failed")
                for row in self.rows:
                    self._finish(row.req, None, error=f"{type(e).__name__}: {e}")
                self.rows, self.cache = [], None

    def _take_incoming(self, *, wait: bool) -> None:
        """Move submitted requests to `waiting`. With `wait` (the engine is idle), block for the first
        one, then keep taking requests that follow it within ADMIT_GAP_S (at most ADMIT_WINDOW_S in
        all), so that requests sent together are prefilled together."""
        deadline = None
        while not self._stop.is_set():
            try:
                if not wait:
                    item = self.incoming.get_nowait()
                elif deadline is None:
                    item = self.incoming.get()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0 or len(self.waiting) >= self.max_batch:
                        return
                    item = self.incoming.get(timeout=min(ADMIT_GAP_S, left))
            except queue.Empty:
                return
            if item is None:  # shutdown's wake-up
                return
            self.waiting.append(item)
            if wait and deadline is None:
                deadline = time.monotonic() + ADMIT_WINDOW_S

    def _claim(self) -> None:
        if self.lease:
            self.lease.claim()

    def _next_group(self) -> list[Request]:
        """The waiting requests to prefill together: FIFO, up to the free rows, while padding the
        shorter prompts to the longest wastes little (at most PAD_WASTE of the padded tokens). A prompt of
        paths.alone_from tokens or more is prefilled alone: it runs on PyTorch's matmul or SDPA, which compute
        a row differently beside others than alone (engine/kernels/paths.py)."""
        free = self.max_batch - len(self.rows)
        group = [self.waiting[0]]
        alone_from = paths.current().alone_from
        if len(group[0].prompt_ids) >= alone_from:
            return group
        n = group[0].prefix.tokens if self._kept_prefix(group[0]) else 0
        for req in self.waiting[1:free]:
            if len(req.prompt_ids) >= alone_from or not self._starts_alike(group[0], req):
                break
            lengths = [len(r.prompt_ids) - n for r in (*group, req)]
            padded = max(lengths) * len(lengths)
            if padded > PREFILL_TOKENS or padded - sum(lengths) > PAD_WASTE * padded:
                break
            group.append(req)
        return group

    def _admit(self, group: list[Request]) -> None:
        """Prefill new requests together (engine/prefill.py), then join them to the batch.

        When requests arrive together (several users at once) one prefill pass reads the weights
        once for all of them, their common beginning is computed once, and the running rows wait for
        one prefill instead of one per request. A request alone is prefilled exactly as a single
        request is.
        """
        waited, group = group, [r for r in group if not r.cancelled]
        if not group:
            return
        if group[0].prefix:  # then every prompt of the group starts from the same kept tokens (_next_group)
            logits, layers = prefill_after(self.model, [r.prompt_ids for r in group], group[0].prefix,
                                           self.tokenizer.pad_token_id or 0)
            for r in group:
                r.prefix = None  # the batch's cache holds them now
        else:
            logits, layers = prefill(self.model, [r.prompt_ids for r in group], self.tokenizer.pad_token_id or 0,
                                     share=self._ready_mask)
        rows, keep = [], []
        for i, req in enumerate(group):
            req.detok = IncrementalText(self.tokenizer, req.prompt_ids, self.drop_leading)
            req.stop_text = StopText(req.params.stop)
            token = choose_token(logits[i], req.params, _history(req))
            row = _Row(req=req, length=len(req.prompt_ids), last_token=token)
            if self._accept(row, token):
                rows.append(row)
                keep.append(i)
        cache = self._merged_cache(_select_rows(layers, keep, len(group))) if rows else None
        with self._moving:  # counted as waiting until they are rows
            if rows:
                self.rows.extend(rows)
                self.cache = cache
            self._dequeue(waited)

    def _step(self) -> None:
        batch = len(self.rows)
        logits = decode_logits(self.model, self.native_step, self._ready_mask, self.cache,
                               [r.last_token for r in self.rows], [r.length for r in self.rows])
        self.steps += 1
        # Greedy rows: one argmax over the whole batch instead of one call per row.
        greedy = greedy_tokens(logits)
        keep = []
        for i, r in enumerate(self.rows):
            r.length += 1
            p = r.req.params
            token = greedy[i] if p.greedy else choose_token(logits[i], p, _history(r.req))
            r.last_token = token
            if self._accept(r, token):
                keep.append(i)
        if len(keep) != batch:
            self._select(keep)

    def _accept(self, row: _Row, token: int) -> bool:
        """Record a sampled token; send text; False when the row is done."""
        req = row.req
        if req.cancelled:
            return False
        p = req.params
        if token in p.stop_token_ids:
            self._finish(req, "stop")
            return False
        req.output_ids.append(token)
        req.stop_text.extend(req.detok.add(token))
        if req.stop_text.stopped:
            self._finish(req, "stop")
            return False
        if len(req.output_ids) >= p.max_new_tokens or row.length + 1 >= self.context_len:
            req.stop_text.extend(req.detok.flush())
            self._finish(req, "stop" if req.stop_text.stopped else "length")
            return False
        visible = req.stop_text.visible()
        # Until some text went out, every change goes out (the first token's text may be held back).
        due = req.sent_len < 1 or (len(req.output_ids) - 1) % self.stream_interval == 0
        if due and len(visible) != req.sent_len:
            req.sent_len = len(visible)
            self._send(req, visible, None)
        return True

    def _finish(self, req: Request, reason: str | None, error: str | None = None) -> None:
        text = req.stop_text.visible(final=True) if req.stop_text else ""
        self._send(req, text, reason, error)

    def _send(self, req: Request, text: str, reason: str | None, error: str | None = None) -> None:
        if req.params.echo:
            text = req.params.prompt + text
        try:
            req.sink(Chunk(text, len(req.prompt_ids), len(req.output_ids), reason, error))
        except Exception:  # a closed client must not break the batch
            req.cancel()

    # ---- the batched KV cache ----
    def _dequeue(self, group: list[Request]) -> None:
        ids = {id(r) for r in group}
        self.waiting[:] = [r for r in self.waiting if id(r) not in ids]

    def _merged_cache(self, new: tuple) -> GrowingCache:
        """The running batch's cache with new rows (their legacy-format cache `new`) appended, the
        narrower side left-padded. Builds a new cache; the running one is left as it is."""
        if self.cache is None:
            return GrowingCache.from_legacy_cache(new)
        old = self.cache.to_legacy_cache()
        width = max(old[0][0].shape[-2], new[0][0].shape[-2])
        layers = []
        for (ko, vo), (kn, vn) in zip(old, new, strict=True):
            layers.append((
                torch.cat([_left_pad(ko, width), _left_pad(kn, width)], dim=0),
                torch.cat([_left_pad(vo, width), _left_pad(vn, width)], dim=0),
            ))
        return GrowingCache.from_legacy_cache(tuple(layers))

    def _kept_prefix(self, req: Request) -> bool:
        """Whether the prompt begins with kept keys and values (then it is prefilled from them, with the prompts
        that begin with the same ones). Prompts of paths.alone_from tokens or more never do: prefilled whole,
        they run on PyTorch's matmul or SDPA, which a prompt started from kept keys would not match."""
        if not req.looked_up:
            req.looked_up = True
            if self.prefix_cache is not None and len(req.prompt_ids) < paths.current().alone_from:
                req.prefix = self.prefix_cache.lookup(req.prompt_ids)
        return req.prefix is not None

    def _starts_alike(self, first: Request, req: Request) -> bool:
        """Whether `req` may be prefilled with `first`: neither starts from kept keys and values, or both from
        the same kept tokens."""
        kept_first, kept_req = self._kept_prefix(first), self._kept_prefix(req)
        if not (kept_first and kept_req):
            return kept_first == kept_req
        n = first.prefix.tokens
        return req.prefix.tokens == n and req.prompt_ids[:n] == first.prompt_ids[:n]

    def _keep_leaving_rows(self, keep: list[int]) -> None:
        """Hand the keys and values of the rows that leave the batch to the prefix cache."""
        store = self.prefix_cache
        if store is None or self.cache is None:
            return
        kept = set(keep)
        layers = self.cache.to_legacy_cache()
        width = layers[0][0].shape[-2]
        alone_from = paths.current().alone_from
        for i, row in enumerate(self.rows):
            # Not the keys of a prompt prefilled on PyTorch (paths.alone_from or longer): a shorter prompt that
            # begins like it and started from them would not get its own whole prefill's result.
            if i not in kept and len(row.req.prompt_ids) < alone_from:
                tokens = (row.req.prompt_ids + row.req.output_ids)[:row.length]
                store.put(tokens, row_layers(layers, i, width - row.length, width))

    def _select(self, keep: list[int]) -> None:
        self._keep_leaving_rows(keep)
        if not keep:
            self.rows, self.cache = [], None
            return
        self.rows = [self.rows[i] for i in keep]
        width = self.cache.get_seq_length()
        # Columns that are padding in every remaining row are dropped.
        trim = width - max(r.length for r in self.rows)
        idx = torch.tensor(keep, dtype=torch.long)
        layers = tuple((k[idx, :, trim:, :], v[idx, :, trim:, :]) for k, v in self.cache.to_legacy_cache())
        self.cache = GrowingCache.from_legacy_cache(layers)


def decode_logits(model, native_step, ready_mask: bool, cache: GrowingCache, tokens: list[int],
                  lengths: list[int]) -> torch.Tensor:
    """One decode step of rows left-padded in `cache` (row i: `lengths[i]` real tokens, then `tokens[i]`): their
    logits [rows, vocab], the cache updated in place. On `native_step` (kernels/decode_step.py) where the model has
    one, else the model's forward; `ready_mask`: the model takes a ready 4D mask (model_inputs.takes_ready_mask).
    The bench's shape run times decode with this too (bench/shape_run.py)."""
    width = cache.get_seq_length()
    input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long)
    mask = torch.zeros(len(tokens), width + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    padded = min(lengths) < width
    # Each row continues at its own position, whatever its padding.
    positions = torch.tensor([[n] for n in lengths], dtype=torch.long)
    if native_step is not None:
        return native_step(input_ids, positions, mask if padded else None, cache)
    if ready_mask and padded:
        mask = mask.bool()[:, None, None, :]  # see takes_ready_mask
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True)
    if out.past_key_values is not cache:
        raise RuntimeError("the model's forward returned another cache than the one it was given")
    return out.logits[:, -1, :]


def _select_rows(layers: tuple, keep: list[int], total: int) -> tuple:
    if len(keep) == total:
        return layers
    idx = torch.tensor(keep, dtype=torch.long)
    return tuple((k[idx], v[idx]) for k, v in layers)


def _history(req: Request) -> list[int]:
    # Only the repetition penalty reads the history (prompt + output, as FastChat's generate_stream).
    return req.prompt_ids + req.output_ids if req.params.repetition_penalty > 1.0 else []


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - t.shape[-2]
    if pad == 0:
        return t
    zeros = t.new_zeros(*t.shape[:-2], pad, t.shape[-1])
    return torch.cat([zeros, t], dim=-2)
