"""Long prompts: how long a user waits for the first token of a ~1,000- and a ~4,000-token prompt, against plain
PyTorch on the same model, against FastChat's stock worker in the same stack and against the machine's matmul peak.

Why: a prompt pass is compute-bound (every prompt token is a row of every matmul), so it is where a CPU server is
slowest, and a chat's first long message (a pasted file, a document) is what a user waits for. Four figures per
model and length, measured side by side in every repeat (the order reversed every other repeat, so a steady
drift of the machine cancels):

- served: time to the first content chunk of a streaming request through the OpenAI API (the default worker);
- stock: the same request, through the same API server and controller, to the model's stock twin: FastChat's
  own model worker on the same checkpoint, dtype and threads, named `<model>:fastchat` (StockTwin);
- engine: the worker's own prompt pass (engine.prefill.prefill) on a model loaded and put on the kernels as the
  worker does it, in a child process: the served figure less this one is what the API and the worker add;
- torch: plain transformers (`from_pretrained` in the served dtype, no project code) `model(ids, logits_to_keep=1)`,
  in another child process.

The children and the stock twin get the default worker's thread settings (launch.services.worker_env) and sit
idle while the others run, so nothing computes at the same time. The twin is started for this part only and is
no entry of the stack's config: a stock worker there would end the stack's core sharing (ArenaConfig.shares_cores),
and every default worker would get a static share of the cores and passive OpenMP waiting instead, for every
figure of the bench. Every prompt is new text from its first word (a tag and random words), so no prefix cache
can serve any of it; the served default and its twin get the same text (two processes: neither sees the other's
keys). Prompt throughput is set against the fastest matmul measured here at the same thread count (a large
torch.matmul and the same shape on the project's linear kernel), in a third child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.child import Child
from bench.output import cpu_model
from bench.stats import Stat

LENGTHS = (1000, 4000)
QUICK_LENGTHS = (1000,)
# The served request's answer budget: only its first content chunk is timed; a few tokens more cover a first
# token that is not text on its own (half of a multi-byte character).
ANSWER_TOKENS = 4
WARM_TOKENS = 256  # each path's first pass of a prompt this long: first-call costs stay out of the figures
PEAK_SHAPE = (2048, 2048, 2048)  # rows x inner x outputs: large enough to run at the units' speed
PEAK_REPEATS = 8
MARK = "@@prompts "  # the children's answers on stdout; loaders may print other lines there
# The stock twin's model name is the model's and this (a config name allows letters, digits and ._:- only).
STOCK_SUFFIX = ":fastchat"

# Plain words, so that the prompt tokenizes like prose (about one token a word) in any of the models' vocabularies.
WORDS = (
    "the river city market winter morning garden letter window mountain station teacher kitchen engine paper "
    "harbor forest bridge village doctor music table lantern journey summer orange silver museum ticket machine "
    "island library student painter castle valley farmer basket candle meadow signal rocket planet ocean desert "
    "thunder pencil blanket mirror ladder garage theater captain jacket pocket bottle wheel tower harvest cloud "
    "quietly slowly bright green heavy narrow ancient gentle careful sudden early late warm cold small large "
    "opened carried watched followed painted counted built crossed found gave kept moved read wrote sent "
    "shared cleaned fixed asked answered waited walked climbed measured noticed remembered planted visited "
    "near under across behind during after before between beside through toward without"
).split()


@dataclass(frozen=True)
class PromptPlan:
    """Which prompt lengths the bench measures, how often, and whether beside each default worker its stock
    twin (--quick, --repeats, --no-long-prompts, --no-stock-twin)."""

    lengths: tuple[int, ...]
    repeats: int
    stock_twin: bool = True

    @classmethod
    def of(cls, args: argparse.Namespace) -> PromptPlan:
        if getattr(args, "no_long_prompts", False):
            return cls((), 0, False)
        return cls(QUICK_LENGTHS if args.quick else LENGTHS, args.repeats or (1 if args.quick else 3),
                   not getattr(args, "no_stock_twin", False))


def prompt_text(tag: str, words: int) -> str:
    """`words` random words in sentences (drawn from `tag`), after the tag: text that begins differently and
    goes on differently for every tag."""
    rng = random.Random(tag)
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 14):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return f"Notes {tag}. " + " ".join(out) + "\n\nIn one sentence, what are these notes about?"


def build_prompt(render: Callable[[str], list[int]], target: int, tag: str) -> tuple[str, list[int]]:
    """(text, ids): the longest prompt_text whose rendered ids (`render`: the chat template and tokenizer the
    worker uses) are at most `target` tokens. Every word is a token or more, so `target` words is too many;
    the count grows with the words, so a bisection finds it."""
    lo, hi = 0, target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(prompt_text(tag, mid))) <= target:
            lo = mid
        else:
            hi = mid - 1
    text = prompt_text(tag, lo)
    return text, render(text)


def fitting_length(target: int, context_len: int) -> int:
    """The prompt length asked for, or less where it and the answer would not fit the model's context (the worker
    would cut the prompt's beginning, FastChat's API refuse it)."""
    return min(target, context_len - ANSWER_TOKENS - 8)


PATHS = ("served", "stock", "engine", "torch")


@dataclass(frozen=True)
class ModelShape:
    """What a prompt pass computes: the decoder's linear weights (every token), the output projection's (the
    last position only: logits_to_keep=1), and causal attention's dimensions."""

    linear_params: int
    head_params: int
    layers: int
    heads: int
    head_dim: int


