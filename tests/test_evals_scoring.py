"""Questions, keypoint scoring, judge parsing, votes and the report, from recorded fixture results."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from evals import judge, report, scoring, store, votes
from evals.schema import Answer, Question, QuestionFileError, RegexKeypoint, load_questions

FIXTURE = Path(__file__).parent / "fixtures" / "evals" / "run_small"

LAB = [
    ("语言理解", "请说出以下两句话区别在哪里？ 1、冬天：能穿多少穿多少 2、夏天：能穿多少穿多少"),
    ("语义分析", "请说出以下两句话区别在哪里？单身狗产生的原因有两个，一是谁都看不上，二是谁都看不上"),
    ("逻辑推理", "他知道我知道你知道他不知道吗？这句话里，到底谁不知道"),
    ("文本解析", "明明明明明白白白喜欢他，可她就是不说。这句话里，明明和白白谁喜欢谁？"),
    ("语境理解", "领导：你这是什么意思？小明：没什么意思。意思意思。领导：你这就不够意思了。小明：小意思，小意思。"
                 "领导：你这人真有意思。小明：其实也没有别的意思。领导：那我就不好意思了。小明：是我不好意思。"
                 "请问：以上\"意思\"分别是什么意思。"),
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    dst = tmp_path / "run_small"
    shutil.copytree(FIXTURE, dst)
    return dst


# ---- shipped questions

def test_shipped_questions_include_the_lab_verbatim_and_enough_of_our_own():
    qs = load_questions()
    by_id = {q.id: q for q in qs}
    for i, (cat, text) in enumerate(LAB, 1):
        q = by_id[f"lab-{i}"]
        assert (q.category, q.question) == (cat, text)
        assert q.reference and q.keypoints
    own = [q for q in qs if not q.id.startswith("lab-")]
    assert len(own) >= 30
    assert len({q.category for q in own}) >= 5
    cjk = [q for q in own if re.search(r"[\u4e00-\u9fff]", q.question)]
    assert 10 <= len(cjk) <= len(own) - 10  # both languages, substantially


def test_every_reference_satisfies_its_own_keypoints():
    # Keypoints that reject the reference answer would score a perfect answer as wrong.
    for q in load_questions():
        if q.reference and q.keypoints:
            a = Answer(model="ref", question_id=q.id, repeat=0, text=q.reference)
            s = scoring.score_answer(a, q)
            assert s.missed == (), f"{q.id}: reference misses {s.missed}"


def test_question_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "category": "c", "question": "x"}\n{not json\n')
    with pytest.raises(QuestionFileError, match=r"q.jsonl:2"):
        load_questions([bad])
    dup = tmp_path / "d.yaml"
    dup.write_text("- {id: a, category: c, question: x}\n- {id: a, category: c, question: y}\n")
    with pytest.raises(QuestionFileError, match="repeated"):
        load_questions([dup])
    regex = tmp_path / "r.yaml"
    regex.write_text("- {id: a, category: c, question: x, keypoints: [{regex: '(unclosed'}]}\n")
    with pytest.raises(QuestionFileError, match="r.yaml"):
        load_questions([regex])
    extra = tmp_path / "e.jsonl"
    extra.write_text('{"id": "a", "category": "c", "question": "x", "answer": "typo"}\n')
    with pytest.raises(QuestionFileError, match="answer"):
        load_questions([extra])


# ---- keypoints

def test_keypoints_literal_is_case_insensitive_and_regex_is_a_regex():
    q = Question(id="q", category="c", question="?", keypoints=("Paris", RegexKeypoint(regex=r"^\W*YES\W*$")))
    s = scoring.score_answer(Answer("m", "q", 0, text="paris"), q)
    assert s.matched == ("Paris",) and s.missed == ("/^\\W*YES\\W*$/",) and s.score == 0.5
    s = scoring.score_answer(Answer("m", "q", 0, text="YES. PARIS"), q)
    assert s.score == 0.5  # the anchored regex rejects extra words
    assert scoring.score_answer(Answer("m", "q", 0, text=" YES\n"), Question(
        id="q", category="c", question="?", keypoints=(RegexKeypoint(regex=r"^\W*YES\W*$"),))).score == 1.0


def test_errors_and_questions_without_keypoints_are_not_scored():
    q = Question(id="q", category="c", question="?", keypoints=("x",))
    assert scoring.score_answer(Answer("m", "q", 0, text="x", error="boom"), q) is None
    assert scoring.score_answer(Answer("m", "q", 0, text="x"), Question(id="q", category="c", question="?")) is None


# ---- store

def test_store_keeps_last_record_per_key_and_skips_a_torn_line(run_dir):
    answers = store.read_answers(run_dir)
    # fixture: 7 complete lines (one torn), model-b fact-en-1 first failed, then answered
    assert len(answers) == 6
    b_fact = next(a for a in answers if a.key == ("model-b", "fact-en-1", 0))
    assert b_fact.ok and b_fact.text == "The capital is paris."


def test_resolve_run_latest_name_and_path(tmp_path, run_dir):
    root = tmp_path / "runs"
    for name, created in (("old", 1.0), ("new", 2.0)):
        (root / name).mkdir(parents=True)
        (root / name / store.META).write_text(json.dumps({"created_at": created}))
    assert store.resolve_run("latest", root) == root / "new"
    assert store.resolve_run("old", root) == root / "old"
    assert store.resolve_run(str(run_dir), root) == run_dir
    with pytest.raises(FileNotFoundError):
        store.resolve_run("latest", tmp_path / "none")


# ---- judge parsing and pairing

def test_judge_verdict_parsing_takes_the_last_match_and_records_unparsed():
    single = judge.load_prompt("single")
    assert judge.parse_verdict(single, 'Format: "[[5]]". My rating: [[8]]') == "8"
    assert judge.parse_verdict(single, "Rating: 8/10") is None
    pair = judge.load_prompt("pairwise")
    assert judge.parse_verdict(pair, "A is better. [[A]]") == "A"
    assert judge.parse_verdict(pair, "[[D]]") is None


def test_judge_prompts_fill_every_placeholder():
    single, pair = judge.load_prompt("single"), judge.load_prompt("pairwise")
    s = single.template.format(question="Q?", reference="R.", answer="ANS {not a field}")
    assert "Q?" in s and "R." in s and "ANS {not a field}" in s
    p = pair.template.format(question="Q?", reference="R.", answer_a="AAA", answer_b="BBB")
    assert p.index("AAA") < p.index("BBB")


def test_pairwise_needs_both_orders_to_agree(run_dir):
    outcomes = {o.question_id: o.outcome for o in judge.pair_outcomes(judge.read_judgments(run_dir))}
    assert outcomes == {"lab-4": "model-a", "fact-en-1": "inconsistent"}
    one_order = [j for j in judge.read_judgments(run_dir) if j.question_id == "lab-4" and j.model_a == "model-a"]
    assert [o.outcome for o in judge.pair_outcomes(one_order)] == ["unparsed"]


# ---- votes

def test_votes_are_counted_and_anonymous_names_come_from_states(run_dir):
    n, counts = votes.count_votes(votes.vote_log_paths(run_dir / "conversations"))
    assert n == 5
    c = {x.model: x for x in counts}
    assert (c["model-a"].wins, c["model-a"].losses, c["model-a"].ties, c["model-a"].both_bad) == (1, 2, 1, 1)
    assert (c["model-b"].wins, c["model-b"].losses) == (2, 1)


def test_votes_section_is_skipped_without_logs(tmp_path):
    assert votes.summarize(tmp_path / "no-such-dir") is None


def test_ratings_module_is_used_when_present(run_dir, monkeypatch):
    import sys
    import types

    seen = {}

    def ratings_from_vote_logs(paths):
        seen["paths"] = list(paths)
        return [{"model": "model-b", "rating": 1010.0, "ci_low": 990.0, "ci_high": 1030.0}]

    monkeypatch.setitem(sys.modules, "evals.ratings", types.SimpleNamespace(ratings_from_vote_logs=ratings_from_vote_logs))
    s = votes.summarize(run_dir / "conversations")
    assert [p.name for p in seen["paths"]] == ["2026-11-28-conv.json"]
    assert s.ratings == [{"model": "model-b", "rating": 1010.0, "ci_low": 990.0, "ci_high": 1030.0}]


# ---- report

def _row(d: report.ReportData, model: str) -> report.ModelRow:
    return next(r for r in d.rows if r.model == model)


def test_report_numbers_from_fixture(run_dir):
    d = report.collect(run_dir, run_dir / "conversations")
    a, b = _row(d, "model-a"), _row(d, "model-b")
    # model-a: lab-4 1/1, fact 1/1, math 1/2 (the anchored regex rejects "17 x 23 = 391")
    assert a.keypoint == pytest.approx((1 + 1 + 0.5) / 3)
    assert b.keypoint == pytest.approx(0.5)  # lab-4 wrong, fact right (retry superseded the error)
    assert (a.answers, a.errors, a.truncated, b.answers, b.errors) == (3, 0, 1, 3, 1)
    assert a.judge == pytest.approx(9.0) and (b.judge, b.judge_unparsed) == (2.0, 1)
    assert (a.pair_w, a.pair_t, a.pair_l, b.pair_w, b.pair_t, b.pair_l) == (1, 1, 0, 0, 1, 1)
    assert a.ttft == pytest.approx(0.38) and a.dtype == "float32"
    assert set(d.figures) == {"speed", "length", "style", "keypoints"}
    assert all(png.startswith(b"\x89PNG") for png in d.figures.values())


def test_report_files_markdown_and_self_contained_html(run_dir):
    md, htm = report.write_report(run_dir, run_dir / "conversations")
    text = md.read_text()
    assert "| model-a | float32 | 3 | 0 | 1 | 83% | 9.00/10 | 1/1/0 |" in text
    assert "| model-b | bfloat16 | 3 | 1 | 0 | 50% | 2.00/10 (1 unparsed) | 0/1/1 |" in text
    for label in ("keypoint score ⓚ", "LLM judge ⓙ", "Human votes (arena) ⓗ"):
        assert label in text
    assert "明明喜欢白白。" in text and "ERROR: APIConnectionError" in text
    for name in ("speed", "length", "style", "keypoints"):
        assert (run_dir / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in text
    page = htm.read_text()
    assert page.count("data:image/png;base64,") == 4
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:|//|figures/)""", page)
    assert "白白喜欢明明" in page and "model-b" in page and "&lt;" not in "".join(
        a.text for a in store.read_answers(run_dir))  # escaping is exercised below
    assert "raw vote counts only" in page or "Ratings" in page


def test_report_escapes_answer_html(run_dir):
    with open(run_dir / store.ANSWERS, "a") as f:
        f.write("\n" + Answer("model-a", "math-en-1", 0, text="<script>alert(1)</script> 391").to_json() + "\n")
    _, htm = report.write_report(run_dir)
    page = htm.read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_report_without_votes_or_judgments(run_dir, tmp_path):
    (run_dir / store.JUDGMENTS).unlink()
    md, _ = report.write_report(run_dir, tmp_path / "nothing")
    text = md.read_text()
    assert "No arena vote logs found" in text and "No judge run" in text
