"""The shape bench's checkpoints (bench/shapes.py): written in the lab models' published layout, loaded by the
worker's native loader, the load's memory measured in a process of its own. On tiny dimensions: the real shapes
are 13-16 GB and take minutes (`make bench ARGS='--shape chatglm3-6b'`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from bench import shapes
from tests.fixtures.seed_models import CHATGLM3_TINY, GLM, QWEN, QWEN_TINY
from worker_adapters.native_loader import load_native, safetensors_tensors

# The seed fixtures' tiny dimensions (the real vocabularies: Qwen's pad id is 151643).
TINY = {"chatglm3-6b": CHATGLM3_TINY, "qwen-7b": QWEN_TINY}
NATIVE = {"chatglm3-6b": "GlmForCausalLM", "qwen-7b": "Qwen2ForCausalLM"}


def tiny_shape(name: str) -> shapes.Shape:
    real = shapes.SHAPES[name]
    return shapes.Shape(name, real.config | TINY[name], real.stored)


def _file_tensors(folder) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """name -> (shape, dtype, shard file) of every tensor in a folder's safetensors shards, from their headers."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                s = shard.get_slice(name)
                out[name] = (tuple(s.get_shape()), s.get_dtype(), f.name)
    return out


@pytest.mark.parametrize("name", list(shapes.SHAPES))
def test_the_writer_lays_out_the_declared_tensors_in_shards_that_load_native_loads(name, tmp_path):
    shape = tiny_shape(name)
    declared = shapes.published_tensors(shape.config)
    total = shapes.write_checkpoint(tmp_path, shape.config, shape.stored_dtype, shard_bytes=100_000)
    found = _file_tensors(tmp_path)
    stored = {"float16": "F16", "bfloat16": "BF16"}[shape.stored]
    assert {n: s for n, (s, _, _) in found.items()} == dict(declared)
    assert {d for _, d, _ in found.values()} == {stored}
    # Sharded in order, each shard within its budget unless one tensor is larger on its own; the index says where.
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for n, (_, _, f) in found.items()}
    assert index["metadata"]["total_size"] == total == sum(
        torch.Size(s).numel() * shape.stored_dtype.itemsize for _, s in declared)
    assert json.loads((tmp_path / "config.json").read_text()) == shape.config
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *(f.name for f in files)])  # no modelling code

    model = load_native(tmp_path, torch.bfloat16)
    assert type(model).__name__ == NATIVE[name]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Every published element is served except the rotary frequencies, which the native model recomputes.
    served = sum(torch.Size(s).numel() for n, s in declared if not n.endswith("inv_freq"))
    assert sum(p.numel() for p in model.parameters()) == served
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, shape.config.get("padded_vocab_size") or shape.config["vocab_size"])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "lab"), [("chatglm3-6b", GLM), ("qwen-7b", QWEN)])
def test_the_shape_table_and_layout_are_the_published_ones(name, lab, lab_models, tmp_path):
    """The checkpoints the seed fixtures build with the published code (its own tensor names and shapes,
    the published config.json with sizes shrunk) against the shape table and the writer."""
    published = json.loads((lab_models[lab] / "config.json").read_text())
    shrunk = {"chatglm3-6b": CHATGLM3_TINY, "qwen-7b": QWEN_TINY}[name]
    table = shapes.SHAPES[name].config
    assert {k: v for k, v in published.items() if k != "auto_map"} == table | shrunk
    expected = _file_tensors(lab_models[lab])
    assert dict(shapes.published_tensors(published)) == {n: s for n, (s, _, _) in expected.items()}
    assert {d for _, d, _ in expected.values()} == {{"float16": "F16", "bfloat16": "BF16"}[shapes.SHAPES[name].stored]}


def test_the_published_dimensions_give_the_known_sizes():
    """ChatGLM3-6B: 6.24 B parameters, Qwen-7B-Chat: 7.72 B (the models' cards round them to 6B and 7B)."""
    sizes = {n: sum(torch.Size(s).numel() for _, s in shapes.published_tensors(shapes.SHAPES[n].config))
             for n in shapes.SHAPES}
    assert round(sizes["chatglm3-6b"] / 1e9, 2) == 6.24 and round(sizes["qwen-7b"] / 1e9, 2) == 7.72


