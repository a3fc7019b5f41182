"""The three chat tabs (anonymous battle, side-by-side named, direct chat), built on FastChat's State,
conversation templates, worker protocol and log format, with what a CPU deployment needs on top:

- a Stop button (and the vote/clear buttons) cancel a running answer (`cancels=`) and close the worker stream;
- vote buttons open as soon as both answers are streaming, so nobody waits minutes to vote; a vote stops them;
- each answer carries a line with model, dtype, tokens/s and time to first token (model hidden in battles
  until the vote);
- battles draw two different served models uniformly (launch/ui/battle.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
from fastchat.constants import CONVERSATION_LIMIT_MSG, CONVERSATION_TURN_LIMIT, INPUT_CHAR_LEN_LIMIT
from fastchat.serve.gradio_web_server import get_ip

from launch.ui import logs, models
from launch.ui.battle import battle_pair
from launch.ui.stream import Session, add_question, new_session, start_answer, stop_answers

CURSOR = "▌"
POLL_S = 0.15
VOTES_2 = (("leftvote", "👈  A is better"), ("rightvote", "👉  B is better"),
           ("tievote", "🤝  Tie"), ("bothbad_vote", "👎  Both are bad"))
VOTES_1 = (("upvote", "👍  Upvote"), ("downvote", "👎  Downvote"))
SIDE_LABELS = ("Model A", "Model B")


def render(s: Session | None) -> list[dict]:
    """FastChat's conversation as Gradio 'messages', each answer followed by its stats line."""
    if s is None:
        return []
    conv = s.state.conv
    out: list[dict] = []
    turn = 0
    for i, (_, msg) in enumerate(conv.messages[conv.offset:]):
        text = msg[0] if isinstance(msg, tuple) else msg
        if i % 2 == 0:
            out.append({"role": "user", "content": text or ""})
            continue
        stats = s.stats[turn] if turn < len(s.stats) else None
        turn += 1
        body = text or ""
        if stats is not None and not stats.done:
            body += CURSOR
        if stats is not None:
            body += f"\n\n<sub>{stats.line(s.label)}</sub>"
        out.append({"role": "assistant", "content": body})
    return out


def _pending(s: Session | None) -> bool:
    return s is not None and len(s.state.conv.messages) > 0 and s.state.conv.messages[-1][1] is None


def _votable(sessions: list[Session | None]) -> bool:
    # Open the votes when every side has produced some text (or finished): the user can judge early.
    live = [s for s in sessions if s is not None and s.stats]
    return bool(live) and len(live) == len(sessions) and all(
        s.stats[-1].done or bool(s.state.conv.messages[-1][1]) for s in live)


def _btn(interactive: bool, visible: bool = True) -> gr.Button:
    return gr.Button(interactive=interactive, visible=visible)


