"""RMSNorm, rotary embedding and SiLU-and-multiply on fused_ops.c compute what transformers' own ops compute
(rotary: bitwise; the others: within the C code's different sum order and e^x), a row the same whatever the rows
beside it, and every call the C code cannot take goes to the stock code."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from bench.raw import threads
from engine import kernels
from engine.kernels import attention, fused_ops, native
from engine.kernels.linear import prepack_linears

KERNEL, WHY = native.native_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason=f"the C kernels are unavailable here: {WHY}")
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def stock_after():
    yield
    kernels.uninstall()


@pytest.fixture
def c_calls(monkeypatch):
    """How many times each of KERNEL's fused ops and its decoder layer block was called from now on. A fused module
    hands what the C code cannot take to the stock code, which a comparison with the stock code would not notice:
    a test of the C code asserts that it was called."""
    calls = dict.fromkeys(("rms_norm", "rotary", "silu_mul", "mlp_block"), 0)
    for name in calls:
        real = getattr(KERNEL, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(KERNEL, name, counted)
    return calls


def assert_within_one_unit(got: torch.Tensor, want: torch.Tensor, equal_at_least: float) -> None:
    """|got - want| <= one unit in the last place of want's dtype, and most elements bitwise equal."""
    ulp = 2.0 ** -7 if want.dtype == torch.bfloat16 else 2.0 ** -23
    diff = (got.float() - want.float()).abs()
    assert torch.all(diff <= want.float().abs() * ulp * 1.01 + 1e-30), diff.max()
    assert (got == want).float().mean() >= equal_at_least


@pytest.mark.parametrize("norm_class", fused_ops.RMS_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 896), (7, 4096)])
def test_rms_norm_computes_what_the_transformers_norm_computes(norm_class, dtype, shape, c_calls):
    torch.manual_seed(0)
    norm = norm_class(shape[-1], eps=1e-6).to(dtype)
    norm.weight.data.normal_(1.0, 0.5)
    x = (torch.randn(shape) * 4).to(dtype)
    with torch.inference_mode():
        want = norm(x)
        got = fused_ops.FusedRMSNorm(norm, KERNEL)(x)
    assert c_calls["rms_norm"] == 1
    assert got.shape == want.shape and got.dtype == want.dtype
    # Only the sum of squares is added in another order: its last bit scales a row by 1 +- 2^-23 or so, which
    # moves a bf16 rounding now and then and shows in fp32's last bits.
    if dtype == torch.bfloat16:
        assert_within_one_unit(got, want, 0.99)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


def _rotary_inputs(dtype: torch.dtype, batch: int, seq: int):
    """q, k as transformers' attention makes them (views of one projection, transposed to [B, H, S, D], grouped
    key heads) and cos, sin from a real rotary module at different positions per row."""
    config = modeling_qwen2.Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    rope = modeling_qwen2.Qwen2RotaryEmbedding(config=config)
    torch.manual_seed(1)
    qkv = torch.randn(batch, seq, (4 + 2 + 2) * 64).to(dtype)
    q = qkv[..., :256].view(batch, seq, 4, 64).transpose(1, 2)
    k = qkv[..., 256:384].view(batch, seq, 2, 64).transpose(1, 2)
    positions = torch.arange(seq).repeat(batch, 1) + torch.arange(batch)[:, None] * 37
    cos, sin = rope(qkv, positions)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 1), (2, 9)])
def test_rotary_embedding_is_bitwise_what_transformers_computes(dtype, batch, seq, c_calls):
    q, k, cos, sin = _rotary_inputs(dtype, batch, seq)
    stock = fused_ops._STOCK_ROTARY[modeling_qwen2]
    with torch.inference_mode():
        want = stock(q, k, cos, sin)
        got = fused_ops.fused_apply_rotary_pos_emb(KERNEL, stock, q, k, cos, sin)
        # One position row for every batch row: cos and sin broadcast over the batch.
        broadcast = fused_ops.fused_apply_rotary_pos_emb(KERNEL, stock, q, k, cos[:1], sin[:1])
    assert c_calls["rotary"] == 2 * 2  # q and k, both times
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for g, w in zip(broadcast, stock(q, k, cos[:1], sin[:1]), strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_multiply_computes_what_the_transformers_mlp_computes(dtype):
    torch.manual_seed(2)
    gate_up = (torch.randn(5, 2 * 1536) * 6).to(dtype)
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -87.5, -20.0, 0.0, 20.0, 90.0, 200.0])  # e^x's range ends
    g, u = gate_up.split(1536, dim=-1)  # slices of one output, as kernels.py's shared gate/up matmul gives
    with torch.inference_mode():
        want = torch.nn.functional.silu(g) * u
        got = KERNEL.silu_mul(g, u)
    # e^x within a few ulp of expf: bf16 rounding hides it but for a rare tie, fp32 shows it in the last bits.
    if dtype == torch.bfloat16:
        assert_within_one_unit(got, want, 0.999)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
