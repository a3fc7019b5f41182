"""Share the machine's cores between the batching workers of one stack, step by step.

Why: a static split (cores / workers) leaves a worker with one thread even while the other
workers sit idle, and on this CPU a 4-row decode step needs two threads to cost about one
row (engine/kernels/linear.py). Giving every worker all cores instead oversubscribes them
the moment two decode at once, and OpenMP's busy-wait then makes a worker ~28x slower
(a 2-thread decode fell from 27 to 0.96 tok/s while another process kept one core busy). So the workers of a stack share a small file (`run/cores.lease`): one slot per
worker holding "busy until" on the system-wide monotonic clock. Before each step (and each
prefill) a worker marks itself busy and takes cores // (busy workers) threads; when it runs out
of work it clears its slot. A worker that crashes mid-step clears its slot when it restarts (the
supervisor restarts it within seconds), and its claim lapses by itself after BUSY_FOR_S.

Only workers started by one stack on one host share a file; a worker on another host has its own
machine. Workers with a fixed `threads` in the config, and FastChat's stock worker, do not lease.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

SLOTS = 64
_SLOT = struct.Struct("d")
# Longer than any single step or prefill (a long prompt on a 7B model takes tens of seconds).
BUSY_FOR_S = 120.0


class CoreLease:
    def __init__(self, path: Path, slot: int, cores: int):
        if not 0 <= slot < SLOTS:
            raise ValueError(f"core lease slot {slot} out of range 0..{SLOTS - 1}")
        self.slot, self.cores = slot, max(1, cores)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < SLOTS * _SLOT.size:
                os.ftruncate(fd, SLOTS * _SLOT.size)  # zero-filled: every slot idle
            self._map = mmap.mmap(fd, SLOTS * _SLOT.size)
        finally:
            os.close(fd)
        self.threads = 0  # what this thread last set
        self.release()

    def claim(self) -> int:
        """Before a step, on the engine thread: mark busy and set torch's thread count to our share."""
        n = self.acquire()
        if n != self.threads:
            import torch

            torch.set_num_threads(n)
            self.threads = n
        return n

    def acquire(self) -> int:
        """Mark this worker busy; returns how many threads its next step may use."""
        now = time.monotonic()
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, now + BUSY_FOR_S)
        busy = sum(1 for (until,) in _SLOT.iter_unpack(self._map) if until > now)
        return max(1, self.cores // max(1, busy))

    def release(self) -> None:
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0.0)

