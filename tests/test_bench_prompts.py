"""The bench's long prompts (bench/prompts.py): the prompt builder, the plan, the arithmetic and the report's
fields and block, on fake timings (no stack, no timing asserted)."""

from __future__ import annotations

import json

import pytest

from bench.cli import parse_args
from bench.prompts import (
    LENGTHS,
    ModelShape,
    PromptPlan,
    build_prompt,
    fitting_length,
    measure,
    paired_ratio,
    peak_gflops,
    prompt_flops,
    summarize,
)
from bench.stats import long_prompt_fields, long_prompt_lines, report_json, table

TEMPLATE = ["<s>", "system", "be", "brief", "</s>", "user"]  # a chat template's fixed tokens around the message


def word_render(text: str) -> list[str]:
    """A tokenizer of one token per word and a template, so the expected counts are exact."""
    return [*TEMPLATE, *text.split(), "</s>", "assistant"]


@pytest.mark.parametrize("target", [100, 1000, 4000])
def test_prompt_reaches_the_asked_length(target):
    text, ids = build_prompt(word_render, target, "run-a")
    assert target * 0.97 <= len(ids) <= target
    assert ids == word_render(text)


def test_prompts_differ_from_their_first_words_per_repeat():
    texts = [build_prompt(word_render, 500, f"run-a-m-1000-{r}")[0] for r in range(3)]
    assert len(set(texts)) == 3
    # Not even their beginnings agree past the template: no prefix cache can serve any of it.
    starts = {tuple(t.split()[:3]) for t in texts}
    assert len(starts) == 3
    # The same tag gives the same text (a repeat's three paths see the same prompt).
    assert build_prompt(word_render, 500, "run-a-m-1000-0")[0] == texts[0]


@pytest.mark.models
def test_prompt_length_with_a_real_tokenizer(smollm2):
    from transformers import AutoTokenizer

    from bench.prompts import renderer
    from launch.fastchat_entry import prepare_process

    prepare_process()
    render = renderer(str(smollm2), AutoTokenizer.from_pretrained(smollm2))
    for target in (1000, 4000):
        a, ids_a = build_prompt(render, target, "x-0")
        b, ids_b = build_prompt(render, target, "x-1")
        assert target * 0.97 <= len(ids_a) <= target and target * 0.97 <= len(ids_b) <= target
        common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
        assert common < 64  # the chat template's system prompt only


def test_a_prompt_that_would_not_fit_is_shortened():
    assert fitting_length(4000, 32768) == 4000
    assert fitting_length(4000, 2048) < 2048


def test_plan_honours_quick_and_no_long_prompts():
    assert PromptPlan.of(parse_args([])) == PromptPlan(LENGTHS, 3)
    assert PromptPlan.of(parse_args([])).lengths == (1000, 4000)
    assert PromptPlan.of(parse_args(["--quick"])) == PromptPlan((1000,), 1)
    assert PromptPlan.of(parse_args(["--repeats", "5"])).repeats == 5
    off = PromptPlan.of(parse_args(["--no-long-prompts"]))
    assert off.lengths == ()
    assert PromptPlan.of(parse_args(["--quick", "--no-long-prompts"])).lengths == ()
    # Nothing is started or asked for when the plan measures nothing.
    assert measure(None, ["m"], off, "http://unused", {}, {}) is None


SHAPE = ModelShape(linear_params=1_000_000, head_params=50_000, layers=2, heads=4, head_dim=8)


def test_prompt_flops():
    # 2 per weight per token, the head once, causal attention: 2 products x 2 x heads x dim x T(T+1)/2 per layer.
    assert prompt_flops(SHAPE, 1) == 2e6 + 1e5 + 2 * 2 * 2 * 4 * 8 * 1
    assert prompt_flops(SHAPE, 100) == pytest.approx(2e8 + 1e5 + 2 * 2 * 2 * 4 * 8 * 100 * 101 / 2)


