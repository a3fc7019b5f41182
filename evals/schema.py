"""The data at the boundaries: questions (input files) and answer records (the run's JSONL).

Questions are data (YAML or JSONL, one record per question), like lm-evaluation-harness tasks;
everything else in evals/ is code that runs them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

QUESTIONS_DIR = Path(__file__).resolve().parent / "questions"


class RegexKeypoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)  # a broken pattern fails when the file loads, not mid-scoring
        except re.error as e:
            raise ValueError(f"bad regex {v!r}: {e}") from None
        return v


# A plain string matches as a case-insensitive substring; {regex: ...} as a Python regex.
Keypoint = str | RegexKeypoint


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    category: str = Field(min_length=1)
    question: str = Field(min_length=1)
    reference: str | None = None
    keypoints: tuple[Keypoint, ...] = ()


_QUESTIONS = TypeAdapter(list[Question])


class QuestionFileError(ValueError):
    pass


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QuestionFileError(f"{path}:{n}: not valid JSON: {e}") from None
        return out
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or []
        if not isinstance(data, list):
            raise QuestionFileError(f"{path}: expected a list of question records")
        return data
    raise QuestionFileError(f"{path}: unknown question file type (use .jsonl, .yaml or .yml)")


def load_questions(paths: list[Path] | None = None) -> list[Question]:
    """Load question files (default: every file shipped in evals/questions/, in name order)."""
    if not paths:
        paths = sorted(p for p in QUESTIONS_DIR.iterdir() if p.suffix in (".jsonl", ".yaml", ".yml"))
    questions: list[Question] = []
    for path in paths:
        try:
            questions += _QUESTIONS.validate_python(_read_records(Path(path)))
        except FileNotFoundError:
            raise QuestionFileError(f"question file not found: {path}") from None
        except ValueError as e:
            if isinstance(e, QuestionFileError):
                raise
            raise QuestionFileError(f"{path}: {e}") from None
    ids = [q.id for q in questions]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise QuestionFileError(f"question ids must be unique; repeated: {dup}")
    return questions


@dataclass
class Answer:
    """One model's answer to one question (one repeat): a line of the run's answers.jsonl."""

    model: str
    question_id: str
    repeat: int
    text: str = ""
    ttft_s: float | None = None  # time to first content token
    total_s: float | None = None
    output_tokens: int | None = None
    # "usage" (server sent it), "tokenizer" (counted by the worker's tokenizer) or None (unknown)
    tokens_source: str | None = None
    tokens_per_s: float | None = None  # output tokens / (total - ttft): decode speed
    finish_reason: str | None = None
    error: str | None = None
    started_at: float | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.question_id, self.repeat)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> Answer:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunSettings:
    """What a run asked for: stored in meta.json so a resumed run uses the same settings."""

    base_url: str
    models: list[str]
    questions_files: list[str]
    question_ids: list[str]
    temperature: float
    max_tokens: int
    system: str | None
    repeats: int
    concurrency: int
    config: str | None = None
    extra: dict = field(default_factory=dict)
