"""Back a model's weights with 2 MB pages (MADV_COLLAPSE), so a decode step streams them with few TLB misses.

Why: decoding reads every weight once per token. On 4 kB pages that is a page-table walk every 4 kB;
on this machine the bf16 kernel read a 7B-shaped weight at 18.9 GB/s on 4 kB pages and 20.9 GB/s
once collapsed to 2 MB pages (and the bench's bandwidth probe 17.3 vs 19.7 GB/s, which is why the
probe collapses its array too: the roofline compares like with like). Transparent huge pages are
"madvise" here, so nothing gets them unless asked. MADV_COLLAPSE (Linux 6.1+) rebuilds the pages of
a range synchronously, in place; ~2 s per GB.

Only whole aligned 2 MB pages inside a tensor can be collapsed; a tensor's unaligned ends stay on 4 kB
pages. That is little for a 7B model, but SmolLM2's projections are 1-7 MB each: 0.30 of its 0.54 GB
collapsed. So collapse_model first gathers the model's weights into one 2 MB-aligned arena (gather), all
of it on 2 MB pages. Interleaved kernel runs over the same shapes, in one process (1 row / 4 rows):
Qwen2.5-0.5B-shaped fp32 weights 102 / 120 ms gathered, 113 / 133 each collapsed where it was, 111 / 134
on 4 kB pages (a second run: 95 / 116, 98 / 123, 108 / 129); SmolLM2-shaped 42 / 49, 44 / 50, 44 / 52.

Best effort: an older kernel, THP "never" or no free 2 MB blocks leaves the pages as they are
and the reason is reported; nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import mmap
import os
from collections.abc import Iterable

import torch

MADV_COLLAPSE = 25
HUGE = 2 << 20


def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def collapse(tensors: Iterable[torch.Tensor]) -> tuple[int, str]:
    """(bytes now on 2 MB pages, why not all of them or ""). Each storage once; opaque tensors skipped."""
    if os.environ.get("CPU_ARENA_NO_HUGEPAGES"):
        return 0, "CPU_ARENA_NO_HUGEPAGES is set"
    try:
        madvise = _madvise()
    except (OSError, AttributeError) as e:
        return 0, f"no madvise: {e}"
    seen, done, why, failed = set(), 0, "", []
    for t in tensors:
        if t.layout != torch.strided or t.is_mkldnn or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        start = storage.data_ptr()
        if start in seen:
            continue
        seen.add(start)
        lo, hi = (start + HUGE - 1) & ~(HUGE - 1), (start + storage.nbytes()) & ~(HUGE - 1)
        if hi <= lo:
            continue  # smaller than one aligned 2 MB page
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
            continue
        err = ctypes.get_errno()
        why = f"madvise(MADV_COLLAPSE): {os.strerror(err)}"
        if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            break  # this kernel or setting never will: do not try every tensor
        failed.append((lo, hi))
    # A failed call (ENOMEM, EAGAIN: no free 2 MB blocks for some of the range) may still have collapsed the rest,
    # and a gathered arena took 2 MB pages at its first touch where there were free blocks: count what is there
    # (a 7B-shaped model once reported 0 GB here with part of it on 2 MB pages).
    return done + sum(_huge_bytes_in(failed)), why


# Tensors smaller than this stay where they are (norms, biases): they are not worth a page of their own.
GATHER_MIN = 64 << 10
ALIGN = 64  # each tensor in the arena starts on a cache line, as torch's allocator places them
TRIM_EVERY = 512 << 20  # bytes moved between two hand-backs of freed heap pages (a trim costs a few ms)


def gather(tensors: Iterable[torch.Tensor]) -> int:
    """Move the data of every tensor that owns its whole storage (GATHER_MIN bytes or more) into one
    anonymous mapping, 2 MB-aligned and advised MADV_HUGEPAGE before it is touched; returns the bytes
    moved. In place: each tensor object keeps its identity (`t.data = view`), so tied weights stay
    tied and every holder of a tensor sees the move. The old storage is freed once copied, and freed
    heap pages are handed back every TRIM_EVERY bytes, so memory peaks at the weights plus about that
    much, not twice the weights (a 7B model must fit in 24 GB). Tensors that share a storage with
    another (views) or are opaque are left where they are. Nothing moves where THP is "never"."""
    if os.environ.get("CPU_ARENA_NO_HUGEPAGES") or _thp_never():
        return 0
    owners: dict[int, tuple[torch.Tensor, int]] = {}  # storage address -> (tensor, its bytes)
    for t in tensors:
        if not _plain_cpu(t) or not t.is_contiguous():
            continue
        storage = t.untyped_storage()
        n = t.numel() * t.element_size()
        if storage.nbytes() != n or t.storage_offset() != 0:
            continue  # a view of a larger storage: moving it would part it from the rest
        if n >= GATHER_MIN:
            owners.setdefault(storage.data_ptr(), (t, n))
    if not owners:
        return 0
    # (tensor, its bytes, its slot in the arena: the bytes rounded up to ALIGN)
    slots = [(t, n, (n + ALIGN - 1) // ALIGN * ALIGN) for t, n in owners.values()]
    total = sum(size for _, _, size in slots)
    whole = (total + HUGE - 1) // HUGE * HUGE
    area = mmap.mmap(-1, whole + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(area, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE)  # faults in the arena then take 2 MB pages directly
    start = -torch.frombuffer(area, dtype=torch.uint8).data_ptr() % HUGE
    # The arena: whole 2 MB pages from a 2 MB boundary (so collapse() covers it exactly); it keeps `area`
    # mapped as long as any tensor views it.
    arena = torch.frombuffer(area, dtype=torch.uint8, offset=start, count=whole)
    offset, untrimmed = 0, 0
    with torch.no_grad():
        for t, n, size in slots:
            view = arena[offset:offset + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.data = view
            offset += size
            untrimmed += size
            if untrimmed >= TRIM_EVERY:
                give_back_freed_memory()
                untrimmed = 0
    give_back_freed_memory()  # the old storages (Qwen2.5-0.5B: RSS 2.27 GB -> 2.69 GB without this)
    return total


def _plain_cpu(t: torch.Tensor) -> bool:
    """A CPU tensor whose data is a plain memory range (not an opaque oneDNN layout)."""
    return t.layout == torch.strided and not t.is_mkldnn and t.device.type == "cpu"


def _thp_never() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" in f.read()
    except OSError:
        return False


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, fields[5].rstrip("\n")))
    return out


def release_checkpoint_files(model: torch.nn.Module) -> int:
    """Copy every parameter and buffer that still lives in a memory-mapped file (the checkpoint, as
    transformers loads safetensors) into ordinary memory, so that the file's mapping goes; returns how many.

    Why: gather moves only tensors of GATHER_MIN bytes or more, and the kernels' packed copies replace the
    linears, but norms and biases stayed in the file: their few KB kept the whole mapping, and every page of
    the file that loading had read stayed in the worker's RSS (Qwen2.5-0.5B: 2.61 GB RSS, 1.07 GB of it
    the 0.99 GB file; after this 1.6 GB). Clean file pages can be reclaimed, but they were counted twice
    next to the weights in memory. In place (`t.data = copy`): tied weights stay tied."""
    maps = [(lo, hi) for lo, hi, _ in file_mappings()]
    moved = 0
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if _plain_cpu(t) and t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in maps):
                t.data = t.data.clone()
                moved += 1
    gc.collect()  # the file's storage goes with its last tensor, and the mapping with it
    return moved


def collapse_model(model: torch.nn.Module) -> tuple[int, str]:
    tensors = [*model.parameters(), *model.buffers()]
    gather(tensors)
    return collapse(tensors)


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s storage that sit on huge pages now (from /proc/self/smaps), for tests and logs."""
    start = t.untyped_storage().data_ptr()
    return _huge_bytes_in([(start, start + t.untyped_storage().nbytes())])[0]


def _huge_bytes_in(ranges: list[tuple[int, int]]) -> list[int]:
    """For each [start, end): bytes on huge pages in the mappings that overlap it, at most end - start (smaps
    counts per mapping, not per range: a mapping reaching past the range may count pages outside it). One read
    of smaps for all of them."""
    totals = [0] * len(ranges)
    if not ranges:
        return totals
    inside: list[int] = []
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = [i for i, (start, end) in enumerate(ranges) if lo < end and hi > start]
                elif inside and head == "AnonHugePages:":
                    for i in inside:
                        totals[i] += int(line.split()[1]) * 1024
    except OSError:  # no /proc: nothing we can count
        return [0] * len(ranges)
    return [min(total, end - start) for total, (start, end) in zip(totals, ranges, strict=True)]


def give_back_freed_memory() -> None:
    # glibc keeps freed heap pages in its arenas: without a trim, RSS keeps replaced weights too
    # (prepack_linears on SmolLM2: 1.42 GB instead of 1.00 GB).
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
