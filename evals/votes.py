"""Human votes from the UI's arena logs (FastChat writes `$LOGDIR/<date>-conv.json`, one JSON
record per line; votes have type leftvote/rightvote/tievote/bothbad_vote and `models`).

The Elo/Bradley-Terry ratings are computed by `evals.ratings.ratings_from_vote_logs` (written
separately); when that module is absent, the report still shows the raw vote counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

VOTE_TYPES = ("leftvote", "rightvote", "tievote", "bothbad_vote")


def vote_log_paths(conversations_dir: Path) -> list[Path]:
    return sorted(conversations_dir.glob("*-conv.json")) if conversations_dir.is_dir() else []


@dataclass
class VoteCounts:
    model: str
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0


@dataclass
class VoteSummary:
    paths: list[str]
    n_votes: int
    counts: list[VoteCounts]
    ratings: list[dict] | None = None  # from evals.ratings, when available
    ratings_note: str = ""
    extra: dict = field(default_factory=dict)


def count_votes(paths: list[Path]) -> tuple[int, list[VoteCounts]]:
    counts: dict[str, VoteCounts] = {}
    n = 0
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") not in VOTE_TYPES:
                continue
            models = model_names(rec)
            if len(models) != 2 or not all(models):
                continue  # cannot attribute the vote: skip it rather than guess
            n += 1
            left, right = (counts.setdefault(m, VoteCounts(m)) for m in models)
            match rec["type"]:
                case "leftvote":
                    left.wins += 1
                    right.losses += 1
                case "rightvote":
                    right.wins += 1
                    left.losses += 1
                case "tievote":
                    left.ties += 1
                    right.ties += 1
                case "bothbad_vote":
                    left.both_bad += 1
                    right.both_bad += 1
    return n, sorted(counts.values(), key=lambda c: c.model)


def model_names(rec: dict) -> list[str]:
    # The anonymous arena logs hidden selector values; the states always carry model_name.
    names = [m if isinstance(m, str) else "" for m in rec.get("models") or []]
    if len(names) == 2 and all(names):
        return names
    states = rec.get("states") or []
    return [(s or {}).get("model_name", "") for s in states if isinstance(s, dict)]


def _as_dict(r) -> dict:
    if is_dataclass(r):
        return asdict(r)
    if hasattr(r, "model_dump"):
        return r.model_dump()
    if isinstance(r, dict):
        return dict(r)
    if hasattr(r, "_asdict"):
        return r._asdict()
    return {"rating": r}


def summarize(conversations_dir: Path) -> VoteSummary | None:
    """None when there are no vote logs (the report then says so and moves on)."""
    paths = vote_log_paths(conversations_dir)
    if not paths:
        return None
    n, counts = count_votes(paths)
    summary = VoteSummary([str(p) for p in paths], n, counts)
    try:
        from evals.ratings import ratings_from_vote_logs
    except ImportError:
        summary.ratings_note = "evals/ratings.py is not present: raw vote counts only"
        return summary
    try:
        summary.ratings = [_as_dict(r) for r in ratings_from_vote_logs(paths)]
        summary.ratings_note = ("Ratings: evals.ratings (Bradley-Terry on the Elo scale, with confidence "
                                "intervals; anonymous-battle votes only, as on FastChat's leaderboard). The counts below include "
                                "every vote, named and anonymous.")
    except Exception as e:  # noqa: BLE001 - a rating failure must not lose the rest of the report
        summary.ratings_note = f"ratings failed: {type(e).__name__}: {e}"
    return summary