def test_ratio_is_paired_per_repeat():
    s = paired_ratio([2.0, 3.0, 4.0], [1.0, 2.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.5, 2.0, 3)
    assert paired_ratio([], []) is None


def test_peak_is_the_faster_path():
    assert peak_gflops({"torch": {"median": 400.0}, "kernel": {"median": 420.0}}) == 420.0
    assert peak_gflops({"torch": {"median": 400.0}, "kernel": None}) == 400.0
    assert peak_gflops({"error": "x"}) is None


def fake_prompts() -> dict:
    rec = {"tokens": [1000, 990, 1000], "served": [2.0, 2.2, 2.1], "engine": [1.8, 2.0, 1.9],
           "torch": [2.5, 2.4, 2.6]}
    length = summarize(rec, SHAPE, peak=100.0)
    return {"cpu_model": "AMD EPYC", "cpu_units": ["avx2", "avx512_bf16"], "plan": {"lengths": [1000], "repeats": 3},
            "paths": {"bfloat16": {"linear": "the AVX512_BF16 kernel (linear_avx512bf16.c)",
                                   "attention": "attention.c up to 1024 prompt tokens, torch's SDPA (flash) beyond"}},
            "matmul_peak_gflops": {"bfloat16": {"dtype": "bfloat16", "shape": [2048, 2048, 2048], "threads": 2,
                                                "torch": {"median": 90.0, "min": 80.0, "max": 95.0, "n": 8},
                                                "kernel": {"median": 100.0, "min": 99.0, "max": 101.0, "n": 8},
                                                "kernel_name": "the AVX512_BF16 kernel (linear_avx512bf16.c)"}},
            "models": {"m": {"dtype": "bfloat16", "threads": 2, "lengths": {"1000": length}},
                       "broken": {"error": "RuntimeError: no"}}}


def test_summary_of_fake_timings():
    v = fake_prompts()["models"]["m"]["lengths"]["1000"]
    assert v["served_s"]["median"] == 2.1 and v["torch_s"]["median"] == 2.5
    # Per repeat (2.0/2.5, 2.2/2.4, 2.1/2.6), then the median: not the ratio of the medians (2.1/2.5).
    assert v["served_vs_torch"]["median"] == pytest.approx(2.1 / 2.6)
    assert v["served_vs_torch"]["min"] == pytest.approx(2.0 / 2.5)
    assert v["served_vs_torch"]["max"] == pytest.approx(2.2 / 2.4)
    assert v["served_tokens_per_s"]["median"] == pytest.approx(1000 / 2.1)
    # FLOPs / seconds / peak, per repeat, then the median.
    assert v["torch_fraction_of_matmul_peak"]["median"] == pytest.approx(prompt_flops(SHAPE, 1000) / 2.5 / 100e9)
    assert v["api_overhead_s"] == pytest.approx(2.1 - 1.9)


def test_json_fields_and_table_block():
    prompts = fake_prompts()
    fields = long_prompt_fields(prompts)
    assert fields["prefill_vs_torch_ratio"]["m"]["1000"]["median"] == pytest.approx(2.1 / 2.6)
    assert set(fields["prompt_fraction_of_matmul_peak"]["m"]["1000"]) == {"served", "engine", "torch"}
    assert fields["prefill_vs_torch_ratio"]["broken"] == {}
    assert long_prompt_fields(None) == {}
    out = report_json([], {}, None, {}, prompts)
    json.dumps(out)  # the report is written as JSON
    assert out["long_prompts"]["cpu_model"] == "AMD EPYC"
    assert "prefill_vs_torch_ratio" not in report_json([], {}, None, {})
    text = "\n".join(long_prompt_lines(prompts))
    assert "AMD EPYC" in text and "linear_avx512bf16.c" in text and "attention.c" in text
    assert "served/PyTorch x0.81 (0.80-0.92)" in text and "broken: failed" in text
    assert table([], {}, None, prompts).endswith(long_prompt_lines(prompts)[-1])
    assert long_prompt_lines(None) == []


# ---- the stock twin: FastChat's stock worker beside each default worker, in the same stack ----

def bench_stack(tmp_path):
    from bench.cli import _bench_config
    from launch.config import load_config

    cfg = load_config()
    names = [m.name for m in cfg.models]
    return cfg, names, load_config(_bench_config(cfg, names, None, tmp_path / "run"))


def test_plan_runs_the_stock_twin_unless_told_not():
    assert PromptPlan.of(parse_args([])).stock_twin
    assert PromptPlan.of(parse_args(["--quick"])).stock_twin
    assert not PromptPlan.of(parse_args(["--no-stock-twin"])).stock_twin
    assert PromptPlan.of(parse_args(["--quick", "--no-stock-twin"])).lengths == (1000,)


def test_stock_twin_config_serves_the_same_model_in_the_same_stack(tmp_path):
    from bench.cli import selected_models
    from bench.prompts import stock_env, twin_config, twin_name
    from launch.config import load_config
    from launch.services import worker_env, worker_spec

    cfg, names, stack = bench_stack(tmp_path)
    for name in names:
        m = stack.model(name)
        twin_cfg = load_config(twin_config(stack, name, tmp_path, 40123))
        assert [t.name for t in twin_cfg.models] == [f"{name}:fastchat"] == [twin_name(name)]
        twin = twin_cfg.model(twin_name(name))
        assert twin.worker == "fastchat" and m.worker == "batching"
        assert twin_cfg.model_path(twin) == stack.model_path(m)
        assert (twin.dtype, twin.trust_remote_code, twin.stream_interval) == (m.dtype, m.trust_remote_code,
                                                                              m.stream_interval)
        # The same thread count as the default worker, pinned (a one-entry config's "auto" is every core too,
        # but the stack's count is the one to match); registered with the stack's controller, from its run folder.
        assert twin.threads == stack.threads(m)
        assert twin_cfg.controller_url() == stack.controller_url() and twin_cfg.run_dir() == stack.run_dir()
        spec = worker_spec(twin_cfg, twin)
        assert "fastchat.serve.model_worker" in spec.argv and spec.port == 40123
        assert spec.argv[spec.argv.index("--model-names") + 1] == twin.name
        assert spec.argv[spec.argv.index("--controller-address") + 1] == stack.controller_url()
        assert "--threads" not in spec.argv  # the stock worker's only thread setting is its environment:
        env = stock_env(stack, twin_cfg, name)
        default = worker_env(stack, m)
        assert {k: v for k, v in env.items() if "THREADS" in k or "WAIT" in k} == \
            {k: v for k, v in default.items() if "THREADS" in k or "WAIT" in k}
        assert env["CPU_ARENA_MODEL"] == twin.name and env["CPU_ARENA_CONFIG"] == str(twin_cfg.source)
    # The twins are in no config the other parts read: not the bench's stack, not the models they measure.
    assert [m.name for m in stack.models] == names == selected_models(cfg, None)
    assert all(m.worker == "batching" for m in stack.models) and stack.shares_cores()


def test_a_stock_twin_in_the_stack_config_would_change_the_default_workers(tmp_path):
    """Why the twin is started for the long prompts only: as an entry of the stack's config a stock worker ends
    the core sharing, so every default worker would run on a static share of the cores (if this fails, the
    launch code lets a stock worker in beside the lease, and the twin could be a config entry)."""
    import tomllib

    from bench.prompts import twin_name
    from launch.config import load_config, write_config

    _, names, stack = bench_stack(tmp_path)
    raw = tomllib.loads(stack.source.read_text())
    twins = [dict(m, name=twin_name(m["name"]), worker="fastchat", port=m["port"] + 1) for m in raw["models"]]
    with_twins = load_config(write_config(tmp_path / "with-twins.toml", raw["server"], raw["models"] + twins))
    assert stack.shares_cores() and not with_twins.shares_cores()
    if len(names) > 1 or stack.threads(stack.models[0]) > 1:
        assert [with_twins.threads(with_twins.model(n)) for n in names] != [stack.threads(stack.model(n)) for n in names]


@pytest.mark.parametrize("argv, worker, reason", [(["--no-stock-twin"], "batching", "--no-stock-twin"),
                                                   ([], "fastchat", "served by the fastchat worker itself")])
def test_no_stock_twin_is_started_when_not_asked_or_not_needed(tmp_path, monkeypatch, argv, worker, reason):
    from bench import prompts
    from bench.cli import _bench_config
    from launch.config import load_config

    cfg = load_config()
    stack = load_config(_bench_config(cfg, [cfg.models[0].name], None if worker == "batching" else worker,
                                      tmp_path / "run"))

    def never(*a, **k):
        raise AssertionError("a stock twin was started")

    monkeypatch.setattr(prompts, "StockTwin", never)
    out: dict = {}
    assert prompts._start_twin(stack, cfg.models[0].name, PromptPlan.of(parse_args(argv)), out, lambda line: None) is None
    assert reason in out["stock_twin"]["skipped"]


def test_served_vs_stock_is_paired_per_repeat_and_reported():
    rec = {"tokens": [1000, 990, 1000], "served": [2.0, 2.2, 2.1], "stock": [2.5, 2.0, 3.0],
           "engine": [1.8, 2.0, 1.9], "torch": [2.5, 2.4, 2.6]}
    v = summarize(rec, SHAPE, peak=100.0)
    assert v["stock_s"]["median"] == 2.5
    # Per repeat (2.0/2.5, 2.2/2.0, 2.1/3.0), then the median: not 2.1/2.5 = 0.84, the ratio of the medians.
    assert v["served_vs_stock"]["median"] == pytest.approx(0.8)
    assert (v["served_vs_stock"]["min"], v["served_vs_stock"]["max"]) == (pytest.approx(0.7), pytest.approx(1.1))
    prompts = fake_prompts()
    prompts["models"]["m"]["lengths"]["1000"] = v
    prompts["models"]["m"]["stock_twin"] = {"name": "m:fastchat", "worker": "fastchat", "threads": 2}
    prompts["models"]["x"] = {"stock_twin": {"name": "x:fastchat", "error": "RuntimeError: not registered"},
                              "lengths": {"1000": summarize(dict(rec, stock=[]), SHAPE, peak=100.0)}}
    fields = report_json([], {}, None, {}, prompts)
    json.dumps(fields)
    assert fields["served_vs_stock_ratio"]["m"]["1000"]["median"] == pytest.approx(0.8)
    assert fields["served_vs_stock_ratio"]["x"]["1000"] is None  # no twin: no ratio
    assert fields["long_prompts"]["models"]["m"]["lengths"]["1000"]["stock_s"]["median"] == 2.5
    text = "\n".join(long_prompt_lines(prompts))
    assert "stock FastChat worker m:fastchat served TTFT 2.50 (2.00-3.00) s; served/stock x0.80 (0.70-1.10)" in text
    assert "x: stock twin failed (RuntimeError: not registered)" in text and "x:fastchat served TTFT" not in text
