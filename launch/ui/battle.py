"""The anonymous battle's pair: two different served models, each equally likely, on random sides.

FastChat's get_battle_pair weights models by a table of LMSYS's public models (SAMPLING_WEIGHTS,
BATTLE_TARGETS): for local names the weights can be empty or all zero, and numpy then raises
"probabilities contain NaN". The UI draws its pairs here instead, from the models it serves.
"""

from __future__ import annotations

import random


def battle_pair(models: list[str], rng: random.Random | None = None) -> tuple[str, str]:
    """Two different models of `models` in random order (the same one twice when only one is served)."""
    rng = rng or random
    names = sorted(set(models))
    if not names:
        raise ValueError("no model is being served: start a worker first")
    if len(names) == 1:
        return names[0], names[0]
    a, b = rng.sample(names, 2)  # two different models; the random order is the random side
    return a, b
