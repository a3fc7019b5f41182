"""How ModelScope names the folders it downloads into."""

from __future__ import annotations

from pathlib import Path


def modelscope_variants(path: Path) -> list[Path]:
    """ModelScope stores '.' in repo names as '___' (Qwen2.5 -> Qwen2___5); try both spellings."""
    out = [path]
    name = path.name
    if "." in name:
        out.append(path.with_name(name.replace(".", "___")))
    if "___" in name:
        out.append(path.with_name(name.replace("___", ".")))
    return out
