"""The model sources: dataclasses and the parsing of deploy/embedded-models.toml."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddedModelError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SOURCES_FILE = REPO_ROOT / "deploy" / "embedded-models.toml"


@dataclass(frozen=True)
class WheelSpec:
    """An exactly pinned distribution: `name==version`. Exact pins keep the cache lookup offline."""

    name: str
    version: str

    @classmethod
    def parse(cls, spec: str) -> WheelSpec:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9][A-Za-z0-9._+!-]*)\s*", spec)
        if not m:
            raise EmbeddedModelError(f"package spec {spec!r} must be pinned exactly as name==version")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names normalise the project name (PEP 427/503): runs of -_. become one _.
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"

    def find_in(self, directory: Path) -> Path | None:
        if not directory.is_dir():
            return None
        for p in sorted(directory.iterdir()):
            if p.name.lower().startswith(self.wheel_prefix.lower()) and p.name.endswith(".whl"):
                return p
        return None


@dataclass(frozen=True)
class ModelSource:
    name: str
    packages: tuple[WheelSpec, ...]
    files: tuple[str, ...]
    sha256: str
    size: int | None
    stop_tokens: tuple[str, ...]
    # The upstream architecture shares lm_head with the input embedding (both defaults do).
    tie_word_embeddings: bool
    license: str
    credit: str
    official_packaging: bool


_SOURCE_KEYS = {f for f in ModelSource.__dataclass_fields__}


def _source_from_table(t: dict, where: str) -> ModelSource:
    unknown = set(t) - _SOURCE_KEYS
    if unknown:
        raise EmbeddedModelError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_SOURCE_KEYS)}")
    missing = {"name", "packages", "files", "sha256", "stop_tokens", "tie_word_embeddings", "license", "credit"} - set(
        t
    )
    if missing:
        raise EmbeddedModelError(f"{where}: missing key(s) {sorted(missing)}")
    sha = str(t["sha256"]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise EmbeddedModelError(f"{where}: sha256 must be 64 hex digits, got {t['sha256']!r}")
    if not t["packages"] or not t["files"]:
        raise EmbeddedModelError(f"{where}: `packages` and `files` must not be empty")
    return ModelSource(
        name=str(t["name"]),
        packages=tuple(WheelSpec.parse(p) for p in t["packages"]),
        files=tuple(str(f) for f in t["files"]),
        sha256=sha,
        size=int(t["size"]) if t.get("size") is not None else None,
        stop_tokens=tuple(str(s) for s in t["stop_tokens"]),
        tie_word_embeddings=bool(t["tie_word_embeddings"]),
        license=str(t["license"]),
        credit=str(t["credit"]).strip(),
        official_packaging=bool(t.get("official_packaging", False)),
    )


def load_sources(path: Path = SOURCES_FILE) -> list[ModelSource]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    tables = data.get("model", [])
    if not tables:
        raise EmbeddedModelError(f"{path}: no [[model]] entries")
    return [_source_from_table(t, f"{path} [[model]] #{i + 1}") for i, t in enumerate(tables)]
