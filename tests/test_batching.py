"""The continuous-batching engine on the real SmolLM2 (tests marked `models`): batched greedy output equals
single-request output; its grouping and prefill rules on tiny models or none."""

from __future__ import annotations

import os
import threading
import time

import pytest

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three prime numbers and explain why.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
]


def _start_engine(path, dtype_name: str):
    import torch
    from fastchat.model.model_adapter import load_model

    from engine import kernels
    from engine.batching import BatchEngine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    model, tok = load_model(str(path), device="cpu", num_gpus=1, dtype=getattr(torch, dtype_name))
    kernels.install(model.eval())  # as the worker serves it by default
    return BatchEngine(model, tok, max_batch=4, context_len=2048).start()


@pytest.fixture(scope="module")
def engine(smollm2):
    eng = _start_engine(smollm2, "float32")
    yield eng
    eng.shutdown()


def _submit(engine, prompt: str, n: int, **extra):
    from engine.params import GenParams

    done, chunks = threading.Event(), []

    def sink(c):
        chunks.append(c)
        if c.finish_reason or c.error:
            done.set()

    params = GenParams.from_fastchat({"prompt": prompt, "temperature": 0, "max_new_tokens": n, "echo": False,
                                      **extra}, engine.tokenizer.eos_token_id)
    return engine.submit(params, sink), done, chunks


@pytest.mark.models
def test_batched_greedy_equals_single(engine):
    n = 24
    singles = []
    for p in PROMPTS:
        req, done, chunks = _submit(engine, p, n)
        assert done.wait(120)
        singles.append((list(req.output_ids), chunks[-1].text))
    steps_before = engine.steps
    running = []
    for i, p in enumerate(PROMPTS):  # staggered: later requests join a batch that is already decoding
        running.append(_submit(engine, p, n))
        time.sleep(0.05 * i)
    for (req, done, chunks), (ids, text) in zip(running, singles, strict=True):
        assert done.wait(120)
        assert req.output_ids == ids
        assert chunks[-1].text == text
        assert chunks[-1].error is None
        assert chunks[-1].prompt_tokens == len(req.prompt_ids)
        assert chunks[-1].completion_tokens == len(ids)
        texts = [c.text for c in chunks]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # text only grows
    # Batched: far fewer decode steps than the sum of the answers.
    assert engine.steps - steps_before < sum(len(ids) for ids, _ in singles)


@pytest.mark.models
@pytest.mark.slow
def test_bf16_batched_greedy_equals_single(smollm2):
    """bf16 as a 7B model is served here: on the project's kernels (AVX512_BF16 units or AVX2), batched."""
    import torch

    from engine.kernels.linear import batch_rows_limit, linear_backend

    if batch_rows_limit(torch.bfloat16)[0] == 1:
        pytest.skip(f"bf16 is served one row at a time here: {linear_backend(torch.bfloat16)}")
    from engine import kernels

    eng = _start_engine(smollm2, "bfloat16")
    try:
        test_batched_greedy_equals_single(eng)
    finally:
        eng.shutdown()
        kernels.uninstall()  # attention and rotary are process-wide; the other tests run stock transformers


@pytest.mark.models
def test_own_stop_and_length_per_request(engine):
    short, d1, c1 = _submit(engine, PROMPTS[3], 3)
    long_, d2, c2 = _submit(engine, PROMPTS[3], 12)
    assert d1.wait(60) and d2.wait(60)
    assert c1[-1].finish_reason == "length" and len(short.output_ids) == 3
    assert long_.output_ids[:3] == short.output_ids
    # A stop string taken from the greedy answer cuts it there.
    word = c2[-1].text.split()[2]
    _, d3, c3 = _submit(engine, PROMPTS[3], 12, stop=[word])
    assert d3.wait(60)
    assert c3[-1].finish_reason == "stop" and word not in c3[-1].text
    assert c2[-1].text.startswith(c3[-1].text)


