"""Progress reporting shared by every step: the log callback type and a timed step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Log = Callable[[str], None]


@contextlib.contextmanager
def step(log: Log, name: str, what: str) -> Iterator[None]:
    log(f"[{name}] {what} ...")
    t0 = time.monotonic()
    yield
    log(f"[{name}] {what}: done in {time.monotonic() - t0:.1f} s")
