"""The prefix cache (engine/prefix_cache.py): finished requests' keys and values, and prompts that
begin like them starting from them with bitwise the logits of a whole prefill."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.prefix_cache import MIN_TOKENS, PrefixCache, usable
from tests.fixtures.embedded import smollm2_path


def _layers(n: int, layers: int = 2, fill: float = 0.0) -> tuple:
    """Per layer (keys, values) [1, 2 heads, n tokens, 4 dims] in fp32: 64 bytes a token a layer (keys and values)."""
    return tuple((torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), fill + 1)) for _ in range(layers))


def test_a_prompt_gets_the_longest_kept_beginning_and_always_computes_its_last_token():
    cache = PrefixCache(1 << 20)
    a = list(range(40))
    b = list(range(30)) + [999] * 10
    cache.put(a, _layers(40, fill=1))
    cache.put(b, _layers(40, fill=2))
    hit = cache.lookup(list(range(35)) + [7])  # 35 tokens in common with a, 30 with b
    assert hit.tokens == 35 and hit.layers[0][0].shape == (1, 2, 35, 4) and hit.layers[0][0][0, 0, 0, 0] == 1
    assert cache.lookup(a).tokens == 39  # the whole of a kept prompt: its last token is computed again
    assert cache.lookup(list(range(MIN_TOKENS - 1)) + [5000]) is None  # too short a beginning to pay
    assert cache.lookup([5000] + a) is None
    assert (cache.hits, cache.misses) == (2, 2)


def test_kept_values_are_copies_and_a_longer_sequence_replaces_its_beginning():
    cache = PrefixCache(1 << 20)
    layers = _layers(20)
    cache.put(list(range(20)), layers)
    layers[0][0].fill_(7)  # the engine goes on writing its batch cache
    assert cache.lookup(list(range(25))).layers[0][0].max() == 0
    cache.put(list(range(30)), _layers(30))  # the next turn of the same conversation
    assert len(cache) == 1 and cache.nbytes == 30 * 64 * 2
    cache.put(list(range(20)), _layers(20))  # covered by the kept one: nothing added
    assert len(cache) == 1 and cache.lookup(list(range(40))).tokens == 30


def test_the_least_recently_used_go_first_and_nothing_larger_than_the_budget_is_kept():
    per = 20 * 64 * 2  # bytes of one 20-token entry (2 layers)
    cache = PrefixCache(3 * per)
    seqs = [[i] * 20 for i in range(1, 5)]
    for s in seqs[:3]:
        cache.put(s, _layers(20))
    assert cache.lookup(seqs[0] + [9]) is not None  # used: now the most recent
    cache.put(seqs[3], _layers(20))
    assert cache.lookup(seqs[1] + [9]) is None and cache.lookup(seqs[0] + [9]) is not None
    assert cache.nbytes == 3 * per
    cache.put([9] * 100, _layers(100))  # alone larger than the budget
    assert cache.lookup([9] * 101) is None and cache.nbytes == 3 * per
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(-1)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from fastchat.model.model_adapter import load_model

    from engine import kernels
    from engine.kernels.native import native_kernel

    if native_kernel()[0] is None:
        pytest.skip(native_kernel()[1])
    model, tok = load_model(str(smollm2_path()), device="cpu", num_gpus=1, dtype=torch.bfloat16)
    kernels.install(model.eval())  # as the worker serves it: linears, attention and fused ops on the kernels
    yield model, tok
    kernels.uninstall()


def _run(engine, prompt_ids: list[int], n: int, *more: list[int]) -> list[int] | list[list[int]]:
    """Greedy answers of prompts sent together (the engine prefills requests arriving together together)."""
    from engine.batching import Request
    from engine.params import GenParams

    reqs = []
    for ids in (prompt_ids, *more):
        done = threading.Event()
        reqs.append((Request(params=GenParams(prompt="", temperature=0, max_new_tokens=n), prompt_ids=list(ids),
                             sink=lambda c, d=done: (c.finish_reason or c.error) and d.set()), done))
    for req, _ in reqs:
        engine.incoming.put(req)
    for _, done in reqs:
        assert done.wait(120)
    answers = [list(req.output_ids) for req, _ in reqs]
    return answers if more else answers[0]


def _wait_for(condition) -> None:
    deadline = time.monotonic() + 10  # kept when a row leaves the batch, just after its last chunk went out
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def _engine_after_a_first_turn(model, tok, question: str, n: int):
    """An engine with a prefix cache that has answered `question` (n tokens, greedy) and kept that turn:
    (engine, cache, the chat so far, the first turn's prompt tokens)."""
    from engine.batching import BatchEngine

    chat = [{"role": "user", "content": question}]
    first = tok.apply_chat_template(chat, add_generation_prompt=True)
    cache = PrefixCache(64 << 20)
    eng = BatchEngine(model, tok, max_batch=4, context_len=2048, prefix_cache=cache).start()
    try:
        answer = _run(eng, first, n)
        _wait_for(lambda: len(cache) == 1)
    except BaseException:
        eng.shutdown()
        raise
    chat.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)})
    return eng, cache, chat, first


