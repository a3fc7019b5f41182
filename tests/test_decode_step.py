"""A decode step with every decoder layer in one C call (engine/kernels/decode_step.py) gives bitwise the logits and
the cache of the model's own forward, for one row and for left-padded rows, in the Llama and Qwen2 classes with and
without biases; and the decode loop uses it only where that holds."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from engine import kernels
from engine.batching import BatchEngine
from engine.kernels import decode_step, native, paths
from engine.kv_cache import GrowingCache
from engine.prefill import prefill

KERNEL, WHY = native.native_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None or not KERNEL.bf16_units, reason="the CPU has no AVX512_BF16")

MODELS = [(modeling_llama.LlamaForCausalLM, modeling_llama.LlamaConfig),
          (modeling_qwen2.Qwen2ForCausalLM, modeling_qwen2.Qwen2Config)]


@pytest.fixture(autouse=True)
def stock_after():
    yield
    kernels.uninstall()


def _tiny(model_class, config_class, biases: bool, layers: int = 3):
    torch.manual_seed(11)
    extra = {"attention_bias": True, "mlp_bias": True} if biases and model_class is modeling_llama.LlamaForCausalLM \
        else {}
    config = config_class(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa", **extra)
    model = model_class(config)
    for linear in model.modules():
        if isinstance(linear, torch.nn.Linear) and linear.bias is not None:
            torch.nn.init.normal_(linear.bias, std=0.5)  # transformers initialises biases to zero
    model = model.to(torch.bfloat16).eval()
    kernels.install(model)
    return model


def _inputs(lengths: list[int], tokens: list[int]):
    """A decode step's inputs as BatchEngine._step builds them: rows of `lengths` real tokens in a cache as wide
    as the longest."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    return (torch.tensor([[t] for t in tokens]), torch.tensor([[n] for n in lengths]), mask,
            min(lengths) < width)


def _copy(cache: GrowingCache) -> GrowingCache:
    return GrowingCache.from_legacy_cache(tuple((k.clone(), v.clone()) for k, v in cache.to_legacy_cache()))


@pytest.mark.parametrize("model_class,config_class", MODELS)
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("prompts", [[[5, 17, 42, 7, 99]], [[5, 17, 42, 7, 99], [3, 250, 8], [9] * 12]])
def test_the_step_is_bitwise_the_models_forward(model_class, config_class, biases, prompts):
    model = _tiny(model_class, config_class, biases)
    step, why = decode_step.for_model(model)
    assert step is not None, why
    with torch.inference_mode():
        logits, layers = prefill(model, prompts, 0, share=True)
        ours, theirs = GrowingCache.from_legacy_cache(layers), GrowingCache.from_legacy_cache(layers)
        ours, theirs = _copy(ours), _copy(theirs)
        lengths = [len(p) for p in prompts]
        tokens = logits.argmax(-1).tolist()
        for _ in range(70):  # past GROW_MIN: the buffers grow on the way
            ids, positions, mask, padded = _inputs(lengths, tokens)
            got = step(ids, positions, mask if padded else None, ours)
            ready = mask.bool()[:, None, None, :] if padded else mask
            want = model(input_ids=ids, attention_mask=ready, position_ids=positions, past_key_values=theirs,
                         use_cache=True).logits[:, -1, :]
            assert torch.equal(got, want)
            for (k1, v1), (k2, v2) in zip(ours.to_legacy_cache(), theirs.to_legacy_cache(), strict=True):
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
            lengths = [n + 1 for n in lengths]
            tokens = got.argmax(-1).tolist()


def test_a_wrong_mask_or_position_changes_the_logits():
    """The comparison above can fail: the step reads its mask and positions."""
    model = _tiny(*MODELS[1], biases=True)
    step, _ = decode_step.for_model(model)
    prompts = [[5, 17, 42, 7, 99], [3, 250, 8]]
    with torch.inference_mode():
        logits, layers = prefill(model, prompts, 0, share=True)
        base = GrowingCache.from_legacy_cache(layers)
        ids, positions, mask, _ = _inputs([5, 3], logits.argmax(-1).tolist())
        right = step(ids, positions, mask, _copy(base))
        unmasked = step(ids, positions, None, _copy(base))
        shifted = step(ids, positions + 1, mask, _copy(base))
    assert torch.equal(right[0], unmasked[0]) and not torch.equal(right[1], unmasked[1])
    assert not torch.equal(right, shifted)


def test_where_the_step_does_not_hold_the_model_forward_decodes(monkeypatch):
    model = _tiny(*MODELS[0], biases=False)
    assert decode_step.unfit_reason(model) == ""
    assert BatchEngine(model, _Tokenizer()).native_step is not None
    monkeypatch.setenv("CPU_ARENA_NO_DECODE_STEP", "1")
    engine = BatchEngine(model, _Tokenizer())
    assert engine.native_step is None and "CPU_ARENA_NO_DECODE_STEP" in engine.decode_path
    monkeypatch.delenv("CPU_ARENA_NO_DECODE_STEP")
    paths.activate(paths.parse("decode=torch,prompt_torch_from=64,attention_torch_from=1025"))
    assert "PyTorch" in decode_step.unfit_reason(model)
    kernels.uninstall()
    assert "attention" in decode_step.unfit_reason(model)  # SDPA is torch's own again
    fp32 = modeling_qwen2.Qwen2ForCausalLM(modeling_qwen2.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, attn_implementation="sdpa")).eval()
    kernels.install(fp32)
    assert "FusedDecoderLayer" in decode_step.unfit_reason(fp32)  # the layer block is bf16 only
    engine = BatchEngine(fp32, _Tokenizer())
    assert engine.native_step is None and "model's forward" in engine.decode_path


class _Tokenizer:
    pad_token_id = eos_token_id = 0