def prompt_flops(shape: ModelShape, tokens: int) -> float:
    """FLOPs of one prompt pass: 2 per weight per token for the linears, the output projection for one token,
    and attention's scores and weighted sums (query i against its i + 1 keys, 2 x head_dim each, both products).
    Norms, rotary and softmax are left out: a few per cent of this at most."""
    linear = 2.0 * shape.linear_params * tokens + 2.0 * shape.head_params
    attention = 2 * 2.0 * shape.layers * shape.heads * shape.head_dim * tokens * (tokens + 1) / 2
    return linear + attention


def paired_ratio(served: list[float], other: list[float]) -> Stat | None:
    """Served TTFT / another path's time (plain PyTorch's prompt pass, the stock twin's served TTFT), per repeat
    (the two were measured next to each other), then median and min-max over the repeats."""
    return Stat.of([s / t for s, t in zip(served, other, strict=False) if s and t])


def peak_gflops(peak: dict) -> float | None:
    """The machine's matmul peak for one dtype: the faster of torch's and the project's kernel, medians."""
    rates = [s["median"] for s in (peak.get("torch"), peak.get("kernel")) if s]
    return max(rates) if rates else None


def summarize(length: dict, shape: ModelShape, peak: float | None) -> dict:
    """One model and length's report from its per-repeat `tokens` and seconds (`served`, `stock`, `engine`,
    `torch`; any but served may be missing): Stats of each, prompt tokens/s, fraction of the matmul peak (per
    repeat, median), served / torch and served / stock (per repeat, median)."""
    out: dict = {"tokens": length["tokens"]}
    for path in PATHS:
        times = length.get(path) or []
        pairs = [(n, t) for n, t in zip(length["tokens"], times, strict=False) if t]
        out[f"{path}_s"] = _d(Stat.of([t for _, t in pairs]))
        out[f"{path}_tokens_per_s"] = _d(Stat.of([n / t for n, t in pairs]))
        out[f"{path}_fraction_of_matmul_peak"] = _d(Stat.of(
            [prompt_flops(shape, n) / t / (peak * 1e9) for n, t in pairs])) if peak else None
    out["flops"] = prompt_flops(shape, round(sum(length["tokens"]) / len(length["tokens"])))
    out["served_vs_torch"] = _d(paired_ratio(length.get("served") or [], length.get("torch") or []))
    # The default worker against FastChat's stock worker, both through the same API server: the done-when's
    # second bound (<= 1.10).
    out["served_vs_stock"] = _d(paired_ratio(length.get("served") or [], length.get("stock") or []))
    # What the API server and the worker add to the engine's own pass (HTTP, templating, tokenizing, queueing).
    served, engine = out["served_s"], out["engine_s"]
    out["api_overhead_s"] = served["median"] - engine["median"] if served and engine else None
    return out


def _d(s: Stat | None) -> dict | None:
    return asdict(s) if s is not None else None


# ---- the machine ----

def cpu_units() -> list[str]:
    """The CPU flags that decide the prompt pass's path."""
    from engine.host.hardware import cpu_flags

    flags = cpu_flags()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def prompt_path(dtype_name: str) -> dict:
    """Where a served prompt pass of this dtype runs here: the linears' backend, and where attention and long
    prompts go (each model's engine child reports its measured paths, engine/kernels/paths.py)."""
    import torch

    from engine.kernels.linear import linear_backend

    dtype = getattr(torch, dtype_name)
    return {"linear": linear_backend(dtype),
            "attention": "the project's kernel or PyTorch's SDPA per prompt length, as each model's paths say"}