def test_a_checkpoint_is_written_once_then_reused_and_rewritten_when_the_table_changes(tmp_path):
    shape = tiny_shape("qwen-7b")
    folder, written = shapes.shape_checkpoint(shape, tmp_path, shard_bytes=100_000, log=lambda *a, **k: None)
    assert folder == tmp_path / "qwen-7b" and written is not None and written > 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again, written = shapes.shape_checkpoint(shape, tmp_path, shard_bytes=100_000, log=lambda *a, **k: None)
    assert again == folder and written is None
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    wider = shapes.Shape(shape.name, shape.config | {"num_hidden_layers": 3}, shape.stored)
    assert not shapes.is_complete(folder, wider.config)
    _, written = shapes.shape_checkpoint(wider, tmp_path, shard_bytes=100_000, log=lambda *a, **k: None)
    assert written is not None and shapes.is_complete(folder, wider.config)
    assert [p.name for p in tmp_path.iterdir()] == ["qwen-7b"]  # no partial folder left behind
    # A shard gone: not taken for the checkpoint.
    next(folder.glob("model-*.safetensors")).unlink()
    assert not shapes.is_complete(folder, wider.config)


def test_the_load_is_measured_in_a_child_process(tmp_path):
    shape = tiny_shape("chatglm3-6b")
    shapes.write_checkpoint(tmp_path, shape.config, shape.stored_dtype, shard_bytes=100_000)
    load = shapes.measure_load(tmp_path, "bfloat16")
    weights = sum(p.numel() * p.element_size() for p in load_native(tmp_path, torch.bfloat16).parameters())
    assert load.weights_bytes == weights
    # The interpreter with torch and transformers alone is some hundreds of MB: the peak is at least that.
    assert 50e6 < load.before_rss_bytes <= load.peak_rss_bytes < 4e9
    assert load.sampled_peak_anon_bytes > 0 and load.after_anon_bytes > 0 and load.after_file_bytes > 0
    assert load.load_s > 0 and load.ratio == load.peak_rss_bytes / weights


def test_a_failed_child_load_says_why(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RuntimeError, match="no native layout"):
        shapes.measure_load(tmp_path)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_the_loaders_reader_gives_what_safetensors_gives(dtype, tmp_path):
    """native_loader reads safetensors itself (plain reads: nothing of the file stays in the RSS), converting
    floating tensors to the served dtype as it reads, in chunks smaller than a tensor."""
    from safetensors.torch import load_file, save_file

    import worker_adapters.native_loader as loader

    gen = torch.Generator().manual_seed(0)
    saved = {"big": torch.randn(300, 1000, generator=gen).half(), "ids": torch.arange(7), "empty": torch.zeros(0, 4),
             "scalar": torch.tensor(3.5, dtype=torch.float16), "mask": torch.tensor([True, False])}
    save_file(saved, str(tmp_path / "x.safetensors"))
    expected = load_file(str(tmp_path / "x.safetensors"))
    stage, loader.STAGE_BYTES = loader.STAGE_BYTES, 4096  # many chunks per tensor
    try:
        got = dict(safetensors_tensors(tmp_path / "x.safetensors", dtype))
    finally:
        loader.STAGE_BYTES = stage
    assert set(got) == set(expected)
    for name, t in expected.items():
        want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    # A truncated file is refused, not read as zeros.
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        dict(safetensors_tensors(tmp_path / "cut.safetensors"))


def _linear_params(config: dict) -> tuple[int, int]:
    """(decoder linears' weights, output projection's) of a shape, from its published tensors: what a prompt pass
    multiplies every token by, and the last position only."""
    import math

    heads = ("lm_head.weight", "transformer.output_layer.weight")
    embeddings = ("transformer.wte.weight", "transformer.embedding.word_embeddings.weight")
    tensors = shapes.published_tensors(config)
    linear = sum(math.prod(s) for n, s in tensors if len(s) == 2 and n not in heads + embeddings)
    return linear, sum(math.prod(s) for n, s in tensors if n in heads)


