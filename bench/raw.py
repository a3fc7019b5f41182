"""In-process measurements: memory bandwidth, plain transformers `generate`, the 7B-shaped models."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch  # loaded before read_probe.c: its OpenMP runtime is the one the probe's libgomp.so.1 resolves to

from bench.stats import Stat

PROBE_SOURCE = Path(__file__).with_name("csrc") / "read_probe.c"


@contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bandwidth_bytes_per_s(n_threads: int, mb: int = 512, repeats: int = 5) -> Stat:
    """Read a large fp32 array (larger than any cache) and time it.

    fp32 on purpose: torch's bf16 .sum() runs at ~1 GB/s here and would measure the ALU, not memory.
    """
    probe = ReadProbe(n_threads, mb)
    return Stat.of([probe() for _ in range(repeats)])


class NativeReadProbe:
    """read_probe.c, loaded: called on a contiguous fp32 tensor, its sum, read with 8 streams per thread."""

    def __init__(self, path: Path):
        self.path = path
        self._sum = ctypes.CDLL(str(path)).read_probe
        self._sum.restype = ctypes.c_float
        self._sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]

    def __call__(self, a: torch.Tensor) -> float:
        if a.dtype != torch.float32 or not a.is_contiguous():
            raise ValueError("read_probe needs a contiguous fp32 tensor")
        return self._sum(a.data_ptr(), a.numel(), torch.get_num_threads())


@cache
def native_read_probe() -> NativeReadProbe | None:
    """read_probe.c compiled (once, by the kernels' build: same compiler flags, same cache) and loaded, or None
    where it cannot be (a CPU without AVX2 and FMA, no C compiler): then the probe is torch's sum."""
    from engine.host.hardware import cpu_flags
    from engine.kernels.native import NEEDS, build

    if not set(NEEDS) <= cpu_flags():
        return None
    try:
        return NativeReadProbe(build(sources=(PROBE_SOURCE,), headers=(), name="read-probe"))
    except (OSError, RuntimeError):
        return None


class ReadProbe:
    """A large fp32 array (larger than any cache), allocated once; each call reads it end to end and
    returns the bytes per second it took."""

    def __init__(self, n_threads: int, mb: int = 512):
        from engine.host.hugepages import collapse

        self.n_threads = n_threads
        self.x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
        # On 2 MB pages where the kernel allows, like the served weights (hugepages.py): the memory's
        # limit, not the TLB's (4 kB pages read ~12% slower here).
        collapse([self.x])
        self._read = native_read_probe() or torch.sum  # see read_probe.c for why
        self()  # warm: page faults and thread pool start

    def __call__(self) -> float:
        with threads(self.n_threads):
            t = time.perf_counter()
            self._read(self.x)
            return self.x.numel() * 4 / (time.perf_counter() - t)


def probe_name() -> str:
    return "read_probe.c, 8 streams per thread" if native_read_probe() is not None else "torch fp32 sum"


def param_bytes(model) -> tuple[int, int, bool]:
    """(all parameter bytes, input-embedding bytes, tied?) — buffers excluded."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    return total, emb.numel() * emb.element_size(), tied


@torch.inference_mode()
def raw_decode(model, input_ids: torch.Tensor, new_tokens: int, repeats: int, warm: bool = True,
               cache: Callable[[], object] | None = None) -> tuple[Stat, Stat]:
    """(decode tokens/s, time to first token) of `generate`, greedy, batch = input_ids rows; `cache` makes
    each generate's KV cache (default: transformers' DynamicCache).

    TTFT is a 1-token generate; decode speed is (N-1) tokens over the difference between an
    N-token and a 1-token generate, so the prefill is not counted as decoding.
    """
    def generate(n: int, **more) -> None:
        _generate(model, input_ids, n, cache, **more)

    if warm:
        generate(2, min_new_tokens=2)
    ttfts, rates = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        generate(new_tokens, min_new_tokens=new_tokens)
        tn = time.perf_counter() - t
        ttfts.append(t1)
        rates.append(input_ids.shape[0] * (new_tokens - 1) / max(tn - t1, 1e-9))
    return Stat.of(rates), Stat.of(ttfts)


def _generate(model, input_ids: torch.Tensor, n: int, cache: Callable[[], object] | None, **more) -> None:
    """A greedy `generate` of n tokens, as raw_decode and first_token time it."""
    model.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(input_ids), **more,
                   **({"past_key_values": cache()} if cache else {}))


@torch.inference_mode()
def first_token(model, input_ids: torch.Tensor, repeats: int, cache: Callable[[], object] | None = None) -> Stat:
    """Time to first token as raw_decode times it (a 1-token `generate`), without its N-token generates: for a
    model whose decode is not measured (the shape bench's plain PyTorch side). No warm-up: the caller's."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _generate(model, input_ids, 1, cache)
        times.append(time.perf_counter() - t)
    return Stat.of(times)


@dataclass(frozen=True)
class ProbedStep:
    """One decode step of `engine_steps` and the memory bandwidth read right before and right after it."""

    step_s: float
    before: float  # bytes/s
    after: float


@torch.inference_mode()
def engine_steps(model, input_ids: torch.Tensor, new_tokens: int,
                 probe: Callable[[], float] | None = None) -> list[ProbedStep]:
    """The batching worker's decode of input_ids' rows: the worker's prefill, then new_tokens - 1 greedy steps on
    the step the worker takes (engine.batching.decode_logits: decode_step.c where the model has it, else its
    forward, on the worker's KV cache), each timed alone. With `probe`, the memory bandwidth is read right before
    and right after each step (0 without).

    Why a probe next to each step: this VM's memory bandwidth switches between bands (~30 and ~55 GB/s) within
    seconds, so a roofline read before and after a whole run of tokens may belong to another band than the tokens
    themselves; a probe next to each step is read within ~10 ms of it."""
    from engine.batching import decode_logits
    from engine.kernels.decode_step import for_model
    from engine.kv_cache import GrowingCache
    from engine.model_inputs import takes_ready_mask
    from engine.params import greedy_tokens
    from engine.prefill import prefill

    native, _ = for_model(model)
    ready = takes_ready_mask(model)
    prompts = input_ids.tolist()
    logits, layers = prefill(model, prompts, 0, share=False)
    cache = GrowingCache.from_legacy_cache(layers)
    tokens, lengths = greedy_tokens(logits), [len(p) for p in prompts]
    steps = []
    for _ in range(new_tokens - 1):
        before = probe() if probe else 0.0
        t = time.perf_counter()
        tokens = greedy_tokens(decode_logits(model, native, ready, cache, tokens, lengths))
        step = time.perf_counter() - t
        steps.append(ProbedStep(step, before, probe() if probe else 0.0))
        lengths = [n + 1 for n in lengths]
    return steps


@torch.inference_mode()
def next_turn_prefill(model, first: list[int], answer: list[int], second: list[int],
                      repeats: int) -> tuple[Stat, Stat | None, int]:
    """A chat's second turn `second` (which repeats the first turn's prompt `first` and answer `answer`):
    (its prefill computed whole, its prefill from the kept first turn or None, how many tokens were kept), on the
    batching worker's prefill functions and prefix cache (engine/prefix_cache.py)."""
    from engine.prefill import prefill, prefill_after
    from engine.prefix_cache import PrefixCache

    cache = PrefixCache(1 << 40)
    turn = first + answer
    cache.put(turn, prefill(model, [turn], 0, share=False)[1])
    hit = cache.lookup(second)
    whole, kept = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        prefill(model, [second], 0, share=False)
        whole.append(time.perf_counter() - t)
        if hit:
            t = time.perf_counter()
            prefill_after(model, [second], hit, 0)
            kept.append(time.perf_counter() - t)
    return Stat.of(whole), Stat.of(kept) if kept else None, hit.tokens if hit else 0


def build_shape_model(shape: str, dtype: torch.dtype = torch.bfloat16):
    """The shape's random-weight model as the batching worker loads it: its published-layout checkpoint written
    (once) and loaded by the native loader in `dtype` (bench/shapes.py). `model.shape_build` (a
    shapes.ShapeBuild) says from where, and what the load cost in memory, measured in a child process."""
    from bench.shapes import SHAPES, build

    model, how = build(SHAPES[shape], str(dtype).removeprefix("torch."))
    model.shape_build = how
    return model
