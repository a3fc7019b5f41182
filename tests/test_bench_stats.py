"""Pure parts of the bench: statistics, roofline arithmetic, report shape (no timing asserted); the bandwidth
probe's sum (bench/csrc/read_probe.c)."""

from __future__ import annotations

import json
import time

import pytest

from bench.stats import (
    ModelReport,
    Stat,
    paired_scaling,
    ratio,
    report_json,
    roofline_tokens_per_s,
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


def test_scaling_pairs_each_round_with_its_own_one_client_rate():
    # Round 2 ran on a machine twice as fast: its rates are double, its ratios the same.
    rounds = {1: [10.0, 20.0, 12.0], 2: [18.0, 36.0, 21.6], 4: [30.0, 60.0, 39.6]}
    sc = paired_scaling(rounds)
    assert sc[1] == Stat(1.0, 1.0, 1.0, 3)
    assert sc[2].median == pytest.approx(1.8) and sc[2].max == pytest.approx(1.8)
    assert (sc[4].median, sc[4].min, sc[4].max) == pytest.approx((3.0, 3.0, 3.3))
    # The ratio of medians would mix rounds: 39.6 / 12.0.
    assert Stat.of(rounds[4]).median / Stat.of(rounds[1]).median == pytest.approx(3.3)


def test_scaling_without_a_one_client_round_is_unknown():
    assert paired_scaling({2: [18.0], 4: [30.0]}) == {2: None, 4: None}


@pytest.fixture
def report() -> ModelReport:
    r = ModelReport(name="m", worker="batching", dtype="float32", threads=2, weights_bytes=540_000_000,
                    bytes_per_token=540_000_000, raw_decode_tps=Stat.of([20.0, 22.0, 24.0]),
                    raw_ttft_s=Stat.of([0.1]), api_decode_tps=Stat.of([18.0, 19.0]), api_ttft_s=Stat.of([0.2]),
                    roofline_tps=44.0, bandwidth=Stat.of([21e9, 23.76e9, 25e9]), rss_bytes=700_000_000,
                    shared_decode_tps=Stat.of([9.0]))
    r.concurrency_rounds = {1: [18.0, 20.0], 2: [30.0, 34.0], 4: [54.0, 56.0], 8: [80.0, 84.0]}
    r.next_turn_tokens, r.next_turn_kept = 120, 100
    r.next_turn_whole_s, r.next_turn_kept_s = Stat.of([0.5, 0.7]), Stat.of([0.1])
    return r


def test_report_json_shape(report):
    out = json.loads(json.dumps(report_json([report], {"bandwidth_gbs": 22.0}, 61.0, {"tokens": 48})))
    assert out["api_vs_raw_decode_ratio"]["m"] == pytest.approx(18.5 / 22.0)
    assert out["concurrency_scaling"]["m"]["4"] == pytest.approx((54 / 18 + 56 / 20) / 2)
    assert out["roofline_fraction"]["m"] == pytest.approx(22.0 / 44.0)
    assert out["served_roofline_fraction"]["m"] == pytest.approx(18.5 / 44.0)
    assert out["shared_cores_fraction_of_solo"]["m"] == pytest.approx(9.0 / 18.5)
    model = out["models"]["m"]
    assert model["raw_decode_tokens_per_s"] == {"median": 22.0, "min": 20.0, "max": 24.0, "n": 3}
    assert model["rss_over_weights"] == pytest.approx(700 / 540)
    assert model["bandwidth_gbs"] == {"median": pytest.approx(23.76), "min": pytest.approx(21.0),
                                      "max": pytest.approx(25.0), "n": 3}
    assert model["aggregate_tokens_per_s_per_round"]["4"] == [54.0, 56.0]
    assert model["concurrency_scaling"]["4"] == {"median": pytest.approx(2.9), "min": pytest.approx(2.8),
                                                 "max": pytest.approx(3.0), "n": 2}
    assert out["make_up_time_s"] == 61.0
    assert model["next_turn_prefill_s"] == {"prompt_tokens": 120, "kept_tokens": 100,
                                            "whole": {"median": 0.6, "min": 0.5, "max": 0.7, "n": 2},
                                            "from_kept_turn": {"median": 0.1, "min": 0.1, "max": 0.1, "n": 1}}


def test_table_mentions_every_figure(report):
    text = table([report], {"bandwidth_gbs": 22.0, "bandwidth_all_gbs": 25.0, "bandwidth_threads": 2, "cores": 2}, 61.0)
    for needle in ("22.0 (20.0-24.0)", "API/raw 0.84", "raw 0.50, served 0.42", "at 23.8 (21.0-25.0) GB/s, read around these runs", "4: 55.0 (54.0-56.0) tok/s", "4: x2.90 (2.80-3.00)", "0.49 of solo", "make up: 61 s",
                   "next turn      prefill 0.600 (0.500-0.700) s whole, 0.100 s from the kept first turn (120 tokens, 100 kept"):
        assert needle in text


def test_shape_bench_judges_each_step_against_the_probes_next_to_it(tmp_path, monkeypatch):
    """run_shape end to end on a tiny bf16 stand-in (the real one needs 16 GB and minutes)."""
    import itertools
    import statistics

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench import cli as bench
    from bench import raw as bench_raw

    def tiny(shape):
        torch.manual_seed(0)
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False)
        return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()

    # The probe reads 1, 2, 3... GB/s in turn, and takes PROBE_S: each step must be judged against its own
    # neighbours, and timed without them (a tiny model's step is far shorter, even on a busy machine).
    speeds = itertools.count(1)
    probe_s = 0.3

    class Probe:
        def __init__(self, n_threads, mb=512):
            pass

        def __call__(self):
            time.sleep(probe_s)
            return next(speeds) * 1e9

    monkeypatch.setattr(bench_raw, "build_shape_model", tiny)
    monkeypatch.setattr(bench_raw, "ReadProbe", Probe)
    # Decoded as the worker decodes, on the worker's KV cache: a new one for each run of steps (1 to warm up, 2 per
    # repeat, 1 at batch 4) and each first-token generate (1 per repeat).
    from engine import kv_cache
    from engine.kernels import decode_step
    from engine.kernels.native import native_kernel

    native = []
    real_step = decode_step.NativeDecodeStep.__call__
    monkeypatch.setattr(decode_step.NativeDecodeStep, "__call__",
                        lambda self, *a: native.append(a[0].shape[0]) or real_step(self, *a))
    has_bf16_units = native_kernel()[0] is not None and native_kernel()[0].bf16_units

    made = []

    class Counted(kv_cache.GrowingCache):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(kv_cache, "GrowingCache", Counted)
    out_path = tmp_path / "shape.json"
    args = bench.parse_args(["--shape", "qwen-7b", "--tokens", "3", "--repeats", "2", "--json", str(out_path),
                             "--no-plot"])
    assert bench.run_shape(args) == 0
    assert len(made) == 8 and len({id(c) for c in made}) == 8
    # Where the CPU has AVX512_BF16 the steps ran on decode_step.c: 1 to warm up, 2 + 2 per repeat, 2 of 4 rows.
    assert native == ([1] + [1] * 4 * 2 + [4, 4] if has_bf16_units else [])
    out = json.loads(out_path.read_text())
    per_token = out["bytes_read_per_token"]
    steps = out["probed_steps"]
    # 3 tokens: 2 steps per repeat, each between its own two probes.
    assert [(s["before_gbs"], s["after_gbs"]) for s in steps] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert all(0 < s["step_s"] < probe_s for s in steps)
    fractions = [per_token / s["step_s"] / (s["before_gbs"] * 1e9) for s in steps]
    assert out["roofline_fraction"]["qwen-7b"] == pytest.approx(statistics.median(fractions))
    assert out["roofline_fraction_noise"] == pytest.approx([min(fractions), max(fractions)])
    faster = [per_token / s["step_s"] / (s["after_gbs"] * 1e9) for s in steps]
    assert out["roofline_fraction_against_faster_probe"]["median"] == pytest.approx(statistics.median(faster))
    assert out["bandwidth_gbs"] == pytest.approx(4.5)  # median of all eight readings
    assert len(out["decode_tokens_per_s_per_repeat"]) == 2
    assert out["decode_tokens_per_s_per_step"]["median"] == pytest.approx(
        statistics.median([1 / s["step_s"] for s in steps]))
    assert out["batch4_aggregate_tokens_per_s"]["median"] > 0


