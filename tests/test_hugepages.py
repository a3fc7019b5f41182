"""Weights on 2 MB pages (launch/batching/hugepages.py): collapsed in place, contents kept, best effort."""

from __future__ import annotations

import pytest
import torch

from launch.batching.hugepages import HUGE, collapse, collapse_model, huge_bytes


def test_collapse_puts_a_tensor_on_huge_pages_in_place():
    t = torch.arange(16 << 20, dtype=torch.float32)  # 64 MB
    ptr, want = t.data_ptr(), t.clone()
    done, why = collapse([t])
    if done == 0:
        pytest.skip(f"this kernel does not collapse pages: {why}")
    assert done >= t.numel() * 4 - 2 * HUGE  # all but the unaligned ends
    assert huge_bytes(t) >= done
    assert t.data_ptr() == ptr and torch.equal(t, want)


def test_each_storage_once_and_views_and_opaque_tensors_are_fine():
    t = torch.zeros(8 << 20)
    done, _ = collapse([t, t[100:], t.view(2, -1)])
    assert done <= t.numel() * 4  # counted once
    lin = torch.nn.Linear(64, 64)
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach())
        assert collapse([packed]) == (0, "")  # opaque oneDNN tensor: skipped, not an error
    assert collapse([torch.zeros(10)]) == (0, "")  # smaller than one aligned 2 MB page


def test_collapse_model_covers_parameters_and_buffers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048))
    tensors = []
    monkeypatch.setattr("launch.batching.hugepages.collapse", lambda ts: tensors.extend(ts) or (0, ""))
    collapse_model(model)
    assert len(tensors) == len(list(model.parameters())) + len(list(model.buffers()))


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CPU_ARENA_NO_HUGEPAGES", "1")
    t = torch.zeros(8 << 20)
    assert collapse([t]) == (0, "CPU_ARENA_NO_HUGEPAGES is set")
