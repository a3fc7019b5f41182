"""Each call kind's implementation (engine/kernels/paths.py), chosen by measurement (engine/kernels/path_choice.py):
every combination a worker can run keeps batched equal to single at temperature 0, with a prefix cache; the
choice is measured on the model's shapes, cached, and logged one line per call kind."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine import kernels
from engine.kernels import attention, paths
from engine.kernels.native import native_kernel, pack_avx512bf16, unpack_avx512bf16
from engine.kernels.paths import NEVER, TORCH, Paths

VOCAB = 500

# Every kind of combination: thresholds small enough that the test's prompts (5-45 tokens) fall on both sides.
COMBINATIONS = {
    "kernels": Paths(),
    "prompts on torch": Paths(prompt_torch_from=24),
    "attention on torch": Paths(attention_torch_from=20),
    "prompts and attention on torch": Paths(prompt_torch_from=30, attention_torch_from=20),
    "decode on torch": Paths(decode=TORCH, attention_torch_from=26),
}

needs_kernel = pytest.mark.skipif(native_kernel()[0] is None, reason=f"no kernel here: {native_kernel()[1]}")


def test_a_spec_reads_back_and_a_wrong_one_names_the_fix():
    chosen = Paths(prompt_torch_from=256, attention_torch_from=1024)
    assert paths.parse(chosen.spec()) == chosen
    assert paths.parse("measure") == paths.MEASURE
    assert paths.parse("kernels") == paths.KERNELS
    assert paths.parse("prompt_torch_from=never").prompt_torch_from == NEVER
    with pytest.raises(ValueError, match="decode=kernel|torch"):
        paths.parse("decoding=torch")
    with pytest.raises(ValueError, match="whole number of tokens or 'never'"):
        paths.parse("prompt_torch_from=lots")
    with pytest.raises(ValueError, match="decode steps' attention stays on the kernel"):
        Paths(attention_torch_from=1)
    # Decode on torch sends every prompt alone (its grouped pass would depend on the group).
    assert Paths(decode=TORCH).alone_from == 1


def test_the_config_refuses_a_wrong_paths_setting_by_name():
    from pydantic import ValidationError

    from launch.config import ModelConfig

    with pytest.raises(ValidationError, match="paths"):
        ModelConfig(name="m", path="p", paths="fastest please")
    assert ModelConfig(name="m", path="p").paths == "measure"


@pytest.mark.parametrize("n_out, n_in", [(64, 64), (130, 77), (5, 9), (200, 896)])
def test_unpacking_gives_the_packed_weight_back(n_out, n_in):
    w = torch.randn(n_out, n_in).bfloat16()
    assert torch.equal(unpack_avx512bf16(pack_avx512bf16(w), n_in), w)


# ---- the engine on each combination ----

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1")


def _model(dtype: torch.dtype, chosen: Paths):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    kernels.install(model, chosen)
    return model


def _prompts() -> list[str]:
    g = torch.Generator().manual_seed(3)
    common = torch.randint(2, VOCAB, (18,), generator=g).tolist()  # a shared beginning (prefill.SHARED_PREFIX_MIN)
    ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 12, 45)]
    ids += [common + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (2, 4, 9, 21)]
    return [" ".join(f"w{i}" for i in p) for p in ids]


def _late_prompt(prompts: list[str]) -> str:
    """Shorter than every combination's thresholds, beginning with 17 tokens of the 45-token prompt only: a prefix
    cache would start it from that prompt's keys, which must not be kept where they were computed on PyTorch."""
    return " ".join(prompts[2].split()[:17] + ["w7", "w9"])


class _Logits:
    """Every logits row the engine chooses a token from, per prompt, in order: the prompt pass's, then each decode
    step's. Batched must equal alone bit for bit, not only in the greedy tokens (a tiny random model's tokens
    survive small differences)."""

    def __init__(self, monkeypatch):
        from engine import batching

        self.rows: dict[str, list[torch.Tensor]] = {}
        self.engine = None
        real_choose, real_greedy = batching.choose_token, batching.greedy_tokens

        def choose(logits, params, history):
            self.rows.setdefault(params.prompt, []).append(logits.clone())
            return real_choose(logits, params, history)

        def greedy(logits):
            for i, row in enumerate(self.engine.rows):
                self.rows.setdefault(row.req.params.prompt, []).append(logits[i].clone())
            return real_greedy(logits)

        monkeypatch.setattr(batching, "choose_token", choose)
        monkeypatch.setattr(batching, "greedy_tokens", greedy)

    def run(self, engine, prompts: list[str], n: int, stagger: float = 0.0) -> dict[str, torch.Tensor]:
        from engine.params import GenParams

        self.engine, self.rows = engine, {}
        running = []
        for p in prompts:
            done = threading.Event()
            params = GenParams.from_fastchat({"prompt": p, "temperature": 0, "max_new_tokens": n, "echo": False}, 1)
            sink = (lambda d: lambda c: (c.finish_reason or c.error) and d.set())(done)
            running.append((engine.submit(params, sink), done))
            time.sleep(stagger)
        for _, done in running:
            assert done.wait(120)
        return {p: torch.stack(rows) for p, rows in self.rows.items()}


