"""`python -m evals report RUN`: one Markdown file and one self-contained HTML file per run.

Every score is labelled with how it was obtained (keypoints / LLM judge / human votes), so a
crude automatic number is never mistaken for a judgment.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from evals import fonts, plots, style
from evals.judge import Judgment, pair_outcomes, read_judgments
from evals.schema import Answer, Question
from evals.scoring import KeypointScore, score_all
from evals.store import read_answers, read_meta
from evals.votes import VoteSummary, summarize

QUESTIONS_SNAPSHOT = "questions.jsonl"


def load_run_questions(run_dir: Path) -> list[Question]:
    """The questions as they were when the run was made (snapshot in the run folder)."""
    path = run_dir / QUESTIONS_SNAPSHOT
    if not path.is_file():
        return []
    return [Question(**json.loads(ln)) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


@dataclass
class ModelRow:
    model: str
    dtype: str = "?"
    answers: int = 0
    errors: int = 0
    truncated: int = 0
    keypoint: float | None = None
    judge: float | None = None
    judge_unparsed: int = 0
    pair_w: int = 0
    pair_t: int = 0
    pair_l: int = 0
    ttft: float | None = None
    tps: float | None = None
    tokens: float | None = None
    chars: float | None = None


@dataclass
class ReportData:
    run_dir: Path
    meta: dict
    questions: list[Question]
    models: list[str]
    answers: list[Answer]
    keypoints: list[KeypointScore]
    judgments: list[Judgment]
    votes: VoteSummary | None
    rows: list[ModelRow] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def answer(self, model: str, qid: str, repeat: int = 0) -> Answer | None:
        for a in self.answers:
            if a.model == model and a.question_id == qid and a.repeat == repeat:
                return a
        return None


def collect(run_dir: Path, conversations_dir: Path | None = None) -> ReportData:
    meta = read_meta(run_dir) or {}
    questions = load_run_questions(run_dir)
    answers = read_answers(run_dir)
    qmap = {q.id: q for q in questions}
    models = list((meta.get("settings") or {}).get("models") or sorted({a.model for a in answers}))
    for a in answers:
        if a.model not in models:
            models.append(a.model)
    if conversations_dir is None and meta.get("conversations_dir"):
        conversations_dir = Path(meta["conversations_dir"])
    data = ReportData(
        run_dir=run_dir, meta=meta, questions=questions, models=models, answers=answers,
        keypoints=score_all(answers, qmap), judgments=read_judgments(run_dir),
        votes=summarize(conversations_dir) if conversations_dir else None,
    )
    data.rows = _rows(data)
    data.figures = _figures(data)
    return data


def _rows(d: ReportData) -> list[ModelRow]:
    info = d.meta.get("models_info") or {}
    outcomes = pair_outcomes(d.judgments)
    rows = []
    for m in d.models:
        mine = [a for a in d.answers if a.model == m]
        ok = [a for a in mine if a.ok]
        singles = [j for j in d.judgments if j.kind == "single" and j.model == m]
        r = ModelRow(
            model=m, dtype=(info.get(m) or {}).get("dtype", "?"), answers=len(mine), errors=len(mine) - len(ok),
            truncated=sum(a.finish_reason == "length" for a in ok),
            keypoint=_mean(s.score for s in d.keypoints if s.model == m),
            judge=_mean(j.score for j in singles), judge_unparsed=sum(j.score is None for j in singles),
            ttft=_median(a.ttft_s for a in ok), tps=_median(a.tokens_per_s for a in ok),
            tokens=_mean(a.output_tokens for a in ok), chars=_mean(len(a.text) for a in ok),
        )
        for o in outcomes:
            if m not in (o.model_1, o.model_2) or o.outcome == "unparsed":
                continue
            if o.outcome == m:
                r.pair_w += 1
            elif o.outcome in ("tie", "inconsistent"):
                r.pair_t += 1
            else:
                r.pair_l += 1
        rows.append(r)
    return rows


def _categories(d: ReportData) -> list[str]:
    seen: list[str] = []
    for q in d.questions:
        if q.category not in seen:
            seen.append(q.category)
    return seen


def _figures(d: ReportData) -> dict[str, bytes]:
    figs: dict[str, bytes] = {}
    ok = [a for a in d.answers if a.ok]
    if not ok:
        return figs
    # Category names are often Chinese: every figure is drawn with the project's CJK font, selected here.
    with fonts.figure_style():
        _draw_figures(d, ok, figs)
    return figs


def _draw_figures(d: ReportData, ok: list[Answer], figs: dict[str, bytes]) -> None:
    per = {m: [a for a in ok if a.model == m] for m in d.models}
    figs["speed"] = plots.distributions("Speed per model (each point is one answer)", [
        ("time to first token (s)", {m: [a.ttft_s for a in v] for m, v in per.items()}),
        ("decode tokens/s", {m: [a.tokens_per_s for a in v] for m, v in per.items()}),
        ("total time (s)", {m: [a.total_s for a in v] for m, v in per.items()}),
    ])
    st = {m: [style.measure(a.text) for a in v] for m, v in per.items()}
    figs["length"] = plots.distributions("Answer length per model", [
        ("output tokens", {m: [a.output_tokens for a in v] for m, v in per.items()}),
        ("characters", {m: [s.chars for s in v] for m, v in st.items()}),
        ("non-empty lines", {m: [s.lines for s in v] for m, v in st.items()}),
    ])
    measures = ["uses a list", "uses headings", "has code block", "mostly CJK text"]
    figs["style"] = plots.grouped_bars(
        "Answer structure: share of answers that ...", measures,
        {m: [_share(v, lambda s: s.list_items >= 2), _share(v, lambda s: s.headings > 0),
             _share(v, lambda s: s.code_blocks > 0), _share(v, lambda s: (s.cjk_share or 0) > 0.5)]
         for m, v in st.items()},
        "share of answers", (0, 1),
    )
    cats = _categories(d)
    if d.keypoints and cats:
        qcat = {q.id: q.category for q in d.questions}
        figs["keypoints"] = plots.grouped_bars(
            "Keypoint score by category (automatic, crude)", cats,
            {m: [_mean(s.score for s in d.keypoints if s.model == m and qcat.get(s.question_id) == c) for c in cats]
             for m in d.models},
            "keypoints matched (mean)", (0, 1),
        )


def _share(styles: list[style.Style], pred) -> float | None:
    return sum(map(pred, styles)) / len(styles) if styles else None


# ---------------------------------------------------------------- tables shared by both outputs

SUMMARY_HEAD = ["model", "dtype", "answers", "errors", "cut at max_tokens", "keypoint score ⓚ", "judge score ⓙ",
                "pairwise W/T/L ⓙ", "median TTFT", "median decode tok/s", "mean output tokens", "mean chars"]


def summary_rows(d: ReportData) -> list[list[str]]:
    out = []
    has_pairs = any(j.kind == "pairwise" for j in d.judgments)
    for r in d.rows:
        judge = _fmt(r.judge, 2, "/10") if r.judge is not None else "–"
        if r.judge_unparsed:
            judge += f" ({r.judge_unparsed} unparsed)"
        out.append([
            r.model, r.dtype, str(r.answers), str(r.errors), str(r.truncated),
            _fmt(None if r.keypoint is None else 100 * r.keypoint, 0, "%"), judge,
            f"{r.pair_w}/{r.pair_t}/{r.pair_l}" if has_pairs else "–",
            _fmt(r.ttft, 2, " s"), _fmt(r.tps, 1), _fmt(r.tokens, 0), _fmt(r.chars, 0),
        ])
    return out


def category_rows(d: ReportData) -> tuple[list[str], list[list[str]]]:
    qcat = {q.id: q.category for q in d.questions}
    head = ["category", "questions"] + d.models
    rows = []
    for c in _categories(d):
        n = sum(q.category == c for q in d.questions)
        cells = []
        for m in d.models:
            v = _mean(s.score for s in d.keypoints if s.model == m and qcat.get(s.question_id) == c)
            cells.append(_fmt(None if v is None else 100 * v, 0, "%"))
        rows.append([c, str(n)] + cells)
    return head, rows


def settings_lines(d: ReportData) -> list[tuple[str, str]]:
    s = d.meta.get("settings") or {}
    host = d.meta.get("host") or {}
    cpu = host.get("cpu") or {}
    pk = d.meta.get("packages") or {}
    tok_sources = sorted({a.tokens_source or "unknown" for a in d.answers if a.ok})
    return [
        ("run", d.run_dir.name),
        ("API", s.get("base_url", "?")),
        ("models", ", ".join(d.models)),
        ("questions", f"{len(d.questions)} from {', '.join(Path(p).name for p in s.get('questions_files', []))}"),
        ("settings", f"temperature {s.get('temperature')}, max_tokens {s.get('max_tokens')}, repeats "
                     f"{s.get('repeats')}, concurrency {s.get('concurrency')}, system prompt "
                     f"{json.dumps(s.get('system'), ensure_ascii=False)}"),
        ("host CPU", f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, {cpu.get('mem_gib', '?')} GiB, "
                     f"flags {' '.join(cpu.get('flags', [])) or '-'}"),
        ("packages", ", ".join(f"{k} {v}" for k, v in pk.items() if v)),
        ("output tokens from", ", ".join(tok_sources) + " (usage = sent by the server; tokenizer = counted by the "
                               "serving worker's tokenizer because FastChat sends no usage when streaming)"),
    ]


SCORE_LEGEND = (
    "ⓚ **keypoint score**: share of each question's keypoints (substrings/regexes) found in the answer, "
    "averaged; automatic and crude (it rewards the right words, not the right reasoning). "
    "ⓙ **judge**: an LLM judge's grade against the reference (1-10) and pairwise wins/ties/losses with both "
    "answer orders (a win must hold in both orders; disagreement counts as a tie). "
    "Speed: TTFT = time to the first streamed text; decode tok/s = (tokens − 1) / (total − TTFT)."
)


# ---------------------------------------------------------------- Markdown

def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                  for r in esc])


def render_markdown(d: ReportData, figure_dir: str = "figures") -> str:
    out = [f"# Evaluation report: {d.run_dir.name}", ""]
    out += [f"- **{k}**: {v}" for k, v in settings_lines(d)]
    out += ["", "## Summary", "", _md_table(SUMMARY_HEAD, summary_rows(d)), "", SCORE_LEGEND, ""]
    head, rows = category_rows(d)
    if rows:
        out += ["### Keypoint score by category ⓚ", "", _md_table(head, rows), ""]
    out += _md_judge(d) + _md_votes(d)
    if d.figures:
        out += ["## Figures", ""] + [f"![{name}]({figure_dir}/{name}.png)" for name in d.figures] + [""]
    out += ["## Answers side by side", ""]
    for q in d.questions:
        out += [f"### {q.id} · {q.category}", "", "> " + q.question.replace("\n", "\n> "), ""]
        if q.reference:
            out += [f"*Reference:* {q.reference}", ""]
        for m in d.models:
            for a in [a for a in d.answers if a.model == m and a.question_id == q.id]:
                out += [f"**{m}**{'' if a.repeat == 0 else f' (repeat {a.repeat})'} — {_answer_stats(a, d)}", ""]
                if a.error:
                    out += [f"> ERROR: {a.error}", ""]
                body = a.text or "(empty)"
                out += ["```text", body.replace("```", "ʼʼʼ"), "```", ""]
    return "\n".join(out)


def _answer_stats(a: Answer, d: ReportData) -> str:
    parts = []
    ks = next((s for s in d.keypoints if (s.model, s.question_id, s.repeat) == (a.model, a.question_id, a.repeat)),
              None)
    if ks is not None:
        parts.append(f"keypoints {len(ks.matched)}/{len(ks.matched) + len(ks.missed)}")
    for j in d.judgments:
        if j.kind == "single" and (j.model, j.question_id, j.repeat) == (a.model, a.question_id, a.repeat):
            parts.append(f"judge {j.verdict}/10" if j.score is not None else "judge: unparsed")
    if a.ttft_s is not None:
        parts.append(f"TTFT {a.ttft_s:.2f} s")
    if a.total_s is not None:
        parts.append(f"total {a.total_s:.1f} s")
    if a.output_tokens is not None:
        parts.append(f"{a.output_tokens} tokens")
    if a.tokens_per_s is not None:
        parts.append(f"{a.tokens_per_s:.1f} tok/s")
    if a.finish_reason:
        parts.append(f"finish: {a.finish_reason}")
    return ", ".join(parts)


def _md_judge(d: ReportData) -> list[str]:
    if not d.judgments:
        return ["## LLM judge ⓙ", "", "No judge run (`python -m evals judge RUN --judge-model M`).", ""]
    judges = sorted({f"{j.judge_model} ({j.prompt})" for j in d.judgments})
    unparsed = sum(j.verdict is None for j in d.judgments)
    out = ["## LLM judge ⓙ", "", f"Judge: {', '.join(judges)}; {len(d.judgments)} judge calls, "
           f"{unparsed} with no parseable verdict (recorded, not scored).", ""]
    outcomes = pair_outcomes(d.judgments)
    if outcomes:
        rows = [[o.question_id, f"{o.model_1} vs {o.model_2}", o.outcome] for o in outcomes]
        out += ["### Pairwise outcomes (both orders)", "", _md_table(["question", "pair", "outcome"], rows), ""]
    return out


def _md_votes(d: ReportData) -> list[str]:
    out = ["## Human votes (arena) ⓗ", ""]
    v = d.votes
    if v is None:
        return out + ["No arena vote logs found: nothing to rate yet.", ""]
    out += [f"{v.n_votes} votes in {len(v.paths)} log file(s). {v.ratings_note}", ""]
    if v.ratings:
        head = list(v.ratings[0].keys())
        out += ["### Ratings (Elo / Bradley-Terry)", "", _md_table(head, [[_fmt(r.get(k), 1) for k in head]
                                                                          for r in v.ratings]), ""]
    out += [_md_table(["model", "wins", "losses", "ties", "both bad"],
                      [[c.model, str(c.wins), str(c.losses), str(c.ties), str(c.both_bad)] for c in v.counts]), ""]
    return out


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;
max-width:1400px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;
font-size:.92em}th{background:#f3f3f3}dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}
dl.meta dt{font-weight:600}.q{border-top:2px solid #ddd;margin-top:1.6em;padding-top:.4em}
.qtext{background:#f7f7fb;padding:.6em .8em;border-left:4px solid #88a;white-space:pre-wrap}
.ref{color:#355;font-size:.92em;margin:.4em 0}.grid{display:grid;gap:.8em}
.ans{border:1px solid #ddd;border-radius:6px;padding:.5em;min-width:0}.ans h4{margin:.1em 0 .3em}
.ans pre{white-space:pre-wrap;word-wrap:break-word;font-family:inherit;margin:0;font-size:.93em}
.stats{color:#666;font-size:.82em;margin-bottom:.4em}.err{color:#b00;font-weight:600}
.kp-hit{color:#070}.kp-miss{color:#a00}.legend{font-size:.9em;color:#444}img{max-width:100%}
"""


