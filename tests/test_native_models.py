"""ChatGLM3-6B and Qwen-7B-Chat on transformers' GlmForCausalLM / Qwen2ForCausalLM (worker_adapters/native_loader.py),
held to the published remote code on tiny random-weight checkpoints built from the published files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.fixtures.seed_models import GLM, QWEN, load_published
from worker_adapters.native_loader import checkpoint_tensors, load_native

# Whole models in both implementations, prompts up to 2,100 tokens: seconds each, so out of `make test-fast`.
pytestmark = pytest.mark.slow
LENGTHS = (1, 17, 300, 2100)


@pytest.fixture(scope="module")
def fp32_pairs(lab_models):
    """name -> (published remote-code model, native model), fp32, same weights."""
    return {name: (load_published(path, torch.float32)[0], load_native(path, torch.float32))
            for name, path in lab_models.items()}


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 60000, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", [GLM, QWEN])
def test_fp32_logits_equal_the_published_code(name, n, fp32_pairs):
    remote, native = fp32_pairs[name]
    ids = _prompt(n, n)
    with torch.inference_mode():
        diff = (remote(ids).logits - native(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _cached_steps(model, ids: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode with each model's own cache: the tokens and every step's logits. Positions are given
    (ChatGLM3's remote forward counts them from 0 on every call unless told, as its generate helpers do)."""
    out, logits_seen = [], []
    n = ids.shape[1]
    with torch.inference_mode():
        res = model(ids, position_ids=torch.arange(n).unsqueeze(0), use_cache=True)
        past = res.past_key_values
        for i in range(steps):
            last = res.logits[:, -1, :].float()
            logits_seen.append(last)
            token = int(last.argmax())
            out.append(token)
            res = model(torch.tensor([[token]]), position_ids=torch.tensor([[n + i]]), past_key_values=past,
                        use_cache=True)
            past = res.past_key_values
    return out, torch.cat(logits_seen)


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_fp32_logits_equal_over_32_cached_decode_steps(name, fp32_pairs):
    remote, native = fp32_pairs[name]
    ids = _prompt(17, 7)
    ref_tokens, ref_logits = _cached_steps(remote, ids, 32)
    tokens, logits = _cached_steps(native, ids, 32)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def _bf16_ulp(x: float) -> float:
    return 2.0 ** (torch.tensor(abs(x)).log2().floor().item() - 7)  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_bf16_greedy_tokens_equal_over_32_steps(name, lab_models):
    """Both models are fed the published code's greedy token at every step (32 cached steps), and the native
    model must choose the same token wherever the choice is not a tie in bf16: with a 65k/152k vocabulary and
    random weights, the two best logits are sometimes one bf16 step apart or equal, and then either token is
    a correct greedy answer (different kernels round differently), and the native choice must be one of them.
    Most steps must be decided for the test to mean anything."""
    remote = load_published(lab_models[name], torch.bfloat16)[0]
    native = load_native(lab_models[name], torch.bfloat16)
    ids = _prompt(17, 11)
    n = ids.shape[1]
    agree = ties = 0
    with torch.inference_mode():
        pos = torch.arange(n).unsqueeze(0)
        r, m = remote(ids, position_ids=pos, use_cache=True), native(ids, position_ids=pos, use_cache=True)
        for i in range(32):
            logits = r.logits[0, -1].float()
            top = logits.topk(2)
            token, chosen = int(top.indices[0]), int(m.logits[0, -1].float().argmax())
            near = 2 * _bf16_ulp(top.values[0].item())
            if (top.values[0] - top.values[1]).item() <= near:
                ties += 1  # then the native choice must still be one of the tied best
                assert (top.values[0] - logits[chosen]).item() <= near, f"step {i}"
            else:
                assert chosen == token, f"step {i}"
                agree += 1
            step, pos = torch.tensor([[token]]), torch.tensor([[n + i]])
            r = remote(step, position_ids=pos, past_key_values=r.past_key_values, use_cache=True)
            m = native(step, position_ids=pos, past_key_values=m.past_key_values, use_cache=True)
    assert agree >= 20, (agree, ties)  # about a third of the steps are such ties at 2 bf16 steps


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_bin_shards_load_like_safetensors(name, lab_models, fp32_pairs, tmp_path):
    """A download with pytorch_model-*.bin shards instead of safetensors gives the same model."""
    src = lab_models[name]
    folder = tmp_path / name
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    tensors = dict(checkpoint_tensors(src))
    names = sorted(tensors)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, folder / fname)
        index.update(dict.fromkeys(part, fname))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    native = load_native(folder, torch.float32)
    ids = _prompt(17, 3)
    with torch.inference_mode():
        assert torch.equal(native(ids).logits, fp32_pairs[name][1](ids).logits)


def test_a_checkpoint_missing_a_tensor_is_refused_by_name(lab_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(lab_models[QWEN], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match="has no tensor for"):
        load_native(folder, torch.float32)


def test_the_native_configs_carry_the_published_facts(fp32_pairs):
    glm = fp32_pairs[GLM][1].config
    assert (glm.model_type, glm.partial_rotary_factor, glm.rms_norm_eps, glm.rope_theta) == ("glm", 0.5, 1e-5, 10000.0)
    assert glm.num_key_value_heads == 2 and glm.eos_token_id == [2, 64795, 64797]
    qwen = fp32_pairs[QWEN][1].config
    assert (qwen.model_type, qwen.rms_norm_eps, qwen.max_position_embeddings) == ("qwen2", 1e-6, 8192)
    assert qwen.num_key_value_heads == qwen.num_attention_heads
