"""Before anything starts: do the models this host serves fit in its memory?

Why: a worker that does not fit is not refused by anything; the kernel OOM-kills it (or a neighbour)
minutes into loading, and the supervisor restarts it into the same end. So `launch check` and `launch up`
add up, per model, its weights in the dtype it is served in plus a fixed per-worker overhead, add the
services that always run, and compare that with the memory this process could get; beyond it they refuse
with one message that names every model, its need, what the machine has and the ways out.

Weight bytes come from the checkpoint's headers only (safetensors' JSON header, the pickle of a PyTorch
`.bin`), never from its tensor data: a check of two 7B checkpoints takes milliseconds.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.host.hardware import resolve_dtype
from launch.config import ArenaConfig, ConfigError, ModelConfig

GB = 10**9
MIB = 2**20

# One worker's memory beyond its weights, at its peak (while loading: what the kernel OOM-kills on).
# Measured on this project's stack, bf16 on a CPU with AVX512_BF16, by `launch up` with one embedded model
# (prefix cache off) and by the worker's loading steps in one process, reading VmHWM, RssAnon and RssFile
# in /proc/<pid>/status:
#   - imports (torch, transformers, FastChat, the adapters) and the tokenizer: 0.37 GB anonymous;
#   - loading maps the checkpoint and reads it whole (RssFile = the file's size): clean page cache that
#     the kernel reclaims under pressure, and the worker drops the mapping once loaded, so not counted;
#   - moving the weights to 2 MB pages copies them in steps of hugepages.TRIM_EVERY (0.54 GB) before the
#     old pages go back, so anonymous memory peaks at weights + imports + up to 0.54 GB;
#   - peak anonymous minus weights: Qwen2.5-Coder-0.5B 1.98 - 0.99 = 0.99 GB (0.27 GB of it the packed
#     copy of its tied output projection), SmolLM2-135M 0.96 - 0.27 = 0.69 GB; once idle after an answer,
#     VmRSS minus weights is 0.67 and 0.45 GB. For a 7B model (15.4 GB, untied) the same reckoning
#     gives 0.37 + 0.54 = 0.91 GB at the peak; `make bench ARGS=--shape qwen-7b` peaked at 16.5 GB RSS.
# 1.0 GB covers each of these. Not counted: the keys and values of requests being answered (they grow
# with the number and length of live requests; the prefix cache of finished ones is counted apart).
WORKER_OVERHEAD_BYTES = 10**9
# The processes that run whatever the models (VmRSS on the same stack): supervisor 0.03, controller 0.36,
# API server 0.38 and web UI 0.46 GB.
SERVICES_BYTES = 1_250 * 10**6

# Bytes per element of the dtype a model is served in (config values after resolve_dtype).
SERVED_ITEMSIZE = {"bfloat16": 2, "float32": 4}

# safetensors dtype -> (bytes per element, floating point). Floating tensors are cast to the served
# dtype on load; integer buffers (position ids, masks) keep theirs.
_SAFETENSORS_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False), "BOOL": (1, False),
}
# torch.<Name>Storage, as named in a `.bin` pickle -> (bytes per element, floating point).
_TORCH_STORAGES = {
    "DoubleStorage": (8, True), "FloatStorage": (4, True), "HalfStorage": (2, True),
    "BFloat16Storage": (2, True),
    "LongStorage": (8, False), "IntStorage": (4, False), "ShortStorage": (2, False),
    "CharStorage": (1, False), "ByteStorage": (1, False), "BoolStorage": (1, False),
}
# A safetensors header is JSON of a few MB at most; a larger length means a corrupt or foreign file.
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A weight file whose tensor shapes cannot be read from its header."""


@dataclass(frozen=True)
class Tensors:
    """What a checkpoint holds, independent of the dtype it is stored in."""

    float_numel: int  # elements of floating-point tensors: these take the served dtype
    other_bytes: int  # integer and bool tensors, which keep their stored size
    files: int

    def bytes_as(self, dtype: str) -> int:
        return self.float_numel * SERVED_ITEMSIZE[dtype] + self.other_bytes


@dataclass(frozen=True)
class ModelNeed:
    name: str
    dtype: str  # resolved: bfloat16 | float32
    weight_bytes: int
    overhead_bytes: int  # WORKER_OVERHEAD_BYTES plus the prefix cache the worker may fill

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.overhead_bytes


@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # where the figure comes from, for the message


