"""The AVX2 linear kernel (launch/batching/linear.c, bf16 and fp32 weights): same results as PyTorch's
linear, rows independent of each other, built once, and a clear reason where it cannot be used."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from launch.batching import kernels, native

KERNEL, WHY = native.native_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"the C kernels are unavailable here: {WHY}")
XTILE = KERNEL.xtile if KERNEL else 1  # input rows per pass over the weight


# dtype -> (rtol, atol against torch's linear; how much further than torch's from the exact result).
# bf16: both accumulate in fp32 and round once to bf16, so the kernel is no further from the exact result.
# fp32: accumulated in another order than MKL's, so as close within rounding.
TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-3, 1.01), torch.float32: (1e-5, 1e-5, 4.0)}


@needs_kernel
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("n_out,n_in", [(1, 8), (3, 7), (4, 9), (13, 96), (64, 1003), (130, 256), (10, 2100)])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 2 * XTILE + 3])  # the last spans three passes over the weight
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_torch_linear(dtype, n_out, n_in, rows, bias):
    torch.manual_seed(n_out * 1000 + n_in + rows)
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    x = torch.randn(rows, n_in).to(dtype)
    with torch.inference_mode():
        want = lin(x)
        got = KERNEL(x, lin.weight, lin.bias)
        exact = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    rtol, atol, further = TOLERANCES[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * further + 1e-6


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_in", [200, 1003, 2100])  # 1003: several column chunks of block8xn and a tail;
# 2100: three column chunks of a prompt pass (KCHUNK 1024) and a tail
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, n_in):
    """The batching worker's batched == single rests on this: bitwise, for every batch size."""
    torch.manual_seed(0)
    w = torch.randn(37, n_in).to(dtype)
    x = torch.randn(2 * XTILE + 3, n_in).to(dtype)
    alone = torch.cat([KERNEL(x[i:i + 1], w, None) for i in range(len(x))])
    for rows in (2, 3, 4, 8, 9, 16, 17, XTILE, XTILE + 1, 2 * XTILE + 3):
        assert torch.equal(KERNEL(x[:rows], w, None), alone[:rows])


@needs_kernel
def test_kernel_runs_on_the_calling_threads_count_in_torchs_openmp_runtime():
    # The kernel's libgomp.so.1 is torch's (one runtime, one thread pool), not a second copy from the system.
    # (Wheels may carry private, renamed copies, e.g. sentencepiece's libgomp-<hash>.so: those are theirs.)
    libs = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith("libgomp.so.1")}
    assert libs == {str(Path(torch.__file__).parent / "lib" / "libgomp.so.1")}, libs
    w, x = torch.randn(64, 64).to(torch.bfloat16), torch.randn(2, 64).to(torch.bfloat16)
    results = []

    def run():
        torch.set_num_threads(1)  # what the core lease does on the engine thread
        results.append(KERNEL(x, w, None))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert torch.equal(results[0], KERNEL(x, w, None))


def test_a_wrong_weight_is_refused_with_its_dtype_and_shape():
    if KERNEL is None:
        pytest.skip(WHY)
    with pytest.raises(ValueError, match="float16"):
        KERNEL(torch.randn(1, 8), torch.randn(4, 8).to(torch.float16), None)
    with pytest.raises(ValueError, match=r"\(4, 9\)"):
        KERNEL(torch.randn(1, 8), torch.randn(4, 9), None)


