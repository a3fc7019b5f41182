"""Linears on either backend (oneDNN packed weights, the AVX2 kernel) compute what nn.Linear computes,
for one row, several rows and a prompt; projections of one input share a matmul; memory is not doubled."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from engine.kernels import linear as kernels
from engine.kernels import native
from engine.kernels.linear import ONEDNN, KernelLinear, can_prepack, choose_backend, prepack_linears
from engine.kernels.native import native_kernel

KERNEL, WHY = native_kernel()
BACKENDS = [
    pytest.param(ONEDNN, id="onednn",
                 marks=pytest.mark.skipif(can_prepack(torch.float32) is not None, reason="no oneDNN in this torch")),
    pytest.param(kernels._kernel_backend(KERNEL, torch.float32) if KERNEL else None, id="avx2",
                 marks=pytest.mark.skipif(KERNEL is None, reason=f"no AVX2 kernel: {WHY}")),
]


@pytest.fixture
def runs() -> list[int]:
    """The rows of every matmul the `backend` below computed: a test comparing with nn.Linear sees that the
    backend it is about computed the result."""
    return []


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, runs):
    """Each test below runs on both backends: prepack_linears is made to choose this one for fp32."""
    def run(x, operand, bias, _run=request.param.run):
        runs.append(math.prod(x.shape[:-1]))
        return _run(x, operand, bias)

    chosen = dataclasses.replace(request.param, run=run)
    monkeypatch.setattr(kernels, "choose_backend",
                        lambda dtype, decode="kernel": (chosen, "") if dtype == torch.float32
                        else choose_backend(dtype, decode))
    return chosen


@pytest.mark.parametrize("shape", [(1, 1, 96), (4, 1, 96), (2, 17, 96), (5, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_linear_matches_linear(backend, runs, shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = lin(x)
        got = KernelLinear(lin, backend)(x)
    assert runs == [math.prod(shape[:-1])]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp32_goes_to_the_avx2_kernel_where_there_is_one():
    backend, why = choose_backend(torch.float32)
    if KERNEL is not None:
        assert backend is not None and not backend.copies and "AVX2" in backend.name
    elif can_prepack(torch.float32) is None:
        assert backend is ONEDNN
    else:
        assert backend is None and why


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, like SmolLM2's and Qwen2.5's output projection

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def test_prepack_replaces_every_linear_and_keeps_the_output(backend, runs):
    torch.manual_seed(0)
    model = _Tiny().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.inference_mode():
        want = model(ids)
        assert prepack_linears(model) == 3
        got = model(ids)
    assert runs == [2 * 3] * 3  # each linear on the backend
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.emb.weight.shape == (50, 32)  # the tied embedding keeps its plain weight
    if not backend.copies:
        assert model.head.weight is model.emb.weight  # and stays tied: nothing copied


def test_bf16_goes_to_the_projects_kernel_on_its_bf16_units_where_there_are_some():
    """Never to oneDNN while the kernel is there: oneDNN's bf16 rows depend on the rows beside them."""
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    n = prepack_linears(model)
    if KERNEL is not None:
        assert n == 1 and type(model[0]) is KernelLinear
        units = native.has_bf16_units()
        assert ("AVX512_BF16" if units else "AVX2") in model[0].backend.name
        assert model[0].backend.copies == units  # AVX512_BF16: weights packed (native.pack_avx512bf16)
    elif can_prepack(torch.bfloat16) is None:
        assert n == 1 and model[0].backend is ONEDNN
    else:
        assert n == 0


def test_bf16_without_the_kernel_goes_to_onednn_one_row_at_a_time(monkeypatch):
    if can_prepack(torch.bfloat16) is not None:
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    monkeypatch.setattr(kernels, "native_kernel", lambda: (None, "no compiler"))
    assert choose_backend(torch.bfloat16) == (ONEDNN, "")
    limit, why = kernels.batch_rows_limit(torch.bfloat16)
    assert limit == 1 and "bf16" in why


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_prepacking_does_not_keep_both_copies(backend):
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


def test_prepacking_frees_each_replaced_weight_as_it_goes(backend, monkeypatch):
    """The fused q/k/v and gate/up weights are new tensors: the plain ones must go as each group is fused, not
    when prepacking ends (a 7B-shaped bf16 model gained ~0.28 GB per layer until then, and was killed at
    24 GB). Checked with weak references when each group is built."""
    import weakref

    model = _tiny_qwen2(layers=4)
    old = {id(m): weakref.ref(m.weight) for name, m in model.named_modules() if name.endswith(("q_proj", "up_proj"))}
    assert len(old) == 8
    alive_at_each_group = []
    build = kernels._SharedInput.__init__

    def watched(self, linears, backend):
        alive_at_each_group.append(sum(ref() is not None for ref in old.values()))
        build(self, linears, backend)

    monkeypatch.setattr(kernels._SharedInput, "__init__", watched)
    prepack_linears(model)
    # 8 groups (2 per layer); when group i is built, the i groups before it have let their old weights go.
    assert alive_at_each_group == [8 - i for i in range(8)]


def _tiny_qwen2(layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()  # q/k/v with biases, grouped k/v heads, a tied output


def test_projections_of_one_input_share_one_matmul_and_compute_the_same(backend, runs):
    from engine.kernels.linear import SharedInputLinear

    model = _tiny_qwen2()
    ids = torch.tensor([[5, 17, 42, 7, 99], [3, 3, 250, 8, 1]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        want_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert prepack_linears(model) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + the head
        got = model(input_ids=ids).logits
        assert runs == [2 * 5] * (2 * 4 + 1)  # per layer q/k/v, o, gate/up, down; the head: all on the backend
        got_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, SharedInputLinear)
    assert layer.self_attn.q_proj.group is layer.self_attn.v_proj.group
    assert layer.mlp.gate_proj.group is layer.mlp.up_proj.group
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_gen, want_gen)
    assert layer.self_attn.q_proj.group._outputs == ()  # nothing held between forward passes


def test_a_shared_projection_called_on_its_own_input_still_computes_its_own_output(backend, runs):
    lins = [nn.Linear(16, n) for n in (8, 4)]
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = lins
    torch.manual_seed(1)
    xs = (torch.randn(3, 16), torch.randn(3, 16))
    with torch.inference_mode():
        want = [lin(x) for lin, x in zip(lins, xs, strict=True)]
        prepack_linears(parent)
        got = [parent.gate_proj(xs[0]), parent.up_proj(xs[1])]  # different inputs: no shortcut taken
    assert runs == [3, 3]  # the pair's matmul once per input
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_after_prepacking_the_model_still_lists_every_weight_it_reads(backend, monkeypatch):
    """hugepages.collapse_model walks parameters and buffers: the fused q/k/v and gate/up weights must be
    among them, or most of a served model's weights stay on 4 kB pages."""
    from engine.host import hugepages

    model = _tiny_qwen2()
    prepack_linears(model)
    group = model.model.layers[0].mlp.gate_proj.group
    seen = []
    monkeypatch.setattr(hugepages, "collapse", lambda ts: seen.extend(ts) or (0, ""))
    hugepages.collapse_model(model)
    walked = {t.data_ptr() for t in seen if t.layout == torch.strided and not t.is_mkldnn}
    if not backend.copies:  # oneDNN's packed weights are opaque: nothing to collapse there
        assert group.weight.data_ptr() in walked
        assert model.model.layers[1].self_attn.q_proj.group.weight.data_ptr() in walked
    assert not any("fused" in key for key in model.state_dict())  # kernel layouts are not saved