@pytest.mark.models
def test_cancelled_request_leaves_the_batch(engine):
    req, done, _ = _submit(engine, PROMPTS[0], 200)
    time.sleep(0.5)
    req.cancel()
    deadline = time.monotonic() + 30
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load() == 0 and len(req.output_ids) < 200


@pytest.mark.models
def test_requests_arriving_together_are_prefilled_together(engine):
    """Prompts of different lengths in one left-padded, masked prefill pass give the single-request answers."""
    prompts = PROMPTS[:3]  # 18-22 tokens: padding within PAD_WASTE, so one group
    singles = _answers_one_at_a_time(engine, prompts, 16)
    lengths = [len(engine.tokenizer(p).input_ids) for p in prompts]
    assert len(set(lengths)) > 1  # really padded
    admitted = []
    assert _answers_admitted_together(engine, prompts, 16, admitted) == singles
    assert admitted == [3]


def _answers_one_at_a_time(engine, prompts: list[str], n: int) -> list[list[int]]:
    answers = []
    for p in prompts:
        req, done, _ = _submit(engine, p, n)
        assert done.wait(120)
        answers.append(list(req.output_ids))
    return answers


def _answers_admitted_together(engine, prompts: list[str], n: int, admitted: list) -> list[list[int]]:
    """Greedy answers from a second engine on the same (idle) model, started only once every prompt waits,
    so they are admitted as one group; `admitted` receives each admitted group's size."""
    from engine.batching import BatchEngine

    together = BatchEngine(engine.model, engine.tokenizer, max_batch=4, context_len=2048)
    real_admit = together._admit
    together._admit = lambda group: (admitted.append(len(group)), real_admit(group))
    running = [_submit(together, p, n) for p in prompts]
    together.start()
    try:
        for _, done, chunks in running:
            assert done.wait(120)
            assert chunks[-1].error is None
    finally:
        together.shutdown()
    return [list(req.output_ids) for req, _, _ in running]


@pytest.mark.models
def test_requests_a_few_ms_apart_on_an_idle_engine_share_one_prefill(engine):
    """As FastChat's API server forwards requests sent at once: a few ms apart, not together."""
    from engine.batching import ADMIT_GAP_S, BatchEngine

    eng = BatchEngine(engine.model, engine.tokenizer, max_batch=4, context_len=2048).start()
    admitted = []
    real_admit = eng._admit
    eng._admit = lambda group: (admitted.append(len(group)), real_admit(group))
    try:
        running = []
        for p in PROMPTS[:3]:
            running.append(_submit(eng, p, 4))
            time.sleep(ADMIT_GAP_S / 3)
        for _, done, chunks in running:
            assert done.wait(120) and chunks[-1].error is None
        # Later: one request alone is admitted alone, once no other follows it.
        _, done, _ = _submit(eng, PROMPTS[0], 2)
        assert done.wait(120)
    finally:
        eng.shutdown()
    assert admitted == [3, 1]