# ---- children: each measures in a process of its own ----

def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def _peak_child(args: argparse.Namespace) -> None:
    """GFLOP/s of PEAK_SHAPE on torch.matmul and on the linear backend the worker uses for this dtype."""
    import torch

    from engine.kernels.linear import choose_backend

    _threads(args.threads)
    dtype = getattr(torch, args.dtype)
    m, k, n = PEAK_SHAPE
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    flops = 2.0 * m * k * n

    def rate(f) -> Stat:
        for _ in range(2):  # warm: thread pool, packing buffers
            f()
        times = []
        for _ in range(PEAK_REPEATS):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return Stat.of([flops / t / 1e9 for t in times])

    wt = w.t()
    out = {"dtype": args.dtype, "shape": list(PEAK_SHAPE), "threads": args.threads,
           "torch": _d(rate(lambda: torch.matmul(x, wt))), "kernel": None, "kernel_name": None}
    backend, _ = choose_backend(dtype)
    if backend is not None:
        packed = backend.pack(w)
        out["kernel"] = _d(rate(lambda: backend.run(x, packed, None)))
        out["kernel_name"] = backend.name
    _answer(out)


def _shape_of(model) -> ModelShape:
    from torch import nn

    head = model.get_output_embeddings()
    cfg = model.config
    heads = cfg.num_attention_heads
    return ModelShape(
        linear_params=sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear) and mod is not head),
        head_params=head.weight.numel() if head is not None else 0,
        layers=cfg.num_hidden_layers, heads=heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def _pass_child(args: argparse.Namespace) -> None:
    """Load the model (plain transformers, or as the worker does), then time one prompt pass per line of ids on
    stdin until it closes."""
    import torch

    _threads(args.threads)
    dtype = getattr(torch, args.dtype)
    chosen_paths = None
    if args.path_kind == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype,
                                                     trust_remote_code=args.trust_remote_code).eval()
        shape = _shape_of(model)

        def run(ids: list[int]) -> None:
            model(torch.tensor([ids]), logits_to_keep=1)
    else:
        from fastchat.model.model_adapter import load_model

        from engine import kernels
        from engine.host.hugepages import collapse_model
        from engine.prefill import prefill
        from launch.fastchat_entry import prepare_process

        prepare_process()  # the project's adapters, as in the worker
        from engine.kernels.path_choice import paths_for

        model, _ = load_model(args.model_path, device="cpu", num_gpus=1, dtype=dtype)
        model.eval()
        shape = _shape_of(model)  # before the linears are replaced
        if args.prepack:
            # The worker's choice: measured here on the same machine, shape and source, it is read from the cache
            # the worker wrote (engine/kernels/path_choice.py).
            chosen = paths_for(args.paths, model, say=lambda line: print(line, file=sys.stderr))
            kernels.install(model, chosen)
            chosen_paths = {**chosen.describe(), "spec": chosen.spec(), "figures": chosen.figures}
            collapse_model(model)

        def run(ids: list[int]) -> None:
            prefill(model, [ids], 0, share=False)

    with torch.inference_mode():
        run(list(range(100, 100 + WARM_TOKENS)))
        _answer({"ready": True, "shape": asdict(shape), "paths": chosen_paths})
        for line in sys.stdin:
            ids = json.loads(line)
            t = time.perf_counter()
            run(ids)
            _answer({"s": time.perf_counter() - t})


class PassChild(Child):
    """A child process that times prompt passes (_pass_child) on request; idle in between."""

    def __init__(self, kind: str, model_path: str, dtype: str, threads: int, env: dict[str, str], *,
                 prepack: bool = True, trust_remote_code: bool = False, paths: str = "measure"):
        self.kind = kind
        cmd = [sys.executable, "-m", "bench.prompts", "pass", kind, "--model-path", model_path, "--dtype", dtype,
               "--threads", str(threads), "--paths", paths] + (["--prepack"] if prepack else []) \
            + (["--trust-remote-code"] if trust_remote_code else [])
        super().__init__(cmd, {**os.environ, **env}, MARK, f"{kind} prompt-pass")
        ready = self._read()
        self.shape = ModelShape(**ready["shape"])
        self.paths = ready.get("paths")  # the engine's chosen paths (engine/kernels/paths.py)

    def __call__(self, ids: list[int]) -> float:
        return self.ask(ids)["s"]


