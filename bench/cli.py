"""`make bench` / `python -m bench --config X [--json PATH] [--quick] [--worker W] [--shape S]`.

One run measures, per configured model: raw transformers `generate` (batch 1) decode tokens/s and
time to first token; the same through the running OpenAI API with streaming, and their ratio;
aggregate tokens/s with 1, 2, 4, 8 concurrent streaming clients; memory bandwidth and the
roofline (bandwidth / weight bytes read per token) with the fraction reached at batch 1; worker
RSS against weight bytes; every worker decoding at once against solo; and `make up` time.

If no stack is running for the config, the bench starts one on free ports in a temporary run
folder (timing `up`), and stops it afterwards. Medians over repeats; min-max shown as noise. The
concurrency scaling is the median of per-round ratios: each round measures every client count side by
side (bench_api.client_order), so the machine's drift between rounds stays out of the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.output import process_rss, write_json
from bench.shape_run import SHAPE_PROMPTS_HELP, run_shape, shape_prompts
from bench.shapes import SHAPES
from bench.stats import ModelReport, Stat, report_json, roofline_tokens_per_s, table, weight_bytes_per_token
from engine.host.hardware import cpu_count, resolve_dtype
from launch.config import REPO_ROOT, ArenaConfig, ConfigError, load_config, write_config
from launch.ports import on_free_ports
from launch.state import is_ours, read_state

CLIENTS = (1, 2, 4, 8)
SHAPE_NAMES = tuple(SHAPES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n", 1)[1].strip(),
        epilog="Examples:\n"
               "  make bench                                          # every configured model (~13 min on 2 quiet cores)\n"
               "  make bench ARGS='--quick --models smollm2-135m'     # smoke run, ~3 min\n"
               "  make bench ARGS='--quick --models smollm2-135m --worker fastchat'   # the stock worker\n"
               "  make bench ARGS='--shape qwen-7b'                   # Qwen-7B-Chat-shaped random weights, ~16 GB RAM\n"
               "  make bench ARGS='--shape chatglm3-6b'               # ChatGLM3-6B-shaped random weights, ~13 GB RAM\n"
               "The machine should be quiet: other processes on the cores skew every number (see the load\n"
               "average in the report).")
    p.add_argument("--json", type=Path, default=None,
                   help="write the JSON report here (default run/bench/bench-<time>.json; the plot next to it)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 tokens, 1 repeat and round, 1 and 2 clients "
                        "(default: 48 tokens, 3 repeats, 9 rounds of 1,2,4,8)")
    p.add_argument("--worker", choices=("batching", "fastchat"), default=None,
                   help="serve every model with this worker in a stack the bench starts (default: as configured)")
    p.add_argument("--models", default=None,
                   help="comma-separated subset of the configured models (default: all)")
    p.add_argument("--shape", choices=SHAPE_NAMES, default=None,
                   help="instead: a random-weight checkpoint with this model's dimensions in its published layout "
                        "(written once to ~/.cache/cpu-arena/shapes, 13-16 GB), loaded in bf16 as the worker loads it "
                        "(needs 13-16 GB RAM)")
    p.add_argument("--shape-prompts", type=shape_prompts, default=None, metavar="N,N,...", help=SHAPE_PROMPTS_HELP)
    p.add_argument("--tokens", type=positive_int, default=None, help="tokens generated per measurement (default 48, quick 16; --shape 16, quick 4)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="repeats per measurement; medians are reported, min-max as noise (default 3, quick 1)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="rounds over every client count for the concurrency figures (default 9, quick 1)")
    p.add_argument("--clients", type=client_counts, default=None,
                   help="concurrent streaming client counts (default 1,2,4,8; quick 1,2)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-long-prompts", action="store_true",
                   help="skip the long prompts (bench/prompts.py: TTFT of ~1,000- and ~4,000-token prompts served, "
                        "on the engine and on plain PyTorch, against the matmul peak; quick: 1,000 only)")
    p.add_argument("--no-anchor", action="store_true",
                   help="skip llama.cpp beside the served figures (bench/llamacpp.py: decode and long-prompt TTFT of "
                        "the same models as BF16 GGUFs; only where `make anchor` installed llama-cpp-python)")
    p.add_argument("--no-stock-twin", action="store_true",
                   help="in the long prompts, skip the stock twin: each default-worker model also served by "
                        "FastChat's stock worker (<model>:fastchat, same checkpoint, dtype and threads) in the same "
                        "stack for that part only, its TTFT beside the default's (served/stock)")
    return p.parse_args(argv)


def positive_int(spec: str) -> int:
    """--tokens, --repeats, --rounds: 0 or less would measure nothing."""
    if not spec.strip().isdigit() or int(spec) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: give a positive integer")
    return int(spec)


def client_counts(spec: str) -> tuple[int, ...]:
    """--clients: comma-separated positive counts."""
    try:
        counts = tuple(int(c) for c in spec.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: give client counts as positive integers, e.g. 1,2,4,8")
    return counts


def selected_models(cfg: ArenaConfig, spec: str | None) -> list[str]:
    """--models: the named subset of the configured models, in the order given (default: all)."""
    configured = [m.name for m in cfg.models]
    if not spec:
        return configured
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))  # in order, once each
    unknown = [n for n in names if n not in configured]
    if unknown or not names:
        raise ConfigError(f"--models {spec!r}: {', '.join(unknown) or 'no name'} not configured in {cfg.source}; "
                          f"the models there are: {', '.join(configured)}")
    return names


def _bench_config(cfg: ArenaConfig, models: list[str], worker: str | None, run_dir: Path) -> Path:
    """A copy of the config on free ports, a private run folder and (optionally) another worker."""
    import tomllib

    raw = tomllib.loads(cfg.source.read_text())
    # Without the prefix cache: the rounds repeat their prompts, which it would serve from finished requests'
    # keys and values, so the rates would measure the cache instead of prefill; the bench measures what it
    # saves apart (next_turn_prefill).
    chosen = [dict(m, path=str(cfg.model_path(cfg.model(m["name"]))), prefix_cache_mb=0,
                   **({"worker": worker} if worker else {}))
              for m in raw["models"] if m["name"] in models]
    server, entries = on_free_ports(dict(raw.get("server", {}), run_dir=str(run_dir)), chosen)
    return write_config(run_dir.parent / "bench.toml", server, entries)


def _launch(config: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args, "--config", str(config)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "no_proxy": "localhost,127.0.0.1,::1",
                               # the services run from the config's folder: keep this checkout importable
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})


def _running(cfg: ArenaConfig) -> bool:
    state = read_state(cfg.run_dir())
    return bool(state and state.phase == "ready" and is_ours(state.supervisor_pid))


def _load(cfg: ArenaConfig, name: str):
    import torch
    from fastchat.model.model_adapter import load_model
    from fastchat.utils import str_to_torch_dtype

    from launch.fastchat_entry import prepare_process

    prepare_process()  # the project's adapters, as in the worker
    m = cfg.model(name)
    model, tok = load_model(str(cfg.model_path(m)), device="cpu", num_gpus=1,
                            dtype=str_to_torch_dtype(resolve_dtype(m.dtype)))
    return model.eval(), tok, torch


NEXT_QUESTION = "Now count from 300 down to 1 the same way."


def _next_turn(cfg: ArenaConfig, name: str, model, tok, ids, tokens: int, repeats: int):
    """(second turn's prompt tokens, tokens kept, prefill whole, prefill from the kept turn), on the worker's
    kernels (this model is put on them here: raw generate is done with it), or None where the worker keeps no
    prefix cache (prefix_cache.usable)."""
    from engine import kernels
    from engine.prefix_cache import usable

    m = cfg.model(name)
    if not m.prepack_weights or m.prefix_cache_mb == 0:
        return None
    try:
        kernels.install(model)
        return None if usable(model) else _measure_next_turn(cfg, m, model, tok, ids, tokens, repeats)
    finally:  # attention and rotary are process-wide: the next model's raw generate is plain transformers again
        kernels.uninstall()


def _measure_next_turn(cfg: ArenaConfig, m, model, tok, ids, tokens: int, repeats: int):
    from fastchat.model.model_adapter import get_conversation_template

    from bench.api import PROMPT
    from bench.raw import next_turn_prefill

    first = ids[0].tolist()
    answer = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0,
                            attention_mask=ids.new_ones(ids.shape))[0, len(first):].tolist()
    conv = get_conversation_template(str(cfg.model_path(m)))
    conv.append_message(conv.roles[0], PROMPT)
    conv.append_message(conv.roles[1], tok.decode(answer, skip_special_tokens=True))
    conv.append_message(conv.roles[0], NEXT_QUESTION)
    conv.append_message(conv.roles[1], None)
    second = tok(conv.get_prompt()).input_ids
    whole, kept, n = next_turn_prefill(model, first, answer, second, repeats)
    return len(second), n, whole, kept


def _prompt_ids(cfg: ArenaConfig, name: str, tok):
    from fastchat.model.model_adapter import get_conversation_template

    from bench.api import PROMPT

    conv = get_conversation_template(str(cfg.model_path(cfg.model(name))))
    conv.append_message(conv.roles[0], PROMPT)
    conv.append_message(conv.roles[1], None)
    import torch

    return torch.tensor([tok(conv.get_prompt()).input_ids])


def plot(reports: list[ModelReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in reports:
        xs = sorted(m.concurrency_tps)
        ys = [m.concurrency_tps[x].median if m.concurrency_tps[x] else 0 for x in xs]
        a.plot(xs, ys, marker="o", label=m.name)
    a.set_xlabel("concurrent streaming clients")
    a.set_ylabel("aggregate tokens/s")
    a.set_xscale("log", base=2)
    a.legend()
    a.set_title("scaling through the API")
    names = [m.name for m in reports]
    bars = {"raw generate": [m.raw_decode_tps.median if m.raw_decode_tps else 0 for m in reports],
            "API stream": [m.api_decode_tps.median if m.api_decode_tps else 0 for m in reports],
            "roofline": [m.roofline_tps or 0 for m in reports]}
    w = 0.25
    for i, (label, vals) in enumerate(bars.items()):
        b.bar([j + i * w for j in range(len(names))], vals, w, label=label)
    b.set_xticks([j + w for j in range(len(names))], names)
    b.set_ylabel("batch-1 decode tokens/s")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


@dataclass(frozen=True)
class Plan:
    """How much a served-model bench measures (the --quick, --tokens, --repeats, --rounds, --clients options)."""

    tokens: int
    repeats: int
    rounds: int
    clients: tuple[int, ...]

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        return cls(
            tokens=args.tokens or (16 if args.quick else 48),
            repeats=args.repeats or (1 if args.quick else 3),
            # More rounds than repeats: a round's ratio is off when the VM's memory speed switches between
            # its 1-client and N-client runs (either way: too high or too low); a median needs most rounds clean.
            # With 5 rounds, two or three such rounds decided the median (SmolLM2 x2.98, Qwen2.5 x2.55 seen).
            rounds=args.rounds or (1 if args.quick else 9),
            clients=args.clients or ((1, 2) if args.quick else CLIENTS),
        )


def main(cfg: ArenaConfig, argv: list[str]) -> int:
    args = parse_args(argv)
    if args.shape:
        return run_shape(args)
    names = selected_models(cfg, args.models)
    plan = Plan.of(args)
    headers = {"Authorization": f"Bearer {cfg.server.resolved_api_keys()[0]}"} if cfg.server.resolved_api_keys() else {}

    # The stack: the running one for this config, else our own on free ports.
    tmp = None
    stack_cfg, up_time = cfg, None
    if args.worker or args.models or not _running(cfg):
        tmp = Path(tempfile.mkdtemp(prefix="cpu-arena-bench-"))
        stack_cfg = load_config(_bench_config(cfg, names, args.worker, tmp / "run"))
        print(f"starting a stack for the bench ({', '.join(names)}; run dir {tmp / 'run'}) ...", flush=True)
        t = time.perf_counter()
        up = _launch(stack_cfg.source, "up")
        up_time = time.perf_counter() - t
        if up.returncode != 0:
            print(up.stdout, up.stderr, file=sys.stderr)
            _launch(stack_cfg.source, "down", timeout=180)
            print(f"the bench's stack did not start; its logs: {tmp / 'run' / 'logs'}", file=sys.stderr)
            return 1
        print(f"  ready in {up_time:.0f} s", flush=True)
    else:
        print(f"using the running stack of {cfg.source}; `make up` time is not measured (stack already up); "
              "its workers' prefix caches serve the repeated prompts of later rounds from earlier ones")
    code = 1
    try:
        code = _measure(args, cfg, stack_cfg, names, plan, headers, up_time)
        return code
    finally:
        if tmp is not None:
            down = _launch(stack_cfg.source, "down", timeout=180)
            # Its logs are kept only where something failed: a run folder per bench would pile up in /tmp.
            if code == 0 and down.returncode == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                print(f"the bench's stack logs: {tmp / 'run' / 'logs'}", file=sys.stderr)


def _measure(args, cfg, stack_cfg, names, plan: Plan, headers, up_time) -> int:
    import torch

    from bench.api import aggregate_rounds, api_decode, shared_decode
    from bench.llamacpp import AnchorPlan
    from bench.llamacpp import attach as attach_anchor
    from bench.llamacpp import measure as measure_anchor
    from bench.llamacpp import table_lines as anchor_lines
    from bench.prompts import PromptPlan
    from bench.prompts import measure as measure_prompts
    from bench.raw import ReadProbe, bandwidth_bytes_per_s, param_bytes, probe_name, raw_decode, threads

    tokens, repeats, rounds, clients = plan.tokens, plan.repeats, plan.rounds, plan.clients

    state = read_state(stack_cfg.run_dir())
    worker_pids = {s.model: s.pid for s in state.services.values() if s.model} if state else {}
    api = stack_cfg.api_url()
    reports, tokenizers = [], {}
    bw_threads = stack_cfg.threads(stack_cfg.model(names[0]))
    bw = bandwidth_bytes_per_s(bw_threads, repeats=repeats + 2)
    bw_all = bandwidth_bytes_per_s(cpu_count(), repeats=repeats + 2)
    load_start = os.getloadavg()
    machine = {"cores": cpu_count(), "bandwidth_gbs": bw.median / 1e9, "bandwidth_noise_gbs": [bw.min / 1e9, bw.max / 1e9],
               "bandwidth_threads": bw_threads, "bandwidth_probe": probe_name(), "bandwidth_all_gbs": bw_all.median / 1e9, "torch": torch.__version__}
    for name in names:
        m = stack_cfg.model(name)
        n_threads = stack_cfg.threads(m)
        probe = ReadProbe(n_threads)
        print(f"[{name}] raw generate ({n_threads} thread(s)) ...", flush=True)
        model, tok, _ = _load(cfg, name)
        tokenizers[name] = tok
        total, emb, tied = param_bytes(model)
        per_token = weight_bytes_per_token(total, emb, tied)
        ids = _prompt_ids(cfg, name, tok)
        # The roofline of this model's batch-1 figures: probes right before, between and after them. One probe
        # at the start served the second model minutes later, in another memory phase (fractions above 1).
        around = [probe() for _ in range(3)]
        with threads(n_threads):
            # Same thread count and wait policy as the worker gets, so API/raw compares serving cost only.
            raw_rate, raw_ttft = raw_decode(model, ids, tokens, repeats)
            turn = _next_turn(cfg, name, model, tok, ids, tokens, repeats) if m.worker == "batching" else None
        del model
        around += [probe() for _ in range(3)]
        r = ModelReport(name=name, worker=m.worker, dtype=resolve_dtype(m.dtype), threads=n_threads,
                        weights_bytes=total, bytes_per_token=per_token, raw_decode_tps=raw_rate, raw_ttft_s=raw_ttft,
                        rss_bytes=process_rss(worker_pids.get(name)))
        print(f"[{name}] API streaming ...", flush=True)
        if turn:
            r.next_turn_tokens, r.next_turn_kept, r.next_turn_whole_s, r.next_turn_kept_s = turn
        r.api_decode_tps, r.api_ttft_s = api_decode(api, name, tok, tokens, repeats, headers)
        around += [probe() for _ in range(3)]
        r.bandwidth = Stat.of(around)
        r.roofline_tps = roofline_tokens_per_s(r.bandwidth.median, per_token)
        r.concurrency_rounds = aggregate_rounds(
            api, name, tok, clients, tokens, rounds, headers,
            progress=lambda c, name=name: print(f"[{name}] {c} concurrent client(s) ...", flush=True))
        reports.append(r)
    if len(names) > 1:
        print("all workers decoding at once ...", flush=True)
        shared = shared_decode(api, [(n, tokenizers[n]) for n in names], tokens, repeats, headers)
        for r in reports:
            r.shared_decode_tps = shared.get(r.name)
    long_prompts = measure_prompts(stack_cfg, names, PromptPlan.of(args), api, headers, tokenizers,
                                   progress=lambda line: print(line, flush=True))
    anchor = None if args.no_anchor else measure_anchor(stack_cfg, names, AnchorPlan.of(args, tokens, repeats), api,
                                                        headers, tokenizers, progress=lambda line: print(line, flush=True))
    # Other processes on the same cores skew every number: keep the load next to them.
    machine["loadavg_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    settings = {**asdict(plan), "clients": list(clients), "config": str(cfg.source),
                "stack_config": str(stack_cfg.source),
                "prefix_cache": "off in the bench's stack" if stack_cfg is not cfg else "as configured (running stack)"}
    out = report_json(reports, machine, up_time, settings, long_prompts)
    attach_anchor(out, anchor)
    print()
    print(table(reports, machine, up_time, long_prompts))
    for line in anchor_lines(anchor):
        print(line)
    print(f"load average (1 min): {load_start[0]:.2f} at start, {machine['loadavg_1min']['end']:.2f} at end "
          f"on {cpu_count()} cores")
    path = write_json(args, out)
    if not args.no_plot:
        plot(reports, path.with_suffix(".png"))
    return 0


def run(argv: list[str] | None = None) -> int:
    """`python -m bench [--config FILE] [options]` (what `make bench` runs)."""
    from launch.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a file", file=sys.stderr)
            return 2
        config = argv[i + 1]
        del argv[i:i + 2]
    try:
        return main(load_config(config), argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
