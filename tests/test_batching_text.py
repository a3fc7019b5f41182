"""Incremental detokenization, stop strings and FastChat parameter parsing (SmolLM2's tokenizer where a test
takes `tokenizer`, marked `models`; no model weights)."""

from __future__ import annotations

import pytest

from engine.params import GenParams
from engine.text import IncrementalText, StopText, find_stop, partial_stop_len


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.models
@pytest.mark.parametrize("text", ["Hello, world! It's 42.", "明明喜欢白色。你好，世界！", "naïve café — ok\n  x"])
def test_incremental_text_equals_full_decode_and_never_streams_fffd(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    inc = IncrementalText(tokenizer, prompt)
    deltas = [inc.add(t) for t in ids] + [inc.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == inc.text == text


def test_stop_text_cuts_and_holds_back_partial_stop():
    st = StopText(("<|im_end|>", "STOP"))
    st.extend("hello <|im")
    assert st.visible() == "hello "  # "<|im" could still become "<|im_end|>"
    st.extend("_en")
    assert st.visible() == "hello "
    st.extend("d|> more")
    assert st.stopped and st.visible() == "hello "
    st2 = StopText(("STOP",))
    st2.extend("ST")
    st2.extend("ay")
    assert not st2.stopped and st2.visible() == "STay"


def test_find_and_partial_stop():
    assert find_stop("abc STOP x END", ("END", "STOP")) == 4
    assert find_stop("abc", ("x",)) == -1
    assert partial_stop_len("foo <|im_e", ("<|im_end|>",)) == 6
    assert partial_stop_len("foo", ("<|im_end|>",)) == 0


def test_gen_params_from_fastchat_defaults_and_eos():
    p = GenParams.from_fastchat({"prompt": "x", "temperature": 0, "top_k": None, "max_new_tokens": 7,
                                 "stop": "###", "stop_token_ids": [5], "echo": False}, eos_token_id=2)
    assert p.greedy and p.top_k == -1 and p.max_new_tokens == 7 and not p.echo
    assert p.stop == ("###",) and p.stop_token_ids == frozenset({2, 5})
    assert GenParams.from_fastchat({"prompt": "x"}, None).echo  # FastChat's worker default


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it decodes."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def test_greedy_choice_is_torchs_bf16_argmax_first_maximum_included():
    import torch

    from engine.params import choose_token, greedy_tokens

    torch.manual_seed(0)
    logits = torch.randn(5, 151936).to(torch.bfloat16)
    logits[2, 7] = logits[2, 99] = logits[2].max() + 1  # equal maxima: the first one wins, as in torch
    want = logits.argmax(dim=-1).tolist()
    assert want[2] == 7
    assert greedy_tokens(logits) == want
    p = GenParams.from_fastchat({"prompt": "x", "temperature": 0}, None)
    assert [choose_token(row, p, []) for row in logits] == want


@pytest.mark.models
def test_streaming_text_costs_constant_decode_work_per_token(tokenizer):
    """FastChat's worker re-decodes the whole output every stream_interval tokens (quadratic in the
    answer's length, the per-token cost grows as it goes). Here each token decodes a few ids."""
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) >= 300
    counting = CountingTokenizer(tokenizer)
    inc = IncrementalText(counting, tokenizer("Say:").input_ids)
    for t in ids:
        inc.add(t)
    assert inc.text + inc.flush() == text
    # A full re-decode per token would be ~len(ids)**2 / 2 ids (45,000 here).
    assert counting.decoded < 20 * len(ids)


def test_slow_reader_gets_the_newest_cumulative_chunk_not_every_one():
    import asyncio

    from engine.batching import Chunk
    from engine.worker import latest

    async def run():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(1, 6):
            q.put_nowait(Chunk("x" * i, 3, i))
        first = latest(Chunk("", 3, 0), q)
        q.put_nowait(Chunk("x" * 6, 3, 6, finish_reason="stop"))
        q.put_nowait(Chunk("never", 3, 6))  # nothing after a final chunk is merged into it
        return first, latest(await q.get(), q)

    first, final = asyncio.run(run())
    assert first.text == "xxxxx" and first.completion_tokens == 5  # four stale chunks skipped
    assert final.finish_reason == "stop" and final.text == "xxxxxx"


def test_one_step_of_chunks_wakes_the_event_loop_once():
    """A step's chunks for every row reach their own queues, in order, with one loop wake-up."""
    import asyncio
    import threading

    from engine.batching import Chunk
    from engine.worker import _Mailbox

    async def run():
        loop = asyncio.get_running_loop()
        box = _Mailbox(loop)
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            wakeups.append(cb)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        queues = [asyncio.Queue() for _ in range(4)]

        def engine_step():  # what the engine thread does at the end of one decode step
            for i, q in enumerate(queues):
                box.post(q, Chunk(f"row {i}", 1, 1))
                box.post(q, Chunk(f"row {i}!", 1, 2))

        t = threading.Thread(target=engine_step)
        t.start()
        t.join()
        got = [[(await q.get()).text, (await q.get()).text] for q in queues]
        return got, len(wakeups)

    got, wakeups = asyncio.run(run())
    assert got == [[f"row {i}", f"row {i}!"] for i in range(4)]
    assert wakeups == 1


@pytest.mark.models
def test_text_before_the_answer_is_dropped_once(tokenizer):
    """ChatGLM3 writes its (empty) metadata line's newline before the answer: cut once, never mid-answer."""
    prompt = tokenizer("Say:").input_ids
    answer = tokenizer("\nHello\nworld", add_special_tokens=False).input_ids
    inc = IncrementalText(tokenizer, prompt, "\n")
    streamed = "".join(inc.add(t) for t in answer) + inc.flush()
    assert streamed == inc.text == "Hello\nworld"
    plain = IncrementalText(tokenizer, prompt, "\n")
    text = "".join(plain.add(t) for t in tokenizer("Hi\nthere", add_special_tokens=False).input_ids) + plain.flush()
    assert text == "Hi\nthere"  # nothing to drop: untouched
