"""Choose each call kind's implementation by measuring the candidates on the loaded model's own shapes, at worker
start: the decode step of 1 and 4 rows, prompt passes of 64, 256 and 1024 tokens, and attention over prompts of
256, 1024 and 2048 tokens (engine/kernels/paths.py says what each choice changes).

Why measured and not read off CPU flags: which side wins depends on the CPU's units (AVX2, AVX512_BF16, AMX),
on the model's widths and on the prompt's length. On an Intel Xeon with AMX, PyTorch's oneDNN matmul ran a
720-token Qwen2.5-0.5B prompt 6x faster than the project's kernel, which reads each weight once per decode step
and wins decode steps on the same machine; on an AMD EPYC with AVX512_BF16 the kernel ran the same prompt faster.
Flags only rule out what cannot run (no kernel built: nothing to choose).

What is timed: one decoder layer's linears (the first layer's shapes, the q/k/v and gate/up projections sharing
one matmul as the engine computes them; random weights, in a child process: measure_in_child says why), on each
candidate, summed; and one layer's attention with the model's heads and head size. Bounded: a warm-up at the smallest size, then the fastest of up to REPEATS runs a size while a
candidate stays under BUDGET_S, a size skipped once the previous one took longer than BUDGET_S. A few seconds on a 7B
shape, a fraction of a second on the small models. A PyTorch candidate must beat the kernel by MARGIN to be
chosen: a switch that wins by noise is not worth its grouping and prefix-cache losses (paths.py).

Cached per machine (CPU model, flags, threads), model shape, dtype and source (engine/kernels/ and torch's
version): a worker restarted on the same machine reads the choice back instead of measuring again. Workers of
one machine measure one at a time (a file lock), so none times another's load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.host.hardware import cpu_flags, cpu_model
from engine.kernels import paths
from engine.kernels.linear import SHARED_INPUT_GROUPS, choose_backend, torch_rows
from engine.kernels.native import cache_dir, native_kernel

DECODE_ROWS = (1, 4)
PROMPT_TOKENS = (64, 256, 1024)
ATTENTION_QUERIES = (256, 1024, 2048)
REPEATS = 5
BUDGET_S = 1.5
CHILD_TIMEOUT_S = 300
BUSY_CORES = 0.25  # other processes' load during a measurement beyond which its result is not cached
RETRY_AFTER_S = 3.0
MARGIN = 0.95  # a PyTorch candidate is chosen where it takes less than this share of the kernel's time
UNIT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
SOURCES = Path(__file__).parent


def paths_for(spec: str, model: nn.Module, say: Callable[[str], None] = print) -> paths.Paths:
    """The Paths a --paths setting names for this model: measured (choose_paths) for "measure", else as written."""
    chosen = paths.parse(spec)
    return choose_paths(model, say=say) if chosen == paths.MEASURE else chosen


def choose_paths(model: nn.Module, *, use_cache: bool = True, say: Callable[[str], None] = print) -> paths.Paths:
    """The Paths this machine runs `model`'s calls fastest on (measured in a child process on the model's shapes,
    or read from the cache); `say` gets one line per call kind with the figures. Call before
    engine.kernels.install(model, ...): it reads the shapes of the model's plain linears. Never raises for a failed
    measurement: everything stays on the kernels, and `say` tells why."""
    dtype = next(model.parameters()).dtype
    kernel, why = native_kernel()
    backend, _ = choose_backend(dtype)
    if kernel is None or backend is None or backend.unpack is None:
        say(f"paths: everything on the default paths, nothing to choose ({why or f'no kernel for {dtype}'})")
        return paths.KERNELS
    layer = layer_shapes(model)
    attn = attention_shape(model)
    if not layer:
        say("paths: everything on the kernels (no decoder layer's linears found to measure)")
        return paths.KERNELS
    key, signature = cache_key(dtype, layer, attn)
    file = paths_cache_dir() / f"{key}.json"
    source = f"measured before on this machine ({file})"
    with _one_at_a_time():
        chosen = _read(file) if use_cache else None
        if chosen is None:
            try:
                chosen, others = measure_in_child(signature)
                if others > BUSY_CORES:  # once more, after the other work (another worker loading) had time to end
                    time.sleep(RETRY_AFTER_S)
                    chosen, others = min([(chosen, others), measure_in_child(signature)], key=lambda r: r[1])
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
                say(f"paths: everything on the kernels: the measurement failed ({e})")
                return paths.KERNELS
            source = "measured now"
            if others > BUSY_CORES:
                # Timed beside other work: used, not kept, so that a quieter start measures again.
                source += f", beside other processes using {others:.1f} cores: not cached"
            elif use_cache:
                _write(file, chosen, signature)
    for line in explain(chosen):
        say(f"paths: {line}")
    say(f"paths: {source}")
    return chosen


@contextlib.contextmanager
def _one_at_a_time():
    """Hold the machine's measuring lock: the workers of a stack start together, and two measuring at once on
    the same cores would each time the other's load. The second waits, then finds the first's result cached
    when its model has the same shape."""
    folder = paths_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "measuring.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def paths_cache_dir() -> Path:
    root = os.environ.get("CPU_ARENA_PATHS_CACHE")
    return Path(root) if root else cache_dir().parent / "paths"


def layer_shapes(model: nn.Module) -> list[tuple[int, int, bool]]:
    """(outputs, inputs, has a bias) of the first decoder layer's linears as the engine multiplies them: each of
    SHARED_INPUT_GROUPS as one matmul of their outputs together, every other linear alone."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    first = next((re.match(r"(.*?\.\d+\.)", name) for name, _ in linears if re.search(r"\.\d+\.", name)), None)
    if first is None:
        return []
    prefix = first.group(1)
    mine = {name[len(prefix):]: m for name, m in linears if name.startswith(prefix)}
    out = []
    for group in SHARED_INPUT_GROUPS:
        names = [n for n in mine if n.rsplit(".", 1)[-1] in group]
        parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        if len(names) == len(group) and len(parents) == 1:
            ms = [mine.pop(n) for n in names]
            out.append((sum(m.out_features for m in ms), ms[0].in_features, any(m.bias is not None for m in ms)))
    out.extend((m.out_features, m.in_features, m.bias is not None) for m in mine.values())
    return out


