"""Scripted evaluation of the served models over the OpenAI-compatible API.

Layout (tasks are data, code is the runner, as in lm-evaluation-harness):
  questions/*.yaml     the questions (lab puzzles + our set); judge_prompts/*.yaml the judge prompts
  schema.py            Question / Answer / RunSettings at the boundaries
  client.py            one streamed, timed chat completion
  runner.py, store.py  run every (model, question, repeat), append-only JSONL, resume
  scoring.py, judge.py keypoint matching; LLM-as-judge (single + pairwise with swapped positions)
  votes.py             arena vote logs (ratings by evals/ratings.py)
  report.py, plots.py, style.py   Markdown + self-contained HTML report
  cli.py               `python -m evals run|judge|report|list`
"""
