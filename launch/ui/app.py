"""cpu-arena's web UI: replaces `fastchat.serve.gradio_web_server_multi`'s page (same command-line flags).

FastChat's page is LMSYS's public arena: its title, texts, terms of use and links, a script from
cdnjs, Google Analytics, Google web fonts, and tab builders whose buttons cannot be extended (no Stop,
votes locked until the answer ends). We keep FastChat's State, templates, worker protocol and log format
and build the page here. Run through the entry point so the patches apply:

    python -m launch.fastchat_entry launch.ui.app --host 127.0.0.1 --port 7860 --controller-url ...
"""

from __future__ import annotations

import argparse
import os

import gradio as gr

from launch.ui import leaderboard, logs, models
from launch.ui.tabs import ChatTab
from launch.ui.theme import offline_theme

TITLE = "cpu-arena · local LLMs on CPU"
CSS = """
footer { display: none !important; }
.gradio-container sub { color: var(--body-text-color-subdued); }
"""


def header_md(model_list: list[str]) -> str:
    served = ", ".join(f"`{m}` ({models.dtype_of(m)})" for m in model_list) or "none yet"
    return f"""# 🖥️ cpu-arena: local LLMs on this machine's CPU
Models served here, unquantized: {served}. Answers are generated on CPU and can take a while:
**Stop** ends one at any time, and you can vote as soon as both answers are streaming.
Conversations and votes are logged on this machine only (`{logs.log_dir()}`); nothing is sent elsewhere."""


ABOUT_MD = """## About this deployment
cpu-arena runs FastChat's controller, one model worker per configured model, an OpenAI-compatible API and
this page, all on one machine's CPU, with the models in bfloat16 or float32 (never quantized).

- **Arena (battle)**: two different served models, drawn at random, answer anonymously; the names are shown
  after your vote.
- **Arena (side-by-side)**: choose both models.
- **Direct chat**: one model.
- **Leaderboard**: Bradley-Terry ratings (Elo scale) with 95% bootstrap intervals from the votes cast here.

Under each answer: model · dtype · decode speed (tokens/s) · time to first token (TTFT)."""


def build_demo(model_list: list[str]) -> gr.Blocks:
    battle, named, direct = ChatTab("battle", 2), ChatTab("named", 2), ChatTab("direct", 1)
    with gr.Blocks(title=TITLE, theme=offline_theme(), css=CSS, analytics_enabled=False) as demo:
        header = gr.Markdown(header_md(model_list), elem_id="arena_header")
        with gr.Tabs():
            with gr.Tab("⚔️ Arena (battle)", id=0, elem_id="tab_battle"):
                battle.build(model_list)
            with gr.Tab("⚔️ Arena (side-by-side)", id=1, elem_id="tab_named"):
                named_ui = named.build(model_list)
            with gr.Tab("💬 Direct chat", id=2, elem_id="tab_direct"):
                direct_ui = direct.build(model_list)
            with gr.Tab("🏆 Leaderboard", id=3, elem_id="tab_leaderboard") as lb_tab:
                refresh_fn, include_named, table, note = leaderboard.build_leaderboard_tab()
            with gr.Tab("ℹ️ About", id=4):
                gr.Markdown(ABOUT_MD)
        lb_tab.select(refresh_fn, [include_named], [table, note], concurrency_limit=None)

        selectors = named_ui["selectors"] + direct_ui["selectors"]

        def on_load():
            # "reload" mode: a worker started after the UI shows up on the next page load.
            names = models.served_models() or model_list
            updates = [gr.Dropdown(choices=names, value=names[i % len(names)] if names else None)
                       for i in range(len(selectors))]
            return (header_md(names), *updates)

        demo.load(on_load, None, [header, *selectors])
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--controller-url", default="http://127.0.0.1:21001")
    p.add_argument("--concurrency-count", type=int, default=10)
    p.add_argument("--model-list-mode", default="reload", choices=["once", "reload"])
    p.add_argument("--gradio-root-path", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    models.set_controller_url(args.controller_url)
    demo = build_demo(models.served_models())
    demo.queue(default_concurrency_limit=args.concurrency_count, status_update_rate=10, api_open=False).launch(
        server_name=args.host, server_port=args.port, share=False, max_threads=200,
        root_path=args.gradio_root_path, show_api=False, favicon_path=None,
    )


if __name__ == "__main__":
    main()
