"""`make bench ARGS='--shape S'`: a random-weight model with a lab model's full dimensions, written in its published
layout and loaded by the native loader as the worker loads it (bench/shapes.py), measured against the memory
roofline step by step, at batch 4 and for its first token; and in the same run, plain PyTorch on the same model:
the first token of a 64-token prompt and prompt passes of ~1,000 and ~4,000 tokens on both, against the machine's
matmul peak (bench/prompts.py's arithmetic).

Why plain PyTorch first, then the engine, and not alternated as bench/prompts.py does for the served models: a
7B-shaped model is 13-16 GB of 24, so one copy fits, and engine.kernels.install replaces its linears in place
(they cannot be put back). The model as the native loader gives it is plain PyTorch (a transformers
Qwen2ForCausalLM / GlmForCausalLM in bf16): it is measured first, then put on the kernels and measured as the
engine, back to back, each side after its own warm-up. The prompts are the same token ids on both sides.

Every measurement runs on this process's main thread, its only one that computes (engine/thread.py: one OpenMP
pool; a second long-lived thread's pool would throttle both). The matmul peak runs in a child process.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.output import cpu_model, process_rss, write_json
from bench.stats import Stat, roofline_tokens_per_s, weight_bytes_per_token
from engine.host.hardware import cpu_count

TTFT_TOKENS = 64  # the first-token figure's prompt, engine and plain PyTorch
PROMPT_LENGTHS = (TTFT_TOKENS, 1000, 4000)
QUICK_PROMPT_LENGTHS = (TTFT_TOKENS, 1000)
# Default repeats of a prompt length: as many as fit in this many prompt tokens, 1 to 3 (64 -> 3, 1000 -> 2,
# 4000 -> 1). A 4,000-token pass of the 7B shape takes minutes on each side (see the module's docstring).
PROMPT_REPEAT_TOKENS = 2000
SHAPE_PROMPTS_HELP = ("--shape only: prompt lengths in tokens whose prompt pass is timed on plain PyTorch and on the "
                      f"engine (default {','.join(map(str, PROMPT_LENGTHS))}; quick "
                      f"{','.join(map(str, QUICK_PROMPT_LENGTHS))}; --no-long-prompts {TTFT_TOKENS})")


def shape_prompts(spec: str) -> tuple[int, ...]:
    """--shape-prompts: comma-separated prompt lengths in tokens (each measured once, in the order given)."""
    try:
        lengths = tuple(dict.fromkeys(int(s) for s in spec.split(",") if s.strip()))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: give prompt lengths in tokens, e.g. 64,1000,4000")
    return lengths


@dataclass(frozen=True)
class ShapePromptPlan:
    """Which prompt lengths the shape bench times on both sides, and how often each (--shape-prompts, --quick,
    --repeats, --no-long-prompts)."""

    repeats: dict[int, int]  # prompt tokens -> repeats, in the order measured

    @classmethod
    def of(cls, args: argparse.Namespace) -> ShapePromptPlan:
        lengths = args.shape_prompts or (
            (TTFT_TOKENS,) if getattr(args, "no_long_prompts", False)
            else QUICK_PROMPT_LENGTHS if args.quick else PROMPT_LENGTHS)
        if args.repeats:
            return cls(dict.fromkeys(lengths, args.repeats))
        if args.quick:
            return cls(dict.fromkeys(lengths, 1))
        return cls({n: min(3, max(1, PROMPT_REPEAT_TOKENS // n)) for n in lengths})


def prompt_ids(tokens: int, repeat: int, vocab: int) -> list[int]:
    """A prompt of random token ids, its own for every length and repeat, the same on both sides."""
    import torch

    gen = torch.Generator().manual_seed(7919 * tokens + repeat)
    return torch.randint(0, vocab, (tokens,), generator=gen).tolist()


def torch_prompt_pass(model, ids: list[int]) -> None:
    """Plain transformers' prompt pass, as bench/prompts.py times it for the served models: the last position's
    logits and the KV cache, nothing of the project's."""
    import torch

    model(torch.tensor([ids]), logits_to_keep=1)


