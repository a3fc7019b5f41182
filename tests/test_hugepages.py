"""Weights on 2 MB pages (engine/host/hugepages.py): gathered into an aligned arena and collapsed in place,
contents and identities kept, memory not doubled, best effort."""

from __future__ import annotations

import pytest
import torch

from engine.host.hugepages import GATHER_MIN, HUGE, _thp_never, collapse, collapse_model, gather, huge_bytes

# gather copies nothing where transparent huge pages are off (tested below with that switch faked).
needs_thp = pytest.mark.skipif(_thp_never(), reason="transparent huge pages are 'never' here")


def test_collapse_puts_a_tensor_on_huge_pages_in_place():
    t = torch.arange(16 << 20, dtype=torch.float32)  # 64 MB
    ptr, want = t.data_ptr(), t.clone()
    done, why = collapse([t])
    if done == 0:
        pytest.skip(f"this kernel does not collapse pages: {why}")
    assert done >= t.numel() * 4 - 2 * HUGE  # all but the unaligned ends
    assert huge_bytes(t) >= done
    assert t.data_ptr() == ptr and torch.equal(t, want)


def test_each_storage_once_and_views_and_opaque_tensors_are_fine():
    t = torch.zeros(8 << 20)
    done, _ = collapse([t, t[100:], t.view(2, -1)])
    assert done <= t.numel() * 4  # counted once
    lin = torch.nn.Linear(64, 64)
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach())
        assert collapse([packed]) == (0, "")  # opaque oneDNN tensor: skipped, not an error
    assert collapse([torch.zeros(10)]) == (0, "")  # smaller than one aligned 2 MB page


def test_collapse_model_covers_parameters_and_buffers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048))
    tensors = []
    monkeypatch.setattr("engine.host.hugepages.collapse", lambda ts: tensors.extend(ts) or (0, ""))
    collapse_model(model)
    assert len(tensors) == len(list(model.parameters())) + len(list(model.buffers()))


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CPU_ARENA_NO_HUGEPAGES", "1")
    t = torch.zeros(8 << 20)
    ptr = t.data_ptr()
    assert collapse([t]) == (0, "CPU_ARENA_NO_HUGEPAGES is set")
    assert gather([t]) == 0 and t.data_ptr() == ptr


def test_nothing_is_copied_where_transparent_huge_pages_are_off(monkeypatch):
    monkeypatch.setattr("engine.host.hugepages._thp_never", lambda: True)
    t = torch.zeros(8 << 20)
    ptr = t.data_ptr()
    assert gather([t]) == 0 and t.data_ptr() == ptr


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@needs_thp
def test_gather_moves_whole_tensors_into_one_aligned_arena_in_place():
    torch.manual_seed(0)
    odd = torch.randn((3 << 20) + 123)  # 12 MB and a bit: its ends would miss 2 MB pages where it was
    bf = torch.randn(500, 700).bfloat16()
    small = torch.randn(100)  # below GATHER_MIN: stays
    big = torch.randn(4 << 20)
    view = big[10:]  # shares its storage with `big`: moving it would split them
    want = [t.clone() for t in (odd, bf, small, view)]
    ids, small_ptr, view_ptr = [id(t) for t in (odd, bf)], small.data_ptr(), view.data_ptr()
    moved = gather([odd, bf, odd, small, view])
    assert moved >= odd.numel() * 4 + bf.numel() * 2 and small.numel() * 4 < GATHER_MIN
    assert [id(t) for t in (odd, bf)] == ids  # the same objects hold the new data
    assert odd.data_ptr() % HUGE == 0  # the arena starts on a 2 MB boundary
    assert odd.untyped_storage().data_ptr() == bf.untyped_storage().data_ptr()  # one arena
    assert small.data_ptr() == small_ptr and view.data_ptr() == view_ptr
    for t, w in zip((odd, bf, small, view), want, strict=True):
        assert torch.equal(t, w)


@needs_thp
def test_a_gathered_model_keeps_its_tied_weights_and_its_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(3000, 64), torch.nn.Linear(64, 3000, bias=False)).eval()
    model[1].weight = model[0].weight
    ids = torch.tensor([[1, 2, 2999]])
    with torch.inference_mode():
        want = model(ids)
    collapse_model(model)
    assert model[1].weight is model[0].weight and model[0].weight.data_ptr() % HUGE == 0
    with torch.inference_mode():
        assert torch.equal(model(ids), want)


@pytest.mark.slow
@needs_thp
def test_gathering_does_not_keep_both_copies():
    # Freeing one big block raises glibc's mmap threshold, so the tensors below land on the heap, as a
    # checkpoint's weights do: gather must hand their old pages back, not only drop them.
    block = torch.ones(8 << 20, dtype=torch.uint8)
    del block
    ts = [torch.ones(1 << 18) for _ in range(100)]  # 100 MB in 1 MB tensors
    before = _rss_kb()
    assert gather(ts) >= 100 << 20
    assert _rss_kb() - before < (100 << 10) // 4


@needs_thp
def test_after_gathering_a_small_odd_tensor_sits_on_huge_pages():
    t = torch.ones((1 << 20) + 7)  # 4 MB and a bit, unaligned: collapsing it where it was got 2 MB at most
    gather([t])
    done, why = collapse([t])
    if done == 0:
        pytest.skip(f"this kernel does not collapse pages: {why}")
    assert huge_bytes(t) >= t.numel() * 4


def test_a_loaded_model_lets_go_of_its_checkpoint_file(tmp_path):
    """transformers maps a safetensors checkpoint and its tensors live in that mapping; the small ones gather
    leaves (norms, biases) kept the whole file mapped and in RSS. After release_checkpoint_files no tensor is
    in the file, the file is no longer mapped, and the values and the tied weights are as they were."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.host.hugepages import file_mappings, release_checkpoint_files

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    checkpoint = str(tmp_path / "model.safetensors")

    def in_file() -> list[str]:
        ranges = [(lo, hi) for lo, hi, path in file_mappings() if path == checkpoint]
        return [n for n, t in model.named_parameters() if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]

    if not in_file():
        pytest.skip("this transformers copies checkpoints into memory: nothing to let go of")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    assert release_checkpoint_files(model) > 0
    assert in_file() == [] and checkpoint not in {path for _, _, path in file_mappings()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@needs_thp
def test_a_failed_collapse_still_counts_what_is_on_huge_pages(monkeypatch):
    """madvise(MADV_COLLAPSE) fails with ENOMEM when some 2 MB blocks are missing, yet a gathered arena took 2 MB
    pages at its first touch: the count says what is there, not 0."""
    import errno

    from engine.host import hugepages

    t = torch.ones(8 << 20)  # 32 MB
    gather([t])
    present = huge_bytes(t)
    if present == 0:
        pytest.skip("no 2 MB page was free for the arena's first touch here")

    def enomem(addr, length, advice):
        import ctypes

        ctypes.set_errno(errno.ENOMEM)
        return -1

    monkeypatch.setattr(hugepages, "_madvise", lambda: enomem)
    done, why = collapse([t])
    assert "Cannot allocate memory" in why
    assert done == present
