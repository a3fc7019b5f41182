"""The evals runner and judge against the real stack (embedded models), on a 2-question subset."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from evals import cli, judge, store
from evals.schema import load_questions
from launch.state import read_state
from tests.stackutil import default_models, free_ports_config, stack_for

pytestmark = pytest.mark.stack

SUBSET = ("lab-4", "fact-en-1")
DEFAULT_MODELS = {m["name"] for m in default_models()}


def _subset_file(tmp: Path) -> Path:
    p = tmp / "subset.jsonl"
    qs = [q for q in load_questions() if q.id in SUBSET]
    p.write_text("".join(json.dumps(q.model_dump(mode="json"), ensure_ascii=False) + "\n" for q in qs))
    return p


@pytest.fixture(scope="module")
def real_run(stack, tmp_path_factory) -> Path:
    """One run of the subset against both default models, made in two steps (1 question, then both):
    the second step must resume, asking only what is missing."""
    tmp = tmp_path_factory.mktemp("evals-stack")
    qfile, out = _subset_file(tmp), tmp / "run"
    base = ["run", "--base-url", stack.api_url, "--questions", str(qfile), "--out", str(out), "--max-tokens", "32"]
    assert cli.main([*base, "--limit", "1"]) == 0
    assert len(store.read_jsonl(out / store.ANSWERS)) == len(DEFAULT_MODELS)
    assert cli.main(base) == 0
    return out


def test_both_default_models_answer_over_the_api(real_run):
    lines = store.read_jsonl(real_run / store.ANSWERS)
    assert len(lines) == 2 * len(DEFAULT_MODELS)  # the resumed step did not redo the first question
    answers = store.read_answers(real_run)
    assert {a.model for a in answers} == DEFAULT_MODELS
    for a in answers:
        assert a.ok, a.error
        assert a.text.strip() and a.finish_reason in ("stop", "length")
        # FastChat sends no usage when streaming: counted by the worker's tokenizer
        assert a.tokens_source == "tokenizer" and 0 < a.output_tokens <= 40
        assert 0 < a.ttft_s <= a.total_s
    assert cli.main(["report", str(real_run)]) == 0
    md = (real_run / "report.md").read_text()
    for m in DEFAULT_MODELS:
        assert f"| {m} |" in md


def test_judge_path_records_every_verdict_or_its_absence(real_run, stack):
    model = "smollm2-135m"
    assert cli.main(["judge", str(real_run), "--judge-model", model, "--judge-base-url", stack.api_url,
                     "--judge-max-tokens", "32"]) == 0
    js = judge.read_judgments(real_run)
    singles = [j for j in js if j.kind == "single"]
    pairs = [j for j in js if j.kind == "pairwise"]
    assert len(singles) == 2 * len(DEFAULT_MODELS)
    assert len(pairs) == 2 * 2  # 2 questions x 1 pair x 2 orders
    for j in js:
        assert j.error is None and j.raw.strip() and j.judge_model == model
        # parsed or not, nothing is invented: a verdict exists only where the prompt's regex finds one
        found = judge.parse_verdict(judge.load_prompt(j.kind), j.raw)
        if j.verdict is None:
            assert j.score is None and j.winner is None
        else:
            assert j.verdict == found
    assert cli.main(["report", str(real_run)]) == 0
    assert "LLM judge ⓙ" in (real_run / "report.md").read_text()


def test_a_killed_model_is_recorded_as_errors(tmp_path):
    """Own one-model stack (the shared one stays intact); restarts pushed far out so the worker stays dead."""
    cfg = free_ports_config(tmp_path, models=default_models(["smollm2-135m"]),
                            restart_backoff_initial=600, restart_backoff_max=600)
    st = stack_for(cfg)
    st.up()
    try:
        state = read_state(st.run_dir)
        (worker,) = [s for s in state.services.values() if s.model == "smollm2-135m"]
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        out = tmp_path / "run"
        t0 = time.monotonic()
        rc = cli.main(["run", "--base-url", st.api_url, "--questions", str(_subset_file(tmp_path)),
                       "--out", str(out), "--models", "smollm2-135m", "--max-tokens", "32", "--timeout", "60"])
        assert rc == 0 and time.monotonic() - t0 < 120
        answers = store.read_answers(out)
        assert len(answers) == 2 and all(a.error for a in answers), answers
    finally:
        st.down()
