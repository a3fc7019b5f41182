"""llama.cpp as the bench's anchor: the same models, unquantized (BF16 GGUF), on llama.cpp in the same run.

Why: llama.cpp is what a user would run on a CPU instead of this project, so the served figures mean most next to
it. Optional: `make anchor` compiles llama-cpp-python for this CPU; where it is not installed the bench prints one
line and goes on.

What, per model (`make bench`, after the long prompts; `--no-anchor` skips it):
- the checkpoint the worker serves, converted to a BF16 GGUF by llama.cpp's own converter (convert_hf_to_gguf.py of
  the llama.cpp that llama-cpp-python vendors; taken from its PyPI sdist, which `make anchor` keeps in
  ~/.cache/cpu-arena/llama.cpp), once: cached in ~/.cache/cpu-arena/gguf under a key of the checkpoint's content and
  the converter's sources;
- llama_cpp.Llama on it with the worker's thread count, in a child process that sits idle while the API is measured;
  flash attention on (FLASH_ATTN), as llama.cpp's own programs run it on the CPU (their default, auto, turns it on;
  llama-cpp-python 0.3.36 leaves it off, which made SmolLM2's 4,000-token prompt ~17.6 s against ~14 s with it);
- decode: greedy tokens/s over as many tokens as the served decode streams, from the same chat-templated prompt ids
  the worker sees (bench.api.PROMPT), (tokens - 1) / (last token - first token) as the served figure is counted;
- TTFT: prompt pass plus first token of the long prompts bench/prompts.py builds (its builder, ~1,000 and ~4,000
  tokens of the worker's template and tokenizer, new text every repeat), timed in the child;
- the served figures the ratios use are measured here too, next to llama.cpp's: each repeat runs served then
  llama.cpp, the order reversed every other repeat, so a steady drift of the machine cancels. The ratios are
  medians of the per-repeat ratios: decode cpu-arena / llama.cpp tokens/s (above 1: cpu-arena faster), TTFT
  cpu-arena / llama.cpp seconds (below 1: cpu-arena faster).

The served TTFT includes the HTTP request and the API server; llama.cpp's is in-process: that favours llama.cpp.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.child import Child
from bench.stats import Stat

SKIP_LINE = "llama.cpp anchor skipped: llama-cpp-python is not installed (make anchor)"
CACHE = Path.home() / ".cache" / "cpu-arena"
GGUF_DIR = CACHE / "gguf"
SRC_DIR = CACHE / "llama.cpp"  # llama-cpp-python's sdist (`make anchor`) and the converter taken out of it
GGUF_DTYPE = "bf16"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the sdist's vendor/llama.cpp: the script, its model classes and the gguf package of
# the same llama.cpp (the script puts gguf-py on its path itself).
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/")
WARM_PROMPT = 256  # the child's first prompt pass and a few decode steps: first-call costs stay out of the figures
MARK = "@@llamacpp "  # the child's answers on stdout; llama.cpp may print other lines there
# The stronger anchor: llama.cpp's own default on the CPU (auto = on). None would take llama-cpp-python's (off).
FLASH_ATTN: bool | None = True


def installed_version() -> str | None:
    """llama-cpp-python's version, or None where it is not installed (or its library does not load)."""
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return None
    except (ImportError, ValueError):  # ValueError: a module object without a spec
        return None
    try:
        import llama_cpp
    except (ImportError, OSError):
        return None
    return getattr(llama_cpp, "__version__", "unknown")


# ---- the converted models ----

def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(ckpt: Path, memo: Path | None = None) -> str:
    """SHA-256 over the checkpoint's files (names and contents; its README and dot files left out). Each file's hash
    is remembered in `memo` under its size and modification time: a bench run does not read 1 GB again."""
    seen = json.loads(memo.read_text()) if memo and memo.exists() else {}
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md"):
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in seen:
            seen[key] = _file_sha256(f)
        h.update(f"{f.name}\0{seen[key]}\n".encode())
    if memo:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(seen, indent=1))
    return h.hexdigest()


