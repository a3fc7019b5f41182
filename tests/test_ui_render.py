"""The chat tabs without a stack: the per-answer line, anonymous rendering, and the battle's pair."""

from __future__ import annotations

import random

import pytest

from launch.ui import models
from launch.ui.battle import battle_pair
from launch.ui.stream import AnswerStats, add_question, new_session
from launch.ui.tabs import CURSOR, ChatTab, render


def _session(model: str = "smollm2-135m"):
    s = new_session(model)
    add_question(s, "你好")
    s.state.conv.update_last_message("你好！")
    s.stats.append(AnswerStats(model=model, dtype="float32", ttft_s=0.42, tokens_per_s=12.34,
                               completion_tokens=10, done=True))
    return s


def test_answer_line_shows_model_dtype_speed_ttft():
    msgs = render(_session())
    assert msgs[0] == {"role": "user", "content": "你好"}
    line = msgs[1]["content"]
    assert line.startswith("你好！")
    assert "smollm2-135m · float32" in line and "12.3 tok/s" in line and "TTFT 0.42 s" in line


def test_battle_hides_model_until_reveal():
    s = _session()
    s.label = "Model A"
    assert "smollm2-135m" not in render(s)[1]["content"] and "Model A" in render(s)[1]["content"]
    s.label = None
    assert "smollm2-135m" in render(s)[1]["content"]


def test_streaming_answer_has_cursor_and_no_speed_yet():
    s = new_session("smollm2-135m")
    add_question(s, "hi")
    s.stats.append(AnswerStats(model="smollm2-135m", dtype="bfloat16"))
    content = render(s)[1]["content"]
    assert CURSOR in content and "generating" in content and "tok/s" not in content
    assert s.state.conv.messages[-1][1] is None  # the cursor never enters the prompt


def test_battle_pair_is_two_different_served_models():
    rng = random.Random(0)
    names = ["smollm2-135m", "qwen2.5-coder-0.5b", "local-x"]  # none is in FastChat's weight table
    seen = set()
    for _ in range(300):
        a, b = battle_pair(names, rng)
        assert a != b and {a, b} <= set(names)
        seen.add((a, b))
    assert len(seen) == 6  # every ordered pair: both sides random
    assert battle_pair(["only"]) == ("only", "only")
    with pytest.raises(ValueError):
        battle_pair([])


def test_a_battle_pits_two_different_served_models_against_each_other(monkeypatch):
    served = ["smollm2-135m", "qwen2.5-coder-0.5b"]
    monkeypatch.setattr(models, "served_models", lambda: served)
    for _ in range(20):
        out = ChatTab("battle", 2).add_text(None, None, None, "", "", "Hello?")
        sessions = out[:2]
        assert sorted(s.model for s in sessions) == sorted(served)
        assert [s.label for s in sessions] == ["Model A", "Model B"]  # anonymous until the vote
        assert all(s.state.conv.messages[-2][1] == "Hello?" for s in sessions)