def _equal(batched: dict, alone: dict) -> list[str]:
    """The prompts whose logits differ (empty when none)."""
    assert batched.keys() <= alone.keys()
    return [p[:20] for p in batched if not torch.equal(batched[p], alone[p])]


@needs_kernel
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_every_combination_computes_batched_as_alone(combination, dtype_name, monkeypatch):
    """Each prompt's logits alone (one request at a time, no prefix cache) are bitwise its logits batched with the
    others, arriving together, staggered into running batches, and again once a prefix cache holds the earlier
    answers; and the combination's PyTorch parts really ran (else this would test the kernels only)."""
    from engine.batching import BatchEngine
    from engine.prefix_cache import PrefixCache

    chosen = COMBINATIONS[combination]
    on_torch = {"linears": 0, "attention": 0}
    real_linears_on_torch, real_sdpa = paths.linears_on_torch, attention._original

    def linears_on_torch():
        taken = real_linears_on_torch()
        on_torch["linears"] += taken
        return taken

    def sdpa(q, *args, **kw):
        on_torch["attention"] += q.shape[2] > 1
        return real_sdpa(q, *args, **kw)

    monkeypatch.setattr(paths, "linears_on_torch", linears_on_torch)
    monkeypatch.setattr(attention, "_original", sdpa)
    tok, prompts, n = _tokenizer(), _prompts(), 8
    late = _late_prompt(prompts)
    logits = _Logits(monkeypatch)
    try:
        model = _model(getattr(torch, dtype_name), chosen)
        alone_engine = BatchEngine(model, tok, max_batch=4, context_len=512).start()
        try:
            alone = {}
            for p in [*prompts, late]:
                alone.update(logits.run(alone_engine, [p], n))
        finally:
            alone_engine.shutdown()
        engine = BatchEngine(model, tok, max_batch=4, context_len=512, prefix_cache=PrefixCache(2**24)).start()
        try:
            assert _equal(logits.run(engine, prompts, n), alone) == []
            # Joining running batches, some prompts from kept keys of the rounds before.
            assert _equal(logits.run(engine, prompts, n, stagger=0.02), alone) == []
            assert _equal(logits.run(engine, [*prompts[::-1], late], n), alone) == []
        finally:
            engine.shutdown()
    finally:
        kernels.uninstall()
    assert paths.current() == paths.KERNELS  # uninstall puts the process back
    if chosen.prompt_torch_from < NEVER:
        assert on_torch["linears"] > 0
    else:
        assert on_torch["linears"] == 0
    longest = max(len(p.split()) for p in prompts)
    assert (on_torch["attention"] > 0) == (chosen.attention_torch_from <= longest)


@pytest.mark.parametrize("chosen", [Paths(prompt_torch_from=10), Paths(attention_torch_from=10), Paths()])
def test_a_prompt_on_torch_is_prefilled_alone(chosen):
    from engine.batching import BatchEngine, Request
    from engine.params import GenParams

    paths.activate(chosen)
    try:
        eng = BatchEngine.__new__(BatchEngine)  # only the grouping rule: no model, no thread
        eng.max_batch, eng.rows, eng.prefix_cache = 8, [], None

        def req(n):
            return Request(params=GenParams(prompt=""), prompt_ids=[1] * n, sink=lambda c: None)

        n = chosen.alone_from
        long, short = req(n), [req(n - 1), req(n - 2)]
        eng.waiting = [long, *short]
        assert eng._next_group() == [long]
        eng.waiting = [*short, long]
        assert eng._next_group() == short
    finally:
        paths.reset()
    assert Paths().alone_from == 1025  # the kernels' default: prompts over 1024 tokens on torch's SDPA


# ---- the measurement ----

