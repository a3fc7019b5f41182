"""The llama.cpp anchor (bench/llamacpp.py): the skip without llama-cpp-python, the ratios and the JSON they go into,
the converted file's cache key and cache, taking the converter out of llama-cpp-python's sdist; with llama-cpp-python
installed, a real conversion of SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from bench import llamacpp as lc


class Untouchable:
    """A stack config the skip path must not use."""

    def __getattr__(self, name):
        raise AssertionError(f"the skipped anchor used the stack's config ({name})")


# ---- the skip ----

def test_not_installed_prints_one_line_and_goes_on(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    assert lc.installed_version() is None
    lines: list[str] = []
    out = lc.measure(Untouchable(), ["smollm2-135m"], lc.AnchorPlan(16, 1, (1000,)), "http://127.0.0.1:1", {}, {},
                     progress=lines.append)
    assert lines == ["llama.cpp anchor skipped: llama-cpp-python is not installed (make anchor)"]
    assert out == {"skipped": "llama-cpp-python is not installed (make anchor)"}
    report = {"models": {"smollm2-135m": {"worker": "batching"}}}
    lc.attach(report, out)
    assert "llamacpp" not in report["models"]["smollm2-135m"]
    assert report["llamacpp_anchor"] == out
    assert lc.table_lines(out) == []  # said once, as the run went


def test_a_library_that_does_not_load_counts_as_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    assert lc.installed_version() is None


def test_no_anchor_flag_and_plan():
    from bench.cli import parse_args

    assert parse_args(["--no-anchor"]).no_anchor is True
    args = parse_args([])
    assert args.no_anchor is False
    assert lc.AnchorPlan.of(args, 48, 3) == lc.AnchorPlan(48, 3, (1000, 4000))
    assert lc.AnchorPlan.of(parse_args(["--quick"]), 16, 1).lengths == (1000,)
    assert lc.AnchorPlan.of(parse_args(["--no-long-prompts"]), 48, 3).lengths == ()


# ---- the figures ----

def fake_record() -> dict:
    return {"decode": {"served": [60.0, 66.0, 70.0], "llamacpp": [50.0, 60.0, 70.0]},
            "ttft": {"1000": {"tokens": [998, 999, 1000], "served": [0.5, 0.6, 0.4], "llamacpp": [1.0, 1.0, 0.5]},
                     "4000": {"tokens": [3990, 3999, 4000], "served": [3.0, 2.0, 4.0], "llamacpp": [2.0, 2.0, 2.0]}}}


def test_ratios_are_medians_of_per_repeat_ratios():
    e = lc.model_entry("0.3.36", "off", {"n_threads": 2}, fake_record())
    # decode: 60/50, 66/60, 70/70 = 1.2, 1.1, 1.0 -> 1.1 (the ratio of the medians would be 66/60 = 1.1 too, but
    # TTFT 1000 shows the difference: per repeat 0.5, 0.6, 0.8 -> 0.6; medians 0.5 / 1.0 = 0.5)
    assert e["decode_ratio"] == pytest.approx(1.1)
    assert e["ttft_ratio"]["1000"] == pytest.approx(0.6)
    assert e["ttft_ratio"]["4000"] == pytest.approx(1.5)  # 1.5, 1.0, 2.0: cpu-arena slower here
    assert e["ratio_noise"]["decode"] == {"median": pytest.approx(1.1), "min": pytest.approx(1.0),
                                          "max": pytest.approx(1.2), "n": 3}


def test_json_shape():
    e = lc.model_entry("0.3.36", "off", {"n_threads": 2, "n_ctx": 4160}, fake_record())
    for key in ("version", "gguf_dtype", "flash_attn", "decode_tok_s", "ttft_s", "decode_ratio", "ttft_ratio"):
        assert key in e, key
    assert (e["version"], e["gguf_dtype"], e["flash_attn"], e["n_threads"]) == ("0.3.36", "bf16", "off", 2)
    assert e["decode_tok_s"] == {"median": 60.0, "min": 50.0, "max": 70.0, "n": 3}
    assert set(e["ttft_s"]) == {"1000", "4000"} and e["ttft_s"]["1000"]["median"] == 1.0
    assert e["served"]["decode_tok_s"]["median"] == 66.0
    assert e["served"]["ttft_s"]["4000"]["median"] == 3.0
    assert e["prompt_tokens"]["4000"] == [3990, 3999, 4000]
    json.dumps(e)  # the report is JSON
    report = {"models": {"smollm2-135m": {"worker": "batching"}}}
    lc.attach(report, {"version": "0.3.36", "gguf_dtype": "bf16", "models": {"smollm2-135m": e}})
    assert report["models"]["smollm2-135m"]["llamacpp"] is e
    assert report["models"]["smollm2-135m"]["worker"] == "batching"
    assert report["llamacpp_anchor"] == {"version": "0.3.36", "gguf_dtype": "bf16"}


def test_missing_figures_give_no_ratio():
    rec = {"decode": {"served": [None], "llamacpp": [50.0]}, "ttft": {}}
    e = lc.model_entry("0.3.36", "off", {}, rec)
    assert e["decode_ratio"] is None and e["decode_tok_s"]["median"] == 50.0 and e["served"]["decode_tok_s"] is None


def test_table_lines():
    e = lc.model_entry("0.3.36", "off", {"n_threads": 2}, fake_record())
    lines = lc.table_lines({"version": "0.3.36", "models": {"smollm2-135m": e, "qwen": {"error": "RuntimeError: x"}}})
    text = "\n".join(lines)
    assert "llama-cpp-python 0.3.36" in text
    assert "decode llama.cpp 60.0 (50.0-70.0) tok/s, served 66.0 (60.0-70.0) tok/s: x1.10" in text
    assert "999-token prompt (asked 1000)" in text and "x0.60" in text and "x1.50" in text
    assert "qwen: failed (RuntimeError: x)" in text


def test_side_by_side_alternates_the_order():
    calls: list[str] = []

    def step(label, value):
        return lambda: calls.append(label) or value

    recs = [{"served": [], "llamacpp": []}, {"served": [], "llamacpp": []}]
    for r in range(2):
        lc.side_by_side([(recs[0], step("s0", 1.0), step("l0", 2.0)), (recs[1], step("s1", 3.0), step("l1", 4.0))], r)
    assert calls == ["s0", "l0", "s1", "l1", "l0", "s0", "l1", "s1"]
    assert recs == [{"served": [1.0, 1.0], "llamacpp": [2.0, 2.0]}, {"served": [3.0, 3.0], "llamacpp": [4.0, 4.0]}]


# ---- the converted file: key, cache, converter ----

def fake_checkpoint(root: Path) -> Path:
    ck = root / "Model-1B"
    ck.mkdir()
    (ck / "config.json").write_text('{"a": 1}')
    (ck / "model.safetensors").write_bytes(b"\0" * 64)
    (ck / "README.md").write_text("about")
    (ck / ".cpu-arena-source.json").write_text("{}")
    return ck


def fake_converter(root: Path, body: str = "") -> Path:
    d = root / "llama.cpp"
    (d / "conversion").mkdir(parents=True)
    (d / "gguf-py" / "gguf").mkdir(parents=True)
    (d / "conversion" / "__init__.py").write_text("# models\n")
    (d / "gguf-py" / "gguf" / "__init__.py").write_text("# gguf\n")
    (d / lc.CONVERTER).write_text(body or "# converter\n")
    return d


def test_checkpoint_hash_follows_the_weights_not_the_readme(tmp_path):
    ck = fake_checkpoint(tmp_path)
    h = lc.checkpoint_hash(ck)
    assert h == lc.checkpoint_hash(ck)
    (ck / "README.md").write_text("other words")
    (ck / ".cpu-arena-source.json").write_text('{"x": 2}')
    assert lc.checkpoint_hash(ck) == h
    (ck / "model.safetensors").write_bytes(b"\1" + b"\0" * 63)  # same size
    assert lc.checkpoint_hash(ck) != h
    (ck / "model.safetensors").write_bytes(b"\0" * 64)
    assert lc.checkpoint_hash(ck) == h
    (ck / "tokenizer.json").write_text("{}")
    assert lc.checkpoint_hash(ck) != h


def test_checkpoint_hash_memo_skips_unchanged_files(tmp_path, monkeypatch):
    ck = fake_checkpoint(tmp_path)
    memo = tmp_path / "memo.json"
    read: list[str] = []
    real = lc._file_sha256
    monkeypatch.setattr(lc, "_file_sha256", lambda p: read.append(p.name) or real(p))
    h = lc.checkpoint_hash(ck, memo)
    assert sorted(read) == ["config.json", "model.safetensors"]
    read.clear()
    assert lc.checkpoint_hash(ck, memo) == h and read == []
    st = (ck / "config.json").stat()
    (ck / "config.json").write_text('{"a": 2}')
    os.utime(ck / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert lc.checkpoint_hash(ck, memo) != h and read == ["config.json"]


def test_cache_key_and_path(tmp_path):
    k = lc.cache_key("a" * 64, "c1")
    assert k == lc.cache_key("a" * 64, "c1") and len(k) == 16
    assert len({k, lc.cache_key("b" * 64, "c1"), lc.cache_key("a" * 64, "c2"), lc.cache_key("a" * 64, "c1", "f16")}) == 4
    assert lc.gguf_path(Path("/m/SmolLM2-135M-Instruct"), k, tmp_path) == tmp_path / f"SmolLM2-135M-Instruct-{k}.bf16.gguf"


def test_converter_version_follows_its_sources(tmp_path):
    d = fake_converter(tmp_path)
    v = lc.converter_version(d)
    assert v == lc.converter_version(d)
    (d / "conversion" / "llama.py").write_text("class LlamaModel: pass\n")
    v2 = lc.converter_version(d)
    assert v2 != v
    (d / "gguf-py" / "gguf" / "constants.py").write_text("X = 1\n")
    assert lc.converter_version(d) != v2
    (d / "README.md").write_text("docs do not count")
    assert lc.converter_version(d) == lc.converter_version(d)


CONVERTER_SCRIPT = textwrap.dedent("""\
    import json, sys
    from pathlib import Path
    args = sys.argv[1:]
    out = Path(args[args.index("--outfile") + 1])
    out.write_text(json.dumps({"from": args[0], "outtype": args[args.index("--outtype") + 1]}))
    with open(Path(__file__).with_name("calls"), "a") as f:
        f.write(args[0] + "\\n")