def measure_peak(dtype: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.prompts", "peak", "--dtype", dtype, "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)}, cwd=Path(__file__).resolve().parent.parent)
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"the matmul peak process failed (exit {r.returncode}): {r.stderr[-2000:]}")


# ---- the stock twin: FastChat's own worker on the same model, in the same stack ----

def twin_name(name: str) -> str:
    return name + STOCK_SUFFIX


def twin_config(stack_cfg, name: str, folder: Path, port: int) -> Path:
    """A config of one entry in `folder`: `name`'s stock twin, FastChat's stock worker (worker = "fastchat") on
    the same checkpoint with the entry's own settings (dtype, template, remote code, queue, stream interval), its
    threads pinned to the count the stack gives `name`'s worker, on `port`. [server] is the stack's (its
    controller, its run folder), so the twin registers in the same stack; no API keys, which a worker never
    reads. Paths are absolute: the file lives elsewhere."""
    from launch.config import write_config

    m = stack_cfg.model(name)
    server = dict(stack_cfg.server.model_dump(exclude_none=True, exclude={"api_keys"}),
                  run_dir=str(stack_cfg.run_dir()))
    entry = dict(m.model_dump(exclude_none=True), name=twin_name(name), path=str(stack_cfg.model_path(m)),
                 worker="fastchat", threads=stack_cfg.threads(m), port=port)
    return write_config(folder / "stock-twin.toml", server, [entry])


def stock_env(stack_cfg, twin_cfg, name: str) -> dict[str, str]:
    """The twin's environment beside the services' (launch.services.base_env of its config): the default
    worker's own thread settings (worker_env in the stack: thread counts, and OpenMP's wait policy where the
    stack sets one), not those of a one-entry config, and its own entry's name for the adapters."""
    from launch.services import base_env, worker_env

    root = str(Path(__file__).resolve().parent.parent)  # it runs from the run folder: keep this checkout importable
    return {**base_env(twin_cfg), **worker_env(stack_cfg, stack_cfg.model(name)),
            "CPU_ARENA_MODEL": twin_name(name),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


class StockTwin:
    """`name`'s stock twin (twin_config) as a worker of the running stack, for the long prompts only: started
    here (its log in the stack's logs folder), registered with the stack's controller, so the stack's API
    server routes `<name>:fastchat` to it; stopped and unregistered by close(). Without the lease of the
    stack's cores (engine/host/cores.py), which a stock worker does not take: it computes only while the
    others wait for their turn, since the bench's requests are one at a time. Refused before it starts when
    its weights and a worker's overhead (launch.memory_check) exceed the memory available."""

    def __init__(self, stack_cfg, name: str):
        from launch.config import load_config
        from launch.memory_check import available_memory, model_need
        from launch.ports import free_port
        from launch.services import worker_spec
        from launch.state import log_path

        self.name = twin_name(name)
        self.proc = None
        self.folder = tempfile.TemporaryDirectory(prefix="cpu-arena-stock-twin-")
        self.cfg = load_config(twin_config(stack_cfg, name, Path(self.folder.name), free_port()))
        self.controller = stack_cfg.controller_url()
        self.spec = worker_spec(self.cfg, self.cfg.model(self.name))
        need, avail = model_need(self.cfg, self.cfg.model(self.name)).need_bytes, available_memory()
        if need > avail.bytes:
            self.folder.cleanup()
            raise RuntimeError(f"{self.name} needs {need / 1e9:.1f} GB, {avail.bytes / 1e9:.1f} GB available "
                               f"({avail.source}): not started")
        run_dir = stack_cfg.run_dir()
        self.log = log_path(run_dir, self.spec.name)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.env = stock_env(stack_cfg, self.cfg, name)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.spec.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, cwd=run_dir,
                                         start_new_session=True)  # its own group: stopped with what it starts

    def wait_ready(self, timeout: float) -> None:
        """Until the stack's controller lists the twin; raises when it ends or the time is up."""
        from launch import probes

        deadline = time.monotonic() + timeout
        while self.name not in probes.controller_models(self.controller):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                what = f"ended (exit {self.proc.returncode})" if self.proc.poll() is not None else "not registered"
                raise RuntimeError(f"the stock twin {self.name} {what}; its log {self.log}: {tail}")
            time.sleep(1.0)

    def close(self) -> None:
        from launch.fastchat_patches.api_guard.controller_client import remove_worker
        from launch.state import terminate

        if self.proc is not None:
            terminate(self.proc.pid)  # our own child's process group, by its id
            self.proc.wait()
            # Else the controller would list it until its heartbeat expires.
            remove_worker(self.controller, self.spec.worker_url)
        self.folder.cleanup()


