"""Model loading off the main thread leaves no OpenMP thread pool behind (engine/thread.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from engine.thread import off_main_thread

# A fresh interpreter: libgomp's pools of this pytest process are whatever earlier tests left.
_PROBE = textwrap.dedent("""
    import os, sys, time, torch
    from engine.thread import off_main_thread
    torch.set_num_threads(2)

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def work():
        a = torch.randn(512, 512)
        for _ in range(3):
            a = torch.tanh(a @ a)  # parallel regions: this thread gets a pool of OpenMP threads
        return float(a.sum())

    before = tasks()
    off_main_thread(work) if sys.argv[1] == "off" else work()
    time.sleep(1)  # a finished thread's pool threads exit on their own, shortly after it
    print(tasks() - before)
""")


def _threads_left(where: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, where], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_loading_off_the_main_thread_leaves_no_openmp_threads_behind():
    if _threads_left("main") == 0:  # the control: on the main thread the pool stays
        pytest.skip("this torch build keeps no OpenMP pool threads (not libgomp?)")
    assert _threads_left("off") == 0


def test_off_main_thread_returns_the_result_and_keeps_the_thread_count():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert off_main_thread(torch.get_num_threads) == 1
        assert off_main_thread(lambda: 41 + 1) == 42
    finally:
        torch.set_num_threads(old)


def test_off_main_thread_raises_what_the_function_raised():
    def bad():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        off_main_thread(bad)