""")


def test_convert_once_per_key(tmp_path):
    ck = fake_checkpoint(tmp_path)
    d = fake_converter(tmp_path, CONVERTER_SCRIPT)
    cache = tmp_path / "gguf"
    out, fresh = lc.convert(ck, d, cache, progress=lambda line: None)
    assert fresh and json.loads(out.read_text()) == {"from": str(ck), "outtype": "bf16"}
    assert out.parent == cache and out.name.startswith("Model-1B-") and out.name.endswith(".bf16.gguf")
    assert lc.convert(ck, d, cache, progress=lambda line: None) == (out, False)
    assert (d / "calls").read_text().splitlines() == [str(ck)]
    (ck / "model.safetensors").write_bytes(b"\2" * 64)  # other weights: another file
    out2, fresh2 = lc.convert(ck, d, cache, progress=lambda line: None)
    assert fresh2 and out2 != out and len((d / "calls").read_text().splitlines()) == 2
    assert not list(cache.glob("*.part"))


def test_failed_conversion_leaves_nothing(tmp_path):
    ck = fake_checkpoint(tmp_path)
    d = fake_converter(tmp_path, "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'w').write('half')\n"
                                 "sys.exit('unsupported architecture')\n")
    cache = tmp_path / "gguf"
    with pytest.raises(RuntimeError, match="unsupported architecture"):
        lc.convert(ck, d, cache, progress=lambda line: None)
    assert list(cache.iterdir()) == [cache / "checkpoint-hashes.json"]


def fake_sdist(path: Path, version: str) -> Path:
    root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    files = {root + lc.CONVERTER: "# the converter\n", root + "conversion/__init__.py": "# models\n",
             root + "conversion/llama.py": "# llama\n", root + "gguf-py/gguf/__init__.py": "# gguf\n",
             root + "ggml/src/ggml.c": "int x;\n", root + "convert_lora_to_gguf.py": "# other\n",
             f"llama_cpp_python-{version}/llama_cpp/__init__.py": "__version__ = '9'\n"}
    sdist = path / lc.sdist_name(version)
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sdist


def test_converter_taken_from_the_sdist(tmp_path):
    fake_sdist(tmp_path, "9.9.9")
    d = lc.find_converter("9.9.9", tmp_path, download=False)
    assert d == tmp_path / "9.9.9" / "llama.cpp"
    got = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert got == ["conversion/__init__.py", "conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    (tmp_path / lc.sdist_name("9.9.9")).unlink()
    assert lc.find_converter("9.9.9", tmp_path, download=False) == d  # extracted once, kept
    with pytest.raises(FileNotFoundError):
        lc.find_converter("9.9.8", tmp_path, download=False)


def test_sdist_without_converter_is_refused(tmp_path):
    sdist = tmp_path / lc.sdist_name("1.0.0")
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("llama_cpp_python-1.0.0/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(FileNotFoundError, match="convert_hf_to_gguf.py"):
        lc.find_converter("1.0.0", tmp_path, download=False)
    assert not (tmp_path / "1.0.0" / "llama.cpp").exists()


# ---- the real thing (llama-cpp-python installed: `make anchor`) ----

@pytest.mark.slow
@pytest.mark.models
def test_smollm2_converted_to_bf16_gguf(tmp_path):
    version = lc.installed_version()
    if version is None:
        pytest.skip("llama-cpp-python is not installed (make anchor)")
    import gguf
    from safetensors import safe_open

    from tests.fixtures.embedded import smollm2_path

    ck = smollm2_path()
    out, fresh = lc.convert(ck, lc.find_converter(version), tmp_path, progress=lambda line: None)
    assert fresh
    reader = gguf.GGUFReader(out)
    with safe_open(ck / "model.safetensors", "pt") as f:
        names = [n for n in f.keys() if not n.endswith("rotary_emb.inv_freq")]
        matrices = sum(1 for n in names if len(f.get_slice(n).get_shape()) == 2)
    # tied embeddings: no separate lm_head in either file
    assert len(reader.tensors) == len(names)
    types = {t.name: t.tensor_type for t in reader.tensors}
    two_d = [t for t in reader.tensors if len([d for d in t.shape if d > 1]) == 2]
    assert len(two_d) == matrices
    assert all(types[t.name] == gguf.GGMLQuantizationType.BF16 for t in two_d), \
        {t.name: types[t.name].name for t in two_d if types[t.name] != gguf.GGMLQuantizationType.BF16}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.BF16
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
