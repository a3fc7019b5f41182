"""The shape bench's models: a random-weight checkpoint with a lab model's full dimensions, written in the
layout its publisher ships (config.json and safetensors shards, no modelling code), loaded the way the batching
worker loads that model (worker_adapters/native_loader.py load_native) and put on the kernels.

Why a checkpoint on disk instead of a model built in memory: the loader is part of what is served. A model built
directly as a transformers class skips the published layout's fused tensors, the fp16 ChatGLM3 weights converted
to bf16 and the loader's peak memory, which decides whether a 7B model fits beside the others at all.

The checkpoint is written once under ~/.cache/cpu-arena/shapes/<shape> ($XDG_CACHE_HOME if set; 13-16 GB) and
reused: tensor by tensor, one ~2 GB shard at a time, so the writer never holds the model. Values are random
(speed does not depend on them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: `python -m bench --help` and parse_args stay light
    import torch

SHARD_BYTES = 2 * 10**9  # as the publishers shard: a shard is what the writer holds at once
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """A lab model's published config.json (the weights' dimensions and the facts the native loader reads) and
    the dtype its weights are published in."""

    name: str
    config: dict
    stored: str  # a torch dtype's name

    @property
    def stored_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.stored)


# The published config.json of huggingface.co/THUDM/chatglm3-6b (model card "ChatGLM3-6B"), without `auto_map`:
# the checkpoint carries no modelling code, which the native loader does not need. Weights published in fp16.
CHATGLM3_6B = {
    "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
    "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0,
}
# The published config.json of huggingface.co/Qwen/Qwen-7B-Chat (model card "Qwen-7B-Chat"), without `auto_map`.
# intermediate_size 22016 is w1 and w2 together (each 11008). Weights published in bf16.
QWEN_7B_CHAT = {
    "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0, "bf16": False,
    "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096, "intermediate_size": 22016,
    "initializer_range": 0.02, "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192,
    "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
    "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}
SHAPES = {
    "chatglm3-6b": Shape("chatglm3-6b", CHATGLM3_6B, "float16"),
    "qwen-7b": Shape("qwen-7b", QWEN_7B_CHAT, "bfloat16"),
}


def published_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the publisher's checkpoint holds for this config, in the model's order."""
    kind = config["model_type"]
    if kind == "chatglm":
        return _chatglm_tensors(config)
    if kind == "qwen":
        return _qwen_tensors(config)
    raise ValueError(f"no published layout for model_type {kind!r}")