def engine_prompt_pass(model, ids: list[int]) -> None:
    """The engine's prompt pass of one request, as the batching worker runs it (engine/batching.py _admit: a
    request alone is prefilled by engine.prefill.prefill; `share` only matters for several prompts, pad id only
    for padding). The one place the shape bench runs the engine's prompt pass: whatever decides where a worker's
    prompt passes run wraps this call."""
    from engine.prefill import prefill

    prefill(model, [ids], 0, share=False)


def time_prompt_passes(side: str, run: Callable[[object, list[int]], None], model, prompts: dict[int, list[list[int]]],
                       warm: list[int], log=print) -> dict[int, list[float]]:
    """Seconds of `run(model, ids)` for every prompt, after one warm-up pass of `warm` (first-call costs: thread
    pool, packing buffers, the allocator's first pages)."""
    import torch

    out: dict[int, list[float]] = {}
    with torch.inference_mode():
        run(model, warm)
        for n, reps in prompts.items():
            out[n] = []
            for r, ids in enumerate(reps):
                log(f"  {side}: {n}-token prompt pass, repeat {r + 1}/{len(reps)} ...", flush=True)
                t = time.perf_counter()
                run(model, ids)
                out[n].append(time.perf_counter() - t)
    return out


def unpaired_ratio(engine: list[float], torch_: list[float]) -> Stat | None:
    """engine / plain PyTorch for figures measured minutes apart, not side by side (see the module's docstring):
    the ratio of the medians, its range the extremes against each other (fastest engine over slowest PyTorch to
    slowest over fastest)."""
    e, t = Stat.of(engine), Stat.of(torch_)
    if e is None or t is None or t.min <= 0:
        return None
    return Stat(e.median / t.median, e.min / t.max, e.max / t.min, min(e.n, t.n))


def prompt_figures(shape, prompts: dict[int, list[list[int]]], engine: dict[int, list[float]],
                   torch_: dict[int, list[float]], peak: float | None) -> dict[str, dict]:
    """Per prompt length (as "64"): bench/prompts.py's summarize of the engine's and plain PyTorch's passes (seconds,
    tokens/s, fraction of the matmul peak, FLOPs), engine / PyTorch (unpaired_ratio) and every repeat's seconds."""
    from bench.prompts import summarize

    out = {}
    for n, reps in prompts.items():
        rec = {"tokens": [len(ids) for ids in reps], "engine": engine[n], "torch": torch_[n]}
        s = summarize(rec, shape, peak)
        # Only these two paths here: the keys summarize gives the others (served, a stock worker...) and the
        # API's overhead would only ever be None.
        s = {k: v for k, v in s.items() if k.startswith(("engine_", "torch_")) or k in ("tokens", "flops")}
        ratio = unpaired_ratio(engine[n], torch_[n])
        s["engine_vs_torch"] = asdict(ratio) if ratio else None
        s["raw_s"] = {"engine": engine[n], "torch": torch_[n]}
        out[str(n)] = s
    return out


def _peak(threads: int, log=print) -> tuple[dict, float | None]:
    """bench/prompts.py's matmul peak in bf16 at `threads` (its own child process) and the GFLOP/s it sets the
    prompt passes against."""
    import subprocess

    from bench.prompts import measure_peak, peak_gflops

    log(f"matmul peak (bfloat16, {threads} thread(s)) ...", flush=True)
    try:
        peak = measure_peak("bfloat16", threads)
    except (RuntimeError, subprocess.SubprocessError) as e:
        return {"error": str(e)}, None
    return peak, peak_gflops(peak)


