"""The thread that owns a model: what the batching and the serial engine share.

Model compute must not run on any other long-lived thread (the worker's main thread serves HTTP).
libgomp keeps an OpenMP thread pool for every thread that ran a parallel region, for as long as that
thread lives, and counts the pool's threads. Once it counts more threads than CPUs it stops spinning
between regions ("throttled" spin): every parallel region then wakes its threads with a futex. A
model loaded on the main thread left a pool there, and the engine thread's own pool tipped the count
over the 2 CPUs: SmolLM2 decode steps took 83-95 ms on the engine thread against 68-72 ms on the
main thread, torch's SDPA 50 us per call against 33. `off_main_thread` runs the loading on a
short-lived thread, whose pool goes away with it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread of its own, with this thread's torch thread count; returns or raises what fn does."""
    threads = torch.get_num_threads()
    result: list = []

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            result.append((True, fn()))
        except BaseException as e:  # handed back to the caller
            result.append((False, e))

    t = threading.Thread(target=run, name="model-load")
    t.start()
    t.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


class EngineThread:
    """Requests arrive on `incoming`; one thread runs `_loop` until shutdown puts None there."""

    thread_name = "engine"

    def __init__(self) -> None:
        self.incoming: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # OpenMP's thread count is per calling thread: carry the launcher's setting into the loop thread.
        self._threads = torch.get_num_threads()

    def start(self):
        self._thread = threading.Thread(target=self._thread_main, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self.incoming.put(None)  # wakes a loop blocked on an empty queue
        if self._thread:
            self._thread.join(timeout=10)

    def _thread_main(self) -> None:
        torch.set_num_threads(self._threads)
        self._loop()

    def _loop(self) -> None:
        raise NotImplementedError
