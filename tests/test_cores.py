"""The core lease: busy workers split the cores between them, idle or dead ones give theirs back."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.host import cores
from engine.host.cores import CoreLease


def test_busy_workers_split_the_cores(tmp_path):
    path = tmp_path / "cores.lease"
    a, b, c = (CoreLease(path, slot, cores=4) for slot in (0, 1, 2))
    assert a.acquire() == 4  # alone: every core
    assert b.acquire() == 2  # two busy: half each
    assert a.acquire() == 2
    assert c.acquire() == 1  # 4 // 3
    c.release()
    b.release()
    assert a.acquire() == 4  # the others went idle: every core again


def test_never_less_than_one_thread(tmp_path):
    path = tmp_path / "cores.lease"
    leases = [CoreLease(path, slot, cores=2) for slot in range(5)]
    assert [lease.acquire() for lease in leases] == [2, 1, 1, 1, 1]


def test_a_lapsed_claim_is_not_counted(tmp_path, monkeypatch):
    path = tmp_path / "cores.lease"
    a, b = CoreLease(path, 0, cores=2), CoreLease(path, 1, cores=2)
    now = [1000.0]
    monkeypatch.setattr(cores.time, "monotonic", lambda: now[0])
    b.acquire()  # b "crashes" while busy: it never releases
    assert a.acquire() == 1
    now[0] += cores.BUSY_FOR_S + 1
    assert a.acquire() == 2


def test_a_restarted_worker_clears_its_old_claim(tmp_path):
    path = tmp_path / "cores.lease"
    a, b = CoreLease(path, 0, cores=2), CoreLease(path, 1, cores=2)
    b.acquire()
    assert a.acquire() == 1
    CoreLease(path, 1, cores=2)  # the same slot, reopened by the restarted worker
    assert a.acquire() == 2


def test_another_process_sees_the_claim(tmp_path):
    """The workers are separate processes: the claim travels through the shared file."""
    path = tmp_path / "cores.lease"
    a = CoreLease(path, 0, cores=2)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from engine.host.cores import CoreLease
        print(CoreLease(Path({str(path)!r}), 1, cores=2).acquire())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"  # a is idle
    assert a.acquire() == 1  # the other process is still marked busy


def test_claim_sets_torch_threads(tmp_path):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        a = CoreLease(tmp_path / "cores.lease", 0, cores=2)
        b = CoreLease(tmp_path / "cores.lease", 1, cores=2)
        assert a.claim() == 2 and torch.get_num_threads() == 2
        b.acquire()
        assert a.claim() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_slot_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="slot"):
        CoreLease(tmp_path / "cores.lease", cores.SLOTS, cores=2)
