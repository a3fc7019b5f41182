"""evals/ratings.py: Bradley-Terry ratings with bootstrap intervals from FastChat-format vote logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.ratings import battles_from_vote_logs, compute_ratings, ratings_from_vote_logs


def _vote(kind: str, a: str, b: str, anony: bool = True) -> dict:
    return {"tstamp": 1.0, "type": kind, "models": ["", ""] if anony else [a, b],
            "states": [{"model_name": a}, {"model_name": b}], "ip": "127.0.0.1"}


def _write(path: Path, records: list[dict], torn_tail: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"type": "leftv' if torn_tail else ""))
    return path


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "conversations"
    d.mkdir()
    # strong beats mid beats weak, mostly; one tie; one chat record and one named vote that must be ignored.
    recs = ([_vote("leftvote", "strong", "mid")] * 6 + [_vote("rightvote", "strong", "mid")] * 2
            + [_vote("leftvote", "mid", "weak")] * 6 + [_vote("rightvote", "mid", "weak")] * 2
            + [_vote("rightvote", "weak", "strong")] * 7 + [_vote("tievote", "weak", "strong")]
            + [{"type": "chat", "model": "strong", "state": {}}]
            + [_vote("leftvote", "weak", "strong", anony=False)] * 20)
    _write(d / "2026-11-29-conv.json", recs, torn_tail=True)
    return d


def test_order_intervals_and_counts(log_dir):
    ratings = ratings_from_vote_logs([log_dir])
    assert [r.name for r in ratings] == ["strong", "mid", "weak"]
    for r in ratings:
        assert r.ci_low <= r.rating <= r.ci_high
        assert r.ci_high > r.ci_low
    by = {r.name: r for r in ratings}
    assert by["strong"].games == 16 and by["strong"].wins == 6 + 7 + 0.5
    assert abs(sum(r.rating for r in ratings) / 3 - 1000) < 1e-6 + 0.1


def test_named_votes_only_on_request(log_dir):
    assert len(battles_from_vote_logs([log_dir])) == 24
    named = battles_from_vote_logs([log_dir], include_named=True)
    assert len(named) == 44
    # 20 visible-name votes for "weak" pull it up when counted.
    weak_anony = next(r for r in ratings_from_vote_logs([log_dir]) if r.name == "weak").rating
    weak_all = next(r for r in ratings_from_vote_logs([log_dir], include_named=True) if r.name == "weak").rating
    assert weak_all > weak_anony


def test_one_sided_votes_stay_finite(tmp_path):
    f = _write(tmp_path / "x-conv.json", [_vote("leftvote", "a", "b")])
    (a, b) = ratings_from_vote_logs([f])
    assert a.name == "a" and a.rating > 1000 > b.rating
    assert abs(a.rating) < 5000 and a.wins == 1 and b.wins == 0


def test_bothbad_counts_as_tie(tmp_path):
    f = _write(tmp_path / "x-conv.json", [_vote("bothbad_vote", "a", "b")] * 4)
    a, b = ratings_from_vote_logs([f])
    assert a.rating == pytest.approx(b.rating) == pytest.approx(1000)


def test_no_votes_no_ratings(tmp_path):
    assert ratings_from_vote_logs([tmp_path]) == []
    assert compute_ratings([]) == []
