"""`python -m evals run|judge|report|list`: thin; each command calls the module that does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from evals import hostinfo, report
from evals.schema import Question, QuestionFileError, RunSettings, load_questions
from evals.store import list_runs, read_answers, read_meta, resolve_run, write_meta

# Generation settings a resumed run must share: mixing them would compare unlike answers.
SAME_ON_RESUME = ("temperature", "max_tokens", "system")


def _cfg(args):
    from launch.config import current_config

    return current_config(args.config)


def _configured_models(args) -> list[str]:
    """The model names of the arena config, or none when it cannot be read (an API that is not this arena's)."""
    from launch.config import current_config

    cfg = current_config(args.config, optional=True)
    return [m.name for m in cfg.models] if cfg else []


def _runs_root(args) -> Path:
    if getattr(args, "runs_root", None):
        return Path(args.runs_root)
    return _cfg(args).run_dir() / "evals"


def _api_key(args) -> str | None:
    if args.api_key:
        return args.api_key
    if os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"]
    try:
        keys = _cfg(args).server.resolved_api_keys()
    except Exception:  # noqa: BLE001 - no config: no key
        return None
    return keys[0] if keys else None


def _split(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.split(",") if x.strip()]


def _choose_run_dir(args, settings: RunSettings) -> tuple[Path, bool]:
    """(run folder, resuming?). Without --name/--out, an unfinished newest run with the same
    settings is resumed, so `make eval` after Ctrl-C continues where it stopped."""
    if args.out:
        run_dir = Path(args.out)
    elif args.name:
        run_dir = _runs_root(args) / args.name
    else:
        runs = list_runs(_runs_root(args))
        if runs and not args.new:
            last = runs[-1]
            meta = read_meta(last) or {}
            old = meta.get("settings") or {}
            same = all(old.get(k) == v for k, v in asdict(settings).items() if k not in ("extra", "config"))
            if same and not meta.get("complete"):
                return last, True
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = _runs_root(args) / stamp
        n = 1
        while run_dir.exists():  # two runs in the same second stay apart
            n += 1
            run_dir = _runs_root(args) / f"{stamp}-{n}"
    meta = read_meta(run_dir)
    if meta:
        old = meta.get("settings") or {}
        diff = [k for k in SAME_ON_RESUME if old.get(k) != getattr(settings, k)]
        if diff:
            raise SystemExit(f"error: run {run_dir} was made with other {', '.join(diff)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use another --name or --new")
    return run_dir, meta is not None


def _snapshot_questions(run_dir: Path, questions: list[Question]) -> None:
    merged = {q.id: q for q in report.load_run_questions(run_dir)}
    merged.update({q.id: q for q in questions})
    text = "".join(json.dumps(q.model_dump(mode="json"), ensure_ascii=False) + "\n" for q in merged.values())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / report.QUESTIONS_SNAPSHOT).write_text(text, encoding="utf-8")


def cmd_run(args) -> int:
    from evals import client as client_mod
    from evals import runner

    base_url = args.base_url or _cfg(args).api_url()
    api_key = _api_key(args)
    files = [Path(p) for p in _split(args.questions)]
    try:
        questions = load_questions(files or None)
    except QuestionFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        questions = questions[: args.limit]
    # Checked against what the API serves before anything runs: a misspelt name would otherwise cost one
    # error answer per question. A configured model that is not served right now (its worker crashed or
    # is still loading) is run anyway: its answers are recorded as errors, and running again retries them.
    try:
        served = client_mod.list_models(client_mod.make_client(base_url, api_key, 30.0))
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot list models at {base_url}/models: {type(e).__name__}: {e}\n"
              "is the stack up (`make up`)? or pass --base-url", file=sys.stderr)
        return 2
    models = _split(args.models) or served
    if not models:
        print(f"error: {base_url} serves no models yet", file=sys.stderr)
        return 2
    down = [m for m in models if m not in served]
    configured = _configured_models(args)
    unknown = [m for m in down if m not in configured]
    if unknown:
        print(f"error: --models: {', '.join(unknown)}: not served at {base_url} (served: {', '.join(served) or 'none'})"
              f" and not in the arena config (models: {', '.join(configured) or 'none'}); check the name",
              file=sys.stderr)
        return 2
    if down:
        print(f"warning: {', '.join(down)}: configured but not served at {base_url} right now (is its worker up? "
              "`make status`); its answers are recorded as errors, and running the same command again retries them",
              file=sys.stderr)
    settings = RunSettings(
        base_url=base_url, models=models,
        questions_files=[str(p) for p in files] or [str(p) for p in _shipped_files()],
        question_ids=[q.id for q in questions], temperature=args.temperature, max_tokens=args.max_tokens,
        system=args.system, repeats=args.repeats, concurrency=args.concurrency, config=args.config,
    )
    run_dir, resuming = _choose_run_dir(args, settings)
    _snapshot_questions(run_dir, questions)
    info = hostinfo.collect(args.config, models)
    try:
        info["conversations_dir"] = str(_cfg(args).run_dir() / "conversations")
    except Exception:  # noqa: BLE001
        pass
    write_meta(run_dir, settings, {**info, "complete": False})
    print(f"{'resuming' if resuming else 'new'} run {run_dir}: {len(models)} models x {len(questions)} questions "
          f"x {args.repeats} repeats, max_tokens {args.max_tokens}, temperature {args.temperature}", file=sys.stderr)
    try:
        written, before = runner.execute(run_dir, settings, questions, api_key, args.timeout)
    except KeyboardInterrupt:
        print(f"\ninterrupted: answers so far are in {run_dir}; run the same command again to resume",
              file=sys.stderr)
        return 130
    answers = [a for a in read_answers(run_dir) if a.question_id in set(settings.question_ids)
               and a.model in models]
    errors = sum(not a.ok for a in answers)
    write_meta(run_dir, settings, {**info, "complete": True})
    print(f"done: {written} answered now, {before} already done, {errors} errors; results in {run_dir}",
          file=sys.stderr)
    if args.judge_model:
        rc = _judge(run_dir, args)
        if rc:
            return rc
    return 0