@pytest.mark.parametrize("name", list(shapes.SHAPES))
def test_the_shape_bench_measures_the_natively_loaded_model(name, tmp_path, monkeypatch, capsys):
    """run_shape end to end on the tiny shape: checkpoint written, load measured in a child, the model loaded by
    load_native and put on the kernels, and the report names the shape, the path and the load's memory. Beside
    the engine, plain PyTorch on the same model: timed before engine.kernels.install, the engine's prompt passes
    after it through engine.prefill.prefill, and the ratios and fractions of the peak are those of the times."""
    import statistics

    import engine.kernels
    import engine.kernels.native
    import engine.prefill
    from bench import cli as bench
    from bench import prompts as bench_prompts
    from bench import raw as bench_raw
    from bench import shape_run
    from bench.stats import _s
    from engine.kernels import decode_step

    class Probe:  # a fixed 10 GB/s: the measurement's arithmetic is test_bench_stats'; here the path is
        def __init__(self, n_threads, mb=512):
            pass

        def __call__(self):
            return 10e9

    monkeypatch.setitem(shapes.SHAPES, name, tiny_shape(name))
    # Not XDG_CACHE_HOME: the kernels' and the read probe's builds are cached there, once per process.
    monkeypatch.setattr(shapes, "cache_root", lambda: tmp_path / "shapes")
    monkeypatch.setattr(bench_raw, "ReadProbe", Probe)
    # Fixed matmul peaks (its own child is test_bench_prompts'): read at the start and at the end of the run, the
    # faster of torch's and the kernel's, of the faster reading, is the one used (3.0 GFLOP/s here).
    readings = iter([(2.0, 3.0), (2.5, 1.0), (9.0, 9.0)])

    def fake_peak(dtype, threads):
        t, k = next(readings)
        return {"dtype": dtype, "threads": threads, "shape": [8, 8, 8], "kernel_name": "k",
                "torch": {"median": t, "min": t, "max": t, "n": 1}, "kernel": {"median": k, "min": k, "max": k, "n": 1}}

    monkeypatch.setattr(bench_prompts, "measure_peak", fake_peak)
    # What ran, in order: each side's prompt passes, the install between them, the worker's prefill inside.
    events: list[tuple] = []

    def record(label, fn, size=lambda *a, **k: len(a[1])):
        def wrapped(*a, **k):
            events.append((label, size(*a, **k)))
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(shape_run, "torch_prompt_pass", record("torch", shape_run.torch_prompt_pass))
    monkeypatch.setattr(shape_run, "engine_prompt_pass", record("engine", shape_run.engine_prompt_pass))
    monkeypatch.setattr(engine.prefill, "prefill", record("prefill", engine.prefill.prefill, lambda m, p, *a, **k: len(p[0])))
    monkeypatch.setattr(engine.kernels, "install", record("install", engine.kernels.install, lambda *a, **k: None))
    native = []  # decode steps on decode_step.c
    real_step = decode_step.NativeDecodeStep.__call__
    monkeypatch.setattr(decode_step.NativeDecodeStep, "__call__", lambda self, *a: native.append(1) or real_step(self, *a))
    out_path = tmp_path / "shape.json"
    args = bench.parse_args(["--shape", name, "--tokens", "3", "--repeats", "2", "--json", str(out_path)])
    args.shape_prompts = (8, 40)  # --shape-prompts
    start = time.perf_counter()
    assert bench.run_shape(args) == 0
    out = json.loads(out_path.read_text())
    printed = capsys.readouterr().out
    assert out["shape"] == name and NATIVE[name] in out["path"] and "load_native" in out["path"]
    assert out["checkpoint"] == str(tmp_path / "shapes" / name)
    assert out["checkpoint_dtype"] == shapes.SHAPES[name].stored
    assert 0 < out["checkpoint_written_s"] < time.perf_counter() - start
    assert out["load_rss"]["weights_bytes"] == out["weights_bytes"]
    assert out["load_rss_ratio"] == pytest.approx(out["load_peak_rss_bytes"] / out["weights_bytes"])
    assert out["load_peak_rss_bytes"] == out["load_rss"]["peak_rss_bytes"] > 0
    assert out["batch4_ratio"] == pytest.approx(out["batch4_aggregate_tokens_per_s"]["median"]
                                                / out["decode_tokens_per_s"]["median"])
    assert out["roofline_fraction"][name] > 0
    assert f"\n{name} (random weights" in printed and out["path"] in printed and f"{out['load_rss_ratio']:.3f} x" in printed

    # Plain PyTorch first on the model as loaded (a warm-up pass, then every prompt), the kernels installed once,
    # then the engine on the same prompts, each of its passes the worker's prefill; then decode as the worker
    # decodes (bench.raw.engine_steps), each run of steps after the worker's prefill of the 64-token prompt: one to
    # warm up, two per repeat, one at batch 4.
    warm = bench_prompts.WARM_TOKENS
    torch_side = [("torch", n) for n in (warm, 8, 8, 40, 40)]
    engine_side = [e for n in (warm, 8, 8, 40, 40) for e in (("engine", n), ("prefill", n))]
    decode_side = [("prefill", shape_run.TTFT_TOKENS)] * (1 + 2 * 2 + 1)
    assert events == [*torch_side, ("install", None), *engine_side, *decode_side]
    # Qwen-7B loads as Qwen2ForCausalLM: its steps are the worker's one-call step where the CPU has AVX512_BF16;
    # ChatGLM3-6B's GLM architecture decodes through its forward.
    kernel = engine.kernels.native.native_kernel()[0]
    one_call = name == "qwen-7b" and kernel is not None and kernel.bf16_units
    assert len(native) == (1 + 2 * 2 * 2 + 2 if one_call else 0)
    assert ("decode steps on decode_step.c" if one_call else "decode steps on the model forward (") in out["kernels"]
    assert out["cpu"] and out["cpu"] in printed and isinstance(out["cpu_units"], list)
    # The 64-token first token: the engine's figure and plain PyTorch's, timed alike, and their ratio.
    assert out["torch_ttft_64_tokens_s"]["n"] == 2 and out["torch_ttft_64_tokens_s"]["median"] > 0
    assert out["ttft_64_vs_torch_ratio"] == pytest.approx(out["ttft_64_tokens_s"]["median"]
                                                          / out["torch_ttft_64_tokens_s"]["median"])
    prompts = out["prompts"]
    assert prompts["matmul_peak_used_gflops"] == 3.0
    assert [(r["torch"]["median"], r["kernel"]["median"]) for r in prompts["matmul_peak_gflops"]] == [(2.0, 3.0), (2.5, 1.0)]
    shape = bench_prompts.ModelShape(**prompts["model_shape"])
    # Counted on the plain model: after install its linears are no nn.Linear any more.
    assert (shape.linear_params, shape.head_params) == _linear_params(shapes.SHAPES[name].config)
    assert list(prompts["lengths"]) == list(out["prefill_vs_torch_ratio"][name]) == ["8", "40"]
    for k, v in prompts["lengths"].items():
        e, t = v["raw_s"]["engine"], v["raw_s"]["torch"]
        assert len(e) == len(t) == 2 and v["tokens"] == [int(k)] * 2
        assert v["engine_s"]["median"] == pytest.approx(statistics.median(e))
        ratio = out["prefill_vs_torch_ratio"][name][k]
        assert ratio == v["engine_vs_torch"]
        assert ratio["median"] == pytest.approx(statistics.median(e) / statistics.median(t))
        assert (ratio["min"], ratio["max"]) == pytest.approx((min(e) / max(t), max(e) / min(t)))
        flops = bench_prompts.prompt_flops(shape, int(k))
        for side, times in (("engine", e), ("torch", t)):
            assert out["prompt_fraction_of_matmul_peak"][name][k][side] == pytest.approx(
                statistics.median([flops / s / 3e9 for s in times]))
            assert out["prompt_tokens_per_s"][name][k][side] == pytest.approx(statistics.median([int(k) / s for s in times]))
        # Engine and plain PyTorch only: no served path, no stock worker in the shape bench.
        assert {key.split("_")[0] for key in v} == {"engine", "torch", "tokens", "flops", "raw"}
        assert f"{k}-token prompt pass: engine {_s(v['engine_s'])} s" in printed
    assert set(out["phases_s"]) >= {"torch_s", "engine_prompts_s", "decode_s", "total_s"}

    # A second run reuses the checkpoint.
    readings = iter([(2.0, 3.0), (2.5, 1.0)])
    assert bench.run_shape(args) == 0
    assert json.loads(out_path.read_text())["checkpoint_written_s"] is None


