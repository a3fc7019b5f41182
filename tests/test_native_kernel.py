"""The linear kernels (engine/kernels/csrc/linear.c on AVX2, bf16 and fp32 weights; linear_avx512bf16.c, bf16 on
AVX512_BF16 where the CPU has it): same results as PyTorch's linear, rows independent of each other, built
once, and a clear reason where they cannot be used. Then the bf16 attention kernel behind torch's SDPA."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from engine.kernels import linear as kernels
from engine.kernels import native

KERNEL, WHY = native.native_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"the C kernels are unavailable here: {WHY}")
XTILE = KERNEL.xtile if KERNEL else 1  # input rows per pass over the weight
# Each linear path: (weight dtype, whether bf16 runs on the AVX512_BF16 kernel). The AVX512_BF16 one only
# where the CPU has those units (the reference machine for this project has had either kind of CPU).
PATHS = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, False, id="bf16-avx2"),
    pytest.param(torch.bfloat16, True, id="bf16-avx512bf16",
                 marks=pytest.mark.skipif(not native.has_bf16_units(), reason="the CPU has no AVX512_BF16")),
]


def kernel_for(units: bool) -> native.NativeKernel:
    return native.NativeKernel(KERNEL.path, bf16_units=units)


def counted_linears(kernel: native.NativeKernel) -> list[tuple[str, int]]:
    """Every call `kernel` makes into its C linear functions from now on, as (its C file, input rows): a test that
    compares with torch's linear thus sees that the C code it is about computed the result."""
    calls = []

    def counting(fn, source: str, rows_at: int):
        def call(*args):
            calls.append((source, args[rows_at]))
            return fn(*args)
        return call

    kernel._linear = {dtype: counting(fn, "linear.c", 5) for dtype, fn in kernel._linear.items()}
    kernel._linear_dp = counting(kernel._linear_dp, "linear_avx512bf16.c", 4)
    return calls


def c_file(dtype: torch.dtype, units: bool) -> str:
    return "linear_avx512bf16.c" if dtype == torch.bfloat16 and units else "linear.c"


# dtype -> (rtol, atol against torch's linear; how much further than torch's from the exact result).
# bf16: both accumulate in fp32 and round once to bf16, so the kernel is no further from the exact result.
# fp32: accumulated in another order than MKL's, so as close within rounding.
TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-3, 1.01), torch.float32: (1e-5, 1e-5, 4.0)}