def test_bench_names_an_unknown_model_and_the_configured_ones():
    from bench import cli as bench
    from launch.config import ConfigError, load_config

    cfg = load_config()
    configured = [m.name for m in cfg.models]
    assert bench.selected_models(cfg, None) == configured
    assert bench.selected_models(cfg, f" {configured[-1]} ") == [configured[-1]]
    with pytest.raises(ConfigError) as e:
        bench.selected_models(cfg, f"{configured[0]},qwen2.5-0.5b")
    assert "qwen2.5-0.5b" in str(e.value) and all(n in str(e.value) for n in configured)
    with pytest.raises(ConfigError):
        bench.selected_models(cfg, ",")


def test_bench_plan_defaults_quick_and_explicit():
    from bench import cli as bench

    plan = bench.Plan.of(bench.parse_args([]))
    assert (plan.tokens, plan.repeats, plan.rounds, plan.clients) == (48, 3, 9, (1, 2, 4, 8))
    assert bench.Plan.of(bench.parse_args(["--quick"])) == bench.Plan(16, 1, 1, (1, 2))
    given = bench.parse_args(["--quick", "--tokens", "9", "--repeats", "2", "--rounds", "7", "--clients", "1,3"])
    assert bench.Plan.of(given) == bench.Plan(9, 2, 7, (1, 3))


