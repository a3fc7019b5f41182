"""Pure parts of the bench: statistics, roofline arithmetic, report shape (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from launch.bench_stats import (
    ModelReport,
    Stat,
    ratio,
    report_json,
    roofline_tokens_per_s,
    scaling,
    table,
    weight_bytes_per_token,
)


def test_stat_median_and_noise():
    s = Stat.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.fmt() == "2.5 (1.0-10.0)"
    assert Stat.of([4.0]).fmt() == "4.0"
    assert Stat.of([]) is None


def test_ratio_handles_missing_and_zero():
    assert ratio(Stat.of([9.0]), Stat.of([12.0])) == pytest.approx(0.75)
    assert ratio(None, Stat.of([1.0])) is None
    assert ratio(Stat.of([1.0]), Stat.of([0.0])) is None


def test_bytes_per_token_skips_untied_input_embedding_only():
    # An untied embedding is a row lookup; a tied one is read in full as the LM head.
    assert weight_bytes_per_token(1000, 200, tied=False) == 800
    assert weight_bytes_per_token(1000, 200, tied=True) == 1000


def test_roofline():
    assert roofline_tokens_per_s(25e9, 14.2e9) == pytest.approx(1.7606, rel=1e-3)
    assert roofline_tokens_per_s(25e9, 0) == 0.0


def test_scaling_relative_to_one_client():
    agg = {1: Stat.of([10.0]), 2: Stat.of([18.0]), 4: Stat.of([32.0]), 8: None}
    assert scaling(agg) == {"1": 1.0, "2": 1.8, "4": 3.2, "8": None}


@pytest.fixture
def report() -> ModelReport:
    r = ModelReport(name="m", worker="batching", dtype="float32", threads=2, weights_bytes=540_000_000,
                    bytes_per_token=540_000_000, raw_decode_tps=Stat.of([20.0, 22.0, 24.0]),
                    raw_ttft_s=Stat.of([0.1]), api_decode_tps=Stat.of([18.0, 19.0]), api_ttft_s=Stat.of([0.2]),
                    roofline_tps=44.0, rss_bytes=700_000_000, shared_decode_tps=Stat.of([9.0]))
    r.concurrency_tps = {1: Stat.of([18.0]), 2: Stat.of([30.0]), 4: Stat.of([54.0]), 8: Stat.of([80.0])}
    return r


def test_report_json_shape(report):
    out = json.loads(json.dumps(report_json([report], {"bandwidth_gbs": 22.0}, 61.0, {"tokens": 48})))
    assert out["api_vs_raw_decode_ratio"]["m"] == pytest.approx(18.5 / 22.0)
    assert out["concurrency_scaling"]["m"]["4"] == pytest.approx(3.0)
    assert out["roofline_fraction"]["m"] == pytest.approx(22.0 / 44.0)
    assert out["served_roofline_fraction"]["m"] == pytest.approx(18.5 / 44.0)
    assert out["shared_cores_fraction_of_solo"]["m"] == pytest.approx(9.0 / 18.5)
    model = out["models"]["m"]
    assert model["raw_decode_tokens_per_s"] == {"median": 22.0, "min": 20.0, "max": 24.0, "n": 3}
    assert model["rss_over_weights"] == pytest.approx(700 / 540)
    assert out["make_up_time_s"] == 61.0


def test_table_mentions_every_figure(report):
    text = table([report], {"bandwidth_gbs": 22.0, "bandwidth_all_gbs": 25.0, "bandwidth_threads": 2, "cores": 2}, 61.0)
    for needle in ("22.0 (20.0-24.0)", "API/raw 0.84", "raw 0.50, served 0.42", "4: 54.0 tok/s (x3.00)", "0.49 of solo", "make up: 61 s"):
        assert needle in text