def _chatglm_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, ffn, vocab = c["hidden_size"], c["ffn_hidden_size"], c["padded_vocab_size"]
    heads, groups, head_dim = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
    qkv = (heads + 2 * groups) * head_dim
    out = [("transformer.embedding.word_embeddings.weight", (vocab, hidden)),
           # A persistent buffer of the published code, so its checkpoints carry it (the native loader skips it).
           ("transformer.rotary_pos_emb.inv_freq", (head_dim // 4,))]
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "self_attention.query_key_value.weight", (qkv, hidden)),
                (p + "self_attention.query_key_value.bias", (qkv,)),
                (p + "self_attention.dense.weight", (hidden, heads * head_dim)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.dense_h_to_4h.weight", (2 * ffn, hidden)),
                (p + "mlp.dense_4h_to_h.weight", (hidden, ffn))]
    return out + [("transformer.encoder.final_layernorm.weight", (hidden,)),
                  ("transformer.output_layer.weight", (vocab, hidden))]


def _qwen_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, ffn, vocab = c["hidden_size"], c["intermediate_size"] // 2, c["vocab_size"]
    out = [("transformer.wte.weight", (vocab, hidden))]
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (hidden,)),
                (p + "attn.c_attn.weight", (3 * hidden, hidden)),
                (p + "attn.c_attn.bias", (3 * hidden,)),
                (p + "attn.c_proj.weight", (hidden, hidden)),
                (p + "ln_2.weight", (hidden,)),
                (p + "mlp.w1.weight", (ffn, hidden)),
                (p + "mlp.w2.weight", (ffn, hidden)),
                (p + "mlp.c_proj.weight", (hidden, ffn))]
    return out + [("transformer.ln_f.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: dict,
                   gen: torch.Generator) -> torch.Tensor:
    """Norms 1 and biases 0 as trained models start (random norms compound over 28-32 layers); matrices
    N(0, 0.02), drawn in the stored dtype directly so no fp32 copy of a 1.2 GB embedding is ever made."""
    import torch

    if name.endswith("inv_freq"):  # the published code's values: rotary on half of each head
        dim = config["kv_channels"] // 2
        return (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).to(dtype)
    if len(shape) == 1:
        return torch.zeros(shape, dtype=dtype) if name.endswith(".bias") else torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def _shards(tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
            shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors grouped in order into shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list] = [[]]
    used = 0
    for name, shape in tensors:
        n = dtype.itemsize * math.prod(shape)
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    return shards


def write_checkpoint(folder: Path, config: dict, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES,
                     seed: int = 0) -> int:
    """A random-weight checkpoint for `config` in its publisher's layout: config.json, safetensors shards named
    as published (model-0000i-of-0000n) and their index. Each shard is generated, written and freed before the
    next. Returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = _shards(published_tensors(config), dtype, shard_bytes)
    weight_map, total = {}, 0
    for i, part in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, shape, dtype, config, gen) for name, shape in part}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(folder / "config.json", config)
    return total


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpu-arena" / "shapes"


def is_complete(folder: Path, config: dict) -> bool:
    """Whether `folder` holds this config's checkpoint: its config.json, and an index naming every published
    tensor in shards that are all there. A folder only gets its final name once written (shape_checkpoint), so
    this guards against a shape table changed since, not against a half-written folder."""
    try:
        if json.loads((folder / "config.json").read_text(encoding="utf-8")) != config:
            return False
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError):
        return False
    names = {name for name, _ in published_tensors(config)}
    return set(weight_map) == names and all((folder / f).is_file() for f in set(weight_map.values()))


def shape_checkpoint(shape: Shape, root: Path | None = None, shard_bytes: int = SHARD_BYTES,
                     log=print) -> tuple[Path, float | None]:
    """(the shape's checkpoint folder, seconds spent writing it or None where it was there already).

    Written under a temporary name and renamed when whole, so an interrupted write is never taken for a
    checkpoint; a folder from another shape table is replaced."""
    root = root or cache_root()
    folder = root / shape.name
    if is_complete(folder, shape.config):
        return folder, None
    size = sum(math.prod(s) for _, s in published_tensors(shape.config)) * shape.stored_dtype.itemsize
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < size * 1.05:
        raise OSError(f"{root}: {free / 1e9:.1f} GB free, the {shape.name} checkpoint needs {size / 1e9:.1f} GB")
    log(f"writing the {shape.name} checkpoint ({size / 1e9:.1f} GB, {shape.stored}) "
        f"to {folder} (once; later runs reuse it) ...", flush=True)
    tmp = root / f".{shape.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    try:
        write_checkpoint(tmp, shape.config, shape.stored_dtype, shard_bytes)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, time.perf_counter() - t


# --- the loader's peak memory, measured in a process of its own --------------------------------------------

STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def _status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


@dataclass(frozen=True)
class LoadRss:
    """A load_native call's memory, in a fresh process: VmHWM at the end (the kernel's exact peak), the
    parameters' bytes, and what the process held before the call (interpreter, torch, transformers). The
    anonymous / file-backed split at the peak is from a sampler every 10 ms: mapped checkpoint pages count as
    RSS (RssFile) just as the weights' own memory (RssAnon) does."""

    peak_rss_bytes: int
    weights_bytes: int
    before_rss_bytes: int
    sampled_peak_anon_bytes: int
    sampled_peak_file_bytes: int
    after_anon_bytes: int
    after_file_bytes: int
    load_s: float

    @property
    def ratio(self) -> float:
        return self.peak_rss_bytes / self.weights_bytes


def _load_in_child() -> None:
    """The child's side of measure_load: argv is (folder, dtype name); prints one JSON line."""
    import torch
    from transformers import GlmForCausalLM, Qwen2ForCausalLM  # noqa: F401 - imported before the baseline

    from worker_adapters.native_loader import load_native

    folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    before = _status()
    peak = {"VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _status()
            if now["VmRSS"] > peak["VmRSS"]:
                peak.update(now)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    model = load_native(folder, dtype)
    load_s = time.perf_counter() - t
    done.set()
    sampler.join()
    after = _status()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(asdict(LoadRss(
        peak_rss_bytes=after["VmHWM"], weights_bytes=weights, before_rss_bytes=before["VmRSS"],
        sampled_peak_anon_bytes=peak.get("RssAnon", 0), sampled_peak_file_bytes=peak.get("RssFile", 0),
        after_anon_bytes=after["RssAnon"], after_file_bytes=after["RssFile"], load_s=load_s))))


def measure_load(folder: Path, dtype: str = "bfloat16", timeout: float = 1800) -> LoadRss:
    """load_native(folder, dtype) in a child process of its own, so that the peak is the loader's alone (not this
    process's probes, earlier models or allocator leftovers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", "from bench.shapes import _load_in_child; _load_in_child()", str(folder), dtype],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {folder} in a child process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return LoadRss(**json.loads(proc.stdout.strip().splitlines()[-1]))


# --- the model the shape bench measures --------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeBuild:
    """How the shape bench's model came to be: its checkpoint and the load's memory."""

    shape: str
    path: str  # the loading path, as the report names it
    checkpoint: Path
    checkpoint_dtype: str
    checkpoint_bytes: int
    written_s: float | None  # None: the checkpoint was reused
    load: LoadRss
    load_s: float  # this process's load_native


NATIVE_CLASS = {"chatglm": "GlmForCausalLM", "qwen": "Qwen2ForCausalLM"}  # native_loader.LAYOUTS' classes


def load_path(config: dict) -> str:
    kind = config["model_type"]
    return f"native: published {kind} checkpoint -> {NATIVE_CLASS[kind]} (worker_adapters.native_loader.load_native)"


def build(shape: Shape, dtype: str = "bfloat16", root: Path | None = None,
          shard_bytes: int = SHARD_BYTES, log=print):
    """(the shape's model loaded as the worker loads it, in `dtype`, and its ShapeBuild): the checkpoint written
    or reused, the load measured in a child process first (so the two loads are never in memory at once), then
    loaded here."""
    import torch

    from worker_adapters.native_loader import load_native

    folder, written = shape_checkpoint(shape, root, shard_bytes, log=log)
    log(f"loading {folder} in a child process to measure the loader's peak RSS ...", flush=True)
    load = measure_load(folder, dtype)
    log(f"loading {folder} here ...", flush=True)
    t = time.perf_counter()
    model = load_native(folder, getattr(torch, dtype))
    load_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return model, ShapeBuild(shape.name, load_path(shape.config), folder, shape.stored, size, written, load,
                             load_s)

