"""Leaderboard tab: Bradley-Terry ratings with bootstrap 95% intervals, read again from the vote log on Refresh."""

from __future__ import annotations

import time

import gradio as gr

from evals.ratings import battles_from_vote_logs, compute_ratings
from launch.ui import logs

COLUMNS = ["Rank", "Model", "Rating", "95% CI", "Votes", "Wins"]


def leaderboard_rows(log_dir: str, include_named: bool) -> tuple[list[list], str]:
    battles = battles_from_vote_logs([log_dir], include_named=include_named)
    ratings = compute_ratings(battles)
    rows = [[i + 1, r.name, round(r.rating), f"{round(r.ci_low)} – {round(r.ci_high)}", r.games, r.wins]
            for i, r in enumerate(ratings)]
    kinds = "anonymous-battle and side-by-side" if include_named else "anonymous-battle"
    note = (f"{len(battles)} {kinds} votes from `{log_dir}` · Bradley-Terry on the Elo scale (1000 = average), "
            f"95% bootstrap interval · refreshed {time.strftime('%H:%M:%S')}")
    if not battles:
        note = f"No {kinds} votes yet in `{log_dir}`: vote in the Arena tabs, then press Refresh."
    return rows, note


def build_leaderboard_tab() -> None:
    gr.Markdown("Ratings from the votes cast on this machine. Ties and “both are bad” count as ties.")
    with gr.Row():
        refresh = gr.Button("🔄 Refresh", elem_id="leaderboard_refresh", scale=0)
        include_named = gr.Checkbox(False, label="Also count side-by-side votes (names were visible)")
    note = gr.Markdown(elem_id="leaderboard_note")
    table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="leaderboard_table")

    def refresh_fn(named: bool):
        rows, text = leaderboard_rows(logs.log_dir(), named)
        return gr.Dataframe(value=rows, headers=COLUMNS), text

    for trigger in (refresh.click, include_named.change):
        trigger(refresh_fn, [include_named], [table, note], concurrency_limit=None)
    return refresh_fn, include_named, table, note