def attention_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head size) from the model's config, or None when it does not say."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(heads), int(kv), int(dim)


def cache_key(dtype: torch.dtype, layer: list, attn: tuple | None) -> tuple[str, dict]:
    flags = cpu_flags()
    source = hashlib.sha256()
    for p in sorted(SOURCES.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".c", ".h"):
            source.update(p.name.encode() + p.read_bytes())
    signature = {
        "cpu": cpu_model(),
        "units": [f for f in UNIT_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "linears": [list(shape) for shape in layer],
        "attention": list(attn) if attn else None,
        "source": source.hexdigest()[:16],
    }
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:20], signature


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn: Callable[[], object]) -> float:
    """The fastest of up to REPEATS runs (fewer once BUDGET_S is spent): other processes on the machine only ever
    add time, so the minimum is the figure least disturbed by them."""
    times: list[float] = []
    while len(times) < REPEATS and sum(times) < BUDGET_S:
        times.append(_timed(fn))
    return min(times)


def measure(kernel, backend, dtype: torch.dtype, layer: list, attn: tuple | None) -> paths.Paths:
    """Time every candidate (see the module's docstring) and pick."""
    packed = [(backend.pack(w), b) for w, b in layer]
    n_in = [w.shape[1] for w, _ in layer]
    torch.manual_seed(0)

    def kernel_pass(x: dict[int, torch.Tensor]) -> Callable[[], list]:
        return lambda: [backend.run(x[n], p, b) for (p, b), n in zip(packed, n_in, strict=True)]

    def rows_pass(x: dict[int, torch.Tensor]) -> Callable[[], list]:
        return lambda: [torch_rows(x[w.shape[1]], w, b) for w, b in layer]

    def inputs(rows: int) -> dict[int, torch.Tensor]:
        return {n: torch.randn(rows, n).to(dtype) for n in set(n_in)}

    figures: dict = {"decode": {}, "prompt": {}, "attention": {}}
    # Decode: the kernel, against PyTorch's matmul one row at a time (the only way its rows do not change with
    # the batch).
    kernel_pass(inputs(1))()  # warm-up: first calls set up pools and oneDNN's primitives
    rows_pass(inputs(1))()
    for rows in DECODE_ROWS:
        x = inputs(rows)
        k = _best(kernel_pass(x))
        t = _best(rows_pass(x))
        figures["decode"][rows] = {"kernel": k, "torch": t}
    decode = paths.TORCH if all(f["torch"] < MARGIN * f["kernel"] for f in figures["decode"].values()) \
        else paths.KERNEL

    prompt_from = paths.NEVER
    if decode == paths.KERNEL:
        # A prompt pass on PyTorch's matmul unpacks each weight for the call (the model keeps the packed copy only):
        # that cost is in its figure.
        wins = {}
        for tokens in PROMPT_TOKENS:
            x = inputs(tokens)
            k = _best(kernel_pass(x))
            t = _best(lambda x=x: [F.linear(x[n], backend.unpack(p, n), b)
                                     for (p, b), n in zip(packed, n_in, strict=True)])
            figures["prompt"][tokens] = {"kernel": k, "torch": t}
            wins[tokens] = t < MARGIN * k
            if max(k, t) > BUDGET_S:
                break
        prompt_from = _from(wins)
    packed.clear()  # the packed copies go before attention is timed

    attention_from = paths.KERNELS.attention_torch_from
    if attn is not None and dtype in (torch.bfloat16, torch.float32):
        from engine.kernels.attention import _original as torch_sdpa

        heads, kv, dim = attn
        scale = 1.0 / math.sqrt(dim)
        wins = {}
        for queries in ATTENTION_QUERIES:
            q = torch.randn(1, heads, queries, dim).to(dtype)
            k_, v_ = (torch.randn(1, kv, queries, dim).to(dtype) for _ in range(2))
            if not wins:  # warm both up once
                kernel.attention(q[:, :, :8], k_[:, :, :8], v_[:, :, :8], None, scale, causal=True)
                torch_sdpa(q[:, :, :8], k_[:, :, :8], v_[:, :, :8], is_causal=True, enable_gqa=kv != heads)
            k = _best(lambda q=q, k_=k_, v_=v_: kernel.attention(q, k_, v_, None, scale, causal=True))
            t = _best(lambda q=q, k_=k_, v_=v_: torch_sdpa(q, k_, v_, is_causal=True, enable_gqa=kv != heads))
            figures["attention"][queries] = {"kernel": k, "torch": t}
            wins[queries] = t < MARGIN * k
            if max(k, t) > BUDGET_S:
                break
        attention_from = max(2, _from(wins))
    return paths.Paths(decode=decode, prompt_torch_from=prompt_from, attention_torch_from=attention_from,
                       figures=figures)


