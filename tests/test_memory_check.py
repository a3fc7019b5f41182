"""The memory check of `launch check` / `launch up`: weight bytes from checkpoint headers in the served
dtype, the machine's available memory, and one refusal naming every model, its need and the ways out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from launch import memory_check
from launch.cli import main
from launch.config import load_config
from launch.memory_check import GB, SERVICES_BYTES, WORKER_OVERHEAD_BYTES, Available
from launch.ports import on_free_ports
from tests.stackutil import write_config

# Known shapes: 10x4 + 3x5 = 55 floating elements, and a 6-element int64 buffer (48 bytes) that
# keeps its dtype whatever the served one.
FLOATS = 55
INTS = 48


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.ones(10, 4, dtype=dtype), "proj.weight": torch.ones(3, 5, dtype=dtype),
            "position_ids": torch.arange(6)}


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def _safetensors_model(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    save_file(_state(dtype), str(_checkpoint(folder) / "model.safetensors"))
    return folder


def test_safetensors_bytes_in_the_served_dtype(tmp_path):
    folder = _safetensors_model(tmp_path / "m")
    t = memory_check.count_tensors(folder)
    assert (t.float_numel, t.other_bytes, t.files) == (FLOATS, INTS, 1)
    assert memory_check.weight_bytes(folder, "bfloat16") == FLOATS * 2 + INTS
    assert memory_check.weight_bytes(folder, "float32") == FLOATS * 4 + INTS


def test_auto_resolves_like_the_worker(tmp_path, monkeypatch):
    folder = _safetensors_model(tmp_path / "m")
    monkeypatch.setattr("engine.host.hardware.has_fast_bf16", lambda: False)
    assert memory_check.weight_bytes(folder, "auto") == FLOATS * 4 + INTS
    monkeypatch.setattr("engine.host.hardware.has_fast_bf16", lambda: True)
    assert memory_check.weight_bytes(folder, "auto") == FLOATS * 2 + INTS


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fp16_checkpoint_served_in_bf16_and_fp32(tmp_path, fmt):
    # ChatGLM3 ships fp16 weights; the worker casts them to the configured dtype.
    folder = _checkpoint(tmp_path / "glm")
    if fmt == "safetensors":
        save_file(_state(torch.float16), str(folder / "model.safetensors"))
    else:
        torch.save(_state(torch.float16), folder / "pytorch_model.bin")
    assert memory_check.weight_bytes(folder, "bfloat16") == FLOATS * 2 + INTS
    assert memory_check.weight_bytes(folder, "float32") == FLOATS * 4 + INTS


def test_sharded_safetensors_with_index(tmp_path):
    folder = _checkpoint(tmp_path / "sharded")
    shards = {"model-00001-of-00002.safetensors": {"a": torch.zeros(7, 3, dtype=torch.bfloat16)},
              "model-00002-of-00002.safetensors": {"b": torch.zeros(5, dtype=torch.float32),
                                                   "c": torch.zeros(2, 2, dtype=torch.float16)}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # A stray file the index does not list is not loaded, so not counted.
    save_file({"x": torch.zeros(1000)}, str(folder / "consolidated.safetensors"))
    assert memory_check.count_tensors(folder).files == 2
    assert memory_check.weight_bytes(folder, "bfloat16") == (21 + 5 + 4) * 2
    assert memory_check.weight_bytes(folder, "float32") == (21 + 5 + 4) * 4


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_shards_with_index_and_tied_weights(tmp_path, zip_format):
    folder = _checkpoint(tmp_path / "bin")
    emb = torch.zeros(10, 4, dtype=torch.float16)
    shards = {"pytorch_model-00001-of-00002.bin": {"embed": emb, "lm_head": emb},  # tied: one tensor loaded
              "pytorch_model-00002-of-00002.bin": {"w": torch.zeros(3, 5, dtype=torch.float16),
                                                   "half_of": torch.zeros(8)[2:6], "ids": torch.arange(6)}}
    weight_map = {}
    for name, state in shards.items():
        torch.save(state, folder / name, _use_new_zipfile_serialization=zip_format)
        weight_map.update(dict.fromkeys(state, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    t = memory_check.count_tensors(folder)
    assert (t.float_numel, t.other_bytes, t.files) == (40 + 15 + 4, INTS, 2)


def test_bin_with_a_global_beyond_a_state_dict_goes_through_torch(tmp_path):
    folder = _checkpoint(tmp_path / "odd")
    torch.save({"w": torch.zeros(3, 5, dtype=torch.float16), "dtype": torch.float16}, folder / "pytorch_model.bin")
    assert memory_check.weight_bytes(folder, "bfloat16") == 15 * 2


def test_shapes_come_from_the_header_not_the_data(tmp_path):
    # A header announcing 40 GB of fp32 with no data behind it: counted without reading any.
    folder = _checkpoint(tmp_path / "big")
    header = json.dumps({"w": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 4 * 10**10]}})
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())
    t0 = time.monotonic()
    assert memory_check.weight_bytes(folder, "bfloat16") == 2 * 10**10
    assert time.monotonic() - t0 < 1


def test_a_corrupt_header_is_a_checkpoint_error(tmp_path):
    folder = _checkpoint(tmp_path / "bad")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(memory_check.CheckpointError, match="safetensors"):
        memory_check.count_tensors(folder)


# ---- available memory ----

def _fake_proc(tmp_path: Path, cgroup_line: str, mem_available_kb: int = 10 * 2**20) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 20000000 kB\nMemAvailable: {mem_available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    return proc


def test_available_is_meminfo_without_a_cgroup_limit(tmp_path):
    proc = _fake_proc(tmp_path, "0::/user.slice")
    fs = tmp_path / "cg"
    (fs / "user.slice").mkdir(parents=True)
    (fs / "user.slice" / "memory.max").write_text("max\n")
    a = memory_check.available_memory(proc, fs)
    assert a == Available(10 * 2**30, "MemAvailable in /proc/meminfo")


def test_a_cgroup_v2_limit_bounds_available(tmp_path):
    proc = _fake_proc(tmp_path, "0::/box")
    box = tmp_path / "cg" / "box"
    box.mkdir(parents=True)
    (box / "memory.max").write_text(f"{4 * GB}\n")
    (box / "memory.current").write_text(f"{3 * GB}\n")
    (box / "memory.stat").write_text(f"anon 100\ninactive_file {GB}\n")  # page cache it can reclaim
    a = memory_check.available_memory(proc, tmp_path / "cg")
    assert a.bytes == 2 * GB and "memory.max" in a.source


def test_a_cgroup_v1_limit_on_an_ancestor_bounds_available(tmp_path):
    # A container sees the host's cgroup path, which does not exist under its own mount: the root counts.
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc")
    mem = tmp_path / "cg" / "memory"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(f"{3 * GB}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{GB}\n")
    (mem / "memory.stat").write_text("total_inactive_file 0\n")
    a = memory_check.available_memory(proc, tmp_path / "cg")
    assert a.bytes == 2 * GB and "memory.limit_in_bytes" in a.source


# ---- the check in `launch check` / `launch up` ----

def _config(tmp_path: Path, models: list[dict], **server) -> Path:
    base, models = on_free_ports({"run_dir": str(tmp_path / "run"), **server}, models)
    return write_config(tmp_path / "arena.toml", base, models)


@pytest.fixture
def two_models(tmp_path) -> Path:
    return _config(tmp_path, [
        {"name": "big-bf16", "path": str(_safetensors_model(tmp_path / "a")), "dtype": "bfloat16"},
        {"name": "big-fp32", "path": str(_safetensors_model(tmp_path / "b")), "dtype": "float32"},
    ])


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory", lambda: Available(2 * GB, "fake MemAvailable"))


def test_check_refuses_models_that_do_not_fit(two_models, small_machine, capsys):
    t0 = time.monotonic()
    assert main(["check", "--config", str(two_models)]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    worker = WORKER_OVERHEAD_BYTES + 256 * 2**20
    need = SERVICES_BYTES + 2 * worker + FLOATS * 2 + FLOATS * 4 + 2 * INTS
    assert err.count("error:") == 1  # one message, every model in it
    assert f"need {need / GB:.1f} GB" in err and "2.0 GB available (fake MemAvailable)" in err
    assert f"big-bf16  bfloat16  0.0 GB weights + {worker / GB:.1f} GB worker" in err
    assert "big-fp32  float32" in err
    assert "serve fewer models" in err and "Multi-host" in err and "make worker" in err
    assert "serve big-fp32 in bfloat16" in err and "big-bf16 in bfloat16" not in err
    assert "--skip-memory-check" in err and "skip_memory_check = true" in err


def test_up_refuses_before_starting_anything(two_models, small_machine, capsys):
    assert main(["up", "--config", str(two_models)]) == 2
    assert "Ways out" in capsys.readouterr().err
    assert not load_config(two_models).run_dir().exists()


def test_the_flag_skips_the_check(two_models, small_machine, capsys):
    assert main(["check", "--config", str(two_models), "--skip-memory-check"]) == 0
    assert "OK (2 models)" in capsys.readouterr().out


def test_the_config_key_skips_the_check(tmp_path, small_machine, capsys):
    cfg = _config(tmp_path, [{"name": "m", "path": str(_safetensors_model(tmp_path / "a")), "dtype": "float32"}],
                  skip_memory_check=True)
    assert main(["check", "--config", str(cfg)]) == 0


def test_models_that_fit_pass(two_models, monkeypatch, capsys):
    monkeypatch.setattr(memory_check, "available_memory", lambda: Available(64 * GB, "fake MemAvailable"))
    assert main(["check", "--config", str(two_models)]) == 0


def test_a_model_not_downloaded_is_skipped(tmp_path, monkeypatch):
    # Enough memory for one worker, not two: the missing one is not counted (check_paths reports it).
    cfg = load_config(_config(tmp_path, [
        {"name": "here", "path": str(_safetensors_model(tmp_path / "a")), "dtype": "bfloat16"},
        {"name": "later", "path": str(tmp_path / "not-downloaded"), "dtype": "bfloat16"},
    ]))
    monkeypatch.setattr(memory_check, "available_memory", lambda: Available(3 * GB, "fake"))
    result = memory_check.enforce(cfg)
    assert [m.name for m in result.models] == ["here"]
    assert result.skipped == (("later", "not downloaded yet"),)
    assert result.fits