def test_the_shape_prompt_plan():
    """64, 1,000 and 4,000 tokens by default, fewer repeats the longer the prompt; --quick, --no-long-prompts,
    --repeats and --shape-prompts as documented."""
    import argparse

    from bench.cli import parse_args
    from bench.shape_run import ShapePromptPlan, shape_prompts

    def plan(*argv, prompts=None):
        args = parse_args(["--shape", "qwen-7b", *argv])
        args.shape_prompts = prompts
        return ShapePromptPlan.of(args).repeats

    assert plan() == {64: 3, 1000: 2, 4000: 1}
    assert list(plan()) == [64, 1000, 4000]  # the order measured
    assert plan("--quick") == {64: 1, 1000: 1}
    assert plan("--no-long-prompts") == {64: 3}
    assert plan("--repeats", "2") == {64: 2, 1000: 2, 4000: 2}
    assert plan(prompts=(1000, 64)) == {1000: 2, 64: 3}
    assert shape_prompts("64, 1000,64") == (64, 1000)
    for bad in ("", "0", "64,x", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            shape_prompts(bad)


def test_engine_over_torch_of_figures_not_measured_side_by_side():
    from bench.shape_run import unpaired_ratio
    from bench.stats import Stat

    assert unpaired_ratio([2.0, 4.0, 3.0], [1.0, 2.0]) == Stat(2.0, 1.0, 4.0, 2)
    assert unpaired_ratio([5.0], [4.0]) == Stat(1.25, 1.25, 1.25, 1)
    assert unpaired_ratio([], [1.0]) is None and unpaired_ratio([1.0], []) is None


def test_the_checkpoints_live_in_the_projects_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert shapes.cache_root() == tmp_path / "cpu-arena" / "shapes"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert shapes.cache_root() == Path.home() / ".cache" / "cpu-arena" / "shapes"