def run_shape(args: argparse.Namespace) -> int:
    import torch

    from bench import raw
    from bench.prompts import WARM_TOKENS, _shape_of, cpu_units, prompt_path
    from bench.raw import ReadProbe, engine_steps, first_token, param_bytes, probe_name
    from engine import kernels as engine_kernels
    from engine.host.hugepages import collapse_model, release_checkpoint_files
    from engine.kernels.decode_step import for_model
    from engine.kernels.linear import linear_backend
    from engine.kernels.path_choice import choose_paths
    from engine.kv_cache import GrowingCache

    started = time.perf_counter()
    phases: dict[str, float] = {}
    load_start = os.getloadavg()[0]
    n = cpu_count()
    torch.set_num_threads(n)
    # Plain PyTorch means stock transformers: nothing of an earlier install left in this process (attention,
    # rotary are process-wide).
    engine_kernels.uninstall()
    plan = ShapePromptPlan.of(args)
    t = time.perf_counter()
    # The matmul peak at both ends of the run, the faster one used: a peak is a ceiling, and one reading taken while
    # anything else ran on the cores (201 GFLOP/s against 430 seen) would put the prompt passes above it.
    peaks = [_peak(n)]  # before the model: its child needs a few hundred MB
    phases["matmul_peak_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = raw.build_shape_model(args.shape)  # the checkpoint written or reused, then the native loader
    built = phases["load_s"] = time.perf_counter() - t
    how = getattr(model, "shape_build", None)  # None for a model built some other way (the tests' stand-ins)
    total, emb, tied = param_bytes(model)
    shape = _shape_of(model)  # before install: the linears it counts are nn.Linear until then
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {k: [prompt_ids(k, r, vocab) for r in range(reps)] for k, reps in plan.repeats.items()}
    warm = prompt_ids(WARM_TOKENS, 0, vocab)  # each side's first pass: first-call costs stay out
    tokens, repeats = args.tokens or (4 if args.quick else 16), args.repeats or (1 if args.quick else 3)
    tokens = max(tokens, 2)  # a probed run needs two tokens to time one step between probes
    ids = torch.randint(0, 1000, (1, TTFT_TOKENS))

    # Plain PyTorch: the model as the native loader gave it, transformers' own cache and attention.
    print(f"plain PyTorch on the loaded model: first token of a {TTFT_TOKENS}-token prompt and prompt passes of "
          f"{', '.join(map(str, plan.repeats))} tokens ...", flush=True)
    t = time.perf_counter()
    first_token(model, ids, 1)  # warm-up
    torch_ttft = first_token(model, ids, repeats)
    torch_passes = time_prompt_passes("plain PyTorch", torch_prompt_pass, model, prompts, warm)
    phases["torch_s"] = time.perf_counter() - t

    # As the batching worker serves it (engine/worker.py): linears, attention and fused ops
    # (engine/kernels/__init__.py), the weights on 2 MB pages, nothing left in the checkpoint's files.
    t = time.perf_counter()
    # The paths the worker would run this shape on here: measured (or read back) as at worker start.
    chosen = choose_paths(model)
    kernels = linear_backend(torch.bfloat16) if engine_kernels.install(model, chosen) else "PyTorch's kernels"
    huge, why = collapse_model(model)
    release_checkpoint_files(model)
    phases["install_s"] = time.perf_counter() - t
    native, not_native = for_model(model)
    kernels += (f"; {huge / 1e9:.1f} GB of weights on 2 MB pages{f' ({why})' if why else ''}; the worker's KV cache; "
                f"decode steps on {'decode_step.c' if native else f'the model forward ({not_native})'}")
    print(f"the engine ({kernels}): prompt passes ...", flush=True)
    t = time.perf_counter()
    engine_passes = time_prompt_passes("engine", engine_prompt_pass, model, prompts, warm)
    phases["engine_prompts_s"] = time.perf_counter() - t

    t = time.perf_counter()
    per_token = weight_bytes_per_token(total, emb, tied)
    probe = ReadProbe(n)
    # Decode as the worker runs it (raw.engine_steps: its prefill, its decode step, its KV cache; transformers'
    # DynamicCache would copy every layer's cache every step, 12 ms of a ~300 ms step here at 80 tokens).
    engine_steps(model, ids, 2)  # warm-up
    rates, steps, readings = [], [], []
    for _ in range(repeats):
        run = engine_steps(model, ids, tokens)
        rates.append((tokens - 1) / sum(s.step_s for s in run))
        # The roofline next to each step: this VM's bandwidth switches bands within seconds (engine_steps).
        run = engine_steps(model, ids, tokens, probe)
        steps += run
        readings += [r for s in run for r in (s.before, s.after)]
    rate = Stat.of(rates)
    # The first token as before: a 1-token generate on the installed model with the worker's cache.
    ttft = first_token(model, ids, repeats, cache=GrowingCache)
    # Each step's bytes/s against the probe read right before it (the target's figure), and the stricter
    # reading: a roofline is a ceiling, so against the faster of the probes before and after it.
    fraction = Stat.of([per_token / s.step_s / s.before for s in steps])
    strict = Stat.of([per_token / s.step_s / max(s.before, s.after) for s in steps])
    bw = Stat.of(readings)
    # The probed steps' own rate, beside the unprobed runs' (whose steps run back to back).
    step_rate = Stat.of([1 / s.step_s for s in steps])
    roof = roofline_tokens_per_s(bw.median, per_token)
    rate4 = Stat.of([4 * (tokens - 1) / sum(s.step_s for s in engine_steps(model, ids.repeat(4, 1), tokens))])
    phases["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    peaks.append(_peak(n))
    phases["matmul_peak_s"] += time.perf_counter() - t
    peak = max((g for _, g in peaks if g), default=None)
    lengths = prompt_figures(shape, prompts, engine_passes, torch_passes, peak)
    ttft_ratio = ttft.median / torch_ttft.median
    load = how.load if how else None
    out = {"shape": args.shape, "path": how.path if how else "a model built in memory (not the native loader)",
           "checkpoint": str(how.checkpoint) if how else None, "checkpoint_dtype": how.checkpoint_dtype if how else None,
           "checkpoint_bytes": how.checkpoint_bytes if how else None,
           "checkpoint_written_s": how.written_s if how else None, "load_s": how.load_s if how else None,
           "load_peak_rss_bytes": load.peak_rss_bytes if load else None,
           "load_rss_ratio": load.ratio if load else None, "load_rss": asdict(load) if load else None,
           "cpu": cpu_model(), "cpu_units": cpu_units(), "dtype": "bfloat16", "kernels": kernels, "threads": n,
           "built_s": built,
           "weights_bytes": total, "bytes_read_per_token": per_token, "rss_bytes": process_rss(os.getpid()),
           "bandwidth_gbs": bw.median / 1e9,
           "bandwidth_noise_gbs": [bw.min / 1e9, bw.max / 1e9], "bandwidth_probe": probe_name(), "decode_tokens_per_s": rate.__dict__, "decode_tokens_per_s_per_step": step_rate.__dict__, "ttft_64_tokens_s": ttft.__dict__, "roofline_tokens_per_s": roof,
           "roofline_fraction": {args.shape: fraction.median}, "roofline_fraction_noise": [fraction.min, fraction.max],
           "roofline_fraction_against_faster_probe": strict.__dict__,
           "probed_steps": [{"step_s": s.step_s, "before_gbs": s.before / 1e9, "after_gbs": s.after / 1e9} for s in steps],
           "decode_tokens_per_s_per_repeat": rates,
           "batch4_aggregate_tokens_per_s": rate4.__dict__,
           # Against batch 1 timed the same way (unprobed runs), not against the probed steps.
           "batch4_ratio": rate4.median / rate.median,
           # Plain PyTorch on the same model, timed as ttft_64_tokens_s is (a 1-token generate of the same ids).
           "torch_ttft_64_tokens_s": asdict(torch_ttft), "ttft_64_vs_torch_ratio": ttft_ratio,
           # Per prompt length: the engine's prompt pass / plain PyTorch's (medians; not alternated, see
           # bench/shape_run.py), and each one's fraction of the matmul peak and tokens/s (medians).
           "prefill_vs_torch_ratio": {args.shape: {k: v["engine_vs_torch"] for k, v in lengths.items()}},
           "prompt_fraction_of_matmul_peak": {args.shape: {
               k: {p: (v[f"{p}_fraction_of_matmul_peak"] or {}).get("median") for p in ("engine", "torch")}
               for k, v in lengths.items()}},
           "prompt_tokens_per_s": {args.shape: {
               k: {p: v[f"{p}_tokens_per_s"]["median"] for p in ("engine", "torch")} for k, v in lengths.items()}},
           "prompts": {
               "order": "plain PyTorch on the model as loaded, then the kernels installed on the same model and the "
                        "engine: back to back, each after its own warm-up, not alternated (one copy of the model fits)",
               "torch": "transformers' model(ids, logits_to_keep=1) on the native loader's model, before "
                        "engine.kernels.install; weights on the pages the loader gave them",
               "engine": "engine.prefill.prefill on the installed model, one request as the batching worker runs it",
               "path": prompt_path("bfloat16"),
               "paths": {**chosen.describe(), "spec": chosen.spec(), "figures": chosen.figures},
               # bench/prompts.py's measure_peak at the start and at the end; the faster median is used.
               "matmul_peak_gflops": [reading for reading, _ in peaks], "matmul_peak_used_gflops": peak,
               "model_shape": asdict(shape), "repeats": {str(k): v for k, v in plan.repeats.items()},
               "lengths": lengths},
           "phases_s": {**phases, "total_s": time.perf_counter() - started},
           # Other processes on the same cores skew every number: keep the load next to them.
           "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
           "loadavg_1min_end": os.getloadavg()[0]}
    if how:
        written = f"written in {how.written_s:.0f} s" if how.written_s is not None else "reused"
        source = (f"{how.path}; checkpoint {how.checkpoint} ({how.checkpoint_bytes / 1e9:.1f} GB {how.checkpoint_dtype}, "
                  f"{written}); load peak RSS {load.peak_rss_bytes / 1e9:.2f} GB = {load.ratio:.3f} x the "
                  f"{load.weights_bytes / 1e9:.2f} GB of bf16 weights (its own process; {load.load_s:.0f} s)")
    else:
        source = out["path"]
    print(f"{args.shape} (random weights, bf16, {n} threads, linears on {kernels}): {total / 1e9:.1f} GB ready in "
          f"{built:.0f} s, RSS {out['rss_bytes'] / 1e9:.1f} GB\n  {source}\n  bandwidth {bw.median / 1e9:.1f} "
          f"({bw.min / 1e9:.1f}-{bw.max / 1e9:.1f}) GB/s, "
          f"roofline {roof:.2f} tok/s; batch 1 decode {step_rate.fmt(2)} tok/s a probed step ({rate.fmt(2)} in "
          f"unprobed runs); {fraction.fmt(2)} of the roofline "
          f"({len(steps)} steps, each against the probe read right before it; {strict.fmt(2)} against the faster of "
          f"the probes before and after it); 64-token prompt TTFT {ttft.fmt(2)} s; batch 4 {rate4.fmt(2)} tok/s total "
          f"(x{out['batch4_ratio']:.2f} batch 1 in unprobed runs)")
    print(prompt_lines(out))
    write_json(args, out)
    return 0


def prompt_lines(out: dict) -> str:
    """The report's block of first-token and prompt-pass figures, engine beside plain PyTorch."""
    from bench.stats import _s

    p = out["prompts"]
    units = ", ".join(out["cpu_units"]) or "no vector units listed"
    peak = p["matmul_peak_used_gflops"]
    lines = [f"  on {out['cpu']} ({units}), {out['threads']} threads; engine prompt pass: linears on "
             f"{p['path']['linear']}; attention on {p['path'].get('attention', 'torch SDPA')}; "
             f"matmul peak {f'{peak:.0f} GFLOP/s' if peak else 'not measured'}",
             f"  first token of a {TTFT_TOKENS}-token prompt: engine {_s(out['ttft_64_tokens_s'])} s, plain PyTorch "
             f"{_s(out['torch_ttft_64_tokens_s'])} s (x{out['ttft_64_vs_torch_ratio']:.2f})"]
    for k, v in p["lengths"].items():
        frac = {s: (v[f"{s}_fraction_of_matmul_peak"] or {}).get("median") for s in ("engine", "torch")}
        lines.append(f"  {k}-token prompt pass: engine {_s(v['engine_s'])} s ({_s(v['engine_tokens_per_s'], 0)} tok/s, "
                     f"{_frac(frac['engine'])} of the peak), plain PyTorch {_s(v['torch_s'])} s "
                     f"({_s(v['torch_tokens_per_s'], 0)} tok/s, {_frac(frac['torch'])}); engine/PyTorch "
                     f"x{_s(v['engine_vs_torch'])}")
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in out["phases_s"].items())
    lines.append(f"  time: {phases}; load average (1 min) {out['loadavg_1min']['start']:.2f} at start, "
                 f"{out['loadavg_1min']['end']:.2f} at end")
    return "\n".join(lines)


def _frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