@dataclass(frozen=True)
class MemoryCheck:
    models: tuple[ModelNeed, ...]
    skipped: tuple[tuple[str, str], ...]  # (model name, why it is not counted)
    services_bytes: int
    available: Available

    @property
    def need_bytes(self) -> int:
        return self.services_bytes + sum(m.need_bytes for m in self.models)

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.available.bytes

    def message(self, cfg: ArenaConfig) -> str:
        lines = [f"{cfg.source}: the models need {_gb(self.need_bytes)} of memory, this machine has "
                 f"{_gb(self.available.bytes)} available ({self.available.source}); started, workers would be "
                 "killed by the kernel (out of memory):"]
        width = max(len(m.name) for m in self.models)
        for m in self.models:
            lines.append(f"  {m.name:<{width}}  {m.dtype:<8}  {_gb(m.weight_bytes)} weights + "
                         f"{_gb(m.overhead_bytes)} worker = {_gb(m.need_bytes)}")
        lines.append(f"  supervisor, controller, API server, web UI: {_gb(self.services_bytes)}")
        lines += [f"  {name}: not counted ({why})" for name, why in self.skipped]
        lines.append(f"  (worker = {_gb(WORKER_OVERHEAD_BYTES)} per worker process at its loading peak beyond "
                     "the weights, plus its prefix_cache_mb)")
        s = cfg.server
        lines += [
            "Ways out:",
            f"  - serve fewer models: remove [[models]] entries from {cfg.source};",
            "  - serve a model from another host (README \"Multi-host\"): remove its entry here, set "
            "server.expose_internal = true, and on the other host, with the entry in its config, run "
            f"`make worker ARGS=\"--model NAME --controller-url http://THIS_HOST:{s.controller_port} "
            "--advertise-host THAT_HOST\"`;",
        ]
        fp32 = [m.name for m in self.models if m.dtype == "float32"]
        if fp32:
            lines.append(f"  - serve {', '.join(fp32)} in bfloat16 instead of float32 (dtype = \"bfloat16\": "
                         "half the weight bytes);")
        lines.append("  - or, if these figures are wrong for this machine, skip this check: "
                     "`--skip-memory-check`, or skip_memory_check = true in [server].")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


# ---- weight bytes from headers ----

def weight_files(folder: Path) -> list[Path]:
    """The files transformers would load, in its order of preference: safetensors before `.bin`,
    an index's shards before a single file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def count_tensors(folder: Path) -> Tensors:
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"no safetensors or pytorch_model*.bin weights in {folder}")
    float_numel = other_bytes = 0
    for f in files:
        reader = _safetensors_tensors if f.suffix == ".safetensors" else _bin_tensors
        for numel, itemsize, is_float in reader(f):
            if is_float:
                float_numel += numel
            else:
                other_bytes += numel * itemsize
    return Tensors(float_numel, other_bytes, len(files))


def weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of a checkpoint's weights once loaded in `dtype` (auto resolves as the worker does)."""
    return count_tensors(folder).bytes_as(resolve_dtype(dtype))


def _safetensors_tensors(path: Path) -> Iterator[tuple[int, int, bool]]:
    # The format: an 8-byte little-endian header length, then that many bytes of JSON,
    # {name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}; the data follows.
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: header length {n} is not that of a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize, is_float = _SAFETENSORS_DTYPES[info["dtype"]]
        except KeyError:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {info.get('dtype')!r}") from None
        yield math.prod(info["shape"]), itemsize, is_float


@dataclass(frozen=True)
class _Storage:
    key: str
    itemsize: int
    is_float: bool


@dataclass(frozen=True)
class _TensorView:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, *_rest):
    return _TensorView(storage, offset, tuple(size))