def converter_version(llama_dir: Path) -> str:
    """SHA-256 (16 hex digits) of the converter's Python sources: the script, its model classes, its gguf package."""
    h = hashlib.sha256()
    files = [llama_dir / CONVERTER] + sorted((llama_dir / "conversion").rglob("*.py")) \
        + sorted((llama_dir / "gguf-py" / "gguf").rglob("*.py"))
    for f in files:
        h.update(f"{f.relative_to(llama_dir)}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(ckpt_hash: str, conv_version: str, dtype: str = GGUF_DTYPE) -> str:
    """The converted file's key: what it was converted from, by which converter, to which type."""
    return hashlib.sha256(f"{ckpt_hash}\n{conv_version}\n{dtype}".encode()).hexdigest()[:16]


def gguf_path(ckpt: Path, key: str, cache: Path = GGUF_DIR) -> Path:
    return cache / f"{ckpt.name}-{key}.{GGUF_DTYPE}.gguf"


def sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def find_converter(version: str, src_dir: Path = SRC_DIR, download: bool = True) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py of this llama-cpp-python version: taken once out of the
    version's sdist in `src_dir` (where `make anchor` keeps it; fetched with pip if it is not there)."""
    out = src_dir / version / "llama.cpp"
    if (out / CONVERTER).exists():
        return out
    sdist = src_dir / sdist_name(version)
    if not sdist.exists():
        if not download:
            raise FileNotFoundError(f"{sdist} is missing (make anchor keeps it there)")
        src_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", str(src_dir)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"pip could not fetch llama-cpp-python {version}'s sdist: {r.stderr[-1000:]}")
    extract_converter(sdist, out)
    return out


def extract_converter(sdist: Path, out: Path) -> None:
    """The converter's parts (CONVERTER_PARTS) of the sdist's vendor/llama.cpp, into `out` (whole or not at all)."""
    with tarfile.open(sdist) as tar:
        prefix = None
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1][len("vendor/llama.cpp/"):]
            if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS) and (m.isfile() or m.isdir()):
                prefix = f"{parts[0]}/vendor/llama.cpp/"
                members.append(m)
        if not any(m.name.endswith("/" + CONVERTER) for m in members):
            raise FileNotFoundError(f"{sdist} holds no vendor/llama.cpp/{CONVERTER}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=out.parent))  # beside `out`: the rename stays on its disk
        try:
            tar.extractall(tmp, members=members, filter="data")
            shutil.rmtree(out, ignore_errors=True)
            (tmp / prefix).rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def convert(ckpt: Path, llama_dir: Path, cache: Path = GGUF_DIR, progress: Callable[[str], None] = print) -> tuple[Path, bool]:
    """(the BF16 GGUF of `ckpt`, whether it was converted now): llama.cpp's converter, once per key."""
    key = cache_key(checkpoint_hash(ckpt, cache / "checkpoint-hashes.json"), converter_version(llama_dir))
    out = gguf_path(ckpt, key, cache)
    if out.exists():
        return out, False
    progress(f"  converting {ckpt.name} to a {GGUF_DTYPE.upper()} GGUF with llama.cpp's {CONVERTER} -> {out}")
    cache.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    r = subprocess.run([sys.executable, str(llama_dir / CONVERTER), str(ckpt), "--outtype", GGUF_DTYPE,
                        "--outfile", str(part)], capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0 or not part.exists():
        part.unlink(missing_ok=True)
        raise RuntimeError(f"{CONVERTER} failed on {ckpt} (exit {r.returncode}): {r.stderr[-2000:]}")
    part.replace(out)
    return out, True


# ---- the figures ----

def paired(num: list[float], den: list[float]) -> Stat | None:
    """num / den per repeat (measured next to each other), then median and min-max over the repeats."""
    return Stat.of([n / d for n, d in zip(num, den, strict=False) if n and d])


def _d(s: Stat | None) -> dict | None:
    return asdict(s) if s is not None else None


def _median(s: Stat | None) -> float | None:
    return s.median if s is not None else None


def model_entry(version: str, flash_attn: str, settings: dict, rec: dict) -> dict:
    """One model's JSON (the bench report's models.<name>.llamacpp) from its per-repeat figures `rec`:
    decode {"served": [tok/s], "llamacpp": [tok/s]}, ttft {length: {"tokens": [n], "served": [s], "llamacpp": [s]}}.
    decode_ratio: cpu-arena / llama.cpp tokens/s (above 1: cpu-arena faster); ttft_ratio per length: cpu-arena /
    llama.cpp seconds (below 1: cpu-arena faster); both medians of the per-repeat ratios."""
    dec = rec["decode"]
    ttft = rec["ttft"]
    return {
        "version": version, "gguf_dtype": GGUF_DTYPE, "flash_attn": flash_attn, **settings,
        "decode_tok_s": _d(Stat.of(dec["llamacpp"])),
        "ttft_s": {k: _d(Stat.of(v["llamacpp"])) for k, v in ttft.items()},
        "decode_ratio": _median(paired(dec["served"], dec["llamacpp"])),
        "ttft_ratio": {k: _median(paired(v["served"], v["llamacpp"])) for k, v in ttft.items()},
        "served": {"decode_tok_s": _d(Stat.of(dec["served"])),
                   "ttft_s": {k: _d(Stat.of(v["served"])) for k, v in ttft.items()}},
        "ratio_noise": {"decode": _d(paired(dec["served"], dec["llamacpp"])),
                        "ttft": {k: _d(paired(v["served"], v["llamacpp"])) for k, v in ttft.items()}},
        "prompt_tokens": {k: v["tokens"] for k, v in ttft.items()},
        "raw": rec,
    }


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _s(d: dict | None, digits: int = 2) -> str:
    return "-" if not d else Stat(d["median"], d["min"], d["max"], d["n"]).fmt(digits)


def table_lines(anchor: dict | None) -> list[str]:
    """The printed table's block: per model llama.cpp's figures, the served ones measured beside them, the ratios."""
    if not anchor or anchor.get("skipped"):  # a skip was said in its one line as the run went (measure)
        return []
    lines = ["", f"against llama.cpp (llama-cpp-python {anchor['version']}, BF16 GGUF, measured side by side; "
                 "cpu-arena / llama.cpp: decode above 1 and TTFT below 1 = cpu-arena faster)"]
    for name, m in anchor["models"].items():
        if m.get("error"):
            lines.append(f"  {name}: failed ({m['error'][:200]})")
            continue
        lines.append(f"  {name} [flash_attn {m['flash_attn']}, {m['n_threads']} thread(s)]: decode llama.cpp "
                     f"{_s(m['decode_tok_s'], 1)} tok/s, served {_s(m['served']['decode_tok_s'], 1)} tok/s: "
                     f"{_x(m['decode_ratio'])}")
        for k, v in m["ttft_s"].items():
            n = m["prompt_tokens"][k]
            lines.append(f"  {' ' * len(name)} {round(sum(n) / len(n))}-token prompt (asked {k}): TTFT llama.cpp "
                         f"{_s(v)} s, served {_s(m['served']['ttft_s'][k])} s: {_x(m['ttft_ratio'][k])}")
    return lines


def attach(report: dict, anchor: dict | None) -> None:
    """Into the bench's JSON: models.<name>.llamacpp per model, and llamacpp_anchor (version, or why skipped)."""
    if not anchor:
        return
    report["llamacpp_anchor"] = {k: v for k, v in anchor.items() if k != "models"}
    for name, entry in anchor.get("models", {}).items():
        report.setdefault("models", {}).setdefault(name, {})["llamacpp"] = entry


# ---- the child: llama.cpp in a process of its own ----

def _answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def _flash_attn_name(llm) -> str:
    import llama_cpp

    kind = getattr(llm.context_params, "flash_attn_type", None)
    names = {getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_ENABLED", None): "on",
             getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_DISABLED", None): "off",
             getattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_AUTO", None): "auto"}
    if kind is None:
        return "on" if getattr(llm.context_params, "flash_attn", False) else "off"
    return names.get(kind, str(kind))


def _run(llm, ids: list[int], tokens: int) -> tuple[float, float | None]:
    """(prompt pass + first token s, decode tokens/s over `tokens` tokens) of one greedy generation from `ids`."""
    llm.reset()  # no prefix of an earlier prompt is kept (generate would reuse it)
    stamps = []
    t0 = time.perf_counter()
    for _ in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) >= tokens:
            break
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return stamps[0] - t0, rate


def _child(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, **({} if FLASH_ATTN is None else {"flash_attn": FLASH_ATTN}))
    _run(llm, list(range(100, 100 + WARM_PROMPT)), 4)
    _answer({"ready": True, "flash_attn": _flash_attn_name(llm), "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
             "n_ubatch": llm.context_params.n_ubatch})
    for line in sys.stdin:
        req = json.loads(line)
        ttft, rate = _run(llm, req["ids"], req["tokens"])
        _answer({"ttft_s": ttft, "decode_tok_s": rate})


class LlamaChild(Child):
    """llama.cpp on one GGUF in a child process (_child): answers a prompt's TTFT and decode rate on request."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        cmd = [sys.executable, "-m", "bench.llamacpp", "child", "--gguf", str(gguf), "--threads", str(threads),
               "--n-ctx", str(n_ctx)]
        # llama.cpp as a user runs it: its own thread count and OpenMP's default waiting (no worker settings).
        super().__init__(cmd, {**os.environ, "OMP_NUM_THREADS": str(threads)}, MARK, "llama.cpp")
        self.info = self._read()

    def __call__(self, ids: list[int], tokens: int) -> dict:
        return self.ask({"ids": ids, "tokens": tokens})


# ---- the bench's part ----

@dataclass(frozen=True)
class AnchorPlan:
    """Decode tokens, repeats and long-prompt lengths: the bench's own (--tokens, --repeats, --quick,
    --no-long-prompts), so llama.cpp and the served model measure the same."""

    tokens: int
    repeats: int
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, args: argparse.Namespace, tokens: int, repeats: int) -> AnchorPlan:
        from bench.prompts import LENGTHS, QUICK_LENGTHS

        lengths = () if getattr(args, "no_long_prompts", False) else (QUICK_LENGTHS if args.quick else LENGTHS)
        return cls(tokens, repeats, lengths)


def side_by_side(figures: list[tuple[dict, Callable[[], float | None], Callable[[], float | None]]], repeat: int) -> None:
    """One repeat: for each figure (its record, the served measurement, llama.cpp's) the two next to each other,
    appended to record["served"] and record["llamacpp"]; served first in even repeats, llama.cpp first in odd ones."""
    for into, served, llama in figures:
        order = [("served", served), ("llamacpp", llama)]
        for key, step in (order if repeat % 2 == 0 else order[::-1]):
            into[key].append(step())


def _served_decode(api: str, name: str, tokenizer, tokens: int, headers: dict) -> float | None:
    from bench.api import _client, count_tokens, stream_chat

    with _client() as client:
        r = stream_chat(api, name, tokens, headers=headers, client=client)
    n = count_tokens(tokenizer, r.text)
    return (n - 1) / r.decode_s if n > 1 and r.decode_s > 0 else None


def measure_model(stack_cfg, name: str, tokenizer, plan: AnchorPlan, api: str, headers: dict, version: str,
                  llama_dir: Path, salt: str, progress: Callable[[str], None] = print) -> dict:
    """One model against llama.cpp: converted (once), loaded in a child, then served and llama.cpp side by side."""
    from fastchat.utils import get_context_length
    from transformers import AutoConfig

    from bench.api import PROMPT
    from bench.prompts import ANSWER_TOKENS, _served_ttft, build_prompt, fitting_length, renderer
    from launch.fastchat_entry import prepare_process

    prepare_process()  # the project's adapters, so that the prompt ids come from the worker's chat template
    m = stack_cfg.model(name)
    ckpt = stack_cfg.model_path(m)
    threads = stack_cfg.threads(m)
    child = None
    try:
        gguf, _ = convert(Path(ckpt), llama_dir, progress=progress)
        context = get_context_length(AutoConfig.from_pretrained(str(ckpt), trust_remote_code=m.trust_remote_code))
        render = renderer(str(ckpt), tokenizer)
        targets = {str(t): fitting_length(t, context) for t in plan.lengths}
        n_ctx = max([*targets.values(), WARM_PROMPT]) + max(plan.tokens, ANSWER_TOKENS) + 64
        progress(f"[{name}] llama.cpp: loading {gguf.name} ({threads} thread(s), n_ctx {n_ctx}) ...")
        child = LlamaChild(gguf, threads, n_ctx)
        info = child.info
        decode_ids = render(PROMPT)
        rec: dict = {"decode": {"served": [], "llamacpp": []},
                     "ttft": {k: {"tokens": [], "served": [], "llamacpp": []} for k in targets}}
        for r in range(plan.repeats):
            progress(f"[{name}] llama.cpp and served side by side, repeat {r + 1}/{plan.repeats} ...")
            figures = [(rec["decode"], lambda: _served_decode(api, name, tokenizer, plan.tokens, headers),
                        lambda: child(decode_ids, plan.tokens)["decode_tok_s"])]
            for k, n in targets.items():
                text, ids = build_prompt(render, n, f"anchor-{salt}-{name}-{k}-{r}")
                rec["ttft"][k]["tokens"].append(len(ids))
                figures.append((rec["ttft"][k], lambda text=text: _served_ttft(api, name, text, headers),
                                lambda ids=ids: child(ids, 1)["ttft_s"]))
            side_by_side(figures, r)
        settings = {"n_threads": threads, "n_ctx": info["n_ctx"], "n_batch": info["n_batch"],
                    "n_ubatch": info["n_ubatch"], "decode_tokens": plan.tokens, "repeats": plan.repeats,
                    "gguf": str(gguf), "converter": f"llama.cpp {CONVERTER} of llama-cpp-python {version} "
                                                    f"(sources {converter_version(llama_dir)})"}
        return model_entry(version, info["flash_attn"], settings, rec)
    except Exception as e:  # reported in the JSON: the rest of the bench's figures are not thrown away
        progress(f"[{name}] llama.cpp anchor failed: {type(e).__name__}: {e}")
        return {"version": version, "gguf_dtype": GGUF_DTYPE, "error": f"{type(e).__name__}: {e}"}
    finally:
        if child is not None:
            child.close()


def measure(stack_cfg, names: list[str], plan: AnchorPlan, api: str, headers: dict, tokenizers: dict,
            progress: Callable[[str], None] = print) -> dict:
    """Every model against llama.cpp, or {"skipped": why} (one line printed) where llama-cpp-python is missing."""
    version = installed_version()
    if version is None:
        progress(SKIP_LINE)
        return {"skipped": "llama-cpp-python is not installed (make anchor)"}
    try:
        llama_dir = find_converter(version)
    except (OSError, RuntimeError, tarfile.TarError, subprocess.SubprocessError) as e:
        progress(f"llama.cpp anchor skipped: no converter for llama-cpp-python {version}: {e}")
        return {"skipped": f"no converter for llama-cpp-python {version}: {e}", "version": version}
    salt = f"{time.time_ns():x}"  # a running stack's prefix cache may hold an earlier run's prompts
    out: dict = {"version": version, "gguf_dtype": GGUF_DTYPE, "converter_dir": str(llama_dir), "models": {}}
    for name in names:
        out["models"][name] = measure_model(stack_cfg, name, tokenizers[name], plan, api, headers, version,
                                            llama_dir, salt, progress)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.llamacpp", description="the llama.cpp anchor's child process")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("--gguf", required=True)
    c.add_argument("--threads", type=int, required=True)
    c.add_argument("--n-ctx", type=int, required=True)
    _child(p.parse_args(argv))


if __name__ == "__main__":
    main()
