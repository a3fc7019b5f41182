"""Answer style measures: length and structure (lists, headings, code), language of the text."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LIST = re.compile(r"^\s*(?:[-*•+]|\d+[.)、]|[（(]?\d+[)）]|[一二三四五六七八九十]+、)\s*\S", re.MULTILINE)
_HEADING = re.compile(r"^\s*(?:#{1,6}\s+\S|\*\*[^*\n]{1,80}\*\*\s*:?\s*$)", re.MULTILINE)
_CODE = re.compile(r"```")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[A-Za-z\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Style:
    chars: int
    lines: int
    list_items: int
    headings: int
    code_blocks: int
    cjk_share: float | None  # share of letters that are CJK (None: no letters)


def measure(text: str) -> Style:
    letters = len(_LETTER.findall(text))
    return Style(
        chars=len(text),
        lines=len([ln for ln in text.splitlines() if ln.strip()]),
        list_items=len(_LIST.findall(text)),
        headings=len(_HEADING.findall(text)),
        code_blocks=len(_CODE.findall(text)) // 2,
        cjk_share=(len(_CJK.findall(text)) / letters) if letters else None,
    )
