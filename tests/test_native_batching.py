"""ChatGLM3-6B and Qwen-7B-Chat served natively on the continuous-batching engine with the project's kernels
(tiny random-weight checkpoints from the published files): batched equals single at temperature 0 in fp32 and
bf16, a chat's next turn starts from the prefix cache with the same answer, and the models' own stop ids end
an answer."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from fastchat.model import model_adapter as ma

from engine import kernels
from engine.batching import BatchEngine
from engine.params import GenParams
from engine.prefix_cache import PrefixCache
from engine.select import plan_for
from tests.fixtures.seed_models import GLM, QWEN, chat
from worker_adapters.chatglm3 import ChatGLM3Adapter
from worker_adapters.qwen import QwenChatAdapter

# Whole models on the engine, in two dtypes: seconds each, so out of `make test-fast`.
pytestmark = pytest.mark.slow
ADAPTERS = {GLM: ChatGLM3Adapter, QWEN: QwenChatAdapter}
QUESTIONS = ["小明的妈妈有三个孩子，老大叫大毛，老二叫二毛，老三叫什么？", "What is the capital of France?",
             "请用Python写一个快速排序。", "Say hi.<|im_end|><|user|> twice"]
N = 16


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def served(request, lab_models):
    """name -> (model, tokenizer, plan), loaded natively as the worker does, on the kernels; one dtype per round."""
    from launch.fastchat_patches import adapter_dispatch
    from tests.fixtures.checkpoints import serve_from, write_arena_config

    dtype = request.param
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        cfg = write_arena_config(lab_models[GLM].parent.parent / f"native-{dtype}.toml", [
            {"name": n, "path": str(p), "dtype": dtype} for n, p in lab_models.items()])
        serve_from(mp, cfg)
        for name, path in lab_models.items():
            model, tok = ADAPTERS[name]().load_model(str(path), {})
            replaced = kernels.install(model)
            assert replaced > 0, "the native model's linears must be on the kernels"
            out[name] = (model, tok, plan_for(model, str(path)), path)
    yield out
    adapter_dispatch.clear_caches()
    kernels.uninstall()


def _prompt(name: str, question: str, history: tuple = ()) -> str:
    return chat(ma.get_conversation_template(name), question, history).get_prompt()


def _engine(model, tok, plan, **kw) -> BatchEngine:
    return BatchEngine(model, tok, max_batch=4, context_len=2048, drop_leading=plan.drop_leading, **kw).start()


def _submit(engine: BatchEngine, plan, prompt: str):
    done, chunks = threading.Event(), []

    def sink(c):
        chunks.append(c)
        if c.finish_reason or c.error:
            done.set()

    params = GenParams.from_fastchat({"prompt": prompt, "temperature": 0, "max_new_tokens": N, "echo": False},
                                     engine.tokenizer.eos_token_id, plan.stop_ids)
    return engine.submit(params, sink), done, chunks


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_batched_greedy_equals_single(name, served, serve_lab_config):
    model, tok, plan, _ = served[name]
    assert plan.kind == "batching", plan.describe()
    prompts = [_prompt(name, q) for q in QUESTIONS]
    engine = _engine(model, tok, plan)
    try:
        singles = []
        for p in prompts:
            req, done, chunks = _submit(engine, plan, p)
            assert done.wait(120) and chunks[-1].error is None, chunks[-1].error
            singles.append((list(req.output_ids), chunks[-1].text))
        steps = engine.steps
        running = []
        for i, p in enumerate(prompts):  # staggered: later requests join a batch already decoding
            running.append(_submit(engine, plan, p))
            time.sleep(0.02 * i)
        for (req, done, chunks), (ids, text) in zip(running, singles, strict=True):
            assert done.wait(120) and chunks[-1].error is None
            assert req.output_ids == ids and chunks[-1].text == text
        assert engine.steps - steps < sum(len(ids) for ids, _ in singles)  # really batched
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_the_next_turn_starts_from_the_prefix_cache_with_the_same_answer(name, served, serve_lab_config):
    model, tok, plan, _ = served[name]
    first = _prompt(name, QUESTIONS[0])
    plain = _engine(model, tok, plan)
    try:
        req, done, chunks = _submit(plain, plan, first)
        assert done.wait(120)
        answer = chunks[-1].text
        second = _prompt(name, "为什么？", ((QUESTIONS[0], answer),))
        req, done, chunks = _submit(plain, plan, second)
        assert done.wait(120)
        expected = list(req.output_ids)
    finally:
        plain.shutdown()
    cache = PrefixCache(64 * 2**20, min_tokens=4)
    cached = _engine(model, tok, plan, prefix_cache=cache)
    try:
        for prompt in (first, second):
            req, done, chunks = _submit(cached, plan, prompt)
            assert done.wait(120) and chunks[-1].error is None
        assert cache.hits >= 1, "the second turn should begin with the first's kept keys and values"
        assert list(req.output_ids) == expected
    finally:
        cached.shutdown()


@pytest.mark.parametrize("name", [GLM, QWEN])
def test_the_models_own_stop_ids_end_an_answer(name, served, serve_lab_config):
    """In a second copy of the model, the k-th greedy token's output row is swapped with an end-of-turn token's
    (<|user|>; <|im_end|>) before it goes on the kernels: the answer must end right there, without the marker."""
    model, tok, plan, path = served[name]
    prompt = _prompt(name, QUESTIONS[1])
    engine = _engine(model, tok, plan)
    try:
        req, done, _ = _submit(engine, plan, prompt)
        assert done.wait(120)
        first = list(req.output_ids)
    finally:
        engine.shutdown()
    k = next(i for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    stop = 64795 if name == GLM else 151645
    assert stop in plan.stop_ids
    swapped, _ = ADAPTERS[name]().load_model(str(path), {})
    weight = swapped.get_output_embeddings().weight
    rows = torch.tensor([first[k], stop])
    weight.data[rows] = weight.data[rows].flip(0)
    kernels.install(swapped)
    engine = _engine(swapped, tok, plan)
    try:
        req, done, chunks = _submit(engine, plan, prompt)
        assert done.wait(120)
        assert chunks[-1].finish_reason == "stop" and list(req.output_ids) == first[:k]
        assert "<|user|>" not in chunks[-1].text and "<|im_end|>" not in chunks[-1].text
    finally:
        engine.shutdown()


@pytest.fixture
def serve_lab_config(lab_models, serve_config, served):
    """Conversation templates by name (chatglm3-6b, qwen-7b-chat) resolve through a config naming both."""
    dtype = str(next(iter(served.values()))[0].dtype).removeprefix("torch.")
    serve_config([{"name": n, "path": str(p), "dtype": dtype} for n, p in lab_models.items()])