@pytest.mark.models
def test_padded_prefill_gives_each_prompt_its_own_logits(engine):
    """The left-padded inputs reproduce every prompt's single-request next-token logits."""
    import torch

    from engine.prefill import prefill_inputs

    prompts = [engine.tokenizer(p).input_ids for p in (PROMPTS[0], PROMPTS[3], PROMPTS[1])]
    assert len({len(p) for p in prompts}) == 3
    with torch.inference_mode():
        alone = [engine.model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        inputs = prefill_inputs(prompts, engine.tokenizer.eos_token_id)
        together = engine.model(**inputs).logits[:, -1]
        unmasked = engine.model(input_ids=inputs["input_ids"]).logits[:, -1]
    for i, want in enumerate(alone):
        torch.testing.assert_close(together[i], want, rtol=1e-3, atol=1e-3)
    # The check has teeth: without the mask the padded prompts' logits move.
    assert (unmasked[1] - alone[1]).abs().max() > 1e-2


@pytest.mark.models
def test_a_failing_prefill_fails_its_requests_not_the_engine(engine, monkeypatch):
    def broken(group):
        raise RuntimeError("prefill exploded")

    monkeypatch.setattr(engine, "_admit", broken)
    _, done, chunks = _submit(engine, PROMPTS[0], 4)
    assert done.wait(30)  # the client hears about it instead of waiting forever
    assert "prefill exploded" in chunks[-1].error
    monkeypatch.undo()
    assert engine.load() == 0  # not stuck retrying the same request
    _, ok_done, ok_chunks = _submit(engine, PROMPTS[0], 4)
    assert ok_done.wait(60) and ok_chunks[-1].error is None


@pytest.mark.models
def test_padded_decode_steps_use_a_ready_mask(engine, monkeypatch):
    """Rows of different lengths: transformers builds no mask per step (it costs ~15% of a 4-row step)."""
    from transformers import masking_utils

    from engine.model_inputs import takes_ready_mask

    assert takes_ready_mask(engine.model)
    built = []
    sdpa_mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def counting(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        if mask is not None:
            built.append(tuple(mask.shape))
        return mask

    monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counting)
    first, d1, _ = _submit(engine, PROMPTS[0], 24)
    deadline = time.monotonic() + 60
    while len(first.output_ids) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    steps_before = engine.steps
    second, d2, _ = _submit(engine, PROMPTS[1], 8)  # joins 4+ tokens behind: its row is padded
    assert d1.wait(120) and d2.wait(120)
    padded_steps = engine.steps - steps_before
    assert padded_steps >= 6
    assert [s for s in built if s[2] == 1] == []  # no decode step (query length 1) built a mask


@pytest.mark.parametrize("module, attn, extra, ready", [
    ("transformers.models.llama.modeling_llama", "sdpa", {}, True),
    ("transformers.models.qwen2.modeling_qwen2", "sdpa", {"use_sliding_window": False, "sliding_window": 4096}, True),
    ("transformers_modules.Qwen-7B-Chat.modeling_qwen", "sdpa", {}, False),  # remote code: builds its own
    ("transformers.models.llama.modeling_llama", "eager", {}, False),  # wants an additive float mask
    ("transformers.models.mistral.modeling_mistral", "sdpa", {"sliding_window": 4096}, False),
    ("transformers.models.gemma2.modeling_gemma2", "sdpa",
     {"layer_types": ["sliding_attention", "full_attention"]}, False),
])
def test_which_models_take_a_ready_mask(module, attn, extra, ready):
    from types import SimpleNamespace

    from engine.model_inputs import takes_ready_mask

    model_class = type("M", (), {"__module__": module})
    model = model_class()
    model.config = SimpleNamespace(_attn_implementation=attn, **extra)
    assert takes_ready_mask(model) is ready


@pytest.mark.models
def test_requests_joining_a_running_batch_are_counted_once(engine, monkeypatch):
    """queue_length (engine.load(), read by the HTTP thread) while a group joins the running batch: each
    request is waiting or a row, never both. It read 7 for 4 requests when the rows were extended before
    the group left `waiting` and the merged cache was built in between."""
    from engine import batching as engine_module

    seen = []
    build = engine_module.GrowingCache.from_legacy_cache

    def watched(layers):
        seen.append(engine.load())  # what a worker_get_status at this moment would report
        return build(layers)

    first, first_done, first_chunks = _submit(engine, PROMPTS[0], 40)
    deadline = time.monotonic() + 60
    while not first_chunks and time.monotonic() < deadline:  # decoding: the others join a running batch
        time.sleep(0.01)
    monkeypatch.setattr(engine_module.GrowingCache, "from_legacy_cache", watched)
    late = [_submit(engine, p, 8) for p in PROMPTS[1:]]
    for _, done, _ in late:
        assert done.wait(120)
    assert first_done.wait(120)
    monkeypatch.undo()
    assert seen and max(seen) <= len(PROMPTS), seen


@pytest.mark.models
def test_a_request_cancelled_while_waiting_is_dropped_and_the_engine_goes_on(engine):
    full = [_submit(engine, p, 16) for p in PROMPTS]  # max_batch=4: the batch is full
    deadline = time.monotonic() + 60
    while not all(chunks for _, _, chunks in full) and time.monotonic() < deadline:
        time.sleep(0.01)
    late, late_done, _ = _submit(engine, PROMPTS[0], 4)  # waits for a free row
    late.cancel()
    for _, done, _ in full:
        assert done.wait(120)
    deadline = time.monotonic() + 30
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load() == 0  # the cancelled request left `waiting` too
    req, done, chunks = _submit(engine, PROMPTS[1], 4)
    assert done.wait(60) and chunks[-1].error is None and len(req.output_ids) == 4


SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer briefly and stay on the topic "
          "of the question.<|im_end|>\n")


