"""Per-answer line and anonymous rendering of the chat tabs (no stack needed)."""

from __future__ import annotations

from launch.ui.stream import AnswerStats, add_question, new_session
from launch.ui.tabs import CURSOR, render


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