@needs_kernel
def test_the_choice_is_measured_on_the_models_shapes_cached_and_logged(tmp_path, monkeypatch):
    from engine.kernels import path_choice

    monkeypatch.setenv("CPU_ARENA_PATHS_CACHE", str(tmp_path))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).bfloat16()
    shapes = path_choice.layer_shapes(model)
    assert shapes == [(128 + 2 * 64, 128, True), (2 * 320, 128, False), (128, 128, False), (128, 320, False)]
    assert path_choice.attention_shape(model) == (4, 2, 32)  # qkv (with Qwen2's biases), gate/up, o, down
    monkeypatch.setattr(path_choice, "_busy_seconds", lambda: 0.0)  # a quiet machine (the busy case is below)
    children = []
    real = path_choice.measure_in_child
    monkeypatch.setattr(path_choice, "measure_in_child", lambda sig: children.append(sig) or real(sig))
    lines: list[str] = []
    first = path_choice.choose_paths(model, say=lines.append)
    assert len(children) == 1 and children[0]["linears"] == [list(s) for s in shapes]
    assert [line.split(" on ")[0] for line in lines[:3]] == ["paths: decode", "paths: prompt", "paths: attention"]
    assert "kernel" in lines[0] and "torch" in lines[0] and "ms" in lines[0]
    assert lines[3] == "paths: measured now"
    figures = first.figures
    assert set(figures["decode"]) == {"1", "4"} and set(figures["prompt"]) <= {"64", "256", "1024"}
    assert all(0 < f[c] < 10 for kind in figures.values() for f in kind.values() for c in ("kernel", "torch"))
    assert len(list(tmp_path.glob("*.json"))) == 1
    lines.clear()
    again = path_choice.choose_paths(model, say=lines.append)
    assert again == first and len(children) == 1  # read back, not measured
    assert lines[3].startswith("paths: measured before on this machine")
    # Measured beside another process's work: used, but not kept.
    busy = iter([0.0, 1e6, 2e6, 3e6])  # both attempts beside other work
    monkeypatch.setattr(path_choice, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(path_choice, "RETRY_AFTER_S", 0.0)
    lines.clear()
    narrow = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).bfloat16()
    path_choice.choose_paths(narrow, say=lines.append)
    assert lines[3].startswith("paths: measured now, beside other processes using") and "not cached" in lines[3]
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(path_choice, "_busy_seconds", lambda: 0.0)
    # A failed measurement leaves everything on the kernels and says why; another shape is another entry.
    monkeypatch.setattr(path_choice, "measure_in_child", lambda sig: (_ for _ in ()).throw(RuntimeError("boom")))
    lines.clear()
    odd = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).bfloat16()
    assert path_choice.choose_paths(odd, say=lines.append) == paths.KERNELS
    assert lines == ["paths: everything on the kernels: the measurement failed (boom)"]
    monkeypatch.setattr(path_choice, "measure_in_child", real)
    wider = Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=320, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).bfloat16()
    path_choice.choose_paths(wider, say=lines.append)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_torch_is_chosen_from_the_smallest_size_it_wins_at_and_above():
    from engine.kernels.path_choice import _from

    assert _from({64: False, 256: True, 1024: True}) == 256
    assert _from({64: True, 256: False, 1024: True}) == 1024
    assert _from({64: True, 256: True}) == 64
    assert _from({64: False, 256: False}) == NEVER
    assert _from({}) == NEVER


@needs_kernel
def test_a_faster_torch_is_chosen_per_call_kind(monkeypatch):
    """The pick follows the figures: a candidate made slow loses its call kind, and only that one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.kernels import path_choice
    from engine.kernels.linear import choose_backend

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).bfloat16()
    backend, _ = choose_backend(torch.bfloat16)
    slow_kernel_run = backend.run

    def slow(x, operand, bias):
        if x.shape[0] > 8:  # prompt passes only: decode steps keep their speed
            time.sleep(0.02)
        return slow_kernel_run(x, operand, bias)

    real_rows = path_choice.torch_rows

    def slow_rows(x, weight, bias):  # decode steps on torch made slow: the kernel keeps them
        time.sleep(0.02)
        return real_rows(x, weight, bias)

    monkeypatch.setattr(path_choice, "torch_rows", slow_rows)
    monkeypatch.setattr(path_choice, "BUDGET_S", 10.0)
    from dataclasses import replace

    layer = [(torch.randn(n_out, n_in).bfloat16(), None) for n_out, n_in, _ in path_choice.layer_shapes(model)]
    chosen = path_choice.measure(native_kernel()[0], replace(backend, run=slow), torch.bfloat16, layer,
                                 path_choice.attention_shape(model))
    assert chosen.decode == paths.KERNEL
    assert chosen.prompt_torch_from == path_choice.PROMPT_TOKENS[0]