@pytest.mark.models
def test_prompts_that_begin_alike_share_one_prefill_of_their_beginning(engine, monkeypatch):
    """A common beginning (a system prompt; the same question from two clients) is prefilled once, and every
    answer still equals its single-request answer: the rests have different lengths, so rows are padded."""
    from engine import prefill as prefill_module

    prompts = [SYSTEM + PROMPTS[0], SYSTEM + PROMPTS[1], SYSTEM + PROMPTS[2], SYSTEM + PROMPTS[0]]
    ids = [engine.tokenizer(p).input_ids for p in prompts]
    shared = prefill_module.shared_prefix_len(ids)
    assert shared >= prefill_module.SHARED_PREFIX_MIN
    assert len({len(i) - shared for i in ids}) > 1  # the rests differ in length: a gap to move
    singles = _answers_one_at_a_time(engine, prompts, 16)
    assert singles[0] == singles[3]
    calls = []
    real = prefill_module._prefill_shared
    monkeypatch.setattr(prefill_module, "_prefill_shared",
                        lambda model, prompts, shared, pad: (calls.append((len(prompts), shared)),
                                                             real(model, prompts, shared, pad))[1])
    assert _answers_admitted_together(engine, prompts, 16, []) == singles
    assert calls == [(4, shared)]


@pytest.mark.models
def test_a_shared_beginning_gives_each_prompt_its_single_logits_and_cache(engine):
    """The shared prefill's logits and cache (gaps moved to the front) match each prompt's own prefill."""
    import torch

    from engine.prefill import prefill

    prompts = [engine.tokenizer(SYSTEM + p).input_ids for p in (PROMPTS[0], PROMPTS[3], PROMPTS[1])]
    with torch.inference_mode():
        logits, layers = prefill(engine.model, prompts, engine.tokenizer.eos_token_id, share=True)
        width = layers[0][0].shape[-2]
        for i, p in enumerate(prompts):
            alone_logits, alone = prefill(engine.model, [p], engine.tokenizer.eos_token_id, share=True)
            torch.testing.assert_close(logits[i], alone_logits[0], rtol=1e-4, atol=1e-4)
            for (k, v), (ka, va) in zip(layers, alone, strict=True):
                torch.testing.assert_close(k[i, :, width - len(p):], ka[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(v[i, :, width - len(p):], va[0], rtol=1e-4, atol=1e-4)


def test_shared_prefix_len_leaves_every_prompt_a_token_of_its_own():
    from engine.prefill import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last token is each prompt's own
    assert shared_prefix_len([[1, 2, 3], [1, 2]]) == 1
    assert shared_prefix_len([[7, 2], [1, 2]]) == 0


def _tiny_qwen2_on_the_kernel(dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine import kernels

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    kernels.install(model)  # linears, attention and fused ops on the project's kernels, as served
    return model


def _kernel_attention_calls(monkeypatch, kernel) -> list[tuple[int, int, int]]:
    """(query heads, key heads, queries) of every call attention.c computes from now on: what the kernel declines
    goes to torch's SDPA, on which a test about the kernel would not be testing it."""
    calls = []
    real = kernel.attention

    def counting(q, k, v, mask, scale, causal=False):
        calls.append((q.shape[1], k.shape[1], q.shape[2]))
        return real(q, k, v, mask, scale, causal=causal)

    monkeypatch.setattr(kernel, "attention", counting)
    return calls


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("share", [False, True])
def test_prompts_prefilled_together_are_bitwise_the_prompts_alone(share, dtype_name, monkeypatch):
    """Prefilled left-padded with others, or after a common beginning computed once, each prompt's logits and
    cache are bitwise its own prefill's, so no answer can change (on torch's flash attention 27-96 thousand
    key elements differed on SmolLM2 in bf16, 35-115 thousand in fp32: engine/kernels/csrc/attention.c)."""
    import torch

    from engine import kernels
    from engine.kernels.native import native_kernel
    from engine.prefill import SHARED_PREFIX_MIN, prefill

    if native_kernel()[0] is None:
        pytest.skip(native_kernel()[1])
    calls = _kernel_attention_calls(monkeypatch, native_kernel()[0])
    try:
        model = _tiny_qwen2_on_the_kernel(getattr(torch, dtype_name))
        torch.manual_seed(1)
        common = torch.randint(0, 500, (SHARED_PREFIX_MIN + 4,)).tolist()
        prompts = [common + torch.randint(0, 500, (n,)).tolist() for n in (5, 17, 9, 30)]
        with torch.inference_mode():
            logits, layers = prefill(model, prompts, 0, share=share)
            width = layers[0][0].shape[-2]
            for i, p in enumerate(prompts):
                alone_logits, alone = prefill(model, [p], 0, share=share)
                assert torch.equal(logits[i], alone_logits[0]), i
                for (k, v), (ka, va) in zip(layers, alone, strict=True):
                    assert torch.equal(k[i, :, width - len(p):], ka[0]) and torch.equal(v[i, :, width - len(p):], va[0])
    finally:
        kernels.uninstall()
    # Every layer's attention of every pass on the kernel: the group's (its common beginning first where shared),
    # then each prompt's alone.
    assert len(calls) == 3 * ((2 if share else 1) + len(prompts))


def test_masked_batches_hand_grouped_key_heads_to_the_kernel_without_copying_them(monkeypatch):
    """With the kernel installed, a padded (masked) batch of a grouped-query model reaches attention with its 2
    key/value heads as they are, not repeated to 4 by transformers' repeat_kv (which copies them every layer,
    every step), with bitwise the logits of the repeated heads; uninstalling restores transformers' choice."""
    import torch
    from transformers.integrations import sdpa_attention

    from engine import kernels
    from engine.kernels import attention
    from engine.kernels.native import native_kernel

    if native_kernel()[0] is None:
        pytest.skip(native_kernel()[1])
    calls = _kernel_attention_calls(monkeypatch, native_kernel()[0])
    stock = sdpa_attention.use_gqa_in_sdpa
    ids = torch.tensor([[0, 0, 5, 17, 42], [3, 3, 250, 8, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    repeated = []
    real_repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: repeated.append(n) or real_repeat(h, n))
    try:
        model = _tiny_qwen2_on_the_kernel(torch.bfloat16)
        with torch.inference_mode():
            grouped = model(input_ids=ids, attention_mask=mask).logits
            assert [n for n in repeated if n > 1] == []
            assert calls == [(4, 2, 5)] * 3  # each layer's 2 key heads to the kernel as they are
            sdpa_attention.use_gqa_in_sdpa = stock  # transformers' own choice: repeat the heads
            copied = model(input_ids=ids, attention_mask=mask).logits
            assert [n for n in repeated if n > 1]
            assert calls[3:] == [(4, 4, 5)] * 3  # repeated, still on the kernel
        assert torch.equal(grouped, copied)
        attention.install(native_kernel()[0])
        assert sdpa_attention.use_gqa_in_sdpa is not stock
    finally:
        kernels.uninstall()
    assert sdpa_attention.use_gqa_in_sdpa is stock
