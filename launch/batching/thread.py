"""The thread that owns a model: what the batching and the serial engine share."""

from __future__ import annotations

import queue
import threading

import torch


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