@pytest.mark.parametrize("option", ["--tokens", "--repeats", "--rounds"])
@pytest.mark.parametrize("spec", ["0", "-2", "x"])
def test_bench_refuses_counts_that_are_not_positive(option, spec, capsys):
    from bench import cli as bench

    with pytest.raises(SystemExit) as e:
        bench.parse_args([option, spec])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["1,x", "0,2", ""])
def test_bench_refuses_client_counts_that_are_not_positive_integers(spec, capsys):
    from bench import cli as bench

    assert bench.parse_args(["--clients", "1,4"]).clients == (1, 4)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--clients", spec])
    assert e.value.code == 2
    assert "positive integers" in capsys.readouterr().err


def test_the_bench_stack_runs_without_the_prefix_cache(tmp_path):
    """Its rounds repeat their prompts: a prefix cache would serve them from earlier rounds (the bench times
    what the cache saves apart, as the next turn's prefill)."""
    from bench import cli as bench
    from launch.config import load_config

    cfg = load_config()
    names = [m.name for m in cfg.models]
    stack = load_config(bench._bench_config(cfg, names, None, tmp_path / "run"))
    assert [m.name for m in stack.models] == names and all(m.prefix_cache_mb == 0 for m in stack.models)
    assert all(m.prefix_cache_mb > 0 for m in cfg.models)


@pytest.mark.parametrize("measured, kept", [(0, False), (1, True), (RuntimeError("a client failed"), True)])
def test_the_bench_removes_its_own_stack_folder_unless_something_failed(monkeypatch, tmp_path, measured, kept):
    import subprocess

    from bench import cli as bench
    from launch.config import load_config

    made = []

    def mkdtemp(prefix):
        folder = tmp_path / f"{prefix}{len(made)}"
        folder.mkdir()
        made.append(folder)
        return str(folder)

    def measure(*args):
        if isinstance(measured, Exception):
            raise measured
        return measured

    calls = []
    monkeypatch.setattr(bench.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(bench, "_running", lambda cfg: False)
    monkeypatch.setattr(bench, "_launch", lambda config, *args, timeout=1200: calls.append(args[0])
                        or subprocess.CompletedProcess(args, 0, "", ""))
    monkeypatch.setattr(bench, "_measure", measure)
    if isinstance(measured, Exception):
        with pytest.raises(RuntimeError):
            bench.main(load_config(), ["--no-plot"])
    else:
        assert bench.main(load_config(), ["--no-plot"]) == measured
    assert calls == ["up", "down"]
    assert len(made) == 1 and made[0].exists() == kept


def _native_probe():
    from bench.raw import native_read_probe

    probe = native_read_probe()
    if probe is None:
        pytest.skip("read_probe.c cannot be built here (no AVX2 and FMA, or no C compiler)")
    return probe


@pytest.mark.parametrize("n", [0, 5, (1 << 18) + 3, 3 << 20])  # below one block, a block plus a tail, many
def test_read_probe_reads_every_element(n):
    import torch

    probe = _native_probe()
    x = torch.arange(n, dtype=torch.float32) % 7  # small integers: the sum is exact in fp32 per lane
    assert probe(x) == pytest.approx(float(x.double().sum()), rel=1e-6)
    with pytest.raises(ValueError):
        probe(x.double())


def test_read_probe_is_built_apart_from_the_served_kernels():
    from bench.raw import PROBE_SOURCE, ReadProbe, probe_name
    from engine.kernels.native import cache_dir

    probe = _native_probe()
    assert PROBE_SOURCE.parent.parent.name == "bench" and PROBE_SOURCE.is_file()
    assert probe.path.parent == cache_dir() and probe.path.name.startswith("read-probe-")
    assert probe_name() == "read_probe.c, 8 streams per thread"
    assert ReadProbe(1, mb=8)._read is probe
