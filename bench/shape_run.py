"""`make bench ARGS='--shape S'`: a random-weight model with a lab model's full dimensions, written in its published
layout and loaded by the native loader as the worker loads it (bench/shapes.py), measured against the memory
roofline step by step, at batch 4 and for its first token."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict

from bench.output import cpu_model, process_rss, write_json
from bench.stats import Stat, roofline_tokens_per_s, weight_bytes_per_token
from engine.host.hardware import cpu_count


def run_shape(args: argparse.Namespace) -> int:
    import torch

    from bench import raw
    from bench.raw import ReadProbe, param_bytes, probe_name, probed_decode, raw_decode
    from engine.host.hugepages import collapse_model, release_checkpoint_files
    from engine.kernels import install as install_kernels
    from engine.kernels.linear import linear_backend
    from engine.kv_cache import GrowingCache

    n = cpu_count()
    torch.set_num_threads(n)
    t = time.perf_counter()
    model = raw.build_shape_model(args.shape)  # the checkpoint written or reused, then the native loader
    built = time.perf_counter() - t
    how = getattr(model, "shape_build", None)  # None for a model built some other way (the tests' stand-ins)
    total, emb, tied = param_bytes(model)
    # As the batching worker serves it (engine/worker.py): linears, attention and fused ops
    # (engine/kernels/__init__.py), the weights on 2 MB pages, nothing left in the checkpoint's files.
    kernels = linear_backend(torch.bfloat16) if install_kernels(model) else "PyTorch's kernels"
    huge, why = collapse_model(model)
    release_checkpoint_files(model)
    kernels += f"; {huge / 1e9:.1f} GB of weights on 2 MB pages{f' ({why})' if why else ''}; the worker's KV cache"
    per_token = weight_bytes_per_token(total, emb, tied)
    tokens, repeats = args.tokens or (4 if args.quick else 16), args.repeats or (1 if args.quick else 3)
    tokens = max(tokens, 2)  # a probed run needs two tokens to time one step between probes
    ids = torch.randint(0, 1000, (1, 64))
    probe = ReadProbe(n)
    # The worker's KV cache too: transformers' DynamicCache copies every layer's cache every step, 12 ms of a
    # ~300 ms step here at 80 tokens (engine/kv_cache.py).
    raw_decode(model, ids, 2, 1, warm=False, cache=GrowingCache)  # warm-up
    rates, ttfts, steps, readings = [], [], [], []
    for _ in range(repeats):
        rate, ttft = raw_decode(model, ids, tokens, 1, warm=False, cache=GrowingCache)
        rates.append(rate.median)
        ttfts.append(ttft.median)
        # The roofline next to each step: this VM's bandwidth switches bands within seconds (probed_decode).
        run = probed_decode(model, ids, tokens, probe, cache=GrowingCache)
        steps += run
        readings += [s.before for s in run] + [run[-1].after]
    rate, ttft = Stat.of(rates), Stat.of(ttfts)
    # Each step's bytes/s against the probe read right before it (the target's figure), and the stricter
    # reading: a roofline is a ceiling, so against the faster of the probes before and after it.
    fraction = Stat.of([per_token / s.step_s / s.before for s in steps])
    strict = Stat.of([per_token / s.step_s / max(s.before, s.after) for s in steps])
    bw = Stat.of(readings)
    # The same steps' own rate: raw_decode's (an N-token generate less a 1-token one) carries the noise of two
    # prefills and once read 4.25 tok/s, 65 GB/s, where no probe read more than 56.
    step_rate = Stat.of([1 / s.step_s for s in steps])
    roof = roofline_tokens_per_s(bw.median, per_token)
    rate4, _ = raw_decode(model, ids.repeat(4, 1), tokens, 1, cache=GrowingCache)
    load = how.load if how else None
    out = {"shape": args.shape, "path": how.path if how else "a model built in memory (not the native loader)",
           "checkpoint": str(how.checkpoint) if how else None, "checkpoint_dtype": how.checkpoint_dtype if how else None,
           "checkpoint_bytes": how.checkpoint_bytes if how else None,
           "checkpoint_written_s": how.written_s if how else None, "load_s": how.load_s if how else None,
           "load_peak_rss_bytes": load.peak_rss_bytes if load else None,
           "load_rss_ratio": load.ratio if load else None, "load_rss": asdict(load) if load else None,
           "cpu": cpu_model(), "dtype": "bfloat16", "kernels": kernels, "threads": n, "built_s": built,
           "weights_bytes": total, "bytes_read_per_token": per_token, "rss_bytes": process_rss(os.getpid()),
           "bandwidth_gbs": bw.median / 1e9,
           "bandwidth_noise_gbs": [bw.min / 1e9, bw.max / 1e9], "bandwidth_probe": probe_name(), "decode_tokens_per_s": rate.__dict__, "decode_tokens_per_s_per_step": step_rate.__dict__, "ttft_64_tokens_s": ttft.__dict__, "roofline_tokens_per_s": roof,
           "roofline_fraction": {args.shape: fraction.median}, "roofline_fraction_noise": [fraction.min, fraction.max],
           "roofline_fraction_against_faster_probe": strict.__dict__,
           "probed_steps": [{"step_s": s.step_s, "before_gbs": s.before / 1e9, "after_gbs": s.after / 1e9} for s in steps],
           "decode_tokens_per_s_per_repeat": rates,
           "batch4_aggregate_tokens_per_s": rate4.__dict__,
           # Against batch 1 timed the same way (generate lengths), not against the probed steps.
           "batch4_ratio": rate4.median / rate.median,
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
          f"roofline {roof:.2f} tok/s; batch 1 decode {step_rate.fmt(2)} tok/s a step ({rate.fmt(2)} by generate "
          f"lengths); {fraction.fmt(2)} of the roofline "
          f"({len(steps)} steps, each against the probe read right before it; {strict.fmt(2)} against the faster of "
          f"the probes before and after it); 64-token prompt TTFT {ttft.fmt(2)} s; batch 4 {rate4.fmt(2)} tok/s total "
          f"(x{out['batch4_ratio']:.2f} batch 1 by generate lengths)")
    write_json(args, out)
    return 0
