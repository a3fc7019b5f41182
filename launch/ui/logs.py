"""Append-only conversation and vote log, in FastChat's format ($LOGDIR/<date>-conv.json, one JSON per line).

Written through launch/jsonl_log.py (one O_APPEND write per record under flock, fsync, torn tails cut off), so
a UI killed mid-record never leaves a line that breaks the log's readers (the leaderboard, the evals' ratings).
"""

from __future__ import annotations

import os

from fastchat.serve.gradio_web_server import get_conv_log_filename

from launch import jsonl_log


def log_path() -> str:
    return get_conv_log_filename()


def append_record(record: dict) -> str:
    path = log_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    jsonl_log.append_record(path, record)
    return path


def log_dir() -> str:
    return os.path.dirname(os.path.abspath(log_path()))
