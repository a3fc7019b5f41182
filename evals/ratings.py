"""Ratings from the arena's vote log: Bradley-Terry (on the Elo scale) with bootstrap confidence intervals.

The UI appends FastChat-format records to $LOGDIR/<date>-conv.json (one JSON object per line). A pairwise
vote is a record whose "type" is leftvote / rightvote / tievote / bothbad_vote, with "states" holding the two
conversations (state["model_name"] is the model) and "models" the names shown on screen: empty strings in the
anonymous battle tab, the chosen names in the side-by-side tab (FastChat's clean_battle_data uses the same rule).

    from evals.ratings import ratings_from_vote_logs
    for r in ratings_from_vote_logs(["run/conversations"]):
        print(r.name, r.rating, r.ci_low, r.ci_high, r.games, r.wins)

Bradley-Terry is fitted by maximum likelihood (ties count as half a win each way) with a small ridge penalty,
so that a handful of one-sided local votes still gives finite ratings; the scale is FastChat's
(1000 + 400 * log10 strength). Unlike online Elo it does not depend on the order of the votes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOTE_OUTCOMES = {"leftvote": 1.0, "rightvote": 0.0, "tievote": 0.5, "bothbad_vote": 0.5}
SCALE, BASE, INIT = 400.0, 10.0, 1000.0
LOG_GLOB = "*conv.json"


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    score_a: float  # 1 = A won, 0 = B won, 0.5 = tie / both bad
    anony: bool
    tstamp: float


@dataclass(frozen=True)
class Rating:
    name: str
    rating: float
    ci_low: float
    ci_high: float
    games: int
    wins: float  # ties count half


def _log_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob(LOG_GLOB))
        elif p.is_file():
            files.append(p)
    return files


def battles_from_vote_logs(paths: Iterable[str | Path], *, include_named: bool = False) -> list[Battle]:
    """Every pairwise vote in the logs. A torn last line (a crash mid-append) is skipped, not fatal."""
    out: list[Battle] = []
    for f in _log_files(paths):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or rec.get("type") not in VOTE_OUTCOMES:
                    continue
                states = rec.get("states") or []
                if len(states) != 2:
                    continue
                a, b = (s.get("model_name") for s in states)
                if not a or not b or a == b:
                    continue
                anony = all(not m for m in rec.get("models", ["", ""]))
                if not anony and not include_named:
                    continue
                out.append(Battle(a, b, VOTE_OUTCOMES[rec["type"]], anony, float(rec.get("tstamp", 0.0))))
    return out


def _fit_bt(idx_a: np.ndarray, idx_b: np.ndarray, score: np.ndarray, n: int, ridge: float) -> np.ndarray:
    """Newton's method on the penalised log-likelihood; returns log-strengths (natural log), mean zero."""
    beta = np.zeros(n)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(beta[idx_b] - beta[idx_a]))
        r = score - p
        grad = np.bincount(idx_a, r, n) - np.bincount(idx_b, r, n) - ridge * beta
        w = p * (1 - p)
        hess = np.diag(np.bincount(idx_a, w, n) + np.bincount(idx_b, w, n) + ridge)
        np.subtract.at(hess, (idx_a, idx_b), w)
        np.subtract.at(hess, (idx_b, idx_a), w)
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.max(np.abs(step)) < 1e-9:
            break
    return beta - beta.mean()


def _to_elo_scale(beta: np.ndarray) -> np.ndarray:
    return INIT + SCALE * beta / math.log(BASE)


def compute_ratings(battles: list[Battle], *, rounds: int = 200, ridge: float = 0.1, seed: int = 0) -> list[Rating]:
    """Bradley-Terry ratings, with percentile bootstrap 95% intervals over resampled votes."""
    if not battles:
        return []
    names = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    pos = {m: i for i, m in enumerate(names)}
    ia = np.array([pos[b.model_a] for b in battles])
    ib = np.array([pos[b.model_b] for b in battles])
    sc = np.array([b.score_a for b in battles])
    n = len(names)
    point = _to_elo_scale(_fit_bt(ia, ib, sc, n, ridge))

    rng = np.random.default_rng(seed)
    boots = np.empty((rounds, n))
    for k in range(rounds):
        pick = rng.integers(0, len(battles), len(battles))
        boots[k] = _to_elo_scale(_fit_bt(ia[pick], ib[pick], sc[pick], n, ridge))
    low, high = np.percentile(boots, [2.5, 97.5], axis=0)

    games = np.bincount(ia, minlength=n) + np.bincount(ib, minlength=n)
    wins = np.bincount(ia, sc, n) + np.bincount(ib, 1 - sc, n)
    out = [
        Rating(m, round(float(point[i]), 1), round(float(min(low[i], point[i])), 1),
               round(float(max(high[i], point[i])), 1), int(games[i]), float(wins[i]))
        for i, m in enumerate(names)
    ]
    return sorted(out, key=lambda r: (-r.rating, r.name))


def ratings_from_vote_logs(paths: Iterable[str | Path], *, include_named: bool = False,
                           rounds: int = 200, seed: int = 0) -> list[Rating]:
    """Ratings from FastChat vote logs (files or directories of *-conv.json), best first.

    By default only anonymous-battle votes count (as on FastChat's leaderboard): in the side-by-side tab
    the voter sees the names. include_named=True adds those votes too.
    """
    return compute_ratings(battles_from_vote_logs(paths, include_named=include_named), rounds=rounds, seed=seed)