# ---- the bench's part ----

def renderer(model_path: str, tokenizer) -> Callable[[str], list[int]]:
    """A user message's prompt ids as the worker builds them: FastChat's template for the model, then its tokenizer."""
    from fastchat.model.model_adapter import get_conversation_template

    def render(text: str) -> list[int]:
        conv = get_conversation_template(model_path)
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        return tokenizer(conv.get_prompt()).input_ids

    return render


def _served_ttft(api: str, name: str, text: str, headers: dict) -> float:
    from bench.api import _client, stream_chat

    with _client() as client:  # built before the clock starts (bench.api._client)
        return stream_chat(api, name, ANSWER_TOKENS, headers=headers, prompt=text, client=client).ttft_s


def measure_model(stack_cfg, name: str, tokenizer, plan: PromptPlan, api: str, headers: dict, peak: float | None,
                  salt: str, progress: Callable[[str], None] = print) -> dict:
    """One model's long-prompt figures (summarize), every path side by side in each repeat; beside a default
    worker (unless the plan says not) its stock twin, whose failure is reported and leaves the rest measured."""
    from fastchat.utils import get_context_length
    from transformers import AutoConfig

    from engine.host.hardware import resolve_dtype
    from launch.services import worker_env

    m = stack_cfg.model(name)
    path = str(stack_cfg.model_path(m))
    dtype, threads = resolve_dtype(m.dtype), stack_cfg.threads(m)
    context = get_context_length(AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code))
    render = renderer(path, tokenizer)
    env = worker_env(stack_cfg, m)
    out: dict = {"dtype": dtype, "threads": threads, "context_len": context, "worker": m.worker,
                 "matmul_peak_used_gflops": peak, "lengths": {}}
    children: dict[str, PassChild] = {}
    twin = None
    try:
        twin = _start_twin(stack_cfg, name, plan, out, progress)
        progress(f"[{name}] long prompts: loading plain PyTorch and the engine in child processes ...")
        children["torch"] = PassChild("torch", path, dtype, threads, env, trust_remote_code=m.trust_remote_code)
        if m.worker == "batching":  # the stock FastChat worker has no engine prompt pass to set apart
            children["engine"] = PassChild("engine", path, dtype, threads, env, prepack=m.prepack_weights,
                                           trust_remote_code=m.trust_remote_code, paths=m.paths)
            out["paths"] = children["engine"].paths
        shape = children["torch"].shape
        out["shape"] = asdict(shape)
        warm = build_prompt(render, WARM_TOKENS, f"{salt}-{name}-warm")[0]
        _served_ttft(api, name, warm, headers)
        if twin is not None and not _twin_ready(twin, stack_cfg, api, warm, headers, out, progress):
            twin = None  # closed; the other paths go on
        for target in plan.lengths:
            n = fitting_length(target, context)
            rec: dict = {"tokens": [], **{k: [] for k in PATHS}}
            for r in range(plan.repeats):
                progress(f"[{name}] {n}-token prompt, repeat {r + 1}/{plan.repeats} ...")
                text, ids = build_prompt(render, n, f"{salt}-{name}-{target}-{r}")
                rec["tokens"].append(len(ids))
                steps = [("served", lambda text=text: _served_ttft(api, name, text, headers))]
                if twin is not None:  # the same text: another process, which never saw the default's keys
                    steps.append(("stock", lambda text=text: _served_ttft(api, twin.name, text, headers)))
                steps += [(k, lambda c=c, ids=ids: c(ids)) for k, c in children.items()]
                for key, step in (steps if r % 2 == 0 else steps[::-1]):
                    rec[key].append(step())
            out["lengths"][str(target)] = summarize(rec, shape, peak)
            out["lengths"][str(target)]["raw_s"] = {k: v for k, v in rec.items() if k != "tokens"}
    except Exception as e:  # reported in the JSON: minutes of other figures are not thrown away
        out["error"] = f"{type(e).__name__}: {e}"
        progress(f"[{name}] long prompts failed: {out['error']}")
    finally:
        for c in children.values():
            c.close()
        if twin is not None:
            twin.close()
    return out


