"""Keypoint matching: crude, automatic, reproducible. A plain keypoint is a case-insensitive
substring; a {regex: ...} keypoint is searched with re.IGNORECASE | re.MULTILINE."""

from __future__ import annotations

import re
from dataclasses import dataclass

from evals.schema import Answer, Question, RegexKeypoint


@dataclass(frozen=True)
class KeypointScore:
    model: str
    question_id: str
    repeat: int
    matched: tuple[str, ...]
    missed: tuple[str, ...]

    @property
    def score(self) -> float:
        n = len(self.matched) + len(self.missed)
        return len(self.matched) / n if n else float("nan")


def keypoint_label(kp: str | RegexKeypoint) -> str:
    return f"/{kp.regex}/" if isinstance(kp, RegexKeypoint) else kp


def matches(kp: str | RegexKeypoint, text: str) -> bool:
    if isinstance(kp, RegexKeypoint):
        return re.search(kp.regex, text.strip(), re.IGNORECASE | re.MULTILINE) is not None
    return kp.casefold() in text.casefold()


def score_answer(answer: Answer, question: Question) -> KeypointScore | None:
    """None when the question has no keypoints or the answer is an error (not a zero: unknown)."""
    if not question.keypoints or not answer.ok:
        return None
    hit, miss = [], []
    for kp in question.keypoints:
        (hit if matches(kp, answer.text) else miss).append(keypoint_label(kp))
    return KeypointScore(answer.model, answer.question_id, answer.repeat, tuple(hit), tuple(miss))


def score_all(answers: list[Answer], questions: dict[str, Question]) -> list[KeypointScore]:
    out = []
    for a in answers:
        q = questions.get(a.question_id)
        s = score_answer(a, q) if q else None
        if s is not None:
            out.append(s)
    return out
