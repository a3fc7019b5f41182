"""Back a model's weights with 2 MB pages (MADV_COLLAPSE), so a decode step streams them with few TLB misses.

Why: decoding reads every weight once per token. On 4 kB pages that is a page-table walk every 4 kB;
on this machine the bf16 kernel read a 7B-shaped weight at 18.9 GB/s on 4 kB pages and 20.9 GB/s
once collapsed to 2 MB pages (and the bench's bandwidth probe 17.3 vs 19.7 GB/s, which is why the
probe collapses its array too: the roofline compares like with like). Transparent huge pages are
"madvise" here, so nothing gets them unless asked. MADV_COLLAPSE (Linux 6.1+) rebuilds the pages of
a range synchronously, in place: no copy in Python, no second set of weights; ~2 s per GB.

Best effort: an older kernel, THP "never" or no free 2 MB blocks leaves the pages as they are
and the reason is reported; nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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
    seen, done, why = set(), 0, ""
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
    return done, why


def collapse_model(model: torch.nn.Module) -> tuple[int, str]:
    return collapse([*model.parameters(), *model.buffers()])


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s storage that sit on huge pages now (from /proc/self/smaps), for tests and logs."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and hi > start
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total
