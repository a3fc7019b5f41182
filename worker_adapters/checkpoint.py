"""What a checkpoint is, read from its files (never from its folder name).

FastChat's built-in adapters match on the folder name ("chatglm" in the path), so a ChatGLM3
checkpoint in /data/m1 gets the default adapter and a Qwen2 folder named "qwen" gets the
Qwen-7B one. Here a checkpoint is identified by config.json (model_type, architectures,
auto_map) and its tokenizer files. Callers may pass a path, a ModelScope cache path (dots stored
as "___"), or a model *name* from the config file (the API server and UI only know names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from worker_adapters.modelscope import modelscope_variants


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict
    tokenizer_config: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())

    @property
    def auto_map(self) -> dict:
        return dict(self.config.get("auto_map") or {}) | dict(self.tokenizer_config.get("auto_map") or {})

    @property
    def needs_remote_code(self) -> bool:
        return bool(self.auto_map)

    @property
    def chat_template(self) -> str | None:
        tpl = self.tokenizer_config.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if not tpl:
            for name in ("chat_template.jinja",):
                f = self.path / name
                if f.is_file():
                    return f.read_text(encoding="utf-8")
            f = self.path / "chat_template.json"
            if f.is_file():
                tpl = _read_json(f).get("chat_template")
        return tpl or None

    def file_text(self, name: str) -> str:
        f = self.path / name
        try:
            return f.read_text(encoding="utf-8", errors="replace") if f.is_file() else ""
        except OSError:
            return ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _existing_checkpoint(path: Path) -> Path | None:
    for cand in modelscope_variants(path):
        if (cand / "config.json").is_file():
            return cand
    return None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path | None:
    """A checkpoint folder for a path or a configured model name; None when there is none."""
    raw = str(name_or_path)
    found = _existing_checkpoint(Path(os.path.expanduser(raw)))
    if found:
        return found
    from worker_adapters.policy import config_path_for_name  # the config file maps model names to folders

    configured = config_path_for_name(raw)
    return _existing_checkpoint(configured) if configured else None


def read_checkpoint(name_or_path: str | os.PathLike) -> CheckpointInfo | None:
    path = resolve_checkpoint(name_or_path)
    if path is None:
        return None
    config = _read_json(path / "config.json")
    if not config:
        return None
    return CheckpointInfo(
        path=path.resolve(),
        config=config,
        tokenizer_config=_read_json(path / "tokenizer_config.json"),
        generation_config=_read_json(path / "generation_config.json"),
    )