def _shipped_files() -> list[Path]:
    from evals.schema import QUESTIONS_DIR

    return sorted(p for p in QUESTIONS_DIR.iterdir() if p.suffix in (".jsonl", ".yaml", ".yml"))


def _judge(run_dir: Path, args) -> int:
    from evals.judge import run_judge

    meta = read_meta(run_dir) or {}
    base_url = args.judge_base_url or (meta.get("settings") or {}).get("base_url") or _cfg(args).api_url()
    questions = {q.id: q for q in report.load_run_questions(run_dir)}
    kinds = tuple(_split([args.judge_kinds]))
    print(f"judging {run_dir.name} with {args.judge_model} at {base_url} ({', '.join(kinds)})", file=sys.stderr)
    n = run_judge(run_dir, read_answers(run_dir), questions, judge_model=args.judge_model, base_url=base_url,
                  api_key=args.judge_api_key or _api_key(args), kinds=kinds, concurrency=args.concurrency,
                  max_tokens=args.judge_max_tokens, timeout=args.timeout)
    print(f"judge: {n} judgments recorded", file=sys.stderr)
    return 0


def _existing_run(args) -> Path | None:
    """The run `args.run` names, or None after saying why there is none."""
    try:
        return resolve_run(args.run, _runs_root(args))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cmd_judge(args) -> int:
    run_dir = _existing_run(args)
    return 2 if run_dir is None else _judge(run_dir, args)


def cmd_report(args) -> int:
    run_dir = _existing_run(args)
    if run_dir is None:
        return 2
    votes = Path(args.votes_dir) if args.votes_dir else None
    md, htm = report.write_report(run_dir, votes)
    print(f"{md}\n{htm}")
    return 0


def cmd_list(args) -> int:
    for run in list_runs(_runs_root(args)):
        meta = read_meta(run) or {}
        s = meta.get("settings") or {}
        n = len(read_answers(run))
        print(f"{run.name}  {'complete' if meta.get('complete') else 'partial '}  {n} answers  "
              f"models: {', '.join(s.get('models', []))}")
    return 0


def _judge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge-model", help="model name of the judge (any OpenAI-compatible endpoint)")
    p.add_argument("--judge-base-url", help="judge endpoint (default: the run's API)")
    p.add_argument("--judge-api-key")
    p.add_argument("--judge-kinds", default="single,pairwise", help="single, pairwise or both (default)")
    p.add_argument("--judge-max-tokens", type=int, default=512)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals", description="Ask every served model the questions; "
                                     "score, judge and report.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="arena config (default deploy/models.toml)")
    common.add_argument("--runs-root", help="folder holding runs (default: <config run_dir>/evals)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="ask the questions (resumes an unfinished run)")
    run.add_argument("--base-url", help="OpenAI-compatible API (default: the config's API server)")
    run.add_argument("--api-key", help="default: $OPENAI_API_KEY or the config's first API key")
    run.add_argument("--models", action="append", help="subset, comma-separated or repeated (default: all served)")
    run.add_argument("--questions", action="append", help="question file (.jsonl/.yaml); repeatable "
                     "(default: every file in evals/questions/)")
    run.add_argument("--limit", type=int, default=0, help="only the first N questions")
    run.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy: reproducible)")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--system", default=None, help="system prompt (default none: the model's template default)")
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--concurrency", type=int, default=1,
                     help="requests in flight (default 1: CPU workers share the cores, so more in flight mostly adds waiting)")
    run.add_argument("--name", help="run name under the runs root (re-using a name resumes that run)")
    run.add_argument("--out", help="run folder path (instead of --name)")
    run.add_argument("--new", action="store_true", help="start a new run even if the last one is unfinished")
    run.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    _judge_options(run)
    run.set_defaults(func=cmd_run)

    judge = sub.add_parser("judge", parents=[common], help="LLM-as-judge over a run's answers (resumable)")
    judge.add_argument("run", help="'latest', a run name or a run folder")
    judge.add_argument("--api-key")
    judge.add_argument("--concurrency", type=int, default=1)
    judge.add_argument("--timeout", type=float, default=900.0)
    _judge_options(judge)
    judge.set_defaults(func=cmd_judge)

    rep = sub.add_parser("report", parents=[common], help="write report.md and report.html into the run folder")
    rep.add_argument("run", help="'latest', a run name or a run folder")
    rep.add_argument("--votes-dir", help="arena conversation logs (default: <config run_dir>/conversations)")
    rep.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", parents=[common], help="list runs")
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "judge" and not args.judge_model:
        print("error: --judge-model is required", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as e:
        from launch.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
