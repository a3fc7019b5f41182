"""oneDNN prepacked linears compute what nn.Linear computes, for one row, several rows and a prompt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launch.batching.kernels import PackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(can_prepack(torch.float32) is not None, reason="no oneDNN in this torch")


@pytest.mark.parametrize("shape", [(1, 1, 96), (4, 1, 96), (2, 17, 96), (5, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = lin(x)
        got = PackedLinear(lin)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, like SmolLM2's and Qwen2.5's output projection

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def test_prepack_replaces_every_linear_and_keeps_the_output():
    torch.manual_seed(0)
    model = _Tiny().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.inference_mode():
        want = model(ids)
        assert prepack_linears(model) == 3
        got = model(ids)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.emb.weight.shape == (50, 32)  # the tied embedding keeps its plain weight


def test_bf16_is_packed_only_where_onednn_has_kernels():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    n = prepack_linears(model)
    assert n == (1 if can_prepack(torch.bfloat16) is None else 0)


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_prepacking_does_not_keep_both_copies():
    """The plain weights are freed and handed back to the OS: RSS grows by far less than the weights."""
    torch.manual_seed(0)
    # Freeing one big block raises glibc's mmap threshold, so the weights below land on the heap,
    # as a checkpoint's do while transformers loads it; freed heap pages stay in RSS until trimmed.
    block = torch.ones(8 << 20, dtype=torch.uint8)
    del block
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(24)]).eval()  # 100 MB
    weights_kb = sum(p.numel() * p.element_size() for p in model.parameters()) // 1024
    before = _rss_kb()
    prepack_linears(model)
    assert _rss_kb() - before < weights_kb // 4