@needs_kernel
@pytest.mark.parametrize("dtype,units", PATHS)
@pytest.mark.parametrize("n_out,n_in", [(1, 8), (3, 7), (4, 9), (13, 96), (64, 1003), (130, 256), (10, 2100)])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 2 * XTILE + 3])  # the last spans three passes over the weight
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_torch_linear(dtype, units, n_out, n_in, rows, bias):
    torch.manual_seed(n_out * 1000 + n_in + rows)
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    x = torch.randn(rows, n_in).to(dtype)
    kernel = kernel_for(units)
    calls = counted_linears(kernel)
    with torch.inference_mode():
        want = lin(x)
        got = kernel(x, lin.weight, lin.bias)
        exact = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    assert calls == [(c_file(dtype, units), rows)]
    rtol, atol, further = TOLERANCES[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * further + 1e-6


@needs_kernel
@pytest.mark.parametrize("dtype,units", PATHS)
@pytest.mark.parametrize("n_in", [200, 1003, 2100])  # odd widths: a zero-paired last column (AVX512_BF16) or
# a tail; 2100: chunks of a prompt pass (linear_avx512bf16.c's KCHUNK, 256 column pairs)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, units, n_in):
    """The batching worker's batched == single rests on this: bitwise, for every batch size."""
    torch.manual_seed(0)
    kernel = kernel_for(units)
    w = torch.randn(37, n_in).to(dtype)
    x = torch.randn(2 * XTILE + 3, n_in).to(dtype)
    alone = torch.cat([kernel(x[i:i + 1], w, None) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 8, 9, 16, 17, XTILE, XTILE + 1, 2 * XTILE + 3):
        assert torch.equal(kernel(x[:rows], w, None), alone[:rows])


@needs_kernel
@pytest.mark.skipif(not native.has_bf16_units(), reason="the CPU has no AVX512_BF16")
@pytest.mark.parametrize("rows", [1, 4, 8, 70])  # one group of rows, two groups, a prompt pass in chunks
def test_every_output_sums_its_column_pairs_left_to_right(rows):
    """linear_avx512bf16.c's one order for every output, whatever the rows beside it: an fp32 sum from 0 that
    takes the column pairs left to right, then one rounding. Only one column of each pair is non-zero here, so
    each step adds one exact product; weights of +-2^24 at random pairs absorb the small products before them
    and cancel, so another order (a tree, lanes summed apart, chunks summed apart) gives other bits (checked:
    the previous kernel's 16-lane tree fails this). 600 pairs: more than a prompt pass's chunk of 256."""
    gen = torch.Generator().manual_seed(rows)
    n_out, n_in = 70, 1200
    w = torch.randint(1, 8, (n_out, n_in), generator=gen).to(torch.bfloat16)
    w[:, 1::2] = 0
    for r in range(n_out):
        big = torch.randperm(n_in // 2, generator=gen)[:6] * 2
        w[r, big[:3]], w[r, big[3:]] = 2.0 ** 24, -(2.0 ** 24)
    x = torch.randint(0, 2, (rows, n_in), generator=gen).to(torch.bfloat16) * 2 - 1
    products = (x[:, None, 0::2].float() * w[None, :, 0::2].float()).numpy()  # [rows, n_out, pairs], exact
    acc = np.zeros(products.shape[:2], dtype=np.float32)
    for p in range(products.shape[2]):
        acc = acc + products[:, :, p]  # float32: rounded at every step, as VDPBF16PS's sum
    want = torch.from_numpy(acc).to(torch.bfloat16)
    assert torch.equal(kernel_for(True)(x, w, None), want)


@needs_kernel
@pytest.mark.parametrize("dtype,units", PATHS)
@pytest.mark.parametrize("n_in", [32, 200, 1003])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_a_weight_row_gives_bitwise_the_same_in_a_block_or_alone(dtype, units, n_in, rows):
    """The kernels compute weight rows in blocks (linear.c: 8 at a time, the rows past the last block one by
    one; linear_avx512bf16.c: tiles of 64, the last tile partial, read with masks); a row must give the same
    bits wherever it sits. Row 69 here (in the partial tile) is a copy of row 3, bias too."""
    torch.manual_seed(n_in + rows)
    w, bias = torch.randn(70, n_in).to(dtype), torch.randn(70).to(dtype)
    w[69], bias[69] = w[3], bias[3]
    x = torch.randn(rows, n_in).to(dtype)
    y = kernel_for(units)(x, w, bias)
    assert torch.equal(y[:, 69], y[:, 3])


@needs_kernel
@pytest.mark.skipif(not native.has_bf16_units(), reason="the CPU has no AVX512_BF16")
@pytest.mark.parametrize("n_out,n_in", [(37, 201), (70, 1003), (130, 64)])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_a_partial_tile_and_an_odd_width_give_what_zero_padding_gives(n_out, n_in, rows):
    """pack_avx512bf16 pads nothing past n_out (the last tile is read with masks) and pairs an odd last column
    with a zero: bitwise what the same weight zero-padded to whole tiles and an even width gives."""
    torch.manual_seed(n_out + n_in + rows)
    kernel = kernel_for(True)
    w, x, bias = torch.randn(n_out, n_in).to(torch.bfloat16), torch.randn(rows, n_in).to(torch.bfloat16), \
        torch.randn(n_out).to(torch.bfloat16)
    packed = native.pack_avx512bf16(w)
    assert packed.shape == (n_out, n_in + n_in % 2)
    out_pad, in_pad = -n_out % native.PACK_ROWS, n_in % 2
    w_pad = torch.nn.functional.pad(w, (0, in_pad, 0, out_pad))
    x_pad, bias_pad = torch.nn.functional.pad(x, (0, in_pad)), torch.nn.functional.pad(bias, (0, out_pad))
    assert torch.equal(kernel(x, w, bias), kernel(x_pad, w_pad, bias_pad)[:, :n_out])


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
@pytest.mark.parametrize("units", [pytest.param(False, id="avx2"), pytest.param(
    True, id="avx512bf16", marks=pytest.mark.skipif(not native.has_bf16_units(), reason="no AVX512_BF16"))])
def test_bf16_model_runs_its_linears_on_the_kernel(monkeypatch, units):
    monkeypatch.setattr(native, "has_bf16_units", lambda: units)
    kernel = kernel_for(units)
    calls = counted_linears(kernel)
    monkeypatch.setattr(kernels, "native_kernel", lambda: (kernel, ""))
    model = _tiny_bf16_qwen2()
    ids = torch.tensor([[5, 17, 42, 7, 99], [3, 3, 250, 8, 1]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        assert kernels.prepack_linears(model) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + the head
        assert calls == []  # packing computes nothing
        got = model(input_ids=ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    # Per layer q/k/v in one call, o, gate/up in one call, down; then the head: every one in the C code.
    assert calls == [(c_file(torch.bfloat16, units), 2 * 5)] * (2 * 4 + 1)
    if units:  # a 64-wide head is packed into a copy of its own; the embedding keeps the plain weight
        assert model.lm_head.packed.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert model.lm_head.packed.shape == (300, 64)
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: nothing copied
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
    assert kernels.linear_backend(torch.bfloat16) == (
        "the AVX512_BF16 kernel (linear_avx512bf16.c)" if units else "the AVX2 kernel (linear.c)")
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
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2"}))
    # The uncached function: clearing the cache would give later tests a second kernel object beside the
    # KERNEL their modules hold (test_fused_ops counts calls on KERNEL).
    kernel, why = native.native_kernel.__wrapped__()
    assert kernel is None and "avx2" in why and "fma" in why


# ---- bf16 and fp32 attention (attention.c behind torch's SDPA): decode steps and prompts ----

@pytest.fixture
def patched_sdpa(monkeypatch):
    """attention.c installed behind torch's SDPA; `original` is torch's own, `calls` the query shape of every call
    the kernel computed. The wrapper hands a call it declines to torch's SDPA, which would then be compared with
    itself: a test of the kernel asserts that the kernel took its calls."""
    from engine.kernels import attention

    calls = []
    real = KERNEL.attention

    def counting(q, k, v, mask, scale, causal=False):
        calls.append(tuple(q.shape))
        return real(q, k, v, mask, scale, causal=causal)

    monkeypatch.setattr(KERNEL, "attention", counting)
    attention.install(KERNEL)
    yield SimpleNamespace(original=attention._original, calls=calls)
    attention.uninstall()


def _qkv(B, H, Hkv, T, D, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return (torch.randn(B, H, 1, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype),
            torch.randn(B, Hkv, T, D).to(dtype))


# dtype -> (rtol, atol) of the kernel against torch's SDPA; and how much further than torch's from the exact
# result the kernel may be (fp32: both within rounding of it).
ATTENTION_DTYPES = {torch.bfloat16: (1.6e-2, 1e-2, 4e-3), torch.float32: (1e-5, 1e-5, 1e-6)}


def _masks(B, H, T, dtype=torch.bfloat16):
    keep = torch.rand(B, 1, 1, T) > 0.3
    keep[..., -1] = True  # every row attends to something, as in decoding
    per_head = torch.rand(B, H, 1, T) > 0.5
    per_head[..., 0] = True
    return [None, keep, keep[:1], per_head, torch.zeros(B, 1, 1, T).masked_fill(~keep, float("-inf")),
            torch.zeros(B, 1, 1, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)]


@needs_kernel
@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
# Head sizes: whole blocks of 64, one vector past them (72), several blocks and a part (200), a scalar tail (20).
# 40 query heads on 2 key heads: a group of 20 is more than one tile of queries (attention.c's QT).
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 32, 32, 80, 128), (3, 8, 2, 50, 64), (2, 4, 4, 7, 72), (1, 2, 1, 1, 8),
                                         (1, 4, 2, 33, 200), (2, 4, 2, 13, 20), (1, 40, 2, 45, 64)])
def test_decode_attention_matches_sdpa(patched_sdpa, B, H, Hkv, T, D, dtype):
    original = patched_sdpa.original
    rtol, atol, further = ATTENTION_DTYPES[dtype]
    q, k, v = _qkv(B, H, Hkv, T, D, dtype=dtype)
    gqa = Hkv != H
    for i, mask in enumerate(_masks(B, H, T, dtype)):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        assert patched_sdpa.calls == [(B, H, 1, D)] * (i + 1), f"mask {i}: not on the kernel"
        want = original(q, k, v, attn_mask=mask, enable_gqa=gqa)
        exact = original(q.double(), k.double(), v.double(), enable_gqa=gqa,
                         attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double())
        assert got.shape == want.shape and got.dtype == dtype, i
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"mask {i}")
        assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() + further, i


@needs_kernel
def test_decode_attention_takes_strided_queries_and_a_scale(patched_sdpa):
    original = patched_sdpa.original
    q, k, v = _qkv(2, 4, 4, 9, 16)
    q = torch.cat([q, q, q], dim=-1)[..., 16:32]  # a slice of a fused q/k/v projection, as remote code has
    assert not q.is_contiguous()
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert patched_sdpa.calls == [(2, 4, 1, 16)]
    torch.testing.assert_close(got, original(q, k, v, scale=0.3), rtol=1.6e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
def test_a_left_padded_row_attends_exactly_like_the_unpadded_one(patched_sdpa, dtype):
    """Batched decode == single: the padding columns a batch adds change nothing, bitwise."""
    q, k, v = _qkv(1, 4, 4, 6, 32, dtype=dtype)
    alone = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    pad = torch.zeros(1, 4, 3, 32, dtype=dtype)
    mask = torch.tensor([[[[False] * 3 + [True] * 6]]])
    padded = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([pad, k], 2), torch.cat([pad, v], 2),
                                                              attn_mask=mask)
    assert len(patched_sdpa.calls) == 2  # both on the kernel
    assert torch.equal(padded, alone)


@needs_kernel
@pytest.mark.parametrize("case", ["long-prompt", "causal-and-mask", "fp16", "dropout", "no-gqa-flag",
                                  "bf16-mask-on-fp32"])
def test_everything_else_goes_to_torchs_sdpa_unchanged(patched_sdpa, case):
    from engine.kernels import paths

    q, k, v = _qkv(1, 4, 2 if case == "no-gqa-flag" else 4, 5, 16)
    kw = {}
    if case == "long-prompt":  # as long as the process's paths send to torch's SDPA
        n = paths.current().attention_torch_from
        q, k, v = (torch.randn(1, 4, n, 16).to(torch.bfloat16) for _ in range(3))
        kw["is_causal"] = True
    elif case == "causal-and-mask":
        kw["is_causal"], kw["attn_mask"] = True, torch.ones(1, 1, 1, 5, dtype=torch.bool)
    elif case == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "dropout":
        kw["dropout_p"] = 0.5
    elif case == "bf16-mask-on-fp32":
        q, k, v = q.float(), k.float(), v.float()
        kw["attn_mask"] = torch.zeros(1, 1, 1, 5, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    except RuntimeError:
        assert case in ("no-gqa-flag", "causal-and-mask", "bf16-mask-on-fp32")  # SDPA's own errors
    assert patched_sdpa.calls == []  # declined


def _prompt_qkv(B, H, Hkv, Q, T, D, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return (torch.randn(B, H, Q, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype),
            torch.randn(B, Hkv, T, D).to(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
@pytest.mark.parametrize("B,H,Hkv,Q,D", [(1, 9, 3, 37, 64), (2, 4, 4, 5, 72), (1, 2, 1, 300, 8), (1, 2, 1, 19, 20)])
def test_prompt_attention_matches_sdpa(patched_sdpa, B, H, Hkv, Q, D, dtype):
    original = patched_sdpa.original
    rtol, atol, further = ATTENTION_DTYPES[dtype]
    q, k, v = _prompt_qkv(B, H, Hkv, Q, Q, D, dtype=dtype)
    gqa = Hkv != H
    keep = torch.ones(Q, Q, dtype=torch.bool).tril()
    keep = keep.expand(B, 1, Q, Q).clone()
    keep[-1, :, :, :2] = False  # the last row left-padded by 2: those keys masked for all its queries
    keep[-1, :, :2, :2] = True  # (as transformers does, padded queries attend to something: no NaN)
    for i, kw in enumerate(({"is_causal": True}, {"attn_mask": keep})):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw)
        assert patched_sdpa.calls == [(B, H, Q, D)] * (i + 1), f"{kw}: not on the kernel"
        want = original(q, k, v, enable_gqa=gqa, **kw)
        exact = original(q.double(), k.double(), v.double(), enable_gqa=gqa, **kw)
        assert got.shape == want.shape and got.dtype == dtype, kw
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=str(kw))
        assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() + further, kw


@needs_kernel
@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
def test_a_prompts_attention_is_the_same_alone_padded_or_split(patched_sdpa, dtype):
    """Prefill batched == alone: a prompt's attention is bitwise the same whether it runs alone (is_causal),
    left-padded in a group (a mask), or after a common beginning that was computed first (its keys in the
    cache, a gap of padding between them and the rest). torch's flash attention differs in all three."""
    Q, pad, shared, H, D = 40, 3, 16, 4, 32
    q, k, v = _prompt_qkv(1, H, H, Q, Q, D, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    alone = sdpa(q, k, v, is_causal=True)
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()

    def padded(t):
        return torch.cat([torch.zeros(1, H, pad, D, dtype=dtype), t], 2)

    mask = torch.zeros(1, 1, Q + pad, Q + pad, dtype=torch.bool)
    mask[..., pad:, pad:] = causal
    mask[..., :pad, :pad] = True  # padded queries attend to padding: their output is dropped
    in_group = sdpa(padded(q), padded(k), padded(v), attn_mask=mask)[:, :, pad:]
    assert torch.equal(in_group, alone)
    # [shared | gap | rest]: the rest's queries over the shared keys, a masked gap, and their own keys
    keys = torch.cat([k[:, :, :shared], torch.zeros(1, H, pad, D, dtype=dtype), k[:, :, shared:]], 2)
    values = torch.cat([v[:, :, :shared], torch.zeros(1, H, pad, D, dtype=dtype), v[:, :, shared:]], 2)
    rest_mask = torch.zeros(1, 1, Q - shared, Q + pad, dtype=torch.bool)
    rest_mask[..., :shared] = True
    rest_mask[..., shared + pad:] = causal[shared:, shared:]
    rest = sdpa(q[:, :, shared:], keys, values, attn_mask=rest_mask)
    head = sdpa(q[:, :, :shared], k[:, :, :shared], v[:, :, :shared], is_causal=True)
    assert len(patched_sdpa.calls) == 4  # all four on the kernel
    assert torch.equal(torch.cat([head, rest], 2), alone)


@needs_kernel
@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (40, 2, 20)])
def test_each_query_of_a_prompt_is_bitwise_its_own_decode_step(patched_sdpa, H, Hkv, D, dtype):
    """The kernel computes a prompt's queries in tiles that share their key head's keys (several query heads,
    several positions, each seeing its own number of keys): query i's output is still exactly what decoding
    that token alone over its i + 1 keys gives."""
    Q = 70  # more than one block of values (attention.c's VB) and several tiles of positions
    q, k, v = _prompt_qkv(2, H, Hkv, Q, Q, D, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    prompt = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    for i in range(Q):
        step = sdpa(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], enable_gqa=True)
        assert torch.equal(prompt[:, :, i:i + 1], step), i
    assert patched_sdpa.calls == [(2, H, Q, D)] + [(2, H, 1, D)] * Q  # the prompt and every step on the kernel


@needs_kernel
def test_installing_twice_wraps_once():
    from engine.kernels import attention

    attention.install(KERNEL)
    first = torch.nn.functional.scaled_dot_product_attention
    attention.install(KERNEL)
    try:
        assert torch.nn.functional.scaled_dot_product_attention is first
    finally:
        attention.uninstall()
    assert torch.nn.functional.scaled_dot_product_attention is attention._original


@needs_kernel
def test_the_served_library_holds_the_kernels_only():
    """The bench's bandwidth probe is built apart (bench/csrc/read_probe.c): nothing of the bench is served."""
    import ctypes

    assert [p.name for p in native.SOURCES] == ["linear.c", "linear_avx512bf16.c", "attention.c", "fused_ops.c",
                                               "decode_step.c"]
    assert not hasattr(ctypes.CDLL(str(KERNEL.path)), "read_probe")
