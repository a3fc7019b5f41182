"""Streaming responses under pydantic 2.

fschat 0.2.36's openai_api_server serialises every stream chunk with
`chunk.json(exclude_unset=True, ensure_ascii=False)`. pydantic 2's deprecated `.json()` rejects
json.dumps keywords, so the generator raises on the first chunk and the client sees the
connection close mid-stream. Upstream: lm-sys/FastChat#3140 and #3067 (fixed on main, never
released to PyPI). We give the protocol models a `.json()` that accepts `ensure_ascii`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

UPSTREAM = "https://github.com/lm-sys/FastChat/issues/3140"
_IDENTITY = ("id", "object", "created")
_MODULES = ("fastchat.protocol.openai_api_protocol", "fastchat.protocol.api_protocol")


def _json(self: BaseModel, *, ensure_ascii: bool = True, **dump_kwargs) -> str:
    # model_dump(mode="json") keeps pydantic's own encoding of enums/datetimes; json.dumps
    # then honours ensure_ascii so Chinese text is sent as UTF-8, not \\u escapes.
    data = self.model_dump(mode="json", **dump_kwargs)
    # exclude_unset would also drop default-factory fields (id, object, created) that OpenAI
    # clients expect on every chunk; put them back.
    identity = {f: getattr(self, f) for f in _IDENTITY if f in type(self).model_fields}
    return json.dumps({**identity, **data}, ensure_ascii=ensure_ascii)


def apply() -> None:
    import importlib

    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == mod_name:
                obj.json = _json
