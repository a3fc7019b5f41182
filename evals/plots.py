"""Figures for the report, as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402

# No font choice here: the report draws these inside evals.fonts.figure_style(), which selects the CJK font.


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _clean(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def distributions(title: str, panels: list[tuple[str, dict[str, list[float | None]]]]) -> bytes:
    """One row of box plots (with points), one panel per measure, one box per model."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, per_model) in zip(axes[0], panels, strict=True):
        models = list(per_model)
        data = [_clean(per_model[m]) for m in models]
        if any(data):
            ax.boxplot([d or [float("nan")] for d in data], showfliers=False)
            for i, d in enumerate(data, 1):
                step = 0.3 / max(1, len(d) - 1)
                ax.scatter([i - (0.15 if len(d) > 1 else 0) + step * k for k in range(len(d))], d, s=10, alpha=0.6)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=15, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def grouped_bars(title: str, groups: list[str], series: dict[str, list[float | None]], ylabel: str,
                 ylim: tuple[float, float] | None = None) -> bytes:
    """Bars per group (x) for each series (a model): e.g. score per category per model."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * max(1, len(series)) + 2), 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if v is None or math.isnan(v) else v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11)
    return _png(fig)