def test_build_compiles_once_then_reuses_the_library(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    lib = native.build(tmp_path)
    assert lib.exists() and not list(tmp_path.glob("*.tmp"))

    def no_compile(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compile)
    assert native.build(tmp_path) == lib


def test_a_changed_header_builds_a_new_library(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    first = native.build(tmp_path)
    header = tmp_path / "bf16_simd.h"
    header.write_text(native.HEADERS[0].read_text() + "/* changed */\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 1, "stderr": "x"}))
    with pytest.raises(RuntimeError):  # not served from the cache: it tried to compile again
        native.build(tmp_path)
    assert first.exists()


def test_build_without_a_compiler_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native.build(tmp_path)


def test_a_failing_compile_reports_the_compilers_message_and_leaves_nothing(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", (bad,))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="bad.c"):
        native.build(out)
    assert list(out.iterdir()) == []


def _tiny_bf16_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


@needs_kernel
def test_bf16_model_without_bf16_units_runs_its_linears_on_the_kernel(monkeypatch):
    from launch.batching import attention

    monkeypatch.setattr(kernels, "can_prepack", lambda dtype: "oneDNN has no bf16 kernels for this CPU")
    monkeypatch.setattr(attention, "install", lambda kernel: None)  # its own tests below
    model = _tiny_bf16_qwen2()
    ids = torch.tensor([[5, 17, 42, 7, 99], [3, 3, 250, 8, 1]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        assert kernels.prepack_linears(model) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + the head
        got = model(input_ids=ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: nothing copied
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
    assert kernels.linear_backend(torch.bfloat16) == "the AVX2 kernel (linear.c)"
    assert kernels.batch_rows_limit(torch.bfloat16) == (None, "")  # rows are cheap again


def test_without_the_kernel_bf16_stays_on_torch_one_row_at_a_time(monkeypatch):
    monkeypatch.setattr(kernels, "can_prepack", lambda dtype: None if dtype == torch.float32 else "no bf16 oneDNN")
    monkeypatch.setattr(kernels, "native_kernel", lambda: (None, "the CPU lacks avx2"))
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert kernels.prepack_linears(model) == 0
    assert type(model[0]) is nn.Linear
    assert "the CPU lacks avx2" in kernels.linear_backend(torch.bfloat16)
    limit, why = kernels.batch_rows_limit(torch.bfloat16)
    assert limit == 1 and "bf16" in why
    assert kernels.batch_rows_limit(torch.float32) == (None, "")


def test_a_cpu_without_avx2_gets_no_kernel_and_a_reason(monkeypatch):
    native.native_kernel.cache_clear()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2"}))
    try:
        kernel, why = native.native_kernel()
        assert kernel is None and "avx2" in why and "fma" in why
    finally:
        native.native_kernel.cache_clear()


# ---- one decode token's attention (bf16_attention.c behind torch's SDPA) ----

@pytest.fixture
def patched_sdpa():
    from launch.batching import attention

    attention.install(KERNEL)
    yield attention._original
    attention.uninstall()


def _qkv(B, H, Hkv, T, D, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(B, H, 1, D).to(torch.bfloat16), torch.randn(B, Hkv, T, D).to(torch.bfloat16),
            torch.randn(B, Hkv, T, D).to(torch.bfloat16))


def _masks(B, H, T):
    keep = torch.rand(B, 1, 1, T) > 0.3
    keep[..., -1] = True  # every row attends to something, as in decoding
    per_head = torch.rand(B, H, 1, T) > 0.5
    per_head[..., 0] = True
    return [None, keep, keep[:1], per_head, torch.zeros(B, 1, 1, T).masked_fill(~keep, float("-inf")),
            torch.zeros(B, 1, 1, T, dtype=torch.bfloat16).masked_fill(~keep, torch.finfo(torch.bfloat16).min)]


@needs_kernel
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 32, 32, 80, 128), (3, 8, 2, 50, 64), (2, 4, 4, 7, 72), (1, 2, 1, 1, 8)])
def test_decode_attention_matches_sdpa(patched_sdpa, B, H, Hkv, T, D):
    original = patched_sdpa
    q, k, v = _qkv(B, H, Hkv, T, D)
    gqa = Hkv != H
    for i, mask in enumerate(_masks(B, H, T)):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        want = original(q, k, v, attn_mask=mask, enable_gqa=gqa)
        exact = original(q.double(), k.double(), v.double(), enable_gqa=gqa,
                         attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double())
        assert got.shape == want.shape and got.dtype == torch.bfloat16, i
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2, msg=f"mask {i}")
        assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() + 4e-3, i


@needs_kernel
def test_decode_attention_takes_strided_queries_and_a_scale(patched_sdpa):
    original = patched_sdpa
    q, k, v = _qkv(2, 4, 4, 9, 16)
    q = torch.cat([q, q, q], dim=-1)[..., 16:32]  # a slice of a fused q/k/v projection, as remote code has
    assert not q.is_contiguous()
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(got, original(q, k, v, scale=0.3), rtol=1.6e-2, atol=1e-2)


@needs_kernel
def test_a_left_padded_row_attends_exactly_like_the_unpadded_one(patched_sdpa):
    """Batched decode == single: the padding columns a batch adds change nothing, bitwise."""
    q, k, v = _qkv(1, 4, 4, 6, 32)
    alone = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    pad = torch.zeros(1, 4, 3, 32, dtype=torch.bfloat16)
    mask = torch.tensor([[[[False] * 3 + [True] * 6]]])
    padded = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([pad, k], 2), torch.cat([pad, v], 2),
                                                              attn_mask=mask)
    assert torch.equal(padded, alone)


@needs_kernel
@pytest.mark.parametrize("case", ["prompt", "causal", "fp32", "dropout", "no-gqa-flag"])
def test_everything_else_goes_to_torchs_sdpa_unchanged(patched_sdpa, case, monkeypatch):
    from launch.batching import attention

    q, k, v = _qkv(1, 4, 2 if case == "no-gqa-flag" else 4, 5, 16)
    kw = {}
    if case == "prompt":
        q = torch.randn(1, 4, 5, 16).to(torch.bfloat16)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "dropout":
        kw["dropout_p"] = 0.5
    calls = []
    monkeypatch.setattr(attention, "_decode", lambda *a: calls.append(a))
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    except RuntimeError:
        assert case == "no-gqa-flag"  # SDPA's own error for mismatched heads without enable_gqa
    assert calls == []


@needs_kernel
def test_installing_twice_wraps_once():
    from launch.batching import attention

    attention.install(KERNEL)
    first = torch.nn.functional.scaled_dot_product_attention
    attention.install(KERNEL)
    try:
        assert torch.nn.functional.scaled_dot_product_attention is first
    finally:
        attention.uninstall()
    assert torch.nn.functional.scaled_dot_product_attention is attention._original


@needs_kernel
@pytest.mark.parametrize("n", [0, 5, (1 << 18) + 3, 3 << 20])  # below one block, a block plus a tail, many
def test_read_probe_reads_every_element(n):
    x = torch.arange(n, dtype=torch.float32) % 7  # small integers: the sum is exact in fp32 per lane
    assert KERNEL.read_probe(x) == pytest.approx(float(x.double().sum()), rel=1e-6)
    with pytest.raises(ValueError):
        KERNEL.read_probe(x.double())
