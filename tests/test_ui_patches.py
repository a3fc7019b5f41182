"""The UI-side FastChat patches: hold back half characters, offline page."""

from __future__ import annotations

from launch.fastchat_patches import ui_offline_page, ui_utf8_stream


def _chunks_of(text: str, tokens_bytes: list[bytes]):
    """What fschat's generate_stream yields: the decode of all tokens so far (errors='replace')."""
    acc = b""
    for tb in tokens_bytes:
        acc += tb
        yield {"text": acc.decode("utf-8", errors="replace"), "finish_reason": None}


def test_stream_never_ends_in_half_a_character():
    text = "北京是中国的首都。"
    raw = text.encode()
    # Byte-level BPE: split every 3-byte character across two tokens.
    toks = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    stock = list(_chunks_of(text, toks))
    assert any("\ufffd" in c["text"] for c in stock)  # the bug this patch exists for

    patched = list(ui_utf8_stream.wrap_stream(lambda: _chunks_of(text, toks))())
    assert all("\ufffd" not in c["text"] for c in patched)
    assert patched[-1]["text"] == text
    # Monotone: every chunk is a prefix of the next (the UI never shows text that later vanishes).
    for a, b in zip(patched, patched[1:], strict=False):
        assert b["text"].startswith(a["text"])


def test_cut_at_length_limit_drops_the_half_char_and_keeps_inner_ones():
    assert ui_utf8_stream.hold_back_partial("好\ufffd") == "好"
    assert ui_utf8_stream.hold_back_partial("a\ufffdb") == "a\ufffdb"


def test_worker_stream_function_is_wrapped():
    from launch.fastchat_patches import apply_all

    apply_all()
    from fastchat.serve import model_worker

    func = model_worker.get_generate_stream_function(object(), "/models/some-llama")
    assert getattr(func, "_cpu_arena_utf8", False)


def test_gradio_page_has_no_outside_scripts():
    from launch.fastchat_patches import apply_all

    apply_all()
    import gradio.routes as routes

    html = routes.templates.env.loader.get_source(routes.templates.env, "frontend/index.html")[0]
    assert "cdnjs.cloudflare.com" not in html and "fonts.gstatic.com" not in html
    assert "<script" in html  # the page's own scripts stay
    assert ui_offline_page.strip_outside_tags('<script src="https://x.org/a.js" async></script>ok') == "ok"