# 6 rows: a decode step's, on the calling thread; 200: a prompt's, split over the threads (fused_ops.c PARALLEL_MIN)
@pytest.mark.parametrize("rows,seq", [(6, 1), (200, 30)])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, rows, seq):
    torch.manual_seed(3)
    x = torch.randn(rows, 3, 128).to(dtype)
    weight = torch.randn(128).to(dtype)
    q, k, cos, sin = _rotary_inputs(dtype, 3, seq)
    with torch.inference_mode(), threads(2):
        norms = KERNEL.rms_norm(x.reshape(-1, 128), weight, 1e-6)
        silu = KERNEL.silu_mul(x[:, 0], x[:, 1])
        rot = KERNEL.rotary(q, cos, sin)
        for i in range(rows):
            assert torch.equal(KERNEL.rms_norm(x[i], weight, 1e-6), norms[3 * i:3 * i + 3])
            assert torch.equal(KERNEL.silu_mul(x[i:i + 1, 0], x[i:i + 1, 1]), silu[i:i + 1])
        for b in range(3):
            assert torch.equal(KERNEL.rotary(q[b:b + 1], cos[b:b + 1], sin[b:b + 1]), rot[b:b + 1])


def _tiny(model_class, config_class, dtype):
    torch.manual_seed(4)
    config = config_class(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=300)
    return model_class(config).to(dtype).eval()


MODELS = [(modeling_llama.LlamaForCausalLM, modeling_llama.LlamaConfig),
          (modeling_qwen2.Qwen2ForCausalLM, modeling_qwen2.Qwen2Config)]


@pytest.mark.parametrize("model_class,config_class", MODELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_installed_models_norms_mlps_and_rotary_run_on_the_fused_ops_with_the_same_output(
        model_class, config_class, dtype, monkeypatch, c_calls):
    model = _tiny(model_class, config_class, dtype)
    ids = torch.tensor([[5, 17, 42, 7, 99], [3, 3, 250, 8, 1]])
    unfused = _tiny(model_class, config_class, dtype)
    prepack_linears(unfused)  # the same linears and attention, stock norms, MLPs and rotary
    attention.install(KERNEL)
    # The post-attention norm and the MLP's activation are the decoder layer block's where the CPU has AVX512_BF16
    # (tested below): here each op on its own.
    monkeypatch.setattr(fused_ops.FusedDecoderLayer, "fit", staticmethod(lambda layer, kernel: False))
    with torch.inference_mode():
        want = unfused(input_ids=ids).logits
        assert c_calls == {"rms_norm": 0, "rotary": 0, "silu_mul": 0, "mlp_block": 0}
        kernels.install(model)
        got = model(input_ids=ids).logits
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, fused_ops.FusedGatedMLP)
    assert sum(isinstance(m, fused_ops.FusedRMSNorm) for m in model.modules()) == 2 * 2 + 1
    # q and k: one rotary call each
    assert c_calls == {"rms_norm": 2 * 2 + 1, "rotary": 2 * 2, "silu_mul": 2, "mlp_block": 0}
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)