def _prefills_from_kept_tokens(monkeypatch) -> list[tuple[int, int]]:
    """Records (prompts, kept tokens) of every prefill the engine starts from kept keys and values."""
    from engine import batching as engine_module

    calls = []
    real = engine_module.prefill_after
    monkeypatch.setattr(engine_module, "prefill_after",
                        lambda m, ps, hit, pad: calls.append((len(ps), hit.tokens)) or real(m, ps, hit, pad))
    return calls


@pytest.mark.models
def test_the_next_turn_of_a_chat_starts_from_the_kept_turn_with_the_same_answer(model_and_tokenizer, monkeypatch):
    """A finished request's prompt and answer are kept; the next turn, whose prompt repeats them, is prefilled
    from them (only its new tokens run) and answers exactly as a whole prefill does, here and in the
    logits and keys and values, bitwise (bf16, as served)."""
    from engine.prefill import prefill, prefill_after

    model, tok = model_and_tokenizer
    eng, cache, chat, first = _engine_after_a_first_turn(model, tok, "Name three colours of the rainbow.", 24)
    try:
        second = tok.apply_chat_template(chat + [{"role": "user", "content": "And two more?"}],
                                         add_generation_prompt=True)
        calls = _prefills_from_kept_tokens(monkeypatch)
        cached_answer = _run(eng, second, 24)
        assert len(calls) == 1 and calls[0][1] >= len(first)  # the whole first turn came from the cache
        eng.prefix_cache = None
        assert _run(eng, second, 24) == cached_answer  # prefilled whole: the same answer
    finally:
        eng.shutdown()
    with torch.inference_mode():
        hit = cache.lookup(second)  # keys and values of decode steps among them
        assert hit.tokens > len(first)
        whole_logits, whole = prefill(model, [second], 0, share=True)
        logits, layers = prefill_after(model, [second], hit, 0)
    assert torch.equal(logits, whole_logits)
    for (k, v), (kw, vw) in zip(layers, whole, strict=True):
        assert torch.equal(k, kw) and torch.equal(v, vw)


@pytest.mark.models
def test_a_model_whose_prompt_split_changes_its_logits_gets_no_prefix_cache(model_and_tokenizer, monkeypatch):
    from engine.batching import BatchEngine
    from engine.kernels import attention

    model, tok = model_and_tokenizer
    assert usable(model) is None
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention._original)
    assert "PyTorch's kernels" in usable(model)
    with pytest.raises(ValueError, match="prefix cache cannot serve this model"):
        BatchEngine(model, tok, prefix_cache=PrefixCache(1 << 20))


@pytest.mark.models
def test_prompts_that_begin_with_the_same_kept_tokens_are_prefilled_together(model_and_tokenizer, monkeypatch):
    """Two users continuing from one kept beginning (a shared system prompt and first turn) are prefilled in
    one pass over it, and each answers as it does prefilled whole and alone."""
    model, tok = model_and_tokenizer
    eng, _, chat, _ = _engine_after_a_first_turn(model, tok, "Count from 1 to 5.", 12)
    try:
        nexts = [tok.apply_chat_template(chat + [{"role": "user", "content": q}], add_generation_prompt=True)
                 for q in ("Now backwards.", "Now in French, please.")]
        calls = _prefills_from_kept_tokens(monkeypatch)
        together = _run(eng, nexts[0], 16, nexts[1])
        assert [prompts for prompts, _ in calls] == [2]
        eng.prefix_cache = None
        assert [_run(eng, p, 16) for p in nexts] == together
    finally:
        eng.shutdown()


@pytest.mark.models
def test_the_bench_times_a_next_turn_whole_and_from_the_kept_turn(model_and_tokenizer):
    from bench.raw import next_turn_prefill

    model, tok = model_and_tokenizer
    first = tok.apply_chat_template([{"role": "user", "content": "Hi there."}], add_generation_prompt=True)
    answer = tok("Hello! How can I help you today?").input_ids
    second = first + answer + tok("<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n").input_ids
    whole, kept, n = next_turn_prefill(model, first, answer, second, 2)
    assert n == len(first) + len(answer) and whole.n == kept.n == 2
    _, kept, n = next_turn_prefill(model, first, answer, [7] + second, 1)  # nothing in common
    assert kept is None and n == 0