def _start_twin(stack_cfg, name: str, plan: PromptPlan, out: dict, progress: Callable[[str], None]) -> StockTwin | None:
    """`name`'s stock twin, starting (it loads while the children do), or None with the reason in
    out["stock_twin"]."""
    m = stack_cfg.model(name)
    if not plan.stock_twin:
        out["stock_twin"] = {"skipped": "--no-stock-twin"}
    elif m.worker != "batching":
        out["stock_twin"] = {"skipped": f"{name} is served by the {m.worker} worker itself"}
    else:
        progress(f"[{name}] long prompts: starting FastChat's stock worker beside it ({twin_name(name)}) ...")
        try:
            twin = StockTwin(stack_cfg, name)
        except (RuntimeError, OSError, ValueError) as e:
            out["stock_twin"] = {"name": twin_name(name), "error": f"{type(e).__name__}: {e}"}
            progress(f"[{name}] stock twin not started: {out['stock_twin']['error']}")
            return None
        threads = {k: v for k, v in twin.env.items() if k.endswith(("_NUM_THREADS", "_WAIT_POLICY"))}
        out["stock_twin"] = {"name": twin.name, "worker": "fastchat", "threads": stack_cfg.threads(m), "env": threads}
        return twin
    return None


def _twin_ready(twin: StockTwin, stack_cfg, api: str, warm: str, headers: dict, out: dict,
                progress: Callable[[str], None]) -> bool:
    """Wait for the twin's registration and warm it as the default was; on failure close it and say why."""
    try:
        twin.wait_ready(stack_cfg.server.startup_timeout)
        _served_ttft(api, twin.name, warm, headers)
        return True
    except Exception as e:  # reported; the default, engine and torch figures go on
        out["stock_twin"]["error"] = f"{type(e).__name__}: {e}"
        progress(f"[{twin.name}] stock twin failed: {out['stock_twin']['error'][:300]}")
        twin.close()
        return False


def measure(stack_cfg, names: list[str], plan: PromptPlan, api: str, headers: dict, tokenizers: dict,
            progress: Callable[[str], None] = print) -> dict | None:
    """Every model's long-prompt figures, the matmul peak per served dtype and the machine's prompt path, or None
    when the plan measures none (--no-long-prompts)."""
    from engine.host.hardware import resolve_dtype

    if not plan.lengths:
        return None
    dtypes = sorted({resolve_dtype(stack_cfg.model(n).dtype) for n in names})
    threads = max(stack_cfg.threads(stack_cfg.model(n)) for n in names)
    out: dict = {"cpu_model": cpu_model(), "cpu_units": cpu_units(), "plan": asdict(plan),
                 "answer_tokens": ANSWER_TOKENS, "paths": {d: prompt_path(d) for d in dtypes},
                 "matmul_peak_gflops": {}, "models": {}}
    for d in dtypes:
        progress(f"matmul peak ({d}, {threads} thread(s)) ...")
        try:
            out["matmul_peak_gflops"][d] = measure_peak(d, threads)
        except (RuntimeError, subprocess.SubprocessError) as e:
            out["matmul_peak_gflops"][d] = {"error": str(e)}
    salt = f"{time.time_ns():x}"  # a running stack's prefix cache may hold an earlier run's prompts
    for name in names:
        m = stack_cfg.model(name)
        peak = peak_gflops(out["matmul_peak_gflops"].get(resolve_dtype(m.dtype), {}))
        out["models"][name] = measure_model(stack_cfg, name, tokenizers[name], plan, api, headers, peak, salt, progress)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prompts", description="the bench's child processes")
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("peak")
    ps = sub.add_parser("pass")
    ps.add_argument("path_kind", choices=("torch", "engine"))
    ps.add_argument("--model-path", required=True)
    ps.add_argument("--prepack", action="store_true")
    ps.add_argument("--paths", default="measure")
    ps.add_argument("--trust-remote-code", action="store_true")
    for q in (pk, ps):
        q.add_argument("--dtype", required=True, choices=("bfloat16", "float32"))
        q.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    (_peak_child if args.cmd == "peak" else _pass_child)(args)


if __name__ == "__main__":
    main()