def _from(wins: dict[int, bool]) -> int:
    """The smallest measured size from which PyTorch won at every larger measured size too, else paths.NEVER."""
    start = paths.NEVER
    for size in sorted(wins, reverse=True):
        if not wins[size]:
            break
        start = size
    return start


def explain(chosen: paths.Paths) -> list[str]:
    """One line per call kind: what runs it, and the figures it was chosen on (ms per layer)."""
    said = chosen.describe()
    lines = []
    for kind, unit in (("decode", "rows"), ("prompt", "tokens"), ("attention", "tokens")):
        figs = chosen.figures.get(kind) or {}
        detail = ", ".join(f"{size} {unit}: kernel {f['kernel'] * 1e3:.2f} ms, torch {f['torch'] * 1e3:.2f} ms"
                           for size, f in figs.items())
        lines.append(f"{kind} on {said[kind]}" + (f" (one layer; {detail})" if detail else ""))
    return lines


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat), or 0 where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(f) for f in fields]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure_in_child(signature: dict) -> tuple[paths.Paths, float]:
    """measure() on random weights of the signature's shapes (timing does not depend on the values), in a child
    process, on its main thread: none of the worker's threads (its HTTP loop, the OpenMP pools its loading left)
    share the process with the timed calls. Also returns how many cores other processes kept busy meanwhile (the
    machine's busy time less the child's own, over the wall time): a 2-thread kernel call waits for a core
    whenever another process holds one (calls of a Qwen2.5-0.5B layer then took 28-32 ms in steps of the 4 ms
    scheduler tick, against 0.5-1.5 ms on a quiet machine), and its figure then says nothing about the kernel."""
    busy, start = _busy_seconds(), time.monotonic()
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "engine.kernels.path_choice"], input=json.dumps(signature),
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-600:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (after.ru_utime - own.ru_utime) + (after.ru_stime - own.ru_stime)
    wall = max(time.monotonic() - start, 1e-3)
    others = max(0.0, _busy_seconds() - busy - child) / wall
    return _from_json(json.loads(done.stdout.strip().splitlines()[-1])), others


def _child_main() -> None:
    signature = json.loads(sys.stdin.read())
    torch.set_num_threads(signature["threads"])
    dtype = getattr(torch, signature["dtype"].removeprefix("torch."))
    layer = [(torch.randn(n_out, n_in).mul_(0.02).to(dtype), torch.zeros(n_out, dtype=dtype) if bias else None)
             for n_out, n_in, bias in signature["linears"]]
    kernel, why = native_kernel()
    backend, _ = choose_backend(dtype)
    if kernel is None or backend is None:
        raise SystemExit(f"no kernel to measure: {why}")
    attn = tuple(signature["attention"]) if signature["attention"] else None
    print(json.dumps(_to_json(measure(kernel, backend, dtype, layer, attn))))


def _to_json(chosen: paths.Paths) -> dict:
    def tokens(n: int) -> int | None:  # null: never
        return None if n >= paths.NEVER else n

    return {"decode": chosen.decode, "prompt_torch_from": tokens(chosen.prompt_torch_from),
            "attention_torch_from": tokens(chosen.attention_torch_from), "figures": chosen.figures}


def _from_json(data: dict) -> paths.Paths:
    return paths.Paths(decode=data["decode"], prompt_torch_from=data["prompt_torch_from"] or paths.NEVER,
                       attention_torch_from=data["attention_torch_from"] or paths.NEVER,
                       figures=data.get("figures", {}))


def _read(file: Path) -> paths.Paths | None:
    try:
        return _from_json(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(file: Path, chosen: paths.Paths, signature: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**_to_json(chosen), "signature": signature}, indent=1))
    os.replace(tmp, file)


if __name__ == "__main__":
    _child_main()