def _h(x) -> str:
    return html.escape(str(x))


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_h(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def render_html(d: ReportData) -> str:
    p = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Evaluation {_h(d.run_dir.name)}</title>"
         f"<style>{CSS}</style></head><body><h1>Evaluation report: {_h(d.run_dir.name)}</h1>"]
    p.append("<dl class='meta'>" + "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in settings_lines(d))
             + "</dl>")
    p.append("<h2>Summary</h2>" + _html_table(SUMMARY_HEAD, summary_rows(d)))
    p.append(f"<p class='legend'>{_h(SCORE_LEGEND).replace('**', '')}</p>")
    head, rows = category_rows(d)
    if rows:
        p.append("<h3>Keypoint score by category ⓚ</h3>" + _html_table(head, rows))
    # Judge and vote sections reuse the Markdown text, rendered simply (tables as tables).
    p.append(_md_section_to_html(_md_judge(d)) + _md_section_to_html(_md_votes(d)))
    if d.figures:
        p.append("<h2>Figures</h2>")
        for name, png in d.figures.items():
            p.append(f"<p><img alt='{_h(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    p.append("<h2>Answers side by side</h2>")
    cols = f"repeat({len(d.models)}, minmax(0, 1fr))"
    for q in d.questions:
        p.append(f"<div class='q' id='{_h(q.id)}'><h3>{_h(q.id)} · {_h(q.category)}</h3>"
                 f"<div class='qtext'>{_h(q.question)}</div>")
        if q.reference:
            p.append(f"<div class='ref'><b>Reference:</b> {_h(q.reference)}</div>")
        p.append(f"<div class='grid' style='grid-template-columns:{cols}'>")
        for m in d.models:
            mine = [a for a in d.answers if a.model == m and a.question_id == q.id] or [None]
            p.append("<div class='ans'>" + f"<h4>{_h(m)}</h4>")
            for a in mine:
                if a is None:
                    p.append("<div class='stats'>not answered</div>")
                    continue
                p.append(f"<div class='stats'>{_h(_answer_stats(a, d))}</div>")
                p.append(_keypoint_html(a, d))
                if a.error:
                    p.append(f"<div class='err'>ERROR: {_h(a.error)}</div>")
                p.append(f"<pre>{_h(a.text or '(empty)')}</pre>")
            p.append("</div>")
        p.append("</div></div>")
    p.append("</body></html>")
    return "".join(p)


def _keypoint_html(a: Answer, d: ReportData) -> str:
    for s in d.keypoints:
        if (s.model, s.question_id, s.repeat) == (a.model, a.question_id, a.repeat):
            hit = "".join(f"<span class='kp-hit'>✔ {_h(k)}</span> " for k in s.matched)
            miss = "".join(f"<span class='kp-miss'>✘ {_h(k)}</span> " for k in s.missed)
            return f"<div class='stats'>{hit}{miss}</div>"
    return ""


def _md_section_to_html(lines: list[str]) -> str:
    out, table = [], []

    def flush():
        if table:
            head = [c.strip() for c in table[0].strip("|").split("|")]
            rows = [[c.strip().replace("\\", "") for c in r.strip("|").split(" | ")] for r in table[2:]]
            out.append(_html_table(head, rows))
            table.clear()

    for ln in "\n".join(lines).splitlines():  # a table is one multi-line item of `lines`
        if ln.startswith("|"):
            table.append(ln)
            continue
        flush()
        if ln.startswith("### "):
            out.append(f"<h3>{_h(ln[4:])}</h3>")
        elif ln.startswith("## "):
            out.append(f"<h2>{_h(ln[3:])}</h2>")
        elif ln.strip():
            out.append(f"<p>{_h(ln).replace('`', '')}</p>")
    flush()
    return "".join(out)


def write_report(run_dir: Path, conversations_dir: Path | None = None) -> tuple[Path, Path]:
    d = collect(run_dir, conversations_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, png in d.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    md, htm = run_dir / "report.md", run_dir / "report.html"
    md.write_text(render_markdown(d), encoding="utf-8")
    htm.write_text(render_html(d), encoding="utf-8")
    return md, htm

