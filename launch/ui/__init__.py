"""cpu-arena's Gradio web UI: FastChat's three arena tabs plus a local leaderboard, served offline.

Run through the FastChat entry point so the runtime patches are active:
    python -m launch.fastchat_entry launch.ui.app --controller-url ... --port ...
"""
