"""LLM-as-judge over any OpenAI-compatible endpoint (MT-bench style).

- single: each answer graded 1-10 against the question's reference;
- pairwise: for each question and each pair of models, the judge sees both answers twice with
  the positions swapped; a model wins only if it wins in both orders (disagreement = tie), which
  cancels the judge's position bias as MT-bench does.
Prompts are data (evals/judge_prompts/*.yaml). A verdict the prompt's regex cannot find is
recorded as unparsed (verdict None, raw text kept); it is never guessed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
import yaml
from pydantic import BaseModel, ConfigDict

from evals.client import make_client
from evals.runner import parallel
from evals.schema import Answer, Question
from evals.store import JUDGMENTS, JsonlWriter, read_jsonl

PROMPTS_DIR = Path(__file__).resolve().parent / "judge_prompts"


class JudgePrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    system: str | None = None
    template: str
    verdict_regex: str
    min_score: float | None = None
    max_score: float | None = None


def load_prompt(kind: str, path: Path | None = None) -> JudgePrompt:
    return JudgePrompt(**yaml.safe_load((path or PROMPTS_DIR / f"{kind}.yaml").read_text(encoding="utf-8")))


@dataclass
class Judgment:
    """One judge call: a line of judgments.jsonl."""

    kind: str  # "single" | "pairwise"
    judge_model: str
    prompt: str
    question_id: str
    repeat: int
    model: str | None = None  # single
    model_a: str | None = None  # pairwise: as shown to the judge, position A
    model_b: str | None = None
    verdict: str | None = None  # single: the score as text; pairwise: "A" | "B" | "C"; None = unparsed
    score: float | None = None  # single only
    winner: str | None = None  # pairwise: a model name or "tie"
    raw: str = ""
    error: str | None = None

    @property
    def key(self) -> tuple:
        return (self.kind, self.judge_model, self.prompt, self.question_id, self.repeat, self.model,
                self.model_a, self.model_b)

    @classmethod
    def from_dict(cls, d: dict) -> Judgment:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def parse_verdict(prompt: JudgePrompt, text: str) -> str | None:
    found = re.findall(prompt.verdict_regex, text)
    return found[-1] if found else None  # the last one: judges often restate the format first


def _ask(client: openai.OpenAI, model: str, prompt: JudgePrompt, user: str, max_tokens: int) -> tuple[str, str | None]:
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
        {"role": "user", "content": user}
    ]
    try:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0.0, max_tokens=max_tokens)
        return r.choices[0].message.content or "", None
    except Exception as e:  # noqa: BLE001 - a failed judge call is recorded like a failed answer
        return "", f"{type(e).__name__}: {e}"


def judge_single(client, judge_model: str, prompt: JudgePrompt, q: Question, a: Answer, max_tokens: int) -> Judgment:
    user = prompt.template.format(question=q.question, reference=q.reference or "(none)", answer=a.text)
    raw, err = _ask(client, judge_model, prompt, user, max_tokens)
    j = Judgment("single", judge_model, prompt.name, q.id, a.repeat, model=a.model, raw=raw, error=err)
    v = parse_verdict(prompt, raw) if err is None else None
    if v is not None:
        score = float(v)
        lo, hi = prompt.min_score, prompt.max_score
        if (lo is None or score >= lo) and (hi is None or score <= hi):
            j.verdict, j.score = v, score
    return j


def judge_pair(client, judge_model: str, prompt: JudgePrompt, q: Question, a: Answer, b: Answer,
               max_tokens: int) -> Judgment:
    user = prompt.template.format(
        question=q.question, reference=q.reference or "(none)", answer_a=a.text, answer_b=b.text
    )
    raw, err = _ask(client, judge_model, prompt, user, max_tokens)
    j = Judgment("pairwise", judge_model, prompt.name, q.id, a.repeat, model_a=a.model, model_b=b.model,
                 raw=raw, error=err)
    v = parse_verdict(prompt, raw) if err is None else None
    if v is not None:
        j.verdict = v
        j.winner = {"A": a.model, "B": b.model, "C": "tie"}[v]
    return j


def run_judge(
    run_dir: Path,
    answers: list[Answer],
    questions: dict[str, Question],
    *,
    judge_model: str,
    base_url: str,
    api_key: str | None,
    kinds: tuple[str, ...] = ("single", "pairwise"),
    concurrency: int = 1,
    max_tokens: int = 512,
    timeout: float = 900.0,
    prompts_dir: Path | None = None,
) -> int:
    """Judge every successful answer (and every pair); resumable: judgments already made are skipped."""
    client = make_client(base_url, api_key, timeout)
    pdir = prompts_dir or PROMPTS_DIR
    done = {Judgment.from_dict(d).key for d in read_jsonl(run_dir / JUDGMENTS) if d.get("verdict") is not None}
    ok = [a for a in answers if a.ok and a.question_id in questions]
    tasks = []
    if "single" in kinds:
        p = load_prompt("single", pdir / "single.yaml")
        for a in ok:
            j = Judgment("single", judge_model, p.name, a.question_id, a.repeat, model=a.model)
            if j.key not in done:
                tasks.append(lambda a=a, p=p: judge_single(client, judge_model, p, questions[a.question_id], a, max_tokens))
    if "pairwise" in kinds:
        p = load_prompt("pairwise", pdir / "pairwise.yaml")
        by_q: dict[tuple, dict[str, Answer]] = {}
        for a in ok:
            by_q.setdefault((a.question_id, a.repeat), {})[a.model] = a
        for (qid, _rep), per_model in sorted(by_q.items()):
            for m1, m2 in itertools.combinations(sorted(per_model), 2):
                for x, y in ((m1, m2), (m2, m1)):  # both positions
                    ax, ay = per_model[x], per_model[y]
                    j = Judgment("pairwise", judge_model, p.name, qid, ax.repeat, model_a=x, model_b=y)
                    if j.key not in done:
                        tasks.append(lambda ax=ax, ay=ay, p=p, qid=qid: judge_pair(
                            client, judge_model, p, questions[qid], ax, ay, max_tokens))
    n = 0
    with JsonlWriter(run_dir / JUDGMENTS) as w:
        for j in parallel(tasks, lambda t: t(), concurrency):
            w.write(asdict(j))
            n += 1
    return n


def read_judgments(run_dir: Path) -> list[Judgment]:
    latest: dict[tuple, Judgment] = {}
    for d in read_jsonl(run_dir / JUDGMENTS):
        j = Judgment.from_dict(d)
        latest[j.key] = j
    return list(latest.values())


@dataclass(frozen=True)
class PairOutcome:
    question_id: str
    repeat: int
    model_1: str
    model_2: str
    outcome: str  # model_1 | model_2 | "tie" | "inconsistent" (orders disagree -> counted as tie) | "unparsed"


def pair_outcomes(judgments: list[Judgment]) -> list[PairOutcome]:
    """Combine the two orders of each pair into one outcome (MT-bench: disagreement is a tie)."""
    groups: dict[tuple, dict[tuple[str, str], Judgment]] = {}
    for j in judgments:
        if j.kind != "pairwise":
            continue
        pair = tuple(sorted((j.model_a, j.model_b)))
        groups.setdefault((j.judge_model, j.question_id, j.repeat, pair), {})[(j.model_a, j.model_b)] = j
    out = []
    for (_judge, qid, rep, (m1, m2)), orders in sorted(groups.items()):
        ab, ba = orders.get((m1, m2)), orders.get((m2, m1))
        if ab is None or ba is None or ab.winner is None or ba.winner is None:
            outcome = "unparsed"
        elif ab.winner == ba.winner:
            outcome = ab.winner
        else:
            outcome = "inconsistent"
        out.append(PairOutcome(qid, rep, m1, m2, outcome))
    return out