def test_what_the_c_code_cannot_take_goes_to_the_stock_code(monkeypatch):
    for name in ("rms_norm", "rotary", "silu_mul"):
        monkeypatch.setattr(KERNEL, name, lambda *args, _name=name: pytest.fail(f"{_name} should not be called"))
    torch.manual_seed(5)
    norm = modeling_qwen2.Qwen2RMSNorm(60).to(torch.bfloat16)  # width not a multiple of 8
    x = torch.randn(2, 60).to(torch.bfloat16)
    assert torch.equal(fused_ops.FusedRMSNorm(norm, KERNEL)(x), norm(x))
    half = modeling_qwen2.Qwen2RMSNorm(64).to(torch.float16)  # a dtype fused_ops.c has no code for
    x16 = torch.randn(2, 64).to(torch.float16)
    assert torch.equal(fused_ops.FusedRMSNorm(half, KERNEL)(x16), half(x16))
    grad = modeling_qwen2.Qwen2RMSNorm(64)  # autograd would record: stock ops
    x32 = torch.randn(2, 64, requires_grad=True)
    fused_ops.FusedRMSNorm(grad, KERNEL)(x32).sum().backward()
    assert x32.grad is not None
    q, k, cos, sin = _rotary_inputs(torch.float32, 1, 2)
    stock = fused_ops._STOCK_ROTARY[modeling_qwen2]
    want = stock(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # the [B, S, H, D] layout
    got = fused_ops.fused_apply_rotary_pos_emb(KERNEL, stock, q.transpose(1, 2), k.transpose(1, 2), cos, sin,
                                               unsqueeze_dim=2)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_install_leaves_subclasses_and_other_activations_alone():
    class OtherNorm(modeling_qwen2.Qwen2RMSNorm):  # may compute something else
        pass

    model = _tiny(modeling_qwen2.Qwen2ForCausalLM, modeling_qwen2.Qwen2Config, torch.float32)
    model.model.norm = OtherNorm(128)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert fused_ops.install(model, KERNEL) == 2 * 2 + 1  # 4 layer norms, layer 0's MLP
    assert type(model.model.norm) is OtherNorm
    assert type(model.model.layers[1].mlp) is modeling_qwen2.Qwen2MLP
    assert modeling_qwen2.apply_rotary_pos_emb is not fused_ops._STOCK_ROTARY[modeling_qwen2]
    fused_ops.uninstall_rotary()
    assert modeling_qwen2.apply_rotary_pos_emb is fused_ops._STOCK_ROTARY[modeling_qwen2]


needs_bf16_units = pytest.mark.skipif(KERNEL is None or not KERNEL.bf16_units, reason="the CPU has no AVX512_BF16")


def _tiny_with_biases(model_class, config_class):
    """bf16, two layers; Llama with attention and MLP biases, so that every bias pointer of the block is used."""
    torch.manual_seed(6)
    extra = {"attention_bias": True, "mlp_bias": True} if model_class is modeling_llama.LlamaForCausalLM else {}
    config = config_class(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=300, **extra)
    model = model_class(config)
    for linear in model.modules():
        if isinstance(linear, torch.nn.Linear) and linear.bias is not None:
            torch.nn.init.normal_(linear.bias, std=0.5)  # transformers initialises biases to zero
    return model.to(torch.bfloat16).eval()


@needs_bf16_units
@pytest.mark.parametrize("model_class,config_class", MODELS)
def test_the_decoder_layer_block_computes_bitwise_what_the_layer_computes_op_by_op(model_class, config_class,
                                                                                   monkeypatch):
    model, op_by_op = _tiny_with_biases(model_class, config_class), _tiny_with_biases(model_class, config_class)
    monkeypatch.setattr(fused_ops.FusedDecoderLayer, "fit", staticmethod(lambda layer, kernel: False))
    kernels.install(op_by_op)  # the same kernels, one call per projection, norm and activation
    monkeypatch.undo()
    kernels.install(model)
    layer = model.model.layers[0]
    assert all(isinstance(each, fused_ops.FusedDecoderLayer) for each in model.model.layers)
    assert isinstance(layer.self_attn.o_proj, fused_ops.DeferredProjection)
    assert type(op_by_op.model.layers[0]) is not fused_ops.FusedDecoderLayer
    assert all(each._direct for each in model.model.layers)  # the attention runs inlined
    inlined = []
    monkeypatch.setattr(fused_ops.FusedDecoderLayer, "_direct_forward",
                        lambda self, *a, _run=fused_ops.FusedDecoderLayer._direct_forward, **kw: inlined.append(1) or _run(self, *a, **kw))
    ids = torch.tensor([[5, 17, 42, 7, 99], [0, 0, 250, 8, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # a left-padded row: the worker's batched prompts
    blocks = []
    block_call = KERNEL.mlp_block
    monkeypatch.setattr(KERNEL, "mlp_block", lambda *a: blocks.append(a[0].shape[0]) or block_call(*a))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           op_by_op(input_ids=ids, attention_mask=mask).logits)
        kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **kw), op_by_op.generate(ids, **kw))
    assert len(inlined) == 2 * (1 + 6)  # two layers: the forward, then generate: its prompt and five decode steps
    # Each of them one mlp_block call (over the rows: 2 x 5 prompt tokens, then 2 rows a step); op_by_op made none.
    assert blocks == [10] * 2 * 2 + [2] * 2 * 5
    x = torch.randn(2, 3, 128).to(torch.bfloat16).requires_grad_()
    position = model.model.rotary_emb(x, torch.arange(3).repeat(2, 1))
    with torch.inference_mode():
        block = layer(x.detach(), position_embeddings=position, attention_mask=None)
    assert blocks[-1] == 6 and len(blocks) == 15  # the layer alone: on the block too
    with torch.enable_grad():  # autograd would record: the op-by-op path, the same numbers
        stock = layer(x, position_embeddings=position, attention_mask=None)
    assert len(blocks) == 15  # the block declined it
    assert torch.equal(block, stock.detach())


def test_layers_whose_parts_are_not_all_on_the_avx512_kernel_stay_as_they_are():
    model = _tiny(modeling_qwen2.Qwen2ForCausalLM, modeling_qwen2.Qwen2Config, torch.float32)
    kernels.install(model)  # fp32: linear.c, not linear_avx512bf16.c
    assert type(model.model.layers[0]) is modeling_qwen2.Qwen2DecoderLayer
    assert type(model.model.layers[0].self_attn.o_proj) is not fused_ops.DeferredProjection