class _ShapeUnpickler(pickle.Unpickler):
    """Reads the pickle of a `torch.save` file into shapes and storage types, without torch and without
    touching the tensor data (which sits outside the pickle: zip members, or after it in the legacy format).

    Only the globals a state dict is made of resolve; anything else is refused, like torch's
    weights_only loader would, so a hostile file runs no code here either.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *_rest: data
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, _type, args, _state: func(*args)
        if module == "torch" and name in _TORCH_STORAGES:
            return name
        raise pickle.UnpicklingError(f"unsupported global {module}.{name} in a checkpoint pickle")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, numel[, view metadata]): a reference, not the data.
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in _TORCH_STORAGES):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return _Storage(str(pid[2]), *_TORCH_STORAGES[pid[1]])


def _bin_tensors(path: Path) -> Iterator[tuple[int, int, bool]]:
    try:
        state = _bin_state(path)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: cannot read the tensor shapes ({e})") from None
        # A global this reader does not know: torch's own safe loader knows more. mmap=True maps the
        # storages without reading them, so this stays a read of the pickle (plus torch's import).
        yield from _bin_tensors_torch(path)
        return
    except (EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read the tensor shapes ({e})") from None
    seen = set()
    for t in state.values() if isinstance(state, dict) else ():
        if not isinstance(t, _TensorView):
            continue
        # Tied weights saved as views of one storage are one tensor once loaded.
        key = (t.storage.key, t.offset, t.shape)
        if key in seen:
            continue
        seen.add(key)
        yield math.prod(t.shape), t.storage.itemsize, t.storage.is_float


def _bin_tensors_torch(path: Path) -> Iterator[tuple[int, int, bool]]:
    import torch

    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means the same: shapes unknown
        raise CheckpointError(f"{path}: cannot read the tensor shapes ({e})") from None
    seen = set()
    for t in state.values() if isinstance(state, dict) else ():
        if not isinstance(t, torch.Tensor) or (t.data_ptr(), t.shape) in seen:
            continue
        seen.add((t.data_ptr(), t.shape))
        yield t.numel(), t.element_size(), t.is_floating_point()


def _bin_state(path: Path):
    if zipfile.is_zipfile(path):
        # torch >= 1.6: a zip with <archive>/data.pkl and one member per storage; only data.pkl is read.
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise CheckpointError(f"{path}: a zip without data.pkl is not a torch.save file")
            with z.open(pkl) as f:
                return _ShapeUnpickler(f).load()
    # The legacy format: magic number, protocol version and system info pickles, then the state dict's
    # pickle; the storages' bytes come after it and are never read.
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.Unpickler(f).load()  # plain ints and a dict of sizes: no globals
        return _ShapeUnpickler(f).load()


# ---- memory available ----

def _meminfo_available(meminfo: Path) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable in {meminfo}")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        stats = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
    except OSError:
        return 0
    return next((int(stats[k]) for k in keys if k in stats), 0)


def _cgroup_headroom(proc_cgroup: Path, cgroup_fs: Path) -> tuple[int, str] | None:
    """What a cgroup memory limit still leaves this process (the tightest over its cgroup and ancestors).

    Usage minus inactive file pages (reclaimable page cache) is what the limit is held against, as the
    kernel's and the container runtimes' "working set"; a cgroup path that does not exist under the mount
    (a container's own view) falls back to its ancestors, the mount root last.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        if line.count(":") < 2:
            continue
        _id, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, limit_f, usage_f, inactive = cgroup_fs, "memory.max", "memory.current", ("inactive_file",)
        elif "memory" in controllers.split(","):  # cgroup v1
            base = cgroup_fs / "memory"
            limit_f, usage_f, inactive = ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                          ("total_inactive_file", "inactive_file"))
        else:
            continue
        d = base / rel.lstrip("/")
        while True:
            limit = _read_int(d / limit_f)
            # v1 writes "no limit" as a huge number (2**63 rounded down to a page).
            if limit is not None and limit < 2**62:
                usage = _read_int(d / usage_f) or 0
                working = max(0, usage - _stat_value(d / "memory.stat", inactive))
                room = max(0, limit - working)
                if best is None or room < best[0]:
                    best = (room, f"cgroup limit {_gb(limit)} in {d / limit_f}, {_gb(working)} of it in use")
            if d == base or base not in d.parents:
                break
            d = d.parent
    return best


def available_memory(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> Available:
    """MemAvailable, or less where a cgroup memory limit leaves less."""
    avail = Available(_meminfo_available(proc / "meminfo"), "MemAvailable in /proc/meminfo")
    cg = _cgroup_headroom(proc / "self" / "cgroup", cgroup_fs)
    if cg is not None and cg[0] < avail.bytes:
        return Available(*cg)
    return avail


# ---- the check ----

def model_need(cfg: ArenaConfig, m: ModelConfig) -> ModelNeed:
    dtype = resolve_dtype(m.dtype)
    # The batching worker keeps up to prefix_cache_mb of finished requests' keys and values: it fills up.
    cache = m.prefix_cache_mb * MIB if m.worker == "batching" else 0
    return ModelNeed(m.name, dtype, count_tensors(cfg.model_path(m)).bytes_as(dtype),
                     WORKER_OVERHEAD_BYTES + cache)


def check_memory(cfg: ArenaConfig, available: Callable[[], Available] | None = None) -> MemoryCheck:
    """Every model of `cfg` whose folder exists, against `available()` (default: this machine's)."""
    needs, skipped = [], []
    for m in cfg.models:
        if not cfg.model_path(m).is_dir():
            skipped.append((m.name, "not downloaded yet"))
            continue
        try:
            needs.append(model_need(cfg, m))
        except (CheckpointError, OSError, KeyError, json.JSONDecodeError) as e:
            skipped.append((m.name, f"weights unreadable: {e}"))
    # The module's reader is looked up at call time, so tests can put a fake machine in its place.
    return MemoryCheck(tuple(needs), tuple(skipped), SERVICES_BYTES, (available or available_memory)())


def enforce(cfg: ArenaConfig, skip: bool = False) -> MemoryCheck | None:
    """Raise ConfigError when the models do not fit; `skip` (or server.skip_memory_check) turns it off."""
    if skip or cfg.server.skip_memory_check:
        return None
    result = check_memory(cfg)
    if result.models and not result.fits:
        raise ConfigError(result.message(cfg))
    return result
