"""The report's figures draw Chinese with a real CJK font (not empty boxes), and say so when it is missing."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import matplotlib
import pytest
from matplotlib import font_manager

from evals import fonts, plots, report

FIXTURE = Path(__file__).parent / "fixtures" / "evals" / "run_small"
CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    dst = tmp_path / "run_small"
    shutil.copytree(FIXTURE, dst)
    return dst


def _font_complaints(caplog, draw) -> tuple[object, list[str]]:
    """What matplotlib says while `draw()` runs: missing glyphs are warnings, unknown families are logged."""
    with caplog.at_level(logging.WARNING, logger="matplotlib"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = draw()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return result, [s for s in said if "missing from font" in s or "findfont" in s]


def test_report_figures_draw_chinese_categories_with_the_cjk_font(run_dir, caplog):
    family_before = list(matplotlib.rcParams["font.family"])
    d, complaints = _font_complaints(caplog, lambda: report.collect(run_dir))
    cats = report._categories(d)
    chinese = "".join(c for c in cats if CJK.search(c))
    assert chinese, f"the fixture should have Chinese categories: {cats}"
    assert "keypoints" in d.figures  # the figure whose x labels are the categories
    assert complaints == []
    # The font really has every glyph of those labels (not just a font that matplotlib did not complain about).
    path = fonts.cjk_font_file()
    assert fonts.missing_glyphs(chinese, path) == set()
    # ... and it is the font the report selects, only inside its own figures.
    with fonts.figure_style() as family:
        assert font_manager.findfont(font_manager.FontProperties(), fallback_to_default=False) == str(path)
    assert family == "WenQuanYi Micro Hei"
    assert list(matplotlib.rcParams["font.family"]) == family_before


def test_the_check_sees_boxes_when_the_cjk_font_is_not_used(caplog):
    # Guards the test above: the same capture does report missing glyphs with matplotlib's default font.
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):
        _, complaints = _font_complaints(caplog, lambda: plots.grouped_bars("t", ["文本解析"], {"m": [0.5]}, "y"))
    assert any("missing from font" in c for c in complaints)


def test_a_missing_cjk_font_stops_the_report_naming_the_package(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "CJK_FONT_FILES", (tmp_path / "absent.ttc",))
    with pytest.raises(fonts.MissingFontError, match="apt-get install -y fonts-wqy-microhei"):
        report.collect(run_dir)
