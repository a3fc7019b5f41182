"""Send every question to every model, record each answer as it arrives, resume what is left."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from evals import client as client_mod
from evals.schema import Answer, Question, RunSettings
from evals.store import ANSWERS, JsonlWriter, read_answers


@dataclass(frozen=True)
class Job:
    model: str
    question: Question
    repeat: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.question.id, self.repeat)


def plan(models: list[str], questions: list[Question], repeats: int, done: set[tuple]) -> list[Job]:
    # Question-major: after an interruption every model has answered the same questions,
    # so a partial run still compares like with like.
    jobs = [Job(m, q, r) for r in range(repeats) for q in questions for m in models]
    return [j for j in jobs if j.key not in done]


class Progress:
    """tqdm on stderr when available (it is in the lock via transformers), else plain lines."""

    def __init__(self, total: int, initial: int):
        self.total, self.n = total, initial
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="answer", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            self._bar = None

    def update(self, ans: Answer) -> None:
        self.n += 1
        status = "ERROR" if ans.error else f"{ans.total_s or 0:.1f}s"
        if self._bar is not None:
            self._bar.set_postfix_str(f"{ans.model} {ans.question_id} {status}", refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {ans.model} {ans.question_id} {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


AskFn = Callable[[Job], Answer]


T = TypeVar("T")
R = TypeVar("R")


def parallel(items: list[T], fn: Callable[[T], R], concurrency: int) -> Iterator[R]:
    """Yield fn(item) for every item as each finishes, at most `concurrency` at a time.

    Workers are daemon threads so Ctrl-C ends the process at once (a ThreadPoolExecutor would
    be joined at exit, waiting minutes for in-flight CPU generations). fn must not raise.
    """
    todo: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    for item in items:
        todo.put(item)
    n_workers = max(1, min(concurrency, len(items)))
    for _ in range(n_workers):
        todo.put(_STOP)

    def worker() -> None:
        while (item := todo.get()) is not _STOP:
            results.put(fn(item))

    for i in range(n_workers):
        threading.Thread(target=worker, name=f"evals-worker-{i}", daemon=True).start()
    for _ in items:
        yield results.get()


_STOP = object()


def run_jobs(jobs: Iterable[Job], ask: AskFn, writer: JsonlWriter, concurrency: int, progress: Progress) -> int:
    """Each answer is written (fsynced) as soon as it exists: an interrupted run loses only
    the answers in flight, which a resumed run redoes."""
    written = 0
    for ans in parallel(list(jobs), lambda job: _safe_ask(ask, job), concurrency):
        writer.write(ans.to_json())
        written += 1
        progress.update(ans)
    return written


def _safe_ask(ask: AskFn, job: Job) -> Answer:
    try:
        return ask(job)
    except Exception as e:  # noqa: BLE001 - a bug in one call must not end the run
        return Answer(model=job.model, question_id=job.question.id, repeat=job.repeat, error=f"{type(e).__name__}: {e}")


def execute(
    run_dir: Path, settings: RunSettings, questions: list[Question], api_key: str | None, timeout: float
) -> tuple[int, int]:
    """Run (or resume) a run; returns (answers written now, answers already done before)."""
    done = {a.key for a in read_answers(run_dir) if a.ok}
    jobs = plan(settings.models, questions, settings.repeats, done)
    total = len(settings.models) * len(questions) * settings.repeats
    client = client_mod.make_client(settings.base_url, api_key, timeout)
    counter = client_mod.TokenCounter(settings.base_url, api_key)

    def ask(job: Job) -> Answer:
        return client_mod.stream_answer(
            client, job.model, job.question.id, job.question.question, repeat=job.repeat,
            temperature=settings.temperature, max_tokens=settings.max_tokens, system=settings.system,
            counter=counter,
        )

    progress = Progress(total, total - len(jobs))
    try:
        with JsonlWriter(run_dir / ANSWERS) as writer:
            written = run_jobs(jobs, ask, writer, settings.concurrency, progress)
    finally:
        progress.close()
    return written, total - len(jobs)
