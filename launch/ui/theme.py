"""A Gradio theme that loads nothing from other hosts.

Gradio's default theme pulls "Source Sans Pro"/"IBM Plex Mono" from fonts.googleapis.com; on an offline
machine the page waits for them. Plain font names are system fonts: no @import, no request.
WenQuanYi Micro Hei / Noto CJK cover Chinese where installed.
"""

from __future__ import annotations

import gradio as gr

SANS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
        "Noto Sans CJK SC", "WenQuanYi Micro Hei", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace"]


def offline_theme() -> gr.themes.Base:
    return gr.themes.Default(font=SANS, font_mono=MONO, text_size=gr.themes.sizes.text_md)
