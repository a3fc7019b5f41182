"""The font of the report's figures: a CJK font chosen explicitly, never whatever the host happens to have.

matplotlib's default, DejaVu Sans, has no CJK glyphs, so Chinese category names came out as empty boxes.
`make setup` installs Debian's fonts-wqy-microhei (deploy/system-packages.sh); `figure_style()` loads that
file into matplotlib and makes it the family of the report's figures only, with DejaVu Sans behind it for
any glyph it lacks. Without the font the report stops with an error naming the package, because boxes in
a figure are easy to miss and a report that depends on the host is not comparable across machines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import matplotlib
from matplotlib import font_manager, ft2font

CJK_PACKAGE = "fonts-wqy-microhei"
# Where that Debian package puts its font (`dpkg -L fonts-wqy-microhei`).
CJK_FONT_FILES = (Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),)
# Ships inside matplotlib itself, so it is always there to fall back on.
FALLBACK_FAMILY = "DejaVu Sans"


class MissingFontError(RuntimeError):
    """The report's CJK font is not installed; the message names the package."""


def cjk_font_file() -> Path:
    for path in CJK_FONT_FILES:
        if path.is_file():
            return path
    raise MissingFontError(
        f"the report's figures need the CJK font {CJK_FONT_FILES[0]}, which is not installed: run `make setup` "
        f"as root, or `sudo apt-get install -y {CJK_PACKAGE}` (Debian package {CJK_PACKAGE})")


def cjk_family() -> str:
    """Register the CJK font file with matplotlib (once) and return its family name."""
    path = str(cjk_font_file())
    # addfont rather than relying on matplotlib's font cache: that cache is written on matplotlib's first
    # import and does not see a font installed after it, and it would also pick up any CJK font lying around.
    if not any(entry.fname == path for entry in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(path)
    return ft2font.FT2Font(path).family_name


def missing_glyphs(text: str, path: Path | None = None) -> set[str]:
    """The characters of `text` (whitespace aside) that the font file at `path` has no glyph for."""
    charmap = ft2font.FT2Font(str(path or cjk_font_file())).get_charmap()
    return {ch for ch in text if not ch.isspace() and ord(ch) not in charmap}


@contextlib.contextmanager
def figure_style() -> Iterator[str]:
    """Within this block new figures use the CJK font (DejaVu Sans as fallback); yields the family name.

    An rc_context, not a change to the global rcParams: other plots in the same process keep their fonts.
    """
    family = cjk_family()
    with matplotlib.rc_context({"font.family": [family, FALLBACK_FAMILY]}):
        yield family
