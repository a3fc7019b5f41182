"""Anonymous battles pick two different served models, uniformly, never NaN.

fschat's get_battle_pair weights models by a table of LMSYS's public models (SAMPLING_WEIGHTS,
BATTLE_TARGETS); for local names the rival weights can be empty or all zero and numpy raises
"probabilities contain NaN" (lm-sys/FastChat#3294). Here every served model is equally likely,
the pair is always two different models (when two or more are served), and the side is random.
"""

from __future__ import annotations

import random

UPSTREAM = "https://github.com/lm-sys/FastChat/issues/3294"


def battle_pair(models: list[str], rng: random.Random | None = None) -> tuple[str, str]:
    rng = rng or random
    names = sorted(set(models))
    if not names:
        raise ValueError("no model is being served: start a worker first")
    if len(names) == 1:
        return names[0], names[0]
    a, b = rng.sample(names, 2)  # two different models, random order = random side
    return a, b


def _patch(anony) -> None:
    if getattr(anony.get_battle_pair, "_cpu_arena", False):
        return

    def get_battle_pair() -> tuple[str, str]:
        # fschat reads the module global `models` (set by load_demo_side_by_side_anony).
        return battle_pair(list(anony.models))

    get_battle_pair._cpu_arena = True
    anony.get_battle_pair = get_battle_pair


def apply() -> None:
    # Lazy: only the UI process imports gradio; other services must not pay for it.
    from launch.fastchat_patches.api_guard.on_import import when_imported

    when_imported("fastchat.serve.gradio_block_arena_anony", _patch)
