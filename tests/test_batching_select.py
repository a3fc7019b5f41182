"""Which engine the batching worker uses per model, and the serial engine for adapters with their
own generate function (ChatGLM3-6B: tiny random-weight checkpoint built from its published files)."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.params import GenParams
from engine.select import build_engine, plan_for

GLM = "chatglm3-6b"
USER = 64795  # <|user|>


@pytest.fixture
def arena(chat_template_model, serve_config):
    """A config with the chat-template model (and, given lab_models, ChatGLM3-6B), set as CPU_ARENA_CONFIG."""
    def make(lab_models: dict | None = None):
        models = [{"name": "smol", "path": str(chat_template_model), "dtype": "float32"}]
        if lab_models is not None:
            models.append({"name": GLM, "path": str(lab_models[GLM]), "dtype": "float32", "trust_remote_code": True,
                           "implementation": "remote"})
        return serve_config(models)
    make()
    return make


def _load(path):
    from fastchat.model.model_adapter import load_model

    model, tok = load_model(str(path), device="cpu", num_gpus=1, dtype=torch.float32)
    return model.eval(), tok


def _run(engine, params: GenParams, timeout: float = 60):
    done, chunks = threading.Event(), []

    def sink(c):
        chunks.append(c)
        if c.finish_reason or c.error:
            done.set()

    engine.submit(params, sink)
    assert done.wait(timeout)
    return chunks


def test_chatglm3_is_served_by_its_own_generate_function(lab_models, arena):
    """Served one request at a time by ChatGLM3's own function, which stops on <|user|>: the output row of the
    k-th greedy token is swapped with <|user|>'s, so the model emits <|user|> there and the answer ends."""
    from fastchat.model.model_adapter import get_conversation_template

    from worker_adapters.chatglm3 import _clean, build_input_ids, generate_stream_chatglm3

    arena(lab_models)
    model, tok = _load(lab_models[GLM])
    plan = plan_for(model, str(lab_models[GLM]))
    assert plan.kind == "serial" and plan.generate is generate_stream_chatglm3
    conv = get_conversation_template(GLM)
    conv.append_message(conv.roles[0], "你好")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    ids = build_input_ids(tok, prompt)
    first: list[int] = []
    with torch.inference_mode():  # greedy over the whole sequence each step, no cache
        for _ in range(6):
            first.append(int(torch.argmax(model(torch.tensor([ids + first])).logits[0, -1].float())))
    k = next(i for i, t in enumerate(first) if t not in first[:i] and i >= 2)
    head = model.transformer.output_layer.weight
    rows = torch.tensor([first[k], USER])
    head.data[rows] = head.data[rows].flip(0)  # this model is loaded for this test only
    engine = build_engine(plan, model, tok, max_batch=8, context_len=8192).start()
    try:
        params = GenParams.from_fastchat({"prompt": prompt, "temperature": 0, "max_new_tokens": 32, "echo": False},
                                         tok.eos_token_id, plan.stop_ids)
        chunks = _run(engine, params)
        assert chunks[-1].finish_reason == "stop" and chunks[-1].error is None
        assert chunks[-1].completion_tokens == k and chunks[-1].text == _clean(tok.decode(first[:k]))
        assert all("<|user|>" not in c.text for c in chunks)
        assert engine.load() == 0
    finally:
        engine.shutdown()


def test_chat_template_model_is_batched_with_the_adapters_stop_ids(chat_template_model, arena):
    model, tok = _load(chat_template_model)
    plan = plan_for(model, str(chat_template_model))
    assert plan.kind == "batching"
    assert 2 in plan.stop_ids  # <|im_end|>, from generation_config and the template
    # A direct /worker_generate call that sends no stop ids still stops on the model's own.
    params = GenParams.from_fastchat({"prompt": "hi", "stop_token_ids": []}, None, plan.stop_ids)
    assert set(plan.stop_ids) <= params.stop_token_ids


def test_serial_engine_equals_batching_engine_on_plain_generate_stream(chat_template_model, arena):
    """The serial path is FastChat's own loop: for a plain model it must agree with the batch engine."""
    from fastchat.serve.inference import generate_stream

    from engine.select import EnginePlan

    model, tok = _load(chat_template_model)
    prompt = "<|im_start|>user\nhello paris<|im_end|>\n<|im_start|>assistant\n"
    raw = {"prompt": prompt, "temperature": 0, "max_new_tokens": 12, "echo": False, "stop_token_ids": []}
    texts = []
    for plan in (EnginePlan("serial", generate_stream), EnginePlan("batching", generate_stream)):
        engine = build_engine(plan, model, tok, max_batch=4, context_len=512).start()
        try:
            texts.append(_run(engine, GenParams.from_fastchat(raw, tok.eos_token_id))[-1])
        finally:
            engine.shutdown()
    serial, batched = texts
    assert serial.text.strip() == batched.text.strip() and serial.text.strip()
    assert serial.finish_reason == batched.finish_reason == "length"
    # (FastChat's generate_stream counts max_new_tokens - 1 on a length stop; the batch engine counts them all.)
    assert batched.completion_tokens == 12


@pytest.mark.parametrize("kind", ["serial", "batching"])
def test_both_engines_send_text_every_stream_interval_tokens(chat_template_model, arena, kind):
    """`--stream-interval N` (FastChat's worker option, default 2): text goes out at the first token, then every N
    tokens, then at the end; the final text is the same whatever N."""
    from fastchat.serve.inference import generate_stream

    from engine.select import EnginePlan

    model, tok = _load(chat_template_model)
    prompt = "<|im_start|>user\nhello paris<|im_end|>\n<|im_start|>assistant\n"
    raw = {"prompt": prompt, "temperature": 0, "max_new_tokens": 12, "echo": False, "stop_token_ids": []}
    runs = {}
    for interval in (1, 3):
        engine = build_engine(EnginePlan(kind, generate_stream), model, tok, max_batch=4, context_len=512,
                              stream_interval=interval).start()
        try:
            runs[interval] = _run(engine, GenParams.from_fastchat(raw, tok.eos_token_id))
        finally:
            engine.shutdown()
    every, third = runs[1], runs[3]
    assert third[-1].text == every[-1].text and third[-1].finish_reason == every[-1].finish_reason == "length"
    sent = [c.completion_tokens for c in third]
    assert len(third) < len(every), (sent, [c.completion_tokens for c in every])
    if kind == "batching":
        # Until some text has gone out every change goes out (this model's first tokens decode to nothing
        # visible); after that only tokens 1, 4, 7, ... and the last.
        first_text = next(i for i, c in enumerate(third) if c.text)
        assert all((n - 1) % 3 == 0 for n in sent[first_text + 1:-1]) and sent[-1] == 12, sent
        assert len(sent) - first_text <= 5, sent



def test_the_engine_probe_runs_no_compute_on_the_callers_thread():
    """The worker decides its engine on its main thread; a forward there would leave an OpenMP pool on that
    long-lived thread, which throttles every later decode step (engine/thread.py)."""
    import functools
    import threading

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.select import batching_refusal

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=100)).eval()
    seen = []
    original = model.forward

    @functools.wraps(original)  # the probe reads the signature first
    def forward(*args, **kwargs):
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    model.forward = forward
    assert batching_refusal(model) == ""
    assert seen and threading.current_thread() not in seen
    assert torch.get_num_threads() >= 1