@dataclass
class ChatTab:
    mode: str  # "battle" | "named" | "direct"
    sides: int

    @property
    def votes(self) -> tuple[tuple[str, str], ...]:
        return VOTES_1 if self.sides == 1 else VOTES_2

    # ---------- event handlers ----------
    def add_text(self, request: gr.Request, *args):
        n = self.sides
        sessions: list[Session | None] = list(args[:n])
        selectors = list(args[n:2 * n])
        text: str = args[2 * n]
        if any(s is not None and s.busy() for s in sessions):
            gr.Warning("An answer is still being generated: press Stop first.")
            return (*sessions, *map(render, sessions), text, *self._vote_updates(False))
        if self.mode == "battle":
            if sessions[0] is None or sessions[1] is None:
                pair = battle_pair(models.served_models())
                sessions = [new_session(m) for m in pair]
                for s, label in zip(sessions, SIDE_LABELS, strict=True):
                    s.label = label
        else:
            sessions = [s if s is not None and s.model == sel else (new_session(sel) if sel else None)
                        for s, sel in zip(sessions, selectors, strict=True)]
        text = (text or "").strip()[:INPUT_CHAR_LEN_LIMIT]
        if not text or any(s is None for s in sessions):
            return (*sessions, *map(render, sessions), "", *self._vote_updates(False))
        conv = sessions[0].state.conv
        if (len(conv.messages) - conv.offset) // 2 >= CONVERSATION_TURN_LIMIT:
            gr.Warning(CONVERSATION_LIMIT_MSG)
            return (*sessions, *map(render, sessions), "", *self._vote_updates(False))
        for s in sessions:
            add_question(s, text)
        return (*sessions, *map(render, sessions), "", *self._vote_updates(False))

    def answer(self, request: gr.Request, *args):
        n = self.sides
        sessions: list[Session | None] = list(args[:n])
        temperature, top_p, max_new_tokens = args[n:n + 3]
        gen = {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens)}
        meta = {"ip": get_ip(request), "ui_tab": self.mode}
        started = [s for s in sessions if _pending(s)]
        for s in started:
            start_answer(s, gen, meta)
        try:
            while any(s.busy() for s in started):
                yield (*map(render, sessions), *self._vote_updates(_votable(sessions)), _btn(True))
                time.sleep(POLL_S)
            yield (*map(render, sessions), *self._vote_updates(_votable(sessions)), _btn(False))
        finally:
            # Gradio closes the generator when the event is cancelled or the page goes away.
            if any(s.busy() for s in started):
                stop_answers(started, wait_s=0)

    def stop(self, *sessions: Session | None):
        stop_answers(list(sessions))
        return (*map(render, sessions), *self._vote_updates(_votable(list(sessions))), _btn(False))

    def vote(self, vote_type: str):
        def handler(request: gr.Request, *args):
            n = self.sides
            sessions: list[Session | None] = list(args[:n])
            selectors = list(args[n:2 * n])
            if any(s is None for s in sessions):
                return (*map(render, sessions), *self._reveal(sessions), *self._vote_updates(False), _btn(False))
            stop_answers(sessions)  # a vote during streaming ends the answers
            record = {"tstamp": round(time.time(), 4), "type": vote_type, "ip": get_ip(request)}
            if n == 1:
                record |= {"model": sessions[0].model, "state": sessions[0].state.dict()}
            else:
                # FastChat's format: "models" holds the names shown on screen ("" in the anonymous tab).
                shown = ["", ""] if self.mode == "battle" else selectors
                record |= {"models": shown, "states": [s.state.dict() for s in sessions]}
            logs.append_record(record)
            for s in sessions:
                s.label = None  # reveal
            gr.Info("Vote recorded.")
            return (*map(render, sessions), *self._reveal(sessions), *self._vote_updates(False), _btn(False))
        handler.__name__ = f"{self.mode}_{vote_type}"
        return handler

    def clear(self, *sessions: Session | None):
        stop_answers(list(sessions), wait_s=1.0)
        return (*([None] * self.sides), *([[]] * self.sides), *self._reveal([None] * self.sides),
                *self._vote_updates(False), _btn(False))

    # ---------- view helpers ----------
    def _vote_updates(self, on: bool) -> list[gr.Button]:
        return [_btn(on) for _ in self.votes]

    def _reveal(self, sessions: list[Session | None]) -> list[gr.Markdown]:
        if self.mode != "battle":
            return []
        return [gr.Markdown(f"**{label}: {s.model}** ({models.dtype_of(s.model)})"
                            if s is not None and s.label is None else "")
                for s, label in zip(sessions, SIDE_LABELS, strict=True)]

    # ---------- layout ----------
    def build(self, model_list: list[str]) -> dict:
        n = self.sides
        sessions = [gr.State() for _ in range(n)]
        selectors: list[gr.components.Component] = []
        chatbots, reveals = [], []
        with gr.Row():
            for i in range(n):
                with gr.Column():
                    if self.mode == "battle":
                        selectors.append(gr.State(""))
                        reveals.append(gr.Markdown("", elem_id=f"battle_reveal_{i}"))
                    else:
                        selectors.append(gr.Dropdown(
                            choices=model_list, value=model_list[i] if len(model_list) > i else None,
                            interactive=True, show_label=False, container=False,
                            elem_id=f"{self.mode}_model_{i}"))
                    label = SIDE_LABELS[i] if n == 2 else "Answer"
                    chatbots.append(gr.Chatbot(type="messages", label=label, height=420,
                                               show_copy_button=True, elem_id=f"{self.mode}_chatbot_{i}"))
        with gr.Row():
            vote_btns = [gr.Button(text, interactive=False, elem_id=f"{self.mode}_{kind}")
                         for kind, text in self.votes]
        with gr.Row():
            textbox = gr.Textbox(show_label=False, placeholder="Type a question (English or 中文) and press Enter",
                                 elem_id=f"{self.mode}_input", scale=8)
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id=f"{self.mode}_send")
            stop_btn = gr.Button("⏹ Stop", variant="stop", interactive=False, scale=1, elem_id=f"{self.mode}_stop")
        with gr.Row():
            clear_btn = gr.Button("🗑️  New conversation" if self.mode != "battle" else "🗑️  New battle",
                                  elem_id=f"{self.mode}_clear")
        with gr.Accordion("Parameters", open=False, elem_id=f"{self.mode}_params"):
            temperature = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Temperature",
                                    elem_id=f"{self.mode}_temperature")
            top_p = gr.Slider(0.0, 1.0, value=1.0, step=0.1, label="Top P")
            max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max output tokens",
                                   elem_id=f"{self.mode}_max_tokens")

        add_in = [*sessions, *selectors, textbox]
        add_out = [*sessions, *chatbots, textbox, *vote_btns]
        ans_in = [*sessions, temperature, top_p, max_tokens]
        ans_out = [*chatbots, *vote_btns, stop_btn]
        answer_events = []
        for trigger in (textbox.submit, send_btn.click):
            ev = trigger(self.add_text, add_in, add_out).then(self.answer, ans_in, ans_out)
            answer_events.append(ev)
        # Stop/vote/clear must not queue behind the answers they end: no concurrency limit.
        stop_btn.click(self.stop, sessions, ans_out, cancels=answer_events, concurrency_limit=None)
        for (kind, _), btn in zip(self.votes, vote_btns, strict=True):
            btn.click(self.vote(kind), [*sessions, *selectors], [*chatbots, *reveals, *vote_btns, stop_btn],
                      cancels=answer_events, concurrency_limit=None)
        clear_out = [*sessions, *chatbots, *reveals, *vote_btns, stop_btn]
        clear_btn.click(self.clear, sessions, clear_out, cancels=answer_events, concurrency_limit=None)
        if self.mode != "battle":
            for sel in selectors:
                sel.change(self.clear, sessions, clear_out, cancels=answer_events, concurrency_limit=None)
        return {"selectors": selectors if self.mode != "battle" else []}
